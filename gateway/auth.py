"""Who may do what: JWT bearer tokens (HS256 or RS256, issuer and audience checked), roles with
`resource:action` permissions and wildcards, tenants, and a rate limit per token."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.errors import GatewayError, forbidden, unauthenticated

ROLES: dict[str, frozenset[str]] = {
    "viewer": frozenset({"workflow:read", "run:read", "analytics:read"}),
    "editor": frozenset({"workflow:read", "workflow:deploy", "run:*", "analytics:read"}),
    "admin": frozenset({"*:*"}),
}
# A tenant names a namespace of workflows (`TENANT.NAME`), so it may not contain a dot.
TENANT = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ALGORITHMS = ("HS256", "RS256")


def grants(granted: str, wanted: str) -> bool:
    """Whether permission `granted` (`resource:action`, either part may be `*`) covers `wanted`."""
    g_resource, _, g_action = granted.partition(":")
    w_resource, _, w_action = wanted.partition(":")
    return g_resource in ("*", w_resource) and g_action in ("*", w_action)


@dataclass(frozen=True)
class Principal:
    """The caller a verified token names."""

    subject: str
    tenant: str
    roles: tuple[str, ...]
    token_id: str  # what the rate limit counts by

    @property
    def permissions(self) -> frozenset[str]:
        return frozenset().union(*(ROLES.get(role, frozenset()) for role in self.roles))

    def may(self, permission: str) -> bool:
        return any(grants(granted, permission) for granted in self.permissions)

    def require(self, permission: str) -> None:
        if not self.may(permission):
            raise forbidden(permission)


@dataclass(frozen=True)
class TokenKeys:
    """How tokens are checked: an HS256 secret and/or an RS256 public key, the issuer and audience."""

    issuer: str
    audience: str
    secret: str | None = None
    public_key: str | None = None

    def __post_init__(self) -> None:
        if not self.secret and not self.public_key:
            raise ValueError("the gateway needs a JWT secret (HS256) or public key (RS256) to check tokens")


class TokenVerifier:
    def __init__(self, keys: TokenKeys, leeway_seconds: float = 5.0) -> None:
        self.keys = keys
        self.leeway = leeway_seconds

    def verify(self, authorization: str | None) -> Principal:
        """The principal of an `Authorization: Bearer TOKEN` value, or an UNAUTHENTICATED error."""
        if not authorization:
            raise unauthenticated("missing bearer token: send `Authorization: Bearer TOKEN`")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("the Authorization header must be `Bearer TOKEN`")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise unauthenticated("the bearer token is not a JWT") from None
        algorithm = header.get("alg")
        key = (
            self.keys.secret
            if algorithm == "HS256"
            else self.keys.public_key
            if algorithm == "RS256"
            else None
        )
        if key is None:
            raise unauthenticated(f"tokens signed with {algorithm!r} are not accepted here")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(algorithm)],
                issuer=self.keys.issuer,
                audience=self.keys.audience,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise unauthenticated("the bearer token has expired") from None
        except jwt.InvalidIssuerError:
            raise unauthenticated("the bearer token has the wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise unauthenticated("the bearer token is for another audience") from None
        except jwt.PyJWTError:
            raise unauthenticated("the bearer token is invalid (signature or claims)") from None
        return _principal(claims, token)


def _principal(claims: dict[str, Any], token: str) -> Principal:
    tenant = claims.get("tenant")
    roles = claims.get("roles")
    if not isinstance(tenant, str) or not TENANT.match(tenant):
        raise unauthenticated("the bearer token names no valid tenant (claim `tenant`)")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise unauthenticated("the bearer token has no list of roles (claim `roles`)")
    token_id = str(claims.get("jti") or hashlib.sha256(token.encode()).hexdigest()[:32])
    return Principal(str(claims["sub"]), tenant, tuple(r for r in roles if r in ROLES), token_id)


def issue_token(
    keys: TokenKeys,
    subject: str,
    tenant: str,
    roles: list[str],
    lifetime: dt.timedelta = dt.timedelta(hours=12),
    private_key: str | None = None,
    now: dt.datetime | None = None,
) -> str:
    """A signed token: RS256 with `private_key`, else HS256 with the keys' secret."""
    moment = now or dt.datetime.now(dt.UTC)
    claims = {
        "sub": subject,
        "tenant": tenant,
        "roles": roles,
        "iss": keys.issuer,
        "aud": keys.audience,
        "iat": moment,
        "exp": moment + lifetime,
    }
    if private_key is not None:
        return jwt.encode(claims, private_key, algorithm="RS256")
    assert keys.secret is not None
    return jwt.encode(claims, keys.secret, algorithm="HS256")


class RateLimit:
    """A token bucket per token: `rate` requests a second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # token id -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, token_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(token_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[token_id] = (tokens, now)
                wait = (1 - tokens) / self.rate
                raise GatewayError(f"rate limit exceeded: retry in {wait:.2f} s", "RATE_LIMITED")
            self._buckets[token_id] = (tokens - 1, now)
            if len(self._buckets) > 100_000:
                self._buckets.clear()  # forgetting buckets only lets callers burst once more
