"""Incoming webhooks: `POST /hooks/{tenant}/{workflow}` starts a run of the workflow's latest
version from the JSON body; `POST /hooks/{workflow}` is the same for the default tenant.

No bearer token: the request is signed (schemas/webhooks.py) with the secret the definition's
`webhook.secret` names, read from the engine's secret store; a missing, wrong or stale
signature gets 401. The answer comes at once: 202 with the run id, once the broker holds the
StartRun. The run id derives from the `Idempotency-Key` header, or else from the signature, so
a sender retrying a delivery gets the same run, never a second one.

The endpoint tells an unauthenticated caller nothing of which hooks exist: a workflow that does
not exist, one without a webhook, and one whose secret is not configured are checked against a
throwaway secret, so each gets the very 401 a wrong signature gets; the log says which it was.
Only a request whose signature verifies learns more (a stale timestamp, input that does not fit).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from aggregates.workflow import DEFAULT_TENANT
from gateway.auth import Principal, RateLimit
from gateway.backend import Backend, input_problems, run_id_for
from gateway.errors import GatewayError, Problem, unauthenticated
from nodes.secrets import SecretNotFound
from schemas.definition import BODY, HEADERS, WorkflowDefinition
from schemas.envelope import Envelope
from schemas.expressions import ExpressionError, evaluate_mapping
from schemas.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, SignatureRejected, verify

log = logging.getLogger(__name__)
IDEMPOTENCY_HEADER = "Idempotency-Key"


def hooks_router(backend: Backend, rate_limit: RateLimit) -> APIRouter:
    router = APIRouter()

    @router.post("/hooks/{workflow}")
    async def default_tenant(workflow: str, request: Request) -> JSONResponse:
        return await receive(backend, rate_limit, DEFAULT_TENANT, workflow, request)

    @router.post("/hooks/{tenant}/{workflow}")
    async def tenant_hook(tenant: str, workflow: str, request: Request) -> JSONResponse:
        return await receive(backend, rate_limit, tenant, workflow, request)

    return router


async def receive(
    backend: Backend, rate_limit: RateLimit, tenant: str, workflow: str, request: Request
) -> JSONResponse:
    rate_limit.take(f"hook:{tenant}/{workflow}")
    body = await request.body()  # the gateway's size limit applies while it is read
    definition, secret = await _target(backend, tenant, workflow)
    signature = request.headers.get(SIGNATURE_HEADER)
    try:
        verify(
            secret,
            request.headers.get(TIMESTAMP_HEADER),
            signature,
            body,
            time.time(),
            definition.webhook.tolerance_seconds if definition and definition.webhook else 0.0,
        )
    except SignatureRejected as exc:
        if definition is not None:
            log.info("webhook of %s/%s refused: %s", tenant, workflow, exc)
        raise unauthenticated(str(exc)) from None
    assert definition is not None  # a throwaway secret verifies nothing
    run_input = _run_input(definition, body, dict(request.headers))
    problems = input_problems(definition.input, run_input)
    if problems:
        first = problems[0]
        raise GatewayError(
            f"the input does not match the input schema of {workflow!r}: {first.location}: {first.message}",
            "INVALID_INPUT",
            problems,
        )
    assert signature is not None  # verified
    key = request.headers.get(IDEMPOTENCY_HEADER) or signature
    run_id = run_id_for(tenant, f"hook/{workflow}/{key}")
    payload = {"workflow": definition.name, "workflow_version": definition.version, "input": run_input}
    await backend.submit(Envelope.new("StartRun", run_id, payload, id=f"{run_id}:hook", tenant=tenant))
    return JSONResponse({"run_id": run_id, "workflow": workflow, "version": definition.version}, 202)


async def _target(backend: Backend, tenant: str, workflow: str) -> tuple[WorkflowDefinition | None, str]:
    """The workflow and its webhook's secret; if either is missing, None and a throwaway secret."""
    who = Principal(subject="webhook", tenant=tenant, roles=(), token_id=f"hook:{tenant}")
    (found,) = await backend.workflows(who, [workflow])
    definition = found.definition() if found is not None else None
    if definition is None or definition.webhook is None:
        reason = "no such workflow" if definition is None else "the workflow has no webhook"
        log.info("webhook of %s/%s refused: %s", tenant, workflow, reason)
        return None, secrets.token_hex(32)
    try:
        return definition, backend.secrets.get(definition.webhook.secret)
    except SecretNotFound:
        log.warning(
            "webhook of %s/%s refused: its secret %r is not configured",
            tenant,
            workflow,
            definition.webhook.secret,
        )
        return None, secrets.token_hex(32)


def _run_input(definition: WorkflowDefinition, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    """The run input: the JSON body itself, or what `webhook.inputs` makes of it."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(f"the body is not JSON: {exc}", "INVALID_INPUT") from None
    assert definition.webhook is not None
    if not definition.webhook.inputs:
        if not isinstance(document, dict):
            raise GatewayError("the body must be a JSON object: it is the run input", "INVALID_INPUT")
        return document
    try:
        return evaluate_mapping(definition.webhook.inputs, {BODY: document, HEADERS: headers})
    except ExpressionError as exc:
        problem = Problem(f"webhook.inputs.{exc}".split(":", 1)[0], str(exc))
        raise GatewayError(f"webhook.inputs.{exc}", "INVALID_INPUT", [problem]) from None
