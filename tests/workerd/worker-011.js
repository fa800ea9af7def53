// The field's self-hosted setup, on agents 0.11.x (partyserver 0.4): a fetch handler that gets
// the Durable Object stub itself, without routeAgentRequest, and forwards the request as it
// came. Only the routing headers a gateway sets (x-partykit-namespace, x-partykit-room) name
// the agent; without them partyserver fails with "Missing namespace or room headers".
import { Agent } from "agents-011";

export class CoderAgent extends Agent {
  // Echo, plus {"type":"close","code":...,"reason":...} to make the agent close.
  onMessage(connection, message) {
    if (typeof message === "string" && message.startsWith('{"type":"close"')) {
      const { code, reason } = JSON.parse(message);
      connection.close(code, reason ?? "");
    } else {
      connection.send(message);
    }
  }
}

export default {
  async fetch(request, env) {
    if (!env.OPENROUTER_API_KEY) return new Response("OPENROUTER_API_KEY is not set", { status: 500 });
    // /agents/{agent}/{instance}: one Durable Object per instance.
    const [prefix, , instance] = new URL(request.url).pathname.split("/").filter(Boolean);
    if (prefix !== "agents" || !instance) return new Response("Not found", { status: 404 });
    const stub = env.CoderAgent.get(env.CoderAgent.idFromName(decodeURIComponent(instance)));
    return stub.fetch(request);
  },
};
