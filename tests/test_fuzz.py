"""Fuzzing: random bytes and Go-shaped messages through the decoder and through a real worker.

The decoder either returns a Signature or raises DecodeError, nothing else. A worker given a mix
of such messages and good tasks ends every one of them (a state, a dead letter), leaves nothing
in flight, keeps running, and runs the good tasks right.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from machinery import Config, Server, Signature
from machinery.errors import DecodeError, MachineryError
from machinery.tasks.gotypes import SCALAR_TYPES, SLICE_TYPES
from machinery.tasks.signature import decode_signature, encode_signature
from machinery.testing import running_worker

NAMES = ["add", "echo", "boom", "nobody"]
TYPES = [*sorted(SCALAR_TYPES | SLICE_TYPES), "json", "[]byte", "weird", ""]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
uuids = st.just("") | st.builds(lambda: f"task_{uuid.uuid4()}") | st.text(max_size=10)
args = st.lists(st.fixed_dictionaries({"Type": st.sampled_from(TYPES)},
                                      optional={"Name": st.text(max_size=4), "Value": json_values}), max_size=4)
nested = st.fixed_dictionaries({"Name": st.sampled_from(NAMES)}, optional={"UUID": uuids, "Args": args})


go_shaped = st.fixed_dictionaries(
    {"Name": st.sampled_from(NAMES) | st.text(max_size=8)},
    optional={
        "UUID": uuids,
        "Args": args | json_values,
        "Headers": st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values,
        "RoutingKey": st.just("") | st.text(max_size=8),
        "ETA": st.none() | st.just("2020-01-02T03:04:05Z") | st.just("0001-01-01T00:00:00Z") | st.text(max_size=12),
        "RetryCount": st.integers(min_value=-3, max_value=1) | json_values,
        "RetryTimeout": st.integers(min_value=-5, max_value=2**63 - 1) | json_values,
        "GroupUUID": st.just("") | st.text(max_size=8),
        "GroupTaskCount": st.integers(min_value=-1, max_value=3) | json_values,
        "ChordCallback": st.none() | nested | json_values,
        "OnSuccess": st.none() | st.lists(nested, max_size=2) | json_values,
        "OnError": st.none() | st.lists(nested, max_size=2) | json_values,
        "Immutable": st.booleans() | json_values,
        "Priority": st.integers(min_value=-1, max_value=300),
        "IgnoreWhenTaskNotRegistered": st.booleans(),
        "Unknown": json_values,
    },
).map(msgspec.json.encode)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600) | go_shaped)
def test_the_decoder_returns_a_signature_or_raises_decode_error(body: bytes) -> None:
    try:
        sig = decode_signature(body)
    except DecodeError:
        return
    try:  # what a worker does next: typed arguments, and (for a retry) the body again
        sig.python_args()
        encode_signature(sig)
    except MachineryError:
        pass


def _server(url: str) -> Server:
    server = Server(Config(broker=url, result_backend=url, unregistered_bounces=1))

    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    @server.task
    def echo(*values: Any) -> int:
        return len(values)

    @server.task
    def boom(*values: Any) -> None:
        raise RuntimeError("boom")

    return server


def _settled(server: Server) -> bool:
    broker = server.get_broker()
    inflight = getattr(broker, "_inflight", None)  # the memory broker's claimed messages
    return (not broker.get_pending_tasks() and not broker.get_delayed_tasks()
            and not inflight)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
@settings(max_examples=15, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large])
@given(bodies=st.lists(st.binary(max_size=200) | go_shaped, min_size=30, max_size=40))
def test_a_worker_ends_every_hostile_message_and_keeps_running(store: str, tmp_path: Path, bodies: list[bytes]) -> None:
    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path / f'fuzz-{uuid.uuid4().hex}.sqlite3'}"
    server = _server(url)
    try:
        route = Signature("raw", routing_key=server.cnf.default_queue)
        server.portal.run(server.get_broker().publish_many([(route, b, None) for b in bodies]))
        good = server.send_tasks([Signature("add", args=[i, 1]) for i in range(20)])
        with running_worker(server, concurrency=8) as worker:
            assert [r.get(timeout=60) for r in good] == [i + 1 for i in range(20)]
            deadline = time.monotonic() + 60
            while not _settled(server):
                assert time.monotonic() < deadline, "messages left unsettled"
                time.sleep(0.05)
            assert worker.is_running
            assert server.send_task(Signature("add", args=[2, 2])).get(timeout=15) == 4
    finally:
        server.close()
