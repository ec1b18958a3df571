// A node `ws` echo server that checks every connection's messages arrive in
// order, each exactly once: for the message-storm fault test.
//
// Usage: node sequence-server.js [--port N]   (prints "listening PORT")
//
// A text message starts with its sequence number and a colon ("17:..."), a
// binary one with it as 8 bytes big-endian. Numbers count from 0 on each
// connection; a gap, a repeat or a step back counts as an error. Every
// message is echoed back unchanged. The text message "__stats__" is answered
// with {"received", "bytes", "errors"} for that connection (not counted).
'use strict';
const { WebSocketServer } = require('ws');

const args = process.argv.slice(2);
const portIndex = args.indexOf('--port');
const server = new WebSocketServer({
  host: '127.0.0.1',
  port: portIndex >= 0 ? Number(args[portIndex + 1]) : 0,
  perMessageDeflate: false,
});

server.on('connection', (ws) => {
  // A client's bad frame (invalid UTF-8, too many fragments, an oversized
  // message) is an 'error' on its socket: ws closes that connection; without
  // a listener node would throw it and the whole server would die.
  ws.on('error', (err) => {
    process.stderr.write(`connection error: ${err.code || ''} ${err.message}\n`);
  });
  let expected = 0;
  let received = 0;
  let bytes = 0;
  let errors = 0;
  ws.on('message', (data, isBinary) => {
    let seq;
    if (isBinary) {
      seq = data.length >= 8 ? Number(data.readBigUInt64BE(0)) : -1;
    } else {
      const text = data.toString();
      if (text === '__stats__') {
        ws.send(JSON.stringify({ received, bytes, errors }));
        return;
      }
      seq = Number(text.slice(0, text.indexOf(':')));
    }
    received += 1;
    bytes += data.length;
    if (seq !== expected) errors += 1;
    expected = seq + 1;
    ws.send(data, { binary: isBinary });
  });
});
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
  process.on(signal, () => process.exit(0));
}
