from __future__ import annotations

from pathlib import Path

from machinery import Config
from test_cli import env_for
from workflow_load import chords_fire_exactly_once


def test_chords_fire_exactly_once_over_two_processes(tmp_path: Path) -> None:
    db = tmp_path / "chords.sqlite3"
    log = tmp_path / "fired.log"
    url = f"sqlite:///{db}"
    chords_fire_exactly_once(Config(broker=url, result_backend=url), env_for(db, MACHINERY_TEST_LOG=str(log)), log)


def test_big_chord_completes(tmp_path: Path) -> None:
    """A chord of 1,000 members on SQLite (group progress is a counter, not N reads per member)."""
    from machinery import Chord, Group, Server, Signature
    from machinery.testing import running_worker

    url = f"sqlite:///{tmp_path / 'big.sqlite3'}"
    server = Server(Config(broker=url, result_backend=url))
    server.register_task("one", lambda: 1)
    server.register_task("total", lambda *xs: sum(xs))
    try:
        with running_worker(server, concurrency=50):
            chord = Chord(Group(*(Signature("one") for _ in range(1000))), Signature("total"))
            assert server.send_chord(chord).get(timeout=120) == 1000
    finally:
        server.close()
