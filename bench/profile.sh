#!/usr/bin/env bash
# Where the gateway's CPU time and memory go, under the same backends and loads as run.sh.
#
#   bench/profile.sh [--no-build]
#
# - callgrind (instruction counts, repeatable; used because `perf stat -e instructions` has no
#   hardware counters on this VM): HTTP requests and WebSocket ping-pong, collection switched
#   on only while the load runs, Ir per request and per message.
# - perf record -e cpu-clock (software sampling, works without a PMU): the same loads at full
#   speed, to see the kernel/user split that callgrind cannot.
# - heaptrack: who holds the heap while 1000 idle WebSockets are open.
# - callgrind totals for nginx and HAProxy under the same loads, and per-operation system
#   calls (perf tracepoints) and user/system CPU time of all three.
# The gateway is built with line tables into bench/.target-prof (Cargo.toml is untouched).
# Output: bench/profile/out/ (raw profiles) and bench/profile/out/SUMMARY.txt.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
BUILD=1
[[ ${1:-} == --no-build ]] && BUILD=0
OUT="$HERE/profile/out"
RUN="$HERE/.run/profile-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT" "$RUN"
ECHO_PORT=18101 HELLO_PORT=18102 GATEWAY_PORT=18180 GATEWAY_ADMIN_PORT=18190

log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
declare -A PID=()
stop_proc() {
    local pid=${PID[$1]:-}
    [[ -z $pid ]] && return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PID[$1]"
}
cleanup() { for n in "${!PID[@]}"; do stop_proc "$n"; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM

for tool in valgrind callgrind_annotate heaptrack wrk perf; do
    command -v "$tool" >/dev/null || { log "installing $tool"; apt-get update -qq;
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind heaptrack wrk linux-perf >/dev/null; break; }
done

GW="$HERE/.target-prof/release/agent-gateway"
if ((BUILD)); then
    log "building the gateway with line tables (bench/.target-prof)"
    (cd "$ROOT" && CARGO_PROFILE_RELEASE_DEBUG=line-tables-only CARGO_PROFILE_RELEASE_STRIP=none \
        cargo build --release --quiet --target-dir "$HERE/.target-prof")
fi
(cd "$HERE/loadgen" && cargo build --release --quiet)
L="$HERE/loadgen/target/release"
cp "$GW" "$RUN/agent-gateway"
GW="$RUN/agent-gateway"
ulimit -n "$(ulimit -Hn)"
export OPENROUTER_API_KEY="${OPENROUTER_API_KEY:-bench-placeholder-not-a-key}"
sed -e "s|@ECHO_PORT@|$ECHO_PORT|g" -e "s|@HELLO_PORT@|$HELLO_PORT|g" -e "s|@GATEWAY_PORT@|$GATEWAY_PORT|g" \
    -e "s|@GATEWAY_ADMIN_PORT@|$GATEWAY_ADMIN_PORT|g" "$HERE/conf/gateway.toml.tmpl" >"$RUN/gateway.toml"
"$GW" check -c "$RUN/gateway.toml" >/dev/null
# The same with the gateway's default access log (a line per request) back on.
sed 's/^access_log = false/access_log = true/' "$RUN/gateway.toml" >"$RUN/gateway-accesslog.toml"

for port in $ECHO_PORT $HELLO_PORT $GATEWAY_PORT $GATEWAY_ADMIN_PORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then log "port $port is taken"; exit 1; fi
done

wait_ready() {
    for _ in $(seq 600); do
        [[ $(curl -fsS --max-time 5 "http://127.0.0.1:$GATEWAY_PORT/agents/hello/default" 2>/dev/null) == "Hello, world" ]] && return 0
        sleep 0.2
    done
    log "gateway not ready"; return 1
}

taskset -c 1 "$L/echo-backend" --listen "127.0.0.1:$ECHO_PORT" >/dev/null 2>&1 & PID[echo]=$!
taskset -c 1 "$L/hello-backend" --listen "127.0.0.1:$HELLO_PORT" >/dev/null 2>&1 & PID[hello]=$!
sleep 0.3
HTTP_URL="http://127.0.0.1:$GATEWAY_PORT/agents/hello/default"
WS_URL="ws://127.0.0.1:$GATEWAY_PORT/agents/bench/p{i}"
# PARTS="syscalls heaptrack" bench/profile.sh runs only those parts (summary then in SUMMARY-<parts>.txt).
PARTS=${PARTS:-callgrind callgrind_others perf syscalls heaptrack}
want() { [[ " $PARTS " == *" $1 "* ]]; }
SUMMARY="$OUT/SUMMARY.txt"
[[ $PARTS == "callgrind callgrind_others perf syscalls heaptrack" ]] || SUMMARY="$OUT/SUMMARY-${PARTS// /-}.txt"
: >"$SUMMARY"

# ---- callgrind ----------------------------------------------------------------------------
callgrind_case() { # name config load-command...
    local name=$1 config=$2; shift 2
    rm -f "$OUT/$name.callgrind"*
    RUST_LOG=info taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --dump-instr=no \
        --callgrind-out-file="$OUT/$name.callgrind" "$GW" run -c "$config" >"$RUN/$name.log" 2>&1 &
    PID[gw]=$!
    wait_ready
    # Warm up (first-request costs: pools, lazy statics), then count only the load.
    taskset -c 1 wrk -t1 -c4 -d2s "$HTTP_URL" >/dev/null 2>&1 || true
    taskset -c 1 "$L/wsload" pingpong --url "$WS_URL" --conns 4 --warmup 0 --duration 1 >/dev/null 2>&1 || true
    callgrind_control -z "${PID[gw]}" >/dev/null
    callgrind_control -i on "${PID[gw]}" >/dev/null
    "$@" >"$OUT/$name.load.txt" 2>&1
    callgrind_control -i off "${PID[gw]}" >/dev/null
    callgrind_control -d "$name" "${PID[gw]}" >/dev/null
    stop_proc gw
}

if want callgrind; then
log "callgrind: HTTP"
callgrind_case http "$RUN/gateway.toml" taskset -c 1 wrk -t1 -c16 -d20s "$HTTP_URL"
HTTP_N=$(awk '/requests in/ {print $1}' "$OUT/http.load.txt")
log "callgrind: HTTP with the access log on"
callgrind_case http_accesslog "$RUN/gateway-accesslog.toml" taskset -c 1 wrk -t1 -c16 -d20s "$HTTP_URL"
HTTPL_N=$(awk '/requests in/ {print $1}' "$OUT/http_accesslog.load.txt")
log "callgrind: WebSocket ping-pong"
callgrind_case ws "$RUN/gateway.toml" taskset -c 1 "$L/wsload" pingpong --url "$WS_URL" --conns 64 --size 64 --warmup 0 --duration 20
WS_N=$(sed -E 's/.*"messages":([0-9]+).*/\1/' "$OUT/ws.load.txt")

annotate() { # name ops label
    local f
    f="$OUT/$1.callgrind.1"
    callgrind_annotate --threshold=99 "$f" >"$OUT/$1.exclusive.txt" 2>/dev/null || true
    callgrind_annotate --inclusive=yes --threshold=99 "$f" >"$OUT/$1.inclusive.txt" 2>/dev/null || true
    local total
    total=$(awk '/PROGRAM TOTALS/ {gsub(/,/, "", $1); print $1; exit}' "$OUT/$1.exclusive.txt")
    {
        echo "== callgrind $1: $2 $3, $total instructions in the gateway => $(awk -v t="$total" -v n="$2" 'BEGIN {printf "%.0f", t / n}') Ir per $3"
        echo "-- exclusive (self) top 30, Ir per $3:"
        awk -v n="$2" '/^-+$/ {s++; next} s >= 3 && NF >= 2 && $1 ~ /^[0-9,]+$/ { c++; if (c > 30) exit;
            v = $1; gsub(/,/, "", v); $1 = ""; $2 = ($2 ~ /^\(/ ? "" : $2); printf "%8.0f  %s\n", v / n, $0 }' "$OUT/$1.exclusive.txt"
        echo "-- inclusive top 45, Ir per $3:"
        awk -v n="$2" '/^-+$/ {s++; next} s >= 3 && NF >= 2 && $1 ~ /^[0-9,]+$/ { c++; if (c > 45) exit;
            v = $1; gsub(/,/, "", v); $1 = ""; printf "%8.0f  %s\n", v / n, $0 }' "$OUT/$1.inclusive.txt"
        echo
    } >>"$SUMMARY"
}
annotate http "$HTTP_N" request
annotate http_accesslog "$HTTPL_N" request
annotate ws "$WS_N" message
fi

# ---- perf cpu-clock sampling at full speed --------------------------------------------
perf_case() { # name load-command...
    local name=$1; shift
    RUST_LOG=info taskset -c 0 "$GW" run -c "$RUN/gateway.toml" >"$RUN/perf-$name.log" 2>&1 &
    PID[gw]=$!
    wait_ready
    perf record -e cpu-clock -F 4999 -g -o "$OUT/$name.perf.data" -p "${PID[gw]}" -- sleep 12 >/dev/null 2>&1 &
    local rec=$!
    sleep 0.5
    "$@" >"$OUT/$name.perf-load.txt" 2>&1
    wait "$rec" || true
    stop_proc gw
    {
        echo "== perf cpu-clock $name: share of the gateway's samples, kernel vs user"
        perf report -i "$OUT/$name.perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -8 || true
        echo "-- top symbols (self):"
        perf report -i "$OUT/$name.perf.data" --no-children --sort sym --stdio -g none 2>/dev/null | grep -E '^ +[0-9]' | head -40 || true
        echo
    } >>"$SUMMARY"
}
if ! want perf; then
    :
elif perf record -e cpu-clock -o /dev/null -- true >/dev/null 2>&1; then
    log "perf: HTTP and WebSocket at full speed"
    perf_case http taskset -c 1 wrk -t1 -c64 -d10s "$HTTP_URL"
    perf_case ws taskset -c 1 "$L/wsload" pingpong --url "$WS_URL" --conns 64 --size 64 --warmup 0 --duration 10
else
    echo "perf record -e cpu-clock does not work here; skipped" >>"$SUMMARY"
fi

# ---- syscalls per operation: gateway, nginx, HAProxy -------------------------------------
# perf's syscall tracepoints count every system call the proxy makes while the load runs.
SYSCALLS=(read write readv writev recvfrom sendto recvmsg sendmsg epoll_wait epoll_pwait epoll_ctl
    futex accept4 connect close setsockopt getsockopt getsockname getpeername socket ioctl fcntl)
render_conf() {
    sed -e "s|@RUN@|$RUN|g" -e "s|@ECHO_PORT@|$ECHO_PORT|g" -e "s|@HELLO_PORT@|$HELLO_PORT|g" \
        -e "s|@GATEWAY_PORT@|$GATEWAY_PORT|g" -e "s|@GATEWAY_ADMIN_PORT@|$GATEWAY_ADMIN_PORT|g" \
        -e "s|@NGINX_PORT@|$GATEWAY_PORT|g" -e "s|@HAPROXY_PORT@|$GATEWAY_PORT|g" \
        -e "s|@NOFILE@|$(ulimit -n)|g" -e "s|@NGINX_WORKER_CONNECTIONS@|$(($(ulimit -n) - 100))|g" \
        -e "s|@HAPROXY_MAXCONN@|9900|g" "$HERE/conf/$1.tmpl" >"$RUN/$1"
}
syscalls_case() { # proxy
    local name=$1 pids events=(-e raw_syscalls:sys_enter -e page-faults -e context-switches)
    for sc in "${SYSCALLS[@]}"; do
        [[ -d /sys/kernel/tracing/events/syscalls/sys_enter_$sc ]] && events+=(-e "syscalls:sys_enter_$sc")
    done
    case $name in
        gateway) RUST_LOG=info taskset -c 0 "$GW" run -c "$RUN/gateway.toml" >"$RUN/sc-gateway.log" 2>&1 & PID[gw]=$! ;;
        nginx) render_conf nginx.conf; mkdir -p "$RUN/nginx-tmp"
            taskset -c 0 nginx -e "$RUN/nginx-error.log" -c "$RUN/nginx.conf" >"$RUN/sc-nginx.log" 2>&1 & PID[gw]=$! ;;
        haproxy) render_conf haproxy.cfg
            taskset -c 0 haproxy -db -f "$RUN/haproxy.cfg" >"$RUN/sc-haproxy.log" 2>&1 & PID[gw]=$! ;;
    esac
    wait_ready
    pids=$(echo "${PID[gw]}" $(pgrep -P "${PID[gw]}" || true) | tr ' ' ',')
    # First without perf: user and system CPU time per operation.
    for load in http ws; do
        local u0 u1 n
        u0=$(for p in ${pids//,/ }; do sed 's/.*) //' "/proc/$p/stat" | awk '{print $12, $13}'; done | awk '{u += $1; s += $2} END {print u, s}')
        if [[ $load == http ]]; then
            n=$(taskset -c 1 wrk -t1 -c64 -d5s "$HTTP_URL" | awk '/requests in/ {print $1}')
        else
            n=$(taskset -c 1 "$L/wsload" pingpong --url "$WS_URL" --conns 64 --size 64 --warmup 0 --duration 5 |
                sed -E 's/.*"messages":([0-9]+).*/\1/')
        fi
        u1=$(for p in ${pids//,/ }; do sed 's/.*) //' "/proc/$p/stat" | awk '{print $12, $13}'; done | awk '{u += $1; s += $2} END {print u, s}')
        awk -v a="$u0" -v b="$u1" -v n="$n" -v hz="$(getconf CLK_TCK)" -v who="$name" -v load="$load" 'BEGIN {
            split(a, x, " "); split(b, y, " ")
            printf "%-8s %-4s CPU per %s: user %.1f us + system %.1f us = %.1f us (%d ops)\n", who, load,
                (load == "http" ? "request" : "message"), (y[1] - x[1]) * 1e6 / hz / n, (y[2] - x[2]) * 1e6 / hz / n,
                (y[1] - x[1] + y[2] - x[2]) * 1e6 / hz / n, n }' >>"$SUMMARY"
    done
    for load in http ws; do
        perf stat -x, "${events[@]}" -p "$pids" -o "$OUT/syscalls-$name-$load.csv" -- sleep 6 &
        local st=$!
        sleep 0.3
        if [[ $load == http ]]; then
            taskset -c 1 wrk -t1 -c64 -d5s "$HTTP_URL" >"$OUT/syscalls-$name-$load.load.txt" 2>&1
            n=$(awk '/requests in/ {print $1}' "$OUT/syscalls-$name-$load.load.txt")
        else
            taskset -c 1 "$L/wsload" pingpong --url "$WS_URL" --conns 64 --size 64 --warmup 0 --duration 5 \
                >"$OUT/syscalls-$name-$load.load.txt" 2>&1
            n=$(sed -E 's/.*"messages":([0-9]+).*/\1/' "$OUT/syscalls-$name-$load.load.txt")
        fi
        wait "$st" || true
        awk -F, -v n="$n" -v who="$name" -v load="$load" '$1 ~ /^[0-9]+$/ && $1 > 0 {
            ev = $3; if (ev ~ /sys_enter/) { sub(/.*sys_enter_?/, "", ev); if (ev == "") ev = "ALL-syscalls" }
            printf "%-8s %-4s %-12s %7.2f per %s\n", who, load, ev, $1 / n, (load == "http" ? "request" : "message") }' \
            "$OUT/syscalls-$name-$load.csv" | sort -k4 -rn >>"$SUMMARY"
    done
    stop_proc gw
}
# ---- callgrind totals for nginx and HAProxy (same loads), for scale ----------------------
if want callgrind_others; then
    echo "== callgrind totals for nginx and HAProxy (user-space instructions, same loads)" >>"$SUMMARY"
    render_conf nginx.conf; mkdir -p "$RUN/nginx-tmp"
    sed -i 's/^master_process on;/master_process off;/' "$RUN/nginx.conf"
    render_conf haproxy.cfg
    for p in nginx haproxy; do
        for load in http ws; do
            rm -f "$OUT/$p-$load.callgrind"*
            case $p in
                nginx) cmd=(nginx -e "$RUN/nginx-error.log" -c "$RUN/nginx.conf") ;;
                haproxy) cmd=(haproxy -db -f "$RUN/haproxy.cfg") ;;
            esac
            taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/$p-$load.callgrind" \
                "${cmd[@]}" >"$RUN/cg-$p-$load.log" 2>&1 &
            PID[gw]=$!
            wait_ready
            callgrind_control -i on "${PID[gw]}" >/dev/null
            if [[ $load == http ]]; then
                n=$(taskset -c 1 wrk -t1 -c16 -d20s "$HTTP_URL" | awk '/requests in/ {print $1}')
            else
                n=$(taskset -c 1 "$L/wsload" pingpong --url "$WS_URL" --conns 64 --size 64 --warmup 0 --duration 20 |
                    sed -E 's/.*"messages":([0-9]+).*/\1/')
            fi
            callgrind_control -i off "${PID[gw]}" >/dev/null
            callgrind_control -d "$load" "${PID[gw]}" >/dev/null
            stop_proc gw
            total=$(callgrind_annotate --threshold=99 "$OUT/$p-$load.callgrind.1" 2>/dev/null |
                awk '/PROGRAM TOTALS/ {gsub(/,/, "", $1); print $1}' || true)
            echo "$p $load: $n ops, $(awk -v t="$total" -v n="$n" 'BEGIN {printf "%.0f", t / n}') Ir per op" >>"$SUMMARY"
        done
    done
    echo >>"$SUMMARY"
fi

if want syscalls; then
echo "== system calls per operation (perf tracepoints; wrk -c64 / 64 WebSocket ping-pong connections)" >>"$SUMMARY"
for p in gateway nginx haproxy; do
    log "syscalls: $p"
    syscalls_case "$p"
done
echo >>"$SUMMARY"
fi

# ---- heaptrack: heap held by idle WebSockets ------------------------------------------
if want heaptrack; then
log "heaptrack: 1000 idle WebSockets"
rm -f "$OUT"/heaptrack.idle.*
RUST_LOG=info taskset -c 0 heaptrack -o "$OUT/heaptrack.idle" "$GW" run -c "$RUN/gateway.toml" >"$RUN/heaptrack.log" 2>&1 &
HT=$!
wait_ready
# The gateway itself (heaptrack's wrapper script is its parent): stopped by TERM so that
# heaptrack writes its data.
PID[gw]=$(pgrep -f -n "^$GW run")
taskset -c 1 "$L/wsload" hold --url "ws://127.0.0.1:$GATEWAY_PORT/agents/bench/h{i}" --conns 1000 --hold 3 \
    --mem-pids "${PID[gw]}" >"$OUT/heaptrack.hold.txt" 2>&1
sleep 1
stop_proc gw
wait "$HT" 2>/dev/null || true
HTF=$(ls -t "$OUT"/heaptrack.idle*.zst 2>/dev/null | head -1 || true)
heaptrack_print -f "$HTF" --print-peaks 1 --print-allocators 0 --print-temporary 0 --print-leaks 0 \
    --peak-limit 25 --sub-peak-limit 4 >"$OUT/heaptrack.idle.txt" 2>/dev/null || true
{
    echo "== heaptrack: 1000 idle WebSockets ($(tail -1 "$OUT/heaptrack.hold.txt"))"
    grep -E "^(peak heap memory consumption|peak RSS|calls to allocation functions)" "$OUT/heaptrack.idle.txt" || true
    echo "-- heap held at the peak, by call site (innermost gateway/Pingora frames):"
    python3 "$HERE/profile/condense_heaptrack.py" "$OUT/heaptrack.idle.txt" 30 || true
} >>"$SUMMARY"
fi
cleanup
rm -f "$RUN/agent-gateway"
log "done: $SUMMARY"
