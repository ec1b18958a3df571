"""
Handing accepted client connections from one process to another, for
C{workers = N} (L{lbws.workers}): the supervisor accepts on the listening
socket (L{Acceptor}) and passes each connection's socket to the worker it
chooses, over a unix socket pair of its own per worker (L{Channel},
SCM_RIGHTS); the worker takes them in (L{Receiver}) and serves each as if
it had accepted it.

Why not let every worker accept on the shared socket, or give each its own
C{SO_REUSEPORT} socket: the kernel then decides, and does it badly for a
load balancer. With one shared socket the worker that happens to be awake
takes whole bursts (6/14 with two workers, 45/3/12 with three, and every
client on the survivor after a restart); C{SO_REUSEPORT} hashes each
client's addresses, so 60 clients over 3 workers are spread like dice,
and a restarted worker gets only its share of new clients while the others
keep theirs. The supervisor, which knows how many connections each worker
holds, can send each new client to the one with the fewest.

Each message on a channel is one byte with one descriptor (C{SOCK_SEQPACKET},
so that a descriptor never arrives split from its message). Everything is
non-blocking: a channel that is full says so (L{Channel.send} returns
False), and the supervisor stops accepting until one has room again, so
clients wait in the kernel's listen backlog, not in lbws.
"""

import errno
import os
import socket

from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

_log = Logger()

# Accepts per wake-up of the listening socket: as Twisted's own port, a
# burst is taken in one go, and the reactor still gets to other work.
ACCEPTS_PER_READ = 100

# Descriptors taken per wake-up of a worker's channel.
RECEIVES_PER_READ = 100

_MESSAGE = b"c"

# What accept() may fail with that is not about the listening socket: the
# client gave up meanwhile, or lbws is out of descriptors or memory for a
# moment (the connection stays in the backlog).
_PASSING_ERRORS = frozenset(
    [errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EMFILE, errno.ENFILE,
     errno.ENOBUFS, errno.ENOMEM, errno.EINTR]
)


def channelPair():
    """
    A new channel's two ends: the supervisor's (non-blocking) and the
    worker's, to give to the worker process as a descriptor.
    """
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setblocking(False)
    return mine, theirs


@implementer(IReadDescriptor)
class Acceptor:
    """
    Accepts clients on a listening socket (a duplicate of the descriptor
    C{fd}, so that the listening port keeps its own) and hands each, as a
    non-blocking socket, to C{handOut}.

    @param handOut: called with each accepted socket; it owns it then.
    """

    def __init__(self, reactor, fd, family, handOut):
        self._reactor = reactor
        self._socket = socket.fromfd(fd, family, socket.SOCK_STREAM)
        self._socket.setblocking(False)
        self._handOut = handOut
        self._reading = False

    def fileno(self):
        return self._socket.fileno()

    def logPrefix(self):
        return "Acceptor"

    def resume(self):
        """
        Accept (again).
        """
        if not self._reading and self._socket.fileno() >= 0:
            self._reading = True
            self._reactor.addReader(self)

    def pause(self):
        """
        Leave new clients in the listen backlog for now.
        """
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)

    def close(self):
        """
        Stop accepting for good and close this process's copy of the
        listening socket.
        """
        self.pause()
        self._socket.close()

    def doRead(self):
        for _ in range(ACCEPTS_PER_READ):
            if not self._reading:
                return None
            try:
                client, _ = self._socket.accept()
            except BlockingIOError:
                return None
            except OSError as e:
                if e.errno in _PASSING_ERRORS:
                    return None
                raise
            client.setblocking(False)
            self._handOut(client)
        return None

    def connectionLost(self, reason):
        _log.failure("lbws stopped accepting clients", reason)
        self.close()


@implementer(IWriteDescriptor)
class Channel:
    """
    The supervisor's end of one worker's channel.

    @param whenWritable: called once the channel has room again after
        L{send} found it full (and L{watch} was asked).
    """

    def __init__(self, reactor, sock, whenWritable):
        self._reactor = reactor
        self._socket = sock
        self._whenWritable = whenWritable
        self._watching = False

    def fileno(self):
        return self._socket.fileno()

    def logPrefix(self):
        return "Channel"

    def send(self, client):
        """
        Pass the socket C{client} to the worker; this process's copy is
        closed once it is on its way.

        @return: True if sent, False if the channel is full (the caller
            keeps C{client}).
        @raise OSError: when the worker's end is gone.
        """
        try:
            socket.send_fds(self._socket, [_MESSAGE], [client.fileno()])
        except (BlockingIOError, InterruptedError):
            return False
        client.close()
        return True

    def watch(self):
        """
        Call C{whenWritable} once the channel has room.
        """
        if not self._watching and self._socket.fileno() >= 0:
            self._watching = True
            self._reactor.addWriter(self)

    def doWrite(self):
        self._unwatch()
        self._whenWritable()
        return None

    def _unwatch(self):
        if self._watching:
            self._watching = False
            self._reactor.removeWriter(self)

    def close(self):
        """
        The worker is gone: what it did not take yet is closed with the
        channel.
        """
        self._unwatch()
        self._socket.close()

    def connectionLost(self, reason):
        self.close()


@implementer(IReadDescriptor)
class Receiver:
    """
    The worker's end of its channel: each descriptor that comes is handed
    to C{received} (which owns it then); C{lost} is called once the
    supervisor closed its end.
    """

    def __init__(self, reactor, fd, received, lost):
        self._reactor = reactor
        self._socket = socket.socket(fileno=fd)
        self._socket.setblocking(False)
        self._received = received
        self._lost = lost
        self._reading = False
        self.count = 0  # descriptors received so far

    def fileno(self):
        return self._socket.fileno()

    def logPrefix(self):
        return "Receiver"

    def start(self):
        if not self._reading:
            self._reading = True
            self._reactor.addReader(self)

    def doRead(self):
        for _ in range(RECEIVES_PER_READ):
            try:
                message, fds, _, _ = socket.recv_fds(self._socket, 16, 4)
            except (BlockingIOError, InterruptedError):
                return None
            if not message and not fds:
                return self._end(Failure(ConnectionError("the supervisor closed the channel")))
            for fd in fds:
                self.count += 1
                self._received(fd)
        return None

    def drain(self):
        """
        Take in what is already on the channel, then stop reading it.
        """
        if self._socket.fileno() >= 0:
            self.doRead()
        self.stop()

    def stop(self):
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)

    def _end(self, reason):
        self.stop()
        self._socket.close()
        self._lost(reason)
        return None

    def connectionLost(self, reason):
        if self._socket.fileno() >= 0:
            self._end(reason)


def closeDescriptor(fd):
    """
    Close a descriptor that came over a channel and was not taken.
    """
    try:
        os.close(fd)
    except OSError:
        pass
