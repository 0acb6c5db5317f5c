"""Signature decoding errors, tolerance of Go's variations, ETA times and copy()."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from goldens import golden
from machinery.errors import ArgTypeError, DecodeError, MachineryError
from machinery.tasks import gojson
from machinery.tasks.signature import Arg, Signature, decode_signature, decode_signatures, encode_signature

ADD = golden("signature_add.json")


def add_with(**changes: object) -> bytes:
    obj = json.loads(ADD)
    obj.update(changes)
    return json.dumps(obj).encode()


# --- decoding errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty message body"),
        ("", "empty message body"),
        (b"not json", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b'{"Name":"add"} trailing', "not valid JSON"),
        (b"   ", "not valid JSON"),
        (b"[]", "malformed signature"),
        (b'[{"Name":"add"}]', "malformed signature"),
        (b'"add"', "malformed signature"),
        (b"null", "malformed signature"),
        (b"42", "malformed signature"),
        (b"{}", "`Name` is missing or empty"),
        (b'{"UUID":"task_1","Args":[]}', "`Name` is missing or empty"),
        (b'{"Name":""}', "`Name` is missing or empty"),
    ],
)
def test_decode_errors_are_clear(data: bytes | str, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_signature(data)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"GroupTaskCount": "x"}, "GroupTaskCount"),
        ({"GroupTaskCount": 1.5}, "GroupTaskCount"),
        ({"Name": 5}, "Name"),
        ({"UUID": None}, "UUID"),
        ({"Args": "x"}, "Args"),
        ({"Args": [1]}, "Args"),
        ({"Args": [{"Type": 5, "Value": 1}]}, "Type"),
        ({"Headers": []}, "Headers"),
        ({"Priority": "high"}, "Priority"),
        ({"Immutable": "yes"}, "Immutable"),
        ({"RetryCount": True}, "RetryCount"),
        ({"OnSuccess": {"Name": "x"}}, "OnSuccess"),
        ({"OnError": [5]}, "OnError"),
        ({"ChordCallback": "x"}, "ChordCallback"),
        ({"ETA": 5}, "ETA"),
        ({"IgnoreWhenTaskNotRegistered": 1}, "IgnoreWhenTaskNotRegistered"),
    ],
)
def test_wrong_field_types_name_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(DecodeError, match="malformed signature") as info:
        decode_signature(add_with(**changes))
    assert field in str(info.value)


@pytest.mark.parametrize("priority", [256, 300, -1])
def test_priority_out_of_uint8_range(priority: int) -> None:
    with pytest.raises(DecodeError, match=rf"`Priority` {priority} is out of range for uint8"):
        decode_signature(add_with(Priority=priority))


def test_priority_bounds_accepted() -> None:
    assert decode_signature(add_with(Priority=255)).priority == 255
    assert decode_signature(add_with(Priority=0)).priority == 0


@pytest.mark.parametrize("eta", ["tomorrow", "2025-01-02", "2025-01-02T03:04:05", "2025-13-02T03:04:05Z",
                                 "2025-01-02T03:04:05.1234567891Z"])
def test_bad_eta_is_a_decode_error(eta: str) -> None:
    with pytest.raises(DecodeError, match="malformed signature: `ETA`: invalid RFC 3339 time"):
        decode_signature(add_with(ETA=eta))


def test_nested_errors_are_decode_errors() -> None:
    bad_child = json.loads(ADD)
    bad_child["Priority"] = 999
    with pytest.raises(DecodeError, match="`Priority` 999"):
        decode_signature(add_with(OnSuccess=[bad_child]))
    with pytest.raises(DecodeError, match="malformed signature"):
        decode_signature(add_with(ChordCallback={"Name": "x", "GroupTaskCount": "y"}))


def test_decode_error_is_a_machinery_error_and_value_error() -> None:
    assert issubclass(DecodeError, MachineryError)
    assert issubclass(DecodeError, ValueError)


# --- tolerance --------------------------------------------------------------------------------


def test_unknown_keys_are_ignored() -> None:
    sig = decode_signature(add_with(Extra=1, SomethingNew={"a": [1, 2]}, TraceID="x"))
    assert encode_signature(sig) == ADD


def test_unknown_keys_in_args_and_nested_are_ignored() -> None:
    data = b'{"Name":"a","Args":[{"Type":"int64","Value":1,"Unit":"s"}],"OnSuccess":[{"Name":"b","X":1}]}'
    sig = decode_signature(data)
    assert sig.args == [Arg("int64", 1)]
    assert sig.on_success is not None and sig.on_success[0].name == "b"


def test_any_key_order_is_accepted() -> None:
    obj = json.loads(ADD)
    rng = random.Random(7)
    for _ in range(20):
        keys = list(obj)
        rng.shuffle(keys)
        shuffled = json.dumps({k: obj[k] for k in keys}).encode()
        assert encode_signature(decode_signature(shuffled)) == ADD
    reversed_args = b'{"Args":[{"Value":1,"Type":"int64","Name":""}],"Name":"x"}'
    assert decode_signature(reversed_args).args == [Arg("int64", 1)]


def test_missing_optional_fields_take_go_zero_values() -> None:
    sig = decode_signature(b'{"Name":"add"}')
    assert (sig.uuid, sig.routing_key, sig.eta, sig.group_uuid, sig.group_task_count) == ("", "", None, "", 0)
    assert (sig.args, sig.headers, sig.priority, sig.immutable) == ([], None, 0, False)
    assert (sig.retry_count, sig.retry_timeout, sig.on_success, sig.on_error) == (0, 0, None, None)
    assert sig.chord_callback is None
    assert encode_signature(sig) == encode_signature(Signature("add"))


def test_null_and_empty_args() -> None:
    assert decode_signature(b'{"Name":"a","Args":null}').args == []
    assert decode_signature(b'{"Name":"a","Args":[]}').args == []
    # Go writes a nil slice as null; an empty Args list is written as null too
    assert b'"Args":null' in encode_signature(Signature("a", args=[]))


def test_str_input_and_whitespace() -> None:
    sig = decode_signature(" \n" + ADD.decode() + "\n ")
    assert sig.name == "add"


def test_decode_signatures() -> None:
    sigs = decode_signatures([ADD, add_with(Name="mul")])
    assert [s.name for s in sigs] == ["add", "mul"]


def test_sqs_receipt_handle_round_trips() -> None:
    sig = decode_signature(add_with(SQSReceiptHandle="rh", BrokerMessageGroupId="g"))
    assert (sig.sqs_receipt_handle, sig.broker_message_group_id) == ("rh", "g")
    assert b'"BrokerMessageGroupId":"g","SQSReceiptHandle":"rh"' in encode_signature(sig)


# --- ETA -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "2025-06-30T23:59:59.123456789+02:00",
        "2025-06-30T23:59:59.123456789-07:30",
        "2025-01-02T03:04:05.1Z",
        "2025-01-02T03:04:05Z",
        "2025-01-02T03:04:05.000000001Z",
        "2025-01-02T03:04:05.12Z",
        "1999-12-31T23:59:59.999999999+14:00",
    ],
)
def test_eta_round_trips_exactly(text: str) -> None:
    sig = decode_signature(add_with(ETA=text))
    assert sig.eta is not None
    assert gojson.format_time(sig.eta) == text
    assert json.loads(encode_signature(sig))["ETA"] == text
    assert json.loads(encode_signature(sig.copy()))["ETA"] == text


def test_eta_with_offset_is_the_right_instant() -> None:
    sig = decode_signature(add_with(ETA="2025-06-30T23:59:59.123456789+02:00"))
    assert sig.eta is not None
    assert sig.eta.astimezone(UTC) == datetime(2025, 6, 30, 21, 59, 59, 123456, tzinfo=UTC)
    assert gojson.time_ns(sig.eta) == 1751320799123456789


def test_python_etas_are_written_as_go_writes_them() -> None:
    utc = datetime(2025, 1, 2, 3, 4, 5, 120000, tzinfo=UTC)
    assert json.loads(encode_signature(Signature("a", eta=utc)))["ETA"] == "2025-01-02T03:04:05.12Z"
    naive = datetime(2025, 1, 2, 3, 4, 5)
    assert json.loads(encode_signature(Signature("a", eta=naive)))["ETA"] == "2025-01-02T03:04:05Z"
    zero_offset = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(0), "GMT"))
    assert json.loads(encode_signature(Signature("a", eta=zero_offset)))["ETA"] == "2025-01-02T03:04:05Z"
    minus = datetime(2025, 1, 2, 3, 4, 5, 1, tzinfo=timezone(-timedelta(hours=3, minutes=30)))
    assert json.loads(encode_signature(Signature("a", eta=minus)))["ETA"] == "2025-01-02T03:04:05.000001-03:30"


def test_zero_time_reads_as_none() -> None:
    assert gojson.parse_time(gojson.ZERO_TIME) is None
    assert gojson.format_time(None) == gojson.ZERO_TIME


def test_time_ns_and_from_ns() -> None:
    ns = 1735787045123456789
    ts = gojson.from_ns(ns)
    assert gojson.format_time(ts) == "2025-01-02T03:04:05.123456789Z"
    assert gojson.time_ns(ts) == ns
    assert gojson.time_ns(datetime(1970, 1, 1, 0, 0, 1)) == 1_000_000_000


# --- copy -----------------------------------------------------------------------------------------


def _workflow_signature() -> Signature:
    callback = Signature("cb", args=[1], uuid="chord_1", headers={"h": ["x"]})
    child = Signature("child", args=[Arg("[]int64", [1, 2])], uuid="task_c", on_error=[Signature("err")])
    return Signature(
        "add", args=[Arg("[]int64", [1, 2]), Arg("json", {"k": [1]}), Arg("[]byte", b"ab"), Arg("float64", 1.0)],
        uuid="task_1", routing_key="q", eta=datetime(2025, 1, 2, tzinfo=UTC), group_uuid="group_1",
        group_task_count=2, headers={"trace": {"id": "1"}}, priority=3, immutable=True, retry_count=2,
        retry_timeout=5, on_success=[child], on_error=[Signature("e")], chord_callback=callback,
        broker_message_group_id="g", stop_task_deletion_on_error=True, ignore_when_task_not_registered=True,
    )


def test_copy_is_equal_and_keeps_every_field() -> None:
    sig = _workflow_signature()
    dup = sig.copy()
    assert dup == sig
    assert encode_signature(dup) == encode_signature(sig)
    for name in Signature.__slots__:
        if name not in ("args", "headers", "on_success", "on_error", "chord_callback"):
            assert getattr(dup, name) == getattr(sig, name), name
    assert dup.args == sig.args
    assert [type(a.value) for a in dup.args] == [list, dict, bytes, float]


def test_copy_is_deep() -> None:
    sig = _workflow_signature()
    before = encode_signature(sig)
    dup = sig.copy()
    assert dup.args is not sig.args and dup.args[0] is not sig.args[0]
    assert dup.on_success is not None and sig.on_success is not None
    assert dup.on_success[0] is not sig.on_success[0]
    assert dup.chord_callback is not sig.chord_callback

    dup.args[0].value.append(3)
    dup.args[1].value["k"].append(2)
    dup.args.append(Arg("int64", 9))
    assert dup.headers is not None
    dup.headers["trace"]["id"] = "2"
    dup.on_success[0].args[0].value.append(3)
    dup.on_success[0].uuid = "task_changed"
    assert dup.on_success[0].on_error is not None
    dup.on_success[0].on_error[0].name = "changed"
    assert dup.on_error is not None
    dup.on_error.append(Signature("more"))
    assert dup.chord_callback is not None and dup.chord_callback.headers is not None
    dup.chord_callback.headers["h"].append("y")
    dup.chord_callback.uuid = "chord_2"
    dup.uuid = "task_2"

    assert encode_signature(sig) == before


def test_copy_of_invalid_args_does_not_raise() -> None:
    sig = Signature("a", args=[Arg("int8", 1000)])
    dup = sig.copy()
    assert dup.args == [Arg("int8", 1000)]


def test_equality_and_hash() -> None:
    a = Signature("add", args=[1, 2], uuid="task_1")
    b = Signature("add", args=[Arg("int64", 1), Arg("int64", 2)], uuid="task_1")
    assert a == b
    assert a != Signature("add", args=[1, 3], uuid="task_1")
    assert a != "add"
    with pytest.raises(TypeError):
        hash(a)
    assert hash(Arg("int64", 1)) == hash(Arg("int64", 1))
    assert Arg("int64", 1) != Arg("int32", 1)


def test_constructor_defaults_and_attributes_are_settable() -> None:
    sig = Signature("add")
    assert (sig.uuid, sig.routing_key, sig.args, sig.headers, sig.on_success) == ("", "", [], None, None)
    sig.retry_count = 3
    sig.eta = datetime(2025, 1, 1, tzinfo=UTC)
    assert json.loads(encode_signature(sig))["RetryCount"] == 3
    with pytest.raises(AttributeError):
        sig.not_a_field = 1  # type: ignore[attr-defined]


def test_repr() -> None:
    assert repr(Arg("int64", 1)) == "Arg('int64', 1)"
    assert repr(Arg("int64", 1, name="x")) == "Arg('int64', 1, name='x')"
    assert "Signature('add'" in repr(Signature("add", uuid="task_1"))


def test_args_must_be_a_sequence_of_values() -> None:
    for bad in ("abc", b"abc", {"a": 1}):
        with pytest.raises(ArgTypeError, match="args must be a list of values or Args"):
            Signature("t", args=bad)
    assert Signature("t", args=(1, "a")).python_args() == [1, "a"]
    assert Signature("t", args=iter([2])).python_args() == [2]


def test_lone_surrogates_are_written_as_replacement_characters() -> None:
    """Go writes invalid UTF-8 as U+FFFD; a Python str with a lone surrogate does the same."""
    sig = Signature("t", args=["a\ud800b\U0001f600"], headers={"\udc80": "x"})
    back = decode_signature(encode_signature(sig))
    assert back.python_args() == ["a\ufffdb\U0001f600"]
    assert back.headers == {"\ufffd": "x"}


def test_unencodable_header_is_an_arg_type_error() -> None:
    with pytest.raises(ArgTypeError, match="cannot be encoded as JSON"):
        encode_signature(Signature("t", headers={"a": object()}))
    with pytest.raises(ArgTypeError, match="NaN or Infinity"):
        encode_signature(Signature("t", headers={"a": float("nan")}))
