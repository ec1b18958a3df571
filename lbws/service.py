"""
One running lbws: the pieces of a configuration put together as a Twisted
service, started and stopped in the right order.
"""

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
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
    """

    def __init__(self, reactor, settings):
        super().__init__()
        self.reactor = reactor
        self.settings = settings
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
        self.listening.addCallback(self._listening)

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
        d = self.listener.stopService()
        d.addCallback(lambda _: self.relay.stop(self.settings.drain_timeout))
        d.addCallback(lambda _: MultiService.stopService(self))
        return d
