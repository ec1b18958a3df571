"""
The node `ws` backends that `make run` and the tests start survive a
client's bad frames: the connection that sent one is closed, the server
keeps serving everybody else (a demo that dies on one bad frame teaches
the wrong thing, and took `make run` down).
"""

import pytest
import pytest_twisted
from twisted.internet import reactor

from lbws.protocol.frames import OP_BINARY, OP_CONTINUATION, OP_TEXT
from tests import support, wire


def invalidUtf8():
    return wire.frame(OP_TEXT, b"caf\xc3(")


def tooManyFragments():
    # ws refuses a message of more than 16,384 fragments (close 1008).
    empty = wire.frame(OP_CONTINUATION, b"", fin=False)
    return wire.frame(OP_BINARY, b"x", fin=False) + empty * 16385


@pytest.mark.parametrize("script", ["echo-server.js", "sequence-server.js"])
@pytest.mark.parametrize("badInput", [invalidUtf8, tooManyFragments])
@pytest_twisted.ensureDeferred
async def test_a_bad_frame_closes_only_its_connection(script, badInput):
    if not support.nodeAvailable():
        pytest.fail("node and tests/node/node_modules are needed: run `make test`")
    backend = support.NodeBackend(script=script)
    try:
        bad = await wire.rawOpen(backend.url)
        bad.send(badInput())
        received = await bad.closed.addTimeout(10, reactor)
        assert received.startswith(b"HTTP/1.1 101"), received[:100]
        assert backend.process.poll() is None, "the backend died"
        good = await support.connect(backend.url)
        good.sendMessage(b"0:still here")
        assert await good.messages.get().addTimeout(10, reactor) == (b"0:still here", False)
        good.sendClose(1000)
        await good.closed.addTimeout(10, reactor)
    finally:
        backend.stop()
