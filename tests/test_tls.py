"""
TLS both ways, with certificates made at test time (trustme): wss
termination on `listen = ssl:...` (TLS 1.2 and later only), and wss://
backends verified against a per-backend CA (good name, wrong name, unknown
CA, the verify = false opt-out).
"""

import json
import os
import re
import signal

import pytest
import pytest_twisted
import trustme
from autobahn.twisted.websocket import WebSocketClientFactory
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from lbws.backends.backend import _tlsOptions
from lbws.config import ConfigError, parseConfig
from lbws.protocol.frames import OP_BINARY, OP_TEXT
from lbws.transport.listen import listenEndpoint, selectHttp11, serverTlsOf
from tests import wire
from tests.support import (
    Harness,
    EchoFactory,
    EchoServerProtocol,
    HandshakeFailed,
    RecordingClient,
    connect,
    eventually,
    AlpnRequired,
    handshakeRequest,
    tlsServerOptions,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """
    A test CA, a certificate it issued for localhost and 127.0.0.1, one for
    another name, and a CA nobody trusts.
    """
    where = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    files = {"dir": where, "ca": where / "ca.pem", "stranger": where / "stranger-ca.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    stranger.cert_pem.write_to_path(str(files["stranger"]))
    for name, issuer, identities in (
        ("server", ca, ("localhost", "127.0.0.1")),
        ("other", ca, ("other.example",)),
    ):
        cert = issuer.issue_cert(*identities)
        files[name + "-key"] = where / f"{name}-key.pem"
        files[name + "-cert"] = where / f"{name}-cert.pem"
        cert.private_key_pem.write_to_path(str(files[name + "-key"]))
        cert.cert_chain_pems[0].write_to_path(str(files[name + "-cert"]))
        files[name + "-pem"] = cert.private_key_and_cert_chain_pem.bytes()
    files["ca-pem"] = ca.cert_pem.bytes()
    return files


class TlsHarness(Harness):
    async def tlsBackend(self, pem):
        """
        An echo backend on wss://127.0.0.1:PORT with the given key and chain.
        """
        factory = EchoFactory("tls")
        options = tlsServerOptions(pem)
        port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(
            factory
        )
        self.atEnd(port.stopListening)
        factory.url = f"wss://127.0.0.1:{port.getHost().port}"
        return factory


@pytest_twisted.async_yield_fixture
async def harness():
    h = TlsHarness()
    yield h
    await h.close()


def portOf(service):
    return int(service.url.rsplit(":", 1)[1])


async def connectTls(harness, port, caPem, name="localhost", headers=None):
    """
    A real WebSocket client over TLS, verifying lbws's certificate.
    """
    factory = WebSocketClientFactory(
        f"wss://{name}:{port}/", headers=headers, reactor=reactor
    )
    factory.protocol = RecordingClient
    factory.opened = defer.Deferred()
    options = optionsForClientTLS(name, trustRoot=Certificate.loadPEM(caPem))
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5))
    await endpoint.connect(factory)
    client = await factory.opened.addTimeout(10, reactor)
    harness.clients.append(client)
    return client


def sslListen(pki):
    return (
        f"ssl:0:interface=127.0.0.1:privateKey={pki['server-key']}"
        f":certKey={pki['server-cert']}"
    )


# wss termination


@pytest_twisted.ensureDeferred
async def test_wss_termination_with_a_real_tls_websocket_client(harness, pki):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], listen=sslListen(pki))
    client = await connectTls(harness, portOf(lbws), pki["ca-pem"])
    tls = client.transport.getHandle()
    assert tls.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")
    client.sendMessage(b"over tls")
    assert await client.messages.get() == (b"over tls", False)
    client.sendMessage(b"__request__")
    payload, _ = await client.messages.get()
    headers = json.loads(payload)["headers"]
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    client.sendClose(1000)
    assert await client.closed == (1000, None)


@pytest_twisted.ensureDeferred
async def test_wss_client_frames_sent_with_its_handshake_wait_for_a_slow_backend(harness, pki):
    """
    A TLS client sends frames with its handshake, more than lbws reads
    ahead (it stops reading the TLS connection meanwhile), while its
    backend takes its time to answer: once the legs have taken over the
    TLS connection, every frame reaches the backend in order, and the
    frame the backend sent with its 101 reaches the client.
    """
    backend = await wire.rawBackend(harness)
    backend.answerAfter = 0.3
    backend.behind101 = wire.frame(OP_TEXT, b"hello", masked=False)
    lbws = await harness.lbws(
        [("raw", backend.url)], listen=sslListen(pki), health="interval = 60"
    )
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pki["ca-pem"]))
    endpoint = wrapClientTLS(
        options, TCP4ClientEndpoint(reactor, "127.0.0.1", portOf(lbws), timeout=5)
    )
    raw = await endpoint.connect(protocol.Factory.forProtocol(wire.RawWebSocket))
    frames = [wire.frame(OP_BINARY, bytes([i]) * 20000) for i in range(20)]
    raw.send(handshakeRequest() + b"".join(frames))
    assert (await raw.response.addTimeout(10, reactor)).startswith("HTTP/1.1 101 ")
    assert (await raw.nextFrame()).payload == b"hello"
    (connection,) = [c for c in backend.connections if c.head]
    await eventually(
        lambda: len(connection.received) >= len(connection.head) + sum(map(len, frames))
    )
    relayed, _ = wire.parseFrames(connection.received[len(connection.head) :])
    assert [f.payload for f in relayed] == [bytes([i]) * 20000 for i in range(20)]
    raw.transport.abortConnection()
    await eventually(
        lambda: (lbws.relay.clients, lbws.pool["raw"].active, lbws.relay.tunnels) == (0, 0, set())
    )


# ALPN: what browsers, curl and most TLS clients offer


def _alpnExchange(port, caFile, offer):
    """
    A WebSocket client over TLS offering C{offer} by ALPN (Python's ssl
    module, one blocking socket in this thread): what it negotiated, and
    the echo of one message through lbws.
    """
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(caFile))
    context.set_alpn_protocols(offer)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            negotiated = tls.selected_alpn_protocol()
            text = "over " + ",".join(offer)
            tls.sendall(handshakeRequest(host="localhost") + wire.frame(OP_TEXT, text.encode()))
            received = b""
            while b"\r\n\r\n" not in received or not wire.parseFrame(
                received.split(b"\r\n\r\n", 1)[1]
            ):
                chunk = tls.recv(65536)
                assert chunk, received
                received += chunk
            head, rest = received.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 101 "), head
            return negotiated, wire.parseFrame(rest)[0].payload.decode()


@pytest_twisted.ensureDeferred
async def test_alpn_clients_get_http_1_1_and_never_h2(harness, pki):
    """
    A client offering h2 and http/1.1, as browsers and curl do, gets
    http/1.1 (Twisted 26.10 alone fails it with alert 80); one offering
    only h2 gets no protocol and a TLS connection that speaks HTTP/1.1;
    each relays its message.
    """
    events = harness.logged()
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], listen=sslListen(pki))
    for offer, wanted in (
        (["h2", "http/1.1"], "http/1.1"),
        (["http/1.1"], "http/1.1"),
        (["h2"], None),
    ):
        negotiated, echo = await threads.deferToThread(
            _alpnExchange, portOf(lbws), pki["ca"], offer
        )
        assert (negotiated, echo) == (wanted, "over " + ",".join(offer))
    assert len(backend.connections) == 3
    assert not [e for e in events if e.get("log_level") == LogLevel.error]


def test_the_listener_chooses_http_1_1_or_nothing():
    assert selectHttp11(None, [b"h2", b"http/1.1"]) == b"http/1.1"
    assert selectHttp11(None, [b"http/1.1", b"h2"]) == b"http/1.1"
    assert selectHttp11(None, [b"h2"]) is SSL.NO_OVERLAPPING_PROTOCOLS
    assert selectHttp11(None, [b"spdy/3", b"http/1.0"]) is SSL.NO_OVERLAPPING_PROTOCOLS


def spkiHash(certFile):
    """
    What Chromium's --ignore-certificate-errors-spki-list takes for a
    certificate: the base64 SHA-256 of its public key.
    """
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certificate = x509.load_pem_x509_certificate(certFile.read_bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


# The browser app's page (no favicon to ask for).
PAGE = b'<!doctype html><title>chat</title><link rel="icon" href="data:,">'

# Run in the page: open a WebSocket, send a text and a binary message, read
# their echoes, then have the backend close with 4001 (first run) or close
# from the page with 4000 (second run); resolves with what the page saw.
WSS_PAGE_SCRIPT = """
const [url, closer, done] = arguments;
const ws = new WebSocket(url);
ws.binaryType = "arraybuffer";
const seen = {messages: [], errors: 0};
ws.onopen = () => {
  ws.send("text over wss");
  ws.send(new Uint8Array([0, 1, 2, 255]).buffer);
};
ws.onmessage = (e) => {
  seen.messages.push(typeof e.data === "string" ? e.data : Array.from(new Uint8Array(e.data)));
  if (seen.messages.length === 2) {
    if (closer === "backend") ws.send("__close 4001 done by the backend");
    else ws.close(4000, "done by the page");
  }
};
ws.onerror = () => { seen.errors += 1; };
ws.onclose = (e) => { seen.code = e.code; seen.reason = e.reason; seen.clean = e.wasClean; done(seen); };
"""


@pytest_twisted.ensureDeferred
async def test_wss_in_headless_chromium(harness, pki, tmp_path):
    """
    Chromium (which offers ALPN) loads a page over https:// through lbws
    and opens a wss:// WebSocket from it, as a browser app does: text and
    binary messages are relayed, and it gets the close codes and reasons of
    either side.
    """
    from autobahn.twisted.resource import WebSocketResource
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data

    from tests.test_dashboard import Browser, browserInstalled

    browserInstalled()
    events = harness.logged()
    backend = EchoFactory("app")
    # The backend answers a close with the same code and reason, so the
    # page sees its own close come back through lbws.
    backend.setProtocolOptions(echoCloseCodeReason=True)
    site = Resource()
    site.putChild(b"", Data(PAGE, "text/html; charset=utf-8"))
    site.putChild(b"chat", WebSocketResource(backend))
    port = await harness.listen(Site(site))
    lbws = await harness.lbws(
        [("app", f"ws://127.0.0.1:{port.getHost().port}")], listen=sslListen(pki)
    )
    origin = f"https://127.0.0.1:{portOf(lbws)}"
    browser = await threads.deferToThread(
        Browser,
        tmp_path / "chromium-profile",
        [f"--ignore-certificate-errors-spki-list={spkiHash(pki['server-cert'])}"],
    )
    try:
        await threads.deferToThread(browser.driver.set_script_timeout, 20)
        await threads.deferToThread(browser.driver.get, origin + "/")
        assert await threads.deferToThread(lambda: browser.driver.title) == "chat"
        url = f"wss://127.0.0.1:{portOf(lbws)}/chat"
        seen = await threads.deferToThread(
            browser.driver.execute_async_script, WSS_PAGE_SCRIPT, url, "backend"
        )
        assert seen == {
            "messages": ["text over wss", [0, 1, 2, 255]],
            "errors": 0,
            "code": 4001,
            "reason": "done by the backend",
            "clean": True,
        }
        seen = await threads.deferToThread(
            browser.driver.execute_async_script, WSS_PAGE_SCRIPT, url, "page"
        )
        assert seen["messages"] == ["text over wss", [0, 1, 2, 255]]
        assert (seen["code"], seen["reason"], seen["clean"]) == (4000, "done by the page", True)
        assert await threads.deferToThread(browser.problems) == []
    finally:
        await threads.deferToThread(browser.quit)
    await eventually(lambda: len(backend.closes) == 2)
    assert backend.closes[1] == (True, 4000, "done by the page")
    assert [c.request.headers["origin"] for c in backend.connections] == [origin, origin]
    assert not [e for e in events if e.get("log_level") == LogLevel.error]


@implementer(IOpenSSLClientConnectionCreator)
class PinnedVersions:
    """
    A TLS client offering only the versions from C{lowest} to C{highest},
    with OpenSSL's security level lowered so that it can offer TLS 1.0 and
    1.1 at all. It verifies nothing: only the version is under test.
    """

    def __init__(self, lowest, highest):
        self.context = SSL.Context(SSL.TLS_METHOD)
        self.context.set_min_proto_version(lowest)
        self.context.set_max_proto_version(highest)
        self.context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection


class FirstAnswer(protocol.Protocol):
    """
    Sends a WebSocket handshake; C{answer} fires with the first bytes back,
    or with C{[reason]} if the connection ended before any.
    """

    def connectionMade(self):
        self.answer = defer.Deferred()
        self.transport.write(handshakeRequest())

    def dataReceived(self, data):
        if not self.answer.called:
            self.answer.callback(data)
            self.transport.abortConnection()

    def connectionLost(self, reason):
        if not self.answer.called:
            self.answer.callback([reason])


async def tryVersions(port, lowest, highest):
    endpoint = wrapClientTLS(
        PinnedVersions(lowest, highest), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    )
    try:
        client = await endpoint.connect(protocol.Factory.forProtocol(FirstAnswer))
    except SSL.Error:
        return Failure()
    answer = await client.answer
    return answer if isinstance(answer, bytes) else answer[0]


@pytest_twisted.ensureDeferred
async def test_tls_below_1_2_is_refused(harness, pki):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], listen=sslListen(pki))
    port = portOf(lbws)
    for lowest, highest in (
        (SSL.TLS1_VERSION, SSL.TLS1_VERSION),
        (SSL.TLS1_1_VERSION, SSL.TLS1_1_VERSION),
        (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION),
    ):
        answer = await tryVersions(port, lowest, highest)
        assert not isinstance(answer, bytes), (lowest, highest, answer)
        assert answer.check(SSL.Error), answer
    for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
        answer = await tryVersions(port, version, version)
        assert isinstance(answer, bytes) and answer.startswith(b"HTTP/1.1 101 "), answer
    assert backend.connections  # the TLS 1.2 and 1.3 clients reached it


def tlsFlags(description):
    from OpenSSL.SSL import OP_NO_SSLv3, OP_NO_TLSv1, OP_NO_TLSv1_1

    (tls,) = serverTlsOf(listenEndpoint(None, description))
    options = tls.options
    wanted = OP_NO_SSLv3 | OP_NO_TLSv1 | OP_NO_TLSv1_1
    return options._options & wanted == wanted


def test_lbws_sets_the_tls_floor_itself(pki):
    """
    Whatever Twisted's default and the system's OpenSSL settings, the
    options lbws listens with turn off SSLv3, TLS 1.0 and 1.1, also where
    the string's sslmethod would have lifted Twisted's floor, and behind
    the PROXY protocol.
    """
    key, cert = pki["server-key"], pki["server-cert"]
    plain = f"ssl:0:privateKey={key}:certKey={cert}"
    assert tlsFlags(plain)
    assert tlsFlags(plain + ":sslmethod=TLS_METHOD")
    assert tlsFlags(plain + ":sslmethod=SSLv23_METHOD")
    assert tlsFlags(f"haproxy:ssl:0:privateKey={key}:certKey={cert}")


@pytest.mark.parametrize("method", ["TLSv1_METHOD", "TLSv1_1_METHOD", "TLSv1_2_METHOD"])
def test_sslmethod_pinning_a_version_is_refused(pki, method):
    text = (
        f"[lbws]\nlisten = ssl:8443:privateKey={pki['server-key']}"
        f":certKey={pki['server-cert']}:sslmethod={method}\n"
        "[backend:a]\nurl = ws://127.0.0.1:1\n"
    )
    with pytest.raises(ConfigError) as raised:
        parseConfig(text, "lbws.ini")
    assert (raised.value.section, raised.value.key) == ("lbws", "listen")
    assert "TLS 1.2 and later only" in str(raised.value)


# wss:// backends

FAST = "interval = 0.1\ntimeout = 1\nfall = 1\nrise = 1"
# No probe during the test: only real connections check the backend.
PASSIVE = "interval = 60\nfall = 1"


def lines(events, backend="a"):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("backend") == backend]


@pytest_twisted.ensureDeferred
async def test_backend_with_a_good_name_and_trusted_ca(harness, pki):
    backend = await harness.tlsBackend(pki["server-pem"])
    lbws = await harness.lbws(
        [("a", backend.url, f"ca = {pki['ca']}")], health=FAST, probe="websocket"
    )
    client = await _client(harness, lbws)
    client.sendMessage(b"to a wss backend")
    assert await client.messages.get() == (b"to a wss backend", False)
    await _until(lambda: lbws.pool["a"].checks["ok"] >= 2)
    assert lbws.pool["a"].state == "up" and lbws.pool["a"].failed == 0


class StrictEcho(AlpnRequired, EchoServerProtocol):
    pass


@pytest_twisted.ensureDeferred
async def test_wss_backend_that_requires_alpn(harness, pki):
    """
    A backend that serves only clients negotiating http/1.1 by ALPN (as
    some do) gets it from lbws's relayed connections and from its
    websocket and http probes alike.
    """
    strict = EchoFactory("strict")
    strict.protocol = StrictEcho
    strict.negotiated = []
    port = await harness.listen(
        strict,
        SSL4ServerEndpoint(
            reactor, 0, tlsServerOptions(pki["server-pem"]), interface="127.0.0.1"
        ),
    )
    url = f"wss://127.0.0.1:{port.getHost().port}"
    for probe in ("websocket", "http"):
        lbws = await harness.lbws([("a", url, f"ca = {pki['ca']}")], health=FAST, probe=probe)
        await _until(lambda: lbws.pool["a"].checks["ok"] + lbws.pool["a"].checks["failed"] >= 2)
        assert lbws.pool["a"].checks["failed"] == 0, lbws.pool["a"].lastError
    client = await _client(harness, lbws)
    client.sendMessage(b"to a backend that requires ALPN")
    assert await client.messages.get() == (b"to a backend that requires ALPN", False)
    assert len(strict.connections) >= 3  # two websocket probes, one client
    assert set(strict.negotiated) == {b"http/1.1"}


async def _client(harness, lbws):
    client = await connect(lbws.url)
    harness.clients.append(client)
    return client


async def _until(predicate):
    await eventually(predicate)


async def refusedEverywhere(harness, pki, extra, words):
    """
    A backend lbws must not trust: a client is refused (502) with a log
    line saying why, the failed connect counts as a failed check
    (passive), and so do the health probes (active).
    """
    events = harness.logged()
    backend = await harness.tlsBackend(pki[extra.pop(0)])
    passive = await harness.lbws([("a", backend.url, *extra)], health=PASSIVE, probe="websocket")
    with pytest.raises(HandshakeFailed) as refused:
        await _client(harness, passive)
    assert refused.value.status == 502
    member = passive.pool["a"]
    assert member.failed == 1 and member.state == "down"
    assert words in member.lastError, member.lastError
    logged = [line for line in lines(events) if "failed for" in line]
    assert len(logged) == 1 and words in logged[0], logged
    assert not backend.connections  # no WebSocket ever reached it

    active = await harness.lbws([("a", backend.url, *extra)], health=FAST, probe="websocket")
    await _until(lambda: active.pool["a"].checks["failed"] >= 1)
    assert active.pool["a"].state == "down"
    assert words in active.pool["a"].lastError, active.pool["a"].lastError
    checkLines = [line for line in lines(events) if "check" in line]
    assert any(words in line for line in checkLines), checkLines
    return member.lastError


@pytest_twisted.ensureDeferred
async def test_backend_with_a_wrong_name_is_refused(harness, pki):
    why = await refusedEverywhere(
        harness, pki, ["other-pem", f"ca = {pki['ca']}"], "127.0.0.1"
    )
    assert "other.example" in why


@pytest_twisted.ensureDeferred
async def test_backend_with_an_unknown_ca_is_refused(harness, pki):
    await refusedEverywhere(
        harness, pki, ["server-pem", f"ca = {pki['stranger']}"], "certificate verify failed"
    )


@pytest_twisted.ensureDeferred
async def test_verify_false_connects_and_warns_once_per_start_and_reload(harness, pki):
    """
    verify = false: connections and probes go through unverified, and the
    warning says so once when lbws starts and once per reload, not for
    each connection or probe (43,000 lines a day at the default interval).
    """
    events = harness.logged()
    backend = await harness.tlsBackend(pki["other-pem"])
    lbws = await harness.lbws(
        [("a", backend.url, "verify = false")], health=FAST, probe="websocket"
    )

    def warnings():
        return [
            e
            for e in events
            if "NOT verified" in str(e.get("log_format")) and e.get("backend") == "a"
        ]

    for i in range(3):
        client = await _client(harness, lbws)
        client.sendMessage(b"unverified %d" % i)
        assert await client.messages.get() == (b"unverified %d" % i, False)
    await _until(lambda: lbws.pool["a"].checks["ok"] >= 3)
    assert len(warnings()) == 1 and warnings()[0]["log_level"].name == "warn"
    lbws.apply(lbws.settings)  # what a reload of the same file does
    await _until(lambda: lbws.pool["a"].checks["ok"] >= 6)
    assert len(warnings()) == 2


def test_backend_tls_context_is_built_once_and_again_for_a_replaced_ca(pki, tmp_path):
    """
    Every connection and probe to a wss backend shares one TLS context;
    a CA file replaced on disk (say before a reload) is read again.
    """
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki["ca"].read_bytes())
    settings = parseConfig(f"[backend:a]\nurl = wss://127.0.0.1:1\nca = {ca}\n")
    (backend,) = settings.backends
    first = _tlsOptions(backend)
    assert _tlsOptions(backend) is first
    ca.write_bytes(pki["stranger"].read_bytes())
    os.utime(ca, ns=(0, ca.stat().st_mtime_ns + 1_000_000))
    assert _tlsOptions(backend) is not first


@implementer(IOpenSSLServerConnectionCreator)
class EmptyAlpnChoice:
    """
    A TLS server that answers any ALPN offer with an empty choice, as
    Twisted 26.10 does when its factory declares no protocol: OpenSSL fails
    the handshake with alert 80 (internal error).
    """

    def __init__(self, pem):
        self.context = tlsServerOptions(pem).getContext()
        self.context.set_alpn_select_callback(lambda connection, offered: b"")

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.context, None)


@pytest_twisted.ensureDeferred
async def test_backend_that_fails_the_alpn_offer_is_described(harness, pki):
    """
    A backend failing lbws's ALPN offer with alert 80 is refused with a
    reason that names the likely cause.
    """
    backend = EchoFactory("bare")
    port = await harness.listen(
        backend,
        SSL4ServerEndpoint(
            reactor, 0, EmptyAlpnChoice(pki["server-pem"]), interface="127.0.0.1"
        ),
    )
    url = f"wss://127.0.0.1:{port.getHost().port}"
    lbws = await harness.lbws([("a", url, f"ca = {pki['ca']}")], health=PASSIVE)
    with pytest.raises(HandshakeFailed) as refused:
        await _client(harness, lbws)
    assert refused.value.status == 502
    why = lbws.pool["a"].lastError
    assert "alert internal error" in why and "ALPN offer of http/1.1" in why, why
    assert not backend.connections


# TLS with workers, and a renewed certificate


def _issue(ca, where):
    """
    A certificate for localhost from C{ca}, written over the key and
    certificate files in C{where}, as certbot renews them; its serial.
    """
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(where / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(where / "cert.pem"))
    from cryptography import x509

    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.ensureDeferred
async def test_a_reload_serves_a_renewed_certificate_and_keeps_connections(
    harness, backend, tmp_path, workers
):
    """
    A twistd lbws terminating TLS (itself, or in each of its workers):
    after the certificate files are replaced and lbws gets SIGHUP, new
    clients get the new certificate, and the clients connected before keep
    relaying on the old one.
    """
    from tests.support import LbwsProcess, configText

    ca = trustme.CA()
    old = _issue(ca, tmp_path)
    config = tmp_path / "lbws.ini"
    config.write_text(
        configText(
            [("a", backend.url)],
            lbws=f"workers = {workers}\nping_interval = 0\ndrain_timeout = 5",
            listen=f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}"
            f":certKey={tmp_path / 'cert.pem'}",
        )
    )
    process = LbwsProcess(config)
    caPem = ca.cert_pem.bytes()

    async def client(text):
        client = await connectTls(harness, process.port, caPem)
        client.sendMessage(text.encode())
        assert await client.messages.get() == (text.encode(), False)
        return client, client.transport.getPeerCertificate().get_serial_number()

    try:
        before = [await client(f"before {i}") for i in range(4)]
        assert {serial for _, serial in before} == {old}
        new = _issue(ca, tmp_path)
        assert new != old
        process.signal(signal.SIGHUP)
        await process.waitForLine("reloaded")
        for i in range(4):
            after, serial = await client(f"after {i}")
            assert serial == new
            after.sendClose(1000)
            assert await after.closed == (1000, None)
        for i, (still, _) in enumerate(before):
            still.sendMessage(b"still %d" % i)
            assert await still.messages.get() == (b"still %d" % i, False)
            still.sendClose(1000)
            assert await still.closed == (1000, None)
    finally:
        process.stop()
    assert not [
        line for line in process.lines if "Traceback" in line or re.search(r"#(error|critical)\]", line)
    ]


# What bad clients of a TLS port cost the log


def test_client_tls_failures_are_logged_once_a_minute_with_their_reasons():
    from twisted.internet.task import Clock
    from twisted.logger import capturedLogs

    from lbws.transport.tlserrors import ClientTlsFailures

    clock = Clock()
    failures = ClientTlsFailures(clock)
    with capturedLogs() as logged:
        failures.note("wrong version number")
        clock.advance(10)
        failures.note("wrong version number")
        failures.note("no shared cipher")
        clock.advance(49.9)
        assert logged == []
        clock.advance(0.1)
        (line,) = logged
        assert line["log_level"] == LogLevel.info
        assert formatEvent(line) == (
            "3 client TLS handshake(s) failed in the last minute:"
            " no shared cipher (1); wrong version number (2)"
        )
        clock.advance(3600)  # quiet: nothing to say
        assert len(logged) == 1 and not clock.getDelayedCalls()
        failures.note("http request")
        clock.advance(60)
        assert len(logged) == 2 and "http request (1)" in formatEvent(logged[1])
    assert failures.totals == {"wrong version number": 2, "no shared cipher": 1, "http request": 1}

    # A worker's: counted for its parent, never logged by itself.
    worker = ClientTlsFailures(clock, log=False)
    with capturedLogs() as logged:
        worker.note("unexpected message")
        worker.note("unexpected message")
        worker.flush()
        assert not clock.getDelayedCalls()
        assert worker.take() == {"unexpected message": 2}
        assert worker.take() == {}
        failures.add({"unexpected message": 2})
        clock.advance(60)
    (line,) = logged
    assert "2 client TLS handshake(s)" in formatEvent(line)


async def plainAnswer(port, data):
    """
    What lbws answers C{data} sent in plain text to its TLS port, until it
    closes.
    """
    client = await wire.rawConnect(f"ws://127.0.0.1:{port}")
    client.send(data)
    return await client.closed.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_bad_tls_clients_get_no_error_lines_and_plain_http_gets_400(harness, pki):
    """
    Clients that fail their TLS handshake (TLS 1.0, garbage, plain HTTP)
    leave no error line: they are counted by reason and logged at info, in
    one line, never with OpenSSL's empty "(in )". Plain HTTP on the TLS port
    gets a 400 saying so, as nginx answers.
    """
    from lbws.transport.listen import PLAIN_HTTP_REFUSED

    events = harness.logged()
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], listen=sslListen(pki))
    port = portOf(lbws)
    for _ in range(2):
        assert await plainAnswer(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == PLAIN_HTTP_REFUSED
    for _ in range(3):
        answer = await tryVersions(port, SSL.TLS1_VERSION, SSL.TLS1_VERSION)
        assert not isinstance(answer, bytes)
    # A TLS record header followed by nonsense.
    assert not (await plainAnswer(port, b"\x16\x03\x01\x00\x05hello")).startswith(b"HTTP")
    client = await connectTls(harness, port, pki["ca-pem"])  # a good one still works
    client.sendMessage(b"fine")
    assert await client.messages.get() == (b"fine", False)

    assert lbws.view.clientTlsFailures() == {
        "plain HTTP request (answered 400)": 2,
        "unsupported protocol": 3,
        "unexpected message": 1,
    }
    text = [formatEvent(e) for e in events]
    assert not [e for e in events if e["log_level"] in (LogLevel.warn, LogLevel.error)], text
    assert not [line for line in text if "(in )" in line or "SSL error" in line], text
    lbws.relay.tlsFailures.flush()  # what the minute's end (or a stop) does
    logged = [formatEvent(e) for e in events if "client TLS handshake" in str(e.get("log_format"))]
    assert logged == [
        "6 client TLS handshake(s) failed in the last minute: plain HTTP request (answered 400)"
        " (2); unexpected message (1); unsupported protocol (3)"
    ]
