# lab/scenarios/lease.sh: section "lease" (issue: two gateways). Volume leases with Debian's
# sanlock: a volume is open on one gateway at most. The lease area is a dm device over a loop
# file (so it can fail), sanlock runs without its watchdog (-w 0, as lvm2's tests run it) and
# with a 2 s I/O timeout. The other gateway is a second sanlock daemon in this guest, with its
# own run directory (SANLOCK_RUN_DIR) and host id 2, holding a lease through lvmirror's own
# lease code, as a second lvmirrord would:
# 1. lvmirror lease-init writes the area; lvmirrord (host id 1) serves a direct=1 volume under
#    its lease (status shows it); a volume without direct=1 is refused with the reason;
# 2. a volume whose lease host 2 holds is refused: the LUN answers NOT READY and lvmirrord says
#    which host holds it; once host 2 lets it go, the same LUN serves (lvmirrord tries again
#    while the LUN's port group is Active here);
# 3. the lease area fails (dm-error): sanlock stops the volume's process before its lease can
#    expire, and the LUN answers NOT READY instead of writing unprotected;
# 4. a 4K-native lease area: lease-init, a lease taken, refused to another process, released.
# Runs last in its boot: it restarts lvmirrord with leases (every other section's volumes are
# then refused, lacking direct=1) and without them at its end.
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.

lease_lun_error() {  # lease_lun_error NAME: the error lvmirrord gives for LUN NAME ("" if none)
  lvmirror --json status | $PY -c "
import json,sys
print(next((l['error'] or '' for l in json.load(sys.stdin)['luns'] if l['name'] == '$1'), 'no such LUN'))"
}

lease_restart() {  # lease_restart [LVMIRRORD-ARGS...]: lvmirrord stopped and started with them
  kill $DAEMON; wait $DAEMON 2>/dev/null
  LVMIRRORD_EXTRA="$*" start_daemon
}

lease_4k() {  # lease_4k: step 4 of the section, on its own loop device and sanlock daemon
  local l4 out rc a b
  truncate -s 8M /run/lease4k.img
  l4=$(losetup --sector-size 4096 -f --show /run/lease4k.img) \
    || { result lease_4k_native_area fail reason="no 4K loop device"; return; }
  mkdir -p /run/sanlock3
  SANLOCK_RUN_DIR=/run/sanlock3 sanlock daemon -w 0 -o 2 > "$OUT/sanlock3.log" 2>&1
  sleep 1
  out=$(SANLOCK_RUN_DIR=/run/sanlock3 lvmirror lease-init $l4 --io-timeout 2 2>&1); rc=$?
  echo "$out" > "$OUT/lease-4k-init.txt"
  rm -f /run/lease-4k.done
  SANLOCK_RUN_DIR=/run/sanlock3 $PY -c "
import os, time
from lvmirror.daemon.lease import LeaseConfig, Leases
l = Leases(LeaseConfig('$l4', 3, 2))
l.acquire('v4k')
print('held', l.held(), flush=True)
for _ in range(600):                 # until the second process was refused (or 60 s)
    if os.path.exists('/run/lease-4k.done'):
        break
    time.sleep(0.1)
l.release('v4k')
print('released', l.held(), flush=True)" > "$OUT/lease-4k-holder.txt" 2>&1 &
  a=$!
  for i in $(seq 90); do grep -q held "$OUT/lease-4k-holder.txt" && break; sleep 1; done
  SANLOCK_RUN_DIR=/run/sanlock3 $PY -c "
from lvmirror.daemon.lease import LeaseConfig, LeaseError, Leases
try:
    Leases(LeaseConfig('$l4', 3, 2)).acquire('v4k')
    print('taken twice')
except LeaseError as exc:
    print('refused:', exc)" > "$OUT/lease-4k-second.txt" 2>&1
  touch /run/lease-4k.done
  wait $a; b=$?
  sanlock direct dump $l4 > "$OUT/lease-4k-dump.txt" 2>&1
  [ $rc = 0 ] && echo "$out" | grep -q "4096-byte sectors (host ids 1 to 250)" && [ $b = 0 ] \
    && grep -q "held {'v4k': 0}" "$OUT/lease-4k-holder.txt" && grep -q "released {}" "$OUT/lease-4k-holder.txt" \
    && grep -q "refused:.*held by another process of this host" "$OUT/lease-4k-second.txt" \
    && result lease_4k_native_area ok \
    || result lease_4k_native_area fail init="$out" holder="$(tail -2 "$OUT/lease-4k-holder.txt" | tr '\n' ' ')" second="$(tail -1 "$OUT/lease-4k-second.txt")"
  SANLOCK_RUN_DIR=/run/sanlock3 sanlock shutdown -f 1 > /dev/null 2>&1
  losetup -d $l4
}

lease() {
  local area=/dev/mapper/lease rc out d1 d3 t0 t1 holder i
  dm_init lease 8 || { result lease_area_initialised fail reason="no dm device"; return; }
  mkdir -p /run/sanlock /run/sanlock2
  sanlock daemon -w 0 -o 2 > "$OUT/sanlock1.log" 2>&1
  SANLOCK_RUN_DIR=/run/sanlock2 sanlock daemon -w 0 -o 2 > "$OUT/sanlock2.log" 2>&1
  sleep 1
  out=$(lvmirror lease-init $area --io-timeout 2 2>&1); rc=$?
  echo "$out" > "$OUT/lease-init.txt"
  [ $rc = 0 ] && echo "$out" | grep -q "6 volume slots" && ! lvmirror lease-init $area > /dev/null 2>&1 \
    && result lease_area_initialised ok || result lease_area_initialised fail rc=$rc out="$out"
  t0=$(date +%s.%N)
  lease_restart --lease-area $area --host-id 1 --lease-io-timeout 2
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=ls1 size=32M cfgstring=ls1;images=/run/scratch/ls1a.img+/run/scratch/ls1b.img;direct=1 control=nl_reply_supported=-1
/backstores/user:lvmirror create name=ls0 size=32M cfgstring=ls0;images=/run/scratch/ls0a.img+/run/scratch/ls0b.img control=nl_reply_supported=-1
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/ls1 lun=50
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/ls0 lun=51
TC
  rescan; d1=$(lun_dev 50)
  lvmirror wait ls1 > /dev/null 2>&1; t1=$(date +%s.%N)
  dd if=/dev/urandom of=/run/lease.blk bs=4096 count=8 status=none
  dd if=/run/lease.blk of=$d1 bs=4096 count=8 oflag=direct status=none \
    && dd if=$d1 bs=4096 count=8 iflag=direct status=none | cmp -s - /run/lease.blk; rc=$?
  lvmirror status > "$OUT/lease-status.txt" 2>&1
  out=$(lease_lun_error ls0)
  [ $rc = 0 ] && grep -q "lease held: sanlock host id 1, slot" "$OUT/lease-status.txt" \
    && echo "$out" | grep -q "add ;direct=1" \
    && result lease_volume_served_under_lease ok seconds_to_serve=$($PY -c "print(round($t1 - $t0, 1))") \
    || result lease_volume_served_under_lease fail io=$rc ls0="$out" status="$(grep -A1 "volume ls1" "$OUT/lease-status.txt" | tr '\n' ' ')"
  # 2. "the other gateway" (host id 2) holds volume ls3's lease
  SANLOCK_RUN_DIR=/run/sanlock2 $PY -c "
import sys, time
from lvmirror.daemon.lease import LeaseConfig, Leases
Leases(LeaseConfig('$area', 2, 2)).acquire('ls3')
print('held', flush=True)
time.sleep(600)" > "$OUT/lease-host2.txt" 2>&1 &
  holder=$!
  for i in $(seq 60); do grep -q held "$OUT/lease-host2.txt" && break; sleep 1; done
  echo "set global auto_save_on_exit=false
/backstores/user:lvmirror create name=ls3 size=32M cfgstring=ls3;images=/run/scratch/ls3a.img+/run/scratch/ls3b.img;direct=1 control=nl_reply_supported=-1
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/ls3 lun=52" | tcli
  rescan; d3=$(lun_dev 52)
  out=$(lease_lun_error ls3)
  sg_turs -v $d3 > "$OUT/lease-held-tur.txt" 2>&1
  [ -n "$d3" ] && grep -q held "$OUT/lease-host2.txt" && echo "$out" | grep -q "held by sanlock host id 2" \
    && grep -qi "not ready" "$OUT/lease-held-tur.txt" && [ ! -e /run/scratch/ls3a.img ] \
    && result lease_held_elsewhere_refused ok || result lease_held_elsewhere_refused fail host2="$(tail -2 "$OUT/lease-host2.txt" | tr '\n' ' ')" error="$out" tur="$(tail -1 "$OUT/lease-held-tur.txt")"
  # host 2 lets go: the LUN's port group is Active here (LIO's default group), so lvmirrord
  # keeps trying and serves it by itself, no new LUN needed
  t0=$(date +%s.%N)
  kill $holder; wait $holder 2>/dev/null
  for i in $(seq 60); do
    out=$(lease_lun_error ls3)
    [ -z "$out" ] && break
    sleep 1
  done
  t1=$(date +%s.%N)
  rescan; d3=$(lun_dev 52)
  dd if=/run/lease.blk of=$d3 bs=4096 count=8 oflag=direct status=none; rc=$?
  [ -z "$out" ] && [ $rc = 0 ] && result lease_taken_once_released ok seconds=$($PY -c "print(round($t1 - $t0, 1))") \
    || result lease_taken_once_released fail error="$out" write=$rc
  # 3. the lease area fails under a served volume: sanlock stops its process; NOT READY after
  t0=$(date +%s.%N)
  dm_error lease
  rc=1
  for i in $(seq 90); do
    sleep 1
    out=$(lease_lun_error ls1)
    [ -n "$out" ] && { rc=0; break; }
  done
  t1=$(date +%s.%N)
  sg_turs -v $d1 > "$OUT/lease-lost-tur.txt" 2>&1
  grep -i "lvmirror\|lease\|sanlock\|ls1" "$OUT/lvmirrord.log" | tail -20 > "$OUT/lease-lost-log.txt"
  [ $rc = 0 ] && grep -qi "not ready" "$OUT/lease-lost-tur.txt" \
    && result lease_lost_stops_serving ok seconds=$($PY -c "print(round($t1 - $t0, 1))") error="$out" \
    || result lease_lost_stops_serving fail error="$out" tur="$(tail -1 "$OUT/lease-lost-tur.txt")"
  # 4. a 4K-native lease area (a loop device with 4096-byte logical sectors) and a third
  #    sanlock daemon (host id 3): lease-init lays it out in 4 KiB sectors; a process takes a
  #    volume's lease in it, a second one is refused naming the holder, the first releases it
  lease_4k
  # back to the other sections' setup: no leases, the LUNs of this section gone
  dm_linear lease
  echo "set global auto_save_on_exit=false
/iscsi/$IQN/tpg1/luns delete lun50
/iscsi/$IQN/tpg1/luns delete lun51
/iscsi/$IQN/tpg1/luns delete lun52
/backstores/user:lvmirror delete ls1
/backstores/user:lvmirror delete ls0
/backstores/user:lvmirror delete ls3" | tcli
  lease_restart
  sanlock shutdown -f 1 > /dev/null 2>&1; SANLOCK_RUN_DIR=/run/sanlock2 sanlock shutdown -f 1 > /dev/null 2>&1
  rescan
}
