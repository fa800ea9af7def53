// Verifies the identity agent-gateway sends a Worker (a policy with `identity_headers` and
// `sign_with`), so that a request that reached the Worker without the gateway is refused.
// The signature is HMAC-SHA256, keyed by the `sign_with` secret, over (each line ends in \n):
//
//   agent-gateway-identity-v1
//   {x-gateway-identity-timestamp}
//   {agent: the URL segment after /agents/}
//   {instance: the segment after it}
//   {name}:{value}            one line per header named in x-gateway-identity-headers, in order
//
// sent as lowercase hex in x-gateway-identity-signature. The agent and instance are taken as
// they appear in the URL the Worker got (routeAgentRequest reads them from there too).
//
// Use:
//   import { requireGatewayIdentity } from "./gateway-identity.js";
//   export default {
//     async fetch(request, env) {
//       const check = requireGatewayIdentity(env.GATEWAY_IDENTITY_KEY);
//       return (await routeAgentRequest(request, env, { onBeforeConnect: check, onBeforeRequest: check }))
//         ?? new Response("Not found", { status: 404 });
//     },
//   };
// The agent then reads the identity headers (x-user-id, ...) from the request it gets
// (onConnect's ctx.request, onRequest's request); only those named in
// x-gateway-identity-headers are covered by the signature.

const VERSION = "agent-gateway-identity-v1";
const encoder = new TextEncoder();

/**
 * The verified identity of `request` ({header name: value} for each signed identity header),
 * or null when it is unsigned, forged, altered, for another agent or instance, or older than
 * `maxAgeSeconds` (also refused: a timestamp that far in the future). `prefix` is the first
 * path segment of agent URLs.
 */
export async function verifyGatewayIdentity(request, secret, { maxAgeSeconds = 60, prefix = "agents" } = {}) {
  if (!secret) return null; // fail closed when the Worker's secret is missing
  const h = request.headers;
  const signature = h.get("x-gateway-identity-signature") ?? "";
  const timestamp = h.get("x-gateway-identity-timestamp") ?? "";
  const names = h.get("x-gateway-identity-headers");
  if (!/^[0-9a-f]{64}$/.test(signature) || !/^[0-9]{1,12}$/.test(timestamp) || names === null) return null;
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > maxAgeSeconds) return null;

  // /agents/{agent}/{instance}[/...]: the segments as the URL carries them.
  const [, first, agent, instance] = new URL(request.url).pathname.split("/");
  if (first !== prefix || !agent || !instance) return null;

  const identity = {};
  let text = `${VERSION}\n${timestamp}\n${agent}\n${instance}\n`;
  for (const name of names === "" ? [] : names.split(",")) {
    const value = h.get(name);
    if (value === null || Object.hasOwn(identity, name)) return null;
    identity[name] = value;
    text += `${name}:${value}\n`;
  }

  // Recompute the HMAC and compare it with the one sent, in time independent of where they differ.
  const key = await crypto.subtle.importKey("raw", encoder.encode(secret), { name: "HMAC", hash: "SHA-256" }, false, [
    "sign",
  ]);
  // workerd reads header bytes as UTF-8, which is what the gateway sends: encoded back alike.
  const expected = new Uint8Array(await crypto.subtle.sign("HMAC", key, encoder.encode(text)));
  let difference = 0;
  for (let i = 0; i < expected.length; i++) {
    difference |= expected[i] ^ parseInt(signature.slice(2 * i, 2 * i + 2), 16);
  }
  if (difference !== 0) return null;
  return identity;
}

/** An onBeforeConnect / onBeforeRequest callback: 401 unless the gateway's identity verifies. */
export function requireGatewayIdentity(secret, options) {
  return async (request) => {
    if ((await verifyGatewayIdentity(request, secret, options)) === null) {
      return new Response("Unauthorized: no valid gateway identity", { status: 401 });
    }
  };
}
