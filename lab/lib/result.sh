# lab/lib/result.sh: result lines (results.jsonl + RESULT on the console) and timestamps.
# Sourced by lab/guest.sh; uses $OUT.
t() { echo "[guest T+$(awk '{print $1}' /proc/uptime)s] $*"; }
# key=value arguments to one JSON object, by jq (a C program: a Python per result cost 0.6-0.9 s
# of start-up under TCG, about a minute a boot), split at the first '=' as Python's partition
# does (jq 1.6's index() counts bytes and its slices characters: split() is used, not them);
# an argument without '=' is a key with an empty value. F is what each value goes through.
_JQ_KV='reduce $ARGS.positional[] as $i ({}; ($i | split("=")) as $s
  | . + {($s[0] // ""): ($s[1:] | join("=") | F)})'
result() {  # result NAME ok|fail [key=value ...]: values stay strings; uptime_s is the guest's uptime
  local name=$1 status=$2 ok=false; [ "$status" = ok ] && ok=true; shift 2
  # "--": arguments that begin with "-" are values, never jq's options
  jq -cn --arg check "$name" --argjson ok $ok --arg up "$(awk '{print $1}' /proc/uptime)" \
    "{check: \$check, ok: \$ok, uptime_s: (\$up | tonumber)} + (${_JQ_KV//F/.})" \
    --args -- "$@" >> "$OUT/results.jsonl"
  echo "RESULT $name $status $*"
}
jsonl() {  # jsonl FILE key=value ...: append one JSON object (values that parse as JSON, numbers say, stay typed)
  local f=$1; shift
  jq -cn "${_JQ_KV//F/(. as \$v | try fromjson catch \$v)}" --args -- "$@" >> "$f"
}
