"""Where the engine's own HTTP requests may go: public addresses only, unless private ones are allowed,
checked at the address the connection is made to."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from citadel.settings import Settings
from nodes.egress import EgressDenied, EgressTransport, destination

PRIVATE = [
    "127.0.0.1",
    "10.1.2.3",
    "192.168.0.7",
    "169.254.169.254",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "localhost",
]
NAME = "rebinding.test"  # .test is reserved: no DNS answers it, only the resolvers given here


class Resolver:
    """Answers each lookup with the next of `answers` (the last one again once they run out)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return self.answers[min(len(self.lookups), len(self.answers)) - 1]


class Server:
    """A real HTTP server on 127.0.0.1 that records the Host header and TLS server name of each request."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        self.server_names: list[str | None] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hosts.append(request.host)
        return web.Response(text="reached")

    def sni(self, _socket: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> None:
        self.server_names.append(name)


@contextlib.asynccontextmanager
async def serving(tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server()
    if tls is not None:
        tls.sni_callback = server.sni
    app = web.Application()
    app.router.add_get("/", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server
    finally:
        await runner.cleanup()


def certificate_for(name: str, directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for `name`, and a client context trusting only it."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


@pytest.mark.parametrize("host", PRIVATE)
async def test_private_loopback_and_link_local_destinations_are_denied(host: str) -> None:
    with pytest.raises(EgressDenied, match="private, loopback or link-local"):
        await destination(host, 80, allow_private=False)
    assert await destination(host, 80, allow_private=True)


async def test_a_public_address_is_allowed() -> None:
    assert await destination("1.1.1.1", 443, allow_private=False) == ["1.1.1.1"]


async def test_a_host_that_does_not_resolve_is_denied_naming_it() -> None:
    with pytest.raises(EgressDenied, match=re.escape("'no-such-host.invalid' does not resolve")):
        await destination("no-such-host.invalid", 443, allow_private=False)


async def test_a_host_with_one_private_address_among_public_ones_is_denied() -> None:
    resolver = Resolver(["1.1.1.1", "127.0.0.1"])
    with pytest.raises(EgressDenied, match=re.escape(f"host '{NAME}' is a private") + ".*127.0.0.1"):
        await destination(NAME, 80, allow_private=False, resolve=resolver)


async def test_a_request_to_a_name_resolving_to_loopback_is_refused_before_it_connects() -> None:
    async with serving() as server, httpx.AsyncClient(transport=EgressTransport(False)) as client:
        with pytest.raises(EgressDenied, match="'localhost' is a private, loopback or link-local"):
            await client.get(f"http://localhost:{server.port}/")
    assert server.hosts == []


async def test_the_connection_goes_to_the_address_of_the_one_resolution_not_to_the_name() -> None:
    # The name resolves nowhere but here; a second lookup would answer an address nothing listens on.
    resolver = Resolver(["127.0.0.1"], ["127.0.0.2"])
    transport = EgressTransport(True, resolve=resolver)
    async with serving() as server, httpx.AsyncClient(transport=transport) as client:
        response = await client.get(f"http://{NAME}:{server.port}/")
    assert response.text == "reached"
    assert server.hosts == [f"{NAME}:{server.port}"] and resolver.lookups == [NAME]


async def test_tls_verifies_and_sends_sni_for_the_host_name_while_connecting_to_its_address(
    tmp_path: Path,
) -> None:
    server_tls, trusting = certificate_for(NAME, tmp_path)
    transport = EgressTransport(True, verify=trusting, resolve=Resolver(["127.0.0.1"]))
    async with serving(server_tls) as server, httpx.AsyncClient(transport=transport) as client:
        response = await client.get(f"https://{NAME}:{server.port}/")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(f"https://127.0.0.1:{server.port}/")
    assert response.text == "reached"
    assert server.server_names[0] == NAME


async def test_a_name_that_does_not_resolve_is_a_connect_error_where_private_egress_is_allowed() -> None:
    async with httpx.AsyncClient(transport=EgressTransport(True)) as client:
        with pytest.raises(httpx.ConnectError, match=re.escape("'no-such-host.invalid' does not resolve")):
            await client.get("http://no-such-host.invalid/")


def test_private_destinations_are_allowed_in_embedded_mode_and_denied_in_production() -> None:
    assert Settings.from_env({}).egress_private is True
    assert Settings.from_env({"CITADEL_KAFKA": "kafka:9092"}).egress_private is False
    allowed = {"CITADEL_KAFKA": "kafka:9092", "CITADEL_EGRESS_PRIVATE": "allow"}
    assert Settings.from_env(allowed).egress_private is True
    with pytest.raises(ValueError, match="CITADEL_EGRESS_PRIVATE is 'maybe'; write allow or deny"):
        Settings.from_env({"CITADEL_EGRESS_PRIVATE": "maybe"})
