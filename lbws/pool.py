"""
The backends lbws knows, with their state: the one place the balancer, the
health checker, the relay and the dashboard all read and update.
"""

from collections import Counter

from twisted.logger import Logger

from lbws.balance import STRATEGIES
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
    """

    def __init__(self, settings, healthy=True):
        self.settings = settings
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
        self.checks = Counter()  # health probes by result: ok, failed, timeout
        self.checkDurations = Durations()

    @property
    def name(self):
        return self.settings.name

    @property
    def weight(self):
        return self.settings.weight

    @property
    def state(self):
        if self.drained or self.removed:
            return DRAINING
        return UP if self.healthy else DOWN

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
                _log.info("backend {backend} is up", backend=self.name)
                return True
        else:
            self.lastError = error
            self.consecutiveSuccesses = 0
            self.consecutiveFailures += 1
            if self.healthy and self.consecutiveFailures >= fall:
                self.healthy = False
                self.changed = when
                _log.warn("backend {backend} is down: {why}", backend=self.name, why=error)
                return True
        return False


class Pool:
    """
    The members in configuration order and the balancing strategy.
    """

    def __init__(self, settings):
        self.members = {}
        self.settings = settings
        self._strategy = STRATEGIES[settings.balance]()
        for backend in settings.backends:
            self.members[backend.name] = Member(backend)

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
        return self._strategy.pick(candidates, key)

    def anyUp(self):
        return any(m.state == UP for m in self.members.values())
