// S6's backend: a node `ws` echo server that says when WebSockets arrive,
// so that run.py sees the reconnect rate where it matters, at the backend.
//
// Usage: node bench/counting-backend.js [--port N]
//
// Prints "listening PORT" once it accepts connections, then every
// BUCKET_MS in which WebSockets were opened one JSON line
// {"t": UNIX_MS, "new": N}: N WebSockets opened in the BUCKET_MS before
// UNIX_MS (wall clock, for run.py to line up with when it stopped lbws).
// Only 127.0.0.1 is listened on.
'use strict';
const path = require('path');
const { createRequire } = require('module');

const { WebSocketServer } = createRequire(
  path.join(__dirname, '..', 'tests', 'node', 'package.json'))('ws');

const BUCKET_MS = 100;

const args = process.argv.slice(2);
const i = args.indexOf('--port');
const port = i >= 0 ? Number(args[i + 1]) : 0;

let opened = 0;
const server = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
server.on('connection', (ws) => {
  opened++;
  ws.on('error', () => {});
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});
server.on('error', (err) => {
  process.stderr.write(`server error: ${err.message}\n`);
  process.exit(1);
});
server.on('listening', () => {
  process.stdout.write('listening ' + server.address().port + '\n');
  setInterval(() => {
    if (opened) {
      process.stdout.write(JSON.stringify({ t: Date.now(), new: opened }) + '\n');
      opened = 0;
    }
  }, BUCKET_MS);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
