# lab/scenarios/split.sh: section "split" (point-in-time semantics, split image as a LUN, resync under load).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
split() {   # split under load, the point-in-time copy, export it, resync under load
  local i
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

