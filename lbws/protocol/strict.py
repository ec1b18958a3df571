"""
lbws's own rules for a request head, on top of the HTTP/1.1 grammar (h11
for plain HTTP, Autobahn for WebSocket handshakes), for both sides alike.

h11 and Autobahn accept heads that a front proxy and a backend may read
differently, which is how requests are smuggled: h11 takes C{\\x01} in a
value, unfolds obs-fold, ignores a Content-Length beside Transfer-Encoding
and passes C{Host: a,b}; Autobahn's parser also breaks lines at C{\\x0b},
C{\\x0c}, C{\\x1c}-C{\\x1e} and C{\\x85} and skips lines it cannot read, so a
header hidden behind one of those (C{X-Note: a\\x85Authorization: forged})
would reach the backend as a header of its own. So the raw head is matched
first, with one compiled regular expression, against the field syntax of
RFC 9112 (section 5) and RFC 9110 (section 5.5), and refused with 400 when
it does not match or breaks one of the rules below. See "Security" in the
README. (The request target's own rules live in L{lbws.protocol.request}.)
"""

import re

from lbws.telemetry.logs import printable

# RFC 9110 5.6.2: token characters, the only ones allowed in a method and a
# field name (so no whitespace before the colon, and no obs-fold, whose
# continuation line starts with a space or a tab).
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
# RFC 9110 5.5: a field value is visible ASCII, obs-text (0x80-0xFF),
# spaces and tabs; no other control character, and no CR or LF.
_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
# RFC 9112 2.2: lines end with CRLF, or with a bare LF.
_EOL = rb"\r?\n"
# RFC 9112 3.2: the request target is visible ASCII (percent-encoded
# otherwise); the version one this listener speaks (h11 would take 2.0).
_REQUEST_LINE = _TOKEN + rb" [\x21-\x7e]+ HTTP/1\.[01]"
_FIELD_LINE = _TOKEN + rb":" + _VALUE
_TOKEN_TEXT = re.compile(_TOKEN.decode())
_VALUE_BYTES = re.compile(_VALUE)
_HEAD = re.compile(_REQUEST_LINE + _EOL + rb"(?:" + _FIELD_LINE + _EOL + rb")*" + _EOL)

# A Host field value lbws forwards and routes on: a DNS name or IPv4
# address, or an IPv6 literal in brackets, with an optional port (RFC 9110
# 7.2; narrower than RFC 3986's reg-name, whose sub-delims such as "," would
# let "evil.com,x.example.com" pass for a subdomain of example.com).
_HOST_VALUE = re.compile(
    rb"(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
    # An IPv6 address without its brackets, as Autobahn's client writes it
    # ("::1:8020"): invalid, but it cannot smuggle a name in either.
    rb"|[0-9A-Fa-f:.]+"
)
# The fields with rules of their own, found in one scan: Host, and the
# two framings (both at once: RFC 9112 6.3 lets a server read such a
# request, but a proxy that forwards it lets the next hop choose the other).
_RULED_LINE = re.compile(
    rb"^(host|content-length|transfer-encoding)[ \t]*:[ \t]*(.*?)[ \t]*\r?$",
    re.IGNORECASE | re.MULTILINE,
)


# A backend's answer head (L{lbws.protocol.answers}): status line and
# fields, CRLF line ends only (lbws rewrites it for the client).
_ANSWER = re.compile(
    rb"HTTP/1\.[01] [0-9]{3}(?: [\t\x20-\x7e\x80-\xff]*)?\r\n(?:" + _FIELD_LINE + rb"\r\n)*\r\n"
)


def headEnd(data):
    """
    The length of the request head at the start of C{data} (up to and
    including its first empty line), or -1 while it is incomplete.

    Called for every read until the head is complete, so it searches with
    C{bytes.find} (as Autobahn and h11 do) rather than a regular expression.
    """
    ends = [i + n for i, n in ((data.find(b"\n\n"), 2), (data.find(b"\n\r\n"), 3)) if i >= 0]
    return min(ends) if ends else -1


def isToken(text):
    """
    Whether C{text} is an RFC 9110 token, as a subprotocol name must be
    (RFC 6455 4.1).
    """
    return _TOKEN_TEXT.fullmatch(text) is not None


def headProblem(head):
    """
    Why lbws refuses a whole request head (as cut by L{headEnd}) with 400,
    or None when it keeps to the field syntax, has exactly one valid Host
    (none is allowed of HTTP/1.0) and not both Content-Length and
    Transfer-Encoding.
    """
    if _HEAD.fullmatch(head) is None:
        return _syntaxProblem(head)
    line, _, fields = head.partition(b"\n")
    hosts = []
    framings = set()
    for name, value in _RULED_LINE.findall(fields):
        name = name.lower()
        if name == b"host":
            hosts.append(value)
        else:
            framings.add(name)
    if len(framings) > 1:
        return "both Content-Length and Transfer-Encoding"
    return _hostProblem(line, hosts)


def answerProblem(head):
    """
    Why lbws refuses a backend's answer head to a WebSocket handshake as
    malformed, or None: the first line that breaks the syntax, escaped.
    """
    if _ANSWER.fullmatch(head) is not None:
        return None
    lines = head.split(b"\r\n")
    if _ANSWER.fullmatch(lines[0] + b"\r\n\r\n") is None:
        return f"bad status line {_shown(lines[0])}"
    for line in lines[1:-2]:
        if re.fullmatch(_FIELD_LINE, line) is None:
            return f"bad header line {_shown(line)}"
    return "bad line end"


def withCrlf(head):
    """
    A head that passed L{headProblem} with every bare LF made CRLF (the
    same object when it has none), which is what Autobahn's parser reads.
    """
    if head.count(b"\n") == head.count(b"\r\n"):
        return head
    return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def fieldsProblem(fields):
    """
    Why lbws refuses fields parsed by h11 (a trailer section: h11 refuses
    a bare CR or a line without a colon, but takes control bytes), or None.

    @param fields: C{(name, value)} byte pairs.
    """
    for name, value in fields:
        if _VALUE_BYTES.fullmatch(value) is None:
            return f"bad character in field {_shown(name)}"
    return None


def isHostValue(value):
    """
    Whether C{value} (bytes) is a host[:port] lbws routes on and forwards.
    """
    return _HOST_VALUE.fullmatch(value) is not None


def _hostProblem(line, values):
    """
    RFC 9112 (3.2) has a server answer 400 to an HTTP/1.1 request with no
    Host, more than one, or one that is not a valid host[:port].

    @param line: the request line.
    @param values: the Host fields' values.
    """
    if len(values) > 1:
        return "more than one Host header"
    if not values:
        return "no Host header" if line.rstrip(b"\r").endswith(b"HTTP/1.1") else None
    if _HOST_VALUE.fullmatch(values[0]) is None:
        return f"invalid Host {printable(values[0].decode('latin-1'))[:80]!r}"
    return None


def _syntaxProblem(head):
    """
    The first line of C{head} that breaks the syntax, escaped, for the log.
    """
    lines = re.split(_EOL, head)
    if not re.fullmatch(_REQUEST_LINE, lines[0]):
        return f"bad request line {_shown(lines[0])}"
    for line in lines[1:-2]:
        if not re.fullmatch(_FIELD_LINE, line):
            return f"bad header line {_shown(line)}"
    return "bad line end (a CR without LF)"


def _shown(line, limit=80):
    text = repr(line[:limit])[1:]
    return text + ("..." if len(line) > limit else "")
