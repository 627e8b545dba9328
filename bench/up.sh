#!/usr/bin/env bash
# bench/up.sh [RUNS]  (root; default 5 runs)          IMAGE=press bench/up.sh [RUNS]  (the Press cluster)
#
# Median wall time, in one run on this machine, of:
#   - `fcdev up` of the cluster from the onboarding snapshot, until every VM passed its readiness probe (up
#     returns then) and the cluster answers HTTP (tiny: every VM's page; press: n1's page of sites read from m1)
#   - the same from a cold boot (the same image without its snapshot; COLD_RUNS, default RUNS)
#   - `fcdev reset` of the cluster (until it answers again)
# each also until the command returned (every VM passed its readiness probe: the issues' definition of ready),
# plus the idle memory (PSS) per restored VM, with one cluster and with three. The server, the client and every request run inside a network namespace
# this script creates (and deletes): nothing leaves the machine, nothing is sent from the root namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-5}
[ "$(id -u)" = 0 ] || { echo "bench/up.sh needs root (network namespace, taps, qemu)" >&2; exit 1; }

IMAGE=${IMAGE:-tiny}
COLD_RUNS=${COLD_RUNS:-$RUNS}
cargo build --release --quiet
BIN=$PWD/target/release/fcdev
case "$IMAGE" in
  tiny)
    IMG=$PWD/target/fcdev-test-images/tiny
    if [ ! -f "$IMG/image.toml" ] || [ ! -f "$IMG/initrd.img" ]; then "$BIN" image build tiny --out "$IMG" >/dev/null; fi
    if [ ! -d "$IMG/snapshot" ]; then "$BIN" image snapshot tiny --out "$IMG" >/dev/null; fi ;;
  press)
    # The cache tests/press.rs uses; the build is skipped when the recipe is unchanged.
    IMG=${FCDEV_PRESS_CACHE:-/var/cache/fcdev/test-images/press}
    T_BUILD0=$(date +%s%N)
    BUILD_OUT=$("$BIN" image build press --out "$IMG" 2>&1) || { echo "$BUILD_OUT" >&2; exit 1; }
    BUILD_S=$(( ($(date +%s%N) - T_BUILD0) / 1000000 ))
    case "$BUILD_OUT" in *"is up to date"*) BUILD_KIND="cached: same recipe" ;; *) BUILD_KIND="built: recipe changed" ;; esac
    # BUILD_FRESH=1: also time a fresh build from scratch, into a folder of this run (the cache is not touched).
    if [ "${BUILD_FRESH:-0}" = 1 ]; then
      FRESH_DIR=$(mktemp -d /tmp/fcdev-bench-build-XXXX)
      T_FRESH0=$(date +%s%N)
      "$BIN" image build press --out "$FRESH_DIR/press" >&2
      FRESH_S=$(( ($(date +%s%N) - T_FRESH0) / 1000000 ))
      rm -rf "$FRESH_DIR"
    fi
    if [ ! -d "$IMG/snapshot" ]; then "$BIN" image snapshot press --out "$IMG" >&2; fi ;;
  *) echo "IMAGE must be tiny or press" >&2; exit 2 ;;
esac

T=$(mktemp -d /tmp/fcdev-bench-XXXX)
NS=fcdevb-$$
SERVER_PID=
# Every process of the run has $T in its command line (the server's --data-dir, qemu's run dirs).
leftovers() { pgrep -f -- "$T/" || true; }
cleanup() {
  local rc=$?
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  # The VMs run detached from the server (they survive it by design): stop each through its pid file.
  for pidfile in $(find "$T/data" -name qemu.pid 2>/dev/null); do
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  for _ in $(seq 50); do [ -z "$(leftovers)" ] && break; sleep 0.1; done
  ip netns del "$NS" 2>/dev/null || true
  local left
  left=$(leftovers)
  if [ -n "$left" ]; then
    echo "error: bench/up.sh left processes behind:" >&2
    ps -o pid,args -p "$(echo "$left" | tr '\n' ',' | sed 's/,$//')" >&2 || true
    rc=1
  elif ip netns list | grep -qw "$NS"; then
    echo "error: bench/up.sh left network namespace $NS behind" >&2
    rc=1
  else
    echo "clean: no server, no qemu, no namespace of this run left"
  fi
  [ -n "${KEEP:-}" ] || rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT

# Two images over the same files: `tiny` (with the onboarding snapshot) and `cold` (without: VMs boot).
mkdir -p "$T/images/cold"
ln -s "$IMG" "$T/images/$IMAGE"
for f in "$IMG"/*; do
  case "$(basename "$f")" in image.toml|snapshot) ;; *) ln -s "$f" "$T/images/cold/";; esac
done
sed -e "s/^name = \"$IMAGE\"/name = \"cold\"/" -e '/^\[snapshot\]/,$d' "$IMG/image.toml" > "$T/images/cold/image.toml"

ip netns add "$NS"
ip -n "$NS" link set lo up
in_ns() { ip netns exec "$NS" "$@"; }
export FCDEV_CONFIG_DIR=$T/cfg
# Started as a simple command, not through in_ns: `ip netns exec` execs the server, so $! is the server's pid
# (through a shell function it would be a subshell's, and killing that leaves the server running).
ip netns exec "$NS" "$BIN" server --dev --netns none --listen 127.0.0.1:7171 --hub-listen 127.0.0.1:0 --hub-tun none \
  --data-dir "$T/data" --images "$T/images" --user bench > "$T/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do grep -q 'fcd_' "$T/server.log" 2>/dev/null && break; sleep 0.1; done
ACCEL=$(sed -n 's/.*accelerator \([a-z]*\).*/\1/p' "$T/server.log" | head -1)
grep -o 'fcd_[0-9a-f]*' "$T/server.log" | in_ns "$BIN" login --server http://127.0.0.1:7171 --token-stdin >/dev/null

now() { date +%s%N; }
all_answer() {  # the cluster in the `fcdev up/reset --json` output on stdin answers HTTP
  local ips
  ips=$(grep -o '"address": "[0-9.]*"' | grep -o '[0-9.]*[0-9]')
  [ -n "$ips" ] || return 1
  if [ "$IMAGE" = press ]; then  # n1 -> f1 -> m1: the seeded sites
    in_ns curl -s --fail --max-time 5 "http://$(echo "$ips" | head -1)/" | grep -q alpha.fcdev.local || return 1
    return 0
  fi
  for ip in $ips; do
    in_ns curl -s --fail --max-time 5 "http://$ip/" >/dev/null || return 1
  done
}
median() { sort -n | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.3f", m/1e9}'; }

# Each run prints `TOTAL RETURNED` in nanoseconds: until the cluster answers HTTP (the headline figure), and until
# the command returned (every VM passed its readiness probe: the issue's definition of ready).
measure_up() {  # image runs -> one line per run
  local image=$1
  for i in $(seq "$2"); do
    local t0 t1 tr out
    t0=$(now)
    out=$(in_ns "$BIN" up --image "$image" --name "b$i" --json)
    tr=$(now)
    echo "$out" | all_answer
    t1=$(now)
    echo "$((t1 - t0)) $((tr - t0))"
    in_ns "$BIN" down --name "b$i" --yes >/dev/null
  done
}
returned() { awk '{print $2}'; }

NVMS=$(grep -c '^\[\[vm\]\]' "$IMG/image.toml")
echo "fcdev up/reset benchmark: $RUNS runs ($COLD_RUNS cold), $NVMS-VM $IMAGE cluster, accelerator $ACCEL ($(nproc) cores)"
RESTORE_RUNS=$(measure_up "$IMAGE" "$RUNS")
RESTORE=$(echo "$RESTORE_RUNS" | median)
echo "  each run (s): $(echo "$RESTORE_RUNS" | awk '{printf "%.2f ", $1/1e9}')"
COLD=$(measure_up cold "$COLD_RUNS" | median)

pss_of() {  # cluster name -> total PSS in KiB of its qemu processes
  local total=0 pid
  for pid in $(pgrep -f "qemu-system.*$T/data/vms/bench/$1/"); do
    total=$((total + $(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")))
  done
  echo "$total"
}
tb_of() {  # cluster name -> PSS in KiB of TCG's translation caches (qemu's one anonymous mapping of >= 1 GiB)
  local total=0 pid
  for pid in $(pgrep -f "qemu-system.*$T/data/vms/bench/$1/"); do
    total=$((total + $(awk '/^[0-9a-f]+-[0-9a-f]+ / {anon = (NF == 5)} /^Size:/ {big = ($2 >= 1000000)}
      /^Pss:/ {if (anon && big) s += $2} END {print s + 0}' "/proc/$pid/smaps")))
  done
  echo "$total"
}
in_ns "$BIN" up --image "$IMAGE" --name bench --json >/dev/null
sleep 5
PSS=$(pss_of bench)
in_ns "$BIN" up --image "$IMAGE" --name bench2 --json >/dev/null
in_ns "$BIN" up --image "$IMAGE" --name bench3 --json >/dev/null
sleep 5
PSS3=$(( $(pss_of bench) + $(pss_of bench2) + $(pss_of bench3) ))
TB3=$(( $(tb_of bench) + $(tb_of bench2) + $(tb_of bench3) ))
in_ns "$BIN" down --name bench2 --yes >/dev/null
in_ns "$BIN" down --name bench3 --yes >/dev/null
RESET_RUNS=$(for i in $(seq "$RUNS"); do
  t0=$(now); out=$(in_ns "$BIN" reset --name bench --yes --json); tr=$(now)
  echo "$out" | all_answer; t1=$(now); echo "$((t1 - t0)) $((tr - t0))"
done)
RESETS=$(echo "$RESET_RUNS" | median)
echo "  each reset (s): $(echo "$RESET_RUNS" | awk '{printf "%.2f ", $1/1e9}')"

printf '%-44s %8s s\n' "fcdev up, from the onboarding snapshot" "$RESTORE"
printf '%-44s %8s s\n' "  of which until up returned (probes passed)" "$(echo "$RESTORE_RUNS" | returned | median)"
printf '%-44s %8s s\n' "fcdev up, cold boot" "$COLD"
printf '%-44s %8s x\n' "snapshot speed-up (cold / snapshot)" "$(awk -v c="$COLD" -v r="$RESTORE" 'BEGIN {printf "%.1f", c / r}')"
printf '%-44s %8s s\n' "fcdev reset" "$RESETS"
printf '%-44s %8s s\n' "  of which until reset returned (probes passed)" "$(echo "$RESET_RUNS" | returned | median)"
printf '%-44s %8s MB\n' "idle PSS per VM (restored, one cluster)" "$((PSS / NVMS / 1024))"
printf '%-44s %8s MB\n' "idle PSS per VM (restored, three clusters)" "$((PSS3 / NVMS / 3 / 1024))"
[ "$ACCEL" != tcg ] || printf '%-44s %8s MB\n' "  of which TCG's translation cache" "$((TB3 / NVMS / 3 / 1024))"
[ -z "${BUILD_S:-}" ] || printf '%-44s %8s s\n' "fcdev image build press ($BUILD_KIND)" "$(awk -v m="$BUILD_S" 'BEGIN {printf "%.1f", m / 1000}')"
[ -z "${FRESH_S:-}" ] || printf '%-44s %8s s\n' "fcdev image build press (fresh, from scratch)" "$(awk -v m="$FRESH_S" 'BEGIN {printf "%.1f", m / 1000}')"
