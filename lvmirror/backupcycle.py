"""The scheduled backup cycle behind ``lvmirror backup-cycle`` and the systemd timer
``lvmirror-backup@VOLUME.timer``: split (one image, or one image of each volume of a
consistency group at one instant), copy every split image to a backup directory, resync them
back, keep the newest K backups.

Each cycle writes, for every member volume, ``DEST/VOLUME/VOLUME-YYYYmmddTHHMMSSZ.raw`` (a
sparse raw copy) or ``.qcow2`` (``qemu-img convert``), made by lvmirrord in a file of its own
beside it (``NAME.<random>.partial``, ``backup.new_partial``) and renamed once the copy is
durable, so an interrupted cycle never leaves a file that looks complete. All members of one cycle get the same timestamp (T of the split, UTC). The copy is
made by lvmirrord (the Volume object's Backup: the image cannot be resynced or restored while
it is copied). After the copies the images are resynced (only the regions changed since T;
``rate`` MB/s, 0: unlimited) and the cycle waits for the resync, so the mirror is whole again
when it ends. Then the oldest complete backups of each volume beyond ``keep`` are deleted
(only files this command names; anything else in the directory is left alone).

Every step is logged on standard output (the journal, under systemd); the exit status is 0
when every step succeeded and 1 when any failed, which systemd shows as the unit failing. A
copy that fails does not stop the resync: the mirror is made whole again in any case. A split
that fails after some members were split (a group's completions hold that ran out, for one)
makes no copy; the resync of the members it split is started at once.

Configuration (``--config FILE``, the timer's ``/etc/lvmirror/backup/VOLUME.conf``), an INI
file with one ``[backup]`` section::

    [backup]
    members = db:2 wal:2      # VOLUME:IMAGE ...; two or more: a consistency group
    dest = /srv/backup/lvmirror
    format = raw              # or qcow2
    keep = 7                  # backups kept per volume
    rate = 0                  # resync rate limit, MB/s (0: unlimited)
    hooks = yes               # run the split hooks (/etc/lvmirror/hooks.d)
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import math
import os
import re
import time

from lvmirror.cli import members_arg, parse_member

__all__ = ["BackupPlan", "load_plan", "run_cycle", "prune", "backup_name"]

FORMATS = ("raw", "qcow2")
_STAMP = re.compile(r"^(?P<vol>.+)-(?P<ts>\d{8}T\d{6}Z)\.(?P<fmt>raw|qcow2)$")
# an interrupted copy: NAME.<mkstemp's 8 characters>.partial (lvmirrord's Backup), or
# NAME.partial (cycles before 2026-12-06)
_PARTIAL = re.compile(r"^(?P<name>.+?)(\.[a-z0-9_]{8})?\.partial$")


@dataclasses.dataclass
class BackupPlan:
    """What a cycle does: ``members`` ((volume, image) pairs), ``dest`` (directory), ``fmt``
    (raw / qcow2), ``keep`` (backups kept per volume, >= 1), ``rate`` (resync MB/s, 0:
    unlimited), ``hooks`` (run the split hooks)."""
    members: list
    dest: str
    fmt: str = "raw"
    keep: int = 7
    rate: float = 0.0
    hooks: bool = True

    def check(self) -> "BackupPlan":
        """ValueError unless every field makes sense; returns self."""
        if not self.members:
            raise ValueError("backup: no VOLUME:IMAGE to back up")
        names = [n for n, _ in self.members]
        if len(set(names)) != len(names):
            raise ValueError("backup: a volume is named twice")
        if not self.dest or not os.path.isabs(self.dest):
            raise ValueError(f"backup: dest must be an absolute directory, got {self.dest!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"backup: format must be raw or qcow2, got {self.fmt!r}")
        if not isinstance(self.keep, int) or self.keep < 1:
            raise ValueError(f"backup: keep must be a whole number >= 1, got {self.keep!r}")
        if not (isinstance(self.rate, (int, float)) and math.isfinite(self.rate)
                and self.rate >= 0):
            raise ValueError(f"backup: rate must be MB/s >= 0, got {self.rate!r}")
        return self


def load_plan(path: str) -> BackupPlan:
    """Read a plan from the INI file ``path`` (see the module docstring). ValueError (with the
    file's name) when it is missing, unreadable or wrong."""
    cp = configparser.ConfigParser(inline_comment_prefixes=("#", ";"))
    try:
        with open(path) as f:
            cp.read_file(f)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except configparser.Error as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not cp.has_section("backup"):
        raise ValueError(f"{path}: no [backup] section")
    sec = cp["backup"]
    unknown = set(sec) - {"members", "dest", "format", "keep", "rate", "hooks"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        plan = BackupPlan(members=[parse_member(m) for m in sec.get("members", "").split()],
                          dest=sec.get("dest", ""), fmt=sec.get("format", "raw"),
                          keep=sec.getint("keep", 7), rate=sec.getfloat("rate", 0.0),
                          hooks=sec.getboolean("hooks", True))
        return plan.check()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def backup_name(volume: str, stamp: str, fmt: str) -> str:
    """The file name of ``volume``'s backup taken at ``stamp`` (YYYYmmddTHHMMSSZ)."""
    return f"{volume}-{stamp}.{fmt}"


def prune(directory: str, volume: str, keep: int, log=print, busy=()) -> list[str]:
    """Delete the oldest complete backups of ``volume`` in ``directory`` beyond the newest
    ``keep`` (files named by ``backup_name`` only), and the leftovers of interrupted copies
    (``.partial`` files) - but not the copy of a backup running now: ``busy``, the
    destinations of the running backups (``backup.dest_key`` form; another cycle of the
    volume into the same directory copied on while this one deleted its file, trial of
    2026-12-06); a callable is asked after the directory is listed (a copy's file is made
    only once its backup is registered, so every file listed belongs to a backup it
    names). Returns the paths deleted."""
    from lvmirror.backup import dest_key
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    if callable(busy):
        busy = busy()
    ours = sorted((m.group("ts"), n) for n in names
                  if (m := _STAMP.match(n)) and m.group("vol") == volume)
    doomed = [(n, "old backup") for _, n in ours[:-keep]] if len(ours) > keep else []
    busy = set(busy)
    doomed += [(n, "the leftover of an interrupted copy") for n in names
               if (p := _PARTIAL.match(n)) and n.startswith(volume + "-")
               and (m := _STAMP.match(p.group("name"))) and m.group("vol") == volume
               and dest_key(os.path.join(directory, p.group("name"))) not in busy
               and dest_key(os.path.join(directory, n)) not in busy]
    out = []
    for n, what in doomed:
        p = os.path.join(directory, n)
        os.unlink(p)
        log(f"removed {what} {p}")
        out.append(p)
    return out


def running_backups(mgr) -> set[str]:
    """The destinations (``backup.dest_key``) of every backup lvmirrord says runs now."""
    from lvmirror.backup import dest_key
    st = json.loads(mgr.Status())
    return {dest_key(j["dest"]) for v in st["volumes"].values() for j in v.get("jobs", [])
            if j.get("kind") == "backup" and j.get("state") == "running" and j.get("dest")}


MARKER = ".lvmirror-cycle"     # DEST/VOLUME/MARKER: the split a cycle made and has not resynced


def _marker(plan, name) -> str:
    return os.path.join(plan.dest, name, MARKER)


def _left_by_a_cycle(plan, name, image, im) -> bool:
    """True when image ``im`` (a status entry) of volume ``name`` is split or syncing because a
    cycle of this plan split it and did not end (its marker names the image and, for a split
    image, its split time)."""
    try:
        with open(_marker(plan, name)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    if m.get("image") != image:
        return False
    if im["state"] == "syncing":
        return True
    return im["state"] == "split" and abs((im["split_time"] or 0) - m.get("split_time", -1)) < 1e-3


def _resync(plan, mgr, wait_jobs, name, image, log) -> bool:
    import dbus
    t1 = time.monotonic()
    try:
        mgr.Resync(name, dbus.UInt32(image), float(plan.rate))
        # a failed backup of this cycle is listed with the volume's jobs too: only the resync
        failed = [j for j in wait_jobs(mgr, name, image) if j.get("kind") == "resync"]
    except dbus.DBusException as exc:
        log(f"FAILED: resync of {name} image {image}: {exc.get_dbus_message()}")
        return False
    except ValueError as exc:       # the volume closed while its resync was waited for
        log(f"FAILED: resync of {name} image {image}: {exc}")
        return False
    if failed:
        log(f"FAILED: resync of {name} image {image}: {failed[0]['error']}")
        return False
    log(f"resync of {name} image {image} done in {time.monotonic() - t1:.1f} s")
    try:
        os.unlink(_marker(plan, name))
    except OSError:
        pass
    return True


def _check_members(plan, mgr, wait_jobs, log) -> bool:
    """Every member open and its image in sync; an image an interrupted cycle of this plan left
    split (or syncing) is made whole first. False (logged) otherwise."""
    st = json.loads(mgr.Status())
    for name, image in plan.members:
        vol = st["volumes"].get(name)
        if vol is None:
            log(f"FAILED: volume {name} is not open in lvmirrord")
            return False
        if image >= len(vol["images"]):
            log(f"FAILED: volume {name} has no image {image}")
            return False
        im = vol["images"][image]
        if im["state"] != "in-sync" and _left_by_a_cycle(plan, name, image, im):
            log(f"image {image} of {name} is {im['state']}: a cycle was interrupted after its "
                f"split; resyncing it first")
            if im["state"] == "split":
                if not _resync(plan, mgr, wait_jobs, name, image, log):
                    return False
            else:
                try:
                    failed = wait_jobs(mgr, name, image)
                except ValueError as exc:
                    failed = [{"error": str(exc)}]
                if failed:
                    log(f"FAILED: the resync of {name} image {image} failed")
                    return False
            im = json.loads(mgr.Status())["volumes"][name]["images"][image]
        if im["state"] != "in-sync":
            log(f"FAILED: image {image} of {name} is {im['state']}; a cycle splits an in-sync "
                f"image (resync it, or check whether another backup left it split)")
            return False
    return True


def _copy(plan, volume_iface, name, image, stamp, log) -> bool:
    import dbus
    d = os.path.join(plan.dest, name)
    final = os.path.join(d, backup_name(name, stamp, plan.fmt))
    t1 = time.monotonic()
    if os.path.lexists(final):
        log(f"FAILED: backup of {name} image {image}: {final} already exists (another cycle in "
            f"the same second?)")
        return False
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)
        # lvmirrord copies into a file of its own beside final and renames it to final
        # once durable (VolumeHost.backup): final is complete whenever it exists
        n = int(volume_iface(name).Backup(dbus.UInt32(image), final, plan.fmt,
                                          timeout=24 * 3600))
    except (dbus.DBusException, OSError) as exc:
        msg = exc.get_dbus_message() if isinstance(exc, dbus.DBusException) else str(exc)
        log(f"FAILED: backup of {name} image {image} to {final}: {msg}")
        return False
    secs = time.monotonic() - t1
    what = (f"{n} bytes of data copied" if plan.fmt == "raw"
            else f"a {n}-byte image converted")
    log(f"backup of {name} image {image}: {final} ({what} in {secs:.1f} s, "
        f"{n / 1e6 / max(secs, 1e-6):.1f} MB/s)")
    return True


def _resync_this_cycles_splits(plan, mgr, started, log) -> list:
    """Start the resync (at the plan's rate) of every member image this cycle split - split at
    or after ``started`` (seconds since the epoch, less 1 s for the clocks' rounding) - so that
    the mirror becomes whole again; used when the cycle cannot go on. Returns the
    ``"volume:image"`` members whose resync was started; a D-Bus error is logged, not raised."""
    import dbus
    done = []
    try:
        st = json.loads(mgr.Status())["volumes"]
        for name, image in plan.members:
            im = st.get(name, {}).get("images", [])[image:image + 1]
            if im and im[0]["state"] == "split" and (im[0]["split_time"] or 0) >= started - 1:
                mgr.Resync(name, dbus.UInt32(image), float(plan.rate))
                done.append(f"{name}:{image}")
    except dbus.DBusException as exc:
        log(f"FAILED: starting the resyncs: {exc.get_dbus_message()}")
    return done


def _interrupted(plan, mgr, members, started, log):
    """Ctrl-C / SIGTERM during a cycle: start the resync of every member image this cycle split
    (split at or after ``started``, seconds since the epoch), so the mirror becomes whole."""
    log(f"interrupted: starting the resync of {members} so that the mirror is whole again")
    _resync_this_cycles_splits(plan, mgr, started, log)
    log("backup cycle of " + members + " INTERRUPTED")


def run_cycle(plan: BackupPlan, mgr, volume_iface, wait_jobs, log=print) -> int:
    """Run one cycle of ``plan`` against lvmirrord (``mgr``: the Manager interface;
    ``volume_iface(name)``: a volume's Volume interface; ``wait_jobs(mgr, name, image)``: as
    ``cli.wait_jobs``). Returns the exit status (0: every step done; 1: a step failed, the
    failures logged; 130: interrupted, KeyboardInterrupt, after the resyncs were started). See
    the module docstring for the steps. A marker file (DEST/VOLUME/.lvmirror-cycle) names the
    split until its resync is done, so that the next cycle makes an image an interrupted one
    left split whole again instead of failing on it."""
    import dbus
    plan.check()
    members = " ".join(f"{n}:{i}" for n, i in plan.members)
    if not _check_members(plan, mgr, wait_jobs, log):
        return 1
    opts = dbus.Dictionary({"hooks": dbus.Boolean(plan.hooks)}, signature="sv")
    t0, started = time.monotonic(), time.time()
    status = 0
    try:
        try:
            if len(plan.members) == 1:
                name, image = plan.members[0]
                res = json.loads(mgr.SplitWithOptions(name, dbus.UInt32(image), opts,
                                                      timeout=3600))
            else:
                res = json.loads(mgr.SplitGroupWithOptions(members_arg(plan.members), opts,
                                                           timeout=3600))
        except dbus.DBusException as exc:
            log(f"FAILED: split of {members}: {exc.get_dbus_message()}")
            # a group split can fail after some or all members were split (a hold that ran
            # out, a hook): no copy is made of them, so they are made whole again now
            again = _resync_this_cycles_splits(plan, mgr, started, log)
            if again:
                log(f"resync started of {' '.join(again)}, split by this failed cycle")
            return 1
        split_time = res["split_time"]
        for h in res.get("hooks", []):
            log(f"hook {os.path.basename(h['hook'])} {h['phase']}: "
                + ("ok" if h["error"] is None else f"FAILED ({h['error']})"))
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(split_time))
        log(f"split {members} at {stamp} ({time.monotonic() - t0:.1f} s)")
        for name, image in plan.members:
            try:
                os.makedirs(os.path.join(plan.dest, name), mode=0o700, exist_ok=True)
                with open(_marker(plan, name), "w") as f:
                    json.dump({"image": image, "split_time": split_time}, f)
            except OSError as exc:
                log(f"cannot keep the cycle's marker for {name}: {exc}")
        for name, image in plan.members:
            if not _copy(plan, volume_iface, name, image, stamp, log):
                status = 1
        for name, image in plan.members:
            if not _resync(plan, mgr, wait_jobs, name, image, log):
                status = 1
    except KeyboardInterrupt:
        _interrupted(plan, mgr, members, started, log)
        return 130
    if status == 0:
        for name, _ in plan.members:
            prune(os.path.join(plan.dest, name), name, plan.keep, log=log,
                  busy=lambda: running_backups(mgr))
    log(("backup cycle of " + members + (" done" if status == 0 else " FAILED")
         + f" in {time.monotonic() - t0:.1f} s"))
    return status
