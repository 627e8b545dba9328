# e1: log server: rsyslog receiving on 514/tcp+udp, one file per sending host.
apt-get install -y --no-install-recommends rsyslog logrotate
cat > /etc/rsyslog.d/10-fcdev-remote.conf <<'CONF'
module(load="imudp")
input(type="imudp" port="514")
module(load="imtcp")
input(type="imtcp" port="514")
template(name="PerHost" type="string" string="/var/log/remote/%HOSTNAME%.log")
if $fromhost-ip != '127.0.0.1' then { action(type="omfile" dynaFile="PerHost") stop }
CONF
systemctl enable rsyslog
