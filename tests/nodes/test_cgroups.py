"""Specification of the sandbox's cgroups on the host: made per sandbox, removed at stop, and
what a killed engine left behind removed by the next one that starts."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from nodes.cgroups import STALE_AFTER_SECONDS, delegate
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


async def test_what_a_killed_engine_left_is_removed_by_the_next_one_and_nothing_younger(
    cgroups_here: Path,
) -> None:
    stale = cgroups_here / f"citadel-python-killed-{uuid.uuid4().hex[:8]}"
    young = cgroups_here / f"citadel-python-young-{uuid.uuid4().hex[:8]}"
    for path in (stale, young, stale / "0"):
        path.mkdir()
    long_ago = time.time() - STALE_AFTER_SECONDS - 60
    os.utime(stale, (long_ago, long_ago))
    try:
        async with started(PythonExecutor()):
            pass
        assert not stale.exists()
        assert young.exists()
    finally:
        for path in (stale / "0", stale, young):
            if path.exists():
                path.rmdir()
