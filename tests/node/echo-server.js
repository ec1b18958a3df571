// A node `ws` echo server like the seed's backend, for tests and benchmarks.
//
// Usage: node echo-server.js [--port N] [--host H] [--fd N] [--prefix TEXT]
//                            [--deflate JSON]
// Port 0 (the default) asks the OS for a free port; the chosen port is
// printed on stdout as "listening PORT" once the server accepts connections.
// Every message is echoed back unchanged (text stays text, binary stays
// binary) unless --prefix is given, in which case text messages are echoed
// as PREFIX + message, like the seed's "Server received from client: ".
// Each connection's upgrade request is available by sending the text message
// "__request__": the reply is a JSON object with url, headers and protocol.
// --deflate accepts permessage-deflate offers, with the given ws
// perMessageDeflate options (e.g. '{"serverNoContextTakeover": true}');
// without it compression offers are declined.
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
  maxPayload: 256 * 1024 * 1024,
  perMessageDeflate: JSON.parse(option('deflate', 'false')),
  handleProtocols: (protocols) => protocols.values().next().value || false,
});
const prefix = option('prefix', null);

server.on('connection', (ws, request) => {
  // A client's bad frame (invalid UTF-8, too many fragments, an oversized
  // message) is an 'error' on its socket: ws closes that connection; without
  // a listener node would throw it and the whole server would die.
  ws.on('error', (err) => {
    process.stderr.write(`connection error: ${err.code || ''} ${err.message}\n`);
  });
  ws.on('message', (data, isBinary) => {
    if (!isBinary && data.toString() === '__request__') {
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
