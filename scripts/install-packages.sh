#!/usr/bin/env bash
# scripts/install-packages.sh [--ci]
#
# Install the Debian packages fcdev needs on its host (with --ci also what the tests and benches need), then
# check that every program is really there. Shared by install.sh and .ci/run. Runs as root, or uses sudo.
#
# apt is asked for the whole list every time, in one call (it is idempotent). The image this runs on may ship a
# newer qemu-utils (bookworm-backports, whose source is not in apt's lists) than the qemu-system-x86 apt can
# install; that qemu-utils Breaks the older qemu-system-common, so apt would either remove it (then `qemu-img` is
# missing) or refuse. So every qemu package of the list is pinned to the version apt will install for
# qemu-system-x86, with --allow-downgrades, in the same call.
#
# Test hook: FCDEV_EXTRA_PATH (default /usr/local/sbin:/usr/sbin:/sbin) is searched after PATH when checking for
# the programs, as fcdev itself does; tests/install_script.rs sets it empty to see only its stub packages.
set -euo pipefail

HOST_PACKAGES=(qemu-system-x86 qemu-utils linux-image-cloud-amd64 busybox-static dropbear-bin iproute2 nftables
               procps curl ca-certificates openssh-client openssh-sftp-server rsync xz-utils zstd gcc debootstrap
               e2fsprogs)
# postgresql-15: the store tests start a real PostgreSQL (initdb, pg_ctl from /usr/lib/postgresql/15/bin, checked
# as packages: those programs are not on PATH).
CI_PACKAGES=(socat iperf3 wireguard-tools wireguard-go mariadb-client-core postgresql-15 postgresql-client-15)

# Program -> the package that ships it (the programs fcdev, the image builds, the tests and the benches run).
declare -A HOST_PROGRAMS=(
  [qemu-system-x86_64]=qemu-system-x86 [qemu-img]=qemu-utils [busybox]=busybox-static [dropbear]=dropbear-bin
  [dropbearkey]=dropbear-bin [ip]=iproute2 [nft]=nftables [pgrep]=procps [curl]=curl [ssh]=openssh-client
  [rsync]=rsync [xz]=xz-utils [zstd]=zstd [gcc]=gcc [debootstrap]=debootstrap [mkfs.ext4]=e2fsprogs
)
declare -A CI_PROGRAMS=(
  [mariadb]=mariadb-client-core [dbclient]=dropbear-bin [socat]=socat [iperf3]=iperf3 [wg]=wireguard-tools [wireguard-go]=wireguard-go
)

SUDO=()
[ "$(id -u)" = 0 ] || SUDO=(sudo)

apt_env() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }

# One apt-get call for the whole list; qemu-* packages other than qemu-system-x86 pinned to its candidate.
install_packages() {
  local candidate p pkgs=()
  apt_env apt-get update -qq
  candidate=$(LC_ALL=C apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: *//p' | head -n 1)
  if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
    echo "error: apt has no candidate for qemu-system-x86 (check /etc/apt/sources.list: Debian bookworm main)" >&2
    return 1
  fi
  for p in "$@"; do
    case "$p" in
      qemu-system-x86) pkgs+=("$p") ;;
      qemu-*) pkgs+=("$p=$candidate") ;;
      *) pkgs+=("$p") ;;
    esac
  done
  echo "==> apt-get install ${pkgs[*]}"
  apt_env apt-get install -y -qq --no-install-recommends --allow-downgrades "${pkgs[@]}"
}

# Every package installed and every program found, or a message naming what is missing.
check_installed() {  # check_installed NAME_OF_PROGRAM_MAP PKG...
  local -n progs=$1
  shift
  local p prog missing=() extra=${FCDEV_EXTRA_PATH-/usr/local/sbin:/usr/sbin:/sbin}
  local search=$PATH${extra:+:$extra}
  for p in "$@"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("package $p")
  done
  for prog in $(printf '%s\n' "${!progs[@]}" | sort); do
    PATH=$search command -v "$prog" >/dev/null || missing+=("program $prog (package ${progs[$prog]})")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "error: after apt-get install these are still missing:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    echo "hint: run 'apt-get install --no-install-recommends <package>' and read apt's message" >&2
    return 1
  fi
}

main() {
  local packages=("${HOST_PACKAGES[@]}")
  declare -A programs=()
  local k
  for k in "${!HOST_PROGRAMS[@]}"; do programs[$k]=${HOST_PROGRAMS[$k]}; done
  if [ "${1:-}" = "--ci" ]; then
    packages+=("${CI_PACKAGES[@]}")
    for k in "${!CI_PROGRAMS[@]}"; do programs[$k]=${CI_PROGRAMS[$k]}; done
  elif [ -n "${1:-}" ]; then
    echo "usage: $0 [--ci]" >&2
    return 2
  fi
  install_packages "${packages[@]}"
  check_installed programs "${packages[@]}"
  echo "==> host packages installed: ${#packages[@]} packages, ${#programs[@]} programs checked"
}

main "$@"
