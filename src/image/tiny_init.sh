#!/bin/sh
# fcdev tiny image init (PID 1). Built by `fcdev image build tiny`; see docs/images.md.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run /data /www /root/.ssh /etc/dropbear
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null; done

IP= GW= NAME=vm NS=- ROLE=- MAC= KEYS= SNAPSHOT= HOSTS= TIME= DBKEY=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    fcdev.ip=*) IP=${arg#fcdev.ip=} ;;
    fcdev.gw=*) GW=${arg#fcdev.gw=} ;;
    fcdev.name=*) NAME=${arg#fcdev.name=} ;;
    fcdev.ns=*) NS=${arg#fcdev.ns=} ;;
    fcdev.role=*) ROLE=${arg#fcdev.role=} ;;
    fcdev.mac=*) MAC=${arg#fcdev.mac=} ;;
    fcdev.keys=*) KEYS=${arg#fcdev.keys=} ;;
    fcdev.hosts=*) HOSTS=${arg#fcdev.hosts=} ;;
    fcdev.snapshot=1) SNAPSHOT=1 ;;
  esac
done

i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
ip link set lo up

page() {
  echo "fcdev tiny vm ${NAME} namespace ${NS} role ${ROLE} address ${IP%/*}" > /www/index.html
}

mounted() {
  while read -r _dev mnt _rest; do [ "$mnt" = /data ] && return 0; done < /proc/mounts
  return 1
}

mount_data() {
  mounted && return 0
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 40 ]; do sleep 0.05; i=$((i+1)); done
  [ -b /dev/vda ] && mount -t ext4 -o noatime /dev/vda /data
}

keys() {
  if [ -n "$KEYS" ] && [ "$KEYS" != "-" ]; then
    echo "$KEYS" | base64 -d > /root/.ssh/authorized_keys 2>/dev/null
    chmod 600 /root/.ssh/authorized_keys
  fi
}

# The ssh host key the server made (dropbear's format). dropbear was started with -R and no ed25519 key, so
# each connection's child reads this file when the client asks for ed25519: no restart.
hostkey() {
  [ -n "$DBKEY" ] || return 0
  echo "$DBKEY" | base64 -d > /etc/dropbear/.ed25519.new 2>/dev/null &&
    chmod 600 /etc/dropbear/.ed25519.new &&
    mv /etc/dropbear/.ed25519.new /etc/dropbear/dropbear_ed25519_host_key
  DBKEY=
}

# Few processes: every exec costs under TCG. The address comes last: it is what the readiness probe sees.
configure() {
  [ -n "$MAC" ] && ip link set eth0 address "$MAC"
  page
  echo "$NAME" > /proc/sys/kernel/hostname
  echo "$NAME" > /etc/hostname
  keys
  hostkey
  [ -z "$SNAPSHOT" ] && mount_data
  if [ -n "$IP" ]; then
    ip addr flush dev eth0
    ip addr add "$IP" dev eth0
  fi
  ip link set eth0 up
  [ -n "$IP" ] && arping -U -c 1 -I eth0 "${IP%/*}" >/dev/null 2>&1 &
  [ -n "$GW" ] && ip route replace default via "$GW"
  # Forget the neighbours of the snapshot's network (another gateway MAC than the namespace's).
  ip neigh flush dev eth0 2>/dev/null
  if [ -n "$HOSTS" ] && [ "$HOSTS" != - ]; then
    { echo "127.0.0.1 localhost"; echo "$HOSTS" | base64 -d; } > /etc/hosts
  fi
  [ -n "$TIME" ] && date -u -s "@$TIME" >/dev/null 2>&1
}

configure
/bin/httpd -p 80 -h /www
if [ -x /usr/sbin/dropbear ]; then
  /usr/sbin/dropbear -R -E -p 22 2>/dev/null
fi
echo "fcdev: $NAME ready" > /dev/console

# The guest agent on ttyS1 (see src/server/backend/qemu/agent.rs).
stty -F /dev/ttyS1 raw -echo 2>/dev/null
exec 3>/dev/ttyS1
# Requests may end with `id=HEX`: the host re-sends a request until it gets the reply (a line can be lost or
# cut on the serial port under load); a request whose id was the last one handled gets that reply again, never
# a second run.
LAST_ID= LAST_REPLY=
while true; do
  while IFS= read -r line; do
    set -- $line
    id=
    for w in "$@"; do case "$w" in id=*) id=${w#id=} ;; esac; done
    if [ -n "$id" ] && [ "$id" = "$LAST_ID" ]; then
      echo "$LAST_REPLY" >&3
      continue
    fi
    reply=
    case "$1" in
      ping) reply=pong ;;
      config)
        shift
        for kv in "$@"; do
          case "$kv" in
            ip=*) IP=${kv#ip=} ;;
            gw=*) GW=${kv#gw=} ;;
            name=*) NAME=${kv#name=} ;;
            ns=*) NS=${kv#ns=} ;;
            role=*) ROLE=${kv#role=} ;;
            mac=*) MAC=${kv#mac=} ;;
            hosts=*) HOSTS=${kv#hosts=} ;;
            time=*) TIME=${kv#time=} ;;
            keys=*) KEYS=${kv#keys=} ;;
            dbkey=*) DBKEY=${kv#dbkey=} ;;
            seed=*) echo "${kv#seed=}" > /dev/urandom ;;
          esac
        done
        SNAPSHOT=
        configure
        reply="ok $NAME"
        ;;
      clock)
        date -u -s "@$2" >/dev/null 2>&1
        reply="ok id=$id"
        ;;
      run)
        cmd=$(echo "$2" | base64 -d)
        out=$(sh -c "$cmd" 2>&1 </dev/null)
        rc=$?
        reply="out $rc $(printf '%s' "$out" | base64 -w 0) id=$id"
        ;;
      exec)
        # Streams the output line by line as it comes, in the background (the loop goes on serving).
        cmd=$(echo "$2" | base64 -d)
        (
          rcf=/tmp/.fcdev-exec-$id
          { sh -c "$cmd" 2>&1 </dev/null; echo $? > "$rcf"; } | {
            seq=0
            while :; do
              if IFS= read -r l; then b=$(printf '%s\n' "$l" | base64 -w 0)
              elif [ -n "$l" ]; then b=$(printf '%s' "$l" | base64 -w 0)  # a last line without a newline
              else break
              fi
              echo "data id=$id $seq $b" >&3
              seq=$((seq + 1))
            done
          }
          echo "exit id=$id $(cat "$rcf" 2>/dev/null || echo 255)" >&3
          rm -f "$rcf"
        ) &
        reply="started id=$id"
        ;;
    esac
    [ -n "$reply" ] || continue
    [ -n "$id" ] && LAST_ID=$id && LAST_REPLY=$reply
    echo "$reply" >&3
  done < /dev/ttyS1
  sleep 0.1
done
