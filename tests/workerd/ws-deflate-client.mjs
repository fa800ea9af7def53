// A `ws` client offering permessage-deflate, for the Rust test: sends messages of several
// sizes through the gateway to a `ws` server and checks each comes back whole.
//
//   node ws-deflate-client.mjs ws://127.0.0.1:PORT/agents/Deflate/ROOM
//
// Prints one JSON line: {"extensions":..., "negotiated":[...], "round_trips":[sizes], "close_code":N}.
import WebSocket from "ws";

const fail = (error) => {
  process.stdout.write(`${JSON.stringify({ error: String(error?.stack ?? error) })}\n`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 20_000).unref();

// Text and binary, under and over a frame's 125- and 64 KiB-length forms, compressible and not.
const sizes = [1, 125, 126, 4096, 65_535, 65_536, 1_000_000];
const message = (size, i) =>
  i % 2 === 0
    ? "agents ".repeat(Math.ceil(size / 7)).slice(0, size)
    : Buffer.from(Array.from({ length: size }, (_, j) => (j * 7919 + i) % 251));
const report = { round_trips: [] };
const ws = new WebSocket(process.argv[2], { perMessageDeflate: { threshold: 0 } });
ws.on("upgrade", (response) => {
  report.extensions = response.headers["sec-websocket-extensions"] ?? null;
});
ws.on("error", fail);
let next = 0;
const send = () => ws.send(message(sizes[next], next));
ws.on("open", send);
ws.on("message", (data, isBinary) => {
  const sent = message(sizes[next], next);
  const same = isBinary ? Buffer.compare(Buffer.from(data), sent) === 0 : data.toString() === sent;
  if (!same) fail(`message ${next} (${sizes[next]} bytes) changed on the way`);
  report.round_trips.push(sizes[next]);
  next += 1;
  if (next < sizes.length) send();
  else ws.close(1000, "done");
});
ws.on("close", (code) => {
  report.negotiated = Object.keys(ws._extensions ?? {});
  report.close_code = code;
  process.stdout.write(`${JSON.stringify(report)}\n`);
  process.exit(0);
});
