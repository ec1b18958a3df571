"""
One client request's tries (L{lbws.backends.attempts.Attempts}), the same
for WebSocket and plain HTTP: the preferred member first, then the
balancer's choice without the members tried; a connect within
C{connect_timeout}; what counts against a member; and the status the
client gets: 503 with nothing to try or lbws out of resources, 504 when
the last member timed out (502 for a WebSocket handshake), 502 when it
failed otherwise. Connects go to a
L{MemoryReactorClock}.
"""

import errno

from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from lbws.backends.attempts import NO_BACKEND, NOT_OPENED, SHORTAGE, Attempts, GiveUp
from lbws.backends.backend import BackendTimeout, OpeningError, Shortages
from lbws.backends.pool import Pool
from tests.test_balance import settingsFor

BACKENDS = [
    ("a", "ws://127.0.0.1:1"),
    ("b", "ws://127.0.0.1:2"),
    ("c", "ws://127.0.0.1:3"),
]


def tries(lbws="retries = 2", prefer=None, route=None, backends=BACKENDS, **kwargs):
    reactor = MemoryReactorClock()
    settings = settingsFor(
        backends, lbws="balance = round_robin\nconnect_timeout = 2\n" + lbws,
        health="fall = 1",
    )
    pool = Pool(settings, reactor)
    shortages = Shortages(reactor, "in a test")
    if prefer is not None:
        prefer = pool[prefer]
    if route is not None:
        route = settings.routes[0]
    return reactor, pool, Attempts(
        reactor, pool, settings, shortages, "10.0.0.9", None, prefer, route, **kwargs
    )


def failures(d):
    caught = []
    d.addErrback(caught.append)
    return caught


def test_the_preferred_member_first_then_the_others_once_each():
    reactor, pool, attempts = tries(prefer="b")
    seen = [attempts.next()]
    while attempts.failed(ConnectionRefusedError()) is None:
        seen.append(attempts.next())
    assert [m.name for m in seen] == ["b", "a", "c"]
    assert attempts.tried == seen


def test_nothing_to_try_is_503():
    reactor, pool, attempts = tries()
    for member in pool:
        member.drain()
    assert attempts.next() is None
    assert attempts.exhausted() == NO_BACKEND == GiveUp(503, "no healthy backend", "no_backend")


def test_a_route_tries_its_own_members_only():
    lbws = "retries = 5\n\n[route:r]\nbackends = a, c\n"
    reactor, pool, attempts = tries(lbws=lbws, route=True)
    names = []
    member = attempts.next()
    while member is not None:
        names.append(member.name)
        assert attempts.failed(ConnectionRefusedError()) is None
        member = attempts.next()
    assert sorted(names) == ["a", "c"]
    assert attempts.exhausted().status == 502


def test_a_failure_counts_against_the_member_and_the_next_is_tried():
    reactor, pool, attempts = tries()
    member = attempts.next()
    assert attempts.failed(ConnectionRefusedError()) is None
    assert (member.failed, member.state) == (1, "down")
    assert "refused" in member.lastError


def test_retries_bound_the_tries_and_the_last_failure_decides():
    reactor, pool, attempts = tries(lbws="retries = 1")
    attempts.next()
    assert attempts.failed(BackendTimeout("connect timed out after 2s")) is None
    attempts.next()
    giveUp = attempts.failed(ConnectionRefusedError())
    assert giveUp.status == 502 and giveUp.result == "backend_failed"
    assert len(attempts.tried) == 2


def test_a_timeout_last_is_504():
    reactor, pool, attempts = tries(lbws="retries = 1")
    attempts.next()
    assert attempts.failed(ConnectionRefusedError()) is None
    attempts.next()
    giveUp = attempts.failed(BackendTimeout("backend handshake timed out after 10s"))
    assert giveUp == GiveUp(504, "backend handshake timed out after 10s", "backend_failed")
    assert giveUp.phrase == "Gateway Timeout"


def test_a_timeout_last_is_the_callers_timeout_status():
    """
    A WebSocket handshake is refused with 502 or 503 only (README "When
    no backend answers"): its dialer passes 502 for a timeout.
    """
    reactor, pool, attempts = tries(lbws="retries = 0", timeoutStatus=502)
    attempts.next()
    giveUp = attempts.failed(BackendTimeout("connect timed out after 2s"))
    assert giveUp == GiveUp(502, "connect timed out after 2s", "backend_failed")


def test_members_running_out_before_retries_gives_the_last_failure():
    reactor, pool, attempts = tries(lbws="retries = 5", backends=BACKENDS[:1])
    attempts.next()
    assert attempts.failed(BackendTimeout("connect timed out after 2s")) is None
    assert attempts.next() is None
    assert attempts.exhausted().status == 504


def test_no_retry_when_the_caller_says_so():
    reactor, pool, attempts = tries()
    attempts.next()
    assert attempts.failed(ConnectionRefusedError(), retry=False).status == 502
    assert len(attempts.tried) == 1


def test_lbws_out_of_resources_is_503_and_blames_no_backend():
    reactor, pool, attempts = tries()
    member = attempts.next()
    assert attempts.failed(OSError(errno.EMFILE, "Too many open files")) == SHORTAGE
    assert SHORTAGE.status == 503 and SHORTAGE.result == "over_capacity"
    assert (member.failed, member.state) == (0, "up")


def test_lbws_failing_to_open_is_502_and_blames_no_backend():
    reactor, pool, attempts = tries()
    member = attempts.next()
    assert attempts.failed(OpeningError("OSError: ca file gone")) == NOT_OPENED
    assert NOT_OPENED.status == 502
    assert (member.failed, member.state) == (0, "up")


def test_success_brings_a_down_member_up_at_once():
    reactor, pool, attempts = tries()
    member = attempts.next()
    member.recordCheck(False, 0, 2, 1)
    assert member.state == "down"
    attempts.succeeded()
    assert member.state == "up"


def test_connect_fires_with_the_connected_protocol():
    reactor, pool, attempts = tries()
    member = attempts.next()
    d = attempts.connect(member, Factory.forProtocol(Protocol))
    host, port, factory, timeout, _ = reactor.tcpClients[0]
    assert (host, port, timeout) == ("127.0.0.1", 1, 2)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    connected = []
    d.addCallback(connected.append)
    assert len(connected) == 1 and connected[0].transport is not None
    reactor.advance(5)  # the timeout went with the connect
    assert reactor.getDelayedCalls() == []


def test_connect_timeout_is_a_backend_timeout():
    reactor, pool, attempts = tries()
    member = attempts.next()
    caught = failures(attempts.connect(member, Factory.forProtocol(Protocol)))
    reactor.advance(1.9)
    assert caught == []
    reactor.advance(0.1)
    [failure] = caught
    assert failure.check(BackendTimeout)
    assert failure.getErrorMessage() == "connect timed out after 2s"
    assert attempts.failed(failure, retry=False).status == 504
    assert member.lastError == "connect timed out after 2s"


def test_connect_refused_is_the_connects_own_error():
    reactor, pool, attempts = tries()
    member = attempts.next()
    caught = failures(attempts.connect(member, Factory.forProtocol(Protocol)))
    _, _, factory, _, _ = reactor.tcpClients[0]
    factory.clientConnectionFailed(None, ConnectionRefusedError())
    [failure] = caught
    assert failure.check(ConnectionRefusedError) and not failure.check(BackendTimeout)


def test_cancelling_a_connect_is_not_a_timeout():
    reactor, pool, attempts = tries()
    d = attempts.connect(attempts.next(), Factory.forProtocol(Protocol))
    caught = failures(d)
    d.cancel()
    [failure] = caught
    assert failure.check(CancelledError, ConnectingCancelledError)
    assert not failure.check(BackendTimeout)


def test_a_connect_that_cannot_start_is_an_opening_error(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    reactor, pool, attempts = tries(backends=[("a", "wss://127.0.0.1:1", f"ca = {ca}")])
    ca.unlink()  # gone since the configuration was read
    member = attempts.next()
    [failure] = failures(attempts.connect(member, Factory.forProtocol(Protocol)))
    assert failure.check(OpeningError)
    assert "FileNotFoundError" in failure.getErrorMessage()
    assert reactor.tcpClients == []
