"""
C{workers = N}: N relay processes behind one listening socket.

The twistd process stays the only one that serves the dashboard, runs the
health checks and reads signals. It accepts on the listening socket and
hands each client's connection, as it comes, to the worker process
(L{lbws.worker}) that holds the fewest connections
(L{lbws.transport.dispatch}): N relays evenly loaded, and a worker started
again takes the new clients until it has its share. Each worker serves the
connections it is handed as a single lbws serves those it accepts, TLS
included (the certificate is loaded in each worker). The parent and the
workers talk over the workers' standard input and output, one JSON object
a line:

  - to a worker: C{{"state": {NAME: [healthy, drained, changed]}}} whenever a
    backend's state changes (and once at start), C{{"reload": GENERATION}}
    after a reload the parent applied (L{Workers.apply}; the generation
    counts the reloads), C{{"stop": SECONDS}} to drain and exit,
    C{{"abort": true}} to cut every connection and exit;
  - from a worker: C{{"stats": ...}} twice a second, its per-backend
    traffic and counters, its shedding of draining backends, its clients,
    how many connections it was handed so far, and the generation of its
    settings (see
    L{lbws.worker.statsOf}), which the dashboard and metrics add to the
    parent's own.

How many connections a worker holds, for the choice of the next one: its
last report's clients, plus the connections handed to it since (handed so
far, less what it reported it had been handed).

What the workers count adds up the same as one process would count it: the
totals of a worker that ends are kept (counters never go back, which
Prometheus' C{rate()} relies on), its open connections are gone. A backend
removed by a reload stays in the parent's pool, draining, until every
worker reported, with the new settings, that it has no connection left.

A worker that dies is started again, unless lbws is stopping; the parent
counts the restarts and records each end and restart as an event.
"""

import json
import os
import socket
import sys
from collections import Counter, deque

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from lbws.transport.dispatch import Acceptor, Channel, channelPair

_log = Logger()

STATE_INTERVAL = 0.25  # seconds between looks at the backends' states
RESPAWN_DELAY = 1.0
# The descriptor number of its channel in a worker.
CHANNEL_FD = 3


class WorkerProcess(protocol.ProcessProtocol):
    """
    The parent's end of one worker: its JSON lines, its channel for client
    connections, and what it holds.

    @ivar handed: connections handed to it so far.
    @ivar received: connections it had taken in at its last report.
    @ivar clients: its client connections at its last report.
    """

    def __init__(self, workers, index, channel):
        self.workers = workers
        self.index = index
        self.channel = channel
        self.ended = Deferred()
        self.handed = 0
        self.received = 0
        self.clients = 0
        self._buffer = b""

    def load(self):
        """
        The connections it holds, as far as the parent knows.
        """
        return self.clients + self.handed - self.received

    def send(self, message):
        if self.transport is not None and not self.ended.called:
            self.transport.write(json.dumps(message).encode() + b"\n")

    def outReceived(self, data):
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                _log.warn("worker {index} said {line!r}", index=self.index, line=line)
                continue
            if "stats" in message:
                self.workers.statsFrom(self.index, message["stats"])

    def processEnded(self, reason):
        self.channel.close()
        self.ended.callback(None)
        self.workers.ended(self, reason)


class Workers(Service):
    """
    Starts, feeds and stops the worker processes of one lbws, and hands
    them the clients.

    @param core: the parent's L{lbws.core.Core}: its pool has the backends'
        states to send, and takes the workers' traffic and failures.
    @param listener: the parent's L{lbws.transport.listen.Listener}, whose
        socket this accepts on.
    """

    def __init__(self, reactor, core, listener, count, executable=sys.executable):
        self._reactor = reactor
        self._core = core
        self._listener = listener
        self._count = count
        self._executable = executable
        self._processes = {}
        self._shedding = {}  # each worker's (left, moved) by backend name, by index
        self._since = {}  # when each worker started, by index (clock seconds)
        self._restarts = Counter()  # by index
        # The reloads applied, and the generation each worker last reported.
        self._generation = 0
        self._reported = {}
        core.pool.countedByWorkers = True
        self._sentState = None
        self._stateLoop = LoopingCall(self._sendState)
        self._stateLoop.clock = reactor
        self._stopping = False
        self._acceptor = None
        self._family = None
        # Accepted clients not handed to a worker yet (every channel full,
        # or no worker running): accepting waits until they are.
        self._waiting = deque()
        self._next = 1  # the first choice among equally loaded workers

    def startService(self):
        super().startService()
        self._listener.whenListening().addCallback(self._started)

    def _started(self, port):
        # This process accepts, the workers relay: the port itself stops
        # reading, and the acceptor takes the clients off its socket.
        port.stopReading()
        six = port.getHost().type == "TCP6"
        self._family = "6" if six else "4"
        self._acceptor = Acceptor(
            self._reactor, port.fileno(), socket.AF_INET6 if six else socket.AF_INET, self._handOut
        )
        for index in range(1, self._count + 1):
            self._spawn(index)
        self._stateLoop.start(STATE_INTERVAL)
        if not self._stopping:
            self._acceptor.resume()
        return port

    def _spawn(self, index):
        mine, theirs = channelPair()
        process = WorkerProcess(self, index, Channel(self._reactor, mine, self._flush))
        self._processes[index] = process
        try:
            self._reactor.spawnProcess(
                process,
                self._executable,
                [
                    self._executable,
                    "-m",
                    "lbws.worker",
                    self._core.settings.path,
                    str(CHANNEL_FD),
                    self._family,
                    str(index),
                    str(self._generation),
                ],
                env=os.environ.copy(),
                childFDs={0: "w", 1: "r", 2: 2, CHANNEL_FD: theirs.fileno()},
            )
        finally:
            theirs.close()
        self._sentState = None  # the new worker needs the whole state
        self._since[index] = self._reactor.seconds()
        _log.info("worker {index} started", index=index)
        self._flush()

    # Handing clients out

    def _handOut(self, client):
        self._waiting.append(client)
        self._flush()

    def _flush(self):
        """
        Hand the waiting clients to the workers, each to the one holding
        the fewest connections whose channel has room; accept again once
        none is left waiting.
        """
        full = set()
        while self._waiting:
            candidates = [p for p in self._processes.values() if p.index not in full]
            if not candidates:
                self._acceptor.pause()
                for process in self._processes.values():
                    process.channel.watch()
                return
            count = self._count
            process = min(candidates, key=lambda p: (p.load(), (p.index - self._next) % count))
            try:
                sent = process.channel.send(self._waiting[0])
            except OSError:
                sent = False  # it is ending: processEnded comes
            if not sent:
                full.add(process.index)
                continue
            self._waiting.popleft()
            process.handed += 1
            self._next = process.index % count + 1
        if not self._stopping:
            self._acceptor.resume()

    # What the workers say and what happens to them

    def ended(self, process, reason):
        index = process.index
        if self._processes.get(index) is process:
            del self._processes[index]
        self._core.pool.forgetWorker(index)
        self._core.counters.forgetWorker(index)
        self._reported.pop(index, None)
        self._since.pop(index, None)
        self._shedding.pop(index, None)
        self._settle()
        if self._stopping:
            return
        self._core.events.record(
            "worker_ended",
            "worker {worker} ended unexpectedly ({why}); starting it again",
            LogLevel.error,
            worker=index,
            why=reason.getErrorMessage(),
        )
        self._reactor.callLater(RESPAWN_DELAY, self._respawn, index)

    def _respawn(self, index):
        if not self._stopping and index not in self._processes:
            self._restarts[index] += 1
            self._spawn(index)
            self._core.events.record(
                "worker_restarted",
                "worker {worker} started again ({restarts} restart(s) of it so far)",
                worker=index,
                restarts=self._restarts[index],
            )

    def _sendState(self):
        state = {m.name: [m.healthy, m.drained, m.changed] for m in self._core.pool}
        if state != self._sentState:
            self._sentState = state
            self._broadcast({"state": state})

    def _broadcast(self, message):
        for process in self._processes.values():
            process.send(message)

    def statsFrom(self, index, stats):
        """
        A worker's report: its traffic, kept for the dashboard (connection
        failures it met count as failed checks here, where health is
        decided), and what it holds, for the choice of the next worker.
        """
        process = self._processes.get(index)
        if process is None:
            return
        pool = self._core.pool
        health = self._core.settings.health
        now = self._reactor.seconds()
        reported = stats["members"]
        for member in list(pool):
            counts = reported.get(member.name)
            if counts is None:
                # Not (or no longer) in that worker's pool.
                member.traffic.forget(index)
                continue
            before = member.traffic.remote.get(index, {}).get("failed", 0)
            for _ in range(max(0, counts["failed"] - before)):
                member.recordCheck(False, now, health.rise, health.fall, counts["lastError"])
            member.traffic.report(index, counts)
        self._core.counters.fromWorker(index, stats["counters"])
        left, moved = stats["shedding"]
        self._shedding[index] = (Counter(left), Counter(moved))
        self._core.relay.tlsFailures.add(stats["tlsFailures"])
        process.clients = stats["clients"]
        process.received = stats["received"]
        self._reported[index] = stats["generation"]
        self._settle()

    def _settle(self):
        """
        Once every worker reported with the settings running now, the
        backends a reload removed that no worker has a connection to left
        leave the pool.
        """
        if all(self._reported.get(i) == self._generation for i in self._processes):
            for member in list(self._core.pool):
                self._core.pool.leaveIfIdle(member, reportsCurrent=True)

    def workers(self):
        """
        Each worker running now, by index: its client connections as last
        reported, when it started (clock seconds) and how many times it was
        started again after it ended.
        """
        return [
            {
                "index": index,
                "connections": process.clients,
                "started": self._since.get(index),
                "restarts": self._restarts[index],
            }
            for index, process in sorted(self._processes.items())
        ]

    def shedding(self):
        """
        The workers' shedding together, as last reported: C{(left, moved)}
        Counters by backend name (see
        L{lbws.backends.rebalance.Rebalancer.shedding}).
        """
        left, moved = Counter(), Counter()
        for workerLeft, workerMoved in self._shedding.values():
            left.update(workerLeft)
            moved.update(workerMoved)
        return left, moved

    def apply(self, settings):
        """
        The parent runs with new settings: every worker reloads the same
        file (the parent accepted it a moment ago).
        """
        self._generation += 1
        self._broadcast({"reload": self._generation})
        self._sentState = None

    def abort(self):
        self._stopping = True
        self._stopAccepting()
        self._broadcast({"abort": True})

    def _stopAccepting(self):
        """
        No new client: the clients accepted and not handed out yet are
        handed out if the workers can take them now, else closed.
        """
        if self._acceptor is not None:
            self._acceptor.close()
        self._flush()
        while self._waiting:
            self._waiting.popleft().close()

    def stopService(self):
        """
        Stop accepting and tell every worker to drain and exit; fires once
        all have, killing any still running C{drain_timeout} plus a grace
        period later.
        """
        super().stopService()
        self._stopping = True
        self._stopAccepting()
        if self._stateLoop.running:
            self._stateLoop.stop()
        timeout = self._core.settings.drain_timeout
        processes = list(self._processes.values())
        self._broadcast({"stop": timeout})
        kill = self._reactor.callLater(timeout + 5, self._kill)
        d = DeferredList([p.ended for p in processes])

        def done(result):
            if kill.active():
                kill.cancel()
            return result

        return d.addCallback(done)

    def _kill(self):
        for process in list(self._processes.values()):
            _log.warn("worker {index} did not stop in time: killed", index=process.index)
            try:
                process.transport.signalProcess("KILL")
            except OSError:
                pass
