"""
Balancing strategies: which healthy backend a new client connection goes to.

Each strategy is given the candidates (members that are up, have a weight
above zero and were not tried yet for this client), the client's hash key
and the candidates' effective weights, and returns one of them.

The effective weight is the configured weight, except while a member is in
its C{slow_start} ramp (L{lbws.backends.pool.Pool.effectiveWeight}): then it grows
from almost 0 to the weight, so every strategy gives the member a share of
new connections that grows linearly.
"""

import hashlib
import math


class RoundRobin:
    """
    Smooth weighted round robin, as nginx does it: a backend of weight 3
    gets three of every four connections next to one of weight 1, spread
    out rather than in bursts.
    """

    def __init__(self):
        self._current = {}

    def pick(self, candidates, key=None, weights=None):
        weights = _weights(candidates, weights)
        total = 0
        best = None
        for member, weight in zip(candidates, weights):
            current = self._current.get(member.name, 0) + weight
            self._current[member.name] = current
            total += weight
            if best is None or current > self._current[best.name]:
                best = member
        self._current[best.name] -= total
        return best


class LeastConnections:
    """
    The backend with the fewest open connections for its weight; ties go
    round robin so that an idle pool still spreads its first connections.
    """

    def __init__(self):
        self._turn = 0

    def pick(self, candidates, key=None, weights=None):
        self._turn += 1
        weights = _weights(candidates, weights)
        loads = [member.active / weight for member, weight in zip(candidates, weights)]
        lightest = min(loads)
        tied = [m for m, load in zip(candidates, loads) if load == lightest]
        return tied[self._turn % len(tied)]


class RendezvousHash:
    """
    Weighted rendezvous (highest random weight) hashing: each key goes to
    the backend with the highest score, so when a backend leaves only its
    own keys move, and they come back when it returns. Clients without a
    key (a missing header, say) are spread by least connections.
    """

    def __init__(self):
        self._fallback = LeastConnections()

    def pick(self, candidates, key=None, weights=None):
        if key is None:
            return self._fallback.pick(candidates, weights=weights)
        weights = _weights(candidates, weights)
        best = max(
            range(len(candidates)),
            key=lambda i: score(key, candidates[i], weights[i]),
        )
        return candidates[best]


def _weights(candidates, weights):
    if weights is None:
        return [member.weight for member in candidates]
    return weights


def score(key, member, weight=None):
    """
    The member's rendezvous score for C{key}: the highest wins. With
    weights, a member of weight 2 wins twice as many keys as one of weight
    1 (the C{-w / ln(u)} form of weighted rendezvous hashing).
    """
    if weight is None:
        weight = member.weight
    digest = hashlib.blake2b(
        f"{member.name}\0{key}".encode("utf-8", "surrogateescape"), digest_size=8
    ).digest()
    # A uniform number in (0, 1), never 0 or 1, so the logarithm is finite.
    uniform = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)
    return -weight / math.log(uniform)


STRATEGIES = {
    "round_robin": RoundRobin,
    "least_conn": LeastConnections,
    "hash": RendezvousHash,
}


def hashKeyOf(hashKey, peerHost, request):
    """
    The value to hash for a client, per C{hash_key}; None when the client
    does not carry it.

    @param request: Autobahn's C{ConnectionRequest} of the client.
    """
    source = hashKey.source
    if source == "ip":
        return peerHost
    if source == "path":
        return request.path
    if source == "header":
        return request.headers.get(hashKey.name.lower())
    if source == "query":
        values = request.params.get(hashKey.name)
        return values[0] if values else None
    for part in request.headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == hashKey.name:
            return value
    return None
