"""
Opening the backend WebSocket for a client: members tried in turn
(L{lbws.backends.attempts}: choice, retries, what a failure counts as and
the status the client gets), each with C{connect_timeout} and
C{handshake_timeout}.

An answer other than 101 is the application speaking: the client gets it
as it is, and it is neither retried nor counted.
"""

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.python.failure import Failure

from lbws.protocol import extensions
from lbws.protocol.answers import Head, render
from lbws.backends.attempts import Attempts
from lbws.backends.backend import (
    Attempt,
    BackendHandshakeError,
    BackendProtocol,
    BackendRefused,
    OpeningError,
    Shortages,
)
from lbws.compat import OctetRequest, UnparsedExtensions, takeReceived
from lbws.protocol.headers import forwardedHeaders
from lbws.protocol.request import joinTarget, normaliseTarget
from lbws.backends.redirects import RedirectRewriter
from lbws.backends.routes import forwardTarget

# A handshake whose backend timed out is refused with 502, not 504: the
# README promises WebSocket clients 502 or 503 when no backend answers, and
# client libraries retry on those.
WEBSOCKET_TIMEOUT_STATUS = 502

class Refused(ConnectionDeny):
    """
    The backend refused the handshake: C{answer} is what the client gets,
    built by L{lbws.protocol.answers.render}.
    """

    def __init__(self, refusal, redirects=None):
        super().__init__(refusal.head.status, str(refusal))
        head = refusal.head
        if redirects is not None:
            head = Head(
                head.status,
                head.reason,
                [
                    (n, redirects.rewrite(n.decode("latin-1"), v.decode("latin-1")).encode("latin-1"))
                    for n, v in head.headers
                ],
            )
        self.answer = render(head, refusal.body)


class RelayProtocol(UnparsedExtensions, OctetRequest, BackendProtocol):
    """
    A backend WebSocket for a client: once open, its connection is handed
    over to the client's L{lbws.ws.tunnel.Tunnel} (L{lbws.ws.server}).
    """

    # The Sec-WebSocket-Extensions answer both legs agreed on, or None.
    extensions = None

    def onOpen(self):
        # Bytes that came right behind the handshake belong to the relay.
        self.early = takeReceived(self)
        super().onOpen()


class Dialer:
    """
    Opens backend WebSockets for clients, with retries across members.
    """

    def __init__(self, reactor, pool, settings, counters):
        self._reactor = reactor
        self._pool = pool
        self.settings = settings
        self._counters = counters
        self.shortages = Shortages(reactor, "opening backend connections: new clients get 503")

    def dial(self, request, target, peerHost, secure, key=None, prefer=None, route=None):
        """
        Open a WebSocket to a healthy member on behalf of a client.

        @param request: the client's Autobahn C{ConnectionRequest}.
        @param target: the client's request target (path and query) exactly
            as it sent it.
        @param key: the client's hash key (C{balance = hash}), or None.
        @param prefer: the member to try first (the one the client's
            C{sticky_cookie} names), else the balancer chooses.
        @param route: the client's L{lbws.config.RouteSettings}: its
            members are tried, its target rule applies (C{strip_prefix});
            None for every member and the target as it is.
        @return: a Deferred firing with C{(member, RelayProtocol)}, or
            failing with C{ConnectionDeny} carrying the HTTP status the
            client should get (L{Refused} with the backend's own answer).
            Cancelling it closes any backend attempt.
        """
        if route is not None:
            target = forwardTarget(route, normaliseTarget(target))
        return _ClientDial(
            self, request, target, peerHost, secure, key, prefer, route
        ).next()


class _ClientDial:
    """
    One client's way to a backend: members tried in turn until one opens.
    """

    def __init__(self, dialer, request, target, peerHost, secure, key, prefer=None, route=None):
        self._dialer = dialer
        self._route = route
        # The client's permessage-deflate offer, as the backend gets it.
        self._offer = extensions.forwardedOffer(request.headers, dialer.settings.compression)
        self._settings = dialer.settings
        self._request = request
        self._target = target
        self._peer = peerHost
        self._secure = secure
        self._tries = Attempts(
            dialer._reactor, dialer._pool, dialer.settings, dialer.shortages, peerHost,
            key, prefer, route, timeoutStatus=WEBSOCKET_TIMEOUT_STATUS,
        )
        self._attempt = None
        self.result = Deferred(self._cancel)

    def _cancel(self, _):
        if self._attempt is not None:
            self._attempt.cancel()

    def next(self):
        member = self._tries.next()
        if member is None:
            self._giveUp(self._tries.exhausted())
            return self.result
        connection = member.opened()
        try:
            d = self._attempt = self._open(member, connection)
        except Exception as e:
            connection.close()
            d = fail(OpeningError(f"{type(e).__name__}: {e}"))
        d.addCallbacks(self._opened, self._failed, callbackArgs=(member,), errbackArgs=(member,))
        return self.result

    def _open(self, member, connection):
        settings = self._settings
        backend = member.settings
        headers, useragent, origin = forwardedHeaders(
            self._request, self._peer, self._secure,
            (self._route or settings).underscores_in_headers,
        )
        if self._offer is not None:
            headers["Sec-WebSocket-Extensions"] = self._offer
        attempt = Attempt(
            self._dialer._reactor,
            backend,
            joinTarget(backend.path, self._target),
            RelayProtocol,
            settings.connect_timeout,
            settings.handshake_timeout,
            connection=connection,
            protocols=self._request.protocols,
            headers=headers,
            useragent=useragent,
            origin=origin,
            hostHeader=self._hostHeader(),
        )
        return attempt.start()

    def _redirects(self, member):
        """
        With C{host_header = backend}, what rewrites the backend's own URLs
        in its refusal to the client's (L{lbws.backends.redirects}).
        """
        host = self._request.headers.get("host")
        if self._hostHeader() is not None or host is None:
            return None
        return RedirectRewriter(member.settings, host, self._secure)

    def _hostHeader(self):
        """
        The client's Host for the backend, unless the route says the
        backend gets its own (C{host_header = backend}).
        """
        route = self._route
        if route is not None and route.host_header == "backend":
            return None
        return self._request.headers.get("host")

    def _opened(self, protocol, member):
        self._attempt = None
        answer = extensions.answerIn(protocol.head)
        why = extensions.answerProblem(answer, self._offer)
        if why is not None:
            # Not what the client offered: a backend that breaks the
            # handshake, closed normally, counted, and the next one tried.
            protocol.connection.close()
            protocol.transport.loseConnection()
            self._failed(Failure(BackendHandshakeError(f"backend handshake failed: {why}")), member)
            return
        protocol.extensions = answer
        self._tries.succeeded()
        self.result.callback((member, protocol))

    def _failed(self, failure, member):
        self._attempt = None
        dialer = self._dialer
        dialer._pool.leaveIfIdle(member)
        if failure.check(CancelledError):
            return
        if failure.check(BackendRefused):
            # The application answered: the backend is running.
            self._tries.succeeded()
            dialer._counters.handshakes["backend_refused"] += 1
            self._fail(Refused(failure.value, self._redirects(member)))
            return
        giveUp = self._tries.failed(failure)
        if giveUp is None:
            self.next()
        else:
            self._giveUp(giveUp)

    def _giveUp(self, giveUp):
        self._dialer._counters.handshakes[giveUp.result] += 1
        self._fail(ConnectionDeny(giveUp.status, f"{giveUp.phrase}: {giveUp.reason}"))

    def _fail(self, deny):
        if not self.result.called:
            self.result.errback(deny)
