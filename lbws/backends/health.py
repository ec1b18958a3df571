"""
Active health checks: every C{interval} seconds each backend gets a probe
bounded by C{timeout}, and its result goes to L{lbws.backends.pool.Member.recordCheck},
which moves the backend down after C{fall} failures in a row and up again
after C{rise} successes.

Probes (C{[health] probe}):

  - C{default}: the WebSocket handshake on C{probe_path}: an upgrade gets
    the whole C{websocket} check, any other well-formed HTTP answer is
    healthy (L{probeDefault}).
  - C{tcp}: open a TCP connection and close it.
  - C{websocket}: the full opening handshake on C{probe_path} (offering
    C{subprotocol}, if set, and requiring it back), a ping answered by a
    pong, and a clean close. The round-trip time is the ping's.
  - C{http}: C{GET probe_path}; a 2xx or 3xx answer is healthy.

wss:// backends are probed over TLS verified exactly as the relay verifies
them (L{lbws.backends.backend}).

A probe that fails because lbws itself is out of file descriptors or
memory (L{lbws.backends.backend.localShortage}) is not counted: it says nothing of
the backend.

Each backend has its own C{LoopingCall} on the injected clock. A probe still
running when the next one is due is not doubled (the tick is skipped), and
nothing a probe or its bookkeeping does can stop the loop.
"""

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from lbws.backends.backend import (
    Attempt,
    BackendProtocol,
    BackendRefused,
    Shortages,
    backendEndpoint,
    hostForUrl,
    localShortage,
)
from lbws.compat import isClosing, quietHttpPool, uncleanReason
from lbws.config import healthFor
from lbws.transport.tlserrors import describeTlsFailure

_log = Logger()

USER_AGENT = "lbws-health"
PING_PAYLOAD = b"lbws-health"


class ProbeFailed(Exception):
    """
    The backend answered, but not as a healthy one would.
    """


# Probes: each is called as probe(reactor, backend, health) with the
# backend's BackendSettings and the HealthSettings, and returns a Deferred
# firing with the round-trip time in seconds or failing with the reason.
# Cancelling it closes whatever connection it opened.


class _Hangup(Protocol):
    def connectionMade(self):
        self.transport.loseConnection()


class _HangupFactory(Factory):
    protocol = _Hangup
    noisy = False


def probeTcp(reactor, backend, health):
    """
    Healthy when a TCP connection opens (no TLS, even for wss://).
    """
    started = reactor.seconds()
    endpoint = backendEndpoint(reactor, backend, health.timeout, tls=False)
    d = endpoint.connect(_HangupFactory())
    d.addCallback(lambda _: reactor.seconds() - started)
    return d


class _ProbeProtocol(BackendProtocol):
    """
    After the opening handshake: ping, pong, close; then the check is
    settled.
    """

    _check = None
    _pingAt = None

    def check(self, result, subprotocol):
        """
        The WebSocket is open: run the check, settling C{result}.
        """
        self._check = result
        if subprotocol and self.websocket_protocol_in_use != subprotocol:
            chosen = self.websocket_protocol_in_use
            self._settle(
                ProbeFailed(
                    f"backend did not accept subprotocol {subprotocol!r}"
                    + (f" (chose {chosen!r})" if chosen else "")
                )
            )
            self.sendClose(1000)
            return
        self._pingAt = self.factory.reactor.seconds()
        self.sendPing(PING_PAYLOAD)

    def _settle(self, outcome):
        result = self._check
        if result is None or result.called:
            return
        if isinstance(outcome, Exception):
            result.errback(outcome)
        else:
            result.callback(outcome)

    def onPong(self, payload):
        if self._pingAt is None or payload != PING_PAYLOAD or self._rtt is not None:
            return
        self._rtt = self.factory.reactor.seconds() - self._pingAt
        self.sendClose(1000)

    _rtt = None

    def onCloseFrame(self, code, reasonRaw):
        closing = isClosing(self)
        result = super().onCloseFrame(code, reasonRaw)
        if closing and self.wasClean:
            # The backend answered our close: the check is over. The server
            # is meant to drop the TCP connection; not waiting for that
            # keeps Autobahn from starting a timer on the global reactor.
            if self._rtt is not None:
                self._settle(self._rtt)
            self.transport.loseConnection()
        elif not closing:
            self._settle(ProbeFailed(f"backend closed the check's WebSocket with code {code}"))
        return result

    def connectionLost(self, reason):
        super().connectionLost(reason)
        if uncleanReason(self):
            self._settle(ProbeFailed(uncleanReason(self)))
        else:
            self._settle(ProbeFailed(f"connection lost: {reason.getErrorMessage()}"))


def probeWebsocket(reactor, backend, health):
    """
    Healthy when a WebSocket on C{path} opens (with C{subprotocol}, if
    set), answers a ping and closes cleanly.
    """
    return _probeHandshake(reactor, backend, health, answerIsHealthy=False)


def probeDefault(reactor, backend, health):
    """
    The probe of a config that names none: the WebSocket handshake on
    C{path}. An application that upgrades it gets the whole WebSocket check
    (L{probeWebsocket}); any other well-formed HTTP answer, whatever its
    status (a FastAPI app's 404 on /, an MQTT broker's 400, a static
    site's 200), says the application is running, and so does a backend
    that accepts the connection and says nothing until the check's
    timeout (a SockJS server answers nothing outside its prefix): HAProxy's
    plain C{check} is a connect too. What fails: no connection, a
    malformed answer, an upgrade whose WebSocket check fails. A backend
    that hangs for its real clients too is ejected by their failed
    handshakes (passive checks, C{fall}).
    """
    return _probeHandshake(reactor, backend, health, answerIsHealthy=True)


def _probeHandshake(reactor, backend, health, answerIsHealthy):
    subprotocol = health.subprotocol
    attempt = Attempt(
        reactor,
        backend,
        backend.path + health.path,
        _ProbeProtocol,
        health.timeout,
        protocols=[subprotocol] if subprotocol else None,
        useragent=USER_AGENT,
    )
    opening = attempt.start()
    silent = []

    def cancel(_):
        if not opening.called:
            if answerIsHealthy and attempt.protocol is not None:
                # Connected, and no answer yet when the check's time is up.
                silent.append(True)
            opening.cancel()
        else:
            attempt.protocol.giveUp(reactor)

    result = Deferred(cancel)

    started = reactor.seconds()

    def opened(protocol):
        protocol.check(result, subprotocol)

    def failed(failure):
        if result.called:
            return
        if silent:
            result.callback(reactor.seconds() - started)
            return
        if failure.check(BackendRefused):
            if answerIsHealthy:
                result.callback(reactor.seconds() - started)
                return
            failure = ProbeFailed(str(failure.value))
        result.errback(failure)

    opening.addCallbacks(opened, failed)
    return result


@implementer(IAgentEndpointFactory)
class _BackendEndpoints:
    """
    The HTTP probe connects the way the relay does (TLS verified alike).
    """

    def __init__(self, reactor, backend, timeout):
        self._endpoint = backendEndpoint(reactor, backend, timeout)

    def endpointForURI(self, uri):
        return self._endpoint


class _Discard(Protocol):
    """
    The body of a health check answer is not read: stop it at once.
    """

    def connectionMade(self):
        self.transport.stopProducing()

    def connectionLost(self, reason):
        pass


def probeHttp(reactor, backend, health):
    """
    Healthy when C{GET path} is answered with a 2xx or 3xx status.
    """
    pool = quietHttpPool(HTTPConnectionPool(reactor, persistent=False))
    agent = Agent.usingEndpointFactory(
        reactor, _BackendEndpoints(reactor, backend, health.timeout), pool=pool
    )
    scheme = "https" if backend.secure else "http"
    url = f"{scheme}://{hostForUrl(backend.host)}:{backend.port}{backend.path}{health.path}"
    started = reactor.seconds()
    d = agent.request(b"GET", url.encode("ascii"), Headers({"User-Agent": [USER_AGENT]}))

    def answered(response):
        rtt = reactor.seconds() - started
        response.deliverBody(_Discard())
        if 200 <= response.code < 400:
            return rtt
        phrase = response.phrase.decode("latin-1")
        raise ProbeFailed(f"backend answered HTTP {response.code} {phrase}".strip())

    return d.addCallback(answered)


PROBES = {
    "default": probeDefault,
    "tcp": probeTcp,
    "websocket": probeWebsocket,
    "http": probeHttp,
}


def describe(failure):
    """
    A short reason for the dashboard and the log.
    """
    tls = describeTlsFailure(failure)
    if tls is not None:
        return tls
    if failure.check(ResponseFailed, RequestTransmissionFailed, ResponseNeverReceived):
        reasons = failure.value.reasons
        if reasons:
            return reasons[0].getErrorMessage()
    return failure.getErrorMessage() or failure.type.__name__


def _grace(timeout):
    """
    How early a probe may be cut when the next one is due at the moment
    its timeout ends (timeout = interval): that tick times it out and
    probes again instead of being skipped for a probe about to fail.
    """
    return min(timeout * 0.05, 0.05)


class _MemberCheck:
    """
    The loop of one member: at most one probe at a time.
    """

    def __init__(self, checker, member):
        self._checker = checker
        self.member = member
        self.probing = None
        self.started = None
        self.skipped = 0
        self.stopped = False
        self._expired = None
        self.loop = LoopingCall(self.tick)
        self.loop.clock = checker.reactor

    def start(self):
        # A member presumed up (at start-up) is first checked one interval
        # from now; one that is not up yet (added by a reload) at once.
        self.loop.start(self._checker.health.interval, now=not self.member.healthy)

    def stop(self):
        self.stopped = True
        if self.loop.running:
            self.loop.stop()
        probing, self.probing = self.probing, None
        if probing is not None:
            probing.cancel()

    def tick(self):
        try:
            if self.probing is not None:
                timeout = self._checker.health.timeout
                running = self._checker.reactor.seconds() - self.started
                if running < timeout - _grace(timeout):
                    self.skipped += 1
                    _log.debug(
                        "backend {backend}: previous check still running, skipped",
                        backend=self.member.name,
                    )
                    return
                self._expire(self.probing)
                if self.probing is not None:
                    return  # cancelling did not settle it: never two at once
            self._probe()
        except Exception:
            _log.failure("health check of backend {backend} failed", backend=self.member.name)

    def _probe(self):
        checker = self._checker
        reactor = checker.reactor
        # A backend may have its own probe, path and subprotocol.
        health = healthFor(checker.health, self.member.settings)
        probe = checker.probes[health.probe]
        started = self.started = reactor.seconds()
        d = maybeDeferred(probe, reactor, self.member.settings, health)
        self.probing = d
        timer = reactor.callLater(health.timeout, self._expire, d)
        d.addBoth(self._done, d, timer, health, started)
        d.addErrback(
            lambda failure: _log.failure(
                "health check of backend {backend} failed",
                failure,
                backend=self.member.name,
            )
        )

    def _expire(self, d):
        """
        The probe's time is up: cancel it (which closes its connection) and
        count a timeout.
        """
        self._expired = d
        d.cancel()

    def _done(self, result, d, timer, health, started):
        if timer.active():
            timer.cancel()
        if self.probing is d:
            self.probing = None
        timedOut = self._expired is d
        if timedOut:
            self._expired = None
        if self.stopped:
            return None
        member = self.member
        now = self._checker.reactor.seconds()
        if isinstance(result, Failure) and not timedOut:
            shortage = localShortage(result)
            if shortage is not None:
                # lbws's own lack of file descriptors or memory says
                # nothing of the backend.
                self._checker.shortages.note(shortage)
                return None
        duration = max(0.0, now - started)
        if isinstance(result, Failure):
            if timedOut:
                why = f"check timed out after {health.timeout:g}s"
            else:
                why = describe(result)
            member.health.probed("timeout" if timedOut else "failed", duration)
            if member.consecutiveFailures == 0:
                _log.info(
                    "backend {backend} failed a {probe} check: {why}",
                    backend=member.name,
                    probe=health.probe,
                    why=why,
                )
            member.recordCheck(False, now, health.rise, health.fall, why)
        else:
            member.health.probed("ok", duration)
            rtt = result if isinstance(result, (int, float)) else now - started
            member.recordCheck(True, now, health.rise, health.fall, rtt=rtt)
        return None


class HealthChecker(Service):
    """
    Probes every member of a pool that was not removed.

    @ivar health: the L{lbws.config.HealthSettings} in use; L{sync} takes
        new ones on reload.
    @ivar probes: probe name to probe function (injectable for tests).
    """

    name = "health"

    def __init__(self, reactor, pool, health, probes=None):
        self.reactor = reactor
        self.pool = pool
        self.health = health
        self.probes = dict(PROBES if probes is None else probes)
        self.shortages = Shortages(reactor, "running health checks: checks skipped")
        self._checks = {}

    def startService(self):
        super().startService()
        self.sync()

    def stopService(self):
        super().stopService()
        checks, self._checks = self._checks, {}
        for check in checks.values():
            check.stop()

    def sync(self, health=None):
        """
        Make the loops match the pool: start one for each member that has
        none, stop those of members that were removed or left. With new
        C{health} settings (a reload), every loop starts over with them;
        members keep their state.
        """
        restart = health is not None and health != self.health
        if health is not None:
            self.health = health
        if not self.running:
            return
        wanted = [m for m in self.pool if not m.removed]
        for member, check in list(self._checks.items()):
            if restart or not any(m is member for m in wanted):
                check.stop()
                del self._checks[member]
        for member in wanted:
            if member not in self._checks:
                check = self._checks[member] = _MemberCheck(self, member)
                check.start()

    def checking(self):
        """
        The members being checked, for tests and the log.
        """
        return list(self._checks)
