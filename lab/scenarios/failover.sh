# lab/scenarios/failover.sh: section "failover", one gateway of lab/failover's two (issue: two
# gateways). Runs in each of two guests that share raw disks (QEMU share-rw: the volume's two
# images, the sanlock lease area, an ext4 with multi-mount protection for the volume's state) and
# a private network (10.99.0.0/24, UDP on the host's loopback). This guest ($FO_NODE, node id
# $FO_ID) brings up what a gateway runs - corosync, Pacemaker, sanlock (no watchdog, 2 s I/O
# timeout), lvmirrord with volume leases, an iSCSI target - and then runs the commands lab/failover
# gives it (files $OUT/cmd/N.sh, run in this shell's functions, output N.out, exit code N.rc)
# until $OUT/cmd/quit appears or this guest's power is cut.
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.

FO_IQN=iqn.2026-11.org.lvmirror:failover
FO_STATE=/run/ha-state           # the Filesystem resource mounts the shared state ext4 here
FO_AREA=/dev/disk/by-id/virtio-lvmlease

fo_cluster_net() {  # the cluster NIC (52:54:00:99:00:ID) up as 10.99.0.ID/24
  local i
  for i in $(ls /sys/class/net); do
    if grep -q '^52:54:00:99:' /sys/class/net/$i/address; then
      ip link set $i up && ip addr add 10.99.0.$FO_ID/24 dev $i && return 0
    fi
  done
  return 1
}

fo_corosync() {  # corosync 3 (knet over the cluster NIC), two nodes, two_node quorum
  mkdir -p /etc/corosync /var/log/corosync /var/lib/corosync
  cat > /etc/corosync/corosync.conf <<EOF
totem {
    version: 2
    cluster_name: lvmlab
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 3000
}
nodelist {
    node {
        ring0_addr: 10.99.0.1
        name: gwa
        nodeid: 1
    }
    node {
        ring0_addr: 10.99.0.2
        name: gwb
        nodeid: 2
    }
}
quorum {
    provider: corosync_votequorum
    two_node: 1
}
logging {
    to_logfile: yes
    logfile: $OUT/corosync.log
    to_stderr: no
    to_syslog: no
    timestamp: on
}
EOF
  corosync
}

fo_pacemaker() {  # pacemakerd and its daemons, as pacemaker.service starts them
  mkdir -p /var/lib/pacemaker/cib /var/lib/pacemaker/pengine /var/lib/pacemaker/blackbox \
    /var/lib/pacemaker/cores /var/log/pacemaker /run/crm
  chown -R hacluster:haclient /var/lib/pacemaker /var/log/pacemaker /run/crm
  PCMK_logfile=$OUT/pacemaker.log PCMK_debug=no pacemakerd > "$OUT/pacemakerd.out" 2>&1 &
}

failover() {
  local i
  hostname $FO_NODE
  fo_cluster_net || { result fo_cluster_net fail; return; }
  mkdir -p $FO_STATE /run/sanlock "$OUT/cmd" /dev/shm
  mountpoint -q /dev/shm || mount -t tmpfs -o mode=1777 shm /dev/shm   # libqb's IPC (corosync, pacemaker)
  sanlock daemon -w 0 -o 2 > "$OUT/sanlock.log" 2>&1
  fo_corosync
  fo_pacemaker
  # the target: gwa serves through TPG 1, gwb through TPG 2 (the relative target ports differ,
  # as two gateways of one ALUA layout want); each gateway's resource agent creates the other's
  # TPG, never enabled, so REPORT TARGET PORT GROUPS lists both groups
  echo "set global auto_save_on_exit=false
/iscsi create $FO_IQN" | tcli
  if [ "$FO_ID" != 1 ]; then
    echo "set global auto_save_on_exit=false
/iscsi/$FO_IQN delete 1
/iscsi/$FO_IQN create $FO_ID
/iscsi/$FO_IQN/tpg$FO_ID enable" | tcli
  fi
  echo "set global auto_save_on_exit=false
/iscsi/$FO_IQN/tpg$FO_ID set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1" | tcli
  t "failover: $FO_NODE (node $FO_ID) up: corosync, pacemaker, sanlock, target $FO_IQN tpg $FO_ID"
  touch "$OUT/cmd/ready"
  local n=0 f
  while [ ! -e "$OUT/cmd/quit" ]; do
    f="$OUT/cmd/$((n + 1)).sh"
    if [ -e "$f" ]; then
      n=$((n + 1))
      ( . "$f" ) > "$OUT/cmd/$n.out" 2>&1
      echo $? > "$OUT/cmd/$n.rc.tmp" && mv "$OUT/cmd/$n.rc.tmp" "$OUT/cmd/$n.rc"
    else
      sleep 0.5
    fi
  done
  kill $DAEMON 2>/dev/null
}

fo_image() {  # fo_image VOLUME INDEX: "state dirty_bytes" of the image, from lvmirror --json status
  lvmirror --json status | $PY -c "
import json, sys
v = json.load(sys.stdin)['volumes'].get('$1')
im = v['images'][$2] if v and $2 < len(v['images']) else None
print(f\"{im['state']} {im['dirty_bytes']}\" if im else 'absent absent')"
}

fo_promoted() {  # fo_promoted CLONE NODE [SECONDS]: until CLONE's promoted instance runs on NODE
  local i     # (default 600 s) and the cluster has settled (--locate counts an action in progress)
  for i in $(seq $(( ${3:-600} / 3 ))); do
    crm_resource --wait --timeout=3s > /dev/null 2>&1 \
      && crm_resource --locate -r $1 2>/dev/null | grep -Eq "running on: $2 (Promoted|Master)" && return 0
    sleep 3
  done
  crm_mon -1 2>&1 | tail -30
  return 1
}

FO_MP_CONF='defaults {
    user_friendly_names yes
    find_multipaths no
    polling_interval 2
}
blacklist {
    devnode "^vd[a-z]"
}
devices {
    device {
        vendor "LIO-ORG"
        product ".*"
        path_grouping_policy group_by_prio
        prio alua
        hardware_handler "1 alua"
        path_checker tur
        failback immediate
        no_path_retry 60
    }
}'

fo_multipath() {  # the initiator of the planned move, on this gateway: open-iscsi sessions to
  # both gateways' portals (this one's on loopback, the peer's over the cluster network) and
  # dm-multipath over them, set up as for any ALUA array (the alua handler, paths grouped by
  # ALUA priority, failback immediate, I/O queued up to 120 s while no path serves: 60 checks
  # 2 s apart); prints `multipath -ll`
  local peer=10.99.0.$((3 - FO_ID)) i
  modprobe dm_multipath && modprobe scsi_dh_alua || return 1
  printf '%s\n' "$FO_MP_CONF" > /etc/multipath.conf
  pidof multipathd > /dev/null || multipathd
  pidof iscsid > /dev/null || { iscsid; sleep 1; }
  iscsiadm -m discovery -t sendtargets -p 127.0.0.1 > /dev/null && \
    iscsiadm -m discovery -t sendtargets -p $peer > /dev/null && \
    iscsiadm -m node -T $FO_IQN --login > /dev/null || return 1
  for i in $(seq 30); do
    udevadm settle 2>/dev/null
    [ "$(multipath -ll 2>/dev/null | grep -c 'sd[a-z]')" -ge 2 ] && break
    multipath -r > /dev/null 2>&1; sleep 2
  done
  multipath -ll
}

fo_mp_dev() {  # the multipath map of LUN 0 (/dev/mapper/NAME)
  echo /dev/mapper/$(multipath -ll 2>/dev/null | awk '/dm-[0-9]/ {print $1; exit}')
}
