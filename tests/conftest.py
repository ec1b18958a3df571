import pytest
import pytest_twisted

from tests import support


@pytest.fixture
def nodeBackend():
    """
    A node `ws` echo backend like the seed's, stopped after the test.
    """
    if not support.nodeAvailable():
        pytest.fail("node and tests/node/node_modules are needed: run `make test`")
    backend = support.NodeBackend()
    yield backend
    backend.stop()


@pytest_twisted.async_yield_fixture
async def harness():
    """
    A L{support.Harness}: backends, lbws and clients stopped after the test.
    """
    h = support.Harness()
    yield h
    await h.close()


@pytest_twisted.async_yield_fixture
async def backend():
    """
    An Autobahn echo backend in this process, for an lbws in another one;
    its connections are cut and its port closed after the test.
    """
    factory, port = await support.startEchoBackend("a")
    yield factory
    for connection in factory.connections:
        if connection.transport is not None:
            connection.transport.abortConnection()
    await port.stopListening()
