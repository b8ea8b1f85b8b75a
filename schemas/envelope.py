"""The one wire envelope for commands and events, its orjson codec, and the upcasting hook."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1

# (message type, from schema version) -> function turning that version's payload into the next.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class EnvelopeError(ValueError):
    """Bytes that are not a valid envelope; the message says what is wrong."""


class Envelope(BaseModel):
    """A command or an event as it travels on a topic."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1, max_length=200)
    type: str = Field(min_length=1, max_length=100)
    run_id: str = Field(min_length=1, max_length=100)
    tenant: str = Field(default="default", min_length=1, max_length=100)
    time: dt.datetime
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    payload: dict[str, Any] = Field(default_factory=dict)
    # Position of an event in its run (events only).
    version: int | None = None

    @classmethod
    def new(
        cls,
        type: str,
        run_id: str,
        payload: dict[str, Any] | None = None,
        *,
        id: str | None = None,
        tenant: str = "default",
        time: dt.datetime | None = None,
        version: int | None = None,
    ) -> Envelope:
        return cls(
            id=id or str(uuid.uuid4()),
            type=type,
            run_id=run_id,
            tenant=tenant,
            time=time or dt.datetime.now(dt.UTC),
            payload=payload or {},
            version=version,
        )


def upcaster(message_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register a function that upgrades `message_type` payloads from `from_version` to the next."""

    def register(function: Upcaster) -> Upcaster:
        UPCASTERS[(message_type, from_version)] = function
        return function

    return register


def encode(envelope: Envelope) -> bytes:
    # Built by hand: pydantic's model_dump costs more than the rest of encoding together,
    # and orjson writes datetimes as RFC 3339 itself.
    document: dict[str, Any] = {
        "id": envelope.id,
        "type": envelope.type,
        "run_id": envelope.run_id,
        "tenant": envelope.tenant,
        "time": envelope.time,
        "schema_version": envelope.schema_version,
        "payload": envelope.payload,
    }
    if envelope.version is not None:
        document["version"] = envelope.version
    return orjson.dumps(document, option=orjson.OPT_UTC_Z)


def decode(data: bytes | None) -> Envelope:
    """Decode and upcast an envelope to SCHEMA_VERSION, or raise EnvelopeError naming the problem."""
    if not data:
        raise EnvelopeError("empty message")
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise EnvelopeError("envelope must be a JSON object")
    # A message without a version predates versioning: it is version 1.
    version = raw.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EnvelopeError(f"schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise EnvelopeError(
            f"schema_version {version} is newer than this engine understands ({SCHEMA_VERSION})"
        )
    payload = raw.get("payload", {})
    while version < SCHEMA_VERSION and isinstance(payload, dict):
        step = UPCASTERS.get((str(raw.get("type")), version))
        if step is not None:
            payload = step(payload)
        version += 1
    raw = {**raw, "payload": payload, "schema_version": SCHEMA_VERSION}
    try:
        return Envelope.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'envelope'}: {e['msg']}" for e in exc.errors()
        )
        raise EnvelopeError(f"invalid envelope: {problems}") from None


# Command payloads. Commands travel on `citadel.commands`, keyed by run id.


class ParentNode(BaseModel):
    """The subworkflow node (and its attempt) that a child run reports back to."""

    model_config = ConfigDict(extra="forbid")
    run_id: str
    node_id: str
    attempt_id: str


class RerunOf(BaseModel):
    """Start as a rerun of an earlier run: reuse the outputs of the nodes upstream of `from_node`
    and execute from it on, with the original run's definition or the workflow's latest."""

    model_config = ConfigDict(extra="forbid")
    run_id: str
    from_node: str
    definition: Literal["original", "current"] = "original"


class StartRun(BaseModel):
    """Start a run of a workflow: an inline definition document, a deployed name, or a rerun."""

    model_config = ConfigDict(extra="forbid")
    definition: dict[str, Any] | None = None
    workflow: str | None = None
    workflow_version: int | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    parent: ParentNode | None = None
    rerun: RerunOf | None = None


class AttemptStarted(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node_id: str
    attempt_id: str


class NodeSucceeded(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node_id: str
    attempt_id: str
    output: Any = None
    duration_ms: float = 0.0
    stdout: str = ""
    stderr: str = ""


class NodeFailed(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node_id: str
    attempt_id: str
    error_class: str
    message: str
    duration_ms: float = 0.0
    stdout: str = ""
    stderr: str = ""


class CancelRun(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = "cancelled by user"


class Signal(BaseModel):
    """Answers an `approval` node that is waiting; `payload` becomes its output's payload."""

    model_config = ConfigDict(extra="forbid")
    node_id: str
    payload: Any = None


class TimerFired(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timer_id: str


class NotificationAttempted(BaseModel):
    """The outcome of one attempt to deliver a run's outgoing webhook (`notify`)."""

    model_config = ConfigDict(extra="forbid")
    delivery_id: str
    attempt: int = Field(ge=1)
    status_code: int | None = None
    error_class: str | None = None  # as the http node's: HTTPStatus, Timeout, ConnectionError, ...
    error: str | None = None


COMMANDS: dict[str, type[BaseModel]] = {
    "StartRun": StartRun,
    "AttemptStarted": AttemptStarted,
    "NodeSucceeded": NodeSucceeded,
    "NodeFailed": NodeFailed,
    "CancelRun": CancelRun,
    "TimerFired": TimerFired,
    "Signal": Signal,
    "NotificationAttempted": NotificationAttempted,
}


def command_payload(envelope: Envelope) -> BaseModel:
    """The typed payload of a command envelope, or EnvelopeError naming the bad field."""
    model = COMMANDS.get(envelope.type)
    if model is None:
        known = ", ".join(sorted(COMMANDS))
        raise EnvelopeError(f"unknown command type {envelope.type!r}; known: {known}")
    try:
        return model.model_validate(envelope.payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"payload.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise EnvelopeError(f"invalid {envelope.type}: {problems}") from None


def command_json_schema() -> dict[str, Any]:
    """JSON Schema of a command on `citadel.commands`, so any program can publish commands: the
    envelope, and one variant per command type (`oneOf`, told apart by `type`) giving its payload."""
    schema = Envelope.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Citadel command (topic citadel.commands, key = run id)"
    schema["properties"]["run_id"]["description"] = "the run, a UUID; also the message key"
    schema["properties"]["id"]["description"] = "unique per command: a command id seen before is a no-op"
    schema["properties"]["type"]["enum"] = sorted(COMMANDS)
    schema["properties"]["schema_version"]["maximum"] = SCHEMA_VERSION  # older ones are upcast
    definitions: dict[str, Any] = {}
    variants = []
    for name, model in sorted(COMMANDS.items()):
        payload = model.model_json_schema(ref_template="#/$defs/{model}")
        definitions.update(payload.pop("$defs", {}))
        definitions[name] = payload
        variants.append(
            {
                "properties": {"type": {"const": name}, "payload": {"$ref": f"#/$defs/{name}"}},
                "required": ["type"],
            }
        )
    schema["oneOf"] = variants
    schema["discriminator"] = {"propertyName": "type"}  # for OpenAPI tools; JSON Schema ignores it
    schema["$defs"] = definitions
    return schema
