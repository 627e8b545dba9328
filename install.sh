#!/usr/bin/env bash
# Install fcdev and the host packages it needs (idempotent; run as root, or it uses sudo).
#
#   ./install.sh          install packages + build (as you) and install /usr/local/bin/fcdev (with sudo)
#   ./install.sh --run    ...then run the main job: a local cluster (fcdev up --local) reachable through the
#                         tunnel (rootless mode, http://127.0.0.1:8080 -> n1:80); Ctrl-C stops the tunnel
set -euo pipefail
cd "$(dirname "$0")"

run_after=0
[ "${1:-}" = "--run" ] && run_after=1

SUDO=""
if [ "$(id -u)" != 0 ]; then
  SUDO="sudo"
fi

# Host packages: QEMU and a guest kernel for the VMs, busybox/dropbear for the tiny image, iproute2/nftables for
# the VM network. --no-install-recommends: wireguard-tools would otherwise pull in a whole kernel.
PACKAGES=(qemu-system-x86 qemu-utils linux-image-cloud-amd64 busybox-static dropbear-bin iproute2 nftables procps
          curl ca-certificates openssh-client xz-utils zstd gcc)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "==> host packages already installed"
fi

if ! command -v cargo >/dev/null; then
  echo "error: cargo not found; install a Rust toolchain (https://rustup.rs) and run this again" >&2
  exit 1
fi
echo "==> building fcdev (release)"
cargo build --release --quiet
$SUDO install -m 0755 target/release/fcdev /usr/local/bin/fcdev
for f in completions/fcdev.bash; do
  [ -d /usr/share/bash-completion/completions ] && $SUDO install -m 0644 "$f" /usr/share/bash-completion/completions/fcdev || true
done
echo "==> installed $(/usr/local/bin/fcdev --version) to /usr/local/bin/fcdev"

if [ "$run_after" = 1 ]; then
  echo "==> fcdev up --local"
  $SUDO /usr/local/bin/fcdev up --local
  echo "==> fcdev tunnel (rootless): curl http://127.0.0.1:8080 reaches n1; socks5://127.0.0.1:1080 reaches every VM"
  exec $SUDO /usr/local/bin/fcdev --profile local tunnel --mode proxy -L 8080:n1:80
fi
