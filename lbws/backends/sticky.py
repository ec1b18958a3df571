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
backend does. The key is the contents of C{sticky_secret_file}, which
every worker and every lbws of a fleet reads: without one, the key is a
constant of this source, and anyone who guesses a backend's name and URL
can tell which backend an id names (C{--check} and the start log say so).
"""

import functools
import hashlib

from lbws.backends.pool import UP

# The key without C{sticky_secret_file}; ids keyed with it stay as they were.
_KEY = b"lbws sticky_cookie v1"


@functools.lru_cache(maxsize=64)
def _key(secret):
    """
    The BLAKE2b key for C{secret}, which may be longer than the 64 bytes
    BLAKE2b takes as a key.
    """
    if not secret:
        return _KEY
    return hashlib.blake2b(secret, digest_size=32, person=b"lbws sticky").digest()


@functools.lru_cache(maxsize=4096)
def _id(name, url, secret):
    text = f"{name}\0{url}".encode("utf-8", "surrogateescape")
    return hashlib.blake2b(text, key=_key(secret), digest_size=9).hexdigest()


def stickyId(member, secret=b""):
    """
    The cookie value naming C{member}, keyed with C{secret} (the contents
    of C{sticky_secret_file}, or empty).
    """
    return _id(member.name, member.settings.url, secret)


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


def preferred(pool, name, cookieHeader, route=None, secret=b""):
    """
    The member of C{route} the client's sticky cookie names, if that
    member takes new connections (up, not draining, weight above 0); else
    None, and the balancer picks as if there were no cookie.

    @param secret: the key of the ids (L{stickyId}).
    """
    if not name:
        return None
    value = cookieValue(cookieHeader, name)
    if not value:
        return None
    for member in pool.serving(route):
        if stickyId(member, secret) == value:
            return member if member.state == UP and member.weight > 0 else None
    return None


def setCookie(name, member, cookieHeader, secret=b""):
    """
    The Set-Cookie value giving the client C{member}'s id (keyed with
    C{secret}, see L{stickyId}), or None when stickiness is off or the
    client already carries that id.
    """
    if not name:
        return None
    value = stickyId(member, secret)
    if cookieValue(cookieHeader, name) == value:
        return None
    return f"{name}={value}; Path=/; HttpOnly"
