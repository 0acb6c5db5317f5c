"""Server.register_periodic_*: every workflow kind fires on schedule with fresh UUIDs."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from machinery import Chain, Chord, Group, Server, Signature
from machinery.errors import ConfigError
from machinery.periodic import PeriodicScheduler
from machinery.testing import memory_server, running_worker
from manual_clock import ClockedLock, ManualClock


def clocked_server(clock: ManualClock) -> Server:
    """An in-memory server whose periodic scheduler runs on `clock` (set before the first registration)."""
    server = memory_server()
    server._scheduler = PeriodicScheduler(ClockedLock(clock), clock=clock)
    return server


def test_each_kind_fires_on_schedule() -> None:
    clock = ManualClock()
    server = clocked_server(clock)
    ran = threading.Condition()
    seen: dict[str, list[Any]] = {"task": [], "group": [], "chain": [], "chord": []}

    def recorder(kind: str) -> Any:
        def record(*args: Any) -> None:
            with ran:
                seen[kind].append(args)
                ran.notify_all()
        return record

    for kind in seen:
        server.register_task(f"rec_{kind}", recorder(kind))
    server.register_task("add", lambda *a: sum(a))

    server.register_periodic_task("@every 1s", "p-task", Signature("rec_task", ["t"]))
    server.register_periodic_group("@every 1s", "p-group",
                                   Group(Signature("rec_group", ["a"]), Signature("rec_group", ["b"])))
    server.register_periodic_chain("@every 1s", "p-chain", Chain(Signature("add", [1, 1]), Signature("rec_chain")))
    server.register_periodic_chord("@every 1s", "p-chord",
                                   Chord(Group(Signature("add", [2]), Signature("add", [3])), Signature("rec_chord")))
    expected = {"task": 3, "group": 6, "chain": 3, "chord": 3}  # three ticks; a group sends two tasks
    server.start_scheduler()
    try:
        clock.advance(3, sleeping=4)  # each schedule's fire has sent its workflow when this returns
        with running_worker(server), ran:
            assert ran.wait_for(lambda: {k: len(v) for k, v in seen.items()} == expected, timeout=30), seen
    finally:
        server.close()
    assert {k: len(v) for k, v in seen.items()} == expected
    assert all(a == ("t",) for a in seen["task"])
    assert sorted(seen["group"]) == [("a",)] * 3 + [("b",)] * 3
    assert all(a == (2,) for a in seen["chain"])
    assert all(a == (2, 3) for a in seen["chord"])


def test_fresh_uuids_each_tick() -> None:
    clock = ManualClock()
    server = clocked_server(clock)
    server.register_task("tick", lambda: None)
    original = Signature("tick", uuid="task_fixed", on_success=[Signature("tick", uuid="task_child")])
    server.register_periodic_task("@every 1s", "p", original)
    server.start_scheduler()
    try:
        clock.advance(3, sleeping=1)
        pending = server.get_broker().get_pending_tasks()
    finally:
        server.close()
    assert len(pending) == 3
    assert len({s.uuid for s in pending}) == len(pending)
    assert "task_fixed" not in {s.uuid for s in pending}
    children = [s.on_success[0].uuid for s in pending if s.on_success]
    assert len(children) == 3 and len(set(children)) == 3 and "task_child" not in children


def test_bad_spec_rejected_at_registration() -> None:
    server = memory_server()
    with pytest.raises(ConfigError, match="out of range"):
        server.register_periodic_task("61 * * * *", "bad", Signature("x"))
    with pytest.raises(ConfigError):
        server.register_periodic_group("not a spec", "bad", Group(Signature("x")))
    server.close()


def test_registering_alone_sends_nothing_until_the_scheduler_starts() -> None:
    """A process that only registers (a script importing the app) sends no ticks; one that asks
    for the scheduler does, schedules registered after the start included."""
    clock = ManualClock()
    server = clocked_server(clock)
    server.register_periodic_task("@every 1s", "early", Signature("tick", ["early"]))
    broker = server.get_broker()
    try:
        clock.jump(2)  # two ticks pass with nobody running the schedules
        assert clock.sleeping() == 0 and broker.get_pending_tasks() == []
        assert server.periodic_tasks == ["early"]
        server.start_scheduler()
        server.start_scheduler()  # idempotent
        server.register_periodic_task("@every 1s", "late", Signature("tick", ["late"]))
        clock.advance(1, sleeping=2)  # one tick of each
        assert sorted(str(s.args[0].value) for s in broker.get_pending_tasks()) == ["early", "late"]
        server.stop_scheduler()
        clock.jump(3)
        assert len(broker.get_pending_tasks()) == 2
    finally:
        server.close()
