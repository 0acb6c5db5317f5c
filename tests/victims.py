"""Kill -9 a worker process in the middle of its tasks, then let a fresh worker finish them all:
the check that a broker loses no task when a worker dies (each broker's tests start the victim)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from machinery import AsyncResult, Server
from scenarios import TIMEOUT

HERE = Path(__file__).parent


def kill_victim_then_rescue(server: Server, results: Sequence[AsyncResult], victim_argv: Sequence[str],
                            started: int = 4, rescuer_concurrency: int = 4) -> None:
    """Run the victim (a script printing "started N" per task it begins), SIGKILL it once `started`
    tasks run, then run a worker here until every result i (0..n-1) arrives. Closes the server."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")])}
    victim = subprocess.Popen([sys.executable, *victim_argv], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None
        lines = [victim.stdout.readline() for _ in range(started)]
        assert all(line.startswith("started") for line in lines), lines
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=TIMEOUT)
    finally:
        if victim.poll() is None:
            victim.kill()
    worker = server.new_worker("rescuer", rescuer_concurrency)
    done = worker.launch_async()
    try:
        assert sorted(r.get(TIMEOUT) for r in results) == list(range(len(results)))
    finally:
        worker.quit()
        done.result(timeout=TIMEOUT)
        server.close()
