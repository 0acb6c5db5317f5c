"""What moves through a broker: a fetched message with the driver's handle, and what a publish takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from machinery.tasks.signature import Signature

#: what publish_many takes: the signature, its encoded body, and its ETA in Unix ns (None = now)
PublishItem = tuple[Signature, bytes, int | None]


@dataclass(slots=True, eq=False)
class Delivery:
    """One fetched message. `receipt` is the driver's handle (row id, delivery tag, receipt handle)."""

    body: bytes
    queue: str
    receipt: Any = None
    redelivered: bool = False
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
