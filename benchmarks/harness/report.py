"""Medians over repetitions, and the comparison table (each figure with its ratio to machinery)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.plan import REFERENCE, Case


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def derive(rep: dict[str, Any]) -> dict[str, Any]:
    """Adds drain_time: the measured time, or for a drain cut short, its extrapolation at the measured rate."""
    if rep.get("ok") and "busy_seconds" in rep:
        if rep.get("complete"):
            rep["drain_time"] = rep["seconds"]
        elif rep.get("rate"):
            rep["drain_time"] = rep["seconds"] - rep["busy_seconds"] + rep["n"] / rep["rate"]
    return rep


def summarize(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric field over the successful repetitions; the errors otherwise."""
    good = [flatten(r) for r in reps if r.get("ok")]
    if not good:
        first = reps[0] if reps else {}
        return {"ok": False, "na": bool(first.get("na")), "error": first.get("error", "not run")}
    out: dict[str, Any] = {"ok": True, "reps_ok": len(good), "reps": len(reps)}
    for key in good[0]:
        values = [g[key] for g in good if key in g]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = statistics.median(values)
        elif all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        else:
            out[key] = values[0]
    errors = [r.get("error") for r in reps if not r.get("ok")]
    if errors:
        out["errors"] = errors
    return out


@dataclass(frozen=True)
class Row:
    section: str
    label: str
    match: Callable[[Case], bool]
    metric: Callable[[Case], str]
    kind: str  # rate, ms, s, mb
    ceiling: str = ""  # key into the ceiling medians
    alt_setups: bool = False  # show non-default setups (e.g. celery solo) as their own columns


def _drain(transport: str, results: bool | None = None) -> Callable[[Case], bool]:
    return lambda c: c.workload == "drain" and c.transport == transport and (results is None or c.results == results)


def _latency(transport: str) -> Callable[[Case], bool]:
    return lambda c: c.workload == "latency" and c.transport == transport


def _enqueue(bulk: bool) -> Callable[[Case], bool]:
    def match(c: Case) -> bool:
        if c.workload == "enqueue":
            return bool(c.params.get("bulk")) == bulk
        if c.workload == "drain" and c.transport == "redis":
            return c.params.get("fill") == ("bulk" if bulk else "single") and c.results == bulk
        return False

    return match


def _fixed(name: str) -> Callable[[Case], str]:
    return lambda c: name


def _enqueue_metric(c: Case) -> str:
    return "rate" if c.workload == "enqueue" else "fill_rate"


ROWS = [
    Row("Redis", "enqueue one by one, tasks/s", _enqueue(False), _enqueue_metric, "rate", "rpush_1_rate"),
    Row("Redis", "enqueue with the batch API, tasks/s", _enqueue(True), _enqueue_metric, "rate", "rpush_100_rate"),
    Row("Redis", "drain, no results, tasks/s", _drain("redis", False), _fixed("rate"), "rate", "lpop_100_rate", True),
    Row("Redis", "drain, no results, seconds", _drain("redis", False), _fixed("drain_time"), "s", "", True),
    Row("Redis", "drain, results stored, tasks/s", _drain("redis", True), _fixed("rate"), "rate", "", True),
    Row("Redis", "drain, results stored, seconds", _drain("redis", True), _fixed("drain_time"), "s", "", True),
    Row("Redis", "latency p50, ms", _latency("redis"), _fixed("p50_ms"), "ms", "echo_p50_ms"),
    Row("Redis", "latency p99, ms", _latency("redis"), _fixed("p99_ms"), "ms", "echo_p99_ms"),
    Row("Redis", "chord, seconds", lambda c: c.workload == "workflows", _fixed("chord_seconds"), "s"),
    Row("Redis", "chain, seconds", lambda c: c.workload == "workflows", _fixed("chain_seconds"), "s"),
    Row("Redis", "worker RSS idle, MB (all processes)", _latency("redis"), _fixed("memory_idle.rss_mb"), "mb"),
    Row("Redis", "worker PSS idle, MB (all processes)", _latency("redis"), _fixed("memory_idle.pss_mb"), "mb"),
    Row("Redis", "largest worker process RSS idle, MB", _latency("redis"), _fixed("memory_idle.largest_rss_mb"),
        "mb"),
    Row("Redis", "worker RSS after drain, MB (all processes)", _drain("redis", True), _fixed("memory_after.rss_mb"),
        "mb"),
    Row("Redis", "worker PSS after drain, MB (all processes)", _drain("redis", True), _fixed("memory_after.pss_mb"),
        "mb"),
    Row("SQLite (embedded)", "drain, tasks/s", _drain("sqlite"), _fixed("rate"), "rate"),
    Row("SQLite (embedded)", "drain, seconds", _drain("sqlite"), _fixed("drain_time"), "s"),
    Row("SQLite (embedded)", "latency p50, ms", _latency("sqlite"), _fixed("p50_ms"), "ms"),
    Row("SQLite (embedded)", "latency p99, ms", _latency("sqlite"), _fixed("p99_ms"), "ms"),
    Row("RabbitMQ", "drain, no results, tasks/s", _drain("amqp"), _fixed("rate"), "rate"),
    Row("RabbitMQ", "drain, no results, seconds", _drain("amqp"), _fixed("drain_time"), "s"),
    Row("RabbitMQ", "latency p50, ms", _latency("amqp"), _fixed("p50_ms"), "ms"),
    Row("RabbitMQ", "latency p99, ms", _latency("amqp"), _fixed("p99_ms"), "ms"),
]

CEILING_LABELS = {
    "rpush_1_rate": "redis-py RPUSH one per round trip, ops/s",
    "lpop_1_rate": "redis-py LPOP one per round trip, ops/s",
    "rpush_100_rate": "redis-py RPUSH 100 values per call, items/s",
    "lpop_100_rate": "redis-py LPOP count=100, items/s",
    "ping_p50_ms": "redis-py PING round trip p50, ms",
    "echo_p50_ms": "redis-py send-and-wait through an echo process (RPUSH, BLPOP) p50, ms",
    "echo_p99_ms": "redis-py send-and-wait through an echo process p99, ms",
    "ping_p99_ms": "redis-py PING round trip p99, ms",
    "rb_rpush_P100_rate": "redis-benchmark -t rpush -P 100, requests/s",
    "rb_lpop_P100_rate": "redis-benchmark -t lpop -P 100, requests/s",
}


def fmt(value: float, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind in ("rate", "mb"):
        return f"{value:,.0f}"
    if kind == "ms":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"
    return f"{value:.2f}" if value < 100 else f"{value:,.0f}"


@dataclass
class Cell:
    text: str
    value: float | None = None
    partial: bool = False


def columns(cases: list[Case], default_setups: dict[str, str]) -> list[tuple[str, str]]:
    """(system, setup) pairs in table order: each system's default, then its other setups."""
    out: list[tuple[str, str]] = []
    for c in cases:
        col = (c.system, c.setup)
        if col not in out:
            out.append(col)
    return sorted(out, key=lambda col: (_system_rank(col[0]), col[1] != default_setups.get(col[0])))


def _system_rank(name: str) -> int:
    from harness.plan import SYSTEMS

    return SYSTEMS.index(name) if name in SYSTEMS else len(SYSTEMS)


def column_name(col: tuple[str, str], default_setups: dict[str, str]) -> str:
    return col[0] if default_setups.get(col[0]) == col[1] else f"{col[0]} ({col[1]})"


def build_table(
    summaries: dict[Case, dict[str, Any]], ceiling: dict[str, Any], default_setups: dict[str, str]
) -> tuple[list[str], list[tuple[str, str, list[Cell], str]]]:
    """Header and rows (section, label, cells, ceiling text); ratios are to machinery's cell of the row."""
    cols = columns(list(summaries), default_setups)
    header = [column_name(c, default_setups) for c in cols]
    rows = []
    for row in ROWS:
        cells: list[Cell] = []
        any_case = False
        for system, setup in cols:
            if not row.alt_setups and default_setups.get(system) != setup:
                cells.append(Cell(""))
                continue
            found = [c for c in summaries if c.system == system and c.setup == setup and row.match(c)]
            if not found:
                cells.append(Cell("-"))
                continue
            any_case = True
            cells.append(_cell(found[0], summaries[found[0]], row))
        if not any_case:
            continue
        ref = next((cell.value for (system, setup), cell in zip(cols, cells, strict=True)
                    if system == REFERENCE and default_setups.get(system) == setup), None)
        for cell in cells:
            if cell.value is not None:
                ratio = f" ({cell.value / ref:.2f}x)" if ref else ""
                cell.text = fmt(cell.value, row.kind) + ("*" if cell.partial else "") + ratio
        ceil = fmt(ceiling[row.ceiling], row.kind) if row.ceiling and row.ceiling in ceiling else ""
        rows.append((row.section, row.label, cells, ceil))
    return header, rows


def _cell(case: Case, summary: dict[str, Any], row: Row) -> Cell:
    if not summary.get("ok"):
        return Cell("n/a" if summary.get("na") else "error")
    metric = row.metric(case)
    if metric.startswith(("chord", "chain")) and metric not in summary:
        err = summary.get(metric.replace("seconds", "error"), "")
        return Cell("n/a" if str(err).startswith("n/a") else "error")
    value = summary.get(metric)
    if value is None:
        return Cell("-")
    partial = summary.get("complete") is False and metric in ("rate", "drain_time", "p50_ms", "p99_ms")
    return Cell("", float(value), partial)


def render(header: list[str], rows: list[tuple[str, str, list[Cell], str]]) -> str:
    """A Markdown table per section, with the columns that section has, and a ceiling column."""
    lines: list[str] = []
    sections: dict[str, list[tuple[str, list[Cell], str]]] = {}
    for sec, label, cells, ceil in rows:
        sections.setdefault(sec, []).append((label, cells, ceil))
    for sec, members in sections.items():
        keep = [i for i in range(len(header)) if any(cells[i].text not in ("", "-") for _, cells, _ in members)]
        with_ceiling = any(ceil for _, _, ceil in members)
        head = ["metric", *(header[i] for i in keep)] + (["ceiling"] if with_ceiling else [])
        lines += ["", f"### {sec}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        for label, cells, ceil in members:
            row = [label, *(cells[i].text for i in keep)] + ([ceil] if with_ceiling else [])
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines).strip() + "\n"


def render_ceiling(ceiling: dict[str, Any]) -> str:
    if not ceiling:
        return ""
    lines = ["### Ceiling (private Redis, this machine)", "", "| measure | value |", "|---|---:|"]
    for key, label in CEILING_LABELS.items():
        if key in ceiling:
            kind = "ms" if key.endswith("_ms") else "rate"
            lines.append(f"| {label} | {fmt(ceiling[key], kind)} |")
    return "\n".join(lines) + "\n"
