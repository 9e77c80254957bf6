"""One process's share of lvmirrord: the LUNs it serves, the volumes they open, and the
management calls on those volumes (split, resync, restore, attach, detach, backup, region locks).

lvmirrord gives each volume a process of its own (``lvmirror.daemon.volumeproc``) running one
``VolumeHost``; with ``--no-processes`` one ``VolumeHost`` in lvmirrord serves every volume. Either way ``Lvmirrord`` routes a management call to the host of its volume.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from lvmirror import cfgstring, rawtext
from lvmirror.errors import ConfigError, StateError
from lvmirror.mirror.regionlock import LEASE_OWNER
from lvmirror.mirror.resync import job_progress
from lvmirror.daemon.lunserver import LunServer, _fastread
from lvmirror.daemon.lease import Leases
from lvmirror.daemon.registry import VolumeRegistry
from lvmirror.scsi import alua

log = logging.getLogger("lvmirrord")

__all__ = ["BackupProgress", "VolumeHost"]


def _owner_label(owner) -> str:
    """Who holds or waits for a region lock, for status displays: the bus name of an external
    holder, "initiator I/O" for a SCSI command (a stuck batch's narrowed ring lease too:
    ``RegionLockManager.narrow_lease``), "resync"/"restore" for a copy job."""
    if owner is None or owner is LEASE_OWNER:
        return "initiator I/O"
    if isinstance(owner, tuple) and len(owner) == 2 and owner[0] == "bus":
        return f"D-Bus {owner[1]}"
    kind = getattr(owner, "kind", None)
    return kind if isinstance(kind, str) else str(owner)


class BackupProgress:
    """A running or finished backup of a split image, shown with the volume's jobs."""

    kind = "backup"

    def __init__(self, image_id, dest, owner=None, index=None):
        """``image_id``: the split image's id (``index``: its index, which no detach changes
        while the backup runs); ``dest``: the backup file; ``owner``: for a copy made by a
        client (``begin_backup``), its lock owner (``("bus", name)``): the backup ends as
        failed if it leaves the bus first. None: lvmirrord copies."""
        self.image_id = image_id
        self.index = index
        self.dest = dest
        self.owner = owner
        self.state = "running"
        self.error = None
        self.bytes_done = 0
        self.bytes_total = 0
        self._t0 = time.monotonic()
        self._t_end = None

    def update(self, done, total):
        """Progress callback of backup_image: ``done`` of ``total`` bytes copied."""
        self.bytes_done, self.bytes_total = done, total

    def finish(self, state, error=None):
        """The backup ended: ``state`` "done" or "failed" (with ``error``)."""
        self.state, self.error, self._t_end = state, error, time.monotonic()

    def progress(self) -> dict:
        """The job dict status() shows (kind, image, state, bytes, MB/s, elapsed s, dest;
        ``copier``: who makes the copy, "lvmirrord" or the client's bus name, whose
        progress lvmirrord learns only at its end)."""
        return job_progress(self, rate_limit=None, dest=self.dest,
                            copier="lvmirrord" if self.owner is None
                            else _owner_label(self.owner))



class VolumeHost:
    """The LUNs one process serves and the volumes they open (``VolumeRegistry``), with the
    management API on those volumes. Methods are called from the netlink thread (LUNs) and from
    the D-Bus service's worker threads (management), concurrently."""

    def __init__(self, state_dir: str, *, workers: int = 4, inline_reads: bool = True,
                 leases=None):
        """``state_dir``: where volume metadata lives; ``workers``: threads per LUN's pool;
        ``inline_reads``: the ring thread answers cached READs itself (``LunServer``);
        ``leases``: a ``lease.LeaseConfig`` (every volume is opened under its sanlock lease,
        held by this process) or None."""
        self.state_dir = state_dir
        self.workers = workers
        self.inline_reads = inline_reads
        self.registry = VolumeRegistry(state_dir, leases=Leases(leases) if leases else None)
        self.luns: dict[str, LunServer] = {}     # by uio name
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._adding: set[str] = set()      # uio names being added (their open may wait)
        self._lock_seq = 0
        self._external_locks: dict = {}     # lock id -> (volume name, RegionLock)
        self._backups: dict = {}            # (volume, image id) -> BackupProgress
        self._backup_lock = threading.RLock()  # a backup starts, or a change to its image does
        self._pending_splits: dict = {}     # (volume, image) -> split.PendingSplit (a group's)

    # -- LUNs ----------------------------------------------------------------------------------
    def add_lun(self, device, *, pickup: bool = False, handle=None) -> dict:
        """Serve ``device`` (a ``uio.UioDevice`` of a user:lvmirror backstore): open its ring
        (``handle``: an already open one, e.g. the ring emulator's) and its volume, start its
        threads. ``pickup``: the device existed before this process started (its ring may hold
        commands of a previous one). Returns ``{"name", "uio", "error"}``: ``error`` is why the
        LUN answers NOT READY (None when it serves). A device already served is not opened twice.
        OSError when the device cannot be opened."""
        uio_name = device.uio_name
        with self._cond:
            while uio_name in self._adding:
                self._cond.wait()
            lun = self.luns.get(uio_name)
            if lun is not None:
                return {"name": lun.name, "uio": uio_name, "error": lun.error}
            self._adding.add(uio_name)
        # opened without the lock: the volume's lease may take up to sanlock's
        # host_dead_seconds, and the region-lock calls must not wait with it
        try:
            lun = LunServer(device, self.registry, workers=self.workers,
                            inline_reads=self.inline_reads,
                            peers=lambda: list(self.luns.values()))
            lun.open(pickup=pickup, handle=handle)
            lun.start()
            with self._cond:
                self.luns[uio_name] = lun
        finally:
            with self._cond:
                self._adding.discard(uio_name)
                self._cond.notify_all()
        return {"name": lun.name, "uio": uio_name, "error": lun.error}

    def remove_lun(self, uio_name: str) -> bool:
        """Stop serving the device ``uio_name`` (e.g. "uio0"): drain and complete its in-flight
        commands, release its volume. False if it was not served here."""
        with self._cond:
            while uio_name in self._adding:      # being added: remove what that adds
                self._cond.wait()
            lun = self.luns.pop(uio_name, None)
        if lun is None:
            return False
        lun.stop()
        log.info("LUN %s removed", lun.name)
        return True

    def reconfigure_lun(self, uio_name: str, event) -> bool:
        """Apply a netlink RECONFIG_DEVICE ``event`` to the LUN on ``uio_name``
        (``LunServer.reconfigure``: ConfigError when it cannot). False if it is not served here."""
        lun = self.luns.get(uio_name)
        if lun is None:
            return False
        lun.reconfigure(event)
        return True

    def lun_names(self) -> list[str]:
        """The uio names of the devices served here."""
        with self._lock:
            return sorted(self.luns)

    def volume_names(self) -> list[str]:
        """The names of the volumes open here, sorted."""
        return self.registry.names()

    def stop(self):
        """Stop every LUN (each drains and completes its in-flight commands and closes its
        volume cleanly)."""
        for uio_name in self.lun_names():
            self.remove_lun(uio_name)

    # -- management (called from the D-Bus service's worker threads) ---------------------------
    def _volume(self, name):
        volume = self.registry.get(name)
        if volume is None:
            raise ConfigError(f"no volume {name!r} is open (served by no LUN); open volumes: "
                              f"{', '.join(self.registry.names()) or 'none'}")
        return volume

    def status(self) -> dict:
        """Everything ``lvmirror status`` shows, as a JSON-able dict: per open volume its size
        (bytes), block and region size, images (index, path, state, split time, changed bytes,
        error), jobs (resync, restore, scrub, backup progress, crash recovery's copy), the
        running or last scrub (``ScrubRecord.summary``: counts and the mismatching regions),
        exported split images, health
        (optimal, degraded, offline) and I/O counters; per LUN its uio device, cfgstring,
        error (name, cfgstring and error with bytes that are not UTF-8 as \\xNN: ``rawtext.shown``),
        commands served, its volume, its command latency histogram
        (``iostats.LatencyHistogram.snapshot``) and its ring threads' waits for the GIL after
        the compiled path's I/O and poll (``tcmu._fastread.gil_waits``: the serving process's,
        shared by the LUNs it serves; None where the compiled path is not built)."""
        volumes = {}
        for name in self.registry.names():
            volume = self.registry.get(name)
            if volume is None:
                continue
            stats = volume.stats
            volumes[name] = {
                "size": volume.size, "block_size": volume.block_size,
                "region_size": volume.region_size, "intent_chunk": volume.intent_chunk,
                "images": [dict(index=i.index, id=i.id, path=i.path, state=i.state.value,
                                generation=i.generation, split_time=i.split_time,
                                bitmap_fill=i.bitmap_fill, dirty_bytes=i.dirty_bytes,
                                error=i.error, stuck_io=i.stuck_io) for i in volume.images],
                "jobs": [job.progress() for job in list(volume.jobs.values())] +
                        [b.progress() for (v, _), b in list(self._backups.items()) if v == name] +
                        ([volume.recovery.progress()] if volume.recovery is not None
                         and volume.recovery.state != "done" else []),
                "exported": self.registry.exports(name),
                "scrub": volume.scrubs.last(),
                "health": volume.health, "offline": volume.offline,
                "lease": self.registry.lease_of(name),
                "io": {k: stats[k] for k in ("reads", "writes", "bytes_read", "bytes_written",
                                             "flushes", "unmaps", "read_errors", "write_errors",
                                             "image_failures", "inflight", "space_errors",
                                             "metadata_errors", "slow_legs",
                                             "offline_events")},
            }
        # a backstore name or cfgstring written to configfs as bytes that are not UTF-8
        # (rawtext): shown as \xNN, for D-Bus, the CLI's terminal and the metrics text
        # (None where the compiled path is not built, or was built before it counted them)
        gil_waits = (_fastread.gil_waits() if hasattr(_fastread, "gil_waits") else None)
        luns = [{"name": rawtext.shown(lun.name), "uio": lun.device.uio_name,
                 "cfgstring": rawtext.shown(lun.device.cfgstring),
                 "error": None if lun.error is None else rawtext.shown(lun.error),
                 "commands": lun.commands,
                 "ring_thread_commands": lun.inline, "compiled_reads": lun.compiled,
                 "compiled_writes": lun.compiled_writes,
                 "ring_stalls": lun.handovers,
                 "ring_leases": lun.leases, "ring_leases_revoked": lun.leases_revoked,
                 "volume": getattr(lun.volume, "name", None),     # read once: see _to_inactive
                 "alua_state": alua.STATE_NAMES.get(lun.alua_state), "standby": lun.standby,
                 "latency": lun.latency.snapshot(), "ring_gil_waits": gil_waits}
                for lun in list(self.luns.values())]
        return {"volumes": volumes, "luns": luns}

    def split(self, name, image):
        """Split image ``image`` (an index) off volume ``name`` now (``MirrorVolume.split``:
        I/O begun before the split time T completes to every image, later I/O goes to the
        others and is not paused). Returns index, path, split_time (seconds since the epoch),
        generation and the number of I/Os drained. ConfigError: no such volume; StateError /
        IndexError as MirrorVolume.split raises them."""
        info = self._volume(name).split(image)
        log.info("volume %s: image %d split at %.6f (%d I/Os drained)", name, image,
                 info.split_time, info.drained)
        return dict(index=info.index, path=info.path, split_time=info.split_time,
                    generation=info.generation, drained=info.drained)

    # -- the steps of a consistency group's split (daemon.splitgroup runs them) ---------------
    def split_prepare(self, name, image) -> None:
        """Step 1 of splitting image ``image`` of volume ``name`` with others at one instant:
        ``SplitControl.prepare`` (the image is saved as split, still takes every write).
        StateError/IndexError/ConfigError as ``split`` raises them."""
        vol = self._volume(name)
        with self._backup_lock:
            if (name, image) in self._pending_splits:
                raise StateError(f"volume {name}: a split of image {image} is under way")
            self._pending_splits[(name, image)] = (vol, vol.splits.prepare(image))

    def _pending(self, name, image):
        try:
            return self._pending_splits[(name, image)]
        except KeyError:
            raise StateError(f"volume {name}: no split of image {image} is prepared") from None

    def split_switch(self, name, image) -> float:
        """Step 2: the instant T of the prepared split (``SplitControl.switch``); returns T
        (seconds since the epoch). StateError when it can no longer be split (then
        ``split_abort``)."""
        vol, p = self._pending(name, image)
        return vol.splits.switch(p)

    def split_abort(self, name, image) -> bool:
        """Undo a prepared split that did not reach T (the image stays in sync). False when
        none was prepared; a split past T is finished instead (``split_finish``)."""
        with self._backup_lock:
            entry = self._pending_splits.get((name, image))
            if entry is None or entry[1].split_time is not None:
                return False
            del self._pending_splits[(name, image)]
        entry[0].splits.abort(entry[1])
        return True

    def split_finish(self, name, image) -> dict:
        """Step 3: drain the I/O begun before T and make the split durable
        (``SplitControl.finish``); returns what ``split`` returns."""
        vol, p = self._pending(name, image)
        try:
            info = vol.splits.finish(p)
        finally:
            with self._backup_lock:
                self._pending_splits.pop((name, image), None)
        log.info("volume %s: image %d split at %.6f with its consistency group (%d I/Os "
                 "drained)", name, image, info.split_time, info.drained)
        return dict(index=info.index, path=info.path, split_time=info.split_time,
                    generation=info.generation, drained=info.drained)

    def hold_completions(self, names, max_seconds: float = 10.0) -> int:
        """Hold the completions of every LUN of the volumes ``names`` (``LunServer.hold``);
        returns how many LUNs. A LUN already holding raises StateError after releasing those
        this call held."""
        names = set(names)
        held = []
        try:
            for lun in list(self.luns.values()):
                volume = lun.volume          # once: an ALUA switch may clear it meanwhile
                if volume is not None and volume.name in names:
                    lun.hold(max_seconds, held_for=volume.name)
                    held.append(lun)
        except BaseException:
            for lun in held:
                lun.release()
            raise
        return len(held)

    def release_completions(self, names) -> dict:
        """End ``hold_completions`` for the volumes ``names``: ``{"luns", "commands",
        "seconds"}`` (LUNs released, completions that were held, the longest hold in
        seconds)."""
        names = set(names)
        out = dict(luns=0, commands=0, seconds=0.0)
        for lun in list(self.luns.values()):
            # also a LUN whose volume was closed meanwhile (its ALUA group went Standby): it
            # still holds what it completed before
            volume = lun.volume
            if (volume is not None and volume.name in names) or lun.held_for in names:
                n, seconds = lun.release()
                if seconds is not None:
                    out["luns"] += 1
                    out["commands"] += n
                    out["seconds"] = max(out["seconds"], seconds)
        return out

    def _image_info(self, name, image):
        """Image ``image`` (its index) of volume ``name`` as ``MirrorVolume.images`` gives it
        (an ImageInfo); ConfigError when the volume has no such image."""
        info = next((i for i in self._volume(name).images if i.index == image), None)
        if info is None:
            raise ConfigError(f"volume {name}: no image {image}")
        return info

    def _no_backup(self, name, image):
        """Image ``image``'s ImageInfo, or StateError while a backup of it runs (the caller holds
        ``_backup_lock`` across this check and its change to the image)."""
        info = self._image_info(name, image)
        b = self._backups.get((name, info.id))
        if b is not None and b.state == "running":
            raise StateError(f"volume {name}: image {image} is being backed up to {b.dest}; "
                             f"wait for the backup to finish")
        return info

    def backup_check(self, name, image) -> None:
        """Raise what a backup of image ``image`` of volume ``name`` would be refused with,
        starting nothing: StateError when it is not split (a point-in-time copy) or is not the
        copy its split recorded (``MirrorVolume.check_copy``: the file at its path replaced or
        written since, or its split not finished); ConfigError when there is no such volume or
        image. ``_start_backup`` asks it for every backup (BeginBackup, Backup)."""
        info = self._image_info(name, image)
        if info.state.value != "split":
            raise StateError(f"volume {name}: image {image} is {info.state.value}; only a "
                             f"split image is a point-in-time copy (split it first)")
        self._volume(name).check_copy(image)

    def _start_backup(self, name, image, dest, owner=None):
        """Register a backup of split image ``image`` of volume ``name`` to ``dest``: checked
        and registered under ``_backup_lock``, the lock every change to the image takes, so
        from here until it ends resync, restore and detach of the image are refused. Returns
        (its BackupProgress, the image's ImageInfo). StateError when the image is not split,
        is backed up already, or is not the copy its split recorded (``backup_check``).
        The copy is judged before ``_backup_lock`` is taken: the judgement may read a sample
        of the image (each read bounded by ``leg_timeout``), and every resync, restore and
        detach of the host's volumes would wait with it (trial 38, MEDIUM). Under the lock
        the image is judged again only when it changed meanwhile (another split, a resync)."""
        judged = self._image_info(name, image)
        self.backup_check(name, image)
        with self._backup_lock:
            info = self._no_backup(name, image)
            if (info.id, info.state, info.generation, info.split_time) != \
                    (judged.id, judged.state, judged.generation, judged.split_time):
                self.backup_check(name, image)
            self._no_backup_to(dest)
            # no LUN may export it writable meanwhile (StateError if one does now)
            self.registry.hold_copy(name, info.index)
            progress = self._backups[(name, info.id)] = BackupProgress(info.id, dest, owner,
                                                                      info.index)
        return progress, info

    def _no_backup_to(self, dest) -> None:
        """StateError while another backup (of any image of this host's volumes) writes to
        ``dest``: two copies renamed one over the other leave one backup under two "done"
        records (``_backup_lock`` held)."""
        from lvmirror.backup import dest_key
        key = dest_key(dest)
        for (vname, _id), b in self._backups.items():
            if b.state == "running" and dest_key(b.dest) == key:
                raise StateError(f"{dest} is the destination of the running backup of image "
                                 f"{b.index} of volume {vname}; choose another name or wait "
                                 f"for it")

    def _end_backup(self, name, b, state, error=None) -> bool:
        """End backup ``b`` of volume ``name`` (``_backup_lock`` held): ``state`` "done" or
        "failed", its hold on the image released. False when it had ended already."""
        if b.state != "running":
            return False
        b.finish(state, error)
        self.registry.release_copy(name, b.index)
        return True

    def begin_backup(self, name, image, dest, owner) -> dict:
        """Hold split image ``image`` of volume ``name`` for a backup its caller copies
        itself (``lvmirror backup``, targetcli-lvmirror's ``backup``: they write where the
        caller may, which lvmirrord's sandbox may not): checked and registered as ``backup``
        does, so resync, restore and detach of the image are refused until ``end_backup`` or
        until ``owner`` (``("bus", name)``) leaves the bus (``release_owner``). Before, those
        copies only asked ``backup_check`` and a resync started meanwhile changed the file
        under the copy: a backup of two instants. Returns ``{"path", "size", "state"}``: the
        file to copy and the volume's size in bytes (the copy's length). StateError /
        ConfigError as ``backup`` raises them. ``dest`` is shown in status; that it is no image
        of an open volume is checked one level up (``Lvmirrord._refuse_image_dest``)."""
        progress, info = self._start_backup(name, image, str(dest), owner)
        log.info("volume %s: backup of image %d to %s started by %s", name, image, dest,
                 _owner_label(owner))
        return dict(path=info.path, size=self._volume(name).size, state=info.state.value)

    def end_backup(self, name, image, owner, *, state="done", nbytes=0, error=None) -> None:
        """End the backup ``begin_backup`` gave ``owner``: ``state`` "done" (``nbytes``
        bytes copied) or "failed" (``error``, a str). ConfigError when ``owner`` holds no
        running backup of that image (never began one, or it was ended: it left the bus)."""
        if state not in ("done", "failed"):
            raise ConfigError(f"a backup ends done or failed, not {state!r}")
        with self._backup_lock:
            info = self._image_info(name, image)
            b = self._backups.get((name, info.id))
            if b is None or b.owner != owner or b.state != "running":
                raise ConfigError(f"volume {name}: no backup of image {image} held by "
                                  f"{_owner_label(owner)} is running")
            b.bytes_done = b.bytes_total = int(nbytes) if state == "done" else b.bytes_done
            self._end_backup(name, b, state, None if state == "done" else str(error or "failed"))
        if state == "done":
            log.info("volume %s: image %d backed up to %s (%d bytes) by %s", name, image,
                     b.dest, int(nbytes), _owner_label(owner))
        else:
            log.error("volume %s: backup of image %d to %s by %s failed: %s", name, image,
                      b.dest, _owner_label(owner), b.error)

    def backup(self, name, image, dest, fmt="raw") -> int:
        """Copy split image ``image`` to ``dest`` (raw sparse or qcow2), made beside it and
        renamed over it once durable. Resync, restore and detach of the image are refused while
        it runs; progress shows in status(). StateError when the image is not split, is backed
        up already, is not the copy its split recorded (``MirrorVolume.check_copy``), or
        another backup writes ``dest``; ConfigError for a relative ``dest`` or one that is no
        regular file (``backup.check_dest``)."""
        from lvmirror.backup import backup_image, check_dest, discard, new_partial, publish
        if not os.path.isabs(dest):
            raise ConfigError(f"backup destination {dest!r} must be an absolute path")
        try:
            check_dest(dest)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        progress, info = self._start_backup(name, image, dest)
        size = self._volume(name).size        # bytes: not the rest of a larger device
        entry = dict(index=info.index, path=info.path, state=info.state.value)
        log.info("volume %s: backup of image %d to %s (%s) started", name, image, dest, fmt)
        partial = None
        try:
            # made beside dest and renamed over it once durable: a failed copy is never
            # left under the name (backup.new_partial)
            partial = new_partial(dest)
            n = backup_image(entry, partial, fmt=fmt, progress=progress.update, size=size)
            publish(partial, dest)
        except BaseException as exc:
            if partial:
                discard(partial)
            with self._backup_lock:
                self._end_backup(name, progress, "failed", str(exc))
            raise
        with self._backup_lock:
            self._end_backup(name, progress, "done")
        log.info("volume %s: image %d backed up to %s (%d bytes)", name, image, dest, n)
        return n

    def resync(self, name, image, rate_mbps=0.0, *, full=False):
        """Start (or resume) the resync of image ``image`` of volume ``name`` at ``rate_mbps``
        MB/s (0: unlimited); ``full``: every region, also into an image marked in sync
        (``MirrorVolume.resync``). Returns the job's progress dict. StateError / IndexError
        as ``JobControl.resync`` raises them; refused while the image is backed up."""
        with self._backup_lock:
            self._no_backup(name, image)
            job = self._volume(name).resync(image, rate_limit=rate_mbps or None, full=full)
        if full:
            log.warning("volume %s: full resync of image %d started: it serves no reads until "
                        "every region is copied from the other images", name, image)
        else:
            log.info("volume %s: resync of image %d started", name, image)
        return job.progress()

    def restore(self, name, image, rate_mbps=0.0, *, full=False):
        """Roll volume ``name`` back to its split image ``image`` at ``rate_mbps`` MB/s (0:
        unlimited; kept across a restart); ``full``: every region, not only those changed
        since the split. The volume reads as the split image once this returns
        (``MirrorVolume.restore``). Returns the job's progress dict. StateError: the image is
        not split, is not the recorded split copy (without ``full``), is exported or backed
        up, or a restore runs."""
        with self._backup_lock:
            self._no_backup(name, image)
            job = self._volume(name).restore(image, rate_limit=rate_mbps or None, full=full)
        log.info("volume %s: %srestore from image %d started", name, "full " if full else "",
                 image)
        return job.progress()

    def abandon_restore(self, name, image) -> dict:
        """End the unfinished restore of volume ``name`` from split image ``image`` without
        finishing it, when its source cannot be read (``MirrorVolume.abandon_restore``): the
        volume is then a mix of two instants. Returns ``{"regions", "bytes"}`` not rolled
        back. ConfigError: no such volume; StateError: no such image, no restore from it
        unfinished, or it runs (cancel it first)."""
        return self._volume(name).abandon_restore(image)

    def restore_check(self, name, image, *, fresh=False, flush=False):
        """Raise what ``restore(name, image)`` would refuse with now, starting nothing
        (``MirrorVolume.check_restore``; also a backup of the image running). ``fresh``: a
        stopped restore of the image refuses too; ``flush``: the live images are made durable
        first. ConfigError: no such volume or image; StateError: the reason a restore may not
        start; VolumeIOError: the flush failed. Returns the split image's T (seconds since the
        epoch, None when not recorded)."""
        with self._backup_lock:
            self._no_backup(name, image)
            volume = self._volume(name)
        return volume.check_restore(image, fresh=fresh, flush=flush)

    def scrub(self, name, *, repair=False, source=None, rate_mbps=0.0):
        """Start a scrub of volume ``name`` (``ScrubControl.start``): every region read from
        every in-sync image and compared; ``repair``: odd images rewritten from the majority
        or from image ``source`` (an index); ``rate_mbps`` MB/s of the volume checked (0:
        unlimited). Returns the job's progress dict. ConfigError: no such volume; ValueError,
        StateError as ``ScrubControl.start`` raises them."""
        job = self._volume(name).scrubs.start(repair=repair, source=source,
                                              rate_limit=rate_mbps or None)
        log.info("volume %s: scrub started (%s%s%s)", name,
                 "repair" if repair else "check only",
                 f" from image {source}" if source is not None else "",
                 f", {rate_mbps:g} MB/s" if rate_mbps else "")
        return job.progress()

    def cancel_scrub(self, name):
        """Stop the scrub of volume ``name`` after the region in hand and wait for it; it is
        kept as the last result, state "cancelled" (``ScrubControl.cancel``). ConfigError: no
        such volume; StateError: no scrub runs."""
        self._volume(name).scrubs.cancel()
        log.info("volume %s: scrub cancelled", name)

    def attach(self, name, path, *, force=False):
        """Attach ``path`` to volume ``name`` (full resync); returns its index. ``force``: an
        existing path that holds data may be overwritten (``JobControl.attach``)."""
        index = self._volume(name).attach(path, force=force)
        log.info("volume %s: image %s attached as %d, full resync started%s", name, path, index,
                 " (forced over existing data)" if force else "")
        return index

    def detach(self, name, image):
        """Remove image ``image`` (an index) from volume ``name``; its file is kept.

        Refused (StateError) while the image is backed up, while it is exported as a LUN,
        while a restore is unfinished (``JobControl.detach``), or while a split image with a
        higher index is exported: a detach renumbers the images
        after it, and the export's cfgstring (``NAME;image=N``, which LIO and the saved
        targetcli configuration keep) would name another image after the next restart.
        ConfigError if the volume is not open or has no such image."""
        with self._backup_lock:
            self._no_backup(name, image)
            # a detach renumbers the images after it: a backup of one of them keeps its index
            # (its hold on the image against a writable export, its EndBackup's image)
            renumbered = sorted(b.index for (v, _), b in self._backups.items()
                                if v == name and b.state == "running" and b.index is not None
                                and b.index > image)
            if renumbered:
                raise StateError(f"volume {name}: detaching image {image} would renumber image "
                                 f"{renumbered[0]}, which is being backed up; wait for the "
                                 f"backup to finish")
            exported = self._named_exports(name)
            if image in exported:
                raise StateError(f"volume {name}: image {image} is exported as a LUN "
                                 f"(cfgstring '{name};image={image}'); remove that LUN first")
            later = [k for k in exported if k > image]
            if later:
                raise StateError(
                    f"volume {name}: detaching image {image} would renumber the exported split "
                    f"image(s) {', '.join(map(str, later))}, and after a restart the LUN whose "
                    f"cfgstring says '{name};image={later[0]}' would serve another image; "
                    f"remove the export first")
            self._volume(name).detach(image)
        log.info("volume %s: image %d detached", name, image)

    def _named_exports(self, name) -> list[int]:
        """Indices of volume ``name``'s split images that a LUN here exports (registry) or
        names in its cfgstring (``NAME;image=N``) without serving it yet - refused for a
        backup's hold or a lease, or Standby: it opens later, under the index it names, so a
        detach that renumbered it would have it serve another image (trial of 2026-12-06)."""
        out = set(self.registry.exports(name))
        for lun in list(self.luns.values()):
            try:
                spec = cfgstring.parse(lun.device.cfgstring)
            except Exception:                # a LUN that names nothing it could open
                continue
            if spec.name == name and spec.image is not None:
                out.add(spec.image)
        return sorted(out)

    def cancel(self, name, image):
        """Stop the resync or restore running on image ``image`` of volume ``name`` and wait
        for it; its bitmap is kept (resync / restore resume it). One the volume's going
        offline stopped, which would go on once it is back, does not then
        (``MirrorVolume.forget_resume``). With no such job, end the hold of a backup a client
        copies (``begin_backup``) as failed: its EndBackup will fail, so the copy is not
        vouched for. ConfigError: no such volume or image, or nothing runs
        on it."""
        volume = self._volume(name)
        for info in volume.images:
            if info.index == image:
                job = volume.jobs.get(info.id)
                if job is None or not job.is_alive():
                    if volume.forget_resume(image):
                        return      # stopped by the volume going offline: it stays stopped
                    with self._backup_lock:
                        b = self._backups.get((name, info.id))
                        if b is not None and b.owner is not None and self._end_backup(
                                name, b, "failed", "cancelled: the image's hold was ended"):
                            # a hold its copier never ended (its BeginBackup timed out, say,
                            # and its connection stays): the operator's way out (trial 38)
                            log.warning("volume %s: backup of image %d to %s by %s cancelled; "
                                        "its copy is not vouched for", name, image, b.dest,
                                        _owner_label(b.owner))
                            return
                    raise ConfigError(f"volume {name}: no job running on image {image}")
                job.cancel()
                job.wait()
                # one that was ending as the volume went offline would go on once it is back
                volume.forget_resume(image)
                return
        raise ConfigError(f"volume {name}: no image {image}")

    # -- region locks for external holders (the lock manager's coordination interface) ---------
    def lock_region(self, name, lba, count, *, shared=False, timeout=None, owner):
        """Take a range lock on volume ``name`` for ``owner`` (e.g. a backup agent on the bus);
        waits FIFO behind conflicting I/O and holders. Returns a lock id."""
        volume = self._volume(name)
        if not 0 <= lba < volume.num_blocks or count < 1 or lba + count > volume.num_blocks:
            raise ConfigError(f"volume {name}: LBA range [{lba}, +{count}) outside 0.."
                              f"{volume.num_blocks}")
        lock = volume.locks.lock(lba, count, owner=owner, shared=shared, timeout=timeout)
        with self._lock:
            self._lock_seq += 1
            lock_id = self._lock_seq
            self._external_locks[lock_id] = (name, lock)
        log.info("volume %s: LBAs [%d, +%d) locked %s by %s (lock %d)", name, lba, count,
                 "shared" if shared else "exclusive", owner, lock_id)
        return lock_id

    def unlock_region(self, lock_id, *, owner):
        """Release external lock ``lock_id`` (from lock_region). ConfigError unless ``owner``
        holds it."""
        with self._lock:
            entry = self._external_locks.get(lock_id)
            if entry is None or entry[1].owner != owner:
                raise ConfigError(f"no lock {lock_id} held by {owner}")
            del self._external_locks[lock_id]
        entry[1].release()

    def list_locks(self, name):
        """Volume ``name``'s region locks: holders and waiters (LBA, count, shared, owner,
        seconds held or waited) and the ids of the external locks taken through lock_region."""
        volume = self._volume(name)

        def info(x):
            return dict(lba=x.start, count=x.count, shared=x.shared,
                        owner=_owner_label(x.owner),
                        seconds=round(time.monotonic() - x.since, 3))

        with self._lock:
            external = sorted(lid for lid, (vol, _) in self._external_locks.items()
                              if vol == name)
        return {"holders": [info(x) for x in volume.locks.holders()],
                "waiters": [info(x) for x in volume.locks.waiters()],
                "external_lock_ids": external}

    def release_owner(self, owner) -> int:
        """``owner`` went away (left the bus): drop its locks and waiting requests."""
        n = 0
        for name in self.registry.names():
            volume = self.registry.get(name)
            if volume is not None:
                n += volume.locks.release_owner(owner)
        with self._lock:
            for lid in [lid for lid, (_, lk) in self._external_locks.items() if lk.owner == owner]:
                del self._external_locks[lid]
        with self._backup_lock:
            for (name, _), b in list(self._backups.items()):
                if b.owner == owner and self._end_backup(
                        name, b, "failed", "its copier left the bus before it said the copy "
                                           "ended"):
                    log.error("volume %s: backup of image id %s to %s by %s failed: it left "
                              "the bus before it ended the backup", name, b.image_id, b.dest,
                              _owner_label(owner))
        if n:
            log.warning("released %d region lock(s) of %s, which left the bus", n, owner)
        return n

