// A SockJS echo server (the `sockjs` package on node's http server, as its
// README sets it up) with its prefix on /echo: /echo/websocket is the raw
// WebSocket endpoint, /echo/info and the rest SockJS's own HTTP transports.
//
// Usage: node sockjs-server.js [--upgrade-delay MS]
// Listens on 127.0.0.1, a free port, printed as "listening PORT". As in
// SockJS's README, nothing answers outside the prefix: a request for / waits
// for good.
// --upgrade-delay makes the server slow to take an upgrade, as a busy
// event loop is: the upgrade request is handed to SockJS MS milliseconds
// after node parsed it. Meanwhile the socket belongs to nobody, as between
// node's 'upgrade' event and the application's own listeners: there an
// ECONNRESET is an unhandled 'error' that ends the process, while an end of
// file (FIN) is not an error at all.
'use strict';
const http = require('http');
const sockjs = require('sockjs');

const args = process.argv.slice(2);
const delayAt = args.indexOf('--upgrade-delay');
const delay = delayAt >= 0 ? Number(args[delayAt + 1]) : 0;

const echo = sockjs.createServer({ log: () => {} });
echo.on('connection', (conn) => {
  conn.on('data', (message) => conn.write(message));
});

const server = http.createServer();
echo.installHandlers(server, { prefix: '/echo' });
if (delay > 0) {
  // SockJS's own 'upgrade' listeners, run later for its /echo/ paths; each
  // such upgrade prints "upgrade received N" when node parsed it and
  // "upgrade handed N" once SockJS has it.
  const listeners = server.listeners('upgrade');
  server.removeAllListeners('upgrade');
  let upgrades = 0;
  server.on('upgrade', (request, socket, head) => {
    const run = () => {
      for (const listener of listeners) listener.call(server, request, socket, head);
    };
    if (!request.url.startsWith('/echo/')) return run();
    const n = ++upgrades;
    console.log(`upgrade received ${n}`);
    setTimeout(() => {
      run();
      console.log(`upgrade handed ${n}`);
    }, delay);
  });
}
server.listen(0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
