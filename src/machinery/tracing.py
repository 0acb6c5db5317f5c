"""OpenTelemetry tracing of sends and task runs, carried in the signature's Headers.

Go Machinery traces with OpenTracing: SendTask starts a producer span and injects it into
`Headers`, chain/group/chord sends inject one workflow span into every signature, and the worker
starts a consumer span named after the task from what the headers carry. This does the same with
the OpenTelemetry API and its global propagator (W3C `traceparent` by default), so a trace runs
from the send through the task and on through the tasks it sends (a chain's next link, a chord's
callback). Go's tracer writes its own keys (e.g. `uber-trace-id`); a Python worker starts a new
trace for those.

Nothing is traced unless the `opentelemetry-api` package is installed (the `otel` extra), and then
spans are recorded only once the application installs an SDK tracer provider; without one, the
API hands out non-recording spans and injects nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from machinery.tasks.signature import Signature

COMPONENT = "machinery"
_UNTRACED: AbstractContextManager[None] = contextlib.nullcontext()  # stateless: shared by every untraced send


class Tracer:
    """Spans for one Server; every method is a no-op when OpenTelemetry is not installed."""

    __slots__ = ("_api", "_own", "_propagate", "_stand_ins", "_tracer")

    def __init__(self, provider: Any = None) -> None:
        self._api: Any = None
        self._propagate: Any = None
        self._tracer: Any = None
        self._own = provider is not None
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            return
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("machinery")
        except PackageNotFoundError:
            ours = None
        self._api = trace
        self._propagate = propagate
        #: the API's providers until the application installs a real one
        self._stand_ins = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
        self._tracer = trace.get_tracer("machinery", ours, tracer_provider=provider)

    @property
    def enabled(self) -> bool:
        """Whether spans can be recorded: OpenTelemetry is installed and a tracer provider is set
        (ours, or a global one, which the application may install after making the Server). Until
        then a task costs no tracing work at all."""
        if self._tracer is None:
            return False
        return self._own or not isinstance(self._api.get_tracer_provider(), self._stand_ins)

    def send(self, name: str, sigs: Sequence[Signature] = (), workflow: str = "") -> AbstractContextManager[None]:
        """A producer span around a send (`SendTask`, or `SendChain`/`SendGroup`/`SendChord` with
        `workflow`); the signatures planned inside it carry it in their headers."""
        return self._send(name, sigs, workflow) if self.enabled else _UNTRACED

    @contextlib.contextmanager
    def _send(self, name: str, sigs: Sequence[Signature], workflow: str) -> Iterator[None]:
        attrs: dict[str, Any] = {"component": COMPONENT}
        if workflow:
            attrs["machinery.workflow"] = workflow
        with self._tracer.start_as_current_span(name, kind=self._api.SpanKind.PRODUCER, attributes=attrs) as span:
            yield
            if len(sigs) == 1:  # its UUID is given while the send plans it
                span.set_attributes(_signature_attributes(sigs[0]))

    def inject(self, headers: dict[str, Any]) -> None:
        """Put the current span's context into a signature's headers; one that carries a context
        already (a workflow member, a retry) keeps it, as Go's do."""
        if self._propagate is None:
            return
        if any(field in headers for field in self._propagate.get_global_textmap().fields):
            return
        self._propagate.inject(headers)

    @contextlib.contextmanager
    def run(self, sig: Signature, queue: str, attempt: int) -> Iterator[Any]:
        """The consumer span of one task run, the child of the span its headers carry; yields the
        span (None without OpenTelemetry) so the worker can record how the task ended."""
        if not self.enabled:
            yield None
            return
        carrier = {k: v for k, v in (sig.headers or {}).items() if isinstance(v, str)}
        parent = self._propagate.extract(carrier) if carrier else None
        attrs = _signature_attributes(sig)
        attrs.update({"component": COMPONENT, "messaging.system": COMPONENT,
                      "messaging.destination.name": queue, "machinery.attempt": attempt})
        with self._tracer.start_as_current_span(sig.name, context=parent, kind=self._api.SpanKind.CONSUMER,
                                                attributes=attrs, record_exception=False,
                                                set_status_on_exception=False) as span:
            yield span

    def failed(self, span: Any, exc: BaseException, retried: bool) -> None:
        """Record a task's exception on its span: an error, or an event when it will be retried."""
        if span is None:
            return
        if retried:
            span.add_event("retry", {"exception.type": type(exc).__name__, "exception.message": str(exc)})
            return
        span.record_exception(exc)
        span.set_status(self._api.Status(self._api.StatusCode.ERROR, str(exc) or type(exc).__name__))


def _signature_attributes(sig: Signature) -> dict[str, Any]:
    attrs: dict[str, Any] = {"signature.name": sig.name, "signature.uuid": sig.uuid}
    if sig.group_uuid:
        attrs["signature.group.uuid"] = sig.group_uuid
    if sig.chord_callback is not None:
        attrs["signature.chord.callback.uuid"] = sig.chord_callback.uuid
        attrs["signature.chord.callback.name"] = sig.chord_callback.name
    return attrs
