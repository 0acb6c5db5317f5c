"""Machinery's argument and result type strings: checking, converting and inferring them.

Go Machinery truncates out-of-range integers silently and panics on some malformed values;
here every conversion is checked and fails with an ArgTypeError that names the value and type.
"""

from __future__ import annotations

import base64
import binascii
import collections.abc
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

from machinery.errors import ArgTypeError
from machinery.tasks.gojson import float_raw, round32

INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "int": (-(2**63), 2**63 - 1),
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint": (0, 2**64 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
}
FLOAT_BITS: Final[dict[str, int]] = {"float32": 32, "float64": 64}
SCALAR_TYPES: Final[frozenset[str]] = frozenset([*INT_RANGES, *FLOAT_BITS, "bool", "string"])
BYTES_TYPES: Final[frozenset[str]] = frozenset(["[]byte", "[]uint8"])
SLICE_TYPES: Final[frozenset[str]] = frozenset(
    [f"[]{t}" for t in SCALAR_TYPES if t != "uint8"] + list(BYTES_TYPES)
)
JSON_TYPE: Final = "json"
"""Python-only extension: any JSON value (dict, None, nested lists). Go workers cannot read it."""
SUPPORTED_TYPES: Final[frozenset[str]] = SCALAR_TYPES | SLICE_TYPES | {JSON_TYPE}


def check_type_name(name: str) -> str:
    if name not in SUPPORTED_TYPES:
        raise ArgTypeError(f"{name} is not one of supported types")
    return name


@dataclass(frozen=True, slots=True)
class GoType:
    """Marks an annotation with the Machinery type string to use, e.g. Annotated[int, GoType("int32")]."""

    name: str

    def __post_init__(self) -> None:
        check_type_name(self.name)


Int8 = Annotated[int, GoType("int8")]
Int16 = Annotated[int, GoType("int16")]
Int32 = Annotated[int, GoType("int32")]
Int64 = Annotated[int, GoType("int64")]
Uint8 = Annotated[int, GoType("uint8")]
Uint16 = Annotated[int, GoType("uint16")]
Uint32 = Annotated[int, GoType("uint32")]
Uint64 = Annotated[int, GoType("uint64")]
Float32 = Annotated[float, GoType("float32")]


# --- wire value -> Python ------------------------------------------------------------------


def to_python(type_name: str, value: Any) -> Any:
    """Convert a decoded JSON value of the given Machinery type to the Python value a task receives."""
    if type_name in INT_RANGES:
        return _to_int(type_name, value)
    if type_name == "string":
        if not isinstance(value, str):
            raise ArgTypeError(f"{_show(value)} is not string")
        return value
    if type_name in FLOAT_BITS:
        return _to_float(type_name, value)
    if type_name == "bool":
        if not isinstance(value, bool):
            raise ArgTypeError(f"{_show(value)} is not bool")
        return value
    if type_name in BYTES_TYPES:
        return _to_bytes(type_name, value)
    if type_name in SLICE_TYPES:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ArgTypeError(f"{_show(value)} is not {type_name}: expected a JSON array")
        elem = type_name[2:]
        return [to_python(elem, v) for v in value]
    if type_name == JSON_TYPE:
        return value
    raise ArgTypeError(f"{type_name} is not one of supported types")


def _to_int(type_name: str, value: Any) -> int:
    # Go reads integers with json.Number.Int64 / strconv.ParseUint: `1.5`, `2.0` and `1e3` are errors
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgTypeError(f"{_show(value)} is not {type_name}")
    lo, hi = INT_RANGES[type_name]
    if not lo <= value <= hi:
        raise ArgTypeError(f"{value} is out of range for {type_name} [{lo}, {hi}]")
    return int(value)


def _to_float(type_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ArgTypeError(f"{_show(value)} is not {type_name}")
    try:
        result = float(value)
    except OverflowError:
        raise ArgTypeError(f"{_show(value)} is out of range for {type_name}") from None
    if type_name == "float32" and not math.isinf(result):
        # the value a float32 holds (0.1 reads as 0.10000000149011612, as in Go); too big is an error
        return round32(result)
    return result


def _to_bytes(type_name: str, value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:  # ValueError: not ASCII
            raise ArgTypeError(f"{_show(value)} is not {type_name}: invalid base64") from exc
    if isinstance(value, list):
        return bytes(_to_int("uint8", v) for v in value)
    raise ArgTypeError(f"{_show(value)} is not {type_name}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_declared(type_name: str, value: Any) -> Any:
    """Check an already converted argument against the type its parameter declares."""
    if type_name in BYTES_TYPES:
        if isinstance(value, bytes | bytearray):
            return bytes(value)
        raise ArgTypeError(f"{_show(value)} is not {type_name}")
    if type_name in SLICE_TYPES:
        if not isinstance(value, list):
            raise ArgTypeError(f"{_show(value)} is not {type_name}")
        return [check_declared(type_name[2:], v) for v in value]
    return to_python(type_name, value)


# --- Python -> wire value ------------------------------------------------------------------


def to_wire(type_name: str, value: Any) -> Any:
    """Check a Python value against its type and give what the JSON encoder should write."""
    if type_name in INT_RANGES:
        return _to_int(type_name, value)
    if type_name in FLOAT_BITS:
        return float_raw(_to_float(type_name, value), FLOAT_BITS[type_name])
    if type_name in ("string", "bool"):
        return to_python(type_name, value)
    if type_name in BYTES_TYPES:
        if isinstance(value, bytes | bytearray | memoryview):
            return base64.b64encode(bytes(value)).decode()
        if value is None:
            return None
        return base64.b64encode(_to_bytes(type_name, value)).decode()
    if type_name in SLICE_TYPES:
        if value is None:
            return None
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ArgTypeError(f"{_show(value)} is not {type_name}: expected a list")
        elem = type_name[2:]
        return [to_wire(elem, v) for v in value]
    if type_name == JSON_TYPE:
        try:
            msgspec.json.encode(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise ArgTypeError(f"{_show(value)} cannot be encoded as JSON: {exc}") from exc
        return value
    raise ArgTypeError(f"{type_name} is not one of supported types")


def stored_result_type(type_name: str) -> str:
    """The type string a stored result carries: Go names a result's type by reflection, where
    []byte is []uint8, so results are stored as Go stores them (both spellings read back alike)."""
    return "[]uint8" if type_name == "[]byte" else type_name


# --- inference -----------------------------------------------------------------------------

_SCALAR_OF: Final[dict[type, str]] = {bool: "bool", int: "int64", float: "float64", str: "string"}


def infer_type(value: Any) -> str:
    """The Machinery type for a plain Python value; values Go cannot type use the `json` extension."""
    kind = _SCALAR_OF.get(type(value))
    if kind == "int64":
        return _int_kind(value)
    if kind is not None:
        return kind
    if isinstance(value, bytes | bytearray | memoryview):
        return "[]byte"
    if isinstance(value, list | tuple) and value:
        kinds = {_SCALAR_OF.get(type(v)) for v in value}
        if len(kinds) == 1:
            (only,) = kinds
            if only == "int64":
                int_kinds = {_int_kind(v) for v in value}
                if int_kinds == {"int64"}:
                    return "[]int64"
                if JSON_TYPE not in int_kinds and all(v >= 0 for v in value):
                    return "[]uint64"
                return JSON_TYPE
            if only is not None:
                return f"[]{only}"
    return JSON_TYPE


def _int_kind(value: int) -> str:
    """int64 when it fits, else uint64, else only the `json` extension can carry it."""
    if INT_RANGES["int64"][0] <= value <= INT_RANGES["int64"][1]:
        return "int64"
    return "uint64" if 0 <= value <= INT_RANGES["uint64"][1] else JSON_TYPE


def type_from_annotation(annotation: Any) -> str | None:
    """The Machinery type an annotation asks for, or None to fall back to the value."""
    if annotation is None or annotation is Any:
        return None
    if isinstance(annotation, str):
        return None
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        for meta in annotation.__metadata__:
            if isinstance(meta, GoType):
                return meta.name
        return type_from_annotation(annotation.__origin__)
    if annotation in _SCALAR_OF:
        return _SCALAR_OF[annotation]
    if annotation in (bytes, bytearray):
        return "[]byte"
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        params = typing.get_args(annotation)
        if params and (len(params) == 1 or (len(params) == 2 and params[1] is Ellipsis)):
            inner = type_from_annotation(params[0])
            if inner in SCALAR_TYPES and inner not in ("uint8",):
                return f"[]{inner}"
        return None
    if origin in (types.UnionType, typing.Union):
        return None
    if annotation in (dict, type(None)) or origin is dict:
        return JSON_TYPE
    return None
