"""
What an operator meets at the command line, against real `twistd lbws`
processes: whatever `--check` accepts runs, whatever would fail at run time
`--check` refuses with the same line, a port in use is one line, the file
descriptor limit is raised (or warned about), the listen backlog is 511,
and credentials in a backend url are never shown.
"""

import json
import resource
import select
import signal
import socket
import subprocess

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from lbws.ops import fdlimit
from lbws.transport.listen import BACKLOG, withBacklog
from tests import support
from tests.test_dashboard import BodyReader
from tests.test_twistd import run

HUGE = "1" + "0" * 400


@pytest.mark.parametrize(
    "lbws, health, backend, message",
    [
        ("balance = hash", "", f"weight = {HUGE}", "[backend:a] weight: '1000…"),
        ("admin_token = correct horse #battery staple", "", "", "[lbws] admin_token: '#' after a space"),
        ("ping_interval = 1e-6", "", "", "[lbws] ping_interval: '1e-6' must be 0 (off) or at least 0.1"),
        ("", "interval = 0.0001", "", "[health] interval: '0.0001' must be at least 0.1 seconds"),
        ("", "path = /health check", "", "[health] path: '/health check' must be printable ASCII"),
        ("", "path = /health\x7f", "", "[health] path: '/health\\x7f' must be printable ASCII"),
    ],
)
def test_check_refuses_what_would_fail_at_run_time(tmp_path, lbws, health, backend, message):
    """
    Each of these passed `--check` and then failed at run time (500s on
    every handshake, a value cut short, a core spent on timers, a probe
    request line broken): `--check` and a start both refuse them now.
    """
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText([("a", "ws://127.0.0.1:1", backend)], lbws=lbws, health=health)
    )
    for args in (["--check"], []):
        result = run("--config", str(config), *args)
        assert result.returncode == 1, (args, result.stdout)
        assert f"lbws: {config}: {message.rstrip('…')}" in result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        assert "battery" not in result.stderr


async def unixGet(path, resource, method=b"GET", token=None):
    """
    GET (or C{method}) C{resource} from an HTTP server on the UNIX socket
    C{path}, with C{token} as a bearer token if given.
    """
    agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(path))
    headers = Headers({"Authorization": [f"Bearer {token}"]} if token else {})
    response = await agent.request(method, b"http://localhost" + resource, headers)
    body = defer.Deferred()
    response.deliverBody(BodyReader(body))
    return response.code, (await body).decode("utf-8")


class _UnixEndpoints:
    def __init__(self, path):
        self.path = path

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(reactor, self.path, timeout=5)


async def echoes(process):
    client = await support.connect(process.url)
    client.sendMessage(b"hello")
    assert await client.messages.get().addTimeout(10, reactor) == (b"hello", False)
    client.sendClose(1000)
    await client.closed.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_a_file_with_a_byte_order_mark_passes_check_and_runs(tmp_path, backend):
    config = tmp_path / "lbws.ini"
    config.write_text("\ufeff" + support.configText([("a", backend.url)]), encoding="utf-8")
    check = run("--config", str(config), "--check")
    assert check.returncode == 0, check.stderr
    process = support.LbwsProcess(config)
    try:
        await echoes(process)
    finally:
        assert process.stop() == 0


@pytest_twisted.ensureDeferred
async def test_credentials_in_a_backend_url_are_never_shown(tmp_path, backend):
    """
    A backend url's user and password are masked on `--check`,
    status.json, /metrics, the page and in the log.
    """
    url = backend.url.replace("ws://", "ws://user:hunter2@")
    dashboard = tmp_path / "dashboard.sock"
    config = tmp_path / "lbws.ini"
    config.write_text(support.configText([("a", url)], dashboard=f"unix:{dashboard}"))
    check = run("--config", str(config), "--check")
    assert check.returncode == 0, check.stderr
    assert "a: ws://***@127.0.0.1:" in check.stdout and "hunter2" not in check.stdout
    process = support.LbwsProcess(config)
    try:
        await echoes(process)
        code, status = await unixGet(str(dashboard), b"/status.json")
        assert code == 200
        assert json.loads(status)["backends"][0]["url"] == backend.url.replace("ws://", "ws://***@")
        for path in (b"/metrics", b"/"):
            code, body = await unixGet(str(dashboard), path)
            assert code == 200 and "hunter2" not in body
    finally:
        assert process.stop() == 0
    assert "hunter2" not in "".join(process.lines)


@pytest_twisted.ensureDeferred
async def test_the_limits_themselves_pass_check_and_run(tmp_path, backend):
    """
    The edges of what `--check` accepts run: the largest weight with
    balance = hash, the shortest intervals, a probe path with a query, and
    a token holding ';' and '#' (not after a space, so not a comment).
    """
    dashboard = tmp_path / "dashboard.sock"
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", backend.url, "weight = 1000000")],
            lbws="balance = hash\nhash_key = header:X-User\nping_interval = 0.1\nadmin_token = a;b#c",
            health="interval = 0.1\ntimeout = 0.1\npath = /health?probe=1",
            probe="websocket",
            dashboard=f"unix:{dashboard}",
        )
    )
    check = run("--config", str(config), "--check")
    assert check.returncode == 0, check.stderr
    process = support.LbwsProcess(config)
    try:
        client = await support.connect(process.url, headers={"X-User": "7"})
        for i in range(3):
            client.sendMessage(b"m%d" % i)
            assert await client.messages.get().addTimeout(10, reactor) == (b"m%d" % i, False)
            await support.deferLater(0.15)  # pings at 0.1 s are answered
        code, metrics = await unixGet(str(dashboard), b"/metrics")
        assert code == 200 and 'lbws_backend_weight{backend="a"} 1e+06' in metrics
        assert any(c.request.path == "/health" for c in backend.connections)
        code, _ = await unixGet(str(dashboard), b"/reload", method=b"POST", token="a;b#c")
        assert code == 200
        client.sendClose(1000)
        assert (await client.closed.addTimeout(10, reactor))[0] == 1000
    finally:
        assert process.stop() == 0


@pytest.mark.parametrize("key", ["listen", "dashboard"])
def test_a_port_in_use_is_one_line_and_exit_1(tmp_path, key):
    taken = support.listeningSocket()
    try:
        endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        config = tmp_path / "lbws.ini"
        config.write_text(support.configText([("a", "ws://127.0.0.1:1")], **{key: endpoint}))
        # Whether a port is free is known only when lbws starts.
        assert run("--config", str(config), "--check").returncode == 0
        result = run("--config", str(config))
    finally:
        taken.close()
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, output
    assert lines[0].endswith(f"lbws: cannot listen on {endpoint}: address already in use")


def test_a_port_in_use_ends_a_daemon_with_a_line_in_its_log(tmp_path):
    """
    As a daemon, lbws's stderr is gone: the line goes to the log file (as
    a critical event, before the traceback twistd writes there), and the
    parent twistd, which waits for the daemon's start, says why and exits
    1 instead of waiting forever.
    """
    taken = support.listeningSocket()
    try:
        endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        config = tmp_path / "lbws.ini"
        config.write_text(support.configText([("a", "ws://127.0.0.1:1")], listen=endpoint))
        log = tmp_path / "lbws.log"
        result = subprocess.run(
            [str(support.TWISTD), f"--pidfile={tmp_path / 'lbws.pid'}", f"--logfile={log}",
             "lbws", "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        taken.close()
    assert result.returncode == 1
    assert "cannot listen on tcp:" in result.stderr
    lines = [line for line in log.read_text().splitlines() if "#critical] lbws: cannot" in line]
    assert len(lines) == 1 and lines[0].endswith(f"lbws: cannot listen on {endpoint}: address already in use")


def nofile(soft, hard):
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def openFilesLimit(pid):
    with open(f"/proc/{pid}/limits") as f:
        (line,) = [line for line in f if line.startswith("Max open files")]
    return tuple(int(n) for n in line.split()[3:5])


@pytest.mark.parametrize("maxConnections, warned", [(100, False), (10000, True)])
def test_the_fd_limit_is_raised_to_the_hard_one_and_a_low_one_is_warned(
    tmp_path, maxConnections, warned
):
    """
    Started with a soft limit of 256 and a hard one of 4,096: lbws runs
    with 4,096, and warns (at start and on --check) when that is below
    2 x max_connections + 128.
    """
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText([("a", "ws://127.0.0.1:1")], lbws=f"max_connections = {maxConnections}")
    )
    warning = f"the file descriptor limit 4096 is below 2 x max_connections + 128 = {2 * maxConnections + 128}"
    check = run("--config", str(config), "--check", preexec_fn=nofile(256, 4096))
    assert check.returncode == 0
    assert "file descriptors: limit 4096 (soft limit 256, raised at start)" in check.stdout
    assert (warning in check.stdout) is warned
    process = support.LbwsProcess(config, preexec_fn=nofile(256, 4096))
    try:
        assert openFilesLimit(process.pid) == (4096, 4096)
        output = "".join(process.lines)
        assert "raised the file descriptor limit from 256 to 4096" in output
        assert (warning in output) is warned
    finally:
        assert process.stop() == 0


def somaxconn():
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


@pytest.mark.parametrize("extra, backlog", [("", BACKLOG), (":backlog=20", 20)])
def test_the_listen_backlog_is_511_unless_the_endpoint_sets_one(tmp_path, extra, backlog):
    """
    With lbws stopped (SIGSTOP), the kernel completes as many connections
    as the backlog holds (backlog + 1 on Linux) and drops the SYNs of the
    rest: 512 of a burst of 600 with the default, not 51 as with Twisted's
    default of 50.
    """
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText([("a", "ws://127.0.0.1:1")], listen=f"tcp:0:interface=127.0.0.1{extra}")
    )
    expected = min(backlog, somaxconn()) + 1
    process = support.LbwsProcess(config)
    clients = []
    try:
        process.signal(signal.SIGSTOP)
        for _ in range(600):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", process.port))
            clients.append(client)
        established = set()
        for _ in range(20):
            _, writable, _ = select.select([], [c for c in clients if c not in established], [], 0.1)
            established.update(
                c for c in writable if c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            )
        assert len(established) == expected
    finally:
        for client in clients:
            client.close()
        process.signal(signal.SIGCONT)
        assert process.stop() == 0


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:8020", "tcp:8020:backlog=511"),
        ("haproxy:tcp:8020:interface=10.0.0.5", "haproxy:tcp:8020:interface=10.0.0.5:backlog=511"),
        ("unix:/run/lbws.sock", "unix:/run/lbws.sock:backlog=511"),
        ("ssl:8443:privateKey=k.pem", "ssl:8443:privateKey=k.pem:backlog=511"),
        ("tcp6:8020:interface=\\:\\:1", "tcp6:8020:interface=\\:\\:1:backlog=511"),
        ("tcp:8020:backlog=64", "tcp:8020:backlog=64"),
        ("haproxy:tcp:8020:backlog=64", "haproxy:tcp:8020:backlog=64"),
        # A path that merely contains the words is not a backlog argument.
        ("unix:/tmp/a\\:backlog=x", "unix:/tmp/a\\:backlog=x:backlog=511"),
        # Endpoint types without a backlog argument are left alone.
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_the_backlog_is_added_only_where_it_applies_and_is_not_set(description, expected):
    assert withBacklog(description) == expected


class FakeLimits:
    """
    The part of the C{resource} module that L{lbws.ops.fdlimit} uses.
    """

    RLIMIT_NOFILE = resource.RLIMIT_NOFILE
    RLIM_INFINITY = resource.RLIM_INFINITY

    def __init__(self, soft, hard, refuse=False):
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        if self.refuse:
            raise ValueError("not allowed")
        self.limits = limits


@pytest.mark.parametrize(
    "soft, hard, refuse, result",
    [
        (1024, 65536, False, (1024, 65536)),
        (65536, 65536, False, (65536, 65536)),
        # Raising to "unlimited" fails on Linux (nr_open): the soft one stays.
        (1024, resource.RLIM_INFINITY, False, (1024, 1024)),
        (1024, 65536, True, (1024, 1024)),
    ],
)
def test_raising_the_soft_fd_limit(soft, hard, refuse, result):
    limits = FakeLimits(soft, hard, refuse)
    assert fdlimit.raiseSoftLimit(limits) == result
    assert limits.limits == (result[1], hard)
