"""bench/rounds: N runs of bench/run (here a stand-in that writes results.json as bench/report.py
does, or nothing, as a failed lab run), the settings of an A/B taken in turn, each run in a new
directory, and the medians printed for the runs just made."""

import os
import shutil
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A stand-in for bench/run: results.json in BENCH_RESULTS with IOPS from the environment
# (FAKE_IOPS="lvmirror1=80 tcmu-runner=40"; LVMIRROR_X scales lvmirror1's), nothing when
# FAKE_FAIL is set. It records the setting it saw.
FAKE_RUN = """#!/usr/bin/env python3
import json, os
out = os.environ["BENCH_RESULTS"]
with open(os.path.join(os.environ["FAKE_LOG"]), "a") as f:
    f.write(os.environ.get("LVMIRROR_X", "-") + "\\n")
if not os.environ.get("FAKE_FAIL"):
    iops = dict(kv.split("=") for kv in os.environ["FAKE_IOPS"].split())
    iops = {k: float(v) for k, v in iops.items()}
    iops["lvmirror1"] *= float(os.environ.get("LVMIRROR_X", "1"))
    # CPU a command: lvmirror1's handler 4000 / its IOPS ms, the guest twice that; none for
    # tcmu-runner (a run that did not measure it)
    res = {t: {"iops": v} for t, v in iops.items()}
    res["lvmirror1"].update(cpu_ms=4000 / iops["lvmirror1"], guest={"cpu_ms": 8000 / iops["lvmirror1"]})
    d = {"results": {"seqread-1m": res},
         "ratios": {"seqread-1m": {"lvmirror1/tcmu-runner":
                                   {"iops": round(iops["lvmirror1"] / iops["tcmu-runner"], 3)}}}}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(d, f)
"""


def tree(tmp_path):
    """A copy of bench/rounds beside the stand-in bench/run: (rounds path, log path)."""
    bench = tmp_path / "repo" / "bench"
    bench.mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "bench", "rounds"), bench / "rounds")
    (bench / "run").write_text(FAKE_RUN)
    (bench / "run").chmod(stat.S_IRWXU)
    return str(bench / "rounds"), str(tmp_path / "runs.log")


def rounds(script, log, *args, **env):
    e = dict(os.environ, FAKE_LOG=log, FAKE_IOPS="lvmirror1=80 tcmu-runner=40")
    e.update(env)
    return subprocess.run([sys.executable, script, *args], env=e, capture_output=True,
                          text=True, timeout=60)


def test_an_ab_takes_the_settings_in_turn_and_prints_each_ones_median(tmp_path):
    script, log = tree(tmp_path)
    out = tmp_path / "out"
    r = rounds(script, log, "2", "--ab", "LVMIRROR_X=1 LVMIRROR_X=0.5", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "does not pass LVMIRROR_X to the guest" in r.stderr      # (no lab/boot here)
    assert open(log).read().split() == ["1", "0.5", "1", "0.5"]
    assert sorted(os.listdir(out)) == ["01-a", "02-b", "03-a", "04-b"]
    assert (out / "02-b" / "setting").read_text().strip() == "LVMIRROR_X=0.5"
    text = r.stdout
    assert "lvmirror1 / tcmu-runner: 2.00 (2.00-2.00; 2 runs: 2.00 2.00)" in text
    assert "lvmirror1 / tcmu-runner: 1.00 (1.00-1.00; 2 runs: 1.00 1.00)" in text
    assert "seqread-1m         lvmirror1: 2.000" in text       # A over B, lvmirror1's IOPS
    assert "seqread-1m         tcmu-runner: 1.000" in text
    # and both settings together, the runs in their order (the figure of an A/B of orders)
    both = text.split("## both settings together (4 runs: 01-a, 02-b, 03-a, 04-b)")[1]
    assert "lvmirror1 / tcmu-runner: 1.50 (1.00-2.00; 4 runs: 2.00 1.00 2.00 1.00)" in both
    assert "seqread-1m         lvmirror1: 60.0 (40-80; 80 40 80 40)" in both
    assert "seqread-1m         lvmirror1 handler: 75.00 (50.00-100.00; 50.00 100.00 50.00 100.00)" in both
    assert "seqread-1m         lvmirror1 guest: 150.00 (100.00-200.00; 100.00 200.00 100.00 200.00)" in both
    assert "tcmu-runner handler" not in text and "tcmu-runner guest" not in text


def test_new_runs_never_reuse_an_old_directory_and_a_failed_one_fails(tmp_path):
    """Runs are numbered after the highest already there (one deleted leaves a gap, not a
    name used twice); a run that writes no results makes the exit status 1 and is left out of
    the figures, which are those of the runs just made."""
    script, log = tree(tmp_path)
    out = tmp_path / "out"
    assert rounds(script, log, "3", "--out", str(out)).returncode == 0
    shutil.rmtree(out / "01")
    r = rounds(script, log, "1", "--out", str(out), FAKE_FAIL="1")
    assert r.returncode == 1 and "1 run(s) wrote no results" in r.stderr
    assert sorted(os.listdir(out)) == ["02", "03", "04"]
    assert not os.path.exists(out / "04" / "results.json")
    r = rounds(script, log, "1", "--out", str(out), FAKE_IOPS="lvmirror1=30 tcmu-runner=60")
    assert r.returncode == 0
    assert "(1 runs: 05)" in r.stdout and "0.50 (0.50-0.50; 1 runs: 0.50)" in r.stdout
    r = rounds(script, log, "--summarize", "--out", str(out))
    assert r.returncode == 0 and "(3 runs: 02, 03, 05)" in r.stdout
    assert "2.00 (0.50-2.00; 3 runs: 2.00 2.00 0.50)" in r.stdout


def test_bad_arguments_and_unreadable_results_are_said_plainly(tmp_path):
    script, log = tree(tmp_path)
    out = tmp_path / "out"
    for args in (["--ab", "X=1 X=1", "1"], ["--ab", "X=1", "1"], ["--ab", "=1 =2", "1"], []):
        r = rounds(script, log, *args, "--out", str(out))
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    r = rounds(script, log, "--summarize", "--out", str(tmp_path / "none"))
    assert r.returncode == 2 and "no such directory" in r.stderr
    (out / "01").mkdir(parents=True)
    (out / "01" / "results.json").write_text("{truncated")
    (out / "notes.txt").write_text("a file beside the runs\n")
    r = rounds(script, log, "--summarize", "--out", str(out))
    assert r.returncode == 1 and "unreadable" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(log)              # no run was made by any of these
