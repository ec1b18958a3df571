// A node `ws` echo server that keeps a ledger of every message it got, for
// the fleet test's rolling restart: nothing a client sent and lbws accepted
// may be lost or reordered, across reconnects and lbws instances.
//
// Usage: node ledger-server.js [--port N] [--prefix TEXT]   (prints "listening PORT")
//
// Text messages "CLIENT:SEQ" are recorded under CLIENT; on one connection
// each number must be the one before plus one, else `errors` counts one (a
// message lost or reordered on the way).
// Every message is echoed back as PREFIX + message. The text message
// "__ledger__" is answered with {"errors", "clients": {CLIENT: [SEQ, ...]}}
// for the whole server (not recorded); "__request__" with the upgrade
// request's url and headers, as echo-server.js does.
'use strict';
const { WebSocketServer } = require('ws');

const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf('--' + name);
  return i >= 0 ? args[i + 1] : fallback;
}
const prefix = option('prefix', '');
const server = new WebSocketServer({
  host: '127.0.0.1',
  port: Number(option('port', '0')),
  perMessageDeflate: false,
});
const clients = new Map();
let errors = 0;

server.on('error', (error) => console.error('server error:', error.message));
server.on('connection', (ws, request) => {
  const last = new Map();
  ws.on('error', (error) => console.error('connection error:', error.message));
  ws.on('message', (data, isBinary) => {
    const text = data.toString();
    if (!isBinary && text === '__ledger__') {
      ws.send(JSON.stringify({ errors, clients: Object.fromEntries(clients) }));
      return;
    }
    if (!isBinary && text === '__request__') {
      ws.send(JSON.stringify({ url: request.url, headers: request.headers }));
      return;
    }
    const colon = text.lastIndexOf(':');
    if (!isBinary && colon > 0) {
      const client = text.slice(0, colon);
      const seq = Number(text.slice(colon + 1));
      if (last.has(client) && seq !== last.get(client) + 1) errors += 1;
      last.set(client, seq);
      if (!clients.has(client)) clients.set(client, []);
      clients.get(client).push(seq);
    }
    ws.send(prefix + text);
  });
});
server.on('listening', () => {
  process.stdout.write('listening ' + server.address().port + '\n');
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => process.exit(0));
}
