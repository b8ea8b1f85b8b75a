"""Citadel commands run as the processes they are in production, for tests that kill them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def start_citadel(command: str, home: Path, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    """`citadel COMMAND` with `env` over this process's environment; output to `home/NAME.log`."""
    log = open(home / f"{name}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "-m", "citadel.cli", command],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def log_of(home: Path, name: str) -> str:
    """The end of a process's output, for an assertion message."""
    return (home / f"{name}.log").read_text(errors="replace")[-3000:]
