"""
Listening endpoints (C{listen}, C{dashboard}): any Twisted server endpoint
string, with TLS held to version 1.2 or later, served by a L{Listener}.

Twisted's C{ssl:} endpoint builds its TLS options from the string. The
lowest version it allows by default depends on the Twisted version (TLS 1.2
in the one tested here; older ones, which lbws's requirements allow, may
allow less), and the string's C{sslmethod=} turns the version floor off
altogether (with C{TLS_METHOD} or C{SSLv23_METHOD}) or pins an old version. So lbws rebuilds the options of every C{ssl:}
endpoint, also one wrapped by C{haproxy:}, from the same certificate, key,
chain and DH parameters with TLS 1.2 as the floor, and refuses C{sslmethod}
values that name anything but "negotiate the best version".

Every TLS listener speaks HTTP/1.1 and says so by ALPN (L{ServerTls}):
browsers and curl offer it, and Twisted 26.10 fails any client that
offers ALPN to a server that declares no protocol (docs/upstream.md).
lbws listens with TCP and puts its own TLS layer on top
(L{TlsServerEndpoint}, L{TlsServerFactory}), the same one each worker of
C{workers = N} puts on the connections it is handed: it answers plain HTTP
sent to the TLS port with a 400 that says so, as nginx does, where
Twisted's C{ssl:} endpoint would just close.

The listen backlog (connections the kernel queues before lbws accepts them)
is 511 as nginx's, not Twisted's 50: bursts of 1,000 simultaneous connects
saw SYN drops with 50. An endpoint string's own C{backlog=} wins.
"""

import ipaddress
import re

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from lbws.compat import innerEndpoint, replaceTlsOptions, tcpListenArguments, tlsOptionsOf

_log = Logger()

ALLOWED_METHODS = ("TLS_METHOD", "SSLv23_METHOD")

# nginx's default listen backlog (Linux caps it at net.core.somaxconn).
BACKLOG = 511
# The endpoint types that take a backlog= argument; haproxy: passes its
# arguments on to the endpoint it wraps.
_TAKES_BACKLOG = ("tcp", "tcp6", "ssl", "unix")
_BACKLOG_GIVEN = re.compile(r"(?:^|(?<!\\):)backlog=")


def beyondLoopback(description):
    """
    Whether the endpoint C{description} accepts connections from other
    hosts: a C{tcp:}, C{tcp6:} or C{ssl:} endpoint (also inside
    C{haproxy:}) without C{interface=} (every address) or with one that is
    not a loopback address.
    """
    parts = [p.replace("\\:", ":") for p in re.split(r"(?<!\\):", description)]
    if parts[0] == "haproxy":
        parts = parts[1:]
    if not parts or parts[0] not in ("tcp", "tcp6", "ssl"):
        return False
    interface = next(
        (p[len("interface="):] for p in parts[1:] if p.startswith("interface=")), ""
    )
    try:
        return not ipaddress.ip_address(interface).is_loopback
    except ValueError:
        # Every address, or a name.
        return True


def withBacklog(description):
    """
    C{description} with C{backlog=}L{BACKLOG} added when it is of a type
    that takes one and does not set it.
    """
    kind = description.split(":", 2)
    kind = kind[1] if kind[0] == "haproxy" and len(kind) > 1 else kind[0]
    if kind not in _TAKES_BACKLOG or _BACKLOG_GIVEN.search(description):
        return description
    return f"{description}:backlog={BACKLOG}"


class ListenError(ValueError):
    """
    The C{listen} string asks for something lbws does not allow.
    """


def _sslEndpoints(endpoint):
    """
    The C{SSL4ServerEndpoint}s inside C{endpoint}, through wrappers such as
    C{haproxy:}.
    """
    from twisted.internet.endpoints import SSL4ServerEndpoint

    seen = 0
    while endpoint is not None and seen < 10:
        seen += 1
        if isinstance(endpoint, SSL4ServerEndpoint):
            yield endpoint
            return
        endpoint = innerEndpoint(endpoint)


def sslEndpoint(endpoint):
    """
    The C{SSL4ServerEndpoint} of C{endpoint} (itself or inside wrappers),
    or None.
    """
    return next(_sslEndpoints(endpoint), None)


# What every lbws listener speaks after TLS.
HTTP11 = b"http/1.1"


def selectHttp11(connection, offered):
    """
    The ALPN choice of an lbws listener among the protocols a client
    C{offered}: HTTP/1.1 when offered (browsers and curl offer
    C{h2,http/1.1}), else no protocol at all, and the handshake goes on
    as with a server without ALPN. A client that offered only C{h2} so
    learns that lbws does not speak it; OpenSSL's other way out, a fatal
    no_application_protocol alert, would only fail it earlier.
    """
    return HTTP11 if HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class ServerTls:
    """
    What a TLS listener of lbws makes its connections with: C{options}'
    context, with lbws's own ALPN choice (L{selectHttp11}).

    Why lbws chooses itself rather than declare C{http/1.1} to Twisted
    (C{acceptableProtocols} of C{CertificateOptions}, or the factory
    providing C{IProtocolNegotiationFactory}): Twisted's choice answers a
    client that offered nothing it declared with an empty protocol, which
    OpenSSL fails with alert 80 (internal error), the very failure of
    Twisted 26.10 with no protocol declared (docs/upstream.md). The
    factory's declaration would also not be seen behind C{haproxy:}, where
    the TLS layer wraps the PROXY header's factory, and Twisted before
    26.10 applies it by changing the shared context for each connection,
    which pyOpenSSL 26 refuses (ValueError: "Context has already been used
    to create a Connection"). A callback set on the context once works
    the same on every Twisted and pyOpenSSL within lbws's requirements
    (tested with Twisted 23.10, 25.5 and 26.10), through public APIs only.

    @ivar options: the C{CertificateOptions} (certificate, key, versions).
    """

    def __init__(self, options):
        self.options = options
        self._context = options.getContext()
        self._context.set_alpn_select_callback(selectHttp11)

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self._context, None)

    def renew(self, other):
        """
        Serve new connections with the certificate and key of C{other} (a
        L{ServerTls} just read from the same files, e.g. after certbot
        renewed them); open connections keep theirs.
        """
        self.options = other.options
        self._context = other._context


def _tls12(options):
    """
    TLS for a listener serving the same certificate as C{options}, TLS
    1.2+, HTTP/1.1 by ALPN.
    """
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    if options.method not in (SSL.TLS_METHOD, SSL.SSLv23_METHOD):
        raise ListenError(
            "sslmethod: lbws accepts TLS 1.2 and later only and negotiates the"
            " best version itself; remove sslmethod"
        )
    return ServerTls(
        CertificateOptions(
            privateKey=options.privateKey,
            certificate=options.certificate,
            extraCertChain=options.extraCertChain or None,
            dhParameters=options.dhParameters,
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
    )


# What plain HTTP sent to a TLS port gets (nginx answers the same, in HTML).
_PLAIN_HTTP_BODY = b"400 Bad Request: plain HTTP was sent to this HTTPS (wss://) port\n"
PLAIN_HTTP_REFUSED = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_PLAIN_HTTP_BODY), _PLAIN_HTTP_BODY)
)


class _TlsServerProtocol(TLSMemoryBIOFactory.protocol):
    """
    Twisted's TLS layer, with a look at the first byte a client sends: a
    TLS handshake starts with 0x16 (SSL 2's with a byte above 0x7F), an
    HTTP request with the letter of its method. Plain HTTP gets
    L{PLAIN_HTTP_REFUSED} in plain text and the connection is closed;
    nothing of it reaches OpenSSL.

    @ivar plainHttp: True once that happened (the protocol it wraps then
        sees the connection lost, and counts a plain HTTP request rather
        than what OpenSSL says of an empty handshake).
    """

    plainHttp = False
    _looked = False

    def dataReceived(self, data):
        if self.plainHttp:
            return
        if not self._looked and data:
            self._looked = True
            if data[:1].isalpha():
                self.plainHttp = True
                self.transport.write(PLAIN_HTTP_REFUSED)
                self.transport.loseConnection()
                return
        super().dataReceived(data)


class TlsServerFactory(TLSMemoryBIOFactory):
    """
    lbws's TLS layer for C{wrappedFactory}'s connections, with
    C{serverTls} (a L{ServerTls}): what a TLS listener serves, and what a
    worker puts on the connections it is handed.
    """

    protocol = _TlsServerProtocol

    def __init__(self, serverTls, wrappedFactory):
        super().__init__(serverTls, False, wrappedFactory)


@implementer(IStreamServerEndpoint)
class TlsServerEndpoint:
    """
    An C{ssl:} endpoint as lbws serves it: TCP on the string's port,
    interface and backlog, with L{TlsServerFactory} on top.

    @ivar tls: its L{ServerTls}.
    """

    def __init__(self, reactor, port, backlog, interface, tls):
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface
        self.tls = tls

    def listen(self, factory):
        endpoint = TCP4ServerEndpoint(self._reactor, self._port, self._backlog, self._interface)
        return endpoint.listen(TlsServerFactory(self.tls, factory))


def serverTlsOf(endpoint):
    """
    The L{ServerTls} of each TLS layer of an endpoint built by
    L{listenEndpoint}.
    """
    if isinstance(endpoint, TlsServerEndpoint):
        return [endpoint.tls]
    return [tlsOptionsOf(ssl) for ssl in _sslEndpoints(endpoint)]


def listenEndpoint(reactor, description):
    """
    The server endpoint for C{description} (the C{listen} setting), TLS
    1.2+ for C{ssl:} (a L{TlsServerEndpoint}; inside C{haproxy:}, Twisted's
    own with lbws's options), with a backlog of L{BACKLOG} unless it sets
    one.

    @param reactor: the reactor, or None to only validate the string (the
        C{ssl:} certificate and key files are read then too).
    @raise ListenError: for an C{sslmethod} below TLS 1.2.
    @raise ValueError: and other errors of C{serverFromString} for strings
        it cannot parse.
    """
    import warnings

    from twisted.internet.endpoints import SSL4ServerEndpoint

    with warnings.catch_warnings():
        # Twisted warns that `method` is deprecated when sslmethod is given:
        # lbws reports that as its own error instead.
        warnings.simplefilter("ignore", DeprecationWarning)
        endpoint = serverFromString(reactor, withBacklog(description))
    for ssl in _sslEndpoints(endpoint):
        replaceTlsOptions(ssl, _tls12(tlsOptionsOf(ssl)))
    if isinstance(endpoint, SSL4ServerEndpoint):
        endpoint = TlsServerEndpoint(
            reactor, *tcpListenArguments(endpoint), tlsOptionsOf(endpoint)
        )
    return endpoint


def serverTls(description):
    """
    The L{ServerTls} of an C{ssl:} endpoint string, its certificate and key
    read now; None for other endpoint types (also C{haproxy:ssl:}).

    @raise ListenError: see L{listenEndpoint}.
    """
    if description.split(":", 1)[0] != "ssl":
        return None
    (tls,) = serverTlsOf(listenEndpoint(None, description))
    return tls


def renewTls(endpoint, description):
    """
    Have the TLS of C{endpoint} (built by L{listenEndpoint} from
    C{description}) serve the certificate and key its files hold now, for
    new connections: what a reload does, so that a renewed certificate is
    served without a restart. Nothing for an endpoint without TLS.

    @raise ListenError: and the errors of reading the files, which leave
        the certificate served as it was.
    """
    for tls, fresh in zip(
        serverTlsOf(endpoint), serverTlsOf(listenEndpoint(None, description))
    ):
        tls.renew(fresh)


class ListenFailed(Exception):
    """
    An endpoint could not listen at start (a port in use, a privileged
    port).

    @ivar endpoint: the endpoint string from the config.
    @ivar reason: the underlying exception.
    """

    def __init__(self, endpoint, reason):
        super().__init__(endpoint, reason)
        self.endpoint = endpoint
        self.reason = reason


class Listener(Service):
    """
    Serves a factory on an endpoint while running, like Twisted's
    C{StreamServerEndpointService}, with what lbws needs from it in public:
    L{whenListening}, and a start that fails at once with L{ListenFailed}
    (so twistd exits with the error) when the endpoint cannot listen, e.g.
    a port in use.

    @param description: the endpoint string, for that error.
    """

    def __init__(self, endpoint, factory, description=""):
        self._endpoint = endpoint
        self._description = description
        self._factory = factory
        self._port = None
        self._failure = None
        self._waiting = []

    def startService(self):
        super().startService()
        d = self._endpoint.listen(self._factory)
        d.addCallbacks(self._listening, self._failed)
        if self._failure is not None:
            # TCP, UNIX and TLS endpoints listen synchronously: refuse to
            # start rather than run without the port.
            raise ListenFailed(self._description, self._failure.value)

    def _listening(self, port):
        self._port = port
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(port)

    def _failed(self, failure):
        self._failure = failure
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(failure)

    @property
    def port(self):
        """
        The listening port, or None when not listening.
        """
        return self._port

    @property
    def factory(self):
        """
        The factory it serves.
        """
        return self._factory

    def renewCertificate(self):
        """
        Serve new TLS connections with the certificate and key the files
        of its C{ssl:} endpoint hold now (L{renewTls}): on reload, so that
        a renewed certificate is served without a restart. An error reading
        them is logged and the certificate served stays.
        """
        try:
            renewTls(self._endpoint, self._description)
        except Exception as e:
            _log.error(
                "{endpoint}: certificate not read again, the one served stays: {error}",
                endpoint=self._description,
                error=str(e),
            )

    def whenListening(self):
        """
        A Deferred firing with the listening port once bound (the address a
        config's port 0 got is in its C{getHost()}), or failing with the
        reason it could not listen.
        """
        if self._port is not None:
            return succeed(self._port)
        if self._failure is not None:
            return fail(self._failure)
        d = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self):
        """
        Stop accepting; the Deferred fires once the port is closed. Open
        connections are not touched.
        """
        super().stopService()
        port, self._port = self._port, None
        if port is None:
            return None
        return port.stopListening()
