"""Log lines are JSON naming their run and trace, and no secret reaches them; CITADEL_TRACES picks
the span exporter."""

from __future__ import annotations

import importlib.util
import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from citadel.telemetry import JsonLines, Redaction, RevealedSecrets, span_exporter
from nodes.secrets import EnvironmentSecrets
from schemas.tasks import NodeTask
from streams.tracing import attempt_span, run_span_id, run_trace_id

SECRET = "hunter2-the-api-key"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
TASK = NodeTask(
    run_id="run-1",
    tenant="acme",
    workflow="wf",
    node_id="call",
    node_type="http",
    attempt=2,
    attempt_id="att-9",
    config={},
    inputs={},
    timeout_seconds=5,
)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, Redaction]]:
    """A logger writing JSON lines through a redacting handler, as `citadel up` sets it up."""
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonLines())
    redaction = Redaction()
    handler.addFilter(redaction)
    logger = logging.getLogger(f"test.telemetry.{id(lines)}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, lines, redaction
    logger.removeHandler(handler)


def records(lines: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in lines.getvalue().splitlines()]


def test_a_secret_handed_to_a_node_is_redacted_from_message_args_and_exception_text(
    captured: tuple[logging.Logger, io.StringIO, Redaction],
) -> None:
    logger, lines, redaction = captured
    store = RevealedSecrets(EnvironmentSecrets(environ={"CITADEL_SECRET_KEY": SECRET}), redaction)
    assert store.get("KEY") == SECRET
    logger.warning("calling with %s", {"key": SECRET})
    try:
        raise ValueError(f"server rejected {SECRET}")
    except ValueError:
        logger.exception("request failed")
    text = lines.getvalue()
    assert SECRET not in text
    first, second = records(lines)
    assert first["message"] == "calling with {'key': '***'}"
    assert "server rejected ***" in str(second["exception"])


@pytest.mark.parametrize(
    ("logged", "shown"),
    [
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization: ***"),
        ("headers {'authorization': 'Token abc123'}", "headers {'authorization': '***'}"),
        ('{"Authorization": "Bearer abc.def"}', '{"Authorization": "***"}'),
        ("sent bearer abc-123_XYZ= upstream", "sent bearer *** upstream"),
        (f"GET /?token={JWT} HTTP/1.1", "GET /?token=*** HTTP/1.1"),
        ("store postgresql://citadel:pa55@db:5432/x", "store postgresql://citadel:***@db:5432/x"),
    ],
)
def test_credentials_are_redacted_by_their_shape_whoever_logs_them(
    captured: tuple[logging.Logger, io.StringIO, Redaction], logged: str, shown: str
) -> None:
    logger, lines, _ = captured
    logger.info("%s", logged)
    assert records(lines)[0]["message"] == shown


def test_a_line_logged_during_a_node_attempt_names_its_run_node_attempt_and_trace(
    captured: tuple[logging.Logger, io.StringIO, Redaction],
) -> None:
    logger, lines, _ = captured
    with attempt_span(TASK):
        logger.info("inside")
    logger.info("outside")
    logger.info("about a run", extra={"run_id": "run-2", "node_id": "n"})
    inside, outside, about = records(lines)
    assert inside["run_id"] == "run-1" and inside["node_id"] == "call" and inside["attempt_id"] == "att-9"
    assert inside["trace_id"] == f"{run_trace_id('run-1'):032x}"
    assert set(outside) == {"time", "level", "logger", "message"}
    assert about["trace_id"] == f"{run_trace_id('run-2'):032x}"
    assert about["span_id"] == f"{run_span_id('run-2'):016x}"


def test_an_unknown_trace_exporter_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"CITADEL_TRACES is 'jaeger'; choose off, console, file:PATH"):
        span_exporter("jaeger")
    assert span_exporter("off") is None


def _otlp_installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(_otlp_installed(), reason="the OTLP exporter is installed")
def test_otlp_without_its_package_says_what_to_install() -> None:
    with pytest.raises(ValueError, match=r"pip install 'citadel\[otlp\]'"):
        span_exporter("otlp")
