# lab/scenarios/fs.sh: section "fs" (ext4 on each mirrored LUN, images identical).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
fs() {   # a file system on each mirrored LUN: images identical afterwards
  local lun i
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

