#!/usr/bin/env python3
"""Turn one run of the side-by-side benchmark (``bench/run``; raw output in ``lab-out/bench``)
into the results table: ``results.md`` and ``results.json`` (with the kernel, QEMU accelerator
and date) and ``ratios.svg``, a plot of lvmirror's IOPS against its peers.

    bench/report.py RUN_DIR [--results DIR]      # default DIR: bench/results
    bench/report.py RUN_DIR --profile            # summarise the py-spy profiles of a --profile run

RUN_DIR/bench holds what lab-bench.sh wrote in the guest: meta.json, targets.jsonl,
<target>/<job>.json (fio JSON), <target>/<job>.threads and idle.threads (the same CPU by
thread: "TID NS NAME"), <target>/<job>.cpu and <target>/idle.cpu (the user-space
handler's CPU time over a job's measured seconds, and with no I/O, in units of 1/hz s: the
scheduler's nanoseconds since 2026-12-05, clock ticks before; lvmirror and tcmu-runner
targets only), <target>/<job>.sys (every target: the whole guest's busy and idle ticks and
context switches over the same seconds, from /proc/stat), <target>/<job>.irqs (every target:
the guest's hardware interrupts and softirqs by kind over the same seconds, from /proc/stat;
files from 2026-12-07 on), <target>/<job>.ring (lvmirror targets: the LUN's commands, those its ring thread
answered itself, its ring stalls and its ring threads' waits for the GIL, before and after the
job), split/{split.json,
io_lat.1.log,fio.json}, resync.jsonl, profile/*.txt (py-spy raw, collapsed stacks).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import sys
from xml.sax.saxutils import escape

TARGETS = ("lvmirror2", "lvmirror3", "md-raid1", "lvmirror1", "fileio", "tcmu-runner")
TARGET_TITLES = {
    "lvmirror2": "lvmirror 2 images", "lvmirror3": "lvmirror 3 images",
    "md-raid1": "iblock on md RAID1", "lvmirror1": "lvmirror 1 image", "fileio": "fileio",
    "tcmu-runner": "tcmu-runner (user:qcow)",
}
# the ratio columns' and the plot legend's shorter names
RATIO_TITLES = dict(TARGET_TITLES, **{"tcmu-runner": "tcmu-runner"})
JOBS = ("randwrite-4k-qd1", "randwrite-4k-qd32", "randread-4k-qd1", "randread-4k-qd32",
        "mixed-64k-70r", "seqwrite-1m", "seqread-1m")
# (numerator, denominator): what each lvmirror LUN is compared with; lvmirror 1 image also with
# Debian's tcmu-runner, the C handler on the same TCMU ring
RATIOS = (("lvmirror2", "md-raid1"), ("lvmirror3", "md-raid1"), ("lvmirror1", "fileio"),
          ("lvmirror1", "tcmu-runner"))
WINDOW_S = 0.5          # the second around the split: [T - 0.5 s, T + 0.5 s]


# ------------------------------------------------------------------ parsing
def fio_figures(fio_json: dict) -> dict:
    """IOPS, MB/s and completion-latency p50/p99 (ms) of a one-job fio JSON result. A mixed job
    reported with unified_rw_reporting=both counts as one stream ('mixed')."""
    job = fio_json["jobs"][0]
    if "mixed" in job and job["mixed"].get("total_ios"):
        parts = [job["mixed"]]
    else:
        parts = [job[d] for d in ("read", "write") if job.get(d, {}).get("total_ios")]
    if not parts:
        raise ValueError(f"fio job {job.get('jobname')!r} did no I/O")
    iops = sum(p["iops"] for p in parts)
    bw = sum(p["bw_bytes"] for p in parts)
    # the busiest direction's percentiles (a single direction for every job but the mix)
    main = max(parts, key=lambda p: p["total_ios"])
    pct = main["clat_ns"].get("percentile", {})

    def pick(q):
        for k, v in pct.items():
            if abs(float(k) - q) < 1e-6:
                return v / 1e6
        raise ValueError(f"fio result has no p{q:g} (percentile_list=50:99 expected)")
    return {"iops": round(iops, 1), "mbps": round(bw / 1e6, 2), "p50_ms": round(pick(50), 3),
            "p99_ms": round(pick(99), 3), "ios": sum(p["total_ios"] for p in parts),
            "errors": job.get("error", 0)}


def percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def split_latency(split_dir: str) -> dict | None:
    """Latency of I/O around the split from fio's per-I/O log (completion time in ms since the
    epoch, latency in ns) and the split's time T (wall clock, from ``lvmirror --json split``)."""
    try:
        with open(os.path.join(split_dir, "split.json")) as f:
            split = json.loads(f.read().strip().splitlines()[-1])
        log = os.path.join(split_dir, "io_lat.1.log")
        samples = []
        with open(log) as f:
            for line in f:
                fields = line.split(",")
                if len(fields) >= 2:
                    samples.append((int(fields[0]) / 1000.0, int(fields[1]) / 1e6))
    except (OSError, ValueError, KeyError, IndexError):
        return None
    if not samples:
        return None
    t_split = float(split["split_time"])
    samples.sort()
    start, end = samples[0][0], samples[-1][0]
    # steady state: everything at least 1 s away from T, without the first and last second
    steady = sorted(lat for t, lat in samples
                    if abs(t - t_split) > 1.0 and start + 1 <= t <= end - 1)
    window = [(t, lat) for t, lat in samples if abs(t - t_split) <= WINDOW_S]
    wl = sorted(lat for _, lat in window)
    times = [t for t, _ in samples]

    def max_gap(lo, hi):   # the longest time with no completion at all (a pause would show here)
        ts = [t for t in times if lo <= t <= hi]
        return max((b - a for a, b in zip(ts, ts[1:])), default=None)
    steady_s = max(end - start - 2 - 2, 1e-9)
    return {
        "split_time": t_split, "drained": split.get("drained"),
        "steady_p50_ms": percentile(steady, 50), "steady_p99_ms": percentile(steady, 99),
        "window_p50_ms": percentile(wl, 50), "window_p99_ms": percentile(wl, 99),
        "window_max_ms": wl[-1] if wl else None,
        "window_iops": round(len(window) / (2 * WINDOW_S), 1),
        "steady_iops": round(len(steady) / steady_s, 1),
        "window_max_gap_ms": round(max_gap(t_split - WINDOW_S, t_split + WINDOW_S) * 1000, 1)
        if len(window) > 1 else None,
        "steady_max_gap_ms": round(max_gap(start + 1, t_split - 1.0) * 1000, 1)
        if t_split - 1.0 > start + 1 else None,
        "ios": len(samples),
    }


def _ticks_seconds(path: str) -> float | None:
    """CPU seconds per measured second in a ``.cpu`` file (``{"ticks", "hz", "seconds"}``);
    None when it cannot be read or holds what a measurement cannot give: a negative or
    non-finite figure (a handler process that ended between the two readings leaves the
    second sum smaller), a zero rate or duration."""
    try:
        with open(path) as f:
            c = json.load(f)
        ticks, hz, seconds = float(c["ticks"]), float(c["hz"]), float(c["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(map(math.isfinite, (ticks, hz, seconds))) or ticks < 0 or hz <= 0 or seconds <= 0:
        return None
    return ticks / hz / seconds


def _measured_seconds(path: str) -> float | None:
    """The measured seconds a ``.cpu`` file covers (its "seconds"), None when unreadable."""
    try:
        with open(path) as f:
            s = float(json.load(f)["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return s if math.isfinite(s) and s > 0 else None


def handler_cpu(path: str, iops: float) -> float | None:
    """Milliseconds of CPU (user + system) the target's user-space handler spent per command:
    ``path`` is lab-bench.sh's ``<job>.cpu``, ``{"ticks", "hz", "seconds"}`` - the CPU time in
    1/hz s (the threads' sum_exec_runtime in ns, or clock ticks in runs before 2026-12-05) the
    handler (lvmirrord with its volume processes, or tcmu-runner) used in the job's measured
    ``seconds`` - over the ``iops`` x ``seconds`` commands fio completed meanwhile. The system
    share includes the kernel's work done in the handler's own calls (the ring's completions,
    the data copies), the same for both handlers. None when there is no such file (a kernel
    target, a --profile run) or it cannot be read."""
    per_second = _ticks_seconds(path)
    if per_second is None or not iops > 0:
        return None
    return round(per_second / iops * 1000, 3)


def handler_idle(path: str) -> float | None:
    """Percent of one CPU the target's user-space handler used with its LUN logged in and no
    I/O: ``path`` is lab-bench.sh's ``idle.cpu`` (``{"ticks", "hz", "seconds"}``, measured
    before the target's first job). It is part of every job's CPU per command (at 200 IOPS,
    10 % of one CPU is 0.5 ms a command). None when there is no such file or it cannot be
    read."""
    per_second = _ticks_seconds(path)
    return None if per_second is None else round(per_second * 100, 1)


def guest_cpu(path: str, iops: float) -> dict | None:
    """The whole guest over a job's measured seconds, every target's: ``path`` is
    lab-bench.sh's ``<job>.sys`` (``{"busy", "idle", "ctxt", "hz", "seconds", "cpus"}``: the
    USER_HZ ticks of all vCPUs busy - user, nice, system, irq, softirq, steal - and idle with
    iowait, and the context switches, from /proc/stat). It shows whether a target's IOPS were
    bound by the guest's CPUs (fio, the initiator, the kernel's target, the handler: every
    vCPU busy) or by waits (idle left over). Returns ``{"busy_pct": percent of the vCPUs'
    time busy, "cpu_ms": busy ms a command, "ctxt": context switches a command}`` over the
    ``iops`` x ``seconds`` commands fio completed, and when the file has the busy ticks by
    kind (``"user"``, ``"system"``, ``"irq"``, ``"softirq"``) also ``"user_ms"``,
    ``"system_ms"`` and ``"softirq_ms"`` (irq and softirq together) a command; None when
    there is no such file, it cannot be read or ``iops`` is not above 0."""
    try:
        with open(path) as f:
            c = json.load(f)
        busy, idle, ctxt = float(c["busy"]), float(c["idle"]), float(c["ctxt"])
        hz, seconds = float(c["hz"]), float(c["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    nums = (busy, idle, ctxt, hz, seconds)
    if (not all(map(math.isfinite, nums)) or min(busy, idle, ctxt) < 0 or hz <= 0
            or seconds <= 0 or busy + idle <= 0 or not iops > 0):
        return None
    commands = iops * seconds
    out = {"busy_pct": round(busy / (busy + idle) * 100, 1),
           "cpu_ms": round(busy / hz * 1000 / commands, 3),
           "ctxt": round(ctxt / commands, 1)}
    try:     # the busy ticks by kind (files from 2026-12-05 on): user space, the kernel on
        kinds = {k: float(c[k]) for k in ("user", "system", "irq", "softirq")}  # behalf of a
    except (KeyError, ValueError, TypeError):       # process, and interrupts with softirq
        return out
    if all(math.isfinite(v) and v >= 0 for v in kinds.values()):
        out["user_ms"] = round(kinds["user"] / hz * 1000 / commands, 3)
        out["system_ms"] = round(kinds["system"] / hz * 1000 / commands, 3)
        out["softirq_ms"] = round((kinds["irq"] + kinds["softirq"]) / hz * 1000 / commands, 3)
    return out


SOFTIRQ_KINDS = ("HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED",
                 "HRTIMER", "RCU")     # /proc/softirqs' rows, the kernel's softirq_to_name


def guest_irqs(path: str, iops: float) -> dict | None:
    """The whole guest's interrupts over a job's measured seconds, every target's: ``path`` is
    lab-bench.sh's ``<job>.irqs`` (``{"seconds", "interrupts", "softirqs", "NET_RX", ...}``:
    /proc/stat's ``intr`` total and ``softirq`` line, differences over the window). Softirqs run
    in whichever task was on the CPU (no IRQ_TIME_ACCOUNTING in Debian's kernel), so a
    handler's thread CPU includes the network's receive work that landed on it; these counts
    say whether a target caused more of it a command. Returns ``{"interrupts": hardware
    interrupts a command, "softirqs": softirqs a command, KIND: that kind's a command}`` for
    each of SOFTIRQ_KINDS the file has, over the ``iops`` x ``seconds`` commands fio
    completed; None when there is no such file, it cannot be read or ``iops`` is not above
    0."""
    try:
        with open(path) as f:
            c = json.load(f)
        seconds = float(c["seconds"])
        counts = {"interrupts": float(c["interrupts"]), "softirqs": float(c["softirqs"])}
        counts.update({k: float(c[k]) for k in SOFTIRQ_KINDS if k in c})
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if (not math.isfinite(seconds) or seconds <= 0 or not iops > 0
            or not all(math.isfinite(v) and v >= 0 for v in counts.values())):
        return None
    commands = iops * seconds
    return {k: round(v / commands, 1) for k, v in counts.items()}


def _irqs_cell(q: dict) -> str:
    """One cell of the interrupts table: ``guest_irqs``'s figures as "11.5 · 270.3 (NET_RX
    265.0 · TIMER 2.9 · RCU 4.6)": the kinds of 1 % of the softirqs or more, largest first."""
    kinds = sorted(((k, q[k]) for k in SOFTIRQ_KINDS if k in q and q["softirqs"]
                    and q[k] >= 0.01 * q["softirqs"]), key=lambda kv: -kv[1])
    detail = " · ".join(f"{k} {v:.1f}" for k, v in kinds)
    return f"{q['interrupts']:.1f} · {q['softirqs']:.1f}" + (f" ({detail})" if detail else "")


def _guest_cell(g: dict) -> str:
    """One cell of the whole-guest table: ``guest_cpu``'s figures as "75 % · 2.100 (0.600 /
    1.200 / 0.300) · 4.0" (the split only when the run measured it)."""
    ms = f"{g['cpu_ms']:.3f}"
    if "user_ms" in g:
        ms += f" ({g['user_ms']:.3f} / {g['system_ms']:.3f} / {g['softirq_ms']:.3f})"
    return f"{g['busy_pct']:.0f} % · {ms} · {g['ctxt']:.1f}"


def _thread_group(name: str) -> str:
    """The name threads are summed under: a pool's ``volume-call-1`` as ``volume-call-*``; a
    kernel worker ``kworker/u4:2-flush-7:0`` (the work it last ran) or ``kworker/u4:2+flush-7:0``
    (running it when its name was read: the kernel's wq_worker_comm) as ``kworker flush-7:0``,
    ``kworker`` alone with no work named; a per-CPU thread ``ksoftirqd/1`` as ``ksoftirqd/*``.
    A kernel worker's name is read at the window's end, so its whole window goes to the work it
    ran last."""
    if name.startswith("kworker/"):
        m = re.search(r"[-+]", name)
        return "kworker " + name[m.end():] if m else "kworker"
    head, sep, tail = name.rpartition("/")
    if sep and tail.isdigit():
        return head + "/*"
    head, dash, tail = name.rpartition("-")
    if dash and tail.isdigit():
        return head + "-*"
    return name


def thread_cpu(path: str, per: float) -> dict | None:
    """CPU by thread over a job's measured seconds: ``path`` is lab-bench.sh's ``<job>.threads``
    (the handler's: "TID NS NAME" lines, nanoseconds on a CPU, lvmirrord's Python thread names
    or tcmu-runner's comm) or ``<job>.others`` (the guest's other threads, by comm), ``per``
    what to divide each thread's milliseconds by (the commands fio completed meanwhile, or the
    seconds for idle). Threads are summed by ``_thread_group`` (a pool's ``volume-call-1``,
    ``lun-bt-2`` as ``volume-call-*``; kernel workers by their work). Returns ``{name: figure}``, largest first, without threads that ran
    for none of it; None when there is no such file or ``per`` is not above 0."""
    if not per > 0:
        return None
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    sums: dict = collections.Counter()
    for line in lines:
        parts = line.split(maxsplit=2)
        if len(parts) < 2 or not parts[1].lstrip("-").isdigit():
            continue
        sums[_thread_group(parts[2] if len(parts) == 3 else "?")] += int(parts[1])
    return {n: round(ns / 1e6 / per, 3) for n, ns in sums.most_common() if ns > 0}


def ring_share(path: str) -> dict | None:
    """What lvmirror's ring thread did over a job: ``path`` is lab-bench.sh's ``<job>.ring``,
    the LUN's ``commands``, ``ring_thread_commands`` and ``ring_stalls`` (``lvmirror status``)
    before and after the job, ramp included. Returns ``{"commands", "ring_pct", "stalls"}``:
    the commands fetched over the job, the percentage of them the ring thread answered itself
    (the rest went to the worker pool: a hand-off to a worker and back) and the times a stalled
    ring thread was handed over. None when there is no such file, it cannot be read, or it
    holds no commands or counts that went backwards (lvmirrord restarted meanwhile)."""
    keys = ("commands", "ring_thread_commands", "ring_stalls")
    try:
        with open(path) as f:
            c = json.load(f)
        a, b = c["before"], c["after"]
        counts = [(a[k], b[k]) for k in keys]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    # counters are whole numbers: not a string, a float, a bool (an int to Python) or null
    if not all(type(v) is int for pair in counts for v in pair):
        return None
    n, ring, stalls = (after - before for before, after in counts)
    if n <= 0 or not 0 <= ring <= n or stalls < 0:
        return None
    # rounded down, so that 100.0 % means every command
    return {"commands": n, "ring_pct": math.floor(1000 * ring / n) / 10, "stalls": stalls}


def gil_waits(path: str) -> dict | None:
    """How long lvmirror's ring threads waited for the GIL over a job, after the compiled
    path's I/O and after its poll (``ring_gil_waits`` in ``lvmirror status``, from
    ``tcmu._fastread.gil_waits``): ``path`` is lab-bench.sh's ``<job>.ring`` with that figure
    before and after the job. Returns ``{"waits", "us_per_command", "over_100us_pct"}``: the
    waits counted, their sum in microseconds shared over the job's commands, and the
    percentage of the waits that took over 0.1 ms (another thread held the GIL: a watchdog's
    look, a status call, the metrics writer). None when there is no such file or figure, it
    cannot be read, or the counts went backwards (lvmirrord restarted meanwhile)."""
    try:
        with open(path) as f:
            c = json.load(f)
        a, b = c["before"], c["after"]
        commands = b["commands"] - a["commands"]
        ga, gb = a["ring_gil_waits"], b["ring_gil_waits"]
        edges = gb["edges"]
        n = over = 0
        seconds = 0.0
        for place in ("after_io", "after_poll"):
            before, after = ga[place]["counts"], gb[place]["counts"]
            if len(before) != len(edges) + 1 or len(after) != len(before):
                return None
            deltas = [y - x for x, y in zip(before, after)]
            if not all(type(d) is int and d >= 0 for d in deltas):
                return None
            n += sum(deltas)
            # bucket i holds the waits above edges[i - 1] (and at most edges[i])
            over += sum(d for i, d in enumerate(deltas) if i and edges[i - 1] >= 100e-6)
            seconds += float(gb[place]["seconds"]) - float(ga[place]["seconds"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError):
        return None
    if type(commands) is not int or commands <= 0 or n <= 0 or seconds < 0:
        return None
    return {"waits": n, "us_per_command": round(seconds * 1e6 / commands, 1),
            "over_100us_pct": round(100 * over / n, 2)}


def read_jsonl(path):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError:
        return []


def collect(run_dir: str) -> dict:
    bench = os.path.join(run_dir, "bench")
    meta = (read_jsonl(os.path.join(bench, "meta.json")) or [{}])[0]
    targets = {d["target"]: d for d in read_jsonl(os.path.join(bench, "targets.jsonl"))}
    results: dict = {}
    problems = []
    for path in sorted(glob.glob(os.path.join(bench, "*", "*.json"))):
        target, job = os.path.basename(os.path.dirname(path)), os.path.basename(path)[:-5]
        if target not in TARGET_TITLES:
            continue
        try:
            with open(path) as f:
                fig = results.setdefault(job, {})[target] = fio_figures(json.load(f))
        except (ValueError, KeyError, IndexError) as exc:
            problems.append(f"{target}/{job}: {exc}")
            continue
        cpu = handler_cpu(path[:-5] + ".cpu", fig["iops"])
        if cpu is not None:
            fig["cpu_ms"] = cpu
        ring = ring_share(path[:-5] + ".ring")
        if ring is not None:
            fig["ring"] = ring
        gil = gil_waits(path[:-5] + ".ring")
        if gil is not None:
            fig["gil"] = gil
        guest = guest_cpu(path[:-5] + ".sys", fig["iops"])
        if guest is not None:
            fig["guest"] = guest
        irqs = guest_irqs(path[:-5] + ".irqs", fig["iops"])
        if irqs is not None:
            fig["irqs"] = irqs
        secs = _measured_seconds(path[:-5] + ".cpu")
        threads = thread_cpu(path[:-5] + ".threads", fig["iops"] * secs) if secs else None
        if threads:
            fig["threads_ms"] = threads
        secs = _measured_seconds(path[:-5] + ".sys")   # every target has it
        others = thread_cpu(path[:-5] + ".others", fig["iops"] * secs) if secs else None
        if others:
            fig["others_ms"] = others
    resync = read_jsonl(os.path.join(bench, "resync.jsonl"))
    for r in resync:
        if r.get("seconds"):
            r["mbps"] = round(r["bytes"] / r["seconds"] / 1e6, 1)
    ratios = {}
    for job, by_target in results.items():
        for num, den in RATIOS:
            if num in by_target and den in by_target and by_target[den]["iops"]:
                a, b = by_target[num], by_target[den]
                ratios.setdefault(job, {})[f"{num}/{den}"] = {
                    "iops": round(a["iops"] / b["iops"], 3),
                    "p99": round(a["p99_ms"] / b["p99_ms"], 3) if b["p99_ms"] else None}
    idle = {t: v for t in TARGET_TITLES
            if (v := handler_idle(os.path.join(bench, t, "idle.cpu"))) is not None}
    idle_threads = {}
    for t in TARGET_TITLES:
        secs = _measured_seconds(os.path.join(bench, t, "idle.cpu"))
        th = thread_cpu(os.path.join(bench, t, "idle.threads"), secs) if secs else None
        if th:
            idle_threads[t] = th
    return {"meta": meta, "targets": targets, "results": results, "ratios": ratios,
            "handler_idle": idle, "idle_threads": idle_threads,
            "split": split_latency(os.path.join(bench, "split")), "resync": resync,
            "problems": problems}


# ------------------------------------------------------------------ output
def _fmt(v, nd=0):
    if v is None:
        return "–"
    return f"{v:,.{nd}f}"


def _job_table(out: list, res: dict, jobs: list, targets: list, key: str, heading: str,
               cell) -> None:
    """Append to ``out`` (markdown lines) a table of one figure per job (rows) and target
    (columns): ``res[job][target][key]`` shown by ``cell``, a dash where a job has none,
    under ``heading``; nothing when no target has the figure."""
    shown = [t for t in targets if any(key in res[j].get(t, {}) for j in jobs)]
    if not shown:
        return
    out += [heading, "", "| job | " + " | ".join(TARGET_TITLES[t] for t in shown) + " |",
            "|---|" + "---:|" * len(shown)]
    for j in jobs:
        figs = [res[j].get(t, {}).get(key) for t in shown]
        out.append(f"| {j} | " + " | ".join("–" if f is None else cell(f) for f in figs) + " |")
    out.append("")


def markdown(data: dict) -> str:
    m = data["meta"]
    res, ratios = data["results"], data["ratios"]
    jobs = [j for j in JOBS if j in res] + sorted(set(res) - set(JOBS))
    targets = [t for t in TARGETS if any(t in res[j] for j in jobs)]
    out = [f"### lvmirror side by side: {m.get('date', '?')}", "",
           f"Kernel {m.get('kernel', '?')}, QEMU accelerator **{m.get('accel', '?')}**, "
           f"{m.get('cpus', '?')} vCPU, {m.get('mem_mb', '?')} MiB, {m.get('fio', 'fio')}"
           + (f", {m['tcmu_runner']}" if m.get("tcmu_runner") else "") + "; "
           f"{m.get('size_mb', '?')} MiB LUNs on image files in the guest"
           + (" (**lvmirror's on null_blk devices**, direct=1, BENCH_LVMIRROR_IMAGES=null_blk: the "
              "storage costs nothing, its READs take the direct I/O path; not comparable with the "
              "other targets' storage)" if m.get("lvmirror_images") == "null_blk" else "")
           + ", "
           f"{m.get('runtime_s', '?')} s per job after {m.get('ramp_s', '?')} s ramp; "
           f"open-iscsi over the guest's loopback; "
           + ("every target write-back" if str(m.get("lvmirror_wce", "1")) != "0" else
              "lvmirror write-through (WCE 0, BENCH_LVMIRROR_WCE=0), the others write-back")
           + f" ({m.get('cache_mode', '?')}).", ""]
    if m.get("accel") == "tcg":
        out += ["> The lab runs under software emulation (QEMU TCG), so absolute figures are low; "
                "only the ratios carry over to a real server.", ""]
    if ratios:
        cols = [f"{n}/{d}" for n, d in RATIOS]
        out += ["IOPS ratio (above 1: lvmirror faster) and p99 latency ratio (below 1: lvmirror "
                "faster):", "",
                "| job | " + " | ".join(f"{RATIO_TITLES[n]} / {RATIO_TITLES[d]}"
                                        for n, d in RATIOS) + " |",
                "|---|" + "---:|" * len(cols)]
        for j in jobs:
            cells = []
            for c in cols:
                r = ratios.get(j, {}).get(c)
                # p99 None: the peer's p99 rounded to 0.000 ms, no ratio to give
                p99 = "–" if r is None or r["p99"] is None else f"{r['p99']:.2f}"
                cells.append(f"{r['iops']:.2f} (p99 {p99})" if r else "–")
            out.append(f"| {j} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["IOPS · MB/s · completion latency p50 / p99 (ms):", "",
            "| job | " + " | ".join(TARGET_TITLES[t] for t in targets) + " |",
            "|---|" + "---:|" * len(targets)]
    for j in jobs:
        cells = []
        for t in targets:
            r = res[j].get(t)
            cells.append(f"{_fmt(r['iops'])} · {_fmt(r['mbps'], 1)} · {r['p50_ms']:.2f} / "
                         f"{r['p99_ms']:.2f}" if r else "–")
        out.append(f"| {j} | " + " | ".join(cells) + " |")
    out.append("")
    cpu_targets = [t for t in targets if any("cpu_ms" in res[j].get(t, {}) for j in jobs)]
    if cpu_targets:
        both = "lvmirror1" in cpu_targets and "tcmu-runner" in cpu_targets
        out += ["Handler CPU per command (ms, user + system, over each job's measured seconds: "
                "lvmirrord with its volume processes, tcmu-runner; the system share holds the "
                "kernel's ring work done in the handler's calls; every figure includes the "
                "handler's background, the no I/O row):", "",
                "| job | " + " | ".join(TARGET_TITLES[t] for t in cpu_targets)
                + (" | lvmirror 1 image / tcmu-runner" if both else "") + " |",
                "|---|" + "---:|" * (len(cpu_targets) + both)]
        for j in jobs:
            vals = [res[j].get(t, {}).get("cpu_ms") for t in cpu_targets]
            cells = [_fmt(v, 3) for v in vals]
            if both:
                a, b = (res[j].get(t, {}).get("cpu_ms") for t in ("lvmirror1", "tcmu-runner"))
                cells.append(f"{a / b:.2f}" if a and b else "–")
            out.append(f"| {j} | " + " | ".join(cells) + " |")
        idle = data.get("handler_idle") or {}
        if any(t in idle for t in cpu_targets):
            out.append("| no I/O (% of one CPU) | "
                       + " | ".join(_fmt(idle.get(t), 1) for t in cpu_targets)
                       + (" | –" if both else "") + " |")
        out.append("")
    def by_thread(th, unit=""):
        total = sum(th.values())
        shown = [(n, v) for n, v in th.items() if total and v >= 0.05 * total][:4]
        return " · ".join(f"{n} {v:.3f}{unit}" for n, v in shown)
    _job_table(out, res, jobs, targets, "threads_ms",
               "Handler CPU by thread (ms a command over each job's measured seconds; the "
               "threads over 5 % of the handler's, at most four; a pool's threads summed as "
               "NAME-*):", by_thread)
    _job_table(out, res, jobs, targets, "guest",
               "The whole guest over each job (fio, the initiator, the kernel's target and the "
               "handler): busy percent of its vCPUs · ms of CPU a command · context switches a "
               "command (every vCPU busy: the job was bound by the guest's CPUs; idle left: by "
               "waits); where measured, the ms split as user space / kernel / interrupts and "
               "softirq:",
               _guest_cell)
    _job_table(out, res, jobs, targets, "irqs",
               "The whole guest's interrupts a command over each job: hardware interrupts · "
               "softirqs (by kind, those of 1 % or more; they run in whichever task is on the "
               "CPU, so a thread's CPU above includes those that landed on it):", _irqs_cell)
    _job_table(out, res, jobs, targets, "others_ms",
               "The guest's threads outside the handler (the kernel's workers, named by the "
               "work they last ran; the loop device's; iSCSI's; fio), ms a command over each "
               "job's measured seconds: their total, then those over 5 % of it, at most four:",
               lambda th: f"{sum(th.values()):.3f}: {by_thread(th)}")
    it = data.get("idle_threads") or {}
    if it:
        out += ["With no I/O, by thread (ms of CPU a second):", ""]
        out += [f"- {TARGET_TITLES[t]}: {by_thread(th) or 'none'}" for t, th in it.items()]
        out.append("")
    _job_table(out, res, jobs, targets, "ring",
               "Commands lvmirror's ring thread answered itself (percent of the commands over "
               "each job, ramp included; the rest went to the worker pool, a hand-off to a "
               "worker and back; ring stalls handed over in brackets when any):",
               lambda r: f"{r['ring_pct']:.1f} %" + (f" ({r['stalls']})" if r["stalls"] else ""))
    _job_table(out, res, jobs, targets, "gil",
               "lvmirror's ring thread waiting for the GIL after the compiled path's I/O and "
               "poll (another of lvmirrord's threads running Python): microseconds a command, "
               "and in brackets the percentage of the waits over 0.1 ms:",
               lambda g: f"{g['us_per_command']:.1f} ({g['over_100us_pct']:.2f} %)")
    s = data.get("split")
    if s:
        out += ["Around a split (lvmirror 3 images, image 2 split off under 4 KiB random writes at "
                "QD 8; the window is the second centred on T):", "",
                "| | steady state | second around the split |", "|---|---:|---:|",
                f"| p50 latency (ms) | {_fmt(s['steady_p50_ms'], 2)} | {_fmt(s['window_p50_ms'], 2)} |",
                f"| p99 latency (ms) | {_fmt(s['steady_p99_ms'], 2)} | {_fmt(s['window_p99_ms'], 2)} |",
                f"| IOPS | {_fmt(s['steady_iops'])} | {_fmt(s['window_iops'])} |",
                f"| longest time without a completion (ms) | {_fmt(s['steady_max_gap_ms'], 1)} | "
                f"{_fmt(s['window_max_gap_ms'], 1)} |",
                f"| max latency (ms) | | {_fmt(s['window_max_ms'], 2)} |", "",
                f"{s['drained']} I/Os begun before T drained to all three images.", ""]
    rs = data.get("resync") or []
    if rs:
        titles = {"resync_full": "lvmirror full resync (image re-attached)",
                  "resync_1pct": "lvmirror resync, 1% of regions changed",
                  "after_split_load": "lvmirror resync after the split-latency load",
                  "md_resync_full": "md RAID1 initial resync (internal bitmap)"}
        out += ["Resync (no other I/O; page cache dropped first):", "",
                "| what | bytes copied | seconds | MB/s |", "|---|---:|---:|---:|"]
        for r in rs:
            out.append(f"| {titles.get(r['kind'], r['kind'])} | {_fmt(r['bytes'])} | "
                       f"{r['seconds']:.2f} | {_fmt(r.get('mbps'), 1)} |")
        by = {r["kind"]: r for r in rs}
        notes = []
        if "resync_full" in by and "md_resync_full" in by and by["md_resync_full"].get("mbps"):
            notes.append(f"lvmirror full resync / md resync throughput: "
                         f"{by['resync_full']['mbps'] / by['md_resync_full']['mbps']:.2f}")
        if "resync_full" in by and "resync_1pct" in by and by["resync_full"]["seconds"]:
            notes.append(f"1% changed / full resync time: "
                         f"{by['resync_1pct']['seconds'] / by['resync_full']['seconds']:.3f}")
        out += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    if data.get("problems"):
        out += ["Problems in this run: " + "; ".join(data["problems"]), ""]
    return "\n".join(out)


def svg(data: dict) -> str:
    """Grouped horizontal bars: for every job, lvmirror's IOPS ratio against each peer."""
    ratios = data["ratios"]
    jobs = [j for j in JOBS if j in ratios]
    series = [f"{n}/{d}" for n, d in RATIOS]
    colours = ("#2b6cb0", "#805ad5", "#dd6b20", "#2f855a")
    bar, gap, left, width = 14, 12, 150, 460
    vmax = max([1.2] + [ratios[j][s]["iops"] for j in jobs for s in series if s in ratios[j]])
    scale = width / vmax
    height = 60 + len(jobs) * (len(series) * bar + gap) + 20 * len(series)
    m = data["meta"]
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 70}" height="{height}" '
          f'font-family="sans-serif" font-size="11">',
          f'<text x="10" y="18" font-size="13">lvmirror IOPS relative to its peer (1.0 = equal), '
          f'{escape(str(m.get("date", "")))}, {escape(str(m.get("accel", "")))}</text>']
    y = 34
    x1 = left + 1.0 * scale
    for j in jobs:
        el.append(f'<text x="{left - 6}" y="{y + len(series) * bar / 2 + 4}" '
                  f'text-anchor="end">{escape(j)}</text>')
        for s, c in zip(series, colours):
            r = ratios[j].get(s)
            if r:
                w = r["iops"] * scale
                el.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 2}" fill="{c}"/>')
                el.append(f'<text x="{left + w + 4:.1f}" y="{y + bar - 4}">{r["iops"]:.2f}</text>')
            y += bar
        y += gap
    el.append(f'<line x1="{x1:.1f}" y1="30" x2="{x1:.1f}" y2="{y - gap + 2}" stroke="#000" '
              f'stroke-dasharray="4,3"/>')
    for s, c in zip(series, colours):
        n, d = s.split("/")
        el.append(f'<rect x="{left}" y="{y + 2}" width="10" height="10" fill="{c}"/>')
        el.append(f'<text x="{left + 16}" y="{y + 11}">{escape(RATIO_TITLES[n])} / '
                  f'{escape(RATIO_TITLES[d])}</text>')
        y += 20
    el.append("</svg>")
    return "\n".join(el) + "\n"


def profile_summary(run_dir: str, top: int = 15) -> str:
    """py-spy raw profiles (collapsed stacks 'f1;f2;... count') -> top functions by samples
    spent in them (self) and under them (inclusive), per job and in all."""
    out = []
    total_self, total_incl, total_n = collections.Counter(), collections.Counter(), 0
    files = sorted(glob.glob(os.path.join(run_dir, "bench", "profile", "*.txt")))
    for path in files:
        self_c, incl_c, n = collections.Counter(), collections.Counter(), 0
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                c = int(count)
                frames = stack.split(";")
                n += c
                self_c[frames[-1]] += c
                for fr in set(frames):
                    incl_c[fr] += c
        total_self.update(self_c)
        total_incl.update(incl_c)
        total_n += n
        out += [f"## {os.path.basename(path)[:-4]}: {n} samples", ""]
        out += [f"{100 * c / n:5.1f}%  {fr}" for fr, c in self_c.most_common(top)] if n else []
        out.append("")
    if total_n:
        out += [f"## all jobs: {total_n} samples, self", ""]
        out += [f"{100 * c / total_n:5.1f}%  {fr}" for fr, c in total_self.most_common(top * 2)]
        out += ["", "## all jobs, inclusive", ""]
        out += [f"{100 * c / total_n:5.1f}%  {fr}" for fr, c in total_incl.most_common(top * 2)]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results"))
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    if args.profile:
        text = profile_summary(args.run_dir)
        with open(os.path.join(args.run_dir, "profile.md"), "w") as f:
            f.write(text)
        print(text)
        return 0
    data = collect(args.run_dir)
    if not data["results"]:
        print(f"bench: no results in {args.run_dir}/bench", file=sys.stderr)
        return 1
    os.makedirs(args.results, exist_ok=True)
    md = markdown(data)
    with open(os.path.join(args.results, "results.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(args.results, "results.json"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    with open(os.path.join(args.results, "ratios.svg"), "w") as f:
        f.write(svg(data))
    print(md)
    return 1 if data["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
