# lab/lib/powercut.sh: helpers of the power-cut chain (lab/powercut, lab/scenarios/powercut.sh).
# Sourced by lab/guest.sh. The volume's images and lvmirrord's state directory live on an ext4 on
# the disk lab/boot attaches (LAB_DISK, /dev/disk/by-id/virtio-lvmlab), which outlives the
# guest; the saved targetcli configuration too. The chain's own records (the writer's logs of
# acknowledged writes, events, block hashes, figures) live in $PC_DIR on the shared directory.
PC_DIR=$OUT/pc
PC_MNT=/run/pc
PC_VOL=pc
PC_SIZE_MB=128
PC_BLOCKS=$(( PC_SIZE_MB * 256 ))             # 4 KiB blocks of the LUN
PC_RAND_BLOCKS=4096                           # the random writer's area: the first 16 MiB
PC_BULK_START=4096                            # the bulk pass: the other 112 MiB
PC_BULK_COUNT=$(( PC_BLOCKS - PC_BULK_START ))
PC_STREAMS=${PC_STREAMS:-4}
PC_SAVED=$PC_MNT/saveconfig.json
PCPY() { $PY "$LAB/lib/powercut.py" "$@"; }   # PCPY COMMAND ...: the writer and checker

pc_disk() {  # pc_disk FORMAT(0|1): mount the lab disk's ext4 on $PC_MNT (mkfs first when FORMAT=1)
  local dev= i b
  modprobe virtio_blk 2>/dev/null
  for i in $(seq 50); do
    dev=$(readlink -f /dev/disk/by-id/virtio-lvmlab 2>/dev/null)
    [ -b "$dev" ] && break
    for b in /sys/block/vd*; do [ "$(cat $b/serial 2>/dev/null)" = lvmlab ] && dev=/dev/${b##*/}; done
    [ -b "$dev" ] && break
    sleep 0.2
  done
  [ -b "$dev" ] || { echo "no lab disk (serial lvmlab)"; return 1; }
  [ "$1" = 1 ] && { mkfs.ext4 -q -F "$dev" || return 1; }
  mkdir -p $PC_MNT && mount "$dev" $PC_MNT || return 1
  mkdir -p $PC_MNT/img $PC_MNT/state "$PC_DIR"
  PC_DEV=$dev
}

pc_status() {  # pc_status FILE: lvmirror --json status into FILE; sets PCS_STATE_i, PCS_PATH_i,
  eval "$(PCPY status "$1" $PC_VOL)"       # PCS_NIMAGES, PCS_INSYNC, PCS_JOBS, PCS_LUNS
}

pc_lun() {  # pc_lun: log in and set PC_LUN to the volume's /dev/sdX (LUN 0 of $IQN)
  local i
  login
  for i in $(seq 30); do PC_LUN=$(lun_dev 0); [ -b "$PC_LUN" ] && return 0; sleep 0.5; rescan; done
  return 1
}

pc_writer_start() {  # pc_writer_start RUN: the random writer (4 KiB, durable, logged) in the background
  local run=$1 i n s
  rm -f "$PC_DIR/stop-$run"
  PCPY write $PC_LUN "$PC_DIR" $run --streams $PC_STREAMS --rand-blocks $PC_RAND_BLOCKS \
    --stop "$PC_DIR/stop-$run" --pause-ms ${PC_PAUSE_MS:-40} 2> "$PC_DIR/writer-$run.err" &
  WRITER=$!
  for i in $(seq 150); do   # until every stream has acknowledged a few writes
    n=0; for s in $(seq 0 $((PC_STREAMS - 1))); do
      [ -f "$PC_DIR/run$run-s$s.log" ] && [ "$(wc -l < "$PC_DIR/run$run-s$s.log")" -ge 3 ] && n=$((n+1)); done
    [ $n = $PC_STREAMS ] && return 0
    kill -0 $WRITER 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

pc_writer_stop() {  # pc_writer_stop RUN: stop the writer and wait for it
  touch "$PC_DIR/stop-$1"; wait $WRITER 2>/dev/null
}

pc_mark() { PCPY mark "$PC_DIR" "$@"; }   # pc_mark RUN EVENT [key=value ...]
pc_cli() {  # pc_cli RUN EVENT signal|after|- LVMIRROR-ARGS...: lvmirror ARGS between two events (powercut.py
  local run=$1 ev=$2 sig=       # cli); signal: the host's cue just before the call, after: once it returned
  case $3 in signal) sig=--signal ;; after) sig=--signal-after ;; esac; shift 3
  PCPY cli $sig "$PC_DIR" $run $ev "$@"
}

pc_ready() {  # pc_ready STEP MOMENT: tell the host the moment is reached; it cuts the power
  t "power cut moment $2 reached (step $1): waiting for the host to cut"
  touch "$PC_DIR/cut-ready-$1"
  sleep ${PC_CUT_WAIT:-120}
  # still alive: the host did not cut
  result pc_cut_$2 fail reason="the host did not cut the power within ${PC_CUT_WAIT:-120} s"
}

pc_figures() {  # pc_figures key=value ...: one line of the chain's figures ($PC_DIR/figures.jsonl)
  jsonl "$PC_DIR/figures.jsonl" "$@"
}

pc_images_identical() {  # pc_images_identical: cmp every in-sync image with the first; echo yes|no N
  local first= i n=0 same=yes
  pc_status "$PC_DIR/status-cmp.json"
  sync; echo 3 > /proc/sys/vm/drop_caches
  for i in $PCS_INSYNC; do
    n=$((n+1))
    if [ -z "$first" ]; then first=$i; else cmp -s "$first" "$i" || same=no; fi
  done
  [ $n -ge 2 ] || same=no
  echo "$same $n"
}
