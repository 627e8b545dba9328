#!/usr/bin/env bash
# bench/snapshot.sh [RUNS]  (root; default 5 runs)       IMAGE=press bench/snapshot.sh [RUNS]  (the Press cluster)
#
# Median wall time, in one run on this machine, of (each timed from the CLI call until it returned and, for the
# ones that bring VMs back, until every VM answers HTTP again):
#   - `fcdev snapshot save`, `fcdev snapshot restore` of the cluster
#   - `fcdev stop`, `fcdev start` (after a stop)
# plus the disk one snapshot takes, the disk a stopped cluster takes, and the host RAM `stop` frees (the PSS of the
# cluster's qemu processes before the stop; also MemAvailable before and after). The server, the client and every
# request run inside a network namespace this script creates (and deletes): nothing leaves the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
[ "$(id -u)" = 0 ] || { echo "bench/snapshot.sh needs root (network namespace, taps, qemu)" >&2; exit 1; }

IMAGE=${IMAGE:-tiny}
cargo build --release --quiet
BIN=$PWD/target/release/fcdev
case "$IMAGE" in
  tiny)
    IMG=$PWD/target/fcdev-test-images/tiny
    # An image built before the agent's `clock` verb (uncompressed cpio: its init is readable as is) is rebuilt;
    # a rebuild drops the old snapshot.
    if [ ! -f "$IMG/image.toml" ] || ! grep -aq 'clock)' "$IMG/initrd.img" 2>/dev/null; then
      "$BIN" image build tiny --out "$IMG" >/dev/null
    fi
    if [ ! -d "$IMG/snapshot" ]; then "$BIN" image snapshot tiny --out "$IMG" >/dev/null; fi ;;
  press)
    IMG=${FCDEV_PRESS_CACHE:-/var/cache/fcdev/test-images/press}
    "$BIN" image build press --out "$IMG" >&2
    if [ ! -d "$IMG/snapshot" ]; then "$BIN" image snapshot press --out "$IMG" >&2; fi ;;
  *) echo "IMAGE must be tiny or press" >&2; exit 2 ;;
esac

T=$(mktemp -d /tmp/fcdev-bench-XXXX)
NS=fcdevs-$$
SERVER_PID=
leftovers() { pgrep -f -- "$T/" || true; }
cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  for pidfile in $(find "$T/data" -name qemu.pid 2>/dev/null); do
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  for _ in $(seq 50); do [ -z "$(leftovers)" ] && break; sleep 0.1; done
  ip netns del "$NS" 2>/dev/null || true
  local left
  left=$(leftovers)
  if [ -n "$left" ]; then
    echo "error: bench/snapshot.sh left processes behind:" >&2
    ps -o pid,args -p "$(echo "$left" | tr '\n' ',' | sed 's/,$//')" >&2 || true
    rc=1
  elif ip netns list | grep -qw "$NS"; then
    echo "error: bench/snapshot.sh left network namespace $NS behind" >&2
    rc=1
  else
    echo "clean: no server, no qemu, no namespace of this run left"
  fi
  [ -n "${KEEP:-}" ] || rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT

mkdir -p "$T/images"
ln -s "$IMG" "$T/images/$IMAGE"
ip netns add "$NS"
ip -n "$NS" link set lo up
in_ns() { ip netns exec "$NS" "$@"; }
export FCDEV_CONFIG_DIR=$T/cfg
ip netns exec "$NS" "$BIN" server --dev --netns none --listen 127.0.0.1:7172 --hub-listen 127.0.0.1:0 --hub-tun none \
  --data-dir "$T/data" --images "$T/images" --user bench --snapshot-quota 0 > "$T/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do grep -q 'fcd_' "$T/server.log" 2>/dev/null && break; sleep 0.1; done
ACCEL=$(sed -n 's/.*accelerator \([a-z]*\).*/\1/p' "$T/server.log" | head -1)
grep -o 'fcd_[0-9a-f]*' "$T/server.log" | in_ns "$BIN" login --server http://127.0.0.1:7172 --token-stdin >/dev/null

now() { date +%s%N; }
IPS=
all_answer() {
  if [ "$IMAGE" = press ]; then
    in_ns curl -s --fail --max-time 5 "http://$(echo "$IPS" | head -1)/" | grep -q alpha.fcdev.local || return 1
    return 0
  fi
  for ip in $IPS; do in_ns curl -s --fail --max-time 5 "http://$ip/" >/dev/null || return 1; done
}
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f", m/1e9}'; }
median_int() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%d", m}'; }
pss_kib() {
  local total=0 pid
  for pid in $(pgrep -f "qemu-system.*$T/data/vms/bench/bench/"); do
    total=$((total + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")))
  done
  echo "$total"
}
avail_kib() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }

NVMS=$(grep -c '^\[\[vm\]\]' "$IMG/image.toml")
echo "fcdev snapshot/stop/start benchmark: $RUNS runs, $NVMS-VM $IMAGE cluster, accelerator $ACCEL ($(nproc) cores)"
IPS=$(in_ns "$BIN" up --image "$IMAGE" --name bench --json | grep -o '"address": "[0-9.]*"' | grep -o '[0-9.]*[0-9]')
all_answer
sleep 3

SAVES= RESTORES= SIZES=
for i in $(seq "$RUNS"); do
  t0=$(now); in_ns "$BIN" snapshot save "s$i" --name bench --json > "$T/save.json"; t1=$(now)
  SAVES="$SAVES $((t1 - t0))"
  SIZES="$SIZES $(grep -o '"size_bytes": [0-9]*' "$T/save.json" | grep -o '[0-9]*$')"
  t0=$(now); in_ns "$BIN" snapshot restore "s$i" --name bench --yes --json >/dev/null; all_answer; t1=$(now)
  RESTORES="$RESTORES $((t1 - t0))"
done
STOPS= STARTS= FREED= AVAIL= STOPPED_DISK=
for i in $(seq "$RUNS"); do
  sleep 2
  pss=$(pss_kib); a0=$(avail_kib)
  t0=$(now); in_ns "$BIN" stop --name bench --json >/dev/null; t1=$(now)
  STOPS="$STOPS $((t1 - t0))"
  sleep 1
  a1=$(avail_kib)
  FREED="$FREED $pss"; AVAIL="$AVAIL $((a1 - a0))"
  STOPPED_DISK="$STOPPED_DISK $(in_ns "$BIN" status --json | grep -o '"disk_bytes": [0-9]*' | head -1 | grep -o '[0-9]*$')"
  t0=$(now); in_ns "$BIN" start --name bench --json >/dev/null; all_answer; t1=$(now)
  STARTS="$STARTS $((t1 - t0))"
done

row() { printf '%-52s %10s %s\n' "$1" "$2" "$3"; }
row "fcdev snapshot save" "$(echo "$SAVES" | tr ' ' '\n' | grep . | median)" s
row "fcdev snapshot restore (until every VM answers)" "$(echo "$RESTORES" | tr ' ' '\n' | grep . | median)" s
row "fcdev stop" "$(echo "$STOPS" | tr ' ' '\n' | grep . | median)" s
row "fcdev start after stop (until every VM answers)" "$(echo "$STARTS" | tr ' ' '\n' | grep . | median)" s
row "disk per snapshot (memory + disk layers)" "$(( $(echo "$SIZES" | tr ' ' '\n' | grep . | median_int) >> 20 ))" MiB
row "disk of the stopped cluster (disks + memory)" "$(( $(echo "$STOPPED_DISK" | tr ' ' '\n' | grep . | median_int) >> 20 ))" MiB
row "host RAM freed by stop (PSS of its qemu)" "$(( $(echo "$FREED" | tr ' ' '\n' | grep . | median_int) >> 10 ))" MiB
row "MemAvailable gained by stop" "$(( $(echo "$AVAIL" | tr ' ' '\n' | grep . | median_int) >> 10 ))" MiB
grep -h "resumed from\|saved to" "$T"/data/vms/bench/bench/*/qemu.log | tail -6 | sed 's/^/  server: /'
