"""The one settings object, read from CITADEL_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

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
    log_level: str

    @property
    def embedded(self) -> bool:
        return self.kafka is None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
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
            group=env.get("CITADEL_GROUP", "citadel"),
            namespace=env.get("CITADEL_TOPIC_PREFIX", ""),
            secrets_dir=Path(env["CITADEL_SECRETS_DIR"]) if env.get("CITADEL_SECRETS_DIR") else None,
            allow_network=env.get("CITADEL_ALLOW_NETWORK", "").lower() in ("1", "true", "yes"),
            log_level=env.get("CITADEL_LOG_LEVEL", "WARNING"),
        )


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
