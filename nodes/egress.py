"""Where the engine's own HTTP clients (the `http` node, outgoing webhooks) may connect.

A workflow is written by a tenant, and these requests leave from inside the engine's network:
without a rule, any tenant could reach what only the engine should (a database's HTTP port on
loopback, a cloud's metadata service at 169.254.169.254, the cluster's internal services).
So unless private destinations are allowed, a request goes only to public addresses: the host
is resolved and every address it resolves to must be global.

The check is made where the connection is made, in the network backend of the clients' connection
pool (`EgressTransport`): the host is resolved once, those addresses are checked, and the socket
is connected to one of them, never to the name. A name that resolves to a public address when
checked and to a private one a moment later (DNS rebinding) thus cannot slip through, since
nothing asks the resolver a second time. TLS still verifies the certificate against, and sends
SNI for, the URL's host name: httpcore hands that to `start_tls` apart from the connect address.
The clients use no proxy from the environment (a proxy would resolve and connect on its own).

Embedded mode allows private destinations by default (it runs on a developer's machine, against
local services); production mode denies them unless `CITADEL_EGRESS_PRIVATE=allow`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable

import httpcore
import httpx

Resolve = Callable[[str, int], Awaitable[list[str]]]


class EgressDenied(Exception):
    """A request to a destination the engine may not reach."""


def _forbidden(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is no part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` is or resolves to, in the resolver's order of preference; OSError if none."""
    name = host.strip("[]")
    try:
        return [str(ipaddress.ip_address(name))]
    except ValueError:
        pass
    found = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in found))


async def destination(host: str, port: int, allow_private: bool, resolve: Resolve = resolve) -> list[str]:
    """The addresses to connect to for `host`, from one resolution; EgressDenied if private ones are
    not allowed and one of them is private, or if the host does not resolve (so cannot be checked)."""
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        problem = f"host {host!r} does not resolve: {exc.strerror or exc}"
        if allow_private:
            raise httpcore.ConnectError(problem) from None
        raise EgressDenied(problem) from None
    private = [address for address in addresses if _forbidden(address)]
    if private and not allow_private:
        raise EgressDenied(
            f"host {host!r} is a private, loopback or link-local address ({', '.join(private)}); "
            "the engine's HTTP requests may reach public addresses only "
            "(an operator may set CITADEL_EGRESS_PRIVATE=allow)"
        )
    return addresses


class EgressBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections to the addresses `destination` checked, trying each in turn."""

    def __init__(self, allow_private: bool, resolve: Resolve = resolve) -> None:
        self.allow_private = allow_private
        self._resolve = resolve
        self._connector = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await destination(host, port, self.allow_private, self._resolve)
        deadline = None if timeout is None else time.monotonic() + timeout
        failures: list[str] = []
        timed_out = False
        for address in addresses:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                timed_out = True
                break
            try:
                return await self._connector.connect_tcp(
                    address, port, remaining, local_address=local_address, socket_options=socket_options
                )
            except httpcore.ConnectTimeout:
                failures.append(f"{address}: timed out")
                timed_out = True
            except httpcore.ConnectError as exc:
                failures.append(f"{address}: {exc or 'refused'}")
        error = httpcore.ConnectTimeout if timed_out else httpcore.ConnectError
        raise error(
            f"could not connect to host {host!r} port {port} ({'; '.join(failures) or 'no time left'})"
        )

    async def sleep(self, seconds: float) -> None:
        await self._connector.sleep(seconds)


class EgressTransport(httpx.AsyncHTTPTransport):
    """httpx's HTTP transport, over a connection pool whose connections `EgressBackend` makes."""

    def __init__(
        self,
        allow_private: bool,
        limits: httpx.Limits | None = None,
        verify: ssl.SSLContext | bool = True,
        resolve: Resolve = resolve,
    ) -> None:
        limits = limits or httpx.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(verify=verify, limits=limits)
        # httpx (0.28) takes no network backend, so the pool it built is replaced by one that has ours.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=EgressBackend(allow_private, resolve),
        )
