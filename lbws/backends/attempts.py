"""
One client request's way to a backend, the same for a WebSocket handshake
(L{lbws.backends.dial}) and a plain HTTP exchange: which member to try
next, connecting to it within C{connect_timeout}, what a failure counts as,
and the status the client gets once no try is left.

What counts against a backend (towards C{fall}, see the README) is only
its own failure: a connect refused or timed out, a reset, no answer in
time, a malformed answer, a TLS failure. lbws failing to start a
connection (an exception, a CA file gone: L{OpeningError}) is not, nor is
lbws running out of its own resources (EMFILE and the like), which is
said in the log once per burst (L{Shortages}).

The statuses (README "What a client gets when no backend answers"):

  - 503: no member to try (none up, or all drained), or lbws out of its own
    resources;
  - 504 for plain HTTP, as nginx answers, 502 for a WebSocket handshake
    (whose refusals are 502 or 503, the README's promise to clients that
    only know those): the last member tried timed out (C{connect_timeout},
    or the backend did not answer in time);
  - 502: the last member tried failed otherwise, or lbws could not start
    the connection.
"""

from http import HTTPStatus

import attrs
from twisted.internet.defer import fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from lbws.backends.backend import (
    BackendTimeout,
    OpeningError,
    backendEndpoint,
    localShortage,
)

_log = Logger()


@attrs.frozen
class GiveUp:
    """
    What the client gets when its request reaches no backend.

    @ivar status: the HTTP status.
    @ivar reason: why, for lbws's log and WebSocket's refusal; a plain HTTP
        client's body says only the status (README).
    @ivar result: the handshake result it counts as
        (L{lbws.telemetry.metrics.Counters.handshakes}): C{no_backend},
        C{backend_failed} or C{over_capacity}.
    """

    status: int
    reason: str
    result: str

    @property
    def phrase(self):
        return HTTPStatus(self.status).phrase


NO_BACKEND = GiveUp(503, "no healthy backend", "no_backend")
SHORTAGE = GiveUp(503, "lbws is out of resources", "over_capacity")
NOT_OPENED = GiveUp(502, "the backend could not be opened", "backend_failed")


def _timedOut(result, timeout):
    raise BackendTimeout(f"connect timed out after {timeout:g}s")


class Attempts:
    """
    The tries of one client request: L{next} chooses a member, the caller
    connects to it (L{connect} for a plain TCP or TLS connection) and
    reports how that went, L{failed} or L{succeeded}. After L{failed}
    returns None, the caller calls L{next} again; None from L{next} means
    no member is left: L{exhausted} says what the client gets.

    A plain HTTP request may first go over an idle kept connection of the
    member (L{lbws.backends.keepalive}); one that the backend closed before
    any byte of the answer came is not the member's failure (it may have
    closed it just then): the caller connects to the same L{member} again
    with L{connect}, without L{failed}.

    @param pool: the L{lbws.backends.pool.Pool}.
    @param settings: the L{lbws.config.Settings} the request started under
        (C{connect_timeout}, C{retries}, C{[health]}).
    @param shortages: the L{lbws.backends.backend.Shortages} lbws's own
        lack of resources is logged through.
    @param peer: the client's address, for the log.
    @param key: the client's hash key (C{balance = hash}), or None.
    @param prefer: the member to try first (the one the client's
        C{sticky_cookie} names), else the balancer chooses.
    @param route: the request's L{lbws.config.RouteSettings}: its members
        are tried; None for every member.
    @param note: after the client's address in the log lines: " (HTTP)"
        for a plain HTTP request, nothing for a WebSocket.
    @param timeoutStatus: the status when the last try timed out: 504 for
        plain HTTP, 502 for a WebSocket handshake.
    """

    def __init__(
        self, reactor, pool, settings, shortages, peer, key=None, prefer=None, route=None,
        note="", timeoutStatus=504,
    ):
        self._reactor = reactor
        self._pool = pool
        self._settings = settings
        self._shortages = shortages
        self._peer = peer
        self._key = key
        self._prefer = prefer
        self._route = route
        self._note = note
        self._timeoutStatus = timeoutStatus
        self._last = None  # the GiveUp of the last member that failed
        self.tried = []
        self.member = None  # the member of the try under way (or the last)

    def next(self):
        """
        The member to try now: the preferred one first, then the
        balancer's choice among the route's members not tried yet. None
        when no member is left (see L{exhausted}).
        """
        if self._prefer is not None and not self.tried:
            member = self._prefer
        else:
            member = self._pool.choose(self._key, exclude=self.tried, route=self._route)
        if member is not None:
            self.tried.append(member)
            self.member = member
        return member

    def exhausted(self):
        """
        What the client gets when L{next} found no member: 503 if none
        was tried, else what the last one's failure gave.
        """
        if self._last is None:
            return NO_BACKEND
        return self._last

    def connect(self, member, factory):
        """
        Open a TCP (or TLS) connection to C{member} with C{factory}.

        @return: the endpoint's Deferred (firing with the protocol once
            connected), failing with L{BackendTimeout} after
            C{connect_timeout}, L{OpeningError} if the connection could
            not even be started, else the connect's own error. Cancelling
            it stops connecting (a CancelledError or
            ConnectingCancelledError follows).
        """
        timeout = self._settings.connect_timeout
        try:
            endpoint = backendEndpoint(self._reactor, member.settings, timeout)
            d = endpoint.connect(factory)
        except Exception as e:
            return fail(OpeningError(f"{type(e).__name__}: {e}"))
        return d.addTimeout(timeout, self._reactor, onTimeoutCancel=_timedOut)

    def succeeded(self):
        """
        The member answered: a down member is up again at once (see
        L{lbws.backends.pool.Member.connectionSucceeded}).
        """
        self.member.connectionSucceeded(self._reactor.seconds(), self._settings.health)

    def failed(self, failure, retry=True):
        """
        The try of L{member} failed with C{failure} (a C{Failure} or an
        exception; a cancelled try is the caller's to ignore): count it
        against the member if it was the backend's fault, and say what
        comes next.

        @param retry: False when the request must not go to another
            member whatever happened (part of its body went out, or its
            method is not idempotent).
        @return: None when another member should be tried (L{next}), else
            the L{GiveUp} the client gets.
        """
        if not isinstance(failure, Failure):
            failure = Failure(failure)
        member = self.member
        if failure.check(OpeningError):
            _log.error(
                "opening backend {backend} for {peer}{note} failed: {why}",
                backend=member.name,
                peer=self._peer,
                note=self._note,
                why=failure.getErrorMessage(),
            )
            return NOT_OPENED
        shortage = localShortage(failure)
        if shortage is not None:
            self._shortages.note(shortage)
            return SHORTAGE
        why = failure.getErrorMessage()
        member.connectionFailed(why, self._reactor.seconds(), self._settings.health)
        _log.warn(
            "backend {backend} failed for {peer}{note}: {why}",
            backend=member.name,
            peer=self._peer,
            note=self._note,
            why=why,
        )
        status = self._timeoutStatus if failure.check(BackendTimeout) else 502
        self._last = GiveUp(status, why, "backend_failed")
        if retry and len(self.tried) <= self._settings.retries:
            return None
        return self._last
