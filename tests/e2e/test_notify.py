"""Outgoing webhooks against real HTTP servers on loopback: retried with backoff until delivered,
signed so the receiver can verify them, given up after the policy's attempts, re-armed after
an engine restart; every attempt is an event of the run, and the secret is written nowhere."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from aggregates.store import RunStore
from schemas.envelope import Envelope
from schemas.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from streams.engine import Engine
from streams.history import describe, run_history
from tests.conftest import EngineFactory

FAST_RETRY = {"max_attempts": 4, "delay_seconds": 0.2, "multiplier": 2, "jitter": 0}


class Receiver:
    """An HTTP server that answers `status` to the first `failures` deliveries, then 200."""

    def __init__(self, failures: int, status: int) -> None:
        self.failures = failures
        self.status = status
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        return web.Response(status=self.status if len(self.requests) <= self.failures else 200)


@contextlib.asynccontextmanager
async def receiving(failures: int, status: int = 503) -> AsyncIterator[Receiver]:
    receiver = Receiver(failures, status)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    receiver.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        await runner.cleanup()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = secrets.token_hex(24)
    monkeypatch.setenv("CITADEL_SECRET_NOTIFY_KEY", value)
    return value


def notifying(*targets: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"notifying-{uuid.uuid4().hex[:6]}",
        "nodes": [{"id": "answer", "type": "transform", "config": {"output": "input.n * 2"}}],
        "outputs": {"answer": "answer"},
        "notify": list(targets),
    }


async def start(engine: Engine, definition: dict[str, Any]) -> str:
    run_id = str(uuid.uuid4())
    await engine.submit(Envelope.new("StartRun", run_id, {"definition": definition, "input": {"n": 21}}))
    return run_id


async def attempts(store_url: str, run_id: str, count: int, timeout: float = 60.0) -> list[Any]:
    """The run's NotificationAttempted events, once there are `count` of them."""
    async with asyncio.timeout(timeout):
        while True:
            store = RunStore(store_url)
            try:
                found = [e for e in store.run_events(run_id) if type(e).__name__ == "NotificationAttempted"]
            finally:
                store.close()
            if len(found) >= count:
                return found
            await asyncio.sleep(0.1)


async def left_active_runs(engine: Engine, run_id: str) -> None:
    """Once the run has nothing left to deliver, it leaves the engine's active runs."""
    assert engine.ledger is not None
    async with asyncio.timeout(30):
        while run_id in await engine._in_store(engine.ledger.active_runs):
            await asyncio.sleep(0.1)


def stored_bytes(store_url: str) -> bytes:
    path = Path(store_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


async def test_a_delivery_failing_twice_is_retried_until_delivered_and_verifies(
    engine: Engine, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store_url = engine.settings.store_url
    async with receiving(failures=2) as receiver:
        target = {"url": receiver.url, "secret": "NOTIFY_KEY", "retry": FAST_RETRY}
        run_id = await start(engine, notifying(target))
        found = await attempts(store_url, run_id, 3)
    assert [(e.attempt, e.status_code, e.outcome) for e in found] == [
        (1, 503, "retrying"),
        (2, 503, "retrying"),
        (3, 200, "delivered"),
    ]
    assert [e.url for e in found] == [receiver.url] * 3
    for headers, body in receiver.requests:
        verify(secret, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body, time.time(), 300)
        assert headers[DELIVERY_HEADER] == f"{run_id}:notify:0"
    summary = orjson.loads(receiver.requests[-1][1])
    assert {k: summary[k] for k in ("run_id", "status", "outputs", "attempt")} == {
        "run_id": run_id,
        "status": "completed",
        "outputs": {"answer": 42},
        "attempt": 3,
    }
    store = RunStore(store_url)
    try:
        lines = [f"{e.type} {describe(e)}" for e in run_history(store, run_id)]
    finally:
        store.close()
    assert sum(line.startswith("NotificationAttempted") for line in lines) == 3
    assert secret.encode() not in stored_bytes(store_url)
    assert secret not in caplog.text


async def test_a_receiver_that_is_down_gets_the_policy_s_attempts_then_a_final_failure(
    engine: Engine, secret: str
) -> None:
    down = f"http://127.0.0.1:{closed_port()}/hook"
    policy = {**FAST_RETRY, "max_attempts": 2}
    run_id = await start(engine, notifying({"url": down, "secret": "NOTIFY_KEY", "retry": policy}))
    found = await attempts(engine.settings.store_url, run_id, 2)
    assert [(e.attempt, e.status_code, e.outcome, e.outstanding) for e in found] == [
        (1, None, "retrying", 1),
        (2, None, "failed", 0),
    ]
    assert all("ConnectError" in e.error for e in found)
    await left_active_runs(engine, run_id)  # nothing left to deliver


async def test_a_receiver_answering_a_client_error_gets_one_attempt(engine: Engine) -> None:
    async with receiving(failures=5, status=400) as receiver:
        run_id = await start(engine, notifying({"url": receiver.url, "retry": FAST_RETRY}))
        found = await attempts(engine.settings.store_url, run_id, 1)
        await left_active_runs(engine, run_id)  # so no other attempt is in flight
    assert [(e.attempt, e.status_code, e.error_class, e.outcome) for e in found] == [
        (1, 400, "HTTPStatus", "failed")
    ]
    assert len(receiver.requests) == 1


async def test_a_failure_whose_class_retry_on_does_not_list_is_final_at_once(engine: Engine) -> None:
    async with receiving(failures=5) as receiver:
        policy = {**FAST_RETRY, "retry_on": ["Timeout", "ConnectionError"]}
        run_id = await start(engine, notifying({"url": receiver.url, "retry": policy}))
        found = await attempts(engine.settings.store_url, run_id, 1)
        await left_active_runs(engine, run_id)
    assert [(e.attempt, e.status_code, e.error_class, e.outcome) for e in found] == [
        (1, 503, "HTTPStatus", "failed")
    ]
    assert len(receiver.requests) == 1


async def test_a_pending_delivery_survives_an_engine_restart(
    engine_factory: EngineFactory, tmp_path: Path, secret: str
) -> None:
    store_url = f"sqlite:///{tmp_path}/events.db"
    slow_retry = {**FAST_RETRY, "delay_seconds": 3}
    async with receiving(failures=1) as receiver:
        definition = notifying({"url": receiver.url, "secret": "NOTIFY_KEY", "retry": slow_retry})
        async with engine_factory(store_url=store_url) as first:
            run_id = await start(first, definition)
            (failed,) = await attempts(store_url, run_id, 1)
        assert failed.outcome == "retrying"  # due in 3 s, when no engine runs
        async with engine_factory(store_url=store_url):
            found = await attempts(store_url, run_id, 2)
    assert [(e.attempt, e.outcome) for e in found] == [(1, "retrying"), (2, "delivered")]
    assert len(receiver.requests) == 2


async def test_a_delivery_to_a_private_address_is_refused_where_private_egress_is_denied(
    engine_factory: EngineFactory,
) -> None:
    async with receiving(failures=0) as receiver, engine_factory(egress_private=False) as engine:
        policy = {**FAST_RETRY, "max_attempts": 1}
        run_id = await start(engine, notifying({"url": receiver.url, "retry": policy}))
        (found,) = await attempts(engine.settings.store_url, run_id, 1)
    assert found.outcome == "failed" and "private, loopback or link-local" in found.error
    assert receiver.requests == []
