"""
Health checks: the loop logic on a Clock with scripted probes, each probe
against real sockets, and end to end with lbws in front of node `ws`
backend processes that are killed and started again.
"""

import pytest
import pytest_twisted
import trustme
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.util import Redirect

from lbws.backends import health
from lbws.config import parseConfig
from lbws.backends.health import HealthChecker
from lbws.backends.pool import Member, Pool
from tests.support import (
    EchoFactory,
    Harness,
    NodeOnSocket,
    configText,
    eventually,
    listeningSocket,
    nodeAvailable,
    reservedPort,
    setHealthy,
    tlsServerOptions,
)


def settingsFor(backends=(("a", "ws://127.0.0.1:1"),), health="", **kwargs):
    return parseConfig(configText(list(backends), health=health, **kwargs), "test.ini")


# The loop, on a Clock, with probes the test answers.


class ScriptedProbe:
    """
    A probe whose every call returns a Deferred the test fires; cancelling
    it is recorded.
    """

    def __init__(self):
        self.calls = []
        self.cancelled = []

    def __call__(self, reactor, backend, healthSettings):
        d = defer.Deferred(lambda d: self.cancelled.append(backend.name))
        self.calls.append((backend.name, d))
        return d

    def last(self, name="a"):
        return [d for n, d in self.calls if n == name][-1]

    def count(self, name="a"):
        return len([d for n, d in self.calls if n == name])


class Loop:
    def __init__(self, health="", backends=(("a", "ws://127.0.0.1:1"),), probe=None):
        self.clock = Clock()
        self.settings = settingsFor(backends, health=health)
        self.pool = Pool(self.settings)
        self.probe = probe if probe is not None else ScriptedProbe()
        self.checker = HealthChecker(
            self.clock, self.pool, self.settings.health, probes={"tcp": self.probe}
        )

    def start(self):
        self.checker.startService()
        return self

    def member(self, name="a"):
        return self.pool[name]


def test_members_start_up_and_are_first_checked_after_one_interval():
    loop = Loop("interval = 2").start()
    assert loop.member().state == "up"
    assert loop.probe.count() == 0
    loop.clock.advance(1.9)
    assert loop.probe.count() == 0
    loop.clock.advance(0.1)
    assert loop.probe.count() == 1


def test_fall_consecutive_failures_mark_a_backend_down():
    loop = Loop("interval = 2\nfall = 3").start()
    member = loop.member()
    for i in range(2):
        loop.clock.advance(2)
        loop.probe.last().errback(ConnectionRefusedError("nope"))
        assert member.state == "up"
    # A success in between starts the count again.
    loop.clock.advance(2)
    loop.probe.last().callback(0.001)
    for i in range(2):
        loop.clock.advance(2)
        loop.probe.last().errback(ConnectionRefusedError("nope"))
    assert member.state == "up"
    loop.clock.advance(2)
    loop.probe.last().errback(ConnectionRefusedError("nope"))
    assert member.state == "down"
    assert member.changed == 12
    assert member.lastCheck == 12
    assert "Connection was refused" in member.lastError
    assert member.checks == {"ok": 1, "failed": 5}


def test_rise_consecutive_successes_bring_a_backend_back():
    loop = Loop("interval = 2\nrise = 3")
    member = loop.member()
    setHealthy(member, False)
    loop.start()
    # Not up: checked at once, not one interval later.
    assert loop.probe.count() == 1
    loop.probe.last().callback(0.004)
    loop.clock.advance(2)
    loop.probe.last().callback(0.005)
    assert member.state == "down"
    loop.clock.advance(2)
    loop.probe.last().callback(0.006)
    assert member.state == "up"
    assert member.changed == 4
    assert member.checkRtt == 0.006
    assert member.checks["ok"] == 3


def test_a_probe_that_hangs_is_cancelled_at_timeout_and_counts_as_failure():
    loop = Loop("interval = 2\ntimeout = 0.5\nfall = 1").start()
    member = loop.member()
    loop.clock.advance(2)
    loop.clock.advance(0.49)
    assert loop.probe.cancelled == []
    loop.clock.advance(0.01)
    assert loop.probe.cancelled == ["a"]
    assert member.state == "down"
    assert member.lastError == "check timed out after 0.5s"
    assert member.checks == {"timeout": 1}
    assert member.checkDurations.count == 1
    assert member.checkDurations.sum == pytest.approx(0.5)


def test_a_probe_still_running_when_the_next_is_due_is_not_doubled():
    loop = Loop("interval = 1\ntimeout = 3.5\nfall = 1").start()
    loop.clock.advance(1)
    assert loop.probe.count() == 1
    for _ in range(3):
        loop.clock.advance(1)
        assert loop.probe.count() == 1
    checks = loop.checker._checks[loop.member()]
    assert checks.skipped == 3
    # It times out at 4.5; the next tick (5) probes again.
    loop.clock.advance(0.5)
    assert loop.probe.cancelled == ["a"]
    assert loop.probe.count() == 1
    loop.clock.advance(0.5)
    assert loop.probe.count() == 2


def test_with_timeout_equal_to_interval_every_tick_probes():
    # Each probe times out just as the next is due: that tick counts the
    # timeout and probes again, so a hung backend is down within
    # fall * interval + timeout.
    loop = Loop("interval = 1\ntimeout = 1\nfall = 2").start()
    member = loop.member()
    loop.clock.advance(1)
    loop.clock.advance(1)
    assert loop.probe.count() == 2
    assert member.state == "up"
    loop.clock.advance(1)
    assert loop.probe.count() == 3
    assert member.state == "down"
    assert member.changed == 3
    assert member.checks == {"timeout": 2}
    assert loop.checker._checks[member].skipped == 0


def test_a_slow_answer_within_timeout_is_not_doubled_either():
    loop = Loop("interval = 1\ntimeout = 5").start()
    loop.clock.advance(1)
    loop.clock.advance(1.5)
    assert loop.probe.count() == 1
    loop.probe.last().callback(None)
    # Without an RTT from the probe, the check's duration is the RTT.
    assert loop.member().checkRtt == 1.5
    loop.clock.advance(0.5)
    assert loop.probe.count() == 2


def test_the_loop_survives_probes_that_raise_and_bugs_in_bookkeeping():
    calls = []

    def explodingProbe(reactor, backend, healthSettings):
        calls.append(reactor.seconds())
        raise RuntimeError("probe bug")

    loop = Loop("interval = 1\nfall = 1", probe=explodingProbe).start()
    member = loop.member()
    loop.clock.advance(1)
    # A probe raising is a failed check, like any failure.
    assert member.state == "down"
    assert member.lastError == "probe bug"

    # A bug after the probe (here in recordCheck) is logged, not fatal.
    original = member.recordCheck

    def broken(*args, **kwargs):
        raise ZeroDivisionError("bookkeeping bug")

    member.recordCheck = broken
    with capturedLogs() as events:
        loop.clock.advance(1)
    assert any(
        e.get("log_failure") is not None
        and e["log_failure"].check(ZeroDivisionError)
        for e in events
    )
    member.recordCheck = original

    # So is one in the tick itself (here, no probe by that name).
    loop.checker.probes.clear()
    with capturedLogs() as events:
        loop.clock.advance(1)
    assert any(
        e.get("log_failure") is not None and e["log_failure"].check(KeyError)
        for e in events
    )
    loop.checker.probes["tcp"] = explodingProbe
    loop.clock.advance(1)
    assert calls == [1, 2, 4]
    assert loop.clock.getDelayedCalls()


def test_sync_starts_loops_for_new_members_and_stops_removed_ones():
    loop = Loop(
        "interval = 1\ntimeout = 3",
        backends=[("a", "ws://127.0.0.1:1"), ("b", "ws://127.0.0.1:2")],
    ).start()
    assert loop.checker.checking() == [loop.member("a"), loop.member("b")]
    loop.clock.advance(1)
    inFlight = loop.probe.last("b")
    # A reload adds c (not up until it passes checks) and removes b.
    c = Member(settingsFor([("c", "ws://127.0.0.1:3")]).backend("c"), healthy=False)
    loop.pool.members["c"] = c
    loop.member("b").admin.remove()
    loop.checker.sync()
    assert loop.checker.checking() == [loop.member("a"), c]
    assert loop.probe.cancelled == ["b"]
    assert inFlight.called
    assert loop.probe.count("c") == 1  # at once: it is not up yet
    loop.clock.advance(1)
    assert loop.probe.count("b") == 1
    assert loop.probe.count("c") == 1  # its first probe is still running
    # A member that left the pool altogether stops too.
    del loop.pool.members["a"]
    loop.checker.sync()
    assert loop.checker.checking() == [c]


def test_sync_with_new_health_settings_starts_the_loops_over():
    loop = Loop("interval = 10").start()
    loop.clock.advance(10)
    assert loop.probe.count() == 1
    loop.probe.last().callback(0.001)
    faster = settingsFor(health="interval = 1").health
    loop.checker.sync(faster)
    assert loop.checker.health is faster
    loop.clock.advance(1)
    assert loop.probe.count() == 2


def test_stopping_cancels_probes_and_leaves_no_timer():
    loop = Loop("interval = 1").start()
    loop.clock.advance(1)
    pending = loop.probe.last()
    loop.checker.stopService()
    assert loop.probe.cancelled == ["a"]
    assert pending.called
    assert loop.clock.getDelayedCalls() == []
    assert loop.member().checks == {}


# Each probe against real sockets.


def backendSettings(url, probe="websocket", health="", extra=()):
    settings = settingsFor([("b", url, *extra)], health=health, probe=probe)
    return settings.backend("b"), settings.health


async def outcome(probe, backend, healthSettings):
    """
    Run one probe the way the checker does, bounded by the timeout:
    C{("ok", rtt)} or C{("failed", reason)}.
    """
    d = defer.maybeDeferred(probe, reactor, backend, healthSettings)
    d.addTimeout(healthSettings.timeout, reactor)
    try:
        return ("ok", await d)
    except defer.TimeoutError:
        return ("failed", f"check timed out after {healthSettings.timeout:g}s")
    except Exception:
        return ("failed", health.describe(Failure()))


@pytest.fixture
def deadUrl(harness):
    """
    The URL of a port nothing listens on (L{support.Harness.deadUrl}).
    """
    return harness.deadUrl()


@pytest_twisted.ensureDeferred
async def test_tcp_probe(harness, deadUrl):
    port = await harness.listen(protocol.Factory.forProtocol(protocol.Protocol))
    ok = await outcome(health.probeTcp, *backendSettings(
        f"ws://127.0.0.1:{port.getHost().port}", "tcp"))
    assert ok[0] == "ok" and 0 <= ok[1] < 1
    refused = await outcome(health.probeTcp, *backendSettings(deadUrl, "tcp"))
    assert refused[0] == "failed" and "refused" in refused[1]


class ClosesAfterOpen(WebSocketServerProtocol):
    def onOpen(self):
        self.sendClose(4000, "go away")


@pytest_twisted.ensureDeferred
async def test_websocket_probe_handshakes_pings_and_closes_cleanly(harness):
    backend = EchoFactory()
    port = await harness.listen(backend)
    url = f"ws://127.0.0.1:{port.getHost().port}/app"
    ok = await outcome(health.probeWebsocket, *backendSettings(url, health="path = /health"))
    assert ok[0] == "ok" and 0 <= ok[1] < 1
    # The probe's path is under the backend url's path, as clients' are.
    assert backend.connections[0].request.path == "/app/health"
    assert backend.connections[0].request.headers["user-agent"] == "lbws-health"
    await eventually(lambda: backend.closes)
    assert backend.closes == [(True, 1000, None)]


@pytest_twisted.ensureDeferred
async def test_websocket_probe_offers_and_requires_the_subprotocol(harness):
    chooses = EchoFactory()
    port = await harness.listen(chooses)
    url = f"ws://127.0.0.1:{port.getHost().port}"
    ok = await outcome(health.probeWebsocket, *backendSettings(
        url, health="subprotocol = chat.v2"))
    assert ok[0] == "ok"
    assert chooses.connections[0].request.protocols == ["chat.v2"]

    class NoSubprotocol(EchoFactory):
        def chooseProtocol(self, offered):
            return None

    ignores = NoSubprotocol()
    port = await harness.listen(ignores)
    url = f"ws://127.0.0.1:{port.getHost().port}"
    failed = await outcome(health.probeWebsocket, *backendSettings(
        url, health="subprotocol = chat.v2"))
    assert failed == ("failed", "backend did not accept subprotocol 'chat.v2'")


@pytest_twisted.ensureDeferred
async def test_websocket_probe_failures_say_why(harness, deadUrl):
    refusing = EchoFactory(refuseWith=(403, "Forbidden"))
    port = await harness.listen(refusing)
    failed = await outcome(health.probeWebsocket, *backendSettings(
        f"ws://127.0.0.1:{port.getHost().port}"))
    assert failed == ("failed", "backend answered HTTP 403 Forbidden")

    closing = WebSocketServerFactory(reactor=reactor)
    closing.protocol = ClosesAfterOpen
    port = await harness.listen(closing)
    failed = await outcome(health.probeWebsocket, *backendSettings(
        f"ws://127.0.0.1:{port.getHost().port}"))
    assert failed[0] == "failed" and "4000" in failed[1]

    refused = await outcome(health.probeWebsocket, *backendSettings(deadUrl))
    assert refused[0] == "failed" and "refused" in refused[1]


@pytest_twisted.ensureDeferred
async def test_websocket_probe_of_a_silent_backend_times_out_and_hangs_up(harness):
    silent = await harness.silent()
    failed = await outcome(health.probeWebsocket, *backendSettings(
        silent.url, health="timeout = 0.2"))
    assert failed == ("failed", "check timed out after 0.2s")
    await eventually(lambda: silent.lost)
    assert len(silent.connections) == 1


@pytest_twisted.ensureDeferred
async def test_http_probe(harness, deadUrl):
    class Tree(Resource):
        def getChild(self, path, request):
            return notFound()

    root = Tree()
    app = Tree()
    root.putChild(b"app", app)

    class Answer(Resource):
        isLeaf = True

        def __init__(self, code):
            super().__init__()
            self.code = code
            self.agents = []

        def render_GET(self, request):
            self.agents.append(request.getHeader(b"user-agent"))
            request.setResponseCode(self.code)
            return b"x" * 100000

    ok, broken = Answer(200), Answer(500)
    app.putChild(b"ok", ok)
    app.putChild(b"moved", Redirect(b"/app/ok"))
    app.putChild(b"broken", broken)
    port = await harness.listen(Site(root))
    url = f"ws://127.0.0.1:{port.getHost().port}/app"
    result = await outcome(health.probeHttp, *backendSettings(url, "http", "path = /ok"))
    assert result[0] == "ok" and 0 <= result[1] < 1
    assert ok.agents == [b"lbws-health"]
    result = await outcome(health.probeHttp, *backendSettings(url, "http", "path = /moved"))
    assert result[0] == "ok"
    assert len(ok.agents) == 1  # redirects are not followed
    result = await outcome(health.probeHttp, *backendSettings(url, "http", "path = /broken"))
    assert result == ("failed", "backend answered HTTP 500 Internal Server Error")
    result = await outcome(health.probeHttp, *backendSettings(url, "http", "path = /nothing"))
    assert result == ("failed", "backend answered HTTP 404 Not Found")
    refused = await outcome(health.probeHttp, *backendSettings(deadUrl, "http"))
    assert refused[0] == "failed" and "refused" in refused[1]


@pytest_twisted.ensureDeferred
async def test_wss_probes_verify_the_certificate_like_the_relay(harness, tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    caFile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(caFile))
    otherCaFile = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(otherCaFile))
    serverOptions = tlsServerOptions(cert.private_key_and_cert_chain_pem.bytes())
    backend = EchoFactory()
    port = await harness.listen(
        backend, SSL4ServerEndpoint(reactor, 0, serverOptions, interface="127.0.0.1")
    )
    url = f"wss://127.0.0.1:{port.getHost().port}"
    for probe in ("websocket", "http"):
        trusted = await outcome(
            health.PROBES[probe], *backendSettings(url, probe, extra=[f"ca = {caFile}"])
        )
        assert trusted[0] == "ok", trusted
        untrusted = await outcome(
            health.PROBES[probe],
            *backendSettings(url, probe, extra=[f"ca = {otherCaFile}"]),
        )
        assert untrusted[0] == "failed"
        assert "certificate verify failed" in untrusted[1]
        optOut = await outcome(
            health.PROBES[probe], *backendSettings(url, probe, extra=["verify = false"])
        )
        assert optOut[0] == "ok"
    assert len(backend.connections) == 2  # the websocket probes that were trusted


# End to end: lbws in front of node `ws` processes that die and come back.

HEALTH = """
interval = 0.3
timeout = 0.2
fall = 2
rise = 2
"""
INTERVAL, TIMEOUT = 0.3, 0.2
FALL = RISE = 2
# Time the reactor may take to get to a due call on a busy machine.
SCHEDULING = 0.5


class E2E(Harness):
    def socket(self, sock):
        self.atEnd(sock.close)
        return sock

    async def node(self, sock, prefix):
        node = NodeOnSocket(sock, prefix)
        self.atEnd(node.stop)
        return await node.started()

    echo = Harness.backend


@pytest_twisted.async_yield_fixture
async def e2e():
    if not nodeAvailable():
        pytest.fail("node and tests/node/node_modules are needed: run `make test`")
    e = E2E()
    yield e
    await e.close()


async def echoOf(client, text, timeout=10):
    client.sendMessage(text.encode())
    payload, _ = await client.messages.get().addTimeout(timeout, reactor)
    return payload.decode()


async def checkedOk(member):
    await eventually(lambda: member.checks["ok"] >= 1, timeout=5)


@pytest_twisted.ensureDeferred
async def test_killed_backend_is_ejected_gets_nothing_and_comes_back(e2e):
    holder = e2e.socket(reservedPort())
    port = holder.getsockname()[1]
    sock = listeningSocket(port)
    node = await e2e.node(sock, "a: ")
    sock.close()  # node's copy is now the only one: killing it closes the port
    other = await e2e.echo("b")
    lbws = await e2e.lbws(
        [("a", f"ws://127.0.0.1:{port}"), ("b", other.url)],
        probe="websocket",
        health=HEALTH,
    )
    a = lbws.pool["a"]
    await checkedOk(a)
    assert a.state == "up"

    node.stop()
    killed = reactor.seconds()
    await eventually(lambda: a.state == "down", timeout=5)
    assert a.changed - killed <= FALL * INTERVAL + TIMEOUT + SCHEDULING
    assert "refused" in a.lastError

    # No new connection goes there: none is even tried.
    total, failed = a.total, a.failed
    clients = [await e2e.client(lbws.url) for _ in range(4)]
    for client in clients:
        assert await echoOf(client, "hi") == "hi"  # b echoes without a prefix
    assert (a.total, a.failed) == (total, failed)
    assert lbws.pool["b"].active == 4

    # Started again on the same port, it is back after `rise` checks.
    sock = listeningSocket(port)
    await e2e.node(sock, "a: ")
    sock.close()
    restarted = reactor.seconds()
    await eventually(lambda: a.state == "up", timeout=5)
    assert a.changed - restarted <= RISE * INTERVAL + SCHEDULING
    # b holds 4 connections, a none: least_conn sends the next one to a.
    client = await e2e.client(lbws.url)
    assert await echoOf(client, "hi") == "a: hi"
    assert a.total == total + 1


@pytest_twisted.ensureDeferred
async def test_hung_backend_times_out_of_rotation_and_back(e2e):
    # The test keeps the listening socket: with node killed, connections
    # are accepted by the kernel and never answered.
    sock = e2e.socket(listeningSocket())
    port = sock.getsockname()[1]
    node = await e2e.node(sock, "a: ")
    lbws = await e2e.lbws(
        [("a", f"ws://127.0.0.1:{port}")], probe="websocket", health=HEALTH
    )
    a = lbws.pool["a"]
    await checkedOk(a)

    node.stop()
    hung = reactor.seconds()
    await eventually(lambda: a.state == "down", timeout=5)
    assert a.changed - hung <= FALL * INTERVAL + TIMEOUT + SCHEDULING
    assert a.lastError == f"check timed out after {TIMEOUT:g}s"
    assert a.checks["timeout"] >= FALL

    await e2e.node(sock, "a: ")
    back = reactor.seconds()
    await eventually(lambda: a.state == "up", timeout=5)
    assert a.changed - back <= RISE * INTERVAL + TIMEOUT + SCHEDULING
    client = await e2e.client(lbws.url)
    assert await echoOf(client, "hi") == "a: hi"


@pytest_twisted.ensureDeferred
async def test_failed_real_connects_eject_before_the_next_probe(e2e, deadUrl):
    live = await e2e.echo("live")
    lbws = await e2e.lbws(
        [("dead", deadUrl), ("live", live.url)],
        lbws="balance = round_robin",
        health="interval = 60\nfall = 2",
    )
    for _ in range(6):
        client = await e2e.client(lbws.url)
        assert await echoOf(client, "x") == "x"
    deadMember = lbws.pool["dead"]
    # Two failed connects (those clients were retried on live) and it is
    # out: the later clients did not try it.
    assert deadMember.state == "down"
    assert deadMember.failed == 2
    assert deadMember.checks == {}  # no probe ran


@pytest_twisted.ensureDeferred
async def test_a_backend_closing_cleanly_is_not_a_failure(e2e):
    backend = await e2e.echo("a")
    lbws = await e2e.lbws([("a", backend.url)], health="interval = 60\nfall = 1")
    for _ in range(2):
        client = await e2e.client(lbws.url)
        client.sendMessage(b"__close 1000 bye")
        assert await client.closed == (1000, "bye")
    member = lbws.pool["a"]
    assert member.state == "up"
    assert (member.failed, member.consecutiveFailures) == (0, 0)


class RefusesHealthPath(EchoFactory):
    """
    Serves clients, but refuses the health check's path: failing checks
    with working connections.
    """

    class protocol(EchoFactory.protocol):
        def onConnect(self, request):
            if request.path == "/health":
                raise ConnectionDeny(503, "Service Unavailable")
            return super().onConnect(request)


@pytest_twisted.ensureDeferred
async def test_open_connections_stay_when_their_backend_goes_down(e2e):
    backend = RefusesHealthPath()
    port = await e2e.listen(backend)
    lbws = await e2e.lbws(
        [("a", f"ws://127.0.0.1:{port.getHost().port}")],
        probe="websocket",
        health="interval = 60\npath = /health",
    )
    client = await e2e.client(lbws.url)
    assert await echoOf(client, "before") == "before"
    # Checks every 0.1 s from now on (as a reload would set them).
    lbws.health.sync(settingsFor(health="interval = 0.1\npath = /health", probe="websocket").health)
    member = lbws.pool["a"]
    await eventually(lambda: member.state == "down")
    assert member.lastError == "backend answered HTTP 503 Service Unavailable"
    # Down does not cut the open connections.
    assert await echoOf(client, "after") == "after"
    assert member.active == 1
