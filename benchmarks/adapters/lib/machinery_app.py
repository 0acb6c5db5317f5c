"""The machinery server and tasks the benchmark runs (async tasks, on the worker's event loop)."""

from __future__ import annotations

from benchkit import mark, settings

from machinery import Config, Server

cfg = settings()
if cfg.transport == "sqlite":
    # The embedded default: broker and backend in ./machinery.sqlite3 (the adapter's work dir).
    cnf = Config(default_queue=cfg.queue) if cfg.results else Config(default_queue=cfg.queue, result_backend="null://")
else:
    cnf = Config(broker=cfg.broker_url, result_backend=cfg.result_url or "null://", default_queue=cfg.queue)
server = Server(cnf)


@server.task
async def noop() -> None:
    mark()


@server.task
async def ping() -> int:
    return 1


@server.task
async def add_one(x: int) -> int:
    return x + 1


@server.task
async def collect(*values: int) -> int:
    return len(values)
