"""A test app whose config comes from the environment (BROKER, RESULT_BACKEND, ...)."""

from __future__ import annotations

import os
import time

from machinery import Config, Server, TaskContext

server = Server(Config.from_env())


@server.task
def add(*args: int) -> int:
    return sum(args)


@server.task
def sleepy(seconds: float, tag: int) -> int:
    """Records each start in a file (one line per run) so tests can count executions."""
    log = os.environ.get("MACHINERY_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{tag} {os.getpid()}\n")
    time.sleep(seconds)
    return tag


@server.task
def pid() -> int:
    return os.getpid()


@server.task
def chord_done(ctx: TaskContext, *results: int) -> int:
    """A chord callback that logs its own UUID, so tests can count how often each chord fired."""
    log = os.environ.get("MACHINERY_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{ctx.signature.uuid} {sum(results)}\n")
    return sum(results)
