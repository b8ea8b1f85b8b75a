"""The `python` node executor: runs user code in a fresh child forked by a sandboxed zygote."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from nodes import _confine, _zygote
from nodes.cgroups import Delegation, delegate
from nodes.sandbox import (
    ISOLATION_SETTING_HINT,
    SANDBOX_ROOT,
    Isolation,
    allow_list,
    bubblewrap_command,
    bubblewrap_unless_rlimits,
    default_packages,
    interpreter,
    privileged,
)
from schemas.tasks import NodeOutcome, NodeTask

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ZYGOTE_STARTUP_TIMEOUT_SECONDS = 10.0
ZYGOTE_STOP_TIMEOUT_SECONDS = 2.0
# How long to wait, after killing a timed-out attempt, for the zygote's report of its output.
ENDING_REPORT_TIMEOUT_SECONDS = 1.0
# Room in a reply frame for the envelope and an error message, beyond the result itself.
REPLY_OVERHEAD_BYTES = 1024 * 1024
# How long a stopped zygote's cgroups may take to empty before they are left behind.
CGROUP_REMOVAL_SECONDS = 2.0
# Who user code runs as on the host when the engine runs as root (nobody).
DEFAULT_SANDBOX_UID = 65534
# sun_path holds 108 bytes, including the terminating NUL.
UNIX_SOCKET_PATH_MAX_BYTES = 107

SIGNAL_HINTS = {
    signal.SIGKILL: "killed from outside the node, often by the kernel when memory ran out",
    signal.SIGXCPU: "it used more CPU time than its limit (timeout rounded up, plus 1 s)",
}


class ZygoteStartError(RuntimeError):
    """The python executor's zygote process did not come up."""


class ZygoteUnavailable(RuntimeError):
    """The zygote refused or dropped an attempt even after a restart."""


class MalformedReply(Exception):
    """An attempt connection carried something other than the expected frames."""


class InvalidTask(ValueError):
    """The task's config or inputs cannot be turned into a request for the zygote."""


class ZygoteProcess:
    """The engine's handle on the zygote: launches it, restarts it, and says where it listens.

    The engine binds and listens on the zygote's socket itself and hands the zygote the
    descriptor, so the socket's path is never inside the sandbox.
    """

    def __init__(
        self,
        runtime_dir: Path,
        output_cap_bytes: int,
        result_cap_bytes: int,
        bwrap: str | None = None,
        network: bool = False,
        packages: Sequence[str] = (),
        scratch_bytes: int = _zygote.DEFAULT_SCRATCH_BYTES,
        sandbox_uid: int = DEFAULT_SANDBOX_UID,
    ) -> None:
        self.runtime_dir = runtime_dir
        self.bwrap = bwrap
        self.network = network
        self.packages = tuple(packages)
        self.scratch_bytes = scratch_bytes
        self.sandbox_uid = sandbox_uid
        self.socket_path = runtime_dir / _zygote.SOCKET_NAME
        self.output_cap_bytes = output_cap_bytes
        self.result_cap_bytes = result_cap_bytes
        self.generation = 0
        self.allowed = allow_list(self.packages, network) if bwrap is not None else None
        self.cgroups: Delegation | None = None
        self._listener: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def config(self, listen_fd: int) -> _zygote.ZygoteConfig:
        """What the zygote is told."""
        return _zygote.ZygoteConfig(
            listen_fd=listen_fd,
            output_cap_bytes=self.output_cap_bytes,
            result_cap_bytes=self.result_cap_bytes,
            isolate=self.allowed is not None,
            sandbox_uid=self.sandbox_uid,
            scratch_bytes=self.scratch_bytes,
            packages=self.allowed.inside_packages if self.allowed is not None else self.packages,
            mount_proc=self.allowed is not None and privileged(),
            # Inside the sandbox the engine's pid means nothing; --die-with-parent ties us to it.
            parent_pid=0 if self.allowed is not None else os.getpid(),
            label=str(self.runtime_dir),
            private_network=not self.network,
            cgroup_version=self.cgroups.version if self.cgroups is not None else 0,
            cgroup_controllers=self.cgroups.controllers if self.cgroups is not None else (),
        )

    def command(self, listen_fd: int) -> list[str]:
        """The zygote's command line, under bubblewrap unless isolation is rlimits-only."""
        zygote = [interpreter(), "-S", "-B", "-m", "nodes._zygote", self.config(listen_fd).dumps()]
        if self.bwrap is None or self.allowed is None:
            return zygote
        writable = self.cgroups.directories if self.cgroups is not None else ()
        return [*bubblewrap_command(self.bwrap, self.allowed, self.network, writable=writable), *zygote]

    def environment(self) -> dict[str, str]:
        """Only basics: the zygote's initial environment stays readable in /proc by its children."""
        environment = _zygote.kept_environment(dict(os.environ))
        environment["PYTHONPATH"] = SANDBOX_ROOT if self.allowed is not None else str(PROJECT_ROOT)
        return environment

    async def unless_it_exits(self, receiving: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
        """What `receiving` gets, or ConnectionClosed if the zygote exits first.

        The engine owns the listening socket, so a connection to a dead zygote is accepted by the
        kernel and would wait in the backlog: only the zygote's exit tells that nobody will answer.
        """
        process = self._process
        if process is None:
            raise _zygote.ConnectionClosed("the zygote is not running")
        answer = asyncio.ensure_future(receiving)
        exit_ = asyncio.ensure_future(process.wait())
        try:
            await asyncio.wait({answer, exit_}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exit_.cancel()
            if not answer.done():
                answer.cancel()
        if answer.done() and not answer.cancelled():
            return answer.result()
        raise _zygote.ConnectionClosed(f"the zygote exited (status {process.returncode}) before it answered")

    async def ensure_running(self) -> int:
        """Launch the zygote if it is not running; return the generation to pass to `restart`."""
        async with self._lock:
            if self._process is None or self._process.returncode is not None:
                await self._launch()
            return self.generation

    async def restart(self, generation: int) -> None:
        """Replace the zygote, unless another attempt already replaced that generation."""
        async with self._lock:
            if generation == self.generation:
                await self._terminate()
                await self._launch()

    async def stop(self) -> None:
        async with self._lock:
            await self._terminate()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            if self.cgroups is not None:
                deadline = time.monotonic() + CGROUP_REMOVAL_SECONDS
                while not self.cgroups.remove() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                self.cgroups = None

    def _delegated_cgroups(self) -> Delegation | None:
        """This sandbox's cgroups, once an attempt's limits were written into a probe of each."""
        delegation = delegate(self.runtime_dir.name)
        if delegation is None:
            return None
        config = self.config(-1)
        try:
            for host, _ in delegation.directories:
                probe = Path(host) / "probe"
                probe.mkdir(exist_ok=True)
                try:
                    _zygote.limit_cgroup(str(probe), config)
                finally:
                    probe.rmdir()
        except OSError as exc:
            logger.warning(
                "the python executor runs without cgroups: an attempt's limits could not be set: %s", exc
            )
            delegation.remove()
            return None
        return delegation

    def _listening(self) -> socket.socket:
        if self._listener is None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            listener.bind(str(self.socket_path))
            listener.listen(128)
            self._listener = listener
        return self._listener

    async def _launch(self) -> None:
        listener = self._listening()
        if self.allowed is not None and self.cgroups is None:
            self.cgroups = self._delegated_cgroups()
        command = self.command(listener.fileno())
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self.environment(),
            cwd=self.runtime_dir,
            pass_fds=(listener.fileno(),),
            # Out of the engine's session, so a Ctrl-C meant for the engine does not reach it.
            start_new_session=True,
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(ZYGOTE_STARTUP_TIMEOUT_SECONDS):
                ready = await process.stdout.readline()
        except TimeoutError:
            ready = b""
        except BaseException:
            # Cancelled mid-launch: do not leave a zygote behind that nobody tracks.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        if ready != _zygote.READY_LINE:
            await _kill(process)
            raise ZygoteStartError(
                f"the python executor's zygote ({' '.join(command)}) did not report "
                f"ready within {ZYGOTE_STARTUP_TIMEOUT_SECONDS:g} s (exit status "
                f"{process.returncode}); its stderr is in the engine's log"
            )
        self._process = process
        self.generation += 1

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        # Closing stdin is the zygote's signal to exit; its children die with it.
        assert process.stdin is not None
        process.stdin.close()
        try:
            async with asyncio.timeout(ZYGOTE_STOP_TIMEOUT_SECONDS):
                await process.wait()
        except TimeoutError:
            await _kill(process)


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


class AttemptConnection:
    """One engine-side connection to the zygote, carrying length-prefixed JSON frames."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.setblocking(False)
        self._buffer = bytearray()

    async def connect(self, path: Path) -> None:
        await self._loop.sock_connect(self._socket, str(path))

    async def send(self, payload: bytes) -> None:
        await self._loop.sock_sendall(self._socket, _zygote.encode_frame(payload))

    def hang_up(self) -> None:
        """Tell the zygote to kill the attempt: it watches for the engine's end of sending."""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_WR)

    async def receive(self, limit: int) -> dict[str, Any]:
        header = await self._read_exactly(_zygote.FRAME_HEADER.size)
        (length,) = _zygote.FRAME_HEADER.unpack(header)
        if length > limit:
            raise MalformedReply(f"a {length}-byte frame, over the {limit}-byte limit")
        try:
            message = json.loads(await self._read_exactly(length))
        except ValueError as exc:
            raise MalformedReply(f"a frame that is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise MalformedReply(f"a frame holding a {type(message).__name__}, not an object")
        return message

    def close(self) -> None:
        self._socket.close()

    async def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = await self._loop.sock_recv(self._socket, max(65536, size - len(self._buffer)))
            if not chunk:
                raise _zygote.ConnectionClosed(
                    f"connection closed with {len(self._buffer)} of {size} bytes read"
                )
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


class PythonExecutor:
    """Runs `python` nodes: each attempt in a fresh process forked from a warm zygote.

    `config["code"]` defines a function named `config.get("entrypoint", "main")`, which
    is called as `main(**inputs)`; its JSON-serialisable return value is the output.

    Each attempt runs under bubblewrap in a filesystem built from an allow-list (see
    `nodes.sandbox`): the interpreter, the `packages` directories user code may import (the
    engine's own site-packages by default), and a private /tmp of `scratch_bytes`. When the
    engine runs as root, user code runs as `sandbox_uid`. `isolation="rlimits"` accepts
    rlimits-only isolation where bubblewrap cannot create namespaces. A task with
    `config["network"] is True` runs in a second, networked sandbox if `allow_network`;
    otherwise it fails with NetworkNotAllowed.
    """

    node_types: tuple[str, ...] = ("python",)

    def __init__(
        self,
        max_concurrency: int = 8,
        output_cap_bytes: int = 64 * 1024,
        result_cap_bytes: int = 1024 * 1024,
        isolation: Isolation = "bubblewrap",
        allow_network: bool = False,
        packages: Sequence[str] | None = None,
        scratch_bytes: int = _zygote.DEFAULT_SCRATCH_BYTES,
        sandbox_uid: int = DEFAULT_SANDBOX_UID,
    ) -> None:
        if isolation not in ("bubblewrap", "rlimits"):
            raise ValueError(f'isolation is {isolation!r}; use "bubblewrap" or "rlimits"')
        self.isolation = isolation
        self.allow_network = allow_network
        self.packages = tuple(default_packages() if packages is None else packages)
        self.scratch_bytes = scratch_bytes
        self.sandbox_uid = sandbox_uid
        self.sandboxed = False
        self.max_concurrency = max_concurrency
        self.output_cap_bytes = output_cap_bytes
        self.result_cap_bytes = result_cap_bytes
        # Output and error text are JSON-escaped, at worst 6 bytes per byte.
        self._reply_limit = result_cap_bytes + 12 * output_cap_bytes + REPLY_OVERHEAD_BYTES
        self._slots = asyncio.Semaphore(max_concurrency)
        self._zygote: ZygoteProcess | None = None
        self._networked_zygote: ZygoteProcess | None = None

    @property
    def zygote_pid(self) -> int | None:
        """The pid of the process the engine started: bwrap when sandboxed, else the zygote."""
        return self._zygote.pid if self._zygote is not None else None

    async def start(self) -> None:
        if self._zygote is not None:
            return
        bwrap = await self._sandbox()
        try:
            self._zygote = await self._start_zygote(bwrap, network=False)
            if self.allow_network and bwrap is not None:
                self._networked_zygote = await self._start_zygote(bwrap, network=True)
        except BaseException:
            await self.stop()
            raise
        logger.info("the python executor %s", self.enforcement())

    def enforcement(self) -> str:
        """What confines each attempt, in one sentence for the log."""
        limits = (
            f"at most {_zygote.PROCESS_COUNT_LIMIT} processes (RLIMIT_NPROC), "
            f"{_zygote.ADDRESS_SPACE_LIMIT_BYTES // 2**20} MiB of address space (RLIMIT_AS), "
            "CPU time of its timeout + 1 s (RLIMIT_CPU), "
            f"files of at most {_zygote.FILE_SIZE_LIMIT_BYTES // 2**20} MiB (RLIMIT_FSIZE)"
        )
        zygote = self._zygote
        if zygote is None or zygote.allowed is None:
            return f"runs user code WITHOUT a sandbox (isolation=rlimits), with {limits}"
        who = f"host uid {self.sandbox_uid}" if privileged() else f"the engine's uid ({os.getuid()})"
        seccomp = "a seccomp filter" if _confine.seccomp_supported() else "NO seccomp filter (unknown arch)"
        return (
            f"sandboxes each attempt with bubblewrap: it sees only {zygote.allowed.describe()}, "
            f"a {self.scratch_bytes // 2**20} MiB private /tmp, its own /proc and a minimal /dev; "
            f"it runs as {who} in its own user, mount and PID namespaces, without capabilities, "
            f"with no_new_privs and {seccomp}, and with {limits}; {self._cgroup_limits(zygote)}"
        )

    def _cgroup_limits(self, zygote: ZygoteProcess) -> str:
        if zygote.cgroups is None:
            return "no cgroups (the engine cannot create them here): memory is bounded per process"
        return (
            f"and in cgroups (v{zygote.cgroups.version}) of its own: at most "
            f"{_zygote.PROCESS_COUNT_LIMIT} processes, "
            f"{_zygote.attempt_memory_bytes(self.scratch_bytes) // 2**20} MiB of memory "
            "for all of them and its /tmp, one core of CPU"
        )

    async def _sandbox(self) -> str | None:
        """The bwrap to run under, or None once rlimits-only isolation was accepted."""
        bwrap = await bubblewrap_unless_rlimits(
            self.isolation,
            "python",
            ISOLATION_SETTING_HINT,
            "user code",
            "nodes can read what the engine's user can read and reach the network",
        )
        self.sandboxed = bwrap is not None
        return bwrap

    async def _start_zygote(self, bwrap: str | None, network: bool) -> ZygoteProcess:
        runtime_dir = Path(tempfile.mkdtemp(prefix="citadel-python-"))
        zygote = ZygoteProcess(
            runtime_dir,
            self.output_cap_bytes,
            self.result_cap_bytes,
            bwrap,
            network,
            self.packages,
            self.scratch_bytes,
            self.sandbox_uid,
        )
        if len(os.fsencode(zygote.socket_path)) > UNIX_SOCKET_PATH_MAX_BYTES:
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise ZygoteStartError(
                f"the zygote's socket path {zygote.socket_path} is longer than the "
                f"{UNIX_SOCKET_PATH_MAX_BYTES} bytes a Unix socket allows; "
                "point TMPDIR at a shorter directory"
            )
        try:
            await zygote.ensure_running()
        except BaseException:
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise
        return zygote

    async def stop(self) -> None:
        zygotes = (self._zygote, self._networked_zygote)
        self._zygote = self._networked_zygote = None
        self.sandboxed = False
        for zygote in zygotes:
            if zygote is not None:
                await zygote.stop()
                shutil.rmtree(zygote.runtime_dir, ignore_errors=True)

    async def execute(self, task: NodeTask) -> NodeOutcome:
        zygote = self._zygote
        if zygote is None:
            return NodeOutcome.failure(
                "ExecutorUnavailable", "the python executor is not started; call start() first"
            )
        if task.config.get("network") is True and self.sandboxed:
            if self._networked_zygote is None:
                return NodeOutcome.failure(
                    "NetworkNotAllowed",
                    f"node {task.node_id!r} sets config.network: true, but this deployment runs "
                    "python nodes without network; remove the setting, or start the executor "
                    "with allow_network=True",
                )
            zygote = self._networked_zygote
        try:
            request = self._request(task)
        except InvalidTask as exc:
            return NodeOutcome.failure(type(exc).__name__, str(exc))
        async with self._slots:
            # Time spent waiting for a slot is the engine's, not the node's.
            started = time.perf_counter()
            outcome = await self._run(zygote, task, request)
            outcome.duration_ms = (time.perf_counter() - started) * 1000
            return outcome

    def _request(self, task: NodeTask) -> bytes:
        code = task.config.get("code")
        if not isinstance(code, str) or not code.strip():
            raise InvalidTask(f"node {task.node_id!r} has no Python source in config.code")
        entrypoint = task.config.get("entrypoint", "main")
        if not isinstance(entrypoint, str) or not entrypoint.isidentifier():
            raise InvalidTask(
                f"node {task.node_id!r} has config.entrypoint {entrypoint!r}; "
                "it must be the name of a function defined in config.code"
            )
        request = {
            "code": code,
            "entrypoint": entrypoint,
            "inputs": task.inputs,
            "timeout_seconds": task.timeout_seconds,
            "result_cap_bytes": self.result_cap_bytes,
        }
        try:
            return json.dumps(request, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise InvalidTask(f"node {task.node_id!r} has inputs that are not JSON: {exc}") from None

    async def _run(self, zygote: ZygoteProcess, task: NodeTask, request: bytes) -> NodeOutcome:
        connection: AttemptConnection | None = None
        started = False
        try:
            async with asyncio.timeout(task.timeout_seconds):
                connection = await self._open_attempt(zygote, request)
                started = True
                reply = await connection.receive(self._reply_limit)
            return self._outcome(task, reply)
        except TimeoutError:
            return await self._time_out(task, connection if started else None)
        except (ZygoteStartError, ZygoteUnavailable) as exc:
            return NodeOutcome.failure("ExecutorUnavailable", str(exc))
        except (_zygote.ConnectionClosed, ConnectionError):
            # ConnectionError: the zygote died between handing over the attempt and the reply.
            return NodeOutcome.failure(
                "Crashed",
                f"the process of node {task.node_id!r} ended without a result, and the "
                "python executor's zygote went away with it; the attempt can be retried",
            )
        except MalformedReply as exc:
            return NodeOutcome.failure(
                "ProtocolError",
                f"the process of node {task.node_id!r} sent {exc}; did the code write to "
                f"file descriptor {_zygote.CONNECTION_FD}?",
            )
        finally:
            if connection is not None:
                connection.close()

    async def _open_attempt(self, zygote: ZygoteProcess, request: bytes) -> AttemptConnection:
        """Hand the request to a fresh child and wait until it starts, restarting a dead zygote once."""
        # No user code runs before the child says hello, so retrying is safe.
        for _ in range(2):
            generation = await zygote.ensure_running()
            connection = AttemptConnection()
            try:
                await connection.connect(zygote.socket_path)
                await connection.send(request)
                hello = await zygote.unless_it_exits(connection.receive(self._reply_limit))
            except (OSError, _zygote.ConnectionClosed, MalformedReply):
                connection.close()
                await zygote.restart(generation)
                continue
            except BaseException:
                connection.close()
                raise
            if hello.get("started") is True:
                return connection
            # The zygote reported the child dead before it said hello; the zygote is fine.
            connection.close()
        raise ZygoteUnavailable("the python executor's zygote dropped the attempt before starting it, twice")

    async def _time_out(self, task: NodeTask, connection: AttemptConnection | None) -> NodeOutcome:
        limit = f"node {task.node_id!r} did not finish within its {task.timeout_seconds:g} s timeout"
        if connection is None:
            # Restarting the zygote here would kill every other attempt in flight.
            return NodeOutcome.failure(
                "Timeout", f"{limit}; the python executor's zygote had not started it yet (overloaded?)"
            )
        # The zygote kills the child's process group, which holds everything it spawned.
        connection.hang_up()
        ending = await self._ending(connection)
        return NodeOutcome.failure(
            "Timeout",
            f"{limit}; its process group was killed",
            stdout=str(ending.get("stdout", "")),
            stderr=str(ending.get("stderr", "")),
        )

    async def _ending(self, connection: AttemptConnection) -> dict[str, Any]:
        """The zygote's report on a killed child, carrying its captured output, if it comes."""
        try:
            async with asyncio.timeout(ENDING_REPORT_TIMEOUT_SECONDS):
                while True:
                    frame = await connection.receive(self._reply_limit)
                    if "exit" in frame:
                        return frame
        except (TimeoutError, _zygote.ConnectionClosed, MalformedReply):
            return {}

    def _outcome(self, task: NodeTask, reply: dict[str, Any]) -> NodeOutcome:
        stdout = str(reply.get("stdout", ""))
        stderr = str(reply.get("stderr", ""))
        if reply.get("ok") is True:
            return NodeOutcome.success(reply.get("output"), 0.0, stdout, stderr)
        if reply.get("oom") is True:
            return NodeOutcome.failure(
                "MemoryLimit",
                f"node {task.node_id!r} and its processes used more than the "
                f"{_zygote.attempt_memory_bytes(self.scratch_bytes) // 2**20} MiB of memory an "
                "attempt may hold (its /tmp included) and the kernel killed it; use less memory, "
                "or process the data in smaller pieces",
                stdout=stdout,
                stderr=stderr,
            )
        if reply.get("ok") is False:
            return NodeOutcome.failure(
                str(reply.get("error_class")),
                str(reply.get("error_message")),
                stdout=stdout,
                stderr=stderr,
            )
        if reply.get("exit") == "signal":
            return NodeOutcome.failure(
                "Crashed",
                f"the process of node {task.node_id!r} was killed by "
                f"{_describe_signal(int(reply['signal']))}",
                stdout=stdout,
                stderr=stderr,
            )
        return NodeOutcome.failure(
            "Crashed",
            f"the process of node {task.node_id!r} exited with status {reply.get('status')} "
            "before returning a result (see its stderr); did the code call os._exit()?",
            stdout=stdout,
            stderr=stderr,
        )


def _describe_signal(number: int) -> str:
    try:
        known = signal.Signals(number)
    except ValueError:
        return f"signal {number}"
    hint = SIGNAL_HINTS.get(known)
    return f"{known.name} ({hint})" if hint else known.name
