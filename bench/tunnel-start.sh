#!/usr/bin/env bash
# bench/tunnel-start.sh [RUNS]  (root; default 5)
#
# `fcdev tunnel` start -> first byte from a VM, TUN and rootless mode, through the real programs: `fcdev server
# --dev --backend process` (its hub with a TUN) in a "host" network namespace, `fcdev login` + `fcdev tunnel` in
# a "laptop" namespace joined to it by a veth pair, and a stand-in VM (busybox httpd) on the namespace's first VM
# address, like tests/tunnel_cli.rs. Each run starts `fcdev tunnel` and polls the VM (TUN: plain TCP to VM:80;
# rootless: SOCKS5 on 127.0.0.1:1080) every 2 ms until the first byte of its HTTP answer arrives; then
# SIGTERM. Runs alternate between the modes. Prints the median and every run, in ms. KEEP=1 copies the run's
# files (server log, tunnel stderr) to /tmp/tstart-last; FCDEV_BIN=path skips the build.
#
# Everything runs in namespaces created here and deleted on exit; nothing is sent from the root namespace.
set -euo pipefail
umask 077
RUNS=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "bench/tunnel-start.sh needs root (network namespaces, TUN)" >&2; exit 1; }
[ -e /dev/net/tun ] || { echo "needs /dev/net/tun" >&2; exit 1; }
if [ -z "${FCDEV_BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release -q)
fi
BIN=${FCDEV_BIN:-$ROOT/target/release/fcdev}
H=fcdevts-host-$$ L=fcdevts-lap-$$
T=$(mktemp -d /tmp/fcdev-tstart-XXXX)
SERVER_PID=

cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  for ns in $H $L; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del $ns 2>/dev/null || true
  done
  [ -n "${KEEP:-}" ] && cp -r "$T" /tmp/tstart-last; rm -rf "$T"
}
trap cleanup EXIT

inh() { ip netns exec $H "$@"; }
inl() { ip netns exec $L "$@"; }
ip netns add $H; ip netns add $L
inh ip link set lo up; inl ip link set lo up
ip -n $H link add lap0 type veth peer name up0 netns $L
ip -n $H addr add 192.168.78.1/24 dev lap0; ip -n $H link set lap0 up
ip -n $L addr add 192.168.78.2/24 dev up0; ip -n $L link set up0 up

ip netns exec $H "$BIN" server --dev --backend process --netns none --hub-tun fcdevhub --user bench \
  --listen 192.168.78.1:7070 --hub-listen 192.168.78.1:51820 --data-dir "$T/data" --images "$T/images" \
  > "$T/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 100); do grep -q 'fcd_' "$T/server.log" 2>/dev/null && break; sleep 0.1; done
export FCDEV_CONFIG_DIR=$T/cfg
# TUN mode adds the VM names to a hosts file: this run's own, not the machine's /etc/hosts.
export FCDEV_HOSTS_FILE=$T/hosts
touch "$FCDEV_HOSTS_FILE"
grep -o 'fcd_[0-9a-f]*' "$T/server.log" | head -1 \
  | inl "$BIN" login --server http://192.168.78.1:7070 --token-stdin >/dev/null

# The namespace's subnet: the stand-in VM takes its .10 on a bridge of the host namespace.
SUBNET=$(inl "$BIN" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["namespace"]["subnet"])' 2>/dev/null || true)
if [ -z "$SUBNET" ]; then
  # No namespace yet: one tunnel start creates it (and registers this machine's peer).
  # A simple command, not through inl: $! must be fcdev itself (`ip netns exec` execs it).
  ip netns exec $L "$BIN" tunnel --mode proxy --socks 127.0.0.1:1080 > "$T/first.out" 2>&1 &
  for _ in $(seq 100); do grep -q 'Tunnel up' "$T/first.out" 2>/dev/null && break; sleep 0.1; done
  kill -TERM $! 2>/dev/null || true; wait $! 2>/dev/null || true
  SUBNET=$(inl "$BIN" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["namespace"]["subnet"])')
fi
VM=$(echo "$SUBNET" | sed 's#\.[0-9]*/.*#.10#')
mkdir -p "$T/www"; echo "hello from the vm" > "$T/www/index.html"
ip -n $H link add vms type bridge; ip -n $H addr add "$VM/24" dev vms; ip -n $H link set vms up
inh busybox httpd -p "$VM:80" -h "$T/www"

echo "fcdev tunnel start -> first byte from VM $VM: $RUNS runs per mode, alternating ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
TSTART_LOG=$T/tunnel.log inl python3 - "$BIN" "$VM" "$RUNS" <<'PY'
import os, signal, socket, statistics, struct, subprocess, sys, time
binary, vm, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
REQ = b"GET / HTTP/1.0\r\n\r\n"

def direct():
    s = socket.create_connection((vm, 80), timeout=2)
    return s

def via_socks():
    s = socket.create_connection(("127.0.0.1", 1080), timeout=2)
    s.sendall(b"\x05\x01\x00")
    if s.recv(2) != b"\x05\x00":
        raise OSError("socks greeting")
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(vm) + struct.pack(">H", 80))
    r = s.recv(10)
    if len(r) < 2 or r[1] != 0:
        raise OSError("socks connect refused")
    return s

def first_byte(open_conn):
    s = open_conn()
    try:
        s.sendall(REQ)
        if not s.recv(1):
            raise OSError("closed")
    finally:
        s.close()

def one(mode):
    args = [binary, "tunnel", "--mode", mode]
    args += ["--socks", "127.0.0.1:1080"] if mode == "proxy" else ["--tun-name", "fcdevts0"]
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(os.environ.get("TSTART_LOG", os.devnull), "a"))
    conn = via_socks if mode == "proxy" else direct
    try:
        while True:
            if time.monotonic() - t0 > 20:
                raise SystemExit(f"{mode}: no byte from the VM within 20 s")
            try:
                first_byte(conn)
                return (time.monotonic() - t0) * 1000
            except OSError:
                time.sleep(0.002)
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill(); p.wait()

res = {"tun": [], "proxy": []}
for _ in range(runs):
    for mode in ("tun", "proxy"):
        res[mode].append(one(mode))
        time.sleep(0.3)
for mode, name in (("tun", "TUN"), ("proxy", "rootless")):
    ms = res[mode]
    print(f"{name:9s} median {statistics.median(ms):7.1f} ms   runs: " + " ".join(f"{m:.0f}" for m in ms))
PY
