"""Byte-exact Go encoding/json output: floats, HTML-safe strings and RFC 3339 times.

msgspec does the encoding; this module supplies the pieces where Go's encoder differs from
it (float notation, `<>&` and U+2028/9 escaping, `\\b`/`\\f` as `\\u00XX`, nanosecond times).
"""

from __future__ import annotations

import math
import re
import struct
import time
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import msgspec

from machinery.errors import ArgTypeError, DecodeError

_ENCODER = msgspec.json.Encoder()
_HTML = ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026"),
         ("\u2028".encode(), b"\\u2028"), ("\u2029".encode(), b"\\u2029"))
_SURROGATE = re.compile("[\ud800-\udfff]")
_SHORT_ESCAPE = re.compile(rb"\\[\\bf]")
_SHORT_MAP = {b"\\\\": b"\\\\", b"\\b": b"\\u0008", b"\\f": b"\\u000c"}
_SPECIAL = b"<>&\\\xe2"  # the bytes go_escape may have to rewrite (U+2028/9 start with 0xE2)
# printable ASCII but for the quote, backslash, `<`, `>` and `&`: a str of these is its own JSON string body
_NOT_PLAIN = re.compile(r"[^ !#-%'-;=?-\[\]-~]")


def encode(obj: Any) -> bytes:
    """Encode plain data (dicts keep their order) the way Go's json.Marshal would."""
    try:
        data = _ENCODER.encode(obj)
    except UnicodeEncodeError:
        # a lone surrogate: Go writes invalid UTF-8 as U+FFFD, so do the same
        data = _ENCODER.encode(_scrub(obj))
    except (TypeError, msgspec.EncodeError) as exc:
        raise ArgTypeError(f"value cannot be encoded as JSON: {exc}") from exc
    return go_escape(data)


def string_token(text: str) -> bytes:
    """The Go JSON string token for text (quotes included), without an encoder call when plain."""
    if _NOT_PLAIN.search(text) is None:
        return b'"' + text.encode() + b'"'
    return encode(text)


def _scrub(obj: Any) -> Any:
    if isinstance(obj, str):
        return _SURROGATE.sub("\ufffd", obj)
    if isinstance(obj, dict):
        return {_scrub(k): _scrub(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_scrub(v) for v in obj]
    return obj


def go_value(obj: Any) -> Any:
    """Plain data as Go writes an `interface{}` value: map keys sorted, floats in Go's notation."""
    if isinstance(obj, dict):
        return {str(k): go_value(obj[k]) for k in sorted(obj, key=str)}
    if isinstance(obj, list | tuple):
        return [go_value(v) for v in obj]
    if isinstance(obj, float):
        return float_raw(obj)
    return obj


def go_escape(data: bytes) -> bytes:
    """Rewrite msgspec output to Go's escaping. `<>&` never occur outside strings in JSON."""
    if len(data.translate(None, _SPECIAL)) == len(data):  # one pass: nothing to rewrite (the usual case)
        return data
    for raw, esc in _HTML:
        if raw in data:
            data = data.replace(raw, esc)
    if b"\\b" in data or b"\\f" in data:
        data = _SHORT_ESCAPE.sub(lambda m: _SHORT_MAP[m.group(0)], data)
    return data


def go_float(value: float, bits: int = 64) -> str:
    """Format a float as Go's encoding/json does for float64 (bits=64) or float32.

    Go writes the shortest decimal that reads back as the same float64 (or float32), in plain
    notation unless the magnitude is below 1e-6 or at least 1e21, where it uses `1e+21` / `1e-7`.
    """
    if math.isnan(value) or math.isinf(value):
        raise ArgTypeError(f"unsupported float value {value!r}: JSON has no NaN or Infinity")
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    if bits == 32:
        value = round32(value)
        digits = _shortest32(value)
        magnitude = abs(value)
        use_exp = magnitude < _F32_1E_6 or magnitude >= _F32_1E21
    else:
        digits = Decimal(repr(value)).normalize()
        magnitude = abs(value)
        use_exp = magnitude < 1e-6 or magnitude >= 1e21
    if use_exp:
        mant, _, exp = format(digits, "e").partition("e")
        sign = "-" if exp.startswith("-") else "+"
        return f"{mant}e{sign}{exp.lstrip('+-').lstrip('0') or '0'}"
    return format(digits, "f")


def round32(value: float) -> float:
    """The float32 nearest to value (as a Python float); overflow is an ArgTypeError."""
    try:
        result: float = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError as exc:
        raise ArgTypeError(f"{value!r} is out of range for float32") from exc
    return result


_F32_1E_6 = round32(1e-6)
_F32_1E21 = round32(1e21)
_F32_MAX_BITS = 0x7F7FFFFF


def _f32_bits_value(bits: int) -> Fraction:
    return Fraction(struct.unpack("<f", struct.pack("<I", bits))[0])


def _shortest32(value: float) -> Decimal:
    """The shortest decimal that reads back as this float32, the closest one if several (Go's 'g' -1)."""
    negative = value < 0
    v = abs(value)
    exact = Fraction(v)
    bits: int = struct.unpack("<I", struct.pack("<f", v))[0]
    below = _f32_bits_value(bits - 1) if bits > 0 else -exact
    above = (
        _f32_bits_value(bits + 1) if bits < _F32_MAX_BITS
        else exact + (exact - _f32_bits_value(bits - 1))  # one ulp above FLT_MAX
    )
    low, high = (below + exact) / 2, (exact + above) / 2
    inclusive = bits % 2 == 0  # round-half-even reads a midpoint back as the even mantissa
    top = Decimal(v).adjusted()  # exponent of the leading digit
    for precision in range(1, 10):
        scale = Fraction(10) ** (top - precision + 1)
        lo_d = math.ceil(low / scale)
        hi_d = math.floor(high / scale)
        if not inclusive:
            if lo_d * scale == low:
                lo_d += 1
            if hi_d * scale == high:
                hi_d -= 1
        if lo_d > hi_d:
            continue
        nearest = round(exact / scale)
        d = min(max(nearest, lo_d), hi_d)
        result = Decimal(d).scaleb(top - precision + 1)
        return (-result if negative else result).normalize()
    return Decimal(repr(value)).normalize()


def float_raw(value: float, bits: int = 64) -> msgspec.Raw:
    """A pre-encoded JSON number that msgspec embeds verbatim."""
    return msgspec.Raw(go_float(value, bits).encode())


# --- times -----------------------------------------------------------------------------

ZERO_TIME = "0001-01-01T00:00:00Z"
_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)


class Timestamp(datetime):
    """A datetime that remembers nanoseconds beyond the microsecond, so Go times round-trip."""

    nanosecond: int = 0

    @classmethod
    def with_nanos(cls, dt: datetime, extra_ns: int) -> Timestamp:
        ts = cls(dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second, dt.microsecond, dt.tzinfo)
        ts.nanosecond = extra_ns
        return ts


def now() -> Timestamp:
    """The current UTC time to the nanosecond, as Go's time.Now() stamps what it stores (a plain
    datetime keeps microseconds only)."""
    ns = time.time_ns()
    seconds, rest = divmod(ns, 1_000_000_000)
    return Timestamp.with_nanos(datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest // 1000), rest % 1000)


_last_time: tuple[datetime, int, str] | None = None  # format_time's last call: a batch shares one time


def format_time(dt: datetime | None) -> str:
    """RFC 3339 with nanoseconds, trailing zeros trimmed, `Z` for UTC (Go's RFC3339Nano)."""
    global _last_time
    if dt is None:
        return ZERO_TIME
    last = _last_time
    nanos = getattr(dt, "nanosecond", 0)
    if last is not None and last[0] is dt and last[1] == nanos:
        return last[2]
    text = _format_time(dt)
    _last_time = (dt, nanos, text)
    return text


def _format_time(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    frac_ns = dt.microsecond * 1000 + int(getattr(dt, "nanosecond", 0) or 0)
    base = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    if frac_ns:
        base += "." + f"{frac_ns:09d}".rstrip("0")
    offset = dt.utcoffset() or timedelta(0)
    if offset == timedelta(0) and (dt.tzinfo is UTC or _is_utc(dt)):
        return base + "Z"
    total = int(offset.total_seconds())
    sign = "-" if total < 0 else "+"
    total = abs(total)
    return f"{base}{sign}{total // 3600:02d}:{(total % 3600) // 60:02d}"


def _is_utc(dt: datetime) -> bool:
    name = dt.tzname()
    return name in ("UTC", "Z", "GMT", None) or dt.utcoffset() == timedelta(0)


def parse_time(text: str) -> Timestamp | None:
    """Parse Go's RFC 3339 output; the zero time gives None."""
    m = _TIME_RE.match(text)
    if m is None:
        raise DecodeError(f"invalid RFC 3339 time {text!r}")
    year, month, day, hour, minute, second = (int(m.group(i)) for i in range(1, 7))
    if year == 1 and month == 1 and day == 1 and hour == 0 and minute == 0 and second == 0 and not m.group(7):
        return None
    frac = (m.group(7) or "").ljust(9, "0")
    ns = int(frac)
    if m.group(8):
        tz: timezone = UTC
    else:
        delta = timedelta(hours=int(m.group(10)), minutes=int(m.group(11)))
        tz = timezone(-delta if m.group(9) == "-" else delta)
    try:
        dt = Timestamp(year, month, day, hour, minute, second, ns // 1000, tz)
    except ValueError as exc:
        raise DecodeError(f"invalid RFC 3339 time {text!r}: {exc}") from exc
    dt.nanosecond = ns % 1000
    return dt


def time_ns(dt: datetime) -> int:
    """Unix time in nanoseconds, as Go's UnixNano (naive datetimes are taken as UTC)."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    whole = int(dt.replace(microsecond=0).timestamp())
    return whole * 1_000_000_000 + dt.microsecond * 1000 + int(getattr(dt, "nanosecond", 0) or 0)


def from_ns(ns: int) -> Timestamp:
    """The UTC Timestamp for a Unix time in nanoseconds."""
    seconds, rest = divmod(ns, 1_000_000_000)
    dt = datetime.fromtimestamp(seconds, UTC).replace(microsecond=rest // 1000)
    return Timestamp.with_nanos(dt, rest % 1000)


def loads_or_none(text: Any) -> Any:
    """JSON text decoded, or None when it is not a string of JSON (a store's optional field that
    a reader should skip rather than fail on)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
