"""
The plain HTTP proxy's transitions that depend on time, driven by a
MemoryReactorClock: the client connection is a StringTransport under
lbws's real FrontendProtocol, and each backend connection the proxy opens
is answered (or not) by hand.
"""

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from lbws.config import parseConfig
from lbws.backends.dial import Dialer
from lbws.telemetry.metrics import Counters
from lbws.backends.pool import Pool
from lbws.relay import Relay

GET = b"GET /x HTTP/1.1\r\nHost: public\r\n\r\n"


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


def test_request_and_response_relayed_then_connection_kept():
    proxy = Proxy()
    proxy.send(GET)
    transport, backend = proxy.backend()
    sent = transport.value().decode()
    # The client's Host by default (host_header = client).
    assert sent.startswith("GET /x HTTP/1.1\r\nHost: public\r\n")
    assert "X-Forwarded-Host: public\r\n" in sent
    assert sent.endswith("Connection: close\r\n\r\n")
    backend.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    assert proxy.answer() == "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert transport.disconnecting  # the backend connection is closed
    assert not proxy.client.disconnecting  # the client's stays
    assert proxy.pool["a"].active == 0 and proxy.pool["a"].total == 1


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
