"""
The operator dashboard, end to end: lbws in-process with its dashboard on
a loopback port, real backends and clients, HTTP requests with Twisted's
Agent, and the page itself in headless Chromium.
"""

import json
import os
import shutil

import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from lbws.config import loadConfig, parseConfig
from lbws.service import makeLbws
from tests.support import (
    ROOT,
    Harness,
    NodeOnSocket,
    configText,
    deferLater,
    eventually,
    listeningSocket,
    nodeAvailable,
    reservedPort,
    startLbws,
    setHealthy,
)

DASHBOARD = "tcp:0:interface=127.0.0.1"
TOKEN = "s3cret-token"


class DashboardHarness(Harness):
    async def lbws(self, backends, token=TOKEN, lbws="", health="interval = 60", **kwargs):
        # No health check runs unless a test asks: backend states change
        # only as the test makes them.
        return await super().lbws(
            backends,
            dashboard=DASHBOARD,
            lbws=f"admin_token = {token}\n{lbws}",
            health=health,
            **kwargs,
        )


@pytest_twisted.async_yield_fixture
async def harness():
    h = DashboardHarness()
    yield h
    await h.close()


class Response:
    def __init__(self, code, headers, body):
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name):
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)


async def request(method, url, token=None, authorization=None, accept=None, host=None):
    headers = Headers()
    if host is not None:
        headers.addRawHeader(b"host", host.encode())
    if accept is not None:
        headers.addRawHeader(b"accept", accept.encode())
    if token is not None:
        headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
    if authorization is not None:
        headers.addRawHeader(b"authorization", authorization.encode())
    response = await Agent(reactor).request(method, url.encode(), headers).addTimeout(10, reactor)
    body = defer.Deferred()
    response.deliverBody(BodyReader(body))
    return Response(response.code, response.headers, await body.addTimeout(10, reactor))


class BodyReader(protocol.Protocol):
    def __init__(self, done):
        self.done = done
        self.data = b""

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


async def get(lbws, path):
    return await request(b"GET", lbws.dashboardUrl + path)


async def post(lbws, path, **kwargs):
    return await request(b"POST", lbws.dashboardUrl + path, **kwargs)


async def echo(client, payload):
    client.sendMessage(payload)
    got, _ = await client.messages.get()
    return got


@pytest_twisted.ensureDeferred
async def test_dashboard_is_off_when_not_configured(harness):
    backend = await harness.backend("a")
    service = await startLbws([("a", backend.url)])
    harness.services.append(service)
    assert service.dashboard is None
    assert service.dashboardUrl is None


@pytest_twisted.ensureDeferred
async def test_status_json(harness):
    a = await harness.backend("a")
    lbws = await harness.lbws(
        [("a", a.url, "weight = 3"), ("b", harness.deadUrl())],
        health="interval = 60\nfall = 1",
    )
    # One of the two clients tries b first: its connect is refused, b is
    # down (fall = 1), and that client is retried on a.
    client = await harness.client(lbws.url)
    assert await echo(client, b"hello") == b"hello"
    await harness.client(lbws.url)

    response = await get(lbws, "/status.json")
    assert response.code == 200
    assert response.header(b"content-type") == b"application/json"
    status = response.json()
    assert {"backends", "connections", "uptime"} <= set(status)
    assert status["connections"] == 2
    assert 0 <= status["uptime"] < 60
    assert [b["name"] for b in status["backends"]] == ["a", "b"]
    contract = {"name", "url", "state", "weight", "active", "total", "last_check", "last_error"}
    for backend in status["backends"]:
        assert contract <= set(backend)
    a, b = status["backends"]
    assert a["url"] == lbws.pool["a"].settings.url
    assert (a["state"], a["weight"], a["active"], a["total"]) == ("up", 3, 2, 2)
    assert (a["messages_in"], a["messages_out"], a["bytes_in"], a["bytes_out"]) == (1, 1, 5, 5)
    assert a["last_check"] is None and a["last_error"] == ""
    assert (b["state"], b["active"], b["total"], b["failed"]) == ("down", 0, 0, 1)
    assert isinstance(b["last_check"], float)
    assert "refused" in b["last_error"]


@pytest_twisted.ensureDeferred
async def test_metrics(harness):
    a = await harness.backend("a")
    lbws = await harness.lbws(
        [("a", a.url), ("b", harness.deadUrl())],
        health="interval = 0.1\nfall = 1",
    )
    client = await harness.client(lbws.url)
    assert await echo(client, b"hello") == b"hello"
    other = await harness.client(lbws.url)
    other.sendClose(1000)
    await other.closed
    await eventually(lambda: lbws.pool["a"].checks["ok"] >= 1)
    await eventually(lambda: lbws.pool["b"].checks["failed"] >= 1)
    await eventually(lambda: sum(lbws.counters.closes.values()) == 1)

    response = await get(lbws, "/metrics")
    assert response.code == 200
    assert response.header(b"content-type").startswith(b"text/plain;")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))))

    assert value("lbws_backend_up", backend="a") == 1
    assert value("lbws_backend_up", backend="b") == 0
    assert value("lbws_backend_state", backend="b", state="down") == 1
    assert value("lbws_backend_state", backend="b", state="up") == 0
    assert value("lbws_backend_connections_active", backend="a") == 1
    assert value("lbws_backend_connections_total", backend="a") == 2
    # b was refused to a client, or found down by a check first.
    assert value("lbws_backend_connect_failures_total", backend="b") == lbws.pool["b"].failed
    assert value("lbws_connections_active") == 1
    assert value("lbws_handshakes_total", result="ok") == 2
    assert value("lbws_messages_total", backend="a", direction="to_backend") == 1
    assert value("lbws_messages_total", backend="a", direction="to_client") == 1
    assert value("lbws_bytes_total", backend="a", direction="to_backend") == 5
    assert value("lbws_closes_total", side="client", code="1000") == 1
    assert value("lbws_backend_checks_total", backend="a", result="ok") >= 1
    assert value("lbws_backend_checks_total", backend="b", result="failed") >= 1
    assert value("lbws_backend_checks_total", backend="b", result="timeout") == 0
    assert value("lbws_backend_check_duration_seconds_count", backend="a") >= 1
    assert value("lbws_backend_check_duration_seconds_bucket", backend="a", le="+Inf") >= 1
    assert value("lbws_backend_check_rtt_seconds", backend="a") >= 0
    assert value("lbws_start_time_seconds") == lbws.view.started
    # A registry of its own: nothing leaks into prometheus_client's global one.
    assert REGISTRY.get_sample_value("lbws_backend_up", {"backend": "a"}) is None

    # A scraper asking for OpenMetrics gets it.
    response = await request(
        b"GET",
        lbws.dashboardUrl + "/metrics",
        accept="application/openmetrics-text; version=1.0.0",
    )
    assert response.header(b"content-type").startswith(b"application/openmetrics-text")
    families = {
        f.name: f for f in openmetrics_families(response.body.decode())
    }
    assert families["lbws_backend_connections"].type == "counter"


@pytest_twisted.ensureDeferred
async def test_healthz(harness):
    a = await harness.backend("a")
    lbws = await harness.lbws([("a", a.url), ("b", harness.deadUrl())])
    assert (await get(lbws, "/healthz")).code == 200
    for member in lbws.pool:
        setHealthy(member, False)
    response = await get(lbws, "/healthz")
    assert response.code == 503
    assert response.body == b"no backend is up\n"
    setHealthy(lbws.pool["b"], True)
    assert (await get(lbws, "/healthz")).code == 200
    # Drained is not up either.
    await post(lbws, "/backends/b/drain", token=TOKEN)
    assert (await get(lbws, "/healthz")).code == 503


@pytest_twisted.ensureDeferred
async def test_drain_and_enable_need_the_token(harness):
    a = await harness.backend("a")
    lbws = await harness.lbws([("a", a.url)])
    member = lbws.pool["a"]
    for kwargs in ({}, {"token": "wrong"}, {"authorization": f"Basic {TOKEN}"},
                   {"token": TOKEN + "x"}, {"token": ""}):
        response = await post(lbws, "/backends/a/drain", **kwargs)
        assert response.code == 401, kwargs
        assert response.header(b"www-authenticate") == b'Bearer realm="lbws"'
        assert member.state == "up"
    # Unknown names are not revealed to a caller without the token.
    assert (await post(lbws, "/backends/nope/drain")).code == 401

    response = await post(lbws, "/backends/a/drain", token=TOKEN)
    assert response.code == 200
    assert response.json() == {"backend": "a", "state": "draining", "drained": True}
    assert member.drained is True
    assert (await get(lbws, "/status.json")).json()["backends"][0]["state"] == "draining"
    response = await post(lbws, "/backends/a/enable", token=TOKEN)
    assert response.json() == {"backend": "a", "state": "up", "drained": False}
    assert member.drained is False

    assert (await post(lbws, "/backends/nope/drain", token=TOKEN)).code == 404
    assert (await post(lbws, "/backends/a/explode", token=TOKEN)).code == 404
    for path in ("/backends/a/drain", "/backends/a/enable", "/reload"):
        response = await get(lbws, path)
        assert response.code == 405
        assert response.header(b"allow") == b"POST"
    assert (await post(lbws, "/status.json", token=TOKEN)).code == 405


@pytest_twisted.ensureDeferred
async def test_post_actions_are_off_without_admin_token(harness):
    a = await harness.backend("a")
    lbws = await harness.lbws([("a", a.url)], token="")
    for path in ("/backends/a/drain", "/backends/a/enable", "/reload"):
        for kwargs in ({}, {"token": ""}, {"token": "anything"}):
            response = await post(lbws, path, **kwargs)
            assert response.code == 403, (path, kwargs)
            assert "admin_token" in response.json()["error"]
    assert lbws.pool["a"].drained is False


@pytest_twisted.ensureDeferred
async def test_drained_backend_keeps_its_connection_and_gets_no_new_ones(harness):
    a = await harness.backend("a")
    b = await harness.backend("b")
    lbws = await harness.lbws([("a", a.url), ("b", b.url)])
    first = await harness.client(lbws.url)
    [member] = [m for m in lbws.pool if m.active == 1]
    [other] = [m for m in lbws.pool if m is not member]
    assert (await post(lbws, f"/backends/{member.name}/drain", token=TOKEN)).code == 200

    for _ in range(3):
        client = await harness.client(lbws.url)
        assert await echo(client, b"new") == b"new"
    assert (member.total, other.total) == (1, 3)
    # The open connection stays and still works.
    assert await echo(first, b"still here") == b"still here"
    status = (await get(lbws, "/status.json")).json()
    drained = [s for s in status["backends"] if s["name"] == member.name][0]
    assert (drained["state"], drained["active"]) == ("draining", 1)

    assert (await post(lbws, f"/backends/{member.name}/enable", token=TOKEN)).code == 200
    # Back in rotation, and the lightest: the next client goes there.
    client = await harness.client(lbws.url)
    assert await echo(client, b"back") == b"back"
    assert member.total == 2


@pytest_twisted.ensureDeferred
async def test_page_is_served_with_a_strict_policy(harness):
    a = await harness.backend("a")
    lbws = await harness.lbws([("a", a.url)])
    response = await get(lbws, "/")
    assert response.code == 200
    assert response.header(b"content-type") == b"text/html; charset=utf-8"
    assert b'<table id="backends">' in response.body
    policy = response.header(b"content-security-policy").decode()
    assert "default-src 'none'" in policy
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
    assert (await get(lbws, "/nothing-here")).code == 404


# The page in a real browser.

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1440,800",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
]
SCREENSHOT = ROOT / "reports" / "dashboard.png"


class Browser:
    """
    Headless Chromium driven by selenium. Every call blocks, so the test
    makes them in a thread while the reactor serves the dashboard.
    """

    def __init__(self, profile, flags=()):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in [*CHROMIUM_FLAGS, *flags]:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(
            options=options, service=Service(executable_path=CHROMEDRIVER)
        )

    def rows(self):
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#rows tr[data-backend]'))"
            ".map(r => [r.dataset.backend, r.dataset.state,"
            " r.querySelector('.pill').textContent,"
            " getComputedStyle(r.querySelector('.pill')).color])"
        )

    def waitForRows(self, expected, timeout=10):
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
            lambda _: [row[:2] for row in self.rows()] == expected,
            message=f"backend table never showed {expected}",
        )
        return self.rows()

    def waitFor(self, script, what, timeout=10):
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
            lambda _: self.driver.execute_script(script), message=f"the page never showed {what}"
        )

    def hover(self, selector, fraction):
        """
        Move the pointer over C{selector} at C{fraction} of its width, half
        way down; the text of the tip that shows.
        """
        from selenium.webdriver.common.action_chains import ActionChains

        target = self.driver.find_element("css selector", selector)
        width = target.size["width"]
        ActionChains(self.driver).move_to_element_with_offset(
            target, int(width * (fraction - 0.5)), 0
        ).perform()
        self.waitFor(
            "return document.querySelector('.chart .tip:not([hidden])') !== null", "a tip"
        )
        return self.driver.execute_script(
            "return document.querySelector('.chart .tip:not([hidden])').textContent"
        )

    def problems(self):
        return [e for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def quit(self):
        self.driver.quit()


def browserInstalled():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: install the Debian packages"
            " chromium and chromium-driver"
        )


@pytest_twisted.ensureDeferred
async def test_page_in_headless_chromium(harness, tmp_path):
    browserInstalled()
    backends = [await harness.backend(name) for name in ("chat-1", "chat-2", "chat-3")]
    lbws = await harness.lbws(
        [
            ("chat-1", backends[0].url, "weight = 2"),
            ("chat-2", backends[1].url, "weight = 2"),
            ("chat-3", backends[2].url),
            ("chat-4", harness.deadUrl()),
        ],
        probe="websocket",
        health="interval = 0.5\ntimeout = 0.5",
    )
    # Some traffic, a drained backend with a connection left, a dead one.
    clients = [await harness.client(lbws.url) for _ in range(7)]
    for i, client in enumerate(clients):
        for n in range(i + 1):
            assert await echo(client, b"m" * (40 * (n + 1))) == b"m" * (40 * (n + 1))
    await eventually(lambda: lbws.pool["chat-4"].state == "down")
    await eventually(lambda: all(lbws.pool[n].checkRtt is not None for n in ("chat-1", "chat-2", "chat-3")))
    await post(lbws, "/backends/chat-3/drain", token=TOKEN)
    assert lbws.pool["chat-3"].active >= 1

    browser = await threads.deferToThread(Browser, tmp_path / "chromium-profile")
    try:
        await threads.deferToThread(browser.driver.get, lbws.dashboardUrl + "/")
        rows = await threads.deferToThread(
            browser.waitForRows,
            [["chat-1", "up"], ["chat-2", "up"], ["chat-3", "draining"], ["chat-4", "down"]],
        )
        assert [row[2].lower() for row in rows] == ["up", "up", "draining", "down"]
        # Each state has its own colour.
        assert len({row[3] for row in rows[1:]}) == 3
        text = await threads.deferToThread(
            lambda: browser.driver.find_element("id", "backends").text
        )
        assert "refused" in text  # chat-4's last error
        SCREENSHOT.parent.mkdir(exist_ok=True)
        saved = await threads.deferToThread(browser.driver.save_screenshot, str(SCREENSHOT))
        assert saved and SCREENSHOT.stat().st_size > 10000
        shutil.copy(SCREENSHOT, tmp_path / "dashboard.png")

        # The page follows the state by itself, without a reload.
        await threads.deferToThread(
            browser.driver.execute_script, "window.notReloaded = true"
        )
        await post(lbws, "/backends/chat-3/enable", token=TOKEN)
        await threads.deferToThread(
            browser.waitForRows,
            [["chat-1", "up"], ["chat-2", "up"], ["chat-3", "up"], ["chat-4", "down"]],
        )
        assert await threads.deferToThread(
            browser.driver.execute_script, "return window.notReloaded === true"
        )
        assert await threads.deferToThread(browser.problems) == []
    finally:
        await threads.deferToThread(browser.quit)


@pytest_twisted.ensureDeferred
async def test_reload_applies_the_file_or_keeps_the_running_config(harness, tmp_path):
    a = await harness.backend("a")
    b = await harness.backend("b")
    config = tmp_path / "lbws.ini"

    def write(backends, extra=""):
        config.write_text(
            configText(
                backends,
                dashboard=DASHBOARD,
                lbws=f"admin_token = {TOKEN}\n{extra}",
                health="interval = 0.1",
            )
        )

    write([("a", a.url)])
    lbws = await harness.start(makeLbws(reactor, loadConfig(config)))

    write([("a", a.url), ("b", b.url)])
    assert (await post(lbws, "/reload")).code == 401
    assert [m.name for m in lbws.pool] == ["a"]
    response = await post(lbws, "/reload", token=TOKEN)
    assert (response.code, response.json()) == (200, {"reloaded": True})
    names = [s["name"] for s in (await get(lbws, "/status.json")).json()["backends"]]
    assert names == ["a", "b"]
    # The added backend joins once its health checks pass.
    await eventually(lambda: lbws.pool["b"].state == "up")

    write([("a", a.url)], extra="balance = nonsense")
    response = await post(lbws, "/reload", token=TOKEN)
    assert response.code == 409
    assert response.json()["reloaded"] is False
    assert [m.name for m in lbws.pool] == ["a", "b"]


# History and events.


@pytest_twisted.ensureDeferred
async def test_history_json_ranges(harness):
    a = await harness.backend("a")
    lbws = await harness.lbws([("a", a.url)])
    client = await harness.client(lbws.url)
    assert await echo(client, b"x") == b"x"
    lbws.history.sample()  # one more, after the traffic, at once
    response = await get(lbws, "/history.json?range=900")
    assert response.code == 200
    assert response.header(b"content-type") == b"application/json"
    assert response.header(b"cache-control") == b"no-store"
    history = response.json()
    assert (history["interval"], history["range"]) == (2.0, 900)
    # The first sample when lbws started, the last after the traffic.
    [entry] = history["backends"]
    assert entry["name"] == "a"
    assert len(history["times"]) == len(entry["state"]) == len(entry["active"]) >= 2
    assert (entry["state"][0], entry["active"][0], entry["connections"][0]) == ("up", 0, None)
    assert (entry["state"][-1], entry["active"][-1]) == ("up", 1)
    assert history["total"]["active"][-1] == 1
    assert (await get(lbws, "/history.json")).json()["range"] == 3600
    assert (await get(lbws, "/history.json?range=86400")).json()["range"] == 3600
    for bad in ("abc", "0", "-5", "nan", "inf", ""):
        response = await get(lbws, f"/history.json?range={bad}")
        assert response.code == 400, bad
        assert f"range='{bad}'" in response.json()["error"]
    assert (await post(lbws, "/history.json")).code == 405


@pytest_twisted.ensureDeferred
async def test_events_json_says_what_happened_and_from_where(harness, tmp_path):
    a = await harness.backend("a")
    config = tmp_path / "lbws.ini"
    config.write_text(configText([("a", a.url)], dashboard=DASHBOARD, lbws=f"admin_token = {TOKEN}"))
    lbws = makeLbws(reactor, loadConfig(config))
    await harness.start(lbws)
    await post(lbws, "/backends/a/drain", token=TOKEN)
    await post(lbws, "/backends/a/enable", token=TOKEN)
    config.write_text(configText([("a", a.url)], lbws="balance = nonsense"))
    assert (await post(lbws, "/reload", token=TOKEN)).code == 409
    response = await get(lbws, "/events.json")
    assert response.code == 200
    events = response.json()["events"]
    assert [(e["kind"], e.get("source"), e.get("accepted")) for e in events] == [
        ("drain", "dashboard", None),
        ("enable", "dashboard", None),
        ("reload", None, False),
    ]
    assert events[0]["text"] == "backend a drained from the dashboard (127.0.0.1): now draining"
    assert "[lbws] balance" in events[2]["error"] and events[2]["level"] == "error"
    assert events[0]["time"] <= events[1]["time"] <= events[2]["time"] <= response.json()["now"]
    # Stopping is the last event, with the connections it drains.
    client = await harness.client(lbws.url)
    assert await echo(client, b"x") == b"x"
    await lbws.stopService()
    assert await client.closed == (1001, "lbws is stopping")
    stop = lbws.events.recent()[-1]
    assert (stop["kind"], stop["count"], stop["text"]) == (
        "stop", 1, "lbws stopping: 1 open connection(s) get 1001 over 10s after 0s, up to 30s in all"
    )
    assert (stop["spread"], stop["delay"], stop["timeout"]) == (10, 0, 30)


HISTORY_SCREENSHOT = ROOT / "reports" / "dashboard-history.png"
PHONE_SCREENSHOT = ROOT / "reports" / "dashboard-phone.png"
FLAP_HEALTH = "interval = 0.4\ntimeout = 1\nfall = 2\nrise = 2"
SAMPLE_EVERY = 0.2  # seconds: the history of a few seconds, not of minutes


class Load:
    """
    Clients that each send a message every 50 ms and read the echoes, and
    reconnect at once when their connection ends (as browsers' WebSocket
    clients do): traffic and connection counts for the charts.
    """

    def __init__(self, harness, url):
        self.harness = harness
        self.url = url
        self.clients = []
        self.reconnects = 0
        self.errors = []
        self._loop = task.LoopingCall(self._send)
        self._loop.clock = reactor
        harness.atEnd(self.stop, first=True)

    async def add(self, count):
        for _ in range(count):
            await self._connect()
        if not self._loop.running:
            self._loop.start(0.05)

    async def _connect(self):
        client = await self.harness.client(self.url)
        self.clients.append(client)
        client.closed.addCallback(self._lost, client)

    def _lost(self, _, client):
        self.clients.remove(client)
        if self._loop.running:
            self.reconnects += 1
            defer.ensureDeferred(self._connect()).addErrback(self.errors.append)

    def _send(self):
        for client in self.clients:
            client.sendMessage(b"load " * 20)
            while client.messages.pending:
                client.messages.pending.pop()

    def stop(self):
        if self._loop.running:
            self._loop.stop()


def browserScript(browser, script):
    return threads.deferToThread(browser.driver.execute_script, script)


@pytest_twisted.ensureDeferred
async def test_page_shows_a_backend_flapping_under_load(harness, tmp_path):
    """
    The operator's question after a flap: when did the backend go down and
    come back, what did the connections do, what was the check's round
    trip. Traffic through a real lbws to a node backend (killed, then
    started again on its port) and an Autobahn one; the page in headless
    Chromium, at desktop and phone sizes.
    """
    browserInstalled()
    if not nodeAvailable():
        pytest.fail("node and tests/node/node_modules are needed: run `make test`")
    holder = reservedPort()
    harness.atEnd(holder.close)
    port = holder.getsockname()[1]

    async def startNode():
        sock = listeningSocket(port)
        node = NodeOnSocket(sock, "")
        harness.atEnd(node.stop)
        await node.started()
        sock.close()  # node's copy is the only one: killing it closes the port
        return node

    node = await startNode()
    b = await harness.backend("chat-b")
    settings = parseConfig(
        configText(
            [("chat-a", f"ws://127.0.0.1:{port}"), ("chat-b", b.url)],
            dashboard=DASHBOARD,
            lbws=f"admin_token = {TOKEN}",
            health=FLAP_HEALTH,
            probe="websocket",
        ),
        "test.ini",
    )
    lbws = makeLbws(reactor, settings)
    lbws.history.interval = SAMPLE_EVERY
    await harness.start(lbws)
    a = lbws.pool["chat-a"]
    await eventually(lambda: a.checkRtt is not None)

    load = Load(harness, lbws.url)
    await load.add(10)
    assert a.active == 5
    await deferLater(1.5)

    node.stop()
    # Its clients are closed (1012) and reconnect at once, the first ones to
    # chat-a, the lightest: refused, they are retried on chat-b, and two
    # such failures take chat-a out (before its health checks would).
    await eventually(lambda: a.state == "down", timeout=5)
    await eventually(lambda: load.reconnects == 5 and len(load.clients) == 10)
    assert a.active == 0 and a.failed >= 1
    await deferLater(1.5)

    await startNode()
    await eventually(lambda: a.state == "up", timeout=5)
    # New clients, least_conn: chat-a takes them.
    await load.add(6)
    assert a.active == 6
    await deferLater(1.5)

    history = (await get(lbws, "/history.json?range=60")).json()
    entry = next(e for e in history["backends"] if e["name"] == "chat-a")
    states = [s for i, s in enumerate(entry["state"]) if i == 0 or s != entry["state"][i - 1]]
    assert states == ["up", "down", "up"]
    assert max(entry["active"][: entry["state"].index("down")]) == 5
    assert entry["active"][-1] == 6
    assert max(m for m in history["total"]["messages_in"] if m is not None) > 50
    assert any(r is not None for r in entry["rtt"])
    assert max(f for f in entry["failures"] if f is not None) > 0
    assert load.errors == []
    events = [(e["kind"], e.get("backend")) for e in (await get(lbws, "/events.json")).json()["events"]]
    assert events == [("backend_down", "chat-a"), ("backend_up", "chat-a")]

    browser = await threads.deferToThread(Browser, tmp_path / "chromium-profile")
    try:
        driver = browser.driver
        await threads.deferToThread(driver.set_window_size, 1280, 1500)
        await threads.deferToThread(driver.get, lbws.dashboardUrl + "/")
        await threads.deferToThread(
            browser.waitFor,
            "return document.querySelectorAll('#events li[data-kind]').length === 2"
            " && document.querySelector('#chart-connections svg').dataset.drawn === '2'",
            "the events and the charts",
        )
        timeline = await browserScript(
            browser,
            "return Array.from(document.querySelectorAll('#events li[data-kind]'))"
            ".map(li => [li.dataset.kind, li.dataset.backend, li.textContent])",
        )
        # Newest first: down, with its error, then up.
        assert [row[:2] for row in timeline] == [["backend_up", "chat-a"], ["backend_down", "chat-a"]]
        assert "backend chat-a is down" in timeline[1][2] and "refused" in timeline[1][2]
        charts = await browserScript(
            browser,
            "return Array.from(document.querySelectorAll('.chart')).map(c => [c.id,"
            " Number(c.querySelector('svg').dataset.drawn),"
            " Array.from(c.querySelectorAll('.mark')).map(m => m.dataset.kind),"
            " c.querySelectorAll('path.area').length])",
        )
        assert charts == [
            ["chart-connections", 2, ["backend_down", "backend_up"], 2],
            ["chart-messages", 2, ["backend_down", "backend_up"], 0],
            ["chart-failures", 3, ["backend_down", "backend_up"], 0],
            ["chart-rtt", 2, ["backend_down", "backend_up"], 0],
        ]
        # Hovering shows the values at that time, on every chart's cursor.
        tip = await threads.deferToThread(browser.hover, "#chart-connections svg", 0.97)
        assert "chat-a: 6" in tip and "chat-b: 10" in tip and "total: 16" in tip, tip
        assert await browserScript(browser, "return document.querySelectorAll('.cursor').length") == 4

        HISTORY_SCREENSHOT.parent.mkdir(exist_ok=True)
        assert await threads.deferToThread(driver.save_screenshot, str(HISTORY_SCREENSHOT))
        shutil.copy(HISTORY_SCREENSHOT, tmp_path / "dashboard-history.png")

        # The range switch: five minutes, from the server again.
        await threads.deferToThread(
            lambda: driver.find_element("css selector", "button[data-range='300']").click()
        )
        await threads.deferToThread(
            browser.waitFor,
            "return document.getElementById('range-label').textContent === '5 minutes'"
            " && document.querySelector('#chart-rtt svg').dataset.drawn === '2'",
            "the 5 minute range",
        )

        # A phone: nothing wider than the screen, the charts still drawn.
        await threads.deferToThread(driver.set_window_size, 390, 844)
        await threads.deferToThread(
            browser.waitFor,
            "const svg = document.querySelector('#chart-connections svg');"
            " return svg.clientWidth < 390 && Number(svg.dataset.width) === svg.clientWidth",
            "charts drawn for a phone",
        )
        sizes = await browserScript(
            browser,
            "return [window.innerWidth, document.documentElement.scrollWidth,"
            " Math.max(...Array.from(document.querySelectorAll('.chart, .cards, #events'))"
            ".map(e => e.getBoundingClientRect().right))]",
        )
        assert sizes[1] <= sizes[0] and sizes[2] <= sizes[0], sizes
        await browserScript(browser, "document.getElementById('history').scrollIntoView()")
        assert await threads.deferToThread(driver.save_screenshot, str(PHONE_SCREENSHOT))
        assert await threads.deferToThread(browser.problems) == []
    finally:
        await threads.deferToThread(browser.quit)
