// A plain HTTP backend for bench/run.py's H1 scenario: answers every
// request with 200 and a 13-byte body, keeping connections alive.
//
// Usage: node bench/http-backend.js [--port N]; prints "listening PORT".
'use strict';
const http = require('http');

const args = process.argv.slice(2);
const i = args.indexOf('--port');
const server = http.createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain', 'content-length': '13' });
  res.end('Hello, World!');
});
server.keepAliveTimeout = 60000;
server.listen(i >= 0 ? Number(args[i + 1]) : 0, '127.0.0.1', () => {
  console.log('listening ' + server.address().port);
});
