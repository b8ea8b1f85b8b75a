"""The consumers' fetch wait: short while messages flow, a share of a lull, capped when idle."""

from __future__ import annotations

from streams.kafka import KafkaSettings, fetch_wait_ms

EMBEDDED = KafkaSettings.for_embedded("127.0.0.1:9092")


def test_fetch_wait_is_the_busy_wait_right_after_activity() -> None:
    assert fetch_wait_ms(EMBEDDED, 0.0) == EMBEDDED.fetch_wait_busy_ms
    assert fetch_wait_ms(EMBEDDED, 0.01) == EMBEDDED.fetch_wait_busy_ms


def test_fetch_wait_grows_in_proportion_to_the_lull() -> None:
    assert fetch_wait_ms(EMBEDDED, 0.4) == round(0.4 * EMBEDDED.fetch_wait_lull_share * 1000)
    assert fetch_wait_ms(EMBEDDED, 0.8) == 2 * fetch_wait_ms(EMBEDDED, 0.4)


def test_fetch_wait_never_exceeds_the_idle_wait() -> None:
    assert fetch_wait_ms(EMBEDDED, 60.0) == EMBEDDED.fetch_wait_idle_ms
    assert fetch_wait_ms(EMBEDDED, float("inf")) == EMBEDDED.fetch_wait_idle_ms


def test_a_real_broker_keeps_one_fetch_wait() -> None:
    cluster = KafkaSettings.for_cluster("kafka:9092")
    assert {fetch_wait_ms(cluster, lull) for lull in (0.0, 1.0, 60.0)} == {500}
