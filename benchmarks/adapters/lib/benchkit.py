"""Shared by every adapter and every benchmark app module.

- `mark()`: called by the benchmark tasks; appends the completion time to a file, so the adapter can
  count finished tasks across any number of worker processes, threads or forked job processes.
- `Settings`: the run's broker/backend/queue, passed to worker processes through the environment.
- `Workers`: starts a system's worker commands, measures their memory, stops them (TERM, then KILL).
- `System`: what an adapter implements; `main()` runs one workload and prints one JSON line.

Runs inside each system's own virtualenv, so it uses only the standard library and psutil.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LIB_DIR = Path(__file__).resolve().parent
RESULT_PREFIX = "BENCH-RESULT "
_STAMP = struct.Struct("<d")

# ---------------------------------------------------------------------------------------------------
# Completion marks


_mark_fd: int | None = None
_mark_pid = 0


def mark() -> None:
    """Record that one benchmark task finished (one 8-byte monotonic timestamp, O_APPEND)."""
    global _mark_fd, _mark_pid
    pid = os.getpid()
    if _mark_fd is None or _mark_pid != pid:
        _mark_fd = os.open(os.environ["BENCH_MARK_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _mark_pid = pid
    os.write(_mark_fd, _STAMP.pack(time.monotonic()))


class Marks:
    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> None:
        self.path.write_bytes(b"")

    def count(self) -> int:
        try:
            return self.path.stat().st_size // _STAMP.size
        except FileNotFoundError:
            return 0

    def times(self) -> list[float]:
        data = self.path.read_bytes()
        usable = len(data) - len(data) % _STAMP.size
        return [t for (t,) in _STAMP.iter_unpack(data[:usable])]


# ---------------------------------------------------------------------------------------------------
# Settings shared with the worker processes


@dataclass(frozen=True)
class Settings:
    broker_url: str  # "" = the system's embedded default (SQLite)
    result_url: str  # "" = results not stored
    queue: str
    work_dir: str
    transport: str  # "redis", "amqp" or "sqlite"
    concurrency: int  # per worker process, for systems where the harness chooses it

    @property
    def results(self) -> bool:
        return bool(self.result_url)

    def to_env(self) -> dict[str, str]:
        return {f"BENCH_{k.upper()}": str(v) for k, v in asdict(self).items()} | {
            "BENCH_MARK_FILE": str(Path(self.work_dir) / "marks.bin"),
        }


def settings() -> Settings:
    """The settings of this run, read back from the environment (used by the app modules)."""
    env = os.environ
    return Settings(
        broker_url=env["BENCH_BROKER_URL"],
        result_url=env["BENCH_RESULT_URL"],
        queue=env["BENCH_QUEUE"],
        work_dir=env["BENCH_WORK_DIR"],
        transport=env["BENCH_TRANSPORT"],
        concurrency=int(env["BENCH_CONCURRENCY"]),
    )


def bin_path(name: str) -> str:
    """A console script of the running virtualenv (not resolved: the venv's bin/ is what matters)."""
    return str(Path(sys.executable).parent / name)


# ---------------------------------------------------------------------------------------------------
# Worker processes


class WorkerDied(RuntimeError):
    pass


class Workers:
    """The worker commands of one system, in this adapter's process group (the orchestrator can kill all)."""

    def __init__(self, argvs: Sequence[Sequence[str]], cfg: Settings) -> None:
        env = dict(os.environ) | cfg.to_env()
        env["PYTHONPATH"] = os.pathsep.join([str(LIB_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["PYTHONUNBUFFERED"] = "1"
        self.logs: list[Path] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        for i, argv in enumerate(argvs):
            log = Path(cfg.work_dir) / f"worker-{i}.log"
            self.logs.append(log)
            with log.open("wb") as fh:
                self.procs.append(
                    subprocess.Popen(
                        list(argv), env=env, cwd=cfg.work_dir, stdout=fh, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
        self.started = time.monotonic()

    def check_alive(self) -> None:
        dead = [p for p in self.procs if p.poll() is not None]
        if dead:
            raise WorkerDied(f"worker exited with code {dead[0].returncode}: {self.log_tail()}")

    def log_tail(self, chars: int = 1500) -> str:
        text = ""
        for log in self.logs:
            with contextlib.suppress(OSError):
                text += log.read_text(errors="replace")[-chars:]
        return text[-chars:]

    def _tree(self) -> list[Any]:
        import psutil

        out = []
        for p in self.procs:
            try:
                top = psutil.Process(p.pid)
                out.append(top)
                out.extend(top.children(recursive=True))
            except psutil.NoSuchProcess:
                continue
        return out

    def memory(self) -> dict[str, float]:
        """RSS, PSS and USS summed over every worker process (supervisors and pool children
        included), and the largest single process's RSS. PSS splits pages shared between forked
        processes among them, so its sum is the memory the workers really take."""
        import psutil

        rss = uss = pss = largest = 0
        count = 0
        for proc in self._tree():
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            uss += info.uss
            pss += getattr(info, "pss", info.uss)
            largest = max(largest, info.rss)
            count += 1
        return {"rss_mb": rss / 2**20, "uss_mb": uss / 2**20, "pss_mb": pss / 2**20,
                "largest_rss_mb": largest / 2**20, "processes": count}

    def stop(self, grace: float = 15.0) -> float:
        """SIGTERM (graceful), then SIGKILL whatever is left after `grace`; returns the graceful part's time."""
        import psutil

        t0 = time.monotonic()
        tree = self._tree()
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        graceful = time.monotonic() - t0
        for proc in tree + self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        return graceful


# ---------------------------------------------------------------------------------------------------
# What an adapter implements


class NotSupported(Exception):
    """The system has no such feature; the table shows n/a with this text as the note."""


class System:
    name = "?"
    setups: tuple[str, ...] = ("default",)
    supports_bulk = True
    supports_workflows = False
    transports: tuple[str, ...] = ("redis",)
    stop_grace = 15.0  # seconds between SIGTERM and SIGKILL when the workers are stopped

    def __init__(self, cfg: Settings) -> None:
        self.cfg = cfg

    def version(self) -> str:
        return "?"

    def describe(self, setup: str) -> str:
        return setup

    def worker_argv(self, setup: str) -> list[list[str]]:
        raise NotImplementedError

    def enqueue(self, n: int, bulk: bool) -> str:
        """Send n no-op tasks; return a short description of the API used."""
        raise NotImplementedError

    def roundtrip(self, timeout: float) -> None:
        """Send one task returning 1 and wait for its result."""
        raise NotImplementedError

    def chord(self, n: int, timeout: float) -> None:
        raise NotSupported("no chord")

    def chain(self, n: int, timeout: float) -> None:
        raise NotSupported("no chain")

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# The workloads, the same for every system


def _wait_marks(marks: Marks, n: int, workers: Workers, cap: float) -> bool:
    deadline = time.monotonic() + cap
    next_check = 0.0
    while marks.count() < n:
        now = time.monotonic()
        if now >= deadline:
            return False
        if now >= next_check:
            workers.check_alive()
            next_check = now + 0.5
        time.sleep(0.005)
    return True


def fill(system: System, n: int, bulk: bool) -> tuple[float, str]:
    t0 = time.perf_counter()
    method = system.enqueue(n, bulk=bulk and system.supports_bulk)
    return time.perf_counter() - t0, method


def run_enqueue(system: System, n: int, bulk: bool) -> dict[str, Any]:
    if bulk and not system.supports_bulk:
        raise NotSupported("no batch enqueue API")
    t0 = time.perf_counter()
    method = system.enqueue(n, bulk)
    seconds = time.perf_counter() - t0
    return {"n": n, "seconds": seconds, "rate": n / seconds, "method": method}


def run_drain(system: System, n: int, setup: str, cap: float, bulk: bool) -> dict[str, Any]:
    marks = Marks(Path(system.cfg.work_dir) / "marks.bin")
    marks.reset()
    fill_s, method = fill(system, n, bulk)
    workers = Workers(system.worker_argv(setup), system.cfg)
    try:
        complete = _wait_marks(marks, n, workers, cap)
        cut_at = time.monotonic()
        memory = workers.memory()
    finally:
        stop_seconds = workers.stop(system.stop_grace)
    stamps = marks.times()
    if not complete:  # leave out what ran during the shutdown
        stamps = [t for t in stamps if t <= cut_at]
    done = len(stamps)
    if done < 2:
        raise RuntimeError(f"only {done} of {n} tasks ran in {cap:.0f}s; worker log: {workers.log_tail()}")
    first, last = min(stamps), max(stamps)
    return {
        "n": n, "done": min(done, n), "complete": complete, "setup": system.describe(setup),
        "fill_seconds": fill_s, "fill_rate": n / fill_s, "fill_method": method,
        "seconds": last - workers.started,  # worker launch -> last task done
        "busy_seconds": last - first,  # first task done -> last task done
        "rate": (done - 1) / (last - first) if last > first else 0.0,
        "memory_after": memory, "stop_seconds": stop_seconds,
    }


def run_latency(system: System, n: int, setup: str, cap: float) -> dict[str, Any]:
    workers = Workers(system.worker_argv(setup), system.cfg)
    try:
        system.roundtrip(timeout=90.0)  # waits until the workers are up
        for _ in range(5):
            system.roundtrip(timeout=10.0)
        time.sleep(0.5)
        idle = workers.memory()
        samples: list[float] = []
        deadline = time.monotonic() + cap
        while len(samples) < n and time.monotonic() < deadline:
            t0 = time.perf_counter()
            system.roundtrip(timeout=10.0)
            samples.append(time.perf_counter() - t0)
        workers.check_alive()
    finally:
        stop_seconds = workers.stop(system.stop_grace)
    samples.sort()
    ms = [s * 1000 for s in samples]
    return {
        "n": n, "done": len(samples), "complete": len(samples) >= n, "setup": system.describe(setup),
        "stop_seconds": stop_seconds,
        "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
        "mean_ms": statistics.fmean(ms), "max_ms": ms[-1], "min_ms": ms[0],
        "memory_idle": idle,
    }


def run_workflows(system: System, chord_n: int, chain_n: int, setup: str) -> dict[str, Any]:
    workers = Workers(system.worker_argv(setup), system.cfg)
    out: dict[str, Any] = {"setup": system.describe(setup), "chord_n": chord_n, "chain_n": chain_n}
    try:
        system.roundtrip(timeout=90.0)
        for key, fn, size in (("chord", system.chord, chord_n), ("chain", system.chain, chain_n)):
            t0 = time.perf_counter()
            try:
                fn(size, 120.0)
                out[f"{key}_seconds"] = time.perf_counter() - t0
            except NotSupported as exc:
                out[f"{key}_error"] = f"n/a: {exc}"
            except Exception as exc:
                out[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:500]
        workers.check_alive()
    finally:
        workers.stop(system.stop_grace)
    return out


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(pct / 100 * len(sorted_values) + 0.4999))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# ---------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="benchmark adapter (prints one JSON line)")
    p.add_argument("workload", choices=["info", "enqueue", "drain", "latency", "workflows"])
    p.add_argument("--broker-url", default="")
    p.add_argument("--result-url", default="")
    p.add_argument("--transport", default="redis", choices=["redis", "amqp", "sqlite"])
    p.add_argument("--queue", default="bench")
    p.add_argument("--work-dir", default=".")
    p.add_argument("--concurrency", type=int, default=10)
    p.add_argument("--setup", default="")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--bulk", action="store_true")
    p.add_argument("--cap", type=float, default=60.0, help="drain, latency: stop after this many seconds")
    p.add_argument("--chord-n", type=int, default=1000)
    p.add_argument("--chain-n", type=int, default=100)
    return p


def main(factory: Callable[[Settings], System]) -> None:
    args = _parser().parse_args()
    cfg = Settings(
        broker_url=args.broker_url, result_url=args.result_url, queue=args.queue,
        work_dir=str(Path(args.work_dir).resolve()), transport=args.transport, concurrency=args.concurrency,
    )
    os.environ.update(cfg.to_env())
    sys.path.insert(0, str(LIB_DIR))
    os.chdir(cfg.work_dir)
    out: dict[str, Any]
    system: System | None = None
    try:
        system = factory(cfg)
        setup = args.setup or system.setups[0]
        if args.workload == "info":
            out = {
                "version": system.version(), "setups": {s: system.describe(s) for s in system.setups},
                "supports_bulk": system.supports_bulk, "supports_workflows": system.supports_workflows,
                "transports": list(system.transports),
            }
        elif cfg.transport not in system.transports:
            raise NotSupported(f"{cfg.transport} not supported")
        elif args.workload == "enqueue":
            out = run_enqueue(system, args.n, args.bulk)
        elif args.workload == "drain":
            out = run_drain(system, args.n, setup, args.cap, args.bulk)
        elif args.workload == "latency":
            out = run_latency(system, args.n, setup, args.cap)
        else:
            out = run_workflows(system, args.chord_n, args.chain_n, setup)
        out = {"ok": True, **out}
    except NotSupported as exc:
        out = {"ok": False, "na": True, "error": f"n/a: {exc}"}
    except BaseException as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()}
    finally:
        if system is not None:
            with contextlib.suppress(Exception):
                system.close()
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: some clients' atexit hooks hang on a closed server
