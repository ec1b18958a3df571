// WebSocket load generator for bench/run.py: the same client drives every
// target, so differences between targets come from the targets.
//
// Usage: node bench/loadgen.js --port PORT --scenario S1|S2|S3|S4|S5|probe|hprobe
//            [--duration SECONDS] [--connections N] [--hold-timeout SECONDS]
//            [--storm-timeout SECONDS] [--reconnect-port PORT] [--tls]
//
//   --tls  wss:// (and https://): every connection makes a full TLS
//          handshake (no session resumption), offering ALPN http/1.1 as
//          browsers do; the target's certificate is not verified (it is
//          made for the run, on loopback)
//
//   S1     N (50) connections ping-pong 32-byte text: round trips/s, p50/p99 ms
//   S2     one connection echoes 1 MiB binary messages: MB/s (1 MB = 1e6 bytes)
//   S3     N (20) workers loop connect + one round trip + close: connections/s
//   S4     open N (2000) idle connections, report when all are open, hold them
//          until stdin closes, SIGTERM/SIGINT, or --hold-timeout
//   S5     reconnect storm: open N (10000) idle connections ({"event":"open"}),
//          then on the line "storm" on stdin answer {"event":"armed"} (run.py
//          then kills the backend) and reconnect every client that loses its
//          connection with jittered exponential backoff (see STORM_* below);
//          {"event":"reconnected"} when all N are connected again (or
//          --storm-timeout passed), then hold them until stdin closes;
//          with --reconnect-port the reconnects go to that port (S6: the
//          clients of an lbws that stops come back through another)
//   probe  one connect + round trip + close; exit status 0 if it worked
//   hprobe one plain HTTP GET; exit status 0 if it got a 200
//
// Only 127.0.0.1 is ever connected to. Output is one JSON object per line on
// stdout: {"event":"start"} and {"event":"stop"} bracket the measured window
// (run.py reads the proxy's CPU time at both; for S4 the window ends with
// {"event":"open"}, when all connections are open), then {"event":"result"}
// carries the numbers, including this process's own CPU share over the
// window, which shows whether the load generator was the bottleneck.
'use strict';
const path = require('path');
const { createRequire } = require('module');

// ws and bufferutil are installed once, for tests and benchmarks alike.
const WebSocket = createRequire(
  path.join(__dirname, '..', 'tests', 'node', 'package.json'))('ws');

const HANDSHAKE_TIMEOUT_MS = 5000;
const CYCLE_TIMEOUT_MS = 5000;
const CLOSE_GRACE_MS = 2000;
const S4_OPEN_TIMEOUT_MS = 120000;
const S4_OPEN_CONCURRENCY = 50;
// S5's reconnect policy, "full jitter" exponential backoff as typical
// reconnecting clients use it: before attempt k (0 for the first attempt
// after a lost connection, +1 for each failed attempt since) a client waits
// uniformly random 0 .. min(STORM_CAP_MS, STORM_BASE_MS * 2^k). An attempt
// fails when the handshake errs (refused, reset, HTTP 502/503) or takes longer
// than HANDSHAKE_TIMEOUT_MS; a connection that opens resets k to 0.
const STORM_BASE_MS = 1000;
const STORM_CAP_MS = 30000;

const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf('--' + name);
  return i >= 0 ? args[i + 1] : fallback;
}
const port = Number(option('port'));
const scenario = option('scenario');
const durationMs = Number(option('duration', '10')) * 1000;
const tls = args.includes('--tls');
const url = `${tls ? 'wss' : 'ws'}://127.0.0.1:${port}/`;
const reconnectUrl = `ws://127.0.0.1:${Number(option('reconnect-port', port))}/`;
const clientOptions = { perMessageDeflate: false, handshakeTimeout: HANDSHAKE_TIMEOUT_MS };
if (tls) {
  Object.assign(clientOptions, { rejectUnauthorized: false, ALPNProtocols: ['http/1.1'] });
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function connect() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, clientOptions);
    ws.once('open', () => {
      ws.removeAllListeners('error');
      ws.on('error', () => {});
      resolve(ws);
    });
    ws.once('error', reject);
  });
}

// Close all sockets cleanly, but never wait longer than CLOSE_GRACE_MS.
async function closeAll(sockets) {
  const closed = sockets.map((ws) => new Promise((resolve) => {
    if (ws.readyState === WebSocket.CLOSED) return resolve();
    ws.once('close', resolve);
    ws.close(1000);
  }));
  await Promise.race([Promise.all(closed), sleep(CLOSE_GRACE_MS)]);
  sockets.forEach((ws) => ws.terminate());
}

// Measures one window of `durationMs`, bracketed by start/stop events.
function measureWindow() {
  const cpu = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  emit({ event: 'start' });
  return () => {
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const used = process.cpuUsage(cpu);
    emit({ event: 'stop' });
    const cpuSeconds = (used.user + used.system) / 1e6;
    return { seconds, loadgen_cpu_seconds: cpuSeconds, loadgen_cpu_share: cpuSeconds / seconds };
  };
}

function percentile(sorted, p) {
  return sorted.length ? sorted[Math.floor(p * (sorted.length - 1))] : null;
}

// S1 and S2: each connection keeps one message in flight and sends the next
// as soon as the echo is back; only echoes received inside the window count.
async function pingPong(connections, payload) {
  const sockets = await Promise.all(Array.from({ length: connections }, connect));
  const latencies = [];
  let running = true;
  let lost = 0;
  for (const ws of sockets) {
    let sentAt;
    const send = () => {
      sentAt = process.hrtime.bigint();
      ws.send(payload);
    };
    ws.on('message', () => {
      if (!running) return;
      latencies.push(Number(process.hrtime.bigint() - sentAt) / 1e6);
      send();
    });
    ws.on('close', () => { if (running) lost++; });
    send();
  }
  const finish = measureWindow();
  await sleep(durationMs);
  running = false;
  const measured = finish();
  await closeAll(sockets);
  const sorted = Float64Array.from(latencies).sort();
  return {
    ...measured,
    round_trips: sorted.length,
    round_trips_per_s: sorted.length / measured.seconds,
    p50_ms: percentile(sorted, 0.5),
    p99_ms: percentile(sorted, 0.99),
    connections_lost: lost,
  };
}

// One connect + round trip + close, rejected if any step takes too long.
function cycle(payload) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, clientOptions);
    const timer = setTimeout(() => { ws.terminate(); reject(new Error('cycle timeout')); },
      CYCLE_TIMEOUT_MS);
    let echoed = false;
    ws.on('open', () => ws.send(payload));
    ws.on('message', () => { echoed = true; ws.close(1000); });
    ws.on('error', (err) => { clearTimeout(timer); ws.terminate(); reject(err); });
    ws.on('close', () => {
      clearTimeout(timer);
      if (echoed) resolve(); else reject(new Error('closed before echo'));
    });
  });
}

async function churn(workers, payload) {
  let running = true;
  let completed = 0;
  let errors = 0;
  const worker = async () => {
    while (running) {
      try {
        await cycle(payload);
        if (running) completed++;
      } catch {
        if (running) errors++;
      }
    }
  };
  const finish = measureWindow();
  const done = Promise.all(Array.from({ length: workers }, worker));
  await sleep(durationMs);
  running = false;
  const measured = finish();
  await done;
  return { ...measured, connections: completed, connections_per_s: completed / measured.seconds, errors };
}

// Resolves when run.py is done with S4: stdin closed, a signal, or the hold timeout.
function released(holdMs) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve('timeout'), holdMs);
    const release = (why) => { clearTimeout(timer); resolve(why); };
    process.stdin.on('end', () => release('stdin'));
    process.stdin.on('close', () => release('stdin'));
    process.stdin.resume();
    process.once('SIGTERM', () => release('SIGTERM'));
    process.once('SIGINT', () => release('SIGINT'));
  });
}

// A short name for why a handshake failed: "HTTP 502", "ECONNRESET", ...
function failureKind(err) {
  const text = err && (err.code || err.message) || 'error';
  return text.replace(/^Unexpected server response: /, 'HTTP ');
}

// S4 and S5: open `count` connections, S4_OPEN_CONCURRENCY handshakes at a
// time, for at most S4_OPEN_TIMEOUT_MS; `onOpen` sees each as it opens.
// Emits {"event":"start"} before and {"event":"open"} after.
async function openMany(count, onOpen) {
  const sockets = [];
  const failureKinds = {};
  let started = 0;
  let errors = 0;
  const t0 = Date.now();
  emit({ event: 'start' });
  const opener = async () => {
    while (started < count && Date.now() < t0 + S4_OPEN_TIMEOUT_MS) {
      started++;
      try {
        const ws = await connect();
        onOpen(ws);
        sockets.push(ws);
      } catch (err) {
        errors++;
        failureKinds[failureKind(err)] = (failureKinds[failureKind(err)] || 0) + 1;
      }
    }
  };
  await Promise.all(Array.from({ length: S4_OPEN_CONCURRENCY }, opener));
  const openSeconds = (Date.now() - t0) / 1000;
  emit({ event: 'open', connections: sockets.length, errors, open_seconds: openSeconds });
  return { sockets, errors, open_failure_kinds: failureKinds, open_seconds: openSeconds };
}

async function idle(count, holdMs) {
  let closedEarly = 0;
  const cpu = process.cpuUsage();
  const { sockets, errors, open_seconds: openSeconds } = await openMany(count,
    (ws) => ws.on('close', () => closedEarly++));
  const used = process.cpuUsage(cpu);
  const why = await released(holdMs);
  const stillOpen = sockets.length - closedEarly;
  sockets.forEach((ws) => ws.removeAllListeners('close'));
  await closeAll(sockets);
  return {
    connections: sockets.length, errors, still_open: stillOpen, released_by: why,
    open_seconds: openSeconds,
    loadgen_cpu_seconds: (used.user + used.system) / 1e6,
    loadgen_cpu_share: (used.user + used.system) / 1e6 / openSeconds,
  };
}

// One line of stdin at a time, for run.py's commands.
function stdinLines(onLine) {
  let buffered = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk) => {
    buffered += chunk;
    let newline;
    while ((newline = buffered.indexOf('\n')) >= 0) {
      onLine(buffered.slice(0, newline).trim());
      buffered = buffered.slice(newline + 1);
    }
  });
}

// S5: `count` clients connect (S4's bounded opener), then wait for run.py's
// "storm" line. From then on each client that loses its connection
// reconnects with the STORM_* backoff. The result says how long it took
// until every client was connected again, from the "armed" answer (just
// before run.py kills the backend), the spread of the closes the clients
// saw, the handshake latency of the successful reconnects and the failed
// attempts.
async function storm(count, stormTimeoutMs, holdMs) {
  const initial = await openMany(count, () => {});
  const clients = initial.sockets.map((ws) => ({ ws, failures: 0, lost: false }));

  let armedAt = null;      // hrtime when run.py said "storm"
  let stopping = false;    // closing down: no more reconnects
  let connected = clients.length;
  let lostOnce = 0;        // clients that lost their connection since "storm"
  let closedBeforeStorm = 0;
  let droppedAfterReconnect = 0;
  let attempts = 0;
  let failedAttempts = 0;
  const failureKinds = {};
  const latencies = [];
  let firstClose = null;
  let lastClose = null;
  let allBack = null;
  const timers = new Set();
  let finishStorm;
  const stormDone = new Promise((resolve) => { finishStorm = resolve; });
  let cpuAtArm = null;
  const now = () => process.hrtime.bigint();

  const checkDone = () => {
    if (armedAt !== null && allBack === null && lostOnce === clients.length
        && connected === clients.length) {
      allBack = now();
      finishStorm('all');
    }
  };
  const schedule = (client) => {
    const delay = Math.random() * Math.min(STORM_CAP_MS, STORM_BASE_MS * 2 ** client.failures);
    const timer = setTimeout(() => { timers.delete(timer); attempt(client); }, delay);
    timers.add(timer);
  };
  const lose = (client) => {
    connected--;
    if (stopping) return;
    if (armedAt === null) {
      closedBeforeStorm++;
    } else {
      const t = now();
      if (firstClose === null) firstClose = t;
      lastClose = t;
      if (client.lost) droppedAfterReconnect++;
      else { client.lost = true; lostOnce++; }
    }
    client.failures = 0;
    schedule(client);
  };
  const watch = (client) => {
    client.ws.once('close', () => lose(client));
  };
  const attempt = (client) => {
    if (stopping) return;
    attempts++;
    const begun = now();
    const ws = new WebSocket(reconnectUrl, clientOptions);
    client.ws = ws;
    let isOpen = false;
    ws.on('error', (err) => {
      if (isOpen) return;
      const kind = failureKind(err);
      failureKinds[kind] = (failureKinds[kind] || 0) + 1;
    });
    ws.once('open', () => {
      isOpen = true;
      connected++;
      if (armedAt !== null) latencies.push(Number(now() - begun) / 1e6);
      checkDone();
    });
    ws.once('close', () => {
      if (isOpen) return lose(client);
      if (stopping) return;
      failedAttempts++;
      client.failures++;
      schedule(client);
    });
  };
  clients.forEach(watch);

  const why = await new Promise((resolve) => {
    const timer = setTimeout(() => resolve('timeout'), holdMs);
    stdinLines((line) => {
      if (line === 'storm' && armedAt === null) {
        armedAt = now();
        cpuAtArm = process.cpuUsage();
        emit({ event: 'armed' });
        const giveUp = setTimeout(() => finishStorm('timeout'), stormTimeoutMs);
        stormDone.then(() => {
          clearTimeout(giveUp);
          clearTimeout(timer);
          resolve('storm');
        });
      }
    });
    process.stdin.on('end', () => { clearTimeout(timer); resolve('stdin'); });
    process.once('SIGTERM', () => { clearTimeout(timer); resolve('SIGTERM'); });
  });
  let measured = {};
  if (why === 'storm') {
    const cpuUsed = process.cpuUsage(cpuAtArm);
    const end = allBack === null ? now() : allBack;
    const seconds = Number(end - armedAt) / 1e9;
    const sorted = Float64Array.from(latencies).sort();
    measured = {
      reconnect_seconds: allBack === null ? null : seconds,
      seconds,
      reconnected: connected,
      lost: lostOnce,
      attempts,
      failed_attempts: failedAttempts,
      failure_kinds: failureKinds,
      dropped_after_reconnect: droppedAfterReconnect,
      first_close_seconds: firstClose === null ? null : Number(firstClose - armedAt) / 1e9,
      close_spread_seconds: firstClose === null ? null : Number(lastClose - firstClose) / 1e9,
      p50_ms: percentile(sorted, 0.5),
      p99_ms: percentile(sorted, 0.99),
      max_ms: sorted.length ? sorted[sorted.length - 1] : null,
      loadgen_cpu_seconds: (cpuUsed.user + cpuUsed.system) / 1e6,
      loadgen_cpu_share: (cpuUsed.user + cpuUsed.system) / 1e6 / seconds,
    };
    emit({ event: 'reconnected', ...measured });
    // Hold the clients until run.py has read the CPU and memory figures.
    await new Promise((resolve) => {
      process.stdin.on('end', resolve);
      process.stdin.on('close', resolve);
      process.once('SIGTERM', resolve);
      setTimeout(resolve, holdMs);
    });
  }
  stopping = true;
  timers.forEach(clearTimeout);
  const sockets = clients.map((client) => client.ws);
  sockets.forEach((ws) => ws.removeAllListeners('close'));
  await closeAll(sockets);
  return {
    connections: clients.length, errors: initial.errors,
    open_failure_kinds: initial.open_failure_kinds, released_by: why,
    closed_before_storm: closedBeforeStorm, ...measured,
  };
}

// hprobe: one plain HTTP GET; a 200 resolves. (H1's load is wrk, run by
// bench/run.py.)
function httpGet(agent) {
  const http = require('http');
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/', agent }, (res) => {
      res.resume();
      res.on('end', () => (res.statusCode === 200 ? resolve()
        : reject(new Error(`HTTP ${res.statusCode}`))));
    });
    req.setTimeout(CYCLE_TIMEOUT_MS, () => req.destroy(new Error('request timed out')));
    req.on('error', reject);
  });
}

async function main() {
  const text = 'x'.repeat(32);
  let result;
  switch (scenario) {
    case 'S1':
      result = await pingPong(Number(option('connections', '50')), text);
      break;
    case 'S2': {
      const size = 1024 * 1024;
      result = await pingPong(1, require('crypto').randomBytes(size));
      result.mb_per_s = (result.round_trips * size) / result.seconds / 1e6;
      break;
    }
    case 'S3':
      result = await churn(Number(option('connections', '20')), text);
      break;
    case 'S4':
      result = await idle(Number(option('connections', '2000')),
        Number(option('hold-timeout', '300')) * 1000);
      break;
    case 'S5':
      result = await storm(Number(option('connections', '10000')),
        Number(option('storm-timeout', '120')) * 1000,
        Number(option('hold-timeout', '600')) * 1000);
      break;
    case 'probe':
      await cycle(text);
      result = { ok: true };
      break;
    case 'hprobe': {
      const http = require('http');
      await httpGet(new http.Agent());
      result = { ok: true };
      break;
    }
    default:
      throw new Error(`unknown scenario ${scenario}`);
  }
  emit({ event: 'result', scenario, ...result });
}

main().then(() => process.exit(0), (err) => {
  emit({ event: 'error', scenario, message: String(err && err.message || err) });
  process.exit(1);
});
