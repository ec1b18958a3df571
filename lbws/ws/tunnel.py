"""
A tunnel: a client WebSocket joined to its backend WebSocket once both
opening handshakes are done.

Bytes are forwarded as they arrive, frames unchanged, while a
L{FrameScanner} per direction watches frame headers for what lbws must see:
message counts and sizes, the limits of the README's configuration table,
framing errors, and closes, which it passes on and maps. lbws puts frames
of its own (pings, closes) into a stream only at frame boundaries.

Each leg's transport is paused and resumed by the other through a
L{PeerProducer}, so a reader that does not keep up pauses the writer
instead of making lbws buffer.

The close state machine
=======================

Each leg is in one of these states, changed only by L{Leg}'s transition
methods (named in brackets); the L{Tunnel} decides which transition to take
and owns the tunnel-wide state (who closed first, the close a client that
broke the protocol is owed):

  - C{OPEN}: no close either way. Frames are relayed to it.
  - C{CLOSE_RECEIVED}: it sent a close, which went on to the other side
    (or lbws answers it); frames are still relayed to it.
    [L{Leg.closeFrame} from OPEN]
  - C{CLOSE_SENT}: the other side's close was passed on to it; its answer
    will be passed back. [L{Leg.passClose} from OPEN]
  - C{CLOSING}: lbws's own close went to it (or lbws took over a close in
    flight); its answer ends the leg and is not passed on.
    [L{Leg.close} from OPEN or CLOSE_SENT]
  - C{FINISHED}: its closing handshake is over, or it was cut; its TCP
    connection is ending. [L{Leg.closeFrame} from CLOSE_SENT or CLOSING;
    L{Leg.passClose} or L{Leg.close} from CLOSE_RECEIVED; L{Leg.abort},
    also when an answer does not come in time]
  - C{LOST}: its TCP connection is gone. [L{Leg.connectionLost}]

The tunnel ends when both legs are LOST. Every close lbws decides on
itself (stop, idle timeout, a client that stopped answering pings,
rebalancing, a protocol violation, a backend lost) goes through
L{Tunnel.close} or, for one leg, L{Leg.close}.

lbws's own close handshake
==========================

L{Leg.close} is the one place where lbws closes a side, whatever the
reason and the code (1001, 1002, 1007, 1008, 1009, 1012), on either leg:

  1. The close frame goes after what lbws already owes that side: at a
     frame boundary of the other side's stream, and for a client that
     broke the protocol, after everything its backend sent until the
     backend leg was over (L{Tunnel.owed}).
  2. Nothing more is relayed to it or from it.
  3. It is read until its own close frame: its frames are scanned as
     usual, or, after a violation, only delimited
     (L{FrameScanner.seekClose}), and dropped. A peer still sending what
     it had queued before it read lbws's close (300 messages sent at once
     behind an oversize one) is read to the end that way.
  4. Its close ends the leg (C{FINISHED}): lbws ends the TCP connection
     with a FIN once its close is written, with nothing left unread. An
     unread byte would make the kernel send a reset instead, and a reset
     can make the peer's kernel drop the close frame before the
     application reads it. (Closing without reading, as lbws once did for
     violations, lost the close in most runs; see the README's close
     codes.)

A peer that does not answer within L{CLOSE_TIMEOUT} (or the shorter
C{drain_timeout} of a stop) is cut. Reading it meanwhile never waits for
the other side: a leg that takes no more relayed frames releases the pause
its full buffer put on the other side (L{PeerProducer.release}).
"""

from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.logger import Logger
from zope.interface import implementer

from lbws.protocol.frames import (
    CLOSE_GOING_AWAY,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NO_STATUS,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_SERVICE_RESTART,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    UNLIMITED,
    FrameScanner,
    ProtocolViolation,
    buildFrame,
    closePayload,
    closeViolation,
    parseClosePayload,
)
from lbws.compat import hasQueuedWrites, isPlainTcp
from lbws.transport.sockets import (
    DEFAULT_READ_SIZE,
    adjustReadSize,
    endWriting,
    tcpTraffic,
    writerFor,
)

_log = Logger()

# What a violation with one of these codes is in the log: a limit of
# lbws's configuration reached, not a broken protocol.
_LIMITS = {
    CLOSE_MESSAGE_TOO_BIG: "went over a size limit",
    CLOSE_POLICY_VIOLATION: "went over a limit",
}

# Seconds a peer gets to answer lbws's close (or a close passed on to it)
# before its TCP connection is cut: lbws reads and drops what it sends
# meanwhile (see "lbws's own close handshake" above, and the README's close
# codes).
CLOSE_TIMEOUT = 5.0

# Pings and pongs a client may send per second (see the README's Security
# section); beyond, it is closed with 1008. Normal use is a few a minute.
CONTROL_FRAMES_PER_SECOND = 100

# Leg states, ordered: a leg moves only to a larger one.
OPEN = 0
CLOSE_RECEIVED = 1
CLOSE_SENT = 2
CLOSING = 3
FINISHED = 4
LOST = 5
STATE_NAMES = ("OPEN", "CLOSE_RECEIVED", "CLOSE_SENT", "CLOSING", "FINISHED", "LOST")

_NOT_YET = object()

# What Leg.send did with a frame.
WRITTEN = "written"
HELD = "held"  # until the stream reaches a frame boundary
IMPOSSIBLE = "impossible"  # that boundary will never come


def tcpOf(transport):
    """
    The TCP connection under a leg's transport, which can move to another
    process: the transport itself, or the one a PROXY protocol wrapper
    stands for once its header is read. None under TLS, whose state cannot
    move.
    """
    if isPlainTcp(transport):
        return transport
    if ISSLTransport.providedBy(transport):
        return None
    inner = getattr(transport, "transport", None)
    return inner if isPlainTcp(inner) else None


class _Rate:
    """
    At most C{limit} events in each one-second window (fixed windows): the
    refill of a scanner budget.
    """

    __slots__ = ("clock", "limit", "reason", "_start")

    def __init__(self, clock, limit, reason, start):
        self.clock = clock
        self.limit = limit
        self.reason = reason
        self._start = start

    def renew(self):
        """
        The budget has run out: start a new window, counting the event that
        spent it.

        @return: what is left of the new window's budget.
        @raise ProtocolViolation: 1008, if the window is not over yet.
        """
        now = self.clock.seconds()
        if now - self._start < 1.0:
            raise ProtocolViolation(CLOSE_POLICY_VIOLATION, self.reason)
        self._start = now
        return self.limit - 1


class Leg:
    """
    One side of a tunnel, and its half of the close state machine (see the
    module docstring). Its scanner reads the frames this side sends; the
    frames this side receives come from the other leg's scanner, or from
    lbws itself at frame boundaries.

    @ivar state: one of C{OPEN} ... C{LOST}.
    @ivar accepting: whether frames are relayed to this side (C{OPEN} or
        C{CLOSE_RECEIVED}), kept with C{state} for the per-frame path.
    @ivar closeSent: C{(code, reason)} of the close this side was sent.
    @ivar closeReceived: C{(code, reason)} of the close it sent.
    """

    __slots__ = (
        "tunnel",
        "transport",
        "write",
        "isClient",
        "name",
        "scanner",
        "other",
        "state",
        "accepting",
        "closeSent",
        "closeReceived",
        "_tcp",
        "_held",
        "_closeHeld",
        "_closeUnfindable",
        "_timer",
    )

    def __init__(
        self,
        tunnel,
        transport,
        isClient,
        settings,
        maxMessageSize,
        messageBudget,
        controlBudget,
        deflate=False,
    ):
        self.tunnel = tunnel
        self.transport = transport
        self.write = writerFor(transport)
        # The TCP transport whose read size follows the reads, if plain TCP.
        self._tcp = transport if isPlainTcp(transport) else None
        self.isClient = isClient
        self.name = "client" if isClient else "backend"
        self.scanner = FrameScanner(
            self, isClient, maxMessageSize, settings.max_frames_per_message, deflate
        )
        self.scanner.messageBudget = messageBudget
        self.scanner.controlBudget = controlBudget
        self.other = None
        self.state = OPEN
        self.accepting = True
        self.closeSent = None
        self.closeReceived = None
        self._held = None  # frames of lbws's own waiting for a boundary
        self._closeHeld = False  # lbws's close waits in _held
        self._closeUnfindable = False  # see closeUnfindable
        self._timer = None

    def __repr__(self):
        return f"<Leg {self.name} {STATE_NAMES[self.state]}>"

    @property
    def messages(self):
        """
        The data messages this side sent, as its scanner counted them.
        """
        return self.scanner.messages

    @property
    def bytes(self):
        return self.scanner.bytes

    # FrameScanner's handler: frames this side sent.

    def forward(self, data):
        other = self.other
        if other.accepting:
            other.write(data)

    def control(self, opcode, payload, raw):
        return self.tunnel.controlFrom(self, opcode, payload, raw)

    def closeSkipped(self, payload):
        self.tunnel.closeSkipped(self, parseClosePayload(payload))

    def closeUnfindable(self):
        """
        This side's close cannot be found in what it sends after its
        violation (L{FrameScanner.seekClose} gave up): once lbws's close to
        it is written, lbws ends its own side of the TCP connection (a FIN
        with nothing unread), so that the peer, which waits for the server
        to close first, closes too; what it sends meanwhile is dropped.
        """
        self._closeUnfindable = True
        self._endWritingIfUnfindable()

    def _endWritingIfUnfindable(self):
        if (
            self._closeUnfindable
            and self.closeSent is not None
            and not self._closeHeld
            and self.state < FINISHED
        ):
            self.transport.unregisterProducer()
            endWriting(self.transport)

    def boundary(self):
        self.other.flushHeld()

    def messageBudgetSpent(self):
        self.scanner.messageBudget = self.tunnel.messageBudgetSpent(self)

    def controlBudgetSpent(self):
        self.scanner.controlBudget = self.tunnel.controlBudgetSpent(self)

    # Receiving: once both handshakes are done, the leg is its transport's
    # protocol (see lbws.compat.handOver).

    def dataReceived(self, data):
        tcp = self._tcp
        # A small read at the default size, the common case, changes nothing.
        if tcp is not None and (
            len(data) == tcp.bufferSize or tcp.bufferSize != DEFAULT_READ_SIZE
        ):
            adjustReadSize(tcp, len(data))
        scanner = self.scanner
        messages = scanner.messages
        size = scanner.bytes
        try:
            scanner.feed(data)
        except ProtocolViolation as violation:
            self.tunnel.violationFrom(self, violation)
            # This side gets a close: its answer may be in this very read.
            scanner.seekClose()
        # The messages this read completed are counted once per read, not
        # once per message (bench/README.md: per-message cost).
        if scanner.messages != messages:
            self.tunnel.messagesFrom(self, scanner.messages - messages, scanner.bytes - size)

    # Transitions.

    def _enter(self, state):
        self.state = state
        # A close of lbws's own held behind a frame in flight: the rest of
        # that frame still has to go through.
        accepting = state <= CLOSE_RECEIVED or self._closeHeld
        if self.accepting and not accepting:
            self.tunnel.stoppedAccepting(self)
        self.accepting = accepting

    def closeFrame(self, record):
        """
        This side's close frame arrived.

        @return: the state the leg was in.
        """
        prior = self.state
        self.closeReceived = record
        self.scanner.stopped = True
        if prior == OPEN:
            self._enter(CLOSE_RECEIVED)
        elif prior in (CLOSE_SENT, CLOSING):
            self.finish()
        return prior

    def passClose(self, raw, record):
        """
        The other side's close frame C{raw} goes on to this side, which
        must be accepting.
        """
        self.write(raw)
        self.closeSent = record
        if self.state == CLOSE_RECEIVED:
            self.finish()
        else:
            self._enter(CLOSE_SENT)
            self.expectWithin(CLOSE_TIMEOUT)

    def close(self, code, reason, timeout=CLOSE_TIMEOUT):
        """
        lbws closes this side: send a close frame (unless one went already)
        and wait up to C{timeout} for the answer, which is not forwarded;
        this side is read meanwhile (see the module docstring, "lbws's own
        close handshake"). A side that already sent its close is finished
        at once.
        """
        state = self.state
        if state >= FINISHED:
            return
        if self.accepting and self.closeSent is None:
            frame = buildFrame(OP_CLOSE, closePayload(code, reason), masked=not self.isClient)
            sent = self.send(frame)
            if sent is IMPOSSIBLE:
                self.abort()
                return
            self._closeHeld = sent is HELD
            self.closeSent = (code, reason)
            self._endWritingIfUnfindable()
        if state == CLOSE_RECEIVED:
            self.finish()
        else:
            self._enter(CLOSING)
            self.expectWithin(timeout)

    def answer(self):
        """
        Answer this side's close with its own code (1005, no code, becomes
        1000), as the other side would have.
        """
        code, reason = self.closeReceived
        self.close(code if code != CLOSE_NO_STATUS else CLOSE_NORMAL, reason)

    def expectWithin(self, timeout):
        """
        Cut this side's connection unless it finishes within C{timeout}
        (or an earlier deadline already set: lbws stopping with a short
        C{drain_timeout} shortens a close's wait, never lengthens it).
        """
        if self.state >= FINISHED:
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
        if self.state < FINISHED:
            self._enter(FINISHED)
            if not self._closeHeld:
                self._endConnection()

    def _endConnection(self):
        # A TLS transport holds its close back while it has a producer.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abort(self):
        self._cancelTimer()
        if self.state < FINISHED:
            self._closeHeld = False
            self._enter(FINISHED)
            self.transport.abortConnection()

    def connectionLost(self, reason):
        self._enter(LOST)
        self._cancelTimer()
        self.tunnel.legLost(self)

    # Sending frames of lbws's own.

    def send(self, frame):
        """
        Put a frame of lbws's own into this side's stream, now if the stream
        is between frames, else at the next boundary.

        @return: L{WRITTEN}, L{HELD}, or L{IMPOSSIBLE} if that boundary will
            never come (the other side is gone in the middle of a frame).
        """
        source = self.other.scanner
        if source.atBoundary:
            self.write(frame)
            return WRITTEN
        if self.other.state == LOST or source.stopped:
            return IMPOSSIBLE
        if self._held is None:
            self._held = []
        self._held.append(frame)
        source.boundaryWanted = True
        return HELD

    def flushHeld(self):
        self.other.scanner.boundaryWanted = False
        held, self._held = self._held or (), None
        for frame in held:
            self.write(frame)
        if self._closeHeld:
            self._closeHeld = False
            self._enter(self.state)
            if self.state == FINISHED:
                self._endConnection()
            else:
                self._endWritingIfUnfindable()
        self.tunnel.heldWritten(self)

    # A take-over (lbws.ops.handoff): the leg's counts and its scanner move.

    def exportState(self):
        return {
            "messages": self.messages,
            "bytes": self.bytes,
            "scanner": self.scanner.exportState(),
        }

    def importState(self, state):
        scanner = self.scanner
        scanner.importState(state["scanner"])
        scanner.messages = int(state["messages"])
        scanner.bytes = int(state["bytes"])

    def quiet(self):
        """
        Whether the leg can move to another process now: open, between
        frames it relays to the other side, nothing of lbws's own waiting
        for a boundary, nothing queued for its socket.
        """
        tcp = tcpOf(self.transport)
        return (
            self.state == OPEN
            and self._held is None
            and self.scanner.atBoundary
            and not tcp.disconnecting
            and not hasQueuedWrites(tcp)
        )

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

    @ivar paused: whether the other side is holding this one back now.
    @ivar released: whether the other side takes no more of this one's
        frames, so that it never holds this one back again.
    """

    __slots__ = ("_transport", "paused", "released")

    def __init__(self, transport):
        self._transport = transport
        self.paused = False
        self.released = False

    def pauseProducing(self):
        if not self.released:
            self.paused = True
            self._transport.pauseProducing()

    def release(self):
        """
        The other side takes no more relayed frames: read this side
        whatever the other's buffer holds (this side may be waiting for
        the answer to a close, behind frames it still sends).
        """
        self.released = True
        if self.paused:
            self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        self._transport.resumeProducing()

    def stopProducing(self):
        pass


class Tunnel:
    """
    A client WebSocket joined to its backend WebSocket after both opening
    handshakes: the owner of the tunnel's close state (see the module
    docstring) and of its timers (keep-alive pings, idle timeout).

    @ivar closedFirstBy: C{"client"}, C{"backend"} or C{"lbws"}: who
        started the end of the tunnel, for the access log and metrics.
    @ivar owed: C{(code, reason)} the client gets once its backend leg is
        over, when the client broke the protocol.
    """

    __slots__ = (
        "relay",
        "reactor",
        "member",
        "connection",
        "info",
        "started",
        "lastActivity",
        "client",
        "backend",
        "owed",
        "closedFirstBy",
        "done",
        "away",
        "_backendProducer",
        "_clientProducer",
        "_traffic",
        "_lastTraffic",
        "_lastTick",
        "_pingPayload",
        "_pingWrittenAt",
        "_pingSeq",
        "_pingCall",
        "_idleCall",
        "_idleProgress",
        "_pingInterval",
        "_idleTimeout",
        "_maxMessageRate",
        "_messageRate",
        "_controlRate",
    )

    def __init__(
        self,
        relay,
        clientTransport,
        backendTransport,
        member,
        connection,
        info,
        route=None,
        deflate=False,
    ):
        """
        @param clientTransport: the client's transport, its opening
            handshake done; likewise C{backendTransport}. The legs become
            their protocols (L{lbws.compat.handOver}).
        @param connection: the L{lbws.backends.pool.Connection} the backend leg
            counts as on C{member}, closed when that leg is lost.
        @param info: the client's L{lbws.ws.server.ClientInfo}; the relay is
            told the client is gone (L{Relay.clientGone}) with it.
        @param route: the client's route (its own C{max_message_size}), or
            None for the settings' own.
        @param deflate: whether the backend accepted the client's
            permessage-deflate offer, so that compressed frames pass.
        """
        self.relay = relay
        reactor = self.reactor = relay.reactor
        self.member = member
        self.connection = connection
        self.info = info
        settings = relay.settings
        # The client's route may have its own max_message_size.
        maxMessageSize = (route or settings).max_message_size
        self.started = reactor.seconds()
        self.lastActivity = self.started
        self._maxMessageRate = settings.max_message_rate
        self._messageRate = None  # made when the first budget is spent
        self._controlRate = None
        self.client = Leg(
            self,
            clientTransport,
            True,
            settings,
            maxMessageSize,
            self._maxMessageRate or UNLIMITED,
            CONTROL_FRAMES_PER_SECOND,
            deflate,
        )
        self.backend = Leg(
            self, backendTransport, False, settings, maxMessageSize, UNLIMITED, UNLIMITED, deflate
        )
        self.client.other = self.backend
        self.backend.other = self.client
        self.owed = None
        self.closedFirstBy = None
        self.done = False
        self.away = False  # on its way to another process (a take-over)
        self._pingPayload = None
        self._pingWrittenAt = None
        self._pingSeq = 0
        self._pingCall = None
        self._idleCall = None
        self._idleProgress = (None, None)
        self._pingInterval = settings.ping_interval
        self._idleTimeout = settings.idle_timeout
        self._backendProducer = PeerProducer(self.backend.transport)
        self._clientProducer = PeerProducer(self.client.transport)
        self.client.transport.registerProducer(self._backendProducer, True)
        self.backend.transport.registerProducer(self._clientProducer, True)
        self._traffic = _NOT_YET  # looked up at the first ping tick
        self._lastTraffic = None
        self._lastTick = self.started
        if self._pingInterval:
            self._pingCall = reactor.callLater(self._pingInterval, self._ping)
        if self._idleTimeout:
            self._idleCall = reactor.callLater(self._idleTimeout, self._idleCheck)

    def start(self, clientEarly, backendEarly):
        """
        Relay whatever either side sent right behind its handshake.
        """
        if backendEarly:
            self.backend.dataReceived(backendEarly)
        if clientEarly:
            self.client.dataReceived(clientEarly)

    @property
    def movable(self):
        """
        Whether rebalancing may move this connection: nobody has started
        to close it, and it is not on its way to another process.
        """
        return (
            not self.done
            and not self.away
            and self.client.state == OPEN
            and self.backend.state == OPEN
        )

    # What the legs report.

    def messagesFrom(self, leg, count, size):
        """
        C{leg} completed C{count} messages of C{size} bytes in all, in one
        read.
        """
        self.member.traffic.message(leg.isClient, size, count)
        if self._idleTimeout:
            self.lastActivity = self.reactor.seconds()

    def controlFrom(self, leg, opcode, payload, raw):
        """
        A control frame from C{leg}.

        @return: for a ping or pong, whether it goes on to the other side
            (with the frames around it: see L{FrameScanner}).
        """
        if opcode == OP_CLOSE:
            self._closeFrom(leg, payload, raw)
            return False
        if leg.isClient and opcode == OP_PONG and payload == self._pingPayload:
            self._pingPayload = None
            return False
        # Pings and pongs pass through; the backend answers the client's.
        return True

    def _closeFrom(self, leg, payload, raw):
        self._first(leg.name)
        prior = leg.closeFrame(parseClosePayload(payload))
        if leg.isClient and prior != CLOSING:
            violation = closeViolation(payload)
            if violation is not None:
                self.violationFrom(leg, violation)
                return
        if prior == CLOSING:
            # The answer to lbws's own close is not passed on.
            self._payOwed()
        elif leg.other.accepting:
            leg.other.passClose(raw, leg.closeReceived)
        elif prior == OPEN:
            # Nobody left to pass it to: lbws answers it.
            leg.answer()

    def closeSkipped(self, leg, record):
        """
        A side that broke the protocol sent its close frame (found behind
        the frames lbws dropped): the answer to lbws's close, which
        finishes the leg; or a client's close that came while its own
        close waits for the backend leg, which that close will then
        answer.
        """
        if leg.closeFrame(record) == CLOSING and not leg.isClient:
            self._payOwed()

    def stoppedAccepting(self, leg):
        """
        C{leg} takes no more relayed frames: its buffer no longer holds the
        other side back (see L{PeerProducer.release}).
        """
        if leg is self.client:
            self._backendProducer.release()
        else:
            self._clientProducer.release()

    def violationFrom(self, leg, violation):
        """
        A side broke the framing rules or went over a limit.

        For a client, lbws closes the backend leg first and keeps relaying
        what the backend already sent, so that the client gets every reply
        to what it sent before the bad frame, then the close code it caused.
        A backend's client gets 1012, which client libraries retry (see the
        README's close codes); 1011 makes some give up for good.
        """
        self.relay.counters.protocolErrors[(leg.name, violation.code)] += 1
        _log.info(
            "{side} {peer} {what}: {code} {reason}",
            side=leg.name,
            peer=self.info.peer,
            what=_LIMITS.get(violation.code, "broke the protocol"),
            code=violation.code,
            reason=violation.reason,
        )
        if leg.isClient:
            self.close(
                violation.code,
                CLOSE_GOING_AWAY,
                violation.reason,
                "client",
                backendReason=f"client error: {violation.reason}",
                failed=leg,
            )
        else:
            self.close(
                CLOSE_SERVICE_RESTART,
                violation.code,
                f"backend error: {violation.reason}",
                "backend",
                backendReason=violation.reason,
                failed=leg,
            )

    def legLost(self, leg):
        if leg.isClient:
            self._legLost(leg)
            self.relay.clientGone(self.info)
        else:
            # The member's count ends before the tunnel's bookkeeping.
            self.connection.close()
            self._legLost(leg)

    def _legLost(self, leg):
        other = leg.other
        if other.state == LOST:
            self._end()
            return
        self._first(leg.name)
        if not leg.isClient and self.owed is not None:
            self._payOwed()
            return
        state = other.state
        if state == FINISHED:
            return
        if state >= CLOSE_SENT:
            other.expectWithin(CLOSE_TIMEOUT)
        elif leg.isClient:
            other.close(CLOSE_GOING_AWAY, "client went away")
        elif state == CLOSE_RECEIVED:
            # The client's close went to a backend that left without
            # answering: lbws answers it, as the backend should have.
            other.answer()
        elif leg.messages or leg.closeReceived is not None:
            # 1012, not 1011 nor 1014, which some client libraries take as
            # fatal (the README's close codes): the client reconnects, to
            # another backend if this one is down.
            other.close(CLOSE_SERVICE_RESTART, "backend connection lost")
        else:
            other.close(CLOSE_SERVICE_RESTART, "backend never answered")

    def messageBudgetSpent(self, leg):
        """
        A leg's scanner has counted its message budget down: the new
        budget, or a L{ProtocolViolation} for a client over
        C{max_message_rate}. Backends are not limited.
        """
        limit = self._maxMessageRate if leg.isClient else 0
        if not limit:
            return UNLIMITED
        if self._messageRate is None:
            reason = f"more than {limit} messages a second"
            self._messageRate = _Rate(self.reactor, limit, reason, self.started)
        return self._messageRate.renew()

    def controlBudgetSpent(self, leg):
        """
        The same for pings and pongs: at most L{CONTROL_FRAMES_PER_SECOND}
        from a client.
        """
        if not leg.isClient:
            return UNLIMITED
        if self._controlRate is None:
            limit = CONTROL_FRAMES_PER_SECOND
            reason = f"more than {limit} pings and pongs a second"
            self._controlRate = _Rate(self.reactor, limit, reason, self.started)
        return self._controlRate.renew()

    def heldWritten(self, leg):
        if leg.isClient and self._pingPayload is not None and self._pingWrittenAt is None:
            self._pingWrittenAt = self.reactor.seconds()

    # lbws's own decisions.

    def close(
        self,
        clientCode,
        backendCode,
        reason,
        by,
        backendReason=None,
        failed=None,
        timeout=CLOSE_TIMEOUT,
    ):
        """
        lbws ends the tunnel: the one path for stopping, timeouts,
        rebalancing and protocol violations.

        @param clientCode: the close code for the client, or None to cut
            its connection without a close frame (it stopped answering).
        @param backendCode: the close code for the backend.
        @param reason: the close reason for the client, and for the backend
            unless C{backendReason} is given.
        @param by: who caused it: C{"lbws"}, or the side that broke the
            protocol.
        @param failed: the leg that broke the protocol, if one did. A
            backend and its client are closed at once; a client only once
            its backend leg is over, so that it gets the replies to what it
            sent before.
        @param timeout: seconds each side gets to answer its close.
        """
        self._first(by)
        if backendReason is None:
            backendReason = reason
        client, backend = self.client, self.backend
        if failed is client:
            self.owed = (clientCode, reason)
            backend.close(backendCode, backendReason, timeout)
            self._payOwed()
            return
        if failed is backend:
            backend.close(backendCode, backendReason, timeout)
            if self.owed is None:
                client.close(clientCode, reason, timeout)
            else:
                # The client broke the protocol first: it gets its own
                # code once the backend leg is over.
                self._payOwed()
            return
        if clientCode is None:
            client.abort()
        else:
            client.close(clientCode, reason, timeout)
        backend.close(backendCode, backendReason, timeout)

    def shutdown(self, timeout):
        """
        lbws is stopping: close the client with 1001 and its backend
        cleanly, giving each up to C{timeout} to answer.
        """
        self.close(CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "lbws is stopping", "lbws", timeout=timeout)

    def abort(self):
        """
        Cut both connections now, without closing handshakes: lbws is told
        to stop at once.
        """
        self.client.abort()
        self.backend.abort()

    def endedWith(self):
        """
        Who ended the tunnel and with which close, for the access log: the
        client's own close if it closed first, else the one it was sent.

        @return: C{(side, code, reason)}.
        """
        client = self.client
        side = self.closedFirstBy or "lbws"
        ownClose = client.closeReceived
        if self.closedFirstBy == "client" and self.owed is None and ownClose is not None:
            return (side, *ownClose)
        for record in (client.closeSent, client.closeReceived):
            if record is not None:
                return (side, *record)
        return side, 1006, "connection dropped"

    def _first(self, by):
        if self.closedFirstBy is None:
            self.closedFirstBy = by

    def _payOwed(self):
        """
        Once the backend leg is over, give the client the close it is owed.
        """
        if self.owed is not None and self.backend.state >= FINISHED:
            self.client.close(*self.owed)

    # Keep-alive pings and the idle timeout.

    def _clientTraffic(self):
        """
        A value that changes whenever the client takes or sends bytes: its
        TCP counters where the kernel has them (bytes it acknowledged, so a
        slow reader counts as alive while it reads), else how far its own
        frames got.
        """
        if self._traffic is not None:
            traffic = self._traffic()
            if traffic is not None:
                return traffic
        return self.client.messages, self.client.scanner.progress

    def _ping(self):
        """
        Each C{ping_interval}: ping the client; cut it if a ping written
        at least one interval ago is unanswered and the client has neither
        taken nor sent a byte since the last tick. A ping held behind a
        backend frame in flight does not count until it is written, unless
        the client is not reading that frame.
        """
        self._pingCall = None
        client = self.client
        if not client.accepting:
            return
        now = self.reactor.seconds()
        if self._traffic is _NOT_YET:
            # Not at the start: short connections never pay for it.
            self._traffic = tcpTraffic(client.transport)
        traffic = self._clientTraffic()
        moved = traffic != self._lastTraffic
        self._lastTraffic = traffic
        if self._pingPayload is not None:
            writtenAt = self._pingWrittenAt
            if writtenAt is None:
                stuck = self._backendProducer.paused
            else:
                stuck = writtenAt <= self._lastTick
            if stuck and not moved:
                _log.info("client {peer} did not answer a ping", peer=self.info.peer)
                self.close(None, CLOSE_GOING_AWAY, "client went away", "lbws")
                return
        else:
            self._pingSeq += 1
            self._pingPayload = b"lbws-%d" % (self._pingSeq,)
            sent = client.send(buildFrame(OP_PING, self._pingPayload))
            self._pingWrittenAt = now if sent is WRITTEN else None
        self._lastTick = now
        self._pingCall = self.reactor.callLater(self._pingInterval, self._ping)

    def _idleCheck(self):
        """
        Each C{idle_timeout}: close both sides with 1001 if no message went
        either way for that long. Bytes of a message still in progress
        count: such a message moved if its scanner got further since the
        last check.
        """
        self._idleCall = None
        now = self.reactor.seconds()
        progress = (self.client.scanner.progress, self.backend.scanner.progress)
        if progress != self._idleProgress:
            if progress != (None, None):
                self.lastActivity = now
            self._idleProgress = progress
        idle = now - self.lastActivity
        if idle < self._idleTimeout:
            self._idleCall = self.reactor.callLater(self._idleTimeout - idle, self._idleCheck)
            return
        self.close(CLOSE_GOING_AWAY, CLOSE_GOING_AWAY, "idle timeout", "lbws")

    # A take-over (lbws.ops.handoff): the tunnel moves to another process.

    @property
    def canMove(self):
        """
        Whether the tunnel could ever move to another process: both legs
        TCP underneath without TLS (its state does not cross processes) and
        nobody closing.
        """
        return (
            not self.done
            and self.client.state == OPEN
            and self.backend.state == OPEN
            and tcpOf(self.client.transport) is not None
            and tcpOf(self.backend.transport) is not None
        )

    @property
    def sockets(self):
        """
        The TCP connections of both legs, C{(client, backend)}, for a tunnel
        that L{canMove}: what goes to the other process.
        """
        return tcpOf(self.client.transport), tcpOf(self.backend.transport)

    def handoffState(self):
        """
        The tunnel's state as JSON values, if it can move now: both legs
        L{Leg.quiet}. Else None: try again at another moment.
        """
        if not (self.canMove and self.client.quiet() and self.backend.quiet()):
            return None
        return self.exportState()

    def exportState(self):
        """
        The tunnel's state as JSON values, for L{importState} in another
        process: counts, scanners, the client info of the access log, the
        ping and idle timers (as times left, the clocks being others).
        """
        client, backend = self.client, self.backend
        now = self.reactor.seconds()
        info = self.info

        def left(call):
            return max(0.0, call.getTime() - now) if call is not None and call.active() else None

        payload = self._pingPayload
        lastTraffic = self._lastTraffic
        return {
            "client": client.exportState(),
            "backend": backend.exportState(),
            "member": self.member.name,
            "route": info.route.name,
            "peer": info.peer,
            "target": info.target,
            "key": info.key,
            "keySource": info.keySource,
            "subprotocol": info.subprotocol,
            "age": now - self.started,
            "idle": now - self.lastActivity,
            "pingSeq": self._pingSeq,
            "pingPayload": None if payload is None else payload.decode("latin-1"),
            "pingWrittenAgo": None if self._pingWrittenAt is None else now - self._pingWrittenAt,
            "lastTickAgo": now - self._lastTick,
            "lastTraffic": list(lastTraffic) if isinstance(lastTraffic, tuple) else lastTraffic,
            "nextPing": left(self._pingCall),
            "nextIdle": left(self._idleCall),
            "idleProgress": list(self._idleProgress),
        }

    def detach(self):
        """
        Stop reading both sides and stop the timers, so that the state just
        taken by L{handoffState} stays true while it is on its way.
        """
        self.away = True
        for tcp in self.sockets:
            tcp.stopReading()
        self._stopTimers()

    def reattach(self, state):
        """
        The other process did not take the tunnel: go on here, from the
        state L{detach} froze.
        """
        self.away = False
        self._startTimers(state)
        for tcp in self.sockets:
            tcp.startReading()

    def importState(self, state):
        """
        Go on from the state of the same tunnel in another process
        (L{handoffState}): counts, scanners, ping and idle timers.
        """
        now = self.reactor.seconds()
        self.client.importState(state["client"])
        self.backend.importState(state["backend"])
        self.started = now - float(state["age"])
        self.lastActivity = now - float(state["idle"])
        self._pingSeq = int(state["pingSeq"])
        payload = state["pingPayload"]
        self._pingPayload = None if payload is None else payload.encode("latin-1")
        ago = state["pingWrittenAgo"]
        self._pingWrittenAt = None if ago is None else now - float(ago)
        self._lastTick = now - float(state["lastTickAgo"])
        lastTraffic = state["lastTraffic"]
        self._lastTraffic = tuple(lastTraffic) if isinstance(lastTraffic, list) else lastTraffic
        self._idleProgress = tuple(state["idleProgress"])
        self._stopTimers()
        self._startTimers(state)

    def _stopTimers(self):
        for call in (self._pingCall, self._idleCall):
            if call is not None and call.active():
                call.cancel()
        self._pingCall = self._idleCall = None

    def _startTimers(self, state):
        reactor = self.reactor
        if self._pingInterval:
            delay = state["nextPing"]
            delay = self._pingInterval if delay is None else min(float(delay), self._pingInterval)
            self._pingCall = reactor.callLater(delay, self._ping)
        if self._idleTimeout:
            delay = state["nextIdle"]
            delay = self._idleTimeout if delay is None else min(float(delay), self._idleTimeout)
            self._idleCall = reactor.callLater(delay, self._idleCheck)

    def moved(self):
        """
        Another process took the tunnel over: this one forgets it without
        closing either connection (the sockets live on over there).
        """
        self.done = True
        self._stopTimers()
        self.client.transport.unregisterProducer()
        self.backend.transport.unregisterProducer()
        self.connection.close()
        self.relay.clientGone(self.info)
        self.relay.tunnelMoved(self)

    def _end(self):
        if self.done:
            return
        self.done = True
        for call in (self._pingCall, self._idleCall):
            if call is not None and call.active():
                call.cancel()
        self.relay.tunnelEnded(self)
