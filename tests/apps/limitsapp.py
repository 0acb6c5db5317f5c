"""A test app for time limits and worker recycling, its config from the environment; each run
records "<tag> <pid>" in $MACHINERY_TEST_LOG, so tests can count runs and the processes that
ran them."""

from __future__ import annotations

import os
import time

from machinery import Config, Server

server = Server(Config.from_env())
#: memory a `hog` task keeps for the life of its process
_kept: list[bytearray] = []


def _record(tag: str) -> None:
    log = os.environ.get("MACHINERY_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{tag} {os.getpid()}\n")


@server.task(time_limit=1)
def stuck(tag: str) -> None:
    """Blocks in C for an hour: the injected TimeLimitExceeded cannot reach it."""
    _record(tag)
    time.sleep(3600)


@server.task
def work(seconds: float, tag: str) -> str:
    _record(tag)
    time.sleep(seconds)
    return tag


@server.task
def hog(megabytes: int, tag: str) -> str:
    """Keeps `megabytes` of touched memory until its process ends."""
    _record(tag)
    _kept.append(bytearray(os.urandom(1024)) * (megabytes * 1024))
    return tag


@server.task
def pid() -> int:
    return os.getpid()
