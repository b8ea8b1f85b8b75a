"""Playing a `Run` in a real store: definition builders and given/when/then over commands."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from aggregates.store import RunStore, Verdict
from schemas.envelope import Envelope

NOW = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


# ---- building definitions ---------------------------------------------------


def python(node_id: str, *needs: str, **fields: Any) -> dict[str, Any]:
    """A node run by an executor; `inputs` maps argument names to expressions."""
    inputs = fields.pop("inputs", {})
    arguments = ", ".join(inputs)
    code = f"def main({arguments}):\n    return None\n"
    return {
        "id": node_id,
        "type": "python",
        "needs": list(needs),
        "config": {"code": code, "inputs": inputs},
        **fields,
    }


def transform(node_id: str, output: str | dict[str, str], *needs: str) -> dict[str, Any]:
    return {"id": node_id, "type": "transform", "needs": list(needs), "config": {"output": output}}


def workflow(*nodes: dict[str, Any], name: str = "spec", **fields: Any) -> dict[str, Any]:
    return {"name": name, "nodes": list(nodes), **fields}


# ---- playing a run ----------------------------------------------------------


def summary(event: Any) -> str:
    """An event as a short line: its type, then the node and attempt it is about."""
    name = type(event).__name__
    if name in ("NodeScheduled", "RetryScheduled"):
        return f"{name} {event.node_id}#{event.attempt}"
    if name == "NodeFailed":
        return f"{name} {event.node_id} ({'will retry' if event.will_retry else 'final'})"
    if hasattr(event, "node_id") and event.node_id is not None:
        return f"{name} {event.node_id}"
    return name


class RunUnderTest:
    """One run in a store; `when` applies commands and returns the events they added."""

    def __init__(self, store: RunStore, run_id: str | None = None) -> None:
        self.store = store
        self.run_id = run_id or str(uuid.uuid4())
        self.seen = 0
        self.verdicts: list[Verdict] = []

    # Commands, as the gateway, the executors and the timer service send them.

    def command(self, type: str, payload: dict[str, Any], id: str | None = None) -> Envelope:
        return Envelope.new(type, self.run_id, payload, id=id, time=NOW)

    def start(self, definition: dict[str, Any], input: dict[str, Any] | None = None) -> Envelope:
        return self.command("StartRun", {"definition": definition, "input": input or {}})

    def attempt_id(self, node_id: str, attempt: int = 1) -> str:
        return f"{self.run_id}:{node_id}:{attempt}"

    def succeeded(self, node_id: str, output: Any = None, attempt: int = 1) -> Envelope:
        return self.command(
            "NodeSucceeded",
            {"node_id": node_id, "attempt_id": self.attempt_id(node_id, attempt), "output": output},
        )

    def failed(
        self,
        node_id: str,
        error_class: str = "RuntimeError",
        message: str = "it broke",
        attempt: int = 1,
    ) -> Envelope:
        return self.command(
            "NodeFailed",
            {
                "node_id": node_id,
                "attempt_id": self.attempt_id(node_id, attempt),
                "error_class": error_class,
                "message": message,
            },
        )

    def timer_fired(self, timer_id: str) -> Envelope:
        return self.command("TimerFired", {"timer_id": timer_id})

    def cancel(self, reason: str = "no longer needed") -> Envelope:
        return self.command("CancelRun", {"reason": reason})

    # Given / when / then.

    def given(self, *commands: Envelope, now: dt.datetime = NOW) -> RunUnderTest:
        for command in commands:
            verdicts = self.store.decide([command], now)
            assert [v.outcome for v in verdicts] == ["applied"], verdicts
        self.new_events()
        return self

    def when(self, *commands: Envelope, now: dt.datetime = NOW) -> list[str]:
        self.verdicts = self.store.decide(list(commands), now)
        return [summary(e) for e in self.new_events()]

    def new_events(self) -> list[Any]:
        events = self.events()
        fresh = events[self.seen :]
        self.seen = len(events)
        return fresh

    def events(self) -> list[Any]:
        return self.store.run_events(self.run_id)

    @property
    def outcome(self) -> str:
        (verdict,) = self.verdicts
        return verdict.outcome

    @property
    def reason(self) -> str:
        (verdict,) = self.verdicts
        return verdict.reason

    def last(self, event_type: str) -> Any:
        return [e for e in self.events() if type(e).__name__ == event_type][-1]
