"""A test app for `--app`: a Server made by a factory, a task function, and things that are not Servers."""

from __future__ import annotations

from machinery import Config, Server

server = Server(Config.from_env())
calls: list[str] = []


@server.task
def tick() -> int:
    calls.append("tick")
    raise AssertionError("the CLI ran a task function it was given as --app")


def make_server() -> Server:
    made = Server(Config.from_env())

    @made.task
    def add(*args: int) -> int:
        return sum(args)

    return made


def not_a_factory() -> int:
    return 42


class Holder:
    server = server


number = 7
