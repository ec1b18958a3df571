"""
Fuzzing a real lbws (in this process, on loopback) in front of a backend
that records every byte it gets (tests/wire.py RawBackend): Hypothesis
drives random request heads and random frame sequences at it, and checks
that the backend only ever sees valid input, that each refused client got
its answer, and that lbws keeps serving a bystander client throughout.

The checks parse what the backend got with code of their own, not lbws's.
"""

import struct

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, reactor

from lbws.protocol.frames import OP_TEXT
from lbws.protocol.request import BadTarget, checkEscapes, normaliseTarget
from tests import wire
from tests.support import Harness, eventually

TCHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_MESSAGE = 2048
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def front():
    """
    lbws in front of a recording backend, and a bystander client that
    stays connected through all the fuzzing. (A plain fixture and tests
    that block on the reactor: Hypothesis runs examples synchronously.)
    """
    harness = Harness()
    try:
        lbws, backend = run(_start(harness))
        yield lbws, backend
        run(_stop(lbws))
    finally:
        run(harness.close())


async def _start(harness):
    backend = await wire.rawBackend(harness)
    lbws = await harness.lbws(
        [("a", backend.url)],
        health="interval = 60",
        # The raw bystander answers no ping: lbws pings no one.
        # Heads that are not WebSocket upgrades get 426: the recording
        # backend speaks no plain HTTP.
        lbws=f"max_message_size = {MAX_MESSAGE}\nhandshake_timeout = 2\nping_interval = 0"
        "\nhttp = refuse",
    )
    lbws.bystander = await wire.rawOpen(lbws.url)
    await eventually(lambda: opened(backend))
    lbws.bystander.backend = opened(backend)[0]
    return lbws, backend


async def _stop(lbws):
    lbws.bystander.sendClose(1000)
    await lbws.bystander.closed.addTimeout(5, reactor)


def opened(backend):
    return [c for c in backend.connections if c.head]


def run(coroutine):
    return pytest_twisted.blockon(defer.ensureDeferred(coroutine))


async def bystanderStillServed(lbws):
    """
    The bystander's message reaches the backend: lbws is up and relaying.
    """
    client = lbws.bystander
    before = len(client.backend.received)
    client.sendFrame(OP_TEXT, b"still here")
    await eventually(lambda: len(client.backend.received) > before, timeout=5)


# Request heads

# Lines of a valid opening handshake (without their line ends).
HANDSHAKE = [
    b"Host: 127.0.0.1",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    b"Sec-WebSocket-Version: 13",
]
# Names the client's random headers are made of: they can never be one of
# the handshake's or lbws's own (X-Forwarded-*, X-Real-IP).
NAME_CHARS = b"abcXYZ0_~!"
EOLS = [b"\r\n"] * 6 + [b"\n"] * 3 + [b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x1e", b"\x85", b"\r\r\n"]

names = st.binary(min_size=1, max_size=6).map(
    lambda b: b"x-" + bytes(NAME_CHARS[x % len(NAME_CHARS)] for x in b)
)
# Mostly what a value may hold, sometimes anything but CR and LF.
goodValues = st.binary(max_size=24).map(
    lambda b: bytes(x if x == 9 or 0x20 <= x < 0x7F or x >= 0x80 else x | 0x40 for x in b)
)
anyValues = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
fieldLines = st.one_of(
    st.tuples(names, st.sampled_from([b":", b": ", b":\t"]), st.one_of(goodValues, anyValues)).map(
        b"".join
    ),
    st.tuples(st.sampled_from([b" ", b"\t"]), goodValues).map(b"".join),  # obs-fold
    names,  # no colon
    st.tuples(names, st.sampled_from([b" :", b"\t:"]), goodValues).map(b"".join),
    st.tuples(st.sampled_from([b"x(y)", b"x y", b"", b"\xe9"]), st.just(b": v")).map(b"".join),
)
targets = st.one_of(
    st.just(b"/"),
    st.binary(max_size=12).map(lambda b: b"/" + bytes(0x21 + x % 94 for x in b)),
    st.binary(min_size=1, max_size=6).map(lambda b: b"/" + b),
)


@st.composite
def requestHeads(draw):
    lines = list(HANDSHAKE)
    for line in draw(st.lists(fieldLines, max_size=8)):
        lines.insert(draw(st.integers(0, len(lines))), line)
    head = b"GET " + draw(targets) + b" HTTP/1.1" + draw(st.sampled_from(EOLS))
    for line in lines[:-1]:
        head += line + draw(st.sampled_from(EOLS))
    # The head must end (with an empty line) for lbws to answer at once.
    lineEnds = st.sampled_from([b"\r\n", b"\n"])
    return head + lines[-1] + draw(lineEnds) + draw(lineEnds)


def fieldsOf(head):
    """
    The header fields of a head by RFC 9112's rules (lines end with LF,
    an optional CR before it), as (lower-case name, value) pairs, or None
    when the head breaks them.
    """
    lines = []
    while head:
        if b"\n" not in head:
            return None
        line, head = head.split(b"\n", 1)
        lines.append(line[:-1] if line.endswith(b"\r") else line)
    request, fields, empty = lines[0], lines[1:-1], lines[-1]
    method, _, rest = request.partition(b" ")
    target, _, version = rest.partition(b" ")
    if (
        empty
        or method != b"GET"
        or version != b"HTTP/1.1"
        or not target
        or any(not 0x21 <= c <= 0x7E for c in target)
    ):
        return None
    pairs = []
    for line in fields:
        name, colon, value = line.partition(b":")
        if not colon or not name or any(c not in TCHARS for c in name):
            return None
        if any(not (c == 9 or 0x20 <= c <= 0x7E or c >= 0x80) for c in value):
            return None
        pairs.append((name.lower(), value.strip(b" \t")))
    return pairs


def handshakeIntact(pairs):
    """
    Whether each line of the handshake is one header field of its own.
    """
    for line in HANDSHAKE:
        name, _, value = line.partition(b": ")
        if [v for n, v in pairs if n == name.lower()] != [value]:
            return False
    return True


def joined(pairs, keep):
    """
    The fields kept, repeats joined with ", " (the spaces around a joined
    value are not part of it: RFC 9110 5.5).
    """
    fields = {}
    for name, value in pairs:
        if keep(name):
            fields[name] = fields[name] + b", " + value if name in fields else value
    return {name: value.strip(b" \t") for name, value in fields.items()}


# What lbws's request to the backend may hold besides the client's own
# x- headers.
LBWS_HEADERS = {
    b"host", b"upgrade", b"connection", b"pragma", b"cache-control",
    b"sec-websocket-key", b"sec-websocket-version",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip",
}


@FUZZ
@given(requestHeads())
def test_fuzz_request_heads(front, head):
    lbws, backend = front
    # pytest-twisted runs each example on the reactor and waits for it.
    return defer.ensureDeferred(_requestHead(lbws, backend, head))


async def _requestHead(lbws, backend, head):
    expected = fieldsOf(head)
    before = len(opened(backend))
    client = await wire.rawConnect(lbws.url)
    try:
        await _answered(lbws, backend, head, expected, before, client)
    finally:
        # A failed example leaves no connection open for the next ones.
        client.transport.abortConnection()
    await bystanderStillServed(lbws)


def refusedTarget(target):
    """
    Whether lbws answers 400 to C{target} (lbws.protocol.request).
    """
    text = target.decode("latin-1")
    try:
        normaliseTarget(text)
        checkEscapes(text, "reject")
    except BadTarget:
        return True
    return False


async def _answered(lbws, backend, head, expected, before, client):
    client.send(head)
    response = await client.response.addTimeout(5, reactor)
    status = response.split("\r\n", 1)[0]
    if expected is None:
        assert status.startswith("HTTP/1.1 400 "), (head, response)
        await client.closed.addTimeout(5, reactor)
        assert len(opened(backend)) == before, head
    elif not handshakeIntact(expected) or refusedTarget(head.split(b" ")[1]):
        # Valid field syntax, but not a WebSocket handshake (a handshake
        # line ran into another: 426 with http = refuse), or a target lbws
        # does not forward (a fragment, an encoded slash...): refused.
        assert status.startswith("HTTP/1.1 4"), (head, response)
        await client.closed.addTimeout(5, reactor)
        assert len(opened(backend)) == before, head
    else:
        assert status.startswith("HTTP/1.1 101 "), (head, response)
        await eventually(lambda: len(opened(backend)) > before, timeout=5)
        got = fieldsOf(opened(backend)[before].head)
        assert got is not None
        names = [name for name, _ in got]
        assert len(names) == len(set(names)), got
        own = joined(got, lambda name: name not in LBWS_HEADERS)
        # Names with "_" stay behind (underscores_in_headers = drop).
        kept = joined(expected, lambda name: name.startswith(b"x-") and b"_" not in name)
        assert own == kept, (head, got)
        client.sendClose(1000)
        await client.closed.addTimeout(5, reactor)


# Frame sequences

OPCODES = [0, 1, 2, 8, 9, 10, 3, 11]
CLOSE_CODES = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011} | set(range(3000, 5000))

frames = st.tuples(
    st.booleans(),  # fin
    st.sampled_from([0] * 8 + [0x10, 0x40]),  # rsv bits
    st.sampled_from(OPCODES),
    st.sampled_from([True] * 9 + [False]),  # masked
    st.one_of(
        st.binary(max_size=40),
        st.binary(min_size=120, max_size=140),
        st.tuples(st.integers(0, 5100), st.text(max_size=10)).map(
            lambda c: struct.pack("!H", c[0]) + c[1].encode()
        ),
    ),
)


def encoded(frame):
    fin, rsv, opcode, masked, payload = frame
    return wire.frame(opcode, payload, fin=fin, masked=masked, rsv=rsv)


def checkFrames(data):
    """
    Whether C{data}, all a backend got after its handshake, is valid
    client-to-server WebSocket framing (RFC 6455 5): masked frames, no RSV
    bit, known opcodes, whole short control frames, continuations only
    inside a fragmented message, a valid close frame last. A frame cut
    short at the very end (the client's connection was lost in it) is
    allowed.
    """
    pos, fragmented = 0, False
    while pos < len(data):
        if len(data) - pos < 2:
            return
        first, second = data[pos], data[pos + 1]
        length, at = second & 0x7F, pos + 2
        if length == 126:
            length, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        masked = second & 0x80
        if at + (4 if masked else 0) + length > len(data):
            return  # cut short: the last thing the backend got
        assert masked, f"unmasked frame at {pos}"
        assert not first & 0x70, f"RSV bits at {pos}"
        key = data[at : at + 4]
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(data[at + 4 : at + 4 + length]))
        pos = at + 4 + length
        opcode, fin = first & 0x0F, first & 0x80
        assert opcode in (0, 1, 2, 8, 9, 10), f"opcode {opcode}"
        if opcode >= 8:
            assert fin and length <= 125, "fragmented or long control frame"
            if opcode == 8:
                assert length != 1, "close frame of one byte"
                if length >= 2:
                    code = int.from_bytes(payload[:2], "big")
                    assert code in CLOSE_CODES, f"close code {code}"
                    payload[2:].decode("utf-8")
                assert pos == len(data), "bytes after the close frame"
        else:
            assert (opcode == 0) == fragmented, "bad continuation"
            fragmented = not fin


@FUZZ
@given(
    st.lists(frames, max_size=8),
    st.sampled_from(["close", "cut"]),
    st.integers(min_value=1),
)
def test_fuzz_frames(front, sequence, ending, cutAt):
    lbws, backend = front
    return defer.ensureDeferred(_frames(lbws, backend, sequence, ending, cutAt))


async def _frames(lbws, backend, sequence, ending, cutAt):
    before = len(opened(backend))
    others = set(lbws.relay.tunnels)
    client = await wire.rawOpen(lbws.url)
    await eventually(lambda: len(opened(backend)) > before, timeout=5)
    leg = opened(backend)[before]
    mine = set(lbws.relay.tunnels) - others
    assert len(mine) == 1
    data = b"".join(encoded(frame) for frame in sequence)
    try:
        if ending == "close":
            client.send(data + wire.frame(8, struct.pack("!H", 1000)))
        else:
            client.send(data[: cutAt % (len(data) + 1)])
            client.transport.loseConnection()
        await client.closed.addTimeout(5, reactor)
        await leg.closed.addTimeout(5, reactor)
    finally:
        client.transport.abortConnection()
    checkFrames(leg.received[len(leg.head) :])
    # Its tunnel ended.
    await eventually(lambda: not mine & lbws.relay.tunnels, timeout=5)
    await bystanderStillServed(lbws)


@pytest.mark.parametrize(
    "data, problem",
    [
        (wire.frame(1, b"x", masked=False), "unmasked"),
        (wire.frame(1, b"x", rsv=0x40), "RSV"),
        (wire.frame(0, b"x"), "bad continuation"),
        (wire.frame(9, b"x" * 126), "long control"),
        (wire.frame(8, struct.pack("!H", 1005)), "1005"),
        (wire.frame(8, b"") + wire.frame(1, b"x"), "after the close"),
    ],
)
def test_the_frame_checker_finds_bad_framing(data, problem):
    """
    The fuzz test's checker is able to fail.
    """
    with pytest.raises(AssertionError, match=problem):
        checkFrames(data)
