"""
Faults, end to end: backends that die, hang or stall, clients that send
junk or break the protocol, and load (thousands of idle clients, a message
storm). Every fault hits one connection; a bystander on the same lbws shows
that the others go on.

Real sockets on 127.0.0.1 throughout; backends that must die are node `ws`
processes, lbws itself is a `twistd` process where its memory is measured.
The load tests are marked `slow` (run them with `pytest -m slow`).
"""

import base64
import hashlib
import json
import resource
import signal
import socket
import time

import psutil
import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IHostnameResolver
from zope.interface import implementer

from lbws.protocol.frames import OP_BINARY, OP_PING, OP_PONG, OP_TEXT
from tests import support, wire

# A short handshake_timeout keeps the timeout tests quick.
HANDSHAKE_TIMEOUT = 0.5


class FaultHarness(support.Harness):
    """
    The shared harness, plus node processes, fake backends and twistd
    processes. At the end lbws cuts its connections instead of draining
    them: some tests leave clients that would never answer a close.
    """

    async def echo(self, name="echo"):
        factory = await self.backend(name)
        self._cutAtEnd(factory)
        return factory

    def node(self, *args):
        backend = support.NodeBackend(*args)
        self.atEnd(backend.stop)
        return backend

    async def fake(self, protocolClass):
        """
        A backend speaking C{protocolClass} on a real socket.
        """
        factory = protocol.Factory.forProtocol(protocolClass)
        factory.connections = []
        port = await self.listen(factory)
        factory.url = f"ws://127.0.0.1:{port.getHost().port}"
        self._cutAtEnd(factory)
        return factory

    def lbwsProcess(self, config, *args, **kwargs):
        process = support.LbwsProcess(config, *args, **kwargs)
        self.atEnd(process.stop, first=True)
        return process

    def _cutAtEnd(self, factory):
        def cut():
            for connection in factory.connections:
                if connection.transport is not None and connection.transport.connected:
                    connection.transport.abortConnection()

        self.atEnd(cut)

    async def close(self):
        for service in self.services:
            if service.running:
                service.relay.abort()
        await super().close()


@pytest_twisted.async_yield_fixture
async def harness():
    h = FaultHarness()
    yield h
    await h.close()


async def echo(client, payload, timeout=5):
    client.sendMessage(payload)
    received, _ = await client.messages.get().addTimeout(timeout, reactor)
    return received


async def closeOf(client, timeout=5):
    return await client.closed.addTimeout(timeout, reactor)


# Backends that misbehave.


class Staller(protocol.Protocol):
    """
    Answers the opening handshake, then reads and ignores everything: no
    message, no pong, no close.
    """

    def connectionMade(self):
        self.factory.connections.append(self)
        self.buffer = b""
        self.open = False
        self.received = 0

    def dataReceived(self, data):
        if self.open:
            self.received += len(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        key = None
        for line in self.buffer.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        )
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        self.open = True


# Backends that die, hang or stall.


@pytest_twisted.ensureDeferred
async def test_backendKilledMidStream(harness, nodeBackend):
    """
    A backend process killed while its client is in the middle of a
    conversation: that client gets 1012 (which client libraries retry)
    with its reason at once, a client of another
    backend goes on talking throughout, and new clients go elsewhere.
    """
    doomed = harness.node("--prefix", "doomed:")
    lbws = await harness.lbws(
        [("doomed", doomed.url), ("other", nodeBackend.url)],
        lbws="balance = round_robin",
    )
    victim = await support.connect(lbws.url)
    bystander = await support.connect(lbws.url)
    assert await echo(victim, b"who") == b"doomed:who"
    assert await echo(bystander, b"who") == b"who"
    for i in range(20):
        assert await echo(victim, b"%d" % i) == b"doomed:%d" % i
        assert await echo(bystander, b"%d" % i) == b"%d" % i

    killed = time.monotonic()
    doomed.process.send_signal(signal.SIGKILL)
    # The bystander keeps talking while the victim's backend dies.
    for i in range(20):
        assert await echo(bystander, b"during %d" % i) == b"during %d" % i
    code, reason = await closeOf(victim, timeout=10)
    elapsed = time.monotonic() - killed
    assert (code, reason) == (1012, "backend connection lost")
    # Not at the next ping (30 s) or never: as soon as the socket closes.
    assert elapsed < 5, f"the client waited {elapsed:.2f}s for its close"

    # The dead backend is tried, refuses, and the client lands on the other.
    newcomer = await support.connect(lbws.url)
    assert await echo(newcomer, b"new") == b"new"
    assert await echo(bystander, b"after") == b"after"
    assert not bystander.closed.called


@pytest_twisted.ensureDeferred
async def test_backendNeverAnswersHandshakeThenRetry(harness):
    """
    A backend that accepts TCP and never answers the handshake costs the
    client handshake_timeout, then the next backend is tried.
    """
    silent = await harness.silent()
    good = await harness.echo("good")
    lbws = await harness.lbws(
        [("silent", silent.url), ("good", good.url)],
        lbws=f"balance = round_robin\nhandshake_timeout = {HANDSHAKE_TIMEOUT}\nretries = 1",
    )
    started = time.monotonic()
    client = await support.connect(lbws.url)
    elapsed = time.monotonic() - started
    assert await echo(client, b"made it") == b"made it"
    assert HANDSHAKE_TIMEOUT <= elapsed < HANDSHAKE_TIMEOUT + 2
    assert lbws.pool["silent"].failed == 1
    assert "timed out" in lbws.pool["silent"].lastError


@pytest_twisted.ensureDeferred
async def test_backendsNeverAnswerHandshakeGives502(harness):
    """
    When every backend tried hangs, the client gets HTTP 502 (a WebSocket
    client is refused with 502 or 503 only, README "When no backend
    answers") once each has had handshake_timeout, never a hang.
    """
    one = await harness.silent()
    two = await harness.silent()
    lbws = await harness.lbws(
        [("one", one.url), ("two", two.url)],
        lbws=f"handshake_timeout = {HANDSHAKE_TIMEOUT}\nretries = 1",
    )
    bystanderBackend = await harness.echo()
    started = time.monotonic()
    with pytest.raises(support.HandshakeFailed) as failed:
        await support.connect(lbws.url)
    elapsed = time.monotonic() - started
    assert failed.value.status == 502
    assert 2 * HANDSHAKE_TIMEOUT <= elapsed < 2 * HANDSHAKE_TIMEOUT + 2
    assert len(one.connections) >= 1 and len(two.connections) >= 1
    assert bystanderBackend.connections == []


@pytest_twisted.ensureDeferred
async def test_backendStallsAfterHandshakeIdleTimeout(harness):
    """
    A backend that opens the WebSocket and then never answers: with
    idle_timeout the client is closed with 1001 after that long, while a
    client of a live backend that keeps talking is not.
    """
    staller = await harness.fake(Staller)
    good = await harness.echo("good")
    lbws = await harness.lbws(
        [("staller", staller.url), ("good", good.url)],
        lbws="balance = round_robin\nidle_timeout = 0.5\nping_interval = 0",
    )
    stuck = await support.connect(lbws.url)
    bystander = await support.connect(lbws.url)
    stuck.sendMessage(b"anyone?")
    opened = time.monotonic()
    closed = stuck.closed.addTimeout(5, reactor)
    # The bystander talks back to back until the stuck client is closed.
    chatter = Chatter(bystander)
    code, reason = await closed
    elapsed = time.monotonic() - opened
    assert await chatter.stop() > 0
    assert (code, reason) == (1001, "idle timeout")
    assert 0.5 <= elapsed < 2.5
    assert staller.connections[0].received > 0  # it got the message
    assert await echo(bystander, b"still") == b"still"
    assert not bystander.closed.called


@pytest_twisted.ensureDeferred
async def test_clientNeverAnsweringPingsIsDropped(harness):
    """
    With ping_interval, a client that never answers lbws's ping is dropped
    at the next ping; a client that answers stays.
    """
    backend = await harness.echo()
    lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0.3")
    opened = time.monotonic()
    deaf = await wire.rawOpen(lbws.url)
    answering = await support.connect(lbws.url)
    frame = await deaf.nextFrame()
    assert frame.opcode == OP_PING
    await deaf.closed.addTimeout(5, reactor)
    elapsed = time.monotonic() - opened
    assert 0.6 <= elapsed < 3
    assert await echo(answering, b"still here") == b"still here"
    assert not answering.closed.called
    # Its backend leg was closed cleanly on its behalf.
    assert (True, 1001, "client went away") in backend.closes


# Stopping while connections are in awkward states.


class HeldHandshake(protocol.Protocol):
    """
    A backend that reads the opening handshake and answers it only when
    the test calls L{release}.
    """

    def connectionMade(self):
        self.factory.connections.append(self)
        self.buffer = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.buffer += data

    def connectionLost(self, reason):
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_stopWhileClientHandshakeWaitsForBackend(harness):
    """
    A client whose handshake waits for its backend when lbws stops is not
    left hanging or dropped: it gets HTTP 503 at once, and its backend
    attempt is closed.
    """
    held = await harness.fake(HeldHandshake)
    lbws = await harness.lbws([("held", held.url)], lbws="drain_timeout = 30")
    client = defer.ensureDeferred(support.connect(lbws.url))
    await support.eventually(
        lambda: any(b"\r\n\r\n" in c.buffer for c in held.connections)
    )
    [attempt] = [c for c in held.connections if c.buffer]
    started = time.monotonic()
    stopped = defer.ensureDeferred(lbws.stopService())
    with pytest.raises(support.HandshakeFailed) as refused:
        await client.addTimeout(5, reactor)
    assert refused.value.status == 503
    await stopped.addTimeout(5, reactor)
    assert time.monotonic() - started < 2
    await attempt.lost.addTimeout(5, reactor)


def pendingConnects(harness):
    """
    A port on 127.0.0.1 whose connects stay pending: its listening socket's
    accept queue is full and never drained, so the kernel drops new SYNs.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())
    harness.atEnd(filler.close)
    harness.atEnd(listener.close)
    return listener.getsockname()[1]


class _Requester(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(support.handshakeRequest("/"))


async def leaveWhileOpening(lbws):
    """
    A client sends its handshake and leaves while lbws opens its backend;
    returns once lbws has let it go.
    """
    client = await TCP4ClientEndpoint(
        reactor, "127.0.0.1", int(lbws.url.rsplit(":", 1)[1]), timeout=5
    ).connect(protocol.Factory.forProtocol(_Requester))
    await support.eventually(lambda: lbws.relay.opening)
    client.transport.abortConnection()
    await support.eventually(lambda: not lbws.relay.opening and not lbws.relay.clients)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_clientLeavingDuringBackendConnectBlamesNoBackend(harness, host):
    """
    A client that leaves while lbws is still connecting to its backend
    (the reconnect storms of bench/README.md's S5 are full of them)
    cancels the connect, and that is not the backend's failure: with
    C{fall = 2}, two such clients once marked a healthy backend down. An
    IP address is connected to directly, a name through Twisted's
    endpoint.
    """
    port = pendingConnects(harness)
    lbws = await harness.lbws(
        [("slow", f"ws://{host}:{port}")],
        lbws="connect_timeout = 30\nretries = 0",
        health="interval = 60\ntimeout = 30\nfall = 2",
    )
    member = lbws.pool["slow"]
    for _ in range(3):
        await leaveWhileOpening(lbws)
    assert (member.state, member.consecutiveFailures, member.traffic.failed) == ("up", 0, 0)
    assert member.active == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_connectTimeoutGives502AndCountsAgainstTheBackend(harness, host):
    """
    A backend whose connect does not complete within C{connect_timeout}
    fails the client's handshake with 502 (a plain HTTP request gets 504,
    as nginx answers) and counts as the backend's
    failure, named or not. A name's endpoint, cut short by the timeout,
    fails with ConnectingCancelledError, which was taken for a client
    that left: the client waited for ever, its backend attempt open.
    """
    port = pendingConnects(harness)
    lbws = await harness.lbws(
        [("slow", f"ws://{host}:{port}")],
        lbws="connect_timeout = 0.5\nretries = 0",
        health="interval = 60\nfall = 2",
    )
    client = await wire.rawConnect(lbws.url)
    client.send(support.handshakeRequest("/"))
    response = await client.response.addTimeout(5, reactor)
    assert response.startswith("HTTP/1.1 502 ")
    member = lbws.pool["slow"]
    assert (member.consecutiveFailures, member.traffic.failed) == (1, 1)
    assert "connect timed out after 0.5s" in member.lastError
    await support.eventually(lambda: not lbws.relay.opening and member.active == 0)


@implementer(IHostnameResolver)
class _SlowResolver:
    """
    Resolves names as the system does, C{delay} seconds late: a slow DNS
    server.
    """

    def __init__(self, resolver, delay):
        self._resolver = resolver
        self._delay = delay

    def resolveHostName(self, receiver, hostName, *args, **kwargs):
        reactor.callLater(
            self._delay, self._resolver.resolveHostName, receiver, hostName, *args, **kwargs
        )


@pytest_twisted.ensureDeferred
async def test_clientLeavingWhileTheBackendNameResolvesBlamesNoBackend(harness):
    """
    A client that leaves while the name of its backend is still being
    resolved cancels the lookup, and that is not the backend's failure.
    Twisted's endpoint for a name reports a cancelled lookup as
    DNSLookupError: lbws counted it against the backend and, with another
    backend left to try, opened a WebSocket to that one for the client
    that was gone, which nobody ever closed.
    """
    resolver = reactor.installNameResolver(_SlowResolver(reactor.nameResolver, 0.3))
    harness.atEnd(lambda: reactor.installNameResolver(resolver))
    first, second = await harness.echo("first"), await harness.echo("second")
    lbws = await harness.lbws(
        [(f.name, f.url.replace("127.0.0.1", "localhost")) for f in (first, second)],
        lbws="retries = 1",
        health="interval = 60\nfall = 2",
    )
    await leaveWhileOpening(lbws)
    # Time for any lookup still under way to end.
    await support.deferLater(1)
    for member in lbws.pool:
        assert (member.state, member.consecutiveFailures, member.traffic.failed) == ("up", 0, 0)
        assert member.active == 0
    assert first.connections == second.connections == []


@pytest_twisted.ensureDeferred
async def test_stopWaitsNoLongerThanDrainTimeout(harness):
    """
    A client that never answers a close the backend started: stopping waits
    drain_timeout for it, not the longer time lbws otherwise gives a peer to
    answer a close.
    """
    backend = await harness.echo()
    lbws = await harness.lbws([("a", backend.url)], lbws="drain_timeout = 0.2")
    deaf = await wire.rawOpen(lbws.url)
    deaf.sendFrame(OP_TEXT, b"__close 1000 bye")
    assert (await deaf.closeFrame()).closeCode == 1000
    started = time.monotonic()
    await defer.ensureDeferred(lbws.stopService()).addTimeout(10, reactor)
    elapsed = time.monotonic() - started
    assert elapsed < 2, f"stopping took {elapsed:.1f}s with drain_timeout = 0.2"
    await deaf.closed.addTimeout(5, reactor)


# Clients that misbehave, each next to a bystander that keeps working.


async def junk(url):
    """
    Bytes that are not HTTP: HTTP 400 and the connection closed.
    """
    client = await wire.rawConnect(url)
    client.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 garbage \r\n\r\n")
    received = await client.closed.addTimeout(5, reactor)
    assert received.startswith(b"HTTP/1.1 400 "), received[:100]


async def junkFlood(url):
    """
    A megabyte of junk with no end of headers: refused at once (431),
    not buffered until handshake_timeout.
    """
    client = await wire.rawConnect(url)
    client.send(b"GET / HTTP/1.1\r\nX: " + b"a" * (1 << 20))
    received = await client.closed.addTimeout(5, reactor)
    # 408 would mean it was buffered until handshake_timeout.
    assert received.startswith(b"HTTP/1.1 431 "), received[:100]


@pytest_twisted.ensureDeferred
async def test_bigRequestHeadWithinLimit(harness):
    """
    The request head limit leaves room for big cookies and tokens: a 40 KiB
    header still opens the WebSocket.
    """
    backend = await harness.echo()
    lbws = await harness.lbws([("a", backend.url)])
    client = await support.connect(lbws.url, headers={"Cookie": "c=" + "x" * 40000})
    assert await echo(client, b"big") == b"big"
    assert len(backend.connections[0].request.headers["cookie"]) == 40002


async def halfHandshake(url):
    """
    Slowloris: a request that never ends gets 408 after handshake_timeout.
    """
    client = await wire.rawConnect(url)
    started = time.monotonic()
    client.send(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    received = await client.closed.addTimeout(5, reactor)
    elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408 "), received[:100]
    assert HANDSHAKE_TIMEOUT <= elapsed < HANDSHAKE_TIMEOUT + 2


async def gigabyteHeader(url):
    """
    A frame header announcing 1 GB: 1009 without waiting for the payload.
    """
    client = await wire.rawOpen(url)
    client.send(wire.frameHeader(OP_BINARY, 1 << 30) + b"x" * 1000)
    close = await client.closeFrame()
    assert close.closeCode == 1009
    client.sendClose(1009)
    await client.closed.addTimeout(5, reactor)


async def invalidUtf8(url):
    """
    Invalid UTF-8 in a text message: the backend's 1007 reaches the client.
    """
    client = await wire.rawOpen(url)
    client.sendFrame(OP_TEXT, b"caf\xc3 \xff\xfe")
    close = await client.closeFrame()
    assert close.closeCode == 1007
    client.sendClose(1007)
    await client.closed.addTimeout(5, reactor)


async def unmaskedFrame(url):
    """
    A client frame without a mask: 1002.
    """
    client = await wire.rawOpen(url)
    client.sendFrame(OP_TEXT, b"no mask", masked=False)
    close = await client.closeFrame()
    assert close.closeCode == 1002
    client.sendClose(1002)
    await client.closed.addTimeout(5, reactor)


class Chatter:
    """
    A client doing round trips back to back until stopped: a bystander
    that shows lbws serves others while one connection misbehaves.
    """

    def __init__(self, client):
        self.client = client
        self.count = 0
        self._stopped = False
        self._done = defer.ensureDeferred(self._run())

    async def _run(self):
        while not self._stopped:
            payload = b"chatter %d" % self.count
            assert await echo(self.client, payload) == payload
            self.count += 1
        return self.count

    async def stop(self):
        self._stopped = True
        return await self._done.addTimeout(30, reactor)


@pytest.mark.parametrize(
    "misbehave",
    [junk, junkFlood, halfHandshake, gigabyteHeader, invalidUtf8, unmaskedFrame],
    ids=lambda f: f.__name__,
)
@pytest_twisted.ensureDeferred
async def test_badClient(harness, misbehave):
    backend = await harness.echo()
    lbws = await harness.lbws(
        [("a", backend.url)], lbws=f"handshake_timeout = {HANDSHAKE_TIMEOUT}"
    )
    bystander = await support.connect(lbws.url)
    chatter = Chatter(bystander)
    await misbehave(lbws.url)
    assert await chatter.stop() > 0
    assert await echo(bystander, b"after") == b"after"
    assert not bystander.closed.called


# Load: thousands of idle clients, a message storm.


def raiseFileLimit(wanted):
    """
    Raise this process's open-file limit (children inherit it) to
    C{wanted}, or fail saying what the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(
            f"needs {wanted} open files, the hard limit is {hard}:"
            f" raise it (ulimit -Hn, or LimitNOFILE) to run this test"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture
def fileLimit():
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield raiseFileLimit
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


class IdleClient(wire.RawWebSocket):
    """
    A client that opens a WebSocket and then only answers pings.
    """

    def dataReceived(self, data):
        super().dataReceived(data)
        while self.frames.pending:
            frame = self.frames.pending.pop(0)
            if frame.opcode == OP_PING:
                self.sendFrame(OP_PONG, frame.payload)


async def openIdle(port, count, batch=250):
    """
    C{count} idle WebSockets to lbws on C{port}, opened C{batch} at a time.
    """
    factory = protocol.Factory.forProtocol(IdleClient)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=30)
    request = support.handshakeRequest()

    async def one():
        client = await endpoint.connect(factory)
        client.send(request)
        response = await client.response.addTimeout(60, reactor)
        assert response.startswith("HTTP/1.1 101"), response
        return client

    clients = []
    for start in range(0, count, batch):
        size = min(batch, count - start)
        clients += await defer.gatherResults(
            [defer.ensureDeferred(one()) for _ in range(size)], consumeErrors=True
        )
    return clients


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest_twisted.ensureDeferred
async def test_fiveThousandIdleClients(tmp_path, harness, fileLimit, capsys):
    """
    lbws (a twistd process) holds 5,000 idle client WebSockets, each with
    its backend WebSocket, and still serves a new client; its RSS per idle
    connection (client and backend leg) is measured, printed, and kept
    well under what it was when each kept its Autobahn protocols.
    """
    count = 5000
    warm = 100
    # lbws: two sockets per connection; this process: one; node: one. The
    # processes started from here on inherit the limit.
    fileLimit(2 * count + 1000)
    nodeBackend = harness.node()
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", nodeBackend.url)],
            listen="tcp:0:interface=127.0.0.1:backlog=1024",
        )
    )
    lbws = harness.lbwsProcess(config)
    process = psutil.Process(lbws.pid)
    clients = await openIdle(lbws.port, warm)
    before = process.memory_info().rss
    clients += await openIdle(lbws.port, count - warm)
    after = process.memory_info().rss
    try:
        assert len(clients) == count
        assert all(client.transport.connected for client in clients)
        assert process.num_fds() >= 2 * count
        newcomer = await support.connect(lbws.url)
        assert await echo(newcomer, b"room for one more") == b"room for one more"
        newcomer.sendClose(1000)
        perConnection = (after - before) / (count - warm)
        with capsys.disabled():
            print(
                f"\nlbws RSS: {before / 2**20:.1f} MiB with {warm} idle connections,"
                f" {after / 2**20:.1f} MiB with {count}:"
                f" {perConnection / 1024:.1f} KiB per idle connection"
                f" (client and backend legs)"
            )
        # About 7 KiB here; 23 KiB while each connection kept its two
        # Autobahn protocols (see the README's Benchmark section).
        assert perConnection < 16 * 1024
    finally:
        for client in clients:
            client.transport.abortConnection()


def sequenceBackend():
    """
    tests/node/sequence-server.js: an echo backend that checks the order
    of each connection's messages and reports its counts.
    """
    return support.NodeBackend(script="sequence-server.js")


def stormMessage(seq):
    """
    Message C{seq} of a connection: text and binary in turn, of varied
    sizes, each carrying its number where the backend looks for it.
    """
    size = 16 + (seq * 7919) % 2000
    if seq % 2:
        return seq.to_bytes(8, "big") + bytes(size), True
    return (b"%d:" % seq) + b"x" * size, False


class StormClient(support.RecordingClient):
    """
    Keeps C{window} messages in flight until the deadline, checking every
    echo: the one expected next, byte for byte.
    """

    window = 8

    def onOpen(self):
        self.sent = 0
        self.echoed = 0
        self.bytesSent = 0
        self.errors = []
        self.drained = defer.Deferred()
        self.stats = defer.Deferred()
        super().onOpen()

    def storm(self, deadline):
        self.deadline = deadline
        for _ in range(self.window):
            self._send()

    def _send(self):
        payload, isBinary = stormMessage(self.sent)
        self.sendMessage(payload, isBinary)
        self.sent += 1
        self.bytesSent += len(payload)

    def onMessage(self, payload, isBinary):
        if self.echoed == self.sent and not isBinary and payload.startswith(b"{"):
            self.stats.callback(json.loads(payload))
            return
        if (payload, isBinary) != stormMessage(self.echoed):
            self.errors.append((self.echoed, payload[:20], isBinary))
        self.echoed += 1
        if time.monotonic() < self.deadline:
            self._send()
        elif self.echoed == self.sent and not self.drained.called:
            self.drained.callback(None)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest_twisted.ensureDeferred
async def test_messageStorm(tmp_path, harness, capsys):
    """
    100 clients send as fast as their echoes come back for 30 s through
    lbws (a twistd process): every message reaches the backend once and in
    order (it checks), every echo comes back once and in order (the client
    checks), and lbws's access log counts the same.
    """
    clients, seconds = 100, 30
    backend = sequenceBackend()
    harness.atEnd(backend.stop)
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", backend.url)], listen="tcp:0:interface=127.0.0.1:backlog=256"
        )
    )
    lbws = harness.lbwsProcess(config, "--log-format", "json")
    storm = []
    for _ in range(clients):
        factory = WebSocketClientFactory(lbws.url, reactor=reactor)
        factory.protocol = StormClient
        factory.setProtocolOptions(closeHandshakeTimeout=0)
        factory.opened = defer.Deferred()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", lbws.port, timeout=5).connect(factory)
        storm.append(await factory.opened)

    started = time.monotonic()
    for client in storm:
        client.storm(started + seconds)
    await defer.gatherResults([c.drained for c in storm]).addTimeout(seconds + 60, reactor)
    elapsed = time.monotonic() - started

    for client in storm:
        assert client.errors == []
        assert client.echoed == client.sent
        client.sendMessage(b"__stats__")
    stats = await defer.gatherResults([c.stats for c in storm]).addTimeout(30, reactor)
    for client, counts in zip(storm, stats):
        assert counts == {"received": client.sent, "bytes": client.bytesSent, "errors": 0}
        client.sendClose(1000)
    await defer.gatherResults([c.closed for c in storm]).addTimeout(30, reactor)
    assert lbws.stop() == 0

    access = [json.loads(line) for line in lbws.lines if '"log_format_access": true' in line]
    assert len(access) == clients
    expected = sorted(
        (c.sent + 1, c.bytesSent + len(b"__stats__"), c.echoed + 1) for c in storm
    )
    assert sorted(
        (e["messagesIn"], e["bytesIn"], e["messagesOut"]) for e in access
    ) == expected
    total = sum(c.sent for c in storm)
    with capsys.disabled():
        print(
            f"\nmessage storm: {clients} clients, {elapsed:.1f}s: {total} messages"
            f" each way ({total / elapsed:.0f}/s), min {min(c.sent for c in storm)}"
            f" / max {max(c.sent for c in storm)} per client; none lost,"
            f" duplicated or out of order at the backend, the clients or lbws's log"
        )
