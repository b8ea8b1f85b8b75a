"""Specification of the `python` node sandbox as an allow-list: what of the host a node must not reach.

The sandbox used to bind the host's whole file system read-only and hide a deny-list of paths. The
first tests are the findings against that (other tenants' secrets, local databases' sockets, other
attempts' output, the host's disk; forking as root is in `test_escapes`); the rest are places an
allow-list must leave out. Every test plays the attacker: its node probes, returns what it saw,
and the test compares that with the real secret. After each test the autouse `still_serving` check
proves the same executor still completes a normal attempt.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from nodes.python import PythonExecutor
from schemas.tasks import NodeOutcome, NodeTask
from tests.nodes.support import eventually, make_task, started

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OUTPUT_CAP = 16 * 1024
RESULT_CAP = 1024 * 1024
MB = 1024 * 1024
# Under /tmp every sandbox so far mounted its own /tmp over the host's, so host state lives here.
STATE_PARENT = Path("/var/tmp")
# What a node learns of a path it cannot reach: one of these error names instead of the content.
UNREACHABLE = {"FileNotFoundError", "PermissionError", "NotADirectoryError"}
# What any sandbox must bring along to run node code: the interpreter, the venv, the zygote's
# package. Listing their parent directories may show the way to them, and nothing else.
RUNTIME_PATHS = [Path(os.path.realpath(p)) for p in (sys.base_prefix, sys.prefix, PROJECT_ROOT / "nodes")]

# Prepended to node code: what a node learns of a path, as JSON it can return.
LOOK = '''\
import os


def look(path):
    """A directory's sorted entries, a file's text, or the name of the error that stopped us."""
    try:
        if os.path.isdir(path):
            return sorted(os.listdir(path))
        with open(path, "rb") as file:
            return file.read(1 << 16).decode(errors="replace")
    except OSError as exc:
        return type(exc).__name__

'''


@dataclass
class Host:
    """Secrets and state of the host and the engine, planted for the module, that no node may reach."""

    secrets_dir: Path
    tenant_secret: str
    engine_home: Path
    citadel_home: Path
    home_secret: str
    root_dir: Path
    user_home: Path
    root_secret: str
    project_file: Path
    project_secret: str
    env_secret: str

    @property
    def environment(self) -> dict[str, str]:
        """The engine's environment, set before the executor starts (the zygote is launched from it)."""
        return {
            "CITADEL_SECRETS_DIR": str(self.secrets_dir),
            "CITADEL_HOME": str(self.citadel_home),
            "CITADEL_TEST_SECRET": self.env_secret,
            "HOME": str(self.user_home),
        }


def secret(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    tag = uuid.uuid4().hex[:12]
    # World-readable, so that even a node running as an unprivileged uid could read them if visible.
    secrets_dir = Path(tempfile.mkdtemp(prefix="citadel-secrets-", dir=STATE_PARENT))
    citadel_home = Path(tempfile.mkdtemp(prefix="citadel-home-", dir=STATE_PARENT))
    engine_home = Path.cwd() / ".citadel"
    made_engine_home = not engine_home.exists()
    root_dir = Path(f"/root/citadel-test-{tag}")
    values = Host(
        secrets_dir=secrets_dir,
        tenant_secret=secret("beta-api-token"),
        engine_home=engine_home,
        citadel_home=citadel_home,
        home_secret=secret("engine-home"),
        root_dir=root_dir,
        user_home=root_dir / "home",
        root_secret=secret("root-credentials"),
        project_file=PROJECT_ROOT / f"citadel-test-{tag}.txt",
        project_secret=secret("project-file"),
        env_secret=secret("engine-env"),
    )
    try:
        for directory in (secrets_dir, citadel_home):
            directory.chmod(0o755)
        write(secrets_dir / "beta.API_TOKEN", values.tenant_secret)
        write(engine_home / f"citadel-test-{tag}", values.home_secret)
        write(citadel_home / "events.db", f"SQLite format 3\0{values.home_secret}")
        write(root_dir / "credentials", values.root_secret)
        write(
            values.user_home / ".aws" / "credentials",
            f"[default]\naws_secret_access_key = {values.root_secret}\n",
        )
        write(values.project_file, values.project_secret)
        yield values
    finally:
        values.project_file.unlink(missing_ok=True)
        shutil.rmtree(root_dir, ignore_errors=True)
        shutil.rmtree(secrets_dir, ignore_errors=True)
        shutil.rmtree(citadel_home, ignore_errors=True)
        if made_engine_home:
            shutil.rmtree(engine_home, ignore_errors=True)
        else:
            (engine_home / f"citadel-test-{tag}").unlink(missing_ok=True)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def new_executor() -> PythonExecutor:
    return PythonExecutor(
        max_concurrency=4,
        output_cap_bytes=OUTPUT_CAP,
        result_cap_bytes=RESULT_CAP,
        isolation="bubblewrap",
        allow_network=False,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def executor(host: Host) -> AsyncIterator[PythonExecutor]:
    with environment(host.environment):
        async with started(new_executor()) as running:
            yield running


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def still_serving(executor: PythonExecutor) -> AsyncIterator[None]:
    """After every attack the executor still runs a normal attempt, quickly."""
    yield
    started_at = time.monotonic()
    outcome = await executor.execute(attack("def main(x):\n    return x * 2", inputs={"x": 21}))
    assert outcome.ok, outcome
    assert outcome.output == 42
    assert time.monotonic() - started_at < 2.0


def attack(code: str, **fields: Any) -> NodeTask:
    return make_task(LOOK + textwrap.dedent(code), **{"node_id": "attacker", **fields})


async def run(executor: PythonExecutor, code: str, **fields: Any) -> NodeOutcome:
    return await executor.execute(attack(code, **fields))


def everything(outcome: NodeOutcome) -> str:
    """All an attacker takes away from an attempt: its output, captured streams and error."""
    return "\n".join(
        [json.dumps(outcome.output), outcome.stdout, outcome.stderr, outcome.error_message or ""]
    )


def holding(seen: dict[str, Any], value: str) -> list[str]:
    """The probes, by name, in whose result `value` turned up."""
    return [where for where, result in seen.items() if value in json.dumps(result)]


def unreachable(seen: object) -> bool:
    """True if what a node learned of a path is only the error that stopped it."""
    return isinstance(seen, str) and seen in UNREACHABLE


def leaked_entries(host_dir: Path, seen: object) -> set[str]:
    """Entries of the host's `host_dir` that a node listed, less the way to the runtime paths."""
    if not isinstance(seen, list):
        return set()
    on_the_way = {
        path.relative_to(host_dir).parts[0]
        for path in RUNTIME_PATHS
        if path != host_dir and path.is_relative_to(host_dir)
    }
    return (set(seen) & set(os.listdir(host_dir))) - on_the_way


# Findings of the deny-list sandbox


async def test_another_tenants_secret_file_can_be_neither_listed_nor_read(
    executor: PythonExecutor, host: Host
) -> None:
    code = """\
        def main(directory):
            return {
                "listing": look(directory),
                "file": look(os.path.join(directory, "beta.API_TOKEN")),
                "os.environ": dict(os.environ),
                "/proc/self/environ": look("/proc/self/environ"),
                "/proc/1/environ": look("/proc/1/environ"),
            }
        """
    outcome = await run(executor, code, inputs={"directory": str(host.secrets_dir)})

    assert outcome.ok, outcome
    seen = outcome.output
    assert host.tenant_secret not in everything(outcome), f"the node read beta's API_TOKEN: {seen['file']!r}"
    assert unreachable(seen["listing"]), f"the node listed the secrets directory: {seen['listing']}"
    assert unreachable(seen["file"]), f"the node opened beta.API_TOKEN: {seen['file']!r}"
    for where in ("os.environ", "/proc/self/environ", "/proc/1/environ"):
        assert "CITADEL_SECRETS_DIR" not in str(seen[where]), f"{where} names the secrets directory"
        assert str(host.secrets_dir) not in str(seen[where]), f"{where} holds the secrets directory"


UNIX_CONNECT = """\
    import socket

    def main(path, hello):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(2)
        try:
            client.connect(path)
            client.sendall(bytes.fromhex(hello))
            return ["connected", client.recv(64).hex()]
        except OSError as exc:
            return [type(exc).__name__, ""]
        finally:
            client.close()
    """
# PostgreSQL answers an SSLRequest with one byte; MariaDB greets first, unasked.
POSTGRES_SSL_REQUEST = "0000000804d2162f"
MARIADB_SOCKETS = ("/run/mysqld/mysqld.sock", "/var/run/mysqld/mysqld.sock", "/var/lib/mysql/mysql.sock")
REFUSED = {"FileNotFoundError", "ConnectionRefusedError", "PermissionError"}


def greeting(path: str, hello: str) -> bytes:
    """What the engine's side reads from a database socket: the control for the node's attempt."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(2)
        client.connect(path)
        client.sendall(bytes.fromhex(hello))
        return client.recv(64)


@pytest.mark.parametrize(
    ("paths", "hello"),
    [
        (("/var/run/postgresql/.s.PGSQL.5432",), POSTGRES_SSL_REQUEST),
        (("/run/postgresql/.s.PGSQL.5432",), POSTGRES_SSL_REQUEST),
        (MARIADB_SOCKETS, ""),
    ],
    ids=["postgresql-var-run", "postgresql-run", "mariadb"],
)
async def test_a_local_database_is_unreachable_through_its_unix_socket(
    executor: PythonExecutor, paths: tuple[str, ...], hello: str
) -> None:
    path = next((p for p in paths if Path(p).is_socket()), None)
    if path is None:
        pytest.skip(f"no database listens on this host at {' or '.join(paths)}")
    assert greeting(path, hello), f"control: the database at {path} did not answer the engine"

    outcome = await run(executor, UNIX_CONNECT, inputs={"path": path, "hello": hello})

    assert outcome.ok, outcome
    result, received = outcome.output
    assert result in REFUSED, f"the node connected to {path} and read {bytes.fromhex(received)!r}"
    assert received == ""


@pytest.mark.parametrize("directory", ["/var/tmp", "/run"])
async def test_a_unix_socket_the_host_listens_on_is_unreachable(
    executor: PythonExecutor, directory: str
) -> None:
    path = f"{directory}/citadel-test-{uuid.uuid4().hex[:12]}.sock"
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.write(b"host secret greeting\n")
        writer.close()

    async def control(count: int) -> None:
        """The engine's side connects and waits until the server counted `count` connections."""
        _, writer = await asyncio.open_unix_connection(path)
        writer.close()
        assert await eventually(lambda: len(accepted) >= count), f"control: {path} accepts nothing"

    server = await asyncio.start_unix_server(on_connect, path)
    try:
        os.chmod(path, 0o777)
        await control(1)
        outcome = await run(executor, UNIX_CONNECT, inputs={"path": path, "hello": "68690a"})
        # Connections are accepted in order: once this one is counted, so is any the node made.
        await control(2)

        assert outcome.ok, outcome
        result, received = outcome.output
        assert result in REFUSED, f"the node connected to {path} and read {bytes.fromhex(received)!r}"
        assert accepted == [1, 1], f"the server at {path} accepted {len(accepted) - 2} node connections"
    finally:
        server.close()
        await server.wait_closed()
        Path(path).unlink(missing_ok=True)


VICTIM = """\
    import sys, time

    def main(secret, hold):
        print(secret, flush=True)
        print(secret, file=sys.stderr, flush=True)
        time.sleep(hold)
        return "held"
    """
# Searches all it can see for the victim's secret, and swaps the output files it can write for
# links to other files: ones holding the secret, other attempts' output files, and guesses at its
# neighbours' output files next to its own (their names differ by a number, as a pid does).
PLANTER = """\
    import sys, time

    # The kernel's own trees, and the host's other mounts (its tooling, not the engine's).
    SKIP = ("/proc", "/sys", "/mnt")
    TOPS = ("/tmp", "/dev/shm", "/dev", "/run", "/var", "/home", "/root", "/")


    def files(deadline):
        walked = set()
        for top in (os.getcwd(), *TOPS):
            for root, dirs, names in os.walk(top):
                if time.monotonic() > deadline:
                    return
                if root in walked:
                    dirs[:] = []
                    continue
                walked.add(root)
                dirs[:] = [name for name in dirs if os.path.join(root, name) not in SKIP]
                for name in names:
                    if time.monotonic() > deadline:
                        return
                    yield os.path.join(root, name)


    def holds(path, prefix):
        try:
            if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > 1 << 20:
                return False
            with open(path, "rb") as file:
                return prefix.encode() in file.read()
        except OSError:
            return False


    def main(prefix, budget, linger):
        own = []
        for fd in (1, 2):
            try:
                own.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        found, outputs = [], []
        for path in files(time.monotonic() + budget):
            if os.path.basename(path) in ("stdout", "stderr") and os.access(os.path.dirname(path), os.W_OK):
                outputs.append(path)
            if holds(path, prefix):
                found.append(path)
        slots = sorted(outputs)
        guesses = []
        for path in own:
            parent, number = os.path.split(os.path.dirname(path))
            if number.isdigit():
                for k in (1, 2):
                    guesses += [f"{parent}/{int(number) - k}/stderr", f"{parent}/{int(number) - k}/stdout"]
        targets = [path for path in found + outputs + guesses if path not in slots]
        planted = {}
        for slot, target in zip(slots, targets[::2] + targets[1::2]):
            try:
                os.unlink(slot)
                os.symlink(target, slot)
                planted[slot] = target
            except OSError as exc:
                planted[slot] = type(exc).__name__
        found_text = {path: look(path) for path in found}
        print(json.dumps(found_text), flush=True)
        time.sleep(linger)
        return {"found": found_text, "planted": planted}
    """


async def steal_output(linger: float, timeout_seconds: float) -> tuple[str, NodeOutcome, NodeOutcome]:
    """Attempt A holds a secret in its output while attempt B, on the same fresh executor, hunts it.

    A fresh executor, so that B's guesses at its neighbours' names have the best chance there is: A
    and B are the first two attempts, forked one after the other.
    """
    stolen = secret("citadel-attempt-a")
    victim = attack(VICTIM, node_id="victim", inputs={"secret": stolen, "hold": 2.5})
    inputs = {"prefix": "citadel-attempt-a-", "budget": 0.4, "linger": linger}
    planter = attack(
        "import json\n" + textwrap.dedent(PLANTER), inputs=inputs, timeout_seconds=timeout_seconds
    )
    async with started(new_executor()) as fresh:
        a, b = await asyncio.gather(fresh.execute(victim), fresh.execute(planter))
    return stolen, a, b


async def test_an_attempt_that_plants_links_for_its_output_files_gets_no_other_attempts_output() -> None:
    """Slow (3 s): the victim holds its output for the planter's whole search."""
    stolen, a, b = await steal_output(linger=0.0, timeout_seconds=5.0)

    assert stolen in a.stderr, f"control: attempt A's secret is in its own stderr: {a}"
    assert b.ok, b
    assert stolen not in everything(b), f"attempt B got attempt A's output: {b}"


async def test_an_attempt_that_plants_links_and_times_out_gets_no_other_attempts_output() -> None:
    """Slow (3 s): on a timeout the engine's side reads the output; the victim outlives it."""
    stolen, a, b = await steal_output(linger=10.0, timeout_seconds=1.0)

    assert stolen in a.stderr, f"control: attempt A's secret is in its own stderr: {a}"
    assert b.error_class == "Timeout", b
    assert stolen not in everything(b), f"attempt B got attempt A's output after its timeout: {b}"


async def test_filling_the_disk_stops_at_a_bounded_total_and_spares_the_hosts_disk(
    executor: PythonExecutor,
) -> None:
    """Slow where the sandbox lets a node write much: it writes 1 MB at a time up to 800 MB."""
    code = """\
        import errno, time

        CHUNK = b"x" * 2**20
        SKIP = ("/proc", "/sys", "/mnt")
        TOPS = ("/tmp", "/dev/shm", "/dev", "/run", "/var", "/home", "/root", "/srv", "/opt", "/")


        def writable_directories():
            places = [os.getcwd(), "/tmp"]
            for fd in (1, 2):
                try:
                    places.append(os.path.dirname(os.readlink(f"/proc/self/fd/{fd}")))
                except OSError:
                    pass
            deadline = time.monotonic() + 1.0
            for top in TOPS:
                for root, dirs, _ in os.walk(top):
                    if time.monotonic() > deadline:
                        return list(dict.fromkeys(places))
                    dirs[:] = [name for name in dirs if os.path.join(root, name) not in SKIP]
                    if os.access(root, os.W_OK):
                        places.append(root)
            return list(dict.fromkeys(places))


        def main(files, megabytes):
            written, made, errors = {}, 0, {}
            for place in writable_directories():
                while made < files:
                    try:
                        with open(os.path.join(place, f"fill-{made}"), "wb", buffering=0) as file:
                            made += 1
                            for _ in range(megabytes):
                                written[place] = written.get(place, 0) + file.write(CHUNK)
                    except OSError as exc:
                        errors[place] = [errno.errorcode.get(exc.errno, str(exc.errno)), str(exc)]
                        break
            return {"written": written, "errors": errors}
        """
    free_before = {path: shutil.disk_usage(path).free for path in ("/", "/tmp")}
    outcome = await run(executor, code, inputs={"files": 16, "megabytes": 50}, timeout_seconds=30.0)
    free_after = {path: shutil.disk_usage(path).free for path in ("/", "/tmp")}

    assert outcome.ok, outcome
    errors = outcome.output["errors"]
    written = {place: f"{size / MB:.0f} MB" for place, size in outcome.output["written"].items()}
    total = sum(outcome.output["written"].values())
    assert total <= 128 * MB, f"the node wrote {total / MB:.0f} MB, into {written}"
    for path, before in free_before.items():
        dropped = before - free_after[path]
        assert dropped <= 20 * MB, f"the host's free space on {path} dropped by {dropped / MB:.0f} MB"
    limits = {"ENOSPC", "EFBIG", "EDQUOT"}
    assert any(name in limits for name, _ in errors.values()), f"no write hit a size limit: {errors}"


async def test_a_file_planted_in_the_project_checkout_is_invisible(
    executor: PythonExecutor, host: Host
) -> None:
    code = """\
        def main(root, name):
            return {"listing": look(root), "file": look(os.path.join(root, name))}
        """
    inputs = {"root": str(PROJECT_ROOT), "name": host.project_file.name}
    outcome = await run(executor, code, inputs=inputs)

    assert outcome.ok, outcome
    assert host.project_secret not in everything(outcome), f"the node read {host.project_file}"
    leaked = leaked_entries(PROJECT_ROOT, outcome.output["listing"])
    assert not leaked, f"the node listed the project checkout {PROJECT_ROOT}: {sorted(leaked)}"


async def test_the_projects_source_files_cannot_be_read(executor: PythonExecutor) -> None:
    code = """\
        import hashlib, sys

        NAMES = ("nodes/python.py", "nodes/sandbox.py", "nodes/secrets.py", "pyproject.toml", "README.md")

        def main(root):
            package = sys.modules.get("nodes")
            places = [root] + [os.path.dirname(path) for path in getattr(package, "__path__", [])]
            digests = {}
            for place in dict.fromkeys(places):
                for name in NAMES:
                    path = os.path.join(place, name)
                    try:
                        with open(path, "rb") as file:
                            digests[path] = hashlib.sha256(file.read()).hexdigest()
                    except OSError as exc:
                        digests[path] = type(exc).__name__
            return digests
        """
    outcome = await run(executor, code, inputs={"root": str(PROJECT_ROOT)})

    assert outcome.ok, outcome
    sources = {
        hashlib.sha256((PROJECT_ROOT / name).read_bytes()).hexdigest(): name
        for name in ("nodes/python.py", "nodes/sandbox.py", "nodes/secrets.py", "pyproject.toml", "README.md")
    }
    read = {path: sources[digest] for path, digest in outcome.output.items() if digest in sources}
    assert not read, f"the node read the project's sources: {read}"


async def test_the_engines_home_directories_cannot_be_read(executor: PythonExecutor, host: Host) -> None:
    code = """\
        def main(homes):
            seen = {}
            for home in homes:
                seen[home] = look(home)
                for name in seen[home] if isinstance(seen[home], list) else []:
                    seen[os.path.join(home, name)] = look(os.path.join(home, name))
            seen["events.db"] = look(os.path.join(homes[1], "events.db"))
            return seen
        """
    homes = [str(host.engine_home), str(host.citadel_home)]
    outcome = await run(executor, code, inputs={"homes": homes})

    assert outcome.ok, outcome
    leaked = holding(outcome.output, host.home_secret)
    assert host.home_secret not in everything(outcome), f"the node read the engine's home: {leaked}"
    for home in homes:
        seen = outcome.output[home]
        assert unreachable(seen) or seen == [], f"the node listed the engine's home {home}: {seen}"


async def test_roots_home_and_credentials_files_are_invisible(executor: PythonExecutor, host: Host) -> None:
    code = """\
        def main(root_dir, user_home):
            return {
                "/root": look("/root"),
                "planted": look(root_dir),
                "credentials": look(os.path.join(root_dir, "credentials")),
                "engine's ~/.aws": look(os.path.join(user_home, ".aws", "credentials")),
                "node's ~/.aws": look(os.path.expanduser("~/.aws/credentials")),
                "/root/.aws": look("/root/.aws/credentials"),
            }
        """
    inputs = {"root_dir": str(host.root_dir), "user_home": str(host.user_home)}
    outcome = await run(executor, code, inputs=inputs)

    assert outcome.ok, outcome
    leaked = holding(outcome.output, host.root_secret)
    assert host.root_secret not in everything(outcome), f"the node read credentials under /root: {leaked}"
    leaked = leaked_entries(Path("/root"), outcome.output["/root"])
    assert not leaked, f"the node listed /root: {sorted(leaked)}"
    real_aws = Path("/root/.aws/credentials")
    if real_aws.is_file() and real_aws.read_text().strip():
        assert real_aws.read_text() not in everything(outcome), "the node read /root/.aws/credentials"


@pytest.mark.parametrize("path", ["/var/run/docker.sock", "/run/docker.sock", "/run/dbus/system_bus_socket"])
async def test_a_system_service_socket_is_unreachable(executor: PythonExecutor, path: str) -> None:
    if not Path(path).is_socket():
        pytest.skip(f"nothing listens at {path} on this host")

    outcome = await run(executor, UNIX_CONNECT, inputs={"path": path, "hello": ""})

    assert outcome.ok, outcome
    result, received = outcome.output
    assert result in REFUSED, f"the node connected to {path} (read {bytes.fromhex(received)!r})"


async def test_service_and_data_directories_are_absent_or_empty(executor: PythonExecutor) -> None:
    code = """\
        def main(directories):
            return {directory: look(directory) for directory in directories}
        """
    directories = ["/run", "/var", "/home", "/srv", "/mnt", "/media", "/opt"]
    outcome = await run(executor, code, inputs={"directories": directories})

    assert outcome.ok, outcome
    shown = {path: seen for path, seen in outcome.output.items() if not unreachable(seen) and seen != []}
    assert not shown, f"the node sees the host's directories: {shown}"


async def test_proc_1_root_does_not_lead_to_the_hosts_root(executor: PythonExecutor, host: Host) -> None:
    code = """\
        def main(project, project_file, root_dir):
            return {
                "own /": look("/"),
                "/": look("/proc/1/root"),
                "/root": look("/proc/1/root/root"),
                "project": look("/proc/1/root" + project),
                "project file": look("/proc/1/root" + project_file),
                "root credentials": look("/proc/1/root" + root_dir + "/credentials"),
            }
        """
    inputs = {
        "project": str(PROJECT_ROOT),
        "project_file": str(host.project_file),
        "root_dir": str(host.root_dir),
    }
    outcome = await run(executor, code, inputs=inputs)

    assert outcome.ok, outcome
    seen = outcome.output
    for planted, path in ((host.project_secret, host.project_file), (host.root_secret, host.root_dir)):
        assert planted not in everything(outcome), f"the node read {path} through /proc/1/root"
    leaked = leaked_entries(PROJECT_ROOT, seen["project"])
    assert not leaked, f"/proc/1/root shows the project checkout {PROJECT_ROOT}: {sorted(leaked)}"
    leaked = leaked_entries(Path("/root"), seen["/root"])
    assert not leaked, f"/proc/1/root shows the host's /root: {sorted(leaked)}"
    own_root = unreachable(seen["/"]) or seen["/"] == seen["own /"]
    assert own_root, f"/proc/1/root is not the node's own root: {seen['/']}"


async def test_another_attempts_processes_are_invisible_in_proc(executor: PythonExecutor) -> None:
    """Slow (2.5 s): the victim holds a marked process while the other attempt looks for it."""
    victim = """\
        import subprocess, sys, time

        def main(marker, hold):
            os.environ["CITADEL_VICTIM"] = marker
            sleeper = "import sys, time; time.sleep(float(sys.argv[1]))"
            child = subprocess.Popen([sys.executable, "-c", sleeper, str(hold), marker])
            try:
                # Popen returns once exec has begun, a moment before the new command line is set.
                settled = time.monotonic() + 2.0
                while marker not in look(f"/proc/{child.pid}/cmdline") and time.monotonic() < settled:
                    time.sleep(0.01)
                shown = [marker in look(f"/proc/{child.pid}/{part}") for part in ("cmdline", "environ")]
                time.sleep(hold)
            finally:
                child.kill()
                child.wait()
            return shown
        """
    hunter = """\
        import time

        def main(prefix, budget):
            parents, found = {}, set()
            deadline = time.monotonic() + budget
            while time.monotonic() < deadline:
                for entry in filter(str.isdigit, os.listdir("/proc")):
                    for part in ("cmdline", "environ"):
                        text = look(f"/proc/{entry}/{part}")
                        if prefix in text:
                            found.add(text)
                    status = look(f"/proc/{entry}/status").splitlines()
                    ppid = [line.split()[1] for line in status if line.startswith("PPid:")]
                    parents[entry] = ppid[0] if ppid else ""
                time.sleep(0.05)
            return {"self": str(os.getpid()), "parents": parents, "found": sorted(found)}
        """
    marker = secret("citadel-victim")
    a, b = await asyncio.gather(
        executor.execute(attack(victim, node_id="victim", inputs={"marker": marker, "hold": 2.5})),
        run(executor, hunter, inputs={"prefix": "citadel-victim-", "budget": 1.5}),
    )

    assert a.output == [True, True], f"control: attempt A ran a process marked in cmdline and environ: {a}"
    assert b.ok, b
    assert marker not in everything(b), f"attempt B saw attempt A's process: {b.output['found']}"
    # What B may see of /proc: itself and its ancestors (an init of its own sandbox), no one else.
    parents = b.output["parents"]
    lineage, pid = set(), b.output["self"]
    while pid in parents and pid not in lineage:
        lineage.add(pid)
        pid = parents[pid]
    strangers = set(parents) - lineage
    assert not strangers, f"attempt B saw processes that are neither itself nor its ancestors: {strangers}"


async def test_a_file_left_in_any_writable_directory_is_invisible_to_the_next_attempt(
    executor: PythonExecutor,
) -> None:
    """Beyond the issue: the deny-list sandbox's /dev is one writable tmpfs for all its attempts."""
    writer = """\
        import time

        TOPS = ("/dev", "/run", "/var", "/home", "/root", "/srv", "/opt", "/")


        def main(name, secret):
            places = [os.getcwd(), "/tmp", "/dev/shm"]
            deadline = time.monotonic() + 0.5
            for top in TOPS:
                for root, dirs, _ in os.walk(top):
                    if time.monotonic() > deadline:
                        break
                    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/mnt")]
                    if os.access(root, os.W_OK):
                        places.append(root)
            written = []
            for place in dict.fromkeys(places):
                try:
                    with open(os.path.join(place, name), "w") as file:
                        file.write(secret)
                    written.append(place)
                except OSError:
                    pass
            return written
        """
    reader = """\
        def main(name, places):
            return {place: look(os.path.join(place, name)) for place in places}
        """
    name, left = f"left-{uuid.uuid4().hex}", secret("left-behind")
    first = await run(executor, writer, inputs={"name": name, "secret": left})
    try:
        assert first.ok, first
        assert first.output, "control: attempt A could write nowhere, not even its own /tmp"
        second = await run(executor, reader, inputs={"name": name, "places": first.output})

        assert second.ok, second
        found = [place for place, seen in second.output.items() if seen == left]
        assert not found, f"attempt B read what attempt A left in {found}"
    finally:
        for place in first.output or []:
            # Had a place been the host's own, the file would be there: do not leave it behind.
            Path(place, name).unlink(missing_ok=True)


async def test_etc_shadow_holds_none_of_the_hosts_password_entries(executor: PythonExecutor) -> None:
    code = """\
        def main():
            return {path: look(path) for path in ("/etc/shadow", "/etc/gshadow")}
        """
    outcome = await run(executor, code)

    assert outcome.ok, outcome
    for path, seen in outcome.output.items():
        # Absent, unreadable or empty (covered by /dev/null): nothing of the host's in any case.
        assert unreachable(seen) or seen == "", f"the node read {path}: {seen[:200]!r}"
        if os.access(path, os.R_OK):
            host_lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
            assert not [line for line in host_lines if line in seen], f"the node read the host's {path}"


async def test_the_engines_environment_does_not_reach_the_node(executor: PythonExecutor, host: Host) -> None:
    code = """\
        def main():
            seen = {"os.environ": json.dumps(dict(os.environ))}
            pids = [entry for entry in os.listdir("/proc") if entry.isdigit()]
            for path in ["/proc/self/environ", "/proc/1/environ", *(f"/proc/{pid}/environ" for pid in pids)]:
                seen[path] = look(path)
            return seen
        """
    outcome = await run(executor, "import json\n" + textwrap.dedent(code))

    assert outcome.ok, outcome
    for where, seen in outcome.output.items():
        for name, value in host.environment.items():
            assert value not in seen, f"{where} holds the engine's {name}"
            # A sandbox may give the node a HOME of its own, but not the engine's.
            if name != "HOME":
                assert f"{name}=" not in seen, f"{where} names the engine's {name}"
                assert f'"{name}"' not in seen, f"{where} names the engine's {name}"
