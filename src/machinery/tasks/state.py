"""Task states, typed results and group metadata, in the JSON shape Go's backends store."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import msgspec

from machinery.errors import DecodeError
from machinery.tasks import gojson
from machinery.tasks.gotypes import infer_type, stored_result_type, to_python, to_wire

PENDING: Final = "PENDING"
RECEIVED: Final = "RECEIVED"
STARTED: Final = "STARTED"
RETRY: Final = "RETRY"
SUCCESS: Final = "SUCCESS"
FAILURE: Final = "FAILURE"
ALL_STATES: Final = (PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE)
_ORDER: Final = {s: i for i, s in enumerate(ALL_STATES)}


class TaskResult:
    """One typed return value of a task."""

    __slots__ = ("type", "value")

    def __init__(self, type: str, value: Any) -> None:
        self.type = type
        self.value = value

    @classmethod
    def of(cls, value: Any, type_name: str | None = None) -> TaskResult:
        return cls(type_name or infer_type(value), value)

    def python_value(self) -> Any:
        return to_python(self.type, self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskResult) and (self.type, self.value) == (other.type, other.value)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TaskResult(type={self.type!r}, value={self.value!r})"


class TaskState:
    """The stored state of one task: what `get_state()` returns."""

    __slots__ = ("created_at", "error", "exc_type", "progress", "results", "state", "task_name", "task_uuid",
                 "traceback", "ttl")

    def __init__(
        self,
        task_uuid: str,
        state: str,
        *,
        task_name: str = "",
        results: list[TaskResult] | None = None,
        error: str = "",
        created_at: datetime | None = None,
        ttl: int = 0,
        exc_type: str = "",
        traceback: str = "",
        progress: Any = None,
    ) -> None:
        self.task_uuid = task_uuid
        self.task_name = task_name
        self.state = state
        self.results = results
        self.error = error
        self.created_at = created_at
        self.ttl = ttl
        #: beyond Go's fields (stored after them, where Go readers skip them): the exception's
        #: type and traceback of a failure, and the latest value a running task reported
        self.exc_type = exc_type
        self.traceback = traceback
        self.progress = progress

    def is_completed(self) -> bool:
        return self.state in (SUCCESS, FAILURE)

    def filled_from(self, other: TaskState) -> TaskState:
        """This state, with TaskName and CreatedAt taken from `other` where this one has none
        (Go's merge rule: a later state keeps the name and creation time PENDING stored)."""
        return TaskState(
            self.task_uuid, self.state, task_name=self.task_name or other.task_name, results=self.results,
            error=self.error, created_at=self.created_at or other.created_at, ttl=self.ttl,
            exc_type=self.exc_type, traceback=self.traceback, progress=self.progress,
        )

    def is_success(self) -> bool:
        return self.state == SUCCESS

    def is_failure(self) -> bool:
        return self.state == FAILURE

    def values(self) -> list[Any]:
        """The results converted to Python values."""
        return [r.python_value() for r in self.results or ()]

    def to_json(self) -> bytes:
        return encode_state(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskState) and encode_state(self) == encode_state(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        """Keyword form, as the README shows it; results and error only when there are any."""
        results = f", results={self.results!r}" if self.results else ""
        error = f", error={self.error!r}" if self.error else ""
        exc_type = f", exc_type={self.exc_type!r}" if self.exc_type else ""
        progress = f", progress={self.progress!r}" if self.progress is not None else ""
        return (f"TaskState(task_uuid={self.task_uuid!r}, task_name={self.task_name!r}, "
                f"state={self.state!r}{results}{error}{exc_type}{progress})")


def state_rank(state: str) -> int:
    """Progress order of a state, so that a late RECEIVED never overwrites SUCCESS."""
    return _ORDER.get(state, -1)


class GroupMeta:
    """The stored record of a group: its members and whether its chord has fired."""

    __slots__ = ("chord_triggered", "created_at", "group_uuid", "lock", "task_uuids", "ttl")

    def __init__(
        self,
        group_uuid: str,
        task_uuids: list[str],
        *,
        chord_triggered: bool = False,
        lock: bool = False,
        created_at: datetime | None = None,
        ttl: int = 0,
    ) -> None:
        self.group_uuid = group_uuid
        self.task_uuids = task_uuids
        self.chord_triggered = chord_triggered
        self.lock = lock
        self.created_at = created_at
        self.ttl = ttl

    def __repr__(self) -> str:
        return (
            f"GroupMeta({self.group_uuid!r}, {len(self.task_uuids)} tasks, "
            f"triggered={self.chord_triggered})"
        )


# --- encoding ------------------------------------------------------------------------------


def _result_wire(r: TaskResult) -> dict[str, Any]:
    return {"Type": stored_result_type(r.type), "Value": to_wire(r.type, r.value)}


def encode_state(s: TaskState) -> bytes:
    if (
        s.results is None and s.progress is None and not s.exc_type and not s.traceback
        and type(s.task_uuid) is str and type(s.task_name) is str
        and type(s.state) is str and type(s.error) is str and type(s.ttl) is int
    ):
        # no results (PENDING, RECEIVED, ...): everything after the UUID is shared by a batch's states
        key = (s.task_name, s.state, s.error, gojson.format_time(s.created_at), s.ttl)
        tail = _TAILS.get(key)
        token = gojson.string_token(s.task_uuid)
        if tail is None:
            data = _encode_state(s)
            if len(_TAILS) >= 1024:
                _TAILS.clear()
            _TAILS[key] = data[len(_UUID_HEAD) + len(token):]
            return data
        return _UUID_HEAD + token + tail
    return _encode_state(s)


_TAILS: dict[tuple[object, ...], bytes] = {}
_UUID_HEAD = b'{"TaskUUID":'


def _encode_state(s: TaskState) -> bytes:
    fields: dict[str, Any] = {
        "TaskUUID": s.task_uuid,
        "TaskName": s.task_name,
        "State": s.state,
        "Results": [_result_wire(r) for r in s.results] if s.results is not None else None,
        "Error": s.error,
        "CreatedAt": gojson.format_time(s.created_at),
        "TTL": s.ttl,
    }
    # Python-only details after Go's fields, present only when set: Go's decoder skips unknown
    # keys, and a state without them is byte for byte what Go writes
    if s.exc_type:
        fields["ExcType"] = s.exc_type
    if s.traceback:
        fields["Traceback"] = s.traceback
    if s.progress is not None:
        fields["Progress"] = s.progress
    return gojson.encode(fields)


def encode_group_meta(m: GroupMeta) -> bytes:
    return gojson.encode({
        "GroupUUID": m.group_uuid,
        "TaskUUIDs": m.task_uuids,
        "ChordTriggered": m.chord_triggered,
        "Lock": m.lock,
        "CreatedAt": gojson.format_time(m.created_at),
        "TTL": m.ttl,
    })


class _WireResult(msgspec.Struct, rename="pascal"):
    type: str = ""
    value: Any = None


class _WireState(msgspec.Struct, rename={"task_uuid": "TaskUUID", "ttl": "TTL"}):
    task_uuid: str = ""
    task_name: str = msgspec.field(default="", name="TaskName")
    state: str = msgspec.field(default="", name="State")
    results: list[_WireResult] | None = msgspec.field(default=None, name="Results")
    error: str = msgspec.field(default="", name="Error")
    created_at: str = msgspec.field(default=gojson.ZERO_TIME, name="CreatedAt")
    ttl: int = 0
    exc_type: str = msgspec.field(default="", name="ExcType")
    traceback: str = msgspec.field(default="", name="Traceback")
    progress: Any = msgspec.field(default=None, name="Progress")


class _WireGroup(msgspec.Struct, rename={"group_uuid": "GroupUUID", "task_uuids": "TaskUUIDs", "ttl": "TTL"}):
    group_uuid: str = ""
    task_uuids: list[str] | None = None
    chord_triggered: bool = msgspec.field(default=False, name="ChordTriggered")
    lock: bool = msgspec.field(default=False, name="Lock")
    created_at: str = msgspec.field(default=gojson.ZERO_TIME, name="CreatedAt")
    ttl: int = 0


_STATE_DEC = msgspec.json.Decoder(_WireState)
_GROUP_DEC = msgspec.json.Decoder(_WireGroup)


def decode_state(data: bytes | str) -> TaskState:
    try:
        w = _STATE_DEC.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"malformed task state: {exc}") from exc
    except RecursionError:
        raise DecodeError("malformed task state: JSON nested too deeply") from None
    return TaskState(
        w.task_uuid,
        w.state,
        task_name=w.task_name,
        results=[TaskResult(r.type, r.value) for r in w.results] if w.results is not None else None,
        error=w.error,
        created_at=gojson.parse_time(w.created_at),
        ttl=w.ttl,
        exc_type=w.exc_type,
        traceback=w.traceback,
        progress=w.progress,
    )


def decode_group_meta(data: bytes | str) -> GroupMeta:
    try:
        w = _GROUP_DEC.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise DecodeError(f"malformed group meta: {exc}") from exc
    except RecursionError:
        raise DecodeError("malformed group meta: JSON nested too deeply") from None
    return GroupMeta(
        w.group_uuid,
        list(w.task_uuids or []),
        chord_triggered=w.chord_triggered,
        lock=w.lock,
        created_at=gojson.parse_time(w.created_at),
        ttl=w.ttl,
    )
