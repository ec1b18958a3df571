"""
Common stacks behind lbws, with software nobody here wrote (README,
"Running common stacks behind lbws"): socket.io with its default
transports (long-polling, then the upgrade to WebSocket) with the node
client, python-socketio and headless Chromium, and an aiohttp application
serving a page, a REST route and a WebSocket on one port. Each client runs
directly against a backend and through lbws, and must see the same.
"""

import json
import re
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from tests import support
from tests.support import NODE_DIR, ROOT
from tests.test_dashboard import Browser, browserInstalled
from tests.test_httpproxy import exchange

SOCKETIO_PROBE = "path = /socket.io/?EIO=4&transport=websocket"


class _Process:
    """
    A backend process that prints "listening PORT" when ready.
    """

    def __init__(self, command):
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        match = re.match(r"listening (\d+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"{command} did not start: {line!r}")
        self.port = int(match.group(1))
        self.url = f"ws://127.0.0.1:{self.port}"
        self.http = f"http://127.0.0.1:{self.port}"

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stdout.close()


def _start(harness, command):
    backend = _Process(command)
    harness.atEnd(backend.stop)
    return backend


def _socketioBackend(harness, name):
    if not support.nodeAvailable():
        pytest.fail("node and tests/node/node_modules are needed: run `make test`")
    return _start(harness, ["node", str(NODE_DIR / "socketio-server.js"), "--port", "0", "--name", name])


async def _socketioBehindLbws(harness):
    one = _socketioBackend(harness, "one")
    two = _socketioBackend(harness, "two")
    lbws = await harness.lbws(
        [("one", one.url), ("two", two.url)],
        # Round robin would send every other polling request of a session
        # to the wrong backend: only the cookie keeps them together.
        lbws="balance = round_robin\nsticky_cookie = lbws_backend",
        probe="websocket",
        health=SOCKETIO_PROBE + "\ninterval = 0.5\nrise = 1",
    )
    await support.eventually(lambda: all(m.state == "up" for m in lbws.pool))
    lbws.http = lbws.url.replace("ws://", "http://")
    return one, two, lbws


def _nodeClient(url):
    done = subprocess.run(
        ["node", str(NODE_DIR / "socketio-client.js"), url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _pythonClient(url):
    import socketio

    client = socketio.Client(reconnection=False)
    seen = {}
    client.on("welcome", lambda data: seen.update(welcome=data))
    client.connect(url, wait_timeout=10)
    try:
        ack = client.call("hello", "from python", timeout=10)
        return {"welcome": seen.get("welcome"), "ack": ack, "transport": client.transport()}
    finally:
        client.disconnect()


def _sameSession(result, backends):
    """
    What a socket.io client saw, without the backend's name: it must have
    got its welcome and its ack from one and the same backend.
    """
    assert result["ack"]["backend"] in backends, result
    assert result["welcome"] == {"backend": result["ack"]["backend"]}, result
    return {
        "got": result["ack"]["got"],
        "server_transport": result["ack"]["transport"],
        "transport": result["transport"],
    }


@pytest_twisted.ensureDeferred
async def test_socketio_node_client_polling_then_websocket(harness):
    one, two, lbws = await _socketioBehindLbws(harness)
    direct = await threads.deferToThread(_nodeClient, one.http)
    expected = _sameSession(direct, {"one"})
    assert expected["transport"] == "websocket"
    seen = set()
    for _ in range(4):
        result = await threads.deferToThread(_nodeClient, lbws.http)
        assert _sameSession(result, {"one", "two"}) == expected
        seen.add(result["ack"]["backend"])
    assert seen == {"one", "two"}  # balanced, each session on one backend


@pytest_twisted.ensureDeferred
async def test_socketio_python_client_polling_then_websocket(harness):
    one, two, lbws = await _socketioBehindLbws(harness)
    direct = await threads.deferToThread(_pythonClient, one.http)
    expected = _sameSession(direct, {"one"})
    assert expected["transport"] == "websocket"
    for _ in range(3):
        result = await threads.deferToThread(_pythonClient, lbws.http)
        assert _sameSession(result, {"one", "two"}) == expected


def _browserRun(profile, url):
    from selenium.webdriver.support.ui import WebDriverWait

    browser = Browser(profile)
    try:
        browser.driver.get(url)
        WebDriverWait(browser.driver, 20, poll_frequency=0.1).until(
            lambda d: d.find_element("id", "result").text.startswith("{"),
            message="the page never got its acknowledgement",
        )
        text = browser.driver.find_element("id", "result").text
        return json.loads(text), browser.problems()
    finally:
        browser.quit()


@pytest_twisted.ensureDeferred
async def test_socketio_in_chromium_page_served_through_lbws(harness, tmp_path):
    browserInstalled()
    one, two, lbws = await _socketioBehindLbws(harness)
    direct, problems = await threads.deferToThread(
        _browserRun, tmp_path / "direct", one.http + "/"
    )
    assert problems == []
    proxied, problems = await threads.deferToThread(
        _browserRun, tmp_path / "lbws", lbws.http + "/"
    )
    assert problems == []
    for result in (direct, proxied):
        assert result["welcome"] == {"backend": result["ack"]["backend"]}
        assert result["transports"] == ["websocket"]
    assert proxied["ack"]["got"] == direct["ack"]["got"] == "from the browser"
    assert proxied["ack"]["transport"] == direct["ack"]["transport"] == "websocket"


def _aiohttpBackend(harness, name):
    return _start(harness, [sys.executable, str(ROOT / "tests" / "aiohttp_app.py"), "--name", name])


async def _aiohttpView(address, wsUrl):
    """
    What a client sees of the aiohttp app: the page, a REST POST, and a
    WebSocket round trip.
    """
    answers, _ = await exchange(
        address,
        [
            ("GET", "/", None, None),
            ("POST", "/api/items", b'{"name": "x"}', {"Content-Type": "application/json"}),
        ],
    )
    (pageStatus, pageHeaders, page), (postStatus, postHeaders, posted) = answers
    client = await support.connect(wsUrl, path="/ws")
    client.sendMessage(b"hello", isBinary=False)
    payload, isBinary = await client.messages.get().addTimeout(10, reactor)
    client.sendClose(1000)
    await client.closed
    return {
        "page": (pageStatus, pageHeaders["Content-Type"], page),
        "post": (postStatus, postHeaders["Content-Type"], json.loads(posted)),
        "ws": (isBinary, json.loads(payload)),
    }


@pytest_twisted.ensureDeferred
async def test_aiohttp_page_rest_and_websocket_on_one_port(harness):
    app = _aiohttpBackend(harness, "app")
    lbws = await harness.lbws([("app", app.url)])
    direct = await _aiohttpView(f"127.0.0.1:{app.port}", app.url)
    proxied = await _aiohttpView(lbws.url.split("://")[1], lbws.url)
    assert direct["page"][0] == 200 and b"<pre id=\"result\">" in direct["page"][2]
    assert direct["post"][0] == 201
    assert direct["ws"] == (False, {"backend": "app", "echo": "hello"})
    assert proxied["page"] == direct["page"]
    assert proxied["ws"] == direct["ws"]
    # The REST answer is the same but for the address lbws adds.
    assert direct["post"][2].pop("forwarded_for") is None
    assert proxied["post"][2].pop("forwarded_for") == "127.0.0.1"
    assert proxied["post"] == direct["post"]
