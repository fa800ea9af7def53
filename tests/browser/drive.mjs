// Drives Debian's headless Chromium against the gateway, from pages on two local origins, and
// prints one JSON line per check on stdout (diagnostics go to stderr). Used by
// tests/browser_cors.rs; runnable by hand against any gateway whose [cors] policy allows the
// first origin and not the second:
//
//   node tests/browser/drive.mjs --gateway http://127.0.0.1:8080 \
//     --allowed-port 5555 --refused-port 5556
//
// - The allowed page is served on http://127.0.0.1:{allowed-port}, the refused one on
//   http://localhost:{refused-port}: two origins, both loopback (0 picks a free port; the
//   origins in use are printed by the "pages" check). The pages carry the code that talks to
//   the gateway (page.js); the driver only calls it, so every request is the browser's own,
//   with the Origin header and cookies the browser chose.
// - Checks (each line {"check": name, "ok": bool, ...evidence}):
//     browser            the browser, its version and its command line
//     pages              the two page origins
//     ws_allowed         WebSocket from the allowed page: opens, identity, echoes, clean close
//     ws_refused         WebSocket from the refused page: never opens, no message, 1006
//     fetch_allowed      credentialed GET from the allowed page: readable JSON, cookie sent
//     fetch_refused      credentialed GET from the refused page: TypeError (CORS)
//     preflight_allowed  credentialed POST with a JSON content-type (preflighted): readable
//     preflight_refused  the same from the refused page: TypeError, the preflight refused
//   and last {"check":"summary","ok":...,"failed":[...]}. Exit status 0 when every check
//   passed, 1 when one failed, 2 when the run could not happen (bad arguments, no browser).
// - What Chromium itself saw (handshake status, response headers, CORS error) comes from the
//   DevTools protocol's Network domain and is reported next to what the page saw.
//
// Options (or environment): --gateway (GATEWAY_URL), --allowed-port (ALLOWED_PORT),
// --refused-port (REFUSED_PORT), --agent (default CoderAgent), --ws-room (browser-ws),
// --refused-room (browser-refused), --fetch-room (browser-fetch), --cookie (the name=value
// the allowed page sets; a dummy, never a real session), --chromium
// (CHROMIUM, default /usr/bin/chromium), --timeout-ms per check (default 10000),
// --deadline-ms for the whole run (default 90000).

import { createServer } from 'node:http';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

const { values: opts } = parseArgs({
  options: {
    gateway: { type: 'string', default: process.env.GATEWAY_URL },
    'allowed-port': { type: 'string', default: process.env.ALLOWED_PORT ?? '0' },
    'refused-port': { type: 'string', default: process.env.REFUSED_PORT ?? '0' },
    agent: { type: 'string', default: 'CoderAgent' },
    'ws-room': { type: 'string', default: 'browser-ws' },
    'refused-room': { type: 'string', default: 'browser-refused' },
    'fetch-room': { type: 'string', default: 'browser-fetch' },
    cookie: { type: 'string', default: 'agw_browser_session=not-a-real-session-1234' },
    chromium: { type: 'string', default: process.env.CHROMIUM ?? '/usr/bin/chromium' },
    'timeout-ms': { type: 'string', default: '10000' },
    'deadline-ms': { type: 'string', default: '90000' },
  },
});

function usage(why) {
  process.stderr.write(`drive.mjs: ${why}\n`);
  process.exit(2);
}

if (!opts.gateway) usage('--gateway http://127.0.0.1:PORT (or GATEWAY_URL) is required');
const gateway = new URL(opts.gateway);
if (gateway.protocol !== 'http:') usage(`--gateway must be an http:// URL, not ${opts.gateway}`);
const gatewayHttp = gateway.origin;
const gatewayWs = `ws://${gateway.host}`;
const timeoutMs = Number(opts['timeout-ms']);
const deadlineMs = Number(opts['deadline-ms']);

/** Chromium's switches for a network-less machine. Playwright adds --headless itself (with
 * headless: true) and --user-data-dir (the fresh folder given to launchPersistentContext);
 * it refuses both in `args`, so they are listed here only to be checked on the command line. */
const REQUIRED_SWITCHES = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-quic',
];
const EXTRA_SWITCHES = [
  // No proxy, whatever the environment says: every request here is to loopback.
  '--no-proxy-server',
  '--disable-default-apps',
  '--disable-extensions',
];

const results = [];
function emit(result) {
  results.push(result);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}
function log(message) {
  process.stderr.write(`drive.mjs: ${message}\n`);
}

// ---------------------------------------------------------------------------------------
// The pages. page.js runs in the browser, in the page's origin.

const PAGE_JS = String.raw`
"use strict";
function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(what + " timed out after " + ms + " ms")), ms); }),
  ]);
}

// Opens a WebSocket, sends each of "messages" once the identity arrived, waits for their
// echoes, closes with 1000, and reports every event in order.
window.wsExchange = function (url, messages, ms) {
  const report = { url, opened: false, errored: false, messages: [], events: [],
                   close: null, protocol: null, extensions: null };
  return withTimeout(new Promise((resolve) => {
    let ws;
    try { ws = new WebSocket(url); } catch (e) { report.events.push("throw:" + e.name); resolve(report); return; }
    const expected = 1 + messages.length;
    ws.onopen = () => { report.opened = true; report.events.push("open");
                        report.protocol = ws.protocol; report.extensions = ws.extensions; };
    ws.onerror = () => { report.errored = true; report.events.push("error"); };
    ws.onmessage = (ev) => {
      report.events.push("message");
      report.messages.push(typeof ev.data === "string" ? ev.data : "[binary]");
      if (report.messages.length === 1) { for (const m of messages) ws.send(m); }
      if (report.messages.length === expected) ws.close(1000, "browser done");
    };
    ws.onclose = (ev) => {
      report.events.push("close");
      report.close = { code: ev.code, reason: ev.reason, wasClean: ev.wasClean };
      resolve(report);
    };
  }), ms, "WebSocket exchange").catch((e) => { report.timeout = String(e.message); return report; });
};

// A fetch whose outcome, success or failure, is reported rather than thrown.
window.fetchReport = async function (url, init, ms) {
  const report = { url, ok: false };
  try {
    const response = await withTimeout(fetch(url, init), ms, "fetch");
    report.status = response.status;
    report.type = response.type;
    report.content_type = response.headers.get("content-type");
    const text = await response.text();
    try { report.json = JSON.parse(text); } catch { report.text = text.slice(0, 500); }
    report.ok = true;
  } catch (e) {
    report.error = { name: e.name, message: e.message };
  }
  return report;
};

window.setCookie = function (pair) { document.cookie = pair + "; path=/; SameSite=Lax"; return document.cookie; };
`;

function pageHtml(role) {
  return `<!doctype html>
<html><head><meta charset="utf-8"><title>agent-gateway ${role} page</title>
<script src="/page.js"></script></head>
<body><p id="role">${role}</p></body></html>`;
}

function servePages(role, host, port) {
  const server = createServer((req, res) => {
    if (req.url === '/page.js') {
      res.writeHead(200, { 'content-type': 'text/javascript', 'cache-control': 'no-store' });
      res.end(PAGE_JS);
    } else if (req.url === '/' || req.url === '/index.html') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(pageHtml(role));
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    // Loopback only. "localhost" is served from 127.0.0.1: Chromium tries ::1 and 127.0.0.1.
    server.listen(port, '127.0.0.1', () => {
      const origin = `http://${host}:${server.address().port}`;
      resolve({ server, origin });
    });
  });
}

// ---------------------------------------------------------------------------------------
// What Chromium saw, from the DevTools protocol.

class NetworkLog {
  constructor() {
    this.sockets = new Map(); // requestId -> {url, request_headers, status, response_headers, error, closed}
    this.requests = new Map(); // requestId -> {url, method, status, headers, cors_error, failed, preflight}
  }

  async attach(context, page) {
    const cdp = await context.newCDPSession(page);
    await cdp.send('Network.enable');
    const socket = (id) => {
      if (!this.sockets.has(id)) this.sockets.set(id, {});
      return this.sockets.get(id);
    };
    const request = (id) => {
      if (!this.requests.has(id)) this.requests.set(id, {});
      return this.requests.get(id);
    };
    cdp.on('Network.webSocketCreated', (e) => { socket(e.requestId).url = e.url; });
    cdp.on('Network.webSocketWillSendHandshakeRequest', (e) => {
      socket(e.requestId).request_headers = lower(e.request.headers);
    });
    cdp.on('Network.webSocketHandshakeResponseReceived', (e) => {
      const s = socket(e.requestId);
      s.status = e.response.status;
      s.response_headers = lower(e.response.headers);
    });
    cdp.on('Network.webSocketFrameError', (e) => { socket(e.requestId).error = e.errorMessage; });
    cdp.on('Network.webSocketClosed', (e) => { socket(e.requestId).closed = true; });
    cdp.on('Network.requestWillBeSent', (e) => {
      const r = request(e.requestId);
      r.url = e.request.url;
      r.method = e.request.method;
      // The ExtraInfo event (with the headers the network stack added, Origin and Cookie
      // among them) may come first: its values win.
      r.request_headers = { ...lower(e.request.headers), ...(r.request_headers ?? {}) };
    });
    cdp.on('Network.requestWillBeSentExtraInfo', (e) => {
      const r = request(e.requestId);
      r.request_headers = { ...(r.request_headers ?? {}), ...lower(e.headers) };
    });
    cdp.on('Network.responseReceived', (e) => {
      const r = request(e.requestId);
      r.status = e.response.status;
      r.response_headers = { ...lower(e.response.headers), ...(r.response_headers ?? {}) };
    });
    cdp.on('Network.responseReceivedExtraInfo', (e) => {
      const r = request(e.requestId);
      r.raw_status = e.statusCode;
      r.response_headers = { ...(r.response_headers ?? {}), ...lower(e.headers) };
    });
    cdp.on('Network.loadingFailed', (e) => {
      const r = request(e.requestId);
      r.failed = e.errorText;
      if (e.corsErrorStatus) r.cors_error = e.corsErrorStatus.corsError;
      if (e.blockedReason) r.blocked_reason = e.blockedReason;
    });
    return cdp;
  }

  socketFor(url) {
    return [...this.sockets.values()].filter((s) => s.url === url).at(-1) ?? null;
  }

  requestsFor(url) {
    return [...this.requests.values()].filter((r) => r.url === url);
  }
}

/** The reference backend describes credential headers instead of echoing them: "redacted
 * len={bytes} fnv={FNV-1a 64, hex}" (agent_gateway::secrets::fingerprint). Either form is
 * accepted as proof the cookie arrived, the description only when it is the cookie's own. */
function fingerprint(value) {
  const bytes = new TextEncoder().encode(value);
  let hash = 0xcbf29ce484222325n;
  for (const b of bytes) hash = BigInt.asUintN(64, (hash ^ BigInt(b)) * 0x100000001b3n);
  return `redacted len=${bytes.length} fnv=${hash.toString(16).padStart(16, '0')}`;
}

function cookieArrived(reported, cookie) {
  return typeof reported === 'string' && (reported.includes(cookie) || reported === fingerprint(cookie));
}

function lower(headers) {
  const out = {};
  for (const [k, v] of Object.entries(headers ?? {})) out[k.toLowerCase()] = v;
  return out;
}

function pick(headers, names) {
  const out = {};
  for (const name of names) if (headers && headers[name] !== undefined) out[name] = headers[name];
  return out;
}

const CORS_HEADERS = [
  'access-control-allow-origin',
  'access-control-allow-credentials',
  'access-control-allow-methods',
  'access-control-allow-headers',
  'access-control-expose-headers',
  'access-control-max-age',
  'vary',
];

/** Waits (bounded) until `probe()` is truthy: DevTools events trail the page's own view. */
async function settle(probe, ms = 2000) {
  const until = Date.now() + ms;
  while (!probe() && Date.now() < until) await new Promise((r) => setTimeout(r, 25));
  return probe();
}

// ---------------------------------------------------------------------------------------

async function main() {
  let chromium;
  try {
    ({ chromium } = require('playwright-core'));
  } catch (e) {
    usage(`playwright-core is not installed (run tests/browser/setup.sh): ${e.message}`);
  }
  const { version: playwrightVersion } = require('playwright-core/package.json');

  const allowed = await servePages('allowed', '127.0.0.1', Number(opts['allowed-port']));
  const refused = await servePages('refused', 'localhost', Number(opts['refused-port']));
  emit({ check: 'pages', ok: true, allowed_origin: allowed.origin, refused_origin: refused.origin });

  const userDataDir = mkdtempSync(join(tmpdir(), 'agent-gateway-chromium-'));
  let context;
  const cleanup = async () => {
    try { await context?.close(); } catch { /* already gone */ }
    allowed.server.close();
    refused.server.close();
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
      args: [...REQUIRED_SWITCHES.filter((s) => s !== '--headless'), ...EXTRA_SWITCHES],
      timeout: 30000,
      // Nothing in the page needs them; keeps the run free of surprises.
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
    await runChecks(context, { allowed, refused, userDataDir, playwrightVersion });
  } catch (e) {
    emit({ check: 'driver', ok: false, error: String(e?.stack ?? e) });
  }
  clearTimeout(watchdog);
  const failed = results.filter((r) => !r.ok).map((r) => r.check);
  emit({ check: 'summary', ok: failed.length === 0, failed, checks: results.length });
  await Promise.race([cleanup(), new Promise((r) => setTimeout(r, 5000))]);
  process.exit(failed.length === 0 ? 0 : 1);
}

async function runChecks(context, { allowed, refused, userDataDir, playwrightVersion }) {
  const agent = opts.agent;
  const wsRoom = opts['ws-room'];
  const refusedRoom = opts['refused-room'];
  const fetchRoom = opts['fetch-room'];

  // The browser: version and the command line it runs with, from the DevTools protocol.
  const first = context.pages()[0] ?? (await context.newPage());
  const browserCdp = await context.newCDPSession(first);
  const version = await browserCdp.send('Browser.getVersion');
  let commandLine = null;
  let commandLineSource = 'Browser.getBrowserCommandLine';
  try {
    commandLine = (await browserCdp.send('Browser.getBrowserCommandLine')).arguments;
  } catch {
    commandLineSource = 'chrome://version';
    // Chromium answers only with --enable-automation; fall back to chrome://version.
    try {
      await first.goto('chrome://version', { timeout: timeoutMs });
      const text = await first.locator('#command_line').innerText({ timeout: timeoutMs });
      commandLine = text.split(/\s+(?=--)/);
    } catch (e) {
      commandLine = [`unavailable: ${e.message.split('\n')[0]}`];
    }
  }
  const missing = REQUIRED_SWITCHES.filter(
    (s) => !commandLine.some((a) => a === s || a.startsWith(`${s}=`)),
  );
  const dirSwitch = commandLine.find((a) => a.startsWith('--user-data-dir='));
  emit({
    check: 'browser',
    ok: missing.length === 0 && dirSwitch === `--user-data-dir=${userDataDir}`,
    product: version.product,
    user_agent: version.userAgent,
    playwright_core: playwrightVersion,
    user_data_dir: dirSwitch ?? null,
    missing_switches: missing,
    command_line_source: commandLineSource,
    command_line: commandLine,
  });

  // One log per page: what each origin's page sent and got, as Chromium's network stack saw it.
  const allowedPage = await context.newPage();
  const refusedPage = await context.newPage();
  const allowedNet = new NetworkLog();
  const refusedNet = new NetworkLog();
  await allowedNet.attach(context, allowedPage);
  await refusedNet.attach(context, refusedPage);
  for (const [page, pages] of [[allowedPage, allowed], [refusedPage, refused]]) {
    const response = await page.goto(`${pages.origin}/`, { timeout: timeoutMs });
    if (!response || response.status() !== 200) {
      throw new Error(`page ${pages.origin}/ answered ${response?.status()}`);
    }
  }
  await first.close();

  // A cookie on the allowed page's host (127.0.0.1, any port: cookies ignore ports), so a
  // credentialed request to the gateway at 127.0.0.1 carries it.
  const cookie = opts.cookie;
  await allowedPage.evaluate((pair) => window.setCookie(pair), cookie);

  // 1. WebSocket from the allowed origin.
  {
    const url = `${gatewayWs}/agents/${agent}/${wsRoom}`;
    const sent = ['hello from the browser', JSON.stringify({ type: 'chat', text: 'second message' })];
    const page = await allowedPage.evaluate(([u, m, ms]) => window.wsExchange(u, m, ms), [url, sent, timeoutMs]);
    await settle(() => allowedNet.socketFor(url)?.closed);
    const seen = allowedNet.socketFor(url);
    let identity = null;
    try { identity = JSON.parse(page.messages[0]); } catch { /* reported as null */ }
    const echoes = page.messages.slice(1);
    const ok =
      page.opened &&
      !page.errored &&
      identity?.type === 'cf_agent_identity' &&
      identity?.name === wsRoom &&
      JSON.stringify(echoes) === JSON.stringify(sent) &&
      page.close?.code === 1000 &&
      page.close?.wasClean === true &&
      seen?.status === 101 &&
      seen?.request_headers?.origin === allowed.origin;
    emit({
      check: 'ws_allowed', ok, origin: allowed.origin, url,
      opened: page.opened, errored: page.errored, identity, sent, echoes,
      close: page.close, events: page.events, timeout: page.timeout ?? null,
      handshake: seen && {
        status: seen.status ?? null,
        origin_sent: seen.request_headers?.origin ?? null,
        cors_headers: pick(seen.response_headers, CORS_HEADERS),
      },
    });
  }

  // 2. WebSocket from the refused origin: the handshake is refused, nothing gets through.
  {
    const url = `${gatewayWs}/agents/${agent}/${refusedRoom}`;
    const page = await refusedPage.evaluate(([u, ms]) => window.wsExchange(u, ['must never arrive'], ms), [url, timeoutMs]);
    await settle(() => refusedNet.socketFor(url)?.status !== undefined || refusedNet.socketFor(url)?.error);
    const seen = refusedNet.socketFor(url);
    // Chromium reports a refused handshake as a frame error naming the status.
    const refusedStatus = seen?.status ?? Number(/response code: (\d+)/.exec(seen?.error ?? '')?.[1] ?? NaN);
    const ok =
      !page.opened &&
      page.errored &&
      page.messages.length === 0 &&
      page.close?.code === 1006 &&
      page.close?.wasClean === false &&
      seen?.request_headers?.origin === refused.origin &&
      refusedStatus === 403;
    emit({
      check: 'ws_refused', ok, origin: refused.origin, url,
      opened: page.opened, errored: page.errored, messages: page.messages,
      close: page.close, events: page.events, timeout: page.timeout ?? null,
      handshake: seen && {
        status: Number.isNaN(refusedStatus) ? null : refusedStatus,
        origin_sent: seen.request_headers?.origin ?? null,
        error: seen.error ?? null,
        cors_headers: pick(seen.response_headers, CORS_HEADERS),
      },
    });
  }

  // 3. Credentialed GET from the allowed origin: the page reads the backend's JSON.
  const fetchUrl = `${gatewayHttp}/agents/${agent}/${fetchRoom}/info?from=browser`;
  {
    const page = await allowedPage.evaluate(
      ([u, ms]) => window.fetchReport(u, { credentials: 'include' }, ms), [fetchUrl, timeoutMs]);
    await settle(() => allowedNet.requestsFor(fetchUrl).some(
      (r) => r.failed || (r.status !== undefined && r.response_headers?.['access-control-allow-origin'])));
    const seen = allowedNet.requestsFor(fetchUrl).at(-1);
    const json = page.json ?? {};
    const ok =
      page.ok &&
      page.status === 200 &&
      page.type === 'cors' &&
      json.agent === 'coder-agent' &&
      json.room === fetchRoom &&
      json.method === 'GET' &&
      json.headers?.origin === allowed.origin &&
      cookieArrived(json.headers?.cookie, cookie) &&
      seen?.response_headers?.['access-control-allow-origin'] === allowed.origin &&
      seen?.response_headers?.['access-control-allow-credentials'] === 'true';
    emit({
      check: 'fetch_allowed', ok, origin: allowed.origin, url: fetchUrl,
      status: page.status ?? null, type: page.type ?? null, error: page.error ?? null,
      backend_saw: page.json && {
        agent: json.agent, room: json.room, method: json.method, path: json.path,
        origin: json.headers?.origin ?? null, cookie: json.headers?.cookie ?? null,
      },
      response_cors_headers: pick(seen?.response_headers, CORS_HEADERS),
    });
  }

  // 4. The same GET from the refused origin: the browser keeps the answer from the page.
  {
    const page = await refusedPage.evaluate(
      ([u, ms]) => window.fetchReport(u, { credentials: 'include' }, ms), [fetchUrl, timeoutMs]);
    // The Origin header is only in requestWillBeSentExtraInfo, which may trail the failure.
    await settle(() => refusedNet.requestsFor(fetchUrl).some((r) => r.cors_error && r.request_headers?.origin));
    const seen = refusedNet.requestsFor(fetchUrl).at(-1);
    const ok =
      !page.ok &&
      page.error?.name === 'TypeError' &&
      seen?.request_headers?.origin === refused.origin &&
      seen?.cors_error === 'MissingAllowOriginHeader' &&
      !Object.keys(seen?.response_headers ?? {}).some((h) => h.startsWith('access-control-'));
    emit({
      check: 'fetch_refused', ok, origin: refused.origin, url: fetchUrl,
      error: page.error ?? null, origin_sent: seen?.request_headers?.origin ?? null,
      status_seen_by_browser: seen?.status ?? seen?.raw_status ?? null,
      cors_error: seen?.cors_error ?? null, failed: seen?.failed ?? null,
      response_cors_headers: pick(seen?.response_headers, CORS_HEADERS),
    });
  }

  // 5. A preflighted credentialed POST (a JSON content-type is not CORS-safelisted): the
  //    gateway answers the OPTIONS itself, then the POST goes through.
  const postUrl = `${gatewayHttp}/agents/${agent}/${fetchRoom}/messages`;
  const postInit = {
    method: 'POST',
    credentials: 'include',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ text: 'hello' }),
  };
  {
    const page = await allowedPage.evaluate(
      ([u, init, ms]) => window.fetchReport(u, init, ms), [postUrl, postInit, timeoutMs]);
    // The preflight's events come from the network service and may trail the POST's.
    await settle(() => {
      const seen = allowedNet.requestsFor(postUrl);
      return seen.some((r) => r.method === 'POST' && (r.status !== undefined || r.failed)) &&
        seen.some((r) => r.method === 'OPTIONS' && r.status !== undefined);
    });
    const json = page.json ?? {};
    const preflight = allowedNet.requestsFor(postUrl).find((r) => r.method === 'OPTIONS') ?? null;
    const ok =
      page.ok &&
      page.status === 200 &&
      json.method === 'POST' &&
      json.room === fetchRoom &&
      json.headers?.['content-type'] === 'application/json' &&
      json.headers?.origin === allowed.origin;
    emit({
      check: 'preflight_allowed', ok, origin: allowed.origin, url: postUrl,
      status: page.status ?? null, error: page.error ?? null,
      backend_saw: page.json && { method: json.method, room: json.room, content_type: json.headers?.['content-type'] ?? null },
      preflight_seen_by_devtools: preflight && {
        status: preflight.status ?? null,
        cors_headers: pick(preflight.response_headers, CORS_HEADERS),
      },
    });
  }

  // 6. The same POST from the refused origin: the preflight is refused, the POST never sent.
  {
    const page = await refusedPage.evaluate(
      ([u, init, ms]) => window.fetchReport(u, init, ms), [postUrl, postInit, timeoutMs]);
    await settle(() => {
      const seen = refusedNet.requestsFor(postUrl);
      return seen.some((r) => r.method === 'POST' && r.failed) &&
        seen.some((r) => r.method === 'OPTIONS' && r.status !== undefined);
    });
    const mine = refusedNet.requestsFor(postUrl);
    const seen = mine.find((r) => r.method === 'POST') ?? null;
    const options = mine.find((r) => r.method === 'OPTIONS');
    const ok =
      !page.ok &&
      page.error?.name === 'TypeError' &&
      options?.status === 403 &&
      (seen?.cors_error ?? '').startsWith('Preflight') &&
      seen?.status === undefined;
    emit({
      check: 'preflight_refused', ok, origin: refused.origin, url: postUrl,
      error: page.error ?? null, cors_error: seen?.cors_error ?? null, failed: seen?.failed ?? null,
      devtools_requests: mine.map((r) => ({
        method: r.method ?? null, status: r.status ?? null, cors_error: r.cors_error ?? null, failed: r.failed ?? null,
      })),
    });
  }
}

main().catch((e) => {
  process.stderr.write(`drive.mjs: ${e?.stack ?? e}\n`);
  process.exit(2);
});
