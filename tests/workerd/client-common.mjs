// What the SDK client scripts share: arguments, their JSON lines on stdout, the 30 s bound on
// a scenario, and a recorder of every frame and open/close of an AgentClient.

export const arg = (name) => {
  const i = process.argv.indexOf(`--${name}`);
  return i === -1 ? undefined : process.argv[i + 1];
};
export const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
export const fail = (error) => {
  print({ step: "error", error: String(error?.stack ?? error) });
  process.exit(1);
};
setTimeout(() => fail("scenario timed out"), 30_000).unref();

// PartySocket options every script uses against the local workerd or gateway.
export const socketOptions = {
  protocol: "ws",
  minReconnectionDelay: 50, // PartySocket's defaults wait seconds between attempts
  maxReconnectionDelay: 200,
};

// Every frame and every open/close of `client`, in order, for the assertions. A `token`
// query parameter in a URL is shown as [token]: a token is the test's secret.
export function recorder(client) {
  const frames = [];
  const waiters = [];
  const record = (event) => {
    frames.push(event);
    for (const w of [...waiters]) if (w.match(event)) waiters.splice(waiters.indexOf(w), 1) && w.resolve(event);
  };
  const shown = (url) => url?.replace(/([?&]token=)[^&]*/, "$1[token]") ?? null;
  client.addEventListener("open", () => record({ kind: "open", url: shown(client.url), at: Date.now() }));
  client.addEventListener("close", (e) =>
    record({ kind: "close", code: e.code, reason: e.reason, wasClean: e.wasClean, at: Date.now() }),
  );
  client.addEventListener("message", (e) => {
    let data = e.data;
    try {
      data = JSON.parse(e.data);
    } catch {}
    record({ kind: "message", data });
  });
  // Resolves with the first event from now on that matches, or fails after `ms`.
  const next = (match, what, ms = 10_000) =>
    new Promise((resolve, reject) => {
      waiters.push({ match, resolve });
      setTimeout(() => reject(new Error(`no ${what} within ${ms} ms`)), ms).unref();
    });
  // Asks the agent what it saw of this connection.
  const whoami = async () => {
    const answer = next(message("whoami"), "whoami answer");
    client.send(JSON.stringify({ type: "whoami" }));
    return (await answer).data;
  };
  return { frames, next, whoami, since: (start) => frames.slice(start) };
}

export const message = (type) => (e) => e.kind === "message" && e.data?.type === type;
