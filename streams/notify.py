"""Outgoing webhooks: delivers the notifications a run schedules when it ends (`notify`).

Each delivery attempt is due at a time the run recorded (NotificationsScheduled, then each
retrying NotificationAttempted), so attempts wait on durable timers: on start the engine arms
them again from every run with pending deliveries. An attempt POSTs the run's summary, signed
as incoming webhooks are (schemas/webhooks.py), and reports the outcome as a
NotificationAttempted command, with a failure's error class named as the http node names them
(HTTPStatus, Timeout, ConnectionError, EgressDenied, SecretNotFound) for the target's `retry_on`;
the run decides whether and when to retry. Deliveries run in tasks of their own, so a slow
receiver delays neither the run's completion nor other timers.
Delivery is at least once: a receiver dedupes by the X-Citadel-Delivery header.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from aggregates.run import Run
from aggregates.store import RunStore
from nodes.egress import EgressDenied, EgressTransport
from nodes.http import CONNECTION_ERROR, HTTP_STATUS, TIMEOUT
from nodes.secrets import SecretNotFound, SecretStore, redact
from schemas.envelope import Envelope
from schemas.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from streams.clock import Clock
from streams.timers import Timers

log = logging.getLogger(__name__)
InStore = Callable[..., Awaitable[Any]]
Submit = Callable[[Envelope], Awaitable[None]]


def notification_body(run: Run, delivery_id: str, attempt: int) -> dict[str, Any]:
    """What a receiver is told of a run's end."""
    assert run.notifications is not None
    body: dict[str, Any] = {
        "delivery_id": delivery_id,
        "attempt": attempt,
        "run_id": run.run_id,
        "tenant": run.tenant,
        "workflow": run.workflow.removeprefix(f"{run.tenant}."),
        "workflow_version": run.workflow_version,
        "status": run.status,
        "time": run.notifications[delivery_id]["ended_at"],
    }
    if run.status == "completed":
        body["outputs"] = run.outputs
    else:
        body["error"] = run.error
    return body


class Notifier:
    def __init__(
        self,
        store: RunStore,
        in_store: InStore,
        submit: Submit,
        clock: Clock,
        secrets: SecretStore,
        concurrency: int = 32,
        allow_private: bool = True,
    ) -> None:
        self._store = store
        self._in_store = in_store
        self._submit = submit
        self._clock = clock
        self._secrets = secrets
        self._timers = Timers(clock, self._due)
        self._slots = asyncio.Semaphore(concurrency)
        self._deliveries: set[asyncio.Task[None]] = set()
        # No proxies from the environment: the egress check is made where the connection is.
        self._http = httpx.AsyncClient(
            transport=EgressTransport(allow_private), follow_redirects=False, trust_env=False
        )

    def arm(self, run_id: str, tenant: str, delivery_id: str, attempt: int, due_at: str) -> None:
        self._timers.arm(f"{delivery_id}#{attempt}", run_id, tenant, dt.datetime.fromisoformat(due_at))

    def arm_pending(self, run: Run) -> None:
        for delivery_id, delivery in run.pending_deliveries().items():
            self.arm(run.run_id, run.tenant, delivery_id, delivery["attempt"], delivery["due_at"])

    async def run(self) -> None:
        try:
            await self._timers.run()
        finally:
            for task in self._deliveries:
                task.cancel()
            await asyncio.gather(*self._deliveries, return_exceptions=True)
            await self._http.aclose()

    async def _due(self, timer_id: str, run_id: str, tenant: str) -> None:
        delivery_id, _, attempt = timer_id.rpartition("#")
        task = asyncio.create_task(self._attempt(run_id, tenant, delivery_id, int(attempt)))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _attempt(self, run_id: str, tenant: str, delivery_id: str, attempt: int) -> None:
        async with self._slots:
            try:
                run: Run = await self._in_store(self._store.run, run_id)
                delivery = run.pending_deliveries().get(delivery_id)
                if delivery is None or delivery["attempt"] != attempt:
                    return  # recorded already (armed twice, or a restart)
                status, error_class, error = await self._post(run, delivery_id, attempt)
                outcome = {
                    "delivery_id": delivery_id,
                    "attempt": attempt,
                    "status_code": status,
                    "error_class": error_class,
                    "error": error,
                }
                command = Envelope.new(
                    "NotificationAttempted",
                    run_id,
                    outcome,
                    id=f"{delivery_id}:{attempt}:attempted",
                    tenant=tenant,
                    time=self._clock.now(),
                )
                await self._submit(command)
            except Exception:
                # The store or the broker failed: the delivery stays pending and is armed again on start.
                log.exception("notification %s attempt %d could not be recorded", delivery_id, attempt)

    async def _post(
        self, run: Run, delivery_id: str, attempt: int
    ) -> tuple[int | None, str | None, str | None]:
        """POST the summary: (HTTP status, None, None) if the receiver took it, else the status if
        there was one, the failure's error class (as the http node names them) and what went wrong."""
        assert run.notifications is not None
        target = run.spec.notify[run.notifications[delivery_id]["index"]]
        body = orjson.dumps(notification_body(run, delivery_id, attempt), option=orjson.OPT_UTC_Z)
        headers = {"Content-Type": "application/json", DELIVERY_HEADER: delivery_id}
        secret = ""
        if target.secret is not None:
            try:
                secret = self._secrets.get(target.secret)
            except SecretNotFound as exc:
                return None, type(exc).__name__, str(exc)
            timestamp = int(self._clock.now().timestamp())
            headers[TIMESTAMP_HEADER] = str(timestamp)
            headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
        try:
            response = await self._http.post(
                target.url, content=body, headers=headers, timeout=target.timeout_seconds
            )
        except EgressDenied as exc:
            return None, type(exc).__name__, str(exc)
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.TimeoutException):
                error_class = TIMEOUT
            elif isinstance(exc, httpx.TransportError):
                error_class = CONNECTION_ERROR
            else:
                error_class = type(exc).__name__
            return None, error_class, redact(f"{type(exc).__name__}: {exc}", [secret])
        if 200 <= response.status_code < 300:
            return response.status_code, None, None
        return response.status_code, HTTP_STATUS, f"HTTP {response.status_code} {response.reason_phrase}"
