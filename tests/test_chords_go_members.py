"""Chords whose members also run on Go workers (Config.go_chord_members). A Go worker stores a
member's state and counts nothing, so with the option the Python member that finishes last reads
every member's state and fires the chord (or fails it, for a member that failed on Go); without it,
such a chord waits for a Go worker to finish last. Go's side is played here by storing states."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machinery import AsyncResult, Chord, Config, Group, Server, Signature
from machinery.tasks.state import FAILURE, SUCCESS, TaskResult, TaskState
from machinery.testing import running_worker
from redis_servers import redis_url

GO_QUEUE = "go_workers"  # no Python worker reads it: its members are "run by Go" below


@pytest.fixture(params=["memory", "sqlite", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "redis":
        import redis

        redis_db = redis_url()
        client = redis.Redis.from_url(redis_db)
        client.flushdb()  # this run's own server: no other run has keys there
        client.close()
        yield redis_db
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'chords.sqlite3'}"
    else:
        yield "memory://"


def make_server(url: str, go_members: bool) -> Server:
    server = Server(Config(broker=url, result_backend=url, go_chord_members=go_members))

    @server.task
    async def add(x: int, y: int) -> int:
        return x + y

    @server.task
    async def collect(*values: int) -> int:
        return sum(values)

    return server


def send_mixed_chord(server: Server, go_states: list[tuple[str, int | str]]) -> tuple[Chord, list[Signature]]:
    """A chord of len(go_states) + 1 members: the Go ones stored as a Go worker would (SUCCESS with
    a value, or FAILURE with an error), uncounted; the last one left for the Python worker."""
    go = [Signature("add", args=[i, i], routing_key=GO_QUEUE) for i in range(len(go_states))]
    chord = Chord(Group(*go, Signature("add", args=[10, 10])), Signature("collect"))
    server.send_chord(chord)
    states = []
    for sig, (kind, value) in zip(go, go_states, strict=True):
        if kind == SUCCESS:
            states.append(TaskState(sig.uuid, SUCCESS, task_name="add", results=[TaskResult("int64", value)]))
        else:
            states.append(TaskState(sig.uuid, FAILURE, task_name="add", error=str(value)))
    server.portal.run(server.get_backend().set_states(states))
    return chord, go


def test_the_python_member_that_finishes_last_fires_the_chord(url: str) -> None:
    server = make_server(url, go_members=True)
    try:
        chord, _ = send_mixed_chord(server, [(SUCCESS, 2), (SUCCESS, 4)])
        with running_worker(server):
            assert AsyncResult(chord.callback, server.get_backend(), server.portal).get(timeout=15) == 26
    finally:
        server.close()


def test_a_member_failed_on_go_fails_the_chord(url: str) -> None:
    server = make_server(url, go_members=True)
    try:
        chord, go = send_mixed_chord(server, [(SUCCESS, 2), (FAILURE, "go says no")])
        with running_worker(server):
            deadline = time.monotonic() + 15
            state = None
            while time.monotonic() < deadline:
                state = server.portal.run(server.get_backend().get_state(chord.callback.uuid))
                if state is not None:
                    break
                time.sleep(0.05)
        assert state is not None and state.state == FAILURE
        assert state.error is not None and go[1].uuid in state.error and "go says no" in state.error
    finally:
        server.close()


def test_without_the_option_the_count_alone_decides(url: str) -> None:
    """The default: Go-run members are not counted, so the Python member does not fire it."""
    server = make_server(url, go_members=False)
    try:
        chord, _ = send_mixed_chord(server, [(SUCCESS, 2), (SUCCESS, 4)])
        python_member = chord.group.signatures[-1]
        backend = server.get_backend()
        with running_worker(server):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                st = server.portal.run(backend.get_state(python_member.uuid))
                if st is not None and st.state == SUCCESS:
                    break
                time.sleep(0.05)
            time.sleep(0.5)  # time enough to have sent the callback, had it been going to
        assert server.portal.run(backend.get_state(chord.callback.uuid)) is None
    finally:
        server.close()
