"""
Reading a backend's answer strictly (lbws.protocol.answers: lbws.protocol.strict's
rules, then h11): heads that break RFC 9112 syntax are refused, bodies are read as their head frames them
whatever the TCP segments, and what lbws writes to the client is built only
from the parts it checked.
"""

import pytest
from hypothesis import given, settings, strategies as st

from lbws.protocol.answers import MAX_BODY, MAX_HEAD, BodyReader, MalformedAnswer, acceptedHeaders, parseHead, render


def head(*lines, status=b"HTTP/1.1 401 Unauthorized"):
    return parseHead(b"\r\n".join((status, *lines)) + b"\r\n\r\n")


@pytest.mark.parametrize(
    "bad",
    [
        b"X-Note: a\nInjected: yes",  # a bare LF
        b"X-Note: a\rInjected: yes",  # a bare CR
        b"X-Note: a\x00b",
        b"X-Note: a\x0bb",
        b" folded: continuation",  # obs-fold
        b"no colon here",
        b"Bad Name: x",
        b": no name",
    ],
)
def test_a_header_line_that_breaks_the_syntax_is_malformed(bad):
    with pytest.raises(MalformedAnswer):
        head(b"Content-Length: 0", bad)


@pytest.mark.parametrize(
    "status",
    [b"HTTP/1.1 40 Short", b"HTTP/1.1 4010 Long", b"HTTP/2 401 X", b"HTTP/1.1 401 a\x7fb", b"401 Unauthorized"],
)
def test_a_bad_status_line_is_malformed(status):
    with pytest.raises(MalformedAnswer):
        head(status=status)


def test_values_keep_their_bytes_and_lose_only_surrounding_whitespace():
    parsed = head(b"X-Name:  caf\xe9 \tau lait \t", status=b"HTTP/1.1 403 Interdit \xe0 vous")
    assert parsed.headers == [(b"X-Name", b"caf\xe9 \tau lait")]
    assert render(parsed, b"").startswith(b"HTTP/1.1 403 Interdit \xe0 vous\r\nX-Name: caf\xe9 \tau lait\r\n")


def test_render_drops_hop_by_hop_headers_and_frames_the_body_itself():
    parsed = head(
        b"Connection: keep-alive, X-Hop",
        b"Keep-Alive: timeout=5",
        b"X-Hop: only for this hop",
        b"Transfer-Encoding: chunked",
        b"WWW-Authenticate: Basic realm=x",
        b"Set-Cookie: a=1",
        b"Set-Cookie: b=2",
    )
    assert render(parsed, b"{}") == (
        b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=x\r\n"
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n"
        b"Connection: close\r\n\r\n{}"
    )


def test_a_101s_headers_for_the_client_leave_out_the_handshakes_own():
    parsed = head(
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: abc",
        b"Sec-WebSocket-Protocol: chat",
        b"Server: app/1.0",
        b"Set-Cookie: a=1",
        b"Set-Cookie: b=2",
        status=b"HTTP/1.1 101 Switching Protocols",
    )
    assert acceptedHeaders(parsed) == {"Server": ["app/1.0"], "Set-Cookie": ["a=1", "b=2"]}


def cuts(data, draw):
    """
    C{data} split at random places.
    """
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def feedAll(reader, pieces):
    done = False
    for piece in pieces:
        done = reader.feed(piece)
    return done


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    trailers=st.lists(st.sampled_from([b"X-T: 1", b"Expires: never"]), max_size=2),
    extension=st.sampled_from([b"", b";name=value"]),
    data=st.data(),
)
def test_a_chunked_body_is_read_whatever_the_segments(body, sizes, trailers, extension, data):
    chunks, rest = [], body
    while rest:
        for size in sizes:
            chunks.append(rest[:size])
            rest = rest[size:]
    wire = b"".join(b"%x%s\r\n%s\r\n" % (len(c), extension, c) for c in chunks if c)
    wire += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    limit = data.draw(st.integers(0, 4000))
    reader = BodyReader(head(b"Transfer-Encoding: chunked"), limit=limit)
    assert feedAll(reader, cuts(wire, data.draw))
    assert reader.body == body[:limit] and reader.cut == (len(body) > limit)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=3000), data=st.data())
def test_a_content_length_body_is_read_whatever_the_segments(body, data):
    reader = BodyReader(head(b"Content-Length: %d" % len(body)))
    pieces = cuts(body + b"more bytes after the body", data.draw)
    assert feedAll(reader, pieces) and reader.body == body


def test_a_body_framed_by_the_end_of_the_connection():
    reader = BodyReader(head())
    assert not reader.feed(b"x" * MAX_BODY)
    assert not reader.feed(b"y")
    assert reader.end() and reader.body == b"x" * MAX_BODY and reader.cut


@pytest.mark.parametrize(
    "lines, wire",
    [
        ((b"Transfer-Encoding: chunked",), b"zz\r\n"),
        ((b"Transfer-Encoding: chunked",), b"3\r\nabcX\r\n"),
        ((b"Transfer-Encoding: chunked",), b"0\r\nbad trailer\r\n\r\n"),
        ((b"Transfer-Encoding: chunked",), b"1" * (MAX_HEAD + 1)),  # a size line that never ends
    ],
)
def test_a_bad_chunked_framing_is_malformed(lines, wire):
    with pytest.raises(MalformedAnswer):
        BodyReader(head(*lines)).feed(wire)


@pytest.mark.parametrize("lengths", [(b"Content-Length: 1", b"Content-Length: 2"), (b"Content-Length: -1",)])
def test_a_bad_content_length_is_malformed(lengths):
    with pytest.raises(MalformedAnswer):
        BodyReader(head(*lengths))


@settings(max_examples=300, deadline=None)
@given(
    fields=st.lists(
        st.tuples(st.binary(min_size=1, max_size=12), st.binary(max_size=20)), max_size=5
    )
)
def test_whatever_a_backend_sends_the_client_gets_only_valid_fields(fields):
    raw = b"HTTP/1.1 403 Forbidden\r\n" + b"".join(n + b":" + v + b"\r\n" for n, v in fields)
    try:
        parsed = parseHead(raw + b"\r\n")
    except MalformedAnswer:
        return
    written = render(parsed, b"")
    again = parseHead(written)
    sent = [(n, v) for n, v in again.headers if n.lower() not in (b"content-length", b"connection")]
    assert sent == parsed.endToEnd({"content-length"})
    assert written.count(b"\n") == written.count(b"\r\n")
