"""
Edges of what a client sends that lbws passes on, end to end, for plain
HTTP and WebSocket alike: header names with underscores
(C{underscores_in_headers}), C{max_connections_per_ip} over plain HTTP
connections, and absolute-form targets (RFC 9112 3.2.2), with curl, httpx
and raw sockets as clients and twisted.web and byte-level backends.
"""

import json
import os
from types import SimpleNamespace

import httpx
import pytest
import pytest_twisted
from twisted.internet import reactor, threads, utils
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from lbws.config import ConfigError, parseConfig
from lbws.protocol.headers import forwardedHeaders, underscoreDropped

from tests import support, wire
from tests.support import eventually, handshakeRequest
from tests.test_hostile import backendHead, fields
from tests.test_httpproxy import _httpBackend
from tests.test_httpproxy_states import GET, Proxy

SPOOFED = {"X_Real_IP": "203.0.113.66", "X_Forwarded_Host": "evil.example", "X-Kept": "yes"}


def _httpUrl(lbws):
    return lbws.url.replace("ws://", "http://")


def _get(url, headers):
    with httpx.Client(timeout=10) as client:
        return client.get(url, headers=headers)


@pytest.mark.parametrize("mode", ["drop", "pass", None])
@pytest_twisted.ensureDeferred
async def test_header_names_with_underscores_are_dropped_by_default(harness, mode):
    """
    WSGI and CGI servers read X_Real_IP as HTTP_X_REAL_IP, the name of the
    X-Real-IP lbws sets: by default such names never reach the backend.
    """
    backend = await _httpBackend(harness)
    raw = await wire.rawBackend(harness)
    settings = f"underscores_in_headers = {mode}" if mode else ""
    lbws = await harness.lbws([("a", backend.url)], lbws=settings)
    response = await threads.deferToThread(_get, _httpUrl(lbws) + "/echo", SPOOFED)
    assert response.status_code == 200
    headers = response.json()["headers"]
    passed = mode == "pass"
    assert ("x_real_ip" in headers, "x_forwarded_host" in headers) == (passed, passed)
    assert headers["x-real-ip"] == ["127.0.0.1"]
    assert headers["x-kept"] == ["yes"]
    # The WebSocket handshake the same way.
    socketLbws = await harness.lbws([("ws", raw.url)], lbws=settings, health="interval = 60")
    extra = "".join(f"{name}: {value}\r\n" for name, value in SPOOFED.items())
    got = dict(fields(await backendHead(harness, socketLbws, raw, handshakeRequest(extra=extra))))
    assert (b"x_real_ip" in got, b"x_forwarded_host" in got) == (passed, passed)
    assert got[b"x-real-ip"] == b"127.0.0.1"
    assert got[b"x-kept"] == b"yes"


@pytest_twisted.ensureDeferred
async def test_a_route_overrides_underscores_in_headers(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws(
        [("a", backend.url)],
        routes="""
        [route:legacy]
        path = /legacy
        underscores_in_headers = pass
        backends = a
        [route:rest]
        backends = a
        """,
    )
    legacy = await threads.deferToThread(_get, _httpUrl(lbws) + "/legacy", SPOOFED)
    rest = await threads.deferToThread(_get, _httpUrl(lbws) + "/rest", SPOOFED)
    assert "x_real_ip" in legacy.json()["headers"]
    assert "x_real_ip" not in rest.json()["headers"]


async def _heldRequest(lbws):
    """
    A raw keep-alive connection that made one GET: its status line.
    """
    client = await wire.rawConnect(lbws.url)
    client.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: b"\r\n\r\n" in client.received)
    return client, client.received.split(b"\r\n", 1)[0]


@pytest_twisted.ensureDeferred
async def test_plain_http_connections_count_towards_max_connections_per_ip(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], lbws="max_connections_per_ip = 2")
    first, status = await _heldRequest(lbws)
    assert status == b"HTTP/1.1 200 OK"
    second, status = await _heldRequest(lbws)
    assert status == b"HTTP/1.1 200 OK"
    third, status = await _heldRequest(lbws)
    assert status == b"HTTP/1.1 503 Service Unavailable", status
    third.transport.loseConnection()
    await third.closed.addTimeout(5, reactor)
    # A WebSocket from the same address counts with them.
    raw = await wire.rawConnect(lbws.url)
    raw.send(handshakeRequest())
    response = await raw.response.addTimeout(10, reactor)
    assert response.startswith("HTTP/1.1 503 "), response
    assert lbws.counters.handshakes["over_ip_limit"] == 1
    # A place freed is taken again; every exit path gave its place back.
    first.transport.loseConnection()
    await first.closed.addTimeout(5, reactor)
    await eventually(lambda: lbws.relay.httpPerPeer == {"127.0.0.1": 1})
    again, status = await _heldRequest(lbws)
    assert status == b"HTTP/1.1 200 OK"
    for client in (second, again):
        client.transport.loseConnection()
        await client.closed.addTimeout(5, reactor)
    await eventually(lambda: lbws.relay.httpPerPeer == {} and not lbws.relay.http)


async def _curl(*args):
    out, err, code = await utils.getProcessOutputAndValue(
        "curl", ["-s", "-w", "\n%{http_code}", *args], env=os.environ
    )
    assert code == 0, err
    body, _, status = out.decode().rpartition("\n")
    return int(status), body


ROUTES = """
[route:a]
host = a.example
backends = a
[route:b]
host = b.example
backends = b
"""


@pytest_twisted.ensureDeferred
async def test_absolute_form_routes_on_its_authority(harness):
    """
    RFC 9112 3.2.2: the authority of GET http://b.example/... replaces the
    Host (a.example here) for routing and for the Host the backend gets,
    which gets origin-form. curl sends absolute-form through a proxy.
    """
    a, b = await _httpBackend(harness, "a"), await _httpBackend(harness, "b")
    lbws = await harness.lbws(
        [("a", a.url + "/app"), ("b", b.url + "/app")], routes=ROUTES
    )
    status, body = await _curl(
        "-x", _httpUrl(lbws), "-H", "Host: a.example", "http://b.example/echo?x=1"
    )
    assert status == 200, body
    seen = json.loads(body)
    assert (seen["backend"], seen["uri"]) == ("b", "/app/echo?x=1")
    assert seen["headers"]["host"] == ["b.example"]
    assert seen["headers"]["x-forwarded-host"] == ["b.example"]
    # An authority with userinfo, or no valid host, is a 400.
    for target in (b"http://user@b.example/echo", b"http:///echo"):
        client = await wire.rawConnect(lbws.url)
        client.send(b"GET " + target + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
        answer = await client.closed.addTimeout(10, reactor)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert len(a.requests) == 0 and len(b.requests) == 1


@pytest_twisted.ensureDeferred
async def test_absolute_form_websocket_handshake_routes_on_its_authority(harness):
    a, b = await wire.rawBackend(harness, "/app"), await wire.rawBackend(harness, "/app")
    lbws = await harness.lbws(
        [("a", a.url), ("b", b.url)], routes=ROUTES, health="interval = 60"
    )
    head = await backendHead(
        harness, lbws, b, handshakeRequest("ws://b.example/chat?x=1", host="a.example")
    )
    assert head.startswith(b"GET /app/chat?x=1 HTTP/1.1\r\n"), head
    got = dict(fields(head))
    assert (got[b"host"], got[b"x-forwarded-host"]) == (b"b.example", b"b.example")
    assert not [c for c in a.connections if c.head]
    client = await wire.rawConnect(lbws.url)
    client.send(handshakeRequest("ws://user@b.example/", host="a.example"))
    response = await client.response.addTimeout(10, reactor)
    assert response.startswith("HTTP/1.1 400 "), response
    await client.closed.addTimeout(10, reactor)


# Units: the same rules without sockets.


def test_underscore_names_dropped_from_the_websocket_handshake_headers():
    request = SimpleNamespace(
        headers={"x_real_ip": "6.6.6.6", "x-a_b": "1", "x-ok": "2", "host": "h"}
    )
    headers, _, _ = forwardedHeaders(request, "10.0.0.9", False)
    assert {k: v for k, v in headers.items() if k.startswith("x")} == {"x-ok": "2"}
    assert headers["X-Real-IP"] == "10.0.0.9"
    headers, _, _ = forwardedHeaders(request, "10.0.0.9", False, "pass")
    assert headers["x_real_ip"] == "6.6.6.6" and headers["x-a_b"] == "1"
    assert underscoreDropped("x_y", "drop") and not underscoreDropped("x_y", "pass")
    assert not underscoreDropped("x-y", "drop")


def test_http_connections_over_the_per_ip_limit_get_503_and_earlier_ones_keep_working():
    proxy = Proxy("max_connections_per_ip = 1\nhttp_keepalive = 0")  # a backend connection per request
    relay = proxy.relay
    proxy.send(GET)
    [peer] = relay.httpPerPeer
    other = relay.factory().buildProtocol(None)
    otherClient = StringTransport()
    other.makeConnection(otherClient)
    other.dataReceived(GET)
    assert otherClient.value().startswith(b"HTTP/1.1 503 "), otherClient.value()
    assert b"too many connections from your address" in otherClient.value()
    # The first connection's next request is still served.
    transport, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    proxy.send(GET)
    assert len(proxy.reactor.tcpClients) == 2
    assert relay.httpPerPeer == {peer: 1} and len(relay.httpOverLimit) == 1
    other.connectionLost(Failure(ConnectionDone()))
    assert relay.httpPerPeer == {peer: 1} and not relay.httpOverLimit
    # A WebSocket from that address would be one too many as well.
    assert relay._refusal(SimpleNamespace(peer=peer)) is not None
    proxy.protocol.connectionLost(Failure(ConnectionDone()))
    assert relay.httpPerPeer == {} and not relay.http
    assert relay._refusal(SimpleNamespace(peer=peer)) is None


class _Front:
    peer = "192.0.2.1"


def test_http_connection_counts_end_once():
    relay = Proxy().relay
    front = _Front()
    relay.httpStarted(front)
    relay.httpStarted(_Front())
    relay.httpEnded(front)
    relay.httpEnded(front)
    assert relay.httpPerPeer == {"192.0.2.1": 1} and len(relay.http) == 1


def test_underscores_in_headers_is_checked_and_routes_inherit_it():
    settings = parseConfig(
        support.configText(
            [("a", "ws://127.0.0.1:1")],
            lbws="underscores_in_headers = pass",
            routes="[route:r]\nbackends = a\n",
        )
    )
    assert (settings.underscores_in_headers, settings.routes[0].underscores_in_headers) == (
        "pass", "pass"
    )
    with pytest.raises(ConfigError) as raised:
        parseConfig(
            support.configText([("a", "ws://127.0.0.1:1")], routes="[route:r]\nbackends = a\nunderscores_in_headers = yes\n")
        )
    assert str(raised.value) == "<config>: [route:r] underscores_in_headers: 'yes' is not one of drop, pass"
