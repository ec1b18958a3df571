"""
Handing accepted connections between processes (lbws/transport/dispatch.py),
over real sockets in this process: the acceptor takes clients off a
listening socket, a channel passes each to a receiver with its descriptor,
and a full channel says so instead of blocking.
"""

import os
import socket

import pytest_twisted
from twisted.internet import defer, reactor

from lbws.transport.dispatch import Acceptor, Channel, Receiver, channelPair
from tests.support import eventually


def listening():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


@pytest_twisted.ensureDeferred
async def test_accepted_clients_reach_the_receiver_and_speak_through_it():
    server = listening()
    mine, theirs = channelPair()
    got = []
    lost = []
    receiver = Receiver(reactor, os.dup(theirs.fileno()), got.append, lost.append)
    theirs.close()
    writable = []
    channel = Channel(reactor, mine, lambda: writable.append(True))
    handed = []

    def handOut(client):
        handed.append(client.getpeername())
        assert client.getblocking() is False
        assert channel.send(client)
        assert client.fileno() == -1  # this side's copy is closed once sent

    acceptor = Acceptor(reactor, server.fileno(), socket.AF_INET, handOut)
    receiver.start()
    acceptor.resume()
    clients = [socket.create_connection(server.getsockname()) for _ in range(3)]
    try:
        await eventually(lambda: len(got) == 3)
        assert receiver.count == 3
        assert sorted(handed) == sorted(c.getsockname() for c in clients)
        # Each descriptor is the client's connection, in the receiving end.
        for fd, client in zip(got, clients):
            conn = socket.socket(fileno=fd)
            assert conn.getpeername() == client.getsockname()
            conn.sendall(b"from the worker")
            assert client.recv(100) == b"from the worker"
            conn.close()
        # Paused, the acceptor leaves new clients in the backlog.
        acceptor.pause()
        late = socket.create_connection(server.getsockname())
        clients.append(late)
        for _ in range(5):
            await defer.Deferred.fromCoroutine(_turn())
        assert len(got) == 3
        acceptor.resume()
        await eventually(lambda: len(got) == 4)
        os.close(got[3])
        # The supervisor's end goes: the receiver hears of it.
        channel.close()
        await eventually(lambda: lost)
        assert "closed the channel" in str(lost[0].value)
    finally:
        acceptor.close()
        server.close()
        for client in clients:
            client.close()


async def _turn():
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.01)


@pytest_twisted.ensureDeferred
async def test_a_full_channel_says_so_and_calls_back_when_it_has_room():
    mine, theirs = channelPair()
    writable = []
    channel = Channel(reactor, mine, lambda: writable.append(True))
    sent = 0
    held = []
    try:
        while True:
            a, b = socket.socketpair()
            held += [a, b]
            if not channel.send(a):
                break
            sent += 1
            assert sent < 100000
        assert sent > 0 and a.fileno() >= 0  # not sent: still the caller's
        channel.watch()
        received = []
        receiver = Receiver(reactor, os.dup(theirs.fileno()), received.append, lambda _: None)
        receiver.start()
        await eventually(lambda: writable == [True])
        await eventually(lambda: len(received) == sent)
        assert channel.send(a)
        receiver.stop()
        for fd in received:
            os.close(fd)
    finally:
        channel.close()
        theirs.close()
        for s in held:
            s.close()
