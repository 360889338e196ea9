#!/usr/bin/env bash
# A throw-away cluster on this machine, in one command: PostgreSQL, two fdtserver nodes
# (node-a and node-b, each serving `hello` and `bank`, transfers between two databases by
# two-phase commit) and HAProxy in front of them, all in a temp dir. Ctrl-C (or TERM) stops
# everything and removes the dir (KEEP=1 keeps it).
#
#   examples/cluster/run.sh                   # builds first if needed (cargo build --release --workspace)
#   PROFILE=debug examples/cluster/run.sh     # the debug build (cargo build --workspace)
#   PORT_BASE=28000 examples/cluster/run.sh   # other ports (default 18000: see the list it prints)
#
# Needs haproxy and PostgreSQL (initdb, pg_ctl, createdb): apt-get install haproxy postgresql.
# As root, PostgreSQL runs as the `postgres` user (it refuses root).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
profile=${PROFILE:-release}
base=${PORT_BASE:-18000}

say() { printf '%s\n' "$*"; }
fail() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

# ---- what is needed ----------------------------------------------------------------------
command -v haproxy >/dev/null || fail "haproxy is not installed (apt-get install haproxy)"
pgbin=
if command -v initdb >/dev/null; then
    pgbin=$(dirname "$(readlink -f "$(command -v initdb)")")
else
    for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && pgbin=$d; done
fi
[ -n "$pgbin" ] || fail "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin)"

if command -v cargo >/dev/null; then
    say "building ($profile)…"
    if [ "$profile" = release ]; then
        (cd "$root" && cargo build --release --workspace --quiet)
    else
        (cd "$root" && cargo build --workspace --quiet)
    fi
fi
target="$root/target/$profile"
bin="$target/fdtserver"
for f in "$bin" "$target/libfdt_hello.so" "$target/libfdt_bank.so"; do
    [ -e "$f" ] || fail "$f is missing: build with cargo build --workspace${profile:+ (PROFILE=$profile)}"
done

# ---- ports ---------------------------------------------------------------------------------
lb_hello=$base lb_bank=$((base + 1)) lb_stats=$((base + 2))
a_hello=$((base + 10)) a_bank=$((base + 11)) a_agent=$((base + 12))
b_hello=$((base + 20)) b_bank=$((base + 21)) b_agent=$((base + 22))
for p in $lb_hello $lb_bank $lb_stats $a_hello $a_bank $a_agent $b_hello $b_bank $b_agent; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        fail "port $p is in use; choose others with PORT_BASE=…"
    fi
done

# ---- the temp dir and the stop ---------------------------------------------------------------
dir=$(mktemp -d "${TMPDIR:-/tmp}/fdt-cluster.XXXXXX")
chmod 755 "$dir"   # PostgreSQL's user must reach its data dir inside
as_pg=()
if [ "$(id -u)" = 0 ]; then
    as_pg=(runuser -u postgres --)
fi
pg_started=
haproxy_pid=

stop_all() {
    trap - EXIT INT TERM
    say ""
    say "stopping…"
    if [ -n "$haproxy_pid" ]; then
        kill "$haproxy_pid" 2>/dev/null || true
        wait "$haproxy_pid" 2>/dev/null || true
    fi
    for node in node-a node-b; do
        [ -e "$dir/$node.toml" ] || continue
        timeout 20 "$bin" stop --config "$dir/$node.toml" >/dev/null 2>&1 || true
        # Whatever is left of it (a node restarted by hand has its pid here too): its whole
        # process group, master and workers.
        if [ -s "$dir/$node.pid" ]; then
            kill -KILL -- "-$(cat "$dir/$node.pid")" 2>/dev/null || true
        fi
    done
    if [ -n "$pg_started" ]; then
        "${as_pg[@]}" "$pgbin/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    if [ -n "${KEEP:-}" ]; then
        say "kept $dir"
    else
        rm -rf "$dir"
    fi
    say "stopped"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- PostgreSQL ------------------------------------------------------------------------------
say "starting PostgreSQL in $dir/pg…"
mkdir "$dir/pg"
[ "${#as_pg[@]}" -eq 0 ] || chown postgres: "$dir/pg"
"${as_pg[@]}" "$pgbin/initdb" -D "$dir/pg/data" -U postgres -A trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 ||
    fail "initdb failed: see $dir/initdb.log"
# Two-phase commit needs max_prepared_transactions > 0; only the Unix socket, in the temp dir.
"${as_pg[@]}" "$pgbin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/postgres.log" -w \
    -o "-k $dir/pg -p 5432 -c listen_addresses= -c max_prepared_transactions=64 -c max_connections=200" \
    start >/dev/null || fail "PostgreSQL did not start: see $dir/pg/postgres.log"
pg_started=1
for db in a b; do
    "$pgbin/createdb" -h "$dir/pg" -p 5432 -U postgres "$db"
done

# ---- the nodes -----------------------------------------------------------------------------------
fill() { # TEMPLATE OUT NAME=VALUE…
    local text
    text=$(cat "$1")
    local out=$2
    shift 2
    for kv in "$@"; do
        text=${text//@${kv%%=*}@/${kv#*=}}
    done
    printf '%s\n' "$text" >"$out"
}
common=(DIR="$dir" TARGET="$target" PGHOST="$dir/pg" PGPORT=5432)
fill "$here/node.toml" "$dir/node-a.toml" NODE=node-a HELLO_PORT=$a_hello BANK_PORT=$a_bank AGENT_PORT=$a_agent "${common[@]}"
fill "$here/node.toml" "$dir/node-b.toml" NODE=node-b HELLO_PORT=$b_hello BANK_PORT=$b_bank AGENT_PORT=$b_agent "${common[@]}"
fill "$here/haproxy.cfg" "$dir/haproxy.cfg" DIR="$dir" LB_HELLO_PORT=$lb_hello LB_BANK_PORT=$lb_bank \
    LB_STATS_PORT=$lb_stats A_HELLO_PORT=$a_hello A_BANK_PORT=$a_bank A_AGENT_PORT=$a_agent \
    B_HELLO_PORT=$b_hello B_BANK_PORT=$b_bank B_AGENT_PORT=$b_agent

# A small helper for trying things: start, kill (the whole process group, as a crash would),
# stop, reload, out, in, status, for one node.
cat >"$dir/node" <<EOF
#!/usr/bin/env bash
# $dir/node start|kill|stop|reload|out|in|status node-a|node-b
set -euo pipefail
what=\${1:?start|kill|stop|reload|out|in|status}
node=\${2:?node-a or node-b}
config="$dir/\$node.toml"
[ -e "\$config" ] || { echo "no such node: \$node" >&2; exit 1; }
case \$what in
    start)
        # Its own session and process group, like a service manager would start it.
        setsid "$bin" --config "\$config" >>"$dir/\$node.out" 2>&1 </dev/null &
        echo \$! >"$dir/\$node.pid"
        for _ in \$(seq 300); do
            "$bin" status --config "\$config" --json 2>/dev/null | grep -q '"state": "serving"' && { echo "\$node serving"; exit 0; }
            kill -0 "\$(cat "$dir/\$node.pid")" 2>/dev/null || { echo "\$node exited: see $dir/\$node.log" >&2; exit 1; }
            sleep 0.1
        done
        echo "\$node did not serve within 30 s: see $dir/\$node.log" >&2; exit 1 ;;
    kill) kill -KILL -- "-\$(cat "$dir/\$node.pid")" && echo "killed \$node (master and workers)" ;;
    stop) "$bin" stop --config "\$config" ;;
    reload) "$bin" reload --config "\$config" ;;
    out) "$bin" rotation out --config "\$config" ;;
    in) "$bin" rotation in --config "\$config" ;;
    status) "$bin" status --config "\$config" ;;
    *) echo "unknown: \$what" >&2; exit 1 ;;
esac
EOF
chmod +x "$dir/node"

say "starting node-a and node-b…"
"$dir/node" start node-a >/dev/null || fail "node-a did not start: see $dir/node-a.log"
"$dir/node" start node-b >/dev/null || fail "node-b did not start: see $dir/node-b.log"

# ---- HAProxy -------------------------------------------------------------------------------
haproxy -c -q -f "$dir/haproxy.cfg" || fail "haproxy refuses $dir/haproxy.cfg"
setsid haproxy -db -f "$dir/haproxy.cfg" >"$dir/haproxy.log" 2>&1 </dev/null &
haproxy_pid=$!
for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$lb_hello/" >/dev/null 2>&1 && break
    kill -0 "$haproxy_pid" 2>/dev/null || fail "haproxy exited: see $dir/haproxy.log"
    sleep 0.1
done

# ---- accounts ------------------------------------------------------------------------------
bank() { # LINE… : one connection through HAProxy, one answer per line
    exec 3<>"/dev/tcp/127.0.0.1/$lb_bank"
    local line answer
    for line in "$@"; do
        printf '%s\n' "$line" >&3
        IFS= read -r -t 10 answer <&3 || answer="(no answer)"
        say "    $line  →  $answer"
    done
    exec 3<&-
}
say "opening accounts through HAProxy:"
bank "OPEN alice 1000" "OPEN bob 1000" "OPEN carol 1000" "OPEN dave 1000" "TRANSFER alice bob 10" "BALANCE bob"

cat <<EOF

Everything runs in $dir:

  HAProxy     hello  127.0.0.1:$lb_hello    bank  127.0.0.1:$lb_bank    stats  http://127.0.0.1:$lb_stats/
  node-a      hello  127.0.0.1:$a_hello    bank  127.0.0.1:$a_bank    agent check  127.0.0.1:$a_agent    $dir/node-a.toml
  node-b      hello  127.0.0.1:$b_hello    bank  127.0.0.1:$b_bank    agent check  127.0.0.1:$b_agent    $dir/node-b.toml
  PostgreSQL  $dir/pg (databases a and b, Unix socket only)
  logs        $dir/{node-a,node-b}.log, $dir/haproxy.log

Try:
  curl -s http://127.0.0.1:$lb_hello/                     # "Hello from node-a" or node-b, in turn
  exec 3<>/dev/tcp/127.0.0.1/$lb_bank; echo 'TRANSFER alice carol 5' >&3; head -1 <&3
  $dir/node out node-a      # fdtserver rotation out: the agent check answers "drain"; new
                              # connections all go to node-b within a second
  $dir/node in node-a       # and back
  $dir/node reload node-a   # a reload: no client notices
  $dir/node kill node-a     # SIGKILL to its master and workers: what was in flight on it
                              # fails, everything after goes to node-b
  $dir/node start node-a    # it takes traffic again
  $dir/node status node-a
  echo 'show servers state' | socat - $dir/haproxy.sock   # (with socat) what HAProxy thinks

Ctrl-C stops everything.
EOF

# Until interrupted (a node that dies does not end the demo: restart it with the helper).
while :; do
    sleep 1
done
