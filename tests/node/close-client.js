// A node `ws` client that keeps sending after a reason to be closed, for the
// close handshake tests (tests/test_close_handshake.py): does the close
// code reach a client that is still sending?
//
// Usage: node close-client.js --url URL --case CASE [--runs N]
// Each run opens a WebSocket, sends CASE's offence and then 300 small
// messages at once, and reads until the connection ends; runs follow each
// other. One JSON line per run on stdout: {"code": N, "reason": "..."}, code
// 1006 when no close frame came.
// Cases: size (a 2,000-byte message), frames (a message of 200 fragments),
// rate (500 messages), pings (300 pings), badframe (a frame with the
// reserved opcode 3, written to the socket as is), drop (the test echo
// backend's "__drop__"), flood (the node echo backend's "__flood__": the
// backend offends), stream (no offence: messages in batches until the
// connection closes, for closes lbws decides on its own).
'use strict';
const crypto = require('crypto');
const WebSocket = require('ws');

const args = process.argv.slice(2);
function option(name, fallback) {
  const i = args.indexOf('--' + name);
  return i >= 0 ? args[i + 1] : fallback;
}
const url = option('url', null);
const which = option('case', null);
const runs = Number(option('runs', '1'));

// A masked client frame with opcode 3, which RFC 6455 reserves.
function reservedFrame() {
  const payload = Buffer.from('bad');
  const mask = crypto.randomBytes(4);
  const masked = Buffer.from(payload.map((b, i) => b ^ mask[i % 4]));
  return Buffer.concat([Buffer.from([0x83, 0x80 | payload.length]), mask, masked]);
}

function smallOnes(ws, count) {
  for (let i = 0; i < count; i++) ws.send('m' + i);
}

const offences = {
  size: (ws) => { ws.send(Buffer.alloc(2000, 0x78)); smallOnes(ws, 300); },
  frames: (ws) => {
    for (let i = 0; i < 200; i++) ws.send('f', { fin: i === 199 });
    smallOnes(ws, 300);
  },
  rate: (ws) => smallOnes(ws, 500),
  pings: (ws) => { for (let i = 0; i < 300; i++) ws.ping('p' + i); },
  badframe: (ws) => { ws._socket.write(reservedFrame()); smallOnes(ws, 300); },
  drop: (ws) => { ws.send('__drop__'); smallOnes(ws, 300); },
  flood: (ws) => ws.send('__flood__'),
  stream: (ws) => {
    let i = 0;
    const batch = () => {
      if (ws.readyState !== WebSocket.OPEN) return;
      for (let n = 0; n < 20; n++) ws.send('s' + i++);
      setImmediate(batch);
    };
    batch();
  },
};

function run() {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    // A reset shows as an 'error' and then a 'close' with 1006.
    ws.on('error', () => {});
    ws.on('open', () => offences[which](ws));
    ws.on('close', (code, reason) => resolve({ code, reason: reason.toString() }));
  });
}

(async () => {
  if (url === null || !(which in offences)) {
    process.stderr.write('usage: node close-client.js --url URL --case CASE [--runs N]\n');
    process.exit(2);
  }
  for (let i = 0; i < runs; i++) {
    process.stdout.write(JSON.stringify(await run()) + '\n');
  }
})();
