"""The taskiq broker and tasks the benchmark runs: taskiq-redis's stream broker (acknowledged delivery)."""

from __future__ import annotations

from benchkit import mark, settings
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

cfg = settings()
broker = RedisStreamBroker(cfg.broker_url, queue_name=cfg.queue)
if cfg.results:
    broker = broker.with_result_backend(RedisAsyncResultBackend(cfg.result_url, result_ex_time=600))


@broker.task(task_name="noop")
async def noop() -> None:
    mark()


@broker.task(task_name="ping")
async def ping() -> int:
    return 1
