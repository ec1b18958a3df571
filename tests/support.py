"""
Real parts for end-to-end tests: backends (Autobahn in-process, node `ws` as
a process), an lbws service in-process or as a `twistd` process, and
clients that record what they get. Everything listens on 127.0.0.1 port 0.
"""

import inspect
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import weakref
from pathlib import Path

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from lbws.config import parseConfig
from lbws.service import makeLbws

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
TWISTD = Path(sys.executable).with_name("twistd")


def deferLater(seconds, result=None):
    return defer.Deferred.fromCoroutine(_later(seconds, result))


async def _later(seconds, result):
    from twisted.internet.task import deferLater as later

    await later(reactor, seconds)
    return result


async def eventually(predicate, timeout=10.0, step=0.02):
    """
    Wait, with a deadline, until C{predicate()} is true: for state that a
    test cannot be told about by a Deferred (a counter in another process).
    C{predicate} may be a coroutine function (e.g. one asking a dashboard).
    """
    deadline = reactor.seconds() + timeout
    while not await _truth(predicate()):
        if reactor.seconds() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await deferLater(step)


async def _truth(value):
    if isinstance(value, defer.Deferred) or hasattr(value, "__await__"):
        value = await value
    return value


# Backends


class EchoServerProtocol(WebSocketServerProtocol):
    """
    Echoes every message; C{__request__} answers with what the handshake
    carried, C{__close CODE REASON__} makes the backend close, and
    C{__drop__} drops the TCP connection without a close.
    """

    def onConnect(self, request):
        self.request = request
        self.factory.connections.append(self)
        if self.factory.refuseWith:
            from autobahn.websocket.types import ConnectionDeny

            raise ConnectionDeny(*self.factory.refuseWith)
        if request.protocols:
            chosen = self.factory.chooseProtocol(request.protocols)
            return (chosen, self.factory.responseHeaders)
        return (None, self.factory.responseHeaders)

    def onMessage(self, payload, isBinary):
        import json

        if not isBinary and payload == b"__request__":
            request = self.request
            self.sendMessage(
                json.dumps(
                    {
                        "path": request.path,
                        "params": request.params,
                        "headers": request.headers,
                        "protocols": request.protocols,
                        "peer": request.peer,
                        "raw": self.http_request_data.decode("latin-1"),
                    }
                ).encode()
            )
        elif not isBinary and payload.startswith(b"__close "):
            _, code, reason = payload.decode().split(" ", 2)
            self.sendClose(int(code), reason)
        elif not isBinary and payload == b"__drop__":
            self.transport.abortConnection()
        else:
            self.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        # Connections that never sent a handshake (lbws's tcp health
        # checks) are not counted.
        if getattr(self, "request", None) is not None:
            self.factory.closes.append((wasClean, code, reason))


class EchoFactory(WebSocketServerFactory):
    protocol = EchoServerProtocol

    def __init__(self, name="echo", refuseWith=None, responseHeaders=None):
        super().__init__(reactor=reactor)
        self.name = name
        self.refuseWith = refuseWith
        self.responseHeaders = responseHeaders or {}
        self.connections = []
        self.closes = []
        # No close handshake timeout: txaio's batched timer, which Autobahn
        # uses for it, rounds deadlines down to whole seconds, so a 1 s
        # timeout fires anywhere from 0 to 1 s later and cut closes short.
        self.setProtocolOptions(
            failByDrop=False,
            maxMessagePayloadSize=0,
            maxFramePayloadSize=0,
            closeHandshakeTimeout=0,
        )

    def chooseProtocol(self, offered):
        return offered[-1]


async def startEchoBackend(name="echo", **kwargs):
    """
    An Autobahn echo backend on 127.0.0.1, port 0.

    @return: C{(factory, port)}; stop it with C{await port.stopListening()}.
    """
    factory = EchoFactory(name, **kwargs)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    factory.url = f"ws://127.0.0.1:{port.getHost().port}"
    return factory, port


def tlsServerOptions(pem):
    """
    The TLS options of a wss:// (or https://) test backend serving the key
    and chain in C{pem}: HTTP/1.1 declared for ALPN, as any HTTPS server
    does. lbws offers it as browsers do, and a Twisted 26.10 server that
    declares no protocol fails every client offering one
    (docs/upstream.md).
    """
    from twisted.internet.ssl import CertificateOptions, PrivateCertificate

    certificate = PrivateCertificate.loadPEM(pem)
    return CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original,
        acceptableProtocols=[b"http/1.1"],
    )


@implementer(IHandshakeListener)
class AlpnRequired:
    """
    A mixin for a server protocol behind TLS that serves only clients that
    negotiated C{http/1.1} by ALPN, as some servers do: the others are cut
    once their TLS handshake is over. Its factory's C{negotiated} list
    gets what each connection negotiated.
    """

    def handshakeCompleted(self):
        negotiated = self.transport.negotiatedProtocol
        self.factory.negotiated.append(negotiated)
        if negotiated != b"http/1.1":
            self.transport.abortConnection()


class Silent(protocol.Protocol):
    """
    A backend that accepts TCP connections and never says a word; its
    factory's C{connections} and C{lost} list the connections made and
    lost, and each lost one keeps the C{reason}.
    """

    reason = None

    def connectionMade(self):
        self.factory.connections.append(self)

    def connectionLost(self, reason):
        self.reason = reason
        self.factory.lost.append(self)


def silentFactory():
    """
    A factory of L{Silent} with empty C{connections} and C{lost} lists.
    """
    factory = protocol.Factory.forProtocol(Silent)
    factory.connections = []
    factory.lost = []
    return factory


def reservedPort():
    """
    A socket holding a loopback port (bound, not listening, SO_REUSEPORT):
    connections to the port are refused, and a backend can listen on it
    (with L{listeningSocket}), stop, and listen again without another
    program taking the port meanwhile.
    """
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    return holder


def listeningSocket(port=0):
    """
    A listening loopback socket (SO_REUSEPORT, so it may share a port held
    by L{reservedPort}), e.g. to hand to a backend process.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def nodeAvailable():
    return shutil.which("node") is not None and (NODE_DIR / "node_modules" / "ws").exists()


class NodeBackend:
    """
    The seed's backend: a node `ws` echo server, as a process.
    """

    def __init__(self, *args, script="echo-server.js"):
        self.process = subprocess.Popen(
            ["node", str(NODE_DIR / script), "--port", "0", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        match = re.match(r"listening (\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"node backend {script} did not start: {line!r}")
        self.port = int(match.group(1))
        self.url = f"ws://127.0.0.1:{self.port}"

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()


class NodeOnSocket:
    """
    A node `ws` echo backend serving on a listening socket it inherits.
    """

    def __init__(self, sock, prefix):
        self.process = subprocess.Popen(
            [
                "node",
                str(NODE_DIR / "echo-server.js"),
                "--fd",
                str(sock.fileno()),
                "--prefix",
                prefix,
            ],
            pass_fds=[sock.fileno()],
            stdout=subprocess.PIPE,
            text=True,
        )

    async def started(self):
        line = await threads.deferToThread(self.process.stdout.readline)
        if not line.startswith("listening"):
            self.stop()
            raise RuntimeError(f"node backend did not start: {line!r}")
        return self

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()


class Nginx:
    """
    nginx in front of one backend as users set it up for WebSocket
    applications (README, "Compared with the nginx setup"): proxy_pass,
    HTTP/1.1 to the backend, the Upgrade and Connection headers, and with
    C{host} C{proxy_set_header Host $host}, which users add for
    applications that build URLs or check hosts from Host. Everything else
    is nginx's default (max_fails, proxy_redirect, timeouts). It runs in
    the foreground with its own prefix directory, on a loopback socket it
    inherits (nginx's own C{NGINX} variable, as for its binary upgrade), so
    no other program can take the port; C{url} is its ws:// URL.
    """

    CONF = textwrap.dedent(
        """\
        pid {dir}/nginx.pid;
        error_log {dir}/error.log;
        events {{ worker_connections 256; }}
        http {{
            access_log {dir}/access.log;
            client_body_temp_path {dir}/client_body;
            proxy_temp_path {dir}/proxy;
            fastcgi_temp_path {dir}/fastcgi;
            uwsgi_temp_path {dir}/uwsgi;
            scgi_temp_path {dir}/scgi;
            server {{
                listen 127.0.0.1:{port};
                location / {{
                    proxy_pass http://127.0.0.1:{backend};
                    proxy_http_version 1.1;
                    proxy_set_header Upgrade $http_upgrade;
                    proxy_set_header Connection "Upgrade";
                    {host}
                }}
            }}
        }}
        """
    )

    def __init__(self, directory, backendPort, host=True):
        if shutil.which("nginx") is None:
            raise RuntimeError("nginx is needed: run `make setup`")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        sock = listeningSocket()
        self.port = sock.getsockname()[1]
        conf = directory / "nginx.conf"
        conf.write_text(
            self.CONF.format(
                dir=directory,
                port=self.port,
                backend=backendPort,
                host="proxy_set_header Host $host;" if host else "",
            )
        )
        try:
            self.process = subprocess.Popen(
                ["nginx", "-p", str(directory), "-e", str(directory / "error.log"),
                 "-c", str(conf), "-g", "daemon off; worker_processes 1;"],
                pass_fds=[sock.fileno()],
                env={**os.environ, "NGINX": f"{sock.fileno()};"},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            sock.close()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"

    async def started(self, timeout=10):
        """
        Wait until nginx has read its config and written its pid file:
        connections meanwhile wait in the inherited socket's backlog.
        """

        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(
                    "nginx did not start: " + (self.directory / "error.log").read_text()
                )
            return (self.directory / "nginx.pid").exists()

        await eventually(ready, timeout=timeout)
        return self

    def stop(self):
        stopProcess(self.process)


def stopProcess(process, timeout=10):
    """
    Stop a test's subprocess: SIGTERM, then SIGKILL if it is still there
    after C{timeout} seconds; return once it has exited.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# lbws


def configText(
    backends,
    lbws="",
    health="",
    listen="tcp:0:interface=127.0.0.1",
    dashboard="",
    probe="tcp",
    routes="",
):
    """
    An INI text for lbws in front of C{backends}: a list of C{(name, url)}
    or C{(name, url, extra lines)}, and C{routes}, [route:NAME] sections
    as text. The dashboard is off unless C{dashboard} is an endpoint (e.g.
    C{tcp:0:interface=127.0.0.1}).
    """
    text = f"[lbws]\nlisten = {listen}\ndashboard = {dashboard}\n{textwrap.dedent(lbws)}\n"
    text += f"[health]\nprobe = {probe}\n{textwrap.dedent(health)}\n"
    for name, url, *extra in backends:
        text += f"[backend:{name}]\nurl = {url}\n"
        for line in extra:
            text += textwrap.dedent(line) + "\n"
    return text + textwrap.dedent(routes)


async def startLbws(backends, **kwargs):
    """
    An lbws service in this process.

    @return: the started L{lbws.service.LbwsService}, with C{.url} its
        ws:// URL (and C{.dashboardUrl} its dashboard's, or None); stop it
        with C{await service.stopService()}.
    """
    settings = parseConfig(configText(backends, **kwargs), "test.ini")
    return await started(makeLbws(reactor, settings))


async def started(service, timeout=10):
    """
    Start C{service} (built by L{lbws.service.makeLbws}) and set C{.url}
    and C{.dashboardUrl} once it listens.
    """
    service.startService()
    port = await service.listener.whenListening().addTimeout(timeout, reactor)
    service.url = f"ws://127.0.0.1:{port.getHost().port}"
    service.dashboardUrl = None
    if service.dashboard is not None:
        dashboardPort = await service.dashboard.whenListening().addTimeout(timeout, reactor)
        service.dashboardUrl = f"http://127.0.0.1:{dashboardPort.getHost().port}"
    return service


class Harness:
    """
    What one test starts, stopped at its end in a safe order: clients cut,
    lbws services stopped (they drain), then the backends' ports, held
    sockets and whatever else was registered with L{atEnd}.
    """

    def __init__(self):
        self.clients = []
        self.services = []
        self._first = []  # callables for the end, before the clients
        self._later = []  # callables for the end, each may return a Deferred

    def atEnd(self, stop, first=False):
        """
        Call C{stop} at the end: after lbws stopped, or with C{first}
        before anything else (for clients that would reconnect).
        """
        (self._first if first else self._later).append(stop)

    def logged(self):
        """
        A list that receives every log event until the end of the test.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.atEnd(lambda: globalLogPublisher.removeObserver(events.append))
        return events

    async def backend(self, name="echo", **kwargs):
        factory, port = await startEchoBackend(name, **kwargs)
        self.atEnd(port.stopListening)
        return factory

    async def listen(self, factory, endpoint=None):
        """
        Serve C{factory} on 127.0.0.1, port 0 (or on C{endpoint}), until
        the end of the test.
        """
        endpoint = endpoint or TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = await endpoint.listen(factory)
        self.atEnd(port.stopListening)
        return port

    async def silent(self):
        """
        A L{Silent} backend on 127.0.0.1 until the end of the test (its
        connections are cut then); C{.url} is its ws:// URL.
        """
        factory = silentFactory()
        port = await self.listen(factory)
        factory.url = f"ws://127.0.0.1:{port.getHost().port}"

        def cut():
            for connection in factory.connections:
                if connection.transport.connected:
                    connection.transport.abortConnection()

        self.atEnd(cut, first=True)
        return factory

    def deadUrl(self):
        """
        The URL of a loopback port that refuses connections (and that no
        other program takes while the test runs).
        """
        holder = reservedPort()
        self.atEnd(holder.close)
        return f"ws://127.0.0.1:{holder.getsockname()[1]}"

    async def lbws(self, backends, **kwargs):
        service = await startLbws(backends, **kwargs)
        self.services.append(service)
        return service

    async def start(self, service):
        """
        Start an L{lbws.service.LbwsService} built by the test (with
        L{lbws.service.makeLbws}); C{.url} is set as by L{startLbws}.
        """
        self.services.append(service)
        return await started(service)

    async def client(self, url, **kwargs):
        client = await connect(url, **kwargs)
        self.clients.append(client)
        return client

    async def close(self):
        for stop in self._first:
            await _settled(stop())
        for client in self.clients:
            if client.transport.connected:
                client.transport.abortConnection()
        for service in self.services:
            if service.running:
                await service.stopService()
        for stop in self._later:
            await _settled(stop())


async def _settled(result):
    """
    Wait for what a clean-up returned: a Deferred or a coroutine (an async
    C{close}, such as L{tests.balancing.RevivableBackend}'s) runs to its
    end; anything else is already done.
    """
    if isinstance(result, defer.Deferred) or inspect.isawaitable(result):
        await result


class LbwsProcess:
    """
    A real `twistd -n lbws` process; its listening port is read from its log
    (text or C{--log-format json}).

    A thread reads its output all the time into C{lines}, so that a process
    that logs a lot never blocks on a full pipe; L{waitForLine} waits for a
    line without blocking the reactor, L{exited} for the process to end.
    """

    def __init__(self, configPath, *args, env=None, timeout=30, preexec_fn=None):
        self.process = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "lbws", "--config", str(configPath), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            preexec_fn=preexec_fn,
        )
        self.pid = self.process.pid
        self.lines = []
        self.port = None
        self._lock = threading.Lock()
        self._waiters = []
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._listening.wait(timeout)
        if self.port is None:
            self.stop()
            raise RuntimeError("lbws did not start:\n" + "".join(self.lines))
        self.url = f"ws://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.process.stdout:
            with self._lock:
                self.lines.append(line)
            if self.port is None:
                self.port = _listeningPort(line)
                if self.port is not None:
                    self._listening.set()
            if self._waiters:
                reactor.callFromThread(self._checkWaiters)
        self._listening.set()

    def _checkWaiters(self):
        for waiter in list(self._waiters):
            pattern, after, d = waiter
            line = self._find(pattern, after)
            if line is not None:
                self._waiters.remove(waiter)
                d.callback(line)

    def _find(self, pattern, after):
        with self._lock:
            lines = self.lines[after:]
        for line in lines:
            if re.search(pattern, line):
                return line
        return None

    def waitForLine(self, pattern, after=0, timeout=10):
        """
        A Deferred firing with the first output line from index C{after} on
        that matches C{pattern}; it fails after C{timeout} seconds.
        """
        line = self._find(pattern, after)
        if line is not None:
            return defer.succeed(line)
        d = defer.Deferred()
        waiter = (pattern, after, d)
        self._waiters.append(waiter)

        def timedOut(failure):
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            failure.trap(defer.TimeoutError)
            raise AssertionError(
                f"no line matching {pattern!r} within {timeout}s:\n" + "".join(self.lines[after:])
            )

        d.addTimeout(timeout, reactor)
        d.addErrback(timedOut)
        return d

    async def dashboardUrl(self, timeout=10):
        """
        The dashboard's http:// URL, read from the log line of its port.
        """
        line = await self.waitForLine(r"DashboardSite starting on \d+", timeout=timeout)
        return "http://127.0.0.1:" + re.search(r"starting on (\d+)", line).group(1)

    def signal(self, signum):
        self.process.send_signal(signum)

    def exited(self, timeout=30):
        """
        A Deferred firing with the exit code once the process ended (waited
        for in a thread, so the reactor keeps serving the test's sockets).
        """
        from twisted.internet import threads

        return threads.deferToThread(self.process.wait, timeout)

    def stop(self, timeout=30):
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout)
        self.process.stdout.close()
        return self.process.returncode


def _listeningPort(line):
    """
    The port of lbws's "listening" log line, in text or JSON, or None.
    """
    match = re.search(r"lbws listening on \S+:(\d+)", line)
    if match:
        return int(match.group(1))
    if line.startswith("{"):
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if str(event.get("log_format", "")).startswith("lbws listening on"):
            return int(str(event["address"]).rsplit(":", 1)[1])
    return None


# Clients


class RecordingClient(WebSocketClientProtocol):
    """
    A client that records messages into a queue and its close into a
    Deferred.
    """

    def onConnect(self, response):
        self.response = response

    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.messages.put((payload, isBinary))

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(
                HandshakeFailed(getattr(self, "http_status_line", None), reason)
            )
        self.closed.callback((code, reason))

    def connectionMade(self):
        self.messages = defer.DeferredQueue()
        self.closed = defer.Deferred()
        super().connectionMade()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if not self.closed.called:
            self.closed.callback((None, None))


class HandshakeFailed(Exception):
    def __init__(self, statusLine, reason):
        super().__init__(statusLine, reason)
        self.statusLine = statusLine
        self.status = int(statusLine.split()[1]) if statusLine else None


async def connect(
    url,
    protocols=None,
    headers=None,
    path="/",
    useragent="lbws-tests",
    timeout=30,
    host=None,
    **options,
):
    """
    Open a WebSocket to C{url + path}; fails with L{HandshakeFailed}, or
    with C{TimeoutError} when the handshake is not over within C{timeout}.
    With C{host}, the request's Host header names it (with C{url}'s port)
    while the connection still goes to C{url}'s address.

    @return: the open L{RecordingClient}.
    """
    address, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    named = url if host is None else f"ws://{host}:{port}"
    factory = WebSocketClientFactory(
        named.rstrip("/") + path,
        protocols=protocols,
        headers=headers,
        useragent=useragent,
        reactor=reactor,
    )
    factory.protocol = RecordingClient
    factory.opened = defer.Deferred()
    # No close handshake timeout (as for EchoFactory): txaio's batched timer
    # fires Autobahn's 1 s default anywhere from 0 to 1 s later, and a client
    # that drops its TCP connection early records 1006, not the close it
    # was about to get.
    factory.setProtocolOptions(
        **{
            "failByDrop": False,
            "maxMessagePayloadSize": 0,
            "maxFramePayloadSize": 0,
            "closeHandshakeTimeout": 0,
            **options,
        }
    )
    await TCP4ClientEndpoint(reactor, address, int(port), timeout=5).connect(factory)
    return await factory.opened.addTimeout(timeout, reactor)


async def roundTrip(client, payload, isBinary=False, timeout=10):
    """
    Send a message on a L{RecordingClient} and wait (with a deadline) for
    the next message it gets: the echo, from an echo backend.
    """
    client.sendMessage(payload, isBinary)
    return await client.messages.get().addTimeout(timeout, reactor)


def handshakeRequest(path="/", host="127.0.0.1", extra=""):
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


# Pool members in unit tests


_heldConnections = weakref.WeakKeyDictionary()


def setHealthy(member, healthy=True):
    """
    Make a member up or down at once, as a worker takes its parent's
    verdict (keeping when its health last changed).
    """
    member.health.follow(healthy, member.changed)


def setActive(member, count):
    """
    Open or close test connections on C{member} until it has C{count}
    open ones.
    """
    held = _heldConnections.setdefault(member, [])
    while member.active < count:
        held.append(member.opened())
    while member.active > count:
        held.pop().close()
