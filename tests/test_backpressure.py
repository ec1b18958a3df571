"""
Backpressure both ways: a reader that stops reading makes lbws stop reading
the writer, instead of buffering what the writer sends.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from lbws.transport.sockets import DEFAULT_READ_SIZE, RELAY_READ_SIZE, adjustReadSize
from tests.support import connect, eventually, startEchoBackend, startLbws

CHUNK = 64 * 1024
TOTAL = 200 * 1024 * 1024
# What lbws may hold for one connection: Twisted pauses the producer once a
# transport buffers more than its bufferSize (256 KiB for a tunnel leg,
# lbws.transport.sockets.RELAY_READ_SIZE); one more read can
# land on top of that.
BOUND = 1024 * 1024
# Seconds to wait for the flood to be held back.
WAIT = 10


@implementer(IPushProducer)
class Flood:
    """
    Sends TOTAL bytes as binary messages on a WebSocket, only while its
    transport is not paused: the writer side, well behaved itself.
    """

    def __init__(self, protocol):
        self.protocol = protocol
        self.sent = 0
        self.paused = False
        self.firstPause = defer.Deferred()
        self.done = defer.Deferred()
        protocol.transport.registerProducer(self, True)
        self._call = reactor.callLater(0, self._send)

    def _send(self):
        self._call = None
        while not self.paused and self.sent < TOTAL:
            self.protocol.sendMessage(b"\x5a" * CHUNK, isBinary=True)
            self.sent += CHUNK
        if self.sent >= TOTAL and not self.done.called:
            self.protocol.transport.unregisterProducer()
            self.done.callback(self.sent)

    def pauseProducing(self):
        self.paused = True
        if not self.firstPause.called:
            self.firstPause.callback(self.sent)

    def resumeProducing(self):
        self.paused = False
        if self._call is None and self.sent < TOTAL:
            self._call = reactor.callLater(0, self._send)

    def stopProducing(self):
        self.paused = True


def buffered(transport):
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest.mark.parametrize("direction", ["backend to client", "client to backend"])
@pytest_twisted.ensureDeferred
async def test_paused_reader_bounds_lbws_buffers(direction):
    factory, port = await startEchoBackend()
    factory.onMessage = None
    lbws = await startLbws(
        [("a", factory.url)], lbws=f"max_message_size = {CHUNK}\nping_interval = 0"
    )
    try:
        client = await connect(lbws.url)
        backend = factory.connections[0]
        # Neither side echoes here: each just counts what it receives.
        received = {"bytes": 0}

        def count(payload, isBinary):
            received["bytes"] += len(payload)

        backend.onMessage = client.onMessage = count
        writer, reader = (backend, client) if direction == "backend to client" else (client, backend)
        (tunnel,) = lbws.relay.tunnels
        legs = (tunnel.client.transport, tunnel.backend.transport)
        peak = [0]

        def sample():
            peak[0] = max(peak[0], sum(buffered(t) for t in legs))

        sampler = task.LoopingCall(sample)
        sampler.start(0.005)
        reader.transport.pauseProducing()
        flood = Flood(writer)
        await flood.firstPause.addTimeout(WAIT, reactor)
        # The writer is held back once lbws stops reading its leg (the
        # other leg's buffer is full): from then on lbws must hold at most
        # BOUND, however much the writer wants.
        writerLeg = tunnel.backend.transport if writer is backend else tunnel.client.transport
        await eventually(lambda: writerLeg not in reactor.getReaders(), timeout=WAIT)
        sample()
        assert flood.sent < TOTAL / 4
        assert peak[0] <= BOUND
        reader.transport.resumeProducing()
        await flood.done.addTimeout(60, reactor)
        await eventually(lambda: received["bytes"] >= TOTAL, timeout=60)
        sampler.stop()
        assert received["bytes"] == TOTAL
        assert peak[0] <= BOUND
    finally:
        await lbws.stopService()
        await port.stopListening()


def test_read_size_follows_the_reads():
    """
    A read that fills the buffer makes the next ones RELAY_READ_SIZE; one
    shorter than the default puts them back (recv(n) allocates n bytes
    first, which costs a small read dearly above 128 KiB).
    """

    class TCP:
        bufferSize = DEFAULT_READ_SIZE

    tcp = TCP()
    adjustReadSize(tcp, 100)
    assert tcp.bufferSize == DEFAULT_READ_SIZE
    adjustReadSize(tcp, DEFAULT_READ_SIZE)
    assert tcp.bufferSize == RELAY_READ_SIZE
    adjustReadSize(tcp, DEFAULT_READ_SIZE)  # between the two: no change
    assert tcp.bufferSize == RELAY_READ_SIZE
    adjustReadSize(tcp, DEFAULT_READ_SIZE - 1)
    assert tcp.bufferSize == DEFAULT_READ_SIZE
