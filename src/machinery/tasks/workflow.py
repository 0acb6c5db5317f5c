"""Group, Chord and Chain: workflows expressed in Go Machinery's wire fields.

A chain step may itself be a group or a chord (beyond Go Machinery): the preceding task lists
every group member in its OnSuccess, and a following step becomes the group's chord callback,
so the messages stay in Go's shape.
"""

from __future__ import annotations

import uuid as _uuid
from collections.abc import Iterable

from machinery.errors import MachineryError
from machinery.tasks.signature import Signature


def new_uuid(prefix: str) -> str:
    return f"{prefix}{_uuid.uuid4()}"


class Group:
    """Tasks that run in parallel; every member carries the group UUID and size."""

    def __init__(self, *signatures: Signature, group_uuid: str = "") -> None:
        if len(signatures) == 1 and not isinstance(signatures[0], Signature):
            signatures = tuple(signatures[0])  # type: ignore[arg-type]
        if not signatures:
            raise MachineryError("a Group needs at least one signature")
        self.group_uuid = group_uuid or new_uuid("group_")
        self.signatures: list[Signature] = list(signatures)
        for sig in self.signatures:
            if not isinstance(sig, Signature):
                raise MachineryError(f"Group members must be Signatures, got {type(sig).__name__}")
            if not sig.uuid:
                sig.uuid = new_uuid("task_")
            sig.group_uuid = self.group_uuid
            sig.group_task_count = len(self.signatures)

    def task_uuids(self) -> list[str]:
        return [s.uuid for s in self.signatures]

    def copy(self) -> Group:
        """Fresh copies with new group and task UUIDs (used for each periodic tick)."""
        sigs = [_fresh(s) for s in self.signatures]
        return Group(*sigs)

    def __repr__(self) -> str:
        return f"Group({self.group_uuid!r}, {len(self.signatures)} tasks)"


class Chord:
    """A group whose results, in group order, are appended to the callback's args once all succeed."""

    def __init__(self, group: Group, callback: Signature) -> None:
        if not isinstance(group, Group):
            group = Group(*group)
        self.group = group
        self.callback = callback
        if not callback.uuid:
            callback.uuid = new_uuid("chord_")
        for sig in group.signatures:
            sig.chord_callback = callback

    def copy(self) -> Chord:
        callback = _fresh(self.callback, "chord_")
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
    for prev, nxt in zip(merged, merged[1:], strict=False):
        tail = _tail(prev)
        if tail is None:
            raise MachineryError("a group without a callback can only be the last step of a chain")
        heads = _heads(nxt)
        tail.on_success = (tail.on_success or []) + heads
    return merged


def _tail(step: Step) -> Signature | None:
    """The signature whose success leads to the next step."""
    if isinstance(step, Signature):
        node = step
        while node.on_success and len(node.on_success) == 1 and not node.on_success[0].group_uuid:
            node = node.on_success[0]
        return node
    if isinstance(step, Chord):
        return _tail(step.callback)
    return None


def _heads(step: Step) -> list[Signature]:
    if isinstance(step, Signature):
        return [step]
    if isinstance(step, Chord):
        return list(step.group.signatures)
    return list(step.signatures)


def _fresh(sig: Signature, prefix: str = "task_") -> Signature:
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
        return _fresh(step)
    return step.copy()
