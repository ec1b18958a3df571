"""
The tunnel's close state machine, one transition at a time, with
StringTransports for both legs and a Clock: what each side is sent, when
its TCP connection is ended or cut, and what the access log is told.

Each test names the transitions it covers as LEG: FROM -> TO.
"""

import struct

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from lbws.config import parseConfig
from lbws.protocol.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT
from lbws.telemetry.metrics import Counters
from lbws.backends.pool import Pool
from lbws.ws.tunnel import (
    CLOSE_RECEIVED,
    CLOSE_SENT,
    CLOSE_TIMEOUT,
    CLOSING,
    CONTROL_FRAMES_PER_SECOND,
    FINISHED,
    LOST,
    OPEN,
    Tunnel,
)
from tests import support, wire


class Transport(StringTransport):
    """
    A StringTransport that records whether it was ended cleanly (after
    what was written) or cut.
    """

    def __init__(self):
        super().__init__()
        self.ended = None  # "lose" or "abort"

    def loseConnection(self):
        self.ended = self.ended or "lose"
        super().loseConnection()

    def abortConnection(self):
        self.ended = self.ended or "abort"
        super().abortConnection()

    def frames(self):
        frames, rest = wire.parseFrames(self.value())
        return frames

    def closes(self):
        return [(f.closeCode, f.payload[2:].decode()) for f in self.frames() if f.opcode == OP_CLOSE]


class Info:
    peer = "192.0.2.1"
    target = "/"
    admitted = True


class FakeRelay:
    """
    What a tunnel needs of the relay: clock, settings, counters, and being
    told when the tunnel ended.
    """

    def __init__(self, lbws=""):
        self.reactor = Clock()
        self.reactor.advance(100)
        if "ping_interval" not in lbws:
            lbws += "\nping_interval = 0"
        self.settings = parseConfig(support.configText([("a", "ws://h:1")], lbws=lbws), "t.ini")
        self.counters = Counters()
        self.pool = Pool(self.settings, self.reactor)
        self.ended = []
        self.gone = []

    def tunnelEnded(self, tunnel):
        self.ended.append(tunnel.endedWith())

    def clientGone(self, info):
        self.gone.append(info)


def make(lbws=""):
    relay = FakeRelay(lbws)
    member = relay.pool["a"]
    tunnel = Tunnel(relay, Transport(), Transport(), member, member.opened(), Info())
    return relay, tunnel, tunnel.client.transport, tunnel.backend.transport


def fromClient(opcode, payload=b"", fin=True):
    return wire.frame(opcode, payload, fin=fin, masked=True)


def fromBackend(opcode, payload=b"", fin=True):
    return wire.frame(opcode, payload, fin=fin, masked=False)


def closeFrame(code, reason=b"", masked=True):
    return wire.frame(OP_CLOSE, struct.pack("!H", code) + reason, masked=masked)


def lose(tunnel, *legs):
    """
    The legs' TCP connections end.
    """
    for leg in legs:
        leg.connectionLost(None)


def states(tunnel):
    return tunnel.client.state, tunnel.backend.state


def test_client_closes_first_and_backend_answers():
    """
    client: OPEN -> CLOSE_RECEIVED -> FINISHED (passClose);
    backend: OPEN -> CLOSE_SENT -> FINISHED (closeFrame); both -> LOST.
    """
    relay, tunnel, client, backend = make()
    tunnel.client.dataReceived(closeFrame(4001, b"bye"))
    assert states(tunnel) == (CLOSE_RECEIVED, CLOSE_SENT)
    assert backend.closes() == [(4001, "bye")]
    assert not tunnel.movable
    # Frames still go to the client until it has the backend's answer.
    tunnel.backend.dataReceived(fromBackend(OP_TEXT, b"late"))
    assert [f.payload for f in client.frames()] == [b"late"]
    tunnel.backend.dataReceived(closeFrame(1000, masked=False))
    assert states(tunnel) == (FINISHED, FINISHED)
    assert client.closes() == [(1000, "")]
    assert (client.ended, backend.ended) == ("lose", "lose")
    lose(tunnel, tunnel.client, tunnel.backend)
    assert states(tunnel) == (LOST, LOST)
    assert relay.ended == [("client", 4001, "bye")]
    assert relay.pool["a"].active == 0


def test_backend_closes_first_and_client_answers():
    """
    backend: OPEN -> CLOSE_RECEIVED -> FINISHED; client: OPEN -> CLOSE_SENT
    -> FINISHED.
    """
    relay, tunnel, client, backend = make()
    tunnel.backend.dataReceived(closeFrame(1001, b"restart", masked=False))
    assert states(tunnel) == (CLOSE_SENT, CLOSE_RECEIVED)
    assert client.closes() == [(1001, "restart")]
    # The client's data still reaches the backend that closed.
    tunnel.client.dataReceived(fromClient(OP_BINARY, b"x"))
    assert [f.payload for f in backend.frames()][:1] == [b"x"]
    tunnel.client.dataReceived(closeFrame(1001))
    assert states(tunnel) == (FINISHED, FINISHED)
    lose(tunnel, tunnel.backend, tunnel.client)
    assert relay.ended == [("backend", 1001, "restart")]


def test_both_close_at_once():
    """
    Both closes cross in one read each: each is the other's answer.
    client: OPEN -> CLOSE_RECEIVED -> FINISHED; backend: OPEN -> CLOSE_SENT
    -> FINISHED; nobody gets a second close.
    """
    relay, tunnel, client, backend = make()
    tunnel.client.dataReceived(closeFrame(1000, b"c"))
    tunnel.backend.dataReceived(closeFrame(1000, b"b", masked=False))
    assert states(tunnel) == (FINISHED, FINISHED)
    assert client.closes() == [(1000, "b")]
    assert backend.closes() == [(1000, "c")]


def test_unanswered_close_is_cut_and_lbws_answers_with_the_same_code():
    """
    backend: CLOSE_SENT -> FINISHED (abort after CLOSE_TIMEOUT) -> LOST;
    client: CLOSE_RECEIVED -> FINISHED, answered by lbws with its own
    code; a close without a code (1005) is answered with 1000.
    """
    for sent, answered in ((closeFrame(4002, b"r"), (4002, "r")), (fromClient(OP_CLOSE), (1000, ""))):
        relay, tunnel, client, backend = make()
        tunnel.client.dataReceived(sent)
        relay.reactor.advance(CLOSE_TIMEOUT - 0.1)
        assert backend.ended is None
        relay.reactor.advance(0.1)
        assert backend.ended == "abort"
        assert tunnel.backend.state == FINISHED
        lose(tunnel, tunnel.backend)
        assert client.closes() == [answered]
        assert tunnel.client.state == FINISHED
        assert client.ended == "lose"


def test_backend_lost_before_and_after_messages():
    """
    backend: OPEN -> LOST; client: OPEN -> CLOSING (1012, which client
    libraries retry, with the reason telling the two cases apart) ->
    FINISHED when the client answers.
    """
    relay, tunnel, client, backend = make()
    lose(tunnel, tunnel.backend)
    assert client.closes() == [(1012, "backend never answered")]
    assert tunnel.client.state == CLOSING
    tunnel.client.dataReceived(closeFrame(1012))
    assert tunnel.client.state == FINISHED
    assert backend.closes() == []  # the answer is not passed on
    lose(tunnel, tunnel.client)
    assert relay.ended == [("backend", 1012, "backend never answered")]

    relay, tunnel, client, backend = make()
    tunnel.backend.dataReceived(fromBackend(OP_TEXT, b"hi"))
    lose(tunnel, tunnel.backend)
    assert client.closes() == [(1012, "backend connection lost")]


def test_loss_mid_frame_cuts_the_other_side():
    """
    A backend lost in the middle of a frame: the client's stream can never
    reach a frame boundary for a close, so it is cut.
    client: OPEN -> FINISHED (abort).
    """
    relay, tunnel, client, backend = make()
    whole = fromBackend(OP_BINARY, b"x" * 1000)
    tunnel.backend.dataReceived(whole[:500])
    lose(tunnel, tunnel.backend)
    assert client.value() == whole[:500]
    assert client.ended == "abort"
    assert tunnel.client.state == FINISHED


def test_client_lost_closes_backend_with_1001():
    """
    client: OPEN -> LOST; backend: OPEN -> CLOSING -> FINISHED (answer) ->
    LOST; and a client lost while the backend's answer is awaited only
    keeps the deadline (backend CLOSE_SENT stays).
    """
    relay, tunnel, client, backend = make()
    lose(tunnel, tunnel.client)
    assert backend.closes() == [(1001, "client went away")]
    assert tunnel.backend.state == CLOSING
    tunnel.backend.dataReceived(closeFrame(1001, masked=False))
    assert tunnel.backend.state == FINISHED
    lose(tunnel, tunnel.backend)
    assert relay.ended == [("client", 1006, "connection dropped")]

    relay, tunnel, client, backend = make()
    tunnel.client.dataReceived(closeFrame(1000))
    lose(tunnel, tunnel.client)
    assert tunnel.backend.state == CLOSE_SENT
    assert backend.closes() == [(1000, "")]
    relay.reactor.advance(CLOSE_TIMEOUT)
    assert backend.ended == "abort"


def test_lbws_close_answered_is_not_passed_on():
    """
    Tunnel.close (idle timeout, rebalancing, stop): both legs OPEN ->
    CLOSING -> FINISHED; the answers go nowhere.
    """
    relay, tunnel, client, backend = make()
    tunnel.close(1012, 1001, "rebalancing", "lbws", backendReason="client moved by rebalancing")
    assert states(tunnel) == (CLOSING, CLOSING)
    assert client.closes() == [(1012, "rebalancing")]
    assert backend.closes() == [(1001, "client moved by rebalancing")]
    tunnel.client.dataReceived(closeFrame(1012))
    tunnel.backend.dataReceived(closeFrame(1001, masked=False))
    assert states(tunnel) == (FINISHED, FINISHED)
    assert len(client.closes()) == len(backend.closes()) == 1
    lose(tunnel, tunnel.client, tunnel.backend)
    assert relay.ended == [("lbws", 1012, "rebalancing")]


def test_lbws_close_unanswered_is_cut_after_the_timeout():
    """
    Both legs CLOSING -> FINISHED by abort when no answer comes.
    """
    relay, tunnel, client, backend = make()
    tunnel.close(1001, 1001, "idle timeout", "lbws")
    relay.reactor.advance(CLOSE_TIMEOUT)
    assert (client.ended, backend.ended) == ("abort", "abort")
    assert states(tunnel) == (FINISHED, FINISHED)


def test_lbws_close_during_a_held_frame_waits_for_the_boundary():
    """
    client: OPEN -> CLOSING while a backend frame to it is half through:
    the close frame goes after that frame, never inside it.
    """
    relay, tunnel, client, backend = make()
    whole = fromBackend(OP_BINARY, b"y" * 300)
    tunnel.backend.dataReceived(whole[:100])
    tunnel.close(1001, 1001, "idle timeout", "lbws")
    assert tunnel.client.state == CLOSING
    assert client.value() == whole[:100]
    tunnel.backend.dataReceived(whole[100:] + fromBackend(OP_TEXT, b"after"))
    frames = client.frames()
    assert [f.opcode for f in frames] == [OP_BINARY, OP_CLOSE]
    assert frames[0].payload == b"y" * 300


def test_client_violation_closes_client_after_backend_leg():
    """
    A bad frame from the client: backend OPEN -> CLOSING (1001) and what it
    still sends reaches the client; backend CLOSING -> FINISHED on its
    answer, then client OPEN -> CLOSING (1002) -> FINISHED on its answer,
    found behind the frames it sent after the bad one.
    """
    relay, tunnel, client, backend = make()
    tunnel.client.dataReceived(fromClient(OP_TEXT, b"ok") + wire.frame(3, b"bad"))
    assert backend.closes() == [(1001, "client error: reserved opcode 3")]
    assert tunnel.client.state == OPEN
    tunnel.backend.dataReceived(fromBackend(OP_TEXT, b"reply") + closeFrame(1001, masked=False))
    frames = client.frames()
    assert [f.payload for f in frames[:1]] == [b"reply"]
    assert client.closes() == [(1002, "reserved opcode 3")]
    assert states(tunnel) == (CLOSING, FINISHED)
    tunnel.client.dataReceived(fromClient(OP_TEXT, b"queued") + wire.frame(3, b"more"))
    assert client.ended is None
    tunnel.client.dataReceived(closeFrame(1002))
    assert client.ended == "lose"
    assert states(tunnel) == (FINISHED, FINISHED)
    assert relay.counters.protocolErrors[("client", 1002)] == 1
    lose(tunnel, tunnel.client, tunnel.backend)
    assert relay.ended == [("client", 1002, "reserved opcode 3")]


def test_client_violation_when_backend_never_answers():
    """
    backend CLOSING -> FINISHED (timeout) -> LOST, then the client is
    failed: it is owed its close whatever way the backend leg ends.
    """
    relay, tunnel, client, backend = make()
    tunnel.client.dataReceived(wire.frame(OP_TEXT, b"abc", masked=False))
    relay.reactor.advance(CLOSE_TIMEOUT)
    assert backend.ended == "abort"
    lose(tunnel, tunnel.backend)
    assert client.closes() == [(1002, "unmasked client frame")]


def test_bad_close_from_client_is_a_violation():
    """
    client OPEN -> CLOSE_RECEIVED on a close of one byte, which is a
    violation: the backend is closed with 1001, then the client, whose
    close came already, gets 1002 and its connection ends
    (CLOSE_RECEIVED -> FINISHED).
    """
    relay, tunnel, client, backend = make()
    tunnel.client.dataReceived(wire.frame(OP_CLOSE, b"\x03"))
    assert tunnel.client.state == CLOSE_RECEIVED
    assert backend.closes() == [(1001, "client error: close payload of one byte")]
    tunnel.backend.dataReceived(closeFrame(1001, masked=False))
    assert client.closes() == [(1002, "close payload of one byte")]
    assert states(tunnel) == (FINISHED, FINISHED)
    assert client.ended == "lose"
    lose(tunnel, tunnel.client, tunnel.backend)
    assert relay.ended == [("client", 1002, "close payload of one byte")]


def test_backend_violation_closes_backend_and_client_with_1012():
    """
    backend OPEN -> CLOSING (1002) -> FINISHED on its answer, found behind
    what it kept sending; client OPEN -> CLOSING (1012, which client
    libraries retry) -> FINISHED on its answer.
    """
    relay, tunnel, client, backend = make()
    tunnel.backend.dataReceived(wire.frame(OP_TEXT, b"masked", masked=True))
    assert backend.closes() == [(1002, "masked server frame")]
    assert states(tunnel) == (CLOSING, CLOSING)
    assert client.closes() == [(1012, "backend error: masked server frame")]
    tunnel.backend.dataReceived(wire.frame(OP_TEXT, b"still masked", masked=True))
    assert backend.ended is None
    assert [f.opcode for f in client.frames()] == [OP_CLOSE]
    tunnel.backend.dataReceived(closeFrame(1002, masked=False))
    assert backend.ended == "lose"
    tunnel.client.dataReceived(closeFrame(1012))
    assert states(tunnel) == (FINISHED, FINISHED)
    lose(tunnel, tunnel.backend, tunnel.client)
    assert relay.ended == [("backend", 1012, "backend error: masked server frame")]


# lbws's own close handshake (the module docstring of lbws.ws.tunnel): each
# way lbws closes a client, what lbws does to set it off, and the code.
OWN_CLOSES = {
    "1009 max_message_size": (
        "max_message_size = 1000",
        lambda relay, tunnel: tunnel.client.dataReceived(fromClient(OP_BINARY, b"x" * 2000)),
        1009,
    ),
    "1009 max_frames_per_message": (
        "max_frames_per_message = 4",
        lambda relay, tunnel: tunnel.client.dataReceived(
            fromClient(OP_TEXT, b"a", fin=False) + fromClient(0, b"b", fin=False) * 4
        ),
        1009,
    ),
    "1008 max_message_rate": (
        "max_message_rate = 3",
        lambda relay, tunnel: tunnel.client.dataReceived(fromClient(OP_TEXT, b"m") * 4),
        1008,
    ),
    "1008 pings": (
        "",
        lambda relay, tunnel: tunnel.client.dataReceived(
            fromClient(OP_PING, b"p") * (CONTROL_FRAMES_PER_SECOND + 1)
        ),
        1008,
    ),
    "1002 bad frame": ("", lambda relay, tunnel: tunnel.client.dataReceived(wire.frame(3, b"x")), 1002),
    "1001 stop": ("", lambda relay, tunnel: tunnel.shutdown(CLOSE_TIMEOUT), 1001),
    "1001 idle": ("idle_timeout = 1", lambda relay, tunnel: relay.reactor.advance(1), 1001),
    "1012 rebalancing": (
        "",
        lambda relay, tunnel: tunnel.close(1012, 1001, "rebalancing", "lbws"),
        1012,
    ),
    "1012 backend lost": ("", lambda relay, tunnel: lose(tunnel, tunnel.backend), 1012),
}

# What a client that had queued them sends after lbws's reason to close it:
# frames of every kind, a bad one, an oversize one.
STILL_SENDING = (
    b"".join(fromClient(OP_TEXT, b"m%d" % i) for i in range(300))
    + fromClient(OP_PING, b"p")
    + wire.frame(3, b"bad")
    + fromClient(OP_BINARY, b"y" * 70000)
)


def closedByLbws(name):
    """
    A tunnel whose client lbws has just sent its close for C{name}, with
    the backend leg over (it answered lbws's own close, if it got one).
    """
    lbws, setOff, code = OWN_CLOSES[name]
    relay, tunnel, client, backend = make(lbws)
    setOff(relay, tunnel)
    if tunnel.backend.state == CLOSING:
        tunnel.backend.dataReceived(closeFrame(1001, masked=False))
    assert [c for c, _ in client.closes()] == [code]
    assert tunnel.client.state == CLOSING
    return relay, tunnel, client, backend


@pytest.mark.parametrize("name", OWN_CLOSES)
def test_own_close_reads_a_client_that_keeps_sending(name):
    """
    client CLOSING while it keeps sending: it is read, nothing of it is
    relayed, its connection stays; its close, behind all that and cut
    across reads, ends it with a FIN (CLOSING -> FINISHED, "lose").
    """
    relay, tunnel, client, backend = closedByLbws(name)
    code = client.closes()[0][0]
    toBackend = backend.value()
    for piece in (STILL_SENDING[:5], STILL_SENDING[5:40000], STILL_SENDING[40000:]):
        tunnel.client.dataReceived(piece)
        relay.reactor.advance(1)
    assert client.ended is None
    assert tunnel.client.state == CLOSING
    assert backend.value() == toBackend
    answer = closeFrame(code)
    tunnel.client.dataReceived(answer[:3])
    assert client.ended is None
    tunnel.client.dataReceived(answer[3:])
    assert client.ended == "lose"
    assert tunnel.client.state == FINISHED
    assert len(client.closes()) == 1


@pytest.mark.parametrize("name", OWN_CLOSES)
def test_own_close_cuts_a_client_that_never_answers(name):
    """
    client CLOSING -> FINISHED by abort after CLOSE_TIMEOUT, however much
    it sends meanwhile.
    """
    relay, tunnel, client, backend = closedByLbws(name)
    relay.reactor.advance(CLOSE_TIMEOUT - 1.5)
    tunnel.client.dataReceived(STILL_SENDING)
    relay.reactor.advance(1)
    assert client.ended is None
    relay.reactor.advance(0.5)
    assert client.ended == "abort"
    assert tunnel.client.state == FINISHED


@pytest.mark.parametrize("name", OWN_CLOSES)
def test_own_close_answered_at_once(name):
    """
    client CLOSING -> FINISHED ("lose") on its close, with nothing before
    it; the answer is not passed on.
    """
    relay, tunnel, client, backend = closedByLbws(name)
    toBackend = backend.value()
    tunnel.client.dataReceived(closeFrame(client.closes()[0][0]))
    assert (client.ended, tunnel.client.state) == ("lose", FINISHED)
    assert backend.value() == toBackend


def test_close_in_the_same_read_as_the_violation():
    """
    An oversize message, what the client queued behind it, and its close,
    all in one read: the close is found at once; once the backend leg is
    over, the client gets 1009 and its connection ends (OPEN ->
    CLOSE_RECEIVED -> FINISHED).
    """
    relay, tunnel, client, backend = make("max_message_size = 1000")
    tunnel.client.dataReceived(fromClient(OP_BINARY, b"x" * 2000) + STILL_SENDING + closeFrame(1000))
    assert tunnel.client.state == CLOSE_RECEIVED
    assert client.ended is None
    tunnel.backend.dataReceived(fromBackend(OP_TEXT, b"owed") + closeFrame(1001, masked=False))
    assert [f.payload for f in client.frames()][:1] == [b"owed"]
    assert client.closes() == [(1009, "message longer than 1000 bytes")]
    assert (client.ended, tunnel.client.state) == ("lose", FINISHED)
    lose(tunnel, tunnel.client, tunnel.backend)
    # The access log tells why lbws closed it, not the client's 1000.
    assert relay.ended == [("client", 1009, "message longer than 1000 bytes")]


def test_unreadable_stream_after_a_violation():
    """
    A frame length with its top bit set: no frame boundary follows, so
    the client's close cannot be found. Once lbws's close is written,
    lbws ends its side (a FIN, on TCP a half-close: the peer, waiting for
    the server to close first, then closes too), and reads (and drops)
    what comes until the client's end, or cuts it after CLOSE_TIMEOUT.
    """
    unreadable = b"\x82\xff" + struct.pack("!Q", 1 << 63) + b"abcd"
    relay, tunnel, client, backend = make()
    tunnel.client.dataReceived(unreadable + closeFrame(1000))
    assert client.ended is None  # its close waits for the backend leg
    tunnel.backend.dataReceived(closeFrame(1001, masked=False))
    assert client.closes() == [(1002, "invalid frame length")]
    assert client.ended == "lose"
    tunnel.client.dataReceived(closeFrame(1000))
    assert tunnel.client.state < FINISHED  # still read until it ends


def test_backend_closed_by_lbws_is_read_until_its_close():
    """
    The backend leg too: a backend over max_message_size gets 1009
    (OPEN -> CLOSING), is read while it keeps sending, and its close ends
    its connection with a FIN; one that never answers is cut.
    """
    for answers in (True, False):
        relay, tunnel, client, backend = make("max_message_size = 1000")
        tunnel.backend.dataReceived(fromBackend(OP_BINARY, b"z" * 5000)[:3000])
        assert backend.closes() == [(1009, "message longer than 1000 bytes")]
        assert client.closes() == [(1012, "backend error: message longer than 1000 bytes")]
        tunnel.backend.dataReceived(b"z" * 2000 + fromBackend(OP_TEXT, b"more") * 300)
        assert backend.ended is None
        if answers:
            tunnel.backend.dataReceived(closeFrame(1009, masked=False))
            assert backend.ended == "lose"
        else:
            relay.reactor.advance(CLOSE_TIMEOUT)
            assert backend.ended == "abort"
        assert tunnel.backend.state == FINISHED
        assert [f.opcode for f in client.frames()] == [OP_CLOSE]


def test_a_leg_that_takes_no_more_frames_stops_holding_the_other_back():
    """
    A client paused because its backend does not read: once lbws closes
    the backend leg, the client is read again (to find its own close),
    and the backend's buffer never pauses it again.
    """
    relay, tunnel, client, backend = make()
    backend.producer.pauseProducing()
    assert client.producerState == "paused"
    tunnel.shutdown(CLOSE_TIMEOUT)
    assert client.producerState == "producing"
    backend.producer.pauseProducing()
    assert client.producerState == "producing"


def test_violation_by_both_sides_gives_the_client_its_own_code():
    """
    A client breaks the protocol, then its backend (while lbws waits for
    its answer): the client still gets the code it caused, once the
    backend leg is over.
    """
    relay, tunnel, client, backend = make("max_message_size = 1000")
    tunnel.client.dataReceived(fromClient(OP_BINARY, b"x" * 2000))
    tunnel.backend.dataReceived(fromBackend(OP_BINARY, b"z" * 5000))
    assert client.closes() == []
    tunnel.backend.dataReceived(closeFrame(1001, masked=False))
    assert client.closes() == [(1009, "message longer than 1000 bytes")]


def reachState(tunnel, name):
    """
    Bring the client leg to a state, for stopping in it.
    """
    if name == "OPEN":
        pass
    elif name == "CLOSE_RECEIVED":
        tunnel.client.dataReceived(closeFrame(4000, b"c"))
    elif name == "CLOSE_SENT":
        tunnel.backend.dataReceived(closeFrame(4000, b"b", masked=False))
    elif name == "CLOSING":
        tunnel.close(1001, 1001, "idle timeout", "lbws")
    elif name == "FINISHED":
        tunnel.client.dataReceived(closeFrame(4000, b"c"))
        tunnel.backend.dataReceived(closeFrame(4000, b"b", masked=False))
    elif name == "LOST":
        lose(tunnel, tunnel.client)


@pytest.mark.parametrize(
    "name, clientAfter, backendAfter, clientCloses, backendCloses",
    [
        # Both get 1001 and CLOSING.
        ("OPEN", CLOSING, CLOSING, [(1001, "lbws is stopping")], [(1001, "lbws is stopping")]),
        # The client's close waits for the backend, which now gets lbws's
        # close instead of the client's being answered... it already has
        # the client's: the client is answered with 1001 at once.
        ("CLOSE_RECEIVED", FINISHED, CLOSING, [(1001, "lbws is stopping")], [(4000, "c")]),
        # The backend's close went to the client: lbws takes it over.
        ("CLOSE_SENT", CLOSING, FINISHED, [(4000, "b")], [(1001, "lbws is stopping")]),
        ("CLOSING", CLOSING, CLOSING, [(1001, "idle timeout")], [(1001, "idle timeout")]),
        ("FINISHED", FINISHED, FINISHED, [(4000, "b")], [(4000, "c")]),
        ("LOST", LOST, CLOSING, [], [(1001, "client went away")]),
    ],
)
def test_stop_in_each_state(name, clientAfter, backendAfter, clientCloses, backendCloses):
    """
    Tunnel.shutdown with the client leg in each state: no second close to
    a side that has one, and the drain deadline shortens a wait.
    """
    relay, tunnel, client, backend = make()
    reachState(tunnel, name)
    tunnel.shutdown(0.5)
    assert states(tunnel) == (clientAfter, backendAfter)
    assert client.closes() == clientCloses
    assert backend.closes() == backendCloses
    relay.reactor.advance(0.5)
    for leg in (tunnel.client, tunnel.backend):
        assert leg.state in (FINISHED, LOST)


class CountingTransport(Transport):
    """
    A Transport that keeps each write apart.
    """

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(bytes(data))
        super().write(data)


def test_frames_of_one_read_leave_in_one_write():
    """
    Messages and pings that arrive in one read go on in one write, in
    order; the messages are counted once for the read. A pong answering
    lbws's own ping is taken out: what was before it and what follows
    leave in two writes.
    """
    relay = FakeRelay("ping_interval = 1")
    member = relay.pool["a"]
    client, backend = CountingTransport(), CountingTransport()
    tunnel = Tunnel(relay, client, backend, member, member.opened(), Info())
    read = b"".join(
        [fromBackend(OP_TEXT, b"one"), fromBackend(OP_BINARY, b"two" * 50)]
        + [fromBackend(OP_PING, b"p"), fromBackend(OP_TEXT, b"three")]
    )
    tunnel.backend.dataReceived(read)
    assert client.writes == [read]
    assert (member.traffic.messagesOut, member.traffic.bytesOut) == (3, 3 + 150 + 5)
    assert (tunnel.backend.messages, tunnel.backend.bytes) == (3, 158)

    relay.reactor.advance(1)
    (ping,) = client.frames()[4:]
    before = fromClient(OP_TEXT, b"a")
    after = fromClient(OP_PING, b"b") + fromClient(OP_TEXT, b"c")
    tunnel.client.dataReceived(before + fromClient(OP_PONG, ping.payload) + after)
    assert backend.writes == [before, after]
    assert (member.traffic.messagesIn, tunnel.client.messages) == (2, 2)


def test_ping_answered_and_unanswered():
    """
    A written ping answered keeps the client; one unanswered for an
    interval with no traffic cuts it (client OPEN -> FINISHED by abort)
    and closes the backend with 1001.
    """
    relay, tunnel, client, backend = make("ping_interval = 1")
    relay.reactor.advance(1)
    (ping,) = client.frames()
    assert ping.opcode == OP_PING
    tunnel.client.dataReceived(fromClient(OP_PONG, ping.payload))
    assert backend.value() == b""  # lbws's own pong is not passed on
    relay.reactor.advance(1)
    assert client.ended is None
    relay.reactor.advance(1)
    assert client.ended == "abort"
    assert backend.closes() == [(1001, "client went away")]
    assert tunnel.closedFirstBy == "lbws"


def test_held_ping_counts_only_once_written():
    """
    A ping held behind a backend frame in flight is not outstanding: the
    client is not cut while the frame is slowly completed, and the ping
    goes out after it.
    """
    relay, tunnel, client, backend = make("ping_interval = 1")
    whole = fromBackend(OP_BINARY, b"z" * 1000)
    tunnel.backend.dataReceived(whole[:10])
    for i in range(10):
        relay.reactor.advance(1)
        tunnel.backend.dataReceived(whole[10 + i * 50 : 60 + i * 50])
    assert client.ended is None
    assert client.frames() == []
    tunnel.backend.dataReceived(whole[510:])
    frames = client.frames()
    assert [f.opcode for f in frames] == [OP_BINARY, OP_PING]
    tunnel.client.dataReceived(fromClient(OP_PONG, frames[1].payload))
    relay.reactor.advance(1)
    assert client.ended is None


def test_held_ping_and_client_not_reading_is_cut():
    """
    A ping held behind a frame the client does not take (its transport
    holds the backend back) cuts the client after an interval without
    traffic.
    """
    relay, tunnel, client, backend = make("ping_interval = 1")
    tunnel.backend.dataReceived(fromBackend(OP_BINARY, b"z" * 1000)[:10])
    relay.reactor.advance(1)
    client.producer.pauseProducing()
    relay.reactor.advance(1)
    assert client.ended == "abort"


def test_idle_timeout_counts_bytes_of_a_long_message():
    """
    A fragmented message that keeps moving is activity; once nothing
    moves for idle_timeout, both legs OPEN -> CLOSING with 1001.
    """
    relay, tunnel, client, backend = make("idle_timeout = 1")
    tunnel.client.dataReceived(fromClient(OP_TEXT, b"a", fin=False))
    for _ in range(5):
        relay.reactor.advance(0.6)
        tunnel.client.dataReceived(fromClient(0, b"b", fin=False))
    assert states(tunnel) == (OPEN, OPEN)
    relay.reactor.pump([0.1] * 14)
    assert states(tunnel) == (OPEN, OPEN)
    relay.reactor.pump([0.1] * 11)
    assert states(tunnel) == (CLOSING, CLOSING)
    assert client.closes() == [(1001, "idle timeout")]


def test_message_rate_and_control_budget():
    """
    max_message_rate and the ping/pong budget: the message beyond the
    budget within a second is a 1008 violation, the same count spread over
    two seconds is not.
    """
    relay, tunnel, client, backend = make("max_message_rate = 3")
    tunnel.client.dataReceived(fromClient(OP_TEXT, b"1") * 3)
    relay.reactor.advance(1)
    tunnel.client.dataReceived(fromClient(OP_TEXT, b"2") * 3)
    assert tunnel.client.state == OPEN and tunnel.backend.state == OPEN
    tunnel.client.dataReceived(fromClient(OP_TEXT, b"3"))
    assert backend.closes() == [(1001, "client error: more than 3 messages a second")]
    assert [f.payload for f in backend.frames()].count(b"3") == 0

    relay, tunnel, client, backend = make()
    tunnel.client.dataReceived(fromClient(OP_PING, b"p") * CONTROL_FRAMES_PER_SECOND)
    assert tunnel.backend.state == OPEN
    tunnel.client.dataReceived(fromClient(OP_PING, b"p"))
    assert tunnel.backend.state == CLOSING
    assert backend.closes() == [(1001, "client error: more than 100 pings and pongs a second")]


def test_too_many_frames_in_one_message():
    relay, tunnel, client, backend = make("max_frames_per_message = 4")
    tunnel.client.dataReceived(fromClient(OP_TEXT, b"a", fin=False) + fromClient(0, b"b", fin=False) * 2)
    assert tunnel.backend.state == OPEN
    tunnel.client.dataReceived(fromClient(0, b"c", fin=True))
    assert tunnel.backend.state == OPEN  # four frames: allowed
    tunnel.client.dataReceived(fromClient(OP_TEXT, b"a", fin=False) + fromClient(0, b"b", fin=False) * 4)
    assert backend.closes() == [(1001, "client error: message of more than 4 frames")]


@pytest.mark.parametrize("name", ["OPEN", "CLOSE_RECEIVED", "CLOSING", "LOST"])
def test_abort_in_each_state(name):
    """
    A second stop signal: Tunnel.abort cuts whatever is not finished yet
    (any state -> FINISHED), and the tunnel ends once both are lost.
    """
    relay, tunnel, client, backend = make()
    reachState(tunnel, name)
    tunnel.abort()
    for leg in (tunnel.client, tunnel.backend):
        assert leg.state in (FINISHED, LOST)
        assert leg.transport.ended == ("abort" if name != "LOST" or leg is tunnel.backend else None)
    lose(tunnel, *[leg for leg in (tunnel.client, tunnel.backend) if leg.state != LOST])
    assert len(relay.ended) == 1
    assert relay.pool["a"].active == 0


def test_a_tunnel_goes_on_from_the_state_of_another_process():
    """
    Take-over (lbws.ops.handoff): a tunnel built from another one's
    exported state (as JSON) has its counts, its scanners' place in the
    middle of a message, its unanswered ping and its timers' deadlines.
    """
    import json

    from lbws.ws.server import ClientInfo

    relay = FakeRelay("ping_interval = 10\nidle_timeout = 60")
    info = ClientInfo("192.0.2.1", "/chat", False)
    info.route = relay.settings.implicitRoute()
    member = relay.pool["a"]
    tunnel = Tunnel(relay, Transport(), Transport(), member, member.opened(), info)
    client = tunnel.client.transport
    tunnel.client.dataReceived(fromClient(OP_TEXT, b"one"))
    relay.reactor.advance(10)  # a ping goes out
    (ping,) = [f for f in client.frames() if f.opcode == OP_PING]
    # A message begun in a first frame: its continuation comes later.
    tunnel.backend.dataReceived(fromBackend(OP_TEXT, b"par", fin=False) + fromBackend(0x0, b"t")[:1])
    relay.reactor.advance(3)
    state = json.loads(json.dumps(tunnel.exportState()))
    assert state["nextPing"] == 7 and state["nextIdle"] == 47
    assert (state["peer"], state["target"], state["route"], state["member"]) == (
        "192.0.2.1",
        "/chat",
        "default",
        "a",
    )

    other = FakeRelay("ping_interval = 10\nidle_timeout = 60")
    other.reactor.advance(1000)
    member = other.pool["a"]
    moved = Tunnel(other, Transport(), Transport(), member, member.opened(), Info())
    moved.importState(state)
    assert (moved.client.messages, moved.client.bytes) == (1, 3)
    assert moved.started == other.reactor.seconds() - 13
    # The rest of the message goes on where it stopped, and ends it; the
    # header byte read over there but not yet relayed came along.
    moved.backend.dataReceived(fromBackend(0x0, b"t")[1:])
    assert (moved.backend.messages, moved.backend.bytes) == (1, 4)
    assert moved.client.transport.value() == fromBackend(0x0, b"t")
    # The ping sent before the move is still the one to answer.
    moved.client.dataReceived(fromClient(OP_PONG, ping.payload))
    assert moved._pingPayload is None
    # The next ping comes when it was due over there.
    other.reactor.advance(6.9)
    assert not [f for f in moved.client.transport.frames() if f.opcode == OP_PING]
    other.reactor.advance(0.2)
    assert [f for f in moved.client.transport.frames() if f.opcode == OP_PING]


def test_a_tunnel_that_is_not_plain_tcp_cannot_move():
    relay, tunnel, client, backend = make()
    assert tunnel.movable and not tunnel.canMove
    assert tunnel.handoffState() is None
