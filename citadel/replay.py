"""Reading run histories back from the event store: the replay of projections, and `citadel runs`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from aggregates.store import RunStore
from schemas.envelope import Envelope
from streams.engine import event_envelope

RUN_TOPIC = "aggregates.run:"


def history(store: RunStore, page: int = 10_000) -> Iterator[Envelope]:
    """Every run event in the store, in commit order, as it was published on `citadel.run-events`."""
    tenants: dict[str, str] = {}
    position = 1
    while True:
        notifications = store.recorder.select_notifications(position, page)
        if not notifications:
            return
        for notification in notifications:
            if not notification.topic.startswith(RUN_TOPIC):
                continue
            domain_event: Any = store.mapper.to_domain_event(notification)
            run_id = str(domain_event.originator_id)
            if type(domain_event).__name__ == "Started":
                tenants[run_id] = domain_event.tenant
            tenant = tenants.get(run_id)
            if tenant is None:  # a history that begins after this run started: ask the run
                tenant = tenants[run_id] = store.run(run_id).tenant
            yield event_envelope(domain_event, tenant)
        position = notifications[-1].id + 1


def event_count(store: RunStore) -> int:
    """How many notifications the store holds (runs and workflows), for a progress bar."""
    return int(store.recorder.max_notification_id() or 0)


def run_history(store: RunStore, run_id: str) -> list[Envelope]:
    """One run's events, in order; KeyError if there is no such run."""
    events: list[Any] = store.run_events(run_id)
    if not events:
        raise KeyError(f"no run {run_id!r}")
    tenant = events[0].tenant
    return [event_envelope(e, tenant) for e in events]
