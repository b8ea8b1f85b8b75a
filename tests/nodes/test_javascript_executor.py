"""Specification of the `javascript` node executor."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from nodes.javascript import JavaScriptExecutor
from schemas.tasks import NodeTask
from tests.nodes import support


def make_task(code: str, **fields: Any) -> NodeTask:
    return support.make_task(code, node_type="javascript", **fields)


@pytest_asyncio.fixture(scope="module")
async def executor() -> AsyncIterator[JavaScriptExecutor]:
    """One executor for the module; its small caps keep the cap tests quick."""
    running = JavaScriptExecutor(memory_limit_mb=32, output_cap_bytes=1024, result_cap_bytes=4096)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_returns_the_entrypoints_value(executor: JavaScriptExecutor) -> None:
    outcome = await executor.execute(make_task("function main() { return {answer: 42, items: [1, 'a']}; }"))
    assert outcome.ok, outcome.error_message
    assert outcome.output == {"answer": 42, "items": [1, "a"]}
    assert outcome.duration_ms > 0


async def test_passes_inputs_as_one_object_to_a_named_entrypoint(executor: JavaScriptExecutor) -> None:
    task = make_task(
        "const total = ({prices}) => prices.reduce((a, b) => a + b, 0);",
        config={"entrypoint": "total"},
        inputs={"prices": [1.5, 2.5, 6]},
    )
    outcome = await executor.execute(task)
    assert outcome.ok, outcome.error_message
    assert outcome.output == 10


async def test_undefined_result_becomes_null(executor: JavaScriptExecutor) -> None:
    outcome = await executor.execute(make_task("function main() {}"))
    assert outcome.ok, outcome.error_message
    assert outcome.output is None


async def test_awaits_a_returned_promise(executor: JavaScriptExecutor) -> None:
    code = """
        async function main({n}) {
          await new Promise((resolve) => setTimeout(resolve, 10));
          return n + 1;
        }
    """
    outcome = await executor.execute(make_task(code, inputs={"n": 1}))
    assert outcome.ok, outcome.error_message
    assert outcome.output == 2


async def test_console_log_is_captured_into_stdout(executor: JavaScriptExecutor) -> None:
    code = """
        function main() {
          console.log("hello", {a: 1}, [2]);
          console.error("careful");
          return null;
        }
    """
    outcome = await executor.execute(make_task(code))
    assert outcome.ok, outcome.error_message
    assert outcome.stdout == 'hello {"a":1} [2]\n'
    assert outcome.stderr == "careful\n"


async def test_console_output_is_capped(executor: JavaScriptExecutor) -> None:
    code = """
        function main() {
          for (let i = 0; i < 10000; i++) console.log("line " + i);
          return "done";
        }
    """
    outcome = await executor.execute(make_task(code))
    assert outcome.ok, outcome.error_message
    assert outcome.stdout.startswith("line 0\nline 1\n")
    assert outcome.stdout.endswith("... [truncated]")
    assert len(outcome.stdout.encode()) <= 1024 + len("\n... [truncated]")


async def test_console_output_is_kept_when_the_attempt_fails(executor: JavaScriptExecutor) -> None:
    code = """
        function main() {
          console.log("before");
          throw new Error("after");
        }
    """
    outcome = await executor.execute(make_task(code))
    assert not outcome.ok
    assert outcome.stdout == "before\n"


async def test_js_exception_reports_its_class_message_and_stack(executor: JavaScriptExecutor) -> None:
    code = """
        function main() {
          return null.field;
        }
    """
    outcome = await executor.execute(make_task(code))
    assert not outcome.ok
    assert outcome.error_class == "TypeError"
    assert outcome.error_message is not None
    assert "Cannot read properties of null (reading 'field')" in outcome.error_message
    assert "at main (config.code:3:" in outcome.error_message


async def test_custom_error_names_become_the_error_class(executor: JavaScriptExecutor) -> None:
    code = """
        class QuotaExceeded extends Error { constructor(m) { super(m); this.name = "QuotaExceeded"; } }
        function main() { throw new QuotaExceeded("too many calls"); }
    """
    outcome = await executor.execute(make_task(code))
    assert outcome.error_class == "QuotaExceeded"
    assert "too many calls" in (outcome.error_message or "")


async def test_rejected_promise_reports_the_error(executor: JavaScriptExecutor) -> None:
    outcome = await executor.execute(make_task("async function main() { throw new RangeError('late'); }"))
    assert outcome.error_class == "RangeError"
    assert "late" in (outcome.error_message or "")


async def test_syntax_error_names_the_position(executor: JavaScriptExecutor) -> None:
    code = "function main() {\n  return 1 +;\n}\n"
    outcome = await executor.execute(make_task(code))
    assert not outcome.ok
    assert outcome.error_class == "SyntaxError"
    assert "line 2, column 13" in (outcome.error_message or "")
    assert "Unexpected token ';'" in (outcome.error_message or "")


async def test_missing_entrypoint_is_reported(executor: JavaScriptExecutor) -> None:
    outcome = await executor.execute(make_task("function helper() { return 1; }"))
    assert outcome.error_class == "EntrypointNotFound"
    assert "'main'" in (outcome.error_message or "")


async def test_infinite_loop_times_out_and_the_executor_keeps_working() -> None:
    # One worker thread: the next attempt can only run if the timed-out one freed it.
    single = JavaScriptExecutor(max_concurrency=1)
    await single.start()
    try:
        started = time.monotonic()
        outcome = await single.execute(make_task("function main() { while (true) {} }", timeout_seconds=0.5))
        assert time.monotonic() - started < 2.0
        assert outcome.error_class == "Timeout"
        assert "0.5 s" in (outcome.error_message or "")

        started = time.monotonic()
        after = await single.execute(make_task("function main() { return 'alive'; }"))
        assert after.output == "alive"
        assert time.monotonic() - started < 0.5
    finally:
        await single.stop()


async def test_runaway_async_continuation_times_out(executor: JavaScriptExecutor) -> None:
    code = "async function main() { await null; while (true) {} }"
    outcome = await executor.execute(make_task(code, timeout_seconds=0.3))
    assert outcome.error_class == "Timeout"
    after = await executor.execute(make_task("function main() { return 1; }"))
    assert after.output == 1


async def test_memory_exhaustion_is_contained(executor: JavaScriptExecutor) -> None:
    code = """
        function main() {
          const hoard = [];
          while (true) hoard.push(new Array(100000).fill(1));
        }
    """
    outcome = await executor.execute(make_task(code))
    assert outcome.error_class == "MemoryLimit"
    assert "32 MiB" in (outcome.error_message or "")
    after = await executor.execute(make_task("function main() { return 'alive'; }"))
    assert after.output == "alive"


async def test_non_json_result_is_rejected(executor: JavaScriptExecutor) -> None:
    for code in ("function main() { return () => 1; }", "function main() { return 10n; }"):
        outcome = await executor.execute(make_task(code))
        assert outcome.error_class == "ResultNotJSON", code


async def test_oversized_result_is_rejected(executor: JavaScriptExecutor) -> None:
    outcome = await executor.execute(make_task("function main() { return 'x'.repeat(5000); }"))
    assert outcome.error_class == "ResultTooLarge"
    assert "4096-byte" in (outcome.error_message or "")


async def test_multibyte_result_is_measured_in_bytes(executor: JavaScriptExecutor) -> None:
    outcome = await executor.execute(make_task("function main() { return 'é'.repeat(3000); }"))
    assert outcome.error_class == "ResultTooLarge"


async def test_no_module_process_or_network_access(executor: JavaScriptExecutor) -> None:
    code = """
        function main() {
          return [typeof require, typeof process, typeof fetch, typeof XMLHttpRequest, typeof Deno];
        }
    """
    outcome = await executor.execute(make_task(code))
    assert outcome.output == ["undefined"] * 5


async def test_globals_do_not_leak_between_attempts(executor: JavaScriptExecutor) -> None:
    first = await executor.execute(make_task("globalThis.secret = 's3cret'; function main() { return 1; }"))
    assert first.ok, first.error_message
    second = await executor.execute(make_task("function main() { return typeof secret; }"))
    assert second.output == "undefined"


async def test_ten_concurrent_attempts_complete(executor: JavaScriptExecutor) -> None:
    tasks = [make_task("function main({i}) { return i * i; }", inputs={"i": i}) for i in range(10)]
    outcomes = await asyncio.gather(*(executor.execute(task) for task in tasks))
    assert [outcome.output for outcome in outcomes] == [i * i for i in range(10)]


async def test_event_loop_keeps_running_during_a_long_js_loop(executor: JavaScriptExecutor) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    try:
        code = "function main() { const end = Date.now() + 600; while (Date.now() < end) {} return 'done'; }"
        outcome = await executor.execute(make_task(code))
    finally:
        ticking.cancel()
    assert outcome.output == "done"
    assert ticks >= 8


async def test_execute_before_start_fails_cleanly() -> None:
    outcome = await JavaScriptExecutor().execute(make_task("function main() {}"))
    assert outcome.error_class == "ExecutorUnavailable"
