"""Group, Chord and Chain: workflows expressed in Go Machinery's wire fields.

A chain step may itself be a group or a chord (beyond Go Machinery): the preceding task lists
every group member in its OnSuccess, and a following step becomes the group's chord callback,
so the messages stay in Go's shape.
"""

from __future__ import annotations

import itertools
import uuid as _uuid
from collections.abc import Iterable

from machinery.errors import MachineryError
from machinery.tasks.signature import Signature


def new_uuid(prefix: str) -> str:
    return f"{prefix}{_uuid.uuid4()}"


class Group:
    """Tasks that run in parallel; every member carries the group UUID and size."""

    def __init__(self, *signatures: Signature | Iterable[Signature], group_uuid: str = "") -> None:
        members: list[object] = list(signatures)
        if len(signatures) == 1 and not isinstance(signatures[0], Signature):
            if not isinstance(signatures[0], Iterable) or isinstance(signatures[0], str | bytes):
                raise MachineryError(f"Group members must be Signatures, got {type(signatures[0]).__name__}")
            members = list(signatures[0])  # Group([s1, s2]) as well as Group(s1, s2)
        if not members:
            raise MachineryError("a Group needs at least one signature")
        self.group_uuid = group_uuid or new_uuid("group_")
        self.signatures: list[Signature] = []
        for sig in members:
            if not isinstance(sig, Signature):
                raise MachineryError(f"Group members must be Signatures, got {type(sig).__name__}")
            self.signatures.append(sig)
        for sig in self.signatures:
            if not sig.uuid:
                sig.uuid = new_uuid("task_")
            sig.group_uuid = self.group_uuid
            sig.group_task_count = len(self.signatures)

    def task_uuids(self) -> list[str]:
        return [s.uuid for s in self.signatures]

    def copy(self) -> Group:
        """Fresh copies with new group and task UUIDs (used for each periodic tick)."""
        sigs = [fresh_copy(s) for s in self.signatures]
        return Group(*sigs)

    def __repr__(self) -> str:
        return f"Group({self.group_uuid!r}, {len(self.signatures)} tasks)"


class Chord:
    """A group whose results, in group order, are appended to the callback's args once all succeed."""

    def __init__(self, group: Group | Iterable[Signature], callback: Signature) -> None:
        if not isinstance(group, Group):
            group = Group(*group)
        if not isinstance(callback, Signature):
            raise MachineryError(f"a Chord callback must be a Signature, got {type(callback).__name__}")
        self.group = group
        self.callback = callback
        if not callback.uuid:
            callback.uuid = new_uuid("chord_")
        for sig in group.signatures:
            sig.chord_callback = callback

    def copy(self) -> Chord:
        callback = fresh_copy(self.callback, "chord_")
        return Chord(self.group.copy(), callback)

    def __repr__(self) -> str:
        return f"Chord({self.group!r}, callback={self.callback.name!r})"


Step = Signature | Group | Chord


class Chain:
    """Steps run one after another; each result is appended to the next step's args unless immutable."""

    def __init__(self, *steps: Step | Iterable[Signature]) -> None:
        flat: list[Step] = []
        for step in steps:
            if isinstance(step, Signature | Group | Chord):
                flat.append(step)
            else:
                flat.extend(step)  # a list of signatures, as Go's variadic NewChain takes
        if not flat:
            raise MachineryError("a Chain needs at least one step")
        self._templates: list[Step] = [_fresh_step(s) for s in flat]
        self.steps: list[Step] = _link(flat)

    @property
    def signatures(self) -> list[Signature]:
        """The plain-signature steps (Go's Chain.Tasks when no step is a group)."""
        return [s for s in self.steps if isinstance(s, Signature)]

    def first(self) -> Step:
        return self.steps[0]

    def copy(self) -> Chain:
        """Fresh copies of every step with new UUIDs (used for each periodic tick)."""
        return Chain(*(_fresh_step(s) for s in self._templates))

    def __repr__(self) -> str:
        return f"Chain({len(self.steps)} steps)"


def _link(steps: list[Step]) -> list[Step]:
    """Fill UUIDs and nest each step in the previous one's OnSuccess (or chord callback)."""
    merged: list[Step] = []
    i = 0
    while i < len(steps):
        step = steps[i]
        # a bare group followed by a signature is a chord on that signature
        if isinstance(step, Group) and i + 1 < len(steps) and isinstance(steps[i + 1], Signature):
            nxt = steps[i + 1]
            assert isinstance(nxt, Signature)
            merged.append(Chord(step, nxt))
            i += 2
            continue
        if isinstance(step, Signature) and not step.uuid:
            step.uuid = new_uuid("task_")
        merged.append(step)
        i += 1
    for prev, nxt in itertools.pairwise(merged):
        tail = _tail(prev)
        if tail is None:
            raise MachineryError(
                "a group without a callback can only be the last step of a chain "
                "(or be followed by a signature, which becomes its chord callback)"
            )
        existing = tail.on_success or []
        tail.on_success = existing + [h for h in _heads(nxt) if not any(h is e for e in existing)]
    return merged


def _tail(step: Step) -> Signature | None:
    """The signature whose success leads to the next step (its own OnSuccess tasks are kept)."""
    if isinstance(step, Signature):
        return step
    if isinstance(step, Chord):
        return step.callback
    return None


def _heads(step: Step) -> list[Signature]:
    if isinstance(step, Signature):
        return [step]
    if isinstance(step, Chord):
        return list(step.group.signatures)
    return list(step.signatures)


def fresh_copy(sig: Signature, prefix: str = "task_") -> Signature:
    """A deep copy with new UUIDs throughout and no group membership."""
    copy = sig.copy()
    _renew(copy, prefix)
    copy.chord_callback = None
    copy.group_uuid = ""
    copy.group_task_count = 0
    return copy


def _renew(sig: Signature, prefix: str) -> None:
    sig.uuid = new_uuid(prefix)
    for nested in (sig.on_success or []) + (sig.on_error or []):
        _renew(nested, "task_")


def _fresh_step(step: Step) -> Step:
    if isinstance(step, Signature):
        return fresh_copy(step)
    return step.copy()
