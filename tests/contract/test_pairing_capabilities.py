"""Pairing capabilities: each interface checked on every pairing that declares it (declared.py).

A task is sent through either face: the asyncio one (JointSend) and the blocking one
(BlockingSend, in a thread of its own as the sync facade calls it); both must store and publish
the same things.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest

from machinery.drivers.backend import Backend
from machinery.drivers.broker import Broker, PublishItem
from machinery.drivers.capabilities import (
    BlockingSend,
    DelayedListing,
    EarlyHandout,
    JointCommit,
    JointSend,
    Leases,
    Pairing,
    capability_of,
)
from machinery.drivers.memory.null import NullBackend
from machinery.drivers.registry import find_pairing
from machinery.tasks.state import PENDING, SUCCESS, TaskResult, TaskState

from .conftest import Pair
from .declared import PAIRINGS, marks_of, pairings_with
from .test_broker_capabilities import handed_out
from .test_broker_contract import bodies, default_queue, drain, message, other_queue, publish

C = TypeVar("C")
CREATED = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def cap(pairing: Pairing | None, kind: type[C]) -> C:
    impl = capability_of(pairing, kind)
    assert impl is not None, f"the pairing declares {kind.__name__} in declared.py"
    return impl


async def opened(pair: Pair) -> tuple[Broker, Backend, Pairing]:
    broker, backend = await pair.open()
    pairing = find_pairing(broker, backend)
    assert pairing is not None
    return broker, backend, pairing


def pending_of(sig_uuid: str, name: str = "contract_task") -> TaskState:
    return TaskState(sig_uuid, PENDING, task_name=name, created_at=CREATED)


def tag(pair: Pair) -> str:
    """The prefix of this test's task UUIDs (task keys on a shared server must not meet another test's)."""
    return pair.broker_driver.env.namespace


SEND_FACES = [
    pytest.param((name, face), marks=marks_of(spec.broker, spec.backend), id=f"{name}-{face}")
    for name, spec in PAIRINGS.items()
    for face, kind in (("asyncio", JointSend), ("blocking", BlockingSend))
    if kind in spec.declares
]


@pytest.fixture(params=SEND_FACES)
async def send_face(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    name, face = request.param
    spec = PAIRINGS[name]
    pair = Pair(name, spec.broker, spec.backend, tmp_path)
    yield pair, face
    await pair.aclose()


async def send_one(pairing: Pairing, face: str, state: TaskState, item: PublishItem) -> bool:
    """Send one task through a face: True if it went that way (False: the caller's asyncio path)."""
    if face == "asyncio":
        await cap(pairing, JointSend).send([state], [item])
        return True
    return await asyncio.to_thread(cap(pairing, BlockingSend).send_blocking, state, item)


# --- JointSend and BlockingSend --------------------------------------------------------------


async def test_a_send_stores_pending_and_publishes(send_face: tuple[Pair, str]) -> None:
    pair, face = send_face
    broker, backend, pairing = await opened(pair)
    sig, body = message(1, tag=tag(pair))
    other_sig, other_body = message(2, queue=other_queue(pair.broker_driver), tag=tag(pair))
    assert await send_one(pairing, face, pending_of(f"{tag(pair)}-1"), (sig, body, None))
    assert await send_one(pairing, face, pending_of(f"{tag(pair)}-2"), (other_sig, other_body, None))
    assert bodies(await broker.fetch(default_queue(broker), 10, 2.0)) == [body]
    assert bodies(await broker.fetch(other_queue(pair.broker_driver), 10, 2.0)) == [other_body]
    expected = None if isinstance(backend, NullBackend) else pending_of(f"{tag(pair)}-1")
    assert await backend.get_state(f"{tag(pair)}-1") == expected


async def test_a_send_never_replaces_a_stored_state(send_face: tuple[Pair, str]) -> None:
    """A redelivered parent sends its children again: a child that already ran keeps its result."""
    pair, face = send_face
    broker, backend, pairing = await opened(pair)
    done = result_of(f"{tag(pair)}-1", 2)
    await backend.set_state(done)
    sig, body = message(1, tag=tag(pair))
    assert await send_one(pairing, face, pending_of(f"{tag(pair)}-1"), (sig, body, None))
    assert bodies(await broker.fetch(default_queue(broker), 10, 2.0)) == [body]
    assert await backend.get_state(f"{tag(pair)}-1") == (None if isinstance(backend, NullBackend) else done)


async def test_a_delayed_send(send_face: tuple[Pair, str]) -> None:
    """The asyncio face holds a delayed task back; the blocking face leaves it to the asyncio path
    (False), having stored and published nothing."""
    pair, face = send_face
    broker, backend, pairing = await opened(pair)
    eta_ns = time.time_ns() + 30_000_000_000
    sig, body = message(1, eta_ns=eta_ns, tag=tag(pair))
    went = await send_one(pairing, face, pending_of(f"{tag(pair)}-1"), (sig, body, eta_ns))
    assert went is (face == "asyncio")
    listing = broker.capability(DelayedListing)
    assert await broker.pending(default_queue(broker)) == []
    if listing is not None:
        assert await listing.delayed() == ([body] if went else [])
    stored = await backend.get_state(f"{tag(pair)}-1")
    assert stored == (pending_of(f"{tag(pair)}-1") if went and not isinstance(backend, NullBackend) else None)


@pytest.mark.parametrize("pair_of", pairings_with(JointSend), indirect=True)
async def test_joint_send_of_many_tasks(pair_of: Pair) -> None:
    broker, backend, pairing = await opened(pair_of)
    ns, q2 = tag(pair_of), other_queue(pair_of.broker_driver)
    items = [message(i, tag=ns) for i in range(30)] + [message(i, queue=q2, tag=ns) for i in range(30, 40)]
    states = [pending_of(f"{ns}-{i}") for i in range(40)]
    await cap(pairing, JointSend).send(states, [(s, b, None) for s, b in items])
    assert await backend.get_states([s.task_uuid for s in states]) == states
    got = await drain(broker, default_queue(broker), 30, 3.0)
    assert bodies(got) == [b for _, b in items[:30]]
    assert bodies(await drain(broker, q2, 10, 3.0)) == [b for _, b in items[30:]]


# --- JointCommit -----------------------------------------------------------------------------


def result_of(task_uuid: str, value: int) -> TaskState:
    return TaskState(task_uuid, SUCCESS, task_name="contract_task", results=[TaskResult("int64", value)],
                     created_at=CREATED)


@pytest.mark.parametrize("pair_of", pairings_with(JointCommit), indirect=True)
async def test_joint_commit_stores_acks_pairs_and_sends(pair_of: Pair) -> None:
    """States, acks, paired states with their acks, and follow-up sends, in one call: every state
    is stored, the acked messages never come back, the follow-up goes out with its PENDING; an
    unacked message of the same fetch comes back after its lease (the control)."""
    pair_of.broker_driver.configure(lease_seconds=1.0)
    broker, backend, pairing = await opened(pair_of)
    ns, q2 = tag(pair_of), other_queue(pair_of.broker_driver)
    sent = [await publish(broker, i, tag=ns) for i in range(3)]
    got = await drain(broker, default_queue(broker), 3, 3.0)
    assert bodies(got) == sent
    early = broker.capability(EarlyHandout)
    if early is not None:
        await early.settle(got)
    alone, paired = result_of(f"{ns}-0", 0), result_of(f"{ns}-1", 1)
    follow_sig, follow_body = message(9, queue=q2, tag=ns)
    follow = ([pending_of(f"{ns}-9")], [(follow_sig, follow_body, None)])
    result = await cap(pairing, JointCommit).commit([alone], [got[0]], [(paired, got[1])], [follow])
    assert result == (None, None, [])
    assert await backend.get_states([f"{ns}-{i}" for i in (0, 1, 9)]) == [alone, paired, pending_of(f"{ns}-9")]
    assert bodies(await broker.fetch(q2, 10, 2.0)) == [follow_body]
    leases = broker.capability(Leases)
    back = await broker.fetch(default_queue(broker), 10, (leases.lease_seconds if leases else 1.0) + 2.0)
    assert bodies(back) == [sent[2]], "only the message nobody acked comes back"
    await broker.ack(back)


@pytest.mark.parametrize("pair_of", pairings_with(JointCommit, broker_declares=EarlyHandout), indirect=True)
async def test_joint_commit_of_a_delivery_handed_out_before_its_claim(pair_of: Pair) -> None:
    """A task done before its claim (EarlyHandout): held for the commit, its state and its ack go
    together and no claim ever happens."""
    pair_of.broker_driver.configure(lease_seconds=1.0)
    broker, backend, pairing = await opened(pair_of)
    early = cap(broker, EarlyHandout)
    ns = tag(pair_of)
    d = await handed_out(broker, 1, ns)
    assert early.unclaimed(d) and early.hold(d) is True, "reserved for the commit: no claim starts"
    done = result_of(f"{ns}-1", 1)
    assert await cap(pairing, JointCommit).commit([], [], [(done, d)]) == (None, None, [])
    assert not early.unclaimed(d) and d.receipt is None, "committed without a claim"
    assert await backend.get_state(f"{ns}-1") == done
    assert await broker.fetch(default_queue(broker), 10, 2.0) == []
