# lab/scenarios/ocf.sh: section "ocf" (issue: two gateways). The resource agent lvmirror ships
# for Pacemaker, ocf:lvmirror:LogicalUnit, on the real stack (LIO, rtslib-fb, lvmirrord):
# 1. resource-agents' ocf-tester runs every action against it (meta-data checked against the
#    OCF DTD, validate-all, probe, start, monitor, demote, promote, each twice, stop twice) and
#    reports no error;
# 2. started by hand as Pacemaker would, with the two-gateway ALUA layout: the LUN serves I/O,
#    REPORT TARGET PORT GROUPS shows this gateway's group Active/Optimized and the peer's
#    Standby, the unit serial is the one every node derives from the name; stop leaves no
#    backstore and lvmirrord no longer serves it, monitor then says "not running" (7);
# 3. bad parameters: a cfgstring lvmirror refuses is "not configured" (6) with the reason, a
#    start before the target exists fails (1) naming the missing target;
# 4. as a promotable clone: start leaves the volume closed (this node's group Standby; READ
#    CAPACITY answered through the Standby port), promote serves (monitor 8), demote closes
#    the volume (monitor 0), the data is there after the next promote.
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.

ocf_agent() {  # the packaged agent when the package is installed, else the checkout's
  if [ -x /usr/lib/ocf/resource.d/lvmirror/LogicalUnit ]; then
    echo /usr/lib/ocf/resource.d/lvmirror/LogicalUnit
  else
    echo "$REPO/ha/LogicalUnit"
  fi
}

ocf_run() {  # ocf_run ACTION KEY=VALUE...: the agent's ACTION with OCF_RESKEY_KEY=VALUE; echo rc
  local action=$1 kv env=(OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=lun-ocf2 __OCF_ACTION=$1)
  shift
  for kv in "$@"; do env+=("OCF_RESKEY_$kv"); done
  env "${env[@]}" "$(ocf_agent)" "$action" >> "$OUT/ocf-actions.txt" 2>&1
  echo $?
}

ocf() {
  local agent rc d a b out args serial want
  agent=$(ocf_agent)
  [ -x "$agent" ] || { result ocf_tester_clean fail reason="no agent at $agent"; return; }
  # 1. ocf-tester, every action (its own LUN 40, no ALUA)
  ocf-tester -v -n lun-ocf1 -o name=ocf1 -o "cfgstring=ocf1;images=/run/scratch/ocf1a.img+/run/scratch/ocf1b.img" \
    -o size=32M -o target_iqn=$IQN -o lun=40 "$agent" > "$OUT/ocf-tester.txt" 2>&1; rc=$?
  [ $rc = 0 ] && grep -q "passed all tests" "$OUT/ocf-tester.txt" && ! grep -q "^\* rc=" "$OUT/ocf-tester.txt" \
    && [ ! -d /sys/kernel/config/target/core/user_*/ocf1 ] \
    && result ocf_tester_clean ok || result ocf_tester_clean fail rc=$rc out="$(grep -E '^\*|rc=' "$OUT/ocf-tester.txt" | head -5 | tr '\n' ' ')"
  # 2. the two-gateway layout, started by hand: this node serves tpg 1 in group gwa, the peer's
  # tpg 3 (created, never enabled) is in group gwb
  args=(name=ocf2 "cfgstring=ocf2;images=/run/scratch/ocf2a.img+/run/scratch/ocf2b.img" size=32M
        target_iqn=$IQN lun=41 alua_group=gwa alua_group_id=11 peer_tpg=3 peer_alua_group=gwb
        peer_alua_group_id=12)
  rc=$(ocf_run start "${args[@]}"); a=$(ocf_run monitor "${args[@]}")
  rescan; d=$(lun_dev 41)
  dd if=/dev/urandom of=/run/ocf.blk bs=4096 count=8 status=none
  dd if=/run/ocf.blk of=$d bs=4096 count=8 oflag=direct status=none \
    && dd if=$d bs=4096 count=8 iflag=direct status=none | cmp -s - /run/ocf.blk; b=$?
  sg_rtpg -d $d > "$OUT/ocf-rtpg.txt" 2>&1
  out=$(tr -s ' \n' ' ' < "$OUT/ocf-rtpg.txt")
  serial=$(cat /sys/kernel/config/target/core/user_*/ocf2/wwn/vpd_unit_serial 2>/dev/null | awk '{print $NF}')
  want=$($PY -c "import uuid; print(uuid.uuid5(uuid.UUID('6f1b4e2a-6c0e-4b8e-9a57-2f6f0e5d1c3b'), 'ocf2'))")
  [ "$rc" = 0 ] && [ "$a" = 0 ] && [ $b = 0 ] && [ "$serial" = "$want" ] \
    && echo "$out" | grep -qi "target port group id : 0xb .*active/optimized" \
    && echo "$out" | grep -qi "target port group id : 0xc .*standby" \
    && result ocf_start_serves_with_alua_groups ok serial=$serial \
    || result ocf_start_serves_with_alua_groups fail start=$rc monitor=$a io=$b serial="$serial" want="$want" rtpg="$out"
  rc=$(ocf_run stop "${args[@]}"); a=$(ocf_run monitor "${args[@]}")
  b=$(lvmirror --json status | $PY -c "import json,sys; print(any(l['name'] == 'ocf2' for l in json.load(sys.stdin)['luns']))")
  [ "$rc" = 0 ] && [ "$a" = 7 ] && [ "$b" = False ] && ! ls -d /sys/kernel/config/target/core/user_*/ocf2 > /dev/null 2>&1 \
    && result ocf_stop_leaves_nothing_served ok || result ocf_stop_leaves_nothing_served fail stop=$rc monitor=$a served=$b
  # 4. as a promotable clone (Pacemaker's promotable=true): start leaves this node's group
  # Standby (the volume not open here, READ CAPACITY still answered through the Standby port),
  # promote serves, demote closes the volume again, and the data is there after the next
  # promote
  args=(name=ocf4 "cfgstring=ocf4;images=/run/scratch/ocf4a.img+/run/scratch/ocf4b.img" size=32M
        target_iqn=$IQN lun=43 alua_group=gwa alua_group_id=11 peer_tpg=3 peer_alua_group=gwb
        peer_alua_group_id=12 CRM_meta_promotable=true)
  local st pm mo dm mo2 p2 io rd cap
  st=$(ocf_run start "${args[@]}"); a=$(ocf_run monitor "${args[@]}")
  b=$(lvmirror --json status | jq -c '[(.luns[] | select(.name == "ocf4") | .standby, .volume), (.volumes | has("ocf4"))]')
  rescan; d=$(lun_dev 43)
  cap=$(sg_readcap -l $d 2>&1 | grep -o "Device size: [0-9]* bytes" | grep -o "[0-9]*")
  pm=$(ocf_run promote "${args[@]}"); mo=$(ocf_run monitor "${args[@]}")
  sg_turs $d > /dev/null 2>&1; sg_turs $d > /dev/null 2>&1   # the unit attentions of the transition
  dd if=/dev/urandom of=/run/ocf4.blk bs=4096 count=8 status=none
  dd if=/run/ocf4.blk of=$d bs=4096 count=8 oflag=direct status=none; io=$?
  dm=$(ocf_run demote "${args[@]}"); mo2=$(ocf_run monitor "${args[@]}")
  c=$(lvmirror --json status | jq -c '[(.luns[] | select(.name == "ocf4") | .standby, .volume), (.volumes | has("ocf4"))]')
  p2=$(ocf_run promote "${args[@]}")
  sg_turs $d > /dev/null 2>&1; sg_turs $d > /dev/null 2>&1
  dd if=$d bs=4096 count=8 iflag=direct status=none | cmp -s - /run/ocf4.blk; rd=$?
  rc=$(ocf_run stop "${args[@]}")
  [ "$st" = 0 ] && [ "$a" = 0 ] && [ "$b" = '[true,null,false]' ] && [ "$cap" = 33554432 ] \
    && [ "$pm" = 0 ] && [ "$mo" = 8 ] && [ $io = 0 ] && [ "$dm" = 0 ] && [ "$mo2" = 0 ] \
    && [ "$c" = '[true,null,false]' ] && [ "$p2" = 0 ] && [ $rd = 0 ] && [ "$rc" = 0 ] \
    && result ocf_promotable_clone ok \
    || result ocf_promotable_clone fail start=$st monitor=$a status="$b" capacity="$cap" promote=$pm monitor_promoted=$mo write=$io demote=$dm monitor_demoted=$mo2 status_demoted="$c" promote2=$p2 readback=$rd stop=$rc
  # 3. bad parameters
  rc=$(ocf_run validate-all name=ocf3 "cfgstring=ocf3;images=/run/scratch/x.img;region_size=3" size=32M target_iqn=$IQN lun=42)
  a=$(ocf_run start name=ocf3 "cfgstring=ocf3;images=/run/scratch/ocf3.img" size=32M target_iqn=iqn.2026-11.org.lvmirror:absent lun=42)
  [ "$rc" = 6 ] && [ "$a" = 1 ] && grep -q "ocf-exit-reason:.*region" "$OUT/ocf-actions.txt" \
    && grep -q "ocf-exit-reason:no target iqn.2026-11.org.lvmirror:absent" "$OUT/ocf-actions.txt" \
    && ! ls -d /sys/kernel/config/target/core/user_*/ocf3 > /dev/null 2>&1 \
    && result ocf_bad_parameters_refused ok || result ocf_bad_parameters_refused fail validate=$rc start=$a out="$(grep ocf-exit-reason "$OUT/ocf-actions.txt" | tail -2 | tr '\n' ' ')"
  echo "set global auto_save_on_exit=false
/iscsi/$IQN delete 3" | tcli
  rescan
}
