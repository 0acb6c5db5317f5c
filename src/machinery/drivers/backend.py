"""The Backend contract: where task states, results and group progress are stored."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from machinery.drivers.capabilities import BACKEND_CAPABILITIES, Capable, ResultWakeups, check_declared
from machinery.portal import PortalUser
from machinery.tasks.state import GroupMeta, TaskState

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.waiters import Waiters

#: longest pause between re-reads of the generic wait without ResultWakeups
POLL_CAP = 0.05


@dataclass(frozen=True, slots=True)
class GroupProgress:
    """What one member's completion did to its group, returned atomically by the backend.

    `counted` is False when this member had already been counted (a redelivered task), so the
    caller that sees done == total with counted True is the only one that may fire the chord.
    """

    done: int
    failed: int
    counted: bool


class Backend(PortalUser, Capable, ABC):
    """Stores states (Go's TaskState JSON where the store is Go-compatible) and group metadata.

    The primitives below are the whole contract; what only some backends can do (conditional
    PENDING, wake-ups, blocking reads) is a capability: see machinery.drivers.capabilities.
    """

    def __init__(self, cnf: Config, url: str = "") -> None:
        self.cnf = cnf
        self.url = url

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_declared(cls, BACKEND_CAPABILITIES, Backend)

    @property
    def expire_in(self) -> int:
        """Seconds results are kept (0 in the config means 3600, as in Go)."""
        return self.cnf.results_expire_in or 3600

    # --- primitives ------------------------------------------------------------------------

    @abstractmethod
    async def set_states(self, states: Sequence[TaskState]) -> None:
        """Store states, each replacing the task's previous one, with the configured expiry."""

    @abstractmethod
    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        """Stored states in the order asked; None where nothing is stored (or it expired)."""

    @abstractmethod
    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        """Record a group's members before any of them runs.

        Calling it again for a group that already exists must keep its progress (a redelivered
        parent task may send the same group twice).
        """

    @abstractmethod
    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        """The group record, or None when unknown or expired."""

    @abstractmethod
    async def group_member_done(self, group_uuid: str, task_uuid: str, total: int, failed: bool) -> GroupProgress:
        """Count a member's final state once (atomically, idempotent per task UUID)."""

    @abstractmethod
    async def trigger_chord(self, group_uuid: str) -> bool:
        """Atomically set the group's ChordTriggered flag; True only for the one caller that set it."""

    @abstractmethod
    async def purge_state(self, task_uuid: str) -> None:
        """Forget a task's state."""

    @abstractmethod
    async def purge_group_meta(self, group_uuid: str) -> None:
        """Forget a group's record and progress."""

    async def close(self) -> None:
        """Release connections of the current event loop."""

    # --- built on the primitives; drivers may override for speed ---------------------------

    async def set_state(self, state: TaskState) -> None:
        await self.set_states([state])

    async def get_state(self, task_uuid: str) -> TaskState | None:
        return (await self.get_states([task_uuid]))[0]

    async def wait_completed(self, task_uuid: str, timeout: float | None) -> TaskState | None:
        """Wait until the task is SUCCESS or FAILURE; None when the timeout passes first.

        Re-reads with a back-off up to a cap; with ResultWakeups, wakes at once when this process
        stores the state, and re-reads at the backend's poll_cap (straight at poll_cap while
        remote wake-ups work). Drivers with a server-side notification override it.
        """
        wakeups = self.capability(ResultWakeups)
        if wakeups is None:
            return await self._wait_completed(task_uuid, timeout, None, POLL_CAP, False)
        with wakeups.remote_wakeups() as pushed:
            return await self._wait_completed(task_uuid, timeout, wakeups.waiters, wakeups.poll_cap, pushed)

    async def _wait_completed(self, task_uuid: str, timeout: float | None, waiters: Waiters | None,
                              poll_cap: float | None, pushed: bool) -> TaskState | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = (poll_cap if pushed else None) or 0.0005
        while True:
            fut = waiters.register(task_uuid) if waiters is not None else None
            try:
                state = await self.get_state(task_uuid)
                if state is not None and state.is_completed():
                    return state
                pause = poll_cap and delay
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    pause = min(pause, left) if pause else left
                if fut is None:
                    await asyncio.sleep(pause or POLL_CAP)
                else:
                    try:
                        await asyncio.wait_for(asyncio.shield(fut), pause or None)
                    except TimeoutError:
                        pass
                if poll_cap:
                    delay = min(delay * 2, poll_cap)
            finally:
                if fut is not None and waiters is not None:
                    waiters.discard(task_uuid, fut)
