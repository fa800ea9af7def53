// An upstream built on the `ws` package with permessage-deflate, for the Rust test: echoes
// every message back, compressed, and prints {"port": N} once it listens on 127.0.0.1.
//
//   node ws-deflate-server.mjs
import { WebSocketServer } from "ws";

const server = new WebSocketServer({
  host: "127.0.0.1",
  port: 0,
  perMessageDeflate: { threshold: 0 },
  maxPayload: 8 * 1024 * 1024,
});
server.on("listening", () => {
  process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`);
});
server.on("connection", (socket, request) => {
  // What the gateway's 101 relays: the extension this server accepted.
  socket.on("message", (data, isBinary) => socket.send(data, { binary: isBinary }));
  socket.on("error", () => {});
  void request;
});
// Bounded: the test kills it, and it never outlives a stuck test by much.
setTimeout(() => process.exit(0), 60_000).unref();
