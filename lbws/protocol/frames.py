"""
An incremental scanner of WebSocket frame headers (RFC 6455 section 5).

After both opening handshakes the relay forwards frames verbatim: a client's
frames are already masked as a backend expects, a backend's unmasked as a
client expects. The scanner reads only frame headers as bytes stream through,
so that lbws still knows message boundaries and sizes, enforces
C{max_message_size}, rejects frames that break the framing rules, and sees
control frames (close, ping, pong) whole. Payloads of data frames are never
copied or unmasked.
"""

import os
import struct

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_MESSAGE_OPCODES = (OP_TEXT, OP_BINARY)  # the first frame of a message
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_PAYLOAD = 1007
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
# The service is restarting; the client should reconnect (with a random
# delay, says the IANA registry): lbws's code for a client whose backend is
# lost or broke the protocol, and for rebalancing. See the README's close
# codes for which client libraries retry it.
CLOSE_SERVICE_RESTART = 1012


# After a violation, the longest frame lbws skips over to find the sender's
# close behind it (L{FrameScanner.seekClose}); behind a longer one (a header
# announcing a gigabyte that never comes) the close is not looked for.
SEEK_LIMIT = 1 << 20


# The default of max_frames_per_message (see the README): it bounds an
# endless run of empty continuation frames, and lets Autobahn's testsuite
# case 9.3.1 (4 MiB in 64-byte fragments: 65,536 frames) through.
DEFAULT_MAX_FRAMES = 131072
# A scanner budget that is never spent in practice (refilled if it is).
UNLIMITED = (1 << 30) - 1


class ProtocolViolation(Exception):
    """
    A frame breaks RFC 6455's framing rules or lbws's size limit.

    @ivar code: the close code the sender deserves (1002 or 1009).
    @ivar reason: a short text for the close frame and the log.
    """

    def __init__(self, code, reason):
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class FrameScanner:
    """
    Reads one direction of a WebSocket stream, frame header by frame header.

    Bytes of data frames are handed on as they arrive through
    C{handler.forward(data)}, the frames of one read in one call; control
    frames are collected whole and given to C{handler.control(opcode,
    payload, raw)}, where C{payload} is unmasked and C{raw} is the frame
    exactly as received. A ping or pong for which it returns True goes on
    with the frames around it, in the same C{forward} call; one for which it
    returns False is dropped. A close is the handler's to pass on (it gets
    everything before the close first). Completed data messages are
    counted in C{messages} and C{bytes}, without a call per message: the
    handler reads the counts once per L{feed} (see
    L{lbws.ws.tunnel.Leg.dataReceived}). A frame that breaks the rules
    raises L{ProtocolViolation} from L{feed}, after everything before it
    has been forwarded. Setting
    C{stopped} (the handler does, after a close frame) drops whatever the
    stream carries from then on. After a violation nothing more is
    forwarded either, but the handler, once it has sent its close, may
    call L{seekClose}: the frames that follow are then only delimited,
    rules ignored, until the sender's own close frame, which goes to
    C{handler.closeSkipped(payload)} (see L{lbws.ws.tunnel}: the answer to
    lbws's close). While C{boundaryWanted} is set,
    C{handler.boundary()} is called at each frame boundary the stream
    reaches, so that the handler can put in frames of its own.

    Per-client rate limits cost one subtraction per message and none per
    read: C{messageBudget} and C{controlBudget} count down with each
    message begun and each ping or pong; when one runs out,
    C{handler.messageBudgetSpent()} or C{handler.controlBudgetSpent()}
    sets it again or raises L{ProtocolViolation}, which ends the stream
    before that frame. Continuation frames are counted against
    C{maxFrames} (close 1009, like an oversize message).

    @ivar atBoundary: True between frames: the only place where another
        frame may be put into the stream this scanner feeds.
    @ivar messages: data messages completed so far.
    @ivar bytes: their payload bytes (compressed, with permessage-deflate).
    """

    __slots__ = (
        "_handler",
        "_maskBit",
        "_compressedBit",
        "_maxMessageSize",
        "_maxFrames",
        "_pending",
        "_remaining",
        "_fin",
        "_messageOpcode",
        "_messageSize",
        "_messageFrames",
        "atBoundary",
        "boundaryWanted",
        "stopped",
        "_seeking",
        "messageBudget",
        "controlBudget",
        "messages",
        "bytes",
    )

    def __init__(
        self, handler, masked, maxMessageSize, maxFrames=DEFAULT_MAX_FRAMES, deflate=False
    ):
        """
        @param masked: whether frames in this direction must be masked
            (client to server) or must not be (server to client).
        @param maxFrames: the most frames one message may have (its first
            and its continuations).
        @param deflate: whether permessage-deflate was negotiated: then RSV1
            marks a compressed message, on its first frame only (RFC 7692
            section 6). Sizes stay those of the frames, compressed.
        """
        self._handler = handler
        self._maskBit = 0x80 if masked else 0
        self._compressedBit = 0x40 if deflate else 0
        self._maxMessageSize = maxMessageSize
        self._maxFrames = maxFrames
        self._pending = b""  # an incomplete header or control frame
        self._remaining = 0  # payload bytes of the current data frame
        self._fin = False
        self._messageOpcode = None  # opcode of the message being received
        self._messageSize = 0
        self._messageFrames = 0  # continuation frames of that message
        self.atBoundary = True
        self.boundaryWanted = False
        self.stopped = False
        self._seeking = False  # after a violation: looking for the close
        self.messageBudget = UNLIMITED
        self.controlBudget = UNLIMITED
        self.messages = 0
        self.bytes = 0

    @property
    def inMessage(self):
        return self._messageOpcode is not None

    @property
    def progress(self):
        """
        Payload bytes of the message in progress seen so far, or None
        between messages: read at timer ticks to tell a long message that
        is still moving from a stalled one.
        """
        if self._messageOpcode is None:
            return None
        return self._messageSize - self._remaining

    # A take-over (lbws.ops.handoff) moves a scanner between processes.
    _STATE = (
        "_maskBit",
        "_compressedBit",
        "_maxMessageSize",
        "_maxFrames",
        "_remaining",
        "_fin",
        "_messageOpcode",
        "_messageSize",
        "_messageFrames",
        "atBoundary",
        "messageBudget",
        "controlBudget",
    )

    def exportState(self):
        """
        Where this scanner is in its stream, as JSON values: another
        process's scanner given it by L{importState} reads on from the same
        byte. The bytes of an incomplete header or control frame, read but
        not yet passed on, go with it (latin-1, one character a byte).
        """
        state = {name.lstrip("_"): getattr(self, name) for name in self._STATE}
        state["pending"] = self._pending.decode("latin-1")
        return state

    def importState(self, state):
        """
        Go on from where another process's scanner was (L{exportState}).

        @raise KeyError: or ValueError, for a state that is not one.
        """
        for name in self._STATE:
            value = state[name.lstrip("_")]
            if type(value) is not type(getattr(self, name)) and not (
                name == "_messageOpcode" and (value is None or type(value) is int)
            ):
                raise ValueError(f"scanner state {name}: {value!r}")
            setattr(self, name, value)
        self._pending = state["pending"].encode("latin-1")

    def feed(self, data):
        if self.stopped:
            if self._seeking:
                self._seek(data)
            return
        if self._pending:
            data = self._pending + data
            self._pending = b""
        handler = self._handler
        end = len(data)
        pos = 0
        start = 0  # first byte not yet forwarded
        while pos < end:
            remaining = self._remaining
            if remaining:
                # The rest of a data frame begun in an earlier read.
                if remaining > end - pos:
                    self._remaining = remaining - (end - pos)
                    pos = end
                    break
                pos += remaining
                self._remaining = 0
                self._frameEnd()
                if self.boundaryWanted:
                    handler.forward(data[start:pos])
                    start = pos
                    handler.boundary()
                continue
            try:
                header = self._header(data, pos, end)
            except ProtocolViolation:
                self._stopAt(data, pos)
                if start < pos:
                    handler.forward(data[start:pos])
                raise
            if header is None:
                self._pending = data[pos:]
                break
            headerLength, opcode, length = header
            frameEnd = pos + headerLength + length
            if opcode & 0x08:  # a control frame (the header checked the opcode)
                if frameEnd > end:
                    self._pending = data[pos:]
                    break
                if opcode != OP_CLOSE:
                    self.controlBudget -= 1
                    if self.controlBudget < 0:
                        try:
                            handler.controlBudgetSpent()
                        except ProtocolViolation:
                            if start < pos:
                                handler.forward(data[start:pos])
                            self._stopAt(data, pos)
                            raise
                raw = data[pos:frameEnd]
                payload = data[pos + headerLength : frameEnd]
                if self._maskBit:
                    payload = unmask(payload, data[pos + headerLength - 4 : pos + headerLength])
                if opcode == OP_CLOSE:
                    # The handler passes a close on, or not, itself.
                    if start < pos:
                        handler.forward(data[start:pos])
                    pos = start = frameEnd
                    handler.control(opcode, payload, raw)
                    if self.stopped:
                        return
                elif handler.control(opcode, payload, raw):
                    # A ping or pong that goes on stays in the run of bytes
                    # forwarded in one write.
                    pos = frameEnd
                else:
                    if start < pos:
                        handler.forward(data[start:pos])
                    pos = start = frameEnd
                if self.boundaryWanted:
                    if start < pos:
                        handler.forward(data[start:pos])
                        start = pos
                    handler.boundary()
                continue
            if frameEnd <= end:
                # The whole data frame is in this read (small messages
                # are): past it at once, still at a boundary. Its bytes
                # join the run forwarded in one write.
                pos = frameEnd
                self._frameEnd()
                if self.boundaryWanted:
                    handler.forward(data[start:pos])
                    start = pos
                    handler.boundary()
                continue
            pos += headerLength
            self.atBoundary = False
            self._remaining = length
        if start < pos:
            handler.forward(data if start == 0 and pos == end else data[start:pos])

    def _stopAt(self, data, pos):
        """
        The frame at C{pos} broke the rules: nothing from it on is
        forwarded; it is kept for L{seekClose}.
        """
        self.stopped = True
        self._seeking = True
        self._pending = data[pos:]
        self._remaining = 0
        self._messageOpcode = None

    def seekClose(self):
        """
        After a violation: look for the sender's close frame from the bad
        frame on, in what arrived already and in what L{feed} gets later.
        A peer that keeps sending after its bad frame (the frames it had
        queued) answers lbws's close only behind them; reading them is what
        lets its TCP connection end with a FIN, not a reset.
        """
        if self._seeking:
            self._seek(b"")

    def _seek(self, data):
        if self._pending:
            data = self._pending + data
            self._pending = b""
        end = len(data)
        pos = 0
        while pos < end:
            if self._remaining:
                step = min(self._remaining, end - pos)
                pos += step
                self._remaining -= step
                continue
            extent = frameExtent(data, pos, end)
            if extent is None:
                self._pending = data[pos:]
                return
            headerLength, opcode, length = extent
            if length >> 63 or length > SEEK_LIMIT:
                # No frame boundary can be found after this one (or only
                # behind more than lbws will read to find it): drop the
                # rest; the handler ends its own side, and the peer's
                # connection ends when it closes it or when lbws's wait is
                # over.
                self._seeking = False
                self._handler.closeUnfindable()
                return
            if opcode == OP_CLOSE and length <= 125:
                frameEnd = pos + headerLength + length
                if frameEnd > end:
                    self._pending = data[pos:]
                    return
                payload = data[pos + headerLength : frameEnd]
                if data[pos + 1] & 0x80:
                    payload = unmask(payload, data[pos + headerLength - 4 : pos + headerLength])
                self._seeking = False
                self._handler.closeSkipped(payload)
                return
            if opcode == OP_CLOSE:
                # A close frame too long to be valid still ends the stream.
                self._seeking = False
                self._handler.closeSkipped(b"")
                return
            pos += headerLength
            self._remaining = length

    def _header(self, data, pos, end):
        """
        Parse and check the frame header at C{pos}.

        @return: C{(headerLength, opcode, payloadLength)}, or None if the
            header is not complete yet.
        """
        extent = frameExtent(data, pos, end)
        if extent is None:
            return None
        _, opcode, length = extent
        first = data[pos]
        if length >> 63:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "invalid frame length")
        if first & 0x70 and not (
            first & 0x70 == self._compressedBit and opcode in _MESSAGE_OPCODES
        ):
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if (data[pos + 1] & 0x80) != self._maskBit:
            raise ProtocolViolation(
                CLOSE_PROTOCOL_ERROR,
                "unmasked client frame" if self._maskBit else "masked server frame",
            )
        fin = bool(first & 0x80)
        if opcode > OP_BINARY:  # a control opcode, or a reserved one
            if opcode not in _CONTROL_OPCODES:
                raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode}")
            if not fin:
                raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if length > 125:
                raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "control frame too long")
            return extent
        if opcode == OP_CONTINUATION:
            if self._messageOpcode is None:
                raise ProtocolViolation(
                    CLOSE_PROTOCOL_ERROR, "continuation frame outside a message"
                )
            self._messageFrames += 1
            if self._messageFrames >= self._maxFrames:
                raise ProtocolViolation(
                    CLOSE_MESSAGE_TOO_BIG,
                    f"message of more than {self._maxFrames} frames",
                )
        elif self._messageOpcode is not None:
            raise ProtocolViolation(
                CLOSE_PROTOCOL_ERROR, "new message inside a fragmented message"
            )
        else:
            self.messageBudget -= 1
            if self.messageBudget < 0:
                self._handler.messageBudgetSpent()
            self._messageOpcode = opcode
            self._messageSize = 0
            self._messageFrames = 0
        self._messageSize += length
        if self._messageSize > self._maxMessageSize:
            raise ProtocolViolation(
                CLOSE_MESSAGE_TOO_BIG,
                f"message longer than {self._maxMessageSize} bytes",
            )
        self._fin = fin
        return extent

    def _frameEnd(self):
        self.atBoundary = True
        if self._fin:
            self._messageOpcode = None
            self.messages += 1
            self.bytes += self._messageSize


def frameExtent(data, pos, end):
    """
    The extent of the frame header at C{pos}, whatever the frame breaks:
    C{(headerLength, opcode, payloadLength)}, or None if the header is not
    complete yet. The one parser of header bytes: L{FrameScanner} checks
    the rules on top of it.
    """
    if end - pos < 2:
        return None
    second = data[pos + 1]
    length = second & 0x7F
    if length < 126:
        headerLength = 6 if second & 0x80 else 2
        if end - pos < headerLength:
            return None
        return headerLength, data[pos] & 0x0F, length
    headerLength = 2
    if length == 126:
        headerLength = 4
        if end - pos < 4:
            return None
        (length,) = struct.unpack_from("!H", data, pos + 2)
    elif length == 127:
        headerLength = 10
        if end - pos < 10:
            return None
        (length,) = struct.unpack_from("!Q", data, pos + 2)
    if second & 0x80:
        headerLength += 4
    if end - pos < headerLength:
        return None
    return headerLength, data[pos] & 0x0F, length


def unmask(payload, key):
    """
    Apply (or remove) a 4-byte WebSocket mask; used for control frames only.
    """
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (
        int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    ).to_bytes(len(payload), "big")


def buildFrame(opcode, payload=b"", masked=False):
    """
    One complete, final frame: what lbws itself sends (pings and closes).
    """
    length = len(payload)
    first = 0x80 | opcode
    maskBit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", first, maskBit | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, maskBit | 126, length)
    else:
        header = struct.pack("!BBQ", first, maskBit | 127, length)
    if masked:
        key = os.urandom(4)
        return header + key + unmask(payload, key)
    return header + payload


def closePayload(code, reason=""):
    payload = struct.pack("!H", code) + reason.encode("utf-8")
    return payload[:125]


def closeViolation(payload):
    """
    What is wrong with a close frame's payload (RFC 6455 section 7.4), as
    the L{ProtocolViolation} its sender deserves, or None if nothing is.
    """
    if len(payload) == 1:
        return ProtocolViolation(CLOSE_PROTOCOL_ERROR, "close payload of one byte")
    if not payload:
        return None
    (code,) = struct.unpack_from("!H", payload)
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        return ProtocolViolation(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return ProtocolViolation(CLOSE_INVALID_PAYLOAD, "close reason is not UTF-8")
    return None


def parseClosePayload(payload):
    """
    The code and reason of a close frame's payload, as far as they can be
    read: C{(1005, "")} for an empty payload. Validation is the endpoints'
    business; lbws only reports what passed.
    """
    if len(payload) < 2:
        return CLOSE_NO_STATUS, ""
    (code,) = struct.unpack_from("!H", payload)
    return code, payload[2:].decode("utf-8", "replace")
