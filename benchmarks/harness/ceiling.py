"""What Redis and Python allow on this machine: a bare redis-py loop and redis-benchmark."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from typing import Any

PAYLOAD = b"x" * 200  # about the size of a small task message
BATCH = 100


def redis_py(url: str, n: int) -> dict[str, float]:
    """RPUSH / LPOP one by one and in batches of 100 (LPOP with count), and the PING round trip."""
    import redis

    r = redis.Redis.from_url(url)
    key = "bench:ceiling"
    r.delete(key)
    out: dict[str, float] = {}

    t0 = time.perf_counter()
    for _ in range(n):
        r.rpush(key, PAYLOAD)
    out["rpush_1_rate"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    while r.lpop(key) is not None:
        pass
    out["lpop_1_rate"] = n / (time.perf_counter() - t0)

    batch = [PAYLOAD] * BATCH
    t0 = time.perf_counter()
    for _ in range(n // BATCH):
        r.rpush(key, *batch)
    out["rpush_100_rate"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    while r.lpop(key, BATCH):
        pass
    out["lpop_100_rate"] = n / (time.perf_counter() - t0)

    rtts = []
    for _ in range(1000):
        t0 = time.perf_counter()
        r.ping()
        rtts.append(time.perf_counter() - t0)
    rtts.sort()
    out["ping_p50_ms"] = rtts[len(rtts) // 2] * 1000
    out["ping_p99_ms"] = rtts[int(len(rtts) * 0.99)] * 1000
    r.delete(key)
    r.close()
    return out


# A second process that hands every message straight back: the least work a worker can do.
ECHO = """
import sys, redis
r = redis.Redis.from_url(sys.argv[1])
while True:
    _, body = r.blpop("bench:echo:in")
    if body == b"stop":
        break
    r.rpush("bench:echo:out", body)
"""


def redis_py_echo(url: str, n: int = 1000) -> dict[str, float]:
    """Send-and-wait through Redis between two Python processes with no task queue at all:
    RPUSH, an echo process's BLPOP + RPUSH, our BLPOP. The floor for a round-trip latency."""
    import redis

    r = redis.Redis.from_url(url)
    r.delete("bench:echo:in", "bench:echo:out")
    echo = subprocess.Popen([sys.executable, "-c", ECHO, url])
    try:
        for _ in range(50):  # warm up (and wait for the echo process to start)
            r.rpush("bench:echo:in", PAYLOAD)
            r.blpop(["bench:echo:out"], timeout=30)
        rtts = []
        for _ in range(n):
            t0 = time.perf_counter()
            r.rpush("bench:echo:in", PAYLOAD)
            r.blpop(["bench:echo:out"], timeout=30)
            rtts.append(time.perf_counter() - t0)
    finally:
        r.rpush("bench:echo:in", b"stop")
        echo.wait(timeout=30)
        r.close()
    rtts.sort()
    return {"echo_p50_ms": rtts[len(rtts) // 2] * 1000, "echo_p99_ms": rtts[int(len(rtts) * 0.99)] * 1000}


def redis_benchmark(port: int, requests: int) -> dict[str, float]:
    """`redis-benchmark -q -t rpush,lpop -P 100`: requests per second, C client, 50 connections."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-t", "rpush,lpop", "-P", str(BATCH),
           "-n", str(requests)]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    out: dict[str, float] = {}
    for name, value in re.findall(r"(RPUSH|LPOP)[^:]*:\s*([\d.]+) requests per second", text.replace("\r", "\n")):
        out[f"rb_{name.lower()}_P100_rate"] = float(value)
    return out


def measure(url: str, port: int, n: int) -> dict[str, Any]:
    return {**redis_py(url, n), **redis_py_echo(url), **redis_benchmark(port, max(100_000, n * 10))}
