# lab/lib/outdir.sh: the host side's output directory, emptied before a run. Sourced by lab/boot,
# lab/powercut, lab/failover and lab/soak (on the host, from the repository's root).
clear_out() {  # clear_out DIR: make DIR and empty it; refuses (exit 2) a DIR that is not a run's own
  local dir real top
  dir=$1
  real=$(realpath -m -- "$dir") || { echo "lab: cannot resolve the output directory '$dir'" >&2; exit 2; }
  top=$(realpath -m -- "$PWD")
  # LAB_OUT=/tmp or LAB_OUT=. would empty /tmp or the checkout: only a directory of its own
  case "$top/" in "$real"/*) echo "lab: refusing to empty '$dir' ($real holds this repository); give LAB_OUT a directory of its own" >&2; exit 2 ;; esac
  case $real in
    /|/tmp|/var|/var/tmp|/root|/home|/usr|/etc|/dev|/proc|/sys|/run|"${HOME:-/root}")
      echo "lab: refusing to empty '$dir' ($real); give LAB_OUT a directory of its own" >&2; exit 2 ;;
  esac
  mkdir -p -- "$real" && rm -rf -- "${real:?}"/*
}
