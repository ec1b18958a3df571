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


def writeConfig(path, backends, lbws=""):
    path.write_text(support.configText(backends, lbws=lbws))
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
