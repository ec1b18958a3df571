"""
The backends lbws knows, with their state: the one place the balancer, the
health checker, the relay and the dashboard all read and update.
"""

from collections import Counter

from twisted.logger import Logger, LogLevel

from lbws.balance import STRATEGIES
from lbws.events import Events
from lbws.metrics import Durations

UP = "up"
DOWN = "down"
DRAINING = "draining"

_log = Logger()


class Member:
    """
    One backend at run time: its settings, health and traffic.

    A backend is C{draining} while an operator drained it or a reload
    removed it: it gets no new connections whatever its health, and its
    open connections stay.

    @param events: the L{lbws.events.Events} its going up and down is
        recorded in (the pool's).
    """

    def __init__(self, settings, healthy=True, events=None):
        self.settings = settings
        self.events = events if events is not None else Events()
        self.healthy = healthy
        self.drained = False
        self.removed = False
        self.active = 0
        self.total = 0
        self.failed = 0
        self.messagesIn = 0  # client to backend
        self.messagesOut = 0  # backend to client
        self.bytesIn = 0
        self.bytesOut = 0
        self.consecutiveFailures = 0
        self.consecutiveSuccesses = 0
        self.lastCheck = None
        self.lastError = ""
        self.checkRtt = None
        self.changed = None  # when health last changed (clock seconds)
        self.rebalanced = 0  # connections gradual rebalancing moved away
        # With workers = N: each worker's counts for this backend, by worker
        # index (see lbws.workers).
        self.remote = {}
        self.checks = Counter()  # health probes by result: ok, failed, timeout
        self.checkDurations = Durations()

    @property
    def name(self):
        return self.settings.name

    @property
    def weight(self):
        return self.settings.weight

    def count(self, name):
        """
        A traffic count (C{active}, C{total}, C{failed}, C{messagesIn},
        C{messagesOut}, C{bytesIn}, C{bytesOut}) of this process and its
        workers together: what the dashboard and metrics show.
        """
        return getattr(self, name) + sum(
            counts.get(name, 0) for counts in self.remote.values()
        )

    @property
    def group(self):
        """
        The [backend:NAME] a DNS-discovered member came from, else "".
        """
        return self.settings.group

    @property
    def state(self):
        if self.drained or self.removed:
            return DRAINING
        return UP if self.healthy else DOWN

    def restart(self, settings):
        """
        Take new settings (an address that moved, or a backend back after a
        removal) and start health over: not healthy until C{rise} checks
        pass, since the old results say nothing of the new address.
        """
        self.settings = settings
        self.removed = False
        self.healthy = False
        self.consecutiveFailures = 0
        self.consecutiveSuccesses = 0
        self.lastError = ""

    def recordCheck(self, ok, when, rise, fall, error="", rtt=None):
        """
        Count one check (a probe, or a real connection attempt) and move
        between up and down after C{rise} successes or C{fall} failures in a
        row.

        @return: True if this changed the backend's health.
        """
        self.lastCheck = when
        if ok:
            self.checkRtt = rtt if rtt is not None else self.checkRtt
            self.consecutiveFailures = 0
            self.consecutiveSuccesses += 1
            if not self.healthy and self.consecutiveSuccesses >= rise:
                self.healthy = True
                self.changed = when
                self.events.record("backend_up", "backend {backend} is up", backend=self.name)
                return True
        else:
            self.lastError = error
            self.consecutiveSuccesses = 0
            self.consecutiveFailures += 1
            if self.healthy and self.consecutiveFailures >= fall:
                self.healthy = False
                self.changed = when
                self.events.record("backend_down", "backend {backend} is down: {error}",
                                   LogLevel.warn, backend=self.name, error=error)
                return True
        return False


def _address(backend):
    return (backend.secure, backend.host, backend.port, backend.path)


# The share of its weight a member has when its slow start begins: not 0,
# so that even round robin and hash send it a first connection or two.
SLOW_START_FLOOR = 0.01


class Pool:
    """
    The members in configuration order and the balancing strategy.

    Backends discovered through DNS (C{srv}, or C{resolve} above 0) have no
    member of their own: L{lbws.discovery.Discovery} adds one per address
    found, named NAME/ADDRESS:PORT.

    @param clock: the reactor's C{IReactorTime}, for C{slow_start}; without
        one, members always have their full weight.
    @param events: the L{lbws.events.Events} where members going up or
        down, joining and leaving are recorded.
    """

    def __init__(self, settings, clock=None, events=None):
        self.members = {}
        self.settings = settings
        self.clock = clock
        self.events = events if events is not None else Events(clock)
        self._strategy = STRATEGIES[settings.balance]()
        for backend in settings.backends:
            if not backend.discovered:
                self.members[backend.name] = Member(backend, events=self.events)

    def update(self, settings):
        """
        Apply a reloaded configuration to the members.

          - A backend that is new (or comes back after a reload removed it)
            joins as a fresh member that is not healthy: it gets connections
            once it has passed C{rise} health checks.
          - A backend whose address changed (host, port, scheme or path)
            starts over the same way: its old health says nothing of the
            new address. A changed weight applies to the next connections.
          - A backend that is gone is marked C{removed}: it gets no new
            connections, its open ones stay, and it leaves the pool when the
            last of them ends (see L{leaveIfIdle}).

        C{self.members} is updated in place, in the new file's order, with
        members still draining after a removal at the end.
        """
        old = dict(self.members)
        members = {}
        groups = {b.name for b in settings.backends if b.discovered}
        for backend in settings.backends:
            if backend.discovered:
                # Its members stay; discovery brings them up to date.
                for name, member in old.items():
                    if member.group == backend.name:
                        members[name] = member
                continue
            member = old.get(backend.name)
            if member is None:
                member = Member(backend, healthy=False, events=self.events)
                self.events.record(
                    "enable",
                    "backend {backend} added: joins after {rise} passing check(s)",
                    source="reload",
                    backend=backend.name,
                    url=backend.url,
                    rise=settings.health.rise,
                )
            elif member.removed:
                member.restart(backend)
                self.events.record(
                    "enable",
                    "backend {backend} added back: joins after {rise} passing check(s)",
                    source="reload",
                    backend=backend.name,
                    url=backend.url,
                    rise=settings.health.rise,
                )
            elif _address(member.settings) != _address(backend):
                old_url = member.settings.url
                member.restart(backend)
                self.events.record(
                    "enable",
                    "backend {backend} moved from {old_url} to {url}: open connections"
                    " stay, new ones after {rise} passing check(s)",
                    source="reload",
                    backend=backend.name,
                    old_url=old_url,
                    url=backend.url,
                    rise=settings.health.rise,
                )
            elif member.settings != backend:
                member.settings = backend
                _log.info(
                    "backend {backend} changed: weight {weight}",
                    backend=backend.name,
                    weight=backend.weight,
                )
            members[backend.name] = member
        for name, member in old.items():
            if name in members or member.group in groups:
                continue
            if not member.removed:
                member.removed = True
                self.events.record(
                    "drain",
                    "backend {backend} removed: draining {active} open connection(s)",
                    source="reload",
                    backend=name,
                    active=member.active,
                )
            if member.active > 0:
                members[name] = member
            else:
                _log.info("backend {backend} left the pool", backend=name)
        if settings.balance != self.settings.balance:
            self._strategy = STRATEGIES[settings.balance]()
        self.settings = settings
        self.members.clear()
        self.members.update(members)

    def join(self, member):
        """
        Add a member that DNS discovery found (it is not healthy yet).
        """
        self.members[member.name] = member

    def leaveIfIdle(self, member):
        """
        A connection of C{member} ended: if a reload removed it and that
        was its last one, it leaves the pool.
        """
        if (
            member.removed
            and member.active <= 0
            and self.members.get(member.name) is member
        ):
            del self.members[member.name]
            _log.info("backend {backend} left the pool", backend=member.name)

    def __iter__(self):
        return iter(self.members.values())

    def __getitem__(self, name):
        return self.members[name]

    def choose(self, key=None, exclude=()):
        """
        The member a new connection should go to, or None if no member that
        is up and was not excluded has a weight above zero.
        """
        candidates = [
            m
            for m in self.members.values()
            if m.state == UP and m.weight > 0 and m not in exclude
        ]
        if not candidates:
            return None
        now = self.clock.seconds() if self.clock is not None else None
        weights = [self.effectiveWeight(m, now) for m in candidates]
        return self._strategy.pick(candidates, key, weights)

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
        A worker ended: its connections ended with it.
        """
        for member in self.members.values():
            member.remote.pop(index, None)

    def anyUp(self):
        return any(m.state == UP for m in self.members.values())
