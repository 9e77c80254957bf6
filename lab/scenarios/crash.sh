# lab/scenarios/crash.sh: section "crash" (SIGKILL of lvmirrord under a verified load).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
crash() {   # SIGKILL lvmirrord under load, restart it: the initiator recovers, nothing acked lost
  d=$(lun_dev 0)
  fio_verify_load crash $d 32M 64M
  sleep 4
  kill -9 $DAEMON; wait $DAEMON 2>/dev/null
  sleep 2
  start_daemon && result daemon_restarted ok || result daemon_restarted fail
  wait $FIO; frc=$?
  [ $frc = 0 ] && result sigkill_fio_verify_ok ok || result sigkill_fio_verify_ok fail fio=$frc err="$(tail -3 $OUT/fio-crash.err)"
  # crash recovery copies the regions the write-intent log marks while the LUN serves; it is
  # listed with the jobs, so lvmirror wait waits for it
  lvmirror status > "$OUT/crash-status.txt" 2>&1
  lvmirror wait vol2 --timeout 300 >> "$OUT/crash-status.txt" 2>&1
  sync; echo 3 > /proc/sys/vm/drop_caches
  cmp -s /run/scratch/v2a.img /run/scratch/v2b.img && result sigkill_images_agree ok \
    || result sigkill_images_agree fail status="$(lvmirror status 2>&1 | grep -A4 'volume vol2')"
}

