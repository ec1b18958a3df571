"""
A fleet of lbws instances behind a real L4 balancer: HAProxy in mode tcp
with PROXY protocol v2 in front of three lbws (`listen = haproxy:tcp:...`)
in front of node `ws` backends. The fleet behaves as one: backends see the
real client address through both hops, every instance sends a key to the
same backend (and moves the same keys when a backend goes), a backend gone
from DNS drains everywhere, and a rolling restart loses no message.
"""

import json
import signal

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ServerEndpoint

from lbws.config import parseConfig
from lbws.service import makeLbws

from tests.fleet import (
    HAProxy,
    Streamer,
    askBackend,
    backendStates,
    healthz,
    ledgerOf,
    status,
)
from tests.support import (
    EchoFactory,
    Harness,
    LbwsProcess,
    NodeBackend,
    configText,
    deferLater,
    eventually,
    nodeAvailable,
)
from tests.test_discovery import A, DnsServer, Zone
from tests.test_proxy_protocol import proxyV2

PROXIED = "haproxy:tcp:0:interface=127.0.0.1"
DASHBOARD = "tcp:0:interface=127.0.0.1"
HASHED = "balance = hash\nhash_key = header:X-User-Id\n"
QUICK_HEALTH = "interval = 0.2\ntimeout = 1\nfall = 1\nrise = 1\n"


class FleetHarness(Harness):
    def ledgerBackends(self, count):
        if not nodeAvailable():
            pytest.fail("node and tests/node/node_modules are needed: run `make test`")
        backends = []
        for i in range(count):
            backend = NodeBackend("--prefix", f"b{i}: ", script="ledger-server.js")
            self.atEnd(backend.stop)
            backends.append(backend)
        return backends

    def haproxy(self, servers):
        balancer = HAProxy(servers)
        self.atEnd(balancer.stop, first=True)
        return balancer

    async def echoAt(self, name, interface, port=0):
        """
        An Autobahn echo backend on C{interface} (a loopback address).
        """
        factory = EchoFactory(name)
        listening = await TCP4ServerEndpoint(reactor, port, interface=interface).listen(factory)
        self.atEnd(listening.stopListening)
        return factory, listening.getHost().port

    async def instances(self, backends, count=3, lbws=HASHED, **kwargs):
        """
        C{count} lbws instances in this process behind a PROXY-protocol
        listener, each with its dashboard.
        """
        return [
            await self.lbws(
                backends, listen=PROXIED, dashboard=DASHBOARD, lbws=lbws, probe="websocket",
                health=QUICK_HEALTH, **kwargs,
            )
            for _ in range(count)
        ]


@pytest_twisted.async_yield_fixture
async def fleet():
    h = FleetHarness()
    yield h
    await h.close()


def portOf(url):
    return int(url.rsplit(":", 1)[1])


def serversOf(instances):
    return [
        (f"l{i}", portOf(lbws.url), portOf(lbws.dashboardUrl)) for i, lbws in enumerate(instances)
    ]


async def waitUntil(check, what, timeout=20, step=0.1):
    """
    Poll the coroutine function C{check} until it is true, at most
    C{timeout} seconds.
    """
    for _ in range(int(timeout / step)):
        if await check():
            return
        await deferLater(step)
    raise AssertionError(f"{what}: not within {timeout}s")


async def waitForState(instances, backend, state):
    for lbws in instances:

        async def reached(lbws=lbws):
            return (await backendStates(lbws.dashboardUrl)).get(backend) == state

        await waitUntil(reached, f"{backend} {state} on {lbws.dashboardUrl}")


async def statusOf(lbws):
    return await threads.deferToThread(status, lbws.dashboardUrl)


@pytest_twisted.ensureDeferred
async def test_backends_see_the_client_address_through_both_hops(fleet):
    backends = fleet.ledgerBackends(3)
    instances = await fleet.instances([(f"b{i}", b.url) for i, b in enumerate(backends)])
    balancer = fleet.haproxy(serversOf(instances))
    await balancer.waitFor("UP", ["l0", "l1", "l2"])
    # The client speaks from 127.0.0.2; HAProxy connects to lbws from
    # 127.0.0.1, so only the PROXY header can tell lbws the real address.
    # HAProxy round-robins: three requests reach the three instances.
    for i in range(3):
        reply = await askBackend(
            balancer.url, f"user-{i}", bindAddress=("127.0.0.2", 0), message=b"__request__"
        )
        headers = json.loads(reply)["headers"]
        assert headers["x-forwarded-for"] == "127.0.0.2"
        assert headers["x-real-ip"] == "127.0.0.2"
    totals = []
    for lbws in instances:
        got = await statusOf(lbws)
        totals.append(sum(backend["total"] for backend in got["backends"]))
    assert totals == [1, 1, 1]


async def backendsForKeys(instances, keys):
    """
    Ask every key through two different instances (key i through
    instances i and i+1, mod 3), 25 at a time, each connection direct to
    the instance with the PROXY header an L4 balancer would send.

    @return: C{{key: (backend seen through one, through the other)}}
    """
    limit = defer.DeferredSemaphore(25)
    header = proxyV2("198.51.100.7", 40000)

    async def ask(url, key):
        reply = await askBackend(url, key, proxyHeader=header)
        return reply.split(":", 1)[0]

    def both(i, key):
        return defer.gatherResults(
            [
                limit.run(lambda lbws=lbws: defer.ensureDeferred(ask(lbws.url, key)))
                for lbws in (instances[i % 3], instances[(i + 1) % 3])
            ]
        )

    answers = await defer.gatherResults([both(i, key) for i, key in enumerate(keys)])
    return dict(zip(keys, map(tuple, answers)))


@pytest_twisted.ensureDeferred
async def test_instances_agree_on_the_backend_of_a_key_and_move_the_same_keys(fleet):
    backends = fleet.ledgerBackends(3)
    instances = await fleet.instances([(f"b{i}", b.url) for i, b in enumerate(backends)])
    keys = [f"user-{i}" for i in range(1000)]

    before = await backendsForKeys(instances, keys)
    assert all(one == other for one, other in before.values())
    placed = {key: one for key, (one, _) in before.items()}
    shares = {name: list(placed.values()).count(name) for name in ("b0", "b1", "b2")}
    # Rendezvous hashing spreads 1,000 keys about evenly over 3 backends.
    assert all(250 < share < 420 for share in shares.values()), shares

    backends[1].stop()
    await waitForState(instances, "b1", "down")

    after = await backendsForKeys(instances, keys)
    assert all(one == other for one, other in after.values())
    moved = {key for key, (one, _) in after.items() if one != placed[key]}
    # Exactly b1's keys moved (the minimal set), each to a backend left.
    assert moved == {key for key, name in placed.items() if name == "b1"}
    assert {after[key][0] for key in moved} <= {"b0", "b2"}


@pytest_twisted.ensureDeferred
async def test_a_backend_removed_from_dns_drains_on_every_instance(fleet):
    two, port = await fleet.echoAt("two", "127.0.0.2")
    three, _ = await fleet.echoAt("three", "127.0.0.3", port)
    zone = Zone("fleet.test")
    zone.set("app.fleet.test", A("127.0.0.2"), A("127.0.0.3"))
    dns = DnsServer(zone)
    fleet.atEnd(dns.port.stopListening)
    text = configText(
        [("app", f"ws://app.fleet.test:{port}", "resolve = 0.2")],
        listen=PROXIED, dashboard=DASHBOARD, health=QUICK_HEALTH, probe="websocket",
    )
    instances = []
    for _ in range(3):
        service = makeLbws(reactor, parseConfig(text, "fleet.ini"), resolver=dns.resolver())
        instances.append(await fleet.start(service))
    gone, kept = f"app/127.0.0.2:{port}", f"app/127.0.0.3:{port}"
    await waitForState(instances, gone, "up")
    await waitForState(instances, kept, "up")
    balancer = fleet.haproxy(serversOf(instances))
    await balancer.waitFor("UP", ["l0", "l1", "l2"])

    # Six clients through HAProxy: two per instance, one on each member.
    clients = [await fleet.client(balancer.url) for _ in range(6)]

    async def totals(name):
        return [
            next(b["total"] for b in (await statusOf(lbws))["backends"] if b["name"] == name)
            for lbws in instances
        ]

    assert await totals(gone) == [1, 1, 1]

    zone.set("app.fleet.test", A("127.0.0.3"))
    await waitForState(instances, gone, "draining")
    # Open connections stay, on both members.
    for client in clients:
        client.sendMessage(b"still here")
        payload, _ = await client.messages.get().addTimeout(10, reactor)
        assert payload == b"still here"
    # New clients, whichever instance HAProxy gives them, go to the kept one.
    for _ in range(6):
        await fleet.client(balancer.url)
    assert await totals(gone) == [1, 1, 1]
    assert await totals(kept) == [3, 3, 3]


LEDGER_LBWS = HASHED + "stop_delay = 1.5\ndrain_timeout = 5\n"


async def startInstance(path):
    """
    A real `twistd lbws` process (started in a thread: it blocks until the
    process listens) and its dashboard port.
    """
    process = await threads.deferToThread(LbwsProcess, path)
    process.dashboardPort = int((await process.dashboardUrl()).rsplit(":", 1)[1])
    return process


@pytest_twisted.ensureDeferred
async def test_rolling_restart_loses_nothing(fleet, tmp_path):
    """
    Each lbws in turn gets SIGTERM while 200 clients stream ordered
    messages through HAProxy: /healthz says 503 at once so that HAProxy
    takes the instance out within stop_delay; then its clients get 1001
    and reconnect through HAProxy to the other instances, and a new
    instance takes its place. No connection through HAProxy fails, and the
    backends' ledgers show every client's messages in order, none lost.
    """
    backends = fleet.ledgerBackends(3)
    path = tmp_path / "lbws.ini"
    path.write_text(
        configText(
            [(f"b{i}", b.url) for i, b in enumerate(backends)],
            listen=PROXIED, dashboard=DASHBOARD, lbws=LEDGER_LBWS,
            health="interval = 0.5\n", probe="websocket",
        )
    )
    instances = list(
        await defer.gatherResults([defer.ensureDeferred(startInstance(path)) for _ in range(3)])
    )
    fleet.atEnd(lambda: [process.stop() for process in instances], first=True)
    balancer = fleet.haproxy([(f"l{i}", p.port, p.dashboardPort) for i, p in enumerate(instances)])
    await balancer.waitFor("UP", ["l0", "l1", "l2"])

    streamers = [Streamer(f"c{i}", "127.0.0.1", balancer.port) for i in range(200)]
    fleet.atEnd(lambda: [s.stop() for s in streamers], first=True)
    for streamer in streamers:
        streamer.start()
    await eventually(lambda: all(s.acked >= 3 for s in streamers), timeout=30)

    # New connections keep working throughout: one every 50 ms.
    newFailures, newOpened = [], []
    probing = True

    async def probe():
        n = 0
        while probing:
            n += 1
            try:
                await askBackend(balancer.url, f"probe-{n}")
                newOpened.append(n)
            except Exception as e:
                newFailures.append(repr(e))
            await deferLater(0.05)

    prober = defer.ensureDeferred(probe())

    for i in range(3):
        old = instances[i]
        old.signal(signal.SIGTERM)
        await eventually(lambda: healthz(old.dashboardPort) == 503, timeout=1)
        assert await old.exited(30) == 0
        new = await startInstance(path)
        instances[i] = new
        balancer.move(f"l{i}", new.port, new.dashboardPort)
        await balancer.waitFor("UP", [f"l{i}"])
        await eventually(lambda: all(s.connection is not None for s in streamers), timeout=20)

    probing = False
    await prober
    for streamer in streamers:
        streamer.stop()
    await defer.gatherResults([s.done for s in streamers]).addTimeout(30, reactor)

    assert newFailures == [] and len(newOpened) > 20
    for streamer in streamers:
        assert streamer.failures == [], (streamer.cid, streamer.failures)
        assert streamer.closes and set(streamer.closes) == {1001}, (streamer.cid, streamer.closes)
        assert streamer.orderErrors == 0
    ledgers = [await ledgerOf(backend.url) for backend in backends]
    # On each backend connection the numbers rose one by one: nothing was
    # lost or reordered inside a connection.
    assert [ledger["errors"] for ledger in ledgers] == [0, 0, 0]
    for streamer in streamers:
        seen = set()
        for ledger in ledgers:
            seen.update(ledger["clients"].get(streamer.cid, []))
        # Every message the client sent reached a backend (after a 1001
        # the client sent again what was not echoed: no gap anywhere).
        assert seen == set(range(streamer.sent + 1)), streamer.cid
