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
TWISTD = REPO / ".venv" / "bin" / "twistd"

SCENARIOS = ("S1", "S2", "S3", "S4", "H1")
TARGETS = ("direct", "nginx", "haproxy", "lbws", "lbws-w2")
READY_TIMEOUT = 30.0      # seconds for a target to accept and echo
STOP_TIMEOUT = 5.0        # seconds for a process to exit on SIGTERM before SIGKILL
SCENARIO_SLACK = 60.0     # seconds allowed beyond a scenario's duration
S4_OPEN_TIMEOUT = 150.0   # loadgen gives up opening after 120 s
S4_SETTLE = 0.5           # seconds between "all open" and reading the RSS
SATURATED = 0.9           # loadgen CPU share above which a number is a lower bound
OTHER_LOAD = 0.15         # CPU share of unrelated processes worth a warning

# What each scenario is judged by; for S4 lower is better.
HEADLINE = {"S1": "round_trips_per_s", "S2": "mb_per_s", "S3": "connections_per_s",
            "S4": "bytes_per_conn", "H1": "requests_per_s"}
UNIT = {"S1": "round trips/s", "S2": "MB/s", "S3": "conn/s", "S4": "bytes/conn",
        "H1": "req/s"}

NGINX_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
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

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn 6000
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend ws
    bind 127.0.0.1:{port}
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

    def stop_all(self):
        for proc in reversed(self._running[:]):
            self.stop(proc)


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


def cpu_snapshot(measured, backend):
    """Wall clock, and CPU seconds used so far by the target, the backend and the machine.

    The machine's total shows whether something besides the benchmark took
    CPU during a scenario (another job on a shared box), which skews it.
    Interrupt time is left out: it is the kernel's work for our own sockets.
    """
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system
    return time.monotonic(), cpu_seconds(measured), cpu_seconds(backend), busy


def rss_bytes(proc):
    return tree_sum(proc, lambda p: p.memory_info().rss)


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


def target_command(name, workdir, port, backend_port, lbws_extra, routes=0):
    """Write the target's config under `workdir`; return the argv that runs it."""
    if name == "nginx":
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir, port=port, backend=backend_port))
        return ["nginx", "-p", workdir, "-e", workdir / "nginx-error.log", "-c", conf,
                "-g", "daemon off;"]
    if name == "haproxy":
        conf = workdir / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(port=port, backend=backend_port))
        return ["haproxy", "-db", "-f", conf]
    if not TWISTD.exists():
        raise BenchError(f"`twistd lbws` is unavailable: no {TWISTD}")
    check = subprocess.run([TWISTD, "lbws", "--help"], capture_output=True, text=True,
                           timeout=60, cwd=REPO)
    if check.returncode != 0:
        why = (check.stderr.strip() or check.stdout.strip() or "no output").splitlines()[-1]
        raise BenchError(f"`twistd lbws` is unavailable: {why}")
    settings = dict(lbws_extra)
    if name == "lbws-w2":
        settings["workers"] = "2"
    ini = workdir / f"{name}.ini"
    ini.write_text("\n".join([
        "[lbws]", f"listen = tcp:{port}:interface=127.0.0.1", "dashboard =",
        *(f"{key} = {value}" for key, value in settings.items()),
        "", "[health]", "probe = tcp",
        "", "[backend:echo]", f"url = ws://127.0.0.1:{backend_port}",
        *route_sections(routes), ""]))
    return [TWISTD, "-n", "--pidfile=", "lbws", "--config", ini]


def wait_ready(proc, port, log, probe="probe"):
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
        done = subprocess.run(["node", LOADGEN, "--port", str(port), "--scenario", probe],
                              capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return
        problem = done.stdout.strip() or done.stderr.strip()
        time.sleep(0.5)
    raise BenchError(f"not ready within {READY_TIMEOUT:.0f} s ({problem})\n{log_tail(log)}")


def run_scenario(procs, scenario, port, measured, backend, args):
    """Run one loadgen scenario; add the CPU and memory seen by run.py."""
    if measured.poll() is not None:
        raise BenchError(f"target exited with status {measured.returncode}")
    argv = ["node", LOADGEN, "--port", port, "--scenario", scenario,
            "--duration", args.duration]
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
    seconds, target_cpu, backend_cpu, machine_cpu = (a - b for a, b in zip(cpu_after, cpu_before))
    ours = backend_cpu + result["loadgen_cpu_seconds"] + (target_cpu if measured is not backend else 0)
    result.update(target_cpu_seconds=target_cpu, target_cpu_share=target_cpu / seconds,
                  backend_cpu_seconds=backend_cpu, backend_cpu_share=backend_cpu / seconds,
                  other_cpu_share=max(0.0, machine_cpu - ours) / seconds)
    return result


def bench_target(procs, name, workdir, backend, backend_port, args, scenarios):
    """Start `name` fresh, run `scenarios` against it, stop it."""
    outcome = {"scenarios": {}}
    proc = None
    try:
        if name == "direct":
            port = backend_port
        else:
            port = free_port()
            log = workdir / f"{name}.log"
            argv = target_command(name, workdir, port, backend_port, args.lbws_config_extra,
                                  args.lbws_routes)
            with log.open("w") as out:
                proc = procs.start(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        wait_ready(proc, port, workdir / f"{name}.log",
                   "hprobe" if scenarios == ["H1"] else "probe")
        for scenario in scenarios:
            try:
                result = run_scenario(procs, scenario, port, proc or backend, backend, args)
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
    """Errors and connections lost during a scenario: a proxy must have none."""
    lost = result["connections"] - result["still_open"] if "still_open" in result else 0
    return result.get("errors", 0) + result.get("connections_lost", 0) + lost


def headline_text(scenario, result):
    if "error" in result:
        return "error: " + result["error"].splitlines()[0]
    value = result.get(HEADLINE[scenario])
    return "n/a" if value is None else f"{value:,.{1 if scenario == 'S2' else 0}f} {UNIT[scenario]}"


def ratios_to_nginx(targets):
    """Each target's headline number divided by nginx's, per scenario."""
    base = targets.get("nginx", {}).get("scenarios", {})
    ratios = {}
    for name, outcome in targets.items():
        ratios[name] = {}
        for scenario, result in outcome.get("scenarios", {}).items():
            key = HEADLINE[scenario]
            ref = base.get(scenario, {}).get(key)
            if ref and result.get(key) is not None:
                ratios[name][scenario] = result[key] / ref
    return ratios


def format_table(report):
    """The headline numbers with ratios to nginx, then where the CPU went."""
    targets, ratios, scenarios = report["targets"], report["ratios_to_nginx"], report["scenarios"]
    header = ["target"] + [f"{s} {UNIT[s]}" for s in scenarios]
    if "S1" in scenarios:
        header.append("S1 p50/p99 ms")
    rows, cpu_rows, others = [], [], []
    for name, outcome in targets.items():
        if "error" in outcome:
            rows.append([name, "FAILED: " + outcome["error"].splitlines()[0]])
            continue
        row, cpu_row = [name], [name]
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
        if "S1" in scenarios:
            s1 = outcome["scenarios"]["S1"]
            row.append("-" if s1.get("p50_ms") is None else f"{s1['p50_ms']:.2f}/{s1['p99_ms']:.2f}")
        rows.append(row)
        cpu_rows.append(cpu_row)
    lines = [render(header, rows),
             "(x) = ratio to nginx; for S4 lower is better. "
             f"* = load generator at >= {SATURATED:.0%} of a core: a lower bound. "
             "!N = N failed connections or errors (see the JSON).",
             "",
             "CPU, % of one core: target / load generator / backend / other processes",
             "(S1-S3 over the measured window; S4 while the idle connections open)",
             render(["target"] + list(scenarios), cpu_rows)]
    if others and max(others)[0] >= OTHER_LOAD:
        share, name, scenario = max(others)
        lines.append(f"WARNING: other processes took up to {share:.0%} of a core "
                     f"({name} {scenario}): the machine was not quiet, numbers are skewed.")
    return "\n".join(lines)


def render(header, rows):
    """Left-aligned columns; a short row (a failed target) does not set widths."""
    full = [header] + [r for r in rows if len(r) == len(header)]
    widths = [max(len(r[i]) for r in full) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [header] + rows)


def draw_chart(report, path):
    """Grouped bars: one group per target, one bar per scenario, nginx = 1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = report["ratios_to_nginx"]
    names = [n for n in report["targets"] if ratios.get(n)]
    scenarios = report["scenarios"]
    width = 0.8 / len(scenarios)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(names), 4.5))
    for i, scenario in enumerate(scenarios):
        label = f"{scenario} {UNIT[scenario]}" + (" (lower is better)" if scenario == "S4" else "")
        xs = [t + (i - (len(scenarios) - 1) / 2) * width for t in range(len(names))]
        ax.bar(xs, [ratios[n].get(scenario, 0) for n in names], width, label=label)
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
    """2,000 idle connections need ~4,000 descriptors in a proxy; children inherit this."""
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
    parser.add_argument("--scenarios", type=names(SCENARIOS), default="S1,S2,S3,S4,H1",
                        help="comma-separated, from S1,S2,S3,S4,H1 (H1: plain HTTP GETs)")
    parser.add_argument("--lbws-config-extra", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="extra [lbws] key for the lbws targets (repeatable)")
    parser.add_argument("--lbws-routes", type=int, default=0, metavar="N",
                        help="give the lbws targets N [route:NAME] sections, the last the"
                        " one every client matches (0: none, the default)")
    args = parser.parse_args()
    args.idle_connections = 2000
    if args.smoke:
        args.duration, args.idle_connections = 2.0, 200
    return args


def start_backend(procs, script):
    backend = procs.start(["node", script, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(Lines(backend.stdout).next(time.monotonic() + READY_TIMEOUT).split()[1])
    except BenchError as error:
        raise SystemExit(f"{script.name} did not start: {error} (did bench/setup.sh run?)") from None
    return backend, port


def run(args, procs, workdir):
    """WebSocket scenarios against the echo backend, then H1 against the
    plain HTTP one (each target started fresh for each)."""
    report = {"started": datetime.now().astimezone().isoformat(timespec="seconds"),
              "duration": args.duration, "smoke": args.smoke,
              "idle_connections": args.idle_connections, "scenarios": args.scenarios,
              "lbws_config_extra": dict(args.lbws_config_extra),
              "lbws_routes": args.lbws_routes, "versions": tool_versions(),
              "targets": {}}
    passes = [(ECHO_SERVER, [s for s in args.scenarios if s != "H1"]),
              (HTTP_BACKEND, [s for s in args.scenarios if s == "H1"])]
    for script, scenarios in passes:
        if not scenarios:
            continue
        backend, backend_port = start_backend(procs, script)
        for name in args.targets:
            print(f"{name} {','.join(scenarios)} ...", file=sys.stderr)
            outcome = bench_target(procs, name, workdir, backend, backend_port, args, scenarios)
            merged = report["targets"].setdefault(name, {"scenarios": {}})
            merged["scenarios"].update(outcome.pop("scenarios"))
            merged.update(outcome)
        procs.stop(backend)
    report["ratios_to_nginx"] = ratios_to_nginx(report["targets"])
    return report


def main():
    args = parse_args()
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="lbws-bench-") as tmp:
        try:
            report = run(args, procs, Path(tmp))
        finally:
            procs.stop_all()
    RESULTS.mkdir(exist_ok=True)
    if args.smoke:
        write_json(report, RESULTS / "smoke.json")
    else:
        write_json(report, RESULTS / "latest.json")
        shutil.copyfile(RESULTS / "latest.json",
                        RESULTS / f"{datetime.now():%Y%m%d-%H%M%S}.json")
        draw_chart(report, RESULTS / "chart.png")
    print(format_table(report))
    failed = any("error" in outcome or any("error" in r or failures(r)
                                           for r in outcome["scenarios"].values())
                 for outcome in report["targets"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
