"""DynamoDB test helpers on the run's shared moto server (tests/moto_server.py).

Each test gets its own pair of tables (named after a namespace) and an AioSession with the
emulator's credentials, so nothing in the environment changes and no real AWS account is reached.
DynamoDB runs on the serial moto server, which applies conditional updates atomically as DynamoDB does.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

from machinery import Config
from machinery.config import DynamoDBConfig
from moto_server import MOTO_REGION, moto_endpoint, moto_session


def backend_url() -> str:
    """`dynamodb://127.0.0.1:PORT?region=...` on the serial emulator (started on first use)."""
    return f"dynamodb://{urlsplit(moto_endpoint(serial=True)).netloc}?region={MOTO_REGION}"


def dynamodb_config(namespace: str = "") -> DynamoDBConfig:
    ns = namespace or f"mt_{uuid.uuid4().hex[:10]}"
    return DynamoDBConfig(task_states_table=f"{ns}_task_states", group_metas_table=f"{ns}_group_metas",
                          client=moto_session())


async def delete_tables(cnf: Config) -> None:
    """Drop the config's two tables on the emulator (missing ones are fine)."""
    from botocore.exceptions import ClientError

    session = moto_session()
    async with session.create_client(  # type: ignore[attr-defined]
        "dynamodb", endpoint_url=moto_endpoint(serial=True), region_name=MOTO_REGION,
    ) as client:
        for table in (cnf.dynamodb.task_states_table, cnf.dynamodb.group_metas_table):
            try:
                await client.delete_table(TableName=table)
            except ClientError:
                pass
