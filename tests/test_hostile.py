"""
lbws against hostile clients, end to end: handshakes stuck in TLS, the
PROXY header or the HTTP head; request heads built to be split into extra
headers; targets that climb out of the backend's path prefix; cross-site
origins; and what a refused client and the log get to see.
"""

import re

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import LogLevel, formatEvent

from lbws.config import ConfigError, parseConfig
from tests import support, wire
from tests.support import LbwsProcess, configText, eventually, handshakeRequest
from tests.test_dashboard import get
from tests.test_tls import pki, portOf, sslListen  # noqa: F401 (pki is a fixture)

# handshake_timeout for the tests that wait for it.
TIMEOUT = 0.5


async def answer(url, request, timeout=5):
    """
    Send C{request} (bytes) on a new connection; the response head lbws
    sends back, and the raw client.
    """
    client = await wire.rawConnect(url)
    client.send(request)
    response = await client.response.addTimeout(timeout, reactor)
    return response, client


async def closedWithin(client, seconds):
    """
    What the client got before lbws closed its connection, which must
    happen within C{seconds}.
    """
    return await client.closed.addTimeout(seconds, reactor)


def statusLine(response):
    return response.split("\r\n", 1)[0]


# 1. Handshakes stuck below HTTP


@pytest_twisted.ensureDeferred
async def test_tls_connections_that_never_send_a_client_hello_are_closed(harness, pki):
    """
    With listen = ssl:..., TCP connections that send nothing, or only part
    of a ClientHello, are closed after handshake_timeout (they used to stay
    open for good: TLS waited for its handshake to send lbws's 408).
    """
    backend = await harness.backend()
    lbws = await harness.lbws(
        [("a", backend.url)], listen=sslListen(pki), lbws=f"handshake_timeout = {TIMEOUT}"
    )
    silent = [await wire.rawConnect(lbws.url) for _ in range(5)]
    partial = await wire.rawConnect(lbws.url)
    partial.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
    for client in silent + [partial]:
        assert await closedWithin(client, TIMEOUT + 3) == b""
    # lbws still serves wss clients.
    from tests.test_tls import connectTls

    client = await connectTls(harness, portOf(lbws), pki["ca-pem"])
    client.sendMessage(b"still here")
    assert (await client.messages.get().addTimeout(5, reactor))[0] == b"still here"


class TlsRawClient(wire.RawWebSocket):
    def connectionMade(self):
        super().connectionMade()
        self.factory.connected.callback(self)


@pytest_twisted.ensureDeferred
async def test_tls_client_with_a_half_sent_request_gets_408_and_is_closed(harness, pki):
    backend = await harness.backend()
    lbws = await harness.lbws(
        [("a", backend.url)], listen=sslListen(pki), lbws=f"handshake_timeout = {TIMEOUT}"
    )
    factory = protocol.Factory.forProtocol(TlsRawClient)
    factory.connected = defer.Deferred()
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pki["ca-pem"]))
    endpoint = wrapClientTLS(
        options, TCP4ClientEndpoint(reactor, "127.0.0.1", portOf(lbws), timeout=5)
    )
    await endpoint.connect(factory)
    client = await factory.connected
    client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
    received = await closedWithin(client, TIMEOUT + 3)
    assert received.startswith(b"HTTP/1.1 408 "), received


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_connections_stuck_before_their_header_are_closed(harness):
    backend = await harness.backend()
    lbws = await harness.lbws(
        [("a", backend.url)],
        listen="haproxy:tcp:0:interface=127.0.0.1",
        lbws=f"handshake_timeout = {TIMEOUT}",
    )
    silent = await wire.rawConnect(lbws.url)
    partial = await wire.rawConnect(lbws.url)
    partial.send(b"PROXY TCP4 203.0.113.9 ")
    for client in (silent, partial):
        assert await closedWithin(client, TIMEOUT + 3) == b""


@pytest_twisted.ensureDeferred
async def test_silent_plain_connection_is_closed(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws=f"handshake_timeout = {TIMEOUT}")
    client = await wire.rawConnect(lbws.url)
    assert await closedWithin(client, TIMEOUT + 3) == b""
    assert lbws.counters.handshakes["timeout"] == 1


# 2. Header splitting


def fields(head):
    """
    The header lines of a request head as (lower-case name, value bytes).
    """
    lines = head.split(b"\r\n")[1:-2]
    return [
        (name.strip().lower(), value.strip(b" \t"))
        for name, _, value in (line.partition(b":") for line in lines)
    ]


async def backendHead(harness, lbws, backend, request):
    """
    The head the backend got for C{request}, which must open.
    """
    before = len([c for c in backend.connections if c.head])
    response, client = await answer(lbws.url, request)
    assert statusLine(response).startswith("HTTP/1.1 101 "), response
    await eventually(lambda: len([c for c in backend.connections if c.head]) > before)
    client.sendClose(1000)
    await closedWithin(client, 5)
    return [c for c in backend.connections if c.head][before].head


@pytest_twisted.ensureDeferred
async def test_a_header_hidden_behind_0x85_stays_inside_its_value(harness):
    """
    Autobahn's parser splits lines at 0x85 (NEL): the value reaches the
    backend whole, and no Authorization header appears.
    """
    backend = await wire.rawBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], health="interval = 60")
    extra = b"X-Note: hello\x85Authorization: Bearer forged\r\nX-Bytes: \xa0\xff\xe9 \x85\r\n"
    head = await backendHead(harness, lbws, backend, handshakeRequest()[:-2] + extra + b"\r\n")
    got = dict(fields(head))
    assert b"authorization" not in got
    assert got[b"x-note"] == b"hello\x85Authorization: Bearer forged"
    # Bytes above 0x7F pass byte for byte (no UTF-8 re-encoding, no trimming).
    assert got[b"x-bytes"] == b"\xa0\xff\xe9 \x85"


@pytest_twisted.ensureDeferred
async def test_a_head_with_bare_lf_line_ends_opens(harness):
    backend = await wire.rawBackend(harness)
    lbws = await harness.lbws(
        [("a", backend.url)], health="interval = 60", lbws="handshake_timeout = 2"
    )
    # Every line ends with a bare LF; Autobahn alone would wait for CRLF CRLF.
    request = handshakeRequest(extra="X-Lf: yes\r\n").replace(b"\r\n", b"\n")
    head = await backendHead(harness, lbws, backend, request)
    assert dict(fields(head))[b"x-lf"] == b"yes"


BAD_HEADS = {
    "obs-fold": b"X-A: one\r\n two\r\n",
    "obs-fold with a colon": b"X-A: one\r\n\tAuthorization: forged\r\n",
    "no colon": b"X-A one\r\n",
    "space before the colon": b"Authorization : forged\r\n",
    "bare CR": b"X-A: one\rAuthorization: forged\r\n",
    "vertical tab": b"X-A: one\x0bAuthorization: forged\r\n",
    "form feed": b"X-A: one\x0cAuthorization: forged\r\n",
    "file separator": b"X-A: one\x1cAuthorization: forged\r\n",
    "NUL": b"X-A: one\x00two\r\n",
    "DEL": b"X-A: one\x7ftwo\r\n",
    "empty name": b": value\r\n",
    "separator in name": b"X(A): value\r\n",
}


@pytest.mark.parametrize("extra", BAD_HEADS.values(), ids=BAD_HEADS.keys())
@pytest_twisted.ensureDeferred
async def test_a_head_breaking_field_syntax_gets_400(harness, extra):
    backend = await wire.rawBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], health="interval = 60")
    request = handshakeRequest()[:-2] + extra + b"\r\n"
    response, client = await answer(lbws.url, request)
    assert statusLine(response).startswith("HTTP/1.1 400 Bad Request"), response
    await closedWithin(client, 5)
    assert not backend.connections


@pytest.mark.parametrize("offered", [b"chat\x85", b"chat, two words", b"a/b"])
@pytest_twisted.ensureDeferred
async def test_subprotocols_that_are_not_tokens_get_400(harness, offered):
    backend = await wire.rawBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], health="interval = 60")
    request = handshakeRequest()[:-2] + b"Sec-WebSocket-Protocol: " + offered + b"\r\n\r\n"
    response, client = await answer(lbws.url, request)
    assert statusLine(response).startswith("HTTP/1.1 400 Bad Request"), response
    await closedWithin(client, 5)
    assert not backend.connections


# 3. The backend's path prefix confines client targets

CONFINED = {
    "/../admin": b"/app/admin",
    "/%2e%2e/admin": b"/app/admin",
    "/%2E%2E/%2e%2E/admin?x=../..": b"/app/admin?x=../..",
    "/a/./b/../../../c/": b"/app/c/",
    "/chat?room=1&q=%2e%2e/": b"/app/chat?room=1&q=%2e%2e/",
    "http://internal.example/admin": b"/app/admin",
    "ws://internal.example": b"/app/",
}


@pytest_twisted.ensureDeferred
async def test_targets_stay_under_the_backend_path_prefix(harness):
    # With escaped_slashes = keep, which passes percent-encoded dot
    # segments on once resolved (by default they get 400, tests/test_paths.py).
    backend = await wire.rawBackend(harness, path="/app")
    lbws = await harness.lbws(
        [("a", backend.url)], health="interval = 60", lbws="escaped_slashes = keep"
    )
    for target, expected in CONFINED.items():
        head = await backendHead(harness, lbws, backend, handshakeRequest(path=target))
        assert head.split(b"\r\n", 1)[0] == b"GET " + expected + b" HTTP/1.1", target


@pytest.mark.parametrize("target", ["istrator/x", "*", "internal.example:443"])
@pytest_twisted.ensureDeferred
async def test_targets_not_starting_with_a_slash_get_400(harness, target):
    backend = await wire.rawBackend(harness, path="/app")
    lbws = await harness.lbws([("a", backend.url)], health="interval = 60")
    response, client = await answer(lbws.url, handshakeRequest(path=target))
    assert statusLine(response).startswith("HTTP/1.1 400 Bad Request"), response
    await closedWithin(client, 5)
    assert not backend.connections


# 7. allowed_origins

ORIGINS = "allowed_origins = https://app.example.com, http://localhost:8080 *.example.org"


@pytest_twisted.ensureDeferred
async def test_allowed_origins(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws=ORIGINS, health="interval = 60")
    for origin in (
        "https://app.example.com",
        "HTTPS://App.Example.COM:443",
        "http://localhost:8080",
        "https://chat.example.org",
        "http://a.b.example.org:8000",
        None,  # not a browser
    ):
        extra = f"Origin: {origin}\r\n" if origin else ""
        response, client = await answer(lbws.url, handshakeRequest(extra=extra))
        assert statusLine(response).startswith("HTTP/1.1 101 "), (origin, response)
        client.sendClose(1000)
        await closedWithin(client, 5)
    opened = len(backend.connections)
    for origin in (
        "https://evil.example",
        "http://app.example.com",  # another scheme
        "https://app.example.com:8443",  # another port
        "https://example.org",  # the pattern is for subdomains
        "https://app.example.com.evil.example",
    ):
        response, client = await answer(lbws.url, handshakeRequest(extra=f"Origin: {origin}\r\n"))
        assert statusLine(response).startswith("HTTP/1.1 403 "), (origin, response)
        await closedWithin(client, 5)
    assert len(backend.connections) == opened
    assert lbws.counters.handshakes["forbidden_origin"] == 5


@pytest.mark.parametrize(
    "value, words",
    [
        ("*", "'*' is not an origin"),
        ("https://app.example.com/path", "no path"),
        ("https://*.example.com", "is not an origin"),
        ("*.", "a pattern is *. and a domain"),
        ("ftp://files.example.com", "is not an origin"),
    ],
)
def test_allowed_origins_config_errors(value, words):
    text = configText([("a", "ws://127.0.0.1:1")], lbws=f"allowed_origins = {value}")
    with pytest.raises(ConfigError) as error:
        parseConfig(text, "lbws.ini")
    assert error.value.key == "allowed_origins"
    assert str(error.value).startswith("lbws.ini: [lbws] allowed_origins: ")
    assert words in str(error.value)


# 8. What reaches clients and logs


@pytest_twisted.ensureDeferred
async def test_502_says_bad_gateway_only(harness):
    events = harness.logged()
    lbws = await harness.lbws([("secret-backend", harness.deadUrl())], lbws="retries = 0")
    response, client = await answer(lbws.url, handshakeRequest())
    await closedWithin(client, 5)
    assert response == "HTTP/1.1 502 Bad Gateway\r\n\r\n"
    # The detail is in the log.
    logged = " ".join(formatEvent(e) for e in events)
    assert "backend secret-backend failed" in logged
    assert "refused" in logged


@pytest_twisted.ensureDeferred
async def test_500_says_internal_server_error_only(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])

    def broken(*args):
        raise RuntimeError("connect to db.internal.example:5432 failed")

    lbws.relay.openBackend = broken
    response, client = await answer(lbws.url, handshakeRequest())
    await closedWithin(client, 5)
    assert response == "HTTP/1.1 500 Internal Server Error\r\n\r\n"


class Silent(protocol.Protocol):
    """
    A backend that accepts TCP and never answers.
    """

    def connectionMade(self):
        self.factory.connected.append(self)


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_while_its_backend_is_dialled_is_one_info_line(harness):
    factory = protocol.Factory.forProtocol(Silent)
    factory.connected = []
    port = await harness.listen(factory)
    events = harness.logged()
    lbws = await harness.lbws(
        [("a", f"ws://127.0.0.1:{port.getHost().port}")], health="interval = 60"
    )
    for round in range(3):
        client = await wire.rawConnect(lbws.url)
        client.send(handshakeRequest())
        await eventually(lambda: len(factory.connected) > round)
        client.transport.abortConnection()
        await closedWithin(client, 5)
    await eventually(lambda: lbws.relay.clients == 0)
    assert [formatEvent(e) for e in events if e["log_level"] > LogLevel.info] == []
    about = [e for e in events if "left before its backend" in formatEvent(e)]
    assert len(about) == 3 and {e["log_level"] for e in about} == {LogLevel.info}


@pytest_twisted.ensureDeferred
async def test_escape_and_nul_from_the_target_never_reach_the_text_log(tmp_path, backend):
    config = tmp_path / "lbws.ini"
    config.write_text(configText([("a", backend.url)]))
    lbws = LbwsProcess(config)
    try:
        request = handshakeRequest(path="/x\x1b[2J\x1b]0;pwned\x07\x00y")
        response, client = await answer(lbws.url, request)
        if statusLine(response).startswith("HTTP/1.1 101"):
            client.sendClose(1000)
        await closedWithin(client, 5)
        await lbws.waitForLine(r"via a:| refused: ")
    finally:
        assert lbws.stop() == 0
    output = "".join(lbws.lines)
    assert statusLine(response).startswith("HTTP/1.1 400 "), response
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", output), output
    assert r"/x\x1b[2J\x1b]0;pwned\x07\x00y" in output


@pytest_twisted.ensureDeferred
async def test_client_close_codes_do_not_make_a_metric_series_each(harness):
    backend = await harness.backend()
    lbws = await harness.lbws(
        [("a", backend.url)], dashboard="tcp:0:interface=127.0.0.1", health="interval = 60"
    )
    codes = list(range(4000, 4040)) + list(range(3000, 3010)) + [1000]
    for code in codes:
        client = await harness.client(lbws.url)
        client.sendClose(code)
        await client.closed.addTimeout(5, reactor)
    await eventually(lambda: not lbws.relay.tunnels)
    metrics = (await get(lbws, "/metrics")).body.decode()
    series = sorted(
        line for line in metrics.splitlines() if line.startswith("lbws_closes_total{")
    )
    assert series == [
        'lbws_closes_total{code="1000",side="client"} 1.0',
        'lbws_closes_total{code="3xxx",side="client"} 10.0',
        'lbws_closes_total{code="4xxx",side="client"} 40.0',
    ]
    # The counters themselves keep each code (bounded: lbws only lets valid
    # close codes through).
    assert lbws.counters.closes[("client", 4001)] == 1
