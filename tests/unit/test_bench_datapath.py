"""bench/bench_datapath.py's command line (the benchmark itself prints figures, it is no test)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "bench", "bench_datapath.py")


@pytest.mark.parametrize("n", ["0", "1", "-2"])
def test_scaling_needs_two_luns_or_more(tmp_path, n):
    """--scaling 0 was taken for no --scaling and ran the jobs; every N < 2 is refused by
    argparse (exit status 2, the usage and the reason) before anything runs. --dir names a
    directory that does not exist, so a refusal of anything else would say so instead."""
    proc = subprocess.run([sys.executable, BENCH, "--scaling", n, "--dir",
                           str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert f"--scaling N needs N >= 2, got {n}" in proc.stderr
    assert proc.stderr.startswith("usage:")
