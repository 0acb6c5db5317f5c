"""Helpers for users' own tests: an in-memory server and a worker that runs for a `with` block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from machinery.config import Config
from machinery.server import Server
from machinery.worker import Worker


def memory_server(**config: object) -> Server:
    """A Server whose broker and backend live in this process (nothing to start, nothing left behind)."""
    return Server(Config(broker="memory://", result_backend="memory://", **config))  # type: ignore[arg-type]


@contextmanager
def running_worker(server: Server, concurrency: int = 10, queue: str | None = None,
                   name: str = "test-worker") -> Iterator[Worker]:
    """Run a worker in a background thread for the duration of the block, then stop it gracefully."""
    worker = server.new_worker(name, concurrency, queue)
    done = worker.launch_async()
    try:
        yield worker
    finally:
        worker.quit()
        done.result(timeout=30)
