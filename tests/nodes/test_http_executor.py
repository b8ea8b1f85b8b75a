"""Specification of the `http` node executor and its secret stores, against a real local HTTP server."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from nodes.http import HttpExecutor, idempotency_key
from nodes.secrets import EnvironmentSecrets, FileSecrets, SecretNotFound, redact
from schemas.tasks import NodeOutcome, NodeTask

TOKEN = 'tok"en/+=Zq9Xw7'
# A run of the token no escaping changes: its absence shows no form of the token got through.
TOKEN_CORE = "Zq9Xw7"
OTHER = "other-secret-value-77"


class FakeClock:
    """Time moves only when someone sleeps on it (or the test advances it); sleeps are recorded."""

    def __init__(self) -> None:
        self.current = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        self.sleeps: list[float] = []

    def now(self) -> dt.datetime:
        return self.current

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.current += dt.timedelta(seconds=seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        self.current += dt.timedelta(seconds=seconds)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    """A real HTTP server on 127.0.0.1 whose per-path behaviour each test sets."""

    port: int
    routes: dict[str, Handler] = field(default_factory=dict)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def hits(self, path: str) -> list[dict[str, str]]:
        return [headers for seen, headers in self.requests if seen == path]

    def failing(
        self, path: str, times: int, status: int = 503, headers: dict[str, str] | None = None
    ) -> None:
        """`path` answers `status` the first `times` requests, then 200 {"ok": true}."""
        count = {"n": 0}

        async def handle(request: web.Request) -> web.StreamResponse:
            count["n"] += 1
            if count["n"] <= times:
                return web.Response(status=status, text="try later", headers=headers)
            return web.json_response({"ok": True})

        self.routes[path] = handle

    def answering(self, path: str, status: int = 200, text: str = "", **kwargs: Any) -> None:
        async def handle(request: web.Request) -> web.StreamResponse:
            return web.Response(status=status, text=text, **kwargs)

        self.routes[path] = handle


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[Server]:
    state = Server(port=0)

    async def dispatch(request: web.Request) -> web.StreamResponse:
        state.requests.append((request.path, dict(request.headers)))
        handler = state.routes.get(request.path)
        if handler is None:
            return web.Response(status=404, text=f"no route {request.path}")
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


@pytest.fixture(autouse=True)
def direct_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to 127.0.0.1 must not go through a proxy the environment may name."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def secret_dir(tmp_path: Path) -> Path:
    (tmp_path / "api_token").write_text(TOKEN + "\n")
    (tmp_path / "other").write_text(OTHER)
    return tmp_path


@pytest_asyncio.fixture
async def executor(server: Server, clock: FakeClock, secret_dir: Path) -> AsyncIterator[HttpExecutor]:
    server.routes.clear()
    server.requests.clear()
    running = HttpExecutor(FileSecrets(secret_dir), clock=clock, response_cap_bytes=4096)
    await running.start()
    yield running
    await running.stop()


def make_task(url: str, attempt: int = 1, **fields: Any) -> NodeTask:
    config: dict[str, Any] = {"url": url, "retry": {"max_attempts": 3}}
    config.update(fields.pop("config", {}))
    values: dict[str, Any] = {
        "run_id": "run-1",
        "tenant": "acme",
        "workflow": "wf",
        "node_id": "call",
        "node_type": "http",
        "attempt": attempt,
        "attempt_id": f"run-1/call/{attempt}",
        "config": config,
        "inputs": {},
        "timeout_seconds": 60.0,
    }
    values.update(fields)
    return NodeTask(**values)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_no_secret(outcome: NodeOutcome, records: list[logging.LogRecord], *values: str) -> None:
    dumped = outcome.model_dump_json() + json.dumps(outcome.model_dump(), ensure_ascii=False)
    logged = "\n".join(record.getMessage() for record in records)
    for value in values:
        forms = (value, json.dumps(value)[1:-1], TOKEN_CORE if value == TOKEN else value)
        for form in forms:
            assert form not in dumped
            assert form not in logged


# ---- requests and responses ------------------------------------------------------


async def test_a_json_response_is_the_output_with_status_and_headers(
    executor: HttpExecutor, server: Server
) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"method": request.method, "query": dict(request.query), "body": await request.json()},
            headers={"X-Reply": "yes"},
        )

    server.routes["/echo"] = handle
    task = make_task(
        server.url("/echo"),
        config={"method": "POST", "query": {"a": 1}, "json": {"from": "config"}},
        inputs={"json": {"from": "inputs"}},
    )
    outcome = await executor.execute(task)
    assert outcome.ok, outcome.error_message
    assert outcome.output["status"] == 200
    assert outcome.output["headers"]["x-reply"] == "yes"
    assert outcome.output["body"] == {"method": "POST", "query": {"a": "1"}, "body": {"from": "inputs"}}


async def test_a_text_response_is_the_output_as_text(executor: HttpExecutor, server: Server) -> None:
    server.answering("/text", text="plain words")
    outcome = await executor.execute(make_task(server.url("/text")))
    assert outcome.ok
    assert outcome.output["body"] == "plain words"


async def test_a_config_without_url_fails_with_an_actionable_message(executor: HttpExecutor) -> None:
    outcome = await executor.execute(make_task("", config={"url": None}))
    assert outcome.error_class == "InvalidTask"
    assert "config.url" in (outcome.error_message or "")


async def test_an_unstarted_executor_fails_the_attempt(secret_dir: Path, server: Server) -> None:
    outcome = await HttpExecutor(FileSecrets(secret_dir)).execute(make_task(server.url("/x")))
    assert outcome.error_class == "ExecutorUnavailable"


# ---- retries ---------------------------------------------------------------------


async def test_503s_are_retried_on_the_policy_schedule_within_the_jitter_bounds(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    server.failing("/flaky", times=2)
    outcome = await executor.execute(make_task(server.url("/flaky")))
    assert outcome.ok, outcome.error_message
    assert len(server.hits("/flaky")) == 3
    # delay_seconds 0.2, multiplier 2, jitter 0.2: 0.2 ± 20 %, then 0.4 ± 20 %.
    assert len(clock.sleeps) == 2
    assert 0.16 <= clock.sleeps[0] <= 0.24
    assert 0.32 <= clock.sleeps[1] <= 0.48


async def test_the_jitter_is_deterministic_per_attempt(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    schedules = []
    for attempt in (1, 1, 2):
        clock.sleeps.clear()
        server.failing("/flaky", times=2)
        assert (await executor.execute(make_task(server.url("/flaky"), attempt=attempt))).ok
        schedules.append(list(clock.sleeps))
    assert schedules[0] == schedules[1]
    assert schedules[0] != schedules[2]


async def test_delays_grow_by_the_multiplier_up_to_the_cap(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    server.failing("/down", times=100, status=502)
    retry = {"max_attempts": 5, "delay_seconds": 4, "multiplier": 3, "max_delay_seconds": 10, "jitter": 0}
    outcome = await executor.execute(make_task(server.url("/down"), config={"retry": retry}))
    assert clock.sleeps == [4, 10, 10, 10]
    assert outcome.error_class == "HTTPStatus"
    assert "502" in (outcome.error_message or "")
    assert "after 5 attempt(s)" in (outcome.error_message or "")


async def test_retry_after_seconds_sets_the_wait(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    server.failing("/busy", times=1, status=429, headers={"Retry-After": "3"})
    outcome = await executor.execute(make_task(server.url("/busy")))
    assert outcome.ok
    assert clock.sleeps == [3.0]


async def test_retry_after_as_an_http_date_sets_the_wait(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    when = email.utils.format_datetime(clock.now() + dt.timedelta(seconds=7), usegmt=True)
    server.failing("/busy", times=1, status=503, headers={"Retry-After": when})
    assert (await executor.execute(make_task(server.url("/busy")))).ok
    assert clock.sleeps == [7.0]


async def test_a_retry_after_beyond_the_max_delay_ends_the_attempt_without_cutting_it_short(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    server.failing("/busy", times=1, status=429, headers={"Retry-After": "120"})
    outcome = await executor.execute(make_task(server.url("/busy")))
    assert outcome.error_class == "HTTPStatus"
    assert "120 s" in (outcome.error_message or "")
    assert clock.sleeps == []
    assert len(server.hits("/busy")) == 1


async def test_a_404_is_not_retried(executor: HttpExecutor, server: Server, clock: FakeClock) -> None:
    server.answering("/missing", status=404, text="no such thing")
    outcome = await executor.execute(make_task(server.url("/missing")))
    assert outcome.error_class == "HTTPStatus"
    assert "404" in (outcome.error_message or "")
    assert "no such thing" in (outcome.error_message or "")
    assert len(server.hits("/missing")) == 1
    assert clock.sleeps == []


async def test_connection_refused_is_retried_then_fails_as_connection_error(
    executor: HttpExecutor, clock: FakeClock
) -> None:
    outcome = await executor.execute(make_task(f"http://127.0.0.1:{closed_port()}/"))
    assert outcome.error_class == "ConnectionError"
    assert "after 3 attempt(s)" in (outcome.error_message or "")
    assert len(clock.sleeps) == 2


async def test_retries_stop_before_the_next_would_pass_the_node_timeout(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    server.failing("/down", times=100)
    retry = {"max_attempts": 10, "delay_seconds": 2, "multiplier": 1, "jitter": 0}
    task = make_task(server.url("/down"), config={"retry": retry}, timeout_seconds=5.0)
    outcome = await executor.execute(task)
    assert outcome.error_class == "HTTPStatus"
    assert "timeout" in (outcome.error_message or "")
    assert clock.sleeps == [2, 2]


async def test_a_slow_response_fails_as_timeout(executor: HttpExecutor, server: Server) -> None:
    async def handle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.Response(text="late")

    server.routes["/slow"] = handle
    task = make_task(server.url("/slow"), config={"timeout_seconds": 0.2, "retry": {"max_attempts": 1}})
    outcome = await executor.execute(task)
    assert outcome.error_class == "Timeout"


# ---- idempotency keys ------------------------------------------------------------


async def test_the_idempotency_key_is_stable_across_retries_and_differs_between_attempts(
    executor: HttpExecutor, server: Server
) -> None:
    server.failing("/pay", times=2)
    assert (await executor.execute(make_task(server.url("/pay"), attempt=1))).ok
    server.failing("/pay", times=0)
    assert (await executor.execute(make_task(server.url("/pay"), attempt=2))).ok
    keys = [headers["Idempotency-Key"] for headers in server.hits("/pay")]
    assert len(keys) == 4
    assert keys[0] == keys[1] == keys[2] == idempotency_key(make_task("", attempt=1))
    assert keys[3] != keys[0]


# ---- circuit breaker -------------------------------------------------------------


async def test_the_circuit_opens_after_consecutive_failures_and_fails_fast(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    server.failing("/down", times=100)
    once = {"retry": {"max_attempts": 1}}
    for _ in range(5):
        assert (
            await executor.execute(make_task(server.url("/down"), config=once))
        ).error_class == "HTTPStatus"
    outcome = await executor.execute(make_task(server.url("/down"), config=once))
    assert outcome.error_class == "CircuitOpen"
    assert f"127.0.0.1:{server.port}" in (outcome.error_message or "")
    assert "half-opens at 2030-01-01T00:00:30" in (outcome.error_message or "")
    assert len(server.hits("/down")) == 5


async def test_after_the_cooldown_a_failed_trial_reopens_and_a_good_one_closes(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    once = {"retry": {"max_attempts": 1}}
    server.failing("/down", times=6)
    for _ in range(5):
        await executor.execute(make_task(server.url("/down"), config=once))
    clock.advance(30)
    assert (await executor.execute(make_task(server.url("/down"), config=once))).error_class == "HTTPStatus"
    assert (await executor.execute(make_task(server.url("/down"), config=once))).error_class == "CircuitOpen"
    assert len(server.hits("/down")) == 6
    clock.advance(30)
    assert (await executor.execute(make_task(server.url("/down"), config=once))).ok
    breaker = executor.breaker(f"127.0.0.1:{server.port}")
    assert not breaker.is_open
    assert breaker.failures == 0


async def test_half_open_lets_exactly_one_trial_through(
    executor: HttpExecutor, server: Server, clock: FakeClock
) -> None:
    once = {"retry": {"max_attempts": 1}}
    server.failing("/down", times=5)
    for _ in range(5):
        await executor.execute(make_task(server.url("/down"), config=once))
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="ok")

    server.routes["/held"] = held
    clock.advance(30)
    trial = asyncio.create_task(executor.execute(make_task(server.url("/held"), config=once)))
    while not server.hits("/held"):
        await asyncio.sleep(0.01)
    other = await executor.execute(make_task(server.url("/held"), config=once))
    assert other.error_class == "CircuitOpen"
    assert "trial" in (other.error_message or "")
    release.set()
    assert (await trial).ok
    assert (await executor.execute(make_task(server.url("/held"), config=once))).ok


async def test_429_and_404_do_not_count_against_the_host(executor: HttpExecutor, server: Server) -> None:
    server.answering("/gone", status=404)
    server.failing("/busy", times=100, status=429, headers={"Retry-After": "0"})
    for _ in range(6):
        await executor.execute(make_task(server.url("/gone")))
    await executor.execute(make_task(server.url("/busy")))
    assert not executor.breaker(f"127.0.0.1:{server.port}").is_open


# ---- rate limit and size cap -------------------------------------------------------


async def test_the_rate_limit_waits_on_the_clock(server: Server, clock: FakeClock, secret_dir: Path) -> None:
    server.answering("/ok", text="fine")
    limited = HttpExecutor(FileSecrets(secret_dir), clock=clock, rate_per_second=2)
    await limited.start()
    try:
        for _ in range(4):
            assert (await limited.execute(make_task(server.url("/ok")))).ok
    finally:
        await limited.stop()
    # A burst of 2, then one request every 0.5 s.
    assert clock.sleeps == [0.5, 0.5]


async def test_a_response_over_the_cap_fails_as_too_large(executor: HttpExecutor, server: Server) -> None:
    async def streamed(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(100):
            await response.write(b"x" * 1024)
        return response

    server.routes["/big"] = streamed
    server.answering("/big-declared", text="y" * 5000)
    for path in ("/big", "/big-declared"):
        outcome = await executor.execute(make_task(server.url(path)))
        assert outcome.error_class == "ResponseTooLarge", outcome.error_message
        assert "4096-byte" in (outcome.error_message or "")
    server.answering("/fits", text="z" * 4096)
    assert (await executor.execute(make_task(server.url("/fits")))).ok


# ---- secrets -----------------------------------------------------------------------


async def echo_headers(request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {"headers": dict(request.headers), "raw": request.headers.get("Authorization", "")},
        headers={"X-Echo": request.headers.get("Authorization", "")},
    )


async def echo_headers_as_error(request: web.Request) -> web.StreamResponse:
    return web.Response(status=400, text=json.dumps(dict(request.headers)))


async def test_a_secret_reaches_the_server_but_not_the_outcome_or_the_logs(
    executor: HttpExecutor, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.routes["/echo"] = echo_headers
    config = {"headers": {"Authorization": "Bearer {{secret:api_token}}"}, "secrets": ["api_token", "other"]}
    outcome = await executor.execute(make_task(server.url("/echo"), config=config))
    assert outcome.ok, outcome.error_message
    assert server.hits("/echo")[0]["Authorization"] == f"Bearer {TOKEN}"
    assert outcome.output["body"]["raw"] == "Bearer ***"
    assert outcome.output["headers"]["x-echo"] == "Bearer ***"
    assert_no_secret(outcome, caplog.records, TOKEN, OTHER)
    assert any(record.name.startswith("httpcore") for record in caplog.records)


async def test_a_secret_echoed_in_an_error_response_is_redacted(
    executor: HttpExecutor, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.routes["/reject"] = echo_headers_as_error
    config = {"headers": {"X-Key": "{{secret:api_token}}"}, "secrets": ["api_token"]}
    outcome = await executor.execute(make_task(server.url("/reject"), config=config))
    assert outcome.error_class == "HTTPStatus"
    assert "X-Key" in (outcome.error_message or "")
    assert "***" in (outcome.error_message or "")
    assert_no_secret(outcome, caplog.records, TOKEN)


async def test_a_secret_echoed_in_a_retried_5xx_is_redacted_from_retry_logs(
    executor: HttpExecutor, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def fail_with_echo(request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text=f"bad key {request.headers['X-Key']}")

    server.routes["/err"] = fail_with_echo
    config = {"headers": {"X-Key": "{{secret:api_token}}"}, "secrets": ["api_token"]}
    outcome = await executor.execute(make_task(server.url("/err"), config=config))
    assert outcome.error_class == "HTTPStatus"
    assert any("try 2 of 3" in record.getMessage() for record in caplog.records)
    assert_no_secret(outcome, caplog.records, TOKEN)


async def test_an_unknown_secret_fails_without_leaking_other_values(
    executor: HttpExecutor, server: Server
) -> None:
    config = {"headers": {"X-Key": "{{secret:nope}}"}, "secrets": ["api_token", "nope"]}
    outcome = await executor.execute(make_task(server.url("/echo"), config=config))
    assert outcome.error_class == "SecretNotFound"
    assert "'nope'" in (outcome.error_message or "")
    assert_no_secret(outcome, [], TOKEN)
    assert server.hits("/echo") == []


async def test_a_secret_reference_must_be_listed_in_config_secrets(
    executor: HttpExecutor, server: Server
) -> None:
    config = {"headers": {"X-Key": "{{secret:api_token}}"}}
    outcome = await executor.execute(make_task(server.url("/echo"), config=config))
    assert outcome.error_class == "InvalidTask"
    assert "config.secrets" in (outcome.error_message or "")


async def test_a_secret_that_would_break_the_header_is_refused_without_its_value(
    executor: HttpExecutor, server: Server, secret_dir: Path
) -> None:
    (secret_dir / "broken").write_text("line1\nInjected: yes")
    config = {"headers": {"X-Key": "{{secret:broken}}"}, "secrets": ["broken"]}
    outcome = await executor.execute(make_task(server.url("/echo"), config=config))
    assert outcome.error_class == "InvalidTask"
    assert "Injected" not in (outcome.error_message or "")
    assert server.hits("/echo") == []


def test_file_secrets_strip_the_trailing_newline_and_stay_in_their_directory(secret_dir: Path) -> None:
    store = FileSecrets(secret_dir)
    assert store.get("api_token") == TOKEN
    for name in ("missing", "../api_token", ".hidden", "a/b"):
        with pytest.raises(SecretNotFound, match="is not defined"):
            store.get(name)


def test_environment_secrets_read_prefixed_variables() -> None:
    store = EnvironmentSecrets(environ={"CITADEL_SECRET_api": "v1", "api": "wrong"})
    assert store.get("api") == "v1"
    with pytest.raises(SecretNotFound, match="CITADEL_SECRET_other"):
        store.get("other")


def test_redact_replaces_values_and_their_escaped_forms() -> None:
    text = f"raw {TOKEN} json {json.dumps(TOKEN)} and nothing else"
    redacted = redact(text, [TOKEN, ""])
    assert TOKEN not in redacted
    assert json.dumps(TOKEN)[1:-1] not in redacted
    assert redacted.endswith("and nothing else")
    assert redact("abc", []) == "abc"


async def test_an_http_node_aimed_at_a_private_address_fails_without_sending(server: Server) -> None:
    server.routes.clear()
    server.requests.clear()
    server.answering("/metadata", text="the keys to the kingdom")
    executor = HttpExecutor(EnvironmentSecrets(), allow_private=False)
    await executor.start()
    try:
        outcome = await executor.execute(make_task(server.url("/metadata")))
    finally:
        await executor.stop()
    assert outcome.error_class == "EgressDenied"
    assert "node 'call'" in (outcome.error_message or "") and "127.0.0.1" in (outcome.error_message or "")
    assert server.requests == []
