# lab/lib/result.sh: result lines (results.jsonl + RESULT on the console) and timestamps.
# Sourced by lab/guest.sh; uses $OUT.
t() { echo "[guest T+$(awk '{print $1}' /proc/uptime)s] $*"; }
# key=value arguments to one JSON object, by jq (a C program: a Python per result cost 0.6-0.9 s
# of start-up under TCG, about a minute a boot); F is what each value goes through
_JQ_KV='reduce $ARGS.positional[] as $i ({}; ($i | index("=")) as $p
  | if $p == null then . + {($i): ""} else . + {($i[:$p]): ($i[$p + 1:] | F)} end)'
result() {  # result NAME ok|fail [key=value ...]: values stay strings; uptime_s is the guest's uptime
  local name=$1 ok=false; [ "$2" = ok ] && ok=true; shift 2
  jq -cn --arg check "$name" --argjson ok $ok --arg up "$(awk '{print $1}' /proc/uptime)" \
    "{check: \$check, ok: \$ok} + (${_JQ_KV//F/.}) + {uptime_s: (\$up | tonumber)}" \
    --args "$@" >> "$OUT/results.jsonl"
  echo "RESULT $name $([ $ok = true ] && echo ok || echo fail) $*"
}
jsonl() {  # jsonl FILE key=value ...: append one JSON object (values that parse as JSON, numbers say, stay typed)
  local f=$1; shift
  jq -cn "${_JQ_KV//F/(. as \$s | try fromjson catch \$s)}" --args "$@" >> "$f"
}
