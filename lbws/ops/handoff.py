"""
Take-over: a new lbws process (C{twistd lbws --config FILE --take-over})
takes the listening sockets and the established tunnels of the running one
over its C{handoff_socket}, so that an upgrade closes no connection (README,
"Upgrading without closing connections").

The two talk over the unix socket in length-prefixed JSON messages
(Twisted's C{Int32StringReceiver}); the sockets themselves go as
descriptors (SCM_RIGHTS) ahead of the message that names them
(C{"fds": N}, taken in order). The exchange, the old process first:

  1. C{hello {version, pid, listen, dashboard}}; the new process goes on
     only if it speaks that C{version} (L{VERSION}) and has the same
     endpoints, else it exits 1 and the old one keeps running;
  2. new: C{take {version}};
  3. old: C{listeners {ports, members}} with the listening sockets (and
     the backends' health); new: C{listening} once it accepts on them, and
     only then does the old one stop accepting, so that no client is
     refused;
  4. old, in batches: C{tunnels {tunnels: [state...]}} with both sockets
     of each tunnel that is at a frame boundary both ways with nothing
     queued (L{lbws.ws.tunnel.Tunnel.handoffState}); it stops reading them.
     New: C{adopted {ids, failed}} once it holds the sockets (not reading
     yet); old: C{commit {ids}}, forgets them, and the new one starts
     reading them. What the new one failed to take goes on in the old one;
  5. old: C{done {moved, kept, failed, counters}} once every tunnel moved,
     cannot move (TLS on a leg, closing), or is not at a boundary after
     C{handoff_timeout}. The old process then exits once it holds nothing,
     or after C{drain_timeout}, closing what is left with 1001.

If the new process dies on the way (or does not answer within
C{handoff_timeout}, or lbws is told to stop meanwhile), the old one takes
back what it had not committed, accepts again and keeps running; when it
gives up on purpose it says C{abort} first, so that the new one lets go of
what it adopted. If the old one dies without a word, the new one keeps
what it received (adopted tunnels start: nobody else holds them).
"""

import json
import os
import socket
import stat
import struct
from collections import deque

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.logger import Logger, LogLevel
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from lbws import compat
from lbws.transport.listen import (
    TlsServerEndpoint,
    TlsServerFactory,
    listenEndpoint,
    sslEndpoint,
)
from lbws.ws.server import ClientInfo
from lbws.ws.tunnel import Tunnel

_log = Logger()

# The version of the exchange and of the tunnel state. A change to either
# that an older lbws would misread takes a new number.
VERSION = 1
# Tunnels per message: each carries two descriptors, and the next batch
# waits for the answer to this one.
BATCH = 100
# Seconds between looks for tunnels that were not at a frame boundary.
RETRY = 0.02
# Seconds between looks at what the old process still holds.
DRAIN_POLL = 0.1
MAX_MESSAGE = 64 * 1024 * 1024


class CannotTakeOver(Exception):
    """
    The running lbws cannot be taken over; the message says why.
    """


class _Channel(Int32StringReceiver):
    """
    JSON messages over the handoff socket, with descriptors ahead of them.
    """

    MAX_LENGTH = MAX_MESSAGE

    def __init__(self):
        self.fds = deque()

    def fileDescriptorReceived(self, fd):
        self.fds.append(fd)

    def send(self, message, fds=()):
        for fd in fds:
            self.transport.sendFileDescriptor(fd)
        self.sendString(json.dumps({**message, "fds": len(fds)}).encode())

    def stringReceived(self, data):
        message = json.loads(data)
        fds = [self.fds.popleft() for _ in range(message.get("fds", 0))]
        try:
            self.received(message, fds)
        except Exception:
            _log.failure("handoff: cannot handle {kind}", kind=message.get("type"))
            self.transport.loseConnection()


def _peerUid(transport):
    """
    The user id of the process at the other end of a unix socket
    (SO_PEERCRED).
    """
    creds = transport.getHandle().getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    return struct.unpack("3i", creds)[1]


def _family(port):
    host = port.getHost()
    kind = getattr(host, "type", None)
    if kind == "TCP6":
        return socket.AF_INET6
    if kind == "TCP":
        return socket.AF_INET
    return socket.AF_UNIX


def _trafficOf(pool):
    return {member.name: member.traffic.own() for member in pool}


# The old process.


@implementer(IFileDescriptorReceiver)
class _Giving(_Channel):
    """
    The old process's end of one take-over.
    """

    def __init__(self, server):
        super().__init__()
        self.server = server

    def connectionMade(self):
        uid = _peerUid(self.transport)
        if uid != os.getuid():
            _log.warn("handoff socket: refused a process of user {uid}", uid=uid)
            self.transport.abortConnection()
            return
        self.server.connected(self)

    def received(self, message, fds):
        for fd in fds:
            os.close(fd)
        self.server.received(message)

    def connectionLost(self, reason):
        self.server.lost(self)


class HandoffServer(Service):
    """
    Listens on C{handoff_socket} and hands this lbws over to a process
    started with C{--take-over} (see the module docstring).

    @param service: the L{lbws.service.LbwsService} to hand over.
    @param ready: a Deferred to wait for before listening (a process that
        is itself taking over listens once it is done), or None.
    """

    def __init__(self, reactor, service, ready=None):
        self._reactor = reactor
        self._service = service
        self._ready = ready
        self._port = None
        self._peer = None
        self._taking = False
        self._listening = False  # the new process accepts
        self._decided = set()
        self._inFlight = {}
        self._next = 0
        self._retry = None
        self._replyTimer = None
        self._gaveUp = None
        self._deadline = None
        self.moved = self.kept = self.failed = 0
        self.handedOver = False

    @property
    def path(self):
        return self._service.settings.handoff_socket

    def startService(self):
        super().startService()
        if self._ready is None:
            self._listen()
        else:
            self._ready.addCallback(lambda _: self.running and self._listen())

    def stopService(self):
        super().stopService()
        stopped = []
        if self._port is not None:
            port, self._port = self._port, None
            stopped.append(defer.maybeDeferred(port.stopListening))
        if self._peer is not None and not self.handedOver:
            # lbws stops during a take-over: it takes back what is on the
            # way (lost), and the new process lets go of it; the drain
            # that follows finds every tunnel back in place.
            self._gaveUp = defer.Deferred()
            stopped.append(self._gaveUp)
            self._abort("lbws is stopping")
        return defer.DeferredList(stopped)

    def _listen(self):
        path = self.path
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                _log.error("handoff_socket {path} is not a socket: no take-over", path=path)
                return
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left by a process that is gone
            else:
                _log.error(
                    "handoff_socket {path} is in use by another process: no take-over",
                    path=path,
                )
                return
            finally:
                probe.close()
        factory = protocol.Factory.forProtocol(lambda: _Giving(self))
        # Created 0600 from the start, not chmod-ed after bind.
        umask = os.umask(0o177)
        try:
            d = UNIXServerEndpoint(self._reactor, path, mode=0o600).listen(factory)
        finally:
            os.umask(umask)
        d.addCallbacks(
            self._bound,
            lambda f: _log.failure("cannot listen on handoff_socket {path}", f, path=path),
        )

    def _bound(self, port):
        self._port = port

    # The exchange.

    def connected(self, peer):
        if self._peer is not None or self.handedOver or self._service.stopping:
            peer.send({"type": "refused", "reason": "a take-over is under way or lbws is stopping"})
            peer.transport.loseConnection()
            return
        self._peer = peer
        settings = self._service.settings
        peer.send(
            {
                "type": "hello",
                "version": VERSION,
                "pid": os.getpid(),
                "listen": settings.listen,
                "dashboard": settings.dashboard,
            }
        )

    def received(self, message):
        kind = message.get("type")
        if kind == "take":
            self._take(message)
        elif kind == "listening":
            self._newListens()
        elif kind == "adopted":
            self._adopted(message)
        elif kind == "failed":
            _log.error("the new lbws could not take over: {reason}", reason=message.get("reason"))
            self._peer.transport.loseConnection()

    def _abort(self, reason):
        """
        Give the take-over up: the new process lets go of what it adopted
        and this one had not committed, and this one goes on with it (see
        L{lost}).
        """
        _log.warn("take-over given up: {reason}", reason=reason)
        self._peer.send({"type": "abort", "reason": reason})
        self._peer.transport.loseConnection()

    def _expectReply(self):
        """
        The new process has C{handoff_timeout} seconds to answer.
        """
        self._cancelReply()
        timeout = self._service.settings.handoff_timeout
        self._replyTimer = self._reactor.callLater(
            timeout, self._abort, f"the new lbws did not answer within {timeout:g}s"
        )

    def _cancelReply(self):
        if self._replyTimer is not None and self._replyTimer.active():
            self._replyTimer.cancel()
        self._replyTimer = None

    def _take(self, message):
        peer = self._peer
        if message.get("version") != VERSION:
            reason = f"this lbws speaks handoff version {VERSION}, not {message.get('version')!r}"
            _log.warn("take-over refused: {reason}", reason=reason)
            peer.send({"type": "refused", "reason": reason})
            peer.transport.loseConnection()
            return
        self._taking = True
        # The new process listens on the same path once it is done.
        port, self._port = self._port, None
        if port is not None:
            port.stopListening()
        ports = self._ports()
        members = {m.name: [m.healthy, m.drained, m.changed] for m in self._service.pool}
        peer.send(
            {
                "type": "listeners",
                "ports": [{"name": name, "family": _family(p)} for name, p in ports],
                "members": members,
            },
            [p.fileno() for _, p in ports],
        )
        self._expectReply()

    def _ports(self):
        service = self._service
        ports = [("listen", service.listener.port)]
        if service.dashboard is not None and service.dashboard.port is not None:
            ports.append(("dashboard", service.dashboard.port))
        return ports

    def _newListens(self):
        self._cancelReply()
        self._listening = True
        self._service.frontend.handedOver = True
        for _, port in self._ports():
            compat.leaveListeningSocket(port)
            port.stopReading()
        self._deadline = self._reactor.seconds() + self._service.settings.handoff_timeout
        self._step()

    def _step(self):
        """
        Send the next batch of tunnels that can move now, or wait for
        those not at a boundary yet, or finish.
        """
        self._retry = None
        if self._inFlight or self._peer is None:
            return
        relay = self._service.relay
        batch = []
        waiting = False
        for tunnel in list(relay.tunnels):
            if tunnel in self._decided:
                continue
            if not tunnel.canMove:
                self._decided.add(tunnel)
                self.kept += 1
                continue
            state = tunnel.handoffState()
            if state is None:
                waiting = True
                continue
            batch.append((tunnel, state))
            if len(batch) == BATCH:
                break
        if batch:
            self._send(batch)
            return
        if (waiting or relay.opening) and self._reactor.seconds() < self._deadline:
            self._retry = self._reactor.callLater(RETRY, self._step)
            return
        self._finish()

    def _send(self, batch):
        tunnels, fds = [], []
        for tunnel, state in batch:
            self._next += 1
            tunnel.detach()
            self._decided.add(tunnel)
            self._inFlight[self._next] = (tunnel, state)
            families = []
            for tcp in tunnel.sockets:
                fds.append(tcp.fileno())
                families.append(tcp.getHandle().family)
            tunnels.append({"id": self._next, "families": families, "state": state})
        self._peer.send({"type": "tunnels", "tunnels": tunnels}, fds)
        self._expectReply()

    def _adopted(self, message):
        self._cancelReply()
        failed = {int(k): v for k, v in message.get("failed", {}).items()}
        ids = [int(i) for i in message["ids"]]
        for tunnelId, reason in failed.items():
            tunnel, state = self._inFlight.pop(tunnelId)
            _log.warn("tunnel of {peer} stays: {reason}", peer=tunnel.info.peer, reason=reason)
            tunnel.reattach(state)
            self.failed += 1
        # The new process starts reading once it has the commit.
        self._peer.send({"type": "commit", "ids": ids})
        for tunnelId in ids:
            tunnel, _ = self._inFlight.pop(tunnelId)
            sockets = tunnel.sockets
            tunnel.moved()
            for tcp in sockets:
                compat.forgetConnection(tcp)
            self.moved += 1
        _log.info("handoff: {moved} connection(s) moved so far", moved=self.moved)
        self._step()

    def _finish(self):
        service = self._service
        relay = service.relay
        # What stays here: could not move (TLS, closing), or was never at a
        # boundary in time; those that failed to move are counted apart.
        self.kept = max(0, len(relay.tunnels) - self.failed)
        counters = service.counters
        self._peer.send(
            {
                "type": "done",
                "moved": self.moved,
                "kept": self.kept,
                "failed": self.failed,
                "counters": {
                    **counters.snapshot(),
                    "routes": [[r, w, n] for (r, w), n in counters.routes.items()],
                },
                "traffic": _trafficOf(service.pool),
            }
        )
        self.handedOver = True
        self._peer.transport.loseConnection()
        service.events.record(
            "handoff",
            "handed over to a new lbws: {moved} connection(s) moved, {kept} stay here"
            " until they end or drain_timeout, {failed} failed to move",
            moved=self.moved,
            kept=self.kept,
            failed=self.failed,
            role="old",
        )
        service.announcer.handedOver()
        self._drain(self._reactor.seconds())

    def _drain(self, start):
        """
        Exit once nothing is held here any more, or once C{drain_timeout}
        has passed (then what is left is closed with 1001 as on a stop).
        """
        relay = self._service.relay
        settings = self._service.settings
        if relay.tunnels or relay.http or relay.clients:
            if self._reactor.seconds() - start < settings.drain_timeout:
                self._reactor.callLater(DRAIN_POLL, self._drain, start)
                return
        _log.info("handed over: exiting")
        self._reactor.stop()

    def lost(self, peer):
        if peer is not self._peer:
            return
        self._peer = None
        self._cancelReply()
        gaveUp, self._gaveUp = self._gaveUp, None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if not self.handedOver and self._taking:
            self._takeBack()
        if gaveUp is not None:
            gaveUp.callback(None)

    def _takeBack(self):
        """
        The take-over ended before it was done (the new process went away
        or was given up): keep what is still here, accept again.
        """
        for tunnel, state in self._inFlight.values():
            tunnel.reattach(state)
            self.failed += 1
        self._inFlight.clear()
        self._decided.clear()
        if self._listening:
            for _, port in self._ports():
                port.startReading()
        self._service.frontend.handedOver = False
        self._taking = self._listening = False
        self._service.events.record(
            "handoff",
            "take-over failed: {moved} connection(s) had moved to the new lbws,"
            " {failed} came back; this lbws goes on",
            LogLevel.warn,
            moved=self.moved,
            kept=len(self._service.relay.tunnels),
            failed=self.failed,
            role="old",
        )
        self.moved = self.kept = self.failed = 0
        if self.running:
            self._listen()


# The new process.


class HandedEndpoint:
    """
    The endpoint a taking-over lbws listens with: the socket the old
    process hands over, served as the endpoint C{description} would serve
    it (TLS, PROXY protocol). If the old process goes away before it hands
    the socket over, the endpoint listens itself.
    """

    def __init__(self, reactor, takeOver, name, description):
        self._reactor = reactor
        self._takeOver = takeOver
        self.name = name
        self.description = description
        self._factory = None
        self._d = None

    def listen(self, factory):
        self._factory = factory
        self._d = Deferred()
        self._takeOver.endpoints[self.name] = self
        return self._d

    def adopt(self, fd, family):
        factory = _wrapped(self._reactor, self.description, self._factory)
        try:
            port = self._reactor.adoptStreamPort(fd, family, factory)
        finally:
            os.close(fd)
        self._d.callback(port)

    def listenItself(self):
        if self._d is not None and not self._d.called:
            endpoint = listenEndpoint(self._reactor, self.description)
            endpoint.listen(self._factory).chainDeferred(self._d)


def _wrapped(reactor, description, factory):
    """
    C{factory} with what the endpoint of C{description} puts around it:
    the wrappers' factories (C{haproxy:}), then TLS for C{ssl:}.
    """
    endpoint = listenEndpoint(reactor, description)
    while compat.innerEndpoint(endpoint) is not None:
        factory = compat.wrapperFactoryOf(endpoint)(factory)
        endpoint = compat.innerEndpoint(endpoint)
    if isinstance(endpoint, TlsServerEndpoint):
        # lbws's own TLS over TCP (ssl:, see lbws.transport.listen).
        return TlsServerFactory(endpoint.tls, factory)
    ssl = sslEndpoint(endpoint)
    if ssl is not None:
        factory = TLSMemoryBIOFactory(compat.tlsOptionsOf(ssl), False, factory)
    return factory


class _Placeholder(protocol.Protocol):
    """
    The protocol of an adopted tunnel socket until its tunnel's leg takes
    over (L{lbws.compat.handOver}); it is not read meanwhile.
    """


@implementer(IFileDescriptorReceiver)
class _Taking(_Channel):
    def __init__(self, takeOver):
        super().__init__()
        self.takeOver = takeOver

    def connectionMade(self):
        self.send({"type": "take", "version": VERSION})

    def received(self, message, fds):
        try:
            self.takeOver.received(self, message, fds)
        except Exception:
            self.takeOver.abandon()
            raise

    def connectionLost(self, reason):
        self.takeOver.lost()


class TakeOver(Service):
    """
    The new process's end: takes the listeners and tunnels of the lbws
    whose handoff socket L{connect} reached.

    @ivar finished: fires once the take-over is over, whichever way: then
        this process's own handoff socket listens.
    """

    def __init__(self, reactor, sock, hello):
        self._reactor = reactor
        self._sock = sock
        self.hello = hello
        self.endpoints = {}
        self.service = None
        self.finished = Deferred()
        self._pending = {}
        self._listening = False
        # Whether the exchange was given up on purpose (by either side)
        # rather than cut by the old process's death.
        self._abandoned = False
        self.moved = self.failed = 0

    def endpoint(self, name, description):
        return HandedEndpoint(self._reactor, self, name, description)

    def startService(self):
        super().startService()
        factory = protocol.Factory.forProtocol(lambda: _Taking(self))
        self._reactor.adoptStreamConnection(self._sock.fileno(), socket.AF_UNIX, factory)
        self._sock.close()

    def received(self, channel, message, fds):
        kind = message.get("type")
        if kind == "listeners":
            self._listeners(channel, message, fds)
        elif kind == "tunnels":
            self._tunnels(channel, message, fds)
        elif kind == "commit":
            for tunnelId in message["ids"]:
                self._start(self._pending.pop(tunnelId))
        elif kind == "done":
            self._done(message)
        elif kind == "abort":
            self._abandoned = True
        elif kind == "refused":
            for fd in fds:
                os.close(fd)
            _log.critical("lbws: cannot take over: {reason}", reason=message.get("reason"))
            self._reactor.stop()

    def _listeners(self, channel, message, fds):
        for entry, fd in zip(message["ports"], fds):
            endpoint = self.endpoints.get(entry["name"])
            if endpoint is None:
                os.close(fd)
                continue
            endpoint.adopt(fd, entry["family"])
        for name, (healthy, drained, changed) in message.get("members", {}).items():
            member = self.service.pool.members.get(name)
            if member is not None:
                member.follow(healthy, drained, changed)
        self._listening = True
        channel.send({"type": "listening"})

    def _tunnels(self, channel, message, fds):
        fds = iter(fds)
        ids, failed = [], {}
        pool, relay = self.service.pool, self.service.relay
        routes = {route.name: route for route in relay.routes.routes}
        for entry in message["tunnels"]:
            tunnelId = entry["id"]
            state = entry["state"]
            transports = []
            for family in entry["families"]:
                fd = next(fds)
                try:
                    transport = self._reactor.adoptStreamConnection(fd, family, _PLACEHOLDERS)
                    transport.stopReading()
                    transports.append(transport)
                finally:
                    os.close(fd)
            problem = None
            if state["member"] not in pool.members:
                problem = f"backend {state['member']} is not in this lbws's configuration"
            elif state["route"] not in routes:
                problem = f"route {state['route']} is not in this lbws's configuration"
            if problem is not None:
                failed[tunnelId] = problem
                self.failed += 1
                for transport in transports:
                    compat.forgetConnection(transport)
                continue
            self._pending[tunnelId] = (transports, state, routes[state["route"]])
            ids.append(tunnelId)
        channel.send({"type": "adopted", "ids": ids, "failed": failed})

    def _start(self, pending):
        (client, backend), state, route = pending
        relay = self.service.relay
        member = self.service.pool.members[state["member"]]
        info = ClientInfo(state["peer"], state["target"], False)
        info.route = route
        info.key = state["key"]
        info.keySource = state["keySource"]
        info.subprotocol = state["subprotocol"]
        tunnel = Tunnel(relay, client, backend, member, member.opened(), info, route)
        tunnel.importState(state)
        compat.handOver(client.protocol, tunnel.client)
        compat.handOver(backend.protocol, tunnel.backend)
        relay.tunnelAdopted(tunnel)
        client.startReading()
        backend.startReading()
        self.moved += 1

    def abandon(self):
        """
        This process cannot go on with the exchange: what the old one has
        not committed stays there.
        """
        self._abandoned = True

    def _done(self, message):
        service = self.service
        service.counters.carry(message["counters"])
        for name, counts in message["traffic"].items():
            member = service.pool.members.get(name)
            if member is not None:
                member.traffic.carry(counts)
        self._record(message["kept"], "took over from lbws {pid}: {moved} connection(s) moved,"
                     " {kept} stay there, {failed} failed to move")

    def _record(self, kept, text, level=LogLevel.info):
        if self.finished.called:
            return
        self.service.events.record(
            "handoff",
            text,
            level,
            moved=self.moved,
            kept=kept,
            failed=self.failed,
            pid=self.hello["pid"],
            role="new",
        )
        self.finished.callback(None)

    def lost(self):
        if self.finished.called:
            return
        pending, self._pending = list(self._pending.values()), {}
        if self._abandoned:
            # The old process gave up (it said so) or this one failed: the
            # old one goes on with what it had not committed.
            for (client, backend), _, _ in pending:
                compat.forgetConnection(client)
                compat.forgetConnection(backend)
                self.failed += 1
        else:
            # The old process died without a word: nobody else holds what
            # came here.
            for entry in pending:
                self._start(entry)
        for endpoint in self.endpoints.values():
            endpoint.listenItself()
        if self._abandoned:
            text = (
                "the take-over from lbws {pid} was given up: {moved} connection(s)"
                " moved, {failed} stay there"
            )
        else:
            text = (
                "the old lbws {pid} went away during the take-over: {moved} connection(s)"
                " moved, {failed} failed"
            )
        self._record(None, text, LogLevel.warn)


_PLACEHOLDERS = protocol.Factory.forProtocol(_Placeholder)



def connect(settings):
    """
    Reach the running lbws's handoff socket and read its hello, before the
    reactor runs.

    @return: C{(sock, hello)}: the connected socket and the old
        process's hello, for a L{TakeOver}.
    @raise CannotTakeOver: when there is no lbws to take over, it speaks
        another version, or it listens elsewhere.
    """
    path = settings.handoff_socket
    if not path:
        raise CannotTakeOver(f"{settings.path}: [lbws] handoff_socket is not set")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(settings.handoff_timeout)
    try:
        sock.connect(path)
        hello = _readOne(sock)
    except OSError as e:
        sock.close()
        raise CannotTakeOver(f"no lbws answers on {path}: {e.strerror or e}") from None
    except ValueError as e:
        sock.close()
        raise CannotTakeOver(f"{path}: {e}") from None
    problem = None
    if hello.get("type") == "refused":
        problem = f"the running lbws refused: {hello.get('reason')}"
    elif hello.get("type") != "hello" or hello.get("version") != VERSION:
        problem = (
            f"the running lbws speaks handoff version {hello.get('version')!r},"
            f" this one {VERSION}: it keeps running; upgrade in two steps"
        )
    else:
        for key in ("listen", "dashboard"):
            if hello.get(key) != getattr(settings, key):
                problem = (
                    f"{settings.path}: [lbws] {key} is {getattr(settings, key)!r}, the"
                    f" running lbws's is {hello.get(key)!r}: a take-over keeps the listeners"
                )
    if problem is not None:
        sock.close()
        raise CannotTakeOver(problem)
    sock.setblocking(False)
    return sock, hello


def _readOne(sock):
    """
    One message, read with the socket blocking.
    """

    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ValueError("the running lbws closed the connection")
            data += chunk
        return data

    (length,) = struct.unpack("!I", exactly(4))
    if length > MAX_MESSAGE:
        raise ValueError("not an lbws handoff socket")
    try:
        return json.loads(exactly(length))
    except ValueError:
        raise ValueError("not an lbws handoff socket") from None
