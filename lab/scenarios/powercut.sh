# lab/scenarios/powercut.sh: section "powercut" (one boot of the power-cut chain; lab/powercut).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib (powercut.sh, powercut.py).
#
# lab/powercut boots the guest again and again on the same disk (LAB_DISK) and kills QEMU with
# SIGKILL once the guest says the chosen moment is reached ($PC_DIR/cut-ready-STEP). Boot STEP
# (PC_STEP) recovers as the boot-time units would (lvmirrord, then `targetctl restore` of the
# configuration saved on the disk), checks the run the last cut interrupted (PC_PREV: its
# moment), then starts run STEP at moment PC_MOMENT and waits for the cut; PC_MOMENT=final only
# checks. Moments: steady split resync restore checkpoint attach.
# Check names carry the moment: pc_recovered_after_M, pc_acked_writes_after_M,
# pc_images_identical_after_M, pc_split_exact_after_M, pc_split_still_exact_after_M,
# pc_resync_completes_after_resync, pc_restore_completes_after_restore,
# pc_restore_equals_split_after_restore, pc_attach_lun_serves_after_attach,
# pc_attach_completes_after_attach; pc_setup for the first boot (pc_cut_M come from the host).

powercut() {   # one boot of the chain: set up or recover, check the last run, start the next moment
  local step=${PC_STEP:-1} moment=${PC_MOMENT:-final} prev=${PC_PREV:-none}
  STATE=$PC_MNT/state
  if [ "$step" = 1 ]; then
    pc_setup || return
  else
    pc_recover $prev || return
    pc_check $((step - 1)) $prev
  fi
  [ "$moment" = final ] && { pc_writer_stop_all; return; }
  t "power cut: run $step, moment $moment"
  pc_moment_$moment $step
}

pc_writer_stop_all() {  # pc_writer_stop_all: nothing runs in the background at the end of a boot
  [ -z "${WRITER:-}" ] || pc_writer_stop ${PC_STEP:-1}
}

pc_setup() {  # pc_setup: first boot: disk, lvmirrord, the LUN (3 images), saved config, base hashes
  if ! pc_disk 1 > "$OUT/pc-disk.txt" 2>&1; then result pc_setup fail reason="$(tail -2 $OUT/pc-disk.txt)"; return 1; fi
  pc_t0
  if ! start_daemon; then result pc_setup fail log="$(tail -5 $OUT/lvmirrord.log)"; return 1; fi
  export_luns $IQN "pc:${PC_SIZE_MB}M:$PC_VOL;images=$PC_MNT/img/pc-a.img+$PC_MNT/img/pc-b.img+$PC_MNT/img/pc-c.img"
  # what an administrator does: save the configuration where the boot-time restore finds it
  printf '%s\n' "set global auto_save_on_exit=false" "saveconfig $PC_SAVED" | targetcli-lvmirror >> "$OUT/targetcli.log" 2>&1
  sync
  lvmirror wait $PC_VOL --timeout 300 > /dev/null 2>&1
  if [ ! -s $PC_SAVED ] || ! pc_lun; then
    result pc_setup fail saved="$(ls -l $PC_SAVED 2>&1)" lun="${PC_LUN:-}"; return 1
  fi
  PCPY hashes $PC_LUN "$PC_DIR/base-1.bin" --blocks $PC_BLOCKS --rand-blocks $PC_RAND_BLOCKS
  pc_status "$PC_DIR/status-setup.json"
  result pc_setup ok dev=$PC_DEV lun=$PC_LUN images="$PCS_INSYNC" seconds=$(pc_since)
}

pc_t0() { PC_T0=$(awk '{print $1}' /proc/uptime); }   # pc_t0: note when recovery began
pc_since() { awk -v t0=$PC_T0 '{printf "%.1f", $1 - t0}' /proc/uptime; }   # pc_since: seconds since pc_t0

pc_recover() {  # pc_recover MOMENT: after the cut: the disk, lvmirrord, targetctl restore, the LUN serves
  local m=$1 rc
  pc_t0
  if ! pc_disk 0 > "$OUT/pc-disk.txt" 2>&1; then result pc_recovered_after_$m fail reason="$(tail -2 $OUT/pc-disk.txt)"; return 1; fi
  t "power cut: disk mounted; starting lvmirrord"
  if ! start_daemon; then result pc_recovered_after_$m fail log="$(tail -5 $OUT/lvmirrord.log)"; return 1; fi
  t "power cut: lvmirrord up; targetctl restore"
  # what rtslib-fb-targetctl.service does at boot (after lvmirrord.service), from the saved file
  targetctl restore $PC_SAVED > "$OUT/targetctl-restore.txt" 2>&1; rc=$?
  if pc_lun && dd if=$PC_LUN of=/dev/null bs=1M count=4 iflag=direct status=none; then
    pc_status "$PC_DIR/status-recovered-$m.json"
    result pc_recovered_after_$m ok restore_rc=$rc lun=$PC_LUN seconds=$(pc_since) \
      images=$PCS_NIMAGES jobs="$PCS_JOBS" luns="$PCS_LUNS"
  else
    pc_status "$PC_DIR/status-recovered-$m.json"
    result pc_recovered_after_$m fail restore_rc=$rc restore="$(tail -3 $OUT/targetctl-restore.txt)" \
      images=$PCS_NIMAGES luns="$PCS_LUNS" log="$(grep -iE 'error|traceback|not ready' $OUT/lvmirrord.log | tail -3)"
    return 1
  fi
}

pc_check() {  # pc_check RUN MOMENT: everything the cut during run RUN (at MOMENT) must have kept
  local run=$1 m=$2 ev=$PC_DIR/run$1-events.jsonl split_hashes= sidx spath sstate sp exact=na
  local jobs0 ident n lost=-1 acked=0 checked=0 V_lost V_blocks V_acked V_checked_writes
  local V_inflight_landed V_inflight_torn V_bad V_acked_before_split V_split_returned
  local -a U=(--blocks $PC_BLOCKS --rand-blocks $PC_RAND_BLOCKS)
  jobs0=$PCS_JOBS
  t "power cut: checking run $run (cut at moment $m)"
  # 1. the split taken in this run (split moment; restore moment's split): exactly its time
  if grep -q '"resync_begin"' "$ev" 2>/dev/null; then
    rm -f "$PC_DIR/split.json"     # the split image went back into the mirror in this run
  elif grep -q '"split_begin"' "$ev" 2>/dev/null; then
    sidx=2; sstate=$PCS_STATE_2; spath=$PCS_PATH_2
    if [ "$sstate" = split ]; then
      eval "$(PCPY verify-split "$spath" "$PC_DIR" $run --base "$PC_DIR/base-$run.bin" "${U[@]}" \
              --json "$PC_DIR/verify-split-$run.json")"
      [ "$V_lost" = 0 ] && [ "$V_blocks" = $PC_BLOCKS ] && exact=yes || exact=no
      echo "{\"run\": $run, \"index\": $sidx, \"sha\": \"$(PCPY sha "$spath")\"}" > "$PC_DIR/split.json"
      PCPY hashes "$spath" "$PC_DIR/split-hashes-$run.bin" "${U[@]}"
      [ $exact = yes ] && result pc_split_exact_after_$m ok image=$sidx checked=$V_checked_writes \
          acked_before_split=$V_acked_before_split split_returned=$V_split_returned \
        || result pc_split_exact_after_$m fail image=$sidx lost="$V_lost" bad="$V_bad"
    elif grep -q '"split_done"' "$ev"; then
      exact=no
      result pc_split_exact_after_$m fail reason="the split returned before the cut but image $sidx is $sstate after it"
    else
      result pc_split_exact_after_$m ok image=$sidx split_taken=no state=$sstate \
        note="the cut came before the split was taken: the image stayed in the mirror"
    fi
  elif [ $m = split ]; then
    result pc_split_exact_after_$m fail reason="no split began in run $run (see $ev)"
  elif [ -f "$PC_DIR/split.json" ]; then
    # 2. a split image of an earlier run, still split: not one byte changed
    sidx=$(sed 's/.*"index": \([0-9]*\).*/\1/' "$PC_DIR/split.json")
    sp=$(sed 's/.*"sha": "\([0-9a-f]*\)".*/\1/' "$PC_DIR/split.json")
    eval "sstate=\$PCS_STATE_$sidx spath=\$PCS_PATH_$sidx"
    if [ "$sstate" = split ]; then
      [ "$(PCPY sha "$spath")" = "$sp" ] && exact=yes || exact=no
      [ $exact = yes ] && result pc_split_still_exact_after_$m ok image=$sidx \
        || result pc_split_still_exact_after_$m fail image=$sidx reason="the split image changed"
    else
      rm -f "$PC_DIR/split.json"
    fi
  fi
  # 3. every acknowledged write reads back from the LUN (after a restore: as the model says)
  t "power cut: reading the LUN back"
  grep -q '"restore_begin"' "$ev" 2>/dev/null && split_hashes="--split-hashes $PC_DIR/split-hashes-$run.bin"
  eval "$(PCPY verify-live $PC_LUN "$PC_DIR" $run --base "$PC_DIR/base-$run.bin" "${U[@]}" $split_hashes \
          --new-base "$PC_DIR/base-$((run + 1)).bin" --json "$PC_DIR/verify-live-$run.json" 2> "$PC_DIR/verify-live-$run.err")"
  lost=${V_lost:--1}; acked=${V_acked:-0}; checked=${V_checked_writes:-0}
  [ "$lost" = 0 ] && [ "$V_blocks" = $PC_BLOCKS ] \
    && result pc_acked_writes_after_$m ok acked=$acked checked=$checked inflight_landed=$V_inflight_landed \
         inflight_torn=$V_inflight_torn jobs_at_recovery="$jobs0" \
    || result pc_acked_writes_after_$m fail lost="$lost" acked="$acked" bad="${V_bad:-}" err="$(tail -2 $PC_DIR/verify-live-$run.err)"
  # 4. resumed jobs end; the images in sync are byte-identical
  if [ -n "$jobs0" ]; then
    t "power cut: LUN checked; waiting for jobs ($jobs0)"
    lvmirror wait $PC_VOL --timeout 600 > "$PC_DIR/wait-$m.txt" 2>&1
  fi
  case $m in
    resync|restore|attach) pc_job_check $run $m "$jobs0" ;;
  esac
  t "power cut: comparing the images"
  read ident n <<< "$(pc_images_identical)"
  [ "$ident" = yes ] && result pc_images_identical_after_$m ok images=$n \
    || result pc_images_identical_after_$m fail images=$n status="$(lvmirror status 2>&1 | head -8)"
  pc_figures moment=$m run=$run acked=$acked checked=$checked lost=$lost identical=$ident split_exact=$exact
}

pc_job_check() {  # pc_job_check RUN MOMENT JOBS-AT-RECOVERY: the job the cut interrupted ended well
  local run=$1 m=$2 j0=$3 idx state V_lost V_blocks V_bad
  case $m in resync|restore) idx=2 ;; attach) idx=3 ;; esac
  pc_status "$PC_DIR/status-after-$m.json"
  eval "state=\$PCS_STATE_$idx"
  if [ $m = restore ]; then
    # done: the image is still split, the live volume reads as the split image plus what was
    # written after the restore began (the whole LUN read again, the model of the run)
    eval "$(PCPY verify-live $PC_LUN "$PC_DIR" $run --base "$PC_DIR/base-$run.bin" --blocks $PC_BLOCKS \
            --rand-blocks $PC_RAND_BLOCKS --split-hashes "$PC_DIR/split-hashes-$run.bin" \
            --new-base "$PC_DIR/base-$((run + 1)).bin" --json "$PC_DIR/verify-restored-$run.json")"
    [ "$V_lost" = 0 ] && [ "$V_blocks" = $PC_BLOCKS ] && [ "$state" = split ] \
      && result pc_restore_equals_split_after_restore ok blocks=$V_blocks \
      || result pc_restore_equals_split_after_restore fail state=$state bad="$V_bad" lost="$V_lost"
  fi
  # the job resumed by itself after the cut (or had finished before it), and ended
  if ! grep -q "\"${m}_done\"" "$PC_DIR/run$run-events.jsonl"; then
    result pc_${m}_completes_after_$m fail reason="lvmirror $m had not returned before the cut" \
      out="$(tail -2 $PC_DIR/$m-$run.txt 2>/dev/null)"
  elif echo "$PCS_JOBS" | grep -q ":failed:"; then
    result pc_${m}_completes_after_$m fail jobs_at_recovery="$j0" jobs="$PCS_JOBS"
  elif [ $m = restore ] && [ "$state" = split ] && ! echo "$PCS_JOBS" | grep -q ":running:" \
       && $PY -c 'import json,sys; sys.exit(any(i.get("restore_running") for i in json.load(open(sys.argv[1]))["images"]))' \
            $STATE/$PC_VOL/volume.json; then
    result pc_restore_completes_after_restore ok jobs_at_recovery="$j0" jobs="$PCS_JOBS"
  elif [ $m != restore ] && [ "$state" = in-sync ]; then
    result pc_${m}_completes_after_$m ok jobs_at_recovery="$j0" jobs="$PCS_JOBS" image=$idx
  else
    result pc_${m}_completes_after_$m fail jobs_at_recovery="$j0" jobs="$PCS_JOBS" image=$idx state=$state
  fi
  if [ $m = attach ]; then
    # the LUN the saved configuration re-created (its cfgstring names 3 images, the volume has
    # 4) serves reads and writes
    head -c 4096 /dev/urandom > /run/pc-pat
    dd if=/run/pc-pat of=$PC_LUN bs=4096 seek=$((PC_BLOCKS - 1)) count=1 oflag=direct,dsync status=none \
      && cmp -s /run/pc-pat <(dd if=$PC_LUN bs=4096 skip=$((PC_BLOCKS - 1)) count=1 iflag=direct status=none) \
      && [ "$PCS_NIMAGES" = 4 ] \
      && result pc_attach_lun_serves_after_attach ok images=$PCS_NIMAGES luns="$PCS_LUNS" \
      || result pc_attach_lun_serves_after_attach fail images=$PCS_NIMAGES luns="$PCS_LUNS"
    # that block is part of the next run's base (when a moment follows)
    [ "${PC_MOMENT:-final}" = final ] || PCPY hashes $PC_LUN "$PC_DIR/base-$((run + 1)).bin" \
      --blocks $PC_BLOCKS --rand-blocks $PC_RAND_BLOCKS
  fi
}

# ------------------------------------------------------------------------------- the moments
pc_split_now() {  # pc_split_now RUN signal|-: `lvmirror split VOL 2` under the writer, marked
  pc_cli $1 split $2 split $PC_VOL 2 > "$PC_DIR/split-$1.txt" 2>&1
}

pc_bulk() {  # pc_bulk RUN: the 112 MiB bulk pass (changes most regions after a split)
  PCPY bulk $PC_LUN "$PC_DIR" $1 --start $PC_BULK_START --count $PC_BULK_COUNT 2>> "$PC_DIR/writer-$1.err"
}

pc_moment_steady() {  # pc_moment_steady RUN: random durable writes, the cut lands among them
  pc_writer_start $1 || { result pc_cut_steady fail reason="writer did not start"; return; }
  sleep 1
  pc_ready $1 steady
}

pc_moment_split() {  # pc_moment_split RUN: the cut lands around `lvmirror split` under the writer
  pc_writer_start $1 || { result pc_cut_split fail reason="writer did not start"; return; }
  pc_split_now $1 signal
  pc_ready $1 split
}

pc_moment_resync() {  # pc_moment_resync RUN: split, 112 MiB written, the cut lands in `resync --rate 6`
  pc_writer_start $1 || { result pc_cut_resync fail reason="writer did not start"; return; }
  pc_status "$PC_DIR/status-run$1.json"
  [ "$PCS_STATE_2" = split ] || pc_split_now $1 -
  pc_bulk $1
  pc_cli $1 resync after resync $PC_VOL 2 --rate 6 > "$PC_DIR/resync-$1.txt" 2>&1
  pc_ready $1 resync
}

pc_moment_restore() {  # pc_moment_restore RUN: split, 112 MiB written, the cut lands in `restore --rate 6`
  pc_writer_start $1 || { result pc_cut_restore fail reason="writer did not start"; return; }
  pc_status "$PC_DIR/status-run$1.json"
  [ "$PCS_STATE_2" = in-sync ] || lvmirror resync $PC_VOL 2 --wait > /dev/null 2>&1
  pc_split_now $1 -
  pc_bulk $1
  pc_cli $1 restore after restore $PC_VOL 2 --rate 6 > "$PC_DIR/restore-$1.txt" 2>&1
  pc_ready $1 restore
}

pc_moment_checkpoint() {  # pc_moment_checkpoint RUN: the cut lands just after a write-intent checkpoint
  local wil=$STATE/$PC_VOL/wil.bitmap half=$((PC_BLOCKS / 2))
  pc_writer_start $1 || { result pc_cut_checkpoint fail reason="writer did not start"; return; }
  # The writer keeps the first write-intent chunk (64 MiB, the default) marked. A bulk pass over
  # the second half (the LUN's other chunk) marks it; once it has been idle a flusher round the
  # checkpoint that clears it saves the log - with the writer still writing - and the cut
  # follows that save at once.
  PCPY bulk $PC_LUN "$PC_DIR" $1 --start $half --count $half 2>> "$PC_DIR/writer-$1.err"
  if PCPY wait-change $wil --count 1 --timeout 30 > "$PC_DIR/checkpoint-$1.txt"; then
    touch "$PC_DIR/cut-ready-$1"
    pc_mark $1 checkpoint mtime_ns=$(cat "$PC_DIR/checkpoint-$1.txt")
  fi
  pc_ready $1 checkpoint
}

pc_moment_attach() {  # pc_moment_attach RUN: the cut lands in the full copy of `lvmirror attach`
  pc_writer_start $1 || { result pc_cut_attach fail reason="writer did not start"; return; }
  pc_cli $1 attach after attach $PC_VOL $PC_MNT/img/pc-d.img > "$PC_DIR/attach-$1.txt" 2>&1
  pc_ready $1 attach
}
