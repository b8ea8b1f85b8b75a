"""OpenTelemetry traces of runs: one trace per run, a span per node attempt, carried across Kafka.

A run's trace id and its root span id derive from the run id, so every process that touches a
run (engine, executors, gateway) names the same trace without sharing state; each message keyed
by a run carries that context as a W3C `traceparent` header. The root span itself is recorded
when the run ends (by the outbox that publishes its last event), from its first event's time to
its last, under those derived ids: a tracer provider built with `RunIds` can give them. With no
tracer provider configured the spans cost nothing (OpenTelemetry's no-op tracer).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hashlib
from collections.abc import Iterator

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

from schemas.tasks import NodeTask

TRACEPARENT = "traceparent"
# The (trace id, span id) the next span started in this context must have: a run's root span.
_RUN_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("run_ids", default=None)
# The node attempt this task (and whatever it logs) works for: log lines name its run and node.
CURRENT_ATTEMPT: contextvars.ContextVar[NodeTask | None] = contextvars.ContextVar("attempt", default=None)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def run_trace_id(run_id: str) -> int:
    return int.from_bytes(_digest(f"trace:{run_id}")[:16], "big") or 1


def run_span_id(run_id: str) -> int:
    return int.from_bytes(_digest(f"span:{run_id}")[:8], "big") or 1


def traceparent(run_id: str) -> bytes:
    """The W3C trace context of a run's messages: its trace, with the run's root span as parent."""
    return f"00-{run_trace_id(run_id):032x}-{run_span_id(run_id):016x}-01".encode()


def parse_traceparent(value: bytes | None) -> SpanContext | None:
    try:
        _, trace_id, span_id, flags = (value or b"").decode().split("-")
        return SpanContext(int(trace_id, 16), int(span_id, 16), True, TraceFlags(int(flags, 16)))
    except ValueError:
        return None


@contextlib.contextmanager
def attempt_span(task: NodeTask, carried: SpanContext | None = None) -> Iterator[trace.Span]:
    """The span of one node attempt, a child of its run's root span (from the message header when
    the task came through Kafka, else derived from the run id: the same context either way)."""
    parent = carried or SpanContext(run_trace_id(task.run_id), run_span_id(task.run_id), True, TraceFlags(1))
    context = trace.set_span_in_context(NonRecordingSpan(parent))
    tracer = trace.get_tracer("citadel.engine")
    attributes: dict[str, str | int] = {
        "citadel.run_id": task.run_id,
        "citadel.tenant": task.tenant,
        "citadel.workflow": task.workflow,
        "citadel.node_id": task.node_id,
        "citadel.node_type": task.node_type,
        "citadel.attempt": task.attempt,
        "citadel.attempt_id": task.attempt_id,
    }
    token = CURRENT_ATTEMPT.set(task)
    try:
        name = f"node {task.node_id}"
        with tracer.start_as_current_span(name, context=context, attributes=attributes) as span:
            yield span
    finally:
        CURRENT_ATTEMPT.reset(token)


def attempt_failed(error_class: str) -> None:
    """Mark the current attempt's span failed, naming the error class (never the message, which
    may quote what a node was given)."""
    trace.get_current_span().set_status(Status(StatusCode.ERROR, error_class))


class RunIds(RandomIdGenerator):
    """Random ids, except for a run's root span, whose ids derive from the run id."""

    def generate_span_id(self) -> int:
        fixed = _RUN_IDS.get()
        return fixed[1] if fixed is not None else super().generate_span_id()

    def generate_trace_id(self) -> int:
        fixed = _RUN_IDS.get()
        return fixed[0] if fixed is not None else super().generate_trace_id()


def record_run_span(
    run_id: str, attributes: dict[str, str], started: dt.datetime, ended: dt.datetime, status: str
) -> None:
    """The root span of a run that has ended, parent of its attempts' spans. Recorded only by a
    tracer provider that can give it the run's ids (any other would make an unrelated trace)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider) or not isinstance(provider.id_generator, RunIds):
        return
    token = _RUN_IDS.set((run_trace_id(run_id), run_span_id(run_id)))
    try:
        span = provider.get_tracer("citadel.engine").start_span(
            f"run {attributes.get('citadel.workflow', '')}",
            context=otel_context.Context(),  # a root: no parent, whatever span is current here
            attributes={"citadel.run_id": run_id, "citadel.status": status, **attributes},
            start_time=_nanoseconds(started),
        )
    finally:
        _RUN_IDS.reset(token)
    if status != "completed":
        span.set_status(Status(StatusCode.ERROR, status))
    span.end(end_time=_nanoseconds(max(started, ended)))


def _nanoseconds(moment: dt.datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)
