"""Python-only state details (a failure's exception type and traceback, a running task's
progress) round-trip through every backend, and a later state without them drops them."""

from __future__ import annotations

import uuid

from machinery.drivers.backend import Backend
from machinery.tasks.state import FAILURE, STARTED, SUCCESS, TaskResult, TaskState


async def test_failure_details_and_progress_round_trip(backend: Backend) -> None:
    failed, running = f"task_{uuid.uuid4()}", f"task_{uuid.uuid4()}"
    trace = 'Traceback (most recent call last):\n  File "app.py", line 3, in boom\nValueError: "CreatedAt":\n'
    progress = {"done": 3, "of": 10, "CreatedAt": "not the state's", "note": "é <&>"}
    await backend.set_states([
        TaskState(failed, FAILURE, task_name="boom", error="bad", exc_type="ValueError", traceback=trace),
        TaskState(running, STARTED, task_name="long", progress=progress),
    ])
    got_failed, got_running = await backend.get_states([failed, running])
    assert got_failed is not None and got_running is not None
    assert (got_failed.state, got_failed.error, got_failed.exc_type, got_failed.traceback) == (
        FAILURE, "bad", "ValueError", trace)
    assert got_running.state == STARTED and got_running.progress == progress
    await backend.set_states([TaskState(running, SUCCESS, task_name="long", results=[TaskResult("int64", 1)])])
    (done,) = await backend.get_states([running])
    assert done is not None and done.state == SUCCESS and done.progress is None and done.exc_type == ""
