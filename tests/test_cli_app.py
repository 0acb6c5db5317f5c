"""`--app MODULE:ATTR`: a Server, or a factory only when asked for; anything else is a clear error."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from machinery.cli import main
from machinery.cli.app import load_app
from machinery.errors import MachineryError
from machinery.server import Server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'app.sqlite3'}"
    monkeypatch.setenv("BROKER", url)
    monkeypatch.setenv("RESULT_BACKEND", url)
    monkeypatch.syspath_prepend(str(ROOT / "tests"))
    sys.modules.pop("apps.factory_app", None)


def test_a_server_attribute_loads() -> None:
    server = load_app("apps.factory_app:server")
    assert isinstance(server, Server) and server.is_task_registered("tick")
    assert load_app("apps.factory_app:Holder.server") is server


def test_a_factory_is_called_only_when_asked() -> None:
    for spec, factory in (("apps.factory_app:make_server()", False), ("apps.factory_app:make_server", True)):
        server = load_app(spec, factory)
        assert isinstance(server, Server) and server.is_task_registered("add")
        server.close()
    with pytest.raises(MachineryError, match=r"make_server is the function make_server, not a machinery.Server; "
                                             r"if make_server is a function that returns the Server, say so: "
                                             r"--app apps.factory_app:make_server\(\) or --factory"):
        load_app("apps.factory_app:make_server")


def test_a_task_function_is_never_called() -> None:
    with pytest.raises(MachineryError, match=re.escape("tick is the task 'tick', not a machinery.Server")):
        load_app("apps.factory_app:tick")
    from apps import factory_app

    assert factory_app.calls == []


@pytest.mark.parametrize(("spec", "factory", "message"), [
    ("apps.factory_app:number", False, "number is a value of type int, not a machinery.Server"),
    ("apps.factory_app:Holder", False, "Holder is the class Holder, not a machinery.Server"),
    ("apps.factory_app:not_a_factory()", False,
     "the factory not_a_factory() returned a value of type int, not a machinery.Server"),
    ("apps.factory_app:number()", False, "number is a value of type int, not a function that returns a Server"),
    ("apps.factory_app:server()", False, "server is already a Server; drop the factory call"),
    ("apps.factory_app:server", True, "server is already a Server"),
    ("apps.factory_app:missing", False, "module apps.factory_app has no attribute 'missing'"),
    ("apps.factory_app:make server", False, "--app must look like MODULE:ATTR"),
    ("apps.factory_app", False, "--app must look like MODULE:ATTR"),
])
def test_what_is_not_a_server_is_refused(spec: str, factory: bool, message: str) -> None:
    with pytest.raises(MachineryError, match=re.escape(message)):
        load_app(spec, factory)


def test_the_command_line_reports_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["send", "--app", "apps.factory_app:tick", "tick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("machinery: --app apps.factory_app:tick: tick is the task 'tick'")
    assert main(["send", "--app", "apps.factory_app:make_server", "--factory", "add", "1", "2"]) == 0
    assert capsys.readouterr().out.startswith("task_")
