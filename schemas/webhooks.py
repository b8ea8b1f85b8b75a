"""The signature of webhooks, incoming and outgoing alike, so Citadel can call Citadel.

A request carries `X-Citadel-Timestamp: <unix seconds>` and
`X-Citadel-Signature: sha256=<hex of HMAC-SHA256(secret, timestamp + "." + body)>`. The
receiver recomputes the signature over the raw body, compares in constant time, and refuses a
timestamp further than its tolerance from its own clock, so a captured request cannot be
replayed later.
"""

from __future__ import annotations

import hashlib
import hmac

TIMESTAMP_HEADER = "X-Citadel-Timestamp"
SIGNATURE_HEADER = "X-Citadel-Signature"
DELIVERY_HEADER = "X-Citadel-Delivery"  # outgoing: the same for every attempt of one delivery
SCHEME = "sha256="


class SignatureRejected(Exception):
    """A request whose signature or timestamp does not verify; the message says which."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value of `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


def verify(
    secret: str, timestamp: str | None, signature: str | None, body: bytes, now: float, tolerance: float
) -> None:
    """Raise SignatureRejected unless `signature` signs `body` at `timestamp`, within `tolerance` of `now`."""
    if not timestamp:
        raise SignatureRejected(f"the {TIMESTAMP_HEADER} header is missing")
    if not signature:
        raise SignatureRejected(f"the {SIGNATURE_HEADER} header is missing")
    try:
        sent = int(timestamp)
    except ValueError:
        raise SignatureRejected(f"{TIMESTAMP_HEADER} must be unix seconds, got {timestamp[:40]!r}") from None
    # The signature first: only a sender who knows the secret learns the receiver's tolerance.
    if not hmac.compare_digest(sign(secret, sent, body).encode(), signature.strip().encode()):
        raise SignatureRejected(
            f'{SIGNATURE_HEADER} does not match: expected "{SCHEME}" and the hex HMAC-SHA256 of '
            f'timestamp + "." + body under the workflow\'s webhook secret'
        )
    if abs(now - sent) > tolerance:
        raise SignatureRejected(
            f"{TIMESTAMP_HEADER} is {now - sent:+.0f} s from the receiver's clock, beyond the tolerance of "
            f"{tolerance:g} s: sign each delivery when sending it (and check the sender's clock)"
        )
