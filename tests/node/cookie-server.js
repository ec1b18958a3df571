// A page that sets UTF-8 cookies with document.cookie and opens a
// WebSocket back to where it came from; the node `ws` server answers with
// the hex of the Cookie header's bytes exactly as they arrived, which the
// page shows in <pre id="result">.
//
// Usage: node cookie-server.js
// Listens on 127.0.0.1, a free port, printed as "listening PORT".
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>cookies</title>
<pre id="result"></pre>
<script>
document.cookie = "name=Åsa; path=/";
document.cookie = "city=Хорошёво; path=/";
const ws = new WebSocket("ws://" + location.host + "/ws");
ws.onmessage = (event) => {
  document.getElementById("result").textContent = event.data;
  ws.close(1000);
};
ws.onclose = (event) => {
  if (!document.getElementById("result").textContent)
    document.getElementById("result").textContent = "closed " + event.code;
};
</script>
`;

const server = http.createServer((request, response) => {
  response.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
  response.end(PAGE);
});
const wss = new WebSocketServer({ server, path: '/ws' });
wss.on('connection', (ws, request) => {
  // node reads header bytes as latin-1: one character per byte, so the
  // bytes come back unchanged.
  const raw = request.rawHeaders;
  const values = [];
  for (let i = 0; i < raw.length; i += 2) {
    if (raw[i].toLowerCase() === 'cookie') values.push(Buffer.from(raw[i + 1], 'latin1').toString('hex'));
  }
  ws.send(JSON.stringify({ cookie: values }));
});
server.listen(0, '127.0.0.1', () => console.log(`listening ${server.address().port}`));
