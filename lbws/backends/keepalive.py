"""
Upstream keep-alive for plain HTTP: idle backend connections kept per pool
member, so that the next request to that member skips the TCP (and TLS)
handshake, as nginx's C{keepalive} in an C{upstream} block does.

A parked connection belongs to L{IdleConnections} until L{take} hands it
back out or the pool discards it (its idle timer, a reload that lowers
C{http_keepalive}, the member drained, removed or down, lbws stopping). The
parked object is the HTTP backend leg's protocol, which keeps this
contract:

  - C{protocol.park(onGone)}: it is idle now; on any byte from the backend
    (an idle backend has nothing to say: it is closing or broken) or on
    C{connectionLost}, it calls C{onGone()} once, and closes itself on a
    byte.
  - C{protocol.unpark()}: taken for a new exchange, C{onGone} is forgotten.
  - C{protocol.transport.loseConnection()}: called by the pool, after it
    removed the connection itself, when it discards one.
"""

from twisted.logger import Logger

from lbws.backends.pool import UP

_log = Logger()


class _Parked:
    """
    One idle connection: its protocol, when it was parked and the timer
    that discards it after the idle timeout.
    """

    __slots__ = ("protocol", "since", "timer")

    def __init__(self, protocol, since):
        self.protocol = protocol
        self.since = since
        self.timer = None


class IdleConnections:
    """
    Idle plain-HTTP backend connections, kept per pool member for reuse.

    Per member, the connections form a stack: L{take} returns the one
    parked last (its backend most likely still holds it open, and a few
    hot connections serve a steady load while the others time out), and
    a shrinking L{configure} discards the oldest first.

    @param reactor: an C{IReactorTime} for the idle timers.
    @param limit: idle connections kept per member at most
        (C{http_keepalive}); 0 keeps none.
    @param timeout: seconds an idle connection is kept
        (C{http_keepalive_timeout}).
    """

    def __init__(self, reactor, limit=32, timeout=60.0):
        self._reactor = reactor
        self._limit = limit
        self._timeout = timeout
        self._idle = {}  # member -> [_Parked], oldest first
        self._closed = False  # closeAll: lbws is stopping

    def configure(self, limit, timeout):
        """
        New settings (a reload): a member with more than C{limit} idle
        connections loses its oldest ones, and each idle connection's
        timer counts C{timeout} from when it was parked.
        """
        self._limit = limit
        if timeout != self._timeout:
            self._timeout = timeout
            now = self._reactor.seconds()
            for stack in self._idle.values():
                for parked in stack:
                    parked.timer.reset(max(0.0, parked.since + timeout - now))
        for member in list(self._idle):
            stack = self._idle[member]
            while len(stack) > limit:
                self._discard(member, stack[0])

    def take(self, member):
        """
        The most recently parked connection to C{member} that is still
        open, or None. The returned protocol has been C{unpark()}ed and
        belongs to the caller.
        """
        stack = self._idle.get(member)
        while stack:
            parked = stack.pop()
            parked.timer.cancel()
            if not stack:
                del self._idle[member]
            transport = parked.protocol.transport
            if (
                transport is None
                or transport.disconnecting
                or not getattr(transport, "connected", True)
            ):
                # Closing already: not for a new request. It stays parked,
                # so its onGone, still to come, finds nothing to remove.
                continue
            parked.protocol.unpark()
            return parked.protocol
        return None

    def give(self, member, protocol):
        """
        Park C{protocol} for reuse.

        @return: True if kept. False (and the caller must close it) when
            C{limit} is 0, C{member} is not taking new connections
            (draining, removed, down), C{member} already has C{limit} idle
            ones, or lbws is stopping (L{closeAll}). A kept connection is
            discarded after C{timeout} seconds unless taken before.
        """
        if self._closed or member.state != UP:
            return False
        stack = self._idle.get(member)
        if stack is None:
            if self._limit <= 0:
                return False
            stack = self._idle[member] = []
        elif len(stack) >= self._limit:
            return False
        parked = _Parked(protocol, self._reactor.seconds())
        parked.timer = self._reactor.callLater(self._timeout, self._expired, member, parked)
        stack.append(parked)
        protocol.park(lambda: self._gone(member, parked))
        return True

    def forget(self, member):
        """
        C{member} takes no new connections (drained, removed or down):
        close its idle ones.
        """
        for parked in list(self._idle.get(member, ())):
            self._discard(member, parked)

    def closeAll(self):
        """
        lbws is stopping: close every idle connection, and keep none from
        now on.
        """
        self._closed = True
        for member in list(self._idle):
            self.forget(member)

    def count(self, member=None):
        """
        The idle connections of C{member}, or of all members.
        """
        if member is not None:
            return len(self._idle.get(member, ()))
        return sum(len(stack) for stack in self._idle.values())

    def _remove(self, member, parked):
        """
        Take C{parked} out of C{member}'s stack; False if it was not there.
        """
        stack = self._idle.get(member)
        if stack is None or parked not in stack:
            return False
        stack.remove(parked)
        if not stack:
            del self._idle[member]
        if parked.timer.active():
            parked.timer.cancel()
        return True

    def _gone(self, member, parked):
        # The backend sent a byte or closed while the connection was idle;
        # the protocol closes itself.
        self._remove(member, parked)

    def _expired(self, member, parked):
        if self._remove(member, parked):
            parked.protocol.transport.loseConnection()

    def _discard(self, member, parked):
        if self._remove(member, parked):
            parked.protocol.transport.loseConnection()
