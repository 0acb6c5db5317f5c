"""Server: the task registry plus the sending side (tasks, groups, chords, chains, periodic)."""

from __future__ import annotations

import asyncio
import atexit
import os
import uuid as _uuid
import weakref
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, Unpack, overload

from machinery.config import Config
from machinery.context import TaskContext
from machinery.drivers import registry
from machinery.drivers.capabilities import BlockingSend, ConditionalPending, JointSend, capability_of
from machinery.errors import MachineryError, OptionError, ServerClosedError, TaskNotRegisteredError
from machinery.log import get_logger
from machinery.options import TaskDefaults, check_defaults
from machinery.portal import Portal
from machinery.result import AsyncResult, ChainAsyncResult, ChordAsyncResult, GroupAsyncResult
from machinery.signing import Signer
from machinery.task import (
    ContextTask,
    CoroutineContextTask,
    CoroutineTask,
    FunctionTask,
    TaskSpec,
    task_class,
)
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
    from machinery.lifecycle import WorkerOptions
    from machinery.periodic import PeriodicScheduler
    from machinery.worker import Worker

P = ParamSpec("P")
R = TypeVar("R")

_UUID_VERSION = bytes((b & 0x0F) | 0x40 for b in range(256))  # byte 6: version 4
_UUID_VARIANT = bytes((b & 0x3F) | 0x80 for b in range(256))  # byte 8: RFC 4122 variant


def _check_signature(sig: Signature) -> None:
    """Refuse what would only fail later, on a worker or in a driver."""
    if not sig.name:
        raise MachineryError("a Signature needs a task name")
    if sig.eta is not None and not isinstance(sig.eta, datetime):
        raise OptionError(f"task {sig.name!r}: Signature.eta must be a datetime (naive = UTC), got "
                          f"{type(sig.eta).__name__} {sig.eta!r}; Task.with_options takes eta=timedelta "
                          "or countdown=seconds")


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


class TaskDecorator:
    """What `@server.task(...)` with options returns: registers the function it decorates."""

    def __init__(self, server: Server, name: str | None, options: Mapping[str, Any]) -> None:
        self._server = server
        self._name = name
        self._options = dict(options)

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[Concatenate[object, P], Coroutine[Any, Any, R]], /,
    ) -> CoroutineTask[Concatenate[object, P], R]: ...
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[Concatenate[object, P], R], /) -> FunctionTask[Concatenate[object, P], R]: ...
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]], /) -> CoroutineContextTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[Concatenate[TaskContext, P], R], /) -> ContextTask[P, R]: ...
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> CoroutineTask[P, R]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> FunctionTask[P, R]: ...

    def __call__(self, fn: Callable[..., Any], /) -> Any:
        name = self._name or str(getattr(fn, "__name__", ""))
        self._server.register_task(name, fn, **self._options)
        spec = self._server.get_registered_task(name)
        return task_class(spec)(self._server, spec)


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
        # resolved now, as the drivers resolve a relative SQLite path: against today's directory
        self._where = (registry.describe(self._broker.url) if self._broker.url else type(self._broker).__name__,
                       registry.describe(self._backend.url) if self._backend.url else type(self._backend).__name__)
        #: OpenTelemetry spans of sends and task runs (no-ops without the opentelemetry-api package);
        #: `tracer_provider` overrides the global provider
        self.tracing = Tracer(tracer_provider)
        #: signs what this server sends and checks what its workers run (Config.signing_key)
        self.signer = Signer(self.cnf.signing_key, self.cnf.signing_keys_old) if self.cnf.signing_key else None
        self._closed = False
        # Closes the Server at interpreter exit if the program did not: the portal's loop would
        # otherwise be dropped with pending tasks (a driver's reader) and asyncio complain.
        self._exit_hook = _exit_hook(self)
        atexit.register(self._exit_hook)

    # --- registry --------------------------------------------------------------------------

    def register_task(self, name: str, fn: Callable[..., Any], **options: Unpack[TaskDefaults]) -> None:
        """Register `fn` under `name`; options (retry_count, ...) become signature defaults; an
        unknown option raises OptionError."""
        if not name:
            raise MachineryError("task name must not be empty")
        self._tasks[name] = TaskSpec.build(name, fn, **check_defaults(name, options))

    def register_tasks(self, tasks: Mapping[str, Callable[..., Any]]) -> None:
        for name, fn in tasks.items():
            self.register_task(name, fn)

    # A first parameter annotated TaskContext is left out of P: the worker passes the context.
    # An `async def` gives Coroutine[Any, Any, R]: R is what awaiting it gives. The overloads are
    # tried in this order, so the specific ones overlap the general ones on purpose; the first two
    # keep a first parameter typed `object` (which would also take a TaskContext) in P.
    @overload
    def task(  # type: ignore[overload-overlap]
        self, fn: Callable[Concatenate[object, P], Coroutine[Any, Any, R]], /, *,
        name: str | None = None, **options: Unpack[TaskDefaults]) -> CoroutineTask[Concatenate[object, P], R]: ...
    @overload
    def task(  # type: ignore[overload-overlap]
        self, fn: Callable[Concatenate[object, P], R], /, *,
        name: str | None = None, **options: Unpack[TaskDefaults]) -> FunctionTask[Concatenate[object, P], R]: ...
    @overload
    def task(  # type: ignore[overload-overlap]
        self, fn: Callable[Concatenate[TaskContext, P], Coroutine[Any, Any, R]], /, *,
        name: str | None = None, **options: Unpack[TaskDefaults]) -> CoroutineContextTask[P, R]: ...
    @overload
    def task(
        self, fn: Callable[Concatenate[TaskContext, P], R], /, *,
        name: str | None = None, **options: Unpack[TaskDefaults]) -> ContextTask[P, R]: ...
    @overload
    def task(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, R]], /, *,
        name: str | None = None, **options: Unpack[TaskDefaults]) -> CoroutineTask[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /, *,
             name: str | None = None, **options: Unpack[TaskDefaults]) -> FunctionTask[P, R]: ...
    @overload
    def task(self, fn: None = None, /, *,
             name: str | None = None, **options: Unpack[TaskDefaults]) -> TaskDecorator: ...

    def task(self, fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
             **options: Unpack[TaskDefaults]) -> Any:
        """Decorator: register a function under its name (or `name=`), keeping it callable;
        `@server.task(name=..., retry_count=3)` sets the task's defaults."""
        decorator = TaskDecorator(self, name, options)
        return decorator(fn) if fn is not None else decorator

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

    def where(self) -> str:
        """Where tasks and results go, for people: "broker: ...; results: ..." (one part when they
        share a store), a SQLite file by its absolute path."""
        broker, backend = self._where
        if broker == backend:
            return f"broker and results: {broker}"
        return f"broker: {broker}; results: {backend}"

    # --- sending ---------------------------------------------------------------------------

    def _prepare(self, sig: Signature) -> None:
        if not isinstance(sig, Signature):
            raise MachineryError(f"expected a Signature, got {type(sig).__name__}")
        _check_signature(sig)
        if not sig.uuid:
            sig.uuid = new_task_uuids(1)[0]
        if not sig.routing_key:
            sig.routing_key = self.cnf.default_queue
        if sig.headers is None:
            sig.headers = {}

    def _prepare_nested(self, sig: Signature) -> None:
        """A signature that travels inside another (a chain link, a chord callback) gets only its
        UUID now: as in Go, its queue and headers stay empty until it is sent, so the default
        queue of the worker that sends it applies."""
        if not isinstance(sig, Signature):
            raise MachineryError(f"expected a Signature, got {type(sig).__name__}")
        if not sig.uuid:
            sig.uuid = new_task_uuids(1)[0]

    def encode(self, sig: Signature) -> bytes:
        """The message body for `sig`, signed when the config has a signing key."""
        return encode_signature(sig) if self.signer is None else self.signer.sign(sig)

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
        now = gojson.now()
        queue = self.cnf.default_queue
        items: list[tuple[Signature, bytes, int | None]] = []
        states: list[TaskState] = []
        groups: dict[str, list[str]] = {}
        fresh: Iterator[str] | None = None
        tracing = self.tracing.enabled
        signer = self.signer
        for sig in sigs:  # _prepare, inlined: this loop is the cost of a bulk send
            if not isinstance(sig, Signature):
                raise MachineryError(f"expected a Signature, got {type(sig).__name__}")
            if not sig.name or (sig.eta is not None and not isinstance(sig.eta, datetime)):
                _check_signature(sig)
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
            body = encode_signature(sig) if signer is None else signer.sign(sig)
            items.append((sig, body, gojson.time_ns(eta) if eta is not None else None))
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

    def _check_sends(self, sigs: Iterable[Signature]) -> None:
        """Refuse sends on a closed Server, and argument counts that the function registered here
        under the signature's name cannot take (the task would fail on the worker)."""
        if self._closed:
            raise ServerClosedError("this machinery Server is closed")
        tasks = self._tasks
        if tasks:
            for sig in sigs:
                spec = tasks.get(sig.name) if isinstance(sig, Signature) else None
                if spec is not None:
                    spec.check_count(len(sig.args))

    async def asend_task(self, sig: Signature) -> AsyncResult[Any]:
        """Send one task; it runs now, or at `sig.eta`."""
        self._check_sends((sig,))
        with self.tracing.send("SendTask", [sig]):
            await self.dispatch([sig])
        return AsyncResult(sig, self._backend, self.portal)

    def send_task(self, sig: Signature) -> AsyncResult[Any]:
        send = self._blocking_send
        if send is None:
            result: AsyncResult[Any] = self.portal.run(self.asend_task(sig))
            return result
        self._check_sends((sig,))
        # In the caller's thread where the drivers can (see capabilities.BlockingSend): one command,
        # without the hand-over to the portal's thread, which costs more than the command.
        with self.tracing.send("SendTask", [sig]):
            states, items, _ = self._plan([sig], False)
            if not send.send_blocking(states[0], items[0]):
                self.portal.run(self._publish(states, items, {}))
        return AsyncResult(sig, self._backend, self.portal)

    async def asend_tasks(self, sigs: Iterable[Signature]) -> list[AsyncResult[Any]]:
        """Send many independent tasks in one batch (one round trip per store where the driver can)."""
        batch = list(sigs)
        self._check_sends(batch)
        with self.tracing.send("SendTasks", batch):
            await self.dispatch(batch)
        return [AsyncResult(s, self._backend, self.portal) for s in batch]

    def send_tasks(self, sigs: Iterable[Signature]) -> list[AsyncResult[Any]]:
        result: list[AsyncResult[Any]] = self.portal.run(self.asend_tasks(list(sigs)))
        return result

    async def asend_group(self, group: Group, send_concurrency: int = 0) -> list[AsyncResult[Any]]:
        """Record the group, then publish its members; send_concurrency > 0 publishes in chunks of that size."""
        if not isinstance(group, Group):
            raise MachineryError(f"send_group needs a Group, got {type(group).__name__}")
        sigs = group.signatures
        self._check_sends(sigs)
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

    def send_group(self, group: Group, send_concurrency: int = 0) -> list[AsyncResult[Any]]:
        result: list[AsyncResult[Any]] = self.portal.run(self.asend_group(group, send_concurrency))
        return result

    async def asend_chord(self, chord: Chord, send_concurrency: int = 0) -> ChordAsyncResult:
        """Send the chord's group; the callback is sent by the worker that completes the group."""
        if not isinstance(chord, Chord):
            raise MachineryError(f"send_chord needs a Chord, got {type(chord).__name__}")
        self._prepare_nested(chord.callback)
        if chord.callback.headers is None:  # Go's SendChord gives the callback headers (its span's carrier)
            chord.callback.headers = {}
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
        steps: list[AsyncResult[Any] | GroupAsyncResult] = []
        for step in chain.steps:
            if isinstance(step, Signature):
                self._prepare_nested(step)
                steps.append(AsyncResult(step, self._backend, self.portal))
            elif isinstance(step, Chord):
                self._prepare_nested(step.callback)
                steps.append(AsyncResult(step.callback, self._backend, self.portal))
            else:
                steps.append(GroupAsyncResult(
                    [AsyncResult(s, self._backend, self.portal) for s in step.signatures], self.portal))
        first = chain.first()
        self._check_sends([first] if isinstance(first, Signature) else [])
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

    def new_worker(self, tag: str = "", concurrency: int = 10, queue: str | None = None,
                   **options: Unpack[WorkerOptions]) -> Worker:
        """A worker consuming `queue` (default queue when None); concurrency 0 = no limit, 1 = serial;
        `options`: prefetch, grace, time limits, recycling (see Worker)."""
        from machinery.worker import Worker

        self._check_open()
        return Worker(self, tag or f"worker_{_uuid.uuid4().hex[:8]}", concurrency, queue, **options)

    def new_custom_queue_worker(self, tag: str, concurrency: int, queue: str) -> Worker:
        return self.new_worker(tag, concurrency, queue)

    # --- periodic --------------------------------------------------------------------------

    def _periodic(self) -> PeriodicScheduler:
        if self._scheduler is None:
            from machinery.periodic import PeriodicScheduler

            self._scheduler = PeriodicScheduler(self.get_lock())
        return self._scheduler

    def register_periodic_task(self, spec: str, name: str, signature: Signature) -> None:
        """Send a fresh copy of `signature` on every tick of the cron `spec`, once across processes,
        in the processes that run the schedules (see start_scheduler); a bad spec raises CronError
        (a ConfigError) here."""
        _expect(signature, Signature, "register_periodic_task")
        self._check_sends([signature])
        template = fresh_copy(signature)

        async def fire() -> None:
            await self.asend_task(fresh_copy(template))

        self._periodic().add(spec, name, fire)

    def register_periodic_group(self, spec: str, name: str, group: Group, send_concurrency: int = 0) -> None:
        _expect(group, Group, "register_periodic_group")
        self._check_sends(group.signatures)
        template = group.copy()

        async def fire() -> None:
            await self.asend_group(template.copy(), send_concurrency)

        self._periodic().add(spec, name, fire)

    def register_periodic_chain(self, spec: str, name: str, chain: Chain) -> None:
        _expect(chain, Chain, "register_periodic_chain")
        first = chain.first()
        self._check_sends([first] if isinstance(first, Signature) else [])
        template = chain.copy()

        async def fire() -> None:
            await self.asend_chain(template.copy())

        self._periodic().add(spec, name, fire)

    def register_periodic_chord(self, spec: str, name: str, chord: Chord, send_concurrency: int = 0) -> None:
        _expect(chord, Chord, "register_periodic_chord")
        self._check_sends(chord.group.signatures)
        template = chord.copy()

        async def fire() -> None:
            await self.asend_chord(template.copy(), send_concurrency)

        self._periodic().add(spec, name, fire)

    @property
    def periodic_tasks(self) -> list[str]:
        """The names of the registered schedules."""
        return self._scheduler.names() if self._scheduler is not None else []

    def start_scheduler(self) -> None:
        """Run the registered schedules (and any registered later) in the background of this
        process until close() or stop_scheduler().

        Registering a schedule does not run it: only the processes that ask for it do (this call,
        `machinery scheduler`, `machinery worker --scheduler`), so a script that merely imports the
        app sends no ticks. Any number of processes may run the same schedules; each tick is sent
        once, by the process that wins its lock.
        """
        self._periodic().start(self.portal)

    def stop_scheduler(self) -> None:
        """Stop running the schedules in this process (they stay registered)."""
        if self._scheduler is not None:
            self._scheduler.stop()

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ServerClosedError("this machinery Server is closed")

    async def _close_drivers(self) -> None:
        """Release the broker's and backend's connections made on the running loop."""
        await asyncio.gather(self._broker.close(), self._backend.close(), return_exceptions=True)

    async def aclose(self) -> None:
        """close()'s awaitable twin: stops schedules, releases the connections of this loop and of
        the sync facade's loop, and ends that loop's thread. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._exit_hook)
        if self._scheduler is not None:
            await self._scheduler.astop()
        await self._close_drivers()
        if self.portal.in_portal():
            self.portal.close()  # from its own loop: it stops once this task is done
        elif self.portal.started:
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.portal.submit(self._close_drivers())), 10)
            finally:
                await asyncio.to_thread(self.portal.close)
        else:
            self.portal.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop background schedules, release connections and end the sync facade's loop thread.
        Closing again does nothing; sending or waiting afterwards raises ServerClosedError."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._exit_hook)
        try:
            if self._scheduler is not None:
                self._scheduler.stop()
            self.portal.run(self._close_drivers(), timeout=timeout)
        finally:
            self.portal.close()

    def _close_at_exit(self) -> None:
        if self._closed:
            return
        if not self.portal.started:  # nothing of ours runs on a loop: the OS closes the sockets
            self._closed = True
            self.portal.close()
            return
        try:
            self.close(timeout=2.0)
        except Exception as exc:  # at exit: say why, never raise
            get_logger().debug("closing the Server at exit failed: %s", exc)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _expect(value: object, kind: type, where: str) -> None:
    if not isinstance(value, kind):
        raise MachineryError(f"{where} needs a {kind.__name__}, got {type(value).__name__}")


def _exit_hook(server: Server) -> Callable[[], None]:
    """An atexit function that closes `server` if it is still alive and open; it holds the
    Server weakly, and unregisters itself when the Server is collected."""

    def close_at_exit() -> None:
        alive = ref()
        if alive is not None:
            alive._close_at_exit()

    ref = weakref.ref(server, lambda _: atexit.unregister(close_at_exit))
    return close_at_exit
