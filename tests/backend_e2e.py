"""The end-to-end check every result backend gets: a real worker runs a task and a chord on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from machinery import Chord, Config, Group, Server, Signature
from machinery.testing import running_worker


def add_arithmetic(server: Server) -> None:
    """Register the `add` and `multiply` tasks the end-to-end checks send."""

    @server.task
    def add(*args: int) -> int:
        return sum(args)

    @server.task
    def multiply(*args: int) -> int:
        out = 1
        for a in args:
            out *= a
        return out


@contextmanager
def worker_server(cnf: Config, name: str, concurrency: int = 4) -> Iterator[Server]:
    """A Server with `add` and `multiply`, and a worker running them until the block ends."""
    server = Server(cnf)
    add_arithmetic(server)
    try:
        with running_worker(server, concurrency, name=name):
            yield server
    finally:
        server.close()


def check_task_and_chord(server: Server) -> None:
    res = server.send_task(Signature("add", [1, 2]))
    assert res.get(timeout=30) == 3
    state = res.get_state()
    assert state is not None and state.task_name == "add" and state.created_at is not None
    group = Group(Signature("add", [1, 1]), Signature("add", [2, 2]), Signature("add", [5, 6]))
    assert server.send_chord(Chord(group, Signature("multiply")), 0).get(timeout=30) == 88
