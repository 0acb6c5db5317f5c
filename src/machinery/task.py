"""Registered task functions: how they are introspected, typed, bound to arguments and sent.

`@server.task` returns a `Task[P, R]`: P is the function's parameters (without a leading
`TaskContext`, which the worker supplies) and R its result (an `async def`'s awaited result), so
mypy checks `task.send(...)` as it checks a call and `task.send(...).get()` is typed R.
"""

from __future__ import annotations

import copy
import inspect
import typing
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, Unpack, cast

from machinery.context import TaskContext
from machinery.errors import ArgTypeError, MachineryError, OptionError, TaskArgumentsError
from machinery.options import SEND_NAMES, SendOptions, signature_fields
from machinery.tasks.gotypes import check_declared, infer_type, type_from_annotation
from machinery.tasks.signature import Arg, Signature
from machinery.tasks.state import TaskResult

if TYPE_CHECKING:
    from machinery.result import AsyncResult

P = ParamSpec("P")
R = TypeVar("R")

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class Sender(Protocol):
    """What a task needs of its Server: sending (a Protocol, so this module imports no server)."""

    def send_task(self, sig: Signature) -> AsyncResult[Any]: ...

    async def asend_task(self, sig: Signature) -> AsyncResult[Any]: ...


@dataclass(slots=True)
class TaskSpec:
    """A function plus what the worker needs to know to call it and type its results, and what
    the producer needs to check a send against its parameters."""

    name: str
    fn: Callable[..., Any]
    is_async: bool
    wants_context: bool
    arg_types: list[str | None]
    var_arg_type: str | None
    result_types: list[str | None] | None
    options: dict[str, Any] = field(default_factory=dict)
    #: the positional parameters after the context; None when the function's signature is unknown
    params: list[inspect.Parameter] | None = None
    #: positional arguments a call needs at least / takes at most (None: any number, *args)
    min_args: int = 0
    max_args: int | None = None
    #: parameter name -> position, for the parameters a keyword argument may name
    keyword_positions: dict[str, int] = field(default_factory=dict)

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
            params: list[inspect.Parameter] | None = list(inspect.signature(target).parameters.values())
        except (TypeError, ValueError):
            params = None
        wants_context = False
        if params and params[0].kind in _POSITIONAL:
            ann = hints.get(params[0].name, params[0].annotation)
            wants_context = ann is TaskContext or ann == "TaskContext"
            if wants_context:
                params = params[1:]
        arg_types: list[str | None] = []
        var_arg_type: str | None = None
        for p in params or ():
            if p.kind is p.VAR_POSITIONAL:
                var_arg_type = type_from_annotation(hints.get(p.name))
            elif p.kind in _POSITIONAL:
                arg_types.append(type_from_annotation(hints.get(p.name)))
            elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
                raise TaskArgumentsError(
                    f"task {name!r}: keyword-only parameter {p.name!r} has no default, and a task "
                    "receives positional arguments only (Machinery's wire format has no keywords)")
        spec = cls(name, fn, is_async, wants_context, arg_types, var_arg_type,
                   _result_types(hints.get("return", inspect.Signature.empty)), dict(options))
        if params is not None:
            positional = [p for p in params if p.kind in _POSITIONAL]
            spec.params = positional
            spec.min_args = sum(1 for p in positional if p.default is p.empty)
            spec.max_args = None if any(p.kind is p.VAR_POSITIONAL for p in params) else len(positional)
            spec.keyword_positions = {
                p.name: i for i, p in enumerate(positional) if p.kind is p.POSITIONAL_OR_KEYWORD}
        return spec

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], *, complete: bool) -> tuple[Any, ...]:
        """The positional arguments a call with `args` and `kwargs` makes (the wire carries
        positional arguments only): keywords go to their parameters' positions, a default fills
        a gap before a later keyword. With `complete`, missing arguments are refused; without
        (a workflow step, whose earlier results are appended), only what can never fit is."""
        n = len(args)
        if not kwargs:
            self.check_count(n, complete=complete)
            return args
        self.check_count(n, complete=False)
        params = self.params
        if params is None:
            raise TaskArgumentsError(f"task {self.name!r}: keyword arguments need the function's signature, "
                                     f"which cannot be read; pass the arguments by position")
        positions = self.keyword_positions
        unknown = [k for k in kwargs if k not in positions]
        if unknown:
            raise TaskArgumentsError(f"task {self.name!r} got unexpected keyword argument{_s(unknown)} "
                                     f"{', '.join(unknown)}{self._named_hint()}")
        twice = [k for k in kwargs if positions[k] < n]
        if twice:
            raise TaskArgumentsError(f"task {self.name!r} got multiple values for argument{_s(twice)} "
                                     f"{', '.join(twice)}")
        out = list(args)
        holes: list[inspect.Parameter] = []
        for p in params[n:max(positions[k] for k in kwargs) + 1]:
            if p.name in kwargs:
                out.append(kwargs[p.name])
            elif p.default is not p.empty:
                out.append(p.default)
            else:
                holes.append(p)
                out.append(None)
        if holes:
            if complete:
                self._missing(holes)
            raise TaskArgumentsError(
                f"task {self.name!r}: keyword arguments come after parameter{_s(holes)} "
                f"{', '.join(p.name for p in holes)}, which {'have' if len(holes) > 1 else 'has'} no value "
                "(a signature's arguments are positional; a workflow appends earlier results after them)")
        if complete and len(out) < self.min_args:
            self._missing(params[len(out):self.min_args])
        return tuple(out)

    def check_count(self, n: int, *, complete: bool = True) -> None:
        """Refuse `n` positional arguments when the function takes fewer, or (complete) needs more."""
        if self.max_args is not None and n > self.max_args:
            raise TaskArgumentsError(
                f"task {self.name!r} takes {_count(self.min_args, self.max_args)} positional "
                f"argument{'' if self.max_args == 1 else 's'} but {n} {'was' if n == 1 else 'were'} given")
        if complete and n < self.min_args and self.params is not None:
            self._missing(self.params[n:self.min_args])

    def _missing(self, params: list[inspect.Parameter]) -> typing.NoReturn:
        names = [p.name for p in params if p.default is p.empty]
        raise TaskArgumentsError(f"task {self.name!r} is missing {len(names)} required positional "
                                 f"argument{_s(names)}: {', '.join(names)}")

    def _named_hint(self) -> str:
        if not self.keyword_positions:
            return " (it takes no arguments by keyword)"
        return f" (its parameters: {', '.join(self.keyword_positions)})"

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


def _count(low: int, high: int) -> str:
    return str(high) if low == high else f"from {low} to {high}"


def _s(items: list[Any]) -> str:
    return "s" if len(items) > 1 else ""


class Task(Generic[P, R]):
    """What `@server.task` returns: sends typed by the function's parameters P and result R.

    Arguments: `add.send(1, 2)` and `add.send(1, y=2)` are checked against the function before
    anything is sent (keywords are put at their parameters' positions: the wire carries
    positional arguments only); a wrong count or an unknown keyword raises TaskArgumentsError.

    Options: `add.with_options(countdown=3).send(1, 2)`. `with_options` takes the SendOptions
    (eta, countdown, retry_count, routing_key, ...), each checked by mypy and at run time, and
    keeps them apart from the task's own parameters, so mypy checks both. For compatibility,
    `send()`, `asend()` and `signature()` also take those option names as keywords at run time
    (`add.send(1, 2, eta=...)`), where mypy reports them as unknown arguments; a keyword that
    names a parameter of the task is that argument, any other name raises OptionError.

    Calling the Task calls the plain function (the subclasses give each kind of function its
    call type); `signature()`/`s()` build a Signature for workflows, `partial()` one that a
    chain or chord completes with earlier results.
    """

    def __init__(self, server: Sender, spec: TaskSpec, options: Mapping[str, Any] | None = None) -> None:
        self.server = server
        self.spec = spec
        self.name = spec.name
        self.__wrapped__ = spec.fn
        self.__doc__ = spec.fn.__doc__
        self._options: dict[str, Any] = dict(options or {})

    def with_options(self, **options: Unpack[SendOptions]) -> Task[P, R]:
        """A handle on this task whose sends (and signatures) carry these options; the task
        itself is unchanged. A relative eta or countdown counts from each send."""
        given: Mapping[str, Any] = options
        unknown = sorted(set(given) - SEND_NAMES)
        if unknown:
            raise OptionError(f"task {self.name!r}: unknown send option{_s(unknown)} {', '.join(unknown)} "
                              f"(send options: {', '.join(sorted(SEND_NAMES))})")
        merged = {**self._options, **given}
        signature_fields(self.name, self.spec.options, merged)  # refuse bad values here, not at send
        other = copy.copy(self)
        other._options = merged
        return other

    def _build(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], complete: bool) -> Signature:
        options = self._options
        if kwargs:
            named = self.spec.keyword_positions
            opts = {k: v for k, v in kwargs.items() if k not in named}
            if opts:
                unknown = sorted(set(opts) - SEND_NAMES)
                if unknown:
                    params = ", ".join(named) or "none by keyword"
                    raise OptionError(
                        f"task {self.name!r} got unknown keyword argument{_s(unknown)} {', '.join(unknown)}: "
                        f"neither a parameter of the task ({params}) "
                        f"nor a send option ({', '.join(sorted(SEND_NAMES))})")
                kwargs = {k: v for k, v in kwargs.items() if k in named}
                options = {**options, **opts}
        values = self.spec.bind(args, kwargs, complete=complete)
        fields = signature_fields(self.name, self.spec.options, options) if options or self.spec.options else {}
        try:
            typed = self.spec.make_args(values)
        except ArgTypeError as exc:
            raise ArgTypeError(f"task {self.name!r}: {exc}") from exc
        return Signature(self.name, typed, **fields)

    def signature(self, *args: P.args, **kwargs: P.kwargs) -> Signature:
        """A Signature for this task; Arg types come from the annotations, else from the values.

        At run time the arguments may stop short of the parameters (a chain or chord appends
        earlier results); mypy wants them all: use partial() for such a step."""
        return self._build(args, kwargs, False)

    s = signature

    def partial(self, *args: Any, **kwargs: Any) -> Signature:
        """A Signature with the first arguments only, for a workflow step that receives the rest
        (earlier results, appended). Checked at run time; mypy does not check its arguments."""
        return self._build(args, kwargs, False)

    def send(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Send the task now (or at the eta/countdown set with with_options) and return its
        AsyncResult; arguments are checked against the function first (see the class doc)."""
        return self.server.send_task(self._build(args, kwargs, True))

    async def asend(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """send()'s awaitable twin."""
        return await self.server.asend_task(self._build(args, kwargs, True))

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


class FunctionTask(Task[P, R]):
    """A task made from a plain function; calling it calls the function."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return cast(R, self.spec.fn(*args, **kwargs))


class CoroutineTask(Task[P, R]):
    """A task made from an `async def`; calling it returns the function's coroutine."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        return cast(Coroutine[Any, Any, R], self.spec.fn(*args, **kwargs))


class ContextTask(Task[P, R]):
    """A task whose function takes a TaskContext first: sends leave it out (the worker supplies
    it), a direct call passes it."""

    def __call__(self, ctx: TaskContext, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return cast(R, self.spec.fn(ctx, *args, **kwargs))


class CoroutineContextTask(Task[P, R]):
    """An `async def` task that takes a TaskContext first."""

    def __call__(self, ctx: TaskContext, /, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, R]:
        return cast(Coroutine[Any, Any, R], self.spec.fn(ctx, *args, **kwargs))


def task_class(spec: TaskSpec) -> type[Task[Any, Any]]:
    """The Task subclass whose call type fits the function."""
    if spec.wants_context:
        return CoroutineContextTask if spec.is_async else ContextTask
    return CoroutineTask if spec.is_async else FunctionTask
