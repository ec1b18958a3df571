"""
One running lbws: the pieces of a configuration put together as a Twisted
service, started and stopped in the right order.

Under twistd (C{handleSignals=True}) the service owns the signals an
operator and systemd send:

  - SIGTERM or SIGINT stops: no new clients, every open one is closed with
    1001 and given up to C{drain_timeout}, then twistd exits 0. The same
    signal a second time cuts the remaining connections at once.

lbws installs these handlers itself, with C{signal.signal}, once the reactor
runs: twistd's own SIGTERM/SIGINT handlers would make it exit by re-raising
the signal instead of exiting 0, and could not tell a second signal apart.
"""

import signal

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from lbws.dashboard import dashboardSite
from lbws.dial import Dialer
from lbws.health import HealthChecker
from lbws.metrics import Counters
from lbws.pool import Pool
from lbws.relay import Relay

_log = Logger()


class LbwsService(MultiService):
    """
    The relay listening on C{listen}. On stop it first stops accepting,
    then closes every client with 1001 and waits up to C{drain_timeout}.

    @param handleSignals: install the SIGTERM and SIGINT handlers (twistd
        does; tests call L{stopService} instead).
    """

    def __init__(self, reactor, settings, handleSignals=False):
        super().__init__()
        self.reactor = reactor
        self.settings = settings
        self.handleSignals = handleSignals
        self.stopping = False
        self._stopSignalled = False
        self.counters = Counters()
        self.pool = Pool(settings)
        self.dialer = Dialer(reactor, self.pool, settings, self.counters)
        self.relay = Relay(reactor, settings, self.pool, self.dialer, self.counters)
        self.started = reactor.seconds()
        self.listener = StreamServerEndpointService(
            serverFromString(reactor, settings.listen), self.relay.factory()
        )
        # Not a child: it must stop before the relay drains, and only once.
        self.listener._raiseSynchronously = True
        self.health = HealthChecker(reactor, self.pool, settings.health)
        self.health.setServiceParent(self)
        self.dashboard = None
        if settings.dashboard:
            self.dashboard = StreamServerEndpointService(
                serverFromString(reactor, settings.dashboard), dashboardSite(self)
            )
            self.dashboard._raiseSynchronously = True
            self.dashboard.setServiceParent(self)

    def startService(self):
        super().startService()
        self.listener.startService()
        # The listening port, once bound: tests and the log want the real
        # address when the config asked for port 0.
        self.listening = self.listener._waitingForPort
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
        _log.info(
            "lbws listening on {address} with {count} backend(s)",
            address=f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}",
            listen=self.settings.listen,
            count=len(self.settings.backends),
        )
        return port

    def stopService(self):
        self.stopping = True
        d = self.listener.stopService()
        d.addCallback(lambda _: self.relay.stop(self.settings.drain_timeout))
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    # Signals (under twistd only).

    def _installSignalHandlers(self):
        for signum, handler in (
            (signal.SIGTERM, self._onStopSignal),
            (signal.SIGINT, self._onStopSignal),
        ):
            signal.signal(signum, handler)

    def _onStopSignal(self, signum, frame):
        # A signal handler may run between any two bytecodes: hand the work
        # to the reactor, as Twisted's own handlers do.
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

