#!/usr/bin/env bash
# benches/load/admission.sh — how many handlers serve per worker, and the latency at a fixed
# rate, for fdtserver builds and `threads` settings side by side (issue 13, point 6).
#
# Run from the repo root, after `cargo build --release --workspace --example loadgen`:
#   benches/load/admission.sh NAME=TARGET_DIR:THREADS ...
# for example, this tree's build with threads = 4 and 1 against an older commit's
# (`git worktree add /tmp/old HEAD~1 && cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target
#  cargo build --release --workspace`):
#   benches/load/admission.sh old=/tmp/old-target:4 old-t1=/tmp/old-target:1 \
#       new=target:4 new-t1=target:1
# Each server runs `hello` with WORKERS workers pinned to SERVER_CPUS; examples/loadgen,
# pinned to CLIENT_CPUS, sends RATE requests a second over CONNECTIONS keep-alive
# connections for RUN_SECONDS, ROUNDS times, alternating the servers in each round (the machine's
# drift hits all alike). Prints, per server: medians of p50/p99/p99.9 over the rounds, the
# server's CPU time per request, and the handlers that served per worker (from /proc: those
# that used at least 5 % of their worker's handler CPU time).
#
#   WORKERS=2 SERVER_CPUS=0-1 CLIENT_CPUS=1 RATE=20000 CONNECTIONS=50 RUN_SECONDS=3 ROUNDS=5
#   PORT_BASE=18180
set -euo pipefail

WORKERS=${WORKERS:-2}
SERVER_CPUS=${SERVER_CPUS:-0-1}
CLIENT_CPUS=${CLIENT_CPUS:-1}
RATE=${RATE:-20000}
CONNECTIONS=${CONNECTIONS:-50}
SECONDS_PER_RUN=${RUN_SECONDS:-3}
ROUNDS=${ROUNDS:-5}
PORT_BASE=${PORT_BASE:-18180}

die() { printf 'admission.sh: error: %s\n' "$*" >&2; exit 1; }
say() { printf '==> %s\n' "$*" >&2; }
[ "$#" -gt 0 ] || die "usage: benches/load/admission.sh NAME=TARGET_DIR:THREADS ... (see the comment at the top)"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
LOADGEN=${LOADGEN:-$REPO/target/release/examples/loadgen}
[ -x "$LOADGEN" ] || die "$LOADGEN is missing: cargo build --release --example loadgen"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/fdt-admission.XXXXXX")
declare -A PID=() PORT=() THREADS_OF=()
NAMES=()
cleanup() {
    local n kids
    for n in "${!PID[@]}"; do
        kids=$(pgrep -P "${PID[$n]}" || true)
        kill -TERM "${PID[$n]}" 2>/dev/null || true
        wait "${PID[$n]}" 2>/dev/null || true
        for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

i=0
for spec in "$@"; do
    [[ $spec =~ ^([A-Za-z0-9_-]+)=(.+):([0-9]+)$ ]] || die "bad server '$spec' (NAME=TARGET_DIR:THREADS)"
    name=${BASH_REMATCH[1]} dir=${BASH_REMATCH[2]} threads=${BASH_REMATCH[3]}
    [ -x "$dir/release/fdtserver" ] || die "$dir/release/fdtserver is missing (build it with CARGO_TARGET_DIR=$dir)"
    port=$((PORT_BASE + i))
    i=$((i + 1))
    cat >"$TMP/$name.toml" <<EOF
[server]
workers = $WORKERS
threads = $threads
control_socket = "$TMP/$name.sock"

[[listen]]
address = "127.0.0.1:$port"
app = "hello"

[app.hello]
plugin = "$(cd "$dir" && pwd)/release/libfdt_hello.so"
EOF
    taskset -c "$SERVER_CPUS" "$dir/release/fdtserver" --config "$TMP/$name.toml" >"$TMP/$name.log" 2>&1 &
    PID[$name]=$!
    PORT[$name]=$port
    THREADS_OF[$name]=$threads
    NAMES+=("$name")
done
for name in "${NAMES[@]}"; do
    for ((t = 0; t < 300; t++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/${PORT[$name]}") 2>/dev/null && break
        kill -0 "${PID[$name]}" 2>/dev/null || { cat "$TMP/$name.log" >&2; die "$name exited"; }
        sleep 0.05
    done
    "$LOADGEN" "127.0.0.1:${PORT[$name]}" --rate 5000 --seconds 1 --connections "$CONNECTIONS" >/dev/null
done

# "worker handler ticks" of each handler thread of a server's workers.
handler_ticks() {
    local w
    for w in $(pgrep -P "${PID[$1]}" || true); do
        awk -v w="$w" '{ c = $0; sub(/^[^(]*\(/, "", c); sub(/\).*$/, "", c)
            if (c ~ /^handler-/) { r = $0; sub(/^.*\) /, "", r); split(r, f, " "); print w, c, f[12] + f[13] } }' \
            /proc/"$w"/task/*/stat 2>/dev/null || true
    done
}
# CPU ticks of a server's processes so far.
proc_ticks() {
    local p t=0 x
    for p in "${PID[$1]}" $(pgrep -P "${PID[$1]}" || true); do
        x=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)
        t=$((t + x))
    done
    echo "$t"
}

for name in "${NAMES[@]}"; do
    handler_ticks "$name" >"$TMP/$name.handlers-before"
    : >"$TMP/$name.runs"
done
for ((r = 1; r <= ROUNDS; r++)); do
    for name in "${NAMES[@]}"; do
        before=$(proc_ticks "$name")
        line=$(taskset -c "$CLIENT_CPUS" "$LOADGEN" "127.0.0.1:${PORT[$name]}" --rate "$RATE" \
            --seconds "$SECONDS_PER_RUN" --connections "$CONNECTIONS")
        after=$(proc_ticks "$name")
        ok=$(sed -E 's/.* ok=([0-9]+).*/\1/' <<<"$line")
        echo "$line cpu_ticks=$((after - before)) ok_n=$ok" >>"$TMP/$name.runs"
        say "round $r $name (threads=${THREADS_OF[$name]}): $line"
    done
done

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print ""; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
field() { sed -E "s/.* $2=([0-9]+).*/\\1/" "$TMP/$1.runs"; }
hz=$(getconf CLK_TCK)
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), workers=$WORKERS on CPUs $SERVER_CPUS, loadgen on CPUs $CLIENT_CPUS, $RATE req/s over $CONNECTIONS connections, $ROUNDS alternating rounds of $SECONDS_PER_RUN s"
echo
echo "| server | threads | p50 | p99 | p99.9 | errors | server CPU µs/req | handlers that served, per worker |"
echo "|---|---:|---:|---:|---:|---:|---:|---|"
for name in "${NAMES[@]}"; do
    handler_ticks "$name" >"$TMP/$name.handlers-after"
    served=$(awk 'NR == FNR { before[$1 " " $2] = $3; next }
        { d = $3 - before[$1 " " $2]; tick[$1 " " $2] = d; sum[$1] += d }
        END { for (k in tick) { split(k, p, " "); if (!(p[1] in n)) n[p[1]] = 0; if (sum[p[1]] > 0 && tick[k] * 20 >= sum[p[1]]) n[p[1]]++ }
              for (w in n) list = list (list == "" ? "" : " / ") n[w]; print list }' \
        "$TMP/$name.handlers-before" "$TMP/$name.handlers-after")
    errors=$(field "$name" errors | awk '{ s += $1 } END { print s + 0 }')
    cost=$(paste <(field "$name" cpu_ticks) <(field "$name" ok_n) |
        awk -v hz="$hz" '{ t += $1; n += $2 } END { if (n) printf "%.2f", 1e6 * t / hz / n; else print "n/a" }')
    printf '| %s | %s | %s µs | %s µs | %s µs | %s | %s | %s |\n' "$name" "${THREADS_OF[$name]}" \
        "$(field "$name" p50_us | median)" "$(field "$name" p99_us | median)" "$(field "$name" p999_us | median)" \
        "$errors" "$cost" "$served"
done
