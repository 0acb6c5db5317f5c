"""One error hierarchy: every failure the public API reports on purpose is a MachineryError,
and also the built-in exception the README promises (TimeoutError, TypeError, ValueError, ...)."""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import machinery
from machinery import Config, Group, MachineryError, Server, Signature, TaskError
from machinery import TimeoutError as MachineryTimeout
from machinery.cli import load_app
from machinery.cron import CronError
from machinery.errors import (
    ArgTypeError,
    ConfigError,
    DecodeError,
    OptionError,
    ServerClosedError,
    TaskArgumentsError,
    TaskNotRegisteredError,
    UnknownSchemeError,
    UsageError,
)
from machinery.periodic import PeriodicScheduler
from machinery.testing import memory_server, running_worker


@pytest.fixture
def server() -> Iterator[Server]:
    s = memory_server()

    @s.task
    def add(x: int, y: int) -> int:
        return x + y

    @s.task
    def boom() -> None:
        raise ValueError("it broke")

    yield s
    s.close()


def raised(call: Callable[[], object]) -> BaseException:
    try:
        call()
    except BaseException as exc:  # what the caller sees, whatever it is
        return exc
    raise AssertionError("no exception raised")


def task(server: Server, name: str) -> Any:
    """The Task handle of a registered function (as @server.task returned it)."""
    from machinery.task import task_class

    spec = server.get_registered_task(name)
    return task_class(spec)(server, spec)


@pytest.mark.parametrize("label, call, kind, builtin", [
    ("bad config value", lambda s: Config(results_expire_in=-1), ConfigError, ValueError),
    ("bad config type", lambda s: Config(default_queue=5), ConfigError, ValueError),
    ("unknown config field", lambda s: Config(brokr="redis://"), ConfigError, ValueError),  # type: ignore[call-arg]
    ("bad event loop", lambda s: Config(event_loop="trio"), ConfigError, ValueError),
    ("not a config", lambda s: Server("redis://"), MachineryError, None),  # type: ignore[arg-type]
    ("bad URL", lambda s: Server(Config(broker="redis://:x:y", result_backend="memory://")), ConfigError, ValueError),
    ("not a URL", lambda s: Server(Config(broker="localhost", result_backend="memory://")), ConfigError, ValueError),
    ("unknown scheme", lambda s: Server(Config(broker="kafka://h:9092", result_backend="memory://")),
     UnknownSchemeError, ValueError),
    ("bad eta", lambda s: task(s, "add").send(1, 2, eta="soon"), OptionError, TypeError),
    ("eta and countdown", lambda s: task(s, "add").with_options(eta=timedelta(1), countdown=1), OptionError, TypeError),
    ("unknown option", lambda s: task(s, "add").send(1, 2, retry_cout=3), OptionError, TypeError),
    ("unknown registration option", lambda s: s.register_task("f", print, retry_cout=3), OptionError, TypeError),
    ("too few arguments", lambda s: task(s, "add").send(1), TaskArgumentsError, TypeError),
    ("too many arguments", lambda s: task(s, "add").send(1, 2, 3), TaskArgumentsError, TypeError),
    ("too many in a Signature", lambda s: s.send_task(Signature("add", [1, 2, 3])), TaskArgumentsError, TypeError),
    ("wrong argument type", lambda s: task(s, "add").send("one", 2), ArgTypeError, TypeError),
    ("not a signature", lambda s: s.send_task("add"), MachineryError, None),  # type: ignore[arg-type]
    ("no task name", lambda s: s.send_task(Signature("")), MachineryError, None),
    ("unregistered task", lambda s: s.get_registered_task("nope"), TaskNotRegisteredError, LookupError),
    ("bad cron spec", lambda s: s.register_periodic_task("61 * * * *", "tick", Signature("add", [1, 2])),
     CronError, ValueError),
    ("empty periodic name", lambda s: s.register_periodic_task("@hourly", "", Signature("add", [1, 2])),
     CronError, ValueError),
    ("periodic needs a Signature", lambda s: s.register_periodic_task("@hourly", "tick", "add"),  # type: ignore[arg-type]
     MachineryError, None),
    ("periodic group of bad calls", lambda s: s.register_periodic_group("@hourly", "g", Group(Signature("add", [1]))),
     TaskArgumentsError, TypeError),
    ("bad worker concurrency", lambda s: s.new_worker("w", concurrency=-1), MachineryError, None),
    ("bad --app", lambda s: load_app("no_colon_here"), MachineryError, None),
    ("undecodable message", lambda s: Signature.from_json(b"{"), DecodeError, ValueError),
    ("negative clock skew", lambda s: PeriodicScheduler(s.get_lock(), max_clock_skew=-1), ConfigError, ValueError),
    ("get timeout", lambda s: task(s, "add").send(1, 2).get(timeout=0.1), MachineryTimeout, TimeoutError),
    ("unknown attribute", lambda s: machinery.Nothing, AttributeError, None),  # type: ignore[attr-defined]
])
def test_each_failure_has_its_types(server: Server, label: str, call: Callable[[Server], object],
                                    kind: type[BaseException], builtin: type[BaseException] | None) -> None:
    exc = raised(lambda: call(server))
    assert isinstance(exc, kind), f"{label}: {type(exc).__mro__}"
    if kind is not AttributeError:  # the module's __getattr__ must raise the builtin for hasattr()
        assert isinstance(exc, MachineryError), f"{label}: {type(exc).__mro__}"
    if builtin is not None:
        assert isinstance(exc, builtin), f"{label}: {type(exc).__mro__}"
    assert str(exc), f"{label}: the error says what is wrong"


def test_a_failed_task_raises_task_error(server: Server) -> None:
    with running_worker(server):
        exc = raised(lambda: task(server, "boom").send().get(timeout=10))
    assert isinstance(exc, TaskError) and isinstance(exc, MachineryError)
    assert exc.error == "it broke" and exc.task_name == "boom"


def test_a_closed_server_refuses_everything(server: Server) -> None:
    add = task(server, "add")
    pending = add.send(1, 2)
    server.close()
    server.close()  # idempotent
    calls: list[tuple[str, Callable[[], object]]] = [
        ("send", lambda: add.send(1, 2)),
        ("send_task", lambda: server.send_task(Signature("add", [1, 2]))),
        ("send_tasks", lambda: server.send_tasks([Signature("add", [1, 2])])),
        ("send_group", lambda: server.send_group(Group(Signature("add", [1, 2])))),
        ("get", lambda: pending.get(timeout=1)),
        ("get_state", pending.get_state),
        ("new_worker", lambda: server.new_worker("late")),
        ("periodic", lambda: server.register_periodic_task("@hourly", "t", Signature("add", [1, 2]))),
        ("asend", lambda: asyncio.run(add.asend(1, 2))),
        ("aget", lambda: asyncio.run(pending.aget(timeout=1))),
    ]
    for label, call in calls:
        exc = raised(call)
        assert isinstance(exc, ServerClosedError), f"{label}: {type(exc).__mro__}"
        assert isinstance(exc, MachineryError) and isinstance(exc, RuntimeError), label


def test_a_blocking_call_on_the_servers_own_loop_is_a_usage_error(server: Server) -> None:
    async def nested() -> object:
        return task(server, "add").send(1, 2).get(timeout=1)

    exc = raised(lambda: server.portal.run(nested()))
    assert isinstance(exc, UsageError) and isinstance(exc, RuntimeError) and "a* twin" in str(exc)


def test_a_close_that_hangs_times_out_with_the_librarys_timeout() -> None:
    """Server.close waits for the drivers at most `timeout` seconds: the error it raises then is
    machinery.TimeoutError (was concurrent.futures.TimeoutError), and the Server is closed anyway."""
    cnf = Config(broker="memory://", result_backend="memory://")
    broker = Server(cnf).get_broker()

    class StuckBroker(type(broker)):  # type: ignore[misc]
        async def close(self) -> None:
            await asyncio.sleep(30)

    server = Server(cnf, broker=StuckBroker(cnf))
    server.send_task(Signature("x"))  # starts the sync facade's loop
    exc = raised(lambda: server.close(timeout=0.2))
    assert isinstance(exc, MachineryTimeout) and isinstance(exc, TimeoutError)
    assert server.closed and server.portal.closed


def test_scheduler_misuse_is_a_usage_error(server: Server) -> None:
    scheduler = PeriodicScheduler(server.get_lock())

    async def twice() -> None:
        first = asyncio.create_task(scheduler.run())
        await asyncio.sleep(0.05)
        try:
            await scheduler.run()
        finally:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)

    exc = raised(lambda: asyncio.run(twice()))
    assert isinstance(exc, UsageError) and isinstance(exc, RuntimeError)


# --- no library-raised builtins in the core ------------------------------------------------

SRC = Path(machinery.__file__).resolve().parent
DRIVERS = ("brokers", "backends", "locks", "drivers")
DRIVER_FILES = ("_redis.py", "_amqp.py", "_sqs.py", "_pubsub.py", "_dynamodb.py", "_dynamodb_items.py",
                "_mongo_docs.py", "_sqlite.py", "_doorbell.py")
ALLOWED = {
    ("__init__.py", "AttributeError"),  # a module __getattr__ must raise it (hasattr, import machinery)
    ("__main__.py", "SystemExit"),
    ("tasks/signature.py", "AssertionError"),  # an internal invariant, not a failure of the caller's
    ("example.py", "RuntimeError"),  # the demo's own task function failing on purpose
}


def core_modules() -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py"))
            if p.relative_to(SRC).parts[0] not in DRIVERS and p.name not in DRIVER_FILES]


def test_core_modules_raise_no_bare_builtin_exceptions() -> None:
    """A `raise SomeBuiltinError(...)` in a core module is an error the caller cannot catch as
    MachineryError: use (or add) a MachineryError subclass that also derives from the builtin."""
    import builtins

    found = []
    for path in core_modules():
        rel = path.relative_to(SRC).as_posix()
        tree = ast.parse(path.read_text(), rel)
        ours = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and (node.module or "").startswith("machinery") for alias in node.names}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = target.id if isinstance(target, ast.Name) else (
                f"{ast.unparse(target)}" if isinstance(target, ast.Attribute) else "")
            is_builtin = (name not in ours and isinstance(getattr(builtins, name, None), type)) or name.startswith(
                ("concurrent.futures.", "asyncio."))
            if is_builtin and (rel, name) not in ALLOWED and name != "asyncio.CancelledError":
                found.append(f"{rel}:{node.lineno}: raise {name}")
    assert core_modules() and not found, "\n".join(found)
