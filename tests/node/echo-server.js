// A node `ws` echo server like the seed's backend, for tests and benchmarks.
//
// Usage: node echo-server.js [--port N] [--host H] [--fd N] [--prefix TEXT]
//                            [--deflate JSON] [--max-payload BYTES]
// Port 0 (the default) asks the OS for a free port; the chosen port is
// printed on stdout as "listening PORT" once the server accepts connections.
// Every message is echoed back unchanged (text stays text, binary stays
// binary) unless --prefix is given, in which case text messages are echoed
// as PREFIX + message, like the seed's "Server received from client: ".
// Each connection's upgrade request is available by sending the text message
// "__request__": the reply is a JSON object with url, headers and protocol.
// "__flood__" makes the server send a 2,000-byte message and then small ones,
// a batch per turn, until its connection closes (the backend leg of the close
// handshake tests); "__closes__" is answered with the JSON list of the close
// codes those connections got so far (1006: no close frame came).
// --deflate accepts permessage-deflate offers, with the given ws
// perMessageDeflate options (e.g. '{"serverNoContextTakeover": true}');
// without it compression offers are declined.
// --max-payload sets ws's maxPayload (default 256 MiB): a larger message
// closes its sender with 1009, as lbws's max_message_size does.
'use strict';
const { WebSocketServer } = require('ws');

const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf('--' + name);
  return i >= 0 ? args[i + 1] : fallback;
}

// --fd N serves on an already listening socket inherited as file descriptor
// N instead (tests keep a port while the process is killed and restarted).
const fd = option('fd', null);
const httpServer = fd === null ? null : require('http').createServer();
const server = new WebSocketServer({
  ...(httpServer === null
    ? { host: option('host', '127.0.0.1'), port: Number(option('port', '0')) }
    : { server: httpServer }),
  maxPayload: Number(option('max-payload', String(256 * 1024 * 1024))),
  perMessageDeflate: JSON.parse(option('deflate', 'false')),
  handleProtocols: (protocols) => protocols.values().next().value || false,
});
const prefix = option('prefix', null);
const floodCloses = [];

function flood(ws) {
  ws.on('close', (code) => floodCloses.push(code));
  ws.send(Buffer.alloc(2000, 0x7a));
  let i = 0;
  const batch = () => {
    if (ws.readyState !== ws.OPEN) return;
    for (let n = 0; n < 20; n++) ws.send('b' + i++);
    setImmediate(batch);
  };
  batch();
}

server.on('connection', (ws, request) => {
  // A client's bad frame (invalid UTF-8, too many fragments, an oversized
  // message) is an 'error' on its socket: ws closes that connection; without
  // a listener node would throw it and the whole server would die.
  ws.on('error', (err) => {
    process.stderr.write(`connection error: ${err.code || ''} ${err.message}\n`);
  });
  ws.on('message', (data, isBinary) => {
    if (!isBinary && data.toString() === '__flood__') {
      flood(ws);
    } else if (!isBinary && data.toString() === '__closes__') {
      ws.send(JSON.stringify(floodCloses));
    } else if (!isBinary && data.toString() === '__request__') {
      ws.send(JSON.stringify({
        url: request.url, headers: request.headers, protocol: ws.protocol,
      }));
    } else if (!isBinary && prefix !== null) {
      ws.send(prefix + data.toString());
    } else {
      ws.send(data, { binary: isBinary });
    }
  });
});
if (httpServer !== null) httpServer.listen({ fd: Number(fd) });
// The listening socket failing (its port taken, say) ends the process with
// a line saying why, not an uncaught exception.
server.on('error', (err) => {
  process.stderr.write(`server error: ${err.message}\n`);
  process.exit(1);
});
server.on('listening', () => {
  process.stdout.write('listening ' + server.address().port + '\n');
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
