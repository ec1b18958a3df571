"""
Plain HTTP through lbws's listener (README, "Plain HTTP and long-polling"):
real twisted.web backends, a real lbws, and Python's http.client (run in
threads) as the client; every answer is compared with the backend's own.
"""

import hashlib
import http.client
import json
import os
import re
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor, threads, utils
from twisted.logger import formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from lbws.backends import sticky
from lbws.protocol.frames import OP_TEXT
from tests import support, wire
from tests.test_tls import pki  # noqa: F401 (a fixture)
from tests.support import eventually


class _Backend(Resource):
    """
    /echo answers what it got; /chunked streams a body of unknown length
    (twisted.web sends it chunked); /hang never answers.
    """

    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.requests = []

    def render(self, request):
        path = request.path.decode()
        self.requests.append(request)
        if path.endswith("/hang"):
            return NOT_DONE_YET
        if path.endswith("/chunked"):
            for i in range(100):
                request.write(b"%04d" % i * 256)
            request.finish()
            return NOT_DONE_YET
        body = request.content.read()
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-backend", self.name.encode())
        return json.dumps(
            {
                "backend": self.name,
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": {
                    k.decode().lower(): [v.decode() for v in vs]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                },
                "body": len(body),
                "sha": hashlib.sha256(body).hexdigest(),
                # What a TLS connection negotiated by ALPN, as text.
                "alpn": (getattr(request.transport, "negotiatedProtocol", None) or b"").decode(),
            }
        ).encode()


async def _httpBackend(harness, name="a"):
    resource = _Backend(name)
    port = await harness.listen(Site(resource))
    resource.url = f"ws://127.0.0.1:{port.getHost().port}"
    resource.http = f"127.0.0.1:{port.getHost().port}"
    return resource


def _hostPort(url):
    return url.split("://", 1)[1].rstrip("/")


def _exchange(address, requests, timeout=20):
    """
    Send C{requests} (method, path, body, headers) one after the other on
    ONE keep-alive connection; return [(status, headers, body)] and the
    number of connections used.
    """
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    answers = []
    sockets = set()
    try:
        for method, path, body, headers in requests:
            conn.request(method, path, body=body, headers=headers or {})
            sockets.add(id(conn.sock))
            response = conn.getresponse()
            answers.append((response.status, dict(response.getheaders()), response.read()))
    finally:
        conn.close()
    return answers, len(sockets)


def exchange(address, requests, timeout=20):
    return threads.deferToThread(_exchange, address, requests, timeout)


@pytest_twisted.ensureDeferred
async def test_get_post_head_keep_alive_same_as_direct(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)])
    requests = [
        ("GET", "/echo?x=1", None, {"Cookie": "a=1"}),
        ("POST", "/echo", b"x" * 5000, {"Content-Type": "text/plain"}),
        ("HEAD", "/echo", None, None),
        ("PUT", "/echo", b"put", None),
        ("GET", "/chunked", None, None),
    ]
    direct, _ = await exchange(backend.http, requests)
    proxied, connections = await exchange(_hostPort(lbws.url), requests)
    assert connections == 1  # keep-alive: five requests on one connection
    for (dStatus, dHeaders, dBody), (pStatus, pHeaders, pBody) in zip(direct, proxied):
        assert pStatus == dStatus
        assert pHeaders.get("Content-Type") == dHeaders.get("Content-Type")
        if dBody.startswith(b"{"):
            d, p = json.loads(dBody), json.loads(pBody)
            assert (p["method"], p["uri"], p["body"], p["sha"]) == (
                d["method"], d["uri"], d["body"], d["sha"]
            )
            assert p["headers"]["x-forwarded-for"] == ["127.0.0.1"]
            assert p["headers"]["x-real-ip"] == ["127.0.0.1"]
        else:
            assert pBody == dBody
    assert proxied[0][0] == 200 and proxied[1][0] == 200
    assert len(proxied[4][2]) == 100 * 1024  # the chunked download, whole
    assert proxied[4][1].get("Transfer-Encoding") == "chunked"


@pytest_twisted.ensureDeferred
async def test_hop_by_hop_headers_removed_and_forwarded_headers_added(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url + "/app")])
    headers = {
        "Connection": "keep-alive, X-Private",
        "X-Private": "secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic eA==",
        "Upgrade": "h2c",
        "X-Forwarded-For": "10.0.0.1",
        "Host": "public.example",
        "Authorization": "Bearer t",
    }
    [(status, _, body)], _ = await exchange(
        _hostPort(lbws.url), [("GET", "/echo", None, headers)]
    )
    assert status == 200
    seen = json.loads(body)
    assert seen["uri"] == "/app/echo"  # the backend URL's path is a prefix
    for hop in ("x-private", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert hop not in seen["headers"], hop
    assert seen["headers"]["x-forwarded-for"] == ["10.0.0.1, 127.0.0.1"]
    assert seen["headers"]["x-forwarded-host"] == ["public.example"]
    assert seen["headers"]["x-forwarded-proto"] == ["http"]
    assert seen["headers"]["authorization"] == ["Bearer t"]
    assert seen["headers"]["host"] == ["public.example"]  # host_header = client


@pytest_twisted.ensureDeferred
async def test_http_refuse_answers_426(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], lbws="http = refuse")
    [(status, headers, body)], _ = await exchange(
        _hostPort(lbws.url), [("POST", "/echo", b"x", None)]
    )
    assert status == 426
    assert headers["Upgrade"] == "websocket"
    assert headers["Connection"] == "Upgrade"
    assert body == b"426 Upgrade Required: this service speaks WebSocket only\n"
    assert backend.requests == []


@pytest_twisted.ensureDeferred
async def test_body_over_max_body_size_gets_413(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], lbws="max_body_size = 1000")
    address = _hostPort(lbws.url)
    [(status, headers, body)], _ = await exchange(
        address, [("POST", "/echo", b"x" * 1001, None)]
    )
    assert status == 413
    assert headers["Connection"] == "close"
    # Chunked: the limit applies to what has arrived.
    chunks = iter([b"y" * 600, b"y" * 600])
    [(status, _, _)], _ = await exchange(
        address,
        [("POST", "/echo", chunks, None)],
    )
    assert status == 413
    [(status, _, body)], _ = await exchange(
        address, [("POST", "/echo", b"x" * 1000, None)]
    )
    assert status == 200 and json.loads(body)["body"] == 1000
    assert len(backend.requests) == 1


@pytest_twisted.ensureDeferred
async def test_chunked_upload_streams_to_the_backend(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], lbws="max_body_size = 0")
    payload = [bytes([i]) * 100_000 for i in range(30)]  # 3 MB, over 1 MiB
    requests = [("POST", "/echo", iter(payload), None)]  # http.client sends it chunked
    [(status, _, body)], _ = await exchange(_hostPort(lbws.url), requests)
    assert status == 200
    seen = json.loads(body)
    assert seen["body"] == 3_000_000
    assert seen["sha"] == hashlib.sha256(b"".join(payload)).hexdigest()


@pytest_twisted.ensureDeferred
async def test_backend_response_head_late_gets_504(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], lbws="http_timeout = 0.5")
    start = reactor.seconds()
    [(status, _, body)], _ = await exchange(
        _hostPort(lbws.url), [("GET", "/hang", None, None)]
    )
    assert status == 504
    assert 0.4 < reactor.seconds() - start < 5
    assert b"127.0.0.1" not in body and len(body) < 100


@pytest_twisted.ensureDeferred
async def test_no_backend_gets_503_and_dead_backend_502(harness):
    dead = harness.deadUrl()
    lbws = await harness.lbws(
        [("a", dead)], lbws="retries = 0", health="interval = 3600\nfall = 1"
    )
    address = _hostPort(lbws.url)
    [(status, _, body)], _ = await exchange(address, [("GET", "/", None, None)])
    assert status == 502
    assert b"127.0.0.1" not in body and b"refused" not in body.lower()
    await eventually(lambda: lbws.pool["a"].state == "down")
    # Down, and the only one: tried all the same.
    [(status, _, body)], _ = await exchange(address, [("GET", "/", None, None)])
    assert status == 502
    lbws.pool["a"].admin.drain()
    [(status, _, body)], _ = await exchange(address, [("GET", "/", None, None)])
    assert status == 503


@pytest_twisted.ensureDeferred
async def test_only_idempotent_requests_are_retried(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws(
        [("dead", harness.deadUrl()), ("b", backend.url)],
        lbws="balance = round_robin\nretries = 1",
        health="interval = 3600\nfall = 100",
    )
    address = _hostPort(lbws.url)
    # Round robin sends every other request to the dead backend first.
    answers, _ = await exchange(address, [("GET", "/echo", None, None)] * 4)
    assert [a[0] for a in answers] == [200] * 4
    answers, _ = await exchange(address, [("POST", "/echo", b"x", None)] * 4)
    assert sorted(a[0] for a in answers) == [200, 200, 502, 502]


@pytest_twisted.ensureDeferred
async def test_requests_counted_in_metrics_and_access_log(harness):
    backend = await _httpBackend(harness)
    events = harness.logged()
    lbws = await harness.lbws(
        [("a", backend.url)], dashboard="tcp:0:interface=127.0.0.1"
    )
    await exchange(_hostPort(lbws.url), [("GET", "/echo", None, None)] * 3)
    [(_, _, metrics)], _ = await exchange(
        _hostPort(lbws.dashboardUrl), [("GET", "/metrics", None, None)]
    )
    assert b'lbws_http_requests_total{backend="a",code_class="2xx"} 3.0' in metrics
    [(_, _, status)], _ = await exchange(
        _hostPort(lbws.dashboardUrl), [("GET", "/status.json", None, None)]
    )
    assert json.loads(status)["backends"][0]["http_requests"] == {"2xx": 3}
    access = [e for e in events if e.get("log_format_access") and "method" in e]
    assert [(e["method"], e["target"], e["status"], e["backend"]) for e in access] == [
        ("GET", "/echo", 200, "a")
    ] * 3
    # The text line, whose braces a client's target may hold too.
    await exchange(_hostPort(lbws.url), [("GET", "/echo?q={peer}{0}", None, None)])
    access = [e for e in events if e.get("log_format_access") and "method" in e]
    assert access[-1]["target"] == "/echo?q={peer}{0}"
    for event in access[-2:]:
        assert re.fullmatch(
            r'127\.0\.0\.1 "GET (/echo|/echo\?q=\{peer\}\{0\})" 200 via default/a:'
            r" [0-9]+\.[0-9]{3}s, 0 B in, [0-9]+ B out",
            formatEvent(event),
        ), formatEvent(event)


def _download(address, path, total, slowFor, sample):
    """
    Read a large body slowly for C{slowFor} seconds, then at full speed,
    calling C{sample()} as it goes; return the bytes read.
    """
    import time

    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = 0
    start = time.monotonic()
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    received = len(head.partition(b"\r\n\r\n")[2])
    while received < total:
        if time.monotonic() - start < slowFor:
            time.sleep(0.05)
            chunk = sock.recv(16 * 1024)
            sample()
        else:
            chunk = sock.recv(1024 * 1024)
            if received % (64 * 1024 * 1024) < len(chunk):
                sample()
        if not chunk:
            break
        received += len(chunk)
    sock.close()
    return received


@pytest_twisted.ensureDeferred
async def test_1gib_download_through_slow_reader_keeps_memory_bounded(harness, tmp_path):
    import psutil

    total = 1024 * 1024 * 1024
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    harness.atEnd(server.close)

    def serve():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"z" * (1024 * 1024)
        try:
            for _ in range(total // len(block)):
                conn.sendall(block)
        finally:
            conn.close()

    serving = threads.deferToThread(serve)
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText([("a", f"ws://127.0.0.1:{server.getsockname()[1]}")], health="interval = 3600")
    )
    lbws = support.LbwsProcess(config)
    harness.atEnd(lbws.stop)
    process = psutil.Process(lbws.pid)
    baseline = process.memory_info().rss
    peak = [baseline]

    def sample():
        peak[0] = max(peak[0], process.memory_info().rss)

    received = await threads.deferToThread(
        _download, f"127.0.0.1:{lbws.port}", "/big", total, 3.0, sample
    )
    await serving
    assert received == total
    # Without backpressure a slow reader makes lbws buffer the backend's
    # speed times the slow seconds (hundreds of MiB).
    assert peak[0] - baseline < 32 * 1024 * 1024, (baseline, peak[0])


@pytest_twisted.ensureDeferred
async def test_sticky_cookie_keeps_http_and_websocket_on_one_backend(harness):
    a = await _httpBackend(harness, "alpha")
    b = await _httpBackend(harness, "bravo")
    lbws = await harness.lbws(
        [("alpha", a.url), ("bravo", b.url)],
        lbws="balance = round_robin\nsticky_cookie = LBWS",
        health="interval = 3600",
    )
    address = _hostPort(lbws.url)
    answers, _ = await exchange(address, [("GET", "/echo", None, None)])
    [(_, headers, body)] = answers
    first = json.loads(body)["backend"]
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("LBWS=") and "Path=/" in cookie
    value = cookie.split(";")[0]
    assert first not in value and "127.0.0.1" not in value  # opaque
    sent = {"Cookie": f"other=1; {value}"}
    answers, _ = await exchange(address, [("GET", "/echo", None, sent)] * 6)
    assert {json.loads(body)["backend"] for _, _, body in answers} == {first}
    assert all("Set-Cookie" not in headers for _, headers, _ in answers)
    # Without the cookie round robin alternates.
    answers, _ = await exchange(address, [("GET", "/echo", None, None)] * 2)
    assert {json.loads(body)["backend"] for _, _, body in answers} == {"alpha", "bravo"}
    # Drained: the cookie is not honoured, another backend is chosen and set.
    lbws.pool[first].admin.drain()
    [(_, headers, body)], _ = await exchange(address, [("GET", "/echo", None, sent)])
    other = json.loads(body)["backend"]
    assert other != first
    assert headers["Set-Cookie"].split(";")[0] == f"LBWS={sticky.stickyId(lbws.pool[other])}"


@pytest_twisted.ensureDeferred
async def test_sticky_cookie_on_websocket_101(harness):
    a = await harness.backend("a")
    b = await harness.backend("b")
    lbws = await harness.lbws(
        [("a", a.url), ("b", b.url)],
        lbws="balance = round_robin\nsticky_cookie = LBWS",
        health="interval = 3600",
    )
    client = await harness.client(lbws.url)
    cookie = client.response.headers["set-cookie"]
    first = a if a.connections else b
    assert cookie.split(";")[0] == f"LBWS={sticky.stickyId(lbws.pool[first.name])}"
    for _ in range(4):
        again = await harness.client(lbws.url, headers={"Cookie": cookie.split(";")[0]})
        assert "set-cookie" not in again.response.headers
    assert len(first.connections) == 5


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_after_plain_requests_on_one_connection(harness):
    ws = await harness.backend("ws")
    lbws = await harness.lbws([("ws", ws.url)])
    raw = await wire.rawConnect(lbws.url)
    # A plain GET first: the Autobahn backend answers it itself.
    raw.send(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: sum(lbws.counters.httpRequests.values()) == 1)
    assert raw.received.startswith(b"HTTP/1.1 ")
    first = len(raw.received)
    raw.send(support.handshakeRequest("/chat"))
    await eventually(lambda: b"\r\n\r\n" in raw.received[first:])
    assert raw.received[first:].startswith(b"HTTP/1.1 101 ")
    raw.send(wire.frame(OP_TEXT, b"hello"))
    await eventually(lambda: raw.received.endswith(b"\x81\x05hello"))
    assert [c.request.path for c in ws.connections] == ["/chat"]


@pytest_twisted.ensureDeferred
async def test_http_connections_count_towards_max_connections(harness):
    backend = await _httpBackend(harness)
    ws = await harness.backend("ws")
    lbws = await harness.lbws([("a", backend.url)], lbws="max_connections = 1")
    [(status, _, _)], _ = await exchange(_hostPort(lbws.url), [("GET", "/echo", None, None)])
    assert status == 200
    held = await wire.rawConnect(lbws.url)
    held.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: b"\r\n\r\n" in held.received)
    [(status, _, body)], _ = await exchange(_hostPort(lbws.url), [("GET", "/echo", None, None)])
    assert status == 503


@pytest_twisted.ensureDeferred
async def test_stop_closes_idle_keep_alive_connections(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)])
    raw = await wire.rawConnect(lbws.url)
    raw.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: b'"backend"' in raw.received)
    await lbws.stopService()
    received = await raw.closed.addTimeout(10, reactor)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize(
    "balance", ["round_robin", "least_conn", "hash\nhash_key = header:X-User"]
)
@pytest_twisted.ensureDeferred
async def test_sticky_cookie_combines_with_every_balance(harness, balance):
    backends = [await _httpBackend(harness, name) for name in ("alpha", "bravo", "charlie")]
    lbws = await harness.lbws(
        [(b.name, b.url) for b in backends],
        lbws=f"balance = {balance}\nsticky_cookie = S",
        health="interval = 3600",
    )
    address = _hostPort(lbws.url)
    for name in ("alpha", "bravo", "charlie"):
        cookie = {"Cookie": f"S={sticky.stickyId(lbws.pool[name])}"}
        requests = [
            ("GET", "/echo", None, {**cookie, "X-User": f"user{i}"}) for i in range(6)
        ]
        answers, _ = await exchange(address, requests)
        assert {json.loads(body)["backend"] for _, _, body in answers} == {name}


def _httpCells(profile, url):
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_dashboard import Browser

    browser = Browser(profile)
    try:
        browser.driver.get(url)
        script = (
            "const r = document.querySelector('#rows tr[data-backend]');"
            " return r ? [r.cells[13].textContent, r.cells[13].title,"
            " document.getElementById('tot-http').textContent] : null"
        )
        WebDriverWait(browser.driver, 10, poll_frequency=0.1).until(
            lambda d: (d.execute_script(script) or [""])[0] == "3",
            message="the HTTP request count never showed",
        )
        return browser.driver.execute_script(script), browser.problems()
    finally:
        browser.quit()


@pytest_twisted.ensureDeferred
async def test_dashboard_page_shows_http_requests(harness, tmp_path):
    from tests.test_dashboard import browserInstalled

    browserInstalled()
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], dashboard="tcp:0:interface=127.0.0.1")
    await exchange(
        _hostPort(lbws.url),
        [("GET", "/echo", None, None), ("GET", "/echo", None, None), ("POST", "/echo", b"x", None)],
    )
    cells, problems = await threads.deferToThread(
        _httpCells, tmp_path / "chromium", lbws.dashboardUrl + "/"
    )
    assert cells == ["3", "2xx: 3", "3"]
    assert problems == []


def _httpsExchange(port, caFile, path):
    import ssl

    context = ssl.create_default_context(cafile=str(caFile))
    conn = http.client.HTTPSConnection("localhost", port, context=context, timeout=20)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_https_client_and_wss_backend_url_as_https(harness, pki):
    from twisted.internet.endpoints import SSL4ServerEndpoint

    from tests.test_tls import sslListen

    resource = _Backend("tls")
    options = support.tlsServerOptions(pki["server-pem"])
    port = await harness.listen(
        Site(resource), SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
    )
    url = f"wss://localhost:{port.getHost().port}/app"
    lbws = await harness.lbws(
        [("tls", url, f"ca = {pki['ca']}")], listen=sslListen(pki), health="interval = 3600"
    )
    status, body = await threads.deferToThread(
        _httpsExchange, int(lbws.url.rsplit(":", 1)[1]), pki["ca"], "/echo"
    )
    assert status == 200
    seen = json.loads(body)
    assert seen["uri"] == "/app/echo"
    assert seen["headers"]["x-forwarded-proto"] == ["https"]
    # The client's Host (host_header = client): lbws's own address.
    assert seen["headers"]["host"] == [f"localhost:{lbws.url.rsplit(':', 1)[1]}"]
    assert seen["alpn"] == "http/1.1"  # lbws offers it to https backends, as browsers do


@pytest_twisted.ensureDeferred
async def test_a_backend_tls_failure_is_told_in_the_words_of_the_websocket_path(harness, pki):
    """
    An https:// backend whose certificate names another host: the plain
    HTTP path refuses it (502) and says why as the WebSocket path and the
    probes do, not as "connection lost before a response: VerificationError".
    """
    from twisted.internet.endpoints import SSL4ServerEndpoint

    from tests.test_tls import _client

    resource = _Backend("tls")
    options = support.tlsServerOptions(pki["other-pem"])
    port = await harness.listen(
        Site(resource), SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
    )
    url = f"wss://127.0.0.1:{port.getHost().port}"
    lbws = await harness.lbws(
        [("tls", url, f"ca = {pki['ca']}")], health="interval = 3600\nfall = 1"
    )
    (status, _, body), = (await exchange(_hostPort(lbws.url), [("GET", "/echo", None, None)]))[0]
    assert status == 502
    viaHttp = lbws.pool["tls"].lastError
    words = "TLS name check failed: the backend's certificate is for other.example, not 127.0.0.1"
    assert viaHttp == words, viaHttp
    assert not resource.requests
    # The WebSocket path, to the same backend, says the same.
    with pytest.raises(support.HandshakeFailed):
        await _client(harness, lbws)
    assert lbws.pool["tls"].lastError == viaHttp


@pytest_twisted.ensureDeferred
async def test_curl_default_https_through_lbws(harness, pki):
    """
    curl with its defaults (ALPN h2 and http/1.1) gets HTTP/1.1 over TLS
    from lbws and the backend's answer.
    """
    from tests.test_tls import sslListen

    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], listen=sslListen(pki))
    port = int(lbws.url.rsplit(":", 1)[1])
    curl = await utils.getProcessOutputAndValue(
        "curl",
        [
            "--silent",
            "--show-error",
            "--verbose",
            "--max-time",
            "20",
            "--cacert",
            str(pki["ca"]),
            "--write-out",
            "\n%{http_code} %{http_version}",
            f"https://localhost:{port}/echo?from=curl",
        ],
        env={"PATH": os.environ["PATH"]},
    )
    out, err, code = curl
    assert code == 0, err
    body, status = out.rsplit(b"\n", 1)
    assert status == b"200 1.1"
    assert json.loads(body)["uri"] == "/echo?from=curl"
    assert b"ALPN: offers h2" in err and b"ALPN: server accepted http/1.1" in err, err


async def _rawAnswers(url, data, timeout=10):
    """
    Send C{data} on a new connection and wait until lbws ends it: all the
    bytes it answered.
    """
    client = await wire.rawConnect(url)
    client.send(data)
    return await client.closed.addTimeout(timeout, reactor)


@pytest_twisted.ensureDeferred
async def test_a_content_length_of_non_ascii_digits_is_a_400_and_leaks_nothing(harness):
    """
    "²" is a digit to str.isdigit(); as a Content-Length it once raised out
    of the proxy, and the connection stayed counted against
    max_connections for good.
    """
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], lbws="max_connections = 3")
    for _ in range(5):
        answer = await _rawAnswers(
            lbws.url, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: \xb2\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    await eventually(lambda: not lbws.relay.http)
    [(status, _, _)], _ = await exchange(_hostPort(lbws.url), [("GET", "/echo", None, None)])
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_many_pipelined_requests_answered_at_once_do_not_nest(harness):
    """
    With no backend to go to (drained) each request is answered at once
    (503, keep-alive):
    2,000 of them pipelined in one write are answered in turn, without a
    call per request on the stack, and the connection leaves nothing
    counted behind.
    """
    lbws = await harness.lbws(
        [("a", harness.deadUrl())], lbws="retries = 0", health="interval = 3600\nfall = 1"
    )
    lbws.pool["a"].admin.drain()
    request = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    answer = await _rawAnswers(
        lbws.url, request * 2000 + b"GET /a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert answer.count(b"HTTP/1.1 503 ") == 2001
    await eventually(lambda: not lbws.relay.http)


@pytest_twisted.ensureDeferred
async def test_every_request_on_a_connection_is_checked_like_the_first(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)])
    answer = await _rawAnswers(
        lbws.url,
        b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n" + b"GET /echo/.\t./x HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert answer.count(b"HTTP/1.1 400 ") == 1
    assert [r.uri for r in backend.requests] == [b"/echo"]


@pytest_twisted.ensureDeferred
async def test_a_backslash_in_the_path_is_refused(harness):
    """
    WHATWG URL parsers (Node's new URL()) read "\\" in a path as "/", so
    "/..\\admin" would climb out of the backend's prefix there.
    """
    backend = await _httpBackend(harness)
    ws = await harness.backend("ws")
    lbws = await harness.lbws([("a", backend.url + "/app")])
    answer = await _rawAnswers(lbws.url, b"GET /..\\admin HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    socketLbws = await harness.lbws([("ws", ws.url + "/app")])
    raw = await wire.rawConnect(socketLbws.url)
    raw.send(support.handshakeRequest("/..\\admin"))
    response = await raw.response.addTimeout(10, reactor)
    assert response.startswith("HTTP/1.1 400 "), response
    assert backend.requests == [] and ws.connections == []


@pytest.mark.parametrize(
    "hosts",
    [
        [b"evil.com", b"x.example.com"],  # two Host lines
        [b"evil.com, x.example.com"],
        [b"evil.com x.example.com"],
        [b"evil.com/x.example.com"],
        [],  # HTTP/1.1 without Host
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_request_without_exactly_one_valid_host_is_a_400(harness, hosts):
    """
    RFC 9112 3.2: lbws routes on Host (`*.example.com`) and forwards it as
    X-Forwarded-Host, where applications trust its first value.
    """
    backend = await _httpBackend(harness)
    ws = await harness.backend("ws")
    lines = b"".join(b"Host: " + host + b"\r\n" for host in hosts)
    lbws = await harness.lbws([("a", backend.url)])
    answer = await _rawAnswers(lbws.url, b"GET /echo HTTP/1.1\r\n" + lines + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    socketLbws = await harness.lbws([("ws", ws.url)])
    raw = await wire.rawConnect(socketLbws.url)
    raw.send(
        b"GET / HTTP/1.1\r\n" + lines + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    response = await raw.response.addTimeout(10, reactor)
    assert response.startswith("HTTP/1.1 400 "), response
    assert backend.requests == [] and ws.connections == []
