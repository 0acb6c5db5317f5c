"""Which adapter runs make up a benchmark run, in which order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SYSTEMS = ("celery", "dramatiq", "rq", "arq", "taskiq", "huey", "machinery")
WORKLOADS = ("ceiling", "enqueue", "drain", "latency", "workflows", "memory", "embedded", "amqp")
REFERENCE = "machinery"


@dataclass(frozen=True)
class Counts:
    drain_n: int
    enqueue_n: int
    latency_n: int
    chord_n: int
    chain_n: int
    drain_cap: float  # seconds a drain may take before it is cut short (the rate is still measured)
    latency_cap: float  # seconds of round trips at most
    reps: int


FULL = Counts(drain_n=20_000, enqueue_n=20_000, latency_n=300, chord_n=1000, chain_n=100,
              drain_cap=12.0, latency_cap=15.0, reps=3)
QUICK = Counts(drain_n=2_000, enqueue_n=2_000, latency_n=50, chord_n=100, chain_n=20,
               drain_cap=10.0, latency_cap=5.0, reps=1)


@dataclass(frozen=True)
class Case:
    """One adapter invocation, repeated once per repetition."""

    group: str  # cases of one group run back to back, one system after the other
    system: str
    workload: str  # the adapter's workload: enqueue, drain, latency, workflows
    transport: str  # redis, amqp, sqlite
    setup: str
    results: bool
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def key(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()) if k in ("bulk", "fill"))
        res = "results" if self.results else "noresults"
        return f"{self.workload}/{self.transport}/{self.system}/{self.setup}/{res}/{extra}"

    def adapter_args(self, counts: Counts) -> list[str]:
        p = self.params
        args = [self.workload, "--transport", self.transport, "--setup", self.setup]
        if self.workload == "enqueue":
            args += ["--n", str(counts.enqueue_n)] + (["--bulk"] if p.get("bulk") else [])
        elif self.workload == "drain":
            args += ["--n", str(counts.drain_n), "--cap", str(counts.drain_cap)]
            args += ["--bulk"] if p.get("fill") == "bulk" else []
        elif self.workload == "latency":
            args += ["--n", str(counts.latency_n), "--cap", str(counts.latency_cap)]
        elif self.workload == "workflows":
            args += ["--chord-n", str(counts.chord_n), "--chain-n", str(counts.chain_n)]
        return args

    def timeout(self, counts: Counts) -> float:
        if self.workload == "drain":
            return counts.drain_cap + counts.drain_n / 200 + 120
        if self.workload == "enqueue":
            return counts.enqueue_n / 200 + 60
        if self.workload == "latency":
            return counts.latency_cap + 180
        return 400


@dataclass
class SystemInfo:
    name: str
    ok: bool
    version: str = "?"
    setups: dict[str, str] = field(default_factory=dict)
    supports_bulk: bool = False
    supports_workflows: bool = False
    transports: tuple[str, ...] = ()
    error: str = ""


def build(systems: list[SystemInfo], workloads: set[str]) -> list[Case]:
    """The cases of one repetition, grouped so that systems alternate within each group."""
    if "memory" in workloads:
        workloads = workloads | {"drain", "latency"}
    usable = [s for s in systems if s.ok]
    cases: list[Case] = []

    def add(group: str, s: SystemInfo, workload: str, transport: str, setup: str, *, results: bool,
            **params: Any) -> None:
        cases.append(Case(group, s.name, workload, transport, setup, results, params))

    if "enqueue" in workloads and "drain" not in workloads:
        # With the drain selected, its timed fills are the enqueue figures (one by one, and bulk).
        for s in usable:
            add("enqueue-single", s, "enqueue", "redis", _default(s), results=False, bulk=False)
        for s in usable:
            if s.supports_bulk:
                add("enqueue-bulk", s, "enqueue", "redis", _default(s), results=False, bulk=True)
    if "drain" in workloads:
        for s in usable:
            add("drain-off", s, "drain", "redis", _default(s), results=False, fill="single")
        for s in usable:
            fill = "bulk" if s.supports_bulk else "single"
            add("drain-on", s, "drain", "redis", _default(s), results=True, fill=fill)
        for s in usable:  # other setups (celery's solo workers): without results, to keep the run short
            for setup in list(s.setups)[1:]:
                add("drain-alt", s, "drain", "redis", setup, results=False, fill="bulk")
    if "latency" in workloads:
        for s in usable:
            add("latency", s, "latency", "redis", _default(s), results=True)
    if "workflows" in workloads:
        for s in usable:
            if s.supports_workflows:
                add("workflows", s, "workflows", "redis", _default(s), results=True)
    for transport, workload in (("sqlite", "embedded"), ("amqp", "amqp")):
        if workload not in workloads:
            continue
        members = [s for s in usable if transport in s.transports]
        for s in members:
            add(f"{workload}-drain", s, "drain", transport, _default(s), results=transport == "sqlite", fill="bulk")
        for s in members:
            add(f"{workload}-latency", s, "latency", transport, _default(s), results=True)
    return cases


def _default(s: SystemInfo) -> str:
    return next(iter(s.setups), "default")


def order(cases: list[Case], rep: int) -> list[Case]:
    """Groups in a fixed order; within a group, the systems rotate by one place each repetition."""
    out: list[Case] = []
    groups: dict[str, list[Case]] = {}
    for c in cases:
        groups.setdefault(c.group, []).append(c)
    for members in groups.values():
        shift = rep % len(members)
        out.extend(members[shift:] + members[:shift])
    return out
