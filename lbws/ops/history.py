"""
The last hour in numbers, for the dashboard's charts and
C{/history.json}: every C{INTERVAL} seconds (on the injected clock) one
sample per backend and one for lbws as a whole, kept in fixed-size ring
buffers so that memory stays the same however long lbws runs.

Per backend: open connections, new connections/s, messages/s and bytes/s
each way, failed backend connects/s, the last check's round trip, and the
state. In total: open connections, new connections/s (client handshakes
that succeeded), messages/s and bytes/s each way, client handshakes
answered with an error per second, and the number of backends up.

Rates come from the counters the relay keeps (read through
C{Member.count} and C{Counters.merged}, which with C{workers = N} already
add the workers' counts): the difference between two samples divided by the
time between them. A counter that went down (a worker that ended took its
counts along; a backend that a reload removed and added back starts at
zero) gives a rate of 0 for that sample rather than a negative one.
"""

import math
from array import array

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from lbws.backends.pool import DOWN, DRAINING, UP

_log = Logger()

INTERVAL = 2.0  # seconds between samples
SAMPLES = 1800  # one hour at INTERVAL
MAX_RANGE = 3600  # seconds /history.json serves at most

NAN = math.nan

# Counters of a member whose rate per second a backend series shows.
BACKEND_RATES = {
    "connections": "total",
    "messages_in": "messagesIn",
    "messages_out": "messagesOut",
    "bytes_in": "bytesIn",
    "bytes_out": "bytesOut",
    "failures": "failed",
}
BACKEND_SERIES = ("active", *BACKEND_RATES, "rtt")
TOTAL_RATES = ("connections", "messages_in", "messages_out", "bytes_in", "bytes_out", "failures")
TOTAL_SERIES = ("active", *TOTAL_RATES, "up")

# A backend's state in a sample; 0 = not in the pool then.
STATES = (None, UP, DOWN, DRAINING)
_STATE_CODES = {state: code for code, state in enumerate(STATES) if state}


class Track:
    """
    The ring buffers of one backend (or of the total): one C{array('f')}
    per series (4 bytes a sample: ample precision for charts) and one byte
    a sample for the state, all written at the same slot as the sample's
    time in L{History}.
    """

    def __init__(self, names, size, states):
        self.series = {name: array("f", [NAN]) * size for name in names}
        self.state = bytearray(size) if states else None
        self.previous = None  # the counters at the last sample, for rates
        self.absent = 0  # samples in a row this backend was not in the pool

    def write(self, slot, values, state=None):
        for name, ring in self.series.items():
            ring[slot] = values.get(name, NAN)
        if self.state is not None:
            self.state[slot] = _STATE_CODES.get(state, 0)

    def nbytes(self):
        """
        The size of the buffers, which never changes.
        """
        size = sum(ring.itemsize * len(ring) for ring in self.series.values())
        return size + (len(self.state) if self.state is not None else 0)


def _rates(counts, previous, elapsed):
    """
    Per-second rates of C{counts} (a dict) since C{previous}, NaN without a
    previous sample, 0 for a counter that went down.
    """
    if previous is None or not elapsed or elapsed <= 0:
        return {name: NAN for name in counts}
    return {
        name: max(0.0, (value - previous[name]) / elapsed)
        for name, value in counts.items()
    }


class History:
    """
    The last C{size} samples: a ring of sample times and a L{Track} per
    backend and for the total, in lock-step.

    A backend that leaves the pool keeps its track (with gaps) until it has
    been away for C{size} samples: it then has nothing left to show and is
    forgotten, so memory is bounded by the backends of the last hour.
    """

    def __init__(self, size=SAMPLES, interval=INTERVAL):
        self.size = size
        self.interval = interval
        self.times = array("d", [NAN]) * size
        self.next = 0  # slot of the next sample
        self.count = 0  # samples taken, up to size
        self.total = Track(TOTAL_SERIES, size, states=False)
        self.backends = {}  # name -> Track, in the order first seen
        self._lastTime = None

    def sample(self, now, pool, counters):
        """
        Take one sample of C{pool} (its members' counts include the
        workers') and C{counters} at clock time C{now}.
        """
        slot = self.next
        elapsed = now - self._lastTime if self._lastTime is not None else None
        self._lastTime = now
        self.times[slot] = now
        seen = set()
        totals = {name: 0 for name in TOTAL_RATES if name not in ("connections", "failures")}
        active = up = 0
        for member in pool:
            name = member.name
            seen.add(name)
            track = self.backends.get(name)
            if track is None:
                track = self.backends[name] = Track(BACKEND_SERIES, self.size, states=True)
            track.absent = 0
            counts = {series: member.count(counter) for series, counter in BACKEND_RATES.items()}
            values = _rates(counts, track.previous, elapsed)
            track.previous = counts
            values["active"] = member.count("active")
            # The last check's round trip, while it is the last check's.
            values["rtt"] = (
                member.checkRtt
                if member.checkRtt is not None and member.consecutiveFailures == 0
                else NAN
            )
            track.write(slot, values, member.state)
            for key in totals:
                totals[key] += counts[key]
            active += values["active"]
            up += member.state == UP
        for name, track in list(self.backends.items()):
            if name in seen:
                continue
            track.write(slot, {}, None)
            track.previous = None
            track.absent += 1
            if track.absent >= self.size:
                del self.backends[name]
        handshakes = counters.merged()[0]
        totals["connections"] = handshakes.get("ok", 0)
        totals["failures"] = sum(n for result, n in handshakes.items() if result != "ok")
        values = _rates(totals, self.total.previous, elapsed)
        self.total.previous = totals
        values["active"] = active
        values["up"] = up
        self.total.write(slot, values)
        self.next = (slot + 1) % self.size
        self.count = min(self.count + 1, self.size)

    def slots(self, since):
        """
        The slots of the samples taken at or after clock time C{since},
        oldest first.
        """
        found = []
        slot = self.next
        for _ in range(self.count):
            slot = (slot - 1) % self.size
            if self.times[slot] < since:
                break
            found.append(slot)
        found.reverse()
        return found

    def view(self, now, seconds):
        """
        The samples of the last C{seconds} before C{now}, as JSON for
        C{/history.json}: C{times}, and per series a list of values in the
        same order (null where there was no value).
        """
        slots = self.slots(now - seconds)

        def values(ring, digits):
            return [_json(ring[slot], digits) for slot in slots]

        backends = []
        for name, track in self.backends.items():
            entry = {
                "name": name,
                "state": [STATES[track.state[slot]] for slot in slots],
            }
            for series, ring in track.series.items():
                entry[series] = values(ring, 6 if series == "rtt" else 2)
            backends.append(entry)
        return {
            "interval": self.interval,
            "range": seconds,
            "now": now,
            "times": [round(self.times[slot], 3) for slot in slots],
            "total": {
                series: values(ring, 2) for series, ring in self.total.series.items()
            },
            "backends": backends,
        }

    def nbytes(self):
        """
        The size of all ring buffers (constant for a given set of backends).
        """
        size = self.times.itemsize * len(self.times) + self.total.nbytes()
        return size + sum(track.nbytes() for track in self.backends.values())


def _json(value, digits):
    if math.isnan(value):
        return None
    return round(value, digits)


class HistorySampler(Service):
    """
    Samples a pool and its counters into a L{History} every C{interval}
    seconds while running.

    @ivar interval: seconds between samples; tests set it lower before the
        service starts.
    """

    name = "history"

    def __init__(self, clock, pool, counters, interval=INTERVAL, size=SAMPLES):
        self.clock = clock
        self.pool = pool
        self.counters = counters
        self.interval = interval
        self.history = History(size, interval)
        self._loop = LoopingCall(self.sample)
        self._loop.clock = clock

    def startService(self):
        super().startService()
        self.history.interval = self.interval
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def sample(self):
        # A LoopingCall stops at the first exception: never let one out.
        try:
            self.history.sample(self.clock.seconds(), self.pool, self.counters)
        except Exception:
            _log.failure("sampling the dashboard's history failed")

    def view(self, seconds):
        return self.history.view(self.clock.seconds(), min(seconds, MAX_RANGE))
