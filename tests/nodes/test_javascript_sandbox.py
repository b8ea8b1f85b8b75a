"""Specification of where JavaScript runs: in sandboxed worker processes apart from the engine,
confined like the python sandbox, each worker one attempt at a time, so that a crash of V8 or of
its process fails only the attempt it ran, and the executor keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from nodes import _confine
from nodes.javascript import JavaScriptExecutor
from nodes.sandbox import SandboxUnavailable
from schemas.tasks import NodeTask
from tests.nodes import support
from tests.nodes.support import eventually, started

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENV_SECRET = "engine-env-secret-js-8d41c7"
FILE_SECRET = "engine-file-secret-js-2b90fe"
# Under /tmp it would prove little (the sandbox has its own /tmp), so the planted file lives here.
STATE_PARENT = "/var/tmp"
# Runs until its timeout: something to kill while it runs.
SPIN = "function main() { while (true) {} }"
# Busy for a moment, then done: an attempt that overlaps another.
BUSY = "function main() { const end = Date.now() + 500; while (Date.now() < end) {} return 'done'; }"
ALIVE = "function main() { return 'alive'; }"


def make_task(code: str, **fields: Any) -> NodeTask:
    return support.make_task(code, node_type="javascript", **fields)


def status(pid: int) -> dict[str, str]:
    """The fields of /proc/<pid>/status, by name."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def is_gone(pid: int) -> bool:
    """True once the process no longer runs (exited, or a zombie nobody reaped yet)."""
    try:
        return status(pid)["State"][0] in "ZX"
    except FileNotFoundError:
        return True


def running(executor: JavaScriptExecutor, node_id: str) -> int | None:
    """The pid of the worker running `node_id`'s attempt, if one is."""
    return next((pid for pid, node in executor.worker_pids.items() if node == node_id), None)


@pytest_asyncio.fixture(scope="module")
async def executor() -> AsyncIterator[JavaScriptExecutor]:
    """Two workers at most, for the attempts that must run side by side."""
    async with started(JavaScriptExecutor(max_concurrency=2, memory_limit_mb=32)) as running:
        yield running


@pytest_asyncio.fixture
async def single() -> AsyncIterator[JavaScriptExecutor]:
    """One worker at most: whether the next attempt gets the same worker or a fresh one shows."""
    async with started(JavaScriptExecutor(max_concurrency=1, memory_limit_mb=32)) as running:
        yield running


@pytest.fixture
def planted() -> Iterator[Path]:
    """A file of the engine's, readable by anyone on the host, outside the sandbox's allow-list."""
    with tempfile.NamedTemporaryFile("w", prefix="citadel-js-secret-", dir=STATE_PARENT) as secret:
        secret.write(FILE_SECRET)
        secret.flush()
        os.chmod(secret.name, 0o644)
        yield Path(secret.name)


# Apart from the engine


async def test_attempts_run_in_worker_processes_not_in_the_engines(executor: JavaScriptExecutor) -> None:
    outcome = await executor.execute(make_task(ALIVE))
    assert outcome.output == "alive"
    assert executor.worker_pids
    assert os.getpid() not in executor.worker_pids
    for pid in executor.worker_pids:
        assert b"nodes._v8worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert "libmini_racer" in Path(f"/proc/{pid}/maps").read_text()
    # V8 is not even loaded here: nothing of the user's code can run in the engine's process.
    assert "libmini_racer" not in Path("/proc/self/maps").read_text()


async def test_the_engines_environment_does_not_reach_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITADEL_TEST_SECRET", ENV_SECRET)
    async with started(JavaScriptExecutor(max_concurrency=1)) as fresh:
        (pid,) = fresh.worker_pids
        assert ENV_SECRET.encode() not in Path(f"/proc/{pid}/environ").read_bytes()


# Confined like the python sandbox


async def test_a_worker_runs_unprivileged_without_capabilities_under_seccomp(
    executor: JavaScriptExecutor,
) -> None:
    for pid in executor.worker_pids:
        fields = status(pid)
        uids = fields["Uid"].split()
        if os.geteuid() == 0:
            assert uids == [str(executor.sandbox_uid)] * 4
        else:
            assert "0" not in uids
        assert int(fields["CapEff"], 16) == 0
        assert int(fields["CapPrm"], 16) == 0
        assert fields["NoNewPrivs"] == "1"
        if _confine.seccomp_supported():
            assert fields["Seccomp"] == "2"


async def test_a_worker_sees_none_of_the_hosts_files(executor: JavaScriptExecutor, planted: Path) -> None:
    for pid in executor.worker_pids:
        root = Path(f"/proc/{pid}/root")
        # The control: this is the worker's view, in which mini-racer is bound.
        assert (root / "citadel/lib/py_mini_racer/libmini_racer.so").exists()
        assert planted.read_text() == FILE_SECRET
        assert not (root / planted.relative_to("/")).exists()
        assert not (root / "var").exists()
        assert not (root / "work").exists()
        assert not (root / PROJECT_ROOT.relative_to("/")).exists()


# A crash fails only its attempt


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSEGV], ids=lambda fault: fault.name)
async def test_a_crashed_worker_fails_only_the_attempt_it_ran(
    executor: JavaScriptExecutor, fault: signal.Signals
) -> None:
    spinning = asyncio.create_task(executor.execute(make_task(SPIN, node_id="spinner", timeout_seconds=60)))
    busy = asyncio.create_task(executor.execute(make_task(BUSY, node_id="neighbour", timeout_seconds=60)))
    assert await eventually(lambda: set(executor.worker_pids.values()) == {"spinner", "neighbour"})
    victim = running(executor, "spinner")
    assert victim is not None

    os.kill(victim, fault)

    crashed = await spinning
    assert crashed.error_class == "Crashed"
    assert crashed.error_message is not None
    assert "'spinner'" in crashed.error_message
    assert fault.name in crashed.error_message
    assert "can be retried" in crashed.error_message
    neighbour = await busy
    assert neighbour.ok, neighbour.error_message
    assert neighbour.output == "done"
    after = await executor.execute(make_task(ALIVE))
    assert after.output == "alive"
    assert victim not in executor.worker_pids


async def test_running_out_of_memory_fails_the_attempt_and_a_fresh_worker_serves_the_next(
    single: JavaScriptExecutor,
) -> None:
    (before,) = single.worker_pids
    code = "function main() { const hoard = []; while (true) hoard.push(new Array(100000).fill(1)); }"

    outcome = await single.execute(make_task(code))

    assert outcome.error_class == "MemoryLimit"
    assert "32 MiB" in (outcome.error_message or "")
    after = await single.execute(make_task(ALIVE))
    assert after.output == "alive"
    assert before not in single.worker_pids


async def test_array_buffers_past_the_workers_data_limit_fail_to_allocate(single: JavaScriptExecutor) -> None:
    # ArrayBuffers live outside the isolate's heap limit; the worker's RLIMIT_DATA bounds them.
    code = "function main() { const kept = []; while (true) kept.push(new ArrayBuffer(64 * 1024 * 1024)); }"

    outcome = await single.execute(make_task(code, timeout_seconds=30))

    assert outcome.error_class == "RangeError"
    assert "Array buffer allocation failed" in (outcome.error_message or "")
    after = await single.execute(make_task(ALIVE))
    assert after.output == "alive"


async def test_a_timeout_stops_the_isolate_and_the_same_worker_serves_on(single: JavaScriptExecutor) -> None:
    (worker,) = single.worker_pids

    outcome = await single.execute(make_task(SPIN, timeout_seconds=0.3))

    assert outcome.error_class == "Timeout"
    after = await single.execute(make_task(ALIVE))
    assert after.output == "alive"
    assert list(single.worker_pids) == [worker]


async def test_an_attempt_the_engine_cancels_takes_its_worker_along(executor: JavaScriptExecutor) -> None:
    spinning = asyncio.create_task(executor.execute(make_task(SPIN, node_id="abandoned", timeout_seconds=60)))
    assert await eventually(lambda: running(executor, "abandoned") is not None)
    worker = running(executor, "abandoned")
    assert worker is not None

    spinning.cancel()

    with pytest.raises(asyncio.CancelledError):
        await spinning
    assert await eventually(lambda: is_gone(worker))
    after = await executor.execute(make_task(ALIVE))
    assert after.output == "alive"


# What the engine takes from a worker: one bounded reply, in time


async def test_a_huge_error_message_is_truncated_to_keep_the_reply_bounded(
    executor: JavaScriptExecutor,
) -> None:
    outcome = await executor.execute(make_task("function main() { throw new Error('x'.repeat(10000000)); }"))

    assert outcome.error_class == "Error"
    assert outcome.error_message is not None
    assert outcome.error_message.endswith("... [truncated]")
    assert len(outcome.error_message) < 20 * 1024


# A process that greets the engine as a worker does, takes one request, then runs what follows.
IMPOSTOR = """
import sys
hello = b'{"data_limit_bytes": 1}'
sys.stdout.buffer.write(len(hello).to_bytes(4, "big") + hello)
sys.stdout.flush()
sys.stdin.buffer.read(1)
"""


class Impostor(JavaScriptExecutor):
    """An executor whose workers are impostors that, given a request, run `then`."""

    def __init__(self, then: str) -> None:
        super().__init__(max_concurrency=1)
        self.then = then

    def worker_command(self) -> list[str]:
        return [sys.executable, "-c", IMPOSTOR + self.then]


async def test_a_reply_over_the_size_limit_fails_the_attempt_and_the_executor_serves_on() -> None:
    announce_a_gibibyte = (
        "sys.stdout.buffer.write((2**30).to_bytes(4, 'big')); sys.stdout.flush()\nsys.stdin.read()"
    )
    async with started(Impostor(announce_a_gibibyte)) as impostor:
        for _ in range(2):
            outcome = await impostor.execute(make_task(ALIVE))
            assert outcome.error_class == "ProtocolError"
            assert "1073741824-byte frame, over the" in (outcome.error_message or "")


async def test_a_worker_that_does_not_answer_is_killed_at_the_deadline() -> None:
    async with started(Impostor("sys.stdin.read()")) as impostor:
        (silent,) = impostor.worker_pids

        outcome = await impostor.execute(make_task(ALIVE, timeout_seconds=0.2))

        assert outcome.error_class == "Timeout"
        assert "0.2 s" in (outcome.error_message or "")
        assert "killed and replaced" in (outcome.error_message or "")
        assert silent not in impostor.worker_pids


# Isolation settings


async def test_without_bubblewrap_the_executor_refuses_to_start_unless_rlimits_are_accepted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SandboxUnavailable, match=r"javascript executor.*isolation=\"rlimits\""):
        await JavaScriptExecutor().start()

    async with started(JavaScriptExecutor(max_concurrency=1, isolation="rlimits")) as unsandboxed:
        outcome = await unsandboxed.execute(make_task(ALIVE))
        assert outcome.output == "alive"
        (pid,) = unsandboxed.worker_pids
        assert pid != os.getpid()
        assert status(pid)["NoNewPrivs"] == "1"
    assert "rlimits only" in caplog.text
