"""DynamoDB plumbing: the backend URL (endpoint, region), one aiobotocore client per event loop, and
error translation into BackendError.

URL forms (the result_backend field):

* Go's: `https://dynamodb.REGION.amazonaws.com` (any http(s) URL whose host names dynamodb, e.g. a
  local `http://dynamodb-local:8000`). The region is read from an AWS host; any other host is also
  the endpoint the client talks to.
* `dynamodb://` (AWS, region from the AWS configuration), `dynamodb://REGION`, or
  `dynamodb://HOST:PORT` for an emulator (moto, DynamoDB Local) over plain http.
* Any form takes `?region=REGION`.

Region: the URL, else the AWS configuration (AWS_REGION / AWS_DEFAULT_REGION / profile), else
us-east-1. Endpoint: botocore's own resolution (it honours AWS_ENDPOINT_URL_DYNAMODB and
AWS_ENDPOINT_URL) unless the URL names another host. Credentials: botocore's chain, or the
AioSession given as `dynamodb.client` (the convention of `sqs.client`).
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qs, urlsplit

from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from machinery.errors import BackendError, ConfigError
from machinery.loops import PerLoop

if TYPE_CHECKING:
    from machinery.config import Config

DEFAULT_REGION = "us-east-1"
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_AWS_HOST = re.compile(r"\.amazonaws\.com(\.cn)?$")


@dataclass(frozen=True, slots=True)
class DynamoTarget:
    region: str
    endpoint_url: str | None  # None: botocore resolves it (AWS, or AWS_ENDPOINT_URL*)


def parse_dynamodb_url(url: str, configured_region: str | None) -> DynamoTarget:
    """Read the backend URL; a bad one is a ConfigError naming the result_backend field."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("dynamodb", "http", "https"):
        raise ConfigError(f"config field result_backend: {url!r} is not a DynamoDB URL; expected "
                          "dynamodb://[REGION | HOST:PORT] or https://dynamodb.REGION.amazonaws.com")
    if "@" in parts.netloc:
        raise ConfigError(f"config field result_backend: {_redact(url)!r}: credentials do not go in the URL; "
                          "use the AWS environment or profile, or an AioSession as dynamodb.client")
    if parts.path.strip("/") or parts.fragment:
        raise ConfigError(f"config field result_backend: {url!r}: a DynamoDB URL takes no path")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"region"}
    if unknown:
        raise ConfigError(f"config field result_backend: {url!r}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                          "only region= is understood")
    region = (query.get("region") or [""])[-1]
    if region and not _REGION.match(region):
        raise ConfigError(f"config field result_backend: {url!r}: {region!r} is not an AWS region name")
    host = (parts.hostname or "").lower()
    endpoint: str | None = None
    if scheme == "dynamodb":
        if host and parts.port is None and _REGION.match(host):
            region = region or host
        elif host:
            endpoint = f"http://{parts.netloc}"
    elif not host:
        raise ConfigError(f"config field result_backend: {url!r} has no host")
    elif _AWS_HOST.search(host):
        region = region or next((label for label in host.split(".") if _REGION.match(label)), "")
    else:
        endpoint = f"{scheme}://{parts.netloc}"
    return DynamoTarget(region or configured_region or _env_region() or DEFAULT_REGION, endpoint)


def _env_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url


def make_session(cnf: Config) -> Any:
    """The AioSession clients are made from: `dynamodb.client` when given, else a new one."""
    from aiobotocore.session import AioSession, get_session  # type: ignore[import-untyped]

    given = cnf.dynamodb.client
    if given is None:
        return get_session()
    if not isinstance(given, AioSession):
        raise ConfigError(
            f"config field dynamodb.client: expected an aiobotocore AioSession (clients are made per event "
            f"loop from it), got {type(given).__name__}"
        )
    return given


def configured_region(session: Any) -> str | None:
    """The region of the AWS configuration (environment, profile), None when it names none."""
    try:
        region = session.get_config_variable("region")
    except BotoCoreError as exc:  # e.g. AWS_PROFILE names a profile that does not exist
        raise ConfigError(f"config field result_backend: the AWS configuration cannot be read: {exc}") from exc
    return str(region) if region else None


@dataclass(eq=False)
class _LoopClient:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    client: Any = None
    context: Any = None


class Clients:
    """One aiobotocore DynamoDB client per event loop (aiohttp sessions are bound to their loop)."""

    def __init__(self, session: Any, target: DynamoTarget, max_connections: int) -> None:
        self._session = session
        self._target = target
        self._max = max_connections
        self._items: PerLoop[_LoopClient] = PerLoop()

    async def get(self) -> Any:
        entry = self._items.get(_LoopClient)
        if entry.client is None:
            async with entry.lock:
                if entry.client is None:
                    from aiobotocore.config import AioConfig  # type: ignore[import-untyped]

                    context = self._session.create_client(
                        "dynamodb", region_name=self._target.region, endpoint_url=self._target.endpoint_url,
                        config=AioConfig(connect_timeout=10, read_timeout=30, max_pool_connections=self._max,
                                         retries={"mode": "standard", "max_attempts": 4}),
                    )
                    entry.client = await context.__aenter__()
                    entry.context = context
        return entry.client

    async def close(self) -> None:
        entry = self._items.pop_current()
        if entry is not None and entry.context is not None:
            await entry.context.__aexit__(None, None, None)


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def raise_backend_error(exc: BaseException, action: str, table: str, field_name: str) -> NoReturn:
    """A BackendError for a failed call; a missing table is named with the config field that sets it."""
    code = error_code(exc)
    if code == "ResourceNotFoundException":
        raise BackendError(
            f"dynamodb backend: table {table!r} does not exist (config field dynamodb.{field_name}); "
            "create it (see DynamoDBBackend.create_tables) or point the config at an existing one"
        ) from exc
    if isinstance(exc, ClientError | BotoCoreError | OSError):
        raise BackendError(f"dynamodb backend: {action} on {table!r} failed: {type(exc).__name__}: {exc}") from exc
    raise exc


BACKEND_ERRORS = (ClientError, BotoCoreError, OSError)
