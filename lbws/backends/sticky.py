"""
Cookie-inserted sticky sessions (C{sticky_cookie}), as HAProxy's
C{cookie NAME insert} does: lbws names the backend it chose in a cookie of
its own, and sends the client's next requests and WebSockets with that
cookie to the same backend while it is up. Long-polling needs it: all the
requests of a socket.io session, and its later WebSocket upgrade, must
reach the backend that holds the session.

The cookie holds an opaque id, not the backend's name or address: a keyed
hash of the member's name and URL. It is the same in every worker and
across restarts and reloads, so a session stays where it is as long as its
backend does.
"""

import functools
import hashlib

from lbws.backends.pool import UP

_KEY = b"lbws sticky_cookie v1"


@functools.lru_cache(maxsize=4096)
def _id(name, url):
    text = f"{name}\0{url}".encode("utf-8", "surrogateescape")
    return hashlib.blake2b(text, key=_KEY, digest_size=9).hexdigest()


def stickyId(member):
    """
    The cookie value naming C{member}.
    """
    return _id(member.name, member.settings.url)


def cookieValue(cookieHeader, name):
    """
    The value of cookie C{name} in a request's Cookie header (repeats
    joined by ", " or "; "), or None.
    """
    if not cookieHeader:
        return None
    for part in cookieHeader.replace(", ", "; ").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip().strip('"')
    return None


def preferred(pool, name, cookieHeader, route=None):
    """
    The member of C{route} the client's sticky cookie names, if that
    member takes new connections (up, not draining, weight above 0); else
    None, and the balancer picks as if there were no cookie.
    """
    if not name:
        return None
    value = cookieValue(cookieHeader, name)
    if not value:
        return None
    for member in pool.serving(route):
        if stickyId(member) == value:
            return member if member.state == UP and member.weight > 0 else None
    return None


def setCookie(name, member, cookieHeader):
    """
    The Set-Cookie value giving the client C{member}'s id, or None when
    stickiness is off or the client already carries that id.
    """
    if not name:
        return None
    value = stickyId(member)
    if cookieValue(cookieHeader, name) == value:
        return None
    return f"{name}={value}; Path=/; HttpOnly"
