"""
The relay: admission of clients, the choice and opening of their backends,
the registry of open tunnels, and draining them on stop.

The client's protocol lives in L{lbws.ws.server}, a joined client and backend
in L{lbws.ws.tunnel}.
"""

import random as _random
from collections import Counter

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger

from lbws.backends import sticky
from lbws.backends.balance import hashKeyOf
from lbws.backends.keepalive import IdleConnections
from lbws.backends.routes import RouteTable
from lbws.config import closeWindow
from lbws.transport.tlserrors import ClientTlsFailures
from lbws.ws.server import FrontendFactory

_log = Logger()


class Relay:
    """
    All client connections of one lbws: admission, backend choice, the
    open tunnels, and draining them on stop.
    """

    def __init__(
        self, reactor, settings, pool, dialer, counters, random=None, tlsFailures=None,
        idle=None,
    ):
        """
        @param random: a C{random.Random} for the order of the closes of a
            stop (tests give a seeded one).
        @param tlsFailures: where clients' failed TLS handshakes are
            counted (a L{lbws.transport.tlserrors.ClientTlsFailures}); by
            default one logging on C{reactor}.
        @param idle: the idle plain-HTTP backend connections kept for reuse
            (a L{lbws.backends.keepalive.IdleConnections}), closed on stop;
            by default one with the settings' C{http_keepalive}.
        """
        self.reactor = reactor
        self.random = random or _random.Random()
        self.settings = settings
        self.pool = pool
        self.dialer = dialer
        self.counters = counters
        self.tlsFailures = tlsFailures or ClientTlsFailures(reactor)
        self.idle = idle or IdleConnections(
            reactor, settings.http_keepalive, settings.http_keepalive_timeout
        )
        self.tunnels = set()
        self.clients = 0  # client connections past admission, open or pending
        self.perPeer = {}  # the same, by client address (PROXY protocol's if used)
        self.opening = {}  # client protocol -> its backend attempt, until settled
        self.http = set()  # client connections speaking plain HTTP (lbws.http.httpproxy)
        self.httpPerPeer = {}  # the same, by client address, if admitted:
        self.httpOverLimit = set()  # those over max_connections_per_ip at their start
        self.stopping = False
        self._drained = None
        self._spread = None  # the SpreadClose of a stop in progress

    @property
    def settings(self):
        return self._settings

    @settings.setter
    def settings(self, settings):
        # The route table goes with the settings: new clients follow the
        # new table, open connections keep the route they were matched to.
        self._settings = settings
        self.routes = RouteTable.of(settings)

    def factory(self):
        return FrontendFactory(self)

    def openBackend(self, protocol, request, info):
        """
        Admit a client and open its backend.

        @return: Deferred firing with C{(member, RelayProtocol)} or
            failing with C{ConnectionDeny}.
        """
        refused = self._refusal(info)
        if refused is not None:
            self.counters.routes[(info.route.name, "handshakes_failed")] += 1
            return fail(refused)
        route = info.route
        self._admit(info)
        if route.balance == "hash":
            # Gradual rebalancing moves connections whose key maps elsewhere.
            info.keySource = str(route.hash_key)
            info.key = hashKeyOf(route.hash_key, info.peer, request)
        prefer = sticky.preferred(
            self.pool, route.sticky_cookie, request.headers.get("cookie"), route,
            self.settings.sticky_secret,
        )
        d = self.opening[protocol] = self.dialer.dial(
            request, info.target, info.peer, info.secure, info.key, prefer, route
        )

        def opened(result):
            self.opening.pop(protocol, None)
            self.counters.handshakes["ok"] += 1
            self.counters.routes[(route.name, "handshakes_ok")] += 1
            return result

        def failed(failure):
            self.opening.pop(protocol, None)
            self.counters.routes[(route.name, "handshakes_failed")] += 1
            if self.stopping and failure.check(CancelledError):
                # stop() gave up this attempt: tell the client why.
                raise ConnectionDeny(503, "Service Unavailable: lbws is stopping")
            return failure

        return d.addCallbacks(opened, failed)

    def _refusal(self, info):
        """
        Why a client cannot be admitted now (a C{ConnectionDeny}), or None.
        """
        if self.stopping:
            return ConnectionDeny(503, "Service Unavailable: lbws is stopping")
        if self.clients >= self.settings.max_connections:
            self.counters.handshakes["over_capacity"] += 1
            return ConnectionDeny(503, "Service Unavailable: too many connections")
        if self._overIpLimit(info.peer, 1):
            self.counters.handshakes["over_ip_limit"] += 1
            return ConnectionDeny(503, "Service Unavailable: too many connections")
        return None

    def _overIpLimit(self, peer, more):
        """
        Whether C{peer}'s WebSockets and plain HTTP connections, with
        C{more} besides, are more than C{max_connections_per_ip}.
        """
        perIp = self.settings.max_connections_per_ip
        held = self.perPeer.get(peer, 0) + self.httpPerPeer.get(peer, 0)
        return bool(perIp) and held + more > perIp

    def httpStarted(self, front):
        """
        A client connection speaks plain HTTP (an
        L{lbws.http.httpproxy.HttpFront}), until L{httpEnded}: it counts
        towards C{max_connections}, and towards C{max_connections_per_ip}
        unless its address had as many connections already (then each of
        its requests gets 503, see L{httpRefusal}, and the connections
        admitted before it keep working, as WebSockets do).
        """
        self.http.add(front)
        if self._overIpLimit(front.peer, 1):
            self.httpOverLimit.add(front)
        else:
            self.httpPerPeer[front.peer] = self.httpPerPeer.get(front.peer, 0) + 1

    def httpEnded(self, front):
        """
        A plain HTTP connection closed, or went back to the WebSocket
        handshake; a second call for it changes nothing.
        """
        if front not in self.http:
            return
        self.http.discard(front)
        if front in self.httpOverLimit:
            self.httpOverLimit.discard(front)
            return
        left = self.httpPerPeer.pop(front.peer) - 1
        if left:
            self.httpPerPeer[front.peer] = left

    def httpRefusal(self, front):
        """
        Why a plain HTTP request on C{front}'s connection gets a 503 now
        (lbws stopping, C{max_connections}, C{max_connections_per_ip}), or
        None.
        """
        if self.stopping:
            return "lbws is stopping"
        if self.clients + len(self.http) > self.settings.max_connections:
            return "too many connections"
        if front in self.httpOverLimit:
            return "too many connections from your address"
        return None

    def routeCounts(self):
        """
        Per-route counts by C{(route, what)}: those of
        L{lbws.telemetry.metrics.Counters.routes}, with the open connections
        (C{connections}) and their messages so far added.
        """
        counts = Counter(self.counters.routes)
        for tunnel in self.tunnels:
            name = tunnel.info.route.name
            counts[(name, "connections")] += 1
            counts[(name, "messages_to_backend")] += tunnel.client.messages
            counts[(name, "messages_to_client")] += tunnel.backend.messages
        return counts

    def tunnelStarted(self, tunnel):
        self.tunnels.add(tunnel)

    def tunnelAdopted(self, tunnel):
        """
        A tunnel came from another lbws (a take-over, L{lbws.ops.handoff}):
        its client counts here from now on.
        """
        self._admit(tunnel.info)
        self.tunnels.add(tunnel)

    def tunnelMoved(self, tunnel):
        """
        A tunnel went to another lbws: it ended here, but not for its
        client, so no close is counted and no access line written (the
        other process writes it when the tunnel ends).
        """
        self.tunnels.discard(tunnel)
        self.pool.leaveIfIdle(tunnel.member)
        self._checkDrained()

    def _admit(self, info):
        """
        Count a client in, in total and per address, until L{clientGone}.
        """
        peer = info.peer
        self.clients += 1
        self.perPeer[peer] = self.perPeer.get(peer, 0) + 1
        info.admitted = True

    def clientGone(self, info):
        """
        A client's connection ended (C{info} is its
        L{lbws.ws.server.ClientInfo}): it counts no more, if it was admitted.
        """
        if info.admitted:
            info.admitted = False
            peer = info.peer
            self.clients -= 1
            left = self.perPeer.pop(peer) - 1
            if left:
                self.perPeer[peer] = left

    def tunnelEnded(self, tunnel):
        self.tunnels.discard(tunnel)
        client = tunnel.client
        side, code, reason = tunnel.endedWith()
        self.counters.closes[(side, code)] += 1
        route = tunnel.info.route.name
        self.counters.routes[(route, "messages_to_backend")] += client.messages
        self.counters.routes[(route, "messages_to_client")] += tunnel.backend.messages
        info = tunnel.info
        duration = self.reactor.seconds() - tunnel.started
        backend = tunnel.backend
        # The line is built here with an f-string: Twisted's formatting of
        # a format string with a dozen fields took 37 microseconds an
        # event, the whole event now 20 (bench/README.md). The fields stay
        # structured.
        _log.info(
            "{line}",
            line=(
                f"{info.peer} {info.target} via {route}/{tunnel.member.name}:"
                f" {duration:.3f}s, {client.messages} msgs/{client.bytes} B in,"
                f" {backend.messages} msgs/{backend.bytes} B out, close {code} by {side}"
            ),
            log_format_access=True,
            peer=info.peer,
            target=info.target,
            backend=tunnel.member.name,
            route=route,
            subprotocol=info.subprotocol,
            duration=duration,
            messagesIn=client.messages,
            bytesIn=client.bytes,
            messagesOut=backend.messages,
            bytesOut=backend.bytes,
            code=code,
            reason=reason,
            side=side,
        )
        # A backend a reload removed leaves with its last connection.
        self.pool.leaveIfIdle(tunnel.member)
        self._checkDrained()

    def _checkDrained(self):
        if self._drained is not None and not self.tunnels:
            self._spread.cancel()
            d, self._drained = self._drained, None
            d.callback(None)

    def abort(self):
        """
        Cut every open connection now, without closing handshakes: a
        second stop signal does this when an operator will not wait for
        C{drain_timeout}.
        """
        self.stopping = True
        self.idle.closeAll()
        if self._spread is not None:
            self._spread.cancel()
        for tunnel in list(self.tunnels):
            tunnel.abort()

    def stop(self, timeout):
        """
        Refuse new clients and close the open ones with 1001, spread over
        the settings' C{close_spread} (at most half of C{timeout}: see
        L{lbws.config.closeWindow}) in random order, so that they do not
        all reconnect elsewhere in the same instant.

        @return: a Deferred that fires once every tunnel has ended, at most
            C{timeout} after this call plus what Twisted takes to notice
            the cut connections: a tunnel closed at second C{t} of the
            spread gets C{timeout - t} to answer.
        """
        self.stopping = True
        self.tlsFailures.flush()
        # Idle backend connections serve no one any more; those of the
        # responses still under way close after them (give refuses).
        self.idle.closeAll()
        # Clients whose handshake waits for a backend get 503 now; left to
        # finish, they would open after the drain and be cut at exit.
        for attempt in list(self.opening.values()):
            attempt.cancel()
        # Plain HTTP connections close once their response in progress is out.
        for front in list(self.http):
            front.stop()
        if not self.tunnels:
            return succeed(None)
        self._drained = Deferred()
        window = closeWindow(self.settings.close_spread, timeout)
        # Sorted first, so that a seeded random gives the same order.
        opened = sorted((t for t in self.tunnels if t.movable), key=lambda t: t.started)
        _log.info(
            "closing {count} connection(s) with 1001 over {window:g}s",
            count=len(opened),
            window=window,
        )
        self.random.shuffle(opened)
        self._spread = SpreadClose(self.reactor, opened, window, timeout)
        # Closes already under way only get the stop's deadline.
        for tunnel in [t for t in self.tunnels if not t.movable]:
            tunnel.shutdown(timeout)
        self._spread.start()
        return self._drained


class SpreadClose:
    """
    The 1001 closes of a stop, spread evenly over C{window} seconds in the
    order given: the tunnel at index C{i} of C{n} is closed at C{i *
    window / n} seconds (the first at once, the last a step before the
    window ends), so that its clients reconnect elsewhere at C{n / window}
    per second instead of all in the same instant. One timer at a time:
    each firing closes every tunnel whose time has come (a late timer
    catches up) and waits for the next.

    A tunnel closed at second C{t} gets C{timeout - t} to answer, so the
    whole stop ends within C{timeout}. A tunnel that ended by itself
    before its turn is skipped.
    """

    def __init__(self, reactor, tunnels, window, timeout):
        self._reactor = reactor
        self._tunnels = tunnels
        self._step = window / len(tunnels) if tunnels else 0.0
        self._timeout = timeout
        self._next = 0
        self._call = None
        self._started = None

    def start(self):
        self._started = self._reactor.seconds()
        self._closeDue()

    def _closeDue(self):
        self._call = None
        elapsed = self._reactor.seconds() - self._started
        tunnels = self._tunnels
        while self._next < len(tunnels) and self._next * self._step <= elapsed:
            tunnel = tunnels[self._next]
            self._next += 1
            if not tunnel.done:
                tunnel.shutdown(max(self._timeout - elapsed, 0.0))
        if self._next < len(tunnels):
            self._call = self._reactor.callLater(
                self._next * self._step - elapsed, self._closeDue
            )

    def cancel(self):
        """
        Close no more: a second stop signal cuts every tunnel at once.
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

