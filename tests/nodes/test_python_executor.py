"""Specification of the `python` node executor and the executor registry."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from nodes.base import DuplicateNodeType, ExecutorRegistry
from nodes.python import PythonExecutor
from schemas.tasks import NodeOutcome, NodeTask
from tests.nodes.support import make_task, runs_command, started

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(scope="session")
async def executor() -> AsyncIterator[PythonExecutor]:
    """One executor for the session; its small caps keep the cap tests quick."""
    async with started(PythonExecutor(output_cap_bytes=1024, result_cap_bytes=4096)) as running:
        yield running


def is_gone(pid: int) -> bool:
    """True once the process no longer runs (exited, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_until_no_command(marker: str, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not runs_command(marker):
            return True
        await asyncio.sleep(0.02)
    return not runs_command(marker)


async def wait_until_gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if is_gone(pid):
            return True
        await asyncio.sleep(0.02)
    return is_gone(pid)


# Results and inputs


async def test_returns_the_entrypoints_value_as_output(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("def main():\n    return {'answer': [1, 2]}"))

    assert outcome.ok, outcome
    assert outcome.output == {"answer": [1, 2]}
    assert outcome.duration_ms > 0


async def test_passes_inputs_as_keyword_arguments(executor: PythonExecutor) -> None:
    code = "def main(a, b, *, scale=1):\n    return (a - b) * scale"
    outcome = await executor.execute(make_task(code, inputs={"b": 2, "a": 10, "scale": 3}))

    assert outcome.output == 24


async def test_calls_the_configured_entrypoint(executor: PythonExecutor) -> None:
    code = "def main():\n    return 'main'\ndef handler():\n    return 'handler'"
    outcome = await executor.execute(make_task(code, config={"entrypoint": "handler"}))

    assert outcome.output == "handler"


async def test_missing_entrypoint_is_reported(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("def run():\n    return 1"))

    assert not outcome.ok
    assert outcome.error_class == "EntrypointNotFound"
    assert "'main'" in (outcome.error_message or "")


async def test_missing_code_is_rejected_before_running(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("", config={"code": "   "}))

    assert outcome.error_class == "InvalidTask"
    assert "config.code" in (outcome.error_message or "")


# Failures of user code


async def test_user_exception_reports_its_class_message_and_node_traceback(
    executor: PythonExecutor,
) -> None:
    code = """\
        def check(value):
            if value < 0:
                raise ValueError(f"negative: {value}")

        def main(value):
            check(value)
        """
    outcome = await executor.execute(make_task(code, inputs={"value": -5}))

    assert not outcome.ok
    assert outcome.error_class == "ValueError"
    message = outcome.error_message or ""
    assert message.startswith("negative: -5")
    assert 'File "<node>", line 6, in main' in message
    assert 'File "<node>", line 3, in check' in message
    assert 'raise ValueError(f"negative: {value}")' in message


async def test_exception_class_is_reported_as_named(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("def main():\n    return 1 / 0"))

    assert outcome.error_class == "ZeroDivisionError"
    assert "division by zero" in (outcome.error_message or "")


async def test_syntax_error_is_a_clear_failure(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("def main(:\n    return 1"))

    assert not outcome.ok
    assert outcome.error_class == "SyntaxError"
    message = outcome.error_message or ""
    assert "line 1" in message
    assert "def main(:" in message


async def test_non_json_result_fails_with_result_not_json(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("def main():\n    return {1, 2}"))

    assert outcome.error_class == "ResultNotJSON"
    assert "set" in (outcome.error_message or "")


async def test_nan_is_not_json(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("def main():\n    return float('nan')"))

    assert outcome.error_class == "ResultNotJSON"


async def test_result_over_the_cap_fails_with_result_too_large(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("def main():\n    return 'x' * 5000"))

    assert outcome.error_class == "ResultTooLarge"
    assert "4096" in (outcome.error_message or "")


async def test_result_just_under_the_cap_is_returned(executor: PythonExecutor) -> None:
    # 4094 characters plus two quotes is exactly the 4096-byte cap.
    outcome = await executor.execute(make_task("def main():\n    return 'x' * 4094"))

    assert outcome.ok, outcome


async def test_memory_beyond_the_limit_fails_with_memory_error(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("def main():\n    return len(bytearray(2**31))"))

    assert outcome.error_class == "MemoryError"


# Timeouts and crashes


async def test_timeout_kills_an_infinite_loop(executor: PythonExecutor) -> None:
    started_at = time.monotonic()
    outcome = await executor.execute(
        make_task("def main():\n    while True:\n        pass", timeout_seconds=0.5)
    )

    assert outcome.error_class == "Timeout"
    assert "0.5 s" in (outcome.error_message or "")
    assert time.monotonic() - started_at < 2.0


async def test_timeout_also_kills_processes_the_code_spawned(executor: PythonExecutor) -> None:
    code = """\
        import os, subprocess

        def main():
            # Pids inside the sandbox mean nothing here, so the sleeper is found by its argument.
            subprocess.Popen(["sleep", "60.0421"])
            print("spawned", flush=True)
            while True:
                pass
        """
    outcome = await executor.execute(make_task(code, timeout_seconds=0.5))

    assert outcome.error_class == "Timeout"
    assert outcome.stdout == "spawned\n"
    assert await wait_until_no_command("60.0421")


async def test_processes_the_code_leaves_running_are_killed_when_it_returns(
    executor: PythonExecutor,
) -> None:
    code = "import subprocess\ndef main():\n    return subprocess.Popen(['sleep', '60.0422']).pid"
    outcome = await executor.execute(make_task(code))

    assert outcome.ok, outcome
    assert await wait_until_no_command("60.0422")


async def test_output_printed_before_a_timeout_is_kept(executor: PythonExecutor) -> None:
    code = "import time\ndef main():\n    print('started')\n    time.sleep(60)"
    outcome = await executor.execute(make_task(code, timeout_seconds=0.3))

    assert outcome.error_class == "Timeout"
    assert outcome.stdout == "started\n"


async def test_death_by_signal_is_a_crash_naming_the_signal(executor: PythonExecutor) -> None:
    # A genuine fault: as its namespace's PID 1, the node ignores signals it sends itself.
    code = "import ctypes\ndef main():\n    ctypes.string_at(0)"
    outcome = await executor.execute(make_task(code))

    assert outcome.error_class == "Crashed"
    assert "SIGSEGV" in (outcome.error_message or "")


async def test_exiting_without_a_result_is_a_crash(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("import os\ndef main():\n    os._exit(3)"))

    assert outcome.error_class == "Crashed"
    assert "status 3" in (outcome.error_message or "")


async def test_sys_exit_is_reported_as_an_exception(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("import sys\ndef main():\n    sys.exit(2)"))

    assert outcome.error_class == "SystemExit"


# Output capture


async def test_stdout_and_stderr_are_captured(executor: PythonExecutor) -> None:
    code = """\
        import subprocess, sys

        def main():
            print("to stdout: héllo ✓")
            print("to stderr", file=sys.stderr)
            subprocess.run(["echo", "from a subprocess"], check=True)
            return None
        """
    outcome = await executor.execute(make_task(code))

    assert outcome.ok, outcome
    assert outcome.stdout == "to stdout: héllo ✓\nfrom a subprocess\n"
    assert outcome.stderr == "to stderr\n"


async def test_output_over_the_cap_is_truncated(executor: PythonExecutor) -> None:
    code = "import sys\ndef main():\n    print('y' * 100_000)\n    sys.stderr.write('z' * 5000)"
    outcome = await executor.execute(make_task(code))

    assert outcome.ok, outcome
    assert outcome.stdout == "y" * 1024 + "\n... [truncated]"
    assert outcome.stderr == "z" * 1024 + "\n... [truncated]"


async def test_output_of_a_timed_out_attempt_is_capped_too() -> None:
    # Control characters escape to six bytes each: a report far bigger than a socket buffer.
    code = "import time\ndef main():\n    print('\\x01' * 100_000)\n    time.sleep(60)"
    async with started(PythonExecutor()) as fresh:
        outcome = await fresh.execute(make_task(code, timeout_seconds=0.5))

    assert outcome.error_class == "Timeout"
    assert outcome.stdout == "\x01" * 64 * 1024 + "\n... [truncated]"


async def test_output_is_kept_when_the_code_fails(executor: PythonExecutor) -> None:
    code = "def main():\n    print('before')\n    raise KeyError('k')"
    outcome = await executor.execute(make_task(code))

    assert outcome.error_class == "KeyError"
    assert outcome.stdout == "before\n"


# Isolation


async def test_code_runs_in_another_process(executor: PythonExecutor) -> None:
    outcome = await executor.execute(make_task("import os\ndef main():\n    return os.getpid()"))

    assert outcome.ok, outcome
    assert outcome.output not in (os.getpid(), executor.zygote_pid)


async def test_each_attempt_gets_a_fresh_process(executor: PythonExecutor) -> None:
    code = """\
        import builtins, os

        def main():
            seen = (getattr(builtins, "left_behind", None), os.listdir("."))
            builtins.left_behind = os.getpid()
            open("scratch.txt", "w").write("x")
            # Each attempt is PID 1 of its own PID namespace; nothing of the first reached the second.
            return [os.getpid(), seen[0], seen[1]]
        """
    first = await executor.execute(make_task(code))
    second = await executor.execute(make_task(code))

    assert first.output[0] == second.output[0] == 1
    assert second.output[1:] == [None, []]


async def test_child_does_not_see_the_engines_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CITADEL_TEST_SECRET", "hunter2")
    code = """\
        import os

        def main():
            initial = open("/proc/self/environ", "rb").read().decode()
            return ["CITADEL_TEST_SECRET" in os.environ, "hunter2" in initial, "PATH" in os.environ]
        """
    async with started(PythonExecutor()) as fresh:
        outcome = await fresh.execute(make_task(code))

    assert outcome.output == [False, False, True]


async def test_child_holds_only_stdio_and_its_connection(executor: PythonExecutor) -> None:
    code = """\
        import os

        def main():
            return sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        """
    outcome = await executor.execute(make_task(code))

    # The fifth descriptor is the one listdir opened to read /proc/self/fd.
    assert outcome.output == [0, 1, 2, 3, 4]


async def test_child_leads_its_own_session(executor: PythonExecutor) -> None:
    outcome = await executor.execute(
        make_task("import os\ndef main():\n    return [os.getpid(), os.getsid(0), os.getpgid(0)]")
    )

    pid, session, group = outcome.output
    assert pid == session == group


# Concurrency and the zygote's life


async def test_many_concurrent_attempts_all_complete(executor: PythonExecutor) -> None:
    code = "import os\ndef main(n):\n    return [n * n, os.getpid(), len(os.listdir('/proc')) < 80]"
    outcomes = await asyncio.gather(*(executor.execute(make_task(code, inputs={"n": n})) for n in range(20)))

    assert [outcome.output[0] for outcome in outcomes] == [n * n for n in range(20)]
    # Each ran as PID 1 of its own namespace, so its /proc shows no other attempt.
    assert all(outcome.output[1:] == [1, True] for outcome in outcomes)


async def test_concurrency_is_bounded_by_max_concurrency() -> None:
    code = """\
        import time

        def main():
            start = time.monotonic()
            time.sleep(0.15)
            return [start, time.monotonic()]
        """
    async with started(PythonExecutor(max_concurrency=3)) as bounded:
        outcomes = await asyncio.gather(*(bounded.execute(make_task(code)) for _ in range(9)))

    spans = [outcome.output for outcome in outcomes]
    overlap = max(sum(1 for start, end in spans if start <= t < end) for t, _ in spans)
    assert 2 <= overlap <= 3


async def test_a_killed_zygote_is_restarted_on_the_next_attempt() -> None:
    async with started(PythonExecutor()) as fresh:
        first_zygote = fresh.zygote_pid
        assert first_zygote is not None
        os.kill(first_zygote, signal.SIGKILL)
        # Until the engine has reaped it, the killed process still counts as running.
        assert await wait_until_gone(first_zygote)

        # The sandboxed zygote dies a moment after its bwrap parent: an attempt racing that
        # moment fails as Crashed (retryable), never with an exception; the next one runs.
        outcome = await fresh.execute(make_task("def main():\n    return 'still here'"))
        if not outcome.ok:
            assert outcome.error_class == "Crashed", outcome
            outcome = await fresh.execute(make_task("def main():\n    return 'still here'"))

        assert outcome.output == "still here"
        assert fresh.zygote_pid not in (None, first_zygote)


async def test_an_attempt_in_flight_when_the_zygote_dies_fails_as_crashed() -> None:
    async with started(PythonExecutor()) as fresh:
        running = asyncio.create_task(
            fresh.execute(make_task("import time\ndef main():\n    time.sleep(30)"))
        )
        await asyncio.sleep(0.3)
        assert fresh.zygote_pid is not None
        os.kill(fresh.zygote_pid, signal.SIGKILL)

        outcome = await asyncio.wait_for(running, 3.0)

    assert outcome.error_class == "Crashed"


async def test_the_zygote_and_its_children_die_with_the_engine(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    engine_script = f"""
import asyncio, sys
from nodes.python import PythonExecutor
from schemas.tasks import NodeTask

CODE = '''
import subprocess, time
def main(pid_file):
    subprocess.Popen(["sleep", "60.0423"])
    time.sleep(60)
'''

async def main():
    executor = PythonExecutor()
    await executor.start()
    print(executor.zygote_pid, flush=True)
    await executor.execute(NodeTask(
        run_id="r", tenant="t", workflow="w", node_id="n", node_type="python", attempt=1,
        attempt_id="a", config={{"code": CODE}}, inputs={{"pid_file": {str(pid_file)!r}}},
        timeout_seconds=60,
    ))

asyncio.run(main())
"""
    # The killed engine cannot remove its runtime directory, so give it one to lose.
    engine_tmp = tempfile.TemporaryDirectory()
    engine = subprocess.Popen(
        [sys.executable, "-c", engine_script],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "TMPDIR": engine_tmp.name},
    )
    try:
        assert engine.stdout is not None
        zygote_pid = int(engine.stdout.readline())
        deadline = time.monotonic() + 5
        # The sandbox's /tmp is private, so the attempt is seen by the process it spawned.
        while not runs_command("60.0423"):
            assert time.monotonic() < deadline, "the attempt never started"
            await asyncio.sleep(0.02)

        engine.kill()
        engine.wait()

        assert await wait_until_gone(zygote_pid)
        assert await wait_until_no_command("60.0423")
    finally:
        engine.kill()
        engine.wait()
        engine_tmp.cleanup()


async def test_stop_ends_the_zygote_and_removes_its_files() -> None:
    fresh = PythonExecutor()
    await fresh.start()
    zygote_pid = fresh.zygote_pid
    assert zygote_pid is not None
    runtime_dir = Path(f"/proc/{zygote_pid}/cwd").resolve()

    await fresh.stop()

    assert await wait_until_gone(zygote_pid)
    assert not runtime_dir.exists()
    outcome = await fresh.execute(make_task("def main():\n    return 1"))
    assert outcome.error_class == "ExecutorUnavailable"


# The registry


class RecordingExecutor:
    """A stand-in executor that records calls and can be told to fail."""

    def __init__(self, node_types: tuple[str, ...], fail_with: Exception | None = None) -> None:
        self.node_types = node_types
        self.fail_with = fail_with
        self.calls: list[str] = []

    async def start(self) -> None:
        self.calls.append("start")

    async def stop(self) -> None:
        self.calls.append("stop")

    async def execute(self, task: NodeTask) -> NodeOutcome:
        self.calls.append(f"execute {task.node_id}")
        if self.fail_with is not None:
            raise self.fail_with
        return NodeOutcome.success(task.node_type, duration_ms=0.0)


async def test_registry_dispatches_by_node_type() -> None:
    http = RecordingExecutor(("http",))
    shell = RecordingExecutor(("shell", "bash"))
    registry = ExecutorRegistry([http, shell])

    await registry.start()
    outcome = await registry.execute(make_task("", node_type="bash"))
    await registry.stop()

    assert outcome.output == "bash"
    assert http.calls == ["start", "stop"]
    assert shell.calls == ["start", "execute step", "stop"]


async def test_registry_reports_an_unknown_node_type_as_a_failure() -> None:
    registry = ExecutorRegistry([RecordingExecutor(("http",))])

    outcome = await registry.execute(make_task("", node_type="cobol"))

    assert not outcome.ok
    assert outcome.error_class == "UnknownNodeType"
    assert "'cobol'" in (outcome.error_message or "")
    assert "http" in (outcome.error_message or "")


async def test_registry_turns_an_executor_bug_into_a_failure() -> None:
    registry = ExecutorRegistry([RecordingExecutor(("http",), fail_with=RuntimeError("boom"))])

    outcome = await registry.execute(make_task("", node_type="http"))

    assert outcome.error_class == "ExecutorError"
    assert "boom" in (outcome.error_message or "")


async def test_registry_refuses_two_executors_for_one_node_type() -> None:
    with pytest.raises(DuplicateNodeType, match="'http'"):
        ExecutorRegistry([RecordingExecutor(("http",)), RecordingExecutor(("http",))])


async def test_registry_runs_python_nodes_end_to_end() -> None:
    registry = ExecutorRegistry([PythonExecutor()])
    await registry.start()
    try:
        outcome = await registry.execute(make_task("def main(x):\n    return x + 1", inputs={"x": 1}))
    finally:
        await registry.stop()

    assert outcome.output == 2


# What user code may import, and its scratch space


async def test_user_code_imports_from_the_configured_package_directories_only(tmp_path: Path) -> None:
    packages = tmp_path / "packages"
    packages.mkdir()
    (packages / "greeting.py").write_text("WORDS = 'hello from an allowed package'\n")
    code = """\
        import importlib

        def main():
            found = {}
            for name in ("greeting", "orjson", "json"):
                try:
                    importlib.import_module(name)
                    found[name] = "imported"
                except ImportError as exc:
                    found[name] = type(exc).__name__
            import greeting
            return [found, greeting.WORDS]
        """
    async with started(PythonExecutor(packages=[str(packages)])) as only_ours:
        outcome = await only_ours.execute(make_task(code))

    assert outcome.ok, outcome
    found, words = outcome.output
    # The engine's own packages (orjson) are not offered unless configured; the stdlib always is.
    assert found == {"greeting": "imported", "orjson": "ModuleNotFoundError", "json": "imported"}
    assert words == "hello from an allowed package"


async def test_the_engines_own_packages_are_importable_by_default(executor: PythonExecutor) -> None:
    outcome = await executor.execute(
        make_task("import orjson\ndef main():\n    return orjson.dumps([1]).decode()")
    )

    assert outcome.ok, outcome
    assert outcome.output == "[1]"


async def test_filling_the_scratch_space_fails_the_attempt_naming_its_size() -> None:
    code = """\
        def main():
            written = 0
            with open("/tmp/fill", "wb") as file:
                while True:
                    file.write(b"x" * 2**20)
                    file.flush()
                    written += 1
        """
    async with started(PythonExecutor(scratch_bytes=8 * 2**20)) as small:
        outcome = await small.execute(make_task(code))
        after = await small.execute(make_task("def main():\n    return 'still serving'"))

    assert outcome.error_class == "OSError"
    assert (outcome.error_message or "").startswith(
        "[Errno 28] No space left on device (the node's scratch space, /tmp, holds at most 8 MiB)"
    )
    assert after.output == "still serving"


@pytest.mark.parametrize(
    ("value", "where"),
    [("[0] * 0 + [10**30]", "output[0]: the integer"), ("deep(300)", "nested deeper than 64 levels")],
)
async def test_a_hostile_result_fails_as_not_recordable_and_invalid_bytes_are_mended(
    executor: PythonExecutor, value: str, where: str
) -> None:
    code = f"""\
        import sys

        def deep(n):
            value = 1
            for _ in range(n):
                value = [value]
            return value

        def main():
            sys.stdout.buffer.write(b"bytes \\xff\\xfe that are not UTF-8\\n")
            sys.stdout.flush()
            return {value}
        """
    outcome = (await executor.execute(make_task(code))).recordable("hostile")
    after = await executor.execute(make_task("def main():\n    return 'still serving'"))

    assert outcome.error_class == "ResultNotRecordable", outcome
    assert where in (outcome.error_message or "")
    assert outcome.stdout == "bytes \ufffd\ufffd that are not UTF-8\n"
    assert after.output == "still serving"
