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

import { parseArgs } from 'node:util';
import {
  NetworkLog, REQUIRED_SWITCHES, handshakeStatus, reporter, runBrowser, servePage, settle,
} from './harness.mjs';

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

const driver = reporter('drive.mjs');
const { emit, usage } = driver;

if (!opts.gateway) usage('--gateway http://127.0.0.1:PORT (or GATEWAY_URL) is required');
const gateway = new URL(opts.gateway);
if (gateway.protocol !== 'http:') usage(`--gateway must be an http:// URL, not ${opts.gateway}`);
const gatewayHttp = gateway.origin;
const gatewayWs = `ws://${gateway.host}`;
const timeoutMs = Number(opts['timeout-ms']);

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

async function main() {
  const allowed = await servePage('allowed', '127.0.0.1', Number(opts['allowed-port']));
  const refused = await servePage('refused', 'localhost', Number(opts['refused-port']));
  emit({ check: 'pages', ok: true, allowed_origin: allowed.origin, refused_origin: refused.origin });
  await runBrowser({
    driver, opts, servers: [allowed.server, refused.server],
    checks: (context, run) => runChecks(context, { allowed, refused, ...run }),
  });
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
    const refusedStatus = handshakeStatus(seen);
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
        status: refusedStatus,
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
