# lab/scenarios/tcmurunner.sh: section "tcmurunner" (lvmirrord registers with tcmu-runner).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
tcmurunner() {   # tcmu-runner owns org.kernel.TCMUService1: lvmirrord registers with its HandlerManager1
  local runner out st i
  command -v tcmu-runner >/dev/null || { result lvmirrord_registers_with_tcmu_runner fail reason="tcmu-runner not installed"; return; }
  logout
  kill $DAEMON; wait $DAEMON 2>/dev/null
  tcmu-runner --debug > "$OUT/tcmu-runner.log" 2>&1 & runner=$!
  wait_bus_name org.kernel.TCMUService1 $runner
  start_daemon && grep -q "registered handler lvmirror with tcmu-runner" "$OUT/lvmirrord.log" \
    && result lvmirrord_registers_with_tcmu_runner ok \
    || result lvmirrord_registers_with_tcmu_runner fail log="$(tail -3 $OUT/lvmirrord.log)"
  # the stock targetcli, through tcmu-runner: lists user:lvmirror, tcmu-runner forwards CheckConfig
  # to lvmirrord (our message for a bad cfgstring), a new LUN is served by lvmirrord
  out=$(printf '%s\n' "set global auto_save_on_exit=false" "ls /backstores" \
        "/backstores/user:lvmirror create name=bad size=64M cfgstring=volr;colour=blue" \
        "/backstores/user:lvmirror create name=rr size=64M cfgstring=volr;images=/run/scratch/ra.img+/run/scratch/rb.img control=nl_reply_supported=-1" \
        "/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/rr" | targetcli 2>&1)
  echo "$out" >> "$OUT/targetcli.log"
  sleep 2
  lvmirror wait volr --timeout 120 > /dev/null 2>&1
  login
  d=$(lun_dev 3)
  head -c 1048576 /dev/urandom > /run/rrpat
  st=fail
  [ -b "$d" ] && dd if=/run/rrpat of=$d bs=1M oflag=direct status=none && cmp -n 1048576 /run/rrpat $d && st=ok
  echo "$out" | grep -q "user:lvmirror" && echo "$out" | grep -q "unknown option 'colour'" && [ $st = ok ] \
    && lvmirror status | grep -q "volume volr" \
    && result targetcli_through_tcmu_runner ok dev=$d \
    || result targetcli_through_tcmu_runner fail dev="$d" io=$st out="$(echo "$out" | tail -3)" runner="$(tail -2 $OUT/tcmu-runner.log)"
  # tcmu-runner restarts (as systemd would restart it): lvmirrord registers again by itself
  kill $runner; wait $runner 2>/dev/null
  tcmu-runner --debug >> "$OUT/tcmu-runner.log" 2>&1 & runner=$!
  for i in $(seq 100); do grep -q "with the restarted tcmu-runner" "$OUT/lvmirrord.log" && break; sleep 0.2; done
  out=$(printf '%s\n' "set global auto_save_on_exit=false" "ls /backstores" | targetcli 2>&1)
  echo "$out" >> "$OUT/targetcli.log"
  grep -q "with the restarted tcmu-runner" "$OUT/lvmirrord.log" && echo "$out" | grep -q "user:lvmirror" \
    && result reregisters_when_tcmu_runner_restarts ok \
    || result reregisters_when_tcmu_runner_restarts fail log="$(tail -2 $OUT/lvmirrord.log)"
  logout
  printf '%s\n' "set global auto_save_on_exit=false" "/iscsi/$IQN/tpg1/luns delete lun3" \
    "/backstores/user:lvmirror delete rr" | targetcli >> "$OUT/targetcli.log" 2>&1
  kill $runner; wait $runner 2>/dev/null
  login
}

