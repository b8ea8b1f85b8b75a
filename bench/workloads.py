"""The benchmarks of BENCHMARKS.md: chain40, long10 and throughput on the embedded stack, and sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from bench.report import git_commit, summary, write
from citadel.runs import follow, start_command
from citadel.settings import Settings
from citadel.stack import Stack, running_stack
from schemas.definition import parse_definition
from streams.kafka import RUN_EVENTS
from streams.watch import topic_reader

PROJECT_ROOT = Path(__file__).resolve().parents[1]

FIB = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"


def chain_node_code(fib_argument: int) -> str:
    """A chain node's code: add fib(`fib_argument`) to the value passed on."""
    return FIB + f"def main(v):\n    return v + fib({fib_argument})\n"


def chain_definition(name: str, length: int, fib_argument: int) -> dict[str, Any]:
    """`length` sequential python nodes, each running `chain_node_code(fib_argument)`."""
    nodes = []
    for i in range(length):
        source = "input.v" if i == 0 else f"n{i - 1}"
        nodes.append(
            {
                "id": f"n{i}",
                "type": "python",
                "needs": [] if i == 0 else [f"n{i - 1}"],
                "config": {"inputs": {"v": source}, "code": chain_node_code(fib_argument)},
            }
        )
    return parse_definition(
        {"name": name, "nodes": nodes, "outputs": {"value": f"n{length - 1}"}}
    ).model_dump(mode="json")


def five_node_definition() -> dict[str, Any]:
    return parse_definition(
        {
            "name": "five",
            "nodes": [
                {"id": "prepare", "type": "transform", "config": {"output": {"x": "input.n + 1"}}},
                {
                    "id": "double",
                    "type": "python",
                    "needs": ["prepare"],
                    "config": {"inputs": {"x": "prepare.x"}, "code": "def main(x):\n    return x * 2\n"},
                },
                {
                    "id": "big",
                    "type": "condition",
                    "needs": ["double"],
                    "config": {"expression": "double > 10"},
                },
                {
                    "id": "label",
                    "type": "python",
                    "needs": ["big"],
                    "config": {
                        "inputs": {"big": "big.result"},
                        "code": "def main(big):\n    return 'big' if big else 'small'\n",
                    },
                },
                {
                    "id": "result",
                    "type": "transform",
                    "needs": ["label", "double"],
                    "config": {"output": {"value": "double", "label": "label"}},
                },
            ],
            "outputs": {"result": "result"},
        }
    ).model_dump(mode="json")


def _settings(home: Path) -> Settings:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITADEL_")}
    env["CITADEL_HOME"] = str(home)
    return Settings.from_env(env)


def _fib(n: int) -> int:
    """The value the nodes' recursive fib(n) must come to, found quickly."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@contextlib.asynccontextmanager
async def _embedded_stack() -> AsyncIterator[Stack]:
    with tempfile.TemporaryDirectory(prefix="citadel-bench-") as home:
        async with running_stack(_settings(Path(home))) as stack:
            yield stack


def _stack_settings() -> dict[str, Any]:
    # The python executor refuses to start without bubblewrap unless told to accept rlimits only.
    return {
        "sandbox": "bubblewrap (zygote, one forked child per attempt)",
        "store": "sqlite",
        "broker": "embedded tansu",
    }


async def _timed_run(
    stack: Stack, definition: dict[str, Any], value: int, expected: int
) -> tuple[float, float]:
    """One run from StartRun to its end: the wall time seen here, and from its first to its last event."""
    command = start_command(definition, {"v": value}, "bench")
    started = time.perf_counter()
    await stack.engine.submit(command)
    report = await follow(stack.kafka, command.run_id, command.id)
    wall = time.perf_counter() - started
    assert report.status == "completed", report.error
    assert report.outputs == {"value": expected}
    first, last = report.events[0], report.events[-1]
    return wall, (last.time - first.time).total_seconds()


async def chain40(repeats: int = 5, length: int = 40) -> dict[str, Any]:
    definition = chain_definition("chain40", length, 10)
    walls, internals = [], []
    async with _embedded_stack() as stack:
        for i in range(repeats + 1):  # the first run warms up the executor
            wall, internal = await _timed_run(stack, definition, i, i + length * _fib(10))
            if i > 0:
                walls.append(wall)
                internals.append(internal)
    figures = {
        "wall_seconds": summary(walls),
        "started_to_completed_seconds": summary(internals),
        "per_node_ms": summary([w / length * 1000 for w in walls]),
    }
    path = write(
        "chain40",
        {"repeats": repeats, "nodes": length, "node": "python, fib(10)", **_stack_settings()},
        figures,
    )
    return {"figures": figures, "path": str(path)}


# The baseline: the nodes' own code, called in a loop by a plain interpreter (no engine, no sandbox).
PLAIN_LOOP = """
import json, sys, time
namespace = {}
exec(compile(sys.argv[1], "<node>", "exec"), namespace)
main, v = namespace["main"], int(sys.argv[3])
began = time.perf_counter()
for _ in range(int(sys.argv[2])):
    v = main(v)
print(json.dumps({"seconds": time.perf_counter() - began, "value": v}))
"""


async def _plain_loop(code: str, length: int, value: int, expected: int) -> float:
    """Seconds the loop took, timed inside its own process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PLAIN_LOOP, code, str(length), str(value), stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0, f"the plain loop exited with status {process.returncode}"
    result = orjson.loads(stdout)
    assert result["value"] == expected, result
    return float(result["seconds"])


async def long10(repeats: int = 5, length: int = 10, fib_argument: int = 33) -> dict[str, Any]:
    """The chain run beside the same calls in a plain loop, alternating which goes first."""
    definition = chain_definition("long10", length, fib_argument)
    code = chain_node_code(fib_argument)
    walls, internals, loops = [], [], []
    async with _embedded_stack() as stack:
        for i in range(repeats + 1):  # the first pair warms up the executor
            expected = i + length * _fib(fib_argument)
            # Alternating, so that neither side always meets the machine in the same mood.
            if i % 2:
                wall, internal = await _timed_run(stack, definition, i, expected)
                loop = await _plain_loop(code, length, i, expected)
            else:
                loop = await _plain_loop(code, length, i, expected)
                wall, internal = await _timed_run(stack, definition, i, expected)
            if i > 0:
                walls.append(wall)
                internals.append(internal)
                loops.append(loop)
    figures = {
        "wall_seconds": summary(walls),
        "started_to_completed_seconds": summary(internals),
        "plain_loop_seconds": summary(loops),
        "ratio": summary([w / p for w, p in zip(walls, loops, strict=True)]),
        "ratio_of_medians": statistics.median(walls) / statistics.median(loops),
        "overhead_per_node_ms": summary([(w - p) / length * 1000 for w, p in zip(walls, loops, strict=True)]),
    }
    path = write(
        "long10",
        {
            "repeats": repeats,
            "nodes": length,
            "node": f"python, fib({fib_argument})",
            "baseline": "the same code called in a loop in a fresh interpreter, timed inside it",
            "order": "run and loop side by side, alternating which goes first",
            **_stack_settings(),
        },
        figures,
    )
    return {"figures": figures, "path": str(path)}


def _tree_rss_kb(root: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid, ppid = int(entry), int(fields.get("PPid", "0").strip())
        children.setdefault(ppid, []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


async def throughput(
    runs: int = 10_000,
    progress: Callable[[int, int], None] | None = None,
    observe: Callable[[Stack], None] | None = None,
    record: bool = True,
) -> dict[str, Any]:
    """With `observe`, it is called with the started stack (the `lag` benchmark watches its projector);
    with `record` False, no result file is written (`lag` writes its own, with these figures)."""
    definition = five_node_definition()
    peak_rss_kb = 0
    async with _embedded_stack() as stack:
        if observe is not None:
            observe(stack)
        kafka = stack.kafka
        consumer = topic_reader(kafka, RUN_EVENTS)
        await consumer.start()
        started_at: dict[str, float] = {}
        latencies: list[float] = []
        done = 0
        failed = 0

        async def count() -> None:
            nonlocal done, failed
            while done + failed < runs:
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                for records in batch.values():
                    for record in records:
                        event = orjson.loads(record.value)
                        kind = event["type"]
                        if kind == "Started":
                            started_at[event["run_id"]] = _ts(event["time"])
                        elif kind in ("Completed", "Failed", "Cancelled"):
                            if kind == "Completed":
                                done += 1
                            else:
                                failed += 1
                            latencies.append(_ts(event["time"]) - started_at.get(event["run_id"], 0))
                if progress:
                    progress(done + failed, runs)

        async def sample() -> None:
            nonlocal peak_rss_kb
            while True:
                peak_rss_kb = max(peak_rss_kb, _tree_rss_kb(os.getpid()))
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample())
        counter = asyncio.create_task(count())
        began = time.perf_counter()
        for start in range(0, runs, 500):
            commands = [
                start_command(definition, {"n": n}, "bench", run_id=str(uuid.uuid4()))
                for n in range(start, min(runs, start + 500))
            ]
            await asyncio.gather(*(stack.engine.submit(c) for c in commands))
        submitted = time.perf_counter() - began
        await counter
        elapsed = time.perf_counter() - began
        sampler.cancel()
        await consumer.stop()
    figures = {
        "runs": runs,
        "completed": done,
        "failed": failed,
        "elapsed_seconds": elapsed,
        "submit_seconds": submitted,
        "runs_per_second": done / elapsed,
        "node_executions_per_second": done * 5 / elapsed,
        "run_latency_seconds": summary(latencies),
        "peak_rss_mb": peak_rss_kb / 1024,
    }
    if not record:
        return {"figures": figures, "path": None}
    path = write(
        "throughput",
        {
            "runs": runs,
            "nodes_per_run": 5,
            "workflow": "transform, python, condition, python, transform",
            **_stack_settings(),
            "partitions": stack.settings.partitions,
            "executor_concurrency": stack.settings.executor_concurrency,
        },
        figures,
    )
    return {"figures": figures, "path": str(path)}


def _ts(value: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(value).timestamp()


async def sandbox(count: int = 1000, rounds: int = 3, against: Path | None = None) -> dict[str, Any]:
    """Per-attempt cost of a python node that returns at once: sandboxed vs called in-process.

    With `against` (another checkout, e.g. a `git worktree` of an older commit), the same
    attempts also run from that checkout's executor, round by round in turn with this one's,
    so both sides see the same machine and the ratio is measured in one run.
    """
    sides = {"this": PROJECT_ROOT, **({"against": against.resolve()} if against is not None else {})}
    samples: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, root in sides.items():
            samples[side] += await _probe_sandbox(root, count)
    code = "def main(x):\n    return x + 1\n"
    namespace: dict[str, Any] = {}
    exec(compile(code, "<bench>", "exec"), namespace)  # the in-process baseline: trusted bench code
    began = time.perf_counter()
    for i in range(count):
        namespace["main"](i)
    in_process_ms = (time.perf_counter() - began) * 1000 / count
    figures: dict[str, Any] = {
        "sandboxed_ms": summary(samples["this"]),
        "in_process_ms": in_process_ms,
        "overhead_ms_median": statistics.median(samples["this"]) - in_process_ms,
    }
    if against is not None:
        figures["against_sandboxed_ms"] = summary(samples["against"])
        figures["ratio_to_against_median"] = statistics.median(samples["this"]) / statistics.median(
            samples["against"]
        )
    path = write(
        "sandbox",
        {
            "attempts": count * rounds,
            "rounds": rounds,
            "against": str(against) if against is not None else None,
            "against_commit": git_commit(against) if against is not None else None,
            "node": "python, returns at once",
            "concurrency": 1,
        },
        figures,
    )
    return {"figures": figures, "path": str(path)}


async def _probe_sandbox(root: Path, count: int) -> list[float]:
    """Time `count` attempts of the executor in checkout `root`, in a process of its own."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROJECT_ROOT / "bench" / "sandbox_probe.py"),
        str(root),
        str(count),
        stdout=asyncio.subprocess.PIPE,
        cwd=root,
    )
    stdout, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the sandbox probe of {root} failed (exit status {process.returncode})")
    samples: list[float] = json.loads(stdout)
    return samples
