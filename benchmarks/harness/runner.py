"""Runs one adapter command in its system's virtualenv, bounded in time, and sweeps up what it left."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from harness.envs import BENCH_DIR, env_python

RESULT_PREFIX = "BENCH-RESULT "
RUN_ID_ENV = "BENCH_RUN_ID"


def run_adapter(system: str, args: list[str], timeout: float, work_dir: Path, run_id: str) -> dict[str, Any]:
    """`<env python> -P adapters/<system>.py ARGS...`; returns its JSON line, or {"ok": False, "error": ...}."""
    work_dir.mkdir(parents=True, exist_ok=True)
    adapter = BENCH_DIR / "adapters" / f"{system}.py"
    cmd = [str(env_python(system)), "-P", str(adapter), *args, "--work-dir", str(work_dir)]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env[RUN_ID_ENV] = run_id
    t0 = time.monotonic()
    with (work_dir / "adapter.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            sweep(run_id)
            return {"ok": False, "error": f"timeout: adapter killed after {timeout:.0f}s",
                    "wall_seconds": time.monotonic() - t0}
    sweep(run_id)
    for line in reversed(stdout.decode(errors="replace").splitlines()):
        if line.startswith(RESULT_PREFIX):
            out: dict[str, Any] = json.loads(line[len(RESULT_PREFIX):])
            out["wall_seconds"] = time.monotonic() - t0
            return out
    tail = (work_dir / "adapter.log").read_text(errors="replace")[-1500:]
    return {"ok": False, "error": f"adapter exited {proc.returncode} without a result: {tail}",
            "wall_seconds": time.monotonic() - t0}


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def sweep(run_id: str) -> list[int]:
    """Kill every process that carries this run's id in its environment (workers that escaped a stop)."""
    import psutil

    me = os.getpid()
    killed = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(RUN_ID_ENV) == run_id:
                proc.kill()
                killed.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return killed
