"""The sandbox user code runs in: what of the host it sees (an allow-list), and the bubblewrap
command line that builds it.

An attempt's filesystem starts empty. `allow_list()` names everything it gets, all read-only: the
operating system's programs and shared libraries (`/usr` and its top-level links), the Python
interpreter and its standard library, the package directories user code may import, the sandbox's
own few modules, and, for a node with network, the files name resolution and TLS need. Besides
those there is a minimal `/dev`, a `/proc` of the attempt's own PID namespace, and a private,
size-capped `/tmp`. Nothing else of the host is there: no `/etc` beyond the list, no `/run`,
`/var`, `/home`, `/root`, `/srv`, `/mnt`, `/media`, `/opt`, no project checkout, no CITADEL_HOME,
no secrets directory, no socket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Isolation = Literal["bubblewrap", "rlimits"]
ISOLATION_SETTING_HINT = 'PythonExecutor(isolation="rlimits")'
PROBE_TIMEOUT_SECONDS = 5.0

NODES_DIR = Path(__file__).resolve().parent
# The sandbox's own modules (standard library only), at /citadel/nodes inside.
SANDBOX_ROOT = "/citadel"
SANDBOX_MODULES = ("__init__.py", "_zygote.py", "_confine.py", "_v8worker.py")
# Package directories appear inside as /citadel/packages/0, /citadel/packages/1, ...
SANDBOX_PACKAGES = f"{SANDBOX_ROOT}/packages"
# The operating system: programs and the shared libraries they load.
SYSTEM_DIRECTORY = "/usr"
SYSTEM_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# Read by the dynamic loader and the C library whether or not the node has network.
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime")
# What name resolution and TLS read, for a node with network only.
NETWORK_FILES = (
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
)
# The zygote's own /tmp; attempts mount theirs over it.
ZYGOTE_TMP_BYTES = 1024 * 1024
# What a zygote started by root keeps: mounting its /proc, becoming the sandbox uid, killing runners.
PRIVILEGED_CAPABILITIES = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL")


class SandboxUnavailable(RuntimeError):
    """Bubblewrap cannot create the namespaces an executor's sandbox needs."""

    def __init__(self, reason: str, executor: str = "python", setting: str = ISOLATION_SETTING_HINT) -> None:
        super().__init__(
            f"the {executor} executor cannot sandbox user code: {reason}. Install bubblewrap and "
            "allow unprivileged user namespaces, or accept rlimits-only isolation (user code "
            f"then runs without namespaces) with {setting}"
        )
        self.reason = reason


@dataclass(frozen=True)
class AllowList:
    """Everything of the host an attempt sees: (host path, path inside) pairs, read-only."""

    binds: tuple[tuple[str, str], ...]
    links: tuple[tuple[str, str], ...] = field(default=())

    @property
    def inside_packages(self) -> tuple[str, ...]:
        return tuple(inside for _, inside in self.binds if inside.startswith(SANDBOX_PACKAGES + "/"))

    def describe(self) -> str:
        """One line for the log: what attempts see."""
        return ", ".join(
            [f"{host} as {inside}" if host != inside else host for host, inside in self.binds]
            + [f"{link} -> {target}" for target, link in self.links]
        )


def default_packages() -> list[str]:
    """The engine's own site-packages: what user code may import unless configured otherwise."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(os.path.realpath(paths[name]) for name in ("purelib", "platlib")))


def interpreter() -> str:
    """The real interpreter binary, outside any virtual environment (its prefix is what we bind)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


def allow_list(packages: Sequence[str], network: bool, extra: Sequence[tuple[str, str]] = ()) -> AllowList:
    """What an attempt sees of the host, in the order bubblewrap must mount it."""
    binds: list[tuple[str, str]] = [(SYSTEM_DIRECTORY, SYSTEM_DIRECTORY)]
    links: list[tuple[str, str]] = []
    for name in SYSTEM_LINKS:
        path = f"/{name}"
        if os.path.islink(path):
            links.append((os.readlink(path), path))
        elif os.path.isdir(path):
            binds.append((path, path))
    prefix = os.path.realpath(sys.base_prefix)
    if not _is_within(prefix, SYSTEM_DIRECTORY):
        # At its own path: a shared libpython is found by an absolute RPATH.
        binds.append((prefix, prefix))
    executable_dir = os.path.dirname(interpreter())
    if not any(_is_within(executable_dir, host) for host, _ in binds):
        binds.append((executable_dir, executable_dir))
    for path in SYSTEM_FILES + (NETWORK_FILES if network else ()):
        if os.path.exists(path):
            binds.append((os.path.realpath(path), path))
    binds += [(str(NODES_DIR / name), f"{SANDBOX_ROOT}/nodes/{name}") for name in SANDBOX_MODULES]
    existing = [os.path.realpath(path) for path in packages if os.path.isdir(path)]
    binds += [(path, f"{SANDBOX_PACKAGES}/{index}") for index, path in enumerate(dict.fromkeys(existing))]
    binds += list(extra)
    return AllowList(tuple(binds), tuple(links))


def privileged() -> bool:
    """Started by root, bubblewrap builds the sandbox itself and user code gets a uid of its own."""
    return os.geteuid() == 0


def bubblewrap_command(
    bwrap: str,
    allowed: AllowList,
    network: bool,
    capabilities: Sequence[str] = PRIVILEGED_CAPABILITIES,
    mounts_proc: bool = True,
    writable: Sequence[tuple[str, str]] = (),
) -> list[str]:
    """Arguments that run a command under bwrap in a filesystem of exactly `allowed`.

    Started by root, the command keeps `capabilities` (the zygote's by default) and, if it
    `mounts_proc` itself (the zygote, whose attempts nest PID namespaces), no /proc from bwrap.
    """
    command = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
    if not network:
        command.append("--unshare-net")
    if privileged():
        # No user namespace of bubblewrap's: the zygote, root in this sandbox only, makes each
        # attempt one as the unprivileged sandbox uid (the JavaScript worker, one for itself). The
        # zygote mounts /proc itself, because a nested namespace may not mount a /proc that
        # bubblewrap has partly covered.
        for capability in capabilities:
            command += ["--cap-add", capability]
    else:
        command.append("--unshare-user")
    command += ["--die-with-parent", "--new-session"]
    # Directories bubblewrap makes on the way to a bind would be private to it otherwise.
    made: set[str] = {"/"}
    for _, inside in [*allowed.binds, *writable]:
        for parent in reversed(Path(inside).parents):
            if str(parent) not in made:
                made.add(str(parent))
                command += ["--perms", "0755", "--dir", str(parent)]
    for host, inside in allowed.binds:
        command += ["--ro-bind", host, inside]
    # The sandbox's delegated cgroups (`nodes.cgroups`): the zygote hides them from attempts.
    for host, inside in writable:
        command += ["--bind", host, inside]
    for target, link in allowed.links:
        command += ["--symlink", target, link]
    command += ["--dev", "/dev"]
    command += ["--dir", "/proc"] if privileged() and mounts_proc else ["--proc", "/proc"]
    command += ["--size", str(ZYGOTE_TMP_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    return command


async def probe_bubblewrap() -> str:
    """The path of a bwrap that can build the sandbox; SandboxUnavailable otherwise."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("no `bwrap` on PATH")
    sandbox = bubblewrap_command(bwrap, allow_list((), network=False), network=False)
    command = [*sandbox, interpreter(), "-S", "-c", ""]
    try:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            _, stderr = await process.communicate()
    except (OSError, TimeoutError) as exc:
        raise SandboxUnavailable(f"`{' '.join(command)}` could not run: {exc!r}") from None
    if process.returncode != 0:
        detail = stderr.decode(errors="replace").strip() or f"exit status {process.returncode}"
        raise SandboxUnavailable(f"`{' '.join(command)}` failed: {detail}")
    return bwrap


async def bubblewrap_unless_rlimits(
    isolation: Isolation, executor: str, setting: str, runs: str, exposure: str
) -> str | None:
    """The bwrap the `executor` sandboxes with; None where it cannot run and `isolation` accepts
    rlimits only, logged as a warning of what then `runs` unsandboxed and its `exposure`."""
    try:
        return await probe_bubblewrap()
    except SandboxUnavailable as exc:
        if isolation == "bubblewrap":
            raise SandboxUnavailable(exc.reason, executor, setting) from None
        logger.warning(
            "the %s executor runs %s with rlimits only, without namespaces (isolation=%r was set): %s. %s",
            executor,
            runs,
            isolation,
            exposure,
            exc.reason,
        )
        return None


def _is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")
