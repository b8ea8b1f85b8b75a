"""The bubblewrap sandbox around the python executor's zygote: its command line and its probe."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

Isolation = Literal["bubblewrap", "rlimits"]
ISOLATION_SETTING_HINT = 'PythonExecutor(isolation="rlimits")'
PROBE_TIMEOUT_SECONDS = 5.0

# Directories that hold other users' or services' data; each becomes an empty tmpfs.
DEFAULT_HIDDEN_DIRECTORIES = (
    "/root",
    "/home",
    "/var/lib/postgresql",
    "/var/lib/mysql",
    "/var/lib/docker",
    "/etc/ssl/private",
    "/run/secrets",
    "/var/run/secrets",
)
# Single files cannot take a tmpfs; an empty file is bound over them instead.
DEFAULT_HIDDEN_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers")
# The engine's state in embedded mode, relative to its working directory.
DEFAULT_ENGINE_HOME = ".citadel"


class SandboxUnavailable(RuntimeError):
    """Bubblewrap cannot create the namespaces the python executor's sandbox needs."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"the python executor cannot sandbox user code: {reason}. Install bubblewrap and "
            "allow unprivileged user namespaces, or accept rlimits-only isolation (user code "
            f"then runs without namespaces) with {ISOLATION_SETTING_HINT}"
        )
        self.reason = reason


async def probe_bubblewrap() -> str:
    """The path of a bwrap that can create every namespace; SandboxUnavailable otherwise."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("no `bwrap` on PATH")
    command = [bwrap, "--unshare-all", "--ro-bind", "/", "/", "true"]
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


def hidden_directories(extra: Sequence[str]) -> list[str]:
    """Existing directories to hide: the defaults, the engine's home, and `extra`."""
    candidates = [*DEFAULT_HIDDEN_DIRECTORIES, str(Path.cwd() / DEFAULT_ENGINE_HOME), *extra]
    if "CITADEL_HOME" in os.environ:
        candidates.append(os.environ["CITADEL_HOME"])
    found: list[str] = []
    for candidate in candidates:
        path = os.path.realpath(candidate)
        if os.path.isdir(path) and path not in found:
            found.append(path)
    return found


def bubblewrap_command(
    bwrap: str,
    runtime_dir: Path,
    code_paths: Sequence[str],
    hidden_paths: Sequence[str],
    network: bool,
) -> list[str]:
    """Arguments that run a command under bwrap: read-only system, state hidden, runtime dir shared."""
    command = [bwrap, "--unshare-all"]
    if network:
        command.append("--share-net")
    command += [
        "--die-with-parent",
        "--new-session",
        # The zygote mounts each attempt's private /tmp and /proc in the user namespace.
        "--cap-add",
        "CAP_SYS_ADMIN",
        "--ro-bind",
        "/",
        "/",
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--tmpfs",
        "/tmp",
    ]
    hidden = hidden_directories(hidden_paths)
    system = [path for path in hidden if path in DEFAULT_HIDDEN_DIRECTORIES]
    state = [path for path in hidden if path not in system]
    for path in system:
        command += ["--tmpfs", path]
    for path in DEFAULT_HIDDEN_FILES:
        if os.path.isfile(path):
            command += ["--ro-bind", "/dev/null", path]
    # The interpreter and our code may live under a hidden directory such as /home, or under
    # /tmp (a checkout in a temporary folder): bring them back, read-only.
    for path in code_paths:
        if any(_is_within(path, parent) for parent in [*system, "/tmp"]):
            command += ["--ro-bind", path, path]
    # After the code paths: the engine's home usually sits inside the project.
    for path in state:
        command += ["--tmpfs", path]
    # Read-only, so no attempt can leave anything there for the next one to find.
    for path in [*system, *state]:
        command += ["--remount-ro", path]
    command += ["--bind", str(runtime_dir), str(runtime_dir), "--chdir", str(runtime_dir)]
    return command


def code_paths(project_root: Path) -> list[str]:
    """What the zygote must read: the interpreter, its packages, and the project."""
    paths = [str(project_root), sys.prefix, sys.base_prefix, os.path.dirname(sys.executable)]
    return list(dict.fromkeys(os.path.realpath(path) for path in paths))


def _is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")
