"""The Broker contract: the few primitives each driver implements.

Retries, workflows, state writes, prefetch bounds and lease renewal scheduling live once in the
worker and server; a driver only moves bytes. Everything here is asyncio; drivers must work from
any event loop (keep per-loop connections with `machinery.loops.PerLoop`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from machinery.drivers.capabilities import BROKER_CAPABILITIES, Capable, DelayedListing, check_declared
from machinery.drivers.delivery import Delivery, PublishItem
from machinery.portal import PortalUser
from machinery.tasks.signature import Signature, decode_signature

if TYPE_CHECKING:
    from machinery.config import Config

T = TypeVar("T")


__all__ = ["Broker", "Delivery", "PublishItem"]  # Delivery and PublishItem live in delivery.py


class Broker(PortalUser, Capable, ABC):
    """Moves encoded signatures between producers and workers.

    The primitives below are the whole contract; what only some brokers can do (leases, listing
    delayed messages or dead letters, ...) is a capability: see machinery.drivers.capabilities.
    """

    def __init__(self, cnf: Config, url: str = "") -> None:
        self.cnf = cnf
        self.url = url

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_declared(cls, BROKER_CAPABILITIES, Broker)

    # --- primitives ------------------------------------------------------------------------

    @abstractmethod
    async def publish(self, sig: Signature, body: bytes, eta_ns: int | None) -> None:
        """Enqueue `body` on `sig.routing_key`; when `eta_ns` (Unix ns) is in the future, hold it until then."""

    async def publish_many(self, items: Sequence[tuple[Signature, bytes, int | None]]) -> None:
        """Enqueue several messages; drivers override this with one round trip."""
        for sig, body, eta_ns in items:
            await self.publish(sig, body, eta_ns)

    @abstractmethod
    async def fetch(self, queue: str, max_count: int, wait: float) -> list[Delivery]:
        """Claim up to `max_count` ready messages, waiting up to `wait` seconds for the first one.

        Claimed messages stay invisible to other consumers until ack(), requeue(), or (for leased
        brokers) lease expiry without renew().
        """

    @abstractmethod
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Remove finished messages for good."""

    @abstractmethod
    async def requeue(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        """Give messages back to their queue, visible again after `delay` seconds."""

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move an unusable message (undecodable, malformed) aside, keeping the reason."""

    @abstractmethod
    async def pending(self, queue: str) -> list[bytes]:
        """The bodies waiting in `queue`, oldest first, without consuming them."""

    async def close(self) -> None:
        """Release connections of the current event loop."""

    # --- conveniences built on the primitives ----------------------------------------------

    async def aget_pending_tasks(self, queue: str = "") -> list[Signature]:
        return [decode_signature(b) for b in await self.pending(queue or self.cnf.default_queue)]

    def get_pending_tasks(self, queue: str = "") -> list[Signature]:
        """Signatures waiting in `queue` (default queue when empty), oldest first."""
        return self._run(self.aget_pending_tasks(queue))

    async def aget_delayed_tasks(self) -> list[Signature]:
        listing = self.capability(DelayedListing)
        return [] if listing is None else [decode_signature(b) for b in await listing.delayed()]

    def get_delayed_tasks(self) -> list[Signature]:
        """Signatures held back until their ETA ([] where the broker cannot list them: DelayedListing)."""
        return self._run(self.aget_delayed_tasks())
