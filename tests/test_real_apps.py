"""
Issue 20's verification: applications and clients nobody here wrote, each
used the same way directly, through lbws with the README's minimal config
(`[backend:x] url = ...` and nothing about health, probe or Host, unless a
test is about one key) and through nginx set up as users do (README,
"Compared with the nginx setup", plus `proxy_set_header Host $host`). Each
test asserts what the clients got on all three.

- FastAPI on uvicorn: a page, a WebSocket route, Starlette's trailing-slash
  redirect (an absolute Location built from Host) and TrustedHostMiddleware.
- graphql-ws, server and client: the backend killed mid-subscription and
  started again on its port; the client reconnects and resubscribes.
- SockJS on node's http server: handshakes given up on while the server is
  slow to take them must not kill it (lbws ends them with a FIN).
- Chromium: UTF-8 cookies set by document.cookie reach the backend byte for
  byte.
- One backend restarted: how soon after its return a client is served.
"""

import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.web.client import Agent, readBody

from lbws.config import parseConfig
from lbws.service import makeLbws

from tests import support, wire
from tests.support import NODE_DIR, ROOT, eventually, handshakeRequest
from tests.test_balancing_e2e import getJson
from tests.test_dashboard import Browser, browserInstalled
from tests.test_httpproxy import _exchange

PUBLIC = "public.example"
APPS = ROOT / "tests" / "apps"


def minimalConfig(backends, lbws="", health=""):
    """
    The README's minimal config for C{backends} (C{(name, url)} pairs):
    only the ports differ, 0 on loopback, and the dashboard is on for
    status.json. C{lbws} and C{health} add lines to [lbws] and [health]
    for a test about one key.
    """
    text = "[lbws]\nlisten = tcp:0:interface=127.0.0.1\ndashboard = tcp:0:interface=127.0.0.1\n"
    text += lbws + "\n"
    if health:
        text += f"[health]\n{health}\n"
    for name, url in backends:
        text += f"\n[backend:{name}]\nurl = {url}\n"
    return parseConfig(text, "lbws.ini")


async def startLbws(harness, backends, lbws="", health=""):
    service = await harness.start(makeLbws(reactor, minimalConfig(backends, lbws, health)))
    service.address = service.url.split("://")[1]
    return service


async def startNginx(harness, directory, backendPort, host=True):
    nginx = support.Nginx(directory, backendPort, host=host)
    harness.atEnd(nginx.stop)
    return await nginx.started()


class Lines:
    """
    A process whose output (stdout and stderr) a thread reads all the time
    into C{lines}, so that a test can wait for a line with a deadline.
    """

    def __init__(self, harness, command, **popen):
        self.process = subprocess.Popen(
            [str(part) for part in command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **popen,
        )
        self.lines = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        harness.atEnd(self.stop)

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def matching(self, pattern):
        return [line for line in list(self.lines) if re.search(pattern, line)]

    async def line(self, pattern, timeout=15):
        """
        The first line matching C{pattern}, once there is one.
        """
        def seen():
            if self.matching(pattern):
                return True
            if self.process.poll() is not None:
                self._reader.join(10)
                raise AssertionError(f"ended before a line {pattern!r}: {self.lines}")
            return False

        try:
            await eventually(seen, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"no line {pattern!r} within {timeout}s: {self.lines}") from None
        return self.matching(pattern)[0]

    async def listening(self):
        """
        The port of the process's "listening PORT" line.
        """
        return int(re.search(r"listening (\d+)", await self.line(r"^listening \d+")).group(1))

    @property
    def alive(self):
        return self.process.poll() is None

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(10)
        self.process.stdin.close()
        self.process.stdout.close()


async def node(harness, script, *args, **popen):
    if not support.nodeAvailable():
        pytest.fail("node and tests/node/node_modules are needed: run `make test`")
    process = Lines(harness, ["node", NODE_DIR / script, *args], **popen)
    process.port = await process.listening()
    process.url = f"ws://127.0.0.1:{process.port}"
    process.address = f"127.0.0.1:{process.port}"
    return process


# 1. FastAPI on uvicorn


async def fastapi(harness, *allowed):
    command = [sys.executable, APPS / "fastapi_app.py", *(f"--allow={h}" for h in allowed)]
    app = Lines(harness, command)
    app.port = await app.listening()
    app.url = f"ws://127.0.0.1:{app.port}"
    app.address = f"127.0.0.1:{app.port}"
    return app


def fastapiView(address):
    """
    What a client of the public name sees of the FastAPI app at C{address}:
    the page, GET /guide (its redirect, not followed), a WebSocket message
    and its answer (websocket-client, with the public name as Host), and
    the status of a WebSocket handshake on a path with no route.
    """
    import websocket

    (page, redirect), _ = _exchange(
        address, [("GET", "/", None, {"Host": PUBLIC}), ("GET", "/guide", None, {"Host": PUBLIC})]
    )
    location = {k.lower(): v for k, v in redirect[1].items()}.get("location")
    ws = websocket.create_connection(f"ws://{address}/ws", host=PUBLIC, timeout=10)
    try:
        ws.send("hello")
        answer = json.loads(ws.recv())
    finally:
        ws.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://{address}/nowhere", host=PUBLIC, timeout=10)
    return {
        "page": (page[0], page[2]),
        "redirect": (redirect[0], location),
        "ws": answer,
        "no route": refused.value.status_code,
    }


async def views(targets, view):
    return {name: await threads.deferToThread(view, address) for name, address in targets}


PAGE = b"<!doctype html><title>app</title><p>the page</p>"


@pytest_twisted.ensureDeferred
async def test_fastapi_app_behind_the_minimal_config(harness, tmp_path):
    app = await fastapi(harness, PUBLIC)
    lbws = await startLbws(harness, [("app", app.url)])
    nginx = await startNginx(harness, tmp_path / "nginx", app.port)
    seen = await views(
        [("direct", app.address), ("lbws", lbws.address), ("nginx", nginx.address)], fastapiView
    )
    # TrustedHostMiddleware lets the page through (no 400), the redirect
    # names the public host, not 127.0.0.1:port, and the WebSocket route
    # got the public Host too.
    expected = {
        "page": (200, PAGE),
        "redirect": (307, f"http://{PUBLIC}/guide/"),
        "ws": {"echo": "hello", "host": PUBLIC},
        "no route": 403,
    }
    assert seen == {"direct": expected, "lbws": expected, "nginx": expected}
    # The default probe keeps the app up: its request for / carries the
    # backend's own address as Host, which TrustedHostMiddleware answers
    # 400, and any well-formed answer counts as up.
    [(status, _, _)], _ = await threads.deferToThread(
        _exchange, app.address, [("GET", "/", None, {"Host": app.address})]
    )
    assert status == 400
    member = lbws.pool["app"]
    await eventually(lambda: sum(member.checks.values()) >= 2, timeout=10)
    assert dict(member.checks) == {"ok": sum(member.checks.values())}
    status = await getJson(lbws.dashboardUrl + "/status.json")
    assert [(b["name"], b["state"]) for b in status["backends"]] == [("app", "up")]


@pytest_twisted.ensureDeferred
async def test_fastapi_app_with_host_header_backend(harness, tmp_path):
    """
    host_header = backend: the app sees its own address as Host, and the
    redirect it builds from it reaches the client pointing at the public
    name again; nginx without `proxy_set_header Host` (its default Host
    and proxy_redirect) side by side.
    """
    app = await fastapi(harness, PUBLIC, "127.0.0.1")
    lbws = await startLbws(harness, [("app", app.url)], "host_header = backend")
    nginx = await startNginx(harness, tmp_path / "nginx", app.port, host=False)
    seen = await views(
        [("direct", app.address), ("lbws", lbws.address), ("nginx", nginx.address)], fastapiView
    )
    assert seen["direct"]["redirect"] == (307, f"http://{PUBLIC}/guide/")
    assert seen["lbws"]["redirect"] == seen["direct"]["redirect"]
    # nginx's proxy_redirect default names the public host too, with the
    # port nginx listens on added (port_in_redirect), as the client's Host
    # had none.
    status, location = seen["nginx"]["redirect"]
    assert (status, location) == (307, f"http://{PUBLIC}:{nginx.port}/guide/")
    assert seen["direct"]["ws"]["host"] == PUBLIC
    assert seen["lbws"]["ws"]["host"] == app.address
    assert seen["nginx"]["ws"]["host"] == app.address
    assert {name: view["page"] for name, view in seen.items()} == dict.fromkeys(seen, (200, PAGE))


# 2. graphql-ws, the backend killed mid-subscription


async def graphqlServer(harness, port):
    """
    The graphql-ws server on C{port} (held by a L{support.reservedPort}),
    serving on a socket only it holds, so that killing it refuses the port.
    """
    sock = support.listeningSocket(port)
    try:
        fd = sock.fileno()
        return await node(harness, "graphql-server.js", "--fd", fd, pass_fds=[fd])
    finally:
        sock.close()


class Subscriber:
    """
    A graphql-ws client process subscribed to `ticks` at C{url}; C{events}
    are what it printed, one JSON object each.
    """

    def __init__(self, harness, url):
        self.process = Lines(harness, ["node", NODE_DIR / "graphql-client.js", url])

    @property
    def events(self):
        return [json.loads(line) for line in list(self.process.lines) if line.startswith("{")]

    def ticks(self, session):
        """
        The ticks received on the C{session}-th connection (0, 1, ...).
        """
        sessions = [[]]
        for event in self.events:
            if event["event"] == "closed":
                sessions.append([])
            elif event["event"] == "tick":
                sessions[-1].append(event["n"])
        connected = [s for s in sessions if s]
        return connected[session] if len(connected) > session else []

    def closes(self):
        return [e["code"] for e in self.events if e["event"] == "closed"]

    def resumedAfter(self):
        """
        Seconds from the first close to the first tick after it.
        """
        events = self.events
        closed = next(e["t"] for e in events if e["event"] == "closed")
        return next(e["t"] for e in events if e["event"] == "tick" and e["t"] > closed) - closed


@pytest_twisted.ensureDeferred
async def test_graphql_ws_subscription_survives_its_backend_killed_and_restarted(harness, tmp_path):
    holder = support.reservedPort()
    harness.atEnd(holder.close)
    port = holder.getsockname()[1]
    server = await graphqlServer(harness, port)
    lbws = await startLbws(harness, [("graphql", f"ws://127.0.0.1:{port}")])
    nginx = await startNginx(harness, tmp_path / "nginx", port)
    clients = {
        name: Subscriber(harness, url + "/graphql")
        for name, url in (("direct", server.url), ("lbws", lbws.url), ("nginx", nginx.url))
    }
    await eventually(lambda: all(len(c.ticks(0)) >= 5 for c in clients.values()))
    server.kill()
    await eventually(lambda: all(c.closes() for c in clients.values()))
    await graphqlServer(harness, port)
    await eventually(lambda: all(len(c.ticks(1)) >= 5 for c in clients.values()), timeout=20)
    outcome = {
        name: (
            c.closes()[0],
            c.ticks(0)[:5],
            c.ticks(1)[:5],
            [e for e in c.events if e["event"] == "error"],
        )
        for name, c in clients.items()
    }
    gaps = {name: round(c.resumedAfter(), 3) for name, c in clients.items()}
    print(f"\nseconds from the first close to the first tick after it: {gaps}")
    # Every client lost its subscription with a code graphql-ws retries,
    # connected again and got a new subscription's ticks from 1 on: 1006
    # (no close frame) direct and through nginx, 1012 through lbws.
    resumed = [1, 2, 3, 4, 5]
    assert outcome == {
        "direct": (1006, resumed, resumed, []),
        "lbws": (1012, resumed, resumed, []),
        "nginx": (1006, resumed, resumed, []),
    }


# 3. SockJS, and the handshakes given up on


async def sockjs(harness, *args):
    return await node(harness, "sockjs-server.js", *args)


def sockjsView(address):
    """
    SockJS's /echo/info and an echo over its raw WebSocket endpoint
    (websocket-client).
    """
    import websocket

    [(status, _, body)], _ = _exchange(address, [("GET", "/echo/info", None, None)])
    ws = websocket.create_connection(f"ws://{address}/echo/websocket", timeout=10)
    try:
        ws.send("hello sockjs")
        echo = ws.recv()
    finally:
        ws.close()
    return {"info": (status, json.loads(body)["websocket"]), "echo": echo}


def sockjsClient(address):
    """
    What SockJS's own client saw of an echo at C{address}.
    """
    done = subprocess.run(
        ["node", NODE_DIR / "sockjs-client.js", f"http://{address}/echo"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest_twisted.ensureDeferred
async def test_sockjs_echo(harness, tmp_path):
    server = await sockjs(harness)
    lbws = await startLbws(harness, [("sockjs", server.url)])
    nginx = await startNginx(harness, tmp_path / "nginx", server.port)
    seen = await views(
        [("direct", server.address), ("lbws", lbws.address), ("nginx", nginx.address)], sockjsView
    )
    expected = {"info": (200, True), "echo": "hello sockjs"}
    assert seen == {"direct": expected, "lbws": expected, "nginx": expected}
    seen = await views(
        [("direct", server.address), ("lbws", lbws.address), ("nginx", nginx.address)], sockjsClient
    )
    expected = {"transport": "websocket", "echo": "hello sockjs", "close": 1000}
    assert seen == {"direct": expected, "lbws": expected, "nginx": expected}


async def leaveMidHandshake(url, server):
    """
    Send a WebSocket handshake to /echo/websocket at C{url} and leave as
    soon as the slow SockJS C{server} has it, before it answers; return
    once the server has handed the request to SockJS.
    """
    before = len(server.matching("^upgrade received"))
    client = await wire.rawConnect(url)
    client.send(handshakeRequest("/echo/websocket"))
    await eventually(lambda: len(server.matching("^upgrade received")) > before)
    client.transport.loseConnection()
    await eventually(lambda: len(server.matching("^upgrade handed")) > before)


@pytest_twisted.ensureDeferred
async def test_sockjs_server_outlives_handshakes_given_up_on(harness, tmp_path):
    """
    A SockJS server slow to take upgrades: clients leave during the
    handshake, and lbws gives one up at its handshake_timeout. The server
    only sees FINs and stays up, direct, through lbws and through nginx.
    """
    server = await sockjs(harness, "--upgrade-delay", "800")
    lbws = await startLbws(harness, [("sockjs", server.url)], "handshake_timeout = 0.3")
    nginx = await startNginx(harness, tmp_path / "nginx", server.port)
    # lbws gives up on the backend's handshake: the client gets 502 (a
    # WebSocket handshake is refused with 502 or 503 only).
    client = await wire.rawConnect(lbws.url)
    client.send(handshakeRequest("/echo/websocket"))
    head = await client.response.addTimeout(10, reactor)
    assert head.startswith("HTTP/1.1 502 "), head
    await server.line("^upgrade handed 1$")
    for url in (server.url, lbws.url, nginx.url):
        await leaveMidHandshake(url, server)
    # Still serving (through lbws every handshake of this slow server
    # outlasts handshake_timeout).
    view = await threads.deferToThread(sockjsView, server.address)
    assert view == {"info": (200, True), "echo": "hello sockjs"}
    assert server.alive, server.lines
    assert server.matching("ECONNRESET") == []


@pytest_twisted.ensureDeferred
async def test_sockjs_server_dies_of_a_reset_where_it_outlives_a_fin(harness):
    """
    The other side of the test above, which shows it can fail: the same
    server ends on the first TCP reset in that place, as it did behind
    lbws before issue 20.
    """
    server = await sockjs(harness, "--upgrade-delay", "300")
    await leaveMidHandshake(server.url, server)
    assert server.alive
    client = await wire.rawConnect(server.url)
    client.send(handshakeRequest("/echo/websocket"))
    await server.line("^upgrade received 2$")
    # A zero linger time makes the close a reset.
    client.transport.getHandle().setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    client.transport.abortConnection()
    await eventually(lambda: not server.alive)
    await server.line("ECONNRESET")


@pytest_twisted.ensureDeferred
async def test_default_probe_keeps_a_sockjs_server_up(harness):
    """
    The default probe, kind and path, in front of SockJS's README server;
    only its pace is quicker than the default 2 s, to keep the suite fast.
    """
    server = await sockjs(harness)
    lbws = await startLbws(
        harness, [("sockjs", server.url)], health="interval = 0.5\ntimeout = 0.5"
    )
    member = lbws.pool["sockjs"]
    await eventually(lambda: sum(member.checks.values()) >= 2, timeout=10)
    healthz = await Agent(reactor).request(b"GET", (lbws.dashboardUrl + "/healthz").encode())
    await readBody(healthz)
    checks, state, why = dict(member.checks), member.state, member.lastError
    view = await threads.deferToThread(sockjsView, lbws.address)
    assert view == {"info": (200, True), "echo": "hello sockjs"}
    assert (state, healthz.code) == ("up", 200), (checks, why)


# 4. Chromium with UTF-8 cookies

# As Chromium sends them, "Å" is C3 85 and "х" D1 85: the byte 0x85 that
# older Autobahn parsers took for a line end.
COOKIE = "name=Åsa; city=Хорошёво".encode()


def cookiesSeen(profile, pages):
    """
    Open each page of C{pages} ({name: url}) in one headless Chromium; each
    sets the cookies with document.cookie and reports what its backend got.
    """
    from selenium.webdriver.support.ui import WebDriverWait

    browser = Browser(profile)
    seen = {}
    try:
        for name, url in pages.items():
            browser.driver.get(url)
            WebDriverWait(browser.driver, 20, poll_frequency=0.05).until(
                lambda d: d.find_element("id", "result").text, message=f"{name}: no answer"
            )
            text = browser.driver.find_element("id", "result").text
            seen[name] = json.loads(text) if text.startswith("{") else text
        return seen, browser.problems()
    finally:
        browser.quit()


@pytest_twisted.ensureDeferred
async def test_utf8_cookies_from_chromium_reach_the_backend_byte_for_byte(harness, tmp_path):
    browserInstalled()
    server = await node(harness, "cookie-server.js")
    lbws = await startLbws(harness, [("app", server.url)])
    nginx = await startNginx(harness, tmp_path / "nginx", server.port)
    pages = {
        "direct": f"http://{server.address}/",
        "lbws": f"http://{lbws.address}/",
        "nginx": f"http://{nginx.address}/",
    }
    seen, problems = await threads.deferToThread(cookiesSeen, tmp_path / "chromium", pages)
    assert problems == []
    expected = {"cookie": [COOKIE.hex()]}
    assert seen == {"direct": expected, "lbws": expected, "nginx": expected}


# 5. One backend restarted


async def firstSuccess(url, since, every=0.05, timeout=15):
    """
    Seconds from C{since} until a WebSocket echo through C{url} works, a
    client trying every C{every} seconds (each try its own connection).
    """
    while reactor.seconds() - since < timeout:
        try:
            client = await support.connect(url, timeout=2)
        except Exception:
            await support.deferLater(every)
            continue
        try:
            assert (await support.roundTrip(client, b"back?")) == (b"back?", False)
            return reactor.seconds() - since
        finally:
            client.transport.abortConnection()
    raise AssertionError(f"{url}: no echo within {timeout}s")


@pytest_twisted.ensureDeferred
async def test_a_restarted_backend_is_served_again_at_its_first_connect(harness, tmp_path):
    holder = support.reservedPort()
    harness.atEnd(holder.close)
    port = holder.getsockname()[1]

    async def startBackend():
        sock = support.listeningSocket(port)
        backend = support.NodeOnSocket(sock, "")
        harness.atEnd(backend.stop)
        await backend.started()
        sock.close()
        return backend

    backend = await startBackend()
    url = f"ws://127.0.0.1:{port}"
    lbws = await startLbws(harness, [("echo", url)])
    nginx = await startNginx(harness, tmp_path / "nginx", port)
    targets = {"direct": url, "lbws": lbws.url, "nginx": nginx.url}
    for target in targets.values():
        await firstSuccess(target, reactor.seconds())
    backend.stop()
    # Clients keep coming while it is away: their failed connects mark it
    # down in lbws (fall = 2, as nginx's max_fails would).
    member = lbws.pool["echo"]
    while member.healthy:
        with pytest.raises(support.HandshakeFailed) as refused:
            await support.connect(lbws.url, timeout=5)
        assert refused.value.status in (502, 503)
    await startBackend()
    back = reactor.seconds()
    tries = [defer.ensureDeferred(firstSuccess(target, back)) for target in targets.values()]
    waited = dict(zip(targets, await defer.gatherResults(tries, consumeErrors=True)))
    print(f"\nseconds from the backend's return to the first echo: {waited}")
    # nginx and a direct client are served at once; lbws within one try of
    # a client, not after rise x interval (4 s) of health checks.
    assert waited["lbws"] < 1.0, waited
    assert member.healthy
