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


@pytest.mark.parametrize("n", ["0", "-1"])
def test_idle_needs_one_lun_or_more(tmp_path, n):
    """--idle N < 1 is refused by argparse before anything runs (--dir is missing, so a
    refusal of anything else would say so instead); so are --idle and --scaling together."""
    proc = subprocess.run([sys.executable, BENCH, "--idle", n, "--dir",
                           str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert f"--idle N needs N >= 1, got {n}" in proc.stderr
    proc = subprocess.run([sys.executable, BENCH, "--idle", "2", "--scaling", "2", "--dir",
                           str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "give one" in proc.stderr


def test_idle_prints_its_figures(tmp_path):
    """--idle runs a real lvmirrord (a process per volume) with idle LUNs and prints the CPU
    share and the wake-ups per second it measured, and leaves no process behind (the figures
    themselves are the benchmark's, not asserted)."""
    proc = subprocess.run([sys.executable, BENCH, "--idle", "2", "--seconds", "1", "--dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.lstrip().startswith("2 idle LUNs: lvmirrord and its volume processes "), line
    assert "% of one core" in line and "thread wake-ups per second" in line
    assert os.listdir(tmp_path) == []            # its work directory removed
