// What the browser drivers (drive.mjs, drive-auth.mjs) share: their JSON lines, Chromium's
// switches and its launch with a watchdog, the page's code and the server of the page, and
// what Chromium's network stack saw of each request and WebSocket (DevTools protocol).

import { createServer } from 'node:http';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

/** Chromium's switches for a network-less machine. Playwright adds --headless itself (with
 * headless: true) and --user-data-dir (the fresh folder given to launchPersistentContext);
 * it refuses both in `args`, so they are listed here only to be checked on the command line. */
export const REQUIRED_SWITCHES = [
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

/** The driver `name`'s report: one JSON line per check on stdout, diagnostics on stderr. */
export function reporter(name) {
  const results = [];
  return {
    results,
    emit(result) {
      results.push(result);
      process.stdout.write(`${JSON.stringify(result)}\n`);
    },
    log(message) {
      process.stderr.write(`${name}: ${message}\n`);
    },
    /** The run cannot happen: exit status 2. */
    usage(why) {
      process.stderr.write(`${name}: ${why}\n`);
      process.exit(2);
    },
  };
}

/** The page's code, run in the browser in the page's origin. */
export const PAGE_JS = String.raw`
"use strict";
function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(what + " timed out after " + ms + " ms")), ms); }),
  ]);
}

// Opens a WebSocket (offering "protocols"), sends each of "messages" once the identity
// arrived, waits for their echoes, closes with 1000, and reports every event in order.
window.wsExchange = function (url, messages, ms, protocols = []) {
  const report = { url, opened: false, errored: false, messages: [], events: [],
                   close: null, protocol: null, extensions: null };
  return withTimeout(new Promise((resolve) => {
    let ws;
    try { ws = new WebSocket(url, protocols); } catch (e) { report.events.push("throw:" + e.name); resolve(report); return; }
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

/** Serves a page (`role` names it) and PAGE_JS on 127.0.0.1:`port` (0: any), as the origin
 * http://`host`:port. "localhost" is served from 127.0.0.1 too: Chromium tries ::1 and
 * 127.0.0.1. */
export function servePage(role, host, port) {
  const html = `<!doctype html>
<html><head><meta charset="utf-8"><title>agent-gateway ${role} page</title>
<script src="/page.js"></script></head>
<body><p id="role">${role}</p></body></html>`;
  const server = createServer((req, res) => {
    if (req.url === '/page.js') {
      res.writeHead(200, { 'content-type': 'text/javascript', 'cache-control': 'no-store' });
      res.end(PAGE_JS);
    } else if (req.url === '/' || req.url === '/index.html') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end(html);
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' });
      res.end('not found');
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve({ server, origin: `http://${host}:${server.address().port}` }));
  });
}

export function lower(headers) {
  const out = {};
  for (const [k, v] of Object.entries(headers ?? {})) out[k.toLowerCase()] = v;
  return out;
}

/** Waits (bounded) until `probe()` is truthy: DevTools events trail the page's own view. */
export async function settle(probe, ms = 2000) {
  const until = Date.now() + ms;
  while (!probe() && Date.now() < until) await new Promise((r) => setTimeout(r, 25));
  return probe();
}

/** What Chromium saw of one page's WebSockets and requests, from the DevTools protocol. */
export class NetworkLog {
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
      const s = socket(e.requestId);
      s.request_headers = { ...(s.request_headers ?? {}), ...lower(e.request.headers) };
    });
    cdp.on('Network.webSocketHandshakeResponseReceived', (e) => {
      const s = socket(e.requestId);
      s.status = e.response.status;
      s.response_headers = lower(e.response.headers);
      // The request headers as sent (Cookie included) come with the response, when Chromium has them.
      if (e.response.requestHeaders) s.request_headers = { ...(s.request_headers ?? {}), ...lower(e.response.requestHeaders) };
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

/** Chromium refuses a handshake with a frame error naming the status when it has no response
 * event for it: the status either way, or null. */
export function handshakeStatus(seen) {
  const status = seen?.status ?? Number(/response code: (\d+)/.exec(seen?.error ?? '')?.[1] ?? NaN);
  return Number.isNaN(status) ? null : status;
}

/**
 * Launches Chromium (opts.chromium) in a fresh profile folder and runs `checks(context,
 * { userDataDir, playwrightVersion })`, bounded by opts['deadline-ms'], then emits the summary and exits: 0 when
 * every check passed, 1 when one failed, 2 when the browser would not start. `servers` are
 * closed at the end; `redact` cleans an error's text before it is printed.
 */
export async function runBrowser({ driver, opts, servers, checks, redact = (text) => text }) {
  let chromium;
  let playwrightVersion;
  try {
    ({ chromium } = require('playwright-core'));
    ({ version: playwrightVersion } = require('playwright-core/package.json'));
  } catch (e) {
    driver.usage(`playwright-core is not installed (run tests/browser/setup.sh): ${e.message}`);
  }
  const { emit, results } = driver;
  const deadlineMs = Number(opts['deadline-ms']);
  const userDataDir = mkdtempSync(join(tmpdir(), 'agent-gateway-chromium-'));
  let context;
  const cleanup = async () => {
    try { await context?.close(); } catch { /* already gone */ }
    for (const server of servers) server.close();
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
  context.setDefaultTimeout(Number(opts['timeout-ms']));

  try {
    await checks(context, { userDataDir, playwrightVersion });
  } catch (e) {
    emit({ check: 'driver', ok: false, error: redact(String(e?.stack ?? e)) });
  }
  clearTimeout(watchdog);
  const failed = results.filter((r) => !r.ok).map((r) => r.check);
  emit({ check: 'summary', ok: failed.length === 0, failed, checks: results.length });
  await Promise.race([cleanup(), new Promise((r) => setTimeout(r, 5000))]);
  process.exit(failed.length === 0 ? 0 : 1);
}
