"""
Connections from lbws to a backend, for the relay and the health probes
alike: the endpoint (TCP, or TLS verified), Autobahn's client side with
lbws's options, and one L{Attempt} per connection with its timeouts, its
cancellation and the reason it failed.

An answer other than 101 is read whole (see L{lbws.protocol.answers}) and the
attempt fails with L{BackendRefused}: the application said no, which is
not a backend failure. Everything else that stops a handshake (a refused
or timed-out connect, a reset, a malformed answer, a TLS failure) fails it
with a reason a person can read. lbws's own lack of resources (file
descriptors, buffers, memory) is told apart by L{localShortage}: it is not
the backend's fault.
"""

import errno
import functools
import os

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.protocol import ClientFactory
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger

from lbws.compat import (
    WriteThrough,
    copyFactory,
    received,
    setRequest,
    takeReceived,
    uncleanReason,
)
from lbws.protocol.answers import MAX_HEAD, BodyReader, MalformedAnswer, parseHead
from lbws.transport.sockets import endGently, setNoDelay
from lbws.transport.tlserrors import describeTlsFailure
from lbws.protocol.wsoptions import PASSTHROUGH

_log = Logger()

# Seconds a backend connection lbws gave up on has to answer its FIN with
# its own before it is cut (L{BackendProtocol.giveUp}).
GIVE_UP_LINGER = 2

# Errors of lbws's own process or host, not of a backend: out of file
# descriptors (per process, system-wide), of socket buffers, of memory.
LOCAL_SHORTAGES = frozenset([errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])


class BackendHandshakeError(Exception):
    """
    The backend did not open a WebSocket, through its own fault.
    """

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class BackendTimeout(BackendHandshakeError):
    """
    The backend did not connect (C{connect_timeout}) or answer
    (C{handshake_timeout}) in time: its failure, which a client gets as
    504 (L{lbws.backends.attempts}).
    """


class OpeningError(Exception):
    """
    lbws could not even start connecting (a CA file gone, a bug): its own
    failure, not the backend's.
    """


class BackendRefused(Exception):
    """
    The backend answered the handshake with something other than 101.

    @ivar head: its L{lbws.protocol.answers.Head}.
    @ivar body: its body, up to L{lbws.protocol.answers.MAX_BODY}.
    """

    def __init__(self, head, body):
        reason = head.reason.decode("latin-1")
        super().__init__(f"backend answered HTTP {head.status} {reason}".strip())
        self.head = head
        self.body = body


def localShortage(failure):
    """
    The errno name if C{failure} is lbws running out of a resource of its
    own (EMFILE, ENFILE, ENOBUFS, ENOMEM), else None.
    """
    value = failure.value
    code = getattr(value, "osError", None)
    if code is None and isinstance(value, OSError):
        code = value.errno
    if code in LOCAL_SHORTAGES:
        return errno.errorcode[code]
    return None


class Shortages:
    """
    Says in the log when lbws runs out of its own resources: once per
    burst (the first shortage after L{QUIET} seconds without one), not
    once per client or probe.
    """

    QUIET = 10.0

    def __init__(self, clock, what):
        self._clock = clock
        self._what = what
        self._last = None

    def note(self, why):
        now = self._clock.seconds()
        if self._last is None or now - self._last > self.QUIET:
            _log.error(
                "lbws is out of resources ({why}) {what}; backends are not counted"
                " as failed",
                why=why,
                what=self._what,
            )
        self._last = now


def hostForUrl(host):
    """
    A host as it stands in a URL and a Host header: IPv6 in brackets.
    """
    return f"[{host}]" if ":" in host else host


# What lbws offers a wss:// backend by ALPN, as browsers do: some servers
# refuse a client that offers nothing.
ALPN = [b"http/1.1"]


def warnUnverified(settings):
    """
    Warn of each wss:// backend of C{settings} whose certificate lbws does
    not verify (C{verify = false}): once per start and per reload, not per
    connection or probe.
    """
    for backend in settings.backends:
        if backend.secure and not backend.verify:
            _log.warn(
                "backend {backend}: TLS certificate NOT verified (verify = false)",
                backend=backend.name,
            )


def _tlsOptions(backend):
    if not backend.verify:
        return _unverifiedOptions()
    # The CA file's modification time is part of the key, so a replaced file
    # is read again; otherwise every connection and probe shares one context.
    stamp = os.stat(backend.ca).st_mtime_ns if backend.ca else None
    return _verifiedOptions(backend.host, backend.ca, stamp)


@functools.lru_cache(maxsize=1)
def _unverifiedOptions():
    return CertificateOptions(verify=False, acceptableProtocols=ALPN)


@functools.lru_cache(maxsize=256)
def _verifiedOptions(host, ca, stamp):
    """
    TLS options checking C{host} against C{ca} (or the system's CAs):
    reading the CA file and building an OpenSSL context is far dearer than
    a connection, so it is done once per host, file and file version.
    """
    if ca:
        with open(ca, "rb") as f:
            trust = trustRootFromCertificates([Certificate.loadPEM(f.read())])
    else:
        trust = platformTrust()
    return optionsForClientTLS(host, trustRoot=trust, acceptableProtocols=ALPN)


def backendEndpoint(reactor, backend, timeout, tls=True):
    """
    The client endpoint for a backend: TCP, or TLS with its name verified
    (unless C{tls} is False: the tcp probe).
    """
    # A member found by DNS discovery connects to its address; its host
    # name stays for the Host header and the TLS name check.
    host = backend.address or backend.host
    if isIPAddress(host):
        endpoint = TCP4ClientEndpoint(reactor, host, backend.port, timeout)
    elif isIPv6Address(host):
        endpoint = TCP6ClientEndpoint(reactor, host, backend.port, timeout)
    else:
        # Names are resolved for each connection, so DNS changes are followed.
        endpoint = HostnameEndpoint(reactor, host, backend.port, timeout=timeout)
    if tls and backend.secure:
        endpoint = wrapClientTLS(_tlsOptions(backend), endpoint)
    return endpoint


class BackendProtocol(WriteThrough, WebSocketClientProtocol):
    """
    lbws's WebSocket to a backend. Autobahn does the opening handshake;
    lbws reads the answer head first, and an answer other than 101 whole.

    @ivar connection: the member's L{lbws.backends.pool.Connection} this counts as,
        if any; closed when the connection is lost.
    @ivar head: the backend's answer head (L{lbws.protocol.answers.Head}), once
        read.
    """

    connection = None
    head = None
    attempt = None
    _body = None
    _givenUp = None

    def connectionMade(self):
        super().connectionMade()
        setNoDelay(self.transport)

    def processHandshake(self):
        data = received(self)
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD:
                self._malformed(f"answer head longer than {MAX_HEAD} bytes")
            return None
        try:
            head = parseHead(data[: end + 4])
        except MalformedAnswer as e:
            self._malformed(str(e))
            return None
        self.head = head
        if head.status == 101:
            return super().processHandshake()
        if head.status < 200:
            self._malformed(f"interim answer {head.status} to a WebSocket handshake")
            return None
        rest = takeReceived(self)[end + 4 :]
        try:
            self._body = BodyReader(head)
        except MalformedAnswer as e:
            self._malformed(str(e))
            return None
        self._readBody(rest)
        return None

    def _malformed(self, why):
        self.attempt.failed(BackendHandshakeError(f"malformed answer from backend: {why}"))
        self.transport.loseConnection()

    def giveUp(self, clock):
        """
        lbws no longer wants this connection (its handshake timed out, a
        check was cut, the client left): end it with FIN and read nothing
        more from it (L{lbws.transport.sockets.endGently}).
        """
        if self._givenUp is None and self.transport is not None:
            self._body = None
            self._givenUp = endGently(self.transport, clock, GIVE_UP_LINGER)

    def dataReceived(self, data):
        if self._givenUp is not None:
            return
        if self._body is not None:
            self._readBody(data)
        else:
            super().dataReceived(data)

    def _readBody(self, data):
        try:
            done = self._body.feed(data)
        except MalformedAnswer as e:
            self._malformed(str(e))
            return
        if done:
            self.refused()

    def refused(self):
        """
        The refusal is read (or its time is up): hand it on, and close the
        connection normally.
        """
        if self._body is not None:
            body, self._body = self._body, None
            self.attempt.failed(BackendRefused(self.head, body.body))
            self.transport.loseConnection()

    def onOpen(self):
        self.attempt.opened(self)

    def connectionLost(self, reason):
        if self._givenUp is not None and self._givenUp.active():
            self._givenUp.cancel()
        if self._body is not None and self._body.end():
            self.refused()
        if self.connection is not None:
            self.connection.close()
        self.attempt.lost(self, reason)
        super().connectionLost(reason)


class _Factory(WebSocketClientFactory):
    noisy = False


@functools.lru_cache(maxsize=256)
def _template(reactor, protocol, url):
    """
    The Autobahn client factory of every connection to C{url} speaking
    C{protocol}, built once with lbws's options: each connection gets a
    copy with its own request (building one takes 36 microseconds, a copy
    and its request 2.4).
    """
    factory = _Factory(url=url, reactor=reactor)
    factory.protocol = protocol
    factory.setProtocolOptions(
        **PASSTHROUGH,
        perMessageCompressionOffers=[],
        serverConnectionDropTimeout=0,
    )
    return factory


class _Connecting(ClientFactory):
    """
    What an attempt connects with: builds its protocol. The TCP connection
    keeps its factory as long as it lives, so this one lets the attempt go
    once the handshake is over (L{Attempt.opened}).
    """

    noisy = False

    def __init__(self, attempt):
        self.attempt = attempt

    def buildProtocol(self, addr):
        attempt = self.attempt
        protocol = attempt._factory.buildProtocol(addr)
        attempt._built(protocol)
        return protocol

    def clientConnectionFailed(self, connector, reason):
        # Called for a connectTCP of the attempt's own; an endpoint
        # reports through its Deferred instead.
        if self.attempt is not None:
            self.attempt._connectFailed(reason)


def _connectTimedOut(result, timeout):
    """
    An endpoint's connect that C{connect_timeout} cut short timed out,
    whatever the endpoint made of being cancelled (a name's endpoint fails
    with ConnectingCancelledError or DNSLookupError, see
    L{Attempt._connectFailed}).
    """
    raise TimeoutError(timeout, "connect")


def _forget(protocol):
    """
    An endpoint's connect Deferred lives as long as the connection: it
    must not keep the protocol (L{Attempt._built} has it).
    """
    return None


class Attempt:
    """
    One connection to one backend, from connect to the backend's answer.

    L{result} fires with the open L{BackendProtocol} once the backend
    accepted the WebSocket, or fails with L{BackendRefused},
    L{BackendHandshakeError}, the connect error (an C{OSError}, a
    C{ConnectError}), L{OpeningError} or C{CancelledError}. Cancelling it cuts the
    connection. Once it failed, its C{connection} no longer counts.

    @param resource: the request target on the backend (path and query).
    @param protocol: the L{BackendProtocol} class to speak.
    @param handshakeTimeout: seconds from connect to the answer; 0 = none
        (the caller bounds the attempt, as the health checks do).
    @param connection: the member's L{lbws.backends.pool.Connection}, or None.
    @param hostHeader: the Host value the backend gets, or None for its
        own C{host:port} (a protocol without L{lbws.compat.OctetRequest}
        always gets its own).
    """

    def __init__(
        self,
        reactor,
        backend,
        resource,
        protocol,
        connectTimeout,
        handshakeTimeout=0,
        connection=None,
        protocols=None,
        headers=None,
        useragent=None,
        origin=None,
        hostHeader=None,
    ):
        self._reactor = reactor
        self._backend = backend
        self._connectTimeout = connectTimeout
        self._handshakeTimeout = handshakeTimeout
        self.connection = connection
        self.protocol = None
        self._stopConnecting = None
        self._timer = None
        self.result = Deferred(self._cancel)
        scheme = "wss" if backend.secure else "ws"
        url = f"{scheme}://{hostForUrl(backend.host)}:{backend.port}/"
        factory = self._factory = copyFactory(_template(reactor, protocol, url))
        # The Host header: Autobahn writes host:port, so an IPv6 address
        # needs its brackets.
        setRequest(
            factory,
            hostForUrl(backend.host),
            resource,
            protocols,
            headers,
            useragent,
            origin,
            hostHeader,
        )
        self._connector = _Connecting(self)

    def start(self):
        """
        Connect; returns L{result}.
        """
        backend = self._backend
        host = backend.address or backend.host
        try:
            if not backend.secure and (isIPAddress(host) or isIPv6Address(host)):
                # Straight to the reactor: an endpoint would add a wrapping
                # factory, a wrapping protocol and Deferreds to each
                # connection (bench/README.md).
                connector = self._reactor.connectTCP(
                    host, backend.port, self._connector, self._connectTimeout
                )
                self._stopConnecting = connector.stopConnecting
                return self.result
            endpoint = backendEndpoint(self._reactor, self._backend, self._connectTimeout)
            connecting = endpoint.connect(self._connector)
        except Exception as e:
            self.failed(OpeningError(f"{type(e).__name__}: {e}"))
            return self.result
        self._stopConnecting = connecting.cancel
        connecting.addTimeout(
            self._connectTimeout, self._reactor, onTimeoutCancel=_connectTimedOut
        )
        connecting.addCallbacks(_forget, self._connectFailed)
        return self.result

    def _built(self, protocol):
        """
        The TCP connection is made and C{protocol} is about to speak on it.
        """
        self._stopConnecting = None
        self.protocol = protocol
        protocol.attempt = self
        protocol.connection = self.connection
        if self._handshakeTimeout and not self.result.called:
            self._timer = self._reactor.callLater(self._handshakeTimeout, self._timedOut)

    def _connectFailed(self, failure):
        self._stopConnecting = None
        if self._connector.attempt is None:
            # Cancelled (a client that left, see L{_cancel}): what an
            # endpoint's connect fails with then is not the backend's
            # doing, be it CancelledError, ConnectingCancelledError while
            # TCP connects, or the DNSLookupError a name's endpoint makes of
            # a lookup cut short.
            return None
        if failure.check(TimeoutError, ConnectTimeoutError):
            failure = BackendTimeout(f"connect timed out after {self._connectTimeout:g}s")
        self.failed(failure)
        return None

    def _timedOut(self):
        self._timer = None
        protocol = self.protocol
        if protocol._body is not None:
            # The refusal's head came: the client gets what there is of it.
            protocol.refused()
            return
        self.failed(
            BackendTimeout(f"backend handshake timed out after {self._handshakeTimeout:g}s")
        )
        protocol.giveUp(self._reactor)

    def opened(self, protocol):
        if not self.result.called:
            self._settled()
            if self.connection is not None:
                self.connection.established()
            self.result.callback(protocol)
            # The relay has the connection now: nothing the TCP connection
            # keeps should hold the attempt and its protocol.
            self._connector.attempt = None

    def failed(self, error):
        if not self.result.called:
            self._settled()
            if self.connection is not None:
                self.connection.close()
            self.result.errback(error)

    def lost(self, protocol, reason):
        """
        The connection ended before the answer was complete.
        """
        if self.result.called:
            return
        tls = describeTlsFailure(reason, protocol.transport)
        if tls is not None:
            why = tls
        elif uncleanReason(protocol):
            why = f"backend handshake failed: {uncleanReason(protocol)}"
        else:
            why = f"backend closed during handshake: {reason.getErrorMessage()}"
        self.failed(BackendHandshakeError(why))

    def _settled(self):
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _cancel(self, result):
        self._settled()
        if self.connection is not None:
            self.connection.close()
        if self._stopConnecting is not None:
            # What the connect then reports is not news: cancelled.
            self._connector.attempt = None
            self._stopConnecting()
        protocol = self.protocol
        if protocol is not None:
            protocol.giveUp(self._reactor)
