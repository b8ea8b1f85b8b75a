"""Specifications of the wire envelope: its codec, its errors, upcasting, and command payloads."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from schemas import envelope as envelope_module
from schemas.envelope import (
    COMMANDS,
    UPCASTERS,
    Envelope,
    EnvelopeError,
    NodeFailed,
    NodeSucceeded,
    StartRun,
    command_json_schema,
    command_payload,
    decode,
    encode,
    upcaster,
)

TIME = dt.datetime(2030, 1, 1, 12, 30, tzinfo=dt.UTC)


def wire(**fields: Any) -> dict[str, Any]:
    """A valid envelope as a JSON object, with `fields` replaced (None removes a field)."""
    raw = {
        "id": "cmd-1",
        "type": "StartRun",
        "run_id": "run-1",
        "time": "2030-01-01T12:30:00Z",
        "schema_version": 1,
        "payload": {"input": {"n": 1}},
    }
    raw.update(fields)
    return {k: v for k, v in raw.items() if v is not None}


def decode_error(data: bytes | None) -> str:
    with pytest.raises(EnvelopeError) as raised:
        decode(data)
    return str(raised.value)


# ---- round trip -------------------------------------------------------------------


def test_an_envelope_survives_encode_and_decode() -> None:
    original = Envelope.new(
        "NodeSucceeded",
        "run-1",
        {"node_id": "a", "attempt_id": "run-1:a:1", "output": {"k": [1, 2.5]}},
        id="cmd-1",
        tenant="acme",
        time=TIME,
        version=7,
    )

    assert decode(encode(original)) == original


def test_an_encoded_envelope_is_a_json_object_without_null_fields() -> None:
    raw = orjson.loads(encode(Envelope.new("CancelRun", "run-1", id="cmd-1", time=TIME)))

    assert raw == {
        "id": "cmd-1",
        "type": "CancelRun",
        "run_id": "run-1",
        "tenant": "default",
        "time": "2030-01-01T12:30:00Z",
        "schema_version": 1,
        "payload": {},
    }


def test_a_new_envelope_gets_a_unique_id_and_the_current_time() -> None:
    before = dt.datetime.now(dt.UTC)
    first, second = Envelope.new("CancelRun", "run-1"), Envelope.new("CancelRun", "run-1")

    assert first.id != second.id
    assert before <= first.time <= dt.datetime.now(dt.UTC)
    assert first.schema_version == envelope_module.SCHEMA_VERSION


def test_defaults_are_filled_in_on_decode() -> None:
    envelope = decode(orjson.dumps(wire(schema_version=None, payload=None)))

    assert (envelope.tenant, envelope.schema_version, envelope.payload) == ("default", 1, {})


def test_an_envelope_is_immutable() -> None:
    envelope = decode(orjson.dumps(wire()))

    with pytest.raises(ValueError, match="frozen"):
        envelope.run_id = "other"


# ---- what is wrong with a message -------------------------------------------------


@pytest.mark.parametrize("data", [b"", None], ids=["empty", "none"])
def test_an_empty_message_is_an_error(data: bytes | None) -> None:
    assert decode_error(data) == "empty message"


@pytest.mark.parametrize(
    "data", [b"{not json", b"\xff\xfe", b"{'id': 1}"], ids=["truncated", "binary", "python-repr"]
)
def test_undecodable_bytes_are_an_error_saying_not_json(data: bytes) -> None:
    assert decode_error(data).startswith("not JSON")


@pytest.mark.parametrize("value", [[1, 2], "envelope", 3, None], ids=["array", "string", "number", "null"])
def test_json_that_is_not_an_object_is_an_error(value: Any) -> None:
    assert decode_error(orjson.dumps(value)) == "envelope must be a JSON object"


@pytest.mark.parametrize("field", ["id", "type", "run_id", "time"])
def test_a_missing_field_is_an_error_naming_it(field: str) -> None:
    message = decode_error(orjson.dumps(wire(**{field: None})))

    assert message.startswith("invalid envelope")
    assert f"{field}: Field required" in message


def test_every_missing_field_is_named_at_once() -> None:
    message = decode_error(orjson.dumps({"type": "StartRun"}))

    for field in ("id", "run_id", "time"):
        assert f"{field}: Field required" in message


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"time": "yesterday"}, "time:"),
        ({"payload": [1, 2]}, "payload:"),
        ({"id": ""}, "id:"),
        ({"run_id": 17}, "run_id:"),
    ],
    ids=["time", "payload", "empty-id", "run-id-not-a-string"],
)
def test_a_field_of_the_wrong_shape_is_an_error_naming_it(fields: dict[str, Any], named: str) -> None:
    message = decode_error(orjson.dumps(wire(**fields)))

    assert message.startswith("invalid envelope")
    assert named in message


def test_a_newer_schema_version_is_an_error_naming_both_versions() -> None:
    message = decode_error(orjson.dumps(wire(schema_version=2)))

    assert "schema_version 2" in message and "newer" in message and "(1)" in message


@pytest.mark.parametrize(
    "version",
    [
        0,
        -1,
        "1",
        1.5,
        pytest.param(True),
    ],
    ids=["zero", "negative", "string", "float", "boolean"],
)
def test_a_schema_version_that_is_not_a_positive_integer_is_an_error(version: Any) -> None:
    message = decode_error(orjson.dumps(wire(schema_version=version)))

    assert message.startswith("schema_version must be a positive integer")


# ---- upcasting ------------------------------------------------------------------


@pytest.fixture
def version_three(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The engine at schema version 3, with upcasters it registers removed afterwards."""
    monkeypatch.setattr(envelope_module, "SCHEMA_VERSION", 3)
    before = dict(UPCASTERS)
    yield
    UPCASTERS.clear()
    UPCASTERS.update(before)


def register_start_run_upcasters() -> None:
    @upcaster("StartRun", 1)
    def rename_params(payload: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in payload.items() if k != "params"}, "input": payload["params"]}

    @upcaster("StartRun", 2)
    def add_tag(payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "tag": f"from-{payload['input']['n']}"}


def test_the_upcaster_decorator_registers_by_type_and_version(version_three: None) -> None:
    @upcaster("CancelRun", 1)
    def step(payload: dict[str, Any]) -> dict[str, Any]:
        return payload

    assert UPCASTERS[("CancelRun", 1)] is step


def test_an_old_message_is_upcast_step_by_step_to_the_current_version(version_three: None) -> None:
    register_start_run_upcasters()

    envelope = decode(orjson.dumps(wire(schema_version=1, payload={"params": {"n": 4}})))

    assert envelope.schema_version == 3
    assert envelope.payload == {"input": {"n": 4}, "tag": "from-4"}


def test_upcasting_starts_at_the_version_the_message_has(version_three: None) -> None:
    register_start_run_upcasters()

    envelope = decode(orjson.dumps(wire(schema_version=2, payload={"input": {"n": 5}})))

    assert envelope.payload == {"input": {"n": 5}, "tag": "from-5"}


def test_a_current_message_is_not_upcast(version_three: None) -> None:
    register_start_run_upcasters()

    envelope = decode(orjson.dumps(wire(schema_version=3, payload={"input": {"n": 6}})))

    assert envelope.payload == {"input": {"n": 6}}


def test_upcasters_apply_only_to_their_message_type(version_three: None) -> None:
    register_start_run_upcasters()

    envelope = decode(orjson.dumps(wire(type="CancelRun", schema_version=1, payload={"params": {"n": 1}})))

    assert (envelope.schema_version, envelope.payload) == (3, {"params": {"n": 1}})


def test_a_version_without_an_upcaster_passes_its_payload_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(envelope_module, "SCHEMA_VERSION", 2)

    envelope = decode(orjson.dumps(wire(schema_version=1)))

    assert (envelope.schema_version, envelope.payload) == (2, {"input": {"n": 1}})


def test_a_message_without_a_schema_version_is_read_as_version_one(version_three: None) -> None:
    register_start_run_upcasters()

    envelope = decode(orjson.dumps(wire(schema_version=None, payload={"params": {"n": 4}})))

    assert envelope.payload == {"input": {"n": 4}, "tag": "from-4"}


# ---- command payloads ---------------------------------------------------------------


def command(type: str, payload: dict[str, Any]) -> Envelope:
    return Envelope.new(type, "run-1", payload, id="cmd-1", time=TIME)


def payload_error(type: str, payload: dict[str, Any]) -> str:
    with pytest.raises(EnvelopeError) as raised:
        command_payload(command(type, payload))
    return str(raised.value)


def test_a_command_payload_is_typed_by_the_command_type() -> None:
    result = command_payload(
        command(
            "NodeFailed",
            {"node_id": "a", "attempt_id": "r:a:1", "error_class": "ValueError", "message": "x"},
        )
    )

    assert result == NodeFailed(node_id="a", attempt_id="r:a:1", error_class="ValueError", message="x")


def test_command_payload_defaults_are_filled_in() -> None:
    succeeded = command_payload(command("NodeSucceeded", {"node_id": "a", "attempt_id": "r:a:1"}))
    started = command_payload(command("StartRun", {"workflow": "orders"}))

    assert succeeded == NodeSucceeded(
        node_id="a", attempt_id="r:a:1", output=None, duration_ms=0.0, stdout="", stderr=""
    )
    assert started == StartRun(workflow="orders", input={})


def test_an_unknown_command_type_is_an_error_listing_the_known_ones() -> None:
    message = payload_error("RestartRun", {})

    assert "'RestartRun'" in message
    for known in COMMANDS:
        assert known in message


@pytest.mark.parametrize(
    ("type", "payload", "named"),
    [
        (
            "NodeFailed",
            {"node_id": "a", "attempt_id": "r:a:1", "message": "x"},
            "payload.error_class: Field required",
        ),
        (
            "NodeSucceeded",
            {"node_id": "a", "attempt_id": "r:a:1", "result": 1},
            "payload.result: Extra inputs are not permitted",
        ),
        (
            "NodeSucceeded",
            {"node_id": "a", "attempt_id": "r:a:1", "duration_ms": "fast"},
            "payload.duration_ms:",
        ),
        ("StartRun", {"workflow": "orders", "input": [1]}, "payload.input:"),
        ("TimerFired", {}, "payload.timer_id: Field required"),
        ("CancelRun", {"why": "x"}, "payload.why: Extra inputs are not permitted"),
    ],
    ids=["missing", "unknown", "wrong-type", "input-not-an-object", "timer-id", "cancel"],
)
def test_a_bad_command_payload_is_an_error_naming_the_field(
    type: str, payload: dict[str, Any], named: str
) -> None:
    message = payload_error(type, payload)

    assert message.startswith(f"invalid {type}:")
    assert named in message


def test_every_bad_field_of_a_payload_is_named_at_once() -> None:
    message = payload_error("NodeFailed", {"node_id": "a", "color": "red"})

    for named in ("payload.attempt_id", "payload.error_class", "payload.message", "payload.color"):
        assert named in message


def test_the_command_json_schema_lists_every_command_and_its_payload() -> None:
    schema = command_json_schema()

    assert schema["properties"]["type"]["enum"] == sorted(COMMANDS)
    assert set(COMMANDS) <= set(schema["$defs"])
    assert set(schema["required"]) == {"id", "type", "run_id", "time"}
    assert "error_class" in schema["$defs"]["NodeFailed"]["required"]


VALID_PAYLOADS = {
    "StartRun": {"workflow": "default.orders", "input": {"order": "A-1"}},
    "AttemptStarted": {"node_id": "a", "attempt_id": "r:a:1"},
    "NodeSucceeded": {"node_id": "a", "attempt_id": "r:a:1", "output": [1, 2]},
    "NodeFailed": {"node_id": "a", "attempt_id": "r:a:1", "error_class": "Boom", "message": "no"},
    "CancelRun": {},
    "TimerFired": {"timer_id": "wait:r:a:1"},
    "Signal": {"node_id": "approve", "payload": {"ok": True}},
    "NotificationAttempted": {"delivery_id": "d1", "attempt": 1, "status_code": 200},
}
INVALID_PAYLOADS = {
    "StartRun": {"input": "not an object"},
    "AttemptStarted": {"node_id": "a"},
    "NodeSucceeded": {"attempt_id": "r:a:1"},
    "NodeFailed": {"node_id": "a", "attempt_id": "r:a:1", "message": "no error class"},
    "CancelRun": {"reason": "x", "urgent": True},
    "TimerFired": {},
    "Signal": {"payload": 1},
    "NotificationAttempted": {"delivery_id": "d1", "attempt": 0},
}


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_the_command_json_schema_judges_each_kind_of_payload_as_the_engine_does(kind: str) -> None:
    validator = Draft202012Validator(command_json_schema())
    for payload, valid in ((VALID_PAYLOADS[kind], True), (INVALID_PAYLOADS[kind], False)):
        command = Envelope.new(kind, str(uuid.uuid4()), payload)
        document = orjson.loads(encode(command))
        assert validator.is_valid(document) is valid, (kind, payload)
        try:
            command_payload(decode(encode(command)))
            engine_accepts = True
        except EnvelopeError:
            engine_accepts = False
        assert engine_accepts is valid, (kind, payload)


def test_the_command_json_schema_refuses_an_unknown_type_and_a_missing_id() -> None:
    validator = Draft202012Validator(command_json_schema())
    document = orjson.loads(encode(Envelope.new("StartRun", str(uuid.uuid4()), VALID_PAYLOADS["StartRun"])))

    assert not validator.is_valid({**document, "type": "Teleport"})
    assert not validator.is_valid({k: v for k, v in document.items() if k != "id"})
