"""
Units of the plain HTTP proxy: its config keys, request heads as h11 and
lbws's stricter rules read them together, and the sticky cookie. Bodies
at random byte boundaries are in tests/test_httpproxy_states.py.
"""

import h11
import pytest

from lbws.backends import sticky
from lbws.config import ConfigError, parseConfig
from lbws.protocol.http1 import Head, isWebSocketUpgrade
from lbws.protocol.strict import headProblem
from lbws.backends.pool import Pool
from tests.support import setHealthy

MINIMAL = "[backend:a]\nurl = ws://127.0.0.1:8010\n"


def test_http_keys_defaults_and_values():
    settings = parseConfig(MINIMAL)
    assert (settings.http, settings.http_timeout, settings.max_body_size) == (
        "proxy",
        60,
        1048576,
    )
    assert settings.sticky_cookie == ""
    settings = parseConfig(
        "[lbws]\nhttp = refuse\nhttp_timeout = 2.5\nmax_body_size = 0\n"
        "sticky_cookie = SRV_ID\n" + MINIMAL
    )
    assert (settings.http, settings.http_timeout, settings.max_body_size) == (
        "refuse",
        2.5,
        0,
    )
    assert settings.sticky_cookie == "SRV_ID"


@pytest.mark.parametrize(
    "line, key, words",
    [
        ("http = maybe", "http", "'maybe' is not one of proxy, refuse"),
        ("http_timeout = 0", "http_timeout", "must be greater than 0"),
        ("max_body_size = -1", "max_body_size", "must be at least 0"),
        ("max_body_size = 1MB", "max_body_size", "is not a whole number"),
        ("sticky_cookie = a;b", "sticky_cookie", "is not a cookie name"),
    ],
)
def test_http_key_mistakes_name_file_section_and_key(line, key, words):
    with pytest.raises(ConfigError) as raised:
        parseConfig(f"[lbws]\n{line}\n" + MINIMAL, "lbws.ini")
    assert str(raised.value).startswith(f"lbws.ini: [lbws] {key}: ")
    assert words in str(raised.value)


def _read(head):
    """
    A request head as the proxy reads it: lbws's rules, then h11.
    """
    problem = headProblem(head)
    if problem is not None:
        raise ValueError(problem)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    return Head.ofEvent(conn.next_event())


def test_request_head():
    request = _read(
        b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2\r\n"
        b"Content-Length: 3\r\n\r\n"
    )
    assert (request.method, request.target, request.version) == ("POST", "/a?b=1", "HTTP/1.1")
    assert request.headers["cookie"] == "a=1, b=2"
    assert request.fields[0] == ("Host", "x")  # names as sent
    assert request.path == "/a" and request.params == {"b": ["1"]}


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost : x",  # space before the colon
        b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n folded",  # obs-fold, which h11 unfolds
        b"GET  / HTTP/1.1\r\nHost: x",
        b"GET / HTTP/2.0\r\nHost: x",
        b"\x00\x01garbage",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b",  # h11 takes it
        b"GET / HTTP/1.1\r\nHost: a,b",  # h11 takes it
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: a",
        b"GET / HTTP/1.1\r\nX: y",  # no Host
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\rb",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked",
    ],
)
def test_malformed_and_ambiguous_request_heads_are_refused(head):
    with pytest.raises((ValueError, h11.RemoteProtocolError)):
        _read(head + b"\r\n\r\n")


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nA: b\r\n folded\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a,b\r\n\r\n",
    ],
)
def test_h11_alone_takes_what_lbws_refuses(head):
    # Why lbws.protocol.strict exists: if h11 started refusing these, the
    # strict rules could shrink.
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    assert type(conn.next_event()) is h11.Request
    assert headProblem(head) is not None


def test_websocket_upgrade_test():
    assert isWebSocketUpgrade(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: WebSocket")
    assert isWebSocketUpgrade(b"GET / HTTP/1.1\nConnection: Upgrade\nUpgrade: websocket\n")
    assert not isWebSocketUpgrade(b"GET / HTTP/1.1\r\nUpgrade: h2c")
    assert not isWebSocketUpgrade(b"GET /websocket HTTP/1.1\r\nHost: x")


def test_sticky_cookie_names_a_member_opaquely_while_it_is_up():
    settings = parseConfig(
        "[backend:alpha]\nurl = ws://10.0.0.1:80\n[backend:bravo]\nurl = ws://10.0.0.2:80\n"
    )
    pool = Pool(settings)
    alpha = pool["alpha"]
    value = sticky.stickyId(alpha)
    assert "alpha" not in value and "10.0.0.1" not in value
    assert value != sticky.stickyId(pool["bravo"])
    header = f"x=1; LB={value}"
    assert sticky.preferred(pool, "LB", header) is alpha
    assert sticky.setCookie("LB", alpha, header) is None
    assert sticky.setCookie("LB", pool["bravo"], header) == (
        f"LB={sticky.stickyId(pool['bravo'])}; Path=/; HttpOnly"
    )
    assert sticky.preferred(pool, "", header) is None
    assert sticky.preferred(pool, "LB", "LB=unknown") is None
    alpha.admin.drain()
    assert sticky.preferred(pool, "LB", header) is None
    alpha.admin.drain(False)
    setHealthy(alpha, False)
    assert sticky.preferred(pool, "LB", header) is None
