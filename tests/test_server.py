"""
The client protocol's handshake timer (lbws/ws/server.py), in memory: a
StringTransport for the client and a clock driven by the test.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from lbws.config import parseConfig
from lbws.telemetry.metrics import Counters
from lbws.relay import Relay
from lbws.ws.server import LINGER
from tests.support import configText

TIMEOUT = 3.0


class Transport(StringTransport):
    def unregisterProducer(self):
        # As a TCP transport does, and Autobahn relies on: no error when
        # no producer was registered.
        self.producer = None


def client():
    clock = MemoryReactorClock()
    settings = parseConfig(
        configText([("a", "ws://127.0.0.1:1")], lbws=f"handshake_timeout = {TIMEOUT}")
    )
    relay = Relay(clock, settings, pool=None, dialer=None, counters=Counters())
    protocol = relay.factory().buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5))
    protocol.makeConnection(transport)
    return clock, relay, protocol, transport


def test_nothing_sent_in_time_aborts_without_an_answer():
    clock, relay, protocol, transport = client()
    clock.advance(TIMEOUT - 0.01)
    assert not transport.disconnecting
    clock.advance(0.01)
    assert transport.disconnected and transport.value() == b""
    assert relay.counters.handshakes["timeout"] == 1


def test_part_of_a_request_gets_408_then_is_cut_after_the_linger():
    clock, relay, protocol, transport = client()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n")
    clock.advance(TIMEOUT)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting and not transport.disconnected
    clock.advance(LINGER)
    assert transport.disconnected


def test_a_bad_head_gets_400_and_the_linger_replaces_the_timeout():
    clock, relay, protocol, transport = client()
    # A handshake's (a plain request's head is the HTTP proxy's to check).
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nX-A: one\r\n two\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request: bad header line ' two'")
    assert [call.getTime() for call in clock.getDelayedCalls()] == [LINGER]
    clock.advance(LINGER)
    assert transport.disconnected
    assert relay.counters.handshakes["timeout"] == 0


def test_a_client_gone_leaves_no_timer():
    clock, relay, protocol, transport = client()
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")
    protocol.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []
