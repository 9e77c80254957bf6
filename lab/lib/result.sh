# lab/lib/result.sh: result lines (results.jsonl + RESULT on the console) and timestamps.
# Sourced by lab/guest.sh; uses $OUT and $PY.
t() { echo "[guest T+$(awk '{print $1}' /proc/uptime)s] $*"; }
result() {  # result NAME ok|fail [key=value ...]
  local name=$1 ok=$2 item; shift 2
  $PY - "$name" "$ok" "$@" >> "$OUT/results.jsonl" <<'PY'
import json, sys
name, ok, *kv = sys.argv[1:]
d = {"check": name, "ok": ok == "ok"}
for item in kv:
    k, _, v = item.partition("=")
    d[k] = v
print(json.dumps(d))
PY
  echo "RESULT $name $ok $*"
}
jsonl() {  # jsonl FILE key=value ...: append one JSON object (values that parse as JSON, numbers say, stay typed)
  local f=$1 item; shift
  $PY - "$@" >> "$f" <<'PY'
import json, sys
d = {}
for item in sys.argv[1:]:
    k, _, v = item.partition("=")
    try:
        d[k] = json.loads(v)
    except ValueError:
        d[k] = v
print(json.dumps(d))
PY
}
