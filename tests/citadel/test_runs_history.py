"""Time travel and history of a run from the event store: `citadel runs show --at`, `runs history`,
and `citadel replay projections`, on a store written by the real Run aggregate."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aggregates.store import RunStore
from citadel.runs import start_command
from schemas.definition import parse_definition
from schemas.envelope import Envelope
from streams.history import run_state
from tests.citadel.test_cli import citadel

LENGTH = 120


def long_definition() -> dict[str, Any]:
    nodes = [
        {
            "id": f"n{i}",
            "type": "python",
            "needs": [f"n{i - 1}"] if i else [],
            "retry": {"max_attempts": 2, "delay_seconds": 1, "retry_on": ["ConnectionError"]},
            "config": {"code": "def main():\n    return 1\n"},
        }
        for i in range(LENGTH)
    ]
    return parse_definition({"name": "long", "nodes": nodes}).model_dump(mode="json")


def drive_long_run(store: RunStore) -> str:
    """A run of LENGTH sequential nodes; every tenth node fails once and is retried."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    command = start_command(long_definition(), {}, "acme")
    store.decide([command], now)
    while store.run(command.run_id).status == "running":
        run = store.run(command.run_id)
        if run.timers:
            (timer_id,) = run.timers
            store.decide([Envelope.new("TimerFired", run.run_id, {"timer_id": timer_id})], now)
            continue
        (attempt,) = run.unfinished_attempts()
        node, number = attempt["node"].id, attempt["attempt"]
        result = {"node_id": node, "attempt_id": attempt["attempt_id"], "duration_ms": 1.0}
        if int(node[1:]) % 10 == 0 and number == 1:
            failed = {**result, "error_class": "ConnectionError", "message": "flaky"}
            store.decide([Envelope.new("NodeFailed", run.run_id, failed)], now)
        else:
            store.decide([Envelope.new("NodeSucceeded", run.run_id, {**result, "output": number})], now)
    return command.run_id


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("home") / ".citadel"
    store = RunStore(f"sqlite:///{home / 'events.db'}", snapshot_interval=100)
    try:
        run_id = drive_long_run(store)
    finally:
        store.close()
    return home, run_id


def expected_nodes(types_and_payloads: list[tuple[str, dict[str, Any]]]) -> dict[str, tuple[str, int]]:
    """Each node's (status, attempt) after these events, worked out from the events alone."""
    nodes = {f"n{i}": ("pending", 0) for i in range(LENGTH)}
    for kind, payload in types_and_payloads:
        node = payload.get("node_id")
        if kind == "NodeScheduled":
            nodes[node] = ("scheduled", payload["attempt"])
        elif kind == "NodeSucceeded":
            nodes[node] = ("succeeded", nodes[node][1])
        elif kind == "NodeFailed":
            nodes[node] = ("retry_wait" if payload["will_retry"] else "failed", nodes[node][1])
    return nodes


def test_the_state_at_any_version_of_a_long_run_is_what_its_first_events_say(
    long_run: tuple[Path, str],
) -> None:
    home, run_id = long_run
    store = RunStore(f"sqlite:///{home / 'events.db'}", snapshot_interval=100)
    try:
        events = [(type(e).__name__, dict(e.__dict__)) for e in store.run_events(run_id)]
        assert len(events) > 3 * LENGTH + 12 * 2  # every node, and a failure and retry per tenth
        # Versions around snapshots (every 100 events), inside retries, the first and the last.
        for version in (1, 2, 57, 99, 100, 101, 250, 333, len(events) - 1, len(events)):
            state = run_state(store, run_id, version)
            assert state["version"] == version and state["latest_version"] == len(events)
            nodes = {n: (s["status"], s["attempt"]) for n, s in state["nodes"].items()}
            assert nodes == expected_nodes(events[:version]), version
            assert state["status"] == ("completed" if version == len(events) else "running")
        with pytest.raises(KeyError, match="no version"):
            run_state(store, run_id, len(events) + 1)
    finally:
        store.close()


def test_runs_history_and_show_at_a_version_from_the_command_line(long_run: tuple[Path, str]) -> None:
    home, run_id = long_run

    def runs(*args: str) -> subprocess.CompletedProcess[str]:
        return citadel("runs", *args, cwd=home.parent, CITADEL_HOME=str(home), COLUMNS="200")

    history = runs("history", run_id, "--json")
    assert history.returncode == 0, history.stderr
    events = [json.loads(line) for line in history.stdout.splitlines()]
    assert [e["version"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "Started" and events[-1]["type"] == "Completed"
    readable = runs("history", run_id)
    assert "ConnectionError: flaky; will retry" in readable.stdout
    shown = runs("show", run_id, "--at", "5", "--json")
    state = json.loads(shown.stdout)
    assert state["version"] == 5 and state["status"] == "running"
    assert state["nodes"]["n0"]["status"] == "retry_wait"
    missing = runs("show", run_id, "--at", "100000")
    assert missing.returncode == 2 and "no version 100000" in missing.stderr
    unknown = runs("history", "not-a-run")
    assert unknown.returncode == 2 and "no run 'not-a-run'" in unknown.stderr


def test_replay_projections_rebuilds_from_the_store_and_names_a_holder_of_chdb(
    long_run: tuple[Path, str], tmp_path: Path
) -> None:
    home, run_id = long_run
    env = {"CITADEL_HOME": str(home), "CITADEL_CLICKHOUSE": f"chdb://{tmp_path / 'ch'}", "COLUMNS": "200"}
    replay = citadel("replay", "projections", cwd=home.parent, **env)
    assert replay.returncode == 0, replay.stderr
    store = RunStore(f"sqlite:///{home / 'events.db'}")
    count = len(store.run_events(run_id))  # the store's only run
    store.close()
    assert f"from {count} run events" in replay.stdout.replace(",", "")
    # Another process holding the chDB directory (as `citadel up` does): the replay says who.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from projections.clickhouse import Connection; "
            f"c = Connection({env['CITADEL_CLICKHOUSE']!r}); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused = citadel("replay", "projections", cwd=home.parent, **env)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode == 2
    assert f"in use by process {holder.pid}" in refused.stderr.replace("\n", " ")


def test_runs_history_shows_each_notification_attempt(tmp_path: Path) -> None:
    home = tmp_path / ".citadel"
    store = RunStore(f"sqlite:///{home / 'events.db'}")
    definition = {
        "name": "told",
        "nodes": [{"id": "a", "type": "transform", "config": {"output": "1"}}],
        "notify": [{"url": "https://example.test/hook", "retry": {"max_attempts": 2, "jitter": 0}}],
    }
    command = start_command(parse_definition(definition).model_dump(mode="json"), {}, "acme")
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    delivery = f"{command.run_id}:notify:0"
    store.decide([command], now)
    for attempt, status, error in (
        (1, None, "ConnectError: refused"),
        (2, 500, "HTTP 500 Internal Server Error"),
    ):
        outcome = {"delivery_id": delivery, "attempt": attempt, "status_code": status, "error": error}
        store.decide([Envelope.new("NotificationAttempted", command.run_id, outcome)], now)
    store.close()
    readable = citadel("runs", "history", command.run_id, cwd=tmp_path, CITADEL_HOME=str(home), COLUMNS="250")
    assert readable.returncode == 0, readable.stderr
    lines = [line for line in readable.stdout.splitlines() if "Notification" in line]
    assert len(lines) == 3, readable.stdout
    assert "https://example.test/hook attempt 1; ConnectError: refused; retrying, next at" in lines[1]
    assert "attempt 2; HTTP 500; HTTP 500 Internal Server Error; failed" in lines[2]
