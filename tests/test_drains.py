"""
Paced drains: the 1001 closes of a stop spread over C{close_spread}, and a
draining backend's clients moved off at C{rebalance_rate} with
C{drain_mode = shed}.

First the stop's pacing with a Clock and real tunnels over
StringTransports; then end to end over real sockets: a real twistd lbws
stopped under 200 clients, and backends removed by a reload, drained from
the dashboard and gone from DNS under clients that reconnect on 1012 (the
pacing of shedding itself is unit-tested in test_rebalance).
"""

import random
import signal
from collections import Counter

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock

from lbws.backends.pool import Pool
from lbws.config import parseConfig
from lbws.relay import Relay
from lbws.service import makeLbws
from lbws.telemetry.metrics import Counters
from lbws.ws.tunnel import Tunnel
from tests import support
from tests.support import EchoFactory, eventually, setHealthy
from tests.test_balancing_e2e import FAST_HEALTH, BalancingHarness
from tests.test_dashboard import (
    DASHBOARD,
    TOKEN,
    Browser,
    browserInstalled,
    get,
    post,
    request,
)
from tests.test_discovery import A, DnsServer, Zone
from tests.test_signals import processes, writeConfig  # noqa: F401 (a fixture)
from tests.test_tunnel import Transport, closeFrame


class Info:
    """
    What a tunnel and the relay read of a client.
    """

    target = "/"
    subprotocol = None
    admitted = False

    def __init__(self, route, index):
        self.route = route
        self.peer = f"192.0.2.{index}"


def stoppingRelay(count, lbws):
    """
    A relay with C{count} open tunnels to backend a, made 1 ms apart.
    """
    clock = Clock()
    clock.advance(100)
    settings = parseConfig(
        support.configText([("a", "ws://h:1")], lbws="ping_interval = 0\n" + lbws), "t.ini"
    )
    pool = Pool(settings, clock)
    relay = Relay(clock, settings, pool, None, Counters(), random=random.Random(3))
    tunnels = []
    for index in range(count):
        member = pool["a"]
        info = Info(settings.implicitRoute(), index)
        tunnel = Tunnel(relay, Transport(), Transport(), member, member.opened(), info)
        relay.tunnelStarted(tunnel)
        tunnels.append(tunnel)
        clock.advance(0.001)
    return clock, relay, tunnels


def closedAt(clock, tunnels, until, step=0.01):
    """
    Advance the clock in steps until C{until} seconds from now: when each
    tunnel's client was sent its close (seconds from now), in the order
    the tunnels were made.
    """
    start = clock.seconds()
    times = [None] * len(tunnels)
    while True:
        for i, tunnel in enumerate(tunnels):
            if times[i] is None and tunnel.client.transport.closes():
                times[i] = round(clock.seconds() - start, 6)
        if clock.seconds() - start >= until - 1e-9:
            return times
        clock.advance(step)


def answer(tunnel):
    """
    The client and the backend answer lbws's closes; both connections end.
    """
    tunnel.client.dataReceived(closeFrame(1001))
    tunnel.backend.dataReceived(closeFrame(1001, masked=False))
    tunnel.client.connectionLost(None)
    tunnel.backend.connectionLost(None)


def test_stop_spreads_the_closes_evenly_in_random_order():
    """
    10 clients, close_spread = 5: one close every 0.5 s from the stop on,
    in an order that is not the clients' own, each 1001 to the client and
    to the backend.
    """
    clock, relay, tunnels = stoppingRelay(10, "close_spread = 5\ndrain_timeout = 30")
    drained = relay.stop(30)
    times = closedAt(clock, tunnels, 5)
    assert sorted(times) == [i * 0.5 for i in range(10)]
    assert times != sorted(times)
    for tunnel in tunnels:
        assert tunnel.client.transport.closes() == [(1001, "lbws is stopping")]
        assert tunnel.backend.transport.closes() == [(1001, "lbws is stopping")]
    assert not drained.called
    for tunnel in tunnels:
        answer(tunnel)
    assert drained.called and relay.tunnels == set()
    assert relay.counters.closes[("lbws", 1001)] == 10


def test_drain_timeout_bounds_the_whole_stop():
    """
    Clients that never answer: each is cut once drain_timeout has passed
    since the stop, whenever its close went out, so the last closed gets
    what is left of drain_timeout.
    """
    clock, relay, tunnels = stoppingRelay(4, "close_spread = 2\ndrain_timeout = 10")
    relay.stop(10)
    closedAt(clock, tunnels, 10 - 0.02)
    assert all(t.client.transport.ended is None for t in tunnels)
    clock.advance(0.03)
    assert [t.client.transport.ended for t in tunnels] == ["abort"] * 4
    assert [t.backend.transport.ended for t in tunnels] == ["abort"] * 4


def test_the_closes_take_at_most_half_of_drain_timeout():
    clock, relay, tunnels = stoppingRelay(10, "close_spread = 10\ndrain_timeout = 4")
    relay.stop(4)
    assert sorted(closedAt(clock, tunnels, 2)) == [round(i * 0.2, 6) for i in range(10)]


def test_close_spread_0_closes_every_client_at_once():
    clock, relay, tunnels = stoppingRelay(10, "close_spread = 0")
    relay.stop(30)
    assert closedAt(clock, tunnels, 0) == [0] * 10
    assert clock.getDelayedCalls() and all(c.getTime() == clock.seconds() + 30 for c in clock.getDelayedCalls())


def test_a_client_gone_before_its_turn_is_not_closed_and_the_drain_ends_with_the_last():
    clock, relay, tunnels = stoppingRelay(4, "close_spread = 8\ndrain_timeout = 30")
    drained = relay.stop(30)
    [first] = [t for t in tunnels if t.client.transport.closes()]
    rest = [t for t in tunnels if t is not first]
    answer(first)
    for tunnel in rest:
        # The client leaves by itself: lbws answers its close.
        tunnel.client.dataReceived(closeFrame(1000))
        tunnel.backend.dataReceived(closeFrame(1000, masked=False))
        tunnel.client.connectionLost(None)
        tunnel.backend.connectionLost(None)
    assert drained.called
    for tunnel in rest:
        assert tunnel.client.transport.closes() == [(1000, "")]
    # Nothing is left to fire: the spread stopped with the drain.
    assert clock.getDelayedCalls() == []


def test_a_close_already_under_way_gets_the_stops_deadline_at_once():
    """
    A client that sent its close before the stop is not put in the spread:
    its backend's answer is waited for up to drain_timeout, not longer.
    """
    clock, relay, tunnels = stoppingRelay(3, "close_spread = 8\ndrain_timeout = 2")
    closing = tunnels[0]
    closing.client.dataReceived(closeFrame(4000, b"bye"))
    relay.stop(2)
    # The other two: at 0 and at 0.5 (the window is half of drain_timeout).
    times = closedAt(clock, tunnels[1:], 1)
    assert sorted(times) == [0, 0.5]
    clock.advance(1.01)
    assert closing.backend.transport.ended == "abort"


def test_a_second_signal_cuts_every_client_and_no_close_follows():
    clock, relay, tunnels = stoppingRelay(10, "close_spread = 5")
    relay.stop(30)
    clock.advance(1.01)
    closed = [t for t in tunnels if t.client.transport.closes()]
    assert len(closed) == 3
    relay.abort()
    assert [t.client.transport.ended for t in tunnels] == ["abort"] * 10
    clock.advance(10)
    assert [t for t in tunnels if t.client.transport.closes()] == closed
    assert not any(c.func.__qualname__.startswith("SpreadClose") for c in clock.getDelayedCalls())


def test_a_late_timer_catches_up():
    """
    A reactor busy for 1.2 s: the closes due meanwhile go out together
    when it comes back, the next ones on time, and all within
    drain_timeout of the stop.
    """
    clock, relay, tunnels = stoppingRelay(10, "close_spread = 5\ndrain_timeout = 30")
    relay.stop(30)
    clock.advance(1.2)
    assert len([t for t in tunnels if t.client.transport.closes()]) == 3
    times = closedAt(clock, tunnels, 3.8)
    later = sorted(t for t in times if t is not None and t > 0)
    assert later == [round(i * 0.5 - 1.2, 6) for i in range(3, 10)]
    clock.advance(30 - 5 - 0.01)
    assert all(t.client.transport.ended is None for t in tunnels)
    clock.advance(0.02)
    assert all(t.client.transport.ended == "abort" for t in tunnels)


# close_spread end to end: a real twistd lbws, stopped by a signal.


async def openClients(url, count):
    """
    C{count} clients of C{url}, each noting when its close came and what
    it was (C{closes}: a list of C{(seconds, (code, reason))}).
    """
    clients, closes = [], []
    for _ in range(count):
        client = await support.connect(url)
        client.closed.addCallback(lambda result: closes.append((reactor.seconds(), result)))
        clients.append(client)
    return clients, closes


async def relaying(lbws, workers):
    """
    Wait until each worker process of a twistd lbws accepts clients: the
    parent listens before they are up, and a client's handshake would wait
    meanwhile (longer than a client's timeout on a busy machine).
    """
    for index in range(1, workers + 1 if workers > 1 else 1):
        await lbws.waitForLine(rf"worker {index} relaying", timeout=30)


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.ensureDeferred
async def test_200_clients_of_a_stopping_lbws_get_1001_spread_over_close_spread(
    tmp_path, backend, processes, workers
):
    """
    SIGTERM with close_spread = 2: every client gets 1001, the closes come
    evenly over the 2 s (not in one burst), and lbws exits 0; with
    workers = 2 each worker spreads its own clients over the same window.
    """
    config = writeConfig(
        tmp_path / "lbws.ini",
        [("a", backend.url)],
        lbws=f"close_spread = 2\ndrain_timeout = 10\nping_interval = 0\nworkers = {workers}",
    )
    lbws = processes(config)
    await relaying(lbws, workers)
    clients, closes = await openClients(lbws.url, 200)
    mark = len(lbws.lines)
    lbws.signal(signal.SIGTERM)
    # Within drain_timeout; the parent kills a worker 5 s after that.
    await eventually(lambda: len(closes) == 200, timeout=20)
    got = Counter(result for _, result in closes)
    assert got == {(1001, "lbws is stopping"): 200}, f"{got}\n" + "".join(lbws.lines[mark:])
    times = sorted(t for t, _ in closes)
    # Evenly over the window: 199 steps of 2/200 s, give or take the
    # processes' scheduling; each half second has about a quarter.
    spread = times[-1] - times[0]
    assert 1.7 <= spread <= 2.6, spread
    quarters = Counter(min(int((t - times[0]) / 0.5), 3) for t in times)
    assert all(30 <= quarters[q] <= 70 for q in range(4)), quarters
    assert await lbws.exited(timeout=15) == 0
    output = "".join(lbws.lines[mark:])
    assert "open connections get 1001 spread over 2s and up to 10s in all" in output
    assert "closing" in output and "connection(s) with 1001 over 2s" in output
    assert "Traceback" not in output
    assert len(backend.closes) == 200


@pytest_twisted.ensureDeferred
async def test_a_second_signal_during_the_spread_cuts_the_rest_at_once(tmp_path, backend, processes):
    config = writeConfig(
        tmp_path / "lbws.ini",
        [("a", backend.url)],
        lbws="close_spread = 30\ndrain_timeout = 60\nping_interval = 0",
    )
    lbws = processes(config)
    clients, closes = await openClients(lbws.url, 10)
    started = reactor.seconds()
    lbws.signal(signal.SIGTERM)
    # The first close comes at once, the next 3 s later.
    await eventually(lambda: len(closes) == 1)
    assert closes[0][1] == (1001, "lbws is stopping")
    mark = len(lbws.lines)
    lbws.signal(signal.SIGTERM)
    await eventually(lambda: len(closes) == 10)
    assert reactor.seconds() - started < 3
    assert all(code != 1001 for _, (code, _) in closes[1:])  # cut, not closed
    assert await lbws.exited(timeout=10) == 0
    assert "received SIGTERM again: closing 9 connection(s) now" in "".join(lbws.lines[mark:])


# drain_mode = shed end to end: 40 clients that reconnect on 1012, 20 on
# each of two backends; one backend leaves and its 20 are moved off.

RATE = 10
SHED = f"drain_mode = shed\nrebalance_rate = {RATE}\nadmin_token = {TOKEN}"


class DrainHarness(BalancingHarness):
    async def shedOff(self, lbws, fleet, gone, stays, logged):
        """
        Check that C{gone}'s 20 clients got 1012 at about C{RATE} a
        second, oldest first, each reconnected to C{stays} (names of
        members), and nobody else was touched; return the status.json
        backend of C{gone} seen half way, or None without a dashboard.

        @param gone: C{(member name, its backend's EchoFactory)}.
        @param stays: the same for the backend that stays.
        """
        (goneName, goneBackend), (staysName, staysBackend) = gone, stays
        kept = list(staysBackend.connections)
        assert len(kept) == 20 and len(goneBackend.connections) == 20
        halfway = None
        await eventually(lambda: lbws.rebalancer.shedMoved[goneName] >= 5, timeout=10)
        if lbws.dashboardUrl is not None:
            status = (await get(lbws, "/status.json")).json()
            [halfway] = [b for b in status["backends"] if b["name"] == goneName]
            assert halfway["to_move"] + halfway["shed"] == 20
            assert 0 < halfway["to_move"] < 20 and halfway["state"] == "draining"
        await eventually(
            lambda: lbws.pool[staysName].active == 40 and len(fleet.open) == 40, timeout=15
        )
        # Every moved client got 1012, reconnected, and works.
        assert fleet.lost == [] and fleet.moved == fleet.reconnected == 20
        await fleet.echoAll()
        # The other backend's clients were not touched.
        assert staysBackend.closes == []
        assert all(p.state == p.STATE_OPEN for p in kept)
        await eventually(lambda: len(goneBackend.closes) == 20)
        assert set(goneBackend.closes) == {(True, 1001, "client moved off a draining backend")}
        # At most RATE a second, about 80% of it on average.
        times = [
            e["log_time"]
            for e in logged
            if str(e.get("log_format", "")).startswith("draining: moving")
        ]
        assert len(times) == 20
        gaps = [y - x for x, y in zip(times, times[1:])]
        assert min(gaps) >= 1 / RATE - 0.002
        assert 19 / RATE <= times[-1] - times[0] <= 19 * 1.5 / RATE + 1.5
        # The timeline: when it started and when it ended.
        await eventually(lambda: len(shedEvents(lbws)) == 2, timeout=5)
        start, end = shedEvents(lbws)
        assert (start["phase"], start["backend"], start["count"]) == ("start", goneName, 20)
        assert (end["phase"], end["backend"], end["moved"]) == ("end", goneName, 20)
        assert start["time"] <= times[0] and times[-1] <= end["time"]
        return halfway


def shedEvents(lbws):
    return [e for e in lbws.events.recent() if e["kind"] == "shed"]


@pytest_twisted.async_yield_fixture
async def harness():
    h = DrainHarness()
    yield h
    await h.close()


async def twoBackends(harness, tmp_path):
    """
    An lbws (from a file, with a dashboard) in front of a and b, with 20
    reconnecting clients on each.
    """
    a, b = harness.backend("a"), harness.backend("b")
    path = tmp_path / "lbws.ini"

    def write(backends):
        path.write_text(
            support.configText(
                [(x.name, x.url) for x in backends],
                lbws=SHED,
                health=FAST_HEALTH,
                dashboard=DASHBOARD,
            )
        )

    write([a, b])
    lbws = await harness.lbwsFromFile(path)
    fleet = harness.fleet(lbws.url)
    await fleet.connect(40)
    assert (lbws.pool["a"].active, lbws.pool["b"].active) == (20, 20)
    return lbws, fleet, a, b, write


@pytest_twisted.ensureDeferred
async def test_a_backend_removed_by_a_reload_is_shed_at_rebalance_rate(harness, tmp_path):
    lbws, fleet, a, b, write = await twoBackends(harness, tmp_path)
    logged = harness.logged()
    write([a])
    assert lbws.reload()
    await harness.shedOff(lbws, fleet, ("b", b.factory), ("a", a.factory), logged)
    # The removed backend left with its last connection.
    await eventually(lambda: "b" not in lbws.pool.members)


@pytest_twisted.ensureDeferred
async def test_a_backend_drained_from_the_dashboard_is_shed_at_rebalance_rate(harness, tmp_path):
    lbws, fleet, a, b, write = await twoBackends(harness, tmp_path)
    logged = harness.logged()
    response = await post(lbws, "/backends/b/drain", token=TOKEN)
    assert response.code == 200
    await harness.shedOff(lbws, fleet, ("b", b.factory), ("a", a.factory), logged)
    status = (await get(lbws, "/status.json")).json()
    byName = {backend["name"]: backend for backend in status["backends"]}
    assert (byName["b"]["state"], byName["b"]["active"]) == ("draining", 0)
    assert (byName["b"]["to_move"], byName["b"]["shed"]) == (0, 20)
    assert (byName["a"]["to_move"], byName["a"]["shed"]) == (0, 0)
    assert {k: status["balancing"][k] for k in ("drain_mode", "to_move", "shed")} == {
        "drain_mode": "shed",
        "to_move": 0,
        "shed": 20,
    }
    # Back in rotation, it takes new clients again; nothing moves back.
    assert (await post(lbws, "/backends/b/enable", token=TOKEN)).code == 200
    await fleet.connect(2)
    assert lbws.pool["b"].active == 2 and fleet.moved == 20


@pytest_twisted.ensureDeferred
async def test_a_backend_gone_from_dns_is_shed_at_rebalance_rate(harness):
    """
    chat.example resolves to 127.0.0.2 and 127.0.0.3, a backend on each;
    then only to 127.0.0.2: the other member's clients are moved to it.
    """
    two, three = EchoFactory("two"), EchoFactory("three")
    port = await harness.listen(two, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.2"))
    number = port.getHost().port
    await harness.listen(three, TCP4ServerEndpoint(reactor, number, interface="127.0.0.3"))
    zone = Zone()
    zone.set("chat.example", A("127.0.0.2"), A("127.0.0.3"))
    dns = DnsServer(zone)
    harness.atEnd(dns.port.stopListening)
    text = support.configText(
        [("chat", f"ws://chat.example:{number}", "resolve = 0.1")],
        lbws=SHED,
        health=FAST_HEALTH,
        dashboard=DASHBOARD,
    )
    lbws = await harness.start(makeLbws(reactor, parseConfig(text, "t.ini"), resolver=dns.resolver()))
    names = [f"chat/127.0.0.{n}:{number}" for n in (2, 3)]
    await eventually(lambda: all(n in lbws.pool.members and lbws.pool[n].state == "up" for n in names))
    fleet = harness.fleet(lbws.url)
    await fleet.connect(40)
    assert [lbws.pool[n].active for n in names] == [20, 20]
    logged = harness.logged()
    zone.set("chat.example", A("127.0.0.2"))
    await harness.shedOff(lbws, fleet, (names[1], three), (names[0], two), logged)
    await eventually(lambda: names[1] not in lbws.pool.members)


def isOpen(protocol):
    return protocol.state == protocol.STATE_OPEN


@pytest.mark.parametrize("source", ["reload", "dashboard"])
@pytest_twisted.ensureDeferred
async def test_with_two_workers_each_sheds_its_own_clients(processes, harness, tmp_path, source):
    """
    workers = 2, a twistd lbws: b is removed by SIGHUP or drained from the
    dashboard; each worker moves its own clients off b at half the rate,
    the parent's dashboard shows what is left and records the start and
    the end.
    """
    a, b = harness.backend("a"), harness.backend("b")
    path = tmp_path / "lbws.ini"

    def write(backends):
        path.write_text(
            support.configText(
                [(x.name, x.url) for x in backends],
                lbws=SHED + "\nworkers = 2\nping_interval = 0",
                health=FAST_HEALTH,
                dashboard=DASHBOARD,
            )
        )

    write([a, b])
    lbws = processes(path)
    await relaying(lbws, 2)
    dashboard = await lbws.dashboardUrl()

    async def status():
        return (await request(b"GET", dashboard + "/status.json")).json()

    def backendIn(status, name):
        return {x["name"]: x for x in status["backends"]}.get(name)

    fleet = harness.fleet(lbws.url)
    await fleet.connect(40)
    kept = [p for p in a.factory.connections if isOpen(p)]
    onB = len([p for p in b.factory.connections if isOpen(p)])
    assert len(kept) + onB == 40 and 15 <= onB <= 25
    mark = len(lbws.lines)
    if source == "reload":
        write([a])
        lbws.signal(signal.SIGHUP)
        await lbws.waitForLine("reloaded", after=mark)
    else:
        assert (await request(b"POST", dashboard + "/backends/b/drain", token=TOKEN)).code == 200
    await eventually(lambda: fleet.moved >= 4, timeout=10)
    halfway = backendIn(await status(), "b")
    assert halfway["state"] == "draining" and halfway["to_move"] > 0
    assert halfway["to_move"] + halfway["shed"] == onB

    async def settled():
        now = await status()
        return backendIn(now, "a")["active"] == 40 and len(fleet.open) == 40

    await eventually(settled, timeout=15)
    assert fleet.lost == [] and fleet.moved == fleet.reconnected == onB
    await fleet.echoAll()
    assert a.factory.closes == [] and all(isOpen(p) for p in kept)
    await eventually(lambda: len(b.factory.closes) == onB)
    # Two workers at half the rate each: about RATE a second in all.
    times = fleet.movedAt
    assert (onB - 1) / (times[-1] - times[0]) <= RATE * 1.1
    # The workers report twice a second: the parent's view catches up.
    if source == "reload":

        async def left():
            return backendIn(await status(), "b") is None

        await eventually(left)
    else:

        async def moved():
            b = backendIn(await status(), "b")
            return (b["to_move"], b["shed"]) == (0, onB)

        await eventually(moved)
    events = (await request(b"GET", dashboard + "/events.json")).json()["events"]

    def shed():
        return [e for e in events if e["kind"] == "shed"]

    async def ended():
        nonlocal events
        events = (await request(b"GET", dashboard + "/events.json")).json()["events"]
        return len(shed()) == 2

    await eventually(ended, timeout=5)
    start, end = shed()
    # The start counts what the workers had reported by then (one may not
    # have seen the drain yet); the end counts every move.
    assert (start["phase"], start["backend"]) == ("start", "b") and 0 < start["count"] <= onB
    assert (end["phase"], end["backend"], end["moved"]) == ("end", "b", onB)
    assert "Traceback" not in "".join(lbws.lines)


@pytest_twisted.ensureDeferred
async def test_the_page_shows_what_is_left_to_move_and_the_timeline(harness, tmp_path):
    """
    b drained while a is down: b's 3 clients have nowhere to go, the page
    shows them left to move (in b's row and a card) and the start in the
    timeline; once a is up they are moved and the page shows the end.
    """
    browserInstalled()
    a, b = harness.backend("a"), harness.backend("b")
    lbws = await harness.lbws(
        [("a", a.url), ("b", b.url)], lbws=SHED, health="interval = 60", dashboard=DASHBOARD
    )
    clients = [await harness.client(lbws.url) for _ in range(6)]
    assert (lbws.pool["a"].active, lbws.pool["b"].active) == (3, 3)
    setHealthy(lbws.pool["a"], False)
    assert (await post(lbws, "/backends/b/drain", token=TOKEN)).code == 200
    await eventually(lambda: len(shedEvents(lbws)) == 1)

    browser = await threads.deferToThread(Browser, tmp_path / "chromium-profile")

    def show(script, what):
        return threads.deferToThread(browser.waitFor, script, what)

    try:
        await threads.deferToThread(browser.driver.get, lbws.dashboardUrl + "/")
        row = "document.querySelector('#rows tr[data-backend=\"b\"] .sub')"
        await show(f"return {row} && {row}.textContent === 'drained by operator, 3 to move'", "3 to move")
        await show(
            "return document.getElementById('sum-to-move').textContent === '3'"
            " && document.getElementById('drain-mode').textContent === '(shed, 10/s)'",
            "the card",
        )
        timeline = (
            "Array.from(document.querySelectorAll('#events li[data-kind=\"shed\"] .kind'))"
            ".map(k => k.textContent).join('|')"
        )
        await show(f"return {timeline} === 'shed \\u00b7 start'", "the start")
        setHealthy(lbws.pool["a"], True)
        await eventually(lambda: lbws.pool["b"].active == 0)
        await show(f"return {row}.textContent === 'drained by operator'", "nothing left")
        await show("return document.getElementById('sum-to-move').textContent === '0'", "0")
        await show(f"return {timeline} === 'shed \\u00b7 end|shed \\u00b7 start'", "the end")
        assert await threads.deferToThread(browser.problems) == []
    finally:
        await threads.deferToThread(browser.quit)
    moved = [c.closed.result for c in clients if c.closed.called]
    assert moved == [(1012, "backend draining")] * 3


# Larger counts, left out of the default suite (`pytest -m slow`).


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_1000_clients_of_a_stopping_lbws_reconnect_at_an_even_pace(tmp_path, backend, processes):
    """
    1,000 clients, close_spread = 5: 200 closes a second, each second of
    the window within 25% of that.
    """
    config = writeConfig(
        tmp_path / "lbws.ini",
        [("a", backend.url)],
        lbws="close_spread = 5\ndrain_timeout = 20\nping_interval = 0",
    )
    lbws = processes(config)
    clients, closes = await openClients(lbws.url, 1000)
    lbws.signal(signal.SIGTERM)
    await eventually(lambda: len(closes) == 1000, timeout=30)
    assert Counter(result for _, result in closes) == {(1001, "lbws is stopping"): 1000}
    times = sorted(t for t, _ in closes)
    assert 4.7 <= times[-1] - times[0] <= 5.6
    seconds = Counter(min(int(t - times[0]), 4) for t in times)
    assert all(150 <= seconds[s] <= 250 for s in range(5)), seconds
    assert await lbws.exited(timeout=30) == 0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest_twisted.ensureDeferred
async def test_200_clients_of_a_removed_backend_are_shed_at_50_a_second(harness, tmp_path):
    a, b = harness.backend("a"), harness.backend("b")
    path = tmp_path / "lbws.ini"

    def write(backends):
        path.write_text(
            support.configText(
                [(x.name, x.url) for x in backends],
                lbws="drain_mode = shed\nrebalance_rate = 50",
                health=FAST_HEALTH,
            )
        )

    write([a, b])
    lbws = await harness.lbwsFromFile(path)
    fleet = harness.fleet(lbws.url)
    await fleet.connect(400)
    assert (lbws.pool["a"].active, lbws.pool["b"].active) == (200, 200)
    write([a])
    assert lbws.reload()
    await eventually(
        lambda: "b" not in lbws.pool.members and len(fleet.open) == 400, timeout=30
    )
    assert fleet.lost == [] and fleet.moved == fleet.reconnected == 200
    assert a.factory.closes == []
    times = fleet.movedAt
    # At most 50 a second, about 80% of it on average.
    assert 199 / 50 <= times[-1] - times[0] <= 199 * 1.5 / 50 + 2
    for start in times:
        assert len([t for t in times if start <= t < start + 1]) <= 52
    await fleet.echoAll()
