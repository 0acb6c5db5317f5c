"""The fault suite's worker app (tests/test_fault_suite.py): its config comes from the environment,
and its one task notes every run in a file of the running process's own, apart from the result
store, so the suite counts runs (and duplicates, and who ran them) whatever the store says."""

from __future__ import annotations

import os
import time

from machinery import Config, Server

server = Server(Config.from_env())


@server.task
def touch(i: int) -> int:
    """Note the run (task number, wall clock in ns, pid) before the work: a run cut short by a
    SIGKILL counts too. One O_APPEND write per run, so a line is never torn by the kill."""
    runs = os.environ["MACHINERY_FAULT_RUNS"]
    fd = os.open(os.path.join(runs, f"{os.getpid()}.runs"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{i} {time.time_ns()} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    time.sleep(float(os.environ.get("MACHINERY_FAULT_TASK_SECONDS", "0.002")))
    return i
