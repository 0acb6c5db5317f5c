"""Go Machinery's integration scenarios (spec section 13) on SQS (the run's moto server) + Redis backend."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

import sqs_support
from machinery import Config
from redis_servers import redis_url
from scenarios import ScenarioSuite


class TestSQSRedisScenarios(ScenarioSuite):
    """Each test gets its own queues, deleted afterwards."""

    cnf: Config

    @pytest.fixture(autouse=True)
    def _isolated(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        monkeypatch.setenv("DISABLE_STRICT_SQS_CHECK", "1")  # the emulator's http:// URL selects SQS
        self.cnf = sqs_support.sqs_config()
        yield
        asyncio.run(sqs_support.delete_queues(self.cnf.default_queue))

    def make_config(self, tmp_path: Path) -> Config:
        self.cnf.result_backend = redis_url()
        return self.cnf
