"""The Dramatiq broker and actors the benchmark runs (Redis or RabbitMQ; results in Redis when on)."""

from __future__ import annotations

import dramatiq
from benchkit import mark, settings
from dramatiq.middleware import GroupCallbacks
from dramatiq.rate_limits.backends import RedisBackend as RedisRateLimiterBackend
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

cfg = settings()
if cfg.transport == "amqp":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker: dramatiq.Broker = RabbitmqBroker(url=cfg.broker_url)
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=cfg.broker_url)
if cfg.results:
    broker.add_middleware(Results(backend=RedisBackend(url=cfg.result_url), result_ttl=600_000))
    broker.add_middleware(GroupCallbacks(RedisRateLimiterBackend(url=cfg.result_url)))
dramatiq.set_broker(broker)
RESULT_OPTS = {"store_results": True} if cfg.results else {}


@dramatiq.actor(queue_name=cfg.queue, max_retries=0, **RESULT_OPTS)
def noop() -> None:
    mark()


@dramatiq.actor(queue_name=cfg.queue, max_retries=0, **RESULT_OPTS)
def ping() -> int:
    return 1


@dramatiq.actor(queue_name=cfg.queue, max_retries=0, **RESULT_OPTS)
def add_one(x: int) -> int:
    return x + 1


@dramatiq.actor(queue_name=cfg.queue, max_retries=0, **RESULT_OPTS)
def done() -> int:
    return 1
