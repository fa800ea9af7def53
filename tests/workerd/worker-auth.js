// The agent of tests/workerd_auth.rs: a Worker that accepts only requests carrying the
// identity agent-gateway signed, checked by docs/examples/gateway-identity.js (imported, not
// copied: the test runs the documented code). Served by `start.mjs --worker auth`, with the
// signing key in the GATEWAY_IDENTITY_KEY binding.
import { Agent, routeAgentRequest } from "agents";
import { requireGatewayIdentity } from "../../docs/examples/gateway-identity.js";

// What the agent received: the identity headers the gateway named (verified by the Worker's
// onBeforeConnect/onBeforeRequest before the request got here), and every header as it came.
function received(request) {
  const names = request.headers.get("x-gateway-identity-headers");
  return {
    identity: Object.fromEntries((names ? names.split(",") : []).map((n) => [n, request.headers.get(n)])),
    headers: Object.fromEntries(request.headers),
  };
}

// Test commands, sent by clients as JSON text:
//   {"type":"whoami"}  the agent answers with the connection id and URL, and what it received
// Anything else is echoed back. onClose tells the instance's other connections how one ended.
export class CoderAgent extends Agent {
  onConnect(connection, ctx) {
    connection.setState(received(ctx.request));
  }

  onMessage(connection, message) {
    if (message === JSON.stringify({ type: "whoami" })) {
      const { identity = null, headers = null } = connection.state ?? {};
      connection.send(JSON.stringify({ type: "whoami", id: connection.id, url: connection.uri ?? null, identity, headers }));
    } else {
      connection.send(message);
    }
  }

  onClose(connection, code, reason, wasClean) {
    const report = { type: "peer_closed", id: connection.id, code, reason, wasClean };
    this.broadcast(JSON.stringify(report), [connection.id]);
  }

  // Plain HTTP: what the agent received, as JSON.
  onRequest(request) {
    return Response.json({ ...received(request), url: request.url });
  }
}

export default {
  async fetch(request, env) {
    const check = requireGatewayIdentity(env.GATEWAY_IDENTITY_KEY);
    return (
      (await routeAgentRequest(request, env, { onBeforeConnect: check, onBeforeRequest: check })) ??
      new Response("Not found", { status: 404 })
    );
  },
};
