"""Where the engine's own HTTP requests may go: public addresses only, unless private ones are allowed."""

from __future__ import annotations

import re

import pytest

from citadel.settings import Settings
from nodes.egress import EgressDenied, check_destination

PRIVATE = [
    "127.0.0.1",
    "10.1.2.3",
    "192.168.0.7",
    "169.254.169.254",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "localhost",
]


@pytest.mark.parametrize("host", PRIVATE)
async def test_private_loopback_and_link_local_destinations_are_denied(host: str) -> None:
    with pytest.raises(EgressDenied, match="private, loopback or link-local"):
        await check_destination(host, 80, allow_private=False)
    await check_destination(host, 80, allow_private=True)


async def test_a_public_address_is_allowed() -> None:
    await check_destination("1.1.1.1", 443, allow_private=False)


async def test_a_host_that_does_not_resolve_is_denied_naming_it() -> None:
    with pytest.raises(EgressDenied, match=re.escape("'no-such-host.invalid' does not resolve")):
        await check_destination("no-such-host.invalid", 443, allow_private=False)


def test_private_destinations_are_allowed_in_embedded_mode_and_denied_in_production() -> None:
    assert Settings.from_env({}).egress_private is True
    assert Settings.from_env({"CITADEL_KAFKA": "kafka:9092"}).egress_private is False
    allowed = {"CITADEL_KAFKA": "kafka:9092", "CITADEL_EGRESS_PRIVATE": "allow"}
    assert Settings.from_env(allowed).egress_private is True
    with pytest.raises(ValueError, match="CITADEL_EGRESS_PRIVATE is 'maybe'; write allow or deny"):
        Settings.from_env({"CITADEL_EGRESS_PRIVATE": "maybe"})
