"""The supervisor of `machinery worker --processes N`, once its workers are forked.

The process that imports the app and forks the workers then replaces itself (exec) with this
file run as a script, standard library basics only: passing stop signals on and restarting a
worker that dies needs none of the 25 MB that the loaded app, asyncio and the drivers hold, which
a forked supervisor would keep for its whole life. A restarted worker is a fresh `machinery
worker --processes 1` process that imports the app itself.

Script use (from cli.supervise): `python -S -P supervisor.py LEVEL NAME INDEX:PID... -- ARGV...`,
with SIGINT and SIGTERM blocked across the exec (one that arrives meanwhile waits, pending, for
the handlers below). Only the standard library may be imported here.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

#: seconds between a worker's death and its restart (a worker that dies at once must not spin)
RESTART_DELAY = 1.0
#: the exit status of a worker that retired to be replaced (EX_TEMPFAIL): started again at once
RECYCLE_EXIT = 75
_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


def log_line(level: str, severity: str, message: str) -> None:
    """One line in the worker's log format (logging itself would double this process's size),
    if `severity` passes the log `level`."""
    if _LEVELS.get(level.upper(), 20) > _LEVELS[severity]:
        return
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    print(f"{stamp},{int(now % 1 * 1000):03d} {severity} machinery: {message}", file=sys.stderr, flush=True)


def log_error(level: str, message: str) -> None:
    log_line(level, "ERROR", message)


def watch(children: dict[int, int], spawn: Callable[[int], int], error: Callable[[str], None],
          info: Callable[[str], None] | None = None) -> int:
    """Wait on the workers (pid -> index), restart any that exits unasked (at once when it
    retired, with RECYCLE_EXIT; else after RESTART_DELAY), and turn each SIGINT or SIGTERM into
    one SIGTERM per worker (a second one stops them at once). Returns when all have exited after
    a stop signal."""
    signals = 0

    def forward(_signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    stops = {signal.SIGINT, signal.SIGTERM}
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if index is not None and not signals:
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == RECYCLE_EXIT:
                if info is not None:
                    info(f"worker process {index} (pid {pid}) retired; starting a fresh one")
            else:
                error(f"worker process {index} (pid {pid}) exited with status {status}; restarting it")
                time.sleep(RESTART_DELAY)
            # Stop signals wait, blocked, until the new worker is in `children`, and it starts
            # with them blocked (machinery.cli.main unblocks them): between fork and exec it still
            # has this process's handler, which would swallow a forwarded SIGTERM, and the stop
            # would wait for that worker forever.
            signal.pthread_sigmask(signal.SIG_BLOCK, stops)
            try:
                if not signals:
                    children[spawn(index)] = index
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    return 0


def _spawner(argv: list[str], name: str) -> Callable[[int], int]:
    """Start worker `index` as a fresh process in its own process group (as the forked ones are:
    Ctrl-C reaches the supervisor only)."""

    def spawn(index: int) -> int:
        command = [sys.executable, "-m", "machinery", *argv, "--processes", "1", "--name", f"{name}-{index}"]
        pid = os.fork()
        if pid == 0:
            try:
                os.setpgid(0, 0)
                os.execv(sys.executable, command)
            finally:
                os._exit(127)
        return pid

    return spawn


def main(args: list[str]) -> int:
    level, name, rest = args[0], args[1], args[2:]
    split = rest.index("--")
    children = {int(pid): int(index) for index, pid in (a.split(":") for a in rest[:split])}
    return watch(children, _spawner(rest[split + 1:], name), lambda message: log_error(level, message),
                 lambda message: log_line(level, "INFO", message))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
