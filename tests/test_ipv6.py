"""
IPv6 and URL edge cases: backends at IPv6 literals (ws:// and wss://)
relay and pass every probe, IPv6 clients are named in X-Forwarded-For, a
failure while opening a backend is a 502 with one log line and leaks no
count, what config cannot connect to is refused there, and every URL config
accepts reaches the connection attempt unchanged.
"""

import json
import os

import pytest
import pytest_twisted
import trustme
from autobahn.twisted.websocket import WebSocketClientFactory
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP6ClientEndpoint, TCP6ServerEndpoint
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import directlyProvides, implementer, providedBy

from lbws.backends.backend import Attempt
from lbws.config import ConfigError, parseConfig
from lbws.backends.dial import RelayProtocol
from tests.support import (
    EchoFactory,
    HandshakeFailed,
    RecordingClient,
    connect,
    eventually,
    tlsServerOptions,
)


async def backendOn6(harness, name="six", factory=None):
    """
    An echo backend listening on ::1 only.
    """
    factory = factory or EchoFactory(name)
    port = await harness.listen(factory, TCP6ServerEndpoint(reactor, 0, interface="::1"))
    factory.port = port.getHost().port
    return factory


async def request(client):
    client.sendMessage(b"__request__")
    payload, _ = await client.messages.get()
    return json.loads(payload)


PROBED = "interval = 0.1\ntimeout = 1\nrise = 1\nfall = 1\npath = /health"


class HealthPage(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"ok"


@pytest.mark.parametrize("probe", ["tcp", "websocket", "http"])
@pytest_twisted.ensureDeferred
async def test_an_ipv6_literal_backend_relays_and_passes_its_probes(harness, probe):
    if probe == "http":
        # The http probe wants a plain web page; the relay a WebSocket.
        page = await harness.listen(Site(HealthPage()), TCP6ServerEndpoint(reactor, 0, interface="::1"))
        web = page.getHost().port
    backend = await backendOn6(harness)
    port = web if probe == "http" else backend.port
    checked = await harness.lbws(
        [("six", f"ws://[::1]:{port}/app")], health=PROBED, probe=probe
    )
    member = checked.pool["six"]
    await eventually(lambda: member.checks["ok"] >= 2)
    assert member.state == "up" and member.checks["failed"] == 0, member.lastError

    # The backend's own address as Host, with its brackets.
    lbws = await harness.lbws(
        [("six", f"ws://[::1]:{backend.port}/app")], probe=probe, lbws="host_header = backend"
    )
    client = await harness.client(lbws.url, path="/chat?room=1")
    seen = await request(client)
    assert seen["path"] == "/app/chat" and seen["params"] == {"room": ["1"]}
    assert seen["headers"]["host"] == f"[::1]:{backend.port}"
    client.sendClose(1000)
    await client.closed
    await eventually(lambda: lbws.pool["six"].active == 0)
    assert lbws.pool["six"].total == 1 and lbws.pool["six"].failed == 0


@pytest_twisted.ensureDeferred
async def test_a_wss_backend_at_an_ipv6_literal_is_verified_by_its_address(harness, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("::1")
    caFile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(caFile))
    factory = EchoFactory("tls6")
    options = tlsServerOptions(cert.private_key_and_cert_chain_pem.bytes())
    port = await harness.listen(factory, SSL4ServerEndpoint(reactor, 0, options, interface="::1"))
    url = f"wss://[::1]:{port.getHost().port}/app"
    lbws = await harness.lbws(
        [("tls6", url, f"ca = {caFile}")], health=PROBED.replace("/health", "/"), probe="websocket"
    )
    await eventually(lambda: lbws.pool["tls6"].checks["ok"] >= 2)
    client = await harness.client(lbws.url, path="/x")
    assert (await request(client))["path"] == "/app/x"


@pytest_twisted.ensureDeferred
async def test_ipv6_clients_are_named_in_x_forwarded_for(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], listen=r"tcp6:0:interface=\:\:1")
    port = (await lbws.listener.whenListening()).getHost().port
    factory = WebSocketClientFactory(f"ws://[::1]:{port}/", reactor=reactor)
    factory.protocol = RecordingClient
    factory.opened = defer.Deferred()
    await TCP6ClientEndpoint(reactor, "::1", port, timeout=5).connect(factory)
    client = await factory.opened.addTimeout(10, reactor)
    harness.clients.append(client)
    seen = await request(client)
    assert seen["headers"]["x-forwarded-for"] == "::1"
    assert seen["headers"]["x-real-ip"] == "::1"


@pytest_twisted.ensureDeferred
async def test_an_error_opening_a_backend_is_a_502_with_one_line_and_no_leaked_count(
    harness, tmp_path
):
    # The backend's CA file is gone after the config was checked: lbws
    # cannot build the TLS options for the connection.
    caFile = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(caFile))
    events = harness.logged()
    lbws = await harness.lbws(
        [("a", "wss://127.0.0.1:9/", f"ca = {caFile}")], lbws="retries = 0"
    )
    os.unlink(caFile)
    for _ in range(3):
        with pytest.raises(HandshakeFailed) as refused:
            await connect(lbws.url)
        assert refused.value.status == 502
    assert lbws.pool["a"].active == 0
    failures = [e for e in events if e.get("log_failure") is not None or "Unexpected exception" in formatEvent(e)]
    assert failures == []
    said = [formatEvent(e) for e in events if e.get("backend") == "a"]
    assert len(said) == 3 and all(
        line.startswith("opening backend a for 127.0.0.1 failed: FileNotFoundError")
        and "ca.pem" in line
        and "\n" not in line
        for line in said
    ), said
    # lbws's own failure: the backend is not blamed.
    assert lbws.pool["a"].failed == 0 and lbws.pool["a"].state == "up"


@pytest.mark.parametrize(
    "url, words",
    [
        ("ws://[fe80::1%eth0]:8010", "zone ids"),
        ("ws://[v1.fe]:8010", "is not an IPv6 address"),
        ("ws://h\u00f8st.example:8010", "ASCII (xn--) form"),
        ("ws://chat.example:0", "port 0"),
    ],
)
def test_urls_that_cannot_be_connected_to_are_refused_by_config(url, words):
    with pytest.raises(ConfigError) as refused:
        parseConfig(f"[backend:a]\nurl = {url}\n", "lbws.ini")
    error = refused.value
    assert (error.path, error.section, error.key) == ("lbws.ini", "backend:a", "url")
    assert words in str(error)


# Every URL config accepts reaches the connection attempt as it parsed.

_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
    st.lists(_label, min_size=1, max_size=4).map(".".join).filter(lambda h: not h.replace(".", "").isdigit()),
)
_segment = st.text(st.sampled_from("abcxyzABC019-._~!$&'()*+,;=:@%"), max_size=8).filter(
    lambda s: "%" not in s
)
_paths = st.lists(_segment, max_size=3).map(lambda parts: "".join("/" + p for p in parts))


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name):
        self.name = name

    def cancel(self):
        pass


@implementer(IHostnameResolver)
class _AnyName:
    """
    Resolves every name to 127.0.0.1, remembering what it was asked.
    """

    def __init__(self):
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append((hostName, portNumber))
        receiver.resolutionBegan(_Resolution(hostName))
        receiver.addressResolved(IPv4Address("TCP", "127.0.0.1", portNumber))
        receiver.resolutionComplete()
        return receiver


@settings(max_examples=200, deadline=None)
@given(
    scheme=st.sampled_from(["ws", "wss"]),
    host=_hosts,
    port=st.one_of(st.none(), st.integers(1, 65535)),
    path=_paths,
    target=st.sampled_from(["/", "/chat?room=1", "/a/b?x=%20y&z"]),
)
def test_backend_urls_round_trip_through_config_and_dial(scheme, host, port, path, target):
    url = f"{scheme}://{host}{'' if port is None else f':{port}'}{path}"
    try:
        backend = parseConfig(f"[backend:a]\nurl = {url}\n").backend("a")
    except ConfigError as refused:
        # Only a name that Twisted would not resolve either (IDNA 2008:
        # "--" as a label's third and fourth characters) is refused.
        assert "is not a valid host name" in str(refused)
        assert "--" in host
        return
    assert backend.port == (port or (443 if scheme == "wss" else 80))
    assert backend.path == path.rstrip("/")
    reactor = MemoryReactorClock()
    reactor.nameResolver = _AnyName()
    directlyProvides(reactor, IReactorPluggableNameResolver, *providedBy(reactor))
    attempt = Attempt(reactor, backend, backend.path + target, RelayProtocol, 5, 10)
    attempt.start()
    reactor.advance(0)
    bare = host.strip("[]")
    if host.startswith("[") or host.replace(".", "").isdigit():
        assert reactor.tcpClients[0][:2] == (bare, backend.port)
    else:
        assert reactor.nameResolver.asked == [(bare, backend.port)]
        assert reactor.tcpClients[0][1] == backend.port
    # What the backend is sent: the request line and the Host header.
    protocol = attempt._factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    head = transport.value().decode("utf-8").split("\r\n")
    assert head[0] == f"GET {path.rstrip('/')}{target} HTTP/1.1"
    assert f"Host: {host}:{backend.port}" in head
    attempt.result.addErrback(lambda f: None)
    attempt.result.cancel()
