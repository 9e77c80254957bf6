"""Splitting an image off a MirrorVolume at an instant T (``vol.splits``), and serving a split
image as a LUN of its own.

A split runs in three steps, so that several volumes can share one T (a consistency group,
``lvmirror.daemon.splitgroup``):

``prepare(i)``
    checks (the image in sync, another in-sync image left, no restore, no other split under
    way), copies any torn region first (the split image must hold what reads returned), gives
    the image an empty change bitmap and saves the image as *split* in the volume's metadata,
    while it still takes every write and serves reads as an in-sync image. A crash from here
    on leaves the image split as of the crash: a point-in-time copy all the same, never an
    image taken for in sync that missed writes (the data-safety rule on state that vouches
    for data).
``switch(p)``
    the instant T: under the volume's metadata lock the image becomes split and an I/O epoch
    without it is swapped in (microseconds; no I/O waits for it). I/O begun before T
    completes to the image as well, I/O begun after T never reaches it and marks its change
    bitmap first.
``finish(p)``
    waits for the I/O begun before T to drain (epochs older than T), then, through the
    durability barrier, flushes the image and saves the split as done. A write begun before T
    that the volume completed without the image (failed as slow, ``leg_timeout``) may still
    be in flight on its device: the split waits ``legs.STUCK_IO_WAIT`` seconds for it, since
    it would change the frozen copy when it lands. Past that, or when the image's flush fails
    or outlasts its bound (``MirrorVolume._flush_limit``), the image is failed, not split (its
    change bitmap, kept since T, plus what it may hold only in a volatile cache, is what a
    resync copies once the device answers), and the split raises StateError.
``abort(p)`` undoes a prepared split that did not reach T (the image stays in sync: it took
every write).

``split(i)`` runs the three at once. Between ``prepare`` and ``finish`` every other management
operation on the volume is refused with StateError (``check_idle``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from lvmirror.errors import StateError
from lvmirror.mirror import copyid, legs
from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.durability import answer_unanswered, unanswered
from lvmirror.mirror.legs import ImageState, SplitInfo
from lvmirror.mirror.splitexport import SplitImageVolume

__all__ = ["PendingSplit", "SplitControl"]

log = logging.getLogger(__name__)

# what an export would not show when its copy is not the split's (``JobControl.check_copy``)
EXPORT_DOING = "an export of it as a LUN"
# why a split is not done when another thread's flush of its image failed (``_done``)
UNANSWERED = "a flush of it failed in another thread; what it holds is not durable"


@dataclasses.dataclass
class PendingSplit:
    """A split between ``prepare`` and ``finish``: the image (index and Leg), its new change
    bitmap, the generation it got, T (seconds since the epoch, set by ``switch``) and the
    first epoch without it; ``lost``: set when an I/O on the image failed meanwhile."""
    index: int
    img: object
    bitmap: RegionBitmap
    generation: int
    split_time: float | None = None
    epoch: object = None
    done: bool = False
    # what failed on the image between T and the split's end (a write begun before T, a
    # flush): the copy may lack it, so the split is not saved as done (``finish``)
    lost: str | None = None


class SplitControl:
    """The splits of one MirrorVolume (``vol.splits``); see the module docstring."""

    def __init__(self, vol):
        self.vol = vol

    def check_idle(self, doing: str) -> None:
        """StateError when a split of this volume is between ``prepare`` and ``finish``
        (``doing``: what the caller was about to do, for the message)."""
        for k, im in enumerate(self.vol._images):
            if im.split_busy:
                raise StateError(f"volume {self.vol.name}: a split of image {k} is under way; "
                                 f"{doing} after it")

    def split(self, image_index) -> SplitInfo:
        """Split image ``image_index`` off at T (now); returns once the I/O begun before T
        drained and the split is durable. StateError/IndexError as ``prepare``."""
        p = self.prepare(image_index)
        try:
            self.switch(p)
        except BaseException:
            self.abort(p)
            raise
        return self.finish(p)

    def prepare(self, image_index) -> PendingSplit:
        """Step 1 (see the module docstring). Raises IndexError for a bad index, StateError
        when the volume is closed, the image is not in sync or is the last in-sync image, a
        restore runs or another split is under way; OSError when the metadata cannot be
        saved (nothing changed then but the new bitmap file)."""
        vol = self.vol
        vol._check_open()
        with vol._mgmt:
            img = vol._img(image_index)
            self.check_idle("split")
            if img.state is not ImageState.IN_SYNC:
                raise StateError(f"volume {vol.name}: image {image_index} is {img.state.value}, "
                                 f"only an in-sync image can be split")
            self._check_not_last(img, image_index)
            vol.control.refuse_if_restoring("split")
            # regions the images may differ on (crash recovery still copying, a write that
            # found no space): copy them first, so the split image holds what reads returned
            torn = vol._settle_torn() if vol._torn else 0
            with vol._meta:
                bm = RegionBitmap(vol.size, vol.region_size)
                if torn:        # still differing (no space): a resync copies them back
                    with vol._elock:
                        for r in vol._torn:
                            bm.mark_region(r)
                gen = vol._bump()
                p = PendingSplit(image_index, img, bm, gen)
                bm.save(vol._bitmap_path(img))
                img.split_busy = p
                img.rec.error = None
                img.rec.split_time = time.time()
                img.rec.generation = gen
                img.rec.copy_id = None      # recorded anew once the split is done
                try:
                    vol._save_md()      # the image is saved as split (Leg.sync_rec)
                except BaseException:
                    img.split_busy = None
                    raise
            return p

    def _check_not_last(self, img, image_index):
        vol = self.vol
        if not any(o is not img and o.state is ImageState.IN_SYNC and o.storage is not None
                   and o.split_busy is None for o in vol._images):
            raise StateError(f"volume {vol.name}: image {image_index} is the last in-sync "
                             f"image; splitting it would leave no live copy")

    def switch(self, p: PendingSplit) -> float:
        """Step 2, the instant T; returns T (seconds since the epoch). StateError when the
        image is no longer in sync or no other in-sync image is left (an image failed since
        ``prepare``): then ``abort``."""
        vol, img = self.vol, p.img
        with vol._meta:
            if img.split_busy is not p or p.split_time is not None:
                raise StateError(f"volume {vol.name}: image {p.index} has no prepared split")
            if img.state is not ImageState.IN_SYNC:
                raise StateError(f"volume {vol.name}: image {p.index} became {img.state.value} "
                                 f"before the split")
            self._check_not_last(img, p.index)
            img.bitmap = p.bitmap
            img.state = ImageState.SPLIT
            # ---- T ----
            t = time.time()
            p.epoch = vol._switch_epoch()
            p.split_time = img.rec.split_time = t
        return t

    def abort(self, p: PendingSplit) -> None:
        """Undo a prepared split that did not reach T: the image stays in sync (it took every
        write) and is saved so. Idempotent; a split past T is left alone (``finish`` it)."""
        vol, img = self.vol, p.img
        with vol._meta:
            if img.split_busy is not p or p.split_time is not None:
                return
            img.split_busy = None
            vol._save_md()

    def finish(self, p: PendingSplit) -> SplitInfo:
        """Step 3: wait for the I/O begun before T (it completes to the split image too), then
        save the split as done once that data is durable on the image (the durability
        barrier). Returns the SplitInfo (index, path, T, generation, I/Os drained).

        StateError: the split did not reach T, a write begun before T is still in flight on the
        image's device ``legs.STUCK_IO_WAIT`` seconds after the drain (left behind as slow,
        ``leg_timeout``), or the image's flush failed or outlasted ``_flush_limit``: the image
        is failed then (``_fail_unsettled``)."""
        vol, img = self.vol, p.img
        if p.split_time is None:
            raise StateError(f"volume {vol.name}: the split of image {p.index} did not reach T")
        try:
            drained = vol._drain(p.epoch)
            if img.stuck_io:
                stuck = img.wait_stuck(legs.STUCK_IO_WAIT)
                if stuck:
                    self._fail_unsettled(p, (
                        f"{stuck} I/O(s) (writes or flushes) begun before the split were still "
                        f"in flight on its device {legs.STUCK_IO_WAIT:g} s after the volume "
                        f"completed them without it (failed as slow, leg_timeout); it would "
                        f"change the point-in-time copy when it lands"))
            why = vol._barrier.commit([img], lambda durable: self._done(p, durable),
                                      what="split done", limit=vol._flush_limit)
            if why is UNANSWERED:
                answer_unanswered(vol, img, "the split done")
            if why is not None:
                self._fail_unsettled(p, why)
            self._record_copy(p)
        finally:
            with vol._meta:
                if img.split_busy is p:
                    img.split_busy = None
        p.done = True
        return SplitInfo(index=p.index, path=img.rec.path, split_time=p.split_time,
                         generation=p.generation, drained=drained)

    def _record_copy(self, p: PendingSplit) -> None:
        """Record the identity of the split copy (``copyid.record_leg``: its stat fields and a
        content sample, read bounded by ``leg_timeout``) and save it, once the split is done
        and before ``split_busy`` is cleared, so no export has written the copy yet. A crash
        before the save leaves no identity: the image is then not checked, as one split by an
        older lvmirror. A save that fails is logged; the identity is saved with the next
        change."""
        vol, img = self.vol, p.img
        st = img.storage
        if st is not None:
            # a flush that failed before the split and was answered (the image failed with
            # every region it may have lost marked, copied again by its resync:
            # flush_failures_seen) does not doubt the copy; one counted but not answered yet
            # (another thread's, failing as the split ran) does, as any later one
            img.split_flush_base = (st, st.flush_failures_seen)
        ident = copyid.record_leg(vol, img)
        with vol._meta:
            if img.state is not ImageState.SPLIT or img.rec.split_time != p.split_time:
                return
            img.rec.copy_id = ident
            try:
                vol._save_md()
            except OSError as e:
                log.warning("volume %s: image %d: the split copy's identity not saved: %s",
                            vol.name, p.index, e)

    def _done(self, p: PendingSplit, durable) -> str | None:
        """The barrier's persist step of ``finish``: save the split as done if the image's
        flush succeeded and no I/O failed on it since T (``p.lost``, set under the volume's
        metadata lock); returns None if it did, else why not."""
        vol = self.vol
        with vol._meta:
            if p.img not in durable:
                return f"its flush failed ({p.img.rec.error}); what it holds is not durable"
            if p.lost:
                return (f"an I/O begun before the split failed on it ({p.lost}); the copy "
                        f"may lack it")
            if unanswered(p.img):
                # another thread's flush (the flusher's) took a writeback error that is not
                # marked for yet: this flush's success proves nothing (one fdatasync gets
                # the error; durability.not_durable, trial 22; this stop's review). ``finish``
                # answers it (every region marked) before failing the image
                return UNANSWERED
            vol._save_md()
        return None

    def _fail_unsettled(self, p: PendingSplit, why: str) -> None:
        """A split past T whose image is no frozen copy (``why``: a write begun before T still
        in flight on its device, or its flush failed or did not end): it is failed (persisted,
        logged at error priority) with its change bitmap (writes since T, and the range of
        each write it was left behind by) plus every region it may hold only in a volatile
        cache (``_mark_unflushed``); a resync copies them once the device answers. Raises
        StateError saying so."""
        vol, img = self.vol, p.img
        with vol._meta:
            if img.state is ImageState.SPLIT:
                img.rec.split_time = None
                vol._fail_leg(img, img.bitmap, False, f"image {img.rec.path}: {why}",
                              lambda: log.error(
                                  "volume %s: image %d (%s) failed instead of split: %s; %d "
                                  "bytes to resync once the device answers", vol.name, p.index,
                                  img.rec.path, why, img.bitmap.dirty_bytes()))
        raise StateError(f"volume {vol.name}: image {p.index} ({img.rec.path}) was not split: "
                         f"{why}. The image is failed; resync it once its device works again "
                         f"(answers, has space)")

    def export(self, image_index, *, checked=False) -> SplitImageVolume:
        """A block device view of split image ``image_index`` (to export the point-in-time copy
        as its own LUN). Writes to it are allowed (a file system journal replay needs them) and
        are marked in the image's change bitmap first, so resync / restore still copy every
        region where it differs from the live volume. Resync and restore of the image are
        refused while it is exported; ``close()`` the view to end the export. StateError when
        the image is not split, already exported, a restore from it is unfinished, or the file
        at its path is not the copy its split recorded (``JobControl.check_copy``, judged
        before the management lock: the LUN would serve another file as the point-in-time
        copy, and the export's end would record that file as the copy - trial 32, HIGH 1).
        ``checked``: the caller judged it just before with no lock held (``daemon.registry``:
        a LUN's open judges it before the registry's lock, which its sample reads, each bounded
        by ``leg_timeout``, would hold for every other LUN's open and for status - trial 33,
        MEDIUM 2)."""
        vol = self.vol
        vol._check_open()
        if not checked:
            vol.control.check_copy(image_index, EXPORT_DOING)
        with vol._mgmt:
            img = vol._img(image_index)
            if img.state is not ImageState.SPLIT or img.storage is None \
                    or img.split_busy is not None:
                raise StateError(f"volume {vol.name}: image {image_index} is {img.state.value}; "
                                 f"only a split image can be exported")
            if img.exported:
                raise StateError(f"volume {vol.name}: split image {image_index} is already "
                                 f"exported")
            if vol.control.restore_job is not None and vol.control.restore_job.img is img:
                raise StateError(f"volume {vol.name}: a restore from image {image_index} is "
                                 f"unfinished")
            if img.rec.copy_id and not img.rec.copy_id.get("exported"):
                # its LUN's writes change the file (its mtime): the copy's identity is
                # recorded again when the export ends (copyid; SplitImageVolume.close)
                with vol._meta:
                    img.rec.copy_id = dict(img.rec.copy_id, exported=True)
                    vol._save_md()
            img.exported += 1
            return SplitImageVolume(vol, img, image_index)

