"""
One running lbws: the pieces of a configuration put together as a Twisted
service, started, reloaded and stopped in the right order.

Under twistd (C{handleSignals=True}) the service owns the signals an
operator and systemd send:

  - SIGHUP reloads the config file (L{LbwsService.reload}).
  - SIGTERM or SIGINT stops: no new clients, every open one is closed with
    1001 and given up to C{drain_timeout}, then twistd exits 0. The same
    signal a second time cuts the remaining connections at once.

lbws installs these handlers itself, with C{signal.signal}, once the reactor
runs: twistd's own SIGTERM/SIGINT handlers would make it exit by re-raising
the signal instead of exiting 0, and could not tell a second signal apart.
"""

import signal

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel

from lbws.config import SECTION_MAIN, ConfigError, loadConfig
from lbws.dashboard import dashboardSite
from lbws.dial import Dialer
from lbws.discovery import Discovery
from lbws.events import Events
from lbws.health import HealthChecker
from lbws.history import HistorySampler
from lbws.listen import listenEndpoint
from lbws.metrics import Counters
from lbws.pool import Pool
from lbws.rebalance import Rebalancer
from lbws.relay import Relay
from lbws.workers import Workers

_log = Logger()


class LbwsService(MultiService):
    """
    The relay listening on C{listen}. On stop it first stops accepting,
    then closes every client with 1001 and waits up to C{drain_timeout}.

    @param handleSignals: install the SIGHUP, SIGTERM and SIGINT handlers
        (twistd does; tests call L{reload} and L{stopService} instead).
    @param notifier: an L{lbws.systemd.Notifier} told about readiness,
        reloads and stopping, or None.
    @param resolver: the twisted.names resolver of DNS discovery (tests
        give one asking their own server); by default the system's.
    """

    # Settings that a reload cannot change: they are bound at start-up.
    RESTART_ONLY = ("listen", "dashboard", "workers")

    def __init__(
        self, reactor, settings, handleSignals=False, notifier=None, resolver=None
    ):
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.handleSignals = handleSignals
        self.notifier = notifier
        self.stopping = False
        self._stopSignalled = False
        self.counters = Counters()
        self.events = Events(reactor)
        self.pool = Pool(settings, reactor, self.events)
        self.dialer = Dialer(reactor, self.pool, settings, self.counters)
        self.relay = Relay(reactor, settings, self.pool, self.dialer, self.counters)
        self.started = reactor.seconds()
        self.listener = StreamServerEndpointService(
            listenEndpoint(reactor, settings.listen), self.relay.factory()
        )
        # Not a child: it must stop before the relay drains, and only once.
        self.listener._raiseSynchronously = True
        self.health = HealthChecker(reactor, self.pool, settings.health)
        self.health.setServiceParent(self)
        self.discovery = Discovery(reactor, self.pool, self.health, resolver)
        self.discovery.setServiceParent(self)
        self.rebalancer = Rebalancer(reactor, self.relay, self.pool)
        self.rebalancer.setServiceParent(self)
        self.history = HistorySampler(reactor, self.pool, self.counters)
        self.history.setServiceParent(self)
        self.dashboard = None
        if settings.dashboard:
            self.dashboard = StreamServerEndpointService(
                listenEndpoint(reactor, settings.dashboard), dashboardSite(self)
            )
            self.dashboard._raiseSynchronously = True
            self.dashboard.setServiceParent(self)
        # Not a child either: workers are told to drain when the listener
        # stops, beside this process's own drain.
        self.workers = None
        if settings.workers > 1:
            self.workers = Workers(reactor, self, settings.workers)

    def startService(self):
        super().startService()
        self.listener.startService()
        # The listening port, once bound: tests and the log want the real
        # address when the config asked for port 0.
        self.listening = self.listener._waitingForPort
        if self.workers is not None:
            self.workers.startService()
        self.dashboardListening = (
            self.dashboard._waitingForPort if self.dashboard is not None else None
        )
        if self.handleSignals:
            self.listening.addCallback(self._whenRunning)
        self.listening.addCallback(self._listening)

    def _whenRunning(self, port):
        """
        Install the signal handlers once the reactor runs (twistd starts
        services before, and the reactor installs its own handlers as it
        starts), and only then say lbws is ready: from then on SIGTERM
        drains and exits 0.
        """
        d = Deferred()

        def running():
            self._installSignalHandlers()
            d.callback(port)

        self.reactor.callWhenRunning(running)
        return d

    def _listening(self, port):
        address = port.getHost()
        address = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
        _log.info(
            "lbws listening on {address} with {count} backend(s)",
            address=address,
            listen=self.settings.listen,
            count=len(self.settings.backends),
        )
        if self.notifier is not None:
            self.notifier.ready(f"listening on {address}")
        return port

    def reload(self):
        """
        Read the config file again and apply it to new connections.

        Added backends join the pool once they pass their health checks,
        removed ones drain (their open connections stay), and every other
        setting (weights, limits, timeouts, balancing, health) applies to
        the connections opened from now on. No open connection is touched.

        A file that does not load, or that changes C{listen} or
        C{dashboard} (bound at start-up: they need a restart), is refused
        as a whole with a logged error naming the file, section and key;
        the running configuration stays.

        @return: True if the new configuration is running, else False.
        """
        path = self.settings.path
        if self.stopping:
            self.events.record("reload", "reload of {path} ignored: lbws is stopping",
                               LogLevel.warn, accepted=False, path=path)
            return False
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            settings = loadConfig(path)
            for key in self.RESTART_ONLY:
                before, after = getattr(self.settings, key), getattr(settings, key)
                if before != after:
                    raise ConfigError(
                        path,
                        SECTION_MAIN,
                        key,
                        f"changed from {before!r} to {after!r}: a reload cannot"
                        f" change {key}, restart lbws for that",
                    )
        except ConfigError as e:
            self.events.record(
                "reload",
                "reload refused, running config kept: {error}",
                LogLevel.error,
                accepted=False,
                error=str(e),
                path=e.path,
                section=e.section,
                key=e.key,
                problem=e.problem,
            )
            if self.notifier is not None:
                self.notifier.ready(f"reload refused, running config kept: {e}")
            return False
        before = self.settings
        self.settings = settings
        self.pool.update(settings)
        # DNS-discovered members follow their changed [backend:NAME] sections.
        self.discovery.sync(settings)
        # Checks start for added members (which join after `rise` of them)
        # and stop for removed ones; new [health] settings restart them all.
        self.health.sync(settings.health)
        self.dialer.settings = settings
        self.relay.settings = settings
        if self.workers is not None:
            self.workers.reloaded()
        self.events.record(
            "reload",
            "reloaded {path}: {count} backend(s)",
            accepted=True,
            path=path,
            count=len(settings.backends),
            changed=sorted(_changedKeys(before, settings)),
        )
        if self.notifier is not None:
            self.notifier.ready(f"reloaded {path}")
        return True

    def stopService(self):
        self.stopping = True
        self.events.record(
            "stop", "lbws stopping: {count} open connection(s) get up to {timeout:g}s",
            count=sum(m.count("active") for m in self.pool), timeout=self.settings.drain_timeout)
        if self.notifier is not None:
            self.notifier.stopping()
        workersStopped = (
            self.workers.stopService() if self.workers is not None else None
        )
        d = self.listener.stopService()
        d.addCallback(lambda _: self.relay.stop(self.settings.drain_timeout))
        if workersStopped is not None:
            d.addCallback(lambda _: workersStopped)
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    # Signals (under twistd only).

    def _installSignalHandlers(self):
        for signum, handler in (
            (signal.SIGHUP, self._onHangup),
            (signal.SIGTERM, self._onStopSignal),
            (signal.SIGINT, self._onStopSignal),
        ):
            signal.signal(signum, handler)

    def _onHangup(self, signum, frame):
        # A signal handler may run between any two bytecodes: hand the work
        # to the reactor, as Twisted's own handlers do.
        self.reactor.callFromThread(self._hangup)

    def _hangup(self):
        _log.info("received SIGHUP: reloading {path}", path=self.settings.path)
        self.reload()

    def _onStopSignal(self, signum, frame):
        self.reactor.callFromThread(self._stopSignal, signal.Signals(signum).name)

    def _stopSignal(self, name):
        if not (self._stopSignalled or self.stopping):
            self._stopSignalled = True
            _log.info(
                "received {signal}: stopping; open connections get up to"
                " {timeout:g}s (send {signal} again to close them at once)",
                signal=name,
                timeout=self.settings.drain_timeout,
            )
            self.reactor.stop()
        else:
            _log.warn(
                "received {signal} again: closing {count} connection(s) now",
                signal=name,
                count=len(self.relay.tunnels),
            )
            self.relay.abort()
            if self.workers is not None:
                self.workers.abort()


def _changedKeys(before, after):
    """
    The names of the settings that differ, for the reload log.
    """
    return {
        field.name
        for field in attrs.fields(type(before))
        if getattr(before, field.name) != getattr(after, field.name)
    }
