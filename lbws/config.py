"""
Reading the operator's INI file into immutable, typed settings.

Every mistake an operator can make in the file is reported as a
L{ConfigError} naming the file, the section, the key, the bad value and what
is allowed, so that C{twistd lbws --check} and a refused reload can print one
clear line instead of a traceback.
"""

import configparser
import os
import re
from urllib.parse import urlsplit

import attrs
import idna
from twisted.internet.abstract import isIPAddress, isIPv6Address

from lbws.protocol.frames import DEFAULT_MAX_FRAMES
from lbws.protocol.origins import AllowedOrigins, OriginError, parseOrigins
from lbws.backends.routes import RouteTable, describe

SECTION_MAIN = "lbws"
SECTION_HEALTH = "health"
BACKEND_PREFIX = "backend:"
ROUTE_PREFIX = "route:"
PROBES = ("default", "tcp", "websocket", "http")
# A route's host: a name or address, or *. and a name (any of its
# subdomains); an IPv6 address in brackets.
_ROUTE_HOST = re.compile(r"^(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*$|^\[[0-9a-f:.]+\]$")
BACKEND_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SRV_NAME = re.compile(r"^_[A-Za-z0-9-]+\._(tcp|udp)(\.[A-Za-z0-9_-]+)+\.?$", re.I)

# The smallest interval or timeout, in seconds: below it lbws would spend a
# core on timers (ping_interval = 1e-6 and a health interval of 0.0001 did).
MIN_SECONDS = 0.1
# The largest backend weight: weights are balanced as numbers, and a huge
# one (10^400) overflowed the hash's floating-point score on every
# handshake; a million to one is more spread than any pool needs.
MAX_WEIGHT = 1_000_000
# An inline comment starts with ';' or '#' after whitespace (or as the
# whole value): see L{_Reader.raw}.
_INLINE_COMMENT = re.compile(r"(?:^|\s)([;#])")
# Keys whose value is a secret: never shown in an error, and never followed
# by an inline comment (the secret itself may contain " ;").
_SECRET_KEYS = ("admin_token",)
# RFC 9110 token characters, for the websocket probe's subprotocol.
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# A health check path: visible ASCII, so it goes onto the request line as
# is (spaces and control characters would break it); no fragment.
_REQUEST_PATH = re.compile(r"^/[\x21-\x22\x24-\x7e]*$")
# The userinfo of a URL ("user:pass@"), whatever else the URL holds.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def maskUrl(url):
    """
    C{url} with its userinfo (C{user:password@}) replaced by C{***@}: lbws
    shows and logs backend URLs (dashboard, status.json, C{--check}, log
    lines) and never sends a URL's credentials anywhere, so they are not
    kept at all.
    """
    return _USERINFO.sub(r"\1***@", url)


class ConfigError(Exception):
    """
    The configuration file cannot be used; the message says where and why.
    """

    def __init__(self, path, section, key, problem):
        self.path = path
        self.section = section
        self.key = key
        self.problem = problem
        where = str(path)
        if section is not None:
            where += f": [{section}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {problem}")


@attrs.frozen
class HashKey:
    """
    What C{balance = hash} hashes: C{ip}, C{path}, or a named header,
    cookie or query parameter.
    """

    source: str
    name: str = ""

    def __str__(self):
        return f"{self.source}:{self.name}" if self.name else self.source


@attrs.frozen
class BackendSettings:
    name: str
    url: str
    secure: bool
    host: str
    port: int
    path: str
    weight: int = 1
    ca: str = ""
    verify: bool = True
    # DNS discovery (see lbws.backends.discovery): a backend with C{srv}, or with
    # C{resolve} above 0, is a template; its members are the addresses
    # found, named NAME/ADDRESS:PORT.
    srv: str = ""
    resolve: float = 0.0
    # A discovered member: the address its connections go to (C{host}
    # stays the name, for the Host header and TLS), and its template.
    address: str = ""
    group: str = ""
    # [health] probe, path and subprotocol for this backend; empty: as in
    # [health] (see L{healthFor}).
    health_probe: str = ""
    health_path: str = ""
    health_subprotocol: str = ""

    @property
    def discovered(self):
        """
        True for a template whose members come from DNS.
        """
        return bool(self.srv) or self.resolve > 0


@attrs.frozen
class HealthSettings:
    interval: float = 2.0
    timeout: float = 1.0
    fall: int = 2
    rise: int = 2
    probe: str = "default"
    path: str = "/"
    subprotocol: str = ""


@attrs.frozen
class RouteSettings:
    """
    One C{[route:NAME]} section: what requests it matches (C{host},
    C{path}, C{subprotocol}; empty matches any) and where they go
    (C{backends}, or None for every backend: the implicit route of a
    configuration without routes), with the per-route balancing and
    admission settings, which default to those of [lbws]. See
    L{lbws.backends.routes} for matching.
    """

    name: str
    host: str = ""
    path: str = ""
    subprotocol: str = ""
    backends: tuple = None
    balance: str = "least_conn"
    hash_key: HashKey = HashKey("ip")
    sticky_cookie: str = ""
    max_message_size: int = 16 * 1024 * 1024
    allowed_origins: AllowedOrigins = AllowedOrigins()
    http: str = "proxy"
    host_header: str = "client"
    strip_prefix: bool = False
    # What happens to this route's connections on a backend that is
    # drained, removed by a reload or gone from DNS: "keep" (they stay) or
    # "shed" (moved off at rebalance_rate, see lbws.backends.rebalance).
    drain_mode: str = "keep"
    # Paths with %2F or %5C: "reject" (400) or "keep" (README, "Paths").
    escaped_slashes: str = "reject"
    # Client header names with "_": "drop" (never reach the backend) or
    # "pass" (README, "Security").
    underscores_in_headers: str = "drop"


# The name of the one route of a configuration without [route:NAME].
IMPLICIT_ROUTE = "default"
# The [lbws] keys a [route:NAME] section may override.
ROUTE_OVERRIDES = (
    "balance",
    "hash_key",
    "sticky_cookie",
    "max_message_size",
    "allowed_origins",
    "http",
    "host_header",
    "drain_mode",
    "escaped_slashes",
    "underscores_in_headers",
)
DRAIN_MODES = ("keep", "shed")
# escaped_slashes: see lbws.protocol.request.checkEscapes.
ESCAPED_SLASHES = ("reject", "keep")
# close_spread's default, in seconds: see closeWindow and the README
# ("Stopping and draining").
DEFAULT_CLOSE_SPREAD = 10.0


def closeWindow(closeSpread, drainTimeout):
    """
    The seconds over which the 1001 closes of a stop are spread:
    C{close_spread}, but at most half of C{drain_timeout}, which bounds the
    whole stop, so that the last clients closed have the other half to
    answer their close.
    """
    return min(closeSpread, drainTimeout / 2)


@attrs.frozen
class Settings:
    """
    The whole configuration: the [lbws] keys, the [health] keys and the
    backends in file order.
    """

    path: str
    backends: tuple
    health: HealthSettings = HealthSettings()
    listen: str = "tcp:8020"
    dashboard: str = "tcp:8021:interface=127.0.0.1"
    balance: str = "least_conn"
    hash_key: HashKey = HashKey("ip")
    handshake_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    connect_timeout: float = 5.0
    retries: int = 2
    idle_timeout: float = 0.0
    ping_interval: float = 30.0
    max_message_size: int = 16 * 1024 * 1024
    compression: str = "passthrough"
    max_connections: int = 10000
    # Whether the file set max_connections (lbws.ops.fdlimit warns of too
    # few descriptors for a value the operator chose, not for the default).
    max_connections_set: bool = False
    drain_timeout: float = 30.0
    stop_delay: float = 0.0
    close_spread: float = DEFAULT_CLOSE_SPREAD
    admin_token: str = ""
    slow_start: float = 0.0
    rebalance: str = "off"
    rebalance_rate: float = 5.0
    workers: int = 1
    max_frames_per_message: int = DEFAULT_MAX_FRAMES
    max_connections_per_ip: int = 0
    max_message_rate: int = 0
    allowed_origins: AllowedOrigins = AllowedOrigins()
    # Plain HTTP on the listener (README "Plain HTTP and long-polling").
    http: str = "proxy"
    host_header: str = "client"
    drain_mode: str = "keep"
    escaped_slashes: str = "reject"
    underscores_in_headers: str = "drop"
    http_timeout: float = 60.0
    max_body_size: int = 1024 * 1024
    body_timeout: float = 60.0
    send_timeout: float = 60.0
    # Upstream keep-alive (lbws.backends.keepalive): idle plain-HTTP backend
    # connections kept per backend (0 = none), and for how many seconds.
    http_keepalive: int = 32
    http_keepalive_timeout: float = 60.0
    sticky_cookie: str = ""
    # The key of sticky cookie ids (lbws.backends.sticky): the contents of
    # sticky_secret_file, read at start and reload; b"" without one.
    sticky_secret_file: str = ""
    sticky_secret: bytes = attrs.field(default=b"", repr=False)
    # Take-over (README "Upgrading without closing connections"): the unix
    # socket a running lbws hands its listeners and tunnels over on.
    handoff_socket: str = ""
    handoff_timeout: float = 10.0
    # The [route:NAME] sections in file order; none: one implicit route.
    routes: tuple = ()
    # What the file's author should hear of a valid file (deprecated key
    # names): logged at start and reload, printed by --check.
    notes: tuple = ()

    def implicitRoute(self):
        """
        The one route of a configuration without [route:NAME] sections:
        every backend, with the [lbws] settings.
        """
        return RouteSettings(
            name=IMPLICIT_ROUTE,
            **{key: getattr(self, key) for key in ROUTE_OVERRIDES},
        )

    def backend(self, name):
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)


class _Reader:
    """
    Typed access to one section, remembering which keys were used so that
    the rest can be reported as unknown.
    """

    def __init__(self, path, parser, section):
        self.path = path
        self.section = section
        self._values = dict(parser.items(section)) if section in parser else {}
        self._used = set()
        self._notes = getattr(parser, "lbwsNotes", [])

    def note(self, what):
        """
        Remember something about a valid file that its author should hear
        (a deprecated name), as C{FILE: [SECTION] what}.
        """
        self._notes.append(f"{self.path}: [{self.section}] {what}")

    def error(self, key, problem):
        return ConfigError(self.path, self.section, key, problem)

    def raw(self, key, default):
        """
        The value of C{key} without its inline comment.

        An inline comment starts with C{;} after whitespace, as in
        etc/lbws.ini. A value that would be cut by one is refused rather
        than silently shortened where that is ambiguous: C{#} after
        whitespace (C{admin_token = correct horse #battery staple}), and
        any comment after a secret. A comment as the whole value
        (C{admin_token =   ; none}) leaves the value empty, as before.
        """
        self._used.add(key)
        if key not in self._values:
            return default
        text = self._values[key]
        comment = _INLINE_COMMENT.search(text)
        if comment is None:
            return text
        value = text[: comment.start(1)].rstrip()
        if not value:
            return ""
        shown = "the value" if key in _SECRET_KEYS else repr(text)
        if comment.group(1) == "#":
            raise self.error(
                key,
                f"'#' after a space in {shown} would cut the value short:"
                " inline comments start with ' ;' and '#' comments go on"
                " their own line",
            )
        if key in _SECRET_KEYS:
            raise self.error(
                key,
                "a ';' after a space in the value would cut it short: put"
                " the comment on its own line (a secret cannot contain ' ;')",
            )
        return value

    def string(self, key, default=""):
        return self.raw(key, default).strip()

    def choice(self, key, default, allowed):
        value = self.string(key, default)
        if value not in allowed:
            raise self.error(
                key, f"{value!r} is not one of {', '.join(allowed)}"
            )
        return value

    def number(self, key, default, kind, minimum, exclusive=False, maximum=None):
        text = self.string(key, str(default))
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise self.error(key, f"{text!r} is not {noun}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise self.error(key, f"{text!r} is not a finite number")
        if value < minimum or (exclusive and value == minimum):
            bound = "greater than" if exclusive else "at least"
            raise self.error(key, f"{text!r} must be {bound} {minimum}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"{text!r} must be at most {maximum}")
        return value

    def seconds(self, key, default, off=False):
        """
        A duration of at least L{MIN_SECONDS}; with C{off}, 0 (turned off)
        is allowed too.
        """
        value = self.number(key, default, float, 0)
        if value < MIN_SECONDS and not (off and value == 0):
            text = self.string(key, str(default))
            allowed = f"at least {MIN_SECONDS:g} seconds"
            raise self.error(
                key, f"{text!r} must be {'0 (off) or ' if off else ''}{allowed}"
            )
        return value

    def boolean(self, key, default):
        text = self.string(key, "true" if default else "false").lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise self.error(key, f"{text!r} is not true or false")

    def has(self, key):
        return key in self._values

    def checkUnknown(self):
        for key in self._values:
            if key not in self._used:
                raise self.error(key, "unknown key")


def _parseEndpoint(reader, key, default, allowEmpty):
    from lbws.transport.listen import ListenError, listenEndpoint

    description = reader.string(key, default)
    if not description:
        if allowEmpty:
            return ""
        raise reader.error(key, "an endpoint is required, e.g. tcp:8020")
    try:
        # Parsing needs no reactor; the endpoint is built again at start-up.
        listenEndpoint(None, description)
    except ListenError as e:
        raise reader.error(key, f"{description!r}: {e}") from None
    except Exception as e:
        raise reader.error(
            key, f"{description!r} is not a server endpoint string: {e}"
        ) from None
    return description


# The longest path a unix socket address holds (sun_path, less its NUL).
MAX_SOCKET_PATH = 107


def _parseSocketPath(reader, key):
    """
    A unix socket's path, or empty for off: absolute, so that the running
    lbws (a daemon changes its directory) and C{--take-over} mean the same
    file, and short enough for a socket address.
    """
    path = reader.string(key)
    if not path:
        return ""
    if not path.startswith("/"):
        raise reader.error(key, f"{path!r} is not an absolute path")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise reader.error(
            key, f"{path!r} is longer than a unix socket's {MAX_SOCKET_PATH} bytes"
        )
    if path.endswith("/"):
        raise reader.error(key, f"{path!r} names a directory, not a socket")
    return path


def _parseHashKey(reader, default="ip"):
    text = reader.string("hash_key", default)
    source, _, name = text.partition(":")
    if source in ("ip", "path") and not name:
        return HashKey(source)
    if source in ("header", "cookie", "query") and name:
        return HashKey(source, name)
    raise reader.error(
        "hash_key",
        f"{text!r} is not one of ip, path, header:NAME, cookie:NAME, query:NAME",
    )


def _parseOrigins(reader, default=""):
    try:
        return parseOrigins(reader.string("allowed_origins", default))
    except OriginError as e:
        raise reader.error("allowed_origins", str(e)) from None


# RFC 6265 cookie-name: an RFC 9110 token.
_COOKIE_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _parseCookieName(reader, default=""):
    name = reader.string("sticky_cookie", default)
    if name and not _COOKIE_NAME.match(name):
        raise reader.error(
            "sticky_cookie",
            f"{name!r} is not a cookie name (letters, digits and !#$%&'*+.^_`|~-)",
        )
    return name


# Fewer bytes of sticky_secret_file than this, and a note says the ids
# can be guessed by trying secrets (128 bits, as a random hex string of 32
# characters has).
MIN_STICKY_SECRET = 16


def _parseStickySecret(reader):
    """
    C{sticky_secret_file} and its contents (without the line end an editor
    or C{openssl rand -hex 32 > FILE} leaves), read now: at start and at
    each reload, in every worker. An unreadable or empty file is an error.
    """
    path = reader.string("sticky_secret_file")
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            secret = f.read().strip(b" \t\r\n")
    except OSError as e:
        raise reader.error(
            "sticky_secret_file", f"cannot read {path!r}: {e.strerror}"
        ) from None
    if not secret:
        raise reader.error("sticky_secret_file", f"{path!r} is empty: put a random secret in it")
    if len(secret) < MIN_STICKY_SECRET:
        reader.note(
            f"sticky_secret_file {path!r} holds {len(secret)} bytes: sticky ids can be"
            f" reversed by trying short secrets; use at least {MIN_STICKY_SECRET}"
            " random bytes (openssl rand -hex 32)"
        )
    return {"sticky_secret_file": path, "sticky_secret": secret}


def _parseOverrides(reader, base):
    """
    The keys of L{ROUTE_OVERRIDES} in C{reader}'s section, those not given
    taken from C{base} (the [lbws] settings for a route, the defaults for
    [lbws] itself).
    """
    values = {
        "balance": reader.choice(
            "balance", base.balance, ("round_robin", "least_conn", "hash")
        ),
        "hash_key": _parseHashKey(reader, str(base.hash_key)),
        "sticky_cookie": _parseCookieName(reader, base.sticky_cookie),
        "max_message_size": reader.number(
            "max_message_size", base.max_message_size, int, 1
        ),
        "http": reader.choice("http", base.http, ("proxy", "refuse")),
        "host_header": reader.choice("host_header", base.host_header, ("client", "backend")),
        "drain_mode": reader.choice("drain_mode", base.drain_mode, DRAIN_MODES),
        "escaped_slashes": reader.choice(
            "escaped_slashes", base.escaped_slashes, ESCAPED_SLASHES
        ),
        "underscores_in_headers": reader.choice(
            "underscores_in_headers", base.underscores_in_headers, ("drop", "pass")
        ),
    }
    if reader.has("allowed_origins"):
        values["allowed_origins"] = _parseOrigins(reader)
    else:
        reader.raw("allowed_origins", "")
        values["allowed_origins"] = base.allowed_origins
    return values


def _probePath(reader, default):
    """
    The health check's path: C{probe_path}, or the older name C{path} (easy
    to take for the backend url's prefix, so deprecated: the reader notes
    it, and lbws logs the note at start and reload). Both at once is an
    error.
    """
    new = reader.string("probe_path")
    old = reader.string("path")
    if new and old:
        raise reader.error("path", "give the probe's path once, as probe_path")
    if old:
        reader.note("path is deprecated: call it probe_path (it is the health check's path)")
    value = new or old
    if value:
        _checkProbePath(reader, "probe_path" if new else "path", value)
    return value or default


def _checkProbePath(reader, key, value):
    if not value.startswith("/"):
        raise reader.error(key, f"{value!r} must start with /")
    if not _REQUEST_PATH.match(value):
        raise reader.error(
            key,
            f"{value!r} must be printable ASCII without spaces or '#':"
            " percent-encode the rest (a space is %20)",
        )


def _checkSubprotocol(reader, key, value):
    if value and not _TOKEN.match(value):
        raise reader.error(
            key,
            f"{value!r} is not a subprotocol name (an HTTP token:"
            " letters, digits and !#$%&'*+.^_`|~-)",
        )


def healthFor(health, backend):
    """
    The health check settings for C{backend}: those of [health] with the
    backend's own C{probe}, C{path} and C{subprotocol} where it gives them
    (a socket.io backend and a plain one behind the same lbws).
    """
    changes = {}
    if backend.health_probe:
        changes["probe"] = backend.health_probe
    if backend.health_path:
        changes["path"] = backend.health_path
    if backend.health_subprotocol:
        changes["subprotocol"] = backend.health_subprotocol
    return attrs.evolve(health, **changes) if changes else health


def _parseBackend(path, parser, section):
    reader = _Reader(path, parser, section)
    name = section[len(BACKEND_PREFIX):].strip()
    if not BACKEND_NAME.match(name):
        raise ConfigError(
            path,
            section,
            None,
            f"backend name {name!r} must be letters, digits, '.', '_' or '-'",
        )
    srv = reader.string("srv")
    resolve = reader.seconds("resolve", 0, off=True)
    url = reader.string("url")
    if srv:
        if url:
            raise reader.error(
                "srv", "give either url or srv, not both (srv members use ws://)"
            )
        if not _SRV_NAME.match(srv):
            raise reader.error(
                "srv", f"{srv!r} is not an SRV name like _ws._tcp.chat.example"
            )
        url = f"ws://{srv}"
    if not url:
        raise reader.error(
            "url", "missing: give the backend's ws:// or wss:// URL (or an srv name)"
        )
    shown = maskUrl(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise reader.error("url", f"{shown!r} is not a URL: {e}") from None
    if parts.scheme not in ("ws", "wss"):
        raise reader.error("url", f"{shown!r} must start with ws:// or wss://")
    if not parts.hostname:
        raise reader.error("url", f"{shown!r} has no host")
    if not srv:
        # An SRV name (checked above) is looked up, not connected to.
        _checkHost(reader, shown, parts)
    if parts.query or parts.fragment:
        raise reader.error("url", f"{shown!r} must not have a query or fragment")
    if resolve and not srv and (
        isIPAddress(parts.hostname) or isIPv6Address(parts.hostname)
    ):
        raise reader.error(
            "resolve", f"{parts.hostname!r} is an address: resolve needs a host name"
        )
    secure = parts.scheme == "wss"
    ca = reader.string("ca")
    if ca:
        try:
            with open(ca, "rb"):
                pass
        except OSError as e:
            raise reader.error("ca", f"cannot read {ca!r}: {e.strerror}") from None
    backend = BackendSettings(
        name=name,
        url=shown,
        secure=secure,
        host=parts.hostname,
        port=port or (443 if secure else 80),
        path=parts.path.rstrip("/"),
        weight=reader.number("weight", 1, int, 0, maximum=MAX_WEIGHT),
        ca=ca,
        verify=reader.boolean("verify", True),
        srv=srv,
        resolve=resolve,
        health_probe=reader.string("probe"),
        health_path=_probePath(reader, ""),
        health_subprotocol=reader.string("subprotocol"),
    )
    if backend.health_probe and backend.health_probe not in PROBES:
        raise reader.error(
            "probe", f"{backend.health_probe!r} is not one of {', '.join(PROBES)}"
        )
    _checkSubprotocol(reader, "subprotocol", backend.health_subprotocol)
    if srv:
        backend = attrs.evolve(backend, url=srv, host=srv, port=0)
    if not secure and (ca or not backend.verify):
        key = "ca" if ca else "verify"
        raise reader.error(key, "only applies to wss:// backends")
    reader.checkUnknown()
    return backend


def _checkHost(reader, url, parts):
    """
    Refuse what lbws could never connect to, though it parses as a URL:
    an IPv6 zone id, something other than an IPv6 address in brackets, a
    host name that is not ASCII, port 0.
    """
    host = parts.hostname
    if "[" in parts.netloc:
        if "%" in host:
            raise reader.error("url", f"{url!r}: IPv6 zone ids (%) are not supported")
        if not isIPv6Address(host):
            raise reader.error("url", f"{url!r}: {host!r} in brackets is not an IPv6 address")
    elif not host.isascii():
        raise reader.error(
            "url", f"{url!r}: write the host name {host!r} in its ASCII (xn--) form"
        )
    elif not isIPAddress(host):
        # What Twisted's HostnameEndpoint checks before it resolves a name
        # (IDNA 2008: e.g. "--" in a label's third and fourth characters is
        # reserved for xn--): a name it would refuse is refused here.
        try:
            idna.encode(host)
        except (idna.IDNAError, UnicodeError) as e:
            raise reader.error("url", f"{url!r}: {host!r} is not a valid host name ({e})") from None
    if parts.port == 0:
        raise reader.error("url", f"{url!r}: port 0 cannot be connected to")


def _parseHealth(path, parser):
    reader = _Reader(path, parser, SECTION_HEALTH)
    health = HealthSettings(
        interval=reader.seconds("interval", 2),
        timeout=reader.seconds("timeout", 1),
        fall=reader.number("fall", 2, int, 1),
        rise=reader.number("rise", 2, int, 1),
        probe=reader.choice("probe", "default", PROBES),
        path=_probePath(reader, "/"),
        subprotocol=reader.string("subprotocol"),
    )
    _checkSubprotocol(reader, "subprotocol", health.subprotocol)
    reader.checkUnknown()
    return health


def _parseMain(path, parser, backends, health):
    reader = _Reader(path, parser, SECTION_MAIN)
    settings = Settings(
        path=str(path),
        backends=backends,
        health=health,
        listen=_parseEndpoint(reader, "listen", "tcp:8020", False),
        dashboard=_parseEndpoint(
            reader, "dashboard", "tcp:8021:interface=127.0.0.1", True
        ),
        **_parseOverrides(reader, RouteSettings("")),
        handshake_timeout=reader.seconds("handshake_timeout", 10),
        keepalive_timeout=reader.seconds("keepalive_timeout", 75),
        connect_timeout=reader.seconds("connect_timeout", 5),
        retries=reader.number("retries", 2, int, 0),
        idle_timeout=reader.seconds("idle_timeout", 0, off=True),
        ping_interval=reader.seconds("ping_interval", 30, off=True),
        compression=reader.choice("compression", "passthrough", ("passthrough", "off")),
        max_connections=reader.number("max_connections", 10000, int, 1),
        max_connections_set=reader.has("max_connections"),
        drain_timeout=reader.number("drain_timeout", 30, float, 0),
        stop_delay=reader.number("stop_delay", 0, float, 0),
        close_spread=reader.seconds("close_spread", DEFAULT_CLOSE_SPREAD, off=True),
        admin_token=reader.string("admin_token"),
        slow_start=reader.number("slow_start", 0, float, 0),
        rebalance=reader.choice("rebalance", "off", ("off", "gradual")),
        rebalance_rate=reader.number("rebalance_rate", 5, float, 0, exclusive=True),
        workers=reader.number("workers", 1, int, 1),
        max_frames_per_message=reader.number(
            "max_frames_per_message", DEFAULT_MAX_FRAMES, int, 1
        ),
        max_connections_per_ip=reader.number("max_connections_per_ip", 0, int, 0),
        max_message_rate=reader.number("max_message_rate", 0, int, 0),
        http_timeout=reader.number("http_timeout", 60, float, 0, exclusive=True),
        max_body_size=reader.number("max_body_size", 1048576, int, 0),
        body_timeout=reader.number("body_timeout", 60, float, 0, exclusive=True),
        send_timeout=reader.number("send_timeout", 60, float, 0, exclusive=True),
        http_keepalive=reader.number("http_keepalive", 32, int, 0),
        http_keepalive_timeout=reader.seconds("http_keepalive_timeout", 60),
        handoff_socket=_parseSocketPath(reader, "handoff_socket"),
        handoff_timeout=reader.seconds("handoff_timeout", 10),
        **_parseStickySecret(reader),
    )
    if settings.workers > 1:
        if settings.listen.split(":", 1)[0] not in ("tcp", "tcp6", "ssl"):
            # The parent hands each client's TCP connection to a worker,
            # which serves it with TLS itself for ssl:; the PROXY header
            # of haproxy: would stay behind in the parent.
            raise reader.error(
                "workers",
                f"{settings.workers} workers need a tcp: or ssl: listen endpoint",
            )
        if settings.rebalance != "off" or any(b.discovered for b in backends):
            # Both change members or move connections from the parent only.
            raise reader.error(
                "workers",
                f"{settings.workers} workers: not supported yet with"
                " rebalance = gradual or DNS discovery (srv, resolve)",
            )
        if settings.handoff_socket:
            # Each worker would hand over to its successor: not built yet.
            raise reader.error(
                "handoff_socket",
                f"not supported yet with {settings.workers} workers (workers = 1 only)",
            )
    reader.checkUnknown()
    return settings


def parseConfig(text, path="<config>"):
    """
    Parse the text of an lbws INI file.

    @raise ConfigError: naming the section and key of the first problem.
    """
    parser = configparser.ConfigParser(
        interpolation=None,
        # Inline comments are taken off by _Reader.raw, which refuses the
        # ambiguous ones instead of cutting a value silently.
        inline_comment_prefixes=None,
        strict=True,
        default_section="\0no defaults",
    )
    # A UTF-8 byte order mark, as some editors on Windows write, is not
    # part of the first line.
    text = text.removeprefix("\ufeff")
    # What the readers note of a valid file (deprecated names), for
    # Settings.notes.
    parser.lbwsNotes = []
    try:
        parser.read_string(text, source=str(path))
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, None, "section appears twice") from None
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option, "key appears twice") from None
    except configparser.Error as e:
        problem = e.message.splitlines()[0] if hasattr(e, "message") else str(e)
        raise ConfigError(path, None, None, f"not an INI file: {problem}") from None

    backends = []
    routeSections = []
    for section in parser.sections():
        if section.startswith(BACKEND_PREFIX):
            backends.append(_parseBackend(path, parser, section))
        elif section.startswith(ROUTE_PREFIX):
            routeSections.append(section)
        elif section not in (SECTION_MAIN, SECTION_HEALTH):
            raise ConfigError(
                path,
                section,
                None,
                "unknown section (allowed: [lbws], [health], [backend:NAME],"
                " [route:NAME])",
            )
    names = [b.name for b in backends]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(
                path, BACKEND_PREFIX + name, None, "backend name appears twice"
            )
    if not backends:
        raise ConfigError(
            path, None, None, "no backend: add a [backend:NAME] section with a url"
        )
    health = _parseHealth(path, parser)
    settings = _parseMain(path, parser, tuple(backends), health)
    if routeSections:
        routes = _parseRoutes(path, parser, routeSections, settings)
        settings = attrs.evolve(settings, routes=routes)
    if not settings.sticky_secret and any(
        route.sticky_cookie for route in settings.routes or (settings,)
    ):
        parser.lbwsNotes.append(
            f"{path}: [{SECTION_MAIN}] sticky_cookie without sticky_secret_file: the"
            " cookie's ids can be reversed by anyone who guesses backend names and URLs;"
            " give every lbws the same sticky_secret_file (README, Sticky sessions)"
        )
    if parser.lbwsNotes:
        settings = attrs.evolve(settings, notes=tuple(parser.lbwsNotes))
    return settings


def _parseRoutes(path, parser, sections, settings):
    """
    The [route:NAME] sections, in file order; two routes that match the
    same requests are refused, naming both.
    """
    routes = []
    seen = {}
    for section in sections:
        route = _parseRoute(path, parser, section, settings)
        match = (route.host, route.path, route.subprotocol)
        if match in seen:
            raise ConfigError(
                path,
                section,
                None,
                f"matches the same requests as [{ROUTE_PREFIX}{seen[match]}]"
                " (same host, path and subprotocol)",
            )
        seen[match] = route.name
        routes.append(route)
    return tuple(routes)


def _parseRoute(path, parser, section, settings):
    reader = _Reader(path, parser, section)
    name = section[len(ROUTE_PREFIX):].strip()
    if not BACKEND_NAME.match(name):
        raise ConfigError(
            path, section, None,
            f"route name {name!r} must be letters, digits, '.', '_' or '-'",
        )
    host = reader.string("host").lower().rstrip(".")
    if host and not _ROUTE_HOST.match(host):
        raise reader.error(
            "host",
            f"{host!r} is not a host name, an address or *.NAME (a name's"
            " subdomains)",
        )
    prefix = reader.string("path")
    if prefix:
        _checkProbePath(reader, "path", prefix)
        segments = prefix.split("/")
        if "?" in prefix or "." in segments or ".." in segments:
            raise reader.error(
                "path", f"{prefix!r} must be a path prefix without '?', '.' or '..'"
            )
        prefix = prefix.rstrip("/")
    subprotocol = reader.string("subprotocol")
    _checkSubprotocol(reader, "subprotocol", subprotocol)
    names = tuple(n for n in re.split(r"[\s,]+", reader.string("backends")) if n)
    if not names:
        raise reader.error(
            "backends", "missing: name the [backend:NAME] sections this route uses"
        )
    known = {b.name for b in settings.backends}
    for backend in names:
        if backend not in known:
            raise reader.error(
                "backends", f"{backend!r} is not a [backend:NAME] section"
            )
    route = RouteSettings(
        name=name,
        host=host,
        path=prefix,
        subprotocol=subprotocol,
        backends=tuple(dict.fromkeys(names)),
        strip_prefix=reader.boolean("strip_prefix", False),
        **_parseOverrides(reader, settings),
    )
    reader.checkUnknown()
    return route


def loadConfig(path):
    """
    Read and parse the file at C{path}.

    @raise ConfigError: if it cannot be read or is not a valid configuration.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, None, f"not UTF-8 text: {e.reason}") from None
    return parseConfig(text, path)


# Settings a reload cannot change: they are bound at start-up.
RESTART_ONLY = ("listen", "dashboard", "workers", "handoff_socket")


def checkReload(old, new):
    """
    Refuse a reload from C{old} to C{new} settings that changes what is
    bound at start-up (the listening endpoints, the worker processes).

    @raise ConfigError: naming the file, the key and both values.
    """
    for key in RESTART_ONLY:
        before, after = getattr(old, key), getattr(new, key)
        if before != after:
            raise ConfigError(
                new.path,
                SECTION_MAIN,
                key,
                f"changed from {before!r} to {after!r}: a reload cannot"
                f" change {key}, restart lbws for that",
            )


def describeProbe(health, backend):
    """
    What a backend's health check does, in words (C{--check}).
    """
    target = f"{backend.path}{health.path}"
    offered = f" offering subprotocol {health.subprotocol}" if health.subprotocol else ""
    if health.probe == "tcp":
        return "tcp: a TCP connect"
    if health.probe == "http":
        return f"http: GET {target}, healthy on 2xx or 3xx"
    if health.probe == "websocket":
        return f"websocket: handshake on {target}{offered}, ping, clean close"
    return (
        f"default: WebSocket handshake on {target}{offered}; any well-formed HTTP"
        " answer is healthy, an upgrade gets the full WebSocket check"
    )


def summary(settings):
    """
    A few lines a person can read: what C{--check} prints.
    """
    lines = [
        f"config {settings.path}: OK",
        f"listen {settings.listen}; dashboard {settings.dashboard or 'off'}",
        f"balance {settings.balance}"
        + (f" by {settings.hash_key}" if settings.balance == "hash" else "")
        + f"; retries {settings.retries}; max_connections {settings.max_connections}",
        f"health: {settings.health.probe} probe every {settings.health.interval:g}s,"
        f" timeout {settings.health.timeout:g}s,"
        f" fall {settings.health.fall}, rise {settings.health.rise}",
        f"slow_start {settings.slow_start:g}s; rebalance {settings.rebalance}"
        + (
            f" at {settings.rebalance_rate:g}/s"
            if settings.rebalance != "off"
            else ""
        ),
        _stopLine(settings),
        f"http {settings.http}"
        + (
            f" (http_timeout {settings.http_timeout:g}s,"
            f" max_body_size {settings.max_body_size or 'unlimited'})"
            if settings.http == "proxy"
            else ""
        )
        + f"; sticky_cookie {settings.sticky_cookie or 'off'}"
        + (
            f" (ids keyed with {settings.sticky_secret_file})"
            if settings.sticky_secret_file
            else ""
        ),
        f"handoff_socket {settings.handoff_socket or 'off'}"
        + (
            f" (handoff_timeout {settings.handoff_timeout:g}s)"
            if settings.handoff_socket
            else ""
        ),
        f"{len(settings.backends)} backend(s):",
    ]
    for backend in settings.backends:
        if backend.srv:
            where = f"srv {backend.srv} (re-resolved every {_every(backend):g}s)"
        elif backend.resolve:
            where = f"{backend.url} (re-resolved every {backend.resolve:g}s)"
        else:
            where = backend.url
        line = f"  {backend.name}: {where} weight {backend.weight}"
        line += f"; probed with {describeProbe(healthFor(settings.health, backend), backend)}"
        lines.append(line)
    if settings.routes:
        lines.append(f"{len(settings.routes)} route(s), in match order:")
        for route in RouteTable.of(settings).routes:
            lines.append(
                f"  {route.name}: {describe(route)}"
                + (" (strip_prefix)" if route.strip_prefix else "")
                + f" -> {', '.join(route.backends)}; balance {route.balance}"
                + (
                    f"; drain_mode {route.drain_mode}"
                    if route.drain_mode != settings.drain_mode
                    else ""
                )
            )
    lines.extend(f"note: {note}" for note in settings.notes)
    return "\n".join(lines)


def _stopLine(settings):
    """
    What a stop and a drained backend do, for C{--check}: the window the
    1001 closes are spread over is shown as it will be, with why when
    C{drain_timeout} shortens it.
    """
    window = closeWindow(settings.close_spread, settings.drain_timeout)
    spread = f"close_spread {settings.close_spread:g}s"
    if window < settings.close_spread:
        spread += f" (closes spread over {window:g}s: half of drain_timeout)"
    return (
        f"stop: stop_delay {settings.stop_delay:g}s, {spread},"
        f" drain_timeout {settings.drain_timeout:g}s; drain_mode {settings.drain_mode}"
        + (f" at {settings.rebalance_rate:g}/s" if settings.drain_mode == "shed" else "")
    )


# Seconds between SRV lookups when C{resolve} is left at 0.
SRV_DEFAULT_INTERVAL = 30.0


def _every(backend):
    return backend.resolve or SRV_DEFAULT_INTERVAL


def resolveInterval(backend):
    """
    Seconds between DNS lookups for a discovered backend: C{resolve}, or
    for an C{srv} backend left at 0, L{SRV_DEFAULT_INTERVAL}.
    """
    return _every(backend)
