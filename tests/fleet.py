"""
Real parts for the fleet tests: HAProxy in TCP mode (the L4 balancer in
front of several lbws instances, sending PROXY protocol v2 and checking
each instance's /healthz), clients that stream numbered messages and
reconnect, and raw clients that ask one instance which backend a key
goes to.
"""

import csv
import io
import json
import socket
import subprocess
import tempfile
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint

from lbws.protocol.frames import OP_TEXT
from tests.support import connect, eventually, handshakeRequest, listeningSocket, stopProcess
from tests.wire import RawWebSocket


class HAProxy:
    """
    HAProxy in mode tcp: its frontend serves a listening socket the test
    made on 127.0.0.1 port 0 (inherited as C{fd@N}); each server is an lbws
    instance reached with C{send-proxy-v2} and checked with C{GET /healthz}
    on its dashboard every 200 ms. Servers are moved with the runtime API
    (C{set server ... addr}), as service discovery would.

    @param servers: C{[(name, relayPort, dashboardPort)]}
    """

    def __init__(self, servers):
        self.dir = tempfile.TemporaryDirectory()
        self.frontend = listeningSocket()
        self.port = self.frontend.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self.socketPath = str(Path(self.dir.name) / "admin.sock")
        lines = "\n".join(
            f"    server {name} 127.0.0.1:{relay} check port {dashboard}"
            for name, relay, dashboard in servers
        )
        config = textwrap.dedent(
            f"""\
            global
                maxconn 4096
                stats socket {self.socketPath} mode 600 level admin
            defaults
                mode tcp
                timeout connect 2s
                timeout client 120s
                timeout server 120s
                timeout check 1s
                retries 3
                option redispatch
            frontend websocket
                bind fd@{self.frontend.fileno()}
                default_backend lbws
            backend lbws
                balance roundrobin
                option httpchk
                http-check send meth GET uri /healthz
                http-check expect status 200
                default-server inter 200ms fall 1 rise 2 send-proxy-v2
            """
        ) + lines + "\n"
        path = Path(self.dir.name) / "haproxy.cfg"
        path.write_text(config)
        self.process = subprocess.Popen(
            ["haproxy", "-db", "-f", str(path)],
            pass_fds=[self.frontend.fileno()],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def command(self, line):
        """
        One runtime API command; its answer as text.
        """
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(5)
            admin.connect(self.socketPath)
            admin.sendall(line.encode() + b"\n")
            answer = b""
            while chunk := admin.recv(65536):
                answer += chunk
        return answer.decode()

    def states(self):
        """
        Each server's status as HAProxy sees it (UP, DOWN, ...), or {} while
        HAProxy is not answering yet.
        """
        try:
            text = self.command("show stat")
        except OSError:
            return {}
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "lbws" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    async def waitFor(self, status, names, timeout=20):
        def reached():
            return all(self.states().get(name, "").startswith(status) for name in names)

        await eventually(reached, timeout=timeout)

    def move(self, name, relayPort, dashboardPort):
        """
        Point server C{name} at a restarted lbws instance.
        """
        for line in (
            f"set server lbws/{name} addr 127.0.0.1 port {relayPort}",
            f"set server lbws/{name} check-port {dashboardPort}",
        ):
            answer = self.command(line)
            assert "error" not in answer.lower() and "unknown" not in answer.lower(), answer

    def stop(self):
        stopProcess(self.process)
        self.frontend.close()
        self.dir.cleanup()


def healthz(dashboardPort):
    """
    The status of an lbws's /healthz, or None when it does not answer.
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboardPort}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def status(dashboardUrl):
    with urllib.request.urlopen(dashboardUrl + "/status.json", timeout=5) as response:
        return json.load(response)


async def backendStates(dashboardUrl):
    """
    The backends' states on one lbws: C{{name: state}} from status.json.
    """
    got = await threads.deferToThread(status, dashboardUrl)
    return {backend["name"]: backend["state"] for backend in got["backends"]}


async def askBackend(url, key, proxyHeader=b"", bindAddress=None, message=b"who"):
    """
    Open a WebSocket at the byte level (after C{proxyHeader}, as an L4
    balancer would send it), with C{X-User-Id: key}, send one text message
    and return the reply's text (the backend prefixes it with its name).
    """
    host, port = url.split("//")[1].rsplit(":", 1)
    factory = protocol.Factory.forProtocol(RawWebSocket)
    client = await TCP4ClientEndpoint(
        reactor, host, int(port), timeout=5, bindAddress=bindAddress
    ).connect(factory)
    try:
        client.send(proxyHeader + handshakeRequest(extra=f"X-User-Id: {key}\r\n"))
        response = await client.response.addTimeout(10, reactor)
        assert response.startswith("HTTP/1.1 101"), response
        client.sendFrame(OP_TEXT, message)
        frame = await client.nextFrame()
        assert frame.opcode == OP_TEXT, frame
        return frame.payload.decode()
    finally:
        client.transport.abortConnection()


class StreamerProtocol(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.streamer.opened(self)

    def onMessage(self, payload, isBinary):
        self.factory.streamer.received(payload.decode())

    def onClose(self, wasClean, code, reason):
        self.factory.streamer.closed(self, code)


class Streamer:
    """
    A client that streams numbered text messages C{ID:SEQ} through the
    fleet, one every C{pace} seconds with at most C{window} unanswered, and
    checks that the echoes come back in order. When its connection is
    closed it reconnects at once and sends again from the first message
    not echoed (so the backends may see a message twice, never a gap).

    C{closes} records the close codes it got, C{failures} every connection
    or handshake that failed; C{done} fires once L{stop} has had every
    message echoed and closed the connection.
    """

    def __init__(self, cid, host, port, pace=0.05, window=4):
        self.cid = cid
        self.host = host
        self.port = port
        self.pace = pace
        self.window = window
        self.acked = -1
        self.sent = -1
        self.closes = []
        self.failures = []
        self.orderErrors = 0
        self.connections = 0
        self.connection = None
        self.stopping = False
        self.done = defer.Deferred()
        self._tick = None

    def start(self):
        factory = WebSocketClientFactory(
            f"ws://{self.host}:{self.port}/",
            headers={"X-User-Id": self.cid},
            reactor=reactor,
        )
        factory.protocol = StreamerProtocol
        factory.streamer = self
        # Autobahn's own timers go through txaio's batched timer (rounded
        # down to whole seconds): off, the test's deadline bounds the run.
        factory.setProtocolOptions(
            failByDrop=False, closeHandshakeTimeout=0, openHandshakeTimeout=0
        )
        d = TCP4ClientEndpoint(reactor, self.host, self.port, timeout=5).connect(factory)
        d.addErrback(lambda failure: self._failed(failure.getErrorMessage()))

    def opened(self, connection):
        self.connection = connection
        self.connections += 1
        self.sent = self.acked
        self._send()

    def _send(self):
        self._tick = None
        connection = self.connection
        if connection is None:
            return
        if self.stopping:
            if self.acked == self.sent:
                connection.sendClose(1000)
            return
        if self.sent - self.acked < self.window:
            self.sent += 1
            connection.sendMessage(f"{self.cid}:{self.sent}".encode())
        self._tick = reactor.callLater(self.pace, self._send)

    def received(self, text):
        seq = int(text.rsplit(":", 1)[1])
        if seq != self.acked + 1:
            self.orderErrors += 1
        self.acked = seq
        if self.stopping and self.acked == self.sent and self.connection is not None:
            self.connection.sendClose(1000)

    def closed(self, connection, code):
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        self._tick = None
        wasOpen = self.connection is connection
        self.connection = None
        if self.stopping and code == 1000:
            self.done.callback(self)
            return
        if not wasOpen:
            self._failed(f"handshake failed (close {code})")
            return
        self.closes.append(code)
        self.start()

    def _failed(self, why):
        self.failures.append(why)
        if not self.done.called:
            self.done.callback(self)

    def stop(self):
        """
        Send nothing new; close once every message sent is echoed.
        """
        self.stopping = True
        if self.connection is not None and self._tick is None:
            self._send()


async def ledgerOf(backendUrl):
    """
    What a ledger backend (tests/node/ledger-server.js) recorded, asked
    directly: C{{"errors": N, "clients": {ID: [SEQ, ...]}}}.
    """
    client = await connect(backendUrl)
    try:
        client.sendMessage(b"__ledger__")
        payload, _ = await client.messages.get().addTimeout(10, reactor)
        return json.loads(payload)
    finally:
        client.transport.abortConnection()
