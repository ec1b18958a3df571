"""
lbws's own closes reach a client that is still sending (issue 27), over
real sockets, many runs per case.

Each close lbws starts (1009 for size and fragments, 1008 for the message
rate and pings, 1002 and 1007 for protocol errors, 1012 for a backend lost
and for rebalancing, 1001 for a stop and the idle timeout) is set off while
the client keeps sending: it sent its offence and 300 small messages at
once, or it streams when lbws decides to close it. The close frame must
reach the client in every run, with two client stacks (Python `websockets`
and node `ws`), as it does directly from a node `ws` server with the same
limit. RUNS runs per case by default, SLOW_RUNS in the slow test.

The unit tests of the handshake itself are in test_tunnel.py.
"""

import asyncio
import json
import struct
import subprocess
from collections import Counter

import pytest
import pytest_twisted
from twisted.internet import threads

from lbws.protocol.frames import OP_CLOSE
from tests import wire
from tests.support import NODE_DIR, NodeBackend, eventually, nodeAvailable

RUNS = 10
SLOW_RUNS = 50
# One pytest parameter per number of runs: the slow one has its own limit.
runCounts = pytest.mark.parametrize(
    "runs",
    [RUNS, pytest.param(SLOW_RUNS, marks=[pytest.mark.slow, pytest.mark.timeout(900)])],
)


# The Python `websockets` client, in a thread with its own event loop.


async def smallOnes(ws, count=300):
    for i in range(count):
        await ws.send(b"m%d" % i)


async def streamMessages(ws):
    """
    Messages in batches, letting the event loop read between them, until
    the connection closes (send then raises ConnectionClosed).
    """
    i = 0
    while True:
        for _ in range(20):
            await ws.send(b"s%d" % i)
            i += 1
        await asyncio.sleep(0)


async def tooManyPings(ws):
    for i in range(300):
        await ws.ping(b"p%d" % i)


async def badFrame(ws):
    # Whole frames written to the socket go out between the library's own.
    ws.transport.write(wire.frame(3, b"bad"))
    await smallOnes(ws)


async def badCloseReason(ws):
    await smallOnes(ws)
    ws.transport.write(wire.frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff\xfe"))


async def oversize(ws):
    await ws.send(b"x" * 2000)
    await smallOnes(ws)


async def tooManyFragments(ws):
    await ws.send([b"f"] * 200)
    await smallOnes(ws)


async def backendDrop(ws):
    await ws.send("__drop__")
    await smallOnes(ws)


async def idleThenBurst(ws, pause):
    """
    Idle for about idle_timeout, then 300 messages at once: lbws's close
    comes before, during or after the burst (then a second later).
    """
    await asyncio.sleep(pause)
    await smallOnes(ws)


async def once(url, offence):
    """
    One run: open, offend (keep sending up to the close), read to the end.

    @return: C{(code, reason)} of the close frame the client got, or
        C{(1006, "")} if none came.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    async with connect(
        url, proxy=None, compression=None, max_size=None, ping_interval=None, close_timeout=10
    ) as ws:
        reader = asyncio.ensure_future(readAll(ws))
        try:
            await offence(ws)
        except ConnectionClosed:
            pass
        await reader
    received = ws.protocol.close_rcvd
    return (1006, "") if received is None else (received.code, received.reason)


async def readAll(ws):
    from websockets.exceptions import ConnectionClosed

    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass


def pythonRuns(url, offence, runs, together=False):
    """
    C{runs} runs one after the other (or all at once), in a thread.

    @return: a Deferred firing with a Counter of what the client got.
    """

    async def all():
        if together:
            return Counter(await asyncio.gather(*[once(url, offence(i)) for i in range(runs)]))
        return Counter([await asyncio.wait_for(once(url, offence), 30) for _ in range(runs)])

    return threads.deferToThread(asyncio.run, all())


# The node `ws` client (tests/node/close-client.js), as a process.


def nodeRuns(url, case, runs):
    """
    @return: a Deferred firing with a Counter of what the client got.
    """
    if not nodeAvailable():
        pytest.fail("node and tests/node/node_modules are needed: run `make test`")

    script = str(NODE_DIR / "close-client.js")

    def run():
        done = subprocess.run(
            ["node", script, "--url", url, "--case", case, "--runs", str(runs)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        results = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(results) == runs, done.stdout
        return Counter((r["code"], r["reason"]) for r in results)

    return threads.deferToThread(run)


# Cases where the client's own sending makes lbws close it: (lbws settings,
# the Python client's offence, the node client's case, the close).
OFFENCES = {
    "1009 max_message_size": (
        "max_message_size = 1000",
        oversize,
        "size",
        (1009, "message longer than 1000 bytes"),
    ),
    "1009 max_frames_per_message": (
        "max_frames_per_message = 100",
        tooManyFragments,
        "frames",
        (1009, "message of more than 100 frames"),
    ),
    "1008 max_message_rate": (
        "max_message_rate = 50",
        lambda ws: smallOnes(ws, 500),
        "rate",
        (1008, "more than 50 messages a second"),
    ),
    "1008 pings": ("", tooManyPings, "pings", (1008, "more than 100 pings and pongs a second")),
    "1002 bad frame": ("", badFrame, "badframe", (1002, "reserved opcode 3")),
    "1007 close reason not UTF-8": ("", badCloseReason, None, (1007, "close reason is not UTF-8")),
    # The backend drops its connection before sending a message: the
    # reason tells that apart from a backend lost later (the test below).
    "1012 backend lost": ("", backendDrop, "drop", (1012, "backend never answered")),
}


@runCounts
@pytest.mark.parametrize("name", OFFENCES)
@pytest_twisted.ensureDeferred
async def test_close_reaches_a_client_still_sending(harness, name, runs):
    """
    The client sends its offence and 300 messages at once, then reads: it
    gets the close in every run, with each client stack. The backend,
    closed with 1001 when its client broke the protocol, got its close
    frame too and answered it (Autobahn counts that close clean).
    """
    settings, offence, nodeCase, close = OFFENCES[name]
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws=f"ping_interval = 0\n{settings}")
    assert await pythonRuns(lbws.url, offence, runs) == Counter({close: runs})
    if nodeCase is not None:
        assert await nodeRuns(lbws.url, nodeCase, runs) == Counter({close: runs})
    if close[0] != 1012:
        await eventually(lambda: len(backend.closes) == runs * (1 if nodeCase is None else 2))
        assert {(clean, code) for clean, code, _ in backend.closes} == {(True, 1001)}


@runCounts
@pytest_twisted.ensureDeferred
async def test_oversize_message_through_lbws_as_directly(harness, runs):
    """
    The same oversize message and 300 behind it, directly to a node `ws`
    server with maxPayload 1000 and through lbws with max_message_size =
    1000: 1009 every time either way, with both client stacks.
    """
    direct = NodeBackend("--max-payload", "1000")
    harness.atEnd(direct.stop)
    behind = await harness.backend()
    lbws = await harness.lbws([("a", behind.url)], lbws="ping_interval = 0\nmax_message_size = 1000")
    for url in (direct.url, lbws.url):
        python = await pythonRuns(url, oversize, runs)
        node = await nodeRuns(url, "size", runs)
        assert [code for code, _ in python.elements()] == [1009] * runs, (url, python)
        assert [code for code, _ in node.elements()] == [1009] * runs, (url, node)


def movedWhileStreaming(lbws, close, answered=0):
    """
    Close C{close(tunnel)} the first open tunnel whose client has sent 100
    messages (the client is streaming) and whose backend has sent
    C{answered}.
    """

    def ready():
        for tunnel in lbws.relay.tunnels:
            if (
                tunnel.movable
                and tunnel.client.messages >= 100
                and tunnel.backend.messages >= answered
            ):
                close(tunnel)
                return True
        return False

    return eventually(ready)


@runCounts
@pytest_twisted.ensureDeferred
async def test_rebalancing_close_reaches_a_streaming_client(harness, runs):
    """
    Gradual rebalancing moves a client in the middle of its stream: 1012
    "rebalancing" every time, with each client stack.
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0")
    for clientRuns in (
        lambda: pythonRuns(lbws.url, streamMessages, runs),
        lambda: nodeRuns(lbws.url, "stream", runs),
    ):
        got = clientRuns()
        for _ in range(runs):
            await movedWhileStreaming(lbws, lbws.rebalancer.move)
        assert await got == Counter({(1012, "rebalancing"): runs})


@runCounts
@pytest_twisted.ensureDeferred
async def test_stop_close_reaches_a_streaming_client(harness, runs):
    """
    lbws stops while its client streams: 1001 "lbws is stopping" every
    time, with each client stack (one lbws per run).
    """
    backend = await harness.backend()
    seen = Counter()
    for i in range(runs):
        lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0")
        if i % 2:
            got = nodeRuns(lbws.url, "stream", 1)
        else:
            got = pythonRuns(lbws.url, streamMessages, 1)
        await movedWhileStreaming(lbws, lambda tunnel: None)
        await lbws.stopService()
        seen += await got
    assert seen == Counter({(1001, "lbws is stopping"): runs})


@runCounts
@pytest_twisted.ensureDeferred
async def test_idle_close_reaches_a_client_starting_to_send(harness, runs):
    """
    idle_timeout = 1, and clients (all at once) that start sending 300
    messages after a pause of 0.8 to 1.2 s: whether lbws's close comes
    before, during or after their burst, they get 1001 "idle timeout".
    """
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0\nidle_timeout = 1")

    def offence(i):
        return lambda ws: idleThenBurst(ws, 0.8 + 0.4 * i / runs)

    got = await pythonRuns(lbws.url, offence, runs, together=True)
    assert got == Counter({(1001, "idle timeout"): runs})


async def flood(ws):
    await ws.send("__flood__")


async def floodCloses(url):
    """
    The close codes the node echo backend's flooding connections got.
    """
    from websockets.asyncio.client import connect

    async with connect(url, proxy=None, compression=None) as ws:
        await ws.send("__closes__")
        return json.loads(await ws.recv())


@runCounts
@pytest_twisted.ensureDeferred
async def test_backend_over_the_limit_gets_its_close_while_sending(harness, runs):
    """
    The backend leg: a node `ws` backend that sends an oversize message and
    keeps streaming behind it gets 1009 in every run (its close event has
    the code of the close frame it got); its client gets 1012 with the
    reason, with each client stack.
    """
    backend = NodeBackend()
    harness.atEnd(backend.stop)
    lbws = await harness.lbws([("a", backend.url)], lbws="ping_interval = 0\nmax_message_size = 1000")
    close = (1012, "backend error: message longer than 1000 bytes")
    assert await pythonRuns(lbws.url, flood, runs) == Counter({close: runs})
    assert await nodeRuns(lbws.url, "flood", runs) == Counter({close: runs})
    closes = lambda: threads.deferToThread(asyncio.run, floodCloses(backend.url))
    await eventually(lambda: closes().addCallback(lambda got: len(got) == 2 * runs))
    assert await closes() == [1009] * (2 * runs)


@pytest_twisted.ensureDeferred
async def test_backend_killed_while_its_client_streams(harness):
    """
    A node `ws` backend process killed while its client streams: the
    client gets 1012 "backend connection lost", which client libraries
    retry.
    """
    doomed = NodeBackend()
    harness.atEnd(doomed.stop)
    lbws = await harness.lbws([("a", doomed.url)], lbws="ping_interval = 0")
    got = pythonRuns(lbws.url, streamMessages, 1)
    # Once the backend has answered: a backend that never did is "backend
    # never answered".
    await movedWhileStreaming(lbws, lambda tunnel: doomed.process.kill(), answered=1)
    assert await got == Counter({(1012, "backend connection lost"): 1})
