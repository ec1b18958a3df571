"""
Gradual rebalancing driven by a Clock: what is moved, in which order and at
what pace, with a simulated relay whose moved clients reconnect. The end to
end test with 200 real connections is in test_balancing_e2e.
"""

import random
from collections import Counter

import pytest
from twisted.internet.task import Clock

from lbws.config import parseConfig
from lbws.backends.pool import Pool
from lbws.backends.rebalance import (
    CHECK_INTERVAL,
    CLOSE_SERVICE_RESTART,
    Rebalancer,
    fairShares,
    mostOverloaded,
)
from tests import support
from tests.support import setActive, setHealthy


def settingsFor(backends, lbws=""):
    text = support.configText(backends, lbws=lbws)
    return parseConfig(text, "t.ini")


class FakeLeg:
    def __init__(self, tunnel, isClient):
        self.tunnel = tunnel
        self.isClient = isClient
        self.finished = False
        self.closeSent = None
        self.closeReceived = None

    def close(self, code, reason):
        self.closeSent = (code, reason)
        if self.isClient:
            self.tunnel.world.closed(self.tunnel)


class FakeInfo:
    def __init__(self, peer, key, keySource, route=None):
        self.peer = peer
        self.key = key
        self.keySource = keySource
        self.route = route


class FakeTunnel:
    def __init__(self, world, member, key, route=None):
        self.world = world
        self.member = member
        self.started = world.clock.seconds()
        self.done = False
        self.closedFirstBy = None
        route = route or world.settings.implicitRoute()
        self.info = FakeInfo(f"client-{key}", key, str(route.hash_key), route)
        self.client = FakeLeg(self, True)
        self.backend = FakeLeg(self, False)

    @property
    def movable(self):
        return not self.done and self.client.closeSent is None

    def close(self, clientCode, backendCode, reason, by, backendReason=None):
        if self.closedFirstBy is None:
            self.closedFirstBy = by
        self.client.close(clientCode, reason)
        self.backend.close(backendCode, backendReason or reason)


class World:
    """
    A relay stand-in: tunnels on pool members; a client closed with 1012
    ends a few milliseconds later and reconnects, landing where the pool
    chooses.
    """

    stopping = False

    def __init__(self, settings, clock=None, seed=1):
        self.clock = clock or Clock()
        self.clock.advance(1000)
        self.settings = settings
        self.pool = Pool(settings, self.clock)
        self.tunnels = set()
        self.moves = []  # (time, member name, tunnel)
        self.rebalancer = Rebalancer(self.clock, self, self.pool, random.Random(seed))
        self._keys = 0

    def connect(self, count, key=None, route=None):
        opened = []
        for _ in range(count):
            self._keys += 1
            k = key if key is not None else f"k{self._keys}"
            member = self.pool.choose(k, route=route)
            setActive(member, member.active + 1)
            tunnel = FakeTunnel(self, member, k, route)
            self.tunnels.add(tunnel)
            opened.append(tunnel)
            self.clock.advance(0.001)
        return opened

    def closed(self, tunnel):
        code, reason = tunnel.client.closeSent
        assert code == CLOSE_SERVICE_RESTART and reason in ("rebalancing", "backend draining")
        self.moves.append((self.clock.seconds(), tunnel.member.name, tunnel))
        self.clock.callLater(0.005, self.ended, tunnel)

    def ended(self, tunnel):
        tunnel.done = True
        setActive(tunnel.member, tunnel.member.active - 1)
        self.tunnels.discard(tunnel)
        self.connect(1, key=tunnel.info.key, route=tunnel.info.route)

    def counts(self):
        return {m.name: m.active for m in self.pool}

    def run(self, seconds, step=0.01):
        for _ in range(int(seconds / step)):
            self.clock.advance(step)


THREE = [("a", "ws://h:1"), ("b", "ws://h:2"), ("c", "ws://h:3")]
GRADUAL = "rebalance = gradual\nrebalance_rate = 10\n"


def recovered(backends=THREE, lbws=GRADUAL, connections=200, down="c"):
    """
    C{down} was down while C{connections} clients connected; it is up again.
    """
    world = World(settingsFor(backends, lbws))
    setHealthy(world.pool[down], False)
    world.connect(connections)
    world.pool[down].health.follow(True, world.clock.seconds())
    world.rebalancer.startService()
    return world


def test_moves_the_surplus_to_the_recovered_backend_and_stops():
    world = recovered()
    assert world.counts() == {"a": 100, "b": 100, "c": 0}
    world.run(30)
    counts = world.counts()
    assert sum(counts.values()) == 200
    # Fair share 66.7 each: moving started as c was more than 10% short
    # and went on until nobody was a whole connection short.
    assert sorted(counts.values()) == [66, 67, 67], counts
    # Only the surplus moved, nothing back and forth.
    assert len(world.moves) == counts["c"]
    assert {name for _, name, _ in world.moves} <= {"a", "b"}
    assert world.pool["a"].rebalanced + world.pool["b"].rebalanced == len(world.moves)
    assert world.rebalancer.moved == len(world.moves)
    for _, _, tunnel in world.moves:
        assert tunnel.backend.closeSent == (1001, "client moved by rebalancing")
        assert tunnel.closedFirstBy == "lbws"
    # Once balanced, nothing more moves.
    moved = len(world.moves)
    world.run(30)
    assert len(world.moves) == moved


def test_never_faster_than_the_rate_with_jitter():
    world = recovered(lbws="rebalance = gradual\nrebalance_rate = 4\n", connections=400)
    world.run(20)
    times = [t for t, _, _ in world.moves]
    assert len(times) > 40
    gaps = [b - a for a, b in zip(times, times[1:])]
    # At least 1/rate apart, up to 1.5/rate: never over the rate, ~80% of
    # it on average, and not in lockstep.
    assert min(gaps) >= 0.25 - 1e-9
    assert max(gaps) <= 0.375 + 0.01 + 1e-9
    assert len({round(g, 3) for g in gaps}) > 10
    for start in times:
        inWindow = [t for t in times if start <= t < start + 1]
        assert len(inWindow) <= 4
    average = (times[-1] - times[0]) / (len(times) - 1)
    assert average == pytest.approx(1.25 / 4, rel=0.1)


def test_oldest_connections_move_first():
    world = recovered(connections=60)
    oldest = sorted(
        (t for t in world.tunnels if t.member.name == "a"), key=lambda t: t.started
    )
    world.run(10)
    movedFromA = [tunnel for _, name, tunnel in world.moves if name == "a"]
    assert movedFromA == oldest[: len(movedFromA)]
    assert movedFromA


def test_weights_set_the_fair_share():
    backends = [("a", "ws://h:1", "weight = 3"), ("b", "ws://h:2")]
    world = recovered(backends, connections=200, down="b")
    assert world.counts() == {"a": 200, "b": 0}
    world.run(40)
    counts = world.counts()
    assert (counts["a"], counts["b"]) == (150, 50)


def test_off_moves_nothing_and_a_reload_turns_it_on():
    world = recovered(lbws="rebalance = off\n")
    world.run(10)
    assert world.moves == []
    world.settings = settingsFor(THREE, GRADUAL)
    world.run(CHECK_INTERVAL + 0.5)
    assert world.moves


def test_nothing_moves_while_lbws_stops():
    world = recovered()
    world.stopping = True
    world.run(5)
    assert world.moves == []


def test_down_and_draining_members_keep_their_connections():
    world = recovered()
    world.pool["a"].admin.drain()
    world.run(20)
    assert {name for _, name, _ in world.moves} == {"b"}
    assert world.counts()["a"] == 100


def test_tolerance_leaves_a_near_even_spread_alone():
    world = World(settingsFor(THREE, GRADUAL))
    world.connect(99)
    extra = world.connect(2)  # 35, 33, 33 (share 33.7, tolerance 3.4)
    for tunnel in extra:
        setActive(tunnel.member, tunnel.member.active - 1)
        tunnel.member = world.pool["a"]
        setActive(tunnel.member, tunnel.member.active + 1)
    assert world.counts() == {"a": 35, "b": 33, "c": 33}
    world.rebalancer.startService()
    world.run(10)
    assert world.moves == []
    assert mostOverloaded(world.pool) is None
    shares = {m.name: round(share, 2) for m, _, share in fairShares(world.pool)}
    assert shares == {"a": 33.67, "b": 33.67, "c": 33.67}
    # 39, 33, 33: a is 4 over a share of 35 (tolerance 3.5).
    setActive(world.pool["a"], 39)
    assert mostOverloaded(world.pool) is world.pool["a"]
    # 36, 36, 30: c is 4 under; a connection of a (first of the largest) moves.
    for name, count in (("a", 36), ("b", 36), ("c", 30)):
        setActive(world.pool[name], count)
    assert mostOverloaded(world.pool) is world.pool["a"]


def test_slow_start_paces_the_fair_share():
    """
    With slow_start the recovered backend's fair share grows with its
    ramp, so connections move to it over slow_start, not at once.
    """
    world = recovered(lbws=GRADUAL + "slow_start = 60\n")
    world.run(15)
    early = world.counts()["c"]
    # At 15 of 60 s c weighs 0.25: a fair share of 200 * 0.25 / 2.25 = 22.
    assert 15 <= early <= 25, early
    world.run(60)
    assert world.counts()["c"] == pytest.approx(200 / 3, abs=7)


def test_hash_moves_only_connections_whose_key_maps_elsewhere():
    world = recovered(lbws="balance = hash\n" + GRADUAL, connections=300)
    # Which keys belong to c now that it is back.
    misplaced = {
        t.info.key for t in world.tunnels if world.pool.choose(t.info.key).name == "c"
    }
    assert 70 <= len(misplaced) <= 130
    world.run(30)
    moved = {tunnel.info.key for _, _, tunnel in world.moves}
    assert moved == misplaced
    for tunnel in world.tunnels:
        assert world.pool.choose(tunnel.info.key) is tunnel.member
    world.run(10)
    assert {tunnel.info.key for _, _, tunnel in world.moves} == misplaced


def test_a_failing_step_does_not_stop_the_loop():
    world = recovered()
    calls = []
    step = world.rebalancer.step

    def broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return step()

    world.rebalancer.step = broken
    world.run(5)
    assert len(calls) > 1 and world.moves
    world.rebalancer.stopService()
    moved = len(world.moves)
    world.run(5)
    assert len(world.moves) == moved
    assert not world.clock.getDelayedCalls() or all(
        c.func != world.rebalancer._tick for c in world.clock.getDelayedCalls()
    )


def test_a_burst_of_moves_is_one_event():
    world = recovered()
    world.run(30)
    [event] = [e for e in world.pool.events.recent() if e["kind"] == "rebalance"]
    moved = Counter(name for _, name, _ in world.moves)
    assert event["moved"] == len(world.moves) == world.counts()["c"]
    assert event["backends"] == dict(moved)
    # Recorded when the balance was even, a look after the last move.
    last = world.moves[-1][0]
    assert last < event["time"] <= last + CHECK_INTERVAL + 0.02
    assert event["seconds"] == event["time"] - world.moves[0][0]
    assert event["text"].startswith(f"rebalancing moved {len(world.moves)} connection(s) in ")


# Routes: each route is rebalanced over its own members and connections.

ROUTES = """
[route:A]
path = /a
backends = a, b
{a}
[route:B]
path = /b
backends = b, c
{b}
"""


def routed(a="", b="", lbws=GRADUAL):
    """
    Routes A (a, b) and B (b, c) sharing b: A's 100 clients connected
    while b was down, so they are all on a; b came back and B's 60 clients
    then spread evenly over b and c.
    """
    text = support.configText(THREE, lbws=lbws, routes=ROUTES.format(a=a, b=b))
    world = World(parseConfig(text, "t.ini"))
    routeA, routeB = world.settings.routes
    setHealthy(world.pool["b"], False)
    world.connect(100, route=routeA)
    world.pool["b"].health.follow(True, world.clock.seconds())
    world.connect(60, route=routeB)
    world.rebalancer.startService()
    return world, routeA, routeB


def routeCounts(world, route):
    return Counter(t.member.name for t in world.tunnels if t.info.route is route)


def test_routes_move_only_the_uneven_routes_connections():
    """
    With round_robin on A its reconnects spread by A's own rotation: A ends
    50/50 although b then carries more connections than a, and B, even on
    its own, keeps every connection (a whole-pool rebalancer would move
    B's clients off b).
    """
    world, routeA, routeB = routed(a="balance = round_robin")
    assert routeCounts(world, routeA) == {"a": 100}
    assert routeCounts(world, routeB) == {"b": 30, "c": 30}
    world.run(60)
    assert routeCounts(world, routeA) == {"a": 50, "b": 50}
    assert routeCounts(world, routeB) == {"b": 30, "c": 30}
    assert world.moves
    assert {name for _, name, _ in world.moves} == {"a"}
    assert {tunnel.info.route.name for _, _, tunnel in world.moves} == {"A"}
    moved = len(world.moves)
    world.run(30)
    assert len(world.moves) == moved


def test_least_conn_route_stops_where_a_reconnect_would_come_back():
    """
    least_conn sends a reconnect to the backend with the fewest connections
    of all routes: A's moves stop once a and b carry as many, rather than
    closing clients that would land on a again.
    """
    world, routeA, routeB = routed()
    world.run(60)
    assert routeCounts(world, routeA) == {"a": 65, "b": 35}
    assert routeCounts(world, routeB) == {"b": 30, "c": 30}
    assert len(world.moves) == 35
    assert {tunnel.info.route.name for _, _, tunnel in world.moves} == {"A"}


def test_the_route_furthest_over_its_share_moves_first_at_one_global_rate():
    """
    Both routes uneven: each step moves one connection, from the route
    whose worst member is furthest over its share relative to that share,
    and the rate is the one of the whole relay.
    """
    text = support.configText(
        THREE,
        lbws=GRADUAL,
        routes=ROUTES.format(a="balance = round_robin", b="balance = round_robin"),
    )
    world = World(parseConfig(text, "t.ini"))
    routeA, routeB = world.settings.routes
    setHealthy(world.pool["b"], False)
    world.connect(40, route=routeA)
    world.connect(10, route=routeB)
    world.pool["b"].health.follow(True, world.clock.seconds())
    world.rebalancer.startService()
    world.run(1.2)
    # Surplus 20 of a share of 20 (A) against 5 of 5 (B): a tie broken by
    # order, then each route in turn as moves shrink the other's surplus.
    first = [tunnel.info.route.name for _, _, tunnel in world.moves]
    assert first[0] == "A"
    world.run(60)
    assert routeCounts(world, routeA) == {"a": 20, "b": 20}
    assert routeCounts(world, routeB) == {"b": 5, "c": 5}
    times = [t for t, _, _ in world.moves]
    assert min(y - x for x, y in zip(times, times[1:])) >= 1 / 10


def test_hash_route_moves_only_its_misplaced_keys():
    """
    balance = hash on route A: a connection moves when its key maps to
    another of A's members by A's hash_key; B (least_conn, even) keeps its
    connections.
    """
    world, routeA, routeB = routed(a="balance = hash\nhash_key = header:X-User")
    misplaced = {
        t.info.key
        for t in world.tunnels
        if t.info.route is routeA and world.pool.choose(t.info.key, route=routeA).name == "b"
    }
    assert 30 <= len(misplaced) <= 70
    world.run(30)
    assert {tunnel.info.key for _, _, tunnel in world.moves} == misplaced
    assert routeCounts(world, routeB) == {"b": 30, "c": 30}
    for tunnel in world.tunnels:
        if tunnel.info.route is routeA:
            assert world.pool.choose(tunnel.info.key, route=routeA) is tunnel.member


# drain_mode = shed: the same pace moves a draining backend's connections off.

TWO = [("a", "ws://h:1"), ("b", "ws://h:2")]
SHED = "drain_mode = shed\nrebalance_rate = 10\n"


def spread(backends=TWO, lbws=SHED, connections=40, routes=""):
    """
    C{connections} clients spread by least_conn over C{backends}, the
    rebalancer running.
    """
    world = World(parseConfig(support.configText(backends, lbws=lbws, routes=routes), "t.ini"))
    world.connect(connections)
    world.rebalancer.startService()
    return world


def shedEvents(world):
    return [e for e in world.pool.events.recent() if e["kind"] == "shed"]


def test_shed_moves_a_drained_backends_connections_off_oldest_first_at_the_rate():
    world = spread()
    assert world.counts() == {"a": 20, "b": 20}
    onB = sorted((t for t in world.tunnels if t.member.name == "b"), key=lambda t: t.started)
    world.pool["b"].admin.drain()
    drained = world.clock.seconds()
    world.run(10)
    assert world.counts() == {"a": 40, "b": 0}
    assert [tunnel for _, _, tunnel in world.moves] == onB
    for tunnel in onB:
        assert tunnel.client.closeSent == (CLOSE_SERVICE_RESTART, "backend draining")
        assert tunnel.backend.closeSent == (1001, "client moved off a draining backend")
        assert tunnel.closedFirstBy == "lbws"
    times = [t for t, _, _ in world.moves]
    # The first within a look (a second) of the drain; then 1/rate apart
    # plus up to 50% jitter, as gradual rebalancing.
    assert drained < times[0] <= drained + CHECK_INTERVAL + 0.01
    gaps = [y - x for x, y in zip(times, times[1:])]
    assert min(gaps) >= 0.1 - 1e-9 and max(gaps) <= 0.15 + 0.01 + 1e-9
    assert world.rebalancer.shedMoved == {"b": 20}
    assert world.rebalancer.moved == 0 and world.pool["b"].rebalanced == 0
    assert world.rebalancer.shedding() == (Counter(), Counter({"b": 20}))
    start, end = shedEvents(world)
    assert (start["phase"], start["backend"], start["count"], start["rate"]) == ("start", "b", 20, 10)
    assert start["time"] <= times[0]
    assert (end["phase"], end["backend"], end["moved"], end["back"]) == ("end", "b", 20, False)
    assert times[-1] < end["time"] <= times[-1] + CHECK_INTERVAL + 0.02
    assert end["seconds"] == end["time"] - start["time"]
    assert end["text"] == f"shedding backend b ended: 20 connection(s) moved in {end['seconds']:.1f}s"


def test_keep_leaves_a_drained_backends_connections_alone():
    world = spread(lbws="rebalance_rate = 10\n")
    world.pool["b"].admin.drain()
    world.run(10)
    assert world.moves == [] and world.counts() == {"a": 20, "b": 20}
    assert world.rebalancer.leftToMove() == Counter()
    assert shedEvents(world) == []


def test_a_reload_that_sets_shed_applies_to_open_connections():
    world = spread(lbws="rebalance_rate = 10\n")
    world.pool["b"].admin.drain()
    world.run(3)
    assert world.moves == []
    world.settings = settingsFor(TWO, SHED)
    world.run(5)
    assert world.counts() == {"a": 40, "b": 0}


def test_shedding_waits_until_a_backend_is_up_to_take_the_clients():
    """
    Never onto a draining backend, and not into nowhere: with a down and b
    drained, b's clients stay (and are counted as left to move) until a is
    back.
    """
    world = spread()
    setHealthy(world.pool["a"], False)
    world.pool["b"].admin.drain()
    world.run(5)
    assert world.moves == []
    assert world.rebalancer.leftToMove() == {"b": 20}
    [start] = shedEvents(world)
    assert start["count"] == 20
    setHealthy(world.pool["a"], True)
    world.run(5)
    assert world.counts() == {"a": 40, "b": 0}


def test_two_draining_backends_never_trade_clients():
    world = spread(backends=THREE, connections=30)
    world.pool["b"].admin.drain()
    world.pool["c"].admin.drain()
    world.run(10)
    assert world.counts() == {"a": 30, "b": 0, "c": 0}
    assert len(world.moves) == 20
    assert {name for _, name, _ in world.moves} == {"b", "c"}


def test_a_route_sheds_by_its_own_drain_mode():
    """
    b serves routes A (drain_mode = shed) and B (keep, from [lbws]): when b
    is drained only A's clients on it move.
    """
    routes = ROUTES.format(a="drain_mode = shed", b="")
    world = World(parseConfig(support.configText(THREE, lbws="rebalance_rate = 10", routes=routes), "t.ini"))
    routeA, routeB = world.settings.routes
    world.connect(20, route=routeA)
    world.connect(20, route=routeB)
    world.rebalancer.startService()
    before = routeCounts(world, routeB)
    assert routeCounts(world, routeA) == {"a": 10, "b": 10} and before["b"] > 0
    world.pool["b"].admin.drain()
    world.run(10)
    assert routeCounts(world, routeA) == {"a": 20}
    assert routeCounts(world, routeB) == before
    assert {tunnel.info.route.name for _, _, tunnel in world.moves} == {"A"}


def test_with_hash_a_draining_backend_keeps_its_connections_unless_it_sheds():
    """
    With balance = hash and gradual rebalancing, a draining backend's
    connections map elsewhere but stay with drain_mode = keep; with shed
    they move, to where their keys map.
    """
    world = spread(THREE, lbws="balance = hash\n" + GRADUAL, connections=90)
    world.pool["c"].admin.drain()
    world.run(10)
    assert world.moves == []
    world.settings = settingsFor(THREE, "balance = hash\n" + GRADUAL + "drain_mode = shed\n")
    onC = world.counts()["c"]
    world.run(20)
    assert world.counts()["c"] == 0 and len(world.moves) == onC
    for tunnel in world.tunnels:
        assert world.pool.choose(tunnel.info.key) is tunnel.member


def test_with_workers_each_sheds_at_its_share_of_the_rate():
    world = spread(lbws=SHED + "workers = 2\n")
    world.pool["b"].admin.drain()
    world.run(10)
    times = [t for t, _, _ in world.moves]
    assert len(times) == 20
    assert min(y - x for x, y in zip(times, times[1:])) >= 0.2 - 1e-9


def test_a_backend_back_in_rotation_ends_its_shedding():
    world = spread()
    world.pool["b"].admin.drain()
    world.run(1.5)
    moved = len(world.moves)
    assert 0 < moved < 20
    world.pool["b"].admin.drain(False)
    world.run(5)
    assert len(world.moves) == moved
    start, end = shedEvents(world)
    assert (end["moved"], end["back"]) == (moved, True)
    assert end["text"].endswith("; it is back in rotation")


def test_nothing_is_shed_while_lbws_stops():
    world = spread()
    world.pool["b"].admin.drain()
    world.stopping = True
    world.run(5)
    assert world.moves == [] and shedEvents(world) == []


def test_a_parent_adds_its_workers_shedding_and_records_its_start_and_end():
    """
    With workers = N the parent has no connections: what its workers
    report is what the dashboard shows and the events record.
    """
    world = World(settingsFor(TWO, SHED))
    reported = [(Counter({"b": 7}), Counter({"b": 1}))]
    parent = Rebalancer(world.clock, world, world.pool, reports=lambda: reported[-1])
    parent.startService()
    world.run(1.1)
    assert parent.shedding() == (Counter({"b": 7}), Counter({"b": 1}))
    # The one a worker moved before the parent looked counts in.
    [start] = shedEvents(world)
    assert (start["backend"], start["count"]) == ("b", 8)
    reported.append((Counter(), Counter({"b": 8})))
    world.run(1.1)
    start, end = shedEvents(world)
    assert (end["backend"], end["moved"]) == ("b", 8)
    # A second drain of b later: its own count.
    reported.append((Counter({"b": 2}), Counter({"b": 8})))
    world.run(1.1)
    reported.append((Counter(), Counter({"b": 10})))
    world.run(1.1)
    assert [(e["phase"], e.get("count"), e.get("moved")) for e in shedEvents(world)[2:]] == [
        ("start", 2, None),
        ("end", None, 2),
    ]
