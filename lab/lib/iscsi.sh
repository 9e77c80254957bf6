# lab/lib/iscsi.sh: the open-iscsi initiator side and fio loads. Sourced by lab/guest.sh.
# The open-iscsi side; TARGET defaults to the lab's $IQN (bench/lab-bench.sh uses its own).
lun_dev() {  # lun_dev LUN [TARGET] -> /dev/sdX of the open-iscsi session
  readlink -f /dev/disk/by-path/ip-127.0.0.1:3260-iscsi-${2:-$IQN}-lun-$1
}

login() {  # login [TARGET]
  pidof iscsid >/dev/null || { iscsid; sleep 1; }
  iscsiadm -m discovery -t sendtargets -p 127.0.0.1 >/dev/null &&
  iscsiadm -m node -T ${1:-$IQN} -p 127.0.0.1 --login >/dev/null
  udevadm settle 2>/dev/null; sleep 1
}
logout() { iscsiadm -m node -T ${1:-$IQN} -p 127.0.0.1 --logout >/dev/null 2>&1; udevadm settle 2>/dev/null; }
rescan() { iscsiadm -m session --rescan >/dev/null 2>&1; udevadm settle 2>/dev/null; sleep 1; }
fio_verify_load() {  # fio_verify_load NAME DEV SIZE OFFSET [FIO-OPTION ...]: in the background (FIO),
  local name=$1 dev=$2 size=$3 offset=$4; shift 4   # 4 KiB random writes, CRC-checked when they end
  fio --name=$name --filename=$dev --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=8 \
      --size=$size --offset=$offset --verify=crc32c --do_verify=1 --verify_fatal=1 "$@" \
      --output-format=json > "$OUT/fio-$name.json" 2> "$OUT/fio-$name.err" &
  FIO=$!
}

rtpg_summary() {  # rtpg_summary FILE: sg_rtpg -d output as "ID:STATE:PORT,PORT ..." (hex, as printed)
  awk '/target port group id :/ {if (g != "") printf "%s:%s:%s ", g, s, p; g=$6; s=""; p=""; inports=0}
       /asymmetric access state :/ {s=$(NF-1)}
       /Relative target port ids:/ {inports=1; next}
       inports && /^ *0x/ {p = p (p == "" ? "" : ",") $1}
       END {if (g != "") printf "%s:%s:%s", g, s, p}' "$1"
}
