"""
Where lbws relies on Autobahn's non-public behaviour: its eager debug
formatting, made lazy for connection-heavy loads, and how its client writes
the opening handshake (L{OctetRequest}).

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


class OctetRequest:
    """
    A mixin for a C{WebSocketClientProtocol} whose opening handshake
    request goes out with one byte per character (ISO-8859-1), not as
    UTF-8.

    Autobahn decodes a client's request head as ISO-8859-1 but encodes the
    request it sends as UTF-8, so a header value byte 0x80-0xFF the client
    sent would reach the backend as two bytes. lbws forwards the client's
    values, whose characters are all below 256, and writes everything else
    in ASCII, so the ISO-8859-1 bytes are the client's own. (A request with
    other characters, from a config file's non-ASCII url path, stays
    UTF-8.)

    Relies on Autobahn keeping the request it is about to send in
    C{http_request_data} (tests/test_request.py
    test_autobahn_client_keeps_its_request_in_http_request_data).
    """

    def sendData(self, data, sync=False, chopsize=None):
        if self.state == self.STATE_CONNECTING and data is getattr(
            self, "http_request_data", None
        ):
            try:
                data = self.http_request_data = data.decode("utf-8").encode("latin-1")
            except UnicodeEncodeError:
                pass
        return super().sendData(data, sync, chopsize)
