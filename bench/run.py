"""Benchmark lbws against nginx, HAProxy and a direct connection, in one run.

Every target sits in front of the same node `ws` echo backend and is driven by
the same load generator (bench/loadgen.js), one target at a time, each started
fresh, so the ratios between targets are what to read: the absolute numbers
depend on the machine, and on a 2-core box the load generator, the backend and
the proxy share the cores.

Run with the repo venv: .venv/bin/python bench/run.py [--smoke] [--targets ...]
See bench/README.md for what the numbers mean.
"""
import argparse
import contextlib
import json
import os
import queue
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
LOADGEN = BENCH / "loadgen.js"
ECHO_SERVER = REPO / "tests" / "node" / "echo-server.js"
HTTP_BACKEND = BENCH / "http-backend.js"
COUNTING_BACKEND = BENCH / "counting-backend.js"
TWISTD = REPO / ".venv" / "bin" / "twistd"

SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "H1", "S6")
TARGETS = ("direct", "nginx", "nginx-w2", "haproxy", "lbws", "lbws-w2", "lbws-base")
READY_TIMEOUT = 30.0      # seconds for a target to accept and echo
STOP_TIMEOUT = 5.0        # seconds for a process to exit on SIGTERM before SIGKILL
SCENARIO_SLACK = 60.0     # seconds allowed beyond a scenario's duration
S4_OPEN_TIMEOUT = 150.0   # loadgen gives up opening after 120 s
S4_SETTLE = 0.5           # seconds between "all open" and reading the RSS
STORM_TIMEOUT = 120.0     # S5: seconds from the backend's restart until all must be back
RSS_POLL = 0.05           # S5: seconds between readings of the target's RSS
CPU_POLL = 0.1            # S6: seconds between readings of CPU time
CPU_WINDOW = 1.0          # S6: peak CPU is the most used in any window this long
RATE_WINDOW = 1.0         # S6: peak reconnect rate, over windows this long (seconds)
PACED_SPREADS = (0.0, 10.0)  # S6: the close_spread values compared
LISTEN_BACKLOG = 4096     # every target's listen backlog (Linux caps it at somaxconn)
FD_MARGIN = 256           # descriptors a proxy needs besides two per client
SATURATED = 0.9           # loadgen CPU share above which a number is a lower bound
OTHER_LOAD = 0.15         # CPU share of unrelated processes worth a warning

# What each scenario is judged by; for S4 and S5 lower is better.
HEADLINE = {"S1": "round_trips_per_s", "S2": "mb_per_s", "S3": "connections_per_s",
            "S4": "bytes_per_conn", "S5": "reconnect_seconds", "H1": "requests_per_s"}
UNIT = {"S1": "round trips/s", "S2": "MB/s", "S3": "conn/s", "S4": "bytes/conn",
        "S5": "s all back", "H1": "req/s"}
LOWER_IS_BETTER = {"S4", "S5", "S1_cpu", "S3_cpu", "H1_cpu"}
# Second numbers compared with nginx too: key -> (scenario, field, label).
EXTRA_RATIOS = {"S1_cpu": ("S1", "cpu_us_per_round_trip", "S1 CPU us/round trip"),
                "S3_cpu": ("S3", "cpu_ms_per_conn", "S3 CPU ms/conn"),
                "H1_cpu": ("H1", "cpu_us_per_request", "H1 CPU us/req")}
H1_CONNECTIONS = 50       # wrk's keep-alive connections in H1

# worker_connections is above the descriptor limit on purpose: once fewer
# than 1/16 of its connection slots are free, nginx closes connections that
# are still reading their request ("worker_connections are not enough,
# reusing connections"), which reset ~4% of S5's clients with slots = fds.
NGINX_CONF = """\
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connections}; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog={backlog}{ssl};{certificate}
        location / {{
            proxy_pass http://127.0.0.1:{backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""

# H1's nginx: plain HTTP through an upstream with `keepalive 32`, as nginx's
# docs recommend for a reverse proxy (proxy_http_version 1.1 and an empty
# Connection header, or nginx closes each upstream connection after one
# request).
NGINX_H1_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
worker_rlimit_nofile {nofile};
events {{ worker_connections {connections}; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} backlog={backlog};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn {maxconn}
defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend ws
    bind 127.0.0.1:{port} backlog {backlog}{ssl}
    default_backend echo
backend echo
    server echo 127.0.0.1:{backend}
"""


class BenchError(Exception):
    """A target or scenario failed; the run records it and goes on."""


class Processes:
    """Starts children in their own process groups and stops every one of them.

    Own groups keep a terminal's Ctrl-C away from the children, so that they
    are stopped here, in order, and a SIGKILL of the group also takes any
    worker processes a target forked.
    """

    def __init__(self):
        self._running = []

    def start(self, argv, **kwargs):
        proc = subprocess.Popen([str(a) for a in argv], start_new_session=True, **kwargs)
        self._running.append(proc)
        return proc

    def stop(self, proc, grace=0.0):
        """Give `proc` `grace` seconds to exit by itself, then SIGTERM, then SIGKILL."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdin:
            proc.stdin.close()
        self._running.remove(proc)

    def kill(self, proc):
        """SIGKILL `proc`'s group at once: a crash, as S5's backend restart."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self._running.remove(proc)

    def stop_all(self):
        for proc in reversed(self._running[:]):
            self.stop(proc)


class HeldBackend:
    """S5's echo backend: a node `ws` server on a listening socket that run.py
    holds, so that `restart` can kill it and start a new one on the same port
    with no window of refused connects (as a restart under systemd socket
    activation). Every proxy then sees the same thing: all its backend
    connections die at once, and new ones wait in the socket's backlog until
    the new process accepts them. No proxy needs its health check to notice.
    """

    def __init__(self, procs):
        self._procs = procs
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(LISTEN_BACKLOG)
        self.port = self._sock.getsockname()[1]
        self.proc = None
        self._start()

    def _start(self):
        fd = self._sock.fileno()
        self.proc = self._procs.start(["node", ECHO_SERVER, "--fd", fd], pass_fds=[fd],
                                      stdout=subprocess.PIPE, text=True)
        line = Lines(self.proc.stdout).next(time.monotonic() + READY_TIMEOUT)
        if not line.startswith("listening"):
            raise BenchError(f"the echo backend did not start: {line!r}")

    def restart(self):
        self._procs.kill(self.proc)
        self._start()

    def stop(self):
        if self.proc is not None:
            self._procs.stop(self.proc)
        self._sock.close()


class Lines:
    """Reads a child's stdout on a thread so that every wait has a deadline."""

    def __init__(self, stream):
        self._queue = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream):
        with stream:
            for line in stream:
                self._queue.put(line)
        self._queue.put(None)

    def next(self, deadline):
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise BenchError("timed out waiting for output") from None
        if line is None:
            raise BenchError("exited without the expected output")
        return line

    def available(self):
        """The lines read so far and not taken yet, without waiting."""
        lines = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return lines
            if line is None:
                self._queue.put(None)
                return lines
            lines.append(line)

    def event(self, name, deadline):
        """The next loadgen event called `name`; a loadgen error is raised."""
        while True:
            message = json.loads(self.next(deadline))
            if message["event"] == "error":
                raise BenchError(message["message"])
            if message["event"] == name:
                return message


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_tree(proc):
    try:
        root = psutil.Process(proc.pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def tree_sum(proc, measure):
    """Sum `measure` over a process and its children (nginx's worker, lbws's workers)."""
    total = 0.0
    for member in process_tree(proc):
        try:
            total += measure(member)
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_seconds(proc):
    return tree_sum(proc, lambda p: sum(p.cpu_times()[:2]))


def machine_busy():
    """CPU seconds the whole machine has used: whether something besides the
    benchmark took CPU during a scenario (another job on a shared box) skews
    it. Interrupt time is left out: it is the kernel's work for our own sockets.
    """
    machine = psutil.cpu_times()
    return machine.user + machine.nice + machine.system


def cpu_snapshot(measured, backend):
    """Wall clock, and CPU seconds used so far by the target, the backend and the machine."""
    return time.monotonic(), cpu_seconds(measured), cpu_seconds(backend), machine_busy()


def rss_bytes(proc):
    return tree_sum(proc, lambda p: p.memory_info().rss)


class PeakRss:
    """Reads a process tree's RSS every RSS_POLL seconds on a thread, keeps the peak."""

    def __init__(self, proc):
        self.peak = rss_bytes(proc)
        self._proc = proc
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._done.wait(RSS_POLL):
            self.peak = max(self.peak, rss_bytes(self._proc))

    def stop(self):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self._proc))
        return self.peak


class CpuPeaks:
    """Reads the CPU seconds of process trees every CPU_POLL seconds on a
    thread; `stop` gives, for each, its CPU seconds over the whole time and
    the largest share of one core it used in any CPU_WINDOW."""

    def __init__(self, procs):
        self._procs = procs
        self._samples = [self._sample()]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _sample(self):
        return time.monotonic(), {name: cpu_seconds(p) for name, p in self._procs.items()}

    def _poll(self):
        while not self._done.wait(CPU_POLL):
            self._samples.append(self._sample())

    def stop(self):
        self._done.set()
        self._thread.join()
        self._samples.append(self._sample())
        samples = self._samples
        peaks = {}
        for name in self._procs:
            peak, first = 0.0, 0
            for t, cpu in samples:
                while first + 1 < len(samples) and t - samples[first + 1][0] >= CPU_WINDOW:
                    first += 1
                t0, cpu0 = samples[first]
                if t - t0 >= CPU_WINDOW:
                    peak = max(peak, (cpu[name] - cpu0[name]) / (t - t0))
            if not peak:  # all of it shorter than one window
                (t0, cpu0), (t, cpu) = samples[0], samples[-1]
                peak = (cpu[name] - cpu0[name]) / max(t - t0, CPU_POLL)
            peaks[name] = {"cpu_seconds": samples[-1][1][name] - samples[0][1][name],
                           "peak_cpu_share": peak}
        return peaks


def log_tail(path, lines=15):
    try:
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
    except FileNotFoundError:
        return ""


def route_sections(count):
    """`count` [route:NAME] sections for the lbws targets (`--lbws-routes`):
    count - 1 that the load never matches (hosts, wildcards, paths,
    subprotocols), then a catch-all to the echo backend, so that every
    handshake goes through the whole table."""
    lines = []
    for i in range(count - 1):
        lines += ["", f"[route:r{i}]", "backends = echo"]
        lines += [[f"host = app{i}.example.com", f"host = *.t{i}.example.com",
                   f"path = /service{i}", f"path = /v{i}\nsubprotocol = p{i}"][i % 4]]
    if count:
        lines += ["", "[route:all]", "backends = echo"]
    return lines


def target_command(name, workdir, port, backend_port, args, http=False):
    """Write the target's config under `workdir`; return the argv that runs
    it, under `taskset -c CPUS` when `--pin-proxy` pins this target (its
    forked workers inherit the affinity). `http`: for H1 (nginx's upstream
    keeps idle connections)."""
    argv = target_argv(name, workdir, port, backend_port, args, http)
    cpus = pinning(args, name)
    return argv if cpus is None else ["taskset", "-c", cpus] + argv


def pinning(args, name):
    """The CPU list `--pin-proxy` gives target `name`, or None."""
    return args.pin_proxy.get(name, args.pin_proxy.get("*"))


def target_argv(name, workdir, port, backend_port, args, http=False):
    """Each proxy may hold args.max_clients clients (two descriptors each)
    and queues LISTEN_BACKLOG connects, so S5's storm meets the same limits
    everywhere."""
    if name == "nginx" and http:
        conf = workdir / "nginx-h1.conf"
        conf.write_text(NGINX_H1_CONF.format(
            dir=workdir, port=port, backend=backend_port, nofile=args.nofile,
            connections=args.nofile * 5 // 4, backlog=args.listen_backlog))
        return ["nginx", "-p", workdir, "-e", workdir / "nginx-error.log", "-c", conf,
                "-g", "daemon off;"]
    if name in ("nginx", "nginx-w2"):
        conf = workdir / f"{name}.conf"
        tls = args.tls and workdir / "tls"
        conf.write_text(NGINX_CONF.format(
            dir=workdir, port=port, backend=backend_port,
            workers=2 if name == "nginx-w2" else 1,
            nofile=args.nofile, connections=args.nofile * 5 // 4, backlog=args.listen_backlog,
            ssl=" ssl" if tls else "",
            certificate=(f"\n        ssl_certificate {tls}/cert.pem;"
                         f"\n        ssl_certificate_key {tls}/key.pem;") if tls else ""))
        return ["nginx", "-p", workdir, "-e", workdir / "nginx-error.log", "-c", conf,
                "-g", "daemon off;"]
    if name == "haproxy":
        conf = workdir / "haproxy.cfg"
        tls = args.tls and workdir / "tls"
        conf.write_text(HAPROXY_CONF.format(port=port, backend=backend_port,
                                            maxconn=args.max_clients,
                                            backlog=args.listen_backlog,
                                            ssl=f" ssl crt {tls}/both.pem alpn http/1.1"
                                            if tls else ""))
        return ["haproxy", "-db", "-f", conf]
    return lbws_argv(name, workdir, port, backend_port, args,
                     {"workers": "2"} if name == "lbws-w2" else {})


def target_env(name, args):
    """The environment of target `name`: `lbws-base` runs the lbws package
    of `--lbws-baseline DIR` (a checkout of another commit), for a before
    and after in one run."""
    if name != "lbws-base":
        return None
    if args.lbws_baseline is None:
        raise BenchError("lbws-base needs --lbws-baseline DIR")
    return dict(os.environ, PYTHONPATH=str(args.lbws_baseline))


def lbws_argv(name, workdir, port, backend_port, args, settings):
    """Write `workdir/NAME.ini` for an lbws in front of the echo backend,
    with `settings` ([lbws] keys) over the run's own; return its argv."""
    if not TWISTD.exists():
        raise BenchError(f"`twistd lbws` is unavailable: no {TWISTD}")
    check = subprocess.run([TWISTD, "lbws", "--help"], capture_output=True, text=True,
                           timeout=60, cwd=REPO)
    if check.returncode != 0:
        why = (check.stderr.strip() or check.stdout.strip() or "no output").splitlines()[-1]
        raise BenchError(f"`twistd lbws` is unavailable: {why}")
    settings = {"max_connections": str(args.max_clients), **dict(args.lbws_config_extra),
                **settings}
    ini = workdir / f"{name}.ini"
    tls = args.tls and workdir / "tls"
    listen = (f"ssl:{port}:interface=127.0.0.1:backlog={args.listen_backlog}"
              f":privateKey={tls}/key.pem:certKey={tls}/cert.pem" if tls else
              f"tcp:{port}:interface=127.0.0.1:backlog={args.listen_backlog}")
    ini.write_text("\n".join([
        "[lbws]", f"listen = {listen}",
        "dashboard =", *(f"{key} = {value}" for key, value in settings.items()),
        "", "[health]", "probe = tcp",
        "", "[backend:echo]", f"url = ws://127.0.0.1:{backend_port}",
        *route_sections(args.lbws_routes), ""]))
    return [TWISTD, "-n", "--pidfile=", "lbws", "--config", ini]


def loadgen_argv(port, scenario, tls):
    """The load generator's command line for `scenario` against `port`."""
    return ["node", LOADGEN, "--port", str(port), "--scenario", scenario] + ["--tls"] * tls


def wait_ready(proc, port, log, probe="probe", tls=False):
    """Wait until `port` accepts TCP, then until a WebSocket echo goes through it.

    A proxy may accept before it can reach the backend (lbws waits for its
    health check), so the echo is what says the target is ready.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    problem = "no TCP connect"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_tail(log)
            last = (tail.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"exited with status {proc.returncode}: {last}\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.1)
            continue
        done = subprocess.run(loadgen_argv(port, probe, tls),
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return
        problem = done.stdout.strip() or done.stderr.strip()
        time.sleep(0.5)
    raise BenchError(f"not ready within {READY_TIMEOUT:.0f} s ({problem})\n{log_tail(log)}")


def wrk_result(text, seconds):
    """H1's numbers from wrk's report (`--latency`)."""
    def number(pattern, default=None):
        found = re.search(pattern, text, re.MULTILINE)
        if found is None:
            if default is None:
                raise BenchError(f"wrk's report has no {pattern!r}:\n{text[-2000:]}")
            return default
        return found.group(1)

    def millis(value):
        amount, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", value).groups()
        return float(amount) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    requests = int(number(r"^\s*(\d+) requests in "))
    errors = int(number(r"^\s*Non-2xx or 3xx responses: (\d+)", "0"))
    socket_errors = number(r"^\s*Socket errors: (.*)$", "")
    errors += sum(int(n) for n in re.findall(r"\d+", socket_errors))
    return {"requests": requests, "errors": errors,
            "requests_per_s": float(number(r"^Requests/sec:\s*([\d.]+)")),
            "p50_ms": millis(number(r"^\s*50%\s+(\S+)")),
            "p99_ms": millis(number(r"^\s*99%\s+(\S+)")),
            "seconds": seconds}


def run_wrk(procs, port, measured, backend, args):
    """H1: wrk with one thread and H1_CONNECTIONS keep-alive connections,
    each sending its next GET as soon as the last response ended. The
    window is wrk's run; wrk's own CPU comes from its rusage once it
    exited (the only child that ends meanwhile)."""
    argv = ["wrk", "-t1", f"-c{H1_CONNECTIONS}", f"-d{args.duration:g}s", "--latency",
            f"http://127.0.0.1:{port}/"]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        wrk = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except FileNotFoundError:
        raise BenchError("wrk is not installed (bash bench/setup.sh)") from None
    try:
        cpu_before = cpu_snapshot(measured, backend)
        try:
            out, _ = wrk.communicate(timeout=args.duration + SCENARIO_SLACK)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk did not end within {args.duration + SCENARIO_SLACK:g} s") from None
        cpu_after = cpu_snapshot(measured, backend)
    finally:
        procs.stop(wrk)
    if wrk.returncode != 0:
        raise BenchError(f"wrk exited with status {wrk.returncode}: {out.strip()[-500:]}")
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = wrk_result(out, cpu_after[0] - cpu_before[0])
    result["loadgen_cpu_seconds"] = ((used.ru_utime + used.ru_stime)
                                     - (children.ru_utime + children.ru_stime))
    result["loadgen_cpu_share"] = result["loadgen_cpu_seconds"] / result["seconds"]
    return result, cpu_before, cpu_after


def run_scenario(procs, scenario, port, measured, backend, args):
    """Run one loadgen scenario; add the CPU and memory seen by run.py."""
    if measured.poll() is not None:
        raise BenchError(f"target exited with status {measured.returncode}")
    if scenario == "H1":
        result, cpu_before, cpu_after = run_wrk(procs, port, measured, backend, args)
        return with_cpu(result, scenario, measured, backend, cpu_before, cpu_after)
    argv = loadgen_argv(port, scenario, args.tls) + ["--duration", args.duration]
    if scenario == "S4":
        argv += ["--connections", args.idle_connections]
    rss_before = rss_bytes(measured)
    loadgen = procs.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    grace = 0.0
    try:
        lines = Lines(loadgen.stdout)
        if scenario == "S4":
            deadline = time.monotonic() + S4_OPEN_TIMEOUT
            lines.event("start", deadline)
            cpu_before = cpu_snapshot(measured, backend)
            lines.event("open", deadline)
            cpu_after = cpu_snapshot(measured, backend)
            time.sleep(S4_SETTLE)
            rss_after = rss_bytes(measured)
            loadgen.stdin.close()
            result = lines.event("result", deadline + STOP_TIMEOUT)
            if result["connections"]:
                result["bytes_per_conn"] = (rss_after - rss_before) / result["connections"]
            result.update(rss_before=rss_before, rss_after=rss_after)
        else:
            deadline = time.monotonic() + args.duration + SCENARIO_SLACK
            lines.event("start", deadline)
            cpu_before = cpu_snapshot(measured, backend)
            lines.event("stop", deadline)
            cpu_after = cpu_snapshot(measured, backend)
            result = lines.event("result", deadline)
        del result["event"]
        grace = STOP_TIMEOUT  # let it close its connections cleanly
    finally:
        procs.stop(loadgen, grace)
    return with_cpu(result, scenario, measured, backend, cpu_before, cpu_after)


def with_cpu(result, scenario, measured, backend, cpu_before, cpu_after):
    """Add to `result` the CPU shares over the window, and the target's CPU
    per connection (S3) or per request (H1)."""
    seconds, target_cpu, backend_cpu, machine_cpu = (a - b for a, b in zip(cpu_after, cpu_before))
    ours = backend_cpu + result["loadgen_cpu_seconds"] + (target_cpu if measured is not backend else 0)
    result.update(target_cpu_seconds=target_cpu, target_cpu_share=target_cpu / seconds,
                  backend_cpu_seconds=backend_cpu, backend_cpu_share=backend_cpu / seconds,
                  other_cpu_share=max(0.0, machine_cpu - ours) / seconds)
    if scenario == "S1" and result["round_trips"]:
        result["cpu_us_per_round_trip"] = 1e6 * target_cpu / result["round_trips"]
    if scenario == "S3" and result["connections"]:
        # What one connection costs the target (for `direct`, the backend).
        result["cpu_ms_per_conn"] = 1000 * target_cpu / result["connections"]
    if scenario == "H1" and result["requests"]:
        # What one request costs the target (for `direct`, the backend).
        result["cpu_us_per_request"] = 1e6 * target_cpu / result["requests"]
    return result


def run_storm(procs, port, measured, backend, args):
    """S5: open args.storm_connections idle clients, kill and restart the
    backend, and time until every client is connected again.

    The window starts when the load generator has armed its reconnect
    logic (just before the kill) and ends when the last client is back; the
    target's CPU seconds and peak RSS are read over that window. `measured`
    is None for `direct` (the backend, restarted mid-window, is the target).
    """
    if measured is not None and measured.poll() is not None:
        raise BenchError(f"target exited with status {measured.returncode}")
    argv = loadgen_argv(port, "S5", args.tls) + [
        "--connections", args.storm_connections, "--storm-timeout", STORM_TIMEOUT]
    rss_start = rss_bytes(measured) if measured else None
    loadgen = procs.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    grace = 0.0
    try:
        lines = Lines(loadgen.stdout)
        deadline = time.monotonic() + S4_OPEN_TIMEOUT
        lines.event("start", deadline)
        opened = lines.event("open", deadline)
        time.sleep(S4_SETTLE)
        rss_idle = rss_bytes(measured) if measured else None
        loadgen.stdin.write("storm\n")
        loadgen.stdin.flush()
        lines.event("armed", time.monotonic() + READY_TIMEOUT)
        t0, target0, machine0 = time.monotonic(), measured and cpu_seconds(measured), machine_busy()
        peak = PeakRss(measured) if measured else None
        try:
            backend.restart()
            back = lines.event("reconnected", time.monotonic() + STORM_TIMEOUT + SCENARIO_SLACK)
        finally:
            peak_rss = peak.stop() if peak else None
        seconds = time.monotonic() - t0
        target_cpu = cpu_seconds(measured) - target0 if measured else None
        backend_cpu = cpu_seconds(backend.proc)  # the new process: all of it is in the window
        machine_cpu = machine_busy() - machine0
        loadgen.stdin.close()
        result = lines.event("result", time.monotonic() + STORM_TIMEOUT)
        del result["event"]
        grace = STOP_TIMEOUT
    finally:
        procs.stop(loadgen, grace)
    ours = backend_cpu + back["loadgen_cpu_seconds"] + (target_cpu or 0)
    result.update(open_seconds=opened["open_seconds"], rss_before=rss_start,
                  rss_idle=rss_idle, peak_rss=peak_rss,
                  target_cpu_seconds=target_cpu,
                  target_cpu_share=None if measured is None else target_cpu / seconds,
                  backend_cpu_seconds=backend_cpu, backend_cpu_share=backend_cpu / seconds,
                  other_cpu_share=max(0.0, machine_cpu - ours) / seconds)
    if measured is not None and result["connections"]:
        result["idle_bytes_per_conn"] = (rss_idle - rss_start) / result["connections"]
    return result


class CountingBackend:
    """S6's echo backend (bench/counting-backend.js), which says how many
    WebSockets it took in each 100 ms."""

    def __init__(self, procs):
        self._procs = procs
        self.proc = procs.start(["node", COUNTING_BACKEND, "--port", "0"],
                                stdout=subprocess.PIPE, text=True)
        self._lines = Lines(self.proc.stdout)
        line = self._lines.next(time.monotonic() + READY_TIMEOUT)
        if not line.startswith("listening"):
            raise BenchError(f"the counting backend did not start: {line!r}")
        self.port = int(line.split()[1])

    def arrivals(self):
        """`(unix time, WebSockets opened in the 100 ms before it)` since
        the last call."""
        return [(bucket["t"] / 1000, bucket["new"])
                for bucket in map(json.loads, self._lines.available())]

    def stop(self):
        self._procs.stop(self.proc)


def peak_rate(arrivals):
    """The most WebSockets opened in any RATE_WINDOW, per second."""
    peak, first = 0, 0
    for last, (t, _) in enumerate(arrivals):
        while arrivals[first][0] <= t - RATE_WINDOW:
            first += 1
        peak = max(peak, sum(n for _, n in arrivals[first:last + 1]))
    return peak / RATE_WINDOW


def by_second(arrivals, start):
    """The WebSockets opened in each second from `start` on."""
    counts = [0] * (int(arrivals[-1][0] - start) + 1 if arrivals else 0)
    for t, n in arrivals:
        counts[int(t - start)] += n
    return counts


def run_paced_stop(procs, workdir, args, spread):
    """S6: args.storm_connections idle clients through lbws A, in front of
    the counting backend next to lbws B; A is stopped (SIGTERM) with
    `close_spread = spread`, and its clients reconnect through B with
    S5's full-jitter backoff. What the backend sees: its peak rate of new
    WebSockets and its peak CPU (and B's), and the time until all clients
    are back."""
    backend = CountingBackend(procs)
    started = []
    drain = max(30.0, 2 * spread + 10)
    try:
        ports = {}
        for name, settings in (("lbws-b", {}),
                               ("lbws-a", {"close_spread": f"{spread:g}",
                                           "drain_timeout": f"{drain:g}"})):
            port = free_port()
            log = workdir / f"{name}.log"
            argv = lbws_argv(name, workdir, port, backend.port, args, settings)
            with log.open("w") as out:
                proc = procs.start(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
            started.append(proc)
            wait_ready(proc, port, log)
            ports[name] = (proc, port)
        (stopped, port_a), (taking, port_b) = ports["lbws-a"], ports["lbws-b"]
        argv = ["node", LOADGEN, "--port", port_a, "--reconnect-port", port_b,
                "--scenario", "S5", "--connections", args.storm_connections,
                "--storm-timeout", STORM_TIMEOUT + drain]
        loadgen = procs.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        grace = 0.0
        try:
            lines = Lines(loadgen.stdout)
            deadline = time.monotonic() + S4_OPEN_TIMEOUT
            lines.event("start", deadline)
            opened = lines.event("open", deadline)
            time.sleep(S4_SETTLE)
            backend.arrivals()  # the clients' first connections
            loadgen.stdin.write("storm\n")
            loadgen.stdin.flush()
            lines.event("armed", time.monotonic() + READY_TIMEOUT)
            cpu = CpuPeaks({"backend": backend.proc, "lbws_b": taking})
            exited = []
            threading.Thread(target=lambda: exited.append((stopped.wait(), time.monotonic())),
                             daemon=True).start()
            signalled, t0 = time.time(), time.monotonic()
            stopped.send_signal(signal.SIGTERM)
            try:
                back = lines.event("reconnected",
                                   time.monotonic() + STORM_TIMEOUT + drain + SCENARIO_SLACK)
            finally:
                peaks = cpu.stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                stopped.wait(drain + STOP_TIMEOUT)
            time.sleep(0.3)  # the backend's last 100 ms bucket
            arrivals = [(t, n) for t, n in backend.arrivals() if t >= signalled]
            loadgen.stdin.close()
            result = lines.event("result", time.monotonic() + STORM_TIMEOUT)
            del result["event"]
            grace = STOP_TIMEOUT
        finally:
            procs.stop(loadgen, grace)
    finally:
        for proc in reversed(started):
            procs.stop(proc)
        backend.stop()
    del back["event"]
    result.update(close_spread=spread, drain_timeout=drain, open_seconds=opened["open_seconds"],
                  backend_connections=sum(n for _, n in arrivals),
                  backend_peak_connections_per_s=peak_rate(arrivals),
                  backend_connections_by_second=by_second(arrivals, signalled),
                  backend_cpu_seconds=peaks["backend"]["cpu_seconds"],
                  backend_peak_cpu_share=peaks["backend"]["peak_cpu_share"],
                  lbws_b_cpu_seconds=peaks["lbws_b"]["cpu_seconds"],
                  lbws_b_peak_cpu_share=peaks["lbws_b"]["peak_cpu_share"],
                  stopped_exit=exited[0][0] if exited else None,
                  stopped_seconds=exited[0][1] - t0 if exited else None)
    return result


def bench_target(procs, name, workdir, backend, args, scenarios):
    """Start `name` fresh in front of `backend`, run `scenarios` against it, stop it."""
    outcome = {"scenarios": {}}
    proc = None
    try:
        if name == "direct":
            port = backend.port
        else:
            port = free_port()
            log = workdir / f"{name}.log"
            argv = target_command(name, workdir, port, backend.port, args,
                                  http=scenarios == ["H1"])
            with log.open("w") as out:
                proc = procs.start(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                   env=target_env(name, args))
        wait_ready(proc, port, workdir / f"{name}.log",
                   "hprobe" if scenarios == ["H1"] else "probe", args.tls)
        if proc is not None and pinning(args, name) is not None:
            outcome["cpu_affinity"] = sorted({tuple(sorted(p.cpu_affinity()))
                                              for p in process_tree(proc)})
        for scenario in scenarios:
            try:
                if scenario == "S5":
                    result = run_storm(procs, port, proc, backend, args)
                else:
                    result = run_scenario(procs, scenario, port, proc or backend.proc,
                                          backend.proc, args)
            except BenchError as error:
                result = {"error": str(error)}
            outcome["scenarios"][scenario] = result
            print(f"  {name} {scenario}: {headline_text(scenario, result)}", file=sys.stderr)
    except BenchError as error:
        outcome["error"] = str(error)
        print(f"  {name}: FAILED: {error}", file=sys.stderr)
    finally:
        if proc is not None:
            procs.stop(proc)
    return outcome


def failures(result):
    """Errors and connections lost during a scenario: a proxy must have none.

    In S5 a failed reconnect attempt (a 502, a timeout) is part of what is
    measured, not a failure; a client that is not back by the end, or that
    lost its connection before the storm or again after reconnecting, is.
    """
    lost = result["connections"] - result["still_open"] if "still_open" in result else 0
    if "lost" in result:  # S5
        lost = (result["connections"] - result["reconnected"] + result["closed_before_storm"]
                + result["dropped_after_reconnect"])
    return result.get("errors", 0) + result.get("connections_lost", 0) + lost


def headline_text(scenario, result):
    if "error" in result:
        return "error: " + result["error"].splitlines()[0]
    value = result.get(HEADLINE[scenario])
    places = {"S2": 1, "S5": 2}.get(scenario, 0)
    return "n/a" if value is None else f"{value:,.{places}f} {UNIT[scenario]}"


def ratios_to_nginx(targets):
    """Each target's headline number divided by nginx's, per scenario, and
    the EXTRA_RATIOS numbers (S1's CPU per round trip, S3's per connection)
    under their keys;
    `direct` has no proxy whose CPU could be compared."""
    base = targets.get("nginx", {}).get("scenarios", {})
    headlines = {s: (s, key) for s, key in HEADLINE.items()}
    extras = {key: (s, field) for key, (s, field, _) in EXTRA_RATIOS.items()}
    ratios = {}
    for name, outcome in targets.items():
        ratios[name] = {}
        compared = headlines if name == "direct" else {**headlines, **extras}
        for key, (scenario, field) in compared.items():
            result = outcome.get("scenarios", {}).get(scenario, {})
            ref = base.get(scenario, {}).get(field)
            if ref and result.get(field) is not None:
                ratios[name][key] = result[field] / ref
    return ratios


def format_table(report):
    """The headline numbers with ratios to nginx, S5's details, then where the CPU went."""
    targets, ratios, scenarios = report["targets"], report["ratios_to_nginx"], report["scenarios"]
    header = ["target"] + [f"{s} {UNIT[s]}" for s in scenarios]
    extras = [key for key, (s, _, _) in EXTRA_RATIOS.items() if s in scenarios]
    header += [EXTRA_RATIOS[key][2] for key in extras]
    if "S1" in scenarios:
        header.append("S1 p50/p99 ms")
    rows, cpu_rows, storm_rows, others = [], [], [], []
    for name, outcome in targets.items():
        label = name
        if "cpu_affinity" in outcome:  # --pin-proxy: "lbws-w2 @0,1"
            label += " @" + "+".join(",".join(map(str, cpus)) for cpus in outcome["cpu_affinity"])
        if "error" in outcome:
            rows.append([label, "FAILED: " + outcome["error"].splitlines()[0]])
            continue
        row, cpu_row = [label], [label]
        for scenario in scenarios:
            result = outcome["scenarios"][scenario]
            cell = headline_text(scenario, result).replace(" " + UNIT[scenario], "")
            if scenario in ratios[name]:
                cell += f" ({ratios[name][scenario]:.2f}x)"
            if scenario != "S4" and result.get("loadgen_cpu_share", 0) >= SATURATED:
                cell += " *"
            if failures(result):
                cell += f" !{failures(result)}"
            row.append(cell)
            if "error" in result:
                cpu_row.append("-")
                continue
            shares = [result[k] for k in ("target_cpu_share", "loadgen_cpu_share",
                                          "backend_cpu_share", "other_cpu_share")]
            cpu_row.append("/".join(["-" if name == "direct" else f"{shares[0]:.0%}"]
                                    + [f"{v:.0%}" for v in shares[1:]]))
            if scenario != "S4":  # S4's window is too short for a fair reading
                others.append((result["other_cpu_share"], name, scenario))
            if scenario == "S5":
                storm_rows.append(storm_row(label, result))
        for key in extras:
            scenario, field, _ = EXTRA_RATIOS[key]
            value = outcome["scenarios"][scenario].get(field)
            row.append("-" if value is None or name == "direct" else
                       f"{value:.2f}" + (f" ({ratios[name][key]:.2f}x)" if key in ratios[name] else ""))
        if "S1" in scenarios:
            s1 = outcome["scenarios"]["S1"]
            row.append("-" if s1.get("p50_ms") is None else f"{s1['p50_ms']:.2f}/{s1['p99_ms']:.2f}")
        rows.append(row)
        cpu_rows.append(cpu_row)
    lower = [s for s in scenarios if s in LOWER_IS_BETTER] + ["CPU per connection or request"] * bool(extras)
    lines = ["wss: every target terminates TLS, each connection a full handshake"]
    lines = lines if report.get("tls") else []
    if scenarios:
        lines += [render(header, rows),
                  "(x) = ratio to nginx" + (f"; for {' and '.join(lower)} lower is better"
                                            if lower else "") + ". "
                  f"* = load generator at >= {SATURATED:.0%} of a core: a lower bound. "
                  "!N = N failed connections or errors (see the JSON)."]
    if storm_rows:
        lines += ["", f"S5 reconnect storm, {report['storm_connections']:,} idle clients;"
                  " the backend is killed and restarted at 0 s",
                  render(["target", "all back s", "closes seen s", "reconnect p50/p99 ms",
                          "attempts/failed", "target CPU s", "RSS idle/peak MB",
                          "idle bytes/conn"], storm_rows)]
    if report.get("paced_stop"):
        lines += ["", f"S6 paced stop, {report['storm_connections']:,} idle clients through lbws A"
                  " (SIGTERM at 0 s), back through lbws B with full-jitter backoff",
                  render(["close_spread s", "all back s", "closes seen s",
                          "backend peak conn/s", "backend peak CPU", "lbws B peak CPU",
                          "attempts/failed", "A exited s"],
                         [paced_row(r) for r in report["paced_stop"]])]
    if not scenarios:
        return "\n".join(lines[1:])
    lines += ["",
              "CPU, % of one core: target / load generator / backend / other processes",
              "(S1-S3 and H1 over the measured window; S4 while the idle connections open;"
              " S5 from the backend's restart until all clients are back)",
              render(["target"] + list(scenarios), cpu_rows)]
    if others and max(others)[0] >= OTHER_LOAD:
        share, name, scenario = max(others)
        lines.append(f"WARNING: other processes took up to {share:.0%} of a core "
                     f"({name} {scenario}): the machine was not quiet, numbers are skewed.")
    return "\n".join(lines)


def paced_row(result):
    """One line of S6: one close_spread."""
    spread = f"{result['close_spread']:g}"
    if "error" in result:
        return [spread, "error: " + result["error"].splitlines()[0]]

    def number(value, text):
        return "-" if value is None else text(value)

    failed = paced_failures(result)
    return [spread,
            number(result.get("reconnect_seconds"), lambda v: f"{v:.2f}")
            + (f" !{failed}" if failed else ""),
            number(result.get("close_spread_seconds"),
                   lambda v: f"{result['first_close_seconds']:.2f}-"
                   f"{result['first_close_seconds'] + v:.2f}"),
            f"{result['backend_peak_connections_per_s']:,.0f}",
            f"{result['backend_peak_cpu_share']:.0%}",
            f"{result['lbws_b_peak_cpu_share']:.0%}",
            f"{result['attempts']:,}/{result['failed_attempts']:,}",
            number(result.get("stopped_seconds"), lambda v: f"{v:.1f}")]


def storm_row(name, result):
    """One line of S5's details: what the headline time is made of."""
    if "error" in result:
        return [name, "error: " + result["error"].splitlines()[0]]

    def number(key, text):
        return "-" if result.get(key) is None else text(result[key])

    mb = 1024 * 1024
    return [name, headline_text("S5", result).replace(" " + UNIT["S5"], ""),
            number("close_spread_seconds", lambda v: f"{result['first_close_seconds']:.2f}-"
                   f"{result['first_close_seconds'] + v:.2f}"),
            number("p50_ms", lambda v: f"{v:,.0f}/{result['p99_ms']:,.0f}"),
            f"{result['attempts']:,}/{result['failed_attempts']:,}",
            number("target_cpu_seconds", lambda v: f"{v:.2f}"),
            number("rss_idle", lambda v: f"{v / mb:,.0f}/{result['peak_rss'] / mb:,.0f}"),
            number("idle_bytes_per_conn", lambda v: f"{v:,.0f}")]


def render(header, rows):
    """Left-aligned columns; a short row (a failed target) does not set widths."""
    full = [header] + [r for r in rows if len(r) == len(header)]
    widths = [max(len(r[i]) for r in full) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [header] + rows)


def draw_chart(report, path):
    """Grouped bars: one group per target, one bar per scenario (and S3's
    CPU per connection), nginx = 1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = report["ratios_to_nginx"]
    names = [n for n in report["targets"] if ratios.get(n)]
    series = [(s, f"{s} {UNIT[s]}") for s in report["scenarios"]]
    series += [(key, label) for key, (s, _, label) in EXTRA_RATIOS.items()
               if s in report["scenarios"]]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(names), 4.5))
    for i, (key, label) in enumerate(series):
        label += " (lower is better)" if key in LOWER_IS_BETTER else ""
        xs = [t + (i - (len(series) - 1) / 2) * width for t in range(len(names))]
        ax.bar(xs, [ratios[n].get(key, 0) for n in names], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ratio to nginx")
    ax.set_title(f"WebSocket proxies vs nginx ({report['duration']:g} s per scenario)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report, path):
    """Write through a .tmp file so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


def tool_versions():
    def first_line(argv):
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return (done.stdout or done.stderr).strip().splitlines()[0]
    return {"node": first_line(["node", "--version"]), "nginx": first_line(["nginx", "-v"]),
            "haproxy": first_line(["haproxy", "-v"]), "python": sys.version.split()[0],
            "cpus": os.cpu_count()}


def raise_fd_limit():
    """A proxied client takes two descriptors in a proxy (S5 holds 10,000
    clients); children inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def parse_args():
    def names(allowed):
        def parse(text):
            items = [item.strip() for item in text.split(",") if item.strip()]
            unknown = set(items) - set(allowed)
            if unknown or not items:
                raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}")
            return items
        return parse

    def pin(text):
        target, _, cpus = text.rpartition("=")
        if target and target not in TARGETS:
            raise argparse.ArgumentTypeError(f"unknown target {target!r}")
        if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cpus) or max(
                int(n) for n in re.findall(r"\d+", cpus)) >= os.cpu_count():
            raise argparse.ArgumentTypeError(f"expected CPUS like 0 or 0,1 (this machine has"
                                             f" {os.cpu_count()}), got {cpus!r}")
        return target or "*", cpus

    def spreads(text):
        try:
            values = [float(item) for item in text.split(",") if item.strip()]
        except ValueError:
            values = []
        if not values or any(v < 0 for v in values):
            raise argparse.ArgumentTypeError("expected seconds like 0,10")
        return values

    def key_value(text):
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError("expected KEY=VALUE")
        return key.strip(), value.strip()

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per scenario (default 10)")
    parser.add_argument("--smoke", action="store_true",
                        help="2 s per scenario, S4 with 200 connections, writes results/smoke.json only")
    parser.add_argument("--targets", type=names(TARGETS), default="direct,nginx,haproxy,lbws",
                        help=f"comma-separated, from {','.join(TARGETS)}")
    parser.add_argument("--scenarios", type=names(SCENARIOS), default="S1,S2,S3,S4,S5,H1,S6",
                        help="comma-separated, from S1,S2,S3,S4,S5,H1,S6 (S5: reconnect storm,"
                        " H1: plain HTTP GETs, S6: an lbws stopped with close_spread)")
    parser.add_argument("--storm-connections", type=int, default=10000, metavar="N",
                        help="S5's and S6's idle clients (default 10000; 300 with --smoke;"
                        " lowered to what the descriptor limit lets a proxy hold)")
    parser.add_argument("--close-spreads", type=spreads, default=None, metavar="S,S",
                        help="S6: the close_spread values to compare, in seconds"
                        " (default 0,10; 0,2 with --smoke)")
    parser.add_argument("--listen-backlog", type=int, default=LISTEN_BACKLOG, metavar="N",
                        help=f"every proxy's listen backlog (default {LISTEN_BACKLOG})")
    parser.add_argument("--pin-proxy", type=pin, action="append", default=[],
                        metavar="[TARGET=]CPUS",
                        help="run the targets (TARGET= only that one; repeatable, the"
                        " per-target one wins) under `taskset -c CPUS`, e.g. 0 or 0,1")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="write the targets' generated configs and logs to DIR and keep"
                        " them (default: a temporary directory, removed afterwards)")
    parser.add_argument("--lbws-config-extra", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="extra [lbws] key for the lbws targets (repeatable)")
    parser.add_argument("--tls", action="store_true",
                        help="wss://: every target but direct terminates TLS (TLS 1.2+, an ECDSA"
                        " P-256 certificate made for the run) and every connection makes a full"
                        " handshake; WebSocket scenarios only (not H1)")
    parser.add_argument("--lbws-baseline", type=Path, metavar="DIR",
                        help="for the lbws-base target: a directory holding the lbws package"
                        " to compare with (e.g. `git archive BASE lbws | tar -x -C DIR`)")
    parser.add_argument("--lbws-routes", type=int, default=0, metavar="N",
                        help="give the lbws targets N [route:NAME] sections, the last the"
                        " one every client matches (0: none, the default)")
    args = parser.parse_args()
    if args.tls and ("direct" in args.targets or "H1" in args.scenarios):
        parser.error("--tls measures proxies terminating wss: leave out the direct target"
                     " and H1 (e.g. --targets nginx,lbws --scenarios S3)")
    args.pin_proxy = dict(args.pin_proxy)
    args.idle_connections = 2000
    if args.smoke:
        args.duration, args.idle_connections, args.storm_connections = 2.0, 200, 300
    if args.close_spreads is None:
        args.close_spreads = [0.0, 2.0] if args.smoke else list(PACED_SPREADS)
    return args


def size_for_fd_limit(args):
    """Fit the proxies' connection limits, and S5, to the descriptor limit.

    A proxied client takes two descriptors in the proxy (its socket and the
    backend's). Where the hard limit is too low for S5's clients (20,000 in
    the development container, which cannot raise it), S5 runs with fewer
    and the report says so.
    """
    args.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    args.max_clients = (args.nofile - FD_MARGIN) // 2
    args.storm_requested = args.storm_connections
    fits = (args.max_clients - 64) // 100 * 100
    if args.storm_connections > fits and {"S5", "S6"} & set(args.scenarios):
        print(f"WARNING: S5 and S6 run with {fits} clients, not {args.storm_connections}: the"
              f" descriptor limit {args.nofile} lets a proxy hold {args.max_clients}"
              " (raise `ulimit -Hn` for more)", file=sys.stderr)
        args.storm_connections = fits


class Backend:
    """A node backend on a port the OS chose; one serves every target of a pass."""

    def __init__(self, procs, script):
        self._procs = procs
        self.proc = procs.start(["node", script, "--port", "0"], stdout=subprocess.PIPE, text=True)
        self.port = int(Lines(self.proc.stdout).next(time.monotonic() + READY_TIMEOUT).split()[1])

    def stop(self):
        self._procs.stop(self.proc)


def start_backend(start, what):
    try:
        return start()
    except BenchError as error:
        raise SystemExit(f"{what} did not start: {error} (did bench/setup.sh run?)") from None


def make_certificate(workdir):
    """A certificate for 127.0.0.1 from a CA made for the run (trustme, of
    the test dependencies), for `--tls`: key, certificate and both in one
    file (HAProxy's), under workdir/tls."""
    import trustme

    where = workdir / "tls"
    where.mkdir(exist_ok=True)
    cert = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(where / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(where / "cert.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(where / "both.pem"))


def run(args, procs, workdir):
    """WebSocket scenarios S1-S4 against the echo backend, H1 against the
    plain HTTP one, then S5 against an echo backend of its own for each
    target (S5 kills it); each target is started fresh for each pass."""
    report = {"started": datetime.now().astimezone().isoformat(timespec="seconds"),
              "duration": args.duration, "smoke": args.smoke,
              "idle_connections": args.idle_connections, "scenarios": args.scenarios,
              "storm_connections": args.storm_connections,
              "storm_connections_requested": args.storm_requested,
              "max_clients": args.max_clients, "fd_limit": args.nofile,
              "listen_backlog": args.listen_backlog,
              "pin_proxy": args.pin_proxy,
              "lbws_config_extra": dict(args.lbws_config_extra),
              "lbws_routes": args.lbws_routes, "tls": args.tls, "versions": tool_versions(),
              "targets": {}}
    # S6 is lbws against itself, not a target against the others.
    report["scenarios"] = [s for s in args.scenarios if s != "S6"]
    passes = [(lambda: Backend(procs, ECHO_SERVER), "echo-server.js", False,
               [s for s in args.scenarios if s not in ("H1", "S5", "S6")]),
              (lambda: Backend(procs, HTTP_BACKEND), "http-backend.js", False,
               [s for s in args.scenarios if s == "H1"]),
              (lambda: HeldBackend(procs), "echo-server.js", True,
               [s for s in args.scenarios if s == "S5"])]
    if args.tls:
        make_certificate(workdir)
    for start, what, per_target, scenarios in passes:
        if not scenarios:
            continue
        shared = None if per_target else start_backend(start, what)
        for name in args.targets:
            print(f"{name} {','.join(scenarios)} ...", file=sys.stderr)
            backend = shared or start_backend(start, what)
            try:
                outcome = bench_target(procs, name, workdir, backend, args, scenarios)
            finally:
                if per_target:
                    backend.stop()
            merged = report["targets"].setdefault(name, {"scenarios": {}})
            merged["scenarios"].update(outcome.pop("scenarios"))
            merged.update(outcome)
        if shared:
            shared.stop()
    if "S6" in args.scenarios:
        report["close_spreads"] = args.close_spreads
        report["paced_stop"] = []
        for spread in args.close_spreads:
            print(f"S6 close_spread {spread:g} ...", file=sys.stderr)
            try:
                result = run_paced_stop(procs, workdir, args, spread)
            except BenchError as error:
                result = {"close_spread": spread, "error": str(error)}
            report["paced_stop"].append(result)
            print(f"  S6 close_spread {spread:g}: {paced_text(result)}", file=sys.stderr)
    report["ratios_to_nginx"] = ratios_to_nginx(report["targets"])
    return report


def paced_text(result):
    if "error" in result:
        return "error: " + result["error"].splitlines()[0]
    back = result.get("reconnect_seconds")
    return (("not all back" if back is None else f"all back in {back:.2f} s") +
            f", backend peak {result['backend_peak_connections_per_s']:,.0f} conn/s")


def paced_failures(result):
    """S6's clients not back, lost again, or an lbws that did not exit 0."""
    if "error" in result:
        return 1
    return (result["connections"] - result["reconnected"] + result["closed_before_storm"]
            + result["dropped_after_reconnect"] + (result["stopped_exit"] != 0))


def main():
    args = parse_args()
    raise_fd_limit()
    size_for_fd_limit(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Processes()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lbws-bench-")))
        else:
            workdir = args.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        try:
            report = run(args, procs, workdir)
        finally:
            procs.stop_all()
    RESULTS.mkdir(exist_ok=True)
    if args.smoke:
        write_json(report, RESULTS / "smoke.json")
    elif args.tls:
        # A comparison of its own: the plain run's latest.json stays.
        write_json(report, RESULTS / "tls.json")
    elif not report["scenarios"]:
        # S6 alone: its own file, so that the full run's stays.
        write_json(report, RESULTS / "paced-stop.json")
    else:
        write_json(report, RESULTS / "latest.json")
        shutil.copyfile(RESULTS / "latest.json",
                        RESULTS / f"{datetime.now():%Y%m%d-%H%M%S}.json")
        draw_chart(report, RESULTS / "chart.png")
    print(format_table(report))
    failed = any("error" in outcome or any("error" in r or failures(r)
                                           for r in outcome["scenarios"].values())
                 for outcome in report["targets"].values())
    failed = failed or any(paced_failures(r) for r in report.get("paced_stop", ()))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
