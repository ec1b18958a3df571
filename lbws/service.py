"""
One running lbws as a Twisted service: a L{MultiService} of small services
around one L{lbws.core.Core}, in the shape of magic-wormhole's mailbox
server (C{server_tap.makeService}).

L{makeLbws} composes it. Its children, in start order:

  - L{lbws.ops.signals.Signals} (under twistd): SIGHUP, SIGTERM, SIGINT;
  - the health checker, DNS discovery and the rebalancer;
  - the dashboard's L{lbws.transport.listen.Listener}, reading a
    L{lbws.ops.status.StatusView};
  - L{Frontend}: the clients' listener (and the worker processes of
    C{workers = N}), which drains on stop;
  - L{Announcer}: the "listening" log line and systemd's READY/STOPPING;
  - with C{handoff_socket}, L{lbws.ops.handoff.HandoffServer}, which hands
    this lbws to a process started with C{--take-over} (and, in that
    process, a L{lbws.ops.handoff.TakeOver} comes first).

L{LbwsService} stops them one after another in the reverse order, each once
the one before has stopped: first systemd hears STOPPING, then the frontend
waits C{stop_delay} (still accepting, while C{/healthz} already answers
503), stops accepting and drains, and only then the dashboard and health
checks stop.

A reload (SIGHUP, C{POST /reload}) takes one path: L{LbwsService.reload}
reads the file, L{lbws.config.checkReload} refuses what needs a restart,
and L{LbwsService.apply} hands the settings to each part that follows them.
"""

import os

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger, LogLevel

from lbws import compat
from lbws.config import ConfigError, checkReload, closeWindow, loadConfig
from lbws.backends.backend import warnUnverified
from lbws.core import buildCore
from lbws.ops.dashboard import dashboardSite
from lbws.backends.discovery import Discovery
from lbws.backends.health import HealthChecker
from lbws.ops.handoff import HandoffServer
from lbws.ops.history import HistorySampler
from lbws.transport.listen import Listener, listenEndpoint
from lbws.backends.rebalance import Rebalancer
from lbws.ops.signals import Signals
from lbws.ops.status import StatusView
from lbws.workers import Workers

_log = Logger()


class Frontend(Service):
    """
    Where clients come in: the C{listen} endpoint, and with C{workers = N}
    the worker processes accepting on its socket.

    Stopping it drains: it keeps accepting for C{stop_delay} seconds (so an
    outer L4 balancer sees C{/healthz} fail and stops sending clients
    first), then stops accepting and closes every client with 1001, spread
    over C{close_spread} (see L{lbws.relay.Relay.stop}), giving them up to
    C{drain_timeout} in all. L{cut} ends that at once.
    """

    def __init__(self, reactor, core, listener, workers=None):
        self._reactor = reactor
        self._core = core
        self.listener = listener
        self.workers = workers
        self._delay = None
        # A take-over moved the listener to a new lbws (lbws.ops.handoff):
        # nobody comes here any more, so stopping does not wait stop_delay.
        self.handedOver = False

    def startService(self):
        super().startService()
        self.listener.startService()
        if self.workers is not None:
            self.workers.startService()

    def stopService(self):
        super().stopService()
        delay = 0 if self.handedOver else self._core.settings.stop_delay
        if delay > 0:
            # Still accepting meanwhile; cut() cancels the wait.
            self._delay = Deferred(lambda _: call.cancel())
            call = self._reactor.callLater(delay, self._delay.callback, None)
            d = self._delay.addErrback(lambda failure: failure.trap(CancelledError))
        else:
            d = succeed(None)
        return d.addCallback(lambda _: self._drain())

    def _drain(self):
        stopping = [maybeDeferred(self.listener.stopService)]
        if self.workers is not None:
            stopping.append(self.workers.stopService())
        return DeferredList(stopping, consumeErrors=True).addCallback(self._stopped)

    def _stopped(self, results):
        for ok, result in results:
            if not ok:
                _log.failure("lbws: could not stop accepting", result)
        # No new client can come now: close the open ones.
        return self._core.relay.stop(self._core.settings.drain_timeout)

    def cut(self):
        """
        Cut every open connection now, without closing handshakes, and
        skip what is left of C{stop_delay}.
        """
        self._core.relay.abort()
        if self.workers is not None:
            self.workers.abort()
        if self._delay is not None and not self._delay.called:
            self._delay.cancel()


class Announcer(Service):
    """
    Says what lbws is doing to the log and to systemd: ready once it listens
    and the reactor runs (so that signal handlers are in place by then),
    reloading, stopping.

    @param notifier: an L{lbws.ops.systemd.Notifier}, or None.
    """

    def __init__(self, reactor, core, listener, notifier=None, mainPid=None):
        self._reactor = reactor
        self._core = core
        self._listener = listener
        self._notifier = notifier
        # A process taking over (--take-over) becomes the service's main
        # process: systemd hears MAINPID= with READY=1.
        self._mainPid = mainPid

    def startService(self):
        super().startService()
        self._listener.whenListening().addCallback(
            lambda port: self._reactor.callWhenRunning(self._listening, port)
        )

    def _listening(self, port):
        address = port.getHost()
        address = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
        settings = self._core.settings
        _log.info(
            "lbws listening on {address} with {count} backend(s)",
            address=address,
            listen=settings.listen,
            count=len(settings.backends),
        )
        self._ready(f"listening on {address}")

    def _ready(self, status):
        if self._notifier is not None:
            if self._mainPid is None:
                self._notifier.ready(status)
            else:
                self._notifier.ready(status, self._mainPid)

    def handedOver(self):
        """
        Another process took this lbws over and is the service's main
        process now: this one's stop is no news for systemd.
        """
        self._notifier = None

    def reloading(self):
        if self._notifier is not None:
            self._notifier.reloading()

    def reloaded(self, status):
        self._ready(status)

    def stopService(self):
        super().stopService()
        if self._notifier is not None:
            self._notifier.stopping()


class LbwsService(MultiService):
    """
    One lbws: built by L{makeLbws}, whose children it stops in reverse
    order, one after another.

    @ivar core: the L{lbws.core.Core}.
    @ivar view: the L{lbws.ops.status.StatusView} the dashboard reads.
    @ivar listener: the clients' L{lbws.transport.listen.Listener}; its
        C{whenListening()} gives the bound port.
    @ivar dashboard: the dashboard's L{lbws.transport.listen.Listener}, or None.
    @ivar health: the L{lbws.backends.health.HealthChecker}.
    @ivar discovery: the L{lbws.backends.discovery.Discovery}.
    @ivar rebalancer: the L{lbws.backends.rebalance.Rebalancer}.
    @ivar history: the L{lbws.ops.history.HistorySampler}.
    """

    def __init__(self, reactor, core):
        super().__init__()
        self.reactor = reactor
        self.core = core
        self.stopping = False
        # Called with the new settings after the core's apply (see apply).
        self.followers = []
        self.view = None
        self.health = self.discovery = self.rebalancer = self.history = None
        self.frontend = None
        self.announcer = None
        self.dashboard = None
        self.handoff = None

    # The core's parts, for tests and tools that look inside.

    @property
    def settings(self):
        return self.core.settings

    @property
    def pool(self):
        return self.core.pool

    @property
    def relay(self):
        return self.core.relay

    @property
    def counters(self):
        return self.core.counters

    @property
    def dialer(self):
        return self.core.dialer

    @property
    def events(self):
        return self.core.events

    @property
    def listener(self):
        return self.frontend.listener

    def startService(self):
        compat.lazyAutobahnDebugFormatting()
        compat.plainIoDispatch()
        _logNotes(self.settings)
        warnUnverified(self.settings)
        super().startService()

    def stopService(self):
        """
        Stop the children in reverse order, each once the one before has
        stopped (see the module's docstring).
        """
        self.stopping = True
        settings = self.settings
        self.events.record(
            "stop",
            "lbws stopping: {count} open connection(s) get 1001 over {spread:g}s"
            " after {delay:g}s, up to {timeout:g}s in all",
            count=sum(m.count("active") for m in self.pool),
            delay=settings.stop_delay,
            spread=closeWindow(settings.close_spread, settings.drain_timeout),
            timeout=settings.drain_timeout,
        )
        Service.stopService(self)
        d = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(lambda _, child=child: child.stopService())
        return d

    def reload(self):
        """
        Read the config file again and L{apply} it.

        A file that does not load, or that changes what needs a restart
        (L{lbws.config.checkReload}), is refused as a whole with a logged
        error naming the file, section and key; the running configuration
        stays.

        @return: True if the new configuration is running, else False.
        """
        path = self.settings.path
        if self.stopping:
            self.events.record(
                "reload",
                "reload of {path} ignored: lbws is stopping",
                LogLevel.warn,
                accepted=False,
                path=path,
            )
            return False
        self.announcer.reloading()
        try:
            settings = loadConfig(path)
            checkReload(self.settings, settings)
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
            self.announcer.reloaded(f"reload refused, running config kept: {e}")
            return False
        before = self.settings
        _logNotes(settings)
        self.apply(settings)
        self.events.record(
            "reload",
            "reloaded {path}: {count} backend(s)",
            accepted=True,
            path=path,
            count=len(settings.backends),
            changed=sorted(_changedKeys(before, settings)),
        )
        self.announcer.reloaded(f"reloaded {path}")
        return True

    def apply(self, settings):
        """
        The only path new settings take: into the core (pool, dialer,
        relay), then to each follower in turn (DNS discovery, health
        checks, worker processes).
        """
        self.core.apply(settings)
        warnUnverified(settings)
        for follow in self.followers:
            follow(settings)

    def stopBySignal(self, name):
        """
        The first SIGTERM or SIGINT: stop, as twistd does on its own.
        """
        settings = self.settings
        _log.info(
            "received {signal}: stopping; /healthz answers 503 now, clients are"
            " still accepted for {delay:g}s, then open connections get 1001"
            " spread over {spread:g}s and up to {timeout:g}s in all (send"
            " {signal} again to close them at once)",
            signal=name,
            delay=settings.stop_delay,
            spread=closeWindow(settings.close_spread, settings.drain_timeout),
            timeout=settings.drain_timeout,
        )
        self.reactor.stop()

    def cutBySignal(self, name):
        """
        A stop signal while stopping: cut every connection now.
        """
        _log.warn(
            "received {signal} again: closing {count} connection(s) now",
            signal=name,
            count=len(self.relay.tunnels),
        )
        self.frontend.cut()


def _logNotes(settings):
    """
    Tell the file's author what its valid settings still say in an older
    way (L{lbws.config.Settings.notes}).
    """
    for note in settings.notes:
        _log.warn("config {note}", note=note)


def makeLbws(
    reactor, settings, handleSignals=False, notifier=None, resolver=None, takeOver=None
):
    """
    Compose one lbws for C{settings}.

    @param handleSignals: install the SIGHUP, SIGTERM and SIGINT handlers
        (twistd does; tests call C{reload} and C{stopService} instead).
    @param notifier: an L{lbws.ops.systemd.Notifier} told about readiness,
        reloads and stopping, or None.
    @param resolver: the twisted.names resolver of DNS discovery (tests
        give one asking their own server); by default the system's.
    @param takeOver: an L{lbws.ops.handoff.TakeOver}: take the listeners
        and tunnels of the running lbws instead of listening.
    @return: an L{LbwsService}, not started.
    """
    core = buildCore(reactor, settings)
    service = LbwsService(reactor, core)
    if takeOver is None:

        def endpointFor(name, description):
            return listenEndpoint(reactor, description)

    else:
        # First child: it reaches the running lbws before anything listens.
        takeOver.service = service
        takeOver.setServiceParent(service)
        endpointFor = takeOver.endpoint
    if handleSignals:
        Signals(
            reactor,
            reload=service.reload,
            stop=service.stopBySignal,
            cut=service.cutBySignal,
            isStopping=lambda: service.stopping,
        ).setServiceParent(service)
    listener = Listener(endpointFor("listen", settings.listen), core.factory(), settings.listen)
    workers = None
    if settings.workers > 1:
        workers = Workers(reactor, core, listener, settings.workers)
    health = service.health = HealthChecker(reactor, core.pool, settings.health)
    discovery = service.discovery = Discovery(reactor, core.pool, health, resolver)
    # With workers, they shed their own connections and report it.
    service.rebalancer = Rebalancer(
        reactor, core.relay, core.pool, reports=None if workers is None else workers.shedding
    )
    service.history = HistorySampler(reactor, core.pool, core.counters)
    for child in (health, discovery, service.rebalancer, service.history):
        child.setServiceParent(service)
    # DNS-discovered members follow their changed [backend:NAME] sections;
    # then checks start for added members (which join after `rise` of
    # them) and stop for removed ones.
    service.followers += [discovery.sync, lambda settings: health.sync(settings.health)]
    # A reload serves a renewed certificate to new clients.
    service.followers.append(lambda settings: listener.renewCertificate())
    if workers is not None:
        service.followers.append(workers.apply)
    view = StatusView(
        reactor,
        core,
        reactor.seconds(),
        lambda: service.stopping,
        workers,
        service.history,
        service.rebalancer.shedding,
    )
    service.view = view
    if settings.dashboard:
        service.dashboard = Listener(
            endpointFor("dashboard", settings.dashboard),
            dashboardSite(view, service.reload),
            settings.dashboard,
        )
        service.dashboard.setServiceParent(service)
        service.followers.append(lambda settings: service.dashboard.renewCertificate())
    service.frontend = Frontend(reactor, core, listener, workers)
    service.frontend.setServiceParent(service)
    service.announcer = Announcer(
        reactor, core, listener, notifier, None if takeOver is None else os.getpid()
    )
    service.announcer.setServiceParent(service)
    if settings.handoff_socket:
        service.handoff = HandoffServer(
            reactor, service, None if takeOver is None else takeOver.finished
        )
        service.handoff.setServiceParent(service)
    return service


def _changedKeys(before, after):
    """
    The names of the settings that differ, for the reload log.
    """
    return {
        field.name
        for field in attrs.fields(type(before))
        if getattr(before, field.name) != getattr(after, field.name)
    }
