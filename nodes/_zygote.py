"""The python node's zygote: a warm process that forks one fresh child per attempt.

Run as `python -m nodes._zygote RUNTIME_DIR PARENT_PID OUTPUT_CAP_BYTES ISOLATE`. The zygote keeps
a few spare children forked ahead of demand: each has already left the zygote's session,
tied its life to the zygote and set up its stdio and scratch directory, so an attempt only
pays for handing over the connection. A child serves exactly one attempt and then exits.

With ISOLATE=1 (the zygote runs under bubblewrap, root of its user namespace) each spare
also enters new mount and PID namespaces and forks the attempt's runner as their PID 1,
with its own /proc, a private tmpfs /tmp, the runtime directory narrowed to its own
capture files, and no capabilities: attempts cannot see, signal or read each other.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import gc
import importlib
import json
import linecache
import math
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

# Passed on to user code; everything else in the engine's environment may hold secrets.
KEPT_ENVIRONMENT = ("PATH", "LANG", "LANGUAGE", "TZ")
KEPT_ENVIRONMENT_PREFIXES = ("LC_",)

# Imported once here so that each forked child gets them for free. Modules that register
# fork handlers (threading via subprocess, random's reseeding) would slow every fork instead.
PRELOADED_MODULES = (
    "base64",
    "collections",
    "dataclasses",
    "datetime",
    "decimal",
    "functools",
    "hashlib",
    "itertools",
    "re",
    "string",
    "typing",
)

SOCKET_NAME = "zygote.sock"
ATTEMPTS_DIR_NAME = "attempts"
READY_LINE = b"ready\n"
SPARE_CHILDREN = 2

NODE_FILENAME = "<node>"
FRAME_HEADER = struct.Struct(">I")
TRUNCATION_MARK = "\n... [truncated]"
TRACEBACK_FRAMES = 5
ERROR_MESSAGE_CAP_CHARS = 16 * 1024
# How long the zygote waits for an engine to take a report; it serves nobody else meanwhile.
REPORT_SEND_TIMEOUT_SECONDS = 1.0

FILE_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
ADDRESS_SPACE_LIMIT_BYTES = 1024 * 1024 * 1024
PROCESS_COUNT_LIMIT = 64
OPEN_FILES_LIMIT = 256
PRIVATE_TMP_OPTIONS = b"size=64m,nr_inodes=4096,mode=1777"
PRIVATE_SCRATCH = "/tmp/work"

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# In a child: first its end of the hand-off channel, then the attempt's connection.
CONNECTION_FD = 3


class ConnectionClosed(Exception):
    """The peer closed the connection before a whole frame arrived."""


def kept_environment(environ: dict[str, str]) -> dict[str, str]:
    """The part of an environment that user code may see."""
    return {
        name: value
        for name, value in environ.items()
        if name in KEPT_ENVIRONMENT or name.startswith(KEPT_ENVIRONMENT_PREFIXES)
    }


def encode_frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


def send_frame(fd: int, payload: bytes) -> None:
    view = memoryview(encode_frame(payload))
    while view:
        view = view[os.write(fd, view) :]


def recv_frame(fd: int) -> bytes:
    (length,) = FRAME_HEADER.unpack(_recv_exactly(fd, FRAME_HEADER.size))
    return _recv_exactly(fd, length)


def _recv_exactly(fd: int, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = os.read(fd, size - len(chunks))
        if not chunk:
            raise ConnectionClosed(f"connection closed after {len(chunks)} of {size} bytes")
        chunks += chunk
    return bytes(chunks)


_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what} failed: {os.strerror(errno)}")


def _mount(source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    _check(_libc.mount(source, os.fsencode(target), fstype, flags, data), f"mount on {target}")


def _die_with_parent() -> None:
    # The kernel, not our code, must clean up if the parent is SIGKILLed.
    if _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def read_capped(path: str, cap: int) -> str:
    """A captured output file as text, cut to `cap` bytes with a visible mark."""
    try:
        with open(path, "rb") as file:
            data = file.read(cap + 1)
    except OSError:
        return ""
    if len(data) > cap:
        return data[:cap].decode("utf-8", "replace") + TRUNCATION_MARK
    return data.decode("utf-8", "replace")


@dataclass
class Child:
    """A forked child: a spare while it holds a hand-off channel, then an attempt's runner."""

    pid: int
    pidfd: int
    workdir: str
    channel: socket.socket | None
    connection: socket.socket | None = None


class Zygote:
    """The zygote's loop: hands connections to spare children and reports how each one ended."""

    def __init__(self, runtime_dir: str, output_cap_bytes: int, isolate: bool) -> None:
        self.runtime_dir = runtime_dir
        self.isolate = isolate
        self.attempts_dir = os.path.join(runtime_dir, ATTEMPTS_DIR_NAME)
        self.output_cap_bytes = output_cap_bytes
        self.pid = os.getpid()
        self.children: dict[int, Child] = {}
        # Attempt connections, by descriptor: the engine hangs up on one to have it killed.
        self.hang_ups: dict[int, Child] = {}
        self.spares: list[Child] = []
        self.poller = select.poll()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def serve(self) -> NoReturn:
        """Accept attempt connections until the engine closes our stdin."""
        socket_path = os.path.join(self.runtime_dir, SOCKET_NAME)
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        # A killed predecessor leaves attempt directories whose pids this zygote's children reuse.
        shutil.rmtree(self.attempts_dir, ignore_errors=True)
        os.makedirs(self.attempts_dir)
        self.listener.bind(socket_path)
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.poller.register(sys.stdin.fileno(), select.POLLIN)
        self.poller.register(self.listener.fileno(), select.POLLIN)
        # Objects that exist now are never collected, so forks share their pages for good.
        gc.freeze()
        self._top_up_spares()
        os.write(sys.stdout.fileno(), READY_LINE)
        while True:
            for fd, _ in self.poller.poll():
                if fd == sys.stdin.fileno():
                    if not os.read(fd, 4096):
                        os._exit(0)
                elif fd == self.listener.fileno():
                    self._accept()
                elif fd in self.hang_ups:
                    self._kill(self.hang_ups.pop(fd))
                elif fd in self.children:
                    # An event on a connection closed earlier in this round is stale.
                    self._finish(self.children.pop(fd))
            self._top_up_spares()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except BlockingIOError:
                return
            # Children read it blocking; accept() from a non-blocking listener may not be.
            connection.setblocking(True)
            self._hand_off(connection)

    def _hand_off(self, connection: socket.socket) -> None:
        while True:
            child = self.spares.pop(0) if self.spares else self._fork_spare()
            assert child.channel is not None
            try:
                socket.send_fds(child.channel, [b"c"], [connection.fileno()])
            except OSError:
                # That spare died while idle; its pidfd will report it.
                continue
            finally:
                child.channel.close()
                child.channel = None
            child.connection = connection
            self.hang_ups[connection.fileno()] = child
            self.poller.register(connection.fileno(), select.POLLRDHUP)
            return

    def _top_up_spares(self) -> None:
        while len(self.spares) < SPARE_CHILDREN:
            self.spares.append(self._fork_spare())

    def _fork_spare(self) -> Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            _run_child(theirs.fileno(), self.attempts_dir, self.pid, self.output_cap_bytes, self.isolate)
        theirs.close()
        pidfd = os.pidfd_open(pid)
        child = Child(pid, pidfd, os.path.join(self.attempts_dir, str(pid)), ours)
        self.children[pidfd] = child
        self.poller.register(pidfd, select.POLLIN)
        return child

    def _kill(self, child: Child) -> None:
        """Kill an attempt whose engine hung up: it timed out, or already has its reply."""
        assert child.connection is not None
        self.poller.unregister(child.connection.fileno())
        # The runner is the init of the attempt's PID namespace, in a session of its own, and
        # may have dropped its death signal: kill it by pid first, which ends everything in
        # that namespace. It is the unreaped child of the live spare, so its pid is not recycled.
        for runner in _children_of(child.pid):
            with contextlib.suppress(OSError):
                os.kill(runner, signal.SIGKILL)
        # Until its pidfd is handled the child is unreaped, so its group id is not recycled.
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)

    def _finish(self, child: Child) -> None:
        """Reap an exited child, kill what it left behind, and tell its engine how it ended."""
        # The unreaped zombie still holds the group id, so this cannot hit a recycled pid.
        with contextlib.suppress(OSError):
            os.killpg(child.pid, signal.SIGKILL)
        _, status = os.waitpid(child.pid, 0)
        if child.connection is not None and self.hang_ups.pop(child.connection.fileno(), None) is not None:
            self.poller.unregister(child.connection.fileno())
        self.poller.unregister(child.pidfd)
        os.close(child.pidfd)
        if child.channel is not None:
            self.spares.remove(child)
            child.channel.close()
        if child.connection is not None:
            self._report_ending(child, child.connection, status)
        shutil.rmtree(child.workdir, ignore_errors=True)

    def _report_ending(self, child: Child, connection: socket.socket, status: int) -> None:
        ending: dict[str, Any] = (
            {"exit": "signal", "signal": os.WTERMSIG(status)}
            if os.WIFSIGNALED(status)
            else {"exit": "status", "status": os.waitstatus_to_exitcode(status)}
        )
        # A child that replied already removed its workdir, so these are empty then.
        ending["stdout"] = read_capped(os.path.join(child.workdir, "stdout"), self.output_cap_bytes)
        ending["stderr"] = read_capped(os.path.join(child.workdir, "stderr"), self.output_cap_bytes)
        # The engine may already have its reply and have hung up; then nobody needs this.
        with contextlib.suppress(OSError):
            connection.settimeout(REPORT_SEND_TIMEOUT_SECONDS)
            connection.sendall(encode_frame(json.dumps(ending).encode()))
        connection.close()


def serve(runtime_dir: str, parent_pid: int, output_cap_bytes: int, isolate: bool) -> NoReturn:
    """Start the zygote: tie it to the engine, scrub its environment, warm it up, serve.

    Under bubblewrap the parent is bwrap's init and `parent_pid` is 0: bwrap ties us to the engine.
    """
    _die_with_parent()
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)
    kept = kept_environment(dict(os.environ))
    os.environ.clear()
    os.environ.update(kept)
    for name in PRELOADED_MODULES:
        importlib.import_module(name)
    # Line buffering keeps what user code printed before a timeout kill.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)  # type: ignore[union-attr]
    Zygote(runtime_dir, output_cap_bytes, isolate).serve()


def _run_child(
    channel_fd: int, attempts_dir: str, zygote_pid: int, output_cap: int, isolate: bool
) -> NoReturn:
    """Run one child's whole life and exit without ever returning into the zygote's loop."""
    exit_status = 1
    try:
        _serve_one_attempt(channel_fd, attempts_dir, zygote_pid, output_cap, isolate)
        exit_status = 0
    except BaseException:
        # Stderr is the attempt's capture file by now, so the engine gets to see this.
        traceback.print_exc()
    finally:
        os._exit(exit_status)


def _serve_one_attempt(
    channel_fd: int, attempts_dir: str, zygote_pid: int, output_cap: int, isolate: bool
) -> None:
    """Be a spare until handed a connection, then run that one attempt."""
    # Inherited zygote objects must never be finalized here: they would close
    # descriptor numbers that this attempt has reused.
    gc.freeze()
    os.setsid()
    _die_with_parent()
    if os.getppid() != zygote_pid:
        return
    _keep_only_channel(channel_fd)
    workdir = os.path.join(attempts_dir, str(os.getpid()))
    capture_dir = workdir
    try:
        _prepare_workdir(workdir)
        if isolate:
            capture_dir = _enter_private_namespaces(workdir, os.path.dirname(attempts_dir))
        setup_error = None
    except OSError as exc:
        setup_error = exc
    if not _receive_connection():
        return
    send_frame(CONNECTION_FD, b'{"started":true}')
    request = json.loads(recv_frame(CONNECTION_FD))
    if setup_error is not None:
        result: bytes | dict[str, str] = _failure(
            "ExecutorError", f"could not set up the attempt: {setup_error}"
        )
    else:
        _limit_resources(request["timeout_seconds"])
        result = _run_user_code(request)
    _flush_user_output()
    stdout = read_capped(os.path.join(capture_dir, "stdout"), output_cap)
    stderr = read_capped(os.path.join(capture_dir, "stderr"), output_cap)
    send_frame(CONNECTION_FD, _reply(result, stdout, stderr))
    # After the reply, so the engine does not wait for it; the zygote removes what is left.
    for name in ("stdout", "stderr"):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(capture_dir, name))
    if not isolate:
        shutil.rmtree(workdir, ignore_errors=True)


def _enter_private_namespaces(workdir: str, runtime_dir: str) -> str:
    """Fork the attempt's runner as PID 1 of fresh namespaces; return where its captures are.

    The spare stays behind as the runner's parent, so the zygote sees its exit status.
    """
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID), "unshare(CLONE_NEWNS | CLONE_NEWPID)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    # Held open across the new /tmp, which may cover the runtime directory.
    workdir_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    _mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, PRIVATE_TMP_OPTIONS)
    # /dev/shm is the other place any process may write: one per attempt too.
    if os.path.isdir("/dev/shm"):
        _mount(b"tmpfs", "/dev/shm", b"tmpfs", MS_NOSUID | MS_NODEV, PRIVATE_TMP_OPTIONS)
    os.makedirs(runtime_dir, exist_ok=True)
    # Only this attempt's capture files stay in view: not the socket, nor other attempts.
    _mount(b"/proc/self/fd/%d" % workdir_fd, runtime_dir, None, MS_BIND, None)
    os.close(workdir_fd)
    os.mkdir(PRIVATE_SCRATCH)
    runner = os.fork()
    if runner != 0:
        _mirror_exit(runner)
    os.setsid()
    _die_with_parent()
    _mount(b"proc", "/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    _drop_capabilities()
    os.chdir(PRIVATE_SCRATCH)
    return runtime_dir


def _children_of(parent: int) -> list[int]:
    """Pids whose parent is `parent`, from /proc (the sandbox's own PID namespace)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            children.append(int(entry))
    return children


def _mirror_exit(runner: int) -> NoReturn:
    """Wait for the runner and end the same way, for the zygote to report."""
    os.closerange(0, CONNECTION_FD + 1)
    _, status = os.waitpid(runner, 0)
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


class _CapabilityHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapabilityData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_capabilities() -> None:
    """Give up every capability for good, so no later exec as uid 0 regains them."""
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT)")
    capability = 0
    while _prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) == 0:
        capability += 1
    header = _CapabilityHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapabilityData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _keep_only_channel(channel_fd: int) -> None:
    """Close every inherited descriptor (the zygote's, other attempts') but stdio and ours."""
    if channel_fd != CONNECTION_FD:
        os.dup2(channel_fd, CONNECTION_FD, inheritable=False)
    os.closerange(CONNECTION_FD + 1, os.sysconf("SC_OPEN_MAX"))


def _prepare_workdir(workdir: str) -> None:
    """Point stdio at this attempt's capture files and work in its own scratch directory."""
    scratch = os.path.join(workdir, "work")
    os.makedirs(scratch)
    for target, path, flags in (
        (0, os.devnull, os.O_RDONLY),
        (1, os.path.join(workdir, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_EXCL),
        (2, os.path.join(workdir, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_EXCL),
    ):
        fd = os.open(path, flags, 0o600)
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(scratch)


def _receive_connection() -> bool:
    """Wait for an attempt's connection on the hand-off channel; put it at CONNECTION_FD."""
    channel = socket.socket(fileno=CONNECTION_FD)
    try:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    finally:
        channel.detach()
    if not fds:
        return False  # The zygote is shutting down.
    os.dup2(fds[0], CONNECTION_FD, inheritable=False)
    os.close(fds[0])
    return True


def _limit_resources(timeout_seconds: float) -> None:
    cpu_seconds = math.ceil(timeout_seconds) + 1
    _lower_limit(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)
    _lower_limit(resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES)
    _lower_limit(resource.RLIMIT_AS, ADDRESS_SPACE_LIMIT_BYTES, ADDRESS_SPACE_LIMIT_BYTES)
    _lower_limit(resource.RLIMIT_NPROC, PROCESS_COUNT_LIMIT, PROCESS_COUNT_LIMIT)
    _lower_limit(resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT, OPEN_FILES_LIMIT)


def _lower_limit(which: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def _run_user_code(request: dict[str, Any]) -> bytes | dict[str, str]:
    """Compile, load and call the node's code: its result as JSON, or the failure's fields."""
    source: str = request["code"]
    entrypoint: str = request["entrypoint"]
    linecache.cache[NODE_FILENAME] = (len(source), None, source.splitlines(True), NODE_FILENAME)
    try:
        compiled = compile(source, NODE_FILENAME, "exec")
    except SyntaxError as exc:
        detail = "".join(traceback.format_exception_only(exc)).rstrip()
        return _failure(type(exc).__name__, detail)

    namespace: dict[str, Any] = {"__name__": "__node__", "__builtins__": builtins}
    try:
        exec(compiled, namespace)
        function = namespace.get(entrypoint)
        if not callable(function):
            return _failure(
                "EntrypointNotFound",
                f"the code defines no function named {entrypoint!r}; define it, "
                "or set config.entrypoint to the function to call",
            )
        result = function(**request["inputs"])
    except BaseException as exc:
        return _failure(type(exc).__name__, _describe_user_exception(exc))

    try:
        output = json.dumps(result, allow_nan=False).encode()
    except Exception as exc:
        return _failure(
            "ResultNotJSON",
            f"{entrypoint}() returned a {type(result).__name__}, which is not JSON-serialisable: {exc}",
        )
    if len(output) > request["result_cap_bytes"]:
        return _failure(
            "ResultTooLarge",
            f"{entrypoint}() returned {len(output)} bytes of JSON; "
            f"the limit is {request['result_cap_bytes']} bytes",
        )
    return output


def _describe_user_exception(exc: BaseException) -> str:
    try:
        detail = str(exc)
    except Exception:
        detail = f"<unprintable {type(exc).__name__}>"
    if isinstance(exc, MemoryError):
        detail = f"{detail} (the node may use at most {ADDRESS_SPACE_LIMIT_BYTES} bytes of memory)"
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == NODE_FILENAME]
    if not frames:
        return detail
    lines = "".join(traceback.StackSummary.from_list(frames[-TRACEBACK_FRAMES:]).format())
    return f"{detail}\n\nTraceback (node code, most recent call last):\n{lines}".rstrip()


def _failure(error_class: str, message: str) -> dict[str, str]:
    if len(message) > ERROR_MESSAGE_CAP_CHARS:
        message = message[:ERROR_MESSAGE_CAP_CHARS] + TRUNCATION_MARK
    return {"error_class": error_class, "error_message": message}


def _reply(result: bytes | dict[str, str], stdout: str, stderr: str) -> bytes:
    streams = json.dumps({"stdout": stdout, "stderr": stderr}).encode()
    if isinstance(result, bytes):
        # The result is already JSON: splice it in rather than decode and encode it again.
        return b'{"ok":true,"output":' + result + b"," + streams[1:]
    return json.dumps({"ok": False, **result, "stdout": stdout, "stderr": stderr}).encode()


def _flush_user_output() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        # User code may have replaced or closed a stream; what reached the file is kept.
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
