"""
Plain HTTP through lbws with software nobody here wrote, side by side with
the backend direct and with nginx on the same requests: a WSGI app under
gunicorn as the backend, curl and httpx as clients (uploads with
C{Expect: 100-continue} and chunked, HEAD, 204, 304, Range, gzip).
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import pytest_twisted
from twisted.internet import threads, utils

from tests import support
from tests.support import eventually, listeningSocket

APP_DIR = Path(__file__).parent / "apps"
UPLOAD = os.urandom(300 * 1024)


class Gunicorn:
    """
    tests/apps/wsgi_app.py under gunicorn, on a loopback socket it
    inherits (gunicorn cannot bind port 0 and say which it got).
    """

    def __init__(self):
        sock = listeningSocket()
        self.port = sock.getsockname()[1]
        try:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "gunicorn", "--bind", f"fd://{sock.fileno()}",
                    "--workers", "1", "--chdir", str(APP_DIR), "wsgi_app:application",
                ],
                pass_fds=[sock.fileno()],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        finally:
            sock.close()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self):
        support.stopProcess(self.process)


def _gunicornAnswers(address):
    try:
        return httpx.get(f"http://{address}/empty", timeout=1).status_code == 204
    except httpx.HTTPError:
        return False


@pytest.fixture
def upload(tmp_path):
    path = tmp_path / "upload.bin"
    path.write_bytes(UPLOAD)
    return path


async def _curl(*args):
    """
    curl's status and body (with C{-D -}: the heads, interim ones too).
    """
    out, err, code = await utils.getProcessOutputAndValue(
        "curl", ["-sS", "--max-time", "20", *args], env=os.environ
    )
    assert code == 0, err
    return out


def _status(head):
    return head.split(b"\r\n", 1)[0].split(b" ")[1]


CASES = [
    ("page", ["/"]),
    ("head", ["-I", "/"]),
    ("204", ["/empty"]),
    ("304", ["-H", 'If-None-Match: "page-1"', "/"]),
    ("range", ["-r", "100-299", "/"]),
    ("gzip", ["--compressed", "/gz"]),
]


@pytest_twisted.ensureDeferred
async def test_curl_and_httpx_get_what_they_get_direct_and_through_nginx(upload, tmp_path):
    harness = support.Harness()
    gunicorn = Gunicorn()
    harness.atEnd(gunicorn.stop)
    try:
        await eventually(lambda: threads.deferToThread(_gunicornAnswers, gunicorn.address))
        lbws = await harness.lbws([("app", f"ws://{gunicorn.address}")])
        nginx = await support.Nginx(tmp_path / "nginx", gunicorn.port).started()
        harness.atEnd(nginx.stop)
        addresses = {
            "direct": gunicorn.address,
            "lbws": lbws.url.split("://", 1)[1],
            "nginx": nginx.address,
        }
        for name, args in CASES:
            seen = {}
            for via, address in addresses.items():
                *options, path = args
                out = await _curl(*options, "-w", "\n%{http_code}", f"http://{address}{path}")
                # A HEAD's head differs in Date, Server...: its status only.
                seen[via] = out.rsplit(b"\n", 1)[1] if name == "head" else out
            assert seen["lbws"] == seen["direct"] == seen["nginx"], name
            assert seen["direct"].endswith(b"200" if name in ("page", "head", "gzip") else b"")
        expected = f"{len(UPLOAD)} {hashlib.sha256(UPLOAD).hexdigest()}".encode()
        # Uploads direct and through lbws (tests/support.Nginx's nginx, run
        # as this user, cannot write the temporary file it buffers a large
        # body to, and answers 500).
        for via in ("direct", "lbws"):
            address = addresses[via]
            url = f"http://{address}/upload"
            # Expect: 100-continue, which curl sends for a large upload.
            out = await _curl("-D", "-", "-T", str(upload), "-H", "Expect: 100-continue", url)
            heads = out.split(b"\r\n\r\n")
            assert _status(heads[0]) in (b"100", b"200"), (via, out[:200])
            assert out.endswith(expected), via
            # Chunked.
            out = await _curl(
                "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{upload}", url
            )
            assert out == expected, via

            def viaHttpx():
                with httpx.Client(timeout=10) as client:
                    answers = [
                        client.get(f"http://{address}/", headers={"Range": "bytes=0-9"}),
                        client.head(f"http://{address}/"),
                        client.get(f"http://{address}/gz"),
                        client.post(url, content=iter([UPLOAD[:1000], UPLOAD[1000:]])),
                    ]
                    return [(a.status_code, a.content) for a in answers]

            answers = await threads.deferToThread(viaHttpx)
            assert answers[0] == (206, bytes(range(10)))
            assert answers[1][0] == 200 and answers[1][1] == b""
            assert answers[2][0] == 200 and len(answers[2][1]) == 256 * 64
            assert answers[3] == (200, expected)
    finally:
        await harness.close()


def _get(address, path, count):
    """
    C{count} keep-alive GETs over one client connection, with httpx.
    """
    with httpx.Client(timeout=10) as client:
        return [client.get(f"http://{address}{path}").json() for _ in range(count)]


@pytest.mark.skipif(not support.nodeAvailable(), reason="needs node (make setup)")
@pytest_twisted.ensureDeferred
async def test_node_http_backend_connections_are_reused_and_replaced_when_it_closes_them():
    harness = support.Harness()
    # node closes an idle connection after 300 ms, before lbws's pool would.
    node = support.NodeBackend("--keep-alive-ms", "300", script="http-server.js")
    harness.atEnd(node.stop)
    try:
        lbws = await harness.lbws(
            [("node", node.url)], lbws="http_keepalive = 4\nhttp_keepalive_timeout = 60"
        )
        address = lbws.url.split("://", 1)[1]
        answers = await threads.deferToThread(_get, address, "/a", 50)
        # 50 requests over one pooled backend connection.
        assert {a["connections"] for a in answers} == {1}
        assert lbws.relay.idle.count() == 1
        # node closes it; lbws notices (or finds it closed when it sends),
        # and the next request goes over a new one, the client none the wiser.
        await eventually(lambda: lbws.relay.idle.count() == 0)
        answers = await threads.deferToThread(_get, address, "/b", 3)
        assert [a["connections"] for a in answers] == [2, 2, 2]
        assert lbws.pool["node"].consecutiveFailures == 0

        def chunkedUpload():
            with httpx.Client(timeout=10) as client:
                return client.post(
                    f"http://{address}/up", content=iter([b"x" * 1000, b"y" * 5])
                ).json()

        answer = await threads.deferToThread(chunkedUpload)
        assert (answer["method"], answer["length"], answer["trailers"]) == ("POST", 1005, {})
    finally:
        await harness.close()
