"""The RQ job functions the benchmark runs (workers import them by dotted path)."""

from __future__ import annotations

from benchkit import mark


def noop() -> None:
    mark()


def ping() -> int:
    return 1
