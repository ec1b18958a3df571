"""
DNS discovery: backends that scale out behind a name (a Kubernetes headless
service, Consul DNS) become one pool member per address.

A C{[backend:NAME]} section is a discovery template when it gives

  - C{srv = _ws._tcp.chat.example}: its SRV records are looked up, and each
    target of the lowest priority is resolved to its A and AAAA addresses;
    each address with the record's port is a member, reached over ws://
    (its Host header is the SRV target's name). SRV weights are not used:
    every member has the section's C{weight}. Re-resolved every C{resolve}
    seconds, or 30 with C{resolve = 0}.
  - C{url = ws://chat.example:8010/app} with C{resolve = SECONDS}: the
    url's host is resolved to its A and AAAA addresses every C{resolve}
    seconds; each address is a member with the url's scheme, port and path
    (its Host header and, for wss://, the TLS name checked stay the url's
    host).

Members are named C{NAME/ADDRESS:PORT} (C{NAME/[ADDRESS]:PORT} for IPv6) and
take the rest of their settings (weight, ca, verify) from the section.

  - A new address joins as a member that is not healthy: it gets
    connections once it passes C{rise} health checks (and then its
    C{slow_start}).
  - A vanished address's member is marked removed: it drains (no new
    connections, open ones stay) and leaves the pool with its last
    connection.
  - A lookup that fails (timeout, server failure) changes nothing: members
    stay as they were until a lookup succeeds. A name that does not exist
    (NXDOMAIN) or has no address is an answer: every member drains.

Lookups use twisted.names with a resolver built from the system's
/etc/resolv.conf and /etc/hosts, created only if a section needs it; tests
hand L{Discovery} their own resolver (e.g. one asking a twisted.names server
on 127.0.0.1).
"""

import socket

from twisted.application.service import Service
from twisted.internet.defer import DeferredList, gatherResults, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import AuthoritativeDomainError, DNSNameError

import attrs

from lbws.config import resolveInterval

_log = Logger()

# "No such name" from a name server (NXDOMAIN), or from a local authority.
NO_SUCH_NAME = (DNSNameError, AuthoritativeDomainError)

# Seconds a lookup waits for the server: its tries (twisted.names retries
# with each timeout in turn).
LOOKUP_TIMEOUT = (1, 3)


def systemResolver(reactor):
    """
    A twisted.names resolver reading /etc/hosts, then asking the name
    servers of /etc/resolv.conf.
    """
    from twisted.names import client, hosts, resolve

    return resolve.ResolverChain(
        [
            hosts.Resolver(b"/etc/hosts"),
            client.Resolver(resolv="/etc/resolv.conf", reactor=reactor),
        ]
    )


@attrs.frozen
class Target:
    """
    One address found for a template: connect to C{address}:C{port}; C{host}
    is the name for the Host header (and TLS).
    """

    address: str
    port: int
    host: str


def memberName(group, target):
    address = target.address
    if ":" in address:
        address = f"[{address}]"
    return f"{group}/{address}:{target.port}"


def memberSettings(template, target):
    """
    The settings of the member for C{target} of C{template}.
    """
    scheme = "wss" if template.secure else "ws"
    address = f"[{target.address}]" if ":" in target.address else target.address
    return attrs.evolve(
        template,
        name=memberName(template.name, target),
        url=f"{scheme}://{address}:{target.port}{template.path}",
        host=target.host,
        port=target.port,
        address=target.address,
        group=template.name,
        srv="",
        resolve=0.0,
    )


def _addresses(records):
    found = []
    for record in records:
        if record.type == dns.A:
            found.append(record.payload.dottedQuad())
        elif record.type == dns.AAAA:
            found.append(socket.inet_ntop(socket.AF_INET6, record.payload.address))
    return found


def lookupAddresses(resolver, name):
    """
    The A and AAAA addresses of C{name}, in answer order without repeats.

    @return: a Deferred firing with a list (empty if the name does not
        exist or has no address), or failing if neither lookup got an
        answer.
    """
    lookups = [
        resolver.lookupAddress(name, timeout=LOOKUP_TIMEOUT),
        resolver.lookupIPV6Address(name, timeout=LOOKUP_TIMEOUT),
    ]

    def combine(results):
        found = []
        failures = []
        for ok, value in results:
            if ok:
                found.extend(_addresses(value[0]))
            elif value.check(*NO_SUCH_NAME):
                pass  # no such name: an answer, with no address
            else:
                failures.append(value)
        if failures and len(failures) == len(results):
            return failures[0]
        return list(dict.fromkeys(found))

    return DeferredList(lookups, consumeErrors=True).addCallback(combine)


def lookupSrv(resolver, name):
    """
    The targets of the SRV records of C{name} with the lowest priority,
    each resolved to its addresses.

    @return: a Deferred firing with a list of L{Target}s.
    """
    d = resolver.lookupService(name, timeout=LOOKUP_TIMEOUT)

    def found(result):
        answers, _authority, additional = result
        records = [r.payload for r in answers if r.type == dns.SRV]
        records = [r for r in records if str(r.target) not in ("", ".")]
        if not records:
            return []
        lowest = min(r.priority for r in records)
        records = [r for r in records if r.priority == lowest]
        known = {}
        for record in additional:
            if record.type in (dns.A, dns.AAAA):
                known.setdefault(str(record.name).lower(), []).extend(_addresses([record]))

        def resolved(addresses, record):
            host = str(record.target).rstrip(".")
            return [Target(a, record.port, host) for a in addresses]

        lookups = []
        for record in records:
            target = str(record.target)
            if target.lower() in known:
                addresses = succeed(known[target.lower()])
            else:
                addresses = lookupAddresses(resolver, target)
            lookups.append(addresses.addCallback(resolved, record))
        d = gatherResults(lookups, consumeErrors=True)
        d.addCallback(lambda lists: [t for targets in lists for t in targets])
        d.addErrback(lambda failure: failure.value.subFailure)
        return d

    def nxdomain(failure):
        failure.trap(*NO_SUCH_NAME)
        return []

    return d.addCallbacks(found, nxdomain)


def lookupTargets(resolver, template):
    """
    The targets of a discovery template now.
    """
    if template.srv:
        return lookupSrv(resolver, template.srv)
    d = lookupAddresses(resolver, template.host)
    d.addCallback(lambda addresses: [Target(a, template.port, template.host) for a in addresses])
    return d


def _query(template):
    """
    What a template's lookups depend on: when this changes on reload,
    lbws looks up again at once.
    """
    return (template.srv, template.host, template.port, template.resolve)


class _Group:
    """
    The lookups of one template, and its members.
    """

    def __init__(self, discovery, template):
        self.discovery = discovery
        self.template = template
        self.pending = None
        self.targets = None  # the last targets found (None: no answer yet)
        self.loop = LoopingCall(self.lookup)
        self.loop.clock = discovery.reactor

    def start(self):
        self.loop.start(resolveInterval(self.template), now=True)

    def stop(self):
        if self.loop.running:
            self.loop.stop()
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.cancel()

    def lookup(self):
        try:
            if self.pending is not None:
                return  # the previous lookup is still waiting for an answer
            template = self.template
            d = self.pending = lookupTargets(self.discovery.resolver, template)
            d.addCallbacks(self._found, self._failed, callbackArgs=(d,), errbackArgs=(d,))
            d.addErrback(
                lambda failure: _log.failure(
                    "DNS discovery for backend {backend} failed", failure, backend=template.name
                )
            )
        except Exception:
            self.pending = None
            _log.failure("DNS discovery for backend {backend} failed", backend=self.template.name)

    def _found(self, targets, d):
        if self.pending is not d:
            return  # stopped, or replaced by a reload
        self.pending = None
        if not targets and self.targets:
            _log.warn(
                "backend {backend}: {name} has no address now; its members drain",
                backend=self.template.name,
                name=self.template.srv or self.template.host,
            )
        self.targets = targets
        self.apply()

    def _failed(self, failure, d):
        if self.pending is not d:
            return None
        self.pending = None
        _log.warn(
            "backend {backend}: looking up {name} failed, members kept: {why}",
            backend=self.template.name,
            name=self.template.srv or self.template.host,
            why=failure.getErrorMessage() or failure.type.__name__,
        )
        return None

    def apply(self):
        """
        Make the pool's members of this template match the last targets
        (see L{lbws.backends.pool.Pool.updateGroup}).
        """
        if self.targets is None:
            return
        wanted = {}
        for target in self.targets:
            settings = memberSettings(self.template, target)
            wanted[settings.name] = settings
        self.discovery.pool.updateGroup(self.template.name, wanted)
        self.discovery.changed()


class Discovery(Service):
    """
    Keeps the members of every discovery template of the pool's settings
    in step with DNS.

    @param health: the L{lbws.backends.health.HealthChecker} told when members join
        or leave, or None.
    @param resolver: a twisted.names C{IResolver}; by default
        L{systemResolver}, made when first needed.
    """

    name = "discovery"

    def __init__(self, reactor, pool, health=None, resolver=None):
        self.reactor = reactor
        self.pool = pool
        self.health = health
        self._resolver = resolver
        self._groups = {}

    @property
    def resolver(self):
        if self._resolver is None:
            self._resolver = systemResolver(self.reactor)
        return self._resolver

    def startService(self):
        super().startService()
        self.sync(self.pool.settings)

    def stopService(self):
        super().stopService()
        groups, self._groups = self._groups, {}
        for group in groups.values():
            group.stop()

    def sync(self, settings):
        """
        Follow a (re)loaded configuration: start looking up new templates,
        stop the removed ones (the pool drains their members), and for
        changed ones apply the new settings to the members at once and,
        if the name, port or interval changed, look up again now.
        """
        templates = {b.name: b for b in settings.backends if b.discovered}
        for name, group in list(self._groups.items()):
            if name not in templates:
                group.stop()
                del self._groups[name]
        if not self.running:
            return
        for name, template in templates.items():
            group = self._groups.get(name)
            if group is not None and group.template == template:
                continue
            if group is not None and _query(group.template) == _query(template):
                group.template = template
                group.apply()
                continue
            if group is not None:
                group.stop()
            group = self._groups[name] = _Group(self, template)
            group.start()

    def changed(self):
        if self.health is not None:
            self.health.sync()

    def lookingUp(self):
        """
        The names of the templates being looked up, for tests and the log.
        """
        return sorted(self._groups)
