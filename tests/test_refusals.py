"""
Faithful refusals, end to end: a backend's answer other than 101 reaches
the client as it would directly (status, end-to-end headers, body), is not
a backend failure, and its connection is closed normally; every
end-to-end header of a backend's 101 reaches the client too.
"""

import json

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionDone

from tests import wire
from tests.support import EchoFactory, EchoServerProtocol, connect, eventually, handshakeRequest


class AnsweringProtocol(EchoServerProtocol):
    """
    An echo backend that answers the handshakes of some paths with raw
    HTTP bytes of its own, and then waits for lbws to close (keep-alive).
    """

    answered = False

    def processHandshake(self):
        end = self.data.find(b"\r\n\r\n")
        if end >= 0:
            path = self.data.split(b" ", 2)[1].decode()
            answer = self.factory.answers.get(path)
            if answer is not None:
                self.answered = True
                self.data = b""
                self.factory.answeredCount += 1
                self.transport.write(answer)
                return None
        return super().processHandshake()

    def dataReceived(self, data):
        if not self.answered:
            super().dataReceived(data)

    def connectionLost(self, reason):
        if self.answered:
            self.factory.ends.append(reason)
        super().connectionLost(reason)


class AnsweringFactory(EchoFactory):
    protocol = AnsweringProtocol

    def __init__(self, answers, **kwargs):
        super().__init__("answering", **kwargs)
        self.answers = answers
        self.answeredCount = 0
        self.ends = []


def answer(status, headers, body=b""):
    lines = [b"HTTP/1.1 " + status]
    lines.extend(headers)
    lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


UNAUTHORIZED = answer(
    b"401 Unauthorized",
    [
        b'WWW-Authenticate: Bearer realm="chat", error="invalid_token"',
        b"Content-Type: application/json",
        b"X-Request-Id: 7f3a",
        b"Set-Cookie: seen=1; Path=/",
    ],
    json.dumps({"error": "invalid_token", "detail": "token expired"}).encode(),
)
REDIRECT = answer(b"302 Found", [b"Location: https://login.example/?next=/chat"])
UNAVAILABLE = answer(
    b"503 Service Unavailable",
    [b"Retry-After: 120", b"Content-Type: text/plain"],
    b"maintenance until 14:00\n",
)


async def backendWith(harness, answers, **kwargs):
    factory = AnsweringFactory(answers, **kwargs)
    port = await harness.listen(factory)
    factory.url = f"ws://127.0.0.1:{port.getHost().port}"
    return factory


async def answerTo(url, path, timeout=10):
    """
    The status line, headers (name, value pairs) and body a client gets
    for a handshake on C{path}, read as the head's Content-Length frames
    it; the client hangs up after it.
    """
    client = await wire.rawConnect(url)
    client.send(handshakeRequest(path))
    await client.response.addTimeout(timeout, reactor)

    def parsed():
        head, _, body = client.received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
        length = [int(v) for n, v in headers if n.lower() == b"content-length"]
        return lines[0], headers, body, (length[0] if length else 0)

    await eventually(lambda: len(parsed()[2]) >= parsed()[3], timeout)
    status, headers, body, _ = parsed()
    client.transport.abortConnection()
    return status, headers, body


def endToEnd(headers):
    """
    The headers a proxy passes on: without the connection's own.
    """
    return [(n, v) for n, v in headers if n.lower() not in (b"connection", b"keep-alive")]


@pytest_twisted.ensureDeferred
async def test_a_refusal_reaches_the_client_as_it_would_directly(harness):
    backend = await backendWith(harness, {"/app/private": UNAUTHORIZED})
    lbws = await harness.lbws([("a", backend.url + "/app")])
    direct = await answerTo(backend.url, "/app/private")
    through = await answerTo(lbws.url, "/private")
    assert direct[0] == through[0] == b"HTTP/1.1 401 Unauthorized"
    assert endToEnd(through[1]) == endToEnd(direct[1])
    assert (b"WWW-Authenticate", b'Bearer realm="chat", error="invalid_token"') in through[1]
    assert json.loads(through[2]) == {"error": "invalid_token", "detail": "token expired"}
    assert through[2] == direct[2]
    assert lbws.counters.handshakes["backend_refused"] == 1
    member = lbws.pool["a"]
    assert (member.state, member.failed, member.consecutiveFailures) == ("up", 0, 0)


@pytest_twisted.ensureDeferred
async def test_a_redirect_and_a_retry_after_pass_through_without_retrying(harness):
    answers = {}
    backend = await backendWith(harness, answers)
    other = await harness.backend("other")
    lbws = await harness.lbws(
        [("a", backend.url), ("b", other.url)], lbws="balance = hash\nhash_key = path"
    )
    # Paths that hash to the answering backend: a retry would go to the other.
    paths = [p for p in (f"/p{i}" for i in range(100)) if lbws.pool.choose(p).name == "a"]
    login, busy = paths[:2]
    answers.update({login: REDIRECT, busy: UNAVAILABLE})
    got = await answerTo(lbws.url, busy)
    assert got[0] == b"HTTP/1.1 503 Service Unavailable"
    assert (b"Retry-After", b"120") in got[1] and got[2] == b"maintenance until 14:00\n"
    got = await answerTo(lbws.url, login)
    assert got[0] == b"HTTP/1.1 302 Found"
    assert (b"Location", b"https://login.example/?next=/chat") in got[1]
    # Each was asked once: a refusal is not retried on another backend.
    assert backend.answeredCount == 2
    assert other.connections == []
    assert lbws.pool["a"].state == "up" and lbws.pool["a"].failed == 0


@pytest_twisted.ensureDeferred
async def test_a_thousand_refusals_leave_the_backend_up_and_others_connect(harness):
    backend = await backendWith(harness, {"/overloaded": UNAVAILABLE})
    lbws = await harness.lbws([("a", backend.url)], health="fall = 2")
    for batch in range(20):
        answers = await defer.gatherResults(
            [defer.ensureDeferred(answerTo(lbws.url, "/overloaded")) for _ in range(50)]
        )
        assert {a[0] for a in answers} == {b"HTTP/1.1 503 Service Unavailable"}
        member = lbws.pool["a"]
        assert member.state == "up" and member.failed == 0, (batch, member.lastError)
    assert lbws.counters.handshakes["backend_refused"] == 1000
    await eventually(lambda: lbws.pool["a"].active == 0)
    client = await harness.client(lbws.url, path="/chat")
    client.sendMessage(b"still here")
    assert await client.messages.get() == (b"still here", False)


@pytest_twisted.ensureDeferred
async def test_the_refused_backend_connection_ends_with_a_fin_not_a_reset(harness):
    backend = await backendWith(harness, {"/no": UNAUTHORIZED})
    lbws = await harness.lbws([("a", backend.url)])
    for _ in range(3):
        await answerTo(lbws.url, "/no")
    await eventually(lambda: len(backend.ends) == 3)
    assert all(reason.check(ConnectionDone) for reason in backend.ends), [
        reason.value for reason in backend.ends
    ]


@pytest_twisted.ensureDeferred
async def test_a_malformed_refusal_is_a_backend_failure_and_injects_nothing(harness):
    # A bare LF inside the head: a backend must not get a header of its
    # own making past lbws.
    injecting = b"HTTP/1.1 401 Unauthorized\r\nX-Note: a\nInjected: yes\r\nContent-Length: 0\r\n\r\n"
    backend = await backendWith(harness, {"/": injecting})
    lbws = await harness.lbws([("a", backend.url)], lbws="retries = 0", health="fall = 1")
    status, headers, body = await answerTo(lbws.url, "/")
    assert status.startswith(b"HTTP/1.1 502")
    assert not any(n.lower() == b"injected" for n, v in headers)
    member = lbws.pool["a"]
    assert member.failed == 1 and member.state == "down"
    assert "malformed answer from backend" in member.lastError


@pytest_twisted.ensureDeferred
async def test_every_end_to_end_header_of_the_backends_101_reaches_the_client(harness):
    backend = await harness.backend(
        responseHeaders={"X-Backend-Version": "4.2", "Set-Cookie": ["a=1", "b=2"]}
    )
    lbws = await harness.lbws([("a", backend.url)])
    direct = await connect(backend.url)
    through = await harness.client(lbws.url)
    direct.transport.abortConnection()
    assert through.response.headers["x-backend-version"] == "4.2"
    assert through.response.headers["set-cookie"] == direct.response.headers["set-cookie"]
    assert through.response.headers["server"] == direct.response.headers["server"]


@pytest_twisted.ensureDeferred
async def test_a_refusal_whose_body_stalls_is_passed_on_at_the_handshake_timeout(harness):
    stalled = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nonly ten b"
    backend = await backendWith(harness, {"/": stalled})
    lbws = await harness.lbws([("a", backend.url)], lbws="handshake_timeout = 0.5")
    status, headers, body = await answerTo(lbws.url, "/")
    assert status == b"HTTP/1.1 403 Forbidden" and body == b"only ten b"
    assert (b"Content-Length", b"10") in headers
    await eventually(lambda: len(backend.ends) == 1)
    assert backend.ends[0].check(ConnectionDone)
    assert lbws.pool["a"].failed == 0
