"""
The client side's Autobahn server protocol and factory.

Autobahn does the client's opening handshake, which completes only after
the backend's (the client gets the backend's subprotocol); a client whose
backend cannot be had gets an HTTP error instead. After the handshake the
connection's bytes go to its L{Tunnel}.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.interfaces import ISSLTransport

from lbws import extensions
from lbws.sockets import setNoDelay
from lbws.tunnel import Tunnel

# The longest request line and headers a client may send before its request
# is refused with 431 (nginx allows 4 x 8 KiB by default). Without a limit a
# client streaming headers that never end is buffered until
# handshake_timeout.
MAX_REQUEST_HEAD = 64 * 1024


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
    _deflate = False
    # Autobahn seam (see extensions.unparsedExtensions): the client gets the
    # backend's Sec-WebSocket-Extensions answer, not Autobahn's.
    _parseExtensionsHeader = extensions.unparsedExtensions

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
            headers = _backendResponseHeaders(self._backend)
            agreed = extensions.accepted(self._backend.http_headers)
            if agreed is not None:
                headers["Sec-WebSocket-Extensions"] = agreed
                self._deflate = True
            return self._backend.websocket_protocol_in_use, headers

        return d.addCallback(opened)

    def onOpen(self):
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        early, self.data = self.data, b""
        backend = self._backend
        del self._backend
        tunnel = Tunnel(
            self.factory.relay, self, backend, self._member, self.info, self._deflate
        )
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
            tcpNoDelay=True,
        )
