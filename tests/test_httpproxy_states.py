"""
The plain HTTP proxy's state machines (lbws.http.httpproxy's HttpFront,
lbws.http.exchange's Exchange), every transition driven by hand on a
MemoryReactorClock: the client connection is a StringTransport under
lbws's real FrontendProtocol, and each backend connection the proxy opens
is answered (or not) by hand. A client whose buffer is full is its
transport calling the front's pauseProducing, as Twisted does.
"""

import h11
import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from lbws.config import parseConfig
from lbws.backends.dial import Dialer
from lbws.telemetry.metrics import Counters
from lbws.backends.pool import Pool
from lbws.http import exchange as ex
from lbws.relay import Relay

GET = b"GET /x HTTP/1.1\r\nHost: public\r\n\r\n"
# A backend connection per request, for the tests about the client's side.
NO_REUSE = "http_keepalive = 0"


class Proxy:
    """
    An lbws relay on a memory reactor, with one client connection.
    """

    def __init__(self, extra="", backends=("a",)):
        text = f"[lbws]\n{extra}\n"
        for i, name in enumerate(backends):
            text += f"[backend:{name}]\nurl = ws://10.0.0.{i + 1}:80\n"
        settings = parseConfig(text)
        self.reactor = MemoryReactorClock()
        self.counters = Counters()
        self.pool = Pool(settings, self.reactor)
        dialer = Dialer(self.reactor, self.pool, settings, self.counters)
        self.relay = Relay(self.reactor, settings, self.pool, dialer, self.counters)
        self.protocol = self.relay.factory().buildProtocol(None)
        self.client = StringTransport()
        self.protocol.makeConnection(self.client)

    def send(self, data):
        self.protocol.dataReceived(data)

    def backend(self, index=-1):
        """
        Accept the proxy's last (or C{index}th) backend connection.

        @return: its StringTransport, and its protocol.
        """
        host, port, factory, timeout, _ = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return transport, protocol

    def answer(self):
        return self.client.value().decode("latin-1")

    @property
    def front(self):
        return self.protocol.leg

    def answered(self, response=b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"):
        """
        Answer the last backend connection; return its transport.
        """
        transport, backend = self.backend()
        backend.dataReceived(response)
        return transport



def test_request_and_response_relayed_then_connection_kept():
    proxy = Proxy()
    proxy.send(GET)
    transport, backend = proxy.backend()
    assert proxy.front.exchange.state == ex.WAITING
    sent = transport.value().decode()
    # The client's Host by default (host_header = client).
    assert sent.startswith("GET /x HTTP/1.1\r\nHost: public\r\n")
    assert "X-Forwarded-Host: public\r\n" in sent
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert proxy.answer() == "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert transport.disconnecting  # the backend asked to close
    assert not proxy.client.disconnecting  # the client's stays
    assert proxy.front.exchange is None
    assert proxy.pool["a"].active == 0 and proxy.pool["a"].total == 1


def test_one_write_to_the_client_per_backend_read():
    proxy = Proxy()
    writes = []
    proxy.client.write = lambda data: writes.append(data)
    proxy.send(GET)
    _, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    # Head, body and end, read at once, leave in one write.
    assert writes == [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"]
    # Read by read (over the pooled connection), the response leaves as it
    # comes, nothing held back.
    proxy.send(GET)
    del writes[:]
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
    assert writes == [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok"]
    backend.dataReceived(b"!!")
    assert writes[1:] == [b"!!"] and proxy.front.exchange is None


def test_states_in_order_for_an_upload():
    proxy = Proxy()
    proxy.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nabc")
    exchange = proxy.front.exchange
    assert exchange.state == ex.CONNECTING and exchange.early == [b"abc"]
    transport, backend = proxy.backend()
    assert exchange.state == ex.SENDING
    assert b"Content-Length: 6\r\n" in transport.value()
    assert transport.value().endswith(b"\r\n\r\nabc")
    proxy.send(b"def")
    assert exchange.state == ex.WAITING
    backend.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\no")
    assert exchange.state == ex.RESPONDING
    backend.dataReceived(b"k!")
    assert exchange.state == ex.DONE
    assert proxy.answer().endswith("\r\n\r\nok!")


def test_pipelined_requests_go_one_at_a_time_in_order():
    proxy = Proxy(NO_REUSE)
    proxy.send(GET + b"GET /y HTTP/1.1\r\nHost: public\r\n\r\n")
    assert len(proxy.reactor.tcpClients) == 1  # /y waits for /x's answer
    _, first = proxy.backend()
    first.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert len(proxy.reactor.tcpClients) == 2
    transport, second = proxy.backend()
    assert transport.value().startswith(b"GET /y ")
    second.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert proxy.answer().count("200 OK") == 2 and proxy.answer().endswith("\r\n\r\n2")


def test_the_next_request_waits_until_the_last_response_left():
    proxy = Proxy(NO_REUSE)
    proxy.send(GET)
    proxy.front.pauseProducing()  # the client reads nothing: its buffer fills
    proxy.answered()
    proxy.send(GET)
    assert len(proxy.reactor.tcpClients) == 1
    proxy.front.resumeProducing()  # the buffer drained
    assert len(proxy.reactor.tcpClients) == 2


def test_a_client_that_does_not_read_pauses_the_backend_and_send_timeout_closes_it():
    proxy = Proxy("send_timeout = 7")
    proxy.send(GET)
    transport, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    proxy.front.pauseProducing()
    assert transport.producerState == "paused"
    backend.dataReceived(b"678")  # already read: held in h11, not written
    assert proxy.answer().endswith("12345")
    proxy.front.resumeProducing()
    assert transport.producerState == "producing"
    assert proxy.answer().endswith("12345678")
    proxy.front.pauseProducing()
    proxy.reactor.advance(6.9)
    assert not proxy.client.disconnecting
    proxy.reactor.advance(0.1)
    assert proxy.client.disconnected  # aborted: it would never take the rest


def test_a_body_the_backend_does_not_take_pauses_the_client():
    proxy = Proxy()
    proxy.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n")
    transport, _ = proxy.backend()
    transport.producer.pauseProducing()  # the backend's buffer is full
    assert proxy.client.producerState == "paused"
    transport.producer.resumeProducing()
    assert proxy.client.producerState == "producing"


def test_expect_100_continue_goes_through():
    proxy = Proxy()
    proxy.send(
        b"PUT /f HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    )
    transport, backend = proxy.backend()
    assert b"Expect: 100-continue\r\n" in transport.value()
    backend.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert proxy.answer() == "HTTP/1.1 100 Continue\r\n\r\n"
    proxy.send(b"abc")
    assert transport.value().endswith(b"\r\n\r\nabc")
    backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert proxy.answer().endswith("HTTP/1.1 204 No Content\r\n\r\n")
    assert not proxy.client.disconnecting


def test_head_gets_the_length_and_no_body():
    proxy = Proxy()
    proxy.send(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n")
    proxy.answered(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert proxy.answer() == "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert proxy.front.exchange is None and not proxy.client.disconnecting


def test_early_hints_relayed_and_a_1xx_flood_in_one_read_is_a_502_without_blame():
    proxy = Proxy("retries = 2", backends=("a", "b"))
    proxy.send(GET)
    transport, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n")
    assert proxy.answer() == "HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
    backend.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\n" * 2000)  # no RecursionError
    answer = proxy.answer()
    assert answer.count("HTTP/1.1 1") == ex.MAX_INTERIM
    assert "HTTP/1.1 502 Bad Gateway\r\n" in answer
    assert len(proxy.reactor.tcpClients) == 1  # not retried
    assert [m.consecutiveFailures for m in proxy.pool] == [0, 0]
    assert transport.disconnecting


def test_1xx_wait_for_a_client_that_does_not_read():
    proxy = Proxy()
    proxy.send(GET)
    _, backend = proxy.backend()
    proxy.front.pauseProducing()
    backend.dataReceived(b"HTTP/1.1 103 Early Hints\r\n\r\n" * 3)
    assert proxy.answer() == ""
    proxy.front.resumeProducing()
    assert proxy.answer().count("103") == 3


def test_a_websocket_upgrade_after_plain_requests_goes_to_the_handshake():
    proxy = Proxy()
    proxy.send(GET)
    proxy.answered()
    front = proxy.front
    proxy.send(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert proxy.protocol.leg is None and front.state == 3  # GONE
    assert front not in proxy.relay.http
    # The handshake dials the backend for the tunnel.
    assert len(proxy.reactor.tcpClients) == 2
    # The client leaves: nothing of the handshake stays behind.
    proxy.protocol.connectionLost(Failure(ConnectionDone()))


def test_backend_closing_mid_body_aborts_the_client():
    proxy = Proxy()
    proxy.send(GET)
    _, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    backend.connectionLost(Failure(ConnectionLost()))
    assert proxy.client.disconnected
    assert proxy.counters.httpRequests == {("a", "2xx"): 1}


def test_client_closing_mid_upload_aborts_the_backend():
    proxy = Proxy()
    proxy.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    transport, _ = proxy.backend()
    proxy.protocol.connectionLost(Failure(ConnectionLost()))
    assert transport.disconnected
    assert proxy.counters.httpRequests == {("a", "4xx"): 1}  # 499


def test_a_connection_header_never_removes_the_framing():
    proxy = Proxy(NO_REUSE)
    proxy.send(GET + GET)
    proxy.answered(
        b"HTTP/1.1 200 OK\r\nConnection: Content-Length, Transfer-Encoding\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    assert proxy.answer() == "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    proxy.answered(b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n")
    assert proxy.answer().endswith("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n")


def test_chunk_extensions_and_trailers_do_not_cross():
    proxy = Proxy()
    proxy.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    transport, backend = proxy.backend()
    proxy.send(b"3;evil=\"x\"\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n")
    assert transport.value().endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    backend.dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
        b"2;ext=1\r\nok\r\n0\r\nX-T: 1\r\n\r\n"
    )
    assert proxy.answer() == "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    "trailer",
    [
        b"GET /admin HTTP/1.1\r\n",  # a missing final CRLF pulls a request in
        b"X-Sum: a\x01b\r\n",
        b"X-Sum: a\rb\r\n",
    ],
)
def test_a_bad_trailer_gets_400_and_never_reaches_the_backend(trailer):
    proxy = Proxy()
    proxy.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    transport, _ = proxy.backend()
    proxy.send(b"3\r\nabc\r\n0\r\n" + trailer + b"\r\n")
    assert proxy.answer().startswith("HTTP/1.1 400 Bad Request\r\n")
    assert proxy.client.disconnecting
    assert transport.disconnected
    assert b"admin" not in transport.value() and b"X-Sum" not in transport.value()
    assert not transport.value().endswith(b"0\r\n\r\n")  # the body never ended there


@pytest.mark.parametrize(
    "head",
    [
        b"GET /y HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
        b"GET /y HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
        b"POST /y HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /y HTTP/1.1\r\nHost: a,b\r\n\r\n",
        b"GET /y HTTP/1.1\r\nHost: x\r\nX: a\rb\r\n\r\n",
    ],
)
@pytest.mark.parametrize("first", [True, False])
def test_heads_h11_would_take_get_400_first_or_on_keep_alive(head, first):
    proxy = Proxy()
    if not first:
        proxy.send(GET)
        proxy.answered()
    proxy.send(head)
    assert "HTTP/1.1 400 Bad Request\r\n" in proxy.answer()
    assert len(proxy.reactor.tcpClients) == (0 if first else 1)


def test_body_timeout_gives_408_and_a_close():
    proxy = Proxy("body_timeout = 4")
    proxy.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12")
    transport, _ = proxy.backend()
    proxy.reactor.advance(3)
    proxy.send(b"34")  # a read: the wait starts again
    proxy.reactor.advance(3.9)
    assert proxy.answer() == ""
    proxy.reactor.advance(0.1)
    assert proxy.answer().startswith("HTTP/1.1 408 Request Timeout\r\n")
    assert proxy.client.disconnecting and transport.disconnected


def test_body_timeout_waits_while_the_backend_holds_the_client_back():
    proxy = Proxy("body_timeout = 4")
    proxy.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12")
    transport, _ = proxy.backend()
    transport.producer.pauseProducing()
    proxy.reactor.advance(10)
    assert proxy.answer() == ""
    transport.producer.resumeProducing()
    proxy.reactor.advance(4)
    assert proxy.answer().startswith("HTTP/1.1 408 ")


def _oneTurn(reactor):
    """
    Run only the calls due now, not those they schedule (Clock.advance
    would run those too).
    """
    due = [c for c in reactor.getDelayedCalls() if c.getTime() <= reactor.seconds()]
    for call in due:
        reactor.calls.remove(call)
        call.func(*call.args, **call.kw)


def test_requests_answered_at_once_are_read_one_per_reactor_turn():
    # As a pipeline into a route whose backends are down is answered: the
    # other clients get their turns in between.
    proxy = Proxy()
    proxy.relay.stopping = True
    proxy.send(GET * 3)
    assert proxy.answer().count("HTTP/1.1 503 ") == 1
    _oneTurn(proxy.reactor)
    assert proxy.answer().count("HTTP/1.1 503 ") == 2
    _oneTurn(proxy.reactor)
    assert proxy.answer().count("HTTP/1.1 503 ") == 3


def test_a_pipelining_client_is_read_at_most_a_head_ahead():
    proxy = Proxy()
    proxy.send(GET)
    proxy.backend()
    proxy.send(GET * 3000)  # ~100 KB of requests behind the first
    assert proxy.client.producerState == "paused"


_REQUESTS = [
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2;e=1\r\nhi\r\n3\r\nyou\r\n0\r\nT: 1\r\n\r\n",
    b"HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n",
]


def _asReceived(data):
    """
    A request as a backend reads it (with h11: chunk sizes depend on where
    the client's stream was cut): method, target, body.
    """
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = conn.next_event()
    body = b""
    while True:
        event = conn.next_event()
        if type(event) is h11.EndOfMessage:
            return request.method, request.target, body
        body += event.data


@settings(max_examples=60, deadline=None)
@given(
    order=st.lists(st.integers(min_value=0, max_value=len(_REQUESTS) - 1), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_a_pipelined_stream_cut_anywhere_gives_the_same_exchanges(order, cuts):
    stream = b"".join(_REQUESTS[i] for i in order)
    proxy = Proxy(NO_REUSE)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in zip(bounds, bounds[1:]):
        proxy.send(stream[start:end])
    seen = []
    while len(seen) < len(order):
        proxy.reactor.advance(0)
        transport, backend = proxy.backend(len(seen))
        seen.append(_asReceived(transport.value()))
        backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % len(seen))
    expected = {
        0: (b"GET", b"/a", b""),
        1: (b"POST", b"/b", b"hello"),
        2: (b"POST", b"/c", b"hiyou"),
        3: (b"HEAD", b"/d", b""),
    }
    assert seen == [expected[i] for i in order]
    assert proxy.answer().count("HTTP/1.1 200 OK") == len(order)
    assert not proxy.client.disconnecting


def test_connect_timeout_gives_504_after_trying_each_backend():
    proxy = Proxy("connect_timeout = 2\nretries = 1", backends=("a", "b"))
    proxy.send(GET)
    proxy.reactor.advance(2)
    assert len(proxy.reactor.tcpClients) == 2  # GET is tried on the other
    proxy.reactor.advance(2)
    assert proxy.answer().startswith("HTTP/1.1 504 Gateway Timeout\r\n")
    assert "10.0.0" not in proxy.answer()
    assert [proxy.pool[n].failed for n in ("a", "b")] == [1, 1]
    assert [proxy.pool[n].active for n in ("a", "b")] == [0, 0]


def test_response_head_timeout_gives_504_and_is_not_retried():
    proxy = Proxy("http_timeout = 3", backends=("a", "b"))
    proxy.send(GET)
    transport, _ = proxy.backend()
    proxy.reactor.advance(2.9)
    assert proxy.answer() == ""
    proxy.reactor.advance(0.2)
    assert proxy.answer().startswith("HTTP/1.1 504 Gateway Timeout\r\n")
    assert len(proxy.reactor.tcpClients) == 1
    assert sorted(m.consecutiveFailures for m in proxy.pool) == [0, 1]
    assert not proxy.client.disconnecting  # a GET without body: keep-alive


def test_idle_keep_alive_connection_closed_quietly_partial_head_gets_408():
    proxy = Proxy("keepalive_timeout = 5")
    proxy.send(GET)
    _, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    proxy.reactor.advance(4.9)
    assert not proxy.client.disconnecting
    proxy.reactor.advance(0.2)
    assert proxy.client.disconnecting
    assert proxy.answer() == "HTTP/1.1 204 No Content\r\n\r\n"

    proxy = Proxy("handshake_timeout = 5")
    proxy.send(GET)
    _, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    proxy.send(b"GET /y HTTP/1.1\r\n")
    proxy.reactor.advance(5)
    assert "HTTP/1.1 408 Request Timeout\r\n" in proxy.answer()
    assert proxy.client.disconnecting


def test_client_gone_mid_response_closes_the_backend_and_frees_the_member():
    proxy = Proxy()
    proxy.send(GET)
    transport, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    assert proxy.pool["a"].active == 1
    proxy.protocol.connectionLost(Failure(ConnectionLost()))
    assert transport.disconnecting
    assert proxy.pool["a"].active == 0
    assert proxy.counters.httpRequests == {("a", "2xx"): 1}


def test_backend_closing_ends_an_unframed_body_sent_chunked_to_the_client():
    proxy = Proxy()
    proxy.send(GET)
    _, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nabc")
    backend.dataReceived(b"de")
    backend.connectionLost(Failure(ConnectionDone()))
    assert proxy.answer() == (
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert not proxy.client.disconnecting


def test_http10_client_gets_a_chunked_body_decoded_then_close():
    proxy = Proxy()
    proxy.send(b"GET / HTTP/1.0\r\n\r\n")
    _, backend = proxy.backend()
    backend.dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX: 1\r\n\r\n"
    )
    assert proxy.answer() == "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc"
    assert proxy.client.disconnecting


def test_http_timeout_counts_from_the_end_of_a_slow_upload():
    proxy = Proxy("http_timeout = 3")
    proxy.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    transport, _ = proxy.backend()
    proxy.reactor.advance(10)  # the client is slow, not the backend
    assert proxy.answer() == ""
    proxy.send(b"67890")
    assert transport.value().endswith(b"\r\n\r\n1234567890")
    proxy.reactor.advance(3)
    assert proxy.answer().startswith("HTTP/1.1 504 Gateway Timeout\r\n")


def _answered(proxy):
    proxy.send(GET)
    _, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert not proxy.client.disconnecting


def test_an_idle_keep_alive_connection_gets_keepalive_timeout():
    proxy = Proxy("handshake_timeout = 1\nkeepalive_timeout = 30")
    _answered(proxy)
    proxy.reactor.advance(29)  # far beyond handshake_timeout: still open
    assert not proxy.client.disconnecting
    proxy.reactor.advance(1)
    assert proxy.client.disconnecting  # closed quietly: no 408
    assert "408" not in proxy.answer()


def test_a_begun_request_head_gets_handshake_timeout_then_408():
    proxy = Proxy("handshake_timeout = 1\nkeepalive_timeout = 30")
    _answered(proxy)
    proxy.reactor.advance(10)
    proxy.send(b"GET /y HTTP/1.1\r\n")  # the head's first line, then nothing
    proxy.reactor.advance(1)
    assert "408 " in proxy.answer()


def test_a_backend_connection_is_reused_when_both_messages_ended():
    proxy = Proxy()
    proxy.send(GET)
    transport, backend = proxy.backend()
    assert b"Connection" not in transport.value()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert not transport.disconnecting and proxy.relay.idle.count() == 1
    transport.clear()
    proxy.send(GET)
    assert len(proxy.reactor.tcpClients) == 1 and proxy.relay.idle.count() == 0
    assert transport.value().startswith(b"GET /x HTTP/1.1\r\n")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert proxy.answer().endswith("\r\n\r\n2")
    assert proxy.pool["a"].active == 0


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n1",
        b"HTTP/1.1 200 OK\r\n\r\n1",  # ends with the connection
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1HTTP/1.1 200 OK\r\n",  # more than asked
    ],
)
def test_a_backend_connection_is_not_reused_after_an_answer_that_says_so(response):
    proxy = Proxy()
    proxy.send(GET)
    transport, backend = proxy.backend()
    backend.dataReceived(response)
    if not response.endswith(b"1"):
        assert transport.disconnecting
    elif b"close" not in response:
        backend.connectionLost(Failure(ConnectionDone()))
    assert proxy.relay.idle.count() == 0


def test_never_reused_after_an_answer_that_came_before_the_whole_request():
    proxy = Proxy()
    proxy.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    transport, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert "Connection: close" in proxy.answer()
    assert transport.disconnecting and proxy.relay.idle.count() == 0
    assert proxy.client.disconnecting


def test_never_reused_after_a_response_not_read_whole():
    proxy = Proxy()
    proxy.send(GET)
    transport, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    proxy.protocol.connectionLost(Failure(ConnectionLost()))
    assert transport.disconnected and proxy.relay.idle.count() == 0


def test_a_pooled_connection_found_closed_is_replaced_unseen():
    proxy = Proxy("retries = 0")
    proxy.send(GET)
    _, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    proxy.send(GET)  # over the pooled connection...
    backend.connectionLost(Failure(ConnectionDone()))  # ...which the backend had closed
    assert len(proxy.reactor.tcpClients) == 2  # a new one, to the same backend
    _, fresh = proxy.backend()
    fresh.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    assert proxy.answer().count("200 OK") == 2 and proxy.answer().endswith("2")
    assert proxy.pool["a"].consecutiveFailures == 0


def test_a_post_over_a_pooled_connection_found_closed_is_not_sent_again():
    proxy = Proxy()
    proxy.send(GET)
    _, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    proxy.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nz")
    backend.connectionLost(Failure(ConnectionDone()))
    assert len(proxy.reactor.tcpClients) == 1
    assert "502 Bad Gateway" in proxy.answer()


def test_a_parked_connection_that_speaks_or_closes_leaves_the_pool():
    proxy = Proxy()
    proxy.send(GET)
    transport, backend = proxy.backend()
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert proxy.relay.idle.count() == 1
    backend.dataReceived(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert proxy.relay.idle.count() == 0 and transport.disconnected


def test_a_response_with_both_framings_is_a_502():
    proxy = Proxy()
    proxy.send(GET)
    proxy.answered(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    )
    assert proxy.answer().startswith("HTTP/1.1 502 Bad Gateway\r\n")
    assert proxy.pool["a"].consecutiveFailures == 1
