"""
HTTP/1.1 messages for the plain HTTP proxy (L{lbws.http.httpproxy}) as
lbws reads them from h11's events: h11 is the grammar and the framing
(Content-Length, chunked coding, close), L{lbws.protocol.strict} the rules
lbws adds, and this the shape the proxy, the balancer and the sticky
cookie read a message in.
"""

from urllib.parse import parse_qs, urlsplit


class Head:
    """
    A request or response head.

    @ivar fields: C{(name, value)} pairs as sent, in order, as latin-1 text.
    @ivar headers: lower-case name -> value, repeats joined with ", " (the
        shape of Autobahn's C{ConnectionRequest.headers}, for
        L{lbws.backends.balance.hashKeyOf} and L{lbws.protocol.headers.proxyHeaders}).
    """

    method = None
    target = None
    status = None
    reason = ""

    def __init__(self, version, fields):
        self.version = version
        self.fields = fields
        self.headers = {}
        for name, value in fields:
            key = name.lower()
            if key in self.headers:
                self.headers[key] += ", " + value
            else:
                self.headers[key] = value

    @classmethod
    def ofEvent(cls, event):
        """
        The head of an h11 C{Request}, C{Response} or
        C{InformationalResponse}, with names as sent.
        """
        head = cls(
            "HTTP/" + event.http_version.decode("ascii"),
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()],
        )
        if hasattr(event, "method"):
            head.method = event.method.decode("ascii")
            head.target = event.target.decode("latin-1")
        else:
            head.status = event.status_code
            head.reason = event.reason.decode("latin-1")
        return head

    @property
    def path(self):
        return urlsplit(self.target).path

    @property
    def params(self):
        return parse_qs(urlsplit(self.target).query)

    def tokens(self, name):
        """
        The comma-separated tokens of a header, lower case.
        """
        return [t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()]


def isWebSocketUpgrade(head):
    """
    Whether a request head (bytes) asks for a WebSocket upgrade: the
    cheap test that sends a connection to the WebSocket handshake or to
    the HTTP proxy, before anything else parses it.
    """
    for line in head.split(b"\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False
