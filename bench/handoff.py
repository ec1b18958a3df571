"""
Take-over timing (README, "Upgrading without closing connections"): how
long a new lbws takes to take N idle tunnels over from the running one, and
the largest round trip a few streaming clients see meanwhile.

    .venv/bin/python bench/handoff.py [--connections 9900] [--streamers 5]
        [--baseline 3] [--json bench/results/handoff.json]

Everything runs on 127.0.0.1: a node `ws` echo backend
(tests/node/echo-server.js), an lbws (`twistd -n lbws`) with a
handoff_socket, `node bench/loadgen.js --scenario S4` holding the idle
connections, and in this process STREAMERS Autobahn clients in ping-pong,
timing every round trip. Then `twistd lbws --take-over` starts, and the
script reports:

  - start_to_listening_s: from starting the new process until it accepts
    (Python and Twisted starting, the config, the listeners handed over);
  - tunnels_s: from then until the old process says it handed everything
    over (the tunnels moving);
  - moved, kept, failed: from the old process's handoff event;
  - rtt_max_ms_before, rtt_max_ms_during: the largest round trip of any
    streaming client in the BASELINE seconds before, and from the start of
    the new process until one second after the handover; rtt_p50_ms_during;
  - old_exit: the old process's exit status; still_open: whether every
    idle connection was still open at the end (loadgen's count).

Each lbws process holds two descriptors per tunnel: N must stay under half
the descriptor limit (20,000 on the development machine, hence 9,900).
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task, threads  # noqa: E402


class Loadgen:
    """
    node bench/loadgen.js S4: N idle connections, held until stdin closes.
    """

    def __init__(self, port, count):
        self.process = subprocess.Popen(
            [
                "node",
                str(ROOT / "bench" / "loadgen.js"),
                "--port",
                str(port),
                "--scenario",
                "S4",
                "--connections",
                str(count),
                "--hold-timeout",
                "900",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events = []
        self.opened = threading.Event()
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if event.get("event") == "open":
                self.opened.set()
        self.ended.set()

    def release(self):
        self.process.stdin.close()
        self.ended.wait(120)
        self.process.wait(30)
        return next((e for e in self.events if e.get("event") == "result"), {})


async def streamer(url, samples, running, clock):
    from tests.support import connect, roundTrip

    client = await connect(url)
    while running[0]:
        start = clock.seconds()
        await roundTrip(client, b"x" * 32, timeout=60)
        samples.append((start, clock.seconds() - start))
    client.sendClose(1000)


async def main(reactor, options):
    from tests.support import LbwsProcess, NodeBackend, configText

    count = options.connections
    work = Path(tempfile.mkdtemp(prefix="lbws-handoff-"))
    backend = NodeBackend()
    config = work / "lbws.ini"
    config.write_text(
        configText(
            [("a", backend.url)],
            lbws=f"handoff_socket = {work}/handoff.sock\nmax_connections = {count + 100}\n",
        )
    )
    old = new = loadgen = None
    try:
        old = LbwsProcess(config)
        loadgen = Loadgen(old.port, count)
        opened = await threads.deferToThread(loadgen.opened.wait, 600)
        if not opened:
            raise RuntimeError("the idle connections did not open")
        samples, running = [], [True]
        streaming = [
            defer.ensureDeferred(streamer(old.url, samples, running, reactor))
            for _ in range(options.streamers)
        ]
        await task.deferLater(reactor, options.baseline)
        start = reactor.seconds()
        new = await threads.deferToThread(LbwsProcess, config, "--take-over", timeout=120)
        listening = reactor.seconds()
        line = await old.waitForLine(r"handed over to a new lbws", timeout=600)
        done = reactor.seconds()
        await task.deferLater(reactor, 1.0)
        running[0] = False
        await defer.DeferredList(streaming)
        oldExit = await old.exited(600)
        moved, kept, failed = (
            int(n)
            for n in re.search(
                r"(\d+) connection\(s\) moved, (\d+) stay here.*, (\d+) failed", line
            ).groups()
        )
        before = [rtt for t, rtt in samples if t < start]
        during = sorted(rtt for t, rtt in samples if start <= t <= done + 1.0)
        held = loadgen.release()
        return {
            "connections": count,
            "streamers": options.streamers,
            "start_to_listening_s": round(listening - start, 3),
            "tunnels_s": round(done - listening, 3),
            "moved": moved,
            "kept": kept,
            "failed": failed,
            "rtt_max_ms_before": round(max(before) * 1000, 1),
            "rtt_max_ms_during": round(max(during) * 1000, 1),
            "rtt_p50_ms_during": round(during[len(during) // 2] * 1000, 1),
            "old_exit": oldExit,
            "still_open": held.get("still_open"),
        }
    finally:
        if loadgen is not None and loadgen.process.poll() is None:
            loadgen.process.kill()
        for process in (new, old):
            if process is not None:
                process.stop()
        backend.stop()


def run():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=9900)
    parser.add_argument("--streamers", type=int, default=5)
    parser.add_argument("--baseline", type=float, default=3.0)
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()

    async def go(reactor):
        result = await main(reactor, options)
        text = json.dumps(result, indent=2)
        print(text)
        if options.json is not None:
            options.json.write_text(text + "\n")

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    run()
