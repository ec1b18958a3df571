"""
Balancing on the pool, without sockets: consistent hashing (only a down
backend's keys move, and they come back), weights, and slow start driven by
a Clock. The end-to-end tests are in test_balancing_e2e.
"""

import pytest
from twisted.internet.task import Clock

from lbws.config import parseConfig
from lbws.backends.pool import SLOW_START_FLOOR, Pool
from tests import support
from tests.support import setActive, setHealthy

KEYS = [f"user-{i}" for i in range(10_000)]


def settingsFor(backends, lbws="", health=""):
    return parseConfig(support.configText(backends, lbws=lbws, health=health), "t.ini")


def hashPool(weights=(1, 1, 1, 1, 1), clock=None, lbws=""):
    backends = [
        (f"b{i}", f"ws://10.0.0.{i + 1}:80", f"weight = {w}") for i, w in enumerate(weights)
    ]
    return Pool(settingsFor(backends, lbws="balance = hash\n" + lbws), clock)


def mapping(pool, keys=KEYS):
    return {key: pool.choose(key).name for key in keys}


def remapped(before, after):
    return [key for key in before if before[key] != after[key]]


@pytest.mark.parametrize("down", ["b0", "b1", "b2", "b3", "b4"])
def test_hash_one_of_five_down_moves_only_its_keys_and_they_come_back(down):
    """
    10,000 keys on 5 backends; one goes down: at most 1/5 + 2% of the keys
    move, every one of them from the backend that went down, and when it
    comes back every key is where it was.
    """
    pool = hashPool()
    before = mapping(pool)
    setHealthy(pool[down], False)
    during = mapping(pool)
    moved = remapped(before, during)
    assert len(moved) / len(KEYS) <= 1 / 5 + 0.02
    assert all(before[key] == down for key in moved)
    # Every key of the down backend had to move, and only those did.
    assert set(moved) == {key for key in KEYS if before[key] == down}
    assert down not in during.values()
    setHealthy(pool[down], True)
    assert mapping(pool) == before


def test_hash_remap_fraction_is_the_down_backends_share():
    pool = hashPool()
    before = mapping(pool)
    fractions = []
    for member in pool:
        setHealthy(member, False)
        fractions.append(len(remapped(before, mapping(pool))) / len(KEYS))
        setHealthy(member, True)
    # Each is that backend's share of the keys: about 1/5 each.
    assert all(0.18 <= f <= 0.22 for f in fractions), fractions
    assert sum(fractions) == pytest.approx(1.0)


def test_hash_honours_weights():
    """
    Weights 1..5: each backend gets its weight's share of the keys (within
    1.5 points), and a weighted backend going down still moves only its
    own keys, spread over the others by their weights.
    """
    weights = (1, 2, 3, 4, 5)
    pool = hashPool(weights)
    before = mapping(pool)
    for i, weight in enumerate(weights):
        share = sum(1 for v in before.values() if v == f"b{i}") / len(KEYS)
        assert share == pytest.approx(weight / 15, abs=0.015), (i, share)
    setHealthy(pool["b4"], False)
    during = mapping(pool)
    moved = remapped(before, during)
    assert all(before[key] == "b4" for key in moved)
    assert len(moved) / len(KEYS) == pytest.approx(5 / 15, abs=0.015)
    landed = {f"b{i}": 0 for i in range(4)}
    for key in moved:
        landed[during[key]] += 1
    for i, weight in enumerate(weights[:4]):
        assert landed[f"b{i}"] / len(moved) == pytest.approx(weight / 10, abs=0.03)


def test_hash_weight_zero_gets_nothing_and_no_key_means_least_connections():
    pool = hashPool((1, 0, 1))
    assert "b1" not in mapping(pool, KEYS[:2000]).values()
    setActive(pool["b0"], 5)
    setActive(pool["b2"], 1)
    assert pool.choose(None) is pool["b2"]


def test_round_robin_and_least_conn_honour_weights():
    backends = [("a", "ws://h:1", "weight = 3"), ("b", "ws://h:2", "weight = 1")]
    rr = Pool(settingsFor(backends, lbws="balance = round_robin"))
    picks = [rr.choose().name for _ in range(400)]
    assert picks.count("a") == 300
    lc = Pool(settingsFor(backends, lbws="balance = least_conn"))
    for _ in range(400):
        member = lc.choose()
        setActive(member, member.active + 1)
    assert (lc["a"].active, lc["b"].active) == (300, 100)


# Slow start.

SLOW = 40.0


def comeUp(member, clock, rise=1):
    """
    Health checks take the member down, then up again now.
    """
    member.recordCheck(False, clock.seconds(), rise=rise, fall=1, error="x")
    for _ in range(rise):
        member.recordCheck(True, clock.seconds(), rise=rise, fall=1)
    assert member.healthy and member.changed == clock.seconds()


def test_effective_weight_ramps_linearly_over_slow_start():
    clock = Clock()
    clock.advance(1000)
    pool = Pool(
        settingsFor(
            [("a", "ws://h:1", "weight = 4"), ("b", "ws://h:2", "weight = 4")],
            lbws=f"slow_start = {SLOW}",
        ),
        clock,
    )
    a, b = pool["a"], pool["b"]
    # Members up from the start have their full weight at once.
    assert pool.effectiveWeight(a) == 4
    comeUp(b, clock)
    assert pool.effectiveWeight(b) == 4 * SLOW_START_FLOOR
    for fraction in (0.25, 0.5, 0.75):
        clock.advance(SLOW / 4)
        assert pool.effectiveWeight(b) == pytest.approx(4 * fraction)
    clock.advance(SLOW / 4)
    assert pool.effectiveWeight(b) == 4
    clock.advance(1000)
    assert pool.effectiveWeight(b) == 4
    # Down: no ramp while down (it gets nothing anyway); up again: a new one.
    comeUp(b, clock)
    assert pool.effectiveWeight(b) == 4 * SLOW_START_FLOOR


def test_slow_start_off_by_default():
    clock = Clock()
    pool = Pool(settingsFor([("a", "ws://h:1"), ("b", "ws://h:2")]), clock)
    comeUp(pool["b"], clock)
    assert pool.effectiveWeight(pool["b"]) == 1


def shareOver(pool, clock, name, seconds, step, perStep):
    """
    New connections at a steady pace for C{seconds}: the share C{name} got
    in each quarter of that time, and its open connections against the
    others' at the end of each quarter.
    """
    quarters = []
    opened = []
    for _ in range(4):
        got = total = 0
        for _ in range(int(seconds / 4 / step)):
            for _ in range(perStep):
                member = pool.choose(f"k{clock.seconds()}-{total}")
                setActive(member, member.active + 1)
                total += 1
                got += member.name == name
            clock.advance(step)
        quarters.append(got / total)
        others = sum(m.active for m in pool if m.name != name)
        opened.append((pool[name].active, others))
    return quarters, opened


@pytest.mark.parametrize("balance", ["round_robin", "least_conn", "hash"])
def test_slow_start_ramps_new_connections_with_every_strategy(balance):
    """
    After b comes up, what it gets grows over slow_start instead of
    jumping. With round robin and hash its share of new connections ramps
    up; with least_conn (which balances open connections) its open
    connections are held to the ramp's fraction of a's instead of b taking
    every new connection until it has caught up.
    """
    clock = Clock()
    clock.advance(50)
    pool = Pool(
        settingsFor(
            [("a", "ws://h:1"), ("b", "ws://h:2")],
            lbws=f"balance = {balance}\nslow_start = {SLOW}",
        ),
        clock,
    )
    setActive(pool["a"], 200)  # long-lived connections a kept while b was down
    comeUp(pool["b"], clock)
    quarters, opened = shareOver(pool, clock, "b", SLOW, step=0.5, perStep=4)
    if balance == "least_conn":
        # Without slow start b would have taken all of the first 200 new
        # connections (80 a quarter) and had 160 after two quarters.
        for i, (b, a) in enumerate(opened[:3]):
            assert b <= a * (i + 1) / 4 + 1, opened
        assert opened[1][0] < 130, opened
        assert opened[3][0] >= 0.95 * opened[3][1], opened  # caught up at the end
    else:
        # Round robin and hash give about the ramp's mean share per quarter
        # (1/8, 3/8, 5/8, 7/8 of a weight against a's 1).
        assert quarters == sorted(quarters), quarters
        for quarter, expected in zip(quarters, (0.11, 0.27, 0.38, 0.46)):
            assert quarter == pytest.approx(expected, abs=0.08), quarters


def test_slow_start_for_a_backend_a_reload_adds():
    clock = Clock()
    clock.advance(10)
    before = settingsFor([("a", "ws://h:1")], lbws=f"slow_start = {SLOW}")
    pool = Pool(before, clock)
    pool.update(settingsFor([("a", "ws://h:1"), ("b", "ws://h:2")], lbws=f"slow_start = {SLOW}"))
    b = pool["b"]
    assert not b.healthy
    clock.advance(3)
    for _ in range(2):
        b.recordCheck(True, clock.seconds(), rise=2, fall=2)
    assert pool.effectiveWeight(b) == SLOW_START_FLOOR
    clock.advance(SLOW / 2)
    assert pool.effectiveWeight(b) == pytest.approx(0.5)
