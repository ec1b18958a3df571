"""
Signals to a real `twistd -n lbws` process: SIGHUP reloads, SIGTERM and
SIGINT drain and exit 0, a second one stops at once.
"""

import signal
import time

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests import support, wire
from tests.test_dashboard import request


@pytest.fixture
def processes():
    """
    Starts `twistd lbws` processes; every one is stopped after the test.
    """
    started = []

    def start(config, *args, **kwargs):
        process = support.LbwsProcess(config, *args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def writeConfig(path, backends, lbws="", dashboard=""):
    path.write_text(support.configText(backends, lbws=lbws, dashboard=dashboard))
    return path


async def echo(client, text, timeout=5):
    client.sendMessage(text.encode())
    payload, isBinary = await client.messages.get().addTimeout(timeout, reactor)
    assert (payload, isBinary) == (text.encode(), False)


@pytest_twisted.ensureDeferred
async def test_sighupReloads(tmp_path, backend, processes):
    """
    SIGHUP applies a new file to new connections and keeps the open one;
    a bad file is refused with a message naming file, section and key.
    """
    config = writeConfig(tmp_path / "lbws.ini", [("a", backend.url)])
    lbws = processes(config)
    client = await support.connect(lbws.url)
    try:
        await echo(client, "one")

        writeConfig(config, [("a", backend.url)], lbws="max_connections = 1")
        mark = len(lbws.lines)
        lbws.signal(signal.SIGHUP)
        await lbws.waitForLine(r"reloaded .*lbws\.ini", after=mark)
        await echo(client, "two")
        with pytest.raises(support.HandshakeFailed) as refused:
            await support.connect(lbws.url)
        assert refused.value.status == 503

        writeConfig(config, [("a", backend.url)], lbws="max_connections = -1")
        mark = len(lbws.lines)
        lbws.signal(signal.SIGHUP)
        line = await lbws.waitForLine(r"reload refused", after=mark)
        assert f"{config}: [lbws] max_connections: '-1' must be at least 1" in line
        await echo(client, "three")
    finally:
        client.sendClose(1000)
        await client.closed.addTimeout(5, reactor)
    assert lbws.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest_twisted.ensureDeferred
async def test_stopSignalDrains(tmp_path, backend, processes, signum):
    """
    SIGTERM or SIGINT: the client gets 1001, the backend leg is closed
    cleanly with 1001 too, and twistd exits 0.
    """
    config = writeConfig(tmp_path / "lbws.ini", [("a", backend.url)])
    lbws = processes(config)
    client = await support.connect(lbws.url)
    await echo(client, "hello")
    lbws.signal(signum)
    code, reason = await client.closed.addTimeout(10, reactor)
    assert (code, reason) == (1001, "lbws is stopping")
    assert await lbws.exited(timeout=10) == 0
    assert backend.closes == [(True, 1001, "lbws is stopping")]
    output = "".join(lbws.lines)
    assert f"received {signal.Signals(signum).name}: stopping" in output
    assert "close 1001 by lbws" in output
    assert "Traceback" not in output


@pytest_twisted.ensureDeferred
async def test_secondSignalStopsAtOnce(tmp_path, backend, processes):
    """
    A client that never answers the close would hold lbws for
    drain_timeout; a second signal cuts it and lbws exits 0 at once.
    """
    config = writeConfig(
        tmp_path / "lbws.ini", [("a", backend.url)], lbws="drain_timeout = 60"
    )
    lbws = processes(config)
    client = await wire.rawOpen(lbws.url)
    started = time.monotonic()
    lbws.signal(signal.SIGTERM)
    close = await client.closeFrame()
    assert close.closeCode == 1001
    mark = len(lbws.lines)
    lbws.signal(signal.SIGINT)
    await client.closed.addTimeout(10, reactor)
    assert await lbws.exited(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert "received SIGINT again: closing 1 connection(s) now" in "".join(lbws.lines[mark:])


async def healthz(dashboard):
    return (await request(b"GET", dashboard + "/healthz")).code


@pytest.mark.parametrize("workers", [1, 2])
@pytest_twisted.ensureDeferred
async def test_stopDelayKeepsAcceptingWhileHealthzSays503(tmp_path, backend, processes, workers):
    """
    stop_delay: after SIGTERM /healthz answers 503 at once, a new client is
    still accepted for stop_delay seconds (so an outer balancer can take
    lbws out first), then every client gets 1001 and lbws exits 0; with
    workers = N the parent does the same.
    """
    delay = 3.0
    config = writeConfig(
        tmp_path / "lbws.ini",
        [("a", backend.url)],
        lbws=f"stop_delay = {delay:g}\ndrain_timeout = 5\nping_interval = 0\nworkers = {workers}",
        dashboard="tcp:0:interface=127.0.0.1",
    )
    lbws = processes(config)
    dashboard = await lbws.dashboardUrl()
    assert await healthz(dashboard) == 200
    before = await support.connect(lbws.url)
    await echo(before, "before")

    mark = len(lbws.lines)
    signalled = time.monotonic()
    lbws.signal(signal.SIGTERM)
    await lbws.waitForLine(r"received SIGTERM: stopping", after=mark)
    assert await healthz(dashboard) == 503
    during = await support.connect(lbws.url)
    await echo(during, "during")
    await echo(before, "still open")
    # Else this test proved nothing about the delay.
    assert time.monotonic() - signalled < delay

    for client in (before, during):
        code, reason = await client.closed.addTimeout(delay + 10, reactor)
        assert (code, reason) == (1001, "lbws is stopping")
    # lbws handles the signal after it was sent, never before; 0.05 s of
    # margin for the two processes' clocks and the timer's granularity.
    assert time.monotonic() - signalled >= delay - 0.05
    assert await lbws.exited(timeout=15) == 0
    assert "Traceback" not in "".join(lbws.lines)


@pytest_twisted.ensureDeferred
async def test_secondSignalDuringStopDelayCutsAtOnce(tmp_path, backend, processes):
    """
    A second signal while lbws still waits out stop_delay cuts every
    connection and exits 0 at once, as it does during the drain.
    """
    config = writeConfig(
        tmp_path / "lbws.ini", [("a", backend.url)], lbws="stop_delay = 60\ndrain_timeout = 60"
    )
    lbws = processes(config)
    client = await support.connect(lbws.url)
    await echo(client, "hello")
    started = time.monotonic()
    mark = len(lbws.lines)
    lbws.signal(signal.SIGTERM)
    await lbws.waitForLine(r"received SIGTERM: stopping", after=mark)
    await echo(client, "still open")
    lbws.signal(signal.SIGTERM)
    code, _ = await client.closed.addTimeout(10, reactor)
    assert code != 1001  # cut, not closed
    assert await lbws.exited(timeout=10) == 0
    assert time.monotonic() - started < 10
    assert "received SIGTERM again: closing 1 connection(s) now" in "".join(lbws.lines[mark:])
