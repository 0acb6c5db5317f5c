"""Signature and Arg: a task invocation, and its Go-compatible JSON form."""

from __future__ import annotations

import copy as _copy
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from machinery.errors import ArgTypeError, DecodeError
from machinery.tasks import gojson
from machinery.tasks.gotypes import infer_type, to_python, to_wire


class Arg:
    """One typed positional argument: `type` is a Machinery type string such as "int64"."""

    __slots__ = ("name", "type", "value")

    def __init__(self, type: str, value: Any, name: str = "") -> None:
        self.type = type
        self.value = value
        self.name = name

    @classmethod
    def of(cls, value: Any, type_name: str | None = None) -> Arg:
        """An Arg for a plain value, its type inferred unless given."""
        if isinstance(value, Arg):
            return value
        return cls(type_name or infer_type(value), value)

    def python_value(self) -> Any:
        """The value converted and range-checked for its type (what a task function receives)."""
        return to_python(self.type, self.value)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Arg)
            and (self.type, self.value, self.name) == (other.type, other.value, other.name)
        )

    def __hash__(self) -> int:
        return hash((self.type, repr(self.value), self.name))

    def __repr__(self) -> str:
        name = f", name={self.name!r}" if self.name else ""
        return f"Arg({self.type!r}, {self.value!r}{name})"


class Signature:
    """A task to run: its name, typed arguments and the workflow fields Go Machinery defines."""

    __slots__ = (
        "args", "broker_message_group_id", "chord_callback", "eta", "group_task_count", "group_uuid",
        "headers", "ignore_when_task_not_registered", "immutable", "name", "on_error", "on_success",
        "priority", "retry_count", "retry_timeout", "routing_key", "sqs_receipt_handle",
        "stop_task_deletion_on_error", "uuid",
    )

    def __init__(
        self,
        name: str,
        args: Iterable[Any] | None = None,
        *,
        uuid: str = "",
        routing_key: str = "",
        eta: datetime | None = None,
        group_uuid: str = "",
        group_task_count: int = 0,
        headers: dict[str, Any] | None = None,
        priority: int = 0,
        immutable: bool = False,
        retry_count: int = 0,
        retry_timeout: int = 0,
        on_success: list[Signature] | None = None,
        on_error: list[Signature] | None = None,
        chord_callback: Signature | None = None,
        broker_message_group_id: str = "",
        sqs_receipt_handle: str = "",
        stop_task_deletion_on_error: bool = False,
        ignore_when_task_not_registered: bool = False,
    ) -> None:
        self.uuid = uuid
        self.name = name
        self.routing_key = routing_key
        self.eta = eta
        self.group_uuid = group_uuid
        self.group_task_count = group_task_count
        self.args: list[Arg] = []
        if args is not None:
            if isinstance(args, str | bytes | bytearray | dict):
                raise ArgTypeError(f"args must be a list of values or Args, got {type(args).__name__} {args!r:.60}")
            self.args = [Arg.of(a) for a in args]
        self.headers = headers
        self.priority = priority
        self.immutable = immutable
        self.retry_count = retry_count
        self.retry_timeout = retry_timeout
        self.on_success = on_success
        self.on_error = on_error
        self.chord_callback = chord_callback
        self.broker_message_group_id = broker_message_group_id
        self.sqs_receipt_handle = sqs_receipt_handle
        self.stop_task_deletion_on_error = stop_task_deletion_on_error
        self.ignore_when_task_not_registered = ignore_when_task_not_registered

    def python_args(self) -> list[Any]:
        """The arguments converted for the task function; a bad value raises ArgTypeError."""
        return [a.python_value() for a in self.args]

    def copy(self) -> Signature:
        """A deep copy (workflows and periodic ticks send fresh copies); UUIDs are kept as they are."""
        sig = Signature.__new__(Signature)
        for name in Signature.__slots__:
            setattr(sig, name, getattr(self, name))
        sig.args = [Arg(a.type, _copy.deepcopy(a.value), a.name) for a in self.args]
        sig.headers = _copy.deepcopy(self.headers)
        sig.on_success = [s.copy() for s in self.on_success] if self.on_success is not None else None
        sig.on_error = [s.copy() for s in self.on_error] if self.on_error is not None else None
        sig.chord_callback = self.chord_callback.copy() if self.chord_callback is not None else None
        return sig

    def to_json(self) -> bytes:
        return encode_signature(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> Signature:
        return decode_signature(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Signature) and encode_signature(self) == encode_signature(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Signature({self.name!r}, args={self.args!r}, uuid={self.uuid!r})"


# --- encoding ----------------------------------------------------------------------------


def _arg_wire(arg: Any) -> dict[str, Any]:
    if not isinstance(arg, Arg):
        arg = Arg.of(arg)
    try:
        value = to_wire(arg.type, arg.value)
    except ArgTypeError as exc:
        raise ArgTypeError(f"argument {arg!r}: {exc}") from exc
    return {"Name": arg.name, "Type": arg.type, "Value": value}


def signature_wire(sig: Signature) -> dict[str, Any]:
    """The ordered dict Go's json.Marshal would produce for the signature."""
    return {
        "UUID": sig.uuid,
        "Name": sig.name,
        "RoutingKey": sig.routing_key,
        "ETA": gojson.format_time(sig.eta) if sig.eta is not None else None,
        "GroupUUID": sig.group_uuid,
        "GroupTaskCount": sig.group_task_count,
        "Args": [_arg_wire(a) for a in sig.args] if sig.args else None,
        "Headers": gojson.go_value(sig.headers) if sig.headers else sig.headers,
        "Priority": sig.priority,
        "Immutable": sig.immutable,
        "RetryCount": sig.retry_count,
        "RetryTimeout": sig.retry_timeout,
        "OnSuccess": [signature_wire(s) for s in sig.on_success] if sig.on_success is not None else None,
        "OnError": [signature_wire(s) for s in sig.on_error] if sig.on_error is not None else None,
        "ChordCallback": signature_wire(sig.chord_callback) if sig.chord_callback is not None else None,
        "BrokerMessageGroupId": sig.broker_message_group_id,
        "SQSReceiptHandle": sig.sqs_receipt_handle,
        "StopTaskDeletionOnError": sig.stop_task_deletion_on_error,
        "IgnoreWhenTaskNotRegistered": sig.ignore_when_task_not_registered,
    }


def encode_signature(sig: Signature) -> bytes:
    """Go-identical JSON bytes for a signature."""
    if (
        sig.on_success is None and sig.on_error is None and sig.chord_callback is None
        and type(sig.uuid) is str and type(sig.group_task_count) is int and type(sig.priority) is int
        and type(sig.retry_count) is int and type(sig.retry_timeout) is int and type(sig.immutable) is bool
        and type(sig.stop_task_deletion_on_error) is bool and type(sig.ignore_when_task_not_registered) is bool
    ):
        return _encode_flat(sig)
    return gojson.encode(signature_wire(sig))


# A signature without nested signatures is a fixed text with four holes: UUID, ETA, Args and
# Headers. The text for the other fields is encoded once per distinct set of their values and the
# holes are encoded on their own; Go's encoding of a value does not depend on what surrounds it,
# so the bytes are those of encoding the whole (tests/test_signature.py compares the two).
_HOLE = msgspec.Raw(b"\0")  # a raw NUL byte never occurs in encoded JSON
_TEMPLATES: dict[tuple[Any, ...], list[bytes]] = {}
_TEMPLATES_MAX = 1024


def _encode_flat(sig: Signature) -> bytes:
    key = (
        sig.name, sig.routing_key, sig.group_uuid, sig.group_task_count, sig.priority, sig.immutable,
        sig.retry_count, sig.retry_timeout, sig.broker_message_group_id, sig.sqs_receipt_handle,
        sig.stop_task_deletion_on_error, sig.ignore_when_task_not_registered,
    )
    try:
        parts = _TEMPLATES.get(key)
    except TypeError:  # an unhashable field value: no template
        return gojson.encode(signature_wire(sig))
    eta = sig.eta
    eta_token = b"null" if eta is None else gojson.string_token(gojson.format_time(eta))
    args = [_arg_wire(a) for a in sig.args] if sig.args else None
    headers = sig.headers
    if headers is None:
        headers_token = b"null"
    elif type(headers) is dict and not headers:
        headers_token = b"{}"
    else:
        headers_token = gojson.encode(gojson.go_value(headers) if headers else headers)
    if parts is None:
        parts = _template(sig, key)
    return b"".join((
        parts[0], gojson.string_token(sig.uuid), parts[1], eta_token, parts[2],
        b"null" if args is None else gojson.encode(args), parts[3], headers_token, parts[4],
    ))


def _template(sig: Signature, key: tuple[Any, ...]) -> list[bytes]:
    wire = signature_wire(Signature(sig.name))  # the fields, in order, with no args
    wire.update(
        UUID=_HOLE, Name=sig.name, RoutingKey=sig.routing_key, ETA=_HOLE, GroupUUID=sig.group_uuid,
        GroupTaskCount=sig.group_task_count, Args=_HOLE, Headers=_HOLE, Priority=sig.priority,
        Immutable=sig.immutable, RetryCount=sig.retry_count, RetryTimeout=sig.retry_timeout,
        BrokerMessageGroupId=sig.broker_message_group_id, SQSReceiptHandle=sig.sqs_receipt_handle,
        StopTaskDeletionOnError=sig.stop_task_deletion_on_error,
        IgnoreWhenTaskNotRegistered=sig.ignore_when_task_not_registered,
    )
    parts = gojson.encode(wire).split(b"\0")
    if len(parts) != 5:  # cannot happen (NUL is escaped inside strings); encode the long way
        raise AssertionError("signature template has stray NUL bytes")
    if len(_TEMPLATES) >= _TEMPLATES_MAX:
        _TEMPLATES.clear()
    _TEMPLATES[key] = parts
    return parts


# --- decoding ----------------------------------------------------------------------------


class _WireArg(msgspec.Struct, rename="pascal"):
    type: str = ""
    value: Any = None
    name: str = ""


class _WireSignature(msgspec.Struct, rename={
    "uuid": "UUID", "name": "Name", "routing_key": "RoutingKey", "eta": "ETA", "group_uuid": "GroupUUID",
    "group_task_count": "GroupTaskCount", "args": "Args", "headers": "Headers", "priority": "Priority",
    "immutable": "Immutable", "retry_count": "RetryCount", "retry_timeout": "RetryTimeout",
    "on_success": "OnSuccess", "on_error": "OnError", "chord_callback": "ChordCallback",
    "broker_message_group_id": "BrokerMessageGroupId", "sqs_receipt_handle": "SQSReceiptHandle",
    "stop_task_deletion_on_error": "StopTaskDeletionOnError",
    "ignore_when_task_not_registered": "IgnoreWhenTaskNotRegistered",
}):
    uuid: str = ""
    name: str = ""
    routing_key: str = ""
    eta: str | None = None
    group_uuid: str = ""
    group_task_count: int = 0
    args: list[_WireArg] | None = None
    headers: dict[str, Any] | None = None
    priority: int = 0
    immutable: bool = False
    retry_count: int = 0
    retry_timeout: int = 0
    on_success: list[_WireSignature] | None = None
    on_error: list[_WireSignature] | None = None
    chord_callback: _WireSignature | None = None
    broker_message_group_id: str = ""
    sqs_receipt_handle: str = ""
    stop_task_deletion_on_error: bool = False
    ignore_when_task_not_registered: bool = False


_DECODER = msgspec.json.Decoder(_WireSignature)


def _from_wire(w: _WireSignature) -> Signature:
    sig = Signature.__new__(Signature)
    sig.uuid = w.uuid
    sig.name = w.name
    sig.routing_key = w.routing_key
    try:
        sig.eta = gojson.parse_time(w.eta) if w.eta is not None else None
    except DecodeError as exc:
        raise DecodeError(f"malformed signature: `ETA`: {exc}") from None
    sig.group_uuid = w.group_uuid
    sig.group_task_count = w.group_task_count
    sig.args = [Arg(a.type, a.value, a.name) for a in w.args] if w.args is not None else []
    sig.headers = w.headers
    if not 0 <= w.priority <= 255:
        raise DecodeError(f"malformed signature: `Priority` {w.priority} is out of range for uint8")
    sig.priority = w.priority
    sig.immutable = w.immutable
    sig.retry_count = w.retry_count
    sig.retry_timeout = w.retry_timeout
    sig.on_success = [_from_wire(s) for s in w.on_success] if w.on_success is not None else None
    sig.on_error = [_from_wire(s) for s in w.on_error] if w.on_error is not None else None
    sig.chord_callback = _from_wire(w.chord_callback) if w.chord_callback is not None else None
    sig.broker_message_group_id = w.broker_message_group_id
    sig.sqs_receipt_handle = w.sqs_receipt_handle
    sig.stop_task_deletion_on_error = w.stop_task_deletion_on_error
    sig.ignore_when_task_not_registered = w.ignore_when_task_not_registered
    return sig


def decode_signature(data: bytes | str) -> Signature:
    """Read a signature as Go writes it; any key order, unknown keys ignored."""
    if not data:
        raise DecodeError("empty message body")
    try:
        wire = _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise DecodeError(f"malformed signature: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise DecodeError(f"message is not valid JSON: {exc}") from exc
    except RecursionError:
        raise DecodeError("message nests JSON too deeply") from None
    if not wire.name:
        raise DecodeError("malformed signature: `Name` is missing or empty")
    return _from_wire(wire)


def decode_signatures(items: Sequence[bytes]) -> list[Signature]:
    return [decode_signature(i) for i in items]
