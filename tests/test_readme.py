"""The README and the code agree: its Python blocks run, as a user would run them (the tour's app
module under a `machinery worker` subprocess started with the README's own command line, its
producer script next to it, on the embedded default), every `# -> value` it shows is what the code
gives, and its command-line synopsis, scheme table and config table name what the code has."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNER = ROOT / "tests" / "readme_runner.py"
MARK = re.compile(r"<!-- not-run: (.+?) -->")
#: why a block may stay out of the run: it needs a server the embedded default does not replace,
#: or it is a fragment (a signature, a shape) rather than code
REASON = re.compile(r"(needs (Redis|RabbitMQ|SQS|Pub/Sub|memcached|DynamoDB|MongoDB|OpenTelemetry)\b.*|fragment: .+)")
FILE = re.compile(r"# ([\w./-]+\.py)$")


@dataclass
class Block:
    lang: str
    line: int  # README line of the block's first source line
    source: str
    mark: str | None  # the not-run reason, if any
    file: str | None = None  # the file the block belongs to: named by its first line, or continued


def blocks() -> list[Block]:
    out: list[Block] = []
    lines = README.read_text().splitlines()
    i = 0
    current: str | None = None
    while i < len(lines):
        fence = lines[i]
        if not fence.startswith("```"):
            i += 1
            continue
        lang = fence[3:].strip()
        before = next((text for text in reversed(lines[:i]) if text.strip()), "")
        mark = MARK.fullmatch(before.strip())
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        block = Block(lang, i + 2, "\n".join(lines[i + 1:end]) + "\n", mark.group(1) if mark else None)
        if lang == "python" and block.mark is None:
            named = FILE.fullmatch(lines[i + 1].strip()) if end > i + 1 else None
            current = named.group(1) if named else current
            block.file = current
        out.append(block)
        i = end + 1
    return out


def python_blocks() -> list[Block]:
    return [b for b in blocks() if b.lang == "python"]


def test_every_block_runs_or_says_why_not() -> None:
    found = python_blocks()
    marked = [b for b in found if b.mark is not None]
    assert len(found) >= 5
    assert len(marked) <= max(2, len(found) // 4), f"too many blocks left out of the run: {marked}"
    for b in marked:
        assert REASON.fullmatch(b.mark or ""), f"README.md line {b.line}: not-run reason {b.mark!r} is not a " \
                                               "server the embedded default cannot stand in for, nor a fragment"
    for b in found:
        assert b.mark is not None or b.file is not None, (
            f"README.md line {b.line}: a block before any `# file.py` block belongs to no file")
    files = {b.file for b in found if b.file}
    assert {"myapp.py", "producer.py"} <= files


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER", "RESULT_BACKEND", "LOCK", "DEFAULT_QUEUE") and not k.startswith("MACHINERY_")}
    env["PYTHONPATH"] = str(ROOT / "src")
    return env


def _worker_command() -> list[str]:
    for b in blocks():
        if b.lang == "sh":
            for text in b.source.splitlines():
                if text.startswith("machinery worker --app myapp:server"):
                    return [sys.executable, "-m", "machinery", *shlex.split(text)[1:]]
    raise AssertionError("the README's tour shows no `machinery worker --app myapp:server` command")


def test_the_tour_runs_as_a_user_would(tmp_path: Path) -> None:
    """The app module under the README's worker command, then each other file as a script, all in
    one directory on Config()'s default store; no warning, no error, every shown value right."""
    files: dict[str, list[Block]] = {}
    for b in python_blocks():
        if b.file is not None:
            files.setdefault(b.file, []).append(b)
    (tmp_path / "myapp.py").write_text("".join(b.source for b in files.pop("myapp.py")))
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(_worker_command(), cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("consuming machinery_tasks") < 1:
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert f"broker and results: SQLite file {tmp_path / 'machinery.sqlite3'}" in log.read_text()
        for name, parts in files.items():
            spec = tmp_path / f"{name}.blocks.json"
            spec.write_text(json.dumps([[b.line, b.source] for b in parts]))
            run = subprocess.run([sys.executable, str(RUNNER), str(spec)], cwd=tmp_path, env=_env(),
                                 capture_output=True, text=True, timeout=180, check=False)
            assert run.returncode == 0, f"{name}:\n{run.stderr}"
            assert run.stderr == "", f"{name} printed to stderr:\n{run.stderr}"
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=60)
    assert code == 0, log.read_text()
    text = log.read_text()
    assert "Traceback" not in text and "ERROR" not in text, text


def test_the_runner_checks_what_the_readme_shows(tmp_path: Path) -> None:
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps([[10, "x = [1, 2]\nlen(x)   # -> 2  (fine)\n"], [20, "x[0]   # -> 5\n"]]))
    run = subprocess.run([sys.executable, str(RUNNER), str(spec)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 1
    assert "README.md line 20: the code gives 1, the README says 5" in run.stderr
    spec.write_text(json.dumps([[1, "s = 'task_123'\ns   # -> 'task_...'\n"]]))
    assert subprocess.run([sys.executable, str(RUNNER), str(spec)], timeout=60, check=False).returncode == 0


def test_the_command_line_synopsis_matches_the_parser() -> None:
    from machinery.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    (synopsis,) = [b for b in blocks() if b.lang == "" and "machinery worker --app" in b.source]
    shown: dict[str, set[str]] = {}
    command = ""
    for text in synopsis.source.splitlines():
        words = text.split("#")[0].split()
        if words[:1] == ["machinery"] and len(words) > 1 and not words[1].startswith("["):
            command = words[1]
        shown.setdefault(command, set()).update(re.findall(r"--[a-z][a-z-]*", " ".join(words)))
    assert set(commands) == set(shown) - {""}
    for name, sub in commands.items():
        real = {opt for action in sub._actions for opt in action.option_strings
                if opt.startswith("--") and action.help != argparse.SUPPRESS}  # hidden: for the supervisor
        real -= {"--help", "--log-level", "--factory"}  # shared by every command, described below it
        assert shown[name] == real, (
            f"machinery {name}: the README shows {sorted(shown[name])}, the parser has {sorted(real)}")
    top = {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")} - {"--help"}
    assert shown[""] == top


def test_the_scheme_table_lists_every_scheme() -> None:
    from machinery.drivers import registry

    text = README.read_text()
    table = text[text.index("## Brokers and backends"):text.index("### The embedded SQLite store")]
    for scheme in {*registry._BROKERS, *registry._BACKENDS}:
        assert re.search(rf"`{re.escape(scheme)}(://|`)", table), f"the README's scheme table lacks {scheme}"


def test_the_config_table_names_real_variables_and_fields() -> None:
    from machinery.config import _SECTIONS, Config

    env = set(Config._env_names.values())
    for section in _SECTIONS.values():
        env |= set(section._env_names.values())
    text = README.read_text()
    table = text[text.index("| field | env | default |"):text.index("## Command line")]
    rows = [line.split(" | ") for line in table.splitlines()[2:] if line.startswith("| `")]
    shown = {name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row[1])}
    aliases = {"MULTIPLE_BROKEN_SEPARATOR", "REDIS_CLUSTER_ENABLED"}  # Go's other names, read by from_env too
    assert shown - env - aliases == set(), "README names variables Config.from_env ignores"
    assert env - shown == set(), "Config.from_env reads variables the README's table does not name"
    fields = {name for name in Config.__dataclass_fields__ if name not in _SECTIONS}
    for section, cls in _SECTIONS.items():
        fields |= {f"{section}.{name}" for name in cls.__dataclass_fields__}
    named = set()
    for row in rows:
        prefix = ""
        for name in re.findall(r"`([a-z_][a-z_.]*)`", row[0]):
            if "." in name:
                prefix = name.rpartition(".")[0]
                named.add(name)
            else:
                named.add(f"{prefix}.{name}" if prefix else name)
    assert fields - named == set(), "Config has fields the README's config table does not describe"


@pytest.mark.parametrize("name", ["myapp.py", "producer.py"])
def test_the_tour_files_are_named(name: str) -> None:
    assert any(b.file == name for b in python_blocks())
