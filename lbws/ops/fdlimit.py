"""
The process's limit on open file descriptors (C{RLIMIT_NOFILE}).

Each client connection holds two descriptors, its own socket and its
backend's, so lbws needs at least C{2 x max_connections} of them, plus
L{MARGIN} for its own: stdio and the log file, the reactor's epoll and
waker pipe, the listening sockets, health probes in flight, dashboard
requests and DNS lookups. Distributions start processes with a soft limit
of 1,024 (and a much higher hard one), which the default C{max_connections}
of 10,000 would exhaust: like nginx's C{worker_rlimit_nofile}, lbws raises
its soft limit to the hard one at start, and says so when even that is too
low (see the README's "Limits and defaults").
"""

import resource

# Descriptors lbws needs beyond two per connection (see the module's
# docstring); generous, since running out costs every client.
MARGIN = 128


def needed(settings):
    """
    The descriptors C{settings} may need: C{2 x max_connections + MARGIN}.
    """
    return 2 * settings.max_connections + MARGIN


def reachable(limits=resource):
    """
    The soft limit lbws can give itself: the hard limit, or when that is
    unlimited, the current soft limit (raising to "unlimited" fails).

    @return: C{(soft, reachable)}.
    """
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    return soft, (soft if hard == limits.RLIM_INFINITY else max(soft, hard))


def raiseSoftLimit(limits=resource):
    """
    Raise the soft limit to L{reachable}.

    @return: C{(before, after)}; C{after == before} when it could not be
        raised.
    """
    soft, target = reachable(limits)
    if target > soft:
        _, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
        try:
            limits.setrlimit(limits.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
    return soft, target


def shortfall(settings, limit):
    """
    The warning for an operator whose C{max_connections} needs more than
    C{limit} descriptors, or None: None also for the default
    C{max_connections}, which the operator never chose (see L{fits}).
    """
    need = needed(settings)
    if limit >= need or not settings.max_connections_set:
        return None
    return (
        f"the file descriptor limit {limit} is below 2 x max_connections"
        f" + {MARGIN} = {need}: lbws would run out of descriptors before"
        f" {settings.max_connections} connections; raise the hard limit"
        " (ulimit -Hn, or LimitNOFILE= for a service) or lower"
        " max_connections"
    )


def fits(settings, limit):
    """
    What to tell the operator, at info, when the default C{max_connections}
    needs more than C{limit} descriptors (a machine's usual hard limit may
    be lower than 20,128), or None: how many connections do fit. Beyond
    them a client is refused as lbws runs out (HTTP 503), and nobody else
    is hurt.
    """
    need = needed(settings)
    if limit >= need or settings.max_connections_set:
        return None
    return (
        f"file descriptor limit {limit}: about {max(0, (limit - MARGIN) // 2)}"
        f" connections fit (the default max_connections {settings.max_connections}"
        " needs 2 per connection; set max_connections or raise the hard limit)"
    )
