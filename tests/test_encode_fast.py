"""The template fast paths of encode_signature / encode_state give the bytes of the plain encoding."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

from machinery.tasks import gojson
from machinery.tasks.signature import Arg, Signature, encode_signature, signature_wire
from machinery.tasks.state import PENDING, RECEIVED, TaskState, _encode_state, encode_state

TEXTS = ["", "noop", "a<b>&c", "quote\"back\\slash", "ctl\b\f\n\t\x00", "uni\u2028\u2029é漢", "sur\ud800x", "{x}"]
TIMES = [
    None,
    datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
    datetime(2024, 5, 6, 7, 8, 9),
    datetime(2024, 5, 6, 8, 8, 9, 100, tzinfo=timezone(timedelta(hours=1))),
    gojson.Timestamp.with_nanos(datetime(2024, 5, 6, 7, 8, 9, 1, tzinfo=UTC), 7),
]


def test_signature_fast_path_matches_plain_encoding() -> None:
    rnd = random.Random(7)
    for _ in range(3000):
        sig = Signature(
            rnd.choice(TEXTS),
            rnd.choice([[], [1, "x", True], [Arg("float32", 0.1), Arg("json", {"b": [1.5, None], "a": "<"})]]),
            uuid=rnd.choice(["", "task_1", *TEXTS]),
            routing_key=rnd.choice(TEXTS),
            eta=rnd.choice(TIMES),
            group_uuid=rnd.choice(TEXTS),
            group_task_count=rnd.choice([0, 3]),
            headers=rnd.choice([None, {}, {"b": 1.0, "a": "&", "c": {"z": 2, "y": [0.5]}}]),
            priority=rnd.choice([0, 1, 255]),
            immutable=rnd.choice([False, True]),
            retry_count=rnd.choice([0, 2]),
            retry_timeout=rnd.choice([0, 5]),
            broker_message_group_id=rnd.choice(TEXTS),
            sqs_receipt_handle=rnd.choice(TEXTS),
            stop_task_deletion_on_error=rnd.choice([False, True]),
            ignore_when_task_not_registered=rnd.choice([False, True]),
        )
        assert encode_signature(sig) == gojson.encode(signature_wire(sig))


def test_signature_fast_path_keeps_int_and_bool_apart() -> None:
    a = Signature("t", uuid="u", immutable=True, priority=1)
    b = Signature("t", uuid="u", immutable=1, priority=True)  # type: ignore[arg-type]
    for sig in (a, b, a, b):
        assert encode_signature(sig) == gojson.encode(signature_wire(sig))


def test_state_fast_path_matches_plain_encoding() -> None:
    rnd = random.Random(11)
    for _ in range(3000):
        s = TaskState(
            rnd.choice(["task_1", *TEXTS]),
            rnd.choice([PENDING, RECEIVED]),
            task_name=rnd.choice(TEXTS),
            error=rnd.choice(["", "boom<"]),
            created_at=rnd.choice(TIMES),
            ttl=rnd.choice([0, 60]),
        )
        assert encode_state(s) == _encode_state(s)


def test_format_time_memo_sees_nanosecond_changes() -> None:
    ts = gojson.Timestamp.with_nanos(datetime(2024, 1, 1, tzinfo=UTC), 5)
    assert gojson.format_time(ts) == "2024-01-01T00:00:00.000000005Z"
    ts.nanosecond = 6
    assert gojson.format_time(ts) == "2024-01-01T00:00:00.000000006Z"
