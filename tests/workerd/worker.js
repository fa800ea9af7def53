// The agents the conformance tests talk to, on the current Agents SDK (package.json: "agents").
// The fetch handler is the SDK's own routing, as a deployed Worker would have it.
import { Agent, routeAgentRequest } from "agents";

// Test commands, sent by clients as JSON text:
//   {"type":"close","code":4001,"reason":"bye"}  the agent closes this connection with that code
//   {"type":"whoami"}                              the agent answers with the connection id and URL it saw
// Anything else is echoed back as it came (text or binary), to the sender only.
function json(message) {
  if (typeof message !== "string" || !message.startsWith("{")) return null;
  try {
    return JSON.parse(message);
  } catch {
    return null;
  }
}

function command(connection, message) {
  const parsed = json(message);
  if (parsed?.type === "close") {
    connection.close(parsed.code, parsed.reason ?? "");
    return true;
  }
  if (parsed?.type === "whoami") {
    connection.send(JSON.stringify({ type: "whoami", id: connection.id, url: connection.uri ?? null }));
    return true;
  }
  return false;
}

// The agent of the field: the binding CoderAgent, which the SDK serves at /agents/coder-agent/...
export class CoderAgent extends Agent {
  onMessage(connection, message) {
    if (!command(connection, message)) connection.send(message);
  }

  // Tells the other connections of the instance how this one ended, as the agent saw it.
  onClose(connection, code, reason, wasClean) {
    const report = { type: "peer_closed", id: connection.id, code, reason, wasClean };
    this.broadcast(JSON.stringify(report), [connection.id]);
  }
}

// A stateful agent: connects with cf_agent_state, and {"type":"set_state","state":...} makes it
// set that state, which the SDK broadcasts to every connection as cf_agent_state.
export class StateAgent extends Agent {
  initialState = { counter: 0, note: "initial" };

  onMessage(connection, message) {
    if (command(connection, message)) return;
    const parsed = json(message);
    if (parsed?.type === "set_state") this.setState(parsed.state);
    else connection.send(message);
  }
}

export default {
  async fetch(request, env) {
    // As in the field: the Worker refuses everything while its secret is missing.
    if (!env.OPENROUTER_API_KEY) return new Response("OPENROUTER_API_KEY is not set", { status: 500 });
    return (await routeAgentRequest(request, env)) ?? new Response("Not found", { status: 404 });
  },
};
