"""A test app that registers a periodic task at import, for `machinery scheduler --app`."""

from __future__ import annotations

from machinery import Config, Server, Signature

server = Server(Config.from_env())
server.register_periodic_task("@every 1s", "cli-heartbeat", Signature("add", [1, 2]))
