"""A test app on the embedded default, `Config()`: its store is ./machinery.sqlite3 of the current directory."""

from __future__ import annotations

from machinery import Config, Server

server = Server(Config())


@server.task
def add(*args: int) -> int:
    return sum(args)
