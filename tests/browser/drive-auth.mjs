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

import { createServer } from 'node:http';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

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

function usage(why) {
  process.stderr.write(`drive-auth.mjs: ${why}\n`);
  process.exit(2);
}

if (!opts.gateway) usage('--gateway http://127.0.0.1:PORT is required');
const token = process.env.AUTH_TOKEN;
if (!token) usage('AUTH_TOKEN (the credential to present) is required');
const gateway = new URL(opts.gateway);
if (gateway.protocol !== 'http:') usage(`--gateway must be an http:// URL, not ${opts.gateway}`);
const gatewayWs = `ws://${gateway.host}`;
const timeoutMs = Number(opts['timeout-ms']);
const deadlineMs = Number(opts['deadline-ms']);

// As in drive.mjs: Chromium on a machine without network.
const SWITCHES = [
  '--no-sandbox',
  '--disable-gpu',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-quic',
  '--no-proxy-server',
  '--disable-default-apps',
  '--disable-extensions',
];

const results = [];
function emit(result) {
  results.push(result);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

// The page's code: opens a WebSocket (with `protocols`), waits for the first message, closes
// with 1000, and reports every event in order.
const PAGE_JS = String.raw`
"use strict";
window.wsFirstMessage = function (url, protocols, ms) {
  const report = { opened: false, errored: false, messages: [], events: [], close: null, protocol: null };
  return new Promise((resolve) => {
    const timer = setTimeout(() => { report.timeout = true; resolve(report); }, ms);
    const done = () => { clearTimeout(timer); resolve(report); };
    let ws;
    try { ws = new WebSocket(url, protocols); } catch (e) { report.events.push("throw:" + e.name); done(); return; }
    ws.onopen = () => { report.opened = true; report.protocol = ws.protocol; report.events.push("open"); };
    ws.onerror = () => { report.errored = true; report.events.push("error"); };
    ws.onmessage = (ev) => {
      report.events.push("message");
      report.messages.push(typeof ev.data === "string" ? ev.data : "[binary]");
      if (report.messages.length === 1) ws.close(1000, "browser done");
    };
    ws.onclose = (ev) => {
      report.events.push("close");
      report.close = { code: ev.code, reason: ev.reason, wasClean: ev.wasClean };
      done();
    };
  });
};
`;

function servePage(port) {
  const server = createServer((req, res) => {
    if (req.url === '/page.js') {
      res.writeHead(200, { 'content-type': 'text/javascript', 'cache-control': 'no-store' });
      res.end(PAGE_JS);
    } else if (req.url === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end('<!doctype html><html><head><meta charset="utf-8"><title>agent-gateway auth page</title>' +
        '<script src="/page.js"></script></head><body></body></html>');
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve({ server, origin: `http://127.0.0.1:${server.address().port}` }));
  });
}

// The WebSocket handshakes as Chromium's network stack saw them (DevTools protocol).
class Handshakes {
  constructor() {
    this.sockets = new Map();
  }

  async attach(context, page) {
    const cdp = await context.newCDPSession(page);
    await cdp.send('Network.enable');
    const socket = (id) => {
      if (!this.sockets.has(id)) this.sockets.set(id, {});
      return this.sockets.get(id);
    };
    cdp.on('Network.webSocketCreated', (e) => { socket(e.requestId).url = e.url; });
    cdp.on('Network.webSocketWillSendHandshakeRequest', (e) => { socket(e.requestId).request = lower(e.request.headers); });
    cdp.on('Network.webSocketHandshakeResponseReceived', (e) => {
      const s = socket(e.requestId);
      s.status = e.response.status;
      s.response = lower(e.response.headers);
      // The request headers as sent (Cookie included) come with the response, when Chromium has them.
      if (e.response.requestHeaders) s.request = { ...(s.request ?? {}), ...lower(e.response.requestHeaders) };
    });
    cdp.on('Network.webSocketFrameError', (e) => { socket(e.requestId).error = e.errorMessage; });
    cdp.on('Network.webSocketClosed', (e) => { socket(e.requestId).closed = true; });
  }

  for(url) {
    return [...this.sockets.values()].filter((s) => s.url === url).at(-1) ?? null;
  }
}

function lower(headers) {
  const out = {};
  for (const [k, v] of Object.entries(headers ?? {})) out[k.toLowerCase()] = v;
  return out;
}

/** Waits (bounded) until `probe()` is truthy: DevTools events trail the page's own view. */
async function settle(probe, ms = 2000) {
  const until = Date.now() + ms;
  while (!probe() && Date.now() < until) await new Promise((r) => setTimeout(r, 25));
  return probe();
}

/** What Chromium sent and got, with the token replaced by its presence. */
function evidence(seen) {
  if (!seen) return null;
  const status = seen.status ?? Number(/response code: (\d+)/.exec(seen.error ?? '')?.[1] ?? NaN);
  const offered = seen.request?.['sec-websocket-protocol'] ?? '';
  return {
    status: Number.isNaN(status) ? null : status,
    // A 401 with a WWW-Authenticate challenge is reported as an authentication failure.
    error: seen.error ?? null,
    origin_sent: seen.request?.origin ?? null,
    offered_protocols: offered ? offered.split(/,\s*/).map((p) => (p === `bearer.${token}` ? 'bearer.[token]' : p)) : [],
    answered_protocol: seen.response?.['sec-websocket-protocol'] ?? null,
    www_authenticate: seen.response?.['www-authenticate'] ?? null,
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
  let chromium;
  try {
    ({ chromium } = require('playwright-core'));
  } catch (e) {
    usage(`playwright-core is not installed (run tests/browser/setup.sh): ${e.message}`);
  }
  const page = await servePage(Number(opts['page-port']));
  const userDataDir = mkdtempSync(join(tmpdir(), 'agent-gateway-chromium-auth-'));
  let context;
  const cleanup = async () => {
    try { await context?.close(); } catch { /* already gone */ }
    page.server.close();
    rmSync(userDataDir, { recursive: true, force: true });
  };
  const watchdog = setTimeout(async () => {
    emit({ check: 'summary', ok: false, failed: ['deadline'], error: `the run took over ${deadlineMs} ms` });
    await Promise.race([cleanup(), new Promise((r) => setTimeout(r, 3000))]);
    process.exit(1);
  }, deadlineMs);

  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: opts.chromium,
      headless: true,
      args: SWITCHES,
      timeout: 30000,
      serviceWorkers: 'block',
      acceptDownloads: false,
    });
  } catch (e) {
    emit({ check: 'browser', ok: false, error: e.message.split('\n').slice(0, 12).join('\n') });
    clearTimeout(watchdog);
    await cleanup();
    process.exit(2);
  }
  context.setDefaultTimeout(timeoutMs);
  try {
    await runChecks(context, page.origin);
  } catch (e) {
    emit({ check: 'driver', ok: false, error: String(e?.stack ?? e).split(token).join('[token]') });
  }
  clearTimeout(watchdog);
  const failed = results.filter((r) => !r.ok).map((r) => r.check);
  emit({ check: 'summary', ok: failed.length === 0, failed, checks: results.length });
  await Promise.race([cleanup(), new Promise((r) => setTimeout(r, 5000))]);
  process.exit(failed.length === 0 ? 0 : 1);
}

async function runChecks(context, origin) {
  const tab = context.pages()[0] ?? (await context.newPage());
  const version = await (await context.newCDPSession(tab)).send('Browser.getVersion');
  emit({ check: 'browser', ok: version.product.startsWith('Chrome/'), product: version.product, page_origin: origin });

  const handshakes = new Handshakes();
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
    const report = await tab.evaluate(([u, p, ms]) => window.wsFirstMessage(u, p, ms), [url, protocols, timeoutMs]);
    await settle(() => {
      const seen = handshakes.for(url);
      return seen && (seen.closed || seen.error) && (seen.status !== undefined || seen.error);
    });
    return { url, report, seen: evidence(handshakes.for(url)), cookies };
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
  process.stderr.write(`drive-auth.mjs: ${String(e?.stack ?? e).split(token).join('[token]')}\n`);
  process.exit(2);
});
