from __future__ import annotations

from typing import Any

import machinery.log
from machinery import Signature
from machinery.testing import memory_server, running_worker


class Capture:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _add(self, level: str, msg: str, *args: Any, **kwargs: Any) -> None:
        self.lines.append((level, msg % args if args else msg))

    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._add("debug", msg, *args)

    def info(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._add("info", msg, *args)

    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._add("warning", msg, *args)

    def error(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._add("error", msg, *args)

    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None:
        self._add("exception", msg, *args)


def test_custom_logger_receives_library_lines() -> None:
    capture = Capture()
    machinery.log.set(capture)
    try:
        server = memory_server()

        @server.task
        def fails() -> None:
            raise RuntimeError("kaput")

        with running_worker(server):
            res = server.send_task(Signature("fails"))
            try:
                res.get(timeout=10)
            except Exception:
                pass
        server.close()
    finally:
        machinery.log.reset()
    assert any(level == "error" and "kaput" in text for level, text in capture.lines)
    assert any("consuming" in text for _, text in capture.lines)


def test_default_logger_is_stdlib_machinery() -> None:
    import logging

    assert machinery.log.get_logger() is logging.getLogger("machinery")
