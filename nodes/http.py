"""The `http` node executor: one HTTP request per attempt, with retries, a breaker and a rate limit per host.

`task.config` is an `HttpConfig` (schemas/definition.py). `task.inputs` may carry `url`, `query`
and `json` (mapped from expressions by `config.inputs`); each one present replaces the config's
value of that name. Header values may use `{{secret:NAME}}` for a secret that `config.secrets`
lists; every listed secret is read from the executor's `SecretStore` for each attempt, and its
value is redacted from the outcome (output, error message) and from log records.

Within one attempt the executor retries connection errors, timeouts, 5xx and 429 responses, on
the schedule of `config.retry` (deterministic jitter, like `RetryPolicy`), all waits on the
injected `Clock`. A `Retry-After` header (seconds or an HTTP date) replaces the backoff delay;
one longer than `config.retry.max_delay_seconds` is not cut short but ends the attempt, leaving
the longer wait to the node's own retry policy. Retries also stop when the next one would pass
the node's `timeout_seconds`, which bounds the whole attempt.

Every request carries an `Idempotency-Key` derived from the run, node and attempt id: the same
for the executor's retries of one attempt, different for the engine's next attempt (unless the
config sets the header itself). Redirects are not followed (a custom header carrying a secret
would follow them to any host): a 3xx is a successful output with its `location` header.

The output is `{"status": int, "headers": {lower-case name: value}, "body": ...}`, the body
parsed when the response's content type is JSON (null when empty), else decoded text.

Unless private destinations are allowed, a request connects to public addresses only, checked
where the connection is made (nodes/egress.py); one that may not fails at once as EgressDenied.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import ValidationError

from nodes.egress import EgressDenied, EgressTransport
from nodes.secrets import REDACTED, SecretNotFound, SecretStore, redact
from schemas.definition import HttpConfig, RetryPolicy, retryable_status
from schemas.tasks import NodeOutcome, NodeTask
from streams.clock import Clock, SystemClock

log = logging.getLogger(__name__)

BODY_EXCERPT_CHARS = 300
# Loggers of the HTTP stack that can echo response headers (httpcore's DEBUG traces do).
LIBRARY_LOGGERS = (
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)
SECRET_REFERENCE = re.compile(r"\{\{\s*secret:([^}]*?)\s*\}\}")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Printable ASCII and tab: no line breaks to inject headers with, nothing httpx cannot encode.
HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Error classes of failed requests, which a retry policy's retry_on names (outgoing webhooks too).
TIMEOUT, CONNECTION_ERROR, HTTP_STATUS = "Timeout", "ConnectionError", "HTTPStatus"


class InvalidTask(ValueError):
    """The task's config or inputs cannot be turned into an HTTP request."""


class CircuitOpen(Exception):
    """The host's circuit breaker refuses requests for now."""


@dataclass(frozen=True)
class HttpRequest:
    """One attempt's request, resolved from config, inputs and secrets."""

    method: str
    url: httpx.URL
    headers: dict[str, str]
    json_body: Any
    body: str | None
    timeout_seconds: float
    retry: RetryPolicy
    secret_values: tuple[str, ...]

    @property
    def host(self) -> str:
        return f"{self.url.host}:{self.url.port or (443 if self.url.scheme == 'https' else 80)}"

    def describe(self) -> str:
        """Method and URL for messages, without any user:password part."""
        return f"{self.method} {self.url.copy_with(username=None, password=None)}"


@dataclass(frozen=True)
class Retryable:
    """A failed request worth retrying: its error class, what happened, and any Retry-After."""

    error_class: str
    description: str
    retry_after: float | None = None


class CircuitBreaker:
    """Per host: opens after `threshold` consecutive failures; after `cooldown`, one trial decides."""

    def __init__(self, host: str, threshold: int, cooldown_seconds: float, clock: Clock) -> None:
        self.host = host
        self.threshold = threshold
        self.cooldown = dt.timedelta(seconds=cooldown_seconds)
        self.clock = clock
        self.failures = 0
        self.opened_at: dt.datetime | None = None
        self.trial_in_flight = False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def admit(self) -> bool:
        """Let a request through, saying whether it is the half-open trial; raise `CircuitOpen` if not."""
        if self.opened_at is None:
            return False
        half_open_at = self.opened_at + self.cooldown
        now = self.clock.now()
        if now < half_open_at:
            raise CircuitOpen(
                f"the circuit breaker for {self.host} is open after {self.failures} consecutive "
                f"failures; it half-opens at {half_open_at.isoformat(timespec='seconds')} "
                f"(in {(half_open_at - now).total_seconds():.1f} s) and then lets one trial request through"
            )
        if self.trial_in_flight:
            raise CircuitOpen(
                f"the circuit breaker for {self.host} is half-open and its one trial request is "
                "still in flight; its result decides whether the circuit closes"
            )
        self.trial_in_flight = True
        return True

    def record(self, healthy: bool | None, trial: bool) -> bool:
        """Count a request's verdict on the host (None: no verdict); return whether it opened the circuit."""
        if trial:
            self.trial_in_flight = False
        if healthy is None:
            return False
        if healthy:
            self.failures = 0
            self.opened_at = None
            return False
        self.failures += 1
        if trial or (self.opened_at is None and self.failures >= self.threshold):
            self.opened_at = self.clock.now()
            return True
        return False


class TokenBucket:
    """Per host: `rate` requests a second on average, `burst` at once; a request over waits its turn."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.updated = clock.now()

    async def take(self) -> None:
        now = self.clock.now()
        elapsed = max(0.0, (now - self.updated).total_seconds())
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        # Taking the token before waiting queues requests: each waits for its own deficit, once.
        self.tokens -= 1
        if self.tokens < 0:
            await self.clock.sleep(-self.tokens / self.rate)


class RedactingFilter(logging.Filter):
    """Redacts known secret values from the records of the loggers it is added to."""

    def __init__(self, values: set[str]) -> None:
        super().__init__()
        self.values = values

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message, self.values)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class HttpExecutor:
    """Runs `http` nodes: one request per attempt, over one shared connection pool."""

    node_types: tuple[str, ...] = ("http",)

    def __init__(
        self,
        secrets: SecretStore,
        clock: Clock | None = None,
        max_concurrency: int = 32,
        response_cap_bytes: int = 1024 * 1024,
        breaker_threshold: int = 5,
        breaker_cooldown_seconds: float = 30.0,
        rate_per_second: float = 50.0,
        transport: httpx.AsyncBaseTransport | None = None,
        allow_private: bool = True,
    ) -> None:
        if rate_per_second <= 0 or breaker_threshold < 1 or max_concurrency < 1:
            raise ValueError("rate_per_second must be > 0, breaker_threshold and max_concurrency >= 1")
        self.secrets = secrets
        self.clock: Clock = clock or SystemClock()
        self.max_concurrency = max_concurrency
        self.response_cap_bytes = response_cap_bytes
        self.breaker_threshold = breaker_threshold
        self.breaker_cooldown_seconds = breaker_cooldown_seconds
        self.rate_per_second = rate_per_second
        self.transport = transport
        self.allow_private = allow_private  # see nodes/egress.py
        self._slots = asyncio.Semaphore(max_concurrency)
        self._client: httpx.AsyncClient | None = None
        self._breakers: dict[str, CircuitBreaker] = {}
        self._buckets: dict[str, TokenBucket] = {}
        # Every secret value this executor has read, for the filter on the HTTP stack's loggers.
        self._secret_values: set[str] = set()
        self._log_filter = RedactingFilter(self._secret_values)

    def breaker(self, host: str) -> CircuitBreaker:
        """The circuit breaker of `host` ("name:port")."""
        if host not in self._breakers:
            self._breakers[host] = CircuitBreaker(
                host, self.breaker_threshold, self.breaker_cooldown_seconds, self.clock
            )
        return self._breakers[host]

    def _bucket(self, host: str) -> TokenBucket:
        if host not in self._buckets:
            burst = max(1.0, self.rate_per_second)
            self._buckets[host] = TokenBucket(self.rate_per_second, burst, self.clock)
        return self._buckets[host]

    async def start(self) -> None:
        if self._client is not None:
            return
        limits = httpx.Limits(
            max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
        )
        transport = self.transport or EgressTransport(self.allow_private, limits)
        # No proxies from the environment: the egress check is made where the connection is.
        self._client = httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False)
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).addFilter(self._log_filter)

    async def stop(self) -> None:
        client, self._client = self._client, None
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeFilter(self._log_filter)
        if client is not None:
            await client.aclose()

    async def execute(self, task: NodeTask) -> NodeOutcome:
        client = self._client
        if client is None:
            return NodeOutcome.failure(
                "ExecutorUnavailable", "the http executor is not started; call start() first"
            )
        try:
            request = self._request(task)
        except (InvalidTask, SecretNotFound) as exc:
            return NodeOutcome.failure(type(exc).__name__, str(exc))
        async with self._slots:
            started = time.perf_counter()
            outcome = await self._call(client, task, request)
            outcome.duration_ms = (time.perf_counter() - started) * 1000
            return outcome

    # ---- the request -------------------------------------------------------

    def _request(self, task: NodeTask) -> HttpRequest:
        node = f"node {task.node_id!r}"
        try:
            config = HttpConfig.model_validate(task.config)
        except ValidationError as exc:
            problems = "; ".join(
                f"config.{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
            )
            raise InvalidTask(f"{node} has an invalid http config: {problems}") from None
        url_value = task.inputs.get("url", config.url)
        if not isinstance(url_value, str) or not url_value:
            raise InvalidTask(f"{node} has no URL: set config.url, or map inputs.url to a string")
        query = task.inputs.get("query", config.query)
        if not isinstance(query, dict):
            raise InvalidTask(f"{node} has inputs.query of type {type(query).__name__}; it must be an object")
        json_body = task.inputs.get("json", config.json_body)
        if json_body is not None and config.body is not None:
            raise InvalidTask(f"{node} has both a JSON body and config.body; give one of them")
        try:
            url = httpx.URL(url_value).copy_merge_params(query)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise InvalidTask(f"{node} has an invalid URL or query: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise InvalidTask(f"{node} has URL {url_value!r}; it must be an absolute http:// or https:// URL")
        values = self._secrets(config.secrets)
        headers = self._headers(node, config.headers, values)
        if not any(name.lower() == IDEMPOTENCY_HEADER.lower() for name in headers):
            headers[IDEMPOTENCY_HEADER] = idempotency_key(task)
        retry = config.retry
        return HttpRequest(
            method=config.method,
            url=url,
            headers=headers,
            json_body=json_body,
            body=config.body,
            timeout_seconds=min(config.timeout_seconds or task.timeout_seconds, task.timeout_seconds),
            retry=RetryPolicy(
                max_attempts=retry.max_attempts,
                delay_seconds=retry.delay_seconds,
                multiplier=retry.multiplier,
                max_delay_seconds=retry.max_delay_seconds,
                jitter=retry.jitter,
            ),
            secret_values=tuple(values.values()),
        )

    def _secrets(self, names: Iterable[str]) -> dict[str, str]:
        values: dict[str, str] = {}
        for name in names:
            try:
                values[name] = self.secrets.get(name)
            except SecretNotFound:
                raise
            except Exception as exc:
                # Not str(exc): a decoding error, say, would quote part of the value.
                raise SecretNotFound(name, f"reading it failed ({type(exc).__name__})") from None
        self._secret_values.update(value for value in values.values() if value)
        return values

    def _headers(self, node: str, templates: dict[str, str], secrets: dict[str, str]) -> dict[str, str]:
        headers: dict[str, str] = {}
        for name, template in templates.items():
            if not HEADER_NAME.match(name):
                raise InvalidTask(
                    f"{node} has config.headers name {name!r}, which is not a valid header name"
                )

            def substitute(match: re.Match[str], header: str = name) -> str:
                secret = match.group(1)
                if secret not in secrets:
                    raise InvalidTask(
                        f"{node} uses secret {secret!r} in config.headers.{header}, but config.secrets "
                        "does not list it; add its name there"
                    )
                return secrets[secret]

            value = SECRET_REFERENCE.sub(substitute, template)
            if not HEADER_VALUE.match(value):
                raise InvalidTask(
                    f"{node} has config.headers.{name} with a line break, control or non-ASCII "
                    "character (after substituting secrets), which a header value cannot carry"
                )
            headers[name] = value
        return headers

    # ---- the retries ---------------------------------------------------------

    async def _call(self, client: httpx.AsyncClient, task: NodeTask, request: HttpRequest) -> NodeOutcome:
        node = f"node {task.node_id!r}"
        policy = request.retry
        deadline = self.clock.now() + dt.timedelta(seconds=task.timeout_seconds)
        breaker = self.breaker(request.host)
        bucket = self._bucket(request.host)
        tries = 0
        while True:
            try:
                trial = breaker.admit()
            except CircuitOpen as exc:
                made = f" (after {tries} attempt(s))" if tries else ""
                return self._failure(
                    request, "CircuitOpen", f"{node}: {request.describe()} not sent{made}: {exc}"
                )
            await bucket.take()
            remaining = (deadline - self.clock.now()).total_seconds()
            tries += 1
            try:
                result = await self._send(
                    client, request, breaker, trial, min(request.timeout_seconds, remaining)
                )
            except EgressDenied as exc:
                return self._failure(request, "EgressDenied", f"{node}: {exc}")
            if isinstance(result, NodeOutcome):
                return result
            what = f"{node}: {request.describe()} {result.description}"
            if tries >= policy.max_attempts:
                return self._failure(
                    request,
                    result.error_class,
                    f"{what}; gave up after {tries} attempt(s) (config.retry.max_attempts is "
                    f"{policy.max_attempts})",
                )
            if breaker.is_open:
                return self._failure(
                    request,
                    "CircuitOpen",
                    f"{what}; no retry, as that opened the circuit breaker for {breaker.host} "
                    f"(after {tries} attempt(s))",
                )
            if result.retry_after is not None and result.retry_after > policy.max_delay_seconds:
                return self._failure(
                    request,
                    result.error_class,
                    f"{what}; it asked to be retried after {result.retry_after:g} s, longer than "
                    f"config.retry.max_delay_seconds ({policy.max_delay_seconds:g} s), so the node gave up "
                    f"after {tries} attempt(s); the node's retry policy can wait longer",
                )
            delay = result.retry_after
            if delay is None:
                delay = policy.delay_before(tries + 1, f"{task.attempt_id}/http/{tries + 1}")
            if self.clock.now() + dt.timedelta(seconds=delay) >= deadline:
                return self._failure(
                    request,
                    result.error_class,
                    f"{what}; gave up after {tries} attempt(s), since the next, in {delay:.3g} s, "
                    f"would pass the node's {task.timeout_seconds:g} s timeout",
                )
            self._log(
                logging.INFO, f"{what}; try {tries + 1} of {policy.max_attempts} in {delay:.3g} s", request
            )
            await self.clock.sleep(delay)

    async def _send(
        self,
        client: httpx.AsyncClient,
        request: HttpRequest,
        breaker: CircuitBreaker,
        trial: bool,
        timeout: float,
    ) -> NodeOutcome | Retryable:
        """Make one request; a final outcome, or what went wrong if it is worth retrying."""
        healthy: bool | None = None
        try:
            if timeout <= 0:
                return Retryable(TIMEOUT, "ran out of the node's timeout before it could be sent")
            try:
                async with asyncio.timeout(timeout):
                    async with client.stream(
                        request.method,
                        request.url,
                        headers=request.headers,
                        json=request.json_body,
                        content=request.body,
                        timeout=httpx.Timeout(timeout),
                    ) as response:
                        content, over_cap = await self._read(response)
            except (TimeoutError, httpx.TimeoutException):
                healthy = False
                return Retryable(TIMEOUT, f"got no complete response within {timeout:g} s")
            except (httpx.UnsupportedProtocol, httpx.LocalProtocolError) as exc:
                return self._failure(
                    request,
                    "InvalidTask",
                    f"{request.describe()} cannot be sent: {exc or type(exc).__name__}",
                )
            except httpx.TransportError as exc:
                healthy = False
                return Retryable(CONNECTION_ERROR, f"failed: {type(exc).__name__}: {exc or 'no detail'}")
            healthy = response.status_code < 500
            return self._response(request, response, content, over_cap)
        finally:
            if breaker.record(healthy, trial):
                self._log(
                    logging.WARNING,
                    f"http: the circuit breaker for {breaker.host} opened after {breaker.failures} "
                    f"consecutive failures; requests fail fast for {breaker.cooldown.total_seconds():g} s",
                    request,
                )

    async def _read(self, response: httpx.Response) -> tuple[bytes, bool]:
        """The body, streamed up to the cap; and whether there was more."""
        content = bytearray()
        async for chunk in response.aiter_bytes():
            content += chunk
            if len(content) > self.response_cap_bytes:
                return bytes(content[: self.response_cap_bytes]), True
        return bytes(content), False

    def _response(
        self, request: HttpRequest, response: httpx.Response, content: bytes, over_cap: bool
    ) -> NodeOutcome | Retryable:
        status = response.status_code
        self._log(logging.DEBUG, f"http: {request.describe()} answered {status}", request)
        if retryable_status(status):
            excerpt = self._excerpt(request, response, content)
            return Retryable(
                HTTP_STATUS,
                f"answered {status} {response.reason_phrase}; body: {excerpt}",
                _retry_after(response.headers.get("retry-after"), self.clock.now()),
            )
        if status >= 400:
            return self._failure(
                request,
                HTTP_STATUS,
                f"{request.describe()} answered {status} {response.reason_phrase} (not retried: a "
                f"client error); body: {self._excerpt(request, response, content)}",
            )
        if over_cap:
            declared = response.headers.get("content-length")
            size = f"{declared} bytes" if declared else "its body"
            return self._failure(
                request,
                "ResponseTooLarge",
                f"{request.describe()} answered {status} with {size}, over the executor's "
                f"{self.response_cap_bytes}-byte response cap; ask the server for less (paging, filters)",
            )
        headers: dict[str, str] = {}
        for name, value in response.headers.multi_items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        output = {"status": status, "headers": headers, "body": _body(response, content)}
        return NodeOutcome.success(_redact_json(output, request.secret_values), 0.0)

    def _excerpt(self, request: HttpRequest, response: httpx.Response, content: bytes) -> str:
        # Redacted whole, before it is cut and repr()'d: both could hide part of a value from redact().
        text = redact(content.decode(response.encoding or "utf-8", errors="replace"), request.secret_values)
        return repr(text[:BODY_EXCERPT_CHARS] + ("..." if len(text) > BODY_EXCERPT_CHARS else ""))

    def _failure(self, request: HttpRequest, error_class: str, message: str) -> NodeOutcome:
        return NodeOutcome.failure(error_class, redact(message, request.secret_values))

    def _log(self, level: int, message: str, request: HttpRequest) -> None:
        if log.isEnabledFor(level):
            log.log(level, "%s", redact(message, request.secret_values))


def idempotency_key(task: NodeTask) -> str:
    """The same for every request of one attempt, different for each attempt of each node of each run."""
    seed = "\x1f".join((task.run_id, task.node_id, task.attempt_id))
    return hashlib.blake2b(seed.encode(), digest_size=16).hexdigest()


def _retry_after(value: str | None, now: dt.datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or an HTTP date); None if absent or bad."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = (when - now).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _body(response: httpx.Response, content: bytes) -> Any:
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        if not content.strip():
            return None
        try:
            return json.loads(content)
        except ValueError:
            pass
    return content.decode(response.encoding or "utf-8", errors="replace")


def _redact_json(value: Any, secrets: tuple[str, ...]) -> Any:
    """`value` with secret values redacted from every string, key and scalar in it."""
    if not secrets:
        return value
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {redact(str(key), secrets): _redact_json(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_json(item, secrets) for item in value]
    written = json.dumps(value)
    return REDACTED if redact(written, secrets) != written else value
