"""
HTTP/1.1 message syntax for the plain HTTP proxy (L{lbws.http.httpproxy}):
request and response heads, and where a body ends in a byte stream.

Bodies are not parsed into memory: L{BodyReader} only finds the end of a
body (Content-Length, chunked coding or connection close) in the bytes as
they pass, so the proxy can forward them unchanged and stream them with
backpressure. The rules are those of RFC 9112 that matter to a proxy not
being fooled about message boundaries (request smuggling): both
Content-Length and Transfer-Encoding, conflicting lengths, a transfer
coding other than a final chunked, and malformed chunk lines are refused.
"""

import re
from urllib.parse import parse_qs, urlsplit

# RFC 9110 token, for methods and field names.
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Field values: visible characters, spaces and tabs (obs-text allowed).
_FIELD_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_VERSION = re.compile(rb"^HTTP/1\.[01]$")
_STATUS = re.compile(rb"^HTTP/1\.[01] ([0-9]{3})(?: (.*))?$")

# The longest chunk-size line or trailer section accepted.
MAX_LINE = 8 * 1024


class BadMessage(Exception):
    """
    A head or body that breaks HTTP/1.1 syntax.
    """


class Head:
    """
    A parsed request or response head.

    @ivar fields: C{(name, value)} pairs as sent, in order, as latin-1 text.
    @ivar headers: lower-case name -> value, repeats joined with ", " (the
        shape of Autobahn's C{ConnectionRequest.headers}, for
        L{lbws.backends.balance.hashKeyOf} and L{lbws.protocol.headers.proxyHeaders}).
    """

    method = None
    target = None
    status = None
    reason = ""

    def __init__(self, version, fields):
        self.version = version
        self.fields = fields
        self.headers = {}
        for name, value in fields:
            key = name.lower()
            if key in self.headers:
                self.headers[key] += ", " + value
            else:
                self.headers[key] = value

    @property
    def path(self):
        return urlsplit(self.target).path

    @property
    def params(self):
        return parse_qs(urlsplit(self.target).query)

    def tokens(self, name):
        """
        The comma-separated tokens of a header, lower case.
        """
        return [t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()]

    def keepAlive(self):
        """
        Whether the sender keeps the connection open after this message.
        """
        if "close" in self.tokens("connection"):
            return False
        return self.version == "HTTP/1.1"


def _fields(lines):
    fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            # Also refuses obs-fold and space before the colon (RFC 9112 5.1-5.2).
            raise BadMessage(f"malformed header line {line[:100]!r}")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.match(value):
            raise BadMessage(f"bad character in header {name.decode('latin-1')}")
        fields.append((name.decode("latin-1"), value.decode("latin-1")))
    return fields


def parseRequestHead(head):
    """
    Parse a request head (request line and fields, ending in an empty line).

    @raise BadMessage: if it breaks RFC 9112 syntax.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _VERSION.match(parts[2]):
        raise BadMessage(f"malformed request line {lines[0][:100]!r}")
    if not parts[1] or not _FIELD_VALUE.match(parts[1]) or b" " in parts[1]:
        raise BadMessage("malformed request target")
    request = Head(parts[2].decode("ascii"), _fields(line for line in lines[1:] if line))
    request.method = parts[0].decode("ascii")
    request.target = parts[1].decode("latin-1")
    return request


def parseResponseHead(head):
    """
    Parse a response head.

    @raise BadMessage: if it breaks RFC 9112 syntax.
    """
    lines = head.split(b"\r\n")
    match = _STATUS.match(lines[0])
    if not match:
        raise BadMessage(f"malformed status line {lines[0][:100]!r}")
    response = Head(lines[0][:8].decode("ascii"), _fields(line for line in lines[1:] if line))
    response.status = int(match.group(1))
    response.reason = (match.group(2) or b"").decode("latin-1")
    return response


def isWebSocketUpgrade(head):
    """
    Whether a request head (bytes) asks for a WebSocket upgrade: the
    cheap test that sends a connection to the WebSocket handshake or to
    the HTTP proxy, before anything else parses it.
    """
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


def requestFraming(request):
    """
    How a request's body is delimited: C{("none", 0)}, C{("length", n)} or
    C{("chunked", 0)}.

    @raise BadMessage: for lengths and codings a proxy must refuse.
    """
    return _framing(request, closeDelimited=False)


def responseFraming(response, method):
    """
    How a response's body is delimited: as L{requestFraming}, or
    C{("close", 0)} for a body that ends with the connection.
    """
    if method == "HEAD" or response.status in (204, 304) or response.status < 200:
        return ("none", 0)
    return _framing(response, closeDelimited=True)


def _framing(head, closeDelimited):
    codings = head.tokens("transfer-encoding")
    lengths = [v for n, v in head.fields if n.lower() == "content-length"]
    if codings:
        if lengths:
            raise BadMessage("both Transfer-Encoding and Content-Length")
        if codings[-1] != "chunked":
            if closeDelimited:
                return ("close", 0)
            raise BadMessage("a request's last transfer coding must be chunked")
        if codings != ["chunked"]:
            raise BadMessage(f"unsupported transfer coding {codings!r}")
        return ("chunked", 0)
    if lengths:
        values = {v.strip() for value in lengths for v in value.split(",")}
        if len(values) != 1:
            raise BadMessage("conflicting Content-Length values")
        value = values.pop()
        # ASCII digits only: str.isdigit() is also true of "²".
        if not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise BadMessage(f"bad Content-Length {value[:40]!r}")
        length = int(value)
        return ("length", length) if length else ("none", 0)
    return ("close", 0) if closeDelimited else ("none", 0)


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class BodyReader:
    """
    Finds the end of one body in a byte stream, and counts its payload.

    @ivar payload: payload bytes seen (chunk data for chunked coding).
    @ivar done: the body is complete.
    @ivar pieces: with C{decode}, the chunk data of the last L{feed}: for
        a client that cannot take chunked coding (HTTP/1.0).
    """

    def __init__(self, kind, length=0, decode=False):
        self.kind = kind
        self.remaining = length
        self.payload = 0
        self.done = kind == "none"
        self.decode = decode
        self.pieces = []
        self._state = _SIZE
        self._line = b""
        self._trailer = 0

    def feed(self, data):
        """
        @return: C{(body, rest)}: the bytes of C{data} that belong to this
            body, and those after its end.
        @raise BadMessage: for malformed chunked coding.
        """
        self.pieces = []
        if self.done:
            return b"", data
        if self.kind == "close":
            self.payload += len(data)
            self.pieces.append(data)
            return data, b""
        if self.kind == "length":
            n = min(self.remaining, len(data))
            self.remaining -= n
            self.payload += n
            self.done = not self.remaining
            if n == len(data):
                self.pieces.append(data)
                return data, b""
            self.pieces.append(data[:n])
            return data[:n], data[n:]
        return self._chunked(data)

    def _chunked(self, data):
        pos = 0
        end = len(data)
        while pos < end and not self.done:
            if self._state == _DATA:
                n = min(self.remaining, end - pos)
                if self.decode:
                    self.pieces.append(data[pos : pos + n])
                pos += n
                self.remaining -= n
                self.payload += n
                if not self.remaining:
                    self._state = _DATA_END
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._line += data[pos:]
                pos = end
                if len(self._line) > MAX_LINE:
                    raise BadMessage("chunk line too long")
                break
            line = self._line + data[pos:newline + 1]
            self._line = b""
            pos = newline + 1
            if not line.endswith(b"\r\n"):
                raise BadMessage("chunk line not ended by CRLF")
            self._onLine(line[:-2])
        if pos == end:
            return data, b""
        return data[:pos], data[pos:]

    def _onLine(self, line):
        if self._state == _SIZE:
            size = line.split(b";", 1)[0].rstrip(b" \t")
            if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                raise BadMessage(f"bad chunk size {line[:40]!r}")
            self.remaining = int(size, 16)
            self._state = _DATA if self.remaining else _TRAILER
        elif self._state == _DATA_END:
            if line:
                raise BadMessage("chunk data longer than its size")
            self._state = _SIZE
        else:
            self._trailer += len(line) + 2
            if self._trailer > MAX_LINE:
                raise BadMessage("trailer section too long")
            if not line:
                self.done = True
