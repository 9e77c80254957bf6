# lab/lib/stack.sh: the stack in the guest: modules, configfs, scratch ext4, system bus, package,
# lvmirrord, targetcli. Sourced by lab/guest.sh; uses $OUT $REPO $STATE $UNDER_SYSTEMD $LOGLEVEL.
setup() {
  local m
  for m in target_core_mod target_core_user target_core_file target_core_iblock iscsi_target_mod \
           uio iscsi_tcp sd_mod virtio_net loop ext4; do modprobe $m; done
  mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
  mkdir -p /etc/target
  ip link set lo up
  # the NIC of QEMU's user network (lab/failover's cluster NIC has a 52:54:00:99:... address)
  IF=$(for i in $(ls /sys/class/net | grep -v '^lo$'); do grep -q '^52:54:00:99:' /sys/class/net/$i/address || echo $i; done | head -1)
  if [ -n "$IF" ]; then
    ip link set "$IF" up && ip addr add 10.0.2.15/24 dev "$IF" && ip route add default via 10.0.2.2
  fi
  # image files need a real file system (punch hole, O_DIRECT): ext4 on a loop device
  truncate -s 1500M /run/scratch.img && mkfs.ext4 -q -F /run/scratch.img
  mkdir -p /run/scratch && mount -o loop /run/scratch.img /run/scratch
  mkdir -p $STATE
  # a real system bus with lvmirror's policy; no D-Bus activation of a competing tcmu-runner.
  # Under systemd the bus is already up and the package's own policy is the only one.
  rm -f /usr/share/dbus-1/system-services/org.kernel.TCMUService1.service
  if [ -z "$UNDER_SYSTEMD" ]; then
    mkdir -p /etc/dbus-1/system.d /run/dbus /var/lib/dbus
    cp "$REPO/systemd/dbus/org.lvmirror1.conf" /etc/dbus-1/system.d/
  fi
  # the Debian package, when tools/build-deb made one: install it and run the product from it
  # (LAB_NO_PACKAGE=1: the tree's own lvmirrord; lab/powercut's many boots skip the minutes of
  # dpkg -i under TCG)
  DEB=; [ -n "${LAB_NO_PACKAGE:-}" ] || DEB=$(ls "$REPO"/build/deb/lvmirror_*_"$(dpkg --print-architecture)".deb 2>/dev/null | head -1)
  if [ -n "$DEB" ]; then
    rm -f /var/lib/man-db/auto-update   # no man-db index rebuild (minutes under TCG) in a throw-away /var
    if dpkg -i "$DEB" > "$OUT/dpkg.log" 2>&1 && [ -x /usr/bin/lvmirrord ] \
       && [ -f /usr/share/dbus-1/system.d/org.lvmirror1.conf ]; then
      export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
      rm -f /etc/dbus-1/system.d/org.lvmirror1.conf      # the package's policy is used
      result package_installed ok deb="$(basename $DEB)"
    else
      result package_installed fail log="$(tail -3 $OUT/dpkg.log)"
    fi
  else
    systemd-tmpfiles --create "$REPO/systemd/lvmirror.tmpfiles"   # what the package's entry does
  fi
  [ -n "$UNDER_SYSTEMD" ] || { dbus-uuidgen --ensure; dbus-daemon --system --fork; }
  t "stack: modules, configfs, network, scratch ext4, system bus; lvmirrord is $(command -v lvmirrord)"
}

wait_bus_name() {  # wait_bus_name NAME PID: until NAME has an owner on the system bus (30 s), or PID dies
  local i
  for i in $(seq 150); do
    dbus-send --system --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
      org.freedesktop.DBus.NameHasOwner string:$1 2>/dev/null | grep -q 'boolean true' && return 0
    kill -0 $2 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

start_daemon() {  # the metrics go where the metrics section's node exporter reads them, every 2 s
  # (LVMIRRORD_METRICS=0: lvmirrord's own defaults, as the packaged unit runs it - the metrics
  # to the node exporter's directory every 5 s while it exists - the benchmark's setting, so its
  # figures carry no more background work than the product does by default)
  local metrics="--metrics-file /run/textfile/lvmirror.prom --metrics-interval 2"
  [ "${LVMIRRORD_METRICS:-1}" = 0 ] && metrics=
  mkdir -p /run/textfile
  lvmirrord --state-dir $STATE --log-level ${LOGLEVEL:-info} $metrics ${LVMIRRORD_EXTRA:-} \
    >> "$OUT/lvmirrord.log" 2>&1 &
  DAEMON=$!
  wait_bus_name org.lvmirror1 $DAEMON
}

tcli() { targetcli >> "$OUT/targetcli.log" 2>&1; }

export_luns() {  # export_luns IQN NAME:SIZE:CFGSTRING ...: user:lvmirror backstores as LUNs 0.. of
  local iqn=$1 spec; shift            # target IQN (open, no authentication), through tcli
  {
    echo "set global auto_save_on_exit=false"
    for spec in "$@"; do
      echo "/backstores/user:lvmirror create name=${spec%%:*} size=$(echo "$spec" | cut -d: -f2) cfgstring=${spec#*:*:} control=nl_reply_supported=-1"
    done
    echo "/iscsi create $iqn"
    for spec in "$@"; do echo "/iscsi/$iqn/tpg1/luns create /backstores/user:lvmirror/${spec%%:*}"; done
    echo "/iscsi/$iqn/tpg1 set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1"
  } | tcli
}
