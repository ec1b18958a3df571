"""
The command line: C{twistd lbws --config FILE [--check] [--log-format json]}.
"""

import sys

from twisted.application.service import MultiService
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from lbws.ops import fdlimit
from lbws.config import ConfigError, loadConfig, summary
from lbws.transport.listen import ListenFailed

_log = Logger()


class Options(usage.Options):
    synopsis = "--config FILE [--check] [--take-over] [--log-format text|json]"
    longdesc = (
        "Run lbws, a WebSocket load balancer, with the settings of an INI "
        "file (see etc/lbws.ini). SIGHUP reloads the file; SIGTERM drains."
    )
    optParameters = [
        ["config", "c", None, "the INI file to run with (required)"],
        ["log-format", None, "text", "text, or json for one JSON object per log event"],
    ]
    optFlags = [
        ["check", None, "validate the config, print a summary, exit 0 (valid) or 1"],
        [
            "take-over",
            None,
            "take the listeners and connections of the lbws running with this"
            " config's handoff_socket, which then exits",
        ],
    ]

    def postOptions(self):
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError(
                f"--log-format {self['log-format']!r}: use text or json"
            )
        try:
            self.settings = loadConfig(self["config"])
        except ConfigError as e:
            sys.stderr.write(f"lbws: {e}\n")
            raise SystemExit(1)
        if self["check"]:
            sys.stdout.write(summary(self.settings) + "\n" + _startNotes(self.settings))
            raise SystemExit(0)
        if self["log-format"] == "json" and self.parent is not None:
            from lbws.telemetry.logs import useJson

            # twistd imports its logger option by name after this runs.
            self.parent["logger"] = useJson(
                self.parent.get("logfile"), self.parent.get("nodaemon")
            )


def _startNotes(settings):
    """
    What C{--check} says beyond the config itself: the file descriptor
    limit lbws will run with, and the warnings lbws logs at start (too few
    descriptors, a dashboard beyond loopback).
    """
    from lbws.ops.dashboard import exposureWarning

    soft, limit = fdlimit.reachable()
    text = (
        f"file descriptors: limit {limit}"
        + (f" (soft limit {soft}, raised at start)" if limit > soft else "")
        + f"; needs 2 x max_connections + {fdlimit.MARGIN} = {fdlimit.needed(settings)}\n"
    )
    for problem in (fdlimit.shortfall(settings, limit), exposureWarning(settings)):
        if problem:
            text += f"warning: {problem}\n"
    fits = fdlimit.fits(settings, limit)
    if fits:
        text += f"note: {fits}\n"
    return text


class CommandLineService(MultiService):
    """
    lbws as a process (under twistd): the process-wide parts that an
    in-process L{lbws.service.LbwsService} leaves alone.

      - The soft file descriptor limit is raised to the hard one, with a
        warning when that is still too low (L{lbws.ops.fdlimit}).
      - A C{listen} or C{dashboard} endpoint that cannot listen (a port
        already in use, a privileged port) ends the process with one line,
        C{lbws: cannot listen on ENDPOINT: REASON}, and exit status 1,
        instead of a traceback (L{lbws.transport.listen.ListenFailed}).
    """

    def __init__(self, service, settings, daemon=False):
        super().__init__()
        self.settings = settings
        self.daemon = daemon
        service.setServiceParent(self)

    def privilegedStartService(self):
        before, after = fdlimit.raiseSoftLimit()
        if after > before:
            _log.info(
                "raised the file descriptor limit from {before} to {after}",
                before=before,
                after=after,
            )
        problem = fdlimit.shortfall(self.settings, after)
        if problem:
            _log.warn("{problem}", problem=problem, limit=after)
        fits = fdlimit.fits(self.settings, after)
        if fits:
            _log.info("{fits}", fits=fits, limit=after)
        super().privilegedStartService()

    def startService(self):
        try:
            super().startService()
        except ListenFailed as e:
            error = e.reason
            if isinstance(error, CannotListenError):
                error = error.socketError
            why = getattr(error, "strerror", None) or str(error)
            problem = f"cannot listen on {e.endpoint}: {why[:1].lower()}{why[1:]}"
            if not self.daemon:
                raise SystemExit(f"lbws: {problem}") from None
            # A daemon's stderr is gone: the line goes to the log file, and
            # an exception (not SystemExit) makes twistd tell the waiting
            # parent through its status pipe, which then exits 1.
            _log.critical("lbws: {problem}", problem=problem)
            raise CannotStart(problem) from None


class CannotStart(Exception):
    """
    lbws cannot start as a daemon; the message says why (twistd's parent
    process prints it).
    """


def makeService(options):
    """
    The twistd service: one lbws (see L{lbws.service.makeLbws}) on the
    global reactor, handling signals, telling systemd when it runs under
    C{Type=notify}.
    """
    import os

    from twisted.internet import reactor

    from lbws.ops import systemd
    from lbws.service import makeLbws

    settings = options.settings
    takeOver = None
    if options["take-over"]:
        from lbws.ops.handoff import CannotTakeOver, TakeOver, connect

        try:
            takeOver = TakeOver(reactor, *connect(settings))
        except CannotTakeOver as e:
            raise SystemExit(f"lbws: cannot take over: {e}") from None
    service = makeLbws(
        reactor,
        settings,
        handleSignals=True,
        notifier=systemd.fromEnvironment(os.environ),
        takeOver=takeOver,
    )
    daemon = options.parent is not None and not options.parent.get("nodaemon")
    return CommandLineService(service, settings, daemon)
