"""Go's own encoding/json output (tests/golden, copied from shared/reference/golden): decode and re-encode.

The copy in tests/golden is what the suite uses, so it runs from a bare clone; when the shared
folder sits beside the repository (../shared/reference/golden), the copy must equal it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone

import pytest

from goldens import GOLDEN, LOCAL_GOLDEN, SHARED_GOLDEN, golden, golden_names
from machinery import Config, Server
from machinery.tasks import gojson
from machinery.tasks.signature import Arg, Signature, decode_signature, encode_signature
from machinery.tasks.state import (
    FAILURE,
    PENDING,
    RECEIVED,
    SUCCESS,
    GroupMeta,
    TaskResult,
    TaskState,
    decode_group_meta,
    decode_state,
    encode_group_meta,
    encode_state,
)
from machinery.tasks.workflow import Chain, Chord, Group

GOLDEN_FILES = golden_names()
SIGNATURE_FILES = golden_names("signature_")
STATE_FILES = golden_names("state_")

CREATED = gojson.parse_time("2025-01-02T03:04:05.123456789Z")


def test_golden_copy_is_complete() -> None:
    assert LOCAL_GOLDEN.is_dir(), f"{LOCAL_GOLDEN} is missing: the suite keeps its own copy of the golden files"
    assert GOLDEN == LOCAL_GOLDEN
    expected = {
        "group_meta.json", "signature_add.json", "signature_all_types.json", "signature_chain.json",
        "signature_chord_member.json", "signature_delayed.json", "signature_eta_offset.json",
        "signature_retry_onerror.json", "state_failure.json", "state_pending.json",
        "state_received_no_pending.json", "state_success.json", "state_success_error_only.json",
        "state_success_multi.json",
    }
    assert expected <= set(GOLDEN_FILES)
    for name in GOLDEN_FILES:
        data = golden(name)
        assert not data.endswith(b"\n"), f"{name}: Go's output has no trailing newline"
        json.loads(data)


@pytest.mark.skipif(not SHARED_GOLDEN.parent.parent.is_dir(), reason="no shared/ folder beside the repository")
def test_golden_copy_equals_shared() -> None:
    if not SHARED_GOLDEN.is_dir():
        pytest.fail(f"shared/ exists beside the repository but {SHARED_GOLDEN} is missing")
    shared = {p.name: p.read_bytes() for p in SHARED_GOLDEN.iterdir() if p.is_file()}
    local = {p.name: p.read_bytes() for p in LOCAL_GOLDEN.iterdir() if p.is_file()}
    assert set(shared) == set(local), "tests/golden and shared/reference/golden hold different files"
    for name, data in shared.items():
        assert local[name] == data, f"tests/golden/{name} differs from {SHARED_GOLDEN / name}"


# --- every file decodes and re-encodes to the same bytes ---------------------------------


@pytest.mark.parametrize("name", SIGNATURE_FILES)
def test_signature_golden_round_trip(name: str) -> None:
    data = golden(name)
    sig = decode_signature(data)
    assert encode_signature(sig) == data
    assert sig.to_json() == data
    assert Signature.from_json(data.decode()) == sig
    # args convert to Python values without error
    sig.python_args()


@pytest.mark.parametrize("name", STATE_FILES)
def test_state_golden_round_trip(name: str) -> None:
    data = golden(name)
    state = decode_state(data)
    assert encode_state(state) == data
    assert state.to_json() == data
    state.values()


def test_group_meta_golden_round_trip() -> None:
    data = golden("group_meta.json")
    meta = decode_group_meta(data)
    assert encode_group_meta(meta) == data
    assert meta.group_uuid == "group_77a"
    assert meta.task_uuids == ["task_m1", "task_m2"]
    assert meta.chord_triggered is False and meta.lock is False
    assert meta.created_at == CREATED
    assert meta.ttl == 0


def test_golden_reencodes_from_a_copy() -> None:
    """copy() keeps everything the encoder writes (nested workflows included)."""
    for name in SIGNATURE_FILES:
        data = golden(name)
        assert encode_signature(decode_signature(data).copy()) == data, name


# --- decoded values ------------------------------------------------------------------------


def test_signature_add_decoded_fields() -> None:
    sig = decode_signature(golden("signature_add.json"))
    assert sig.uuid == "task_0c1f2a4e-6f5d-4a51-9a0e-3b1f6c1d2e3f"
    assert sig.name == "add"
    assert sig.routing_key == "machinery_tasks"
    assert sig.eta is None
    assert sig.headers == {}
    assert sig.args == [Arg("int64", 1), Arg("int64", 1)]
    assert sig.python_args() == [1, 1]
    assert sig.on_success is None and sig.on_error is None and sig.chord_callback is None


def test_signature_all_types_decoded_values() -> None:
    sig = decode_signature(golden("signature_all_types.json"))
    types = [a.type for a in sig.args]
    assert types == [
        "bool", "int", "int8", "int16", "int32", "int64", "uint", "uint8", "uint16", "uint32", "uint64",
        "float32", "float64", "float64", "float64", "float64", "string", "[]bool", "[]int", "[]int64",
        "[]uint", "[]uint8", "[]byte", "[]float32", "[]float64", "[]string", "[]int64",
    ]
    values = sig.python_args()
    assert values == [
        True, -42, -128, 32767, -2147483648, 9223372036854775807, 7, 255, 65535, 4294967295,
        18446744073709551615, 1.5, 100.0, 0.1, 1e21, -2.5e-7,
        'héllo "q" <b> & \u2028 \\ \t',
        [True, False], [1, -2], [1, 2, 3], [4, 5], b"\x00\x01\xfe\xff", b"hello", [0.5, 2.0], [1.0, 2.25],
        ["a", "b"], [],
    ]
    assert isinstance(values[12], float)  # float64 written as `100` is still a float
    assert all(isinstance(v, float) for v in values[23] + values[24])


def test_signature_delayed_eta() -> None:
    sig = decode_signature(golden("signature_delayed.json"))
    assert sig.eta == datetime(2025, 1, 2, 3, 4, 5, 100000, tzinfo=UTC)
    assert gojson.format_time(sig.eta) == "2025-01-02T03:04:05.1Z"
    assert sig.python_args() == [2, 3]


def test_signature_eta_offset_keeps_offset_and_nanoseconds() -> None:
    sig = decode_signature(golden("signature_eta_offset.json"))
    assert sig.eta is not None
    assert sig.eta.utcoffset() == timedelta(hours=2)
    assert sig.eta == datetime(2025, 6, 30, 21, 59, 59, 123456, tzinfo=UTC)
    assert getattr(sig.eta, "nanosecond", None) == 789
    assert gojson.format_time(sig.eta) == "2025-06-30T23:59:59.123456789+02:00"


def test_signature_chain_nesting() -> None:
    sig = decode_signature(golden("signature_chain.json"))
    assert sig.uuid == "task_c1"
    assert sig.on_success is not None and len(sig.on_success) == 1
    second = sig.on_success[0]
    assert (second.uuid, second.name, second.routing_key, second.headers) == ("task_c2", "add", "", None)
    assert second.python_args() == [5, 5]
    assert second.on_success is not None and len(second.on_success) == 1
    third = second.on_success[0]
    assert (third.uuid, third.name, third.on_success) == ("task_c3", "multiply", None)
    assert third.python_args() == [4]


def test_signature_chord_member() -> None:
    sig = decode_signature(golden("signature_chord_member.json"))
    assert (sig.group_uuid, sig.group_task_count) == ("group_77a", 2)
    assert sig.chord_callback is not None
    cb = sig.chord_callback
    assert (cb.uuid, cb.name, cb.args, cb.headers) == ("chord_9f1", "multiply", [], None)


def test_signature_retry_onerror() -> None:
    sig = decode_signature(golden("signature_retry_onerror.json"))
    assert sig.headers == {"uber-trace-id": "abc:def:0:1"}
    assert (sig.priority, sig.immutable, sig.retry_count, sig.retry_timeout) == (5, True, 2, 3)
    assert sig.on_error is not None and [s.uuid for s in sig.on_error] == ["task_e1"]
    assert sig.on_error[0].python_args() == ["boom"]


def test_state_goldens_decoded_values() -> None:
    s = decode_state(golden("state_success.json"))
    assert (s.task_uuid, s.task_name, s.state, s.error) == ("task_0c1f", "add", SUCCESS, "")
    assert s.results == [TaskResult("int64", 2)]
    assert s.values() == [2]
    assert s.created_at == CREATED and getattr(s.created_at, "nanosecond", None) == 789
    assert s.is_success() and s.is_completed() and not s.is_failure()

    multi = decode_state(golden("state_success_multi.json"))
    assert multi.values() == ["foo", "bar"]

    error_only = decode_state(golden("state_success_error_only.json"))
    assert error_only.results == [] and error_only.values() == []

    failure = decode_state(golden("state_failure.json"))
    assert (failure.state, failure.error, failure.results) == (FAILURE, "oops", None)
    assert failure.is_failure() and failure.is_completed()

    pending = decode_state(golden("state_pending.json"))
    assert pending.state == PENDING and pending.results is None and not pending.is_completed()

    received = decode_state(golden("state_received_no_pending.json"))
    assert received.state == RECEIVED and received.task_name == "" and received.created_at is None


# --- built in Python -> Go's exact bytes ---------------------------------------------------


def test_fresh_add_signature_matches_go() -> None:
    sig = Signature(
        "add", args=[1, 1], uuid="task_0c1f2a4e-6f5d-4a51-9a0e-3b1f6c1d2e3f",
        routing_key="machinery_tasks", headers={},
    )
    assert encode_signature(sig) == golden("signature_add.json")


def test_fresh_delayed_signature_matches_go() -> None:
    sig = Signature(
        "add", args=[2, 3], uuid="task_5d8e0c55-2b0e-4f35-a1b2-8f8c0f6b2a11", routing_key="machinery_tasks",
        headers={}, eta=datetime(2025, 1, 2, 3, 4, 5, 100000, tzinfo=UTC),
    )
    assert encode_signature(sig) == golden("signature_delayed.json")


def test_fresh_eta_offset_signature_matches_go() -> None:
    eta = gojson.Timestamp.with_nanos(
        datetime(2025, 6, 30, 23, 59, 59, 123456, tzinfo=timezone(timedelta(hours=2))), 789
    )
    sig = Signature("add", args=[1], uuid="task_eta-offset", routing_key="machinery_tasks", headers={}, eta=eta)
    assert encode_signature(sig) == golden("signature_eta_offset.json")


def test_fresh_all_types_signature_matches_go() -> None:
    args = [
        Arg("bool", True), Arg("int", -42), Arg("int8", -128), Arg("int16", 32767),
        Arg("int32", -2147483648), Arg("int64", 9223372036854775807), Arg("uint", 7), Arg("uint8", 255),
        Arg("uint16", 65535), Arg("uint32", 4294967295), Arg("uint64", 18446744073709551615),
        Arg("float32", 1.5), Arg("float64", 100.0), Arg("float64", 0.1), Arg("float64", 1e21),
        Arg("float64", -2.5e-7), Arg("string", 'héllo "q" <b> & \u2028 \\ \t'),
        Arg("[]bool", [True, False]), Arg("[]int", [1, -2]), Arg("[]int64", [1, 2, 3]), Arg("[]uint", [4, 5]),
        Arg("[]uint8", b"\x00\x01\xfe\xff"), Arg("[]byte", b"hello"), Arg("[]float32", [0.5, 2.0]),
        Arg("[]float64", [1.0, 2.25]), Arg("[]string", ["a", "b"]), Arg("[]int64", None),
    ]
    sig = Signature("types", args=args, uuid="task_types", routing_key="machinery_tasks", headers={})
    assert encode_signature(sig) == golden("signature_all_types.json")


def test_fresh_chain_matches_go() -> None:
    c1 = Signature("add", args=[1, 1], uuid="task_c1", routing_key="machinery_tasks", headers={})
    c2 = Signature("add", args=[5, 5], uuid="task_c2")
    c3 = Signature("multiply", args=[4], uuid="task_c3")
    chain = Chain(c1, c2, c3)
    assert chain.first() is c1
    assert encode_signature(c1) == golden("signature_chain.json")


def test_fresh_chord_member_matches_go() -> None:
    callback = Signature("multiply", uuid="chord_9f1")
    member = Signature(
        "add", args=[1, 1], uuid="task_m1", routing_key="machinery_tasks", headers={},
        group_uuid="group_77a", group_task_count=2, chord_callback=callback,
    )
    assert encode_signature(member) == golden("signature_chord_member.json")


def test_fresh_retry_onerror_matches_go() -> None:
    on_error = Signature("on_error", args=["boom"], uuid="task_e1")
    sig = Signature(
        "flaky", args=["k"], uuid="task_r1", routing_key="machinery_tasks",
        headers={"uber-trace-id": "abc:def:0:1"}, priority=5, immutable=True, retry_count=2, retry_timeout=3,
        on_error=[on_error],
    )
    assert encode_signature(sig) == golden("signature_retry_onerror.json")


@pytest.mark.parametrize(
    ("name", "state"),
    [
        ("state_pending.json", TaskState("task_0c1f", PENDING, task_name="add", created_at=CREATED)),
        ("state_success.json", TaskState(
            "task_0c1f", SUCCESS, task_name="add", results=[TaskResult("int64", 2)], created_at=CREATED)),
        ("state_success_multi.json", TaskState(
            "task_mv", SUCCESS, task_name="return_multiple_values",
            results=[TaskResult.of("foo"), TaskResult.of("bar")], created_at=CREATED)),
        ("state_success_error_only.json", TaskState(
            "task_eo", SUCCESS, task_name="return_just_error", results=[], created_at=CREATED)),
        ("state_failure.json", TaskState("task_f", FAILURE, task_name="panic", error="oops", created_at=CREATED)),
        ("state_received_no_pending.json", TaskState("task_np", RECEIVED)),
    ],
)
def test_fresh_state_matches_go(name: str, state: TaskState) -> None:
    assert encode_state(state) == golden(name)


def test_fresh_state_with_plain_nanosecond_time() -> None:
    created = gojson.Timestamp.with_nanos(datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC), 789)
    state = TaskState("task_0c1f", SUCCESS, task_name="add", results=[TaskResult.of(2)], created_at=created)
    assert encode_state(state) == golden("state_success.json")


def test_fresh_group_meta_matches_go() -> None:
    meta = GroupMeta("group_77a", ["task_m1", "task_m2"], created_at=CREATED)
    assert encode_group_meta(meta) == golden("group_meta.json")


# --- what a send puts on the wire: nested signatures as Go's SendChain / SendChord leave them -------


def _sent_bodies(send: Callable[[Server], object]) -> list[bytes]:
    server = Server(Config(broker="memory://", result_backend="memory://"))
    try:
        send(server)
        return server.portal.run(server.get_broker().pending("machinery_tasks"))
    finally:
        server.close()


def test_a_sent_chain_leaves_its_inner_links_unrouted_as_go_does() -> None:
    """Inner links keep RoutingKey "" and Headers null, so the worker that sends each one routes it
    to its own default queue, as a Go worker does."""
    chain = Chain(Signature("add", args=[1, 1], uuid="task_c1"), Signature("add", args=[5, 5], uuid="task_c2"),
                  Signature("multiply", args=[4], uuid="task_c3"))
    (body,) = _sent_bodies(lambda server: server.send_chain(chain))
    assert body == golden("signature_chain.json")


def test_a_sent_chord_member_carries_its_callback_as_go_does() -> None:
    """The embedded callback has RoutingKey "" and Headers {} (Go's SendChord gives the callback an
    empty carrier for its span); the member itself is routed and has headers."""
    group = Group(Signature("add", args=[1, 1], uuid="task_m1"), Signature("add", args=[2, 2], uuid="task_m2"),
                  group_uuid="group_77a")
    chord = Chord(group, Signature("multiply", uuid="chord_9f1"))
    first, _second = _sent_bodies(lambda server: server.send_chord(chord))
    expected = golden("signature_chord_member.json").replace(
        b'"Name":"multiply","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":null,"Headers":null',
        b'"Name":"multiply","RoutingKey":"","ETA":null,"GroupUUID":"","GroupTaskCount":0,"Args":null,"Headers":{}')
    assert expected != golden("signature_chord_member.json")
    assert first == expected


def test_byte_results_are_stored_as_go_types_them() -> None:
    """Go types a result by reflection, so a []byte result is "[]uint8"; both spellings read back."""
    state = TaskState("task_b", SUCCESS, task_name="raw", results=[TaskResult("[]byte", b"\x00\xff")],
                      created_at=CREATED)
    data = encode_state(state)
    assert b'"Results":[{"Type":"[]uint8","Value":"AP8="}]' in data
    assert decode_state(data).results[0].python_value() == b"\x00\xff"
    assert decode_state(data.replace(b"[]uint8", b"[]byte")).results[0].python_value() == b"\x00\xff"


def test_stored_times_carry_nanoseconds_as_go_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gojson.time, "time_ns", lambda: 1_735_787_045_123_456_789)
    assert gojson.format_time(gojson.now()) == "2025-01-02T03:04:05.123456789Z"
    state = TaskState("task_0c1f", PENDING, task_name="add", created_at=gojson.now())
    assert encode_state(state) == golden("state_pending.json")
