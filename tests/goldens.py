"""Where the golden wire vectors (Go's own encoding/json output) are read from.

The suite's own copy in tests/golden is preferred, so a bare clone runs the tests; without it,
the shared folder beside the repository (../shared/reference/golden) is used. Neither gives a
clear failure naming both places.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_GOLDEN = REPO_ROOT / "tests" / "golden"
SHARED_GOLDEN = REPO_ROOT.parent / "shared" / "reference" / "golden"


def golden_dir() -> Path | None:
    for candidate in (LOCAL_GOLDEN, SHARED_GOLDEN):
        if candidate.is_dir() and any(candidate.glob("*.json")):
            return candidate
    return None


GOLDEN = golden_dir()


def golden(name: str) -> bytes:
    """The bytes of one golden file; a clear test failure when it cannot be found."""
    if GOLDEN is None:
        pytest.fail(f"golden files not found: expected {LOCAL_GOLDEN} (or {SHARED_GOLDEN})")
    path = GOLDEN / name
    if not path.is_file():
        pytest.fail(f"golden file {path} is missing: copy it from {SHARED_GOLDEN}")
    return path.read_bytes()


def golden_names(prefix: str = "") -> list[str]:
    if GOLDEN is None:
        return []
    return sorted(p.name for p in GOLDEN.glob(f"{prefix}*.json"))
