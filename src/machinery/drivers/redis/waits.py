"""The Redis result wait, one definition for both faces (blocking.py and notify.py do the I/O).

A completed state is stored and PUBLISHed on `machinery:done:<uuid>` by one script. A wait:

1. subscribes to the task's channel, unless its own send already did (see the send-ahead below);
2. once the subscription is confirmed, reads the state: one stored before is read, one stored
   after is published to the subscriber (a confirmation after a reconnect reads again);
3. then waits for the PUBLISH, and re-reads RECHECK_FIRST seconds after it started, then at
   doubling intervals up to RECHECK_MAX: Go stores states without publishing, and a connection
   may drop;
4. at its deadline, makes one last read bounded by LAST_LOOK, then gives up.

Send-ahead: a caller (a thread, or an asyncio task) that waits for each task it sends before
sending the next (send-and-wait, the RPC pattern) subscribes with its next send. The face writes
SUBSCRIBE just before the send, and the send's script (SEND_ONE) reports the channel's subscriber
count (PUBSUB NUMSUB). Seen subscribed, the wait skips steps 1 and 2: it only reads the PUBLISH,
one round trip per send-and-wait instead of three. A caller that sends twice without waiting
stops doing it, so bulk senders pay nothing.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from machinery.tasks.state import TaskState, decode_state

#: completed states are PUBLISHed on CHANNEL_PREFIX + task uuid
CHANNEL_PREFIX = "machinery:done:"
#: seconds to the first re-read of a waited-for state, and the longest interval between re-reads
RECHECK_FIRST, RECHECK_MAX = 0.25, 1.0
#: how long the last look at the deadline may take (a state stored just before it still counts)
LAST_LOOK = 0.1


def channel_of(task_uuid: str) -> bytes:
    return (CHANNEL_PREFIX + task_uuid).encode()


class Step(Enum):
    READ = "read"  # read the stored state now, then tell the wait (read())
    LISTEN = "listen"  # wait up to the given seconds for a pub/sub message or confirmation
    LAST_LOOK = "last_look"  # the deadline came: one read bounded by LAST_LOOK, then give up


class Wait:
    """The decisions of one wait: ask next() what to do, tell it what happened.

    `subscribed_ahead`: its send proved the channel subscribed before the task went out, so
    nothing can have been stored unseen: the first confirmation is not followed by a read.
    """

    __slots__ = ("_deadline", "_next_read", "_read_now", "_recheck", "_skip")

    def __init__(self, deadline: float | None, now: float, subscribed_ahead: bool = False) -> None:
        self._deadline = deadline
        self._recheck = RECHECK_FIRST
        self._next_read = now + RECHECK_FIRST
        self._read_now = False
        self._skip = 1 if subscribed_ahead else 0

    def next(self, now: float) -> tuple[Step, float]:
        """What to do now, and for how long at most (seconds)."""
        if self._deadline is not None and now >= self._deadline:
            return Step.LAST_LOOK, LAST_LOOK
        if self._read_now:
            self._read_now = False
            return Step.READ, 0.0
        if now >= self._next_read:
            self._recheck = min(self._recheck * 2, RECHECK_MAX)
            self._next_read = now + self._recheck
            return Step.READ, 0.0
        until = self._next_read if self._deadline is None else min(self._next_read, self._deadline)
        return Step.LISTEN, until - now

    def confirmation(self) -> None:
        """The subscription is confirmed (first, or again after a reconnect): read now."""
        if self._skip:
            self._skip -= 1
            return
        self._read_now = True

    def interrupted(self) -> None:
        """The subscriber's connection had trouble: a PUBLISH may be lost, read now."""
        self._read_now = True

    @staticmethod
    def outcome(state: TaskState | None) -> TaskState | None:
        """The state that ends the wait (a completed one), from a read or a last look."""
        return state if state is not None and state.is_completed() else None

    @staticmethod
    def published(data: bytes) -> TaskState | None:
        """The state that ends the wait, from a message on the task's channel."""
        return Wait.outcome(decode_state(data))


class Caller:
    """What one caller last did, for the send-ahead: kept per thread (blocking face) or per
    asyncio task (asyncio face)."""

    __slots__ = ("ahead", "armed", "sent", "watched")

    def __init__(self) -> None:
        self.sent: bytes | None = None  # the channel of the last send, until a wait comes
        self.armed = False  # the last wait was for the task sent just before it
        self.watched: bytes | None = None  # a channel its send proved subscribed
        self.ahead: Any = None  # the face's handle of a subscription made ahead of a send

    def before_send(self, channel: bytes) -> bool:
        """Note a send of the task on `channel`; True: subscribe to it ahead of the send."""
        if self.sent is not None:
            self.armed = False  # the previous send was not waited for: not send-and-wait
        self.sent = channel
        self.watched = None
        return self.armed

    def after_send(self, channel: bytes, subscribers: int) -> None:
        """The send's script saw `subscribers` on the channel: above 0, the wait needs neither a
        SUBSCRIBE nor a first read."""
        if subscribers > 0:
            self.watched = channel

    def before_wait(self, channel: bytes) -> bool:
        """Note a wait on `channel`; True once if its send proved it subscribed."""
        self.armed = self.sent == channel  # waits for what it just sent
        self.sent = None
        watched, self.watched = self.watched == channel, None
        return watched
