"""The durability barrier: the one place where lvmirror orders data before the state vouching for it.

The rule (md learned it the hard way; DRBD's activity log and dm-raid's dirty log keep the same
order): **a piece of persistent state that says data is safe - a cleared change-bitmap or
write-intent bit, a resync or restore cursor, an image marked in sync, a split marked done - is
written only after the data it vouches for is durable on every image it concerns.**

Data written to an image with ``pwritev`` sits in the page cache (or a disk's volatile write
cache) until ``fdatasync``; a power cut drops it while every metadata file lvmirror saves is
already durable (``bitmap.atomic_write``: temp file, fsync, rename, fsync dir). Saving the state
first would leave, after the cut, state that says "copied" over data that is not there: a resync
that ends "done" over stale regions, a restore that skipped a region, a write-intent bit cleared
over images that differ.

Every such save in the mirror engine goes through ``DurabilityBarrier.commit``:

1. the caller takes a *snapshot* of the state to persist (a copy of a bitmap, a cursor) before
   the barrier, so a bit cleared by a copy that finishes during the flush is never saved ahead
   of its data;
2. ``commit`` flushes (``fdatasync``) every image the state concerns, in parallel on the images'
   worker threads;
3. an image whose flush fails is handed to ``on_error`` (the volume fails it and marks every
   region in its change bitmap, so nothing it holds is vouched for; the last in-sync image is
   not failed but takes the volume offline, and ``persist`` then vouches for nothing on it
   (``not_durable``): the checkpoint keeps its write-intent bits, a close does not mark the
   volume clean, a restore records no region as restored, a scrub saves no record past its
   repairs, a resync does not copy from it); so is one whose flush
   outlasts the caller's ``limit`` (the volume bounds an image that serves no reads,
   ``MirrorVolume._flush_limit``), its flush then counted as left behind on its device;
4. then ``persist(durable)`` runs with the images whose flush succeeded, and writes the snapshot.

Who commits what (``MirrorVolume`` and its jobs):

=========================  =============================  ====================================
state written              images made durable first      site
=========================  =============================  ====================================
(a copy's sources)         every in-sync image            resync start, once older epochs
                                                          drained, when one of them wrote one
                                                          image without write-intent bits,
                                                          and first after an open
                                                          (``sources_durable``)
resync cursor + bitmap     the syncing target             resync checkpoint, pause
image marked in sync       the syncing target             resync finish
restore begun (its bitmap) every image with storage       restore start: the regions it
                                                          leaves out hold the split's data
restore bitmap (cleared)   every live image               restore batch, on-demand restore
restore done, split bitmap every live image               restore finish
split marked done          the split image                split
write-intent bits cleared  every image with storage       checkpoint (flusher), close
change bitmaps (lazy)      every image with storage       checkpoint (flusher), close
crash-recovery done        every in-sync image            open after a crash (``recovery``)
=========================  =============================  ====================================

Backups (``lvmirror.backup``) fsync the copy and its directory before they report done.

A failed image is the other side of the rule: it is never flushed again, so nothing may vouch
for what it holds only in a volatile cache. Its change bitmap marks, from the failure on, every
region written since every image last flushed (the write-intent log's regions; for a syncing
image also its bitmap as its resync last saved it) and each write of an older epoch that lands
on it afterwards (``MirrorVolume._mark_unflushed``, ``_mark_late``): a re-add resyncs them.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from lvmirror.errors import ImageIOError
from lvmirror.mirror.legs import BoundedIO, ImageState

__all__ = ["DurabilityBarrier", "not_durable", "unanswered", "answer_unanswered"]

log = logging.getLogger(__name__)


class DurabilityBarrier:
    """Flush images, then persist the state that vouches for their data (module docstring).

    ``on_error(img, exc)`` is called (from the committing thread) for every image whose flush
    raised ImageIOError; it is expected to fail the image so nothing vouches for it. Images are
    the volume's runtime image objects: ``.storage`` (a StorageImage or None) and ``.worker``
    (an object with ``submit(fn, arg)`` returning a completion with ``wait()`` -> exception or
    None, or None to flush on the calling thread).
    """

    def __init__(self, name: str, on_error):
        self.name = name
        self._on_error = on_error
        self._lock = threading.Lock()
        self.commits = 0          # state writes ordered behind a flush
        self.flushes = 0          # image flushes issued for them

    def flush(self, images, limit=None) -> list:
        """fdatasync every image of ``images`` that has storage, in parallel; returns the ones
        whose data is now durable (the others went to ``on_error``).

        ``limit(image)``: seconds to wait for that image's flush, or None (no limit). An image
        with a limit is flushed on its worker; still busy past it, its flush is given up on,
        counted as left behind on its device (``legs.BoundedIO``: a resync of the image waits
        for it) and handed to ``on_error`` as ImageIOError(ETIMEDOUT): a device that stopped
        answering then fails the image instead of holding the caller without limit."""
        targets = [im for im in images if im.storage is not None]
        pending = []
        errors = []
        inline = []
        bounded = []
        for im in targets:
            seconds = limit(im) if limit is not None and im.worker is not None else None
            if seconds is not None:
                bio = BoundedIO(getattr(im, "late_error", None))
                im.worker.submit_to(_bounded_flush, (im.storage, bio), bio)
                bounded.append((im, bio, seconds))
            elif im.worker is not None and len(targets) > 1:
                pending.append((im, im.worker.submit(_flush, im.storage)))
            else:
                inline.append(im)
        for im in inline:
            try:
                im.storage.flush()
            except ImageIOError as e:
                errors.append((im, e))
        for im, comp in pending:
            exc = comp.wait()
            if exc is None:
                continue
            if isinstance(exc, ImageIOError):
                errors.append((im, exc))
            else:
                raise exc
        t0 = time.monotonic()
        gone = []
        for im, bio, seconds in bounded:
            if bio.wait(max(seconds - (time.monotonic() - t0), 0.0)):
                pass
            elif bio.cancel():
                # never begun: its worker's threads are busy with I/O left behind on the
                # device (that is counted already), or stopped (the image was detached)
                if im.worker is None or not im.worker.running:
                    gone.append(im)
                    continue
                errors.append((im, _given_up(im, f"flush not begun after {seconds:.2f} s (its "
                                                  f"worker threads busy with earlier I/O)")))
                continue
            elif bio.give_up(im.storage.device):
                errors.append((im, _given_up(im, f"flush still busy after {seconds:.2f} s")))
                continue
            if bio.exc is not None:
                if not isinstance(bio.exc, ImageIOError):
                    raise bio.exc
                errors.append((im, bio.exc))
        with self._lock:
            self.flushes += len(targets)
        bad = set()
        for im, e in errors:
            log.error("volume %s: flush of image %s failed: %s; nothing on it is vouched for",
                      self.name, getattr(getattr(im, "rec", None), "path", im), e)
            self._on_error(im, e)
            bad.add(im)
        return [im for im in targets if im not in bad and im not in gone]

    def commit(self, images, persist, *, what: str = "state", limit=None):
        """Make ``images`` durable, then call ``persist(durable_images)`` and return its result.

        ``persist`` writes state already snapshotted by the caller. ``what`` names the state for
        the log; ``limit`` as in ``flush``. Exceptions from ``persist`` (OSError of a metadata
        save) propagate: the state was not written, which is always safe (the older state
        claims less)."""
        durable = self.flush(images, limit)
        result = persist(durable)
        with self._lock:
            self.commits += 1
        return result

    @property
    def stats(self) -> dict:
        """{"commits": int, "flushes": int} since the volume opened."""
        with self._lock:
            return {"commits": self.commits, "flushes": self.flushes}


def not_durable(flushed, durable) -> list:
    """The images of ``flushed`` whose flush did not make them durable (absent from
    ``durable``, the list a barrier's ``persist`` is given) and that still count: not FAILED.
    A failed flush fails its image - except the volume's last in-sync image, which is kept and
    takes the volume offline instead (``MirrorVolume._image_error``). Its data may be lost,
    so a ``persist`` that vouches for what it holds (the write-intent log cleared, a clean
    shutdown, regions recorded as restored or repaired) must not save when this is not empty.
    (Found for the checkpoint in stop 46, then for close, the restore's progress and end, and
    the scrub's record.) Also a live image whose flush failed in another thread, not yet
    marked for by the volume (``StorageImage.flush_failures`` ahead of
    ``flush_failures_seen``): its own flush here may have succeeded only because that one took
    the error (trial 22). A split image counts while its split is under way (``split_busy``:
    its failure still fails it, with its marks, and the write-intent log must keep them until
    then; this stop's second review, HIGH); a split done does not (an export's flush failures
    are its own: what its LUN wrote is marked before it is written)."""
    return [im for im in flushed if im.state is not ImageState.FAILED and (
        im not in durable or ((im.state is not ImageState.SPLIT or
                               getattr(im, "split_busy", None) is not None)
                              and im.storage is not None and
                              im.storage.flush_failures != im.storage.flush_failures_seen))]


def unanswered(im) -> bool:
    """True when a flush of image ``im`` failed in another thread and the volume has not
    marked for it yet (``StorageImage.flush_failures`` ahead of ``flush_failures_seen``): a
    flush here that returned 0 proves nothing then (Linux reports a writeback error to one
    fdatasync only), so no state that vouches for ``im``'s data may be saved on it
    (``not_durable``'s rule, for a persist that judges one image)."""
    st = im.storage
    return st is not None and st.flush_failures != st.flush_failures_seen


def answer_unanswered(vol, im, what: str) -> None:
    """Do what the thread whose flush of ``im`` failed is about to do, since ``what`` (the
    state a persist would have saved) was not saved for it: ``MirrorVolume._flush_failed`` -
    the image failed (a split under way not done) with every region marked, the failure
    counted as answered - so the caller's job ends instead of waiting, and a later resync
    copies every region again. Call it with no lock held (it drops the image's cache)."""
    st = im.storage
    if st is None:
        return
    vol._flush_failed(im, ImageIOError(
        st, errno.EIO, f"image {st.path}: a flush of it failed in another thread before "
                       f"{what} could be saved: nothing on it is vouched for",
        op="flush", offset=None, length=0))


def _flush(storage):
    storage.flush()


def _given_up(im, what):
    """The ImageIOError of a flush of ``im`` given up on as slow (``what`` says how)."""
    return ImageIOError(im.storage, errno.ETIMEDOUT,
                        f"image {im.storage.path}: {what}: failed as slow", op="flush",
                        offset=None, length=0, slow=True)


def _bounded_flush(arg):
    storage, bio = arg
    if bio.start():
        storage.flush()
