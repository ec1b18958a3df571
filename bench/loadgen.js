// WebSocket load generator for bench/run.py: the same client drives every
// target, so differences between targets come from the targets.
//
// Usage: node bench/loadgen.js --port PORT --scenario S1|S2|S3|S4|probe
//            [--duration SECONDS] [--connections N] [--hold-timeout SECONDS]
//
//   S1     N (50) connections ping-pong 32-byte text: round trips/s, p50/p99 ms
//   S2     one connection echoes 1 MiB binary messages: MB/s (1 MB = 1e6 bytes)
//   S3     N (20) workers loop connect + one round trip + close: connections/s
//   S4     open N (2000) idle connections, report when all are open, hold them
//          until stdin closes, SIGTERM/SIGINT, or --hold-timeout
//   H1     plain HTTP: N (20) keep-alive connections loop small GETs: requests/s
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

const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf('--' + name);
  return i >= 0 ? args[i + 1] : fallback;
}
const port = Number(option('port'));
const scenario = option('scenario');
const durationMs = Number(option('duration', '10')) * 1000;
const url = `ws://127.0.0.1:${port}/`;
const clientOptions = { perMessageDeflate: false, handshakeTimeout: HANDSHAKE_TIMEOUT_MS };

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

async function idle(count, holdMs) {
  const sockets = [];
  let started = 0;
  let errors = 0;
  let closedEarly = 0;
  const cpu = process.cpuUsage();
  const t0 = Date.now();
  const deadline = t0 + S4_OPEN_TIMEOUT_MS;
  emit({ event: 'start' });
  const opener = async () => {
    while (started < count && Date.now() < deadline) {
      started++;
      try {
        const ws = await connect();
        ws.on('close', () => closedEarly++);
        sockets.push(ws);
      } catch {
        errors++;
      }
    }
  };
  await Promise.all(Array.from({ length: S4_OPEN_CONCURRENCY }, opener));
  const openSeconds = (Date.now() - t0) / 1000;
  const used = process.cpuUsage(cpu);
  emit({ event: 'open', connections: sockets.length, errors, open_seconds: openSeconds });
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

// H1: each of `concurrency` keep-alive connections sends the next GET as soon
// as the last response ended; only 200s inside the window count.
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

async function httpGets(concurrency) {
  const http = require('http');
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  const latencies = [];
  let errors = 0;
  const end = Date.now() + durationMs;
  const stop = measureWindow();
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (Date.now() < end) {
      const t0 = process.hrtime.bigint();
      try {
        await httpGet(agent);
        latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
      } catch {
        errors++;
      }
    }
  }));
  const window = stop();
  agent.destroy();
  latencies.sort((a, b) => a - b);
  return {
    ...window, requests: latencies.length, errors,
    requests_per_s: latencies.length / window.seconds,
    p50_ms: percentile(latencies, 0.5), p99_ms: percentile(latencies, 0.99),
  };
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
    case 'H1':
      result = await httpGets(Number(option('connections', '20')));
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
