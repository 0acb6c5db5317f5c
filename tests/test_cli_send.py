"""`machinery send` and the options every command shares: each option shown in the help works there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from machinery.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "machinery"]
APP = "apps.sendapp:server"


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "send.sqlite3"
    monkeypatch.setenv("BROKER", f"sqlite:///{path}")
    monkeypatch.setenv("RESULT_BACKEND", f"sqlite:///{path}")
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    for name in ("apps.sendapp", "apps.envapp"):
        sys.modules.pop(name, None)
    return path


def pending(capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict[str, object]]:
    capsys.readouterr()
    assert main(["pending", *extra]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def sent_uuid(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    # each `machinery` run is a process of its own, which imports the app afresh (the run closes
    # the app's Server when it ends); here the runs share one interpreter
    for name in ("apps.sendapp", "apps.envapp"):
        sys.modules.pop(name, None)
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out.strip()


def test_keyword_arguments_are_placed_by_the_parameters(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uuid = sent_uuid(capsys, ["send", "--app", APP, "greet", "ada", "--kwarg", "times=2"])
    (msg,) = pending(capsys)
    assert msg["UUID"] == uuid
    assert [(a["Type"], a["Value"]) for a in msg["Args"]] == [("string", "ada"), ("string", "hello"), ("int64", 2)]


@pytest.mark.parametrize(("argv", "message"), [
    (["greet", "ada", "--kwarg", "nope=1"], "got an unexpected keyword argument 'nope'"),
    (["greet", "ada", "hi", "3", "4"], "too many positional arguments"),
    (["greet"], "missing a required argument: 'name'"),
    (["greet", "ada", "--kwarg", "name=bob"], "multiple values for argument 'name'"),
    (["greet", "ada", "--kwarg", "times"], "--kwarg expects NAME=VALUE"),
    (["flagged", "1", "--kwarg", "loud=true"], "loud is keyword-only"),
])
def test_arguments_that_do_not_fit_are_refused_before_sending(
        db: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(["send", "--app", APP, *argv]) == 2
    assert message in capsys.readouterr().err
    assert pending(capsys) == []


def test_keyword_arguments_need_the_app(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "greet", "ada", "--kwarg", "times=2"]) == 2
    assert "--kwarg needs --app" in capsys.readouterr().err


def test_queue_eta_countdown_and_retries(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sent_uuid(capsys, ["send", "--app", APP, "add", "1", "--queue", "other", "--retries", "4"])
    (msg,) = pending(capsys, "other")
    assert msg["RoutingKey"] == "other" and msg["RetryCount"] == 4
    sent_uuid(capsys, ["send", "--app", APP, "flagged", "1"])
    assert pending(capsys)[0]["RetryCount"] == 2  # the task's own default
    before = datetime.now(UTC)
    sent_uuid(capsys, ["send", "add", "2", "--countdown", "30"])
    when = (before + timedelta(hours=2)).replace(microsecond=0)
    sent_uuid(capsys, ["send", "add", "3", "--eta", when.isoformat().replace("+00:00", "Z")])
    local = when.astimezone().replace(tzinfo=None)  # no zone: local time
    sent_uuid(capsys, ["send", "add", "4", "--eta", local.isoformat()])
    delayed = [m for m in pending(capsys, "--delayed") if m.get("ETA")]
    etas = {m["Args"][0]["Value"]: datetime.fromisoformat(str(m["ETA"]).replace("Z", "+00:00")) for m in delayed}
    assert timedelta(seconds=29) < etas[2] - before < timedelta(seconds=40)
    assert etas[3] == when and etas[4] == when
    for wrong in (["--eta", "tomorrow"], ["--countdown", "-1"], ["--eta", when.isoformat(), "--countdown", "3"]):
        with pytest.raises(SystemExit) as exit_:
            main(["send", "add", "1", *wrong])
        assert exit_.value.code == 2


def test_timeout_alone_waits_and_says_when_it_gives_up(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    started = time.monotonic()
    assert main(["send", "add", "1", "--timeout", "0.5"]) == 3
    assert 0.5 <= time.monotonic() - started < 10
    out = capsys.readouterr()
    assert out.out.startswith("task_")
    assert "within 0.5 s (now: PENDING); the task stays queued" in out.err


def test_log_level_before_or_after_the_command_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    assert parser.parse_args(["pending", "--log-level", "debug"]).log_level == "DEBUG"
    assert parser.parse_args(["--log-level", "error", "pending"]).log_level == "ERROR"
    assert parser.parse_args(["--log-level", "error", "pending", "--log-level", "info"]).log_level == "INFO"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["pending", "--log-level", "LOUD"])
    assert exit_.value.code == 2
    monkeypatch.setenv("MACHINERY_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit):
        main(["pending"])


def test_options_the_help_does_not_show_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for argv in (["worker", "--app", "m:s", "--config", "x.yml"], ["scheduler", "--app", "m:s", "--config", "x.yml"],
                 ["send", "add", "--app", "m:s", "--config", "x.yml"], ["pending", "--factory"]):
        with pytest.raises(SystemExit):
            main(argv)
    capsys.readouterr()
    for name in ("worker", "send", "status", "pending", "scheduler", "example"):
        sub = parser._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("machinery 0.")


def test_ctrl_c_while_waiting_is_one_clean_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'wait.sqlite3'}"
    env = {**os.environ, "BROKER": url, "RESULT_BACKEND": url, "PYTHONPATH": f"{ROOT / 'src'}"}
    proc = subprocess.Popen([*CLI, "send", "add", "1", "--wait"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    uuid = proc.stdout.readline().strip()
    assert uuid.startswith("task_")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == f"machinery: stopped waiting; task {uuid} was sent and may still run"
    # besides it, only the hint that no worker ever used this file: no traceback, no pending task
    assert len(lines) == 2 and "no worker has ever consumed queue 'machinery_tasks'" in lines[0]
