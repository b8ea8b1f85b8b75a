"""A run's trace through the real broker: one span per node attempt, each a child of the run's root span."""

from __future__ import annotations

import asyncio

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from citadel.runs import follow, start_command
from streams.kafka import NODE_TASKS
from streams.tracing import run_span_id, run_trace_id, traceparent
from streams.watch import topic_reader
from tests.conftest import EngineFactory

FLAKY_CHAIN = {
    "name": "traced",
    "nodes": [
        {"id": "first", "type": "python", "config": {"code": "def main():\n    return 1\n"}},
        {
            "id": "flaky",
            "type": "python",
            "needs": ["first"],
            "retry": {"max_attempts": 2, "delay_seconds": 0, "jitter": 0},
            "config": {
                "inputs": {"attempt": "run.attempt"},
                "code": "def main(attempt):\n"
                "    if attempt < 2:\n"
                "        raise ValueError('once')\n"
                "    return 2\n",
            },
        },
        {"id": "shape", "type": "transform", "needs": ["flaky"], "config": {"output": "flaky"}},
    ],
}


def exporter() -> InMemorySpanExporter:
    """The process's tracer provider can be set once: this test's, with spans kept in memory."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


async def test_a_run_has_one_span_per_node_attempt_under_its_root_span(engine_factory: EngineFactory) -> None:
    spans = exporter()
    command = start_command(FLAKY_CHAIN, {}, "acme")
    async with engine_factory() as engine:
        await engine.submit(command)
        report = await asyncio.wait_for(follow(engine.settings.kafka, command.run_id), 60)
        tasks = topic_reader(engine.settings.kafka, NODE_TASKS)
        await tasks.start()
        try:
            batches = await tasks.getmany(timeout_ms=5000)
        finally:
            await tasks.stop()
    assert report.status == "completed"
    ours = [s for s in spans.get_finished_spans() if s.context.trace_id == run_trace_id(command.run_id)]
    attempts = sorted((s.attributes or {}).get("citadel.attempt_id", "") for s in ours)
    assert sorted(n.node_id for n in report.nodes.values() if n.attempts) == ["first", "flaky", "shape"]
    # Executed attempts only (first once, flaky twice); the transform is decided inline, without one.
    assert len(attempts) == 3 and len(set(attempts)) == 3
    assert {s.name for s in ours} == {"node first", "node flaky"}
    assert all(s.parent is not None and s.parent.span_id == run_span_id(command.run_id) for s in ours)
    # The same context travels with each node task on Kafka.
    messages = [m for batch in batches.values() for m in batch if m.key == command.run_id.encode()]
    assert messages and all(dict(m.headers)["traceparent"] == traceparent(command.run_id) for m in messages)
