"""
One plain HTTP request and its response, relayed between a client
connection (L{lbws.http.httpproxy.HttpFront}) and a backend connection
(L{BackendConnection}), as an explicit state machine like the tunnel's
legs (L{lbws.ws.tunnel}).

Both legs speak through h11, which is the grammar and the framing: the
client's leg is an C{h11.Connection(SERVER)}, each backend connection an
C{h11.Connection(CLIENT)}. A body passes as h11 hands it over, re-framed
by h11 for the other side, so a backend's C{Connection} header can never
remove a response's framing and a chunk extension or a trailer never
crosses lbws (trailers are dropped, as nginx does). A backend connection
is reused for later requests (C{http_keepalive}, L{lbws.backends.keepalive})
only when h11 says both of its sides finished a whole message.

Backpressure goes both ways: a backend that does not take the request
body pauses the client's reading, a client that does not read the response
pauses the backend's, 1xx answers included, and their number per request
is bounded.
"""

import h11
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from lbws.backends import sticky
from lbws.backends.attempts import NO_BACKEND, SHORTAGE, Attempts
from lbws.backends.backend import BackendTimeout, hostForUrl
from lbws.backends.balance import hashKeyOf
from lbws.backends.redirects import RedirectRewriter
from lbws.backends.routes import forwardTarget
from lbws.protocol.headers import PROXY_HEADERS, proxyHeaders, underscoreDropped
from lbws.protocol.http1 import Head
from lbws.protocol.request import joinTarget
from lbws.protocol.strict import fieldsProblem
from lbws.transport.sockets import setNoDelay, writerFor
from lbws.transport.tlserrors import describeTlsFailure

_log = Logger()

# Exchange states, in the order an exchange goes through them (it may skip
# some: an answer can come before the request's body has gone out whole).
CONNECTING = 0  # choosing a backend and dialling it; body bytes wait
SENDING = 1  # the request head went out, its body is on its way
WAITING = 2  # the whole request went out: http_timeout for the answer
RESPONDING = 3  # the response head went to the client, its body follows
DONE = 4  # answered or failed, counted and logged
STATE_NAMES = ("CONNECTING", "SENDING", "WAITING", "RESPONDING", "DONE")

# Headers of one connection, never passed on (RFC 9110 7.6.1); h11 writes
# the framing headers for the other side itself.
HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
)

# What a Connection header may not remove: the message's framing.
FRAMING = frozenset(["content-length", "transfer-encoding"])

# Requests that may be sent again to another backend when the first could
# not be reached (RFC 9110 9.2.2), as long as no body byte went out.
IDEMPOTENT = frozenset(["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])

# The longest response head a backend may send.
MAX_RESPONSE_HEAD = 64 * 1024

# Request body bytes lbws holds while it connects to a backend; beyond,
# the client is not read until the backend takes them.
MAX_EARLY_BODY = 64 * 1024

# 1xx answers (100 Continue, 103 Early Hints) a backend may send before its
# final answer to one request; beyond, the client gets 502.
MAX_INTERIM = 16

REASONS = {
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class BadAnswer(Exception):
    """
    The backend closed or broke HTTP before its answer was complete.
    """


def hostHeader(backend):
    """
    The Host header for a backend, as nginx's C{proxy_pass} sends it.
    """
    host = hostForUrl(backend.host)
    if backend.port == (443 if backend.secure else 80):
        return host
    return f"{host}:{backend.port}"


def _giveUpText(giveUp):
    """
    What lbws's error page says when no backend answered: never the
    reason, which names backends (README "When no backend answers").
    """
    if giveUp is NO_BACKEND:
        return "no healthy backend"
    if giveUp is SHORTAGE:
        return "lbws is out of resources"
    if giveUp.status == 504:
        return "the backend did not answer"
    return "the backend failed"


def stopCall(call):
    """
    Cancel the delayed C{call} if it is still pending; None, for the
    attribute that held it.
    """
    if call is not None and call.active():
        call.cancel()
    return None


def codeClass(status):
    return f"{status // 100}xx"


def logAccess(front, request, status, backend, duration, bytesIn, bytesOut, route="-"):
    """
    The request's access-log event: one line of text, every value also a
    field of its own (for C{--log-format json}).

    The line is rendered here with one f-string and given as the event's
    only formatted field (C{"{line}"}, as the WebSocket side's refusal lines
    are): from a template of ten fields the text observer would render it
    with C{string.Formatter} for every request (8% of a request's CPU under
    cProfile, bench/README.md "H1").
    """
    method = request.method if request is not None else "-"
    target = request.target if request is not None else "-"
    line = (
        f'{front.peer} "{method} {target}" {status} via {route}/{backend}: {duration:.3f}s,'
        f" {bytesIn} B in, {bytesOut} B out"
    )
    _log.info(
        "{line}",
        line=line,
        log_format_access=True,
        peer=front.peer,
        method=method,
        target=target,
        status=status,
        backend=backend,
        duration=duration,
        bytesIn=bytesIn,
        bytesOut=bytesOut,
        route=route,
    )


def _latin1(fields):
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in fields]


class _Pause:
    """
    A streaming producer a backend transport pauses and resumes the client
    connection's reading through, when the backend does not take the
    request body as fast as the client sends it.
    """

    def __init__(self, front):
        self._front = front

    def pauseProducing(self):
        self._front.pause("backend")

    def resumeProducing(self):
        self._front.resume("backend")

    def stopProducing(self):
        pass


class Exchange:
    """
    One request and its response: the choice of a backend (with retries
    for idempotent requests), the request relayed to it and the response
    relayed back, both streamed.

    @ivar state: one of L{CONNECTING}, L{SENDING}, L{WAITING},
        L{RESPONDING}, L{DONE}.
    @ivar requestDone: the client's whole request was read.
    """

    def __init__(self, front, request, route):
        self.front = front
        self.route = route
        self.relay = front.relay
        self.settings = front.relay.settings
        self.reactor = front.reactor
        self.request = request
        self.state = CONNECTING
        self.requestDone = front.conn.their_state is not h11.SEND_BODY
        self.early = []  # body bytes read before a backend connection was ready
        self.earlyBytes = 0
        self.bodyIn = 0  # body bytes read from the client
        self.sent = 0  # body bytes written to a backend
        self.tries = None  # the Attempts, once the exchange starts
        self.member = None
        self._holding = None  # the member's Connection this attempt counts in
        self.backend = None
        self._reused = False  # the backend connection came from the idle pool
        self._fresh = False  # take no idle connection (a reused one just failed)
        self.interims = 0
        self.status = None
        self.bytesOut = 0
        self.started = self.reactor.seconds()
        self._connecting = None
        self._timer = None
        self._pumping = False

    def __repr__(self):
        return f"<Exchange {self.request.method} {self.request.target} {STATE_NAMES[self.state]}>"

    # Choosing and reaching a backend

    def start(self):
        limit = self.settings.max_body_size
        length = self.request.headers.get("content-length")
        if limit and length is not None and int(length) > limit:
            self.fail(413, f"request body larger than {limit} bytes")
            return
        relay = self.relay
        refusal = relay.httpRefusal(self.front)
        if refusal is not None:
            self.fail(503, refusal)
            return
        route = self.route
        request = self.request
        self.tries = Attempts(
            self.reactor,
            relay.pool,
            self.settings,
            relay.dialer.shortages,
            self.front.peer,
            hashKeyOf(route.hash_key, self.front.peer, request),
            sticky.preferred(
                relay.pool,
                route.sticky_cookie,
                request.headers.get("cookie"),
                route,
                self.settings.sticky_secret,
            ),
            route,
            note=" (HTTP)",
        )
        self.attempt()

    def attempt(self):
        member = self.tries.next()
        if member is None:
            giveUp = self.tries.exhausted()
            self.fail(giveUp.status, _giveUpText(giveUp))
            return
        self._use(member)

    def _use(self, member):
        """
        Send the request to C{member}: over one of its idle connections if
        it has one, else over a new one.
        """
        self.member = member
        self._holding = member.opened()
        protocol = None if self._fresh else self.relay.idle.take(member)
        if protocol is not None:
            self._holding.established()
            self._attach(protocol, reused=True)
            return
        d = self._connecting = self.tries.connect(member, _BackendFactory())
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, protocol):
        self._connecting = None
        if self.state == DONE:
            protocol.transport.loseConnection()
            return
        self._holding.established()
        self._attach(protocol, reused=False)

    def _connectFailed(self, failure):
        self._connecting = None
        if self.state == DONE:
            return  # finish() cancelled the attempt
        self._backendFailed(failure, retry=True)

    def _attach(self, protocol, reused):
        """
        The backend connection is ready: the request head and what the
        client sent of its body so far go out.
        """
        self.backend = protocol
        self._reused = reused
        protocol.exchange = self
        protocol.send(h11.Request(**self._requestHead(self.member)))
        for body in self.early:
            protocol.send(h11.Data(data=body))
        if self.requestDone:
            protocol.send(h11.EndOfMessage())
        self.sent += self.earlyBytes
        self.early = []
        self.earlyBytes = 0
        self.front.resume("early")
        protocol.transport.registerProducer(_Pause(self.front), True)
        if not self.front.writable:
            protocol.transport.pauseProducing()
        self.state = SENDING
        if self.requestDone:
            self._requestSent()

    def _hostFor(self, backend):
        """
        The Host the backend gets: the client's, or with C{host_header =
        backend} the backend's own (and its URLs in the response are then
        rewritten back, see L{_responseHead}). An HTTP/1.0 client may send
        no Host: the backend gets its own then.
        """
        host = self.request.headers.get("host")
        if self.route.host_header == "backend" or host is None:
            return hostHeader(backend)
        return host

    def _requestHead(self, member):
        backend = member.settings
        request = self.request
        listed = set(request.tokens("connection")) - FRAMING
        headers = [("Host", self._hostFor(backend))]
        for name, value in request.fields:
            key = name.lower()
            if (
                key in HOP_BY_HOP
                or key in listed
                or key in PROXY_HEADERS
                or key in ("host", "content-length")
                or underscoreDropped(key, self.route.underscores_in_headers)
            ):
                continue
            headers.append((name, value))
        headers += proxyHeaders(request.headers, self.front.peer, self.front.secure).items()
        if "transfer-encoding" in request.headers:
            headers.append(("Transfer-Encoding", "chunked"))
        elif "content-length" in request.headers:
            headers.append(("Content-Length", request.headers["content-length"]))
        if not self.settings.http_keepalive:
            headers.append(("Connection", "close"))
        return {
            "method": request.method,
            "target": joinTarget(backend.path, forwardTarget(self.route, request.target)),
            "headers": _latin1(headers),
        }

    # The request's body, from the client

    def requestBody(self, data):
        """
        Body bytes from the client (h11 took off its framing).
        """
        self.bodyIn += len(data)
        limit = self.settings.max_body_size
        if limit and self.bodyIn > limit:
            self.fail(413, f"request body larger than {limit} bytes")
            return
        if self.state == DONE:
            return
        if self.backend is not None:
            self.backend.send(h11.Data(data=data))
            self.sent += len(data)
        else:
            self.early.append(data)
            self.earlyBytes += len(data)
            if self.earlyBytes > MAX_EARLY_BODY:
                self.front.pause("early")

    def requestEnded(self, trailers):
        """
        The client's request ended. Its trailer fields are checked and
        dropped, as nginx drops them.
        """
        problem = fieldsProblem(trailers)
        if problem is not None:
            self.requestBroken(f"trailer: {problem}")
            return
        self.requestDone = True
        if self.backend is not None:
            self.backend.send(h11.EndOfMessage())
            self._requestSent()

    def requestBroken(self, why):
        """
        The client's request body broke the syntax: 400, and the backend
        connection (which got part of the body) is cut.
        """
        _log.info("bad HTTP request body from {peer}: {why}", peer=self.front.peer, why=why)
        self.fail(400, "bad request body")

    def requestTimedOut(self):
        """
        The client sent nothing of its body for C{body_timeout} seconds.
        """
        self.fail(408, "request body not received in time")

    def _requestSent(self):
        """
        The whole request went out: the backend has C{http_timeout} to
        start its answer (an upload as slow as the client may take longer).
        """
        if self.state == SENDING:
            self.state = WAITING
            self._timer = self.reactor.callLater(self.settings.http_timeout, self._headTimedOut)

    # The response, from the backend

    def pump(self):
        """
        Relay what the backend connection's h11 has read, as far as the
        client takes it: called when the backend sends bytes or closes, and
        when the client's connection can take more. A loop, not recursion,
        however many answers arrive in one read.
        """
        if self._pumping:
            return
        self._pumping = True
        front = self.front
        corked = front.cork()
        try:
            while self.state != DONE and self.backend is not None and front.writable:
                if not self._nextEvent():
                    break
        except Exception:
            # A bug must cost this exchange only, never leave the client
            # waiting.
            _log.failure("plain HTTP exchange for {peer} failed", peer=front.peer)
            self.finish(abort=True)
        finally:
            self._pumping = False
            if corked:
                front.flush()

    def _nextEvent(self):
        backend = self.backend
        try:
            event = backend.conn.next_event()
        except h11.RemoteProtocolError as e:
            self._malformed(str(e))
            return False
        kind = type(event)
        if kind is h11.Data:
            self.bytesOut += len(event.data)
            self.front.send(event)
        elif kind is h11.Response:
            self._responseHead(event)
        elif kind is h11.EndOfMessage:
            self._complete()
        elif kind is h11.InformationalResponse:
            self._interim(event)
        elif kind is h11.ConnectionClosed:
            self._backendClosed()
            return False
        else:
            return False  # NEED_DATA; PAUSED comes after EndOfMessage only
        return True

    def _malformed(self, why):
        if self.state == RESPONDING:
            _log.warn(
                "backend {backend}: malformed response body: {why}",
                backend=self.member.name,
                why=why,
            )
            self.finish(abort=True)
        elif self.backend.lostReason is not None and not self.backend.gotBytes:
            self._backendClosed()
        else:
            self._backendFailed(BadAnswer(f"malformed response: {why}"), retry=False)

    def _interim(self, event):
        """
        A 1xx answer (100 Continue, 103 Early Hints) goes to an HTTP/1.1
        client as is, through the same backpressure as a body; a backend
        that sends more than L{MAX_INTERIM} for one request is cut, and
        the client gets 502 (neither a backend failure nor a retry: the
        1xx went out).
        """
        self.interims += 1
        if self.interims > MAX_INTERIM:
            _log.warn(
                "backend {backend} sent more than {n} 1xx answers to one request",
                backend=self.member.name,
                n=MAX_INTERIM,
            )
            self._dropBackend()
            self._release()
            self.fail(502, "the backend failed")
            return
        if self.request.version == "HTTP/1.1":
            headers = [(n, v) for n, v in event.headers.raw_items() if n.lower() not in HOP_BY_HOP]
            self.front.send(
                h11.InformationalResponse(
                    status_code=event.status_code, headers=headers, reason=event.reason
                )
            )

    def _responseHead(self, event):
        self._stopTimer()
        response = Head.ofEvent(event)
        problem = fieldsProblem(event.headers.raw_items())
        if "content-length" in response.headers and "transfer-encoding" in response.headers:
            # h11 reads the coding; passed on, the length would frame it.
            problem = "both Content-Length and Transfer-Encoding"
        if problem is not None:
            self._backendFailed(BadAnswer(f"malformed response: {problem}"), retry=False)
            return
        # The application answered: a backend that was down is up again.
        self.tries.succeeded()
        self.status = response.status
        request = self.request
        listed = set(response.tokens("connection")) - FRAMING
        redirects = None
        if self.route.host_header == "backend" and "host" in request.headers:
            redirects = RedirectRewriter(
                self.member.settings, request.headers["host"], self.front.secure
            )
        headers = []
        for name, value in response.fields:
            key = name.lower()
            if key in HOP_BY_HOP or key in listed:
                continue
            if redirects is not None:
                value = redirects.rewrite(name, value)
            headers.append((name, value))
        cookie = sticky.setCookie(
            self.route.sticky_cookie,
            self.member,
            request.headers.get("cookie"),
            self.settings.sticky_secret,
        )
        if cookie is not None:
            headers.append(("Set-Cookie", cookie))
        if self.front.closing or not self.requestDone:
            # A body not read whole cannot be told from a next request.
            headers.append(("Connection", "close"))
        self.state = RESPONDING
        self.front.send(
            h11.Response(
                status_code=response.status, headers=_latin1(headers), reason=event.reason
            )
        )

    def _complete(self):
        """
        The whole response went to the client: the backend connection is
        parked for reuse if h11 says it can be.
        """
        self.front.send(h11.EndOfMessage())
        backend, self.backend = self.backend, None
        self._detach(backend)
        if backend.reusable():
            backend.conn.start_next_cycle()
            if self.relay.idle.give(self.member, backend):
                backend = None
        if backend is not None:
            backend.transport.loseConnection()
        self.finish()

    def _backendClosed(self):
        """
        The backend closed before its answer was complete.
        """
        backend = self.backend
        if self.state != RESPONDING:
            reason = backend.lostReason
            if (
                self._reused
                and not backend.gotBytes
                and self.request.method in IDEMPOTENT
                and self.sent == 0
            ):
                # A pooled connection the backend closed before lbws saw it
                # close: again on a new one, which the client does not see.
                self._dropBackend()
                self._release()
                self._fresh = True
                self._use(self.member)
                return
            # A TLS failure in the words of the WebSocket path and the probes.
            why = describeTlsFailure(reason, backend.transport) or (
                f"connection lost before a response: {reason.getErrorMessage()}"
            )
            self._backendFailed(BadAnswer(why), retry=not backend.gotBytes)
            return
        _log.warn(
            "backend {backend} cut a response short: {why}",
            backend=self.member.name,
            why=backend.lostReason.getErrorMessage(),
        )
        self.finish(abort=True)

    def _headTimedOut(self):
        self._timer = None
        self._backendFailed(
            BackendTimeout(f"no response within http_timeout ({self.settings.http_timeout:g}s)"),
            retry=False,
        )

    # Flow control from the client's side

    def clientFull(self):
        """
        The client's connection buffers enough: stop reading the backend.
        """
        if self.backend is not None:
            self.backend.transport.pauseProducing()

    def clientReady(self):
        if self.backend is not None:
            self.backend.transport.resumeProducing()
            self.pump()

    # Ends

    def _backendFailed(self, failure, retry):
        """
        The backend could not be reached or broke HTTP: L{Attempts} counts
        it and says whether another backend comes (idempotent requests
        whose body did not go out yet, and to which no 1xx came) or what
        the client gets.

        @param failure: a C{Failure} or an exception.
        """
        self._stopTimer()
        self._dropBackend()
        self._release()
        retry = (
            retry
            and self.request.method in IDEMPOTENT
            and self.sent == 0
            and self.interims == 0
        )
        giveUp = self.tries.failed(failure, retry=retry)
        if giveUp is None:
            self.state = CONNECTING
            self.attempt()
            return
        self.fail(giveUp.status, _giveUpText(giveUp))

    def fail(self, status, text):
        """
        Answer the client with lbws's own error, when no response head went
        out yet; else cut the client's connection.
        """
        if self.state == DONE:
            return
        if self.state == RESPONDING:
            self.finish(abort=True)
            return
        self.status = status
        close = not self.requestDone or status in (400, 408, 413)
        self.front.answer(status, text, close=close)
        self.finish()

    def clientLost(self):
        if self.status is None:
            self.status = 499  # as nginx logs a client that left first
        self.finish(abort=True)

    def finish(self, abort=False):
        if self.state == DONE:
            return
        self.state = DONE
        self._stopTimer()
        if self._connecting is not None:
            self._connecting.cancel()
        self._dropBackend()
        self._release()
        self.front.resume("early")
        backend = self.member.name if self.member is not None else "-"
        status = self.status if self.status is not None else 502
        self.relay.counters.httpRequests[(backend, codeClass(status))] += 1
        logAccess(
            self.front,
            self.request,
            status,
            backend,
            self.reactor.seconds() - self.started,
            self.bodyIn,
            self.bytesOut,
            self.route.name,
        )
        self.front.exchangeDone(abort)

    def _detach(self, backend):
        backend.exchange = None
        backend.transport.unregisterProducer()
        backend.transport.resumeProducing()
        self.front.resume("backend")

    def _dropBackend(self):
        backend, self.backend = self.backend, None
        if backend is not None:
            self._detach(backend)
            backend.transport.abortConnection()

    def _release(self):
        connection, self._holding = self._holding, None
        if connection is not None:
            connection.close()
            self.relay.pool.leaveIfIdle(self.member)

    def _stopTimer(self):
        self._timer = stopCall(self._timer)


class BackendConnection(Protocol):
    """
    lbws's connection to a backend for plain HTTP: one exchange after
    another, idle in the pool (L{lbws.backends.keepalive}) between them.

    @ivar conn: its C{h11.Connection(CLIENT)}.
    @ivar gotBytes: the backend sent something for the current request.
    @ivar lostReason: why the connection closed, once it did.
    """

    exchange = None
    _onGone = None
    lostReason = None

    def __init__(self):
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.gotBytes = False

    def connectionMade(self):
        setNoDelay(self.transport)
        self._write = writerFor(self.transport)

    def send(self, event):
        data = self.conn.send(event)
        if data:
            self._write(data)

    def reusable(self):
        """
        Whether another request may follow on this connection: h11 saw
        both the request and the response whole, neither side asked to
        close, and the backend sent nothing beyond its response.
        """
        conn = self.conn
        return (
            conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and self.lostReason is None
            and not conn.trailing_data[0]
        )

    def park(self, onGone):
        """
        Idle in the pool: a byte from the backend (nothing is asked of it)
        or its close ends the connection, and C{onGone} is called once.
        """
        self._onGone = onGone
        self.gotBytes = False

    def unpark(self):
        """
        Taken from the pool for a new exchange.
        """
        self._onGone = None

    def _gone(self):
        onGone, self._onGone = self._onGone, None
        onGone()

    def dataReceived(self, data):
        if self._onGone is not None:
            self._gone()
            self.transport.abortConnection()
            return
        exchange = self.exchange
        if exchange is None:
            self.transport.abortConnection()
            return
        self.gotBytes = True
        self.conn.receive_data(data)
        exchange.pump()

    def connectionLost(self, reason):
        self.lostReason = reason
        if self._onGone is not None:
            self._gone()
            return
        exchange = self.exchange
        if exchange is not None:
            self.conn.receive_data(b"")
            exchange.pump()


class _BackendFactory(Factory):
    noisy = False
    protocol = BackendConnection
