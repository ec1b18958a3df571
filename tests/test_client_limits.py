"""
Per-client limits against cheap CPU exhaustion and hogging, end to end:
max_frames_per_message, the ping/pong budget, max_message_rate and
max_connections_per_ip. Each over-limit client gets its close code (or
503) and a bystander client keeps working.
"""

import struct

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone

from lbws.protocol.frames import OP_BINARY, OP_CONTINUATION, OP_PING, OP_TEXT
from lbws.ws.tunnel import CONTROL_FRAMES_PER_SECOND
from tests import wire
from tests.support import deferLater, eventually, handshakeRequest, roundTrip
from tests.test_proxy_protocol import proxyV1


def fragments(opcode, count, size):
    """
    One message in C{count} masked frames of C{size} (under 126) bytes;
    the mask key is zero, so that building a few MiB costs nothing.
    """
    payload = b"\x61" * size
    frames = []
    for i in range(count):
        first = (0x80 if i == count - 1 else 0) | (opcode if i == 0 else OP_CONTINUATION)
        frames.append(struct.pack("!BB", first, 0x80 | size) + b"\0" * 4)
        frames.append(payload)
    return b"".join(frames)


@pytest_twisted.ensureDeferred
async def test_too_many_fragments_get_1009(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="max_frames_per_message = 100")
    bystander = await harness.client(lbws.url)
    raw = await wire.rawOpen(lbws.url)
    ok = b"".join(wire.frame(OP_CONTINUATION if i else OP_TEXT, b"x", fin=i == 99) for i in range(100))
    raw.send(ok)
    echo = await raw.nextFrame()
    assert echo.payload == b"x" * 100
    # An endless run of empty continuation frames is cut at the limit.
    raw.send(wire.frame(OP_TEXT, b"", fin=False) + wire.frame(OP_CONTINUATION, b"", fin=False) * 1000)
    close = await raw.closeFrame()
    assert close.closeCode == 1009
    assert b"more than 100 frames" in close.payload
    raw.sendClose(1009)
    await raw.closed.addTimeout(5, reactor)
    assert raw.lostReason.check(ConnectionDone)
    await eventually(lambda: backend.closes)
    assert backend.closes[0][1] == 1001
    assert await roundTrip(bystander, b"unaffected") == (b"unaffected", False)


@pytest_twisted.ensureDeferred
async def test_default_frame_limit_lets_autobahn_case_9_3_1_through(harness):
    """
    4 MiB in 64-byte fragments (65,536 frames), as Autobahn's testsuite
    case 9.3.1 sends, is relayed whole under the default limit.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    raw = await wire.rawOpen(lbws.url)
    raw.send(fragments(OP_BINARY, 65536, 64))
    echo = await raw.nextFrame(timeout=60)
    assert (echo.opcode, len(echo.payload)) == (OP_BINARY, 4 * 1024 * 1024)
    raw.transport.loseConnection()
    await raw.closed.addTimeout(5, reactor)


@pytest_twisted.ensureDeferred
async def test_ping_flood_gets_1008(harness):
    """
    A client flooding 1-byte pings is closed with 1008 once it sends more
    than the budget in a second; the ones before reached the backend (and
    were answered); a bystander is not affected.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0")
    bystander = await harness.client(lbws.url)
    raw = await wire.rawOpen(lbws.url)
    raw.send(wire.frame(OP_PING, b"p") * (CONTROL_FRAMES_PER_SECOND * 20))
    close = await raw.closeFrame()
    assert close.closeCode == 1008
    assert b"pings and pongs" in close.payload
    raw.sendClose(1008)
    await raw.closed.addTimeout(5, reactor)
    assert raw.lostReason.check(ConnectionDone)
    assert await roundTrip(bystander, b"unaffected") == (b"unaffected", False)
    assert lbws.counters.protocolErrors[("client", 1008)] == 1


@pytest_twisted.ensureDeferred
async def test_message_rate_over_the_limit_gets_1008(harness):
    """
    max_message_rate = 20: a client sending 200 messages at once is closed
    with 1008 and its backend leg with 1001; a client sending 10 a second
    is not.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="max_message_rate = 20")
    bystander = await harness.client(lbws.url)
    raw = await wire.rawOpen(lbws.url)
    raw.send(b"".join(wire.frame(OP_TEXT, b"m%d" % i) for i in range(200)))
    close = await raw.closeFrame()
    assert close.closeCode == 1008
    assert b"more than 20 messages a second" in close.payload
    raw.sendClose(1008)
    await raw.closed.addTimeout(5, reactor)
    assert raw.lostReason.check(ConnectionDone)
    await eventually(lambda: backend.closes)
    assert backend.closes[0] == (True, 1001, "client error: more than 20 messages a second")
    for i in range(15):
        assert await roundTrip(bystander, b"b%d" % i) == (b"b%d" % i, False)
        await deferLater(0.1)
    assert not bystander.closed.called


async def proxiedHandshake(url, source, sourcePort):
    """
    A raw client that claims C{source} in a PROXY header.

    @return: the client and the status line lbws answered.
    """
    raw = await wire.rawConnect(url)
    raw.send(proxyV1(source, sourcePort) + handshakeRequest())
    response = await raw.response.addTimeout(10, reactor)
    return raw, response.split("\r\n", 1)[0]


@pytest_twisted.ensureDeferred
async def test_connections_per_ip_beyond_the_limit_get_503(harness):
    """
    max_connections_per_ip = 2 behind a PROXY-protocol listener: the
    address in the header counts. A third connection from one address gets
    503, one from another address is let in, and a place freed is taken
    again.
    """
    backend = await harness.backend()
    lbws = await harness.lbws(
        [("a", backend.url)],
        lbws="max_connections_per_ip = 2",
        listen="haproxy:tcp:0:interface=127.0.0.1",
    )
    first, status = await proxiedHandshake(lbws.url, "203.0.113.5", 40001)
    assert status.startswith("HTTP/1.1 101")
    second, status = await proxiedHandshake(lbws.url, "203.0.113.5", 40002)
    assert status.startswith("HTTP/1.1 101")
    third, status = await proxiedHandshake(lbws.url, "203.0.113.5", 40003)
    assert status.startswith("HTTP/1.1 503"), status
    await third.closed.addTimeout(5, reactor)
    bystander, status = await proxiedHandshake(lbws.url, "198.51.100.9", 40004)
    assert status.startswith("HTTP/1.1 101")
    bystander.send(wire.frame(OP_TEXT, b"hello"))
    assert (await bystander.nextFrame()).payload == b"hello"
    assert lbws.counters.handshakes["over_ip_limit"] == 1
    first.sendClose(1000)
    await first.closed.addTimeout(5, reactor)
    await eventually(lambda: lbws.relay.perPeer.get("203.0.113.5") == 1)
    again, status = await proxiedHandshake(lbws.url, "203.0.113.5", 40005)
    assert status.startswith("HTTP/1.1 101")
    for client in (second, bystander, again):
        client.transport.abortConnection()
        await client.closed.addTimeout(5, reactor)
    # Every exit path gave its place back.
    await eventually(lambda: lbws.relay.perPeer == {} and lbws.relay.clients == 0)
