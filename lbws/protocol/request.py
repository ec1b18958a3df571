"""
The client's request target confined to a backend's path prefix. (The
head's field syntax is checked by L{lbws.protocol.strict}.)
"""

import re

from lbws.protocol.strict import isHostValue
from lbws.telemetry.logs import printable


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
    if not isHostValue(authority.encode("latin-1")):
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
