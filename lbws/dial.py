"""
Opening the backend WebSocket for a client: choose a member, connect with
C{connect_timeout}, handshake with C{handshake_timeout}, and try other
members (C{retries}) when one fails.
"""

import functools
import os

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger

from lbws import extensions
from lbws.balance import hashKeyOf
from lbws.headers import forwardedHeaders
from lbws.sockets import setNoDelay
from lbws.tlserrors import describeTlsFailure

_log = Logger()


class BackendHandshakeError(Exception):
    """
    The backend did not open a WebSocket.

    @ivar status: the HTTP status the backend answered with, if any.
    """

    def __init__(self, reason, status=None):
        super().__init__(reason)
        self.reason = reason
        self.status = status


class BackendProtocol(WebSocketClientProtocol):
    """
    lbws's WebSocket to a backend. Autobahn does the opening handshake;
    after that the relay takes the bytes over (see L{lbws.relay}).
    """

    leg = None
    httpStatus = None
    # Autobahn seam (see extensions.unparsedExtensions): lbws checks the
    # backend's Sec-WebSocket-Extensions answer itself.
    _parseExtensionsHeader = extensions.unparsedExtensions

    def connectionMade(self):
        super().connectionMade()
        setNoDelay(self.transport)

    def processHandshake(self):
        # Remember the status so that a 4xx can be passed on to the client.
        end = self.data.find(b"\r\n\r\n")
        if end >= 0 and self.httpStatus is None:
            parts = self.data[: self.data.find(b"\r\n")].split(None, 2)
            if len(parts) >= 2 and parts[1].isdigit():
                self.httpStatus = int(parts[1])
                self.httpReason = parts[2].decode("latin-1") if len(parts) > 2 else ""
        return super().processHandshake()

    def onOpen(self):
        # Bytes that came right behind the handshake belong to the relay.
        self.early, self.data = self.data, b""
        self.factory.handshakeDone(self)

    def dataReceived(self, data):
        if self.leg is not None:
            self.leg.received(data)
        else:
            super().dataReceived(data)

    def connectionLost(self, reason):
        if self.leg is not None:
            self.leg.connectionLost(reason)
        else:
            self.factory.lostBeforeRelay(self, reason)
        super().connectionLost(reason)


class BackendFactory(WebSocketClientFactory):
    """
    One backend connection attempt: fires L{opened} with the protocol once
    the backend accepted the WebSocket, or fails it with
    L{BackendHandshakeError}.
    """

    protocol = BackendProtocol
    noisy = False

    def __init__(self, opened, **kwargs):
        super().__init__(**kwargs)
        self.opened = opened
        self.protocolInstance = None
        self.extensionOffer = None  # what the backend was offered
        self.setProtocolOptions(
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            autoPingInterval=0,
            failByDrop=False,
            utf8validateIncoming=False,
            maxFramePayloadSize=0,
            maxMessagePayloadSize=0,
            perMessageCompressionOffers=[],
            tcpNoDelay=True,
        )

    def buildProtocol(self, addr):
        self.protocolInstance = super().buildProtocol(addr)
        return self.protocolInstance

    def handshakeDone(self, protocol):
        if self.opened.called:
            return
        answer = extensions.accepted(protocol.http_headers)
        why = extensions.answerProblem(answer, self.extensionOffer)
        if why is None:
            self.opened.callback(protocol)
        else:
            self.opened.errback(BackendHandshakeError(f"backend handshake failed: {why}"))
            protocol.transport.loseConnection()

    def lostBeforeRelay(self, protocol, reason):
        if self.opened.called:
            return
        status = protocol.httpStatus
        tls = describeTlsFailure(reason, protocol.transport)
        if tls is not None:
            why = tls
        elif status is not None and status != 101:
            why = f"backend answered HTTP {status} {protocol.httpReason}".strip()
        elif protocol.wasNotCleanReason:
            why = f"backend handshake failed: {protocol.wasNotCleanReason}"
        else:
            why = f"backend closed during handshake: {reason.getErrorMessage()}"
        self.opened.errback(BackendHandshakeError(why, status))


def _tlsOptions(backend):
    if not backend.verify:
        _log.warn(
            "backend {backend}: TLS certificate NOT verified (verify = false)",
            backend=backend.name,
        )
        return _unverifiedOptions()
    # The CA file's modification time is part of the key, so a replaced file
    # is read again; otherwise every connection and probe shares one context.
    stamp = os.stat(backend.ca).st_mtime_ns if backend.ca else None
    return _verifiedOptions(backend.host, backend.ca, stamp)


@functools.lru_cache(maxsize=1)
def _unverifiedOptions():
    return CertificateOptions(verify=False)


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
    return optionsForClientTLS(host, trustRoot=trust)


def backendEndpoint(reactor, backend, timeout):
    """
    The client endpoint for a backend: TCP, or TLS with its name verified.
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
        endpoint = HostnameEndpoint(reactor, backend.host, backend.port, timeout=timeout)
    if backend.secure:
        endpoint = wrapClientTLS(_tlsOptions(backend), endpoint)
    return endpoint


class Dialer:
    """
    Opens backend WebSockets for clients, with retries across members.
    """

    def __init__(self, reactor, pool, settings, counters, endpointFor=None):
        """
        @param endpointFor: makes the client endpoint of a backend; tests
            give one that never connects. Defaults to L{backendEndpoint}.
        """
        self._reactor = reactor
        self._pool = pool
        self.settings = settings
        self._counters = counters
        self._endpointFor = endpointFor or backendEndpoint

    def dial(self, request, target, peerHost, secure):
        """
        Open a WebSocket to a healthy member on behalf of a client.

        @param request: the client's Autobahn C{ConnectionRequest}.
        @param target: the client's request target (path and query) exactly
            as it sent it.
        @return: a Deferred firing with C{(member, BackendProtocol)}, or
            failing with C{ConnectionDeny} carrying the HTTP status the
            client should get. Cancelling it closes any backend attempt.
        """
        settings = self.settings
        key = hashKeyOf(settings.hash_key, peerHost, request)
        tried = []
        current = [None]

        def cancel(_):
            if current[0] is not None:
                current[0].cancel()

        result = Deferred(cancel)

        def attempt():
            member = self._pool.choose(key, exclude=tried)
            if member is None:
                if tried:
                    self._counters.handshakes["backend_failed"] += 1
                    fail(502, "Bad Gateway: no backend could be reached")
                else:
                    self._counters.handshakes["no_backend"] += 1
                    fail(503, "Service Unavailable: no healthy backend")
                return
            tried.append(member)
            member.active += 1
            d = current[0] = self._open(member, request, target, peerHost, secure)
            d.addCallbacks(
                lambda protocol: opened(member, protocol),
                lambda f: failed(member, f),
            )

        def opened(member, protocol):
            current[0] = None
            member.total += 1
            result.callback((member, protocol))

        def failed(member, failure):
            current[0] = None
            member.active -= 1
            self._pool.leaveIfIdle(member)
            if failure.check(CancelledError):
                return
            why = failure.getErrorMessage()
            status = getattr(failure.value, "status", None)
            if status is not None and 400 <= status < 500:
                # The application said no (auth, path): pass that on.
                self._counters.handshakes["backend_refused"] += 1
                fail(status, getattr(failure.value, "reason", why))
                return
            member.failed += 1
            health = settings.health
            member.recordCheck(
                False, self._reactor.seconds(), health.rise, health.fall, why
            )
            _log.warn(
                "backend {backend} failed for {peer}: {why}",
                backend=member.name,
                peer=peerHost,
                why=why,
            )
            if len(tried) <= settings.retries:
                attempt()
            else:
                self._counters.handshakes["backend_failed"] += 1
                fail(502, f"Bad Gateway: {why}")

        def fail(status, reason):
            if not result.called:
                result.errback(ConnectionDeny(status, reason))

        attempt()
        return result

    def _open(self, member, request, target, peerHost, secure):
        settings = self.settings
        backend = member.settings
        reactor = self._reactor
        state = {"connecting": None, "timer": None, "cancelled": False}

        def cancel(_):
            state["cancelled"] = True
            if state["connecting"] is not None:
                state["connecting"].cancel()
            protocol = factory.protocolInstance
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()

        opened = Deferred(cancel)
        headers, useragent, origin = forwardedHeaders(request, peerHost, secure)
        offer = extensions.forwardedOffer(request.headers, settings.compression)
        if offer is not None:
            headers["Sec-WebSocket-Extensions"] = offer
        factory = BackendFactory(
            opened,
            url=f"{'wss' if backend.secure else 'ws'}://{backend.host}:{backend.port}/",
            protocols=request.protocols,
            headers=headers,
            useragent=useragent,
            origin=origin,
            reactor=reactor,
        )
        factory.resource = backend.path + target if backend.path else target
        factory.extensionOffer = offer

        def connected(protocol):
            state["connecting"] = None
            state["timer"] = reactor.callLater(
                settings.handshake_timeout, timedOut, protocol
            )
            return protocol

        def timedOut(protocol):
            state["timer"] = None
            if not opened.called:
                opened.errback(
                    BackendHandshakeError(
                        f"backend handshake timed out after {settings.handshake_timeout:g}s"
                    )
                )
            protocol.transport.abortConnection()

        def connectFailed(failure):
            state["connecting"] = None
            if state["cancelled"]:
                return
            if failure.check(TimeoutError):
                failure = BackendHandshakeError(
                    f"connect timed out after {settings.connect_timeout:g}s"
                )
            opened.errback(failure)

        def settled(result):
            if state["timer"] is not None and state["timer"].active():
                state["timer"].cancel()
            return result

        endpoint = self._endpointFor(reactor, backend, settings.connect_timeout)
        connecting = state["connecting"] = endpoint.connect(factory)
        connecting.addTimeout(settings.connect_timeout, reactor)
        connecting.addCallbacks(connected, connectFailed)
        opened.addBoth(settled)
        return opened
