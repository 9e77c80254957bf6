# lab/lib/outdir.sh: the host side's output directory, emptied before a run. Sourced by lab/boot,
# lab/powercut, lab/failover and lab/soak (on the host, from the repository's root).
LAB_OUT_MARK=.lvmirror-lab-out   # what clear_out leaves in a directory it made a run's own

_run_out() {  # _run_out DIR: DIR is a run's output: clear_out's mark, or (from before the mark)
  [ -e "$1/$LAB_OUT_MARK" ] || [ -e "$1/results.jsonl" ]   # the results.jsonl every run writes
}

_runs_only() {  # _runs_only DIR: every entry of DIR is a directory that is a run's output
  local e
  for e in "$1"/* "$1"/.[!.]*; do
    [ -e "$e" ] || [ -L "$e" ] || continue
    [ -d "$e" ] && [ ! -L "$e" ] && _run_out "$e" || return 1
  done
}

clear_out() {  # clear_out DIR: make DIR and empty it, or refuse (exit 2) a DIR that is not a run's
  local dir=$1 real top
  real=$(realpath -m -- "$dir") || { echo "lab: cannot resolve the output directory '$dir'" >&2; exit 2; }
  top=$(realpath -m -- "$PWD")
  # LAB_OUT=/tmp or LAB_OUT=. would empty /tmp or the checkout: never these, marked or not
  case "$top/" in "$real"/*) echo "lab: refusing to empty '$dir' ($real holds this repository); give LAB_OUT a directory of its own" >&2; exit 2 ;; esac
  case $real in
    /|/tmp|/var|/var/tmp|/root|/home|/usr|/etc|/dev|/proc|/sys|/run|/boot|/opt|/mnt|/srv|"${HOME:-/root}")
      echo "lab: refusing to empty '$dir' ($real); give LAB_OUT a directory of its own" >&2; exit 2 ;;
  esac
  # a directory with files in it is emptied only when it is an earlier run's output, or holds
  # nothing but such outputs (lab-out/ with tools/demo's lab-out/demo/ in it)
  if [ -d "$real" ] && [ -n "$(ls -A -- "$real")" ] && ! _run_out "$real" && ! _runs_only "$real"; then
    echo "lab: refusing to empty '$dir' ($real): it holds files and is no lab run's output (no $LAB_OUT_MARK); give LAB_OUT a new or empty directory" >&2
    exit 2
  fi
  mkdir -p -- "$real" && rm -rf -- "${real:?}"/* && touch -- "$real/$LAB_OUT_MARK" \
    || { echo "lab: cannot make or empty the output directory '$dir'" >&2; exit 2; }
}
