"""Registered task functions: how they are introspected, typed and invoked."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from machinery.context import TaskContext
from machinery.errors import ArgTypeError, MachineryError
from machinery.tasks.gotypes import check_declared, infer_type, type_from_annotation
from machinery.tasks.signature import Arg, Signature
from machinery.tasks.state import TaskResult

if TYPE_CHECKING:
    from machinery.result import AsyncResult
    from machinery.server import Server

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(slots=True)
class TaskSpec:
    """A function plus what the worker needs to know to call it and type its results."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    wants_context: bool
    arg_types: list[str | None]
    var_arg_type: str | None
    result_types: list[str | None] | None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, name: str, fn: Callable[..., Any], **options: Any) -> TaskSpec:
        if not callable(fn):
            raise MachineryError(f"task {name!r}: {fn!r} is not callable")
        target = inspect.unwrap(fn)
        is_async = inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
            getattr(target, "__call__", None)  # noqa: B004 - callable objects with async __call__
        )
        try:
            hints = typing.get_type_hints(target, include_extras=True)
        except Exception:  # unresolvable forward references: fall back to value inference
            hints = {}
        try:
            params = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):
            params = []
        wants_context = False
        if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            ann = hints.get(params[0].name, params[0].annotation)
            wants_context = ann is TaskContext or ann == "TaskContext"
            if wants_context:
                params = params[1:]
        arg_types: list[str | None] = []
        var_arg_type: str | None = None
        for p in params:
            if p.kind is p.VAR_POSITIONAL:
                var_arg_type = type_from_annotation(hints.get(p.name))
            elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                arg_types.append(type_from_annotation(hints.get(p.name)))
        return cls(name, fn, is_async, wants_context, arg_types, var_arg_type,
                   _result_types(hints.get("return", inspect.Signature.empty)), dict(options))

    def make_args(self, values: tuple[Any, ...]) -> list[Arg]:
        """Typed Args for a call, using the parameter annotations where they name a type."""
        out: list[Arg] = []
        for i, value in enumerate(values):
            if isinstance(value, Arg):
                out.append(value)
                continue
            declared = self.arg_types[i] if i < len(self.arg_types) else self.var_arg_type
            out.append(Arg(declared or infer_type(value), value))
        return out

    def check_args(self, values: list[Any]) -> list[Any]:
        """Check converted arguments against declared parameter types (range, kind)."""
        out = list(values)
        for i, value in enumerate(out):
            declared = self.arg_types[i] if i < len(self.arg_types) else self.var_arg_type
            if declared is not None and declared != "json":
                try:
                    out[i] = check_declared(declared, value)
                except ArgTypeError as exc:
                    raise ArgTypeError(f"argument {i + 1} of {self.name}: {exc}") from None
        return out

    def make_results(self, returned: Any) -> list[TaskResult]:
        """Typed results for a return value: none, one value, or a tuple of several."""
        if returned is None and not self.result_types:
            return []
        values = returned if isinstance(returned, tuple) else (returned,)
        types_ = self.result_types or []
        results: list[TaskResult] = []
        for i, value in enumerate(values):
            declared = types_[i] if i < len(types_) else None
            if isinstance(value, TaskResult):
                results.append(value)
                continue
            results.append(TaskResult(declared or infer_type(value), value))
        return results


def _result_types(ann: Any) -> list[str | None] | None:
    if ann is inspect.Signature.empty or ann is None or ann is type(None):
        return None
    if typing.get_origin(ann) is tuple:
        params = typing.get_args(ann)
        if params and params[-1] is not Ellipsis:
            return [type_from_annotation(p) for p in params]
        return None
    return [type_from_annotation(ann)]


class Task(Generic[P, R]):
    """What @server.task returns: still callable as the plain function, plus signature()/send()."""

    def __init__(self, server: Server, spec: TaskSpec) -> None:
        self.server = server
        self.spec = spec
        self.name = spec.name
        self.__wrapped__ = spec.fn
        self.__doc__ = spec.fn.__doc__

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        result: R = self.spec.fn(*args, **kwargs)
        return result

    def signature(self, *args: Any, **options: Any) -> Signature:
        """A Signature for this task; Arg types come from the annotations, else from the values."""
        opts = {**self.spec.options, **options}
        opts = {k: v for k, v in opts.items() if k in _SIGNATURE_OPTIONS}
        try:
            typed = self.spec.make_args(args)
        except ArgTypeError as exc:
            raise ArgTypeError(f"task {self.name!r}: {exc}") from exc
        return Signature(self.name, typed, **opts)

    s = signature

    def send(self, *args: Any, **options: Any) -> AsyncResult:
        """Send the task now (or at options['eta']) and return its AsyncResult."""
        return self.server.send_task(self.signature(*args, **options))

    async def asend(self, *args: Any, **options: Any) -> AsyncResult:
        return await self.server.asend_task(self.signature(*args, **options))

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


_SIGNATURE_OPTIONS = frozenset({
    "uuid", "routing_key", "eta", "headers", "priority", "immutable", "retry_count", "retry_timeout",
    "on_success", "on_error", "broker_message_group_id", "stop_task_deletion_on_error",
    "ignore_when_task_not_registered",
})
