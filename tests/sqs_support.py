"""SQS test helpers on the run's shared moto server (tests/moto_server.py).

Clients get the emulator's fake credentials through an AioSession (sqs.client), so nothing in the
environment is changed and no real AWS account can be reached.
"""

from __future__ import annotations

import uuid
from typing import Any

from machinery import Config
from machinery.config import SQSConfig
from moto_server import MOTO_CREDENTIALS, MOTO_REGION, moto_endpoint

ACCOUNT = "123456789012"  # moto's default account


def broker_url() -> str:
    """A Go-style broker URL on the emulator (http:// needs DISABLE_STRICT_SQS_CHECK for the registry)."""
    return f"{moto_endpoint()}/{ACCOUNT}"


def session() -> Any:
    """An AioSession with the emulator's credentials and region."""
    from aiobotocore.session import AioSession

    s = AioSession()
    s.set_credentials(*MOTO_CREDENTIALS)
    s.set_config_variable("region", MOTO_REGION)
    return s


def sqs_config(namespace: str = "", **sqs: Any) -> Config:
    """A Config on the emulator with a default queue of its own (mt_sqs_<namespace>)."""
    ns = namespace or uuid.uuid4().hex[:10]
    return Config(broker=broker_url(), result_backend="memory", default_queue=f"mt_sqs_{ns}",
                  sqs=SQSConfig(client=session(), **sqs))


async def delete_queues(prefix: str) -> None:
    """Delete every emulator queue whose name starts with `prefix`."""
    async with session().create_client("sqs", endpoint_url=moto_endpoint(), region_name=MOTO_REGION) as client:
        urls = (await client.list_queues(QueueNamePrefix=prefix)).get("QueueUrls") or []
        for url in urls:
            await client.delete_queue(QueueUrl=url)
