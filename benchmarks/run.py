"""Benchmark machinery against Celery, Dramatiq, RQ, arq, taskiq and Huey on this machine.

    python benchmarks/run.py [--quick] [--systems a,b] [--workloads x,y] [--reps N]

Builds one virtualenv per system under benchmarks/.envs/, starts a private redis-server, runs every
workload for every system (alternating systems, median of the repetitions), prints the table and
writes benchmarks/results/<timestamp>.json and .png. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from harness import envs  # noqa: E402


def _bootstrap() -> None:
    """Re-run this script with the harness's own virtualenv (matplotlib, redis-py, psutil)."""
    harness_prefix = (envs.ENVS_DIR / "harness").resolve()
    if Path(sys.prefix).resolve() == harness_prefix:
        return
    python = envs.ensure_env("harness")
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def _parse() -> argparse.Namespace:
    from harness.plan import SYSTEMS, WORKLOADS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small counts and 1 repetition (smoke test)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list from {','.join(SYSTEMS)}")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list from {','.join(WORKLOADS)}")
    p.add_argument("--reps", type=int, help="repetitions (median is reported); default 3, quick 1")
    p.add_argument("--drain-n", type=int)
    p.add_argument("--latency-n", type=int)
    p.add_argument("--drain-cap", type=float, help="seconds before a drain is cut short")
    p.add_argument("--machinery-concurrency", type=int, default=10)
    p.add_argument("--out-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-work", action="store_true", help="keep the per-run work folders (worker logs)")
    args = p.parse_args()
    args.systems = [s for s in args.systems.split(",") if s]
    args.workloads = {w for w in args.workloads.split(",") if w}
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    return args


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _headline(case: Any, out: dict[str, Any]) -> str:
    if not out.get("ok"):
        return str(out.get("error", "?"))[:160]
    if case.workload == "drain":
        done = "" if out.get("complete") else f" (cut at {out['done']:,} done)"
        return f"{out['rate']:,.0f} tasks/s, filled at {out['fill_rate']:,.0f}/s{done}"
    if case.workload == "enqueue":
        return f"{out['rate']:,.0f} tasks/s"
    if case.workload == "latency":
        return f"p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.2f} ms ({out['done']} samples)"
    chord = out.get("chord_seconds", out.get("chord_error"))
    return f"chord {chord}, chain {out.get('chain_seconds', out.get('chain_error'))}"


def main() -> int:
    _bootstrap()
    args = _parse()
    from harness import ceiling as ceiling_mod
    from harness import chart, plan, report, runner, services

    counts = plan.QUICK if args.quick else plan.FULL
    counts = replace(
        counts,
        reps=args.reps or counts.reps,
        drain_n=args.drain_n or counts.drain_n,
        enqueue_n=args.drain_n or counts.enqueue_n,
        latency_n=args.latency_n or counts.latency_n,
        drain_cap=args.drain_cap or counts.drain_cap,
    )
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    work_root = Path(tempfile.mkdtemp(prefix=f"machinery-bench-{run_id}-"))
    redis = services.PrivateRedis(work_root)
    vhosts = services.RabbitVhosts(f"machinery-bench-{run_id}")
    started = time.time()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started in the background, where SIGINT is ignored
    results: dict[str, Any] = {
        "run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "quick": args.quick, "counts": asdict(counts), "systems": {}, "cases": [], "ceiling": {"reps": []},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    infos: list[plan.SystemInfo] = []
    reps_by_case: dict[plan.Case, list[dict[str, Any]]] = {}
    try:
        for name in args.systems:
            try:
                envs.ensure_env(name)
            except (subprocess.SubprocessError, OSError) as exc:
                infos.append(plan.SystemInfo(name, False, error=f"install failed: {exc}"))
                log(f"{name}: install failed: {exc}")
        redis.start()
        results["machine"]["redis"] = redis.version()
        log(f"private redis {redis.version()} on port {redis.port}")
        if "amqp" in args.workloads:
            ok, why = vhosts.available()
            if not ok:
                log(f"RabbitMQ workloads skipped: {why}")
                args.workloads.discard("amqp")
            else:
                results["machine"]["rabbitmq"] = vhosts.version()
        for name in args.systems:
            if any(i.name == name for i in infos):
                continue
            redis.flush()
            out = runner.run_adapter(name, ["info", "--broker-url", redis.url, "--result-url", redis.url],
                                     120, work_root / f"info-{name}", run_id)
            if out.get("ok"):
                infos.append(plan.SystemInfo(name, True, out["version"], out["setups"], out["supports_bulk"],
                                             out["supports_workflows"], tuple(out["transports"])))
            else:
                infos.append(plan.SystemInfo(name, False, error=out.get("error", "?")))
                log(f"{name}: unusable: {out.get('error')}")
        for info in infos:
            results["systems"][info.name] = {**asdict(info), "packages": envs.installed_versions(info.name)}
        cases = plan.build(infos, args.workloads)
        # Systems that failed still get an "error" cell in every row they would have had.
        failed = [i for i in infos if not i.ok]
        log(f"{len(cases)} cases x {counts.reps} repetitions")
        seq = 0
        for rep in range(counts.reps):
            if "ceiling" in args.workloads:
                redis.flush()
                measured = ceiling_mod.measure(redis.url, redis.port, counts.drain_n)
                results["ceiling"]["reps"].append(measured)
                log(f"rep {rep + 1} ceiling: redis-py LPOP x100 {measured['lpop_100_rate']:,.0f}/s, "
                    f"RPUSH 1-by-1 {measured['rpush_1_rate']:,.0f}/s")
            for case in plan.order(cases, rep):
                seq += 1
                redis.flush()
                vhost = ""
                broker = redis.url
                if case.transport == "amqp":
                    vhost, broker = vhosts.create()
                elif case.transport == "sqlite":
                    broker = ""
                result_url = (redis.url if case.transport != "sqlite" else "sqlite") if case.results else ""
                extra = ["--broker-url", broker, "--result-url", result_url,
                         "--concurrency", str(args.machinery_concurrency)]
                load_before = os.getloadavg()[0]
                try:
                    out = runner.run_adapter(
                        case.system, case.adapter_args(counts) + extra, case.timeout(counts),
                        work_root / f"{seq:03d}-{case.system}-{case.workload}-{case.transport}", run_id,
                    )
                finally:
                    if vhost:
                        vhosts.delete(vhost)
                out["rep"] = rep + 1
                # Other work on the machine skews the figures: keep the 1-minute load average with each run.
                out["loadavg"] = [load_before, os.getloadavg()[0]]
                reps_by_case.setdefault(case, []).append(report.derive(out))
                log(f"rep {rep + 1} {case.key}: {_headline(case, out)} [{out.get('wall_seconds', 0):.0f}s]")
        for info in failed:
            for workload in ("drain", "latency"):
                case = plan.Case("failed", info.name, workload, "redis", "default", True)
                reps_by_case[case] = [{"ok": False, "error": info.error}]
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        results["interrupted"] = True
    finally:
        runner.sweep(run_id)
        redis.stop()
        vhosts.delete_all()
        if not args.keep_work:
            subprocess.run(["rm", "-rf", str(work_root)], check=False)
        else:
            log(f"work folders kept in {work_root}")

    summaries = {case: report.summarize(reps) for case, reps in reps_by_case.items()}
    ceiling_summary = report.summarize([{"ok": True, **r} for r in results["ceiling"]["reps"]])
    defaults = {i.name: next(iter(i.setups), "default") for i in infos}
    header, rows = report.build_table(summaries, ceiling_summary, defaults)
    table = report.render(header, rows) + "\n" + report.render_ceiling(ceiling_summary)
    setups = "\n".join(
        f"- {i.name} {i.version}: " + "; ".join(f"{k} = {v}" for k, v in i.setups.items()) if i.ok
        else f"- {i.name}: unusable ({i.error[:200]})"
        for i in infos
    )
    loads = [x for reps in reps_by_case.values() for r in reps for x in r.get("loadavg", [])]
    load_note = ""
    if loads:
        results["loadavg"] = {"median": statistics.median(loads), "max": max(loads)}
        load_note = (f"1-minute load average during the runs: median {statistics.median(loads):.1f}, "
                     f"max {max(loads):.1f} on {os.cpu_count()} cores")
        if statistics.median(loads) > (os.cpu_count() or 1):
            load_note += " - the machine was busy with other work: treat the figures as rough"
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["elapsed_seconds"] = time.time() - started
    results["ceiling"]["median"] = ceiling_summary
    results["cases"] = [
        {"key": c.key, "group": c.group, "system": c.system, "workload": c.workload, "transport": c.transport,
         "setup": c.setup, "results": c.results, "params": c.params, "reps": reps_by_case[c], "median": summaries[c]}
        for c in reps_by_case
    ]
    results["table_markdown"] = table
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    mode = "quick" if args.quick else "full"
    title = (f"machinery vs peers ({mode}: drain {counts.drain_n:,}, median of {counts.reps}; "
             f"{os.cpu_count()} cores, Python {platform.python_version()}; * = cut short)")
    try:
        chart.draw(header, rows, stem.with_suffix(".png"), title)
    except Exception as exc:  # the chart is a convenience: never lose the table for it
        log(f"chart failed: {exc}")
    print(f"\n## {title}\n\nSetups:\n{setups}\n\n{load_note}\n\n{table}")
    print("Ratios are system / machinery (rates: >1 is faster; times, latency, memory: >1 is slower or larger).")
    print("* = cut short at the time cap: the rate is measured on the part done, the time extrapolated.")
    print(f"\nRaw results: {stem.with_suffix('.json')}\nChart: {stem.with_suffix('.png')}")
    log(f"done in {time.time() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
