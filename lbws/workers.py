"""
C{workers = N}: N relay processes sharing one listening socket.

The twistd process stays the only one that serves the dashboard, runs the
health checks and reads signals. It opens the listening socket, stops
accepting on it itself and hands it to N worker processes (L{lbws.worker}),
which all accept on it, so the kernel spreads new clients over them. The
parent and the workers talk over the workers' standard input and output,
one JSON object a line:

  - to a worker: C{{"state": {NAME: [healthy, drained, changed]}}} whenever a
    backend's state changes (and once at start), C{{"reload": true}} after a
    reload the parent applied (L{Workers.apply}), C{{"stop": SECONDS}} to drain and exit,
    C{{"abort": true}} to cut every connection and exit;
  - from a worker: C{{"stats": ...}} twice a second, its per-backend
    traffic and counters, and its shedding of draining backends (see
    L{lbws.worker.statsOf}), which the dashboard and metrics add to the
    parent's own.

A worker that dies is started again, unless lbws is stopping.
"""

import json
import os
import sys
from collections import Counter

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()

STATE_INTERVAL = 0.25  # seconds between looks at the backends' states
RESPAWN_DELAY = 1.0


class WorkerProcess(protocol.ProcessProtocol):
    """
    The parent's end of one worker.
    """

    def __init__(self, workers, index):
        self.workers = workers
        self.index = index
        self.ended = Deferred()
        self._buffer = b""

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
        self.ended.callback(None)
        self.workers.ended(self, reason)


class Workers(Service):
    """
    Starts, feeds and stops the worker processes of one lbws.

    @param core: the parent's L{lbws.core.Core}: its pool has the backends'
        states to send, and takes the workers' traffic and failures.
    @param listener: the parent's L{lbws.transport.listen.Listener}, whose socket the
        workers accept on.
    """

    def __init__(self, reactor, core, listener, count, executable=sys.executable):
        self._reactor = reactor
        self._core = core
        self._listener = listener
        self._count = count
        self._executable = executable
        self._processes = {}
        self._connections = {}  # client connections of each worker, by index
        self._shedding = {}  # each worker's (left, moved) by backend name, by index
        self._sentState = None
        self._stateLoop = LoopingCall(self._sendState)
        self._stateLoop.clock = reactor
        self._stopping = False
        self._fd = None
        self._family = None

    def startService(self):
        super().startService()
        self._listener.whenListening().addCallback(self._started)

    def _started(self, port):
        # The workers relay; this process only supervises.
        port.stopReading()
        self._fd = port.fileno()
        self._family = "6" if port.getHost().type == "TCP6" else "4"
        for index in range(1, self._count + 1):
            self._spawn(index)
        self._stateLoop.start(STATE_INTERVAL)
        return port

    def _spawn(self, index):
        process = WorkerProcess(self, index)
        self._processes[index] = process
        self._reactor.spawnProcess(
            process,
            self._executable,
            [
                self._executable,
                "-m",
                "lbws.worker",
                self._core.settings.path,
                str(self._fd),
                self._family,
                str(index),
            ],
            env=os.environ.copy(),
            childFDs={0: "w", 1: "r", 2: 2, self._fd: self._fd},
        )
        self._sentState = None  # the new worker needs the whole state
        _log.info("worker {index} started", index=index)

    def ended(self, process, reason):
        if self._processes.get(process.index) is process:
            del self._processes[process.index]
        self._core.pool.forgetWorker(process.index)
        self._core.counters.forgetWorker(process.index)
        self._connections.pop(process.index, None)
        self._shedding.pop(process.index, None)
        if self._stopping:
            return
        _log.error(
            "worker {index} ended unexpectedly ({why}); starting it again",
            index=process.index,
            why=reason.getErrorMessage(),
        )
        self._reactor.callLater(RESPAWN_DELAY, self._respawn, process.index)

    def _respawn(self, index):
        if not self._stopping and index not in self._processes:
            self._spawn(index)

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
        A worker's traffic: kept for the dashboard; connection failures it
        met count as failed checks here, where health is decided.
        """
        pool = self._core.pool
        health = self._core.settings.health
        now = self._reactor.seconds()
        reported = stats["members"]
        for name, counts in reported.items():
            member = pool.members.get(name)
            if member is None:
                continue
            before = member.traffic.remote.get(index, {}).get("failed", 0)
            for _ in range(max(0, counts["failed"] - before)):
                member.recordCheck(False, now, health.rise, health.fall, counts["lastError"])
            member.traffic.report(index, counts)
        for member in list(pool):
            if member.name not in reported:
                # The worker let a removed backend go with its last
                # connection (or has not reloaded yet): it has none there.
                member.traffic.forget(index)
            pool.leaveIfIdle(member)
        self._core.counters.fromWorker(index, stats["counters"])
        self._connections[index] = stats["clients"]
        left, moved = stats["shedding"]
        self._shedding[index] = (Counter(left), Counter(moved))

    def connections(self):
        """
        Client connections of each worker, by index, as last reported.
        """
        return dict(self._connections)

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
        self._broadcast({"reload": True})
        self._sentState = None

    def abort(self):
        self._stopping = True
        self._broadcast({"abort": True})

    def stopService(self):
        """
        Tell every worker to drain and exit; fires once all have, killing
        any still running C{drain_timeout} plus a grace period later.
        """
        super().stopService()
        self._stopping = True
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
