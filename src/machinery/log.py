"""The library's logger: stdlib logging.getLogger("machinery") unless replaced with set()."""

from __future__ import annotations

import logging
from typing import Any, Protocol


class Logger(Protocol):
    def debug(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def info(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def warning(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def error(self, msg: str, *args: Any, **kwargs: Any) -> None: ...
    def exception(self, msg: str, *args: Any, **kwargs: Any) -> None: ...


class _Holder:
    """Holds the active logger; a class attribute rather than a module global to keep state in one place."""

    logger: Logger = logging.getLogger("machinery")


def set(logger: Logger) -> None:
    """Send the library's log lines to `logger` (anything with debug/info/warning/error/exception)."""
    _Holder.logger = logger


def reset() -> None:
    _Holder.logger = logging.getLogger("machinery")


def get_logger() -> Logger:
    return _Holder.logger
