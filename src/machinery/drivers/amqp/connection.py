"""AMQP plumbing shared by the broker and the backend.

One connection per event loop, dialled over the configured URLs in order (Go's failover), and
re-dialled on demand after a drop, so that every operation either reaches RabbitMQ within a retry
window or fails with a clear error. It talks to aiormq (the protocol layer under aio-pika; the `amqp`
extra installs it) directly: we need raw delivery tags, multiple-acks, basic.recover and our own
multi-URL failover, which aio-pika's robust wrappers do not give.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import math
import os
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar
from urllib.parse import unquote, urlsplit

from aiormq import exceptions as amqp_exc
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp import commands as spec

from machinery.drivers.amqp import internals
from machinery.drivers.amqp.internals import HandshakeRefused
from machinery.errors import ConfigError, MachineryError
from machinery.log import get_logger

T = TypeVar("T")

#: channel errors that retrying cannot fix (wrong arguments, missing or locked entities, rights)
PERMANENT_ERRORS: Final = (
    amqp_exc.ChannelPreconditionFailed,
    amqp_exc.ChannelNotFoundEntity,
    amqp_exc.ChannelAccessRefused,
    amqp_exc.ChannelLockedResource,
    amqp_exc.DeliveryError,
)
#: connection or channel loss: reconnect and try again
TRANSIENT_ERRORS: Final = (
    amqp_exc.AMQPError,
    amqp_exc.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,
)
MAX_INT32: Final = 2**31 - 1
DECLARED_MAX: Final = 20_000
#: seconds between dials while no URL answers: one log line per dial, growing to the last value
DIAL_BACKOFF: Final = (0.5, 1.0, 2.0, 4.0, 8.0, 10.0)


class Unavailable(ConnectionError):
    """No URL answered; retried inside the window, reported as the driver's error after it."""


#: set while this module dials, so that aiormq's own line for a failed dial (which we report
#: ourselves, once per retry) is dropped, and nobody else's
_DIALING: contextvars.ContextVar[bool] = contextvars.ContextVar("machinery_amqp_dialing", default=False)


class _QuietDials(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (_DIALING.get() and str(record.msg).startswith("error when creating transport"))


def _quiet_aiormq_dials() -> None:
    logger = logging.getLogger("aiormq.connection")
    if not any(isinstance(f, _QuietDials) for f in logger.filters):
        logger.addFilter(_QuietDials())


def split_urls(url: str, separator: str, field: str) -> list[str]:
    """The URLs of one setting, checked at construction so a typo fails early with the field name."""
    parts = [u.strip() for u in url.split(separator)] if separator else [url.strip()]
    urls = [u for u in parts if u]
    if not urls:
        raise ConfigError(f"config field {field}: no AMQP URL given")
    for u in urls:
        scheme = u.partition("://")[0].lower()
        if scheme not in ("amqp", "amqps") or "://" not in u:
            raise ConfigError(f"config field {field}: expected amqp://... or amqps://..., got {redact(u)!r}")
    return urls


def redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    if not sep or "@" not in host:
        return url
    return f"{scheme}://***@{rest.partition('@')[2]}"


def is_empty(msg: DeliveredMessage) -> bool:
    return isinstance(msg.delivery, spec.Basic.GetEmpty)


def delivery_tag(msg: DeliveredMessage) -> int:
    tag = getattr(msg.delivery, "delivery_tag", None)
    return int(tag or 0)


def int_header(msg: DeliveredMessage, name: str) -> int:
    value = (msg.header.properties.headers or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def message_count(ok: Any) -> int:
    return int(getattr(ok, "message_count", 0) or 0)


async def get_all(channel: AbstractChannel, queue: str, limit: int = 1_000_000) -> list[DeliveredMessage]:
    """basic.get every ready message without ack (the caller acks, nacks or recovers them).

    Stops at basic.get-empty or when get-ok reports none left. The message count of queue.declare
    is not used: it can lag behind a requeue made just before on the same channel; basic.get cannot.
    """
    out: list[DeliveredMessage] = []
    while len(out) < limit:
        msg = await channel.basic_get(queue, no_ack=False)
        if is_empty(msg):
            break
        out.append(msg)
        if getattr(msg.delivery, "message_count", None) == 0:
            break
    return out


def contiguous_prefix(outstanding: set[int], done: set[int]) -> int:
    """The largest tag T such that every outstanding tag <= T is in `done` (0 if none).

    Acking T with multiple=True then settles exactly those messages and no unfinished one.
    """
    top = 0
    for tag in sorted(outstanding):
        if tag not in done:
            break
        top = tag
    return top


async def settle(
    channel: AbstractChannel, outstanding: set[int], tags: set[int], *, ack: bool, requeue: bool = True
) -> None:
    """Ack (or nack) `tags`, as one multiple=True frame for the contiguous head and singles for the rest."""
    tags &= outstanding
    if not tags:
        return
    top = contiguous_prefix(outstanding, tags)
    rest = sorted(t for t in tags if t > top)
    frames: list[tuple[int, bool]] = ([(top, True)] if top else []) + [(t, False) for t in rest]
    outstanding -= tags
    for i, (tag, multiple) in enumerate(frames):
        last = i == len(frames) - 1
        if ack:
            await channel.basic_ack(tag, multiple=multiple, wait=last)
        else:
            await channel.basic_nack(tag, multiple=multiple, requeue=requeue, wait=last)


class AMQPLink:
    """The connection of one event loop, its shared channels and a cache of what it declared."""

    connect_timeout = 10.0

    def __init__(
        self,
        urls: Sequence[str],
        *,
        tls: ssl.SSLContext | None,
        error: type[MachineryError],
        role: str,
        retry_window: float = 30.0,
    ) -> None:
        self.urls = list(urls)
        self.tls = tls
        self.error = error
        self.role = role
        self.retry_window = retry_window
        self.generation = 0
        self.url_index = -1
        #: name -> monotonic time of the declaration, for the current connection only; bounded (LRU),
        #: since a backend declares a queue per task: forgetting one only costs a re-declare
        self.declared: OrderedDict[str, float] = OrderedDict()
        self._conn: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self._channels: dict[str, AbstractChannel] = {}
        self._channel_locks: dict[str, asyncio.Lock] = {}
        self._down_since: float | None = None
        self._failed_dials = 0
        self._retry_at = 0.0  # monotonic time before which no dial is made (back-off)
        self._last_failure = ""
        self._closed = False
        _quiet_aiormq_dials()

    # --- connection ------------------------------------------------------------------------

    def is_up(self) -> bool:
        return self._conn is not None and not self._conn.is_closed

    async def connection(self) -> AbstractConnection:
        conn = self._conn
        if conn is not None and not conn.is_closed:
            return conn
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.is_closed:
                return conn
            if self._closed:
                raise self.error(f"the AMQP {self.role} connection was closed")
            if time.monotonic() < self._retry_at:
                raise Unavailable(self._last_failure)  # backing off: the last dial said why
            return await self._dial()

    def retry_in(self) -> float:
        """Seconds until the next dial is due (0 when connected or due now)."""
        return max(0.0, self._retry_at - time.monotonic())

    async def _dial(self) -> AbstractConnection:
        failures: list[str] = []
        hopeless = True  # every URL refused us for good (credentials, virtual host, certificate)
        props: dict[str, Any] = {
            "connection_name": f"machinery {self.role} {socket.gethostname()}:{os.getpid()}",
        }
        for index, url in enumerate(self.urls):
            token = _DIALING.set(True)
            try:
                conn = internals.connection_class()(url, context=self.tls, client_properties=props)
                await asyncio.wait_for(conn.connect(), self.connect_timeout)
            except (*TRANSIENT_ERRORS, amqp_exc.AuthenticationError) as exc:
                cause, permanent = explain(exc, url, self.connect_timeout)
                hopeless = hopeless and permanent
                failures.append(f"{redact(url)}: {cause}")
                continue
            finally:
                _DIALING.reset(token)
            self._conn = conn
            self.generation += 1
            self.url_index = index
            self.declared.clear()
            self._channels.clear()
            if self._down_since is not None:
                get_logger().warning(
                    "AMQP %s reconnected to %s after %.1fs", self.role, redact(url),
                    time.monotonic() - self._down_since,
                )
            self._down_since = None
            self._failed_dials = 0
            self._retry_at = 0.0
            return conn
        text = "; ".join(failures)
        if hopeless:
            raise self.error(f"AMQP {self.role}: {text}")
        if self._down_since is None:
            self._down_since = time.monotonic()
        delay = DIAL_BACKOFF[min(self._failed_dials, len(DIAL_BACKOFF) - 1)]
        self._failed_dials += 1
        self._retry_at = time.monotonic() + delay
        self._last_failure = text
        get_logger().warning("AMQP %s cannot connect: %s; retrying in %g s", self.role, text, delay)
        raise Unavailable(text)

    async def channel(self, name: str, *, confirms: bool) -> AbstractChannel:
        """A shared channel by name ("publish", "declare"...), reopened when it was closed."""
        ch = self._channels.get(name)
        if ch is not None and not ch.is_closed:
            return ch
        lock = self._channel_locks.setdefault(name, asyncio.Lock())
        async with lock:
            ch = self._channels.get(name)
            if ch is not None and not ch.is_closed:
                return ch
            ch = await self.open_channel(confirms=confirms)
            self._channels[name] = ch
            return ch

    async def open_channel(self, *, confirms: bool = False) -> AbstractChannel:
        conn = await self.connection()
        return await conn.channel(publisher_confirms=confirms)

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        self._channels.clear()
        if conn is not None and not conn.is_closed:
            try:
                await asyncio.wait_for(conn.close(), 5.0)
            except (*TRANSIENT_ERRORS, asyncio.CancelledError):
                pass

    # --- retries ---------------------------------------------------------------------------

    async def call(self, op: Callable[[], Awaitable[T]], *, what: str, window: float | None = None) -> T:
        """Run `op`, reconnecting and retrying on connection loss until `window` seconds pass."""
        window = self.retry_window if window is None else window
        deadline = time.monotonic() + window
        delay = 0.05
        while True:
            try:
                return await op()
            except PERMANENT_ERRORS as exc:
                raise self.error(f"{what}: RabbitMQ refused it: {describe(exc)}") from exc
            except TRANSIENT_ERRORS as exc:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    where = ", ".join(redact(u) for u in self.urls)
                    raise self.error(
                        f"{what}: RabbitMQ not reachable at {where} within {window:g}s: {describe(exc)}"
                    ) from exc
                get_logger().debug("AMQP %s: %s failed (%s), retrying", self.role, what, describe(exc))
                # while no URL answers, wait for the next dial the back-off allows
                await asyncio.sleep(min(self.retry_in() or delay, left))
                delay = min(delay * 2, 1.0)

    # --- declarations ----------------------------------------------------------------------

    def fresh(self, key: str, max_age: float | None = None) -> bool:
        at = self.declared.get(key)
        if at is None:
            return False
        self.declared.move_to_end(key)
        return max_age is None or time.monotonic() - at < max_age

    def mark(self, key: str) -> None:
        self.declared[key] = time.monotonic()
        self.declared.move_to_end(key)
        while len(self.declared) > DECLARED_MAX:
            self.declared.popitem(last=False)

    def forget(self, key: str) -> None:
        self.declared.pop(key, None)


def explain(exc: BaseException, url: str, timeout: float) -> tuple[str, bool]:
    """Why a dial to `url` failed, in words, and whether retrying cannot help."""
    parts = urlsplit(url)
    where = f"{parts.hostname or 'localhost'}:{parts.port or (5671 if parts.scheme.lower() == 'amqps' else 5672)}"
    user = unquote(parts.username or "guest")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    if isinstance(exc, HandshakeRefused):
        lowered = exc.text.lower()
        if exc.code == 530 and "not found" in lowered:
            return (f"virtual host {vhost!r} does not exist ({exc.text}); create it "
                    f"(rabbitmqctl add_vhost {vhost}) or fix the URL's path"), True
        if exc.code == 530 and "refused" in lowered:
            return (f"access to virtual host {vhost!r} refused for user {user!r} ({exc.text}); grant it "
                    f"(rabbitmqctl set_permissions -p {vhost} {user} '.*' '.*' '.*')"), True
        return f"RabbitMQ closed the connection: {exc.code} {exc.text}", False
    if isinstance(exc, (amqp_exc.AuthenticationError, amqp_exc.ProbableAuthenticationError)):
        return f"authentication failed for user {user!r} ({exc})", True
    if _untrusted_certificate(exc):
        return f"TLS certificate not trusted ({exc}); set Config.tls", True
    if _in_chain(exc, lambda e: isinstance(e, ConnectionRefusedError) or _errno(e) == errno.ECONNREFUSED):
        return f"connection refused: nothing listens on {where}", False
    if _in_chain(exc, lambda e: isinstance(e, socket.gaierror)):
        return f"host name {parts.hostname!r} not found", False
    if isinstance(exc, TimeoutError):
        return f"no answer from {where} within {timeout:g} s", False
    return f"{type(exc).__name__}: {exc}", False


def _errno(exc: BaseException) -> int | None:
    """aiormq wraps socket errors as AMQPConnectionError((errno, text))."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    first = exc.args[0] if exc.args else None
    return first if isinstance(first, int) else None


def _in_chain(exc: BaseException, test: Callable[[BaseException], bool]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if test(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _untrusted_certificate(exc: BaseException) -> bool:
    """aiormq wraps the ssl error in AMQPConnectionError: look through the chain and the text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, amqp_exc.ChannelPreconditionFailed) and "inequivalent arg" in text:
        text += (" (an existing queue or exchange was declared with other settings: delete it, or "
                 "make the amqp config match it)")
    return text


def properties(
    *,
    headers: dict[str, Any] | None,
    priority: int | None = None,
    expiration: str | None = None,
) -> spec.Basic.Properties:
    """Go Machinery's message properties: JSON, persistent, the signature's headers and priority."""
    return spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        headers=headers or None,
        priority=priority or None,
        expiration=expiration,
    )


def _publish_kwargs() -> dict[str, Any]:
    """aiormq >= 7.1 can skip waiting for the socket to drain: with confirms we wait for those."""
    import inspect

    from aiormq.channel import Channel

    return {"wait": False} if "wait" in inspect.signature(Channel.basic_publish).parameters else {}


PUBLISH_KWARGS: Final = _publish_kwargs()


async def publish(
    channel: AbstractChannel, body: bytes, *, exchange: str, routing_key: str, props: spec.Basic.Properties,
    mandatory: bool = True,
) -> Any:
    """basic.publish that returns once confirmed (or returned: PublishError)."""
    return await channel.basic_publish(body, exchange=exchange, routing_key=routing_key, properties=props,
                                       mandatory=mandatory, **PUBLISH_KWARGS)


def clamp_ms(ms: int) -> int:
    return max(1, min(ms, MAX_INT32))


async def close_quietly(ch: AbstractChannel) -> None:
    if not ch.is_closed:
        try:
            await ch.close()
        except (*TRANSIENT_ERRORS, asyncio.CancelledError):
            pass


def delay_ms_until(eta_ns: int | None) -> int:
    """Milliseconds from now until `eta_ns` (Unix ns), rounded by round_delay_ms; 0 if due."""
    if eta_ns is None:
        return 0
    left = eta_ns - time.time_ns()
    return round_delay_ms(math.ceil(left / 1e6)) if left > 0 else 0


def round_delay_ms(ms: int) -> int:
    """Round long delays up to 4 significant digits (at most 0.1% late) so tasks share delay queues."""
    if ms < 10_000:
        return ms
    step: int = 10 ** (len(str(ms)) - 4)
    return -(-ms // step) * step
