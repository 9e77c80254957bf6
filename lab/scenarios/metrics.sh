# lab/scenarios/metrics.sh: section "metrics" (issue: operating the mirror). Debian's
# prometheus-node-exporter serves lvmirrord's metrics file through its textfile collector (on
# 127.0.0.1 only); an image on a device-mapper disk that dies (dm-error) shows up there as
# failed, the volume as degraded, within lvmirrord's interval (2 s here, start_daemon); after
# the disk is back and the image resynced, the volume reads optimal again.
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.

NE_URL=http://127.0.0.1:9100/metrics

ne_wait() {  # ne_wait TIMEOUT REGEX...: poll the node exporter until a line matches every REGEX
  # (each a full sample line); prints the seconds it took, or "timeout"
  $PY - "$NE_URL" "$@" <<'PY'
import re, sys, time, urllib.request
url, timeout, pats = sys.argv[1], float(sys.argv[2]), [re.compile(p) for p in sys.argv[3:]]
t0 = time.monotonic()
while time.monotonic() - t0 < timeout:
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        text = ""
    lines = text.splitlines()
    if all(any(p.fullmatch(line) for line in lines) for p in pats):
        print(f"{time.monotonic() - t0:.2f}")
        sys.exit(0)
    time.sleep(0.2)
print("timeout")
PY
}

metrics() {
  local d n t ok=1
  prometheus-node-exporter --web.listen-address=127.0.0.1:9100 --collector.disable-defaults \
    --collector.textfile --collector.textfile.directory=/run/textfile > "$OUT/node-exporter.log" 2>&1 &
  local ne=$!
  if ! dm_init mx 64; then
    result metrics_node_exporter_serves_lvmirror fail why="dm_init mx failed"; kill $ne; return
  fi
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=mx size=60M cfgstring=mx;images=/run/scratch/mxa.img+/dev/mapper/mx control=nl_reply_supported=-1
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/mx lun=22
TC
  rescan; d=$(lun_dev 22)
  lvmirror wait mx > /dev/null 2>&1
  dd if=/dev/urandom of=$d bs=1M count=8 oflag=direct status=none
  t=$(ne_wait 30 'lvmirror_up 1' 'lvmirror_volume_health\{state="optimal",volume="mx"\} 1' \
        'lvmirror_image_state\{image="1",path="/dev/mapper/mx",state="in-sync",volume="mx"\} 1' \
        'lvmirror_lun_command_duration_seconds_count\{lun="mx",op="write"\} [1-9][0-9]*' \
        'node_textfile_scrape_error 0')
  curl_out() { $PY -c "import urllib.request; print(urllib.request.urlopen('$NE_URL').read().decode())"; }
  curl_out > "$OUT/metrics-healthy.txt" 2>&1
  [ "$t" != timeout ] && result metrics_node_exporter_serves_lvmirror ok after_s=$t \
    || result metrics_node_exporter_serves_lvmirror fail got="$(grep -E 'lvmirror_up|health|textfile' $OUT/metrics-healthy.txt | head -8)"
  # the disk under image 1 dies; the next write (durable: FUA or a SYNCHRONIZE CACHE after it)
  # fails it before it is acknowledged; the clock starts once it is
  dm_error mx
  dd if=/dev/urandom of=$d bs=64k count=4 oflag=direct,dsync status=none
  t=$(ne_wait 30 'lvmirror_image_state\{image="1",path="/dev/mapper/mx",state="failed",volume="mx"\} 1' \
        'lvmirror_volume_health\{state="degraded",volume="mx"\} 1' \
        'lvmirror_volume_write_errors_total\{volume="mx"\} [1-9][0-9]*')
  curl_out > "$OUT/metrics-failed.txt" 2>&1
  lvmirror status > "$OUT/metrics-status-failed.txt" 2>&1
  # lvmirrord writes every 2 s; the poll adds its own 0.2 s and a TCG-slow HTTP round trip
  [ "$t" != timeout ] && $PY -c "import sys; sys.exit(0 if float('$t') <= 2 + 3 else 1)" \
    && result metrics_failed_image_shown ok after_s=$t interval_s=2 \
    || result metrics_failed_image_shown fail after_s=$t got="$(grep -E 'image_state.*failed|health' $OUT/metrics-failed.txt | head -6)"
  dm_linear mx
  lvmirror resync mx 1 --wait > "$OUT/metrics-resync.txt" 2>&1
  t=$(ne_wait 30 'lvmirror_volume_health\{state="optimal",volume="mx"\} 1' \
        'lvmirror_image_state\{image="1",path="/dev/mapper/mx",state="in-sync",volume="mx"\} 1')
  [ "$t" != timeout ] && result metrics_recovery_shown ok after_s=$t || result metrics_recovery_shown fail
  lvmirror metrics > "$OUT/metrics-cli.txt" 2>&1
  targetcli-lvmirror /backstores/user:lvmirror/mx metrics > "$OUT/metrics-targetcli.txt" 2>&1
  grep -q '^lvmirror_volume_health{volume="mx",state="optimal"} 1$' "$OUT/metrics-cli.txt" \
    && grep -q '^lvmirror_lun_command_duration_seconds_count{lun="mx",op="write"} ' "$OUT/metrics-targetcli.txt" \
    && result metrics_cli_prints_them ok || result metrics_cli_prints_them fail out="$(head -3 $OUT/metrics-cli.txt)" tcli="$(head -3 $OUT/metrics-targetcli.txt)"
  kill $ne 2>/dev/null; wait $ne 2>/dev/null
  tcli <<TC
/iscsi/$IQN/tpg1/luns delete lun22
/backstores/user:lvmirror delete mx
TC
  rescan
  dm_remove mx > /dev/null
}
