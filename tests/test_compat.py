"""
Every use lbws makes of Twisted's and Autobahn's internals (lbws/compat.py),
each checked against the installed versions: after an upgrade, a failure
here names the function whose assumption broke.
"""

import base64
import contextlib
import hashlib
import inspect
import pprint

import pytest
import pytest_twisted
import trustme
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    serverFromString,
    wrapClientTLS,
)
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport

from lbws import compat
from tests.support import handshakeRequest

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Transport(StringTransport):
    """
    A StringTransport that, like Twisted's TCP transport, lets Autobahn
    unregister a producer it never registered.
    """

    def unregisterProducer(self):
        self.producer = None


def serverProtocol(protocolClass=WebSocketServerProtocol):
    factory = WebSocketServerFactory(reactor=reactor)
    factory.protocol = protocolClass
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    proto.makeConnection(Transport())
    return proto


def clientProtocol(protocolClass=WebSocketClientProtocol):
    factory = WebSocketClientFactory("ws://127.0.0.1:9/", reactor=reactor)
    factory.protocol = protocolClass
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
    proto.makeConnection(Transport())
    return proto


def acceptFor(clientProto):
    """
    The 101 answer a server would give to C{clientProto}'s request.
    """
    request = clientProto.transport.value()
    key = [
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key:")
    ][0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
        b"Set-Cookie: a=1\r\n\r\n"
    )


# Twisted


def test_innerEndpoint():
    wrapped = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
    assert isinstance(compat.innerEndpoint(wrapped), TCP4ServerEndpoint)
    assert compat.innerEndpoint(TCP4ServerEndpoint(reactor, 0)) is None


@pytest.fixture
def certificates(tmp_path):
    ca = trustme.CA()
    files = {}
    for name in ("first.example", "second.example"):
        cert = ca.issue_cert(name)
        path = tmp_path / f"{name}.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(path))
        files[name] = path
    return ca, files


@pytest_twisted.ensureDeferred
async def test_tlsOptionsOf_and_replaceTlsOptions(certificates, tmp_path):
    ca, files = certificates
    first = files["first.example"]
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={first}:certKey={first}"
    )
    assert isinstance(endpoint, SSL4ServerEndpoint)
    assert compat.tlsOptionsOf(endpoint) is not None
    # Serve the second certificate instead: a client expecting its name
    # must get through.
    second = serverFromString(
        reactor,
        "ssl:0:privateKey={0}:certKey={0}".format(files["second.example"]),
    )
    compat.replaceTlsOptions(endpoint, compat.tlsOptionsOf(second))
    assert compat.tlsOptionsOf(endpoint) is compat.tlsOptionsOf(second)

    class Greet(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(b"hi")

    class Read(protocol.Protocol):
        def dataReceived(self, data):
            self.factory.got.callback(data)

    port = await endpoint.listen(protocol.Factory.forProtocol(Greet))
    try:
        trust = ca.cert_pem.bytes()
        from twisted.internet.ssl import Certificate

        options = optionsForClientTLS("second.example", Certificate.loadPEM(trust))
        client = wrapClientTLS(
            options, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        )
        factory = protocol.Factory.forProtocol(Read)
        factory.got = defer.Deferred()
        connection = await client.connect(factory)
        assert await factory.got.addTimeout(10, reactor) == b"hi"
        connection.transport.loseConnection()
    finally:
        await port.stopListening()


def test_tcpListenArguments(certificates):
    _, files = certificates
    first = files["first.example"]
    endpoint = serverFromString(
        reactor,
        f"ssl:8443:interface=127.0.0.2:backlog=77:privateKey={first}:certKey={first}",
    )
    assert compat.tcpListenArguments(endpoint) == (8443, 77, "127.0.0.2")
    default = serverFromString(reactor, f"ssl:port=8444:privateKey={first}")
    assert compat.tcpListenArguments(default) == (8444, 50, "")


@contextlib.asynccontextmanager
async def tcpPair():
    """
    A connected TCP pair on 127.0.0.1, C{(client, server)}: the client
    connected through an endpoint, the server accepted. The listening port
    is closed at the end.
    """
    accepted = defer.Deferred()

    class Accept(protocol.Protocol):
        def connectionMade(self):
            accepted.callback(self)

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Accept)
    )
    try:
        client = await TCP4ClientEndpoint(
            reactor, "127.0.0.1", port.getHost().port, timeout=5
        ).connect(protocol.Factory.forProtocol(protocol.Protocol))
        yield client, await accepted.addTimeout(10, reactor)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_hasQueuedWrites():
    async with tcpPair() as (client, server):
        transport = client.transport
        assert not compat.hasQueuedWrites(transport)
        transport.write(b"x" * 10)
        # Written but not handed to the kernel before the reactor's next
        # turn: that is what the relay's write-through must not overtake.
        assert compat.hasQueuedWrites(transport)
        got = defer.Deferred()
        server.dataReceived = lambda data: got.called or got.callback(data)
        await got.addTimeout(10, reactor)
        assert not compat.hasQueuedWrites(transport)
        transport.abortConnection()
        server.transport.abortConnection()


# Autobahn


def test_plainIoDispatch():
    from twisted.internet import epollreactor
    from twisted.python import log

    # The reactor looks the function up on twisted.python.log at each
    # event, so replacing it there reaches every read and write.
    assert "log.callWithLogger(selectable, _drdw, selectable, fd, event)" in inspect.getsource(
        epollreactor.EPollReactor.doPoll
    )
    saved = log.callWithLogger
    events = []
    log.addObserver(events.append)
    try:
        # (A service started by an earlier test may have installed it.)
        compat.plainIoDispatch()
        assert log.callWithLogger is compat._plainCallWithLogger

        class Selectable:
            def logPrefix(self):
                return "Leg,7,127.0.0.1"

        assert log.callWithLogger(Selectable(), lambda a, b=0: a + b, 1, b=2) == 3

        def broken():
            raise ValueError("bad read")

        # What escapes a handler is logged, with the transport's prefix,
        # and goes no further (the reactor goes on).
        assert log.callWithLogger(Selectable(), broken) is None
        [event] = [e for e in events if e.get("isError")]
        assert event["system"] == "Leg,7,127.0.0.1"
        assert event["failure"].check(ValueError)
    finally:
        log.removeObserver(events.append)
        log.callWithLogger = saved


def test_lazyAutobahnDebugFormatting():
    import autobahn.twisted.websocket as adapter
    import autobahn.util
    import autobahn.websocket.protocol as module

    # Autobahn still formats its options through the module's pformat when
    # a connection is made, and its debug lines through the modules'
    # hltype and hlval: those are the calls made lazy.
    assert "pformat(configAttrLog)" in inspect.getsource(
        module.WebSocketProtocol._connectionMade
    )
    assert "hltype(self._connectionMade)" in inspect.getsource(
        module.WebSocketClientProtocol._connectionMade
    )
    assert "hlval(self.peer)" in inspect.getsource(module.WebSocketProtocol.sendData)
    assert "hltype(self.connectionMade)" in inspect.getsource(
        adapter.WebSocketAdapterProtocol.connectionMade
    )
    saved = [(m, name, getattr(m, name)) for m in (module, adapter) for name in ("hltype", "hlval")]
    saved.append((module, "pformat", module.pformat))
    try:
        compat.lazyAutobahnDebugFormatting()
        value = module.pformat({"b": [1, 2], "a": "x"})
        assert str(value) == pprint.pformat({"b": [1, 2], "a": "x"})
        assert f"{value}" == str(value)
        for m in (module, adapter):
            assert str(m.hltype(test_lazyAutobahnDebugFormatting)) == autobahn.util.hltype(
                test_lazyAutobahnDebugFormatting
            )
            assert f"{m.hlval(7)}" == autobahn.util.hlval(7)
    finally:
        for m, name, original in saved:
            setattr(m, name, original)


class _Successor(protocol.Protocol):
    def __init__(self):
        self.received = []
        self.lost = []

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost.append(reason)


@pytest_twisted.ensureDeferred
async def test_handOver():
    """
    Over a real TCP connection, made through an endpoint (whose wrapping
    protocol stands between the transport and the protocol) and as a plain
    server protocol: after handOver, bytes and the end go to the
    successor.
    """
    async with tcpPair() as (client, server):
        # The endpoint's wrapper is the TCP transport's protocol.
        assert client.transport.protocol is not client
        pair = [_Successor(), _Successor()]
        compat.handOver(client, pair[0])
        compat.handOver(server, pair[1])
        assert client.transport.protocol is pair[0]
        got = defer.Deferred()
        pair[1].dataReceived = got.callback
        client.transport.write(b"to the server")
        assert await got.addTimeout(5, reactor) == b"to the server"
        ended = defer.Deferred()
        pair[0].connectionLost = lambda reason: ended.callback(reason.value)
        server.transport.loseConnection()
        assert isinstance(await ended.addTimeout(5, reactor), ConnectionDone)
        with pytest.raises(ValueError):
            compat.handOver(_stranger(), pair[0])


def _stranger():
    """
    A protocol whose transport belongs to another protocol.
    """
    proto = protocol.Protocol()
    proto.makeConnection(Transport())
    proto.transport.protocol = protocol.Protocol()
    return proto


def test_handOver_wrapped():
    """
    A wrapping protocol standing as the transport (TLS, the PROXY header's
    wrapper) delivers to the successor from then on.
    """
    from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

    inner = protocol.Protocol()
    wrapper = ProtocolWrapper(WrappingFactory(protocol.Factory()), inner)
    wrapper.makeConnection(Transport())
    assert inner.transport is wrapper
    successor = _Successor()
    compat.handOver(inner, successor)
    wrapper.dataReceived(b"bytes")
    assert successor.received == [b"bytes"]


def test_WriteThrough():
    import autobahn.websocket.protocol as module

    source = inspect.getsource(module.WebSocketProtocol.sendData)
    # The branch WriteThrough stands in for.
    assert "if sync or len(self.send_queue) > 0:" in source
    assert "self.transport.write(data)" in source
    assert "self.sendData(self.http_request_data)" in inspect.getsource(
        module.WebSocketClientProtocol._actuallyStartHandshake
    )

    written = []

    class Direct(compat.WriteThrough, WebSocketServerProtocol):
        pass

    proto = serverProtocol(Direct)
    proto.transport.write = written.append
    proto.dataReceived(handshakeRequest("/"))
    # The 101 went by the writer (a StringTransport's is its write).
    assert written and written[0].startswith(b"HTTP/1.1 101 ")

    class DirectClient(compat.WriteThrough, WebSocketClientProtocol):
        pass

    client = clientProtocol(DirectClient)
    assert client.transport.value() == client.http_request_data
    assert client.transport.value().startswith(b"GET / HTTP/1.1\r\n")


def test_received_and_requestTarget():
    proto = serverProtocol()
    head = handshakeRequest("/chat?room=1&x=%20y")
    proto.dataReceived(head[:20])
    assert compat.received(proto) == head[:20]
    assert compat.isConnecting(proto)
    proto.dataReceived(head[20:])
    assert compat.requestTarget(proto) == "/chat?room=1&x=%20y"


def test_takeReceived():
    taken = []

    class Early(WebSocketServerProtocol):
        def onOpen(self):
            taken.append(compat.takeReceived(self))

        def onMessage(self, payload, isBinary):
            taken.append(("parsed by Autobahn", payload))

    proto = serverProtocol(Early)
    frame = b"\x81\x85abcd" + bytes(a ^ b for a, b in zip(b"early", b"abcdabcd"))
    proto.dataReceived(handshakeRequest() + frame)
    assert taken == [frame]
    assert compat.received(proto) == b""
    assert not compat.isConnecting(proto)


def test_refuseHandshake_and_uncleanReason():
    proto = serverProtocol()
    proto.dataReceived(handshakeRequest()[:30])
    compat.refuseHandshake(proto, "Request Header Fields Too Large", 431)
    assert proto.transport.value().startswith(b"HTTP/1.1 431 ")
    assert compat.uncleanReason(proto) == "Request Header Fields Too Large"


def test_isClosing():
    proto = serverProtocol()
    proto.dataReceived(handshakeRequest())
    assert not compat.isConnecting(proto) and not compat.isClosing(proto)
    proto.sendClose(1000)
    assert compat.isClosing(proto)


def test_statusLine_and_responseHead():
    refused = clientProtocol()
    assert compat.statusLine(refused) is None
    refused.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert compat.statusLine(refused) == "HTTP/1.1 404 Not Found"

    accepted = clientProtocol()
    answer = acceptFor(accepted)
    accepted.dataReceived(answer)
    assert compat.statusLine(accepted) == "HTTP/1.1 101 Switching Protocols"
    assert compat.responseHead(accepted) == answer


def test_processHandshake_sees_the_whole_head_in_received():
    # lbws.backends.dial's BackendProtocol overrides processHandshake to read the
    # backend's status before Autobahn acts on it.
    seen = []

    class Watching(WebSocketClientProtocol):
        def processHandshake(self):
            seen.append(compat.received(self))
            return super().processHandshake()

    proto = clientProtocol(Watching)
    answer = acceptFor(proto)
    proto.dataReceived(answer[:10])
    proto.dataReceived(answer[10:])
    assert seen[-1] == answer


class _OctetClient(compat.OctetRequest, WebSocketClientProtocol):
    pass


def test_OctetRequest():
    """
    L{OctetRequest} relies on Autobahn's client writing its opening
    handshake from C{http_request_data}: values decoded as ISO-8859-1 go
    out as the bytes they came from.
    """
    factory = WebSocketClientFactory(
        "ws://backend.example:8010/x",
        headers={"x-bytes": "\xa0\xff\xe9\x85"},
        origin="https://\xe9.example",
        reactor=MemoryReactorClock(),
    )
    factory.protocol = _OctetClient
    client = factory.buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    sent = transport.value()
    assert b"x-bytes: \xa0\xff\xe9\x85\r\n" in sent
    assert b"Origin: https://\xe9.example\r\n" in sent


def test_replaceReceived_and_processReceived():
    # lbws.ws.server hands Autobahn a checked head in place of the raw one,
    # and the HTTP proxy hands a connection back to the handshake.
    connected = []

    class Holding(WebSocketServerProtocol):
        def processHandshake(self):
            if not connected and b"\r\n\r\n" in compat.received(self):
                connected.append("held")
                return
            return super().processHandshake()

        def onConnect(self, request):
            connected.append(request.path)

    proto = serverProtocol(Holding)
    proto.dataReceived(b"GET /raw HTTP/1.1\r\n\r\n")
    compat.replaceReceived(proto, handshakeRequest("/checked"))
    compat.processReceived(proto)
    assert connected == ["held", "/checked"]
    assert proto.transport.value().startswith(b"HTTP/1.1 101 ")


def test_answerRefusal():
    # lbws.ws.server overrides sendHttpErrorResponse, which Autobahn's
    # failHandshake ends in, to write a backend's refusal instead.
    answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno"

    class Refusing(WebSocketServerProtocol):
        def sendHttpErrorResponse(self, code, reason, responseHeaders=None):
            compat.answerRefusal(self, answer)

    proto = serverProtocol(Refusing)
    proto.dataReceived(handshakeRequest()[:30])
    compat.refuseHandshake(proto, "Unauthorized", 401)
    assert proto.transport.value() == answer


def test_setRequest():
    factory = WebSocketClientFactory("ws://127.0.0.1:9/", reactor=reactor)
    compat.setRequest(
        factory, "[::1]", "/app/x?y=1", ["v1"], {"X-A": "b"}, "agent/1", "http://o.example"
    )
    factory.protocol = WebSocketClientProtocol
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 9))
    proto.makeConnection(Transport())
    head = proto.transport.value()
    assert head.startswith(b"GET /app/x?y=1 HTTP/1.1\r\n")
    for line in (
        b"Host: [::1]:9",
        b"Sec-WebSocket-Protocol: v1",
        b"X-A: b",
        b"User-Agent: agent/1",
        b"Origin: http://o.example",
    ):
        assert line + b"\r\n" in head
    # What setSessionParameters sets, bar what comes of the URL.
    source = inspect.getsource(WebSocketClientFactory.setSessionParameters)
    for name in ("origin", "protocols", "useragent", "headers"):
        assert f"self.{name} = {name}" in source


def test_unparsedExtensions_and_UnparsedExtensions():
    # lbws's protocols put it in the place of Autobahn's private
    # _parseExtensionsHeader, which both of Autobahn's handshakes read
    # Sec-WebSocket-Extensions through: Autobahn then negotiates nothing.
    from autobahn.websocket.protocol import WebSocketProtocol

    assert callable(WebSocketProtocol._parseExtensionsHeader)

    class Offered(compat.UnparsedExtensions, WebSocketServerProtocol):
        pass



    factory = WebSocketServerFactory(reactor=reactor)
    factory.setProtocolOptions(
        openHandshakeTimeout=0,
        closeHandshakeTimeout=0,
        perMessageCompressionAccept=lambda offers: offers[0] if offers else None,
    )
    factory.protocol = Offered
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    proto.makeConnection(Transport())
    proto.dataReceived(handshakeRequest(extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"))
    answer = proto.transport.value()
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-extensions" not in answer.lower()


def test_autobahnReadableHead():
    """
    Autobahn's own parser, whichever reading of bytes 0x80-0xFF it has
    (split at 0x85 up to 26.10, refuse control bytes from 26.11), reads
    the copy lbws gives it as one header per line, with the same names as
    lbws's parse of the real head; a head without such bytes is passed as
    it is.
    """
    from autobahn.websocket.protocol import parseHttpHeader

    from lbws.protocol.headers import parseFields

    plain = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert compat.autobahnReadableHead(plain) is plain
    head = (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Note: hello\x85Authorization: forged\r\n"
        b"Cookie: name=\xc3\x85sa; city=\xd0\xa5\xd0\xbe\xd1\x80\r\n"
        b"Sec-WebSocket-Protocol: chat\x85\r\n\r\n"
    )
    readable = compat.autobahnReadableHead(head)
    assert len(readable) == len(head)
    _, headers, counts = parseHttpHeader(readable)
    assert sorted(headers) == sorted(
        parseFields(head)
    )
    assert "authorization" not in headers
    # Not a token any more: a subprotocol with such a byte is still refused.
    assert headers["sec-websocket-protocol"] == "chat?"


def test_quietHttpPool():
    """
    Twisted's HTTPConnectionPool keeps the factory class of its
    connections in _factory, and builds it with (quiescentCallback,
    metadata): the quiet one is that class, not noisy.
    """
    from twisted.internet.testing import MemoryReactor
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    pool = HTTPConnectionPool(MemoryReactor(), persistent=False)
    assert pool._factory is _HTTP11ClientFactory
    quiet = compat.quietHttpPool(pool)._factory
    assert issubclass(quiet, _HTTP11ClientFactory) and not quiet.noisy
    assert quiet(lambda protocol: None, "metadata").noisy is False


def test_failHandshakeQuietly():
    """
    Autobahn's failHandshake answers, keeps the reason and drops the
    connection, logging an info line and, from dropConnection, a warning
    (when the connection is not clean): the quiet one does the same
    without a line at warn.
    """
    from twisted.logger import LogLevel, globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto = serverProtocol()
        proto.dataReceived(handshakeRequest()[:30])
        compat.failHandshakeQuietly(proto, "Not Found: no route", 404)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert proto.transport.value().startswith(b"HTTP/1.1 404 ")
    assert compat.uncleanReason(proto) == "Not Found: no route"
    assert not proto.wasClean
    assert proto.transport.disconnecting
    assert [e for e in events if e["log_level"] >= LogLevel.info] == []

    loud = []
    globalLogPublisher.addObserver(loud.append)
    try:
        proto = serverProtocol()
        proto.dataReceived(handshakeRequest()[:30])
        proto.failHandshake("Not Found: no route", 404)
    finally:
        globalLogPublisher.removeObserver(loud.append)
    assert any(e["log_level"] == LogLevel.warn for e in loud)


def test_withHost():
    """
    Autobahn's client writes one "Host: host:port" line from its factory,
    after the request line (and User-Agent): with a hostHeader set by
    setRequest, OctetRequest sends the client's Host value there instead,
    once, byte for byte; without one, Autobahn's line stays.
    """
    factory = WebSocketClientFactory(
        "ws://10.0.0.5:8010/x", useragent="agent", reactor=MemoryReactorClock()
    )
    compat.setRequest(
        factory, "10.0.0.5", "/x", None, {"x-host": "Host: no"}, "agent", None,
        hostHeader="chat.example",
    )
    factory.protocol = _OctetClient
    client = factory.buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    sent = transport.value()
    assert sent.startswith(b"GET /x HTTP/1.1\r\nUser-Agent: agent\r\nHost: chat.example\r\n")
    assert sent.count(b"\r\nHost: ") == 1
    assert b"x-host: Host: no\r\n" in sent

    compat.setRequest(factory, "10.0.0.5", "/x", None, None, None, None)
    client = factory.buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    assert b"\r\nHost: 10.0.0.5:8010\r\n" in transport.value()


def test_copyFactory():
    """
    Autobahn's factories keep their state in the instance's __dict__ (no
    __slots__): the copy has the template's options and request, and a
    change to the copy leaves the template alone.
    """
    template = WebSocketClientFactory("ws://10.0.0.5:8010/", reactor=MemoryReactorClock())
    template.setProtocolOptions(failByDrop=False, openHandshakeTimeout=0)
    assert not hasattr(type(template), "__slots__") or "__dict__" in dir(template)
    copy = compat.copyFactory(template)
    assert type(copy) is type(template) and copy is not template
    assert vars(copy) == vars(template)
    assert (copy.failByDrop, copy.openHandshakeTimeout, copy.port) == (False, 0, 8010)
    copy.resource = "/other"
    assert template.resource == "/"


@pytest_twisted.ensureDeferred
async def test_isPlainTcp():
    """
    A TCP connection is twisted.internet.tcp.Connection, either end; a TLS
    protocol standing as a transport is not, nor is a test transport.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    async with tcpPair() as (client, server):
        assert compat.isPlainTcp(client.transport) and compat.isPlainTcp(server.transport)
        client.transport.abortConnection()
    wrapping = TLSMemoryBIOFactory(
        optionsForClientTLS("localhost"), True, protocol.Factory.forProtocol(protocol.Protocol)
    )
    assert not compat.isPlainTcp(wrapping.buildProtocol(None))
    assert not compat.isPlainTcp(StringTransport())
def test_wrapperFactoryOf():
    wrapped = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
    factory = protocol.Factory.forProtocol(protocol.Protocol)
    wrapper = compat.wrapperFactoryOf(wrapped)(factory)
    assert type(wrapper).__name__ == "HAProxyWrappingFactory"
    assert wrapper.wrappedFactory is factory


@pytest_twisted.ensureDeferred
async def test_leaveListeningSocket():
    """
    A port left this way stops listening in this process only: a copy of
    its socket (another process's) still accepts.
    """
    import os
    import socket

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(protocol.Protocol)
    )
    other = socket.socket(fileno=os.dup(port.fileno()))
    try:
        compat.leaveListeningSocket(port)
        await port.stopListening()
        other.settimeout(10)
        with socket.create_connection(other.getsockname(), timeout=10):
            accepted, _ = other.accept()
            accepted.close()
    finally:
        other.close()


@pytest_twisted.ensureDeferred
async def test_forgetConnection():
    """
    The connection goes on for whoever holds a copy of its socket: no FIN
    reaches the peer, and the protocol hears nothing.
    """
    import os
    import socket

    async with tcpPair() as (client, server):
        lost = []
        server.connectionLost = lost.append
        copy = socket.socket(fileno=os.dup(server.transport.fileno()))
        try:
            compat.forgetConnection(server.transport)
            assert not server.transport.connected
            copy.sendall(b"still here")
            received = defer.Deferred()
            client.dataReceived = received.callback
            assert await received.addTimeout(10, reactor) == b"still here"
            assert lost == []
        finally:
            copy.close()
