"""
Plain HTTP on the WebSocket listener: a request that is not a WebSocket
upgrade is proxied to a backend chosen by the same balancer, health state
and C{sticky_cookie}, as nginx's C{location / { proxy_pass ... }} does
(README, "Plain HTTP and long-polling"); with C{http = refuse} it gets a
426 instead.

This is an HTTP/1.1 relay on h11 rather than twisted.web's server and
client: twisted.web's C{Request} reads a whole request body (to a
temporary file) before it can be forwarded. h11 is the grammar, with
lbws's own stricter rules on top (L{lbws.protocol.strict}); each request
and its response is an L{lbws.http.exchange.Exchange}.

The client connection is kept alive between requests (HTTP/1.1). Each
request is balanced on its own, like nginx does. A client's next request
is read only once the response before it has left lbws (its transport's
write buffer drained), so a client that pipelines and never reads holds
at most a few responses in lbws; each next request is taken in a later
reactor turn, so that a client whose requests are all answered at once
(by a 503) cannot hold the reactor.
"""

import h11
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger

from lbws.http.exchange import REASONS, Exchange, codeClass, logAccess, stopCall
from lbws.protocol.http1 import Head, isWebSocketUpgrade
from lbws.protocol.request import BadTarget, checkEscapes, normaliseTarget, takeAuthority
from lbws.protocol.strict import headEnd, headProblem
from lbws.transport.sockets import endWriting, writerFor

_log = Logger()

# The longest request head a client may send (as for WebSocket handshakes,
# lbws.ws.server); also how much of its pipelined requests lbws reads ahead.
MAX_REQUEST_HEAD = 64 * 1024

# Seconds lbws keeps reading (and dropping) what a client still sends after
# lbws closed its side of the connection.
LINGER = 5.0

# Client connection states.
HEAD = 0  # waiting for the next request head
EXCHANGE = 1  # an exchange is on
CLOSING = 2  # lbws closed its side: what the client still sends is dropped
GONE = 3  # closed, or handed back to the WebSocket handshake
STATE_NAMES = ("HEAD", "EXCHANGE", "CLOSING", "GONE")


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


class HttpFront:
    """
    A client connection speaking plain HTTP: reads one request after
    another (keep-alive) through its C{h11.Connection(SERVER)} and hands
    each to an L{Exchange}.

    It is its transport's streaming producer: the transport pauses it when
    its write buffer is full (then the backend is not read, and no next
    request is), and resumes it when the buffer is empty.

    @ivar writable: the client's connection takes more now.
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
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.state = HEAD
        self.exchange = None
        self.closing = False  # no more requests: close after this response
        self.writable = True
        self._pauses = set()
        self._timer = None  # waiting for a head, or lingering
        self._timerIdle = False
        self._bodyTimer = None
        self._sendTimer = None
        self._next = None  # the reactor turn that reads the next request
        self._pumping = False
        self._out = None  # response bytes held for one write (L{cork})
        self.transport.registerProducer(self, True)
        relay.httpStarted(self)

    @property
    def settings(self):
        # Read at each use: a reload changes them for open connections too.
        return self.relay.settings

    def __repr__(self):
        return f"<HttpFront {self.peer} {STATE_NAMES[self.state]}>"

    # Reading requests

    def received(self, data):
        if self.state >= CLOSING:
            return
        conn = self.conn
        conn.receive_data(data)
        exchange = self.exchange
        if (
            exchange is not None
            and exchange.requestDone
            and len(conn.trailing_data[0]) > MAX_REQUEST_HEAD
        ):
            # Requests pipelined behind the one being answered: read no
            # more of them until they are taken (L{_readHead}).
            self.pause("pipelined")
        self.pump()

    def pump(self):
        """
        Read what h11 holds as far as lbws may now: the body of the
        request being relayed while its backend takes it, or the next
        request once the last response has left.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            while True:
                state = self.state
                if state == HEAD:
                    if not self.writable or self._next is not None or not self._readHead():
                        break
                elif state == EXCHANGE:
                    exchange = self.exchange
                    if exchange.requestDone or (self._pauses - {"pipelined"}):
                        break
                    if not self._readBody(exchange):
                        break
                else:
                    break
        except Exception:
            # A bug must cost this connection only, never leave it open
            # with nobody reading it.
            _log.failure("plain HTTP connection from {peer} failed", peer=self.peer)
            self.transport.abortConnection()
        finally:
            self._pumping = False

    def _readHead(self):
        """
        Check the next request head (L{lbws.protocol.strict}), have h11
        parse it and start its exchange.

        @return: whether a request was read.
        """
        raw, _ = self.conn.trailing_data
        end = headEnd(raw)
        if end < 0:
            if len(raw) > MAX_REQUEST_HEAD:
                self.reject(431, "request head too large")
            else:
                self.resume("pipelined")
                self._waitForHead(raw)
            return False
        self._stopTimer()
        head = raw[:end]
        if isWebSocketUpgrade(head):
            self._handBack(raw)
            return False
        problem = headProblem(head)
        if problem is None:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as e:
                problem = str(e)
        if problem is not None:
            _log.info("bad HTTP request from {peer}: {why}", peer=self.peer, why=problem)
            self.reject(400, "bad request")
            return False
        request = Head.ofEvent(event)
        if "transfer-encoding" not in request.headers and request.headers.get(
            "content-length", "0"
        ) == "0":
            # No body: h11's end of it comes without reading (their_state DONE).
            self.conn.next_event()
        try:
            takeAuthority(request.target, request.headers)
            target, request.target = request.target, normaliseTarget(request.target)
            route = self.relay.routes.match(
                request.headers.get("host"), request.target.partition("?")[0]
            )
            if route is not None:
                checkEscapes(target, route.escaped_slashes)
        except BadTarget as e:
            _log.info("bad HTTP request from {peer}: {why}", peer=self.peer, why=str(e))
            self.reject(400, "bad request")
            return False
        if route is None:
            self.reject(404, "no route for this request", request)
            return False
        if route.http == "refuse":
            self.reject(
                426,
                "this service speaks WebSocket only",
                request,
                headers=[("Upgrade", "websocket"), ("Connection", "Upgrade")],
            )
            return False
        if len(raw) - end <= MAX_REQUEST_HEAD:
            self.resume("pipelined")
        self.state = EXCHANGE
        self.exchange = Exchange(self, request, route)
        self.exchange.start()
        return True

    def _readBody(self, exchange):
        """
        Hand the exchange the next piece of its request body.

        @return: whether there may be more to read now.
        """
        try:
            event = self.conn.next_event()
        except h11.RemoteProtocolError as e:
            exchange.requestBroken(str(e))
            return False
        kind = type(event)
        if kind is h11.Data:
            exchange.requestBody(bytes(event.data))
            return True
        if kind is h11.EndOfMessage:
            self._stopBodyTimer()
            exchange.requestEnded(event.headers.raw_items())
            return True
        # NEED_DATA: body_timeout runs from this read to the next.
        self.resume("pipelined")
        self._stopBodyTimer()
        self._bodyTimer = self.reactor.callLater(self.settings.body_timeout, self._bodyTimedOut)
        return False

    def _bodyTimedOut(self):
        self._bodyTimer = None
        if self.exchange is not None:
            self.exchange.requestTimedOut()

    def _handBack(self, data):
        """
        A WebSocket upgrade after plain HTTP requests on one connection:
        the connection goes back to the WebSocket handshake, which reads
        this request as if it were the first.
        """
        self._end()
        if self._pauses:
            self._pauses.clear()
            self.transport.resumeProducing()
        self.protocol.resumeHandshake(data)

    def _waitForHead(self, raw):
        """
        Time the wait for the next request head: C{keepalive_timeout} while
        the connection is idle, C{handshake_timeout} from the first byte of
        a head on (nginx's C{keepalive_timeout} and
        C{client_header_timeout}).
        """
        idle = not raw
        if self._timer is not None:
            if self._timerIdle == idle:
                return
            self._stopTimer()
        settings = self.settings
        self._timerIdle = idle
        self._timer = self.reactor.callLater(
            settings.keepalive_timeout if idle else settings.handshake_timeout, self._timedOut
        )

    def _timedOut(self):
        self._timer = None
        if self._timerIdle:
            # An idle keep-alive connection: close it quietly.
            self.transport.loseConnection()
        else:
            self.reject(408, "request head not received in time")

    # Writing responses

    def send(self, event):
        """
        Write an h11 event of the response to the client (held while
        corked).
        """
        data = self.conn.send(event)
        if data:
            if self._out is not None:
                self._out.append(data)
            else:
                self.write(data)

    def cork(self):
        """
        Hold what L{send} writes until L{flush}, so that a response's head,
        body and end read from one backend read leave in one socket write.

        @return: whether this call corked (and its caller must flush).
        """
        if self._out is not None:
            return False
        self._out = []
        return True

    def flush(self):
        """
        Write what L{send} held, and stop holding.
        """
        out, self._out = self._out, None
        if out:
            self.write(out[0] if len(out) == 1 else b"".join(out))

    def answer(self, status, text, headers=(), close=False):
        """
        Write lbws's own response (an error, or the 426 of C{http =
        refuse}): a short text body, no backend name or error detail.
        Through h11 when it read the request, else as bytes.
        """
        body = f"{status} {REASONS[status]}: {text}\n".encode("utf-8")
        headers = list(headers)
        headers += [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        if close and not any(name == "Connection" for name, _ in headers):
            headers.append(("Connection", "close"))
        if self.conn.our_state is h11.SEND_RESPONSE:
            self.send(h11.Response(status_code=status, headers=headers, reason=REASONS[status]))
            self.send(h11.Data(data=body))
            self.send(h11.EndOfMessage())
        else:
            lines = [f"HTTP/1.1 {status} {REASONS[status]}"]
            lines += [f"{name}: {value}" for name, value in headers]
            self.flush()
            self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        if close:
            self.close()

    def reject(self, status, text, request=None, headers=()):
        """
        Answer a request no exchange takes (unreadable, or C{http =
        refuse}), count and log it, and close.
        """
        self.answer(status, text, headers, close=True)
        self.relay.counters.httpRequests[("-", codeClass(status))] += 1
        logAccess(self, request, status, "-", 0.0, 0, 0)

    def exchangeDone(self, abort):
        """
        The exchange ended: the next request is read when h11 says the
        connection goes on, in a later reactor turn when this one read it.
        """
        self.exchange = None
        self.flush()
        self._stopBodyTimer()
        if self.state >= CLOSING:
            return
        if abort:
            self.closing = True
            self._end()
            self.transport.abortConnection()
            return
        conn = self.conn
        if self.closing or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            self.close()
            return
        conn.start_next_cycle()
        self.state = HEAD
        if self._pumping:
            self._next = self.reactor.callLater(0, self._nextTurn)
        else:
            self.pump()

    def _nextTurn(self):
        self._next = None
        self.pump()

    # Flow control

    def pauseProducing(self):
        """
        The client's connection buffers more than it should: read neither
        the backend nor a next request until it drained, for at most
        C{send_timeout} seconds.
        """
        self.writable = False
        if self.exchange is not None:
            self.exchange.clientFull()
        if self._sendTimer is None:
            self._sendTimer = self.reactor.callLater(self.settings.send_timeout, self._sendTimedOut)

    def resumeProducing(self):
        self.writable = True
        self._sendTimer = stopCall(self._sendTimer)
        if self.exchange is not None:
            self.exchange.clientReady()
        if self.state == HEAD:
            self.pump()

    def stopProducing(self):
        pass

    def _sendTimedOut(self):
        self._sendTimer = None
        _log.info(
            "HTTP client {peer} read nothing for send_timeout ({t:g}s): closed",
            peer=self.peer,
            t=self.settings.send_timeout,
        )
        self.transport.abortConnection()

    def pause(self, reason):
        """
        Stop reading the client, for C{reason} ("backend": the backend
        does not take the body; "early": no backend yet; "pipelined":
        requests read ahead).
        """
        if not self._pauses and self.state < CLOSING:
            self.transport.pauseProducing()
        self._pauses.add(reason)
        if reason != "pipelined":
            # Not the client's fault: body_timeout waits.
            self._stopBodyTimer()

    def resume(self, reason):
        if reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses and self.state < CLOSING:
                self.transport.resumeProducing()
            if self.state == EXCHANGE:
                self.pump()

    # Ends

    def close(self):
        """
        Close after what was written, reading (and dropping) what the client
        still sends for a while, as nginx's lingering close does: closing
        with unread bytes would reset the connection, and the client could
        lose the response before it read it.
        """
        self.closing = True
        if self.state >= CLOSING:
            return
        self.flush()
        self.state = CLOSING
        self._stopTimer()
        self._stopBodyTimer()
        self.transport.unregisterProducer()
        self._pauses.clear()
        self.transport.resumeProducing()
        if endWriting(self.transport):
            self._timer = self.reactor.callLater(LINGER, self.transport.abortConnection)

    def stop(self):
        """
        lbws is stopping: close after the response in progress, or now.
        """
        self.closing = True
        if self.exchange is None:
            self.close()

    def _end(self):
        """
        This connection speaks no more plain HTTP.
        """
        if self.state != CLOSING:
            self.transport.unregisterProducer()
        self.state = GONE
        self.relay.httpEnded(self)
        self._stopTimer()
        self._stopBodyTimer()
        self._sendTimer = stopCall(self._sendTimer)
        self._next = stopCall(self._next)

    def connectionLost(self, reason):
        if self.state == GONE:
            return
        self._end()
        if self.exchange is not None:
            self.exchange.clientLost()

    def _stopTimer(self):
        self._timer = stopCall(self._timer)

    def _stopBodyTimer(self):
        self._bodyTimer = stopCall(self._bodyTimer)
