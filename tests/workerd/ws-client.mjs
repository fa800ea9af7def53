// A plain `ws` client offering permessage-deflate (tokio-tungstenite cannot), for the Rust
// test: reports what the 101 said and whether a compressed exchange round-trips.
//
//   node ws-client.mjs ws://127.0.0.1:PORT/agents/CoderAgent/ROOM
//
// Prints one JSON line: {"extensions":..., "identity":..., "echo_ok":..., "close_code":...}.
import WebSocket from "ws";

const fail = (error) => {
  process.stdout.write(`${JSON.stringify({ error: String(error?.stack ?? error) })}\n`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 15_000).unref();

// Compressible, and over the 64 KiB line: exercises deflate and long frames together.
const big = JSON.stringify({ type: "chat", text: "the quick brown fox ".repeat(4000) });
const report = {};
const ws = new WebSocket(process.argv[2], { perMessageDeflate: { threshold: 0 } });
ws.on("upgrade", (response) => {
  report.extensions = response.headers["sec-websocket-extensions"] ?? null;
});
ws.on("error", fail);
ws.on("message", (data, isBinary) => {
  const text = isBinary ? null : data.toString();
  if (report.identity === undefined) {
    report.identity = JSON.parse(text);
    ws.send("small compressed hello");
    ws.send(big);
  } else if (text === big) {
    report.echo_ok = true;
    ws.close(1000, "client done");
  }
});
ws.on("close", (code) => {
  report.negotiated = Object.keys(ws._extensions ?? {});
  report.close_code = code;
  process.stdout.write(`${JSON.stringify(report)}\n`);
  process.exit(0);
});
