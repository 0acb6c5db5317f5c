"""Child processes for tests/test_sqlite_multiprocess.py: producers, consumers and holders on one file.

Usage: python sqlite_child.py ROLE DB_PATH LEASE_SECONDS [ARGS...]
  produce TAG COUNT        publish COUNT bodies "TAG-i" (singles, batches and some short ETAs)
  consume STOP_FILE        fetch/ack until STOP_FILE exists and the queue is empty; print acked bodies
  hold COUNT               claim COUNT messages, print them, then sleep until killed
  group GROUP TOTAL UUIDS  group_member_done for the comma-separated task UUIDs (twice each), then
                           trigger_chord when this call finished the group; print the outcomes
  lock KEY START_NS        acquire KEY at START_NS; print whether it was won
Each role prints one JSON line on stdout as its result.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import zlib
from pathlib import Path

from machinery.config import Config, SQLiteConfig
from machinery.drivers.broker import Delivery
from machinery.drivers.sqlite.backend import SQLiteBackend
from machinery.drivers.sqlite.broker import SQLiteBroker
from machinery.drivers.sqlite.lock import SQLiteLock
from machinery.tasks.signature import Signature

QUEUE = "mp_queue"


def config(db: str, lease: float) -> Config:
    url = f"sqlite:///{db}"
    return Config(broker=url, result_backend=url, default_queue=QUEUE,
                  sqlite=SQLiteConfig(lease_seconds=lease, poll_interval_ms=20))


async def produce(broker: SQLiteBroker, tag: str, count: int) -> dict[str, int]:
    sig = Signature("mp_task")
    i = 0
    while i < count:
        if i % 7 == 0:
            await broker.publish(sig, f"{tag}-{i}".encode(), None)
            i += 1
            continue
        batch = []
        for j in range(i, min(i + 25, count)):
            # Every tenth message is briefly delayed: delayed rows must not be lost or doubled.
            eta = time.time_ns() + 100_000_000 if j % 10 == 3 else None
            batch.append((sig, f"{tag}-{j}".encode(), eta))
        await broker.publish_many(batch)
        i += len(batch)
    return {"published": count}


async def consume(broker: SQLiteBroker, stop_file: Path) -> dict[str, list[str]]:
    acked: list[str] = []
    requeued: list[str] = []
    while True:
        # Stop only on an empty fetch that began after the producers were done (and their
        # short ETAs had passed), so nothing can still become due behind it.
        stopping = await asyncio.to_thread(stop_file.exists)
        got = await broker.fetch(QUEUE, 1 + len(acked) % 20, 0.2)
        if not got:
            if stopping:
                break
            continue
        done = []
        retry = []
        for d in got:
            # About 2% are given back once, as a worker retrying a task would.
            if d.attempts == 1 and zlib.crc32(d.body) % 50 == 0:
                retry.append(d)
            else:
                done.append(d)
        if retry:
            await broker.requeue(retry)
            requeued.extend(d.body.decode() for d in retry)
        await broker.ack(done)
        acked.extend(d.body.decode() for d in done)
    return {"acked": acked, "requeued": requeued}


async def hold(broker: SQLiteBroker, count: int) -> None:
    claimed: list[Delivery] = []
    while len(claimed) < count:
        claimed.extend(await broker.fetch(QUEUE, count - len(claimed), 5.0))
    print(json.dumps({"claimed": [d.body.decode() for d in claimed]}), flush=True)
    await asyncio.sleep(3600)


async def group(backend: SQLiteBackend, group_uuid: str, total: int, uuids: list[str]) -> dict[str, object]:
    outcomes = []
    triggered = []
    calls = [backend.group_member_done(group_uuid, u, total, False) for u in uuids * 2]
    for progress in await asyncio.gather(*calls):
        outcomes.append([progress.done, progress.failed, progress.counted])
        if progress.counted and progress.done == total:
            triggered.append(await backend.trigger_chord(group_uuid))
    # Late callers race for the latch too; only the first one in any process may win.
    triggered.extend(await asyncio.gather(*(backend.trigger_chord(group_uuid) for _ in range(5))))
    return {"outcomes": outcomes, "triggered": triggered}


async def main(argv: list[str]) -> None:
    role, db, lease = argv[0], argv[1], float(argv[2])
    args = argv[3:]
    cnf = config(db, lease)
    result: object
    if role in ("produce", "consume", "hold"):
        broker = SQLiteBroker(cnf, cnf.broker)
        try:
            if role == "produce":
                result = await produce(broker, args[0], int(args[1]))
            elif role == "consume":
                result = await consume(broker, Path(args[0]))
            else:
                await hold(broker, int(args[0]))
                return
        finally:
            await broker.close()
    elif role == "group":
        backend = SQLiteBackend(cnf, cnf.result_backend)
        try:
            result = await group(backend, args[0], int(args[1]), args[2].split(","))
        finally:
            await backend.close()
    elif role == "lock":
        lock = SQLiteLock(cnf, cnf.result_backend)
        try:
            start_ns = int(args[1])
            await asyncio.sleep(max(start_ns - time.time_ns(), 0) / 1e9)
            result = {"won": await lock.acquire(args[0], time.time_ns() + 60_000_000_000)}
        finally:
            await lock.close()
    else:
        raise SystemExit(f"unknown role {role!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
