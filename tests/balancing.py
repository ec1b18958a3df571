"""
Parts for the balancing tests and the rebalancing curve (bench/): a backend
that can stop and come back on the same port, and a fleet of clients that
reconnect when lbws moves them with 1012, as a real application would.
"""

import socket
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint

from tests import support

SERVICE_RESTART = 1012


class RevivableBackend:
    """
    An Autobahn echo backend on a loopback port it keeps while stopped (so
    connections are refused then, and it comes back on the same port).
    """

    def __init__(self, name):
        self.name = name
        self._holder = support.reservedPort()
        self.port = self._holder.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self.factory = support.EchoFactory(name)
        self._listening = None

    def start(self):
        sock = support.listeningSocket(self.port)
        sock.setblocking(False)  # adoptStreamPort wants it so
        try:
            self._listening = reactor.adoptStreamPort(
                sock.fileno(), socket.AF_INET, self.factory
            )
        finally:
            sock.close()

    async def stop(self):
        if self._listening is not None:
            listening, self._listening = self._listening, None
            await listening.stopListening()
        for protocol in self.factory.connections:
            if protocol.transport is not None and protocol.transport.connected:
                protocol.transport.abortConnection()

    async def close(self):
        await self.stop()
        self._holder.close()


class _FleetClient(WebSocketClientProtocol):
    echo = None  # a Deferred waiting for the next message

    def onOpen(self):
        self.factory.fleet._opened(self)

    def onMessage(self, payload, isBinary):
        echo, self.echo = self.echo, None
        if echo is not None:
            echo.callback(payload)

    def onClose(self, wasClean, code, reason):
        self.factory.fleet._closed(self, code)


class Fleet:
    """
    C{count} clients of an lbws, each reconnecting at once when lbws closes
    it with 1012 (Service Restart), as clients are expected to.

    @ivar moved: how many 1012 closes the clients got.
    @ivar movedAt: when each came (reactor seconds).
    @ivar lost: closes with any other code (none expected).
    """

    def __init__(self, url, headers=None):
        parsed = urlsplit(url)
        self.endpoint = TCP4ClientEndpoint(reactor, parsed.hostname, parsed.port, timeout=5)
        self.factory = WebSocketClientFactory(url, headers=headers, reactor=reactor)
        self.factory.protocol = _FleetClient
        self.factory.fleet = self
        self.factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        self.open = set()
        self.moved = 0
        self.movedAt = []
        self.reconnected = 0
        self.lost = []
        self._waiting = []
        self.stopping = False

    async def connect(self, count, timeout=10):
        for _ in range(count):
            d = defer.Deferred()
            self._waiting.append(d)
            await self.endpoint.connect(self.factory)
            await d.addTimeout(timeout, reactor)

    def _opened(self, protocol):
        self.open.add(protocol)
        if self._waiting:
            self._waiting.pop(0).callback(protocol)
        else:
            self.reconnected += 1

    def _closed(self, protocol, code):
        self.open.discard(protocol)
        if self.stopping:
            return
        if code == SERVICE_RESTART:
            self.moved += 1
            self.movedAt.append(reactor.seconds())
            self.endpoint.connect(self.factory).addErrback(self.lost.append)
        else:
            self.lost.append(code)

    async def echoAll(self, timeout=10):
        """
        Each open client sends a message and gets it back from its echo
        backend: every client still has a working session.
        """
        for protocol in list(self.open):
            protocol.echo = defer.Deferred()
            payload = f"still here {id(protocol)}".encode()
            protocol.sendMessage(payload)
            assert await protocol.echo.addTimeout(timeout, reactor) == payload

    def close(self):
        self.stopping = True
        for protocol in list(self.open):
            protocol.transport.abortConnection()
