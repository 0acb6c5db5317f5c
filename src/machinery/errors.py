"""The exceptions the library raises; every one derives from MachineryError."""

from __future__ import annotations

import builtins
from datetime import timedelta


class MachineryError(Exception):
    """Base of every error raised by machinery."""


class ConfigError(MachineryError, ValueError):
    """A configuration value or URL is wrong; the message names the field."""


class DriverMissingError(MachineryError, ImportError):
    """A URL scheme needs an optional dependency that is not installed."""


class UnknownSchemeError(ConfigError):
    """A broker, backend or lock URL has a scheme no driver handles."""


class DecodeError(MachineryError, ValueError):
    """A message or stored state is not valid Machinery JSON."""


class ArgTypeError(MachineryError, TypeError):
    """An argument or result does not fit its Machinery type string."""


class TaskNotRegisteredError(MachineryError, LookupError):
    """No task function is registered under the requested name."""


class TaskArgumentsError(MachineryError, TypeError):
    """A send's arguments do not fit the task function's parameters (count, names), checked by
    the producer before anything is sent, as Python checks a call."""


class OptionError(MachineryError, TypeError):
    """An option a send or a registration does not take (the message names it), or a value it
    cannot use: eta and countdown together, an eta that is not a time."""


class UsageError(MachineryError, RuntimeError):
    """A call the object's state does not allow, e.g. a blocking call made on the library's own
    event-loop thread, or a periodic scheduler started twice."""


class ServerClosedError(UsageError):
    """The Server was closed: it sends, waits and starts workers no more."""


class TaskError(MachineryError):
    """A task ended in FAILURE; `error` holds the stored error text, and for a task a Python
    worker ran, `exc_type` the exception's type (module-qualified) and `traceback` its traceback
    ("" when the task ran on a Go worker)."""

    def __init__(self, error: str, task_uuid: str = "", task_name: str = "", *, exc_type: str = "",
                 traceback: str = "") -> None:
        self.error = error
        self.task_uuid = task_uuid
        self.task_name = task_name
        self.exc_type = exc_type
        self.traceback = traceback
        where = f"task {task_name or '?'} ({task_uuid})" if task_uuid else "task"
        super().__init__(f"{where} failed: {error}")


class TimeoutError(MachineryError, builtins.TimeoutError):  # also the builtin, on purpose
    """A wait for a result passed its timeout."""


class BrokerError(MachineryError):
    """The broker refused or failed an operation."""


class BackendError(MachineryError):
    """The result backend refused or failed an operation."""


class SoftTimeLimitExceeded(MachineryError):
    """Raised inside a task that passed its soft time limit, so it can clean up: an `async def`
    task is cancelled (it sees CancelledError), a plain function's thread gets this exception
    injected. A task that lets it through fails with it; one that returns anyway succeeds."""

    def __init__(self, message: str = "soft time limit exceeded") -> None:
        super().__init__(message)


class TimeLimitExceeded(MachineryError):
    """A task passed its hard time limit: it ends in FAILURE with this error (retried as any
    failure), its slot is freed at once, and its coroutine is cancelled or its thread gets this
    exception injected and is abandoned."""

    def __init__(self, message: str = "hard time limit exceeded") -> None:
        super().__init__(message)


class RetryTaskLater(MachineryError):
    """Raised inside a task: store RETRY and run it again after `delay`, without using a retry."""

    def __init__(self, message: str = "", delay: timedelta | float = 0.0) -> None:
        self.message = message
        self.delay = delay if isinstance(delay, timedelta) else timedelta(seconds=float(delay))
        super().__init__(f"Task error: {message} Will retry in: {_go_duration(self.delay)}")


def _go_duration(d: timedelta) -> str:
    """Format like Go's time.Duration.String for the retry error text (4h0m0s, 1.5s, 250ms)."""
    total_ns = round(d.total_seconds() * 1e9)
    if total_ns == 0:
        return "0s"
    sign = "-" if total_ns < 0 else ""
    ns = abs(total_ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1_000_000)}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = _trim(rest / 1e9)
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{sign}{minutes}m{seconds}s"
    return f"{sign}{seconds}s"


def _trim(x: float) -> str:
    text = f"{x:.9f}".rstrip("0").rstrip(".")
    return text or "0"
