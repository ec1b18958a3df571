"""
Keep-alive pings and the idle timeout must not cut clients that are busy:
a ping counts only once it is written, a client that takes or sends bytes
is alive, and bytes of a long message are activity. Real lbws, real
sockets, real time (the intervals are short; margins are stated).
"""

import socket

import pytest_twisted
from twisted.internet import reactor, task

from lbws.protocol.frames import OP_BINARY, OP_PING, OP_PONG
from tests import wire
from tests.support import deferLater, roundTrip


def drip(transport, data, pieces, every):
    """
    Write C{data} in C{pieces} parts, one each C{every} seconds.

    @return: a Deferred firing when all is written.
    """
    size = -(-len(data) // pieces)
    chunks = iter([data[i : i + size] for i in range(0, len(data), size)])

    def step():
        chunk = next(chunks, None)
        if chunk is None:
            loop.stop()
        else:
            transport.write(chunk)

    loop = task.LoopingCall(step)
    return loop.start(every)


@pytest_twisted.ensureDeferred
async def test_slow_backend_frame_does_not_get_the_client_cut(harness):
    """
    A backend frame that takes 2 s to arrive holds lbws's ping (0.3 s
    interval) back: the client, which answers every ping it gets, gets the
    whole frame and stays. Before, the held ping counted as unanswered and
    the client was cut at ~0.6 s.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0.3")
    client = await harness.client(lbws.url)
    bystander = await harness.client(lbws.url)
    payload = bytes(range(256)) * 40
    frame = wire.frameHeader(OP_BINARY, len(payload), masked=False) + payload
    await drip(backend.connections[0].transport, frame, 20, 0.1)
    message = await client.messages.get().addTimeout(10, reactor)
    assert message == (payload, True)
    assert not client.closed.called
    assert await roundTrip(client, b"still open") == (b"still open", False)
    assert await roundTrip(bystander, b"fine") == (b"fine", False)


class SlowReader(wire.RawWebSocket):
    """
    A client that reads about C{rate} bytes a second (its receive buffer
    is small and it reads once per C{every} seconds) and answers pings.
    """

    every = 0.05

    def connectionMade(self):
        super().connectionMade()
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        self._resume = None

    def dataReceived(self, data):
        super().dataReceived(data)
        if self.transport.connected and self._resume is None:
            self.transport.pauseProducing()
            self._resume = reactor.callLater(self.every, self._go)

    def _go(self):
        self._resume = None
        self.transport.resumeProducing()

    def connectionLost(self, reason):
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        super().connectionLost(reason)


@pytest_twisted.ensureDeferred
async def test_slow_reader_of_a_long_message_is_not_cut(harness):
    """
    A client reading a 256 KiB message at some tens of KB/s, for several
    seconds, with a 0.3 s ping interval: it is alive while it reads, gets
    the whole message and the ping after it. Before, it was reset after
    ~0.6 s.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0.3")
    reader = await wire.rawOpen(lbws.url, protocolClass=SlowReader)
    bystander = await harness.client(lbws.url)
    payload = b"\x42" * (256 * 1024)
    started = reactor.seconds()
    backend.connections[0].sendMessage(payload, isBinary=True)
    pings = 0
    try:
        while True:
            frame = await reader.nextFrame(timeout=30)
            if frame.opcode == OP_PING:
                pings += 1
                reader.sendFrame(OP_PONG, frame.payload)
                continue
            assert frame.opcode == OP_BINARY, frame
            break
        elapsed = reactor.seconds() - started
        assert frame.payload == payload
        # It took many ping intervals: the test did test something.
        assert elapsed > 1.0
        # The pings after the message come, are answered, and the client
        # stays.
        deadline = reactor.seconds() + 1.0
        while reactor.seconds() < deadline:
            frame = await reader.nextFrame(timeout=5)
            assert frame.opcode == OP_PING, frame
            pings += 1
            reader.sendFrame(OP_PONG, frame.payload)
        assert pings >= 2
        assert not reader.closed.called
        assert await roundTrip(bystander, b"fine") == (b"fine", False)
    finally:
        reader.transport.abortConnection()
        await reader.closed


@pytest_twisted.ensureDeferred
async def test_long_fragmented_message_is_activity_for_idle_timeout(harness):
    """
    idle_timeout = 0.5 and a client that sends one message in fragments
    over 2 s: it is not idle, and gets the whole message echoed. Before,
    it was closed with 1001 "idle timeout". Once it stops, the idle timeout
    does close it.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="idle_timeout = 0.5\nping_interval = 0")
    client = await harness.client(lbws.url)
    client.beginMessage(isBinary=True)
    for i in range(10):
        client.sendMessageFrame(b"part%d;" % i)
        await deferLater(0.2)
    client.endMessage()
    echoed = await client.messages.get().addTimeout(5, reactor)
    assert echoed == (b"".join(b"part%d;" % i for i in range(10)), True)
    assert not client.closed.called
    code, reason = await client.closed.addTimeout(5, reactor)
    assert (code, reason) == (1001, "idle timeout")


@pytest_twisted.ensureDeferred
async def test_silent_client_is_still_cut(harness):
    """
    The other side of the rule: a client that takes no bytes and answers
    no ping is cut within a few intervals (0.3 s here; ticks at 0.3, 0.6,
    0.9 s: a ping, the acknowledgement of it, then nothing).
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0.3")
    deaf = await wire.rawOpen(lbws.url)
    started = reactor.seconds()
    assert (await deaf.nextFrame()).opcode == OP_PING
    await deaf.closed.addTimeout(5, reactor)
    assert reactor.seconds() - started < 2.0
