"""
Counters of what the relay did, kept as plain numbers on the hot path and
turned into Prometheus metrics only when scraped.
"""

from collections import Counter

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)


class Counters:
    """
    Process-wide totals that are not per backend (those live on
    L{lbws.backends.pool.Member}).

    @ivar handshakes: client handshakes by result: C{ok}, C{no_backend}
        (503, nothing up), C{backend_failed} (502, or 504 when the last try timed out),
        C{backend_refused} (the backend answered other than 101, passed
        on), C{over_capacity} (503, max_connections or lbws out of
        resources), C{timeout} (the client did
        not finish its request in time), C{forbidden_origin} (403, see
        C{allowed_origins}), C{over_ip_limit} (503, see C{max_connections_per_ip}),
        C{no_route} (404: no [route:NAME] matched).
    @ivar closes: closes by C{(side, code)}, where side says who closed
        first: C{client}, C{backend} or C{lbws}.
    """

    def __init__(self):
        self.handshakes = Counter()
        self.closes = Counter()
        self.protocolErrors = Counter()
        # Plain HTTP requests by (backend, status class "2xx"...), backend
        # "-" for those lbws answered itself before choosing one.
        self.httpRequests = Counter()
        # Per route (README "Routes"), by (route, what): handshakes_ok,
        # handshakes_failed, and the messages of ended connections
        # (messages_to_backend, messages_to_client); open connections are
        # added when read (L{lbws.relay.Relay.routeCounts}).
        self.routes = Counter()
        # With workers = N: each worker's last snapshot (as L{WorkerCounts}),
        # by worker index, and the totals of workers that ended or started
        # over, so that no total goes back.
        self._remote = {}
        self._retired = WorkerCounts()

    def snapshot(self):
        """
        The counters as JSON for a worker's report to its parent.
        """
        return {
            "handshakes": dict(self.handshakes),
            "closes": [[side, code, n] for (side, code), n in self.closes.items()],
            "protocolErrors": [
                [side, code, n] for (side, code), n in self.protocolErrors.items()
            ],
            "httpRequests": [
                [backend, codeClass, n]
                for (backend, codeClass), n in self.httpRequests.items()
            ],
        }

    def carry(self, snapshot):
        """
        Add the counts of an lbws this one took over from (its L{snapshot}
        with C{routes}, see L{lbws.ops.handoff}): totals go on across a
        take-over.
        """
        self.handshakes.update(snapshot.get("handshakes", {}))
        for name, key in (
            ("closes", "closes"),
            ("protocolErrors", "protocolErrors"),
            ("httpRequests", "httpRequests"),
            ("routes", "routes"),
        ):
            counter = getattr(self, name)
            for *parts, n in snapshot.get(key, ()):
                counter[tuple(parts)] += n

    def fromWorker(self, index, snapshot):
        """
        Keep worker C{index}'s latest L{snapshot}, replacing its previous.
        A snapshot with a total below the previous one's comes from a new
        process under the same index: the previous one's totals are kept.
        """
        counts = WorkerCounts.fromSnapshot(snapshot)
        last = self._remote.get(index)
        if last is not None and counts.wentBack(last):
            self._retired.add(last.totals())
        self._remote[index] = counts

    def forgetWorker(self, index):
        """
        Worker C{index} ended: its open connections leave the counts, its
        totals stay.
        """
        last = self._remote.pop(index, None)
        if last is not None:
            self._retired.add(last.totals())

    def _workers(self):
        """
        The L{WorkerCounts} of the workers together: the totals of those
        running and ended, the open connections of those running.
        """
        merged = WorkerCounts()
        merged.add(self._retired)
        for counts in self._remote.values():
            merged.add(counts)
        return merged

    def httpMerged(self):
        """
        L{httpRequests} of this process and its workers together.
        """
        requests = self._workers().httpRequests
        requests.update(self.httpRequests)
        return requests

    def routesMerged(self, local):
        """
        The per-route counts C{local} of this process (see
        L{lbws.relay.Relay.routeCounts}) with those its workers reported.
        """
        routes = self._workers().routes
        routes.update(local)
        return routes

    def merged(self):
        """
        C{(handshakes, closes, protocolErrors)} of this process and its
        workers together.
        """
        workers = self._workers()
        workers.handshakes.update(self.handshakes)
        workers.closes.update(self.closes)
        workers.protocolErrors.update(self.protocolErrors)
        return workers.handshakes, workers.closes, workers.protocolErrors


class WorkerCounts:
    """
    A worker's L{Counters.snapshot} as counters, and sums of them.
    """

    # The per-route count that is not a total: the open connections.
    ROUTE_GAUGES = frozenset(["connections"])

    def __init__(self, handshakes=(), closes=(), protocolErrors=(), httpRequests=(), routes=()):
        self.handshakes = Counter(dict(handshakes))
        self.closes = Counter(dict(closes))
        self.protocolErrors = Counter(dict(protocolErrors))
        self.httpRequests = Counter(dict(httpRequests))
        self.routes = Counter(dict(routes))

    @classmethod
    def fromSnapshot(cls, snapshot):
        return cls(
            snapshot["handshakes"],
            {(side, code): n for side, code, n in snapshot["closes"]},
            {(side, code): n for side, code, n in snapshot["protocolErrors"]},
            {(b, c): n for b, c, n in snapshot.get("httpRequests", ())},
            {(r, what): n for r, what, n in snapshot.get("routes", ())},
        )

    def _counters(self):
        return (self.handshakes, self.closes, self.protocolErrors, self.httpRequests, self.routes)

    def totals(self):
        """
        These counts without the routes' open connections.
        """
        return WorkerCounts(
            *self._counters()[:4],
            {k: n for k, n in self.routes.items() if k[1] not in self.ROUTE_GAUGES},
        )

    def add(self, other):
        for mine, theirs in zip(self._counters(), other._counters()):
            mine.update(theirs)

    def wentBack(self, before):
        """
        True when a total here is below the same one in C{before}.
        """
        return any(
            mine[key] < n
            for mine, theirs in zip(self._counters(), before.totals()._counters())
            for key, n in theirs.items()
        )


# Close codes with a series of their own in lbws_closes_total: those IANA
# registered (1004 is reserved). Application codes are counted as "3xxx"
# (registered with IANA by libraries and frameworks) and "4xxx" (private),
# anything else as "other", so that clients cannot add series at will.
REGISTERED_CLOSE_CODES = frozenset(range(1000, 1016)) - {1004}


def closeLabel(code):
    """
    The C{code} label of a close code in C{lbws_closes_total}.
    """
    if code in REGISTERED_CLOSE_CODES:
        return str(code)
    if isinstance(code, int) and 3000 <= code <= 4999:
        return f"{code // 1000}xxx"
    return "other"


def closeSeries(counts):
    """
    C{{(side, label): count}} of the C{{(side, code): count}} counters.
    """
    series = Counter()
    for (side, code), count in counts.items():
        series[(side, closeLabel(code))] += count
    return series


# Upper bounds, in seconds, of the health check duration buckets.
CHECK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Durations:
    """
    A histogram of durations kept as plain numbers: how many observations
    fell at or under each bound, their sum and their count.
    """

    def __init__(self, bounds=CHECK_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds):
        self.sum += seconds
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += 1

    def buckets(self):
        """
        Cumulative C{(le, count)} pairs ending with C{+Inf}, as Prometheus
        wants them.
        """
        pairs = [(_bound(b), c) for b, c in zip(self.bounds, self.counts)]
        pairs.append(("+Inf", self.count))
        return pairs


def _bound(value):
    return repr(float(value))


class LbwsCollector:
    """
    A prometheus_client collector reading the pool and the counters of one
    lbws at scrape time, so that the relay's hot path only adds to plain
    numbers.

    @param service: the L{lbws.ops.status.StatusView} of the running lbws,
        read at each scrape (a reload may replace its members).
    """

    def __init__(self, service):
        self._service = service

    def describe(self):
        # Metric names are not registered up front: the registry of the
        # dashboard holds this collector only.
        return []

    def collect(self):
        service = self._service
        members = service.members()

        up = GaugeMetricFamily(
            "lbws_backend_up",
            "1 when the backend takes new connections (state up), else 0.",
            labels=["backend"],
        )
        state = GaugeMetricFamily(
            "lbws_backend_state",
            "1 for the backend's current state (up, down or draining).",
            labels=["backend", "state"],
        )
        weight = GaugeMetricFamily(
            "lbws_backend_weight", "Configured weight of the backend.", labels=["backend"]
        )
        effective = GaugeMetricFamily(
            "lbws_backend_effective_weight",
            "Weight new connections are balanced by: the configured weight,"
            " less while the backend ramps up during slow_start.",
            labels=["backend"],
        )
        rebalanced = CounterMetricFamily(
            "lbws_rebalanced",
            "Client connections that gradual rebalancing closed with 1012 on the"
            " backend so that they reconnect to a less loaded one.",
            labels=["backend"],
        )
        active = GaugeMetricFamily(
            "lbws_backend_connections_active",
            "Client connections open (or being opened) on the backend.",
            labels=["backend"],
        )
        idle = GaugeMetricFamily(
            "lbws_backend_idle_connections",
            "Plain HTTP connections to the backend kept idle for the next"
            " requests (http_keepalive).",
            labels=["backend"],
        )
        total = CounterMetricFamily(
            "lbws_backend_connections",
            "Client connections relayed to the backend since start.",
            labels=["backend"],
        )
        failed = CounterMetricFamily(
            "lbws_backend_connect_failures",
            "Backend connects or handshakes that failed for a client"
            " (counted as failed checks: passive ejection).",
            labels=["backend"],
        )
        messages = CounterMetricFamily(
            "lbws_messages",
            "WebSocket messages relayed, by direction"
            " (to_backend: from clients; to_client: from the backend).",
            labels=["backend", "direction"],
        )
        payload = CounterMetricFamily(
            "lbws_bytes",
            "WebSocket message payload bytes relayed, by direction.",
            labels=["backend", "direction"],
        )
        checks = CounterMetricFamily(
            "lbws_backend_checks",
            "Health check probes by result (ok, failed, timeout).",
            labels=["backend", "result"],
        )
        durations = HistogramMetricFamily(
            "lbws_backend_check_duration_seconds",
            "How long health check probes took.",
            labels=["backend"],
        )
        rtt = GaugeMetricFamily(
            "lbws_backend_check_rtt_seconds",
            "Round-trip time measured by the last successful check"
            " (websocket: ping to pong; tcp: connect; http: request to response).",
            labels=["backend"],
        )
        lastCheck = GaugeMetricFamily(
            "lbws_backend_last_check_timestamp_seconds",
            "When the backend was last checked (probe or real connect), Unix time.",
            labels=["backend"],
        )
        for member in members:
            name = member.name
            current = member.state
            up.add_metric([name], 1 if current == "up" else 0)
            for each in ("up", "down", "draining"):
                state.add_metric([name, each], 1 if current == each else 0)
            weight.add_metric([name], member.weight)
            effective.add_metric([name], service.effectiveWeight(member))
            rebalanced.add_metric([name], member.rebalanced)
            active.add_metric([name], member.count("active"))
            idle.add_metric([name], service.idleConnections(member))
            total.add_metric([name], member.count("total"))
            failed.add_metric([name], member.count("failed"))
            messages.add_metric([name, "to_backend"], member.count("messagesIn"))
            messages.add_metric([name, "to_client"], member.count("messagesOut"))
            payload.add_metric([name, "to_backend"], member.count("bytesIn"))
            payload.add_metric([name, "to_client"], member.count("bytesOut"))
            for result in ("ok", "failed", "timeout"):
                checks.add_metric([name, result], member.checks[result])
            durations.add_metric(
                [name], member.checkDurations.buckets(), member.checkDurations.sum
            )
            if member.checkRtt is not None:
                rtt.add_metric([name], member.checkRtt)
            if member.lastCheck is not None:
                lastCheck.add_metric([name], member.lastCheck)

        handshakeCounts, closeCounts, errorCounts = service.counters()
        handshakes = CounterMetricFamily(
            "lbws_handshakes",
            "Client opening handshakes by result (ok, no_route, no_backend, backend_failed,"
            " backend_refused, over_capacity, timeout, forbidden_origin).",
            labels=["result"],
        )
        for result, count in sorted(handshakeCounts.items()):
            handshakes.add_metric([result], count)
        closes = CounterMetricFamily(
            "lbws_closes",
            "Relayed connections ended, by the side that closed first"
            " (client, backend, lbws) and the close code the client saw"
            " (application codes as 3xxx and 4xxx, unregistered ones as other).",
            labels=["side", "code"],
        )
        for (side, code), count in sorted(closeSeries(closeCounts).items()):
            closes.add_metric([side, code], count)
        errors = CounterMetricFamily(
            "lbws_protocol_errors",
            "WebSocket protocol violations, by the side that broke the protocol"
            " and the close code it got.",
            labels=["side", "code"],
        )
        for (side, code), count in sorted(errorCounts.items(), key=str):
            errors.add_metric([side, str(code)], count)

        httpRequests = CounterMetricFamily(
            "lbws_http_requests",
            "Plain HTTP requests (not WebSocket) by backend and status class"
            " (2xx...); backend \"-\" for those lbws answered before choosing one.",
            labels=["backend", "code_class"],
        )
        for (backend, codeClass), count in sorted(service.httpRequests().items()):
            httpRequests.add_metric([backend, codeClass], count)

        connections = GaugeMetricFamily(
            "lbws_connections_active",
            "Client connections open (or being opened) on all backends.",
            value=sum(member.count("active") for member in members),
        )
        maxConnections = GaugeMetricFamily(
            "lbws_max_connections",
            "The max_connections setting: client connections beyond it get 503.",
            value=service.settings.max_connections,
        )
        routeConnections = GaugeMetricFamily(
            "lbws_route_connections_active",
            "Client WebSocket connections open, by the route they came by.",
            labels=["route"],
        )
        routeHandshakes = CounterMetricFamily(
            "lbws_route_handshakes",
            "Client opening handshakes past route matching, by route and"
            " result (ok, failed).",
            labels=["route", "result"],
        )
        routeMessages = CounterMetricFamily(
            "lbws_route_messages",
            "WebSocket messages relayed, by route and direction.",
            labels=["route", "direction"],
        )
        for route in service.routes():
            name = route["name"]
            routeConnections.add_metric([name], route["connections"])
            for result in ("ok", "failed"):
                routeHandshakes.add_metric([name, result], route[f"handshakes_{result}"])
            for direction in ("to_backend", "to_client"):
                routeMessages.add_metric([name, direction], route[f"messages_{direction}"])
        tlsFailures = CounterMetricFamily(
            "lbws_client_tls_failures",
            "Client connections whose TLS failed (mostly the handshake), by"
            " OpenSSL's reason; plain HTTP sent to a TLS port is counted as"
            " \"plain HTTP request (answered 400)\".",
            labels=["reason"],
        )
        for reason, count in sorted(service.clientTlsFailures().items()):
            tlsFailures.add_metric([reason], count)
        workerConnections = GaugeMetricFamily(
            "lbws_worker_connections",
            "Client connections of each worker process (workers = N), as it"
            " last reported them.",
            labels=["worker"],
        )
        workerRestarts = CounterMetricFamily(
            "lbws_worker_restarts",
            "Times a worker process (workers = N) was started again after it"
            " ended unexpectedly.",
            labels=["worker"],
        )
        for worker in service.workers():
            workerConnections.add_metric([str(worker["index"])], worker["connections"])
            workerRestarts.add_metric([str(worker["index"])], worker["restarts"])
        started = GaugeMetricFamily(
            "lbws_start_time_seconds",
            "When this lbws started, Unix time.",
            value=service.started,
        )
        return [
            up, state, weight, active, idle, total, failed, messages, payload, checks,
            durations, rtt, lastCheck, handshakes, closes, errors, connections,
            started, effective, rebalanced, maxConnections, httpRequests,
            routeConnections, routeHandshakes, routeMessages, workerConnections,
            workerRestarts, tlsFailures,
        ]


def metricsRegistry(service):
    """
    A registry of its own (not prometheus_client's global one) holding the
    collector of C{service}: what the dashboard's C{/metrics} serves.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LbwsCollector(service))
    # process_open_fds and process_max_fds, for alerts on an instance near
    # its file descriptor limit (deploy/prometheus/lbws-rules.yml).
    ProcessCollector(registry=registry)
    return registry
