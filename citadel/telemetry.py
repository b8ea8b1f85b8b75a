"""Where a process's logs and traces go: log lines (JSON or text) naming the run and trace they
belong to, with secrets redacted; and the span exporter chosen by CITADEL_TRACES."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from citadel.settings import Settings
from nodes.secrets import REDACTED, SecretStore, redact
from streams.tracing import CURRENT_ATTEMPT, RunIds, run_span_id, run_trace_id

# Attributes a log call may pass in `extra=` to name what it is about.
RUN_FIELDS = ("run_id", "node_id", "attempt_id")
# Credentials recognisable by their shape, whoever logs them. Each keeps its label, loses its value.
CREDENTIALS = (
    # An Authorization header or field, as a header line, a dict's repr or JSON.
    (re.compile(r"""(?i)(authorization['"]?\s*[:=]\s*)(['"])(?:[^'"\\]|\\.)*\2"""), r"\1\2***\2"),
    (re.compile(r"""(?i)(authorization\s*[:=]\s*)(?!['"\s])[^\r\n,;}]+"""), r"\1***"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]+=*"), r"\1***"),
    # A JWT anywhere, e.g. in a URL's query (the dashboard link's `?token=`).
    (re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"), REDACTED),
    # scheme://user:password@host
    (re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@"), r"\1***@"),
)
# Faust and aiokafka are chatty at INFO about every rebalance.
NOISY_LOGGERS = ("faust", "aiokafka", "mode")


class Redaction(logging.Filter):
    """Redacts known secret values and credential-shaped text from a record's message and
    exception text. On a handler, it sees every record that handler writes, from any logger."""

    def __init__(self) -> None:
        super().__init__()
        self.values: set[str] = set()

    def text(self, text: str) -> str:
        text = redact(text, self.values)
        for pattern, replacement in CREDENTIALS:
            text = pattern.sub(replacement, text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.text(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.text(record.exc_text)
        if record.stack_info:
            record.stack_info = self.text(record.stack_info)
        return True


class RevealedSecrets:
    """A secret store that tells the log redaction every value it hands out."""

    def __init__(self, store: SecretStore, redaction: Redaction) -> None:
        self.store = store
        self.redaction = redaction

    def get(self, name: str) -> str:
        value = self.store.get(name)
        if value:
            self.redaction.values.add(value)
        return value


# One per process, like logging's own handlers: the secret stores of this process feed it.
REDACTION = Redaction()


def run_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The run, node, attempt, trace and span a record belongs to, as far as they are known:
    from its `extra=`, else the node attempt being executed, and the current span."""
    fields: dict[str, Any] = {}
    attempt = CURRENT_ATTEMPT.get()
    for name in RUN_FIELDS:
        value = getattr(record, name, None) or (getattr(attempt, name) if attempt is not None else None)
        if value is not None:
            fields[name] = value
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        fields["trace_id"], fields["span_id"] = f"{context.trace_id:032x}", f"{context.span_id:016x}"
    elif "run_id" in fields:
        # A run's trace id derives from its id, so a line about a run names it with tracing off too.
        run_id = fields["run_id"]
        fields["trace_id"] = f"{run_trace_id(run_id):032x}"
        fields["span_id"] = f"{run_span_id(run_id):016x}"
    return fields


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the run's ids, and any exception."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **run_fields(record),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


class Text(logging.Formatter):
    """The human format, with the run a line is about when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = run_fields(record)
        if "run_id" in fields:
            node = f" node {fields['node_id']}" if "node_id" in fields else ""
            line += f" [run {fields['run_id']}{node}]"
        return line


def setup_logging(settings: Settings, serving: bool) -> None:
    """Log to stderr in the settings' format; unset, JSON for serving processes (`up`, `worker`:
    lines for a log pipeline) and text for commands a person runs and reads."""
    log_format = settings.log_format or ("json" if serving else "text")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if log_format == "json" else Text())
    handler.addFilter(REDACTION)
    if settings.jwt_secret:
        REDACTION.values.add(settings.jwt_secret)
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    logging.getLogger("citadel.run").setLevel(logging.INFO)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _span_line(span: ReadableSpan) -> str:
    line: str = span.to_json(indent=None)
    return line + "\n"


def span_exporter(traces: str) -> SpanExporter | None:
    """The exporter CITADEL_TRACES names: `off`, `console`, `file:PATH` (JSON lines, one span a
    line, appended) or `otlp` (OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT)."""
    if traces == "off":
        return None
    if traces == "console":
        return ConsoleSpanExporter(out=sys.stderr, formatter=_span_line)
    if traces.startswith("file:") and traces[len("file:") :]:
        path = Path(traces[len("file:") :])
        path.parent.mkdir(parents=True, exist_ok=True)
        return ConsoleSpanExporter(out=path.open("a", encoding="utf-8"), formatter=_span_line)
    if traces == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError(
                "CITADEL_TRACES=otlp needs the OTLP exporter: pip install 'citadel[otlp]' "
                "(opentelemetry-exporter-otlp-proto-http), or choose console, file:PATH or off"
            ) from None
        exporter: SpanExporter = OTLPSpanExporter()
        return exporter
    raise ValueError(f"CITADEL_TRACES is {traces!r}; choose off, console, file:PATH or otlp")


@contextlib.contextmanager
def exporting_traces(exporter: SpanExporter | None) -> Iterator[None]:
    """Export this process's spans while the block runs; at its end, flush what is still batched."""
    if exporter is None:
        yield
        return
    provider = TracerProvider(resource=Resource.create({"service.name": "citadel"}), id_generator=RunIds())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        yield
    finally:
        provider.shutdown()
