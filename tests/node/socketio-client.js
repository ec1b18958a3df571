// A node socket.io-client with its default transports: connects to URL
// (long-polling first), waits for the upgrade to WebSocket, emits "hello"
// and prints one JSON line: {welcome, ack, transport} (transport is the
// one in use when the ack came). Exits 1 with {"error"} on failure.
//
// Usage: node socketio-client.js URL
// withCredentials keeps cookies between requests in Node.js (as a browser
// does): lbws's sticky_cookie needs it to keep polling on one backend.
'use strict';
const { io } = require('socket.io-client');

const url = process.argv[2];
const socket = io(url, { withCredentials: true, reconnection: false, timeout: 10000 });
const seen = { welcome: null };
const deadline = setTimeout(() => finish(1, { error: 'timed out' }), 20000);

function finish(code, value) {
  clearTimeout(deadline);
  console.log(JSON.stringify(value));
  socket.close();
  process.exit(code);
}

socket.on('welcome', (data) => { seen.welcome = data; });
socket.on('connect_error', (err) => finish(1, { error: String(err && err.message) }));
socket.io.on('open', () => {
  socket.io.engine.on('upgrade', () => {
    socket.emit('hello', 'from node', (ack) => {
      finish(0, { ...seen, ack, transport: socket.io.engine.transport.name });
    });
  });
});
