"""The Lock contract used by periodic tasks: one holder per key until its deadline."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from machinery.drivers.lock import Lock

from .conftest import Driver


def key() -> str:
    return f"lock_{uuid.uuid4().hex}"


def in_ns(seconds: float) -> int:
    return time.time_ns() + int(seconds * 1e9)


async def test_acquire_free_key_then_held(lock: Lock) -> None:
    k = key()
    assert await lock.acquire(k, in_ns(30)) is True
    assert await lock.acquire(k, in_ns(30)) is False


async def test_keys_are_independent(lock: Lock) -> None:
    a, b = key(), key()
    assert await lock.acquire(a, in_ns(30)) is True
    assert await lock.acquire(b, in_ns(30)) is True


async def test_expired_lock_can_be_taken_again(lock: Lock) -> None:
    k = key()
    until = in_ns(1.0)
    assert await lock.acquire(k, until) is True
    assert await lock.acquire(k, in_ns(1.0)) is False
    await asyncio.sleep(max(until - time.time_ns(), 0) / 1e9 + 0.1)
    assert await lock.acquire(k, in_ns(30)) is True
    assert await lock.acquire(k, in_ns(30)) is False


async def test_release_frees_the_key(lock: Lock) -> None:
    k = key()
    assert await lock.acquire(k, in_ns(30)) is True
    await lock.release(k)
    assert await lock.acquire(k, in_ns(30)) is True
    await lock.release(key())  # never held: no error


async def test_held_key_is_refused_to_another_client(lock_driver: Driver[Lock], lock: Lock) -> None:
    other = await lock_driver.open()
    k = key()
    assert await lock.acquire(k, in_ns(30)) is True
    assert await other.acquire(k, in_ns(30)) is False


async def test_one_winner_under_concurrency(lock_driver: Driver[Lock]) -> None:
    clients = [await lock_driver.open() for _ in range(4)]
    k = key()
    deadline = in_ns(30)
    wins: list[bool] = []
    mutex = threading.Lock()

    def worker(client: Lock) -> None:
        async def run() -> list[bool]:
            try:
                return list(await asyncio.gather(*(client.acquire(k, deadline) for _ in range(10))))
            finally:
                await client.close()

        out = asyncio.run(run())
        with mutex:
            wins.extend(out)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(wins) == 40
    assert wins.count(True) == 1
