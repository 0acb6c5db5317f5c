"""One virtualenv per system under benchmarks/.envs/, (re)built only when its requirements change."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
ENVS_DIR = BENCH_DIR / ".envs"
COMMON = ["psutil>=5.9,<8"]


@dataclass(frozen=True)
class EnvSpec:
    name: str
    requirements: tuple[str, ...]
    editable: tuple[str, ...] = ()  # paths given to `pip install -e`


# Version ranges: the current major line of each project, as published on PyPI.
SPECS: dict[str, EnvSpec] = {
    "harness": EnvSpec("harness", ("matplotlib>=3.7,<4", "redis[hiredis]>=5,<9", "psutil>=5.9,<8")),
    "celery": EnvSpec("celery", ("celery[redis]>=5.4,<6", *COMMON)),
    "dramatiq": EnvSpec("dramatiq", ("dramatiq[redis,rabbitmq]>=1.17,<3", *COMMON)),
    "rq": EnvSpec("rq", ("rq>=2.0,<3", "redis[hiredis]>=5,<7", *COMMON)),
    "arq": EnvSpec("arq", ("arq>=0.26,<0.29", "redis[hiredis]>=5,<6", *COMMON)),
    "taskiq": EnvSpec("taskiq", ("taskiq>=0.11,<0.14", "taskiq-redis>=1.0,<2", *COMMON)),
    "huey": EnvSpec("huey", ("huey>=2.5,<4", "redis[hiredis]>=5,<7", *COMMON)),
    "machinery": EnvSpec("machinery", tuple(COMMON), editable=(f"{REPO_DIR}[redis,amqp]",)),
}


def env_python(name: str) -> Path:
    return ENVS_DIR / name / "bin" / "python"


def _digest(spec: EnvSpec) -> str:
    text = "\n".join([sys.version, *spec.requirements, *("-e " + e for e in spec.editable)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_env(name: str, log: bool = True) -> Path:
    """Create or refresh the env `name`; return its python. Raises CalledProcessError on failure."""
    spec = SPECS[name]
    env_dir = ENVS_DIR / name
    marker = env_dir / ".bench-requirements"
    python = env_python(name)
    digest = _digest(spec)
    if python.exists() and marker.exists() and marker.read_text() == digest:
        return python
    t0 = time.monotonic()
    if log:
        print(f"[envs] building {env_dir} ...", file=sys.stderr, flush=True)
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", str(env_dir)], 300)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run([*pip, "--upgrade", "pip"], 600)
    args = list(spec.requirements)
    for path in spec.editable:
        args += ["-e", path]
    _run([*pip, *args], 900)
    marker.write_text(digest)
    if log:
        print(f"[envs] {name} ready in {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    return python


def _run(cmd: list[str], timeout: float) -> None:
    """Run quietly; on failure, show the output and raise."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        print(out.stdout[-3000:], out.stderr[-3000:], sep="\n", file=sys.stderr)
        raise subprocess.CalledProcessError(out.returncode, cmd)


def installed_versions(name: str) -> dict[str, str]:
    """The distributions installed in env `name` (pip freeze, editable lines kept as they are)."""
    out = subprocess.run(
        [str(env_python(name)), "-m", "pip", "freeze", "--disable-pip-version-check"],
        capture_output=True, text=True, timeout=120, check=False,
    ).stdout
    versions: dict[str, str] = {}
    for line in out.splitlines():
        if "==" in line:
            pkg, _, ver = line.partition("==")
            versions[pkg.lower()] = ver
        elif line.startswith("-e"):
            versions[line.rsplit("/", 1)[-1]] = "editable"
    return versions
