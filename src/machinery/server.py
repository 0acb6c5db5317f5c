"""Server: the task registry plus the sending side (tasks, groups, chords, chains, periodic)."""

from __future__ import annotations

import asyncio
import os
import uuid as _uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, overload

from machinery.config import Config
from machinery.drivers import registry
from machinery.drivers.capabilities import BlockingSend, ConditionalPending, JointSend, capability_of
from machinery.errors import MachineryError, TaskNotRegisteredError
from machinery.portal import Portal
from machinery.result import AsyncResult, ChainAsyncResult, ChordAsyncResult, GroupAsyncResult
from machinery.task import Task, TaskSpec
from machinery.tasks import gojson
from machinery.tasks.signature import Signature, encode_signature
from machinery.tasks.state import PENDING, TaskState
from machinery.tasks.workflow import Chain, Chord, Group, fresh_copy
from machinery.tracing import Tracer

if TYPE_CHECKING:
    from machinery.drivers.backend import Backend
    from machinery.drivers.broker import Broker, PublishItem
    from machinery.drivers.capabilities import Pairing
    from machinery.drivers.lock import Lock
    from machinery.periodic import PeriodicScheduler
    from machinery.worker import Worker


_UUID_VERSION = bytes((b & 0x0F) | 0x40 for b in range(256))  # byte 6: version 4
_UUID_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))  # byte 8: RFC 4122 variant


def new_task_uuids(n: int) -> list[str]:
    """n fresh "task_" + random UUID v4 strings (what uuid.uuid4() gives, from one os.urandom call)."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = raw[6::16].translate(_UUID_VERSION)
    raw[8::16] = raw[8::16].translate(_UUID_VARIANT)
    h = raw.hex()
    return [
        f"task_{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
        for i in range(0, 32 * n, 32)
    ]


class Server:
    """Holds the config, the broker, the backend and the registered tasks."""

    def __init__(
        self,
        cnf: Config | None = None,
        *,
        broker: Broker | None = None,
        backend: Backend | None = None,
        lock: Lock | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.cnf = cnf if cnf is not None else Config()
        if not isinstance(self.cnf, Config):
            raise MachineryError(f"Server needs a machinery.Config, got {type(self.cnf).__name__}")
        self.portal = Portal(event_loop=self.cnf.event_loop)
        self._broker = broker if broker is not None else registry.make_broker(self.cnf)
        self._backend = backend if backend is not None else registry.make_backend(self.cnf)
        self._lock = lock
        self._broker.attach(self.portal)
        self._backend.attach(self.portal)
        self._pairing = registry.find_pairing(self._broker, self._backend)
        self._pending = self._backend.capability(ConditionalPending)
        self._joint_send = capability_of(self._pairing, JointSend)
        self._blocking_send = capability_of(self._pairing, BlockingSend)
        self._tasks: dict[str, TaskSpec] = {}
        self._scheduler: PeriodicScheduler | None = None
        #: OpenTelemetry spans of sends and task runs (no-ops without the opentelemetry-api package);
        #: `tracer_provider` overrides the global provider
        self.tracing = Tracer(tracer_provider)

    # --- registry --------------------------------------------------------------------------

    def register_task(self, name: str, fn: Callable[..., Any], **options: Any) -> None:
        """Register `fn` under `name`; options (retry_count, ...) become signature defaults."""
        if not name:
            raise MachineryError("task name must not be empty")
        self._tasks[name] = TaskSpec.build(name, fn, **options)

    def register_tasks(self, tasks: Mapping[str, Callable[..., Any]]) -> None:
        for name, fn in tasks.items():
            self.register_task(name, fn)

    @overload
    def task(self, fn: Callable[..., Any], /, **options: Any) -> Task[Any, Any]: ...
    @overload
    def task(self, fn: None = None, /, **options: Any) -> Callable[[Callable[..., Any]], Task[Any, Any]]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, /, **options: Any
    ) -> Task[Any, Any] | Callable[[Callable[..., Any]], Task[Any, Any]]:
        """Decorator: register a function under its name (or `name=`), keeping it callable."""

        def wrap(f: Callable[..., Any]) -> Task[Any, Any]:
            task_name = str(options.pop("name", None) or getattr(f, "__name__", ""))
            self.register_task(task_name, f, **options)
            return Task(self, self._tasks[task_name])

        return wrap(fn) if fn is not None else wrap

    def is_task_registered(self, name: str) -> bool:
        return name in self._tasks

    def find_task(self, name: str) -> TaskSpec | None:
        return self._tasks.get(name)

    def get_registered_task(self, name: str) -> TaskSpec:
        try:
            return self._tasks[name]
        except KeyError:
            raise TaskNotRegisteredError(f"task {name!r} is not registered") from None

    @property
    def registered_tasks(self) -> dict[str, TaskSpec]:
        return dict(self._tasks)

    # --- accessors -------------------------------------------------------------------------

    def get_broker(self) -> Broker:
        return self._broker

    def get_backend(self) -> Backend:
        return self._backend

    def get_pairing(self) -> Pairing | None:
        """What the broker and backend can do together (machinery.drivers.capabilities.Pairing)."""
        return self._pairing

    def get_lock(self) -> Lock:
        if self._lock is None:
            self._lock = registry.make_lock(self.cnf)
        return self._lock

    def get_config(self) -> Config:
        return self.cnf

    # --- sending ---------------------------------------------------------------------------

    def _prepare(self, sig: Signature) -> None:
        if not isinstance(sig, Signature):
            raise MachineryError(f"expected a Signature, got {type(sig).__name__}")
        if not sig.uuid:
            sig.uuid = new_task_uuids(1)[0]
        if not sig.routing_key:
            sig.routing_key = self.cnf.default_queue
        if sig.headers is None:
            sig.headers = {}

    async def dispatch(self, sigs: Sequence[Signature], *, init_groups: bool = False) -> None:
        """Store PENDING for every signature, then publish them all (batched).

        With init_groups, the members of each group among `sigs` are recorded first: a chain step
        that is a group arrives here from the worker, where nobody called send_group.
        """
        if not sigs:
            return
        states, items, groups = self._plan(sigs, init_groups)
        await self._publish(states, items, groups)

    def plan_follow_ups(self, sigs: Sequence[Signature]) -> tuple[list[TaskState], list[PublishItem]] | None:
        """What dispatch(sigs, init_groups=True) would store and publish, for a worker's committer
        to send in the round trip of the state they follow; None when a group must be recorded
        first (dispatch does that)."""
        if any(sig.group_uuid for sig in sigs):
            return None
        states, items, _ = self._plan(sigs, False)
        return states, items

    def _plan(self, sigs: Sequence[Signature], init_groups: bool) -> tuple[
            list[TaskState], list[tuple[Signature, bytes, int | None]], dict[str, list[str]]]:
        """Fill in UUIDs, queues and headers; the PENDING states, the encoded messages and the
        groups to record (with init_groups)."""
        now = datetime.now(UTC)
        queue = self.cnf.default_queue
        items: list[tuple[Signature, bytes, int | None]] = []
        states: list[TaskState] = []
        groups: dict[str, list[str]] = {}
        fresh: Iterator[str] | None = None
        tracing = self.tracing.enabled
        for sig in sigs:  # _prepare, inlined: this loop is the cost of a bulk send
            if not isinstance(sig, Signature):
                raise MachineryError(f"expected a Signature, got {type(sig).__name__}")
            if not sig.uuid:
                if fresh is None:
                    fresh = iter(new_task_uuids(len(sigs)))
                sig.uuid = next(fresh)
            if not sig.routing_key:
                sig.routing_key = queue
            if sig.headers is None:
                sig.headers = {}
            if tracing:
                self.tracing.inject(sig.headers)
            eta = sig.eta
            items.append((sig, encode_signature(sig), gojson.time_ns(eta) if eta is not None else None))
            states.append(TaskState(sig.uuid, PENDING, task_name=sig.name, created_at=now))
            if init_groups and sig.group_uuid:
                groups.setdefault(sig.group_uuid, []).append(sig.uuid)
        return states, items, groups

    async def _publish(self, states: list[TaskState], items: list[tuple[Signature, bytes, int | None]],
                       groups: dict[str, list[str]]) -> None:
        for group_uuid, members in groups.items():
            await self._backend.init_group(group_uuid, members)
        if self._pending is not None:  # PENDING may land after the worker's first state: publish at once
            if self._joint_send is not None:
                await self._joint_send.send(states, items)
            else:
                await asyncio.gather(self._pending.set_pending(states), self._broker.publish_many(items))
        else:
            await self._backend.set_states(states)
            await self._broker.publish_many(items)

    async def asend_task(self, sig: Signature) -> AsyncResult:
        """Send one task; it runs now, or at `sig.eta`."""
        with self.tracing.send("SendTask", [sig]):
            await self.dispatch([sig])
        return AsyncResult(sig, self._backend, self.portal)

    def send_task(self, sig: Signature) -> AsyncResult:
        send = self._blocking_send
        if send is None:
            result: AsyncResult = self.portal.run(self.asend_task(sig))
            return result
        # In the caller's thread where the drivers can (see capabilities.BlockingSend): one command,
        # without the hand-over to the portal's thread, which costs more than the command.
        with self.tracing.send("SendTask", [sig]):
            states, items, _ = self._plan([sig], False)
            if not send.send_blocking(states[0], items[0]):
                self.portal.run(self._publish(states, items, {}))
        return AsyncResult(sig, self._backend, self.portal)

    async def asend_tasks(self, sigs: Iterable[Signature]) -> list[AsyncResult]:
        """Send many independent tasks in one batch (one round trip per store where the driver can)."""
        batch = list(sigs)
        with self.tracing.send("SendTasks", batch):
            await self.dispatch(batch)
        return [AsyncResult(s, self._backend, self.portal) for s in batch]

    def send_tasks(self, sigs: Iterable[Signature]) -> list[AsyncResult]:
        result: list[AsyncResult] = self.portal.run(self.asend_tasks(list(sigs)))
        return result

    async def asend_group(self, group: Group, send_concurrency: int = 0) -> list[AsyncResult]:
        """Record the group, then publish its members; send_concurrency > 0 publishes in chunks of that size."""
        if not isinstance(group, Group):
            raise MachineryError(f"send_group needs a Group, got {type(group).__name__}")
        sigs = group.signatures
        for sig in sigs:
            self._prepare(sig)
        with self.tracing.send("SendGroup", workflow="group"):
            await self._backend.init_group(group.group_uuid, group.task_uuids())
            if send_concurrency > 0:
                chunks = [sigs[i:i + send_concurrency] for i in range(0, len(sigs), send_concurrency)]
                for chunk in chunks:
                    await self.dispatch(chunk)
            else:
                await self.dispatch(sigs)
        return [AsyncResult(s, self._backend, self.portal) for s in sigs]

    def send_group(self, group: Group, send_concurrency: int = 0) -> list[AsyncResult]:
        result: list[AsyncResult] = self.portal.run(self.asend_group(group, send_concurrency))
        return result

    async def asend_chord(self, chord: Chord, send_concurrency: int = 0) -> ChordAsyncResult:
        """Send the chord's group; the callback is sent by the worker that completes the group."""
        if not isinstance(chord, Chord):
            raise MachineryError(f"send_chord needs a Chord, got {type(chord).__name__}")
        self._prepare(chord.callback)
        with self.tracing.send("SendChord", workflow="chord"):
            results = await self.asend_group(chord.group, send_concurrency)
        return ChordAsyncResult(results, AsyncResult(chord.callback, self._backend, self.portal), self.portal)

    def send_chord(self, chord: Chord, send_concurrency: int = 0) -> ChordAsyncResult:
        result: ChordAsyncResult = self.portal.run(self.asend_chord(chord, send_concurrency))
        return result

    async def asend_chain(self, chain: Chain) -> ChainAsyncResult:
        """Send the chain's first step; each later step is sent by the worker that finishes the one before."""
        if not isinstance(chain, Chain):
            raise MachineryError(f"send_chain needs a Chain, got {type(chain).__name__}")
        steps: list[AsyncResult | GroupAsyncResult] = []
        for step in chain.steps:
            if isinstance(step, Signature):
                self._prepare(step)
                steps.append(AsyncResult(step, self._backend, self.portal))
            elif isinstance(step, Chord):
                self._prepare(step.callback)
                steps.append(AsyncResult(step.callback, self._backend, self.portal))
            else:
                steps.append(GroupAsyncResult(
                    [AsyncResult(s, self._backend, self.portal) for s in step.signatures], self.portal))
        first = chain.first()
        with self.tracing.send("SendChain", workflow="chain"):
            if isinstance(first, Signature):
                await self.dispatch([first])
            elif isinstance(first, Chord):
                await self.asend_chord(first)
            else:
                await self.asend_group(first)
        return ChainAsyncResult(steps, self.portal)

    def send_chain(self, chain: Chain) -> ChainAsyncResult:
        result: ChainAsyncResult = self.portal.run(self.asend_chain(chain))
        return result

    # --- workers ---------------------------------------------------------------------------

    def new_worker(self, tag: str = "", concurrency: int = 10, queue: str | None = None) -> Worker:
        """A worker consuming `queue` (default queue when None); concurrency 0 = no limit, 1 = serial."""
        from machinery.worker import Worker

        return Worker(self, tag or f"worker_{_uuid.uuid4().hex[:8]}", concurrency, queue)

    def new_custom_queue_worker(self, tag: str, concurrency: int, queue: str) -> Worker:
        return self.new_worker(tag, concurrency, queue)

    # --- periodic --------------------------------------------------------------------------

    def _periodic(self) -> PeriodicScheduler:
        if self._scheduler is None:
            from machinery.periodic import PeriodicScheduler

            self._scheduler = PeriodicScheduler(self.get_lock())
        return self._scheduler

    def _start_periodic(self) -> None:
        scheduler = self._periodic()
        scheduler.start(self.portal)

    def register_periodic_task(self, spec: str, name: str, signature: Signature) -> None:
        """Send a fresh copy of `signature` on every tick of the cron `spec`, once across processes."""
        template = fresh_copy(signature)

        async def fire() -> None:
            await self.asend_task(fresh_copy(template))

        self._periodic().add(spec, name, fire)
        self._start_periodic()

    def register_periodic_group(self, spec: str, name: str, group: Group, send_concurrency: int = 0) -> None:
        template = group.copy()

        async def fire() -> None:
            await self.asend_group(template.copy(), send_concurrency)

        self._periodic().add(spec, name, fire)
        self._start_periodic()

    def register_periodic_chain(self, spec: str, name: str, chain: Chain) -> None:
        template = chain.copy()

        async def fire() -> None:
            await self.asend_chain(template.copy())

        self._periodic().add(spec, name, fire)
        self._start_periodic()

    def register_periodic_chord(self, spec: str, name: str, chord: Chord, send_concurrency: int = 0) -> None:
        template = chord.copy()

        async def fire() -> None:
            await self.asend_chord(template.copy(), send_concurrency)

        self._periodic().add(spec, name, fire)
        self._start_periodic()

    # --- lifecycle -------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._scheduler is not None:
            await self._scheduler.astop()
        await asyncio.gather(self._broker.close(), self._backend.close(), return_exceptions=True)

    def close(self) -> None:
        """Stop background schedules and release connections."""
        if self._scheduler is not None:
            self._scheduler.stop()
        try:
            self.portal.run(self.aclose(), timeout=10)
        finally:
            self.portal.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
