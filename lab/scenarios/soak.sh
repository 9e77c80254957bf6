# lab/scenarios/soak.sh: sections "soak_sigkill" and "soak_split" (lab/soak; not in CI).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
#   soak_sigkill  SOAK_KILLS (default 20) times: SIGKILL of lvmirrord under a CRC-verified fio
#                 load (fio --verify=crc32c, as fio_verify_load), restart; fio must verify every
#                 block and the images must agree after recovery
#   soak_split    SOAK_CYCLES (default 20) split/resync cycles of image 2 under a CRC-verified fio
#                 load; fio must verify, the images must be identical after each resync
# Each prints its figures in one result line (soak_sigkill, soak_split) and in $OUT/soak.jsonl.

soak_lun() {  # soak_lun: lvmirrord and a 3-image LUN (volume sk) for the soak sections, logged in
  [ -n "${SOAK_DEV:-}" ] && return 0
  [ -n "${DAEMON:-}" ] || start_daemon || return 1
  export_luns $IQN "sk:256M:sk;images=/run/scratch/ska.img+/run/scratch/skb.img+/run/scratch/skc.img"
  lvmirror wait sk --timeout 300 > /dev/null 2>&1
  login; SOAK_DEV=$(lun_dev 0)
  [ -b "$SOAK_DEV" ]
}

soak_same() {  # soak_same: yes if every in-sync image of volume sk is identical to the first
  local st=/run/soak-status.json first= i same=yes n=0
  lvmirror --json status > $st 2>/dev/null
  sync; echo 3 > /proc/sys/vm/drop_caches
  for i in $($PY -c 'import json,sys; [print(i["path"]) for i in json.load(open(sys.argv[1]))["volumes"]["sk"]["images"] if i["state"] == "in-sync"]' $st 2>/dev/null); do
    n=$((n+1)); if [ -z "$first" ]; then first=$i; else cmp -s "$first" "$i" || same=no; fi
  done
  [ $n -ge 2 ] || same=no
  echo $same
}

soak_sigkill() {  # SOAK_KILLS x: SIGKILL lvmirrord under a verified fio load, restart, check
  local n=${SOAK_KILLS:-20} i ok=0 agree=0 frc fails= t0=$(date +%s)
  soak_lun || { result soak_sigkill fail reason="no LUN"; return; }
  for i in $(seq $n); do
    fio_verify_load soakkill$i $SOAK_DEV 16M $(( (i % 4) * 32 ))M
    sleep $(( 1 + RANDOM % 3 ))
    kill -9 $DAEMON; wait $DAEMON 2>/dev/null
    start_daemon || { fails="$fails $i:restart"; break; }
    wait $FIO; frc=$?
    [ $frc = 0 ] && ok=$((ok+1)) || fails="$fails $i:fio=$frc"
    lvmirror wait sk --timeout 300 > /dev/null 2>&1
    [ "$(soak_same)" = yes ] && agree=$((agree+1)) || fails="$fails $i:images"
    t "soak: SIGKILL $i of $n: fio verified $ok, images agreed $agree"
  done
  jsonl "$OUT/soak.jsonl" soak=sigkill kills=$n fio_verified=$ok images_agree=$agree seconds=$(( $(date +%s) - t0 ))
  [ $ok = $n ] && [ $agree = $n ] && result soak_sigkill ok kills=$n fio_verified=$ok images_agree=$agree \
    || result soak_sigkill fail kills=$n fio_verified=$ok images_agree=$agree fails="$fails"
}

soak_split() {  # SOAK_CYCLES x: split and resync image 2 under a verified fio load, check
  local n=${SOAK_CYCLES:-20} i ok=0 same=0 src rrc frc fails= t0=$(date +%s)
  soak_lun || { result soak_split fail reason="no LUN"; return; }
  for i in $(seq $n); do
    fio_verify_load soaksplit$i $SOAK_DEV 24M $(( (i % 4) * 48 ))M
    sleep 1
    lvmirror split sk 2 > "$OUT/soak-split.txt" 2>&1; src=$?
    sleep $(( 1 + RANDOM % 2 ))
    lvmirror resync sk 2 --wait >> "$OUT/soak-split.txt" 2>&1; rrc=$?
    wait $FIO; frc=$?
    [ $src = 0 ] && [ $rrc = 0 ] && [ $frc = 0 ] && ok=$((ok+1)) || fails="$fails $i:split=$src,resync=$rrc,fio=$frc"
    [ "$(soak_same)" = yes ] && same=$((same+1)) || fails="$fails $i:images"
    t "soak: split/resync $i of $n: fio verified $ok, images identical $same"
  done
  jsonl "$OUT/soak.jsonl" soak=split cycles=$n fio_verified=$ok images_identical=$same seconds=$(( $(date +%s) - t0 ))
  [ $ok = $n ] && [ $same = $n ] && result soak_split ok cycles=$n fio_verified=$ok images_identical=$same \
    || result soak_split fail cycles=$n fio_verified=$ok images_identical=$same fails="$fails"
}
