# lab/scenarios/group.sh: section "group" (consistency groups, split hooks; issue: application-
# consistent backups). PostgreSQL keeps its data directory on one LUN and pg_wal on another
# (ext4 on open-iscsi); pgbench runs; the two volumes are split as one group; both copies are
# exported as LUNs, mounted, and a second PostgreSQL recovers on them: pg_amcheck is clean and
# pgbench's balances agree. Then the same with two plain splits, the WAL volume first and the
# data volume after a checkpoint: that pair of copies does not recover. Then the split hooks: fsfreeze around a split
# gives a copy that mounts without a journal replay; a failing pre-split hook aborts the split.
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
PGBIN=/usr/lib/postgresql/15/bin

pg() {  # pg PORT SQL: one value from the PostgreSQL on PORT
  runuser -u postgres -- $PGBIN/psql -X -A -t -h /run/pg/sock -p $1 -d postgres -c "$2" 2>>"$OUT/pg-psql.err"
}

pg_up() {  # pg_up DATADIR PORT NAME: start PostgreSQL, wait until it accepts connections; its
  # log is /run/pg/logs/NAME.log (postgres cannot write $OUT), copied to $OUT/pg-NAME.log
  local rc
  mkdir -p /run/pg/logs && chown postgres:postgres /run/pg/logs
  runuser -u postgres -- $PGBIN/pg_ctl -D $1 -w -t 300 -l /run/pg/logs/$3.log \
    -o "-p $2 -k /run/pg/sock -c listen_addresses='' -c max_wal_size=48MB -c min_wal_size=32MB -c shared_buffers=16MB" start >> "$OUT/pg-ctl.log" 2>&1; rc=$?
  cp /run/pg/logs/$3.log "$OUT/pg-$3.log" 2>/dev/null
  return $rc
}

pg_down() { runuser -u postgres -- $PGBIN/pg_ctl -D $1 -m fast -w -t 120 stop >> "$OUT/pg-ctl.log" 2>&1; }

pg_copies_check() {  # pg_copies_check TAG: export gdb:1 and gwal:1 as LUNs 12, 13, recover a second
  local tag=$1 dc wc ok=1 amc inv   # PostgreSQL on them; sets PG_RECOVERED PG_AMCHECK PG_INVARIANT
  tcli <<TC
/backstores/user:lvmirror create name=gdbc size=160M cfgstring=gdb;image=1 control=nl_reply_supported=-1
/backstores/user:lvmirror create name=gwalc size=160M cfgstring=gwal;image=1 control=nl_reply_supported=-1
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/gdbc lun=12
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/gwalc lun=13
TC
  rescan; dc=$(lun_dev 12); wc=$(lun_dev 13)
  mkdir -p /run/pg2/data /run/pg2/wal
  PG_RECOVERED=0; PG_AMCHECK=skipped; PG_INVARIANT=skipped
  if [ -b "$dc" ] && [ -b "$wc" ] && mount $dc /run/pg2/data && mount $wc /run/pg2/wal; then
    rm -f /run/pg2/data/pgdata/postmaster.pid
    ln -sfn /run/pg2/wal/pg_wal /run/pg2/data/pgdata/pg_wal
    if pg_up /run/pg2/data/pgdata 5434 copy-$tag; then
      PG_RECOVERED=1
      runuser -u postgres -- $PGBIN/pg_amcheck -h /run/pg/sock -p 5434 --all --install-missing \
        --heapallindexed > "$OUT/pg-amcheck-$tag.txt" 2>&1 && PG_AMCHECK=clean || PG_AMCHECK=errors
      inv=$(pg 5434 "select (select sum(abalance) from pgbench_accounts) = (select sum(tbalance) from pgbench_tellers) and (select sum(tbalance) from pgbench_tellers) = (select sum(bbalance) from pgbench_branches)")
      [ "$inv" = t ] && PG_INVARIANT=holds || PG_INVARIANT="broken:$inv"
      PG_HISTORY=$(pg 5434 "select count(*) from pgbench_history")
      pg_down /run/pg2/data/pgdata
      cp /run/pg/logs/copy-$tag.log "$OUT/pg-copy-$tag.log" 2>/dev/null
    fi
  fi
  umount /run/pg2/data /run/pg2/wal 2>/dev/null
  tcli <<TC
/iscsi/$IQN/tpg1/luns delete lun12
/iscsi/$IQN/tpg1/luns delete lun13
/backstores/user:lvmirror delete gdbc
/backstores/user:lvmirror delete gwalc
TC
  rescan
}

group() {
  local d w t0 res hold i
  # two volumes of two images, LUNs 10 and 11
  tcli <<TC
set global auto_save_on_exit=false
/backstores/user:lvmirror create name=gdb size=160M cfgstring=gdb;images=/run/scratch/gdb0.img+/run/scratch/gdb1.img control=nl_reply_supported=-1
/backstores/user:lvmirror create name=gwal size=160M cfgstring=gwal;images=/run/scratch/gwal0.img+/run/scratch/gwal1.img control=nl_reply_supported=-1
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/gdb lun=10
/iscsi/$IQN/tpg1/luns create /backstores/user:lvmirror/gwal lun=11
TC
  rescan; d=$(lun_dev 10); w=$(lun_dev 11)
  lvmirror wait gdb > /dev/null 2>&1; lvmirror wait gwal > /dev/null 2>&1
  mkdir -p /run/pg/data /run/pg/wal /run/pg/sock
  if [ -b "$d" ] && [ -b "$w" ] && mkfs.ext4 -q -F $d && mkfs.ext4 -q -F $w && mount $d /run/pg/data && mount $w /run/pg/wal; then
    chown postgres:postgres /run/pg/data /run/pg/wal /run/pg/sock
    runuser -u postgres -- $PGBIN/initdb -D /run/pg/data/pgdata --waldir=/run/pg/wal/pg_wal -A trust -N > "$OUT/pg-initdb.log" 2>&1 \
      && pg_up /run/pg/data/pgdata 5433 main \
      && runuser -u postgres -- $PGBIN/pgbench -h /run/pg/sock -p 5433 -i -s 1 -q postgres > "$OUT/pgbench-init.log" 2>&1 \
      && result group_postgres_on_two_luns ok \
      || { result group_postgres_on_two_luns fail log="$(tail -3 $OUT/pg-initdb.log $OUT/pg-main.log $OUT/pgbench-init.log 2>/dev/null | tr '\n' ' ')"; return; }
  else
    result group_postgres_on_two_luns fail reason="no LUN 10/11 or mkfs/mount failed"; return
  fi
  # 1. the group split under pgbench
  runuser -u postgres -- $PGBIN/pgbench -h /run/pg/sock -p 5433 -c 4 -j 2 -T 30 postgres > "$OUT/pgbench-group.log" 2>&1 & PGB=$!
  sleep 12
  lvmirror --json split-group gdb:1 gwal:1 > "$OUT/split-group.json" 2> "$OUT/split-group.err"; rc=$?
  wait $PGB; prc=$?
  if [ $rc = 0 ]; then
    hold=$($PY -c "import json; r = json.load(open('$OUT/split-group.json')); print(f\"hold_us={r['hold_seconds']*1e6:.0f} span_us={r['switch_span']*1e6:.0f} held={r['held_commands']} luns={r['luns']}\")")
    result group_split ok $hold pgbench_rc=$prc tps="$(grep -o 'tps = [0-9.]*' $OUT/pgbench-group.log | head -1)"
  else
    result group_split fail err="$(tail -2 $OUT/split-group.err)"; return
  fi
  pg_copies_check group
  [ $PG_RECOVERED = 1 ] && result group_copies_recover ok log="$(grep -c 'redo' $OUT/pg-copy-group.log) redo lines" || result group_copies_recover fail log="$(tail -3 $OUT/pg-copy-group.log | tr '\n' ' ')"
  [ "$PG_AMCHECK" = clean ] && result group_copies_pg_amcheck_clean ok || result group_copies_pg_amcheck_clean fail amcheck=$PG_AMCHECK out="$(tail -3 $OUT/pg-amcheck-group.txt 2>/dev/null | tr '\n' ' ')"
  [ "$PG_INVARIANT" = holds ] && result group_copies_pgbench_invariant ok history=$PG_HISTORY || result group_copies_pgbench_invariant fail invariant=$PG_INVARIANT
  # 2. for comparison (LVMIRROR_LAB_EXTENDED=1 only: 2 to 3 minutes CI's hour has no room
  #    for): two plain splits under the same load, the WAL volume first and the data volume
  #    after a checkpoint (PostgreSQL checkpoints every few minutes and whenever max_wal_size
  #    fills): the data copy's pg_control points at a checkpoint record that the WAL copy does
  #    not have. Otherwise the copies the group restore below rolls back to come from a group
  #    split with PostgreSQL idle.
  lvmirror resync gdb 1 --wait > /dev/null 2>&1; lvmirror resync gwal 1 --wait > /dev/null 2>&1
  if [ "${LVMIRROR_LAB_EXTENDED:-0}" = 1 ]; then
    runuser -u postgres -- $PGBIN/pgbench -h /run/pg/sock -p 5433 -c 4 -j 2 -T 30 postgres > "$OUT/pgbench-seq.log" 2>&1 & PGB=$!
    sleep 12
    lvmirror split gwal 1 > /dev/null 2>&1; pg 5433 "checkpoint" > /dev/null; lvmirror split gdb 1 > /dev/null 2>&1
    wait $PGB
    pg_copies_check sequential
    t "sequential splits (WAL first, a checkpoint between): recovered=$PG_RECOVERED amcheck=$PG_AMCHECK invariant=$PG_INVARIANT"
    [ "$PG_RECOVERED/$PG_AMCHECK/$PG_INVARIANT" != 1/clean/holds ] \
      && result group_sequential_splits_break_postgres ok recovered=$PG_RECOVERED amcheck=$PG_AMCHECK invariant=$PG_INVARIANT log="$(grep -m2 -E 'PANIC|FATAL|invalid|could not' $OUT/pg-copy-sequential.log | tr '\n' ' ')" \
      || result group_sequential_splits_break_postgres fail recovered=$PG_RECOVERED amcheck=$PG_AMCHECK invariant=$PG_INVARIANT
  else
    pg 5433 "checkpoint" > /dev/null
    lvmirror split-group gdb:1 gwal:1 > /dev/null 2>&1
    t "sequential splits: not run (LVMIRROR_LAB_EXTENDED=1 runs them)"
  fi
  pg_down /run/pg/data/pgdata
  umount /run/pg/data /run/pg/wal
  # 3. group restore: both volumes roll back to the copies split above, together
  lvmirror restore-group gdb:1 gwal:1 --wait > "$OUT/restore-group.txt" 2>&1 \
    && cmp -s /run/scratch/gdb0.img /run/scratch/gdb1.img && cmp -s /run/scratch/gwal0.img /run/scratch/gwal1.img \
    && result group_restore_rolls_back_both ok || result group_restore_rolls_back_both fail out="$(tail -2 $OUT/restore-group.txt)"
  # a restore leaves the images split (the copies kept): back in sync for what follows
  lvmirror resync gdb 1 --wait > /dev/null 2>&1; lvmirror resync gwal 1 --wait > /dev/null 2>&1
  # 4. split hooks (/etc/lvmirror/hooks.d): fsfreeze the initiator's file system around a split
  mkdir -p /etc/lvmirror/hooks.d /run/mnt/hk
  cat > /etc/lvmirror/hooks.d/10-fsfreeze <<'HOOK'
#!/bin/sh
# freeze the file systems listed in /run/lab-freeze around every split
[ -f /run/lab-freeze ] || exit 0
[ -f /run/lab-hook-fail ] && [ "$1" = pre-split ] && { echo "lab: refusing to freeze" >&2; exit 4; }
for m in $(cat /run/lab-freeze); do
  case "$1" in pre-split) fsfreeze -f "$m" || exit 1;; post-split) fsfreeze -u "$m";; esac
done
echo "$1 $LVMIRROR_IMAGES" >> /run/lab-hooks.log
HOOK
  chmod 755 /etc/lvmirror/hooks.d/10-fsfreeze
  mkfs.ext4 -q -F $d && mount $d /run/mnt/hk && echo /run/mnt/hk > /run/lab-freeze
  dd if=/dev/urandom of=/run/mnt/hk/blob bs=1M count=8 status=none; md5=$(md5sum < /run/mnt/hk/blob)
  lvmirror split gdb 1 > "$OUT/split-hook.txt" 2>&1; rc=$?
  grep -q "^pre-split gdb:1" /run/lab-hooks.log 2>/dev/null && grep -q "^post-split gdb:1" /run/lab-hooks.log \
    && result hooks_ran_around_split ok out="$(grep hook $OUT/split-hook.txt | tr '\n' ' ')" || result hooks_ran_around_split fail rc=$rc out="$(tail -3 $OUT/split-hook.txt)"
  # the frozen copy: clean (no needs_recovery), mounts without a journal replay, holds the file
  dumpe2fs -h /run/scratch/gdb1.img 2>/dev/null | grep -i features > "$OUT/hook-copy-features.txt"
  if ! grep -q needs_recovery "$OUT/hook-copy-features.txt" && mkdir -p /run/mnt/hkc \
     && mount -o ro,loop,noload /run/scratch/gdb1.img /run/mnt/hkc && [ "$(md5sum < /run/mnt/hkc/blob)" = "$md5" ]; then
    result hooks_frozen_copy_clean_without_replay ok
  else
    result hooks_frozen_copy_clean_without_replay fail features="$(cat $OUT/hook-copy-features.txt)"
  fi
  umount /run/mnt/hkc 2>/dev/null
  lvmirror resync gdb 1 --wait > /dev/null 2>&1
  touch /run/lab-hook-fail
  lvmirror split gdb 1 > "$OUT/split-hook-fail.txt" 2>&1; rc=$?
  st=$(lvmirror --json status | $PY -c "import json,sys; print(json.load(sys.stdin)['volumes']['gdb']['images'][1]['state'])")
  [ $rc = 1 ] && grep -q "lab: refusing to freeze" "$OUT/split-hook-fail.txt" && [ "$st" = in-sync ] \
    && touch /run/mnt/hk/writable-after-abort \
    && result hooks_failing_pre_hook_aborts_split ok || result hooks_failing_pre_hook_aborts_split fail rc=$rc state=$st out="$(tail -2 $OUT/split-hook-fail.txt)"
  rm -f /run/lab-hook-fail /run/lab-freeze
  umount /run/mnt/hk
  # 5. the backup cycle (what lvmirror-backup@.timer runs) for the group, twice, keep 1
  printf '[backup]\nmembers = gdb:1 gwal:1\ndest = /run/scratch/backups\nkeep = 1\n' > /run/lab-backup.conf
  lvmirror backup-cycle --config /run/lab-backup.conf > "$OUT/backup-cycle.txt" 2>&1; r1=$?
  sleep 1
  lvmirror backup-cycle --config /run/lab-backup.conf >> "$OUT/backup-cycle.txt" 2>&1; r2=$?
  nb=$(ls /run/scratch/backups/gdb/ 2>/dev/null | wc -l); nw=$(ls /run/scratch/backups/gwal/ 2>/dev/null | wc -l)
  last=$(ls /run/scratch/backups/gdb/ 2>/dev/null | tail -1)
  [ $r1 = 0 ] && [ $r2 = 0 ] && [ $nb = 1 ] && [ $nw = 1 ] && cmp -s /run/scratch/backups/gdb/$last /run/scratch/gdb0.img \
    && result backup_cycle_group ok out="$(grep 'done in' $OUT/backup-cycle.txt | tail -1)" \
    || result backup_cycle_group fail r1=$r1 r2=$r2 files=$nb/$nw out="$(tail -3 $OUT/backup-cycle.txt | tr '\n' ' ')"
  rm -rf /run/scratch/backups
  tcli <<TC
/iscsi/$IQN/tpg1/luns delete lun10
/iscsi/$IQN/tpg1/luns delete lun11
/backstores/user:lvmirror delete gdb
/backstores/user:lvmirror delete gwal
TC
  rescan
  rm -f /run/scratch/gdb?.img /run/scratch/gwal?.img
}
