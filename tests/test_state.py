"""TaskState / GroupMeta decoding errors and helpers, and the error types' messages."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from machinery.errors import DecodeError, MachineryError, RetryTaskLater, TaskError, TimeoutError
from machinery.tasks.state import (
    ALL_STATES,
    FAILURE,
    PENDING,
    RECEIVED,
    RETRY,
    STARTED,
    SUCCESS,
    GroupMeta,
    TaskResult,
    TaskState,
    decode_group_meta,
    decode_state,
    encode_group_meta,
    encode_state,
    state_rank,
)


@pytest.mark.parametrize(
    "data",
    [b"", b"nope", b"[]", b'{"TaskUUID":5}', b'{"Results":{}}', b'{"TTL":"x"}', b'{"CreatedAt":"yesterday"}'],
)
def test_bad_state_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_state(data)


@pytest.mark.parametrize("data", [b"", b"{", b'{"TaskUUIDs":"a"}', b'{"ChordTriggered":"no"}'])
def test_bad_group_meta_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="malformed group meta"):
        decode_group_meta(data)


def test_state_unknown_keys_and_order() -> None:
    data = b'{"TTL":0,"Extra":1,"State":"SUCCESS","Results":[{"Value":2,"Type":"int64","X":0}],"TaskUUID":"t"}'
    state = decode_state(data)
    assert (state.task_uuid, state.state, state.values()) == ("t", SUCCESS, [2])
    assert state.created_at is None


def test_state_ranks() -> None:
    assert ALL_STATES == (PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE)
    assert [state_rank(s) for s in ALL_STATES] == sorted(state_rank(s) for s in ALL_STATES)
    assert state_rank(RECEIVED) < state_rank(SUCCESS)
    assert state_rank("BOGUS") == -1


def test_task_result_of_infers_the_type() -> None:
    assert TaskResult.of(2) == TaskResult("int64", 2)
    assert TaskResult.of("x") == TaskResult("string", "x")
    assert TaskResult.of([1.5]) == TaskResult("[]float64", [1.5])
    assert TaskResult.of(2, "uint8") == TaskResult("uint8", 2)


def test_results_are_checked_on_encode() -> None:
    from machinery.errors import ArgTypeError

    with pytest.raises(ArgTypeError, match="300 is out of range for uint8"):
        encode_state(TaskState("t", SUCCESS, results=[TaskResult("uint8", 300)]))


def test_state_equality() -> None:
    a = TaskState("t", SUCCESS, results=[TaskResult.of(1)])
    assert a == decode_state(encode_state(a))
    assert a != TaskState("t", FAILURE)
    assert "error='boom'" in repr(TaskState("t", FAILURE, error="boom"))


def test_group_meta_round_trip() -> None:
    meta = GroupMeta("group_1", ["task_a", "task_b"], chord_triggered=True, lock=True, ttl=5)
    back = decode_group_meta(encode_group_meta(meta))
    assert (back.group_uuid, back.task_uuids, back.chord_triggered, back.lock, back.ttl) == (
        "group_1", ["task_a", "task_b"], True, True, 5)
    assert json.loads(encode_group_meta(meta))["CreatedAt"] == "0001-01-01T00:00:00Z"
    assert "2 tasks" in repr(meta)


# --- errors ----------------------------------------------------------------------------------------


def test_every_error_is_a_machinery_error() -> None:
    assert issubclass(TimeoutError, MachineryError)
    import builtins

    assert issubclass(TimeoutError, builtins.TimeoutError)
    assert issubclass(TaskError, MachineryError) and issubclass(RetryTaskLater, MachineryError)


def test_task_error_message() -> None:
    err = TaskError("boom", task_uuid="task_1", task_name="add")
    assert err.error == "boom"
    assert str(err) == "task add (task_1) failed: boom"
    assert str(TaskError("boom")) == "task failed: boom"


@pytest.mark.parametrize(
    ("delay", "text"),
    [
        (timedelta(hours=4), "4h0m0s"),
        (1.5, "1.5s"),
        (0.25, "250ms"),
        (0, "0s"),
        (timedelta(minutes=1, seconds=30), "1m30s"),
        (timedelta(microseconds=5), "5µs"),
    ],
)
def test_retry_task_later_message_uses_go_durations(delay: timedelta | float, text: str) -> None:
    err = RetryTaskLater("busy", delay=delay)
    assert str(err) == f"Task error: busy Will retry in: {text}"
    assert isinstance(err.delay, timedelta)
