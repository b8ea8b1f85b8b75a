"""The one settings object, read from CITADEL_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field


class Settings(BaseModel):
    home: Path = Field(description="where embedded mode keeps its state (CITADEL_HOME)")
    kafka: str | None = Field(description="Kafka bootstrap servers; embedded broker when unset")
    event_store: str = Field(description="sqlite:///PATH or postgresql://user@host:port/db")
    partitions: int = Field(ge=1, le=1024)
    executor_concurrency: int = Field(ge=1, le=1024)
    # Node attempts in flight (dispatched, not finished) across the engine; more wait their turn.
    tenant_concurrency: int = Field(ge=1, description="per tenant (CITADEL_TENANT_CONCURRENCY)")
    workflow_concurrency: int | None = Field(ge=1, description="per workflow of a tenant; None: no limit")
    node_type_concurrency: dict[str, Annotated[int, Field(ge=1)]] = Field(
        description="per node type, also capping its executor (CITADEL_NODE_TYPE_CONCURRENCY)"
    )
    snapshot_interval: int = Field(ge=2)
    group: str
    namespace: str = Field(description="prefix of every topic name (CITADEL_TOPIC_PREFIX)")
    secrets_dir: Path | None = Field(description="one file per secret (CITADEL_SECRETS_DIR); else env")
    allow_network: bool = Field(description="python nodes may ask for network (CITADEL_ALLOW_NETWORK)")
    sandbox_packages: list[Path] | None = Field(
        default=None,
        description="package directories python nodes may import (CITADEL_SANDBOX_PACKAGES); "
        "None: the engine's own site-packages",
    )
    sandbox_scratch_mb: int = Field(
        default=64, ge=1, le=65536, description="each attempt's private /tmp (CITADEL_SANDBOX_SCRATCH_MB)"
    )
    sandbox_uid: int = Field(
        default=65534,
        ge=1,
        description="host uid user code runs as when the engine runs as root (CITADEL_SANDBOX_UID)",
    )
    log_level: str
    log_format: Literal["json", "text"] | None = Field(
        default=None, description="CITADEL_LOG_FORMAT; unset: json for `up` and `worker`, text otherwise"
    )
    traces: str = Field(default="off", description="off, console, file:PATH or otlp (CITADEL_TRACES)")
    clickhouse: str | None = Field(
        default=None, description="ClickHouse server URL (CITADEL_CLICKHOUSE); chDB under home when unset"
    )
    audit_retention_days: int = Field(default=0, ge=0, description="0 keeps the audit table forever")
    trigger_batch: int = Field(
        default=500,
        ge=1,
        description="trigger messages started and committed together (CITADEL_TRIGGER_BATCH)",
    )
    projector_group: str = Field(default="citadel-projector", description="consumer group of the projector")
    projector_batch: int = Field(default=5000, ge=1, description="events per ClickHouse write, at most")
    projector_batch_seconds: float = Field(default=0.2, gt=0, description="write a partial batch after this")
    gateway_host: str = Field(default="127.0.0.1", description="where the gateway listens")
    gateway_port: int = Field(default=8700, ge=0, le=65535, description="0: no gateway")
    jwt_secret: str | None = Field(default=None, description="HS256 key of bearer tokens")
    jwt_public_key: str | None = Field(default=None, description="RS256 public key (PEM) of bearer tokens")
    jwt_issuer: str = "citadel"
    jwt_audience: str = "citadel-gateway"
    gateway_rate: float = Field(default=50.0, gt=0, description="requests a second per token, on average")
    gateway_burst: int = Field(default=100, ge=1, description="requests a token may make at once")
    gateway_max_request_bytes: int = Field(default=256 * 1024, ge=1024)
    egress_private: bool = Field(
        default=True,
        description="http nodes and webhooks may reach private addresses (CITADEL_EGRESS_PRIVATE)",
    )

    @property
    def clickhouse_url(self) -> str:
        """Where projections live: the configured server, or chDB in the embedded home."""
        return self.clickhouse or f"chdb://{self.home / 'clickhouse'}"

    @property
    def embedded(self) -> bool:
        return self.kafka is None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        group = env.get("CITADEL_GROUP", "citadel")
        home = Path(env.get("CITADEL_HOME", ".citadel")).resolve()
        executor_concurrency = int(env.get("CITADEL_EXECUTOR_CONCURRENCY", str(8 * (os.cpu_count() or 2))))
        workflow_concurrency = env.get("CITADEL_WORKFLOW_CONCURRENCY")
        return cls(
            home=home,
            kafka=env.get("CITADEL_KAFKA") or None,
            event_store=env.get("CITADEL_EVENT_STORE") or f"sqlite:///{home / 'events.db'}",
            partitions=int(env.get("CITADEL_PARTITIONS", "8")),
            executor_concurrency=executor_concurrency,
            # Enough to keep four rounds of one worker's executors busy with one tenant's work.
            tenant_concurrency=int(env.get("CITADEL_TENANT_CONCURRENCY", str(4 * executor_concurrency))),
            workflow_concurrency=int(workflow_concurrency) if workflow_concurrency else None,
            node_type_concurrency=_per_node_type(env.get("CITADEL_NODE_TYPE_CONCURRENCY", "")),
            snapshot_interval=int(env.get("CITADEL_SNAPSHOT_INTERVAL", "100")),
            group=group,
            namespace=env.get("CITADEL_TOPIC_PREFIX", ""),
            secrets_dir=Path(env["CITADEL_SECRETS_DIR"]) if env.get("CITADEL_SECRETS_DIR") else None,
            allow_network=env.get("CITADEL_ALLOW_NETWORK", "").lower() in ("1", "true", "yes"),
            sandbox_packages=_paths(env["CITADEL_SANDBOX_PACKAGES"])
            if "CITADEL_SANDBOX_PACKAGES" in env
            else None,
            sandbox_scratch_mb=int(env.get("CITADEL_SANDBOX_SCRATCH_MB", "64")),
            sandbox_uid=int(env.get("CITADEL_SANDBOX_UID", "65534")),
            log_level=env.get("CITADEL_LOG_LEVEL", "WARNING"),
            log_format=env.get("CITADEL_LOG_FORMAT") or None,  # type: ignore[arg-type]
            traces=env.get("CITADEL_TRACES") or "off",
            clickhouse=env.get("CITADEL_CLICKHOUSE") or None,
            audit_retention_days=int(env.get("CITADEL_AUDIT_RETENTION_DAYS", "0")),
            trigger_batch=int(env.get("CITADEL_TRIGGER_BATCH", "500")),
            projector_group=env.get("CITADEL_PROJECTOR_GROUP")
            or f"{env.get('CITADEL_GROUP', 'citadel')}-projector",
            projector_batch=int(env.get("CITADEL_PROJECTOR_BATCH", "5000")),
            projector_batch_seconds=float(env.get("CITADEL_PROJECTOR_BATCH_MS", "200")) / 1000,
            gateway_host=env.get("CITADEL_GATEWAY_HOST", "127.0.0.1"),
            gateway_port=int(env.get("CITADEL_GATEWAY_PORT", "8700")),
            jwt_secret=env.get("CITADEL_JWT_SECRET") or None,
            jwt_public_key=_pem(env.get("CITADEL_JWT_PUBLIC_KEY")),
            jwt_issuer=env.get("CITADEL_JWT_ISSUER", "citadel"),
            jwt_audience=env.get("CITADEL_JWT_AUDIENCE", "citadel-gateway"),
            gateway_rate=float(env.get("CITADEL_GATEWAY_RATE", "50")),
            gateway_burst=int(env.get("CITADEL_GATEWAY_BURST", "100")),
            gateway_max_request_bytes=int(env.get("CITADEL_GATEWAY_MAX_REQUEST_BYTES", str(256 * 1024))),
            egress_private=_egress_private(
                env.get("CITADEL_EGRESS_PRIVATE"), embedded=not env.get("CITADEL_KAFKA")
            ),
        )


def _paths(value: str) -> list[Path]:
    """`a:b` as [Path("a"), Path("b")]; an empty value is an empty list."""
    return [Path(part) for part in value.split(os.pathsep) if part]


def _egress_private(value: str | None, embedded: bool) -> bool:
    """Whether the engine's HTTP requests may reach private addresses: by default only in
    embedded mode, on a developer's machine (see nodes/egress.py)."""
    if not value:
        return embedded
    if value.lower() not in ("allow", "deny"):
        raise ValueError(f"CITADEL_EGRESS_PRIVATE is {value!r}; write allow or deny")
    return value.lower() == "allow"


def _pem(value: str | None) -> str | None:
    """A PEM given inline, or the path of a file holding it."""
    if not value:
        return None
    return value if value.lstrip().startswith("-----BEGIN") else Path(value).read_text()


def _per_node_type(value: str) -> dict[str, int]:
    """`python=4,http=32` as {"python": 4, "http": 32}."""
    limits = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        node_type, _, number = item.partition("=")
        if not node_type.strip() or not number.strip().isdigit():
            raise ValueError(
                f"CITADEL_NODE_TYPE_CONCURRENCY: {item!r} is not TYPE=NUMBER; write e.g. python=4,http=32"
            )
        limits[node_type.strip()] = int(number)
    return limits
