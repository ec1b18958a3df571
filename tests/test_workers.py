"""
workers = N: a real `twistd lbws` with worker processes sharing its
listening socket, the dashboard summing them, drain on stop, and a worker
that dies being replaced.
"""

import os
import re
import signal
import socket

import psutil
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from lbws.config import IMPLICIT_ROUTE
from tests import support
from tests.test_dashboard import request


@pytest.fixture
def lbws(tmp_path, backend):
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", backend.url)],
            lbws="workers = 2\nping_interval = 0\ndrain_timeout = 5",
            dashboard="tcp:0:interface=127.0.0.1",
        )
    )
    process = support.LbwsProcess(config)
    yield process
    process.stop()


async def dashboardStatus(process):
    response = await request(b"GET", await process.dashboardUrl() + "/status.json")
    return response.json()


def workerPids(process):
    """
    The worker processes alive now (a killed one may linger as a zombie
    until its parent reaps it, or vanish while we look).
    """
    pids = []
    for child in psutil.Process(process.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "lbws.worker" in " ".join(
                child.cmdline()
            ):
                pids.append(child.pid)
        except psutil.Error:
            continue
    return sorted(pids)


async def echo(client, payload, timeout=10):
    client.sendMessage(payload)
    assert await client.messages.get().addTimeout(timeout, reactor) == (payload, False)


@pytest_twisted.ensureDeferred
async def test_workers_relay_and_the_dashboard_sums_them(lbws):
    await support.eventually(lambda: len(workerPids(lbws)) == 2)
    clients = [await support.connect(lbws.url) for _ in range(40)]
    for i, client in enumerate(clients):
        await echo(client, b"hello %d" % i)

    def summed(status):
        # Workers report every STATS_INTERVAL: a report may come between
        # the connects and the echoes, so wait for the message counts too.
        workers = status["workers"]
        (member,) = status["backends"]
        return (
            len(workers) == 2
            and sum(w["connections"] for w in workers) == 40
            and member["messages_in"] == member["messages_out"] == 40
        )

    status = {}

    async def refreshed():
        status.update(await dashboardStatus(lbws))
        return summed(status)

    # The workers report twice a second: ask the dashboard until it adds up.
    await support.eventually(refreshed, timeout=10, step=0.1)
    (member,) = status["backends"]
    assert member["active"] == 40
    assert member["messages_in"] == 40 and member["messages_out"] == 40

    # The parent's history samples the same sums (every 2 s).
    history = {}

    async def sampled():
        response = await request(b"GET", await lbws.dashboardUrl() + "/history.json?range=60")
        history.update(response.json())
        return history["backends"][0]["active"][-1] == 40

    for _ in range(60):
        if await sampled():
            break
        await support.deferLater(0.1)
    (a,) = history["backends"]
    assert a["active"][-1] == history["total"]["active"][-1] == 40, history
    times = history["times"]

    def counted(rates):
        # What the rates add up to: each times the time since the sample before.
        return sum(r * (t - s) for r, t, s in zip(rates[1:], times[1:], times) if r is not None)

    assert round(counted(a["messages_in"])) == round(counted(a["connections"])) == 40
    assert round(counted(history["total"]["connections"])) == 40
    for client in clients:
        client.sendClose(1000)
        await client.closed


@pytest_twisted.ensureDeferred
async def test_stop_drains_every_worker_with_1001(lbws):
    await support.eventually(lambda: len(workerPids(lbws)) == 2)
    clients = [await support.connect(lbws.url) for _ in range(10)]
    for client in clients:
        await echo(client, b"x")
    lbws.signal(signal.SIGTERM)
    for client in clients:
        code, _ = await client.closed
        assert code == 1001
    assert await lbws.exited() == 0


@pytest_twisted.ensureDeferred
async def test_a_dead_worker_is_replaced(lbws):
    await support.eventually(lambda: len(workerPids(lbws)) == 2)
    first = workerPids(lbws)
    os.kill(first[0], signal.SIGKILL)
    await support.eventually(
        lambda: len(workerPids(lbws)) == 2 and workerPids(lbws) != first, timeout=15
    )
    client = await support.connect(lbws.url)
    await echo(client, b"still serving")


# What the supervisor adds up: totals that never go back.


def test_a_members_totals_survive_the_workers_that_counted_them():
    from lbws.backends.pool import Traffic

    traffic = Traffic()
    counts = dict(active=3, total=5, failed=1, messagesIn=7, messagesOut=6, bytesIn=70, bytesOut=60)
    traffic.report(1, counts)
    traffic.report(2, {**counts, "active": 1, "total": 2})
    assert (traffic.count("active"), traffic.count("total")) == (4, 7)
    # Worker 1 ends: its open connections go, its totals stay.
    traffic.forget(1)
    assert (traffic.count("active"), traffic.count("total")) == (1, 7)
    assert traffic.count("messagesIn") == 14 and traffic.count("bytesOut") == 120
    # Its replacement starts from zero under the same index.
    traffic.report(1, {n: 0 for n in counts} | {"active": 1, "total": 1})
    assert (traffic.count("active"), traffic.count("total")) == (2, 8)
    # Worker 2 starts over without the parent seeing it end (lower totals):
    # what it had counted stays too.
    traffic.report(2, {n: 0 for n in counts} | {"total": 1})
    assert (traffic.count("active"), traffic.count("total")) == (1, 9)
    traffic.forget(3)  # a worker that never reported
    assert traffic.count("total") == 9


def test_process_counters_survive_the_workers_that_counted_them():
    from lbws.telemetry.metrics import Counters

    def snapshot(ok, closes, requests, routeOpen, routeOk):
        return {
            "handshakes": {"ok": ok},
            "closes": [["client", 1000, closes]],
            "protocolErrors": [],
            "httpRequests": [["a", "2xx", requests]],
            "routes": [["-", "connections", routeOpen], ["-", "handshakes_ok", routeOk]],
        }

    counters = Counters()
    counters.handshakes["ok"] = 1
    counters.fromWorker(1, snapshot(10, 4, 3, 6, 10))
    counters.fromWorker(2, snapshot(5, 1, 2, 4, 5))
    handshakes, closes, _ = counters.merged()
    assert (handshakes["ok"], closes[("client", 1000)]) == (16, 5)
    routes = counters.routesMerged({("-", "connections"): 0})
    assert (routes[("-", "connections")], routes[("-", "handshakes_ok")]) == (10, 15)
    counters.forgetWorker(1)
    handshakes, closes, _ = counters.merged()
    assert (handshakes["ok"], closes[("client", 1000)]) == (16, 5)
    assert counters.httpMerged()[("a", "2xx")] == 5
    routes = counters.routesMerged({})
    assert (routes[("-", "connections")], routes[("-", "handshakes_ok")]) == (4, 15)
    # A new process as worker 2, unseen: its predecessor's totals stay.
    counters.fromWorker(2, snapshot(1, 0, 0, 1, 1))
    handshakes, closes, _ = counters.merged()
    assert (handshakes["ok"], closes[("client", 1000)]) == (17, 5)
    routes = counters.routesMerged({})
    assert (routes[("-", "connections")], routes[("-", "handshakes_ok")]) == (1, 16)


async def metricSamples(process):
    from prometheus_client.parser import text_string_to_metric_families

    response = await request(b"GET", await process.dashboardUrl() + "/metrics")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


@pytest_twisted.ensureDeferred
async def test_totals_never_go_back_when_a_worker_is_killed(lbws):
    """
    kill -9 of a worker: the totals of /metrics and status.json stay where
    they were at every scrape, the open connections drop to those really
    open, the restart is counted and shown on the timeline, and the new
    worker's traffic adds on top.
    """
    await support.eventually(lambda: len(workerPids(lbws)) == 2)
    clients = [await support.connect(lbws.url) for _ in range(20)]
    for i, client in enumerate(clients):
        await echo(client, b"before %d" % i)

    async def totals():
        samples = await metricSamples(lbws)
        status = await dashboardStatus(lbws)
        (member,) = status["backends"]
        return (
            sample(samples, "lbws_backend_connections_total", backend="a"),
            sample(samples, "lbws_messages_total", backend="a", direction="to_backend"),
            sample(samples, "lbws_handshakes_total", result="ok"),
            member["total"],
            member["messages_in"],
        ), samples, status

    seen = []

    async def counted(expected):
        values, samples, status = await totals()
        seen.append(values)
        return values == expected

    await support.eventually(lambda: counted((20, 20, 20, 20, 20)), step=0.1)
    before, seen[:] = list(seen), []
    victim = workerPids(lbws)[0]
    os.kill(victim, signal.SIGKILL)
    # The killed worker's clients are cut with it.
    lost = []
    for client in clients:
        client.closed.addCallback(lambda _, c=client: lost.append(c))

    async def replaced():
        values, samples, status = await totals()
        seen.append(values)
        pids = workerPids(lbws)
        return (
            len(pids) == 2
            and victim not in pids
            and sum(sample(samples, "lbws_worker_restarts_total", worker=w) for w in "12") == 1
            and status["backends"][0]["active"] == 20 - len(lost)
            and lost
        )

    await support.eventually(replaced, timeout=15, step=0.1)
    assert all(values == (20, 20, 20, 20, 20) for values in seen), seen
    assert all(x <= y for a, b in zip(before, before[1:]) for x, y in zip(a, b)), before
    values, samples, status = await totals()
    open_ = 20 - len(lost)
    assert sample(samples, "lbws_backend_connections_active", backend="a") == open_
    assert sample(samples, "lbws_connections_active") == open_
    assert sum(w["connections"] for w in status["workers"]) == open_
    assert sorted(w["restarts"] for w in status["workers"]) == [0, 1]
    restarted = next(w["index"] for w in status["workers"] if w["restarts"])
    assert sample(samples, "lbws_worker_restarts_total", worker=str(restarted)) == 1
    assert sample(samples, "lbws_worker_connections", worker=str(restarted)) == 0
    events = (await request(b"GET", await lbws.dashboardUrl() + "/events.json")).json()["events"]
    kinds = [(e["kind"], e.get("worker")) for e in events if e["kind"].startswith("worker")]
    assert kinds == [("worker_ended", restarted), ("worker_restarted", restarted)]

    # New traffic adds on top of what the dead worker had counted.
    more = [await support.connect(lbws.url) for _ in range(10)]
    for client in more:
        await echo(client, b"after")
    await support.eventually(lambda: counted((30, 30, 30, 30, 30)), step=0.1)
    for client in clients + more:
        if client not in lost:
            client.sendClose(1000)
            await client.closed


@pytest_twisted.async_yield_fixture
async def second():
    factory, port = await support.startEchoBackend("b")
    yield factory
    for connection in factory.connections:
        if connection.transport is not None:
            connection.transport.abortConnection()
    await port.stopListening()


def openOn(backend):
    return [c for c in backend.connections if c.transport is not None and c.transport.connected]


@pytest_twisted.ensureDeferred
async def test_drained_and_removed_backends_show_draining_summed_over_workers(
    tmp_path, backend, second
):
    """
    With workers, a backend drained by the operator and one removed by a
    reload show as draining with the open connections of every worker, in
    status.json and /metrics, as with one process; the removed one leaves
    once its last connection ended.
    """
    config = tmp_path / "lbws.ini"

    def write(backends):
        config.write_text(
            support.configText(
                backends,
                lbws="workers = 2\nping_interval = 0\ndrain_timeout = 5\nadmin_token = secret\nbalance = round_robin",
                dashboard="tcp:0:interface=127.0.0.1",
            )
        )

    write([("a", backend.url), ("b", second.url)])
    process = support.LbwsProcess(config)
    try:
        await support.eventually(lambda: len(workerPids(process)) == 2)
        clients = [await support.connect(process.url) for _ in range(16)]
        for client in clients:
            await echo(client, b"x")
        onA, onB = len(openOn(backend)), len(openOn(second))
        assert onA + onB == 16 and onA and onB

        async def shows(expected):
            status = await dashboardStatus(process)
            samples = await metricSamples(process)
            got = {}
            for b in status["backends"]:
                name = b["name"]
                got[name] = (
                    b["state"],
                    b["active"],
                    sample(samples, "lbws_backend_state", backend=name, state=b["state"]),
                    sample(samples, "lbws_backend_connections_active", backend=name),
                )
            routes = sample(samples, "lbws_route_connections_active", route=IMPLICIT_ROUTE)
            return got == expected and routes == status["connections"]

        await support.eventually(
            lambda: shows({"a": ("up", onA, 1, onA), "b": ("up", onB, 1, onB)}), step=0.1
        )
        response = await request(
            b"POST", await process.dashboardUrl() + "/backends/a/drain", token="secret"
        )
        assert response.code == 200
        await support.eventually(
            lambda: shows({"a": ("draining", onA, 1, onA), "b": ("up", onB, 1, onB)}), step=0.1
        )

        write([("a", backend.url)])
        process.signal(signal.SIGHUP)
        await process.waitForLine("reloaded")
        # b is gone from the file, not from the dashboard: it drains.
        for _ in range(10):  # several reports of each worker
            assert await shows({"a": ("draining", onA, 1, onA), "b": ("draining", onB, 1, onB)})
            await support.deferLater(0.1)
        for connection in openOn(second):
            connection.sendClose(1000)
        await support.eventually(lambda: shows({"a": ("draining", onA, 1, onA)}), step=0.1)
        assert not openOn(second)
        for client in clients:
            client.transport.abortConnection()
    finally:
        process.stop()


def evenly(workers, total, count=3, tolerance=0.3):
    """
    Whether C{workers} (status.json's) hold C{total} connections, each
    within C{tolerance} of an even share.
    """
    held = [w["connections"] for w in workers]
    share = total / count
    return (
        len(held) == count
        and sum(held) == total
        and all(abs(n - share) <= tolerance * share for n in held)
    )


@pytest_twisted.ensureDeferred
async def test_clients_spread_evenly_and_a_restarted_worker_takes_its_share(tmp_path, backend):
    """
    60 clients over 3 workers: each holds 20 +/- 30%; after one is killed
    and started again, 60 more bring every worker to an even share again
    (the restarted one takes the new clients until it has caught up).
    """
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", backend.url)],
            lbws="workers = 3\nping_interval = 0\ndrain_timeout = 5",
            dashboard="tcp:0:interface=127.0.0.1",
        )
    )
    process = support.LbwsProcess(config)
    clients = []
    try:
        await support.eventually(lambda: len(workerPids(process)) == 3)
        status = {}

        async def spread(total):
            status.update(await dashboardStatus(process))
            return evenly(status["workers"], total)

        for i in range(60):
            clients.append(await support.connect(process.url))
            await echo(clients[-1], b"first %d" % i)
        await support.eventually(lambda: spread(60), step=0.1)
        first = [w["connections"] for w in status["workers"]]

        victim = workerPids(process)[1]
        os.kill(victim, signal.SIGKILL)
        lost = []
        for client in clients:
            client.closed.addCallback(lambda _, c=client: lost.append(c))

        async def restarted():
            status.update(await dashboardStatus(process))
            return (
                len(workerPids(process)) == 3
                and victim not in workerPids(process)
                and sum(w["restarts"] for w in status["workers"]) == 1
                and sum(w["connections"] for w in status["workers"]) == 60 - len(lost)
            )

        await support.eventually(restarted, timeout=15, step=0.1)
        assert 14 <= len(lost) <= 26, (first, len(lost))
        for i in range(60):
            clients.append(await support.connect(process.url))
            await echo(clients[-1], b"second %d" % i)
        await support.eventually(lambda: spread(120 - len(lost)), step=0.1)
    finally:
        for client in clients:
            if client.transport.connected:
                client.transport.abortConnection()
        process.stop()


@pytest_twisted.ensureDeferred
async def test_backend_events_are_logged_once_not_once_per_worker(tmp_path, backend):
    """
    A backend that fails the workers' real connections goes down once in
    the log (the supervisor's verdict), not once per process; a reload
    that removes it says so once, and so does its leaving.
    """
    dead = support.reservedPort()
    config = tmp_path / "lbws.ini"

    def write(backends):
        config.write_text(
            support.configText(
                backends,
                lbws="workers = 2\nping_interval = 0\ndrain_timeout = 5\nbalance = round_robin",
                health="interval = 60\nfall = 1",
                dashboard="tcp:0:interface=127.0.0.1",
            )
        )

    write([("a", backend.url), ("b", f"ws://127.0.0.1:{dead.getsockname()[1]}")])
    process = support.LbwsProcess(config)
    clients = []
    try:
        await support.eventually(lambda: len(workerPids(process)) == 2)
        for i in range(8):
            clients.append(await support.connect(process.url))
            await echo(clients[-1], b"%d" % i)

        async def down():
            status = await dashboardStatus(process)
            return {b["name"]: b["state"] for b in status["backends"]}["b"] == "down"

        await support.eventually(down, step=0.1)
        failed = [line for line in process.lines if "backend b failed for" in line]
        assert failed  # each failed connect, by the worker that met it
        write([("a", backend.url)])
        process.signal(signal.SIGHUP)
        await process.waitForLine("reloaded")
        await process.waitForLine("backend b left the pool")
        for client in clients:
            client.sendClose(1000)
            await client.closed
    finally:
        process.stop()
        dead.close()
    log = "".join(process.lines)
    assert log.count("backend b is down") == 1, log
    assert log.count("backend b removed") == 1, log
    assert log.count("backend b left the pool") == 1, log


@pytest_twisted.ensureDeferred
async def test_wss_through_workers_bad_tls_clients_add_up_in_one_line(tmp_path, backend):
    """
    workers = 2 with TLS: plain HTTP to the TLS port gets the 400 from
    whichever worker it reaches, failed handshakes leave no error line, and
    the supervisor counts them all (/metrics) and logs them in one line.
    """
    import trustme

    from lbws.transport.listen import PLAIN_HTTP_REFUSED
    from tests.test_tls import plainAnswer, tryVersions
    from OpenSSL import SSL

    cert = trustme.CA().issue_cert("localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", backend.url)],
            lbws="workers = 2\nping_interval = 0\ndrain_timeout = 5",
            listen=f"ssl:0:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}"
            f":certKey={tmp_path / 'cert.pem'}",
            dashboard="tcp:0:interface=127.0.0.1",
        )
    )
    process = support.LbwsProcess(config)
    try:
        await support.eventually(lambda: len(workerPids(process)) == 2)
        for _ in range(4):
            answer = await plainAnswer(process.port, b"GET /x HTTP/1.1\r\nHost: y\r\n\r\n")
            assert answer == PLAIN_HTTP_REFUSED
        for _ in range(2):
            assert not isinstance(
                await tryVersions(process.port, SSL.TLS1_VERSION, SSL.TLS1_VERSION), bytes
            )

        async def counted():
            samples = await metricSamples(process)
            return (
                sample(samples, "lbws_client_tls_failures_total",
                       reason="plain HTTP request (answered 400)"),
                sample(samples, "lbws_client_tls_failures_total", reason="unsupported protocol"),
            ) == (4, 2)

        await support.eventually(counted, step=0.1)
        process.signal(signal.SIGTERM)
        assert await process.exited() == 0
    finally:
        process.stop()
    log = "".join(process.lines)
    lines = [line for line in process.lines if "client TLS handshake(s) failed" in line]
    assert len(lines) == 1 and "6 client TLS handshake(s)" in lines[0], lines
    assert "(in )" not in log and "SSL error" not in log
    assert not re.search(r"#(error|critical)\]", log), log


# The supervisor's choice of a worker, with a reactor the test drives.


class SpawningReactor(MemoryReactorClock):
    """
    Records the worker processes it is asked to start, keeping each one's
    end of its channel as a forked child would.
    """

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, processProtocol, executable, args, env, childFDs):
        from lbws.workers import CHANNEL_FD

        end = socket.socket(fileno=os.dup(childFDs[CHANNEL_FD]))
        end.setblocking(False)
        self.spawned.append((processProtocol, end))
        processProtocol.makeConnection(StringTransport())
        return processProtocol


class Listening:
    """
    A listener whose port is a real listening socket on 127.0.0.1.
    """

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)

    def whenListening(self):
        return succeed(self)

    def stopReading(self):
        pass

    def fileno(self):
        return self.socket.fileno()

    def getHost(self):
        return IPv4Address("TCP", *self.socket.getsockname())


def handedTo(end):
    """
    The clients that reached a worker's end of its channel since the last
    look (their descriptors are closed).
    """
    fds = []
    while True:
        try:
            _, got, _, _ = socket.recv_fds(end, 16, 4)
        except BlockingIOError:
            break
        fds += got
    for fd in fds:
        os.close(fd)
    return fds


def report(clients, received):
    return {
        "members": {},
        "counters": {"handshakes": {}, "closes": [], "protocolErrors": []},
        "clients": clients,
        "received": received,
        "tlsFailures": {},
        "generation": 0,
        "shedding": [{}, {}],
    }


def test_each_client_goes_to_the_worker_holding_the_fewest():
    from lbws.config import parseConfig
    from lbws.core import buildCore
    from lbws.workers import Workers

    reactor = SpawningReactor()
    core = buildCore(reactor, parseConfig("[backend:a]\nurl = ws://127.0.0.1:1\n", "t.ini"))
    listening = Listening()
    workers = Workers(reactor, core, listening, 2)
    workers.startService()
    (one, first), (two, second) = reactor.spawned
    clients = []

    def connect(count):
        for _ in range(count):
            clients.append(socket.create_connection(listening.socket.getsockname()))
        for reader in list(reactor.getReaders()):
            reader.doRead()

    try:
        connect(6)
        # Nothing reported yet: they alternate.
        assert (len(handedTo(first)), len(handedTo(second))) == (3, 3)
        # Worker 1 says it holds 9 (old clients), worker 2 holds its 3:
        # the next 6 all go to worker 2, then they alternate again.
        workers.statsFrom(1, report(clients=9, received=3))
        workers.statsFrom(2, report(clients=3, received=3))
        connect(6)
        assert (len(handedTo(first)), len(handedTo(second))) == (0, 6)
        connect(2)
        assert (len(handedTo(first)), len(handedTo(second))) == (1, 1)
        assert [w["connections"] for w in workers.workers()] == [9, 3]
        # A worker that ended gets nothing more.
        workers.ended(two, Failure(ProcessTerminated(signal=9)))
        connect(2)
        assert len(handedTo(first)) == 2
        assert [w["index"] for w in workers.workers()] == [1]
    finally:
        workers.stopService()
        for client in clients:
            client.close()
        for _, end in reactor.spawned:
            end.close()
        listening.socket.close()


def test_a_removed_backend_leaves_once_every_worker_reported_with_the_new_config():
    """
    A report taken before a worker applied the reload may say "no
    connection" to a backend that the worker still has: the supervisor
    keeps a removed backend, draining, until every worker reported with
    the new generation.
    """
    from lbws.config import parseConfig
    from lbws.core import buildCore
    from lbws.workers import Workers

    both = parseConfig(
        "[backend:a]\nurl = ws://127.0.0.1:1\n[backend:b]\nurl = ws://127.0.0.1:2\n", "t.ini"
    )
    reactor = SpawningReactor()
    core = buildCore(reactor, both)
    listening = Listening()
    workers = Workers(reactor, core, listening, 2)
    workers.startService()

    def stats(generation, bActive):
        counts = dict(active=0, total=0, failed=0, messagesIn=0, messagesOut=0, bytesIn=0,
                      bytesOut=0, lastError="")
        members = {"a": counts, "b": {**counts, "active": bActive, "total": bActive}}
        return {**report(clients=bActive, received=0), "members": members,
                "generation": generation}

    try:
        workers.statsFrom(1, stats(0, 2))
        workers.statsFrom(2, stats(0, 0))
        assert core.pool["b"].count("active") == 2
        core.apply(parseConfig("[backend:a]\nurl = ws://127.0.0.1:1\n", "t.ini"))
        workers.apply(core.settings)
        assert core.pool["b"].state == "draining"
        # Reports from before the workers applied the reload: b stays.
        workers.statsFrom(1, stats(0, 0))
        workers.statsFrom(2, stats(0, 0))
        assert core.pool["b"].state == "draining"
        workers.statsFrom(1, stats(1, 1))
        workers.statsFrom(2, stats(1, 0))
        assert core.pool["b"].count("active") == 1
        # Worker 1's last connection to b ended.
        workers.statsFrom(1, stats(1, 0))
        assert "b" not in core.pool.members
    finally:
        workers.stopService()
        for _, end in reactor.spawned:
            end.close()
        listening.socket.close()
