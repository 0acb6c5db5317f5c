"""Go Machinery's integration scenarios (spec section 13) plus the seed's workflow examples.

A driver's test module subclasses ScenarioSuite and provides `make_config(tmp_path)`; every
scenario then runs against a real worker on that broker/backend pair.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from machinery import (
    Arg,
    Chain,
    Chord,
    Config,
    Group,
    RetryTaskLater,
    Server,
    Signature,
    TaskContext,
    TaskError,
)
from machinery.drivers.capabilities import DeadLetterListing
from machinery.errors import ArgTypeError
from machinery.result import AsyncResult
from machinery.tasks import gojson
from machinery.tasks.gotypes import Int8
from machinery.tasks.signature import signature_wire

TIMEOUT = 30.0


class Recorder:
    """Collects calls made by tasks (thread-safe), e.g. on_error callbacks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.attempts: dict[str, int] = {}

    def add(self, name: str, args: tuple[Any, ...]) -> None:
        with self.lock:
            self.calls.append((name, args))

    def named(self, name: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [a for n, a in self.calls if n == name]

    def bump(self, key: str) -> int:
        with self.lock:
            self.attempts[key] = self.attempts.get(key, 0) + 1
            return self.attempts[key]


def register(server: Server, rec: Recorder) -> None:
    @server.task
    def add(*args: int) -> int:
        return sum(args)

    @server.task
    async def multiply(*args: int) -> int:
        product = 1
        for a in args:
            product *= a
        return product

    @server.task(name="sum")
    def sum_(numbers: list[int]) -> int:
        return sum(numbers)

    @server.task
    def return_just_error(msg: str, fail: bool) -> None:
        if fail:
            raise RuntimeError(msg)

    @server.task
    def return_multiple_values(a: str, b: str, fail: bool) -> tuple[str, str]:
        if fail:
            raise RuntimeError("some error")
        return a, b

    @server.task(name="panic")
    def panic_(*args: Any) -> None:
        raise RuntimeError("oops")

    @server.task
    def delay_test() -> int:
        return time.time_ns()

    @server.task
    def on_error(*args: Any) -> None:
        rec.add("on_error", args)

    @server.task
    def record(*args: Any) -> None:
        rec.add("record", args)

    @server.task
    def small(x: Int8) -> int:
        return x

    @server.task
    def flaky(ctx: TaskContext, key: str, failures: int) -> str:
        n = rec.bump(key)
        if n <= failures:
            raise RuntimeError(f"attempt {n} fails")
        return f"{key} ok after {n}"

    @server.task
    async def later(key: str) -> str:
        n = rec.bump(key)
        if n == 1:
            raise RetryTaskLater("not yet", delay=0.2)
        return f"{key} ran {n} times"


class ScenarioSuite:
    """Subclass with `make_config` returning a Config for the broker/backend pair under test."""

    concurrency = 10

    def make_config(self, tmp_path: Path) -> Config:
        raise NotImplementedError

    @pytest.fixture
    def rec(self) -> Recorder:
        return Recorder()

    @pytest.fixture
    def server(self, tmp_path: Path, rec: Recorder) -> Iterator[Server]:
        cnf = self.make_config(tmp_path)
        server = Server(cnf)
        register(server, rec)
        worker = server.new_worker("test_worker", self.concurrency)
        stopped = worker.launch_async()
        try:
            yield server
        finally:
            worker.quit()
            stopped.result(timeout=TIMEOUT)
            server.close()

    # --- testAll -------------------------------------------------------------------------

    def test_send_task(self, server: Server) -> None:
        assert server.send_task(Signature("add", [Arg("int64", 1), Arg("int64", 1)])).get(TIMEOUT) == 2
        sig = Signature("sum", [Arg("[]int64", [1, 2])])
        res = server.send_task(sig)
        assert res.get(TIMEOUT) == 3
        state = res.get_state()
        assert state is not None and state.state == "SUCCESS"
        assert [(r.type, r.value) for r in state.results or []] == [("int64", 3)]

    @pytest.mark.parametrize("send_concurrency", [0, 2])
    def test_group(self, server: Server, send_concurrency: int) -> None:
        group = Group(Signature("add", [1, 1]), Signature("add", [2, 2]), Signature("add", [5, 6]))
        results = server.send_group(group, send_concurrency)
        assert sorted(r.get(TIMEOUT) for r in results) == [2, 4, 11]

    def test_chord(self, server: Server) -> None:
        group = Group(Signature("add", [1, 1]), Signature("add", [2, 2]), Signature("add", [5, 6]))
        assert server.send_chord(Chord(group, Signature("multiply")), 10).get(TIMEOUT) == 88

    def test_chain(self, server: Server) -> None:
        chain = Chain(Signature("add", [2, 2]), Signature("add", [5, 6]), Signature("multiply", [4]))
        assert server.send_chain(chain).get(TIMEOUT) == 60

    def test_return_just_error(self, server: Server) -> None:
        res = server.send_task(Signature("return_just_error", ["Test error", True]))
        with pytest.raises(TaskError) as info:
            res.get(TIMEOUT)
        assert info.value.error == "Test error"
        ok = server.send_task(Signature("return_just_error", ["", False]))
        assert ok.get(TIMEOUT) is None
        state = ok.get_state()
        assert state is not None and state.results == [] and state.error == ""

    def test_return_multiple_values(self, server: Server) -> None:
        res = server.send_task(Signature("return_multiple_values", ["foo", "bar", False]))
        assert res.get(TIMEOUT) == ("foo", "bar")
        bad = server.send_task(Signature("return_multiple_values", ["foo", "bar", True]))
        with pytest.raises(TaskError, match="some error"):
            bad.get(TIMEOUT)

    def test_panic(self, server: Server) -> None:
        with pytest.raises(TaskError) as info:
            server.send_task(Signature("panic")).get(TIMEOUT)
        assert info.value.error == "oops"

    def test_delay(self, server: Server) -> None:
        eta = datetime.now(UTC) + timedelta(milliseconds=100)
        value = server.send_task(Signature("delay_test", eta=eta)).get(TIMEOUT)
        from machinery.tasks.gojson import time_ns

        assert value >= time_ns(eta)

    # --- the seed's examples ---------------------------------------------------------------

    def test_seed_chord_and_chain(self, server: Server) -> None:
        chord = Chord(Group(Signature("add", [1, 1]), Signature("add", [5, 5])), Signature("multiply"))
        assert server.send_chord(chord).get(TIMEOUT) == 20
        chain = Chain(Signature("add", [1, 1]), Signature("add", [5, 5]), Signature("multiply", [4]))
        assert server.send_chain(chain).get(TIMEOUT) == 48

    def test_chain_with_chord_step(self, server: Server) -> None:
        # chain(add(1,1), chord(group(add(10), add(20)), multiply()), add(3)) -> (12*22)+3
        chain = Chain(
            Signature("add", [1, 1]),
            Chord(Group(Signature("add", [10]), Signature("add", [20])), Signature("multiply")),
            Signature("add", [3]),
        )
        assert server.send_chain(chain).get(TIMEOUT) == 12 * 22 + 3

    def test_immutable(self, server: Server) -> None:
        chain = Chain(Signature("add", [1, 1], immutable=True), Signature("add", [5, 5]))
        assert server.send_chain(chain).get(TIMEOUT) == 10
        chord = Chord(Group(Signature("add", [1, 1]), Signature("add", [2])), Signature("add", [7], immutable=True))
        assert server.send_chord(chord).get(TIMEOUT) == 7

    # --- failures ----------------------------------------------------------------------------

    def test_chord_member_failure(self, server: Server, rec: Recorder) -> None:
        callback = Signature("multiply", on_error=[Signature("on_error", ["cb"])])
        group = Group(Signature("add", [1, 1]), Signature("panic"), Signature("add", [2, 2]))
        failing_uuid = group.signatures[1].uuid
        result = server.send_chord(Chord(group, callback))
        with pytest.raises(TaskError) as info:
            result.get(TIMEOUT)
        assert failing_uuid in info.value.error and "oops" in info.value.error
        state = result.get_state()
        assert state is not None and state.state == "FAILURE"
        _wait_for(lambda: rec.named("on_error"))
        (args,) = rec.named("on_error")
        assert failing_uuid in args[0] and args[1] == "cb"

    def test_chain_link_failure(self, server: Server, rec: Recorder) -> None:
        chain = Chain(
            Signature("add", [1, 1]),
            Signature("panic", on_error=[Signature("on_error", ["link"])]),
            Signature("record", ["never"]),
        )
        result = server.send_chain(chain)
        with pytest.raises(TaskError, match="oops"):
            result.get(TIMEOUT)
        _wait_for(lambda: rec.named("on_error"))
        assert rec.named("on_error") == [("oops", "link")]
        time.sleep(0.3)
        assert rec.named("record") == []

    def test_retry_fibonacci(self, server: Server, rec: Recorder) -> None:
        key = f"k{uuid.uuid4().hex}"
        started = time.monotonic()
        res = server.send_task(Signature("flaky", [key, 2], retry_count=3))
        assert res.get(TIMEOUT) == f"{key} ok after 3"
        assert time.monotonic() - started >= 2.9  # retry delays 1 s then 2 s

    def test_retry_exhausted_then_on_error(self, server: Server, rec: Recorder) -> None:
        key = f"k{uuid.uuid4().hex}"
        sig = Signature("flaky", [key, 5], retry_count=1, on_error=[Signature("on_error", ["x"])])
        with pytest.raises(TaskError, match="attempt 2 fails"):
            server.send_task(sig).get(TIMEOUT)
        assert rec.attempts[key] == 2
        _wait_for(lambda: rec.named("on_error"))
        assert rec.named("on_error") == [("attempt 2 fails", "x")]

    def test_retry_task_later(self, server: Server) -> None:
        key = f"k{uuid.uuid4().hex}"
        assert server.send_task(Signature("later", [key])).get(TIMEOUT) == f"{key} ran 2 times"

    def test_on_success_callback(self, server: Server, rec: Recorder) -> None:
        sig = Signature("add", [20, 22], on_success=[Signature("record", ["after"])])
        assert server.send_task(sig).get(TIMEOUT) == 42
        _wait_for(lambda: rec.named("record"))
        assert rec.named("record") == [("after", 42)]

    # --- bad input ---------------------------------------------------------------------------

    def test_bad_args_rejected_by_producer(self, server: Server) -> None:
        with pytest.raises(ArgTypeError, match="out of range for int8"):
            server.send_task(Signature("small", [Arg("int8", 300)]))
        with pytest.raises(ArgTypeError, match="complex128 is not one of supported types"):
            server.send_task(Signature("add", [Arg("complex128", 1)]))

    def test_bad_args_fail_the_task_not_the_worker(self, server: Server) -> None:
        cases = [
            ("small", [{"Name": "", "Type": "int16", "Value": 300}], "out of range for int8"),
            ("small", [{"Name": "", "Type": "int8", "Value": 300}], "out of range for int8"),
            ("add", [{"Name": "", "Type": "complex128", "Value": 1}], "complex128 is not one of supported types"),
            ("add", [{"Name": "", "Type": "int64", "Value": "seven"}], "is not int64"),
            ("add", [{"Name": "", "Type": "int64", "Value": 1.5}], "is not int64"),
            ("sum", [{"Name": "", "Type": "[]int64", "Value": True}], "expected a JSON array"),
        ]
        for name, args, message in cases:
            with pytest.raises(TaskError, match=message):
                send_raw(server, name, args).get(TIMEOUT)
        assert server.send_task(Signature("add", [1, 2])).get(TIMEOUT) == 3  # the worker is still up

    def test_malformed_message_dead_lettered(self, server: Server) -> None:
        broker = server.get_broker()
        junk = Signature("add", [1])
        junk.routing_key = server.cnf.default_queue
        server.portal.run(broker.publish(junk, b'{"UUID": "x", "Name": "add"', None))
        server.portal.run(broker.publish(junk, b"[1, 2, 3]", None))

        def dead() -> list[tuple[bytes, str]]:
            listing = broker.capability(DeadLetterListing)
            assert listing is not None, "every broker in the scenario suites lists its dead letters"
            result: list[tuple[bytes, str]] = server.portal.run(listing.dead_letters())
            return result

        _wait_for(lambda: len(dead()) >= 2)
        reasons = [reason for _, reason in dead()]
        assert any("not valid JSON" in r for r in reasons)
        assert any("malformed signature" in r for r in reasons)
        assert server.send_task(Signature("add", [1, 2])).get(TIMEOUT) == 3

    def test_unknown_task_ignored_when_asked(self, server: Server) -> None:
        res = server.send_task(Signature("nobody_has_this", ignore_when_task_not_registered=True))
        _wait_for(lambda: not server.get_broker().get_pending_tasks())
        with pytest.raises(TimeoutError):
            res.get(timeout=0.3)


def send_raw(server: Server, name: str, args: list[dict[str, Any]]) -> AsyncResult:
    """Publish a message whose Args bypass the producer's checks (as a foreign producer could)."""
    sig = Signature(name, uuid=f"task_{uuid.uuid4()}", routing_key=server.cnf.default_queue, headers={})
    wire = signature_wire(sig)
    wire["Args"] = args
    server.portal.run(server.get_broker().publish(sig, gojson.encode(wire), None))
    return AsyncResult(sig, server.get_backend(), server.portal)


def _wait_for(cond: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@contextmanager
def custom_queue_worker(cnf: Config, custom: str) -> Iterator[tuple[Server, AsyncResult]]:
    """A worker on queue `custom` only; one task sent to the default queue and one to `custom`,
    which has run when the block starts. Yields the server and the default queue's task."""
    server = Server(cnf)

    @server.task
    def where(tag: str) -> str:
        return tag

    worker = server.new_worker("custom", 2, queue=custom)
    done = worker.launch_async()
    try:
        default_res = server.send_task(Signature("where", ["default"]))
        custom_res = server.send_task(Signature("where", ["custom"], routing_key=custom))
        assert custom_res.get(TIMEOUT) == "custom"
        yield server, default_res
    finally:
        worker.quit()
        done.result(timeout=TIMEOUT)
        server.close()
