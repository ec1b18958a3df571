"""
First contact (README, "Compared with the nginx setup"): what a newcomer
meets when lbws stands in front of an ordinary application, over real
sockets.
"""

import json

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionDone

from tests import support, wire
from tests.test_hostile import backendHead, fields
from tests.test_httpproxy import _hostPort, _httpBackend, exchange
from tests.support import eventually, handshakeRequest

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


# Gentle with backends: FIN, not a reset, for a connection lbws gives up on.


@pytest_twisted.ensureDeferred
async def test_backend_handshake_timeout_ends_with_fin(harness):
    silent = await harness.silent()
    lbws = await harness.lbws(
        [("silent", silent.url)], health="interval = 60", lbws="handshake_timeout = 1"
    )
    with pytest.raises(support.HandshakeFailed):
        await support.connect(lbws.url)
    await eventually(lambda: silent.lost)
    # The backend read an end of file (lbws's FIN), not ECONNRESET.
    assert silent.lost[0].reason.check(ConnectionDone), silent.lost[0].reason


@pytest_twisted.ensureDeferred
async def test_timed_out_websocket_check_ends_with_fin(harness):
    silent = await harness.silent()
    await harness.lbws(
        [("silent", silent.url)], probe="websocket", health="interval = 1\ntimeout = 0.5"
    )
    await eventually(lambda: silent.lost)
    assert silent.lost[0].reason.check(ConnectionDone), silent.lost[0].reason


@pytest_twisted.ensureDeferred
async def test_client_leaving_while_its_backend_answers_slowly_ends_with_fin(harness):
    silent = await harness.silent()
    lbws = await harness.lbws([("silent", silent.url)], health="interval = 60")
    client = await wire.rawConnect(lbws.url)
    client.transport.write(handshakeRequest())
    await eventually(lambda: silent.connections)
    client.transport.loseConnection()
    await eventually(lambda: silent.lost)
    assert silent.lost[0].reason.check(ConnectionDone), silent.lost[0].reason
    await eventually(lambda: lbws.pool["silent"].active == 0)
    assert lbws.pool["silent"].failed == 0
