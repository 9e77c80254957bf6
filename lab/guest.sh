#!/bin/bash
# Runs INSIDE the kernel-lab guest (Debian's kernel with LIO, booted by lab/boot with the host's
# root file system shared read-only; /etc, /var, /tmp are throw-away overlays, $OUT is shared
# read-write with the host). Brings up the real stack - configfs, a system bus with lvmirror's
# policy, lvmirrord, targetcli, the iSCSI target, open-iscsi, libiscsi - and runs the checks the
# host-side pytest suite (tests/lab) asserts on. Every check writes one JSON line to
# $OUT/results.jsonl: {"check": name, "ok": bool, ...details}.
#
# Usage (by lab/boot): guest.sh OUT [SECTION ...]
#   sections: basic fs split crash dbus compliance saveconfig tcmurunner demo, bench (bench/lab-bench.sh,
#   run alone), and systemd (run alone, in the guest lab/boot --systemd boots with systemd as PID 1)
set -u
OUT=$1; shift
[ -f "$OUT/lab.env" ] && . "$OUT/lab.env"
# lab/boot --systemd: systemd is PID 1 and owns the serial console; this script logs to a file
UNDER_SYSTEMD=; [ "$(cat /proc/1/comm)" = systemd ] && UNDER_SYSTEMD=1
[ -n "$UNDER_SYSTEMD" ] && exec >> "$OUT/guest-console.log" 2>&1
SECTIONS=${*:-basic fs split crash dbus compliance saveconfig tcmurunner}
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
PY=$REPO/.venv/bin/python
IQN=iqn.2026-11.org.lvmirror:lab
STATE=/run/scratch/state
export HOME=/tmp/home PATH=$REPO/.venv/bin:$PATH
mkdir -p "$HOME"
t() { echo "[guest T+$(awk '{print $1}' /proc/uptime)s] $*"; }
result() {  # result NAME ok|fail [key=value ...]
  local name=$1 ok=$2; shift 2
  $PY - "$name" "$ok" "$@" >> "$OUT/results.jsonl" <<'PY'
import json, sys
name, ok, *kv = sys.argv[1:]
d = {"check": name, "ok": ok == "ok"}
for item in kv:
    k, _, v = item.partition("=")
    d[k] = v
print(json.dumps(d))
PY
  echo "RESULT $name $ok $*"
}

# ---------------------------------------------------------------- the stack
setup() {
  for m in target_core_mod target_core_user target_core_file target_core_iblock iscsi_target_mod \
           uio iscsi_tcp sd_mod virtio_net loop ext4; do modprobe $m; done
  mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
  mkdir -p /etc/target
  ip link set lo up
  IF=$(ls /sys/class/net | grep -v '^lo$' | head -1)
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
  DEB=$(ls "$REPO"/build/deb/lvmirror_*_all.deb 2>/dev/null | head -1)
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
  for i in $(seq 150); do
    dbus-send --system --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
      org.freedesktop.DBus.NameHasOwner string:$1 2>/dev/null | grep -q 'boolean true' && return 0
    kill -0 $2 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

start_daemon() {
  lvmirrord --state-dir $STATE --log-level ${LOGLEVEL:-info} >> "$OUT/lvmirrord.log" 2>&1 &
  DAEMON=$!
  wait_bus_name org.lvmirror1 $DAEMON
}

tcli() { targetcli >> "$OUT/targetcli.log" 2>&1; }

# The open-iscsi side; TARGET defaults to the lab's $IQN (bench/lab-bench.sh uses its own).
lun_dev() {  # lun_dev LUN [TARGET] -> /dev/sdX of the open-iscsi session
  readlink -f /dev/disk/by-path/ip-127.0.0.1:3260-iscsi-${2:-$IQN}-lun-$1
}

login() {  # login [TARGET]
  pidof iscsid >/dev/null || { iscsid; sleep 1; }
  iscsiadm -m discovery -t sendtargets -p 127.0.0.1 >/dev/null &&
  iscsiadm -m node -T ${1:-$IQN} -p 127.0.0.1 --login >/dev/null
  udevadm settle 2>/dev/null; sleep 1
}
logout() { iscsiadm -m node -T ${1:-$IQN} -p 127.0.0.1 --logout >/dev/null 2>&1; udevadm settle 2>/dev/null; }
rescan() { iscsiadm -m session --rescan >/dev/null 2>&1; udevadm settle 2>/dev/null; sleep 1; }
fio_verify_load() {  # fio_verify_load NAME DEV SIZE OFFSET [FIO-OPTION ...]: in the background (FIO),
  local name=$1 dev=$2 size=$3 offset=$4; shift 4   # 4 KiB random writes, CRC-checked when they end
  fio --name=$name --filename=$dev --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=8 \
      --size=$size --offset=$offset --verify=crc32c --do_verify=1 --verify_fatal=1 "$@" \
      --output-format=json > "$OUT/fio-$name.json" 2> "$OUT/fio-$name.err" &
  FIO=$!
}

# ---------------------------------------------------------------- sections
basic() {
  if start_daemon; then result daemon_started ok; else result daemon_started fail log="$(tail -5 $OUT/lvmirrord.log)"; return; fi
  # Stock targetcli: the backstore type is listed from our D-Bus service, a bad cfgstring is
  # refused with our message, good ones create mirrored LUNs (2 and 3 images) next to a fileio.
  out=$(printf '%s\n' "set global auto_save_on_exit=false" "ls /backstores" \
        "/backstores/user:lvmirror create name=bad size=64M cfgstring=vol9;colour=blue" | targetcli 2>&1)
  echo "$out" >> "$OUT/targetcli.log"
  echo "$out" | grep -q "user:lvmirror" && result targetcli_lists_user_lvmirror ok || result targetcli_lists_user_lvmirror fail
  echo "$out" | grep -q "unknown option 'colour'" && result targetcli_refuses_bad_cfgstring ok || result targetcli_refuses_bad_cfgstring fail out="$(echo "$out" | tail -2)"
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=m2 size=256M cfgstring=vol2;images=/run/scratch/v2a.img+/run/scratch/v2b.img control=nl_reply_supported=-1
/backstores/user:lvmirror create name=m3 size=256M cfgstring=vol3;images=/run/scratch/v3a.img+/run/scratch/v3b.img+/run/scratch/v3c.img;region_size=256K control=nl_reply_supported=-1
/backstores/fileio create name=f0 file_or_dev=/run/scratch/f0.img size=256M write_back=false
/iscsi create $IQN
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/m2
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/m3
/iscsi/$IQN/tpg1/luns create /backstores/fileio/f0
/iscsi/$IQN/tpg1 set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1
TC
  sleep 1
  lvmirror status > "$OUT/status-basic.txt" 2>&1
  grep -q "volume vol2" "$OUT/status-basic.txt" && grep -q "volume vol3" "$OUT/status-basic.txt" \
    && result luns_created ok || result luns_created fail status="$(cat $OUT/status-basic.txt | head -5)"
  inq=$(iscsi-inq iscsi://127.0.0.1/$IQN/0 2>&1)
  echo "$inq" | grep -q "lvmirror" && result libiscsi_inquiry ok || result libiscsi_inquiry fail out="$(echo "$inq" | head -3)"
  cap=$(iscsi-readcapacity16 iscsi://127.0.0.1/$IQN/1 2>&1 | grep 'Total size')
  echo "$cap" | grep -q 268435456 && result libiscsi_readcapacity ok out="$cap" || result libiscsi_readcapacity fail out="$cap"
  # wait for the initial full resyncs so the mirrors are complete
  lvmirror wait vol2 --timeout 300; lvmirror wait vol3 --timeout 300
  login || result open_iscsi_login fail
  d0=$(lun_dev 0); d1=$(lun_dev 1)
  [ -b "$d0" ] && [ -b "$d1" ] && result open_iscsi_login ok dev0=$d0 dev1=$d1 || result open_iscsi_login fail
  dd if=/dev/urandom of=/run/pat bs=1M count=8 status=none
  if dd if=/run/pat of=$d0 bs=1M oflag=direct status=none && cmp -n 8388608 /run/pat $d0; then
    result dd_write_readback ok; else result dd_write_readback fail; fi
  # SCSI-3 persistent reservations (the fencing of Windows failover clusters, VMware, pacemaker):
  # LIO's core serves them for TCMU LUNs and keeps their state in <dbroot>/pr, which the package's
  # tmpfiles entry provides. Register a key, reserve Write Exclusive - Registrants Only, read both
  # back, release and unregister.
  if sg_persist -n -o -G -S 0xabc123 $d0 > "$OUT/pr.txt" 2>&1 \
     && sg_persist -n -o -R -K 0xabc123 -T 5 $d0 >> "$OUT/pr.txt" 2>&1 \
     && sg_persist -n -i -k $d0 >> "$OUT/pr.txt" 2>&1 && grep -q 0xabc123 "$OUT/pr.txt" \
     && sg_persist -n -i -r $d0 >> "$OUT/pr.txt" 2>&1 && grep -qi "registrants only" "$OUT/pr.txt" \
     && sg_persist -n -o -L -K 0xabc123 -T 5 $d0 >> "$OUT/pr.txt" 2>&1 \
     && sg_persist -n -o -G -K 0xabc123 -S 0 $d0 >> "$OUT/pr.txt" 2>&1; then
    result persistent_reservation ok dbroot="$(cat /sys/kernel/config/target/dbroot 2>/dev/null)"
  else
    result persistent_reservation fail out="$(tail -2 $OUT/pr.txt)" dbroot="$(cat /sys/kernel/config/target/dbroot 2>/dev/null)"
  fi
  touch "$OUT/target-ready"          # the host may now use the portal through hostfwd
}

fs() {   # a file system on each mirrored LUN: images identical afterwards
  for lun in 0 1; do
    d=$(lun_dev $lun); vol=$([ $lun = 0 ] && echo vol2 || echo vol3)
    if mkfs.ext4 -q -F $d && mkdir -p /run/mnt/l$lun && mount $d /run/mnt/l$lun &&
       cp -r $REPO/lvmirror /run/mnt/l$lun/ && dd if=/dev/urandom of=/run/mnt/l$lun/blob bs=1M count=20 status=none &&
       (cd /run/mnt/l$lun && find . -type f -exec md5sum {} + | sort -k2 > /run/sums-$lun) && umount /run/mnt/l$lun; then
      result fs_lun${lun}_written ok files=$(wc -l < /run/sums-$lun)
    else
      result fs_lun${lun}_written fail
    fi
    fsck.ext4 -f -n $d > "$OUT/fsck-l$lun.txt" 2>&1 && result fs_lun${lun}_fsck_clean ok || result fs_lun${lun}_fsck_clean fail out="$(tail -3 $OUT/fsck-l$lun.txt)"
    mount -o ro $d /run/mnt/l$lun && (cd /run/mnt/l$lun && md5sum -c --quiet /run/sums-$lun) && result fs_lun${lun}_files_intact ok || result fs_lun${lun}_files_intact fail
    umount /run/mnt/l$lun 2>/dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches
    imgs=$(ls /run/scratch/v${vol#vol}?.img | tr '\n' ' ')
    first=$(echo $imgs | cut -d' ' -f1); same=ok; n=0
    for i in $imgs; do n=$((n+1)); cmp -s $first $i || same=fail; done
    [ $n -ge 2 ] || same=fail
    result fs_lun${lun}_images_identical $same images="$imgs"
  done
}

split() {   # split under load, the point-in-time copy, export it, resync under load
  d=$(lun_dev 1)
  # 1. writes acknowledged before the split are in the split image; writes after are not
  $PY - $d before <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
import mmap
buf = mmap.mmap(-1, 1 << 20); buf.write(b"BEFORE-SPLIT".ljust(4096, b".") * 256)
os.pwrite(fd, buf, 64 << 20); os.close(fd)
PY
  lvmirror split vol3 2 > "$OUT/split.txt" 2>&1 && result split_command ok out="$(cat $OUT/split.txt)" || result split_command fail out="$(cat $OUT/split.txt)"
  $PY - $d after <<'PY'
import os, sys, mmap
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 20); buf.write(b"AFTER-SPLIT!".ljust(4096, b".") * 256)
os.pwrite(fd, buf, 64 << 20); os.close(fd)
PY
  pit=$(dd if=/run/scratch/v3c.img bs=1M skip=64 count=1 status=none | head -c 12)
  live=$(dd if=/run/scratch/v3a.img bs=1M skip=64 count=1 status=none | head -c 12)
  [ "$pit" = "BEFORE-SPLIT" ] && [ "$live" = "AFTER-SPLIT!" ] && result split_point_in_time ok pit="$pit" live="$live" || result split_point_in_time fail pit="$pit" live="$live"
  lvmirror status > "$OUT/status-split.txt"
  grep -q "image 2: split" "$OUT/status-split.txt" && grep -q "image 1: in-sync" "$OUT/status-split.txt" \
    && result three_way_split_stays_mirrored ok || result three_way_split_stays_mirrored fail
  # 2. the split image as its own LUN: the file system on it mounts and fscks clean
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=snap size=256M cfgstring=vol3;image=2 control=nl_reply_supported=-1
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/snap
TC
  rescan; ds=$(lun_dev 3)
  if [ -b "$ds" ]; then
    fsck.ext4 -f -p $ds > "$OUT/fsck-snap.txt" 2>&1; rc=$?
    [ $rc -le 1 ] && mkdir -p /run/mnt/snap && mount -o ro $ds /run/mnt/snap && (cd /run/mnt/snap && md5sum -c --quiet /run/sums-1) \
      && result split_image_lun_mounts_fsck_clean ok || result split_image_lun_mounts_fsck_clean fail rc=$rc
    umount /run/mnt/snap 2>/dev/null
  else result split_image_lun_mounts_fsck_clean fail reason="no device for LUN 3"; fi
  lvmirror resync vol3 2 > "$OUT/resync-refused.txt" 2>&1 && result resync_refused_while_exported fail \
    || (grep -q exported "$OUT/resync-refused.txt" && result resync_refused_while_exported ok || result resync_refused_while_exported fail out="$(cat $OUT/resync-refused.txt)")
  iscsiadm -m node -T $IQN -p 127.0.0.1 --logout >/dev/null 2>&1
  tcli <<TC
/iscsi/$IQN/tpg1/luns delete lun3
/backstores/user:lvmirror delete snap
TC
  login; d=$(lun_dev 1)
  # 3. fio with verification while the image is resynced back, then split again under load
  fio_verify_load resync $d 48M 128M --runtime=25 --time_based=0
  sleep 3
  lvmirror resync vol3 2 --wait > "$OUT/resync.txt" 2>&1; rrc=$?
  sleep 2
  targetcli-lvmirror /backstores/user:lvmirror/m3 split image=1 > "$OUT/split2.txt" 2>&1; src=$?
  wait $FIO; frc=$?
  [ $rrc = 0 ] && [ $src = 0 ] && [ $frc = 0 ] && result fio_verify_through_resync_and_split ok \
    || result fio_verify_through_resync_and_split fail resync=$rrc split=$src fio=$frc err="$(tail -3 $OUT/fio-resync.err)"
  grep -q "split at" "$OUT/split2.txt" && result targetcli_ext_split ok || result targetcli_ext_split fail out="$(tail -2 $OUT/split2.txt)"
  targetcli-lvmirror /backstores/user:lvmirror/m3 status > "$OUT/targetcli-status.txt" 2>&1
  grep -q "image 1: split" "$OUT/targetcli-status.txt" && result targetcli_ext_status ok || result targetcli_ext_status fail out="$(tail -3 $OUT/targetcli-status.txt)"
  # backup of the split image (the frozen copy) while the LUN runs: identical to the image
  lvmirror backup vol3 1 /run/scratch/backup.img > "$OUT/backup.txt" 2>&1 && cmp -s /run/scratch/backup.img /run/scratch/v3b.img \
    && result backup_of_split_image ok || result backup_of_split_image fail out="$(tail -2 $OUT/backup.txt)"
  targetcli-lvmirror /backstores/user:lvmirror/m3 resync image=1 wait=true >> "$OUT/resync.txt" 2>&1
  lvmirror status > "$OUT/status-after-resync.txt"
  sync; echo 3 > /proc/sys/vm/drop_caches
  same=ok; for i in b c; do cmp -s /run/scratch/v3a.img /run/scratch/v3$i.img || same=fail; done
  result resync_images_identical $same
}

crash() {   # SIGKILL lvmirrord under load, restart it: the initiator recovers, nothing acked lost
  d=$(lun_dev 0)
  fio_verify_load crash $d 32M 64M
  sleep 4
  kill -9 $DAEMON; wait $DAEMON 2>/dev/null
  sleep 2
  start_daemon && result daemon_restarted ok || result daemon_restarted fail
  wait $FIO; frc=$?
  [ $frc = 0 ] && result sigkill_fio_verify_ok ok || result sigkill_fio_verify_ok fail fio=$frc err="$(tail -3 $OUT/fio-crash.err)"
  sync; echo 3 > /proc/sys/vm/drop_caches
  cmp -s /run/scratch/v2a.img /run/scratch/v2b.img && result sigkill_images_agree ok || result sigkill_images_agree fail
}

compliance() {   # libiscsi's SCSI compliance suite: lvmirror 2-image LUN vs LIO fileio
  for lun in 0 2; do
    name=$([ $lun = 0 ] && echo lvmirror || echo fileio)
    timeout 900 iscsi-test-cu -d -t SCSI iscsi://127.0.0.1/$IQN/$lun > "$OUT/compliance-$name.txt" 2>&1
    summary=$(grep -E '^ +tests' "$OUT/compliance-$name.txt" | head -1 | tr -s ' ')
    [ -n "$summary" ] && result compliance_ran_$name ok tests="$summary" || result compliance_ran_$name fail
  done
}

bench() {   # the side-by-side benchmark (bench/run): lvmirror vs md RAID1 + iblock vs fileio
  . "$REPO/bench/lab-bench.sh"
  bench_main
}

saveconfig() {   # targetcli-lvmirror saveconfig / clearconfig / restoreconfig round trip
  local saved=/run/scratch/saveconfig.json d sum0 sum1 nl
  d=$(lun_dev 1); sum0=$(dd if=$d bs=1M count=32 iflag=direct status=none | md5sum)
  targetcli-lvmirror saveconfig $saved > "$OUT/saveconfig.txt" 2>&1
  $PY - $saved > "$OUT/saveconfig-control.txt" 2>&1 <<'PY'
import json, sys
for so in json.load(open(sys.argv[1]))["storage_objects"]:
    if so.get("plugin") == "user":
        print(so["name"], so.get("config"), so.get("hw_max_sectors"), so.get("control"))
PY
  grep -q "^m2 lvmirror/vol2.*nl_reply_supported=-1" "$OUT/saveconfig-control.txt" \
    && result saveconfig_keeps_nl_reply_supported ok out="$(head -1 $OUT/saveconfig-control.txt)" \
    || result saveconfig_keeps_nl_reply_supported fail out="$(cat $OUT/saveconfig-control.txt)"
  logout
  printf '%s\n' "set global auto_save_on_exit=false" "clearconfig confirm=true" | targetcli >> "$OUT/targetcli.log" 2>&1
  sleep 1
  lvmirror status > "$OUT/status-cleared.txt" 2>&1
  printf '%s\n' "set global auto_save_on_exit=false" "restoreconfig $saved" | targetcli-lvmirror >> "$OUT/targetcli.log" 2>&1
  sleep 1
  nl=$(cat /sys/kernel/config/target/core/user_*/m2/attrib/nl_reply_supported 2>/dev/null | head -1)
  lvmirror status > "$OUT/status-restored.txt" 2>&1
  login; d=$(lun_dev 1)
  sum1=$( [ -b "$d" ] && dd if=$d bs=1M count=32 iflag=direct status=none | md5sum)
  ! grep -q "volume vol2" "$OUT/status-cleared.txt" && grep -q "volume vol2" "$OUT/status-restored.txt" \
    && grep -q "volume vol3" "$OUT/status-restored.txt" && [ "$nl" = -1 ] && [ "$sum0" = "$sum1" ] \
    && result restoreconfig_brings_luns_back ok nl_reply_supported=$nl \
    || result restoreconfig_brings_luns_back fail nl_reply_supported="$nl" same_data=$([ "$sum0" = "$sum1" ] && echo yes || echo no) status="$(head -3 $OUT/status-restored.txt)"
}

dbus() {   # lvmirror's D-Bus API on the real system bus: busctl, the policy, external region locks
  local vp=/org/lvmirror1/volume/vol2 out nobody="setpriv --reuid=65534 --regid=65534 --clear-groups"
  busctl --system tree org.lvmirror1 > "$OUT/busctl-tree.txt" 2>&1
  busctl --system introspect org.lvmirror1 /org/lvmirror1/volume/vol3 > "$OUT/busctl-introspect.txt" 2>&1
  grep -q "$vp" "$OUT/busctl-tree.txt" && grep -q "^\.Split *method" "$OUT/busctl-introspect.txt" \
    && grep -q "^\.Images *property *a(usstddts)" "$OUT/busctl-introspect.txt" \
    && result busctl_shows_volume_objects ok || result busctl_shows_volume_objects fail out="$(head -5 $OUT/busctl-tree.txt)"
  # not root: may read the volume's properties, may not change anything
  out=$($nobody busctl --system get-property org.lvmirror1 $vp org.lvmirror1.Volume Images 2>&1)
  echo "nobody get-property Images: $out" >> "$OUT/busctl-nobody.txt"
  echo "$out" | grep -q '^a(usstddts) 2 ' && result unprivileged_reads_status ok || result unprivileged_reads_status fail out="$out"
  out=$($nobody busctl --system call org.lvmirror1 $vp org.lvmirror1.Volume DetachImage u 9 2>&1)
  echo "nobody DetachImage: $out" >> "$OUT/busctl-nobody.txt"
  out2=$($nobody busctl --system call org.lvmirror1 /org/lvmirror1 org.lvmirror1.Manager LockRegion sttbd vol2 0 8 false 1 2>&1)
  echo "nobody LockRegion: $out2" >> "$OUT/busctl-nobody.txt"
  echo "$out" | grep -qi "access denied\|rejected" && echo "$out2" | grep -qi "access denied\|rejected" \
    && result unprivileged_change_refused ok out="$out" || result unprivileged_change_refused fail out="$out" lock="$out2"
  # an external holder (a backup agent) locks LBAs 2048..2055 of vol2: an initiator write there
  # waits; the holder dies without unlocking and the write goes through
  /usr/bin/python3 - > "$OUT/lock-holder.txt" 2>&1 <<'PY' &
import dbus, sys, time
bus = dbus.SystemBus()
mgr = dbus.Interface(bus.get_object("org.lvmirror1", "/org/lvmirror1"), "org.lvmirror1.Manager")
print("lock", int(mgr.LockRegion("vol2", 2048, 8, False, 10.0)), flush=True)
time.sleep(600)
PY
  local holder=$! d=$(lun_dev 0) w listed
  for i in $(seq 50); do grep -q "^lock" "$OUT/lock-holder.txt" && break; sleep 0.2; done
  listed=$(busctl --system call org.lvmirror1 /org/lvmirror1 org.lvmirror1.Manager ListLocks s vol2 2>&1)
  echo "ListLocks: $listed" >> "$OUT/lock-holder.txt"
  head -c 4096 /dev/urandom > /run/lockpat
  timeout 60 dd if=/run/lockpat of=$d bs=4096 seek=256 count=1 oflag=direct status=none & w=$!
  sleep 3
  if kill -0 $w 2>/dev/null; then waited=yes; else waited=no; fi
  listed2=$(busctl --system call org.lvmirror1 /org/lvmirror1 org.lvmirror1.Manager ListLocks s vol2 2>&1)
  echo "ListLocks with a waiter: $listed2" >> "$OUT/lock-holder.txt"
  kill $holder; wait $holder 2>/dev/null
  wait $w; wrc=$?
  [ "$waited" = yes ] && echo "$listed" | grep -q "D-Bus :" && echo "$listed2" | grep -q "waiters[^]]*initiator I/O" && result external_lock_blocks_initiator_io ok \
    || result external_lock_blocks_initiator_io fail waited=$waited listed="$listed"
  [ $wrc = 0 ] && cmp -s /run/lockpat <(dd if=$d bs=4096 skip=256 count=1 iflag=direct status=none) \
    && result lock_released_when_holder_leaves ok || result lock_released_when_holder_leaves fail dd=$wrc
}

tcmurunner() {   # tcmu-runner owns org.kernel.TCMUService1: lvmirrord registers with its HandlerManager1
  local runner out st
  command -v tcmu-runner >/dev/null || { result lvmirrord_registers_with_tcmu_runner fail reason="tcmu-runner not installed"; return; }
  logout
  kill $DAEMON; wait $DAEMON 2>/dev/null
  tcmu-runner --debug > "$OUT/tcmu-runner.log" 2>&1 & runner=$!
  wait_bus_name org.kernel.TCMUService1 $runner
  start_daemon && grep -q "registered handler lvmirror with tcmu-runner" "$OUT/lvmirrord.log" \
    && result lvmirrord_registers_with_tcmu_runner ok \
    || result lvmirrord_registers_with_tcmu_runner fail log="$(tail -3 $OUT/lvmirrord.log)"
  # the stock targetcli, through tcmu-runner: lists user:lvmirror, tcmu-runner forwards CheckConfig
  # to lvmirrord (our message for a bad cfgstring), a new LUN is served by lvmirrord
  out=$(printf '%s\n' "set global auto_save_on_exit=false" "ls /backstores" \
        "/backstores/user:lvmirror create name=bad size=64M cfgstring=volr;colour=blue" \
        "/backstores/user:lvmirror create name=rr size=64M cfgstring=volr;images=/run/scratch/ra.img+/run/scratch/rb.img control=nl_reply_supported=-1" \
        "/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/rr" | targetcli 2>&1)
  echo "$out" >> "$OUT/targetcli.log"
  sleep 2
  lvmirror wait volr --timeout 120 > /dev/null 2>&1
  login
  d=$(lun_dev 3)
  head -c 1048576 /dev/urandom > /run/rrpat
  st=fail
  [ -b "$d" ] && dd if=/run/rrpat of=$d bs=1M oflag=direct status=none && cmp -n 1048576 /run/rrpat $d && st=ok
  echo "$out" | grep -q "user:lvmirror" && echo "$out" | grep -q "unknown option 'colour'" && [ $st = ok ] \
    && lvmirror status | grep -q "volume volr" \
    && result targetcli_through_tcmu_runner ok dev=$d \
    || result targetcli_through_tcmu_runner fail dev="$d" io=$st out="$(echo "$out" | tail -3)" runner="$(tail -2 $OUT/tcmu-runner.log)"
  # tcmu-runner restarts (as systemd would restart it): lvmirrord registers again by itself
  kill $runner; wait $runner 2>/dev/null
  tcmu-runner --debug >> "$OUT/tcmu-runner.log" 2>&1 & runner=$!
  for i in $(seq 100); do grep -q "with the restarted tcmu-runner" "$OUT/lvmirrord.log" && break; sleep 0.2; done
  out=$(printf '%s\n' "set global auto_save_on_exit=false" "ls /backstores" | targetcli 2>&1)
  echo "$out" >> "$OUT/targetcli.log"
  grep -q "with the restarted tcmu-runner" "$OUT/lvmirrord.log" && echo "$out" | grep -q "user:lvmirror" \
    && result reregisters_when_tcmu_runner_restarts ok \
    || result reregisters_when_tcmu_runner_restarts fail log="$(tail -2 $OUT/lvmirrord.log)"
  logout
  printf '%s\n' "set global auto_save_on_exit=false" "/iscsi/$IQN/tpg1/luns delete lun3" \
    "/backstores/user:lvmirror delete rr" | targetcli >> "$OUT/targetcli.log" 2>&1
  kill $runner; wait $runner 2>/dev/null
  login
}

say() { echo "| $*"; }
demo() {   # the product's main job, narrated (tools/demo)
  d=$(lun_dev 1)
  say "LUN 1 is user:lvmirror backstore m3: volume vol3 on three images, seen by open-iscsi as $d"
  lvmirror status | sed 's/^/|   /'
  say "writing 'generation 1' through iSCSI, then starting a random-write load (fio)"
  echo "generation 1 $(date -u +%T)" | dd of=$d bs=512 seek=200000 conv=sync oflag=direct status=none
  fio --name=load --filename=$d --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=8 \
      --size=32M --offset=160M --runtime=20 --time_based --output-format=terse > "$OUT/demo-fio.txt" 2>&1 &
  FIO=$!; sleep 4
  say "split image 2 off under load (new I/O is never paused):"
  lvmirror split vol3 2 | sed 's/^/|   /'
  echo "generation 2 $(date -u +%T)" | dd of=$d bs=512 seek=200000 conv=sync oflag=direct status=none
  say "the live LUN now reads:           $(dd if=$d bs=512 skip=200000 count=1 iflag=direct status=none | head -c 30)"
  say "the point-in-time copy (image 2): $(dd if=/run/scratch/v3c.img bs=512 skip=200000 count=1 status=none | head -c 30)"
  lvmirror status | sed 's/^/|   /'
  wait $FIO
  say "load done ($(cut -d';' -f49 $OUT/demo-fio.txt 2>/dev/null) write IOPS under TCG emulation); resync image 2 (only changed regions):"
  lvmirror resync vol3 2 --wait | sed 's/^/|   /'
  lvmirror status | sed 's/^/|   /'
  sync; echo 3 > /proc/sys/vm/drop_caches
  cmp -s /run/scratch/v3a.img /run/scratch/v3c.img && say "images 0 and 2 are identical again" || say "IMAGES DIFFER"
  result demo_completed ok
}

# ---------------------------------------------------------------- systemd (lab/boot --systemd)
unit_prop() { systemctl show -P $1 lvmirrord.service; }   # unit_prop PROPERTY
wait_active() {  # wait_active OLDPID SECONDS: echo the MainPID once lvmirrord.service is active
  local i pid   # with a main process other than OLDPID
  for i in $(seq $(( $2 * 5 ))); do
    pid=$(unit_prop MainPID)
    [ "$(unit_prop ActiveState)" = active ] && [ "$pid" != 0 ] && [ "$pid" != "$1" ] && { echo $pid; return 0; }
    sleep 0.2
  done
  return 1
}
bus_owner_pid() {  # bus_owner_pid NAME: the process that owns NAME on the system bus
  busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
    GetConnectionUnixProcessID s $1 2>/dev/null | awk '{print $2}'
}
journal() { journalctl --no-pager -o cat "$@" 2>/dev/null; }

systemd() {  # the packaged lvmirrord.service with systemd as PID 1: installed and started by dpkg,
             # serving under its hardening, restarted after SIGKILL, stopped cleanly, D-Bus-activated
  local virt container pid pid2 pid3 en owner tcmu d sum0 sum1 n n0 frc rc exposure
  virt=$(systemd-detect-virt); container=$(systemd-detect-virt --container)
  systemctl --failed --no-legend --plain > "$OUT/systemd-failed.txt" 2>&1
  [ -n "$UNDER_SYSTEMD" ] && [ "$container" = none ] && [ "$virt" != none ] \
    && result systemd_is_pid1 ok virt=$virt state="$(systemctl is-system-running)" \
    || result systemd_is_pid1 fail comm="$(cat /proc/1/comm)" virt=$virt container=$container
  [ -n "${DEB:-}" ] || { result service_started_by_package fail reason="no package in build/deb"; return; }

  # 1. dpkg -i (setup) enabled and started the unit: Type=notify, so active means READY=1 was sent
  #    the first time: no failed start before it (NRestarts=0; the postinst makes the bus read
  #    the package's policy before it starts the unit)
  pid=$(wait_active 0 30); en=$(systemctl is-enabled lvmirrord.service 2>&1)
  owner=$(bus_owner_pid org.lvmirror1); tcmu=$(bus_owner_pid org.kernel.TCMUService1)
  n0=$(unit_prop NRestarts)
  [ -n "$pid" ] && [ "$en" = enabled ] && [ "$owner" = "$pid" ] && [ "$tcmu" = "$pid" ] && [ "$n0" = 0 ] \
    && result service_started_by_package ok pid=$pid enabled=$en \
    || result service_started_by_package fail pid=$pid enabled=$en owner=$owner tcmu=$tcmu restarts=$n0 \
              journal="$(journal -u lvmirrord.service | grep -m3 -iE 'error|denied|failed')"
  systemd-analyze security lvmirrord.service --no-pager > "$OUT/systemd-security.txt" 2>&1

  # 2. under the unit's hardening: configfs, uio, netlink, images, state in /var/lib/lvmirror, a
  #    qcow2 backup of the split image (qemu-img) that only its owner can read
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=s3 size=128M cfgstring=svc;images=/run/scratch/s3a.img+/run/scratch/s3b.img+/run/scratch/s3c.img control=nl_reply_supported=-1
/iscsi create $IQN
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/s3
/iscsi/$IQN/tpg1 set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1
TC
  lvmirror wait svc --timeout 300 > /dev/null 2>&1
  login; d=$(lun_dev 0)
  dd if=/dev/urandom of=/run/pat-svc bs=1M count=8 status=none
  exposure=$(tail -1 "$OUT/systemd-security.txt" | sed 's/.*: //')
  if [ -b "$d" ] && dd if=/run/pat-svc of=$d bs=1M oflag=direct status=none && cmp -n 8388608 /run/pat-svc $d \
     && lvmirror split svc 2 > "$OUT/svc-split.txt" 2>&1 && ls /var/lib/lvmirror/ | grep -q . \
     && lvmirror backup svc 2 /run/scratch/svc-backup.qcow2 --format qcow2 >> "$OUT/svc-split.txt" 2>&1 \
     && qemu-img compare -f raw -F qcow2 /run/scratch/s3c.img /run/scratch/svc-backup.qcow2 >> "$OUT/svc-split.txt" 2>&1 \
     && stat -c 'backup mode %a' /run/scratch/svc-backup.qcow2 | tee -a "$OUT/svc-split.txt" | grep -q ' 600$' \
     && lvmirror resync svc 2 --wait >> "$OUT/svc-split.txt" 2>&1; then
    result service_serves_lun_under_hardening ok dev=$d exposure="$exposure" state_dir="$(ls /var/lib/lvmirror | tr '\n' ' ')" \
           backup="$(stat -c '%a %s' /run/scratch/svc-backup.qcow2)"
  else
    result service_serves_lun_under_hardening fail dev=$d out="$(tail -3 $OUT/svc-split.txt 2>/dev/null)" \
           journal="$(journal -u lvmirrord.service -n 5)"
  fi

  # 3. SIGKILL under a verifying write load: systemd restarts it (Restart=on-failure), the
  #    initiator's I/O resumes and every acknowledged write reads back
  fio_verify_load svc-kill $d 16M 32M
  sleep 3
  pid=$(unit_prop MainPID); kill -9 $pid
  pid2=$(wait_active $pid 60)
  wait $FIO; frc=$?
  n=$(unit_prop NRestarts)
  [ -n "$pid2" ] && [ "$n" = $(( ${n0:-0} + 1 )) ] && [ $frc = 0 ] \
    && result service_restarted_after_sigkill ok killed=$pid new=$pid2 restarts=$n \
    || result service_restarted_after_sigkill fail killed=$pid new=$pid2 restarts=$n fio=$frc \
              err="$(tail -2 $OUT/fio-svc-kill.err)"

  # 4. systemctl stop: SIGTERM drains and closes the volumes; the unit ends with Result=success
  sum0=$(dd if=$d bs=1M count=48 iflag=direct status=none | md5sum)
  logout
  systemctl stop lvmirrord.service; rc=$?
  [ $rc = 0 ] && [ "$(unit_prop ActiveState)" = inactive ] && [ "$(unit_prop Result)" = success ] \
    && journal -u lvmirrord.service | grep -q "shutting down" \
    && result service_stops_cleanly ok \
    || result service_stops_cleanly fail rc=$rc state="$(unit_prop ActiveState)" result="$(unit_prop Result)"

  # 5. D-Bus activation: the first call to org.lvmirror1 starts the unit through systemd, and the
  #    LUN it picks up again serves the same data
  lvmirror status > "$OUT/svc-activated.txt" 2>&1; rc=$?
  pid3=$(wait_active 0 30)
  login; d=$(lun_dev 0)
  sum1=$(dd if=$d bs=1M count=48 iflag=direct status=none | md5sum)
  [ $rc = 0 ] && [ -n "$pid3" ] && grep -q "volume svc" "$OUT/svc-activated.txt" \
    && journal -u dbus.service | grep -q "Activating via systemd: service name='org.lvmirror1'" \
    && [ "$sum0" = "$sum1" ] \
    && result service_dbus_activated ok pid=$pid3 \
    || result service_dbus_activated fail rc=$rc pid=$pid3 out="$(head -3 $OUT/svc-activated.txt)" same_data=$([ "$sum0" = "$sum1" ] && echo yes || echo no)
  logout
  journal -u lvmirrord.service > "$OUT/lvmirrord-journal.log"
  journal -u dbus.service > "$OUT/dbus-journal.log"
}

t "guest script start: sections $SECTIONS"
: > "$OUT/results.jsonl"
setup
for s in $SECTIONS; do t "section $s"; $s; done
logout
[ -z "${DAEMON:-}" ] || { kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null; }
t "guest script end"
touch "$OUT/guest-done"
