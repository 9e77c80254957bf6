"""The scheduled backup cycle behind ``lvmirror backup-cycle`` and the systemd timer
``lvmirror-backup@VOLUME.timer``: split (one image, or one image of each volume of a
consistency group at one instant), copy every split image to a backup directory, resync them
back, keep the newest K backups.

Each cycle writes, for every member volume, ``DEST/VOLUME/VOLUME-YYYYmmddTHHMMSSZ.raw`` (a
sparse raw copy) or ``.qcow2`` (``qemu-img convert``), first under a ``.partial`` name that is
renamed once the copy is durable, so an interrupted cycle never leaves a file that looks
complete. All members of one cycle get the same timestamp (T of the split, UTC). The copy is
made by lvmirrord (the Volume object's Backup: the image cannot be resynced or restored while
it is copied). After the copies the images are resynced (only the regions changed since T;
``rate`` MB/s, 0: unlimited) and the cycle waits for the resync, so the mirror is whole again
when it ends. Then the oldest complete backups of each volume beyond ``keep`` are deleted
(only files this command names; anything else in the directory is left alone).

Every step is logged on standard output (the journal, under systemd); the exit status is 0
when every step succeeded and 1 when any failed, which systemd shows as the unit failing. A
copy that fails does not stop the resync: the mirror is made whole again in any case.

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
import os
import re
import time

from lvmirror.cli import members_arg, parse_member

__all__ = ["BackupPlan", "load_plan", "run_cycle", "prune", "backup_name"]

FORMATS = ("raw", "qcow2")
_STAMP = re.compile(r"^(?P<vol>.+)-(?P<ts>\d{8}T\d{6}Z)\.(?P<fmt>raw|qcow2)$")


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
        if not self.rate >= 0:
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


def prune(directory: str, volume: str, keep: int, log=print) -> list[str]:
    """Delete the oldest complete backups of ``volume`` in ``directory`` beyond the newest
    ``keep`` (files named by ``backup_name`` only; ``.partial`` files of an interrupted cycle
    too). Returns the paths deleted."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    ours = sorted((m.group("ts"), n) for n in names
                  if (m := _STAMP.match(n)) and m.group("vol") == volume)
    doomed = [n for _, n in ours[:-keep]] if len(ours) > keep else []
    doomed += [n for n in names if n.endswith(".partial") and n.startswith(volume + "-")
               and _STAMP.match(n[:-len(".partial")])]
    out = []
    for n in doomed:
        p = os.path.join(directory, n)
        os.unlink(p)
        log(f"removed old backup {p}")
        out.append(p)
    return out


def run_cycle(plan: BackupPlan, mgr, volume_iface, wait_jobs, log=print) -> int:
    """Run one cycle of ``plan`` against lvmirrord (``mgr``: the Manager interface;
    ``volume_iface(name)``: a volume's Volume interface; ``wait_jobs(mgr, name)``: as
    ``cli.wait_jobs``). Returns the exit status (0: every step done; 1: a step failed, the
    failures logged). See the module docstring for the steps."""
    import dbus
    plan.check()
    status = 0
    names = [n for n, _ in plan.members]
    members = " ".join(f"{n}:{i}" for n, i in plan.members)
    st = json.loads(mgr.Status())
    for name, image in plan.members:
        vol = st["volumes"].get(name)
        if vol is None:
            log(f"FAILED: volume {name} is not open in lvmirrord")
            return 1
        if image >= len(vol["images"]):
            log(f"FAILED: volume {name} has no image {image}")
            return 1
        state = vol["images"][image]["state"]
        if state != "in-sync":
            log(f"FAILED: image {image} of {name} is {state}; a cycle splits an in-sync image "
                f"(resync it, or check whether another backup left it split)")
            return 1
    opts = dbus.Dictionary({"hooks": dbus.Boolean(plan.hooks)}, signature="sv")
    t0 = time.monotonic()
    try:
        if len(plan.members) == 1:
            name, image = plan.members[0]
            res = json.loads(mgr.SplitWithOptions(name, dbus.UInt32(image), opts, timeout=3600))
            split_time = res["split_time"]
        else:
            res = json.loads(mgr.SplitGroupWithOptions(members_arg(plan.members), opts,
                                                       timeout=3600))
            split_time = res["split_time"]
    except dbus.DBusException as exc:
        log(f"FAILED: split of {members}: {exc.get_dbus_message()}")
        return 1
    for h in res.get("hooks", []):
        log(f"hook {os.path.basename(h['hook'])} {h['phase']}: "
            + ("ok" if h["error"] is None else f"FAILED ({h['error']})"))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(split_time))
    log(f"split {members} at {stamp} ({time.monotonic() - t0:.1f} s)")
    for name, image in plan.members:
        d = os.path.join(plan.dest, name)
        final = os.path.join(d, backup_name(name, stamp, plan.fmt))
        partial = final + ".partial"
        t1 = time.monotonic()
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            n = int(volume_iface(name).Backup(dbus.UInt32(image), partial, plan.fmt,
                                              timeout=24 * 3600))
            os.rename(partial, final)
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            secs = time.monotonic() - t1
            log(f"backup of {name} image {image}: {final} ({n} bytes of data in {secs:.1f} s, "
                f"{n / 1e6 / max(secs, 1e-6):.1f} MB/s)")
        except (dbus.DBusException, OSError) as exc:
            msg = exc.get_dbus_message() if isinstance(exc, dbus.DBusException) else str(exc)
            log(f"FAILED: backup of {name} image {image} to {final}: {msg}")
            status = 1
            try:
                os.unlink(partial)
            except OSError:
                pass
    for name, image in plan.members:
        t1 = time.monotonic()
        try:
            mgr.Resync(name, dbus.UInt32(image), float(plan.rate))
            failed = wait_jobs(mgr, name)
        except dbus.DBusException as exc:
            log(f"FAILED: resync of {name} image {image}: {exc.get_dbus_message()}")
            status = 1
            continue
        if failed:
            log(f"FAILED: resync of {name} image {image}: {failed[0]['error']}")
            status = 1
        else:
            log(f"resync of {name} image {image} done in {time.monotonic() - t1:.1f} s")
    if status == 0:
        for name in names:
            prune(os.path.join(plan.dest, name), name, plan.keep, log=log)
    log(("backup cycle of " + members + (" done" if status == 0 else " FAILED")
         + f" in {time.monotonic() - t0:.1f} s"))
    return status
