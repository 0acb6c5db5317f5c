"""The fault suite: SIGKILL storms on SQLite, Redis and RabbitMQ, and Redis and RabbitMQ restarts,
each while workers started with the real CLI drain thousands of short tasks. Every task must end
SUCCESS (0 lost), duplicate runs stay within what the workers held when they died, and nothing is
left queued, delayed or in flight. One line of counts per scenario is shown at the end of the run
(the terminal summary, tests/conftest.py), also when the scenario fails.

Everything runs on private servers (a redis-server and a RabbitMQ node of this file's own, on free
ports), never the shared ones. Each task notes its run in a file of its worker process's own
(tests/apps/fault_app.py): runs are counted apart from the result store, with the process that
made them.

The duplicate bound. A run is repeated only when the message was not acked before its worker died
(or, in a restart, before the broker dropped the worker's connection). A worker holds at most HOLD
unacked messages that may have begun:
  * SQLite and Redis: 4 x concurrency. `Worker.held` (fetched and not finished: running, waiting
    for a slot or for the state write) is at most 2 x concurrency, and a finished task's ack may
    wait in the committer for one flush more (on SQLite always, on Redis when state and ack cannot
    go in one script): at most the 2 x concurrency messages of one flush.
  * RabbitMQ: 2 x concurrency, the consumer's QoS (the largest fetch the worker asks for), past
    which RabbitMQ delivers nothing more until an ack.
A storm's bound is kills x HOLD; each killed worker's own duplicates (runs repeated after a run in
that worker) are at most HOLD, and no run is repeated after a run in a worker that was not killed.
A restart may make every worker's holdings run again: its bound is workers x HOLD, and each
worker's own duplicates are at most HOLD.

Sizes (this 2-core machine; the whole file takes 35-45 s, RabbitMQ's start included): 4,000
tasks of 5 ms per storm, 3 workers of concurrency 4, 6 kills at random points of the drain (each
when a random share of 10-85 % of the tasks has begun, of a random worker among those running
tasks, replaced at once); 2,000 tasks per restart, the server down for 1 s when 25-50 % of the
tasks have begun. Leases (SQLite, Redis) are 3 s instead of 30 s in the storms, so a killed
worker's messages come back within the test; Redis's restart keeps the 30 s lease, so a message
left claimed by nobody after the restart (a claim whose reply was lost) would hold the drain up
for most of it, which the test refuses. RabbitMQ is restarted with stop_app / start_app (the node
closes every connection and reloads its durable queues). MACHINERY_FAULT_SEED fixes the random
choices of a run (its seed is in every failure message).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from amqp_support import PrivateRabbit, private_rabbit_node
from fault_support import Fleet, Residue, Tally, rabbit_residue, read_runs, redis_residue, sqlite_residue, wait_for
from machinery import Config, Server, Signature
from naming import unique
from redis_servers import PrivateRedis
from servers import unavailable

pytestmark = [pytest.mark.slow]

STORM_TASKS = 4000
RESTART_TASKS = 2000
WORKERS = 3
CONCURRENCY = 4
KILLS = 6
LEASE = 3.0
#: Redis's restart runs on the default lease (30 s), so that a message left claimed by nobody (a
#: claim whose reply was lost with the connection) would hold the drain up past RECOVERY_SECONDS
#: after the server is back (it ends within a few seconds otherwise, reconnection included)
RESTART_LEASE = 30.0
RECOVERY_SECONDS = 20.0
TASK_SECONDS = 0.005
DOWN_SECONDS = 1.0
DRAIN_TIMEOUT = 60.0
#: Redis with every write on disk before it is acknowledged, so a SIGKILL loses nothing
AOF = ("--appendonly", "yes", "--appendfsync", "always")


@dataclass
class Store:
    """One technology under test: the config its workers and the producer share (as environment
    variables, which the CLI workers read), what it still holds, and HOLD (see the module doc)."""

    name: str
    env: dict[str, str]
    residue: Callable[[], Residue]
    hold: int


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("MACHINERY_FAULT_SEED") or random.randrange(1 << 32))


rabbit = pytest.fixture(scope="module", name="rabbit")(private_rabbit_node)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed: cannot start a private Redis")
    server = PrivateRedis(tmp_path / "redis", *AOF).start()
    yield server
    server.kill()


def common_env(queue: str, lease: float = LEASE) -> dict[str, str]:
    return {"DEFAULT_QUEUE": queue, "MACHINERY_FAULT_TASK_SECONDS": str(TASK_SECONDS),
            "SQLITE_LEASE_SECONDS": str(lease), "REDIS_LEASE_SECONDS": str(lease)}


def sqlite_store(tmp_path: Path) -> Store:
    db = tmp_path / "store.sqlite3"
    url = f"sqlite:///{db}"
    env = {**common_env("fault_tasks"), "BROKER": url, "RESULT_BACKEND": url}
    return Store("sqlite", env, lambda: sqlite_residue(db), 4 * CONCURRENCY)


def redis_store(server: PrivateRedis, lease: float = LEASE) -> Store:
    queue = "fault_tasks"
    env = {**common_env(queue, lease), "BROKER": server.url, "RESULT_BACKEND": server.url}
    return Store("redis", env, lambda: redis_residue(server.url, queue), 4 * CONCURRENCY)


def rabbit_store(node: PrivateRabbit, results: PrivateRedis) -> Store:
    queue = unique("fault_")
    env = {**common_env(queue), "BROKER": node.url, "RESULT_BACKEND": results.url,
           "AMQP_EXCHANGE": f"{queue}_exchange", "AMQP_BINDING_KEY": f"{queue}_task"}
    return Store("rabbitmq", env, lambda: rabbit_residue(node.ctl, queue), 2 * CONCURRENCY)


class Scenario:
    """A producer Server, the tasks it sent, and a fleet of CLI workers on one store."""

    def __init__(self, store: Store, tmp_path: Path, tasks: int, seed: int) -> None:
        self.store = store
        self.tasks = tasks
        self.seed = seed
        self.rng = random.Random(seed)
        self.started = time.monotonic()
        self.server = Server(Config.from_env(store.env))
        self.fleet = Fleet(tmp_path / "fleet", store.env, CONCURRENCY)
        self.uuids: list[str] = []
        self.drained_at = 0.0  # monotonic time at which every task was SUCCESS and the store empty

    def send_and_start(self) -> None:
        results = self.server.send_tasks([Signature("touch", [i]) for i in range(self.tasks)])
        self.uuids = [r.signature.uuid for r in results]
        for _ in range(WORKERS):
            self.fleet.start()

    def begun(self) -> int:
        """Tasks that have begun at least once."""
        return len({r.task for r in read_runs(self.fleet.runs_dir)})

    def wait_begun(self, share: float) -> None:
        wait_for(f"{share:.0%} of the tasks to begin", lambda: self.begun() >= share * self.tasks, DRAIN_TIMEOUT)

    def done(self) -> int:
        try:
            states = self.server.portal.run(self.server.get_backend().get_states(self.uuids))
        except Exception:  # the store is restarting: not done yet
            return 0
        return sum(1 for s in states if s is not None and s.is_success())

    def drain(self) -> None:
        """Wait until every task is SUCCESS and the store holds nothing, then stop the workers
        gracefully; then the store must still hold nothing."""
        def drained() -> bool:
            if self.begun() < self.tasks or self.done() < self.tasks:
                return False
            try:
                return not self.store.residue()
            except Exception:
                return False

        try:
            wait_for("every task to end SUCCESS and the store to empty", drained, DRAIN_TIMEOUT, 0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: done {self.done()} of {self.tasks}, store holds "
                                 f"{self._residue_text()}\n{self.diagnosis()}") from None
        self.drained_at = time.monotonic()
        self.fleet.stop()
        left = self.store.residue()
        assert not left, f"left in the store after the workers stopped: {left}\n{self.diagnosis()}"

    def finish(self, title: str, bound: int, report: Callable[[str], None]) -> tuple[Tally, str]:
        """Drain, count, and report the counts (also when the drain fails); the tally and a
        failure message's tail."""
        try:
            self.drain()
        finally:
            tally = self.tally()
            line = tally.line(title, bound, self.seconds())
            report(line)
        return tally, f"{line}; {self.diagnosis()}"

    def _residue_text(self) -> str:
        try:
            return str(self.store.residue())
        except Exception as exc:
            return f"(unreadable: {exc})"

    def tally(self) -> Tally:
        return Tally(self.tasks, self.done(), read_runs(self.fleet.runs_dir), list(self.fleet.killed))

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def diagnosis(self) -> str:
        return f"seed {self.seed} (MACHINERY_FAULT_SEED); worker log lines:\n{self.fleet.errors()}"

    def close(self) -> None:
        self.fleet.kill_all()
        self.server.close()


def sigkill_storm(store: Store, tmp_path: Path, seed: int, report: Callable[[str], None]) -> None:
    sc = Scenario(store, tmp_path, STORM_TASKS, seed)
    try:
        sc.send_and_start()
        for share in sorted(sc.rng.uniform(0.10, 0.85) for _ in range(KILLS)):
            sc.wait_begun(share)
            wait_for("a worker running tasks", lambda: bool(sc.fleet.working()), DRAIN_TIMEOUT)
            victim = sc.rng.choice(sc.fleet.working())
            time.sleep(sc.rng.uniform(0.0, 0.05))
            assert sc.begun() < sc.tasks, f"a kill landed after the drain: make the drain longer ({sc.diagnosis()})"
            sc.fleet.kill(victim)
            sc.fleet.start()
        bound = len(sc.fleet.killed) * store.hold
        t, why = sc.finish(f"{store.name} SIGKILL storm", bound, report)
        assert len(sc.fleet.killed) == KILLS
        assert t.lost == 0, why
        assert t.duplicates <= bound, why
        assert t.extra_in_survivors() == 0, f"a task ran again after a run in a live worker: {why}"
        over = {pid: n for pid, n in t.extra_by_pid.items() if n > store.hold}
        assert not over, f"killed workers whose tasks ran again more than {store.hold} times: {over}; {why}"
    finally:
        sc.close()


def broker_restart(store: Store, tmp_path: Path, seed: int, report: Callable[[str], None],
                   restart: Callable[[], None]) -> None:
    sc = Scenario(store, tmp_path, RESTART_TASKS, seed)
    try:
        sc.send_and_start()
        sc.wait_begun(sc.rng.uniform(0.25, 0.50))
        assert sc.begun() < sc.tasks, f"the restart landed after the drain ({sc.diagnosis()})"
        restart()
        back = time.monotonic()
        bound = WORKERS * store.hold
        t, why = sc.finish(f"{store.name} restart", bound, report)
        assert sc.fleet.killed == [] and len(sc.fleet.procs) == WORKERS
        assert t.lost == 0, why
        assert t.duplicates <= bound, why
        over = {pid: n for pid, n in t.extra_by_pid.items() if n > store.hold}
        assert not over, f"workers whose tasks ran again more than the {store.hold} they hold: {over}; {why}"
        assert sc.drained_at - back < RECOVERY_SECONDS, (
            f"the drain ended {sc.drained_at - back:.1f} s after the server was back: messages waited "
            f"(claimed by nobody, until their lease ran out?); {why}")
    finally:
        sc.close()


def test_sqlite_sigkill_storm(tmp_path: Path, seed: int, fault_report: Callable[[str], None]) -> None:
    sigkill_storm(sqlite_store(tmp_path), tmp_path, seed, fault_report)


@pytest.mark.redis
def test_redis_sigkill_storm(tmp_path: Path, redis_server: PrivateRedis, seed: int,
                             fault_report: Callable[[str], None]) -> None:
    sigkill_storm(redis_store(redis_server), tmp_path, seed, fault_report)


@pytest.mark.amqp
def test_rabbitmq_sigkill_storm(tmp_path: Path, rabbit: PrivateRabbit, redis_server: PrivateRedis, seed: int,
                                fault_report: Callable[[str], None]) -> None:
    sigkill_storm(rabbit_store(rabbit, redis_server), tmp_path, seed, fault_report)


@pytest.mark.redis
def test_redis_restart(tmp_path: Path, redis_server: PrivateRedis, seed: int,
                       fault_report: Callable[[str], None]) -> None:
    def restart() -> None:
        redis_server.kill()  # SIGKILL: with appendfsync always, every acknowledged write is on disk
        time.sleep(DOWN_SECONDS)
        redis_server.start()  # same port, same data directory

    broker_restart(redis_store(redis_server, RESTART_LEASE), tmp_path, seed, fault_report, restart)


@pytest.mark.amqp
def test_rabbitmq_restart(tmp_path: Path, rabbit: PrivateRabbit, redis_server: PrivateRedis, seed: int,
                          fault_report: Callable[[str], None]) -> None:
    def restart() -> None:
        rabbit.stop_app()  # closes every connection: unacked messages go back to their durable queue
        time.sleep(DOWN_SECONDS)
        rabbit.start_app()  # same node and port; durable queues and persistent messages come back

    broker_restart(rabbit_store(rabbit, redis_server), tmp_path, seed, fault_report, restart)
