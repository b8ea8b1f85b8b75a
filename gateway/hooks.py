"""Incoming webhooks: `POST /hooks/{tenant}/{workflow}` starts a run of the workflow's latest
version from the JSON body; `POST /hooks/{workflow}` is the same for the default tenant.

No bearer token: the request is signed (schemas/webhooks.py) with the secret the definition's
`webhook.secret` names, read from the engine's secret store; a missing, wrong or stale
signature gets 401. The answer comes at once: 202 with the run id, once the broker holds the
StartRun. The run id derives from the `Idempotency-Key` header, or else from the signature, so
a sender retrying a delivery gets the same run, never a second one. A workflow that does not
exist and one without a webhook get the same 404, so the endpoint tells outsiders nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from aggregates.workflow import DEFAULT_TENANT
from gateway.auth import Principal, RateLimit
from gateway.backend import Backend, input_problems, run_id_for
from gateway.errors import GatewayError, Problem
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
    definition = await _target(backend, tenant, workflow)
    assert definition.webhook is not None
    secret_name = definition.webhook.secret
    try:
        secret = backend.secrets.get(secret_name)
    except SecretNotFound:
        log.warning("webhook of %s/%s: its secret %r is not configured", tenant, workflow, secret_name)
        raise GatewayError(
            f"the webhook secret of workflow {workflow!r} is not configured on this gateway", "UNAVAILABLE"
        ) from None
    signature = request.headers.get(SIGNATURE_HEADER)
    try:
        verify(
            secret,
            request.headers.get(TIMESTAMP_HEADER),
            signature,
            body,
            time.time(),
            definition.webhook.tolerance_seconds,
        )
    except SignatureRejected as exc:
        raise GatewayError(str(exc), "UNAUTHENTICATED") from None
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


async def _target(backend: Backend, tenant: str, workflow: str) -> WorkflowDefinition:
    who = Principal(subject="webhook", tenant=tenant, roles=(), token_id=f"hook:{tenant}")
    (found,) = await backend.workflows(who, [workflow])
    definition = found.definition() if found is not None else None
    if definition is None or definition.webhook is None:
        raise GatewayError(f"no webhook for workflow {workflow!r} of tenant {tenant!r}", "NOT_FOUND")
    return definition


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
