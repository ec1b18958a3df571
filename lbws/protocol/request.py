"""
The client's request head, checked before any parser splits it, and its
request target confined to a backend's path prefix.

Autobahn's handshake parser splits the head with Python's C{splitlines},
which also breaks lines at C{\\x0b}, C{\\x0c}, C{\\x1c}-C{\\x1e} and C{\\x85},
and it skips lines it cannot read. A header hidden behind one of those
(C{X-Note: a\\x85Authorization: forged}) would reach the backend as a header
of its own that a front proxy never saw. So the raw head is matched first
against the field syntax of RFC 9112 (section 5) and RFC 9110 (section
5.5), with one compiled regular expression, and refused with 400 when it
does not match. See "Security" in the README.
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
# otherwise).
_REQUEST_LINE = _TOKEN + rb" [\x21-\x7e]+ HTTP/[0-9]\.[0-9]"
_FIELD_LINE = _TOKEN + rb":" + _VALUE
_TOKEN_TEXT = re.compile(_TOKEN.decode())
_HEAD = re.compile(_REQUEST_LINE + _EOL + rb"(?:" + _FIELD_LINE + _EOL + rb")*" + _EOL)


def headEnd(data):
    """
    The length of the request head at the start of C{data} (up to and
    including its first empty line), or -1 while it is incomplete.

    Called for every read until the head is complete, so it searches with
    C{bytes.find} (as Autobahn does) rather than a regular expression.
    """
    ends = [i + n for i, n in ((data.find(b"\n\n"), 2), (data.find(b"\n\r\n"), 3)) if i >= 0]
    return min(ends) if ends else -1


def isToken(text):
    """
    Whether C{text} is an RFC 9110 token, as a subprotocol name must be
    (RFC 6455 4.1).
    """
    return _TOKEN_TEXT.fullmatch(text) is not None


def checkHead(head):
    """
    Whether C{head} (a whole request head, as cut by L{headEnd}) keeps to
    the field syntax, and the same head with CRLF line ends.

    @return: C{None} for a head to refuse, else the head with every bare
        LF made CRLF (the same object when it has none), which is what
        Autobahn's parser reads.
    """
    if _HEAD.fullmatch(head) is None:
        return None
    if head.count(b"\n") == head.count(b"\r\n"):
        return head
    return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


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
_HOST_LINE = re.compile(rb"^host[ \t]*:[ \t]*(.*?)[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


def hostProblem(head):
    """
    What is wrong with the Host of a request head that passed L{checkHead},
    or None: RFC 9112 (3.2) has a server answer 400 to an HTTP/1.1 request
    with no Host, more than one, or one that is not a valid host[:port].
    """
    values = _HOST_LINE.findall(head.split(b"\n", 1)[1] if b"\n" in head else b"")
    if len(values) > 1:
        return "more than one Host header"
    if not values:
        return "no Host header" if head.split(b"\r\n", 1)[0].endswith(b"HTTP/1.1") else None
    if _HOST_VALUE.fullmatch(values[0]) is None:
        return f"invalid Host {printable(values[0].decode('latin-1'))[:80]!r}"
    return None


def headProblem(head):
    """
    Why L{checkHead} refused C{head}, for the log: the first line that
    breaks the syntax, escaped.
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


class BadTarget(ValueError):
    """
    A request target lbws does not forward (answered with 400).
    """


_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
_DOT_SEGMENT = re.compile(r"(?:\.|%2[eE]){1,2}")
# An encoded "/" or "\\": a backend that decodes the path before it resolves
# dot segments (nginx, many frameworks) reads either as a separator.
_ESCAPED_SEPARATOR = re.compile(r"%(?:2[fF]|5[cC])")
# A percent-encoded unreserved character (RFC 3986 2.3): ALPHA, DIGIT,
# "-", ".", "_", "~". Decoding one gives an equivalent URI (6.2.2.2).
_ESCAPED_UNRESERVED = re.compile(
    r"%(4[1-9A-Fa-f]|5[0-9Aa]|6[1-9A-Fa-f]|7[0-9Aa]|3[0-9]|2[dDeE]|5[fF]|7[eE])"
)


def _split(target):
    """
    The authority (None for origin-form) and the rest of C{target}.
    """
    if target.startswith("/"):
        return None, target  # origin-form, nearly every request
    absolute = _ABSOLUTE.match(target)
    if absolute is None:
        return None, target
    rest = target[absolute.end():]
    return absolute.group(2), rest if rest.startswith("/") else "/" + rest


def normaliseTarget(target):
    """
    The origin-form of a client's request target with its dot segments
    resolved, so that no target can climb out of a backend's path prefix.

    An absolute-form target (C{http://host/path?query}) is reduced to its
    path and query, as RFC 9112 (3.2.2) has a proxy do (its authority is
    the request's host, see L{takeAuthority}); a target that does not then
    start with C{/} (C{*}, authority-form, a bare word) is refused. Dot
    segments, plain or percent-encoded (C{%2e}, C{%2E}), are removed as in
    RFC 3986 (5.2.4). Percent-encoded unreserved characters are decoded
    (RFC 3986 6.2.2.2), so that routes see the path a decoding backend
    serves: C{/%61dmin} is C{/admin}, for an C{/admin} route as for the
    backend. The query is kept byte for byte.

    Whatever C{escaped_slashes} says, a dot segment that only a backend
    decoding C{%2F} or C{%5C} would see (C{/..%2fsecret}), or one that
    strips path parameters (C{/..;/secret}), is refused: lbws cannot
    resolve it without changing the path the application gets, and passed
    on it would climb out of the prefix on such a backend (see
    L{checkEscapes} for the rest of C{escaped_slashes}).

    @raise BadTarget: for a target that is not origin-form or
        absolute-form, or has a fragment, or a backslash in its path, or a
        dot segment behind an encoded slash or backslash or before path
        parameters.
    """
    target = _split(target)[1]
    if not target.startswith("/"):
        raise BadTarget(f"request target {target[:80]!r} does not start with /")
    path, mark, query = target.partition("?")
    if "#" in path:
        raise BadTarget("request target has a fragment")
    if "\\" in path:
        # WHATWG URL parsers (Node's new URL(), browsers) read a backslash
        # in an http path as "/": "/app/..\\admin" would climb out there.
        raise BadTarget("request target has a backslash in its path")
    if ("%" in path or ";" in path) and _hiddenDotSegment(path):
        raise BadTarget("request target has a dot segment hidden from lbws")
    if "%" in path:
        path = _ESCAPED_UNRESERVED.sub(_unescaped, path)
    if "." in path or "%" in path:
        path = _removeDotSegments(path)
    return path + mark + query


def _unescaped(match):
    return chr(int(match.group(1), 16))


def _hiddenDotSegment(path):
    """
    Whether C{path} has a dot segment that lbws does not see as one but a
    backend may: behind an encoded slash or backslash (C{..%2f}, resolved
    after decoding by nginx), or before path parameters (C{..;x}, which
    Tomcat and Spring strip before they resolve dot segments).
    """
    for segment in path.split("/"):
        if "%" not in segment and ";" not in segment:
            continue
        for piece in _ESCAPED_SEPARATOR.split(segment):
            bare = piece.partition(";")[0]
            if _DOT_SEGMENT.fullmatch(bare) and bare != segment:
                return True
    return False


def checkEscapes(target, escapedSlashes):
    """
    Refuse what C{escaped_slashes = reject} refuses (as Envoy's
    C{path_with_escaped_slashes_action: REJECT_REQUEST} does): a path with
    C{%2F} or C{%5C} in any case, or with a dot segment that is only one
    once decoded (C{/%2e%2e/x}). Such paths mean one resource to lbws and
    its routes, another to a backend that decodes them first.

    @param target: the client's request target as it sent it.
    @param escapedSlashes: C{escaped_slashes}, C{reject} or C{keep}
        (README, "Paths").
    @raise BadTarget: for a target C{reject} refuses.
    """
    if escapedSlashes == "keep":
        return
    path = _split(target)[1].partition("?")[0]
    if "%" not in path:
        return
    if _ESCAPED_SEPARATOR.search(path) is not None:
        raise BadTarget("request target has an encoded slash or backslash in its path")
    for segment in path.split("/"):
        if "%" in segment and _DOT_SEGMENT.fullmatch(segment):
            raise BadTarget("request target has a percent-encoded dot segment")


def takeAuthority(target, headers):
    """
    Make the authority of an absolute-form target the request's Host
    (RFC 9112 3.2.2: it replaces the Host field), for routing and for the
    Host and X-Forwarded-Host the backend gets; an origin-form target
    leaves C{headers} as they are.

    @param headers: the request's header fields by lower-case name,
        changed in place.
    @raise BadTarget: for an authority that is not a valid host[:port]
        (userinfo included, which RFC 9110 4.2.4 has recipients treat as
        an error).
    """
    authority = _split(target)[0]
    if authority is None:
        return
    if _HOST_VALUE.fullmatch(authority.encode("latin-1")) is None:
        raise BadTarget(f"invalid authority {printable(authority)[:80]!r} in the request target")
    headers["host"] = authority


def _removeDotSegments(path):
    """
    RFC 3986 5.2.4 for an absolute path, with C{%2e} read as C{.}: a
    segment of one dot is dropped, one of two dots drops the one before.
    """
    segments = path.split("/")
    kept = []
    for segment in segments[1:]:
        if _DOT_SEGMENT.fullmatch(segment) is None:
            kept.append(segment)
        elif segment.count(".") + segment.lower().count("%2e") == 2 and kept:
            kept.pop()
    last = segments[-1]
    if _DOT_SEGMENT.fullmatch(last):
        # "/a/.." and "/a/." name the directory: keep the trailing slash.
        kept.append("")
    return "/" + "/".join(kept)


def joinTarget(prefix, target):
    """
    The resource to ask a backend for: its url's path prefix (no trailing
    slash) and the client's target, normalised by L{normaliseTarget}, so
    that the result is C{prefix + "/..."} whatever the client sent.

    @raise BadTarget: see L{normaliseTarget}.
    """
    return prefix + normaliseTarget(target)
