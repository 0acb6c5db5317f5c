"""DynamoDB backend beyond the contract suite: URLs, Go's item shape both ways (including the items
Go itself writes), a missing table, and a worker end to end (SQLite broker), on moto."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from backend_e2e import check_task_and_chord, worker_server
from dynamodb_support import backend_url, delete_tables, dynamodb_config
from machinery import Config, Server
from machinery.drivers.dynamodb.backend import DynamoDBBackend
from machinery.drivers.dynamodb.client import parse_dynamodb_url
from machinery.drivers.registry import make_backend, scheme_of
from machinery.errors import BackendError, ConfigError
from machinery.tasks.state import TaskResult, TaskState
from moto_server import MOTO_REGION, moto_endpoint, moto_session


def _config() -> Config:
    return Config(broker="memory", result_backend=backend_url(), dynamodb=dynamodb_config())


@pytest.fixture
async def backend() -> AsyncIterator[DynamoDBBackend]:
    cnf = await asyncio.to_thread(_config)
    b = DynamoDBBackend(cnf)
    await b.create_tables()
    yield b
    await b.close()
    await delete_tables(cnf)


@pytest.fixture
async def raw() -> AsyncIterator[Any]:
    """A plain aiobotocore client on the emulator, to write and read items as Go does."""
    endpoint = await asyncio.to_thread(moto_endpoint, True)
    async with moto_session().create_client(  # type: ignore[attr-defined]
        "dynamodb", endpoint_url=endpoint, region_name=MOTO_REGION,
    ) as client:
        yield client


def test_url_forms() -> None:
    t = parse_dynamodb_url("dynamodb://", "eu-north-1")
    assert (t.region, t.endpoint_url) == ("eu-north-1", None)
    t = parse_dynamodb_url("dynamodb://eu-west-1", None)
    assert (t.region, t.endpoint_url) == ("eu-west-1", None)
    t = parse_dynamodb_url("dynamodb://127.0.0.1:5000?region=eu-west-2", None)
    assert (t.region, t.endpoint_url) == ("eu-west-2", "http://127.0.0.1:5000")
    t = parse_dynamodb_url("https://dynamodb.eu-central-1.amazonaws.com", None)
    assert (t.region, t.endpoint_url) == ("eu-central-1", None)
    t = parse_dynamodb_url("http://dynamodb-local:8000", "ap-south-1")
    assert (t.region, t.endpoint_url) == ("ap-south-1", "http://dynamodb-local:8000")
    for bad in ("dynamodb://key:secret@host:1", "dynamodb://host:1/path", "dynamodb://?table=x",
                "dynamodb://?region=Mars", "redis://dynamodb"):
        with pytest.raises(ConfigError, match="result_backend"):
            parse_dynamodb_url(bad, None)


def test_registry_takes_go_urls() -> None:
    assert scheme_of("https://dynamodb.us-east-1.amazonaws.com", "backend") == "dynamodb"
    backend = make_backend(Config(result_backend="https://dynamodb.us-east-1.amazonaws.com"))
    assert isinstance(backend, DynamoDBBackend)
    assert backend.task_table == "task_states" and backend.group_table == "group_metas"
    with pytest.raises(ConfigError, match=r"dynamodb\.client"):
        DynamoDBBackend(Config(result_backend="dynamodb://", dynamodb={"client": object()}))


async def test_missing_table_is_named(raw: Any) -> None:
    cnf = await asyncio.to_thread(_config)
    backend = DynamoDBBackend(cnf)
    try:
        with pytest.raises(BackendError, match=rf"{cnf.dynamodb.task_states_table}.*dynamodb\.task_states_table"):
            await backend.set_state(TaskState("task_x", "STARTED"))
        with pytest.raises(BackendError, match=rf"{cnf.dynamodb.group_metas_table}.*dynamodb\.group_metas_table"):
            await backend.get_group_meta("group_x")
    finally:
        await backend.close()


async def test_items_keep_go_shape_with_typed_values(backend: DynamoDBBackend, raw: Any) -> None:
    task = f"task_{uuid.uuid4()}"
    await backend.set_pending([TaskState(task, "PENDING", task_name="add")])
    state = TaskState(task, "SUCCESS", task_name="add", results=[
        TaskResult("int64", 2), TaskResult("string", "a b"), TaskResult("[]int64", [1, 2]), TaskResult("bool", True),
    ])
    await backend.set_state(state)
    item = (await raw.get_item(TableName=backend.task_table, Key={"TaskUUID": {"S": task}}))["Item"]
    assert item["State"] == {"S": "SUCCESS"} and item["TaskName"] == {"S": "add"}
    assert [r["M"]["Value"] for r in item["Results"]["L"]] == [{"S": "2"}, {"S": "a b"}, {"S": "[1,2]"}, {"S": "true"}]
    assert int(item["TTL"]["N"]) > time.time()
    got = await backend.get_state(task)
    assert got is not None and got.values() == [2, "a b", [1, 2], True]


async def test_reads_items_go_wrote(backend: DynamoDBBackend, raw: Any) -> None:
    """Go's PutItem (empty strings as NULL), then its UpdateItem with %v strings and time.String()."""
    task, group = f"task_{uuid.uuid4()}", f"group_{uuid.uuid4()}"
    await raw.put_item(TableName=backend.task_table, Item={
        "TaskUUID": {"S": task}, "TaskName": {"S": "mixed"}, "State": {"S": "PENDING"}, "Results": {"NULL": True},
        "Error": {"NULL": True}, "CreatedAt": {"S": "2025-01-02T03:04:05.123456789Z"}, "TTL": {"N": "0"},
    })
    results = [("int64", "2"), ("[]int64", "[1 2 3]"), ("string", "hi there"), ("bool", "true"),
               ("float64", "1.5"), ("[]uint8", "[1 2 3]"), ("[]string", "[a b]")]
    await raw.update_item(
        TableName=backend.task_table, Key={"TaskUUID": {"S": task}},
        UpdateExpression="SET #S = :s, #C = :c, #R = :r",
        ExpressionAttributeNames={"#S": "State", "#C": "CreatedAt", "#R": "Results"},
        ExpressionAttributeValues={
            ":s": {"S": "SUCCESS"}, ":c": {"S": "2025-01-02 03:04:05.123456789 +0000 UTC"},
            ":r": {"L": [{"M": {"Type": {"S": t}, "Value": {"S": v}}} for t, v in results]},
        },
    )
    got = await backend.get_state(task)
    assert got is not None and got.state == "SUCCESS" and got.task_name == "mixed" and got.error == ""
    assert got.values() == [2, [1, 2, 3], "hi there", True, 1.5, b"\x01\x02\x03", ["a", "b"]]
    assert got.created_at is not None and got.created_at.isoformat().startswith("2025-01-02T03:04:05.123456")

    await raw.put_item(TableName=backend.group_table, Item={
        "GroupUUID": {"S": group}, "TaskUUIDs": {"L": [{"S": task}]}, "ChordTriggered": {"BOOL": False},
        "Lock": {"BOOL": False}, "CreatedAt": {"S": "2025-01-02T03:04:05Z"}, "TTL": {"N": "0"},
    })
    meta = await backend.get_group_meta(group)
    assert meta is not None and meta.task_uuids == [task] and not meta.chord_triggered
    assert (await backend.group_member_done(group, task, 1, False)).done == 1
    assert await backend.trigger_chord(group) is True
    assert await backend.trigger_chord(group) is False


async def test_pending_after_the_workers_first_state(backend: DynamoDBBackend) -> None:
    """A send stores PENDING while publishing: when RECEIVED got there first, PENDING only adds CreatedAt."""
    task = f"task_{uuid.uuid4()}"
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    await backend.set_state(TaskState(task, "RECEIVED", task_name="t"))
    await backend.set_pending([TaskState(task, "PENDING", task_name="t", created_at=created)])
    got = await backend.get_state(task)
    assert got is not None and got.state == "RECEIVED" and got.created_at == created


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    cnf = _config()
    cnf.broker = f"sqlite:///{tmp_path / 'broker.sqlite3'}"

    async def tables() -> None:
        b = DynamoDBBackend(cnf)
        try:
            await b.create_tables()
        finally:
            await b.close()

    asyncio.run(tables())
    try:
        with worker_server(cnf, "dynamodb_worker") as server:
            yield server
    finally:
        asyncio.run(delete_tables(cnf))


def test_worker_end_to_end(server: Server) -> None:
    check_task_and_chord(server)
