"""The gateway's HTTP application: `/graphql` (queries, mutations; subscriptions over
graphql-transport-ws), `/hooks/...` (incoming webhooks), `/health`, `/ready`, `/metrics` and the
dashboard page (`/`, `/dashboard`, its files under `/static/`), with request size and rate limits."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from strawberry.exceptions import ConnectionRejectionError
from strawberry.fastapi import GraphQLRouter
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL

from gateway.auth import RateLimit, TokenKeys, TokenVerifier
from gateway.backend import Backend
from gateway.errors import GatewayError, Problem
from gateway.hooks import hooks_router
from gateway.metrics import GatewayMetrics
from gateway.schema import Context, build_schema

log = logging.getLogger(__name__)
Check = Callable[[], Awaitable[Any]]
STATUS = {
    "UNAUTHENTICATED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "TOO_LARGE": 413,
    "INVALID_INPUT": 422,
    "RATE_LIMITED": 429,
    "UNAVAILABLE": 503,
}
STATIC = Path(__file__).parent / "static"
# A Host header fit to name in the page's policy (anything else: same-origin fetches only).
HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


@dataclass(frozen=True)
class GatewayConfig:
    keys: TokenKeys
    rate_per_second: float = 50.0
    rate_burst: int = 100
    max_request_bytes: int = 256 * 1024
    max_depth: int = 10
    max_tokens: int = 2000
    max_aliases: int = 20


class _Router(GraphQLRouter[Context, None]):
    """Subscriptions authenticate once per connection: the token comes in `connection_init`'s
    payload (`{"Authorization": "Bearer ..."}`) or in the handshake's Authorization header."""

    def __init__(self, verifier: TokenVerifier, rate_limit: RateLimit, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.verifier = verifier
        self.rate_limit = rate_limit

    async def on_ws_connect(self, context: Context) -> dict[str, object] | None:
        params = context.connection_params if isinstance(context.connection_params, dict) else {}
        authorization = params.get("Authorization") or params.get("authorization")
        if authorization is None and context.request is not None:
            authorization = context.request.headers.get("authorization")
        try:
            principal = self.verifier.verify(authorization if isinstance(authorization, str) else None)
            self.rate_limit.take(principal.token_id)
        except GatewayError as exc:
            raise ConnectionRejectionError({"message": exc.message, "code": exc.code}) from None
        context.principal = principal
        return None


def create_app(
    backend: Backend,
    config: GatewayConfig,
    metrics: GatewayMetrics,
    checks: dict[str, Check] | None = None,
) -> FastAPI:
    verifier = TokenVerifier(config.keys)
    rate_limit = RateLimit(config.rate_per_second, config.rate_burst)

    async def context(connection: HTTPConnection) -> Context:
        found = Context(backend, rate_limit)
        if connection.scope["type"] == "http":
            found.principal = verifier.verify(connection.headers.get("authorization"))
            rate_limit.take(found.principal.token_id)
        return found

    router = _Router(
        verifier,
        rate_limit,
        schema=build_schema(config.max_depth, config.max_tokens, config.max_aliases),
        context_getter=context,
        subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
        graphql_ide=None,
        allow_queries_via_get=False,
    )
    metrics.subscriptions.set_function(lambda: len(backend.hub.subscribers))
    app = FastAPI(title="Citadel gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(router, prefix="/graphql")
    app.include_router(hooks_router(backend, rate_limit))

    @app.exception_handler(GatewayError)
    async def refused(_: Request, exc: GatewayError) -> JSONResponse:
        return _error(STATUS.get(exc.code, 400), exc.message, exc.code, exc.problems)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.error("gateway request failed: %s", type(exc).__name__, exc_info=exc)
        return _error(500, "internal error", "INTERNAL")

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Whether the broker, the event store and ClickHouse answer, each within two seconds."""
        results = {}
        for name, check in (checks or {}).items():
            try:
                await asyncio.wait_for(check(), 2.0)
                results[name] = "ok"
            except Exception as exc:
                results[name] = f"unavailable ({type(exc).__name__})"
        fine = all(v == "ok" for v in results.values())
        return JSONResponse(
            {"status": "ready" if fine else "unavailable", "checks": results}, 200 if fine else 503
        )

    @app.get("/metrics")
    async def exposition() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    page = (STATIC / "dashboard.html").read_text(encoding="utf-8")

    @app.get("/")
    @app.get("/dashboard")
    async def dashboard(request: Request) -> HTMLResponse:
        """The dashboard page. It is public; what it shows comes from /graphql, with the user's token."""
        return HTMLResponse(page, headers=dashboard_headers(request.headers.get("host", "")))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(SizeLimit, max_bytes=config.max_request_bytes)
    return app


def dashboard_headers(host: str) -> dict[str, str]:
    """The page runs only its own script and style files and talks only to this gateway (its
    WebSocket named explicitly, as not every browser counts ws: as 'self'); it keeps the token of
    its link out of any Referer."""
    sockets = f" ws://{host} wss://{host}" if HOST.match(host) else ""
    policy = (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        f"connect-src 'self'{sockets}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return {
        "Content-Security-Policy": policy,
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-store",
    }


def _error(status: int, message: str, code: str, problems: list[Problem] | None = None) -> JSONResponse:
    extensions: dict[str, Any] = {"code": code}
    if problems:
        extensions["problems"] = [{"location": p.location, "message": p.message} for p in problems]
    return JSONResponse({"errors": [{"message": message, "extensions": extensions}]}, status)


class SizeLimit:
    """Refuses request bodies and WebSocket messages over `max_bytes` before anything parses them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
                await self._too_large(scope, receive, send)
                return
            await self.app(scope, self._counting(receive), send)
        elif scope["type"] == "websocket":
            await self.app(scope, self._capped(receive, send), send)
        else:
            await self.app(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(413, f"request body over {self.max_bytes} bytes", "TOO_LARGE")
        await response(scope, receive, send)

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise GatewayError(f"request body over {self.max_bytes} bytes", "TOO_LARGE")
            return message

        return counted

    def _capped(self, receive: Receive, send: Send) -> Receive:
        async def capped() -> Message:
            message = await receive()
            if message["type"] == "websocket.receive":
                size = len(message.get("text") or "") + len(message.get("bytes") or b"")
                if size > self.max_bytes:
                    await send({"type": "websocket.close", "code": 1009, "reason": "message too large"})
                    return {"type": "websocket.disconnect", "code": 1009}
            return message

        return capped
