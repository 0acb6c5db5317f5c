"""What follows the end of a task, the same for every driver: the retry policy, chain follow-ups,
`on_error` tasks, and a chord's counting, firing and failing.

The worker calls these once a task's outcome is known; they talk to the result backend's group
primitives and hand what must be sent to a `Dispatcher` (the server), so this module imports
neither the worker nor the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from machinery.log import get_logger
from machinery.retry import fibonacci_next
from machinery.tasks.signature import Arg, Signature
from machinery.tasks.state import FAILURE, SUCCESS, TaskResult, TaskState

if TYPE_CHECKING:
    from machinery.drivers.backend import Backend


class Dispatcher(Protocol):
    """Stores PENDING for each signature and publishes it (the server's `dispatch`)."""

    async def dispatch(self, sigs: Sequence[Signature], *, init_groups: bool = False) -> None: ...


#: stores one state, in order with the worker's other writes (the committer's `store`)
StoreState = Callable[[TaskState], Awaitable[None]]


#: the longest wait between retries: a message's RetryTimeout is the producer's to set, and a
#: huge one must neither overflow a date nor park a task for centuries
MAX_RETRY_DELAY = 7 * 24 * 3600


def next_retry(sig: Signature) -> timedelta | None:
    """Go's retry policy for a failed task: with retries left, count one down and wait the next
    Fibonacci number of seconds after the last wait (1, 2, 3, 5, 8 ...), at most a week; None
    when none are left."""
    if sig.retry_count <= 0:
        return None
    sig.retry_count -= 1
    sig.retry_timeout = min(fibonacci_next(max(sig.retry_timeout, 0)), MAX_RETRY_DELAY)
    return timedelta(seconds=sig.retry_timeout)


def success_follow_ups(sig: Signature, results: Sequence[TaskResult]) -> list[Signature]:
    """The tasks a success sends (a chain's next link): each gets the results appended to its
    arguments unless the finished task is immutable (Go checks the parent's flag here)."""
    follow = list(sig.on_success or ())
    if not sig.immutable:
        for cb in follow:
            cb.args.extend(Arg(r.type, r.value) for r in results)
    return follow


def error_follow_ups(sig: Signature, error: str) -> list[Signature]:
    """The `on_error` tasks of a final failure, each with the error text as its first argument."""
    follow = list(sig.on_error or ())
    for cb in follow:
        cb.args.insert(0, Arg("string", error))
    return follow


def in_chord(sig: Signature) -> bool:
    return bool(sig.group_uuid) and sig.chord_callback is not None


class Chords:
    """Counts a chord's members as they end; the one that completes the group fires the callback,
    or fails it once when a member failed.

    A member redelivered after its worker died between counting and sending the callback is not
    counted again; it sends the callback itself when no state for the callback exists yet, so a
    crash in that window does not lose the chord. With `go_members`, a member that finds the group
    incomplete by the count reads every member's state, as Go does (Go workers store states
    without counting them).
    """

    def __init__(self, backend: Backend, dispatcher: Dispatcher, store: StoreState, *, go_members: bool) -> None:
        self._backend = backend
        self._dispatcher = dispatcher
        self._store = store
        self._go_members = go_members

    async def member_done(self, sig: Signature, error: str) -> None:
        backend = self._backend
        callback = sig.chord_callback
        assert callback is not None
        progress = await backend.group_member_done(sig.group_uuid, sig.uuid, sig.group_task_count, bool(error))
        if progress.failed:
            # a member failed (this one, or one another worker counted): the first to get the
            # chord's flag fails it, once
            if progress.counted and await backend.trigger_chord(sig.group_uuid):
                reason = (f"chord member {sig.name} ({sig.uuid}) failed: {error}" if error
                          else await self._failure_reason(sig.group_uuid))
                await self.fail(callback, reason)
            return
        uuids: list[str] = []  # the members, and their states once read
        states: list[TaskState | None] | None = None
        if progress.done < sig.group_task_count:
            if not self._go_members:
                return
            meta = await backend.get_group_meta(sig.group_uuid)  # members Go ran are not counted
            if meta is None:
                return
            uuids = meta.task_uuids
            states = await backend.get_states(uuids)
            outcome = members_outcome(uuids, states)
            if outcome is None:
                return
            if outcome:  # a member failed on a Go worker (Go does not fail the chord): fail it once
                if await backend.trigger_chord(sig.group_uuid):
                    await self.fail(callback, outcome)
                return
        if progress.counted:
            if not await backend.trigger_chord(sig.group_uuid):
                if await backend.get_group_meta(sig.group_uuid) is None:  # never recorded, or expired
                    await self.fail(callback, f"group {sig.group_uuid} is unknown or expired; chord not sent")
                return
        elif await backend.get_state(callback.uuid) is not None:
            return  # already sent by the member that completed the group
        if states is None:
            meta = await backend.get_group_meta(sig.group_uuid)
            if meta is None:
                await self.fail(callback, f"group {sig.group_uuid} is unknown or expired; chord not sent")
                return
            uuids = meta.task_uuids
        if sig.uuid not in uuids:  # a record made up on the spot, or another group's
            await self.fail(callback, f"group {sig.group_uuid} does not list member {sig.uuid}; chord not sent")
            return
        if not callback.immutable:
            if states is None:
                states = await backend.get_states(uuids)
            for uuid, state in zip(uuids, states, strict=True):
                if state is None or state.state != SUCCESS:
                    await self.fail(callback, f"chord member {uuid} has no stored result")
                    return
                callback.args.extend(Arg(r.type, r.value) for r in state.results or [])
        await self._dispatcher.dispatch([callback], init_groups=True)

    async def _failure_reason(self, group_uuid: str) -> str:
        """Why the chord fails when the failed member was counted by another worker (or ran on Go)."""
        meta = await self._backend.get_group_meta(group_uuid)
        if meta is not None:
            states = await self._backend.get_states(meta.task_uuids)
            for uuid, state in zip(meta.task_uuids, states, strict=True):
                if state is not None and state.state == FAILURE:
                    return f"chord member {uuid} failed: {state.error}"
        return f"a member of group {group_uuid} failed"

    async def fail(self, callback: Signature, error: str) -> None:
        """Store FAILURE for the callback that will not run, and send its `on_error` tasks."""
        get_logger().error("chord callback %s (%s) will not run: %s", callback.name, callback.uuid, error)
        await self._store(TaskState(callback.uuid, FAILURE, task_name=callback.name, error=error))
        if callback.on_error:
            await self._dispatcher.dispatch(error_follow_ups(callback, error), init_groups=True)


def members_outcome(uuids: list[str], states: list[TaskState | None]) -> str | None:
    """From a group's stored states: None while any member runs, "" when all succeeded, else why
    the chord fails."""
    if any(state is None or not state.is_completed() for state in states):
        return None
    for uuid, state in zip(uuids, states, strict=True):
        if state is not None and state.state != SUCCESS:
            return f"chord member {uuid} failed: {state.error}"
    return ""
