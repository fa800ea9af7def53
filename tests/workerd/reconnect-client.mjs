// The reconnect policy of docs/websockets.md, run with the real partysocket client: it must
// reconnect after a 1001 and stay closed after a 1008.
//
//   node reconnect-client.mjs ws://127.0.0.1:PORT/agents/CoderAgent/ROOM
//
// Asks the reference agent to close the first connection with 1001, then the second with
// 1008, and prints one JSON line: {"opens": N, "closes": [codes...]}.
import ReconnectingWebSocket from "partysocket/ws";
import WebSocket from "ws";

// The function docs/websockets.md shows, as it is there.
function shouldReconnectOnClose(event) {
  // 1001 drain, idle timeout or a silent client; 1006 the network; 1011 and 1014 the agent
  // lost or silent; 1012 the agent moved; 1013 try again later. Not 1008 (a policy, such as a
  // rate limit), 1002 (protocol error) or 1009 (the same message would be refused again).
  return [1001, 1006, 1011, 1012, 1013, 1014].includes(event.code);
}

const fail = (error) => {
  process.stdout.write(`${JSON.stringify({ error: String(error?.stack ?? error) })}\n`);
  process.exit(1);
};
setTimeout(() => fail("timed out"), 20_000).unref();

const report = { opens: 0, closes: [] };
const socket = new ReconnectingWebSocket(process.argv[2], [], {
  WebSocket,
  shouldReconnectOnClose,
  minReconnectionDelay: 10,
  maxReconnectionDelay: 50,
  connectionTimeout: 5_000,
});
socket.addEventListener("open", () => {
  report.opens += 1;
});
socket.addEventListener("message", (event) => {
  // The agent greets each connection with its identity; then it is asked to close.
  if (!String(event.data).includes("cf_agent_identity")) return;
  const code = report.opens === 1 ? 1001 : 1008;
  socket.send(JSON.stringify({ type: "close", code, reason: `close ${code}` }));
});
socket.addEventListener("close", (event) => {
  report.closes.push(event.code);
  if (event.code === 1008) {
    // A reconnect would be due within maxReconnectionDelay; wait well past it.
    setTimeout(() => {
      report.still_closed = socket.readyState === socket.CLOSED;
      process.stdout.write(`${JSON.stringify(report)}\n`);
      process.exit(0);
    }, 500);
  }
});
socket.addEventListener("error", () => {});
