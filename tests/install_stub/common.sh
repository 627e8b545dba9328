# Shared by the stub apt-get, apt-cache and dpkg-query (tests/install_script.rs): the packages of a fresh machine of
# this image. State: one file per installed package in $STUB/state (its content: the version); every call is
# appended to $STUB/calls; a program of an installed package is an executable in $STUB/bin.
STUB=$(cd "$(dirname "$0")/.." && pwd)
STATE=$STUB/state
echo "$(basename "$0") $*" >> "$STUB/calls"
# What apt can install: qemu from bookworm, everything else at 1.0. The qemu-utils 10 that the image ships came
# from bookworm-backports, which is no longer in apt's lists.
QEMU_BOOKWORM=1:7.2+dfsg-7+deb12u18+b3
available() { case "$1" in qemu-*) echo "$QEMU_BOOKWORM" ;; *) echo 1.0 ;; esac; }
installed() { cat "$STATE/$1" 2>/dev/null; }
# The candidate: the installed version when it is newer than any apt knows of, else the available one.
candidate() {
  local i
  i=$(installed "$1")
  case "$i" in 1:10*) echo "$i" ;; *) available "$1" ;; esac
}
programs_of() {
  case "$1" in
    qemu-system-x86) echo qemu-system-x86_64 ;;
    qemu-utils) echo qemu-img ;;
    busybox-static) echo busybox ;;
    dropbear-bin) echo dropbear dropbearkey dbclient ;;
    iproute2) echo ip ;;
    nftables) echo nft ;;
    procps) echo pgrep pkill ;;
    curl) echo curl ;;
    openssh-client) echo ssh ;;
    rsync) echo rsync ;;
    xz-utils) echo xz ;;
    zstd) echo zstd ;;
    gcc) echo gcc ;;
    debootstrap) echo debootstrap ;;
    e2fsprogs) echo mkfs.ext4 ;;
    socat) echo socat ;;
    iperf3) echo iperf3 ;;
    wireguard-tools) echo wg ;;
    wireguard-go) echo wireguard-go ;;
    mariadb-client-core) echo mariadb ;;
  esac
}
