"""
The backends lbws knows, with their state. Each member's state has one
owner per part (L{Health}, L{Admin}, L{Traffic}) that changes it through
its methods; the balancer, the health checker, the relay and the dashboard
read it through L{Member}'s properties. Which members there are is the
L{Pool}'s: reloads and DNS discovery go through its one reconcile.
"""

from collections import Counter
from types import MappingProxyType

from twisted.logger import LogLevel

from lbws.backends.balance import STRATEGIES
from lbws.telemetry.events import Events
from lbws.telemetry.metrics import Durations

UP = "up"
DOWN = "down"
DRAINING = "draining"


class Health:
    """
    A member's health, changed only by the checks recorded here: the
    health probes' and the relay's passive ones (a failed real connection),
    or in a worker process by the parent's verdict (L{follow}).
    """

    def __init__(self, healthy):
        self._healthy = healthy
        self._changed = None  # when health last changed (clock seconds)
        self._failures = 0
        self._successes = 0
        self._lastCheck = None
        self._lastError = ""
        self._rtt = None
        self._checks = Counter()  # health probes by result: ok, failed, timeout
        self._durations = Durations()

    healthy = property(lambda self: self._healthy)
    changed = property(lambda self: self._changed)
    consecutiveFailures = property(lambda self: self._failures)
    consecutiveSuccesses = property(lambda self: self._successes)
    lastCheck = property(lambda self: self._lastCheck)
    lastError = property(lambda self: self._lastError)
    checkRtt = property(lambda self: self._rtt)

    @property
    def checks(self):
        return MappingProxyType(self._checks)

    @property
    def checkDurations(self):
        return self._durations

    def record(self, ok, when, rise, fall, error="", rtt=None):
        """
        Count one check (a probe, or a real connection attempt) and move
        between up and down after C{rise} successes or C{fall} failures in a
        row.

        @return: True if this changed the backend's health.
        """
        self._lastCheck = when
        if ok:
            self._rtt = rtt if rtt is not None else self._rtt
            self._failures = 0
            self._successes += 1
            if not self._healthy and self._successes >= rise:
                self._healthy = True
                self._changed = when
                return True
        else:
            self._lastError = error
            self._successes = 0
            self._failures += 1
            if self._healthy and self._failures >= fall:
                self._healthy = False
                self._changed = when
                return True
        return False

    def probed(self, result, duration):
        """
        A health probe ended with C{result} (ok, failed or timeout) after
        C{duration} seconds: for the metrics.
        """
        self._checks[result] += 1
        self._durations.observe(duration)

    def restart(self):
        """
        Start over: not healthy until C{rise} checks pass.
        """
        self._healthy = False
        self._failures = 0
        self._successes = 0
        self._lastError = ""

    def follow(self, healthy, changed):
        """
        A worker process takes its parent's verdict (see L{lbws.workers}).
        """
        self._healthy = healthy
        self._changed = changed


class Admin:
    """
    What the operator decided of a member: C{drained} from the dashboard,
    C{removed} by a reload or DNS discovery. Either keeps new connections
    away while the open ones stay.
    """

    def __init__(self):
        self._drained = False
        self._removed = False

    drained = property(lambda self: self._drained)
    removed = property(lambda self: self._removed)

    def drain(self, drained=True):
        self._drained = drained

    def remove(self, removed=True):
        self._removed = removed


class Connection:
    """
    One backend connection of a member, from the moment lbws starts opening
    it: it counts in the member's C{active} until L{close}, which every
    exit path may call (only the first call counts).
    """

    def __init__(self, traffic):
        self._traffic = traffic
        self._open = True
        self._established = False

    @property
    def open(self):
        return self._open

    def established(self):
        """
        The backend accepted the WebSocket: count it in C{total}.
        """
        if self._open and not self._established:
            self._established = True
            self._traffic._total += 1

    def close(self):
        if self._open:
            self._open = False
            self._traffic._active -= 1


class Traffic:
    """
    A member's traffic counters. The open connection count changes only
    through L{opened} and the L{Connection} it returns, so no exit path can
    leak one.
    """

    COUNTS = ("active", "total", "failed", "messagesIn", "messagesOut", "bytesIn", "bytesOut")
    # The counts that only grow (all but the open connections).
    TOTALS = COUNTS[1:]

    def __init__(self):
        self._active = 0
        self._total = 0
        self._failed = 0
        self._messagesIn = 0  # client to backend
        self._messagesOut = 0  # backend to client
        self._bytesIn = 0
        self._bytesOut = 0
        self._rebalanced = 0  # connections gradual rebalancing moved away
        # With workers = N: each worker's counts for this backend, by worker
        # index (see lbws.workers), and what workers that ended (or started
        # over) had counted, so that totals never go back.
        self._remote = {}
        self._retired = Counter()

    active = property(lambda self: self._active)
    total = property(lambda self: self._total)
    failed = property(lambda self: self._failed)
    messagesIn = property(lambda self: self._messagesIn)
    messagesOut = property(lambda self: self._messagesOut)
    bytesIn = property(lambda self: self._bytesIn)
    bytesOut = property(lambda self: self._bytesOut)
    rebalanced = property(lambda self: self._rebalanced)

    @property
    def remote(self):
        return MappingProxyType(self._remote)

    def opened(self):
        """
        A connection to this member is being opened.

        @return: its L{Connection}; closing it ends its count.
        """
        self._active += 1
        return Connection(self)

    def failure(self):
        """
        A connection attempt failed through the backend's fault.
        """
        self._failed += 1

    def message(self, toBackend, size, count=1):
        """
        Count C{count} messages of C{size} bytes in all (a relay counts
        the messages of one read at once).
        """
        if toBackend:
            self._messagesIn += count
            self._bytesIn += size
        else:
            self._messagesOut += count
            self._bytesOut += size

    def moved(self):
        """
        Gradual rebalancing moved one of its connections away.
        """
        self._rebalanced += 1

    def carry(self, counts):
        """
        Add the counts of the lbws this one took over from (its L{own}):
        all but C{active}, which the moved connections count here as they
        come (L{opened}).
        """
        self._total += counts.get("total", 0)
        self._failed += counts.get("failed", 0)
        self._messagesIn += counts.get("messagesIn", 0)
        self._messagesOut += counts.get("messagesOut", 0)
        self._bytesIn += counts.get("bytesIn", 0)
        self._bytesOut += counts.get("bytesOut", 0)

    def own(self):
        """
        This process's own counts, by name: what a worker reports.
        """
        return {name: getattr(self, name) for name in self.COUNTS}

    def report(self, index, counts):
        """
        Worker C{index} reported its counts for this member. Counts lower
        than its last report's are a new start (a new process, or the
        member new in it): the last report's totals are kept.
        """
        last = self._remote.get(index)
        if last is not None and any(counts.get(n, 0) < last.get(n, 0) for n in self.TOTALS):
            self._retire(last)
        self._remote[index] = counts

    def forget(self, index):
        """
        Worker C{index} ended, or no longer has this member: its open
        connections are gone, its totals stay.
        """
        last = self._remote.pop(index, None)
        if last is not None:
            self._retire(last)

    def _retire(self, counts):
        for name in self.TOTALS:
            self._retired[name] += counts.get(name, 0)

    def count(self, name):
        """
        A traffic count of this process and its workers together (those
        running, and for totals those that ended): what the dashboard and
        metrics show.
        """
        return (
            getattr(self, name)
            + self._retired[name]
            + sum(counts.get(name, 0) for counts in self._remote.values())
        )


class Member:
    """
    One backend at run time: its settings, and three pieces of state with
    one owner each: L{Health} (the checks), L{Admin} (the operator's and
    reloads' decisions) and L{Traffic} (the connections and counters).
    Other modules read them through the properties here and change them
    only through the owners' methods.

    A backend is C{draining} while an operator drained it or a reload
    removed it: it gets no new connections whatever its health, and its
    open connections stay.

    @param events: the L{lbws.telemetry.events.Events} its going up and down is
        recorded in (the pool's).
    @param unavailable: called with the member after each change that
        leaves it taking no new connections (down, drained, removed, or
        starting over at a new address): what it kept for new ones, such
        as idle keep-alive connections (L{lbws.backends.keepalive}), goes.
    """

    def __init__(self, settings, healthy=True, events=None, unavailable=None):
        self._events = events if events is not None else Events()
        self._unavailable = unavailable
        self._settings = settings
        self._health = Health(healthy)
        self._admin = Admin()
        self._traffic = Traffic()

    health = property(lambda self: self._health)
    admin = property(lambda self: self._admin)
    traffic = property(lambda self: self._traffic)
    settings = property(lambda self: self._settings)
    name = property(lambda self: self._settings.name)
    weight = property(lambda self: self._settings.weight)

    @property
    def group(self):
        """
        The [backend:NAME] a DNS-discovered member came from, else "".
        """
        return self._settings.group

    # Read-only views for the balancer, the dashboard and the metrics.
    healthy = property(lambda self: self.health.healthy)
    changed = property(lambda self: self.health.changed)
    consecutiveFailures = property(lambda self: self.health.consecutiveFailures)
    lastCheck = property(lambda self: self.health.lastCheck)
    lastError = property(lambda self: self.health.lastError)
    checkRtt = property(lambda self: self.health.checkRtt)
    checks = property(lambda self: self.health.checks)
    checkDurations = property(lambda self: self.health.checkDurations)
    drained = property(lambda self: self.admin.drained)
    removed = property(lambda self: self.admin.removed)
    active = property(lambda self: self.traffic.active)
    total = property(lambda self: self.traffic.total)
    failed = property(lambda self: self.traffic.failed)
    messagesIn = property(lambda self: self.traffic.messagesIn)
    messagesOut = property(lambda self: self.traffic.messagesOut)
    bytesIn = property(lambda self: self.traffic.bytesIn)
    bytesOut = property(lambda self: self.traffic.bytesOut)
    rebalanced = property(lambda self: self.traffic.rebalanced)

    def count(self, name):
        return self.traffic.count(name)

    @property
    def inUse(self):
        """
        Whether connections to this member may be open: its own, or with
        C{workers = N} in the parent, a worker still reports the member (a
        worker lets a removed backend go with its last connection, and
        its last report may be older than its newest connections).
        """
        return self.traffic.active > 0 or bool(self.traffic.remote)

    @property
    def state(self):
        if self.drained or self.removed:
            return DRAINING
        return UP if self.healthy else DOWN

    def opened(self):
        """
        See L{Traffic.opened}.
        """
        return self.traffic.opened()

    def recordCheck(self, ok, when, rise, fall, error="", rtt=None):
        """
        See L{Health.record}; a change of health is an event.
        """
        changed = self.health.record(ok, when, rise, fall, error, rtt)
        if changed:
            self._changed()
        if changed and self.healthy:
            self._events.record("backend_up", "backend {backend} is up", backend=self.name)
        elif changed:
            self._events.record(
                "backend_down",
                "backend {backend} is down: {error}",
                LogLevel.warn,
                backend=self.name,
                error=error,
            )
        return changed

    def connectionFailed(self, why, when, health):
        """
        A real connection to this backend failed through the backend's
        fault (connect error, timeout, reset, malformed answer): counted,
        and a failed check (passive ejection, as nginx's C{max_fails}).

        @param health: the C{[health]} settings (C{rise}, C{fall}).
        """
        self.traffic.failure()
        return self.recordCheck(False, when, health.rise, health.fall, why)

    def connectionSucceeded(self, when, health):
        """
        A real connection reached this backend's application (it accepted
        the WebSocket, or answered): a down backend is up again at once,
        without waiting for C{rise} probes (see L{Pool.choose}: with no
        member of a route up, real connections are tried anyway).

        @param health: the C{[health]} settings (C{fall}).
        """
        if not self.healthy:
            self.recordCheck(True, when, 1, health.fall)

    def follow(self, healthy, drained, changed):
        """
        A worker takes its parent's state of this member.
        """
        self.health.follow(healthy, changed)
        self.admin.drain(drained)
        self._changed()

    def drain(self, drained=True):
        """
        The operator drained the member (or enabled it again, C{drained}
        False): see L{Admin.drain}.
        """
        self.admin.drain(drained)
        self._changed()

    def remove(self):
        """
        A reload or DNS discovery removed the member: see L{Admin.remove}.
        """
        self.admin.remove()
        self._changed()

    def _changed(self):
        if self._unavailable is not None and self.state != UP:
            self._unavailable(self)

    def _configure(self, settings):
        self._settings = settings

    def _restart(self, settings):
        """
        Take new settings (an address that moved, or a backend back after a
        removal) and start health over: the old results say nothing of the
        new address.
        """
        self._settings = settings
        self.admin.remove(False)
        self.health.restart()
        self._changed()


def _address(backend):
    return (backend.secure, backend.host, backend.port, backend.path)


# What a reload, and DNS discovery, record when members join, return or go.
_RELOADED = {
    "source": "reload",
    "added": "backend {backend} added: joins after {rise} passing check(s)",
    "back": "backend {backend} added back: joins after {rise} passing check(s)",
    "removed": "backend {backend} removed: draining {active} open connection(s)",
}
_DISCOVERED = {
    "source": "dns",
    "added": "backend {backend} found by DNS: joins after {rise} passing check(s)",
    "back": "backend {backend} is back in DNS: joins after {rise} passing check(s)",
    "removed": "backend {backend} is gone from DNS: draining {active} open connection(s)",
}

# The share of its weight a member has when its slow start begins: not 0,
# so that even round robin and hash send it a first connection or two.
SLOW_START_FLOOR = 0.01


class Pool:
    """
    The members in configuration order and the balancing strategy.

    Backends discovered through DNS (C{srv}, or C{resolve} above 0) have no
    member of their own: L{lbws.backends.discovery.Discovery} adds one per address
    found, named NAME/ADDRESS:PORT.

    @param clock: the reactor's C{IReactorTime}, for C{slow_start}; without
        one, members always have their full weight.
    @param events: the L{lbws.telemetry.events.Events} where members joining,
        leaving and changing health are recorded.
    """

    def __init__(self, settings, clock=None, events=None):
        self.members = {}
        self.settings = settings
        self.clock = clock
        # Called with a member each time it stops taking new connections
        # (see Member's unavailable).
        self.unavailable = []
        self.events = events if events is not None else Events(clock)
        self._strategy = STRATEGIES[settings.balance]()
        # True in the supervisor of workers = N (lbws.workers): the open
        # connections are the workers', so a removed member stays until
        # their reports say it is idle (see leaveIfIdle).
        self.countedByWorkers = False
        # Each [route:NAME]'s own strategy, by route name and balance: the
        # balancing state of one route does not move another's.
        self._routeStrategies = {}
        for backend in settings.backends:
            if not backend.discovered:
                self.members[backend.name] = self._member(backend, True)

    def _member(self, backend, healthy):
        return Member(backend, healthy, self.events, self._unavailableNow)

    def _unavailableNow(self, member):
        for listener in self.unavailable:
            listener(member)

    def update(self, settings):
        """
        Apply a reloaded configuration to the members (see L{_reconcile}).
        Members of DNS discovery templates stay (discovery brings them up
        to date, L{updateGroup}); those of a template that is gone drain.

        C{self.members} is updated in place, in the new file's order, with
        members still draining after a removal at the end.
        """
        groups = {b.name for b in settings.backends if b.discovered}
        wanted = {b.name: b for b in settings.backends if not b.discovered}
        scope = {n: m for n, m in self.members.items() if m.group not in groups}
        kept = self._reconcile(wanted, scope, settings.health.rise, _RELOADED)
        members = {}
        for backend in settings.backends:
            if backend.discovered:
                for name, member in self.members.items():
                    if member.group == backend.name:
                        members[name] = member
            else:
                members[backend.name] = kept[backend.name]
        for name, member in kept.items():
            members.setdefault(name, member)
        if settings.balance != self.settings.balance:
            self._strategy = STRATEGIES[settings.balance]()
        kept = {(r.name, r.balance) for r in settings.routes}
        for key in list(self._routeStrategies):
            if key not in kept:
                del self._routeStrategies[key]
        self.settings = settings
        self.members.clear()
        self.members.update(members)

    def updateGroup(self, group, wanted):
        """
        DNS discovery found the members C{wanted} (name to settings) for
        the template C{group}: make the pool's members of it match (see
        L{_reconcile}).
        """
        scope = {n: m for n, m in self.members.items() if m.group == group}
        kept = self._reconcile(wanted, scope, self.settings.health.rise, _DISCOVERED)
        for name in scope:
            if name not in kept:
                del self.members[name]
        for name, member in kept.items():
            self.members.setdefault(name, member)

    def _reconcile(self, wanted, current, rise, words):
        """
        Make the members C{current} (name to member) match C{wanted} (name
        to settings):

          - A backend that is new (or comes back after it was removed)
            joins as a fresh member that is not healthy: it gets
            connections once it has passed C{rise} health checks.
          - A backend whose address changed (host, port, scheme or path)
            starts over the same way: its old health says nothing of the
            new address. Other changes (weight, ca, verify) apply to the
            next connections.
          - A backend that is gone is marked C{removed}: it gets no new
            connections, its open ones stay, and it leaves the pool when the
            last of them ends (see L{leaveIfIdle}).

        @param words: the events' source and texts.
        @return: the members to keep, name to member: the wanted ones in
            their order, then the removed ones still draining.
        """
        kept = {}
        record = self.events.record
        source = words["source"]
        for name, backend in wanted.items():
            member = current.get(name)
            if member is None:
                member = self._member(backend, False)
                record("enable", words["added"], source=source, backend=name,
                       group=backend.group, url=backend.url, rise=rise)
            elif member.removed:
                member._restart(backend)
                record("enable", words["back"], source=source, backend=name,
                       group=backend.group, url=backend.url, rise=rise)
            elif _address(member.settings) != _address(backend):
                oldUrl = member.settings.url
                member._restart(backend)
                record(
                    "enable",
                    "backend {backend} moved from {old_url} to {url}: open connections"
                    " stay, new ones after {rise} passing check(s)",
                    source=source,
                    backend=name,
                    old_url=oldUrl,
                    url=backend.url,
                    rise=rise,
                )
            elif member.settings != backend:
                member._configure(backend)
                self.events.note(
                    "backend {backend} changed: weight {weight}", backend=name, weight=backend.weight
                )
            kept[name] = member
        for name, member in current.items():
            if name in kept:
                continue
            active = member.count("active")
            if not member.removed:
                member.remove()
                record("drain", words["removed"], source=source, backend=name,
                       group=member.group, active=active)
            if member.inUse or self.countedByWorkers:
                kept[name] = member
            else:
                self.events.note("backend {backend} left the pool", backend=name)
        return kept

    def leaveIfIdle(self, member, reportsCurrent=False):
        """
        A connection of C{member} ended (or, with workers, their reports
        came): if it was removed and that was its last one, it leaves the
        pool.

        @param reportsCurrent: every worker reported under the settings
            running now (L{lbws.workers.Workers}), so a member they report
            with no open connection is idle; otherwise a member any worker
            still reports may have connections newer than that report
            (L{Member.inUse}).
        """
        idle = member.count("active") <= 0 if reportsCurrent else not member.inUse
        if (
            member.removed
            and idle
            and self.members.get(member.name) is member
        ):
            del self.members[member.name]
            self.events.note("backend {backend} left the pool", backend=member.name)

    def __iter__(self):
        return iter(self.members.values())

    def __getitem__(self, name):
        return self.members[name]

    def serving(self, route=None):
        """
        The members of C{route} (a L{lbws.config.RouteSettings}): those of
        the backends it names, a DNS template's members with it. Without a
        route, or for the implicit one (no C{backends}), every member.
        """
        if route is None or route.backends is None:
            return self.members.values()
        names = route.backends
        return [m for m in self.members.values() if m.name in names or m.group in names]

    def choose(self, key=None, exclude=(), route=None):
        """
        The member of C{route} (all members without one) a new connection
        should go to, or None if no member that was not excluded has a
        weight above zero.

        Members that are up come first. When none of the route is up, the
        down ones are tried all the same (Envoy's panic threshold, nginx
        with one server): a real connect is the best probe, and its first
        success marks the member up (L{Member.connectionSucceeded}), so a
        backend that restarts is served again within one connect of its
        return instead of C{rise} x C{interval} later. Drained and removed
        members never are.
        """
        serving = [m for m in self.serving(route) if m.weight > 0 and m not in exclude]
        candidates = [m for m in serving if m.state == UP]
        if not candidates and not any(m.state == UP for m in self.serving(route)):
            candidates = [m for m in serving if m.state == DOWN]
        if not candidates:
            return None
        now = self.clock.seconds() if self.clock is not None else None
        weights = [self.effectiveWeight(m, now) for m in candidates]
        return self._strategyOf(route).pick(candidates, key, weights)

    def _strategyOf(self, route):
        if route is None or route.backends is None:
            return self._strategy
        key = (route.name, route.balance)
        strategy = self._routeStrategies.get(key)
        if strategy is None:
            strategy = self._routeStrategies[key] = STRATEGIES[route.balance]()
        return strategy

    def effectiveWeight(self, member, now=None):
        """
        The weight new connections are balanced by: the configured weight,
        or while the member is in its C{slow_start} (it came up after a
        health check or joined after a reload or DNS discovery, less than
        C{slow_start} seconds ago) a part of it growing linearly from
        L{SLOW_START_FLOOR} to all of it.
        """
        weight = member.weight
        slow = self.settings.slow_start
        since = member.changed if member.healthy else None
        if not slow or since is None or weight <= 0:
            return weight
        if now is None:
            if self.clock is None:
                return weight
            now = self.clock.seconds()
        ramp = (now - since) / slow
        if ramp >= 1:
            return weight
        return weight * max(ramp, SLOW_START_FLOOR)

    def forgetWorker(self, index):
        """
        A worker ended: its connections ended with it, its totals stay.
        """
        for member in self.members.values():
            member.traffic.forget(index)

    def anyUp(self):
        return any(m.state == UP for m in self.members.values())
