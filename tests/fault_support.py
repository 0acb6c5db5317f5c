"""The fault suite's rig (tests/test_fault_suite.py): worker processes started with the real CLI,
killed with SIGKILL, restarted and stopped; the runs their task noted (apps/fault_app.py); what a
store still holds (pending, delayed, in flight, dead); and the tally of a scenario: sent, done,
lost, duplicates, and which processes ran the duplicates."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent
APP = "apps.fault_app:server"

#: what a store still holds, by kind ("pending", "delayed", "in flight", "dead"); empty when drained
Residue = dict[str, int]


@dataclass(frozen=True, slots=True)
class Run:
    """One run of a task as the task noted it: its number, when it began (ns), the process."""

    task: int
    at_ns: int
    pid: int


def read_runs(directory: Path) -> list[Run]:
    """Every run noted so far (a SIGKILL can leave no torn line: each is one O_APPEND write)."""
    out = []
    for path in directory.glob("*.runs"):
        for line in path.read_text().splitlines():
            task, at_ns, pid = line.split()
            out.append(Run(int(task), int(at_ns), int(pid)))
    return out


class Fleet:
    """`python -m machinery worker --app apps.fault_app:server` processes, each with its log file."""

    def __init__(self, directory: Path, env: dict[str, str], concurrency: int) -> None:
        self.dir = directory
        self.runs_dir = directory / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir = directory / "logs"
        self.logs_dir.mkdir(exist_ok=True)
        path = os.pathsep.join([str(HERE), str(HERE.parent / "src")])
        self.env = {**os.environ, **env, "PYTHONPATH": path, "MACHINERY_FAULT_RUNS": str(self.runs_dir)}
        self.concurrency = concurrency
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: list[int] = []  # pids, in kill order

    def start(self) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        with open(self.logs_dir / f"worker-{n}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "machinery", "worker", "--app", APP, "--name", f"fault-{n}",
                 "--concurrency", str(self.concurrency)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def working(self) -> list[subprocess.Popen[bytes]]:
        """Live workers that have begun a task (killing one that is still starting proves little)."""
        return [p for p in self.live() if (self.runs_dir / f"{p.pid}.runs").exists()]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.killed.append(proc.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (graceful: running tasks finish and are acked), SIGKILL past the timeout."""
        live = self.live()
        for p in live:
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def kill_all(self) -> None:
        for p in self.live():
            p.kill()
            p.wait(10)

    def errors(self, limit: int = 12) -> str:
        """The last ERROR/WARNING lines of the workers' logs, for a failure's message."""
        lines = []
        for path in sorted(self.logs_dir.glob("*.log")):
            lines += [f"{path.name}: {line}" for line in path.read_text(errors="replace").splitlines()
                      if "ERROR" in line or "WARNING" in line or "Traceback" in line]
        return "\n".join(lines[-limit:])


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Tally:
    """A scenario's counts, from the tasks' own notes and the result store's states."""

    sent: int
    done: int  # tasks whose stored state is SUCCESS
    runs: list[Run]
    killed: Sequence[int] = ()  # pids of the workers killed during the scenario
    by_task: Counter[int] = field(init=False)
    #: pid -> runs that were not a task's last run (each one a run the task had again later)
    extra_by_pid: Counter[int] = field(init=False)

    def __post_init__(self) -> None:
        self.by_task = Counter(r.task for r in self.runs)
        ordered: defaultdict[int, list[Run]] = defaultdict(list)
        for r in sorted(self.runs, key=lambda r: r.at_ns):
            ordered[r.task].append(r)
        self.extra_by_pid = Counter(r.pid for runs in ordered.values() for r in runs[:-1])

    @property
    def lost(self) -> int:
        """Tasks without SUCCESS, and tasks stored as done that never ran (none can be)."""
        never_ran = sum(1 for i in range(self.sent) if self.by_task[i] == 0)
        return max(self.sent - self.done, never_ran)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.by_task.values() if n > 1)

    def extra_in_survivors(self) -> int:
        """Duplicate runs whose earlier run was in a worker that was never killed."""
        killed = set(self.killed)
        return sum(n for pid, n in self.extra_by_pid.items() if pid not in killed)

    def line(self, scenario: str, bound: int, seconds: float) -> str:
        return (f"fault-suite {scenario}: sent {self.sent}, done {self.done}, lost {self.lost}, "
                f"duplicates {self.duplicates} (bound {bound}), seconds {seconds:.1f}")


# --- what a store still holds -------------------------------------------------------------------


def sqlite_residue(path: Path) -> Residue:
    """Rows left in the embedded store's message table, by kind, and its dead letters."""
    now = time.time_ns()
    conn = sqlite3.connect(path, timeout=10)
    try:
        rows = conn.execute(
            "SELECT SUM(visible_ns <= ?), SUM(visible_ns > ? AND lease_token IS NULL), "
            "SUM(visible_ns > ? AND lease_token IS NOT NULL) FROM machinery_messages", (now, now, now)).fetchone()
        dead = conn.execute("SELECT COUNT(*) FROM machinery_dead_letters").fetchone()[0]
    finally:
        conn.close()
    counts = {"pending": rows[0] or 0, "delayed": rows[1] or 0, "in flight": rows[2] or 0, "dead": dead}
    return {k: v for k, v in counts.items() if v}


def redis_residue(url: str, queue: str) -> Residue:
    """The queue's list, the delayed set, the in-flight hash, every landing list, the dead letters."""
    import redis

    from machinery.drivers.redis.broker import DEAD_LETTER_KEY
    from machinery.drivers.redis.client import tagged

    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        landing = sum(int(client.llen(k)) for k in client.scan_iter(tagged(queue, ":machinery:landing:*")))
        counts = {
            "pending": int(client.llen(queue)),
            "delayed": int(client.zcard("delayed_tasks")),
            "in flight": int(client.hlen(tagged(queue, ":machinery:inflight"))) + landing,
            "dead": int(client.llen(DEAD_LETTER_KEY)),
        }
    finally:
        client.close()
    return {k: v for k, v in counts.items() if v}


def rabbit_residue(ctl: Callable[..., subprocess.CompletedProcess[str]], queue: str) -> Residue:
    """Ready and unacked messages of the task queue, its delay queues and its dead letters, as
    `rabbitmqctl list_queues` reports them (unacked ones are invisible to an AMQP client)."""
    res = ctl("list_queues", "--no-table-headers", "name", "messages_ready", "messages_unacknowledged")
    assert res.returncode == 0, res.stderr
    counts: Counter[str] = Counter()
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        name, ready, unacked = parts[0], int(parts[1]), int(parts[2])
        if name == queue:
            counts["pending"] += ready
            counts["in flight"] += unacked
        elif name.startswith("delay."):  # a private node: every delay queue is this suite's
            counts["delayed"] += ready + unacked
        elif name == f"{queue}.dead_letters":
            counts["dead"] += ready + unacked
    return {k: v for k, v in counts.items() if v}
