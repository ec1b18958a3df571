"""
First contact (README, "Compared with the nginx setup"): what a newcomer
meets when lbws stands in front of an ordinary application, over real
sockets.
"""

import json

import pytest_twisted

from tests import wire
from tests.test_hostile import backendHead, fields
from tests.test_httpproxy import _hostPort, _httpBackend, exchange
from tests.support import handshakeRequest

# UTF-8 cookies as browsers send them: "Å" is C3 85 and "х" D1 85, so both
# carry the byte 0x85 that older Autobahn parsers took for a line end.
COOKIE = "name=Åsa; city=Хорошёво".encode()


@pytest_twisted.ensureDeferred
async def test_utf8_cookie_reaches_a_websocket_backend_byte_for_byte(harness):
    backend = await wire.rawBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], health="interval = 60")
    request = handshakeRequest()[:-2] + b"Cookie: " + COOKIE + b"\r\n\r\n"
    head = await backendHead(harness, lbws, backend, request)
    assert dict(fields(head))[b"cookie"] == COOKIE


@pytest_twisted.ensureDeferred
async def test_utf8_cookie_reaches_an_http_backend_byte_for_byte(harness):
    backend = await _httpBackend(harness)
    lbws = await harness.lbws([("a", backend.url)], health="interval = 60")
    [(status, _, body)], _ = await exchange(
        _hostPort(lbws.url), [("GET", "/echo", None, {"Cookie": COOKIE})]
    )
    assert status == 200
    assert json.loads(body)["headers"]["cookie"] == [COOKIE.decode()]
