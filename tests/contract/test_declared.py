"""Each driver declares exactly the capabilities it implements, and declared.py says which.

A declared capability is an instance of its interface (every abstract member implemented, or the
object could not exist); an undeclared one leaves no member of its interface behind on the driver
(a `delayed()` nobody can reach through capability() is a forgotten declaration). The tables in
declared.py must match, since they choose which drivers each capability suite runs on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from machinery.drivers.backend import Backend
from machinery.drivers.broker import Broker
from machinery.drivers.capabilities import (
    BACKEND_CAPABILITIES,
    BROKER_CAPABILITIES,
    PAIRING_CAPABILITIES,
    Capable,
    Leases,
    capability_of,
    interface,
)
from machinery.drivers.registry import find_pairing

from .conftest import BACKEND_DRIVERS, BROKER_DRIVERS, Driver, Pair
from .declared import BACKEND_DECLARES, BROKER_DECLARES, PAIRINGS, marks_of


def check(obj: Capable, kinds: tuple[type, ...], declared: frozenset[type], base: type) -> None:
    offered = {k for k in kinds if obj.capability(k) is not None}
    assert offered == declared, (
        f"{type(obj).__name__} offers {sorted(k.__name__ for k in offered)}, "
        f"declared.py says {sorted(k.__name__ for k in declared)}")
    for kind in kinds:
        impl = obj.capability(kind)
        if impl is not None:
            assert isinstance(impl, kind)
        elif not isinstance(obj, kind):  # (a class may declare what one instance withholds)
            stray = sorted(n for n in interface(kind) if hasattr(obj, n) and not hasattr(base, n))
            assert not stray, f"{type(obj).__name__} has {stray} of {kind.__name__} without declaring it"


def test_the_tables_cover_every_driver_under_test() -> None:
    assert set(BROKER_DECLARES) == set(BROKER_DRIVERS)
    assert set(BACKEND_DECLARES) == set(BACKEND_DRIVERS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=s.marks, id=n) for n, s in BROKER_DRIVERS.items()])
async def test_broker_declares_what_it_implements(name: str, tmp_path: Path) -> None:
    driver = Driver(name, BROKER_DRIVERS[name], tmp_path)
    try:
        check(await driver.open(), BROKER_CAPABILITIES, BROKER_DECLARES[name], Broker)
    finally:
        await driver.aclose()


@pytest.mark.parametrize("name", [pytest.param(n, marks=s.marks, id=n) for n, s in BACKEND_DRIVERS.items()])
async def test_backend_declares_what_it_implements(name: str, tmp_path: Path) -> None:
    driver = Driver(name, BACKEND_DRIVERS[name], tmp_path)
    try:
        check(await driver.open(), BACKEND_CAPABILITIES, BACKEND_DECLARES[name], Backend)
    finally:
        await driver.aclose()


@pytest.mark.parametrize("name", [pytest.param(n, marks=marks_of(s.broker, s.backend), id=n)
                                  for n, s in PAIRINGS.items()])
async def test_pairing_declares_what_it_implements(name: str, tmp_path: Path) -> None:
    spec = PAIRINGS[name]
    pair = Pair(name, spec.broker, spec.backend, tmp_path)
    try:
        broker, backend = await pair.open()
        pairing = find_pairing(broker, backend)
        if not spec.declares:
            assert pairing is None, f"{name}: expected no pairing, found {type(pairing).__name__}"
            return
        assert pairing is not None
        check(pairing, PAIRING_CAPABILITIES, spec.declares, Capable)
    finally:
        await pair.aclose()


def test_drivers_outside_the_registrys_packages_pair_with_nothing() -> None:
    class Loose(Capable):
        pass

    loose: Any = Loose()
    for module in ("loose_driver", "myapp.drivers", "machinery.drivers.nowhere.broker"):
        Loose.__module__ = module  # no package of the registry to ask
        assert find_pairing(loose, loose) is None
    assert capability_of(None, Capable) is None
    assert loose.capability(Capable) is loose


def test_a_driver_class_that_implements_a_capability_without_declaring_it_is_refused() -> None:
    with pytest.raises(TypeError, match=r"Leases\.renew without declaring the capability"):
        class Forgetful(Broker):  # renewals the worker would never make
            async def renew(self, deliveries: Any) -> None: ...

    with pytest.raises(TypeError, match=r"ResultWakeups\.poll_cap, ResultWakeups\.waiters"):
        class Half(Backend):
            poll_cap = 0.1
            waiters: Any = None

    class Declared(Broker, Leases):  # declared: accepted (instantiating it would need the primitives)
        async def renew(self, deliveries: Any) -> None: ...

    assert issubclass(Declared, Leases)
