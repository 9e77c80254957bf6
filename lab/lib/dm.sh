# lab/lib/dm.sh: device-mapper fault injection (the faults section), as lvm2's test/lib/aux does it
# (error_dev, writeerror_dev, delay_dev, disable_dev/enable_dev, dropwrites_dev): each disk is a
# dm device /dev/mapper/NAME over a loop device on /run/dm-NAME.img (the guest's tmpfs), its
# table switched with dmsetup suspend/load/resume between linear (healthy), error, flakey and
# delay. Sourced by lab/guest.sh. Tables are in 512-byte sectors.
dm_loop() {  # dm_loop NAME: the loop device under /dev/mapper/NAME
  losetup -j /run/dm-$1.img | cut -d: -f1 | head -1
}

dm_sectors() {  # dm_sectors NAME: the size of NAME's loop device in sectors
  blockdev --getsz "$(dm_loop $1)"
}

dm_init() {  # dm_init NAME SIZE_MB: a loop device on a fresh /run/dm-NAME.img under a linear /dev/mapper/NAME
  local loop
  modprobe dm_mod; modprobe dm_flakey; modprobe dm_delay
  rm -f /run/dm-$1.img; truncate -s ${2}M /run/dm-$1.img
  loop=$(losetup -f --show /run/dm-$1.img) || return 1
  echo "0 $(blockdev --getsz $loop) linear $loop 0" | dmsetup create $1 || return 1
  udevadm settle 2>/dev/null
  [ -b /dev/mapper/$1 ]
}

dm_load() {  # dm_load NAME < TABLE: switch NAME to the table on stdin (suspend, load, resume); /run/dm.t0: when the resume began
  local rc=0
  dmsetup suspend $1 || return 1
  dmsetup load $1 || rc=1
  date +%s.%N > /run/dm.t0
  dmsetup resume $1 || rc=1
  return $rc
}

dm_linear() {  # dm_linear NAME: healthy again (the whole loop device, linear); creates NAME if it is gone
  local loop=$(dm_loop $1) s=$(dm_sectors $1)
  if dmsetup info $1 >/dev/null 2>&1; then
    echo "0 $s linear $loop 0" | dm_load $1
  else
    echo "0 $s linear $loop 0" | dmsetup create $1 && udevadm settle 2>/dev/null
  fi
}

dm_error() {  # dm_error NAME: every read and write fails (EIO): a dead disk
  echo "0 $(dm_sectors $1) error" | dm_load $1
}

dm_error_range() {  # dm_error_range NAME START LEN: reads and writes of sectors START..START+LEN-1 fail
  local loop=$(dm_loop $1) s=$(dm_sectors $1) end=$(( $2 + $3 ))
  { [ $2 -gt 0 ] && echo "0 $2 linear $loop 0"
    echo "$2 $3 error"
    [ $end -lt $s ] && echo "$end $(( s - end )) linear $loop $end"; } | dm_load $1
}

dm_flakey() {  # dm_flakey NAME FEATURE: dm-flakey down all the time with FEATURE (error_writes | drop_writes)
  local loop=$(dm_loop $1)   # reads pass through to the disk; writes fail or vanish
  echo "0 $(dm_sectors $1) flakey $loop 0 0 3600 1 $2" | dm_load $1
}

dm_delay() {  # dm_delay NAME READ_MS WRITE_MS: dm-delay, every read and write held that long (a slow disk)
  local loop=$(dm_loop $1)
  echo "0 $(dm_sectors $1) delay $loop 0 $2 $loop 0 $3" | dm_load $1
}

dm_remove() {  # dm_remove NAME: dmsetup remove --force (an open device keeps its node with an error table)
  dmsetup remove --force $1 2>&1
  udevadm settle 2>/dev/null
}

dm_target() {  # dm_target NAME: the targets of NAME's current table ("linear", "error", "linear error linear", ...)
  dmsetup table $1 2>/dev/null | awk '{print $3}' | xargs
}
