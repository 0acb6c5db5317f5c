"""Schemes Go Machinery knows but this version has no driver for fail with one clear line."""

from __future__ import annotations

import pytest

from machinery import Config, Server
from machinery.errors import DriverMissingError, UnknownSchemeError


@pytest.mark.parametrize("field,url", [
    ("broker", "https://sqs.us-east-1.amazonaws.com/123456789012"),
    ("result_backend", "memcache://127.0.0.1:11211"),
    ("result_backend", "mongodb://127.0.0.1:27017"),
])
def test_unavailable_driver_is_a_clear_error(field: str, url: str) -> None:
    with pytest.raises((UnknownSchemeError, DriverMissingError)) as info:
        Server(Config(**{field: url}))
    text = str(info.value)
    assert field in text or "pip install" in text
    if isinstance(info.value, UnknownSchemeError):
        assert "not available" in text and "sqlite" in text
