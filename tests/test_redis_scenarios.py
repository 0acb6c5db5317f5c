"""Go Machinery's integration scenarios (spec section 13) on Redis broker + Redis backend.

Standalone Redis (db 15 of the shared server) and the private 3-master Redis Cluster; each test
gets its own queue and delayed-set names.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from machinery import Config
from machinery.config import RedisConfig
from redis_servers import redis_url, shared_cluster
from scenarios import ScenarioSuite

pytestmark = pytest.mark.redis


def _config(url: str) -> Config:
    ns = uuid.uuid4().hex[:10]
    return Config(broker=url, result_backend=url, default_queue=f"machinery_tasks_{ns}",
                  redis=RedisConfig(delayed_tasks_key=f"delayed_tasks_{ns}"))


class TestRedisRedisScenarios(ScenarioSuite):
    def make_config(self, tmp_path: Path) -> Config:
        url = redis_url()
        client = redis.Redis.from_url(url)
        try:
            client.delete("machinery:dead_letters")
        finally:
            client.close()
        return _config(url)


class TestRedisClusterScenarios(ScenarioSuite):
    def make_config(self, tmp_path: Path) -> Config:
        return _config(shared_cluster().url)
