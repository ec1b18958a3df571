"""
The frame scanner, fed valid and invalid streams cut at random places.
"""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbws.protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameScanner,
    ProtocolViolation,
    buildFrame,
    closePayload,
    parseClosePayload,
)
from tests.wire import frame, frameHeader


class Recorder:
    def __init__(self):
        self.stream = []  # what would reach the other side, in order
        self.controls = []
        self.boundaries = 0
        self.skipped = []  # close payloads found after a violation
        self.unfindable = 0  # times the close could not be looked for

    def forward(self, data):
        self.stream.append(bytes(data))

    def control(self, opcode, payload, raw):
        self.controls.append((opcode, payload))
        if opcode == OP_CLOSE:
            self.stream.append(raw)
        return True  # pings and pongs go on with the bytes around them

    def boundary(self):
        self.boundaries += 1

    def closeSkipped(self, payload):
        self.skipped.append(payload)

    def closeUnfindable(self):
        self.unfindable += 1


def feedInPieces(scanner, data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    start = 0
    for point in points + [len(data)]:
        scanner.feed(data[start:point])
        start = point


# A message: its opcode and the payload of each of its fragments.
messages = st.lists(
    st.tuples(
        st.sampled_from([OP_TEXT, OP_BINARY]),
        st.lists(st.binary(max_size=300), min_size=1, max_size=4),
        st.booleans(),  # a ping between its fragments
    ),
    max_size=8,
)


@settings(max_examples=200, deadline=None)
@given(messages, st.lists(st.integers(min_value=0), max_size=20), st.booleans())
def test_valid_stream_passes_unchanged(msgs, cuts, masked):
    """
    Whatever the cuts, the bytes pass unchanged and in order, and each
    message is counted, with its size, by the time its last byte is fed.
    """
    stream = b""
    ends = {}  # where each message ends in the stream: (count, bytes) so far
    count = size = 0
    for opcode, fragments, ping in msgs:
        for i, payload in enumerate(fragments):
            last = i == len(fragments) - 1
            stream += frame(opcode if i == 0 else OP_CONTINUATION, payload, last, masked)
            if ping and not last:
                stream += frame(OP_PING, b"p", masked=masked)
        count += 1
        size += sum(map(len, fragments))
        ends[len(stream)] = (count, size)
    stream += frame(OP_CLOSE, closePayload(1000, "bye"), masked=masked)
    recorder = Recorder()
    scanner = FrameScanner(recorder, masked, 10**9)
    points = sorted({c % (len(stream) + 1) for c in cuts} | set(ends) | {len(stream)})
    start = 0
    for point in points:
        scanner.feed(stream[start:point])
        start = point
        if point in ends:
            assert (scanner.messages, scanner.bytes) == ends[point]
    assert b"".join(recorder.stream) == stream
    assert (scanner.messages, scanner.bytes) == (count, size)
    assert recorder.controls[-1] == (OP_CLOSE, closePayload(1000, "bye"))
    assert scanner.atBoundary


class PongDropper(Recorder):
    """
    A handler that lets pings go on with the bytes around them and takes
    pongs out, as the tunnel does with the pong answering lbws's own ping.
    """

    def control(self, opcode, payload, raw):
        self.controls.append((opcode, payload))
        return opcode == OP_PING


@settings(max_examples=200, deadline=None)
@given(
    messages,
    st.lists(st.booleans(), max_size=40),
    st.lists(st.integers(min_value=0), max_size=20),
    st.booleans(),
)
def test_control_frames_taken_out_or_left_in_whatever_the_cuts(msgs, pongs, cuts, masked):
    """
    Pings left in the run and pongs taken out of it: the bytes forwarded
    are the stream without the pongs, in order, wherever reads are cut.
    """
    stream = kept = b""
    controls = iter(pongs)
    for opcode, fragments, _ in msgs:
        for i, payload in enumerate(fragments):
            last = i == len(fragments) - 1
            data = frame(opcode if i == 0 else OP_CONTINUATION, payload, last, masked)
            stream += data
            kept += data
            control = next(controls, None)
            if control is not None:
                data = frame(OP_PONG if control else OP_PING, b"c%d" % i, masked=masked)
                stream += data
                kept += b"" if control else data
    recorder = PongDropper()
    scanner = FrameScanner(recorder, masked, 10**9)
    feedInPieces(scanner, stream, cuts)
    assert b"".join(recorder.stream) == kept
    assert scanner.messages == len(msgs)


@settings(max_examples=200, deadline=None)
@given(messages, st.lists(st.integers(min_value=0), max_size=20), st.integers(min_value=0), st.booleans())
def test_a_scanner_moved_anywhere_reads_on_as_one(msgs, cuts, at, masked):
    """
    Take-over: a scanner's state exported (as JSON) at any cut of the
    stream and imported into a new scanner reads the rest as the first
    would have: the same bytes pass, the same messages end.
    """
    import json

    stream = b""
    for opcode, fragments, ping in msgs:
        for i, payload in enumerate(fragments):
            last = i == len(fragments) - 1
            stream += frame(opcode if i == 0 else OP_CONTINUATION, payload, last, masked)
            if ping and not last:
                stream += frame(OP_PING, b"p", masked=masked)
    at %= len(stream) + 1
    whole = Recorder()
    wholeScanner = FrameScanner(whole, masked, 10**9)
    feedInPieces(wholeScanner, stream, cuts)
    first, second = Recorder(), Recorder()
    before = FrameScanner(first, masked, 10**9)
    feedInPieces(before, stream[:at], cuts)
    after = FrameScanner(second, not masked, 5, deflate=True)
    after.importState(json.loads(json.dumps(before.exportState())))
    feedInPieces(after, stream[at:], cuts)
    assert b"".join(first.stream + second.stream) == stream
    assert (before.messages + after.messages, before.bytes + after.bytes) == (
        wholeScanner.messages,
        wholeScanner.bytes,
    )


def test_a_scanner_state_of_the_wrong_kind_is_refused():
    state = FrameScanner(Recorder(), True, 100).exportState()
    with pytest.raises(ValueError):
        FrameScanner(Recorder(), True, 100).importState({**state, "remaining": "7"})


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=125), st.lists(st.integers(min_value=0), max_size=5))
def test_control_payload_is_unmasked(payload, cuts):
    recorder = Recorder()
    scanner = FrameScanner(recorder, True, 100)
    feedInPieces(scanner, frame(OP_PONG, payload), cuts)
    assert recorder.controls == [(OP_PONG, payload)]


VIOLATIONS = [
    (frame(OP_TEXT, b"x", rsv=0x40), 1002, "reserved bits"),
    (frame(3, b"x"), 1002, "reserved opcode"),
    (frame(0xB, b"x"), 1002, "reserved opcode"),
    (frame(OP_PING, b"x", fin=False), 1002, "fragmented control"),
    (frame(OP_PING, b"x" * 126), 1002, "control frame too long"),
    (frame(OP_CONTINUATION, b"x"), 1002, "continuation"),
    (frame(OP_TEXT, b"x", masked=False), 1002, "unmasked"),
    (frame(OP_BINARY, b"x" * 2000), 1009, "longer than 1000"),
    (b"\x82\xff" + struct.pack("!Q", 1 << 30) + b"abcd", 1009, "longer than"),
    (b"\x82\xff" + struct.pack("!Q", 1 << 63) + b"abcd", 1002, "length"),
]


@pytest.mark.parametrize("bad, code, words", VIOLATIONS)
def test_violations(bad, code, words):
    recorder = Recorder()
    scanner = FrameScanner(recorder, True, 1000)
    good = frame(OP_TEXT, b"fine")
    with pytest.raises(ProtocolViolation) as raised:
        scanner.feed(good + bad + good)
    assert raised.value.code == code
    assert words in raised.value.reason
    # What came before the bad frame went through; nothing after it did.
    assert b"".join(recorder.stream) == good
    assert scanner.stopped
    scanner.feed(good)
    assert b"".join(recorder.stream) == good


# Frames a peer may send after its bad one: any opcode, masked or not,
# reserved bits, lengths of every header size.
anyFrames = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2, 3, 7, 9, 10, 11, 15]),
        st.sampled_from([0, 1, 125, 126, 300, 65535, 65536, 70000]),
        st.booleans(),
        st.booleans(),
        st.sampled_from([0, 0x10, 0x40]),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(
    # The whole frames among VIOLATIONS (the last two announce more bytes
    # than they bring).
    st.sampled_from(VIOLATIONS[:8]),
    anyFrames,
    st.binary(max_size=123),
    st.booleans(),
    st.lists(st.integers(min_value=0), max_size=20),
)
def test_after_a_violation_the_close_is_found(bad, others, reason, masked, cuts):
    """
    After a violation nothing more is forwarded, but once seekClose is
    called the frames that follow are delimited, whatever rules they
    break, until the sender's close, which is handed over unmasked, once,
    wherever the stream is cut; what follows it is dropped.
    """
    violation = bad[0]
    good = frame(OP_TEXT, b"fine")
    stream = good + violation
    for opcode, length, fin, isMasked, rsv in others:
        stream += frame(opcode, b"o" * length, fin=fin, masked=isMasked, rsv=rsv)
    payload = struct.pack("!H", 1000) + reason
    stream += frame(OP_CLOSE, payload, masked=masked) + frame(OP_CLOSE, b"\x03\xe9") + good
    recorder = Recorder()
    scanner = FrameScanner(recorder, True, 1000)
    points = sorted({c % (len(stream) + 1) for c in cuts}) + [len(stream)]
    start = 0
    for point in points:
        try:
            scanner.feed(stream[start:point])
        except ProtocolViolation:
            scanner.seekClose()
        start = point
    assert b"".join(recorder.stream) == good
    assert recorder.skipped == [payload]


def test_no_close_is_found_after_an_unreadable_length():
    recorder = Recorder()
    scanner = FrameScanner(recorder, True, 1000)
    with pytest.raises(ProtocolViolation):
        scanner.feed(b"\x82\xff" + struct.pack("!Q", 1 << 63) + b"abcd")
    scanner.seekClose()
    scanner.feed(frame(OP_CLOSE, closePayload(1000)))
    assert recorder.skipped == []
    assert recorder.unfindable == 1


def test_no_close_is_looked_for_behind_a_frame_longer_than_the_seek_limit():
    recorder = Recorder()
    scanner = FrameScanner(recorder, True, 1000)
    with pytest.raises(ProtocolViolation):
        scanner.feed(frameHeader(OP_BINARY, 1 << 30))
    scanner.seekClose()
    scanner.feed(b"x" * 1000 + frame(OP_CLOSE, closePayload(1000)))
    assert (recorder.skipped, recorder.unfindable) == ([], 1)


def test_message_size_counts_all_fragments():
    recorder = Recorder()
    scanner = FrameScanner(recorder, True, 10)
    scanner.feed(frame(OP_TEXT, b"x" * 6, fin=False))
    with pytest.raises(ProtocolViolation) as raised:
        scanner.feed(frame(OP_CONTINUATION, b"x" * 6))
    assert raised.value.code == 1009


def test_new_message_inside_fragmented_message():
    scanner = FrameScanner(Recorder(), True, 100)
    scanner.feed(frame(OP_TEXT, b"x", fin=False))
    with pytest.raises(ProtocolViolation):
        scanner.feed(frame(OP_BINARY, b"x"))


def test_masked_server_frame():
    scanner = FrameScanner(Recorder(), False, 100)
    with pytest.raises(ProtocolViolation) as raised:
        scanner.feed(frame(OP_TEXT, b"x", masked=True))
    assert "masked server frame" in raised.value.reason


def test_boundary_is_reported_when_wanted():
    recorder = Recorder()
    scanner = FrameScanner(recorder, False, 10**6)
    data = frame(OP_BINARY, b"a" * 1000, masked=False)
    scanner.feed(data[:500])
    assert not scanner.atBoundary
    scanner.boundaryWanted = True
    scanner.feed(data[500:] + frame(OP_TEXT, b"b", masked=False))
    assert recorder.boundaries >= 1
    assert b"".join(recorder.stream) == data + frame(OP_TEXT, b"b", masked=False)


def test_stop_drops_the_rest():
    class Stopper(Recorder):
        def control(self, opcode, payload, raw):
            super().control(opcode, payload, raw)
            scanner.stopped = True

    recorder = Stopper()
    scanner = FrameScanner(recorder, True, 100)
    close = frame(OP_CLOSE, closePayload(1000))
    scanner.feed(close + frame(OP_TEXT, b"after"))
    assert b"".join(recorder.stream) == close


def test_build_and_parse_close():
    built = buildFrame(OP_CLOSE, closePayload(1001, "going"), masked=True)
    recorder = Recorder()
    FrameScanner(recorder, True, 100).feed(built)
    ((opcode, payload),) = recorder.controls
    assert parseClosePayload(payload) == (1001, "going")
    assert parseClosePayload(b"") == (1005, "")
    assert len(buildFrame(OP_BINARY, b"x" * 70000)) == 70010
