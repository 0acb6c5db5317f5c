"""Go Machinery's AMQP group queue, so that chords fire once in a mixed Go and Python fleet.

A Go worker publishes every group member's final state (SUCCESS or FAILURE) to a queue named by
the group UUID, declared like a task's state queue, and calls the group complete when that queue
holds GroupTaskCount messages. Its TriggerChord returns false once a queue `<group>_chord_triggered`
exists; its GroupTaskStates takes the messages with an exclusive consumer, then sends the callback.
A Go producer writes no group record at all.

Python members publish their final states there too, so either side counts every member. When
a Python worker fires (or fails) the chord, it first holds the group's messages, then creates
`<group>_chord_triggered` (a Go worker checking after that does not fire) and takes the messages
(a Go worker that checked the count just before finds them gone, as after its own GroupTaskStates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aiormq.abc import AbstractChannel, DeliveredMessage

from machinery.drivers.amqp.connection import get_all
from machinery.errors import DecodeError
from machinery.tasks.state import FAILURE, TaskState, decode_state


async def declare(ch: AbstractChannel, group_uuid: str, args: dict[str, Any]) -> int:
    """Declare `<group>` exactly as Go does; returns how many member states wait in it."""
    ok = await ch.queue_declare(group_uuid, durable=False, auto_delete=True, arguments=args)
    return int(getattr(ok, "message_count", 0) or 0)


async def read(ch: AbstractChannel, group_uuid: str) -> list[tuple[DeliveredMessage, TaskState]]:
    """Every member state in `<group>`, in completion order, held unacked on `ch`; the first of
    each task only (a redelivered Go member can publish twice)."""
    out: list[tuple[DeliveredMessage, TaskState]] = []
    seen: set[str] = set()
    for msg in await get_all(ch, group_uuid):
        try:
            state = decode_state(msg.body)
        except DecodeError:
            continue
        if state.task_uuid not in seen and state.is_completed():
            seen.add(state.task_uuid)
            out.append((msg, state))
    return out


def failures(states: Sequence[TaskState]) -> int:
    return sum(1 for s in states if s.state == FAILURE)
