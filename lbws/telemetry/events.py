"""
What happened when: the last events that explain the dashboard's charts
(a backend going down or up, a drain, a reload, a rebalancing burst, a
stop), kept in memory for C{/events.json} and the page's timeline, and
written to the log as they happen.

One L{Events} is made per lbws and handed to what emits events (the pool
and its members, the dashboard, the service, discovery, rebalancing); each
call site is one line such as::

    events.record("backend_down", "backend {backend} is down: {error}",
                  level=LogLevel.warn, backend=name, error=why)

which replaces the log line the site would otherwise write: the message is
a twisted.logger format, the keyword arguments are its structured fields.
"""

from collections import deque

from twisted.logger import Logger, LogLevel, formatEvent

_log = Logger()

# Events kept: about 520 bytes each (measured with a 60-character error
# message), so some 260 KiB at most.
SIZE = 500


class Events:
    """
    The last L{SIZE} events, oldest first.

    @param clock: the reactor's C{IReactorTime}, for the timestamps; without
        one (unit tests of the pool alone) events are only logged.
    """

    def __init__(self, clock=None, size=SIZE, quiet=False):
        """
        @param quiet: log nothing (a worker of C{workers = N}, whose parent
            logs the same events).
        """
        self._clock = clock
        self._events = deque(maxlen=size)
        self._seq = 0
        self._quiet = quiet

    def record(self, kind, message, level=LogLevel.info, **fields):
        """
        Log C{message} with C{fields} (and C{event=kind}) and keep the event.

        @param kind: what happened: C{backend_up}, C{backend_down}, C{drain},
            C{enable}, C{reload}, C{rebalance}, C{stop}, C{handoff}.
        @param fields: JSON values (strings, numbers, booleans, lists).
        """
        self.note(message, level, event=kind, **fields)
        if self._clock is None:
            return
        self._seq += 1
        text = formatEvent({"log_format": message, **fields})
        self._events.append(
            {
                "seq": self._seq,
                "time": self._clock.seconds(),
                "kind": kind,
                "level": level.name,
                "text": text,
                **fields,
            }
        )

    def note(self, message, level=LogLevel.info, **fields):
        """
        Log C{message} with C{fields}, without keeping it as an event (a
        line that only explains one).
        """
        if not self._quiet:
            _log.emit(level, message, **fields)

    def recent(self, since=None):
        """
        The kept events, oldest first; with C{since} only those recorded at
        or after that clock time.
        """
        if since is None:
            return list(self._events)
        return [e for e in self._events if e["time"] >= since]

    def __len__(self):
        return len(self._events)
