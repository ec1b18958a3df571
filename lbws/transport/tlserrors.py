"""
TLS failures in words an operator reads.

Why lbws refused a wss:// backend's TLS (L{describeTlsFailure}): a name
that does not match the certificate, or a certificate no trusted CA
issued. Used for the log line and C{last_error} of a failed connect
(passive check), of a failed health probe and of a plain HTTP request
alike.

Why clients' TLS handshakes failed (L{ClientTlsFailures}): counted by
reason and logged at info once a minute, so that no client can fill the
log, and without OpenSSL's empty "(in )".
"""

from collections import Counter

from twisted.logger import Logger

_log = Logger()


def _sslReasons(error):
    parts = []
    for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(item, tuple) and item:
            parts.append(str(item[-1]))
    return "; ".join(p for p in parts if p) or str(error)


def _wanted(mismatch):
    identity = mismatch.mismatched_id
    for attribute in ("hostname", "ip", "uri"):
        value = getattr(identity, attribute, None)
        if value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return str(identity)


def certificateNames(transport):
    """
    The DNS names and IP addresses a peer's certificate is for, or [].
    """
    try:
        from cryptography import x509

        peer = transport.getPeerCertificate()
        if peer is None:
            # Gone once the name check failed; the chain is still there.
            chain = transport.getHandle().get_peer_cert_chain()
            if not chain:
                return []
            peer = chain[0]
        cert = peer.to_cryptography()
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            names = [
                a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            ]
        else:
            names = san.get_values_for_type(x509.DNSName) + [
                str(ip) for ip in san.get_values_for_type(x509.IPAddress)
            ]
        return [str(name) for name in names]
    except Exception:
        return []


def describeTlsFailure(failure, transport=None):
    """
    A sentence for a connection that failed because of TLS, or None when
    C{failure} is not about TLS.

    @param transport: the TLS transport, to read the names on the
        certificate from, if it is still at hand.
    """
    from OpenSSL import SSL
    from service_identity import VerificationError

    value = failure.value
    if isinstance(value, VerificationError):
        wanted = ", ".join(_wanted(e) for e in value.errors) or "its host"
        names = certificateNames(transport) if transport is not None else []
        held = f"is for {', '.join(names)}" if names else "does not name it"
        return (
            f"TLS name check failed: the backend's certificate {held}, not {wanted}"
        )
    if isinstance(value, SSL.Error):
        reasons = _sslReasons(value)
        if "certificate verify failed" in reasons:
            return (
                f"TLS certificate not trusted ({reasons}): not issued by the"
                " backend's ca file, or by a system CA when it has none"
            )
        if "alert internal error" in reasons:
            # What a Twisted 26.10 server that declares no ALPN protocol
            # answers lbws's offer of http/1.1 with (docs/upstream.md).
            return (
                f"TLS handshake failed: {reasons}: the backend failed on its side, e.g."
                " a server that cannot answer the ALPN offer of http/1.1"
            )
        return f"TLS handshake failed: {reasons}"
    return None


def clientTlsReason(failure):
    """
    Why a client's TLS failed, in OpenSSL's words (C{wrong version number},
    C{no shared cipher}, C{tlsv1 alert unknown ca}...), or None when
    C{failure} is not a TLS error.
    """
    from OpenSSL import SSL

    if not isinstance(failure.value, SSL.Error):
        return None
    return _sslReasons(failure.value)


class ClientTlsFailures:
    """
    Clients' failed TLS handshakes, by reason, logged at info once a minute
    (the first failure after a quiet minute opens the minute), so that no
    client can fill the log.

    @param clock: the reactor's C{IReactorTime}.
    @param log: False in a worker of C{workers = N}: it hands its counts to
        its parent (L{take}), which logs them with its own (L{add}).
    """

    WINDOW = 60.0

    def __init__(self, clock, log=True):
        self._clock = clock
        self._log = log
        self._counts = Counter()  # since the last line (or take)
        self._timer = None
        # Since start, by reason, for /metrics: OpenSSL's reasons are a
        # fixed set, so clients cannot add series at will.
        self.totals = Counter()

    def note(self, reason):
        """
        One client's TLS failed for C{reason}.
        """
        self.add({reason: 1})

    def add(self, counts):
        """
        Failures counted elsewhere (a worker's), by reason.
        """
        for reason, count in counts.items():
            self._counts[reason] += count
            self.totals[reason] += count
        if self._log and self._counts and self._timer is None:
            self._timer = self._clock.callLater(self.WINDOW, self.flush)

    def take(self):
        """
        The failures counted since the last L{take}, by reason.
        """
        counts, self._counts = self._counts, Counter()
        return dict(counts)

    def flush(self):
        """
        Log what was counted (now, e.g. on stop, or as the minute ends);
        nothing in a worker, whose parent logs.
        """
        if not self._log:
            return
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        counts = self.take()
        if not counts:
            return
        _log.info(
            "{count} client TLS handshake(s) failed in the last minute: {reasons}",
            count=sum(counts.values()),
            reasons="; ".join(f"{reason} ({n})" for reason, n in sorted(counts.items())),
            failures=counts,
        )
