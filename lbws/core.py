"""
The core of one relaying process: the backend pool, the dialer that opens
backends, the relay that admits clients, and the counters they add to.

L{buildCore} is the one place these are built and wired, for the single
lbws process and for each worker of C{workers = N} alike, and L{Core.apply}
is the one path a new configuration takes into them.
"""

from lbws.backends.dial import Dialer
from lbws.backends.keepalive import IdleConnections
from lbws.telemetry.events import Events
from lbws.telemetry.metrics import Counters
from lbws.backends.pool import Pool
from lbws.relay import Relay
from lbws.transport.tlserrors import ClientTlsFailures


class Core:
    """
    What relays clients in one process.

    @ivar settings: the configuration running now (replaced by L{apply}).
    @ivar pool: the backends (L{lbws.backends.pool.Pool}).
    @ivar relay: admission and the open tunnels (L{lbws.relay.Relay}).
    @ivar idle: the idle plain-HTTP backend connections kept for reuse
        (L{lbws.backends.keepalive.IdleConnections}), also C{relay.idle}.
    @ivar counters: process-wide totals (L{lbws.telemetry.metrics.Counters}).
    @ivar events: what happened, for the dashboard (L{lbws.telemetry.events.Events}).
    """

    def __init__(self, reactor, settings, counters, events, pool, dialer, relay):
        self.reactor = reactor
        self.idle = relay.idle
        self.settings = settings
        self.counters = counters
        self.events = events
        self.pool = pool
        self.dialer = dialer
        self.relay = relay

    def factory(self):
        """
        The protocol factory for the client-facing endpoint.
        """
        return self.relay.factory()

    def apply(self, settings):
        """
        Run with C{settings} from now on: added backends join the pool,
        removed ones drain, and every other setting applies to the
        connections opened from now on. Open connections are not touched.
        """
        self.settings = settings
        self.pool.update(settings)
        self.idle.configure(settings.http_keepalive, settings.http_keepalive_timeout)
        self.dialer.settings = settings
        self.relay.settings = settings


def buildCore(reactor, settings, worker=False):
    """
    The core for C{settings}, its parts wired to each other.

    @param worker: True in a worker process of C{workers = N}: its parent
        logs what happens to the backends (the worker's own events are not
        logged: each would be logged N + 1 times), and the clients' failed
        TLS handshakes the worker counts go to its parent in its reports.
    """
    counters = Counters()
    events = Events(reactor, quiet=worker)
    pool = Pool(settings, reactor, events)
    dialer = Dialer(reactor, pool, settings, counters)
    tlsFailures = ClientTlsFailures(reactor, log=not worker)
    idle = IdleConnections(reactor, settings.http_keepalive, settings.http_keepalive_timeout)
    # A drained, removed or down member's idle connections close at once.
    pool.unavailable.append(idle.forget)
    relay = Relay(
        reactor, settings, pool, dialer, counters, tlsFailures=tlsFailures, idle=idle
    )
    return Core(reactor, settings, counters, events, pool, dialer, relay)
