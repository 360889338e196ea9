#!/usr/bin/env bash
# benches/load/run.sh — load benchmark: fdtserver `hello` vs nginx vs a ceiling server.
#
# Run from the repo root:   benches/load/run.sh
# Options (environment variables):
#   DURATION=10        seconds per measured wrk run
#   CONNECTIONS="50 500"   connection counts to measure
#   ROUNDS=3           measured runs per server and connection count (medians are quoted)
#   WORKERS=2          worker processes for fdtserver and nginx alike
#   THREADS=4          fdtserver's `threads` (4 is its default)
#   WARMUP=3           seconds of unmeasured load per server before the first round
#   PORT_BASE=18080    fdtserver, nginx and ceiling listen on PORT_BASE, +1 and +2
#   SERVER_CPUS=0 CLIENT_CPUS=1  the CPUs the servers and the clients (wrk, loadgen) are
#                      pinned to, as `taskset -c` takes them: `0-7`, `0,2,4-6`
#                      (SERVER_CPU / CLIENT_CPU, the old single-CPU names, are read too)
#   WRK_THREADS=       wrk's threads; default: one per client CPU
#   SERVERS="fdtserver nginx ceiling"  which servers to measure
#   FDT_BIN= FDT_PLUGIN= LOADGEN=  another fdtserver build to measure (with BUILD=0), say an
#                      older commit's, built from `git worktree add` in its own target dir
#
# Many cores (issue 13): on a 16-CPU machine, half for the servers, half for the clients:
#   SERVER_CPUS=0-7 CLIENT_CPUS=8-15 WORKERS=8 RATES="100000" benches/load/run.sh
#   BUILD=1            set BUILD=0 to skip `cargo build --release --workspace`
#   KEEP_TMP=0         set KEEP_TMP=1 to keep the temp dir (configs, logs, raw wrk output)
#   NOISE_BUDGET=60    seconds the whole run may spend waiting for other load on
#                      the machine to pass, or repeating runs it disturbed (0: never)
#   RATES="20000 60000"  fixed request rates at which fdtserver's and nginx's latency
#                      is compared with the open-loop examples/loadgen ("" skips it)
#   RATE_ROUNDS=5 RATE_SECONDS=3  alternating rounds and seconds per fixed-rate run
#                      (a p99 moves with the machine's noise: more short rounds beat
#                      a few long ones)
#
# TLS (issue 12): fdtserver and nginx over TLS with the same throw-away ECDSA P-256
# certificate (the ceiling and the fixed-rate latency, which speak plain TCP, are skipped):
#   TLS=0              TLS=1 measures, side by side, keep-alive requests/s over TLS at each of
#                      CONNECTIONS, and new TLS connections/s (one request each, with
#                      "Connection: close": a full handshake per request) at each of
#                      HANDSHAKE_CONNECTIONS, each with the server's CPU time per request;
#                      the table goes to benches/load/last-run-tls.md
#   HANDSHAKE_CONNECTIONS=50  (TLS=1) concurrent connections for the handshake rate
#   TLS_RESUME=0       (TLS=1) wrk keeps the last session of a connection slot and offers it
#                      when it reconnects; benches/load/tls_handshakes.c, preloaded into wrk,
#                      drops it so that every handshake is a full one, and counts them.
#                      TLS_RESUME=1 leaves wrk as it is: handshakes are then partly resumed
#   e.g. TLS=1 DURATION=5 ROUNDS=3 benches/load/run.sh
#
# Server-bound runs: on a small machine wrk, not the server, sets the pace (its CPU is the
# busier one), so requests/s compare the clients more than the servers.
#   SERVER_CPU_QUOTA=  % of one CPU that each server's processes may use together, through
#                      the kernel's CPU bandwidth control (a cgroup per server, cgroup v1 or
#                      v2, needs root): e.g. 50 leaves wrk enough room to keep every server
#                      busy, so requests/s are what each server does with the same CPU time
#
# Method and results: BENCHMARKS.md. The table is printed and written to
# benches/load/last-run.md (benches/load/last-run-tls.md with TLS=1).
set -euo pipefail

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-"50 500"}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-2}
WARMUP=${WARMUP:-3}
PORT_BASE=${PORT_BASE:-18080}
SERVER_CPUS=${SERVER_CPUS:-${SERVER_CPU:-0}}
CLIENT_CPUS=${CLIENT_CPUS:-${CLIENT_CPU:-1}}
THREADS=${THREADS:-4}
BUILD=${BUILD:-1}
KEEP_TMP=${KEEP_TMP:-0}
NOISE_BUDGET=${NOISE_BUDGET:-60}
TLS=${TLS:-0}
HANDSHAKE_CONNECTIONS=${HANDSHAKE_CONNECTIONS:-50}
TLS_RESUME=${TLS_RESUME:-0}
SERVER_CPU_QUOTA=${SERVER_CPU_QUOTA:-}

BODY="Hello, world!"   # the same body for all three servers
READY_TIMEOUT=15       # seconds a server may take to answer its first request
OTHER_MAX=10           # % of a CPU used by other processes above which a run counts as disturbed

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'run.sh: error: %s\n' "$*" >&2; exit 1; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
for var in DURATION ROUNDS WORKERS THREADS WARMUP PORT_BASE NOISE_BUDGET; do
    is_uint "${!var}" || die "$var must be a non-negative integer (got '${!var}')"
done
for var in DURATION ROUNDS WORKERS THREADS; do
    [ "${!var}" -gt 0 ] || die "$var must be at least 1"
done
for var in TLS TLS_RESUME; do
    [[ ${!var} =~ ^[01]$ ]] || die "$var must be 0 or 1 (got '${!var}')"
done
# A `taskset -c` CPU list ("0-7", "0,2,4-6") -> the CPU numbers in CPUS_OUT, checked
# against the CPUs this machine has.
expand_cpus() { # name list
    local part lo hi cpu
    CPUS_OUT=()
    [[ $2 =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] ||
        die "$1 must be a CPU list like 0-7 or 0,2,4-6 (got '$2')"
    for part in ${2//,/ }; do
        lo=${part%-*}
        hi=${part#*-}
        [ "$lo" -le "$hi" ] || die "$1: $part is not a range (got '$2')"
        for ((cpu = lo; cpu <= hi; cpu++)); do
            grep -q "^cpu$cpu " /proc/stat || die "$1: this machine has no CPU $cpu (nproc: $(nproc))"
            CPUS_OUT+=("$cpu")
        done
    done
    mapfile -t CPUS_OUT < <(printf '%s\n' "${CPUS_OUT[@]}" | sort -nu)
}
expand_cpus SERVER_CPUS "$SERVER_CPUS"
SERVER_SET=("${CPUS_OUT[@]}")
expand_cpus CLIENT_CPUS "$CLIENT_CPUS"
CLIENT_SET=("${CPUS_OUT[@]}")
mapfile -t BOTH_SET < <(printf '%s\n' "${SERVER_SET[@]}" "${CLIENT_SET[@]}" | sort -nu)
WRK_THREADS=${WRK_THREADS:-${#CLIENT_SET[@]}}
is_uint "$WRK_THREADS" && [ "$WRK_THREADS" -gt 0 ] || die "WRK_THREADS must be a positive integer (got '$WRK_THREADS')"
read -r -a CONN_LIST <<<"$CONNECTIONS"
[ "${#CONN_LIST[@]}" -gt 0 ] || die "CONNECTIONS is empty"
for c in "${CONN_LIST[@]}"; do
    if ! is_uint "$c" || [ "$c" -eq 0 ]; then
        die "CONNECTIONS must be positive integers (got '$c')"
    fi
done
if [ -n "$SERVER_CPU_QUOTA" ]; then
    is_uint "$SERVER_CPU_QUOTA" && [ "$SERVER_CPU_QUOTA" -ge 5 ] ||
        die "SERVER_CPU_QUOTA must be a whole percentage of one CPU, at least 5 (got '$SERVER_CPU_QUOTA')"
fi
# What is measured: a connection count (keep-alive), or with TLS=1 also "new<count>": that
# many connections, each closed after one request, so every request is a new handshake.
POINTS=("${CONN_LIST[@]}")
if [ "$TLS" = 1 ]; then
    read -r -a HS_LIST <<<"$HANDSHAKE_CONNECTIONS"
    for c in "${HS_LIST[@]}"; do
        if ! is_uint "$c" || [ "$c" -eq 0 ]; then
            die "HANDSHAKE_CONNECTIONS must be positive integers (got '$c')"
        fi
        POINTS+=("new$c")
    done
fi

# Work from the repo root whatever the caller's directory, so relative paths hold.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"

# --- 1. tools ----------------------------------------------------------------
# command -> Debian package that provides it
declare -A PKG_OF=([wrk]=wrk [nginx]=nginx [gcc]=gcc [taskset]=util-linux [pgrep]=procps [openssl]=openssl)
missing=()
TOOLS=(wrk nginx gcc taskset pgrep)
[ "$TLS" = 0 ] || TOOLS+=(openssl)
for cmd in "${TOOLS[@]}"; do
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
if [ "$((${#SERVER_SET[@]} + ${#CLIENT_SET[@]}))" -gt "${#BOTH_SET[@]}" ]; then
    say "warning: SERVER_CPUS ($SERVER_CPUS) and CLIENT_CPUS ($CLIENT_CPUS) overlap: servers and clients share CPUs"
fi

# --- 2. build ----------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
    # Two commands: with `--example`, cargo builds only the example, not the server and plugins.
    say "building: cargo build --release --workspace && cargo build --release --example loadgen"
    { cargo build --release --workspace && cargo build --release --example loadgen; } ||
        die "cargo build failed (BUILD=0 skips the build and benchmarks what is there)"
fi
FDT_BIN=${FDT_BIN:-$REPO/target/release/fdtserver}
FDT_PLUGIN=${FDT_PLUGIN:-$REPO/target/release/libfdt_hello.so}
LOADGEN=${LOADGEN:-$REPO/target/release/examples/loadgen}
if [ "$TLS" = 1 ]; then
    [ -z "${RATES:-}" ] || say "TLS=1: RATES ignored (examples/loadgen speaks plain TCP)"
    RATES=""
fi
RATES=${RATES-20000 60000}
RATE_ROUNDS=${RATE_ROUNDS:-5}
RATE_SECONDS=${RATE_SECONDS:-3}
for var in RATE_ROUNDS RATE_SECONDS; do
    is_uint "${!var}" && [ "${!var}" -gt 0 ] || die "$var must be a positive integer (got '${!var}')"
done
if [ "$TLS" = 1 ]; then
    read -r -a SERVERS <<<"${SERVERS:-fdtserver nginx}"
else
    read -r -a SERVERS <<<"${SERVERS:-fdtserver nginx ceiling}"
fi
[ "${#SERVERS[@]}" -gt 0 ] || die "SERVERS is empty"
for s in "${SERVERS[@]}"; do
    case $s in fdtserver | nginx | ceiling) ;; *) die "SERVERS: unknown server '$s' (fdtserver, nginx, ceiling)" ;; esac
done
if [ "$TLS" = 1 ] && [[ " ${SERVERS[*]} " == *" ceiling "* ]]; then
    say "TLS=1: SKIPPING the ceiling (it speaks plain TCP only)"
    read -r -a SERVERS <<<"$(printf '%s\n' "${SERVERS[@]}" | grep -vx ceiling | tr '\n' ' ')"
    [ "${#SERVERS[@]}" -gt 0 ] || die "nothing left to measure"
fi
if [[ " ${SERVERS[*]} " != *" fdtserver "* ]]; then
    :
elif [ ! -x "$FDT_BIN" ]; then
    say "SKIPPING fdtserver: $FDT_BIN does not exist (not built yet?)"
    read -r -a SERVERS <<<"$(printf '%s\n' "${SERVERS[@]}" | grep -vx fdtserver | tr '\n' ' ')"
    [ "${#SERVERS[@]}" -gt 0 ] || die "nothing left to measure"
elif [ ! -f "$FDT_PLUGIN" ]; then
    die "$FDT_PLUGIN is missing: the hello app plugin was not built"
fi

# --- 3. temp dir, configs, ceiling server --------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fdt-load.XXXXXX")
declare -A PID=() PORT=() CGROUP=()
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
    for name in "${!CGROUP[@]}"; do
        for ((i = 0; i < 20; i++)); do
            rmdir "${CGROUP[$name]}" 2>/dev/null && break
            sleep 0.1
        done
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

# TLS=1: one throw-away certificate and key that both servers serve, and the library
# preloaded into wrk that makes every handshake a full one and counts them.
FDT_TLS_KEYS=""
NGINX_TLS=""
SCHEME=http
if [ "$TLS" = 1 ]; then
    SCHEME=https
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>"$TMP/openssl.log" ||
        { cat "$TMP/openssl.log" >&2; die "openssl could not make the test certificate"; }
    gcc -O2 -Wall -shared -fPIC -o "$TMP/tls_handshakes.so" benches/load/tls_handshakes.c -ldl
    FDT_TLS_KEYS="tls_cert = \"$TMP/cert.pem\"
tls_key = \"$TMP/key.pem\"
tls_tickets = false"
    # The same TLS as fdtserver's: TLS 1.2 and 1.3, each side's default cipher suites and
    # groups, and the same resumption policy: fdtserver's `tls_tickets = false`, rustls'
    # per-process in-memory cache of 256 sessions and no ticket key (TLS 1.3 tickets name a
    # cached session), is nginx's `builtin` (OpenSSL's, per worker) cache with tickets off.
    NGINX_TLS="
        ssl_certificate $TMP/cert.pem;
        ssl_certificate_key $TMP/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache builtin:256;
        ssl_session_tickets off;"
fi

cat >"$TMP/fdtserver.toml" <<EOF
[server]
workers = $WORKERS
threads = $THREADS
control_socket = "$TMP/fdtserver.sock"

[[listen]]
address = "127.0.0.1:${PORT[fdtserver]}"
app = "hello"
$FDT_TLS_KEYS

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
        listen 127.0.0.1:${PORT[nginx]}$([ "$TLS" = 0 ] || echo " ssl") backlog=4096;$NGINX_TLS
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
    if [ "$TLS" = 1 ]; then
        printf 'GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' |
            timeout 2 openssl s_client -connect "127.0.0.1:$1" -quiet 2>/dev/null | head -c 15 || true
        return
    fi
    # shellcheck disable=SC2016 # $1 is expanded by the inner bash, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3
        head -c 15 <&3' _ "$1" 2>/dev/null || true
}

start_server() {
    local name=$1 port=${PORT[$1]} cmd
    case $name in
        fdtserver) cmd=("$FDT_BIN" --config "$TMP/fdtserver.toml") ;;
        nginx) cmd=("$NGINX" -c "$TMP/nginx.conf" -p "$TMP/nginx" -e "$TMP/nginx/error.log" -g 'daemon off;') ;;
        ceiling) cmd=("$TMP/ceiling" "$port" "$BODY") ;;
    esac
    # A plain background command, so $! is the server itself (taskset execs it)
    # and the cleanup's TERM reaches it; its workers inherit the pinning (and the cgroup).
    if [ -n "$SERVER_CPU_QUOTA" ]; then
        cpu_cgroup "$name"
        # shellcheck disable=SC2016 # expanded by the inner bash, which joins the cgroup and execs
        bash -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' _ "${CGROUP[$name]}" \
            taskset -c "$SERVER_CPUS" "${cmd[@]}" >"$TMP/$name.log" 2>&1 &
    else
        taskset -c "$SERVER_CPUS" "${cmd[@]}" >"$TMP/$name.log" 2>&1 &
    fi
    PID[$name]=$!
}

# A cgroup for server $1 whose processes together get SERVER_CPU_QUOTA % of one CPU, in
# periods of 20 ms (short, so that a throttled server waits at most a few ms at a time).
cpu_cgroup() {
    local dir period=20000 quota=$((SERVER_CPU_QUOTA * 200))
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null ||
            echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null ||
            die "SERVER_CPU_QUOTA: cannot enable the cgroup v2 cpu controller (root needed)"
        dir=/sys/fs/cgroup/fdt-bench-$$-$1
        mkdir "$dir" 2>/dev/null || die "SERVER_CPU_QUOTA: cannot create $dir (root needed)"
        CGROUP[$1]=$dir
        echo "$quota $period" >"$dir/cpu.max"
    else
        dir=/sys/fs/cgroup/cpu/fdt-bench-$$-$1
        mkdir "$dir" 2>/dev/null || die "SERVER_CPU_QUOTA: cannot create $dir (cgroup v1 cpu controller, root needed)"
        CGROUP[$1]=$dir
        echo "$period" >"$dir/cpu.cfs_period_us"
        echo "$quota" >"$dir/cpu.cfs_quota_us"
    fi
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

# "busy steal total" jiffies of a set of CPUs (summed), given as CPU numbers: busy is
# everything but idle, iowait and steal (time the hypervisor gave to another guest:
# the noise of a shared VM).
cpu_ticks() { # cpu...
    awk -v set=" $* " '$1 ~ /^cpu[0-9]+$/ && index(set, " " substr($1, 4) " ") {
        t = $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; b += t - $5 - $6 - $9; s += $9; tt += t }
        END { print b + 0, s + 0, tt + 0 }' /proc/stat
}
server_ticks() { cpu_ticks "${SERVER_SET[@]}"; }
client_ticks() { cpu_ticks "${CLIENT_SET[@]}"; }

# Percent busy and stolen of the server's and the clients' CPUs between two pairs of
# cpu_ticks samples, as "busy0 busy1 steal" (each averaged over its CPUs, steal over both).
cpu_pct() { # before0 before1 after0 after1, each "busy steal total"
    awk -v a="$1" -v b="$2" -v c="$3" -v d="$4" 'BEGIN {
        split(a, x0, " "); split(b, y0, " "); split(c, x1, " "); split(d, y1, " ")
        tx = x1[3] - x0[3]; ty = y1[3] - y0[3]
        if (tx <= 0 || ty <= 0) { print "0 0 0"; exit }
        printf "%.0f %.0f %.0f\n", 100 * (x1[1] - x0[1]) / tx, 100 * (y1[1] - y0[1]) / ty,
            50 * ((x1[2] - x0[2]) / tx + (y1[2] - y0[2]) / ty)
    }'
}

# CPU time (user + system, in clock ticks) used so far by a server's processes:
# the one we started and its children (the workers). Other load on the machine
# does not count here, unlike in the CPU-wide figures above.
proc_ticks() {
    local p t=0 ticks
    for p in "$1" $(pgrep -P "$1" || true); do
        # Fields after the command name's ")": utime and stime are the 12th and 13th.
        ticks=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || true)
        t=$((t + ${ticks:-0}))
    done
    echo "$t"
}
CLK_TCK=$(getconf CLK_TCK)

# Tick counters at one moment, one line: cpu_ticks of the server's CPUs, of
# wrk's CPUs and of both sets together, the server's own ticks, and the ticks of this script's finished
# children (wrk, mostly), which the caller saved with `times >"$TMP/times"`:
# `times` must run in this shell, as a subshell has no children of its own.
snapshot() { # server-pid
    echo "$(server_ticks) $(client_ticks) $(cpu_ticks "${BOTH_SET[@]}") $(proc_ticks "$1")" \
        "$(awk -v hz="$CLK_TCK" 'NR == 2 { split($1, a, /[ms]/); split($2, b, /[ms]/)
            printf "%d", (a[1] * 60 + a[2] + b[1] * 60 + b[2]) * hz }' "$TMP/times")"
}

# What two snapshots say: "busy0 busy1 steal other server_ms", where busy0 and
# busy1 are averaged over the server's and wrk's CPUs and other is the busy time
# of all those CPUs not spent by the server or wrk (the rest of the machine), in
# percent of one CPU. A process's time includes the interrupts served while it
# ran, so this compares with busy time, interrupts included.
usage() { # before after
    awk -v a="$1" -v b="$2" -v hz="$CLK_TCK" -v n="${#BOTH_SET[@]}" 'BEGIN {
        # fields: busy steal total (server CPUs), the same (wrk CPUs), the same (both
        # sets), server ticks, children ticks
        split(a, x, " "); split(b, y, " "); for (i = 1; i <= 11; i++) d[i] = y[i] - x[i]
        if (d[3] <= 0 || d[6] <= 0 || d[9] <= 0) { print "0 0 0 0 0"; exit }
        other = 100 * n * (d[7] - d[10] - d[11]) / d[9]
        printf "%.0f %.0f %.0f %.0f %d\n", 100 * d[1] / d[3], 100 * d[4] / d[6],
            50 * (d[2] / d[3] + d[5] / d[6]), other < 0 ? 0 : other, 1000 * d[10] / hz
    }'
}

# wrk with one thread per client CPU (WRK_THREADS): more threads only contend.
# Appends how busy the server's and wrk's CPUs were, which shows which side
# was the bottleneck (an idle server CPU means wrk limited the run), and how
# much other processes ran meanwhile (a disturbed run).
#
# With TLS=1, a point "new<count>" sends "Connection: close": each connection carries one
# request, and wrk opens a new one (a new handshake) for the next. tls_handshakes.so, preloaded,
# drops the session wrk would offer again (unless TLS_RESUME=1) and appends a line with the
# handshakes that completed, full and resumed, which goes into the output as
# "TLS handshakes: …" ("unverified" when wrk did not load it, say a static build).
run_wrk() { # server connections-or-point seconds outfile
    local url="$SCHEME://127.0.0.1:${PORT[$1]}/" before after conns=${2#new} extra=() pre=()
    [[ $2 != new* ]] || extra=(-H "Connection: close")
    if [ "$TLS" = 1 ]; then
        rm -f "$4.hs"
        pre=(env LD_PRELOAD="$TMP/tls_handshakes.so" TLS_HANDSHAKES_OUT="$4.hs"
            TLS_HANDSHAKES_NO_RESUME=$((1 - TLS_RESUME)))
    fi
    times >"$TMP/times"
    before=$(snapshot "${PID[$1]}")
    "${pre[@]}" taskset -c "$CLIENT_CPUS" wrk -t"$WRK_THREADS" -c"$conns" -d"$3"s --latency "${extra[@]}" "$url" >"$4" 2>&1 ||
        { cat "$4" >&2; die "wrk failed against $1"; }
    times >"$TMP/times"
    after=$(snapshot "${PID[$1]}")
    echo "CPU busy/steal/other/server-ms: $(usage "$before" "$after")" >>"$4"
    [ "$TLS" = 0 ] || echo "TLS handshakes: $(cat "$4.hs" 2>/dev/null || echo unverified)" >>"$4"
    alive "$1"
}

# One line from wrk's report: req/s p50_us p99_us connect read write timeout
# non2xx server-CPU-busy% wrk-CPU-busy% steal% server-process-CPU-µs-per-request
# other-load%
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
    /^CPU busy\/steal\/other\/server-ms:/ { scpu = $3; ccpu = $4; steal = $5; other = $6; ms = $7 }
    / requests in / { reqs = $1 }
    END {
        if (rps == "" || p99 == "" || reqs == 0) exit 1
        printf "%.0f %.0f %.0f %d %d %d %d %d %d %d %d %.2f %d\n", rps, p50, p99, c, r, w, t, bad, scpu, ccpu, steal, 1000 * ms / reqs, other
    }' "$1" || die "cannot parse wrk output $1"
}

# "pid requests" of each fdtserver worker, from its control API (nothing if
# that fails: the balance is then reported as n/a, the benchmark goes on).
worker_requests() {
    "$FDT_BIN" status --config "$TMP/fdtserver.toml" --json 2>/dev/null |
        awk '/"pid":/ { pid = $2 + 0 } /"requests":/ { print pid, $2 + 0 }' || true
}

# Requests each worker served between two worker_requests snapshots, and
# busiest/least: "a / b (busiest/least 1.04)".
balance() { # before-file after-file
    awk 'NR == FNR { before[$1] = $2; next }
        { n = $2 - before[$1]; list = list (list == "" ? "" : " / ") n
          if (k == 0 || n > hi) hi = n; if (k == 0 || n < lo) lo = n; k++ }
        END { if (k < 2 || lo <= 0) print "n/a"; else printf "%s (busiest/least %.2f)\n", list, hi / lo }' "$1" "$2"
}

# "worker handler ticks" for each handler thread of each fdtserver worker: how much CPU
# each handler used so far, which shows how many handlers a worker admits to serve.
handler_ticks() {
    local w
    [ -v "PID[fdtserver]" ] || return 0
    for w in $(pgrep -P "${PID[fdtserver]}" || true); do
        awk -v w="$w" '{ c = $0; sub(/^[^(]*\(/, "", c); sub(/\).*$/, "", c)
            if (c ~ /^handler-/) { r = $0; sub(/^.*\) /, "", r); split(r, f, " "); print w, c, f[12] + f[13] } }' \
            /proc/"$w"/task/*/stat 2>/dev/null || true
    done
}

# Handlers that served per worker between two handler_ticks snapshots: "1 / 1"; a
# handler counts when it used at least 5% of its worker's handler CPU time meanwhile
# (a parked handler only wakes once a second to look).
handlers_served() { # before-file after-file
    awk 'NR == FNR { before[$1 " " $2] = $3; next }
        { d = $3 - before[$1 " " $2]; tick[$1 " " $2] = d; sum[$1] += d }
        END { for (k in tick) { split(k, p, " "); if (sum[p[1]] > 0 && tick[k] * 20 >= sum[p[1]]) n[p[1]]++
                else if (!(p[1] in n)) n[p[1]] = 0 }
              for (w in n) if (sum[w] > 0) list = list (list == "" ? "" : " / ") n[w]
              print list == "" ? "n/a" : list }' "$1" "$2"
}

# A benchmark on a busy machine measures the other load: look for 1 s first.
i0=$(server_ticks)
j0=$(client_ticks)
sleep 1
read -r idle_s idle_c idle_steal <<<"$(cpu_pct "$i0" "$j0" "$(server_ticks)" "$(client_ticks)")"
BACKGROUND="CPUs $SERVER_CPUS ${idle_s}% and CPUs $CLIENT_CPUS ${idle_c}% busy, ${idle_steal}% stolen, before the servers started"
say "background load: $BACKGROUND"
if [ "$idle_s" -gt 10 ] || [ "$idle_c" -gt 10 ]; then
    say "warning: the machine is not idle; the figures will be noisy"
fi

for s in "${SERVERS[@]}"; do
    ! port_open "${PORT[$s]}" || die "port ${PORT[$s]} (for $s) is already in use; set PORT_BASE"
done
for s in "${SERVERS[@]}"; do
    say "starting $s on 127.0.0.1:${PORT[$s]} (CPUs $SERVER_CPUS)"
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

# The machine may be shared (a build, a test suite): before each run, wait
# for it to be quiet, and repeat a run that other processes disturbed, as long
# as NOISE_BUDGET lasts. Between runs our servers are idle, so any busy CPU
# now is someone else's.
noise_left=$((NOISE_BUDGET * 10))   # in tenths of a second
repeated=0
wait_quiet() {
    local a0 b0 busy0 busy1 waited=0
    while :; do
        a0=$(server_ticks)
        b0=$(client_ticks)
        sleep 0.5
        read -r busy0 busy1 _ <<<"$(cpu_pct "$a0" "$b0" "$(server_ticks)" "$(client_ticks)")"
        [ $((busy0 + busy1)) -gt "$OTHER_MAX" ] || break
        [ "$noise_left" -ge 5 ] || { say "machine busy (${busy0}% + ${busy1}%) and NOISE_BUDGET spent: measuring anyway"; break; }
        [ "$waited" = 1 ] || say "machine busy (${busy0}% + ${busy1}%): waiting for quiet"
        waited=1
        noise_left=$((noise_left - 5))
    done
}

RESULTS=$TMP/results.txt   # point (conns, or new<conns>) server round, then parse_wrk's fields
: >"$RESULTS"
HANDSHAKES=$TMP/handshakes.txt   # TLS=1: point server round full resumed version cipher group
: >"$HANDSHAKES"
total=$((${#POINTS[@]} * ROUNDS * ${#SERVERS[@]}))
n=0
# Alternate servers inside each round (A B C A B C), so slow drift of this
# shared, noisy VM hits every server alike instead of one whole block.
for c in "${POINTS[@]}"; do
    [ ! -v "PID[fdtserver]" ] || worker_requests >"$TMP/workers-c$c-before.txt"
    handler_ticks >"$TMP/handlers-c$c-before.txt"
    for ((r = 1; r <= ROUNDS; r++)); do
        for s in "${SERVERS[@]}"; do
            n=$((n + 1))
            out="$TMP/wrk-$s-c$c-r$r.txt"
            for ((try = 1; ; try++)); do
                wait_quiet
                run_wrk "$s" "$c" "$DURATION" "$out"
                line=$(parse_wrk "$out")
                other=$(awk '{ print $13 }' <<<"$line")
                if [ "$other" -le "$OTHER_MAX" ] || [ "$try" -gt 2 ] || [ "$noise_left" -lt $((DURATION * 10)) ]; then
                    break
                fi
                say "[$n/$total] c=$c round $r $s: disturbed (other load ${other}%), measuring again"
                noise_left=$((noise_left - DURATION * 10))
                repeated=$((repeated + 1))
            done
            echo "$c $s $r $line" >>"$RESULTS"
            read -r rps p50 p99 _ _ _ _ _ scpu ccpu steal cost other <<<"$line"
            hs=""
            if [ "$TLS" = 1 ]; then
                hs=$(sed -En 's/^TLS handshakes: full=([0-9]+) resumed=([0-9]+) version=(.*) cipher=(.*) group=(.*)$/\1 \2 \3 \4 \5/p' "$out")
                [ -n "$hs" ] || hs="n/a n/a ? ? ?"
                echo "$c $s $r $hs" >>"$HANDSHAKES"
                read -r hs_full hs_resumed _ <<<"$hs"
                hs="; TLS handshakes: $hs_full full, $hs_resumed resumed"
            fi
            say "[$n/$total] c=${c#new}$([[ $c != new* ]] || echo ' new connections') round $r $s: $rps req/s, p50 ${p50}us, p99 ${p99}us; CPU busy: server ${scpu}%, wrk ${ccpu}%; server ${cost} µs/req; other load ${other}%, steal ${steal}%$hs"
        done
    done
    [ ! -v "PID[fdtserver]" ] || worker_requests >"$TMP/workers-c$c-after.txt"
    handler_ticks >"$TMP/handlers-c$c-after.txt"
done
if [ "$TLS" = 1 ]; then
    ! grep -q ' n/a ' "$HANDSHAKES" ||
        say "warning: wrk did not load $TMP/tls_handshakes.so (a static build?): handshakes unverified, and may have been resumed"
    if [ "$TLS_RESUME" = 0 ] && awk '$5 != "n/a" && $5 > 0 { f = 1 } END { exit !f }' "$HANDSHAKES"; then
        say "warning: some handshakes were resumed although TLS_RESUME=0 (see the table)"
    fi
fi

# --- 4b. latency at equal request rates ------------------------------------------
# wrk is closed-loop, so its latencies are each server's at its own throughput. The
# issue's comparison is at equal rates: examples/loadgen sends at a fixed rate and
# measures each request from when it was due (no coordinated omission).
LAT=$TMP/latency.txt   # conns rate server round p50 p99 p999 errors
: >"$LAT"
if [ -n "$RATES" ] && [ -x "$LOADGEN" ]; then
    for c in "${CONN_LIST[@]}"; do
        for rate in $RATES; do
            handler_ticks >"$TMP/handlers-c$c-r$rate-before.txt"
            for ((r = 1; r <= RATE_ROUNDS; r++)); do
                for s in fdtserver nginx; do
                    [ -v "PID[$s]" ] || continue
                    wait_quiet
                    line=$(taskset -c "$CLIENT_CPUS" "$LOADGEN" "127.0.0.1:${PORT[$s]}" --rate "$rate" --seconds "$RATE_SECONDS" --connections "$c")
                    read -r p50 p99 p999 errs <<<"$(sed -E 's/.*errors=([0-9]+).*p50_us=([0-9]+).*p99_us=([0-9]+) p999_us=([0-9]+).*/\2 \3 \4 \1/' <<<"$line")"
                    echo "$c $rate $s $r $p50 $p99 $p999 $errs" >>"$LAT"
                    say "c=$c rate=$rate round $r $s: p50 ${p50}us p99 ${p99}us p99.9 ${p999}us errors $errs"
                done
            done
            handler_ticks >"$TMP/handlers-c$c-r$rate-after.txt"
        done
    done
elif [ -n "$RATES" ]; then
    say "SKIPPING the fixed-rate latency: $LOADGEN was not built"
fi

# --- 5. report -------------------------------------------------------------------
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# Field k of the runs of server s at c connections; only the runs other load
# did not disturb, if there is any such run.
col() {
    awk -v c="$1" -v s="$2" -v k="$3" -v m="$OTHER_MAX" '
        $1 == c && $2 == s { all[++n] = $k; if ($16 <= m) clean[++q] = $k }
        END { if (q) for (i = 1; i <= q; i++) print clean[i]; else for (i = 1; i <= n; i++) print all[i] }' "$RESULTS"
}
col_all() { awk -v k="$1" '{ print $k }' "$RESULTS"; }
fmt_us() { awk -v v="$1" 'BEGIN { if (v == "") print "n/a"; else if (v < 1000) printf "%d µs", v; else printf "%.2f ms", v / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "n/a"; else printf "%.2f", a / b }'; }

git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo "no commit")
[ -z "$(git status --porcelain 2>/dev/null)" ] || git_rev="$git_rev (uncommitted changes)"
# For report and report_tls: the noise of the whole run, two lines.
noise_lines() {
    echo "Background load: $BACKGROUND; during the runs, other processes used $(col_all 16 | median)% of a CPU (median; max $(col_all 16 | sort -g | tail -n 1)%), the hypervisor stole $(col_all 14 | median)% (median)."
    echo "Runs disturbed by other load and measured again: $repeated; runs kept with other load above ${OTHER_MAX}%: $(awk -v m="$OTHER_MAX" '$16 > m { n++ } END { print n + 0 }' "$RESULTS") of $total."
}

# The figures of one table cell, point $1 and server $2, into the caller's locals
# (used rps lo hi p50 p99 errs bad scpu ccpu cost) and its M_RPS, M_P99, M_COST.
cell_stats() {
    local c=$1 s=$2
    used=$(col "$c" "$s" 4 | wc -l)
    [ "$(awk -v c="$c" -v s="$s" -v m="$OTHER_MAX" '$1 == c && $2 == s && $16 <= m' "$RESULTS")" ] || used="$used ⚠"
    rps=$(col "$c" "$s" 4 | median)
    lo=$(col "$c" "$s" 4 | sort -g | head -n 1)
    hi=$(col "$c" "$s" 4 | sort -g | tail -n 1)
    p50=$(col "$c" "$s" 5 | median)
    p99=$(col "$c" "$s" 6 | median)
    errs=$(awk -v c="$c" -v s="$s" '$1 == c && $2 == s { n += $7 + $8 + $9 + $10 } END { print n + 0 }' "$RESULTS")
    bad=$(awk -v c="$c" -v s="$s" '$1 == c && $2 == s { n += $11 } END { print n + 0 }' "$RESULTS")
    scpu=$(col "$c" "$s" 12 | median)
    ccpu=$(col "$c" "$s" 13 | median)
    cost=$(col "$c" "$s" 15 | median)
    M_RPS[$c,$s]=$rps
    M_P99[$c,$s]=$p99
    M_COST[$c,$s]=$cost
}

# What the tables' columns mean; $1: how errors are counted.
table_notes() {
    echo "Medians and ranges are over the runs that other load did not disturb (\"runs used\"), or over all runs, marked ⚠, when every run was disturbed. $1"
    echo "Ratios of medians; req/s ratio > 1 means fdtserver is faster; p99 and CPU/req ratios < 1 mean fdtserver's tail is shorter, or its CPU cost per request lower."
    echo "wrk is closed-loop: each server's p50/p99 is at its own throughput, not at equal request rates."
    echo "CPU busy = share of the CPUs neither idle nor stolen during the run (CPUs $SERVER_CPUS: the server, CPUs $CLIENT_CPUS: wrk; averaged over each set); a server CPU well under 100% means wrk, not the server, set the pace."
    echo "Server process CPU µs/req = user + system time of the server's processes / requests answered: its cost per request (softirq work is not in it), comparable even when wrk sets the pace or other load shares the CPU."
    echo "Other load = CPU time of processes other than the server and wrk during a run, in % of one CPU; a run above ${OTHER_MAX}% (⚠ below) was disturbed by the rest of the machine."
}

report() {
    echo "# Load benchmark: last run"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), kernel $(uname -r), $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }' || true), fdtserver at $git_rev."
    echo "Servers pinned to CPUs $SERVER_CPUS, wrk (keep-alive, threads: $WRK_THREADS) to CPUs $CLIENT_CPUS; workers=$WORKERS for fdtserver and nginx, threads=$THREADS for fdtserver;"
    echo "${DURATION} s per run, rounds: $ROUNDS, alternating ${SERVERS[*]} in each round; medians over the rounds. Command: \`benches/load/run.sh\` (DURATION=$DURATION ROUNDS=$ROUNDS CONNECTIONS=\"$CONNECTIONS\" WORKERS=$WORKERS THREADS=$THREADS SERVER_CPUS=$SERVER_CPUS CLIENT_CPUS=$CLIENT_CPUS${SERVER_CPU_QUOTA:+ SERVER_CPU_QUOTA=$SERVER_CPU_QUOTA} RATES=\"$RATES\")."
    [ -x "$FDT_BIN" ] || echo "**fdtserver was not measured: $FDT_BIN did not exist.**"
    [ "$FDT_BIN" = "$REPO/target/release/fdtserver" ] || echo "fdtserver binary: \`$FDT_BIN\`."
    echo
    noise_lines
    echo
    echo "| connections | server | runs used | req/s (median) | req/s (min–max) | p50 | p99 | socket errors | non-2xx | server CPU busy | wrk CPU busy | server process CPU µs/req |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local c s used rps lo hi p50 p99 errs bad scpu ccpu cost
    declare -A M_RPS=() M_P99=() M_COST=()
    for c in "${CONN_LIST[@]}"; do
        for s in "${SERVERS[@]}"; do
            cell_stats "$c" "$s"
            printf '| %s | %s | %s | %.0f | %.0f–%.0f | %s | %s | %s | %s | %.0f%% | %.0f%% | %.2f |\n' "$c" "$s" "$used" "$rps" "$lo" "$hi" \
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
    table_notes "Errors are summed over all runs."
    if [ -v "PID[fdtserver]" ]; then
        echo
        echo "Requests served per fdtserver worker over the measured runs (from \`fdtserver status --json\`):"
        echo
        for c in "${CONN_LIST[@]}"; do
            echo "- $c connections: $(balance "$TMP/workers-c$c-before.txt" "$TMP/workers-c$c-after.txt")"
        done
        echo
        echo "Handler threads that served, per fdtserver worker (of threads=$THREADS; a handler counts when it used at least 5% of its worker's handler CPU time; from \`/proc\`):"
        echo
        for c in "${CONN_LIST[@]}"; do
            echo "- $c connections, wrk: $(handlers_served "$TMP/handlers-c$c-before.txt" "$TMP/handlers-c$c-after.txt")"
            if [ -s "$LAT" ]; then
                for rate in $RATES; do
                    echo "- $c connections, $rate req/s (loadgen): $(handlers_served "$TMP/handlers-c$c-r$rate-before.txt" "$TMP/handlers-c$c-r$rate-after.txt")"
                done
            fi
        done
    fi
    if [ -s "$LAT" ]; then
        echo
        echo "Latency at equal request rates (examples/loadgen, open loop, pinned to CPUs $CLIENT_CPUS; $RATE_SECONDS s per run, medians over $RATE_ROUNDS alternating rounds):"
        echo
        echo "| connections | req/s | fdtserver p50 | p99 | p99.9 | nginx p50 | p99 | p99.9 | p99 fdtserver/nginx | errors |"
        echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        local rate fp50 fp99 fp999 np50 np99 np999 lerr
        for c in "${CONN_LIST[@]}"; do
            for rate in $RATES; do
                lat() { awk -v c="$c" -v r="$rate" -v s="$1" -v k="$2" '$1 == c && $2 == r && $3 == s { print $k }' "$LAT" | median; }
                fp50=$(lat fdtserver 5); fp99=$(lat fdtserver 6); fp999=$(lat fdtserver 7)
                np50=$(lat nginx 5); np99=$(lat nginx 6); np999=$(lat nginx 7)
                lerr=$(awk -v c="$c" -v r="$rate" '$1 == c && $2 == r { n += $8 } END { print n + 0 }' "$LAT")
                printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$c" "$rate" \
                    "$(fmt_us "$fp50")" "$(fmt_us "$fp99")" "$(fmt_us "$fp999")" \
                    "$(fmt_us "$np50")" "$(fmt_us "$np99")" "$(fmt_us "$np999")" "$(ratio "$fp99" "$np99")" "$lerr"
            done
        done
    fi
    echo
    echo "<details><summary>Every run</summary>"
    echo
    echo "| connections | server | round | req/s | p50 | p99 | connect/read/write/timeout errors | non-2xx | server/wrk CPU busy | server process CPU µs/req | other load | steal |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local rnd cn rd wr to steal other
    while read -r c s rnd rps p50 p99 cn rd wr to bad scpu ccpu steal cost other; do
        printf '| %s | %s | %s | %s | %s | %s | %s/%s/%s/%s | %s | %s%% / %s%% | %s | %s%%%s | %s%% |\n' "$c" "$s" "$rnd" "$rps" \
            "$(fmt_us "$p50")" "$(fmt_us "$p99")" "$cn" "$rd" "$wr" "$to" "$bad" "$scpu" "$ccpu" "$cost" \
            "$other" "$([ "$other" -le "$OTHER_MAX" ] || echo ' ⚠')" "$steal"
    done <"$RESULTS"
    echo
    echo "</details>"
}

# TLS=1: the same figures per point, keep-alive and new connections, for fdtserver and nginx,
# with the handshakes wrk counted; the ratios are fdtserver/nginx.
point_label() {
    if [[ $1 == new* ]]; then echo "${1#new}, new connection per request"; else echo "$1, keep-alive"; fi
}
report_tls() {
    local rustls
    rustls=$(awk '$0 == "name = \"rustls\"" { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock 2>/dev/null)
    echo "# Load benchmark over TLS: last run"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), kernel $(uname -r), $("$NGINX" -v 2>&1 | sed 's/^nginx version: //') and $(wrk -v 2>&1 | head -n 1 | awk '{ print $1, $2 }' || true) on $(openssl version | awk '{ print $1, $2 }'), fdtserver at $git_rev on rustls ${rustls:-?} (ring)."
    echo "Servers pinned to CPUs $SERVER_CPUS, wrk (threads: $WRK_THREADS) to CPUs $CLIENT_CPUS; workers=$WORKERS for fdtserver and nginx, threads=$THREADS for fdtserver;"
    echo "${DURATION} s per run, rounds: $ROUNDS, alternating ${SERVERS[*]} in each round; medians over the rounds. Command: \`TLS=1 benches/load/run.sh\` (DURATION=$DURATION ROUNDS=$ROUNDS CONNECTIONS=\"$CONNECTIONS\" HANDSHAKE_CONNECTIONS=\"$HANDSHAKE_CONNECTIONS\" TLS_RESUME=$TLS_RESUME WORKERS=$WORKERS THREADS=$THREADS SERVER_CPUS=$SERVER_CPUS CLIENT_CPUS=$CLIENT_CPUS${SERVER_CPU_QUOTA:+ SERVER_CPU_QUOTA=$SERVER_CPU_QUOTA})."
    [ -x "$FDT_BIN" ] || echo "**fdtserver was not measured: $FDT_BIN did not exist.**"
    [ "$FDT_BIN" = "$REPO/target/release/fdtserver" ] || echo "fdtserver binary: \`$FDT_BIN\`."
    echo
    echo "TLS: both servers serve the same throw-away self-signed ECDSA P-256 certificate, with TLS 1.2 and 1.3 and their default cipher suites and groups, and the same resumption policy: a per-worker in-memory cache of 256 sessions and no ticket key (fdtserver: \`tls_tickets = false\`; nginx: \`ssl_session_cache builtin:256; ssl_session_tickets off\`)."
    local s neg
    for s in "${SERVERS[@]}"; do
        neg=$(awk -v s="$s" '$2 == s && $6 != "?" { print $6, $7, $8 }' "$HANDSHAKES" | sort -u | paste -sd ';' -)
        echo "Negotiated with $s, as wrk saw it: ${neg:-unknown (handshakes unverified)}."
    done
    if [ "$TLS_RESUME" = 1 ]; then
        echo "TLS_RESUME=1: wrk offered each connection slot's last session again; the \"new connection\" rows mix full and resumed handshakes (counted below)."
    else
        echo "Every handshake is a full one: wrk would offer a connection slot's last session again (it reuses the SSL object with SSL_clear, which keeps the session), so benches/load/tls_handshakes.c, preloaded into wrk, drops that session before each handshake and counts the handshakes that completed, full and resumed."
    fi
    echo
    noise_lines
    echo
    echo "| connections, load | server | runs used | req/s (median) | req/s (min–max) | p50 | p99 | socket errors | non-2xx | server CPU busy | wrk CPU busy | server process CPU µs/req | TLS handshakes full / resumed |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local c used rps lo hi p50 p99 errs bad scpu ccpu cost hs
    declare -A M_RPS=() M_P99=() M_COST=()
    for c in "${POINTS[@]}"; do
        for s in "${SERVERS[@]}"; do
            cell_stats "$c" "$s"
            hs=$(awk -v c="$c" -v s="$s" '$1 == c && $2 == s { if ($4 == "n/a") u = 1; f += $4; r += $5 }
                END { if (u) print "unverified"; else printf "%d / %d\n", f, r }' "$HANDSHAKES")
            printf '| %s | %s | %s | %.0f | %.0f–%.0f | %s | %s | %s | %s | %.0f%% | %.0f%% | %.2f | %s |\n' "$(point_label "$c")" "$s" "$used" \
                "$rps" "$lo" "$hi" "$(fmt_us "$p50")" "$(fmt_us "$p99")" "$errs" "$bad" "$scpu" "$ccpu" "$cost" "$hs"
        done
    done
    echo
    echo "| connections, load | req/s fdtserver/nginx | server CPU/req fdtserver/nginx | p99 fdtserver/nginx |"
    echo "|---|---:|---:|---:|"
    for c in "${POINTS[@]}"; do
        printf '| %s | %s | %s | %s |\n' "$(point_label "$c")" \
            "$(ratio "${M_RPS[$c,fdtserver]:-}" "${M_RPS[$c,nginx]:-}")" \
            "$(ratio "${M_COST[$c,fdtserver]:-}" "${M_COST[$c,nginx]:-}")" \
            "$(ratio "${M_P99[$c,fdtserver]:-}" "${M_P99[$c,nginx]:-}")"
    done
    echo
    echo "With a new connection per request, requests/s are handshakes/s and CPU µs per request is CPU µs per handshake (and its one request)."
    table_notes "Errors and handshakes are summed over all runs."
    echo "Keep-alive p99 at many connections includes each run's start: wrk first opens all its connections, a full handshake each, with the connections already open waiting behind them (500 take some 0.2 s of wrk's CPU here); a longer DURATION dilutes it."
    if [ -v "PID[fdtserver]" ]; then
        echo
        echo "Requests served per fdtserver worker over the measured runs (from \`fdtserver status --json\`):"
        echo
        for c in "${POINTS[@]}"; do
            echo "- $(point_label "$c"): $(balance "$TMP/workers-c$c-before.txt" "$TMP/workers-c$c-after.txt")"
        done
    fi
    echo
    echo "<details><summary>Every run</summary>"
    echo
    echo "| connections, load | server | round | req/s | p50 | p99 | connect/read/write/timeout errors | non-2xx | server/wrk CPU busy | server process CPU µs/req | other load | steal | TLS handshakes full / resumed |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    local rnd cn rd wr to steal other hf hr
    while read -r c s rnd rps p50 p99 cn rd wr to bad scpu ccpu steal cost other _ _ _ hf hr _; do
        printf '| %s | %s | %s | %s | %s | %s | %s/%s/%s/%s | %s | %s%% / %s%% | %s | %s%%%s | %s%% | %s / %s |\n' "$(point_label "$c")" "$s" "$rnd" "$rps" \
            "$(fmt_us "$p50")" "$(fmt_us "$p99")" "$cn" "$rd" "$wr" "$to" "$bad" "$scpu" "$ccpu" "$cost" \
            "$other" "$([ "$other" -le "$OTHER_MAX" ] || echo ' ⚠')" "$steal" "$hf" "$hr"
    done < <(paste -d ' ' "$RESULTS" "$HANDSHAKES")
    echo
    echo "</details>"
}
# A server-bound run (SERVER_CPU_QUOTA) keeps its own file beside the client-bound one.
QUOTA_SUFFIX=${SERVER_CPU_QUOTA:+-cpu$SERVER_CPU_QUOTA}
if [ "$TLS" = 1 ]; then
    LAST=benches/load/last-run-tls$QUOTA_SUFFIX.md
    report_tls >"$LAST"
else
    LAST=benches/load/last-run$QUOTA_SUFFIX.md
    report >"$LAST"
fi
echo
cat "$LAST"
say "written to $LAST"
