"""
DNS discovery: a zone held by a twisted.names authority that each test
changes. Unit tests ask the authority directly with a Clock driving the
lookups; the end-to-end tests serve the zone with a twisted.names server
on 127.0.0.1 (UDP, port 0) to a real lbws whose resolver asks only it.
"""

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.names import authority, client, dns, server
from twisted.names.error import DNSQueryTimeoutError

from lbws.config import parseConfig
from lbws.backends.discovery import Discovery, lookupTargets, memberName, Target
from lbws.backends.pool import DRAINING, UP, Pool
from lbws.service import makeLbws
from tests import support
from tests.support import EchoFactory, Harness, eventually, setActive, setHealthy

ZONE = "chat.example"


class Zone(authority.FileAuthority):
    """
    An in-memory zone the test edits: C{set(name, *records)}.
    """

    def __init__(self, origin=ZONE):
        super().__init__(origin)

    def loadFile(self, origin):
        self.soa = (
            origin.encode(),
            dns.Record_SOA(
                mname=f"ns.{origin}", rname=f"admin.{origin}", serial=1,
                refresh=0, retry=0, expire=0, minimum=0, ttl=0,
            ),
        )
        self.records = {}

    def set(self, name, *records):
        if records:
            self.records[name.lower().encode()] = list(records)
        else:
            self.records.pop(name.lower().encode(), None)


def A(address):
    return dns.Record_A(address, ttl=0)


def AAAA(address):
    return dns.Record_AAAA(address, ttl=0)


def SRV(port, target, priority=0, weight=0):
    return dns.Record_SRV(priority, weight, port, target, ttl=0)


class Flaky:
    """
    A resolver in front of the zone that can be made to time out.
    """

    def __init__(self, zone):
        self.zone = zone
        self.down = False
        self.lookups = 0

    def _ask(self, method, name, timeout):
        self.lookups += 1
        if self.down:
            return defer.fail(DNSQueryTimeoutError(name))
        return getattr(self.zone, method)(name, timeout)

    def lookupAddress(self, name, timeout=None):
        return self._ask("lookupAddress", name, timeout)

    def lookupIPV6Address(self, name, timeout=None):
        return self._ask("lookupIPV6Address", name, timeout)

    def lookupService(self, name, timeout=None):
        return self._ask("lookupService", name, timeout)


class FakeHealth:
    def __init__(self):
        self.syncs = 0

    def sync(self, health=None):
        self.syncs += 1


def settingsFor(backends, lbws="", health=""):
    return parseConfig(support.configText(backends, lbws=lbws, health=health), "t.ini")


def discoveryFor(backends, zone):
    clock = Clock()
    settings = settingsFor(backends)
    pool = Pool(settings, clock)
    resolver = Flaky(zone)
    health = FakeHealth()
    discovery = Discovery(clock, pool, health, resolver)
    discovery.startService()
    return clock, pool, discovery, resolver, health


RESOLVED = [("chat", "ws://chat.example:8010/app", "resolve = 5")]


def test_each_address_is_a_member_that_joins_not_healthy():
    zone = Zone()
    zone.set("chat.example", A("10.0.0.1"), A("10.0.0.2"), AAAA("2001:db8::1"))
    clock, pool, discovery, resolver, health = discoveryFor(RESOLVED, zone)
    assert [m.name for m in pool] == [
        "chat/10.0.0.1:8010",
        "chat/10.0.0.2:8010",
        "chat/[2001:db8::1]:8010",
    ]
    member = pool["chat/10.0.0.1:8010"]
    assert not member.healthy and member.group == "chat"
    settings = member.settings
    assert (settings.address, settings.host, settings.port, settings.path) == (
        "10.0.0.1", "chat.example", 8010, "/app",
    )
    assert settings.url == "ws://10.0.0.1:8010/app"
    assert pool["chat/[2001:db8::1]:8010"].settings.url == "ws://[2001:db8::1]:8010/app"
    assert health.syncs == 1
    # Nobody passed a check yet: with none up, a real connect is tried on a
    # member that is down (Pool.choose).
    assert not pool.choose().healthy


def test_new_addresses_join_and_vanished_ones_drain_then_leave():
    zone = Zone()
    zone.set("chat.example", A("10.0.0.1"))
    clock, pool, discovery, resolver, health = discoveryFor(RESOLVED, zone)
    first = pool["chat/10.0.0.1:8010"]
    setHealthy(first, True)
    setActive(first, 1)
    zone.set("chat.example", A("10.0.0.2"))
    clock.advance(4.9)
    assert [m.name for m in pool] == ["chat/10.0.0.1:8010"]
    clock.advance(0.1)  # resolve = 5
    assert [m.name for m in pool] == ["chat/10.0.0.1:8010", "chat/10.0.0.2:8010"]
    assert first.removed and first.state == DRAINING
    assert not pool["chat/10.0.0.2:8010"].healthy
    setActive(first, 0)
    pool.leaveIfIdle(first)
    assert [m.name for m in pool] == ["chat/10.0.0.2:8010"]
    # An idle member whose address vanishes leaves at once.
    zone.set("chat.example", A("10.0.0.3"))
    clock.advance(5)
    assert [m.name for m in pool] == ["chat/10.0.0.3:8010"]


def test_an_address_back_before_its_member_left_joins_again_after_checks():
    zone = Zone()
    zone.set("chat.example", A("10.0.0.1"))
    clock, pool, discovery, resolver, health = discoveryFor(RESOLVED, zone)
    member = pool["chat/10.0.0.1:8010"]
    setHealthy(member, True)
    setActive(member, 2)
    zone.set("chat.example")
    clock.advance(5)
    assert member.removed
    zone.set("chat.example", A("10.0.0.1"))
    clock.advance(5)
    assert pool["chat/10.0.0.1:8010"] is member
    assert not member.removed and not member.healthy and member.active == 2
    # What the dashboard's event log says, and when.
    assert [(e["kind"], e["source"], e["backend"], e["time"]) for e in pool.events.recent()] == [
        ("enable", "dns", "chat/10.0.0.1:8010", 0.0),
        ("drain", "dns", "chat/10.0.0.1:8010", 5.0),
        ("enable", "dns", "chat/10.0.0.1:8010", 10.0),
    ]
    assert pool.events.recent()[1]["text"] == (
        "backend chat/10.0.0.1:8010 is gone from DNS: draining 2 open connection(s)"
    )


def test_a_failed_lookup_keeps_the_members_and_nxdomain_drains_them():
    zone = Zone()
    zone.set("chat.example", A("10.0.0.1"), A("10.0.0.2"))
    clock, pool, discovery, resolver, health = discoveryFor(RESOLVED, zone)
    resolver.down = True
    clock.advance(15)
    assert [m.state for m in pool] == ["down", "down"]
    assert not any(m.removed for m in pool)
    resolver.down = False
    for member in pool:
        setHealthy(member, True)
        setActive(member, 1)
    zone.set("chat.example")  # the name is gone: NXDOMAIN
    clock.advance(5)
    assert [m.state for m in pool] == [DRAINING, DRAINING]


def test_srv_targets_of_the_lowest_priority_become_members():
    zone = Zone()
    zone.set(
        "_ws._tcp.chat.example",
        SRV(8001, "a.chat.example"),
        SRV(8002, "b.chat.example"),
        SRV(8003, "backup.chat.example", priority=10),
    )
    zone.set("a.chat.example", A("10.0.1.1"), AAAA("2001:db8::a"))
    zone.set("b.chat.example", A("10.0.1.2"))
    zone.set("backup.chat.example", A("10.0.1.3"))
    clock, pool, discovery, resolver, health = discoveryFor(
        [("chat", "", "srv = _ws._tcp.chat.example", "weight = 3")], zone
    )
    assert sorted(m.name for m in pool) == [
        "chat/10.0.1.1:8001",
        "chat/10.0.1.2:8002",
        "chat/[2001:db8::a]:8001",
    ]
    member = pool["chat/10.0.1.2:8002"]
    assert (member.settings.host, member.weight, member.settings.url) == (
        "b.chat.example", 3, "ws://10.0.1.2:8002",
    )
    # Re-resolved every 30 s when resolve is left at 0.
    zone.set("_ws._tcp.chat.example", SRV(8001, "a.chat.example"))
    clock.advance(29)
    assert len(pool.members) == 3
    clock.advance(1)
    assert sorted(m.name for m in pool) == ["chat/10.0.1.1:8001", "chat/[2001:db8::a]:8001"]


def test_reload_applies_new_settings_to_members_and_drops_removed_sections():
    zone = Zone()
    zone.set("chat.example", A("10.0.0.1"))
    clock, pool, discovery, resolver, health = discoveryFor(RESOLVED, zone)
    member = pool["chat/10.0.0.1:8010"]
    setHealthy(member, True)
    lookups = resolver.lookups
    # A new weight: applied at once, no new lookup needed.
    settings = settingsFor([("chat", "ws://chat.example:8010/app", "resolve = 5", "weight = 4")])
    pool.update(settings)
    discovery.sync(settings)
    assert pool["chat/10.0.0.1:8010"] is member and member.weight == 4 and member.healthy
    assert resolver.lookups == lookups
    # A new port: looked up again now; the old member drains.
    settings = settingsFor([("chat", "ws://chat.example:9000/app", "resolve = 5")])
    pool.update(settings)
    discovery.sync(settings)
    assert [m.name for m in pool] == ["chat/10.0.0.1:9000"]
    # The section gone: its members drain like any removed backend.
    member = pool["chat/10.0.0.1:9000"]
    setActive(member, 1)
    settings = settingsFor([("other", "ws://10.9.9.9:1")])
    pool.update(settings)
    discovery.sync(settings)
    assert member.removed and discovery.lookingUp() == []
    clock.advance(60)
    assert [m.name for m in pool] == ["other", "chat/10.0.0.1:9000"]


def test_lookups_are_not_doubled_while_one_waits():
    zone = Zone()
    clock, pool, discovery, resolver, health = discoveryFor(RESOLVED, zone)
    waiting = defer.Deferred()
    resolver.lookupAddress = lambda name, timeout=None: waiting
    clock.advance(5)
    asked = resolver.lookups
    clock.advance(20)
    assert resolver.lookups == asked
    discovery.stopService()
    assert waiting.called  # cancelled


def test_member_names():
    assert memberName("chat", Target("10.0.0.1", 80, "h")) == "chat/10.0.0.1:80"
    assert memberName("chat", Target("::1", 80, "h")) == "chat/[::1]:80"


# End to end, through a twisted.names server on 127.0.0.1.


class DnsServer:
    def __init__(self, zone):
        self.zone = zone
        factory = server.DNSServerFactory(authorities=[zone])
        self.port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.address = ("127.0.0.1", self.port.getHost().port)

    def resolver(self):
        return client.Resolver(servers=[self.address], reactor=reactor)


class DiscoveryHarness(Harness):
    def __init__(self):
        super().__init__()
        self.events = self.logged()

    def dnsServer(self, zone):
        s = DnsServer(zone)
        self.atEnd(s.port.stopListening)
        return s

    async def backend(self, name, port=0, interface="127.0.0.1"):
        factory = EchoFactory(name)
        listening = await TCP4ServerEndpoint(reactor, port, interface=interface).listen(factory)
        self.atEnd(listening.stopListening)
        factory.port = listening.getHost().port
        return factory

    async def lbws(self, backends, resolver, health="interval = 0.1\ntimeout = 0.5\nfall = 1\nrise = 2"):
        # The backends get their own names as Host (what these tests look
        # for), not the client's.
        text = support.configText(
            backends, lbws="host_header = backend", health=health, probe="websocket"
        )
        return await self.start(makeLbws(reactor, parseConfig(text, "t.ini"), resolver=resolver))

    def loggedLines(self, words):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if words in formatEvent(e)]


@pytest_twisted.async_yield_fixture
async def harness():
    h = DiscoveryHarness()
    yield h
    await h.close()


async def request(c):
    c.sendMessage(b"__request__")
    payload, _ = await c.messages.get()
    return json.loads(payload)


@pytest_twisted.ensureDeferred
async def test_url_with_resolve_follows_the_a_records(harness):
    """
    chat.example resolves to 127.0.0.2, then also 127.0.0.3, then only to
    127.0.0.3: members join after their checks, and the vanished one
    drains, keeping its open connection until it ends.
    """
    two = await harness.backend("two", interface="127.0.0.2")
    three = await harness.backend("three", port=two.port, interface="127.0.0.3")
    zone = Zone()
    zone.set("chat.example", A("127.0.0.2"))
    dnsServer = harness.dnsServer(zone)
    lbws = await harness.lbws(
        [("chat", f"ws://chat.example:{two.port}/app", "resolve = 0.1")],
        dnsServer.resolver(),
    )
    nameTwo, nameThree = f"chat/127.0.0.2:{two.port}", f"chat/127.0.0.3:{two.port}"
    await eventually(lambda: nameTwo in lbws.pool.members and lbws.pool[nameTwo].state == UP)
    assert harness.loggedLines(f"backend {nameTwo} found by DNS: joins after 2 passing check(s)")
    first = await harness.client(lbws.url)
    seen = await request(first)
    assert seen["headers"]["host"] == f"chat.example:{two.port}"
    assert seen["path"] == "/app/"
    assert len(two.connections) >= 1 and not three.connections

    zone.set("chat.example", A("127.0.0.2"), A("127.0.0.3"))
    await eventually(lambda: nameThree in lbws.pool.members)
    assert not lbws.pool[nameThree].healthy  # joins after its checks
    await eventually(lambda: lbws.pool[nameThree].state == UP)
    second = await harness.client(lbws.url)
    assert (await request(second))["headers"]["host"] == f"chat.example:{two.port}"
    assert lbws.pool[nameThree].active == 1 and lbws.pool[nameTwo].active == 1

    zone.set("chat.example", A("127.0.0.3"))
    await eventually(lambda: lbws.pool[nameTwo].state == DRAINING)
    assert lbws.pool[nameTwo].removed
    # Its open connection stays; new ones go to the other.
    first.sendMessage(b"still here")
    assert await first.messages.get() == (b"still here", False)
    for _ in range(3):
        await harness.client(lbws.url)
    assert lbws.pool[nameThree].active == 4
    first.sendClose(1000)
    await first.closed
    await eventually(lambda: nameTwo not in lbws.pool.members)
    assert harness.loggedLines(f"backend {nameTwo} left the pool")


@pytest_twisted.ensureDeferred
async def test_srv_records_follow_the_zone(harness):
    a = await harness.backend("a")
    b = await harness.backend("b")
    zone = Zone()
    zone.set("_ws._tcp.chat.example", SRV(a.port, "a.chat.example"), SRV(b.port, "b.chat.example"))
    zone.set("a.chat.example", A("127.0.0.1"))
    zone.set("b.chat.example", A("127.0.0.1"))
    dnsServer = harness.dnsServer(zone)
    lbws = await harness.lbws(
        [("chat", "", "srv = _ws._tcp.chat.example", "resolve = 0.1")], dnsServer.resolver()
    )
    names = [f"chat/127.0.0.1:{a.port}", f"chat/127.0.0.1:{b.port}"]
    await eventually(
        lambda: all(n in lbws.pool.members and lbws.pool[n].state == UP for n in names)
    )
    clients = [await harness.client(lbws.url) for _ in range(4)]
    hosts = sorted([(await request(c))["headers"]["host"] for c in clients])
    assert hosts == sorted([f"a.chat.example:{a.port}"] * 2 + [f"b.chat.example:{b.port}"] * 2)
    zone.set("_ws._tcp.chat.example", SRV(a.port, "a.chat.example"))
    await eventually(lambda: lbws.pool[names[1]].state == DRAINING)
    for c in clients:
        c.sendMessage(b"ok")
        assert await c.messages.get() == (b"ok", False)
    more = [await harness.client(lbws.url) for _ in range(2)]
    assert [(await request(c))["headers"]["host"] for c in more] == [f"a.chat.example:{a.port}"] * 2


@pytest_twisted.ensureDeferred
async def test_no_address_yet_means_503_not_a_hang(harness):
    zone = Zone()
    dnsServer = harness.dnsServer(zone)
    lbws = await harness.lbws([("chat", "ws://chat.example:1", "resolve = 0.1")], dnsServer.resolver())
    await eventually(lambda: harness.loggedLines("looking up") or lbws.discovery.lookingUp())
    with pytest.raises(support.HandshakeFailed) as refused:
        await support.connect(lbws.url)
    assert refused.value.status == 503


@pytest_twisted.ensureDeferred
async def test_lookup_targets_through_the_server(harness):
    zone = Zone()
    zone.set("chat.example", A("10.1.2.3"), AAAA("2001:db8::5"))
    resolver = harness.dnsServer(zone).resolver()
    template = settingsFor([("chat", "ws://chat.example:81", "resolve = 1")]).backends[0]
    targets = await lookupTargets(resolver, template)
    assert targets == [Target("10.1.2.3", 81, "chat.example"), Target("2001:db8::5", 81, "chat.example")]
    zone.set("chat.example")
    assert await lookupTargets(resolver, template) == []


@pytest_twisted.ensureDeferred
async def test_wss_members_check_the_name_and_can_be_drained_by_name(harness, tmp_path):
    """
    wss://chat.example with resolve: each member connects to its address
    but the certificate is checked against chat.example (it names no
    address); an operator drains one member by its name, "/" escaped.
    """
    import trustme
    from twisted.internet.endpoints import SSL4ServerEndpoint
    from twisted.web.client import Agent, readBody
    from twisted.web.http_headers import Headers

    ca = trustme.CA()
    caFile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(caFile))
    cert = ca.issue_cert("chat.example")
    options = support.tlsServerOptions(cert.private_key_and_cert_chain_pem.bytes())
    backend = EchoFactory("tls")
    listening = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.2").listen(backend)
    harness.atEnd(listening.stopListening)
    port = listening.getHost().port
    zone = Zone()
    zone.set("chat.example", A("127.0.0.2"))
    text = support.configText(
        [("chat", f"wss://chat.example:{port}", "resolve = 0.1", f"ca = {caFile}")],
        lbws="admin_token = s3cret\nhost_header = backend",
        health="interval = 0.1\ntimeout = 1\nfall = 1\nrise = 1",
        probe="websocket",
        dashboard="tcp:0:interface=127.0.0.1",
    )
    service = await harness.start(
        makeLbws(reactor, parseConfig(text, "t.ini"), resolver=harness.dnsServer(zone).resolver())
    )
    url = service.url
    dashboard = service.dashboardUrl
    name = f"chat/127.0.0.2:{port}"
    await eventually(lambda: name in service.pool.members and service.pool[name].state == UP)
    c = await harness.client(url)
    assert (await request(c))["headers"]["host"] == f"chat.example:{port}"

    response = await Agent(reactor).request(
        b"POST",
        f"{dashboard}/backends/chat%2F127.0.0.2:{port}/drain".encode(),
        Headers({"Authorization": ["Bearer s3cret"]}),
    )
    assert response.code == 200
    await readBody(response)
    assert service.pool[name].drained and service.pool[name].state == DRAINING


@pytest_twisted.ensureDeferred
async def test_an_ipv6_address_found_by_dns_relays_and_is_checked(harness):
    """
    chat.example has only an AAAA record, ::1: its member connects there,
    passes its websocket checks, and keeps the name for the Host header.
    """
    six = await harness.backend("six", interface="::1")
    zone = Zone()
    zone.set("chat.example", AAAA("::1"))
    dnsServer = harness.dnsServer(zone)
    lbws = await harness.lbws(
        [("chat", f"ws://chat.example:{six.port}/app", "resolve = 0.1")],
        dnsServer.resolver(),
    )
    name = f"chat/[::1]:{six.port}"
    await eventually(lambda: name in lbws.pool.members and lbws.pool[name].state == UP)
    client = await harness.client(lbws.url, path="/room")
    seen = await request(client)
    assert seen["headers"]["host"] == f"chat.example:{six.port}"
    assert seen["path"] == "/app/room"
    assert lbws.pool[name].active == 1 and lbws.pool[name].failed == 0
