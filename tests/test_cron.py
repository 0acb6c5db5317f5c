"""Machinery's cron syntax (robfig/cron v3 ParseStandard).

The expected times in NEXT_CASES were produced by Go's robfig/cron v3.0.1 itself (Debian's
golang-github-robfig-cron-dev), except `* * 7`, a Python extension checked against `* * 0`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from machinery.cron import CronError, EverySchedule, SpecSchedule, parse
from machinery.errors import ConfigError

NEXT_CASES = [
    ('CRON_TZ=UTC * * * * *', '2024-01-01T00:00:00+00:00', '2024-01-01T00:01:00+00:00'),
    ('CRON_TZ=UTC * * * * *', '2024-01-01T00:00:59.999999+00:00', '2024-01-01T00:01:00+00:00'),
    ('CRON_TZ=UTC 0 * * * *', '2024-01-01T10:00:00+00:00', '2024-01-01T11:00:00+00:00'),
    ('CRON_TZ=UTC */5 * * * *', '2024-01-01T10:02:30+00:00', '2024-01-01T10:05:00+00:00'),
    ('CRON_TZ=UTC 5/10 * * * *', '2024-01-01T10:16:00+00:00', '2024-01-01T10:25:00+00:00'),
    ('CRON_TZ=UTC 1-30/2 * * * *', '2024-01-01T10:30:00+00:00', '2024-01-01T11:01:00+00:00'),
    ('CRON_TZ=UTC 0,15,30,45 * * * *', '2024-01-01T10:46:00+00:00', '2024-01-01T11:00:00+00:00'),
    ('CRON_TZ=UTC 0 6 * * ?', '2024-01-01T06:00:00+00:00', '2024-01-02T06:00:00+00:00'),
    ('CRON_TZ=UTC 0 6 ? * *', '2024-01-01T05:59:59+00:00', '2024-01-01T06:00:00+00:00'),
    ('CRON_TZ=UTC 30 8 * * MON-FRI', '2024-01-05T09:00:00+00:00', '2024-01-08T08:30:00+00:00'),
    ('CRON_TZ=UTC 30 8 * * mon-fri', '2024-01-06T09:00:00+00:00', '2024-01-08T08:30:00+00:00'),
    ('CRON_TZ=UTC 0 0 * * 0', '2024-01-01T00:00:00+00:00', '2024-01-07T00:00:00+00:00'),
    ('CRON_TZ=UTC 0 0 * * 7', '2024-01-01T00:00:00+00:00', '2024-01-07T00:00:00+00:00'),
    ('CRON_TZ=UTC 0 0 * * SUN', '2024-01-01T00:00:00+00:00', '2024-01-07T00:00:00+00:00'),
    ('CRON_TZ=UTC 0 0 1 JAN *', '2024-01-01T00:00:00+00:00', '2025-01-01T00:00:00+00:00'),
    ('CRON_TZ=UTC 0 0 1 jan,Jul *', '2024-01-01T00:00:00+00:00', '2024-07-01T00:00:00+00:00'),
    ('CRON_TZ=UTC 0 0 31 * *', '2024-02-01T00:00:00+00:00', '2024-03-31T00:00:00+00:00'),
    ('CRON_TZ=UTC 0 0 29 2 *', '2024-03-01T00:00:00+00:00', '2028-02-29T00:00:00+00:00'),
    ('CRON_TZ=UTC 0 12 13 * FRI', '2024-01-01T00:00:00+00:00', '2024-01-05T12:00:00+00:00'),
    ('CRON_TZ=UTC 0 12 13 * FRI', '2024-01-06T00:00:00+00:00', '2024-01-12T12:00:00+00:00'),
    ('CRON_TZ=UTC 0 12 */2 * *', '2024-01-01T13:00:00+00:00', '2024-01-03T12:00:00+00:00'),
    ('CRON_TZ=UTC 0 12 * * */2', '2024-01-01T13:00:00+00:00', '2024-01-02T12:00:00+00:00'),
    ('CRON_TZ=UTC 0 12 1 * */1', '2024-01-02T00:00:00+00:00', '2024-02-01T12:00:00+00:00'),
    ('CRON_TZ=UTC 59 23 31 12 *', '2024-06-15T00:00:00+00:00', '2024-12-31T23:59:00+00:00'),
    ('CRON_TZ=UTC 0 9-17/4 * * *', '2024-01-01T09:00:00+00:00', '2024-01-01T13:00:00+00:00'),
    ('TZ=UTC 15 * * * *', '2024-01-01T00:20:00+00:00', '2024-01-01T01:15:00+00:00'),
    ('CRON_TZ=UTC @yearly', '2024-05-05T05:05:05+00:00', '2025-01-01T00:00:00+00:00'),
    ('CRON_TZ=UTC @annually', '2024-05-05T05:05:05+00:00', '2025-01-01T00:00:00+00:00'),
    ('CRON_TZ=UTC @monthly', '2024-05-05T05:05:05+00:00', '2024-06-01T00:00:00+00:00'),
    ('CRON_TZ=UTC @weekly', '2024-05-05T05:05:05+00:00', '2024-05-12T00:00:00+00:00'),
    ('CRON_TZ=UTC @daily', '2024-05-05T05:05:05+00:00', '2024-05-06T00:00:00+00:00'),
    ('CRON_TZ=UTC @midnight', '2024-05-05T05:05:05+00:00', '2024-05-06T00:00:00+00:00'),
    ('CRON_TZ=UTC @hourly', '2024-05-05T05:05:05+00:00', '2024-05-05T06:00:00+00:00'),
    ('@every 1s', '2024-05-05T05:05:05.250000+00:00', '2024-05-05T05:05:06+00:00'),
    ('@every 1m30s', '2024-05-05T05:05:05.250000+00:00', '2024-05-05T05:06:35+00:00'),
    ('@every 1h', '2024-05-05T05:05:05+00:00', '2024-05-05T06:05:05+00:00'),
    ('@every 500ms', '2024-05-05T05:05:05.750000+00:00', '2024-05-05T05:05:06+00:00'),
    ('@every 1.5s', '2024-05-05T05:05:05+00:00', '2024-05-05T05:05:06+00:00'),
    ('@every 2h3m4.9s', '2024-05-05T05:05:05+00:00', '2024-05-05T07:08:09+00:00'),
    ('@every 0', '2024-05-05T05:05:05+00:00', '2024-05-05T05:05:06+00:00'),
    ('@every 90000us', '2024-05-05T05:05:05+00:00', '2024-05-05T05:05:06+00:00'),
    ('CRON_TZ=Europe/Berlin 0 9 * * *', '2024-06-01T08:00:00+00:00', '2024-06-02T07:00:00+00:00'),
    ('CRON_TZ=Europe/Berlin 0 9 * * *', '2024-01-15T08:00:00+00:00', '2024-01-16T08:00:00+00:00'),
    ('CRON_TZ=Europe/Berlin 30 2 * * *', '2024-03-30T12:00:00+00:00', '2024-04-01T00:30:00+00:00'),
    ('CRON_TZ=Europe/Berlin 30 2 * * *', '2024-10-27T00:00:00+00:00', '2024-10-27T00:30:00+00:00'),
    ('CRON_TZ=Europe/Berlin 30 2 * * *', '2024-10-27T00:31:00+00:00', '2024-10-27T01:30:00+00:00'),
    ('CRON_TZ=America/New_York 0 * * * *', '2024-03-10T06:30:00+00:00', '2024-03-10T07:00:00+00:00'),
    ('CRON_TZ=America/New_York 30 1 * * *', '2024-11-03T05:31:00+00:00', '2024-11-03T06:30:00+00:00'),
    ('CRON_TZ=Asia/Kolkata 0 0 * * *', '2024-01-01T00:00:00+00:00', '2024-01-01T18:30:00+00:00'),
    ('CRON_TZ=Asia/Tokyo @daily', '2024-01-01T00:00:00+00:00', '2024-01-01T15:00:00+00:00'),
]


@pytest.mark.parametrize(("spec", "after", "expected"), NEXT_CASES)
def test_next_matches_robfig(spec: str, after: str, expected: str) -> None:
    got = parse(spec).next(datetime.fromisoformat(after))
    assert got == datetime.fromisoformat(expected)
    assert got.utcoffset() == timedelta(0)  # returned in the zone of `after`


def test_next_ns_agrees_with_next() -> None:
    sched = parse("CRON_TZ=UTC */5 * * * *")
    after = datetime(2024, 1, 1, 10, 2, 30, tzinfo=UTC)
    assert sched.next_ns(int(after.timestamp()) * 10**9) == int(sched.next(after).timestamp()) * 10**9


def test_result_keeps_the_zone_of_after() -> None:
    berlin = timezone(timedelta(hours=2))
    got = parse("CRON_TZ=UTC 0 12 * * *").next(datetime(2024, 6, 1, 15, 0, tzinfo=berlin))
    assert got.tzinfo is berlin
    assert got == datetime(2024, 6, 2, 12, 0, tzinfo=UTC)


def test_chained_ticks_through_a_dst_change() -> None:
    """New York, spring forward on 2024-03-10: 02:xx does not exist, so '30 2' skips that day."""
    sched = parse("CRON_TZ=America/New_York 30 2 * * *")
    t = datetime(2024, 3, 8, 12, 0, tzinfo=UTC)
    out = []
    for _ in range(4):
        t = sched.next(t)
        out.append(t.isoformat())
    assert out == [
        "2024-03-09T07:30:00+00:00",  # 02:30 EST
        "2024-03-11T06:30:00+00:00",  # 02:30 EDT: the 10th had no 02:30
        "2024-03-12T06:30:00+00:00",
        "2024-03-13T06:30:00+00:00",
    ]


@pytest.fixture
def new_york_local() -> Iterator[None]:
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.usefixtures("new_york_local")
def test_default_zone_is_local() -> None:
    sched = parse("0 9 * * *")
    # naive in, naive local out
    assert sched.next(datetime(2024, 7, 1, 8, 0)) == datetime(2024, 7, 1, 9, 0)
    # aware in: the schedule still follows local time (09:00 EDT = 13:00 UTC), the result is in UTC
    assert sched.next(datetime(2024, 7, 1, 12, 0, tzinfo=UTC)) == datetime(2024, 7, 1, 13, 0, tzinfo=UTC)
    assert sched.next(datetime(2024, 1, 10, 12, 0, tzinfo=UTC)) == datetime(2024, 1, 10, 14, 0, tzinfo=UTC)
    # a named zone overrides local
    assert parse("CRON_TZ=UTC 0 9 * * *").next(datetime(2024, 7, 1, 4, 0)) == datetime(2024, 7, 1, 5, 0)


def test_types() -> None:
    assert isinstance(parse("* * * * *"), SpecSchedule)
    assert isinstance(parse("@daily"), SpecSchedule)
    every = parse("@every 1m30s")
    assert isinstance(every, EverySchedule)
    assert every.delay_seconds == 90


@pytest.mark.parametrize(("duration", "seconds"), [
    ("1s", 1), ("500ms", 1), ("1ns", 1), ("0", 1), ("-5s", 1), ("1.5s", 1), ("1.999s", 1),
    ("1m30s", 90), ("1h", 3600), ("1.5h", 5400), ("2h3m4.9s", 7384), ("90000us", 1), ("2500µs", 1),
    ("3000ms", 3), ("+2s", 2), ("1h0m0s", 3600), ("36h", 129600),
])
def test_every_rounds_like_robfig(duration: str, seconds: int) -> None:
    sched = parse(f"@every {duration}")
    assert isinstance(sched, EverySchedule)
    assert sched.delay_seconds == seconds


def test_every_ticks_align_to_the_epoch() -> None:
    """The scheduler's ticks for @every are multiples of the interval, the same in every process."""
    sched = parse("@every 1m30s")
    after = 1_700_000_005 * 10**9 + 123
    tick = sched.tick_after_ns(after)
    assert tick % (90 * 10**9) == 0
    assert after < tick <= after + 90 * 10**9
    assert sched.tick_after_ns(tick) == tick + 90 * 10**9
    # cron specs: the scheduler's tick is next()
    cron_sched = parse("CRON_TZ=UTC */5 * * * *")
    assert cron_sched.tick_after_ns(after) == cron_sched.next_ns(after)


def test_names_are_case_insensitive_and_sunday_is_0_or_7() -> None:
    after = datetime(2024, 1, 1, tzinfo=UTC)
    a = parse("CRON_TZ=UTC 0 0 * jAn,FEB sUn").next(after)
    b = parse("CRON_TZ=UTC 0 0 * 1,2 7").next(after)
    c = parse("CRON_TZ=UTC 0 0 * 1-2 0").next(after)
    assert a == b == c == datetime(2024, 1, 7, tzinfo=UTC)
    # 5-7 is Friday, Saturday, Sunday
    sched = parse("CRON_TZ=UTC 0 0 * * 5-7")
    days = []
    t = after
    for _ in range(3):
        t = sched.next(t)
        days.append(t.day)
    assert days == [5, 6, 7]


def test_whitespace_is_free() -> None:
    after = datetime(2024, 1, 1, tzinfo=UTC)
    assert parse("  CRON_TZ=UTC   0  6\t* *  ? ").next(after) == datetime(2024, 1, 1, 6, tzinfo=UTC)


BAD_SPECS = [
    ("61 * * * *", "cron spec '61 * * * *': minute value 61 out of range 0-59"),
    ("* 24 * * *", "hour value 24 out of range 0-23"),
    ("* * 0 * *", "day-of-month value 0 out of range 1-31"),
    ("* * 32 * *", "day-of-month value 32 out of range 1-31"),
    ("* * * 13 *", "month value 13 out of range 1-12 or JAN-DEC"),
    ("* * * * 8", "day-of-week value 8 out of range 0-7 or SUN-SAT"),
    ("* * * FOO *", "month value 'FOO' in 'FOO' is not a number or a name (1-12 or JAN-DEC)"),
    ("* * * * MONDAY", "day-of-week value 'MONDAY' in 'MONDAY' is not a number or a name"),
    ("x * * * *", "minute value 'x' in 'x' is not a number (0-59)"),
    ("-1 * * * *", "minute value '' in '-1' is not a number"),
    ("5-1 * * * *", "minute range '5-1' starts at 5, after its end 1"),
    ("1-2-3 * * * *", "minute '1-2-3' has too many hyphens"),
    ("*/5/2 * * * *", "minute '*/5/2' has too many slashes"),
    ("*/0 * * * *", "minute step in '*/0' must be positive"),
    ("*/x * * * *", "minute step 'x' in '*/x' is not a number"),
    ("1,,2 * * * *", "minute field '1,,2' has an empty list item"),
    ("* * * *", "expected 5 fields (minute hour day-of-month month day-of-week), found 4"),
    ("0 * * * * *", "found 6; a seconds field is not supported"),
    ("", "empty spec"),
    ("   ", "empty spec"),
    ("@often", "unknown descriptor '@often'"),
    ("@Daily", "unknown descriptor '@Daily'"),
    ("@every", "@every needs a duration"),
    ("@every 1x", "invalid @every duration '1x'"),
    ("@every 10", "invalid @every duration '10'"),
    ("@every .s", "invalid @every duration '.s'"),
    ("CRON_TZ=Mars/Olympus 0 0 * * *", "unknown time zone 'Mars/Olympus'"),
    ("CRON_TZ=UTC", "'CRON_TZ=UTC' must be followed by a space and a schedule"),
    ("TZ=UTC 61 * * * *", "minute value 61 out of range 0-59"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_specs_say_what_and_where(spec: str, message: str) -> None:
    with pytest.raises(CronError) as info:
        parse(spec)
    assert message in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_spec_that_never_fires() -> None:
    sched = parse("CRON_TZ=UTC 0 0 30 2 *")  # accepted, as robfig does
    with pytest.raises(CronError, match="no matching time within 5 years"):
        sched.next(datetime(2024, 1, 1, tzinfo=UTC))


def test_not_a_string() -> None:
    with pytest.raises(CronError, match="must be a string"):
        parse(5)  # type: ignore[arg-type]
