"""
Which of the client's handshake headers go on to the backend, and the
X-Forwarded-* headers lbws adds.

Header values are text decoded as ISO-8859-1, one character per byte, as
Autobahn decodes them; the backend gets them back byte for byte (see
L{lbws.compat.OctetRequest}).
"""

# Headers of the handshake itself or of this hop: lbws's own handshake with
# the backend sets its own, and Autobahn writes Host, Upgrade, Connection,
# Pragma, Cache-Control, Sec-WebSocket-* and, from their own arguments,
# User-Agent and Origin.
_NOT_FORWARDED = frozenset(
    [
        "host",
        "upgrade",
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "content-length",
        "pragma",
        "cache-control",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "sec-websocket-origin",
        "user-agent",
        "origin",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    ]
)


def underscoreDropped(name, underscores):
    """
    Whether a client's header C{name} stays behind under
    C{underscores_in_headers = underscores}: with C{drop}, as nginx does,
    a name with "_" never reaches the backend. CGI and WSGI servers turn
    "-" into "_" (X-Real-IP and X_Real_IP are both C{HTTP_X_REAL_IP}), so
    a client's X_Real_IP could stand in for the X-Real-IP lbws sets.
    """
    return underscores == "drop" and "_" in name


def forwardedHeaders(request, peerHost, secure, underscores="drop"):
    """
    The headers for the backend handshake.

    @param request: the client's Autobahn C{ConnectionRequest}; its header
        names are lower case and repeated headers are joined with ", ".
    @param peerHost: the client's address, as lbws sees it (or as the PROXY
        protocol header told it).
    @param secure: whether the client came over TLS.
    @param underscores: C{underscores_in_headers} (L{underscoreDropped}).
    @return: C{(headers, userAgent, origin)} for Autobahn's client factory.
    """
    clientHeaders = request.headers
    headers = {}
    connectionTokens = {
        token.strip().lower()
        for token in clientHeaders.get("connection", "").split(",")
    }
    for name, value in clientHeaders.items():
        if name in _NOT_FORWARDED or name in connectionTokens:
            continue
        if underscoreDropped(name, underscores):
            continue
        if name == "cookie":
            # Cookie is the one header whose repeats join with "; ".
            value = "; ".join(part.strip() for part in value.split(", "))
        headers[name] = value
    headers.update(proxyHeaders(clientHeaders, peerHost, secure))
    return headers, clientHeaders.get("user-agent"), clientHeaders.get("origin")


# The names of the headers L{proxyHeaders} sets: a client's own copies of
# them are not passed on.
PROXY_HEADERS = frozenset(["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"])


def proxyHeaders(clientHeaders, peerHost, secure):
    """
    X-Forwarded-For (appended to the client's), X-Forwarded-Proto,
    X-Forwarded-Host and X-Real-IP, for the backend: the same for a
    WebSocket handshake and for a plain HTTP request.

    @param clientHeaders: the client's headers, lower-case names.
    """
    headers = {}
    earlier = clientHeaders.get("x-forwarded-for")
    headers["X-Forwarded-For"] = f"{earlier}, {peerHost}" if earlier else peerHost
    headers["X-Forwarded-Proto"] = "https" if secure else "http"
    if "host" in clientHeaders:
        headers["X-Forwarded-Host"] = clientHeaders["host"]
    headers["X-Real-IP"] = peerHost
    return headers


def parseFields(head):
    """
    The header fields of a request head that passed
    L{lbws.protocol.strict.headProblem}, as Autobahn's C{ConnectionRequest.headers}
    has them: lower-case names, values decoded as ISO-8859-1 without the
    spaces and tabs around them (RFC 9110 5.5), repeats joined with ", ".

    Unlike Autobahn's parser this splits lines at line ends only, and
    trims spaces and tabs only.
    """
    fields = {}
    for line in head.decode("latin-1").split("\r\n")[1:-2]:
        name, _, value = line.partition(":")
        name = name.lower()
        value = value.strip(" \t")
        fields[name] = f"{fields[name]}, {value}" if name in fields else value
    return fields
