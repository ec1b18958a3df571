"""
What the dashboard and C{/metrics} may read of a running lbws, and nothing
more: a narrow view, so that they depend on these few questions instead of
on how the service is put together.
"""

from collections import Counter


class StatusView:
    """
    Read-only answers about one lbws, taken at the moment they are asked (a
    reload replaces the settings and members they come from).

    @ivar reactor: the reactor, for the dashboard's site and the clock.
    @ivar started: when lbws started, on the reactor's clock.
    @ivar history: the L{lbws.ops.history.HistorySampler}, or None (a worker).
    """

    def __init__(
        self, reactor, core, started, isStopping, workers=None, history=None, shedding=None
    ):
        """
        @param core: the L{lbws.core.Core} of this process.
        @param history: the L{lbws.ops.history.HistorySampler}, or None.
        @param shedding: called with no arguments, C{(left, moved)} by
            backend name of C{drain_mode = shed}
            (L{lbws.backends.rebalance.Rebalancer.shedding}); None: nothing
            is shed.
        @param isStopping: called with no arguments: True once lbws is
            stopping (during C{stop_delay} too).
        @param workers: the L{lbws.workers.Workers} of C{workers = N}, or
            None.
        """
        self.reactor = reactor
        self.started = started
        self._core = core
        self._isStopping = isStopping
        self._workers = workers
        self._shedding = shedding
        self.history = history

    @property
    def settings(self):
        """
        The configuration running now.
        """
        return self._core.settings

    @property
    def stopping(self):
        return self._isStopping()

    @property
    def events(self):
        """
        The L{lbws.telemetry.events.Events} log of this process.
        """
        return self._core.events

    def seconds(self):
        return self.reactor.seconds()

    def members(self):
        """
        The backends (pool members), in the pool's order.
        """
        return list(self._core.pool)

    def member(self, name):
        """
        The member named C{name}, or None.
        """
        return self._core.pool.members.get(name)

    def effectiveWeight(self, member, now=None):
        return self._core.pool.effectiveWeight(member, now)

    def idleConnections(self, member):
        """
        The idle plain-HTTP connections kept open to C{member} for reuse,
        of this process and (with C{workers = N}) as its workers last
        reported them.
        """
        reported = sum(counts.get("idle", 0) for counts in member.traffic.remote.values())
        return self._core.idle.count(member) + reported

    def anyUp(self):
        """
        True when at least one backend takes new connections.
        """
        return self._core.pool.anyUp()

    def counters(self):
        """
        C{(handshakes, closes, protocolErrors)} of this process and its
        workers together (see L{lbws.telemetry.metrics.Counters.merged}).
        """
        return self._core.counters.merged()

    def httpRequests(self):
        """
        Plain HTTP requests by C{(backend, status class)}, of this process
        and its workers together.
        """
        return self._core.counters.httpMerged()

    def routes(self):
        """
        The routes in match order (the implicit one without [route:NAME]
        sections), each with its match, its backends' members and its
        counts, of this process and its workers together.
        """
        core = self._core
        counts = core.counters.routesMerged(core.relay.routeCounts())
        routes = []
        for route in core.relay.routes.routes:
            name = route.name
            routes.append(
                {
                    "name": name,
                    "implicit": core.relay.routes.implicit,
                    "host": route.host,
                    "path": route.path,
                    "subprotocol": route.subprotocol,
                    "strip_prefix": route.strip_prefix,
                    "balance": route.balance,
                    "backends": [m.name for m in core.pool.serving(route)],
                    "connections": counts[(name, "connections")],
                    "handshakes_ok": counts[(name, "handshakes_ok")],
                    "handshakes_failed": counts[(name, "handshakes_failed")],
                    "messages_to_backend": counts[(name, "messages_to_backend")],
                    "messages_to_client": counts[(name, "messages_to_client")],
                }
            )
        return routes

    def shedding(self):
        """
        Connections still to move off draining backends and those moved so
        far (C{drain_mode = shed}), by backend name: two Counters, of this
        process and its workers together.
        """
        if self._shedding is None:
            return Counter(), Counter()
        return self._shedding()

    def clientTlsFailures(self):
        """
        Clients' failed TLS handshakes since start, by reason, of this
        process and its workers together.
        """
        return dict(self._core.relay.tlsFailures.totals)

    def workers(self):
        """
        The worker processes running now (see
        L{lbws.workers.Workers.workers}); empty without workers.
        """
        if self._workers is None:
            return []
        return self._workers.workers()
