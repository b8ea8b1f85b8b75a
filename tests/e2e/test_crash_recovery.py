"""SIGKILL the engine in the middle of runs and start it again: every run completes, no node
success is applied twice, and no committed event is missing from citadel.run-events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from aggregates.store import RunStore
from citadel.runs import follow, start_command
from streams.kafka import COMMANDS, RUN_EVENTS, KafkaSettings
from streams.watch import topic_reader, watch_run
from tests.conftest import EngineFactory
from tests.e2e.processes import stop

embedded_only = pytest.mark.skipif(
    bool(os.environ.get("CITADEL_KAFKA")), reason="kills the embedded broker of `citadel up`"
)

RUNS = 12
SLOW_CHAIN = {
    "name": "slow-chain",
    "nodes": [
        {
            "id": "a",
            "type": "python",
            "config": {
                "inputs": {"n": "input.n"},
                "code": "import time\ndef main(n):\n    time.sleep(0.3)\n    return n + 1",
            },
        },
        {
            "id": "b",
            "type": "python",
            "needs": ["a"],
            "config": {
                "inputs": {"n": "a"},
                "code": "import time\ndef main(n):\n    time.sleep(0.3)\n    return n * 2",
            },
        },
        {
            "id": "c",
            "type": "python",
            "needs": ["b"],
            "config": {
                "inputs": {"n": "b"},
                "code": "import time\ndef main(n):\n    time.sleep(0.3)\n    return n + 3",
            },
        },
        {"id": "d", "type": "transform", "needs": ["c"], "config": {"output": "c * 10"}},
    ],
    "outputs": {"result": "d"},
}


def start_engine(home: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CITADEL_HOME": str(home),
        "CITADEL_PARTITIONS": "4",
        "CITADEL_EXECUTOR_CONCURRENCY": "6",
    }
    env.pop("CITADEL_EVENT_STORE", None)
    log = open(home.parent / f"engine-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    engine_file = home / "engine.json"
    if engine_file.exists():
        engine_file.unlink()
    process = subprocess.Popen(
        [sys.executable, "-m", "citadel.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while not engine_file.exists():
        assert process.poll() is None, f"citadel up exited with {process.returncode}"
        assert time.monotonic() < deadline, "citadel up did not come up within 60 s"
        time.sleep(0.1)
    return process


def kafka_of(home: Path) -> KafkaSettings:
    info = json.loads((home / "engine.json").read_text())
    return KafkaSettings.for_embedded(info["bootstrap"], info["partitions"])


LAST_READ: dict[str, float] = {}  # broker -> when the collector last got messages from it


async def collect(kafka: KafkaSettings, seen: set[tuple[str, int]], stop: asyncio.Event) -> None:
    consumer = topic_reader(kafka, RUN_EVENTS)
    await consumer.start()
    try:
        while not stop.is_set():
            try:
                batch = await consumer.getmany(timeout_ms=100)
            except Exception:
                return  # the broker was killed under us
            for records in batch.values():
                for record in records:
                    event = orjson.loads(record.value)
                    seen.add((event["run_id"], event["version"]))
            if batch:
                LAST_READ[kafka.bootstrap] = time.monotonic()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5)


def statuses(store: RunStore, run_ids: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for run_id in run_ids:
        try:
            run = store.run(run_id)
        except KeyError:
            counts["missing"] += 1
            continue
        counts[run.status] += 1
        counts["node successes"] += sum(1 for n in run.nodes.values() if n["status"] == "succeeded")
    return counts


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@embedded_only
@pytest.mark.parametrize("kill_broker", [False, True], ids=["worker-killed", "worker-and-broker-killed"])
async def test_sigkill_mid_run_then_restart_completes_every_run_exactly_once(
    tmp_path: Path, kill_broker: bool
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    first = start_engine(home)
    kafka = kafka_of(home)
    seen: set[tuple[str, int]] = set()
    stop_first = asyncio.Event()
    collector = asyncio.create_task(collect(kafka, seen, stop_first))
    store = RunStore(f"sqlite:///{home / 'events.db'}")
    second: subprocess.Popen[bytes] | None = None
    try:
        commands = [
            start_command(SLOW_CHAIN, {"n": n}, "acme", run_id=str(uuid.uuid4())) for n in range(RUNS)
        ]
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        await producer.start()
        for command in commands:
            await producer.send_and_wait(
                kafka.topic(COMMANDS),
                orjson.dumps(command.model_dump(mode="json", exclude_none=True)),
                key=command.run_id.encode(),
            )
        await producer.stop()
        run_ids = [c.run_id for c in commands]

        # Kill once every run has started and some, but not all, node work is done.
        await wait_for(
            lambda: statuses(store, run_ids)["node successes"] >= RUNS, 60, "the first node successes"
        )
        before = statuses(store, run_ids)
        assert before["completed"] < RUNS, "killed too late: every run had already finished"
        first.send_signal(signal.SIGKILL)
        first.wait()
        if kill_broker:
            # Everything the dead engine published is in this broker: let the collector read it
            # all (it has been quiet for a second) before the broker, and its memory, go too.
            await wait_for(
                lambda: time.monotonic() - LAST_READ.get(kafka.bootstrap, 0) > 1.0,
                20,
                "the collector to catch up with the first broker",
            )
            broker = json.loads((home / "broker.json").read_text())
            os.kill(broker["pid"], signal.SIGKILL)
            stop_first.set()
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)

        second = start_engine(home)
        if kill_broker:
            kafka = kafka_of(home)
            stop_second = asyncio.Event()
            collector = asyncio.create_task(collect(kafka, seen, stop_second))
        await wait_for(
            lambda: statuses(store, run_ids)["completed"] == RUNS,
            120,
            "every run to complete after the restart",
        )

        for n, run_id in enumerate(run_ids):
            run = store.run(run_id)
            assert run.outputs == {"result": ((n + 1) * 2 + 3) * 10}
            successes = Counter(
                e.node_id for e in store.run_events(run_id) if type(e).__name__ == "NodeSucceeded"
            )
            assert successes == {"a": 1, "b": 1, "c": 1, "d": 1}, f"run {run_id}: {successes}"

        # Every committed event reached citadel.run-events (from one broker life or the other).
        committed = {(run_id, e.originator_version) for run_id in run_ids for e in store.run_events(run_id)}
        await wait_for(lambda: committed <= seen, 30, "every committed event on run-events")
    finally:
        stop_first.set()
        for process in (first, second):
            if process is not None:
                stop(process, signal.SIGINT, timeout=20)
        collector.cancel()
        store.close()
        broker_file = home / "broker.json"
        if broker_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(json.loads(broker_file.read_text())["pid"], signal.SIGKILL)


async def test_a_retry_timer_pending_when_the_engine_stops_fires_after_restart(
    engine_factory: EngineFactory, tmp_path: Path, bootstrap: str
) -> None:
    """The due time lives in the event store: a new engine (on a broker that kept nothing)
    re-arms it on start, and the run goes on."""
    flaky = {
        "name": "flaky-timer",
        "nodes": [
            {
                "id": "once",
                "type": "python",
                "retry": {"max_attempts": 2, "backoff": "constant", "delay_seconds": 3, "jitter": 0},
                "config": {
                    "inputs": {"attempt": "run.attempt"},
                    "code": "def main(attempt):\n    if attempt == 1:\n"
                    "        raise TimeoutError('first try')\n    return attempt\n",
                },
            }
        ],
        "outputs": {"attempts": "once"},
    }
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    command = start_command(flaky, {}, "acme")
    async with engine_factory(store_url=store_url) as first:
        await first.submit(command)
        async with contextlib.aclosing(watch_run(first.settings.kafka, command.run_id)) as events:
            async for event in events:
                if event.type == "RetryScheduled":
                    break
    # A fresh topic namespace: as if the embedded broker had restarted empty.
    async with engine_factory(store_url=store_url) as second:
        report = await asyncio.wait_for(follow(second.settings.kafka, command.run_id), 30)
    assert report.status == "completed"
    assert report.outputs == {"attempts": 2}
