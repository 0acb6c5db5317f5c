"""TaskState and GroupMeta as DynamoDB items, in the shape Go Machinery's DynamoDB backend uses.

Attributes are Go's field names. A TaskState item: TaskUUID (S, the hash key), TaskName (S),
State (S), Results (NULL, or L of M {Type: S, Value: S}), Error (S), CreatedAt (S, RFC 3339) and
TTL (N, unix seconds; 0 = never). A GroupMeta item: GroupUUID (S, the hash key), TaskUUIDs (L of S),
ChordTriggered (BOOL), Lock (BOOL), CreatedAt (S), TTL (N). Go writes empty strings and nil slices
as NULL; both read back here as "" / None.

Result values: Go stores every value as the string `fmt.Sprintf("%v", v)`, which loses the type
("2" no longer reads as an int64). Here Value is still an S, so Go's readers see what they expect,
but it holds the value's JSON text ("2", "1.5", "true", "[1,2]"; a `string` result as the plain
string, as Go writes it), which reads back exactly with its type. Reading Go-written items, a Value
that is not valid JSON of its Type is parsed as Go's %v text ("[1 2 3]" for a slice), as far as
that text allows ([]string elements containing spaces cannot be split back).
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec

from machinery.errors import ArgTypeError, DecodeError
from machinery.tasks import gojson
from machinery.tasks.gotypes import BYTES_TYPES, FLOAT_BITS, INT_RANGES, SLICE_TYPES, stored_result_type, to_wire
from machinery.tasks.state import GroupMeta, TaskResult, TaskState

Item = dict[str, Any]

# Go's time.Time.String(): "2006-01-02 15:04:05.999999999 -0700 MST" (UpdateItem wrote it that way)
_GO_TIME_STRING = re.compile(r"^(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?) ([+-]\d{2})(\d{2})\b")


def s(text: str) -> dict[str, str]:
    return {"S": text}


def n(number: int) -> dict[str, str]:
    return {"N": str(number)}


# --- writing -------------------------------------------------------------------------------


def result_value(result: TaskResult) -> str:
    """The Value text of one result: JSON of its wire value, a `string` result as itself."""
    wire = to_wire(result.type, result.value)
    if result.type == "string":
        return str(wire)
    return gojson.encode(wire).decode()


def results_attr(results: list[TaskResult] | None) -> dict[str, Any]:
    if results is None:
        return {"NULL": True}
    return {"L": [{"M": {"Type": s(stored_result_type(r.type)), "Value": s(result_value(r))}} for r in results]}


def state_item(state: TaskState, ttl: int) -> Item:
    """The whole item for a PutItem (Go's SetStatePending shape)."""
    return {
        "TaskUUID": s(state.task_uuid),
        "TaskName": s(state.task_name),
        "State": s(state.state),
        "Results": results_attr(state.results),
        "Error": s(state.error),
        "CreatedAt": s(gojson.format_time(state.created_at)),
        "TTL": n(ttl),
        **details_attrs(state),
    }


#: Python-only attributes of a state (Go's unmarshalling skips attributes its struct lacks)
DETAILS = ("ExcType", "Traceback", "Progress")


def details_attrs(state: TaskState) -> Item:
    """A failure's exception type and traceback and the reported progress (JSON text), when set."""
    out: Item = {}
    if state.exc_type:
        out["ExcType"] = s(state.exc_type)
    if state.traceback:
        out["Traceback"] = s(state.traceback)
    if state.progress is not None:
        out["Progress"] = s(gojson.encode(state.progress).decode())
    return out


def state_update(state: TaskState, ttl: int) -> dict[str, Any]:
    """UpdateItem arguments for a later state: an empty TaskName or CreatedAt keeps the stored one."""
    names = {"#S": "State", "#R": "Results", "#E": "Error", "#T": "TTL"}
    values: dict[str, Any] = {
        ":s": s(state.state), ":r": results_attr(state.results), ":e": s(state.error), ":t": n(ttl),
    }
    sets = ["#S = :s", "#R = :r", "#E = :e", "#T = :t"]
    if state.task_name:
        names["#N"], values[":n"] = "TaskName", s(state.task_name)
        sets.append("#N = :n")
    if state.created_at is not None:
        names["#C"], values[":c"] = "CreatedAt", s(gojson.format_time(state.created_at))
        sets.append("#C = :c")
    details = details_attrs(state)
    removes = []
    for k, name in enumerate(DETAILS):
        names[f"#D{k}"] = name
        if name in details:
            values[f":d{k}"] = details[name]
            sets.append(f"#D{k} = :d{k}")
        else:
            removes.append(f"#D{k}")
    return {
        "Key": {"TaskUUID": s(state.task_uuid)},
        "UpdateExpression": "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else ""),
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
    }


def group_item(meta: GroupMeta, ttl: int) -> Item:
    return {
        "GroupUUID": s(meta.group_uuid),
        "TaskUUIDs": {"L": [s(u) for u in meta.task_uuids]},
        "ChordTriggered": {"BOOL": meta.chord_triggered},
        "Lock": {"BOOL": meta.lock},
        "CreatedAt": s(gojson.format_time(meta.created_at)),
        "TTL": n(ttl),
    }


# --- reading -------------------------------------------------------------------------------


def expires_at(item: Item) -> int:
    """The item's TTL (unix seconds), 0 when it has none."""
    attr = item.get("TTL") or {}
    try:
        return int(Decimal(attr["N"])) if "N" in attr else 0
    except (InvalidOperation, ValueError):
        return 0


def is_live(item: Item, now: float) -> bool:
    """False once the TTL has passed: DynamoDB deletes expired items only eventually (up to days)."""
    ttl = expires_at(item)
    return ttl == 0 or now < ttl


def _text(item: Item, name: str) -> str:
    attr = item.get(name) or {}
    return str(attr.get("S", ""))


def _time(item: Item, name: str) -> datetime | None:
    text = _text(item, name)
    if not text:
        return None
    go_string = _GO_TIME_STRING.match(text)
    if go_string:
        date, clock, hours, minutes = go_string.groups()
        text = f"{date}T{clock}{hours}:{minutes}"
    try:
        return gojson.parse_time(text)
    except DecodeError:
        return None


def state_from_item(item: Item) -> TaskState:
    results_attr_ = item.get("Results") or {"NULL": True}
    results = None
    if "L" in results_attr_:
        results = [_result(entry) for entry in results_attr_["L"]]
    return TaskState(
        _text(item, "TaskUUID"), _text(item, "State"), task_name=_text(item, "TaskName"), results=results,
        error=_text(item, "Error"), created_at=_time(item, "CreatedAt"),
        exc_type=_text(item, "ExcType"), traceback=_text(item, "Traceback"),
        progress=gojson.loads_or_none(_text(item, "Progress")),
    )



def group_from_item(item: Item) -> GroupMeta:
    members = (item.get("TaskUUIDs") or {}).get("L") or []
    return GroupMeta(
        _text(item, "GroupUUID"),
        [str(m.get("S", "")) for m in members],
        chord_triggered=bool((item.get("ChordTriggered") or {}).get("BOOL", False)),
        lock=bool((item.get("Lock") or {}).get("BOOL", False)),
        created_at=_time(item, "CreatedAt"),
    )


def _result(entry: dict[str, Any]) -> TaskResult:
    fields = entry.get("M") or {}
    type_name = str((fields.get("Type") or {}).get("S", ""))
    value_attr = fields.get("Value") or {"NULL": True}
    if "S" in value_attr:
        return TaskResult(type_name, typed_value(type_name, value_attr["S"]))
    return TaskResult(type_name, plain(value_attr))


def typed_value(type_name: str, text: str) -> Any:
    """The wire value a stored Value text stands for: our JSON text, else Go's %v text, else the text."""
    if type_name == "string":
        return text
    try:
        value = msgspec.json.decode(text)
        to_wire(type_name, value)
        return value
    except (msgspec.DecodeError, ArgTypeError):
        pass
    try:
        return _go_text(type_name, text)
    except (ValueError, KeyError):
        return text  # reading it fails later with a clear type error, as in Go


def _go_text(type_name: str, text: str) -> Any:
    if type_name in SLICE_TYPES:
        if not (text.startswith("[") and text.endswith("]")):
            raise ValueError(text)
        elem = "uint8" if type_name in BYTES_TYPES else type_name[2:]
        values = [_go_scalar(elem, part) for part in text[1:-1].split()]
        if type_name in BYTES_TYPES:
            return base64.b64encode(bytes(values)).decode()
        return values
    return _go_scalar(type_name, text)


def _go_scalar(type_name: str, text: str) -> Any:
    if type_name in INT_RANGES:
        return int(text)
    if type_name in FLOAT_BITS:
        return float(text)
    if type_name == "bool":
        return {"true": True, "false": False}[text]
    if type_name == "string":
        return text
    raise ValueError(type_name)


def plain(attr: dict[str, Any]) -> Any:
    """A DynamoDB attribute value as plain Python (for values Go never writes in this shape)."""
    if "S" in attr:
        return attr["S"]
    if "N" in attr:
        number = Decimal(attr["N"])
        return int(number) if number == number.to_integral_value() and "." not in attr["N"] else float(number)
    if "BOOL" in attr:
        return bool(attr["BOOL"])
    if "L" in attr:
        return [plain(v) for v in attr["L"]]
    if "M" in attr:
        return {k: plain(v) for k, v in attr["M"].items()}
    if "SS" in attr:
        return list(attr["SS"])
    return None
