// A graphql-ws server (the `graphql-ws` package on node `ws`, as its README
// sets it up) whose one subscription, `ticks`, yields 1, 2, 3, ... every
// 100 ms.
//
// Usage: node graphql-server.js --fd N
// Serves on a listening socket inherited as file descriptor N, so that a
// test can kill the process and start another on the same port; prints
// "listening PORT" once it accepts connections.
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');
const { useServer } = require('graphql-ws/use/ws');
const { GraphQLSchema, GraphQLObjectType, GraphQLInt, GraphQLString } = require('graphql');

const args = process.argv.slice(2);
const fd = Number(args[args.indexOf('--fd') + 1]);

async function* ticks() {
  for (let n = 1; ; n++) {
    await new Promise((resolve) => setTimeout(resolve, 100));
    yield { ticks: n };
  }
}

const schema = new GraphQLSchema({
  query: new GraphQLObjectType({
    name: 'Query',
    fields: { hello: { type: GraphQLString, resolve: () => 'world' } },
  }),
  subscription: new GraphQLObjectType({
    name: 'Subscription',
    fields: { ticks: { type: GraphQLInt, subscribe: ticks } },
  }),
});

const server = http.createServer((request, response) => {
  response.writeHead(404, { 'Content-Type': 'text/plain' });
  response.end('graphql-ws only\n');
});
useServer({ schema }, new WebSocketServer({ server, path: '/graphql' }));
server.listen({ fd }, () => console.log(`listening ${server.address().port}`));
