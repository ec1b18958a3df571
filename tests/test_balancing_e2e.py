"""
Balancing end to end, with real backends, a real lbws and real clients on
127.0.0.1: consistent hashing across a backend going down and coming back,
slow start for a backend a reload adds, and gradual rebalancing of 200
long-lived connections after a backend comes back.
"""

import json
from collections import Counter

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import LoopingCall
from twisted.web.client import Agent, readBody

from lbws.config import loadConfig
from lbws.service import makeLbws
from tests import support
from tests.balancing import Fleet, RevivableBackend
from tests.support import Harness, eventually

FAST_HEALTH = "interval = 0.1\ntimeout = 0.5\nfall = 1\nrise = 1"


class BalancingHarness(Harness):
    def backend(self, name, start=True):
        backend = RevivableBackend(name)
        self.atEnd(lambda: defer.ensureDeferred(backend.close()))
        if start:
            backend.start()
        return backend

    async def lbwsFromFile(self, path):
        return await self.start(makeLbws(reactor, loadConfig(path)))

    def fleet(self, url, **kwargs):
        fleet = Fleet(url, **kwargs)
        # Before lbws stops: a fleet reconnects when its clients are closed.
        self.atEnd(fleet.close, first=True)
        return fleet


@pytest_twisted.async_yield_fixture
async def harness():
    h = BalancingHarness()
    yield h
    await h.close()


async def getJson(url):
    response = await Agent(reactor).request(b"GET", url.encode())
    return json.loads(await readBody(response))


async def getText(url):
    response = await Agent(reactor).request(b"GET", url.encode())
    return (await readBody(response)).decode()


# balance = hash


async def backendOf(harness, lbws, backends, user):
    """
    Which backend a client with X-User-Id C{user} lands on.
    """
    for backend in backends:
        backend.factory.connections.clear()
    client = await harness.client(lbws.url, headers={"X-User-Id": user})
    served = [b.name for b in backends if b.factory.connections]
    client.sendClose(1000)
    await client.closed.addTimeout(10, reactor)
    assert len(served) == 1, served
    assert backends[[b.name for b in backends].index(served[0])].factory.connections[
        0
    ].request.headers["x-user-id"] == user
    return served[0]


@pytest_twisted.ensureDeferred
async def test_hash_keys_stay_put_move_only_off_a_down_backend_and_come_back(harness):
    backends = [harness.backend(name) for name in ("a", "b", "c")]
    lbws = await harness.lbws(
        [(b.name, b.url) for b in backends],
        lbws="balance = hash\nhash_key = header:X-User-Id",
        health=FAST_HEALTH,
    )
    users = [f"user-{i}" for i in range(45)]
    before = {u: await backendOf(harness, lbws, backends, u) for u in users}
    assert set(before.values()) == {"a", "b", "c"}
    # The same key lands on the same backend every time.
    assert {u: await backendOf(harness, lbws, backends, u) for u in users[:10]} == {
        u: before[u] for u in users[:10]
    }

    await backends[2].stop()
    await eventually(lambda: lbws.pool["c"].state == "down")
    during = {u: await backendOf(harness, lbws, backends, u) for u in users}
    moved = [u for u in users if during[u] != before[u]]
    assert moved == [u for u in users if before[u] == "c"]
    assert "c" not in during.values()

    backends[2].start()
    await eventually(lambda: lbws.pool["c"].state == "up")
    after = {u: await backendOf(harness, lbws, backends, u) for u in users}
    assert after == before


# slow_start


@pytest.mark.parametrize("slowStart", [0, 60])
@pytest_twisted.ensureDeferred
async def test_slow_start_holds_back_a_backend_a_reload_adds(harness, tmp_path, slowStart):
    """
    a has 10 long-lived connections when a reload adds b. Without slow
    start, least_conn sends b every new connection until it has caught
    up; with slow_start = 60, b starts near weight 0 and gets one.
    """
    a, b = harness.backend("a"), harness.backend("b")
    path = tmp_path / "lbws.ini"

    def write(backends):
        text = support.configText(backends, health=FAST_HEALTH, dashboard="")
        path.write_text(text.replace("[lbws]\n", f"[lbws]\nslow_start = {slowStart}\n", 1))

    write([("a", a.url)])
    service = await harness.lbwsFromFile(path)
    for _ in range(10):
        await harness.client(service.url)
    write([("a", a.url), ("b", b.url)])
    assert service.reload()
    await eventually(lambda: service.pool["b"].state == "up")
    for _ in range(20):
        await harness.client(service.url)
    onB = service.pool["b"].active
    if slowStart:
        assert service.pool.effectiveWeight(service.pool["b"]) < 0.05
        assert onB == 1
    else:
        assert onB == 15


# rebalance = gradual

RATE = 50


@pytest_twisted.ensureDeferred
async def test_gradual_rebalancing_of_200_connections_after_a_backend_comes_back(harness):
    """
    200 clients are spread over a and b while c is down. When c comes
    back, lbws moves a third of them to it with 1012, never faster than
    rebalance_rate, the clients reconnect, and the spread ends even
    (66/67/67) without any connection lost. Moves show in status.json and metrics.
    """
    a, b = harness.backend("a"), harness.backend("b")
    c = harness.backend("c", start=False)
    events = harness.logged()
    lbws = await harness.lbws(
        [(x.name, x.url) for x in (a, b, c)],
        lbws=f"rebalance = gradual\nrebalance_rate = {RATE}",
        health=FAST_HEALTH,
        dashboard="tcp:0:interface=127.0.0.1",
    )
    await eventually(lambda: lbws.pool["c"].state == "down")
    fleet = harness.fleet(lbws.url)
    await fleet.connect(200)
    counts = lambda: tuple(lbws.pool[n].active for n in "abc")  # noqa: E731
    assert counts() == (100, 100, 0)

    samples = []
    sampler = LoopingCall(lambda: samples.append((reactor.seconds(), *counts())))
    sampler.start(0.05)
    try:
        c.start()
        await eventually(lambda: lbws.pool["c"].state == "up")
        cameUp = reactor.seconds()
        await eventually(
            lambda: sorted(counts()) == [66, 67, 67]
            and len(fleet.open) == 200
            and not lbws.rebalancer._closing - {t for t in lbws.rebalancer._closing if t.done},
            timeout=20,
        )
        # The curve ends at the settled spread, however late the sampler's
        # last tick ran on a loaded machine.
        samples.append((reactor.seconds(), *counts()))
    finally:
        sampler.stop()

    assert fleet.lost == []
    assert sum(counts()) == 200 and len(fleet.open) == 200
    moved = lbws.rebalancer.moved
    assert fleet.moved == moved == fleet.reconnected
    # Only the surplus moved: c's connections all came from moves.
    assert moved == lbws.pool["c"].active
    assert moved in (66, 67)
    assert lbws.pool["a"].rebalanced + lbws.pool["b"].rebalanced == moved
    # Never faster than the rate: each move at least 1/RATE after the
    # previous one (the pace on a quiet machine is in bench/rebalance_curve).
    times = [
        e["log_time"]
        for e in events
        if str(e.get("log_format", "")).startswith("rebalancing: moving")
    ]
    assert len(times) == moved
    gaps = [y - x for x, y in zip(times, times[1:])]
    assert min(gaps) >= 1 / RATE - 0.002
    # The curve: c rises step by step while a and b fall; the total only
    # dips by the clients reconnecting at that moment.
    during = [s for s in samples if s[0] >= cameUp]
    assert all(x[3] <= y[3] for x, y in zip(during, during[1:]))
    assert all(190 <= sum(s[1:]) <= 200 for s in samples)
    assert sorted(samples[-1][1:]) == [66, 67, 67]

    status = await getJson(lbws.dashboardUrl + "/status.json")
    byName = {backend["name"]: backend for backend in status["backends"]}
    assert byName["a"]["rebalanced"] + byName["b"]["rebalanced"] == moved
    assert byName["c"]["rebalanced"] == 0
    assert status["balancing"] == {
        "balance": "least_conn",
        "slow_start": 0.0,
        "rebalance": "gradual",
        "rebalance_rate": float(RATE),
        "rebalanced": moved,
        "drain_mode": "keep",
        "to_move": 0,
        "shed": 0,
    }
    metrics = await getText(lbws.dashboardUrl + "/metrics")
    assert f'lbws_rebalanced_total{{backend="a"}} {float(byName["a"]["rebalanced"])}' in metrics
    assert 'lbws_rebalanced_total{backend="c"} 0.0' in metrics
    assert f'lbws_closes_total{{code="1012",side="lbws"}} {float(moved)}' in metrics
    assert 'lbws_backend_effective_weight{backend="c"} 1.0' in metrics


# rebalance = gradual with routes

TWO_ROUTES = """
[route:A]
path = /a
backends = a, b
balance = round_robin
[route:B]
path = /b
backends = b, c
"""


@pytest_twisted.ensureDeferred
async def test_gradual_rebalancing_is_per_route(harness, tmp_path):
    """
    Route A (a, b) got its 40 clients while b was down, so all are on a;
    route B (b, c) got 20 after b came back, 10 on each. A reload turns
    gradual rebalancing on: only A's clients get 1012, and A ends 20/20
    while B keeps every connection (by the whole pool, b would then be the
    busiest backend and B's clients would move too).
    """
    a, c = harness.backend("a"), harness.backend("c")
    b = harness.backend("b", start=False)
    path = tmp_path / "lbws.ini"

    def write(rebalance):
        path.write_text(
            support.configText(
                [(x.name, x.url) for x in (a, b, c)],
                lbws=f"rebalance = {rebalance}\nrebalance_rate = {RATE}",
                health=FAST_HEALTH,
                routes=TWO_ROUTES,
            )
        )

    write("off")
    lbws = await harness.lbwsFromFile(path)
    await eventually(lambda: lbws.pool["b"].state == "down")
    fleetA = harness.fleet(lbws.url + "/a")
    await fleetA.connect(40)
    b.start()
    await eventually(lambda: lbws.pool["b"].state == "up")
    fleetB = harness.fleet(lbws.url + "/b")
    await fleetB.connect(20)

    def spread(route):
        return Counter(
            t.member.name for t in lbws.relay.tunnels if t.info.route.name == route
        )

    assert spread("A") == {"a": 40} and spread("B") == {"b": 10, "c": 10}
    write("gradual")
    assert lbws.reload()
    await eventually(
        lambda: spread("A") == {"a": 20, "b": 20}
        and len(fleetA.open) == 40
        and all(t.done for t in lbws.rebalancer._closing),
        timeout=20,
    )
    assert fleetA.lost == [] and fleetB.lost == []
    assert fleetB.moved == 0 and len(fleetB.open) == 20
    assert spread("B") == {"b": 10, "c": 10}
    assert fleetA.moved == lbws.rebalancer.moved == fleetA.reconnected >= 20
    assert lbws.pool["a"].rebalanced == lbws.rebalancer.moved
    assert lbws.pool["b"].rebalanced == lbws.pool["c"].rebalanced == 0
