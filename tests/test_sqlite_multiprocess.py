"""Several processes on one SQLite file: no message lost or doubled, killed consumers' work comes back."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from machinery.drivers.sqlite.backend import SQLiteBackend
from machinery.drivers.sqlite.broker import SQLiteBroker
from machinery.tasks.signature import Signature
from sqlite_child import QUEUE, config

CHILD = str(Path(__file__).with_name("sqlite_child.py"))

pytestmark = pytest.mark.slow


def spawn(role: str, db: Path, lease: float, *args: object) -> subprocess.Popen[str]:
    env = dict(os.environ)
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, CHILD, role, str(db), str(lease), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def result(proc: subprocess.Popen[str], timeout: float = 90.0) -> Any:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def broker_for(db: Path, lease: float) -> SQLiteBroker:
    cnf = config(str(db), lease)
    return SQLiteBroker(cnf, cnf.broker)


def test_producers_and_consumers_share_one_file(tmp_path: Path) -> None:
    """3 producer and 3 consumer processes: every message is acked exactly once, none is left."""
    db, stop = tmp_path / "mp.sqlite3", tmp_path / "stop"
    per_producer = 1500
    consumers = [spawn("consume", db, 30.0, stop) for _ in range(3)]
    producers = [spawn("produce", db, 30.0, f"p{i}", per_producer) for i in range(3)]
    try:
        for p in producers:
            assert result(p) == {"published": per_producer}
        time.sleep(0.3)  # let the producers' short ETAs pass before consumers may stop
        stop.touch()
        outputs = [result(c) for c in consumers]
    finally:
        for proc in consumers + producers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    acked = Counter(body for out in outputs for body in out["acked"])
    expected = {f"p{i}-{j}" for i in range(3) for j in range(per_producer)}
    assert set(acked) == expected, f"missing {len(expected - set(acked))}, unexpected {set(acked) - expected}"
    doubled = [body for body, n in acked.items() if n != 1]
    assert doubled == [], f"acked more than once: {doubled[:10]}"
    requeued = [body for out in outputs for body in out["requeued"]]
    assert requeued, "the consumers' requeue path was not exercised"
    assert sum(1 for out in outputs if out["acked"]) >= 2, "work was not shared between consumers"

    async def leftovers() -> tuple[list[bytes], list[bytes]]:
        broker = broker_for(db, 30.0)
        try:
            return await broker.pending(QUEUE), await broker.delayed()
        finally:
            await broker.close()

    assert asyncio.run(leftovers()) == ([], [])


def test_sigkilled_consumer_messages_are_fetched_again_after_the_lease(tmp_path: Path) -> None:
    db, lease = tmp_path / "kill.sqlite3", 2.0

    async def run() -> None:
        broker = broker_for(db, lease)
        try:
            sig = Signature("mp_task")
            await broker.publish_many([(sig, f"m-{i}".encode(), None) for i in range(10)])
            holder = spawn("hold", db, lease, 6)
            try:
                line = await asyncio.to_thread(holder.stdout.readline)  # type: ignore[union-attr]
                claimed = set(json.loads(line)["claimed"])
                claimed_at = time.monotonic()
                assert claimed == {f"m-{i}" for i in range(6)}
                # The holder's claims are invisible to everyone else while its lease runs.
                rest = await broker.fetch(QUEUE, 100, 0.3)
                assert {d.body.decode() for d in rest} == {f"m-{i}" for i in range(6, 10)}
                await broker.ack(rest)
                holder.send_signal(signal.SIGKILL)
                holder.wait(10)
            finally:
                if holder.poll() is None:
                    holder.kill()
                    holder.wait()
            assert holder.returncode == -signal.SIGKILL
            early = await broker.fetch(QUEUE, 100, 0.2)
            if time.monotonic() - claimed_at < lease - 0.1:
                assert early == [], "a dead worker's messages were handed out before its lease ended"
            again = list(early)
            deadline = time.monotonic() + lease + 5.0
            while len(again) < 6 and time.monotonic() < deadline:
                again.extend(await broker.fetch(QUEUE, 100, 0.5))
            assert sorted(d.body.decode() for d in again) == sorted(claimed)
            assert time.monotonic() - claimed_at >= lease - 0.1
            assert all(d.redelivered and d.attempts == 2 for d in again)
            await broker.ack(again)
            assert await broker.pending(QUEUE) == []
        finally:
            await broker.close()

    asyncio.run(run())


def test_group_counting_and_chord_latch_across_processes(tmp_path: Path) -> None:
    db = tmp_path / "group.sqlite3"
    group, total = f"g-{uuid.uuid4()}", 60
    members = [f"t-{i}" for i in range(total)]

    async def init() -> None:
        cnf = config(str(db), 30.0)
        backend = SQLiteBackend(cnf, cnf.result_backend)
        try:
            await backend.init_group(group, members)
        finally:
            await backend.close()

    asyncio.run(init())
    procs = [spawn("group", db, 30.0, group, total, ",".join(members[i::4])) for i in range(4)]
    outs = [result(p) for p in procs]
    outcomes = [o for out in outs for o in out["outcomes"]]
    counted = [o for o in outcomes if o[2]]
    assert len(outcomes) == 2 * total
    assert sorted(o[0] for o in counted) == list(range(1, total + 1))
    assert sum(1 for o in counted if o[0] == total) == 1
    triggered = [t for out in outs for t in out["triggered"]]
    assert triggered.count(True) == 1


def test_lock_has_one_winner_across_processes(tmp_path: Path) -> None:
    db = tmp_path / "lock.sqlite3"
    key = f"tick-{uuid.uuid4()}"
    start_ns = time.time_ns() + 1_500_000_000  # all children try at the same instant
    procs = [spawn("lock", db, 30.0, key, start_ns) for _ in range(5)]
    wins = [result(p)["won"] for p in procs]
    assert wins.count(True) == 1
