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
"""

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString

from lbws.compat import innerEndpoint, replaceTlsOptions, tlsOptionsOf

ALLOWED_METHODS = ("TLS_METHOD", "SSLv23_METHOD")


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


def _tls12(options):
    """
    TLS options serving the same certificate as C{options}, TLS 1.2+.
    """
    from OpenSSL import SSL
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    if options.method not in (SSL.TLS_METHOD, SSL.SSLv23_METHOD):
        raise ListenError(
            "sslmethod: lbws accepts TLS 1.2 and later only and negotiates the"
            " best version itself; remove sslmethod"
        )
    return CertificateOptions(
        privateKey=options.privateKey,
        certificate=options.certificate,
        extraCertChain=options.extraCertChain or None,
        dhParameters=options.dhParameters,
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


def listenEndpoint(reactor, description):
    """
    The server endpoint for C{description} (the C{listen} setting), TLS
    1.2+ for C{ssl:}.

    @param reactor: the reactor, or None to only validate the string (the
        C{ssl:} certificate and key files are read then too).
    @raise ListenError: for an C{sslmethod} below TLS 1.2.
    @raise ValueError: and other errors of C{serverFromString} for strings
        it cannot parse.
    """
    import warnings

    with warnings.catch_warnings():
        # Twisted warns that `method` is deprecated when sslmethod is given:
        # lbws reports that as its own error instead.
        warnings.simplefilter("ignore", DeprecationWarning)
        endpoint = serverFromString(reactor, description)
    for ssl in _sslEndpoints(endpoint):
        replaceTlsOptions(ssl, _tls12(tlsOptionsOf(ssl)))
    return endpoint


class Listener(Service):
    """
    Serves a factory on an endpoint while running, like Twisted's
    C{StreamServerEndpointService}, with what lbws needs from it in public:
    L{whenListening}, and a start that fails at once (so twistd exits with
    the error) when the endpoint cannot listen, e.g. a port in use.
    """

    def __init__(self, endpoint, factory):
        self._endpoint = endpoint
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
            self._failure.raiseException()

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
