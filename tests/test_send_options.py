"""Strict sends: options are checked by name and value, eta/countdown become one time, and
arguments are checked against the registered function before anything is sent (memory driver)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from machinery import MachineryError, Server, Signature
from machinery.errors import OptionError, TaskArgumentsError
from machinery.testing import memory_server, running_worker


@pytest.fixture
def server() -> Iterator[Server]:
    s = memory_server()
    yield s
    s.close()


def _near(when: datetime | None, expected: datetime, slack: float = 1.0) -> bool:
    return when is not None and when.tzinfo is not None and abs((when - expected).total_seconds()) < slack


# --- options -------------------------------------------------------------------------------


def test_countdown_delays_the_task(server: Server) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    res = add.send(1, 2, countdown=3)  # type: ignore[call-arg]  # the old spelling; typed: with_options
    assert _near(res.signature.eta, datetime.now(UTC) + timedelta(seconds=3))
    assert [s.uuid for s in server.get_broker().get_delayed_tasks()] == [res.task_uuid]
    assert server.get_broker().get_pending_tasks() == []


def test_countdown_runs_later_not_at_once(server: Server) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    with running_worker(server):
        started = time.monotonic()
        res = add.with_options(countdown=1.5).send(1, 2)
        with pytest.raises(TimeoutError):
            res.get(timeout=0.8)
        assert res.get(timeout=10) == 3
        assert time.monotonic() - started >= 1.4


@pytest.mark.parametrize("make_eta", [
    lambda: timedelta(seconds=30),
    lambda: datetime.now(UTC) + timedelta(seconds=30),
    lambda: datetime.now(timezone(timedelta(hours=5))) + timedelta(seconds=30),
    lambda: datetime.now(UTC).replace(tzinfo=None) + timedelta(seconds=30),  # naive: read as UTC
], ids=["timedelta", "aware-utc", "aware-plus5", "naive-utc"])
def test_eta_forms_name_the_same_moment(server: Server, make_eta: Any) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    eta = make_eta()
    for res in (add.send(1, 2, eta=eta), add.with_options(eta=eta).send(1, 2)):  # type: ignore[call-arg]
        assert _near(res.signature.eta, datetime.now(UTC) + timedelta(seconds=30))
    assert len(server.get_broker().get_delayed_tasks()) == 2


def test_eta_timedelta_used_to_end_in_attribute_error(server: Server) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    res = add.send(1, 2, eta=timedelta(seconds=2))  # type: ignore[call-arg]
    assert _near(res.signature.eta, datetime.now(UTC) + timedelta(seconds=2))


@pytest.mark.parametrize("options, words", [
    ({"eta": datetime.now(UTC), "countdown": 3}, "eta or countdown, not both"),
    ({"eta": "tomorrow"}, "eta must be a datetime or a timedelta"),
    ({"eta": 30}, "eta must be a datetime or a timedelta"),
    ({"countdown": "3"}, "countdown must be a finite number"),
    ({"countdown": float("nan")}, "countdown must be a finite number"),
    ({"countdown": True}, "countdown must be a finite number"),
    ({"retry_count": "3"}, "retry_count must be an int"),
    ({"retry_count": -1}, "retry_count must be >= 0"),
    ({"priority": 256}, "priority must be 0..255"),
    ({"immutable": 1}, "immutable must be a bool"),
    ({"routing_key": 5}, "routing_key must be a str"),
    ({"on_success": ["add"]}, "on_success must hold Signatures"),
])
def test_bad_option_values_are_refused_before_sending(server: Server, options: dict[str, Any], words: str) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    calls: list[Callable[[], object]] = [lambda: add.send(1, 2, **options),
                                         lambda: add.with_options(**options).send(1, 2)]
    for call in calls:
        with pytest.raises(OptionError, match=words) as info:
            call()
        assert isinstance(info.value, MachineryError) and isinstance(info.value, TypeError)
    assert server.get_broker().get_pending_tasks() == [] and server.get_broker().get_delayed_tasks() == []


def test_unknown_options_are_refused_by_name(server: Server) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(OptionError, match=r"unknown keyword argument retry_cout: neither a parameter of the task "
                                          r"\(x, y\) nor a send option") as info:
        add.send(1, 2, retry_cout=3)  # type: ignore[call-arg]
    assert isinstance(info.value, TypeError) and isinstance(info.value, MachineryError)
    with pytest.raises(OptionError, match="unknown keyword arguments bogus, retry_cout"):
        add.send(1, 2, retry_cout=3, bogus=1)  # type: ignore[call-arg]
    with pytest.raises(OptionError, match="unknown send option retry_cout"):
        add.with_options(retry_cout=3)  # type: ignore[call-arg]
    with pytest.raises(OptionError, match="unknown keyword argument retry_cout"):
        add.s(1, 2, retry_cout=3)  # type: ignore[call-arg]
    assert server.get_broker().get_pending_tasks() == []


def test_options_reach_the_signature(server: Server) -> None:
    @server.task(retry_count=2, routing_key="defaults")
    def add(x: int, y: int) -> int:
        return x + y

    cb = Signature("log")
    res = add.with_options(priority=7, uuid="task_fixed", on_success=[cb], headers={"k": "v"}).send(1, 2)
    sig = res.signature
    assert (sig.priority, sig.uuid, sig.retry_count, sig.routing_key) == (7, "task_fixed", 2, "defaults")
    assert sig.on_success == [cb] and sig.headers is not None and sig.headers["k"] == "v"
    assert add.with_options(retry_count=5, routing_key="other").s(1, 2).retry_count == 5
    plain = add.send(1, 2).signature
    assert (plain.priority, plain.retry_count, plain.routing_key, plain.eta) == (0, 2, "defaults", None)


def test_with_options_returns_a_new_handle(server: Server) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    later = add.with_options(countdown=60)
    assert later.send(1, 2).signature.eta is not None
    assert add.send(1, 2).signature.eta is None
    stacked = later.with_options(priority=3).send(1, 2).signature
    assert stacked.eta is not None and stacked.priority == 3
    with pytest.raises(OptionError, match="not both"):
        later.with_options(eta=timedelta(seconds=1))


def test_registration_options_are_checked(server: Server) -> None:
    with pytest.raises(OptionError, match="unknown option retry_cout") as info:
        @server.task(retry_cout=3)  # type: ignore[call-overload, untyped-decorator]
        def f() -> None: ...
    assert isinstance(info.value, TypeError)
    with pytest.raises(OptionError, match="unknown option eta"):  # a time fixed at registration is a bug
        server.register_task("g", lambda: None, eta=datetime.now(UTC))  # type: ignore[call-arg]
    with pytest.raises(OptionError, match="retry_count must be an int"):
        server.register_task("g", lambda: None, retry_count="3")  # type: ignore[arg-type]
    assert not server.is_task_registered("f") and not server.is_task_registered("g")


def test_default_headers_are_not_shared_between_sends(server: Server) -> None:
    @server.task(headers={"team": "a"})
    def add(x: int, y: int) -> int:
        return x + y

    first = add.send(1, 2).signature
    assert first.headers is not None
    first.headers["mutated"] = True
    assert add.send(1, 2).signature.headers == {"team": "a"}


def test_a_signature_eta_that_is_not_a_datetime_is_refused(server: Server) -> None:
    sig = Signature("anything", [1])
    sig.eta = timedelta(seconds=2)  # type: ignore[assignment]
    with pytest.raises(OptionError, match=r"Signature\.eta must be a datetime"):
        server.send_task(sig)
    with pytest.raises(MachineryError, match="needs a task name"):
        server.send_task(Signature(""))
    assert server.get_broker().get_pending_tasks() == []


# --- arguments -----------------------------------------------------------------------------


def test_keyword_arguments_go_to_their_positions(server: Server) -> None:
    @server.task
    def scale(x: int, factor: int = 5, offset: int = 0) -> int:
        return x * factor + offset

    def args(res: Any) -> list[Any]:
        return [a.value for a in res.signature.args]

    assert args(scale.send(1, factor=2)) == [1, 2]
    assert args(scale.send(x=1, offset=3)) == [1, 5, 3]  # the default fills the gap before offset
    assert args(scale.send(offset=3, factor=2, x=1)) == [1, 2, 3]
    assert args(scale.send(1)) == [1]
    with running_worker(server):
        assert scale.send(x=2, offset=1).get(timeout=10) == 11


@pytest.mark.parametrize("call, words", [
    (lambda t: t.send(1), "missing 1 required positional argument: y"),
    (lambda t: t.send(), "missing 2 required positional arguments: x, y"),
    (lambda t: t.send(1, 2, 3), "takes 2 positional arguments but 3 were given"),
    (lambda t: t.send(1, z=2), "unknown keyword argument z"),
    (lambda t: t.send(1, x=2), "multiple values for argument x"),
    (lambda t: t.send(y=2), "missing 1 required positional argument: x"),
    (lambda t: t.s(1, 2, 3), "takes 2 positional arguments but 3 were given"),
    (lambda t: t.s(y=2), "keyword arguments come after parameter x, which has no value"),
])
def test_calls_that_do_not_fit_are_refused_before_sending(server: Server, call: Any, words: str) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(MachineryError, match=words) as info:
        call(add)
    assert isinstance(info.value, TypeError)
    assert server.get_broker().get_pending_tasks() == []


def test_boom_with_an_unknown_keyword_no_longer_reaches_the_worker(server: Server) -> None:
    @server.task
    def boom() -> None:
        raise RuntimeError("never runs")

    with pytest.raises(OptionError, match=r"unknown keyword argument x: neither a parameter of the task "
                                          r"\(none by keyword\)"):
        boom.send(x=1)  # type: ignore[call-arg]
    assert server.get_broker().get_pending_tasks() == []


def test_positional_only_star_args_and_keyword_only_parameters(server: Server) -> None:
    @server.task
    def pos(a: int, /, b: int) -> int:
        return a + b

    @server.task
    def total(*xs: int) -> int:
        return sum(xs)

    @server.task
    def opt(a: int, *, flag: bool = False) -> int:
        return a

    with pytest.raises(OptionError, match=r"unknown keyword argument a: neither a parameter of the task \(b\)"):
        pos.send(a=1, b=2)  # type: ignore[call-arg]  # a is positional-only
    assert [a.value for a in pos.send(1, b=2).signature.args] == [1, 2]
    assert len(total.send(*range(20)).signature.args) == 20
    with pytest.raises(OptionError, match="unknown keyword argument flag"):
        opt.send(1, flag=True)  # keyword-only: the wire has no keywords
    with pytest.raises(TaskArgumentsError, match="unexpected keyword argument flag"):
        opt.spec.bind((1,), {"flag": True}, complete=True)
    with pytest.raises(TaskArgumentsError, match="keyword-only parameter 'needed' has no default"):
        @server.task
        def never(a: int, *, needed: int) -> int:
            return a


def test_a_parameter_named_like_an_option_is_the_argument(server: Server) -> None:
    @server.task
    def prioritise(priority: int) -> int:
        return priority

    sig = prioritise.send(priority=9).signature
    assert [a.value for a in sig.args] == [9] and sig.priority == 0
    assert prioritise.with_options(priority=3).send(priority=9).signature.priority == 3


def test_signatures_and_partials_may_leave_arguments_to_a_workflow(server: Server) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    assert [a.value for a in add.s(1).args] == [1]  # type: ignore[call-arg]
    assert [a.value for a in add.partial(1).args] == [1]
    assert add.partial().args == []
    with pytest.raises(TaskArgumentsError):
        add.partial(1, 2, 3)


def test_send_task_checks_the_count_when_the_function_is_registered_here(server: Server) -> None:
    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TaskArgumentsError, match="missing 1 required positional argument: y"):
        server.send_task(Signature("add", [1]))
    with pytest.raises(TaskArgumentsError, match="takes 2 positional arguments but 3 were given"):
        server.send_tasks([Signature("add", [1, 2]), Signature("add", [1, 2, 3])])
    assert server.get_broker().get_pending_tasks() == []
    # a name this Server does not register is for other workers (Go's, another app's): sent as is
    res = server.send_task(Signature("elsewhere", [1, 2, 3]))
    assert [s.uuid for s in server.get_broker().get_pending_tasks()] == [res.task_uuid]


def test_untyped_and_uninspectable_functions_still_send(server: Server) -> None:
    server.register_task("anything", lambda *a: sum(a))
    server.register_task("builtin", max)  # no readable signature: the count is not checked
    assert len(server.send_task(Signature("anything", [1, 2, 3])).signature.args) == 3
    assert len(server.send_task(Signature("builtin", [1, 2, 3])).signature.args) == 3
