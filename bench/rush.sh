#!/usr/bin/env bash
# bench/rush.sh [COUNTS]  (root; default "10 20 40")
#
# A morning rush on one host: N engineers run `fcdev up` of the 3-VM tiny cluster at the same moment, against
# one real `fcdev server --dev` (admission control on). Prints, for each N, the time until every cluster is
# ready (up returned "ready") and the slowest/fastest engineer; then, with 20 clusters idle, the latency of one
# more engineer's `fcdev up`. Everything runs in a network namespace this script creates (and deletes).
set -euo pipefail
cd "$(dirname "$0")/.."
COUNTS=${1:-"10 20 40"}
[ "$(id -u)" = 0 ] || { echo "bench/rush.sh needs root (network namespace, taps, qemu)" >&2; exit 1; }

cargo build --release --quiet
BIN=$PWD/target/release/fcdev
IMG=$PWD/target/fcdev-test-images/tiny
if [ ! -f "$IMG/image.toml" ] || [ ! -f "$IMG/initrd.img" ]; then "$BIN" image build tiny --out "$IMG" >/dev/null; fi
if [ ! -d "$IMG/snapshot" ]; then "$BIN" image snapshot tiny --out "$IMG" >/dev/null; fi

T=$(mktemp -d /tmp/fcdev-rush-XXXX)
NS=fcdevr-$$
SERVER_PID=
cleanup() {
  local rc=$?
  [ -z "$SERVER_PID" ] || { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
  for pidfile in $(find "$T/data" -name qemu.pid 2>/dev/null); do kill -9 "$(cat "$pidfile")" 2>/dev/null || true; done
  for _ in $(seq 50); do pgrep -f -- "$T/" >/dev/null || break; sleep 0.1; done
  ip netns del "$NS" 2>/dev/null || true
  if pgrep -f -- "$T/" >/dev/null; then echo "error: processes of the run left behind" >&2; rc=1; fi
  rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT

mkdir -p "$T/images"
ln -s "$IMG" "$T/images/tiny"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip netns exec "$NS" "$BIN" server --dev --netns none --listen 127.0.0.1:7171 --hub-listen 127.0.0.1:0 --hub-tun none \
  --data-dir "$T/data" --images "$T/images" --user eng0 > "$T/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do grep -q 'fcd_' "$T/server.log" 2>/dev/null && break; sleep 0.1; done
ACCEL=$(sed -n 's/.*accelerator \([a-z]*\).*/\1/p' "$T/server.log" | head -1)
MAX=0
for n in $COUNTS; do [ "$n" -gt "$MAX" ] && MAX=$n; done

login() {  # i -> a config dir logged in as eng<i>
  local i=$1 token
  if [ "$i" = 0 ]; then token=$(grep -o 'fcd_[0-9a-f]*' "$T/server.log" | head -1)
  else token=$(ip netns exec "$NS" "$BIN" server user add "eng$i" --data-dir "$T/data" 2>/dev/null | grep -o 'fcd_[0-9a-f]*'); fi
  echo "$token" | FCDEV_CONFIG_DIR=$T/cfg$i ip netns exec "$NS" "$BIN" login --server http://127.0.0.1:7171 --token-stdin >/dev/null
}
for i in $(seq 0 "$MAX"); do login "$i"; done
now() { date +%s%N; }

echo "morning rush: N engineers' fcdev up at once, 3-VM tiny clusters, accelerator $ACCEL ($(nproc) cores)"
for n in $COUNTS; do
  t0=$(now)
  pids=()
  for i in $(seq 1 "$n"); do
    ( FCDEV_CONFIG_DIR=$T/cfg$i ip netns exec "$NS" "$BIN" up --name "r$n" --json > "$T/up$n-$i.json" 2>&1
      echo $(( ($(now) - t0) / 1000000 )) > "$T/ms$n-$i" ) &
    pids+=($!)
  done
  wait "${pids[@]}"  # (not a bare `wait`: the server is a background job too)
  total=$(( ($(now) - t0) / 1000000 ))
  ready=$(grep -l '"state": "ready"' "$T"/up"$n"-*.json | wc -l)
  first=$(cat "$T"/ms"$n"-* | sort -n | head -1)
  printf '%3d engineers (%3d VMs): %2d/%d ready, all in %6.1f s (first %.1f s)\n' "$n" $((3 * n)) "$ready" "$n" \
    "$(awk -v m="$total" 'BEGIN {print m / 1000}')" "$(awk -v m="$first" 'BEGIN {print m / 1000}')"
  if [ "$n" = 20 ]; then
    sleep 3
    t1=$(now)
    FCDEV_CONFIG_DIR=$T/cfg0 ip netns exec "$NS" "$BIN" up --name late --json > "$T/late.json"
    printf '%-52s %6.2f s\n' "one more fcdev up with 20 clusters idle" "$(awk -v m="$(( ($(now) - t1) / 1000000 ))" 'BEGIN {print m / 1000}')"
    FCDEV_CONFIG_DIR=$T/cfg0 ip netns exec "$NS" "$BIN" down --name late --yes >/dev/null
  fi
  pids=()
  for i in $(seq 1 "$n"); do
    FCDEV_CONFIG_DIR=$T/cfg$i ip netns exec "$NS" "$BIN" down --name "r$n" --yes >/dev/null &
    pids+=($!)
  done
  wait "${pids[@]}"
done
