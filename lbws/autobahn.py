"""
One adjustment to Autobahn for connection-heavy loads.

Autobahn formats its per-connection debug messages eagerly: every new
WebSocket (client or server side) pretty-prints all of its protocol options
for a debug line that is usually discarded. Profiled under connection churn
(benchmark S3), that C{pprint.pformat} call took about 40% of lbws's CPU.
Here the module's C{pformat} is replaced by one that returns a lazy value,
formatted only if a debug observer actually renders the message, so debug
logs still read the same.
"""

import pprint

import autobahn.websocket.protocol


class _LazyPformat:
    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def __str__(self):
        return pprint.pformat(self._value)

    __repr__ = __str__

    def __format__(self, spec):
        return format(str(self), spec)


def install():
    """
    Make Autobahn's debug formatting lazy; safe to call more than once.
    """
    autobahn.websocket.protocol.pformat = _LazyPformat
