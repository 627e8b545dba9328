#!/bin/sh
# Build the Press cluster image from Debian packages only (debootstrap + apt): one qcow2 base per VM.
# Operators only; CI does not run this (needs a Debian mirror, root, ~10 min and a few GB per role).
#   sudo images/recipes/press/build.sh OUT_DIR [MIRROR]
#   sudo fcdev image snapshot press --out OUT_DIR
# Needs: debootstrap qemu-utils e2fsprogs linux-image-cloud-amd64 (host).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:?usage: build.sh OUT_DIR [MIRROR]}
MIRROR=${2:-http://deb.debian.org/debian}
SUITE=bookworm
KVER=$(ls /boot | sed -n 's/^vmlinuz-\(.*-cloud-amd64\)$/\1/p' | sort -V | tail -1)
[ -n "$KVER" ] || { echo "install linux-image-cloud-amd64 on the host" >&2; exit 1; }
mkdir -p "$OUT"
cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
cp "/boot/initrd.img-$KVER" "$OUT/initrd.img"   # Debian's initramfs-tools initrd: virtio + ext4 root
cp "$HERE/image.toml" "$OUT/image.toml"

size_of() {
  case "$1" in f1) echo 20G ;; m1) echo 10G ;; r1) echo 10G ;; *) echo 4G ;; esac
}

for vm in n1 f1 m1 p1 e1 r1; do
  echo "== $vm"
  work=$(mktemp -d)
  raw="$work/$vm.raw"
  truncate -s "$(size_of $vm)" "$raw"
  mkfs.ext4 -q -F -L root "$raw"
  mnt="$work/root"; mkdir -p "$mnt"
  mount -o loop "$raw" "$mnt"
  debootstrap --variant=minbase --include=systemd-sysv,linux-image-cloud-amd64,openssh-server,iproute2,busybox,ca-certificates \
    "$SUITE" "$mnt" "$MIRROR"
  # Common: root on /dev/vda, serial console, no password logins, the guest agent on ttyS1.
  echo "/dev/vda / ext4 defaults,noatime 0 1" > "$mnt/etc/fstab"
  echo "$vm" > "$mnt/etc/hostname"
  install -m 0755 "$HERE/fcdev-agent" "$mnt/usr/local/sbin/fcdev-agent"
  install -m 0644 "$HERE/fcdev-agent.service" "$mnt/etc/systemd/system/fcdev-agent.service"
  chroot "$mnt" systemctl enable fcdev-agent.service serial-getty@ttyS0.service
  sed -i 's/^#\?PasswordAuthentication.*/PasswordAuthentication no/' "$mnt/etc/ssh/sshd_config"
  rm -f "$mnt"/etc/ssh/ssh_host_*            # regenerated per VM on first boot / by the agent after a restore
  chroot "$mnt" sh -c 'systemctl enable ssh; echo "[ -f /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -A" > /etc/rc.local; chmod +x /etc/rc.local'
  # The role.
  mount --bind /proc "$mnt/proc"
  DEBIAN_FRONTEND=noninteractive chroot "$mnt" sh -s < "$HERE/roles/$vm.sh"
  umount "$mnt/proc"
  chroot "$mnt" apt-get clean
  umount "$mnt"
  qemu-img convert -q -f raw -O qcow2 "$raw" "$OUT/$vm.qcow2"
  rm -rf "$work"
done
echo "built $OUT; next: fcdev image snapshot press --out $OUT"
