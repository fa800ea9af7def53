// The Agents SDK's own client (AgentClient) with a token that expires while it is connected,
// against worker-auth.js's CoderAgent through the gateway. Prints one JSON object per line on
// stdout for tests/workerd_auth.rs.
//
//   JWT_KEY=... node auth-client.mjs --host 127.0.0.1:PORT --name ROOM --ttl SECONDS
//
// The client's `query` is an async function minting a fresh HS256 token (sub "sdk-user",
// claim n = 1, 2, ... counting the mints) on every (re)connect: the first lives --ttl seconds,
// later ones a minute. An observer client (sub "observer") on the same instance hears the
// agent's report of the client's close (peer_closed).
//
// Scenario: the observer connects; the client connects (ready) and asks whoami; the gateway
// closes it when its token expires; on that close (1008 "token expired", which AgentClient
// treats as terminal) the application calls reconnect(), as it would to refresh its token;
// the client is ready again and asks whoami. Lines: connected, whoami, expired, reconnected,
// agent_saw, done. Any failure prints {"step":"error",...} and exits 1.
import { createHmac, randomUUID } from "node:crypto";
import { AgentClient } from "agents/client";
import WebSocket from "ws";
import { arg, fail, message, print, recorder, socketOptions } from "./client-common.mjs";

const key = process.env.JWT_KEY;
if (!key) fail("JWT_KEY is not set");
const ttl = Number(arg("ttl") ?? 3);
const name = arg("name") ?? "default";

// An HS256 JWT, as an identity provider would issue it.
const b64url = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
function mint(claims) {
  const signed = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url(claims)}`;
  return `${signed}.${createHmac("sha256", key).update(signed).digest("base64url")}`;
}

// Every token minted: its subject, number and expiry (never the token itself).
const minted = [];
const tokenSource = (sub, firstTtl) => async () => {
  const n = minted.filter((m) => m.sub === sub).length + 1;
  const exp = Math.floor(Date.now() / 1000) + (n === 1 ? firstTtl : 60);
  minted.push({ sub, n, exp });
  return { token: mint({ sub, email: `${sub}@example.com`, n, exp, jti: randomUUID() }) };
};

const clientOptions = (query) => ({
  ...socketOptions,
  agent: "CoderAgent",
  name,
  host: arg("host"),
  query,
  WebSocket, // Node 20 has no global WebSocket
});

try {
  const observer = new AgentClient(clientOptions(tokenSource("observer", 60)));
  const watched = recorder(observer);
  await observer.ready;

  const client = new AgentClient(clientOptions(tokenSource("sdk-user", ttl)));
  const { frames, next, whoami } = recorder(client);
  // What an application does on the gateway's expiry close: fetch a fresh token and reconnect
  // (AgentClient does not reconnect by itself after 1008).
  let sdkConnectionError = null;
  client.addEventListener("close", (e) => {
    if (e.code === 1008 && e.reason === "token expired") {
      sdkConnectionError = client.connectionError && { code: client.connectionError.code };
      client.reconnect();
    }
  });

  await client.ready;
  print({ step: "connected", pk: client.id, frames: frames.slice(), minted: minted.slice() });
  print({ step: "whoami", pk: client.id, seen: await whoami() });

  const start = frames.length;
  const closed = next((e) => e.kind === "close", "close at the token's expiry", (ttl + 10) * 1000);
  const reopened = next((e) => e.kind === "open", "reopen after the expiry", (ttl + 20) * 1000);
  const close = await closed;
  const exp = minted.find((m) => m.sub === "sdk-user" && m.n === 1).exp;
  print({ step: "expired", close, ms_after_exp: close.at - exp * 1000, sdk_connection_error: sdkConnectionError });

  await reopened;
  await client.ready;
  print({ step: "reconnected", pk: client.id, seen: await whoami(), frames: frames.slice(start), minted: minted.slice() });

  const report = await (async () => {
    for (const e of watched.frames) if (e.kind === "message" && e.data?.type === "peer_closed" && e.data.id === client.id) return e;
    return watched.next((e) => message("peer_closed")(e) && e.data.id === client.id, "peer_closed");
  })();
  print({ step: "agent_saw", report: report.data, observer_closes: watched.frames.filter((e) => e.kind === "close") });

  client.close();
  observer.close();
  print({ step: "done" });
  process.exit(0);
} catch (error) {
  fail(error);
}
