"""
The command line: C{twistd lbws --config FILE [--check] [--log-format json]}.
"""

import sys

from twisted.python import usage

from lbws.config import ConfigError, loadConfig, summary


class Options(usage.Options):
    synopsis = "--config FILE [--check] [--log-format text|json]"
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
            sys.stdout.write(summary(self.settings) + "\n")
            raise SystemExit(0)
        if self["log-format"] == "json" and self.parent is not None:
            from lbws.logs import useJson

            # twistd imports its logger option by name after this runs.
            self.parent["logger"] = useJson(
                self.parent.get("logfile"), self.parent.get("nodaemon")
            )


def makeService(options):
    """
    The twistd service: one lbws (see L{lbws.service.makeLbws}) on the
    global reactor, handling signals, telling systemd when it runs under
    C{Type=notify}.
    """
    import os

    from twisted.internet import reactor

    from lbws import systemd
    from lbws.service import makeLbws

    return makeLbws(
        reactor,
        options.settings,
        handleSignals=True,
        notifier=systemd.fromEnvironment(os.environ),
    )
