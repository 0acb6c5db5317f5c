"""Go Machinery's integration scenarios (spec section 13) on GCP Pub/Sub (the emulator) with a SQLite
result backend, plus a SIGKILLed worker and a custom-queue worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from machinery import Config, Server, Signature
from machinery.config import GCPPubSubConfig
from pubsub_emulator import PROJECT, delete_resources, emulator_host, raw_clients
from scenarios import ScenarioSuite, custom_queue_worker
from victims import kill_victim_then_rescue

pytestmark = pytest.mark.gcppubsub



@pytest.fixture
def names() -> Iterator[str]:
    host = emulator_host()
    ns = f"ps_{uuid.uuid4().hex[:12]}"
    yield ns
    delete_resources(host, PROJECT, ns)


def make_cnf(ns: str, tmp_path: Path, lease_seconds: float = 30.0) -> Config:
    return Config(
        broker=f"gcppubsub://{PROJECT}/{ns}_sub",
        default_queue=f"{ns}_tasks",
        result_backend=f"sqlite:///{tmp_path / 'results.sqlite3'}",
        gcppubsub=GCPPubSubConfig(lease_seconds=lease_seconds),
    )


class TestPubSubSQLiteScenarios(ScenarioSuite):
    @pytest.fixture(autouse=True)
    def _names(self, names: str) -> None:
        self.ns = names

    def make_config(self, tmp_path: Path) -> Config:
        # A Pull whose answer is lost (its deadline passed while the loaded emulator stalled) leaves
        # its messages leased to nobody until the ack deadline: at 10 s they come back well within
        # a scenario's 30 s wait (at 30 s, as the default, such a run timed out once in CI-like load)
        return make_cnf(self.ns, tmp_path, lease_seconds=10)


def test_custom_queue_worker_reads_its_own_subscription(names: str, tmp_path: Path) -> None:
    cnf = make_cnf(names, tmp_path)
    with custom_queue_worker(cnf, f"{names}_custom") as (_, default_res), pytest.raises(TimeoutError):
        default_res.get(timeout=0.5)
    # The default task is still waiting in the URL's subscription.
    with raw_clients(emulator_host()) as (_, sub):
        path = f"projects/{PROJECT}/subscriptions/{names}_sub"
        resp = sub.pull(request={"subscription": path, "max_messages": 10}, timeout=5)
    assert [Signature.from_json(bytes(m.message.data)).uuid for m in resp.received_messages] == [
        default_res.signature.uuid
    ]


WORKER_APP = r"""
import sys, time
from machinery import Server
from machinery.config import Config

cnf = Config.from_mapping({
    "broker": sys.argv[1], "default_queue": sys.argv[2], "result_backend": sys.argv[3],
    "gcppubsub": {"lease_seconds": 2},
})
server = Server(cnf)

@server.task
def slow(i: int) -> int:
    sys.stdout.write(f"started {i}\n")  # one write: tasks run on several threads
    sys.stdout.flush()
    time.sleep(60)
    return i

server.new_worker("victim", 4).launch()
"""


def test_sigkilled_worker_loses_no_task(names: str, tmp_path: Path) -> None:
    """Kill -9 a worker in the middle of its tasks: their leases lapse, Pub/Sub redelivers, all complete."""
    cnf = make_cnf(names, tmp_path, lease_seconds=2)
    app = tmp_path / "victim.py"
    app.write_text(WORKER_APP)
    server = Server(cnf)

    @server.task
    def slow(i: int) -> int:
        return i

    results = [server.send_task(Signature("slow", [i])) for i in range(6)]
    kill_victim_then_rescue(server, results, [str(app), cnf.broker, cnf.default_queue, cnf.result_backend],
                            rescuer_concurrency=6)
