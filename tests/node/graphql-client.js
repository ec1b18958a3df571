// A graphql-ws client (createClient, as an application uses it) that
// subscribes to `ticks` and keeps retrying: each event is printed as a JSON
// line, so a test can follow the subscription through a backend's death.
//
// Usage: node graphql-client.js URL
// Lines: {"event": "connected"}, {"event": "tick", "n": N},
// {"event": "closed", "code": C}, and at the end {"event": "error"|"complete"};
// each with "t", the time in seconds since the epoch.
// It runs until its stdin closes, or until the subscription ends for good.
'use strict';
const WebSocket = require('ws');
const { createClient } = require('graphql-ws');

const print = (event) => console.log(JSON.stringify({ ...event, t: Date.now() / 1000 }));
const client = createClient({
  url: process.argv[2],
  webSocketImpl: WebSocket,
  // graphql-ws's recipe for a client that rides out a server restart:
  // retry every connection problem, not only close events (a refused
  // connect or an HTTP 502 is an error event). Close codes graphql-ws
  // deems fatal (1011 among them) still end the subscription for good.
  shouldRetry: () => true,
  retryAttempts: 50,
  retryWait: () => new Promise((resolve) => setTimeout(resolve, 100)),
  on: {
    connected: () => print({ event: 'connected' }),
    closed: (event) => print({ event: 'closed', code: event.code, reason: event.reason }),
  },
});
const stop = client.subscribe(
  { query: 'subscription { ticks }' },
  {
    next: (result) => print({ event: 'tick', n: result.data.ticks }),
    error: (error) => {
      print({ event: 'error', error: String(error && (error.code || error.message || error)) });
      client.dispose().then(() => process.exit(0));
    },
    complete: () => {
      print({ event: 'complete' });
      client.dispose().then(() => process.exit(0));
    },
  },
);
process.stdin.on('end', () => {
  stop();
  client.dispose().then(() => process.exit(0));
});
process.stdin.resume();
