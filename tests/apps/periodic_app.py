"""A test app that registers a periodic task at import, for `machinery scheduler --app` and
`machinery worker --scheduler`; importing it must send nothing."""

from __future__ import annotations

import os

from machinery import Config, Server, Signature

server = Server(Config.from_env())


@server.task
def add(*args: int) -> int:
    """Appends one line per run to MACHINERY_TEST_LOG when set, so tests can count the ticks run."""
    log = os.environ.get("MACHINERY_TEST_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{sum(args)}\n")
    return sum(args)


server.register_periodic_task("@every 1s", "cli-heartbeat", Signature("add", [1, 2]))
