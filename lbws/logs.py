"""
Log output for log shippers: C{--log-format json} writes one JSON object
per event, with every structured field of the event.
"""

import sys

from twisted.logger import jsonFileLogObserver


def jsonObserverFactory(logfile):
    """
    A factory for twistd's C{--logger}: JSON lines to C{logfile}, or to
    standard output when there is none (or it is C{-}).
    """

    def factory():
        if logfile and logfile != "-":
            out = open(logfile, "a", encoding="utf-8")
        else:
            out = sys.stdout
        return jsonFileLogObserver(out, recordSeparator="")

    return factory
