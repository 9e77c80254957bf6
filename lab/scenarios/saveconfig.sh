# lab/scenarios/saveconfig.sh: section "saveconfig" (targetcli-lvmirror saveconfig, clearconfig, restoreconfig).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
saveconfig() {   # targetcli-lvmirror saveconfig / clearconfig / restoreconfig round trip
  local saved=/run/scratch/saveconfig.json d sum0 sum1 nl so
  d=$(lun_dev 1); sum0=$(dd if=$d bs=1M count=32 iflag=direct status=none | md5sum)
  targetcli-lvmirror saveconfig $saved > "$OUT/saveconfig.txt" 2>&1
  $PY - $saved > "$OUT/saveconfig-control.txt" 2>&1 <<'PY'
import json, sys
for so in json.load(open(sys.argv[1]))["storage_objects"]:
    if so.get("plugin") == "user":
        print(so["name"], so.get("config"), so.get("hw_max_sectors"), so.get("control"))
PY
  grep -q "^m2 lvmirror/vol2.*nl_reply_supported=-1" "$OUT/saveconfig-control.txt" \
    && result saveconfig_keeps_nl_reply_supported ok out="$(head -1 $OUT/saveconfig-control.txt)" \
    || result saveconfig_keeps_nl_reply_supported fail out="$(cat $OUT/saveconfig-control.txt)"
  logout
  printf '%s\n' "set global auto_save_on_exit=false" "clearconfig confirm=true" | targetcli >> "$OUT/targetcli.log" 2>&1
  sleep 1
  lvmirror status > "$OUT/status-cleared.txt" 2>&1
  printf '%s\n' "set global auto_save_on_exit=false" "restoreconfig $saved" | targetcli-lvmirror >> "$OUT/targetcli.log" 2>&1
  nl=$(cat /sys/kernel/config/target/core/user_*/m2/attrib/nl_reply_supported 2>/dev/null | head -1)
  for i in $(seq 60); do     # lvmirrord opens the restored backstores' volumes as they come
    lvmirror status > "$OUT/status-restored.txt" 2>&1
    grep -q "volume vol2" "$OUT/status-restored.txt" && grep -q "volume vol3" "$OUT/status-restored.txt" && break
    sleep 1
  done
  login; d=$(lun_dev 1)
  sum1=$( [ -b "$d" ] && dd if=$d bs=1M count=32 iflag=direct status=none | md5sum)
  ! grep -q "volume vol2" "$OUT/status-cleared.txt" && grep -q "volume vol2" "$OUT/status-restored.txt" \
    && grep -q "volume vol3" "$OUT/status-restored.txt" && [ "$nl" = -1 ] && [ "$sum0" = "$sum1" ] \
    && result restoreconfig_brings_luns_back ok nl_reply_supported=$nl \
    || result restoreconfig_brings_luns_back fail nl_reply_supported="$nl" same_data=$([ "$sum0" = "$sum1" ] && echo yes || echo no) status="$(head -3 $OUT/status-restored.txt)"
}

