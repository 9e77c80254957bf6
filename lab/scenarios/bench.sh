# lab/scenarios/bench.sh: section "bench" (the side-by-side benchmark of bench/run).
# Sourced by lab/guest.sh; runs inside the kernel-lab guest over lab/lib.
bench() {   # the side-by-side benchmark (bench/run): lvmirror vs md RAID1 + iblock vs fileio
  . "$REPO/bench/lab-bench.sh"
  bench_main
}

