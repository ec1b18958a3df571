"""
The relay: the per-message data path between a client and its backend.

Autobahn does both opening handshakes: the client's completes only after
the backend's (the client gets the backend's subprotocol), and a client
whose backend cannot be had gets an HTTP error instead. After that the two
sockets form a L{Tunnel}: bytes are forwarded as they arrive, frames
unchanged, while a L{FrameScanner} per direction watches frame headers for
what lbws must see: message counts and sizes, C{max_message_size}, framing
errors, and closes, which it passes on and maps. lbws puts frames of its own
(pings, closes) into a stream only at frame boundaries.

Each transport is registered as the streaming producer of the other, so a
reader that does not keep up pauses the writer instead of making lbws buffer.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from zope.interface import implementer

from lbws import autobahn as _autobahn
from lbws.balance import hashKeyOf
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
from lbws.sockets import setNoDelay, writerFor

_log = Logger()
_autobahn.install()

# Seconds a peer gets to answer a close before its TCP connection is cut.
CLOSE_TIMEOUT = 5.0

# The longest request line and headers a client may send before its request
# is refused with 431 (nginx allows 4 x 8 KiB by default). Without a limit a
# client streaming headers that never end is buffered until
# handshake_timeout.
MAX_REQUEST_HEAD = 64 * 1024


class Leg:
    """
    One side of a tunnel. Its scanner reads the frames this side sends; the
    frames this side receives come from the other leg's scanner, or from
    lbws itself at frame boundaries.
    """

    def __init__(self, tunnel, protocol, isClient, maxMessageSize):
        self.tunnel = tunnel
        self.protocol = protocol
        self.transport = protocol.transport
        self.write = writerFor(protocol.transport)
        self.isClient = isClient
        self.name = "client" if isClient else "backend"
        self.scanner = FrameScanner(self, isClient, maxMessageSize)
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

    def __init__(self, relay, clientProtocol, backendProtocol, member, info):
        self.relay = relay
        self.reactor = relay.reactor
        self.member = member
        self.info = info
        settings = relay.settings
        self.started = self.reactor.seconds()
        self.lastActivity = self.started
        self.client = Leg(self, clientProtocol, True, settings.max_message_size)
        self.backend = Leg(self, backendProtocol, False, settings.max_message_size)
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


class ClientInfo:
    """
    What lbws knows of a client, for logs and balancing.
    """

    def __init__(self, peer, target, secure):
        self.peer = peer
        self.target = target
        self.secure = secure
        self.key = None  # balance = hash: the client's key, and
        self.keySource = None  # the hash_key it was taken by


class FrontendProtocol(WebSocketServerProtocol):
    """
    A client's WebSocket. Its opening handshake waits for the backend's.
    """

    leg = None
    _pending = None
    _paused = False
    _handshakeTimer = None

    def connectionMade(self):
        super().connectionMade()
        setNoDelay(self.transport)
        relay = self.factory.relay
        self._handshakeTimer = relay.reactor.callLater(
            relay.settings.handshake_timeout, self._handshakeTimedOut
        )

    def _handshakeTimedOut(self):
        self._handshakeTimer = None
        self.factory.relay.counters.handshakes["timeout"] += 1
        self.failHandshake("Request Timeout: handshake not completed in time", 408)

    def onConnect(self, request):
        self._stopHandshakeTimer()
        relay = self.factory.relay
        peer = self.transport.getPeer()
        peerHost = getattr(peer, "host", None) or str(peer)
        target = self.http_status_line.split()[1]
        secure = ISSLTransport.providedBy(self.transport)
        self.info = ClientInfo(peerHost, target, secure)
        d = self._pending = relay.openBackend(self, request, self.info)

        def opened(result):
            self._pending = None
            self._member, self._backend = result
            return (
                self._backend.websocket_protocol_in_use,
                _backendResponseHeaders(self._backend),
            )

        return d.addCallback(opened)

    def onOpen(self):
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        early, self.data = self.data, b""
        backend = self._backend
        del self._backend
        tunnel = Tunnel(self.factory.relay, self, backend, self._member, self.info)
        self.factory.relay.tunnelStarted(tunnel)
        tunnel.start(early, backend.early)

    def dataReceived(self, data):
        if self.leg is not None:
            self.leg.received(data)
            return
        super().dataReceived(data)
        if self.state != self.STATE_CONNECTING or len(self.data) <= MAX_REQUEST_HEAD:
            return
        if self._handshakeTimer is not None:
            # Still reading the request head (onConnect stops the timer).
            self._stopHandshakeTimer()
            self.failHandshake("Request Header Fields Too Large", 431)
        elif self._pending is not None and not self._paused:
            # Frames sent ahead while the backend is being opened: read no
            # more of them until the tunnel takes them over.
            self._paused = True
            self.transport.pauseProducing()

    def connectionLost(self, reason):
        self._stopHandshakeTimer()
        if self.leg is not None:
            self.leg.connectionLost(reason)
        elif self._pending is not None:
            self._pending.cancel()
        self.factory.relay.clientGone(self)
        super().connectionLost(reason)

    def _stopHandshakeTimer(self):
        if self._handshakeTimer is not None:
            if self._handshakeTimer.active():
                self._handshakeTimer.cancel()
            self._handshakeTimer = None


def _backendResponseHeaders(backend):
    """
    Set-Cookie lines of the backend's handshake answer, for the client.
    """
    cookies = []
    for line in backend.http_response_data.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"set-cookie":
            cookies.append(value.strip().decode("latin-1"))
    return {"Set-Cookie": cookies} if cookies else {}


class FrontendFactory(WebSocketServerFactory):
    protocol = FrontendProtocol

    def __init__(self, relay):
        super().__init__(server="lbws", reactor=relay.reactor)
        self.relay = relay
        # Autobahn's own timers are off: lbws times handshakes on its
        # injected reactor, and Autobahn's go through txaio's batched timer,
        # which rounds deadlines down to whole seconds (fires early).
        self.setProtocolOptions(
            webStatus=False,
            failByDrop=False,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            autoPingInterval=0,
            utf8validateIncoming=False,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            perMessageCompressionAccept=lambda offers: None,
            tcpNoDelay=True,
        )


class Relay:
    """
    All client connections of one lbws: admission, backend choice, the
    open tunnels, and draining them on stop.
    """

    def __init__(self, reactor, settings, pool, dialer, counters):
        self.reactor = reactor
        self.settings = settings
        self.pool = pool
        self.dialer = dialer
        self.counters = counters
        self.tunnels = set()
        self.clients = 0  # client connections past admission, open or pending
        self.opening = {}  # client protocol -> its backend attempt, until settled
        self.stopping = False
        self._drained = None

    def factory(self):
        return FrontendFactory(self)

    def openBackend(self, protocol, request, info):
        """
        Admit a client and open its backend.

        @return: Deferred firing with C{(member, BackendProtocol)} or
            failing with C{ConnectionDeny}.
        """
        if self.stopping:
            return fail(ConnectionDeny(503, "Service Unavailable: lbws is stopping"))
        if self.clients >= self.settings.max_connections:
            self.counters.handshakes["over_capacity"] += 1
            return fail(ConnectionDeny(503, "Service Unavailable: too many connections"))
        self.clients += 1
        protocol.admitted = True
        if self.settings.balance == "hash":
            # Gradual rebalancing moves connections whose key maps elsewhere.
            info.keySource = str(self.settings.hash_key)
            info.key = hashKeyOf(self.settings.hash_key, info.peer, request)
        d = self.opening[protocol] = self.dialer.dial(
            request, info.target, info.peer, info.secure
        )

        def opened(result):
            self.opening.pop(protocol, None)
            self.counters.handshakes["ok"] += 1
            return result

        def failed(failure):
            self.opening.pop(protocol, None)
            if self.stopping and failure.check(CancelledError):
                # stop() gave up this attempt: tell the client why.
                raise ConnectionDeny(503, "Service Unavailable: lbws is stopping")
            return failure

        return d.addCallbacks(opened, failed)

    def tunnelStarted(self, tunnel):
        self.tunnels.add(tunnel)

    def clientGone(self, protocol):
        if getattr(protocol, "admitted", False):
            protocol.admitted = False
            self.clients -= 1

    def tunnelEnded(self, tunnel):
        self.tunnels.discard(tunnel)
        client = tunnel.client
        code, reason = _firstClose(tunnel)
        side = tunnel.closedFirstBy or "lbws"
        self.counters.closes[(side, code)] += 1
        _log.info(
            "{peer} {target} via {backend}: {duration:.3f}s,"
            " {messagesIn} msgs/{bytesIn} B in, {messagesOut} msgs/{bytesOut} B out,"
            " close {code} by {side}",
            log_format_access=True,
            peer=tunnel.info.peer,
            target=tunnel.info.target,
            backend=tunnel.member.name,
            subprotocol=client.protocol.websocket_protocol_in_use,
            duration=self.reactor.seconds() - tunnel.started,
            messagesIn=client.messages,
            bytesIn=client.bytes,
            messagesOut=tunnel.backend.messages,
            bytesOut=tunnel.backend.bytes,
            code=code,
            reason=reason,
            side=side,
        )
        # A backend a reload removed leaves with its last connection.
        self.pool.leaveIfIdle(tunnel.member)
        if self._drained is not None and not self.tunnels:
            d, self._drained = self._drained, None
            d.callback(None)

    def abort(self):
        """
        Cut every open connection now, without closing handshakes: a
        second stop signal does this when an operator will not wait for
        C{drain_timeout}.
        """
        self.stopping = True
        for tunnel in list(self.tunnels):
            tunnel.client.abort()
            tunnel.backend.abort()

    def stop(self, timeout):
        """
        Refuse new clients and close the open ones with 1001.

        @return: a Deferred that fires once every tunnel has ended (each
            side gets up to C{timeout} to answer its close).
        """
        self.stopping = True
        # Clients whose handshake waits for a backend get 503 now; left to
        # finish, they would open after the drain and be cut at exit.
        for attempt in list(self.opening.values()):
            attempt.cancel()
        if not self.tunnels:
            return succeed(None)
        self._drained = Deferred()
        for tunnel in list(self.tunnels):
            tunnel.shutdown(timeout)
        return self._drained


def _firstClose(tunnel):
    """
    The close code and reason that ended the connection, for the access
    log: the client's own if it closed first, else the one it was sent.
    """
    client = tunnel.client
    if tunnel.closedFirstBy == "client" and client.closeReceived is not None:
        return client.closeReceived
    if client.closeSent is not None:
        return client.closeSent
    if client.closeReceived is not None:
        return client.closeReceived
    return 1006, "connection dropped"
