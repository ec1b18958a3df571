"""
Socket-level tuning of relayed connections: TCP_NODELAY, the read size,
writing relayed bytes straight to the socket when nothing is queued, and
the kernel's count of the bytes a peer took and sent.

Twisted's C{transport.write} queues the bytes and waits for the reactor to
report the socket writable: for a relay that means a second reactor event
and two epoll changes for every chunk forwarded. When the transport has
nothing queued, sending at once is what Twisted would do on the next
iteration anyway; measured here, it nearly halved the cost of forwarding
small messages (see the README's Benchmark section).
"""

import functools
import socket
import struct

from lbws.compat import hasQueuedWrites, isPlainTcp


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


# What a TCP transport reads at a time, and what it buffers before it
# pauses its producer: Twisted's bufferSize is both, 64 KiB by default.
DEFAULT_READ_SIZE = 64 * 1024
# The same for a tunnel leg that is sent large messages: four times as
# much cut lbws's CPU per 1 MiB message (benchmark S2) by about a quarter,
# in a quarter as many reads and sends (bench/README.md). A paused reader
# still bounds what lbws holds for it, at twice this (a full buffer plus
# one read).
RELAY_READ_SIZE = 256 * 1024


def adjustReadSize(transport, received):
    """
    After a read of C{received} bytes on a tunnel leg's TCP transport: a
    read that filled the buffer makes the next ones L{RELAY_READ_SIZE}, a
    short one puts them back to L{DEFAULT_READ_SIZE}.

    Not large reads always: CPython's C{recv(n)} allocates C{n} bytes
    before it knows how many come, and glibc serves an allocation above 128
    KiB with mmap (and shrinks it with mremap): about 30 microseconds a
    read, more than relaying a small message costs all told.
    """
    size = transport.bufferSize
    if received == size:
        if size < RELAY_READ_SIZE:
            transport.bufferSize = RELAY_READ_SIZE
    elif received < DEFAULT_READ_SIZE and size != DEFAULT_READ_SIZE:
        transport.bufferSize = DEFAULT_READ_SIZE


def writerFor(transport):
    """
    A C{write(data)} for the relay's hot path: straight to the socket when
    that keeps Twisted's guarantees (L{writeThrough}), else
    C{transport.write}.

    Only plain TCP transports are written through; TLS and PROXY-protocol
    transports wrap theirs, so they always take C{transport.write}. A
    partial, not a closure: an idle tunnel keeps two of these, and a
    partial is a third of a closure's size with its cells.
    """
    if not isPlainTcp(transport):
        return transport.write
    return functools.partial(writeThrough, transport)


def writeThrough(transport, data):
    """
    Write C{data} on a TCP transport: to its socket now, unless bytes are
    already queued (they go first) or the connection is ending; what the
    socket does not take is queued with C{transport.write}.
    """
    if hasQueuedWrites(transport) or transport.disconnecting or not transport.connected:
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Let Twisted meet the error and report the connection lost.
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])


# struct tcp_info (linux/tcp.h): tcpi_bytes_acked and tcpi_bytes_received,
# two unsigned 64-bit counters at these offsets (Linux 4.1 and later).
_TCP_INFO_TRAFFIC = 120
_TCP_INFO_LENGTH = 136


def tcpTraffic(transport):
    """
    A function giving how many bytes the peer of C{transport} has
    acknowledged plus how many it has sent, as its kernel counts them; or
    None where the kernel has no such counters or the transport is not
    TCP underneath.

    Read at timer ticks, it tells whether a peer takes or sends bytes at
    all, without any work per byte: a slow reader of a long message
    acknowledges what it reads, a peer that is gone does not.
    """
    while transport is not None and not isPlainTcp(transport):
        # TLS and PROXY-protocol transports wrap the TCP one.
        transport = getattr(transport, "transport", None)
    if transport is None or not hasattr(socket, "TCP_INFO"):
        return None
    sock = transport.socket

    def traffic():
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
        except OSError:
            return None
        if len(info) < _TCP_INFO_LENGTH:
            return None
        acked, received = struct.unpack_from("=QQ", info, _TCP_INFO_TRAFFIC)
        return acked + received

    return traffic if traffic() is not None else None


def endWriting(transport):
    """
    Send the peer a FIN and keep reading: a TCP connection's write side is
    shut (the peer's bytes are still read, so closing later leaves none
    unread to turn into a reset); a TLS or PROXY-protocol wrapper cannot
    half-close, so it closes whole (TLS with its close_notify).

    @return: True if the connection was half-closed (plain TCP).
    """
    if isPlainTcp(transport):
        transport.loseWriteConnection()
        return True
    transport.loseConnection()
    return False


def endGently(transport, clock, linger):
    """
    End a connection lbws gives up on with FIN, not a reset: a backend that
    is slow to answer has done nothing wrong, and some servers (node's
    SockJS, for one) die of an unhandled ECONNRESET. On TCP only the write
    side is shut, so whatever the peer still sends is read (and discarded
    by the caller) until it closes too: closing a socket with unread bytes
    would send a reset after all. A TLS connection sends its close_notify
    and FIN. A peer that has not closed within C{linger} seconds is cut.

    @return: the DelayedCall of that cut, for the caller to cancel once the
        connection is lost.
    """
    endWriting(transport)
    return clock.callLater(linger, transport.abortConnection)
