#!/usr/bin/env bash
# bench/api-latency.sh [CLIENTS] [SECS] [LEASE]  (root; default 50 clients, 20 s of status requests, lease 3 s)
#
# API latency with CLIENTS concurrent engineers on each store, printed side by side, and the time from an agent's
# death to `lost` on the control plane:
#   sqlite    one `fcdev server --role all` (the embedded default: SQLite, orchestrator, hub in one process)
#   postgres  `fcdev server --role control` on a PostgreSQL 15 this script starts (initdb + pg_ctl as `nobody`,
#             unix socket only, in a temp dir) with 3 agents (`--role agent`)
# Both run the process backend (test VMs: local processes; the API and the store are what is measured, not VMs).
# Each engineer has a token and one keep-alive connection (bench/api_load.py): all `up` at once (POST
# /v1/clusters: the latency until the answer, 202), then, once every cluster is ready, GET /v1/clusters/dev back
# to back for SECS seconds (what `fcdev status` asks). On postgres, after the load: SIGKILL the agent holding the
# most clusters and poll (20 ms) until its host is `lost` (`fcdev server host list`) and until one of its
# engineers' clusters shows `lost` (the API).
# Everything on loopback. FCDEV_BIN=path skips the build (build first: never compile under the bench lock).
set -euo pipefail
umask 077
CLIENTS=${1:-50}
SECS=${2:-20}
LEASE=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "bench/api-latency.sh needs root (PostgreSQL runs as nobody)" >&2; exit 1; }
PG=/usr/lib/postgresql/15/bin
[ -x "$PG/initdb" ] || { echo "needs PostgreSQL 15: apt-get install postgresql-15" >&2; exit 1; }
if [ -z "${FCDEV_BIN:-}" ]; then (cd "$ROOT" && cargo build --release -q); fi
BIN=${FCDEV_BIN:-$ROOT/target/release/fcdev}
T=$(mktemp -d /tmp/fcdev-apilat-XXXX)
chmod 755 "$T"
PIDS=()
cleanup() {
  local rc=$?
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  for f in $(find "$T" -name vm.pid 2>/dev/null); do kill -9 "$(cat "$f")" 2>/dev/null || true; done
  [ -d "$T/pg/data" ] && setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$PG/pg_ctl" -D "$T/pg/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT

# The process backend's 3-VM template, shared with the tests.
TINY=$(cat "$ROOT/tests/fixtures/process-tiny.toml")

wait_line() { # FILE TEXT
  for _ in $(seq 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "no '$2' in $1:" >&2; cat "$1" >&2; exit 1
}
users() { # STORE-ARGS...: CLIENTS tokens into $T/tokens-<label>
  local out=$1; shift
  : >"$out"
  for i in $(seq "$CLIENTS"); do "$BIN" server user add "eng$i" "$@" >>"$out" 2>/dev/null; done
}

# --- sqlite: one process.
mkdir -p "$T/all/images/tiny"
echo "$TINY" >"$T/all/images/tiny/image.toml"
"$BIN" server --netns none --backend process --listen 127.0.0.1:0 --hub-listen 127.0.0.1:0 --hub-tun none \
  --data-dir "$T/all/data" --images "$T/all/images" >"$T/all.out" 2>"$T/all.err" &
PIDS+=($!)
wait_line "$T/all.out" "listening on"
URL=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$T/all.out")
users "$T/tokens-sqlite" --data-dir "$T/all/data"
echo "sqlite: $CLIENTS engineers against $URL ..." >&2
python3 "$ROOT/bench/api_load.py" "$URL" "$T/tokens-sqlite" "$SECS" >"$T/sqlite.json"
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true
for f in $(find "$T/all" -name vm.pid); do kill -9 "$(cat "$f")" 2>/dev/null || true; done

# --- postgres: a control plane and 3 agents.
mkdir -p "$T/pg"
chown nobody "$T/pg"
setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$PG/initdb" -D "$T/pg/data" -U postgres -A trust -E UTF8 \
  --no-sync --no-instructions >/dev/null
setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$PG/pg_ctl" -D "$T/pg/data" -l "$T/pg/log" -w -o \
  "-k $T/pg -c listen_addresses='' -F -c max_connections=200" start >/dev/null
DB="postgres:///postgres?host=$T/pg&user=postgres"
"$BIN" server --role control --database "$DB" --listen 127.0.0.1:0 --host-lease "$LEASE" --data-dir "$T/ctl" \
  >"$T/ctl.out" 2>"$T/ctl.err" &
PIDS+=($!)
wait_line "$T/ctl.out" "listening on"
URL=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$T/ctl.out")
declare -A AGENT
for h in h1 h2 h3; do
  token=$("$BIN" server host add "$h" --database "$DB" 2>/dev/null)
  mkdir -p "$T/$h/images/tiny"
  echo "$TINY" >"$T/$h/images/tiny/image.toml"
  FCDEV_HOST_TOKEN=$token "$BIN" server --role agent --control "$URL" --host-name "$h" --backend process \
    --data-dir "$T/$h" --hub-listen 127.0.0.1:0 --hub-tun none >"$T/$h.out" 2>"$T/$h.err" &
  PIDS+=($!)
  AGENT[$h]=$!
  wait_line "$T/$h.out" "registered with"
done
users "$T/tokens-postgres" --database "$DB"
echo "postgres: $CLIENTS engineers against $URL (3 agents) ..." >&2
python3 "$ROOT/bench/api_load.py" "$URL" "$T/tokens-postgres" "$SECS" >"$T/postgres.json"

# Host loss: the agent with the most clusters. Past the start-up grace (one lease) by now.
read -r VICTIM VTOKEN < <(python3 - "$T/postgres.json" "$T/tokens-postgres" <<'EOF'
import collections, json, sys
r = json.load(open(sys.argv[1]))
host = collections.Counter(r["hosts"].values()).most_common(1)[0][0]
tokens = [t.strip() for t in open(sys.argv[2]) if t.strip()]
print(host, next(t for t in tokens if r["hosts"].get(t[:12]) == host))
EOF
)
kill -9 "${AGENT[$VICTIM]}"
wait "${AGENT[$VICTIM]}" 2>/dev/null || true
LOSS=$(python3 - "$BIN" "$DB" "$URL" "$VICTIM" "$VTOKEN" <<'EOF'
import json, subprocess, sys, time, urllib.request
bin_, db, url, host, token = sys.argv[1:]
t0 = time.monotonic()
host_ms = cluster_ms = None
while (host_ms is None or cluster_ms is None) and time.monotonic() - t0 < 60:
    if host_ms is None:
        hosts = json.loads(subprocess.run([bin_, "server", "host", "list", "--json", "--database", db],
                                          capture_output=True, check=True).stdout)
        if any(h["name"] == host and h["state"] == "lost" for h in hosts):
            host_ms = round((time.monotonic() - t0) * 1000)
    if cluster_ms is None:
        req = urllib.request.Request(url + "/v1/clusters/dev", headers={"Authorization": "Bearer " + token})
        if json.load(urllib.request.urlopen(req))["state"] == "lost":
            cluster_ms = round((time.monotonic() - t0) * 1000)
    time.sleep(0.02)
print(host_ms, cluster_ms)
EOF
)
read -r HOST_MS CLUSTER_MS <<<"$LOSS"

python3 - "$T/sqlite.json" "$T/postgres.json" "$CLIENTS" "$SECS" "$LEASE" "$VICTIM" "$HOST_MS" "$CLUSTER_MS" <<'EOF'
import json, sys
s, p = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
clients, secs, lease, victim, host_ms, cluster_ms = sys.argv[3:]
def cell(r, k):
    x = r[k]
    return f'{x["p50"]} / {x["p99"]} / {x["max"]} ms (n={x["n"]})'
rows = [
    (f"up: POST /v1/clusters, {clients} at once (p50/p99/max)", cell(s, "up"), cell(p, "up")),
    (f"status: GET /v1/clusters/dev, {secs} s (p50/p99/max)", cell(s, "status"), cell(p, "status")),
    ("status requests per second", str(s["status_per_sec"]), str(p["status_per_sec"])),
    ("errors", str(s["error_count"]), str(p["error_count"])),
    (f"agent SIGKILL -> host lost (lease {lease} s)", "-", f"{host_ms} ms ({victim})"),
    ("agent SIGKILL -> its cluster shows lost", "-", f"{cluster_ms} ms"),
]
w = [max(len(r[i]) for r in rows + [("", "sqlite (--role all)", "postgres (control + 3 agents)")]) for i in range(3)]
print(f'{"":<{w[0]}}  {"sqlite (--role all)":<{w[1]}}  postgres (control + 3 agents)')
for r in rows:
    print(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]}")
for r in (s, p):
    if r["errors"]:
        print("errors:", r["errors"], file=sys.stderr)
EOF
