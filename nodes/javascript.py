"""The `javascript` node executor: runs user code in a fresh, limited V8 isolate per attempt, inside
sandboxed worker processes (`nodes._v8worker`), never in the engine's own process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import py_mini_racer

from nodes import _confine, _v8worker
from nodes._v8worker import IDENTIFIER, Attempt
from nodes.sandbox import (
    SANDBOX_ROOT,
    ZYGOTE_TMP_BYTES,
    AllowList,
    Isolation,
    allow_list,
    bubblewrap_command,
    bubblewrap_unless_rlimits,
    interpreter,
    privileged,
)
from schemas.tasks import NodeOutcome, NodeTask

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ISOLATION_SETTING_HINT = 'JavaScriptExecutor(isolation="rlimits")'
# Who the workers run as on the host when the engine runs as root (nobody).
DEFAULT_SANDBOX_UID = 65534
# Only mini-racer's package is bound in, at /citadel/lib/py_mini_racer: not the site-packages.
MINI_RACER_DIR = os.path.dirname(os.path.realpath(py_mini_racer.__file__))
SANDBOX_LIBRARIES = f"{SANDBOX_ROOT}/lib"
WORKER_STARTUP_TIMEOUT_SECONDS = 10.0
WORKER_STOP_TIMEOUT_SECONDS = 2.0
# How long the engine waits past an attempt's timeout before it kills a worker that has not
# answered: the worker stops the isolate itself at the timeout, then reads its output and frees it.
DEADLINE_GRACE_SECONDS = 2.0
# How long a worker whose pipe closed gets to exit, so that we can say how it ended.
ENDING_WAIT_SECONDS = 1.0
# Room in a reply frame for its envelope beyond the result, the output and the error message.
REPLY_OVERHEAD_BYTES = 64 * 1024
# Stream buffer for a worker's pipes: a reply of a result at the cap passes without many pauses.
PIPE_BUFFER_BYTES = 1024 * 1024
# What a worker may write to the engine's log (faults only: user code's console is captured).
WORKER_LOG_BYTES = 64 * 1024
# What a worker started by root keeps: becoming the sandbox uid, which then drops them all.
WORKER_CAPABILITIES = ("CAP_SETUID", "CAP_SETGID")

SIGNAL_HINTS = {
    signal.SIGKILL: "killed from outside the worker, often by the kernel when memory ran out",
    signal.SIGSEGV: "V8 crashed",
    signal.SIGTRAP: "V8 stopped itself on a fatal error, such as running out of memory",
    signal.SIGABRT: "V8 aborted on a fatal error, such as running out of memory",
}


class InvalidTask(ValueError):
    """The task's config or inputs cannot be handed to V8."""


class WorkerStartError(RuntimeError):
    """A JavaScript worker process did not come up."""


class WorkerEnded(Exception):
    """A worker's pipes closed before its reply: it crashed, or was killed. Says how it ended."""


class MalformedReply(Exception):
    """A worker sent something other than a reply frame within the size limit."""


class WorkerProcess:
    """The engine's handle on one worker process: starts it, runs one attempt at a time in it
    over its pipes, and kills it. Under bubblewrap the process started is bwrap; `pid` is the
    worker's own, two levels down."""

    def __init__(self, command: list[str], environment: dict[str, str], reply_limit: int) -> None:
        self.command = command
        self.environment = environment
        self.reply_limit = reply_limit
        self.pid: int | None = None
        # RLIMIT_DATA, as the worker set it once V8 had warmed up.
        self.data_limit_bytes = 0
        # The node whose attempt runs in it now, if any.
        self.running: str | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._log: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def launch(self) -> None:
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.environment,
                cwd="/",
                limit=PIPE_BUFFER_BYTES,
                # Out of the engine's session, so a Ctrl-C meant for the engine does not reach it.
                start_new_session=True,
            )
        except OSError as exc:
            raise WorkerStartError(
                f"a JavaScript worker ({' '.join(self.command)}) could not start: {exc}"
            ) from None
        self._process = process
        assert process.stderr is not None
        self._log = asyncio.create_task(_log_stderr(process.stderr, process.pid))
        try:
            async with asyncio.timeout(WORKER_STARTUP_TIMEOUT_SECONDS):
                hello = await self._receive()
            self.data_limit_bytes = int(hello["data_limit_bytes"])
        except (TimeoutError, WorkerEnded, MalformedReply, KeyError, TypeError, ValueError) as exc:
            await self.close()
            raise WorkerStartError(
                f"a JavaScript worker ({' '.join(self.command)}) did not report ready: "
                f"{_reason(exc)}; its stderr is in the engine's log"
            ) from None
        except BaseException:
            # Cancelled mid-launch: do not leave a worker behind that nobody tracks.
            self.kill()
            raise
        self.pid = _innermost(process.pid)

    async def run(self, attempt: Attempt) -> dict[str, Any]:
        """Send one attempt and wait for its reply; WorkerEnded or MalformedReply if none comes."""
        process = self._process
        assert process is not None and process.stdin is not None
        self.running = attempt.node_id
        try:
            request = attempt.dumps()
            process.stdin.write(_v8worker.FRAME_HEADER.pack(len(request)) + request)
            await process.stdin.drain()
            return await self._receive()
        except ConnectionError:
            raise WorkerEnded(await self._ending()) from None
        finally:
            self.running = None

    async def _receive(self) -> dict[str, Any]:
        """The worker's next frame, as a JSON object within the size limit."""
        process = self._process
        assert process is not None and process.stdout is not None
        try:
            header = await process.stdout.readexactly(_v8worker.FRAME_HEADER.size)
            (length,) = _v8worker.FRAME_HEADER.unpack(header)
            if length > self.reply_limit:
                raise MalformedReply(f"a {length}-byte frame, over the {self.reply_limit}-byte limit")
            message = json.loads(await process.stdout.readexactly(length))
        except asyncio.IncompleteReadError:
            raise WorkerEnded(await self._ending()) from None
        except ValueError as exc:
            raise MalformedReply(f"a frame that is not JSON ({exc})") from None
        if not isinstance(message, dict):
            raise MalformedReply(f"a frame holding a {type(message).__name__}, not an object")
        return message

    def kill(self) -> None:
        """Kill at once; under bubblewrap, its sandbox ends with it, and the worker dies with that."""
        if self.alive:
            assert self._process is not None
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    async def close(self) -> None:
        """Ask the worker to exit (it does when its stdin closes), kill it if it does not, reap it."""
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(WORKER_STOP_TIMEOUT_SECONDS):
                await process.wait()
        except TimeoutError:
            self.kill()
            await process.wait()
        if self._log is not None:
            await self._log

    async def _ending(self) -> str:
        """How the worker ended, once its pipe closed: by which signal, or with which status."""
        process = self._process
        assert process is not None
        try:
            async with asyncio.timeout(ENDING_WAIT_SECONDS):
                status = await process.wait()
        except TimeoutError:
            self.kill()
            return "closed its pipe without exiting, and was killed"
        # Negative: the signal that ended the worker itself. bubblewrap exits with 128 + that signal.
        number = -status if status < 0 else status - 128
        if number <= 0:
            return f"exited with status {status}"
        try:
            name = signal.Signals(number).name
        except ValueError:
            return f"was killed by signal {number}"
        hint = SIGNAL_HINTS.get(signal.Signals(number))
        return f"was killed by {name}" + (f" ({hint})" if hint else "")


class WorkerPool:
    """Worker processes, started on demand and reused: at most one attempt in each at a time."""

    def __init__(self, command: list[str], environment: dict[str, str], reply_limit: int) -> None:
        self.command = command
        self.environment = environment
        self.reply_limit = reply_limit
        self.workers: set[WorkerProcess] = set()
        self._idle: list[WorkerProcess] = []
        self._closing: set[asyncio.Task[None]] = set()

    async def take(self) -> WorkerProcess:
        """An idle worker, or a new one; the caller holds one of the executor's slots."""
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
            self.retire(worker)
        worker = WorkerProcess(self.command, self.environment, self.reply_limit)
        self.workers.add(worker)
        try:
            await worker.launch()
        except BaseException:
            self.workers.discard(worker)
            raise
        return worker

    def give_back(self, worker: WorkerProcess) -> None:
        self._idle.append(worker)

    def retire(self, worker: WorkerProcess) -> None:
        """Stop using a worker: it crashed, broke the protocol, overran, or asked to go."""
        self.workers.discard(worker)
        # Killed now, not politely: a worker retired mid-attempt may be running user code.
        worker.kill()
        closing = asyncio.create_task(worker.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def stop(self) -> None:
        workers, self.workers, self._idle = self.workers, set(), []
        await asyncio.gather(*(worker.close() for worker in workers), *self._closing)


class JavaScriptExecutor:
    """Runs `javascript` nodes: each attempt in a fresh V8 isolate, in a sandboxed worker process.

    `config["code"]` defines a function named `config.get("entrypoint", "main")`, which is
    called as `main(inputs)`; its JSON-serialisable return value (or what a returned
    Promise resolves to) is the output. V8 alone has no network, file or process access.

    The isolates run in up to `max_concurrency` worker processes (see `nodes._v8worker`), each
    under bubblewrap in a filesystem of the interpreter and mini-racer only, with no network,
    as `sandbox_uid` when the engine runs as root, without capabilities and under a seccomp
    filter. A crash of V8 ends its worker only: that attempt fails, and the worker is replaced.
    `isolation="rlimits"` accepts workers without namespaces where bubblewrap cannot run.
    """

    node_types: tuple[str, ...] = ("javascript",)

    def __init__(
        self,
        max_concurrency: int = 4,
        memory_limit_mb: int = 128,
        output_cap_bytes: int = 64 * 1024,
        result_cap_bytes: int = 1024 * 1024,
        isolation: Isolation = "bubblewrap",
        sandbox_uid: int = DEFAULT_SANDBOX_UID,
    ) -> None:
        if isolation not in ("bubblewrap", "rlimits"):
            raise ValueError(f'isolation is {isolation!r}; use "bubblewrap" or "rlimits"')
        self.max_concurrency = max_concurrency
        self.memory_limit_mb = memory_limit_mb
        self.output_cap_bytes = output_cap_bytes
        self.result_cap_bytes = result_cap_bytes
        self.isolation = isolation
        self.sandbox_uid = sandbox_uid
        # Output and error text are JSON-escaped: at worst 6 bytes per UTF-8 byte, 12 per character.
        self._reply_limit = (
            result_cap_bytes
            + 12 * output_cap_bytes
            + 12 * _v8worker.ERROR_MESSAGE_CAP_CHARS
            + REPLY_OVERHEAD_BYTES
        )
        self._slots = asyncio.Semaphore(max_concurrency)
        self._bwrap: str | None = None
        self._allowed: AllowList | None = None
        self._pool: WorkerPool | None = None
        # RLIMIT_DATA of the first worker: what V8 holds warmed up, plus room for the isolates.
        self._data_limit_bytes = 0

    @property
    def worker_pids(self) -> dict[int, str | None]:
        """The host pid of each worker process, with the node whose attempt runs in it, if any."""
        if self._pool is None:
            return {}
        return {worker.pid: worker.running for worker in self._pool.workers if worker.pid is not None}

    async def start(self) -> None:
        if self._pool is not None:
            return
        self._bwrap = await bubblewrap_unless_rlimits(
            self.isolation,
            "javascript",
            ISOLATION_SETTING_HINT,
            "its V8 workers",
            "V8, if compromised, could read what the engine's user can read and reach the network",
        )
        if self._bwrap is not None:
            self._allowed = allow_list(
                (), network=False, extra=[(MINI_RACER_DIR, f"{SANDBOX_LIBRARIES}/py_mini_racer")]
            )
        path = (
            f"{SANDBOX_ROOT}:{SANDBOX_LIBRARIES}"
            if self._bwrap
            else f"{PROJECT_ROOT}:{os.path.dirname(MINI_RACER_DIR)}"
        )
        self._pool = WorkerPool(self.worker_command(), {"PYTHONPATH": path}, self._reply_limit)
        try:
            # One worker now: a sandbox in which V8 cannot run fails here, not in the first attempt.
            first = await self._pool.take()
        except BaseException:
            await self.stop()
            raise
        self._pool.give_back(first)
        self._data_limit_bytes = first.data_limit_bytes
        logger.info("the javascript executor %s", self.enforcement())

    def worker_command(self) -> list[str]:
        """A worker's command line, under bubblewrap unless isolation is rlimits-only."""
        config = _v8worker.WorkerConfig(
            memory_limit_mb=self.memory_limit_mb,
            output_cap_bytes=self.output_cap_bytes,
            result_cap_bytes=self.result_cap_bytes,
            sandboxed=self._allowed is not None,
            sandbox_uid=self.sandbox_uid,
            # Inside the sandbox the engine's pid means nothing; --die-with-parent ties us to it.
            parent_pid=0 if self._allowed is not None else os.getpid(),
        )
        worker = [interpreter(), "-S", "-B", "-m", "nodes._v8worker", config.dumps()]
        if self._bwrap is None or self._allowed is None:
            return worker
        sandbox = bubblewrap_command(
            self._bwrap, self._allowed, network=False, capabilities=WORKER_CAPABILITIES, mounts_proc=False
        )
        return [*sandbox, *worker]

    def enforcement(self) -> str:
        """What confines the workers, in one sentence for the log."""
        limits = (
            f"a {self.memory_limit_mb} MiB heap limit per isolate, "
            f"{self._data_limit_bytes // 2**20} MiB of data memory per worker (RLIMIT_DATA; "
            "ArrayBuffers count there), "
            + (f"at most {_v8worker.PROCESS_COUNT_LIMIT} threads (RLIMIT_NPROC), " if self._allowed else "")
            + f"{_v8worker.OPEN_FILES_LIMIT} open files (RLIMIT_NOFILE)"
        )
        seccomp = "a seccomp filter" if _confine.seccomp_supported() else "NO seccomp filter (unknown arch)"
        confinement = f"without capabilities, with no_new_privs and {seccomp}, and with {limits}"
        if self._allowed is None:
            return (
                f"runs V8 in up to {self.max_concurrency} worker processes WITHOUT a sandbox "
                f"(isolation=rlimits), as the engine's uid ({os.getuid()}), {confinement}"
            )
        who = f"host uid {self.sandbox_uid}" if privileged() else f"the engine's uid ({os.getuid()})"
        return (
            f"runs V8 in up to {self.max_concurrency} worker processes sandboxed with bubblewrap: "
            f"each sees only {self._allowed.describe()}, a {ZYGOTE_TMP_BYTES // 2**20} MiB private "
            f"/tmp, its own /proc and a minimal /dev, and no network; it runs as {who} in its own "
            f"user namespace, {confinement}"
        )

    async def stop(self) -> None:
        pool, self._pool = self._pool, None
        self._bwrap = self._allowed = None
        if pool is not None:
            await pool.stop()

    async def execute(self, task: NodeTask) -> NodeOutcome:
        pool = self._pool
        if pool is None:
            return NodeOutcome.failure(
                "ExecutorUnavailable", "the javascript executor is not started; call start() first"
            )
        try:
            attempt = _attempt(task)
        except InvalidTask as exc:
            return NodeOutcome.failure(type(exc).__name__, str(exc))
        async with self._slots:
            try:
                worker = await pool.take()
            except WorkerStartError as exc:
                return NodeOutcome.failure("ExecutorUnavailable", str(exc))
            # Time spent waiting for a slot or a worker is the engine's, not the node's.
            started = time.perf_counter()
            outcome = await self._run(pool, worker, attempt)
            outcome.duration_ms = (time.perf_counter() - started) * 1000
            return outcome

    async def _run(self, pool: WorkerPool, worker: WorkerProcess, attempt: Attempt) -> NodeOutcome:
        """Run the attempt in the worker, then give the worker back, or retire it if in doubt."""
        reusable = False
        try:
            async with asyncio.timeout(attempt.timeout_seconds + DEADLINE_GRACE_SECONDS):
                reply = await worker.run(attempt)
            outcome = _outcome(reply)
            reusable = reply.get("retire") is False
            return outcome
        except TimeoutError:
            return NodeOutcome.failure(
                "Timeout",
                f"node {attempt.node_id!r} did not finish within its {attempt.timeout_seconds:g} s "
                "timeout, and its JavaScript worker did not stop it; the worker was killed and replaced",
            )
        except WorkerEnded as exc:
            return NodeOutcome.failure(
                "Crashed",
                f"the JavaScript worker process running node {attempt.node_id!r} {exc} before the "
                "attempt finished; the worker was replaced, and the attempt can be retried",
            )
        except MalformedReply as exc:
            return NodeOutcome.failure(
                "ProtocolError",
                f"the JavaScript worker running node {attempt.node_id!r} sent {exc}; the worker "
                "was replaced, and the attempt can be retried",
            )
        finally:
            # Cancelled, or any doubt about its state: the worker goes, and takes the isolate along.
            if reusable:
                pool.give_back(worker)
            else:
                pool.retire(worker)


def _outcome(reply: dict[str, Any]) -> NodeOutcome:
    stdout = str(reply.get("stdout", ""))
    stderr = str(reply.get("stderr", ""))
    if reply.get("ok") is True and "output" in reply:
        return NodeOutcome.success(reply["output"], 0.0, stdout, stderr)
    if reply.get("ok") is False:
        return NodeOutcome.failure(
            str(reply.get("error_class")), str(reply.get("error_message")), stdout=stdout, stderr=stderr
        )
    raise MalformedReply(f"a reply without a result or an error: {sorted(reply)}")


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


async def _log_stderr(stream: asyncio.StreamReader, pid: int) -> None:
    """Copy what a worker writes to stderr (its faults, V8's fatal errors) into the engine's log."""
    logged = 0
    while chunk := await stream.read(65536):
        if logged < WORKER_LOG_BYTES:
            text = chunk[: WORKER_LOG_BYTES - logged].decode(errors="replace").rstrip()
            logger.warning("javascript worker (started as pid %d) wrote to stderr: %s", pid, text)
        # Read on past the cap all the same: a worker blocked on a full pipe would hang its attempt.
        logged += len(chunk)


def _reason(exc: Exception) -> str:
    """Why a worker did not come up, from what its launch raised."""
    if isinstance(exc, TimeoutError):
        return f"it said nothing within {WORKER_STARTUP_TIMEOUT_SECONDS:g} s"
    if isinstance(exc, WorkerEnded):
        return f"it {exc}"
    return f"its first frame was not a greeting ({exc!r})"


def _innermost(pid: int) -> int | None:
    """The process at the end of the chain of only children from `pid`: the worker, which
    bubblewrap runs two levels down and which starts no processes of its own."""
    current = pid
    while True:
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            # Gone already, or a kernel without that file: no pid to give.
            return None
        if len(children) != 1:
            return current
        current = int(children[0])
