"""
The operator dashboard: a twisted.web resource tree served on the
C{dashboard} endpoint.

  - C{GET /}: an HTML page (L{PAGE}) that polls C{/status.json},
    C{/history.json} and C{/events.json}.
  - C{GET /status.json}: each backend's state, connections, checks and
    traffic; total connections; uptime.
  - C{GET /metrics}: Prometheus text, from L{lbws.telemetry.metrics.LbwsCollector}.
  - C{GET /healthz}: 200 when a backend is up, else 503; 503 as soon as
    lbws is stopping.
  - C{GET /history.json?range=SECONDS}: the sampled history of the last
    SECONDS (at most an hour), from L{lbws.ops.history}; C{GET /events.json}:
    the last events, from L{lbws.telemetry.events}.
  - C{POST /backends/NAME/drain}, C{POST /backends/NAME/enable} and
    C{POST /reload}: need C{Authorization: Bearer <admin_token>}; with no
    admin_token configured they are refused (403).

Everything is read through a L{lbws.ops.status.StatusView} at request time,
so a reload that replaces settings or members shows at once.

Every request is checked first (L{DashboardSite.getResourceFor}), see the
README's "Security" section:

  - Its C{Host} must be an IP address or C{localhost} (with any port), else
    421: a web page cannot make a browser read the dashboard through a DNS
    name rebound to it (DNS rebinding), which needs a name it controls.
    C{/healthz} is exempt (it tells nothing but up or down).
  - A client that failed the admin token L{FailedTokens.LIMIT} times in
    L{FailedTokens.WINDOW} seconds gets 429 to its admin requests until the
    window ends, with one log line instead of one per attempt.
"""

import base64
import hashlib
import hmac
import json
import math
import re
from importlib.resources import files

from prometheus_client.exposition import choose_encoder
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.web.server import NOT_DONE_YET, Site

from lbws.ops.history import MAX_RANGE
from lbws.transport.listen import beyondLoopback
from lbws.telemetry.metrics import metricsRegistry

_log = Logger()

PAGE = files("lbws.ops").joinpath("dashboard.html").read_bytes()


def _inlineHashes(page, tag):
    return " ".join(
        "'sha256-%s'"
        % base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
        for body in re.findall(rb"<%s>(.*?)</%s>" % (tag, tag), page, re.S)
    )


# Only the page's own inline script and style may run; it talks to this
# server only.
PAGE_POLICY = (
    "default-src 'none'; "
    f"script-src {_inlineHashes(PAGE, b'script')}; "
    f"style-src {_inlineHashes(PAGE, b'style')}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def _plain(request, code, text):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return text.encode("utf-8") + b"\n"


def _json(request, value, code=200, compact=False):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    text = json.dumps(value, separators=(",", ":")) if compact else json.dumps(value, indent=1)
    return text.encode("utf-8") + b"\n"


def status(service):
    """
    What C{/status.json} answers (see the README's Dashboard section), with
    extra fields for the page: per-backend checks and traffic, and the
    server's clock.

    @param service: the L{lbws.ops.status.StatusView} of the running lbws.
    """
    now = service.seconds()
    backends = []
    httpRequests = service.httpRequests()
    toMove, shed = service.shedding()
    for member in service.members():
        backends.append(
            {
                "name": member.name,
                "url": member.settings.url,
                "state": member.state,
                "weight": member.weight,
                "active": member.count("active"),
                "total": member.count("total"),
                "last_check": member.lastCheck,
                "last_error": member.lastError,
                "healthy": member.healthy,
                "drained": member.drained,
                "removed": member.removed,
                "failed": member.count("failed"),
                "check_rtt": member.checkRtt,
                "state_since": member.changed,
                "messages_in": member.count("messagesIn"),
                "messages_out": member.count("messagesOut"),
                "bytes_in": member.count("bytesIn"),
                "bytes_out": member.count("bytesOut"),
                "effective_weight": service.effectiveWeight(member, now),
                "rebalanced": member.rebalanced,
                "to_move": toMove[member.name],
                "shed": shed[member.name],
                "group": member.group,
                "http_requests": {
                    codeClass: n
                    for (name, codeClass), n in sorted(httpRequests.items())
                    if name == member.name
                },
            }
        )
    return {
        "backends": backends,
        "routes": service.routes(),
        "connections": sum(b["active"] for b in backends),
        "workers": service.workers(),
        "uptime": now - service.started,
        "now": now,
        "health": {
            "probe": service.settings.health.probe,
            "interval": service.settings.health.interval,
        },
        "balancing": {
            "balance": service.settings.balance,
            "slow_start": service.settings.slow_start,
            "rebalance": service.settings.rebalance,
            "rebalance_rate": service.settings.rebalance_rate,
            "rebalanced": sum(b["rebalanced"] for b in backends),
            "drain_mode": service.settings.drain_mode,
            "to_move": sum(b["to_move"] for b in backends),
            "shed": sum(b["shed"] for b in backends),
        },
    }


class _Leaf(Resource):
    """
    A resource answering its C{render_METHOD}s, and 405 with C{Allow}
    (as JSON, like every error here) to any other method.
    """

    isLeaf = True

    def render(self, request):
        method = request.method.decode("ascii", "replace")
        if method == "HEAD" and hasattr(self, "render_GET"):
            method = "GET"
        handler = getattr(self, f"render_{method}", None)
        if handler is None:
            allowed = sorted(
                name[len("render_"):]
                for name in dir(self)
                if name.startswith("render_") and name != "render_HEAD"
            )
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            return _json(
                request, {"error": f"method {method} not allowed: use {' or '.join(allowed)}"}, 405
            )
        return handler(request)


class _Page(_Leaf):

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", PAGE_POLICY.encode("ascii"))
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return PAGE


class _Status(_Leaf):

    def __init__(self, service):
        super().__init__()
        self._service = service

    def render_GET(self, request):
        return _json(request, status(self._service))


class _History(_Leaf):
    """
    C{GET /history.json?range=SECONDS}: samples of the last SECONDS
    (default and most: an hour), compact, since an hour of a few backends
    is tens of thousands of numbers.
    """

    def __init__(self, service):
        super().__init__()
        self._service = service

    def render_GET(self, request):
        given = request.args.get(b"range", [str(MAX_RANGE).encode()])[-1]
        try:
            seconds = float(given)
        except ValueError:
            seconds = math.nan
        if not (0 < seconds < math.inf):
            problem = f"range={given.decode('latin-1')!r}: give a number of seconds above 0"
            return _json(request, {"error": f"{problem} (lbws keeps the last {MAX_RANGE})"}, 400)
        if seconds.is_integer():
            seconds = int(seconds)
        return _json(request, self._service.history.view(seconds), compact=True)


class _Events(_Leaf):
    """
    C{GET /events.json}: the last events, oldest first.
    """

    def __init__(self, service):
        super().__init__()
        self._service = service

    def render_GET(self, request):
        now = self._service.reactor.seconds()
        return _json(request, {"events": self._service.events.recent(), "now": now})


class _Metrics(_Leaf):

    def __init__(self, service):
        super().__init__()
        self._registry = metricsRegistry(service)

    def render_GET(self, request):
        # Prometheus text, or OpenMetrics for a scraper that asks for it.
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encoder, contentType = choose_encoder(accept)
        request.setHeader(b"content-type", contentType.encode("ascii"))
        return encoder(self._registry)


class _Healthz(_Leaf):

    def __init__(self, service):
        super().__init__()
        self._service = service

    def render_GET(self, request):
        request.setHeader(b"cache-control", b"no-store")
        if self._service.stopping:
            return _plain(request, 503, "lbws is stopping")
        if self._service.anyUp():
            return _plain(request, 200, "ok")
        return _plain(request, 503, "no backend is up")


class _Admin(_Leaf):
    """
    A POST action that needs the admin token.
    """

    def __init__(self, service):
        super().__init__()
        self._service = service

    def render_POST(self, request):
        token = self._service.settings.admin_token
        if not token:
            return _json(
                request,
                {"error": "admin actions are off: set admin_token in [lbws]"},
                403,
            )
        given = request.getHeader(b"authorization") or b""
        scheme, _, credentials = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(
            credentials.strip(), token.encode("utf-8")
        ):
            request.setHeader(b"www-authenticate", b'Bearer realm="lbws"')
            _log.warn(
                "dashboard: {method} {path} from {peer} refused: bad or missing token",
                method="POST",
                path=request.path.decode("latin-1"),
                peer=_peer(request),
            )
            return _json(request, {"error": "a valid bearer token is required"}, 401)
        return self.act(request)

    def act(self, request):
        raise NotImplementedError()


def _peer(request):
    peer = request.getClientAddress()
    return getattr(peer, "host", str(peer))


class _BackendAction(_Admin):
    def __init__(self, service, name, action):
        super().__init__(service)
        self._name = name
        self._action = action

    def act(self, request):
        member = self._service.member(self._name)
        if member is None:
            return _json(request, {"error": f"no backend named {self._name!r}"}, 404)
        member.drain(self._action == "drain")
        self._service.events.record(
            self._action,
            "backend {backend} {done} from the dashboard ({peer}): now {state}",
            source="dashboard",
            backend=member.name,
            done="drained" if member.drained else "enabled",
            peer=_peer(request),
            state=member.state,
        )
        return _json(
            request,
            {"backend": member.name, "state": member.state, "drained": member.drained},
        )


class _Reload(_Admin):
    def __init__(self, service, reload):
        super().__init__(service)
        self._reload = reload

    def act(self, request):
        reload = self._reload
        if reload is None:
            return _json(request, {"error": "reload is not available"}, 501)
        _log.info("reload requested by the dashboard ({peer})", peer=_peer(request))
        d = maybeDeferred(reload)

        def done(applied):
            if applied:
                return _json(request, {"reloaded": True})
            return _json(
                request,
                {
                    "reloaded": False,
                    "error": "the config was refused; the running config stays"
                    " (the log says why)",
                },
                409,
            )

        def failed(failure):
            _log.failure("reload from the dashboard failed", failure)
            return _json(request, {"reloaded": False, "error": "reload failed"}, 500)

        def respond(body):
            if not finished[0]:
                request.write(body)
                request.finish()

        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))
        d.addCallbacks(done, failed).addCallback(respond)
        return NOT_DONE_YET


class _NotFound(_Leaf):
    def __init__(self, message):
        super().__init__()
        self._message = message

    def render(self, request):
        return _json(request, {"error": self._message}, 404)


class _BackendActions(Resource):
    def __init__(self, service, name):
        super().__init__()
        self._service = service
        self._name = name

    def getChild(self, path, request):
        action = path.decode("utf-8", "replace")
        if action in ("drain", "enable"):
            return _BackendAction(self._service, self._name, action)
        return _NotFound(f"no action {action!r}: use drain or enable")


class _Backends(Resource):
    def __init__(self, service):
        super().__init__()
        self._service = service

    def getChild(self, path, request):
        if not path:
            return _NotFound("POST /backends/NAME/drain or /backends/NAME/enable")
        return _BackendActions(self._service, path.decode("utf-8", "replace"))


class _Root(Resource):
    def getChild(self, path, request):
        return _NotFound("nothing here: see / for the dashboard")


def dashboardResource(service, reload=None):
    """
    The resource tree reading C{service}, a L{lbws.ops.status.StatusView}
    (history and events included);
    C{reload}, if given, is what C{POST /reload} calls (True when the new
    configuration runs).
    """
    root = _Root()
    root.putChild(b"", _Page())
    root.putChild(b"status.json", _Status(service))
    root.putChild(b"metrics", _Metrics(service))
    root.putChild(b"healthz", _Healthz(service))
    root.putChild(b"history.json", _History(service))
    root.putChild(b"events.json", _Events(service))
    root.putChild(b"backends", _Backends(service))
    root.putChild(b"reload", _Reload(service, reload))
    return root


# Host names a browser may use for the dashboard besides IP addresses.
LOCAL_NAMES = ("localhost",)
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(:[0-9]{1,5})?$")


def allowedHost(header):
    """
    Whether a request with this C{Host} header may read the dashboard: no
    header (not a browser), an IP address or C{localhost}, each with or
    without a port. A name an attacker controls, rebound to the
    dashboard's address, is refused.
    """
    if header is None:
        return True
    match = _HOST.match(header.decode("latin-1").strip())
    if match is None:
        return False
    host = match.group(1).lower().rstrip(".")
    if host.startswith("["):
        return isIPv6Address(host[1:-1])
    return host in LOCAL_NAMES or isIPAddress(host)


class FailedTokens:
    """
    Failed admin token attempts per client address, in a window that
    starts with the first failure: after L{LIMIT} of them the client's
    admin requests are refused until the window ends. Memory is bounded:
    at most L{CLIENTS} addresses are remembered (the oldest windows go
    first).
    """

    LIMIT = 10
    WINDOW = 60.0
    CLIENTS = 10000

    def __init__(self, clock):
        self._clock = clock
        # address -> [window start, failures]
        self._clients = {}

    def wait(self, address):
        """
        Seconds until C{address} may try again, or 0.
        """
        entry = self._current(address)
        if entry is None or entry[1] < self.LIMIT:
            return 0
        return entry[0] + self.WINDOW - self._clock.seconds()

    def failed(self, address):
        """
        Count a failed attempt.

        @return: True when this failure reached the limit (log it, once).
        """
        entry = self._current(address)
        if entry is None:
            while len(self._clients) >= self.CLIENTS:
                del self._clients[next(iter(self._clients))]
            entry = self._clients[address] = [self._clock.seconds(), 0]
        entry[1] += 1
        return entry[1] == self.LIMIT

    def _current(self, address):
        entry = self._clients.get(address)
        if entry is not None and self._clock.seconds() >= entry[0] + self.WINDOW:
            del self._clients[address]
            return None
        return entry


class _Refused(_Leaf):
    """
    What a request that failed the site's checks gets, whatever its path.
    """

    def __init__(self, code, message, retryAfter=None):
        super().__init__()
        self._code = code
        self._message = message
        self._retryAfter = retryAfter

    def render(self, request):
        if self._retryAfter is not None:
            request.setHeader(b"retry-after", b"%d" % max(1, round(self._retryAfter)))
        return _json(request, {"error": self._message}, self._code)


class DashboardSite(Site):
    """
    The dashboard's site. It writes no access log: a page polling every 2
    seconds and Prometheus scraping would drown the relay's log; the POST
    actions log what they did (and refused) themselves.

    @ivar startWarning: what to log when it starts listening, or None.
    """

    displayTracebacks = False
    noisy = False
    startWarning = None

    def __init__(self, resource, reactor):
        super().__init__(resource, reactor=reactor)
        self.failedTokens = FailedTokens(reactor)

    def startFactory(self):
        super().startFactory()
        if self.startWarning:
            _log.warn("{warning}", warning=self.startWarning)

    def getResourceFor(self, request):
        if request.path != b"/healthz" and not allowedHost(request.getHeader(b"host")):
            return _Refused(
                421,
                "this dashboard answers requests for its IP address or"
                " localhost only (the Host header names another host)",
            )
        if request.method == b"POST":
            peer = _peer(request)
            wait = self.failedTokens.wait(peer)
            if wait > 0:
                return _Refused(
                    429, "too many failed token attempts: try again later", wait
                )
            request.notifyFinish().addBoth(lambda _: self._answered(request, peer))
        return super().getResourceFor(request)

    def _answered(self, request, peer):
        if request.code == 401 and self.failedTokens.failed(peer):
            _log.warn(
                "dashboard: {peer} failed the admin token {count} times within"
                " {window:g}s: its admin requests get 429 for the rest of that time",
                peer=peer,
                count=FailedTokens.LIMIT,
                window=FailedTokens.WINDOW,
            )

    def log(self, request):
        pass


def exposureWarning(settings):
    """
    The warning for a dashboard that listens beyond loopback, or None.
    """
    if not settings.dashboard or not beyondLoopback(settings.dashboard):
        return None
    admin = (
        "its admin actions need admin_token"
        if settings.admin_token
        else "its admin actions are off (no admin_token)"
    )
    return (
        f"the dashboard listens beyond loopback ({settings.dashboard}):"
        f" whoever reaches it reads status.json and /metrics, and {admin};"
        " bind it to 127.0.0.1 or keep it behind a firewall"
    )


def dashboardSite(service, reload=None):
    """
    The twisted.web site to serve on the C{dashboard} endpoint.
    """
    site = DashboardSite(dashboardResource(service, reload), reactor=service.reactor)
    site.startWarning = exposureWarning(service.settings)
    return site
