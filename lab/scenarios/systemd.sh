# lab/scenarios/systemd.sh: section "systemd" (the packaged lvmirrord.service with systemd as PID 1; lab/boot --systemd).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
systemd() {  # the packaged lvmirrord.service with systemd as PID 1: installed and started by dpkg,
             # serving under its hardening, restarted after SIGKILL, stopped cleanly, D-Bus-activated
  local virt container pid pid2 pid3 t0 t1 pickup pickup_s ready_s en owner tcmu d sum0 sum1 n n0 frc rc exposure
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
  export_luns $IQN "s3:128M:svc;images=/run/scratch/s3a.img+/run/scratch/s3b.img+/run/scratch/s3c.img"
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
  #    (the figures: seconds from the kill to the ring's pickup and to READY=1; the kernel fails
  #    a command left in the ring after its cmd_time_out)
  pid=$(unit_prop MainPID); t0=$(date +%s.%N); kill -9 $pid
  pid2=$(wait_active $pid 60); t1=$(date +%s.%N)
  wait $FIO; frc=$?
  n=$(unit_prop NRestarts)
  pickup=$(journalctl --no-pager -o short-unix -u lvmirrord.service --since "@${t0%.*}" 2>/dev/null \
           | awk '/picked up existing LUN/ {print $1; exit}')
  pickup_s=$([ -n "$pickup" ] && echo "$pickup - $t0" | bc -l | xargs printf '%.1f')
  ready_s=$(echo "$t1 - $t0" | bc -l | xargs printf '%.1f')
  [ -n "$pid2" ] && [ "$n" = $(( ${n0:-0} + 1 )) ] && [ $frc = 0 ] \
    && result service_restarted_after_sigkill ok killed=$pid new=$pid2 restarts=$n pickup_s=$pickup_s ready_s=$ready_s \
    || result service_restarted_after_sigkill fail killed=$pid new=$pid2 restarts=$n fio=$frc \
              pickup_s=$pickup_s ready_s=$ready_s err="$(tail -2 $OUT/fio-svc-kill.err)"
  python3 -X importtime -c "import lvmirror.daemon.main" 2> "$OUT/importtime.txt"

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

  # 6. the scheduled backup cycle: lvmirror-backup@svc.timer enabled (systemd lists its next
  #    run), its service run now (split, qcow2 copy, resync, keep 2, logged in the journal); a
  #    cycle that cannot work fails its unit, which systemd shows
  mkdir -p /etc/lvmirror/backup
  printf '[backup]\nmembers = svc:2\ndest = /run/scratch/bk\nformat = qcow2\nkeep = 2\nrate = 50\n' \
    > /etc/lvmirror/backup/svc.conf
  systemctl enable --now lvmirror-backup@svc.timer > "$OUT/backup-timer.txt" 2>&1
  local next brc bres bfiles bstate
  next=$(systemctl show -P NextElapseUSecRealtime lvmirror-backup@svc.timer)
  for _ in 1 2; do systemctl start lvmirror-backup@svc.service; brc=$?; sleep 1; done
  bres=$(systemctl show -P Result lvmirror-backup@svc.service)
  bfiles=$(ls /run/scratch/bk/svc 2>/dev/null | grep -c '^svc-.*Z\.qcow2$')
  bstate=$(lvmirror --json status | python3 -c "import json,sys; print(json.load(sys.stdin)['volumes']['svc']['images'][2]['state'])")
  [ $brc = 0 ] && [ "$bres" = success ] && [ -n "$next" ] && [ "$bfiles" = 2 ] && [ "$bstate" = in-sync ] \
    && journal -u lvmirror-backup@svc.service | grep -q "backup cycle of svc:2 done" \
    && result backup_timer_service ok next="$next" files=$bfiles \
    || result backup_timer_service fail rc=$brc result=$bres next="$next" files=$bfiles image=$bstate \
              journal="$(journal -u lvmirror-backup@svc.service | tail -3)"
  : > /run/scratch/not-a-dir
  printf '[backup]\nmembers = svc:2\ndest = /run/scratch/not-a-dir\n' > /etc/lvmirror/backup/bad.conf
  unit_fails_saying lvmirror-backup@bad.service "FAILED: backup of svc image 2" backup_timer_failure_shown
  # a mistyped instance (no such configuration file) fails too, saying so; it is not skipped
  unit_fails_saying lvmirror-backup@nosuch.service "/etc/lvmirror/backup/nosuch.conf: No such file" \
    backup_timer_missing_config_fails
  # 7. the monthly scrub: the package enables lvmirror-scrub.timer; its service scrubs every
  #    volume at the rate it is given and fails, visibly, when a region is left different
  local senabled snext src sres
  senabled=$(systemctl is-enabled lvmirror-scrub.timer 2>&1)
  snext=$(systemctl show -P NextElapseUSecRealtime lvmirror-scrub.timer)
  systemctl start lvmirror-scrub.service; src=$?
  sres=$(systemctl show -P Result lvmirror-scrub.service)
  [ "$senabled" = enabled ] && [ -n "$snext" ] && [ $src = 0 ] && [ "$sres" = success ] \
    && journal -u lvmirror-scrub.service | grep -q "svc: scrub done .* 0 mismatch(es)" \
    && result scrub_timer_service ok next="$snext" \
    || result scrub_timer_service fail enabled="$senabled" next="$snext" rc=$src result="$sres" \
              journal="$(journal -u lvmirror-scrub.service | tail -3)"
  local rs
  rs=$(lvmirror --json status | python3 -c "import json,sys; print(json.load(sys.stdin)['volumes']['svc']['region_size'])")
  dd if=/dev/urandom of=/run/scratch/s3b.img bs=4096 count=1 seek=$((2 * rs / 4096)) conv=notrunc oflag=direct status=none
  systemctl start lvmirror-scrub.service; src=$?
  [ $src != 0 ] && [ "$(systemctl is-failed lvmirror-scrub.service)" = failed ] \
    && journal -u lvmirror-scrub.service | grep -q "region 2 (LBA .*): images read as 0+2 | 1; image(s) 0+2 hold the majority" \
    && lvmirror scrub svc --repair --wait > "$OUT/scrub-repair.txt" 2>&1 \
    && cmp -s /run/scratch/s3a.img /run/scratch/s3b.img \
    && result scrub_timer_mismatch_shown ok \
    || result scrub_timer_mismatch_shown fail rc=$src state="$(systemctl is-failed lvmirror-scrub.service)" \
              journal="$(journal -u lvmirror-scrub.service | tail -3)"
  journalctl --no-pager -o short-monotonic -u lvmirror-scrub.service > "$OUT/scrub-journal.log" 2>&1
  # 8. the packaged unit writes its metrics where Debian's node exporter reads them, and the
  #    node exporter (its own unit, on 127.0.0.1 here) serves them
  local mtext
  systemctl is-active -q prometheus-node-exporter || systemctl start prometheus-node-exporter
  sleep 6
  mtext=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=20).read().decode())" 2>&1)
  echo "$mtext" > "$OUT/node-exporter-metrics.txt"
  [ -f /var/lib/prometheus/node-exporter/lvmirror.prom ] \
    && echo "$mtext" | grep -q '^lvmirror_volume_health{state="optimal",volume="svc"} 1$' \
    && echo "$mtext" | grep -q '^node_textfile_scrape_error 0$' \
    && result metrics_unit_served_by_node_exporter ok \
    || result metrics_unit_served_by_node_exporter fail file="$(ls -l /var/lib/prometheus/node-exporter/ 2>&1 | tail -2)" \
              ne="$(systemctl is-active prometheus-node-exporter)" got="$(echo "$mtext" | grep -E 'lvmirror_up|textfile' | head -3)"
  journalctl --no-pager -o short-monotonic -u 'lvmirror-backup@*' > "$OUT/backup-journal.log" 2>&1
  journalctl --no-pager -o short-monotonic -u lvmirrord.service > "$OUT/lvmirrord-journal.log" 2>&1
  journal -u dbus.service > "$OUT/dbus-journal.log"
}

