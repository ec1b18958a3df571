"""
Encoded slashes and dot segments (C{escaped_slashes}, README "Paths"), end
to end: nginx as the backend, which decodes C{%2F} before it resolves dot
segments, so that it shows where a target would really land; curl
(C{--path-as-is}) for plain HTTP and raw handshakes for WebSocket.
"""

import os
import textwrap

import pytest
import pytest_twisted
from twisted.internet import reactor, utils

from lbws.config import ConfigError, parseConfig
from tests import support, wire

class DecodingBackend(support.Nginx):
    """
    nginx answering with the path it resolved: C{inside PATH} under
    C{/app/}, C{outside PATH} elsewhere.
    """

    CONF = textwrap.dedent(
        """\
        pid {dir}/nginx.pid;
        error_log {dir}/error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {dir}/client_body;
            proxy_temp_path {dir}/proxy;
            fastcgi_temp_path {dir}/fastcgi;
            uwsgi_temp_path {dir}/uwsgi;
            scgi_temp_path {dir}/scgi;
            server {{
                listen 127.0.0.1:{port};
                location /app/ {{ return 200 "inside $uri"; }}
                location / {{ return 200 "outside $uri"; }}
            }}
        }}
        """
    )


async def decodingBackend(harness, tmp_path):
    nginx = DecodingBackend(tmp_path / "nginx", 0)
    harness.atEnd(nginx.stop)
    return await nginx.started()


async def curl(url):
    """
    The status and body curl gets for C{url}, sent as it is.
    """
    out, err, code = await utils.getProcessOutputAndValue(
        "curl", ["-s", "--path-as-is", "-w", "\n%{http_code}", url], env=os.environ
    )
    assert code == 0, err
    body, _, status = out.decode().rpartition("\n")
    return int(status), body if status == "200" else ""


async def handshake(lbws, target):
    """
    The status line and body a WebSocket handshake for C{target} gets (the
    backend's answer other than 101 reaches the client as it is).
    """
    raw = await wire.rawConnect(lbws.url)
    raw.send(support.handshakeRequest(target))
    received = await raw.closed.addTimeout(10, reactor)
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode("latin-1") if status == 200 else ""


async def both(lbws, target):
    """
    What plain HTTP and a WebSocket handshake get for C{target}: they must
    agree.
    """
    http = await curl(lbws.url.replace("ws://", "http://") + target)
    ws = await handshake(lbws, target)
    assert http == ws, target
    return http


REJECTED = [
    "/..%2fsecret",
    "/..%2Fsecret",
    "/a%2f..%2f..%2fsecret",
    "/a%2Fb",
    "/a%5cb",
    "/a%5Cb",
    "/%2e%2e/secret",
    "/.%2E/secret",
    "/a/%2e/b",
    "/..;/secret",
]


@pytest_twisted.ensureDeferred
async def test_escaped_slashes_and_encoded_dot_segments_get_400_by_default(harness, tmp_path):
    nginx = await decodingBackend(harness, tmp_path)
    lbws = await harness.lbws([("a", nginx.url + "/app")], health="interval = 60")
    for target in REJECTED:
        assert await both(lbws, target) == (400, ""), target
    # Plain dot segments are resolved, the query is not looked at.
    assert await both(lbws, "/x/../y") == (200, "inside /app/y")
    assert await both(lbws, "/ok?q=..%2F..%2fx") == (200, "inside /app/ok")


@pytest_twisted.ensureDeferred
async def test_keep_passes_escaped_slashes_but_no_target_leaves_the_prefix(harness, tmp_path):
    nginx = await decodingBackend(harness, tmp_path)
    lbws = await harness.lbws(
        [("a", nginx.url + "/app")], health="interval = 60", lbws="escaped_slashes = keep"
    )
    assert await both(lbws, "/a%2Fb") == (200, "inside /app/a/b")
    assert await both(lbws, "/a%5Cb") == (200, "inside /app/a\\b")
    # Encoded dot segments are resolved by lbws before the prefix is joined.
    assert await both(lbws, "/%2e%2e/secret") == (200, "inside /app/secret")
    # Dot segments only nginx would see, behind an encoded slash, climbed
    # out of /app/ ("outside /secret"): refused.
    # So are dot segments before path parameters, which Tomcat and Spring
    # strip before resolving ("/..;/secret").
    for target in (
        "/..%2fsecret", "/a%2f..%2f..%2fsecret", "/..%5Csecret", "/x/%2e%2e%2F..%2fy", "/..;/secret"
    ):
        assert await both(lbws, target) == (400, ""), target


@pytest_twisted.ensureDeferred
async def test_a_route_overrides_escaped_slashes_and_strip_prefix_stays_confined(
    harness, tmp_path
):
    nginx = await decodingBackend(harness, tmp_path)
    lbws = await harness.lbws(
        [("a", nginx.url + "/app")],
        health="interval = 60",
        routes="""
        [route:files]
        path = /files
        strip_prefix = true
        escaped_slashes = keep
        backends = a
        [route:rest]
        backends = a
        """,
    )
    assert await both(lbws, "/files/a%2Fb") == (200, "inside /app/a/b")
    assert await both(lbws, "/other/a%2Fb") == (400, "")
    for target in ("/files/..%2fsecret", "/files/x%2f..%2f..%2f..%2fsecret"):
        assert await both(lbws, target) == (400, ""), target
    assert await both(lbws, "/files/x/../y") == (200, "inside /app/y")


@pytest_twisted.ensureDeferred
async def test_a_route_matches_encoded_letters_as_the_backend_decodes_them(harness, tmp_path):
    """
    C{/%61dmin} is C{/admin} to a decoding backend (RFC 3986 6.2.2.2): it
    must take the C{/admin} route, never slip past it to another one (a
    route may be the place of its own C{allowed_origins}).
    """
    nginx = await decodingBackend(harness, tmp_path)
    lbws = await harness.lbws(
        [("a", nginx.url + "/app"), ("b", nginx.url + "/app/b")],
        health="interval = 60",
        routes="""
        [route:admin]
        path = /admin
        backends = b
        [route:rest]
        backends = a
        """,
    )
    assert await both(lbws, "/admin/x") == (200, "inside /app/b/admin/x")
    for target in ("/%61dmin/x", "/%61%64%6D%69%6E/x", "/x/../%61dmin/x"):
        assert await both(lbws, target) == (200, "inside /app/b/admin/x"), target
    # Other escapes stay as they came: "%40" is not "@" to a route.
    assert await both(lbws, "/%40dmin") == (200, "inside /app/@dmin")


def test_escaped_slashes_is_checked_and_routes_inherit_it():
    config = support.configText(
        [("a", "ws://127.0.0.1:1")],
        lbws="escaped_slashes = keep",
        routes="[route:r]\nbackends = a\n[route:s]\npath = /s\nescaped_slashes = reject\nbackends = a\n",
    )
    settings = parseConfig(config)
    assert settings.escaped_slashes == "keep"
    assert [r.escaped_slashes for r in settings.routes] == ["keep", "reject"]
    assert parseConfig(support.configText([("a", "ws://127.0.0.1:1")])).escaped_slashes == "reject"
    with pytest.raises(ConfigError) as raised:
        parseConfig(support.configText([("a", "ws://127.0.0.1:1")], lbws="escaped_slashes = merge"))
    assert str(raised.value) == "<config>: [lbws] escaped_slashes: 'merge' is not one of reject, keep"
