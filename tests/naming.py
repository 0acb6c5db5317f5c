"""Names of what the tests create on shared servers: unique to this test session, so that the
clean-up at the end of one session never deletes what another session (running at the same time
on the same RabbitMQ) is still using."""

from __future__ import annotations

import os
import uuid

SESSION_PREFIX = "mt" + os.environ.setdefault("MACHINERY_TEST_SESSION", uuid.uuid4().hex[:6]) + "_"


def unique(kind: str = "") -> str:
    """A fresh name under this session's prefix."""
    return f"{SESSION_PREFIX}{kind}{uuid.uuid4().hex[:10]}"
