"""In-process result backend for unit tests; wakes waiters the moment a task completes.

A later state without a TaskName or CreatedAt keeps the stored one (PENDING's), as Go's Redis
backend does, so tests on memory see what a real store shows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from machinery.drivers.backend import Backend, GroupProgress
from machinery.drivers.capabilities import ConditionalPending, ResultWakeups
from machinery.tasks import gojson
from machinery.tasks.state import PENDING, GroupMeta, TaskState
from machinery.waiters import Waiters

if TYPE_CHECKING:
    from machinery.config import Config


class _Group:
    __slots__ = ("done", "failed", "meta", "seen")

    def __init__(self, meta: GroupMeta) -> None:
        self.meta = meta
        self.seen: set[str] = set()
        self.done = 0
        self.failed = 0


class MemoryBackend(Backend, ConditionalPending, ResultWakeups):
    poll_cap = None  # every write goes through this object, so wake-ups alone are enough

    def __init__(self, cnf: Config, url: str = "memory://") -> None:
        super().__init__(cnf, url)
        self._lock = threading.Lock()
        self._states: dict[str, tuple[float, TaskState]] = {}
        self._groups: dict[str, tuple[float, _Group]] = {}
        self._waiters = Waiters()

    @property
    def waiters(self) -> Waiters:
        return self._waiters

    def _expiry(self) -> float:
        return time.monotonic() + self.expire_in

    async def set_states(self, states: Sequence[TaskState]) -> None:
        completed = []
        now = time.monotonic()
        with self._lock:
            for given in states:
                s = given
                if s.state != PENDING and (not s.task_name or s.created_at is None):
                    item = self._states.get(s.task_uuid)
                    if item is not None and item[0] > now:
                        s = s.filled_from(item[1])
                self._states[s.task_uuid] = (self._expiry(), s)
                if s.is_completed():
                    completed.append(s.task_uuid)
        for uuid in completed:
            self._waiters.notify(uuid)

    async def set_pending(self, states: Sequence[TaskState]) -> None:
        now = time.monotonic()
        with self._lock:
            for s in states:
                item = self._states.get(s.task_uuid)
                if item is None or item[0] <= now:
                    self._states[s.task_uuid] = (self._expiry(), s)
                elif item[1].created_at is None:  # the worker's first state got there first
                    self._states[s.task_uuid] = (item[0], item[1].filled_from(s))

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        now = time.monotonic()
        out: list[TaskState | None] = []
        with self._lock:
            for uuid in task_uuids:
                item = self._states.get(uuid)
                out.append(item[1] if item is not None and item[0] > now else None)
        return out

    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        with self._lock:
            group = self._group(group_uuid)
            if group is None:
                group = _Group(GroupMeta(group_uuid, list(task_uuids), created_at=gojson.now()))
            else:  # a live group keeps its progress: a redelivered parent may send it again
                group.meta.task_uuids = list(task_uuids)
            self._groups[group_uuid] = (self._expiry(), group)

    def _group(self, group_uuid: str) -> _Group | None:
        item = self._groups.get(group_uuid)
        return item[1] if item is not None and item[0] > time.monotonic() else None

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        with self._lock:
            group = self._group(group_uuid)
            return group.meta if group else None

    async def group_member_done(self, group_uuid: str, task_uuid: str, total: int, failed: bool) -> GroupProgress:
        with self._lock:
            group = self._group(group_uuid)
            if group is None:
                group = _Group(GroupMeta(group_uuid, [], created_at=gojson.now()))
                self._groups[group_uuid] = (self._expiry(), group)
            if task_uuid in group.seen:
                return GroupProgress(group.done, group.failed, False)
            group.seen.add(task_uuid)
            group.done += 1
            group.failed += int(failed)
            return GroupProgress(group.done, group.failed, True)

    async def trigger_chord(self, group_uuid: str) -> bool:
        with self._lock:
            group = self._group(group_uuid)
            if group is None or group.meta.chord_triggered:
                return False
            group.meta.chord_triggered = True
            return True

    async def purge_state(self, task_uuid: str) -> None:
        with self._lock:
            self._states.pop(task_uuid, None)

    async def purge_group_meta(self, group_uuid: str) -> None:
        with self._lock:
            self._groups.pop(group_uuid, None)
