"""
The client's request target confined to a backend's path prefix. (The
head's field syntax is checked by L{lbws.protocol.strict}.)
"""

import re


class BadTarget(ValueError):
    """
    A request target lbws does not forward (answered with 400).
    """


_ABSOLUTE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_DOT_SEGMENT = re.compile(r"(?:\.|%2[eE]){1,2}")


def normaliseTarget(target):
    """
    The origin-form of a client's request target with its dot segments
    resolved, so that no target can climb out of a backend's path prefix.

    An absolute-form target (C{http://host/path?query}) is reduced to its
    path and query, as RFC 9112 (3.2.2) has a proxy do; a target that does
    not then start with C{/} (C{*}, authority-form, a bare word) is refused.
    Dot segments, plain or percent-encoded (C{%2e}, C{%2E}), are removed
    as in RFC 3986 (5.2.4). The query is kept byte for byte.

    @raise BadTarget: for a target that is not origin-form or
        absolute-form, or has a fragment, or a backslash in its path.
    """
    absolute = _ABSOLUTE.match(target)
    if absolute is not None:
        target = target[absolute.end():]
        if not target.startswith("/"):
            target = "/" + target
    if not target.startswith("/"):
        raise BadTarget(f"request target {target[:80]!r} does not start with /")
    path, mark, query = target.partition("?")
    if "#" in path:
        raise BadTarget("request target has a fragment")
    if "\\" in path:
        # WHATWG URL parsers (Node's new URL(), browsers) read a backslash
        # in an http path as "/": "/app/..\\admin" would climb out there.
        raise BadTarget("request target has a backslash in its path")
    if "." in path or "%" in path:
        path = _removeDotSegments(path)
    return path + mark + query


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
