"""
Routes (README, "Routes"): several applications behind one lbws, told
apart by host, path and subprotocol; end to end through a real lbws and
real backends, and the matcher against a plain reference.
"""

import json

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from lbws.config import ConfigError, RouteSettings, loadConfig, parseConfig, summary
from lbws.backends.pool import DOWN, UP
from lbws.backends.routes import RouteTable, forwardTarget, requestHost
from lbws.service import makeLbws
from tests import support, wire
from tests.support import HandshakeFailed, eventually, handshakeRequest, roundTrip
from tests.test_dashboard import Browser, browserInstalled, get
from tests.test_httpproxy import _hostPort, _httpBackend, exchange
from tests.test_workers import dashboardStatus, workerPids

# Backends "a" and "b" behind the routes of each test.


async def _two(harness):
    return await harness.backend("a"), await harness.backend("b")


async def _routed(harness, routes, backends=None, **kwargs):
    if backends is None:
        backends = await _two(harness)
    service = await harness.lbws([(f.name, f.url) for f in backends], routes=routes, **kwargs)
    return service, backends


async def _reaches(service, backends, timeout=10, **kwargs):
    """
    The name of the backend a new WebSocket reaches, and what it was
    asked for (path, headers, subprotocols).
    """
    before = {f.name: len(f.connections) for f in backends}
    client = await support.connect(service.url, **kwargs)
    try:
        seen = json.loads((await roundTrip(client, b"__request__", timeout=timeout))[0])
    finally:
        client.transport.abortConnection()
    [name] = [f.name for f in backends if len(f.connections) > before[f.name]]
    return name, seen


async def _refused(service, **kwargs):
    with pytest.raises(HandshakeFailed) as raised:
        await support.connect(service.url, **kwargs)
    return raised.value.status


async def _rawAnswer(service, path, host):
    client = await wire.rawConnect(service.url)
    client.send(handshakeRequest(path, host))
    await client.closed.addTimeout(10, reactor)
    return client.received.decode("latin-1")


@pytest_twisted.ensureDeferred
async def test_two_applications_by_path(harness):
    service, backends = await _routed(
        harness,
        """
        [route:chat]
        path = /chat
        backends = a
        [route:notify]
        path = /notify/
        backends = b
        """,
    )
    assert (await _reaches(service, backends, path="/chat"))[0] == "a"
    assert (await _reaches(service, backends, path="/chat/room/1?x=2"))[0] == "a"
    assert (await _reaches(service, backends, path="/notify"))[0] == "b"
    assert (await _reaches(service, backends, path="/notify/user"))[0] == "b"
    # Segment boundaries: /chatter is not under /chat; dot segments are
    # resolved before matching.
    assert await _refused(service, path="/chatter") == 404
    assert await _refused(service, path="/chat/../notifyx") == 404
    assert (await _reaches(service, backends, path="/chat/../notify/x"))[0] == "b"


@pytest_twisted.ensureDeferred
async def test_two_applications_by_host_with_a_wildcard(harness):
    service, backends = await _routed(
        harness,
        """
        [route:app]
        host = app.example.com
        backends = a
        [route:tenants]
        host = *.example.com
        backends = b
        """,
    )
    assert (await _reaches(service, backends, host="app.example.com"))[0] == "a"
    # Case and the port do not matter.
    assert (await _reaches(service, backends, host="APP.Example.COM"))[0] == "a"
    assert (await _reaches(service, backends, host="acme.example.com"))[0] == "b"
    assert (await _reaches(service, backends, host="x.acme.example.com"))[0] == "b"
    # The wildcard is for subdomains only, and other hosts match nothing.
    assert await _refused(service, host="example.com") == 404
    assert await _refused(service, host="example.org") == 404


@pytest_twisted.ensureDeferred
async def test_two_applications_by_subprotocol(harness):
    service, backends = await _routed(
        harness,
        """
        [route:v2]
        subprotocol = chat.v2
        backends = b
        [route:legacy]
        backends = a
        """,
    )
    name, seen = await _reaches(service, backends, protocols=["chat.v1", "chat.v2"])
    assert name == "b" and seen["protocols"] == ["chat.v1", "chat.v2"]
    assert (await _reaches(service, backends, protocols=["chat.v1"]))[0] == "a"
    assert (await _reaches(service, backends))[0] == "a"


@pytest_twisted.ensureDeferred
async def test_strip_prefix_and_the_backend_prefix(harness):
    a, b = await _two(harness)
    service = await harness.lbws(
        [("a", a.url + "/app"), ("b", b.url + "/svc")],
        routes="""
        [route:chat]
        path = /chat
        strip_prefix = true
        backends = a
        [route:notify]
        path = /notify
        backends = b
        """,
    )
    backends = (a, b)
    name, seen = await _reaches(service, backends, path="/chat/room?x=1")
    assert (name, seen["path"], seen["params"]) == ("a", "/app/room", {"x": ["1"]})
    name, seen = await _reaches(service, backends, path="/chat")
    assert (name, seen["path"]) == ("a", "/app/")
    # Without strip_prefix the whole path goes on, under the url's prefix.
    name, seen = await _reaches(service, backends, path="/notify/n")
    assert (name, seen["path"]) == ("b", "/svc/notify/n")
    # Dot segments are resolved before matching and stripping: a target
    # stays under its route and the backend's prefix.
    name, seen = await _reaches(service, backends, path="/chat/a/../b")
    assert (name, seen["path"]) == ("a", "/app/b")
    assert await _refused(service, path="/chat/../../etc") == 404
    # Percent-encoded ones, and encoded slashes, are refused
    # (escaped_slashes = reject, tests/test_paths.py).
    assert await _refused(service, path="/chat/a/%2e%2e/b") == 400
    assert await _refused(service, path="/chat/..%2f..%2fetc") == 400


@pytest_twisted.ensureDeferred
async def test_strip_prefix_for_plain_http(harness):
    backend = await _httpBackend(harness)
    service = await harness.lbws(
        [("a", backend.url + "/app")],
        routes="""
        [route:api]
        path = /api
        strip_prefix = yes
        backends = a
        """,
    )
    [(status, _, body)], _ = await exchange(
        _hostPort(service.url), [("GET", "/api/users?id=3", None, None)]
    )
    assert status == 200 and json.loads(body)["uri"] == "/app/users?id=3"


@pytest_twisted.ensureDeferred
async def test_precedence_host_then_path_then_subprotocol(harness):
    factories = [await harness.backend(n) for n in ("exact", "wild", "deep", "long", "sub", "any")]
    service, _ = await _routed(
        harness,
        """
        [route:any]
        backends = any
        [route:sub]
        path = /api
        subprotocol = v2
        backends = sub
        [route:long]
        path = /api/v1
        backends = long
        [route:short]
        path = /api
        backends = any
        [route:wild]
        host = *.example.com
        backends = wild
        [route:deep]
        host = *.eu.example.com
        backends = deep
        [route:exact]
        host = a.eu.example.com
        path = /x
        backends = exact
        """,
        backends=factories,
    )

    async def to(**kwargs):
        return (await _reaches(service, factories, **kwargs))[0]

    # An exact host first, then the longest wildcard, then no host.
    assert await to(host="a.eu.example.com", path="/x/1") == "exact"
    assert await to(host="a.eu.example.com", path="/y") == "deep"
    assert await to(host="b.eu.example.com", path="/x") == "deep"
    assert await to(host="b.us.example.com", path="/api/v1") == "wild"
    # Then the longest path prefix, then a subprotocol before none.
    assert await to(path="/api/v1/x", protocols=["v2"]) == "long"
    assert await to(path="/api/v2", protocols=["v2"]) == "sub"
    assert await to(path="/api/v2") == "any"
    assert await to(path="/other") == "any"


@pytest_twisted.ensureDeferred
async def test_unmatched_request_gets_404_websocket_and_http(harness):
    backend = await _httpBackend(harness)
    service = await harness.lbws(
        [("a", backend.url)],
        routes="""
        [route:api]
        host = api.example.com
        backends = a
        """,
    )
    answer = await _rawAnswer(service, "/", "www.example.com")
    assert answer.startswith("HTTP/1.1 404 Not Found\r\n")
    assert answer.endswith("\r\n\r\n404 Not Found: no route for this request\n")
    [(status, _, body)], _ = await exchange(
        _hostPort(service.url), [("GET", "/x", None, {"Host": "www.example.com"})]
    )
    assert (status, body) == (404, b"404 Not Found: no route for this request\n")
    [(status, _, _)], _ = await exchange(
        _hostPort(service.url), [("GET", "/x", None, {"Host": "api.example.com"})]
    )
    assert status == 200
    assert [r.uri for r in backend.requests] == [b"/x"]
    assert service.core.counters.handshakes["no_route"] == 1


@pytest_twisted.ensureDeferred
async def test_per_route_settings(harness):
    """
    A route's own max_message_size, sticky_cookie, http, allowed_origins,
    balance and hash_key apply to its clients only.
    """
    service, backends = await _routed(
        harness,
        """
        [route:small]
        path = /small
        max_message_size = 100
        http = refuse
        allowed_origins = https://app.example.com
        backends = a
        [route:users]
        path = /users
        balance = hash
        hash_key = header:x-user
        backends = a b
        [route:big]
        backends = a b
        balance = round_robin
        sticky_cookie = LB
        """,
    )
    origin = {"Origin": "https://evil.example.com"}
    assert await _refused(service, path="/small", headers=origin) == 403
    assert (await _reaches(service, backends, path="/big", headers=origin))[0] in ("a", "b")
    # hash: each user stays on one backend; round robin alternates.
    for user in ("u1", "u2", "u3", "u4"):
        places = {
            (await _reaches(service, backends, path="/users", headers={"X-User": user}))[0]
            for _ in range(3)
        }
        assert len(places) == 1
    assert {(await _reaches(service, backends, path="/big"))[0] for _ in range(2)} == {"a", "b"}
    small = await support.connect(service.url, path="/small")
    small.sendMessage(b"x" * 101)
    code, _ = await small.closed.addTimeout(10, reactor)
    assert code == 1009
    big = await support.connect(service.url, path="/big")
    assert (await roundTrip(big, b"y" * 1000))[0] == b"y" * 1000
    assert "LB=" in big.response.headers.get("set-cookie", "")
    [(status, _, _)], _ = await exchange(_hostPort(service.url), [("GET", "/small", None, None)])
    assert status == 426


@pytest_twisted.ensureDeferred
async def test_a_backend_in_two_routes_drains_in_both(harness):
    service, backends = await _routed(
        harness,
        """
        [route:one]
        path = /one
        backends = a b
        balance = round_robin
        [route:two]
        path = /two
        backends = b
        """,
    )
    assert {(await _reaches(service, backends, path="/one"))[0] for _ in range(4)} == {"a", "b"}
    assert (await _reaches(service, backends, path="/two"))[0] == "b"
    service.pool["b"].admin.drain()
    assert {(await _reaches(service, backends, path="/one"))[0] for _ in range(3)} == {"a"}
    assert await _refused(service, path="/two") == 503


@pytest_twisted.ensureDeferred
async def test_reload_adds_a_route_while_another_streams(harness, tmp_path):
    a, b = await _two(harness)
    backends = [("a", a.url), ("b", b.url)]
    chat = "[route:chat]\npath = /chat\nbackends = a\n"
    config = tmp_path / "lbws.ini"
    config.write_text(support.configText(backends, lbws="ping_interval = 0", routes=chat))
    service = await harness.start(makeLbws(reactor, loadConfig(config)))
    clients = [await harness.client(service.url, path=f"/chat/{i}") for i in range(5)]
    assert await _refused(service, path="/notify") == 404
    sent = 0

    async def stream(rounds):
        nonlocal sent
        for _ in range(rounds):
            for client in clients:
                client.sendMessage(b"m%d" % sent)
            sent += 1

    await stream(20)
    config.write_text(
        support.configText(
            backends,
            lbws="ping_interval = 0",
            routes=chat + "[route:notify]\npath = /notify\nbackends = b\n",
        )
    )
    assert service.reload() is True
    await stream(20)
    for client in clients:
        got = [(await client.messages.get().addTimeout(10, reactor))[0] for _ in range(sent)]
        assert got == [b"m%d" % i for i in range(sent)]
        assert not client.closed.called
    assert (await _reaches(service, (a, b), path="/notify/x"))[0] == "b"
    # The route the streaming clients came by is removed: they stay.
    config.write_text(
        support.configText(
            backends, lbws="ping_interval = 0", routes="[route:notify]\npath = /notify\nbackends = b\n"
        )
    )
    assert service.reload() is True
    for client in clients:
        assert (await roundTrip(client, b"still"))[0] == b"still"
    assert await _refused(service, path="/chat") == 404


@pytest_twisted.ensureDeferred
async def test_status_json_metrics_and_access_log_name_the_route(harness):
    logged = harness.logged()
    service, backends = await _routed(
        harness,
        """
        [route:chat]
        path = /chat
        strip_prefix = true
        backends = a
        [route:rest]
        backends = a b
        """,
        dashboard="tcp:0:interface=127.0.0.1",
    )
    staying = await harness.client(service.url, path="/chat/1")
    for i in range(3):
        await roundTrip(staying, b"m%d" % i)
    ended = await harness.client(service.url, path="/chat/2")
    await roundTrip(ended, b"x")
    ended.sendClose(1000)
    await ended.closed.addTimeout(10, reactor)
    await eventually(lambda: len(service.core.relay.tunnels) == 1)

    routes = (await get(service, "/status.json")).json()["routes"]
    assert [r["name"] for r in routes] == ["chat", "rest"]
    chat, rest = routes
    assert (chat["path"], chat["strip_prefix"], chat["backends"]) == ("/chat", True, ["a"])
    assert (chat["connections"], chat["handshakes_ok"]) == (1, 2)
    assert (chat["messages_to_backend"], chat["messages_to_client"]) == (4, 4)
    assert (rest["host"], rest["backends"], rest["connections"]) == ("", ["a", "b"], 0)

    samples = {}
    text = (await get(service, "/metrics")).body.decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("lbws_route_connections_active", (("route", "chat"),))] == 1
    assert samples[("lbws_route_handshakes_total", (("result", "ok"), ("route", "chat")))] == 2
    key = ("lbws_route_messages_total", (("direction", "to_backend"), ("route", "chat")))
    assert samples[key] == 4
    access = [e for e in logged if e.get("log_format_access")]
    assert [(e["route"], e["backend"]) for e in access] == [("chat", "a")]


@pytest_twisted.ensureDeferred
async def test_dashboard_page_groups_backends_by_route(harness, tmp_path):
    browserInstalled()
    service, backends = await _routed(
        harness,
        """
        [route:chat]
        host = *.example.com
        path = /chat
        backends = a
        [route:rest]
        backends = a b
        """,
        dashboard="tcp:0:interface=127.0.0.1",
    )
    client = await harness.client(service.url, path="/chat", host="x.example.com")
    await roundTrip(client, b"hi")
    service.pool["b"].admin.drain()
    browser = await threads.deferToThread(Browser, tmp_path / "chromium-profile")
    try:
        await threads.deferToThread(browser.driver.get, service.dashboardUrl + "/")
        script = (
            "return Array.from(document.querySelectorAll('#route-rows tr'))"
            ".map(r => Array.from(r.cells).map(c => c.innerText.replace(/\\s+/g, ' ').trim()))"
        )
        await threads.deferToThread(
            browser.waitFor, script + ".length === 2 && true", "the routes table"
        )
        await threads.deferToThread(
            browser.waitFor,
            "return document.querySelector('#route-rows .pill.draining') !== null",
            "b draining in its route",
        )
        rows = await threads.deferToThread(browser.driver.execute_script, script)
        # (The pills are shown in capitals.)
        assert [[cell.lower() for cell in row] for row in rows] == [
            ["chat host *.example.com, path /chat", "a", "1", "1", "0", "1", "1"],
            ["rest any host, any path", "a b", "0", "0", "0", "0", "0"],
        ]
        assert await threads.deferToThread(browser.problems) == []
    finally:
        await threads.deferToThread(browser.quit)


class _Probed(Resource):
    """
    An HTTP backend healthy at one path only; counts the probes there.
    """

    isLeaf = True

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.hits = 0

    def render_GET(self, request):
        if request.path.decode() != self.path:
            request.setResponseCode(404)
            return b"no"
        self.hits += 1
        return b"ok"


@pytest_twisted.ensureDeferred
async def test_per_backend_probe_paths(harness):
    resources = {"ready": _Probed("/ready"), "alive": _Probed("/alive"), "plain": _Probed("/alive")}
    urls = {}
    for name, resource in resources.items():
        port = await harness.listen(Site(resource))
        urls[name] = f"ws://127.0.0.1:{port.getHost().port}"
    service = await harness.lbws(
        [
            ("ready", urls["ready"]),
            ("alive", urls["alive"], "path = /alive"),
            ("plain", urls["plain"]),
        ],
        probe="http",
        health="path = /ready\ninterval = 0.1\nfall = 1\nrise = 1",
        routes="""
        [route:one]
        path = /one
        backends = ready alive plain
        [route:two]
        backends = alive plain
        """,
    )
    pool = service.pool
    await eventually(lambda: pool["plain"].state == DOWN)
    await eventually(lambda: pool["alive"].checks.get("ok", 0) >= 3)
    assert pool["ready"].state == UP and pool["alive"].state == UP
    # One probe per check, though "alive" serves two routes.
    assert resources["alive"].hits == pool["alive"].checks["ok"]
    assert resources["plain"].hits == 0
    assert (
        "alive: " + urls["alive"] + " weight 1; probed with http: GET /alive, healthy on 2xx or 3xx"
        in summary(service.settings)
    )


# Configuration


ROUTED = """
[backend:a]
url = ws://127.0.0.1:8010
[backend:b]
url = ws://127.0.0.1:8011
"""


def _error(text):
    with pytest.raises(ConfigError) as raised:
        parseConfig(ROUTED + text, "lbws.ini")
    return str(raised.value)


def test_route_mistakes_name_file_section_and_key():
    assert _error("[route:x]\npath = /a\n") == (
        "lbws.ini: [route:x] backends: missing: name the [backend:NAME] sections this route uses"
    )
    assert "[route:x] backends: 'c' is not a [backend:NAME] section" in _error(
        "[route:x]\nbackends = a c\n"
    )
    assert "[route:x] host: 'a b'" in _error("[route:x]\nhost = a b\nbackends = a\n")
    assert "[route:x] path: 'chat' must start with /" in _error(
        "[route:x]\npath = chat\nbackends = a\n"
    )
    assert "[route:x] path: '/a/../b' must be a path prefix" in _error(
        "[route:x]\npath = /a/../b\nbackends = a\n"
    )
    assert "[route:x] balance: 'fast'" in _error("[route:x]\nbackends = a\nbalance = fast\n")
    assert "[route:x] weight: unknown key" in _error("[route:x]\nbackends = a\nweight = 2\n")
    assert "[backend:c] probe: 'ping' is not one of default, tcp, websocket, http" in _error(
        "[backend:c]\nurl = ws://h\nprobe = ping\n"
    )
    assert "[backend:c] path: 'x' must start with /" in _error(
        "[backend:c]\nurl = ws://h\npath = x\n"
    )


def test_two_routes_with_the_same_match_are_refused_naming_both():
    assert _error(
        "[route:one]\nhost = A.example.com\npath = /x/\nbackends = a\n"
        "[route:two]\nhost = a.example.com\npath = /x\nbackends = b\n"
    ) == (
        "lbws.ini: [route:two]: matches the same requests as [route:one]"
        " (same host, path and subprotocol)"
    )


def test_routes_inherit_lbws_settings_and_check_prints_them_in_match_order():
    settings = parseConfig(
        "[lbws]\nbalance = hash\nhash_key = header:x-user\nmax_message_size = 99\n"
        + ROUTED
        + "[route:all]\nbackends = a b\n"
        + "[route:chat]\npath = /chat\nstrip_prefix = on\nbackends = b\nbalance = round_robin\n"
        + "[route:host]\nhost = *.example.com\nbackends = a\n",
        "lbws.ini",
    )
    everything, chat, _ = settings.routes
    assert (everything.balance, str(everything.hash_key), everything.max_message_size) == (
        "hash",
        "header:x-user",
        99,
    )
    assert (chat.balance, chat.strip_prefix) == ("round_robin", True)
    assert summary(settings).endswith(
        "3 route(s), in match order:\n"
        "  host: host *.example.com, any path -> a; balance hash\n"
        "  chat: any host, path /chat (strip_prefix) -> b; balance round_robin\n"
        "  all: any host, any path -> a, b; balance hash"
    )


def test_no_route_section_is_one_implicit_route_over_every_backend():
    settings = parseConfig(ROUTED + "[lbws]\nsticky_cookie = S\n")
    table = RouteTable.of(settings)
    assert table.implicit
    [route] = table.routes
    assert route.backends is None and route.sticky_cookie == "S"
    assert table.match(None, "/anything") is route
    assert "route" not in summary(settings)


def test_forward_target():
    route = RouteSettings("r", path="/chat", strip_prefix=True)
    assert forwardTarget(route, "/chat/a/b?x=/chat") == "/a/b?x=/chat"
    assert forwardTarget(route, "/chat?x") == "/?x"
    assert forwardTarget(route, "/chat") == "/"
    assert forwardTarget(RouteSettings("r", path="/chat"), "/chat/a") == "/chat/a"


def test_request_host():
    assert requestHost("Example.COM:8080") == "example.com"
    assert requestHost("example.com.") == "example.com"
    assert requestHost("[::1]:80") == "[::1]"
    assert requestHost(None) == ""


# The matcher against a straightforward reference: every route that
# matches, the most specific by the README's rules.

_labels = st.sampled_from(["a", "b", "example", "com", "x-1"])
_hosts = st.lists(_labels, min_size=1, max_size=4).map(".".join)
_segments = st.sampled_from(["chat", "chatter", "x", "api", "v1", ""])
_paths = st.lists(_segments, max_size=4).map(lambda s: "/" + "/".join(s))
_protocols = st.sampled_from(["v1", "v2", "mqtt"])


@st.composite
def _routes(draw):
    routes = []
    seen = set()
    for i in range(draw(st.integers(0, 12))):
        host = draw(st.one_of(st.just(""), _hosts, _hosts.map(lambda h: "*." + h)))
        path = draw(st.one_of(st.just(""), _paths)).rstrip("/")
        subprotocol = draw(st.one_of(st.just(""), _protocols))
        if (host, path, subprotocol) in seen:
            continue
        seen.add((host, path, subprotocol))
        routes.append(RouteSettings(f"r{i}", host, path, subprotocol, ("a",)))
    return routes


def _reference(routes, host, path, offered):
    host = host.split(":")[0].lower()

    def matches(route):
        if route.host.startswith("*."):
            hostOk = host.endswith(route.host[1:])
        else:
            hostOk = route.host in ("", host)
        pathOk = route.path in ("", path) or path.startswith(route.path + "/")
        return hostOk and pathOk and route.subprotocol in ("", *offered)

    def specificity(pair):
        index, route = pair
        if not route.host:
            hostRank = 2
        elif route.host.startswith("*."):
            hostRank = 1
        else:
            hostRank = 0
        return (hostRank, -len(route.host), -len(route.path), not route.subprotocol, index)

    candidates = [(i, r) for i, r in enumerate(routes) if matches(r)]
    return min(candidates, key=specificity)[1] if candidates else None


@given(
    _routes(),
    _hosts,
    st.sampled_from(["", ":80", ":8020"]),
    _paths,
    st.lists(_protocols, max_size=2),
    st.booleans(),
)
def test_matcher_against_reference(routes, host, port, path, offered, upper):
    shown = (host.upper() if upper else host) + port
    table = RouteTable(routes)
    assert table.match(shown, path, offered) == _reference(routes, shown, path, offered)


@pytest_twisted.ensureDeferred
async def test_workers_route_and_the_dashboard_sums_their_routes(tmp_path, harness):
    """
    With workers = 2 every worker matches routes as one process does, and
    status.json adds up what the workers report per route.
    """
    a, b = await _two(harness)
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", a.url), ("b", b.url)],
            lbws="workers = 2\nping_interval = 0\ndrain_timeout = 5",
            dashboard="tcp:0:interface=127.0.0.1",
            routes="[route:chat]\npath = /chat\nbackends = a\n"
            "[route:notify]\npath = /notify\nbackends = b\n",
        )
    )
    process = support.LbwsProcess(config)
    harness.atEnd(process.stop)
    await eventually(lambda: len(workerPids(process)) == 2)
    for path, factory in (("/chat", a), ("/notify", b)):
        for i in range(6):
            client = await harness.client(process.url, path=f"{path}/{i}")
            assert (await roundTrip(client, b"hi"))[0] == b"hi"
        assert len(factory.connections) == 6
    assert await _refused(process, path="/other") == 404
    status = {}

    async def summed():
        status.update(await dashboardStatus(process))
        counts = [(r["name"], r["connections"], r["messages_to_backend"]) for r in status["routes"]]
        # In match order: the longer path first.
        return counts == [("notify", 6, 6), ("chat", 6, 6)]

    await eventually(summed, timeout=10, step=0.1)
