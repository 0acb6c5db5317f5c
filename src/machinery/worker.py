"""Worker: fetches batches from the broker, runs tasks, stores states, then acks.

One event loop per process does all broker and backend I/O; `async def` tasks run on it and
plain functions on a thread pool sized by `concurrency`. A worker holds at most `prefetch`
unfinished messages, and nothing is acked before its final state (or its retry) is stored: a
worker that dies loses no task. Time limits: machinery.limits; prefetch, stopping and retiring:
machinery.lifecycle.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import random
import signal
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from machinery import lifecycle, loops, workflows
from machinery.committer import Committer
from machinery.context import RETRIES_HEADER, TaskContext, retries_done
from machinery.drivers.capabilities import EarlyHandout, JointCommit, Leases, Pairing, capability_of
from machinery.errors import (
    ArgTypeError,
    BackendError,
    BrokerError,
    DecodeError,
    MachineryError,
    RetryTaskLater,
    ServerClosedError,
    UsageError,
)
from machinery.limits import TimeLimiter, TimeLimits, seconds
from machinery.log import get_logger
from machinery.loopwatch import LoopWatch, task_codes
from machinery.retry import fibonacci_next
from machinery.tasks import gojson
from machinery.tasks.gotypes import to_wire
from machinery.tasks.signature import Signature, decode_signature
from machinery.tasks.state import FAILURE, RECEIVED, RETRY, STARTED, SUCCESS, TaskResult, TaskState
from machinery.threads import SyncRunner

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.drivers.backend import Backend
    from machinery.drivers.broker import Broker, Delivery, PublishItem
    from machinery.signing import Signer
    from machinery.task import TaskSpec
    from machinery.tracing import Tracer

MAX_FETCH_BATCH = 256
UNLIMITED_THREADS = 64
#: seconds before a message whose handling met a broker or backend error is tried again, and
#: the delivery after which even such a message is ended (FAILURE or dead letter)
BROKEN_RETRY_DELAY = 5.0
BROKEN_ATTEMPTS = 5
#: errors of the servers, not of the message: worth another try
_PASSING = (BrokerError, BackendError, ConnectionError, TimeoutError)
UNKNOWN_TASK_DELAY = 1.0
#: the key, in a delivery's extra, of the last progress its task reported
PROGRESS = "progress"
#: the longest traceback stored with a failure (its last part: the innermost frames and the error)
MAX_TRACEBACK = 16_384
#: the Headers key counting how often workers without the task handed it back
BOUNCES_HEADER = "machinery-bounces"



class Host(Protocol):
    """What a worker needs of its Server (a Protocol, so this module imports no server)."""

    cnf: Config
    tracing: Tracer
    signer: Signer | None

    @property
    def closed(self) -> bool: ...

    @property
    def registered_tasks(self) -> dict[str, TaskSpec]: ...

    def find_task(self, name: str) -> TaskSpec | None: ...

    def get_broker(self) -> Broker: ...

    def get_backend(self) -> Backend: ...

    def get_pairing(self) -> Pairing | None: ...

    def where(self) -> str: ...

    def encode(self, sig: Signature) -> bytes: ...

    async def dispatch(self, sigs: Sequence[Signature], *, init_groups: bool = False) -> None: ...

    def plan_follow_ups(self, sigs: Sequence[Signature]) -> tuple[list[TaskState], list[PublishItem]] | None: ...

class Worker:
    """Consumes one queue; create it with `server.new_worker(tag, concurrency, queue, ...)`.

    `prefetch`: unfinished messages held at most (None: `Config.prefetch`; 0: twice the
    concurrency; below the concurrency it bounds the running tasks too). `grace`: seconds a stop
    waits for running tasks before handing them back. `time_limit` / `soft_time_limit`: the
    default limits (None: Config's). `max_tasks` / `max_memory_mb` (0: none): the worker retires
    (stops by itself, `retired` says why) after that many messages or past that resident size.
    `supervised`: a supervisor replaces this process when it exits, so a thread that ignores its
    hard time limit retires the worker too (without, it is only logged).
    """

    def __init__(self, server: Host, tag: str, concurrency: int = 10, queue: str | None = None, *,
                 prefetch: int | None = None, grace: float = lifecycle.DEFAULT_GRACE,
                 time_limit: float | timedelta | None = None, soft_time_limit: float | timedelta | None = None,
                 max_tasks: int = 0, max_memory_mb: float = 0, supervised: bool = False) -> None:
        if not isinstance(concurrency, int) or concurrency < 0:
            raise MachineryError(f"worker concurrency must be an int >= 0 (0 = no limit), got {concurrency!r}")
        cnf = server.cnf
        self.server = server
        self.tag = tag
        self.concurrency = concurrency
        self.queue = queue or cnf.default_queue
        self.prefetch = (lifecycle.whole("prefetch", cnf.prefetch if prefetch is None else prefetch)
                         or 2 * (concurrency or MAX_FETCH_BATCH * 4))
        self.grace = lifecycle.amount("grace", grace)
        limits = [cnf.time_limit if time_limit is None else time_limit,
                  cnf.soft_time_limit if soft_time_limit is None else soft_time_limit]
        hard, soft = (seconds(v) for v in limits)
        if hard is None or soft is None:
            raise MachineryError(f"worker time limits must be seconds >= 0 or timedeltas, got {limits!r}")
        self.time_limits = TimeLimits(soft=soft, hard=hard)
        self.max_tasks = lifecycle.whole("max_tasks", max_tasks)
        self.max_memory_mb = lifecycle.amount("max_memory_mb", max_memory_mb)
        self.supervised = supervised
        self.retired = ""
        """Why the worker stopped by itself (max_tasks, max_memory_mb, a stuck thread); "" if it did not."""
        self._error_handler: Callable[[BaseException], Any] | None = None
        self._pre_task: Callable[[Signature], Any] | None = None
        self._post_task: Callable[[Signature], Any] | None = None
        self._pre_consume: Callable[[Worker], Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._abort: asyncio.Event | None = None
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._signals = 0
        self._active: dict[asyncio.Task[None], Delivery] = {}
        #: running task functions (what `concurrency` bounds); fetched messages wait for a slot
        self._slots: asyncio.Semaphore | None = None
        self._slot_freed: asyncio.Event | None = None
        self._pool: SyncRunner | None = None
        self._limiter: TimeLimiter | None = None
        self._memory: lifecycle.MemoryLimit | None = None
        #: fetched messages not started yet: handed back at once when the worker stops
        self._unstarted: set[Delivery] = set()
        self._committer: Committer | None = None
        self._early: EarlyHandout | None = None
        self.processed = 0
        self.aborted = False
        """True after an abrupt stop: sync tasks may still be running in abandoned threads."""

    # --- handlers (Go's API) ---------------------------------------------------------------

    def set_error_handler(self, fn: Callable[[BaseException], Any]) -> None:
        """Called with the exception of each final task failure and each consumer error."""
        self._error_handler = fn

    def set_pre_task_handler(self, fn: Callable[[Signature], Any]) -> None:
        self._pre_task = fn

    def set_post_task_handler(self, fn: Callable[[Signature], Any]) -> None:
        self._post_task = fn

    def set_pre_consume_handler(self, fn: Callable[[Worker], Any]) -> None:
        """Asked before each fetch; returning False pauses consumption briefly (no busy spin)."""
        self._pre_consume = fn

    # --- lifecycle -------------------------------------------------------------------------

    def launch(self) -> None:
        """Run until stopped; SIGINT/SIGTERM once stops gracefully, twice abruptly."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise UsageError("Worker.launch() blocks; inside an event loop use `await worker.alaunch()`")
        install = threading.current_thread() is threading.main_thread() and not self.server.cnf.no_unix_signals
        loops.run(self.alaunch(_signals=install), self.server.cnf.event_loop)

    def launch_async(self) -> concurrent.futures.Future[None]:
        """Run in a background thread; the future completes when the worker stops."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            try:
                loops.run(self.alaunch(), self.server.cnf.event_loop)
            except BaseException as exc:
                self._stopped.set()  # quit() must not wait for a worker that never started
                future.set_exception(exc)
            else:
                future.set_result(None)

        self._stopped.clear()
        threading.Thread(target=run, name=f"machinery-worker-{self.tag}", daemon=True).start()
        deadline = time.monotonic() + 10
        while not self._running.wait(0.01) and not future.done() and time.monotonic() < deadline:
            pass  # running, or failed to start (the future holds why)
        return future

    def quit(self, timeout: float | None = 30.0) -> None:
        """Stop gracefully: finish running tasks, store their states, ack; then return."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:
                pass
        try:
            in_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            in_loop = False
        if not in_loop:
            self._stopped.wait(timeout)

    async def aquit(self) -> None:
        if self._stop is not None:
            self._stop.set()
        await asyncio.to_thread(self._stopped.wait)

    def abort(self) -> None:
        """Stop at once: running tasks are cancelled and their messages given back to the broker."""
        loop, abort = self._loop, self._abort
        if loop is not None and abort is not None and not loop.is_closed():
            loop.call_soon_threadsafe(abort.set)

    @property
    def held(self) -> int:
        """Messages fetched and not finished yet (running, or waiting for a slot or their state
        write); at most `prefetch`. A finished message waits only for its ack's round trip."""
        return len(self._active)

    @property
    def is_running(self) -> bool:
        return self._running.is_set() and not self._stopped.is_set()

    async def alaunch(self, _signals: bool = False) -> None:
        """Run the worker on the current event loop until quit() or a signal."""
        if self.server.closed:
            raise ServerClosedError("this worker's Server is closed")
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        self._abort = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._slots = asyncio.Semaphore(self.concurrency or MAX_FETCH_BATCH * 4)
        self._signals = 0
        self._stopped.clear()
        self.retired = ""
        self._unstarted = set()
        threads = self.concurrency or UNLIMITED_THREADS
        self._pool = SyncRunner(loop, threads, f"machinery-{self.tag}")
        self._limiter = TimeLimiter(self.time_limits, self._pool, self._stuck)
        self._memory = lifecycle.MemoryLimit(self.tag, self.max_memory_mb, self._retire) if self.max_memory_mb else None
        broker, backend = self.server.get_broker(), self.server.get_backend()
        self._committer = Committer(backend, broker, capability_of(self.server.get_pairing(), JointCommit))
        self._early = broker.capability(EarlyHandout)
        if _signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal)
        log = get_logger()
        note = getattr(broker, "note_worker", None)  # a driver that records workers (SQLite: see its warning)
        if note is not None:
            try:
                await note(self.queue, self.tag)
            except Exception as exc:  # only a hint for producers; fetching reports real trouble
                log.warning("worker %s: could not record itself in the broker: %s", self.tag, exc)
        log.info("worker %s consuming %s (concurrency %s); %s", self.tag, self.queue,
                 self.concurrency or "unlimited", self.server.where())
        watch: LoopWatch | None = None
        if self.server.cnf.blocked_loop_warning > 0:
            codes = task_codes(self.server.registered_tasks.values())
            watch = LoopWatch(loop, self.server.cnf.blocked_loop_warning, codes, self.tag)
            watch.start()
        committer_task = loop.create_task(self._committer.run(), name="machinery-committer")
        renew_task = loop.create_task(self._renew_loop(), name="machinery-renew")
        consume_task = loop.create_task(self._consume_loop(), name="machinery-consume")
        self._running.set()
        try:
            stop_wait = loop.create_task(self._stop.wait())
            abort_wait = loop.create_task(self._abort.wait())
            await asyncio.wait([stop_wait, abort_wait, consume_task], return_when=asyncio.FIRST_COMPLETED)
            self._stop.set()
            # Drivers give back what a cancelled fetch had claimed, so stopping need not wait for it.
            consume_task.cancel()
            await asyncio.gather(consume_task, return_exceptions=True)
            if not self._abort.is_set():
                await self._hand_back({t: d for t, d in self._active.items() if d in self._unstarted},
                                      "fetched, not started")
                await self._await_running(abort_wait)
            if self._abort.is_set():
                self.aborted = True
                await self._abort_running()
            else:
                await asyncio.wait_for(self._committer.drain(), 30)
            for t in (stop_wait, abort_wait, consume_task):
                t.cancel()
        finally:
            if watch is not None:
                watch.stop()
            committer_task.cancel()
            renew_task.cancel()
            if _signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
            self._pool.shutdown()
            await asyncio.gather(broker.close(), backend.close(), return_exceptions=True)
            log.info("worker %s stopped", self.tag)
            self._stopped.set()
            self._running.clear()

    def _on_signal(self) -> None:
        self._signals += 1
        log = get_logger()
        if self._signals == 1:
            log.info("worker %s: stopping gracefully (signal again to stop at once)", self.tag)
            assert self._stop is not None
            self._stop.set()
        else:
            log.warning("worker %s: stopping abruptly", self.tag)
            assert self._abort is not None
            self._abort.set()

    async def _await_running(self, abort_wait: asyncio.Task[Any]) -> None:
        """Wait for the running tasks up to the grace, then hand back those still running."""
        if await lifecycle.wait_running(self._active, abort_wait, self.grace, self.tag):
            self.aborted = True  # their threads may still run
            await self._hand_back(dict(self._active), "still running after the grace")

    async def _hand_back(self, tasks: dict[asyncio.Task[None], Delivery], why: str) -> None:
        self._unstarted.difference_update(tasks.values())
        await lifecycle.hand_back(self.server.get_broker(), tasks, self.tag, why)

    def _retire(self, reason: str) -> None:
        """Stop by itself, as on a stop signal, recording why."""
        if not self.retired:
            self.retired = reason
            get_logger().info("worker %s retires: %s", self.tag, reason)
        if self._stop is not None:
            self._stop.set()

    def _stuck(self, what: str) -> None:
        """A thread abandoned at its hard time limit still runs."""
        if self.supervised:
            get_logger().error("worker %s: %s; the worker stops taking tasks, finishes the others and exits, "
                               "for its supervisor to start a fresh process", self.tag, what)
            self._retire(what)
        else:
            get_logger().warning("worker %s: %s; its slot is free, its thread still runs (under --processes, "
                                 "such a worker process would be replaced)", self.tag, what)

    async def _abort_running(self) -> None:
        deliveries = list(self._active.values())
        for task in list(self._active):
            task.cancel()
        if deliveries:
            try:
                await asyncio.wait_for(self.server.get_broker().requeue(deliveries), 5)
            except Exception as exc:  # the lease or connection loss returns them anyway
                get_logger().warning("could not give %d messages back: %s", len(deliveries), exc)

    # --- consuming -------------------------------------------------------------------------

    async def _consume_loop(self) -> None:
        assert self._stop is not None and self._slot_freed is not None
        broker = self.server.get_broker()
        backoff = 0
        while not self._stop.is_set():
            if self._pre_consume is not None and not await _maybe_await(self._pre_consume(self)):
                await _sleep_or(self._stop, 0.1)
                continue
            # At most `concurrency` tasks run and at most `prefetch` messages are held: the others
            # wait for a slot, or for their state write and ack. Fetching past the free slots keeps
            # batches large when tasks are short (fewer round trips per task).
            free = self.prefetch - len(self._active)
            if self.max_tasks:  # never take more than it may run: nothing to hand back when it retires
                left = self.max_tasks - self.processed - len(self._active)
                if left <= 0 and not self._active:
                    self._retire(f"it took its {self.max_tasks} tasks")
                    return
                free = min(free, left)
            if free <= 0:
                self._slot_freed.clear()
                await _first(self._slot_freed.wait(), self._stop.wait())
                continue
            try:
                deliveries = await broker.fetch(self.queue, min(free, MAX_FETCH_BATCH), 1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                backoff = fibonacci_next(backoff)
                get_logger().error("fetching from %s failed, retrying in %d s: %s", self.queue, backoff, exc)
                await self._report(exc)
                await _sleep_or(self._stop, backoff)
                continue
            backoff = 0
            for d in deliveries:
                task = asyncio.get_running_loop().create_task(self._handle(d))
                self._active[task] = d
                self._unstarted.add(d)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._active.pop(task, None)
        assert self._slot_freed is not None
        self._slot_freed.set()
        self.processed += 1
        if self._memory is not None:
            self._memory.after_task()
        if not task.cancelled() and task.exception() is not None:
            get_logger().error("internal error handling a message: %r", task.exception())

    async def _renew_loop(self) -> None:
        leases = self.server.get_broker().capability(Leases)
        if leases is None:
            return
        interval = max(0.05, leases.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            active = list(self._active.values())
            if active:
                try:
                    await leases.renew(active)
                except Exception as exc:
                    get_logger().error("renewing %d leases failed: %s", len(active), exc)

    # --- one message -----------------------------------------------------------------------

    async def _handle(self, d: Delivery) -> None:
        """Run one message to its end. Whatever goes wrong on the way (decoding, planning, running,
        retrying, storing) ends the message here, so none is left unsettled to come back forever
        or to hold a prefetch slot: FAILURE where it has a UUID, else the dead letters."""
        sig: Signature | None = None
        self._unstarted.discard(d)  # started: from here only the wait for a slot may be given up
        try:
            try:
                sig = decode_signature(d.body)
                if not sig.uuid:
                    raise DecodeError("message has no UUID: its state could not be stored")
                signer = self.server.signer
                refused = signer.check(d.body, sig) if signer is not None else None
                if refused is not None:
                    raise DecodeError(refused)
            except DecodeError as exc:
                sig = None
                get_logger().error("dead-lettering an undecodable message from %s: %s", d.queue, exc)
                await self.server.get_broker().dead_letter(d, str(exc))
                await self._report(exc)
                return
            spec = self.server.find_task(sig.name)
            if spec is None:
                await self._unknown(d, sig)
                return
            await self._run(d, sig, spec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._end_broken(d, sig, exc)

    async def _end_broken(self, d: Delivery, sig: Signature | None, exc: Exception) -> None:
        """The last word on a message whose handling raised: FAILURE with the reason where it has a
        UUID, else a dead letter; if even that cannot be written, the message goes back to the
        queue after a pause (settled, not held), to be tried again."""
        reason = f"internal error: {type(exc).__name__}: {exc}"
        broker = self.server.get_broker()
        if isinstance(exc, _PASSING) and d.attempts < BROKEN_ATTEMPTS:
            # the broker or backend failed, not the message: let it come back later, settled now
            get_logger().error("message %s from %s goes back to its queue: %s", sig.uuid if sig else "?",
                               d.queue, reason)
            try:
                await broker.requeue([d], BROKEN_RETRY_DELAY)
            except Exception as lost:
                get_logger().error("could not give the message back (the broker redelivers it): %s", lost)
            await self._report(exc)
            return
        get_logger().error("ending message %s from %s: %s", sig.uuid if sig else "?", d.queue, reason,
                           exc_info=(type(exc), exc, exc.__traceback__))
        try:
            if sig is not None:
                assert self._committer is not None
                exc_type, trace = failure_details(exc)
                await self._committer.store(TaskState(sig.uuid, FAILURE, task_name=sig.name, error=reason,
                                                      exc_type=exc_type, traceback=trace), ack=d)
            else:
                await broker.dead_letter(d, reason)
        except Exception as again:
            get_logger().error("could not end message %s: %s; giving it back", sig.uuid if sig else "?", again)
            try:
                await broker.requeue([d], BROKEN_RETRY_DELAY)
            except Exception as lost:
                get_logger().error("could not give message back either (the broker redelivers it): %s", lost)
        await self._report(exc)

    async def _unknown(self, d: Delivery, sig: Signature) -> None:
        """A task this worker does not have: hand it back for a worker that has it, counting the
        hand-backs in its Headers; past `Config.unregistered_bounces`, it is dead-lettered."""
        assert self._committer is not None
        if sig.ignore_when_task_not_registered:
            get_logger().warning("dropping task %s (%s): not registered here", sig.name, sig.uuid)
            self._committer.ack(d)
            return
        headers = sig.headers if sig.headers is not None else {}
        raw = headers.get(BOUNCES_HEADER, 0)
        bounces = (raw if type(raw) is int and raw >= 0 else 0) + 1
        limit = self.server.cnf.unregistered_bounces
        if limit and bounces > limit:
            reason = f"task {sig.name} is not registered on the workers that took it ({limit} hand-backs)"
            get_logger().error("dead-lettering task %s (%s): %s", sig.name, sig.uuid, reason)
            await self.server.get_broker().dead_letter(d, reason)
            return
        get_logger().warning("task %s (%s) is not registered on worker %s; handing it back (%d of %s)",
                             sig.name, sig.uuid, self.tag, bounces, limit or "unlimited")
        headers[BOUNCES_HEADER] = bounces
        sig.headers = headers
        # jittered, so that tasks handed back together do not come back in the same order and
        # meet the same workers each time (workers that register different tasks on one queue)
        sig.eta = datetime.now(UTC) + timedelta(seconds=UNKNOWN_TASK_DELAY * random.uniform(0.5, 1.5))
        await self.server.get_broker().publish(sig, self.server.encode(sig), gojson.time_ns(sig.eta))
        self._committer.ack(d)

    async def _run(self, d: Delivery, sig: Signature, spec: TaskSpec) -> None:
        tracing = self.server.tracing
        if not tracing.enabled:
            await self._execute(d, sig, spec, None)
            return
        with tracing.run(sig, d.queue, d.attempts) as span:  # follow-ups sent meanwhile carry it
            await self._execute(d, sig, spec, span)

    async def _execute(self, d: Delivery, sig: Signature, spec: TaskSpec, span: Any) -> None:
        committer = self._committer
        assert committer is not None
        try:
            args = spec.check_args(sig.python_args())
        except ArgTypeError as exc:
            await self._fail(d, sig, f"Reflect task args error: {exc}", exc, retry=False)
            return
        slots = self._slots
        assert slots is not None
        if slots.locked():  # RECEIVED while it waits for a slot (else STARTED replaces it unwritten)
            committer.put_state(TaskState(sig.uuid, RECEIVED, task_name=sig.name))
            self._unstarted.add(d)  # a stop meanwhile hands it back
        await slots.acquire()
        self._unstarted.discard(d)
        try:
            try:
                committer.put_state(TaskState(sig.uuid, STARTED, task_name=sig.name))
                if spec.wants_context:
                    if self._early is not None:  # the context carries the claim's attempt count
                        await self._early.settle([d])
                    args.insert(0, TaskContext(sig, self.tag, d.attempts, d.redelivered,
                                               reporter=self._progress_reporter(d, sig)))
                if self._pre_task is not None:
                    await self._call_handler(self._pre_task, sig)
                assert self._limiter is not None
                limits = self._limiter.limits_for(sig, spec.options)
                if limits is not None:
                    returned = await self._limiter.run(spec.fn, spec.is_async, args, sig, limits)
                elif spec.is_async:
                    returned = await spec.fn(*args)
                else:
                    assert self._pool is not None
                    returned = await self._pool.run(spec.fn, args)
            finally:
                slots.release()  # the slot takes new work while this state is written
            results = spec.make_results(returned)
            for r in results:
                to_wire(r.type, r.value)
        except RetryTaskLater as exc:
            self.server.tracing.failed(span, exc, retried=True)
            await self._retry(d, sig, str(exc), exc.delay)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.server.tracing.failed(span, exc, retried=sig.retry_count > 0)
            await self._fail(d, sig, str(exc) or type(exc).__name__, exc, retry=True)
        else:
            await self._succeed(d, sig, results)
        if self._post_task is not None:
            await self._call_handler(self._post_task, sig)

    async def _succeed(self, d: Delivery, sig: Signature, results: list[TaskResult]) -> None:
        assert self._committer is not None
        state = TaskState(sig.uuid, SUCCESS, task_name=sig.name, results=results, progress=d.extra.get(PROGRESS))
        if not sig.on_success and not workflows.in_chord(sig):
            await self._committer.store(state, ack=d)  # nothing follows: the ack goes with the state
            return
        follow = workflows.success_follow_ups(sig, results)
        plan = self.server.plan_follow_ups(follow) if follow and self._committer.carries_sends else None
        if plan is not None:  # a chain's next link: sent right after this state, one round trip
            await self._committer.store(state, send=plan)
        else:
            if self._early is not None:  # its ack waits for more round trips: claim it meanwhile
                self._early.claim_soon(d)
            await self._committer.store(state)
            if follow:
                await self.server.dispatch(follow, init_groups=True)
        if workflows.in_chord(sig):
            await self._chords().member_done(sig, "")
        self._committer.ack(d)

    async def _fail(self, d: Delivery, sig: Signature, error: str, exc: BaseException, retry: bool) -> None:
        delay = workflows.next_retry(sig) if retry else None
        if delay is not None:
            get_logger().warning("task %s (%s) failed, retry in %d s: %s", sig.name, sig.uuid,
                                 sig.retry_timeout, error)
            await self._retry(d, sig, error, delay)
            return
        assert self._committer is not None
        get_logger().error("task %s (%s) failed: %s", sig.name, sig.uuid, error,
                           exc_info=(type(exc), exc, exc.__traceback__))
        exc_type, trace = failure_details(exc)
        state = TaskState(sig.uuid, FAILURE, task_name=sig.name, error=error, exc_type=exc_type, traceback=trace,
                          progress=d.extra.get(PROGRESS))
        if not (sig.on_error or workflows.in_chord(sig) or sig.stop_task_deletion_on_error):
            await self._committer.store(state, ack=d)  # nothing follows: the ack goes with the state
            await self._report(exc)
            return
        await self._committer.store(state)
        await self._report(exc)
        if sig.on_error:
            await self.server.dispatch(workflows.error_follow_ups(sig, error), init_groups=True)
        if workflows.in_chord(sig):
            await self._chords().member_done(sig, error)
        if sig.stop_task_deletion_on_error:
            await self.server.get_broker().dead_letter(d, error)
        else:
            self._committer.ack(d)

    async def _retry(self, d: Delivery, sig: Signature, error: str, delay: timedelta) -> None:
        """Store RETRY, publish the task again with its ETA, then ack this delivery."""
        assert self._committer is not None
        await self._committer.store(TaskState(sig.uuid, RETRY, task_name=sig.name, error=error))
        sig.headers = {**(sig.headers or {}), RETRIES_HEADER: retries_done(sig) + 1}
        sig.eta = datetime.now(UTC) + delay
        await self.server.get_broker().publish(sig, self.server.encode(sig), gojson.time_ns(sig.eta))
        self._committer.ack(d)

    def _progress_reporter(self, d: Delivery, sig: Signature) -> Callable[[Any], None]:
        """`ctx.set_progress` for this run: a STARTED state carrying the value, queued on the
        worker's loop from whichever thread the task runs in; the final state keeps the last."""
        loop = asyncio.get_running_loop()
        committer = self._committer
        assert committer is not None

        def report(value: Any) -> None:
            d.extra[PROGRESS] = value
            state = TaskState(sig.uuid, STARTED, task_name=sig.name, progress=value)
            try:
                here = asyncio.get_running_loop() is loop
            except RuntimeError:
                here = False
            if here:
                committer.put_state(state)
            else:
                loop.call_soon_threadsafe(committer.put_state, state)

        return report

    def _chords(self) -> workflows.Chords:
        committer = self._committer
        assert committer is not None
        return workflows.Chords(self.server.get_backend(), self.server, committer.store,
                                go_members=self.server.cnf.go_chord_members)

    # --- helpers ---------------------------------------------------------------------------

    async def _report(self, exc: BaseException) -> None:
        if self._error_handler is not None:
            await self._call_handler(self._error_handler, exc)

    async def _call_handler(self, fn: Callable[[Any], Any], arg: Any) -> None:
        try:
            await _maybe_await(fn(arg))
        except Exception as exc:
            get_logger().error("handler %r raised: %s", fn, exc)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


async def _first(*aws: Any) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def failure_details(exc: BaseException) -> tuple[str, str]:
    """The exception's type (module-qualified, bare for builtins) and its traceback, at most
    MAX_TRACEBACK characters (the end kept)."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    text = "".join(traceback.format_exception(exc))
    if len(text) > MAX_TRACEBACK:
        text = "...\n" + text[-MAX_TRACEBACK:]
    return name, text
