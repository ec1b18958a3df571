"""
A backend's HTTP answer to lbws's opening handshake, read strictly, and
what of it reaches the client.

An answer other than 101 is the application speaking (a 401 asking for
credentials, a 302 to a login page, a 503 with Retry-After): lbws reads it
whole, with its body up to L{MAX_BODY}, and the client gets its status,
its end-to-end headers and its body (see the README, "On the wire"). lbws
writes that answer itself, only from parts checked here: a three-digit
status, a reason phrase and header fields that follow RFC 9110/9112 field
syntax. A raw line is never copied, so a backend cannot slip a header past
lbws with a bare LF; an answer that breaks the syntax is malformed, which
counts as a backend failure.
"""

import re

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

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([\t\x20-\x7e\x80-\xff]*))?")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[\t ]*([\t\x20-\x7e\x80-\xff]*?)[\t ]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[\t ]*(?:;[\t\x20-\x7e\x80-\xff]*)?")


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

    def __init__(self, status, reason, headers):
        self.status = status
        self.reason = reason
        self.headers = headers

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

    @raise MalformedAnswer: when any line breaks RFC 9112 syntax (a bare
        CR or LF, a control character, an obs-fold, a line without a
        colon).
    """
    lines = data[: data.index(b"\r\n\r\n")].split(b"\r\n")
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise MalformedAnswer(f"bad status line {_shown(lines[0])}")
    headers = []
    for line in lines[1:]:
        field = _FIELD.fullmatch(line)
        if field is None:
            raise MalformedAnswer(f"bad header line {_shown(line)}")
        headers.append((field.group(1), field.group(2)))
    return Head(int(status.group(1)), status.group(2) or b"", headers)


def _shown(line):
    return repr(line[:80])[1:]


class BodyReader:
    """
    Reads a refusal's body as its head frames it (RFC 9112 6.3): none for
    1xx, 204 and 304, chunked, Content-Length, or up to the end of the
    connection. Keeps at most L{MAX_BODY} bytes.

    @ivar body: what was kept.
    @ivar cut: True if the body was longer than what was kept.
    @ivar done: True once the body is complete.
    """

    def __init__(self, head, limit=MAX_BODY):
        self._limit = limit
        self.body = b""
        self.cut = False
        self.done = False
        self._buffer = b""
        self._remaining = None  # bytes left of a Content-Length or chunk
        self._state = None
        codings = [c.strip().lower() for v in head.values(b"transfer-encoding") for c in v.split(b",")]
        lengths = {v.strip() for v in head.values(b"content-length")}
        if head.status in (204, 304) or 100 <= head.status < 200:
            self.done = True
        elif codings:
            if codings[-1] == b"chunked":
                self._state = "size"
            else:
                self._state = "close"
        elif lengths:
            if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
                raise MalformedAnswer("bad Content-Length")
            self._remaining = int(lengths.pop())
            self._state = "length"
            self.done = self._remaining == 0
        else:
            self._state = "close"

    def _keep(self, data):
        room = self._limit - len(self.body)
        if len(data) > room:
            self.cut = True
            data = data[:room]
        self.body += data

    def feed(self, data):
        """
        More bytes of the body.

        @return: True once the body is complete.
        @raise MalformedAnswer: for a bad chunked framing.
        """
        if self.done:
            return True
        if self._state == "close":
            self._keep(data)
        elif self._state == "length":
            self._keep(data[: self._remaining])
            self._remaining -= min(len(data), self._remaining)
            self.done = self._remaining == 0
        else:
            self._chunked(data)
        return self.done

    def _chunked(self, data):
        buffer = self._buffer + data
        while not self.done:
            if self._state == "data":
                taken = buffer[: self._remaining]
                self._keep(taken)
                self._remaining -= len(taken)
                buffer = buffer[len(taken) :]
                if self._remaining:
                    break
                self._state = "crlf"
                continue
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > 4096:
                    raise MalformedAnswer("chunked body: line too long")
                break
            line, buffer = buffer[:end], buffer[end + 2 :]
            if self._state == "size":
                size = _CHUNK_SIZE.fullmatch(line)
                if size is None:
                    raise MalformedAnswer("chunked body: bad chunk size")
                self._remaining = int(size.group(1), 16)
                self._state = "data" if self._remaining else "trailer"
            elif self._state == "crlf":
                if line:
                    raise MalformedAnswer("chunked body: no CRLF after a chunk")
                self._state = "size"
            elif not line:  # the empty line after the trailers
                self.done = True
            elif _FIELD.fullmatch(line) is None:
                raise MalformedAnswer("chunked body: bad trailer line")
        self._buffer = buffer

    def end(self):
        """
        The backend closed its connection.

        @return: True if that completes the body (it is framed by the end
            of the connection).
        """
        if self._state == "close":
            self.done = True
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
