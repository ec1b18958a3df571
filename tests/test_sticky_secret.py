"""
Sticky cookie ids keyed with C{sticky_secret_file} (README, "Sticky
sessions"): the same in every worker and every lbws that reads the file,
new after a reload with a new secret, unguessable without it; and the
warning when there is none, in C{--check} and in the start log.
"""

import os
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import reactor, utils

from lbws.backends import sticky
from lbws.config import ConfigError, loadConfig, parseConfig, summary
from lbws.service import makeLbws
from tests import support
from tests.test_httpproxy import _httpBackend

SECRET = b"0f3c9a1e5b7d2c4a6e8f0b1d3c5a7e9f"


def _member(name, url):
    return SimpleNamespace(name=name, settings=SimpleNamespace(url=url))


def test_ids_depend_on_the_secret_and_only_on_it():
    member = _member("a", "ws://10.0.0.1:80/app")
    keyed = sticky.stickyId(member, SECRET)
    assert keyed == sticky.stickyId(_member("a", "ws://10.0.0.1:80/app"), SECRET)
    assert keyed != sticky.stickyId(member)  # the constant key of the source
    assert keyed != sticky.stickyId(member, SECRET + b"x")
    assert keyed != sticky.stickyId(_member("b", "ws://10.0.0.1:80/app"), SECRET)
    assert len(sticky.stickyId(member, b"k" * 1000)) == len(keyed) == 18
    header = f"LB={keyed}"
    pool = SimpleNamespace(serving=lambda route: [SimpleNamespace(
        name="a", settings=member.settings, state=sticky.UP, weight=1)])
    assert sticky.preferred(pool, "LB", header, None, SECRET) is not None
    assert sticky.preferred(pool, "LB", header, None, b"other") is None
    assert sticky.setCookie("LB", member, header, SECRET) is None
    assert sticky.setCookie("LB", member, header) == f"LB={sticky.stickyId(member)}; Path=/; HttpOnly"


def _config(lbws="", routes=""):
    return support.configText([("a", "ws://127.0.0.1:1")], lbws=lbws, routes=routes)


def test_secret_file_is_read_and_its_line_end_dropped(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    settings = parseConfig(_config(f"sticky_cookie = LB\nsticky_secret_file = {path}"))
    assert (settings.sticky_secret, settings.sticky_secret_file) == (SECRET, str(path))
    assert settings.notes == ()
    assert f"sticky_cookie LB (ids keyed with {path})" in summary(settings)
    assert SECRET.decode() not in repr(settings) + summary(settings)


@pytest.mark.parametrize("contents", [None, b"", b" \r\n\t\n"])
def test_an_unreadable_or_empty_secret_file_is_a_config_error(tmp_path, contents):
    path = tmp_path / "secret"
    if contents is not None:
        path.write_bytes(contents)
    with pytest.raises(ConfigError) as raised:
        parseConfig(_config(f"sticky_secret_file = {path}"), "lbws.ini")
    error = raised.value
    assert (error.path, error.section, error.key) == ("lbws.ini", "lbws", "sticky_secret_file")
    assert str(error).startswith("lbws.ini: [lbws] sticky_secret_file: ")
    assert repr(str(path)) in str(error)
    assert ("cannot read" if contents is None else "is empty") in str(error)


def test_without_a_secret_check_says_ids_can_be_reversed(tmp_path):
    warning = "ids can be reversed by anyone who guesses backend names and URLs"
    assert warning in summary(parseConfig(_config("sticky_cookie = LB")))
    routed = parseConfig(
        _config(routes="[route:r]\nbackends = a\nsticky_cookie = LB\n[route:s]\npath = /s\nbackends = a\n")
    )
    assert warning in summary(routed)
    # No stickiness, nothing to reverse.
    assert warning not in summary(parseConfig(_config()))
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    assert "holds 3 bytes" in summary(
        parseConfig(_config(f"sticky_cookie = LB\nsticky_secret_file = {short}"))
    )


async def _cookie(url):
    """
    The sticky id in the Set-Cookie curl gets on a new connection.
    """
    out, err, code = await utils.getProcessOutputAndValue(
        "curl", ["-s", "-o", "/dev/null", "-D", "-", url + "/echo"], env=os.environ
    )
    assert code == 0, err
    [line] = [x for x in out.decode().splitlines() if x.lower().startswith("set-cookie:")]
    return line.split(":", 1)[1].strip().split(";")[0].removeprefix("LB=")


@pytest_twisted.ensureDeferred
async def test_workers_and_instances_reading_one_secret_give_the_same_ids(harness, tmp_path):
    backend = await _httpBackend(harness)
    secret = tmp_path / "sticky.key"
    secret.write_bytes(SECRET + b"\n")
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [("a", backend.url)],
            lbws=f"workers = 2\nsticky_cookie = LB\nsticky_secret_file = {secret}\ndrain_timeout = 1",
        )
    )
    expected = sticky.stickyId(_member("a", backend.url), SECRET)
    workers = support.LbwsProcess(config)
    harness.atEnd(workers.stop)
    other = tmp_path / "other.ini"
    other.write_text(
        support.configText(
            [("a", backend.url)], lbws=f"sticky_cookie = LB\nsticky_secret_file = {secret}"
        )
    )
    single = await harness.start(makeLbws(reactor, loadConfig(other)))
    http = workers.url.replace("ws://", "http://")
    # Each request on a new connection: the parent hands them to both
    # workers, which read the file themselves.
    assert {await _cookie(http) for _ in range(6)} == {expected}
    assert await _cookie(single.url.replace("ws://", "http://")) == expected
    # A new secret, read again on reload.
    secret.write_bytes(b"another secret of enough bytes!!")
    assert single.reload()
    renewed = sticky.stickyId(_member("a", backend.url), b"another secret of enough bytes!!")
    assert await _cookie(single.url.replace("ws://", "http://")) == renewed
    # A secret gone on reload: refused, the running one stays.
    secret.write_bytes(b"")
    assert not single.reload()
    assert await _cookie(single.url.replace("ws://", "http://")) == renewed


@pytest_twisted.ensureDeferred
async def test_the_start_log_warns_without_a_secret(harness, tmp_path):
    backend = await _httpBackend(harness)
    config = tmp_path / "lbws.ini"
    config.write_text(support.configText([("a", backend.url)], lbws="sticky_cookie = LB"))
    process = support.LbwsProcess(config)
    harness.atEnd(process.stop)
    await process.waitForLine(r"ids can be reversed by anyone who guesses backend names and URLs")
    result = await utils.getProcessOutputAndValue(
        str(support.TWISTD), ["-n", "--pidfile=", "lbws", "--config", str(config), "--check"],
        env=os.environ,
    )
    out, _, code = result
    assert code == 0
    assert b"ids can be reversed by anyone who guesses backend names and URLs" in out
