"""DynamoDB result backend in Go Machinery's tables (`dynamodb://...` or Go's `https://dynamodb...`).

Tables (names from dynamodb.task_states_table / group_metas_table): `task_states` with hash key
TaskUUID (S) and `group_metas` with hash key GroupUUID (S); items use Go's attribute names (see
machinery.drivers.dynamodb.items) and the TTL attribute Go uses, unix seconds now + results_expire_in.
Enable DynamoDB's TTL on the attribute `TTL` so expired items get deleted (create_tables does).
A missing table is a BackendError naming it and its config field.

Beyond Go (whose chord flag was a read-then-write race and whose results came back untyped):

* States: PENDING is one conditional PutItem that never replaces a stored state (when the worker's
  first state got there first, PENDING only adds the TaskName/CreatedAt it lacks); later states are
  an UpdateItem that keeps the stored TaskName/CreatedAt when the new state has none (Go's shape).
  Every write sets TTL (Go set it on SUCCESS/FAILURE only), and an item past its TTL reads as absent
  (DynamoDB deletes expired items only eventually; moto never does).
* Result values are typed JSON text, readable back exactly; Go-written %v text is still read.
* get_states: BatchGetItem (100 keys a call, consistent reads, unprocessed keys retried), answered in
  the order asked.
* group_member_done: one UpdateItem on the group item sets the attribute `Done:<task uuid>` (1 when
  the member failed) and adds to `Progress` (done + failed * 2**32, one number so that the update
  returns both), on condition that attribute does not exist yet: idempotent and atomic, O(1) in the
  group size. (These attributes share the group item's 400 KB limit with TaskUUIDs: groups of up to
  about 4,000 members.)
* trigger_chord: UpdateItem SET ChordTriggered = true on condition it is false (and the group live):
  exactly one caller wins. Go workers flip it without a condition, so a mixed Go/Python fleet can
  still fire a chord twice; Go's `Lock` attribute is left alone.
* purge uses the string key type (Go v1 sent a number and failed).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from machinery.drivers.backend import Backend, GroupProgress
from machinery.drivers.capabilities import ConditionalPending, ResultWakeups
from machinery.drivers.dynamodb import items
from machinery.drivers.dynamodb.client import (
    BACKEND_ERRORS,
    Clients,
    configured_region,
    error_code,
    make_session,
    parse_dynamodb_url,
    raise_backend_error,
)
from machinery.errors import BackendError, ConfigError
from machinery.tasks import gojson
from machinery.tasks.state import GroupMeta, TaskState
from machinery.waiters import Waiters

if TYPE_CHECKING:
    from machinery.config import Config

T = TypeVar("T")
BATCH_GET = 100  # keys per BatchGetItem (DynamoDB's limit)
_CONDITION_FAILED = "ConditionalCheckFailedException"
FAILED_UNIT = 1 << 32  # Progress holds done + failed * FAILED_UNIT: one atomic update returns both
MEMBER_PREFIX = "Done:"  # Done:<task uuid> = 1 if that member failed, else 0
_FRESH = "attribute_not_exists(#K) OR (#T > :zero AND #T <= :now)"  # absent, or past its TTL


class DynamoDBBackend(Backend, ConditionalPending, ResultWakeups):
    """Go-compatible DynamoDB result backend with conditional writes for groups and chords."""

    #: every read is a billed request: re-read a waited-on state at most this often
    poll_cap = 0.25
    #: parallel requests per event loop (the HTTP connection pool)
    max_connections = 16

    def __init__(self, cnf: Config, url: str = "") -> None:
        super().__init__(cnf, url or cnf.result_backend)
        session = make_session(cnf)
        self.target = parse_dynamodb_url(self.url, configured_region(session))
        self.task_table = cnf.dynamodb.task_states_table
        self.group_table = cnf.dynamodb.group_metas_table
        for field_name, table in (("task_states_table", self.task_table), ("group_metas_table", self.group_table)):
            if not table:
                raise ConfigError(f"config field dynamodb.{field_name}: must not be empty")
        self._clients = Clients(session, self.target, self.max_connections)
        self._waiters = Waiters()

    @property
    def waiters(self) -> Waiters:
        return self._waiters

    # --- plumbing --------------------------------------------------------------------------

    async def _call(self, method: str, table: str, **kwargs: Any) -> dict[str, Any]:
        """One API call on `table`, with failures turned into BackendError (conditions re-raised)."""
        client = await self._clients.get()
        try:
            response: dict[str, Any] = await getattr(client, method)(TableName=table, **kwargs)
        except BACKEND_ERRORS as exc:
            if error_code(exc) == _CONDITION_FAILED:
                raise _ConditionFailed from exc
            field_name = "task_states_table" if table == self.task_table else "group_metas_table"
            raise_backend_error(exc, method, table, field_name)
        return response

    async def _bounded(self, calls: Sequence[Awaitable[T]]) -> list[T]:
        """Run calls concurrently, at most max_connections of them at a time."""
        sem = asyncio.Semaphore(self.max_connections)

        async def one(aw: Awaitable[T]) -> T:
            async with sem:
                return await aw

        return list(await asyncio.gather(*(one(c) for c in calls)))

    def _ttl(self) -> int:
        """Go's TTL (unix seconds), rounded up so that a value lives at least expire_in seconds."""
        return math.ceil(time.time()) + self.expire_in

    @staticmethod
    def _fresh_values() -> dict[str, Any]:
        return {":zero": items.n(0), ":now": items.n(int(time.time()))}

    # --- tables ----------------------------------------------------------------------------

    async def create_tables(self) -> None:
        """Create both tables (on-demand billing) where missing and enable TTL on `TTL`."""
        client = await self._clients.get()
        for table, key in ((self.task_table, "TaskUUID"), (self.group_table, "GroupUUID")):
            try:
                await client.create_table(
                    TableName=table, BillingMode="PAY_PER_REQUEST",
                    AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}],
                    KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
                )
            except BACKEND_ERRORS as exc:
                if error_code(exc) != "ResourceInUseException":  # it exists already
                    raise BackendError(f"dynamodb backend: cannot create table {table!r}: {exc}") from exc
            try:
                await client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 1})
                await client.update_time_to_live(
                    TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": "TTL"})
            except BACKEND_ERRORS as exc:
                if error_code(exc) != "ValidationException":  # TTL is on already
                    raise BackendError(f"dynamodb backend: cannot enable TTL on table {table!r}: {exc}") from exc

    # --- states ----------------------------------------------------------------------------

    async def set_states(self, states: Sequence[TaskState]) -> None:
        if not states:
            return
        ttl = self._ttl()
        await self._bounded([self._call("update_item", self.task_table, **items.state_update(s, ttl))
                             for s in states])
        for s in states:
            if s.is_completed():
                self._waiters.notify(s.task_uuid)

    async def set_pending(self, states: Sequence[TaskState]) -> None:
        """PENDING only where no live state is stored: it never replaces a worker's state."""
        ttl = self._ttl()
        await self._bounded([self._store_pending(s, ttl) for s in states])

    async def _store_pending(self, state: TaskState, ttl: int) -> None:
        if await self._put_if_fresh(self.task_table, "TaskUUID", items.state_item(state, ttl)):
            return
        # The worker's first state got there first (the send stores PENDING while publishing):
        # give it the TaskName and CreatedAt that only PENDING carries, where it has none.
        names, values, sets = {"#K": "TaskUUID", "#C": "CreatedAt"}, {":c": items.s(gojson.format_time(
            state.created_at))}, ["#C = if_not_exists(#C, :c)"]
        if state.task_name:
            names["#N"], values[":n"] = "TaskName", items.s(state.task_name)
            sets.append("#N = if_not_exists(#N, :n)")
        try:
            await self._call("update_item", self.task_table, Key={"TaskUUID": items.s(state.task_uuid)},
                             UpdateExpression="SET " + ", ".join(sets), ConditionExpression="attribute_exists(#K)",
                             ExpressionAttributeNames=names, ExpressionAttributeValues=values)
        except _ConditionFailed:  # purged in between
            pass

    async def _put_if_fresh(self, table: str, key: str, item: items.Item) -> bool:
        try:
            await self._call("put_item", table, Item=item, ConditionExpression=_FRESH,
                             ExpressionAttributeNames={"#K": key, "#T": "TTL"},
                             ExpressionAttributeValues=self._fresh_values())
        except _ConditionFailed:
            return False
        return True

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        if not task_uuids:
            return []
        unique = list(dict.fromkeys(task_uuids))
        found: dict[str, items.Item] = {}
        chunks = [unique[i:i + BATCH_GET] for i in range(0, len(unique), BATCH_GET)]
        for part in await self._bounded([self._batch_get(c) for c in chunks]):
            found.update(part)
        now = time.time()
        out: list[TaskState | None] = []
        for uuid in task_uuids:
            item = found.get(uuid)
            out.append(items.state_from_item(item) if item is not None and items.is_live(item, now) else None)
        return out

    async def _batch_get(self, uuids: list[str]) -> dict[str, items.Item]:
        client = await self._clients.get()
        request: dict[str, Any] = {self.task_table: {
            "Keys": [{"TaskUUID": items.s(u)} for u in uuids], "ConsistentRead": True,
        }}
        found: dict[str, items.Item] = {}
        for attempt in range(8):
            try:
                response = await client.batch_get_item(RequestItems=request)
            except BACKEND_ERRORS as exc:
                raise_backend_error(exc, "batch_get_item", self.task_table, "task_states_table")
            for item in response.get("Responses", {}).get(self.task_table, []):
                found[item["TaskUUID"]["S"]] = item
            request = response.get("UnprocessedKeys") or {}
            if not request:
                return found
            await asyncio.sleep(min(0.05 * 2 ** attempt, 2.0))  # throttled: back off, then the rest
        raise BackendError(f"dynamodb backend: batch_get_item on {self.task_table!r} left keys unprocessed "
                           "after 8 attempts (throttled?)")

    async def purge_state(self, task_uuid: str) -> None:
        await self._call("delete_item", self.task_table, Key={"TaskUUID": items.s(task_uuid)})

    # --- groups ----------------------------------------------------------------------------

    def _group_key(self, group_uuid: str) -> dict[str, Any]:
        return {"GroupUUID": items.s(group_uuid)}

    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        """Create the group; an existing live one keeps its progress (its TTL is renewed)."""
        ttl = self._ttl()
        meta = GroupMeta(group_uuid, list(task_uuids), created_at=gojson.now())
        if await self._put_if_fresh(self.group_table, "GroupUUID", items.group_item(meta, ttl)):
            return
        try:
            await self._call("update_item", self.group_table, Key=self._group_key(group_uuid),
                             UpdateExpression="SET #T = :t", ConditionExpression="attribute_exists(#K)",
                             ExpressionAttributeNames={"#T": "TTL", "#K": "GroupUUID"},
                             ExpressionAttributeValues={":t": items.n(ttl)})
        except _ConditionFailed:  # purged in between: make it anew
            await self._put_if_fresh(self.group_table, "GroupUUID", items.group_item(meta, ttl))

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        item = await self._get_group_item(group_uuid)
        return items.group_from_item(item) if item is not None else None

    async def _get_group_item(self, group_uuid: str) -> items.Item | None:
        response = await self._call("get_item", self.group_table, Key=self._group_key(group_uuid),
                                    ConsistentRead=True)
        item: items.Item | None = response.get("Item")
        return item if item is not None and items.is_live(item, time.time()) else None

    async def group_member_done(self, group_uuid: str, task_uuid: str, total: int, failed: bool) -> GroupProgress:
        names = {"#P": "Progress", "#M": MEMBER_PREFIX + task_uuid}
        try:
            response = await self._call(
                "update_item", self.group_table, Key=self._group_key(group_uuid),
                UpdateExpression="SET #P = if_not_exists(#P, :zero) + :step, #M = :failed",
                ConditionExpression="attribute_not_exists(#M)",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues={
                    ":zero": items.n(0), ":step": items.n(1 + (FAILED_UNIT if failed else 0)),
                    ":failed": items.n(int(failed)),
                },
                ReturnValues="UPDATED_NEW",
            )
        except _ConditionFailed:  # counted before (a redelivery): report the current progress
            response = await self._call(
                "get_item", self.group_table, Key=self._group_key(group_uuid), ConsistentRead=True,
                ProjectionExpression="#P", ExpressionAttributeNames={"#P": "Progress"})
            done, nfailed = _progress(response.get("Item") or {})
            return GroupProgress(done, nfailed, False)
        done, nfailed = _progress(response.get("Attributes") or {})
        return GroupProgress(done, nfailed, True)

    async def trigger_chord(self, group_uuid: str) -> bool:
        try:
            await self._call(
                "update_item", self.group_table, Key=self._group_key(group_uuid),
                UpdateExpression="SET #CT = :true",
                ConditionExpression="#CT = :false AND (attribute_not_exists(#T) OR #T = :zero OR #T > :now)",
                ExpressionAttributeNames={"#CT": "ChordTriggered", "#T": "TTL"},
                ExpressionAttributeValues={":true": {"BOOL": True}, ":false": {"BOOL": False},
                                           **self._fresh_values()},
            )
        except _ConditionFailed:  # fired already, or no such (live) group
            return False
        return True

    async def purge_group_meta(self, group_uuid: str) -> None:
        """Forget the group item, its progress with it."""
        await self._call("delete_item", self.group_table, Key=self._group_key(group_uuid))

    async def close(self) -> None:
        await self._clients.close()


class _ConditionFailed(Exception):
    """A conditional write's condition did not hold (not an error for the callers here)."""


def _progress(attrs: items.Item) -> tuple[int, int]:
    """(done, failed) from the Progress number, done + failed * FAILED_UNIT."""
    value = items.plain(attrs.get("Progress") or {"N": "0"})
    total = int(value) if isinstance(value, int | float) else 0
    return total % FAILED_UNIT, total // FAILED_UNIT
