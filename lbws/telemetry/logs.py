"""
Client-controlled text made safe for the text log (L{printable}), and log
output for log shippers: C{--log-format json} writes one JSON object
per event, with every structured field of the event.

twistd takes its C{--logger} as the dotted name of a factory and imports it
after the lbws options are parsed, so the options say where the log goes
(L{useJson}) and twistd is given the name of L{jsonObserver}.
"""

import re
import sys

from twisted.logger import jsonFileLogObserver

# C0 controls but tab, DEL, and C1 controls (0x85 is a line break to some
# readers, 0x9B a terminal's CSI).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(text):
    """
    C{text} with its control characters escaped (C{\\x1b}, C{\\x00},
    ...), for text that quotes what a client sent: the text log shows it
    on one line, and no escape sequence reaches a terminal.
    """
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)

# Where jsonObserver writes: set by useJson from twistd's options.
_destination = {"logfile": None, "nodaemon": True}


def useJson(logfile, nodaemon):
    """
    Make twistd log JSON lines where it would have logged text: to
    C{logfile}, or to standard output under C{-n} without one (or with
    C{-}), or to C{twistd.log} as a daemon without one.

    @return: the value for twistd's C{logger} option.
    """
    _destination["logfile"] = logfile
    _destination["nodaemon"] = nodaemon
    return f"{__name__}.jsonObserver"


def jsonObserver():
    """
    The observer twistd's C{--logger} makes (see L{useJson}).
    """
    logfile = _destination["logfile"]
    if not logfile and not _destination["nodaemon"]:
        logfile = "twistd.log"
    return jsonObserverFactory(logfile)()


def jsonObserverFactory(logfile):
    """
    A factory of observers writing JSON lines to C{logfile}, or to standard
    output when there is none (or it is C{-}).
    """

    def factory():
        if logfile and logfile != "-":
            out = open(logfile, "a", encoding="utf-8")
        else:
            out = sys.stdout
        return jsonFileLogObserver(out, recordSeparator="")

    return factory
