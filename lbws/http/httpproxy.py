"""
Plain HTTP on the WebSocket listener: a request that is not a WebSocket
upgrade is proxied to a backend chosen by the same balancer, health state
and C{sticky_cookie}, as nginx's C{location / { proxy_pass ... }} does
(README, "Plain HTTP and long-polling"); with C{http = refuse} it gets a
426 instead.

This is a byte-level HTTP/1.1 relay rather than twisted.web's server and
client: twisted.web's C{Request} reads a whole request body (to a
temporary file) before it can be forwarded, and the relay measured faster
for small keep-alive requests (bench/README.md). Heads are parsed and
rewritten (L{lbws.protocol.http1}); bodies pass as they come, their ends found by
L{lbws.protocol.http1.BodyReader}, with each side's transport pausing the other.

The client connection is kept alive between requests (HTTP/1.1). Each
request is balanced on its own, like nginx does, and goes over a backend
connection of its own that closes after the response (nginx's default,
without upstream keepalive).
"""

from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from lbws.backends import sticky
from lbws.backends.balance import hashKeyOf
from lbws.backends.redirects import RedirectRewriter
from lbws.backends.backend import backendEndpoint, hostForUrl, localShortage
from lbws.protocol.headers import PROXY_HEADERS, proxyHeaders, underscoreDropped
from lbws.protocol.request import (
    BadTarget,
    checkEscapes,
    checkHead,
    headProblem,
    hostProblem,
    joinTarget,
    normaliseTarget,
    takeAuthority,
)
from lbws.backends.routes import forwardTarget
from lbws.protocol.http1 import (
    BadMessage,
    BodyReader,
    isWebSocketUpgrade,
    parseRequestHead,
    parseResponseHead,
    requestFraming,
    responseFraming,
)
from lbws.transport.sockets import endWriting, setNoDelay, writerFor
from lbws.transport.tlserrors import describeTlsFailure
from lbws.ws.tunnel import PeerProducer

_log = Logger()

# Headers of one connection, never passed on (RFC 9110 7.6.1); lbws sets
# Connection and Transfer-Encoding itself. Trailer stays with a body that
# stays chunked.
HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "transfer-encoding",
        "upgrade",
    ]
)

# Requests that may be sent again to another backend when the first could
# not be reached (RFC 9110 9.2.2), as long as no body byte went out.
IDEMPOTENT = frozenset(["GET", "HEAD", "OPTIONS", "PUT", "DELETE"])

# The longest request head a client may send (as for WebSocket handshakes,
# lbws.ws.server) and the longest response head a backend may send.
MAX_REQUEST_HEAD = 64 * 1024
MAX_RESPONSE_HEAD = 64 * 1024

# Request body bytes lbws holds while it connects to a backend; beyond,
# the client is not read until the backend takes them.
MAX_EARLY_BODY = 64 * 1024

# Seconds lbws keeps reading (and dropping) what a client still sends after
# lbws closed its side of the connection.
LINGER = 5.0

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    404: "Not Found",
    413: "Content Too Large",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def takeOver(protocol, data):
    """
    Make the client connection of C{protocol} (a L{lbws.ws.server.FrontendProtocol}
    whose first request is not a WebSocket upgrade) a plain HTTP one.

    @param data: what the client sent so far, its first request head first.
    """
    # The front is the connection's leg before it reads anything, so that
    # however its first request ends, the connection's end reaches it.
    front = protocol.leg = HttpFront(protocol.factory.relay, protocol)
    front.received(data)


def hostHeader(backend):
    """
    The Host header for a backend, as nginx's C{proxy_pass} sends it.
    """
    host = hostForUrl(backend.host)
    if backend.port == (443 if backend.secure else 80):
        return host
    return f"{host}:{backend.port}"


class _Pause:
    """
    A streaming producer a backend transport pauses and resumes the client
    connection through when the backend does not read fast enough.
    """

    def __init__(self, front, reason):
        self._front = front
        self._reason = reason

    def pauseProducing(self):
        self._front.pause(self._reason)

    def resumeProducing(self):
        self._front.resume(self._reason)

    def stopProducing(self):
        pass


class HttpFront:
    """
    A client connection speaking plain HTTP: reads one request head after
    another (keep-alive) and hands each to an L{Exchange}. Requests a
    client pipelines are read once the response before them is out.
    """

    def __init__(self, relay, protocol):
        self.relay = relay
        self.reactor = relay.reactor
        self.protocol = protocol
        self.transport = protocol.transport
        self.write = writerFor(self.transport)
        peer = self.transport.getPeer()
        self.peer = getattr(peer, "host", None) or str(peer)
        self.secure = ISSLTransport.providedBy(self.transport)
        self.buffer = b""
        self.exchange = None
        self.closing = False  # no more requests: close after this response
        self.gone = False
        self._pauses = set()
        self._timer = None
        self._timerIdle = False
        self._receiving = False
        self._more = b""  # bytes behind a request head, while one is read
        self.lingering = False
        relay.httpStarted(self)

    def received(self, data):
        if self.lingering:
            return
        if self._receiving:
            # Pipelined requests behind the one just read: taken in turn by
            # the loop below, not by recursion (each answered at once, as a
            # 503 is, would otherwise nest one call deeper).
            self._more += data
            return
        self._receiving = True
        try:
            while True:
                exchange = self.exchange
                if exchange is not None and not exchange.requestRead:
                    data = exchange.requestData(data)
                self.buffer += data
                if self.exchange is None:
                    self._nextRequest()
                elif len(self.buffer) > MAX_REQUEST_HEAD:
                    self.pause("pipelined")
                data, self._more = self._more, b""
                if not data or self.lingering or self.gone:
                    break
        except Exception:
            # A bug must cost this connection only, never leave it open
            # with nobody reading it.
            _log.failure("plain HTTP connection from {peer} failed", peer=self.peer)
            self.transport.abortConnection()
        finally:
            self._receiving = False

    def _nextRequest(self):
        if self.gone or self.closing:
            return
        # RFC 9112 2.2: empty lines before a request line are ignored.
        self.buffer = self.buffer.lstrip(b"\r\n")
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_REQUEST_HEAD:
                self.reject(431, "request head too large")
            else:
                self._waitForHead()
            return
        self._stopTimer()
        head, rest = self.buffer[:end], self.buffer[end + 4 :]
        if isWebSocketUpgrade(head):
            self._handBack()
            return
        self.buffer = b""
        try:
            whole = head + b"\r\n\r\n"
            if checkHead(whole) is None:
                # Every request on the connection is checked as the first
                # was (lbws.protocol.request), not only by the HTTP parser.
                raise BadMessage(headProblem(whole))
            problem = hostProblem(whole)
            if problem is not None:
                raise BadMessage(problem)
            request = parseRequestHead(head)
            framing = requestFraming(request)
            takeAuthority(request.target, request.headers)
            target, request.target = request.target, normaliseTarget(request.target)
            route = self.relay.routes.match(
                request.headers.get("host"), request.target.partition("?")[0]
            )
            if route is not None:
                checkEscapes(target, route.escaped_slashes)
        except (BadMessage, BadTarget) as e:
            _log.info("bad HTTP request from {peer}: {why}", peer=self.peer, why=str(e))
            self.reject(400, "bad request")
            return
        if route is None:
            self.reject(404, "no route for this request", request)
            return
        if route.http == "refuse":
            self.reject(
                426,
                "this service speaks WebSocket only",
                request,
                headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")],
            )
            return
        self.exchange = Exchange(self, request, framing, route)
        self.exchange.start()
        if rest:
            self.received(rest)

    def _handBack(self):
        """
        A WebSocket upgrade after plain HTTP requests on one connection:
        the connection goes back to the WebSocket handshake, which reads
        this request as if it were the first.
        """
        self.gone = True
        self.relay.httpEnded(self)
        if self._pauses:
            self._pauses.clear()
            self.transport.resumeProducing()
        data, self.buffer = self.buffer, b""
        self.protocol.resumeHandshake(data)

    def _waitForHead(self):
        """
        Time the wait for the next request head: C{keepalive_timeout} while
        the connection is idle, C{handshake_timeout} from the first byte of
        a head on (nginx's C{keepalive_timeout} and
        C{client_header_timeout}).
        """
        idle = not self.buffer
        if self._timer is not None:
            if self._timerIdle == idle:
                return
            self._stopTimer()
        settings = self.relay.settings
        self._timerIdle = idle
        self._timer = self.reactor.callLater(
            settings.keepalive_timeout if idle else settings.handshake_timeout, self._timedOut
        )

    def _timedOut(self):
        self._timer = None
        if self.buffer:
            self.reject(408, "request head not received in time")
        else:
            # An idle keep-alive connection: close it quietly.
            self.transport.loseConnection()

    def _stopTimer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def answer(self, status, text, headers=(), close=False):
        """
        Write lbws's own response (an error, or the 426 of C{http =
        refuse}): a short text body, no backend name or error detail.
        """
        body = f"{status} {_REASONS[status]}: {text}\n".encode("utf-8")
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
        lines += [f"{name}: {value}" for name, value in headers]
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(body)}"]
        if close and not any(name == "Connection" for name, _ in headers):
            lines.append("Connection: close")
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        if close:
            self.close()

    def reject(self, status, text, request=None, headers=()):
        """
        Answer a request no exchange takes (unreadable, or C{http =
        refuse}), count and log it, and close.
        """
        self.answer(status, text, headers, close=True)
        self.relay.counters.httpRequests[("-", _codeClass(status))] += 1
        _logAccess(self, request, status, "-", 0.0, 0, 0)

    def close(self):
        """
        Close after what was written, reading (and dropping) what the client
        still sends for a while, as nginx's lingering close does: closing
        with unread bytes would reset the connection, and the client could
        lose the response before it read it.
        """
        self.closing = True
        if self.lingering or self.gone:
            return
        self.lingering = True
        self._stopTimer()
        self._pauses.clear()
        self.transport.resumeProducing()
        if endWriting(self.transport):
            self._timer = self.reactor.callLater(LINGER, self.transport.abortConnection)

    def pause(self, reason):
        if not self._pauses and not self.gone:
            self.transport.pauseProducing()
        self._pauses.add(reason)

    def resume(self, reason):
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and not self.gone:
                self.transport.resumeProducing()

    def exchangeDone(self, keepAlive):
        self.exchange = None
        if self.gone:
            return
        if not keepAlive or self.closing:
            self.close()
            return
        self.resume("pipelined")
        if not self._receiving:
            self._nextRequest()

    def stop(self):
        """
        lbws is stopping: close after the response in progress, or now.
        """
        self.closing = True
        if self.exchange is None:
            self.close()

    def connectionLost(self, reason):
        self.gone = True
        self._stopTimer()
        self.relay.httpEnded(self)
        if self.exchange is not None:
            self.exchange.clientLost()


def _codeClass(status):
    return f"{status // 100}xx"


def _logAccess(front, request, status, backend, duration, bytesIn, bytesOut, route="-"):
    _log.info(
        '{peer} "{method} {target}" {status} via {route}/{backend}: {duration:.3f}s,'
        " {bytesIn} B in, {bytesOut} B out",
        log_format_access=True,
        peer=front.peer,
        method=request.method if request is not None else "-",
        target=request.target if request is not None else "-",
        status=status,
        backend=backend,
        duration=duration,
        bytesIn=bytesIn,
        bytesOut=bytesOut,
        route=route,
    )


class Exchange:
    """
    One request and its response: the choice of a backend (with retries
    for idempotent requests), the request relayed to it and the response
    relayed back, both streamed.
    """

    def __init__(self, front, request, framing, route):
        self.front = front
        self.route = route
        self.relay = front.relay
        self.settings = front.relay.settings
        self.reactor = front.reactor
        self.request = request
        self.body = BodyReader(*framing)
        self.framing = framing
        self.requestRead = self.body.done
        self.early = []  # body bytes read before a backend connection was ready
        self.earlyBytes = 0
        self.sent = 0  # body bytes written to a backend
        self.tried = []
        self.member = None
        self._holding = None  # the member's Connection this attempt counts in
        self.backend = None
        self.response = None
        self.out = None
        self.rechunk = False
        self.dechunk = False
        self.keepAlive = False
        self.status = None
        self.bytesOut = 0
        self.started = self.reactor.seconds()
        self.finished = False
        self._head = b""
        self._connecting = None
        self._timer = None
        self._producing = False
        self._lastFailure = 502

    # The request

    def start(self):
        kind, length = self.framing
        limit = self.settings.max_body_size
        if limit and kind == "length" and length > limit:
            self.fail(413, f"request body larger than {limit} bytes")
            return
        refusal = self.relay.httpRefusal(self.front)
        if refusal is not None:
            self.fail(503, refusal)
            return
        self.attempt()

    def attempt(self):
        pool = self.relay.pool
        settings = self.settings
        route = self.route
        request = self.request
        member = None
        if not self.tried:
            member = sticky.preferred(
                pool, route.sticky_cookie, request.headers.get("cookie"), route,
                settings.sticky_secret,
            )
        if member is None:
            key = hashKeyOf(route.hash_key, self.front.peer, request)
            member = pool.choose(key, exclude=self.tried, route=route)
        if member is None:
            if self.tried:
                # Every backend tried failed: the last one's failure (504
                # when it timed out) is the client's answer.
                self.fail(self._lastFailure, "no backend could be reached")
            else:
                self.fail(503, "no healthy backend")
            return
        self.tried.append(member)
        self.member = member
        self._holding = member.opened()
        try:
            endpoint = backendEndpoint(self.reactor, member.settings, settings.connect_timeout)
            d = self._connecting = endpoint.connect(_BackendFactory(self))
        except Exception as e:
            # E.g. a CA file that became unreadable: this backend fails,
            # with its active count given back, like a refused connect.
            self._backendFailed(f"cannot connect: {e}", retry=True)
            return
        d.addTimeout(settings.connect_timeout, self.reactor)
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, protocol):
        self._connecting = None
        self._holding.established()
        self.backend = protocol
        protocol.write(self._requestHead(self.member) + b"".join(self.early))
        self.sent += self.earlyBytes
        self.early = []
        self.earlyBytes = 0
        self.front.resume("early")
        protocol.transport.registerProducer(_Pause(self.front, "backend"), True)
        if self.requestRead:
            self._requestSent()

    def _requestSent(self):
        """
        The whole request went out: the backend has C{http_timeout} to
        start its answer (an upload as slow as the client may take longer).
        """
        if self._timer is None and self.response is None:
            self._timer = self.reactor.callLater(
                self.settings.http_timeout, self._headTimedOut
            )

    def _connectFailed(self, failure):
        self._connecting = None
        if self.finished:
            return  # finish() cancelled the attempt
        shortage = localShortage(failure)
        if shortage is not None:
            # lbws's own limits (EMFILE...): shed load, blame no backend.
            self.relay.dialer.shortages.note(shortage)
            self._release()
            self.fail(503, "lbws is out of resources")
            return
        # addTimeout cancels the endpoint's attempt: TCP endpoints report
        # that as ConnectingCancelledError, not as the TimeoutError.
        if failure.check(TimeoutError, CancelledError, ConnectingCancelledError):
            why = f"connect timed out after {self.settings.connect_timeout:g}s"
            self._backendFailed(why, retry=True, status=504)
        else:
            self._backendFailed(failure.getErrorMessage(), retry=True)

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
        listed = set(request.tokens("connection"))
        lines = [
            f"{request.method}"
            f" {joinTarget(backend.path, forwardTarget(self.route, request.target))}"
            " HTTP/1.1",
            f"Host: {self._hostFor(backend)}",
        ]
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
            lines.append(f"{name}: {value}")
        forwarded = proxyHeaders(request.headers, self.front.peer, self.front.secure)
        lines += [f"{name}: {value}" for name, value in forwarded.items()]
        kind, length = self.framing
        if kind == "chunked":
            lines.append("Transfer-Encoding: chunked")
        elif kind == "length":
            lines.append(f"Content-Length: {length}")
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def requestData(self, data):
        """
        Bytes from the client while its request body is being read.

        @return: the bytes after the body's end (the next request).
        """
        try:
            body, rest = self.body.feed(data)
        except BadMessage as e:
            _log.info("bad HTTP request body from {peer}: {why}", peer=self.front.peer, why=str(e))
            self.fail(400, "bad request body")
            return b""
        limit = self.settings.max_body_size
        if limit and self.body.payload > limit:
            self.fail(413, f"request body larger than {limit} bytes")
            return b""
        if body:
            if self.backend is not None:
                self.backend.write(body)
                self.sent += len(body)
            else:
                self.early.append(body)
                self.earlyBytes += len(body)
                if self.earlyBytes > MAX_EARLY_BODY:
                    self.front.pause("early")
        if self.body.done:
            self.requestRead = True
            if self.backend is not None:
                self._requestSent()
        return rest

    # The response

    def responseData(self, data):
        if self.response is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_RESPONSE_HEAD:
                    self._backendFailed("response head too long", retry=False)
                return
            head, data = self._head[:end], self._head[end + 4 :]
            self._head = b""
            try:
                response = parseResponseHead(head)
                framing = responseFraming(response, self.request.method)
            except BadMessage as e:
                self._backendFailed(f"malformed response: {e}", retry=False)
                return
            if response.status < 200 or response.status == 101:
                if not self._interim(response):
                    return
                if data:
                    self.responseData(data)
                return
            self._responseHead(response, framing)
            if self.finished:
                return
        if not data:
            return
        try:
            body, _ = self.out.feed(data)
        except BadMessage as e:
            _log.warn(
                "backend {backend}: malformed response body: {why}",
                backend=self.member.name,
                why=str(e),
            )
            self.finish(abort=True)
            return
        self._writeBody(body)
        if self.out.done:
            self._complete()

    def _interim(self, response):
        """
        A 1xx response (100 Continue, 103 Early Hints) goes to an HTTP/1.1
        client as is; a 101 to a request that asked for no upgrade is a
        broken backend.

        @return: False if the exchange failed.
        """
        if response.status == 101:
            self._backendFailed("101 to a request without Upgrade", retry=False)
            return False
        if self.request.version == "HTTP/1.1":
            lines = [f"HTTP/1.1 {response.status} {response.reason}"]
            lines += [
                f"{name}: {value}"
                for name, value in response.fields
                if name.lower() not in HOP_BY_HOP
            ]
            self.front.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return True

    def _responseHead(self, response, framing):
        self._stopTimer()
        # The application answered: a backend that was down is up again.
        self.member.connectionSucceeded(self.reactor.seconds(), self.settings.health)
        self.response = response
        self.status = response.status
        request = self.request
        kind, length = framing
        http11 = request.version == "HTTP/1.1"
        # A body that ends with the backend's connection goes to an HTTP/1.1
        # client chunked, so the client connection can stay; an HTTP/1.0
        # client cannot take chunked coding at all.
        self.rechunk = kind == "close" and http11
        self.dechunk = kind == "chunked" and not http11
        self.keepAlive = (
            request.keepAlive() and not self.dechunk and (kind != "close" or self.rechunk)
        )
        listed = set(response.tokens("connection"))
        lines = [f"HTTP/1.1 {response.status} {response.reason}"]
        redirects = None
        if self.route.host_header == "backend" and "host" in request.headers:
            redirects = RedirectRewriter(
                self.member.settings, request.headers["host"], self.front.secure
            )
        for name, value in response.fields:
            key = name.lower()
            if key in HOP_BY_HOP or key in listed or (key == "trailer" and self.dechunk):
                continue
            if redirects is not None:
                value = redirects.rewrite(name, value)
            lines.append(f"{name}: {value}")
        if (kind == "chunked" and not self.dechunk) or self.rechunk:
            lines.append("Transfer-Encoding: chunked")
        cookie = sticky.setCookie(
            self.route.sticky_cookie, self.member, request.headers.get("cookie"),
            self.settings.sticky_secret,
        )
        if cookie is not None:
            lines.append(f"Set-Cookie: {cookie}")
        if not self.keepAlive:
            lines.append("Connection: close")
        self.front.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        self.out = BodyReader(kind, length, decode=self.dechunk)
        # A client that reads slowly pauses the backend.
        self.front.transport.registerProducer(PeerProducer(self.backend.transport), True)
        self._producing = True
        if self.out.done:
            self._complete()

    def _writeBody(self, body):
        if not body:
            return
        if self.rechunk:
            self.front.write(b"%x\r\n%s\r\n" % (len(body), body))
        elif self.dechunk:
            for piece in self.out.pieces:
                self.front.write(piece)
        else:
            self.front.write(body)
        self.bytesOut += len(body)

    def _complete(self):
        if self.rechunk:
            self.front.write(b"0\r\n\r\n")
        if not self.requestRead:
            # The backend answered before the request body ended: the rest
            # of it cannot be told from a next request.
            self.keepAlive = False
        self.finish()

    def backendLost(self, reason, transport=None):
        """
        @param transport: the backend connection's transport, to read the
            names on its certificate from when TLS failed.
        """
        self.backend = None
        self.front.resume("backend")
        if self.finished:
            return
        if self.response is None:
            # A TLS failure in the words of the WebSocket path and the probes.
            why = describeTlsFailure(reason, transport) or (
                f"connection lost before a response: {reason.getErrorMessage()}"
            )
            self._backendFailed(why, retry=not self._head)
        elif self.out.kind == "close":
            self._complete()
        else:
            _log.warn(
                "backend {backend} cut a response short: {why}",
                backend=self.member.name,
                why=reason.getErrorMessage(),
            )
            self.finish(abort=True)

    def _headTimedOut(self):
        self._timer = None
        self._backendFailed(
            f"no response within http_timeout ({self.settings.http_timeout:g}s)",
            retry=False,
            status=504,
        )

    # Ends

    def _backendFailed(self, why, retry, status=502):
        """
        The backend could not be reached or broke the protocol: a failure
        towards C{fall}, then another backend (idempotent requests whose
        body did not go out yet) or an error for the client.
        """
        member = self.member
        self._lastFailure = status
        member.connectionFailed(why, self.reactor.seconds(), self.settings.health)
        _log.warn(
            "backend {backend} failed for {peer} (HTTP): {why}",
            backend=member.name,
            peer=self.front.peer,
            why=why,
        )
        self._dropBackend()
        self._release()
        if (
            retry
            and self.request.method in IDEMPOTENT
            and self.sent == 0
            and len(self.tried) <= self.settings.retries
            and not self.finished
        ):
            self.attempt()
            return
        self.fail(status, "the backend did not answer" if status == 504 else "the backend failed")

    def fail(self, status, text):
        """
        Answer the client with lbws's own error, when no response head went
        out yet; else cut the client's connection.
        """
        if self.finished:
            return
        if self.response is not None:
            self.finish(abort=True)
            return
        self.status = status
        close = not (self.requestRead and self.request.keepAlive()) or status in (400, 413)
        self.keepAlive = not close
        self.front.answer(status, text, close=close)
        self.finish()

    def clientLost(self):
        if self.status is None:
            self.status = 499  # as nginx logs a client that left first
        self.finish(abort=True)

    def finish(self, abort=False):
        if self.finished:
            return
        self.finished = True
        self._stopTimer()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._producing:
            self._producing = False
            self.front.transport.unregisterProducer()
        self._dropBackend(abort or not (self.out is not None and self.out.done))
        self._release()
        self.front.resume("early")
        backend = self.member.name if self.member is not None else "-"
        status = self.status if self.status is not None else 502
        self.relay.counters.httpRequests[(backend, _codeClass(status))] += 1
        _logAccess(
            self.front,
            self.request,
            status,
            backend,
            self.reactor.seconds() - self.started,
            self.body.payload,
            self.bytesOut,
            self.route.name,
        )
        if abort and not self.front.gone:
            self.front.closing = True
            self.front.transport.abortConnection()
        self.front.exchangeDone(self.keepAlive and not abort)

    def _dropBackend(self, abort=True):
        backend, self.backend = self.backend, None
        if backend is None:
            return
        backend.exchange = None
        backend.transport.unregisterProducer()
        self.front.resume("backend")
        if abort:
            backend.transport.abortConnection()
        else:
            backend.transport.loseConnection()

    def _release(self):
        connection, self._holding = self._holding, None
        if connection is not None:
            connection.close()
            self.relay.pool.leaveIfIdle(self.member)

    def _stopTimer(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None


class _BackendProtocol(Protocol):
    """
    lbws's connection to a backend for one plain HTTP request.
    """

    def __init__(self, exchange):
        self.exchange = exchange

    def connectionMade(self):
        setNoDelay(self.transport)
        self.write = writerFor(self.transport)

    def dataReceived(self, data):
        if self.exchange is not None:
            self.exchange.responseData(data)

    def connectionLost(self, reason):
        if self.exchange is not None:
            self.exchange.backendLost(reason, self.transport)


class _BackendFactory(Factory):
    noisy = False

    def __init__(self, exchange):
        self.exchange = exchange

    def buildProtocol(self, addr):
        return _BackendProtocol(self.exchange)
