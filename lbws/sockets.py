"""
Socket-level tuning of relayed connections: TCP_NODELAY, and writing
relayed bytes straight to the socket when nothing is queued.

Twisted's C{transport.write} queues the bytes and waits for the reactor to
report the socket writable: for a relay that means a second reactor event
and two epoll changes for every chunk forwarded. When the transport has
nothing queued, sending at once is what Twisted would do on the next
iteration anyway; measured here, it nearly halved the cost of forwarding
small messages (see the README's Benchmark section).
"""

from twisted.internet import tcp

from lbws.compat import hasQueuedWrites


def setNoDelay(transport):
    """
    Turn Nagle's algorithm off: a relay must pass each message on at once.
    Autobahn's Twisted adapter means to do it but never does (it reads its
    option before copying it from the factory), and with Nagle on, a
    transfer that ends in a small segment waits for the peer's delayed ACK
    (40 ms here; seen as the p99 of benchmark S2).
    """
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass  # not TCP: a UNIX socket, or a wrapper without the option


def writerFor(transport):
    """
    A C{write(data)} for the relay's hot path: straight to the socket when
    that keeps Twisted's guarantees, else C{transport.write}.

    Only plain TCP transports are written through; TLS and PROXY-protocol
    transports wrap theirs, so they always take C{transport.write}.
    """
    if not isinstance(transport, tcp.Connection):
        return transport.write
    send = transport.getHandle().send
    write = transport.write

    def writeThrough(data):
        if (
            hasQueuedWrites(transport)
            or transport.disconnecting
            or not transport.connected
        ):
            write(data)
            return
        try:
            sent = send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            # Let Twisted meet the error and report the connection lost.
            write(data)
            return
        if sent < len(data):
            write(data[sent:])

    return writeThrough
