"""The `javascript` node executor: runs user code in a fresh, limited V8 isolate per attempt."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from py_mini_racer import (
    JSEvalException,
    JSOOMException,
    JSParseException,
    JSTimeoutException,
    MiniRacer,
    init_mini_racer,
    mini_racer,
)

from schemas.tasks import NodeOutcome, NodeTask

# The name V8 gives the user's script in stack traces, so frames point at the config field.
SOURCE_NAME = "config.code"
IDENTIFIER = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
# How often to look whether a Promise returned by the entrypoint has settled.
PROMISE_POLL_SECONDS = 0.005
# Budget for reading a failed attempt's captured output; a runaway isolate must not hold us up.
OUTPUT_RESCUE_SECONDS = 0.2
STACK_FRAMES_KEPT = 10
TRUNCATION_MARK = "\n... [truncated]"
# "config.code:3: TypeError: message" or "<anonymous>:3: SyntaxError: message", then the
# offending source line, then a caret under the position.
V8_MESSAGE = re.compile(r"^[^\n]*?:(?P<line>\d+): (?:(?P<name>[A-Za-z_$][\w$]*): )?(?P<message>[^\n]*)")

# Installed before the user's code: replaces `console` with capped capture and exposes
# the driver that calls the entrypoint and serialises its result inside V8. It keeps its
# own references to JSON and eval so user code that overwrites them cannot confuse it.
PRELUDE = """
(() => {
  const stringify = JSON.stringify;
  const parse = JSON.parse;
  const globalEval = eval;
  const outputCap = %(output_cap)d;
  const resultCap = %(result_cap)d;
  const streams = {stdout: {text: "", truncated: false}, stderr: {text: "", truncated: false}};
  let settled = null;

  const format = (value) => {
    try {
      if (typeof value === "string") return value;
      if (value instanceof Error) return String(value.stack || value);
      const text = stringify(value);
      return text === undefined ? String(value) : text;
    } catch (e) {
      return Object.prototype.toString.call(value);
    }
  };
  const writer = (name) => (...args) => {
    const stream = streams[name];
    if (stream.truncated) return;
    stream.text += args.map(format).join(" ") + "\\n";
    // Characters never outnumber UTF-8 bytes, so past the cap in characters is past it in bytes.
    if (stream.text.length > outputCap) {
      stream.text = stream.text.slice(0, outputCap);
      stream.truncated = true;
    }
  };
  globalThis.console = {
    log: writer("stdout"), info: writer("stdout"), debug: writer("stdout"),
    warn: writer("stderr"), error: writer("stderr"),
  };

  const thrown = (e) => {
    if (e instanceof Error) {
      return {kind: "error", name: String(e.name), message: String(e.message), stack: String(e.stack || "")};
    }
    return {kind: "error", name: "Error", message: "threw a non-Error value: " + format(e), stack: ""};
  };
  const finish = (value) => {
    if (value === undefined) return stringify({kind: "ok", text: "null"});
    if (typeof value === "function" || typeof value === "symbol") {
      return stringify({kind: "notjson", reason: "it is a " + typeof value});
    }
    let text;
    try {
      text = stringify(value);
    } catch (e) {
      return stringify({kind: "notjson", reason: String(e && e.message)});
    }
    if (text === undefined) return stringify({kind: "notjson", reason: "JSON.stringify gave undefined"});
    if (text.length > resultCap) return stringify({kind: "toolarge", size: text.length});
    return stringify({kind: "ok", text: text});
  };
  const isThenable = (value) => {
    try {
      return value !== null && (typeof value === "object" || typeof value === "function")
        && typeof value.then === "function";
    } catch (e) {
      return false;
    }
  };

  const driver = {
    run(name, inputsText) {
      let entry;
      try {
        entry = globalEval(name);
      } catch (e) {
        entry = undefined;
      }
      if (typeof entry !== "function") return stringify({kind: "missing", found: typeof entry});
      let value;
      try {
        value = entry(parse(inputsText));
      } catch (e) {
        return stringify(thrown(e));
      }
      if (!isThenable(value)) return finish(value);
      Promise.resolve(value).then(
        (resolved) => { settled = finish(resolved); },
        (e) => { settled = stringify(thrown(e)); },
      );
      return stringify({kind: "pending"});
    },
    settled() { return settled; },
    output() { return stringify(streams); },
  };
  Object.defineProperty(globalThis, "__citadel", {value: Object.freeze(driver)});
})();
"""


class InvalidTask(ValueError):
    """The task's config or inputs cannot be handed to V8."""


class AttemptFailed(Exception):
    """An attempt ended without a result; carries the outcome's error class and message."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message


@dataclass(frozen=True)
class Attempt:
    """What one isolate needs to run one attempt."""

    node_id: str
    code: str
    entrypoint: str
    inputs_json: str
    timeout_seconds: float


class JavaScriptExecutor:
    """Runs `javascript` nodes: each attempt in a fresh V8 isolate, on a bounded thread pool.

    `config["code"]` defines a function named `config.get("entrypoint", "main")`, which is
    called as `main(inputs)`; its JSON-serialisable return value (or what a returned
    Promise resolves to) is the output. V8 alone has no network, file or process access.
    """

    node_types: tuple[str, ...] = ("javascript",)

    def __init__(
        self,
        max_concurrency: int = 4,
        memory_limit_mb: int = 128,
        output_cap_bytes: int = 64 * 1024,
        result_cap_bytes: int = 1024 * 1024,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.memory_limit_mb = memory_limit_mb
        self.output_cap_bytes = output_cap_bytes
        self.result_cap_bytes = result_cap_bytes
        self._prelude = PRELUDE % {"output_cap": output_cap_bytes, "result_cap": result_cap_bytes}
        self._slots = asyncio.Semaphore(max_concurrency)
        self._pool: ThreadPoolExecutor | None = None
        # mini-racer delivers V8's results through an asyncio loop; one shared loop on its own
        # thread outlives every isolate, so late reports from terminated isolates land safely.
        self._v8_loop: asyncio.AbstractEventLoop | None = None
        self._v8_thread: threading.Thread | None = None

    async def start(self) -> None:
        if self._pool is not None:
            return
        # V8 initialises once per process; doing it here keeps the first attempts from racing it.
        # On the calling thread: initialised from a helper thread, V8 crashed (SIGSEGV) as soon as
        # two isolates ran at once (mini-racer 0.14, seen on AMD EPYC).
        init_mini_racer(ignore_duplicate_init=True)
        self._v8_loop = asyncio.new_event_loop()
        self._v8_thread = threading.Thread(
            target=self._v8_loop.run_forever, name="citadel-javascript-v8", daemon=True
        )
        self._v8_thread.start()
        self._pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="citadel-javascript")

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Running attempts end by their own deadlines, so this wait is bounded.
            await asyncio.to_thread(pool.shutdown, wait=True)
        loop, self._v8_loop = self._v8_loop, None
        thread, self._v8_thread = self._v8_thread, None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)
            loop.close()

    async def execute(self, task: NodeTask) -> NodeOutcome:
        pool, v8_loop = self._pool, self._v8_loop
        if pool is None or v8_loop is None:
            return NodeOutcome.failure(
                "ExecutorUnavailable", "the javascript executor is not started; call start() first"
            )
        try:
            attempt = _attempt(task)
        except InvalidTask as exc:
            return NodeOutcome.failure(type(exc).__name__, str(exc))
        async with self._slots:
            # Time spent waiting for a slot is the engine's, not the node's.
            started = time.perf_counter()
            outcome = await asyncio.get_running_loop().run_in_executor(pool, self._run, attempt, v8_loop)
            outcome.duration_ms = (time.perf_counter() - started) * 1000
            return outcome

    def _run(self, attempt: Attempt, v8_loop: asyncio.AbstractEventLoop) -> NodeOutcome:
        """Run one attempt in a fresh isolate; blocks its pool thread until the isolate is gone."""
        deadline = time.monotonic() + attempt.timeout_seconds
        # Leaving the context frees the isolate, which also terminates anything still running in it.
        with mini_racer(event_loop=v8_loop) as racer:
            racer.set_hard_memory_limit(self.memory_limit_mb * 1024 * 1024)
            try:
                output = self._call(racer, attempt, deadline)
            except AttemptFailed as exc:
                stdout, stderr = self._output(racer, OUTPUT_RESCUE_SECONDS)
                return NodeOutcome.failure(exc.error_class, exc.message, stdout=stdout, stderr=stderr)
            stdout, stderr = self._output(racer, max(deadline - time.monotonic(), OUTPUT_RESCUE_SECONDS))
            return NodeOutcome.success(output, 0.0, stdout, stderr)

    def _call(self, racer: MiniRacer, attempt: Attempt, deadline: float) -> Any:
        self._eval(racer, attempt, self._prelude, deadline)
        self._eval(racer, attempt, f"{attempt.code}\n//# sourceURL={SOURCE_NAME}\n", deadline)
        report = json.loads(
            self._eval(
                racer,
                attempt,
                f"__citadel.run({json.dumps(attempt.entrypoint)}, {json.dumps(attempt.inputs_json)})",
                deadline,
            )
        )
        while report["kind"] == "pending":
            if time.monotonic() >= deadline:
                raise _timeout(attempt)
            time.sleep(PROMISE_POLL_SECONDS)
            settled = self._eval(racer, attempt, "__citadel.settled()", deadline)
            if settled is not None:
                report = json.loads(settled)
        return self._result(attempt, report)

    def _eval(self, racer: MiniRacer, attempt: Attempt, code: str, deadline: float) -> Any:
        """Evaluate code under what is left of the attempt's time, translating V8's failures."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout(attempt)
        try:
            return racer.eval(code, timeout_sec=remaining)
        except JSTimeoutException:
            raise _timeout(attempt) from None
        except JSOOMException:
            raise self._memory_limit(attempt) from None
        except JSParseException as exc:
            raise _syntax_error(attempt, str(exc)) from None
        except JSEvalException as exc:
            if racer.was_hard_memory_limit_reached():
                raise self._memory_limit(attempt) from None
            raise _top_level_error(str(exc)) from None

    def _result(self, attempt: Attempt, report: dict[str, Any]) -> Any:
        kind = report["kind"]
        if kind == "ok":
            text = str(report["text"])
            size = len(text.encode())
            if size > self.result_cap_bytes:
                raise self._too_large(attempt, size)
            return json.loads(text)
        if kind == "toolarge":
            raise self._too_large(attempt, int(report["size"]))
        if kind == "missing":
            raise AttemptFailed(
                "EntrypointNotFound",
                f"node {attempt.node_id!r} has no function named {attempt.entrypoint!r} in "
                f"config.code (found: {report['found']}); define `function {attempt.entrypoint}"
                "(inputs) { ... }` or set config.entrypoint to the function's name",
            )
        if kind == "notjson":
            raise AttemptFailed(
                "ResultNotJSON",
                f"node {attempt.node_id!r} returned a value that is not JSON ({report['reason']}); "
                "return objects, arrays, strings, numbers, booleans or null",
            )
        name = str(report["name"])
        message = str(report["message"])
        frames = _user_frames(str(report["stack"]))
        raise AttemptFailed(
            name if IDENTIFIER.match(name) else "Error",
            f"{name}: {message}" + (f"\n{frames}" if frames else ""),
        )

    def _output(self, racer: MiniRacer, budget_seconds: float) -> tuple[str, str]:
        """The attempt's captured console output, or none if the isolate cannot give it in time."""
        try:
            report = racer.eval("__citadel.output()", timeout_sec=budget_seconds)
        except JSEvalException:
            # The prelude may never have run, or the isolate is still stuck or out of memory.
            return "", ""
        streams = json.loads(str(report))
        return self._capped(streams["stdout"]), self._capped(streams["stderr"])

    def _capped(self, stream: dict[str, Any]) -> str:
        text = str(stream["text"])
        data = text.encode()
        if not stream["truncated"] and len(data) <= self.output_cap_bytes:
            return text
        return data[: self.output_cap_bytes].decode(errors="ignore") + TRUNCATION_MARK

    def _memory_limit(self, attempt: Attempt) -> AttemptFailed:
        return AttemptFailed(
            "MemoryLimit",
            f"node {attempt.node_id!r} used more than its {self.memory_limit_mb} MiB JavaScript "
            "memory limit and was stopped; process the data in smaller pieces",
        )

    def _too_large(self, attempt: Attempt, size: int) -> AttemptFailed:
        return AttemptFailed(
            "ResultTooLarge",
            f"node {attempt.node_id!r} returned a result of at least {size} bytes as JSON, over "
            f"the {self.result_cap_bytes}-byte limit; return less, or a reference to where the data is",
        )


def _attempt(task: NodeTask) -> Attempt:
    code = task.config.get("code")
    if not isinstance(code, str) or not code.strip():
        raise InvalidTask(f"node {task.node_id!r} has no JavaScript source in config.code")
    entrypoint = task.config.get("entrypoint", "main")
    if not isinstance(entrypoint, str) or not IDENTIFIER.match(entrypoint):
        raise InvalidTask(
            f"node {task.node_id!r} has config.entrypoint {entrypoint!r}; "
            "it must be the name of a function defined in config.code"
        )
    try:
        inputs_json = json.dumps(task.inputs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidTask(f"node {task.node_id!r} has inputs that are not JSON: {exc}") from None
    return Attempt(task.node_id, code, entrypoint, inputs_json, task.timeout_seconds)


def _timeout(attempt: Attempt) -> AttemptFailed:
    return AttemptFailed(
        "Timeout",
        f"node {attempt.node_id!r} did not finish within its {attempt.timeout_seconds:g} s timeout; "
        "its JavaScript was terminated",
    )


def _syntax_error(attempt: Attempt, v8_message: str) -> AttemptFailed:
    match = V8_MESSAGE.match(v8_message)
    if match is None:
        return AttemptFailed("SyntaxError", f"config.code of node {attempt.node_id!r}: {v8_message}")
    lines = v8_message.split("\n")
    source, caret = (lines[1], lines[2]) if len(lines) > 2 else ("", "")
    column = caret.find("^") + 1
    if int(match["line"]) > len(attempt.code.splitlines()):
        # V8 points past the user's code (at the sourceURL line) when the code ends too early.
        where, excerpt = "the end of the code", ""
    else:
        where = f"line {match['line']}" + (f", column {column}" if column else "")
        excerpt = f"\n{source}\n{caret}" if column else ""
    return AttemptFailed(
        "SyntaxError",
        f"config.code of node {attempt.node_id!r} has a syntax error at {where}: {match['message']}{excerpt}",
    )


def _top_level_error(v8_message: str) -> AttemptFailed:
    """An exception thrown while config.code itself ran, before the entrypoint was called."""
    match = V8_MESSAGE.match(v8_message)
    if match is None:
        return AttemptFailed("Error", v8_message.strip())
    name = match["name"] or "Error"
    frames = _user_frames(v8_message)
    return AttemptFailed(
        name,
        f"{name}: {match['message']} (thrown at line {match['line']} of config.code, "
        "outside the entrypoint)" + (f"\n{frames}" if frames else ""),
    )


def _user_frames(stack: str) -> str:
    """The stack frames in the user's code; the executor's own frames would only confuse."""
    frames = [line.strip() for line in stack.split("\n") if line.strip().startswith("at ")]
    return "\n".join([frame for frame in frames if SOURCE_NAME in frame][:STACK_FRAMES_KEPT])
