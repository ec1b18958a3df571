"""Where a connection's CPU time and idle memory go in lbws.

    .venv/bin/python bench/breakdown.py cpu [--scenario S3] [--duration 10]
    .venv/bin/python bench/breakdown.py memory [--connections 2000]

`cpu` runs lbws (twistd) in front of one node `ws` echo backend, drives it
with one of the load generator's scenarios and samples it with py-spy
meanwhile. Every sample is put in a phase (the innermost frame that names
one): for S3 (connect, one round trip, close) the phases of a connection's
life (PHASES), for S1 (50 connections ping-ponging 32 B) and S2 (one
connection echoing 1 MiB) the steps of relaying a message (RELAY_PHASES:
read, frame scan, write, producer pauses, counting, reactor, system calls).
The table gives each phase's share of lbws's busy samples and, from lbws's
CPU time over the run, its microseconds per connection (S3) or per message
relayed (S1, S2: a round trip is two, one each way).

`memory` runs lbws in this process, opens the load generator's S4 idle
connections through it and compares what Python holds before and after:
tracemalloc by allocating line, and the live objects by type (their size
plus their instance dictionary's, which the dict row counts again). RSS,
which bench/run.py's S4 reports, also counts the allocator's slack; the
kernel side of sockets is in neither.

`--lbws-path DIR` runs the lbws package found in DIR (a checkout of another
commit) instead of this one, to compare before and after in one session.
Loopback only, ports from the OS; every process started is stopped.
"""
import argparse
import collections
import gc
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LOADGEN = BENCH / "loadgen.js"
ECHO_SERVER = REPO / "tests" / "node" / "echo-server.js"
VENV = REPO / ".venv" / "bin"
READY_TIMEOUT = 30.0

# Leaf functions whose own time is a system call: send, recv, connect,
# accept, close (py-spy shows a native call as its caller's line).
SYSCALLS = re.compile(
    r"^(untilConcludes|_SocketCloser\._closeSocket|socket\.accept|socket\._real_close"
    r"|writerFor\.<locals>\.writeThrough|BaseClient\.doConnect|Connection\.doRead"
    r"|Connection\.setTcpNoDelay|EPollReactor\._add|EPollReactor\._remove) "
)

# (phase, pattern): a sample belongs to the phase of the innermost frame
# matching one of these, tried in this order for each frame.
PHASES = [
    ("access log and end-of-connection counters", r"^Relay\.tunnelEnded "),
    ("frames relayed (the message, both closes)", r"^(Leg\.dataReceived|Leg\.forward|FrameScanner\.)"),
    ("tunnel set-up (legs take over the transports)",
     r"^(FrontendProtocol\.onOpen|Tunnel\.|handOver|Leg\.__init__)"),
    ("close and teardown",
     r"^(Leg\.connectionLost|Connection\.connectionLost|_BaseBaseClient\.connectionLost"
     r"|_DisconnectSelectableMixin\._disconnectSelectable|FileDescriptor\.loseConnection)"),
    ("Autobahn server handshake (client side: request parse, 101)",
     r"^(WebSocketServerProtocol\.|FrontendProtocol\.(connectionMade|processHandshake|dataReceived"
     r"|sendHttpErrorResponse|failHandshake))"),
    ("lbws request checks and routing",
     r"^(checkHead|headEnd|hostProblem|normaliseTarget|isWebSocketUpgrade|RouteTable\.|isToken"
     r"|FrontendProtocol\.onConnect|ClientInfo\.)"),
    ("Autobahn client handshake (backend side: request, 101 parse)",
     r"^(WebSocketClientProtocol\.|BackendProtocol\.|RelayProtocol\.|OctetRequest\.|parseHead"
     r"|Attempt\.opened|_ClientDial\._opened|acceptedHeaders)"),
    ("backend choice and dial (pool, headers, connect)",
     r"^(Relay\.openBackend|Dialer\.|_ClientDial\.|Attempt\.|Pool\.|forwardedHeaders|_Connecting\."
     r"|PosixReactorBase\.connectTCP|Connector\.|BaseClient\.|_BaseTCPClient\.|sticky\.)"),
    ("accept", r"^(Port\.doRead|Server\.__init__|_accept)"),
]
# S1 and S2: the steps of relaying a message, tried the same way. A system
# call's own time is its own phase (RELAY_SYSCALLS, by the leaf frame).
RELAY_SYSCALLS = [
    ("system call: recv", r"^(Connection\._dataReceived|Connection\.doRead) "),
    ("system call: send", r"^(writeThrough|FileDescriptor\.writeSomeData|Connection\.writeSomeData"
     r"|_SocketWriter\.) "),
    ("system call: epoll_ctl (pause, resume, write events)",
     r"^(EPollReactor\._add|EPollReactor\._remove|_ContinuousPolling\.) "),
]
RELAY_PHASES = [
    ("producer pauses and resumes",
     r"^(PeerProducer\.|FileDescriptor\.(pauseProducing|resumeProducing|stopReading|startReading"
     r"|startWriting|stopWriting)|_PullToPush)"),
    ("messages counted (metrics, idle clock)",
     r"^(Leg\.messageEnd|Tunnel\.messageFrom|Traffic\.|.*\.message |Leg\.flushCounts)"),
    ("write (writeThrough, transport.write)",
     r"^(writeThrough|Leg\.forward|FileDescriptor\.write|Connection\.write|hasQueuedWrites)"),
    ("frame scan (FrameScanner)", r"^(FrameScanner\.|frameExtent|Leg\.dataReceived)"),
    ("read (recv, bytes to the protocol)", r"^(Connection\.doRead|Connection\._dataReceived)"),
]
REACTOR = "reactor: event dispatch, timers, buffered writes, Deferreds"
KERNEL = "system calls (send, recv, connect, accept, close, epoll_ctl)"
OTHER_LOGS = "other log lines"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_ready(port):
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        probe = subprocess.run(["node", LOADGEN, "--port", str(port), "--scenario", "probe"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            return
        time.sleep(0.2)
    raise SystemExit(f"lbws on port {port} not ready within {READY_TIMEOUT:.0f} s")


def lbws_ini(directory, port, backend_port):
    ini = Path(directory) / "lbws.ini"
    ini.write_text(f"[lbws]\nlisten = tcp:{port}:interface=127.0.0.1:backlog=1024\n"
                   "dashboard =\nmax_connections = 50000\n[health]\nprobe = tcp\n"
                   f"[backend:echo]\nurl = ws://127.0.0.1:{backend_port}\n")
    return ini


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def classify(frames, relay=False):
    """The phase of one sample, given its frames from the root to the leaf:
    of a connection's life, or with `relay` of a message's relaying."""
    names = [re.sub(r" \(.*\)$", " ", frame) for frame in frames]
    if relay:
        for phase, pattern in RELAY_SYSCALLS:
            if re.match(pattern, names[-1]):
                return phase
        if "Logger.emit " in names:
            return OTHER_LOGS
        for name in reversed(names):
            for phase, pattern in RELAY_PHASES:
                if re.match(pattern, name):
                    return phase
        return REACTOR
    if SYSCALLS.match(names[-1]):
        return KERNEL
    if "Logger.emit " in names and "Relay.tunnelEnded " not in names:
        return OTHER_LOGS
    for name in reversed(names):
        for phase, pattern in PHASES:
            if re.match(pattern, name):
                return phase
    return REACTOR


def cpu(args):
    backend_port, port = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=args.lbws_path or str(REPO))
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            procs.append(subprocess.Popen(["node", ECHO_SERVER, "--port", str(backend_port)],
                                          stdout=subprocess.DEVNULL))
            lbws = subprocess.Popen(
                [VENV / "twistd", "-n", "--pidfile=", "lbws", "--config",
                 lbws_ini(tmp, port, backend_port)],
                cwd=args.lbws_path or REPO, env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(lbws)
            wait_ready(port)
            raw = Path(tmp) / "samples.txt"
            spy = subprocess.Popen(
                [VENV / "py-spy", "record", "-p", str(lbws.pid), "-d", str(args.duration),
                 "-r", "500", "-f", "raw", "-o", raw, "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(spy)
            before = cpu_seconds(lbws.pid)
            load = subprocess.run(["node", LOADGEN, "--port", str(port), "--scenario", args.scenario,
                                   "--duration", str(args.duration)],
                                  capture_output=True, text=True, timeout=args.duration + 60)
            used = cpu_seconds(lbws.pid) - before
            spy.wait(timeout=60)
            result = json.loads(load.stdout.strip().splitlines()[-1])
            samples = raw.read_text().splitlines()
            if args.samples:
                Path(args.samples).write_text(raw.read_text())
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=10)
    relay = args.scenario != "S3"
    phases = collections.Counter()
    idle = 0
    for line in samples:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith("EPollReactor.doPoll "):
            idle += int(count)
        else:
            phases[classify(frames, relay)] += int(count)
    busy = sum(phases.values())
    if relay:
        # Each round trip is two messages through lbws, one each way.
        unit, count = "message", 2 * result["round_trips"]
        rate = (f"{result['round_trips_per_s']:.0f} round trips/s, p99 {result['p99_ms']:.2f} ms"
                + (f", {result['mb_per_s']:.0f} MB/s" if "mb_per_s" in result else ""))
    else:
        unit, count = "connection", result["connections"]
        rate = f"{result['connections_per_s']:.0f} connections/s"
    per = 1e6 * used / count
    print(f"{args.scenario} for {args.duration} s: {count} {unit}s, {rate};"
          f" lbws CPU {used:.2f} s = {per:.1f} us per {unit}")
    print(f"py-spy: {busy} busy samples, {idle} idle (in epoll)\n")
    print(f"| phase | share of lbws's CPU | us per {unit} |\n| --- | --- | --- |")
    for phase, n in phases.most_common():
        print(f"| {phase} | {100 * n / busy:.1f}% | {per * n / busy:.1f} |")


def memory(args):
    if args.lbws_path:
        sys.path.insert(0, args.lbws_path)
    from twisted.internet import reactor

    from lbws.config import loadConfig
    from lbws.service import makeLbws

    backend_port, port = free_port(), free_port()
    echo = subprocess.Popen(["node", ECHO_SERVER, "--port", str(backend_port)],
                            stdout=subprocess.DEVNULL)
    snapshots = {}

    def snap(label, done):
        gc.collect()
        sizes, counts = collections.Counter(), collections.Counter()
        for obj in gc.get_objects():
            kind = type(obj)
            counts[kind] += 1
            sizes[kind] += sys.getsizeof(obj)
            attributes = None if isinstance(obj, type) else getattr(obj, "__dict__", None)
            if isinstance(attributes, dict):
                sizes[kind] += sys.getsizeof(attributes)
        snapshots[label] = (tracemalloc.take_snapshot(), sizes, counts)
        done.set()

    def atReactor(label):
        done = threading.Event()
        reactor.callFromThread(snap, label, done)
        done.wait(120)

    def drive():
        try:
            wait_ready(port)
            atReactor("before")
            load = subprocess.Popen(
                ["node", LOADGEN, "--port", str(port), "--scenario", "S4",
                 "--connections", str(args.connections)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for line in load.stdout:
                if '"open"' in line:
                    break
            time.sleep(1.0)  # let the last handshakes' leftovers go
            atReactor("after")
            load.stdin.close()
            load.wait(timeout=60)
        finally:
            reactor.callFromThread(reactor.stop)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            service = makeLbws(reactor, loadConfig(str(lbws_ini(tmp, port, backend_port))))
            service.startService()
            tracemalloc.start(4)
            threading.Thread(target=drive, daemon=True).start()
            reactor.run()
        finally:
            echo.terminate()
            echo.wait(timeout=10)
    if "after" not in snapshots:
        raise SystemExit("the idle connections did not all open")
    n = args.connections
    (old, oldSizes, oldCounts), (new, sizes, counts) = snapshots["before"], snapshots["after"]
    # What this script's own snapshots hold is not lbws's.
    lines = [stat for stat in new.compare_to(old, "traceback")
             if not any(f.filename == __file__ for f in stat.traceback)]
    print(f"{n} idle connections: Python heap +{sum(s.size_diff for s in lines) / n:,.0f} B"
          " per connection (tracemalloc)\n")
    print("| type | objects per connection | bytes per connection |\n| --- | --- | --- |")
    rows = sorted((((sizes[k] - oldSizes.get(k, 0)) / n, (counts[k] - oldCounts.get(k, 0)) / n, k)
                   for k in sizes), key=lambda row: row[:2], reverse=True)
    for size, count, kind in rows[:args.top]:
        if size >= 8:
            print(f"| {kind.__module__}.{kind.__qualname__} | {count:.2f} | {size:,.0f} |")
    print("\n| allocated at (outermost call first) | bytes per connection |\n| --- | --- |")
    for stat in lines[:args.top]:
        if stat.size_diff / n >= 8:
            where = " > ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stat.traceback)
            print(f"| {where} | {stat.size_diff / n:,.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["cpu", "memory"])
    parser.add_argument("--scenario", choices=["S1", "S2", "S3"], default="S3",
                        help="cpu: the load generator's scenario (default S3)")
    parser.add_argument("--duration", type=int, default=10, help="cpu: seconds of the scenario")
    parser.add_argument("--connections", type=int, default=2000, help="memory: idle connections")
    parser.add_argument("--top", type=int, default=20, help="memory: rows per table")
    parser.add_argument("--lbws-path", help="a directory holding another lbws package")
    parser.add_argument("--samples", help="cpu: keep py-spy's samples (collapsed stacks) here")
    args = parser.parse_args()
    raise_fd_limit()
    cpu(args) if args.what == "cpu" else memory(args)


if __name__ == "__main__":
    main()
