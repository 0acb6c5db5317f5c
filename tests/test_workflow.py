"""Group, Chord and Chain: the wire fields they fill, nesting, and fresh copies."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from goldens import golden
from machinery.errors import MachineryError
from machinery.tasks.signature import Signature, decode_signature, encode_signature
from machinery.tasks.workflow import Chain, Chord, Group

UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def sig(name: str, *args: Any) -> Signature:
    return Signature(name, args=list(args))


def all_uuids(s: Signature) -> list[str]:
    out = [s.uuid]
    for nested in (s.on_success or []) + (s.on_error or []):
        out += all_uuids(nested)
    if s.chord_callback is not None:
        out += all_uuids(s.chord_callback)
    return out


def strip_uuids(obj: Any) -> Any:
    """The wire shape with every UUID replaced by its prefix."""
    if isinstance(obj, dict):
        return {k: (re.sub(r"_.*", "_", v) if k in ("UUID", "GroupUUID") and v else strip_uuids(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [strip_uuids(v) for v in obj]
    return obj


# --- Group ----------------------------------------------------------------------------------------


def test_group_fills_uuids_and_counts() -> None:
    members = [sig("add", 1, 1), sig("add", 2, 2), sig("add", 3, 3)]
    group = Group(*members)
    assert re.fullmatch(f"group_{UUID4}", group.group_uuid)
    assert group.signatures == members
    for m in members:
        assert re.fullmatch(f"task_{UUID4}", m.uuid)
        assert m.group_uuid == group.group_uuid
        assert m.group_task_count == 3
        assert m.chord_callback is None
    assert len(set(group.task_uuids())) == 3
    assert group.task_uuids() == [m.uuid for m in members]


def test_group_keeps_existing_uuids_and_takes_a_list() -> None:
    a = Signature("a", uuid="task_mine")
    b = sig("b")
    group = Group([a, b])
    assert a.uuid == "task_mine"
    assert b.uuid.startswith("task_")
    assert group.task_uuids() == ["task_mine", b.uuid]
    assert Group(sig("c"), group_uuid="group_fixed").group_uuid == "group_fixed"


def test_group_member_wire_fields() -> None:
    member = sig("add", 1)
    group = Group(member, sig("add", 2))
    obj = json.loads(encode_signature(member))
    assert obj["GroupUUID"] == group.group_uuid and obj["GroupTaskCount"] == 2


def test_group_errors() -> None:
    with pytest.raises(MachineryError, match="at least one"):
        Group()
    with pytest.raises(MachineryError, match="at least one"):
        Group([])
    with pytest.raises(MachineryError, match="must be Signatures"):
        Group(sig("a"), "b")  # type: ignore[arg-type]
    for bad in ("ab", 5, Group(sig("x"))):
        with pytest.raises(MachineryError, match="must be Signatures"):
            Group(bad)  # type: ignore[arg-type]


# --- Chord ----------------------------------------------------------------------------------------


def test_chord_sets_callback_uuid_and_embeds_it() -> None:
    members = [sig("add", 1, 1), sig("add", 2, 2)]
    callback = sig("multiply")
    chord = Chord(Group(*members), callback)
    assert chord.callback is callback
    assert re.fullmatch(f"chord_{UUID4}", callback.uuid)
    for m in members:
        assert m.chord_callback is callback
        wire = json.loads(encode_signature(m))
        assert wire["ChordCallback"]["UUID"] == callback.uuid
        assert wire["ChordCallback"]["Name"] == "multiply"
        assert wire["GroupUUID"] == chord.group.group_uuid and wire["GroupTaskCount"] == 2


def test_chord_member_wire_shape_matches_go() -> None:
    member = Signature("add", args=[1, 1], routing_key="machinery_tasks", headers={})
    other = Signature("add", args=[2, 2])
    Chord(Group(member, other), Signature("multiply"))
    expected = json.loads(golden("signature_chord_member.json"))
    assert strip_uuids(json.loads(encode_signature(member))) == strip_uuids(expected)


def test_chord_from_a_list_and_existing_callback_uuid() -> None:
    callback = Signature("cb", uuid="chord_mine")
    chord = Chord([sig("a"), sig("b")], callback)
    assert isinstance(chord.group, Group) and len(chord.group.signatures) == 2
    assert callback.uuid == "chord_mine"


def test_chord_callback_must_be_a_signature() -> None:
    with pytest.raises(MachineryError, match="callback must be a Signature"):
        Chord(Group(sig("a")), "cb")  # type: ignore[arg-type]


# --- Chain ----------------------------------------------------------------------------------------


def test_chain_nests_on_success() -> None:
    a, b, c = sig("add", 1, 1), sig("add", 5, 5), sig("multiply", 4)
    chain = Chain(a, b, c)
    assert chain.steps == [a, b, c]
    assert chain.signatures == [a, b, c]
    assert chain.first() is a
    assert a.on_success == [b] and b.on_success == [c] and c.on_success is None
    for s in (a, b, c):
        assert re.fullmatch(f"task_{UUID4}", s.uuid)
        assert s.group_uuid == ""


def test_chain_wire_shape_matches_go_golden() -> None:
    a = Signature("add", args=[1, 1], routing_key="machinery_tasks", headers={})
    chain = Chain(a, sig("add", 5, 5), sig("multiply", 4))
    expected = json.loads(golden("signature_chain.json"))
    wire = json.loads(encode_signature(chain.first()))  # type: ignore[arg-type]
    assert strip_uuids(wire) == strip_uuids(expected)
    assert len(set(all_uuids(a))) == 3


def test_chain_takes_a_list_like_gos_variadic() -> None:
    a, b = sig("a"), sig("b")
    chain = Chain([a, b])
    assert chain.steps == [a, b] and a.on_success == [b]


def test_chain_with_a_chord_step() -> None:
    a, b, c, d, e = sig("a"), sig("b"), sig("c"), sig("d"), sig("e")
    chord = Chord(Group(b, c), d)
    chain = Chain(a, chord, e)
    assert chain.steps == [a, chord, e]
    assert a.on_success == [b, c]
    assert b.chord_callback is d and c.chord_callback is d
    assert d.on_success == [e]
    assert d.uuid.startswith("chord_")
    assert b.group_uuid == c.group_uuid and b.group_task_count == 2
    # on the wire: a's message carries the whole rest of the workflow
    wire = json.loads(encode_signature(a))
    assert [s["Name"] for s in wire["OnSuccess"]] == ["b", "c"]
    for member in wire["OnSuccess"]:
        assert member["ChordCallback"]["Name"] == "d"
        assert [s["Name"] for s in member["ChordCallback"]["OnSuccess"]] == ["e"]


def test_bare_group_followed_by_a_signature_becomes_a_chord() -> None:
    a, b, c, d, e = sig("a"), sig("b"), sig("c"), sig("d"), sig("e")
    group = Group(b, c)
    chain = Chain(a, group, d, e)
    assert len(chain.steps) == 3
    chord = chain.steps[1]
    assert isinstance(chord, Chord)
    assert chord.group is group and chord.callback is d
    assert d.uuid.startswith("chord_")
    assert a.on_success == [b, c]
    assert b.chord_callback is d and c.chord_callback is d
    assert d.on_success == [e]


def test_chain_starting_with_a_group() -> None:
    b, c, d = sig("b"), sig("c"), sig("d")
    chain = Chain(Group(b, c), d)
    first = chain.first()
    assert isinstance(first, Chord) and first.callback is d
    assert chain.signatures == []


def test_group_as_the_last_step() -> None:
    a, b, c = sig("a"), sig("b"), sig("c")
    group = Group(b, c)
    chain = Chain(a, group)
    assert chain.steps == [a, group]
    assert a.on_success == [b, c]
    assert b.chord_callback is None


def test_group_not_last_and_not_followed_by_a_signature_raises() -> None:
    with pytest.raises(MachineryError, match="group without a callback"):
        Chain(sig("a"), Group(sig("b"), sig("c")), Group(sig("d"), sig("e")))
    with pytest.raises(MachineryError, match="group without a callback"):
        Chain(Group(sig("b"), sig("c")), Chord(Group(sig("d")), sig("e")))


def test_chain_of_chords() -> None:
    b, c, d = sig("b"), sig("c"), sig("d")
    f, g = sig("f"), sig("g")
    chain = Chain(Chord(Group(b, c), d), Chord(Group(f), g))
    assert [type(s) for s in chain.steps] == [Chord, Chord]
    assert d.on_success == [f]
    assert f.chord_callback is g


def test_chain_keeps_a_steps_own_on_success() -> None:
    notify = sig("notify")
    a = Signature("a", on_success=[notify])
    b = sig("b")
    Chain(a, b)
    assert a.on_success == [notify, b]
    assert notify.on_success is None  # b gets a's result, not notify's


def test_empty_chain_raises() -> None:
    with pytest.raises(MachineryError, match="at least one step"):
        Chain()


def test_single_step_chain() -> None:
    a = sig("a")
    chain = Chain(a)
    assert chain.steps == [a] and a.on_success is None and a.uuid.startswith("task_")


# --- copies -----------------------------------------------------------------------------------


def test_group_copy_gives_fresh_uuids() -> None:
    members = [sig("a", 1), Signature("b", on_success=[sig("x")])]
    group = Group(*members)
    dup = group.copy()
    assert dup.group_uuid != group.group_uuid and dup.group_uuid.startswith("group_")
    old = {u for m in group.signatures for u in all_uuids(m)}
    new = [u for m in dup.signatures for u in all_uuids(m)]
    assert len(new) == len(set(new)) == 3
    assert not old & set(new)
    for m in dup.signatures:
        assert m.group_uuid == dup.group_uuid and m.group_task_count == 2
        assert m.uuid.startswith("task_")
    assert [m.name for m in dup.signatures] == ["a", "b"]
    assert dup.signatures[0].python_args() == [1]
    # the original is untouched
    assert all(m.group_uuid == group.group_uuid for m in group.signatures)


def test_chord_copy_gives_fresh_uuids() -> None:
    chord = Chord(Group(sig("a"), sig("b")), Signature("cb", on_error=[sig("err")]))
    dup = chord.copy()
    assert dup.callback is not chord.callback
    assert dup.callback.uuid.startswith("chord_") and dup.callback.uuid != chord.callback.uuid
    assert dup.callback.on_error is not None and chord.callback.on_error is not None
    assert dup.callback.on_error[0].uuid != chord.callback.on_error[0].uuid
    assert dup.group.group_uuid != chord.group.group_uuid
    for m, old in zip(dup.group.signatures, chord.group.signatures, strict=True):
        assert m.uuid != old.uuid
        assert m.chord_callback is dup.callback
        assert old.chord_callback is chord.callback


def test_chain_copy_gives_fresh_uuids_everywhere() -> None:
    a, b, c, d, e = sig("a", 1), sig("b"), sig("c"), sig("d"), sig("e")
    chain = Chain(a, Chord(Group(b, c), d), e)
    before = encode_signature(a)
    dup = chain.copy()
    first = dup.first()
    assert isinstance(first, Signature) and first is not a
    old = set(all_uuids(a))
    new = all_uuids(first)
    assert len(old) == 5  # a, b, c, d (embedded in both b and c) and e
    assert not old & set(new)
    # same shape as the original
    assert strip_uuids(json.loads(encode_signature(first))) == strip_uuids(json.loads(before))
    assert encode_signature(a) == before
    chord = dup.steps[1]
    assert isinstance(chord, Chord)
    assert chord.group.group_uuid != b.group_uuid
    assert first.on_success == chord.group.signatures
    assert chord.callback.on_success == [dup.steps[2]]
    # and a copy of the copy is fresh again
    again = dup.copy().first()
    assert isinstance(again, Signature)
    assert not set(all_uuids(again)) & set(new)


def test_chain_copy_before_and_after_send_shape() -> None:
    """copy() starts from the steps as given, so copying a linked chain does not double the links."""
    chain = Chain(sig("a"), sig("b"), sig("c"))
    dup = chain.copy().copy()
    first = dup.first()
    assert isinstance(first, Signature)
    assert first.on_success is not None and len(first.on_success) == 1
    assert first.on_success[0].on_success is not None and len(first.on_success[0].on_success) == 1
    assert first.on_success[0].on_success[0].on_success is None


def test_copies_decode_as_go_would_send_them() -> None:
    chain = Chain(sig("a", 1), Group(sig("b"), sig("c")), sig("d"))
    first = chain.copy().first()
    assert isinstance(first, Signature)
    data = encode_signature(first)
    assert encode_signature(decode_signature(data)) == data


# --- waiting on a chain ----------------------------------------------------------------------


def _chain_results(n: int) -> tuple[Any, list[Any], Any]:
    from machinery import Config, Server

    server = Server(Config(broker="memory://", result_backend="memory://"))
    result = server.send_chain(Chain(*(Signature("add", [i, 1]) for i in range(n))))
    return server, result.async_results, result


def test_a_chain_waits_on_its_last_step_and_reports_an_earlier_failure_promptly() -> None:
    import time

    from machinery.errors import TaskError
    from machinery.tasks.state import FAILURE, TaskState

    server, steps, result = _chain_results(5)
    try:
        backend = server.get_backend()
        server.portal.run(backend.set_state(TaskState(steps[2].task_uuid, FAILURE, error="link 2 broke")))
        started = time.monotonic()
        with pytest.raises(TaskError, match="link 2 broke"):
            result.get(timeout=60)  # the last step never runs: the failure is found between waits
        assert time.monotonic() - started < 20  # found by a re-check, long before the timeout
    finally:
        server.close()


def test_a_chain_wait_times_out_naming_the_chain() -> None:
    import time

    from machinery.errors import TimeoutError

    server, _, result = _chain_results(3)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="chain's last step"):
            result.get(timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 5.0  # not before its timeout, and not stuck after it
    finally:
        server.close()


# --- routing of nested links: the sending worker's default queue, as in Go ------------------------


def test_unrouted_chain_links_and_callbacks_go_to_the_default_queue_of_the_worker_that_sends_them(
        tmp_path: Path) -> None:
    from machinery import Config, Server

    url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    producer = Server(Config(broker=url, result_backend=url, default_queue="producer_q"))
    worker_side = Server(Config(broker=url, result_backend=url, default_queue="worker_q"))
    worker_side.register_task("add", lambda *xs: sum(xs))
    try:
        chain = producer.send_chain(Chain(sig("add", 1, 2), sig("add", 10)))
        chord = producer.send_chord(Chord(Group(sig("add", 1, 1), sig("add", 2, 2)), sig("add", 100)))
        worker = worker_side.new_worker("w", concurrency=2, queue="producer_q")
        worker.launch_async()
        try:
            assert [r.get(timeout=30) for r in chord.group_async_results] == [2, 4]
            assert chain.async_results[0].get(timeout=30) == 3
            broker = worker_side.get_broker()
            deadline = time.monotonic() + 30
            while len(broker.get_pending_tasks("worker_q")) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            waiting = sorted(broker.get_pending_tasks("worker_q"), key=lambda s: len(s.args))
        finally:
            worker.quit()
    finally:
        producer.close()
        worker_side.close()
    # the chain's next link and the chord callback, sent by the worker, wait in the worker's queue
    assert [(s.routing_key, [a.value for a in s.args]) for s in waiting] == [
        ("worker_q", [10, 3]), ("worker_q", [100, 2, 4])]
