"""Server.register_periodic_*: every workflow kind fires on schedule with fresh UUIDs."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from machinery import Chain, Chord, Group, Signature
from machinery.errors import ConfigError
from machinery.testing import memory_server, running_worker


def test_each_kind_fires_on_schedule() -> None:
    server = memory_server()
    lock = threading.Lock()
    seen: dict[str, list[Any]] = {"task": [], "group": [], "chain": [], "chord": []}

    def recorder(kind: str) -> Any:
        def record(*args: Any) -> None:
            with lock:
                seen[kind].append(args)
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
    server.start_scheduler()
    with running_worker(server):
        deadline = time.monotonic() + 10
        while (time.monotonic() < deadline and any(len(v) < 4 for k, v in seen.items() if k != "group")) \
                or len(seen["group"]) < 4:
            time.sleep(0.05)
    server.close()
    assert len(seen["task"]) >= 2 and all(a == ("t",) for a in seen["task"])
    assert set(seen["group"]) == {("a",), ("b",)}
    assert all(a == (2,) for a in seen["chain"])
    assert all(a == (2, 3) for a in seen["chord"])


def test_fresh_uuids_each_tick() -> None:
    server = memory_server()
    sent: list[str] = []
    server.register_task("tick", lambda: None)
    original = Signature("tick", uuid="task_fixed", on_success=[Signature("tick", uuid="task_child")])
    server.register_periodic_task("@every 1s", "p", original)
    server.start_scheduler()
    broker = server.get_broker()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(sent) < 2:
        sent = [s.uuid for s in broker.get_pending_tasks()]
        time.sleep(0.05)
    pending = broker.get_pending_tasks()
    server.close()
    assert len(pending) >= 2
    assert len({s.uuid for s in pending}) == len(pending)
    assert "task_fixed" not in {s.uuid for s in pending}
    children = [s.on_success[0].uuid for s in pending if s.on_success]
    assert len(set(children)) == len(children) and "task_child" not in children


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
    server = memory_server()
    server.register_periodic_task("@every 1s", "early", Signature("tick", ["early"]))
    broker = server.get_broker()
    try:
        time.sleep(2.2)  # two ticks pass
        assert broker.get_pending_tasks() == []
        assert server.periodic_tasks == ["early"]
        server.start_scheduler()
        server.start_scheduler()  # idempotent
        server.register_periodic_task("@every 1s", "late", Signature("tick", ["late"]))
        deadline = time.monotonic() + 5
        names: set[str] = set()
        while time.monotonic() < deadline and names != {"early", "late"}:
            names = {str(s.args[0].value) for s in broker.get_pending_tasks()}
            time.sleep(0.05)
        assert names == {"early", "late"}
        server.stop_scheduler()
        time.sleep(0.1)
        count = len(broker.get_pending_tasks())
        time.sleep(1.5)
        assert len(broker.get_pending_tasks()) == count
    finally:
        server.close()
