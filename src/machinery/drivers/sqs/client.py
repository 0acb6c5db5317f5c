"""SQS plumbing: the broker URL (queue URLs, region, endpoint), one aiobotocore client per event loop,
error translation, and the limits of the SQS API.

URL forms (the broker field):

* Go's: `https://sqs.REGION.amazonaws.com/ACCOUNT`; the queue URL is the broker URL + "/" + queue name.
  With `DISABLE_STRICT_SQS_CHECK` set, any `http(s)://HOST[:PORT]/ACCOUNT` (moto, localstack): a host
  outside amazonaws.com is also the endpoint the client talks to.
* `sqs://[REGION][/ACCOUNT]`: queue URLs come from GetQueueUrl (owner ACCOUNT when given), so the
  account need not be spelled out. An http(s) URL with no path works the same way.

Region: from the host (`sqs.REGION...`), else the AWS configuration (AWS_REGION / AWS_DEFAULT_REGION /
profile), else us-east-1. Endpoint: botocore's own resolution (it honours AWS_ENDPOINT_URL_SQS and
AWS_ENDPOINT_URL) unless the host is not AWS's. Credentials: botocore's chain, or the AioSession given
as `sqs.client`.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from machinery.errors import BrokerError, ConfigError
from machinery.loops import PerLoop

if TYPE_CHECKING:
    from machinery.config import Config

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

MAX_DELAY = 900  # DelaySeconds
MAX_VISIBILITY = 43200  # VisibilityTimeout, 12 h
MAX_WAIT = 20  # WaitTimeSeconds
BATCH = 10  # entries per *Batch call and messages per ReceiveMessage
BATCH_BYTES = 256 * 1024  # payload of one SendMessageBatch (the historical limit; newer queues take 1 MiB)
DEFAULT_REGION = "us-east-1"

_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_AWS_HOST = re.compile(r"\.amazonaws\.com(\.cn)?$")
_MISSING_QUEUE = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
# Characters SQS accepts in bodies and attribute values (XML 1.0's)
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True, slots=True)
class SQSTarget:
    base_url: str | None  # queue URL = base_url + "/" + name; None: ask GetQueueUrl
    region: str
    endpoint_url: str | None  # None: botocore resolves it (AWS, or AWS_ENDPOINT_URL*)
    account: str = ""  # queue owner for GetQueueUrl


def parse_sqs_url(url: str, configured_region: str | None) -> SQSTarget:
    """Read the broker URL; a bad one is a ConfigError naming the broker field."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqs":
        region = parts.netloc.lower()
        if region and not _REGION.match(region):
            raise ConfigError(
                f"config field broker: {url!r}: expected sqs://REGION/ACCOUNT, sqs://REGION or sqs://, "
                f"and {parts.netloc!r} is not an AWS region name"
            )
        account = parts.path.strip("/")
        if "/" in account:
            raise ConfigError(f"config field broker: {url!r}: expected sqs://REGION/ACCOUNT (one path segment)")
        return SQSTarget(None, region or configured_region or DEFAULT_REGION, None, account)
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"config field broker: {url!r} is not an SQS URL; expected https://sqs.REGION.amazonaws.com/ACCOUNT "
            "or sqs://REGION/ACCOUNT"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"config field broker: {url!r}: an SQS URL takes no query or fragment")
    host = parts.hostname.lower()
    in_host = next((label for label in host.split(".") if _REGION.match(label)), None)
    endpoint = None if _AWS_HOST.search(host) else f"{scheme}://{parts.netloc.rpartition('@')[2]}"
    path = parts.path.rstrip("/")
    base = f"{scheme}://{parts.netloc.rpartition('@')[2]}{path}" if path else None
    return SQSTarget(base, in_host or configured_region or DEFAULT_REGION, endpoint)


def session_factory(cnf: Config) -> Callable[[], Any]:
    """Where clients come from: the AioSession given as `sqs.client` (credentials, profile), else a new
    session per event loop (refreshable credentials hold loop-bound locks)."""
    from aiobotocore.session import AioSession, get_session  # type: ignore[import-untyped]

    given = cnf.sqs.client
    if given is None:
        return cast("Callable[[], Any]", get_session)
    if not isinstance(given, AioSession):
        raise ConfigError(
            f"config field sqs.client: expected an aiobotocore AioSession (clients are made per event loop "
            f"from it), got {type(given).__name__}"
        )
    return lambda: given


@dataclass(eq=False)
class LoopClient:
    """One event loop's client, plus the fetches that loop abandoned (see SQSBroker.fetch)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: Any = None
    client: Any = None
    context: Any = None
    orphans: set[asyncio.Task[Any]] = field(default_factory=set)

    def adopt(self, task: asyncio.Task[Any]) -> None:
        self.orphans.add(task)
        task.add_done_callback(self.orphans.discard)


class Clients:
    """One aiobotocore SQS client per event loop (aiohttp sessions are bound to their loop)."""

    #: how long close() lets abandoned fetches finish giving their messages back
    orphan_grace = 3.0

    def __init__(self, sessions: Callable[[], Any], target: SQSTarget) -> None:
        self._sessions = sessions
        self._target = target
        self._items: PerLoop[LoopClient] = PerLoop()

    async def get(self) -> LoopClient:
        entry = self._items.get(LoopClient)
        if entry.client is None:
            async with entry.lock:
                if entry.client is None:
                    from aiobotocore.config import AioConfig  # type: ignore[import-untyped]

                    entry.session = self._sessions()
                    context = entry.session.create_client(
                        "sqs", region_name=self._target.region, endpoint_url=self._target.endpoint_url,
                        config=AioConfig(connect_timeout=10, read_timeout=MAX_WAIT + 40, max_pool_connections=32),
                    )
                    entry.client = await context.__aenter__()
                    entry.context = context
        return entry

    async def close(self) -> None:
        """Close the current loop's client, after its abandoned fetches had a moment to give messages back."""
        entry = self._items.pop_current()
        if entry is None:
            return
        if entry.orphans:
            _, late = await asyncio.wait(list(entry.orphans), timeout=self.orphan_grace)
            for task in late:  # their messages come back when the visibility timeout ends
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if entry.context is not None:
            await entry.context.__aexit__(None, None, None)


# --- errors --------------------------------------------------------------------------------


def is_missing_queue(exc: BaseException) -> bool:
    if not isinstance(exc, ClientError):
        return False
    err = exc.response.get("Error", {})
    return err.get("Code") in _MISSING_QUEUE or err.get("QueryErrorCode") in _MISSING_QUEUE


def wrap_errors(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn botocore and socket errors into BrokerError, keeping the cause."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise BrokerError(f"sqs broker {fn.__name__}: {type(exc).__name__}: {exc}") from exc

    return wrapper


# --- message text and batching ---------------------------------------------------------------


def xml_safe(text: str, limit: int = 0) -> str:
    """`text` with the characters SQS rejects replaced, cut to `limit` characters when given."""
    text = _NOT_XML.sub("\ufffd", text)
    return text[:limit] if limit else text


def chunks(items: Sequence[T], size: int = BATCH) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def send_batches(entries: Sequence[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """SendMessageBatch entries in order, at most 10 and BATCH_BYTES of bodies per call."""
    batch: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        n = len(entry["MessageBody"].encode()) + 1024  # + room for attributes
        if batch and (len(batch) == BATCH or size + n > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(entry)
        size += n
    if batch:
        yield batch


def batch_failures(response: dict[str, Any]) -> list[str]:
    """The `Failed` entries of a *Batch response, as text."""
    return [f"{f.get('Code', '?')}: {f.get('Message', '')}" for f in response.get("Failed") or []]
