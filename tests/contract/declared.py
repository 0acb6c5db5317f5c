"""What each driver under test declares: the capabilities (machinery.drivers.capabilities) its
`capability()` hands out, and the pairings of brokers and backends.

The capability suites run each capability's tests over the drivers listed here with it, and
test_declared.py checks these tables against the drivers themselves, so a driver that gains or
loses a capability must be entered here (and then runs that capability's tests).

HOW TO ADD A DRIVER: add its factory to conftest.py (see there), then one line per role here
with the capabilities it declares (an empty frozenset when none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from machinery.drivers.capabilities import (
    BlockingPublish,
    BlockingReads,
    BlockingSend,
    ConditionalPending,
    DeadLetterListing,
    DelayedListing,
    EarlyHandout,
    JointCommit,
    JointSend,
    Leases,
    ResultWakeups,
)

from .conftest import BACKEND_DRIVERS, BROKER_DRIVERS

BROKER_DECLARES: dict[str, frozenset[type]] = {
    "memory": frozenset({DelayedListing, DeadLetterListing}),
    "sqlite": frozenset({Leases, DelayedListing, DeadLetterListing}),
    "amqp": frozenset({DelayedListing, DeadLetterListing}),
    "redis": frozenset({Leases, EarlyHandout, BlockingPublish, DelayedListing, DeadLetterListing}),
    # no blocking client for a cluster: sync sends take the asyncio path
    "redis-cluster": frozenset({Leases, EarlyHandout, DelayedListing, DeadLetterListing}),
    "sqs": frozenset({Leases, DeadLetterListing}),
    "gcppubsub": frozenset({Leases, DeadLetterListing}),
}
BACKEND_DECLARES: dict[str, frozenset[type]] = {
    "memory": frozenset({ConditionalPending, ResultWakeups}),
    "sqlite": frozenset({ResultWakeups}),
    "redis": frozenset({ConditionalPending, BlockingReads}),
    "redis-cluster": frozenset({ConditionalPending}),
    "amqp": frozenset(),
    "memcache": frozenset({ConditionalPending, ResultWakeups}),
    "dynamodb": frozenset({ConditionalPending, ResultWakeups}),
    "mongodb": frozenset({ConditionalPending, ResultWakeups}),
}


@dataclass(frozen=True)
class PairingSpec:
    broker: str  # a BROKER_DRIVERS name
    backend: str  # a BACKEND_DRIVERS name, or "null" (the null backend)
    declares: frozenset[type]  # empty: find_pairing() finds nothing for this pair


PAIRINGS: dict[str, PairingSpec] = {
    "redis": PairingSpec("redis", "redis", frozenset({JointSend, JointCommit, BlockingSend})),
    "redis+null": PairingSpec("redis", "null", frozenset({BlockingSend})),
    # the task keys and queues of a cluster live on different nodes: no script joins them
    "redis-cluster": PairingSpec("redis-cluster", "redis-cluster", frozenset()),
    "redis-cluster+null": PairingSpec("redis-cluster", "null", frozenset()),
    "redis+sqlite": PairingSpec("redis", "sqlite", frozenset()),
    "sqlite+redis": PairingSpec("sqlite", "redis", frozenset()),
    "memory": PairingSpec("memory", "memory", frozenset()),
    "memory+null": PairingSpec("memory", "null", frozenset()),
    "sqlite": PairingSpec("sqlite", "sqlite", frozenset()),
    "amqp": PairingSpec("amqp", "amqp", frozenset()),
    "sqs+dynamodb": PairingSpec("sqs", "dynamodb", frozenset()),
}


def marks_of(*names: str) -> tuple[pytest.MarkDecorator, ...]:
    marks: list[pytest.MarkDecorator] = []
    for name in names:
        spec: Any = BROKER_DRIVERS.get(name) or BACKEND_DRIVERS.get(name)
        if spec is not None:
            marks.extend(spec.marks)
    return tuple(marks)


def brokers_with(kind: type) -> list[Any]:
    """pytest params: the broker drivers that declare `kind`."""
    return [pytest.param(name, marks=marks_of(name), id=name) for name, caps in BROKER_DECLARES.items()
            if kind in caps]


def brokers_without(kind: type) -> list[Any]:
    """pytest params: the broker drivers that do not declare `kind`."""
    return [pytest.param(name, marks=marks_of(name), id=name) for name, caps in BROKER_DECLARES.items()
            if kind not in caps]


def backends_with(kind: type) -> list[Any]:
    """pytest params: the backend drivers that declare `kind`."""
    return [pytest.param(name, marks=marks_of(name), id=name) for name, caps in BACKEND_DECLARES.items()
            if kind in caps]


def pairings_with(kind: type, broker_declares: type | None = None) -> list[Any]:
    """pytest params: the pairings that declare `kind` (and whose broker declares `broker_declares`)."""
    return [pytest.param(name, marks=marks_of(spec.broker, spec.backend), id=name)
            for name, spec in PAIRINGS.items()
            if kind in spec.declares and (broker_declares is None or broker_declares in BROKER_DECLARES[spec.broker])]
