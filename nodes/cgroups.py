"""Control groups for the sandbox: one per sandbox under the engine's own, where the kernel lets us.

When the engine may create cgroups (it runs as root and the hierarchy is writable), each sandbox
gets a directory per controller (`pids`, `memory`, `cpu`) below the engine's own cgroup. The
sandbox sees it at `CGROUP_INSIDE` and makes one child per attempt there, with the attempt's
limits, before user code runs; user code never sees it. Where that is not possible the sandbox
runs on rlimits alone, and the executor says so in its log.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CONTROLLERS = ("pids", "memory", "cpu")
CGROUP_INSIDE = "/citadel/cgroup"
# A sandbox's cgroups are named `citadel-<engine pid>-<its start time>-<sandbox>`: an engine that
# was killed leaves them behind, and the next one to start removes those whose engine is gone.
PREFIX = "citadel-"


@dataclass(frozen=True)
class Delegation:
    """The cgroup directories created for one sandbox: host path -> path inside, and the version."""

    version: int
    directories: tuple[tuple[str, str], ...]

    @property
    def controllers(self) -> tuple[str, ...]:
        if self.version == 2:
            return CONTROLLERS
        return tuple(Path(inside).name for _, inside in self.directories)

    def remove(self) -> bool:
        """Remove the directories and any attempt's left behind; False while one still holds a
        process (a killed sandbox's processes take a moment to leave)."""
        for host, _ in self.directories:
            _remove_tree(Path(host))
        return not any(Path(host).exists() for host, _ in self.directories)


def _remove_tree(path: Path) -> None:
    """Remove a sandbox's cgroup and its attempts' (a cgroup holding a process stays)."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            with contextlib.suppress(OSError):
                child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def owner_tag(pid: int) -> str | None:
    """`<pid>-<start time>` of a live process, which no later process with that pid shares."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid}-{stat.rsplit(')', 1)[1].split()[19]}"


def _sweep(parent: Path) -> None:
    """Remove what killed engines left below `parent`: sandbox cgroups whose engine is gone."""
    for path in parent.glob(f"{PREFIX}*"):
        pid, _, rest = path.name.removeprefix(PREFIX).partition("-")
        if not pid.isdigit() or not path.is_dir():
            continue
        if owner_tag(int(pid)) != f"{pid}-{rest.split('-', 1)[0]}":
            # An attempt's processes still leaving keep their cgroup; the next sweep gets it.
            _remove_tree(path)


def delegate(name: str) -> Delegation | None:
    """Create this sandbox's cgroups below the engine's own; None where the kernel does not let us.

    `name` is unique among this engine's sandboxes (the sandbox's runtime directory).
    """
    if os.geteuid() != 0:
        return None
    try:
        return _delegate_v1(name) or _delegate_v2(name)
    except OSError as exc:
        logger.info("the sandbox runs without cgroups: %s", exc)
        return None


def _directory_name(name: str) -> str:
    return f"{PREFIX}{owner_tag(os.getpid())}-{name}"


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per controller ("" for the unified v2 hierarchy)."""
    found: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


def _mounts() -> dict[str, str]:
    """Where each cgroup v1 controller, and the v2 hierarchy (""), is mounted."""
    found: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        fstype, options = fields[separator + 1], fields[separator + 3]
        if fstype == "cgroup":
            for option in options.split(","):
                if option in CONTROLLERS:
                    found.setdefault(option, fields[4])
        elif fstype == "cgroup2":
            found.setdefault("", fields[4])
    return found


def _delegate_v1(name: str) -> Delegation | None:
    mounts, own = _mounts(), _own_cgroups()
    if not all(controller in mounts and controller in own for controller in CONTROLLERS):
        return None
    directories = []
    for controller in CONTROLLERS:
        parent = Path(mounts[controller]) / own[controller].lstrip("/")
        _sweep(parent)
        host = parent / _directory_name(name)
        host.mkdir(exist_ok=True)
        directories.append((str(host), f"{CGROUP_INSIDE}/{controller}"))
    return Delegation(1, tuple(directories))


def _delegate_v2(name: str) -> Delegation | None:
    mounts, own = _mounts(), _own_cgroups()
    if "" not in mounts or "" not in own:
        return None
    parent = Path(mounts[""]) / own[""].lstrip("/")
    available = (parent / "cgroup.controllers").read_text().split()
    if not all(controller in available for controller in CONTROLLERS):
        return None
    # Fails (EBUSY) where the engine's own cgroup holds processes: v2 keeps controllers to leaves.
    (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
    _sweep(parent)
    host = parent / _directory_name(name)
    host.mkdir(exist_ok=True)
    (host / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS))
    return Delegation(2, ((str(host), CGROUP_INSIDE),))
