"""
Counters of what the relay did, kept as plain numbers on the hot path and
turned into Prometheus metrics only when scraped.
"""

from collections import Counter


class Counters:
    """
    Process-wide totals that are not per backend (those live on
    L{lbws.pool.Member}).

    @ivar handshakes: client handshakes by result: C{ok}, C{no_backend}
        (503, nothing up), C{backend_failed} (502, every try failed),
        C{backend_refused} (the backend answered 4xx, passed on),
        C{over_capacity} (503, max_connections), C{timeout} (the client did
        not finish its request in time).
    @ivar closes: closes by C{(side, code)}, where side says who closed
        first: C{client}, C{backend} or C{lbws}.
    """

    def __init__(self):
        self.handshakes = Counter()
        self.closes = Counter()
        self.protocolErrors = Counter()
