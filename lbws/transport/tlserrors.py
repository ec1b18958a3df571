"""
Saying clearly why lbws refused a wss:// backend's TLS: a name that does
not match the certificate, or a certificate no trusted CA issued. Used for
the log line and C{last_error} of a failed connect (passive check) and of
a failed health probe alike.
"""


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
