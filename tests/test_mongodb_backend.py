"""The MongoDB backend beyond the contract suite: Go's document shape, expiry, typed results, chords,
bad input, and a worker end to end (the contract suite runs on it too: tests/contract -k mongodb)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bson import Decimal128, Int64
from pymongo import AsyncMongoClient

from backend_e2e import check_task_and_chord, worker_server
from machinery import Config, Server
from machinery.config import MongoDBConfig
from machinery.drivers.mongodb.backend import MongoBackend
from machinery.drivers.registry import make_backend
from machinery.errors import BackendError, ConfigError
from machinery.tasks.state import FAILURE, PENDING, RECEIVED, SUCCESS, TaskResult, TaskState
from mongo_server import mongo_url

Raw = AsyncMongoClient[dict[str, Any]]
CREATED = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def _config(database: str, expire_in: int = 3600) -> Config:
    return Config(broker="memory", result_backend=mongo_url(), results_expire_in=expire_in,
                  mongodb=MongoDBConfig(database=database))


@pytest.fixture
def database() -> Iterator[str]:
    name = f"mt_{uuid.uuid4().hex[:12]}"
    yield name

    async def drop() -> None:
        client: Raw = AsyncMongoClient(mongo_url())
        try:
            await client.drop_database(name)
        finally:
            await client.close()

    asyncio.run(drop())


@pytest.fixture
async def backend(database: str) -> AsyncIterator[MongoBackend]:
    b = MongoBackend(_config(database, expire_in=120))
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def raw(database: str) -> AsyncIterator[Any]:
    """The test's database through plain pymongo (tz-aware dates), to look at what is stored."""
    client: Raw = AsyncMongoClient(mongo_url(), tz_aware=True)
    try:
        yield client[database]
    finally:
        await client.close()


def task_uuid() -> str:
    return f"task_{uuid.uuid4()}"


# --- document shape ----------------------------------------------------------------------------


async def test_success_document_has_go_shape(backend: MongoBackend, raw: Any) -> None:
    task = task_uuid()
    await backend.set_pending([TaskState(task, PENDING, task_name="add", created_at=CREATED)])
    await backend.set_state(TaskState(task, RECEIVED, task_name="add"))
    results = [TaskResult("int64", 2), TaskResult("string", '{"a": 1}'), TaskResult("int32", 7),
               TaskResult("float64", 1.5), TaskResult("[]byte", b"\x00\xff"), TaskResult("[]int64", [1, 2])]
    await backend.set_state(TaskState(task, SUCCESS, task_name="add", results=results))
    doc = await raw.tasks.find_one({"_id": task})
    assert set(doc) == {"_id", "task_name", "state", "results", "error", "created_at", "created_at_ns", "delete_at"}
    assert (doc["task_name"], doc["state"], doc["error"]) == ("add", SUCCESS, "")
    assert doc["created_at"] == datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)  # BSON dates hold ms
    assert [r["type"] for r in doc["results"]] == ["int64", "string", "int32", "float64", "[]uint8", "[]int64"]
    values = [r["value"] for r in doc["results"]]
    assert isinstance(values[0], Int64) and values[0] == 2  # Go's driver writes int64 as int64 ...
    assert values[1] == '{"a": 1}'  # ... a string as the string (Go made it {type: "json"}) ...
    assert values[2] == 7 and not isinstance(values[2], Int64)  # ... int32 as int32 ...
    assert values[3] == 1.5 and values[4] == b"\x00\xff"  # ... float64 as double, []byte as binary
    assert values[5] == [1, 2] and all(isinstance(v, Int64) for v in values[5])
    # read back with the microseconds and every type
    state = await backend.get_state(task)
    assert state is not None and state.created_at == CREATED and state.task_name == "add"
    assert state.values() == [2, '{"a": 1}', 7, 1.5, b"\x00\xff", [1, 2]]


async def test_group_meta_document_has_go_shape(backend: MongoBackend, raw: Any) -> None:
    group, members = f"group_{uuid.uuid4()}", [task_uuid(), task_uuid()]
    await backend.init_group(group, members)
    doc = await raw.group_metas.find_one({"_id": group})
    assert set(doc) == {"_id", "task_uuids", "chord_triggered", "lock", "created_at", "delete_at"}
    assert doc["task_uuids"] == members and doc["chord_triggered"] is False and doc["lock"] is False
    assert isinstance(doc["created_at"], datetime)
    await backend.group_member_done(group, members[0], 2, True)
    doc = await raw.group_metas.find_one({"_id": group})
    assert (doc["done_members"], doc["done"], doc["failed"]) == ([members[0]], 1, 1)


# --- expiry ------------------------------------------------------------------------------------


async def test_ttl_index_and_delete_at_on_every_write(backend: MongoBackend, raw: Any) -> None:
    task, group = task_uuid(), f"group_{uuid.uuid4()}"
    await backend.set_state(TaskState(task, RECEIVED, task_name="t"))
    await backend.init_group(group, [task])
    for name in ("tasks", "group_metas"):
        index = (await raw[name].index_information())["delete_at_1"]
        assert index["key"] == [("delete_at", 1)] and index["expireAfterSeconds"] == 0
    now = datetime.now(UTC)
    for doc in (await raw.tasks.find_one({"_id": task}), await raw.group_metas.find_one({"_id": group})):
        assert abs((doc["delete_at"] - now - timedelta(seconds=120)).total_seconds()) < 10


async def test_documents_past_delete_at_are_gone_before_the_sweep(backend: MongoBackend, raw: Any) -> None:
    task, group, member = task_uuid(), f"group_{uuid.uuid4()}", task_uuid()
    await backend.set_state(TaskState(task, SUCCESS, task_name="t", results=[]))
    await backend.init_group(group, [member])
    await backend.group_member_done(group, member, 1, False)
    past = datetime.now(UTC) - timedelta(seconds=1)
    await raw.tasks.update_one({"_id": task}, {"$set": {"delete_at": past}})
    await raw.group_metas.update_one({"_id": group}, {"$set": {"delete_at": past}})
    assert await backend.get_states([task]) == [None]
    assert await backend.get_group_meta(group) is None
    assert await backend.trigger_chord(group) is False
    # an expired state is replaced by a new PENDING; an expired group starts afresh
    await backend.set_pending([TaskState(task, PENDING, task_name="again", created_at=CREATED)])
    state = await backend.get_state(task)
    assert state is not None and (state.state, state.task_name, state.results) == (PENDING, "again", None)
    await backend.init_group(group, [member])
    assert (await backend.group_member_done(group, member, 1, False)).counted is True
    assert await backend.trigger_chord(group) is True


# --- values and states -------------------------------------------------------------------------


async def test_typed_results_round_trip(backend: MongoBackend) -> None:
    results = [
        TaskResult("uint64", 2**64 - 1), TaskResult("int8", -5), TaskResult("uint32", 4_000_000_000),
        TaskResult("int", 2**40), TaskResult("float32", 0.1), TaskResult("bool", False),
        TaskResult("[]float64", [0.5, -1.0]), TaskResult("[]string", ["a", "é"]), TaskResult("[]uint8", b"xyz"),
        TaskResult("[]bool", []), TaskResult("[]int32", None), TaskResult("json", {"a": [1, None, "b"], "$x.y": 2}),
        TaskResult("string", "[1, 2]"),
    ]
    state = TaskState(task_uuid(), SUCCESS, task_name="many", results=results, created_at=CREATED)
    empty = TaskState(task_uuid(), SUCCESS, task_name="none", results=[])
    await backend.set_states([state, empty])
    got, got_empty = await backend.get_states([state.task_uuid, empty.task_uuid])
    assert got == state and got_empty == empty
    assert got is not None and got_empty is not None and got_empty.results == []
    assert got.values() == [2**64 - 1, -5, 4_000_000_000, 2**40, pytest.approx(0.1), False, [0.5, -1.0], ["a", "é"],
                            b"xyz", [], [], {"a": [1, None, "b"], "$x.y": 2}, "[1, 2]"]


async def test_reads_documents_go_wrote(backend: MongoBackend, raw: Any) -> None:
    """Go writes no delete_at (nothing expires here), ints as int64, and `json` for JSON-object strings."""
    task, group = task_uuid(), f"group_{uuid.uuid4()}"
    created = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    await raw.tasks.insert_one({
        "_id": task, "task_name": "add", "state": SUCCESS, "created_at": created,
        "results": [{"type": "int64", "value": Int64(3)}, {"type": "json", "value": {"k": Int64(1)}},
                    {"type": "[]byte", "value": b"\x01"}, {"type": "uint64", "value": Decimal128("5")}],
    })
    await raw.group_metas.insert_one({"_id": group, "task_uuids": [task], "chord_triggered": False,
                                      "lock": False, "created_at": created})
    state = await backend.get_state(task)
    assert state is not None and state.created_at == created and state.error == ""
    assert state.values() == [3, {"k": 1}, b"\x01", 5]
    meta = await backend.get_group_meta(group)
    assert meta is not None and meta.task_uuids == [task] and meta.created_at == created
    assert [await backend.trigger_chord(group) for _ in range(3)] == [True, False, False]


async def test_set_pending_never_replaces_a_later_state(backend: MongoBackend) -> None:
    done, early = task_uuid(), task_uuid()
    await backend.set_state(TaskState(done, FAILURE, task_name="t", error="boom"))
    await backend.set_state(TaskState(early, RECEIVED, task_name="t"))  # the worker was faster than the send
    await backend.set_pending([TaskState(u, PENDING, task_name="t", created_at=CREATED) for u in (done, early)])
    got_done, got_early = await backend.get_states([done, early])
    assert got_done is not None and (got_done.state, got_done.error) == (FAILURE, "boom")
    assert got_early is not None and got_early.state == RECEIVED and got_early.created_at == CREATED


# --- chords under concurrency --------------------------------------------------------------------


async def test_last_members_racing_fire_the_chord_once(database: str) -> None:
    """Workers in several threads (own clients, own loops) finish members and try the chord at once."""
    group, members = f"group_{uuid.uuid4()}", [task_uuid() for _ in range(6)]
    setup = MongoBackend(_config(database))
    await setup.init_group(group, members)
    await setup.close()
    fired: list[bool] = []
    lock = threading.Lock()

    def worker(mine: list[str]) -> None:
        async def run() -> list[bool]:
            b = MongoBackend(_config(database))
            try:
                wins = []
                for t in mine * 2:  # each member twice, as after a redelivery
                    progress = await b.group_member_done(group, t, len(members), False)
                    if progress.counted and progress.done == len(members):
                        wins.append(await b.trigger_chord(group))
                    wins.extend(await asyncio.gather(*(b.trigger_chord(group) for _ in range(2))))
                return wins
            finally:
                await b.close()

        out = asyncio.run(run())
        with lock:
            fired.extend(out)

    threads = [threading.Thread(target=worker, args=(members[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert fired.count(True) == 1


# --- configuration and errors --------------------------------------------------------------------


def test_registry_makes_it_for_both_schemes() -> None:
    for url in ("mongodb://127.0.0.1:1/", "mongodb+srv://cluster0.example.net/"):
        assert isinstance(make_backend(Config(broker="memory", result_backend=url)), MongoBackend)


@pytest.mark.parametrize("url", ["mongodb://", "mongodb://host:notaport", "mongodb://h/?nosuchoption=1",
                                 "mongodb+srv://h1,h2", "mongodb://u:p@h:99999/"])
def test_bad_urls_name_the_field(url: str) -> None:
    with pytest.raises(ConfigError, match="result_backend") as info:
        MongoBackend(Config(broker="memory", result_backend=url))
    assert ":p@" not in str(info.value)


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"mongodb\.database"):
        MongoBackend(Config(broker="memory", result_backend="mongodb://h/", mongodb=MongoDBConfig(database="a.b")))
    with pytest.raises(ConfigError, match=r"mongodb\.client"):
        MongoBackend(Config(broker="memory", result_backend="mongodb://h/", mongodb=MongoDBConfig(client=object())))


async def test_unreachable_server_is_a_backend_error() -> None:
    b = MongoBackend(Config(broker="memory", result_backend="mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=200"))
    try:
        with pytest.raises(BackendError, match="mongodb backend"):
            await b.get_state(task_uuid())
    finally:
        await b.close()


async def test_given_client_is_used_and_left_open(database: str) -> None:
    client: Raw = AsyncMongoClient(mongo_url())
    b = MongoBackend(Config(broker="memory", result_backend="mongodb://ignored.invalid/",
                            mongodb=MongoDBConfig(client=client, database=database)))
    try:
        state = TaskState(task_uuid(), SUCCESS, task_name="t", results=[TaskResult("int64", 1)])
        await b.set_state(state)
        await b.close()
        assert await b.get_state(state.task_uuid) == state  # close() left the user's client open
        assert await client[database].tasks.count_documents({}) == 1
    finally:
        await client.close()


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path, database: str) -> Iterator[Server]:
    cnf = _config(database)
    cnf.broker = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    with worker_server(cnf, "mongodb_worker") as server:
        yield server


def test_worker_end_to_end(server: Server) -> None:
    check_task_and_chord(server)
