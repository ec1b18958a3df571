"""
A tunnel: a client WebSocket joined to its backend WebSocket once both
opening handshakes are done.

Bytes are forwarded as they arrive, frames unchanged, while a
L{FrameScanner} per direction watches frame headers for what lbws must see:
message counts and sizes, C{max_message_size}, framing errors, and closes,
which it passes on and maps. lbws puts frames of its own (pings, closes)
into a stream only at frame boundaries.

Each leg's transport is paused and resumed by the other through a
L{PeerProducer}, so a reader that does not keep up pauses the writer
instead of making lbws buffer.
"""

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from lbws.frames import (
    CLOSE_BAD_GATEWAY,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    FrameScanner,
    ProtocolViolation,
    buildFrame,
    closePayload,
    closeViolation,
    parseClosePayload,
)
from lbws.sockets import writerFor

_log = Logger()

# Seconds a peer gets to answer a close before its TCP connection is cut.
CLOSE_TIMEOUT = 5.0


class Leg:
    """
    One side of a tunnel. Its scanner reads the frames this side sends; the
    frames this side receives come from the other leg's scanner, or from
    lbws itself at frame boundaries.
    """

    def __init__(self, tunnel, protocol, isClient, maxMessageSize, deflate=False):
        self.tunnel = tunnel
        self.protocol = protocol
        self.transport = protocol.transport
        self.write = writerFor(protocol.transport)
        self.isClient = isClient
        self.name = "client" if isClient else "backend"
        self.scanner = FrameScanner(self, isClient, maxMessageSize, deflate)
        self.other = None
        self.closeSent = None  # (code, reason) of the close this side got
        self.closeReceived = None  # (code, reason) of the close it sent
        self.closedByLbws = False
        self.lost = False
        self.finished = False
        self.messages = 0
        self.bytes = 0
        self._held = []
        self._timer = None

    # FrameScanner's handler: frames this side sent.

    def forward(self, data):
        other = self.other
        if other.closeSent is None:
            other.write(data)

    def messageEnd(self, opcode, size):
        self.messages += 1
        self.bytes += size
        self.tunnel.messageFrom(self, size)

    def control(self, opcode, payload, raw):
        self.tunnel.controlFrom(self, opcode, payload, raw)

    def boundary(self):
        self.other.flushHeld()

    # Receiving.

    def received(self, data):
        try:
            self.scanner.feed(data)
        except ProtocolViolation as violation:
            self.tunnel.violationFrom(self, violation)

    def connectionLost(self, reason):
        self.lost = True
        self.finished = True
        self._cancelTimer()
        self.tunnel.legLost(self)

    # Sending frames of lbws's own.

    def send(self, frame):
        """
        Put a frame of lbws's own into this side's stream, now if the stream
        is between frames, else at the next boundary.

        @return: False if that boundary will never come (the other side is
            gone in the middle of a frame).
        """
        source = self.other.scanner
        if source.atBoundary:
            self.transport.write(frame)
        elif self.other.lost or source.stopped:
            return False
        else:
            self._held.append(frame)
            source.boundaryWanted = True
        return True

    def flushHeld(self):
        self.other.scanner.boundaryWanted = False
        held, self._held = self._held, []
        for frame in held:
            self.transport.write(frame)

    def close(self, code, reason, timeout=CLOSE_TIMEOUT):
        """
        lbws closes this side: send a close frame (unless one went already)
        and wait up to C{timeout} for the answer, which is not forwarded.
        """
        if self.finished:
            return
        self.closedByLbws = True
        if self.closeSent is None:
            frame = buildFrame(OP_CLOSE, closePayload(code, reason), masked=not self.isClient)
            if not self.send(frame):
                self.abort()
                return
            self.closeSent = (code, reason)
        if self.closeReceived is not None:
            self.finish()
        else:
            self.expectWithin(timeout)

    def fail(self, code, reason):
        """
        This side broke the protocol: send it a close frame and end the
        connection without reading its answer, as RFC 6455 (7.1.7) has an
        endpoint fail a WebSocket connection.
        """
        self.close(code, reason)
        self.finish()

    def expectWithin(self, timeout):
        """
        Cut this side's connection unless it finishes within C{timeout}
        (or an earlier deadline already set: lbws stopping with a short
        C{drain_timeout} shortens a close's wait, never lengthens it).
        """
        if self.finished:
            return
        reactor = self.tunnel.reactor
        if self._timer is None:
            self._timer = reactor.callLater(timeout, self.abort)
        elif self._timer.getTime() > reactor.seconds() + timeout:
            self._timer.reset(timeout)

    def finish(self):
        """
        The closing handshake on this side is over: end its TCP connection
        once what is queued for it is written.
        """
        if not self.finished:
            self.finished = True
            # A TLS transport holds its close back while it has a producer.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def abort(self):
        self._cancelTimer()
        self.finished = True
        if not self.lost:
            self.transport.abortConnection()

    def _cancelTimer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


@implementer(IPushProducer)
class PeerProducer:
    """
    One side's transport as the streaming producer of the other side's:
    when the other side cannot keep up, this side stops being read.

    Registering the transport itself would also make Twisted close it the
    moment the other side's connection is lost (it stops a consumer's
    producer first), before the relay could send its close frame and wait
    for the answer; ending connections is left to the relay.
    """

    def __init__(self, transport):
        self._transport = transport

    def pauseProducing(self):
        self._transport.pauseProducing()

    def resumeProducing(self):
        self._transport.resumeProducing()

    def stopProducing(self):
        pass


class Tunnel:
    """
    A client WebSocket joined to its backend WebSocket after both opening
    handshakes.
    """

    def __init__(self, relay, clientProtocol, backendProtocol, member, info, deflate=False):
        """
        @param deflate: whether the backend accepted the client's
            permessage-deflate offer, so that compressed frames pass.
        """
        self.relay = relay
        self.reactor = relay.reactor
        self.member = member
        self.info = info
        settings = relay.settings
        self.started = self.reactor.seconds()
        self.lastActivity = self.started
        size = settings.max_message_size
        self.client = Leg(self, clientProtocol, True, size, deflate)
        self.backend = Leg(self, backendProtocol, False, size, deflate)
        self.client.other = self.backend
        self.backend.other = self.client
        self.failure = None  # the close code and reason the client is owed
        self.closedFirstBy = None
        self.done = False
        self._pingPayload = None
        self._pingSeq = 0
        self._pingCall = None
        self._idleCall = None
        self._pingInterval = settings.ping_interval
        self._idleTimeout = settings.idle_timeout
        clientProtocol.leg = self.client
        backendProtocol.leg = self.backend
        self.client.transport.registerProducer(PeerProducer(self.backend.transport), True)
        self.backend.transport.registerProducer(PeerProducer(self.client.transport), True)
        if self._pingInterval:
            self._pingCall = self.reactor.callLater(self._pingInterval, self._ping)
        if self._idleTimeout:
            self._idleCall = self.reactor.callLater(self._idleTimeout, self._idleCheck)

    def start(self, clientEarly, backendEarly):
        """
        Relay whatever either side sent right behind its handshake.
        """
        if backendEarly:
            self.backend.received(backendEarly)
        if clientEarly:
            self.client.received(clientEarly)

    def messageFrom(self, leg, size):
        member = self.member
        if leg.isClient:
            member.messagesIn += 1
            member.bytesIn += size
        else:
            member.messagesOut += 1
            member.bytesOut += size
        if self._idleTimeout:
            self.lastActivity = self.reactor.seconds()

    def controlFrom(self, leg, opcode, payload, raw):
        other = leg.other
        if opcode == OP_CLOSE:
            self._closeFrom(leg, payload, raw)
        elif leg.isClient and opcode == OP_PONG and payload == self._pingPayload:
            self._pingPayload = None
        elif other.closeSent is None and not other.lost:
            # Pings and pongs pass through; the backend answers the client's.
            other.transport.write(raw)

    def _closeFrom(self, leg, payload, raw):
        other = leg.other
        leg.closeReceived = parseClosePayload(payload)
        leg.scanner.stopped = True
        if self.closedFirstBy is None:
            self.closedFirstBy = leg.name
        if leg.isClient and not leg.closedByLbws:
            violation = closeViolation(payload)
            if violation is not None:
                self.violationFrom(leg, violation)
                return
        if leg.closedByLbws:
            # The answer to lbws's own close is not passed on.
            leg.finish()
            self._closeOwed()
            return
        if other.closeSent is None and not other.lost and not other.closedByLbws:
            other.transport.write(raw)
            other.closeSent = leg.closeReceived
            other.expectWithin(CLOSE_TIMEOUT)
        elif leg.closeSent is None:
            # Nobody left to pass it to: lbws answers it, echoing the code.
            code, reason = leg.closeReceived
            leg.close(code if code != CLOSE_NO_STATUS else CLOSE_NORMAL, reason)
        for side in (leg, other):
            if side.closeSent is not None and side.closeReceived is not None:
                side.finish()

    def violationFrom(self, leg, violation):
        """
        A side broke the framing rules or sent a message over the limit.

        For a client, lbws closes the backend leg first and keeps relaying
        what the backend already sent, so that the client gets every reply
        to what it sent before the bad frame, then the close code it caused.
        """
        self.relay.counters.protocolErrors[(leg.name, violation.code)] += 1
        _log.info(
            "{side} {peer} broke the protocol: {code} {reason}",
            side=leg.name,
            peer=self.info.peer,
            code=violation.code,
            reason=violation.reason,
        )
        if self.closedFirstBy is None:
            self.closedFirstBy = leg.name
        if leg.isClient:
            self.failure = (violation.code, violation.reason)
            self.backend.close(CLOSE_GOING_AWAY, f"client error: {violation.reason}")
            self._closeOwed()
        else:
            self.backend.fail(violation.code, violation.reason)
            self.client.close(CLOSE_INTERNAL_ERROR, f"backend error: {violation.reason}")

    def legLost(self, leg):
        other = leg.other
        if other.lost:
            self._end()
            return
        if self.closedFirstBy is None:
            self.closedFirstBy = leg.name
        if leg.isClient:
            if other.closeSent is None:
                other.close(CLOSE_GOING_AWAY, "client went away")
            elif other.closeReceived is not None:
                other.finish()
            else:
                other.expectWithin(CLOSE_TIMEOUT)
        elif self.failure is not None:
            self._closeOwed()
        elif other.closeSent is None:
            if other.closeReceived is not None:
                # The client's close went to a backend that left without
                # answering: lbws answers it, as the backend should have.
                code, reason = other.closeReceived
                other.close(code if code != CLOSE_NO_STATUS else CLOSE_NORMAL, reason)
            elif leg.messages or leg.closeReceived is not None:
                other.close(CLOSE_INTERNAL_ERROR, "backend connection lost")
            else:
                other.close(CLOSE_BAD_GATEWAY, "backend never answered")
        elif other.closeReceived is not None:
            other.finish()
        else:
            other.expectWithin(CLOSE_TIMEOUT)

    def _closeOwed(self):
        """
        Once the backend leg is over, give the client the close it is owed.
        """
        if self.failure is not None and (self.backend.finished or self.backend.lost):
            self.client.fail(*self.failure)

    def shutdown(self, timeout):
        """
        lbws is stopping: close the client with 1001 and its backend
        cleanly, giving each up to C{timeout} to answer.
        """
        if self.closedFirstBy is None:
            self.closedFirstBy = "lbws"
        self.client.close(CLOSE_GOING_AWAY, "lbws is stopping", timeout)
        self.backend.close(CLOSE_GOING_AWAY, "lbws is stopping", timeout)

    def _ping(self):
        self._pingCall = None
        if self.client.closeSent is not None or self.client.finished:
            return
        if self._pingPayload is not None:
            _log.info("client {peer} did not answer a ping", peer=self.info.peer)
            if self.closedFirstBy is None:
                self.closedFirstBy = "lbws"
            self.client.abort()
            return
        self._pingSeq += 1
        self._pingPayload = b"lbws-%d" % (self._pingSeq,)
        self.client.send(buildFrame(OP_PING, self._pingPayload))
        self._pingCall = self.reactor.callLater(self._pingInterval, self._ping)

    def _idleCheck(self):
        self._idleCall = None
        idle = self.reactor.seconds() - self.lastActivity
        if idle < self._idleTimeout:
            self._idleCall = self.reactor.callLater(self._idleTimeout - idle, self._idleCheck)
            return
        if self.closedFirstBy is None:
            self.closedFirstBy = "lbws"
        self.client.close(CLOSE_GOING_AWAY, "idle timeout")
        self.backend.close(CLOSE_GOING_AWAY, "idle timeout")

    def _end(self):
        if self.done:
            return
        self.done = True
        for call in (self._pingCall, self._idleCall):
            if call is not None and call.active():
                call.cancel()
        self.member.active -= 1
        self.relay.tunnelEnded(self)
