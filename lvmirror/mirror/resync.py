"""ResyncJob / RestoreJob: bitmap-driven region copies that run while the volume serves I/O.

Both copy one region at a time under an exclusive range lock on the region's LBAs from
``vol.locks`` (so no write to the region can interleave with the copy), with an optional rate
limit (token bucket in MB/s, changeable while running), progress (bytes done / total, rate,
ETA), ``cancel()`` and ``wait()``.

ResyncJob (target: a syncing image, source: an in-sync image). The target already receives
every new write, so a copied region stays current; bits are only cleared by the job, so the
bitmap saved at each checkpoint (every 64 regions or second) is a superset of what is left:
after a restart ``MirrorVolume.open`` resumes from it. When the bitmap is empty the image turns
in-sync in the same step as the epoch swap that lets reads use it. ``cancel()`` leaves the
image 'syncing' (receiving writes, serving no reads) with its bitmap: ``vol.resync(i)``
resumes it; ``stop()`` (used by ``vol.close``) is the same but the next open resumes by itself.

RestoreJob (source: a split image, targets: every live image). See ``MirrorVolume.restore``
for the semantics. A region is recorded as restored (its bit cleared in the restore bitmap on
disk) only after the restored data is durable on every live image (``JobControl
.commit_restored``, the durability barrier): the background copy commits in batches (every
CHECKPOINT_REGIONS regions or CHECKPOINT_SECONDS) and keeps a copied region's bit set until its
batch commits, so an I/O arriving meanwhile restores it again (the same data) and commits it
itself; a region restored on demand for an I/O is committed before that I/O goes on. So after a
crash a resumed restore re-copies only regions no newer write has touched, and never skips a
region whose restored data did not survive. A restore begins only once the live images are
durable (``JobControl.restore``), so when the last in-sync image later loses data (its flush
failed: the volume goes offline) only writes made since can be gone, and a region copied but
not yet committed is copied again (``RestoreJob.add_lost``, ``_Losses.lost_gen``).

Both ask the kernel to read ahead of the copy (``_read_ahead``: POSIX_FADV_WILLNEED on the
source for the next READAHEAD bytes of marked regions, on the source's worker), so the source's
reads overlap the target's writes, as md's resync keeps reads and writes in flight together
(drivers/md/raid1.c, RESYNC_DEPTH). Only a hint: each region is still read under its lock.

Resync progress is committed the same way: the bitmap and cursor saved at each checkpoint
(every CHECKPOINT_REGIONS regions or CHECKPOINT_SECONDS) say "copied" only for regions already
durable on the target.
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import threading
import time

from lvmirror.errors import ImageIOError, LvmirrorError, StateError, VolumeIOError
from lvmirror.mirror import legs
from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.image import PREFETCH_CHUNK, StorageImage
from lvmirror.mirror.metadata import VolumeMetadata

__all__ = ["ResyncJob", "RestoreJob", "check_rate", "job_progress"]

CHECKPOINT_REGIONS = 64
CHECKPOINT_SECONDS = 1.0
# bytes of marked regions a copy asks the kernel to read ahead of itself on its source
READAHEAD = 4 << 20
RATE_RECHECK = 0.25             # seconds: the longest a rate-limited copy waits unchecked
FINISH_RETRY = 0.05             # seconds a resync waits after its end was refused (finish_resync)
# bytes between the bytes ``all_zero`` looks at before it compares a whole region
ZERO_PROBE_STRIDE = 4096
MB = 1_000_000

log = logging.getLogger(__name__)


def job_progress(job, **extra) -> dict:
    """A copy job's figures for status displays: kind, image_id, state, bytes_done,
    bytes_total, rate (MB/s), elapsed (s, the run time so far or in all once it ended),
    eta_seconds (None when unknown), error, resumes (it stopped because the volume went
    offline and goes on once it is back: ``stopped_offline``), and ``extra``. ``job`` has those attributes and
    ``_t0`` / ``_t_end`` (monotonic start and end, None until set)."""
    now = job._t_end or time.monotonic()
    elapsed = (now - job._t0) if job._t0 else 0.0
    rate = job.bytes_done / elapsed / MB if elapsed > 0 else 0.0
    left = max(job.bytes_total - job.bytes_done, 0)
    eta = 0.0 if job.state != "running" else (left / (rate * MB) if rate > 0 else None)
    return dict(kind=job.kind, image_id=job.image_id, state=job.state,
                bytes_done=job.bytes_done, bytes_total=job.bytes_total, rate=rate,
                elapsed=elapsed, eta_seconds=eta, error=job.error,
                resumes=bool(getattr(job, "stopped_offline", False)), **extra)


class _Job:
    kind = "job"

    def __init__(self, vol, img, rate_limit):
        self.vol = vol
        self.img = img                  # None for a job over the whole volume (a scrub)
        self.image_id = img.rec.id if img is not None else None
        self._rate = None
        self._tokens = 0.0
        self._t_tokens = time.monotonic()
        self.set_rate_limit(rate_limit)
        self._cancel = threading.Event()
        self._stopping = False
        self._done = threading.Event()
        self._thread = None
        self.state = "running"
        # it stopped because the volume went offline (WentOffline): the probe that brings
        # the volume back starts it again (``JobControl.resume_after_offline``)
        self.stopped_offline = False
        # started by ``resume_after_offline`` (taking up a job stopped so): its own I/O
        # failing again before it copied anything stops it for good (``_stopped_by_offline``)
        self.resumed_after_offline = False
        self.error: str | None = None
        self.bytes_done = 0
        self.bytes_total = 0
        self._t0 = None
        self._t_end = None
        self.phase_seconds: dict[str, float] = {}   # where a finished job spent its time
        self._copied: RegionBitmap | None = None     # the regions copied once (_count_copy)
        self._count_mu = threading.Lock()

    def _count_copy(self, r: int, ln: int) -> None:
        """Count a copy of region ``r`` (``ln`` bytes) in ``bytes_done``. A region this job
        copies again (a resync's region marked anew behind its cursor; a restore's region an
        I/O restored before the background copy's batch committed it, or one a loss marked
        again) adds to ``bytes_total`` as well, so progress never shows more done than in all
        (trials 28, 29)."""
        with self._count_mu:
            if self._copied is None:
                self._copied = RegionBitmap(self.vol.size, self.vol.region_size)
            if not self._copied.mark_region(r):
                self.bytes_total += ln
            self.bytes_done += ln

    # -- control ----------------------------------------------------------------------------------

    def set_rate_limit(self, mb_per_s):
        """Limit the copy to ``mb_per_s`` MB/s (None or 0: unlimited); takes effect at once.
        ValueError as ``check_rate``."""
        mb_per_s = check_rate(mb_per_s)
        self._rate = float(mb_per_s) * MB if mb_per_s else None
        self._t_tokens = time.monotonic()
        self._tokens = 0.0

    @property
    def rate_limit(self):
        """The copy's rate limit in MB/s (10^6 bytes a second), None when unlimited."""
        return self._rate / MB if self._rate else None

    def cancel(self):
        """Stop after the region being copied; the image keeps its bitmap."""
        self._cancel.set()

    def stop(self):
        """Like cancel, but the job resumes on the next open (volume close)."""
        self._stopping = True
        self._cancel.set()

    @property
    def cancelled_by_request(self) -> bool:
        """``cancel`` or ``stop`` was asked of it (a job so stopped is never taken up after
        the volume comes back online: ``JobControl._take_resume``)."""
        return self._cancel.is_set()

    def wait(self, timeout=None) -> bool:
        """Wait for the job to end; True if it ended."""
        return self._done.wait(timeout)

    def is_alive(self) -> bool:
        """True from ``start`` until the job is done, failed or cancelled."""
        return self._thread is not None and not self._done.is_set()

    def progress(self) -> dict:
        """See ``job_progress``; plus rate_limit (MB/s or None)."""
        return job_progress(self, rate_limit=self.rate_limit)

    def _throttle(self, nbytes):
        """Wait until the rate limit lets ``nbytes`` more bytes be copied, or the job is
        cancelled. The wait is sliced (at most RATE_RECHECK seconds) so a rate set meanwhile
        (``set_rate_limit``, "takes effect at once") applies to the copy waiting now too."""
        while self._rate and not self._cancel.is_set():
            now = time.monotonic()
            self._tokens = min(self._tokens + (now - self._t_tokens) * self._rate,
                               max(self._rate * 0.1, nbytes))
            self._t_tokens = now
            if self._tokens >= nbytes:
                self._tokens -= nbytes
                return
            self._cancel.wait(min((nbytes - self._tokens) / self._rate, RATE_RECHECK))

    def _start_thread(self, name, *args) -> None:
        """Run ``self._run(*args)`` on a daemon thread named ``name``. A thread that cannot
        start (RuntimeError: no thread left, systemd's TasksMax) ends the job as failed before
        the error is raised to the caller, so nothing - ``close`` above all, which waits for
        every job - waits for a job whose thread never ran (review of this stop, HIGH)."""
        # published before it starts: the copy's own code tells its thread by it
        self._thread = threading.Thread(target=self._run, args=args, daemon=True, name=name)
        try:
            self._thread.start()
        except BaseException as e:
            self._finish("failed", f"its thread did not start: {type(e).__name__}: {e}")
            raise

    def _fail(self, error):
        """End the job as failed with ``error`` (a str for status) and say so in the journal:
        the cause (an image's I/O error, a flush that failed) is logged where it happens, but
        only this line says the copy stopped and its image is left as it was (a resync's
        target still syncing, a restore registered to resume)."""
        done = f"{self.bytes_done} of {self.bytes_total} bytes"
        log.error("volume %s: %s of image id %s (%s) failed after %s: %s", self.vol.name,
                  self.kind, self.image_id, self.img.rec.path, done, error)
        self._finish("failed", error)

    def _finish(self, state, error=None):
        self.state = state
        self.error = error
        self._t_end = time.monotonic()
        self._done.set()


class _Checkpoints:
    """A resync's checkpoints, made beside its copy: one at a time on a thread of its own, so
    the copy goes on writing while the checkpoint's flush makes the regions copied before it
    durable (the copy stood still for each flush before: 42 % of a full resync's time on the
    host, 1 GiB on ext4). ``commit(next_region)`` is ``JobControl.checkpoint_resync``: it
    snapshots the bitmap, then flushes the target, then saves the snapshot, so a region the
    copy clears meanwhile is saved only by a later checkpoint, after its own flush (the
    durability rule is the same as when the copy waited). A checkpoint's error is raised by
    the copy's next ``start`` or ``wait``, which end the job as before (``pause_resync`` and
    failed); the job waits for the one in flight before it pauses or finishes, so a late
    checkpoint never saves over what those save (its cursor would resume a resync cancelled
    for good)."""

    def __init__(self, name: str, commit):
        self._name = name
        self._commit = commit
        self._thread = None
        self._error = None

    def start(self, next_region: int) -> bool:
        """Begin a checkpoint of the copy up to ``next_region`` (the cursor saved with it);
        False when the previous one still runs (the copy asks again after its next region).
        Raises the previous checkpoint's error."""
        if self._thread is not None:
            if self._thread.is_alive():
                return False
            self.wait()
        t = threading.Thread(target=self._run, args=(next_region,), daemon=True,
                             name=self._name)
        t.start()               # RuntimeError (no thread left: TasksMax) ends the job as failed
        self._thread = t        # only once started: ``wait`` joins a thread that ran
        return True

    def _run(self, next_region):
        try:
            self._commit(next_region)
        except BaseException as e:        # raised in the copy's thread by ``wait``
            self._error = e

    def wait(self, *, quiet: bool = False) -> None:
        """Wait for the checkpoint in flight (if any) to end; raise its error unless
        ``quiet`` (the job is failing already and says why)."""
        t, self._thread = self._thread, None
        if t is not None:
            t.join()
        e, self._error = self._error, None
        if e is not None and not quiet:
            raise e


def check_rate(mb_per_s):
    """A copy's rate limit in MB/s as stored and used: None (unlimited) for None, 0 or infinity,
    else the number. ValueError for anything else - a negative number, NaN, a bool or a
    non-number - before a caller saves it: a rate is checked before any state that names it is
    written (a bad rate saved with a job would stop the volume from opening)."""
    if mb_per_s is None:
        return None
    if isinstance(mb_per_s, bool) or not isinstance(mb_per_s, (int, float)) \
            or math.isnan(mb_per_s) or mb_per_s < 0:
        raise ValueError(f"rate limit must be a non-negative number of MB/s (0: unlimited), "
                         f"got {mb_per_s!r}")
    return None if mb_per_s == 0 or math.isinf(mb_per_s) else mb_per_s


class ResyncJob(_Job):
    """Copy the regions marked in a syncing image's bitmap from an in-sync image."""

    kind = "resync"

    def __init__(self, vol, img, *, full, rate_limit=None):
        super().__init__(vol, img, rate_limit)
        self.full = full
        self.bitmap = img.bitmap
        self.bytes_total = self.bitmap.dirty_bytes()

    def start(self, epoch):
        """Start the copy on a thread of its own; it first waits for the writes of epochs
        before ``epoch`` (the volume's epoch when the job was created) to finish."""
        self._start_thread(f"{self.vol.name}-resync{self.image_id}", epoch)

    def _run(self, epoch):
        self._t0 = time.monotonic()
        vol, img, bm = self.vol, self.img, self.bitmap
        ckpt = _Checkpoints(f"{vol.name}-resync{self.image_id}-ckpt",
                            lambda nxt: vol.control.checkpoint_resync(img, nxt))
        try:
            # Writes of older epochs may still mark this image's bitmap: let them finish.
            vol._drain(epoch)
            # the copy's sources durable before anything vouches for a copy of what older
            # epochs wrote to them without a write-intent bit (durability.py)
            vol.sources_durable(epoch)
            t_copy = time.monotonic()
            self.phase_seconds["drain"] = t_copy - self._t0
            buf = StorageImage.aligned_buffer(vol.region_size)
            self._zero = bytes(vol.region_size)     # for ``all_zero``
            last_ck, since_ck = time.monotonic(), 0
            while True:
                for r in _read_ahead(bm, vol, lambda: _first_in_sync(vol)):
                    if self._cancel.is_set():
                        break
                    if img.state.value != "syncing":
                        raise _TargetFailed(img.rec.error or "target image failed")
                    _check_online(vol, "resync")
                    self._copy(r, buf)
                    since_ck += 1
                    if (since_ck >= CHECKPOINT_REGIONS or
                            time.monotonic() - last_ck >= CHECKPOINT_SECONDS) and \
                            ckpt.start(r + 1):
                        last_ck, since_ck = time.monotonic(), 0
                if self._cancel.is_set():
                    ckpt.wait()
                    vol.control.pause_resync(img, keep_resume=self._stopping)
                    self._finish("cancelled")
                    return
                if img.state.value != "syncing":
                    raise _TargetFailed(img.rec.error or "target image failed")
                if bm.count() == 0:
                    _check_online(vol, "resync")
                    ckpt.wait()
                    t_commit = time.monotonic()
                    if vol.control.finish_resync(img, self):
                        self.phase_seconds["copy"] = t_commit - t_copy
                        self.phase_seconds["commit"] = time.monotonic() - t_commit
                        # logged before the job reports done: a waiter finds the line
                        log.info("volume %s: resync of image %d done: %d bytes in %.2f s "
                                 "(drain %.2f s, copy %.2f s, commit %.2f s)", vol.name,
                                 vol._images.index(img), self.bytes_done,
                                 time.monotonic() - self._t0, self.phase_seconds["drain"],
                                 self.phase_seconds["copy"], self.phase_seconds["commit"])
                        self._finish("done")
                        return
                    # refused: a region marked again, or the image failed meanwhile (a flush
                    # of it failed in another thread: ``finish_resync`` answered it): look
                    # again shortly, not in a loop of flushes
                    self._cancel.wait(FINISH_RETRY)
        except _TargetFailed as e:
            ckpt.wait(quiet=True)
            self._fail(f"target image failed: {e}")
        except Exception as e:  # report, never kill the daemon
            # set first: a probe while the checkpoint in flight ends must find it (trial of
            # 2026-12-06); cancelled meanwhile, it is a cancel, which it stays
            self.stopped_offline = _stopped_by_offline(self, e)
            ckpt.wait(quiet=True)
            if self.cancelled_by_request:            # cancelled as it waited: a cancel
                self.stopped_offline = False
            try:
                # stopped by the volume going offline: resumed once it is back (and on the
                # next open, if it closes first)
                vol.control.pause_resync(img, keep_resume=self.stopped_offline)
            except Exception:
                pass
            self._fail(str(e) if isinstance(e, WentOffline) else f"{type(e).__name__}: {e}")
        finally:
            if not self._done.is_set():     # never left "running" (close waits for the job)
                self._finish("failed", "the resync's thread ended without a result")

    def _copy(self, r, buf):
        vol, img, bm = self.vol, self.img, self.bitmap
        off, ln = bm.region_range(r)
        self._throttle(ln)
        bs = vol.block_size
        lk = vol.locks.lock(off // bs, ln // bs, owner=self)
        try:
            if not bm.test_region(r):
                return
            view = buf[:ln]
            # the volume going offline from here on (a flush of the source that failed may
            # have dropped what this copy reads) marks this region again: keep its bit then.
            # Sampled under the metadata lock and only while online: a failure while already
            # offline marks again without counting (trial 16), so a copy begun offline never
            # clears its bit
            with vol._meta:
                offline_seen = None if vol.offline is not None else vol.stats_offline_events()
            ep = vol._enter()
            try:
                t_read = time.monotonic()
                _read_from_in_sync(vol, ep, off, ln, view)
                t_read = time.monotonic() - t_read
                try:
                    # an all-zero region: deallocated (reads back as zeroes), so a thin image
                    # stays thin and the copy costs no writes
                    zero = all_zero(view, self._zero)
                    if vol.leg_timeout and img.worker is not None:
                        _bounded_copy_write(vol, img, off, view, zero, t_read)
                    elif zero:
                        img.storage.discard(off, ln)
                    else:
                        img.storage.writev(off, [view])
                except ImageIOError as e:
                    vol._image_error(img, e, off, ln)
                    raise _TargetFailed(str(e)) from e
                with vol._meta:
                    # A flush of the target that failed meanwhile (the flusher's round, an
                    # initiator's SYNCHRONIZE CACHE) failed the image and marked every
                    # region: this copy is not vouched for either, its bit stays set. So
                    # when the volume went offline since the read (the source's flush failed
                    # and marked the region, ``_image_error``; a probe may have brought it
                    # back meanwhile): the copy may hold data the source lost.
                    if img.state.value == "syncing" and vol.offline is None \
                            and offline_seen is not None \
                            and vol.stats_offline_events() == offline_seen:
                        bm.clear_region(r)
            finally:
                vol._leave(ep)
        finally:
            lk.release()
        self._count_copy(r, ln)


def all_zero(view, zeros=None) -> bool:
    """True when every byte of ``view`` (a contiguous memoryview of bytes, a region a copy
    read) is zero. ``zeros``: ``bytes`` of zeroes at least as long, kept by the caller.

    First the bytes every ZERO_PROBE_STRIDE apart are looked at (one byte a 4 KiB page, 256 a
    1 MiB region): a region holding data nearly always has one of them set and is answered
    without copying it. Only a region whose probed bytes are all zero is compared whole, as
    ``bytes`` (``==`` of two memoryviews unpacks every byte: 1.5 ms a MiB). The whole
    comparison copied each region once more before (``tobytes``), a fifth of the memory
    traffic of a copy whose reads and writes hit the page cache (the lab's images on a
    RAM-backed disk under emulation)."""
    ln = view.nbytes
    probe = view[::ZERO_PROBE_STRIDE].tobytes()
    if probe.count(0) != len(probe):
        return False
    if zeros is None or len(zeros) < ln:
        zeros = bytes(ln)
    return view.tobytes() == (zeros if len(zeros) == ln else zeros[:ln])


def _read_ahead(bm, vol, source):
    """Yield the region indices of bitmap ``bm``'s live ``dirty_regions`` (ascending) in order;
    before each is yielded, the marked regions after it up to READAHEAD bytes (at
    least one region) have been asked of ``source()`` (the image the copy will read them from,
    or None) into the page cache (``_prefetch``), so the copy's next reads find them there or
    on the way while it writes this one. A region cleared or marked meanwhile is handled as
    without it: the copy tests its bit under the lock, and the job's outer loop takes the
    regions marked behind the cursor."""
    depth = max(1, READAHEAD // vol.region_size)
    ahead = collections.deque()
    for r in bm.dirty_regions():
        ahead.append(r)
        _prefetch(vol, source(), *bm.region_range(r))
        if len(ahead) > depth:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


def _prefetch(vol, img, off, ln) -> None:
    """Ask the kernel to read ``ln`` bytes at ``off`` (a region) of image ``img`` into the page
    cache
    (POSIX_FADV_WILLNEED through ``StorageImage.prefetch``, in image.PREFETCH_CHUNK pieces:
    one call reads at most the device's readahead window; nothing for O_DIRECT). On the image's
    worker with nobody waiting, as the copy's reads run there (``_read_source``), so a device
    that stopped answering never holds the copy's thread in a hint: the range joins the leg's
    ``hints`` and one task at a time takes them (``_take_hints``), so such a device holds at
    most one of the worker's threads with hints, and the copy's reads, bounded and tracked
    (``Leg.hung_reads``), still find the others. Here without ``leg_timeout`` or a running
    worker, where the copy's reads are unbounded too."""
    if img is None or img.storage is None or img.storage.direct:
        return
    w = img.worker
    if not (vol.leg_timeout and w is not None and w.running):
        _hint(img.storage, off, ln)
        return
    with img.hint_mu:
        img.hints.append((off, ln))
        if img.hinting:
            return
        img.hinting = True
    w.post(lambda st: _take_hints(img, st), img.storage)


def _take_hints(img, st) -> None:
    """The worker's task for ``_prefetch``: ask for every range in ``img.hints`` until none is
    left, then let the next hint post a task again."""
    while True:
        with img.hint_mu:
            if not img.hints:
                img.hinting = False
                return
            off, ln = img.hints.popleft()
        try:
            _hint(st, off, ln)
        except Exception:                # a hint: never the worker's end
            log.debug("read-ahead hint at %d (+%d) on %s failed", off, ln, img.rec.path,
                      exc_info=True)


def _hint(st, off, ln) -> None:
    """``st.prefetch`` of ``[off, off+ln)`` in image.PREFETCH_CHUNK pieces."""
    end = off + ln
    while off < end:
        n = min(PREFETCH_CHUNK, end - off)
        st.prefetch(off, n)
        off += n


def _in_sync(reads) -> list:
    """The in-sync images of an epoch's ``reads``, in its order: a resync's sources."""
    return [im for im in reads if im.state.value == "in-sync"]


def _first_in_sync(vol):
    """The image a resync's next read goes to first (``_read_from_in_sync``): the first
    in-sync image of the volume's current epoch's reads, or None. Read without the epoch
    lock: only a hint for ``_read_ahead``."""
    sources = _in_sync(vol._epoch.reads)
    return sources[0] if sources else None


def _stopped_by_offline(job, e) -> bool:
    """Whether copy job ``job``'s error ``e`` stopped it because its volume went offline, so
    that it goes on once the volume is back: it found the volume offline (WentOffline), or
    its own I/O failed as the volume went offline (the restore's write, its commit's flush,
    the resync's first flush of its sources; trial of 2026-12-06) - but not when it was
    cancelled, when a resync's target is no longer syncing (failed: third review), nor when
    it was itself taken up after going offline and failed again before it copied anything
    (its own I/O takes the volume offline: restarted at every probe, the volume would never
    serve for long; third review, HIGH)."""
    if job.cancelled_by_request:
        return False
    img = job.img
    if isinstance(job, ResyncJob) and img is not None and img.state.value != "syncing":
        return False
    if isinstance(e, WentOffline):
        return True
    own = isinstance(e, (LvmirrorError, OSError)) and job.vol.offline is not None
    return own and not (job.resumed_after_offline and job.bytes_done == 0)


class WentOffline(StateError):
    """The volume went offline while a copy job ran (``_check_online``): the job stopped, and
    starts again when the volume is back online (``JobControl.resume_after_offline``)."""


def _check_online(vol, kind):
    """WentOffline (a StateError) when ``vol`` went offline (its last in-sync image failed a
    write or a flush) while a copy job runs: its source may have lost data, so the job stops -
    a resync with its image still syncing, a restore registered to resume - instead of copying
    on and vouching for the copies (``jobcontrol`` refuses to start one while offline for the
    same reason). It starts again from where it stopped once the probe finds the image
    answering (``JobControl.resume_after_offline``)."""
    why = vol.offline
    if why is not None:
        raise WentOffline(f"volume {vol.name} went offline ({why}); the {kind} stops until "
                          f"it is back online")


class _TargetFailed(LvmirrorError):
    pass


def _bounded_copy_write(vol, img, off, view, zero, t_read):
    """Write (or, ``zero``, discard) one region of a copy into target ``img`` on its worker and
    wait at most ``leg_timeout`` seconds longer than the source took to read it (``t_read``,
    seconds) and than the write would take at legs.MIN_DEVICE_RATE, as a write to the volume waits
    for a slow leg no longer than ``leg_timeout`` after the fastest in-sync leg (a copy has no
    other leg to compare with; the rate keeps a small ``leg_timeout`` from failing a large
    region's healthy direct write). A target still busy then is given up on: its write is left
    in flight and counted on its device (``Leg.stuck_io``: no resync copies into the image
    until it returns), and ImageIOError(ETIMEDOUT) is raised for the copy to fail the image.
    Without it a device that stopped answering held the job, and the volume's ``close`` that
    waits for the job, without limit. Raises the write's own ImageIOError too."""
    ln = view.nbytes
    st = img.storage
    cw = legs.BoundedIO()
    img.worker.submit_to((lambda s: s.discard(off, ln)) if zero
                         else (lambda s: s.writev(off, [view])), st, cw)
    allowance = ln / legs.MIN_DEVICE_RATE
    limit = vol.leg_timeout + t_read + allowance
    if not cw.wait(limit) and cw.give_up(st.device):
        raise ImageIOError(
            st, errno.ETIMEDOUT,
            f"image {img.rec.path}: a resync copy of {ln} bytes still busy after {limit:.2f} s "
            f"(leg_timeout {vol.leg_timeout:g} s + the source's read {t_read:.2f} s + "
            f"{allowance:.2f} s at {legs.MIN_DEVICE_RATE / MB:g} MB/s): failed as slow",
            op="write", offset=off, length=ln, slow=True)
    if cw.exc is not None:
        raise cw.exc


class NotRead(ImageIOError):
    """A copy's read not made because an earlier read of the same image was given up on as
    slow and has not returned (``_read_source``): ``view`` was not touched."""


def _read_source(vol, img, off, view, what: str = "a copy's read") -> None:
    """Read ``view.nbytes`` bytes at ``off`` of a copy's source ``img`` (a restore's split
    image, a resync's in-sync image: ``_read_from_in_sync``) into ``view``, waiting at most
    ``leg_timeout`` seconds plus what the read would take at legs.MIN_DEVICE_RATE: the read
    runs on the image's worker, and one still busy then is given up on - left in flight and
    counted on its device (``Leg.stuck_io``: no restore from the image starts until it
    returns, ``JobControl._restorable``) - and ImageIOError(ETIMEDOUT, ``slow``) is raised,
    which fails the copy (the job fails, so ``cancel`` and ``abandon_restore`` get their
    answer) or the initiator's I/O that needed the region (MEDIUM ERROR), as a failed read of
    the source does. Before, a source that stopped answering held the job, ``cancel`` could
    not end it and ``abandon_restore`` refused (trial 27).

    While an earlier read of the image given up on so is still in flight (``Leg.hung_reads``),
    the read is not made: NotRead (an ImageIOError) at once (trial 28: each I/O that needed a
    region waited the whole bound again behind the hung reads, so a few of them held the LUN's
    command pool past the initiators' SCSI timeout). Only reads count: a flush of the image
    given up on (the flusher's) says nothing of its reads (trial 29). A read its worker never
    began (its threads stopped, or all busy with I/O left behind) is withdrawn, not counted.
    The caller must not reuse ``view`` after a timeout: the read left behind may still fill
    it. ``what`` names the read in the errors ("a copy's read"; a restore's retry check says
    its own). Without ``leg_timeout`` (0: never) or a running worker the read is made here,
    unbounded. Raises the read's own ImageIOError too."""
    st = img.storage
    ln = view.nbytes
    w = img.worker
    if not vol.leg_timeout or w is None or not w.running:
        st.readv(off, [view])
        return
    hung = img.reads_hung()
    if hung:
        raise NotRead(
            st, errno.ETIMEDOUT,
            f"image {img.rec.path}: {hung} earlier read(s) of it given up on as slow still in "
            f"flight; not read (a read of {ln} bytes at offset {off})",
            op="read", offset=off, length=ln, slow=True)
    cw = legs.BoundedIO()

    def read(s):
        if cw.start():
            s.readv(off, [view])
    w.submit_to(read, st, cw)
    limit = vol.leg_timeout + ln / legs.MIN_DEVICE_RATE
    if cw.wait(limit):
        pass
    elif cw.cancel():
        raise ImageIOError(
            st, errno.ETIMEDOUT,
            f"image {img.rec.path}: {what} of {ln} bytes at offset {off} not begun "
            f"after {limit:.2f} s (its worker threads busy with earlier I/O, or stopped)",
            op="read", offset=off, length=ln, slow=True)
    elif cw.give_up(st.device):
        img.read_hung(cw)
        raise ImageIOError(
            st, errno.ETIMEDOUT,
            f"image {img.rec.path}: {what} of {ln} bytes at offset {off} still busy "
            f"after {limit:.2f} s (leg_timeout {vol.leg_timeout:g} s + "
            f"{ln / legs.MIN_DEVICE_RATE:.2f} s at {legs.MIN_DEVICE_RATE / MB:g} MB/s): given "
            f"up as slow", op="read", offset=off, length=ln, slow=True)
    if cw.exc is not None:
        raise cw.exc


def _read_from_in_sync(vol, ep, off, ln, view):
    """Read a region (``off``, ``ln`` bytes) from an in-sync image of ``ep`` into ``view``,
    failing images that error. Each read is bounded as a restore's read of its source is
    (``_read_source``): a source still busy after ``leg_timeout`` plus the region at
    legs.MIN_DEVICE_RATE is given up on, set aside as slow when another in-sync image can
    serve the volume (as a host read that slow sets it aside, ``MirrorVolume._slow_read``),
    and the job stops with StateError - it is not retried here, since the read left behind
    may still fill ``view``, which the job would reuse - so ``cancel`` and a volume's
    ``close`` are not held by a device that stopped answering. A read not made (NotRead: an
    earlier read of that image still hangs, ``view`` untouched) goes on to the next in-sync
    image. StateError also when no in-sync image could be read."""
    reads = _in_sync(ep.reads)
    errors = []
    for src in reads:
        try:
            _read_source(vol, src, off, view)
            return src
        except NotRead as e:
            errors.append(str(e))            # nothing read into view: the next image may
            continue
        except ImageIOError as e:
            if e.slow:
                others = sum(1 for im in ep.reads if im.state.value == "in-sync") > 1
                if others:
                    vol._slow_read(src, vol.leg_timeout, ln, error=e)
                again = ("run it again to copy from another in-sync image" if others else
                         f"image {src.rec.path} is the only in-sync image: run it again once "
                         f"its device answers")
                raise StateError(f"volume {vol.name}: the copy's source stopped answering: "
                                 f"{e}; the job stops ({again})") from e
            errors.append(str(e))
            vol._image_error(src, e, off, ln, is_read=True)
    if errors:
        raise StateError(f"volume {vol.name}: no in-sync image could be read at offset {off} "
                         f"({ln} bytes) to copy from: " + "; ".join(errors))
    raise StateError(f"volume {vol.name}: no in-sync image to copy from")


class _Losses:
    """What a restore knows of the live images' losses (``RestoreJob.add_lost``); a restore
    resumed from a stopped job keeps the same object. ``commit_lock`` serialises saves of the
    restore bitmap with the clearing of its in-memory bits; ``gen`` counts the losses and
    ``lost_gen`` maps a region to the last loss that came while its bit was set, so a commit
    keeps the bit of a copy begun before that loss (``JobControl.commit_restored``)."""

    def __init__(self):
        self.commit_lock = threading.Lock()
        self.gen = 0
        self.lost_gen: dict[int, int] = {}


class RestoreJob(_Job):
    """Copy the regions a split image's change bitmap marks from it to every live image."""

    kind = "restore"

    def __init__(self, vol, img, restore_bitmap, *, rate_limit=None):
        super().__init__(vol, img, rate_limit)
        self.bitmap = restore_bitmap
        self.bytes_total = restore_bitmap.dirty_bytes()
        # the region whose copy made the job fail (None: none did): a retry reads it first
        # (``JobControl.restore``)
        self.failed_region: int | None = None
        self.path = VolumeMetadata.restore_path(vol._vdir, img.rec.id)
        self.losses = _Losses()
        self.abandoned = False

    def abandon(self):
        """Stop every copy for good (``JobControl.abandon_restore``, the job not running): an
        I/O no longer restores the regions it touches, and a copy still waiting for its
        region lock makes none. State "abandoned"."""
        self.abandoned = True
        self.state = "abandoned"

    def start(self):
        """Start the copy back from the split image on a thread of its own."""
        self._start_thread(f"{self.vol.name}-restore{self.image_id}")

    def add_lost(self, marks) -> list[int]:
        """The live images may have lost the regions ``marks`` (a RegionBitmap) holds: the last
        in-sync image failed a flush and the volume went offline (``MirrorVolume._image_error``,
        under the volume's ``_meta``). Of those, a region whose bit is still set - not copied
        yet, or copied with its commit still to come, which the loss may have dropped - keeps
        its bit through the commit of any copy begun before now (``lost_gen``): it is copied
        again. A region whose bit is clear needs nothing: the live images were durable when the
        restore began (``JobControl.restore``) and a committed copy is durable, so the loss can
        only have dropped writes made since, which no initiator was told were durable. Returns
        the regions whose copy is to be made again."""
        L = self.losses
        with L.commit_lock:
            L.gen += 1
            again = [r for r in marks.dirty_regions() if self.bitmap.test_region(r)]
            for r in again:
                L.lost_gen[r] = L.gen
        return again

    def before_io(self, offset, length, is_read=False):
        """Called by the I/O path before it locks its range (``offset``, ``length`` in bytes;
        ``is_read``: the I/O only reads): restore any region it touches that the job has not
        copied yet, so the I/O sees (and overwrites) restored data. VolumeIOError when a
        region cannot be restored - the split image cannot be read or is missing, or no live
        image took the copy - so the I/O fails with MEDIUM ERROR (its ``is_read`` picks
        UNRECOVERED READ ERROR or WRITE ERROR) rather than see the data being rolled back."""
        bm = self.bitmap
        if self.abandoned or not bm.is_dirty(offset, length):
            return
        first = offset >> bm.region_shift
        last = (offset + length - 1) >> bm.region_shift
        for r in range(first, last + 1):
            if bm.test_region(r):
                try:
                    self._restore_region(r, bytearray(bm.region_range(r)[1]), commit=True)
                except VolumeIOError as e:
                    if e.is_read == is_read or e.out_of_space:
                        raise
                    raise VolumeIOError(str(e), is_read=is_read) from e
                if bm.test_region(r) and not self.abandoned:
                    # its commit kept the bit: the live images lost data meanwhile (add_lost)
                    # and may have dropped the copy - the I/O must not see what is left
                    why = self.vol.offline
                    if why is not None:
                        raise StateError(f"volume {self.vol.name} is offline: {why}")
                    raise VolumeIOError(f"volume {self.vol.name}: region {r}'s restore may "
                                        f"have been lost before it was committed",
                                        is_read=is_read)

    def _run(self):
        self._t0 = time.monotonic()
        vol = self.vol
        try:
            buf = StorageImage.aligned_buffer(vol.region_size)
            self._copy_marked(buf)
            if self._cancel.is_set() and self.bitmap.count():
                # A restore cannot be abandoned half way without leaving a mixed volume; it
                # stays registered (I/O keeps restoring on demand) and resumes on next open.
                self._finish("cancelled")
                return
            vol.control.finish_restore(self.img, self)
            self._finish("done")
        except Exception as e:
            self.stopped_offline = _stopped_by_offline(self, e)
            self._fail(str(e) if isinstance(e, WentOffline) else f"{type(e).__name__}: {e}")

    def _copy_marked(self, buf) -> None:
        """Copy every region the restore bitmap marks (``buf``: a region-sized aligned buffer),
        committing them in batches, until none is left or the job is cancelled. StateError
        (``_check_online``) when the volume went offline."""
        vol = self.vol
        while self.bitmap.count():
            pending = []
            last_ck = time.monotonic()
            for r in _read_ahead(self.bitmap, vol, lambda: self.img):
                if self._cancel.is_set():
                    break
                self._throttle(self.bitmap.region_range(r)[1])
                if self._cancel.is_set():
                    break
                _check_online(vol, "restore")
                try:
                    gen = self._restore_region(r, buf, commit=False)
                except Exception:
                    self.failed_region = r
                    raise
                if gen is not None:
                    pending.append((r, gen))
                if len(pending) >= CHECKPOINT_REGIONS or \
                        time.monotonic() - last_ck >= CHECKPOINT_SECONDS:
                    vol.control.commit_restored(self, pending)
                    pending, last_ck = [], time.monotonic()
            if pending:
                vol.control.commit_restored(self, pending)
            if self._cancel.is_set():
                return

    def _restore_region(self, r, buf, *, commit) -> int | None:
        """Copy region ``r`` from the split image to every live image under the region lock;
        ``commit``: also record it as restored (durably) before the lock is released. Returns
        None if the region needed no copy, else the loss generation the copy began in (for
        ``JobControl.commit_restored``: a loss after it keeps the bit)."""
        vol, img, rb = self.vol, self.img, self.bitmap
        off, ln = rb.region_range(r)
        bs = vol.block_size
        lk = vol.locks.lock(off // bs, ln // bs, owner=None)
        try:
            if self.abandoned or not rb.test_region(r):
                return None
            with self.losses.commit_lock:
                gen = self.losses.gen
            view = memoryview(buf)[:ln]
            st = img.storage
            if st is None:
                raise VolumeIOError(f"volume {vol.name}: region {r} is not restored yet and "
                                    f"split image {img.rec.path}, the restore's source, is "
                                    f"not available", is_read=True)
            try:
                _read_source(vol, img, off, view)
            except ImageIOError as e:
                if not isinstance(e, NotRead):   # (nothing new learnt: the error that made
                    img.rec.error = str(e)        # the read hang is recorded already)
                raise VolumeIOError(f"volume {vol.name}: region {r} is not restored yet and "
                                    f"split image {img.rec.path}, the restore's source, "
                                    f"cannot be read: {e}", is_read=True) from e
            ep = vol._enter()
            try:
                tok = vol._wil.begin(off, ln)
                try:
                    for bm in ep.tracking:
                        if bm is not img.bitmap:
                            bm.mark(off, ln)
                    vol._fanout(ep, lambda st: st.writev(off, [view]), off, ln,
                                parallel=vol._parallel(ln))
                finally:
                    vol._wil.end(tok)
                img.bitmap.clear_region(r)
            finally:
                vol._leave(ep)
            if commit:
                vol.control.commit_restored(self, [(r, gen)])
        finally:
            lk.release()
        self._count_copy(r, ln)
        return gen
