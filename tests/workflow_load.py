"""Shared check: hundreds of chords over two worker processes, each callback fired exactly once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from machinery import Chord, Config, Group, Server, Signature

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "machinery"]


def chords_fire_exactly_once(cnf: Config, env: dict[str, str], log: Path, chords: int = 200,
                             members: int = 5) -> None:
    args = [*CLI, "worker", "--app", "apps.envapp:server", "--processes", "2", "--concurrency", "16"]
    workers = subprocess.Popen(args, env=env, text=True)
    server = Server(cnf)
    try:
        results = []
        for i in range(chords):
            group = Group(*(Signature("add", [i, m]) for m in range(members)))
            results.append((i, server.send_chord(Chord(group, Signature("chord_done")))))
        for i, res in results:
            assert res.get(timeout=120) == sum(i + m for m in range(members))
    finally:
        server.close()
        workers.send_signal(signal.SIGTERM)
        workers.wait(timeout=60)
    fired = [line.split()[0] for line in log.read_text().splitlines()]
    expected = {res.chord_async_result.task_uuid for _, res in results}
    assert set(fired) == expected, "some chords never fired"
    assert len(fired) == len(expected), "some chords fired more than once"
