"""machinery: a distributed task queue for Python, wire-compatible with Go Machinery."""

from machinery.config import Config
from machinery.context import TaskContext
from machinery.errors import MachineryError, RetryTaskLater, TaskError, TimeoutError
from machinery.result import AsyncResult, ChainAsyncResult, ChordAsyncResult, GroupAsyncResult
from machinery.server import Server
from machinery.tasks.signature import Arg, Signature
from machinery.tasks.state import TaskResult, TaskState
from machinery.tasks.workflow import Chain, Chord, Group
from machinery.worker import Worker

__all__ = [
    "Arg", "AsyncResult", "Chain", "ChainAsyncResult", "Chord", "ChordAsyncResult", "Config", "Group",
    "GroupAsyncResult", "MachineryError", "RetryTaskLater", "Server", "Signature", "TaskContext",
    "TaskError", "TaskResult", "TaskState", "TimeoutError", "Worker",
]
__version__ = "0.1.0"
