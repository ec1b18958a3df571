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
