"""
The client side's Autobahn server protocol and factory.

Autobahn does the client's opening handshake, which completes only after
the backend's (the client gets the backend's subprotocol); a client whose
backend cannot be had gets an HTTP error instead. After the handshake the
connection's bytes go to its L{Tunnel}.
"""

from http import HTTPStatus

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from lbws.http import httpproxy
from lbws.backends import sticky
from lbws.protocol.answers import Head, acceptedHeaders, render
from lbws.compat import (
    WriteThrough,
    answerRefusal,
    autobahnReadableHead,
    failHandshakeQuietly,
    handOver,
    isConnecting,
    processReceived,
    received,
    refuseHandshake,
    replaceReceived,
    requestTarget,
    takeReceived,
    UnparsedExtensions,
)
from lbws.backends.dial import Refused
from lbws.protocol.http1 import isWebSocketUpgrade
from lbws.protocol.headers import parseFields
from lbws.telemetry.logs import printable
from lbws.transport.tlserrors import clientTlsReason
from lbws.protocol.request import BadTarget, checkEscapes, normaliseTarget, takeAuthority
from lbws.protocol.strict import headEnd, headProblem, isToken, withCrlf
from lbws.transport.sockets import setNoDelay
from lbws.ws.tunnel import Tunnel
from lbws.protocol.wsoptions import PASSTHROUGH

# The longest request line and headers a client may send before its request
# is refused with 431 (nginx allows 4 x 8 KiB by default). Without a limit a
# client streaming headers that never end is buffered until
# handshake_timeout.
MAX_REQUEST_HEAD = 64 * 1024

# Seconds a refused client (400, 408, 431, 5xx...) gets to read its answer
# before its connection is cut: a graceful close waits for the peer (a TLS
# connection for its handshake), which a hostile one never lets end.
LINGER = 2.0


_log = Logger()


class ClientInfo:
    """
    What lbws knows of a client, for logs and balancing; it outlives the
    client's Autobahn protocol, which goes once the tunnel is joined.
    """

    __slots__ = ("peer", "target", "secure", "key", "keySource", "route", "subprotocol", "admitted")

    def __init__(self, peer, target, secure):
        self.peer = peer
        self.target = target
        self.secure = secure
        self.key = None  # balance = hash: the client's key, and
        self.keySource = None  # the hash_key it was taken by
        self.route = None  # its lbws.config.RouteSettings (lbws.backends.routes)
        self.subprotocol = None  # the one the backend chose
        self.admitted = False  # counted by the relay (Relay.clientGone)


class FrontendProtocol(UnparsedExtensions, WriteThrough, WebSocketServerProtocol):
    """
    A client's WebSocket. Its opening handshake waits for the backend's.
    """

    leg = None  # the plain HTTP proxy's, once it took over (lbws.http.httpproxy)
    info = None
    _answer = None
    _pending = None
    _paused = False
    _handshakeTimer = None
    _headSeen = False
    _fields = None
    _lost = False
    _deflate = False

    def connectionMade(self):
        super().connectionMade()
        setNoDelay(self.transport)
        relay = self.factory.relay
        self._handshakeTimer = relay.reactor.callLater(
            relay.settings.handshake_timeout, self._handshakeTimedOut
        )

    def _handshakeTimedOut(self):
        """
        The client did not send its request head in time: wherever it is
        stuck (TLS handshake, PROXY header, HTTP head), its TCP connection
        goes. A client that sent part of a request is told 408 first, but
        gets only L{LINGER} seconds to take it.
        """
        relay = self.factory.relay
        self._handshakeTimer = None
        relay.counters.handshakes["timeout"] += 1
        if not received(self):
            # Nothing of a request arrived, so there is nobody to answer:
            # abort, as a graceful close of a TLS connection would wait
            # for the handshake the client never finishes.
            self.transport.abortConnection()
            return
        refuseHandshake(self, "Request Timeout: handshake not completed in time", 408)

    def processHandshake(self):
        """
        Send a request that is not a WebSocket upgrade to the HTTP proxy,
        and check the raw head of one that is before Autobahn parses it
        (L{lbws.protocol.strict}, as the proxy checks its heads): one that
        breaks the field syntax gets 400.
        Autobahn reads a head with bare LF line ends as one with CRLF, and
        lbws forwards the headers it parsed itself when a value has bytes
        above 0x7F, which Autobahn versions read differently (see
        L{lbws.compat.autobahnReadableHead}).
        """
        if self._headSeen:
            # The head went to Autobahn already: what follows are frames
            # sent ahead, for the tunnel (Autobahn would look for a head
            # in them).
            return
        data = received(self)
        end = headEnd(data)
        if end < 0:
            return
        self._headSeen = True
        raw = data[:end]
        if not isWebSocketUpgrade(raw):
            # Plain HTTP: the HTTP proxy takes the connection over (README,
            # "Plain HTTP and long-polling") and checks the head itself.
            self._stopHandshakeTimer()
            takeReceived(self)
            httpproxy.takeOver(self, data)
            return
        problem = headProblem(raw)
        if problem is not None:
            refuseHandshake(self, f"Bad Request: {problem}", 400)
            return
        head = withCrlf(raw)
        readable = autobahnReadableHead(head)
        if readable is not head:
            self._fields = parseFields(head)
            head = readable
        if head is not raw:
            replaceReceived(self, head + data[end:])
        super().processHandshake()

    def resumeHandshake(self, data):
        """
        The HTTP proxy hands the connection back (a WebSocket upgrade after
        plain requests on it): C{data}, starting with that request's head,
        is read as if it were the first.
        """
        self.leg = None
        self._headSeen = False
        replaceReceived(self, data)
        processReceived(self)

    def onConnect(self, request):
        self._stopHandshakeTimer()
        relay = self.factory.relay
        if self._fields is not None:
            request.headers = self._fields
        peerHost = self._peerHost()
        target = requestTarget(self)
        for subprotocol in request.protocols:
            # They go to the backend in its request: tokens only.
            if not isToken(subprotocol):
                raise ConnectionDeny(400, f"Bad Request: subprotocol {subprotocol!r}")
        try:
            takeAuthority(target, request.headers)
            path = normaliseTarget(target).partition("?")[0]
            route = relay.routes.match(request.headers.get("host"), path, request.protocols)
            if route is not None:
                checkEscapes(target, route.escaped_slashes)
        except BadTarget as e:
            raise ConnectionDeny(400, f"Bad Request: {e}") from None
        if route is None:
            relay.counters.handshakes["no_route"] += 1
            self._answer = NO_ROUTE
            raise ConnectionDeny(404, "Not Found: no route for this request")
        origin = request.headers.get("origin")
        if origin is not None and not route.allowed_origins.allows(origin):
            relay.counters.handshakes["forbidden_origin"] += 1
            raise ConnectionDeny(403, f"Forbidden: origin {origin!r} is not allowed")
        secure = ISSLTransport.providedBy(self.transport)
        self.info = ClientInfo(peerHost, target, secure)
        self.info.route = route
        d = self._pending = relay.openBackend(self, request, self.info)

        def opened(result):
            self._pending = None
            self._member, self._backend = result
            headers = acceptedHeaders(self._backend.head)
            cookie = sticky.setCookie(
                route.sticky_cookie, self._member, request.headers.get("cookie"),
                relay.settings.sticky_secret,
            )
            if cookie is not None:
                headers.setdefault("Set-Cookie", []).append(cookie)
            if self._backend.extensions is not None:
                headers["Sec-WebSocket-Extensions"] = [self._backend.extensions]
                self._deflate = True
            return (self._backend.websocket_protocol_in_use, headers)

        def failed(failure):
            self._pending = None
            if failure.check(Refused):
                # Written instead of Autobahn's error answer, see
                # sendHttpErrorResponse.
                self._answer = failure.value.answer
            elif failure.check(CancelledError):
                # The client left while its backend was being opened: an
                # everyday event, which Autobahn logs in one info line.
                raise ConnectionDeny(499, "client left before its backend was open")
            return failure

        return d.addCallbacks(opened, failed)

    def failHandshake(self, reason, code=400, responseHeaders=None):
        """
        Answer with an HTTP error and close; a client that does not take
        the answer within L{LINGER} seconds is cut off. The access log gets
        one line for the refused handshake (Autobahn's own lines are left
        out: a refusal is lbws's or the application's answer, not a fault).
        """
        # Reasons can quote the client's request: escaped for the log.
        reason = printable(reason)
        failHandshakeQuietly(self, reason, code, responseHeaders)
        self._logRefused(code, reason)
        if not self._lost:
            self._stopHandshakeTimer()
            self._handshakeTimer = self.factory.relay.reactor.callLater(
                LINGER, self.transport.abortConnection
            )

    def _peerHost(self):
        peer = self.transport.getPeer()
        return getattr(peer, "host", None) or str(peer)

    def _logRefused(self, code, reason):
        peer = self._peerHost()
        try:
            target = printable(requestTarget(self))
        except (AttributeError, IndexError):
            target = "-"  # no request line was read
        route = self.info.route.name if self.info is not None and self.info.route else "-"
        _log.info(
            "{line}",
            line=f"{peer} {target} refused: {code} {reason}",
            log_format_access=True,
            peer=peer,
            target=target,
            route=route,
            status=code,
            reason=reason,
        )

    def sendHttpErrorResponse(self, code, reason, responseHeaders=None):
        """
        A backend's refusal reaches the client as lbws rebuilt it (status,
        end-to-end headers, body); Autobahn's own error answer has neither
        arbitrary headers nor a body. lbws's own 5xx tells the client only
        its standard reason: the details (a backend's name, TLS names, an
        exception) are for the log, where Autobahn's failHandshake and
        lbws's dialer put them.
        """
        if self._answer is not None:
            answerRefusal(self, self._answer)
            return
        if code >= 500:
            reason = _PHRASES.get(code, "Server Error")
        super().sendHttpErrorResponse(code, reason, responseHeaders)

    def onOpen(self):
        """
        Both handshakes are done: join the client to its backend in a
        L{Tunnel}, whose legs take over both transports, and let both
        Autobahn protocols go (an idle connection keeps only what the
        tunnel needs, see the README's Benchmark section).
        """
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        early = takeReceived(self)
        backend, self._backend = self._backend, None
        info = self.info
        info.subprotocol = backend.websocket_protocol_in_use
        tunnel = Tunnel(
            self.factory.relay,
            self.transport,
            backend.transport,
            self._member,
            backend.connection,
            info,
            info.route,
            self._deflate,
        )
        handOver(self, tunnel.client)
        handOver(backend, tunnel.backend)
        self.factory.relay.tunnelStarted(tunnel)
        tunnel.start(early, backend.early)

    def dataReceived(self, data):
        if self.leg is not None:
            self.leg.received(data)
            return
        super().dataReceived(data)
        if not isConnecting(self) or len(received(self)) <= MAX_REQUEST_HEAD:
            return
        if not self._headSeen:
            # Still reading the request head.
            refuseHandshake(self, "Request Header Fields Too Large", 431)
        elif self._pending is not None and not self._paused:
            # Frames sent ahead while the backend is being opened: read no
            # more of them until the tunnel takes them over.
            self._paused = True
            self.transport.pauseProducing()

    def connectionLost(self, reason):
        tls = clientTlsReason(reason)
        if getattr(self.transport, "plainHttp", False):
            self.factory.relay.tlsFailures.note("plain HTTP request (answered 400)")
        elif tls is not None:
            # The client's TLS failed (mostly its handshake): counted with
            # the others and logged once a minute, where Autobahn would log
            # an error for each.
            self.factory.relay.tlsFailures.note(tls)
        if tls is not None:
            reason = Failure(ConnectionLost(f"TLS failed: {tls}"))
        self._lost = True
        self._stopHandshakeTimer()
        if self.leg is not None:
            self.leg.connectionLost(reason)
        if self.info is not None:
            self.factory.relay.clientGone(self.info)
        super().connectionLost(reason)
        if self._pending is not None:
            # After Autobahn saw the connection closed, so that failing the
            # handshake logs one info line, not a warning about dropping it.
            self._pending.cancel()

    def _stopHandshakeTimer(self):
        if self._handshakeTimer is not None:
            if self._handshakeTimer.active():
                self._handshakeTimer.cancel()
            self._handshakeTimer = None


# What a WebSocket handshake no route matches gets (plain HTTP gets the
# same from lbws.http.httpproxy).
NO_ROUTE = render(
    Head(404, b"Not Found", [(b"Content-Type", b"text/plain; charset=utf-8")]),
    b"404 Not Found: no route for this request\n",
)
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


class FrontendFactory(WebSocketServerFactory):
    protocol = FrontendProtocol

    def __init__(self, relay):
        # No Server header of lbws's own: the backend's, if any, reaches
        # the client with its other headers.
        super().__init__(server=None, reactor=relay.reactor)
        self.relay = relay
        # Autobahn's own timers are off: lbws times handshakes on its
        # injected reactor, and Autobahn's go through txaio's batched timer,
        # which rounds deadlines down to whole seconds (fires early).
        self.setProtocolOptions(
            **PASSTHROUGH,
            webStatus=False,
        )
