"""
A WebSocket client at the byte level, for what no library would send or
put up with: unmasked or oversized frames, invalid UTF-8, a handshake cut
short, or never answering a ping or a close.
"""

import base64
import hashlib
import os
import re
import struct

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from lbws.protocol.frames import OP_CLOSE, buildFrame, closePayload
from tests.support import handshakeRequest


class Frame:
    def __init__(self, fin, opcode, payload, masked):
        self.fin = fin
        self.opcode = opcode
        self.payload = payload
        self.masked = masked

    @property
    def closeCode(self):
        assert self.opcode == OP_CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else 1005

    def __repr__(self):
        return f"Frame(opcode={self.opcode}, payload={self.payload[:40]!r})"


class RawWebSocket(protocol.Protocol):
    """
    Reads the HTTP answer into C{response} (a Deferred firing with its
    text), then frames into C{frames} (a DeferredQueue of L{Frame}); never
    answers anything by itself. C{closed} fires when the TCP connection
    ends, with everything received; C{lostReason} then says how it ended
    (C{ConnectionDone} for a FIN, C{ConnectionLost} for a reset).
    """

    def connectionMade(self):
        self.received = b""
        self._buffer = b""
        self.response = defer.Deferred()
        self.frames = defer.DeferredQueue()
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data
        self._buffer += data
        if not self.response.called:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[: end + 4], self._buffer[end + 4 :]
            self.response.callback(head.decode("latin-1"))
        while True:
            frame = self._parse()
            if frame is None:
                return
            self.frames.put(frame)

    def _parse(self):
        parsed = parseFrame(self._buffer)
        if parsed is None:
            return None
        frame, self._buffer = parsed
        return frame

    def connectionLost(self, reason):
        self.lostReason = reason
        if not self.response.called:
            self.response.callback(self._buffer.decode("latin-1"))
        self.closed.callback(self.received)

    def send(self, data):
        self.transport.write(data)

    def sendFrame(self, opcode, payload=b"", masked=True):
        self.transport.write(buildFrame(opcode, payload, masked=masked))

    def sendClose(self, code, reason=""):
        self.sendFrame(OP_CLOSE, closePayload(code, reason))

    async def nextFrame(self, timeout=10):
        return await self.frames.get().addTimeout(timeout, reactor)

    async def closeFrame(self, timeout=10):
        """
        The first close frame to come, skipping pings and data.
        """
        while True:
            frame = await self.nextFrame(timeout)
            if frame.opcode == OP_CLOSE:
                return frame


def parseFrame(data):
    """
    The first whole frame of C{data} (its payload unmasked) and the bytes
    after it, or None if C{data} does not hold a whole frame yet.
    """
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    length = second & 0x7F
    pos = 2
    if length == 126:
        if len(data) < 4:
            return None
        (length,) = struct.unpack_from("!H", data, 2)
        pos = 4
    elif length == 127:
        if len(data) < 10:
            return None
        (length,) = struct.unpack_from("!Q", data, 2)
        pos = 10
    masked = bool(second & 0x80)
    key = data[pos : pos + 4] if masked else None
    if masked:
        pos += 4
    if len(data) < pos + length:
        return None
    payload = data[pos : pos + length]
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return Frame(bool(first & 0x80), first & 0x0F, payload, masked), data[pos + length :]


def parseFrames(data):
    """
    Every whole frame in C{data}, and what is left over.
    """
    frames = []
    while True:
        parsed = parseFrame(data)
        if parsed is None:
            return frames, data
        frame, data = parsed
        frames.append(frame)


async def rawConnect(url, protocolClass=RawWebSocket):
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    factory = protocol.Factory.forProtocol(protocolClass)
    return await TCP4ClientEndpoint(reactor, host, int(port), timeout=5).connect(factory)


async def rawOpen(url, path="/", timeout=10, protocolClass=RawWebSocket):
    """
    A raw client past a successful opening handshake.
    """
    client = await rawConnect(url, protocolClass)
    client.send(handshakeRequest(path))
    response = await client.response.addTimeout(timeout, reactor)
    assert response.startswith("HTTP/1.1 101"), response
    return client


def frameHeader(opcode, length, masked=True, fin=True, rsv=0):
    """
    Only the header of a frame (with its mask key, if masked): for lengths
    no test would send whole. Written apart from lbws's own frame builder,
    so that tests do not check lbws against itself.
    """
    first = (0x80 if fin else 0) | rsv | opcode
    maskBit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", first, maskBit | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, maskBit | 126, length)
    else:
        header = struct.pack("!BBQ", first, maskBit | 127, length)
    return header + (os.urandom(4) if masked else b"")


def frame(opcode, payload, fin=True, masked=True, rsv=0):
    """
    A whole frame, with any combination of bits, valid or not.
    """
    header = frameHeader(opcode, len(payload), masked, fin, rsv)
    if not masked:
        return header + payload
    key = header[-4:]
    return header + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawBackend(RawWebSocket):
    """
    A backend at the byte level, for checking exactly what lbws sends it:
    C{head} is the request head it got (bytes), C{received} every byte.
    It accepts every handshake, records frames without answering them, and
    answers a close with a close and the end of the connection. Its
    factory's C{connections} lists every connection made to it (lbws's tcp
    health checks too: those have no C{head}); its C{answerAfter} is how
    many seconds it takes to answer a handshake, its C{behind101} the
    bytes it writes with its 101, in the same write.
    """

    head = None

    def connectionMade(self):
        super().connectionMade()
        self.factory.connections.append(self)
        self.response.addCallback(self._accept)
        self.frames.get().addCallback(self._frame)

    def _accept(self, text):
        if not text.endswith("\r\n\r\n"):
            return  # lost before a whole head: a tcp health check
        self.head = text.encode("latin-1")
        key = re.search(rb"(?im)^sec-websocket-key:[ \t]*([^\r\n]*?)[ \t]*\r?$", self.head)
        if key is None:
            self.transport.abortConnection()
            return
        accept = base64.b64encode(hashlib.sha1(key.group(1) + _WS_GUID).digest())
        answer = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        ) + self.factory.behind101
        if self.factory.answerAfter:
            reactor.callLater(self.factory.answerAfter, self._answer, answer)
        else:
            self._answer(answer)

    def _answer(self, answer):
        if self.transport.connected:
            self.transport.write(answer)

    def _frame(self, frame):
        if frame.opcode == OP_CLOSE:
            self.sendFrame(OP_CLOSE, closePayload(1000), masked=False)
            self.transport.loseConnection()
        else:
            self.frames.get().addCallback(self._frame)


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def rawBackend(harness, path=""):
    """
    A L{RawBackend} on 127.0.0.1, port 0, until the end of the test; its
    factory's C{url} is C{ws://127.0.0.1:PORT} + C{path}.
    """
    factory = protocol.Factory.forProtocol(RawBackend)
    factory.connections = []
    factory.answerAfter = 0
    factory.behind101 = b""
    port = await harness.listen(factory)
    factory.url = f"ws://127.0.0.1:{port.getHost().port}{path}"
    return factory
