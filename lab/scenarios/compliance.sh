# lab/scenarios/compliance.sh: section "compliance" (libiscsi's iscsi-test-cu against lvmirror and LIO fileio).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
compliance() {   # libiscsi's SCSI compliance suite: lvmirror 2-image LUN vs LIO fileio
  local lun
  for lun in 0 2; do
    name=$([ $lun = 0 ] && echo lvmirror || echo fileio)
    timeout 900 iscsi-test-cu -d -t SCSI iscsi://127.0.0.1/$IQN/$lun > "$OUT/compliance-$name.txt" 2>&1
    summary=$(grep -E '^ +tests' "$OUT/compliance-$name.txt" | head -1 | tr -s ' ')
    [ -n "$summary" ] && result compliance_ran_$name ok tests="$summary" || result compliance_ran_$name fail
    # each test lvmirror failed again, verbose (-V: the commands sent and the sense received),
    # so the output says why (not fileio's: a dozen more runs for the CI's time budget)
    [ $name = lvmirror ] || continue
    : > "$OUT/compliance-$name-failed-verbose.txt"
    awk '/^Suite: /{s=$2} /^ *Test: /{t=$2} /FAILED$/{if (t) print s"."t; t=""}' \
        "$OUT/compliance-$name.txt" | sort -u | while read -r f; do
      timeout 120 iscsi-test-cu -d -V -t "SCSI.$f" iscsi://127.0.0.1/$IQN/$lun \
        >> "$OUT/compliance-$name-failed-verbose.txt" 2>&1
    done
  done
}

