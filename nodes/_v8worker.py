"""The javascript node's worker: a sandboxed process that runs attempts one at a time, each in a
fresh V8 isolate.

Run as `python -S -B -m nodes._v8worker CONFIG_JSON` (see `WorkerConfig`), inside the sandbox
that `nodes.sandbox` builds, with only the `py_mini_racer` package bound in beside the sandbox's
own modules. On start it ties its life to its parent, becomes the unprivileged sandbox uid in a
user namespace of its own (when bubblewrap started it as root), initialises V8 and runs one
isolate to prove it works, and only then lowers its limits, drops every capability and installs
the seccomp filter. Then it says it is ready, in a first frame giving its data memory limit.

The engine talks to it over its stdin and stdout: length-prefixed JSON frames, one request (an
`Attempt`) answered by one reply, then the next. stdout is moved aside for that before anything
else, so nothing V8 or Python prints can corrupt a frame; it goes to stderr, the engine's log.
A fault in V8 ends this process only: the engine fails the attempt it ran and starts another.

Imports only the standard library, `nodes._confine` and `py_mini_racer`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import resource
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import IO, Any, NoReturn

from py_mini_racer import (
    JSEvalException,
    JSOOMException,
    JSParseException,
    JSTimeoutException,
    MiniRacer,
    init_mini_racer,
    mini_racer,
)

from nodes import _confine

FRAME_HEADER = struct.Struct(">I")

# The name V8 gives the user's script in stack traces, so frames point at the config field.
SOURCE_NAME = "config.code"
IDENTIFIER = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]*$")
# How often to look whether a Promise returned by the entrypoint has settled.
PROMISE_POLL_SECONDS = 0.005
# Budget for reading a failed attempt's captured output; a runaway isolate must not hold us up.
OUTPUT_RESCUE_SECONDS = 0.2
STACK_FRAMES_KEPT = 10
TRUNCATION_MARK = "\n... [truncated]"
# An error's message is the user's text (`throw new Error(huge)`); the reply must stay bounded.
ERROR_MESSAGE_CAP_CHARS = 16 * 1024
# "config.code:3: TypeError: message" or "<anonymous>:3: SyntaxError: message", then the
# offending source line, then a caret under the position.
V8_MESSAGE = re.compile(r"^[^\n]*?:(?P<line>\d+): (?:(?P<name>[A-Za-z_$][\w$]*): )?(?P<message>[^\n]*)")

# Threads, not processes, are what this process makes: the main one, mini-racer's event loop,
# and one per isolate (a freed isolate's may still be ending as the next one starts).
PROCESS_COUNT_LIMIT = 16
OPEN_FILES_LIMIT = 64
# V8 writes no files; this only bounds what a compromised worker could write to its /tmp.
FILE_SIZE_LIMIT_BYTES = 1024 * 1024
# Data memory beyond what V8 holds once warmed up (measured at start, about 550 MiB of mostly
# reserved ranges): an isolate's heap grows to about twice its hard limit before mini-racer stops
# it (it checks at garbage collections), and ArrayBuffers live outside the heap and its limit.
# Past this, allocations fail (a RangeError in JavaScript, or V8 aborts and the worker ends).
HEAP_HEADROOM_FACTOR = 3
DATA_HEADROOM_BYTES = 256 * 1024 * 1024

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


@dataclass(frozen=True)
class WorkerConfig:
    """What the engine tells a worker, as one JSON argument; the same for all its attempts."""

    memory_limit_mb: int
    output_cap_bytes: int
    result_cap_bytes: int
    # Under bubblewrap, in a user namespace of its own: bubblewrap's, or when started as root,
    # one the worker makes as `sandbox_uid`. Without it (isolation=rlimits) it keeps its uid.
    sandboxed: bool
    sandbox_uid: int = 65534
    # The engine's pid, when nothing else (bubblewrap) ties our life to it.
    parent_pid: int = 0

    @classmethod
    def parse(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))

    def dumps(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@dataclass(frozen=True)
class Attempt:
    """What one isolate needs to run one attempt: the request frame's content."""

    node_id: str
    code: str
    entrypoint: str
    inputs_json: str
    timeout_seconds: float

    @classmethod
    def parse(cls, payload: bytes) -> Attempt:
        return cls(**json.loads(payload))

    def dumps(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()


class AttemptFailed(Exception):
    """An attempt ended without a result; carries the outcome's error class and message."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message


def serve(config: WorkerConfig) -> NoReturn:
    """Confine this process around a working V8, then answer requests until the engine hangs up."""
    _confine.die_with_parent()
    if config.parent_pid and os.getppid() != config.parent_pid:
        os._exit(0)
    requests, replies = _take_channel()
    if config.sandboxed and os.geteuid() == 0:
        # Before V8 starts threads: a multithreaded process cannot enter a user namespace.
        _confine.enter_user_namespace(config.sandbox_uid, config.sandbox_uid)
    runner = IsolateRunner(config, _start_v8())
    runner.warm_up()
    data_limit = _data_limit_bytes(config.memory_limit_mb, _data_in_use())
    _confine_worker(config, data_limit)
    _write_frame(replies, json.dumps({"data_limit_bytes": data_limit}).encode())
    while (request := _read_frame(requests)) is not None:
        _write_frame(replies, runner.reply(Attempt.parse(request)))
    # Skipping interpreter teardown: V8's threads may still be running, and nothing needs saving.
    os._exit(0)


def _take_channel() -> tuple[IO[bytes], IO[bytes]]:
    """The engine's pipes, on descriptors of their own; stdout then points at stderr."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    return requests, replies


def _start_v8() -> asyncio.AbstractEventLoop:
    """Initialise V8 and the event loop mini-racer reports through; returns that loop."""
    # On the main thread: initialised from a helper thread, V8 crashed (SIGSEGV) as soon as
    # two isolates ran at once (mini-racer 0.14, seen on AMD EPYC).
    init_mini_racer(ignore_duplicate_init=True)
    # One loop on its own thread outlives every isolate, so late reports from terminated
    # isolates land safely.
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="citadel-javascript-v8", daemon=True).start()
    return loop


def _confine_worker(config: WorkerConfig, data_limit: int) -> None:
    """Everything that narrows the worker, once V8 has what it needs to start."""
    limits = {
        resource.RLIMIT_NOFILE: OPEN_FILES_LIMIT,
        resource.RLIMIT_FSIZE: FILE_SIZE_LIMIT_BYTES,
        resource.RLIMIT_DATA: data_limit,
    }
    if config.sandboxed:
        # In a user namespace of its own, the kernel counts this process's threads alone; outside
        # one, it would count every process of the engine's user against the limit.
        limits[resource.RLIMIT_NPROC] = PROCESS_COUNT_LIMIT
    _confine.confine(limits)
    # Once the uid maps are written: no core dump of V8's heap, no ptrace by another process of
    # the sandbox uid.
    _confine.set_dumpable(False)


def _data_limit_bytes(memory_limit_mb: int, in_use: int) -> int:
    """RLIMIT_DATA for a worker whose isolates may hold `memory_limit_mb`, given what V8 uses idle."""
    return in_use + HEAP_HEADROOM_FACTOR * memory_limit_mb * 2**20 + DATA_HEADROOM_BYTES


def _data_in_use() -> int:
    """This process's data memory as RLIMIT_DATA counts it (VmData), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/self/status has no VmData line")


def _read_frame(stream: IO[bytes]) -> bytes | None:
    """The next request, or None once the engine has closed the pipe."""
    header = stream.read(FRAME_HEADER.size)
    if len(header) < FRAME_HEADER.size:
        return None
    (length,) = FRAME_HEADER.unpack(header)
    payload = stream.read(length)
    return payload if len(payload) == length else None


def _write_frame(stream: IO[bytes], payload: bytes) -> None:
    stream.write(FRAME_HEADER.pack(len(payload)) + payload)
    stream.flush()


class IsolateRunner:
    """Runs attempts, each in a fresh isolate, and turns each into its reply frame."""

    def __init__(self, config: WorkerConfig, v8_loop: asyncio.AbstractEventLoop) -> None:
        self.memory_limit_mb = config.memory_limit_mb
        self.output_cap_bytes = config.output_cap_bytes
        self.result_cap_bytes = config.result_cap_bytes
        self._prelude = PRELUDE % {
            "output_cap": config.output_cap_bytes,
            "result_cap": config.result_cap_bytes,
        }
        self._v8_loop = v8_loop

    def warm_up(self) -> None:
        """Run one attempt before confinement: V8 maps what it needs, and must be seen to work."""
        warm_up = Attempt("warm-up", "function main() { return 1; }", "main", "{}", 10.0)
        reply = json.loads(self.reply(warm_up))
        if reply.get("ok") is not True:
            raise RuntimeError(f"V8 could not run a trivial attempt: {reply}")

    def reply(self, attempt: Attempt) -> bytes:
        """The reply frame for one attempt, whatever happens in it."""
        try:
            result, stdout, stderr = self._run(attempt)
        except Exception:
            # Our fault or V8's, not the node's: in the engine's log, and this worker retires.
            traceback.print_exc()
            failure = AttemptFailed(
                "ExecutorError",
                f"the JavaScript worker failed while running node {attempt.node_id!r} (see the "
                "engine's log); the worker is replaced and the attempt can be retried",
            )
            return _reply(failure, "", "", retire=True)
        # After running out of memory the heap stays large: a fresh worker gives it back.
        retire = isinstance(result, AttemptFailed) and result.error_class == "MemoryLimit"
        return _reply(result, stdout, stderr, retire)

    def _run(self, attempt: Attempt) -> tuple[str | AttemptFailed, str, str]:
        """Run one attempt in a fresh isolate: its result as JSON text or its failure, and output."""
        deadline = time.monotonic() + attempt.timeout_seconds
        # Leaving the context frees the isolate, which also terminates anything still running in it.
        with mini_racer(event_loop=self._v8_loop) as racer:
            racer.set_hard_memory_limit(self.memory_limit_mb * 1024 * 1024)
            try:
                output = self._call(racer, attempt, deadline)
            except AttemptFailed as exc:
                return (exc, *self._output(racer, OUTPUT_RESCUE_SECONDS))
            return (output, *self._output(racer, max(deadline - time.monotonic(), OUTPUT_RESCUE_SECONDS)))

    def _call(self, racer: MiniRacer, attempt: Attempt, deadline: float) -> str:
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

    def _result(self, attempt: Attempt, report: dict[str, Any]) -> str:
        """The entrypoint's result as JSON text (V8's own: the engine decodes it once), or why not."""
        kind = report["kind"]
        if kind == "ok":
            text = str(report["text"])
            size = len(text.encode())
            if size > self.result_cap_bytes:
                raise self._too_large(attempt, size)
            return text
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


def _reply(result: str | AttemptFailed, stdout: str, stderr: str, retire: bool) -> bytes:
    """The reply frame's payload; `retire` asks the engine to replace this worker after it."""
    fields: dict[str, Any] = {"stdout": stdout, "stderr": stderr, "retire": retire}
    if isinstance(result, AttemptFailed):
        message = result.message
        if len(message) > ERROR_MESSAGE_CAP_CHARS:
            message = message[:ERROR_MESSAGE_CAP_CHARS] + TRUNCATION_MARK
        return json.dumps(
            {"ok": False, "error_class": result.error_class, "error_message": message, **fields}
        ).encode()
    # V8's JSON is spliced in rather than decoded and encoded again.
    return (json.dumps({"ok": True, **fields})[:-1] + ', "output": ' + result + "}").encode()


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


if __name__ == "__main__":
    serve(WorkerConfig.parse(sys.argv[1]))
