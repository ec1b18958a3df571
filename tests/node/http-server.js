// A plain HTTP backend on node's http (llhttp, a strict parser) for lbws's
// tests: answers each request with the number of connections it accepted
// so far, the request's method, URL and body length, as JSON.
//
// Usage: node http-server.js --port 0 [--keep-alive-ms N]; prints
// "listening PORT".
'use strict';
const http = require('http');

const args = process.argv.slice(2);
const arg = (name, fallback) => {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1]) : fallback;
};
let connections = 0;
const server = http.createServer((req, res) => {
  let length = 0;
  req.on('data', (chunk) => { length += chunk.length; });
  req.on('end', () => {
    const body = JSON.stringify({
      connections, method: req.method, url: req.url, length,
      trailers: req.trailers,
    });
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  });
});
server.on('connection', () => { connections += 1; });
server.keepAliveTimeout = arg('--keep-alive-ms', 5000);
server.listen(arg('--port', 0), '127.0.0.1', () => {
  console.log('listening ' + server.address().port);
});
