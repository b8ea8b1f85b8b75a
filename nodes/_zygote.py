"""The python node's zygote: a warm process that forks one fresh attempt per request.

Run as `python -S -m nodes._zygote CONFIG_JSON` (see `ZygoteConfig`), inside the sandbox that
`nodes.sandbox` builds. The engine created, bound and listens on the zygote's socket and passes it
in as a descriptor, so the sandbox holds no path of the host's.

Each attempt is two processes, forked ahead of demand:

- the *spare*, which in isolated mode becomes an unprivileged uid and enters a user, mount and
  PID namespace of its own, mounts the attempt's size-capped private /tmp, and then supervises:
  it takes the engine's connection, hands the request to the runner, reads the runner's stdout
  and stderr from pipes it owns (keeping the first bytes up to the cap, discarding the rest) and
  answers the engine with the result and the output;
- the *runner*, PID 1 of the attempt's PID namespace, which mounts its own /proc, lowers its
  limits, drops every capability, sets no_new_privs and a seccomp filter, and only then runs the
  user's code.

The engine never reads a file an attempt could have replaced: output travels over pipes and the
result over a socket, both opened before user code ran. The zygote itself does not depend on
the engine's code: it imports only the standard library and `nodes._confine`.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import errno
import fcntl
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
import site
import socket
import struct
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from typing import Any, NoReturn

from nodes import _confine

# Passed on to user code; everything else in the engine's environment may hold secrets.
KEPT_ENVIRONMENT = ("LANG", "LANGUAGE", "TZ")
KEPT_ENVIRONMENT_PREFIXES = ("LC_",)
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"

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
READY_LINE = b"ready\n"
SPARE_CHILDREN = 2

NODE_FILENAME = "<node>"
FRAME_HEADER = struct.Struct(">I")
TRUNCATION_MARK = "\n... [truncated]"
TRACEBACK_FRAMES = 5
ERROR_MESSAGE_CAP_CHARS = 16 * 1024
# Room in the runner's reply for the envelope and an error message, beyond the result itself.
REPLY_OVERHEAD_BYTES = 256 * 1024
# How long the zygote waits for an engine to take a report; it serves nobody else meanwhile.
REPORT_SEND_TIMEOUT_SECONDS = 1.0
# An attempt's leftovers may hold its pipes open without a PID namespace: read them this long.
LEFTOVER_OUTPUT_SECONDS = 0.2

FILE_SIZE_LIMIT_BYTES = 64 * 1024 * 1024
ADDRESS_SPACE_LIMIT_BYTES = 1024 * 1024 * 1024
PROCESS_COUNT_LIMIT = 64
OPEN_FILES_LIMIT = 256
DEFAULT_SCRATCH_BYTES = 64 * 1024 * 1024
SCRATCH_INODES = 4096
SCRATCH = "/tmp"
# User code's uid and gid inside its own user namespace.
ATTEMPT_UID = 1000
# Where the sandbox's cgroups are (see `nodes.cgroups`); no attempt sees it.
CGROUP_INSIDE = "/citadel/cgroup"
# One core's worth of CPU time per period, whatever the attempt forks.
CPU_PERIOD_MICROSECONDS = 100_000
# Where v1 and v2 memory cgroups count their OOM kills.
OOM_COUNTERS = ("memory.oom_control", "memory.events")

CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
# In a spare: its end of the hand-off channel. In a runner: its end of the spare's socket.
CONNECTION_FD = 3


class ConnectionClosed(Exception):
    """The peer closed the connection before a whole frame arrived."""


@dataclass(frozen=True)
class ZygoteConfig:
    """What the engine tells the zygote, as one JSON argument."""

    listen_fd: int
    output_cap_bytes: int
    # The runner's result, beyond which its reply is a protocol failure (the engine's setting).
    result_cap_bytes: int
    # Isolated: every attempt in namespaces of its own, as `sandbox_uid` when started as root.
    isolate: bool
    sandbox_uid: int = 65534
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES
    # Directories of packages user code may import (site directories, .pth files honoured).
    packages: tuple[str, ...] = ()
    # The sandbox gave us no /proc of our own (as root, bwrap's would refuse nested mounts).
    mount_proc: bool = False
    # The engine's pid, when nothing else (bubblewrap) ties our life to it.
    parent_pid: int = 0
    # Which executor this is, for `ps` (the engine's runtime directory; not used inside).
    label: str = ""
    # Each attempt gets a network namespace of its own (only loopback), so no attempt can reach
    # another's listening sockets; a networked zygote's attempts share its network instead.
    private_network: bool = True
    # Cgroups delegated to this sandbox (`nodes.cgroups`): version 1 or 2, and their controllers
    # at CGROUP_INSIDE; version 0 for none.
    cgroup_version: int = 0
    cgroup_controllers: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> ZygoteConfig:
        values = json.loads(text)
        for name in ("packages", "cgroup_controllers"):
            values[name] = tuple(values.get(name, ()))
        return cls(**values)

    def dumps(self) -> str:
        return json.dumps(
            {
                **self.__dict__,
                "packages": list(self.packages),
                "cgroup_controllers": list(self.cgroup_controllers),
            }
        )

    @property
    def memory_bytes(self) -> int:
        return attempt_memory_bytes(self.scratch_bytes)

    def cgroup_directories(self, slot: int) -> list[str]:
        """The cgroup directories of one attempt slot, inside the sandbox."""
        if self.cgroup_version == 1:
            return [f"{CGROUP_INSIDE}/{controller}/{slot}" for controller in self.cgroup_controllers]
        if self.cgroup_version == 2:
            return [f"{CGROUP_INSIDE}/{slot}"]
        return []


def attempt_memory_bytes(scratch_bytes: int) -> int:
    """What an attempt's cgroup may hold: its address space's worth, and its scratch tmpfs."""
    return ADDRESS_SPACE_LIMIT_BYTES + scratch_bytes


def kept_environment(environ: dict[str, str]) -> dict[str, str]:
    """The part of an environment that user code may see."""
    kept = {
        name: value
        for name, value in environ.items()
        if name in KEPT_ENVIRONMENT or name.startswith(KEPT_ENVIRONMENT_PREFIXES)
    }
    return {**kept, "PATH": SANDBOX_PATH, "HOME": SCRATCH}


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


def _check(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what} failed: {os.strerror(number)}")


def _mount(source: bytes | None, target: str, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    _check(_libc.mount(source, os.fsencode(target), fstype, flags, data), f"mount on {target}")


@dataclass
class Child:
    """A forked spare: waiting while it holds a hand-off channel, then supervising an attempt."""

    pid: int
    pidfd: int
    channel: socket.socket | None
    cgroup_slot: int | None = None
    connection: socket.socket | None = None


class Zygote:
    """The zygote's loop: hands connections to spare children and reports spares that vanished."""

    def __init__(self, config: ZygoteConfig) -> None:
        self.config = config
        self.pid = os.getpid()
        self.children: dict[int, Child] = {}
        # Attempt connections, by descriptor: the engine hangs up on one to have it killed.
        self.hang_ups: dict[int, Child] = {}
        self.spares: list[Child] = []
        # Attempt cgroups are made once and reused (making and removing a memory cgroup is dear):
        # free ones, and those of ended attempts whose last process may still be leaving.
        self.free_cgroup_slots: list[int] = []
        self.draining_cgroup_slots: list[int] = []
        self.cgroup_slots = 0
        self.poller = select.poll()
        self.listener = socket.socket(fileno=config.listen_fd)

    def serve(self) -> NoReturn:
        """Accept attempt connections until the engine closes our stdin."""
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
            # Spares use it blocking; accept() from a non-blocking listener may not be.
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
        slot = self._cgroup_slot()
        pid = os.fork()
        if pid == 0:
            _run_spare(theirs.fileno(), self.pid, self.config, slot)
        theirs.close()
        pidfd = os.pidfd_open(pid)
        child = Child(pid, pidfd, ours, slot)
        self.children[pidfd] = child
        self.poller.register(pidfd, select.POLLIN)
        return child

    def _kill(self, child: Child) -> None:
        """Kill the runner of an attempt whose engine hung up: it timed out, or has its reply.

        The spare stays, to report how the runner ended and what it printed. The runner is the
        init of the attempt's PID namespace, in a session of its own, and may have dropped its
        death signal: kill it by pid, which ends everything in that namespace. It is the
        unreaped child of the live spare, so its pid is not recycled.
        """
        assert child.connection is not None
        self.poller.unregister(child.connection.fileno())
        for runner in _children_of(child.pid):
            with contextlib.suppress(OSError):
                os.kill(runner, signal.SIGKILL)

    def _finish(self, child: Child) -> None:
        """Reap an exited spare, kill what it left behind, and report it if it could not."""
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
            # A spare that reported exits 0; one that could not leaves the engine to us.
            if status != 0:
                _send_ending(child.connection, status, "", "")
            child.connection.close()
        if child.cgroup_slot is not None:
            self.draining_cgroup_slots.append(child.cgroup_slot)

    def _cgroup_slot(self) -> int | None:
        """A cgroup slot for a new spare: an emptied one, or a new one with the attempt's limits."""
        if not self.config.cgroup_version:
            return None
        for slot in list(self.draining_cgroup_slots):
            try:
                with open(os.path.join(self.config.cgroup_directories(slot)[0], "cgroup.procs")) as procs:
                    emptied = not procs.read().strip()
            except FileNotFoundError:
                # Removed from outside (an operator): a new slot takes its place.
                self.draining_cgroup_slots.remove(slot)
                continue
            if emptied:
                self.draining_cgroup_slots.remove(slot)
                self.free_cgroup_slots.append(slot)
        if self.free_cgroup_slots:
            return self.free_cgroup_slots.pop()
        slot, self.cgroup_slots = self.cgroup_slots, self.cgroup_slots + 1
        for directory in self.config.cgroup_directories(slot):
            os.makedirs(directory, exist_ok=True)
            limit_cgroup(directory, self.config)
        return slot


def _send_ending(connection: socket.socket, status: int, stdout: str, stderr: str, oom: bool = False) -> None:
    ending: dict[str, Any] = (
        {"exit": "signal", "signal": os.WTERMSIG(status)}
        if os.WIFSIGNALED(status)
        else {"exit": "status", "status": os.waitstatus_to_exitcode(status)}
    )
    ending["stdout"] = stdout
    ending["stderr"] = stderr
    if oom:
        ending["oom"] = True
    # The engine may already have its reply and have hung up; then nobody needs this.
    with contextlib.suppress(OSError):
        connection.settimeout(REPORT_SEND_TIMEOUT_SECONDS)
        connection.sendall(encode_frame(json.dumps(ending).encode()))


def serve(config: ZygoteConfig) -> NoReturn:
    """Start the zygote: tie it to the engine, scrub its environment, warm it up, serve."""
    _confine.die_with_parent()
    if config.parent_pid and os.getppid() != config.parent_pid:
        os._exit(0)
    if config.mount_proc:
        # Started as root by a privileged bubblewrap: a /proc of the sandbox's PID namespace,
        # then only what making spares needs (becoming the sandbox uid, killing runners).
        _mount(b"proc", "/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        _confine.keep_capabilities((CAP_KILL, CAP_SETGID, CAP_SETUID))
    for directory in config.packages:
        site.addsitedir(directory)
    kept = kept_environment(dict(os.environ))
    os.environ.clear()
    os.environ.update(kept)
    for name in PRELOADED_MODULES:
        importlib.import_module(name)
    # Line buffering keeps what user code printed before a timeout kill.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(encoding="utf-8", errors="backslashreplace", line_buffering=True)  # type: ignore[union-attr]
    Zygote(config).serve()


def _run_spare(channel_fd: int, zygote_pid: int, config: ZygoteConfig, cgroup_slot: int | None) -> NoReturn:
    """Run one spare's whole life and exit without ever returning into the zygote's loop."""
    exit_status = 1
    try:
        _spare(channel_fd, zygote_pid, config, cgroup_slot)
        exit_status = 0
    except BaseException:
        # Our stderr is the engine's log: a fault of ours, never user code's output.
        traceback.print_exc()
    finally:
        os._exit(exit_status)


@dataclass
class Runner:
    """The spare's handle on its runner: pid, its exit, its socket and its output pipes."""

    pid: int
    pidfd: int
    socket: socket.socket
    streams: dict[int, bytearray] = field(default_factory=dict)


def _spare(channel_fd: int, zygote_pid: int, config: ZygoteConfig, cgroup_slot: int | None) -> None:
    """Be a spare until handed a connection, then supervise that one attempt."""
    # Inherited zygote objects must never be finalized here: they would close
    # descriptor numbers that this attempt has reused.
    gc.freeze()
    os.setsid()
    _confine.die_with_parent()
    if os.getppid() != zygote_pid:
        return
    _keep_only(channel_fd)
    runner: Runner | None = None
    setup_error: OSError | None = None
    # Without namespaces the attempt works in a directory of the host's; see `isolation`.
    scratch = SCRATCH if config.isolate else tempfile.mkdtemp(prefix="citadel-attempt-")
    memory_cgroup: MemoryCgroup | None = None
    try:
        if cgroup_slot is not None:
            memory_cgroup = _join_cgroups(config.cgroup_directories(cgroup_slot))
        if config.isolate:
            _enter_attempt_namespaces(config)
        runner = _fork_runner(config, scratch)
    except OSError as exc:
        setup_error = exc
    connection = _receive_connection()
    if connection is None:
        return  # The zygote is shutting down; the runner dies with us.
    try:
        connection.sendall(encode_frame(b'{"started":true}'))
        request = recv_frame(connection.fileno())
    except (OSError, ConnectionClosed):
        # An engine that gave up on a zygote which died left this connection in the backlog.
        return
    if runner is None:
        detail = _failure("ExecutorError", f"could not set up the attempt: {setup_error}")
        connection.sendall(encode_frame(_with_streams(_reply(detail), "", "")))
        return
    _supervise(runner, connection, request, config, memory_cgroup)
    if not config.isolate:
        shutil.rmtree(scratch, ignore_errors=True)


def _enter_attempt_namespaces(config: ZygoteConfig) -> None:
    """Become the attempt's unprivileged user in namespaces of its own, with a private /tmp."""
    # The new user namespace grants what mounting the attempt's own /tmp and /proc needs.
    namespaces = CLONE_NEWNS | CLONE_NEWPID
    if config.private_network:
        namespaces |= CLONE_NEWNET
    _confine.enter_user_namespace(config.sandbox_uid, ATTEMPT_UID, namespaces)
    if config.private_network:
        _loopback_up()
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    if config.cgroup_version:
        # Joined already; the attempt must not see, let alone change, its own limits.
        _mount(b"tmpfs", CGROUP_INSIDE, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k")
    options = f"size={config.scratch_bytes},nr_inodes={SCRATCH_INODES},mode=1777".encode()
    _mount(b"tmpfs", SCRATCH, b"tmpfs", MS_NOSUID | MS_NODEV, options)
    # /dev/shm is the other place any process may write: the same capped tmpfs.
    if os.path.isdir("/dev/shm"):
        _mount(SCRATCH.encode(), "/dev/shm", None, MS_BIND, None)


@dataclass(frozen=True)
class MemoryCgroup:
    """An attempt's memory cgroup, open, and how many OOM kills it had seen before the attempt."""

    fd: int
    kills_before: int

    def killed(self) -> bool:
        """Whether the kernel killed a process of the attempt for the cgroup's memory limit."""
        return _oom_kills(self.fd) > self.kills_before


def limit_cgroup(directory: str, config: ZygoteConfig) -> None:
    """Write an attempt's limits into one of its cgroup directories."""
    for name, value, required in _cgroup_limits(config):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            try:
                with open(path, "w") as file:
                    file.write(value)
            except OSError:
                if required:
                    raise


def _join_cgroups(directories: list[str]) -> MemoryCgroup | None:
    """Move this spare, and so its attempt, into its slot's cgroups.

    Done as root, before becoming the sandbox uid: the cgroups' files are root's, so user code
    cannot raise its limits.
    """
    memory = None
    for directory in directories:
        with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
            procs.write("0")
        if any(os.path.exists(os.path.join(directory, name)) for name in OOM_COUNTERS):
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            memory = MemoryCgroup(fd, _oom_kills(fd))
    return memory


def _cgroup_limits(config: ZygoteConfig) -> list[tuple[str, str, bool]]:
    """(file, value, required) for cgroup v1 and v2 alike; a file the version lacks is skipped.

    Swap limits are not required: the kernel offers them only with swap accounting on.
    """
    memory = str(config.memory_bytes)
    return [
        ("pids.max", str(PROCESS_COUNT_LIMIT), True),
        ("memory.limit_in_bytes", memory, True),
        ("memory.memsw.limit_in_bytes", memory, False),
        ("memory.max", memory, True),
        ("memory.swap.max", "0", False),
        ("cpu.cfs_period_us", str(CPU_PERIOD_MICROSECONDS), True),
        ("cpu.cfs_quota_us", str(CPU_PERIOD_MICROSECONDS), True),
        ("cpu.max", f"{CPU_PERIOD_MICROSECONDS} {CPU_PERIOD_MICROSECONDS}", True),
    ]


def _oom_kills(memory_cgroup: int) -> int:
    """How many processes the kernel has killed for this cgroup's memory limit, ever."""
    for name in OOM_COUNTERS:
        try:
            with open(os.open(name, os.O_RDONLY, dir_fd=memory_cgroup)) as file:
                for line in file:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except OSError:
            continue
    return 0


def _loopback_up() -> None:
    """A new network namespace's loopback starts down; the attempt's own servers need it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        fcntl.ioctl(probe, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", IFF_UP))


def _fork_runner(config: ZygoteConfig, scratch: str) -> Runner:
    stdout_read, stdout_write = os.pipe()
    stderr_read, stderr_write = os.pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        _run_runner(stdout_write, stderr_write, theirs.fileno(), config, scratch)
    for fd in (stdout_write, stderr_write):
        os.close(fd)
    theirs.close()
    return Runner(pid, os.pidfd_open(pid), ours, {stdout_read: bytearray(), stderr_read: bytearray()})


def _supervise(
    runner: Runner,
    connection: socket.socket,
    request: bytes,
    config: ZygoteConfig,
    memory_cgroup: MemoryCgroup | None,
) -> None:
    """Hand the request over, gather output, and answer the engine with the result or the end."""
    poller = select.poll()
    for fd in (*runner.streams, runner.pidfd, runner.socket.fileno()):
        poller.register(fd, select.POLLIN)
    with contextlib.suppress(OSError):
        runner.socket.sendall(encode_frame(request))
    frame = bytearray()
    reply: bytes | None = None
    cap = config.output_cap_bytes
    runner_ended = False
    while reply is None and not runner_ended:
        for fd, _ in poller.poll():
            if fd in runner.streams:
                if not _gather(fd, runner.streams[fd], cap):
                    poller.unregister(fd)
            elif fd == runner.socket.fileno():
                if not _receive(runner.socket, frame):
                    poller.unregister(fd)
            elif fd == runner.pidfd:
                runner_ended = True
        if runner_ended:
            # Its reply may be waiting behind the news of its exit.
            runner.socket.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while _receive(runner.socket, frame):
                    pass
        reply = _complete_frame(frame, config.result_cap_bytes + REPLY_OVERHEAD_BYTES)
    if reply is None:
        _report_end(runner, connection, cap, memory_cgroup)
        return
    # The runner wrote its output before its result: what is in the pipes now is all of it.
    for fd in runner.streams:
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError):
            while _gather(fd, runner.streams[fd], cap):
                pass
    stdout, stderr = (_text(buffer, cap) for buffer in runner.streams.values())
    connection.sendall(encode_frame(_with_streams(reply, stdout, stderr)))
    _kill_group(runner.pid)


def _report_end(
    runner: Runner, connection: socket.socket, cap: int, memory_cgroup: MemoryCgroup | None
) -> None:
    """The runner ended without a result: say how, with what it printed."""
    _kill_group(runner.pid)
    _, status = os.waitpid(runner.pid, 0)
    # An ended PID namespace holds no writer any more; without one, leftovers get a moment.
    for fd, buffer in runner.streams.items():
        readable, _, _ = select.select([fd], [], [], LEFTOVER_OUTPUT_SECONDS)
        while readable and _gather(fd, buffer, cap):
            readable, _, _ = select.select([fd], [], [], LEFTOVER_OUTPUT_SECONDS)
    stdout, stderr = (_text(buffer, cap) for buffer in runner.streams.values())
    _send_ending(connection, status, stdout, stderr, oom=memory_cgroup is not None and memory_cgroup.killed())


def _receive(channel: socket.socket, frame: bytearray) -> bool:
    """Add what the runner sent to its frame; False at the end of its sending."""
    chunk = channel.recv(65536)
    frame += chunk
    return bool(chunk)


def _gather(fd: int, buffer: bytearray, cap: int) -> bool:
    """Read what a pipe holds, keeping up to one byte past the cap; False at its end."""
    data = os.read(fd, 65536)
    if len(buffer) <= cap:
        buffer += data[: cap + 1 - len(buffer)]
    return bool(data)


def _text(buffer: bytearray, cap: int) -> str:
    if len(buffer) > cap:
        return buffer[:cap].decode("utf-8", "replace") + TRUNCATION_MARK
    return buffer.decode("utf-8", "replace")


def _complete_frame(frame: bytearray, limit: int) -> bytes | None:
    """The runner's reply once it has all arrived; a protocol failure if it cannot be one."""
    if len(frame) < FRAME_HEADER.size:
        return None
    (length,) = FRAME_HEADER.unpack_from(frame)
    if length > limit:
        return _reply(_failure("ProtocolError", _PROTOCOL_HINT % f"a {length}-byte frame"))
    if len(frame) < FRAME_HEADER.size + length:
        return None
    return bytes(frame[FRAME_HEADER.size : FRAME_HEADER.size + length])


_PROTOCOL_HINT = (
    "the node's process sent %s where its result belonged; did the code write to "
    f"file descriptor {CONNECTION_FD}?"
)


def _with_streams(reply: bytes, stdout: str, stderr: str) -> bytes:
    """The runner's reply object with the output the spare captured spliced in (it wins)."""
    streams = json.dumps({"stdout": stdout, "stderr": stderr}).encode()
    body = reply.strip()
    if len(body) < 3 or body[:1] != b"{" or body[-1:] != b"}":
        failure = _failure("ProtocolError", _PROTOCOL_HINT % "something other than a JSON object")
        return _with_streams(_reply(failure), stdout, stderr)
    return body[:-1] + b"," + streams[1:]


def _kill_group(pid: int) -> None:
    """Kill a runner's process group (its leftovers when there is no PID namespace)."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


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


def _keep_only(channel_fd: int) -> None:
    """Close every inherited descriptor (the zygote's, other attempts') but stderr and ours."""
    if channel_fd != CONNECTION_FD:
        os.dup2(channel_fd, CONNECTION_FD, inheritable=False)
    devnull = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1):
        os.dup2(devnull, target)
    os.close(devnull)
    os.closerange(CONNECTION_FD + 1, os.sysconf("SC_OPEN_MAX"))


def _receive_connection() -> socket.socket | None:
    """Wait for an attempt's connection on the hand-off channel."""
    channel = socket.socket(fileno=CONNECTION_FD)
    try:
        _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    finally:
        channel.close()
    if not fds:
        return None  # The zygote is shutting down.
    return socket.socket(fileno=fds[0])


def _run_runner(
    stdout_fd: int, stderr_fd: int, socket_fd: int, config: ZygoteConfig, scratch: str
) -> NoReturn:
    """The attempt itself: confine this process, wait for the request, run the user's code."""
    exit_status = 1
    try:
        os.setsid()
        _confine.die_with_parent()
        for source, target in ((stdout_fd, 1), (stderr_fd, 2), (socket_fd, CONNECTION_FD)):
            os.dup2(source, target, inheritable=target != CONNECTION_FD)
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.closerange(CONNECTION_FD + 1, os.sysconf("SC_OPEN_MAX"))
        setup_error = None
        try:
            _confine_runner(config, scratch)
        except OSError as exc:
            setup_error = exc
        request = json.loads(recv_frame(CONNECTION_FD))
        if setup_error is not None:
            result: bytes | dict[str, str] = _failure(
                "ExecutorError", f"could not confine the attempt: {setup_error}"
            )
        else:
            cpu_seconds = math.ceil(request["timeout_seconds"]) + 1
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
            result = _run_user_code(request)
        _flush_user_output()
        send_frame(CONNECTION_FD, _reply(result))
        exit_status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(exit_status)


def _confine_runner(config: ZygoteConfig, scratch: str) -> None:
    """Everything that narrows the runner, in an order that keeps each step possible."""
    if config.isolate:
        # PID 1 of the attempt's namespace: a /proc that shows only the attempt.
        _mount(b"proc", "/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    os.chdir(scratch)
    global _scratch_mib
    _scratch_mib = config.scratch_bytes // 2**20
    _confine.confine(
        {
            resource.RLIMIT_FSIZE: FILE_SIZE_LIMIT_BYTES,
            resource.RLIMIT_AS: ADDRESS_SPACE_LIMIT_BYTES,
            resource.RLIMIT_NPROC: PROCESS_COUNT_LIMIT,
            resource.RLIMIT_NOFILE: OPEN_FILES_LIMIT,
        }
    )


# For the hint on a full scratch space; set once the runner knows its configuration.
_scratch_mib = DEFAULT_SCRATCH_BYTES // 2**20


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
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        detail = f"{detail} (the node's scratch space, {SCRATCH}, holds at most {_scratch_mib} MiB)"
    elif isinstance(exc, OSError) and exc.errno == errno.EFBIG:
        detail = f"{detail} (a file the node writes may hold at most {FILE_SIZE_LIMIT_BYTES // 2**20} MiB)"
    frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if frame.filename == NODE_FILENAME]
    if not frames:
        return detail
    lines = "".join(traceback.StackSummary.from_list(frames[-TRACEBACK_FRAMES:]).format())
    return f"{detail}\n\nTraceback (node code, most recent call last):\n{lines}".rstrip()


def _failure(error_class: str, message: str) -> dict[str, str]:
    if len(message) > ERROR_MESSAGE_CAP_CHARS:
        message = message[:ERROR_MESSAGE_CAP_CHARS] + TRUNCATION_MARK
    return {"error_class": error_class, "error_message": message}


def _reply(result: bytes | dict[str, str]) -> bytes:
    if isinstance(result, bytes):
        # The result is already JSON: splice it in rather than decode and encode it again.
        return b'{"ok":true,"output":' + result + b"}"
    return json.dumps({"ok": False, **result}).encode()


def _flush_user_output() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        # User code may have replaced or closed a stream; what reached the file is kept.
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]


if __name__ == "__main__":
    serve(ZygoteConfig.parse(sys.argv[1]))
