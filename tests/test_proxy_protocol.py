"""
lbws behind an L4 balancer: `listen = haproxy:tcp:...` reads a PROXY
protocol header (v1 text or v2 binary) before the WebSocket handshake, and
the address it carries is the client's, in X-Forwarded-For, X-Real-IP and
the access log.
"""

import ipaddress
import json
import struct

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import globalLogPublisher

from tests import wire
from tests.support import RecordingClient, eventually, startEchoBackend, startLbws

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxyV1(source, sourcePort, destination="127.0.0.1", destinationPort=8020):
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {sourcePort} {destinationPort}\r\n".encode()


def proxyV2(source, sourcePort, destination="127.0.0.1", destinationPort=8020):
    src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
    if src.version == 4:
        family, body = 0x11, src.packed + dst.packed  # TCP over IPv4
    else:
        family, body = 0x21, src.packed + ipaddress.IPv6Address(
            "::ffff:" + destination if dst.version == 4 else destination
        ).packed
    body += struct.pack("!HH", sourcePort, destinationPort)
    # Version 2, command PROXY; then the family and the address block.
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def same(address, expected):
    return ipaddress.ip_address(address) == ipaddress.ip_address(expected)


class ProxiedClient(RecordingClient):
    """
    A WebSocket client that first writes the PROXY header an L4 balancer
    would have put in front of its bytes.
    """

    def connectionMade(self):
        self.transport.write(self.factory.proxyHeader)
        super().connectionMade()


async def connectProxied(url, header):
    factory = WebSocketClientFactory(url, reactor=reactor)
    factory.protocol = ProxiedClient
    factory.proxyHeader = header
    factory.opened = defer.Deferred()
    host, port = url.split("//")[1].rsplit(":", 1)
    await TCP4ClientEndpoint(reactor, host, int(port), timeout=5).connect(factory)
    return await factory.opened.addTimeout(10, reactor)


@pytest_twisted.async_yield_fixture
async def proxied():
    backend, port = await startEchoBackend()
    events = []
    globalLogPublisher.addObserver(events.append)
    lbws = await startLbws(
        [("a", backend.url)],
        listen="haproxy:tcp:0:interface=127.0.0.1",
        health="interval = 60",
    )
    lbws.logged = events
    clients = []
    lbws.clients = clients
    yield lbws
    globalLogPublisher.removeObserver(events.append)
    for client in clients:
        if client.transport.connected:
            client.transport.abortConnection()
    await lbws.stopService()
    await port.stopListening()


@pytest.mark.parametrize(
    "version, source",
    [
        ("v1", "203.0.113.9"),
        ("v2", "198.51.100.7"),
        ("v1", "2001:db8::17"),
        ("v2", "2001:db8::42"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_proxy_header_gives_the_client_address(proxied, version, source):
    header = (proxyV1 if version == "v1" else proxyV2)(source, 40123)
    client = await connectProxied(proxied.url, header)
    proxied.clients.append(client)
    client.sendMessage(b"__request__")
    payload, _ = await client.messages.get()
    headers = json.loads(payload)["headers"]
    # (Twisted writes a v2 IPv6 address out in full: the same address.)
    assert same(headers["x-forwarded-for"], source)
    assert same(headers["x-real-ip"], source)
    assert headers["x-forwarded-proto"] == "http"
    client.sendClose(1000)
    await client.closed
    await eventually(lambda: not proxied.relay.tunnels)
    access = [e for e in proxied.logged if e.get("log_format_access")]
    assert len(access) == 1 and same(access[0]["peer"], source)


@pytest_twisted.ensureDeferred
async def test_proxy_header_from_the_balancer_in_front_is_appended(proxied):
    """
    A client's own X-Forwarded-For stays first; the PROXY address is the
    one lbws adds (as if the L4 balancer's client had sent it).
    """
    factory = WebSocketClientFactory(
        proxied.url, headers={"X-Forwarded-For": "192.0.2.1"}, reactor=reactor
    )
    factory.protocol = ProxiedClient
    factory.proxyHeader = proxyV2("203.0.113.50", 5000)
    factory.opened = defer.Deferred()
    host, port = proxied.url.split("//")[1].rsplit(":", 1)
    await TCP4ClientEndpoint(reactor, host, int(port)).connect(factory)
    client = await factory.opened
    proxied.clients.append(client)
    client.sendMessage(b"__request__")
    payload, _ = await client.messages.get()
    headers = json.loads(payload)["headers"]
    assert headers["x-forwarded-for"] == "192.0.2.1, 203.0.113.50"
    assert headers["x-real-ip"] == "203.0.113.50"


@pytest_twisted.ensureDeferred
async def test_a_connection_without_a_proxy_header_is_dropped(proxied):
    raw = await wire.rawConnect(proxied.url)
    raw.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    received = await raw.closed
    assert received == b""
    assert proxied.pool["a"].total == 0
