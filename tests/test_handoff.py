"""
Take-over (`twistd lbws --take-over`, lbws.ops.handoff) end to end: real
`twistd lbws` processes, a real echo backend, real clients streaming
numbered messages while a new process takes the listener and the tunnels
of the running one.
"""

import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred

from lbws.ops.handoff import VERSION
from tests import support, wire
from tests.test_dashboard import request
from tests.test_signals import processes, writeConfig  # noqa: F401 (a fixture)
from tests.test_tls import connectTls, harness, pki, sslListen  # noqa: F401 (fixtures)


def handoffConfig(tmp_path, backend, extra=""):
    return writeConfig(
        tmp_path / "lbws.ini",
        [("a", backend.url)],
        lbws=f"handoff_socket = {tmp_path}/handoff.sock\ndrain_timeout = 5\n{extra}",
        dashboard="tcp:0:interface=127.0.0.1",
    )


class Streamer:
    """
    A client sending numbered messages one after another, each once the
    echo of the one before came back: any loss, duplicate or reordering
    shows as an echo that is not the one it waits for.
    """

    def __init__(self, client, name):
        self.client = client
        self.name = name
        self.sent = 0
        self.running = True
        self.problems = []
        self.done = ensureDeferred(self._run())

    async def _run(self):
        while self.running:
            self.sent += 1
            text = f"{self.name}-{self.sent}".encode()
            self.client.sendMessage(text)
            try:
                echo = await self.client.messages.get().addTimeout(10, reactor)
            except Exception as e:
                self.problems.append(f"{text!r}: no echo ({e!r})")
                return
            if echo != (text, False):
                self.problems.append(f"sent {text!r}, got {echo!r}")
                return


class Prober:
    """
    Opens a connection every 50 ms, checks one round trip and closes it.
    """

    def __init__(self, url):
        self.url = url
        self.opened = 0
        self.problems = []
        self.running = True
        self.done = ensureDeferred(self._run())

    async def _run(self):
        while self.running:
            try:
                client = await support.connect(self.url, timeout=5)
                self.opened += 1
                assert await support.roundTrip(client, b"probe", timeout=5) == (b"probe", False)
                client.sendClose(1000)
                code, _ = await client.closed.addTimeout(5, reactor)
                assert code == 1000, code
            except Exception as e:
                self.problems.append(repr(e))
            await support.deferLater(0.05)


async def getJson(url):
    response = await request(b"GET", url)
    assert response.code == 200
    return json.loads(response.body)


async def stream(url, count):
    clients = [await support.connect(url) for _ in range(count)]
    return [Streamer(client, f"c{i}") for i, client in enumerate(clients)]


async def stopAll(streamers, prober):
    prober.running = False
    for streamer in streamers:
        streamer.running = False
    await DeferredList([s.done for s in streamers] + [prober.done])


async def takeOver(processes, config, old, env=None):  # noqa: F811
    """
    Start a process taking over from C{old}; wait for C{old} to exit.

    @return: the new process, C{old}'s exit code and its handoff line.
    """
    new = processes(config, "--take-over", env=env)
    line = await old.waitForLine(r"handed over to a new lbws", timeout=30)
    code = await old.exited(60)
    return new, code, line


async def takeOversUnderLoad(tmp_path, backend, processes, clients, rounds):  # noqa: F811
    config = handoffConfig(tmp_path, backend)
    old = processes(config)
    dashboard = await old.dashboardUrl()
    streamers = await stream(old.url, clients)
    prober = Prober(old.url)
    await support.eventually(lambda: all(s.sent > 3 for s in streamers) and prober.opened > 2)
    before = list(backend.connections)
    for _ in range(rounds):
        sentBefore = [s.sent for s in streamers]
        probedBefore = prober.opened
        new, code, line = await takeOver(processes, config, old)
        assert code == 0, "".join(old.lines)
        # Every client, and a prober's connection if one was open then.
        moved = int(re.search(r"(\d+) connection\(s\) moved, 0 stay here.*, 0 failed", line).group(1))
        assert clients <= moved <= clients + 1, line
        # The clients kept streaming through the take-over and after it.
        await support.eventually(lambda: all(s.sent > b + 5 for s, b in zip(streamers, sentBefore)))
        # And the prober kept connecting: through the old process, then the new.
        await support.eventually(lambda: prober.opened > probedBefore + 2)
        assert new.port == old.port
        old = new
    await stopAll(streamers, prober)
    assert [p for s in streamers for p in s.problems] == []
    assert prober.problems == []
    for streamer in streamers:
        assert not streamer.client.closed.called
    # Each client is on the backend connection it had: none of those
    # ended, and the only new ones were the prober's.
    probes = [c for c in backend.connections if c not in before]
    assert len(probes) == len(backend.connections) - len(before)
    assert all(c.transport is not None and c.transport.connected for c in before[:clients])
    state = await getJson(dashboard + "/status.json")
    assert state["connections"] == clients
    (member,) = state["backends"]
    # Totals go on: every connection ever made through any of the processes.
    assert member["total"] == len(backend.connections)
    events = await getJson(dashboard + "/events.json")
    handoffs = [e for e in events["events"] if e["kind"] == "handoff"]
    (last,) = handoffs[-1:]
    assert (last["moved"], last["kept"], last["failed"], last["role"]) == (moved, 0, 0, "new")
    for streamer in streamers:
        streamer.client.sendClose(1000)
        assert (await streamer.client.closed.addTimeout(5, reactor))[0] == 1000
    assert old.stop() == 0


@pytest_twisted.ensureDeferred
async def test_a_take_over_moves_every_tunnel_without_a_close(tmp_path, backend, processes):  # noqa: F811
    """
    20 clients streaming numbered messages and a prober opening a
    connection every 50 ms: a take-over loses, duplicates or reorders no
    message, closes nothing, refuses no one; the backend sees no new
    connection but the prober's; the old process exits 0 and the new one
    counts every connection.
    """
    await takeOversUnderLoad(tmp_path, backend, processes, 20, 1)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_two_take_overs_under_100_streaming_clients(tmp_path, backend, processes):  # noqa: F811
    await takeOversUnderLoad(tmp_path, backend, processes, 100, 2)


@pytest_twisted.ensureDeferred
async def test_the_handoff_socket_is_private(tmp_path, backend, processes):  # noqa: F811
    config = handoffConfig(tmp_path, backend)
    lbws = processes(config)
    path = tmp_path / "handoff.sock"
    await support.eventually(path.exists)
    mode = os.stat(path)
    assert stat.S_ISSOCK(mode.st_mode)
    assert stat.S_IMODE(mode.st_mode) == 0o600
    assert mode.st_uid == os.getuid()
    assert lbws.stop() == 0


def exchange(path, message):
    """
    Say C{message} to a handoff socket as a process taking over would, and
    read what comes back until the other end closes.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        data = json.dumps(message).encode()
        sock.sendall(struct.pack("!I", len(data)) + data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    messages = []
    while received:
        (length,) = struct.unpack_from("!I", received)
        messages.append(json.loads(received[4 : 4 + length]))
        received = received[4 + length :]
    return messages


@pytest_twisted.ensureDeferred
async def test_a_new_process_of_another_version_is_refused(tmp_path, backend, processes):  # noqa: F811
    """
    The running lbws refuses a take-over in a version it does not speak,
    and goes on serving its clients.
    """
    config = handoffConfig(tmp_path, backend)
    lbws = processes(config)
    client = await support.connect(lbws.url)
    path = tmp_path / "handoff.sock"
    await support.eventually(path.exists)
    from twisted.internet import threads

    messages = await threads.deferToThread(exchange, path, {"type": "take", "version": VERSION + 1})
    assert [m["type"] for m in messages] == ["hello", "refused"]
    assert messages[0]["version"] == VERSION
    assert f"handoff version {VERSION}, not {VERSION + 1}" in messages[1]["reason"]
    assert await support.roundTrip(client, b"still here") == (b"still here", False)
    # And a later take-over of the right version still works.
    new, code, _ = await takeOver(processes, config, lbws)
    assert code == 0
    assert await support.roundTrip(client, b"moved") == (b"moved", False)
    client.sendClose(1000)
    assert (await client.closed.addTimeout(5, reactor))[0] == 1000
    assert new.stop() == 0


@pytest_twisted.ensureDeferred
async def test_a_running_lbws_of_another_version_is_not_taken_over(tmp_path, backend):
    """
    `--take-over` against a handoff socket speaking another version exits 1
    with a message, before listening or taking anything.
    """
    path = tmp_path / "handoff.sock"
    config = handoffConfig(tmp_path, backend)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer():
        conn, _ = server.accept()
        with conn:
            data = json.dumps({"type": "hello", "version": VERSION + 7, "pid": 1}).encode()
            conn.sendall(struct.pack("!I", len(data)) + data)
            conn.settimeout(10)
            return conn.recv(100)

    from twisted.internet import threads

    heard = threads.deferToThread(answer)
    try:
        result = await threads.deferToThread(
            subprocess.run,
            [str(support.TWISTD), "-n", "--pidfile=", "lbws", "--config", str(config), "--take-over"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1, result
        assert (
            f"lbws: cannot take over: the running lbws speaks handoff version {VERSION + 7},"
            f" this one {VERSION}" in result.stderr
        )
        # It said nothing back: it took nothing.
        assert await heard == b""
    finally:
        server.close()


@pytest_twisted.ensureDeferred
async def test_take_over_without_a_running_lbws_exits_1(tmp_path, backend):
    config = handoffConfig(tmp_path, backend)
    from twisted.internet import threads

    result = await threads.deferToThread(
        subprocess.run,
        [str(support.TWISTD), "-n", "--pidfile=", "lbws", "--config", str(config), "--take-over"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"lbws: cannot take over: no lbws answers on {tmp_path}/handoff.sock" in result.stderr


async def stuckClient(url):
    """
    A client that stopped reading in the middle of a long message its
    backend echoes: its tunnel is not at a frame boundary (and lbws holds
    bytes for it) until it reads again, so it cannot move.
    """
    client = await wire.rawOpen(url)
    seen = len(client.received)
    payload = b"x" * (15 * 1024 * 1024)
    client.send(wire.frame(0x2, payload))
    await support.eventually(lambda: len(client.received) > seen, timeout=30)
    client.transport.pauseProducing()
    return client, payload


@pytest_twisted.ensureDeferred
async def test_the_old_process_keeps_what_it_holds_when_the_new_one_dies(tmp_path, backend, processes):  # noqa: F811
    """
    The new process is killed while a tunnel in the middle of a frame keeps
    the take-over waiting: the old one takes back its listener, keeps that
    tunnel, goes on, and can be taken over later.
    """
    config = handoffConfig(tmp_path, backend, "handoff_timeout = 60")
    old = processes(config)
    movers = await stream(old.url, 3)
    stuck, payload = await stuckClient(old.url)
    new = processes(config, "--take-over")
    await old.waitForLine(r"handoff: 3 connection\(s\) moved so far", timeout=30)
    new.process.kill()
    await old.waitForLine(r"take-over failed: 3 connection\(s\) had moved to the new lbws", timeout=30)
    # The tunnel that stayed reads on and gets the whole echo.
    stuck.transport.resumeProducing()
    echo = await stuck.nextFrame(30)
    assert (echo.opcode, echo.payload == payload) == (0x2, True)
    # The old process accepts again.
    client = await support.connect(old.url)
    assert await support.roundTrip(client, b"again") == (b"again", False)
    # What had moved went with the new process.
    for streamer in movers:
        streamer.running = False
        await streamer.client.closed.addTimeout(15, reactor)
    # A later take-over works.
    later, code, line = await takeOver(processes, config, old)
    assert code == 0
    assert "2 connection(s) moved" in line
    assert await support.roundTrip(client, b"moved") == (b"moved", False)
    stuck.transport.abortConnection()
    client.sendClose(1000)
    await client.closed.addTimeout(5, reactor)
    assert later.stop() == 0


@pytest_twisted.ensureDeferred
async def test_the_new_process_keeps_what_moved_when_the_old_one_dies(tmp_path, backend, processes):  # noqa: F811
    """
    The old process is killed halfway: the new one keeps the listener and
    the tunnels that moved, and serves new clients.
    """
    config = handoffConfig(tmp_path, backend, "handoff_timeout = 60")
    old = processes(config)
    dashboard = await old.dashboardUrl()
    movers = await stream(old.url, 3)
    stuck, _ = await stuckClient(old.url)
    new = processes(config, "--take-over")
    await old.waitForLine(r"handoff: 3 connection\(s\) moved so far", timeout=30)
    await support.eventually(lambda: all(s.sent > 5 for s in movers))
    old.process.kill()
    await new.waitForLine(r"went away during the take-over: 3 connection\(s\) moved", timeout=30)
    marks = [s.sent for s in movers]
    await support.eventually(lambda: all(s.sent > m + 5 for s, m in zip(movers, marks)))
    for streamer in movers:
        streamer.running = False
        await streamer.done
        assert streamer.problems == []
    # The tunnel that could not move went with the old process.
    stuck.transport.resumeProducing()
    await stuck.closed.addTimeout(30, reactor)
    client = await support.connect(new.url)
    assert await support.roundTrip(client, b"new") == (b"new", False)
    assert (await getJson(dashboard + "/status.json"))["connections"] == 4  # 3 moved, 1 new
    client.sendClose(1000)
    await client.closed.addTimeout(5, reactor)
    assert new.stop() == 0
    assert old.stop() == -signal.SIGKILL


@pytest_twisted.ensureDeferred
async def test_the_new_process_becomes_systemds_main_process(tmp_path, backend, processes):  # noqa: F811
    """
    Under Type=notify the new process says MAINPID= with READY=1 once it
    accepts; the old one, no longer the main process, says nothing more
    (no STOPPING=1, which systemd would take for the service's).
    """
    from tests.test_systemd import FakeNotifySocket

    notify = FakeNotifySocket()
    try:
        config = handoffConfig(tmp_path, backend)
        env = {"NOTIFY_SOCKET": notify.address}
        old = processes(config, env=env)
        assert notify.next()["READY"] == "1"
        new, code, _ = await takeOver(processes, config, old, env)
        assert code == 0
        ready = notify.next()
        assert (ready["MAINPID"], ready["READY"]) == (str(new.pid), "1")
        assert notify.pending() == []
        new.signal(signal.SIGTERM)
        assert notify.next() == {"STOPPING": "1"}
        assert await new.exited() == 0
    finally:
        notify.close()


@pytest_twisted.ensureDeferred
async def test_a_wss_client_stays_with_the_old_process_then_gets_1001(
    tmp_path, backend, processes, harness, pki  # noqa: F811
):
    """
    What the README promises a wss client during a take-over: its
    connection goes on in the old process (TLS state cannot move), new wss
    clients are served by the new process, and once drain_timeout has
    passed the old process closes it with 1001 and exits 0.
    """
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", backend.url)],
            listen=sslListen(pki),
            lbws=f"handoff_socket = {tmp_path}/h.sock\ndrain_timeout = 2\n",
        )
    )
    old = processes(config)
    client = await connectTls(harness, old.port, pki["ca-pem"])
    assert await support.roundTrip(client, b"before") == (b"before", False)
    new = processes(config, "--take-over")
    line = await old.waitForLine(r"handed over to a new lbws", timeout=30)
    assert "0 connection(s) moved, 1 stay here" in line
    assert await support.roundTrip(client, b"during") == (b"during", False)
    other = await connectTls(harness, new.port, pki["ca-pem"])
    assert await support.roundTrip(other, b"new") == (b"new", False)
    code, _ = await client.closed.addTimeout(30, reactor)
    assert code == 1001
    assert await old.exited(30) == 0
    assert await support.roundTrip(other, b"still") == (b"still", False)
    other.sendClose(1000)
    await other.closed.addTimeout(5, reactor)
    assert new.stop() == 0


def test_take_over_needs_a_handoff_socket(tmp_path, backend):
    config = writeConfig(tmp_path / "lbws.ini", [("a", backend.url)])
    result = subprocess.run(
        [str(support.TWISTD), "-n", "--pidfile=", "lbws", "--config", str(config), "--take-over"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"lbws: cannot take over: {config}: [lbws] handoff_socket is not set" in result.stderr


@pytest_twisted.ensureDeferred
async def test_a_process_of_another_user_is_refused(tmp_path, backend, processes):  # noqa: F811
    """
    Even with the file's mode opened up, lbws hands nothing to a process of
    another user (SO_PEERCRED): it closes the connection without a hello.
    """
    if os.getuid() != 0:
        pytest.fail("this test runs as root, to connect as user 65534")
    # Where user 65534 can reach (pytest's tmp_path is private to root).
    where = Path(tempfile.mkdtemp(prefix="lbws-handoff-"))
    where.chmod(0o755)
    path = where / "handoff.sock"
    config = writeConfig(
        tmp_path / "lbws.ini", [("a", backend.url)], lbws=f"handoff_socket = {path}\n"
    )
    lbws = processes(config)
    await support.eventually(path.exists)
    # Only lbws's check of the peer's user is left to refuse it.
    os.chmod(path, 0o666)
    from twisted.internet import threads

    script = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.settimeout(10)\n"
        f"s.connect({str(path)!r})\n"
        "sys.stdout.write(repr(s.recv(100)))\n"
    )
    result = await threads.deferToThread(
        subprocess.run,
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (result.returncode, result.stdout) == (0, "b''"), result
    await lbws.waitForLine(r"handoff socket: refused a process of user 65534")
    assert lbws.stop() == 0
    shutil.rmtree(where)


@pytest_twisted.ensureDeferred
async def test_a_new_process_that_does_not_answer_is_given_up(tmp_path, backend, processes):  # noqa: F811
    """
    A taking-over process that stops answering (here: one that only says
    `take`) is given up after handoff_timeout: the old lbws says `abort`,
    and has never stopped accepting.
    """
    config = handoffConfig(tmp_path, backend, "handoff_timeout = 0.5")
    lbws = processes(config)
    client = await support.connect(lbws.url)
    path = tmp_path / "handoff.sock"
    await support.eventually(path.exists)
    from twisted.internet import threads

    messages = await threads.deferToThread(exchange, path, {"type": "take", "version": VERSION})
    assert [m["type"] for m in messages] == ["hello", "listeners", "abort"]
    assert messages[1]["fds"] == 2  # the clients' and the dashboard's sockets
    assert "did not answer within 0.5s" in messages[2]["reason"]
    assert await support.roundTrip(client, b"still") == (b"still", False)
    other = await support.connect(lbws.url)
    assert await support.roundTrip(other, b"new") == (b"new", False)
    await support.eventually(path.exists)  # ready for the next try
    for c in (client, other):
        c.sendClose(1000)
        await c.closed.addTimeout(5, reactor)
    assert lbws.stop() == 0


@pytest_twisted.ensureDeferred
async def test_stopping_during_a_take_over_gives_it_up(tmp_path, backend, processes):  # noqa: F811
    """
    SIGTERM to the old process halfway: it gives the take-over up, and
    drains what it still holds as on any stop (1001); what had moved goes
    on in the new process, which keeps the listener.
    """
    config = handoffConfig(tmp_path, backend, "handoff_timeout = 60")
    old = processes(config)
    movers = await stream(old.url, 3)
    stuck, _ = await stuckClient(old.url)
    new = processes(config, "--take-over")
    await old.waitForLine(r"handoff: 3 connection\(s\) moved so far", timeout=30)
    old.signal(signal.SIGTERM)
    await old.waitForLine(r"take-over given up: lbws is stopping", timeout=30)
    stuck.transport.resumeProducing()
    close = await stuck.closeFrame(30)
    assert close.closeCode == 1001
    assert await old.exited(30) == 0
    marks = [s.sent for s in movers]
    await support.eventually(lambda: all(s.sent > m + 5 for s, m in zip(movers, marks)))
    client = await support.connect(new.url)
    assert await support.roundTrip(client, b"new") == (b"new", False)
    for streamer in movers:
        streamer.running = False
        await streamer.done
        assert streamer.problems == []
        streamer.client.sendClose(1000)
        await streamer.client.closed.addTimeout(5, reactor)
    client.sendClose(1000)
    await client.closed.addTimeout(5, reactor)
    assert new.stop() == 0


@pytest_twisted.ensureDeferred
async def test_a_tunnel_not_at_a_boundary_in_time_stays_then_gets_1001(tmp_path, backend, processes):  # noqa: F811
    """
    A tunnel in the middle of a message for longer than handoff_timeout
    stays in the old process: it works on there, and gets 1001 once
    drain_timeout has passed; then the old process exits 0.
    """
    config = handoffConfig(tmp_path, backend, "handoff_timeout = 0.5")  # drain_timeout = 5
    old = processes(config)
    movers = await stream(old.url, 2)
    stuck, payload = await stuckClient(old.url)
    new = processes(config, "--take-over")
    line = await old.waitForLine(r"handed over to a new lbws", timeout=30)
    assert "2 connection(s) moved, 1 stay here" in line
    # It is still relayed by the old process: its whole echo comes.
    stuck.transport.resumeProducing()
    echo = await stuck.nextFrame(30)
    assert (echo.opcode, echo.payload == payload) == (0x2, True)
    close = await stuck.closeFrame(30)
    assert close.closeCode == 1001
    assert await old.exited(30) == 0
    for streamer in movers:
        streamer.running = False
        await streamer.done
        assert streamer.problems == []
        assert not streamer.client.closed.called
        streamer.client.sendClose(1000)
        await streamer.client.closed.addTimeout(5, reactor)
    assert new.stop() == 0


@pytest_twisted.ensureDeferred
async def test_a_tunnel_behind_the_proxy_protocol_moves_with_its_address(
    tmp_path, backend, processes  # noqa: F811
):
    """
    With `listen = haproxy:...` the tunnel moves too (its PROXY header was
    read long ago), and keeps the client address the header gave: the new
    process's access line names it. The new process reads PROXY headers of
    new clients as the old one did.
    """
    from tests.test_proxy_protocol import connectProxied, proxyV1

    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", backend.url)],
            listen="haproxy:tcp:0:interface=127.0.0.1",
            lbws=f"handoff_socket = {tmp_path}/h.sock\n",
        )
    )
    old = processes(config)
    client = await connectProxied(old.url, proxyV1("192.0.2.7", 4321))
    streamer = Streamer(client, "p")
    await support.eventually(lambda: streamer.sent > 3)
    new, code, line = await takeOver(processes, config, old)
    assert code == 0
    assert "1 connection(s) moved, 0 stay here" in line
    mark = streamer.sent
    await support.eventually(lambda: streamer.sent > mark + 5)
    other = await connectProxied(new.url, proxyV1("198.51.100.9", 1234))
    assert await support.roundTrip(other, b"new") == (b"new", False)
    streamer.running = False
    await streamer.done
    assert streamer.problems == []
    for c in (client, other):
        c.sendClose(1000)
        await c.closed.addTimeout(5, reactor)
    await new.waitForLine(r"192\.0\.2\.7 / via default/a: .* close 1000 by client")
    await new.waitForLine(r"198\.51\.100\.9 / via default/a: .* close 1000 by client")
    assert new.stop() == 0
