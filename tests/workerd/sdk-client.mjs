// The Agents SDK's own client (AgentClient, on PartySocket) through a fixed scenario against
// worker.js's CoderAgent, printing one JSON object per line on stdout for the Rust test.
//
//   node sdk-client.mjs --host 127.0.0.1:PORT --agent CoderAgent --name ROOM [--base-path agents/X/ROOM]
//
// Scenario: connect and wait for ready; whoami (the connection id the agent saw); echo; an
// explicit reconnect; the agent closing with 1000 (the SDK reconnects by itself); the agent
// closing with 4001 (terminal: the SDK must not reconnect). Each step prints a line; the last
// line is {"step":"done"}. Any failure prints {"step":"error",...} and exits 1.
import { AgentClient } from "agents/client";
import WebSocket from "ws";

const arg = (name) => {
  const i = process.argv.indexOf(`--${name}`);
  return i === -1 ? undefined : process.argv[i + 1];
};
const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
const fail = (error) => {
  print({ step: "error", error: String(error?.stack ?? error) });
  process.exit(1);
};
setTimeout(() => fail("scenario timed out"), 30_000).unref();

const client = new AgentClient({
  agent: arg("agent") ?? "CoderAgent",
  name: arg("name") ?? "default",
  host: arg("host"),
  protocol: "ws",
  ...(arg("base-path") ? { basePath: arg("base-path") } : {}),
  WebSocket, // Node 20 has no global WebSocket
  minReconnectionDelay: 50, // PartySocket's defaults wait seconds between attempts
  maxReconnectionDelay: 200,
});

// Every frame and every open/close, in order, for the assertions.
const frames = [];
const waiters = [];
const record = (event) => {
  frames.push(event);
  for (const w of [...waiters]) if (w.match(event)) waiters.splice(waiters.indexOf(w), 1) && w.resolve(event);
};
client.addEventListener("open", () => record({ kind: "open", url: client.url }));
client.addEventListener("close", (e) => record({ kind: "close", code: e.code, reason: e.reason }));
client.addEventListener("message", (e) => {
  let data = e.data;
  try {
    data = JSON.parse(e.data);
  } catch {}
  record({ kind: "message", data });
});
// Resolves with the first event from now on that matches, or fails after 10 s.
const next = (match, what) =>
  new Promise((resolve, reject) => {
    waiters.push({ match, resolve });
    setTimeout(() => reject(new Error(`no ${what} within 10 s`)), 10_000).unref();
  });
const message = (type) => (e) => e.kind === "message" && e.data?.type === type;
const since = (start) => frames.slice(start);

async function whoami() {
  const answer = next(message("whoami"), "whoami answer");
  client.send(JSON.stringify({ type: "whoami" }));
  return (await answer).data;
}

try {
  let start = frames.length;
  await client.ready;
  print({ step: "connected", pk: client.id, agent: client.agent, name: client.name, frames: since(start) });

  print({ step: "whoami", pk: client.id, seen: await whoami() });

  const echo = next((e) => e.kind === "message" && e.data === "hello from the SDK", "echo");
  client.send("hello from the SDK");
  print({ step: "echo", data: (await echo).data });

  start = frames.length;
  let opened = next((e) => e.kind === "open", "reopen");
  client.reconnect();
  await opened;
  await client.ready;
  print({ step: "reconnected", pk: client.id, seen: await whoami(), frames: since(start) });

  start = frames.length;
  opened = next((e) => e.kind === "open", "reopen after 1000");
  client.send(JSON.stringify({ type: "close", code: 1000, reason: "done" }));
  await opened;
  await client.ready;
  print({ step: "closed_1000_and_reconnected", pk: client.id, seen: await whoami(), frames: since(start) });

  start = frames.length;
  const closed = next((e) => e.kind === "close", "close 4001");
  client.send(JSON.stringify({ type: "close", code: 4001, reason: "bye" }));
  await closed;
  // 4001 is terminal for the SDK: nothing may reopen in well over the reconnection delay.
  await new Promise((r) => setTimeout(r, 1000));
  print({ step: "closed_4001", frames: since(start) });

  client.close();
  print({ step: "done" });
  process.exit(0);
} catch (error) {
  fail(error);
}
