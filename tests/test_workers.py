"""
workers = N: a real `twistd lbws` with worker processes sharing its
listening socket, the dashboard summing them, drain on stop, and a worker
that dies being replaced.
"""

import os
import signal

import psutil
import pytest
import pytest_twisted
from twisted.internet import reactor

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
