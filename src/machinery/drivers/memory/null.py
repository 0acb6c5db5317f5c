"""The `null` result backend: stores nothing, for producers that never read results."""

from __future__ import annotations

from collections.abc import Sequence

from machinery.drivers.backend import Backend, GroupProgress
from machinery.tasks.state import GroupMeta, TaskState


class NullBackend(Backend):
    """Stores nothing (`null` URL): results cannot be read and chords cannot work. Paired with a
    broker that has BlockingPublish, a sync send is that publish (see pairing.py)."""

    async def set_states(self, states: Sequence[TaskState]) -> None:
        return None

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        return [None for _ in task_uuids]

    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        return None

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        return None

    async def group_member_done(self, group_uuid: str, task_uuid: str, total: int, failed: bool) -> GroupProgress:
        from machinery.errors import BackendError

        raise BackendError("the null result backend cannot track groups; chords need a real result backend")

    async def trigger_chord(self, group_uuid: str) -> bool:
        return False

    async def purge_state(self, task_uuid: str) -> None:
        return None

    async def purge_group_meta(self, group_uuid: str) -> None:
        return None
