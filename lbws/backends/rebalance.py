"""
Gradual rebalancing (C{rebalance = gradual}): WebSocket connections live for
hours, so after a backend recovers or joins, balancing new connections alone
leaves it nearly idle while the others keep theirs. lbws moves the surplus
instead, a few connections at a time: it closes them with 1012 (Service
Restart), the code that tells a client to reconnect, and the reconnect lands
on the lighter backend.

What counts as surplus depends on C{balance}:

  - C{least_conn} and C{round_robin}: each member that is up gets a fair
    share of the open connections on members that are up, in proportion to
    its effective weight (its weight, ramped during C{slow_start}). A
    member whose connections exceed its share by more than
    C{max(1, 10% of the share)} is overloaded; the one with the largest
    surplus gives up one connection at a time. (With C{round_robin} the
    reconnect may land anywhere, so moves converge more slowly than with
    C{least_conn}, which sends it to the lightest member.)
  - C{hash}: a connection is misplaced when its key now maps to another
    member (its own one came back, or joined); only misplaced connections
    move, and their reconnect lands where their key belongs. Clients
    without a key are never moved.

With [route:NAME] sections (README, "Routes") each route is balanced on
its own as above: over its own members, counting only its own connections
(C{tunnel.info.route}), with its own C{balance} and C{hash_key}, so that
evening out one route never moves the clients of another that shares a
backend with it. A C{least_conn} route's reconnect goes to the member with
the fewest connections of all routes, so a move is made only when it would
land elsewhere (no churn on a backend shared with a busy route).

Which connection: the oldest of the chosen member (or the oldest misplaced
one). A client moved once reconnects as the newest connection, so it is the
last to be moved again; spreading the disruption over clients this way
beats moving random ones, which could hit a client that was just moved.

Pace: at most C{rebalance_rate} connections a second, across all routes
(a move is taken from the route whose worst member is furthest over its
share relative to that share, misplaced C{hash} connections first).
Successive moves are spaced by C{1 / rebalance_rate} seconds plus a random
0-50% of that, so the rate is never exceeded, is about 80% of it on
average, and moves (and the reconnects they cause) from several lbws
instances do not fall in step.
While there is nothing to move, the balance is checked every second.

The backend side of a moved connection is closed cleanly with 1001.
Moves are counted per backend (C{Member.rebalanced}, the metric
C{lbws_rebalanced_total}, the dashboard's C{rebalanced} field).

Shedding (C{drain_mode = shed}, in [lbws] or a [route:NAME]) uses the same
pace for a backend that is draining (drained from the dashboard, removed by
a reload, gone from DNS), whatever C{rebalance} says: its connections whose
route sheds are closed with 1012, oldest first, before any rebalancing
move, and only while their route has another backend up to reconnect to
(a draining one never is: the pool chooses only backends that are up).
With C{workers = N} each worker sheds its own connections at
C{rebalance_rate / N}, so the whole lbws keeps to C{rebalance_rate}. The
start and the end of shedding a backend are events; how many connections
are left to move is on the dashboard (L{Rebalancer.shedding}).
"""

import random as _random
from collections import Counter, defaultdict, deque

from twisted.application.service import Service
from twisted.logger import Logger

from lbws.backends.balance import score
from lbws.protocol.frames import CLOSE_GOING_AWAY, CLOSE_SERVICE_RESTART
from lbws.backends.pool import DRAINING, UP

_log = Logger()

REASON = "rebalancing"
SHED_REASON = "backend draining"

# Seconds between looks at the balance while nothing needs moving.
CHECK_INTERVAL = 1.0
# The spacing of moves is 1/rate times 1 + up to this much.
JITTER = 0.5
# A member is overloaded beyond its fair share by more than this many
# connections, or this fraction of its share if that is larger.
TOLERANCE = 1.0
TOLERANCE_FRACTION = 0.10
# balance = hash: seconds between full scans for misplaced connections.
HASH_SCAN_INTERVAL = 1.0
# drain_mode = shed: seconds between full scans for connections to shed.
SHED_SCAN_INTERVAL = 1.0


def fairShares(pool, now=None, members=None, counts=None):
    """
    Each member that is up, with its open connections and its fair share
    of the open connections on members that are up (by effective weight).

    @param members: the members to balance over (a route's, see
        L{lbws.backends.pool.Pool.serving}); every member of C{pool} by default.
    @param counts: member -> its open connections to count (a route's);
        C{member.active}, all of them, by default.
    @return: a list of C{(member, active, share)}.
    """
    members = pool if members is None else members
    up = [m for m in members if m.state == UP and m.weight > 0]
    weights = [pool.effectiveWeight(m, now) for m in up]
    active = [m.active if counts is None else counts.get(m, 0) for m in up]
    total = sum(active)
    weightSum = sum(weights)
    if not up or weightSum <= 0:
        return []
    return [(m, n, total * w / weightSum) for m, n, w in zip(up, active, weights)]


def tolerance(share):
    return max(TOLERANCE, TOLERANCE_FRACTION * share)


def overload(pool, now=None, closing=None, moving=False, members=None, counts=None):
    """
    The member to move a connection off and how far over its share it is
    (its surplus divided by its share), or None when the spread is even
    enough.

    Moving starts when some member is over or under its fair share by more
    than its tolerance, and then goes on (C{moving}) until no member is a
    whole connection under its share: the member with the largest surplus
    (at least one connection over its share) gives one up each time. So
    small imbalances cause no churn, and a started rebalancing ends even.

    @param closing: member -> connections already being moved off it,
        not counted as its own any more.
    @param members: see L{fairShares}.
    @param counts: see L{fairShares}.
    @return: C{(member, relative surplus)} or None.
    """
    closing = closing or {}
    uneven = False
    short = False
    worst, worstSurplus, worstShare = None, 0.0, 0.0
    for member, active, share in fairShares(pool, now, members, counts):
        surplus = active - closing.get(member, 0) - share
        if abs(surplus) > tolerance(share):
            uneven = True
        if surplus <= -1:
            short = True
        if surplus >= 1 and surplus > worstSurplus:
            worst, worstSurplus, worstShare = member, surplus, share
    if worst is not None and (uneven or (moving and short)):
        return worst, worstSurplus / worstShare if worstShare > 0 else float("inf")
    return None


def mostOverloaded(pool, now=None, closing=None, moving=False):
    """
    The member of the whole pool to move a connection off, or None (see
    L{overload}).
    """
    found = overload(pool, now, closing, moving)
    return None if found is None else found[0]


def placement(pool, key, now=None, route=None):
    """
    The member C{key} maps to now under rendezvous hashing among the
    members of C{route} (every member without one), or None.
    """
    best, bestScore = None, None
    for member in pool.serving(route):
        if member.state != UP or member.weight <= 0:
            continue
        value = score(key, member, pool.effectiveWeight(member, now))
        if bestScore is None or value > bestScore:
            best, bestScore = member, value
    return best


class Rebalancer(Service):
    """
    Moves surplus connections of a relay at a bounded, jittered rate.

    The settings are the relay's (C{relay.settings}), read at every step,
    so a reload that turns rebalancing on or off or changes the rate
    applies within a second.

    @param random: a C{random.Random} for the jitter (tests give a seeded
        one).
    @param reports: with C{workers = N}, in the parent: called with no
        arguments, the workers' shedding as C{(left, moved)} Counters by
        backend name (L{lbws.workers.Workers.shedding}), added to this
        process's own in L{shedding}.
    @param record: whether the start and end of shedding are recorded in
        the pool's events: not in a worker, whose parent records them for
        all its workers.
    @ivar shedMoved: connections moved off each backend (by name) by
        shedding, in this process.
    """

    name = "rebalance"

    def __init__(self, reactor, relay, pool, random=None, reports=None, record=True):
        self.reactor = reactor
        self.relay = relay
        self.pool = pool
        self.random = random or _random.Random()
        self.moved = 0
        self.shedMoved = Counter()
        self._reports = reports
        self._record = record
        self._shedQueue = deque()
        self._shedScanned = None
        self._watched = None
        # Backends being shed, by name: (when it started, moved by then).
        self._shedding = {}
        # Connections moved off each backend (by name) when its last
        # shedding ended.
        self._shedBefore = {}
        self._call = None
        self._closing = set()
        self._misplacedTunnels = []
        self._scanned = None
        # The routes (None: the whole pool) where a rebalancing started
        # and is not over yet.
        self._moving = set()
        self._burst = Counter()  # connections moved off each backend since it started
        self._burstStarted = None

    def startService(self):
        super().startService()
        self._schedule(CHECK_INTERVAL)

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._burstEnded()

    def _schedule(self, delay):
        self._call = self.reactor.callLater(delay, self._tick)

    def _tick(self):
        self._call = None
        moved = False
        try:
            if not self.relay.stopping:
                self._watchShedding()
                moved = self.step()
            if not moved:
                self._burstEnded()
        except Exception:
            _log.failure("rebalancing failed")
        if self.running:
            self._schedule(self.nextDelay() if moved else CHECK_INTERVAL)

    def nextDelay(self):
        """
        Seconds until the next move may happen: C{1 / rebalance_rate}
        plus jitter; with C{workers = N}, N times that, since each worker
        moves its own connections.
        """
        settings = self.relay.settings
        period = settings.workers / settings.rebalance_rate
        return period * (1.0 + JITTER * self.random.random())

    def step(self):
        """
        Move one connection: off a draining backend that sheds, else, with
        C{rebalance = gradual}, if the spread calls for it.

        With [route:NAME] sections each route is balanced on its own (its
        members, its own open connections, its C{balance} and
        C{hash_key}); the rate stays one move per step across them all.
        Misplaced connections of C{balance = hash} routes move first, then
        the surplus of the route whose worst member is furthest over its
        share, relative to that share.

        @return: True if a connection was moved.
        """
        now = self.reactor.seconds()
        tunnel = self._nextShed(now)
        if tunnel is not None:
            self.shed(tunnel)
            return True
        if self.relay.settings.rebalance != "gradual":
            return False
        self._closing = {t for t in self._closing if not t.done}
        routes = self.relay.settings.routes
        if routes:
            hashed = {r.name: r for r in routes if r.balance == "hash"}
            tunnel = self._nextMisplaced(now, hashed) if hashed else None
            if tunnel is None:
                tunnel = self._nextSurplus(now, [r for r in routes if r.balance != "hash"])
        elif self.relay.settings.balance == "hash":
            tunnel = self._nextMisplaced(now)
        else:
            tunnel = self._nextSurplus(now)
        if tunnel is None:
            return False
        self.move(tunnel)
        return True

    def _nextSurplus(self, now, routes=None):
        """
        The oldest movable connection of the most overloaded member.

        @param routes: the routes to balance, each over its own members
            and counting only its own connections (by C{info.route}); or
            None: the whole pool, counting C{member.active}.
        """
        counts = defaultdict(Counter)  # route name -> member -> tunnels
        closing = defaultdict(Counter)
        oldest = {}  # (route name, member) -> tunnel
        for tunnel in self.relay.tunnels:
            name = None if routes is None else tunnel.info.route.name
            member = tunnel.member
            counts[name][member] += 1
            if tunnel in self._closing:
                closing[name][member] += 1
            elif tunnel.movable:
                current = oldest.get((name, member))
                if current is None or tunnel.started < current.started:
                    oldest[(name, member)] = tunnel
        best = None
        moving = set()
        for route in (None,) if routes is None else routes:
            name = None if route is None else route.name
            found = overload(
                self.pool,
                now,
                closing[name],
                name in self._moving,
                self.pool.serving(route),
                None if route is None else counts[name],
            )
            if found is None:
                continue
            moving.add(name)
            if route is not None and not self._reconnectLeaves(route, found[0], now):
                continue
            if best is None or found[1] > best[0]:
                best = (found[1], name, found[0])
        self._moving = moving
        if best is None:
            return None
        return oldest.get(best[1:])

    def _reconnectLeaves(self, route, member, now):
        """
        Whether a connection moved off C{member} would reconnect to another
        member of C{route}. With C{least_conn} it goes to the member with
        the fewest open connections of all routes per weight (README,
        "Routes": counts stay per backend), which for a backend shared
        with another route may be C{member} again although the route's own
        spread is uneven: moving then would only churn.
        """
        if route.balance != "least_conn":
            return True
        after = (member.active - 1) / self.pool.effectiveWeight(member, now)
        return any(
            other is not member
            and other.state == UP
            and other.weight > 0
            and other.active / self.pool.effectiveWeight(other, now) < after
            for other in self.pool.serving(route)
        )

    def _hashRoute(self, tunnel, routes):
        """
        The route whose placement C{tunnel} follows and its hash_key, or
        None if it has none (its route was removed or is not hashed).
        """
        if routes is None:
            return None, str(self.relay.settings.hash_key)
        route = routes.get(tunnel.info.route.name)
        if route is None:
            return None
        return route, str(route.hash_key)

    def _misplaced(self, tunnel, routes, now):
        """
        Whether C{tunnel}'s key maps to another member of its route now.
        """
        found = self._hashRoute(tunnel, routes)
        if found is None:
            return False
        route, hashKey = found
        if tunnel.member.state != UP:
            # Down or draining: its connections stay (drain_mode decides).
            return False
        key = getattr(tunnel.info, "key", None)
        if key is None or getattr(tunnel.info, "keySource", None) != hashKey:
            return False
        return placement(self.pool, key, now, route) is not tunnel.member

    def _nextMisplaced(self, now, routes=None):
        """
        The oldest connection whose key maps elsewhere now.

        @param routes: route name -> route, those with C{balance = hash};
            or None: the whole pool with the [lbws] hash_key.
        """
        if self._scanned is None or now - self._scanned >= HASH_SCAN_INTERVAL:
            self._scanned = now
            found = [t for t in self.relay.tunnels if self._misplaced(t, routes, now)]
            found.sort(key=lambda t: t.started)
            self._misplacedTunnels = found
        while self._misplacedTunnels:
            tunnel = self._misplacedTunnels.pop(0)
            if (
                tunnel in self.relay.tunnels
                and tunnel not in self._closing
                and tunnel.movable
                and self._misplaced(tunnel, routes, now)
            ):
                return tunnel
        return None

    # drain_mode = shed

    def _routes(self):
        """
        The routes running now by name (the implicit one without
        [route:NAME] sections): a connection sheds by its route's
        C{drain_mode} as it is now, so that a reload that sets it applies
        to the connections already open.
        """
        settings = self.relay.settings
        return {r.name: r for r in settings.routes or (settings.implicitRoute(),)}

    def _sheds(self, tunnel, routes):
        """
        Whether C{tunnel} is to be moved off its backend: the backend is
        draining, its route sheds (by the [lbws] C{drain_mode} if the route
        is gone), and nobody started to close it.
        """
        if tunnel.member.state != DRAINING or not tunnel.movable:
            return False
        route = routes.get(tunnel.info.route.name)
        mode = self.relay.settings.drain_mode if route is None else route.drain_mode
        return mode == "shed"

    def _hasPlace(self, tunnel, routes):
        """
        Whether C{tunnel}'s client would find another backend of its route
        up to reconnect to (never a draining one).
        """
        route = routes.get(tunnel.info.route.name, tunnel.info.route)
        return any(
            m is not tunnel.member and m.state == UP and m.weight > 0
            for m in self.pool.serving(route)
        )

    def _draining(self):
        return any(m.state == DRAINING for m in self.pool)

    def _nextShed(self, now):
        """
        The oldest connection to shed whose client has somewhere to go, or
        None. The connections are scanned at most every
        L{SHED_SCAN_INTERVAL} (not at every move), oldest first; each is
        checked again when its turn comes.
        """
        if not self._draining():
            self._shedQueue.clear()
            return None
        routes = self._routes()
        if self._shedScanned is None or now - self._shedScanned >= SHED_SCAN_INTERVAL:
            self._shedScanned = now
            found = [t for t in self.relay.tunnels if self._sheds(t, routes)]
            found.sort(key=lambda t: t.started)
            self._shedQueue = deque(found)
        while self._shedQueue:
            tunnel = self._shedQueue.popleft()
            if (
                tunnel in self.relay.tunnels
                and self._sheds(tunnel, routes)
                and self._hasPlace(tunnel, routes)
            ):
                return tunnel
        return None

    def shed(self, tunnel):
        """
        Move a connection off its draining backend: 1012 to the client so
        that it reconnects (to a backend that is up), and a clean 1001 to
        the backend.
        """
        member = tunnel.member
        if self._record and member.name not in self._shedding:
            # Before the first move, so that the timeline shows the start
            # first whenever the next look comes.
            self._shedStarted(member.name, *self.shedding())
        self.shedMoved[member.name] += 1
        _log.info(
            "draining: moving {peer} off backend {backend} ({age:.0f}s old)",
            peer=tunnel.info.peer,
            backend=member.name,
            age=self.reactor.seconds() - tunnel.started,
        )
        tunnel.close(
            CLOSE_SERVICE_RESTART,
            CLOSE_GOING_AWAY,
            SHED_REASON,
            "lbws",
            backendReason="client moved off a draining backend",
        )

    def leftToMove(self):
        """
        This process's connections still to be shed, by backend name.
        """
        if not self._draining():
            return Counter()
        routes = self._routes()
        return Counter(t.member.name for t in self.relay.tunnels if self._sheds(t, routes))

    def shedding(self):
        """
        Shedding in this lbws (with its workers' reports): C{(left,
        moved)}, Counters by backend name of the connections still to move
        off draining backends and of those moved so far.
        """
        left, moved = self.leftToMove(), Counter(self.shedMoved)
        if self._reports is not None:
            otherLeft, otherMoved = self._reports()
            left.update(otherLeft)
            moved.update(otherMoved)
        return left, moved

    def _watchShedding(self):
        """
        At most twice a second: an event when a backend starts to be shed
        (it has connections left to move, here or in a worker) and one
        when it ends (none left: all moved, or gone by themselves, or the
        backend is back in rotation).
        """
        now = self.reactor.seconds()
        if not self._record or (
            self._watched is not None and now - self._watched < CHECK_INTERVAL / 2
        ):
            return
        self._watched = now
        left, moved = self.shedding()
        for name, count in sorted(left.items()):
            if count > 0 and name not in self._shedding:
                self._shedStarted(name, left, moved)
        record = self.pool.events.record
        for name in [n for n in self._shedding if not left.get(n)]:
            started, before = self._shedding.pop(name)
            self._shedBefore[name] = moved[name]
            member = self.pool.members.get(name)
            back = member is not None and member.state != DRAINING
            record(
                "shed",
                "shedding backend {backend} ended: {moved} connection(s) moved in {seconds:.1f}s"
                + ("; it is back in rotation" if back else ""),
                phase="end",
                backend=name,
                moved=moved[name] - before,
                seconds=now - started,
                back=back,
            )

    def _shedStarted(self, name, left, moved):
        """
        Shedding backend C{name} starts: C{left} and C{moved} as
        L{shedding} gives them. The connections moved since the last time
        it was shed (by a worker, before this parent saw it) count in.
        """
        before = self._shedBefore.get(name, 0)
        self._shedding[name] = (self.reactor.seconds(), before)
        self.pool.events.record(
            "shed",
            "shedding backend {backend}: moving {count} connection(s) off at up to {rate:g}/s",
            phase="start",
            backend=name,
            count=left[name] + moved[name] - before,
            rate=self.relay.settings.rebalance_rate,
        )

    def _burstEnded(self):
        """
        Nothing more to move: one event says how many connections this
        burst of moves took off which backends, and over how long.
        """
        if not self._burst:
            return
        self.pool.events.record(
            "rebalance",
            "rebalancing moved {moved} connection(s) in {seconds:.1f}s ({detail})",
            moved=sum(self._burst.values()),
            seconds=self.reactor.seconds() - self._burstStarted,
            backends=dict(self._burst),
            detail=", ".join(f"{n} off {name}" for name, n in self._burst.items()),
        )
        self._burst.clear()
        self._burstStarted = None

    def move(self, tunnel):
        """
        Close the client with 1012 so that it reconnects elsewhere, and its
        backend connection cleanly.
        """
        member = tunnel.member
        self._closing.add(tunnel)
        member.traffic.moved()
        self.moved += 1
        self._burst[member.name] += 1
        if self._burstStarted is None:
            self._burstStarted = self.reactor.seconds()
        _log.info(
            "rebalancing: moving {peer} off backend {backend}"
            " ({active} open there, {age:.0f}s old)",
            peer=tunnel.info.peer,
            backend=member.name,
            active=member.active,
            age=self.reactor.seconds() - tunnel.started,
        )
        tunnel.close(
            CLOSE_SERVICE_RESTART,
            CLOSE_GOING_AWAY,
            REASON,
            "lbws",
            backendReason=f"client moved by {REASON}",
        )
