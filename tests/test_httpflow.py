"""
Plain HTTP flow control over real sockets (issue 21): a client that
pipelines and reads nothing holds at most a few responses in lbws, and a
client pipelining into a route whose backends are down does not hold the
reactor from the others. Real lbws, real twisted.web backends, raw socket
clients in threads or processes of their own.
"""

import socket
import subprocess
import sys

import pytest_twisted
from twisted.internet import threads, utils
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests import support
from tests.support import eventually

PAGE = b"p" * 16 * 1024


class _Page(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.served = 0

    def render_GET(self, request):
        self.served += 1
        return PAGE


def _held(front):
    """
    Bytes lbws holds for a client: its transport's write buffer and what
    h11 read ahead of it.
    """
    transport = front.transport
    queued = len(transport.dataBuffer) + getattr(transport, "_tempDataLen", 0)
    return queued + len(front.conn.trailing_data[0])


@pytest_twisted.ensureDeferred
async def test_a_client_that_pipelines_and_reads_nothing_holds_a_few_responses():
    harness = support.Harness()
    try:
        page = _Page()
        port = await harness.listen(Site(page))
        lbws = await harness.lbws([("a", f"ws://127.0.0.1:{port.getHost().port}")])
        lbwsPort = int(lbws.url.rsplit(":", 1)[1])
        sock = socket.socket()
        # A small window, so the kernel holds little and lbws must wait.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.connect(("127.0.0.1", lbwsPort))
        harness.atEnd(sock.close)
        request = b"GET /page HTTP/1.1\r\nHost: t\r\n\r\n"
        await threads.deferToThread(sock.sendall, request * 5000)

        def stalled():
            fronts = list(lbws.relay.http)
            return fronts and not fronts[0].writable

        await eventually(stalled)
        front = list(lbws.relay.http)[0]
        # Stalled with the kernel's buffers full: lbws itself holds about
        # its transport's 64 KiB high-water mark and one response, not the
        # rest of the 5,000.
        assert _held(front) < 256 * 1024
        assert page.served < 1000

        def readAll():
            sock.settimeout(30)
            seen = 0
            tail = b""
            marker = b"HTTP/1.1 200 OK"
            while seen < 5000:
                data = sock.recv(1 << 20)
                if not data:
                    break
                chunk = tail + data
                seen += chunk.count(marker)
                tail = chunk[-(len(marker) - 1):]
            return seen

        assert await threads.deferToThread(readAll) == 5000
        assert page.served == 5000
    finally:
        await harness.close()


# The two clients of the next test, each a process of its own (threads of
# this one would share the reactor's interpreter lock).
_FLOOD = """
import socket, sys, threading
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def send():
    while True:
        sock.sendall(b"GET /down HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n" * 500)
threading.Thread(target=send, daemon=True).start()
while sock.recv(1 << 20):
    pass
"""

_LATENCIES = """
import socket, sys, time
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sock.settimeout(10)
times = []
for _ in range(int(sys.argv[2])):
    start = time.monotonic()
    sock.sendall(b"GET /up HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\\r\\n", 1)[0])
    while len(body) < length:
        body += sock.recv(65536)
    times.append(time.monotonic() - start)
print(" ".join(f"{t:.6f}" for t in times))
"""


async def _latencies(port, count):
    """
    C{count} keep-alive GETs one after the other from another process;
    their round trips in seconds.
    """
    out = await utils.getProcessOutput(
        sys.executable, ["-c", _LATENCIES, str(port), str(count)], errortoo=True
    )
    return [float(t) for t in out.split()]


@pytest_twisted.ensureDeferred
async def test_a_pipeline_into_a_dead_route_does_not_hold_the_other_clients():
    harness = support.Harness()
    try:
        page = _Page()
        port = await harness.listen(Site(page))
        lbws = await harness.lbws(
            [("up", f"ws://127.0.0.1:{port.getHost().port}"), ("down", harness.deadUrl())],
            lbws="retries = 0",
            routes="[route:down]\npath = /down\nbackends = down\n"
            "[route:up]\npath = /up\nbackends = up\n",
        )
        lbwsPort = int(lbws.url.rsplit(":", 1)[1])
        await _latencies(lbwsPort, 20)  # warm
        flood = subprocess.Popen([sys.executable, "-c", _FLOOD, str(lbwsPort)])
        harness.atEnd(lambda: (flood.kill(), flood.wait(10)), first=True)
        # The flood is on (it goes on while the other client measures).
        await eventually(lambda: lbws.counters.httpRequests.get(("down", "5xx"), 0) > 100)
        before = lbws.counters.httpRequests[("down", "5xx")]
        times = sorted(await _latencies(lbwsPort, 200))
        assert lbws.counters.httpRequests[("down", "5xx")] > before + 100  # it went on
        p99 = times[int(len(times) * 0.99) - 1]
        assert p99 < 0.050, f"p99 {p99 * 1000:.1f} ms"
    finally:
        await harness.close()

