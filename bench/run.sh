#!/usr/bin/env bash
# Benchmarks agent-gateway side by side with nginx and HAProxy (and no proxy at all) on
# 127.0.0.1. One command: installs what it needs, builds, runs, writes
# bench/results/RESULTS.md and prints it. See bench/README.md.
#
#   bench/run.sh              full run (about 33 minutes on 2 cores), liveness and storm phases included
#   bench/run.sh --quick      smoke run (a few minutes): fewer rounds, shorter runs
#   bench/run.sh --storm-only the reconnect storm alone (about 5 minutes; 1 with --quick)
#
# Options: --no-install (never call apt-get), --no-build (reuse target/release/agent-gateway),
# --rounds N (override the number of load rounds), --liveness / --no-liveness (the issue 15
# phase: heartbeats and rate limits off vs on, idle memory, ping cost; on by default in a full
# run only), --storm / --no-storm (the reconnect storm with authentication: new upgrades per
# second, CPU per upgrade; on by default in a full run only, last, in the time left),
# --storm-only (only that phase: raw-<stamp>-storm.jsonl, or storm-quick with --quick),
# --storm-rounds N (rounds of the storm phase; 3 by default, 1 quick),
# --bin-dir DIR (test DIR/agent-gateway and DIR/examples/bare_pingora, built
# elsewhere, instead of building this tree; GATEWAY_REV=... names them in the report),
# --no-sse (leave out the server-sent events test of the load rounds, about 4.5 minutes of a
# full run: the time budget shrinks back by its share).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
STARTED=$(date +%s)

MODE=full
INSTALL=1
BUILD=1
ROUNDS_OVERRIDE=""
LIVENESS=""     # empty: on in a full run, off in a quick one
STORM=""        # the same
STORM_ONLY=0
STORM_ROUNDS_OVERRIDE=""
BIN_DIR=""
SSE=1           # the server-sent events test in the load rounds
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) MODE=quick ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        --rounds) ROUNDS_OVERRIDE="${2:?--rounds needs a number}"; shift ;;
        --liveness) LIVENESS=1 ;;
        --no-liveness) LIVENESS=0 ;;
        --storm) STORM=1 ;;
        --no-storm) STORM=0 ;;
        --storm-only) STORM_ONLY=1 ;;
        --storm-rounds) STORM_ROUNDS_OVERRIDE="${2:?--storm-rounds needs a number}"; shift ;;
        --no-sse) SSE=0 ;;
        --bin-dir) BIN_DIR="$(cd "${2:?--bin-dir needs a folder}" && pwd)"; BUILD=0; shift ;;
        -h | --help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# ---- Parameters -------------------------------------------------------------------------
if [[ $MODE == full ]]; then
    ROUNDS=4        # load rounds; every target runs every test once per round and layout
    DUR=5           # seconds measured per load run
    WARMUP=1        # seconds of WebSocket traffic before measuring
    MEM_ROUNDS=2    # idle-memory rounds
    HOLD=10         # seconds the idle sockets are held
    BUDGET=1740     # seconds for the whole script (29 min) without the SSE test; rounds are cut to fit
else
    ROUNDS=2; DUR=2; WARMUP=0.5; MEM_ROUNDS=1; HOLD=3; BUDGET=600
fi
[[ -n $ROUNDS_OVERRIDE ]] && ROUNDS=$ROUNDS_OVERRIDE
[[ -n $LIVENESS ]] || { [[ $MODE == full ]] && LIVENESS=1 || LIVENESS=0; }
[[ -n $STORM ]] || { [[ $MODE == full ]] && STORM=1 || STORM=0; }
if ((STORM_ONLY)); then
    # Nothing but the storm phase, in a raw file of its own: raw-<stamp>-storm.jsonl is never
    # "the newest full run"; report.py adds it to RESULTS.md (see section 8).
    STORM=1; LIVENESS=0; ROUNDS=0; MEM_ROUNDS=0
    [[ $MODE == full ]] && MODE=storm || MODE=storm-quick
fi

# Reconnect storm (the auth issue), with --storm: STORM_RATE new WebSocket upgrades per second
# for STORM_WARMUP + STORM_DUR s over fresh TCP connections, each: connect, upgrade (with an
# Authorization: Bearer token where the route has a policy), 101, one STORM_SIZE-byte message
# and its echo, Close. Targets: nginx and HAProxy (plain upgrades, their usual configs) and one
# gateway process with a public route (auth off) and a route per policy (HS256, ES256, RS256,
# API key); the JWT targets with one token reused ("seen before", cached) and with a new token
# per upgrade ("_first": the first verification). Layout 2 (the proxy alone on core 0). Then the
# open-loop message test (ws_rate, STORM_MSG_DUR s) on the public and the HS256 route, twice
# each in A B B A order: nothing may be added per message.
if [[ $MODE == full || $MODE == storm ]]; then
    STORM_ROUNDS=3; STORM_RATE=1000; STORM_WARMUP=1; STORM_DUR=4; STORM_MSG_DUR=3
else
    STORM_ROUNDS=1; STORM_RATE=1000; STORM_WARMUP=0.5; STORM_DUR=2; STORM_MSG_DUR=2
fi
[[ -n $STORM_ROUNDS_OVERRIDE ]] && STORM_ROUNDS=$STORM_ROUNDS_OVERRIDE
STORM_SIZE=64
STORM_WARM_S=2  # s of unrecorded storm through each proxy and gateway route before the rounds
STORM_TARGETS=(nginx haproxy auth_off hs256 apikey es256 rs256 hs256_first es256_first rs256_first)
FIXTURES="$ROOT/tests/fixtures/auth"   # test-only key pairs (public in the repository)
# Bench-only secrets of the storm gateway's policies (they protect nothing but the echo backend).
export BENCH_HS256_KEY="bench-only-hs256-shared-secret-not-for-anything-else"
export BENCH_API_KEY="bench-only-api-key-0123456789abcdef"

# Liveness and cost control (issue 15), with --liveness: gateway_off (heartbeats and rate
# limits off) against gateway_on (heartbeats at their defaults, rate limits far above the
# load) in the closed-loop ping-pong, both layouts, LIVE_ROUNDS rounds; then LIVE_CONNS idle
# sockets held by each (memory, and the idle CPU baseline), and by gateway_pings (gateway_on
# with Pings every PING_INTERVAL s both ways) for PING_HOLD s: the ping cost.
LIVE_ROUNDS=$ROUNDS
LIVE_MEM_ROUNDS=$MEM_ROUNDS
LIVE_CONNS=9000
PING_INTERVAL=1        # s, both directions, in the ping-cost run ...
PING_TIMEOUT=30        # ... with a timeout no slow answer can reach
DEFAULT_PING_INTERVAL=25  # the defaults gateway_on runs with and the cost is projected to
DEFAULT_PING_TIMEOUT=10
[[ $MODE == full ]] && PING_HOLD=15 || PING_HOLD=5

ECHO_PORT=${ECHO_PORT:-18001}
HELLO_PORT=${HELLO_PORT:-18002}
GATEWAY_PORT=${GATEWAY_PORT:-18080}
GATEWAY_ADMIN_PORT=${GATEWAY_ADMIN_PORT:-18090}
NGINX_PORT=${NGINX_PORT:-18081}
HAPROXY_PORT=${HAPROXY_PORT:-18082}
PINGORA_PORT=${PINGORA_PORT:-18083}
GATEWAY_OFF_PORT=${GATEWAY_OFF_PORT:-18084}      # the liveness phase's gateway variants
GATEWAY_ON_PORT=${GATEWAY_ON_PORT:-18085}
GATEWAY_PINGS_PORT=${GATEWAY_PINGS_PORT:-18086}
GATEWAY_OFF_ADMIN_PORT=${GATEWAY_OFF_ADMIN_PORT:-18091}
GATEWAY_ON_ADMIN_PORT=${GATEWAY_ON_ADMIN_PORT:-18092}
GATEWAY_PINGS_ADMIN_PORT=${GATEWAY_PINGS_ADMIN_PORT:-18093}
GATEWAY_AUTH_PORT=${GATEWAY_AUTH_PORT:-18087}               # the storm phase's gateway
GATEWAY_AUTH_ADMIN_PORT=${GATEWAY_AUTH_ADMIN_PORT:-18094}

HTTP_CONNS=64          # wrk connections (one wrk thread)
SSE_CONNS=16           # server-sent event streams, each read as fast as it comes ...
SSE_SIZE=64            # ... of events this many bytes ("data: xxx...\n\n"), one chunk each
SSE_WARMUP=0.5         # seconds of streaming before measuring (a stream is at full speed at once)
SSE_PACED_MS=20        # the start-up check's paced stream: an event every this many ms
SSE_PACED=""           # its result per target (events per read), for the meta file
WS_CONNS=64            # closed-loop WebSocket connections
WS_SIZE=64             # bytes per WebSocket message
RATE=20000             # open-loop messages per second ...
RATE_CONNS=100         # ... over this many connections
MEM_SIZES="1000 9000"  # idle WebSockets held per memory run
HAPROXY_MAXCONN=9900   # HAProxy needs 2 fds per proxied connection; the box caps at 20000
QUIET_IDLE=90          # % idle the box must show before a run starts
QUIET_WAIT=20          # seconds to wait for that, at most, before running anyway (flagged)
FOREIGN_MAX=5          # % of one core of CPU by other processes during a run => repeat it
MAX_RETRIES=2          # repeats of a noisy run before it is kept (flagged)

# "pingora" is Pingora with default hooks (examples/bare_pingora.rs): the gateway's floor.
TARGETS=(direct gateway pingora nginx haproxy)
PROXIES=(gateway pingora nginx haproxy)
TESTS=(http ws_pingpong ws_rate)
((SSE)) && TESTS=(http sse ws_pingpong ws_rate)
# The SSE test's share of the time budget (what it adds to the load rounds: per round, 2
# layouts x 5 targets x (the run, its warm-up, and about 1.5 s of start, noise check and stop)):
# added to the budget, so that it takes no time from the phases after the load rounds.
SSE_RESERVE=$((SSE ? ROUNDS * 2 * ${#TARGETS[@]} * (${DUR%.*} + 2) : 0))
BUDGET=$((BUDGET + SSE_RESERVE))

STAMP=$(date +%Y%m%d-%H%M%S)
RUN="$HERE/.run/$STAMP"
RESULTS="${BENCH_RESULTS:-$HERE/results}"  # BENCH_RESULTS=dir writes elsewhere (smoke tests)
RAW="$RESULTS/raw-$STAMP-$MODE.jsonl"
mkdir -p "$RUN" "$RESULTS"
: >"$RAW"

log() { printf '[%s +%ss] %s\n' "$(date +%T)" "$(($(date +%s) - STARTED))" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---- Processes: every one we start is recorded by PID and stopped by PID -----------------
declare -A PID=()

stop_proc() {
    local name=$1 pid=${PID[$1]:-}
    [[ -z $pid ]] && return 0
    local children
    children=$(pgrep -P "$pid" 2>/dev/null || true)
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # nginx's worker ends with its master; make sure, by its own PID.
    for c in $children; do
        for _ in $(seq 30); do kill -0 "$c" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$c" 2>/dev/null || true
    done
    unset "PID[$name]"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for name in "${!PID[@]}"; do stop_proc "$name"; done
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---- 1. What the harness needs ------------------------------------------------------------
need=()
for tool in nginx:nginx haproxy:haproxy wrk:wrk taskset:util-linux python3:python3 curl:curl; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool#*:}")
done
if ((${#need[@]})); then
    ((INSTALL)) || die "missing ${need[*]} (run without --no-install)"
    log "installing ${need[*]} (apt-get)"
    # Services must not start on install: nothing of this harness listens beyond 127.0.0.1.
    apt-get update -qq
    RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >"$RUN/apt.log"
fi
[[ $(nproc) -ge 2 ]] || die "two cores are needed for the pinned layouts"

# ---- 2. Builds ------------------------------------------------------------------------------
BIN="$RUN/bin"
mkdir -p "$BIN"
if ((BUILD)); then
    log "building the gateway (cargo build --release)"
    (cd "$ROOT" && cargo build --release --quiet && cargo build --release --quiet --example bare_pingora) ||
        die "the gateway does not build"
fi
GW_DIR="${BIN_DIR:-$ROOT/target/release}"
[[ -x "$GW_DIR/agent-gateway" ]] || die "no $GW_DIR/agent-gateway"
[[ -x "$GW_DIR/examples/bare_pingora" ]] || die "no $GW_DIR/examples/bare_pingora"
# Copies: a rebuild by someone else during the run cannot swap the binaries under test.
cp "$GW_DIR/agent-gateway" "$GW_DIR/examples/bare_pingora" "$BIN/"
if [[ -n $BIN_DIR ]]; then
    GATEWAY_REV="${GATEWAY_REV:-unknown, from --bin-dir}"
else
    GATEWAY_REV="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '+local-changes')"
fi
log "building the load generator and backends (bench/loadgen)"
(cd "$HERE/loadgen" && cargo build --release --quiet) || die "bench/loadgen does not build"
for b in echo-backend hello-backend wsload; do cp "$HERE/loadgen/target/release/$b" "$BIN/"; done
WSLOAD="$BIN/wsload"

# Sockets: as many descriptors as this box allows (9000 idle WebSockets need ~18000 in a proxy).
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
((NOFILE >= 19000)) || log "warning: only $NOFILE open files allowed; the 9000-socket run may fail"
NGINX_WORKER_CONNECTIONS=$((NOFILE - 100))
HZ=$(getconf CLK_TCK)

# Ports: the defaults, or the first of default+1000, +2000, ... that nothing listens on.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
    local p=$1 i
    for i in 0 1 2 3 4 5; do
        port_taken $((p + 1000 * i)) || { echo $((p + 1000 * i)); return 0; }
    done
    die "no free port near $p"
}
PORT_VARS=(ECHO_PORT HELLO_PORT GATEWAY_PORT GATEWAY_ADMIN_PORT NGINX_PORT HAPROXY_PORT PINGORA_PORT)
((LIVENESS)) && PORT_VARS+=(GATEWAY_OFF_PORT GATEWAY_ON_PORT GATEWAY_PINGS_PORT GATEWAY_OFF_ADMIN_PORT
    GATEWAY_ON_ADMIN_PORT GATEWAY_PINGS_ADMIN_PORT)
((STORM)) && PORT_VARS+=(GATEWAY_AUTH_PORT GATEWAY_AUTH_ADMIN_PORT)
for var in "${PORT_VARS[@]}"; do
    chosen=$(pick_port "${!var}")
    [[ $chosen == "${!var}" ]] || log "port ${!var} is taken; $var=$chosen"
    printf -v "$var" '%s' "$chosen"
done

# ---- 3. Configurations, rendered from bench/conf into the run folder --------------------
render() {
    sed -e "s|@RUN@|$RUN|g" -e "s|@ECHO_PORT@|$ECHO_PORT|g" -e "s|@HELLO_PORT@|$HELLO_PORT|g" \
        -e "s|@GATEWAY_PORT@|$GATEWAY_PORT|g" -e "s|@GATEWAY_ADMIN_PORT@|$GATEWAY_ADMIN_PORT|g" \
        -e "s|@NGINX_PORT@|$NGINX_PORT|g" -e "s|@HAPROXY_PORT@|$HAPROXY_PORT|g" \
        -e "s|@NOFILE@|$NOFILE|g" -e "s|@NGINX_WORKER_CONNECTIONS@|$NGINX_WORKER_CONNECTIONS|g" \
        -e "s|@HAPROXY_MAXCONN@|$HAPROXY_MAXCONN|g" "$HERE/conf/$1.tmpl" >"$RUN/${2:-$1}"
}
render gateway.toml
render nginx.conf
render haproxy.cfg
mkdir -p "$RUN/nginx-tmp"
# The gateway refuses to route agents whose required secret (OPENROUTER_API_KEY by default) is
# unset; the benchmark backends need none, so a placeholder stands in (it goes nowhere).
export OPENROUTER_API_KEY="${OPENROUTER_API_KEY:-bench-placeholder-not-a-key}"
"$BIN/agent-gateway" check -c "$RUN/gateway.toml" >"$RUN/gateway-check.txt" 2>&1 ||
    { cat "$RUN/gateway-check.txt" >&2; die "gateway config refused"; }

# The liveness phase's variants: gateway.toml on ports of their own, plus a [websocket] table.
render_variant() { # name port admin_port fragment ping_interval ping_timeout
    (GATEWAY_PORT=$2; GATEWAY_ADMIN_PORT=$3; render gateway.toml "$1.toml")
    sed -e "s|@PING_INTERVAL@|$5|g" -e "s|@PING_TIMEOUT@|$6|g" "$HERE/conf/$4.tmpl" >>"$RUN/$1.toml"
}
check_variant() { "$BIN/agent-gateway" check -c "$RUN/$1.toml" >"$RUN/$1-check.txt" 2>&1; }
RATE_LIMITS=""          # the rate-limit lines gateway_on runs with, when the gateway took them
RATE_LIMITS_REFUSED=""  # else what `check` said about them
if ((LIVENESS)); then
    render_variant gateway_off "$GATEWAY_OFF_PORT" "$GATEWAY_OFF_ADMIN_PORT" websocket-off.toml 0s 0s
    render_variant gateway_on "$GATEWAY_ON_PORT" "$GATEWAY_ON_ADMIN_PORT" websocket-on.toml \
        "${DEFAULT_PING_INTERVAL}s" "${DEFAULT_PING_TIMEOUT}s"
    render_variant gateway_pings "$GATEWAY_PINGS_PORT" "$GATEWAY_PINGS_ADMIN_PORT" websocket-on.toml \
        "${PING_INTERVAL}s" "${PING_TIMEOUT}s"
    if check_variant gateway_on; then
        RATE_LIMITS=$(sed -n '/# rate-limits: begin/,/# rate-limits: end/{/^[a-z]/p}' "$RUN/gateway_on.toml")
    else
        # A gateway without rate limits yet (or with keys named otherwise): heartbeats only.
        RATE_LIMITS_REFUSED=$( (grep -m1 -iE 'error|unknown' "$RUN/gateway_on-check.txt" || head -1 "$RUN/gateway_on-check.txt") |
            sed -e 's/, expected one of.*//' -e "s|$RUN/||" -e 's/^error: //')
        log "warning: the gateway refuses the rate-limit keys ($RATE_LIMITS_REFUSED); gateway_on runs without rate limits"
        sed -i '/# rate-limits: begin/,/# rate-limits: end/d' "$RUN/gateway_on.toml" "$RUN/gateway_pings.toml"
    fi
    for v in gateway_off gateway_on gateway_pings; do
        check_variant "$v" || { cat "$RUN/$v-check.txt" >&2; die "$v config refused"; }
    done
fi
# The storm phase's gateway: gateway.toml on ports of its own plus the [auth] policies and their
# routes; the JWKS (RS256 and ES256 keys) made from the test-only fixture keys.
STORM_REFUSED=""
if ((STORM)); then
    "$WSLOAD" jwks --keys "bench-rs256=$FIXTURES/rsa-private.pem,bench-es256=$FIXTURES/ec256-private.pem" \
        >"$RUN/jwks.json" || die "cannot make the storm JWKS from $FIXTURES"
    (GATEWAY_PORT=$GATEWAY_AUTH_PORT; GATEWAY_ADMIN_PORT=$GATEWAY_AUTH_ADMIN_PORT; render gateway.toml gateway_auth.toml)
    cat "$HERE/conf/auth-storm.toml.tmpl" >>"$RUN/gateway_auth.toml"
    if ! check_variant gateway_auth; then
        # A gateway without [auth] (an older --bin-dir build): the rest of the run goes on.
        STORM_REFUSED=$( (grep -m1 -iE 'error|unknown' "$RUN/gateway_auth-check.txt" || head -1 "$RUN/gateway_auth-check.txt") | sed "s|$RUN/||")
        ((STORM_ONLY)) && { cat "$RUN/gateway_auth-check.txt" >&2; die "gateway_auth config refused"; }
        log "warning: the gateway refuses the storm phase's [auth] config ($STORM_REFUSED); no storm phase"
        STORM=0
    fi
fi
nginx -t -q -e "$RUN/nginx-error.log" -c "$RUN/nginx.conf" || die "nginx config refused"
haproxy -c -q -f "$RUN/haproxy.cfg" || die "haproxy config refused"


# ---- 4. Starting and checking the processes -------------------------------------------------
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

port_of() {
    case $1 in
        gateway) echo "$GATEWAY_PORT" ;; nginx) echo "$NGINX_PORT" ;; haproxy) echo "$HAPROXY_PORT" ;;
        pingora) echo "$PINGORA_PORT" ;; gateway_off) echo "$GATEWAY_OFF_PORT" ;;
        gateway_on) echo "$GATEWAY_ON_PORT" ;; gateway_pings) echo "$GATEWAY_PINGS_PORT" ;;
        gateway_auth) echo "$GATEWAY_AUTH_PORT" ;;
    esac
}

start_backends() {
    taskset -c 0 "$BIN/echo-backend" --listen "127.0.0.1:$ECHO_PORT" >"$RUN/echo.log" 2>&1 &
    PID[echo]=$!
    taskset -c 0 "$BIN/hello-backend" --listen "127.0.0.1:$HELLO_PORT" >"$RUN/hello.log" 2>&1 &
    PID[hello]=$!
    wait_port "$ECHO_PORT" && wait_port "$HELLO_PORT" || die "backends did not start"
}

# Proxies run on core 0, every thread (affinity is inherited from taskset).
start_proxy() {
    case $1 in
        gateway | gateway_off | gateway_on | gateway_pings | gateway_auth)
            RUST_LOG=${RUST_LOG:-info} taskset -c 0 "$BIN/agent-gateway" run -c "$RUN/$1.toml" \
                >>"$RUN/$1.log" 2>&1 &
            PID[$1]=$! ;;
        pingora)
            taskset -c 0 "$BIN/bare_pingora" "127.0.0.1:$PINGORA_PORT" "127.0.0.1:$HELLO_PORT" \
                "127.0.0.1:$ECHO_PORT" >>"$RUN/pingora.log" 2>&1 &
            PID[pingora]=$! ;;
        nginx)
            taskset -c 0 nginx -e "$RUN/nginx-error.log" -c "$RUN/nginx.conf" >>"$RUN/nginx.log" 2>&1 &
            PID[nginx]=$! ;;
        haproxy)
            taskset -c 0 haproxy -db -f "$RUN/haproxy.cfg" >>"$RUN/haproxy.log" 2>&1 &
            PID[haproxy]=$! ;;
    esac
    wait_port "$(port_of "$1")" || die "$1 did not start (see $RUN/$1.log)"
    check_proxy "$1" || die "$1 does not proxy both paths (see $RUN)"
}

restart_proxy() { stop_proc "$1"; start_proxy "$1"; }

# The same two requests through every proxy: a plain GET, and a WebSocket that echoes.
check_proxy() {
    local port body
    port=$(port_of "$1")
    for _ in $(seq 30); do
        body=$(curl -fsS --max-time 2 "http://127.0.0.1:$port/agents/hello/default" 2>/dev/null || true)
        if [[ $body == "Hello, world" ]] &&
            timeout 10 "$WSLOAD" probe --url "ws://127.0.0.1:$port/agents/bench/probe" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# PIDs whose CPU or memory counts as the proxy's: nginx's master and worker, else the process.
proxy_pids() {
    case $1 in
        direct) [[ $2 == http || $2 == sse ]] && echo "${PID[hello]}" || echo "${PID[echo]}" ;;
        nginx) echo "${PID[nginx]}" $(pgrep -P "${PID[nginx]}" || true) ;;
        auth_off | hs256* | es256* | rs256* | apikey) echo "${PID[gateway_auth]}" ;;
        *) echo "${PID[$1]}" ;;
    esac
}
csv() { echo "$*" | tr ' ' ','; }

# Layout 1: proxy and backends on core 0, client on core 1.
# Layout 2: proxy alone on core 0, backends and client on core 1.
pin_layout() {
    local core=$(($1 == 1 ? 0 : 1))
    taskset -a -pc "$core" "${PID[echo]}" >/dev/null
    taskset -a -pc "$core" "${PID[hello]}" >/dev/null
}

# ---- 5. Noise control -------------------------------------------------------------------
# /proc/stat's first line: user nice system idle iowait irq softirq steal.
stat_line() { head -1 /proc/stat | awk '{print $2, $3, $4, $5, $6, $7, $8, $9}'; }

# Percent idle of the whole box over half a second.
idle_pct() {
    local a b
    a=$(stat_line); sleep 0.5; b=$(stat_line)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x); split(b, y); t = 0
        for (i = 1; i <= 8; i++) t += y[i] - x[i]
        printf "%.0f", (t > 0 ? 100 * ((y[4] - x[4]) + (y[5] - x[5])) / t : 100) }'
}

# Waits until the box is quiet; prints the last idle figure.
wait_quiet() {
    local waited=0 idle
    while :; do
        idle=$(idle_pct)
        ((idle >= QUIET_IDLE)) && { echo "$idle"; return 0; }
        ((waited >= QUIET_WAIT)) && { echo "$idle"; return 0; }
        ((waited == 0)) && log "box busy (${idle}% idle); waiting for quiet"
        sleep 2; waited=$((waited + 2))
    done
}

# User ticks of every process we started (the rest of the box's user time is foreign).
our_user_ticks() {
    local total=0 p t extra=""
    [[ -n ${PID[nginx]:-} ]] && extra=$(pgrep -P "${PID[nginx]}" 2>/dev/null || true)
    for p in "${PID[@]}" $extra; do
        t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12}') || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}
box_user_ticks() { head -1 /proc/stat | awk '{print $2 + $3}'; }
# Time the hypervisor gave to others while our vCPUs wanted to run: noise we cannot see inside.
box_steal_ticks() { head -1 /proc/stat | awk '{print $9}'; }
cpu_ticks() {
    local total=0 p t
    for p in "$@"; do
        t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}
now() { date +%s.%N; }

# ---- 6. One measured run ------------------------------------------------------------------
# wrk's latency figures come as 771.00us, 1.23ms or 2.00s.
to_us() { awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000;
    else if (v ~ /m$/) print n * 60e6; else if (v ~ /s$/) print n * 1e6; else print "null" }'; }

# The storm phase's targets: the port, the route prefix and the token arguments of wsload.
storm_target() { # target -> sets ST_PORT, ST_PREFIX and the array ST_ARGS
    ST_PORT=$GATEWAY_AUTH_PORT; ST_PREFIX=/agents; ST_ARGS=()
    case $1 in
        nginx | haproxy) ST_PORT=$(port_of "$1") ;;
        auth_off) ;;
        hs256 | es256 | rs256 | apikey) ST_PREFIX=/$1; ST_ARGS=(--token "${STORM_TOKEN[$1]}") ;;
        hs256_first) ST_PREFIX=/hs256; ST_ARGS=(--mint-alg HS256 --mint-secret-env BENCH_HS256_KEY) ;;
        es256_first) ST_PREFIX=/es256
            ST_ARGS=(--mint-alg ES256 --mint-key "$FIXTURES/ec256-private.pem" --mint-kid bench-es256) ;;
        rs256_first) ST_PREFIX=/rs256
            ST_ARGS=(--mint-alg RS256 --mint-key "$FIXTURES/rsa-private.pem" --mint-kid bench-rs256) ;;
        *) return 1 ;;
    esac
}

run_once() { # layout test target -> JSON on stdout
    local layout=$1 test=$2 target=$3 port url pids json prefix=/agents
    local -a auth=()
    if [[ $target == direct ]]; then
        [[ $test == http || $test == sse ]] && port=$HELLO_PORT || port=$ECHO_PORT
    elif [[ $test == storm ]] || [[ $target == auth_off || $target == hs256 ]]; then
        storm_target "$target" || return 1
        port=$ST_PORT; prefix=$ST_PREFIX; auth=("${ST_ARGS[@]}")
    else
        port=$(port_of "$target")
    fi
    pids=$(proxy_pids "$target" "$test")
    case $test in
        http)
            url="http://127.0.0.1:$port/agents/hello/default"
            local c0 c1 out
            c0=$(cpu_ticks $pids)
            timeout $((DUR + 30)) taskset -c 1 "$WSLOAD" exec --out "$RUN/client.json" -- \
                wrk -t1 -c"$HTTP_CONNS" -d"${DUR}s" --latency "$url" >"$RUN/wrk.out" 2>&1 || true
            c1=$(cpu_ticks $pids)
            out="$RUN/wrk.out"
            local req rps p50 p99 errs
            req=$(awk '/requests in/ {print $1}' "$out")
            rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
            p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")
            p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")
            errs=$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} END {print n + 0}' "$out")
            [[ -n $req && -n $rps ]] || { log "wrk failed: $(tr '\n' ' ' <"$out")"; return 1; }
            json=$(awk -v req="$req" -v rps="$rps" -v t="$((c1 - c0))" -v hz="$HZ" -v p50="$p50" -v p99="$p99" -v e="$errs" \
                'BEGIN { printf "{\"mode\":\"http\",\"conns\":%d,\"requests\":%d,\"rate\":%s,\"p50_us\":%s,\"p99_us\":%s,\"proxy_cpu_ticks\":%d,\"proxy_cpu_us_per_msg\":%.3f,\"errors\":%d}",
                    '"$HTTP_CONNS"', req, rps, p50, p99, t, t * 1e6 / hz / req, e }')
            ;;
        sse)
            url="http://127.0.0.1:$port/agents/hello/s{i}/events?size=$SSE_SIZE"
            json=$(timeout $((DUR + 60)) taskset -c 1 "$WSLOAD" exec --out "$RUN/client.json" -- \
                "$WSLOAD" sse --url "$url" --conns "$SSE_CONNS" --warmup "$SSE_WARMUP" --duration "$DUR" \
                --cpu-pids "$(csv $pids)" 2>>"$RUN/sse.log") || return 1
            ;;
        ws_pingpong)
            url="ws://127.0.0.1:$port$prefix/bench/c{i}"
            json=$(timeout $((DUR + 60)) taskset -c 1 "$WSLOAD" exec --out "$RUN/client.json" -- \
                "$WSLOAD" pingpong --url "$url" --conns "$WS_CONNS" --size "$WS_SIZE" \
                --warmup "$WARMUP" --duration "$DUR" --cpu-pids "$(csv $pids)" "${auth[@]}") || return 1
            ;;
        storm)
            url="ws://127.0.0.1:$port$prefix/bench/s{i}"
            json=$(timeout $((${STORM_DUR%.*} + 90)) taskset -c 1 "$WSLOAD" exec --out "$RUN/client.json" -- \
                "$WSLOAD" storm --url "$url" --rate "$STORM_RATE" --size "$STORM_SIZE" \
                --warmup "$STORM_WARMUP" --duration "$STORM_DUR" --cpu-pids "$(csv $pids)" "${auth[@]}" \
                2>>"$RUN/storm.log") || return 1
            ;;
        ws_rate)
            url="ws://127.0.0.1:$port$prefix/bench/r{i}"
            json=$(timeout $((DUR + 60)) taskset -c 1 "$WSLOAD" exec --out "$RUN/client.json" -- \
                "$WSLOAD" rate --url "$url" --conns "$RATE_CONNS" --rate "$RATE" --size "$WS_SIZE" \
                --warmup "$WARMUP" --duration "$DUR" --cpu-pids "$(csv $pids)" "${auth[@]}") || return 1
            ;;
    esac
    echo "$json"
}

FOREIGN_RETRIES=0
SKIPPED=0
over_budget() { (($(date +%s) - STARTED + ${1:-0} > BUDGET)); }
measure() { # round layout test target [phase]: runs until quiet enough (bounded), appends to RAW
    local round=$1 layout=$2 test=$3 target=$4 phase=${5:-load} attempt=0 json idle u0 o0 t0 u1 o1 t1 client foreign noisy s0 s1 steal
    if over_budget "$RESERVE"; then SKIPPED=$((SKIPPED + 1)); return 0; fi
    while :; do
        attempt=$((attempt + 1))
        idle=$(wait_quiet)
        u0=$(box_user_ticks); o0=$(our_user_ticks); s0=$(box_steal_ticks); t0=$(now)
        rm -f "$RUN/client.json"
        json=$(run_once "$layout" "$test" "$target") || { log "run failed: $test $target"; json=""; }
        u1=$(box_user_ticks); o1=$(our_user_ticks); s1=$(box_steal_ticks); t1=$(now)
        client=$(sed -n 's/.*"client_user_us":\([0-9]*\).*/\1/p' "$RUN/client.json" 2>/dev/null || true)
        foreign=$(awk -v du=$((u1 - u0)) -v dours=$((o1 - o0)) -v cu="${client:-0}" -v hz="$HZ" -v dt="$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" \
            'BEGIN { f = du - dours - cu * hz / 1e6; if (f < 0) f = 0; printf "%.1f", 100 * f / (dt * hz) }')
        steal=$(awk -v d=$((s1 - s0)) -v hz="$HZ" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", 100 * d / ((b - a) * hz) }')
        noisy=false
        if awk -v f="$foreign" -v s="$steal" -v m="$FOREIGN_MAX" 'BEGIN { exit !(f > m || s > m) }'; then noisy=true; fi
        if [[ $noisy == true && $attempt -le $MAX_RETRIES ]] && ! over_budget "$RESERVE"; then
            FOREIGN_RETRIES=$((FOREIGN_RETRIES + 1))
            log "  other load took ${foreign}% of a core (steal ${steal}%) during $test/$target; repeating"
            continue
        fi
        break
    done
    [[ -n $json ]] || return 0
    echo "${json%\}},\"phase\":\"$phase\",\"round\":$round,\"layout\":$layout,\"test\":\"$test\",\"target\":\"$target\",\"attempt\":$attempt,\"idle_before_pct\":$idle,\"foreign_pct\":$foreign,\"steal_pct\":$steal,\"noisy\":$noisy}" >>"$RAW"
    local summary
    summary=$(echo "$json" | python3 -c 'import json, sys
r = json.load(sys.stdin)
out = []
if "rate" in r: out.append("%.0f/s" % r["rate"])
if r.get("mode") == "sse": out.append("%.1f events/read" % r["events_per_read"])
if r.get("mode") == "rate": out.append("p50 %.0f us, p99 %.0f us" % (r["p50_us"], r["p99_us"]))
if r.get("mode") == "storm":
    out.append("handshake p50 %.0f us, p99 %.0f us, %.1f us proxy CPU/upgrade, %d failed%s" % (r["handshake_p50_us"] or 0,
        r["handshake_p99_us"] or 0, r["proxy_cpu_us_per_upgrade"] or 0, r["failed"], (" (" + r["error"] + ")") if r.get("error") else ""))
if sys.argv[1] != "direct" and r.get("proxy_cpu_us_per_msg") is not None: out.append("%.1f us proxy CPU/op" % r["proxy_cpu_us_per_msg"])
print(", ".join(out))' "$target" 2>/dev/null || echo "?")
    log "  L$layout $test $target: $summary$([[ $noisy == true ]] && echo ' (noisy, kept)')"
}

rotate() { # offset items... -> items rotated left by offset
    local k=$1; shift
    local -a a=("$@")
    local n=${#a[@]} i
    for ((i = 0; i < n; i++)); do printf '%s ' "${a[$(((i + k) % n))]}"; done
}

# ---- 7. The runs --------------------------------------------------------------------------
log "mode $MODE: $ROUNDS load rounds of ${DUR}s runs (${TESTS[*]}), $MEM_ROUNDS memory rounds of ${HOLD}s holds$( ((STORM)) && echo ", $STORM_ROUNDS storm round(s)"); run folder $RUN"
start_backends
if ((!STORM_ONLY)); then
    for p in "${PROXIES[@]}"; do start_proxy "$p"; done
    log "all targets answer on both paths"
    if ((SSE)); then
        # Each target must stream events on the SSE path (200, text/event-stream, no length),
        # and pass them on as they come: one stream paced at an event every SSE_PACED_MS ms
        # should bring one event per read; more means the proxy held events back (a warning,
        # and the figure goes into the meta file and the report).
        for target in "${TARGETS[@]}"; do
            [[ $target == direct ]] && port=$HELLO_PORT || port=$(port_of "$target")
            json=$(timeout 20 "$WSLOAD" sse --url "http://127.0.0.1:$port/agents/hello/check/events?size=$SSE_SIZE&every_ms=$SSE_PACED_MS" \
                --conns 1 --warmup 0.1 --duration 0.6 2>>"$RUN/sse.log") ||
                die "$target does not stream events (see $RUN/sse.log)"
            epr=$(echo "$json" | sed -n 's/.*"events_per_read":\([0-9.]*\).*/\1/p')
            SSE_PACED="$SSE_PACED${SSE_PACED:+, }\"$target\": ${epr:-null}"
            if awk -v e="${epr:-0}" 'BEGIN { exit !(e > 1.5) }'; then
                log "warning: $target passes paced events on in bunches ($epr per read, one every ${SSE_PACED_MS} ms sent): it holds them back"
            fi
        done
        log "all targets stream server-sent events (paced, events per read: $SSE_PACED)"
    fi
fi

# Time left for the load rounds: the memory runs (and the liveness phase) need their share.
MEM_RESERVE=$((MEM_ROUNDS * ${#PROXIES[@]} * (2 * ${HOLD%.*} + 30) + 30))
# The liveness phase: its ping-pong runs, then per round two idle holds and the ping run
# (a 9000-socket hold takes about 8 s more than the hold itself: start, open, settle, check).
LIVE_HOLD_RESERVE=$((LIVE_MEM_ROUNDS * (2 * (${HOLD%.*} + 15) + PING_HOLD + 15)))
LIVE_RESERVE=$((LIVENESS ? LIVE_ROUNDS * 4 * (DUR + ${WARMUP%.*} + 3) + LIVE_HOLD_RESERVE : 0))
RESERVE=$((MEM_RESERVE + LIVE_RESERVE))
ROUNDS_DONE=0
round_seconds=0
for ((round = 1; round <= ROUNDS; round++)); do
    elapsed=$(($(date +%s) - STARTED))
    if ((round > 1 && elapsed + round_seconds + RESERVE > BUDGET)); then
        log "time budget: stopping after $ROUNDS_DONE load rounds"
        break
    fi
    round_start=$(date +%s)
    log "round $round/$ROUNDS"
    for layout in 1 2; do
        pin_layout "$layout"
        for test in "${TESTS[@]}"; do
            for target in $(rotate $((round - 1)) "${TARGETS[@]}"); do
                measure "$round" "$layout" "$test" "$target"
            done
        done
    done
    ROUNDS_DONE=$round
    round_seconds=$(($(date +%s) - round_start))
done
((STORM_ONLY)) || curl -fsS --max-time 2 "http://127.0.0.1:$GATEWAY_ADMIN_PORT/metrics" >"$RUN/gateway-metrics.txt" || true

# ---- 7b. Liveness and cost control (issue 15), with --liveness ----------------------------
# Heartbeats and rate limits off vs on in the closed loop (the pairs alternate which goes
# first); then LIVE_CONNS idle sockets on each, and on gateway_pings, whose Pings every
# PING_INTERVAL s the clients and the echo backend answer and count, while wsload reads the
# gateway's CPU time over the hold. It runs before the memory phase and never takes its time.
LIVE_DONE=0
if ((LIVENESS)); then
    log "liveness: ping-pong with heartbeats and rate limits off vs on ($LIVE_ROUNDS round(s)), $LIVE_CONNS idle sockets, Pings every ${PING_INTERVAL}s for ${PING_HOLD}s"
    [[ -n $RATE_LIMITS ]] || log "  (gateway_on without rate limits: the gateway refused the keys)"
    RESERVE=$((MEM_RESERVE + LIVE_HOLD_RESERVE))
    for ((round = 1; round <= LIVE_ROUNDS; round++)); do
        for layout in 1 2; do
            if over_budget "$RESERVE"; then SKIPPED=$((SKIPPED + 2)); continue; fi
            pin_layout "$layout"
            # Fresh processes for every pair: the luck of one process (where its memory and
            # threads land) must not sit in every run of one variant.
            for v in gateway_off gateway_on; do restart_proxy "$v"; done
            for target in $(rotate $((round + layout)) gateway_off gateway_on); do
                measure "$round" "$layout" ws_pingpong "$target" liveness
            done
        done
    done
    for v in gateway_off gateway_on; do stop_proc "$v"; done
    RESERVE=$MEM_RESERVE
    pin_layout 1
    for ((round = 1; round <= LIVE_MEM_ROUNDS; round++)); do
        for target in $(rotate $((round - 1)) gateway_off gateway_on) gateway_pings; do
            [[ $target == gateway_pings ]] && hold=$PING_HOLD || hold=${HOLD%.*}
            if over_budget $((RESERVE + hold + 40)); then
                log "time budget: skipping liveness $target $LIVE_CONNS"; SKIPPED=$((SKIPPED + 1)); continue
            fi
            start_proxy "$target"
            idle=$(wait_quiet)
            pids=$(csv $(proxy_pids "$target"))
            json=$(timeout $((hold + 120)) taskset -c 1 "$WSLOAD" hold \
                --url "ws://127.0.0.1:$(port_of "$target")/agents/bench/l{i}" --conns "$LIVE_CONNS" \
                --hold "$hold" --concurrency 64 --mem-pids "$pids" --cpu-pids "$pids" \
                --backend-stats "127.0.0.1:$ECHO_PORT" 2>>"$RUN/hold.log") ||
                { log "hold run failed: $target $LIVE_CONNS"; stop_proc "$target"; continue; }
            stop_proc "$target"
            echo "${json%\}},\"phase\":\"liveness\",\"round\":$round,\"layout\":1,\"test\":\"idle_$LIVE_CONNS\",\"target\":\"$target\",\"idle_before_pct\":$idle}" >>"$RAW"
            log "  $target $LIVE_CONNS idle sockets: $(echo "$json" | python3 -c 'import json, sys
r = json.load(sys.stdin)
cpu = r["proxy_cpu_ticks"] / int(sys.argv[1]) / r["window_seconds"] * 100 if r.get("proxy_cpu_ticks") is not None else float("nan")
print("%d alive after the hold, %.1f KiB each, gateway CPU %.2f%% of a core over %.0f s, Pings answered: %d by clients, %s by the backend"
      % (r["alive_after_hold"], r["kib_per_conn_held"], cpu, r["window_seconds"], r["pings_answered"], r["backend_pings_answered"]))' "$HZ" 2>/dev/null || echo "?")"
        done
        LIVE_DONE=$round
    done
fi

((MEM_ROUNDS)) && log "idle memory: ${MEM_SIZES// /, } sockets, $MEM_ROUNDS round(s)"
pin_layout 1
MEM_DONE=0
for ((round = 1; round <= MEM_ROUNDS; round++)); do
    for n in $MEM_SIZES; do
        for target in $(rotate $((round - 1)) "${PROXIES[@]}"); do
            if over_budget $((2 * ${HOLD%.*} + 40)); then log "time budget: skipping $target $n"; continue; fi
            restart_proxy "$target"
            idle=$(wait_quiet)
            json=$(timeout $((${HOLD%.*} + 120)) taskset -c 1 "$WSLOAD" hold \
                --url "ws://127.0.0.1:$(port_of "$target")/agents/bench/m{i}" --conns "$n" \
                --hold "$HOLD" --concurrency 64 --mem-pids "$(csv $(proxy_pids "$target"))" 2>>"$RUN/hold.log") ||
                { log "hold run failed: $target $n"; continue; }
            echo "${json%\}},\"phase\":\"memory\",\"round\":$round,\"layout\":1,\"test\":\"idle_$n\",\"target\":\"$target\",\"idle_before_pct\":$idle}" >>"$RAW"
            log "  $target $n idle sockets: $(echo "$json" | sed -E 's/.*"alive_after_hold":([0-9]+).*"kib_per_conn_held":([0-9.]+).*/\1 alive after the hold, \2 KiB each/')"
        done
    done
    MEM_DONE=$round
done
for p in "${PROXIES[@]}"; do stop_proc "$p"; done

# ---- 7c. Reconnect storm with authentication, with --storm --------------------------------
# Last, in the time left: it never takes time from the phases above (a run that no longer fits
# the budget is skipped and counted). nginx, HAProxy and gateway_auth are started once and
# warmed up (STORM_WARM_S s of storm through each proxy and each gateway route, not recorded: a
# fresh process is dearer per upgrade for its first few thousand, which would fall on whichever
# target came first). Per round: every storm target once, in an order rotated every round; then
# ws_rate (RATE messages/s over RATE_CONNS connections) on the public and the HS256 route,
# A B B A (B A A B the next round). The "seen before" tokens are minted once (wsload mint, an hour of
# validity); each "_first" run mints its own new tokens before it starts (wsload storm --mint-*),
# so a repeated (noisy) run is still a first verification.
STORM_DONE=0
if ((STORM)); then
    log "storm: $STORM_RATE upgrades/s for ${STORM_WARMUP}+${STORM_DUR}s per target, $STORM_ROUNDS round(s), layout 2; ${STORM_TARGETS[*]}"
    declare -A STORM_TOKEN=()
    STORM_TOKEN[hs256]=$("$WSLOAD" mint --alg HS256 --secret-env BENCH_HS256_KEY) || die "cannot mint HS256"
    STORM_TOKEN[es256]=$("$WSLOAD" mint --alg ES256 --key "$FIXTURES/ec256-private.pem" --kid bench-es256) || die "cannot mint ES256"
    STORM_TOKEN[rs256]=$("$WSLOAD" mint --alg RS256 --key "$FIXTURES/rsa-private.pem" --kid bench-rs256) || die "cannot mint RS256"
    STORM_TOKEN[apikey]=$BENCH_API_KEY
    RESERVE=$((${STORM_DUR%.*} + 15))  # a run that would end past the budget is skipped
    pin_layout 2
    for p in nginx haproxy gateway_auth; do restart_proxy "$p"; done
    # Each policy admits its token and refuses an upgrade without one (else the rows lie).
    for policy in hs256 es256 rs256 apikey; do
        timeout 10 "$WSLOAD" probe --url "ws://127.0.0.1:$GATEWAY_AUTH_PORT/$policy/bench/probe" \
            --token "${STORM_TOKEN[$policy]}" >/dev/null 2>>"$RUN/storm.log" ||
            die "the $policy route refuses its token (see $RUN/storm.log, $RUN/gateway_auth.log)"
        ! timeout 10 "$WSLOAD" probe --url "ws://127.0.0.1:$GATEWAY_AUTH_PORT/$policy/bench/probe" \
            >/dev/null 2>>"$RUN/storm.log" || die "the $policy route admits an upgrade without a token"
    done
    for target in nginx haproxy auth_off hs256 apikey es256 rs256; do
        storm_target "$target"
        timeout 60 taskset -c 1 "$WSLOAD" storm --url "ws://127.0.0.1:$ST_PORT$ST_PREFIX/bench/w{i}" \
            --rate "$STORM_RATE" --warmup 0 --duration "$STORM_WARM_S" "${ST_ARGS[@]}" >>"$RUN/storm-warmup.jsonl" 2>>"$RUN/storm.log" ||
            die "the storm warm-up through $target failed (see $RUN/storm.log)"
    done
    for ((round = 1; round <= STORM_ROUNDS; round++)); do
        if over_budget "$RESERVE"; then
            log "time budget: skipping storm round $round"; SKIPPED=$((SKIPPED + ${#STORM_TARGETS[@]} + 4)); continue
        fi
        for target in $(rotate $((round - 1)) "${STORM_TARGETS[@]}"); do
            measure "$round" 2 storm "$target" storm
        done
        for target in $(rotate $((round - 1)) auth_off hs256) $(rotate "$round" auth_off hs256); do
            DUR=$STORM_MSG_DUR measure "$round" 2 ws_rate "$target" storm
        done
        STORM_DONE=$round
    done
    curl -fsS --max-time 2 "http://127.0.0.1:$GATEWAY_AUTH_ADMIN_PORT/metrics" >"$RUN/gateway_auth-metrics.txt" || true
    for p in nginx haproxy gateway_auth; do stop_proc "$p"; done
fi

# ---- 8. Report ----------------------------------------------------------------------------
# What the liveness phase ran with, for the report (JSON made by python3: the settings quote).
LIVE_META=$(python3 -c 'import json, sys
a = sys.argv[1:]
print(json.dumps({"rounds": int(a[0]), "mem_rounds": int(a[1]), "conns": int(a[2]),
    "ping_interval_s": float(a[3]), "ping_timeout_s": float(a[4]), "ping_hold_s": float(a[5]),
    "default_ping_interval_s": float(a[6]), "default_ping_timeout_s": float(a[7]),
    "rate_limits": [l for l in a[8].splitlines() if l.strip()] or None, "rate_limits_refused": a[9] or None}))' \
    "$LIVE_ROUNDS" "$LIVE_DONE" "$LIVE_CONNS" "$PING_INTERVAL" "$PING_TIMEOUT" "$PING_HOLD" \
    "$DEFAULT_PING_INTERVAL" "$DEFAULT_PING_TIMEOUT" "$RATE_LIMITS" "$RATE_LIMITS_REFUSED")
STORM_META=$(python3 -c 'import json, sys
a = sys.argv[1:]
print(json.dumps({"rounds": int(a[0]), "rounds_done": int(a[1]), "rate": float(a[2]), "warmup_s": float(a[3]),
    "duration_s": float(a[4]), "size": int(a[5]), "message_duration_s": float(a[6]), "layout": 2,
    "targets": a[7].split(), "refused": a[8] or None}))' \
    "$STORM_ROUNDS" "$STORM_DONE" "$STORM_RATE" "$STORM_WARMUP" "$STORM_DUR" "$STORM_SIZE" "$STORM_MSG_DUR" \
    "${STORM_TARGETS[*]}" "$STORM_REFUSED")
cat >"$RUN/meta.json" <<EOF
{"date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "mode": "$MODE", "nproc": $(nproc),
 "cpu": "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')",
 "kernel": "$(uname -r)", "memory_mib": $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo),
 "nginx": "$(nginx -v 2>&1 | sed 's/.*: //')", "haproxy": "$(haproxy -v | head -1 | awk '{print $3}')",
 "wrk": "$(wrk -v 2>&1 | head -1 | awk '{print $2}')",
 "gateway_rev": "$GATEWAY_REV",
 "pingora": "$(awk '/^name = "pingora-core"/ {getline; gsub(/[^0-9.]/, ""); print; exit}' "$ROOT/Cargo.lock")",
 "rounds_planned": $ROUNDS, "rounds_done": $ROUNDS_DONE, "mem_rounds": $MEM_DONE, "duration_s": $DUR,
 "warmup_s": $WARMUP, "hold_s": $HOLD, "http_conns": $HTTP_CONNS, "ws_conns": $WS_CONNS,
 "sse": $( ((SSE)) && echo true || echo false), "sse_conns": $SSE_CONNS, "sse_size": $SSE_SIZE, "sse_warmup_s": $SSE_WARMUP,
 "sse_paced_ms": $SSE_PACED_MS, "sse_paced_events_per_read": {$SSE_PACED},
 "ws_size": $WS_SIZE, "rate": $RATE, "rate_conns": $RATE_CONNS, "nofile": $NOFILE,
 "foreign_max_pct": $FOREIGN_MAX, "noisy_repeats": $FOREIGN_RETRIES, "skipped_runs": $SKIPPED, "hz": $HZ,$( ((LIVENESS)) && echo "
 \"liveness\": $LIVE_META," || true)$( ((STORM_DONE)) || [[ -n $STORM_REFUSED ]] && echo "
 \"storm\": $STORM_META," || true)
 "elapsed_s": $(($(date +%s) - STARTED)), "raw": "results/$(basename "$RAW")"}
EOF
cp "$RUN/meta.json" "${RAW%.jsonl}.meta.json"
# Kept beside the raw data, so that RESULTS.md can be generated again from results/ alone.
cp "$RUN/gateway-metrics.txt" "${RAW%.jsonl}.gateway-metrics.txt" 2>/dev/null || true
if ((STORM_ONLY)); then
    # The storm run's own report (scratch), and RESULTS.md again from the newest full run, which
    # report.py completes with this storm table (a storm-quick run is never added to it).
    python3 "$HERE/report.py" "$RAW" "${RAW%.jsonl}.meta.json" >"$RUN/STORM.md"
    cat "$RUN/STORM.md"
    full=$(ls "$RESULTS"/raw-*-full.jsonl 2>/dev/null | sort | tail -n 1 || true)
    if [[ $MODE == storm && -n $full ]]; then
        python3 "$HERE/report.py" "$full" "${full%.jsonl}.meta.json" >"$RESULTS/RESULTS.md"
        log "RESULTS.md regenerated from $(basename "$full") with this storm table"
    fi
    REPORT="$RUN/STORM.md"
else
    python3 "$HERE/report.py" "$RAW" "${RAW%.jsonl}.meta.json" >"$RESULTS/RESULTS.md"
    cat "$RESULTS/RESULTS.md"
    REPORT="$RESULTS/RESULTS.md"
fi
rm -rf "$BIN"  # the copies of the binaries; configurations and logs stay in the run folder
log "done in $(($(date +%s) - STARTED))s; report in ${REPORT#"$ROOT"/}, raw data in ${RAW#"$ROOT"/}"
