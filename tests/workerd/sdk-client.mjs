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
import { arg, fail, print, recorder, socketOptions } from "./client-common.mjs";

const client = new AgentClient({
  ...socketOptions,
  agent: arg("agent") ?? "CoderAgent",
  name: arg("name") ?? "default",
  host: arg("host"),
  ...(arg("base-path") ? { basePath: arg("base-path") } : {}),
  WebSocket, // Node 20 has no global WebSocket
});
const { frames, next, whoami, since } = recorder(client);

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
