"""A URL scheme no driver handles fails at construction with one clear line."""

from __future__ import annotations

import pytest

from machinery import Config, Server
from machinery.errors import UnknownSchemeError


@pytest.mark.parametrize("field,known", [("broker", "sqlite"), ("result_backend", "mongodb")])
def test_unknown_scheme_names_the_field_and_the_known_schemes(field: str, known: str) -> None:
    with pytest.raises(UnknownSchemeError) as info:
        Server(Config(**{field: "nosuch://x"}))
    text = str(info.value)
    assert field in text and "nosuch" in text
    assert "known schemes" in text and known in text
