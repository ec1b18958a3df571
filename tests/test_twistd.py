"""
The command line an operator types, and packaging: `twistd lbws` as a real
process, and a wheel that gives a working plugin without the source tree.
"""

import os
import subprocess
import sys
import zipfile

import pytest
import pytest_twisted

from tests import support

TWISTD = str(support.TWISTD)


def run(*args, cwd=None, env=None, preexec_fn=None):
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "lbws", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        preexec_fn=preexec_fn,
    )


def test_help_lists_the_options():
    result = run("--help")
    assert result.returncode == 0
    for option in ("--config", "--check", "--log-format"):
        assert option in result.stdout


def test_check_prints_a_summary():
    result = run("--config", "etc/lbws.ini", "--check", cwd=support.ROOT)
    assert result.returncode == 0
    assert "etc/lbws.ini: OK" in result.stdout
    assert "echo1: ws://127.0.0.1:8010 weight 1" in result.stdout


@pytest.mark.parametrize("check", [True, False])
def test_bad_config_is_refused_with_where_and_what(tmp_path, check):
    config = tmp_path / "bad.ini"
    config.write_text("[lbws]\nbalance = fastest\n[backend:a]\nurl = ws://127.0.0.1:1\n")
    result = run("--config", str(config), *(["--check"] if check else []))
    assert result.returncode == 1
    assert f"{config}: [lbws] balance: 'fastest' is not one of" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_config_is_required():
    result = run()
    assert result.returncode != 0
    assert "--config" in result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_twistd_relays_for_the_seed_backend(tmp_path, nodeBackend):
    config = tmp_path / "lbws.ini"
    config.write_text(support.configText([("node", nodeBackend.url)]))
    process = support.LbwsProcess(config)
    try:
        client = await support.connect(process.url, path="/chat?room=1")
        client.sendMessage(b"__request__")
        payload, _ = await client.messages.get()
        assert b'"url":"/chat?room=1"' in payload
        for i in range(50):
            client.sendMessage(b"m%d" % i, isBinary=bool(i % 2))
            assert await client.messages.get() == (b"m%d" % i, bool(i % 2))
        client.sendClose(1000)
        assert (await client.closed)[0] == 1000
    finally:
        assert process.stop() == 0


def test_wheel_gives_a_working_plugin(tmp_path):
    """
    `pip install .` (not only -e) must give `twistd lbws`: the plugin file
    and the dashboard page are in the wheel, and twistd finds the plugin
    from the installed copy alone.
    """
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=support.ROOT,
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("lbws-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/lbws_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names
    assert "lbws/ops/dashboard.html" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c", "import lbws; print(lbws.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert probe.stdout.startswith(str(target))
    result = run("--config", str(support.ROOT / "etc" / "lbws.ini"), "--check", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "2 backend(s)" in result.stdout
