"""machinery: a distributed task queue for Python, wire-compatible with Go Machinery.

Names are imported on first use, so `import machinery` (and the worker supervisor, which only
forks) stays small; drivers are never imported until a URL asks for one.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.context import TaskContext
    from machinery.errors import (
        MachineryError,
        OptionError,
        RetryTaskLater,
        ServerClosedError,
        SoftTimeLimitExceeded,
        TaskArgumentsError,
        TaskError,
        TimeLimitExceeded,
        TimeoutError,
    )
    from machinery.result import AsyncResult, ChainAsyncResult, ChordAsyncResult, GroupAsyncResult
    from machinery.server import Server
    from machinery.task import Task
    from machinery.tasks.signature import Arg, Signature
    from machinery.tasks.state import TaskResult, TaskState
    from machinery.tasks.workflow import Chain, Chord, Group
    from machinery.worker import Worker

_HOMES = {
    "Config": "machinery.config",
    "TaskContext": "machinery.context",
    "MachineryError": "machinery.errors", "RetryTaskLater": "machinery.errors", "TaskError": "machinery.errors",
    "TimeoutError": "machinery.errors", "OptionError": "machinery.errors", "ServerClosedError": "machinery.errors",
    "TaskArgumentsError": "machinery.errors", "SoftTimeLimitExceeded": "machinery.errors",
    "TimeLimitExceeded": "machinery.errors",
    "AsyncResult": "machinery.result", "ChainAsyncResult": "machinery.result",
    "ChordAsyncResult": "machinery.result", "GroupAsyncResult": "machinery.result",
    "Server": "machinery.server", "Task": "machinery.task",
    "Arg": "machinery.tasks.signature", "Signature": "machinery.tasks.signature",
    "TaskResult": "machinery.tasks.state", "TaskState": "machinery.tasks.state",
    "Chain": "machinery.tasks.workflow", "Chord": "machinery.tasks.workflow", "Group": "machinery.tasks.workflow",
    "Worker": "machinery.worker",
}

__all__ = [
    "Arg", "AsyncResult", "Chain", "ChainAsyncResult", "Chord", "ChordAsyncResult", "Config", "Group",
    "GroupAsyncResult", "MachineryError", "OptionError", "RetryTaskLater", "Server", "ServerClosedError",
    "Signature", "SoftTimeLimitExceeded", "Task", "TaskArgumentsError", "TaskContext", "TaskError", "TaskResult",
    "TaskState", "TimeLimitExceeded", "TimeoutError", "Worker",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'machinery' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
