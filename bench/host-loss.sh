#!/usr/bin/env bash
# bench/host-loss.sh [RUNS] [LEASE_SECS]  (default 5 runs, lease 3 s)
#
# Time from an agent's death (SIGKILL) to its host shown `lost`, through the real programs on loopback: `fcdev
# server --role control --host-lease LEASE` (its store: SQLite in a temp data dir, or FCDEV_DATABASE), `fcdev
# server host add`, `fcdev server --role agent` with the host token. Each run starts an agent, waits until it
# registered and has been live for a lease, kills it with SIGKILL and polls `fcdev server host list --json`
# every 20 ms until the host is `lost`. Prints every run and the median, in ms: the lease plus how late the
# control plane noticed (its reaper looks every quarter lease, at most every 250 ms; the last heartbeat was up to
# a third of a lease before the kill, so a run can come in under the lease). FCDEV_BIN=path skips the build.
set -euo pipefail
umask 077
RUNS=${1:-5}
LEASE=${2:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${FCDEV_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q)
fi
BIN=${FCDEV_BIN:-$ROOT/target/release/fcdev}
T=$(mktemp -d /tmp/fcdev-hostloss-XXXX)
CONTROL_PID= AGENT_PID=
cleanup() {
  for p in $AGENT_PID $CONTROL_PID; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$T"
}
trap cleanup EXIT
AT=(--data-dir "$T/control")
[ -n "${FCDEV_DATABASE:-}" ] && AT+=(--database "$FCDEV_DATABASE")

"$BIN" server --role control --listen 127.0.0.1:0 --host-lease "$LEASE" "${AT[@]}" >"$T/control.out" 2>"$T/control.err" &
CONTROL_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$T/control.out" 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/.*listening on \([^ ]*\).*/\1/p' "$T/control.out")
[ -n "$URL" ] || { echo "the control plane did not start:" >&2; cat "$T/control.err" >&2; exit 1; }

now_ms() { date +%s%3N; }
state() {
  "$BIN" server host list --json "${AT[@]}" |
    python3 -c 'import json,sys; print(next(h["state"] for h in json.load(sys.stdin) if h["name"] == sys.argv[1]))' "$1"
}

results=()
for i in $(seq "$RUNS"); do
  name="h$i"
  token=$("$BIN" server host add "$name" "${AT[@]}" 2>/dev/null)
  FCDEV_HOST_TOKEN=$token "$BIN" server --role agent --control "$URL" --host-name "$name" \
    --data-dir "$T/agent$i" --hub-listen 127.0.0.1:0 --hub-tun none >"$T/agent$i.out" 2>"$T/agent$i.err" &
  AGENT_PID=$!
  for _ in $(seq 100); do grep -q "registered with" "$T/agent$i.out" 2>/dev/null && break; sleep 0.1; done
  grep -q "registered with" "$T/agent$i.out" || { echo "agent $name did not register:" >&2; cat "$T/agent$i.err" >&2; exit 1; }
  # Past the control plane's start-up grace (one lease), and live for a lease.
  sleep $((LEASE + 1))
  [ "$(state "$name")" = live ] || { echo "$name is not live" >&2; exit 1; }
  kill -9 "$AGENT_PID"; t0=$(now_ms); wait "$AGENT_PID" 2>/dev/null || true; AGENT_PID=
  until [ "$(state "$name")" = lost ]; do sleep 0.02; done
  ms=$(( $(now_ms) - t0 ))
  results+=("$ms")
  echo "run $i: lost after ${ms} ms (lease ${LEASE} s)"
done
sorted=$(printf '%s\n' "${results[@]}" | sort -n)
median=$(echo "$sorted" | sed -n "$(( (RUNS + 1) / 2 ))p")
store=${FCDEV_DATABASE:+postgres}
echo "median: ${median} ms from SIGKILL to lost (lease ${LEASE} s, store ${store:-sqlite}); runs: ${results[*]}"
