#!/usr/bin/env bash
# Tunnel throughput, side by side in one run: TCP (iperf3) from a "laptop" network namespace to a "host"
# namespace over a veth pair, through: the raw veth, fcdev TUN mode, fcdev rootless mode (-L forward),
# wireguard-go (Debian), and boringtun-cli / onetun when they are installed (BENCH_TOOLS=/path/bin, default
# /tmp/fcdev-bench-tools/bin: `cargo install boringtun-cli onetun --root /tmp/fcdev-bench-tools`).
#
#   sudo bench/tunnel.sh [SECONDS]        (default 10; needs root, /dev/net/tun, iperf3, wireguard-go, wg)
#   IPERF_ARGS=-R bench/tunnel.sh         the other direction (host -> laptop)
#   BENCH_ONLY="fcdev_tun wireguard_go"   measure only these paths
#
# fcdev is driven through examples/tunnel_node (the library's hub and client, release build: fcdev_tun,
# fcdev_rootless) and through the real programs, `fcdev server` + `fcdev tunnel` (real_tun, real_rootless).
#
# Beside Mbit/s, each path reports the CPU time its tunnel processes spent per GB moved (user+sys from
# /proc/PID/stat before and after the transfer, all threads; iperf3 itself not counted): the hub and the client
# for fcdev, `fcdev server` and `fcdev tunnel` for the real programs, both wireguard-go daemons.
#
# Everything runs in namespaces created here and deleted on exit; nothing leaves the root namespace.
set -euo pipefail
umask 077
SECS=${1:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${BENCH_TOOLS:-/tmp/fcdev-bench-tools/bin}
H=fcdevb-host-$$ L=fcdevb-laptop-$$
WORK=$(mktemp -d)
NODE=${FCDEV_NODE:-$ROOT/target/release/examples/tunnel_node}

cleanup() {
  for ns in $H $L; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
  done
  rm -f /var/run/wireguard/wgbh$$.sock /var/run/wireguard/wgbl$$.sock
  rm -rf "$WORK"
}
trap cleanup EXIT
[ -n "${BENCH_KEEP:-}" ] && trap "cp -r $WORK /tmp/bench-last; cleanup" EXIT
# BENCH_SAVE=DIR: keep each path's iperf3 JSON (per-interval figures) as DIR/iperf-PATH.json.
[ -n "${BENCH_SAVE:-}" ] && trap "mkdir -p '$BENCH_SAVE'; cp $WORK/iperf-*.json '$BENCH_SAVE'/ 2>/dev/null; cleanup" EXIT

[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
[ -e /dev/net/tun ] || { echo "needs /dev/net/tun" >&2; exit 1; }
if [ -z "${FCDEV_NODE:-}" ]; then
  (cd "$ROOT" && cargo build --release --example tunnel_node -q)
fi

inh() { ip netns exec $H "$@"; }
inl() { ip netns exec $L "$@"; }

ip netns add $H; ip netns add $L
inh ip link set lo up; inl ip link set lo up
ip -n $H link add lap0 type veth peer name up0 netns $L
ip -n $H addr add 192.168.77.1/24 dev lap0; ip -n $H link set lap0 up
ip -n $L addr add 192.168.77.2/24 dev up0; ip -n $L link set up0 up
# The "VM": an address on a namespace bridge, like the real host.
ip -n $H link add vms type bridge; ip -n $H addr add 10.240.1.10/24 dev vms; ip -n $H link set vms up
ip -n $H addr add 10.241.0.1/24 dev vms 2>/dev/null || true
inh iperf3 -s -D -p 5201 >/dev/null

# CPU time (user+sys, clock ticks) of the processes in TPIDS, all their threads.
TPIDS=
cpu_ticks() {
  local t=0 p f
  for p in $TPIDS; do
    f=$(sed 's/.*) //' /proc/$p/stat 2>/dev/null) || continue
    set -- $f
    t=$((t + ${12} + ${13}))   # utime, stime (fields 14 and 15 of the whole line)
  done
  echo $t
}
HZ=$(getconf CLK_TCK)

# iperf3 from the laptop namespace; prints Mbit/s received and leaves the CPU seconds per GB of the tunnel
# processes (TPIDS) in $WORK/cpu-PATH. BENCH_ONLY="a b" measures only those paths.
CURRENT=
measure() { # ns host port
  if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $CURRENT "* ]]; then echo 0; return; fi
  local before after
  before=$(cpu_ticks)
  ip netns exec "$1" iperf3 -c "$2" -p "$3" -t "$SECS" ${IPERF_ARGS:-} -J 2>/dev/null > "$WORK/iperf-$CURRENT.json" || true
  after=$(cpu_ticks)
  python3 - "$WORK/iperf-$CURRENT.json" "$((after - before))" "$HZ" "${TPIDS:-}" "$WORK/cpu-$CURRENT" <<'PY' || echo 0
import json, sys
path, ticks, hz, pids, out = sys.argv[1:6]
d = json.load(open(path))["end"]["sum_received"]
gb = d["bytes"] / 1e9
open(out, "w").write(f"{int(ticks) / int(hz) / gb:.2f}" if pids and gb > 0 else "-")
print(round(d["bits_per_second"] / 1e6))
PY
}

declare -A R
CURRENT=veth; R[veth]=$(measure $L 192.168.77.1 5201)

# --- fcdev (TUN and rootless), driven through the library's test node.
key() { wg genkey > "$WORK/$1.key"; chmod 600 "$WORK/$1.key"; wg pubkey < "$WORK/$1.key"; }
HUBPUB=$(key hub); LAPPUB=$(key lap)
cat > "$WORK/peer.json" <<JSON
{"id":1,"name":"bench","address":"10.240.1.2/32","server_public_key":"$HUBPUB","endpoint":"192.168.77.1:51820",
 "allowed_ips":["10.240.1.0/24"],"keepalive":25,"namespace":"bench","dns_suffix":"fcdev",
 "hosts":[{"name":"n1","address":"10.240.1.10"}]}
JSON
mkfifo "$WORK/hub.in"
ip netns exec $H "$NODE" hub --listen 0.0.0.0:51820 --key-file "$WORK/hub.key" --tun fcdevhub < "$WORK/hub.in" > "$WORK/hub.out" 2>&1 &
HUBPID=$!
exec 7> "$WORK/hub.in"
echo "add 1 $LAPPUB 10.240.1.2 10.240.1.0/24" >&7
sleep 0.5
start_client() { # mode extra-args...
  local mode=$1; shift
  rm -f "$WORK/cl.in"; mkfifo "$WORK/cl.in"
  ip netns exec $L "$NODE" client --key-file "$WORK/lap.key" --config "$WORK/peer.json" --mode "$mode" "$@" \
    < "$WORK/cl.in" > "$WORK/cl.out" 2>&1 &
  CLPID=$!
  exec 8> "$WORK/cl.in"
  for _ in $(seq 50); do grep -q READY "$WORK/cl.out" 2>/dev/null && break; sleep 0.1; done
}
stop_client() { exec 8>&-; wait $CLPID 2>/dev/null || true; }

start_client tun --tun fcdev0
TPIDS="$HUBPID $CLPID"
inl busybox ping -c 1 -W 5 10.240.1.10 >/dev/null
CURRENT=fcdev_tun; R[fcdev_tun]=$(measure $L 10.240.1.10 5201)
stop_client
start_client proxy --socks 127.0.0.1:1080 -L 15201:n1:5201
TPIDS="$HUBPID $CLPID"
sleep 1
CURRENT=fcdev_rootless; R[fcdev_rootless]=$(measure $L 127.0.0.1 15201)
stop_client

# --- wireguard-go (Debian), distinct interface names: the UAPI socket path is shared across namespaces.
WGH=wgbh$$ WGL=wgbl$$
wg genkey > "$WORK/wgh.key"; wg genkey > "$WORK/wgl.key"
# In the foreground (-f), in the background of this script: their pids are the daemons' own (every process
# whose CPU time is counted is started as `ip netns exec ... &`, which execs: $! is the process itself).
WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 ip netns exec $H wireguard-go -f $WGH >/dev/null 2>&1 &
WGHPID=$!
WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 ip netns exec $L wireguard-go -f $WGL >/dev/null 2>&1 &
WGLPID=$!
for _ in $(seq 50); do [ -S /var/run/wireguard/$WGH.sock ] && [ -S /var/run/wireguard/$WGL.sock ] && break; sleep 0.1; done
TPIDS="$WGHPID $WGLPID"
inh wg set $WGH private-key "$WORK/wgh.key" listen-port 51821 peer "$(wg pubkey < "$WORK/wgl.key")" allowed-ips 10.241.1.2/32
inl wg set $WGL private-key "$WORK/wgl.key" peer "$(wg pubkey < "$WORK/wgh.key")" allowed-ips 10.241.1.0/24 endpoint 192.168.77.1:51821
inh ip addr add 10.241.1.1/24 dev $WGH; inh ip link set $WGH mtu 1420 up
inl ip addr add 10.241.1.2/24 dev $WGL; inl ip link set $WGL mtu 1420 up
inl busybox ping -c 1 -W 5 10.241.1.1 >/dev/null || true
CURRENT=wireguard_go; R[wireguard_go]=$(measure $L 10.241.1.1 5201)
inh ip link del $WGH; inl ip link del $WGL
wait $WGHPID $WGLPID 2>/dev/null || true
TPIDS=

# --- fcdev through the real programs, as a user runs them: `fcdev server --dev --backend process` (its hub with
# a TUN) in the host namespace and `fcdev login` + `fcdev tunnel` in the laptop namespace; the "VM" is the
# namespace's .10 on the same bridge. Skipped when the binary is missing (FCDEV_BIN overrides it).
BIN=${FCDEV_BIN:-$ROOT/target/release/fcdev}
R[real_tun]=0; R[real_rootless]=0
if [ -x "$BIN" ] && { [ -z "${BENCH_ONLY:-}" ] || [[ " $BENCH_ONLY " == *" real_"* ]]; }; then
  ip netns exec $H "$BIN" server --dev --backend process --netns none --hub-tun fcdevrh --user bench \
    --listen 192.168.77.1:7070 --hub-listen 192.168.77.1:51830 --data-dir "$WORK/data" --images "$WORK/images" \
    > "$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 100); do grep -q 'fcd_' "$WORK/server.log" 2>/dev/null && break; sleep 0.1; done
  export FCDEV_CONFIG_DIR=$WORK/cfg FCDEV_HOSTS_FILE=$WORK/hosts
  touch "$FCDEV_HOSTS_FILE"
  grep -o 'fcd_[0-9a-f]*' "$WORK/server.log" | head -1 \
    | inl "$BIN" login --server http://192.168.77.1:7070 --token-stdin >/dev/null
  real_tunnel() { # args...: start `fcdev tunnel`, wait for its first status line
    ip netns exec $L "$BIN" tunnel "$@" > "$WORK/real.out" 2>&1 &
    RTPID=$!
    for _ in $(seq 100); do grep -q 'Tunnel up' "$WORK/real.out" 2>/dev/null && break; sleep 0.1; done
  }
  real_stop() { kill -TERM $RTPID 2>/dev/null || true; wait $RTPID 2>/dev/null || true; }
  real_tunnel --mode proxy --socks 127.0.0.1:1081
  SUBNET=$(inl "$BIN" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["namespace"]["subnet"])')
  VM=$(echo "$SUBNET" | sed 's#\.[0-9]*/.*#.10#')
  inh ip addr add "$VM/24" dev vms 2>/dev/null || true
  real_stop
  real_tunnel --mode tun --tun-name fcdevr0
  TPIDS="$SERVER_PID $RTPID"
  inl busybox ping -c 1 -W 5 "$VM" >/dev/null || true
  CURRENT=real_tun; R[real_tun]=$(measure $L "$VM" 5201)
  real_stop
  # -L by VM address: the process backend's VMs are not in the peer config's name list.
  real_tunnel --mode proxy --socks 127.0.0.1:1081 -L "15202:$VM:5201"
  TPIDS="$SERVER_PID $RTPID"
  sleep 0.5
  CURRENT=real_rootless; R[real_rootless]=$(measure $L 127.0.0.1 15202)
  real_stop
  kill $SERVER_PID 2>/dev/null || true; wait $SERVER_PID 2>/dev/null || true
fi

# --- boringtun-cli (TUN) and onetun (rootless), when installed.
R[boringtun_cli]=0; R[onetun]=0
if [ -x "$TOOLS/boringtun-cli" ]; then
  ip netns exec $H env WG_SUDO=1 "$TOOLS/boringtun-cli" --foreground --disable-drop-privileges bth$$ >/dev/null 2>&1 &
  BTHPID=$!
  ip netns exec $L env WG_SUDO=1 "$TOOLS/boringtun-cli" --foreground --disable-drop-privileges btl$$ >/dev/null 2>&1 &
  TPIDS="$BTHPID $!"
  sleep 0.5
  inh wg set bth$$ private-key "$WORK/wgh.key" listen-port 51822 peer "$(wg pubkey < "$WORK/wgl.key")" allowed-ips 10.242.1.2/32
  inl wg set btl$$ private-key "$WORK/wgl.key" peer "$(wg pubkey < "$WORK/wgh.key")" allowed-ips 10.242.1.0/24 endpoint 192.168.77.1:51822
  inh ip addr add 10.242.1.1/24 dev bth$$; inh ip link set bth$$ mtu 1420 up
  inl ip addr add 10.242.1.2/24 dev btl$$; inl ip link set btl$$ mtu 1420 up
  inl busybox ping -c 1 -W 5 10.242.1.1 >/dev/null || true
  CURRENT=boringtun_cli; R[boringtun_cli]=$(measure $L 10.242.1.1 5201)
  inh ip link del bth$$ 2>/dev/null || true; inl ip link del btl$$ 2>/dev/null || true
  rm -f /var/run/wireguard/bth$$.sock /var/run/wireguard/btl$$.sock
fi
if [ -x "$TOOLS/onetun" ]; then
  # onetun is a rootless client: point it at the fcdev hub (a standard WireGuard peer).
  TPIDS=
  ip netns exec $L "$TOOLS/onetun" 127.0.0.1:25201:10.240.1.10:5201 --endpoint-addr 192.168.77.1:51820 \
    --endpoint-public-key "$HUBPUB" --private-key "$(cat "$WORK/lap.key")" --source-peer-ip 10.240.1.2 \
    --keep-alive 25 >/dev/null 2>&1 &
  TPIDS="$HUBPID $!"
  sleep 1
  CURRENT=onetun; R[onetun]=$(measure $L 127.0.0.1 25201)
fi

exec 7>&-
WGGO=${R[wireguard_go]}
ratio() { python3 -c "print(f'{$1/$WGGO:.2f}x' if $WGGO else '-')"; }
echo
DIR="laptop -> host"; [[ " ${IPERF_ARGS:-} " == *" -R "* ]] && DIR="host -> laptop (-R)"
echo "TCP $DIR, iperf3 -t $SECS, $(nproc) cores, $(uname -r), load $(cut -d" " -f1-3 /proc/loadavg)"
printf '%-16s %10s %12s %14s\n' path "Mbit/s" "vs wg-go" "CPU s/GB"
for k in veth wireguard_go fcdev_tun fcdev_rootless real_tun real_rootless boringtun_cli onetun; do
  printf '%-16s %10s %12s %14s\n' "$k" "${R[$k]}" "$(ratio "${R[$k]}")" "$(cat "$WORK/cpu-$k" 2>/dev/null || echo -)"
done
