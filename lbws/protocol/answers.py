"""
A backend's HTTP answer to lbws's opening handshake, read strictly, and
what of it reaches the client.

An answer other than 101 is the application speaking (a 401 asking for
credentials, a 302 to a login page, a 503 with Retry-After): lbws reads it
whole, with its body up to L{MAX_BODY}, and the client gets its status,
its end-to-end headers and its body (see the README, "On the wire"). lbws
writes that answer itself, only from parts checked here: the head by
lbws's own rules (L{lbws.protocol.strict.answerProblem}: a three-digit
status, a reason phrase and header fields that follow RFC 9110/9112 field
syntax, CRLF line ends), then read, with its body, by h11 (the grammar of
the plain HTTP side too), as the answer to the handshake lbws sent. A raw
line is never copied, so a backend cannot slip a header past lbws with a
bare LF; an answer that breaks the syntax is malformed, which counts as a
backend failure.
"""

import h11

from lbws.protocol.strict import answerProblem

# The longest answer head lbws reads from a backend, and the most of a
# refusal's body it keeps for the client (the rest is read and dropped).
MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024

# Headers that belong to one hop (RFC 9110 7.6.1), and those a framing of
# lbws's own replaces.
HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ]
)
_FRAMING = frozenset(["content-length"])

# Headers of the WebSocket handshake itself, which lbws's own handshake
# with the client sets.
_HANDSHAKE = frozenset(
    [
        "sec-websocket-accept",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "sec-websocket-version",
    ]
)

# What h11 is told lbws asked: a WebSocket handshake (so a 101 is an
# answer it expects).
_HANDSHAKE_REQUEST = h11.Request(
    method="GET",
    target="/",
    headers=[("Host", "backend"), ("Connection", "Upgrade"), ("Upgrade", "websocket")],
)


class MalformedAnswer(Exception):
    """
    The backend's answer is not valid HTTP/1.1.
    """


class Head:
    """
    A backend's answer head: C{status} (int), C{reason} (bytes) and
    C{headers}, a list of C{(name, value)} byte pairs in the backend's
    order and case.
    """

    def __init__(self, status, reason, headers, reader=None):
        self.status = status
        self.reason = reason
        self.headers = headers
        self._reader = reader  # the h11 connection that read it

    def values(self, name):
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def endToEnd(self, drop=frozenset()):
        """
        The headers that go on to the client: not hop-by-hop (nor named in
        C{Connection}), not in C{drop} (lower-case names).
        """
        named = {
            token.strip().lower().decode("latin-1")
            for value in self.values(b"connection")
            for token in value.split(b",")
        }
        return [
            (n, v)
            for n, v in self.headers
            if (lowered := n.lower().decode("latin-1")) not in HOP_BY_HOP
            and lowered not in named
            and lowered not in drop
        ]


def parseHead(data):
    """
    Parse an answer head ending with an empty line (CRLF CRLF).

    @raise MalformedAnswer: when it breaks lbws's rules or h11's grammar
        (a bare CR or LF, a control character, an obs-fold, a line
        without a colon, conflicting lengths).
    """
    problem = answerProblem(data)
    if problem is not None:
        raise MalformedAnswer(problem)
    reader = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    reader.send(_HANDSHAKE_REQUEST)
    reader.send(h11.EndOfMessage())
    reader.receive_data(data)
    try:
        event = reader.next_event()
    except h11.RemoteProtocolError as e:
        raise MalformedAnswer(str(e)) from None
    return Head(event.status_code, bytes(event.reason), event.headers.raw_items(), reader)


class BodyReader:
    """
    Reads a refusal's body as h11 frames it from its head (RFC 9112 6.3):
    none for 1xx, 204 and 304, chunked, Content-Length, or up to the end
    of the connection. Keeps at most L{MAX_BODY} bytes.

    @ivar body: what was kept.
    @ivar cut: True if the body was longer than what was kept.
    @ivar done: True once the body is complete.
    """

    def __init__(self, head, limit=MAX_BODY):
        self._limit = limit
        self._reader = head._reader
        self.body = b""
        self.cut = False
        self.done = head.status in (204, 304) or head.status < 200
        if not self.done:
            self._read()

    def _keep(self, data):
        room = self._limit - len(self.body)
        if len(data) > room:
            self.cut = True
            data = data[:room]
        self.body += data

    def _read(self):
        try:
            while not self.done:
                event = self._reader.next_event()
                if type(event) is h11.Data:
                    self._keep(bytes(event.data))
                elif type(event) is h11.EndOfMessage:
                    self.done = True
                else:
                    break
        except h11.RemoteProtocolError as e:
            raise MalformedAnswer(f"body: {e}") from None

    def feed(self, data):
        """
        More bytes of the body.

        @return: True once the body is complete.
        @raise MalformedAnswer: for a bad framing.
        """
        if data and not self.done:  # (b"" would tell h11 the connection ended)
            self._reader.receive_data(data)
            self._read()
        return self.done

    def end(self):
        """
        The backend closed its connection.

        @return: True if that completes the body (it is framed by the end
            of the connection).
        """
        if not self.done:
            self._reader.receive_data(b"")
            try:
                self._read()
            except MalformedAnswer:
                return False
        return self.done


def render(head, body):
    """
    The answer lbws sends the client for a refusal: the backend's status,
    reason and end-to-end headers, and the body it kept, framed by a
    Content-Length of lbws's own (the connection closes after it).
    """
    lines = [b"HTTP/1.1 %d %s" % (head.status, head.reason)]
    lines.extend(n + b": " + v for n, v in head.endToEnd(_FRAMING))
    bodyless = head.status in (204, 304) or head.status < 200
    if not bodyless:
        lines.append(b"Content-Length: %d" % (len(body),))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if bodyless else body)


def acceptedHeaders(head):
    """
    The end-to-end headers of a backend's 101, for lbws's own 101 to the
    client (Autobahn writes the handshake's own headers), as a dict of
    name to list of values.
    """
    headers = {}
    for name, value in head.endToEnd(_HANDSHAKE | _FRAMING):
        headers.setdefault(_text(name), []).append(_text(value))
    return headers


def _text(value):
    # Autobahn encodes the headers it writes as UTF-8.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")
