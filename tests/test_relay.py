"""
Every rule of the README's "On the wire" section, end to end: real backends
(Autobahn in-process, node `ws` as a process), a real lbws service on
loopback, real clients.
"""

import gc
import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone

from lbws.backends.dial import RelayProtocol
from lbws.protocol.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, closePayload
from lbws.ws.server import FrontendProtocol
from lbws.ws.tunnel import Leg
from tests import wire
from tests.support import (
    HandshakeFailed,
    connect,
    deferLater,
    eventually,
    handshakeRequest,
    roundTrip,
    setHealthy,
    silentFactory,
)


async def closeOf(client, timeout=10):
    """
    The close code and reason C{client} got, waited for with a deadline.
    """
    return await client.closed.addTimeout(timeout, reactor)


@pytest_twisted.ensureDeferred
async def test_handshake_waits_for_backend_and_relays_messages(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    client = await harness.client(lbws.url)
    # The client is open only once the backend's WebSocket is.
    assert len(backend.connections) == 1
    assert backend.connections[0].state == backend.connections[0].STATE_OPEN
    assert await roundTrip(client, b"hello") == (b"hello", False)
    assert await roundTrip(client, b"\x00\xff\x10", True) == (b"\x00\xff\x10", True)
    assert await roundTrip(client, "h\u00e9llo \u2603".encode()) == (
        "h\u00e9llo \u2603".encode(),
        False,
    )


@pytest_twisted.ensureDeferred
async def test_joined_tunnel_keeps_no_autobahn_protocol(harness):
    """
    Once both handshakes are done, the tunnel's legs are the transports'
    protocols and both Autobahn protocols are gone (what keeps an idle
    connection small, see the README's Benchmark section); messages,
    counts and the close still work.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    clients = [await harness.client(lbws.url) for _ in range(3)]
    for client in clients:
        assert await roundTrip(client, b"hello") == (b"hello", False)
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, (FrontendProtocol, RelayProtocol))]
    assert alive == []
    [tunnel] = list(lbws.relay.tunnels)[:1]
    assert isinstance(tunnel.client.transport.protocol, Leg)
    assert isinstance(tunnel.backend.transport.protocol, Leg)
    member = lbws.pool["a"]
    assert (lbws.relay.clients, member.active) == (3, 3)
    for client in clients:
        client.sendClose(1000, "bye")
        assert (await closeOf(client))[0] == 1000
    await eventually(lambda: (lbws.relay.clients, member.active) == (0, 0))
    assert lbws.relay.tunnels == set()


@pytest_twisted.ensureDeferred
async def test_order_kept_nothing_lost_or_duplicated(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    client = await harness.client(lbws.url)
    sent = []
    for i in range(2000):
        isBinary = i % 3 == 0
        payload = (b"%d:" % i) * (i % 50 + 1)
        sent.append((payload, isBinary))
        client.sendMessage(payload, isBinary)
    received = [await client.messages.get() for _ in sent]
    assert received == sent
    # Large messages, and one fragmented by the client, arrive whole.
    big = bytes(range(256)) * 4096
    assert await roundTrip(client, big, True) == (big, True)
    client.beginMessage(isBinary=True)
    for part in (b"ab", b"cd", b"ef"):
        client.sendMessageFrame(part)
    client.endMessage()
    assert await client.messages.get() == (b"abcdef", True)
    assert lbws.pool["a"].messagesIn == 2002
    assert lbws.pool["a"].messagesOut == 2002


@pytest_twisted.ensureDeferred
async def test_node_ws_backend_like_the_seed(harness, nodeBackend):
    lbws = await harness.lbws([("node", nodeBackend.url)])
    client = await harness.client(lbws.url)
    for i in range(100):
        assert await roundTrip(client, b"m%d" % i, bool(i % 2)) == (b"m%d" % i, bool(i % 2))
    client.sendClose(1000, "done")
    assert await closeOf(client) == (1000, "done")


@pytest_twisted.ensureDeferred
async def test_path_and_query_forwarded_under_backend_prefix(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url + "/app")])
    client = await harness.client(lbws.url, path="/chat?room=1&x=%20y")
    payload, _ = await roundTrip(client, b"__request__")
    request = json.loads(payload)
    assert request["raw"].startswith("GET /app/chat?room=1&x=%20y HTTP/1.1\r\n")


@pytest_twisted.ensureDeferred
async def test_backend_chooses_the_subprotocol(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    client = await harness.client(lbws.url, protocols=["v1.chat", "v2.chat"])
    assert client.websocket_protocol_in_use == "v2.chat"
    payload, _ = await roundTrip(client, b"__request__")
    assert json.loads(payload)["protocols"] == ["v1.chat", "v2.chat"]
    plain = await harness.client(lbws.url)
    assert plain.websocket_protocol_in_use is None


@pytest_twisted.ensureDeferred
async def test_end_to_end_headers_pass_and_forwarded_headers_added(harness):
    backend = await harness.backend(responseHeaders={"Set-Cookie": "session=abc; Path=/"})
    lbws = await harness.lbws([("a", backend.url)])
    client = await harness.client(
        lbws.url,
        headers={
            "Cookie": "a=1; b=2",
            "Authorization": "Bearer t0ken",
            "Origin": "https://app.example",
            "X-Custom": "yes",
            "X-Forwarded-For": "203.0.113.7",
        },
        useragent="test-agent/1.0",
    )
    payload, _ = await roundTrip(client, b"__request__")
    headers = json.loads(payload)["headers"]
    assert headers["cookie"] == "a=1; b=2"
    assert headers["authorization"] == "Bearer t0ken"
    assert headers["origin"] == "https://app.example"
    assert headers["user-agent"] == "test-agent/1.0"
    assert headers["x-custom"] == "yes"
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-real-ip"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == lbws.url.split("//")[1]
    # The backend's cookie reaches the client.
    assert client.response.headers["set-cookie"] == "session=abc; Path=/"


@pytest_twisted.ensureDeferred
async def test_client_close_code_and_reason_reach_backend(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    client = await harness.client(lbws.url)
    await roundTrip(client, b"x")
    client.sendClose(4001, "client says bye")
    # The backend's answer (Autobahn answers 1000 without a reason) comes
    # back as it was sent.
    assert await closeOf(client) == (1000, None)
    await eventually(lambda: backend.closes)
    assert backend.closes[0][1:] == (4001, "client says bye")
    await eventually(lambda: not lbws.relay.tunnels)
    assert lbws.counters.closes[("client", 4001)] == 1


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1008, 1011, 3000, 4999])
@pytest_twisted.ensureDeferred
async def test_backend_close_code_and_reason_reach_client(harness, code):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    client = await harness.client(lbws.url)
    # Autobahn's sendClose allows 1000 and 3000-4999; the others are sent
    # by the backend at frame level.
    if code == 1000 or code >= 3000:
        client.sendMessage(b"__close %d server reason" % code)
    else:
        await roundTrip(client, b"x")
        backend.connections[0].sendCloseFrame(code, b"server reason")
    assert await closeOf(client) == (code, "server reason")
    await eventually(lambda: not lbws.relay.tunnels)
    assert lbws.counters.closes[("backend", code)] == 1


@pytest_twisted.ensureDeferred
async def test_backend_lost_gives_1012(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    client = await harness.client(lbws.url)
    other = await harness.client(lbws.url)
    await roundTrip(client, b"x")
    client.sendMessage(b"__drop__")
    assert await closeOf(client) == (1012, "backend connection lost")
    # The other client is not affected.
    assert await roundTrip(other, b"still here") == (b"still here", False)


@pytest_twisted.ensureDeferred
async def test_backend_that_never_answered_gives_1012(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    raw = await wire.rawOpen(lbws.url)
    backend.connections[0].transport.abortConnection()
    close = await raw.closeFrame()
    assert close.closeCode == 1012
    assert close.payload[2:] == b"backend never answered"
    raw.sendClose(1012)
    await raw.closed


@pytest_twisted.ensureDeferred
async def test_stopping_lbws_gives_clients_1001(harness):
    backend = await harness.backend()
    # The closes spread over 1 s (test_drains measures the spread).
    lbws = await harness.lbws([("a", backend.url)], lbws="close_spread = 1")
    clients = [await harness.client(lbws.url) for _ in range(3)]
    await roundTrip(clients[0], b"x")
    await lbws.stopService()
    for client in clients:
        code, _ = await closeOf(client)
        assert code == 1001
    await eventually(lambda: len(backend.closes) == 3)
    assert {close[1] for close in backend.closes} == {1001}


async def refusal(url, **kwargs):
    with pytest.raises(HandshakeFailed) as raised:
        await connect(url, **kwargs)
    return raised.value


@pytest_twisted.ensureDeferred
async def test_no_backend_up_gives_503(harness):
    """
    503 when no backend can take a client: every one drained (or removed).
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    lbws.pool["a"].admin.drain()
    failed = await refusal(lbws.url)
    assert failed.status == 503
    assert lbws.counters.handshakes["no_backend"] == 1


@pytest_twisted.ensureDeferred
async def test_with_no_backend_up_a_real_connect_is_tried_and_marks_it_up(harness):
    """
    A backend marked down (its checks failed, it restarted) serves the
    next client when none of the route is up, and that first success
    marks it up at once, not rise x interval later.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], health="interval = 3600\nrise = 5")
    setHealthy(lbws.pool["a"], False)
    client = await harness.client(lbws.url)
    client.sendMessage(b"back")
    assert await client.messages.get() == (b"back", False)
    assert lbws.pool["a"].state == "up"


@pytest_twisted.ensureDeferred
async def test_every_try_failed_gives_502_and_marks_backends_down(harness):
    dead = [(name, harness.deadUrl()) for name in "ab"]
    lbws = await harness.lbws(dead, health="fall = 1")
    start = reactor.seconds()
    failed = await refusal(lbws.url)
    assert failed.status == 502
    assert reactor.seconds() - start < 5
    assert {m.state for m in lbws.pool} == {"down"}
    # Nothing is up now: the next client's connects are tried all the same
    # (a real connect is the best probe), and fail as fast.
    start = reactor.seconds()
    assert (await refusal(lbws.url)).status == 502
    assert reactor.seconds() - start < 5


@pytest_twisted.ensureDeferred
async def test_retry_reaches_a_live_backend(harness):
    live = await harness.backend("live")
    lbws = await harness.lbws(
        [("dead", harness.deadUrl()), ("live", live.url)], lbws="balance = round_robin"
    )
    for _ in range(4):
        client = await harness.client(lbws.url)
        assert await roundTrip(client, b"ok") == (b"ok", False)
    assert lbws.pool["live"].total == 4
    assert lbws.pool["dead"].failed >= 1


@pytest_twisted.ensureDeferred
async def test_backend_4xx_is_passed_to_client_without_retry(harness):
    refusing = await harness.backend("refusing", refuseWith=(403, "Forbidden: no token"))
    lbws = await harness.lbws([("a", refusing.url)])
    failed = await refusal(lbws.url)
    assert failed.status == 403
    assert lbws.pool["a"].state == "up"
    assert lbws.counters.handshakes["backend_refused"] == 1


@pytest_twisted.ensureDeferred
async def test_backend_handshake_timeout_then_retry(harness):
    port = await harness.listen(silentFactory())
    live = await harness.backend("live")
    lbws = await harness.lbws(
        [("silent", f"ws://127.0.0.1:{port.getHost().port}"), ("live", live.url)],
        lbws="balance = round_robin\nhandshake_timeout = 0.5",
    )
    start = reactor.seconds()
    first = await harness.client(lbws.url)
    second = await harness.client(lbws.url)
    assert await roundTrip(first, b"a") == (b"a", False)
    assert await roundTrip(second, b"b") == (b"b", False)
    assert reactor.seconds() - start < 3
    assert "timed out" in lbws.pool["silent"].lastError


@pytest_twisted.ensureDeferred
async def test_max_connections_gives_503(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="max_connections = 2")
    first = await harness.client(lbws.url)
    await harness.client(lbws.url)
    assert (await refusal(lbws.url)).status == 503
    first.sendClose(1000)
    await closeOf(first)
    await eventually(lambda: lbws.relay.clients == 1)
    await harness.client(lbws.url)


@pytest_twisted.ensureDeferred
async def test_oversize_message_from_client_gives_1009_and_others_go_on(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="max_message_size = 1000")
    client = await harness.client(lbws.url)
    other = await harness.client(lbws.url)
    assert await roundTrip(client, b"x" * 1000) == (b"x" * 1000, False)
    client.sendMessage(b"y" * 1001)
    code, _ = await closeOf(client)
    assert code == 1009
    assert await roundTrip(other, b"fine") == (b"fine", False)


@pytest_twisted.ensureDeferred
async def test_oversize_message_from_backend_closes_backend_with_1009(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="max_message_size = 1000")
    client = await harness.client(lbws.url)
    await roundTrip(client, b"x")
    backend.connections[0].sendMessage(b"z" * 5000, True)
    code, _ = await closeOf(client)
    assert code == 1012
    await eventually(lambda: backend.closes)
    # The backend got its close frame and answered it (a clean close).
    assert backend.closes[0][:2] == (True, 1009)


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_gets_1007_from_backend(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    client = await harness.client(lbws.url)
    client.sendMessage(b"\xff\xfe bad", isBinary=False)
    code, _ = await closeOf(client)
    assert code == 1007


@pytest.mark.parametrize(
    "bad, code",
    [
        (wire.frame(OP_TEXT, b"rsv", rsv=0x40), 1002),  # reserved bit
        (wire.frame(3, b"op"), 1002),  # reserved opcode
        (wire.frame(OP_PING, b"frag", fin=False), 1002),  # fragmented ping
        (wire.frame(OP_TEXT, b"abc", masked=False), 1002),  # unmasked client frame
        (wire.frameHeader(OP_BINARY, 1 << 30), 1009),  # 1 GiB
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_frames_get_their_close_code_after_earlier_replies(harness, bad, code):
    """
    The echo of what came before the bad frame arrives, then the close;
    nothing after the bad frame is relayed. lbws reads on until the
    client's answer (here behind a frame it sent after the bad one), then
    ends the connection with a FIN. Behind the 1 GiB header nothing can
    be told apart: that client ends the connection itself.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="max_message_size = 1048576")
    other = await harness.client(lbws.url)
    raw = await wire.rawOpen(lbws.url)
    raw.send(wire.frame(OP_TEXT, b"before") + bad + wire.frame(OP_TEXT, b"after"))
    echo = await raw.nextFrame()
    assert (echo.opcode, echo.payload) == (OP_TEXT, b"before")
    assert (await raw.nextFrame()).closeCode == code
    if code == 1009:
        raw.transport.loseConnection()
    else:
        raw.sendClose(code)
    received = await raw.closed.addTimeout(2, reactor)
    assert raw.lostReason.check(ConnectionDone)
    assert b"after" not in received
    assert await roundTrip(other, b"unaffected") == (b"unaffected", False)


@pytest_twisted.ensureDeferred
async def test_not_a_websocket_handshake_is_refused(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="http = refuse")
    raw = await wire.rawConnect(lbws.url)
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    received = await raw.closed
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in head + b"\r\n"
    assert b"\r\nConnection: Upgrade\r\n" in head + b"\r\n"
    assert body == b"426 Upgrade Required: this service speaks WebSocket only\n"
    junk = await wire.rawConnect(lbws.url)
    junk.send(b"\x00\x01garbage\r\n\r\n")
    assert (await junk.closed).startswith(b"HTTP/1.1 4")
    assert backend.connections == []


@pytest_twisted.ensureDeferred
async def test_slow_client_handshake_times_out_with_408(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="handshake_timeout = 0.3")
    raw = await wire.rawConnect(lbws.url)
    raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
    received = await raw.closed
    assert received.startswith(b"HTTP/1.1 408")


@pytest_twisted.ensureDeferred
async def test_pings_reach_clients_and_silent_clients_are_dropped(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0.2")
    client = await harness.client(lbws.url)
    pings = []
    client.onPing = lambda payload: (pings.append(payload), client.sendPong(payload))
    await eventually(lambda: len(pings) >= 2)
    assert await roundTrip(client, b"alive") == (b"alive", False)
    # Pongs to lbws's own pings are not passed to the backend.
    assert all(p.startswith(b"lbws-") for p in pings)
    raw = await wire.rawOpen(lbws.url)
    assert (await raw.nextFrame()).opcode == OP_PING
    await raw.closed  # it never answers the ping, so lbws drops it
    await eventually(lambda: len(backend.closes) == 1)
    assert backend.closes[0][1] == 1001


@pytest_twisted.ensureDeferred
async def test_idle_timeout_closes_both_sides_with_1001(harness):
    # A timing promise, so real time: messages 0.2 s apart keep a
    # connection with idle_timeout = 0.6 open for longer than 0.6 s (each
    # gap leaves 0.4 s of margin for a loaded machine), and the close comes
    # no earlier than 0.6 s after the last message.
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="idle_timeout = 0.6")
    client = await harness.client(lbws.url)
    opened = reactor.seconds()
    for _ in range(5):
        await deferLater(0.2)
        await roundTrip(client, b"keep me")
    last = reactor.seconds()
    assert last - opened > 0.6
    code, reason = await closeOf(client)
    assert (code, reason) == (1001, "idle timeout")
    assert reactor.seconds() - last >= 0.6 - 0.01  # the reactor's timer granularity
    await eventually(lambda: backend.closes)
    assert backend.closes[0][1] == 1001


@pytest_twisted.ensureDeferred
async def test_balancing_spreads_by_weight(harness):
    a = await harness.backend("a")
    b = await harness.backend("b")
    lbws = await harness.lbws(
        [("a", a.url, "weight = 3"), ("b", b.url)], lbws="balance = round_robin"
    )
    for _ in range(8):
        await harness.client(lbws.url)
    assert (len(a.connections), len(b.connections)) == (6, 2)
    least = await harness.lbws([("a", a.url), ("b", b.url)], lbws="balance = least_conn")
    clients = [await harness.client(least.url) for _ in range(4)]
    assert (least.pool["a"].active, least.pool["b"].active) == (2, 2)
    for client in clients[:2]:
        client.sendClose(1000)
        await closeOf(client)
    await eventually(lambda: least.pool["a"].active + least.pool["b"].active == 2)
    await harness.client(least.url)
    await harness.client(least.url)
    assert (least.pool["a"].active, least.pool["b"].active) == (2, 2)


@pytest_twisted.ensureDeferred
async def test_hash_balancing_keeps_a_key_on_one_backend(harness):
    a = await harness.backend("a")
    b = await harness.backend("b")
    lbws = await harness.lbws(
        [("a", a.url), ("b", b.url)], lbws="balance = hash\nhash_key = header:X-User-Id"
    )
    served = {}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"):
        for _ in range(3):
            before = (len(a.connections), len(b.connections))
            await harness.client(lbws.url, headers={"X-User-Id": user})
            # The backend that got the new connection, and the key it saw.
            grown = [
                backend
                for backend, count in zip((a, b), before)
                if len(backend.connections) > count
            ]
            assert len(grown) == 1
            (backend,) = grown
            assert backend.connections[-1].request.headers["x-user-id"] == user
            served.setdefault(user, set()).add(backend.name)
    assert all(len(names) == 1 for names in served.values()), served
    # These keys hash to both backends, so a balancer that sent every
    # client to one backend would not pass either.
    assert set().union(*served.values()) == {"a", "b"}


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_connect_cancels_backend_attempt(harness):
    port = await harness.listen(silentFactory())
    lbws = await harness.lbws([("silent", f"ws://127.0.0.1:{port.getHost().port}")])
    raw = await wire.rawConnect(lbws.url)
    raw.send(handshakeRequest())
    await eventually(lambda: lbws.pool["silent"].active == 1)
    raw.transport.loseConnection()
    await raw.closed
    await eventually(lambda: lbws.pool["silent"].active == 0 and lbws.relay.clients == 0)
    assert lbws.pool["silent"].state == "up"


@pytest_twisted.ensureDeferred
async def test_frames_sent_ahead_while_the_backend_opens_are_not_read_without_bound(harness):
    port = await harness.listen(silentFactory())
    lbws = await harness.lbws([("silent", f"ws://127.0.0.1:{port.getHost().port}")])
    raw = await wire.rawConnect(lbws.url)
    frame = bytes([0x82, 0xFE, 0xFF, 0xFF]) + b"\x00" * 4 + b"\x00" * 0xFFFF
    raw.send(handshakeRequest() + frame * 64)  # 4 MiB ahead
    await eventually(lambda: lbws.relay.opening)
    (frontend,) = lbws.relay.opening
    # lbws stops reading once it holds more than a request head's worth.
    await eventually(lambda: frontend._paused)
    held = len(frontend.data)
    assert held <= 2 * 64 * 1024 + 65536
    assert raw.transport.dataBuffer or raw.transport._tempDataLen  # still waiting to go
    raw.transport.abortConnection()
    await raw.closed


@pytest_twisted.ensureDeferred
async def test_pipelined_frames_behind_handshake_are_relayed(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    raw = await wire.rawConnect(lbws.url)
    raw.send(handshakeRequest() + wire.frame(OP_TEXT, b"early"))
    assert (await raw.nextFrame()).payload == b"early"
    raw.transport.loseConnection()
    await raw.closed
    await eventually(lambda: backend.closes)
    assert backend.closes[0][1] == 1001


@pytest.mark.parametrize("close", [False, True])
@pytest_twisted.ensureDeferred
async def test_frames_right_behind_the_backends_101_reach_the_client(harness, close):
    """
    What a backend sends in the same packet as its 101 (messages, even its
    close) is read by Autobahn with the answer and reaches the client
    once the legs have taken over, before anything read after, as the
    client's own frames sent with its request reach the backend; both
    counts end.
    """
    backend = await wire.rawBackend(harness)
    backend.behind101 = wire.frame(OP_TEXT, b"first", masked=False) + wire.frame(
        OP_BINARY, b"second", masked=False
    )
    if close:
        backend.behind101 += wire.frame(OP_CLOSE, closePayload(4001, "done"), masked=False)
    lbws = await harness.lbws([("raw", backend.url)], health="interval = 60")
    raw = await wire.rawConnect(lbws.url)
    raw.send(handshakeRequest() + wire.frame(OP_TEXT, b"early"))
    assert (await raw.response.addTimeout(10, reactor)).startswith("HTTP/1.1 101 ")
    assert [(await raw.nextFrame()).payload for _ in range(2)] == [b"first", b"second"]
    if close:
        assert (await raw.nextFrame()).closeCode == 4001
        raw.sendClose(4001)
    else:
        raw.sendClose(1000)
        assert (await raw.closeFrame()).closeCode == 1000
    await raw.closed.addTimeout(10, reactor)
    (connection,) = [c for c in backend.connections if c.head]
    frames, _ = wire.parseFrames(connection.received[len(connection.head) :])
    assert [f.payload for f in frames][:1] == [b"early"]
    await eventually(
        lambda: (lbws.relay.clients, lbws.pool["raw"].active, lbws.relay.tunnels) == (0, 0, set())
    )


@pytest_twisted.ensureDeferred
async def test_ping_from_client_is_answered_by_backend(harness):
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)])
    client = await harness.client(lbws.url)
    pong = defer.Deferred()
    client.onPong = pong.callback
    client.sendPing(b"are you there")
    assert await pong == b"are you there"
