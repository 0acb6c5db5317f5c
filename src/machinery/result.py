"""Handles on sent tasks and workflows: wait for results with timeouts that always hold."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from machinery.drivers.capabilities import BlockingReads
from machinery.errors import ServerClosedError, TaskError, TimeoutError
from machinery.tasks.state import FAILURE, TaskState

if TYPE_CHECKING:
    from machinery.drivers.backend import Backend
    from machinery.portal import Portal
    from machinery.tasks.signature import Signature

R = TypeVar("R")


def _unpack(state: TaskState) -> Any:
    if state.state == FAILURE:
        raise TaskError(state.error, state.task_uuid, state.task_name, exc_type=state.exc_type,
                        traceback=state.traceback)
    values = state.values()
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return tuple(values)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


async def _prefetch(results: list[AsyncResult[Any]]) -> None:
    """Read the states of many results in one call, so only unfinished ones are waited for."""
    todo = [r for r in results if r._state is None or not r._state.is_completed()]
    if len(todo) < 2:
        return
    states = await todo[0]._backend.get_states([r.task_uuid for r in todo])
    for r, st in zip(todo, states, strict=True):
        if st is not None:
            r._state = st


class AsyncResult(Generic[R]):
    """The result of one sent task; R is the task function's result type (`Task.send` knows it;
    `server.send_task(Signature(...))` gives AsyncResult[Any])."""

    def __init__(self, signature: Signature, backend: Backend, portal: Portal) -> None:
        self.signature = signature
        self._backend = backend
        self._portal = portal
        self._state: TaskState | None = None

    @property
    def task_uuid(self) -> str:
        return self.signature.uuid

    def _check_open(self) -> None:
        if self._portal.closed:
            raise ServerClosedError(f"cannot read the result of {self.signature.name} "
                                    f"({self.signature.uuid}): its Server is closed")

    async def aget_state(self) -> TaskState | None:
        """The stored state now (None if nothing is stored)."""
        self._check_open()
        state = await self._backend.get_state(self.signature.uuid)
        if state is not None:
            self._state = state
        return state

    def get_state(self) -> TaskState | None:
        self._check_open()
        reads = self._backend.capability(BlockingReads)
        if reads is None:
            result: TaskState | None = self._portal.run(self.aget_state())
            return result
        state = reads.get_state(self.signature.uuid)
        if state is not None:
            self._state = state
        return state

    async def aprogress(self) -> Any:
        """The latest value the task reported with `ctx.set_progress()` (None before any)."""
        state = await self.aget_state()
        return None if state is None else state.progress

    def progress(self) -> Any:
        """aprogress's blocking twin."""
        state = self.get_state()
        return None if state is None else state.progress

    async def await_state(self, timeout: float | None = None) -> TaskState:
        """Wait for SUCCESS or FAILURE; TimeoutError when `timeout` seconds pass first."""
        if self._state is not None and self._state.is_completed():
            return self._state
        self._check_open()
        return self._waited(await self._backend.wait_completed(self.signature.uuid, timeout), timeout)

    def wait_state(self, timeout: float | None = None) -> TaskState:
        """await_state's blocking twin: in the caller's thread where the backend can wait there."""
        if self._state is not None and self._state.is_completed():
            return self._state
        self._check_open()
        reads = self._backend.capability(BlockingReads)
        if reads is None or self._portal.in_portal():  # on the portal's own thread: its error
            result: TaskState = self._portal.run(self.await_state(timeout))
            return result
        return self._waited(reads.wait_completed(self.signature.uuid, timeout), timeout)

    def _waited(self, state: TaskState | None, timeout: float | None) -> TaskState:
        if state is None:
            raise TimeoutError(
                f"no result for task {self.signature.name} ({self.signature.uuid}) within {timeout} s"
            )
        self._state = state
        return state

    async def aget(self, timeout: float | None = None) -> R:
        """The task's value (one result), a tuple (several) or None; TaskError if it failed."""
        return cast(R, _unpack(await self.await_state(timeout)))

    def get(self, timeout: float | None = None) -> R:
        """aget's blocking twin."""
        return cast(R, _unpack(self.wait_state(timeout)))

    def __repr__(self) -> str:
        return f"<AsyncResult {self.signature.name} {self.signature.uuid}>"


class GroupAsyncResult:
    """Results of a group's members, in group order."""

    def __init__(self, results: list[AsyncResult[Any]], portal: Portal) -> None:
        self.results = results
        self._portal = portal

    async def aget(self, timeout: float | None = None) -> list[Any]:
        deadline = _deadline(timeout)
        await _prefetch(self.results)
        out = []
        for r in self.results:
            out.append(await r.aget(_left(deadline)))
        return out

    def get(self, timeout: float | None = None) -> list[Any]:
        result: list[Any] = self._portal.run(self.aget(timeout))
        return result

    def __iter__(self) -> Iterator[AsyncResult[Any]]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, i: int) -> AsyncResult[Any]:
        return self.results[i]


class ChainAsyncResult:
    """A chain's steps; get() returns the last step's value or raises the first failure."""

    def __init__(self, steps: list[AsyncResult[Any] | GroupAsyncResult], portal: Portal) -> None:
        self.steps = steps
        self._portal = portal

    @property
    def async_results(self) -> list[AsyncResult[Any]]:
        out: list[AsyncResult[Any]] = []
        for s in self.steps:
            out.extend(s.results if isinstance(s, GroupAsyncResult) else [s])
        return out

    #: longest pause between looks at the earlier steps for a failure, while the last one runs
    failure_check = 0.25

    async def aget(self, timeout: float | None = None) -> Any:
        """Waits for the last step only: each link runs after the one before succeeded, so the
        last one's value is the chain's. A failed link stops the chain, so the earlier steps are
        read (in one call) between waits, and the first failure among them is raised."""
        deadline = _deadline(timeout)
        last, earlier = self.steps[-1], self.async_results[:-1]
        if isinstance(last, GroupAsyncResult):
            earlier = [r for r in earlier if r not in last.results]
        pause = 0.01
        while True:
            left = _left(deadline)
            try:
                return await last.aget(pause if left is None else min(pause, left))
            except TimeoutError:
                if left is not None and left <= pause:
                    raise TimeoutError(f"no result for the chain's last step ({last!r}) within {timeout} s") from None
            if earlier:
                states = await earlier[0]._backend.get_states([r.task_uuid for r in earlier])
                for st in states:
                    if st is not None and st.state == FAILURE:
                        _unpack(st)  # raises its TaskError
            pause = min(pause * 2, self.failure_check)

    def get(self, timeout: float | None = None) -> Any:
        return self._portal.run(self.aget(timeout))


class ChordAsyncResult:
    """A chord: its members and its callback; get() returns the callback's value."""

    def __init__(self, group_results: list[AsyncResult[Any]], callback: AsyncResult[Any], portal: Portal) -> None:
        self.group_async_results = group_results
        self.chord_async_result = callback
        self._portal = portal

    async def aget(self, timeout: float | None = None) -> Any:
        """The callback's value; TaskError naming the failed member if one failed."""
        return await self.chord_async_result.aget(timeout)

    def get(self, timeout: float | None = None) -> Any:
        return self.chord_async_result.get(timeout)

    async def aget_state(self) -> TaskState | None:
        return await self.chord_async_result.aget_state()

    def get_state(self) -> TaskState | None:
        return self.chord_async_result.get_state()
