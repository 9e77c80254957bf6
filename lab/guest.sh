#!/bin/bash
# Runs INSIDE the kernel-lab guest (Debian's kernel with LIO, booted by lab/boot with the host's
# root file system shared read-only; /etc, /var, /tmp are throw-away overlays, $OUT is shared
# read-write with the host). Brings up the real stack - configfs, a system bus with lvmirror's
# policy, lvmirrord, targetcli, the iSCSI target, open-iscsi, libiscsi - and runs the checks the
# host-side pytest suite (tests/lab) asserts on. Every check writes one JSON line to
# $OUT/results.jsonl: {"check": name, "ok": bool, ...details}.
#
# This file is only the dispatcher: the helpers live in lab/lib/*.sh (result, t, setup,
# start_daemon, wait_bus_name, tcli, login/logout/lun_dev/rescan, fio_verify_load, ...), each
# section in lab/scenarios/<section>.sh (one shell function named after the section), as lvm2
# keeps test/shell/*.sh over test/lib. lab/boot runs a private copy of the lab/ tree from $OUT.
#
# Usage (by lab/boot): guest.sh OUT [SECTION ...]
#   sections: basic fs split group scrub metrics crash dbus alua ocf compliance saveconfig tcmurunner lease demo, bench (bench/lab-bench.sh,
#   run alone), systemd (run alone, in the guest lab/boot --systemd boots with systemd as PID 1),
#   powercut (one boot of the power-cut chain; run by lab/powercut, which boots with a disk and
#   kills QEMU) and soak_sigkill, soak_split (lab/soak)
set -u
OUT=$1; shift
LAB=$(cd "$(dirname "$0")" && pwd)
[ -f "$OUT/lab.env" ] && . "$OUT/lab.env"
# lab/boot --systemd: systemd is PID 1 and owns the serial console; this script logs to a file
UNDER_SYSTEMD=; [ "$(cat /proc/1/comm)" = systemd ] && UNDER_SYSTEMD=1
[ -n "$UNDER_SYSTEMD" ] && exec >> "$OUT/guest-console.log" 2>&1
SECTIONS=${*:-basic fs split group scrub metrics crash dbus alua ocf compliance saveconfig tcmurunner lease}
REPO=${REPO:-$(cd "$LAB/.." && pwd)}
PY=$REPO/.venv/bin/python
IQN=iqn.2026-11.org.lvmirror:lab
STATE=/run/scratch/state
export HOME=/tmp/home PATH=$REPO/.venv/bin:$PATH
mkdir -p "$HOME"

for f in "$LAB"/lib/*.sh "$LAB"/scenarios/*.sh; do . "$f"; done

t "guest script start: sections $SECTIONS"
: > "$OUT/results.jsonl"
setup
for s in $SECTIONS; do t "section $s"; $s; done
logout
[ -z "${DAEMON:-}" ] || { kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null; }
t "guest script end"
touch "$OUT/guest-done"
