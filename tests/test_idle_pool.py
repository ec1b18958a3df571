"""
Upstream keep-alive's pool (L{lbws.backends.keepalive.IdleConnections}):
the last connection parked is the first taken, a connection the backend
closed or wrote to while idle is never handed out, and every way a member
stops taking connections (drained, removed by a reload, down, lbws
stopping) closes its idle ones. Driven by L{task.Clock} with backend legs
on L{StringTransport} that keep the park/unpark contract.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from lbws.backends.keepalive import IdleConnections
from lbws.config import ConfigError, parseConfig
from lbws.core import buildCore
from lbws.ops.status import StatusView
from lbws.telemetry.metrics import metricsRegistry
from tests import support
from tests.test_balance import settingsFor
from tests.test_dashboard import TOKEN, DashboardHarness, get, post

BACKENDS = [("a", "ws://127.0.0.1:1"), ("b", "ws://127.0.0.1:2")]


class Leg(Protocol):
    """
    A backend leg keeping the pool's contract: parked, it calls onGone
    once on a byte (and closes itself) or on connectionLost.
    """

    def __init__(self):
        self.onGone = None
        self.parks = 0

    def park(self, onGone):
        self.parks += 1
        self.onGone = onGone

    def unpark(self):
        self.onGone = None

    def dataReceived(self, data):
        if self.onGone is not None:
            self._gone()
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        if self.onGone is not None:
            self._gone()

    def _gone(self):
        gone, self.onGone = self.onGone, None
        gone()


def leg():
    protocol = Leg()
    protocol.makeConnection(StringTransport())
    return protocol


def closed(protocol):
    return protocol.transport.disconnecting


def pool(limit=32, timeout=60.0, lbws=""):
    clock = task.Clock()
    core = buildCore(clock, settingsFor(BACKENDS, lbws=lbws))
    idle = IdleConnections(clock, limit, timeout)
    return clock, core.pool["a"], core.pool["b"], idle


def test_take_returns_the_last_parked_first_and_hands_it_over():
    clock, a, _, idle = pool()
    first, second = leg(), leg()
    assert idle.give(a, first) and idle.give(a, second)
    assert idle.count(a) == 2
    assert idle.take(a) is second
    assert second.onGone is None  # unparked: the caller's now
    assert idle.take(a) is first
    assert idle.take(a) is None
    assert idle.count() == 0
    assert not closed(first) and not closed(second)


def test_take_is_per_member():
    clock, a, b, idle = pool()
    one = leg()
    idle.give(a, one)
    assert idle.take(b) is None
    assert idle.take(a) is one


def test_take_skips_a_connection_already_closing():
    clock, a, _, idle = pool()
    older, newer = leg(), leg()
    idle.give(a, older)
    idle.give(a, newer)
    newer.transport.loseConnection()  # closing, its connectionLost still to come
    assert idle.take(a) is older
    assert idle.count(a) == 0
    newer.connectionLost(Failure(ConnectionDone()))  # its onGone finds nothing
    assert idle.count(a) == 0


def test_a_byte_from_the_backend_while_parked_removes_and_closes_it():
    clock, a, _, idle = pool()
    kept, chatty = leg(), leg()
    idle.give(a, kept)
    idle.give(a, chatty)
    chatty.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert closed(chatty)
    assert idle.count(a) == 1
    assert idle.take(a) is kept


def test_a_close_from_the_backend_while_parked_removes_it():
    clock, a, _, idle = pool()
    gone = leg()
    idle.give(a, gone)
    gone.connectionLost(Failure(ConnectionDone()))
    assert idle.count(a) == 0
    assert idle.take(a) is None
    assert clock.getDelayedCalls() == []  # its idle timer went with it


def test_the_per_member_limit_refuses_more():
    clock, a, b, idle = pool(limit=2)
    assert idle.give(a, leg()) and idle.give(a, leg())
    extra = leg()
    assert not idle.give(a, extra)
    assert extra.parks == 0  # not the pool's: the caller closes it
    assert idle.give(b, leg())
    assert (idle.count(a), idle.count(b), idle.count()) == (2, 1, 3)


def test_limit_zero_keeps_nothing():
    clock, a, _, idle = pool(limit=0)
    assert not idle.give(a, leg())
    assert idle.count() == 0
    assert clock.getDelayedCalls() == []


def test_the_idle_timeout_closes_it():
    clock, a, _, idle = pool(timeout=5)
    first = leg()
    idle.give(a, first)
    clock.advance(3)
    second = leg()
    idle.give(a, second)
    clock.advance(2)
    assert closed(first) and not closed(second)
    assert idle.count(a) == 1
    clock.advance(3)
    assert closed(second) and idle.count() == 0


def test_taken_and_given_back_starts_its_timer_over():
    clock, a, _, idle = pool(timeout=5)
    one = leg()
    idle.give(a, one)
    clock.advance(4)
    assert idle.take(a) is one
    idle.give(a, one)
    clock.advance(4)
    assert not closed(one)
    clock.advance(1)
    assert closed(one)


@pytest.mark.parametrize("state", ["drained", "removed", "down"])
def test_a_member_not_taking_connections_gets_none_parked(state):
    clock, a, _, idle = pool()
    {"drained": lambda: a.drain(), "removed": a.remove,
     "down": lambda: a.recordCheck(False, 0, 2, 1)}[state]()
    assert not idle.give(a, leg())


def test_configure_shrinks_oldest_first_and_retimes():
    clock, a, b, idle = pool(limit=4, timeout=60)
    legs = [leg() for _ in range(4)]
    for each in legs:
        idle.give(a, each)
        clock.advance(1)
    idle.give(b, leg())
    idle.configure(2, 10)
    assert [closed(x) for x in legs] == [True, True, False, False]
    assert idle.count(a) == 2 and idle.count(b) == 1
    assert not idle.give(a, leg())  # at the new limit
    # Parked 2 and 1 seconds before the reload: 10 s from then.
    clock.advance(8)
    assert closed(legs[2]) and not closed(legs[3])
    clock.advance(1)
    assert closed(legs[3])
    idle.configure(0, 10)
    assert idle.count() == 0


def test_forget_closes_only_that_members():
    clock, a, b, idle = pool()
    ours, theirs = leg(), leg()
    idle.give(a, ours)
    idle.give(b, theirs)
    idle.forget(a)
    assert closed(ours) and not closed(theirs)
    assert idle.count(a) == 0 and idle.take(b) is theirs
    assert len(clock.getDelayedCalls()) == 0


def test_close_all_closes_everything_and_keeps_nothing_after():
    clock, a, b, idle = pool()
    legs = [leg(), leg(), leg()]
    idle.give(a, legs[0])
    idle.give(a, legs[1])
    idle.give(b, legs[2])
    idle.closeAll()
    assert all(closed(x) for x in legs)
    assert idle.count() == 0 and clock.getDelayedCalls() == []
    assert not idle.give(a, leg())


# The wiring: a core's pool (relay.idle) follows its members and settings.


def core(lbws=""):
    clock = task.Clock()
    return clock, buildCore(clock, settingsFor(BACKENDS, lbws=lbws))


def parked(core, name, count=2):
    legs = [leg() for _ in range(count)]
    for each in legs:
        assert core.relay.idle.give(core.pool[name], each)
    return legs


def test_draining_a_member_closes_its_idle_connections():
    clock, c = core()
    drained, other = parked(c, "a"), parked(c, "b")
    c.pool["a"].drain()  # what the dashboard's POST /backends/a/drain does
    assert all(closed(x) for x in drained)
    assert not any(closed(x) for x in other)
    c.pool["a"].drain(False)
    assert c.relay.idle.give(c.pool["a"], leg())


def test_a_member_going_down_closes_its_idle_connections():
    clock, c = core("")
    legs = parked(c, "a")
    health = c.settings.health
    for _ in range(health.fall):
        c.pool["a"].connectionFailed("refused", clock.seconds(), health)
    assert c.pool["a"].state == "down"
    assert all(closed(x) for x in legs)


def test_a_worker_following_its_parent_closes_them_too():
    clock, c = core()
    legs = parked(c, "a")
    c.pool["a"].follow(True, True, 0)
    assert all(closed(x) for x in legs)


def test_a_reload_that_removes_or_moves_a_member_closes_its_idle_connections():
    clock, c = core()
    removed, moved = parked(c, "a"), parked(c, "b")
    c.apply(settingsFor([("b", "ws://127.0.0.1:3")]))
    assert all(closed(x) for x in removed)  # removed: draining
    assert all(closed(x) for x in moved)  # a new address: the old one's go


def test_a_reload_applies_the_new_limit_and_timeout():
    clock, c = core("http_keepalive = 4")
    legs = parked(c, "a", 4)
    c.apply(settingsFor(BACKENDS, lbws="http_keepalive = 1\nhttp_keepalive_timeout = 2"))
    assert [closed(x) for x in legs] == [True, True, True, False]
    clock.advance(2)
    assert closed(legs[3])


def test_stopping_closes_every_idle_connection():
    clock, c = core()
    legs = parked(c, "a") + parked(c, "b")
    c.relay.stop(5)
    assert all(closed(x) for x in legs)
    assert not c.relay.idle.give(c.pool["a"], leg())


def test_abort_closes_them_too():
    clock, c = core()
    legs = parked(c, "b")
    c.relay.abort()
    assert all(closed(x) for x in legs)


def test_metrics_show_idle_connections_per_backend():
    clock, c = core()
    parked(c, "a", 3)
    c.pool["b"].traffic.report(1, {"idle": 2})  # a worker's last report
    view = StatusView(clock, c, 0.0, lambda: False)
    text = generate_latest(metricsRegistry(view)).decode()
    assert 'lbws_backend_idle_connections{backend="a"} 3.0' in text
    assert 'lbws_backend_idle_connections{backend="b"} 2.0' in text


# The keys.


def test_keys_default_to_nginxs_recommendation_and_a_minute():
    settings = settingsFor(BACKENDS)
    assert (settings.http_keepalive, settings.http_keepalive_timeout) == (32, 60.0)
    off = settingsFor(BACKENDS, lbws="http_keepalive = 0\nhttp_keepalive_timeout = 0.5")
    assert (off.http_keepalive, off.http_keepalive_timeout) == (0, 0.5)


@pytest.mark.parametrize(
    "line, says",
    [
        ("http_keepalive = -1", "'-1' must be at least 0"),
        ("http_keepalive = 2.5", "'2.5' is not a whole number"),
        ("http_keepalive_timeout = 0", "'0' must be at least 0.1 seconds"),
        ("http_keepalive_timeout = soon", "'soon' is not a number"),
    ],
)
def test_bad_values_name_the_key(line, says):
    with pytest.raises(ConfigError) as caught:
        parseConfig(support.configText(BACKENDS, lbws=line), "t.ini")
    assert line.split(" ")[0] in str(caught.value) and says in str(caught.value)


# Any sequence of what can happen keeps the pool's promises.

OPS = st.lists(
    st.tuples(
        st.sampled_from(["give", "take", "byte", "lost", "tick", "forget", "configure"]),
        st.sampled_from(["a", "b"]),
        st.integers(0, 3),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_any_sequence_keeps_the_promises(ops):
    """
    Whatever happens: no member holds more than the limit, a connection
    handed out was never closed, nor is one still parked, each parked
    connection has exactly one timer, and one that went or was closed is
    never handed out again.
    """
    clock, a, b, idle = pool(limit=2, timeout=5)
    members = {"a": a, "b": b}
    parked = {"a": [], "b": []}  # what the test gave and the pool kept
    limit = 2
    for op, name, n in ops:
        member = members[name]
        if op == "give":
            one = leg()
            if idle.give(member, one):
                parked[name].append(one)
        elif op == "take":
            got = idle.take(member)
            if got is not None:
                assert got in parked[name] and not closed(got) and got.onGone is None
                parked[name].remove(got)
                got.transport.loseConnection()  # used up
        elif op in ("byte", "lost") and parked[name]:
            one = parked[name][n % len(parked[name])]
            if op == "byte":
                one.dataReceived(b"x")
            else:
                one.connectionLost(Failure(ConnectionDone()))
        elif op == "tick":
            clock.advance(n * 2)
        elif op == "forget":
            idle.forget(member)
        elif op == "configure":
            limit = n
            idle.configure(limit, 5)
        for key in parked:
            parked[key] = [p for p in parked[key] if not closed(p) and p.onGone is not None]
            assert idle.count(members[key]) == len(parked[key]) <= limit
    assert len(clock.getDelayedCalls()) == idle.count()


# End to end: a running lbws, real TCP connections to a real backend parked
# in its pool, the dashboard's drain.


class RealLeg(Leg):
    def __init__(self):
        super().__init__()
        self.lost = defer.Deferred()

    def connectionLost(self, reason=None):
        super().connectionLost(reason)
        self.lost.callback(None)


@pytest_twisted.async_yield_fixture
async def harness():
    h = DashboardHarness()
    yield h
    await h.close()


@pytest_twisted.ensureDeferred
async def test_draining_from_the_dashboard_closes_idle_backend_connections(harness):
    a = await harness.backend("a")
    b = await harness.backend("b")
    lbws = await harness.lbws([("a", a.url), ("b", b.url)])
    legs = {}
    for name, backend in (("a", a), ("b", b)):
        port = int(backend.url.rsplit(":", 1)[1].split("/")[0])
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        legs[name] = [
            await endpoint.connect(Factory.forProtocol(RealLeg)) for _ in range(2)
        ]
        for each in legs[name]:
            assert lbws.relay.idle.give(lbws.pool[name], each)
    metrics = (await get(lbws, "/metrics")).body.decode()
    assert 'lbws_backend_idle_connections{backend="a"} 2.0' in metrics
    assert (await post(lbws, "/backends/a/drain", token=TOKEN)).code == 200
    await defer.gatherResults([each.lost for each in legs["a"]]).addTimeout(5, reactor)
    assert lbws.relay.idle.count(lbws.pool["a"]) == 0
    assert not any(each.lost.called for each in legs["b"])
    metrics = (await get(lbws, "/metrics")).body.decode()
    assert 'lbws_backend_idle_connections{backend="a"} 0.0' in metrics
    assert 'lbws_backend_idle_connections{backend="b"} 2.0' in metrics
    # The backend closing one while idle takes it out of the pool.
    legs["b"][0].transport.loseConnection()
    await legs["b"][0].lost.addTimeout(5, reactor)
    assert lbws.relay.idle.count(lbws.pool["b"]) == 1
