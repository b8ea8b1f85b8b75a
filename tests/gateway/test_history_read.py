"""A subscription's read of the store: a run that ends between reading its events and looking at
its status still gets its last events (the subscription then ends with them, not before)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregates.store import RunStore
from gateway.backend import _events_after
from tests.aggregates.support import RunUnderTest, python, workflow


class EndsWhileRead(RunStore):
    """A real store in which the run's last command lands just after its events were read."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.then: RunUnderTest | None = None

    def run(self, run_id: str, version: int | None = None) -> Any:
        if self.then is not None:
            then, self.then = self.then, None
            then.given(then.failed("first", message="no"))
        return super().run(run_id, version)


def test_a_run_that_ends_during_the_read_is_read_to_its_end(tmp_path: Path) -> None:
    store = EndsWhileRead(f"sqlite:///{tmp_path}/es.db")
    run = RunUnderTest(store)
    run.given(run.start(workflow(python("first"), python("second", "first"))))
    store.then = run

    events, ended = _events_after(store, run.run_id, "default", 0)

    assert ended
    assert [e.type for e in events][:2] == ["Started", "NodeScheduled"]
    assert events[-1].type == "Failed"
    assert [e.version for e in events] == list(range(1, len(events) + 1))
    assert [e.version for e in events] == [e.originator_version for e in store.run_events(run.run_id)]
    store.close()


def test_a_run_still_going_is_read_as_far_as_it_got(tmp_path: Path) -> None:
    store = RunStore(f"sqlite:///{tmp_path}/es.db")
    run = RunUnderTest(store)
    run.given(run.start(workflow(python("first"), python("second", "first"))))

    events, ended = _events_after(store, run.run_id, "default", 1)

    assert not ended
    assert [(e.type, e.version) for e in events] == [("NodeScheduled", 2)]
    store.close()
