"""
TLS both ways, with certificates made at test time (trustme): wss
termination on `listen = ssl:...` (TLS 1.2 and later only), and wss://
backends verified against a per-backend CA (good name, wrong name, unknown
CA, the verify = false opt-out).
"""

import json
import os

import pytest
import pytest_twisted
import trustme
from autobahn.twisted.websocket import WebSocketClientFactory
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer

from lbws.backends.backend import _tlsOptions
from lbws.config import ConfigError, parseConfig
from lbws.protocol.frames import OP_BINARY, OP_TEXT
from lbws.transport.listen import listenEndpoint
from tests import wire
from tests.support import (
    Harness,
    EchoFactory,
    HandshakeFailed,
    RecordingClient,
    connect,
    eventually,
    handshakeRequest,
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
        options = PrivateCertificate.loadPEM(pem).options()
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

    endpoint = listenEndpoint(None, description)
    while not hasattr(endpoint, "_sslContextFactory"):
        endpoint = endpoint._wrappedEndpoint
    options = endpoint._sslContextFactory
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
async def test_verify_false_connects_and_warns(harness, pki):
    events = harness.logged()
    backend = await harness.tlsBackend(pki["other-pem"])
    lbws = await harness.lbws(
        [("a", backend.url, "verify = false")], health=PASSIVE, probe="websocket"
    )
    client = await _client(harness, lbws)
    client.sendMessage(b"unverified")
    assert await client.messages.get() == (b"unverified", False)
    warnings = [
        e for e in events if "NOT verified" in str(e.get("log_format")) and e.get("backend") == "a"
    ]
    assert warnings and all(e["log_level"].name == "warn" for e in warnings)


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
