"""Go Machinery's cron syntax (robfig/cron v3 `ParseStandard`), so one spec means the same in Go and Python.

Supported, as in robfig v3.0.1:

- five fields, `minute hour day-of-month month day-of-week` (no seconds field); `?` means `*`;
- numbers, `JAN`-`DEC` and `SUN`-`SAT` (any case), ranges `1-5`, steps `*/5`, `1-30/2`, `5/10`
  (= `5-max/10`), lists `1,15,30`;
- robfig's day rule: when the day-of-month *and* the day-of-week fields are both restricted a day
  matches if *either* does; when one of them starts with `*`/`?` (without a step > 1) both must match;
- descriptors `@yearly @annually @monthly @weekly @daily @midnight @hourly` and `@every <Go duration>`
  (`1s`, `1m30s`, `1.5h`, `500ms`): like robfig, durations below 1 s become 1 s and fractions of a second
  are dropped; `next(t)` is `t` truncated to the second plus the interval;
- an optional `CRON_TZ=Area/City ` or `TZ=Area/City ` prefix (IANA zone via zoneinfo); without one the
  schedule follows the machine's local zone. DST is handled the way Go's `time` package does it: a
  wall-clock time skipped by a spring-forward does not fire that day, one repeated by a fall-back may
  fire twice.

One extension: 7 is accepted as Sunday in the day-of-week field (robfig rejects it). Specs that can never
fire (`0 0 30 2 *`) are accepted by the parser, as in Go, but `next()` raises `CronError`; the periodic
scheduler calls it at registration, so such a spec fails there instead of silently never running.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import date, datetime
from fractions import Fraction
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from machinery.errors import ConfigError

__all__ = ["CronError", "EverySchedule", "Schedule", "SpecSchedule", "parse"]

_NS = 1_000_000_000
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_YEAR_LIMIT = 5  # robfig gives up after five years without a match


class CronError(ConfigError):
    """A cron spec is malformed (the message quotes the spec and says which part is wrong)."""


# --- time zones ------------------------------------------------------------------------------


class _Zone(ABC):
    """Offset lookup at an instant; the one operation the search needs from a zone."""

    name: str

    @abstractmethod
    def offset(self, ts: int) -> int:
        """Seconds east of UTC in force at Unix time `ts`."""


class _LocalZone(_Zone):
    """The machine's zone through libc, which (unlike datetime.astimezone()) knows its DST rules."""

    name = "Local"

    def offset(self, ts: int) -> int:
        return time.localtime(ts).tm_gmtoff


class _NamedZone(_Zone):
    def __init__(self, zone: ZoneInfo) -> None:
        self.zone = zone
        self.name = zone.key

    def offset(self, ts: int) -> int:
        off = datetime.fromtimestamp(ts, self.zone).utcoffset()
        return int(off.total_seconds()) if off is not None else 0


def _load_zone(spec: str, name: str) -> _Zone:
    if name == "Local":
        return _LocalZone()
    try:
        return _NamedZone(ZoneInfo(name or "UTC"))
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise CronError(f"cron spec {spec!r}: unknown time zone {name!r} (expected an IANA name "
                        f"such as UTC or Europe/Berlin)") from None


# --- schedules -------------------------------------------------------------------------------


class Schedule(ABC):
    """A parsed spec: `next(after)` is the first activation strictly after `after`."""

    spec: str

    @abstractmethod
    def next_ns(self, after_ns: int) -> int:
        """`next()` on Unix nanoseconds; raises CronError if nothing matches within five years."""

    def tick_after_ns(self, after_ns: int) -> int:
        """The scheduler's next tick: `next_ns`, except where processes must agree on ticks (see Every)."""
        return self.next_ns(after_ns)

    def next(self, after: datetime) -> datetime:
        """The next activation after `after`, in `after`'s zone (naive in, naive local time out)."""
        ts_ns = _to_ns(after)
        result = self.next_ns(ts_ns) // _NS
        if after.tzinfo is None:
            return datetime.fromtimestamp(result)
        return datetime.fromtimestamp(result, after.tzinfo)


@dataclass(frozen=True, slots=True)
class _Fields:
    year: int
    month: int
    day: int
    hour: int
    minute: int
    second: int
    weekday: int  # Go's numbering: Sunday = 0

    @property
    def clock(self) -> int:
        return self.hour * 3600 + self.minute * 60 + self.second


_Masks = tuple[int, int, int, int, int, bool, bool]
"""minute, hour, day-of-month, month, day-of-week bit sets; then whether dom / dow started with `*`."""


class SpecSchedule(Schedule):
    """A five-field spec or a calendar descriptor, as bit sets per field (robfig's SpecSchedule)."""

    def __init__(self, spec: str, zone: _Zone, fields: _Masks) -> None:
        self.spec = spec
        self.zone = zone
        self.minute, self.hour, self.dom, self.month, self.dow, self.dom_star, self.dow_star = fields

    def __repr__(self) -> str:
        return f"SpecSchedule({self.spec!r})"

    def next_ns(self, after_ns: int) -> int:
        found = self._search(after_ns // _NS + 1)
        if found is None:
            raise CronError(f"cron spec {self.spec!r}: no matching time within {_YEAR_LIMIT} years "
                            f"(e.g. a day that does not exist in the given months)")
        return found * _NS

    # The search mirrors robfig's SpecSchedule.Next field by field, including its DST corrections, on
    # integer Unix seconds; `fields()` reads the wall clock and `date()` is Go's normalising time.Date.

    def _fields(self, ts: int) -> _Fields:
        wall = ts + self.zone.offset(ts)
        days, secs = divmod(wall, 86400)
        d = date.fromordinal(_EPOCH_ORDINAL + days)
        hour, rest = divmod(secs, 3600)
        minute, second = divmod(rest, 60)
        return _Fields(d.year, d.month, d.day, hour, minute, second, (d.weekday() + 1) % 7)

    def _date(self, year: int, month: int, day: int, clock: int = 0) -> int:
        """Go's time.Date(year, month, day, clock seconds into the day) with month/day overflow."""
        year += (month - 1) // 12
        month = (month - 1) % 12 + 1
        days = date(year, month, 1).toordinal() - _EPOCH_ORDINAL + day - 1
        wall = days * 86400 + clock
        # Go's time.Date: take the offset in force at the instant the wall time would be if it were UTC,
        # then re-check with the offset at the instant that gives (decides skipped/repeated wall times).
        return wall - self.zone.offset(wall - self.zone.offset(wall))

    def _day_matches(self, f: _Fields) -> bool:
        dom_match = bool(self.dom >> f.day & 1)
        dow_match = bool(self.dow >> f.weekday & 1)
        if self.dom_star or self.dow_star:
            return dom_match and dow_match
        return dom_match or dow_match

    def _search(self, t: int) -> int | None:
        year_limit = self._fields(t).year + _YEAR_LIMIT
        added = False
        while True:  # each `continue` is robfig's "goto WRAP"
            f = self._fields(t)
            if f.year > year_limit:
                return None
            wrapped = False
            while not self.month >> f.month & 1:
                if not added:
                    added = True
                    t = self._date(f.year, f.month, 1)
                    f = self._fields(t)
                t = self._date(f.year, f.month + 1, f.day, f.clock)
                f = self._fields(t)
                if f.month == 1:
                    wrapped = True
                    break
            if wrapped:
                continue
            while not self._day_matches(f):
                if not added:
                    added = True
                    t = self._date(f.year, f.month, f.day)
                    f = self._fields(t)
                t = self._date(f.year, f.month, f.day + 1, f.clock)
                f = self._fields(t)
                if f.hour != 0:  # midnight skipped or doubled by DST
                    t += (24 - f.hour) * 3600 if f.hour > 12 else -f.hour * 3600
                    f = self._fields(t)
                if f.day == 1:
                    wrapped = True
                    break
            if wrapped:
                continue
            while not self.hour >> f.hour & 1:
                if not added:
                    added = True
                    t = self._date(f.year, f.month, f.day, f.hour * 3600)
                t += 3600
                f = self._fields(t)
                if f.hour == 0:
                    wrapped = True
                    break
            if wrapped:
                continue
            while not self.minute >> f.minute & 1:
                if not added:
                    added = True
                    t -= t % 60
                t += 60
                f = self._fields(t)
                if f.minute == 0:
                    wrapped = True
                    break
            if wrapped:
                continue
            while f.second != 0:  # the standard parser's seconds field is always 0
                added = True
                t += 1
                f = self._fields(t)
                if f.second == 0:
                    wrapped = True
                    break
            if wrapped:
                continue
            return t


class EverySchedule(Schedule):
    """`@every <duration>`: robfig's ConstantDelaySchedule (whole seconds, at least one)."""

    def __init__(self, spec: str, delay_seconds: int) -> None:
        self.spec = spec
        self.delay_seconds = delay_seconds

    def __repr__(self) -> str:
        return f"EverySchedule({self.spec!r}, delay_seconds={self.delay_seconds})"

    def next_ns(self, after_ns: int) -> int:
        return (after_ns // _NS + self.delay_seconds) * _NS

    def tick_after_ns(self, after_ns: int) -> int:
        """Multiples of the interval since the Unix epoch.

        robfig counts from each process's start, so two processes started a few seconds apart would have
        different ticks; aligned ticks let every process compute the same tick (and the same lock key).
        """
        step = self.delay_seconds * _NS
        return (after_ns // step + 1) * step


# --- parser ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bounds:
    name: str
    low: int
    high: int
    names: dict[str, int]
    hint: str


_MONTH_NAMES = {n: i + 1 for i, n in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_DOW_NAMES = {n: i for i, n in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_FIELDS = (
    _Bounds("minute", 0, 59, {}, "0-59"),
    _Bounds("hour", 0, 23, {}, "0-23"),
    _Bounds("day-of-month", 1, 31, {}, "1-31"),
    _Bounds("month", 1, 12, _MONTH_NAMES, "1-12 or JAN-DEC"),
    _Bounds("day-of-week", 0, 6, _DOW_NAMES, "0-7 or SUN-SAT"),
)
_DIGITS = re.compile(r"[0-9]+")


def _bits(low: int, high: int, step: int) -> int:
    out = 0
    for i in range(low, high + 1, step):
        out |= 1 << i
    return out


def _all(b: _Bounds) -> int:
    return _bits(b.low, b.high, 1)


_DESCRIPTORS: dict[str, _Masks] = {
    # minute, hour, dom, month, dow, dom_star, dow_star
    "@yearly": (1, 1, 1 << 1, 1 << 1, _all(_FIELDS[4]), False, True),
    "@annually": (1, 1, 1 << 1, 1 << 1, _all(_FIELDS[4]), False, True),
    "@monthly": (1, 1, 1 << 1, _all(_FIELDS[3]), _all(_FIELDS[4]), False, True),
    "@weekly": (1, 1, _all(_FIELDS[2]), _all(_FIELDS[3]), 1, True, False),
    "@daily": (1, 1, _all(_FIELDS[2]), _all(_FIELDS[3]), _all(_FIELDS[4]), True, True),
    "@midnight": (1, 1, _all(_FIELDS[2]), _all(_FIELDS[3]), _all(_FIELDS[4]), True, True),
    "@hourly": (1, _all(_FIELDS[1]), _all(_FIELDS[2]), _all(_FIELDS[3]), _all(_FIELDS[4]), True, True),
}


def parse(spec: str) -> Schedule:
    """Parse a Machinery (robfig ParseStandard) spec; raises CronError naming the faulty part."""
    if not isinstance(spec, str):
        raise CronError(f"cron spec must be a string, got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise CronError("cron spec '': empty spec")
    zone: _Zone = _LocalZone()
    if text.startswith(("TZ=", "CRON_TZ=")):
        prefix, _, rest = text.partition(" ")
        if not rest.strip():
            raise CronError(f"cron spec {spec!r}: {prefix!r} must be followed by a space and a schedule")
        zone = _load_zone(spec, prefix.partition("=")[2])
        text = rest.strip()
    if text.startswith("@"):
        return _parse_descriptor(spec, text, zone)
    parts = text.split()
    if len(parts) != 5:
        extra = "; a seconds field is not supported" if len(parts) == 6 else ""
        raise CronError(f"cron spec {spec!r}: expected 5 fields (minute hour day-of-month month "
                        f"day-of-week), found {len(parts)}{extra}")
    masks: list[int] = []
    stars: list[bool] = []
    for part, bounds in zip(parts, _FIELDS, strict=True):
        mask, star = _parse_field(spec, part, bounds)
        masks.append(mask)
        stars.append(star)
    return SpecSchedule(spec, zone, (masks[0], masks[1], masks[2], masks[3], masks[4], stars[2], stars[4]))


def _parse_descriptor(spec: str, text: str, zone: _Zone) -> Schedule:
    if text.startswith("@every"):
        if not text.startswith("@every ") or not text[7:].strip():
            raise CronError(f"cron spec {spec!r}: @every needs a duration, e.g. '@every 1m30s'")
        nanos = _parse_go_duration(spec, text[7:].strip())
        seconds = max(nanos, _NS) // _NS  # robfig: below 1 s -> 1 s, then whole seconds only
        return EverySchedule(spec, seconds)
    fields = _DESCRIPTORS.get(text)
    if fields is None:
        raise CronError(f"cron spec {spec!r}: unknown descriptor {text!r}; expected one of "
                        f"{', '.join(_DESCRIPTORS)} or @every <duration>")
    return SpecSchedule(spec, zone, fields)


def _parse_field(spec: str, field: str, b: _Bounds) -> tuple[int, bool]:
    mask = 0
    star = False
    for item in field.split(","):
        if not item:
            raise CronError(f"cron spec {spec!r}: {b.name} field {field!r} has an empty list item")
        bits, item_star = _parse_range(spec, item, b)
        mask |= bits
        star = star or item_star
    return mask, star


def _parse_range(spec: str, expr: str, b: _Bounds) -> tuple[int, bool]:
    """robfig's getRange: `*`, `N`, `N-M`, each with an optional `/step` (`N/step` = `N-max/step`)."""
    range_part, slash, step_part = expr.partition("/")
    if "/" in step_part:
        raise CronError(f"cron spec {spec!r}: {b.name} {expr!r} has too many slashes")
    dow = b.name == "day-of-week"
    star = range_part in ("*", "?")
    if star:
        low, high = b.low, b.high
    else:
        low_text, dash, high_text = range_part.partition("-")
        if "-" in high_text:
            raise CronError(f"cron spec {spec!r}: {b.name} {expr!r} has too many hyphens")
        low = _value(spec, low_text, b, expr)
        high = _value(spec, high_text, b, expr) if dash else low
    step = 1
    if slash:
        if not _DIGITS.fullmatch(step_part):
            raise CronError(f"cron spec {spec!r}: {b.name} step {step_part!r} in {expr!r} is not a number")
        step = int(step_part)
        if step == 0:
            raise CronError(f"cron spec {spec!r}: {b.name} step in {expr!r} must be positive")
        if not star and "-" not in range_part:
            high = b.high
        if step > 1:
            star = False
    if low > high:
        raise CronError(f"cron spec {spec!r}: {b.name} range {expr!r} starts at {low}, after its end {high}")
    bits = _bits(low, high, step)
    if dow and bits >> 7 & 1:  # 7 is Sunday too
        bits = (bits & ~(1 << 7)) | 1
    return bits, star


def _value(spec: str, text: str, b: _Bounds, expr: str) -> int:
    named = b.names.get(text.lower())
    if named is not None:
        return named
    if not _DIGITS.fullmatch(text):
        what = f"a number or a name ({b.hint})" if b.names else f"a number ({b.hint})"
        raise CronError(f"cron spec {spec!r}: {b.name} value {text!r} in {expr!r} is not {what}")
    value = int(text)
    high = 7 if b.name == "day-of-week" else b.high
    if not b.low <= value <= high:
        raise CronError(f"cron spec {spec!r}: {b.name} value {value} out of range {b.hint}")
    return value


_DURATION_UNITS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": _NS,
                   "m": 60 * _NS, "h": 3600 * _NS}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_MAX_INT64 = (1 << 63) - 1


def _parse_go_duration(spec: str, text: str) -> int:
    """Go's time.ParseDuration, to nanoseconds (`1h30m`, `1.5s`, `500ms`, `0`)."""
    body = text[1:] if text[:1] in "+-" else text
    negative = text.startswith("-")
    if body == "0":
        return 0
    total = Fraction(0)
    pos = 0
    if not body:
        pos = -1
    while 0 <= pos < len(body):
        m = _DURATION_PART.match(body, pos)
        if m is None or m.group(1) in ("", "."):
            pos = -1
            break
        total += Fraction(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos < 0:
        raise CronError(f"cron spec {spec!r}: invalid @every duration {text!r} (expected a Go duration "
                        f"such as 30s, 1m30s, 1.5h or 500ms; units ns us ms s m h)")
    nanos = int(total)
    if nanos > _MAX_INT64:
        raise CronError(f"cron spec {spec!r}: @every duration {text!r} is too long")
    return -nanos if negative else nanos


def _to_ns(t: datetime) -> int:
    """Unix nanoseconds of `t` (naive = local time), exact to the microsecond."""
    whole = int(t.replace(microsecond=0).timestamp())
    return whole * _NS + t.microsecond * 1000
