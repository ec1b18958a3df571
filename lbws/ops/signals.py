"""
The signals an operator and systemd send lbws under twistd:

  - SIGHUP reloads the config file;
  - SIGTERM or SIGINT stops (draining, see L{lbws.service.Frontend}); the
    same signal again while stopping cuts the open connections at once.

lbws installs these handlers itself, with C{signal.signal}, once the reactor
runs: twistd's own SIGTERM/SIGINT handlers would make it exit by re-raising
the signal instead of exiting 0, and could not tell a second signal apart.
"""

import signal

from twisted.application.service import Service
from twisted.logger import Logger

_log = Logger()


class Signals(Service):
    """
    Turns signals into calls on the reactor thread.

    @param reload: called for SIGHUP.
    @param stop: called with the signal's name for the first stop signal.
    @param cut: called with the signal's name for any stop signal once lbws
        is stopping.
    @param isStopping: called with no arguments: True once lbws is stopping
        for any reason (then a stop signal cuts).
    """

    def __init__(self, reactor, reload, stop, cut, isStopping):
        self._reactor = reactor
        self._reload = reload
        self._stop = stop
        self._cut = cut
        self._isStopping = isStopping
        self._stopSignalled = False

    def startService(self):
        super().startService()
        # The reactor installs its own handlers as it starts: install ours
        # after it.
        self._reactor.callWhenRunning(self._install)

    def _install(self):
        for signum, handler in (
            (signal.SIGHUP, self._onHangup),
            (signal.SIGTERM, self._onStopSignal),
            (signal.SIGINT, self._onStopSignal),
        ):
            signal.signal(signum, handler)

    def _onHangup(self, signum, frame):
        # A signal handler may run between any two bytecodes: hand the work
        # to the reactor, as Twisted's own handlers do.
        self._reactor.callFromThread(self._hangup)

    def _hangup(self):
        _log.info("received SIGHUP: reloading the config file")
        self._reload()

    def _onStopSignal(self, signum, frame):
        self._reactor.callFromThread(self._stopSignal, signal.Signals(signum).name)

    def _stopSignal(self, name):
        if self._stopSignalled or self._isStopping():
            self._cut(name)
        else:
            self._stopSignalled = True
            self._stop(name)
