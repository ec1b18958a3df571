"""
Reloading the config file: Pool.update on its own, then LbwsService.reload
with real backends and clients, in-process. The SIGHUP path through a real
twistd is in test_signals.
"""

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogPublisher

from lbws.config import loadConfig, parseConfig
from lbws.backends.pool import DOWN, DRAINING, UP, Pool
from lbws.service import makeLbws
from tests import support
from tests.support import setActive, started


def settingsFor(backends, lbws="", health=""):
    return parseConfig(support.configText(backends, lbws=lbws, health=health), "t.ini")


class TestPoolUpdate:
    def test_added(self):
        """
        A new backend joins not healthy, so that it gets connections only
        after passing its health checks; the others keep their state.
        """
        pool = Pool(settingsFor([("a", "ws://h:1")]))
        setActive(pool["a"], 2)
        pool.update(settingsFor([("a", "ws://h:1"), ("b", "ws://h:2")]))
        assert list(pool.members) == ["a", "b"]
        assert pool["a"].state == UP and pool["a"].active == 2
        assert pool["b"].state == DOWN and not pool["b"].healthy
        assert pool.choose() is pool["a"]
        for _ in range(2):
            pool["b"].recordCheck(True, 0, rise=2, fall=2)
        assert pool["b"].state == UP

    def test_removedDrainsThenLeaves(self):
        """
        A removed backend with open connections stays, draining, until the
        last one ends; one without connections leaves at once.
        """
        pool = Pool(settingsFor([("a", "ws://h:1"), ("b", "ws://h:2"), ("c", "ws://h:3")]))
        a = pool["a"]
        setActive(a, 2)
        pool.update(settingsFor([("c", "ws://h:3")]))
        assert list(pool.members) == ["c", "a"]
        assert a.removed and a.state == DRAINING
        assert pool.choose() is pool["c"]
        setActive(a, a.active - 1)
        pool.leaveIfIdle(a)
        assert "a" in pool.members
        setActive(a, a.active - 1)
        pool.leaveIfIdle(a)
        assert list(pool.members) == ["c"]

    def test_removedStaysWhileAWorkerReportsIt(self):
        """
        With workers = N the parent has no connections of its own: a
        removed backend stays (draining, on the dashboard) while a worker
        still reports it, whatever counts that report had, and leaves once
        no worker does (a worker lets it go with its last connection).
        """
        pool = Pool(settingsFor([("a", "ws://h:1"), ("b", "ws://h:2")]))
        b = pool["b"]
        b.traffic.report(1, {"active": 0})  # reported before its newest clients
        b.traffic.report(2, {"active": 3})
        pool.update(settingsFor([("a", "ws://h:1")]))
        assert pool["b"] is b and b.state == DRAINING and b.count("active") == 3
        b.traffic.forget(2)
        pool.leaveIfIdle(b)
        assert "b" in pool.members
        b.traffic.forget(1)
        pool.leaveIfIdle(b)
        assert list(pool.members) == ["a"]

    def test_addedBackWhileDraining(self):
        """
        A backend removed and added again before its connections ended is
        the same member (its counts go on) and joins again after its checks.
        """
        pool = Pool(settingsFor([("a", "ws://h:1"), ("b", "ws://h:2")]))
        a = pool["a"]
        setActive(a, 1)
        pool.update(settingsFor([("b", "ws://h:2")]))
        pool.update(settingsFor([("a", "ws://h:1"), ("b", "ws://h:2")]))
        assert pool["a"] is a
        assert not a.removed and a.state == DOWN and a.active == 1
        setActive(a, a.active - 1)
        pool.leaveIfIdle(a)
        assert pool["a"] is a

    def test_changed(self):
        """
        A new weight applies at once and keeps the health; a new address
        starts the health over.
        """
        pool = Pool(settingsFor([("a", "ws://h:1"), ("b", "ws://h:2")]))
        pool.update(
            settingsFor([("a", "ws://h:1", "weight = 5"), ("b", "ws://other:2/app")])
        )
        assert pool["a"].weight == 5 and pool["a"].state == UP
        assert pool["b"].settings.host == "other" and pool["b"].state == DOWN

    def test_balance(self):
        """
        A new balancing strategy is used from the next choice on.
        """
        backends = [("a", "ws://h:1"), ("b", "ws://h:2", "weight = 3")]
        pool = Pool(settingsFor(backends))
        setActive(pool["b"], 6)
        setActive(pool["a"], 1)
        assert pool.choose() is pool["a"]
        pool.update(settingsFor(backends, lbws="balance = round_robin"))
        picks = [pool.choose().name for _ in range(4)]
        assert sorted(picks) == ["a", "b", "b", "b"]


def writeConfig(path, backends, lbws="", health=""):
    path.write_text(support.configText(backends, lbws=lbws, health=health))
    return path


async def startFromFile(path):
    return await started(makeLbws(reactor, loadConfig(path)))


class LogCapture:
    def __init__(self):
        self.events = []

    def __enter__(self):
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)


async def echo(client, text, timeout=5):
    client.sendMessage(text.encode())
    payload, isBinary = await client.messages.get().addTimeout(timeout, reactor)
    assert (payload, isBinary) == (text.encode(), False)


def backendOf(client, backends):
    """
    The name of the in-process backend that a client's connection reached.
    """
    [name] = [
        factory.name
        for factory in backends
        if any(c.request.headers.get("x-client") == client.tag for c in factory.connections)
    ]
    return name


async def openClients(url, count, tagPrefix):
    clients = []
    for i in range(count):
        tag = f"{tagPrefix}{i}"
        client = await support.connect(url, headers={"X-Client": tag})
        client.tag = tag
        clients.append(client)
    return clients


@pytest_twisted.async_yield_fixture
async def backends():
    """
    Starts in-process echo backends by name; they stop after the test.
    """
    started = []

    async def start(*names):
        for name in names:
            factory, port = await support.startEchoBackend(name)
            started.append((factory, port))
        return [factory for factory, port in started[-len(names):]]

    yield start
    for factory, port in started:
        for connection in factory.connections:
            if connection.transport is not None:
                connection.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_reloadKeepsEveryConnection(tmp_path, backends):
    """
    A reload that removes a backend, adds one and changes weights and
    limits drops no open connection, not even a message in flight across
    it; the removed backend gets no new client and leaves once its last one
    closes; the added one gets clients once its checks pass; the new limits
    apply to new connections.
    """
    a, b, c = await backends("a", "b", "c")
    config = writeConfig(
        tmp_path / "lbws.ini",
        [("a", a.url), ("b", b.url)],
        lbws="balance = round_robin\nping_interval = 0",
        health="interval = 0.1\nrise = 2",
    )
    service = await startFromFile(config)
    clients = []
    try:
        clients = await openClients(service.url, 10, "old")
        onA = [cl for cl in clients if backendOf(cl, [a, b]) == "a"]
        assert len(onA) == 5
        for client in clients:
            await echo(client, "before")

        writeConfig(
            config,
            [("b", b.url, "weight = 2"), ("c", c.url)],
            lbws="balance = round_robin\nping_interval = 0\nmax_connections = 14",
            health="interval = 0.1\nrise = 2",
        )
        # A message from every client is in flight while the reload runs.
        for client in clients:
            client.sendMessage(b"across")
        assert service.reload() is True
        for client in clients:
            payload, _ = await client.messages.get().addTimeout(5, reactor)
            assert payload == b"across"
            await echo(client, "after")
            assert not client.closed.called

        pool = service.pool
        assert pool["a"].state == DRAINING and pool["a"].active == 5
        assert pool["b"].weight == 2
        assert pool["c"].state == DOWN
        assert service.relay.settings.max_connections == 14
        assert service.dialer.settings is service.settings

        # c is down until the health checker has seen it pass `rise` checks,
        # and a is draining: new clients go to b only.
        assert set(service.health.checking()) == {pool["b"], pool["c"]}
        assert {pool.choose().name for _ in range(10)} == {"b"}
        await support.eventually(lambda: pool["c"].state == UP)
        # 10 open: four more fit max_connections = 14, and round robin by
        # weight (b 2, c 1) gives one of them to c; the next is refused.
        last = await openClients(service.url, 4, "last")
        clients += last
        assert [backendOf(cl, [a, b, c]) for cl in last] == ["b", "c", "b", "b"]
        with pytest.raises(support.HandshakeFailed) as refused:
            await support.connect(service.url)
        assert refused.value.status == 503

        # The clients of a close as they please; then a leaves the pool.
        for client in onA:
            client.sendClose(1000, "done")
            code, _ = await client.closed.addTimeout(5, reactor)
            assert code == 1000
        await support.eventually(lambda: "a" not in pool.members)
        assert list(pool.members) == ["b", "c"]
        for client in clients:
            if client not in onA:
                await echo(client, "still here")
    finally:
        for client in clients:
            client.transport.abortConnection()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_badConfigKeepsRunningOne(tmp_path, backends):
    """
    A file that does not load is refused with a logged error naming the
    file, section and key; the running config and connections stay.
    """
    (a,) = await backends("a")
    config = writeConfig(tmp_path / "lbws.ini", [("a", a.url)])
    service = await startFromFile(config)
    client = None
    try:
        client = await support.connect(service.url)
        running = service.settings
        writeConfig(config, [("a", a.url)], lbws="max_connections = lots")
        with LogCapture() as log:
            assert service.reload() is False
        [error] = [e for e in log.events if e.get("log_level").name == "error"]
        assert error["path"] == str(config)
        assert (error["section"], error["key"]) == ("lbws", "max_connections")
        assert "'lots' is not a whole number" in error["error"]
        assert str(config) in error["error"]
        assert service.settings is running
        assert service.relay.settings is running
        await echo(client, "still here")

        config.write_text("not an ini file")
        assert service.reload() is False
        config.unlink()
        assert service.reload() is False
        assert service.settings is running
        await echo(client, "still here")
    finally:
        if client is not None:
            client.transport.abortConnection()
        await service.stopService()


@pytest.mark.parametrize("key", ["listen", "dashboard"])
@pytest_twisted.ensureDeferred
async def test_restartOnlyKeysRefused(tmp_path, backends, key):
    """
    A new listen or dashboard endpoint needs a restart: the reload is
    refused as a whole and says so.
    """
    (a,) = await backends("a")
    config = writeConfig(tmp_path / "lbws.ini", [("a", a.url)])
    service = await startFromFile(config)
    try:
        text = config.read_text()
        if key == "listen":
            text = text.replace("listen = tcp:0:interface=127.0.0.1", "listen = tcp:0")
        else:
            text = text.replace("dashboard = \n", "dashboard = tcp:0\n")
        config.write_text(text.replace("[backend:a]", "[backend:b]"))
        with LogCapture() as log:
            assert service.reload() is False
        [error] = [e for e in log.events if e.get("log_level").name == "error"]
        assert error["key"] == key
        assert "restart" in error["error"]
        assert list(service.pool.members) == ["a"]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_reloadWhileStopping(tmp_path, backends):
    (a,) = await backends("a")
    config = writeConfig(tmp_path / "lbws.ini", [("a", a.url)])
    service = await startFromFile(config)
    stopped = service.stopService()
    assert service.reload() is False
    await stopped


@pytest_twisted.async_yield_fixture
async def silentBackend():
    factory = support.silentFactory()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    factory.url = f"ws://127.0.0.1:{port.getHost().port}"
    yield factory
    for connection in factory.connections:
        connection.transport.abortConnection()
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_removedBackendLeavesAfterFailedDial(tmp_path, backends, silentBackend):
    """
    A removed backend whose last use was a connection attempt that failed
    leaves the pool too.
    """
    (a,) = await backends("a")
    config = writeConfig(
        tmp_path / "lbws.ini",
        [("a", a.url), ("silent", silentBackend.url)],
        lbws="handshake_timeout = 0.5\nretries = 0",
    )
    service = await startFromFile(config)
    try:
        silent = service.pool["silent"]
        service.pool["a"].admin.drain()
        attempt = defer.ensureDeferred(support.connect(service.url))
        await support.eventually(lambda: silent.active == 1)
        writeConfig(config, [("a", a.url)])
        assert service.reload()
        assert silent.removed and service.pool.members.get("silent") is silent
        with pytest.raises(support.HandshakeFailed) as failed:
            await attempt
        assert failed.value.status == 502  # its handshake timed out
        assert "silent" not in service.pool.members
    finally:
        await service.stopService()
