"""
lbws's own resource limits are not backend failures: a real `twistd lbws`
whose file descriptors run out (its soft RLIMIT_NOFILE lowered while it
runs) answers new clients 503, says so once in its log, keeps its
backends up, and serves again once descriptors are back.
"""

import os
import resource

import pytest
import pytest_twisted

from tests import support
from tests.test_workers import dashboardStatus


def lowestFreeFd(pid):
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


@pytest_twisted.ensureDeferred
async def test_out_of_file_descriptors_sheds_clients_and_blames_no_backend(harness, tmp_path):
    backends = [await harness.backend(name) for name in "ab"]
    config = tmp_path / "lbws.ini"
    config.write_text(
        support.configText(
            [(name, b.url) for name, b in zip("ab", backends)],
            lbws="retries = 1",
            health="interval = 0.2\ntimeout = 1\nfall = 1\nrise = 1",
            dashboard="tcp:0:interface=127.0.0.1",
        )
    )
    lbws = support.LbwsProcess(config)
    harness.atEnd(lbws.stop)
    status = await dashboardStatus(lbws)
    assert {b["state"] for b in status["backends"]} == {"up"}
    client = await harness.client(lbws.url)
    client.sendMessage(b"before")
    assert await client.messages.get() == (b"before", False)

    soft, hard = resource.prlimit(lbws.pid, resource.RLIMIT_NOFILE)
    # Room for one descriptor: a client is accepted, its backend cannot be
    # connected (EMFILE), and neither can the health checks'.
    resource.prlimit(lbws.pid, resource.RLIMIT_NOFILE, (lowestFreeFd(lbws.pid) + 1, hard))
    try:
        mark = len(lbws.lines)
        for _ in range(5):
            with pytest.raises(support.HandshakeFailed) as refused:
                await support.connect(lbws.url)
            # Only the standard reason: why is for the log (below).
            assert refused.value.statusLine == "HTTP/1.1 503 Service Unavailable"
        # Health checks ran meanwhile, and failed the same way.
        await lbws.waitForLine(r"out of resources \(EMFILE\) running health checks", mark)
    finally:
        resource.prlimit(lbws.pid, resource.RLIMIT_NOFILE, (soft, hard))
    said = [line for line in lbws.lines[mark:] if "out of resources (EMFILE) opening" in line]
    assert len(said) == 1, said  # once per burst, not once per client

    status = await dashboardStatus(lbws)
    for backend in status["backends"]:
        assert (backend["state"], backend["failed"], backend["last_error"]) == ("up", 0, "")
    again = await harness.client(lbws.url)
    again.sendMessage(b"after")
    assert await again.messages.get() == (b"after", False)
    client.sendMessage(b"still open")
    assert await client.messages.get() == (b"still open", False)
