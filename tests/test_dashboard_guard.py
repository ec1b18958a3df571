"""
The dashboard's request checks, over real HTTP to an lbws in-process: the
Host header (against DNS rebinding), failed admin tokens (rate limited),
and the warning for a dashboard that listens beyond loopback.
"""

import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from lbws.config import parseConfig
from lbws.ops.dashboard import FailedTokens, exposureWarning
from lbws.service import makeLbws
from tests.support import configText
from tests.test_dashboard import TOKEN, DashboardHarness, get, post, request


@pytest_twisted.async_yield_fixture
async def harness():
    h = DashboardHarness()
    yield h
    await h.close()


@pytest_twisted.ensureDeferred
async def test_only_ip_addresses_and_localhost_are_served(harness):
    a = await harness.backend("a")
    lbws = await harness.lbws([("a", a.url)])
    port = lbws.dashboardUrl.rsplit(":", 1)[1]
    url = lbws.dashboardUrl
    for host in (f"127.0.0.1:{port}", "127.0.0.1", "localhost", f"LocalHost.:{port}",
                 "[::1]", f"[::1]:{port}", f"10.1.2.3:{port}"):
        response = await request(b"GET", url + "/status.json", host=host)
        assert response.code == 200, host
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example",
                 "127.0.0.1.nip.io", "[evil]", "127.0.0.1:x", "127.0.0.1:80:80"):
        for method, path in ((b"GET", "/status.json"), (b"GET", "/metrics"), (b"GET", "/"),
                             (b"POST", "/reload")):
            response = await request(method, url + path, host=host, token=TOKEN)
            assert response.code == 421, (host, path)
            assert "localhost" in response.json()["error"]
    # An outer load balancer's health check may name lbws as it likes.
    assert (await request(b"GET", url + "/healthz", host="lbws.internal")).code == 200
    assert lbws.pool["a"].drained is False


@pytest_twisted.ensureDeferred
async def test_failed_tokens_get_429_after_the_limit_with_one_log_line(harness):
    a = await harness.backend("a")
    lbws = await harness.lbws([("a", a.url)])
    events = harness.logged()
    for _ in range(FailedTokens.LIMIT):
        assert (await post(lbws, "/backends/a/drain", token="guess")).code == 401
    for token in ["guess"] * 30 + [TOKEN]:
        response = await post(lbws, "/backends/a/drain", token=token)
        assert response.code == 429
        assert 1 <= int(response.header(b"retry-after")) <= FailedTokens.WINDOW
    assert lbws.pool["a"].drained is False
    refused = [e for e in events if "bad or missing token" in e.get("log_format", "")]
    limited = [e for e in events if "failed the admin token" in e.get("log_format", "")]
    assert (len(refused), len(limited)) == (FailedTokens.LIMIT, 1)
    # Reading the dashboard is not an admin request: it still works.
    assert (await get(lbws, "/status.json")).code == 200


def test_failed_tokens_are_counted_per_address_in_a_window():
    clock = Clock()
    failed = FailedTokens(clock)
    for i in range(FailedTokens.LIMIT):
        assert failed.wait("a") == 0
        assert failed.failed("a") is (i == FailedTokens.LIMIT - 1)
    assert failed.wait("a") == FailedTokens.WINDOW
    assert failed.wait("b") == 0
    clock.advance(FailedTokens.WINDOW - 1)
    assert failed.wait("a") == 1
    clock.advance(1)
    assert failed.wait("a") == 0
    assert failed.failed("a") is False


def test_failed_tokens_remember_a_bounded_number_of_addresses():
    failed = FailedTokens(Clock())
    for i in range(FailedTokens.CLIENTS + 500):
        for _ in range(FailedTokens.LIMIT):
            failed.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(failed._clients) == FailedTokens.CLIENTS
    assert failed.wait("10.0.0.0") == 0
    assert failed.wait(f"10.0.{(FailedTokens.CLIENTS + 499) // 256}.{(FailedTokens.CLIENTS + 499) % 256}") > 0


def settingsFor(dashboard, token=""):
    return parseConfig(
        configText([("a", "ws://127.0.0.1:1")], dashboard=dashboard, lbws=f"admin_token = {token}"),
        "test.ini",
    )


def test_a_dashboard_beyond_loopback_is_warned_about_as_it_starts(harness):
    events = harness.logged()
    for dashboard, token, words in (
        ("tcp:8021", "", "admin actions are off (no admin_token)"),
        ("tcp:8021:interface=10.0.0.5", TOKEN, "admin actions need admin_token"),
        ("tcp6:8021:interface=\\:\\:", "", "beyond loopback"),
    ):
        site = makeLbws(MemoryReactorClock(), settingsFor(dashboard, token)).dashboard.factory
        site.doStart()
        site.doStop()
        (warning,) = [e for e in events if "beyond loopback" in str(e.get("warning"))]
        assert words in warning["warning"] and dashboard in warning["warning"]
        events.clear()
    for dashboard in ("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1", "unix:/tmp/x", ""):
        assert exposureWarning(settingsFor(dashboard)) is None, dashboard
