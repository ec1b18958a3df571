"""
The INI file: defaults, every kind of mistake and the message it gets.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbws.config import ConfigError, checkReload, loadConfig, parseConfig, summary

MINIMAL = "[backend:a]\nurl = ws://127.0.0.1:8010\n"


def error(text):
    with pytest.raises(ConfigError) as raised:
        parseConfig(text, "lbws.ini")
    return raised.value


def test_defaults():
    settings = parseConfig(MINIMAL)
    assert settings.listen == "tcp:8020"
    assert settings.dashboard == "tcp:8021:interface=127.0.0.1"
    assert settings.balance == "least_conn"
    assert settings.handshake_timeout == 10
    assert settings.connect_timeout == 5
    assert settings.retries == 2
    assert settings.idle_timeout == 0
    assert settings.ping_interval == 30
    assert settings.max_message_size == 16777216
    assert settings.max_connections == 10000
    assert (settings.max_frames_per_message, settings.max_connections_per_ip) == (131072, 0)
    assert settings.max_message_rate == 0
    assert settings.drain_timeout == 30
    assert settings.stop_delay == 0
    assert (settings.close_spread, settings.drain_mode) == (10, "keep")
    assert settings.admin_token == ""
    assert (settings.handoff_socket, settings.handoff_timeout) == ("", 10)
    assert settings.health.interval == 2
    assert settings.health.probe == "default"
    (backend,) = settings.backends
    assert (backend.name, backend.host, backend.port, backend.weight) == (
        "a",
        "127.0.0.1",
        8010,
        1,
    )


def test_example_config_is_valid():
    settings = loadConfig("etc/lbws.ini")
    assert [b.name for b in settings.backends] == ["echo1", "echo2"]


def test_everything_given():
    settings = parseConfig(
        """
[lbws]
listen = tcp:9000 ; inline comment
dashboard =
balance = hash
hash_key = header:X-User-Id
handshake_timeout = 2.5
connect_timeout = 1
retries = 0
idle_timeout = 60
ping_interval = 0
max_message_size = 1024
max_connections = 5
drain_timeout = 3
admin_token = s3cret
slow_start = 0
rebalance = off
rebalance_rate = 5
workers = 1

[health]
interval = 0.5
timeout = 0.25
fall = 3
rise = 1
probe = http
path = /health
subprotocol = chat

[backend:one]
url = ws://h1:81/app/
weight = 3

[backend:two]
url = wss://h2/app
verify = false
"""
    )
    assert settings.dashboard == ""
    assert str(settings.hash_key) == "header:X-User-Id"
    assert settings.health.probe == "http"
    one, two = settings.backends
    assert (one.path, one.weight, one.secure) == ("/app", 3, False)
    assert (two.port, two.secure, two.verify) == (443, True, False)


@pytest.mark.parametrize(
    "text, section, key, words",
    [
        ("[lbws]\nbalanse = x\n" + MINIMAL, "lbws", "balanse", "unknown key"),
        ("[lbws]\nbalance = random\n" + MINIMAL, "lbws", "balance", "round_robin"),
        ("[lbws]\nretries = two\n" + MINIMAL, "lbws", "retries", "whole number"),
        ("[lbws]\nretries = -1\n" + MINIMAL, "lbws", "retries", "at least 0"),
        ("[lbws]\nhandshake_timeout = 0\n" + MINIMAL, "lbws", "handshake_timeout", "at least 0.1 seconds"),
        ("[lbws]\nping_interval = 1e-6\n" + MINIMAL, "lbws", "ping_interval", "0 (off) or at least 0.1"),
        ("[lbws]\nidle_timeout = 0.01\n" + MINIMAL, "lbws", "idle_timeout", "0 (off) or at least 0.1"),
        ("[health]\ninterval = 0.0001\n" + MINIMAL, "health", "interval", "at least 0.1 seconds"),
        ("[health]\ntimeout = 0.05\n" + MINIMAL, "health", "timeout", "at least 0.1 seconds"),
        ("[health]\npath = /a b\n" + MINIMAL, "health", "path", "without spaces"),
        ("[health]\npath = /a\x01b\n" + MINIMAL, "health", "path", "printable ASCII"),
        ("[health]\nsubprotocol = a,b\n" + MINIMAL, "health", "subprotocol", "HTTP token"),
        ("[backend:a]\nurl = ws://h\nweight = 1" + "0" * 400 + "\n", "backend:a", "weight", "at most 1000000"),
        ("[backend:a]\nurl = ws://h\nresolve = 0.001\n", "backend:a", "resolve", "0 (off) or at least 0.1"),
        ("[lbws]\nadmin_token = correct horse #battery staple\n" + MINIMAL, "lbws", "admin_token", "inline comments start with ' ;'"),
        ("[lbws]\nadmin_token = s3cret ; note\n" + MINIMAL, "lbws", "admin_token", "own line"),
        ("[lbws]\nbalance = hash # note\n" + MINIMAL, "lbws", "balance", "'#' after a space"),
        ("[lbws]\nconnect_timeout = nan\n" + MINIMAL, "lbws", "connect_timeout", "finite"),
        ("[lbws]\nmax_message_size = 0\n" + MINIMAL, "lbws", "max_message_size", "at least 1"),
        ("[lbws]\nmax_frames_per_message = 0\n" + MINIMAL, "lbws", "max_frames_per_message", "at least 1"),
        ("[lbws]\nmax_connections_per_ip = -1\n" + MINIMAL, "lbws", "max_connections_per_ip", "at least 0"),
        ("[lbws]\nmax_message_rate = 2.5\n" + MINIMAL, "lbws", "max_message_rate", "whole number"),
        ("[lbws]\nlisten = bogus:1\n" + MINIMAL, "lbws", "listen", "endpoint"),
        ("[lbws]\nlisten =\n" + MINIMAL, "lbws", "listen", "required"),
        ("[lbws]\nhash_key = body\n" + MINIMAL, "lbws", "hash_key", "header:NAME"),
        ("[lbws]\nworkers = 0\n" + MINIMAL, "lbws", "workers", "at least 1"),
        ("[lbws]\nworkers = 2\nlisten = unix:/tmp/x\n" + MINIMAL, "lbws", "workers", "tcp: or ssl:"),
        ("[lbws]\nrebalance = fast\n" + MINIMAL, "lbws", "rebalance", "off, gradual"),
        ("[lbws]\nrebalance_rate = 0\n" + MINIMAL, "lbws", "rebalance_rate", "greater than 0"),
        ("[lbws]\nslow_start = -1\n" + MINIMAL, "lbws", "slow_start", "at least 0"),
        ("[lbws]\nslow_start = soon\n" + MINIMAL, "lbws", "slow_start", "a number"),
        ("[lbws]\nstop_delay = -1\n" + MINIMAL, "lbws", "stop_delay", "at least 0"),
        ("[lbws]\nstop_delay = later\n" + MINIMAL, "lbws", "stop_delay", "a number"),
        ("[lbws]\nclose_spread = 0.05\n" + MINIMAL, "lbws", "close_spread", "0 (off) or at least 0.1"),
        ("[lbws]\nclose_spread = -1\n" + MINIMAL, "lbws", "close_spread", "at least 0"),
        ("[lbws]\nclose_spread = slowly\n" + MINIMAL, "lbws", "close_spread", "a number"),
        ("[lbws]\ndrain_mode = drop\n" + MINIMAL, "lbws", "drain_mode", "keep, shed"),
        (MINIMAL + "[route:r]\nbackends = a\ndrain_mode = Shed\n", "route:r", "drain_mode", "keep, shed"),
        ("[lbws]\nhandoff_socket = run/lbws.sock\n" + MINIMAL, "lbws", "handoff_socket", "absolute path"),
        ("[lbws]\nhandoff_socket = /" + "s" * 107 + "\n" + MINIMAL, "lbws", "handoff_socket", "107 bytes"),
        ("[lbws]\nhandoff_socket = /run/lbws/\n" + MINIMAL, "lbws", "handoff_socket", "directory"),
        ("[lbws]\nhandoff_socket = /run/h.sock\nworkers = 2\n" + MINIMAL, "lbws", "handoff_socket", "workers = 1 only"),
        ("[lbws]\nhandoff_timeout = 0\n" + MINIMAL, "lbws", "handoff_timeout", "at least 0.1 seconds"),
        ("[lbws]\nhandoff_timeout = soon\n" + MINIMAL, "lbws", "handoff_timeout", "a number"),
        ("[health]\nprobe = icmp\n" + MINIMAL, "health", "probe", "tcp, websocket, http"),
        ("[health]\nfall = 0\n" + MINIMAL, "health", "fall", "at least 1"),
        ("[health]\npath = health\n" + MINIMAL, "health", "path", "start with /"),
        ("[health]\nintervall = 1\n" + MINIMAL, "health", "intervall", "unknown key"),
        ("[backend:a]\nurl = http://h:1\n", "backend:a", "url", "ws:// or wss://"),
        ("[backend:a]\nurl = ws://:1\n", "backend:a", "url", "no host"),
        ("[backend:a]\nurl = ws://h:99999\n", "backend:a", "url", "not a URL"),
        ("[backend:a]\nurl = ws://h/?x=1\n", "backend:a", "url", "query"),
        ("[backend:a]\n", "backend:a", "url", "missing"),
        ("[lbws]\nlisten = ssl:0:privateKey=/nonexistent.pem\n" + MINIMAL, "lbws", "listen", "endpoint"),
        ("[backend:a]\nurl = ws://h\nweight = -1\n", "backend:a", "weight", "at least 0"),
        ("[backend:a]\nurl = ws://h\nverify = maybe\n", "backend:a", "verify", "true or false"),
        ("[backend:a]\nurl = ws://h\nverify = false\n", "backend:a", "verify", "wss://"),
        ("[backend:a]\nurl = wss://h\nca = /nonexistent.pem\n", "backend:a", "ca", "cannot read"),
        ("[backend:a]\nurl = ws://h\nsrv = _ws._tcp.x\n", "backend:a", "srv", "not both"),
        ("[backend:a]\nsrv = chat.example\n", "backend:a", "srv", "SRV name"),
        ("[backend:a]\nurl = ws://10.0.0.1\nresolve = 5\n", "backend:a", "resolve", "host name"),
        ("[backend:a]\nurl = ws://[::1]:80\nresolve = 5\n", "backend:a", "resolve", "host name"),
        ("[backend:a]\nurl = ws://h\nresolve = -5\n", "backend:a", "resolve", "at least 0"),
        ("[backend:a]\nsrv = _ws._tcp.x.example\nverify = false\n", "backend:a", "verify", "wss://"),
        ("[backend:a]\nurl = ws://h\nurl = ws://g\n", "backend:a", "url", "twice"),
        ("[backend:a b]\nurl = ws://h\n", "backend:a b", None, "backend name"),
        ("[backends:a]\nurl = ws://h\n", "backends:a", None, "unknown section"),
        (MINIMAL + MINIMAL, "backend:a", None, "twice"),
        ("[lbws]\n", None, None, "no backend"),
    ],
)
def test_mistakes_name_file_section_and_key(text, section, key, words):
    e = error(text)
    assert (e.path, e.section, e.key) == ("lbws.ini", section, key)
    assert words in str(e)
    assert str(e).startswith("lbws.ini")


def test_stop_and_drain_mode_in_check():
    """
    --check shows the window the closes will be spread over, shortened to
    half of drain_timeout when that is less, and what a draining backend's
    connections do, per route where it differs.
    """
    settings = parseConfig(MINIMAL)
    assert "stop: stop_delay 0s, close_spread 10s, drain_timeout 30s; drain_mode keep" in summary(
        settings
    )
    settings = parseConfig(
        "[lbws]\nstop_delay = 5\ndrain_timeout = 8\ndrain_mode = shed\nrebalance_rate = 20\n"
        + MINIMAL
        + "[route:r]\nbackends = a\ndrain_mode = keep\n[route:s]\npath = /s\nbackends = a\n"
    )
    text = summary(settings)
    assert (
        "stop: stop_delay 5s, close_spread 10s (closes spread over 4s: half of drain_timeout),"
        " drain_timeout 8s; drain_mode shed at 20/s"
    ) in text
    assert "  r: any host, any path -> a; balance least_conn; drain_mode keep" in text
    assert "  s: any host, path /s -> a; balance least_conn\n" in text + "\n"
    assert [r.drain_mode for r in settings.routes] == ["keep", "shed"]


def test_a_byte_order_mark_is_not_part_of_the_first_line():
    assert parseConfig("\ufeff[lbws]\nretries = 1\n" + MINIMAL).retries == 1


def test_inline_comments_after_a_space_and_semicolon_are_taken_off():
    settings = parseConfig(
        "[lbws]\nbalance = hash   ; comment\nhash_key = header:X;Y\nadmin_token =   ; none\n"
        "dashboard = # off\n" + MINIMAL
    )
    assert (settings.balance, str(settings.hash_key)) == ("hash", "header:X;Y")
    assert (settings.admin_token, settings.dashboard) == ("", "")


def test_a_secret_is_never_shown_in_an_error():
    message = str(error("[lbws]\nadmin_token = correct horse #battery staple\n" + MINIMAL))
    assert "horse" not in message and "battery" not in message


def test_credentials_in_a_backend_url_are_masked():
    settings = parseConfig("[backend:a]\nurl = ws://user:p%40ss@h:81/app\n")
    (backend,) = settings.backends
    assert backend.url == "ws://***@h:81/app"
    assert (backend.host, backend.port, backend.path) == ("h", 81, "/app")
    assert "p%40ss" not in summary(settings)
    assert "p%40ss" not in str(error("[backend:a]\nurl = http://user:p%40ss@h\n"))


def test_not_an_ini_file():
    assert "not an INI file" in str(error("url = ws://h\n"))


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as raised:
        loadConfig(tmp_path / "missing.ini")
    assert "cannot read" in str(raised.value)


def test_summary_lists_backends():
    text = summary(parseConfig(MINIMAL + "[backend:b]\nurl = ws://h:2\nweight = 2\n", "x.ini"))
    assert "x.ini: OK" in text
    assert "a: ws://127.0.0.1:8010 weight 1" in text
    assert "b: ws://h:2 weight 2" in text


@given(st.text(max_size=30))
def test_any_retries_value_parses_or_fails_clearly(value):
    """
    Whatever an operator writes, the result is a setting or a ConfigError
    that names the key, never another exception.
    """
    text = f"[lbws]\nretries = {value}\n" + MINIMAL
    try:
        settings = parseConfig(text, "f.ini")
    except ConfigError as e:
        assert e.section in ("lbws", None)
    else:
        assert isinstance(settings.retries, int) and settings.retries >= 0


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_url_parses_or_fails_clearly(value):
    text = f"[backend:a]\nurl = {value}\n"
    try:
        settings = parseConfig(text, "f.ini")
    except ConfigError:
        pass
    else:
        assert settings.backends[0].url.startswith(("ws://", "wss://"))


def test_stop_delay_parses():
    assert parseConfig("[lbws]\nstop_delay = 2.5\n" + MINIMAL).stop_delay == 2.5


def test_handoff_keys_parse_and_show_in_the_summary():
    settings = parseConfig(
        "[lbws]\nhandoff_socket = /run/lbws/handoff.sock ; comment\nhandoff_timeout = 2.5\n"
        + MINIMAL
    )
    assert (settings.handoff_socket, settings.handoff_timeout) == ("/run/lbws/handoff.sock", 2.5)
    assert "handoff_socket /run/lbws/handoff.sock (handoff_timeout 2.5s)" in summary(settings)
    assert "handoff_socket off" in summary(parseConfig(MINIMAL))


@pytest.mark.parametrize(
    "key, before, after",
    [
        ("listen", "tcp:8020", "tcp:8030"),
        ("dashboard", "tcp:8021", ""),
        ("workers", "1", "2"),
        ("handoff_socket", "/run/a.sock", ""),
    ],
)
def test_check_reload_refuses_what_needs_a_restart(key, before, after):
    old = parseConfig(f"[lbws]\n{key} = {before}\n" + MINIMAL, "lbws.ini")
    new = parseConfig(f"[lbws]\n{key} = {after}\n" + MINIMAL, "lbws.ini")
    with pytest.raises(ConfigError) as raised:
        checkReload(old, new)
    e = raised.value
    assert (e.path, e.section, e.key) == ("lbws.ini", "lbws", key)
    assert f"changed from {getattr(old, key)!r} to {getattr(new, key)!r}" in str(e)
    assert "restart lbws for that" in str(e)


def test_check_reload_lets_everything_else_change():
    old = parseConfig("[lbws]\nretries = 1\n" + MINIMAL)
    new = parseConfig("[lbws]\nretries = 3\nstop_delay = 5\n[backend:b]\nurl = ws://h\n" + MINIMAL)
    checkReload(old, new)
