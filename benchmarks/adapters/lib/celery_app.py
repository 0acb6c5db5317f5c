"""The Celery app the benchmark runs: a no-op task, a ping, and the workflow tasks."""

from __future__ import annotations

from typing import Any

from benchkit import mark, settings
from celery import Celery

cfg = settings()
app = Celery("bench", broker=cfg.broker_url, backend=cfg.result_url or None)
app.conf.update(
    task_default_queue=cfg.queue,
    task_ignore_result=not cfg.results,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop() -> None:
    mark()


@app.task(name="ping", ignore_result=False)
def ping() -> int:
    return 1


@app.task(name="add_one", ignore_result=False)
def add_one(x: int) -> int:
    return x + 1


@app.task(name="collect", ignore_result=False)
def collect(values: list[Any]) -> int:
    return len(values)
