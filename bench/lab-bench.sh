# Sourced by lab/guest.sh (section "bench") INSIDE the kernel-lab guest; uses its helpers
# (result, t, start_daemon, tcli). The side-by-side benchmark of issue 6:
#
#   targets  lvmirror1 / lvmirror2 / lvmirror3  user:lvmirror on 1, 2, 3 image files
#            md-raid1                          LIO iblock on an md RAID1 (internal write-intent
#                                              bitmap) of loop devices on the same image files
#            fileio                            LIO fileio on image file 0
#            tcmu-runner                       Debian's tcmu-runner, user:qcow on image file 0
#                                              (raw: the file is exactly the LUN's size), over
#                                              the same TCMU ring as lvmirror; lvmirrord is
#                                              stopped meanwhile (see runner_up)
#   jobs     bench/jobs/*.fio through open-iscsi on the guest's /dev/sdX, the same files for all
#   extra    lvmirror3: I/O latency around a split under a random-write load; resync of 1% changed
#            vs full; md-raid1: md's own resync of the same size.
#
# Every target runs on the same image files (img0..img2, recreated sparse for each target and
# filled by an unmeasured sequential write first), with the same cache mode: write-back
# (fileio write_back=true, lvmirror emulate_write_cache=1, tcmu-runner's qcow handler WCE=1 of
# its own, loop devices buffered), and the initiator's view of it is recorded. The TCMU LUNs
# (user:lvmirror, user:qcow) advertise the same largest transfer (hw_max_sectors). Output: $OUT/bench/<target>/<job>.json (fio JSON),
# $OUT/bench/meta.json, $OUT/bench/targets.jsonl, $OUT/bench/split/, $OUT/bench/resync.jsonl;
# bench/report.py turns them into the table.
#
# Settings (environment, passed by bench/run through lab/boot): BENCH_TARGETS (run in the order
# given, separated by spaces or commas), BENCH_JOBS,
# BENCH_RUNTIME (s per job), BENCH_RAMP (s), BENCH_SIZE_MB (LUN size), BENCH_PROFILE=1 (py-spy
# records lvmirrord during each job, with BENCH_SPY_OPTS added to its options, "--gil" say; figures are then perturbed and only the profile counts),
# BENCH_LVMIRROR_WCE=0 (lvmirror's LUNs write-through, LIO's default for a user backstore,
# instead of the write-back all targets share by default; meta.json records it),
# BENCH_LVMIRROR_IMAGES=null_blk (lvmirror's images are null_blk devices opened with direct=1:
# the storage costs nothing and no page cache copy is made, which leaves lvmirrord's READ path
# for direct I/O (its worker pool, not the ring thread's compiled reads from the page cache)
# and the TCMU ring's own cost; meta.json records it),
# BENCH_FTRACE=1 (the time the guest spends in each copy of the READ path during each job of
# every target, ftrace's function_graph -> <job>.ftrace; BENCH_FTRACE_FUNCS="f ..." traces
# other kernel functions; figures perturbed),
# BENCH_STRACE=1 (strace -c counts the handler's system calls during each job of lvmirror and
# tcmu-runner -> <target>/<job>.strace; figures are perturbed, the calls per command count;
# BENCH_STRACE=calls: every call with its thread for 2 s of each job -> <job>.strace-calls;
# BENCH_STRACE=perf: perf trace's summary by thread, then perf stat's context switches, each
# over half of RUNTIME -> <job>.perf-trace).

BIQN=iqn.2026-11.org.lvmirror:bench
BDIR=/run/scratch/bench
BOUT=$OUT/bench

now() { date +%s.%N; }

b_login() {   # guest.sh's login and lun_dev, on the bench's target
  login $BIQN || return 1
  BDEV=$(lun_dev 0 $BIQN)
  [ -b "$BDEV" ]
}
b_logout() {
  logout $BIQN
  iscsiadm -m node -T $BIQN -p 127.0.0.1 -o delete >/dev/null 2>&1
}

fresh_images() {
  mkdir -p $BDIR
  for i in 0 1 2; do rm -f $BDIR/img$i; truncate -s ${SIZE_MB}M $BDIR/img$i; done
}

drop_image_cache() {  # drop_image_cache FILE...: write back, then evict only these files' pages
  # (not the whole page cache: with the guest's root on 9p under TCG, evicting lvmirrord's
  # own Python and libraries made every resync after it pay seconds of page faults, a cost
  # md's in-kernel resync never has and a real server never sees)
  sync
  local f
  for f in "$@"; do dd if="$f" iflag=nocache count=0 status=none; done
}

fill_file() {  # fill_file PATH: sequential 1 MiB writes of fio's random buffers over the whole file
  fio --name=fill --filename=$1 --rw=write --bs=1M --size=${SIZE_MB}M --ioengine=psync \
      --end_fsync=1 --output=/dev/null
}

# ------------------------------------------------------------ tcmu-runner
# tcmu-runner owns org.kernel.TCMUService1 (targetcli lists user:qcow from it) and answers the
# netlink events of its subtypes. It cannot take that name while lvmirrord serves it, and it
# resets the kernel's pending netlink commands when it starts: lvmirrord (no LUN of its own is
# exported at that point) stops for the tcmu-runner target and starts again after it, as the
# lab's tcmurunner section does.
runner_up() {
  if [ -n "${DAEMON:-}" ]; then kill $DAEMON; wait $DAEMON 2>/dev/null; DAEMON=; fi
  mkdir -p $BOUT/tcmu-runner/log
  tcmu-runner --tcmu-log-dir $BOUT/tcmu-runner/log > $BOUT/tcmu-runner/stdout.log 2>&1 & RUNNER=$!
  wait_bus_name org.kernel.TCMUService1 $RUNNER
}
runner_down() {
  [ -n "${RUNNER:-}" ] && { kill $RUNNER; wait $RUNNER 2>/dev/null; RUNNER=; }
  start_daemon || result bench_daemon fail when=after_tcmu_runner
}

# ------------------------------------------------------------ targets up / down
target_up() {  # target_up NAME -> BSTORE (targetcli path); sets up the backstore + iSCSI target
  local name=$1 vol
  fresh_images
  case $name in
    fileio)
      BSTORE=/backstores/fileio/bt
      echo "/backstores/fileio create name=bt file_or_dev=$BDIR/img0 size=${SIZE_MB}M write_back=true" ;;
    lvmirror[123])
      local n=${name#lvmirror} imgs img=$BDIR/img opts=
      if [ "$LV_IMAGES" = null_blk ]; then
        # null_blk devices read with O_DIRECT complete without touching the data area: what is
        # left is lvmirrord's direct I/O READ path and the ring's own cost (the kernel's copy of
        # the data area into the command's pages, the ring's notifications). The module is
        # loaded again unless it has three devices of at least the LUN's size.
        if ! [ -b /dev/nullb2 ] || [ $(( $(blockdev --getsize64 /dev/nullb0) >> 20 )) -lt $SIZE_MB ]; then
          modprobe -r null_blk 2>/dev/null
          modprobe null_blk nr_devices=3 gb=$(( (SIZE_MB + 1023) / 1024 )) \
            || { echo "modprobe null_blk failed" >&2; return 1; }
        fi
        img=/dev/nullb opts=";direct=1"
      fi
      imgs=$(for i in $(seq 0 $((n - 1))); do printf '%s' "$img$i+"; done); imgs=${imgs%+}
      BSTORE=/backstores/user:lvmirror/bt; vol=bench$n
      echo "/backstores/user:lvmirror create name=bt size=${SIZE_MB}M cfgstring=$vol;images=$imgs$opts hw_max_sectors=${BENCH_HW_MAX_SECTORS:-16384} control=nl_reply_supported=-1"
      echo "$BSTORE set attribute emulate_write_cache=${BENCH_LVMIRROR_WCE:-1}" ;;
    tcmu-runner)
      runner_up >&2 || { echo "tcmu-runner did not take org.kernel.TCMUService1" >&2; return 1; }
      BSTORE=/backstores/user:qcow/bt
      # no emulate_write_cache=1: the qcow handler reports WCE=1 by itself and refuses the
      # attribute's reconfig event (EOPNOTSUPP)
      echo "/backstores/user:qcow create name=bt size=${SIZE_MB}M cfgstring=$BDIR/img0 hw_max_sectors=${BENCH_HW_MAX_SECTORS:-16384}" ;;
    md-raid1)
      modprobe raid1
      echo 10000000 > /proc/sys/dev/raid/speed_limit_max
      echo 10000000 > /proc/sys/dev/raid/speed_limit_min
      fill_file $BDIR/img0; fill_file $BDIR/img1
      drop_image_cache $BDIR/img0 $BDIR/img1
      L0=$(losetup -f --show $BDIR/img0); L1=$(losetup -f --show $BDIR/img1)
      # md's initial resync of the two image files is the resync figure md is compared on
      local t0 t1
      t0=$(now)
      mdadm --create /dev/md0 --run --level=1 --raid-devices=2 --metadata=1.2 \
            --bitmap=internal $L0 $L1 > $BOUT/mdadm.log 2>&1 || { echo "mdadm --create failed" >&2; return 1; }
      for _ in $(seq 40); do   # the resync thread starts right after the array does
        [ "$(cat /sys/block/md0/md/sync_action 2>/dev/null)" != idle ] && break; sleep 0.05
      done
      mdadm --wait /dev/md0 >/dev/null 2>&1
      t1=$(now)
      jsonl $BOUT/resync.jsonl target=md-raid1 kind=md_resync_full \
         bytes=$(( $(cat /sys/block/md0/md/component_size) * 1024 )) \
         seconds=$($PY -c "print(round($t1 - $t0, 3))") bitmap=internal
      BSTORE=/backstores/block/bt
      echo "/backstores/block create name=bt dev=/dev/md0" ;;
    *) echo "unknown target $name" >&2; return 1 ;;
  esac > $BOUT/$name/targetcli.in || return 1
  {
    echo "set global auto_save_on_exit=false"
    cat $BOUT/$name/targetcli.in
    echo "/iscsi create $BIQN"
    echo "/iscsi/$BIQN/tpg1/luns create $BSTORE"
    echo "/iscsi/$BIQN/tpg1 set attribute authentication=0 demo_mode_write_protect=0 generate_node_acls=1 cache_dynamic_acls=1"
  } | targetcli > $BOUT/$name/targetcli.log 2>&1
  [ -n "${vol:-}" ] && lvmirror wait $vol --timeout 600 >/dev/null 2>&1
  b_login || return 1
  local sd=${BDEV#/dev/}
  jsonl $BOUT/targets.jsonl target=$name dev=$BDEV backstore=$BSTORE \
     "initiator_write_cache=$(cat /sys/block/$sd/queue/write_cache)" \
     max_sectors_kb=$(cat /sys/block/$sd/queue/max_sectors_kb) \
     size_bytes=$(blockdev --getsize64 $BDEV)
  # unmeasured: fill the LUN so every job reads and overwrites allocated data
  fio --name=prefill --filename=$BDEV --rw=write --bs=1M --iodepth=8 --ioengine=libaio --direct=1 \
      --size=${SIZE_MB}M --output=/dev/null
  # and write it back: otherwise the first job shares the guest with the write-back of the
  # prefill's dirty pages (twice as many for two image files as for one), which the jobs
  # after it do not (a 2-image volume's first job swung from 0.16 to 0.40 of md's)
  sync
}

forget_volume() {  # forget_volume VOLUME: once lvmirrord has closed it (its LUN is gone), remove
  local i                # its state: the next target recreates the image files, and lvmirrord
  for i in $(seq 60); do # refuses a new volume on paths an existing volume names as its images
    lvmirror --json status 2>/dev/null \
      | $PY -c "import json,sys; sys.exit('$1' in json.load(sys.stdin)['volumes'])" && break
    sleep 0.5
  done
  rm -rf "${STATE:?}/$1"
}

target_down() {
  b_logout
  printf '%s\n' "set global auto_save_on_exit=false" "/iscsi delete $BIQN" \
    "$(dirname $BSTORE) delete $(basename $BSTORE)" | targetcli >> $BOUT/$1/targetcli.log 2>&1
  if [ $1 = md-raid1 ]; then
    mdadm --stop /dev/md0 >/dev/null 2>&1; losetup -d $L0 $L1
  fi
  [[ $1 == lvmirror[123] ]] && forget_volume bench${1#lvmirror}
  [ $1 = tcmu-runner ] && runner_down
  return 0
}

# ------------------------------------------------------------ the jobs
tree_pids() {  # tree_pids PID: PID and its descendants (lvmirrord's volume processes)
  local c
  echo $1
  for c in $(pgrep -P $1); do tree_pids $c; done
}

handler_pids() {  # handler_pids TARGET: the processes of the target's user-space handler:
  case $1 in       # lvmirrord and its volume processes, or tcmu-runner; nothing for the
    lvmirror*) [ -n "${DAEMON:-}" ] && tree_pids $DAEMON ;;     # kernel's own targets
    tcmu-runner) [ -n "${RUNNER:-}" ] && tree_pids $RUNNER ;;
  esac
  return 0
}

thread_ns() {  # thread_ns PID...: "TID NS" for every thread of these processes: nanoseconds on
  local p t ns   # a CPU, the scheduler's own clock (sum_exec_runtime, schedstat's first field),
  for p in "$@"; do   # not clock ticks, which sample it. Neither counts the kernel's work in
    for t in /proc/$p/task/*; do   # softirq, so the compiled loop's WRITEs measure
      read -r ns _ < $t/schedstat 2>/dev/null && echo "${t##*/} $ns"   # erratically under TCG
    done             # (README, Performance, 2026-12-05). Shell builtins only: the window's
  done               # edges fork nothing (a fork costs the guest milliseconds under TCG)
}

thread_names() {  # thread_names TARGET: "TID NAME" - lvmirrord's Python thread names (py-spy
  local p         # dump), tcmu-runner's comm
  case $1 in
    lvmirror*) for p in $(tree_pids ${DAEMON:-}); do
                 timeout 30 $REPO/.venv/bin/py-spy dump --pid $p 2>/dev/null \
                   | sed -n 's/^Thread \([0-9]*\) ([a-z]*): "\(.*\)"$/\1 \2/p'
               done ;;
    tcmu-runner) for p in /proc/${RUNNER:-0}/task/*; do echo "${p##*/} $(cat $p/comm)"; done ;;
  esac
}

guest_threads() {  # guest_threads: "TID NS COMM" for every thread of the guest, the kernel's
  local t ns c     # (kworkers, the loop device's, iSCSI's) and fio's with the handler's:
  for t in /proc/[0-9]*/task/[0-9]*; do   # schedstat's nanoseconds on a CPU. Builtins only,
    read -r ns _ < $t/schedstat 2>/dev/null || continue   # as thread_ns (the window's edges
    read -r c < $t/comm 2>/dev/null || c=?                 # fork nothing)
    echo "${t##*/} $ns $c"
  done
}

irq_line() {  # irq_line: /proc/stat's interrupt total and "softirq" line as one line (builtins only)
  local l intr= soft=
  while read -r l; do
    case $l in intr*) set -- $l; intr=$2 ;; softirq*) soft=$l ;; esac
  done < /proc/stat
  echo "$intr $soft"
}

stat_line() {  # stat_line: /proc/stat's "cpu" and "ctxt" lines as one line (builtins only)
  local l out=
  while read -r l; do
    case $l in "cpu "*|ctxt*) out="$out $l" ;; esac
  done < /proc/stat
  echo "$out"
}

job_cpu() {  # job_cpu TARGET JOB: the CPU over the job's measured RUNTIME s (after its RAMP).
  # Both edges of the window read files with shell builtins only, so the bench's own forks
  # (pgrep over the handler's process tree, py-spy for thread names) fall outside it.
  #  - every target: the whole guest, /proc/stat's "cpu" line (USER_HZ ticks of all vCPUs:
  #    user nice system idle iowait irq softirq steal) and "ctxt" -> $BOUT/TARGET/JOB.sys;
  #    bench/report.py gives the busy share, CPU ms a command by kind and context switches
  #  - lvmirror and tcmu-runner: the handler's threads (schedstat, ns) -> JOB.cpu, and per
  #    thread "TID NS NAME" -> JOB.threads; report.py divides by the commands fio completed
  #  - every target: every thread of the guest outside the handler (the kernel's threads:
  #    writeback, the loop device's workers, iSCSI's; fio) -> JOB.others, "TID NS COMM",
  #    largest first; read just outside /proc/stat's edges, so its window is a little longer
  local pids ga gb ia ib
  pids=$(handler_pids $1)
  sleep $RAMP
  guest_threads > $BOUT/$1/$2.others-a
  ga=$(stat_line); ia=$(irq_line)
  [ -n "$pids" ] && thread_ns $pids > $BOUT/$1/$2.threads-a
  sleep $RUNTIME
  gb=$(stat_line); ib=$(irq_line)
  [ -n "$pids" ] && thread_ns $pids > $BOUT/$1/$2.threads-b
  guest_threads > $BOUT/$1/$2.others-b
  awk 'FILENAME ~ /threads-a$/ { h[$1] = 1; next }
       FILENAME ~ /others-a$/ { a[$1] = $2; next }
       ($1 in a) && !($1 in h) && $2 > a[$1] { printf "%s %d %s\n", $1, $2 - a[$1], substr($0, length($1 " " $2) + 2) }' \
    ${pids:+$BOUT/$1/$2.threads-a} $BOUT/$1/$2.others-a $BOUT/$1/$2.others-b \
    | sort -k2,2nr > $BOUT/$1/$2.others
  rm -f $BOUT/$1/$2.others-[ab]
  echo "$ga $gb" | awk -v secs=$RUNTIME -v cpus=$(nproc) '{
    # fields: cpu user nice system idle iowait irq softirq steal guest guest_nice ctxt N, twice
    h = NF / 2
    user = ($(h+2) + $(h+3)) - ($2 + $3); kern = $(h+4) - $4; irq = $(h+7) - $7
    softirq = $(h+8) - $8; steal = $(h+9) - $9
    idle = ($(h+5) + $(h+6)) - ($5 + $6); ctxt = $NF - $h
    printf "{\"busy\": %d, \"idle\": %d, \"ctxt\": %d, \"user\": %d, \"system\": %d, \"irq\": %d, \"softirq\": %d, \"steal\": %d, \"hz\": 100, \"seconds\": %d, \"cpus\": %d}\n",
      user + kern + irq + softirq + steal, idle, ctxt, user, kern, irq, softirq, steal, secs, cpus }' \
    > $BOUT/$1/$2.sys
  # the guest's hardware interrupts and softirqs by kind over the window -> JOB.irqs
  echo "$ia $ib" | awk -v secs=$RUNTIME '{
    # fields: intr softirq TOTAL HI TIMER NET_TX NET_RX BLOCK IRQ_POLL TASKLET SCHED HRTIMER RCU, twice
    split("HI TIMER NET_TX NET_RX BLOCK IRQ_POLL TASKLET SCHED HRTIMER RCU", n, " ")
    h = NF / 2
    printf "{\"seconds\": %d, \"interrupts\": %d, \"softirqs\": %d", secs, $(h+1) - $1, $(h+3) - $3
    for (i = 4; i <= h; i++) printf ", \"%s\": %d", n[i-3], $(h+i) - $i
    printf "}\n" }' > $BOUT/$1/$2.irqs
  [ -n "$pids" ] || return 0
  thread_names $1 > $BOUT/$1/$2.threads-n
  awk 'FILENAME ~ /-a$/ { a[$1] = $2; next }
       ($1 in a) { s += $2 - a[$1] } END { printf "{\"ticks\": %d, \"hz\": 1000000000, \"seconds\": %d, \"clock\": \"schedstat\"}\n", s, secs }' \
    secs=$RUNTIME $BOUT/$1/$2.threads-a $BOUT/$1/$2.threads-b > $BOUT/$1/$2.cpu
  awk 'FILENAME ~ /-n$/ { n[$1] = substr($0, length($1) + 2); next }
       FILENAME ~ /-a$/ { a[$1] = $2; next }
       ($1 in a) { printf "%s %d %s\n", $1, $2 - a[$1], ($1 in n) ? n[$1] : "?" }' \
    $BOUT/$1/$2.threads-n $BOUT/$1/$2.threads-a $BOUT/$1/$2.threads-b \
    | sort -k2,2nr > $BOUT/$1/$2.threads
  rm -f $BOUT/$1/$2.threads-[abn]
}

handler_strace() {  # handler_strace TARGET JOB: the system calls of the target's handler (every
  local root p args=  # thread of lvmirrord and its volume processes, or tcmu-runner) over the
  case $1 in          # job's RUNTIME after its RAMP, counted by strace -c -> $BOUT/TARGET/JOB.strace
    lvmirror*) root=${DAEMON:-} ;;
    tcmu-runner) root=${RUNNER:-} ;;
    *) return 0 ;;
  esac
  [ -n "$root" ] || return 0
  sleep $RAMP
  for p in $(tree_pids $root); do args="$args -p $p"; done
  if [ "${BENCH_STRACE:-0}" = perf ]; then    # perf trace's summary by thread (tracepoints,
    # far less perturbing than ptrace) and the threads' names -> JOB.perf-trace
    for p in $(tree_pids $root); do
      for t in /proc/$p/task/*; do echo "thread ${t##*/} $(cat $t/comm 2>/dev/null)"; done
    done > $BOUT/$1/$2.perf-trace
    timeout -s INT $((RUNTIME / 2)) perf trace -s -p $(tree_pids $root | paste -sd,) \
      2>> $BOUT/$1/$2.perf-trace >/dev/null || true
    timeout -s INT $((RUNTIME / 2)) perf stat -e context-switches,task-clock -p $(tree_pids $root | paste -sd,) \
      2>> $BOUT/$1/$2.perf-trace >/dev/null || true
  elif [ "${BENCH_STRACE:-0}" = calls ]; then   # every call, by thread, for 2 s: JOB.strace-calls
    timeout -s INT 2 strace -f -q -tt -o $BOUT/$1/$2.strace-calls $args 2>/dev/null || true
  else
    timeout -s INT $RUNTIME strace -c -f -q -o $BOUT/$1/$2.strace $args 2>/dev/null || true
  fi
}

FTRACE=/sys/kernel/tracing
guest_ftrace() {  # guest_ftrace TARGET JOB: trace, during half of the job after its RAMP, the
  # guest's calls of the READ path's copy functions with ftrace's function_graph tracer (those
  # functions alone; perf's sampling sees only the idle loop under TCG): filemap_read (a page
  # cache copy: a handler's read, md's loop devices) and tcmu_handle_completions (the kernel's
  # copy of the data area into the command's pages, when a handler completes a READ), or the
  # functions BENCH_FTRACE_FUNCS names. Durations exclude the time the task slept
  # (sleep-time 0) but include interrupts taken meanwhile. ftrace_report reads the trace once
  # the job's CPU window has closed. -> $BOUT/TARGET/JOB.ftrace-filter (what took effect)
  local tr=$FTRACE f
  [ -e $tr/current_tracer ] || mount -t tracefs nodev $tr 2>/dev/null || true
  if ! [ -e $tr/current_tracer ]; then echo "# no tracefs" > $BOUT/$1/$2.ftrace-filter; return 0; fi
  echo nop > $tr/current_tracer; : > $tr/set_ftrace_filter
  for f in ${BENCH_FTRACE_FUNCS:-filemap_read tcmu_handle_completions}; do
    echo "$f" >> $tr/set_ftrace_filter 2>/dev/null || true
  done
  cp $tr/set_ftrace_filter $BOUT/$1/$2.ftrace-filter
  # an empty filter would trace every kernel function
  [ -s $BOUT/$1/$2.ftrace-filter ] || { echo "# none of: ${BENCH_FTRACE_FUNCS:-}" > $BOUT/$1/$2.ftrace-filter; return 0; }
  echo 16384 > $tr/buffer_size_kb; echo 1 > $tr/options/funcgraph-tail; echo 0 > $tr/options/sleep-time
  sleep $RAMP
  : > $tr/trace; echo 1 > $tr/tracing_on; echo function_graph > $tr/current_tracer
  sleep $((RUNTIME / 2))
  echo 0 > $tr/tracing_on       # (a change of tracer would empty the buffer)
}

ftrace_report() {  # ftrace_report TARGET JOB: guest_ftrace's trace, per function its calls,
  # total and mean microseconds -> $BOUT/TARGET/JOB.ftrace; then the tracer's settings back
  local tr=$FTRACE out=$BOUT/$1/$2.ftrace
  [ -e $BOUT/$1/$2.ftrace-filter ] || return 0
  { echo "# filter: $(grep -v '^#' $BOUT/$1/$2.ftrace-filter | tr '\n' ' ')$(grep '^#' $BOUT/$1/$2.ftrace-filter)"
    echo "# overruns (events lost): $(awk '/^overrun:/ { s += $2 } END { print s + 0 }' $tr/per_cpu/cpu*/stats 2>/dev/null)"
    # function_graph lines: "CPU) [mark] DURATION us | name();" or "... us | } /* name [module] */";
    # plain awk (mawk: no gawk on a stock Debian)
    awk -v secs=$((RUNTIME / 2)) '
      {
        d = ""; name = ""; bar = 0
        for (i = 1; i <= NF; i++) {
          if ($i == "us" && i > 1) d = $(i - 1)
          if ($i == "|" && !bar) bar = i
        }
        if (d == "" || !bar || bar >= NF) next
        if ($(bar + 1) == "}") { if ($(bar + 2) == "/*") name = $(bar + 3) } else name = $(bar + 1)
        sub(/\(.*/, "", name)
        if (name == "") next
        calls[name]++; total[name] += d
      }
      END { printf "# function calls total_us mean_us (over %d s)\n", secs
            for (f in calls) printf "%s %d %.0f %.1f\n", f, calls[f], total[f], total[f] / calls[f] }' $tr/trace
  } > $out
  echo nop > $tr/current_tracer; : > $tr/trace; : > $tr/set_ftrace_filter
  echo 1 > $tr/options/sleep-time; echo 0 > $tr/options/funcgraph-tail; echo 1410 > $tr/buffer_size_kb
  echo 1 > $tr/tracing_on; rm -f $BOUT/$1/$2.ftrace-filter
}

ring_counts() {  # ring_counts -> one JSON object: the bench LUN's commands so far, those its
  # ring thread answered itself (no hand-off to a worker), its ring stalls, the READs and
  # WRITEs of its compiled path and its latency histogram (lvmirror status)
  timeout 60 lvmirror --json status 2>/dev/null | $PY -c '
import json, sys
luns = [l for l in json.load(sys.stdin).get("luns", []) if l.get("name") == "bt"]
print(json.dumps({k: luns[0].get(k) for k in ("commands", "ring_thread_commands", "ring_stalls",
                                               "compiled_reads", "compiled_writes", "latency", "ring_gil_waits")}
                 if luns else {}))' 2>/dev/null || echo '{}'
}

run_jobs() {  # run_jobs TARGET
  local target=$1 job spy ring trace gcpu ftr
  if [ "${BENCH_PROFILE:-0}" != 1 ] && [[ $target == lvmirror* || $target == tcmu-runner ]]; then
    t "bench $target idle"    # the handler's CPU with the LUN logged in and no I/O: its
    job_cpu $target idle      # background (timers, the ALUA follow, metrics) -> idle.cpu
  fi
  for job in $JOBS; do
    t "bench $target $job"
    spy= ring= trace= gcpu= ftr=
    # the LUN's counts before and after the job -> <job>.ring; taken before the CPU window
    # opens and after it closes, so the status calls are outside the measured seconds
    if [[ $target == lvmirror* ]]; then ring=$(ring_counts); fi
    if [ "${BENCH_PROFILE:-0}" = 1 ] && [ -n "${DAEMON:-}" ] && [[ $target == lvmirror* ]]; then
      mkdir -p $BOUT/profile
      $REPO/.venv/bin/py-spy record --pid $DAEMON --subprocesses --rate 97 --nonblocking ${BENCH_SPY_OPTS:-} --format raw \
        --output $BOUT/profile/$target-$job.txt --duration $((RUNTIME + RAMP)) \
        > $BOUT/profile/$target-$job.log 2>&1 &
      spy=$!
    fi
    if [ "${BENCH_PROFILE:-0}" != 1 ]; then job_cpu $target $job & gcpu=$!; fi
    if [ "${BENCH_FTRACE:-0}" = 1 ]; then guest_ftrace $target $job & ftr=$!; fi
    if [ "${BENCH_STRACE:-0}" != 0 ] && [[ $target == lvmirror* || $target == tcmu-runner ]]; then
      handler_strace $target $job & trace=$!
    fi
    DEV=$BDEV RUNTIME=$RUNTIME RAMP=$RAMP SIZE=${SIZE_MB}M \
      fio --output-format=json $REPO/bench/jobs/$job.fio > $BOUT/$target/$job.json 2> $BOUT/$target/$job.err \
      || result bench_${target}_$job fail err="$(tail -2 $BOUT/$target/$job.err)"
    [ -n "$spy" ] && wait $spy
    [ -n "$trace" ] && { wait $trace || true; }
    if [ -n "$gcpu" ]; then wait $gcpu || true; fi
    if [ -n "$ftr" ]; then wait $ftr || true; ftrace_report $target $job; fi
    if [ -n "$ring" ]; then echo "{\"before\": $ring, \"after\": $(ring_counts)}" > $BOUT/$target/$job.ring; fi
  done
}

# ------------------------------------------------------------ lvmirror only: split, resync
job_figures() {  # job_figures VOLUME IMAGE KIND: the finished job's bytes and seconds -> resync.jsonl
  lvmirror --json status > $BOUT/status.json 2>&1
  $PY - "$1" "$2" "$3" $BOUT/status.json >> $BOUT/resync.jsonl <<'PY'
import json, sys
vol, index, kind, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
v = json.load(open(path))["volumes"][vol]
image_id = next(i["id"] for i in v["images"] if i["index"] == index)
j = next(j for j in v["jobs"] if j["image_id"] == image_id and j["kind"] == "resync")
print(json.dumps(dict(target=vol, kind=kind, bytes=j["bytes_done"], bytes_total=j["bytes_total"],
                      seconds=round(j["elapsed"], 3), state=j["state"],
                      region_size=v["region_size"], size=v["size"])))
PY
}

split_latency() {  # 4 KiB random writes at QD 8 for SPLIT_RUN s; split image 2 of VOLUME at 40%
  local vol=$1 run=$(( RUNTIME * 2 > 12 ? RUNTIME * 2 : 12 ))
  mkdir -p $BOUT/split
  t "bench split latency ($run s load)"
  fio --name=splitload --filename=$BDEV --rw=randwrite --bs=4k --iodepth=8 --ioengine=libaio \
      --direct=1 --time_based --runtime=$run --size=${SIZE_MB}M --norandommap --randrepeat=0 \
      --write_lat_log=$BOUT/split/io --log_unix_epoch=1 --output-format=json \
      > $BOUT/split/fio.json 2> $BOUT/split/fio.err &
  local fio=$!
  sleep $(( run * 2 / 5 ))
  lvmirror --json split $vol 2 > $BOUT/split/split.json 2>&1 || result bench_split fail out="$(cat $BOUT/split/split.json)"
  wait $fio
  rm -f $BOUT/split/io_slat.1.log $BOUT/split/io_clat.1.log
}

resync_figures() {  # VOLUME: resync after the split load, 1% of regions changed, full (re-attach)
  local vol=$1 region regions n i idx
  lvmirror resync $vol 2 --wait >/dev/null 2>&1 && job_figures $vol 2 after_split_load
  # 1% of the regions changed while split (whole regions, spread over the LUN)
  lvmirror split $vol 2 >/dev/null 2>&1
  region=$(lvmirror --json status | $PY -c "import json,sys; print(json.load(sys.stdin)['volumes']['$vol']['region_size'])")
  regions=$(( SIZE_MB * 1048576 / region )); n=$(( (regions + 99) / 100 ))
  for i in $(seq 0 $((n - 1))); do
    fio --name=dirty --filename=$BDEV --rw=write --bs=$region --size=$region \
        --offset=$(( i * regions / n * region )) --direct=1 --ioengine=psync --output=/dev/null
  done
  drop_image_cache $BDIR/img0 $BDIR/img1 $BDIR/img2
  lvmirror resync $vol 2 --wait >/dev/null 2>&1 && job_figures $vol 2 resync_1pct
  # full: detach image 2 and attach the same file again (every region is copied; it holds the
  # old copy, so the attach is forced over its data)
  lvmirror detach $vol 2 >/dev/null 2>&1
  drop_image_cache $BDIR/img0 $BDIR/img1 $BDIR/img2
  if idx=$(lvmirror --json attach $vol $BDIR/img2 --force --wait 2> $BOUT/attach.err | $PY -c "import json,sys; print(json.load(sys.stdin)['index'])"); then
    job_figures $vol $idx resync_full
  else
    result bench_resync_full fail out="$(tail -2 $BOUT/attach.err)"
  fi
}

bench_main() {
  TARGETS=${BENCH_TARGETS:-lvmirror2 lvmirror3 md-raid1 lvmirror1 fileio tcmu-runner}
  TARGETS=${TARGETS//,/ }     # (commas too: bench/rounds --ab can then name two orders)
  JOBS=${BENCH_JOBS:-seqwrite-1m randwrite-4k-qd1 randwrite-4k-qd32 randread-4k-qd1 randread-4k-qd32 mixed-64k-70r seqread-1m}
  RUNTIME=${BENCH_RUNTIME:-10}; RAMP=${BENCH_RAMP:-2}; SIZE_MB=${BENCH_SIZE_MB:-256}
  LV_IMAGES=${BENCH_LVMIRROR_IMAGES:-files}
  case $LV_IMAGES in files|null_blk) ;;
    *) result bench_settings fail "why=BENCH_LVMIRROR_IMAGES is files or null_blk, not $LV_IMAGES"; return ;;
  esac
  mkdir -p $BOUT; : > $BOUT/targets.jsonl; : > $BOUT/resync.jsonl
  jsonl $BOUT/meta.json kernel="$(uname -r)" accel="$(cat $OUT/accel 2>/dev/null || echo unknown)" \
     date="$(date -u +%Y-%m-%dT%H:%MZ)" cpus=$(nproc) mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 )) \
     "fio=$(fio --version)" "python=$($PY -V 2>&1)" "lvmirrord=$(command -v lvmirrord)" \
     "tcmu_runner=$(tcmu-runner -V 2>&1 | head -1)" \
     runtime_s=$RUNTIME ramp_s=$RAMP size_mb=$SIZE_MB "targets=$TARGETS" "jobs=$JOBS" \
     profile=${BENCH_PROFILE:-0} cache_mode=write-back lvmirror_wce=${BENCH_LVMIRROR_WCE:-1} lvmirror_images=$LV_IMAGES lvmirror_hw_max_sectors=${BENCH_HW_MAX_SECTORS:-16384} label="${BENCH_LABEL:-}"
  # lvmirrord as the packaged unit runs it: its default options, the metrics every 5 s (the
  # lab's other sections write them every 2 s; tcmu-runner too runs with its defaults)
  export LVMIRRORD_METRICS=0
  if [ -n "${DAEMON:-}" ]; then kill $DAEMON; wait $DAEMON 2>/dev/null; DAEMON=; fi
  start_daemon || { result bench_daemon fail; return; }
  for target in $TARGETS; do
    mkdir -p $BOUT/$target
    t "bench target $target"
    if ! target_up $target; then
      result bench_target_$target fail log="$(tail -3 $BOUT/$target/targetcli.log 2>/dev/null)"
      target_down $target; continue
    fi
    run_jobs $target
    # (not on null_blk images: the resync figures re-attach image file 2 and set lvmirror's
    # copy against md's resync of files)
    if [ $target = lvmirror3 ] && [ "${BENCH_PROFILE:-0}" != 1 ] && [ "$LV_IMAGES" = files ]; then
      split_latency bench3
      resync_figures bench3
    fi
    target_down $target
    result bench_target_$target ok
  done
  t "bench done"
}
