"""`machinery send`: build a signature from command-line words, send it, and maybe wait for it.

Values are JSON, else strings. When the app is known (`--app`), the arguments are bound to the
task function's parameters before anything is sent, so a wrong count or an unknown keyword fails
here, not on a worker; keyword arguments need that binding, since tasks take positional arguments.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import signal
import sys
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from machinery.errors import MachineryError, TaskError, TimeoutError

if TYPE_CHECKING:
    from machinery.result import AsyncResult
    from machinery.server import Server
    from machinery.task import TaskSpec
    from machinery.tasks.signature import Signature

#: exit codes besides 0 (sent, or done) and 2 (usage or config error)
FAILED, TIMED_OUT, INTERRUPTED = 1, 3, 130
DEFAULT_TIMEOUT = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="the registered task name")
    p.add_argument("args", nargs="*", metavar="ARG", help="positional arguments: JSON values, else strings")
    p.add_argument("--kwarg", action="append", default=[], metavar="NAME=VALUE",
                   help="a keyword argument (repeatable; needs --app, to place it by the task's parameters)")
    p.add_argument("--queue", default="", help="queue to send to (default: the config's default_queue)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--eta", type=_eta, help="run at this ISO 8601 time (no zone: local time)")
    when.add_argument("--countdown", type=_seconds, metavar="S", help="run S seconds from now")
    p.add_argument("--retries", type=int, default=None, metavar="N",
                   help="retry a failed run up to N times (Fibonacci back-off; default: the task's own setting)")
    p.add_argument("--wait", action="store_true", help="wait for the result and print it as JSON")
    p.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                   help=f"give up waiting after S seconds (implies --wait; default {DEFAULT_TIMEOUT:g})")


def _eta(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time (e.g. 2030-01-31T08:00:00Z): {text!r}") from None
    return when.astimezone(UTC)  # a naive time is local time


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_signature(server: Server, args: argparse.Namespace) -> Signature:
    """The signature the command line describes, checked against the task function when known."""
    from machinery.tasks.signature import Signature

    values = [parse_value(a) for a in args.args]
    keywords: dict[str, Any] = {}
    for item in args.kwarg:
        name, sep, raw = item.partition("=")
        if not sep or not name.isidentifier():
            raise MachineryError(f"--kwarg expects NAME=VALUE, got {item!r}")
        keywords[name] = parse_value(raw)
    spec = server.find_task(args.task)
    if spec is not None:
        values = _bind(spec, values, keywords)
    elif keywords:
        raise MachineryError(f"--kwarg needs --app with task {args.task!r} registered: tasks take positional "
                             "arguments, placed by the function's parameter names")
    typed = spec.make_args(tuple(values)) if spec is not None else values
    defaults = {k: v for k, v in spec.options.items() if k in Signature.__slots__} if spec is not None else {}
    sig = Signature(args.task, typed, **defaults)
    if args.queue:
        sig.routing_key = args.queue
    if args.eta is not None:
        sig.eta = args.eta
    elif args.countdown is not None:
        sig.eta = datetime.now(UTC) + timedelta(seconds=args.countdown)
    if args.retries is not None:
        if args.retries < 0:
            raise MachineryError(f"--retries must be >= 0, got {args.retries}")
        sig.retry_count = args.retries
    return sig


def _bind(spec: TaskSpec, values: list[Any], keywords: dict[str, Any]) -> list[Any]:
    """Positional values in parameter order, or an error naming what does not fit."""
    try:
        params = list(inspect.signature(spec.fn).parameters.values())
    except (TypeError, ValueError):
        if keywords:
            raise MachineryError(f"task {spec.name!r}: its parameters cannot be read, so --kwarg cannot "
                                 "be placed") from None
        return values
    if spec.wants_context:
        params = params[1:]
    sig = inspect.Signature(params)
    try:
        bound = sig.bind(*values, **keywords)
    except TypeError as exc:
        raise MachineryError(f"task {spec.name!r} {sig}: {exc}") from None
    out: list[Any] = []
    gap: list[Any] = []  # defaults of optional parameters left out, sent if a later one is given
    for p in params:
        if p.name not in bound.arguments:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                gap.append(p.default)
            continue
        if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD):
            raise MachineryError(f"task {spec.name!r}: {p.name} is keyword-only; tasks take positional "
                                 "arguments only")
        out.extend(gap)
        gap.clear()
        value = bound.arguments[p.name]
        if p.kind is p.VAR_POSITIONAL:
            out.extend(value)
        else:
            out.append(value)
    return out


def run(server: Server, args: argparse.Namespace) -> int:
    """Send; print the UUID, and with --wait (or --timeout) the result."""
    sig = build_signature(server, args)
    result = server.send_task(sig)
    print(sig.uuid, flush=True)
    if not args.wait and args.timeout is None:
        return 0
    timeout = DEFAULT_TIMEOUT if args.timeout is None else args.timeout
    try:
        value = _wait(server, result, timeout)
    except TaskError as exc:
        print(f"FAILURE: {exc.error}", file=sys.stderr)
        return FAILED
    except TimeoutError:
        state = result.get_state()
        now = state.state if state is not None else "no state stored"
        print(f"machinery: no result for {sig.name} ({sig.uuid}) within {timeout:g} s (now: {now}); "
              "the task stays queued", file=sys.stderr)
        return TIMED_OUT
    except (KeyboardInterrupt, _Interrupted):
        print(f"\nmachinery: stopped waiting; task {sig.uuid} was sent and may still run", file=sys.stderr)
        return INTERRUPTED
    print(json.dumps(value, default=repr))
    return 0


class _Interrupted(MachineryError):
    """Ctrl-C ended the wait (caught by run(), which says so in one line)."""


def _wait(server: Server, result: AsyncResult[Any], timeout: float) -> Any:
    """result.get(timeout) on the server's event-loop thread. Ctrl-C cancels that wait (from a
    SIGINT handler, so it lands wherever the main thread is) and ends here as _Interrupted,
    with no wait left running when the server closes."""
    interrupted = threading.Event()
    pending: list[concurrent.futures.Future[Any]] = []

    def on_sigint(_signum: int, _frame: object) -> None:
        interrupted.set()
        for fut in pending:
            fut.cancel()

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: no handler of ours, Ctrl-C as Python delivers it
        previous = None
    try:
        future = server.portal.submit(result.aget(timeout))
        pending.append(future)
        if interrupted.is_set():
            future.cancel()
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            if interrupted.is_set():
                raise _Interrupted from None
            raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
