"""TaskContext: what a task function may ask for by annotating its first parameter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from machinery.tasks import gojson

if TYPE_CHECKING:
    from machinery.tasks.signature import Signature

#: signature header in which workers count the retries done (a retry is a new message, so the
#: broker's delivery count starts again; Go workers carry the header on without counting)
RETRIES_HEADER = "machinery_retries"


def retries_done(sig: Signature) -> int:
    """The retries counted in the signature's headers (0 when none was)."""
    value = (sig.headers or {}).get(RETRIES_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(slots=True)
class TaskContext:
    """The running task's signature plus delivery facts (Go's tasks.SignatureFromContext, and more)."""

    signature: Signature
    worker_name: str = ""
    attempts: int = 1
    """Deliveries of this message: 1, or more when it was handed out again after its worker died.
    Not a retry counter: a retry is sent as a new message, whose attempts start at 1 (see retries)."""
    redelivered: bool = False
    """True when the message was given out before, e.g. after its worker died."""
    extra: dict[str, Any] = field(default_factory=dict)
    #: stores a progress value (set by the worker); None outside a worker
    reporter: Callable[[Any], None] | None = field(default=None, repr=False)

    def set_progress(self, value: Any) -> None:
        """Report how far the task has got (any JSON value): stored with its state, read by
        `AsyncResult.progress()`; the last value stays with the final state. Safe from the
        worker's threads; reports close together are coalesced (the latest wins)."""
        gojson.encode(value)  # not JSON: ArgTypeError here, in the task, not at the write
        if self.reporter is not None:
            self.reporter(value)

    @property
    def headers(self) -> dict[str, Any]:
        return self.signature.headers or {}

    @property
    def task_uuid(self) -> str:
        return self.signature.uuid

    @property
    def retries(self) -> int:
        """Retries done before this run, counting up: 0 on the first run, 1 on the first retry...
        Both kinds count: a failure retried under retry_count, and RetryTaskLater."""
        return retries_done(self.signature)

    @property
    def retry_count(self) -> int:
        """Retries left after this run (counts down; RetryTaskLater does not use them)."""
        return self.signature.retry_count

    @property
    def retry_timeout(self) -> int:
        """The last retry delay in seconds (Fibonacci state)."""
        return self.signature.retry_timeout
