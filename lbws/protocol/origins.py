"""
C{allowed_origins}: which web pages may open WebSockets through lbws.

Browsers send a page's cookies with its cross-site WebSocket handshakes, so
without a check any site a user visits can talk to the backend as that user
(cross-site WebSocket hijacking). The C{Origin} header says which page asks;
non-browser clients send none and are not affected. See the README's
C{allowed_origins}.
"""

import re
from urllib.parse import urlsplit

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_HOST = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


class OriginError(ValueError):
    """
    An C{allowed_origins} entry that is neither an origin nor a pattern.
    """


def _origin(text):
    """
    C{(scheme, host, port)} of an origin such as C{https://app.example.com}
    (lower case, the scheme's default port filled in), or None for
    anything else (a path, user info, C{null}).
    """
    try:
        parts = urlsplit(text.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        return None
    host = parts.hostname
    if not (_HOST.fullmatch(host) or isIPAddress(host) or isIPv6Address(host)):
        return None
    return parts.scheme, parts.hostname, port or _DEFAULT_PORTS[parts.scheme]


@attrs.frozen
class AllowedOrigins:
    """
    Exact origins (scheme, host and port must all match) and C{*.DOMAIN}
    patterns (any scheme and port, a host strictly under DOMAIN), compared
    without regard to case. Empty allows every origin.
    """

    exact: frozenset = frozenset()
    suffixes: tuple = ()

    def __bool__(self):
        return bool(self.exact or self.suffixes)

    def allows(self, origin):
        """
        Whether a handshake with C{Origin: origin} may go on.
        """
        if not self:
            return True
        parsed = _origin(origin)
        if parsed is None:
            return False
        if parsed in self.exact:
            return True
        return parsed[1].endswith(self.suffixes)


def parseOrigins(text):
    """
    The C{allowed_origins} value: entries separated by commas or spaces.

    @raise OriginError: naming the first entry that is neither an origin
        (C{https://app.example.com}, C{http://localhost:8080}) nor a
        pattern (C{*.example.com}).
    """
    exact = set()
    suffixes = []
    for entry in re.split(r"[\s,]+", text.strip()):
        if not entry:
            continue
        if entry.startswith("*."):
            domain = entry[2:].lower()
            if not _HOST.fullmatch(domain):
                raise OriginError(f"{entry!r}: a pattern is *. and a domain, like *.example.com")
            suffixes.append("." + domain)
            continue
        parsed = _origin(entry)
        if parsed is None:
            raise OriginError(
                f"{entry!r} is not an origin like https://app.example.com"
                " (scheme, host, optional port; no path) or a pattern like *.example.com"
            )
        exact.add(parsed)
    return AllowedOrigins(frozenset(exact), tuple(suffixes))
