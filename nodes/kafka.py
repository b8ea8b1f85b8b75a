"""The `kafka` node executor: publishes one message to a user topic, in the engine process.

`task.config` is a `KafkaConfig` (schemas/definition.py); `task.inputs` carries the message the
decide step evaluated: `value`, `key` when the config has one, and `headers`. The value travels
as JSON; a string key or header value as its UTF-8 text, any other as JSON. Every message carries
`citadel-attempt-id`: a retried attempt (at least once) may publish again, and a consumer drops
the copies by that header. The output is `{"topic", "partition", "offset"}`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from schemas.definition import KafkaConfig
from schemas.tasks import NodeOutcome, NodeTask

ATTEMPT_HEADER = "citadel-attempt-id"


def _text_or_json(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else orjson.dumps(value)


class KafkaExecutor:
    node_types: tuple[str, ...] = ("kafka",)

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        # acks=all, no idempotence (the embedded broker fails InitProducerId); duplicates are
        # what the attempt-id header is for.
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, acks="all", linger_ms=0, enable_idempotence=False
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def execute(self, task: NodeTask) -> NodeOutcome:
        assert self._producer is not None, "start the executor first"
        began = time.monotonic()
        try:
            config = KafkaConfig.model_validate(task.config)
        except ValidationError as exc:
            return NodeOutcome.failure("InvalidConfig", f"node {task.node_id!r}: {exc}")
        key = task.inputs.get("key")
        headers = [(name, _text_or_json(value)) for name, value in task.inputs.get("headers", {}).items()]
        headers.append((ATTEMPT_HEADER, task.attempt_id.encode()))
        try:
            async with asyncio.timeout(task.timeout_seconds):
                sent = await self._producer.send_and_wait(
                    config.topic,
                    orjson.dumps(task.inputs.get("value")),
                    key=None if key is None else _text_or_json(key),
                    headers=headers,
                )
        except TimeoutError:
            return NodeOutcome.failure(
                "Timeout",
                f"topic {config.topic!r} did not acknowledge the message within {task.timeout_seconds:g} s",
                duration_ms=(time.monotonic() - began) * 1000,
            )
        except KafkaError as exc:
            return NodeOutcome.failure(
                "KafkaError",
                f"publishing to topic {config.topic!r} failed: {exc!r}",
                duration_ms=(time.monotonic() - began) * 1000,
            )
        return NodeOutcome.success(
            {"topic": sent.topic, "partition": sent.partition, "offset": sent.offset},
            duration_ms=(time.monotonic() - began) * 1000,
        )
