"""Autobahn (Python 3, Twisted) WebSocket echo server used as the backend of the
conformance job.

    python echo_backend.py PORT [--interface 127.0.0.1]

PORT 0 lets the OS choose; the port actually bound is printed on stdout as a
line ``PORT <n>`` (flushed) once the server listens. Every message is echoed
back unchanged (text as text, binary as binary). Options are set for the
Autobahn fuzzingclient: failByDrop=False, large frame/message limits so the
9.x cases fit, and the first permessage-deflate offer accepted as offered
(the compression cases 12.x and 13.x need a deflate-capable backend; no
other case offers compression).
SIGTERM / SIGINT stop the reactor.
"""

import argparse
import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from twisted.internet import reactor

# 9.x sends messages up to 16 MiB; leave plenty of headroom.
MAX_PAYLOAD = 64 * 1024 * 1024


class EchoProtocol(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


def accept_deflate(offers):
    """Accept the first permessage-deflate offer, as wstest's own echo server does."""
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


def make_factory():
    factory = WebSocketServerFactory()
    factory.protocol = EchoProtocol
    factory.setProtocolOptions(
        failByDrop=False,
        maxFramePayloadSize=MAX_PAYLOAD,
        maxMessagePayloadSize=MAX_PAYLOAD,
        autoFragmentSize=0,
        utf8validateIncoming=True,
        openHandshakeTimeout=10,
        closeHandshakeTimeout=2,
        perMessageCompressionAccept=accept_deflate,
    )
    return factory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="TCP port to listen on (0 = OS chooses)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    args = parser.parse_args(argv)

    port = reactor.listenTCP(args.port, make_factory(), interface=args.interface)
    sys.stdout.write("PORT %d\n" % port.getHost().port)
    sys.stdout.flush()
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
