"""``lvmirror``: the command line for scripts and cron (talks to lvmirrord over the system bus).

    lvmirror [--json] status
    lvmirror split VOLUME IMAGE [--no-hooks] [--hook-timeout S] [--on-hook-error abort|continue]
    lvmirror split-group VOLUME:IMAGE VOLUME:IMAGE ... [hook options]   # one instant for all
    lvmirror restore-group VOLUME:IMAGE ... [--rate MB/s] [--wait]
    lvmirror resync VOLUME IMAGE [--rate MB/s] [--full] [--wait]
    lvmirror restore VOLUME IMAGE [--rate MB/s] [--full] [--wait]
    lvmirror attach VOLUME PATH [--force] [--wait]  # --force: PATH may hold data
    lvmirror detach VOLUME IMAGE
    lvmirror cancel VOLUME IMAGE
    lvmirror scrub VOLUME [--repair [--source IMAGE]] [--rate MB/s] [--wait]   # compare images
    lvmirror scrub --all [same options]     # every open volume (lvmirror-scrub.service)
    lvmirror scrub --cancel VOLUME|--all
    lvmirror metrics                        # Prometheus text (what lvmirrord writes for node_exporter)
    lvmirror wait VOLUME [--timeout S]      # until no job (resync, restore, attach, crash recovery) runs
    lvmirror backup VOLUME IMAGE DEST [--format raw|qcow2]   # copy a split image
    lvmirror backup-cycle [--config FILE] [VOLUME:IMAGE ...] [--dest DIR] [--format F]
                          [--keep K] [--rate MB/s] [--no-hooks]   # split, back up, resync

Exit status 0 on success, 1 on an error reported by lvmirrord, 2 on bad usage, 3 when lvmirrord
is not reachable, 130 when interrupted (Ctrl-C; SIGTERM for backup and backup-cycle).
``scrub --wait`` exits 1 when it leaves a region the images disagree on (found and not
repaired) or fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

EXIT_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3
EXIT_INTERRUPTED = 130          # Ctrl-C or SIGTERM (backup, backup-cycle), as a shell would


def image_index(text: str) -> int:
    """argparse type: an image index, a whole number 0..3."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"an image index is a whole number, got {text!r}")
    if not 0 <= value <= 3:
        raise argparse.ArgumentTypeError(f"an image index is 0 to 3, got {value}")
    return value


def rate(text: str) -> float:
    """argparse type: a rate limit in MB/s, a finite number >= 0 (0: unlimited)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rate is a number of MB/s, got {text!r}")
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"a rate is a number of MB/s >= 0 (0: unlimited), "
                                         f"got {text}")
    return value


# seconds the CLI waits for a lvmirrord that D-Bus activation is starting (the bus itself
# gives up after its service_start_timeout, 25 s on the system bus, while systemd goes on
# starting the unit: a start picks up every LUN first, which under load takes longer)
ACTIVATION_WAIT = 120.0
_STARTING = ("org.freedesktop.DBus.Error.TimedOut", "org.freedesktop.DBus.Error.NoReply")


def _manager(wait: float = ACTIVATION_WAIT):
    """lvmirrord's Manager interface on the system bus. When lvmirrord is not running, start it
    (D-Bus activation) and wait up to ``wait`` seconds for it to own its name, however long the
    bus's own activation timeout is. dbus.DBusException when it cannot be started
    (ServiceUnknown: not installed) or has not come up in time."""
    import dbus
    from lvmirror.bus.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
    bus = dbus.SystemBus()
    if not bus.name_has_owner(BUS_NAME):
        deadline = time.monotonic() + wait
        while True:
            try:
                bus.start_service_by_name(BUS_NAME)
                break
            except dbus.DBusException as exc:
                if exc.get_dbus_name() not in _STARTING or time.monotonic() >= deadline:
                    raise
            while not bus.name_has_owner(BUS_NAME) and time.monotonic() < deadline:
                time.sleep(0.5)
            if bus.name_has_owner(BUS_NAME):
                break
    return dbus.Interface(bus.get_object(BUS_NAME, MANAGER_PATH), MANAGER_IFACE)


def _human(n):
    """``n`` bytes in the largest binary unit that keeps the figure, as printed, below 1024:
    ``_human(4 << 20) == "4.0 MiB"``, ``_human((1 << 20) - 1) == "1.0 MiB"`` (not "1024.0
    KiB"); whole bytes below 1 KiB, TiB at most."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if unit == "TiB" or round(abs(n), 0 if unit == "B" else 1) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def size_phrase(n: int) -> str:
    """A job's size (``bytes_total``, bytes) as ``lvmirror`` and targetcli-lvmirror print it
    when the job starts: readable and exact for a script - ``"4.0 MiB (4194304 bytes)"``,
    ``"512 bytes"``, ``"1 byte"``. TypeError/ValueError when ``n`` is not a whole number."""
    if n != int(n):
        raise ValueError(f"a size in bytes is a whole number, got {n!r}")
    n = int(n)
    if n < 1024:
        return f"{n} byte" + ("" if n == 1 else "s")
    return f"{_human(n)} ({n} bytes)"


def format_status(st: dict) -> str:
    """The text ``lvmirror status`` prints for ``st`` (the parsed JSON of Manager.Status): per
    volume its size, block and region size, write-intent chunk and health, a line per image
    and per job, the I/O counts; then a line per LUN."""
    lines = []
    if not st["volumes"]:
        lines.append("no volumes open")
    for name, v in sorted(st["volumes"].items()):
        lines.append(f"volume {name}: {_human(v['size'])}, {v['block_size']}-byte blocks, "
                     f"region {_human(v['region_size'])}"
                     + (f", write-intent chunk {_human(v['intent_chunk'])}"
                        if v.get("intent_chunk") else "") + f", {v.get('health', 'optimal')}")
        if v.get("offline"):
            lines.append(f"  OFFLINE (NOT READY): {v['offline']}")
        if v.get("lease"):
            lines.append(f"  lease held: sanlock host id {v['lease']['host_id']}, "
                         f"slot {v['lease']['slot']}")
        for im in v["images"]:
            extra = ""
            if im["split_time"]:
                extra += " split at " + time.strftime("%Y-%m-%d %H:%M:%S",
                                                      time.localtime(im["split_time"]))
            if im["dirty_bytes"] is not None:
                extra += f", {_human(im['dirty_bytes'])} changed ({im['bitmap_fill']:.2%})"
            if im["error"]:
                extra += f", error: {im['error']}"
            if im.get("stuck_io"):
                extra += (f", {im['stuck_io']} I/O(s) still in flight on its device "
                          f"(given up on as slow; a copy into or from the image waits "
                          f"for them)")
            lines.append(f"  image {im['index']}: {im['state']:<8} {im['path']}{extra}")
        states = {im["id"]: im["state"] for im in v["images"]}
        for job in v["jobs"]:
            if job["kind"] == "scrub" and v.get("scrub"):
                continue                     # the scrub line below says it, with its rate
            if job["kind"] == "resync" and job["state"] == "done" \
                    and states.get(job["image_id"]) not in (None, "in-sync"):
                continue        # history: the image was split (or failed) since it was copied
            eta = job["eta_seconds"]
            index = {im["id"]: im["index"] for im in v["images"]}.get(job["image_id"])
            what = job["kind"] if job["image_id"] is None else \
                f"{job['kind']} of image {index}" if index is not None else \
                f"{job['kind']} of image id {job['image_id']}"
            if job["kind"] == "backup" and job.get("copier", "lvmirrord") != "lvmirrord":
                # the client copies: lvmirrord holds the image, its bytes come at the end
                line = (f"  {what}: running, copied by {job['copier']} to {job['dest']} "
                        f"({job['elapsed']:.0f} s so far)" if job["state"] == "running" else
                        f"  {what}: {job['state']}, "
                        + (f"{_human(job['bytes_done'])} copied, " if job["state"] == "done"
                           else "") + f"to {job['dest']} by {job['copier']}")
            else:
                line = (f"  {what}: {job['state']}, "
                        f"{_human(job['bytes_done'])} / {_human(job['bytes_total'])}, "
                        f"{job['rate']:.1f} MB/s" + (f", ETA {eta:.0f} s" if eta else ""))
                if job["kind"] == "backup":
                    line += f", to {job['dest']}"
            if job.get("resumes"):
                line = (f"  {what}: stopped, the volume went offline; it goes on once the "
                        f"volume is back ({_human(job['bytes_done'])} / "
                        f"{_human(job['bytes_total'])} so far)")
            elif job["state"] == "failed" and job.get("error"):
                line += f", error: {job['error']}"
            lines.append(line)
        if v.get("scrub"):
            line = "  " + scrub_line(v["scrub"])
            for job in v["jobs"]:          # a running scrub: its rate and ETA on the same line
                if job["kind"] == "scrub" and job["state"] == "running":
                    line += f", {job['rate']:.1f} MB/s"
                    if job["eta_seconds"]:
                        line += f", ETA {job['eta_seconds']:.0f} s"
            lines.append(line)
        io = v["io"]
        lines.append(f"  I/O: {io['reads']} reads, {io['writes']} writes, "
                     f"{io['read_errors'] + io['write_errors']} errors, {io['inflight']} in flight")
    for lun in st["luns"]:
        if lun.get("standby"):      # its ALUA port group is not Active on this gateway
            tail = f" {lun['alua_state']}: the volume is not open on this gateway"
        else:
            tail = f" NOT READY: {lun['error']}" if lun["error"] else ""
        lines.append(f"LUN {lun['name']} ({lun['uio']}): {lun['cfgstring']}{tail}")
    return "\n".join(lines)


def scrub_line(sc: dict) -> str:
    """One line on a scrub record (``ScrubRecord.summary``): state, when, counts."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sc["finished"] or sc["started"]))
    line = (f"scrub {sc['state']} ({'ended' if sc['finished'] else 'started'} {when}): "
            f"{sc['regions_checked']} of {sc['regions']} regions checked, "
            f"{sc['mismatches']} mismatch(es), {sc['repaired']} repaired, "
            f"{sc['unrepaired']} left as found")
    return line + (f"; {sc['error']}" if sc.get("error") else "")


def mismatch_lines(sc: dict) -> list[str]:
    """A line per mismatching region of a scrub record: where, which images read alike, which
    content won, what was rewritten."""
    out = []
    for m in sc["report"]:
        groups = " | ".join("+".join(map(str, g)) for g in m["groups"])
        if m["repaired"]:
            verdict = (f"image(s) {'+'.join(map(str, m['repaired']))} rewritten from image "
                       f"{m['right'][0]}")
        elif m["right"]:
            verdict = f"image(s) {'+'.join(map(str, m['right']))} hold the majority"
        else:
            verdict = ("no majority: candidates " + ", ".join(
                f"image {g[0]}" if len(g) == 1 else "images " + "+".join(map(str, g))
                for g in m["groups"]) + " (repair with --repair --source IMAGE)")
        out.append(f"region {m['region']} (LBA {m['first_lba']}-{m['last_lba']}): images "
                   f"read as {groups}; {verdict}")
    if sc["mismatches"] > len(sc["report"]):
        out.append(f"... and {sc['mismatches'] - len(sc['report'])} more region(s)")
    return out


def _scrub(args, mgr, dbus) -> int:
    """``lvmirror scrub``. ``--all --wait`` scrubs one volume after another, so the images'
    disks are read at ``--rate`` in all (md defers a check of arrays that share disks the
    same way); ``--all`` without ``--wait`` starts every volume's scrub at once."""
    st = json.loads(mgr.Status())
    names = sorted(st["volumes"]) if args.all else [args.volume]
    if args.cancel:
        if args.all:     # every running scrub (the monthly one, say); nothing running is fine
            names = [n for n in names if (st["volumes"][n].get("scrub") or {}).get("state")
                     == "running"]
        done = []
        for name in names:
            try:
                mgr.CancelScrub(name)
            except dbus.DBusException:
                if not args.all:
                    raise
                continue         # it ended between the status and the cancel
            done.append(name)
            if not args.json:
                print(f"{name}: scrub cancelled")
        names = done
        if args.json:
            print(json.dumps({"cancelled": names}))
        elif not names:
            print("no scrub running")
        return 0
    if not names:
        print(json.dumps({}) if args.json else "no volumes open")
        return 0
    opts = {"repair": dbus.Boolean(args.repair), "rate": dbus.Double(args.rate)}
    if args.source is not None:
        opts["source"] = dbus.UInt32(args.source)
    results, status = {}, 0
    for name in names:
        images = st["volumes"].get(name, {}).get("images", [])
        if args.all and len(images) == 1:
            # not mirrored by design: nothing to compare, nothing to report
            print(f"{name}: not scrubbed: one image, nothing to compare", file=sys.stderr)
            continue
        running = (st["volumes"].get(name, {}).get("scrub") or {}).get("state") == "running"
        if args.all and args.wait and running:
            print(f"{name}: a scrub is already running; waiting for it", flush=True)
        else:
            try:
                res = json.loads(mgr.Scrub(name, dbus.Dictionary(opts, signature="sv")))
            except dbus.DBusException as exc:
                if not args.all:
                    raise
                # a mirrored volume that cannot be compared now (an image split or failed, a
                # restore or crash recovery unfinished, offline, a scrub of its own running)
                # was not checked: say so and fail (exit 1), so the monthly service shows it
                msg = exc.get_dbus_message()
                print(f"{name}: not scrubbed: {msg}", file=sys.stderr)
                results[name] = {"state": "not started", "error": msg}
                status = EXIT_ERROR
                continue
            if not args.json:
                in_sync = sum(im["state"] == "in-sync" for im in images)
                mode = "check only"
                if args.repair:
                    mode = ("repair" if args.source is not None or in_sync >= 3 else
                            "check only: two in-sync images have no majority; --source IMAGE "
                            "says which one is right")
                print(f"{name}: scrub started: {size_phrase(res['bytes_total'])} to check "
                      f"({mode})", flush=True)
        if not args.wait:
            results[name] = {"state": "running", "bytes_total": res["bytes_total"]}
            continue
        sc, failed = _wait_scrub(mgr, name)
        if failed:
            status = EXIT_ERROR
        if sc is None:
            continue
        results[name] = sc
        if not args.json:
            print(f"{name}: {scrub_line(sc)}")
            for line in mismatch_lines(sc):
                print(f"  {line}")
        if sc["state"] == "cancelled" and not sc.get("error") and name != names[-1]:
            # an operator's --cancel (a restore's leaves its reason): the rest is not started
            print(f"scrub --all: cancelled at {name}; not scrubbed: "
                  f"{', '.join(names[names.index(name) + 1:])}", file=sys.stderr)
            break
    if args.json:
        print(json.dumps(results))
    return status


def _wait_scrub(mgr, name):
    """Poll the volume's scrub every 0.5 s until it ends: ``(record, failed)``, failed when it
    did not end "done" or left a region different; record None when the volume closed."""
    while True:
        v = json.loads(mgr.Status())["volumes"].get(name)
        sc = v and v.get("scrub")
        if sc is None:
            print(f"{name}: the volume closed before its scrub ended", file=sys.stderr)
            return None, True
        if sc["state"] != "running":
            if sys.stderr.isatty():
                sys.stderr.write("\r" + " " * 60 + "\r")
            return sc, sc["state"] != "done" or bool(sc["unrepaired"])
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{name}: scrub {sc['regions_checked'] / sc['regions']:6.1%}")
            sys.stderr.flush()
        time.sleep(0.5)


def _running(st, volume):
    """The volume's running jobs a ``--wait`` waits for: a scrub (hours at its rate, started
    by someone else or the timer) is not one of them (``scrub --wait`` waits for it)."""
    v = st["volumes"].get(volume)
    return [j for j in (v["jobs"] if v else []) if j["state"] == "running"
            and j["kind"] != "scrub"]


RESUME_GRACE = 30.0   # s a wait waits, the volume back online, for a stopped job's take-up


def wait_jobs(mgr, volume, timeout=None, out=sys.stderr, image=None, through_offline=True):
    """Poll ``mgr.Status()`` every 0.5 s until no job runs on ``volume`` (``image``, an index:
    on that image); returns the jobs in state ``failed`` (empty: none): with ``image``, that
    image's job only - the one its command just started, also when it failed before the first
    poll (trial 25: a ``restore --wait`` exited 1 with an older failure of another image) -
    without, every failed job status lists; a backup's never (its copier reports it). A job
    the volume's going offline stopped (``resumes``) is waited for while the volume is
    offline and RESUME_GRACE seconds after, as it goes on once the volume is back (said once
    on ``out``) - unless ``through_offline`` is False (the backup cycle: a timer's run
    reports it as failed rather than wait for an operator). Progress goes to ``out`` when it
    is a tty. TimeoutError once ``timeout`` seconds passed (None: wait for ever); ValueError
    when no volume of that name is open (a mistyped name, or it closed while waited for)."""
    t0 = time.monotonic()
    online_since = None       # monotonic time the volume was seen back online, jobs to resume
    told = False
    while True:
        st = json.loads(mgr.Status())
        if volume not in st["volumes"]:
            raise ValueError(f"no volume {volume!r} is open (open volumes: "
                             f"{', '.join(sorted(st['volumes'])) or 'none'})")
        jobs = st["volumes"][volume].get("jobs", [])
        if image is not None:
            ids = {im["id"] for im in st["volumes"][volume].get("images", [])
                   if im["index"] == image}
            jobs = [j for j in jobs if j["image_id"] in ids]
        # one the volume's going offline stopped goes on once it is back: still waited for -
        # while the volume is offline, and RESUME_GRACE seconds after (its take-up)
        resuming = [j for j in jobs if through_offline and j["state"] == "failed"
                    and j.get("resumes")]
        if resuming and st["volumes"][volume].get("health") != "offline":
            online_since = online_since or time.monotonic()
            if time.monotonic() - online_since > RESUME_GRACE:
                resuming = []
        else:
            online_since = None
        if resuming and not told and out is not None:
            told = True             # said once, tty or not (a script's log shows why it waits)
            print(f"lvmirror: volume {volume} went offline; the {resuming[0]['kind']} goes on "
                  f"once it is back: waiting (Ctrl-C ends the wait, not the job)", file=out,
                  flush=True)
        running = [j for j in _running(st, volume) if j in jobs] + resuming
        if not running:
            # a backup's failure is its copier's to report (it stays in status as history:
            # an interrupted backup made every later resync --wait and wait exit 1, trial of
            # 2026-12-06)
            return [j for j in jobs if j["state"] == "failed" and j["kind"] != "backup"]
        if timeout is not None and time.monotonic() - t0 > timeout:
            raise TimeoutError(f"jobs on {volume} still running after {timeout} s")
        j = running[0]
        if out is not None and out.isatty():
            pct = j["bytes_done"] / j["bytes_total"] if j["bytes_total"] else 1.0
            out.write(f"\r{j['kind']}: {pct:6.1%} " + (
                "stopped: the volume is offline, waiting for it   " if j.get("resumes")
                else f"{j['rate']:.1f} MB/s   "))
            out.flush()
        time.sleep(0.5)


def hook_timeout(text: str) -> float:
    """argparse type: seconds in (0, 3600], as lvmirrord accepts them."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"seconds in (0, 3600], got {text!r}")
    return value


def wait_timeout(text: str) -> float:
    """argparse type for ``lvmirror wait --timeout``: a finite number of seconds above 0
    (``nan`` would never compare past, so the wait would last for ever)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"seconds above 0, got {text!r}")
    return value


def io_timeout(text: str) -> int:
    """argparse type for ``lease-init --io-timeout``: whole seconds from 1 to 60 (the range
    ``lease.init_area`` accepts; sanlock's I/O timeout for the lockspace)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 60:
        raise argparse.ArgumentTypeError(f"whole seconds from 1 to 60, got {text!r}")
    return value


def check_group(parser, members):
    """A consistency group names one image of each volume: a volume named twice is bad usage
    (``parser.error``, exit 2), said before lvmirrord is asked."""
    seen = set()
    for name, image in members:
        if name in seen:
            parser.error(f"{name} is named twice: a group takes one image of each volume")
        seen.add(name)


def _hook_args(s):
    s.add_argument("--no-hooks", action="store_true",
                   help="do not run the split hooks (/etc/lvmirror/hooks.d)")
    s.add_argument("--hook-timeout", type=hook_timeout, metavar="SECONDS",
                   help="kill a hook that runs longer (default 30)")
    s.add_argument("--on-hook-error", choices=("abort", "continue"),
                   help="when a pre-split hook fails: abort the split (default) or go on")


def _hook_options(dbus, args):
    opts = {}
    if args.no_hooks:
        opts["hooks"] = dbus.Boolean(False)
    if args.hook_timeout is not None:
        opts["hook_timeout"] = dbus.Double(args.hook_timeout)
    if args.on_hook_error is not None:
        opts["on_hook_error"] = dbus.String(args.on_hook_error)
    return dbus.Dictionary(opts, signature="sv") if opts else None


def _print_hooks(res):
    import os.path
    for h in res.get("hooks", []):
        print(f"hook {os.path.basename(h['hook'])} {h['phase']}: "
              + ("ok" if h["error"] is None else f"FAILED ({h['error']})")
              + f" in {h['seconds']:.2f} s")


def _backup_plan(args):
    """The backup-cycle's plan from --config and the options; ValueError when wrong."""
    from lvmirror import backupcycle
    if args.config:
        plan = backupcycle.load_plan(args.config)
    else:
        plan = backupcycle.BackupPlan(members=[], dest="")
    if args.members:
        plan.members = list(args.members)
    for key, attr in (("dest", "dest"), ("format", "fmt"), ("keep", "keep"),
                      ("rate", "rate")):
        if getattr(args, key) is not None:
            setattr(plan, attr, getattr(args, key))
    if args.no_hooks:
        plan.hooks = False
    return plan.check()


def _interrupt(*_):
    raise KeyboardInterrupt


def _backup_cycle(args, mgr, plan) -> int:
    import dbus
    import signal
    from lvmirror import backupcycle
    from lvmirror.bus.names import BUS_NAME, VOLUME_IFACE, object_path
    # systemctl stop (SIGTERM) as Ctrl-C: the cycle starts the resyncs before it goes
    signal.signal(signal.SIGTERM, _interrupt)
    bus = dbus.SystemBus()

    def volume_iface(name):
        return dbus.Interface(bus.get_object(BUS_NAME, object_path(name)), VOLUME_IFACE)

    def log(line):
        print(line, flush=True)

    try:
        def wait(m, name, image=None):
            # an offline volume fails the cycle (logged, exit 1) rather than hold the timer's
            # run until an operator brings its disk back; the resync goes on by itself then
            return wait_jobs(m, name, None, out=None, image=image, through_offline=False)
        return backupcycle.run_cycle(plan, mgr, volume_iface, wait, log=log)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def parse_member(text: str) -> tuple[str, int]:
    """A consistency group's member "VOLUME:IMAGE" (an image index) as (volume, image);
    ValueError otherwise."""
    from lvmirror.errors import ConfigError
    from lvmirror.volname import check_volume_name     # (not cfgstring: a client's start)
    name, sep, index = text.rpartition(":")
    if not sep or not name or not (index.isascii() and index.isdigit()):
        raise ValueError(f"{text!r} is not VOLUME:IMAGE (e.g. db:2)")
    try:
        return check_volume_name(name, f"{text!r}: "), image_index(index)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def group_member(text: str) -> tuple[str, int]:
    """argparse type: ``parse_member``."""
    try:
        return parse_member(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def job_phrase(res: dict) -> str:
    """What a copy job's progress dict (``resync.job_progress``) says just after it was
    started: "started: 12 MiB to copy", "done: 12 MiB copied", or "cancelled"/"failed: why"
    for a job that already ended so."""
    state = res.get("state")
    if state == "running":
        return f"started: {size_phrase(res['bytes_total'])} to copy"
    if state == "done":
        return f"done: {size_phrase(res['bytes_done'])} copied"
    return f"{state}: {res['error']}" if res.get("error") else str(state)


def members_arg(members):
    """(volume, image) pairs as the ``a(su)`` of SplitGroup / RestoreGroup."""
    import dbus
    return dbus.Array([dbus.Struct((n, dbus.UInt32(i)), signature="su") for n, i in members],
                      signature="(su)")


def _lease_init(args) -> int:
    """``lvmirror lease-init AREA``: ``lease.init_area`` here, not through lvmirrord (the
    area is written before any lvmirrord uses it). EXIT_ERROR with the reason on failure."""
    from lvmirror.daemon.lease import MAX_HOSTS_BY_SECTOR, LeaseError, area_sector, init_area
    try:
        slots = init_area(args.area, io_timeout=args.io_timeout, force=args.force)
        sector = area_sector(args.area)
    except (LeaseError, OSError) as exc:
        print(f"lvmirror: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps({"area": args.area, "slots": slots, "io_timeout": args.io_timeout,
                          "sector": sector, "max_host_id": MAX_HOSTS_BY_SECTOR[sector]}))
    else:
        print(f"{args.area}: lease area initialised: lockspace lvmirror, {slots} volume "
              f"slots, io_timeout {args.io_timeout} s, {sector}-byte sectors (host ids 1 to "
              f"{MAX_HOSTS_BY_SECTOR[sector]})")
    return 0


def main(argv=None):
    """The ``lvmirror`` command: parse ``argv`` (None: sys.argv[1:]), call lvmirrord's Manager on
    the system bus, print the result. Returns the exit status: 0, EXIT_ERROR or
    EXIT_UNREACHABLE; bad usage exits (SystemExit) with EXIT_USAGE, as argparse does."""
    p = argparse.ArgumentParser(
        prog="lvmirror", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Manage lvmirror's mirrored volumes: split an image off as a point-in-time "
                    "copy, resync or restore it, back up, scrub, wait for jobs (talks to lvmirrord "
                    "over the system bus).",
        epilog="IMAGE is an image's index as `lvmirror status` lists it (0 to 3).\n"
               "Exit status: 0 success, 1 an error reported by lvmirrord (or a scrub that "
               "left a region\ndifferent), 2 bad usage, 3 lvmirrord not reachable, 130 "
               "interrupted.\nSee lvmirror(1).")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    # --json after the command too (``lvmirror scrub vol0 --json``); SUPPRESS keeps the
    # top-level value when it is not given there
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    parsers = {}

    def command(name, **kw):
        parsers[name] = sub.add_parser(name, parents=[common], **kw)
        return parsers[name]
    command("status", help="volumes, images, jobs, LUNs")
    helps = {
        "split": "split IMAGE off as a frozen copy as of now (the LUN keeps serving); runs "
                 "the split hooks",
        "detach": "remove IMAGE from the volume (its file or device is left as it is)",
        "cancel": "stop the resync or restore running on IMAGE; its bitmap is kept and resync "
                  "(or restore) of IMAGE resumes it. A cancelled restore stays unfinished: "
                  "the volume still reads as the split image, and resync, split, attach, "
                  "detach and scrub are refused until it is resumed and done (or given up: "
                  "abandon-restore)",
        "resync": "bring split or failed IMAGE back in sync, copying only the regions that "
                  "changed",
        "restore": "roll the volume back to split IMAGE (reads see it at once; copies in the "
                   "background)",
        "abandon-restore": "end the unfinished restore from split IMAGE without finishing it, "
                           "when IMAGE can no longer be read (until then every I/O to a "
                           "region not rolled back fails with MEDIUM ERROR). The volume keeps "
                           "IMAGE's data where it was rolled back and the live data elsewhere: "
                           "a mix of two instants, to be checked (fsck) before use. Needs "
                           "--force; refused while the restore runs (cancel it first)",
    }
    for name in ("split", "detach", "cancel"):
        s = command(name, help=helps[name], description=helps[name])
        s.add_argument("volume", help="the volume's name")
        s.add_argument("image", type=image_index, help="the image's index")
        if name == "split":
            _hook_args(s)
    s = command("abandon-restore", help=helps["abandon-restore"],
                description=helps["abandon-restore"])
    s.add_argument("volume", help="the volume's name")
    s.add_argument("image", type=image_index, help="the split image the restore copies from")
    s.add_argument("--force", action="store_true",
                   help="yes: leave the volume a mix of the split image and the live data")
    for name in ("resync", "restore"):
        s = command(name, help=helps[name], description=helps[name])
        s.add_argument("volume", help="the volume's name")
        s.add_argument("image", type=image_index, help="the image's index")
        s.add_argument("--rate", type=rate, default=0.0, help="MB/s, 0 = unlimited")
        s.add_argument("--wait", action="store_true", help="return when it finished")
        if name == "resync":
            s.add_argument("--full", action="store_true",
                           help="copy every region, also into an image marked in sync (a disk "
                                "suspected of dropped writes), or into a split image whose file "
                                "is not the split copy; it serves no reads until done")
        else:
            s.add_argument("--full", action="store_true",
                           help="roll back every region, not only those changed since the "
                                "split (a split image whose file is not the split copy: put "
                                "back from elsewhere, or written outside lvmirror)")
    s = command("split-group", help="split one image of each volume at one instant "
                       "(a consistency group)")
    s.add_argument("members", nargs="+", type=group_member, metavar="VOLUME:IMAGE")
    _hook_args(s)
    groups = {"split-group": s}
    s = command("restore-group", help="roll several volumes back to their split images "
                       "at one instant")
    s.add_argument("members", nargs="+", type=group_member, metavar="VOLUME:IMAGE")
    s.add_argument("--rate", type=rate, default=0.0, help="MB/s per volume, 0 = unlimited")
    s.add_argument("--wait", action="store_true", help="return when every restore finished")
    groups["restore-group"] = s
    attach_help = ("add PATH (a file, created sparse if missing, or a block device) to the "
                   "volume as a new image and start its full resync from the in-sync images; "
                   "a PATH that holds data is refused unless --force")
    s = command("attach", help="add an image (full resync from the volume)",
                description=attach_help)
    s.add_argument("volume")
    s.add_argument("path")
    s.add_argument("--force", action="store_true",
                   help="overwrite PATH even though it holds data (refused otherwise, as "
                        "mdadm and pvcreate refuse a device that carries data)")
    s.add_argument("--wait", action="store_true", help="return when its resync finished")
    s = command("backup", help="copy a split image (the point-in-time copy) to a file")
    s.add_argument("volume", help="the volume's name")
    s.add_argument("image", type=image_index, help="the split image's index (lvmirror status)")
    s.add_argument("dest", help="the backup file to make (a new file, 0600, replacing one of "
                                "that name once the copy is vouched for)")
    s.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    s = command("backup-cycle", help="split, back up, resync, keep the newest K "
                       "(what lvmirror-backup@VOLUME.timer runs)")
    s.add_argument("members", nargs="*", type=group_member, metavar="VOLUME:IMAGE",
                   help="two or more: split as a consistency group")
    s.add_argument("--config", metavar="FILE",
                   help="an INI file with a [backup] section (members, dest, format, keep, "
                        "rate, hooks); the options below override it")
    s.add_argument("--dest", help="backup directory (one subdirectory per volume)")
    s.add_argument("--format", choices=("raw", "qcow2"))
    s.add_argument("--keep", type=int, help="backups kept per volume (default 7)")
    s.add_argument("--rate", type=rate, help="resync rate limit, MB/s (0: unlimited)")
    s.add_argument("--no-hooks", action="store_true", help="do not run the split hooks")
    groups["backup-cycle"] = s
    scrub_help = ("compare the in-sync images region by region; repair by majority vote or "
                  "from a named image")
    s = command("scrub", help=scrub_help, description=scrub_help)
    s.add_argument("volume", nargs="?", help="the volume's name (or --all)")
    s.add_argument("--all", action="store_true",
                   help="every open volume, one after another with --wait; a one-image volume "
                        "is skipped, a mirrored one that cannot be compared now is named and "
                        "fails the run (exit 1)")
    s.add_argument("--repair", action="store_true",
                   help="rewrite the odd image(s) of a region from the majority (3 or more "
                        "images), or from --source")
    s.add_argument("--source", type=image_index, metavar="IMAGE",
                   help="with --repair: the image whose content is right (what 2 images need)")
    s.add_argument("--rate", type=rate, default=0.0,
                   help="MB/s of the volume checked (each image is read at it); 0 = unlimited")
    s.add_argument("--wait", action="store_true",
                   help="return when it ended, with the mismatches found (exit 1 if any is "
                        "left as found)")
    s.add_argument("--cancel", action="store_true",
                   help="end the running scrub for good (with --all: every running scrub)")
    scrub = s
    command("metrics", help="lvmirrord's metrics in Prometheus text format (the file it "
                   "writes for the node exporter's textfile collector)")
    s = command("wait", help="return when no resync, restore, attach or crash "
                       "recovery runs on the volume")
    s.add_argument("volume")
    s.add_argument("--timeout", type=wait_timeout, metavar="SECONDS",
                   help="give up after this long (exit 1)")
    s = command("lease-init", help="initialise a lease area for gateways sharing storage "
                             "(run once, before any lvmirrord uses it; needs the sanlock daemon)")
    s.add_argument("area", help="the shared file or block device (lvmirrord --lease-area)")
    s.add_argument("--io-timeout", type=io_timeout, default=10, metavar="SECONDS",
                   help="sanlock's I/O timeout for the lockspace (default %(default)s)")
    s.add_argument("--force", action="store_true",
                   help="overwrite an area that holds a lockspace (every lvmirrord using it "
                        "must be stopped: its leases are destroyed)")
    args, extra = p.parse_known_args(argv)
    if extra:          # said with the command's usage, not the top one (argparse's default)
        parsers[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd == "lease-init":
        return _lease_init(args)
    if args.cmd in groups:
        check_group(groups[args.cmd], args.members)
    if args.cmd == "scrub":
        p = scrub                # its errors print its usage, not the top one
        if bool(args.volume) == bool(args.all):
            p.error("scrub: name a VOLUME or give --all, not both"
                    if args.all else "scrub: name a VOLUME or give --all")
        if args.cancel and (args.repair or args.wait or args.source is not None or args.rate):
            p.error("scrub --cancel: give only the VOLUME (or --all); --repair, --source, "
                    "--rate and --wait are for starting a scrub")
        if args.source is not None and not args.repair:
            p.error("scrub: --source says which image to repair from; give --repair too")
        if args.source is not None and args.all:
            p.error("scrub: --source names an image of one volume; not with --all")
    try:
        import dbus
        plan = None
        if args.cmd == "backup-cycle":
            try:
                plan = _backup_plan(args)
            except ValueError as exc:
                if not args.config:     # the options alone were wrong: usage, as argparse's
                    groups["backup-cycle"].error(str(exc))
                print(f"lvmirror: {exc}", file=sys.stderr)    # the file's fault: no usage
                return EXIT_USAGE
        mgr = _manager()
        if args.cmd == "metrics":
            from lvmirror.daemon.metrics import render
            sys.stdout.write(render(json.loads(mgr.Status())))
            return 0
        if args.cmd == "status":
            st = json.loads(mgr.Status())
            print(json.dumps(st, indent=2) if args.json else format_status(st))
            return 0
        if args.cmd == "split":
            opts = _hook_options(dbus, args)
            res = json.loads(mgr.SplitWithOptions(args.volume, args.image, opts, timeout=3600)
                             if opts else mgr.Split(args.volume, args.image, timeout=3600))
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(res["split_time"]))
            usec = int(res["split_time"] % 1 * 1e6)
            if args.json:
                print(json.dumps(res))
                return 0
            _print_hooks(res)
            print(f"image {res['index']} ({res['path']}) split at {when}.{usec:06d}; "
                  f"{res['drained']} I/Os begun before the split drained")
            return 0
        if args.cmd == "split-group":
            opts = _hook_options(dbus, args)
            group = members_arg(args.members)
            res = json.loads(mgr.SplitGroupWithOptions(group, opts, timeout=3600) if opts
                             else mgr.SplitGroup(group, timeout=3600))
            if args.json:
                print(json.dumps(res))
                return 0
            _print_hooks(res)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(res["split_time"]))
            usec = int(res["split_time"] % 1 * 1e6)
            for m in res["members"]:
                print(f"{m['volume']}: image {m['index']} ({m['path']}) split; "
                      f"{m['drained']} I/Os begun before the split drained")
            print(f"consistency group split at {when}.{usec:06d}: switches within "
                  f"{res['switch_span'] * 1e6:.0f} us, completions held "
                  f"{res['hold_seconds'] * 1e6:.0f} us ({res['held_commands']} commands "
                  f"on {res['luns']} LUNs); no I/O was paused")
            return 0
        if args.cmd == "restore-group":
            res = json.loads(mgr.RestoreGroup(members_arg(args.members), args.rate,
                                              timeout=3600))
            failed = [m for m in res["members"] if m.get("state") == "failed"]
            if args.json:
                print(json.dumps(res))
            else:
                for m in res["members"]:
                    print(f"{m['volume']}: restore {job_phrase(m)}")
                if not failed:
                    print(f"the volumes read as their split images from one instant "
                          f"(completions held {res['hold_seconds'] * 1e6:.0f} us)")
            if failed:
                # the restore began (the volume reads as its copy) and its copy then failed
                print(f"lvmirror: the restore of {', '.join(m['volume'] for m in failed)} "
                      f"failed: {failed[0]['error']}", file=sys.stderr)
                return EXIT_ERROR
            if args.wait:
                for name, image in args.members:
                    failed = wait_jobs(mgr, name, None, image=image)
                    if failed:
                        print(f"failed: {name}: {failed[0]['error']}", file=sys.stderr)
                        return EXIT_ERROR
            return 0
        if args.cmd == "backup-cycle":
            return _backup_cycle(args, mgr, plan)
        if args.cmd == "scrub":
            return _scrub(args, mgr, dbus)
        if args.cmd == "backup":
            from lvmirror.backup import held_backup
            tty = sys.stderr.isatty()
            # kill / timeout (SIGTERM) as Ctrl-C: the hold ends as failed and the partial copy
            # is removed (it was left, full size, trial of 2026-12-06)
            import signal
            signal.signal(signal.SIGTERM, _interrupt)
            n = held_backup(mgr, args.volume, args.image, args.dest, fmt=args.format,
                            progress=(lambda d, t: sys.stderr.write(f"\rbackup: {d / t:6.1%}"))
                            if tty else None)
            if tty:
                sys.stderr.write("\n")             # (after the progress line's \r)
            print(json.dumps({"dest": args.dest, "bytes": n, "format": args.format})
                  if args.json else f"image {args.image} copied to {args.dest} ({args.format})")
            return 0
        if args.cmd in ("resync", "restore"):
            if getattr(args, "full", False):
                fn = mgr.ResyncWithOptions if args.cmd == "resync" else mgr.RestoreWithOptions
                res = json.loads(fn(
                    args.volume, args.image, args.rate,
                    dbus.Dictionary({"full": dbus.Boolean(True)}, signature="sv")))
            else:       # the plain call, as before --full existed
                fn = mgr.Resync if args.cmd == "resync" else mgr.Restore
                res = json.loads(fn(args.volume, args.image, args.rate))
            if args.json:
                print(json.dumps(res))
            elif res.get("state") == "failed":
                # the job ended before the call returned (its source unreadable, the
                # volume gone offline): not "started"
                print(f"lvmirror: {args.cmd} of image {args.image} failed: {res['error']}",
                      file=sys.stderr)
                return EXIT_ERROR
            else:
                print(f"{'full ' if getattr(args, 'full', False) else ''}{args.cmd} of image "
                      f"{args.image} {job_phrase(res)}"
                      + ("; the image serves no reads until it ends"
                         if getattr(args, "full", False) and args.cmd == "resync"
                         and res.get("state") == "running"
                         else ""))
            if args.json and res.get("state") == "failed":
                return EXIT_ERROR
        elif args.cmd == "attach":
            if args.force:
                idx = mgr.AttachImageWithOptions(args.volume, args.path,
                                                 dbus.Dictionary({"force": dbus.Boolean(True)},
                                                                 signature="sv"))
            else:       # the plain call, as before --force existed
                idx = mgr.AttachImage(args.volume, args.path)
            print(json.dumps({"index": int(idx)}) if args.json else
                  f"{args.path} attached as image {int(idx)}; full resync started")
            args.image = int(idx)           # what --wait waits for
        elif args.cmd == "detach":
            mgr.DetachImage(args.volume, args.image)
        elif args.cmd == "abandon-restore":
            if not args.force:
                print(f"lvmirror: abandoning the restore leaves volume {args.volume} a mix of "
                      f"split image {args.image}'s data (where it was rolled back) and the "
                      f"live data (everywhere else); check it before use. Run again with "
                      f"--force to do so", file=sys.stderr)
                return EXIT_ERROR
            res = json.loads(mgr.AbandonRestore(args.volume, args.image))
            print(json.dumps(res) if args.json else
                  f"restore of {args.volume} from image {args.image} abandoned: "
                  f"{res['regions']} region(s), {res['bytes']} bytes, were not recorded as rolled "
                  f"back; "
                  f"the volume holds image {args.image}'s data only where it was. Check the "
                  f"file system or application data before use; image {args.image} stays "
                  f"split (resync or detach it)")
        elif args.cmd == "cancel":
            mgr.Cancel(args.volume, args.image)
        if args.cmd == "wait" or getattr(args, "wait", False):
            failed = wait_jobs(mgr, args.volume, getattr(args, "timeout", None),
                               image=getattr(args, "image", None))
            if failed:
                ids = {im["id"]: im["index"] for im in json.loads(mgr.Status())["volumes"].get(
                    args.volume, {}).get("images", [])}
                for j in failed:           # every one (trial 27: only the first was named)
                    where = ids.get(j["image_id"])
                    print(f"failed: {j['kind']}" + (f" of image {where}" if where is not None
                                                    else "") + f": {j['error']}",
                          file=sys.stderr)
                return EXIT_ERROR
        return 0
    except KeyboardInterrupt:
        print("\nlvmirror: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ImportError as e:
        print(f"lvmirror: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (TimeoutError, ValueError, OSError) as e:
        print(f"lvmirror: {e}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:      # dbus.DBusException and friends
        name = getattr(e, "get_dbus_name", lambda: "")() or ""
        msg = getattr(e, "get_dbus_message", lambda: str(e))() or str(e)
        if name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                    "org.freedesktop.DBus.Error.NoServer", "org.freedesktop.DBus.Error.FileNotFound",
                    "org.freedesktop.DBus.Error.NoReply", "org.freedesktop.DBus.Error.BadAddress"):
            print(f"lvmirror: lvmirrord is not reachable on the system bus ({msg})",
                  file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"lvmirror: {msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
