"""Send options: the keywords a task's sends and its registration take, checked by name and value.

A misspelt option used to be dropped in silence (`retry_cout=3` sent a task without retries), so
every name is checked here; `eta` and `countdown` become one aware UTC time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from machinery.errors import OptionError
from machinery.limits import HEADERS as LIMIT_HEADERS
from machinery.limits import seconds

if TYPE_CHECKING:
    from machinery.tasks.signature import Signature


class TaskDefaults(TypedDict, total=False):
    """What `@server.task(...)` and `register_task()` take: defaults for every send of the task.

    `time_limit` and `soft_time_limit` (seconds or a timedelta; 0 = none) stay with the task's
    registration, where the worker reads them; given to one send (`with_options`), they travel in
    its Headers instead (machinery.limits) and take precedence.
    """

    routing_key: str
    headers: dict[str, Any]
    priority: int
    immutable: bool
    retry_count: int
    retry_timeout: int
    broker_message_group_id: str
    stop_task_deletion_on_error: bool
    ignore_when_task_not_registered: bool
    time_limit: float | timedelta
    soft_time_limit: float | timedelta


class SendOptions(TaskDefaults, total=False):
    """What one send takes on top of the defaults.

    `eta`: an aware datetime, a naive one (read as UTC), or a timedelta from now; `countdown`:
    seconds from now (int or float). Give one of the two, not both.
    """

    eta: datetime | timedelta
    countdown: float
    uuid: str
    on_success: list[Signature]
    on_error: list[Signature]


DEFAULT_NAMES = frozenset(TaskDefaults.__optional_keys__)
SEND_NAMES = frozenset(SendOptions.__optional_keys__)

_STR = ("a str", (str,))
_BOOL = ("a bool", (bool,))
_INT = ("an int", (int,))
_KINDS: dict[str, tuple[str, tuple[type, ...]]] = {
    "routing_key": _STR, "broker_message_group_id": _STR, "uuid": _STR,
    "immutable": _BOOL, "stop_task_deletion_on_error": _BOOL, "ignore_when_task_not_registered": _BOOL,
    "priority": _INT, "retry_count": _INT, "retry_timeout": _INT,
    "headers": ("a dict", (dict,)), "on_success": ("a list of Signatures", (list,)),
    "on_error": ("a list of Signatures", (list,)),
    "time_limit": ("a number of seconds >= 0 or a timedelta", (int, float, timedelta)),
    "soft_time_limit": ("a number of seconds >= 0 or a timedelta", (int, float, timedelta)),
}


def check_defaults(task: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The registration options, refused when a name is unknown or a value has the wrong kind."""
    unknown = sorted(set(options) - DEFAULT_NAMES)
    if unknown:
        raise OptionError(f"task {task!r}: unknown option{_s(unknown)} {', '.join(unknown)} "
                          f"(a task takes {', '.join(sorted(DEFAULT_NAMES))})")
    for name, value in options.items():
        _check_value(task, name, value)
    return dict(options)


def signature_fields(task: str, defaults: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """Signature keyword arguments for one send: the task's defaults, then this send's options,
    with `eta`/`countdown` made one aware time and time limits put in the Headers (the task's
    own limits are not: the worker reads them from its registration). Unknown names are refused
    by the caller."""
    fields = {k: v for k, v in defaults.items() if k not in LIMIT_HEADERS}
    eta: Any = options.get("eta")
    countdown: Any = options.get("countdown")
    limits: dict[str, float] = {}
    for name, value in options.items():
        if name in ("eta", "countdown"):
            continue
        _check_value(task, name, value)
        if name in LIMIT_HEADERS:
            limits[LIMIT_HEADERS[name]] = seconds(value) or 0.0
        else:
            fields[name] = value
    if eta is not None or countdown is not None:
        fields["eta"] = resolve_eta(task, eta, countdown)
    headers = fields.get("headers")
    if headers is not None or limits:
        # a copy: the tracer writes into it, and it must never be the shared default
        fields["headers"] = {**(headers or {}), **limits}
    return fields


def resolve_eta(task: str, eta: Any, countdown: Any) -> datetime:
    """The aware UTC time an `eta` (datetime; naive = UTC; or timedelta from now) or a
    `countdown` (seconds from now) names."""
    if eta is not None and countdown is not None:
        raise OptionError(f"task {task!r}: give eta or countdown, not both")
    if countdown is not None:
        if isinstance(countdown, bool) or not isinstance(countdown, int | float) or not math.isfinite(countdown):
            raise OptionError(f"task {task!r}: countdown must be a finite number of seconds, got {countdown!r}")
        return datetime.now(UTC) + timedelta(seconds=countdown)
    if isinstance(eta, timedelta):
        return datetime.now(UTC) + eta
    if isinstance(eta, datetime):
        return eta if eta.tzinfo is not None else eta.replace(tzinfo=UTC)
    raise OptionError(f"task {task!r}: eta must be a datetime or a timedelta, got {type(eta).__name__} {eta!r}")


def _check_value(task: str, name: str, value: Any) -> None:
    what, types_ = _KINDS[name]
    if not _fits(value, types_):
        raise OptionError(f"task {task!r}: option {name} must be {what}, got {type(value).__name__} {value!r}")
    if name == "priority" and not 0 <= value <= 255:
        raise OptionError(f"task {task!r}: option priority must be 0..255 (Go's uint8), got {value}")
    if name in ("retry_count", "retry_timeout") and value < 0:
        raise OptionError(f"task {task!r}: option {name} must be >= 0, got {value}")
    if name in LIMIT_HEADERS and seconds(value) is None:
        raise OptionError(f"task {task!r}: option {name} must be {what}, got {value!r}")
    if name in ("on_success", "on_error"):
        from machinery.tasks.signature import Signature

        bad = [s for s in value if not isinstance(s, Signature)]
        if bad:
            raise OptionError(f"task {task!r}: option {name} must hold Signatures, got {type(bad[0]).__name__}")


def _fits(value: Any, types_: tuple[type, ...]) -> bool:
    return isinstance(value, types_) and not (bool not in types_ and isinstance(value, bool))


def _s(items: list[str]) -> str:
    return "s" if len(items) > 1 else ""
