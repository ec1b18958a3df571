// A socket.io server with its default transports (HTTP long-polling first,
// then the upgrade to WebSocket), for lbws's common-stacks tests and the
// README's recipe.
//
// Usage: node socketio-server.js [--port N] [--name NAME]
// Prints "listening PORT" once it accepts connections. It serves:
//   GET /            a page that loads /socket.io/socket.io.js, connects,
//                    emits "hello" and shows the acknowledgement as JSON in
//                    <pre id="result"> (for a browser)
//   /socket.io/      socket.io itself: on "hello" (data, ack) it acks
//                    {backend, got, transport}; on connect it emits
//                    "welcome" {backend}
'use strict';
const http = require('http');
const { Server } = require('socket.io');

const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf('--' + name);
  return i >= 0 ? args[i + 1] : fallback;
}
const name = option('name', 'socketio');

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><link rel="icon" href="data:,"><title>socket.io through lbws</title></head>
<body><pre id="result">connecting</pre>
<script src="/socket.io/socket.io.js"></script>
<script>
  const out = document.getElementById('result');
  const socket = io();
  const seen = { welcome: null, transports: [] };
  socket.on('welcome', (data) => { seen.welcome = data; });
  socket.io.engine.on('upgrade', (transport) => {
    socket.emit('hello', 'from the browser', (ack) => {
      seen.ack = ack;
      seen.transports.push(socket.io.engine.transport.name);
      out.textContent = JSON.stringify(seen);
    });
  });
</script></body></html>
`;

const server = http.createServer((req, res) => {
  if (req.url === '/' || req.url === '/index.html') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(PAGE);
    return;
  }
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('not found\n');
});
const io = new Server(server);
io.on('connection', (socket) => {
  socket.emit('welcome', { backend: name });
  socket.on('hello', (data, ack) => {
    ack({ backend: name, got: data, transport: socket.conn.transport.name });
  });
});
server.listen(Number(option('port', '0')), option('host', '127.0.0.1'), () => {
  console.log('listening ' + server.address().port);
});
