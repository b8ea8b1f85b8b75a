"""Where the engine's own HTTP clients (the `http` node, outgoing webhooks) may connect.

A workflow is written by a tenant, and these requests leave from inside the engine's network:
without a rule, any tenant could reach what only the engine should (a database's HTTP port on
loopback, a cloud's metadata service at 169.254.169.254, the cluster's internal services).
So unless private destinations are allowed, a request goes only to public addresses: the host
is resolved first and every address it resolves to must be global. (A name that resolves to a
public address when checked and to a private one a moment later, DNS rebinding, is not caught;
deny private ranges in the network as well where that matters.)

Embedded mode allows private destinations by default (it runs on a developer's machine, against
local services); production mode denies them unless `CITADEL_EGRESS_PRIVATE=allow`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket


class EgressDenied(Exception):
    """A request to a destination the engine may not reach."""


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is no part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def check_destination(host: str, port: int | None, allow_private: bool) -> None:
    """Raise EgressDenied if `host` is, or resolves to, an address that is not public."""
    if allow_private:
        return
    name = host.strip("[]")
    try:
        addresses = [str(ipaddress.ip_address(name))]
    except ValueError:
        try:
            found = await asyncio.get_running_loop().getaddrinfo(name, port or 443, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise EgressDenied(f"host {host!r} does not resolve: {exc.strerror or exc}") from None
        addresses = sorted({str(info[4][0]) for info in found})
    private = [address for address in addresses if _forbidden(address)]
    if private:
        raise EgressDenied(
            f"host {host!r} is a private, loopback or link-local address ({', '.join(private)}); "
            "the engine's HTTP requests may reach public addresses only "
            "(an operator may set CITADEL_EGRESS_PRIVATE=allow)"
        )
