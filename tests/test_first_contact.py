"""
First contact (README, "Compared with the nginx setup"): what a newcomer
meets when lbws stands in front of an ordinary application, over real
sockets.
"""

import json

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Site

from lbws.config import ConfigError, parseConfig, summary

from tests import support, wire
from tests.test_hostile import answer, backendHead, fields, statusLine
from tests.test_httpproxy import _hostPort, _httpBackend, exchange
from tests.support import eventually, handshakeRequest

# UTF-8 cookies as browsers send them: "Å" is C3 85 and "х" D1 85, so both
# carry the byte 0x85 that older Autobahn parsers took for a line end.
COOKIE = "name=Åsa; city=Хорошёво".encode()


@pytest_twisted.ensureDeferred
async def test_utf8_cookie_reaches_a_websocket_backend_byte_for_byte(harness):
    backend = await wire.rawBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], health="interval = 60")
    request = handshakeRequest()[:-2] + b"Cookie: " + COOKIE + b"\r\n\r\n"
    head = await backendHead(harness, lbws, backend, request)
    assert dict(fields(head))[b"cookie"] == COOKIE


@pytest_twisted.ensureDeferred
async def test_utf8_cookie_reaches_an_http_backend_byte_for_byte(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], health="interval = 60")
    [(status, _, body)], _ = await exchange(
        _hostPort(lbws.url), [("GET", "/echo", None, {"Cookie": COOKIE})]
    )
    assert status == 200
    assert json.loads(body)["headers"]["cookie"] == [COOKIE.decode()]


# Gentle with backends: FIN, not a reset, for a connection lbws gives up on.


@pytest_twisted.ensureDeferred
async def test_backend_handshake_timeout_ends_with_fin(harness):
    silent = await harness.silent()
    lbws = await harness.lbws(
        [("silent", silent.url)], health="interval = 60", lbws="handshake_timeout = 1"
    )
    with pytest.raises(support.HandshakeFailed):
        await support.connect(lbws.url)
    await eventually(lambda: silent.lost)
    # The backend read an end of file (lbws's FIN), not ECONNRESET.
    assert silent.lost[0].reason.check(ConnectionDone), silent.lost[0].reason


@pytest_twisted.ensureDeferred
async def test_timed_out_websocket_check_ends_with_fin(harness):
    silent = await harness.silent()
    await harness.lbws(
        [("silent", silent.url)], probe="websocket", health="interval = 1\ntimeout = 0.5"
    )
    await eventually(lambda: silent.lost)
    assert silent.lost[0].reason.check(ConnectionDone), silent.lost[0].reason


@pytest_twisted.ensureDeferred
async def test_client_leaving_while_its_backend_answers_slowly_ends_with_fin(harness):
    silent = await harness.silent()
    lbws = await harness.lbws([("silent", silent.url)], health="interval = 60")
    client = await wire.rawConnect(lbws.url)
    client.transport.write(handshakeRequest())
    await eventually(lambda: silent.connections)
    client.transport.loseConnection()
    await eventually(lambda: silent.lost)
    assert silent.lost[0].reason.check(ConnectionDone), silent.lost[0].reason
    await eventually(lambda: lbws.pool["silent"].active == 0)
    assert lbws.pool["silent"].failed == 0


# The default health check keeps any running application up.


class _Answers(Resource):
    """
    An application that upgrades nothing: / answers with the status it is
    given, as FastAPI's 404, an MQTT broker's 400 or a static site's 200.
    """

    isLeaf = True

    def __init__(self, status):
        super().__init__()
        self.status = status
        self.requests = 0

    def render(self, request):
        self.requests += 1
        request.setResponseCode(self.status)
        return b"not a WebSocket endpoint"


@pytest.mark.parametrize("status", [200, 400, 403, 404])
@pytest_twisted.ensureDeferred
async def test_default_probe_keeps_an_application_that_does_not_upgrade_up(harness, status):
    app = _Answers(status)
    port = await harness.listen(Site(app))
    lbws = await harness.lbws(
        [("app", f"ws://127.0.0.1:{port.getHost().port}")],
        probe="default",
        health="interval = 0.2\nfall = 1",
    )
    await eventually(lambda: app.requests >= 3)
    member = lbws.pool["app"]
    assert member.healthy and member.consecutiveFailures == 0, member.lastError


@pytest_twisted.ensureDeferred
async def test_default_probe_runs_the_websocket_check_on_an_endpoint_that_upgrades(harness):
    backend = await harness.backend("echo")
    lbws = await harness.lbws([("echo", backend.url)], probe="default", health="interval = 0.2")
    # An endpoint that upgrades gets the whole WebSocket check: open, ping,
    # and a clean close the backend sees.
    await eventually(lambda: len(backend.closes) >= 2)
    assert backend.closes[:2] == [(True, 1000, None)] * 2
    assert lbws.pool["echo"].healthy


@pytest_twisted.ensureDeferred
async def test_default_probe_marks_a_backend_that_is_gone_down(harness):
    lbws = await harness.lbws(
        [("gone", harness.deadUrl())], probe="default", health="interval = 0.2\nfall = 1"
    )
    await eventually(lambda: not lbws.pool["gone"].healthy)


def test_probe_path_and_its_deprecated_alias(tmp_path):
    text = support.configText([("a", "ws://127.0.0.1:1")], probe="default", health="path = /up")
    settings = parseConfig(text, "lbws.ini")
    assert settings.health.path == "/up"
    assert settings.notes == (
        "lbws.ini: [health] path is deprecated: call it probe_path (it is the health"
        " check's path)",
    )
    text = support.configText(
        [("a", "ws://127.0.0.1:1", "probe_path = /ws")], probe="default", health="probe_path = /up"
    )
    settings = parseConfig(text, "lbws.ini")
    assert (settings.health.path, settings.backends[0].health_path, settings.notes) == (
        "/up", "/ws", ()
    )
    assert "probed with default: WebSocket handshake on /ws" in summary(settings)
    with pytest.raises(ConfigError) as raised:
        parseConfig(support.configText([("a", "ws://127.0.0.1:1")], health="path = /a\nprobe_path = /b"))
    assert (raised.value.section, raised.value.key) == ("health", "path")


# Host: the client's by default; the backend's own, with its URLs rewritten
# back, with host_header = backend.


class _Redirects(Resource):
    """
    /docs redirects to /docs/ with an absolute URL built from Host, as
    Starlette and Django do; /refresh sends a Refresh to its own address.
    Every request's Host is kept.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.hosts = []

    def render(self, request):
        host = request.getHeader(b"host").decode()
        self.hosts.append(host)
        if request.path.endswith(b"/docs"):
            request.setResponseCode(307)
            request.setHeader(b"location", f"http://{host}/app/docs/".encode())
            request.setHeader(b"content-location", b"http://elsewhere.example/x")
            return b""
        request.setHeader(b"refresh", f"5; url=http://{host}/app/next".encode())
        return b"page"


async def _redirectingBackend(harness):
    app = _Redirects()
    port = await harness.listen(Site(app))
    app.url = f"ws://127.0.0.1:{port.getHost().port}/app"
    app.own = f"127.0.0.1:{port.getHost().port}"
    return app


@pytest_twisted.ensureDeferred
async def test_backend_gets_the_clients_host_by_default(harness):
    app = await _redirectingBackend(harness)
    ws = await wire.rawBackend(harness)
    lbws = await harness.lbws([("a", app.url)], health="interval = 60")
    [(status, headers, _)], _ = await exchange(
        _hostPort(lbws.url), [("GET", "/docs", None, {"Host": "public.example"})]
    )
    assert app.hosts == ["public.example"]
    assert (status, headers["Location"]) == (307, "http://public.example/app/docs/")

    lbws = await harness.lbws([("ws", ws.url)], health="interval = 60")
    head = await backendHead(harness, lbws, ws, handshakeRequest(host="chat.example:8443"))
    assert dict(fields(head))[b"host"] == b"chat.example:8443"


@pytest_twisted.ensureDeferred
async def test_host_header_backend_rewrites_its_own_urls_back(harness):
    app = await _redirectingBackend(harness)
    lbws = await harness.lbws(
        [("a", app.url)], health="interval = 60", lbws="host_header = backend"
    )
    [(status, headers, _), (_, page, _)], _ = await exchange(
        _hostPort(lbws.url),
        [("GET", "/docs", None, {"Host": "public.example"}), ("GET", "/", None, {"Host": "public.example"})],
    )
    assert app.hosts == [app.own, app.own]
    # The backend's own URL, path prefix included, becomes the client's.
    assert (status, headers["Location"]) == (307, "http://public.example/docs/")
    assert headers["Content-Location"] == "http://elsewhere.example/x"
    assert page["Refresh"] == "5; url=http://public.example/next"


@pytest_twisted.ensureDeferred
async def test_host_header_backend_rewrites_a_websocket_refusals_location(harness):
    app = await _redirectingBackend(harness)
    lbws = await harness.lbws(
        [("a", app.url)], health="interval = 60", lbws="host_header = backend"
    )
    response, client = await answer(lbws.url, handshakeRequest(path="/docs", host="public.example"))
    client.transport.loseConnection()
    assert statusLine(response).startswith("HTTP/1.1 307 ")
    assert "\r\nLocation: http://public.example/docs/\r\n" in response
    assert app.hosts == [app.own]


@pytest_twisted.ensureDeferred
async def test_a_route_chooses_its_host_header(harness):
    app = await _redirectingBackend(harness)
    lbws = await harness.lbws(
        [("a", app.url)],
        health="interval = 60",
        lbws="host_header = backend",
        routes=(
            "[route:public]\nhost = public.example\nbackends = a\nhost_header = client\n"
            "[route:rest]\nbackends = a\n"
        ),
    )
    await exchange(
        _hostPort(lbws.url),
        [("GET", "/", None, {"Host": "public.example"}), ("GET", "/", None, {"Host": "other.example"})],
    )
    assert app.hosts == ["public.example", app.own]


# A quiet, useful log.


def _lines(events):
    return [formatEvent(e) for e in events]


@pytest_twisted.ensureDeferred
async def test_each_refused_handshake_gets_one_access_line_and_no_warning(harness):
    events = harness.logged()
    app = _Answers(403)
    port = await harness.listen(Site(app))
    lbws = await harness.lbws(
        [("app", f"ws://127.0.0.1:{port.getHost().port}")],
        probe="http",
        health="interval = 0.1",
        routes="[route:app]\npath = /app\nbackends = app\n",
    )
    for path in ("/app/x", "/elsewhere"):
        response, client = await answer(lbws.url, handshakeRequest(path=path))
        client.transport.loseConnection()
    await eventually(lambda: app.requests >= 5)  # a few HTTP checks ran too
    access = [e for e in events if e.get("log_format_access")]
    assert [(e["target"], e["status"]) for e in access] == [("/app/x", 403), ("/elsewhere", 404)]
    assert [formatEvent(e) for e in access][0] == (
        "127.0.0.1 /app/x refused: 403 backend answered HTTP 403 Forbidden"
    )
    noisy = [
        line
        for e, line in zip(events, _lines(events))
        if e["log_level"] >= LogLevel.warn or "HTTP11ClientFactory" in line
    ]
    # The only warning: the backend is down by its checks (403 on GET /).
    assert noisy == ["backend app is down: backend answered HTTP 403 Forbidden"], noisy


@pytest_twisted.ensureDeferred
async def test_a_size_limit_is_logged_as_the_limit(harness):
    events = harness.logged()
    backend = await harness.backend()
    lbws = await harness.lbws([("a", backend.url)], lbws="max_message_size = 10")
    client = await harness.client(lbws.url)
    client.sendMessage(b"x" * 11)
    await client.closed
    assert any("went over a size limit: 1009" in line for line in _lines(events))
    assert not any("broke the protocol" in line for line in _lines(events))


def test_the_default_max_connections_is_no_warning_on_a_low_descriptor_limit():
    from lbws.ops import fdlimit

    default = parseConfig(support.configText([("a", "ws://127.0.0.1:1")]))
    chosen = parseConfig(
        support.configText([("a", "ws://127.0.0.1:1")], lbws="max_connections = 10000")
    )
    assert fdlimit.shortfall(default, 4096) is None
    assert "about 1984 connections fit" in fdlimit.fits(default, 4096)
    assert "below 2 x max_connections" in fdlimit.shortfall(chosen, 4096)
    assert fdlimit.fits(chosen, 4096) is None
    assert fdlimit.fits(default, 100000) is None


@pytest_twisted.ensureDeferred
async def test_default_probe_keeps_a_backend_that_accepts_and_stays_silent_up(harness):
    """
    Connected, and no answer by the check's timeout (a SockJS server says
    nothing outside its prefix): up under the default probe, down under the
    websocket probe; either way the check's connection ends with a FIN.
    """
    silent = await harness.silent()
    lbws = await harness.lbws(
        [("quiet", silent.url), ("strict", silent.url, "probe = websocket")],
        probe="default",
        health="interval = 0.2\ntimeout = 0.2\nfall = 1",
    )
    await eventually(lambda: lbws.pool["quiet"].checks.get("ok", 0) >= 2)
    await eventually(lambda: not lbws.pool["strict"].healthy)
    assert lbws.pool["quiet"].healthy and lbws.pool["quiet"].consecutiveFailures == 0
    await eventually(lambda: len(silent.lost) >= 3)
    assert all(p.reason.check(ConnectionDone) for p in silent.lost)
