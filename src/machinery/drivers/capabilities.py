"""Capabilities: what only some drivers can do, each behind one interface the core uses.

The contracts beside this file (broker.py, backend.py, lock.py) hold the primitives every driver
implements. An optimisation or feature that only some technologies offer is a capability: one of
the small abstract classes below. The core asks `driver.capability(Kind)`, which returns an object
implementing `Kind` or None, and takes the generic path on None; it never asks what class a
driver is.

A driver declares a capability by inheriting its class (the accessor then returns the driver
itself), or by overriding `capability()` to return a helper object that implements it, or None
where one instance cannot offer it (a Redis Cluster has no blocking client).

Broker capabilities:  Leases, EarlyHandout, BlockingPublish, DelayedListing, DeadLetterListing.
Backend capabilities: ConditionalPending, ResultWakeups, BlockingReads.
Pairing capabilities: JointSend, JointCommit, BlockingSend. A pairing is a broker and a result
backend of one technology that share a server; its driver package finds it (see Pairing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from machinery.drivers.delivery import Delivery, PublishItem
    from machinery.tasks.state import TaskState
    from machinery.waiters import Waiters

C = TypeVar("C")


class Capable:
    """The accessor of brokers, backends, locks and pairings: which capabilities this one has."""

    def capability(self, kind: type[C]) -> C | None:
        """An implementation of `kind`, or None when this driver does not offer it.

        By default this object, when its class inherits `kind`. Drivers override it to hand out
        a helper object, or to withhold a capability that this instance cannot offer.
        """
        return self if isinstance(self, kind) else None


def capability_of(holder: Capable | None, kind: type[C]) -> C | None:
    """`holder.capability(kind)`, or None when there is no holder (no pairing, say)."""
    return None if holder is None else holder.capability(kind)


def interface(kind: type) -> set[str]:
    """The public members a capability's class defines: its methods, properties and attributes."""
    return {n for n in vars(kind) if not n.startswith("_")} | set(vars(kind).get("__annotations__", {}))


def check_declared(cls: type, kinds: Iterable[type], base: type) -> None:
    """Refuse a driver class that implements part of a capability without declaring it: the core
    would never use it (a renew() without Leases would leave long tasks to lapse)."""
    stray = [f"{kind.__name__}.{name}" for kind in kinds if not issubclass(cls, kind)
             for name in sorted(interface(kind)) if hasattr(cls, name) and not hasattr(base, name)]
    if stray:
        raise TypeError(f"{cls.__qualname__} defines {', '.join(stray)} without declaring the capability: "
                        "inherit its class from machinery.drivers.capabilities")


# --- broker capabilities ---------------------------------------------------------------------


class Leases(ABC):
    """A fetched delivery stays claimed for `lease_seconds`; past that, without renew(), it goes
    back to its queue. The worker renews the deliveries it holds every third of the lease.

    Declared by: sqlite, redis, sqs, gcppubsub brokers. Used by: Worker (its renew loop).
    """

    #: seconds a fetched delivery stays claimed without renew() (> 0)
    lease_seconds: float

    @abstractmethod
    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Extend the claim on these deliveries by `lease_seconds` from now; ones already lapsed
        or acked are left as they are."""


class EarlyHandout(ABC):
    """The broker hands a delivery out before its claim is complete, so that its task starts a
    round trip sooner (Redis: a message a blocked fetch moved into the consumer's own landing
    list). A task done quickly can then be acked in a joint commit without ever being claimed;
    anything that needs the delivery's receipt waits for the claim with settle().

    ack(), requeue(), renew() and dead_letter() settle by themselves.
    Declared by: redis broker. Used by: Worker (settle, claim_soon), Committer (unclaimed, hold).
    """

    @abstractmethod
    async def settle(self, deliveries: Sequence[Delivery]) -> None:
        """Wait until these deliveries are claimed (receipt, redelivered and attempts known)."""

    @abstractmethod
    def claim_soon(self, delivery: Delivery) -> None:
        """Start the claim of a delivery now, without waiting: for a task whose ack must wait for
        more than its state (follow-up sends), claimed meanwhile."""

    @abstractmethod
    def unclaimed(self, delivery: Delivery) -> bool:
        """Whether the delivery was handed out before any claim and still has none (its ack then
        holds up the next fetch, so it should not linger for company)."""

    @abstractmethod
    def hold(self, delivery: Delivery) -> bool:
        """Reserve the delivery for a joint commit that acks it now (True), or refuse because its
        claim is under way (False: ack it after the claim, with the next flush). True for a
        delivery that was claimed in the ordinary way."""


class BlockingPublish(ABC):
    """Publishes one message in the caller's thread, blocking, without the hand-over to the
    portal's event-loop thread (which costs more than one short command).

    Declared by: redis broker (standalone servers). Used by: the null backend's pairing (a send
    that stores nothing is only a publish), hence Server.send_task.
    """

    @abstractmethod
    def publish_blocking(self, item: PublishItem) -> bool:
        """Publish it; False when this message cannot go this way (a delayed one, say): the
        caller then takes the asyncio path."""


class DelayedListing(ABC):
    """Lists the messages held back by an ETA without consuming them.

    Declared by: memory, sqlite, redis, amqp brokers (SQS and Pub/Sub cannot list without
    receiving). Used by: Broker.get_delayed_tasks (and the CLI's `pending`).
    """

    @abstractmethod
    async def delayed(self) -> list[bytes]:
        """The bodies of held messages, earliest ETA first."""


class DeadLetterListing(ABC):
    """Reads back what dead_letter() set aside, with the reasons.

    Declared by: memory, sqlite, redis, amqp, sqs, gcppubsub brokers. Used by: operators' tools
    and the scenario suites.
    """

    @abstractmethod
    async def dead_letters(self) -> list[tuple[bytes, str]]:
        """(body, reason) of each dead-lettered message (oldest first where the store keeps order)."""


# --- backend capabilities --------------------------------------------------------------------


class ConditionalPending(ABC):
    """set_pending() never overwrites a stored state, so a send may store PENDING and publish at
    the same time (one round trip of latency instead of two): a worker's state that lands first
    is kept. Without it, PENDING is stored with set_states() before the publish.

    Declared by: memory, redis, memcache, mongodb, dynamodb backends. Used by: Server (sends).
    """

    @abstractmethod
    async def set_pending(self, states: Sequence[TaskState]) -> None:
        """Store these PENDING states where the task has no state yet; where a later state got
        there first, keep it (and, where the store can, give it PENDING's CreatedAt)."""


class ResultWakeups(ABC):
    """This backend wakes same-process waiters the moment it stores a completed state, so the
    generic wait (Backend.wait_completed) re-reads only as a safety net for other writers.

    Declared by: memory, sqlite, memcache, mongodb, dynamodb backends. Used by the generic wait.
    """

    #: longest pause between re-reads while waiting; None when every write goes through this
    #: object, so that wake-ups alone are enough (in-process stores)
    poll_cap: float | None = 0.05

    @property
    @abstractmethod
    def waiters(self) -> Waiters:
        """Notified with a task's UUID when this process stores its completed state."""

    def remote_wakeups(self) -> AbstractContextManager[bool]:
        """While inside, other processes' writes also wake `waiters` when it yields True (the
        SQLite doorbell); re-reads are then made `poll_cap` apart, without a back-off."""
        return nullcontext(False)


class BlockingReads(ABC):
    """State reads and result waits in the caller's thread, blocking: the sync facade skips the
    hand-over to the portal's event-loop thread. Either face reads what the other wrote.

    Declared by: redis backend (standalone servers). Used by: AsyncResult.get_state, wait_state, get.
    """

    @abstractmethod
    def get_state(self, task_uuid: str) -> TaskState | None:
        """The stored state now (None when nothing is stored)."""

    @abstractmethod
    def wait_completed(self, task_uuid: str, timeout: float | None) -> TaskState | None:
        """Wait for SUCCESS or FAILURE; None when `timeout` seconds pass first."""


# --- pairings: a broker and a backend together ---------------------------------------------------


class Pairing(Capable):
    """A broker and a result backend that can do together what two separate calls cannot (Redis:
    a state and its ack in one script, on one server).

    machinery.drivers.registry.find_pairing(broker, backend) asks the broker's driver package,
    then the backend's (packages of the registry's scheme tables): a package offers pairings with
    a module `pairing.py` whose function `pair(broker, backend) -> Pairing | None` recognises its
    own drivers. A pairing declares JointSend, JointCommit and BlockingSend as a driver declares
    its capabilities.
    """


#: a follow-up send carried by a joint commit: the PENDING states and the messages of those tasks
Send = tuple[Sequence["TaskState"], Sequence["PublishItem"]]


class JointSend(ABC):
    """Stores PENDING states (only where no state is stored) and publishes the messages in one
    round trip.

    Declared by: the redis pairing (broker and backend on one standalone server). Used by:
    Server (every send).
    """

    @abstractmethod
    async def send(self, states: Sequence[TaskState], items: Sequence[PublishItem]) -> None:
        """Store `states` as set_pending() does and publish `items`, together."""


class JointCommit(ABC):
    """Stores states and acks deliveries in one round trip, each paired state atomically with
    its delivery's ack, then sends follow-up tasks after the states in the same round trip.

    Declared by: the redis pairing. Used by: Committer (the worker's write-behind batches).
    """

    @abstractmethod
    async def commit(
        self, states: Sequence[TaskState], acks: Sequence[Delivery],
        paired: Sequence[tuple[TaskState, Delivery]], sends: Sequence[Send],
    ) -> tuple[Exception | None, Exception | None, list[int]]:
        """Store `states`, ack `acks`, store each paired state with its ack, then send `sends`.

        Returns the error of the state part and of the ack part (None = done; a failed pair or
        send counts as a state error) and the indices of the sends that may not have gone out,
        to be sent again.
        """


class BlockingSend(ABC):
    """Sends one task (its PENDING state and its message) in the caller's thread, blocking.

    Declared by: the redis pairing (standalone) and the null backend's pairing with a broker that
    has BlockingPublish. Used by: Server.send_task.
    """

    @abstractmethod
    def send_blocking(self, state: TaskState, item: PublishItem) -> bool:
        """Send it; False when this task cannot go this way (a delayed one, say): the caller then
        takes the asyncio path."""


BROKER_CAPABILITIES: tuple[type, ...] = (Leases, EarlyHandout, BlockingPublish, DelayedListing, DeadLetterListing)
BACKEND_CAPABILITIES: tuple[type, ...] = (ConditionalPending, ResultWakeups, BlockingReads)
PAIRING_CAPABILITIES: tuple[type, ...] = (JointSend, JointCommit, BlockingSend)
