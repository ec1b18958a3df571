"""
Routes: which application a request is for, by its host, path and
subprotocol (README, "Routes").

The table is built once per configuration (L{RouteTable.of}) with the
routes in match order, so that matching a new connection is one pass over
a short list of precomputed tests, and nothing at all per message: a
connection keeps the route it was matched to.

Match order is nginx's precedence flattened into one list: an exact host
first, then wildcard hosts by longest suffix, then routes without a host;
within those, the longest path prefix first; then a route with a
subprotocol before one without. A request goes to the first route all of
whose conditions it meets.
"""


def requestHost(value):
    """
    The host a Host header names, without its port, lower-cased and
    without a trailing dot; "" for none.
    """
    if not value:
        return ""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[: end + 1] if end > 0 else value
    return value.partition(":")[0].rstrip(".")


def _order(route):
    host = route.host
    if not host:
        hostRank = (2, 0)
    elif host.startswith("*."):
        hostRank = (1, -len(host))
    else:
        hostRank = (0, 0)
    return (hostRank, -len(route.path), 0 if route.subprotocol else 1)


class RouteTable:
    """
    The routes of one configuration in match order.

    @ivar routes: the L{lbws.config.RouteSettings}, in match order.
    @ivar implicit: True when the configuration has no route of its own:
        one route serves every backend with the [lbws] settings.
    """

    def __init__(self, routes, implicit=False):
        self.routes = tuple(sorted(routes, key=_order))
        self.implicit = implicit
        self._tests = [
            (
                route,
                route.host if route.host and not route.host.startswith("*.") else None,
                route.host[1:] if route.host.startswith("*.") else None,
                route.path or None,
                route.path + "/",
                route.subprotocol or None,
            )
            for route in self.routes
        ]

    @classmethod
    def of(cls, settings):
        """
        The table of C{settings}: its [route:NAME] sections, or the one
        implicit route.
        """
        if settings.routes:
            return cls(settings.routes)
        return cls((settings.implicitRoute(),), implicit=True)

    def match(self, host, path, offered=()):
        """
        The route for a request, or None.

        @param host: the Host header's value as the client sent it.
        @param path: the request's normalised path (no query).
        @param offered: the subprotocols the client offers.
        """
        host = requestHost(host)
        for route, exact, suffix, prefix, below, subprotocol in self._tests:
            if exact is not None and host != exact:
                continue
            if suffix is not None and not host.endswith(suffix):
                continue
            if prefix is not None and path != prefix and not path.startswith(below):
                continue
            if subprotocol is not None and subprotocol not in offered:
                continue
            return route
        return None


def forwardTarget(route, target):
    """
    The target to join to the backend's prefix: C{target} (normalised)
    with the route's path prefix taken off when the route has
    C{strip_prefix} (C{/chat/room?x} becomes C{/room?x}, C{/chat} becomes
    C{/}).
    """
    if not (route.strip_prefix and route.path):
        return target
    rest = target[len(route.path):]
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


def describe(route):
    """
    One line for C{--check} and the dashboard: what the route matches.
    """
    parts = [f"host {route.host}" if route.host else "any host"]
    parts.append(f"path {route.path}" if route.path else "any path")
    if route.subprotocol:
        parts.append(f"subprotocol {route.subprotocol}")
    return ", ".join(parts)
