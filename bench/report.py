#!/usr/bin/env python3
"""Turns bench/run.sh's raw JSON lines into bench/results/RESULTS.md (Markdown on stdout).

usage: report.py RAW.jsonl META.json [GATEWAY_METRICS.txt]

Every figure is the median over the rounds, with the spread (lowest-highest) next to it.
Ratios and added latencies are computed round by round against the "direct" run of the
same round and layout, then the median is taken.

The reconnect-storm section comes from the storm records of RAW.jsonl itself, or from a
storm-only run (raw-<stamp>-storm.jsonl beside it) made after it and before the next full run,
whichever is newer. Given a storm-only run's files, it prints the storm report alone.
"""
import json
import os
import re
import statistics
import sys
from collections import defaultdict

# "pingora": Pingora with default hooks (examples/bare_pingora.rs), the floor under the gateway.
TARGETS = ["direct", "gateway", "pingora", "nginx", "haproxy"]
PROXIES = ["gateway", "pingora", "nginx", "haproxy"]
LAYOUTS = {
    1: "Layout 1: proxy and backends on core 0, client on core 1",
    2: "Layout 2: proxy alone on core 0, backends and client on core 1",
}
# Targets of issue 9, checked against the gateway's medians.
TARGET_HTTP_US = 12.0
TARGET_WS_US = 10.0
TARGET_KIB = 4.6
# Targets of issue 15 ("Speed and memory"), checked by the liveness phase (run.sh --liveness).
TARGET_LIVE_CPU_PCT = 3.0   # per-message CPU with heartbeats and rate limits on, over off
TARGET_LIVE_KIB = 3.4       # KiB per idle socket at 9000 with heartbeats on (the figure of 2026-11-23)
TARGET_PING_CORE_PCT = 1.0  # 9000 idle sockets pinged at the default interval, % of one core
# Targets of the authentication issue, checked by the storm phase (run.sh --storm).
TARGET_STORM_PCT = 10.0     # CPU per upgrade, HS256 / API key / any token seen before, over auth off
TARGET_AUTH_MSG_PCT = 3.0   # "nothing added per message": the noise bound of issue 15's per-message target
STORM_ROWS = [  # target, what it is
    ("nginx", "nginx, plain upgrade"),
    ("haproxy", "HAProxy, plain upgrade"),
    ("auth_off", "gateway, auth off"),
    ("hs256", "gateway, HS256, token seen before"),
    ("apikey", "gateway, API key"),
    ("es256", "gateway, ES256, token seen before"),
    ("rs256", "gateway, RS256, token seen before"),
    ("hs256_first", "gateway, HS256, first verification"),
    ("es256_first", "gateway, ES256, first verification"),
    ("rs256_first", "gateway, RS256, first verification"),
]
RAW_NAME = re.compile(r"raw-(\d{8}-\d{6})-([a-z-]+)\.jsonl$")


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1):
    if v is None:
        return "-"
    if abs(v) >= 1000 and digits <= 1:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def cell(values, digits=1, signed=False):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.median(values)
    f = (lambda x: ("+" if x >= 0 else "") + fmt(x, digits)) if signed else (lambda x: fmt(x, digits))
    if len(values) == 1:
        return f(m)
    return f"{f(m)} ({f(min(values))} to {f(max(values))})"


def storm_source(raw_path, raw, meta):
    """The storm records to report with this run, and the meta of the run they come from:
    the newest of this run's own and those of the storm-only runs (raw-*-storm.jsonl) made
    after it and before the next full run in the same folder."""
    own = [r for r in raw if r.get("phase") == "storm"]
    best = (own, meta) if own else None
    m = RAW_NAME.search(os.path.basename(raw_path))
    if not m or m.group(2) != "full":
        return best
    folder = os.path.dirname(raw_path) or "."
    stamps = {}
    for name in os.listdir(folder):
        n = RAW_NAME.fullmatch(name)
        if n:
            stamps.setdefault(n.group(2), []).append(n.group(1))
    later_full = [t for t in stamps.get("full", []) if t > m.group(1)]
    until = min(later_full) if later_full else "99999999-999999"
    storms = sorted(t for t in stamps.get("storm", []) if m.group(1) < t < until)
    if storms:
        base = os.path.join(folder, f"raw-{storms[-1]}-storm")
        with open(base + ".meta.json") as f:
            return load(base + ".jsonl"), json.load(f)
    return best


def added_us(r, d, key):
    """A run's latency percentile minus the direct run's, when both have it."""
    if r.get(key) is None or d.get(key) is None:
        return None
    return r[key] - d[key]


def main():
    raw = load(sys.argv[1])
    with open(sys.argv[2]) as f:
        meta = json.load(f)
    if meta["mode"].startswith("storm"):
        storm_only(raw, meta)
        return
    # The gateway's /metrics scraped after the load rounds: the third argument, or the file
    # run.sh keeps beside the raw data.
    metrics_path = sys.argv[3] if len(sys.argv) > 3 else sys.argv[1].replace(".jsonl", ".gateway-metrics.txt")
    metrics_text = ""
    try:
        with open(metrics_path) as f:
            metrics_text = f.read()
    except OSError:
        pass

    load_runs = [r for r in raw if r.get("phase") == "load"]
    mem_runs = [r for r in raw if r.get("phase") == "memory"]
    by = defaultdict(list)  # (layout, test, target) -> runs
    by_round = {}  # (layout, test, target, round) -> run
    for r in load_runs:
        by[(r["layout"], r["test"], r["target"])].append(r)
        by_round[(r["layout"], r["test"], r["target"], r["round"])] = r

    def per_round(layout, test, target, fn):
        """fn(run, direct_run) for every round where both ran."""
        out = []
        for r in by[(layout, test, target)]:
            d = by_round.get((layout, test, "direct", r["round"]))
            if d is not None:
                out.append(fn(r, d))
        return out

    def vals(layout, test, target, key):
        return [r.get(key) for r in by[(layout, test, target)]]

    def throughput_cells(layout, test, target):
        """Rate, ratio to direct and proxy CPU per operation: the cells every load table starts with."""
        ratio = per_round(layout, test, target, lambda r, d: r["rate"] / d["rate"] if d["rate"] else None)
        direct = target == "direct"
        return (f"{cell(vals(layout, test, target, 'rate'), 0)} | {'1' if direct else cell(ratio, 2)} | "
                f"{cell(vals(layout, test, target, 'proxy_cpu_us_per_msg'), 1)}{' (backend)' if direct else ''}")

    out = []
    w = out.append
    w("# agent-gateway vs bare Pingora vs nginx vs HAProxy: benchmark results")
    w("")
    w(f"- Date: {meta['date']} ({meta['mode']} mode: {meta['rounds_done']} of {meta['rounds_planned']} load rounds, "
      f"{meta['mem_rounds']} memory round(s), {meta['elapsed_s'] // 60} min {meta['elapsed_s'] % 60} s end to end)")
    w(f"- Machine: {meta['nproc']} cores ({meta['cpu']}), {meta['memory_mib']} MiB, Linux {meta['kernel']}, "
      f"open-file limit {meta['nofile']}")
    w(f"- Software: agent-gateway {meta['gateway_rev']} (release build, `threads = 1`, frame observer and "
      f"metrics on, RUST_LOG=info), bare Pingora {meta.get('pingora', '?')} (\"pingora\": default hooks, one "
      f"worker thread, the gateway's allocator), nginx {meta['nginx']} (`worker_processes 1`), HAProxy {meta['haproxy']} "
      f"(`nbthread 1`), wrk {meta['wrk']}; backends and WebSocket client from bench/loadgen")
    w(f"- Each figure: median of the rounds, (lowest to highest) next to it. Runs: {meta['duration_s']} s measured"
      f" ({meta['warmup_s']} s WebSocket warm-up before). Targets run in turn, order rotated every round.")
    noisy = [r for r in load_runs if r.get("noisy")]
    steal = [r["steal_pct"] for r in load_runs if r.get("steal_pct") is not None]
    w(f"- Noise control: a run starts when the box is >= 90% idle; a run where other processes took more than "
      f"{meta['foreign_max_pct']}% of a core{' (or the hypervisor stole more than that)' if steal else ''} is repeated (up to twice). Repeats: {meta['noisy_repeats']}; runs skipped for the time budget: {meta.get('skipped_runs', 0)}; "
      f"runs kept although noisy: {len(noisy)}."
      + (f" Hypervisor steal during the kept runs: median {fmt(med(steal))}%, highest {fmt(max(steal))}% "
         "(also a reason to repeat above the same limit)." if steal else ""))
    paced = meta.get("sse_paced_events_per_read")
    if paced:
        w(f"- Server-sent events pass on as they come: at the start, one stream per target paced at an event every "
          f"{meta.get('sse_paced_ms', 20)} ms brought, per read of the client, "
          + ", ".join(f"{t} {fmt(v, 2)}" for t, v in paced.items())
          + " event(s) (1: each event passed on alone; more: the proxy held events back).")
    w("- CPU per operation: the proxy's utime+stime (/proc/PID/stat, all threads; nginx master+worker) over the "
      "measured window, divided by the operations in it. A WebSocket \"message\" is one 64-byte message and its "
      "echo (the proxy relays two frames). Time the kernel spends in softirq for loopback traffic is not "
      "charged to any process. \"direct\" rows show the backend's own CPU instead.")
    w("")

    sse_described = False  # the SSE test is described under its first table only
    for layout, title in LAYOUTS.items():
        if not any(k[0] == layout for k in by):
            continue
        w(f"## {title}")
        w("")
        w(f"### HTTP: GET /agents/hello/default, wrk -t1 -c{meta['http_conns']}, keep-alive")
        w("")
        w("| target | requests/s | vs direct | proxy CPU µs/request | p50 µs | p99 µs | added p50 µs | added p99 µs |")
        w("|---|---|---|---|---|---|---|---|")
        for t in TARGETS:
            if not by[(layout, "http", t)]:
                continue
            added = [cell(per_round(layout, "http", t, lambda r, d, k=k: added_us(r, d, k)), 0, True)
                     if t != "direct" else "-" for k in ("p50_us", "p99_us")]
            w(f"| {t} | {throughput_cells(layout, 'http', t)} | "
              f"{cell(vals(layout, 'http', t, 'p50_us'), 0)} | {cell(vals(layout, 'http', t, 'p99_us'), 0)} | "
              f"{added[0]} | {added[1]} |")
        w("")
        w(f"Closed loop: wrk keeps {meta['http_conns']} requests in flight, so these latencies are mostly the wait "
          f"in line (about {meta['http_conns']} / requests per second) and the added latency follows the lost "
          "throughput; the open-loop WebSocket table below shows added latency below saturation.")
        w("")
        has_sse = any(by[(layout, "sse", t)] for t in TARGETS)  # none in runs before the SSE test
        if has_sse:
            w(f"### SSE: {meta.get('sse_conns', 16)} streams, {meta.get('sse_size', 64)}-byte events")
            w("")
        if has_sse and not sse_described:
            sse_described = True
            w(f"`GET /agents/hello/s{{i}}/events`: the hello backend answers `text/event-stream` (chunked, no "
              f"Content-Length) and writes events back to back, one chunk and one write each, as fast as the "
              f"client takes them; the client reads every stream as fast as it comes and counts the events over "
              f"the window ({meta['duration_s']} s, after {meta.get('sse_warmup_s', 0.5)} s of streaming). nginx "
              f"with `proxy_buffering off` and HAProxy with `option http-no-delay` for this path. \"events per "
              f"read\": how many events one read of the client brought. At full speed events queue up, and a proxy "
              f"that reads many at once and writes them on together pays less per event and sends fewer, larger "
              f"segments, which can make it faster than the backend's one segment per event straight to the "
              f"client (\"vs direct\" above 1). MiB/s: bytes on the wire, chunk framing included.")
            w("")
        if has_sse:
            w("| target | events/s | vs direct | proxy CPU µs/event | MiB/s | events per read | streams ended early |")
            w("|---|---|---|---|---|---|---|")
            for t in TARGETS:
                runs = by[(layout, "sse", t)]
                if not runs:
                    continue
                w(f"| {t} | {throughput_cells(layout, 'sse', t)} | {cell(vals(layout, 'sse', t, 'mib_per_s'), 1)} | "
                  f"{cell(vals(layout, 'sse', t, 'events_per_read'), 1)} | {sum(r.get('errors', 0) for r in runs)} |")
            w("")
        w(f"### WebSocket closed loop: {meta['ws_conns']} connections, {meta['ws_size']}-byte messages, ping-pong")
        w("")
        w("| target | messages/s | vs direct | proxy CPU µs/message |")
        w("|---|---|---|---|")
        for t in TARGETS:
            if not by[(layout, "ws_pingpong", t)]:
                continue
            w(f"| {t} | {throughput_cells(layout, 'ws_pingpong', t)} |")
        w("")
        w(f"### WebSocket open loop: {meta['rate']} messages/s over {meta['rate_conns']} connections, "
          f"{meta['ws_size']}-byte messages, round-trip latency")
        w("")
        w("| target | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | lost | proxy CPU µs/message |")
        w("|---|---|---|---|---|---|---|---|")
        for t in TARGETS:
            runs = by[(layout, "ws_rate", t)]
            if not runs:
                continue
            a50 = per_round(layout, "ws_rate", t, lambda r, d: r["p50_us"] - d["p50_us"])
            a99 = per_round(layout, "ws_rate", t, lambda r, d: r["p99_us"] - d["p99_us"])
            lost = sum(r.get("lost", 0) for r in runs)
            w(f"| {t} | {cell(vals(layout, 'ws_rate', t, 'p50_us'), 0)} | {cell(vals(layout, 'ws_rate', t, 'p99_us'), 0)} | "
              f"{cell(vals(layout, 'ws_rate', t, 'p999_us'), 0)} | "
              f"{cell(a50, 0, True) if t != 'direct' else '-'} | {cell(a99, 0, True) if t != 'direct' else '-'} | {lost} | "
              f"{cell(vals(layout, 'ws_rate', t, 'proxy_cpu_us_per_msg'), 1)}{' (backend)' if t == 'direct' else ''} |")
        late = [r.get("sender_late_p99_us") for r in load_runs if r["layout"] == layout and r["test"] == "ws_rate"]
        w("")
        backend = med(vals(layout, "ws_rate", "direct", "proxy_cpu_us_per_msg")) if layout == 1 else 0
        loads = []
        for t in PROXIES:
            c = med(vals(layout, "ws_rate", t, "proxy_cpu_us_per_msg"))
            if c is not None:
                loads.append(f"{t} {c * meta['rate'] / 1e4:.0f}%")
        if loads:
            extra = (f", plus the echo backend's {backend * meta['rate'] / 1e4:.0f}% on the same core"
                     if layout == 1 and backend else "")
            w(f"Core 0 busy at this rate (proxy CPU per message × {meta['rate']}/s): {', '.join(loads)}{extra}. "
              "(near 100%, queueing sets the p99).")
        w(f"Load generator check: the sender's p99 lateness against its schedule was {cell(late, 0)} µs.")
        w("")

    if mem_runs:
        w("## Idle WebSockets: memory per connection (layout 1)")
        w("")
        w("PSS (/proc/PID/smaps_rollup; nginx master+worker) after opening N sockets, each checked to echo, "
          f"and holding them idle {meta['hold_s']} s, minus PSS before; the proxy is restarted fresh for each run. "
          "\"alive\": sockets that still echoed after the hold (worst round).")
        w("")
        sizes = sorted({int(r["conns"]) for r in mem_runs})
        head = "| target | " + " | ".join(f"KiB/connection at {n}" for n in sizes) + " | " + \
               " | ".join(f"alive at {n}" for n in sizes) + " | PSS at " + str(sizes[-1]) + " MiB |"
        w(head)
        w("|" + "---|" * (2 * len(sizes) + 2))
        for t in PROXIES:
            cells = []
            alive = []
            for n in sizes:
                rs = [r for r in mem_runs if r["target"] == t and int(r["conns"]) == n]
                cells.append(cell([r["kib_per_conn_held"] for r in rs], 1))
                alive.append(f"{min(r['alive_after_hold'] for r in rs)}/{n}" if rs else "-")
            big = [r["pss_held_kib"] / 1024 for r in mem_runs if r["target"] == t and int(r["conns"]) == sizes[-1]]
            w(f"| {t} | " + " | ".join(cells) + " | " + " | ".join(alive) + f" | {cell(big, 1)} |")
        w("")

    # The issue's targets, for the gateway.
    w("## Issue 9 targets (gateway, medians)")
    w("")
    w("| target | layout 1 | layout 2 | met? |")
    w("|---|---|---|---|")

    def gw(layout, test, key):
        return med(vals(layout, test, "gateway", key))

    def verdict(values, limit):
        values = [v for v in values if v is not None]
        if not values:
            return "not measured"
        return "yes" if max(values) <= limit else "no"

    h = [gw(1, "http", "proxy_cpu_us_per_msg"), gw(2, "http", "proxy_cpu_us_per_msg")]
    w(f"| ≤ {TARGET_HTTP_US:g} µs proxy CPU per HTTP request | {fmt(h[0])} | {fmt(h[1])} | {verdict(h, TARGET_HTTP_US)} |")
    m = [gw(1, "ws_pingpong", "proxy_cpu_us_per_msg"), gw(2, "ws_pingpong", "proxy_cpu_us_per_msg")]
    w(f"| ≤ {TARGET_WS_US:g} µs proxy CPU per WebSocket message (64 conns, 64 B) | {fmt(m[0])} | {fmt(m[1])} | {verdict(m, TARGET_WS_US)} |")
    for p, label in (("p50_us", "p50"), ("p99_us", "p99")):
        cols = []
        ok = []
        for layout in (1, 2):
            g = med(per_round(layout, "ws_rate", "gateway", lambda r, d: r[p] - d[p]))
            n = med(per_round(layout, "ws_rate", "nginx", lambda r, d: r[p] - d[p]))
            cols.append(f"{fmt(g, 0)} vs nginx {fmt(n, 0)}" if g is not None and n is not None else "-")
            if g is not None and n is not None:
                ok.append(g <= n)
        met = "not measured" if not ok else ("yes" if all(ok) else ("no" if not any(ok) else "layout " + ",".join(str(i + 1) for i, v in enumerate(ok) if v) + " only"))
        w(f"| added {label} latency at {meta['rate']} msg/s / {meta['rate_conns']} conns ≤ nginx's (µs) | {cols[0]} | {cols[1]} | {met} |")
    big = [r for r in mem_runs if r["target"] == "gateway" and int(r["conns"]) == 9000]
    if big:
        kib = med([r["kib_per_conn_held"] for r in big])
        alive_all = all(r["alive_after_hold"] == 9000 for r in big)
        w(f"| ≤ {TARGET_KIB:g} KiB per idle WebSocket at 9000, all alive after the hold | {fmt(kib)} KiB, "
          f"{'all' if alive_all else 'NOT all'} alive | | {'yes' if kib <= TARGET_KIB and alive_all else 'no'} |")
    w("")

    # What the gateway adds to Pingora itself.
    w("## The gateway over bare Pingora (its floor), medians")
    w("")
    w("| figure | gateway L1 / L2 | bare Pingora L1 / L2 | nginx L1 / L2 |")
    w("|---|---|---|---|")
    def trio(test, key):
        return " | ".join(f"{fmt(med(vals(1, test, t, key)))} / {fmt(med(vals(2, test, t, key)))}"
                          for t in ("gateway", "pingora", "nginx"))
    w(f"| proxy CPU µs per HTTP request | {trio('http', 'proxy_cpu_us_per_msg')} |")
    w(f"| proxy CPU µs per WebSocket message | {trio('ws_pingpong', 'proxy_cpu_us_per_msg')} |")
    kib9 = {t: med([r["kib_per_conn_held"] for r in mem_runs if r["target"] == t and int(r["conns"]) == 9000])
            for t in PROXIES}
    w(f"| KiB per idle WebSocket (9000) | {fmt(kib9['gateway'])} | {fmt(kib9['pingora'])} | {fmt(kib9['nginx'])} |")
    w("")

    # How this box compares with the issue's reference machine, through nginx and HAProxy.
    w("## nginx and HAProxy here vs the issue's reference figures")
    w("")
    w("| figure | reference | nginx here (L1 / L2) | HAProxy here (L1 / L2) |")
    w("|---|---|---|---|")
    def both(t, test, key):
        return f"{fmt(med(vals(1, test, t, key)))} / {fmt(med(vals(2, test, t, key)))}"
    w(f"| proxy CPU µs per HTTP request | ~15 | {both('nginx', 'http', 'proxy_cpu_us_per_msg')} | {both('haproxy', 'http', 'proxy_cpu_us_per_msg')} |")
    w(f"| proxy CPU µs per WebSocket message | ~12 | {both('nginx', 'ws_pingpong', 'proxy_cpu_us_per_msg')} | {both('haproxy', 'ws_pingpong', 'proxy_cpu_us_per_msg')} |")
    adds = []
    for layout in (1, 2):
        a50 = med(per_round(layout, "ws_rate", "nginx", lambda r, d: r["p50_us"] - d["p50_us"]))
        a99 = med(per_round(layout, "ws_rate", "nginx", lambda r, d: r["p99_us"] - d["p99_us"]))
        adds.append(f"+{fmt(a50, 0)}/+{fmt(a99, 0)}" if a50 is not None and a99 is not None else "-")
    w(f"| nginx added p50/p99 µs at {meta['rate']} msg/s, {meta['rate_conns']} conns | +23/+116 | {adds[0]} / {adds[1]} | |")
    w(f"| KiB per idle WebSocket (9000) | nginx 17.7, HAProxy 4.6 | {fmt(kib9['nginx'])} | {fmt(kib9['haproxy'])} |")
    w("")

    live = [r for r in raw if r.get("phase") == "liveness"]
    if live:
        liveness(w, live, meta)

    source = storm_source(sys.argv[1], raw, meta)
    if source:
        storm(w, source[0], source[1], meta)

    if metrics_text:
        def total(prefix):
            s = 0.0
            for line in metrics_text.splitlines():
                if line.startswith(prefix):
                    try:
                        s += float(line.rsplit(" ", 1)[1])
                    except ValueError:
                        pass
            return s
        w("## Gateway metrics after the load rounds (sanity check that the observer counted)")
        w("")
        w(f"- agent_gateway_ws_messages_total: {total('agent_gateway_ws_messages_total'):,.0f} "
          f"(both directions); agent_gateway_http_requests_total: {total('agent_gateway_http_requests_total'):,.0f}; "
          f"agent_gateway_ws_closes_total: {total('agent_gateway_ws_closes_total'):,.0f}")
        w("")
    w(f"Raw data: bench/{meta['raw']}. Regenerate: `python3 bench/report.py bench/{meta['raw']} "
      f"bench/{meta['raw'].replace('.jsonl', '.meta.json')} > bench/results/RESULTS.md`.")
    print("\n".join(out))


def storm_only(raw, meta):
    """The report of a storm-only run (run.sh --storm-only): its header and the storm section."""
    out = []
    w = out.append
    w("# agent-gateway reconnect storm with authentication: benchmark results")
    w("")
    w(f"- Date: {meta['date']} ({meta['mode']} mode, {meta['elapsed_s'] // 60} min {meta['elapsed_s'] % 60} s end to end)")
    w(f"- Machine: {meta['nproc']} cores ({meta['cpu']}), {meta['memory_mib']} MiB, Linux {meta['kernel']}")
    w(f"- Software: agent-gateway {meta['gateway_rev']} (release build, `threads = 1`, RUST_LOG=info), "
      f"nginx {meta['nginx']} (`worker_processes 1`), HAProxy {meta['haproxy']} (`nbthread 1`); backends and "
      "client from bench/loadgen")
    w(f"- Noise control as in the full runs (box >= 90% idle before a run; a run where other processes or the "
      f"hypervisor took more than {meta['foreign_max_pct']}% of a core repeated up to twice). Repeats: "
      f"{meta['noisy_repeats']}; runs skipped for the time budget: {meta.get('skipped_runs', 0)}.")
    w("")
    storm(w, [r for r in raw if r.get("phase") == "storm"], meta, meta)
    w(f"Raw data: bench/{meta['raw']}.")
    print("\n".join(out))


def storm(w, runs, smeta, meta):
    """The reconnect-storm section: CPU per upgrade with and without authentication."""
    sm = smeta.get("storm", {})
    if not runs:
        if sm.get("refused"):
            w("## Reconnect storm with authentication")
            w("")
            w(f"Not run: the gateway under test refused the `[auth]` configuration (\"{sm['refused']}\").")
            w("")
        return
    st = [r for r in runs if r["test"] == "storm"]
    pp = [r for r in runs if r["test"] == "ws_rate"]
    by = defaultdict(list)
    off = {}
    for r in st:
        by[r["target"]].append(r)
        if r["target"] == "auth_off":
            off[r["round"]] = r
    # The message runs come in pairs per round (A B B A): each route's mean per round.
    msg = defaultdict(list)  # (target, round) -> CPU µs per message
    for r in pp:
        if r.get("proxy_cpu_us_per_msg"):
            msg[(r["target"], r["round"])].append(r["proxy_cpu_us_per_msg"])

    def vs_off(target, fn):
        return [fn(r, off[r["round"]]) for r in by[target]
                if r["round"] in off and r.get("proxy_cpu_us_per_upgrade") and off[r["round"]].get("proxy_cpu_us_per_upgrade")]

    def pct(target):
        return vs_off(target, lambda r, o: 100 * (r["proxy_cpu_us_per_upgrade"] / o["proxy_cpu_us_per_upgrade"] - 1))

    def added(target):
        return vs_off(target, lambda r, o: r["proxy_cpu_us_per_upgrade"] - o["proxy_cpu_us_per_upgrade"])

    w("## Reconnect storm with authentication (layout 2)")
    w("")
    source = "" if smeta is meta else (f" From the storm-only run of {smeta['date']} "
                                       f"(gateway {smeta['gateway_rev']}, raw data bench/{smeta['raw']}).")
    w(f"{sm.get('rate', 0):g} new WebSocket upgrades per second (open loop) for {sm.get('warmup_s', 0):g} s of "
      f"warm-up and {sm.get('duration_s', 0):g} s measured, each over a fresh TCP connection: connect, upgrade "
      f"(`Authorization: Bearer` where the route has a policy), the 101, one {sm.get('size', 64)}-byte message and "
      "its echo, a Close and the proxy's close. The proxy alone on core 0, backends and client on core 1. nginx "
      "and HAProxy do plain upgrades with their usual configurations; the gateway rows are one process "
      "(nginx, HAProxy and it started once and warmed up by an unrecorded storm through every route) with a public route (auth off) and a route per policy: HS256 (`key_secret`), ES256 "
      "and RS256 (`jwks_file`, one key each, found by `kid`), API key. \"Seen before\": the same token on every "
      "upgrade (verified once, then found in the cache by digest); \"first verification\": a token never shown "
      "before on every upgrade (minted by the client before the run). Proxy CPU per upgrade: the run time of "
      "the proxy's threads over the window (/proc/PID/task/*/schedstat, in ns: utime+stime without the 10 ms "
      "ticks) / the upgrades due in it; \"vs auth off\" and \"added\" are taken per round against the same "
      f"round's auth-off run. Handshake: connect to the parsed 101, at the client.{source}")
    w("")
    w("| target | upgrades/s | failed | proxy CPU µs/upgrade | vs gateway auth off | added µs/upgrade | "
      "handshake p50 µs | handshake p99 µs |")
    w("|---|---|---|---|---|---|---|---|")
    for t, label in STORM_ROWS:
        rs = by[t]
        if not rs:
            continue
        failed = sum(r.get("failed", 0) for r in rs)
        gw = t not in ("nginx", "haproxy")
        w(f"| {label} | {cell([round(r['rate']) if r.get('rate') is not None else None for r in rs], 0)} | {failed} | "
          f"{cell([r.get('proxy_cpu_us_per_upgrade') for r in rs], 1)} | "
          f"{'0' if t == 'auth_off' else (cell(pct(t), 1, True) + ' %' if pct(t) else '-')} | "
          f"{cell(added(t), 1, True) if gw and t != 'auth_off' else '-'} | "
          f"{cell([r.get('handshake_p50_us') for r in rs], 0)} | {cell([r.get('handshake_p99_us') for r in rs], 0)} |")
    w("")
    errs = sorted({r["error"] for r in st if r.get("error")})
    noisy = [r for r in runs if r.get("noisy")]
    w(f"Rounds: {sm.get('rounds_done', '?')} of {sm.get('rounds', '?')}. Runs kept although noisy: {len(noisy)}."
      + (f" First errors: {'; '.join(errs[:3])}." if errs else " No upgrade failed.")
      + f" Sender lateness against its schedule, p99: {cell([r.get('sender_late_p99_us') for r in st], 0)} µs.")
    w("")
    if pp:
        w(f"Per message: the open-loop test ({meta.get('rate', 20000)} messages/s over {meta.get('rate_conns', 100)} "
          f"connections, {meta.get('ws_size', 64)}-byte messages, {sm.get('message_duration_s', meta.get('duration_s', 5)):g} s) "
          "on the public route and on the HS256 route of the same process, A B B A in each round (B A A B in "
          "the next): a policy is checked once per upgrade, so the two should cost the same per message. "
          "\"vs auth off\": the mean of each route's runs per round, then the median over the rounds.")
        w("")
        w("| route | proxy CPU µs/message | vs auth off | p50 µs | p99 µs | lost |")
        w("|---|---|---|---|---|---|")
        msg_d = [100 * (statistics.mean(v) / statistics.mean(msg[("auth_off", rnd)]) - 1)
                 for (t, rnd), v in sorted(msg.items()) if t == "hs256" and msg.get(("auth_off", rnd))]
        for t, label in (("auth_off", "auth off"), ("hs256", "HS256")):
            rs = [r for r in pp if r["target"] == t]
            if rs:
                w(f"| {label} | {cell([r.get('proxy_cpu_us_per_msg') for r in rs], 1)} | "
                  f"{'0' if t == 'auth_off' else (cell(msg_d, 1, True) + ' %' if msg_d else '-')} | "
                  f"{cell([r.get('p50_us') for r in rs], 0)} | {cell([r.get('p99_us') for r in rs], 0)} | "
                  f"{sum(r.get('lost', 0) for r in rs)} |")
        w("")

    w("### Authentication targets (gateway, medians)")
    w("")
    w("| target | measured | met? |")
    w("|---|---|---|")

    def verdict(m, limit):
        return "not measured" if m is None else ("yes" if m <= limit else "no")

    for t, what in (("hs256", "HS256, token seen before"), ("apikey", "API key")):
        m = med(pct(t))
        w(f"| {what}: ≤ +{TARGET_STORM_PCT:g} % proxy CPU per upgrade over auth off | "
          f"{'-' if m is None else ('+' if m >= 0 else '') + fmt(m) + ' %'} | {verdict(m, TARGET_STORM_PCT)} |")
    seen = {t: med(pct(t)) for t in ("hs256", "es256", "rs256")}
    seen = {t: m for t, m in seen.items() if m is not None}
    worst = max(seen.values()) if seen else None
    w(f"| a token seen before, any algorithm (cached by digest): ≤ +{TARGET_STORM_PCT:g} % | "
      + (", ".join(f"{t.upper()} {'+' if m >= 0 else ''}{fmt(m)} %" for t, m in seen.items()) or "-")
      + f" | {verdict(worst, TARGET_STORM_PCT)} |")
    for t in ("es256_first", "rs256_first", "hs256_first"):
        a, p = med(added(t)), med(pct(t))
        if a is not None:
            w(f"| first verification of {t[:5].upper()}: reported as measured | {'+' if a >= 0 else ''}{fmt(a)} µs "
              f"per upgrade ({'+' if p >= 0 else ''}{fmt(p)} %) | reported |")
    if pp:
        m = med(msg_d)
        w(f"| nothing added per message (HS256 route vs auth off, open loop; within ±{TARGET_AUTH_MSG_PCT:g} %) | "
          f"{'-' if m is None else ('+' if m >= 0 else '') + fmt(m) + ' %'} | "
          f"{'not measured' if m is None else ('yes' if abs(m) <= TARGET_AUTH_MSG_PCT else 'no')} |")
    w("")


def liveness(w, live, meta):
    """The issue 15 section: heartbeats and rate limits off vs on, idle memory, ping cost."""
    lm = meta.get("liveness", {})
    hz = meta["hz"]
    pi = lm.get("ping_interval_s", 1)
    di = lm.get("default_ping_interval_s", 25)
    dt = lm.get("default_ping_timeout_s", 10)
    n_conns = lm.get("conns", 9000)
    pp = [r for r in live if r["test"] == "ws_pingpong"]
    holds = [r for r in live if r["test"].startswith("idle_")]
    names = {"gateway_off": "off", "gateway_on": "on", "gateway_pings": f"on, Pings every {pi:g} s"}

    def cpu_share(r):
        """The gateway's CPU over a hold's window, as a fraction of one core."""
        if r.get("proxy_cpu_ticks") is None or not r.get("window_seconds"):
            return None
        return r["proxy_cpu_ticks"] / hz / r["window_seconds"]

    def pings(r):
        return r.get("pings_answered", 0) + (r.get("backend_pings_answered") or 0)

    w("## Liveness and cost control (issue 15 targets)")
    w("")
    limits = lm.get("rate_limits")
    if limits:
        lim = "rate limits far above the load, evaluated on every message and never reached: " + \
              ", ".join(f"`{l}`" for l in limits)
    else:
        refused = lm.get("rate_limits_refused")
        lim = ("**no rate limits**: the gateway under test refused the keys" +
               (f" (\"{refused.replace('`', '')}\")" if refused else "") + ", so \"on\" is heartbeats only")
    w("The same gateway binary and configuration as \"gateway\" above, in three more processes that add a "
      "`[websocket]` table: **off**: `ping_interval`, `ping_timeout`, `upstream_ping_interval` and "
      f"`upstream_ping_timeout` all `\"0s\"`, no rate limits; **on**: heartbeats at their defaults (a Ping "
      f"after {di:g} s without a frame from that side, {dt:g} s to answer, toward the client and toward the "
      f"agent) and {lim}; **on, Pings every {pi:g} s**: the same with `{pi:g}s` intervals (and "
      f"`{lm.get('ping_timeout_s', 30):g}s` timeouts), for the ping cost.")
    w("")

    if pp:
        w(f"### Closed loop, heartbeats and rate limits off vs on: {meta['ws_conns']} connections, "
          f"{meta['ws_size']}-byte messages, ping-pong")
        w("")
        w("Every connection sends all the time, so no heartbeat falls due: what \"on\" adds is its per-message "
          "bookkeeping (the heartbeat clocks and, when set, the rate-limit buckets). The two variants run back to "
          "back in each round and layout, both started afresh for each pair, the first of the pair alternating; "
          "\"on vs off\" is taken per round. "
          "\"failed\": connections that ended with an error (a rate limit that triggered would show here).")
        w("")
        w("| layout | off: proxy CPU µs/message | on: proxy CPU µs/message | on vs off | off: messages/s | "
          "on: messages/s | failed |")
        w("|---|---|---|---|---|---|---|")
    diffs = {}
    for layout in (1, 2):
        runs = {t: [r for r in pp if r["layout"] == layout and r["target"] == t] for t in ("gateway_off", "gateway_on")}
        if not runs["gateway_off"] and not runs["gateway_on"]:
            continue
        off_by_round = {r["round"]: r for r in runs["gateway_off"]}
        d = [100 * (r["proxy_cpu_us_per_msg"] / off_by_round[r["round"]]["proxy_cpu_us_per_msg"] - 1)
             for r in runs["gateway_on"]
             if r["round"] in off_by_round and r.get("proxy_cpu_us_per_msg") and off_by_round[r["round"]].get("proxy_cpu_us_per_msg")]
        diffs[layout] = d
        cpu = {t: cell([r.get("proxy_cpu_us_per_msg") for r in rs], 1) for t, rs in runs.items()}
        rate = {t: cell([r.get("rate") for r in rs], 0) for t, rs in runs.items()}
        failed = sum(r.get("errors", 0) for rs in runs.values() for r in rs)
        w(f"| {layout} | {cpu['gateway_off']} | {cpu['gateway_on']} | "
          f"{cell(d, 1, True) + ' %' if d else '-'} | {rate['gateway_off']} | {rate['gateway_on']} | {failed} |")
    if pp:
        w("")

    if holds:
        hold_s = sorted({r["hold_seconds"] for r in holds})
        w(f"### Idle sockets: {n_conns} per variant (layout 1)")
        w("")
        w("As in the idle-memory table: each variant started fresh, the sockets opened and checked to echo, then "
          "held idle, and the PSS growth per socket. Idle is not deaf: until the hold ends every client reads its "
          "socket and answers each Ping with a Pong, as a browser does (wsload counts them), and the echo backend "
          "answers and counts the gateway's Pings toward the agent. The gateway's CPU (utime+stime, /proc) is read "
          f"at the start and end of the hold ({', '.join(f'{h:g}' for h in hold_s)} s), with the Pings answered in "
          "that window." + (" No Ping fell due in the hold of \"on\" (every socket was heard from less than "
          f"{di:g} s before its end), so its CPU is the idle baseline." if not any(
              pings(r) for r in holds if r["target"] == "gateway_on") else
          " Some Pings fell due in the hold of \"on\": its CPU, the baseline below, includes them."))
        w("")
        w(f"| variant | KiB/connection at {n_conns} | alive at {n_conns} | PSS at {n_conns} MiB | hold s | "
          "gateway CPU, % of a core | Pings answered in the hold (clients + agent side) |")
        w("|---|---|---|---|---|---|---|")
        for t in ("gateway_off", "gateway_on", "gateway_pings"):
            rs = [r for r in holds if r["target"] == t]
            if not rs:
                continue
            alive = f"{min(r['alive_after_hold'] for r in rs)}/{n_conns}"
            shares = [cpu_share(r) for r in rs]
            w(f"| {names[t]} | {cell([r['kib_per_conn_held'] for r in rs], 1)} | {alive} | "
              f"{cell([r['pss_held_kib'] / 1024 for r in rs], 1)} | {cell([r['hold_seconds'] for r in rs], 0)} | "
              f"{cell([100 * x if x is not None else None for x in shares], 2)} | "
              f"{cell([r.get('pings_answered', 0) for r in rs], 0)} + "
              f"{cell([r.get('backend_pings_answered') for r in rs], 0)} |")
        w("")

    # Ping cost: from the run with Pings every `pi` s, minus the idle baseline of "on".
    ping_runs = [r for r in holds if r["target"] == "gateway_pings" and cpu_share(r) is not None and pings(r)]
    base_runs = [r for r in holds if r["target"] == "gateway_on" and cpu_share(r) is not None]
    base = med([cpu_share(r) for r in base_runs]) if base_runs else 0.0
    per_ping = [(r["proxy_cpu_ticks"] / hz - base * r["window_seconds"]) / pings(r) for r in ping_runs]
    share = [base + n_conns * 2 * c / di for c in per_ping]
    if ping_runs:
        r0 = ping_runs[0] if len(ping_runs) == 1 else None
        w("### What heartbeats cost on idle sockets")
        w("")
        each = (f"{r0['window_seconds']:.1f} s, {r0['pings_answered']:,} Pings answered by the clients and "
                f"{r0.get('backend_pings_answered') or 0:,} by the echo backend, the gateway's CPU "
                f"{r0['proxy_cpu_ticks'] / hz:.2f} s" if r0 else
                "the figures of each run in the table above")
        rate = med([pings(r) / r["window_seconds"] / r["alive_after_hold"] for r in ping_runs if r["alive_after_hold"]])
        w(f"- Measured: {n_conns} idle sockets with Pings every {pi:g} s both ways; over the hold ({each}), "
          f"{fmt(rate, 2)} Pings per socket per second (one each way per interval and round trip).")
        w(f"- Idle baseline B: the gateway's CPU over the hold of \"on\" (same sockets, no Ping due): "
          + (f"{100 * base:.2f}% of a core." if base_runs else "not measured, taken as 0."))
        w(f"- CPU per Ping c = (gateway CPU in the window − B × window) / Pings answered in the window "
          f"(clients + echo backend): **{cell([c * 1e6 for c in per_ping], 1)} µs**. One Ping here is the "
          "whole exchange as the gateway sees it: the timer that finds the side silent, the Ping written, the "
          "Pong read, recognised and dropped.")
        w(f"- At the defaults an idle socket gets one Ping toward the client and one toward the agent every "
          f"{di:g} s (plus a round trip), so {n_conns} idle sockets cost B + {n_conns} × 2 × c / {di:g} s = "
          f"**{cell([100 * x for x in share], 2)}% of one core**.")
        w(f"- Caveat: at {pi:g} s the sockets' state stays warmer in the caches and more timers fall due per "
          f"wake-up than at {di:g} s, so c is if anything a little low; measuring at {di:g} s directly would take "
          "minutes per run. Kernel time in softirq for loopback is not charged to the gateway (as everywhere "
          "in this report).")
        w("")

    w("### Issue 15 targets (gateway)")
    w("")
    w("| target | measured | met? |")
    w("|---|---|---|")
    if diffs:
        meds = {l: med(d) for l, d in diffs.items() if d}
        cols = " / ".join(f"L{l} {'+' if m >= 0 else ''}{fmt(m)} %" for l, m in meds.items())
        ok = "yes" if meds and all(m <= TARGET_LIVE_CPU_PCT for m in meds.values()) else "no"
        w(f"| proxy CPU per message with heartbeats and rate limits on within {TARGET_LIVE_CPU_PCT:g}% of off "
          f"(median of the per-round differences) | {cols or '-'}{'' if limits else ' (heartbeats only)'} | "
          f"{ok if meds else 'not measured'} |")
    on = [r for r in holds if r["target"] == "gateway_on"]
    if on:
        kib = med([r["kib_per_conn_held"] for r in on])
        alive_all = all(r["alive_after_hold"] == n_conns for r in on)
        ref = [r["kib_per_conn_held"] for r in holds if r["target"] == "gateway_off"]
        pings_kib = [r["kib_per_conn_held"] for r in holds if r["target"] == "gateway_pings"]
        extra = ", ".join(x for x in (f"off {fmt(med(ref), 2)}" if ref else "",
                                      f"with Pings every {pi:g} s {fmt(med(pings_kib), 2)}" if pings_kib else "") if x)
        w(f"| ≤ {TARGET_LIVE_KIB:g} KiB per idle WebSocket at {n_conns} with heartbeats on, all alive after the hold | "
          f"{fmt(kib, 2)} KiB{f' ({extra})' if extra else ''}, {'all' if alive_all else 'NOT all'} alive | "
          f"{'yes' if kib <= TARGET_LIVE_KIB and alive_all else 'no'} |")
    if share:
        m = med(share) * 100
        w(f"| {n_conns} idle sockets pinged every {di:g} s cost < {TARGET_PING_CORE_PCT:g}% of a core | "
          f"{m:.2f}% | {'yes' if m < TARGET_PING_CORE_PCT else 'no'} |")
    w("")


if __name__ == "__main__":
    main()
