"""Autobahn fuzzingclient conformance job for lbws.

Runs the Autobahn testsuite's fuzzingclient (wstest, Python 2.7, installed by
setup.sh into <repo>/.venv-conformance) against

  direct  an Autobahn echo backend (echo_backend.py), and
  lbws    the same backend through lbws (twistd -n lbws --config GENERATED.ini),

then compares the per-case verdicts (behavior and behaviorClose from each
index.json). A case is *worse* through lbws when either verdict ranks lower
than the direct one:  OK > NON-STRICT = INFORMATIONAL > UNIMPLEMENTED > FAILED
(WRONG CODE, UNCLEAN, FAILED BY CLIENT rank with FAILED; a case missing from
the lbws report ranks below everything).

Reports: <repo>/reports/conformance/{direct,lbws}/ (HTML + index.json) and
<repo>/reports/conformance/summary.md.

Exit status: 0 = no case worse through lbws, 1 = some case worse (or the lbws
leg did not finish), 2 = setup trouble (wstest not installed, lbws not
available or not starting, backend not starting, direct leg failing).

    .venv/bin/python tests/conformance/run.py
    .venv/bin/python tests/conformance/run.py --cases '1.*,5.*'
    .venv/bin/python tests/conformance/run.py --target-only direct
"""

import argparse
import base64
import fnmatch
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
WSTEST = ROOT / ".venv-conformance" / "bin" / "wstest"
ECHO_BACKEND = HERE / "echo_backend.py"
DEFAULT_REPORTS = ROOT / "reports" / "conformance"

# 11.* does not exist. 12.* and 13.* (permessage-deflate, 216 cases) send
# 1,000 compressed messages each, up to 128 KiB, through wstest's Python 2
# deflate: far too slow for every CI run. CI runs, in each of the 12
# subgroups (5 test files x default offer, 7 offer/accept combinations), the
# cases with messages of 16 B to 4 KiB in one frame (1-5) and 8 KiB in
# 256-byte frames (11, a compressed message's RSV1 on its first frame only);
# --full (make conformance-full) runs all of them.
BASE_CASES = ["%d.*" % n for n in range(1, 11)]
COMPRESSION_SUBGROUPS = ["12.%d" % n for n in range(1, 6)] + ["13.%d" % n for n in range(1, 8)]
COMPRESSION_SUBSET = ["%s.%d" % (group, n) for group in COMPRESSION_SUBGROUPS
                      for n in (1, 2, 3, 4, 5, 11)]
DEFAULT_CASES = BASE_CASES + COMPRESSION_SUBSET
FULL_CASES = BASE_CASES + ["12.*", "13.*"]


def describe_cases(cases):
    """The case list for a person: the default subset by name, not 72 ids."""
    if list(cases) == DEFAULT_CASES:
        return "1.* .. 10.* and 12.x/13.x cases 1-5 and 11 of each subgroup"
    return ",".join(cases)
# Nothing excluded by default: all of 9.* (messages up to 16 MiB) takes ~10 s
# direct on a 2-core machine. If it gets too slow through lbws, the biggest
# ones are 9.1.6, 9.2.6 (16 MiB), 9.3.1 and 9.4.1 (4 MiB in 64-byte frames):
# pass them to --exclude.
DEFAULT_EXCLUDE = []

LOOPBACK = "127.0.0.1"
LBWS_STOP_GRACE = 40.0  # > lbws' default drain_timeout (30 s)

# Verdict ranking (higher is better).
RANK = {
    "OK": 3,
    "NON-STRICT": 2,
    "INFORMATIONAL": 2,
    "UNIMPLEMENTED": 1,
    "FAILED": 0,
    "WRONG CODE": 0,
    "UNCLEAN": 0,
    "FAILED BY CLIENT": 0,
}
MISSING = "MISSING"
VERDICT_ORDER = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED",
                 "WRONG CODE", "UNCLEAN", "FAILED BY CLIENT", MISSING]


def rank(verdict):
    if verdict == MISSING or verdict is None:
        return -1
    return RANK.get(verdict, 0)


class SetupError(Exception):
    """Trouble that is not a conformance result: exit 2."""


class LegFailed(Exception):
    """The lbws leg did not produce a report (lbws' fault): exit 1."""


NOTES = []  # harness observations worth keeping in summary.md


def log(msg):
    print("[conformance] " + msg, flush=True)


def note(msg):
    NOTES.append(msg)
    log("note: " + msg)


# ---------------------------------------------------------------- processes

class Proc:
    """A child process in its own session, output to a log file."""

    def __init__(self, name, argv, logfile, cwd=None, env=None, stop_grace=15.0):
        self.name = name
        self.stop_grace = stop_grace
        self.logfile = Path(logfile)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.logfile, "wb")
        self.popen = subprocess.Popen(
            [str(a) for a in argv], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def wait(self, timeout):
        """Wait up to timeout seconds; return the exit code or None."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def _signal_group(self, sig):
        try:
            os.killpg(self.popen.pid, sig)  # own session: pgid == pid
        except ProcessLookupError:
            pass

    def stop(self, grace=None):
        """SIGTERM, wait up to grace seconds, then SIGKILL. Always reaps."""
        if grace is None:
            grace = self.stop_grace
        if self.alive():
            t0 = time.monotonic()
            self._signal_group(signal.SIGTERM)
            if self.wait(grace) is None:
                note("%s (pid %d) did not stop within %.0f s of SIGTERM: killed with SIGKILL"
                     % (self.name, self.pid, grace))
                self._signal_group(signal.SIGKILL)
                self.wait(10)
            elif time.monotonic() - t0 > 5:
                note("%s (pid %d) took %.1f s to stop after SIGTERM (exit code %s)"
                     % (self.name, self.pid, time.monotonic() - t0, self.popen.returncode))
        else:
            # the leader is gone; make sure no member of its group lingers
            self._signal_group(signal.SIGKILL)
        self._fh.close()

    def tail(self, lines=20):
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def ws_probe(port, timeout=3.0):
    """One WebSocket opening handshake + close on 127.0.0.1:port.
    Returns (ok, status_line_or_error)."""
    key = base64.b64encode(os.urandom(16)).decode()
    req = ("GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (LOOPBACK, port, key))
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(req.encode())
            buf = b""
            while b"\r\n\r\n" not in buf and len(buf) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            status = buf.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status.split()
            ok = len(parts) >= 2 and parts[1] == "101"
            if ok:
                mask = os.urandom(4)
                payload = struct.pack("!H", 1000)
                masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
                s.sendall(bytes([0x88, 0x80 | len(payload)]) + mask + masked)
                try:
                    s.recv(64)  # the close reply; not essential
                except OSError:
                    pass
            return ok, status or "connection closed without a response"
    except OSError as e:
        return False, str(e)


def wait_ready(proc, port, timeout, what):
    """Wait until a WebSocket handshake on port succeeds (bounded)."""
    deadline = time.monotonic() + timeout
    last = "not tried"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise SetupError("%s exited (code %s) before accepting WebSocket connections.\n"
                             "--- last lines of %s ---\n%s"
                             % (what, proc.popen.returncode, proc.logfile, proc.tail()))
        ok, last = ws_probe(port)
        if ok:
            return
        time.sleep(0.3)
    raise SetupError("%s did not complete a WebSocket handshake on %s:%d within %.0f s "
                     "(last: %s).\n--- last lines of %s ---\n%s"
                     % (what, LOOPBACK, port, timeout, last, proc.logfile, proc.tail()))


def start_backend(reports, name, startup_timeout):
    logfile = reports / ("%s.log" % name)
    proc = Proc(name, [sys.executable, "-u", ECHO_BACKEND, "0", "--interface", LOOPBACK], logfile)
    deadline = time.monotonic() + startup_timeout
    port = None
    while time.monotonic() < deadline and port is None:
        for line in logfile.read_text(errors="replace").splitlines():
            if line.startswith("PORT "):
                port = int(line.split()[1])
                break
        else:
            if not proc.alive():
                break
            time.sleep(0.1)
    if port is None:
        proc.stop()
        raise SetupError("echo backend did not report its port within %.0f s.\n"
                         "--- last lines of %s ---\n%s" % (startup_timeout, logfile, proc.tail()))
    try:
        wait_ready(proc, port, startup_timeout, "echo backend")
    except BaseException:
        proc.stop()
        raise
    log("%s: echo backend pid %d on ws://%s:%d" % (name, proc.pid, LOOPBACK, port))
    return proc, port


def find_twistd(override):
    if override:
        return Path(override)
    for cand in (ROOT / ".venv" / "bin" / "twistd", Path(sys.executable).parent / "twistd"):
        if cand.exists():
            return cand
    found = shutil.which("twistd")
    if found:
        return Path(found)
    raise SetupError("twistd not found (looked in %s/.venv/bin, next to %s and on PATH)"
                     % (ROOT, sys.executable))


def lbws_env():
    env = dict(os.environ)
    # Let twistd find twisted/plugins/lbws_plugin.py from the work tree even
    # when the package is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def check_lbws_available(twistd):
    try:
        r = subprocess.run([str(twistd), "lbws", "--help"], cwd=str(ROOT), env=lbws_env(),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=60)
    except subprocess.TimeoutExpired:
        raise SetupError("'%s lbws --help' did not finish within 60 s" % twistd)
    except OSError as e:
        raise SetupError("cannot run %s: %s" % (twistd, e))
    if r.returncode != 0:
        out = r.stdout.decode(errors="replace").strip().splitlines()
        raise SetupError("lbws is not available as a twistd plugin ('%s lbws --help' exited %d).\n"
                         "  Is lbws installed (pip install -e .) with twisted/plugins/lbws_plugin.py?\n"
                         "  Use --target-only direct to run only the direct leg.\n  %s"
                         % (twistd, r.returncode, "\n  ".join(out[-8:])))


def write_lbws_ini(path, listen_port, backend_port):
    path.write_text(
        "[lbws]\n"
        "listen = tcp:%d:interface=%s\n"
        "dashboard =\n"
        "max_message_size = 67108864\n"
        "[health]\n"
        "probe = tcp\n"
        "[backend:echo]\n"
        "url = ws://%s:%d\n" % (listen_port, LOOPBACK, LOOPBACK, backend_port))


def start_lbws(reports, twistd, backend_port, startup_timeout):
    ini = reports / "lbws.ini"
    listen_port = free_port()
    write_lbws_ini(ini, listen_port, backend_port)
    argv = [twistd, "-n", "--pidfile=", "lbws", "--config", ini]
    log("starting lbws: %s" % " ".join(str(a) for a in argv))
    # lbws drains for up to drain_timeout (default 30 s) on SIGTERM.
    proc = Proc("lbws", argv, reports / "lbws.log", cwd=str(ROOT), env=lbws_env(),
                stop_grace=LBWS_STOP_GRACE)
    try:
        wait_ready(proc, listen_port, startup_timeout, "lbws")
    except BaseException:
        proc.stop()
        raise
    log("lbws: pid %d on ws://%s:%d -> backend ws://%s:%d"
        % (proc.pid, LOOPBACK, listen_port, LOOPBACK, backend_port))
    return proc, listen_port


# ---------------------------------------------------------------- wstest

def check_wstest():
    if not os.access(str(WSTEST), os.X_OK):
        raise SetupError("%s not found: install the Autobahn testsuite first:\n"
                         "  bash %s" % (WSTEST, (HERE / "setup.sh").relative_to(ROOT)))


def wstest_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PYTHONWARNINGS"] = "ignore"  # cryptography's Python 2 deprecation warning
    return env


def last_case_started(logfile):
    last = None
    try:
        for line in Path(logfile).read_text(errors="replace").splitlines():
            if line.startswith("Running test case ID"):
                last = line.strip()
    except OSError:
        pass
    return last


def run_wstest(reports, leg, url, cases, exclude, timeout):
    """Run the fuzzingclient against url; return (index dict for the agent, seconds)."""
    outdir = reports / leg
    if outdir.exists():
        shutil.rmtree(str(outdir))
    outdir.mkdir(parents=True)
    spec = {
        "outdir": str(outdir),
        "servers": [{"agent": leg, "url": url}],
        "options": {"failByDrop": False},
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    spec_path = reports / ("%s.spec.json" % leg)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    logfile = reports / ("%s.wstest.log" % leg)
    log("%s: wstest -m fuzzingclient against %s (cases %s%s; timeout %d s)"
        % (leg, url, describe_cases(cases), "; excluding " + ",".join(exclude) if exclude else "", timeout))
    t0 = time.monotonic()
    proc = Proc("wstest(%s)" % leg, [WSTEST, "-m", "fuzzingclient", "-s", spec_path],
                logfile, cwd=str(reports), env=wstest_env())
    try:
        rc = proc.wait(timeout)
    finally:
        proc.stop(grace=5)
    elapsed = time.monotonic() - t0
    if rc is None:
        raise LegFailed("%s: wstest did not finish within %d s; last: %s (log: %s)"
                        % (leg, timeout, last_case_started(logfile), logfile))
    index = outdir / "index.json"
    if rc != 0 or not index.exists():
        raise LegFailed("%s: wstest exited %s without %s.\n--- last lines of %s ---\n%s"
                        % (leg, rc, index, logfile, proc.tail()))
    data = json.loads(index.read_text())
    results = data.get(leg, {})
    log("%s: %d cases in %.1f s (report %s)" % (leg, len(results), elapsed, outdir / "index.html"))
    return results, elapsed


def load_index(reports, leg):
    index = reports / leg / "index.json"
    if not index.exists():
        return None
    data = json.loads(index.read_text())
    return data.get(leg) or (next(iter(data.values())) if data else {})


# ---------------------------------------------------------------- comparison

def case_key(case_id):
    return [int(p) if p.isdigit() else p for p in case_id.split(".")]


def counts(results, field):
    c = {}
    for r in results.values():
        v = r.get(field, MISSING)
        c[v] = c.get(v, 0) + 1
    return c


def matches(case_id, patterns):
    return any(fnmatch.fnmatchcase(case_id, p) for p in patterns)


def compare(base, other, tolerate):
    """Return (worse, tolerated, changed): lists of (case, base_result, other_result)."""
    worse, tolerated, changed = [], [], []
    for case in sorted(base, key=case_key):
        b = base[case]
        o = other.get(case) or {"behavior": MISSING, "behaviorClose": MISSING}
        is_worse = (rank(o.get("behavior")) < rank(b.get("behavior"))
                    or rank(o.get("behaviorClose")) < rank(b.get("behaviorClose")))
        if is_worse:
            (tolerated if matches(case, tolerate) else worse).append((case, b, o))
        elif (o.get("behavior"), o.get("behaviorClose")) != (b.get("behavior"), b.get("behaviorClose")):
            changed.append((case, b, o))
    return worse, tolerated, changed


def fmt_verdict(r):
    if not r or r.get("behavior") == MISSING:
        return MISSING
    return "%s / %s (close %s)" % (r.get("behavior"), r.get("behaviorClose"), r.get("remoteCloseCode"))


def total_duration(results, prefix=None):
    # A case whose connection failed can carry a bogus duration (a timestamp):
    # count only durations up to a day.
    return sum(r.get("duration") for c, r in results.items()
               if (prefix is None or c.startswith(prefix))
               and isinstance(r.get("duration"), (int, float)) and 0 <= r["duration"] <= 86400000) / 1000.0


def summary_markdown(legs, timings, worse, tolerated, changed, cases, exclude, base_name, other_name):
    lines = ["# lbws Autobahn conformance", ""]
    lines.append("Cases: `%s`%s." % (describe_cases(cases), "; excluded: `%s`" % ",".join(exclude) if exclude else ""))
    lines.append("")
    names = [n for n in (base_name, other_name) if n in legs]
    head = ["verdict"]
    for f in ("behavior", "behaviorClose"):
        for n in names:
            head.append("%s %s" % (n, f))
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    cnt = {(n, f): counts(legs[n], f) for n in names for f in ("behavior", "behaviorClose")}
    if other_name in legs:
        missing = len(set(legs[base_name]) - set(legs[other_name]))
        if missing:
            for f in ("behavior", "behaviorClose"):
                cnt[(other_name, f)][MISSING] = missing
    seen = set()
    for c in cnt.values():
        seen.update(c)
    order = [v for v in VERDICT_ORDER if v in seen] + sorted(v for v in seen if v not in VERDICT_ORDER)
    for v in order:
        row = [v]
        for f in ("behavior", "behaviorClose"):
            for n in names:
                row.append(str(cnt[(n, f)].get(v, 0)))
        lines.append("| " + " | ".join(row) + " |")
    row = ["**total cases**"]
    for f in ("behavior", "behaviorClose"):
        for n in names:
            row.append(str(len(legs[n])))
    lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for n in names:
        t = timings.get(n)
        if isinstance(t, (int, float)):
            t = "%.1f s" % t
        lines.append("- %s: wall %s, sum of case durations %.1f s (9.x: %.1f s, 12.x: %.1f s,"
                     " 13.x: %.1f s)"
                     % (n, t or "n/a (not run now)",
                        total_duration(legs[n]), total_duration(legs[n], "9."),
                        total_duration(legs[n], "12."), total_duration(legs[n], "13.")))
    lines.append("")
    if other_name not in legs:
        lines.append("Only the %s leg was run: no comparison." % base_name)
        lines.append("")
        return "\n".join(lines)

    def table(title, rows):
        out = ["## %s (%d)" % (title, len(rows)), ""]
        if not rows:
            out += ["none", ""]
            return out
        out.append("| case | %s | %s | %s report |" % (base_name, other_name, other_name))
        out.append("|---|---|---|---|")
        for case, b, o in rows:
            rep = o.get("reportfile", "")
            rep = rep.replace(".json", ".html") if rep else ""
            link = "[%s](%s/%s)" % (rep, other_name, rep) if rep else ""
            out.append("| %s | %s | %s | %s |" % (case, fmt_verdict(b), fmt_verdict(o), link))
        out.append("")
        return out

    if NOTES:
        lines += ["## Notes", ""] + ["- " + n for n in NOTES] + [""]
    lines += table("Worse through %s" % other_name, worse)
    if tolerated:
        lines += table("Worse but tolerated (--tolerate)", tolerated)
    if changed:
        lines += table("Changed, not worse", changed)
    lines.append("**Result: %s**" % ("%d case(s) worse through %s" % (len(worse), other_name)
                                     if worse else "no case worse through %s" % other_name))
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def split_patterns(values):
    out = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Autobahn fuzzingclient conformance: echo backend direct vs through lbws.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit: 0 no case worse, 1 some case worse, 2 setup trouble.")
    p.add_argument("--cases", action="append",
                   help="case patterns, comma-separated or repeated (default: 1.* .. 10.* "
                        "and a subset of 12.* and 13.*, see --full)")
    p.add_argument("--full", action="store_true",
                   help="every case of 1.* .. 10.*, 12.* and 13.* (slow: see README)")
    p.add_argument("--exclude", action="append",
                   help="case patterns to exclude, comma-separated or repeated")
    p.add_argument("--target-only", choices=["direct", "lbws"],
                   help="run only one leg. 'lbws' compares with the direct report already "
                        "in the reports directory (run the direct leg once first)")
    p.add_argument("--self-test", action="store_true",
                   help="second leg against a second echo backend instead of lbws "
                        "(checks the harness; expect nothing worse)")
    p.add_argument("--compare-only", action="store_true",
                   help="run nothing: compare the index.json reports already there")
    p.add_argument("--tolerate", action="append",
                   help="case patterns allowed to be worse (listed, but no exit 1)")
    p.add_argument("--reports", default=str(DEFAULT_REPORTS),
                   help="reports directory (default: %(default)s)")
    p.add_argument("--timeout", type=int, default=900,
                   help="seconds allowed for one wstest run (default: %(default)s)")
    p.add_argument("--startup-timeout", type=float, default=30,
                   help="seconds allowed for the backend / lbws to accept WebSockets (default: %(default)s)")
    p.add_argument("--twistd", help="twistd to start lbws with (default: <repo>/.venv/bin/twistd)")
    args = p.parse_args(argv)
    if args.full and args.cases:
        p.error("--full and --cases do not go together")
    args.cases = split_patterns(args.cases) or list(FULL_CASES if args.full else DEFAULT_CASES)
    args.exclude = split_patterns(args.exclude) or list(DEFAULT_EXCLUDE)
    args.tolerate = split_patterns(args.tolerate)
    if args.self_test and args.target_only == "lbws":
        p.error("--self-test and --target-only lbws do not go together")
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    reports = Path(args.reports).resolve()
    reports.mkdir(parents=True, exist_ok=True)
    base_name = "direct"
    other_name = "selftest" if args.self_test else "lbws"
    run_base = args.target_only in (None, "direct") and not args.compare_only
    run_other = args.target_only in (None, "lbws") and not args.compare_only

    legs, timings = {}, {}
    procs = []
    t_start = time.monotonic()
    try:
        if run_base or run_other:
            check_wstest()
        if not run_base and load_index(reports, base_name) is None:
            raise SetupError("no %s report in %s to compare with: run the direct leg first "
                             "(without --target-only, or with --target-only direct)"
                             % (base_name, reports / base_name))
        twistd = None
        if run_other and not args.self_test:
            twistd = find_twistd(args.twistd)
            check_lbws_available(twistd)  # before spending time on the direct leg

        if run_base or run_other:
            backend, backend_port = start_backend(reports, "backend", args.startup_timeout)
            procs.append(backend)

        if run_base:
            legs[base_name], timings[base_name] = run_wstest(
                reports, base_name, "ws://%s:%d" % (LOOPBACK, backend_port),
                args.cases, args.exclude, args.timeout)
            if not backend.alive():
                raise SetupError("the echo backend died during the direct leg.\n--- %s ---\n%s"
                                 % (backend.logfile, backend.tail()))

        if run_other:
            if args.self_test:
                second, port = start_backend(reports, "backend2", args.startup_timeout)
                procs.append(second)
                what = "second echo backend"
            else:
                second, port = start_lbws(reports, twistd, backend_port, args.startup_timeout)
                procs.append(second)
                what = "lbws"
            try:
                legs[other_name], timings[other_name] = run_wstest(
                    reports, other_name, "ws://%s:%d" % (LOOPBACK, port),
                    args.cases, args.exclude, args.timeout)
            except LegFailed as e:
                log("ERROR: " + str(e))
                legs[other_name] = {}  # every case missing -> worse
                timings[other_name] = "did not complete"
            if not second.alive():
                note("%s exited during the run (code %s); see %s"
                     % (what, second.popen.returncode, second.logfile))
                log("--- last lines of %s ---\n%s" % (second.logfile, second.tail()))
            if not backend.alive():
                note("the echo backend died during the %s leg; see %s" % (other_name, backend.logfile))
    except LegFailed as e:  # the direct leg: the harness or backend is at fault
        log("SETUP ERROR: " + str(e))
        return 2
    except SetupError as e:
        log("SETUP ERROR: " + str(e))
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 2
    finally:
        for p in reversed(procs):
            p.stop()

    # Reports from an earlier run fill in legs not run now (--target-only lbws, --compare-only).
    for name in (base_name, other_name):
        if name not in legs:
            loaded = load_index(reports, name)
            if loaded is not None:
                legs[name] = loaded
    if base_name not in legs:
        log("SETUP ERROR: no %s report in %s" % (base_name, reports / base_name))
        return 2

    # Only cases selected now take part (a --cases run against a full old report).
    def selected(c):
        return matches(c, args.cases) and not matches(c, args.exclude)
    for name in list(legs):
        legs[name] = {c: r for c, r in legs[name].items() if selected(c)}

    worse, tolerated, changed = [], [], []
    if other_name in legs:
        worse, tolerated, changed = compare(legs[base_name], legs[other_name], args.tolerate)
        extra = sorted(set(legs[other_name]) - set(legs[base_name]), key=case_key)
        if extra:
            log("note: %d case(s) only in the %s report: %s" % (len(extra), other_name, ", ".join(extra[:10])))

    md = summary_markdown(legs, timings, worse, tolerated, changed,
                          args.cases, args.exclude, base_name, other_name)
    (reports / "summary.md").write_text(md)
    print()
    print(md)
    log("summary written to %s (total %.1f s)" % (reports / "summary.md", time.monotonic() - t_start))
    return 1 if worse else 0


if __name__ == "__main__":
    sys.exit(main())
