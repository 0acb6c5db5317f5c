"""Google Cloud Pub/Sub plumbing for the broker: the URL, resource names, clients, retries, errors.

The broker talks to Pub/Sub through the generated asyncio clients of google-cloud-pubsub (the
`gcppubsub` extra): unary Pull, Acknowledge and ModifyAckDeadline give exactly the primitives a
pull-based worker needs, where the library's streaming subscriber would hold and lease messages
on its own threads. gRPC asyncio channels belong to the event loop that made them, so each loop
gets its own pair of clients (`Link`).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from google.api_core import exceptions as gexc
from google.api_core.retry import AsyncRetry, if_exception_type
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient

from machinery.errors import BrokerError, ConfigError
from machinery.log import get_logger

T = TypeVar("T")

EMULATOR_ENV: Final = "PUBSUB_EMULATOR_HOST"
MAX_DEADLINE: Final = 600  # ModifyAckDeadline's upper bound, in seconds
MIN_SUBSCRIPTION_DEADLINE: Final = 10  # a subscription's ack deadline is 10..600 s
#: errors a later attempt may not see (the service's own advice for these codes)
TRANSIENT: Final = (
    gexc.ServiceUnavailable,
    gexc.InternalServerError,
    gexc.Aborted,
    gexc.Unknown,
    gexc.ResourceExhausted,
    gexc.DeadlineExceeded,
    gexc.Cancelled,
)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")
_CLIENT_KEYS: Final = ("credentials", "client_options")


@dataclass(frozen=True, slots=True)
class Target:
    """`gcppubsub://PROJECT/SUBSCRIPTION`: the project and the default queue's subscription."""

    project: str
    subscription: str

    def topic_path(self, topic: str) -> str:
        return f"projects/{self.project}/topics/{topic}"

    def subscription_path(self, subscription: str) -> str:
        return f"projects/{self.project}/subscriptions/{subscription}"


def parse_url(url: str) -> Target:
    scheme, sep, rest = url.partition("://")
    expected = "expected gcppubsub://PROJECT/SUBSCRIPTION"
    if scheme.lower() != "gcppubsub" or not sep:
        raise ConfigError(f"config field broker: {url!r} is not a Pub/Sub URL; {expected}")
    project, _, subscription = rest.partition("/")
    if not project or not subscription or "/" in subscription or "?" in rest or "#" in rest:
        raise ConfigError(f"config field broker: {url!r}: {expected}")
    problem = name_problem(subscription)
    if problem:
        raise ConfigError(f"config field broker: subscription {subscription!r} in {url!r} {problem}")
    return Target(project, subscription)


def name_problem(name: str) -> str:
    """Why `name` cannot be a Pub/Sub topic or subscription id ("" when it can)."""
    if not _NAME.fullmatch(name):
        return ("is not a valid Pub/Sub name (3-255 characters: a letter first, then letters, digits "
                "and - _ . ~ + %)")
    if name.lower().startswith("goog"):
        return "is not a valid Pub/Sub name (it may not start with 'goog')"
    return ""


def check_name(name: str, what: str) -> str:
    problem = name_problem(name)
    if problem:
        raise BrokerError(f"{what} {name!r} {problem}")
    return name


def emulator_host() -> str:
    return os.environ.get(EMULATOR_ENV, "")


def client_kwargs(option: Any) -> dict[str, Any]:
    """Keyword arguments for both clients from `gcppubsub.client` (None or a mapping)."""
    if option is None:
        kwargs: dict[str, Any] = {}
    elif isinstance(option, Mapping) and all(k in _CLIENT_KEYS for k in option):
        kwargs = dict(option)
    else:
        raise ConfigError(
            f"config field gcppubsub.client: expected None or a mapping with keys {', '.join(_CLIENT_KEYS)} "
            f"(passed to the Pub/Sub asyncio clients), got {type(option).__name__}"
        )
    if emulator_host() and "credentials" not in kwargs:
        kwargs["credentials"] = AnonymousCredentials()  # type: ignore[no-untyped-call]  # the emulator checks none
    return kwargs


def ack_deadline(seconds: float) -> int:
    """A lease length as ModifyAckDeadline takes it: whole seconds, rounded up, at most 600."""
    return min(MAX_DEADLINE, max(0, math.ceil(seconds)))


def retry_policy(window: float) -> AsyncRetry:
    """Retry transient errors with back-off for `window` seconds (the clients' defaults go on for minutes)."""
    return AsyncRetry(predicate=if_exception_type(*TRANSIENT), initial=0.1, maximum=2.0, multiplier=2.0,
                      timeout=window)


def describe(exc: BaseException) -> str:
    if isinstance(exc, gexc.GoogleAPICallError):
        code = getattr(exc.code, "name", exc.code)
        return f"{code} {exc.message}" if code is not None else str(exc.message)
    return f"{type(exc).__name__}: {exc}"


class InFlightPull:
    """The one Pull in flight on a subscription (per event loop).

    A fetch that stops waiting (its `wait` passed, or it was cancelled) leaves the RPC running
    rather than cutting it off: a response lost to a deadline or a cancel may carry messages,
    which would then stay invisible until their ack deadline. The next fetch adopts the RPC. If
    it answers with messages while nobody waits, the answer is kept for the next fetch for a
    short grace (`keep`) and handed back only if none takes it by then: handing it back at once
    would count one more delivery attempt and delay the messages.
    """

    def __init__(self, task: asyncio.Future[Any]) -> None:
        self.task = task
        self.waiters = 0
        self.claimed = False
        #: loop time at which a kept answer goes back (None: not kept)
        self.kept_until: float | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._give_back: Callable[[], None] | None = None

    def claim(self) -> bool:
        """True once, for whoever takes the finished RPC's outcome."""
        if self.claimed or not self.task.done():
            return False
        self.claimed = True
        if self._expiry is not None:
            self._expiry.cancel()
        return True

    def keep(self, grace: float, give_back: Callable[[], None]) -> None:
        """Leave the finished answer for the next fetch; `give_back` runs if none claims it in `grace` s."""
        loop = asyncio.get_running_loop()
        self.kept_until = loop.time() + grace
        self._give_back = give_back
        self._expiry = loop.call_at(self.kept_until, give_back)

    def overdue(self) -> bool:
        """Kept past its grace (the loop was too busy to run the timer): no longer ours to hand out."""
        return self.kept_until is not None and asyncio.get_running_loop().time() > self.kept_until

    def give_back_now(self) -> None:
        """Closing: a kept answer goes back at once instead of when its grace ends."""
        if self._give_back is not None and not self.claimed:
            self._give_back()


class Link:
    """The clients and caches of one event loop."""

    def __init__(self, kwargs: Mapping[str, Any]) -> None:
        try:
            self.publisher = PublisherAsyncClient(**kwargs)
            self.subscriber = SubscriberAsyncClient(**kwargs)
        except auth_exc.DefaultCredentialsError as exc:
            raise BrokerError(
                f"Pub/Sub: no Google credentials ({exc}); set GOOGLE_APPLICATION_CREDENTIALS, pass "
                f"gcppubsub.client={{'credentials': ...}}, or {EMULATOR_ENV} for the emulator"
            ) from None
        self.ensured: set[str] = set()  # resource paths this loop created or found
        self.deadlines: dict[str, int | None] = {}  # subscription path -> its ack deadline (None: unknown)
        self.pulls: dict[str, InFlightPull] = {}  # subscription path -> its pull in flight (or kept answer)
        self.closing = False  # answers that come in now go straight back
        self._background: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a clean-up call in the background, logging rather than raising its failure."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            get_logger().warning("Pub/Sub background call failed: %s", describe(exc))

    async def close(self) -> None:
        self.closing = True
        running = [p.task for p in self.pulls.values() if not p.task.done()]
        if running:  # let them answer (within their deadline) so that their messages are handed back
            await asyncio.wait(running, timeout=5)
        for pull in list(self.pulls.values()):
            pull.give_back_now()
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)
        for client in (self.publisher, self.subscriber):
            try:
                await client.transport.close()  # type: ignore[no-untyped-call]
            except Exception as exc:  # closing must not hide the caller's own outcome
                get_logger().debug("closing a Pub/Sub client: %s", describe(exc))


async def call(what: str, fn: Callable[[], Awaitable[T]]) -> T:
    """Run one RPC, turning the service's errors into a BrokerError that says what failed."""
    try:
        return await fn()
    except gexc.GoogleAPICallError as exc:
        raise BrokerError(f"Pub/Sub {what}: {describe(exc)}") from exc
    except gexc.RetryError as exc:
        cause = exc.cause if exc.cause is not None else exc
        raise BrokerError(f"Pub/Sub {what}: gave up retrying: {describe(cause)}") from exc
