// A SockJS client (the `sockjs-client` package, as a page uses it): it
// asks the server's /info, opens the best transport it offers, sends one
// message and prints what it saw as one JSON line:
// {"transport": ..., "echo": ..., "close": CODE}.
//
// Usage: node sockjs-client.js http://HOST:PORT/echo
'use strict';
const SockJS = require('sockjs-client');

const seen = {};
const sock = new SockJS(process.argv[2]);
sock.onopen = () => {
  seen.transport = sock.transport;
  sock.send('hello sockjs');
};
sock.onmessage = (event) => {
  seen.echo = event.data;
  sock.close();
};
sock.onclose = (event) => {
  seen.close = event.code;
  console.log(JSON.stringify(seen));
};
