# lab/scenarios/demo.sh: section "demo" (tools/demo, narrated).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
say() { echo "| $*"; }
vstatus() {  # vstatus: `lvmirror status` of the demo's volume only (vol3), indented
  lvmirror status | awk '/^volume /{show = ($2 == "vol3:")} /^LUN /{show = 0} show' | sed 's/^/|   /'
}
demo() {   # the product's main job, narrated (tools/demo)
  d=$(lun_dev 1)
  say "LUN 1 is user:lvmirror backstore m3: volume vol3 on three images, seen by open-iscsi as $d"
  vstatus
  say "writing 'generation 1' through iSCSI, then starting a random-write load (fio)"
  echo "generation 1 $(date -u +'%T UTC')" | dd of=$d bs=512 seek=200000 conv=sync oflag=direct status=none
  fio --name=load --filename=$d --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=8 \
      --size=32M --offset=160M --runtime=20 --time_based --output-format=terse > "$OUT/demo-fio.txt" 2>&1 &
  FIO=$!; sleep 4
  say "split image 2 off under load (new I/O is never paused):"
  local out rc live copy
  out=$(lvmirror split vol3 2 2>&1); rc=$?
  sed 's/^/|   /' <<<"$out"
  [ $rc = 0 ] && result demo_split ok || result demo_split fail rc=$rc out="$(tail -1 <<<"$out")"
  echo "generation 2 $(date -u +'%T UTC')" | dd of=$d bs=512 seek=200000 conv=sync oflag=direct status=none
  live=$(dd if=$d bs=512 skip=200000 count=1 iflag=direct status=none | head -c 12)
  copy=$(dd if=/run/scratch/v3c.img bs=512 skip=200000 count=1 status=none | head -c 12)
  say "the live LUN now reads:           $(dd if=$d bs=512 skip=200000 count=1 iflag=direct status=none | head -c 30)"
  say "the point-in-time copy (image 2): $(dd if=/run/scratch/v3c.img bs=512 skip=200000 count=1 status=none | head -c 30)"
  # the copy holds what was acknowledged before the split, not what was written after it
  [ "$live" = "generation 2" ] && [ "$copy" = "generation 1" ] && result demo_copy_point_in_time ok \
    || result demo_copy_point_in_time fail live="$live" copy="$copy"
  vstatus
  wait $FIO
  local accel=$(cat "$OUT/accel" 2>/dev/null)
  [ "$accel" = tcg ] && accel="TCG software emulation" || accel="${accel:-this accelerator}"
  say "load done ($(cut -d';' -f49 $OUT/demo-fio.txt 2>/dev/null) write IOPS under $accel); resync image 2 (only changed regions):"
  out=$(lvmirror resync vol3 2 --wait 2>&1); rc=$?
  sed 's/^/|   /' <<<"$out"
  [ $rc = 0 ] && result demo_resync ok || result demo_resync fail rc=$rc out="$(tail -1 <<<"$out")"
  vstatus
  sync; echo 3 > /proc/sys/vm/drop_caches
  if cmp -s /run/scratch/v3a.img /run/scratch/v3c.img; then
    say "images 0 and 2 are identical again"; result demo_images_identical ok
  else
    say "IMAGES DIFFER"; result demo_images_identical fail
  fi
}

