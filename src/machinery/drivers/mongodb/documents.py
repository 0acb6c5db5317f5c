"""TaskState and GroupMeta as MongoDB documents, in the shape Go Machinery's MongoDB backend uses.

Field names are Go's bson tags. A task document (collection `tasks`): `_id` (the task UUID),
`task_name`, `state`, `results` (null, or an array of `{type, value}`), `error`, `created_at` (a
BSON date) and `ttl` (int64, only when non-zero, as Go's omitempty). A group document
(`group_metas`): `_id`, `task_uuids`, `chord_triggered`, `lock`, `created_at`. Go's decoder ignores
fields it has no tag for, so these extra fields are safe next to Go's:

* `delete_at` (date): when the document expires (a TTL index removes it; reads treat a document
  past it as gone, since MongoDB sweeps only once a minute). Go v2 uses the same name.
* `created_at_ns` (int64): created_at in Unix nanoseconds, because a BSON date keeps only
  milliseconds; it is used only while it agrees with `created_at` (a Go writer may change that).
* group progress: `done_members` (the UUIDs counted), `done` and `failed` (counters).

Result values are stored as the BSON type Go's driver writes for the Go type: int8/16/32,
uint8/16 and a small `int` as int32; int64, uint, uint32, uint64 as int64 (a uint64 above the
int64 range, which Go cannot store, as a decimal128); floats as doubles; `[]byte` as binary;
slices as arrays. Unlike Go, a `string` result is always stored as the string (Go turned a string
holding a JSON object into `{type: "json"}`, which nothing could read back). The Python-only
`json` type is stored as its JSON text; a Go-written `json` document reads back as a dict.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

import msgspec
from bson import Decimal128, Int64

from machinery.errors import ArgTypeError
from machinery.tasks import gojson
from machinery.tasks.gotypes import (
    BYTES_TYPES,
    FLOAT_BITS,
    INT_RANGES,
    JSON_TYPE,
    SLICE_TYPES,
    stored_result_type,
    to_python,
    to_wire,
)
from machinery.tasks.state import GroupMeta, TaskResult, TaskState

Doc = dict[str, Any]

_INT64_TYPES: Final = frozenset({"int64", "uint", "uint32", "uint64"})
_MAX_INT64: Final = 2**63 - 1


# --- result values -------------------------------------------------------------------------


def bson_value(type_name: str, value: Any) -> Any:
    """The BSON-ready value of one result (checked against its type, as the JSON encoder does)."""
    if type_name in BYTES_TYPES:
        wire = to_wire(type_name, value)  # base64 text, or None
        return None if wire is None else base64.b64decode(wire)
    if type_name in SLICE_TYPES:
        if value is None:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            to_wire(type_name, value)  # raises the usual "expected a list" error
            raise ArgTypeError(f"{value!r} is not {type_name}")
        elem = type_name[2:]
        return [bson_value(elem, v) for v in value]
    if type_name in INT_RANGES:
        number: int = to_wire(type_name, value)
        if type_name in _INT64_TYPES:
            return Int64(number) if number <= _MAX_INT64 else Decimal128(str(number))
        return number  # pymongo writes int32 when it fits, else int64 (Go's `int` does the same)
    if type_name in FLOAT_BITS:
        return to_python(type_name, value)
    if type_name == JSON_TYPE:
        to_wire(type_name, value)
        return msgspec.json.encode(value).decode()
    return to_wire(type_name, value)  # bool, string; an unknown type raises ArgTypeError


def wire_value(type_name: str, value: Any) -> Any:
    """A stored value back in the form Machinery's JSON carries it (what TaskResult holds)."""
    if type_name == JSON_TYPE:
        if isinstance(value, str):
            try:
                return msgspec.json.decode(value)
            except msgspec.DecodeError:
                return value
        return plain(value)
    if type_name in SLICE_TYPES and type_name not in BYTES_TYPES and isinstance(value, list):
        elem = type_name[2:]
        return [wire_value(elem, v) for v in value]
    return plain(value)


def plain(value: Any) -> Any:
    """A decoded BSON value as plain JSON-like Python (bytes as base64 text, as in Go's JSON)."""
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return value
    if isinstance(value, int):
        return int(value)  # Int64 -> int
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, Decimal128):
        number = value.to_decimal()
        return int(number) if number == number.to_integral_value() and number.is_finite() else float(number)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, datetime):
        return gojson.format_time(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return str(value)  # ObjectId and other BSON-only types


def results_value(results: list[TaskResult] | None) -> list[Doc] | None:
    if results is None:
        return None
    return [{"type": stored_result_type(r.type), "value": bson_value(r.type, r.value)} for r in results]


def _result(entry: Any) -> TaskResult:
    if not isinstance(entry, dict):
        return TaskResult("", plain(entry))
    type_name = str(entry.get("type") or "")
    return TaskResult(type_name, wire_value(type_name, entry.get("value")))


# --- times ---------------------------------------------------------------------------------


def created_fields(created_at: datetime) -> Doc:
    """`created_at` (a BSON date, what Go reads) and `created_at_ns` (the full precision)."""
    return {"created_at": created_at, "created_at_ns": Int64(gojson.time_ns(created_at))}


def _created_at(doc: Doc) -> datetime | None:
    stored = doc.get("created_at")
    if not isinstance(stored, datetime):
        return None
    ns = doc.get("created_at_ns")
    if isinstance(ns, int) and not isinstance(ns, bool) and ns // 1_000_000 == gojson.time_ns(stored) // 1_000_000:
        return gojson.from_ns(int(ns))
    if stored.tzinfo is None:
        stored = stored.replace(tzinfo=UTC)
    return None if stored.year == 1 and stored.month == 1 and stored.day == 1 else stored  # Go's zero time


def is_live(doc: Doc, now: datetime) -> bool:
    """False once `delete_at` has passed (documents without it, as Go's are, never expire here)."""
    delete_at = doc.get("delete_at")
    if not isinstance(delete_at, datetime):
        return True
    if delete_at.tzinfo is None:
        delete_at = delete_at.replace(tzinfo=UTC)
    return delete_at > now


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 0


# --- task states ---------------------------------------------------------------------------


def state_fields(state: TaskState, delete_at: datetime) -> Doc:
    """Every field of a state's document but `_id` (in Go's struct order), for a new document."""
    fields: Doc = {
        "task_name": state.task_name,
        "state": state.state,
        "results": results_value(state.results),
        "error": state.error,
    }
    if state.created_at is not None:
        fields.update(created_fields(state.created_at))
    if state.ttl:
        fields["ttl"] = Int64(state.ttl)
    fields.update(details_fields(state))
    fields["delete_at"] = delete_at
    return fields


#: Python-only fields of a state (Go's driver skips fields its struct lacks)
DETAILS = ("exc_type", "traceback", "progress")


def details_fields(state: TaskState) -> Doc:
    """A failure's exception type and traceback and the reported progress (as JSON text), when set."""
    out: Doc = {}
    if state.exc_type:
        out["exc_type"] = state.exc_type
    if state.traceback:
        out["traceback"] = state.traceback
    if state.progress is not None:
        out["progress"] = gojson.encode(state.progress).decode()
    return out


def state_update(state: TaskState, delete_at: datetime) -> Doc:
    """The update for a later state: it replaces the stored one, but an empty task_name or
    created_at keeps the stored value (Go's workers write neither after PENDING)."""
    fields = state_fields(state, delete_at)
    if not state.task_name:
        del fields["task_name"]
    update: Doc = {"$set": fields}
    unset = {name: "" for name in ("ttl", *DETAILS) if name not in fields}
    if unset:
        update["$unset"] = unset
    return update


def state_from_doc(doc: Doc) -> TaskState:
    raw_results = doc.get("results")
    results = [_result(r) for r in raw_results] if isinstance(raw_results, list) else None
    return TaskState(
        str(doc.get("_id", "")),
        str(doc.get("state") or ""),
        task_name=str(doc.get("task_name") or ""),
        results=results,
        error=str(doc.get("error") or ""),
        created_at=_created_at(doc),
        ttl=_int(doc.get("ttl")),
        exc_type=str(doc.get("exc_type") or ""),
        traceback=str(doc.get("traceback") or ""),
        progress=gojson.loads_or_none(doc.get("progress")),
    )



# --- group metas ---------------------------------------------------------------------------


def new_group_fields(created_at: datetime) -> Doc:
    """The fields a group document gets only when it is created (never reset by a later init)."""
    return {"chord_triggered": False, "lock": False, "created_at": created_at}


def group_from_doc(doc: Doc) -> GroupMeta:
    members = doc.get("task_uuids")
    return GroupMeta(
        str(doc.get("_id", "")),
        [str(m) for m in members] if isinstance(members, list) else [],
        chord_triggered=bool(doc.get("chord_triggered", False)),
        lock=bool(doc.get("lock", False)),
        created_at=_created_at(doc),
        ttl=_int(doc.get("ttl")),
    )


def progress(doc: Doc | None) -> tuple[int, int]:
    """(done, failed) of a group document."""
    if doc is None:
        return 0, 0
    return _int(doc.get("done")), _int(doc.get("failed"))
