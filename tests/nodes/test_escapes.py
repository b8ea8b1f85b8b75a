"""Specification of the `python` node sandbox: what hostile node code tries, and how it is contained.

Every test plays an attacker. It asserts either the executor's precise failure for the attempt, or
that the harmful effect did not happen (the node returns what it saw, and the test checks it). After
each attempt the autouse `still_serving` check proves the same executor still completes normal work.
Escapes that are not contained today are marked `xfail(strict=True)` with what actually happens.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from nodes.python import PythonExecutor
from schemas.tasks import NodeOutcome, NodeTask
from tests.nodes.support import eventually, make_task, runs_command, started


def attack(code: str, **fields: Any) -> NodeTask:
    return make_task(code, node_id="attacker", **fields)


PROJECT_ROOT = Path(__file__).resolve().parents[2]
STORE_SECRET = "event-store-secret-7f3a9c"
ENV_SECRET = "engine-env-secret-51d2e8"
VISIBLE_CONTROL = "not-hidden-control-0b4e"
OUTPUT_CAP = 1024
RESULT_CAP = 4096
# Under /tmp everything is hidden anyway (the sandbox mounts its own /tmp), so state lives here.
STATE_PARENT = "/var/tmp"


@dataclass
class Engine:
    """The module's executor, plus the engine state and secrets a node must not reach."""

    executor: PythonExecutor
    store: Path
    visible: Path
    stand_in_pid: int


@pytest.fixture(scope="module")
def engine_state() -> Iterator[tuple[Path, Path]]:
    """A hidden engine-state directory holding events.db, and an unhidden control directory."""
    store = Path(tempfile.mkdtemp(prefix="citadel-state-", dir=STATE_PARENT))
    visible = Path(tempfile.mkdtemp(prefix="citadel-visible-", dir=STATE_PARENT))
    (store / "events.db").write_text(f"SQLite format 3\0{STORE_SECRET}")
    (visible / "notes.txt").write_text(VISIBLE_CONTROL)
    os.chmod(visible, 0o755)
    os.chmod(store, 0o755)
    try:
        yield store, visible
    finally:
        for directory in (store, visible):
            for entry in directory.iterdir():
                entry.unlink()
            directory.rmdir()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(engine_state: tuple[Path, Path]) -> AsyncIterator[Engine]:
    store, visible = engine_state
    previous = os.environ.get("CITADEL_TEST_SECRET")
    # Set before the executor starts: the zygote is launched from this environment.
    os.environ["CITADEL_TEST_SECRET"] = ENV_SECRET
    # os.environ changes do not show in our own /proc/<pid>/environ; this process's do.
    stand_in = subprocess.Popen(["sleep", "120"], env={**os.environ})
    executor = PythonExecutor(
        max_concurrency=4,
        output_cap_bytes=OUTPUT_CAP,
        result_cap_bytes=RESULT_CAP,
        isolation="bubblewrap",
        allow_network=False,
    )
    try:
        async with started(executor):
            yield Engine(executor, store, visible, stand_in.pid)
    finally:
        stand_in.kill()
        stand_in.wait()
        if previous is None:
            os.environ.pop("CITADEL_TEST_SECRET", None)
        else:
            os.environ["CITADEL_TEST_SECRET"] = previous


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def still_serving(engine: Engine) -> AsyncIterator[None]:
    """After every escape attempt the executor still runs a normal attempt, quickly."""
    yield
    started_at = time.monotonic()
    outcome = await engine.executor.execute(attack("def main(x):\n    return x * 2", inputs={"x": 21}))
    assert outcome.ok, outcome
    assert outcome.output == 42
    assert time.monotonic() - started_at < 2.0


async def run(engine: Engine, code: str, **fields: Any) -> NodeOutcome:
    return await engine.executor.execute(attack(code, **fields))


def largest_attempt_namespace(engine: Engine) -> int:
    """The most processes of the module's sandbox that share one attempt's PID namespace (a
    namespace nested in the sandbox's own: host, sandbox and attempt pids in NSpid)."""
    zygote = engine.executor._zygote
    assert zygote is not None
    marker = str(zygote.runtime_dir).encode()
    sizes: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        try:
            if marker not in (entry / "cmdline").read_bytes():
                continue
            status = (entry / "status").read_text()
            nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[1:]
            if len(nspid) >= 3:
                namespace = os.readlink(entry / "ns" / "pid")
                sizes[namespace] = sizes.get(namespace, 0) + 1
        except (OSError, StopIteration):
            continue
    return max(sizes.values(), default=0)


@pytest_asyncio.fixture(loop_scope="session")
async def listening_server() -> AsyncIterator[tuple[int, list[int]]]:
    """A real TCP server on 127.0.0.1; the list counts the connections it accepted."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # Control: the server really accepts connections from the engine's side.
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    assert await eventually(lambda: accepted == [1])
    accepted.clear()
    try:
        yield port, accepted
    finally:
        server.close()
        await server.wait_closed()


# Resource exhaustion


async def test_an_infinite_loop_is_killed_at_its_timeout(engine: Engine) -> None:
    started_at = time.monotonic()
    outcome = await run(engine, "def main():\n    while True:\n        pass", timeout_seconds=1.0)

    assert outcome.error_class == "Timeout"
    assert outcome.error_message == (
        "node 'attacker' did not finish within its 1 s timeout; its process group was killed"
    )
    assert time.monotonic() - started_at < 2.5


async def test_a_loop_that_ignores_sigterm_is_still_killed_at_its_timeout(engine: Engine) -> None:
    code = """\
        import signal

        def main():
            for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
                signal.signal(number, signal.SIG_IGN)
            print("ignoring", flush=True)
            while True:
                pass
        """
    started_at = time.monotonic()
    outcome = await run(engine, code, timeout_seconds=1.0)

    assert outcome.error_class == "Timeout"
    assert "its process group was killed" in (outcome.error_message or "")
    assert outcome.stdout == "ignoring\n"
    assert time.monotonic() - started_at < 2.5


async def test_sleeping_past_the_timeout_is_a_timeout(engine: Engine) -> None:
    started_at = time.monotonic()
    outcome = await run(engine, "import time\ndef main():\n    time.sleep(60)", timeout_seconds=1.0)

    assert outcome.error_class == "Timeout"
    assert "within its 1 s timeout" in (outcome.error_message or "")
    assert time.monotonic() - started_at < 2.5


async def test_a_fork_bomb_is_killed_at_its_timeout_and_leaves_no_process_behind(
    engine: Engine,
) -> None:
    # Exponential, with a safety valve for the shared test host: pids in the node's PID namespace
    # grow in order, so no process forks once it or its newest child is past pid 500.
    code = """\
        import os, time

        def main():
            while True:
                try:
                    pid = os.fork()
                except OSError:
                    continue
                if (pid or os.getpid()) >= 500:
                    time.sleep(60)
        """
    outcome = await run(engine, code, timeout_seconds=1.0)

    assert outcome.error_class == "Timeout"
    assert "its process group was killed" in (outcome.error_message or "")
    # Each attempt has a PID namespace of its own; the bomb's held ~500 processes. Counting all of
    # the sandbox's processes raced with the zygote's own children coming and going between attempts.
    assert await eventually(lambda: largest_attempt_namespace(engine) <= 2, within=10.0)


async def test_forking_stops_at_the_process_limit(engine: Engine) -> None:
    """Also when the engine runs as root: user code runs as an unprivileged uid in a user
    namespace of its own, so RLIMIT_NPROC binds it and counts only this attempt's processes."""
    code = """\
        import os, time

        def main():
            forked = 0
            while forked < 200:
                try:
                    pid = os.fork()
                except OSError as exc:
                    return [forked, type(exc).__name__]
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                forked += 1
            return [forked, "no error"]
        """
    outcome = await run(engine, code)

    assert outcome.ok, outcome
    forked, error = outcome.output
    assert error == "BlockingIOError"
    assert forked < 64


def attempt_cgroups(pid: int) -> dict[str, Path]:
    """The cgroup directory of a host process per controller (v1), as the host sees them."""
    found = {}
    mounts = {"pids": "/sys/fs/cgroup/pids", "memory": "/sys/fs/cgroup/memory", "cpu": "/sys/fs/cgroup/cpu"}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            if controller in mounts:
                found[controller] = Path(mounts[controller] + path)
    return found


def pid_running(marker: str) -> int:
    """The host pid of a process with `marker` on its command line."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue  # It ended while we looked.
    raise AssertionError(f"no process runs {marker}")


def needs_cgroups(engine: Engine) -> None:
    zygote = engine.executor._zygote
    if zygote is None or zygote.cgroups is None or zygote.cgroups.version != 1:
        pytest.skip("the engine cannot create cgroup v1 directories here (not root, or no v1 hierarchy)")


async def test_an_attempt_runs_in_cgroups_of_its_own_with_its_limits(engine: Engine) -> None:
    """Read from the host: the attempt's processes are in cgroups no other attempt shares,
    bounding their number, their memory together and their CPU to one core."""
    needs_cgroups(engine)
    marker = f"30.{uuid.uuid4().int % 10_000:04d}7"
    code = """\
        import os, subprocess, time

        def main(marker):
            sleeper = subprocess.Popen(["sleep", marker])
            time.sleep(1.5)
            sleeper.kill()
            return os.listdir("/citadel/cgroup")
        """
    running = asyncio.create_task(run(engine, code, inputs={"marker": marker}))
    assert await eventually(lambda: runs_command(marker))
    cgroups = attempt_cgroups(pid_running(marker))
    limits = {
        "pids": (cgroups["pids"] / "pids.max").read_text().strip(),
        "memory": int((cgroups["memory"] / "memory.limit_in_bytes").read_text()),
        "cpu": (cgroups["cpu"] / "cpu.cfs_quota_us").read_text().strip(),
        "period": (cgroups["cpu"] / "cpu.cfs_period_us").read_text().strip(),
    }
    outcome = await running

    assert outcome.ok, outcome
    assert limits == {"pids": "64", "memory": (1024 + 64) * 2**20, "cpu": "100000", "period": "100000"}
    # Its own: named after the attempt's supervising process, below this sandbox's cgroup.
    assert cgroups["pids"].parent.name.startswith(f"citadel-{os.getpid()}-")
    # And the attempt cannot see them, let alone change them: its view of them is empty.
    assert outcome.output == []


async def test_processes_that_together_pass_the_memory_limit_are_killed_by_the_kernel(
    engine: Engine,
) -> None:
    """Each process stays under its own address-space limit; together they pass the attempt's
    memory limit, and the cgroup stops them (on 24 GB the host would have let them run)."""
    needs_cgroups(engine)
    code = """\
        import os, time

        def main():
            child = os.fork()
            if child == 0:
                hoard = bytearray(400 * 2**20)
                time.sleep(10)
                os._exit(0)
            time.sleep(0.5)
            hoard = bytearray(900 * 2**20)
            os.waitpid(child, 0)
            return "both ran to the end"
        """
    outcome = await run(engine, code, timeout_seconds=8.0)

    assert outcome.error_class == "MemoryLimit", outcome
    assert "more than the 1088 MiB of memory an attempt may hold" in (outcome.error_message or "")


async def test_allocating_far_past_the_memory_limit_fails_with_memory_error(engine: Engine) -> None:
    outcome = await run(engine, "def main():\n    return len(bytearray(8 * 2**30))", timeout_seconds=2.0)

    assert outcome.error_class == "MemoryError"
    assert "the node may use at most 1073741824 bytes of memory" in (outcome.error_message or "")


async def test_a_growing_memory_bomb_fails_with_memory_error_at_the_limit(engine: Engine) -> None:
    code = """\
        def main():
            hoard = []
            while True:
                hoard.append(bytearray(64 * 2**20))
        """
    outcome = await run(engine, code, timeout_seconds=8.0)

    assert outcome.error_class == "MemoryError"
    assert "at most 1073741824 bytes" in (outcome.error_message or "")


async def test_deep_recursion_fails_with_recursion_error(engine: Engine) -> None:
    code = "def down(n):\n    return down(n + 1)\ndef main():\n    return down(0)"
    outcome = await run(engine, code, timeout_seconds=2.0)

    assert outcome.error_class == "RecursionError"
    assert (outcome.error_message or "").startswith("maximum recursion depth exceeded")


async def test_c_stack_overflow_past_a_raised_recursion_limit_is_a_crash(engine: Engine) -> None:
    code = """\
        import sys

        def main():
            sys.setrecursionlimit(10**8)
            nested = []
            for _ in range(10**6):
                nested = [nested]
            return len(repr(nested))
        """
    outcome = await run(engine, code, timeout_seconds=10.0)

    assert outcome.error_class == "Crashed"
    assert outcome.error_message == "the process of node 'attacker' was killed by SIGSEGV"


async def test_huge_stdout_is_capped(engine: Engine) -> None:
    code = """\
        import sys

        def main():
            for _ in range(100):
                sys.stdout.write("y" * 100_000)
            sys.stderr.write("z" * 1_000_000)
            return "done"
        """
    outcome = await run(engine, code)

    assert outcome.ok, outcome
    assert outcome.stdout == "y" * OUTPUT_CAP + "\n... [truncated]"
    assert outcome.stderr == "z" * OUTPUT_CAP + "\n... [truncated]"


async def test_filling_the_disk_stops_at_the_file_size_limit(engine: Engine) -> None:
    code = """\
        def main():
            with open("/tmp/fill", "wb") as file:
                while True:
                    file.write(b"x" * 2**20)
        """
    outcome = await run(engine, code)

    assert outcome.error_class == "OSError"
    assert (outcome.error_message or "").startswith(
        "[Errno 27] File too large (a file the node writes may hold at most 64 MiB)"
    )


async def test_a_non_json_result_fails_with_result_not_json(engine: Engine) -> None:
    outcome = await run(engine, "def main():\n    return object()")

    assert outcome.error_class == "ResultNotJSON"
    assert "main() returned a object, which is not JSON-serialisable" in (outcome.error_message or "")


async def test_a_result_over_the_size_cap_fails_with_result_too_large(engine: Engine) -> None:
    outcome = await run(engine, "def main():\n    return 'x' * 10_000_000")

    assert outcome.error_class == "ResultTooLarge"
    assert outcome.error_message == (
        f"main() returned 10000002 bytes of JSON; the limit is {RESULT_CAP} bytes"
    )


# Secrets and other tenants' data


async def test_the_event_store_and_every_other_host_directory_are_absent(engine: Engine) -> None:
    code = """\
        import os

        def main(store, visible):
            try:
                store_view = [os.listdir(store), open(os.path.join(store, "events.db")).read()]
            except OSError as exc:
                store_view = type(exc).__name__
            return [store_view, os.path.exists(visible)]
        """
    inputs = {"store": str(engine.store), "visible": str(engine.visible)}
    outcome = await run(engine, code, inputs=inputs)

    assert outcome.ok, outcome
    store_view, visible = outcome.output
    # The sandbox is built from an allow-list: a directory on it is neither hidden nor shown.
    assert store_view == "FileNotFoundError"
    assert not visible
    assert STORE_SECRET not in outcome.model_dump_json()


async def test_the_engines_home_and_citadel_home_are_hidden_by_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cwd = Path(tempfile.mkdtemp(prefix="citadel-cwd-", dir=STATE_PARENT))
    home = Path(tempfile.mkdtemp(prefix="citadel-home-", dir=STATE_PARENT))
    (cwd / ".citadel").mkdir()
    (cwd / ".citadel" / "events.db").write_text(STORE_SECRET)
    (home / "events.db").write_text(STORE_SECRET)
    code = """\
        def main(paths):
            seen = {}
            for path in paths:
                try:
                    seen[path] = open(path).read()
                except OSError as exc:
                    seen[path] = type(exc).__name__
            return seen
        """
    paths = [str(cwd / ".citadel" / "events.db"), str(home / "events.db")]
    try:
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("CITADEL_HOME", str(home))
        async with started(PythonExecutor()) as fresh:
            outcome = await fresh.execute(attack(code, inputs={"paths": paths}))
    finally:
        for directory in (cwd / ".citadel", cwd, home):
            for entry in directory.iterdir():
                if entry.is_file():
                    entry.unlink()
            directory.rmdir()

    assert outcome.ok, outcome
    assert outcome.output == {path: "FileNotFoundError" for path in paths}


async def test_the_engines_environment_secrets_are_not_visible(engine: Engine) -> None:
    # Control: the stand-in engine process really carries the secret in its environment.
    assert ENV_SECRET in Path(f"/proc/{engine.stand_in_pid}/environ").read_text()
    code = """\
        import os

        def main(secret, pids):
            seen = {"os.environ": repr(dict(os.environ))}
            paths = ["/proc/self/environ", "/proc/1/environ"]
            paths += [f"/proc/{pid}/environ" for pid in pids]
            paths += [f"/proc/{entry}/environ" for entry in os.listdir("/proc") if entry.isdigit()]
            for path in paths:
                try:
                    seen[path] = open(path, "rb").read().decode(errors="replace")
                except OSError as exc:
                    seen[path] = type(exc).__name__
            return {where: secret in text or text for where, text in seen.items()}
        """
    engine_pids = [os.getpid(), engine.stand_in_pid]
    outcome = await run(engine, code, inputs={"secret": ENV_SECRET, "pids": engine_pids})

    assert outcome.ok, outcome
    assert True not in outcome.output.values()
    # The engine's processes are outside the node's PID namespace.
    for pid in engine_pids:
        assert outcome.output[f"/proc/{pid}/environ"] == "FileNotFoundError"
    assert "CITADEL_TEST_SECRET" not in outcome.output["os.environ"]


async def test_etc_shadow_is_absent(engine: Engine) -> None:
    code = """\
        def main():
            try:
                return open("/etc/shadow", "rb").read().decode()
            except OSError as exc:
                return type(exc).__name__
        """
    outcome = await run(engine, code)

    assert outcome.ok, outcome
    assert outcome.output == "FileNotFoundError"
    if os.access("/etc/shadow", os.R_OK):
        # Control: the engine's side does see a real /etc/shadow.
        assert Path("/etc/shadow").read_text().strip()


async def test_another_concurrent_attempts_tmp_files_are_invisible(engine: Engine) -> None:
    writer = """\
        import os, time

        def main(secret):
            with open("/tmp/x", "w") as file:
                file.write(secret)
            time.sleep(1.0)
            return sorted(os.listdir("/tmp"))
        """
    reader = """\
        import os

        def main():
            seen = {"/tmp": sorted(os.listdir("/tmp"))}
            for path in ("/tmp/x",):
                try:
                    seen[path] = open(path).read()
                except OSError as exc:
                    seen[path] = type(exc).__name__
            return seen
        """
    secret = f"tmp-secret-{uuid.uuid4()}"
    writing = asyncio.create_task(run(engine, writer, inputs={"secret": secret}))
    await asyncio.sleep(0.3)
    read = await run(engine, reader)
    written = await writing

    assert "x" in written.output, written
    assert read.ok, read
    assert read.output["/tmp/x"] == "FileNotFoundError"
    assert read.output["/tmp"] == []


async def test_files_left_in_other_writable_directories_are_invisible_to_the_next_attempt(
    engine: Engine,
) -> None:
    name = f"left-{uuid.uuid4().hex}"
    writer = """\
        def main(name):
            written = []
            for directory in ("/dev/shm", "/root", "/home"):
                try:
                    with open(f"{directory}/{name}", "w") as file:
                        file.write("from attempt A")
                    written.append(directory)
                except OSError:
                    pass
            return written
        """
    reader = """\
        import os

        def main(name):
            return [d for d in ("/dev/shm", "/root", "/home") if os.path.exists(f"{d}/{name}")]
        """
    first = await run(engine, writer, inputs={"name": name})
    second = await run(engine, reader, inputs={"name": name})

    assert first.ok, first
    assert first.output == ["/dev/shm"]  # its own /dev/shm; /root and /home are read-only
    assert second.output == []


async def test_writing_outside_its_tmp_fails_or_stays_in_the_sandbox(engine: Engine) -> None:
    name = f"citadel-escape-{uuid.uuid4().hex}"
    targets = [f"/etc/{name}", str(PROJECT_ROOT / name), f"/usr/{name}", f"/root/{name}"]
    code = """\
        def main(targets):
            outcomes = {}
            for path in targets:
                try:
                    with open(path, "w") as file:
                        file.write("escaped")
                    outcomes[path] = "written"
                except OSError as exc:
                    outcomes[path] = [type(exc).__name__, exc.errno]
            return outcomes
        """
    outcome = await run(engine, code, inputs={"targets": targets})

    assert outcome.ok, outcome
    # The sandbox's own directories (on the way to what it binds) are not the node's to write...
    assert outcome.output[targets[0]] == ["PermissionError", 13]
    assert outcome.output[targets[3]] == ["PermissionError", 13]
    # ...the project is not there at all...
    assert outcome.output[targets[1]] == ["FileNotFoundError", 2]
    # ...and what is bound from the host is read-only.
    assert outcome.output[targets[2]] == ["OSError", 30]  # EROFS
    for path in targets:
        assert not Path(path).exists()


async def test_listing_proc_shows_only_the_nodes_own_pid_namespace(engine: Engine) -> None:
    code = """\
        import os, subprocess

        def main():
            child = subprocess.Popen(["sleep", "5"])
            pids = sorted(int(entry) for entry in os.listdir("/proc") if entry.isdigit())
            child.kill()
            child.wait()
            return [os.getpid(), child.pid, pids]
        """
    outcome = await run(engine, code)

    assert outcome.ok, outcome
    own, child, pids = outcome.output
    assert own == 1
    assert pids == [1, child]
    assert os.getpid() not in pids


async def test_the_zygotes_socket_is_out_of_reach(engine: Engine) -> None:
    zygote = engine.executor._zygote
    assert zygote is not None
    code = """\
        import os, socket

        def main(path):
            listing = os.path.exists(os.path.dirname(path))
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect(path)
                return [listing, "connected"]
            except OSError as exc:
                return [listing, type(exc).__name__]
        """
    outcome = await run(engine, code, inputs={"path": str(zygote.socket_path)})

    assert outcome.ok, outcome
    listing, connected = outcome.output
    # The engine listens there and hands the zygote the descriptor: no path leads to it.
    assert listing is False
    assert connected == "FileNotFoundError"


# Network


async def test_a_tcp_connection_to_a_listening_local_server_is_refused(
    engine: Engine, listening_server: tuple[int, list[int]]
) -> None:
    port, accepted = listening_server
    code = """\
        import socket

        def main(port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return "connected"
            except OSError as exc:
                return [type(exc).__name__, exc.errno]
        """
    outcome = await run(engine, code, inputs={"port": port})

    assert outcome.ok, outcome
    # The node has its own network namespace: its loopback is not the engine's.
    assert outcome.output == ["ConnectionRefusedError", 111]
    await asyncio.sleep(0.1)
    assert accepted == []


async def test_an_attempt_cannot_reach_another_attempts_listening_sockets(engine: Engine) -> None:
    """Each attempt has a network namespace of its own: a concurrent attempt's loopback port
    and abstract Unix socket (which belongs to the network namespace) are out of reach."""
    name = f"citadel-{uuid.uuid4().hex}"
    port = 45678
    listener = """\
        import socket

        def main(port, name):
            tcp = socket.create_server(("127.0.0.1", port))
            abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            abstract.bind("\\0" + name)
            abstract.listen()
            tcp.settimeout(1.5)
            try:
                tcp.accept()
                return "someone connected"
            except OSError:
                return "nobody connected"
        """
    prober = """\
        import socket

        def main(port, name):
            seen = {}
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                seen["tcp"] = "connected"
            except OSError as exc:
                seen["tcp"] = type(exc).__name__
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                client.connect("\\0" + name)
                seen["abstract"] = "connected"
            except OSError as exc:
                seen["abstract"] = type(exc).__name__
            return seen
        """
    inputs = {"port": port, "name": name}
    listening = asyncio.create_task(run(engine, listener, inputs=inputs))
    await asyncio.sleep(0.5)  # the listener is up well within this; its 1.5 s wait bounds the test
    probe = await run(engine, prober, inputs=inputs)
    listened = await listening

    assert probe.ok, probe
    assert probe.output == {"tcp": "ConnectionRefusedError", "abstract": "ConnectionRefusedError"}
    assert listened.output == "nobody connected", listened


async def test_network_true_is_refused_on_an_executor_without_network(engine: Engine) -> None:
    code = "def main():\n    return 'ran'"
    outcome = await run(engine, code, config={"network": True})

    assert outcome.error_class == "NetworkNotAllowed"
    assert outcome.error_message == (
        "node 'attacker' sets config.network: true, but this deployment runs python nodes "
        "without network; remove the setting, or start the executor with allow_network=True"
    )


CONNECT = """\
    import socket

    def main(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return "connected"
        except OSError as exc:
            return type(exc).__name__
    """


async def test_a_networked_node_shares_the_hosts_network_and_others_stay_private(
    listening_server: tuple[int, list[int]],
) -> None:
    """CITADEL_ALLOW_NETWORK is an opt-in with a price the README states: a node that asks for
    network shares the host's, loopback included. A node that does not ask stays in a network
    namespace of its own on the same executor."""
    port, accepted = listening_server
    async with started(PythonExecutor(allow_network=True)) as networked:
        reached = await networked.execute(attack(CONNECT, inputs={"port": port}, config={"network": True}))
        private = await networked.execute(attack(CONNECT, inputs={"port": port}))

    assert reached.output == "connected", reached
    assert private.output == "ConnectionRefusedError", private
    assert accepted == [1]


async def test_a_truthy_non_boolean_network_setting_does_not_unlock_the_network(
    engine: Engine, listening_server: tuple[int, list[int]]
) -> None:
    port, accepted = listening_server
    outcome = await run(engine, CONNECT, inputs={"port": port}, config={"network": "true"})

    assert outcome.ok, outcome
    assert outcome.output == "ConnectionRefusedError"
    await asyncio.sleep(0.1)
    assert accepted == []


# Processes, shells and the kernel interface


async def test_a_shell_runs_but_reaches_neither_the_network_nor_hidden_files(
    engine: Engine, listening_server: tuple[int, list[int]]
) -> None:
    port, accepted = listening_server
    script = (
        f"id -u; cat {engine.store}/events.db; cat /etc/shadow; "
        f"echo hi > /dev/tcp/127.0.0.1/{port} && echo connected; echo end"
    )
    code = """\
        import subprocess

        def main(script):
            done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=3)
            return [done.stdout, done.stderr]
        """
    outcome = await run(engine, code, inputs={"script": script})

    assert outcome.ok, outcome
    stdout, stderr = outcome.output
    # Allowed, but harmless: an unprivileged uid of the attempt's user namespace.
    assert stdout == "1000\nend\n"
    assert "events.db: No such file or directory" in stderr
    assert "Connection refused" in stderr
    assert STORE_SECRET not in stdout + stderr
    await asyncio.sleep(0.1)
    assert accepted == []


async def test_signalling_the_parent_pid_1_and_everyone_harms_no_one(engine: Engine) -> None:
    zygote_before = engine.executor.zygote_pid
    code = """\
        import os

        def main():
            sent = {}
            for name, pid in (("parent", os.getppid()), ("pid 1", 1), ("everyone", -1)):
                try:
                    os.kill(pid, 9)
                    sent[name] = "sent"
                except OSError as exc:
                    sent[name] = type(exc).__name__
            return [os.getppid(), sent]
        """
    outcome = await run(engine, code)

    assert outcome.ok, outcome
    # The parent is outside the node's PID namespace (getppid() is 0, so kill(0) hits the node's
    # own group), and PID 1 is the node itself, immune to SIGKILL from inside its namespace.
    assert outcome.output == [0, {"parent": "sent", "pid 1": "sent", "everyone": "ProcessLookupError"}]
    assert engine.executor.zygote_pid == zygote_before
    assert not await eventually(lambda: engine.executor.zygote_pid != zygote_before, within=0.2)


async def test_ctypes_kill_prctl_and_ptrace_do_not_harm_the_engine(engine: Engine) -> None:
    zygote_before = engine.executor.zygote_pid
    code = """\
        import ctypes, os, signal

        PR_CAP_AMBIENT, RAISE, CAP_SYS_ADMIN = 47, 2, 21
        PTRACE_ATTACH = 16

        def main():
            libc = ctypes.CDLL(None, use_errno=True)
            def call(result):
                return [result, ctypes.get_errno() if result != 0 else 0]
            return {
                "kill parent": call(libc.kill(os.getppid(), signal.SIGKILL)),
                "raise CAP_SYS_ADMIN": call(libc.prctl(PR_CAP_AMBIENT, RAISE, CAP_SYS_ADMIN, 0, 0)),
                "ptrace pid 1": call(libc.ptrace(PTRACE_ATTACH, 1, 0, 0)),
                "ptrace parent": call(libc.ptrace(PTRACE_ATTACH, os.getppid(), 0, 0)),
            }
        """
    outcome = await run(engine, code)

    assert outcome.ok, outcome
    assert outcome.output["kill parent"] == [0, 0]  # kill(0): the node's own group; PID 1 survives.
    assert outcome.output["raise CAP_SYS_ADMIN"] == [-1, 1]  # EPERM: no capabilities left
    assert outcome.output["ptrace pid 1"] == [-1, 1]  # EPERM: itself
    assert outcome.output["ptrace parent"][0] == -1
    assert engine.executor.zygote_pid == zygote_before


async def test_a_nested_user_namespace_cannot_uncover_hidden_mounts(engine: Engine) -> None:
    code = """\
        import ctypes, os

        CLONE_NEWUSER, CLONE_NEWNS, MNT_DETACH = 0x10000000, 0x00020000, 2

        def main(store):
            libc = ctypes.CDLL(None, use_errno=True)
            unshared = libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)
            unmounted = {}
            for path in ("/etc/shadow", store, "/tmp"):
                result = libc.umount2(path.encode(), MNT_DETACH)
                unmounted[path] = [result, ctypes.get_errno() if result else 0]
            seen = {}
            for path in ("/etc/shadow", f"{store}/events.db"):
                try:
                    seen[path] = open(path, "rb").read().decode(errors="replace")
                except OSError as exc:
                    seen[path] = type(exc).__name__
            return [unshared, unmounted, seen]
        """
    outcome = await run(engine, code, inputs={"store": str(engine.store)})

    assert outcome.ok, outcome
    unshared, unmounted, seen = outcome.output
    # The seccomp filter refuses new namespaces, and the node has no capability to unmount.
    assert unshared == -1
    assert all(result == -1 for result, _ in unmounted.values()), unmounted
    assert STORE_SECRET not in str(seen)
    assert set(seen.values()) == {"FileNotFoundError"}


async def test_a_process_that_leaves_the_nodes_session_dies_with_the_attempt(engine: Engine) -> None:
    code = """\
        import subprocess

        def main():
            subprocess.Popen(["sleep", "60.0441"], start_new_session=True)
            subprocess.Popen(["sh", "-c", "(setsid sleep 60.0441 &) ; true"])
            return "detached"
        """
    outcome = await run(engine, code)

    assert outcome.ok, outcome
    assert await eventually(lambda: not runs_command("60.0441"))


async def test_a_node_that_clears_its_parent_death_signal_still_dies_at_its_timeout(
    engine: Engine,
) -> None:
    marker = f"60.{uuid.uuid4().int % 10_000:04d}9"
    code = """\
        import ctypes, os

        def main(marker):
            ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG: none
            os.execvp("sleep", ["sleep", marker])
        """
    try:
        outcome = await run(engine, code, inputs={"marker": marker}, timeout_seconds=1.0)

        assert outcome.error_class == "Timeout"
        assert await eventually(lambda: not runs_command(marker))
    finally:
        # Should the sleeper ever leak again, end it by its pid so later tests start clean.
        for entry in Path("/proc").iterdir():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), 9)
            except (OSError, ValueError):
                continue


# Recovery


async def test_after_the_escape_attempts_a_normal_attempt_completes_quickly(engine: Engine) -> None:
    started_at = time.monotonic()
    outcomes = await asyncio.gather(
        *(run(engine, "def main(n):\n    return n + 1", inputs={"n": n}) for n in range(8))
    )

    assert [outcome.output for outcome in outcomes] == list(range(1, 9))
    assert time.monotonic() - started_at < 2.0
