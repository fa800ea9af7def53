// Bundles one of the test workers with esbuild and serves it in a real workerd (via Miniflare)
// on an ephemeral loopback port.
//
//   node start.mjs [--worker current|agents-011|auth]
//
// The Worker's OPENROUTER_API_KEY binding is this process's OPENROUTER_API_KEY, when set and
// not empty; otherwise the Worker has none. Prints exactly one line on stdout once serving:
//   workerd listening on http://127.0.0.1:PORT
// Everything else (Miniflare, workerd and the Worker's console) goes to stderr. Stops when
// stdin closes or on SIGTERM/SIGINT.
import { builtinModules } from "node:module";
import { fileURLToPath } from "node:url";
import { build, stop as stopEsbuild } from "esbuild";
import { Log, LogLevel, Miniflare } from "miniflare";

const here = fileURLToPath(new URL(".", import.meta.url));
const workers = {
  current: { entry: "worker.js", agents: ["CoderAgent", "StateAgent"] },
  "agents-011": { entry: "worker-011.js", agents: ["CoderAgent"] },
  // tests/workerd_auth.rs: its binding GATEWAY_IDENTITY_KEY is this process's, when set.
  auth: { entry: "worker-auth.js", agents: ["CoderAgent"], secrets: ["GATEWAY_IDENTITY_KEY"] },
};
const flag = process.argv.indexOf("--worker");
const name = flag === -1 ? "current" : process.argv[flag + 1];
const worker = workers[name];
if (!worker) {
  console.error(`start.mjs: unknown --worker ${name}; expected one of ${Object.keys(workers).join(", ")}`);
  process.exit(2);
}

// Node built-ins stay imports, spelled node:x, which workerd serves under nodejs_compat.
const nodeBuiltins = {
  name: "node-builtins",
  setup(b) {
    const bare = new RegExp(`^(node:.*|${builtinModules.map((m) => m.replace(/[/]/g, "\\/")).join("|")})$`);
    b.onResolve({ filter: bare }, (args) => ({
      path: args.path.startsWith("node:") ? args.path : `node:${args.path}`,
      external: true,
    }));
  },
};
const bundle = await build({
  entryPoints: [here + worker.entry],
  bundle: true,
  write: false,
  format: "esm",
  target: "es2022",
  platform: "neutral",
  conditions: ["workerd", "worker", "browser"],
  mainFields: ["browser", "module", "main"],
  external: ["cloudflare:*"], // workerd's own modules
  plugins: [nodeBuiltins],
  logLevel: "error",
});
await stopEsbuild();

// Miniflare's own messages, on stderr: stdout carries only the readiness line.
class StderrLog extends Log {
  log(message) {
    console.error(message);
  }
}

const key = process.env.OPENROUTER_API_KEY?.trim();
const bindings = key ? { OPENROUTER_API_KEY: key } : {};
for (const secret of worker.secrets ?? []) if (process.env[secret]) bindings[secret] = process.env[secret];
const mf = new Miniflare({
  modules: true,
  script: bundle.outputFiles[0].text,
  scriptPath: here + worker.entry,
  // No later than the installed workerd's date; cf: false keeps Miniflare offline.
  compatibilityDate: "2026-04-26",
  compatibilityFlags: ["nodejs_compat"],
  cf: false,
  host: "127.0.0.1",
  port: 0,
  durableObjects: Object.fromEntries(worker.agents.map((a) => [a, { className: a, useSQLite: true }])),
  bindings,
  log: new StderrLog(LogLevel.WARN, { prefix: "miniflare" }),
  handleRuntimeStdio(stdout, stderr) {
    stdout.pipe(process.stderr);
    stderr.pipe(process.stderr);
  },
});
const url = await mf.ready;
process.stdout.write(`workerd listening on ${url.origin}\n`);

let stopping = false;
async function stop() {
  if (stopping) return;
  stopping = true;
  await mf.dispose().catch(() => {});
  process.exit(0);
}
process.stdin.on("end", stop);
process.stdin.on("close", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
