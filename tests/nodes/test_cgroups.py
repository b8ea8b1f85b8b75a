"""Specification of the sandbox's cgroups on the host: made per sandbox, removed at stop, and
what a killed engine left behind removed by the next one that starts."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from nodes.cgroups import delegate, owner_tag
from nodes.python import PythonExecutor
from tests.nodes.support import make_task, started

PIDS = Path("/sys/fs/cgroup/pids")


def own_pids_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return PIDS / path.lstrip("/")
    raise AssertionError("no pids cgroup")


@pytest.fixture
def cgroups_here() -> Path:
    probe = delegate(f"citadel-probe-{uuid.uuid4().hex[:8]}")
    if probe is None or probe.version != 1:
        pytest.skip("the engine cannot create cgroup v1 directories here (not root, or no v1 hierarchy)")
    probe.remove()
    return own_pids_cgroup()


async def test_a_stopped_executor_leaves_no_cgroup_behind(cgroups_here: Path) -> None:
    before = {path.name for path in cgroups_here.glob("citadel-*")}
    async with started(PythonExecutor()) as executor:
        outcome = await executor.execute(make_task("def main():\n    return 1"))
        during = {path.name for path in cgroups_here.glob("citadel-*")} - before

    assert outcome.output == 1
    assert len(during) == 1
    assert not (cgroups_here / during.pop()).exists()


async def test_what_a_killed_engine_left_is_removed_by_the_next_one_and_a_live_ones_is_kept(
    cgroups_here: Path,
) -> None:
    """A SIGKILLed engine cannot remove its sandboxes' cgroups; the next engine removes those
    whose engine is gone (by pid and start time, so a recycled pid does not count as alive), and
    never touches a live engine's, however long it has run."""
    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    live_tag = owner_tag(live.pid)
    assert live_tag is not None
    stale = cgroups_here / f"citadel-{dead.pid}-12345-citadel-python-killed"
    recycled = cgroups_here / f"citadel-{live.pid}-1-citadel-python-recycled"
    alive = cgroups_here / f"citadel-{live_tag}-citadel-python-alive"
    made = [stale, stale / "0", recycled, alive, alive / "0", alive / "1"]
    for path in made:
        path.mkdir()
    try:
        async with started(PythonExecutor()):
            pass
        assert not stale.exists()
        assert not recycled.exists()
        assert [path.name for path in sorted(alive.iterdir()) if path.is_dir()] == ["0", "1"]
    finally:
        live.kill()
        live.wait()
        for path in reversed(made):
            if path.exists():
                path.rmdir()
