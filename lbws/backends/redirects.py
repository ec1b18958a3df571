"""
With C{host_header = backend} the backend gets its own address as Host, so
the URLs it builds from Host (a redirect to C{/docs/}, a login page's
C{Refresh}) point at itself: C{http://10.0.0.5:8000/docs/}, an address the
client cannot or must not reach. Like nginx's C{proxy_redirect default},
lbws rewrites the C{Location}, C{Content-Location} and C{Refresh} values
that start with the backend's own URL (its scheme, host, port and path
prefix) to the scheme and Host the client used. Other values, relative
ones and those naming other hosts, pass unchanged.

With the default C{host_header = client} nothing is rewritten: the backend
saw the client's Host and builds its URLs from it.
"""

import re

from lbws.backends.backend import hostForUrl

# The response headers whose values are URLs lbws rewrites.
REWRITTEN = frozenset(["location", "content-location", "refresh"])

# Refresh: "5; url=https://example.com/next" (the URL is optional).
_REFRESH = re.compile(r"(?P<delay>[^;,]*[;,]\s*url\s*=\s*['\"]?)(?P<url>[^'\"]*)(?P<end>['\"]?\s*)$", re.I)


def _prefixes(backend):
    """
    The ways a URL can start with C{backend}'s own address: http or ws
    (https or wss for a wss:// backend), with and without the default port.
    """
    host = hostForUrl(backend.host)
    default = 443 if backend.secure else 80
    authorities = [f"{host}:{backend.port}"]
    if backend.port == default:
        authorities.append(host)
    schemes = ("https", "wss") if backend.secure else ("http", "ws")
    return tuple(
        f"{scheme}://{authority}{backend.path}"
        for scheme in schemes
        for authority in authorities
    )


class RedirectRewriter:
    """
    Rewrites one backend's URLs to one client's: C{rewrite(name, value)}
    for each response header, names and values as text (ISO-8859-1).

    @param backend: the backend's L{lbws.config.BackendSettings}.
    @param clientHost: the Host the client sent.
    @param secure: whether the client came over TLS.
    """

    def __init__(self, backend, clientHost, secure):
        self._prefixes = _prefixes(backend)
        self._client = f"{'https' if secure else 'http'}://{clientHost}"

    def _url(self, url):
        lowered = url.lower()
        for prefix in self._prefixes:
            if lowered.startswith(prefix.lower()):
                rest = url[len(prefix):]
                if rest == "" or rest[0] in "/?#":
                    return self._client + (rest if rest.startswith("/") else "/" + rest)
        return url

    def rewrite(self, name, value):
        lowered = name.lower()
        if lowered not in REWRITTEN:
            return value
        if lowered != "refresh":
            return self._url(value)
        match = _REFRESH.match(value)
        if match is None:
            return value
        return match["delay"] + self._url(match["url"]) + match["end"]
