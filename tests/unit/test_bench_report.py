"""bench/report.py: the side-by-side benchmark's table from real fio output (bench/jobs run on
a host file for a second), the split-latency window from a per-I/O log, ratios, and the plot."""

import importlib.util
import json
import os
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("bench_report", os.path.join(ROOT, "bench", "report.py"))
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

needs_fio = pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed "
                               "(tools/bootstrap installs it with the lab packages)")


def run_job(tmp_path, job, target_dir):
    dev = tmp_path / "dev.img"
    if not dev.exists():
        with open(dev, "wb") as f:
            f.truncate(32 << 20)
    env = dict(os.environ, DEV=str(dev), RUNTIME="1", RAMP="0", SIZE="32M")
    out = subprocess.run(["fio", "--output-format=json", os.path.join(ROOT, "bench", "jobs",
                                                                      job + ".fio")],
                         env=env, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    os.makedirs(target_dir, exist_ok=True)
    with open(os.path.join(target_dir, job + ".json"), "w") as f:
        f.write(out)
    return json.loads(out)


@needs_fio
def test_job_files_parse_and_figures(tmp_path):
    bench = tmp_path / "run" / "bench"
    raw = run_job(tmp_path, "randwrite-4k-qd1", bench / "lvmirror2")
    fig = report.fio_figures(raw)
    w = raw["jobs"][0]["write"]
    assert fig["iops"] == round(w["iops"], 1) > 0
    assert fig["mbps"] == pytest.approx(w["bw_bytes"] / 1e6, rel=0.01)
    assert 0 < fig["p50_ms"] <= fig["p99_ms"]
    mixed = report.fio_figures(run_job(tmp_path, "mixed-64k-70r", bench / "lvmirror2"))
    assert mixed["ios"] > 0 and mixed["p50_ms"] <= mixed["p99_ms"]


@needs_fio
def test_collect_ratios_markdown_svg(tmp_path):
    run = tmp_path / "run"
    bench = run / "bench"
    for t in ("lvmirror2", "md-raid1"):
        run_job(tmp_path, "randread-4k-qd32", bench / t)
    (bench / "meta.json").write_text(json.dumps({"kernel": "6.1.0-56-amd64", "accel": "tcg",
                                                 "date": "2026-11-24T10:00Z"}) + "\n")
    (bench / "resync.jsonl").write_text(
        json.dumps({"kind": "resync_full", "bytes": 100_000_000, "seconds": 2.0}) + "\n" +
        json.dumps({"kind": "md_resync_full", "bytes": 100_000_000, "seconds": 1.0}) + "\n" +
        json.dumps({"kind": "resync_1pct", "bytes": 1_000_000, "seconds": 0.1}) + "\n")
    data = report.collect(str(run))
    a = data["results"]["randread-4k-qd32"]["lvmirror2"]["iops"]
    b = data["results"]["randread-4k-qd32"]["md-raid1"]["iops"]
    assert data["ratios"]["randread-4k-qd32"]["lvmirror2/md-raid1"]["iops"] == round(a / b, 3)
    assert "lvmirror1/fileio" not in data["ratios"]["randread-4k-qd32"]     # no fileio run
    md = report.markdown(data)
    assert "software emulation" in md and "6.1.0-56-amd64" in md
    assert "| randread-4k-qd32 |" in md
    assert "lvmirror full resync / md resync throughput: 0.50" in md
    assert "1% changed / full resync time: 0.050" in md
    root = ET.fromstring(report.svg(data))
    assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}rect")) >= 2
    assert report.main([str(run), "--results", str(tmp_path / "results")]) == 0
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert saved["meta"]["accel"] == "tcg"


@needs_fio
def test_tcmu_runner_column_and_ratio(tmp_path):
    """tcmu-runner's user:qcow LUN is a figures column, lvmirror 1 image / tcmu-runner a ratio
    column, in results.md, results.json and the plot."""
    run = tmp_path / "run"
    bench = run / "bench"
    jobs = ("randwrite-4k-qd1", "seqread-1m")
    for job in jobs:
        for t in ("lvmirror1", "tcmu-runner"):
            run_job(tmp_path, job, bench / t)
    (bench / "meta.json").write_text(json.dumps({"accel": "tcg", "date": "2026-11-24T10:00Z",
                                                 "tcmu_runner": "tcmu-runner 1.5.4"}) + "\n")
    data = report.collect(str(run))
    for job in jobs:
        a = data["results"][job]["lvmirror1"]
        b = data["results"][job]["tcmu-runner"]
        assert a["iops"] > 0 and b["iops"] > 0
        r = data["ratios"][job]["lvmirror1/tcmu-runner"]
        assert r["iops"] == round(a["iops"] / b["iops"], 3)
        assert r["p99"] == round(a["p99_ms"] / b["p99_ms"], 3)
        assert "lvmirror1/fileio" not in data["ratios"][job]          # no fileio run
    md = report.markdown(data)
    assert "tcmu-runner 1.5.4" in md
    ratio_header = next(line for line in md.splitlines() if line.startswith("| job | lvmirror 2"))
    assert ratio_header.endswith("| lvmirror 1 image / fileio | lvmirror 1 image / tcmu-runner |")
    figures_header = next(line for line in md.splitlines()
                          if line.startswith("| job |") and line != ratio_header)
    assert figures_header == "| job | lvmirror 1 image | tcmu-runner (user:qcow) |"
    r = data["ratios"]["seqread-1m"]["lvmirror1/tcmu-runner"]
    row = next(line for line in md.splitlines() if line.startswith("| seqread-1m | –"))
    assert row.endswith(f"| – | {r['iops']:.2f} (p99 {r['p99']:.2f}) |")
    f = data["results"]["seqread-1m"]["tcmu-runner"]
    row = next(line for line in md.splitlines()
               if line.startswith("| seqread-1m |") and "(p99" not in line)
    assert row.endswith(f"| {f['iops']:,.0f} · {f['mbps']:,.1f} · {f['p50_ms']:.2f} / "
                        f"{f['p99_ms']:.2f} |")
    root = ET.fromstring(report.svg(data))
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(ns + "text")]
    assert "lvmirror 1 image / tcmu-runner" in texts
    assert f"{data['ratios']['randwrite-4k-qd1']['lvmirror1/tcmu-runner']['iops']:.2f}" in texts
    # two jobs with one ratio each, and the four legend swatches
    assert len(root.findall(ns + "rect")) == 2 + 4
    assert report.main([str(run), "--results", str(tmp_path / "results")]) == 0
    saved = json.loads((tmp_path / "results" / "results.json").read_text())
    assert saved["ratios"]["seqread-1m"]["lvmirror1/tcmu-runner"] == r
    assert saved["results"]["seqread-1m"]["tcmu-runner"] == f


def test_split_window(tmp_path):
    d = tmp_path / "split"
    d.mkdir()
    t0 = 1_795_000_000_000          # ms since the epoch
    lines = []
    for ms in range(0, 10_000, 5):  # one completion every 5 ms for 10 s, 1 ms each
        lat = 1_000_000
        if 5_000 <= ms < 5_100:     # right after the split: 20 completions at 30 ms
            lat = 30_000_000
        if 5_200 <= ms < 5_300:     # and a 100 ms pause with no completion at all
            continue
        lines.append(f"{t0 + ms}, {lat}, 1, 4096, 0")
    (d / "io_lat.1.log").write_text("\n".join(lines) + "\n")
    (d / "split.json").write_text(json.dumps({"split_time": (t0 + 5_000) / 1000, "drained": 7}))
    s = report.split_latency(str(d))
    assert s["steady_p99_ms"] == 1.0 and s["window_max_ms"] == 30.0
    assert s["window_p99_ms"] == 30.0 and s["window_p50_ms"] == 1.0
    assert s["window_max_gap_ms"] == pytest.approx(105.0)
    assert s["steady_max_gap_ms"] == pytest.approx(5.0)
    assert s["drained"] == 7
    assert report.split_latency(str(tmp_path / "missing")) is None


def test_profile_summary(tmp_path):
    p = tmp_path / "bench" / "profile"
    p.mkdir(parents=True)
    (p / "lvmirror2-randwrite.txt").write_text(
        "run (daemon.py:1);handle (lu.py:2);pwritev (image.py:3) 30\n"
        "run (daemon.py:1);fetch (ring.py:4) 10\n")
    text = report.profile_summary(str(tmp_path))
    assert "40 samples" in text
    assert " 75.0%  pwritev (image.py:3)" in text
    assert "100.0%  run (daemon.py:1)" in text          # inclusive


@needs_fio
def test_handler_cpu_per_command(tmp_path):
    """lab-bench.sh's <job>.cpu (the handler's clock ticks over the measured seconds) becomes
    CPU ms per command (ticks / hz over iops x seconds) in results.json and a table of its own,
    with lvmirror 1 image / tcmu-runner; a kernel target or a job without the file has none."""
    run = tmp_path / "run"
    bench = run / "bench"
    for t in ("lvmirror1", "tcmu-runner", "md-raid1"):
        run_job(tmp_path, "randwrite-4k-qd1", bench / t)
    run_job(tmp_path, "seqread-1m", bench / "lvmirror1")
    (bench / "lvmirror1" / "randwrite-4k-qd1.cpu").write_text(
        json.dumps({"ticks": 600, "hz": 100, "seconds": 10}))
    (bench / "tcmu-runner" / "randwrite-4k-qd1.cpu").write_text(
        json.dumps({"ticks": 250, "hz": 100, "seconds": 10}))
    (bench / "lvmirror1" / "seqread-1m.cpu").write_text("{not json")
    data = report.collect(str(run))
    res = data["results"]["randwrite-4k-qd1"]
    a, b = res["lvmirror1"], res["tcmu-runner"]
    assert a["cpu_ms"] == round(6.0 / (a["iops"] * 10) * 1000, 3)
    assert b["cpu_ms"] == round(2.5 / (b["iops"] * 10) * 1000, 3)
    assert "cpu_ms" not in res["md-raid1"]
    assert "cpu_ms" not in data["results"]["seqread-1m"]["lvmirror1"]
    md = report.markdown(data).splitlines()
    head = md.index(next(line for line in md if line.startswith("Handler CPU per command")))
    assert md[head + 2] == ("| job | lvmirror 1 image | tcmu-runner (user:qcow) | "
                            "lvmirror 1 image / tcmu-runner |")
    row = next(line for line in md[head:] if line.startswith("| randwrite-4k-qd1 |"))
    assert row == (f"| randwrite-4k-qd1 | {a['cpu_ms']:,.3f} | {b['cpu_ms']:,.3f} | "
                   f"{a['cpu_ms'] / b['cpu_ms']:.2f} |")
    assert not any(line.startswith("| no I/O") for line in md)     # no idle.cpu: no row
    assert report.handler_cpu(str(tmp_path / "missing.cpu"), 100.0) is None
    assert report.handler_cpu(str(bench / "tcmu-runner" / "randwrite-4k-qd1.cpu"), 0) is None


def _read_qd1_both(tmp_path, cpu: dict):
    """A run dir with the 4 KiB random read at queue depth 1 on lvmirror 1 image and
    tcmu-runner (real fio output), each with ``cpu`` as its .cpu file; (run, run/bench)."""
    run = tmp_path / "run"
    bench = run / "bench"
    for t in ("lvmirror1", "tcmu-runner"):
        run_job(tmp_path, "randread-4k-qd1", bench / t)
        (bench / t / "randread-4k-qd1.cpu").write_text(json.dumps(cpu))
    return run, bench


def test_handler_idle_cpu(tmp_path):
    """lab-bench.sh's idle.cpu (the handler's ticks with its LUN logged in and no I/O) becomes
    a percentage of one CPU in results.json and a last row of the per-command table; a target
    without the file shows a dash, an unreadable file counts as none."""
    run, bench = _read_qd1_both(tmp_path, {"ticks": 300, "hz": 100, "seconds": 10})
    (bench / "lvmirror1" / "idle.cpu").write_text(
        json.dumps({"ticks": 140, "hz": 100, "seconds": 20}))
    (bench / "tcmu-runner" / "idle.cpu").write_text("{not json")
    data = report.collect(str(run))
    assert data["handler_idle"] == {"lvmirror1": 7.0}
    assert "idle" not in data["results"]
    md = report.markdown(data).splitlines()
    assert "| no I/O (% of one CPU) | 7.0 | – | – |" in md
    assert report.handler_idle(str(tmp_path / "missing.cpu")) is None
    bad = tmp_path / "bad.cpu"
    for content in ({"ticks": 5, "hz": 100, "seconds": 0},      # no duration
                    {"ticks": -40, "hz": 100, "seconds": 10},   # a handler process ended
                    {"ticks": 5, "hz": 0, "seconds": 10},
                    {"ticks": float("nan"), "hz": 100, "seconds": 10},
                    {"ticks": float("inf"), "hz": 100, "seconds": 10},
                    {"ticks": "5", "hz": [], "seconds": 10}):
        bad.write_text(json.dumps(content))
        assert report.handler_idle(str(bad)) is None, content
        assert report.handler_cpu(str(bad), 100.0) is None, content


@needs_fio
def test_ring_thread_share(tmp_path):
    """lab-bench.sh's <job>.ring (the LUN's counts from ``lvmirror status`` before and after the
    job) becomes the percentage of the job's commands lvmirror's ring thread answered itself,
    with its ring stalls, in results.json and a table of its own; a target without the file
    shows a dash, and a file that cannot be a measurement (unreadable, no commands, counts
    gone backwards after a restart) counts as none."""
    run = tmp_path / "run"
    bench = run / "bench"
    for t in ("lvmirror1", "lvmirror2", "tcmu-runner"):
        run_job(tmp_path, "randread-4k-qd32", bench / t)
    counts = lambda c, r, s: {"commands": c, "ring_thread_commands": r, "ring_stalls": s}
    (bench / "lvmirror1" / "randread-4k-qd32.ring").write_text(json.dumps(
        {"before": counts(1000, 900, 0), "after": counts(5000, 2900, 0)}))
    (bench / "lvmirror2" / "randread-4k-qd32.ring").write_text(json.dumps(
        {"before": counts(10, 0, 1), "after": counts(4010, 3990, 3)}))
    data = report.collect(str(run))
    res = data["results"]["randread-4k-qd32"]
    assert res["lvmirror1"]["ring"] == {"commands": 4000, "ring_pct": 50.0, "stalls": 0}
    assert res["lvmirror2"]["ring"] == {"commands": 4000, "ring_pct": 99.7, "stalls": 2}
    assert "ring" not in res["tcmu-runner"]
    md = report.markdown(data).splitlines()
    head = md.index(next(line for line in md if line.startswith("Commands lvmirror's ring")))
    assert md[head + 2] == "| job | lvmirror 2 images | lvmirror 1 image |"
    assert md[head + 4] == "| randread-4k-qd32 | 99.7 % (2) | 50.0 % |"
    p = bench / "x.ring"
    for bad in ("{not json", json.dumps({"before": counts(5, 0, 0), "after": counts(5, 0, 0)}),
                json.dumps({"before": counts(500, 400, 0), "after": counts(20, 10, 0)}),
                json.dumps({"before": counts(0, 0, 0), "after": counts(10, 11, 0)}),
                json.dumps({"before": counts(0, 0, 0)}),
                json.dumps({"before": counts(0, 0, 0), "after": counts("100", 50, 0)}),
                json.dumps({"before": counts(0, 0, 0), "after": counts(10.9, 5, 0)}),
                json.dumps({"before": counts(0, 0, 0), "after": counts(True, True, 0)}),
                json.dumps({"before": counts(0, 0, 0), "after": counts(None, 1, 0)}),
                '{"before": {"commands": 0, "ring_thread_commands": 0, "ring_stalls": 0}, '
                '"after": {"commands": 1e400, "ring_thread_commands": 1, "ring_stalls": 0}}',
                "[" * 100000 + "]" * 100000):
        p.write_text(bad)
        assert report.ring_share(str(p)) is None, bad
    assert report.ring_share(str(tmp_path / "missing.ring")) is None
    p.write_text(json.dumps({"before": counts(0, 0, 0), "after": counts(20000, 19999, 0)}))
    assert report.ring_share(str(p))["ring_pct"] == 99.9          # 100.0 only when all were
    p.write_text(json.dumps({"before": counts(0, 0, 0), "after": counts(10 ** 400, 1, 0)}))
    assert report.ring_share(str(p))["ring_pct"] == 0.0           # huge, but whole numbers


def test_a_peer_p99_of_zero_gives_no_p99_ratio_and_no_crash():
    """A peer whose p99 rounds to 0.000 ms has no p99 ratio (None in results.json): the table
    shows a dash for it instead of raising TypeError (a trial's hand-made fio output did)."""
    data = {"meta": {}, "targets": {}, "handler_idle": {}, "split": None, "resync": [],
            "problems": [],
            "results": {"randread-4k-qd1": {
                "lvmirror2": {"iops": 100.0, "mbps": 0.4, "p50_ms": 1.0, "p99_ms": 2.0},
                "md-raid1": {"iops": 200.0, "mbps": 0.8, "p50_ms": 0.0, "p99_ms": 0.0}}},
            "ratios": {"randread-4k-qd1": {"lvmirror2/md-raid1": {"iops": 0.5, "p99": None}}}}
    md = report.markdown(data)
    assert "| randread-4k-qd1 | 0.50 (p99 –) |" in md


def test_gil_waits_per_command_and_share_of_long_ones(tmp_path):
    """lab-bench.sh's <job>.ring with the ring threads' waits for the GIL before and after the
    job (``ring_gil_waits``: a histogram after the compiled path's I/O and one after its poll)
    becomes the waits' microseconds per command and the share of waits over 0.1 ms (the
    buckets from the 100 us edge on); a file without the figure, with counts gone backwards
    or histograms of another shape counts as none."""
    edges = [10e-6, 50e-6, 100e-6, 250e-6]

    def snap(commands, io, poll, io_s, poll_s):
        return {"commands": commands, "ring_gil_waits": {
            "edges": edges, "after_io": {"counts": io, "seconds": io_s, "longest": 0.0},
            "after_poll": {"counts": poll, "seconds": poll_s, "longest": 0.0}}}

    p = tmp_path / "j.ring"
    p.write_text(json.dumps({"before": snap(100, [5, 0, 0, 0, 0], [5, 0, 0, 0, 0], 0.5, 0.5),
                             "after": snap(1100, [915, 50, 20, 10, 10], [5, 0, 0, 0, 0],
                                           0.502, 0.504)}))
    # 1,000 waits after I/O, 20 of them from 100 us on; 6 ms over 1,000 commands
    assert report.gil_waits(str(p)) == {"waits": 1000, "us_per_command": 6.0,
                                        "over_100us_pct": 2.0}
    assert report.gil_waits(str(tmp_path / "missing.ring")) is None
    good = json.loads(p.read_text())
    for change in (lambda d: d["after"].pop("ring_gil_waits"),
                   lambda d: d["after"]["ring_gil_waits"]["after_io"]["counts"].pop(),
                   lambda d: d["after"]["ring_gil_waits"]["after_io"]["counts"].__setitem__(0, 1),
                   lambda d: d["after"]["ring_gil_waits"]["after_io"]["counts"].__setitem__(0, 9.5),
                   lambda d: d["after"].__setitem__("commands", 100),
                   lambda d: d["after"].__setitem__("ring_gil_waits", None)):
        bad = json.loads(json.dumps(good))
        change(bad)
        p.write_text(json.dumps(bad))
        assert report.gil_waits(str(p)) is None


def test_handler_cpu_by_thread(tmp_path):
    """lab-bench.sh's <job>.threads ("TID NS NAME") becomes each thread's CPU ms per command
    over the job's measured seconds (from its .cpu), a pool's numbered threads summed as
    NAME-*, and idle.threads ms per second; the table shows the threads over 5 % of the
    handler's, largest first."""
    run, bench = _read_qd1_both(tmp_path, {"ticks": 3_000_000_000, "hz": 1_000_000_000,
                                           "seconds": 10})
    n = report.collect(str(run))["results"]["randread-4k-qd1"]["lvmirror1"]["iops"] * 10
    ms = int(n * 1e6)                  # 1 ms a command, in ns over the job's commands
    (bench / "lvmirror1" / "randread-4k-qd1.threads").write_text(
        f"480 {400 * ms // 1000} ring-bt\n481 {30 * ms // 1000} volume-call-1\n"
        f"487 {20 * ms // 1000} volume-call-2\n446 {ms // 1000} metrics\n471 0 bench1-img0-0\n")
    (bench / "tcmu-runner" / "randread-4k-qd1.threads").write_text(
        "1042 1300000000 aio-uio0\n1043 900000000 cmdproc-uio0\n1022 0 tcmu-runner\n")
    (bench / "lvmirror1" / "idle.cpu").write_text(
        json.dumps({"ticks": 300_000_000, "hz": 1_000_000_000, "seconds": 10}))
    (bench / "lvmirror1" / "idle.threads").write_text("446 110000000 metrics\n482 90000000 "
                                                      "ring-watch-bt\n")
    data = report.collect(str(run))
    res = data["results"]["randread-4k-qd1"]
    assert res["lvmirror1"]["threads_ms"] == {"ring-bt": 0.4, "volume-call-*": 0.05,
                                              "metrics": 0.001}
    assert list(res["tcmu-runner"]["threads_ms"]) == ["aio-uio0", "cmdproc-uio0"]
    assert data["idle_threads"] == {"lvmirror1": {"metrics": 11.0, "ring-watch-bt": 9.0}}
    md = report.markdown(data).splitlines()
    row = next(line for line in md[md.index(next(
        line for line in md if line.startswith("Handler CPU by thread"))):]
        if line.startswith("| randread-4k-qd1 |"))
    assert row.startswith("| randread-4k-qd1 | ring-bt 0.400 · volume-call-* 0.050 | ")
    assert "metrics" not in row                                    # under 5 % of the handler's
    assert "- lvmirror 1 image: metrics 11.000 · ring-watch-bt 9.000" in md
    assert report.thread_cpu(str(tmp_path / "missing.threads"), 10.0) is None
    assert report.thread_cpu(str(bench / "lvmirror1" / "idle.threads"), 0) is None


def test_the_whole_guests_cpu_each_job(tmp_path):
    """lab-bench.sh's <job>.sys (/proc/stat's ticks of all vCPUs and context switches over the
    job's measured seconds) becomes the busy share, the ms of CPU a command and the context
    switches a command, for every target; a file that holds no measurement is left out."""
    run, bench = _read_qd1_both(tmp_path, {"ticks": 3_000_000_000, "hz": 1_000_000_000,
                                           "seconds": 10})
    iops = report.collect(str(run))["results"]["randread-4k-qd1"]["lvmirror1"]["iops"]
    sys_file = bench / "lvmirror1" / "randread-4k-qd1.sys"
    # 10 s on 2 vCPUs = 2,000 ticks: 1,500 busy, 500 idle; 4 context switches a command
    sys_file.write_text(json.dumps({"busy": 1500, "idle": 500, "ctxt": int(iops * 10 * 4),
                                    "hz": 100, "seconds": 10, "cpus": 2}))
    data = report.collect(str(run))
    g = data["results"]["randread-4k-qd1"]["lvmirror1"]["guest"]
    assert g["busy_pct"] == 75.0
    assert g["cpu_ms"] == round(15_000 / (iops * 10), 3)
    assert abs(g["ctxt"] - 4.0) <= 0.1
    assert "guest" not in data["results"]["randread-4k-qd1"]["tcmu-runner"]    # no .sys file
    md = report.markdown(data)
    assert "The whole guest over each job" in md
    assert f"| randread-4k-qd1 | 75 % · {g['cpu_ms']:.3f} · {g['ctxt']:.1f} |\n" in md
    for bad in ({"busy": -1, "idle": 5, "ctxt": 1, "hz": 100, "seconds": 10},
                {"busy": 0, "idle": 0, "ctxt": 1, "hz": 100, "seconds": 10},
                {"busy": 1, "idle": 1, "ctxt": 1, "hz": 0, "seconds": 10},
                {"busy": 1, "idle": 1, "hz": 100, "seconds": 10}):
        sys_file.write_text(json.dumps(bad))
        assert report.guest_cpu(str(sys_file), iops) is None
    # the busy ticks by kind: ms a command each, irq and softirq together
    sys_file.write_text(json.dumps({"busy": 1500, "idle": 500, "ctxt": int(iops * 10 * 4),
                                    "user": 400, "system": 800, "irq": 100, "softirq": 200,
                                    "steal": 0, "hz": 100, "seconds": 10, "cpus": 2}))
    data = report.collect(str(run))
    g = data["results"]["randread-4k-qd1"]["lvmirror1"]["guest"]
    assert g["user_ms"] == round(4_000 / (iops * 10), 3)
    assert g["system_ms"] == round(8_000 / (iops * 10), 3)
    assert g["softirq_ms"] == round(3_000 / (iops * 10), 3)
    assert (f"| randread-4k-qd1 | 75 % · {g['cpu_ms']:.3f} ({g['user_ms']:.3f} / "
            f"{g['system_ms']:.3f} / {g['softirq_ms']:.3f}) · {g['ctxt']:.1f} |\n"
            in report.markdown(data))
    sys_file.write_text("not json")
    assert report.guest_cpu(str(sys_file), iops) is None
    assert report.guest_cpu(str(sys_file.with_suffix(".none")), iops) is None


@needs_fio
def test_the_guests_interrupts_a_command(tmp_path):
    """lab-bench.sh's <job>.irqs (/proc/stat's interrupt total and softirqs by kind over the
    job's measured seconds) becomes interrupts and softirqs a command, the kinds of 1 % of
    them or more shown largest first; a file with a negative, missing or unreadable count, or
    none at all, is left out."""
    run, bench = _read_qd1_both(tmp_path, {"ticks": 3_000_000_000, "hz": 1_000_000_000,
                                           "seconds": 10})
    iops = report.collect(str(run))["results"]["randread-4k-qd1"]["lvmirror1"]["iops"]
    n = iops * 10
    irqs = bench / "lvmirror1" / "randread-4k-qd1.irqs"
    irqs.write_text(json.dumps({"seconds": 10, "interrupts": round(n * 12), "softirqs": round(n * 300),
                                "HI": 0, "TIMER": round(n * 5), "NET_RX": round(n * 290),
                                "RCU": round(n * 8), "SCHED": round(n * 0.5)}))
    data = report.collect(str(run))
    q = data["results"]["randread-4k-qd1"]["lvmirror1"]["irqs"]
    assert q["interrupts"] == round(round(n * 12) / n, 1)
    assert q["softirqs"] == round(round(n * 300) / n, 1)
    assert q["NET_RX"] == round(round(n * 290) / n, 1)
    assert "irqs" not in data["results"]["randread-4k-qd1"]["tcmu-runner"]   # no .irqs file
    md = report.markdown(data)
    # SCHED (0.5 of 300, under 1 %) and HI (none) are not shown; the rest largest first; no
    # column for the target without the file
    assert (f"| randread-4k-qd1 | {q['interrupts']:.1f} · {q['softirqs']:.1f} (NET_RX "
            f"{q['NET_RX']:.1f} · RCU {q['RCU']:.1f} · TIMER {q['TIMER']:.1f}) |\n" in md)
    assert "tcmu-runner" not in md.split("interrupts a command")[1].split("\n\n")[1]
    for bad in ({"seconds": 10, "interrupts": -1, "softirqs": 5},
                {"seconds": 0, "interrupts": 1, "softirqs": 5},
                {"seconds": 10, "softirqs": 5},
                {"seconds": 10, "interrupts": 1, "softirqs": 5, "NET_RX": -2}):
        irqs.write_text(json.dumps(bad))
        assert report.guest_irqs(str(irqs), iops) is None
    irqs.write_text("not json")
    assert report.guest_irqs(str(irqs), iops) is None
    irqs.write_text("[" * 100_000 + "]" * 100_000)      # too deep for json: left out, no crash
    assert report.guest_irqs(str(irqs), iops) is None
    assert report.guest_irqs(str(irqs.with_suffix(".none")), iops) is None
    assert report.guest_irqs(str(bench / "lvmirror1" / "x.irqs"), 0.0) is None


@needs_fio
def test_the_guests_threads_outside_the_handler(tmp_path):
    """lab-bench.sh's <job>.others ("TID NS COMM": every guest thread outside the handler)
    becomes ms a command over the .sys file's seconds, for every target: kernel workers summed
    by the work they last ran, per-CPU threads as NAME/*; the table gives the total and the
    threads over 5 % of it."""
    run, bench = _read_qd1_both(tmp_path, {"ticks": 3_000_000_000, "hz": 1_000_000_000,
                                           "seconds": 10})
    iops = report.collect(str(run))["results"]["randread-4k-qd1"]["lvmirror1"]["iops"]
    ms = int(iops * 10 * 1e6)          # 1 ms a command, in ns over the job's commands
    (bench / "lvmirror1" / "randread-4k-qd1.sys").write_text(json.dumps(
        {"busy": 1500, "idle": 500, "ctxt": 1, "hz": 100, "seconds": 10, "cpus": 2}))
    (bench / "lvmirror1" / "randread-4k-qd1.others").write_text(
        f"91 {300 * ms // 1000} kworker/u4:2-flush-7:0\n"
        f"95 {100 * ms // 1000} kworker/u4:0+flush-7:0\n"
        f"120 {200 * ms // 1000} fio\n40 {50 * ms // 1000} loop0\n"
        f"12 {10 * ms // 1000} ksoftirqd/0\n19 {10 * ms // 1000} ksoftirqd/1\n"
        f"30 {5 * ms // 1000} kworker/0:1\n")
    data = report.collect(str(run))
    res = data["results"]["randread-4k-qd1"]
    assert res["lvmirror1"]["others_ms"] == {"kworker flush-7:0": 0.4, "fio": 0.2, "loop0": 0.05,
                                             "ksoftirqd/*": 0.02, "kworker": 0.005}
    assert "others_ms" not in res["tcmu-runner"]                       # no .others file
    md = report.markdown(data).splitlines()
    row = next(line for line in md[md.index(next(
        line for line in md if line.startswith("The guest's threads outside the handler"))):]
        if line.startswith("| randread-4k-qd1 |"))
    assert row == "| randread-4k-qd1 | 0.675: kworker flush-7:0 0.400 · fio 0.200 · loop0 0.050 |"
