# lab/scenarios/faults.sh: section "faults" (issue 14: failing, slow, full, vanishing disks).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib (dm.sh: the dm tables).
# Volume vf (LUN 0 of $F_IQN) mirrors two dm devices, /dev/mapper/fa (image 0) and
# /dev/mapper/fb (image 1); volume vs (LUN 1) two sparse 256 MiB files, each on its own
# 96 MiB ext4. For each fault: inject it under a CRC-verified fio load through open-iscsi, then
# report what the initiator saw (fio, the kernel log), how long until `lvmirror --json status`
# showed the image failed, what lvmirrord's log, `lvmirror status` and D-Bus said, heal the
# disk, resync and cmp the two images. Result lines: faults_<fault>_<what>. Faults, in order:
# write_error (dm-flakey error_writes), read_error (dm-error on a range), dropped_writes
# (dm-flakey drop_writes: found by a scrub, figures), removed (dmsetup remove --force), all_failed (both
# images dm-error: MEDIUM ERROR, then NOT READY; a dm-multipath map over the LUN; heal, back
# online), enospc (the file systems under vs full), slow (dm-delay 8 s writes, 5 s initiator
# timeout; last, as a failure there may leave LUN 0 unusable).
F_IQN=iqn.2026-11.org.lvmirror:faults
F_VOL=vf

now() { date +%s.%N; }
since() { awk -v a=$1 -v b=$(date +%s.%N) 'BEGIN { printf "%.1f", b - a }'; }   # since T0: seconds, 0.1 s

fst() {  # fst JQ-FILTER: lvmirrord's status (Manager.Status, what `lvmirror --json status` prints) through jq
  busctl --system --json=short call org.lvmirror1 /org/lvmirror1 org.lvmirror1.Manager Status 2>/dev/null \
    | jq -r '.data[0]' 2>/dev/null | jq -r "$1" 2>/dev/null
}

fst_save() {  # fst_save FILE: lvmirrord's status JSON (Manager.Status, the document `lvmirror --json status` prints) into FILE
  busctl --system --json=short call org.lvmirror1 /org/lvmirror1 org.lvmirror1.Manager Status 2>&1 | jq -r '.data[0]' > "$1" 2>&1
}

f_wait() {  # f_wait T0 SECONDS JQ-CONDITION: poll the status until CONDITION is true; echo seconds since T0 (or "timeout")
  local end=$(( $(date +%s) + $2 ))
  while [ $(date +%s) -lt $end ]; do
    [ "$(fst "$3")" = true ] && { since $1; return 0; }
    sleep 0.2
  done
  echo timeout; return 1
}

f_busy() {  # f_busy KIND N: until the volume's io counter KIND (reads, writes) grew by N: the load is running (60 s)
  local base=$(fst ".volumes.$F_VOL.io.$1") i
  for i in $(seq 300); do
    [ $(( $(fst ".volumes.$F_VOL.io.$1") - base )) -ge $2 ] && return 0
    sleep 0.2
  done
  return 1
}

f_begin() {  # f_begin CASE: mark the kernel log, lvmirrord's log and the D-Bus signals; the case's lines are those after
  F_CASE=$1
  F_UP=$(awk '{print $1}' /proc/uptime)
  F_LOG=$(wc -l < "$OUT/lvmirrord.log")
  F_SIGL=$(wc -l < "$OUT/faults-signals.txt")
  t "faults: $1"
}
f_kernel() { dmesg | awk -F'[][]' -v t=$F_UP '$2 + 0 > t'; }      # the kernel log since f_begin
f_journal() { tail -n +$((F_LOG + 1)) "$OUT/lvmirrord.log"; }       # lvmirrord's log since f_begin
f_signals() { tail -n +$((F_SIGL + 1)) "$OUT/faults-signals.txt"; } # D-Bus signals since f_begin
f_kerr() {  # f_kerr DEV: the kernel's failed-request lines for DEV since f_begin (blk "... error, dev sdX")
  f_kernel | grep -cE "error, dev ${1##*/}\b"
}
f_kabort() {  # f_kabort: SCSI timeouts and aborts, iSCSI connection errors since f_begin
  f_kernel | grep -ciE "abort|timing out|timed out|conn error|connection.*error"
}
f_fio() {  # f_fio NAME: after `wait $FIO` (rc in FIO_RC): FIO_IOERR, FIO_VERR counted from fio's stderr
  FIO_IOERR=$(grep -c "io_u error" "$OUT/fio-$1.err"); FIO_VERR=$(grep -cE "verify: (bad|got)" "$OUT/fio-$1.err")
}
f_flushbufs() {  # f_flushbufs: drop the images' cached blocks so the next reads reach the dm devices
  sync; blockdev --flushbufs /dev/mapper/fa /dev/mapper/fb; echo 3 > /proc/sys/vm/drop_caches
}
f_same() {  # f_same: cmp of the two dm devices (echo "yes" or the first difference)
  f_flushbufs
  cmp /dev/mapper/fa /dev/mapper/fb >/dev/null 2>&1 && echo yes || echo "no:$(cmp /dev/mapper/fa /dev/mapper/fb 2>&1 | head -1 | tr ' ' _)"
}

f_diff_blocks() {  # f_diff_blocks START_MIB LEN_MIB: how many 4 KiB blocks of that range differ between fa and fb
  $PY - $1 $2 <<'PY'
import sys
start, n = int(sys.argv[1]) << 20, int(sys.argv[2]) << 20
with open("/dev/mapper/fa", "rb") as a, open("/dev/mapper/fb", "rb") as b:
    a.seek(start); b.seek(start)
    x, y = a.read(n), b.read(n)
print(sum(x[i:i + 4096] != y[i:i + 4096] for i in range(0, n, 4096)))
PY
}

f_watch() {  # f_watch CASE N T0: in the background, time until image N shows failed in the status (f_failed reads it)
  F_T0=$3
  f_wait $3 90 ".volumes.$F_VOL.images[$2].state == \"failed\"" > "$OUT/faults-$1-tfail.txt" &
  F_WATCH=$!
}

f_where() {  # f_where BLOCK TAG: for fa and fb, whether 4 KiB block BLOCK holds /run/f4k, read through the page cache and with O_DIRECT
  local x how fl
  for x in a b; do
    for how in cache disk; do
      fl=; [ $how = disk ] && fl=iflag=direct
      dd if=/dev/mapper/f$x bs=4k skip=$1 count=1 $fl status=none 2>/dev/null | cmp -s - /run/f4k \
        && printf '%s ' "${2}_f${x}_$how=refused_data" || printf '%s ' "${2}_f${x}_$how=other"
    done
  done
}

f_failed() {  # f_failed CASE N [ERROR-WORD]: the checks of a failed image N (status, journal, D-Bus) once f_watch saw it
  local c=$1 n=$2 word=${3:-} p=/dev/mapper/f$([ $2 = 0 ] && echo a || echo b) err line st hl imgs sig ok
  wait $F_WATCH; F_TFAIL=$(cat "$OUT/faults-$c-tfail.txt")
  fst_save "$OUT/faults-$c-status.json"
  lvmirror status > "$OUT/faults-$c-status.txt" 2>&1 &   # a Python start: 5-20 s under TCG, meanwhile the rest
  local lst=$!
  st=$(jq -r ".volumes.$F_VOL.images[$n].state" "$OUT/faults-$c-status.json" 2>/dev/null)
  hl=$(jq -r ".volumes.$F_VOL.health" "$OUT/faults-$c-status.json" 2>/dev/null)
  err=$(jq -r ".volumes.$F_VOL.images[$n].error" "$OUT/faults-$c-status.json" 2>/dev/null)
  ok=ok; [ "$F_TFAIL" != timeout ] && [ "$st" = failed ] && [ "$hl" = degraded ] || ok=fail
  [ -z "$word" ] || echo "$err" | grep -qi "$word" || ok=fail
  result faults_${c}_image_failed $ok seconds_to_fail=$F_TFAIL state=$st health=$hl error="${err:0:240}" \
    image_failures=$(jq -r ".volumes.$F_VOL.io.image_failures" "$OUT/faults-$c-status.json" 2>/dev/null) \
    slow_legs=$(jq -r ".volumes.$F_VOL.io.slow_legs" "$OUT/faults-$c-status.json" 2>/dev/null)
  # `lvmirror status`: the health on the volume line, the image's error on its line
  wait $lst
  grep -q "^volume $F_VOL: .*, degraded" "$OUT/faults-$c-status.txt" && grep -q "image $n: failed .*error: " "$OUT/faults-$c-status.txt" \
    && result faults_${c}_status_tells ok || result faults_${c}_status_tells fail out="$(head -4 "$OUT/faults-$c-status.txt")"
  line=$(f_journal | grep -m1 "ERROR.*volume $F_VOL: image $n ($p) failed (was in-sync): ")
  # the time to fail by the log's clock (the status poll above costs seconds under TCG)
  local lt=$(date -d "$(echo "$line" | cut -c1-23 | tr , .)" +%s.%N 2>/dev/null)
  [ -n "$line" ] && result faults_${c}_journal ok seconds_to_fail_logged=$(awk -v a=$F_T0 -v b=${lt:-0} 'BEGIN { printf "%.1f", b - a }') line="${line:0:300}" || result faults_${c}_journal fail log="$(f_journal | tail -3)"
  sleep 1.5   # the bus service looks at the volumes once a second
  hl=$(busctl --system get-property org.lvmirror1 /org/lvmirror1/volume/$F_VOL org.lvmirror1.Volume Health 2>&1)
  imgs=$(busctl --system --json=short get-property org.lvmirror1 /org/lvmirror1/volume/$F_VOL org.lvmirror1.Volume Images 2>&1 | jq -r ".data[$n][2]" 2>&1)
  sig=$(f_signals | grep -A3 "member=ImageStateChanged" | grep -c '"failed"')
  [ "$hl" = 's "degraded"' ] && [ "$imgs" = failed ] && [ "$sig" -ge 1 ] \
    && result faults_${c}_dbus ok health="$hl" image_state=$imgs image_state_changed_signals=$sig \
    || result faults_${c}_dbus fail health="$hl" image_state="$imgs" image_state_changed_signals=$sig
}

f_heal() {  # f_heal CASE N [cli]: resync image N of the healed volume, then cmp the two dm devices. With "cli"
  # `lvmirror resync VOL N --wait`, else its D-Bus call (Volume.Resync) and a wait for the health optimal
  local c=$1 n=$2 t0=$(now) rc same hl secs
  if [ "${3:-}" = cli ]; then
    lvmirror resync $F_VOL $n --wait > "$OUT/faults-$c-resync.txt" 2>&1; rc=$?
  else
    busctl --system call org.lvmirror1 /org/lvmirror1/volume/$F_VOL org.lvmirror1.Volume Resync ud $n 0 > "$OUT/faults-$c-resync.txt" 2>&1; rc=$?
    [ $rc = 0 ] && { f_wait $t0 300 ".volumes.$F_VOL.health == \"optimal\"" >/dev/null || rc=124; }
  fi
  secs=$(since $t0)
  same=$(f_same)
  hl=$(fst ".volumes.$F_VOL.health")
  [ $rc = 0 ] && [ "$same" = yes ] && [ "$hl" = optimal ] \
    && result faults_${c}_resync_identical ok resync_seconds=$secs health=$hl \
    || result faults_${c}_resync_identical fail resync_rc=$rc identical=$same health=$hl out="$(tail -2 "$OUT/faults-$c-resync.txt")"
}

f_served() {  # f_served CASE DEV FIONAME: the initiator saw no error: fio's rc and CRC verify, the kernel log
  local c=$1 kerr=$(f_kerr $2) kab=$(f_kabort)
  f_fio $3
  [ "$FIO_RC" = 0 ] && [ "$FIO_IOERR" = 0 ] && [ "$FIO_VERR" = 0 ] && [ "$kerr" = 0 ] && [ "$kab" = 0 ] \
    && result faults_${c}_served ok fio_rc=$FIO_RC fio_io_errors=$FIO_IOERR crc_verify_errors=$FIO_VERR kernel_io_errors=$kerr kernel_aborts=$kab \
    || result faults_${c}_served fail fio_rc=$FIO_RC fio_io_errors=$FIO_IOERR crc_verify_errors=$FIO_VERR kernel_io_errors=$kerr kernel_aborts=$kab \
         err="$(tail -2 "$OUT/fio-$3.err")" kernel="$(f_kernel | grep -E "${2##*/}|abort|conn" | tail -3)"
}

f_multipath() {  # f_multipath DEV: a dm-multipath map over DEV (multipath-tools: no_path_retry fail, multipathd
  # checking every second); sets MP (the map's name) and MPD (multipathd's pid), or MP_SKIP (why not)
  local i
  MP=; MPD=; MP_SKIP=
  command -v multipath >/dev/null && command -v multipathd >/dev/null || { MP_SKIP="multipath-tools is not installed"; return 1; }
  modprobe dm_multipath; modprobe dm_round_robin; modprobe dm_service_time; modprobe scsi_dh_alua 2>/dev/null
  mkdir -p /etc/multipath
  cat > /etc/multipath.conf <<'EOF'
defaults {
    user_friendly_names no
    find_multipaths strict
    polling_interval 1
    no_path_retry fail
}
overrides {
    no_path_retry fail
}
EOF
  multipath -a $1 > "$OUT/faults-multipath.txt" 2>&1
  multipathd -d -s > "$OUT/faults-multipathd.log" 2>&1 &
  MPD=$!
  for i in $(seq 40); do
    MP=$(dmsetup ls --target multipath 2>/dev/null | awk 'NR == 1 {print $1}')
    [ -n "$MP" ] && [ "$MP" != No ] && break
    MP=
    [ $i = 20 ] && multipath $1 >> "$OUT/faults-multipath.txt" 2>&1
    kill -0 $MPD 2>/dev/null || break
    sleep 0.5
  done
  [ -n "$MP" ] || { MP_SKIP="no multipath map over $1: $(tail -2 "$OUT/faults-multipath.txt" "$OUT/faults-multipathd.log" | tr '\n' ' ')"; return 1; }
  multipath -ll >> "$OUT/faults-multipath.txt" 2>&1
  return 0
}

f_multipath_stop() {  # f_multipath_stop: stop multipathd (ours) and remove the map
  [ -z "${MPD:-}" ] || { kill $MPD 2>/dev/null; wait $MPD 2>/dev/null; }
  [ -z "${MP:-}" ] || dmsetup remove $MP >/dev/null 2>&1 || dmsetup remove --force $MP >/dev/null 2>&1
  MPD=; MP=
}
mp_path_state() {  # mp_path_state: the state letter (A active, F failed) of the map's only path, from dmsetup status
  dmsetup status $MP 2>/dev/null | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+:[0-9]+$/) {print $(i+1); exit}}'
}

f_restore_hung() {  # f_restore_hung: case 8 of faults, on LUN $D (see there)
  local t0 rs rrc jobw hl ref refrc stuck back rc2 got
  head -c 4096 /dev/urandom > /run/rs-a; head -c 4096 /dev/urandom > /run/rs-b
  for b in 12288 14336; do    # 48 MiB and 56 MiB: the copy as of the split holds rs-a there
    dd if=/run/rs-a of=$D bs=4k seek=$b count=1 oflag=direct conv=fsync status=none
  done
  lvmirror split $F_VOL 1 > "$OUT/faults-restore-hung.txt" 2>&1
  for b in 12288 14336; do
    dd if=/run/rs-b of=$D bs=4k seek=$b count=1 oflag=direct conv=fsync status=none
  done
  f_begin restore_hung
  f_flushbufs
  # dm-delay on reads, loaded with udev's rules off: udev's blkid would read the device on the
  # change event and dmsetup would wait for it, 60 s a read
  dmsetup suspend fb && echo "0 $(dm_sectors fb) delay $(dm_loop fb) 0 60000 $(dm_loop fb) 0 0" \
    | dmsetup load fb && dmsetup resume --noudevsync --noudevrules fb
  t0=$(now)
  lvmirror restore $F_VOL 1 >> "$OUT/faults-restore-hung.txt" 2>&1
  rs=$(now)
  timeout -k 5 60 dd if=$D of=/run/rs-got bs=4k skip=14336 count=1 iflag=direct status=none \
    2> "$OUT/faults-restore-hung-dd.txt"; rrc=$?
  rs=$(since $rs)
  jobw=$(f_wait $t0 60 "[.volumes.$F_VOL.jobs[] | select(.kind == \"restore\" and .state == \"failed\")] | length > 0")
  hl=$(fst ".volumes.$F_VOL.health")
  [ $rrc != 0 ] && [ $rrc != 124 ] && awk -v s=$rs 'BEGIN { exit !(s < 15) }' && [ "$jobw" != timeout ] \
    && [ "$hl" = degraded ] \
    && result faults_restore_hung_source_bounded ok read_error_seconds=$rs job_failed_seconds=$jobw health=$hl \
         kernel="$(f_kerr $D | tail -1)" \
    || result faults_restore_hung_source_bounded fail dd_rc=$rrc read_seconds=$rs job_failed_seconds=$jobw \
         health=$hl job="$(fst "[.volumes.$F_VOL.jobs[] | select(.kind == \"restore\")] | last | .error")"
  ref=$(lvmirror restore $F_VOL 1 2>&1); refrc=$?
  stuck=$(fst ".volumes.$F_VOL.images[1].stuck_io")
  [ $refrc != 0 ] && [[ $ref == *"in flight"* ]] \
    && result faults_restore_hung_source_refused ok stuck_io=$stuck \
    || result faults_restore_hung_source_refused fail rc=$refrc stuck_io=$stuck out="$(echo "$ref" | tail -1)"
  dmsetup suspend fb && echo "0 $(dm_sectors fb) linear $(dm_loop fb) 0" | dmsetup load fb \
    && dmsetup resume --noudevsync --noudevrules fb     # the held reads go to the disk now
  back=$(f_wait $(now) 120 ".volumes.$F_VOL.images[1].stuck_io == 0")
  lvmirror restore $F_VOL 1 --wait >> "$OUT/faults-restore-hung.txt" 2>&1; rc2=$?
  got=no
  f_flushbufs
  dd if=$D of=/run/rs-got bs=4k skip=12288 count=1 iflag=direct status=none && cmp -s /run/rs-got /run/rs-a \
    && dd if=$D of=/run/rs-got bs=4k skip=14336 count=1 iflag=direct status=none && cmp -s /run/rs-got /run/rs-a \
    && got=yes
  hl=$(fst ".volumes.$F_VOL.health")
  [ $rc2 = 0 ] && [ $got = yes ] && [ "$back" != timeout ] \
    && result faults_restore_hung_source_resumed ok reads_returned_seconds=$back health=$hl \
    || result faults_restore_hung_source_resumed fail restore_rc=$rc2 reads_as_copy=$got reads_returned=$back \
         health=$hl out="$(tail -2 "$OUT/faults-restore-hung.txt")"
}

faults() {
  local D S i t0 rc out x
  # two 64 MiB disks under device-mapper for vf; for vs two 96 MiB ext4s, each filled up by a
  # ballast file (both full before the first write: every write fails on both images alike).
  # Made while lvmirrord starts (a Python start: seconds under TCG)
  { dm_init fa 64 && dm_init fb 64 || echo "dm devices: $(dmsetup ls 2>&1 | head -3)" > /run/faults-prep.err
    for x in a b; do
      truncate -s 96M /run/enospc-$x.fs && mkfs.ext4 -q -F /run/enospc-$x.fs && mkdir -p /run/enospc-$x \
        && mount -o loop /run/enospc-$x.fs /run/enospc-$x \
        && { dd if=/dev/zero of=/run/enospc-$x/ballast bs=1M conv=fsync status=none 2>/dev/null; sync; }
    done; } &
  local prep=$! own=
  if [ -z "${DAEMON:-}" ]; then
    own=1; start_daemon || { wait $prep; result faults_setup fail log="$(tail -5 $OUT/lvmirrord.log)"; return; }
  fi
  wait $prep
  [ -e /run/faults-prep.err ] && { result faults_setup fail reason="$(cat /run/faults-prep.err)"; return; }
  : > "$OUT/faults-signals.txt"
  dbus-monitor --system "type='signal',interface='org.lvmirror1.Volume',member='ImageStateChanged'" >> "$OUT/faults-signals.txt" 2>&1 &
  local DMON=$!
  export_luns $F_IQN "fmir:64M:$F_VOL;images=/dev/mapper/fa+/dev/mapper/fb" \
    "fspace:256M:vs;images=/run/enospc-a/vs.img+/run/enospc-b/vs.img"
  f_wait $(now) 300 ".volumes.$F_VOL.health == \"optimal\" and .volumes.vs.health == \"optimal\"" >/dev/null   # the initial resyncs
  login $F_IQN
  D=$(lun_dev 0 $F_IQN); S=$(lun_dev 1 $F_IQN)
  if [ -b "$D" ] && [ -b "$S" ] && [ "$(fst ".volumes.$F_VOL.health")" = optimal ]; then
    result faults_setup ok lun0=$D lun1=$S cache_type="$(cat /sys/block/${D##*/}/device/scsi_disk/*/cache_type 2>/dev/null)" \
      sd_timeout=$(cat /sys/block/${D##*/}/device/timeout)
  else
    result faults_setup fail lun0="$D" lun1="$S" status="$(lvmirror status 2>&1 | head -6)"
    kill $DMON 2>/dev/null; return
  fi

  # 1. write errors on image 1 (dm-flakey error_writes) under a verified load on LUN 0, 0..16 MiB
  f_begin write_error
  fio_verify_load fw $D 8M 0
  f_busy writes 64   # fio's start takes seconds under TCG: inject once its writes flow
  dm_flakey fb error_writes; f_watch write_error 1 $(cat /run/dm.t0)
  f_failed write_error 1
  wait $FIO; FIO_RC=$?
  f_served write_error $D fw
  dm_linear fb
  f_heal write_error 1 cli

  # 2. read errors on image 0: sectors 4096..12287 (2..6 MiB) of fa answer EIO; the data case 1
  # wrote there is read back and CRC-checked (fio verify_only) with the images' caches dropped
  f_begin read_error
  dm_error_range fa 4096 8192
  f_flushbufs
  f_watch read_error 0 $(now)   # the first reads of the range (dd): the time to fail counts from here
  dd if=$D of=/run/fr.bin bs=4k skip=512 count=1024 iflag=direct status=none; local rdd=$?
  fio_verify_load fr $D 8M 0 --verify_only
  f_failed read_error 0
  wait $FIO; FIO_RC=$?
  f_served read_error $D fr
  [ $rdd = 0 ] || result faults_read_error_served fail reason="dd of the range through the LUN failed ($rdd)"
  dm_linear fa
  f_heal read_error 0

  # 3. dropped writes on image 1 (dm-flakey drop_writes), 16..24 MiB; the scrub finds the regions
  # (no checksums: nothing sees it while it happens); heal; what is read back and how far the
  # images differ (figures); then the repair lvmirror guarantees: a plain resync refuses the image in sync, `resync --full`
  # rebuilds it from image 0, after which every acknowledged write reads back
  f_begin dropped_writes
  dm_flakey fb drop_writes
  fio_verify_load fd $D 8M 16M --do_verify=0
  wait $FIO; local wrc=$?
  # the scrub sees what the disk dropped although lvmirrord's page cache of fb still holds the
  # writes (it reads the devices with O_DIRECT): regions of 16..24 MiB only, two candidates
  # what a page-cache read of fb (the cache lvmirrord's descriptor shares) shows against the
  # device itself: different bytes are writes only the cache still holds
  local cached_differs=no
  cmp -s <(dd if=/dev/mapper/fb bs=1M skip=16 count=8 status=none) \
         <(dd if=/dev/mapper/fb bs=1M skip=16 count=8 iflag=direct status=none) || cached_differs=yes
  local t0=$(now) src
  lvmirror scrub $F_VOL --wait > "$OUT/faults-dropped_writes-scrub.txt" 2>&1; src=$?
  local tsc=$(since $t0) sm=$(fst "[.volumes.$F_VOL.scrub.mismatches, ([.volumes.$F_VOL.scrub.report[] | select(.offset < 16777216 or .offset >= 25165824)] | length)] | map(tostring) | join(\" \")")
  set -- $sm
  [ "$src" = 1 ] && [ "${1:-0}" -ge 1 ] && [ "$2" = 0 ] \
    && grep -q "no majority: candidates image 0, image 1" "$OUT/faults-dropped_writes-scrub.txt" \
    && result faults_dropped_writes_found_by_scrub ok mismatching_regions=$1 scrub_seconds=$tsc \
         page_cache_differs_from_device=$cached_differs \
    || result faults_dropped_writes_found_by_scrub fail rc=$src mismatches_outside_elsewhere="$sm" \
         out="$(tail -2 "$OUT/faults-dropped_writes-scrub.txt")"
  f_flushbufs   # the writes that never reached fb leave its cache (memory pressure, a restart)
  dm_linear fb
  f_flushbufs
  fio_verify_load fdv $D 8M 16M --verify_only --verify_fatal=0 --continue_on_error=verify
  wait $FIO; FIO_RC=$?; f_fio fdv
  local verr=$FIO_VERR dst=$(fst "[.volumes.$F_VOL.health, (.volumes.$F_VOL.images | map(.state) | join(\"+\"))] | join(\" \")")
  local ndiff=$(f_diff_blocks 16 8)
  lvmirror resync $F_VOL 1 > "$OUT/faults-dropped_writes-resync.txt" 2>&1; local rrc=$?
  result faults_dropped_writes_measured $([ "$wrc" = 0 ] && [ "$rrc" != 0 ] && echo ok || echo fail) \
    write_rc=$wrc reads_after_heal_crc_errors=$verr verify_rc=$FIO_RC lvmirror_state="$dst" \
    differing_4k_blocks=$ndiff of_written=2048 plain_resync_rc=$rrc \
    plain_resync="$(tail -1 "$OUT/faults-dropped_writes-resync.txt" | cut -c1-160)" \
    journal_errors=$(f_journal | grep -c ERROR)
  local t0=$(now) frc
  lvmirror resync $F_VOL 1 --full --wait >> "$OUT/faults-dropped_writes-resync.txt" 2>&1; frc=$?
  local tfull=$(since $t0)
  f_flushbufs
  ndiff=$(f_diff_blocks 16 8)
  fio_verify_load fdr $D 8M 16M --verify_only --verify_fatal=0 --continue_on_error=verify
  wait $FIO; FIO_RC=$?; f_fio fdr
  local after=$(f_same) state1=$(fst ".volumes.$F_VOL.images[1].state")
  [ "$frc" = 0 ] && [ "$ndiff" = 0 ] && [ "$FIO_RC" = 0 ] && [ "$FIO_VERR" = 0 ] && [ "$after" = yes ] \
    && [ "$state1" = in-sync ] \
    && result faults_dropped_writes_repaired ok full_resync_seconds=$tfull differing_4k_blocks=$ndiff \
         crc_verify_errors=$FIO_VERR images_identical=$after \
    || result faults_dropped_writes_repaired fail full_resync_rc=$frc differing_4k_blocks=$ndiff \
         fio_rc=$FIO_RC crc_verify_errors=$FIO_VERR images_identical="$after" state="$state1" \
         out="$(tail -2 "$OUT/faults-dropped_writes-resync.txt")"

  # 4. image 1's device removed (dmsetup remove --force: open, it keeps its node with an error table)
  f_begin removed
  fio_verify_load fx $D 8M 48M
  f_busy writes 64
  t0=$(now); out=$(dm_remove fb); f_watch removed 1 $t0
  f_failed removed 1
  wait $FIO; FIO_RC=$?
  f_served removed $D fx
  t "dmsetup remove --force fb: $out; table now: $(dm_target fb)"
  dm_linear fb
  f_heal removed 1

  # 5. every image fails: the write is refused, the LUN answers NOT READY (TEST UNIT READY,
  # a dm-multipath map fails its path instead of queueing), then both disks heal
  f_begin all_failed
  head -c 4096 /dev/urandom > /run/f4k
  f_multipath $D
  echo "multipath: ${MP:-none} ${MP_SKIP:-}" >> "$OUT/faults-multipath.txt"
  dm_error fa; dm_error fb; t0=$(now)
  timeout 120 dd if=/run/f4k of=$D bs=4k seek=15360 count=1 oflag=direct conv=fsync 2> "$OUT/faults-all-dd.txt"; local arc=$?
  local toff=$(f_wait $t0 30 ".volumes.$F_VOL.health == \"offline\"")
  fst_save "$OUT/faults-all_failed-status.json"
  lvmirror status > "$OUT/faults-all_failed-status.txt" 2>&1 &
  local lst=$!
  local kmed=$(f_kerr $D)
  [ $arc != 0 ] && [ $arc != 124 ] && [ "$kmed" -ge 1 ] \
    && result faults_all_failed_write_refused ok dd_rc=$arc kernel_io_errors=$kmed kernel="$(f_kernel | grep -E "error, dev ${D##*/}" | head -1)" \
    || result faults_all_failed_write_refused fail dd_rc=$arc kernel_io_errors=$kmed dd="$(tail -1 "$OUT/faults-all-dd.txt")"
  wait $lst
  [ "$toff" != timeout ] && grep -q "^volume $F_VOL: .*, offline" "$OUT/faults-all_failed-status.txt" \
    && grep -q "OFFLINE (NOT READY)" "$OUT/faults-all_failed-status.txt" \
    && result faults_all_failed_offline ok seconds_to_offline=$toff offline="$(jq -r ".volumes.$F_VOL.offline" "$OUT/faults-all_failed-status.json" | cut -c1-240)" \
    || result faults_all_failed_offline fail seconds_to_offline=$toff out="$(head -3 "$OUT/faults-all_failed-status.txt")"
  sg_turs -v $D > "$OUT/faults-tur-offline.txt" 2>&1; rc=$?
  [ $rc = 2 ] && grep -qi "not ready" "$OUT/faults-tur-offline.txt" && grep -qi "manual intervention required" "$OUT/faults-tur-offline.txt" \
    && result faults_all_failed_tur_not_ready ok sg_turs_rc=$rc out="$(grep -i "sense" "$OUT/faults-tur-offline.txt" | tr '\n' ' ' | cut -c1-200)" \
    || result faults_all_failed_tur_not_ready fail sg_turs_rc=$rc out="$(tail -3 "$OUT/faults-tur-offline.txt" | tr '\n' ' ')"
  out=$(f_journal | grep -m1 "ERROR.*volume $F_VOL: OFFLINE, no image can serve")
  [ -n "$out" ] && result faults_all_failed_journal ok line="${out:0:300}" || result faults_all_failed_journal fail log="$(f_journal | tail -3)"
  sleep 1.5
  out=$(busctl --system get-property org.lvmirror1 /org/lvmirror1/volume/$F_VOL org.lvmirror1.Volume Health 2>&1)
  [ "$out" = 's "offline"' ] && result faults_all_failed_dbus ok health="$out" || result faults_all_failed_dbus fail health="$out"
  local mpio= mpsecs= mpstate= w
  if [ -n "$MP" ]; then
    w=$(now)
    timeout 120 dd if=/dev/mapper/$MP of=/dev/null bs=4k count=1 iflag=direct 2>> "$OUT/faults-multipath.txt"; mpio=$?
    mpsecs=$(since $w)
    for i in $(seq 20); do mpstate=$(mp_path_state); [ "$mpstate" = F ] && break; sleep 0.5; done
    multipath -ll >> "$OUT/faults-multipath.txt" 2>&1
    dmsetup table $MP >> "$OUT/faults-multipath.txt" 2>&1
    # failed (not queued: dd returned an error, well before timeout's 120 s) and the path marked F
    [ "$mpio" != 0 ] && [ "$mpio" != 124 ] && [ "$mpstate" = F ] \
      && result faults_multipath_fails_path ok map=$MP read_rc=$mpio read_seconds=$mpsecs path_state=$mpstate table="$(dmsetup table $MP | cut -c1-120)" \
      || result faults_multipath_fails_path fail map=$MP read_rc=$mpio read_seconds=$mpsecs path_state="$mpstate" ll="$(multipath -ll 2>&1 | tail -3 | tr '\n' ' ')"
  else
    result faults_multipath_fails_path ok skipped="$MP_SKIP"
  fi
  local nr=$(f_journal | grep -c "WARNING.*LUN not ready") nrs=$(since $t0)   # log lines while offline
  # heal both disks: lvmirrord's probe (every flusher round) finds the in-sync image again
  f_begin back_online
  dm_linear fa; dm_linear fb; t0=$(now)
  local tgood=timeout
  for i in $(seq 120); do sg_turs $D >/dev/null 2>&1 && { tgood=$(since $t0); break; }; sleep 0.5; done
  out=$(f_journal | grep -m1 "volume $F_VOL: back ONLINE")
  [ "$tgood" != timeout ] && [ -n "$out" ] && [ "$(fst ".volumes.$F_VOL.health")" != offline ] \
    && result faults_all_failed_back_online ok seconds_to_tur_good=$tgood line="${out:0:200}" \
    || result faults_all_failed_back_online fail seconds_to_tur_good=$tgood log="$(f_journal | tail -2)"
  if [ -n "$MP" ]; then
    for i in $(seq 40); do mpstate=$(mp_path_state); [ "$mpstate" = A ] && break; sleep 0.5; done
    timeout 60 dd if=/dev/mapper/$MP of=/dev/null bs=4k count=1 iflag=direct status=none; mpio=$?
    multipath -ll >> "$OUT/faults-multipath.txt" 2>&1
    [ "$mpstate" = A ] && [ $mpio = 0 ] && result faults_multipath_path_reinstated ok path_state=$mpstate \
      || result faults_multipath_path_reinstated fail path_state="$mpstate" read_rc=$mpio
  else
    result faults_multipath_path_reinstated ok skipped="$MP_SKIP"
  fi
  f_multipath_stop
  # where the refused write's data is now: each image's cached view and its disk (O_DIRECT)
  local where="$(f_where 15360 before_resync)"
  i=$(fst "[.volumes.$F_VOL.images[] | select(.state == \"failed\") | .index] | first // empty")
  f_heal all_failed ${i:-0} cli
  where="$where $(f_where 15360 after_resync)"
  result faults_all_failed_refused_write_figures ok failed_image=${i:-none} $where \
    lu_not_ready_warnings=$nr offline_seconds=$nrs \
    flush_errors_logged=$(grep -c "ERROR.*flush of image .* failed" "$OUT/lvmirrord.log")
  timeout 60 dd if=/run/f4k of=$D bs=4k seek=15360 count=1 oflag=direct conv=fsync status=none \
    && cmp -n 4096 /run/f4k <(dd if=$D bs=4k skip=15360 count=1 iflag=direct status=none) \
    && result faults_all_failed_writes_again ok || result faults_all_failed_writes_again fail

  # 6. ENOSPC: vs's two sparse files on their full 96 MiB ext4s; 80 MiB through LUN 1, then the
  # ballast files deleted and the LUN written again
  f_begin enospc
  dd if=/dev/urandom of=/run/pat80 bs=1M count=80 status=none
  timeout 300 dd if=/run/pat80 of=$S bs=1M oflag=direct 2> "$OUT/faults-enospc-dd.txt"; local erc=$?
  local done_mb=$(( $(grep -oE '^[0-9]+ bytes' "$OUT/faults-enospc-dd.txt" | awk '{print $1}' | tail -1) / 1048576 ))
  local ksp=$(f_kernel | grep -ciE "space allocation")
  fst_save "$OUT/faults-enospc-status.json"
  lvmirror status > "$OUT/faults-enospc-status.txt" 2>&1 &
  local lst2=$!
  local sperr=$(jq -r ".volumes.vs.io.space_errors" "$OUT/faults-enospc-status.json") fails=$(jq -r ".volumes.vs.io.image_failures" "$OUT/faults-enospc-status.json")
  local states=$(jq -r '.volumes.vs.images | map(.state) | join("+")' "$OUT/faults-enospc-status.json")
  [ $erc != 0 ] && [ $erc != 124 ] && [ "$ksp" -ge 1 ] \
    && result faults_enospc_initiator_told ok dd_rc=$erc written_mib=$done_mb kernel="$(f_kernel | grep -iE "space allocation" | head -2 | tr '\n' ' ' | cut -c1-240)" dd="$(grep -v bytes "$OUT/faults-enospc-dd.txt" | head -1)" \
    || result faults_enospc_initiator_told fail dd_rc=$erc written_mib=$done_mb kernel_space_lines=$ksp kernel="$(f_kernel | grep -E "${S##*/}" | tail -3 | tr '\n' ' ')"
  wait $lst2
  grep -q "^volume vs: .*, optimal" "$OUT/faults-enospc-status.txt" && [ "$states" = in-sync+in-sync ] && [ "$fails" = 0 ] && [ "${sperr:-0}" -ge 1 ] \
    && result faults_enospc_no_image_failed ok states=$states space_errors=$sperr image_failures=$fails \
    || result faults_enospc_no_image_failed fail states=$states space_errors=$sperr image_failures=$fails out="$(head -4 "$OUT/faults-enospc-status.txt")"
  local nwarn=$(f_journal | grep -c "WARNING.*volume vs: .*file system under it is full") nlu=$(f_journal | grep -c "WARNING.*out of space: volume vs")
  [ "$nwarn" -ge 1 ] && [ "$(f_journal | grep -c "ERROR.*volume vs")" = 0 ] \
    && result faults_enospc_journal ok warnings=$nwarn lu_out_of_space_warnings=$nlu line="$(f_journal | grep -m1 "file system under it is full" | cut -c1-260)" \
    || result faults_enospc_journal fail warnings=$nwarn lu_out_of_space_warnings=$nlu log="$(f_journal | grep "volume vs" | tail -2)"
  rm -f /run/enospc-a/ballast /run/enospc-b/ballast; sync
  timeout 120 dd if=/run/pat80 of=$S bs=1M skip=$done_mb seek=$done_mb count=16 oflag=direct conv=fsync status=none; local frc=$?
  blockdev --flushbufs $S
  sync; echo 3 > /proc/sys/vm/drop_caches
  local rb=no; cmp -s -n $(( (done_mb + 16) * 1048576 )) /run/pat80 $S && rb=yes
  local hl=$(fst ".volumes.vs.health")
  sleep 3   # a flusher round, then the two files compared
  local same=no; cmp -s /run/enospc-a/vs.img /run/enospc-b/vs.img && same=yes
  [ $frc = 0 ] && [ $rb = yes ] && [ "$hl" = optimal ] \
    && result faults_enospc_writes_after_space_freed ok readback=$rb health=$hl images_identical=$same free_kib="$(df -k --output=avail /run/enospc-a | tail -1 | tr -d ' ')" \
    || result faults_enospc_writes_after_space_freed fail dd_rc=$frc readback=$rb health=$hl images_identical=$same

  # 7. (last: a failure here may leave LUN 0 unusable) a very slow image 1: dm-delay 8000 ms on
  # writes, the initiator's SCSI timeout 5 s. Durable 4 KiB writes (O_DIRECT + fsync), each
  # timed, then a verified load. What must hold is that none of those writes' SCSI commands
  # outlives the timeout: the SCSI device's own count of commands that timed out (iotmo_cnt,
  # scsi_sysfs.c), read before and right after them, stays where it was. A dd makes two commands (the WRITE and, for conv=fsync, a SYNCHRONIZE CACHE)
  # and starts a process, so its wall time may pass 5 s with neither command near it (5.4 s
  # once, the first write - the one that waits out leg_timeout - on a host busy with other
  # work, no abort): it is bounded by twice the timeout.
  f_begin slow
  echo 5 > /sys/block/${D##*/}/device/timeout
  local tmo_f=/sys/block/${D##*/}/device/iotmo_cnt tmo0= tmo=unknown
  [ -r $tmo_f ] && tmo0=$(( $(cat $tmo_f) ))       # (hexadecimal: 0x0)
  dm_delay fb 0 8000; f_watch slow 1 $(cat /run/dm.t0)
  local times= max=0 drc=0
  for i in 1 2 3 4; do
    w=$(now)
    timeout -k 5 30 dd if=/run/f4k of=$D bs=4k seek=$((10240 + i)) count=1 oflag=direct conv=fsync status=none || drc=$((drc + 1))
    w=$(since $w); times="$times${times:+,}$w"
    max=$(awk -v a=$max -v b=$w 'BEGIN { print (b > a ? b : a) }')
    grep -q "Exception in thread ring-" "$OUT/lvmirrord.log" && break
  done
  [ -n "$tmo0" ] && tmo=$(( $(cat $tmo_f) - tmo0 ))
  # a LUN whose ring thread died answers nothing more: no load on it then (its I/O would hang)
  local ringdead=$(grep -c "Exception in thread ring-" "$OUT/lvmirrord.log")
  [ "$ringdead" = 0 ] && fio_verify_load fs $D 4M 44M
  f_failed slow 1 slow
  if [ "$ringdead" = 0 ]; then
    timeout 180 tail --pid=$FIO -f /dev/null; kill $FIO 2>/dev/null; wait $FIO; FIO_RC=$?
    f_served slow $D fs
  else
    result faults_slow_served fail reason="lvmirrord's ring thread died, LUN 0 answers nothing more" \
      dd_errors=$drc kernel_io_errors=$(f_kerr $D) kernel_aborts=$(f_kabort) \
      daemon="$(grep -A12 "Exception in thread ring-" "$OUT/lvmirrord.log" | tail -3 | tr '\n' ' ')"
  fi
  [ $drc = 0 ] && [ "$ringdead" = 0 ] && [ "$tmo" = 0 ] && awk -v m=$max 'BEGIN { exit !(m < 10) }' \
    && result faults_slow_write_within_timeout ok seconds_per_write=$times max=$max sd_timeout=5 commands_timed_out=$tmo \
    || result faults_slow_write_within_timeout fail seconds_per_write=$times max=$max dd_errors=$drc sd_timeout=5 \
         commands_timed_out=$tmo ring_thread_died=$ringdead daemon="$(grep -A12 "Exception in thread ring-" "$OUT/lvmirrord.log" | tail -2 | tr '\n' ' ')"
  dm_linear fb
  [ -e /sys/block/${D##*/}/device/timeout ] && echo 30 > /sys/block/${D##*/}/device/timeout
  f_heal slow 1

  # 8. a restore's source stops answering (trials 27 and 28): image 1 split, two regions
  # changed since, then dm-delay holds every read of image 1 for 60 s (writes and flushes pass,
  # so the restore's start, which flushes its source, is accepted). The restore's read of its
  # first region is given up on after leg_timeout (4 s) plus the region at 4 MB/s and the job
  # fails; the initiator's read of the other region, not rolled back, gets an error within the
  # same bound instead of hanging past its SCSI timeout (30 s); a new restore is refused while
  # the read is still in flight on the device; once it answers (the table back to linear,
  # which releases the held reads), the restore resumes and the LUN reads as the split copy.
  f_restore_hung
  lvmirror resync $F_VOL 1 --wait > "$OUT/faults-restore-hung-resync.txt" 2>&1

  dmesg > "$OUT/faults-dmesg.txt"
  kill $DMON 2>/dev/null; wait $DMON 2>/dev/null
  timeout 60 iscsiadm -m node -T $F_IQN -p 127.0.0.1 --logout >/dev/null 2>&1
  if [ -n "$own" ]; then   # a daemon this section started is stopped here, SIGKILL if it hangs
    kill $DAEMON 2>/dev/null
    for i in $(seq 100); do kill -0 $DAEMON 2>/dev/null || break; sleep 0.2; done
    kill -0 $DAEMON 2>/dev/null && { t "faults: lvmirrord did not stop on SIGTERM within 20 s: SIGKILL"; kill -9 $DAEMON; }
    wait $DAEMON 2>/dev/null; DAEMON=
  fi
  t "faults: done"
}
