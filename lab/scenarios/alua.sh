# lab/scenarios/alua.sh: section "alua" (issue: two gateways). What lvmirrord answers about its
# target ports, checked with sg3-utils against LIO's own fileio backstore in the same target:
# 1. a LUN in LIO's default port group: TPGS, VPD 83h's port designators and REPORT TARGET PORT
#    GROUPS as fileio gives them (lvmirror reports implicit ALUA only: TPGS 1 where fileio says 3);
# 2. the two-gateway layout (ceph-iscsi's): group "ao" (id 1) with this node's TPG 1, group
#    "standby" (id 2) with the other gateway's TPG 2, disabled here; VPD 83h names port 1 and
#    group 1, RTPG lists both groups with their states and ports;
# 3. "ao" switched to Standby in configfs (what the resource agent does on failover): the kernel
#    refuses medium access with NOT READY, TARGET PORT IN STANDBY STATE, RTPG still answers and
#    shows it, and lvmirrord closes the volume (lvmirror status: standby, no volume open); back
#    to Active/Optimized, lvmirrord opens it again and reads and writes work again; SET
#    TARGET PORT GROUPS is refused (implicit only).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.

alua_field() {  # alua_field FILE KEY: the value after "KEY=" in sg_inq's output
  grep -o "$2=[0-9]*" "$1" | head -1 | cut -d= -f2
}

alua_follow_check() {  # alua_follow_check CHECK FILE JQ: poll lvmirror status (60 s) until JQ
  # holds of it; CHECK ok with the seconds it took (the last status in $OUT/FILE.json)
  local t0 a i
  t0=$(date +%s.%N)
  for i in $(seq 60); do
    lvmirror status --json > "$OUT/$2.json" 2>&1
    jq -e "$3" "$OUT/$2.json" > /dev/null 2>&1 && break
    sleep 1
  done
  a=$(awk -v t0=$t0 -v t1=$(date +%s.%N) 'BEGIN { printf "%.1f", t1 - t0 }')
  jq -e "$3" "$OUT/$2.json" > /dev/null 2>&1 && result $1 ok seconds=$a \
    || result $1 fail seconds=$a status="$(jq -c '.luns[] | select(.name == "al")' "$OUT/$2.json" 2>&1 | head -c 400)"
}

alua() {
  local d df a b out rc
  truncate -s 32M /run/scratch/alf.img
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=al size=32M cfgstring=al;images=/run/scratch/ala.img+/run/scratch/alb.img control=nl_reply_supported=-1
/backstores/fileio create name=alf file_or_dev=/run/scratch/alf.img size=32M
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/al lun=30
/iscsi/$IQN/tpg1/luns create /backstores/fileio/alf lun=31
TC
  rescan; d=$(lun_dev 30); df=$(lun_dev 31)
  lvmirror wait al > /dev/null 2>&1
  # 1. the default group, side by side with fileio
  sg_inq $d > "$OUT/alua-inq.txt" 2>&1; sg_inq $df > "$OUT/alua-inq-fileio.txt" 2>&1
  a=$(alua_field "$OUT/alua-inq.txt" TPGS); b=$(alua_field "$OUT/alua-inq-fileio.txt" TPGS)
  [ "$a" = 1 ] && [ "$b" = 3 ] && result alua_tpgs_in_inquiry ok lvmirror=$a fileio=$b \
    || result alua_tpgs_in_inquiry fail lvmirror="$a" fileio="$b"
  sg_vpd -p di $d > "$OUT/alua-vpd83.txt" 2>&1; sg_vpd -p di $df > "$OUT/alua-vpd83-fileio.txt" 2>&1
  for f in alua-vpd83 alua-vpd83-fileio; do
    grep -i -A1 "relative target port" "$OUT/$f.txt" | grep -io "0x[0-9a-f]*" | head -1
    grep -i -A1 "target port group" "$OUT/$f.txt" | grep -io "0x[0-9a-f]*" | head -1
  done > "$OUT/alua-vpd83.summary"
  a=$(head -2 "$OUT/alua-vpd83.summary" | tr '\n' ' '); b=$(tail -2 "$OUT/alua-vpd83.summary" | tr '\n' ' ')
  [ -n "$a" ] && [ "$a" = "$b" ] && [ "$(wc -l < "$OUT/alua-vpd83.summary")" = 4 ] \
    && grep -q "$IQN,t,0x0001" "$OUT/alua-vpd83.txt" \
    && result alua_vpd83_port_designators_as_fileio ok lvmirror="$a" fileio="$b" \
    || result alua_vpd83_port_designators_as_fileio fail lvmirror="$a" fileio="$b"
  # the same groups, states and supported states as fileio; the port: the one VPD 83h names
  # (Debian's 6.1 reports relative port 0, a reserved value, in fileio's RTPG while its VPD 83h
  # says 1, so the port ids are compared with VPD 83h, not with fileio's RTPG)
  sg_rtpg -d -e $d > "$OUT/alua-rtpg-default.txt" 2>&1; rc=$?
  sg_rtpg -d -e $df > "$OUT/alua-rtpg-default-fileio.txt" 2>&1
  a=$(rtpg_summary "$OUT/alua-rtpg-default.txt"); b=$(rtpg_summary "$OUT/alua-rtpg-default-fileio.txt")
  [ $rc = 0 ] && [ "$a" = "0x0:0x00:0x01" ] && [ "${a%:*}" = "${b%:*}" ] \
    && diff <(grep -v "^ *0x" "$OUT/alua-rtpg-default.txt") <(grep -v "^ *0x" "$OUT/alua-rtpg-default-fileio.txt") > /dev/null \
    && result alua_rtpg_default_group_as_fileio ok lvmirror="$a" fileio="$b" \
    || result alua_rtpg_default_group_as_fileio fail rc=$rc lvmirror="$a" fileio="$b"
  # 2. two gateways' groups: this node's TPG 1 in "ao", the other's TPG 2 (disabled) in "standby"
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror/al/alua create ao 1
/backstores/user:lvmirror/al/alua create standby 2
/backstores/user:lvmirror/al/alua/ao set alua alua_access_type=1 preferred=1 implicit_trans_secs=20
/backstores/user:lvmirror/al/alua/standby set alua alua_access_type=1
/backstores/user:lvmirror/al/alua/standby set alua alua_access_state=2
/iscsi/$IQN create 2
/iscsi/$IQN/tpg2 disable
/iscsi/$IQN/tpg2/luns create /backstores/user:lvmirror/al lun=30
/iscsi/$IQN/tpg1/luns/lun30 set alua alua_tg_pt_gp_name=ao
/iscsi/$IQN/tpg2/luns/lun30 set alua alua_tg_pt_gp_name=standby
TC
  sg_vpd -p di $d > "$OUT/alua-vpd83-groups.txt" 2>&1
  a=$(grep -i -A1 "target port group" "$OUT/alua-vpd83-groups.txt" | grep -io "0x[0-9a-f]*" | head -1)
  b=$(grep -i -A1 "relative target port" "$OUT/alua-vpd83-groups.txt" | grep -io "0x[0-9a-f]*" | head -1)
  [ "$a" = 0x1 ] && [ "$b" = 0x1 ] && result alua_vpd83_names_local_group ok group=$a port=$b \
    || result alua_vpd83_names_local_group fail group="$a" port="$b"
  sg_turs $d > /dev/null 2>&1; sg_turs $d > /dev/null 2>&1   # INQUIRY DATA HAS CHANGED, queued by LIO
  sg_rtpg -d -e $d > "$OUT/alua-rtpg-groups.txt" 2>&1; rc=$?
  a=$(rtpg_summary "$OUT/alua-rtpg-groups.txt")
  [ $rc = 0 ] && [ "$a" = "0x1:0x00:0x01 0x0:0x00: 0x2:0x02:0x02" ] \
    && grep -q "Implicit transition time: 20" "$OUT/alua-rtpg-groups.txt" \
    && grep -q "target port group id : 0x1 , Pref=1" "$OUT/alua-rtpg-groups.txt" \
    && result alua_rtpg_two_gateway_groups ok groups="$a" \
    || result alua_rtpg_two_gateway_groups fail rc=$rc groups="$a" out="$(head -3 "$OUT/alua-rtpg-groups.txt" | tr '\n' ' ')"
  # 3. failover as the agent does it: this node's group to Standby, then back
  echo "set global auto_save_on_exit=false
/backstores/user:lvmirror/al/alua/ao set alua alua_access_state=2" | tcli
  # lvmirrord follows: it closes the volume (and would release its lease) for the other gateway
  alua_follow_check alua_standby_closes_volume alua-standby-status \
    '(.luns[] | select(.name == "al") | .standby == true and .volume == null and .alua_state == "Standby") and (.volumes | has("al") | not)'
  dd if=$d of=/dev/null bs=4096 count=1 iflag=direct 2> "$OUT/alua-standby-read.txt"; rc=$?
  sg_turs -v $d > "$OUT/alua-standby-tur.txt" 2>&1
  sg_rtpg -d $d > "$OUT/alua-rtpg-standby.txt" 2>&1; a=$?
  out=$(rtpg_summary "$OUT/alua-rtpg-standby.txt")
  [ $rc != 0 ] && grep -qi "standby state" "$OUT/alua-standby-tur.txt" && [ $a = 0 ] \
    && [ "$out" = "0x1:0x02:0x01 0x0:0x00: 0x2:0x02:0x02" ] \
    && result alua_standby_refuses_medium_access ok groups="$out" \
    || result alua_standby_refuses_medium_access fail dd=$rc rtpg=$a groups="$out" tur="$(tail -2 "$OUT/alua-standby-tur.txt" | tr '\n' ' ')"
  echo "set global auto_save_on_exit=false
/backstores/user:lvmirror/al/alua/ao set alua alua_access_state=0" | tcli
  alua_follow_check alua_active_reopens_volume alua-active-status \
    '.luns[] | select(.name == "al") | .standby == false and .volume == "al" and .error == null'
  sg_turs $d > /dev/null 2>&1; sg_turs $d > /dev/null 2>&1   # the unit attentions the transition left
  dd if=/dev/urandom of=/run/alua.blk bs=4096 count=4 status=none
  dd if=/run/alua.blk of=$d bs=4096 count=4 oflag=direct status=none; rc=$?
  dd if=$d bs=4096 count=4 iflag=direct status=none | cmp -s - /run/alua.blk; a=$?
  sg_raw -v $d a4 0a 00 00 00 00 00 00 00 00 00 00 > "$OUT/alua-stpg.txt" 2>&1
  [ $rc = 0 ] && [ $a = 0 ] && grep -qi "invalid command operation code" "$OUT/alua-stpg.txt" \
    && result alua_active_again_and_no_stpg ok || result alua_active_again_and_no_stpg fail write=$rc readback=$a stpg="$(tail -2 "$OUT/alua-stpg.txt" | tr '\n' ' ')"
  # leave the target as the other sections expect it (saveconfig saves it all)
  tcli <<TC
set global auto_save_on_exit=false
/iscsi/$IQN delete 2
/iscsi/$IQN/tpg1/luns delete lun30
/iscsi/$IQN/tpg1/luns delete lun31
/backstores/user:lvmirror delete al
/backstores/fileio delete alf
TC
  rescan
}
