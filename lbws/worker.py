"""
A worker process of C{workers = N} (see L{lbws.workers}): a relay serving
the client connections its parent accepted and hands it over its channel
(descriptor FD).

    python -m lbws.worker CONFIG FD FAMILY INDEX GENERATION

It serves them as a single lbws serves the clients it accepts: with TLS for
an C{ssl:} listen endpoint, with the certificate and key read by the worker
itself (and read again on each reload, so a renewed certificate is served
to new clients). It has no dashboard, no health checks and no signal
handling of its own: backends' states come from the parent, its traffic
goes back to it, and it stops (draining like the parent) when the parent
says so or goes away.
"""

import json
import signal
import socket
import sys

from twisted.internet import protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.protocols.basic import LineOnlyReceiver

from lbws import compat
from lbws.backends.rebalance import Rebalancer
from lbws.config import ConfigError, loadConfig
from lbws.core import buildCore
from lbws.transport.dispatch import Receiver, closeDescriptor
from lbws.transport.listen import TlsServerFactory, serverTls

_log = Logger()

STATS_INTERVAL = 0.5


def statsOf(core, rebalancer, generation, received):
    """
    What a worker reports to its parent: its traffic, its shedding of
    draining backends (C{rebalancer}'s), its clients, its
    clients' failed TLS handshakes since the last report (the parent logs
    them), the connections it was handed so far (C{received}), and the
    generation of its settings (how many reloads the parent had applied
    when it took them).
    """
    pool, counters, relay = core.pool, core.counters, core.relay
    return {
        "shedding": [rebalancer.leftToMove(), rebalancer.shedMoved],
        "members": {
            member.name: {
                **member.traffic.own(),
                "idle": core.idle.count(member),
                "lastError": member.lastError,
            }
            for member in pool
        },
        "counters": {
            **counters.snapshot(),
            "routes": [[r, what, n] for (r, what), n in relay.routeCounts().items()],
        },
        "clients": relay.clients,
        "tlsFailures": relay.tlsFailures.take(),
        "received": received,
        "generation": generation,
    }


class Worker:
    def __init__(self, reactor, path, fd, family, index, generation):
        self.reactor = reactor
        self.path = path
        self.index = index
        self.generation = generation
        self.family = family
        settings = loadConfig(path)
        self.core = buildCore(reactor, settings, worker=True)
        self.factory = self.core.factory()
        self.tls = serverTls(settings.listen)
        if self.tls is not None:
            self.factory = TlsServerFactory(self.tls, self.factory)
        self.receiver = Receiver(reactor, fd, self._adopt, self._parentGone)
        # Sheds its own connections off draining backends (drain_mode);
        # the parent records the events for all workers.
        self.rebalancer = Rebalancer(reactor, self.core.relay, self.core.pool, record=False)
        self._stats = LoopingCall(self._report)
        self._stats.clock = reactor
        self._stopping = False
        self.channel = None

    def start(self, channel):
        self.channel = channel
        self._stats.start(STATS_INTERVAL)
        self.receiver.start()
        self.rebalancer.startService()

    def _adopt(self, fd):
        """
        A client's connection, accepted by the parent: serve it.
        """
        try:
            self.reactor.adoptStreamConnection(fd, self.family, self.factory)
        except OSError:
            pass  # the client left already
        finally:
            closeDescriptor(fd)

    def _parentGone(self, reason):
        self.stop(self.core.settings.drain_timeout)

    def _report(self):
        stats = statsOf(self.core, self.rebalancer, self.generation, self.receiver.count)
        self.channel.sendLine(json.dumps({"stats": stats}).encode())

    def handle(self, message):
        if "state" in message:
            for name, (healthy, drained, changed) in message["state"].items():
                member = self.core.pool.members.get(name)
                if member is not None:
                    member.follow(healthy, drained, changed)
        elif "reload" in message:
            self.generation = message["reload"]
            self._reload()
        elif "stop" in message:
            self.stop(message["stop"])
        elif "abort" in message:
            self._stopping = True
            self.core.relay.abort()
            self.reactor.stop()

    def _reload(self):
        try:
            settings = loadConfig(self.path)
        except ConfigError as e:
            # The parent checked the same file a moment ago.
            _log.error("worker {index}: reload refused: {error}", index=self.index, error=str(e))
            return
        self.core.apply(settings)
        if self.tls is not None:
            try:
                self.tls.renew(serverTls(settings.listen))
            except Exception as e:
                _log.error(
                    "worker {index}: certificate not read again, the old one stays: {error}",
                    index=self.index,
                    error=str(e),
                )

    def stop(self, timeout):
        if self._stopping:
            return
        self._stopping = True
        self.rebalancer.stopService()
        # The clients the parent handed over before it stopped accepting
        # are served (and drained) too.
        self.receiver.drain()
        if self.channel is not None:
            self._report()  # what happened since the last report, before the drain
        d = self.core.relay.stop(timeout)
        d.addBoth(lambda _: self.reactor.stop())


class ParentChannel(LineOnlyReceiver):
    """
    Standard input and output: the line-based channel to the parent.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, worker):
        self.worker = worker

    def connectionMade(self):
        self.worker.start(self)

    def lineReceived(self, line):
        self.worker.handle(json.loads(line))

    def connectionLost(self, reason=protocol.connectionDone):
        # The parent is gone: drain and go too.
        self.worker.stop(self.worker.core.settings.drain_timeout)


def main(argv):
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    path, fd, family, index, generation = argv
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    # A terminal's Ctrl-C reaches the whole process group: the parent
    # decides when workers stop, and how.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    family = socket.AF_INET6 if family == "6" else socket.AF_INET
    compat.lazyAutobahnDebugFormatting()
    compat.plainIoDispatch()
    worker = Worker(reactor, path, int(fd), family, int(index), int(generation))
    StandardIO(ParentChannel(worker), reactor=reactor)
    _log.info("worker {index} relaying", index=index)
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main(sys.argv[1:])
