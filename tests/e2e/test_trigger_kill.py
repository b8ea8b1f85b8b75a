"""A production worker (`citadel worker`, its own process) is SIGKILLed while its trigger consumer
is half-way through a topic: another worker takes the topic over from the committed offsets, and
1,000 matching messages have started exactly 1,000 runs: none lost with the killed worker, none
started twice by the messages it had taken but not yet committed."""

from __future__ import annotations

import asyncio
import random
import secrets
import signal
import subprocess
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from aggregates.store import RunStore
from schemas.definition import parse_definition
from streams.kafka import KafkaSettings, ensure_topics
from tests.conftest import kafka_for
from tests.e2e.kafka_tools import committed, dead_letters, wait_committed
from tests.e2e.processes import cluster_env, log_of, start_citadel, stop
from tests.streams.test_triggers import (
    mixed_orders,
    orders,
    publish,
    started_runs,
    triggered_starts,
    user_topic,
)

pytestmark = pytest.mark.timeout(420)

MATCHING = 1000
WORKFLOW = "acme.killed"


async def kill_mid_batch(
    worker: subprocess.Popen[bytes],
    kafka: KafkaSettings,
    group: str,
    topic: str,
    trickling: asyncio.Task[None],
) -> tuple[int, int]:
    """SIGKILL `worker` while messages still come, at a moment when it has published runs of
    messages it has not committed if it can be caught at one.

    The worker is frozen (SIGSTOP) at random moments; if everything it published is committed it
    goes on (SIGCONT), until the messages have all been published: then it is killed anyway.
    Returns (committed offset, offset of the last message whose run it published)."""
    while True:
        await asyncio.sleep(random.uniform(0.05, 0.3))
        worker.send_signal(signal.SIGSTOP)
        done = await committed(kafka, group, topic)
        published = [int(s.payload["input"]["order"][2:]) for s in await triggered_starts(kafka, WORKFLOW)]
        last = max(published, default=-1)
        if last >= done or trickling.done():
            worker.send_signal(signal.SIGKILL)
            worker.wait(30)
            return done, last
        worker.send_signal(signal.SIGCONT)


async def publish_slowly(kafka: KafkaSettings, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    for at in range(0, len(messages), 10):
        await publish(kafka, topic, messages[at : at + 10])
        await asyncio.sleep(0.2)


async def test_a_killed_workers_trigger_messages_start_exactly_one_run_each(
    bootstrap: str, tmp_path: Path
) -> None:
    kafka = kafka_for(bootstrap)
    group = f"g{uuid.uuid4().hex[:8]}"
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    env = {
        **cluster_env(kafka, tmp_path),
        "CITADEL_GROUP": group,
        "CITADEL_EVENT_STORE": store_url,
        "CITADEL_JWT_SECRET": secrets.token_urlsafe(32),
        "CITADEL_GATEWAY_PORT": "0",
        "CITADEL_EXECUTOR_CONCURRENCY": "4",
        "CITADEL_TRIGGER_BATCH": "50",
        "CITADEL_LOG_LEVEL": "WARNING",
    }
    env.pop("CITADEL_CLICKHOUSE", None)
    topic = await user_topic(kafka)
    await ensure_topics(kafka)  # the engine's topics, so that the test can read them at once
    store = RunStore(store_url)
    store.deploy(parse_definition(orders(WORKFLOW, topic)))
    store.close()

    # 1,000 matching messages among 150 filtered out and 50 that are not JSON.
    messages, orders_matching = mixed_orders(
        MATCHING + 200, every=24, junk=5, filtered=(9, 13, 17), prefix="M-"
    )
    matching = set(orders_matching)
    assert len(matching) == MATCHING

    first = start_citadel("worker", tmp_path, env, "first")
    second: subprocess.Popen[bytes] | None = None
    try:
        # The worker takes the topic up once it has read the deployment; the rest of the messages
        # trickle in while it works, so that it is caught in the middle of a batch.
        await publish(kafka, topic, messages[:100])
        await wait_committed(kafka, f"{group}-triggers", topic, 100, timeout=180)
        assert first.poll() is None, log_of(tmp_path, "first")
        trickle = asyncio.create_task(publish_slowly(kafka, topic, messages[100:]))
        done, published = await kill_mid_batch(first, kafka, f"{group}-triggers", topic, trickle)
        killed_at = time.monotonic()
        print(f"killed at committed offset {done}, runs published up to offset {published}")
        await trickle
        end = len(messages)

        second = start_citadel("worker", tmp_path, env, "second")
        await wait_committed(kafka, f"{group}-triggers", topic, end, timeout=240)
        assert second.poll() is None, log_of(tmp_path, "second")
        runs = await started_runs(kafka, WORKFLOW, MATCHING)
        print(f"the second worker finished the topic {time.monotonic() - killed_at:.1f} s after the kill")
    finally:
        for process in (first, second):
            if process is not None:
                stop(process)

    starts = await triggered_starts(kafka, WORKFLOW)
    # More StartRuns than messages when the worker was caught between publishing and committing:
    # its batch was read again by the second worker (and started nothing twice).
    print(f"{len(starts)} StartRuns published for {MATCHING} matching messages")
    assert len({s.run_id for s in starts}) == MATCHING
    assert set(runs) == {s.run_id for s in starts}
    inputs = Counter(r.payload["input"]["order"] for r in runs.values())
    assert set(inputs) == matching and max(inputs.values()) == 1
    letters = [letter for letter in await dead_letters(kafka, 50) if letter["topic"] == topic]
    assert {letter["offset"] for letter in letters} == set(range(5, len(messages), 24))

    store = RunStore(store_url)
    try:
        statuses = Counter(store.run(run_id).status for run_id in runs)
    finally:
        store.close()
    assert statuses == {"completed": MATCHING}, statuses
