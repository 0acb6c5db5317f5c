"""A test app for `machinery send`: tasks with named, defaulted and keyword-only parameters."""

from __future__ import annotations

from machinery import Config, Server, TaskContext

server = Server(Config.from_env())


@server.task
def greet(ctx: TaskContext, name: str, greeting: str = "hello", times: int = 1) -> str:
    return " ".join([f"{greeting} {name}"] * times)


@server.task(retry_count=2)
def flagged(value: int, *, loud: bool = False) -> int:
    return value


@server.task
def add(*args: int) -> int:
    return sum(args)
