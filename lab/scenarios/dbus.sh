# lab/scenarios/dbus.sh: section "dbus" (the D-Bus API on the real system bus).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
dbus() {   # lvmirror's D-Bus API on the real system bus: busctl, the policy, external region locks
  local vp=/org/lvmirror1/volume/vol2 out nobody="setpriv --reuid=65534 --regid=65534 --clear-groups" i
  busctl --system tree org.lvmirror1 > "$OUT/busctl-tree.txt" 2>&1
  busctl --system introspect org.lvmirror1 /org/lvmirror1/volume/vol3 > "$OUT/busctl-introspect.txt" 2>&1
  grep -q "$vp" "$OUT/busctl-tree.txt" && grep -q "^\.Split *method" "$OUT/busctl-introspect.txt" \
    && grep -q "^\.Images *property *a(usstddts)" "$OUT/busctl-introspect.txt" \
    && result busctl_shows_volume_objects ok || result busctl_shows_volume_objects fail out="$(head -5 $OUT/busctl-tree.txt)"
  # not root: may read the volume's properties, may not change anything
  out=$($nobody busctl --system get-property org.lvmirror1 $vp org.lvmirror1.Volume Images 2>&1)
  echo "nobody get-property Images: $out" >> "$OUT/busctl-nobody.txt"
  echo "$out" | grep -q '^a(usstddts) 2 ' && result unprivileged_reads_status ok || result unprivileged_reads_status fail out="$out"
  out=$($nobody busctl --system call org.lvmirror1 $vp org.lvmirror1.Volume DetachImage u 9 2>&1)
  echo "nobody DetachImage: $out" >> "$OUT/busctl-nobody.txt"
  out2=$($nobody busctl --system call org.lvmirror1 /org/lvmirror1 org.lvmirror1.Manager LockRegion sttbd vol2 0 8 false 1 2>&1)
  echo "nobody LockRegion: $out2" >> "$OUT/busctl-nobody.txt"
  echo "$out" | grep -qi "access denied\|rejected" && echo "$out2" | grep -qi "access denied\|rejected" \
    && result unprivileged_change_refused ok out="$out" || result unprivileged_change_refused fail out="$out" lock="$out2"
  # an external holder (a backup agent) locks LBAs 2048..2055 of vol2: an initiator write there
  # waits; the holder dies without unlocking and the write goes through
  /usr/bin/python3 - > "$OUT/lock-holder.txt" 2>&1 <<'PY' &
import dbus, sys, time
bus = dbus.SystemBus()
mgr = dbus.Interface(bus.get_object("org.lvmirror1", "/org/lvmirror1"), "org.lvmirror1.Manager")
print("lock", int(mgr.LockRegion("vol2", 2048, 8, False, 10.0)), flush=True)
time.sleep(600)
PY
  local holder=$! d=$(lun_dev 0) w listed
  for i in $(seq 50); do grep -q "^lock" "$OUT/lock-holder.txt" && break; sleep 0.2; done
  listed=$(busctl --system call org.lvmirror1 /org/lvmirror1 org.lvmirror1.Manager ListLocks s vol2 2>&1)
  echo "ListLocks: $listed" >> "$OUT/lock-holder.txt"
  head -c 4096 /dev/urandom > /run/lockpat
  timeout 60 dd if=/run/lockpat of=$d bs=4096 seek=256 count=1 oflag=direct status=none & w=$!
  sleep 3
  if kill -0 $w 2>/dev/null; then waited=yes; else waited=no; fi
  listed2=$(busctl --system call org.lvmirror1 /org/lvmirror1 org.lvmirror1.Manager ListLocks s vol2 2>&1)
  echo "ListLocks with a waiter: $listed2" >> "$OUT/lock-holder.txt"
  kill $holder; wait $holder 2>/dev/null
  wait $w; wrc=$?
  [ "$waited" = yes ] && echo "$listed" | grep -q "D-Bus :" && echo "$listed2" | grep -q "waiters[^]]*initiator I/O" && result external_lock_blocks_initiator_io ok \
    || result external_lock_blocks_initiator_io fail waited=$waited listed="$listed"
  [ $wrc = 0 ] && cmp -s /run/lockpat <(dd if=$d bs=4096 skip=256 count=1 iflag=direct status=none) \
    && result lock_released_when_holder_leaves ok || result lock_released_when_holder_leaves fail dd=$wrc
}

