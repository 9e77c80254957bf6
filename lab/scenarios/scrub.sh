# lab/scenarios/scrub.sh: section "scrub" (issue: operating the mirror). One region of one image
# is changed behind the LUN's back (a direct write to the image file, what a disk's silent
# corruption leaves); the scrub finds exactly that region while fio writes and verifies through
# the LUN; on three images --repair rewrites the odd image from the majority and the images end
# identical; on two images the report names both candidates and only --source repairs. Also
# through targetcli-lvmirror and D-Bus (LastScrub, ScrubFinished).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.

scrub_json() {  # scrub_json VOLUME KEY: a field of the volume's scrub record in lvmirror --json status
  lvmirror --json status | $PY -c "import json,sys; sc=json.load(sys.stdin)['volumes']['$1']['scrub']; print(json.dumps(sc['$2']) if sc else 'none')"
}

corrupt() {  # corrupt IMAGE-FILE OFFSET: 4 KiB of random bytes at OFFSET, past lvmirrord (O_DIRECT)
  dd if=/dev/urandom of=$1 bs=4096 count=1 seek=$(($2 / 4096)) conv=notrunc oflag=direct status=none
}

scrub() {
  local d3 d2 rs frc rc out m
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=sc3 size=64M cfgstring=sc3;images=/run/scratch/sc3a.img+/run/scratch/sc3b.img+/run/scratch/sc3c.img control=nl_reply_supported=-1
/backstores/user:lvmirror create name=sc2 size=64M cfgstring=sc2;images=/run/scratch/sc2a.img+/run/scratch/sc2b.img control=nl_reply_supported=-1
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/sc3 lun=20
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/sc2 lun=21
TC
  rescan; d3=$(lun_dev 20); d2=$(lun_dev 21)
  lvmirror wait sc3 > /dev/null 2>&1; lvmirror wait sc2 > /dev/null 2>&1
  rs=$(lvmirror --json status | $PY -c "import json,sys; print(json.load(sys.stdin)['volumes']['sc3']['region_size'])")
  dd if=/dev/urandom of=$d3 bs=1M count=32 oflag=direct status=none
  dd if=/dev/urandom of=$d2 bs=1M count=32 oflag=direct status=none
  # region 5 of sc3's image 2 (block 2 of it), region 3 of sc2's image 0
  corrupt /run/scratch/sc3c.img $((5 * rs + 8192))
  corrupt /run/scratch/sc2a.img $((3 * rs))
  # 1. check only, under a verified write load on another part of the LUN
  fio_verify_load scrub $d3 16M 40M --runtime=20 --time_based=0
  sleep 2
  lvmirror scrub sc3 --rate 20 --wait > "$OUT/scrub-sc3-check.txt" 2>&1; rc=$?
  wait $FIO; frc=$?
  m=$(lvmirror --json status | $PY -c "
import json,sys
sc=json.load(sys.stdin)['volumes']['sc3']['scrub']
r=sc['report']
print('%s %d %s %s %s %s' % (sc['state'], sc['mismatches'], [x['region'] for x in r], r[0]['groups'] if r else '-', r[0]['first_lba'] if r else '-', r[0]['right'] if r else '-'))" 2>&1)
  echo "$m" > "$OUT/scrub-sc3-check.summary"
  [ $rc = 1 ] && [ "$m" = "done 1 [5] [[0, 1], [2]] $((5 * rs / 512 + 16)) [0, 1]" ] \
    && grep -q "region 5 " "$OUT/scrub-sc3-check.txt" \
    && result scrub_finds_exact_region ok || result scrub_finds_exact_region fail rc=$rc got="$m" want="done 1 [5] [[0, 1], [2]] $((5 * rs / 512 + 16)) [0, 1]"
  [ $frc = 0 ] && result scrub_under_load_fio_verify_ok ok || result scrub_under_load_fio_verify_ok fail fio=$frc err="$(tail -3 $OUT/fio-scrub.err)"
  cmp -s /run/scratch/sc3a.img /run/scratch/sc3c.img && result scrub_check_changes_nothing fail \
    || result scrub_check_changes_nothing ok
  # 2. repair by majority: image 2 rewritten from 0 and 1
  lvmirror scrub sc3 --repair --wait > "$OUT/scrub-sc3-repair.txt" 2>&1; rc=$?
  m="$(scrub_json sc3 repaired) $(scrub_json sc3 unrepaired)"
  [ $rc = 0 ] && [ "$m" = "1 0" ] && grep -q "image(s) 2 rewritten from image 0" "$OUT/scrub-sc3-repair.txt" \
    && result scrub_majority_repairs_odd_image ok || result scrub_majority_repairs_odd_image fail rc=$rc got="$m" out="$(tail -2 $OUT/scrub-sc3-repair.txt)"
  cmp -s /run/scratch/sc3a.img /run/scratch/sc3b.img && cmp -s /run/scratch/sc3a.img /run/scratch/sc3c.img \
    && result scrub_images_identical_after_repair ok || result scrub_images_identical_after_repair fail
  # 3. two images: both candidates named, nothing repaired without --source, then from image 1
  lvmirror scrub sc2 --repair --wait > "$OUT/scrub-sc2.txt" 2>&1; rc=$?
  out=$(grep "region 3 " "$OUT/scrub-sc2.txt")
  [ $rc = 1 ] && [ "$(scrub_json sc2 unrepaired)" = 1 ] && echo "$out" | grep -q "no majority: candidates image 0, image 1" \
    && ! cmp -s /run/scratch/sc2a.img /run/scratch/sc2b.img \
    && result scrub_two_images_names_both_candidates ok || result scrub_two_images_names_both_candidates fail rc=$rc out="$out"
  targetcli-lvmirror /backstores/user:lvmirror/sc2 scrub repair=true source=1 wait=true > "$OUT/scrub-sc2-source.txt" 2>&1; rc=$?
  [ $rc = 0 ] && grep -q "1 repaired" "$OUT/scrub-sc2-source.txt" && cmp -s /run/scratch/sc2a.img /run/scratch/sc2b.img \
    && result scrub_two_images_repair_from_source ok || result scrub_two_images_repair_from_source fail rc=$rc out="$(tail -3 $OUT/scrub-sc2-source.txt)"
  # 4. D-Bus: the LastScrub property, ScrubFinished on the next scrub, Progress while it runs
  timeout 120 dbus-monitor --system "type='signal',interface='org.lvmirror1.Volume'" > "$OUT/scrub-signals.txt" 2>&1 &
  m=$!; sleep 1
  lvmirror scrub sc2 --rate 16 --wait > /dev/null 2>&1; sleep 2; kill $m 2>/dev/null; wait $m 2>/dev/null
  busctl --system get-property org.lvmirror1 /org/lvmirror1/volume/sc2 org.lvmirror1.Volume LastScrub > "$OUT/scrub-busctl.txt" 2>&1
  grep -q '^(sddtttt) "done" .* 0 0 0$' "$OUT/scrub-busctl.txt" && grep -q "member=ScrubFinished" "$OUT/scrub-signals.txt" \
    && grep -A1 "member=Progress" "$OUT/scrub-signals.txt" | grep -q '"scrub"' \
    && result scrub_dbus_signals_and_property ok || result scrub_dbus_signals_and_property fail prop="$(cat $OUT/scrub-busctl.txt)"
  # 5. a scrub cut short by a SIGKILL of lvmirrord resumes from its checkpoint with its options
  # (the same scrub: its start time is kept)
  lvmirror scrub sc3 --rate 2 > /dev/null 2>&1
  sleep 6
  m="$(scrub_json sc3 started) $(scrub_json sc3 next_region)"
  kill -9 $DAEMON; wait $DAEMON 2>/dev/null; sleep 2
  start_daemon
  sleep 6; lvmirror status > /dev/null 2>&1
  out="$(scrub_json sc3 state) $(scrub_json sc3 rate) $(scrub_json sc3 started) $(scrub_json sc3 next_region)"
  lvmirror scrub --cancel sc3 > /dev/null 2>&1
  # the same scrub (its start time), with its rate, gone on past where it was when killed:
  # still running, or done already (under TCG the restart takes as long as the rest of it);
  # a record left behind by a scrub that did not resume would still say the old cursor
  set -- $m; local before_start=$1 before_next=$2; set -- $out
  { [ "$1" = '"running"' ] || [ "$1" = '"done"' ]; } && [ "$2 $3" = "2.0 $before_start" ] \
    && [ "$before_next" -ge 1 ] && [ "$4" -gt "$before_next" ] \
    && result scrub_resumes_after_sigkill ok || result scrub_resumes_after_sigkill fail before="$m" after="$out"
  tcli <<TC
/iscsi/$IQN/tpg1/luns delete lun20
/iscsi/$IQN/tpg1/luns delete lun21
/backstores/user:lvmirror delete sc3
/backstores/user:lvmirror delete sc2
TC
  rescan
}
