"""
The operator dashboard: a twisted.web resource tree served on the
C{dashboard} endpoint.

  - C{GET /}: an HTML page (L{PAGE}) that polls C{/status.json}.
  - C{GET /status.json}: each backend's state, connections, checks and
    traffic; total connections; uptime.
  - C{GET /metrics}: Prometheus text, from L{lbws.metrics.LbwsCollector}.
  - C{GET /healthz}: 200 when a backend is up, else 503.
  - C{POST /backends/NAME/drain}, C{POST /backends/NAME/enable} and
    C{POST /reload}: need C{Authorization: Bearer <admin_token>}; with no
    admin_token configured they are refused (403).

Everything is read from the service at request time, so a reload that
replaces settings or members shows at once.
"""

import base64
import hashlib
import hmac
import json
import re
from importlib.resources import files

from prometheus_client.exposition import choose_encoder
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from lbws.metrics import metricsRegistry

_log = Logger()

PAGE = files("lbws").joinpath("dashboard.html").read_bytes()


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


def _json(request, value, code=200):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value, indent=1).encode("utf-8") + b"\n"


def status(service):
    """
    What C{/status.json} answers (see CONTRACT.md), with extra fields for
    the page: per-backend checks and traffic, and the server's clock.
    """
    now = service.reactor.seconds()
    backends = []
    httpRequests = service.counters.httpMerged()
    for member in service.pool:
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
                "effective_weight": service.pool.effectiveWeight(member, now),
                "rebalanced": member.rebalanced,
                "group": member.group,
                "http_requests": {
                    codeClass: n
                    for (name, codeClass), n in sorted(httpRequests.items())
                    if name == member.name
                },
            }
        )
    workers = service.workers
    return {
        "backends": backends,
        "connections": sum(b["active"] for b in backends),
        "workers": (
            [{"index": i, "connections": n} for i, n in sorted(workers.clients.items())]
            if workers is not None
            else []
        ),
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
        if self._service.pool.anyUp():
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
        member = self._service.pool.members.get(self._name)
        if member is None:
            return _json(request, {"error": f"no backend named {self._name!r}"}, 404)
        member.drained = self._action == "drain"
        _log.info(
            "backend {backend} {done} from the dashboard ({peer}): now {state}",
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
    def act(self, request):
        reload = getattr(self._service, "reload", None)
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


def dashboardResource(service):
    """
    The resource tree for C{service}: anything with C{reactor}, C{settings},
    C{pool}, C{counters}, C{started} and optionally C{reload()}.
    """
    root = _Root()
    root.putChild(b"", _Page())
    root.putChild(b"status.json", _Status(service))
    root.putChild(b"metrics", _Metrics(service))
    root.putChild(b"healthz", _Healthz(service))
    root.putChild(b"backends", _Backends(service))
    root.putChild(b"reload", _Reload(service))
    return root


class DashboardSite(Site):
    """
    The dashboard's site. It writes no access log: a page polling every 2
    seconds and Prometheus scraping would drown the relay's log; the POST
    actions log what they did (and refused) themselves.
    """

    displayTracebacks = False
    noisy = False

    def log(self, request):
        pass


def dashboardSite(service):
    """
    The twisted.web site to serve on the C{dashboard} endpoint.
    """
    return DashboardSite(dashboardResource(service), reactor=service.reactor)
