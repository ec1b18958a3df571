"""
The request-head check (lbws/protocol/strict.py) and the target normalisation (lbws/protocol/request.py),
allowed_origins matching, close-code labels, log escaping and the
byte-exact backend request (tests/test_compat.py): unit and property tests. End to end they are
in tests/test_hostile.py and tests/test_fuzz.py.
"""

from hypothesis import given, strategies as st

from lbws.protocol.headers import parseFields
from lbws.telemetry.logs import printable
from lbws.telemetry.metrics import closeLabel
from lbws.protocol.origins import parseOrigins
from lbws.protocol.request import (
    BadTarget,
    checkEscapes,
    joinTarget,
    normaliseTarget,
    takeAuthority,
)
from lbws.protocol.strict import headEnd, headProblem, withCrlf

import pytest

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VALUE_BYTES = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
FORBIDDEN_IN_VALUES = bytes([*range(0, 9), *range(10, 0x20), 0x7F])

names = st.text(alphabet=TCHARS, min_size=1, max_size=12).filter(
    # Fields with rules of their own (Host, framing): tests/test_http1.py.
    lambda name: name.lower() not in ("host", "content-length", "transfer-encoding")
)
values = st.binary(max_size=30).map(lambda b: bytes(VALUE_BYTES[x % len(VALUE_BYTES)] for x in b))
eols = st.sampled_from([b"\r\n", b"\n"])


@st.composite
def heads(draw):
    """
    A valid request head, as the fields it was made of.
    """
    fields = draw(st.lists(st.tuples(names, values, eols), max_size=8))
    head = b"GET /x?y HTTP/1.0" + draw(eols)  # 1.0: no Host needed
    for name, value, eol in fields:
        head += name.encode() + b":" + value + eol
    return head + draw(eols), fields


@given(heads())
def test_valid_heads_pass_with_crlf_line_ends(made):
    head, fields = made
    assert headEnd(head + b"frames\r\n\r\n") == len(head)
    assert headProblem(head) is None
    checked = withCrlf(head)
    assert checked.count(b"\n") == checked.count(b"\r\n") == len(fields) + 2
    parsed = parseFields(checked)
    for name, value, _ in fields:
        assert value.strip(b" \t").decode("latin-1") in parsed[name.lower()]


@given(heads(), st.sampled_from(FORBIDDEN_IN_VALUES), eols)
def test_a_control_byte_in_a_value_is_refused(made, bad, eol):
    head, _ = made
    lastEol = b"\r\n" if head.endswith(b"\r\n") else b"\n"
    spoiled = head[: -len(lastEol)] + b"X-Bad: a" + bytes([bad]) + b"b" + eol + lastEol
    assert headProblem(spoiled[: headEnd(spoiled)]) is not None


@pytest.mark.parametrize(
    "line, problem",
    [
        (b"X-A: one\r\n two", "bad header line ' two'"),
        (b"X-A one", "bad header line 'X-A one'"),
        (b"X-A : one", "bad header line 'X-A : one'"),
        (b"X-A: \x1b[2J", "bad header line 'X-A: \\x1b[2J'"),
        (b"X-A: one\rX-B: two", "bad header line 'X-A: one\\rX-B: two'"),
    ],
)
def test_head_problems_name_the_line_escaped(line, problem):
    head = b"GET / HTTP/1.1\r\nHost: h\r\n" + line + b"\r\n\r\n"
    assert headProblem(head) == problem


def test_request_line_problems():
    for line in (b"GET /\x00 HTTP/1.1", b"GET  / HTTP/1.1", b"GET / HTTP/1.1 x", b"GET /\xe9 HTTP/1.1"):
        head = line + b"\r\nHost: h\r\n\r\n"
        assert headProblem(head).startswith("bad request line")


def test_parse_fields_splits_at_line_ends_only_and_trims_spaces_and_tabs_only():
    head = b"GET / HTTP/1.1\r\nX-A: \xa0one\x85two\xa0 \t\r\nx-a: 2\r\nHost:h\r\n\r\n"
    assert parseFields(head) == {"x-a": "\xa0one\x85two\xa0, 2", "host": "h"}


@pytest.mark.parametrize(
    "target, expected",
    [
        ("/", "/"),
        ("/chat?room=1", "/chat?room=1"),
        ("/../admin", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/%2E%2e/%2e/admin", "/admin"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a/.%2E", "/"),
        ("/a/..b/.c/%2e%2e%2e", "/a/..b/.c/..."),
        # Unreserved characters decoded (RFC 3986 6.2.2.2), others kept.
        ("/%61dmin", "/admin"),
        ("/%41%5A%7e%5f%2D%30", "/AZ~_-0"),
        ("/%40%25%2f%20%C3%A9", "/%40%25%2f%20%C3%A9"),
        ("/%2561", "/%2561"),
        ("/a/../..?x=/../../y#z", "/?x=/../../y#z"),
        ("http://internal.example/admin", "/admin"),
        ("HTTPS://internal.example:8443?q", "/?q"),
        ("ws://h/a/../../b", "/b"),
    ],
)
def test_normalise_target(target, expected):
    assert normaliseTarget(target) == expected


@pytest.mark.parametrize("target", ["istrator/x", "*", "internal.example:443", "/a#frag", "mailto:x", ""])
def test_targets_refused(target):
    with pytest.raises(BadTarget):
        normaliseTarget(target)


segments = st.sampled_from(["", ".", "..", "%2e", "%2E%2e", ".%2e", "a", "b%2f", "...", "x.y"])
queries = st.text(alphabet="/.%2eE?&=#a", max_size=12)


@given(
    st.sampled_from(["", "/app", "/a/b"]),
    st.lists(segments, max_size=10),
    st.one_of(st.none(), queries),
    st.sampled_from(["", "http://h", "ws://internal.example:1"]),
)
def test_joined_targets_stay_under_the_prefix(prefix, parts, query, scheme):
    target = scheme + "/" + "/".join(parts) + ("" if query is None else "?" + query)
    joined = joinTarget(prefix, target)
    path, mark, rest = joined.partition("?")
    assert path.startswith(prefix + "/")
    assert (mark, rest) == ("" if query is None else "?", query or "")
    # No dot segment is left, and normalising again changes nothing.
    below = path[len(prefix) :].split("/")
    assert not {".", "..", "%2e", "%2E%2e", ".%2e"} & set(below)
    assert normaliseTarget(joined[len(prefix) :]) == joined[len(prefix) :]


@pytest.mark.parametrize(
    "target",
    ["/..%2fsecret", "/a%2F..%2F..%2Fb", "/..%5csecret", "/x/%2e%2e%2Fy", "/.%2f", "http://h/..%2fx",
     "/..;/secret", "/a/..;x=1/b", "/.;/a", "/%2e%2e;/x"],
)
def test_dot_segments_hidden_from_lbws_are_refused_in_any_mode(target):
    with pytest.raises(BadTarget):
        normaliseTarget(target)


@pytest.mark.parametrize(
    "target",
    ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a%5cb", "/%2e%2e/x", "/.%2E/x", "/a/%2e", "/a/%2E%2E",
     "http://h/a%2fb"],
)
def test_reject_refuses_escaped_slashes_and_encoded_dot_segments(target):
    with pytest.raises(BadTarget):
        checkEscapes(target, "reject")
    checkEscapes(target, "keep")


@pytest.mark.parametrize(
    "target, path",
    [
        ("/", "/"),
        ("/a/../b", "/b"),
        ("/a.b/%2e%2ex/%20", "/a.b/..x/%20"),
        ("/file%2ehtml", "/file.html"),
        ("/q?x=%2F..%2f", "/q"),
        ("/%41%2g", "/A%2g"),
        ("/a;v=1/b", "/a;v=1/b"),
        ("/x/...;y", "/x/...;y"),
    ],
)
def test_reject_lets_other_targets_through(target, path):
    checkEscapes(target, "reject")
    assert normaliseTarget(target).partition("?")[0] == path


def test_absolute_form_authority_replaces_host():
    headers = {"host": "a.example"}
    takeAuthority("http://b.example:8080/x?y", headers)
    assert headers == {"host": "b.example:8080"}
    takeAuthority("/x", headers)
    assert headers == {"host": "b.example:8080"}
    for target in ("http://user@b.example/", "http:///x", "http://b.example,c/x", "http://[zz]/"):
        with pytest.raises(BadTarget):
            takeAuthority(target, {"host": "a"})


def _decodingBackendPath(path):
    """
    The path a backend that decodes before it resolves dot segments (as
    nginx does) serves for C{path}: %2F, %5C and backslashes are "/", %2E
    is "." (RFC 3986 5.2.4 then).
    """
    for encoded, plain in (("%2f", "/"), ("%5c", "/"), ("\\", "/"), ("%2e", ".")):
        path = path.replace(encoded, plain).replace(encoded.upper(), plain)
    kept = []
    for segment in path.split("/")[1:]:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    return "/" + "/".join(kept)


hostile = st.sampled_from(
    ["", ".", "..", "%2e", "%2E%2e", "a", "..%2f", "%2F..", "a%2f..%2f..", "%5c..", "..%5C",
     "%2e%2e%2f", "b%2fc", ".%2f."]
)


@given(st.sampled_from(["/app", "/a/b"]), st.lists(hostile, max_size=8), st.sampled_from(["keep", "reject"]))
def test_no_accepted_target_leaves_the_prefix_on_a_decoding_backend(prefix, parts, mode):
    target = "/" + "/".join(parts)
    try:
        joined = joinTarget(prefix, target)
        checkEscapes(target, mode)
    except BadTarget:
        return
    served = _decodingBackendPath(joined)
    assert served == prefix or served.startswith(prefix + "/"), (target, joined, served)


def test_allowed_origins_matching():
    allowed = parseOrigins("https://app.example.com,http://[::1]:8080  *.example.org")
    assert allowed.allows("https://APP.example.com")
    assert allowed.allows("https://app.example.com:443")
    assert allowed.allows("http://[::1]:8080")
    assert allowed.allows("wss://deep.sub.example.org:1")
    for origin in (
        "http://app.example.com",
        "https://app.example.com:444",
        "https://example.org",
        "https://evilexample.org",
        "https://app.example.com/",
        "null",
        "",
        "https://user@app.example.com",
    ):
        assert not allowed.allows(origin) or origin == "https://app.example.com/", origin
    assert parseOrigins(" ").allows("https://anything.example")


def test_close_code_labels():
    for code in (1000, 1001, 1002, 1003, 1005, 1006, 1007, 1011, 1012, 1014, 1015):
        assert closeLabel(code) == str(code)
    assert [closeLabel(c) for c in (3000, 3999, 4000, 4999)] == ["3xxx", "3xxx", "4xxx", "4xxx"]
    assert [closeLabel(c) for c in (1004, 1016, 2999, 5000, 65535)] == ["other"] * 5


def test_printable_escapes_control_characters_but_tab():
    assert printable("plain / text\t\u00e9") == "plain / text\t\u00e9"
    assert printable("a\x1b[2J\x00\n\r\x7f\x85\x9b") == "a\\x1b[2J\\x00\\x0a\\x0d\\x7f\\x85\\x9b"
