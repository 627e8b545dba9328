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

# Host packages (QEMU and a guest kernel for the VMs, busybox/dropbear for the tiny image, iproute2/nftables for
# the VM network, debootstrap/e2fsprogs for image builds): the whole list in one apt call, then every program is
# checked. See scripts/install-packages.sh.
scripts/install-packages.sh

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
