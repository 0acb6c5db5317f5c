"""TaskContext: what a task function may ask for by annotating its first parameter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from machinery.tasks.signature import Signature


@dataclass(slots=True)
class TaskContext:
    """The running task's signature plus delivery facts (Go's tasks.SignatureFromContext, and more)."""

    signature: Signature
    worker_name: str = ""
    attempts: int = 1
    """How many times the broker has handed this message out (1 on the first delivery)."""
    redelivered: bool = False
    """True when the message was given out before, e.g. after its worker died."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, Any]:
        return self.signature.headers or {}

    @property
    def task_uuid(self) -> str:
        return self.signature.uuid

    @property
    def retry_count(self) -> int:
        """Retries left after this attempt."""
        return self.signature.retry_count

    @property
    def retry_timeout(self) -> int:
        """The last retry delay in seconds (Fibonacci state)."""
        return self.signature.retry_timeout
