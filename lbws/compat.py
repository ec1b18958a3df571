"""
The seam to Twisted's and Autobahn's internals: every use lbws makes of
another library's private attributes or undocumented behaviour is here, and
nowhere else.

Each function is a few lines with one job, and each has a test in
C{tests/test_compat.py} named after it that fails, by name, when an upgrade
of Twisted or Autobahn changes what it relies on. Where lbws works around a
bug of theirs, C{docs/upstream.md} has the report to send and a reproduction,
so that the workaround can go once they fix it.

Nothing here runs at import time: L{lazyAutobahnDebugFormatting} and
L{plainIoDispatch} are installed by the service and each worker as they
start (L{lbws.service}, L{lbws.worker}).
"""

import functools
import pprint
import re

# Twisted


def innerEndpoint(endpoint):
    """
    The endpoint a wrapping server endpoint (C{haproxy:...}) listens with, or
    None for one that wraps nothing. Twisted keeps it in C{_wrappedEndpoint}
    of its private C{_WrapperServerEndpoint}.
    """
    return getattr(endpoint, "_wrappedEndpoint", None)


def tlsOptionsOf(endpoint):
    """
    The TLS context factory an C{SSL4ServerEndpoint} was built with (from
    the C{ssl:} string), kept in its private C{_sslContextFactory}.
    """
    return endpoint._sslContextFactory


def replaceTlsOptions(endpoint, options):
    """
    Make an C{SSL4ServerEndpoint} serve with C{options} instead: what the
    C{ssl:} string parser built cannot be told a minimum TLS version.
    """
    endpoint._sslContextFactory = options


def isPlainTcp(transport):
    """
    Whether C{transport} is a TCP connection itself, not a wrapper standing
    as one (TLS, the PROXY header's): only such a transport has a socket
    lbws may write to straight away, half-close, or ask the kernel about.
    Twisted's class for it, C{twisted.internet.tcp.Connection}, is not in
    its documented API.
    """
    from twisted.internet import tcp

    return isinstance(transport, tcp.Connection)


def quietHttpPool(pool):
    """
    Make a C{twisted.web.client.HTTPConnectionPool} build its connections'
    factories quiet: Twisted's private C{_HTTP11ClientFactory} is noisy, so
    each health check over HTTP logged a "Starting factory" and a
    "Stopping factory" line (three lines in four of a log). The pool keeps
    the factory class in its private C{_factory}.
    """
    pool._factory = _quietHttpFactory()
    return pool


@functools.cache
def _quietHttpFactory():
    from twisted.web.client import _HTTP11ClientFactory

    class QuietFactory(_HTTP11ClientFactory):
        noisy = False

    return QuietFactory


def tcpListenArguments(endpoint):
    """
    C{(port, backlog, interface)} an C{SSL4ServerEndpoint} listens with
    (its private C{_port}, C{_backlog}, C{_interface}, parsed from the
    C{ssl:} string): lbws listens on them with TCP and puts its own TLS
    layer on top (L{lbws.transport.listen.TlsServerEndpoint}).
    """
    return endpoint._port, endpoint._backlog, endpoint._interface


def hasQueuedWrites(transport):
    """
    True when a TCP transport holds bytes not yet handed to the kernel:
    C{dataBuffer} and the private C{_tempDataLen} of
    C{twisted.internet.abstract.FileDescriptor} (what C{write} appended
    since the last flush).
    """
    return bool(transport.dataBuffer or transport._tempDataLen)


def wrapperFactoryOf(endpoint):
    """
    The factory wrapper of a wrapping server endpoint (C{haproxy:...}):
    what it puts around the factory it is given before its inner endpoint
    listens with it (the private C{_wrapperFactory} of
    C{_WrapperServerEndpoint}).
    """
    return endpoint._wrapperFactory


def leaveListeningSocket(port):
    """
    Have a TCP port close only this process's descriptor when it stops
    listening, as it does for a socket it adopted: Twisted shuts a socket
    down before closing it (its private C{_shouldShutdown}), and on Linux a
    shutdown ends the listening for every process sharing the socket.
    """
    port._shouldShutdown = False


def forgetConnection(transport):
    """
    Let go of a TCP connection that another process holds now: Twisted
    stops watching it and this process's descriptor closes, without a
    shutdown (which would end the connection for the other process too)
    and without telling the protocol the connection was lost.
    """
    transport.stopReading()
    transport.stopWriting()
    transport.connected = False
    transport.disconnected = True
    transport.socket.close()


# Autobahn


class _Lazy:
    """
    What a formatting helper returns inside Autobahn once lazy: C{format}
    runs only if a log observer renders the event, so debug logs read the
    same.
    """

    __slots__ = ("_format", "_value")

    def __init__(self, format, value):
        self._format = format
        self._value = value

    def __str__(self):
        return self._format(self._value)

    __repr__ = __str__

    def __format__(self, spec):
        return format(str(self), spec)


def lazyAutobahnDebugFormatting():
    """
    Autobahn formats arguments for debug lines that are nearly always
    discarded: it pretty-prints every option of each new WebSocket (40% of
    lbws's CPU under connection churn) and builds highlighted type names
    (C{hltype}, 17 calls per relayed connection, 5%, and C{hlval}; see
    bench/README.md). Make the C{pformat}, C{hltype} and C{hlval} its
    WebSocket modules call lazy. Safe to call more than once.
    """
    import autobahn.twisted.websocket
    import autobahn.util
    import autobahn.websocket.protocol

    lazyType = functools.partial(_Lazy, autobahn.util.hltype)
    lazyValue = functools.partial(_Lazy, autobahn.util.hlval)
    autobahn.websocket.protocol.pformat = functools.partial(_Lazy, pprint.pformat)
    for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
        module.hltype = lazyType
        module.hlval = lazyValue


def plainIoDispatch():
    """
    Twisted's reactors run every read and write event through
    C{twisted.python.log.callWithLogger}, which asks the transport for its
    log prefix and pushes it as the legacy log context around the call:
    about 15% of lbws's CPU per relayed small message (bench/README.md,
    "Relaying a message"; docs/upstream.md). Call the handler directly
    instead, and log what escapes it with that prefix as before. The one
    thing given up: a legacy C{twisted.python.log.msg} line emitted inside
    an I/O event no longer carries the transport's prefix as its system;
    lbws's own lines (twisted.logger) never did. Safe to call more than
    once.
    """
    from twisted.python import log

    log.callWithLogger = _plainCallWithLogger


def _plainCallWithLogger(logger, func, *args, **kw):
    try:
        return func(*args, **kw)
    except KeyboardInterrupt:
        raise
    except BaseException:
        from twisted.python import log

        try:
            prefix = logger.logPrefix()
        except BaseException:
            prefix = "(buggy logPrefix method)"
        log.err(system=prefix)


def handOver(protocol, successor):
    """
    Make C{successor} the protocol of C{protocol}'s connection: Twisted
    delivers its bytes and its end to C{successor} from now on, and
    C{protocol} can go.

    The transport is a TCP connection (its C{protocol}, possibly the
    wrapper an endpoint put around C{protocol}, which goes too) or a
    wrapping protocol standing as the transport, TLS or the PROXY header's
    (its C{wrappedProtocol}).
    """
    transport = protocol.transport
    if getattr(transport, "wrappedProtocol", None) is protocol:
        transport.wrappedProtocol = successor
        return
    current = transport.protocol
    if current is not protocol and getattr(current, "_wrappedProtocol", None) is not protocol:
        raise ValueError(f"{protocol!r} is not the protocol of {transport!r}")
    transport.protocol = successor


def received(protocol):
    """
    The bytes an Autobahn protocol has read and not consumed yet (its
    C{data}): during the opening handshake, the HTTP head so far.
    """
    return protocol.data


def takeReceived(protocol):
    """
    Take the bytes that arrived behind the opening handshake out of an
    Autobahn protocol, so that lbws relays them instead of Autobahn parsing
    them.
    """
    early, protocol.data = protocol.data, b""
    return early


def requestTarget(protocol):
    """
    The request target of a client's opening handshake as the client sent
    it (path and query, not decoded), from Autobahn's C{http_status_line}.
    """
    return protocol.http_status_line.split()[1]


def statusLine(protocol):
    """
    The status line of a backend's answer to a WebSocket client protocol's
    opening handshake (C{http_status_line}), or None before it came.
    """
    return getattr(protocol, "http_status_line", None) or None


def responseHead(protocol):
    """
    The raw HTTP head of a backend's 101 answer to a WebSocket client
    protocol (C{http_response_data}).
    """
    return protocol.http_response_data


def isConnecting(protocol):
    """
    True while an Autobahn protocol's opening handshake is not over.
    """
    return protocol.state == protocol.STATE_CONNECTING


def isClosing(protocol):
    """
    True once an Autobahn protocol has sent a close and waits for the answer.
    """
    return protocol.state == protocol.STATE_CLOSING


def refuseHandshake(protocol, reason, code):
    """
    Answer a client's opening handshake with HTTP C{code} and close
    (Autobahn's server-side C{failHandshake}).
    """
    protocol.failHandshake(reason, code)


def failHandshakeQuietly(protocol, reason, code, responseHeaders=None):
    """
    What Autobahn's server-side C{failHandshake} does (answer with HTTP
    C{code} through C{sendHttpErrorResponse}, keep C{reason} as the
    connection's unclean reason, drop the connection once the answer is
    written), without its two log lines: an info line and, from
    C{dropConnection}, a warning with the peer's internals. lbws's own
    refusals are not faults; the access log has one line for each.

    Relies on C{dropConnection} logging at warn only when C{wasClean} is
    false (tests/test_compat.py test_failHandshakeQuietly).
    """
    protocol.wasNotCleanReason = reason
    protocol.sendHttpErrorResponse(code, reason, responseHeaders)
    wasClean, protocol.wasClean = protocol.wasClean, True
    try:
        protocol.dropConnection(abort=False)
    finally:
        protocol.wasClean = wasClean


def uncleanReason(protocol):
    """
    Why Autobahn thinks the connection did not end cleanly (its
    C{wasNotCleanReason}), or None.
    """
    return protocol.wasNotCleanReason


def setRequest(factory, host, resource, protocols, headers, useragent, origin, hostHeader=None):
    """
    The request an Autobahn client factory sends, but for its URL's scheme
    and port: its Host header and request target (C{host} and
    C{resource}, otherwise taken from the URL it was given: lbws sends the
    client's own target, and an IPv6 host with its brackets), then the
    session parameters C{setSessionParameters} would set without parsing
    the URL again (a third of the cost of opening a backend's factory).
    C{hostHeader}, when given, is the Host line's whole value instead
    (L{OctetRequest} writes it).
    """
    factory.hostHeader = hostHeader
    factory.host = host
    factory.resource = resource
    factory.protocols = protocols or []
    factory.headers = headers or {}
    factory.useragent = useragent
    factory.origin = origin


def answerRefusal(protocol, answer):
    """
    Have a server protocol answer its client's opening handshake with the
    bytes of C{answer} (a whole HTTP response) instead of Autobahn's own
    error page: called from an override of Autobahn's
    C{sendHttpErrorResponse}, which its C{failHandshake} ends in.
    """
    protocol.sendData(answer)


def processReceived(protocol):
    """
    Have an Autobahn protocol parse what it has received (its
    C{consumeData}), as after new bytes: for a head put back with
    L{replaceReceived}.
    """
    protocol.consumeData()


def replaceReceived(protocol, data):
    """
    Put C{data} in the place of the bytes an Autobahn protocol has read and
    not consumed (its C{data}): lbws hands Autobahn a checked request head.
    """
    protocol.data = data


class OctetRequest:
    """
    A mixin for a C{WebSocketClientProtocol} whose opening handshake
    request goes out with one byte per character (ISO-8859-1), not as
    UTF-8.

    Autobahn decodes a client's request head as ISO-8859-1 but encodes the
    request it sends as UTF-8, so a header value byte 0x80-0xFF the client
    sent would reach the backend as two bytes. lbws forwards the client's
    values, whose characters are all below 256, and writes everything else
    in ASCII, so the ISO-8859-1 bytes are the client's own. (A request with
    other characters, from a config file's non-ASCII url path, stays
    UTF-8.)

    Relies on Autobahn keeping the request it is about to send in
    C{http_request_data} (tests/test_compat.py test_OctetRequest).
    """

    def sendData(self, data, sync=False, chopsize=None):
        if isConnecting(self) and data is getattr(
            self, "http_request_data", None
        ):
            try:
                data = data.decode("utf-8").encode("latin-1")
            except UnicodeEncodeError:
                pass
            host = getattr(self.factory, "hostHeader", None)
            if host is not None:
                data = withHost(data, host)
            self.http_request_data = data
        return super().sendData(data, sync, chopsize)


_HOST_LINE = re.compile(rb"\r\nHost: [^\r\n]*\r\n")


def withHost(request, host):
    """
    Autobahn's opening handshake request C{request} with C{host} (the
    client's own Host value, as lbws forwards it by default) for the
    C{host:port} line Autobahn always writes from its factory's URL.

    Relies on Autobahn writing exactly one C{Host:} line, named so, right
    after the request line or User-Agent (tests/test_compat.py
    test_withHost).
    """
    return _HOST_LINE.sub(
        lambda _: b"\r\nHost: " + host.encode("latin-1") + b"\r\n", request, count=1
    )


class WriteThrough:
    """
    A mixin for an Autobahn protocol whose opening handshake's request (a
    client's) or 101 answer (a server's) goes straight to the socket
    (L{lbws.transport.sockets.writerFor}) instead of through Twisted's write buffer,
    which costs two epoll changes and a reactor turn per write. An error
    answer still takes the buffer: Twisted then closes the connection in
    the same turn it writes the answer.

    Relies on Autobahn's C{sendData} writing C{data} with
    C{transport.write} when neither C{sync} nor C{chopsize} is asked for
    and its C{send_queue} is empty, and on a client keeping the request it
    sends in C{http_request_data} (tests/test_compat.py
    test_WriteThrough). The traffic statistics Autobahn keeps then, which
    lbws does not read, are not kept.
    """

    def sendData(self, data, sync=False, chopsize=None):
        if (
            sync
            or chopsize
            or self.send_queue
            or not (data is getattr(self, "http_request_data", None) or data.startswith(_SWITCHING))
        ):
            return super().sendData(data, sync, chopsize)
        from lbws.transport.sockets import writerFor  # lbws.transport.sockets imports this module

        writerFor(self.transport)(data)
        return None


_SWITCHING = b"HTTP/1.1 101 "


_OBS_TEXT = re.compile(rb"[\x80-\xff]")


def autobahnReadableHead(head):
    """
    A request head (with CRLF line ends) as Autobahn's parser must see it
    when a header value carries bytes 0x80-0xFF (obs-text: UTF-8 cookies,
    say), or C{head} itself when none does.

    Autobahn's C{parseHttpHeader} changed its reading of such bytes: up to
    26.10 it split lines with C{str.splitlines}, which breaks a line at 0x85
    (NEL in latin-1), so C{X-A: \\x85Authorization: forged} became two
    headers; from 26.11 it splits at CRLF only and refuses control bytes.
    Each byte 0x80-0xFF becomes C{?}: printable ASCII that both readings
    keep inside its value, and no token character, so a subprotocol or
    extension name with such a byte is still refused. Autobahn reads only
    the upgrade's own fields from this copy: the fields lbws forwards, byte
    for byte, are parsed by lbws (L{lbws.protocol.headers.parseFields}).
    tests/test_compat.py test_autobahnReadableHead checks the Autobahn
    installed reads the copy as one header per line.
    """
    if _OBS_TEXT.search(head) is None:
        return head
    return _OBS_TEXT.sub(b"?", head)


def copyFactory(template):
    """
    A shallow copy of an Autobahn factory, made the short way: a new
    instance of its class with the template's attributes (C{copy.copy}
    takes three times as long, and each backend connection needs one).
    Relies on Autobahn's factories keeping their state in the instance's
    C{__dict__}, without C{__slots__} (tests/test_compat.py
    test_copyFactory).
    """
    cls = type(template)
    factory = cls.__new__(cls)
    factory.__dict__.update(vars(template))
    return factory


def unparsedExtensions(protocol, header, removeQuotes=True):
    """
    Stands in for Autobahn's private C{WebSocketProtocol._parseExtensionsHeader}
    on lbws's protocols (assigned as that method): Autobahn then sees no
    extension at all. Autobahn would parse C{Sec-WebSocket-Extensions}
    itself, check permessage-deflate parameters against its own limits (it
    refuses window bits of 8, which RFC 7692 allows) and set up a
    compressor; lbws passes the extension through instead, negotiating from
    the raw headers (L{lbws.protocol.extensions}).
    """
    return []



class UnparsedExtensions:
    """
    A mixin for lbws's Autobahn protocols: their private
    C{_parseExtensionsHeader} is L{unparsedExtensions}, so Autobahn sees no
    extension and lbws negotiates permessage-deflate from the raw headers
    (L{lbws.protocol.extensions}).
    """

    _parseExtensionsHeader = unparsedExtensions
