"""The null result backend with any broker that publishes in the caller's thread: a sync send
stores nothing, so it is that blocking publish alone, without the portal's thread hop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from machinery.drivers.capabilities import BlockingPublish, BlockingSend, Pairing
from machinery.drivers.memory.null import NullBackend

if TYPE_CHECKING:
    from machinery.drivers.backend import Backend
    from machinery.drivers.broker import Broker, PublishItem
    from machinery.tasks.state import TaskState


def pair(broker: Broker, backend: Backend) -> Pairing | None:
    if not isinstance(backend, NullBackend):
        return None
    publisher = broker.capability(BlockingPublish)
    return None if publisher is None else NullPairing(publisher)


class NullPairing(Pairing, BlockingSend):
    """BlockingSend: the broker's blocking publish (there is no state to store)."""

    def __init__(self, publisher: BlockingPublish) -> None:
        self.publisher = publisher

    def send_blocking(self, state: TaskState, item: PublishItem) -> bool:
        return self.publisher.publish_blocking(item)
