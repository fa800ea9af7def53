// Drives Debian's headless Chromium against a gateway whose agent needs a credential taken
// from a cookie (`cookie:session`) or a WebSocket subprotocol entry (`protocol:bearer.`), and
// prints one JSON line per check on stdout (diagnostics go to stderr). Used by
// tests/browser_auth.rs; runnable by hand:
//
//   AUTH_TOKEN=eyJ... node tests/browser/drive-auth.mjs --gateway http://127.0.0.1:8080 --page-port 5555
//
// The page is served on http://127.0.0.1:{page-port} (an origin the gateway's [cors] allows)
// and opens every WebSocket itself, so each handshake is the browser's own. Checks (each line
// {"check": name, "ok": bool, ...evidence}):
//   browser       the browser and its version
//   no_cookie     no cookie, no protocol: the handshake is refused (401; Chromium reports the
//                 Bearer challenge it cannot answer as "HTTP Authentication failed"), 1006
//   cookie        the session cookie (set for the gateway's origin with addCookies): opens,
//                 the agent's identity frame arrives, clean close
//   protocol      no cookie, protocols ['chat', 'bearer.<token>']: opens, ws.protocol 'chat'
//   summary       {"failed": [...]}
// The token (AUTH_TOKEN) is never printed: evidence says whether it was sent, not what it was.
// Exit status 0 when every check passed, 1 when one failed, 2 when the run could not happen.
//
// Options: --gateway, --page-port (0: any), --room (default browser-auth), --agent
// (CoderAgent), --chromium (CHROMIUM, default /usr/bin/chromium), --timeout-ms per check
// (10000), --deadline-ms for the whole run (60000).

import { parseArgs } from 'node:util';
import { NetworkLog, handshakeStatus, reporter, runBrowser, servePage, settle } from './harness.mjs';

const { values: opts } = parseArgs({
  options: {
    gateway: { type: 'string' },
    'page-port': { type: 'string', default: '0' },
    room: { type: 'string', default: 'browser-auth' },
    agent: { type: 'string', default: 'CoderAgent' },
    chromium: { type: 'string', default: process.env.CHROMIUM ?? '/usr/bin/chromium' },
    'timeout-ms': { type: 'string', default: '10000' },
    'deadline-ms': { type: 'string', default: '60000' },
  },
});

const driver = reporter('drive-auth.mjs');
const { emit, usage } = driver;

if (!opts.gateway) usage('--gateway http://127.0.0.1:PORT is required');
const token = process.env.AUTH_TOKEN;
if (!token) usage('AUTH_TOKEN (the credential to present) is required');
const gateway = new URL(opts.gateway);
if (gateway.protocol !== 'http:') usage(`--gateway must be an http:// URL, not ${opts.gateway}`);
const gatewayWs = `ws://${gateway.host}`;
const timeoutMs = Number(opts['timeout-ms']);
const redact = (text) => text.split(token).join('[token]');

/** What Chromium sent and got, with the token replaced by its presence. */
function evidence(seen) {
  if (!seen) return null;
  const offered = seen.request_headers?.['sec-websocket-protocol'] ?? '';
  return {
    status: handshakeStatus(seen),
    // A 401 with a WWW-Authenticate challenge is reported as an authentication failure.
    error: seen.error ?? null,
    origin_sent: seen.request_headers?.origin ?? null,
    offered_protocols: offered ? offered.split(/,\s*/).map((p) => (p === `bearer.${token}` ? 'bearer.[token]' : p)) : [],
    answered_protocol: seen.response_headers?.['sec-websocket-protocol'] ?? null,
    www_authenticate: seen.response_headers?.['www-authenticate'] ?? null,
  };
}

function identityOf(report) {
  try {
    return JSON.parse(report.messages[0]);
  } catch {
    return null;
  }
}

async function main() {
  const page = await servePage('auth', '127.0.0.1', Number(opts['page-port']));
  await runBrowser({
    driver, opts, servers: [page.server], redact,
    checks: (context) => runChecks(context, page.origin),
  });
}

async function runChecks(context, origin) {
  const tab = context.pages()[0] ?? (await context.newPage());
  const version = await (await context.newCDPSession(tab)).send('Browser.getVersion');
  emit({ check: 'browser', ok: version.product.startsWith('Chrome/'), product: version.product, page_origin: origin });

  const handshakes = new NetworkLog();
  await handshakes.attach(context, tab);
  const response = await tab.goto(`${origin}/`, { timeout: timeoutMs });
  if (response?.status() !== 200) throw new Error(`page ${origin}/ answered ${response?.status()}`);

  const room = opts.room;
  // The cookies the browser holds for the gateway's origin (DevTools does not show the Cookie
  // header of a WebSocket handshake; the backend reports what arrived).
  const jar = async () => (await context.cookies(opts.gateway)).map((c) => ({
    name: c.name, is_token: c.value === token, domain: c.domain, http_only: c.httpOnly,
  }));
  const open = async (name, protocols) => {
    const cookies = await jar();
    const url = `${gatewayWs}/agents/${opts.agent}/${room}-${name}`;
    const report = await tab.evaluate(([u, p, ms]) => window.wsExchange(u, [], ms, p), [url, protocols, timeoutMs]);
    await settle(() => {
      const seen = handshakes.socketFor(url);
      return seen && (seen.closed || seen.error) && (seen.status !== undefined || seen.error);
    });
    return { url, report, seen: evidence(handshakes.socketFor(url)), cookies };
  };

  // 1. No credential: the gateway answers 401, which the page sees only as a failed socket.
  {
    const { url, report, seen, cookies } = await open('none', []);
    const refused = seen?.status === 401 || /^HTTP Authentication failed/.test(seen?.error ?? '');
    const ok = !report.opened && report.errored && report.messages.length === 0 &&
      report.close?.code === 1006 && refused && cookies.length === 0 && seen.origin_sent === origin;
    emit({ check: 'no_cookie', ok, url, ...report, handshake: seen, cookies });
  }

  // 2. The session cookie, set for the gateway's origin before the page opens the socket.
  await context.addCookies([{ name: 'session', value: token, url: opts.gateway, sameSite: 'Lax' }]);
  {
    const { url, report, seen, cookies } = await open('cookie', []);
    const identity = identityOf(report);
    const ok = report.opened && !report.errored && identity?.type === 'cf_agent_identity' &&
      identity?.name === `${room}-cookie` && report.close?.code === 1000 && seen?.status === 101 &&
      seen.offered_protocols.length === 0 && cookies.length === 1 && cookies[0].is_token;
    emit({ check: 'cookie', ok, url, ...report, identity, handshake: seen, cookies });
  }

  // 3. No cookie; the token as a subprotocol entry next to the application's own protocol.
  await context.clearCookies();
  {
    const { url, report, seen, cookies } = await open('protocol', ['chat', `bearer.${token}`]);
    const identity = identityOf(report);
    const ok = report.opened && report.protocol === 'chat' && identity?.type === 'cf_agent_identity' &&
      identity?.name === `${room}-protocol` && report.close?.code === 1000 && seen?.status === 101 &&
      cookies.length === 0 && seen.answered_protocol === 'chat';
    emit({ check: 'protocol', ok, url, ...report, identity, handshake: seen, cookies });
  }
}

main().catch((e) => {
  process.stderr.write(`drive-auth.mjs: ${redact(String(e?.stack ?? e))}\n`);
  process.exit(2);
});
