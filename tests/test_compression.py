"""
permessage-deflate through lbws: the client's offer reaches the backend,
the client gets exactly the backend's answer, and compressed frames pass
unchanged both ways (README, "Compression").

End-to-end tests run each client twice, directly against the backend and
through a real lbws, and check that the client sees the same. Real
clients: Python `websockets`, headless Chromium, and a raw byte-level
client for what no library sends.
"""

import json
import os
import zlib

import pytest
import pytest_twisted
from autobahn.websocket.protocol import WebSocketProtocol
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols import portforward
from twisted.web.resource import Resource
from twisted.web.server import Site

from lbws import compat
from lbws.protocol import extensions
from lbws.config import ConfigError, parseConfig
from lbws.backends.dial import RelayProtocol
from lbws.protocol.frames import (
    OP_BINARY,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    FrameScanner,
    ProtocolViolation,
)
from lbws.ws.server import FrontendProtocol
from tests import support
from tests.support import configText, handshakeRequest
from tests.test_dashboard import Browser, browserInstalled
from tests.wire import frame, rawConnect

MIB = 1024 * 1024
# What node `ws` answers a plain offer with these options:
# "permessage-deflate; client_max_window_bits=10; server_no_context_takeover".
DEFLATE_OPTIONS = '{"serverNoContextTakeover": true, "clientMaxWindowBits": 10}'


def compressible(size):
    """
    Text that deflates to a few KiB per MiB, like a chat log or JSON.
    """
    line = "2026-11-30T14:00:00Z user=alice room=lobby said hello to everyone\n"
    return (line * (size // len(line) + 1))[:size]


def deflated(payload):
    """
    A message's payload compressed as permessage-deflate sends it (RFC 7692
    section 7.2.1): raw deflate, flushed, without the final 00 00 ff ff.
    """
    compressor = zlib.compressobj(wbits=-15)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def inflated(payload):
    return zlib.decompressobj(wbits=-15).decompress(payload + b"\x00\x00\xff\xff")


# Negotiation, unit by unit.


def test_only_permessage_deflate_offers_are_forwarded_verbatim():
    headers = {
        "sec-websocket-extensions": "x-webkit-deflate-frame, permessage-deflate;"
        ' client_max_window_bits; server_max_window_bits="10",'
        " foo; bar=\"a, b\", PerMessage-Deflate"
    }
    assert extensions.forwardedOffer(headers, "passthrough") == (
        'permessage-deflate; client_max_window_bits; server_max_window_bits="10",'
        " PerMessage-Deflate"
    )
    assert extensions.forwardedOffer(headers, "off") is None
    assert extensions.forwardedOffer({}, "passthrough") is None
    only = {"sec-websocket-extensions": "x-webkit-deflate-frame"}
    assert extensions.forwardedOffer(only, "passthrough") is None


params = st.lists(
    st.sampled_from(
        [
            "client_max_window_bits",
            "client_max_window_bits=8",
            'server_max_window_bits="12"',
            "server_no_context_takeover",
            "client_no_context_takeover",
            "x=1",
        ]
    ),
    max_size=4,
)


@given(st.lists(params, min_size=1, max_size=3), st.sampled_from([", ", ",", " ,  "]))
def test_every_deflate_offer_reaches_the_backend_as_written(offers, comma):
    written = ["; ".join(["permessage-deflate", *p]) for p in offers]
    headers = {"sec-websocket-extensions": comma.join(["x-other; a=1", *written])}
    assert extensions.forwardedOffer(headers, "passthrough") == ", ".join(written)


def test_the_backend_may_accept_one_offer_or_none():
    offer = "permessage-deflate; client_max_window_bits"
    assert extensions.answerProblem(None, offer) is None
    assert extensions.answerProblem(None, None) is None
    answer = "permessage-deflate; server_no_context_takeover; client_max_window_bits=10"
    assert extensions.answerProblem(answer, offer) is None
    assert "not offered" in extensions.answerProblem("permessage-deflate", None)
    assert "only one" in extensions.answerProblem("x-other", offer)
    assert "only one" in extensions.answerProblem(
        "permessage-deflate, permessage-deflate", offer
    )
    assert extensions.accepted({"sec-websocket-extensions": "  "}) is None
    assert extensions.accepted({"sec-websocket-extensions": f" {answer} "}) == answer


def test_autobahn_reads_extension_headers_through_the_seam():
    """
    lbws's protocols keep Autobahn away from Sec-WebSocket-Extensions by
    replacing the private method both of its handshakes parse it with: if
    an Autobahn upgrade renames it, this fails by name.
    """
    assert callable(WebSocketProtocol._parseExtensionsHeader)
    for cls in (FrontendProtocol, RelayProtocol):
        assert cls._parseExtensionsHeader is compat.unparsedExtensions
        assert cls._parseExtensionsHeader(cls(), "permessage-deflate") == []


def test_compression_key():
    text = configText([("a", "ws://127.0.0.1:1")])
    assert parseConfig(text).compression == "passthrough"
    text = configText([("a", "ws://127.0.0.1:1")], lbws="compression = off")
    assert parseConfig(text).compression == "off"
    text = configText([("a", "ws://127.0.0.1:1")], lbws="compression = gzip")
    with pytest.raises(ConfigError) as caught:
        parseConfig(text, "lbws.ini")
    assert str(caught.value) == (
        "lbws.ini: [lbws] compression: 'gzip' is not one of passthrough, off"
    )


# The frame scanner's RSV1 rule.


class Recorder:
    def __init__(self):
        self.forwarded = []
        self.controls = []
        self.scanner = None

    def forward(self, data):
        self.forwarded.append(data)

    def control(self, opcode, payload, raw):
        self.controls.append(opcode)


def scan(data, deflate, masked=True, maxMessageSize=MIB):
    recorder = Recorder()
    scanner = recorder.scanner = FrameScanner(recorder, masked, maxMessageSize, deflate=deflate)
    scanner.feed(data)
    return recorder


def test_compressed_first_frames_pass_only_when_deflate_was_negotiated():
    compressed = deflated(b"hello " * 100)
    data = frame(OP_TEXT, compressed, rsv=0x40) + frame(OP_BINARY, compressed, rsv=0x40)
    recorder = scan(data, deflate=True)
    assert b"".join(recorder.forwarded) == data
    # Sizes are those on the wire: the compressed payloads.
    assert (recorder.scanner.messages, recorder.scanner.bytes) == (2, 2 * len(compressed))
    with pytest.raises(ProtocolViolation) as caught:
        scan(data, deflate=False)
    assert (caught.value.code, caught.value.reason) == (1002, "reserved bits set")


@pytest.mark.parametrize(
    "frames",
    [
        # RSV1 on a continuation frame.
        [frame(OP_TEXT, b"ab", fin=False, rsv=0x40), frame(OP_CONTINUATION, b"c", rsv=0x40)],
        [frame(OP_TEXT, b"ab", fin=False), frame(OP_CONTINUATION, b"c", rsv=0x40)],
        # RSV1 on a control frame.
        [frame(OP_PING, b"p", rsv=0x40)],
        # RSV2 and RSV3 mean nothing under permessage-deflate.
        [frame(OP_TEXT, b"ab", rsv=0x20)],
        [frame(OP_BINARY, b"ab", rsv=0x10)],
        [frame(OP_TEXT, b"ab", rsv=0x60)],
    ],
)
def test_other_reserved_bits_are_refused_even_with_deflate(frames):
    with pytest.raises(ProtocolViolation) as caught:
        scan(b"".join(frames), deflate=True)
    assert caught.value.code == 1002


def test_max_message_size_counts_compressed_bytes():
    compressed = deflated(b"a" * 100000)
    assert len(compressed) < 1000
    recorder = scan(frame(OP_TEXT, compressed, rsv=0x40), deflate=True, maxMessageSize=1000)
    assert (recorder.scanner.messages, recorder.scanner.bytes) == (1, len(compressed))
    with pytest.raises(ProtocolViolation) as caught:
        scan(frame(OP_TEXT, os.urandom(1001), rsv=0x40), deflate=True, maxMessageSize=1000)
    assert caught.value.code == 1009


@given(
    st.lists(
        st.tuples(
            st.sampled_from([OP_TEXT, OP_BINARY]),
            st.booleans(),
            st.lists(st.binary(max_size=300), min_size=1, max_size=4),
        ),
        max_size=6,
    ),
    st.lists(st.integers(min_value=0, max_value=5000), max_size=8),
    st.booleans(),
)
def test_fragmented_compressed_messages_cut_anywhere_pass_unchanged(messages, cuts, masked):
    data = b""
    ends = {}  # where each message ends: (messages, bytes) counted by then
    count = size = 0
    for opcode, compressed, fragments in messages:
        for i, fragment in enumerate(fragments):
            data += frame(
                opcode if i == 0 else OP_CONTINUATION,
                fragment,
                fin=i == len(fragments) - 1,
                masked=masked,
                rsv=0x40 if compressed and i == 0 else 0,
            )
        count += 1
        size += sum(len(f) for f in fragments)
        ends[len(data)] = (count, size)
    recorder = Recorder()
    scanner = FrameScanner(recorder, masked, MIB, deflate=True)
    points = sorted({min(c, len(data)) for c in cuts} | set(ends))
    for start, end in zip([0, *points], [*points, len(data)]):
        scanner.feed(data[start:end])
        if end in ends:
            assert (scanner.messages, scanner.bytes) == ends[end]
    assert b"".join(recorder.forwarded) == data
    assert (scanner.messages, scanner.bytes) == (count, size)


# End to end.


async def deflateBackend(harness, options=DEFLATE_OPTIONS):
    """
    A node `ws` echo backend that accepts permessage-deflate.
    """
    if not support.nodeAvailable():
        pytest.fail("node and tests/node/node_modules are needed: run `make test`")
    backend = support.NodeBackend("--deflate", options)
    harness.atEnd(backend.stop)
    return backend


class _CountingServer(portforward.ProxyServer):
    def dataReceived(self, data):
        self.factory.sent += len(data)
        super().dataReceived(data)


class _CountingClient(portforward.ProxyClient):
    def dataReceived(self, data):
        self.peer.factory.received += len(data)
        super().dataReceived(data)


class _CountingClientFactory(portforward.ProxyClientFactory):
    protocol = _CountingClient


_CountingServer.clientProtocolFactory = _CountingClientFactory


class CountingForwarder(portforward.ProxyFactory):
    """
    A TCP forwarder between a client and C{url}, counting the bytes the
    client sent and received: what the client's network carries.
    """

    protocol = _CountingServer

    def __init__(self, url):
        host, port = url.split("//")[1].rsplit(":", 1)
        super().__init__(host, int(port))
        self.sent = 0
        self.received = 0

    @property
    def total(self):
        return self.sent + self.received


async def forwarder(harness, url):
    counter = CountingForwarder(url)
    port = await harness.listen(counter)
    counter.url = f"ws://127.0.0.1:{port.getHost().port}"
    return counter


def websocketsSession(url, counter, message):
    """
    A Python `websockets` client (it offers permessage-deflate by default):
    what it negotiated, what came back, the wire bytes of one round trip,
    and what the backend saw of its handshake. Blocking: run in a thread.
    """
    from websockets.sync.client import connect

    with connect(url, max_size=None, open_timeout=10, close_timeout=5) as ws:
        negotiated = ws.response.headers.get("Sec-WebSocket-Extensions")
        before = counter.total
        ws.send(message)
        echoed = ws.recv(timeout=20)
        wire = counter.total - before
        ws.send("__request__")
        request = json.loads(ws.recv(timeout=10))
    return {
        "extensions": negotiated,
        "echoed": echoed == message,
        "wire": wire,
        "offer": request["headers"].get("sec-websocket-extensions"),
    }


@pytest_twisted.ensureDeferred
async def test_websockets_client_negotiates_through_lbws_as_directly(harness):
    backend = await deflateBackend(harness)
    lbws = await harness.lbws([("a", backend.url)])
    message = compressible(MIB)
    seen = {}
    for leg, url in (("direct", backend.url), ("lbws", lbws.url)):
        counter = await forwarder(harness, url)
        seen[leg] = await threads.deferToThread(
            websocketsSession, counter.url, counter, message
        )
    direct, through = seen["direct"], seen["lbws"]
    assert direct["extensions"] == (
        "permessage-deflate; client_max_window_bits=10; server_no_context_takeover"
    )
    assert through["extensions"] == direct["extensions"]
    # The backend got the client's offer as the client wrote it.
    assert direct["offer"] == "permessage-deflate; client_max_window_bits"
    assert through["offer"] == direct["offer"]
    assert direct["echoed"] and through["echoed"]
    # 1 MiB each way, compressed: a few KiB on the client's wire, and the
    # same through lbws as directly.
    assert direct["wire"] < 2 * MIB / 100, seen
    assert abs(through["wire"] - direct["wire"]) <= 0.05 * direct["wire"], seen


@pytest_twisted.ensureDeferred
async def test_compression_off_strips_the_offer(harness):
    backend = await deflateBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], lbws="compression = off")
    message = compressible(MIB)
    counter = await forwarder(harness, lbws.url)
    through = await threads.deferToThread(websocketsSession, counter.url, counter, message)
    assert through["extensions"] is None
    assert through["offer"] is None
    assert through["echoed"]
    assert through["wire"] > 2 * MIB


@pytest_twisted.ensureDeferred
async def test_max_message_size_counts_wire_bytes(harness):
    """
    A 1 MiB message that deflates to a few KiB fits a 64 KiB limit; 100 KiB
    that do not compress close the client with 1009.
    """
    from websockets.exceptions import ConnectionClosedError
    from websockets.sync.client import connect

    backend = await deflateBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], lbws="max_message_size = 65536")
    message = compressible(MIB)
    noise = os.urandom(100 * 1024)

    def session():
        with connect(lbws.url, max_size=None, open_timeout=10) as ws:
            assert ws.response.headers.get("Sec-WebSocket-Extensions")
            ws.send(message)
            assert ws.recv(timeout=20) == message
            ws.send(noise)
            try:
                ws.recv(timeout=20)
            except ConnectionClosedError as e:
                return e.rcvd.code
            return None

    assert await threads.deferToThread(session) == 1009


CHROMIUM_SESSION = """
const [url, done] = arguments;
const ws = new WebSocket(url);
window.lbwsSocket = ws;
ws.onopen = () => done({open: true, extensions: ws.extensions});
ws.onerror = () => done({open: false});
"""

CHROMIUM_ECHO = """
const [size, done] = arguments;
const line = "2026-11-30T14:00:00Z user=alice room=lobby said hello to everyone\\n";
const message = line.repeat(Math.ceil(size / line.length)).slice(0, size);
const ws = window.lbwsSocket;
ws.onmessage = (event) => done(event.data === message);
ws.onclose = (event) => done("closed " + event.code);
ws.send(message);
"""


class _BlankPage(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return b"<!doctype html><title>lbws</title>"


async def blankPage(harness):
    """
    An empty page on loopback, for the browser's scripts to run in: a
    WebSocket from an opaque origin (about:blank) to a loopback address
    would need Chromium's local network access permission.
    """
    port = await harness.listen(Site(_BlankPage()))
    return f"http://127.0.0.1:{port.getHost().port}/"


def chromiumSession(browser, url, counter):
    browser.driver.set_script_timeout(30)
    opened = browser.driver.execute_async_script(CHROMIUM_SESSION, url)
    before = counter.total
    echoed = browser.driver.execute_async_script(CHROMIUM_ECHO, MIB)
    wire = counter.total - before
    browser.driver.execute_script("window.lbwsSocket.onclose = null; window.lbwsSocket.close(1000)")
    return {**opened, "echoed": echoed, "wire": wire}


@pytest_twisted.ensureDeferred
async def test_chromium_negotiates_through_lbws_as_directly(harness, tmp_path):
    browserInstalled()
    backend = await deflateBackend(harness, "{}")
    lbws = await harness.lbws([("a", backend.url)])
    page = await blankPage(harness)
    browser = await threads.deferToThread(Browser, tmp_path / "chromium-profile")
    seen = {}
    try:
        await threads.deferToThread(browser.driver.get, page)
        for leg, url in (("direct", backend.url), ("lbws", lbws.url)):
            counter = await forwarder(harness, url)
            seen[leg] = await threads.deferToThread(
                chromiumSession, browser, counter.url, counter
            )
        problems = await threads.deferToThread(browser.problems)
    finally:
        await threads.deferToThread(browser.quit)
    direct, through = seen["direct"], seen["lbws"]
    assert direct["open"] and direct["extensions"].startswith("permessage-deflate"), seen
    assert through["extensions"] == direct["extensions"]
    assert direct["echoed"] is True and through["echoed"] is True, seen
    assert direct["wire"] < 2 * MIB / 100, seen
    assert abs(through["wire"] - direct["wire"]) <= 0.05 * direct["wire"], seen
    assert problems == []


async def rawSession(url, offer=None):
    client = await rawConnect(url)
    extra = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
    client.send(handshakeRequest(extra=extra))
    head = await client.response.addTimeout(10, reactor)
    assert head.startswith("HTTP/1.1 101"), head
    return client, _header(head, "sec-websocket-extensions")


def _header(head, name):
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def both(harness, backend, **lbws):
    """
    The URLs to run a client against: the backend directly, and lbws.
    """
    service = await harness.lbws([("a", backend.url)], **lbws)
    return {"direct": backend.url, "lbws": service.url}


@pytest_twisted.ensureDeferred
async def test_compressed_frames_pass_verbatim_both_ways(harness):
    backend = await deflateBackend(harness, "{}")
    message = compressible(4096).encode()
    seen = {}
    for leg, url in (await both(harness, backend)).items():
        client, agreed = await rawSession(url, "permessage-deflate")
        client.send(frame(OP_TEXT, deflated(message), rsv=0x40))
        echo = await client.nextFrame()
        start = client.received.index(b"\r\n\r\n") + 4
        seen[leg] = (agreed, client.received[start] & 0x40, inflated(echo.payload))
        client.transport.loseConnection()
    assert seen["direct"] == ("permessage-deflate", 0x40, message)
    assert seen["lbws"] == seen["direct"]


@pytest_twisted.ensureDeferred
async def test_only_deflate_offers_reach_the_backend(harness):
    # Replies uncompressed (ws applies its threshold only without context
    # takeover), for the raw client to read.
    backend = await deflateBackend(
        harness, '{"serverNoContextTakeover": true, "threshold": 1000000}'
    )
    offer = "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits=8"
    seen = {}
    for leg, url in (await both(harness, backend)).items():
        client, agreed = await rawSession(url, offer)
        client.send(frame(OP_TEXT, b"__request__"))
        reply = await client.nextFrame()
        seen[leg] = (agreed, json.loads(reply.payload)["headers"]["sec-websocket-extensions"])
        client.transport.loseConnection()
    # Directly the backend sees the whole offer and ignores what it does
    # not know; through lbws it sees only the permessage-deflate offer,
    # window bits of 8 included (which Autobahn alone would refuse).
    agreed = "permessage-deflate; client_max_window_bits=8; server_no_context_takeover"
    assert seen["direct"] == (agreed, offer)
    assert seen["lbws"] == (agreed, "permessage-deflate; client_max_window_bits=8")


@pytest.mark.parametrize(
    "offer, frames",
    [
        # Not negotiated: RSV1 on a text frame.
        (None, [frame(OP_TEXT, deflated(b"hello"), rsv=0x40)]),
        # Negotiated: RSV1 on a continuation frame.
        (
            "permessage-deflate",
            [
                frame(OP_TEXT, deflated(b"hello")[:2], fin=False, rsv=0x40),
                frame(OP_CONTINUATION, deflated(b"hello")[2:], rsv=0x40),
            ],
        ),
        # Negotiated: RSV1 on a ping.
        ("permessage-deflate", [frame(OP_PING, b"ping", rsv=0x40)]),
    ],
    ids=["not-negotiated", "continuation", "ping"],
)
@pytest_twisted.ensureDeferred
async def test_misplaced_compressed_bit_gets_1002(harness, offer, frames):
    backend = await deflateBackend(harness, "{}")
    seen = {}
    for leg, url in (await both(harness, backend)).items():
        client, agreed = await rawSession(url, offer)
        assert agreed == offer
        client.send(b"".join(frames))
        close = await client.closeFrame()
        seen[leg] = close.closeCode
        await client.closed.addTimeout(10, reactor)
    assert seen == {"direct": 1002, "lbws": 1002}


@pytest_twisted.ensureDeferred
async def test_backend_accepting_what_was_not_offered_is_a_failed_handshake(harness):
    """
    An extension the client did not offer would make frames unreadable:
    the client fails such a handshake directly, and lbws refuses it the
    same way, as a backend failure.
    """
    backend = await harness.backend(
        "odd", responseHeaders={"Sec-WebSocket-Extensions": "permessage-deflate"}
    )
    with pytest.raises(support.HandshakeFailed):
        await harness.client(backend.url)
    lbws = await harness.lbws([("odd", backend.url)], lbws="retries = 0")
    with pytest.raises(support.HandshakeFailed) as caught:
        await harness.client(lbws.url)
    assert caught.value.status == 502
    assert lbws.pool["odd"].failed == 1


@pytest_twisted.ensureDeferred
async def test_health_probe_offers_no_extension(harness):
    backend = await harness.backend("a")
    lbws = await harness.lbws(
        [("a", backend.url)], probe="websocket", health="interval = 0.1\nrise = 1"
    )
    await support.eventually(lambda: len(backend.connections) >= 2)
    client, _ = await rawSession(lbws.url, "permessage-deflate")
    client.transport.loseConnection()
    requests = [c.request.headers for c in backend.connections]
    clients = [h for h in requests if "x-forwarded-for" in h]
    probes = [h for h in requests if "x-forwarded-for" not in h]
    assert [h.get("sec-websocket-extensions") for h in clients] == ["permessage-deflate"]
    assert probes and all("sec-websocket-extensions" not in h for h in probes)
