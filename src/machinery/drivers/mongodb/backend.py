"""MongoDB result backend in Go Machinery's layout (`mongodb://...` or `mongodb+srv://...`).

Database `mongodb.database` (default `machinery`; like Go, the URL's database part only selects
where to authenticate), collections `tasks` and `group_metas`, documents in Go's bson shape (see
machinery.drivers.mongodb.documents). The client is pymongo's native asyncio AsyncMongoClient: `mongodb.client`
when given (it is bound to the one event loop it is first used on), else one client per event loop
made from the URL.

Beyond Go (whose chord trigger always returned true and whose TTL index, in v1, never fired):

* Every write sets `delete_at` = now + results_expire_in, under a TTL index (expireAfterSeconds 0)
  on both collections; reads treat a document past `delete_at` as gone, because MongoDB deletes
  expired documents only once a minute.
* States replace the previous one in one upsert; an empty task_name or created_at keeps the stored
  one (Go's later states carry neither). get_states answers in the order asked.
* set_pending never overwrites a live state (an upsert with $setOnInsert; an expired document is
  replaced; a worker state that got there first only gains the created_at it lacks), so a send
  stores PENDING while it publishes.
* group_member_done: one find_one_and_update on the group document, filtered on the member not
  being in `done_members` yet, adds it and increments `done` (and `failed`): atomic, idempotent.
* trigger_chord flips chord_triggered with update_one filtered on it being false (and the group
  live): True only for the caller whose update modified the document. A Go worker flips it
  without looking, so a mixed Go/Python fleet can still fire a chord twice.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

from bson.codec_options import CodecOptions
from pymongo import AsyncMongoClient, DeleteOne, ReturnDocument, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from machinery.drivers.backend import Backend, GroupProgress
from machinery.drivers.capabilities import ConditionalPending, ResultWakeups
from machinery.drivers.mongodb import documents as docs
from machinery.errors import BackendError, ConfigError
from machinery.log import get_logger
from machinery.loops import PerLoop
from machinery.tasks.state import GroupMeta, TaskState
from machinery.waiters import Waiters

if TYPE_CHECKING:
    from machinery.config import Config

Client = AsyncMongoClient[dict[str, Any]]
Collection = AsyncCollection[dict[str, Any]]

TASKS: Final = "tasks"
GROUP_METAS: Final = "group_metas"
#: connection defaults where the URL sets none (Go waits 10 s to connect; pymongo's default is 30 s)
_DEFAULTS: Final[dict[str, Any]] = {"serverSelectionTimeoutMS": 10_000, "appname": "machinery"}
_BAD_DB_CHARS: Final = frozenset('/\\. "$\x00')
_INDEX_CONFLICTS: Final = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
_UNAUTHORIZED: Final = 13
_COUNT_TRIES: Final = 5
_FIND_CHUNK: Final = 10_000  # UUIDs per find (a command must stay under 16 MB)


def client_options(url: str) -> tuple[str, dict[str, Any]]:
    """The URL (scheme lower-cased) and client keyword arguments; a bad URL is a ConfigError."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("mongodb", "mongodb+srv"):
        raise ConfigError(f"config field result_backend: {_redact(url)!r} is not a MongoDB URL; "
                          "expected mongodb://HOST[:PORT][,HOST...][/?OPTIONS] or mongodb+srv://HOST")
    url = f"{scheme.lower()}://{rest}"
    given = {k.lower() for k, _ in parse_qsl(rest.partition("?")[2], keep_blank_values=True)}
    kwargs = {k: v for k, v in _DEFAULTS.items() if k.lower() not in given}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            AsyncMongoClient(url, connect=False, **kwargs)  # parses and checks it; no I/O, nothing to close
        except (PyMongoError, ValueError, TypeError) as exc:
            raise ConfigError(f"config field result_backend: {_redact(url)!r} is not a valid MongoDB URL: "
                              f"{exc}") from None
    unknown = [str(w.message) for w in caught if "Unknown option" in str(w.message)]
    if unknown:
        raise ConfigError(f"config field result_backend: {_redact(url)!r}: {unknown[0]}")
    return url, kwargs


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url
    return f"{scheme}{sep}***@{authority.rpartition('@')[2]}{slash}{tail}"


def _check_database(name: str) -> str:
    if not name or _BAD_DB_CHARS.intersection(name) or len(name.encode()) > 63:
        raise ConfigError(f"config field mongodb.database: {name!r} is not a MongoDB database name "
                          "(1-63 bytes, none of / \\ . space \" $)")
    return name


@dataclass(eq=False)
class _LoopClient:
    client: Client
    owned: bool  # made here from the URL (closed by close()), not the configured mongodb.client


class MongoBackend(Backend, ConditionalPending, ResultWakeups):
    """Go-compatible MongoDB result backend with conditional updates for groups and chords."""


    def __init__(self, cnf: Config, url: str = "") -> None:
        super().__init__(cnf, url or cnf.result_backend)
        self.database = _check_database(cnf.mongodb.database)
        given = cnf.mongodb.client
        if given is not None and not isinstance(given, AsyncMongoClient):
            raise ConfigError(f"config field mongodb.client: expected a pymongo AsyncMongoClient, "
                              f"got {type(given).__name__}")
        self._given: Client | None = given
        self._url, self._kwargs = ("", {}) if given is not None else client_options(self.url)
        self._clients: PerLoop[_LoopClient] = PerLoop()
        self._codec: CodecOptions[dict[str, Any]] = CodecOptions(document_class=dict, tz_aware=True, tzinfo=UTC)
        self._indexed = False
        self._waiters = Waiters()

    @property
    def waiters(self) -> Waiters:
        return self._waiters

    # --- plumbing --------------------------------------------------------------------------

    def _entry(self) -> _LoopClient:
        def make() -> _LoopClient:
            if self._given is not None:
                return _LoopClient(self._given, owned=False)
            return _LoopClient(AsyncMongoClient(self._url, **self._kwargs), owned=True)

        return self._clients.get(make)

    async def _collection(self, name: str) -> Collection:
        db = self._entry().client.get_database(self.database, codec_options=self._codec)
        if not self._indexed:
            await self._create_indexes(db[TASKS], db[GROUP_METAS])
        return db[name]

    async def _create_indexes(self, *collections: Collection) -> None:
        """The TTL index on `delete_at` (once per backend; the server ignores an existing one)."""
        for coll in collections:
            with self._errors(f"creating the TTL index on {coll.name!r}"):
                try:
                    await coll.create_index([("delete_at", 1)], expireAfterSeconds=0)
                except OperationFailure as exc:
                    if exc.code not in _INDEX_CONFLICTS and exc.code != _UNAUTHORIZED:
                        raise
                    get_logger().warning(
                        "mongodb backend: cannot create the TTL index on %s.%s (%s); expired results are "
                        "hidden but the server will not delete them", self.database, coll.name, exc)
        self._indexed = True

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Server and connection failures as BackendError naming what was being done."""
        try:
            yield
        except PyMongoError as exc:
            raise BackendError(f"mongodb backend: {action} in database {self.database!r} failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:
            if "event loop" not in str(exc):
                raise
            raise BackendError(
                f"mongodb backend: {exc}; an AsyncMongoClient given as mongodb.client works on one event "
                "loop only (leave mongodb.client unset to get one client per event loop)") from exc

    def _delete_at(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.expire_in)

    # --- states ----------------------------------------------------------------------------

    async def set_states(self, states: Sequence[TaskState]) -> None:
        if not states:
            return
        delete_at = self._delete_at()
        ops = [UpdateOne({"_id": s.task_uuid}, docs.state_update(s, delete_at), upsert=True) for s in states]
        with self._errors("storing task states"):
            await (await self._collection(TASKS)).bulk_write(ops, ordered=True)
        for s in states:
            if s.is_completed():
                self._waiters.notify(s.task_uuid)

    async def set_pending(self, states: Sequence[TaskState]) -> None:
        """PENDING only where no live state is stored: it never replaces a worker's state."""
        if not states:
            return
        now = datetime.now(UTC)
        delete_at = now + timedelta(seconds=self.expire_in)
        ops: list[UpdateOne] = []
        for s in states:
            fields = docs.state_fields(s, delete_at)
            # an expired document the TTL monitor has not swept yet is replaced ...
            replace: dict[str, Any] = {"$set": fields}
            if "ttl" not in fields:
                replace["$unset"] = {"ttl": ""}
            ops.append(UpdateOne({"_id": s.task_uuid, "delete_at": {"$lte": now}}, replace))
            # ... a missing one is created; a live one is left alone ...
            ops.append(UpdateOne({"_id": s.task_uuid}, {"$setOnInsert": fields}, upsert=True))
            # ... but gains the created_at that only PENDING carries, when the worker's state came first
            if s.created_at is not None:
                fill = docs.created_fields(s.created_at)
                if s.task_name:
                    fill["task_name"] = s.task_name
                ops.append(UpdateOne({"_id": s.task_uuid, "created_at": {"$exists": False}}, {"$set": fill}))
        with self._errors("storing PENDING states"):
            await (await self._collection(TASKS)).bulk_write(ops, ordered=False)

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        if not task_uuids:
            return []
        unique = list(dict.fromkeys(task_uuids))
        coll = await self._collection(TASKS)
        chunks = [unique[i:i + _FIND_CHUNK] for i in range(0, len(unique), _FIND_CHUNK)]
        with self._errors("reading task states"):
            parts = await asyncio.gather(*(coll.find(
                {"_id": chunk[0]} if len(chunk) == 1 else {"_id": {"$in": chunk}}).to_list(None) for chunk in chunks))
        now = datetime.now(UTC)
        by_id = {doc["_id"]: doc for part in parts for doc in part if docs.is_live(doc, now)}
        out: list[TaskState | None] = []
        for uuid in task_uuids:
            doc = by_id.get(uuid)
            out.append(docs.state_from_doc(doc) if doc is not None else None)
        return out

    async def purge_state(self, task_uuid: str) -> None:
        with self._errors("deleting a task state"):
            await (await self._collection(TASKS)).delete_one({"_id": task_uuid})

    # --- groups ----------------------------------------------------------------------------

    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        """Create the group; a live one keeps its progress and chord flag (its expiry is renewed)."""
        now = datetime.now(UTC)
        ops: list[DeleteOne | UpdateOne] = [
            DeleteOne({"_id": group_uuid, "delete_at": {"$lte": now}}),  # expired, not swept yet: start anew
            UpdateOne({"_id": group_uuid}, {
                "$set": {"task_uuids": list(task_uuids), "delete_at": now + timedelta(seconds=self.expire_in)},
                "$setOnInsert": docs.new_group_fields(now),
            }, upsert=True),
        ]
        with self._errors("storing a group"):
            await (await self._collection(GROUP_METAS)).bulk_write(ops, ordered=True)

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        with self._errors("reading a group"):
            doc = await (await self._collection(GROUP_METAS)).find_one(
                {"_id": group_uuid}, projection={"done_members": False})
        if doc is None or not docs.is_live(doc, datetime.now(UTC)):
            return None
        return docs.group_from_doc(doc)

    async def group_member_done(self, group_uuid: str, task_uuid: str, total: int, failed: bool) -> GroupProgress:
        coll = await self._collection(GROUP_METAS)
        projection = {"done": True, "failed": True}
        with self._errors("counting a group member"):
            for _ in range(_COUNT_TRIES):
                now = datetime.now(UTC)
                try:
                    doc = await coll.find_one_and_update(
                        {"_id": group_uuid, "done_members": {"$ne": task_uuid}},
                        {
                            "$addToSet": {"done_members": task_uuid},
                            "$inc": {"done": 1, "failed": int(failed)},
                            # a group nobody initialised (or one swept already) is created, as elsewhere
                            "$setOnInsert": {"task_uuids": [], **docs.new_group_fields(now),
                                             "delete_at": now + timedelta(seconds=self.expire_in)},
                        },
                        projection=projection, upsert=True, return_document=ReturnDocument.AFTER,
                    )
                except DuplicateKeyError:
                    # The document exists but did not match: this member was counted before, or a
                    # concurrent first count created the document just now (then count again).
                    counted = await coll.find_one({"_id": group_uuid, "done_members": task_uuid}, projection)
                    if counted is None:
                        continue
                    return GroupProgress(*docs.progress(counted), counted=False)
                return GroupProgress(*docs.progress(doc), counted=True)
        raise BackendError(f"mongodb backend: counting member {task_uuid} of group {group_uuid} kept conflicting "
                           f"after {_COUNT_TRIES} tries")

    async def trigger_chord(self, group_uuid: str) -> bool:
        with self._errors("triggering a chord"):
            result = await (await self._collection(GROUP_METAS)).update_one(
                {"_id": group_uuid, "chord_triggered": False, "delete_at": {"$not": {"$lte": datetime.now(UTC)}}},
                {"$set": {"chord_triggered": True}},
            )
        return result.modified_count == 1

    async def purge_group_meta(self, group_uuid: str) -> None:
        """Forget the group document, its progress with it."""
        with self._errors("deleting a group"):
            await (await self._collection(GROUP_METAS)).delete_one({"_id": group_uuid})

    async def close(self) -> None:
        entry = self._clients.pop_current()
        if entry is not None and entry.owned:
            await entry.client.close()
