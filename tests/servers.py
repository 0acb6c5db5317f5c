"""What every test-server helper needs: a free port, and the rule for a server that is missing
(skip locally; with CI=true fail, never skip silently)."""

from __future__ import annotations

import os
import socket

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip the test locally; with CI=true a missing or unreachable server is a failure."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: a missing test server is a failure, not a skip)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
