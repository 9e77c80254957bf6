"""Job control: resync, restore, attach and detach of a MirrorVolume's images, and their
progress on disk.

The copy loops themselves are ``resync.ResyncJob`` / ``resync.RestoreJob``; this module starts
them, resumes them after a restart, and persists what they did - always behind the durability
barrier (``durability.DurabilityBarrier``): a resync checkpoint (bitmap + cursor) only once the
copied regions are durable on the target, an image marked in sync only once all of it is, a
region recorded as restored only once the restored data is durable on every live image.
``MirrorVolume`` keeps the epochs and the I/O path and calls in here for these operations; the
state changes go through its epoch swap (``_switch_epoch``) like every other.
"""

from __future__ import annotations

import logging
import os
import time

from lvmirror.errors import ConfigError, ImageIOError, LvmirrorError, StateError, VolumeIOError
from lvmirror.mirror import copyid, imagecheck, legs
from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.durability import answer_unanswered, not_durable, unanswered
from lvmirror.mirror.image import StorageImage
from lvmirror.mirror.legs import MAX_IMAGES, ImageState, Leg, check_image_fits
from lvmirror.mirror.metadata import VolumeMetadata
from lvmirror.mirror.resync import RestoreJob, ResyncJob, _read_source, check_rate
from lvmirror.mirror.scrub import SCRUB_KEY

__all__ = ["JobControl"]

log = logging.getLogger(__name__)

_KEEP = object()   # _commit_resync_state: leave the resync cursor as it is


class JobControl:
    """The jobs of one MirrorVolume (``vol.control``). ``restore_job`` is the RestoreJob whose
    roll-back is unfinished (None otherwise): the I/O path asks it to restore a region before an
    I/O touches it. Running jobs are in ``vol.jobs`` (image id -> job)."""

    def __init__(self, vol):
        self.vol = vol
        self.restore_job: RestoreJob | None = None

    def _refuse_if_exported(self, img, image_index, doing):
        """StateError while a SplitImageVolume serves ``img`` as its own LUN: resyncing,
        restoring from or detaching it would change what that LUN's initiators read."""
        if img.exported:
            raise StateError(f"volume {self.vol.name}: split image {image_index} is exported as "
                             f"a LUN; remove that LUN before {doing} it")

    def refuse_if_restoring(self, doing, *, image=None):
        """StateError while a restore is registered (``restore_job``, from a split image other
        than ``image`` when given): running, or stopped - cancelled, failed, or stopped when
        the volume went offline - with regions left to roll back. The volume reads as the
        split image only through the restore's on-demand copies, so nothing that copies,
        splits or compares images may start until it ends; ``doing`` names what was refused.
        The message says whether the restore runs and, if stopped, why and how to finish it
        (``restore`` of the same image resumes it, unless its source still cannot be read,
        ``_refuse_if_still_unreadable``, or is not the split copy, ``_refuse_if_not_copy``;
        ``abandon_restore`` ends it in any case)."""
        rj = self.restore_job
        if rj is None or rj.img is image:
            return
        vol = self.vol
        idx = vol._images.index(rj.img) if rj.img in vol._images else rj.image_id
        if rj.is_alive():
            state = "is running"
        else:
            why = f"{rj.state}: {rj.error}" if rj.error else rj.state
            state = (f"is unfinished ({why}; 'restore {idx}' resumes it once its source "
                     f"reads and is the split copy, 'lvmirror abandon-restore {vol.name} {idx} "
                     f"--force' gives it up)")
        raise StateError(f"volume {vol.name}: a restore from image {idx} {state}; {doing} "
                         f"after it ends")

    def _refuse_if_offline(self, doing):
        """StateError while the volume is offline (its last in-sync image failed a write or a
        flush, ``MirrorVolume.offline``): a copy from that image would vouch for data it may
        have lost, and a copy into it would fail. It serves again once the image answers
        (``MirrorVolume.probe``, run by every flusher round)."""
        why = self.vol.offline
        if why is not None:
            raise StateError(f"volume {self.vol.name} is offline ({why}); {doing} once its "
                             f"in-sync image answers again (lvmirrord probes it every flush "
                             f"interval, 2 s by default)")

    def resync(self, image_index, *, rate_limit=None, full=False, resume_of=None):
        """Bring a split or failed image back in sync by copying the regions its change bitmap
        marks (a paused 'syncing' image resumes). Returns the running ResyncJob.

        ``full``: copy every region, whatever the bitmap says - also into an image marked in
        sync, which first leaves the set of images reads may use (LVM's ``lvchange --resync``,
        md's recovery of a re-added disk without a bitmap). That is the repair when a disk may
        have lost acknowledged writes without an error (dropped writes, a controller cache
        lost behind the mirror's back): nothing a mirror without checksums sees. Another image
        must be in sync to copy from. The demotion is saved (bitmap, then state) before any
        copy; a power cut leaves the image either still in sync or syncing with every region
        marked, never in sync with part of a copy.

        A split image is first compared with the copy its split recorded (``copyid``): a file
        put at its path since, or written outside lvmirror, is refused without ``full`` (its
        regions the bitmap does not mark would be kept as the volume's data), and refused
        even with it when the path names another file than the one lvmirrord holds open.

        Raises StateError: the image is in sync (without ``full``), is not the split copy
        (above), exported as a LUN, already
        has a job, a restore runs, the volume is offline, no other image is in sync, or an I/O left behind when it was
        failed as slow (``leg_timeout``) is still in flight on its device ``legs.STUCK_IO_WAIT``
        seconds after the call (``Leg.stuck_io``). IndexError: no such image.

        ``resume_of``: the job the volume's going offline stopped, which this call takes up
        (``resume_after_offline``); StateError unless it is still that job's turn
        (``_take_resume``)."""
        vol = self.vol
        rate_limit = check_rate(rate_limit)
        vol._check_open()
        img = vol._img(image_index)
        t0 = time.monotonic()
        img.wait_stuck(legs.STUCK_IO_WAIT)   # an I/O left behind as slow, returning now
        waited = time.monotonic() - t0
        # the verdict may read a sample: made before the management lock is taken
        with self._copy_verdict(img) as verdict, vol._mgmt:
            vol._check_open()       # (close stops the jobs under _mgmt: none may start after)
            vol.splits.check_idle("resync")
            img = vol._img(image_index)
            if resume_of is not None:
                self._take_resume(img, resume_of)
            running = vol.jobs.get(img.rec.id)
            if running is not None and running.is_alive():
                raise StateError(f"volume {vol.name}: image {image_index} already has a "
                                 f"{type(running).__name__} running")
            if img.state is ImageState.IN_SYNC and not full:
                raise StateError(f"volume {vol.name}: image {image_index} is already in sync "
                                 f"(a full resync rebuilds it anyway: --full)")
            self._refuse_if_exported(img, image_index, "resyncing")
            self.refuse_if_restoring("resync")
            self._refuse_if_offline("resync")
            sources = [o for o in vol._images if o is not img and o.state is ImageState.IN_SYNC]
            if not sources:
                raise StateError(f"volume {vol.name}: no other in-sync image to resync "
                                 f"image {image_index} from")
            if all(o.reads_hung() for o in sources):
                # every read of the copy would fail at once (resync._read_source: NotRead), so
                # the job would only fail: refused up front instead (trial 29, LOW)
                raise StateError(
                    f"volume {vol.name}: cannot resync image {image_index} now: the in-sync "
                    f"image(s) it would copy from ("
                    + ", ".join(o.rec.path for o in sources)
                    + ") still have reads a copy gave up on as slow in flight; run it again "
                    "once the device answers")
            self._refuse_if_stuck(img, f"image {image_index}", "resync it", waited)
            self._reopen_if_needed(img, verdict)
            self._refuse_if_stuck(img, f"image {image_index}", "resync it", waited)
            self._refuse_if_not_copy(img, image_index, verdict, full=full, doing="resync")
            full = full or img.bitmap is None
            if full:
                img.bitmap = RegionBitmap(vol.size, vol.region_size)
                img.bitmap.set_all()
            if resume_of is not None:
                resume_of.stopped_offline = False   # taken up (not on a refusal above)
            return self.start_resync(img, full=full, rate_limit=rate_limit)

    def _refuse_if_stuck(self, img, what, doing, waited):
        """StateError while I/O left behind as slow (``leg_timeout``) is in flight on ``img``'s
        device (``Leg.stuck_io``): a write landing after a copy of its region would leave the
        image stale though in sync. The message gives that reason only when such I/O may be a
        write: when every one is a copy's read given up on (``Leg.reads_hung``), it says the
        device has not answered them. ``waited``: seconds the caller waited for it already."""
        stuck = img.stuck_io
        if stuck:
            reads = img.reads_hung()
            why = ("a write landing after the copy would leave it stale" if stuck > reads else
                   "reads of it a copy gave up on: its device has not answered them")
            raise StateError(
                f"volume {self.vol.name}: {what} ({img.rec.path}) still has {stuck} I/O(s) in "
                f"flight on its device that were given up on as slow (leg_timeout; waited "
                f"{waited:.1f} s); {doing} once they return ({why})")

    def check_copy(self, image_index, doing="a backup of it") -> None:
        """Raise StateError when split image ``image_index`` is not the copy its split
        recorded (``_copy_verdict``: another file at its path, one written since the split,
        another device), naming why: ``doing`` (a backup, an export as a LUN) would not show
        the point-in-time copy of its split; also while its split is not finished (``split``
        has not returned). An image not open (missing when the volume
        opened) is judged by the file now at its path, which must open as an image. None when
        it is the copy, or when no identity was recorded. Reads a sample only when the stat
        fields do not settle it (bounded by ``leg_timeout``), with no lock held. IndexError: no
        such image."""
        vol = self.vol
        vol._check_open()
        img = vol._img(image_index)
        if img.split_busy is not None:
            # split at T, not finished: I/O begun before T may still land in it, and a write
            # left behind as slow may yet fail it (trial 38, HIGH: a backup began meanwhile)
            raise StateError(f"volume {vol.name}: the split of image {image_index} is not "
                             f"finished yet; {doing} would not be the copy as of its split "
                             f"until it is (try again once the split has returned)")
        with self._copy_verdict(img) as verdict:
            mm = verdict.mm
            if img.storage is None and img.rec.copy_id and verdict.fresh is None:
                raise StateError(
                    f"volume {vol.name}: split image {image_index} ({img.rec.path}) is not "
                    f"available: {verdict.error or 'it was not open'}")
        if mm is None:
            return
        head = (f"{_not_copy(vol, img, image_index, mm)}; {doing} would not be the volume as "
                f"of its split. ")
        if mm.held:
            raise StateError(head + self._held_way_out(img.rec.path))
        if mm.unread:
            raise StateError(head + "Try again once its device answers")
        raise StateError(head + f"Resync it ('lvmirror resync {vol.name} {image_index} --full' "
                                f"copies every region) and split again")

    @staticmethod
    def _held_way_out(path) -> str:
        """What to do when ``path`` names another file than the one lvmirrord holds open."""
        return (f"Put the split copy back at {path} (if lvmirrord opened another file there "
                f"at its start, restart it then: it opens the path at its start), or detach "
                f"the image and attach the file (a full copy into it)")

    def _copy_verdict(self, img, *, record=False) -> _Verdict:
        """Whether the file open as image ``img`` is the copy its split recorded
        (``copyid.check_leg``), and with ``record`` and a mismatch that copying every region
        mends, the file's own identity (``copyid.record_leg``), which a full restore saves as
        the copy's. Made before the management lock is taken, since it may read a sample of
        the image (bounded by ``leg_timeout``), so a slow image does not hold other management
        calls. An image not open with an identity recorded is opened here from its path and
        judged (``_Verdict.fresh``), so that ``_reopen_if_needed`` under the lock uses it
        rather than read there; use the verdict as a context manager (it closes a fresh
        storage nobody took)."""
        vol = self.vol
        st = img.storage
        if st is None and img.rec.copy_id:
            try:
                fresh = vol._opener(img.rec.path, direct=vol._direct)
            except (ConfigError, OSError) as e:
                # _reopen_if_needed reports it; check_copy refuses with it
                return _Verdict(None, None, None, error=str(e))
            try:
                check_image_fits(fresh, vol.size, vol.block_size)
                read = _fresh_reader(vol, fresh)
                try:
                    mm = copyid.check(img.rec.copy_id, fresh, read, vol.size, _skip(img))
                except OSError as e:
                    mm = copyid.Mismatch(f"it cannot be examined ({e})", unread=True)
                ident = (copyid.record(fresh, read, vol.size)
                         if record and mm and not mm.held else None)
            except BaseException as e:
                fresh.close()
                if not isinstance(e, Exception):
                    raise
                return _Verdict(None, None, None, error=str(e))
            return _Verdict(fresh, mm, ident, fresh=fresh, leg=img)
        mm = copyid.check_leg(vol, img)
        ident = copyid.record_leg(vol, img) if record and mm and not mm.held else None
        return _Verdict(st, mm, ident)

    def _refuse_if_not_copy(self, img, image_index, verdict, *, full, doing,
                            resume=False):
        """StateError unless split image ``img`` may be copied ``doing`` ("resync" or
        "restore") with its change bitmap: ``verdict`` from ``_copy_verdict`` (made again when
        the image was opened since, under the caller's management lock) shows it is the
        recorded copy, or ``full`` (every region copied) mends the mismatch. A path naming
        another file than the one held open is never mended by ``full``; neither is a mismatch
        found when a stopped restore would resume (``resume``: its bitmap is not every region).
        A mismatch taken with ``full`` is logged at warning priority. Returns the verdict's
        identity to save, or None."""
        vol = self.vol
        mm, ident = verdict.mm, verdict.ident
        if img.storage is not verdict.storage:
            # opened or closed since the verdict (a race with a failure or another call):
            # judge the file open now, under the lock (bounded reads)
            again = self._copy_verdict(img, record=full)
            again.discard()
            mm, ident = again.mm, again.ident
        if mm is None:
            return None
        path = img.rec.path
        head = _not_copy(vol, img, image_index, mm)
        if mm.held:
            raise StateError(
                f"{head}; a {doing} would use the file lvmirrord holds open while the next "
                f"start of lvmirrord opens the one at the path. " + self._held_way_out(path))
        if resume:
            raise self._resume_refusal(img, image_index, mm)
        if not full and mm.unread:
            raise StateError(
                f"{head}; run it again once its device answers ('--full' copies every region "
                f"whatever the image holds)")
        if not full:
            if doing == "resync":
                raise StateError(
                    f"{head}; a resync copies only the regions the volume changed since the "
                    f"split and would keep the rest of this file as the volume's data. Copy "
                    f"every region instead: 'lvmirror resync {vol.name} {image_index} --full'")
            raise StateError(
                f"{head}; a restore rolls back only the regions changed since the split and "
                f"would leave the volume a mix of this file and the live data. 'lvmirror "
                f"restore {vol.name} {image_index} --full' rolls back every region from it")
        log.warning("%s; the full %s %s", head, doing,
                    "copies every region into it" if doing == "resync"
                    else "rolls the volume back to every region of it")
        return ident

    def _reopen_if_needed(self, img, verdict=None):
        """Open image ``img`` again from its path if it is not open (missing at the volume's
        open, or closed), and start its worker: the file ``verdict`` (``_copy_verdict``) opened
        and judged before the lock when it did, else opened here. ConfigError/OSError: it
        cannot be opened or does not fit. StateError (``_resume_refusal``) when a restore
        from it is unfinished and the file is not the recorded split copy: it is closed again
        before anything could read it, since I/O to a region not rolled back reads the
        restore's source. Without a verdict's judgement the sample is read here, bounded by
        ``leg_timeout`` (``copyid.bounded_reader``)."""
        vol = self.vol
        if img.storage is None:
            fresh = verdict.take(img) if verdict is not None else None
            st = fresh if fresh is not None else vol._opener(img.rec.path, direct=vol._direct)
            try:
                check_image_fits(st, vol.size, vol.block_size)
                rj = self.restore_job
                if rj is not None and rj.img is img and img.rec.copy_id:
                    if fresh is not None:
                        mm = verdict.mm
                    else:
                        mm = copyid.check(img.rec.copy_id, st, _fresh_reader(vol, st),
                                          vol.size, _skip(img))
                    if mm is not None:
                        raise self._resume_refusal(img, vol._images.index(img), mm)
            except BaseException:
                st.close()
                raise
            img.storage = st
            try:
                vol._start_worker(img)
            except BaseException:              # no thread left: closed again, as it was
                img.storage = None
                st.close()
                raise

    def _resume_refusal(self, img, image_index, mm) -> StateError:
        """The StateError for an unfinished restore from image ``img`` whose file is not
        the recorded split copy (Mismatch ``mm``): only ``abandon-restore`` ends it."""
        vol = self.vol
        return StateError(
            f"{_not_copy(vol, img, image_index, mm)}; the unfinished restore from it would "
            f"roll back the "
            f"regions it has left from this file. Put the split copy back at the path, or give "
            f"the restore up ('lvmirror abandon-restore {vol.name} {image_index} --force'), "
            f"then 'lvmirror restore {vol.name} {image_index} --full' rolls back every region "
            f"from this file")

    def start_resync(self, img, *, full, rate_limit):
        """Make ``img`` syncing with its bitmap (every region if ``full``) and start its
        ResyncJob at ``rate_limit`` MB/s (None: unlimited). The bitmap, then the state and
        cursor, are saved before the epoch swap that lets writes reach the image and stops
        reads from it. Returns the job."""
        vol = self.vol
        with vol._meta:
            img.state = ImageState.SYNCING
            img.rec.error = None
            img.rec.copy_id = None      # no longer a split copy: the bitmap is the truth
            img.rec.resync_next = 0
            img.rec.resync_full = full
            img.rec.resync_rate = rate_limit
            vol._bump()
            img.bitmap.save(vol._bitmap_path(img))
            vol._save_md()
            new = vol._switch_epoch()
        job = ResyncJob(vol, img, full=full, rate_limit=rate_limit)
        vol.jobs[img.rec.id] = job
        job.start(new)
        return job

    def finish_resync(self, img, job) -> bool:
        """Called by the job when its bitmap looks empty: img -> in-sync with the epoch swap,
        written only once every region copied to it is durable (durability barrier). False
        when not marked: a region marked again, the image failed, or a flush of it failed in
        another thread and is not marked for yet (``durability.unanswered``: the image is then
        failed here, ``answer_unanswered``)."""
        vol = self.vol
        held = []
        done = vol._barrier.commit([img], lambda durable: self._mark_in_sync(img, durable,
                                                                             held),
                                   what="image in sync", limit=vol._flush_limit)
        if held:
            answer_unanswered(vol, img, "the image marked in sync")
        return done

    def _mark_in_sync(self, img, durable, held) -> bool:
        vol = self.vol
        with vol._meta:
            if img.state is not ImageState.SYNCING or img.bitmap.count() \
                    or img not in durable:
                return False
            if unanswered(img):                 # (as a checkpoint's: _commit_resync_state)
                held.append(img)
                return False
            img.state = ImageState.IN_SYNC
            img.bitmap = None
            img.rec.resync_next = None
            img.rec.resync_full = False
            img.rec.split_time = None
            img.rec.error = None
            img.rec.generation = vol._bump()
            vol._save_md()
            try:
                os.unlink(vol._bitmap_path(img))
            except FileNotFoundError:
                pass
            vol._switch_epoch()
            return True

    def checkpoint_resync(self, img, next_region):
        """Persist a resync's progress: its bitmap (cleared bits = regions copied) and cursor,
        only after the copies are durable on the target (durability barrier)."""
        self._commit_resync_state(img, next_region, "resync checkpoint")

    def pause_resync(self, img, *, keep_resume):
        """A resync stopped (cancel / close): keep 'syncing' with its bitmap saved."""
        self._commit_resync_state(img, None if not keep_resume else _KEEP, "resync paused")

    def _commit_resync_state(self, img, next_region, what):
        vol = self.vol
        if img.state is not ImageState.SYNCING:
            return
        snap = img.bitmap.copy()       # before the flush: a later clear is never saved early
        held = []

        def persist(durable):
            with vol._meta:
                if img not in durable or img.state is not ImageState.SYNCING:
                    return       # failed meanwhile: its bitmap is whole and already saved
                if unanswered(img):
                    # another thread's flush (the flusher's) took a writeback error and has
                    # not failed the image yet: this flush's success proves nothing (one
                    # fdatasync gets the error), and the image's failure takes its marks from
                    # the last save - which must not clear what may be lost (this stop's
                    # review, HIGH; durability.not_durable's rule, trial 22)
                    held.append(img)
                    return
                # never fewer marks than now: a mark added during the flush (a write the last
                # in-sync image refused, ``_image_error``, saved by it already) must not be
                # overwritten; adding marks never vouches for anything
                snap.union_update(img.bitmap)
                snap.save(vol._bitmap_path(img))
                if next_region is not _KEEP:
                    img.rec.resync_next = next_region
                vol._save_md()
        vol._barrier.commit([img], persist, what=what, limit=vol._flush_limit)
        if held:
            answer_unanswered(vol, img, f"the {what}")

    def check_restore(self, image_index, *, fresh=False, flush=False):
        """Raise what ``restore(image_index)`` would refuse with now, starting nothing: a
        consistency group checks every member this way before it rolls back any
        (``splitgroup.restore_group``). StateError as ``restore`` without ``full`` (a split
        image that is not the recorded copy refuses too), except the re-read of a failed
        restore's region (``_refuse_if_still_unreadable``), which only ``restore`` makes,
        and only when it resumes; the state can still change before the restore itself. Returns the split image's T (its split time, seconds since
        the epoch; None when not recorded), which the group compares across its members.

        ``fresh``: also refuse a stopped restore of this image, which ``restore`` would resume
        rather than roll back anew (a group's member must be rolled back at the group's
        instant, not at its earlier restore's). ``flush``: then make the live images durable
        as the restore's start does (the durability barrier), so a flush that fails refuses
        here (VolumeIOError, the volume offline as after any failed flush) and the restore's
        own flush has only what was written since to do. Like ``restore``, it opens a split
        image whose file was missing at open (and starts its worker)."""
        vol = self.vol
        vol._check_open()
        with self._copy_verdict(vol._img(image_index)) as verdict, vol._mgmt:
            img = self._restorable(image_index, verdict)
            self._refuse_if_not_copy(img, image_index, verdict, full=False, doing="restore",
                                     resume=self.restore_job is not None)
            split_time = img.rec.split_time
            if fresh and self.restore_job is not None:
                raise StateError(f"volume {vol.name}: a restore from image {image_index} is "
                                 f"unfinished ({self.restore_job.state}); finish it ('restore "
                                 f"{image_index}' resumes it) before restoring the group")
            if not flush:
                return split_time
            flushed = _restore_targets(vol, img)

            def persist(durable):
                _refuse_not_durable(vol, flushed, durable, "the restore's start",
                                    "the live data or the copy may not be durable")
            # (a syncing image's flush bounded as the flusher's is: a device that
            # stopped answering fails that image, it does not hold the group - trial 25)
            vol._barrier.commit(flushed, persist, what=f"restore check of image {image_index}",
                                limit=vol._flush_limit)
            return split_time

    def _restorable(self, image_index, verdict=None):
        """The Leg of split image ``image_index`` if a restore from it may start or resume now
        (the caller holds ``vol._mgmt``); StateError naming the first reason it may not:
        a split or consistency-group switch in progress, the volume offline, the image
        exported as a LUN, not split or not available, an I/O given up on as slow still in
        flight on its device (``Leg.stuck_io``), a flush of it failed since it was split (or
        since it was opened, when lvmirrord opened it after its split),
        a restore from another image
        unfinished, this one already running, no in-sync image to restore to, or no such
        image."""
        vol = self.vol
        vol.splits.check_idle("restore")
        self._refuse_if_offline("restore")
        img = vol._img(image_index)
        if img.exported:
            raise StateError(f"volume {vol.name}: split image {image_index} is exported as "
                             f"a LUN; remove that LUN before restoring from it")
        if img.state is not ImageState.SPLIT:
            raise StateError(f"volume {vol.name}: image {image_index} is {img.state.value}; "
                             f"only a split image can be restored from")
        self.refuse_if_restoring("restore", image=img)
        if img.storage is None:
            # missing when the volume opened, or closed when it failed: opened again, as a
            # resync does (trial 25: a source put back needed a restart of lvmirrord)
            try:
                self._reopen_if_needed(img, verdict)
            except (ConfigError, OSError) as exc:
                raise StateError(f"volume {vol.name}: split image {image_index} "
                                 f"({img.rec.path}) is not available: {exc}") from None
        base_st, base = img.split_flush_base or (None, 0)
        if img.storage.flush_failures - (base if base_st is img.storage else 0) > 0:
            # Linux reports a writeback error to one fsync only: a later flush that returns 0
            # does not make what the failed one lost durable, so the restore would vouch for
            # copies of data the copy's disk may not hold (trial 27). Counted since the split
            # when it was done on this storage: a failure before it failed the image with the
            # regions it may have lost marked, which its resync rewrote and flushed (stop 53:
            # a CI run refused the restore of a copy split after such a resync)
            raise StateError(f"volume {vol.name}: a flush of split image {image_index} "
                             f"({img.rec.path}) failed since it was "
                             f"{'split' if base_st is img.storage else 'opened'}, so its data "
                             f"may not "
                             f"all be on its disk; resync or detach it rather than restore "
                             f"from it")
        if self.restore_job is not None:
            if self.restore_job.is_alive():
                raise StateError(f"volume {vol.name}: a restore from image {image_index} "
                                 f"is already running")
        elif not any(o.state is ImageState.IN_SYNC for o in vol._images):
            raise StateError(f"volume {vol.name}: no in-sync image to restore to")
        stuck = img.stuck_io
        if stuck:
            # an I/O given up on as slow: a read (``resync._read_source``), which a restore
            # would only hang behind again (trial 27), or a flush, which leaves the copy's
            # data not known to be durable
            rj = self.restore_job
            out = (f", or give the unfinished restore up ('lvmirror abandon-restore "
                   f"{vol.name} {image_index} --force')" if rj is not None and rj.img is img
                   else "")
            raise StateError(f"volume {vol.name}: split image {image_index} ({img.rec.path}) "
                             f"still has {stuck} I/O(s) in flight on its device that were "
                             f"given up on as slow (leg_timeout); restore from it once they "
                             f"return{out}")
        return img

    def _refuse_if_still_unreadable(self, old, image_index) -> None:
        """Before a failed restore ``old`` is resumed: read again the region of the split image
        whose copy made it fail (``RestoreJob.failed_region``), bounded as the copy's reads are
        (``resync._read_source``); StateError when it still cannot be read, naming the error and
        ``abandon-restore``. Without it a retry started, put the LUN's I/O to regions not
        rolled back through the same failing reads and failed again (trial 26, MEDIUM 4).
        Not read without ``leg_timeout`` or a running worker, where the read would be unbounded
        under ``vol._mgmt`` (trial 31): the resumed job then meets the error itself."""
        r = old.failed_region
        if old.state != "failed" or r is None or not old.bitmap.test_region(r):
            return
        vol, img = self.vol, old.img
        if not vol.leg_timeout or img.worker is None or not img.worker.running:
            return
        off, ln = old.bitmap.region_range(r)
        try:
            _read_source(vol, img, off, StorageImage.aligned_buffer(ln),
                         "a re-read of the region")
        except ImageIOError as e:
            raise StateError(
                f"volume {vol.name}: split image {image_index} ({img.rec.path}) still cannot be "
                f"read where the last restore failed (offset {off}, {ln} bytes): {e}; restore "
                f"from it once it reads, or give the restore up ('lvmirror abandon-restore "
                f"{vol.name} {image_index} --force')") from None

    def restore(self, image_index, *, rate_limit=None, full=False, resume_of=None):
        """Roll the live volume back to split image ``image_index``. Returns the RestoreJob.

        Semantics: when the call returns, the volume *reads as* the split image (a read or
        write that touches a region not yet copied first restores that region). Writes made
        after the call are kept. When the job is done the image stays split and its change
        bitmap holds exactly the regions written since they were restored (empty if none).
        ``rate_limit`` MB/s (None: unlimited; ValueError as ``resync.check_rate``, before
        anything is saved) is kept across a restart. StateError while the volume is offline
        (its live images could not take the copy), the image is not split, is exported as a
        LUN or cannot be opened, or a restore from another image is unfinished
        (``refuse_if_restoring``); a stopped restore from this image is resumed.

        The image is first compared with the copy its split recorded (``copyid``): a file put
        at its path since, or written outside lvmirror, is refused (StateError) unless
        ``full``, which rolls back every region from the file as it is and records it as the
        copy; a stopped restore is not resumed from such a file, nor is one whose path names
        another file than the one held open (``_refuse_if_not_copy``). ``resume_of``: the
        restore the volume's going offline stopped, which this call takes up
        (``resume_after_offline``): never a new one (StateError unless it is still that job's
        turn, ``_take_resume``)."""
        vol = self.vol
        rate_limit = check_rate(rate_limit)
        vol._check_open()
        with self._copy_verdict(vol._img(image_index), record=full) as verdict, vol._mgmt:
            vol._check_open()       # (close stops the jobs under _mgmt: none may start after)
            if resume_of is not None:
                self._take_resume(vol._img(image_index), resume_of)
            img = self._restorable(image_index, verdict)
            if self.restore_job is not None:
                old = self.restore_job
                if full:
                    # resuming copies only the regions left; a full one starts anew
                    # (review of the identity check, LOW 8)
                    raise StateError(
                        f"volume {vol.name}: a restore from image {image_index} is unfinished "
                        f"({old.state}); '--full' starts one anew: resume it without "
                        f"'--full', or give it up first ('lvmirror abandon-restore {vol.name} "
                        f"{image_index} --force')")
                self._refuse_if_not_copy(img, image_index, verdict, full=False,
                                         doing="restore", resume=True)
                self._refuse_if_still_unreadable(old, image_index)
                _clear_copy_error(img)
                # Resume a cancelled restore of this image from where it stopped.
                if resume_of is not None:
                    resume_of.stopped_offline = False   # taken up (not on a refusal above)
                with vol._meta:
                    img.rec.restore_rate = rate_limit
                    vol._save_md()
                job = RestoreJob(vol, img, old.bitmap, rate_limit=rate_limit)
                # the same bitmap, so the same lock and losses: a thread still in the old
                # job's commit saves under the lock the new job takes
                job.losses = old.losses
                self.restore_job = job
                vol.jobs[img.rec.id] = job
                job.start()
                return job
            # before a scrub is preempted: a refused restore must not cancel it (review of
            # the identity check, MEDIUM 4)
            ident = self._refuse_if_not_copy(img, image_index, verdict, full=full,
                                             doing="restore")
            scrub = vol.jobs.get(SCRUB_KEY)
            if scrub is not None and scrub.is_alive():
                # every region is about to be rewritten on every image: comparing them is
                # wasted reading, and a scrub refuses to start while a restore is unfinished
                scrub.preempt(f"a restore from image {image_index} began")
            flushed = _restore_targets(vol, img)

            def persist(durable):
                # The live images durable first: a region outside the restore bitmap is then
                # vouched for as the split copy's data (trial 21: a write from before the
                # split, unflushed on the live image, was lost by its failing flush or a power
                # cut, and the restore ended done with that region holding neither copy)
                _refuse_not_durable(vol, flushed, durable, "the restore's start",
                                    "the live data or the copy may not be durable")
                with vol._meta:
                    rb = img.bitmap.copy()
                    if full:
                        rb.set_all()
                    rb.save(VolumeMetadata.restore_path(vol._vdir, img.rec.id))
                    if ident is not None:
                        # the file as it is becomes the copy the volume now reads as
                        img.rec.copy_id = ident
                        _clear_copy_error(img)
                    img.rec.restore_running = True
                    img.rec.restore_rate = rate_limit
                    vol._bump()
                    vol._save_md()
                    job = RestoreJob(vol, img, rb, rate_limit=rate_limit)
                    self.restore_job = job
                    vol.jobs[img.rec.id] = job
                return job
            job = vol._barrier.commit(flushed, persist, what="restore start",
                                      limit=vol._flush_limit)
            job.start()
            return job

    def abandon_restore(self, image_index) -> dict:
        """End the unfinished restore from split image ``image_index`` without finishing it:
        meant as the way out when its source can no longer be read (a dead disk, a file gone;
        a cancelled restore whose source reads is accepted too), which otherwise keeps every
        I/O to a region not rolled back yet failing with MEDIUM ERROR and refuses resync,
        split, attach, detach and scrub. LVM does the same to a merge
        whose snapshot became invalid: the merge ends, the origin keeps what was merged.

        The live volume then holds the split image's data (as of its T) in the regions
        already rolled back and the live data, with the writes made since, everywhere else:
        a mix of two instants, which a file system or database must check before use. The
        regions not recorded as rolled back (the job commits its copies in batches, so a
        region copied since its last commit counts among them) are added to the split image's
        change bitmap (saved first), so a resync or a new restore of the image copies them;
        then the restore is recorded as ended (``restore_running`` cleared) and is not
        resumed at the next start. Nothing is vouched for, so no flush is needed. The image
        stays split, with its error if it failed. Returns ``{"regions": regions not recorded
        as rolled back, "bytes": their bytes}``.

        Raises StateError when there is no such image, no restore from it is unfinished, or
        it is running (cancel it first: ``cancel``)."""
        vol = self.vol
        vol._check_open()
        with vol._mgmt:
            img = vol._img(image_index)
            rj = self.restore_job
            if rj is None or rj.img is not img:
                raise StateError(f"volume {vol.name}: no restore from image {image_index} is "
                                 f"unfinished")
            if rj.is_alive():
                raise StateError(f"volume {vol.name}: the restore from image {image_index} is "
                                 f"running; cancel it first, or let it end")
            rj.stopped_offline = False  # never taken up again (``_take_resume``)
            with vol._meta:
                rj.abandon()            # no copy from now on (an I/O's on-demand one too)
                left = rj.bitmap.copy()
                img.bitmap.union_update(left)
                img.bitmap.save(vol._bitmap_path(img))
                img.rec.restore_running = False
                img.rec.restore_rate = None
                vol._bump()
                vol._save_md()
                try:
                    os.unlink(VolumeMetadata.restore_path(vol._vdir, img.rec.id))
                except FileNotFoundError:
                    pass
                self.restore_job = None
        done = {"regions": left.count(), "bytes": left.dirty_bytes()}
        log.warning("volume %s: the restore from image %d was abandoned: %d region(s), %d "
                    "bytes, not recorded as rolled back; the volume holds the split image's "
                    "data only where it was restored", vol.name, image_index, done["regions"],
                    done["bytes"])
        return done

    def commit_restored(self, job, regions):
        """Record ``regions`` (``(region, generation)`` pairs: the loss generation its copy
        began in, ``RestoreJob._restore_region``) as restored in the job's restore bitmap on
        disk, only once the restored data is durable on every live image (durability
        barrier); the in-memory bits are cleared after the save, so an I/O that finds a region
        clear may rely on it. A region a loss put back after its copy began keeps its bit
        (``RestoreJob.add_lost``: the live images may have dropped the copy before this
        barrier), so it is copied again."""
        vol = self.vol
        losses = job.losses
        flushed = _restore_targets(vol, job.img)

        def persist(durable):
            _refuse_not_durable(vol, flushed, durable, "regions recorded as restored")
            with losses.commit_lock:
                done = [r for r, gen in regions if losses.lost_gen.get(r, 0) <= gen]
                snap = job.bitmap.copy()
                for r in done:
                    snap.clear_region(r)
                snap.save(job.path)
                for r in done:
                    job.bitmap.clear_region(r)
        vol._barrier.commit(flushed, persist, what="restore progress")

    def finish_restore(self, img, job):
        """The restore is done: persisted after the restored data is durable on every image."""
        vol = self.vol
        with vol._meta:
            snap = img.bitmap.copy()
        flushed = _restore_targets(vol, img)

        def persist(durable):
            _refuse_not_durable(vol, flushed, durable, "the restore recorded as done")
            with vol._meta:
                img.rec.restore_running = False
                img.rec.restore_rate = None
                vol._bump()
                snap.union_update(img.bitmap)      # writes since the snapshot stay marked
                snap.save(vol._bitmap_path(img))
                vol._save_md()
                try:
                    os.unlink(VolumeMetadata.restore_path(vol._vdir, img.rec.id))
                except FileNotFoundError:
                    pass
                if self.restore_job is job:
                    self.restore_job = None
        vol._barrier.commit(flushed, persist, what="restore done")

    def attach(self, path, *, rate_limit=None, force=False) -> int:
        """Add a new image at ``path`` (file or block device; a missing file is created sparse
        at the volume size) and start its full resync (``rate_limit`` MB/s); returns its index.

        The full resync overwrites the image, so, as ``mdadm`` and ``pvcreate`` refuse a
        device that carries data, an existing path that holds data is refused with a
        ConfigError saying what was found unless ``force`` (``lvmirror attach --force``;
        ``imagecheck.refuse_if_holds_data``). Always refused (ConfigError): a path that is
        already an image of this volume or a current image of another volume of the state
        directory (by real path, device and inode), a block device another user holds (opened
        with O_EXCL as LIO's iblock does; the holder is named). StateError: 4 images already,
        a restore running (attach after it ends, as ``resync``), the volume offline, no in-sync
        image to copy from, or an I/O left behind in flight on the same device when
        it was failed as slow (detached since; ``Leg.stuck_io``). ValueError: a bad ``rate_limit`` (checked first)."""
        vol = self.vol
        rate_limit = check_rate(rate_limit)
        vol._check_open()
        path = os.fspath(path)
        with vol._mgmt:
            vol.splits.check_idle("attach an image")
            if len(vol._images) >= MAX_IMAGES:
                raise StateError(f"volume {vol.name}: already has {MAX_IMAGES} images")
            self.refuse_if_restoring("attach")
            self._refuse_if_offline("attach an image")
            for im in vol._images:
                try:
                    imagecheck.check_distinct([im.rec.path, path], name=vol.name)
                except ConfigError:
                    also = "" if os.path.abspath(im.rec.path) == os.path.abspath(path) else \
                        f" (as {im.rec.path})"
                    raise ConfigError(f"volume {vol.name}: {path} is already one of its "
                                      f"images{also}") from None
            if not any(o.state is ImageState.IN_SYNC for o in vol._images):
                raise StateError(f"volume {vol.name}: no in-sync image to copy from")
            # from the checks until volume.json names the image (start_resync saves it)
            with imagecheck.claim_lock:
                imagecheck.check_not_in_other_volume([path], vol._meta_dir, name=vol.name)
                existed = os.path.exists(path)
                if not existed:
                    StorageImage.create_file(path, vol.size)
                st = vol._opener(path, direct=vol._direct)
                try:
                    check_image_fits(st, vol.size, vol.block_size)
                    stuck = legs.in_flight(st.device)
                    if stuck:
                        # the same file or device, detached after it was failed as slow: its
                        # write landing after the full resync's copy would leave it stale
                        raise StateError(
                            f"volume {vol.name}: {path} still has {stuck} I/O(s) in flight on "
                            f"its device since it was failed as slow (leg_timeout); attach it "
                            f"once they return")
                    found = None
                    if existed:
                        src = next(o.rec.path for o in vol._images
                                   if o.state is ImageState.IN_SYNC)
                        found = imagecheck.refuse_if_holds_data(
                            path, force=force,
                            what=f"attaching it to volume {vol.name} would overwrite it with a "
                                 f"full copy of the volume (from {src})",
                            hint="To overwrite it, say so explicitly: lvmirror attach --force "
                                 "(targetcli-lvmirror: attach force=true)")
                except (ConfigError, StateError):
                    st.close()
                    raise
                if found is not None:
                    log.warning("volume %s: attached image %s held data (%s); overwritten by "
                                "the full resync as forced", vol.name, path, found.describe())
                bm = RegionBitmap(vol.size, vol.region_size)
                bm.set_all()
                with vol._meta:
                    history, next_id = list(vol._md.image_history), vol._md.next_image_id
                    rec = vol._md.add_image(path, ImageState.SYNCING.value, generation=0)
                    img = Leg(rec, st, bm)
                    try:
                        vol._start_worker(img)
                    except RuntimeError as e:     # no thread left (TasksMax): undone
                        vol._md.images.remove(rec)
                        vol._md.image_history, vol._md.next_image_id = history, next_id
                        st.close()
                        if not existed:
                            os.unlink(path)
                        raise StateError(f"volume {vol.name}: {path} not attached: its I/O "
                                         f"threads could not start ({e}); nothing was "
                                         f"changed") from e
                    vol._images.append(img)
                index = len(vol._images) - 1
                try:
                    self.start_resync(img, full=True, rate_limit=rate_limit)
                except RuntimeError as e:
                    # saved as syncing from its first region, its job failed: as a resync
                    # that stopped, resumed by a resync or the next open
                    raise StateError(f"volume {vol.name}: {path} attached as image {index}, "
                                     f"but its full resync's thread could not start ({e}): "
                                     f"it stays syncing; start it with lvmirror resync "
                                     f"{vol.name} {index} (or it resumes when lvmirrord next "
                                     f"opens the volume)") from e
            return index

    def detach(self, image_index):
        """Remove an image from the volume (not the last in-sync one). Its file is kept; a
        resync running into it is cancelled first. StateError for the last in-sync image, an
        image exported as a LUN (its SplitImageVolume still serves it), or any image while a
        restore is unfinished (``refuse_if_restoring``: the detach would renumber the images,
        the restore's source among them)."""
        vol = self.vol
        vol._check_open()
        with vol._mgmt:
            vol.splits.check_idle("detach")
            img = vol._img(image_index)
            self._refuse_if_exported(img, image_index, "detaching")
            if img.state is ImageState.IN_SYNC and not any(
                    o is not img and o.state is ImageState.IN_SYNC for o in vol._images):
                raise StateError(f"volume {vol.name}: image {image_index} is the last in-sync "
                                 f"image")
            # any unfinished restore, not only one from this image: a detach renumbers the
            # images after it, and the restore's source would change its number under the
            # operator (trial 23)
            self.refuse_if_restoring("detach")
            job = vol.jobs.get(img.rec.id)
            if job is not None and job.is_alive():
                job.cancel()
                job.wait()
            with vol._meta:
                vol._images.remove(img)
                vol._md.images.remove(img.rec)
                vol._bump()
                vol._save_md()
                new = vol._switch_epoch()
            vol._drain(new)
            vol.jobs.pop(img.rec.id, None)
            if img.worker is not None:
                img.worker.stop()
            if img.storage is not None:
                img.storage.close()
            for p in (vol._bitmap_path(img), VolumeMetadata.restore_path(vol._vdir, img.rec.id)):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass


    def _saved_rate(self, img, field):
        """The rate limit saved with an interrupted job; one no version of lvmirror should have
        written (negative, NaN) resumes the job unlimited, with a warning, rather than keep the
        volume from opening."""
        rate = getattr(img.rec, field)
        try:
            return check_rate(rate)
        except ValueError:
            log.warning("volume %s: image %s: saved %s %r is not a rate; the job resumes "
                        "unlimited", self.vol.name, img.rec.path, field, rate)
            return None

    def resume_after_offline(self) -> list:
        """After the volume came back online (``MirrorVolume.probe``): take up every resync
        and the restore that stopped because it went offline (``resync.WentOffline``) from
        where they stopped, at their saved rate, as md restarts a recovery and DRBD a resync
        once the device serves again (before, they stayed stopped until the operator or the
        next open started them: trial of 2026-12-06). A job stopped otherwise, or cancelled
        (``forget_resume``), given up (``abandon_restore``) or started again by hand since,
        is left alone: the check is made under the management lock (``_take_resume``), so a
        restore given up is never started anew. Returns the jobs started; one refused now
        (an export of the image, the image failed meanwhile) is logged, not raised: the
        operator can start it by hand."""
        vol = self.vol
        started = []
        for img in list(vol._images):
            job = vol.jobs.get(img.rec.id)
            if job is not None and job.stopped_offline and job.is_alive():
                # stopped, still ending (saving its bitmap): let it end first, or the probe
                # that ran meanwhile would find nothing to take up
                job.wait(RESUME_WAIT)
            if job is None or job.is_alive() or not job.stopped_offline:
                continue
            try:
                index = vol._images.index(img)
                if isinstance(job, RestoreJob):
                    new = self.restore(index, rate_limit=self._saved_rate(img, "restore_rate"),
                                       resume_of=job)
                else:
                    new = self.resync(index, rate_limit=self._saved_rate(img, "resync_rate"),
                                      resume_of=job)
            except (LvmirrorError, ValueError, IndexError) as e:
                if vol.offline is None:
                    # refused for good (its image failed, an export, given up...): it no
                    # longer says it goes on, nor holds a wait for it (third review, HIGH);
                    # offline again, the next probe tries once more
                    job.stopped_offline = False
                log.warning("volume %s: the %s of image %s that stopped when the volume went "
                            "offline was not started again: %s", vol.name, job.kind,
                            img.rec.path, e)
                continue
            new.resumed_after_offline = True
            log.info("volume %s: back online: the %s of image %d (%s) goes on", vol.name,
                     new.kind, index, img.rec.path)
            started.append(new)
        return started

    def _take_resume(self, img, job) -> None:
        """Under ``vol._mgmt``: take up ``job``, stopped when the volume went offline, for
        ``resume_after_offline`` - StateError unless it is still the image's job, not running,
        still to be resumed (not cancelled: ``forget_resume``), and for a restore still the
        registered one, not given up (``abandon_restore``); for a resync, its image still
        syncing. The caller clears ``stopped_offline`` only as it starts the job (a refusal
        by a later check leaves it for the next probe)."""
        vol = self.vol
        if vol.jobs.get(img.rec.id) is not job or job.is_alive() or not job.stopped_offline \
                or job.cancelled_by_request:
            raise StateError(f"volume {vol.name}: the {job.kind} of image {img.rec.path} was "
                             f"started again, cancelled or given up meanwhile")
        if isinstance(job, RestoreJob):
            if self.restore_job is not job or job.abandoned:
                raise StateError(f"volume {vol.name}: the restore from {img.rec.path} was "
                                 f"given up or started again meanwhile")
        elif img.state is not ImageState.SYNCING:
            raise StateError(f"volume {vol.name}: image {img.rec.path} is {img.state.value} "
                             f"now, not syncing")

    def forget_resume(self, image_index) -> bool:
        """The operator's cancel of a resync or restore of image ``image_index`` that the
        volume's going offline stopped (it runs no more, but would go on once the volume is
        back: ``resume_after_offline``): it will not; a resync is then not resumed at the
        next open either, as a cancelled one is not. Returns False when no such job waits."""
        vol = self.vol
        with vol._mgmt:
            img = vol._img(image_index)
            job = vol.jobs.get(img.rec.id)
            if job is None or job.is_alive() or not job.stopped_offline:
                return False
            job.stopped_offline = False
        if not isinstance(job, RestoreJob):
            self.pause_resync(img, keep_resume=False)
        log.info("volume %s: the %s of image %d that stopped when the volume went offline "
                 "will not go on (cancelled)", vol.name, job.kind, image_index)
        return True

    def resume(self):
        """After open: restart the resyncs (at their saved rate, from their saved cursor and
        bitmap) and the restore that were running when the volume closed or the machine
        stopped."""
        vol = self.vol
        for img in list(vol._images):
            if img.state is ImageState.SYNCING and img.rec.resync_next is not None:
                job = ResyncJob(vol, img, full=img.rec.resync_full,
                                rate_limit=self._saved_rate(img, "resync_rate"))
                vol.jobs[img.rec.id] = job
                job.start(vol._epoch)
            elif img.state is ImageState.SPLIT and img.rec.restore_running:
                mm = copyid.check_leg(vol, img)
                if mm is not None:
                    # the volume reads a region not rolled back from the split image: not
                    # from this file. Closed, the job fails ("not available") and I/O to such
                    # regions gets MEDIUM ERROR until the copy is back or the restore is given
                    # up; a restore asked for again says why (_reopen_if_needed)
                    log.error("volume %s: image %d (%s), the source of the unfinished "
                              "restore, %s: %s; not opened", vol.name,
                              vol._images.index(img), img.rec.path,
                              "could not be checked as the copy lvmirror split off"
                              if mm.unread else "is not the copy lvmirror split off", mm.reason)
                    img.rec.error = (COPY_UNCHECKED if mm.unread else COPY_ERROR) + mm.reason
                    if img.worker is not None:
                        img.worker.stop()
                        img.worker = None
                    img.storage.close()
                    img.storage = None
                rpath = VolumeMetadata.restore_path(vol._vdir, img.rec.id)
                try:
                    rb = RegionBitmap.load(rpath, vol.size, vol.region_size)
                except (OSError, ValueError):
                    rb = img.bitmap.copy()
                job = RestoreJob(vol, img, rb, rate_limit=self._saved_rate(img, "restore_rate"))
                self.restore_job = job
                vol.jobs[img.rec.id] = job
                job.start()


# seconds the probe's thread waits for a job the volume's going offline stopped to end (its
# last save is bounded by leg_timeout) before it takes the job up (resume_after_offline)
RESUME_WAIT = 30.0

# rec.error of a restore's source not opened at resume (JobControl.resume): not the copy, or
# not read to check it
COPY_ERROR, COPY_UNCHECKED = "not the split copy: ", "not checked as the split copy: "


def _not_copy(vol, img, image_index, mm) -> str:
    """The head of every refusal of an image that is not the recorded split copy (Mismatch
    ``mm``): volume, image index and path, and the reason."""
    return (f"volume {vol.name}: image {image_index} ({img.rec.path}) is not the copy lvmirror "
            f"split off: {mm.reason}")


def _fresh_reader(vol, st):
    """``copyid.bounded_reader`` for StorageImage ``st``, opened just now and served by no
    worker yet: each read bounded as a copy's is (``leg_timeout`` plus the read at
    ``legs.MIN_DEVICE_RATE``), unbounded without ``leg_timeout``."""
    return copyid.bounded_reader(st, (lambda n: vol.leg_timeout + n / legs.MIN_DEVICE_RATE)
                                 if vol.leg_timeout else None)


def _skip(img):
    """The sampled ranges ``copyid.check`` leaves out for image ``img``: those in regions its
    change bitmap marks (a copy left marked exported: its LUN's writes), as
    ``copyid.check_leg`` does for an open image (trial 33, HIGH)."""
    return copyid.marked_by(img.bitmap) if img.bitmap is not None else None


def _clear_copy_error(img) -> None:
    """Clear image ``img``'s recorded error when it is the one ``JobControl.resume`` set
    (COPY_ERROR, COPY_UNCHECKED): the file was shown to be the copy since, or taken as it is
    by a full restore. Saved with the caller's next metadata save."""
    if img.rec.error and img.rec.error.startswith((COPY_ERROR, COPY_UNCHECKED)):
        img.rec.error = None


class _Verdict:
    """What ``JobControl._copy_verdict`` found: ``storage`` (the StorageImage judged, None
    when none), ``mm`` (a copyid.Mismatch, or None: the copy or nothing recorded), ``ident``
    (the file's own identity, to record after a full restore, or None) and ``fresh`` (a
    StorageImage it opened itself for an image that was not open, not yet in use: taken by
    ``JobControl._reopen_if_needed``, else closed by ``discard``)."""

    __slots__ = ("storage", "mm", "ident", "fresh", "leg", "error")

    def __init__(self, storage, mm, ident, *, fresh=None, leg=None, error=None):
        self.storage, self.mm, self.ident, self.fresh = storage, mm, ident, fresh
        self.leg = leg          # the Leg it was made for
        self.error = error      # why an image not open could not be opened to judge it

    def take(self, leg):
        """The fresh storage when the verdict was made for ``leg``, once (None after, or for
        another Leg); the taker owns it."""
        if leg is not self.leg:
            return None
        st, self.fresh = self.fresh, None
        return st

    def discard(self) -> None:
        """Close the fresh storage if nobody took it."""
        st, self.fresh = self.fresh, None
        if st is not None:
            st.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()


def _restore_targets(vol, source) -> list:
    """The images a restore's barriers flush and judge (``MirrorVolume._storage_images``):
    those it writes to, in sync or syncing, and its ``source`` (the split image it copies
    from), whose data it vouches for as copied - written through a writable export since its
    split, it may still be in the page cache only (trial 26). Other split images take no
    part: one whose device stopped answering failed the restore's start and every progress
    commit, with "the live data may not be durable" (trial 25)."""
    return [im for im in vol._storage_images()
            if im.state is not ImageState.SPLIT or im is source]


def _refuse_not_durable(vol, flushed, durable, what, why="the restored data may not be "
                                                        "durable"):
    """Raise VolumeIOError (nothing saved) when an image of ``flushed`` that still counts was
    not made durable by the barrier (``durability.not_durable``: the last in-sync image's flush
    failed and the volume went offline instead of failing it): ``what`` would vouch for data
    that image may have lost. The caller's job fails; its state on disk claims less, which is
    always safe (a restore resumes and copies those regions again)."""
    lost = not_durable(flushed, durable)
    if lost:
        raise VolumeIOError(f"volume {vol.name}: {what} not saved: the flush of "
                            f"{', '.join(im.rec.path for im in lost)} failed, so {why}",
                            is_read=False)
