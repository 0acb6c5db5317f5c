"""The `machinery` command: worker, send, status, pending, scheduler, example."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from machinery.cli.app import load_app
from machinery.errors import MachineryError

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.server import Server


def _config(args: argparse.Namespace) -> Config:
    from machinery.config import Config

    if getattr(args, "config", None):
        return Config.from_yaml(args.config)
    return Config.from_env()


def _server(args: argparse.Namespace) -> Server:
    from machinery.server import Server

    if getattr(args, "app", None):
        return load_app(args.app, args.factory)
    return Server(_config(args))


# --- commands ----------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    from machinery.cli.supervisor import RECYCLE_EXIT

    # Recycling needs a supervisor to start the fresh process: with it even one process has one.
    recycling = bool(args.max_tasks_per_child or args.max_memory_per_child)
    supervised = args.supervised or args.processes > 1 or recycling

    def child(index: int) -> int:
        server = load_app(args.app, args.factory)
        name = args.name or f"worker@{os.uname().nodename}"
        if supervised and not args.supervised:  # forked here; a restarted one is named by the supervisor
            name = f"{name}-{index}"
        worker = server.new_worker(
            name, args.concurrency, args.queue, prefetch=args.prefetch, grace=args.grace,
            time_limit=args.time_limit, soft_time_limit=args.soft_time_limit, max_tasks=args.max_tasks_per_child,
            max_memory_mb=args.max_memory_per_child, supervised=supervised)
        if args.scheduler:
            _require_schedules(server, args)
            server.start_scheduler()
        worker.launch()
        if args.scheduler:
            server.stop_scheduler()
        if worker.aborted or worker.retired:  # do not wait for abandoned task threads at interpreter exit
            logging.shutdown()
            os._exit(RECYCLE_EXIT if worker.retired else 1)
        return 0

    if not supervised or args.supervised:
        return child(0)
    if args.preload:
        # Import the app (and through it the library and the drivers) once, before forking: the
        # children share those pages instead of each building its own copy, and start faster.
        # Nothing connects at import time; connections are made per process, on first use.
        import gc

        server = load_app(args.app, args.factory)
        if args.scheduler:
            _require_schedules(server, args)  # here, not in a worker the supervisor would restart
        gc.freeze()  # keep the collector from touching (and so copying) the shared objects
    return supervise(args, child)


def _require_schedules(server: Server, args: argparse.Namespace) -> None:
    if not server.periodic_tasks:
        raise MachineryError(f"--scheduler: --app {args.app} registers no periodic tasks")


def supervise(args: argparse.Namespace, child_main: Callable[[int], int]) -> int:
    """Fork the worker processes, then become the slim supervisor (machinery.cli.supervisor, by
    exec) that forwards stop signals and restarts a worker that dies; where that exec fails,
    supervise from this process instead."""
    from machinery.cli.supervisor import watch

    log = logging.getLogger("machinery")
    stops = {signal.SIGINT, signal.SIGTERM}
    # A stop signal from here to the slim supervisor's handlers stays pending (the mask survives
    # exec) instead of killing this process and leaving the workers unsupervised.
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)

    def spawn(index: int) -> int:
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)  # Ctrl-C reaches the supervisor only; it forwards one SIGTERM per signal
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            code = 1
            try:
                code = child_main(index)
            except BaseException as exc:
                log.error("worker process %d failed: %s", index, exc)
            finally:
                os._exit(code)
        return pid

    children = {spawn(i): i for i in range(args.processes)}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "supervisor.py")
    if sys.executable and os.path.exists(script):
        name = args.name or f"worker@{os.uname().nodename}"
        argv = ["--log-level", args.log_level, "worker", "--app", args.app, "--concurrency", str(args.concurrency),
                "--supervised", "--grace", str(args.grace)]
        if args.factory:
            argv.append("--factory")
        if args.queue:
            argv += ["--queue", args.queue]
        if args.scheduler:
            argv.append("--scheduler")
        for option in ("prefetch", "time_limit", "soft_time_limit", "max_tasks_per_child", "max_memory_per_child"):
            value = getattr(args, option)
            if value is not None:
                argv += [f"--{option.replace('_', '-')}", str(value)]
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            # -S: no site-packages; -P: the script's folder (this package) is not put on sys.path
            os.execv(sys.executable, [sys.executable, "-S", "-P", script, args.log_level, name,
                                      *(f"{i}:{pid}" for pid, i in children.items()), "--", *argv])
        except OSError as exc:
            log.warning("could not start the slim supervisor (%s); supervising from this process", exc)
    return watch(children, spawn, log.error, log.info)


def cmd_send(args: argparse.Namespace) -> int:
    from machinery.cli import send

    server = _server(args)
    try:
        return send.run(server, args)
    finally:
        server.close()


def cmd_status(args: argparse.Namespace) -> int:
    """A task's stored state (JSON); without a UUID, where tasks and results go and what waits."""
    server = _server(args)
    try:
        if not args.uuid:
            queue = server.cnf.default_queue
            waiting = len(server.get_broker().get_pending_tasks(queue))
            print(server.where())
            print(f"default queue: {queue} ({waiting} waiting)")
            return 0
        state = server.portal.run(server.get_backend().get_state(args.uuid))
        if state is None:
            print(f"no state stored for {args.uuid} ({server.where()})", file=sys.stderr)
            return 1
        sys.stdout.write(state.to_json().decode() + "\n")
        return 0
    finally:
        server.close()


def cmd_pending(args: argparse.Namespace) -> int:
    server = _server(args)
    try:
        broker = server.get_broker()
        for sig in broker.get_pending_tasks(args.queue or ""):
            sys.stdout.write(sig.to_json().decode() + "\n")
        if args.delayed:
            for sig in broker.get_delayed_tasks():
                sys.stdout.write(sig.to_json().decode() + "\n")
        return 0
    finally:
        server.close()


def cmd_scheduler(args: argparse.Namespace) -> int:
    """Import the app, run the schedules it registers until SIGINT or SIGTERM."""
    server = load_app(args.app, args.factory)
    names = server.periodic_tasks
    if not names:
        server.close()
        raise MachineryError(f"--app {args.app}: no periodic tasks are registered "
                             "(register them with server.register_periodic_task(...) and the like)")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start_scheduler()
    logging.getLogger("machinery").info("scheduler running %s for %s", ", ".join(names), args.app)
    stop.wait()
    server.close()
    return 0


def cmd_example(args: argparse.Namespace) -> int:
    from machinery.example import run

    return run(args.db)


# --- parser ------------------------------------------------------------------------------

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(LOG_LEVELS)} (any case), got {text!r}")
    return level


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("machinery")
    except PackageNotFoundError:  # running from a source tree
        import machinery

        return machinery.__version__


def build_parser() -> argparse.ArgumentParser:
    from machinery.cli import send

    parser = argparse.ArgumentParser(prog="machinery", description="Distributed task queue, Go Machinery compatible.")
    parser.add_argument("--version", action="version", version=f"machinery {_version()}")
    level_help = "DEBUG, INFO, WARNING, ERROR or CRITICAL (default: $MACHINERY_LOG_LEVEL, else INFO)"
    parser.add_argument("--log-level", type=_log_level, default=None, help=level_help)
    # Also after the subcommand; SUPPRESS keeps a value given before it when none is given after.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS, help=level_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    def app_option(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--app", required=required, metavar="MODULE:ATTR",
                       help="your Server (MODULE:ATTR), or a function returning one (MODULE:FACTORY())")
        p.add_argument("--factory", action="store_true", help="--app names a function that returns the Server")

    def store_options(p: argparse.ArgumentParser) -> None:
        app_option(p, False)
        p.add_argument("--config", metavar="FILE.yml",
                       help="YAML config file, instead of --app; default: the environment (BROKER, ...)")

    p = command("worker", "run a worker")
    app_option(p, True)
    p.add_argument("--name", default="", help="worker tag (default: worker@HOSTNAME)")
    p.add_argument("--concurrency", type=_int_at_least(0), default=10, help="tasks at once per process (0 = no limit)")
    p.add_argument("--queue", default=None, help="queue to consume (default: the config's default_queue)")
    p.add_argument("--processes", type=_int_at_least(1), default=1, help="worker processes under one supervisor")
    p.add_argument("--scheduler", action="store_true",
                   help="also run the app's periodic schedules (in each worker process; each tick is sent once)")
    p.add_argument("--no-preload", dest="preload", action="store_false",
                   help="with --processes > 1: import the app in each worker process, not once before forking")
    p.add_argument("--time-limit", type=_non_negative, default=None, metavar="S",
                   help="hard time limit of tasks that set none (default: the config's; 0 = none)")
    p.add_argument("--soft-time-limit", type=_non_negative, default=None, metavar="S",
                   help="soft time limit of tasks that set none (default: the config's; 0 = none)")
    p.add_argument("--prefetch", type=_int_at_least(0), default=None, metavar="N",
                   help="unfinished messages a process holds (default: the config's; 0 = twice the concurrency)")
    p.add_argument("--grace", type=_non_negative, default=30.0, metavar="S",
                   help="on a stop, seconds running tasks get to finish before they are handed back (default 30)")
    p.add_argument("--max-tasks-per-child", type=_int_at_least(0), default=0, metavar="N",
                   help="replace a worker process with a fresh one after N tasks (0 = never)")
    p.add_argument("--max-memory-per-child", type=_non_negative, default=0.0, metavar="MB",
                   help="replace a worker process with a fresh one once its resident memory passes MB (0 = never)")
    # set by the supervisor on the processes it starts: a thread stuck past its hard time limit
    # then retires the process (hidden: not for users)
    p.add_argument("--supervised", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_worker)

    p = command("send", "send a task; prints its UUID (and with --wait its result)")
    store_options(p)
    send.add_arguments(p)
    p.set_defaults(func=cmd_send)

    p = command("status", "print a task's stored state; without UUID, where tasks and results are kept")
    store_options(p)
    p.add_argument("uuid", nargs="?", default="", help="the task's UUID")
    p.set_defaults(func=cmd_status)

    p = command("pending", "list tasks waiting in a queue")
    store_options(p)
    p.add_argument("queue", nargs="?", default="", help="queue to list (default: the config's default_queue)")
    p.add_argument("--delayed", action="store_true", help="also list tasks waiting for their ETA")
    p.set_defaults(func=cmd_pending)

    p = command("scheduler", "run the periodic schedules an app registers")
    app_option(p, True)
    p.set_defaults(func=cmd_scheduler)

    p = command("example", "a self-contained demo on the embedded SQLite default")
    p.add_argument("--db", default=None, help="SQLite file (default ./machinery.sqlite3)")
    p.set_defaults(func=cmd_example)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A worker restarted by the supervisor starts with the stop signals blocked (see
    # supervisor.watch); one sent meanwhile is pending and takes effect here.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_level is None:
        try:
            args.log_level = _log_level(os.environ.get("MACHINERY_LOG_LEVEL", "INFO"))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"MACHINERY_LOG_LEVEL: {exc}")
    if getattr(args, "app", None) and getattr(args, "config", None):
        parser.error("give --app (the app's Server has its config) or --config, not both")
    if getattr(args, "factory", False) and not getattr(args, "app", None):
        parser.error("--factory needs --app")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except MachineryError as exc:
        print(f"machinery: {exc}", file=sys.stderr)
        return 2
    return code
