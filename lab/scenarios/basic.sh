# lab/scenarios/basic.sh: section "basic" (daemon, targetcli, LUNs, libiscsi, open-iscsi, persistent reservations).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
basic() {
  if start_daemon; then result daemon_started ok; else result daemon_started fail log="$(tail -5 $OUT/lvmirrord.log)"; return; fi
  # Stock targetcli: the backstore type is listed from our D-Bus service, a bad cfgstring is
  # refused with our message, good ones create mirrored LUNs (2 and 3 images) next to a fileio.
  out=$(printf '%s\n' "set global auto_save_on_exit=false" "ls /backstores" \
        "/backstores/user:lvmirror create name=bad size=64M cfgstring=vol9;colour=blue" | targetcli 2>&1)
  echo "$out" >> "$OUT/targetcli.log"
  echo "$out" | grep -q "user:lvmirror" && result targetcli_lists_user_lvmirror ok || result targetcli_lists_user_lvmirror fail
  echo "$out" | grep -q "unknown option 'colour'" && result targetcli_refuses_bad_cfgstring ok || result targetcli_refuses_bad_cfgstring fail out="$(echo "$out" | tail -2)"
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=m2 size=256M cfgstring=vol2;images=/run/scratch/v2a.img+/run/scratch/v2b.img control=nl_reply_supported=-1
/backstores/user:lvmirror create name=m3 size=256M cfgstring=vol3;images=/run/scratch/v3a.img+/run/scratch/v3b.img+/run/scratch/v3c.img;region_size=256K control=nl_reply_supported=-1
/backstores/fileio create name=f0 file_or_dev=/run/scratch/f0.img size=256M write_back=false
/iscsi create $IQN
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/m2
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/m3
/iscsi/$IQN/tpg1/luns create /backstores/fileio/f0
/iscsi/$IQN/tpg1 set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1
TC
  sleep 1
  lvmirror status > "$OUT/status-basic.txt" 2>&1
  grep -q "volume vol2" "$OUT/status-basic.txt" && grep -q "volume vol3" "$OUT/status-basic.txt" \
    && result luns_created ok || result luns_created fail status="$(cat $OUT/status-basic.txt | head -5)"
  # configfs takes any bytes for a backstore name and cfgstring (a raw configfs write can make
  # one; targetcli cannot, and rtslib cannot even list the backstores while one exists:
  # UnicodeDecodeError, so both devices here are made and removed by raw configfs writes). That
  # device is served NOT READY and shown with \xNN, and a LUN made after it is served (its
  # name in sysfs once made every later event's device lookup fail).
  local hba=/sys/kernel/config/target/core/user_97 odd after
  odd="$hba/$(printf 'odd\377')"; after="$hba/after"
  { mkdir -p "$odd" "$after" && printf 'dev_size=67108864' > "$odd/control" \
      && printf 'dev_config=lvmirror/vodd\376;images=/run/scratch/odd.img' > "$odd/control" \
      && echo 1 > "$odd/enable" && printf 'dev_size=67108864' > "$after/control" \
      && printf 'dev_config=lvmirror/vafter;images=/run/scratch/after.img' > "$after/control" \
      && echo 1 > "$after/enable"; } >> "$OUT/odd-device.log" 2>&1
  sleep 2
  lvmirror status > "$OUT/status-odd.txt" 2>&1
  if grep -q 'odd\\xff' "$OUT/status-odd.txt" && grep -q 'vodd\\xfe;images=' "$OUT/status-odd.txt" \
     && grep -q 'NOT READY.*not UTF-8' "$OUT/status-odd.txt" \
     && grep -q "volume vafter" "$OUT/status-odd.txt"; then
    result device_named_not_utf8_shown ok
  else
    result device_named_not_utf8_shown fail log="$(tail -3 $OUT/odd-device.log)" status="$(head -c 600 $OUT/status-odd.txt)"
  fi
  rmdir "$odd" "$after" "$hba" >> "$OUT/odd-device.log" 2>&1
  inq=$(iscsi-inq iscsi://127.0.0.1/$IQN/0 2>&1)
  echo "$inq" | grep -q "lvmirror" && result libiscsi_inquiry ok || result libiscsi_inquiry fail out="$(echo "$inq" | head -3)"
  cap=$(iscsi-readcapacity16 iscsi://127.0.0.1/$IQN/1 2>&1 | grep 'Total size')
  echo "$cap" | grep -q 268435456 && result libiscsi_readcapacity ok out="$cap" || result libiscsi_readcapacity fail out="$cap"
  # wait for the initial full resyncs so the mirrors are complete
  lvmirror wait vol2 --timeout 300; lvmirror wait vol3 --timeout 300
  login || result open_iscsi_login fail
  d0=$(lun_dev 0); d1=$(lun_dev 1)
  [ -b "$d0" ] && [ -b "$d1" ] && result open_iscsi_login ok dev0=$d0 dev1=$d1 || result open_iscsi_login fail
  dd if=/dev/urandom of=/run/pat bs=1M count=8 status=none
  if dd if=/run/pat of=$d0 bs=1M oflag=direct status=none && cmp -n 8388608 /run/pat $d0; then
    result dd_write_readback ok; else result dd_write_readback fail; fi
  # READs the page cache holds are answered by the ring thread's compiled path on the kernel's
  # own ring (lvmirror/tcmu/_fastread.c): 4 KiB and 64 KiB reads of what was just written return
  # it, and the LUN's compiled_reads count (lvmirror status) grew
  local c0
  lun_count() {  # lun_count KEY LUN: the LUN's counter KEY in lvmirror status
    timeout 60 lvmirror --json status 2>/dev/null | $PY -c '
import json, sys
print(sum(l.get(sys.argv[1], 0) for l in json.load(sys.stdin)["luns"] if l["name"] == sys.argv[2]))' "$1" "$2"; }
  grew() {  # grew CHECK BEFORE AFTER SENT: CHECK ok when a counter grew; says how many commands the
    # compiled path served while about SENT were sent (one it declines is served by the Python
    # path, and other readers of the device count too: the check needs only some served so)
    if [ -n "$2" ] && [ -n "$3" ] && [ "$3" -gt "$2" ]; then
      result $1 ok compiled_served=$(($3 - $2)) sent=$4
    else result $1 fail before="$2" after="$3"; fi; }
  c0=$(lun_count compiled_reads m2)
  if dd if=$d0 of=/run/pat4k bs=4k count=2048 iflag=direct status=none && cmp /run/pat /run/pat4k \
     && dd if=$d0 of=/run/pat64k bs=64k count=128 iflag=direct status=none && cmp /run/pat /run/pat64k; then
    grew compiled_reads_on_the_kernel_ring "$c0" "$(lun_count compiled_reads m2)" 2176
  else
    result compiled_reads_on_the_kernel_ring fail why="the data read back differs"
  fi
  rm -f /run/pat4k /run/pat64k
  # the unit serial rtslib-fb writes just after it enables the device is the one the LUN
  # reports (Unit Serial Number VPD), and the two LUNs' identifiers (NAA) differ
  local sn0 cfs0 wwid0 wwid1
  sn0=$(sg_vpd -p sn -r "$d0" 2>/dev/null | tail -c +5 | tr -d '\0')
  cfs0=$(sed -n 's/^T10 VPD Unit Serial Number: //p' /sys/kernel/config/target/core/user_*/m2/wwn/vpd_unit_serial)
  wwid0=$(cat /sys/block/${d0#/dev/}/device/wwid 2>/dev/null); wwid1=$(cat /sys/block/${d1#/dev/}/device/wwid 2>/dev/null)
  if [ -n "$cfs0" ] && [ "$sn0" = "$cfs0" ] && [ "${wwid0#naa.6001405}" != "$wwid0" ] && [ "$wwid0" != "$wwid1" ]; then
    result unit_serial_as_configured ok serial="$sn0" wwid0="$wwid0" wwid1="$wwid1"
  else
    result unit_serial_as_configured fail serial="$sn0" configfs="$cfs0" wwid0="$wwid0" wwid1="$wwid1"
  fi
  # SCSI-3 persistent reservations (the fencing of Windows failover clusters, VMware, pacemaker):
  # LIO's core serves them for TCMU LUNs and keeps their state in <dbroot>/pr, which the package's
  # tmpfiles entry provides. Register a key, reserve Write Exclusive - Registrants Only, read both
  # back, release and unregister.
  if sg_persist -n -o -G -S 0xabc123 $d0 > "$OUT/pr.txt" 2>&1 \
     && sg_persist -n -o -R -K 0xabc123 -T 5 $d0 >> "$OUT/pr.txt" 2>&1 \
     && sg_persist -n -i -k $d0 >> "$OUT/pr.txt" 2>&1 && grep -q 0xabc123 "$OUT/pr.txt" \
     && sg_persist -n -i -r $d0 >> "$OUT/pr.txt" 2>&1 && grep -qi "registrants only" "$OUT/pr.txt" \
     && sg_persist -n -o -L -K 0xabc123 -T 5 $d0 >> "$OUT/pr.txt" 2>&1 \
     && sg_persist -n -o -G -K 0xabc123 -S 0 $d0 >> "$OUT/pr.txt" 2>&1; then
    result persistent_reservation ok dbroot="$(cat /sys/kernel/config/target/dbroot 2>/dev/null)"
  else
    result persistent_reservation fail out="$(tail -2 $OUT/pr.txt)" dbroot="$(cat /sys/kernel/config/target/dbroot 2>/dev/null)"
  fi
  # WRITEs of a one-image volume (nothing for the write-intent log) are made by the compiled
  # path on the kernel's ring too, without the GIL or the ring's lock, when the LU is write-back (WCE 1; a
  # write-through LU's writes are durable before GOOD, the Python path's): 4 KiB and 64 KiB
  # O_DIRECT writes through open-iscsi land in the image (ext4) byte for byte and read back, and
  # the LUN's compiled_writes count grew. The LUN (m1, LUN 9) is removed again, initiator first.
  local d9 w0
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=m1 size=64M cfgstring=vol1;images=/run/scratch/v1a.img hw_max_sectors=16384 control=nl_reply_supported=-1
/backstores/user:lvmirror/m1 set attribute emulate_write_cache=1
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/m1 9
TC
  rescan
  for i in $(seq 20); do d9=$(lun_dev 9); [ -b "$d9" ] && break; sleep 0.5; rescan; done
  w0=$(lun_count compiled_writes m1)
  if [ -b "$d9" ] && dd if=/run/pat of=$d9 bs=4k oflag=direct status=none \
     && cmp -n 8388608 /run/pat /run/scratch/v1a.img \
     && dd if=/dev/zero of=$d9 bs=64k count=128 oflag=direct status=none \
     && dd if=/run/pat of=$d9 bs=64k oflag=direct status=none \
     && cmp -n 8388608 /run/pat /run/scratch/v1a.img && cmp -n 8388608 /run/pat $d9; then
    grew compiled_writes_on_the_kernel_ring "$w0" "$(lun_count compiled_writes m1)" 2304
  else
    result compiled_writes_on_the_kernel_ring fail dev="$d9" why="no device, or the data in the image or read back differs"
  fi
  # and 1 MiB WRITEs and READs whole (hw_max_sectors=16384 lets them reach lvmirrord uncut, as
  # bench/run's LUNs do): a one-image volume's WRITEs up to 1 MiB are the compiled path's too
  # (COMPILED_WRITE_MAX; one that finds the path backed off after a slow batch is the Python
  # path's, so the check needs some counted, the data right), the READs (over the GIL-held
  # path's 64 KiB) are read without the GIL under a shared region lock over the blocks they
  # cover: 8 of 8 counted (more would mean the kernel cut them into smaller ones)
  local r0 w1 r1
  w0=$(lun_count compiled_writes m1)
  if [ -b "$d9" ] && dd if=/dev/zero of=$d9 bs=1M count=8 oflag=direct status=none \
     && cmp -n 8388608 /dev/zero /run/scratch/v1a.img \
     && dd if=/run/pat of=$d9 bs=1M oflag=direct status=none \
     && cmp -n 8388608 /run/pat /run/scratch/v1a.img; then
    grew large_writes_compiled "$w0" "$(lun_count compiled_writes m1)" 16
  else
    result large_writes_compiled fail dev="$d9" why="no device, or the data in the image differs"
  fi
  # (after udev's probe of the device the writes' close set off: blkid's reads, read ahead in
  # 128 KiB, are large READs too, and once landed between the two counts: 59 of 8)
  local rs
  rs=$(lun_count compiled_reads m1)
  udevadm settle 2>/dev/null
  r0=$(lun_count compiled_reads m1)
  if [ -b "$d9" ] && dd if=$d9 of=/run/pat1m bs=1M count=8 iflag=direct status=none \
     && cmp /run/pat /run/pat1m; then
    r1=$(lun_count compiled_reads m1)
    if [ -n "$r0" ] && [ -n "$r1" ] && [ $((r1 - r0)) -ge 1 ] && [ $((r1 - r0)) -le 8 ]; then
      result compiled_large_reads_on_the_kernel_ring ok commands=$((r1 - r0)) of=8 while_udev_settled=$((${r0:-0} - ${rs:-0}))
    else
      result compiled_large_reads_on_the_kernel_ring fail before="$r0" after="$r1" while_udev_settled=$((${r0:-0} - ${rs:-0}))
    fi
  else
    result compiled_large_reads_on_the_kernel_ring fail dev="$d9" why="no device, or the data read back differs"
  fi
  rm -f /run/pat1m
  # random 4 KiB writes at queue depth 32, then every block read back and checked (fio's
  # crc32c verify): the ring thread's loop under its lease (_fastread.lease_serve) takes them
  # batch after batch and waits for the kernel's next ones itself
  w0=$(lun_count compiled_writes m1)
  if [ -b "$d9" ] && fio --name=loop-verify --filename=$d9 --direct=1 --ioengine=libaio \
       --iodepth=32 --rw=randwrite --bs=4k --size=8M --verify=crc32c --do_verify=1 \
       --verify_fatal=1 --output=$OUT/fio-loop-verify.txt > /dev/null 2>&1; then
    grew compiled_random_writes_verified "$w0" "$(lun_count compiled_writes m1)" 2048
  else
    result compiled_random_writes_verified fail dev="$d9" why="fio verify failed: $(tail -3 $OUT/fio-loop-verify.txt 2>/dev/null | tr '\n' ' ')"
  fi
  [ -b "$d9" ] && echo 1 > /sys/block/${d9#/dev/}/device/delete 2>/dev/null
  tcli <<TC
set global auto_save_on_exit=false
/iscsi/$IQN/tpg1/luns delete lun9
/backstores/user:lvmirror delete m1
TC
  rm -f /run/scratch/v1a.img
  # a mirror's WRITEs on the compiled path too: a 2-image LUN (m4, LUN 10), write-back, both
  # images in sync; the first write to the write-intent log's chunk saves the log (the Python
  # path), then each 4 KiB O_DIRECT write is written to both images in turn without the GIL.
  # Both images and the LUN read back byte for byte; the LUN's compiled_writes count grew.
  local d10 insync
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=m4 size=16M cfgstring=vol4;images=/run/scratch/v4a.img+/run/scratch/v4b.img control=nl_reply_supported=-1
/backstores/user:lvmirror/m4 set attribute emulate_write_cache=1
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/m4 10
TC
  rescan
  for i in $(seq 20); do d10=$(lun_dev 10); [ -b "$d10" ] && break; sleep 0.5; rescan; done
  for i in $(seq 60); do
    insync=$(timeout 60 lvmirror --json status 2>/dev/null | $PY -c '
import json, sys
print("+".join(i["state"] for i in json.load(sys.stdin)["volumes"]["vol4"]["images"]))' 2>/dev/null)
    [ "$insync" = in-sync+in-sync ] && break; sleep 1
  done
  w0=$(lun_count compiled_writes m4)
  if [ -b "$d10" ] && [ "$insync" = in-sync+in-sync ] \
     && dd if=/run/pat of=$d10 bs=4k oflag=direct status=none \
     && cmp -n 8388608 /run/pat /run/scratch/v4a.img && cmp -n 8388608 /run/pat /run/scratch/v4b.img \
     && cmp -n 8388608 /run/pat $d10; then
    grew compiled_mirror_writes_on_the_kernel_ring "$w0" "$(lun_count compiled_writes m4)" 2048
  else
    result compiled_mirror_writes_on_the_kernel_ring fail dev="$d10" states="$insync" why="no device, not in sync, or the data in an image or read back differs"
  fi
  [ -b "$d10" ] && echo 1 > /sys/block/${d10#/dev/}/device/delete 2>/dev/null
  tcli <<TC
set global auto_save_on_exit=false
/iscsi/$IQN/tpg1/luns delete lun10
/backstores/user:lvmirror delete m4
TC
  rm -f /run/scratch/v4a.img /run/scratch/v4b.img
  touch "$OUT/target-ready"          # the host may now use the portal through hostfwd
  # and does so alone: a login from the host competing with the next sections' I/O for the
  # two emulated CPUs outran LIO's 15 s login timeout
  if [ "${LAB_HOST_SIDE:-0}" = 1 ]; then
    local i
    for i in $(seq 600); do [ -e "$OUT/host-done" ] && break; sleep 1; done
    [ -e "$OUT/host-done" ] || t "basic: the host's checks did not end within 600 s"
  fi
}

