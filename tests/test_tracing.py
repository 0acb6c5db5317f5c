"""OpenTelemetry spans: a send's producer span travels in the signature's Headers to the worker's
consumer span, through the portal thread, along chains, and records failures and retries."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from machinery import Chain, Config, Server, Signature
from machinery.testing import running_worker
from redis_servers import redis_url


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    p = TracerProvider()
    p.add_span_processor(SimpleSpanProcessor(exporter))
    return p


def make_server(provider: TracerProvider | None, url: str = "memory://") -> Server:
    server = Server(Config(broker=url, result_backend=url), tracer_provider=provider)

    @server.task
    async def add(x: int, y: int) -> int:
        return x + y

    @server.task
    async def boom() -> int:
        raise ValueError("no luck")

    @server.task
    async def boom_once() -> int:
        raise ValueError("no luck either")

    @server.task
    def current_span() -> str:
        """A plain function, run on the worker's thread pool: it sees its run span as current."""
        return format(trace.get_current_span().get_span_context().span_id, "016x")

    @server.task
    async def spawn() -> str:
        """Sends a task from inside a task: the new task's trace goes on from this run."""
        return (await server.asend_task(Signature("add", args=[0, 0]))).task_uuid

    return server


@pytest.fixture
def server(provider: TracerProvider) -> Iterator[Server]:
    s = make_server(provider)
    yield s
    s.close()


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_a_send_and_its_run_are_one_trace(server: Server, exporter: InMemorySpanExporter) -> None:
    with running_worker(server):
        res = server.send_task(Signature("add", args=[1, 2]))
        assert res.get(timeout=10) == 3
    assert "traceparent" in (res.signature.headers or {})
    (send,) = named(exporter.get_finished_spans(), "SendTask")
    (run,) = named(exporter.get_finished_spans(), "add")
    assert send.kind == SpanKind.PRODUCER and run.kind == SpanKind.CONSUMER
    assert send.attributes is not None and send.attributes["signature.uuid"] == res.task_uuid
    assert run.parent is not None and run.parent.span_id == send.context.span_id
    assert run.context.trace_id == send.context.trace_id
    assert run.attributes is not None
    assert run.attributes["signature.name"] == "add"
    assert run.attributes["messaging.destination.name"] == "machinery_tasks"
    assert run.status.status_code == StatusCode.UNSET


def test_the_callers_span_is_the_parent_through_the_portal_thread(
    server: Server, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """send_tasks runs on the portal's thread; the caller's current span still parents it."""
    with running_worker(server):
        with provider.get_tracer("test").start_as_current_span("request") as request:
            results = server.send_tasks([Signature("add", args=[i, 1]) for i in range(3)])
        assert [r.get(timeout=10) for r in results] == [1, 2, 3]
    (batch,) = named(exporter.get_finished_spans(), "SendTasks")
    assert batch.parent is not None and batch.parent.span_id == request.get_span_context().span_id
    runs = named(exporter.get_finished_spans(), "add")
    assert len(runs) == 3 and {r.context.trace_id for r in runs} == {request.get_span_context().trace_id}


def test_a_chains_links_follow_each_other(server: Server, exporter: InMemorySpanExporter) -> None:
    with running_worker(server):
        res = server.send_chain(Chain(Signature("add", args=[1, 1]), Signature("add", args=[1]),
                                      Signature("add", args=[1])))
        assert res.get(timeout=10) == 4
    spans = exporter.get_finished_spans()
    (send,) = named(spans, "SendChain")
    assert send.attributes is not None and send.attributes["machinery.workflow"] == "chain"
    runs = sorted(named(spans, "add"), key=lambda s: s.start_time or 0)
    assert len(runs) == 3
    parents = [r.parent.span_id if r.parent else None for r in runs]
    assert parents == [send.context.span_id, runs[0].context.span_id, runs[1].context.span_id]


def test_a_failure_marks_its_span_and_a_retry_is_an_event(server: Server, exporter: InMemorySpanExporter) -> None:
    with running_worker(server):
        with pytest.raises(Exception, match="no luck"):
            server.send_task(Signature("boom")).get(timeout=10)
        once = server.send_task(Signature("boom_once", retry_count=1))
        with pytest.raises(Exception, match="no luck either"):
            once.get(timeout=30)
    spans = exporter.get_finished_spans()
    (boom,) = named(spans, "boom")
    assert boom.status.status_code == StatusCode.ERROR
    assert [e.name for e in boom.events] == ["exception"]
    first, last = sorted(named(spans, "boom_once"), key=lambda s: s.start_time or 0)
    assert first.status.status_code == StatusCode.UNSET and [e.name for e in first.events] == ["retry"]
    assert last.status.status_code == StatusCode.ERROR


def test_a_plain_task_sees_its_span_and_a_task_sent_from_a_task_continues_the_trace(
    server: Server, exporter: InMemorySpanExporter
) -> None:
    with running_worker(server):
        seen = server.send_task(Signature("current_span")).get(timeout=10)
        inner = server.send_task(Signature("spawn")).get(timeout=10)
        for _ in range(100):
            if len(named(exporter.get_finished_spans(), "add")) == 1:
                break
            time.sleep(0.05)
    spans = exporter.get_finished_spans()
    (plain,) = named(spans, "current_span")
    assert seen == format(plain.context.span_id, "016x")
    (outer,) = named(spans, "spawn")
    (nested_send,) = [s for s in named(spans, "SendTask") if s.parent and s.parent.span_id == outer.context.span_id]
    (nested_run,) = named(spans, "add")
    assert nested_send.attributes is not None and nested_send.attributes["signature.uuid"] == inner
    assert nested_run.parent is not None and nested_run.parent.span_id == nested_send.context.span_id
    assert nested_run.context.trace_id == outer.context.trace_id


def test_without_a_recording_provider_the_headers_stay_empty() -> None:
    """The global provider is the API's no-op one here: nothing is injected, as before tracing."""
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    server = make_server(None)
    try:
        res = server.send_task(Signature("add", args=[1, 2]))
        assert res.signature.headers == {}
    finally:
        server.close()


@pytest.mark.redis
def test_the_context_crosses_redis(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    import redis

    url = redis_url()
    raw = redis.Redis.from_url(url)
    raw.flushdb()  # this run's own server: no other run has keys there
    server = make_server(provider, url)
    try:
        res = server.send_task(Signature("add", args=[2, 2]))
        message = json.loads(raw.lrange("machinery_tasks", 0, -1)[0])
        assert set(message["Headers"]) == {"traceparent"}
        with running_worker(server):
            assert res.get(timeout=10) == 4
    finally:
        server.close()
        raw.close()
    (send,) = named(exporter.get_finished_spans(), "SendTask")
    (run,) = named(exporter.get_finished_spans(), "add")
    assert run.parent is not None and run.parent.span_id == send.context.span_id
