#!/usr/bin/env bash
# benches/load/run.sh — load benchmark: fdtserver `hello` vs nginx vs a ceiling server.
#
# Run from the repo root:   benches/load/run.sh
# Options (environment variables):
#   DURATION=10        seconds per measured wrk run
#   CONNECTIONS="50 500"   connection counts to measure
#   ROUNDS=3           measured runs per server and connection count (medians are quoted)
#   WORKERS=2          worker processes for fdtserver and nginx alike
#   WARMUP=3           seconds of unmeasured load per server before the first round
#   PORT_BASE=18080    fdtserver, nginx and ceiling listen on PORT_BASE, +1 and +2
#   SERVER_CPU=0 CLIENT_CPU=1   where the servers and wrk are pinned
#   BUILD=1            set BUILD=0 to skip `cargo build --release --workspace`
#   KEEP_TMP=0         set KEEP_TMP=1 to keep the temp dir (configs, logs, raw wrk output)
#
# Method and results: BENCHMARKS.md. The table is printed and written to
# benches/load/last-run.md.
set -euo pipefail

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-"50 500"}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-2}
WARMUP=${WARMUP:-3}
PORT_BASE=${PORT_BASE:-18080}
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
BUILD=${BUILD:-1}
KEEP_TMP=${KEEP_TMP:-0}

BODY="Hello, world!"   # the same body for all three servers
READY_TIMEOUT=15       # seconds a server may take to answer its first request

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for var in DURATION ROUNDS WORKERS WARMUP PORT_BASE SERVER_CPU CLIENT_CPU; do
    is_uint "${!var}" || die "$var must be a non-negative integer (got '${!var}')"
done
for var in DURATION ROUNDS WORKERS; do
    [ "${!var}" -gt 0 ] || die "$var must be at least 1"
done
read -r -a CONN_LIST <<<"$CONNECTIONS"
[ "${#CONN_LIST[@]}" -gt 0 ] || die "CONNECTIONS is empty"
for c in "${CONN_LIST[@]}"; do
    if ! is_uint "$c" || [ "$c" -eq 0 ]; then
        die "CONNECTIONS must be positive integers (got '$c')"
    fi
done

# Work from the repo root whatever the caller's directory, so relative paths hold.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"

# --- 1. tools ----------------------------------------------------------------
# command -> Debian package that provides it
declare -A PKG_OF=([wrk]=wrk [nginx]=nginx [gcc]=gcc [taskset]=util-linux [pgrep]=procps)
missing=()
for cmd in wrk nginx gcc taskset pgrep; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG_OF[$cmd]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing ${missing[*]} (apt-get)"
        # apt's chatter goes to stderr: stdout is for the result table.
        apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2
    else
        die "missing packages: ${missing[*]}. Install them (Debian/Ubuntu: sudo apt-get install -y ${missing[*]}) or run this script as root."
    fi
fi
# nginx often lives in /usr/sbin, which a non-root PATH may lack.
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ "$(nproc)" -ge 2 ] || say "warning: only $(nproc) CPU; server and wrk will share it"

# --- 2. build ----------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
    say "building: cargo build --release --workspace"
    cargo build --release --workspace ||
        die "cargo build failed (BUILD=0 skips the build and benchmarks what is there)"
fi
FDT_BIN="$REPO/target/release/fdtserver"
FDT_PLUGIN="$REPO/target/release/libfdt_hello.so"
SERVERS=(fdtserver nginx ceiling)
if [ ! -x "$FDT_BIN" ]; then
    say "SKIPPING fdtserver: $FDT_BIN does not exist (not built yet?); measuring nginx and ceiling only"
    SERVERS=(nginx ceiling)
elif [ ! -f "$FDT_PLUGIN" ]; then
    die "$FDT_PLUGIN is missing: the hello app plugin was not built"
fi

# --- 3. temp dir, configs, ceiling server --------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fdt-load.XXXXXX")
declare -A PID=() PORT=()
PORT[fdtserver]=$PORT_BASE
PORT[nginx]=$((PORT_BASE + 1))
PORT[ceiling]=$((PORT_BASE + 2))

# Stop every server this script started, whatever way it ends: TERM, then KILL
# after a grace period, then any child (fdtserver and nginx workers) left behind.
cleanup() {
    local name pid kids i
    for name in "${!PID[@]}"; do
        pid=${PID[$name]}
        kill -0 "$pid" 2>/dev/null || continue
        kids=$(pgrep -P "$pid" || true)
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name (pid $pid) ignored TERM for 5 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
        for i in $kids; do kill -KILL "$i" 2>/dev/null || true; done
    done
    if [ "$KEEP_TMP" = 1 ]; then
        say "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "temp dir: $TMP"
gcc -O2 -Wall -o "$TMP/ceiling" benches/load/ceiling.c

cat >"$TMP/fdtserver.toml" <<EOF
[server]
workers = $WORKERS
threads = 4
control_socket = "$TMP/fdtserver.sock"

[[listen]]
address = "127.0.0.1:${PORT[fdtserver]}"
app = "hello"

[app.hello]
plugin = "$FDT_PLUGIN"
message = "$BODY"
EOF

# The nginx reference as DESIGN-NOTES.md prescribes; worker_connections is
# raised so that 500 connections never hit nginx's default of 512 per worker.
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx.conf" <<EOF
worker_processes $WORKERS;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log;
events {
    worker_connections 10240;
}
http {
    access_log off;
    keepalive_requests 100000;
    default_type text/plain;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:${PORT[nginx]} backlog=4096;
        location / {
            return 200 "$BODY";
        }
    }
}
EOF
"$NGINX" -t -q -c "$TMP/nginx.conf" -p "$TMP/nginx" -e "$TMP/nginx/error.log" ||
    die "nginx rejected $TMP/nginx.conf"

# --- 4. start, warm up, measure ------------------------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Prints the status line of one real request, so "ready" means "answering",
# not just "listening" (a master may bind before its workers serve).
status_line() {
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3
        head -c 15 <&3' _ "$1" 2>/dev/null || true
}

start_server() {
    local name=$1 port=${PORT[$1]} cmd
    ! port_open "$port" || die "port $port (for $name) is already in use; set PORT_BASE"
    case $name in
        fdtserver) cmd=("$FDT_BIN" --config "$TMP/fdtserver.toml") ;;
        nginx) cmd=("$NGINX" -c "$TMP/nginx.conf" -p "$TMP/nginx" -e "$TMP/nginx/error.log" -g 'daemon off;') ;;
        ceiling) cmd=("$TMP/ceiling" "$port" "$BODY") ;;
    esac
    # A plain background command, so $! is the server itself (taskset execs it)
    # and the cleanup's TERM reaches it; its workers inherit the pinning.
    taskset -c "$SERVER_CPU" "${cmd[@]}" >"$TMP/$name.log" 2>&1 &
    PID[$name]=$!
}

wait_ready() {
    local name=$1 deadline=$((SECONDS + READY_TIMEOUT))
    until [ "$(status_line "${PORT[$name]}")" = "HTTP/1.1 200 OK" ]; do
        alive "$name"
        [ "$SECONDS" -lt "$deadline" ] || die "$name did not answer 200 within ${READY_TIMEOUT}s (log: $TMP/$name.log)"
        sleep 0.05
    done
}

alive() {
    kill -0 "${PID[$1]}" 2>/dev/null && return 0
    tail -n 20 "$TMP/$1.log" >&2 || true
    die "$1 exited unexpectedly (log above)"
}

# "busy steal total" jiffies of one CPU: busy is everything but idle, iowait
# and steal (time the hypervisor gave to another guest: the noise of a shared VM).
cpu_ticks() {
    awk -v cpu="cpu$1" '$1 == cpu { t = $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; print t - $5 - $6 - $9, $9, t }' /proc/stat
}

# Percent busy and stolen of each CPU between two cpu_ticks samples, as
# "busy0 busy1 steal" (steal averaged over both).
cpu_pct() { # before0 before1 after0 after1, each "busy steal total"
    awk -v a="$1" -v b="$2" -v c="$3" -v d="$4" 'BEGIN {
        split(a, x0, " "); split(b, y0, " "); split(c, x1, " "); split(d, y1, " ")
        tx = x1[3] - x0[3]; ty = y1[3] - y0[3]
        if (tx <= 0 || ty <= 0) { print "0 0 0"; exit }
        printf "%.0f %.0f %.0f\n", 100 * (x1[1] - x0[1]) / tx, 100 * (y1[1] - y0[1]) / ty,
            50 * ((x1[2] - x0[2]) / tx + (y1[2] - y0[2]) / ty)
    }'
}

# wrk with one thread: the client has one vCPU, more threads only contend.
# Appends how busy the server's and wrk's CPUs were, which shows which side
# was the bottleneck (an idle server CPU means wrk limited the run).
run_wrk() { # server connections seconds outfile
    local url="http://127.0.0.1:${PORT[$1]}/" s0 s1 c0 c1
    s0=$(cpu_ticks "$SERVER_CPU")
    c0=$(cpu_ticks "$CLIENT_CPU")
    taskset -c "$CLIENT_CPU" wrk -t1 -c"$2" -d"$3"s --latency "$url" >"$4" 2>&1 ||
        { cat "$4" >&2; die "wrk failed against $1"; }
    s1=$(cpu_ticks "$SERVER_CPU")
    c1=$(cpu_ticks "$CLIENT_CPU")
    echo "CPU busy/steal: $(cpu_pct "$s0" "$c0" "$s1" "$c1")" >>"$4"
    alive "$1"
}

# One line from wrk's report: req/s p50_us p99_us connect read write timeout
# non2xx server-CPU-busy% wrk-CPU-busy% steal%
parse_wrk() {
    awk '
    function us(v,   n, u) {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "ms") return n * 1000
        if (u == "s") return n * 1000000
        if (u == "m") return n * 60000000
        return n                                   # "us"
    }
    /^ +50% / { p50 = us($2) }
    /^ +99% / { p99 = us($2) }
    /^Requests\/sec:/ { rps = $2 }
    /Socket errors:/ { gsub(",", ""); c = $4; r = $6; w = $8; t = $10 }
    /Non-2xx or 3xx responses:/ { bad = $NF }
    /^CPU busy\/steal:/ { scpu = $3; ccpu = $4; steal = $5 }
    END {
        if (rps == "" || p99 == "") exit 1
        printf "%.0f %.0f %.0f %d %d %d %d %d %d %d %d\n", rps, p50, p99, c, r, w, t, bad, scpu, ccpu, steal
    }' "$1" || die "cannot parse wrk output $1"
}

# A benchmark on a busy machine measures the other load: look for 1 s first.
i0=$(cpu_ticks "$SERVER_CPU")
j0=$(cpu_ticks "$CLIENT_CPU")
sleep 1
read -r idle_s idle_c idle_steal <<<"$(cpu_pct "$i0" "$j0" "$(cpu_ticks "$SERVER_CPU")" "$(cpu_ticks "$CLIENT_CPU")")"
BACKGROUND="CPU $SERVER_CPU ${idle_s}% and CPU $CLIENT_CPU ${idle_c}% busy, ${idle_steal}% stolen, before the servers started"
say "background load: $BACKGROUND"
if [ "$idle_s" -gt 10 ] || [ "$idle_c" -gt 10 ]; then
    say "warning: the machine is not idle; the figures will be noisy"
fi

for s in "${SERVERS[@]}"; do
    say "starting $s on 127.0.0.1:${PORT[$s]} (CPU $SERVER_CPU)"
    start_server "$s"
done
for s in "${SERVERS[@]}"; do wait_ready "$s"; done

max_conn=$(printf '%s\n' "${CONN_LIST[@]}" | sort -n | tail -n 1)
if [ "$WARMUP" -gt 0 ]; then
    for s in "${SERVERS[@]}"; do
        say "warm-up: $s, $max_conn connections, ${WARMUP}s"
        run_wrk "$s" "$max_conn" "$WARMUP" "$TMP/warmup-$s.txt"
    done
fi

RESULTS=$TMP/results.txt   # conns server round, then parse_wrk's fields
: >"$RESULTS"
total=$((${#CONN_LIST[@]} * ROUNDS * ${#SERVERS[@]}))
n=0
# Alternate servers inside each round (A B C A B C), so slow drift of this
# shared, noisy VM hits every server alike instead of one whole block.
for c in "${CONN_LIST[@]}"; do
    for ((r = 1; r <= ROUNDS; r++)); do
        for s in "${SERVERS[@]}"; do
            n=$((n + 1))
            out="$TMP/wrk-$s-c$c-r$r.txt"
            run_wrk "$s" "$c" "$DURATION" "$out"
            line=$(parse_wrk "$out")
            echo "$c $s $r $line" >>"$RESULTS"
            read -r rps p50 p99 _ _ _ _ _ scpu ccpu steal <<<"$line"
            say "[$n/$total] c=$c round $r $s: $rps req/s, p50 ${p50}us, p99 ${p99}us, CPU busy: server ${scpu}%, wrk ${ccpu}%, steal ${steal}%"
        done
    done
done

# --- 5. report -------------------------------------------------------------------
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { awk -v c="$1" -v s="$2" -v k="$3" '$1 == c && $2 == s { print $k }' "$RESULTS"; }
fmt_us() { awk -v v="$1" 'BEGIN { if (v < 1000) printf "%d µs", v; else printf "%.2f ms", v / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }

git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo "no commit")
[ -z "$(git status --porcelain 2>/dev/null)" ] || git_rev="$git_rev (uncommitted changes)"
report() {
    echo "# Load benchmark: last run"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), kernel $(uname -r), $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }' || true), fdtserver at $git_rev."
    echo "Servers pinned to CPU $SERVER_CPU, wrk (1 thread, keep-alive) to CPU $CLIENT_CPU; workers=$WORKERS for fdtserver and nginx;"
    echo "${DURATION} s per run, rounds: $ROUNDS, alternating ${SERVERS[*]} in each round; medians over the rounds. Command: \`benches/load/run.sh\` (DURATION=$DURATION ROUNDS=$ROUNDS CONNECTIONS=\"$CONNECTIONS\" WORKERS=$WORKERS)."
    [ -x "$FDT_BIN" ] || echo "**fdtserver was not measured: target/release/fdtserver did not exist.**"
    echo
    echo "Background load: $BACKGROUND."
    echo
    echo "| connections | server | req/s (median) | req/s (min–max) | p50 | p99 | socket errors | non-2xx | server CPU busy | wrk CPU busy | server CPU µs/req |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local c s rps lo hi p50 p99 errs bad scpu ccpu cost
    declare -A M_RPS=() M_P99=() M_COST=()
    for c in "${CONN_LIST[@]}"; do
        for s in "${SERVERS[@]}"; do
            rps=$(col "$c" "$s" 4 | median)
            lo=$(col "$c" "$s" 4 | sort -g | head -n 1)
            hi=$(col "$c" "$s" 4 | sort -g | tail -n 1)
            p50=$(col "$c" "$s" 5 | median)
            p99=$(col "$c" "$s" 6 | median)
            errs=$(awk -v c="$c" -v s="$s" '$1 == c && $2 == s { n += $7 + $8 + $9 + $10 } END { print n + 0 }' "$RESULTS")
            bad=$(awk -v c="$c" -v s="$s" '$1 == c && $2 == s { n += $11 } END { print n + 0 }' "$RESULTS")
            scpu=$(col "$c" "$s" 12 | median)
            ccpu=$(col "$c" "$s" 13 | median)
            # CPU time the server's CPU spent per request, from each run, median.
            cost=$(awk -v c="$c" -v s="$s" '$1 == c && $2 == s && $4 > 0 { print 10000 * $12 / $4 }' "$RESULTS" | median)
            M_RPS[$c,$s]=$rps
            M_P99[$c,$s]=$p99
            M_COST[$c,$s]=$cost
            printf '| %s | %s | %.0f | %.0f–%.0f | %s | %s | %s | %s | %.0f%% | %.0f%% | %.2f |\n' "$c" "$s" "$rps" "$lo" "$hi" \
                "$(fmt_us "$p50")" "$(fmt_us "$p99")" "$errs" "$bad" "$scpu" "$ccpu" "$cost"
        done
    done
    echo
    echo "| connections | req/s fdtserver/nginx | req/s fdtserver/ceiling | req/s nginx/ceiling | p99 fdtserver/nginx | CPU/req fdtserver/nginx | CPU/req fdtserver/ceiling |"
    echo "|---:|---:|---:|---:|---:|---:|---:|"
    for c in "${CONN_LIST[@]}"; do
        printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$c" \
            "$(ratio "${M_RPS[$c,fdtserver]:-}" "${M_RPS[$c,nginx]:-}")" \
            "$(ratio "${M_RPS[$c,fdtserver]:-}" "${M_RPS[$c,ceiling]:-}")" \
            "$(ratio "${M_RPS[$c,nginx]:-}" "${M_RPS[$c,ceiling]:-}")" \
            "$(ratio "${M_P99[$c,fdtserver]:-}" "${M_P99[$c,nginx]:-}")" \
            "$(ratio "${M_COST[$c,fdtserver]:-}" "${M_COST[$c,nginx]:-}")" \
            "$(ratio "${M_COST[$c,fdtserver]:-}" "${M_COST[$c,ceiling]:-}")"
    done
    echo
    echo "Ratios of medians; req/s ratio > 1 means fdtserver is faster; p99 and CPU/req ratios < 1 mean fdtserver's tail is shorter, or its CPU cost per request lower."
    echo "wrk is closed-loop: each server's p50/p99 is at its own throughput, not at equal request rates."
    echo "CPU busy = share of the CPU neither idle nor stolen during the run (CPU $SERVER_CPU: the server, CPU $CLIENT_CPU: wrk); a server CPU well under 100% means wrk, not the server, set the pace."
    echo "Server CPU µs/req = server CPU busy time / requests: the server's cost per request (with the kernel work that lands on its CPU), comparable even when wrk sets the pace."
    echo
    echo "<details><summary>Every run</summary>"
    echo
    echo "| connections | server | round | req/s | p50 | p99 | connect/read/write/timeout errors | non-2xx | server/wrk CPU busy | steal |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    local rnd cn rd wr to steal
    while read -r c s rnd rps p50 p99 cn rd wr to bad scpu ccpu steal; do
        printf '| %s | %s | %s | %s | %s | %s | %s/%s/%s/%s | %s | %s%% / %s%% | %s%% |\n' "$c" "$s" "$rnd" "$rps" \
            "$(fmt_us "$p50")" "$(fmt_us "$p99")" "$cn" "$rd" "$wr" "$to" "$bad" "$scpu" "$ccpu" "$steal"
    done <"$RESULTS"
    echo
    echo "</details>"
}
report >benches/load/last-run.md
echo
cat benches/load/last-run.md
say "written to benches/load/last-run.md"
