"""
The systemd notification protocol, against a fake NOTIFY_SOCKET: a real Unix
datagram socket the test binds, by path or by abstract name; and the unit
file, checked by systemd-analyze.
"""

import os
import shutil
import signal
import socket
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor

from lbws.ops import systemd
from lbws.config import loadConfig
from lbws.service import makeLbws
from tests import support

UNIT = support.ROOT / "etc" / "lbws.service"


class FakeNotifySocket:
    """
    What systemd listens on: a Unix datagram socket, read by the test.
    """

    def __init__(self, path=None):
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"lbws-test-{os.getpid()}-{id(self)}"
            self.socket.bind("\0" + name)
            self.address = "@" + name
        else:
            self.socket.bind(str(path))
            self.address = str(path)

    def next(self, timeout=10):
        """
        The next notification as a dict of its fields.
        """
        self.socket.settimeout(timeout)
        data = self.socket.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    def pending(self):
        """
        Every notification already sent, without waiting.
        """
        self.socket.setblocking(False)
        messages = []
        while True:
            try:
                data = self.socket.recv(4096)
            except BlockingIOError:
                return messages
            messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def close(self):
        self.socket.close()


@pytest.fixture(params=["path", "abstract"])
def notifySocket(request, tmp_path):
    fake = FakeNotifySocket(tmp_path / "notify" if request.param == "path" else None)
    yield fake
    fake.close()


def test_noNotifySocket():
    """
    Without NOTIFY_SOCKET (not under Type=notify) there is no notifier.
    """
    assert systemd.fromEnvironment({}) is None
    assert systemd.fromEnvironment({"NOTIFY_SOCKET": ""}) is None


def test_unsupportedAddress():
    """
    An address lbws does not speak (systemd's vsock: form) is not used.
    """
    assert systemd.fromEnvironment({"NOTIFY_SOCKET": "vsock:2:1234"}) is None


def test_notify(notifySocket):
    """
    Fields go as newline-separated KEY=VALUE lines in one datagram, to a
    path or to an abstract name given as @name.
    """
    notifier = systemd.fromEnvironment({"NOTIFY_SOCKET": notifySocket.address})
    assert notifier.ready("serving\nnow")
    assert notifySocket.next() == {"READY": "1", "STATUS": "serving now"}
    assert notifier.reloading()
    message = notifySocket.next()
    assert message["RELOADING"] == "1"
    assert int(message["MONOTONIC_USEC"]) > 0
    assert notifier.stopping()
    assert notifySocket.next() == {"STOPPING": "1"}


def test_nobodyListening(tmp_path):
    """
    A socket that is gone is logged, not raised: lbws keeps running.
    """
    notifier = systemd.Notifier(str(tmp_path / "gone"))
    assert notifier.ready() is False


def _writeConfig(path, backends, lbws=""):
    path.write_text(support.configText(backends, lbws=lbws))
    return path


@pytest_twisted.ensureDeferred
async def test_serviceNotifies(tmp_path, notifySocket):
    """
    READY=1 once listening, RELOADING=1 then READY=1 around a reload (with
    a STATUS saying why when it is refused), STOPPING=1 on stop.
    """
    factory, port = await support.startEchoBackend()
    config = _writeConfig(tmp_path / "lbws.ini", [("a", factory.url)])
    service = makeLbws(
        reactor, loadConfig(config), notifier=systemd.Notifier(notifySocket.address)
    )
    try:
        service.startService()
        listening = await service.listener.whenListening()
        ready = notifySocket.next()
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"listening on 127.0.0.1:{listening.getHost().port}"

        assert service.reload()
        reloading, ready = notifySocket.pending()
        assert reloading["RELOADING"] == "1"
        assert ready["READY"] == "1"

        _writeConfig(config, [("a", factory.url)], lbws="retries = many")
        assert not service.reload()
        reloading, ready = notifySocket.pending()
        assert reloading["RELOADING"] == "1"
        assert ready["READY"] == "1"
        assert "reload refused" in ready["STATUS"]
        assert "retries" in ready["STATUS"]
    finally:
        await service.stopService()
        await port.stopListening()
    assert notifySocket.pending() == [{"STOPPING": "1"}]


@pytest_twisted.ensureDeferred
async def test_twistdNotifies(tmp_path, notifySocket):
    """
    A real `twistd -n lbws` under a NOTIFY_SOCKET says READY=1 once it
    listens and STOPPING=1 when told to stop.
    """
    factory, port = await support.startEchoBackend()
    config = _writeConfig(tmp_path / "lbws.ini", [("a", factory.url)])
    lbws = support.LbwsProcess(config, env={"NOTIFY_SOCKET": notifySocket.address})
    try:
        ready = notifySocket.next()
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"listening on 127.0.0.1:{lbws.port}"
        lbws.signal(signal.SIGTERM)
        assert notifySocket.next() == {"STOPPING": "1"}
        assert await lbws.exited() == 0
    finally:
        lbws.stop()
        await port.stopListening()


def test_twistdWithoutNotifySocket(tmp_path):
    """
    Without NOTIFY_SOCKET lbws sends nothing and says nothing about it.
    """
    config = _writeConfig(tmp_path / "lbws.ini", [("a", "ws://127.0.0.1:9")])
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    lbws = support.LbwsProcess(config, env=env)
    assert lbws.stop() == 0
    assert not [line for line in lbws.lines if "systemd" in line or "NOTIFY" in line]


def test_unitFileVerifies(tmp_path):
    """
    etc/lbws.service passes `systemd-analyze verify` without a warning, with
    ExecStart pointed at this checkout's twistd (verify wants it to exist).
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is needed (Debian: apt-get install systemd)")
    text = UNIT.read_text()
    execStart = [line for line in text.splitlines() if line.startswith("ExecStart=")]
    assert len(execStart) == 1
    assert " -n --pidfile= lbws --config /etc/lbws/lbws.ini" in execStart[0]
    twistd = execStart[0].split("=", 1)[1].split()[0]
    unit = tmp_path / "lbws.service"
    unit.write_text(text.replace(twistd, str(support.TWISTD)))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_unitFileSettings():
    """
    What the unit promises: notify, reload by HUP, restart on failure, the
    file limit, and the hardening.
    """
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    expected = {
        "Type": ["notify"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "Restart": ["on-failure"],
        "LimitNOFILE": ["65536"],
        "DynamicUser": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "NoNewPrivileges": ["yes"],
        "PrivateTmp": ["yes"],
        "CapabilityBoundingSet": [""],
    }
    for key, value in expected.items():
        assert settings.get(key) == value, key
