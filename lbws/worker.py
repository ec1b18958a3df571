"""
A worker process of C{workers = N} (see L{lbws.workers}): a relay that
accepts on the listening socket its parent handed it.

    python -m lbws.worker CONFIG FD FAMILY INDEX GENERATION

It has no dashboard, no health checks and no signal handling of its own:
backends' states come from the parent, its traffic goes back to it, and it
stops (draining like the parent) when the parent says so or goes away.
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
from lbws.config import ConfigError, loadConfig
from lbws.core import buildCore

_log = Logger()

STATS_INTERVAL = 0.5


def statsOf(core, generation):
    """
    What a worker reports to its parent, with the generation of its
    settings (how many reloads the parent had applied when it took them).
    """
    pool, counters, relay = core.pool, core.counters, core.relay
    return {
        "members": {
            member.name: {
                **member.traffic.own(),
                "lastError": member.lastError,
            }
            for member in pool
        },
        "counters": {
            **counters.snapshot(),
            "routes": [[r, what, n] for (r, what), n in relay.routeCounts().items()],
        },
        "clients": relay.clients,
        "generation": generation,
    }


class Worker:
    def __init__(self, reactor, path, fd, family, index, generation):
        self.reactor = reactor
        self.path = path
        self.index = index
        self.generation = generation
        self.core = buildCore(reactor, loadConfig(path))
        self.port = reactor.adoptStreamPort(fd, family, self.core.factory())
        self._stats = LoopingCall(self._report)
        self._stats.clock = reactor
        self._stopping = False
        self.channel = None

    def start(self, channel):
        self.channel = channel
        self._stats.start(STATS_INTERVAL)

    def _report(self):
        self.channel.sendLine(json.dumps({"stats": statsOf(self.core, self.generation)}).encode())

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

    def stop(self, timeout):
        if self._stopping:
            return
        self._stopping = True
        d = self.port.stopListening()
        d.addCallback(lambda _: self.core.relay.stop(timeout))
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
    worker = Worker(reactor, path, int(fd), family, int(index), int(generation))
    StandardIO(ParentChannel(worker), reactor=reactor)
    _log.info("worker {index} relaying", index=index)
    reactor.run(installSignalHandlers=False)


if __name__ == "__main__":
    main(sys.argv[1:])
