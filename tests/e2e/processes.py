"""Citadel commands run as the processes they are in production, for tests that kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from streams.kafka import KafkaSettings


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


def cluster_env(kafka: KafkaSettings, home: Path) -> dict[str, str]:
    """The settings that point a production process (`citadel worker`, `projector`, `gateway`)
    at this test's broker and topics, with its home in `home`."""
    return {
        "CITADEL_HOME": str(home),
        "CITADEL_KAFKA": kafka.bootstrap,
        "CITADEL_TOPIC_PREFIX": kafka.namespace,
        "CITADEL_PARTITIONS": str(kafka.partitions),
    }


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Stop a process if it still runs: `sig`, then SIGKILL after `timeout`; its exit code."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
