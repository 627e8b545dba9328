#!/bin/sh
# Runs inside the press root filesystem (chroot) after debootstrap; the recipe files are in $1.
# One base disk for every role: all services are installed, none starts by itself; fcdev-boot starts the VM's
# role services at boot (see fcdev-boot).
set -eu
R=$1
install -m 0755 "$R/fcdev-boot" "$R/fcdev-agent" /usr/local/sbin/
install -m 0644 "$R/fcdev-boot.service" "$R/fcdev-agent.service" "$R/press-app.service" "$R/press-seed.service" \
  /etc/systemd/system/
mkdir -p /etc/fcdev /opt/press
install -m 0644 "$R/seed.sql" "$R/rsyslog-server.conf" "$R/rsyslog-forward.conf" /etc/fcdev/
install -m 0644 "$R/app.py" /opt/press/app.py
install -m 0644 "$R/mariadb.cnf" /etc/mysql/mariadb.conf.d/60-fcdev.cnf
install -m 0644 "$R/nginx-site" /etc/nginx/sites-available/default
install -m 0644 "$R/prometheus.yml" /etc/prometheus/prometheus.yml
install -m 0644 "$R/registry.yml" /etc/docker/registry/config.yml
# Redis holds only the app's hit counter: no RDB saves. With the default `save 3600 1`, the clock jump of every
# restore (the guest is given the host's time) started a background save: a fork and a disk write under TCG.
printf '\n# fcdev: no RDB saves (see setup.sh)\nsave ""\n' >> /etc/redis/redis.conf
echo 'ARGS="--storage.tsdb.retention.time=2d --web.enable-lifecycle"' > /etc/default/prometheus
echo 'ARGS="--collector.disable-defaults --collector.cpu --collector.meminfo --collector.loadavg --collector.filesystem --collector.netdev --collector.time --collector.uname"' \
  > /etc/default/prometheus-node-exporter

for u in ssh rsyslog prometheus-node-exporter nginx redis-server mariadb prometheus docker-registry e2scrub_reap; do
  systemctl disable "$u" >/dev/null 2>&1 || true
done
# disabling rsyslog drops its syslog.service alias, which syslog.socket needs
ln -sf /lib/systemd/system/rsyslog.service /etc/systemd/system/syslog.service
for u in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer \
  getty@tty1.service systemd-networkd-wait-online.service; do
  systemctl mask "$u" >/dev/null 2>&1 || true
done
systemctl enable fcdev-boot.service fcdev-agent.service serial-getty@ttyS0.service >/dev/null 2>&1

mkdir -p /etc/systemd/journald.conf.d
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' > /etc/systemd/journald.conf.d/fcdev.conf
echo "/dev/vda / ext4 defaults,noatime 0 1" > /etc/fstab
: > /etc/resolv.conf
echo press > /etc/hostname
# ssh: keys only; one ed25519 host key per VM: the server's (fcdev-agent installs it), or made at a cold boot
# (never in the image). The per-VM files are in /run/fcdev (a tmpfs; see src/guest/configure.rs): the host key,
# the engineer's keys (root's own ~/.ssh/authorized_keys still counts) and the cluster's name map (the agent makes
# /etc/hosts a symlink to it at the first boot).
sed -i 's/^#\?PasswordAuthentication.*/PasswordAuthentication no/' /etc/ssh/sshd_config
printf 'HostKey /run/fcdev/ssh_host_ed25519_key\nAuthorizedKeysFile .ssh/authorized_keys /run/fcdev/authorized_keys\nUseDNS no\n' \
  > /etc/ssh/sshd_config.d/fcdev.conf
rm -f /etc/ssh/ssh_host_*
rm -f /etc/machine-id /var/lib/dbus/machine-id && : > /etc/machine-id
rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb \
  /var/lib/apt/lists/*_Packages
