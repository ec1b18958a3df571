"""
Units of the plain HTTP proxy: its config keys, HTTP/1.1 head parsing and
body framing (fed at random byte boundaries), and the sticky cookie.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbws.backends import sticky
from lbws.config import ConfigError, parseConfig
from lbws.protocol.http1 import (
    BadMessage,
    BodyReader,
    isWebSocketUpgrade,
    parseRequestHead,
    parseResponseHead,
    requestFraming,
    responseFraming,
)
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


def test_request_head():
    request = parseRequestHead(
        b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nCookie: a=1\r\nCookie: b=2\r\n"
        b"Content-Length: 3"
    )
    assert (request.method, request.target, request.version) == ("POST", "/a?b=1", "HTTP/1.1")
    assert request.headers["cookie"] == "a=1, b=2"
    assert request.path == "/a" and request.params == {"b": ["1"]}
    assert requestFraming(request) == ("length", 3)
    assert request.keepAlive()
    assert not parseRequestHead(b"GET / HTTP/1.0\r\nHost: x").keepAlive()


@pytest.mark.parametrize(
    "head",
    [
        b"GET / HTTP/1.1\r\nHost : x",  # space before the colon
        b"GET / HTTP/1.1\r\nA: b\r\n folded",  # obs-fold
        b"GET  / HTTP/1.1",
        b"GET / HTTP/2.0",
        b"\x00\x01garbage",
        b"GET / HTTP/1.1\r\nX: a\x00b",
    ],
)
def test_malformed_request_heads_are_refused(head):
    with pytest.raises(BadMessage):
        parseRequestHead(head)


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 3\r\nTransfer-Encoding: chunked",
        b"Content-Length: 3\r\nContent-Length: 4",
        b"Content-Length: -1",
        b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: chunked, chunked",
    ],
)
def test_ambiguous_request_framing_is_refused(fields):
    request = parseRequestHead(b"POST / HTTP/1.1\r\n" + fields)
    with pytest.raises(BadMessage):
        requestFraming(request)


def test_response_framing():
    def framing(head, method="GET"):
        return responseFraming(parseResponseHead(head), method)

    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 5") == ("length", 5)
    assert framing(b"HTTP/1.1 200 OK\r\nContent-Length: 5", "HEAD") == ("none", 0)
    assert framing(b"HTTP/1.1 204 No Content") == ("none", 0)
    assert framing(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5") == ("none", 0)
    assert framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked") == ("chunked", 0)
    assert framing(b"HTTP/1.1 200 OK") == ("close", 0)
    assert framing(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: gzip") == ("close", 0)
    with pytest.raises(BadMessage):
        parseResponseHead(b"HTTP/1.1 20 OK")


def test_websocket_upgrade_test():
    assert isWebSocketUpgrade(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: WebSocket")
    assert not isWebSocketUpgrade(b"GET / HTTP/1.1\r\nUpgrade: h2c")
    assert not isWebSocketUpgrade(b"GET /websocket HTTP/1.1\r\nHost: x")


def _chunked(pieces, trailer=b""):
    out = b""
    for piece in pieces:
        out += b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
    return out + b"0\r\n" + trailer + b"\r\n"


def _feed(reader, data, cuts):
    """
    Feed C{data} cut at C{cuts}; return (body bytes, decoded, rest).
    """
    body, decoded, rest = b"", b"", b""
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(bounds, bounds[1:]):
        part, after = reader.feed(data[start:end])
        body += part
        decoded += b"".join(reader.pieces)
        if after:
            rest += after + data[end:]
            break
    return body, decoded, rest


@given(
    pieces=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    next_request=st.binary(max_size=50),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
)
def test_chunked_body_end_found_at_any_cut(pieces, next_request, cuts):
    encoded = _chunked(pieces, b"X-Sum: 1\r\n")
    reader = BodyReader("chunked", decode=True)
    body, decoded, rest = _feed(reader, encoded + next_request, cuts)
    assert reader.done
    assert body == encoded
    assert decoded == b"".join(pieces)
    assert rest == next_request
    assert reader.payload == sum(map(len, pieces))


@given(
    length=st.integers(min_value=1, max_value=2000),
    extra=st.binary(max_size=50),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_length_body_end_found_at_any_cut(length, extra, cuts):
    data = b"b" * length
    reader = BodyReader("length", length)
    body, _, rest = _feed(reader, data + extra, cuts)
    assert (reader.done, body, rest) == (True, data, extra)


@pytest.mark.parametrize(
    "data",
    [
        b"5\r\nabcdef\r\n",  # longer than its size
        b"zz\r\n",
        b"5\nabcde\r\n",  # bare LF
        b"\r\n",
        b"1" * 17 + b"\r\n",
    ],
)
def test_malformed_chunked_coding_is_refused(data):
    with pytest.raises(BadMessage):
        BodyReader("chunked").feed(data)


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
