# lab/lib/systemd.sh: helpers for the guest lab/boot --systemd boots (systemd as PID 1).
unit_prop() { systemctl show -P $1 lvmirrord.service; }   # unit_prop PROPERTY
wait_active() {  # wait_active OLDPID SECONDS: echo the MainPID once lvmirrord.service is active
  local i pid   # with a main process other than OLDPID
  for i in $(seq $(( $2 * 5 ))); do
    pid=$(unit_prop MainPID)
    [ "$(unit_prop ActiveState)" = active ] && [ "$pid" != 0 ] && [ "$pid" != "$1" ] && { echo $pid; return 0; }
    sleep 0.2
  done
  return 1
}
bus_owner_pid() {  # bus_owner_pid NAME: the process that owns NAME on the system bus
  busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus \
    GetConnectionUnixProcessID s $1 2>/dev/null | awk '{print $2}'
}
journal() { journalctl --no-pager -o cat "$@" 2>/dev/null; }

unit_fails_saying() {  # unit_fails_saying UNIT JOURNAL-TEXT CHECK: start UNIT; CHECK ok when it fails,
                      # systemd shows it failed and its journal has JOURNAL-TEXT
  local rc
  systemctl start $1; rc=$?
  [ $rc != 0 ] && [ "$(systemctl is-failed $1)" = failed ] && journal -u $1 | grep -q "$2" \
    && result $3 ok \
    || result $3 fail rc=$rc state="$(systemctl is-failed $1)" journal="$(journal -u $1 | tail -3)"
}
