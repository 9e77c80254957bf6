"""Scrub: check a volume's in-sync images against each other and repair by majority vote.

md's ``check`` / ``repair`` (``echo check > /sys/block/mdX/md/sync_action``) reads every
stripe of every disk and counts mismatches (``mismatch_cnt``); its repair of a RAID1 copies the
first disk over the others whatever they hold, so it cannot say which copy is right. lvmirror's
scrub does what md does not:

* every region is read from every in-sync image under an exclusive region lock on its LBAs from
  ``vol.locks`` (a write to the region waits for the few milliseconds the check takes; the LUN
  keeps serving every other region), inside the volume's current I/O epoch (a split waits for
  the check of the region in hand, as for any I/O begun before its T), and the copies are
  compared. The copies are read from the devices, not the page cache
  (``StorageImage.verify_readv``, O_DIRECT): a region whose cached pages are right while the
  disk under them holds something else is a mismatch, as md's check finds it;
* a region the images disagree on is reported with the images grouped by content; with three
  or more in-sync images a strict majority decides which content is right, and ``repair``
  writes it over the odd image(s) (a 2-2 tie on four images, or three images all different, has
  no majority and is left as found);
* with two images (or no majority) nothing is repaired unless the operator names the image that
  is right (``source``): then its content is written over the others on every mismatch.

Images that are split, syncing or failed are not compared (they are not supposed to agree).
An image that fails a read during the scrub is handled as the read path would
(``MirrorVolume._image_error``) and the region is compared across the others. When fewer than
two in-sync images are left (a split during the scrub of a two-image volume: a split is never
refused for a scrub), the scrub ends as "cancelled" with the reason and the region it stopped
at; it never counts a region nobody compared.

Progress is kept in ``<volume dir>/scrub.json`` (``ScrubRecord``): the next region, the counts
(regions checked, mismatches found, repaired) and the first ``REPORT_LIMIT`` mismatches. It is
saved every ``CHECKPOINT_REGIONS`` regions or ``CHECKPOINT_SECONDS`` and, once the scrub ends,
as the volume's last scrub result, which ``lvmirror status`` shows. A checkpoint that counts a
region as repaired is saved only after the repaired images are durable (the durability barrier,
``durability.py``): a power cut never leaves the record saying "repaired" over data that did not
survive. A scrub running when the volume closes (lvmirrord stops, the machine loses power)
resumes from its last checkpoint when the volume opens again; ``cancel`` ends it for good
(state "cancelled", kept as the last result).

The rate limit (MB/s of the volume's address space checked per second, so each in-sync image
is read at that rate) can change while it runs; a resumed scrub keeps it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

from lvmirror.errors import ImageIOError, StateError, VolumeIOError
from lvmirror.mirror.bitmap import atomic_write
from lvmirror.mirror.durability import not_durable
from lvmirror.mirror.image import StorageImage
from lvmirror.mirror.legs import ImageState
from lvmirror.mirror.resync import CHECKPOINT_REGIONS, CHECKPOINT_SECONDS, _Job, check_rate

__all__ = ["ScrubControl", "ScrubJob", "ScrubRecord", "SCRUB_KEY", "REPORT_LIMIT"]

log = logging.getLogger(__name__)

SCRUB_KEY = "scrub"      # the scrub's key in ``vol.jobs`` (the others are image ids)
REPORT_LIMIT = 256       # mismatching regions listed in the record (all are counted)
STATES = ("running", "done", "cancelled", "failed")


@dataclasses.dataclass
class ScrubRecord:
    """The scrub of one volume as saved in ``scrub.json`` (and shown in status as ``scrub``).

    ``repair``: mismatches are repaired (by majority, or from ``source_id``); ``source_id``:
    the image id named right by the operator (None: majority vote only); ``rate``: MB/s or None
    (unlimited); ``started`` / ``finished``: wall clock (seconds since the epoch);
    ``next_region``: where a resumed scrub goes on; ``regions`` (total), ``regions_checked``,
    ``mismatches`` (regions found different), ``repaired`` (regions made identical),
    ``unrepaired`` (mismatches left as found); ``report``: the first REPORT_LIMIT mismatching
    regions, each ``{region, offset, length, first_lba, last_lba, groups, right, repaired}``
    (``groups``: lists of image indexes that read the same, largest first; ``right``: the
    indexes whose content won, or None; ``repaired``: the indexes rewritten);
    ``images``: the indexes compared when it started."""

    state: str = "running"
    repair: bool = False
    source_id: int | None = None
    rate: float | None = None
    started: float = 0.0
    finished: float | None = None
    next_region: int = 0
    regions: int = 0
    regions_checked: int = 0
    mismatches: int = 0
    repaired: int = 0
    unrepaired: int = 0
    images: list = dataclasses.field(default_factory=list)
    report: list = dataclasses.field(default_factory=list)
    error: str | None = None

    @staticmethod
    def path(vdir) -> str:
        """``<vdir>/scrub.json``."""
        return os.path.join(vdir, "scrub.json")

    def save(self, vdir) -> None:
        """Atomically replace ``scrub.json`` (temp file, fsync, rename)."""
        data = json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True).encode() + b"\n"
        atomic_write(self.path(vdir), data)

    @classmethod
    def load(cls, vdir) -> "ScrubRecord | None":
        """The saved record, or None when there is none or it cannot be read (logged: a scrub
        record is a report, never a reason to keep a volume from opening)."""
        path = cls.path(vdir)
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read())
            fields = {f.name for f in dataclasses.fields(cls)}
            rec = cls(**{k: v for k, v in d.items() if k in fields})
            if rec.state not in STATES or not isinstance(rec.next_region, int) \
                    or rec.next_region < 0:
                raise ValueError(f"state {rec.state!r}, next_region {rec.next_region!r}")
            check_rate(rec.rate)
            return rec
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            log.warning("scrub record %s cannot be read (%s); it is ignored", path, e)
            return None

    def summary(self, vol) -> dict:
        """The record as status shows it, with the source as an index of ``vol`` (None if it
        is no longer one of its images)."""
        d = dataclasses.asdict(self)
        d.pop("source_id")
        d["source"] = _index_of(vol, self.source_id)
        return d


class _TooFewImages(Exception):
    """Fewer than two in-sync images could be read for a region: nothing left to compare."""


def _index_of(vol, image_id):
    for k, im in enumerate(vol._images):
        if im.rec.id == image_id:
            return k
    return None


class ScrubControl:
    """The scrub of one MirrorVolume (``vol.scrubs``): start, cancel, resume after open, and the
    last result."""

    def __init__(self, vol):
        self.vol = vol
        self._last: ScrubRecord | None = None
        self._loaded = False

    def last(self) -> dict | None:
        """The running scrub's record or the last one's (``ScrubRecord.summary``), None if the
        volume was never scrubbed."""
        job = self.vol.jobs.get(SCRUB_KEY)
        if job is not None:
            return job.rec.summary(self.vol)
        if not self._loaded:
            self._last = ScrubRecord.load(self.vol._vdir)
            self._loaded = True
        return self._last.summary(self.vol) if self._last is not None else None

    def start(self, *, repair=False, source=None, rate_limit=None) -> "ScrubJob":
        """Start a scrub of the whole volume; returns the running ScrubJob.

        ``repair``: rewrite the odd image(s) of a region from the majority (three or more
        in-sync images), or from ``source`` (an image index, which must be in sync) when
        given. Without ``repair`` the scrub only reports (md's ``check``). ``rate_limit``:
        MB/s of the volume checked per second (None or 0: unlimited).

        Raises ValueError (a bad rate, ``source`` without ``repair``), StateError: no such
        image, a scrub already runs, fewer than two in-sync images, ``source`` not
        in sync, a split is under way, a restore or crash recovery's copy runs (the images are
        known to differ until it ends), or the volume is offline."""
        vol = self.vol
        rate_limit = check_rate(rate_limit)
        if source is not None and not repair:
            raise ValueError("a source image is only used to repair (give repair as well)")
        vol._check_open()
        with vol._mgmt:
            vol.splits.check_idle("scrub")
            running = vol.jobs.get(SCRUB_KEY)
            if running is not None and running.is_alive():
                raise StateError(f"volume {vol.name}: a scrub is already running "
                                 f"({running.rec.regions_checked} of {running.rec.regions} "
                                 f"regions checked)")
            if vol.offline:
                raise StateError(f"volume {vol.name}: offline ({vol.offline}); nothing to scrub")
            vol.control.refuse_if_restoring("scrub")
            if vol._torn:
                raise StateError(f"volume {vol.name}: crash recovery is still copying "
                                 f"{len(vol._torn)} region(s) between the images; scrub after "
                                 f"it ends")
            source_id = None
            if source is not None:
                img = vol._img(source)
                if img.state is not ImageState.IN_SYNC:
                    raise StateError(f"volume {vol.name}: image {source} is {img.state.value}; "
                                     f"only an in-sync image can be named right")
                source_id = img.rec.id
            in_sync = [k for k, im in enumerate(vol._images) if im.state is ImageState.IN_SYNC]
            if len(in_sync) < 2:
                raise StateError(f"volume {vol.name}: {len(in_sync)} in-sync image(s); a scrub "
                                 f"compares two or more")
            nregions = -(-vol.size // vol.region_size)
            rec = ScrubRecord(repair=bool(repair), source_id=source_id, rate=rate_limit,
                              started=time.time(), regions=nregions, images=in_sync)
            rec.save(vol._vdir)
            return self._run(rec)

    def _run(self, rec) -> "ScrubJob":
        job = ScrubJob(self.vol, rec)
        self.vol.jobs[SCRUB_KEY] = job
        try:
            job.start()
        except BaseException as e:
            # no thread for it (the job is failed already): its record says so too, or
            # status, ``scrub --wait`` and the next open would take it for running (trial 36)
            rec.state, rec.error, rec.finished = "failed", job.error or str(e), time.time()
            try:
                rec.save(self.vol._vdir)
            except OSError:
                pass
            self.ended(job)
            raise
        return job

    def cancel(self) -> None:
        """Stop the running scrub after the region in hand and wait for it; it is recorded as
        cancelled (not resumed). StateError when none runs."""
        job = self.vol.jobs.get(SCRUB_KEY)
        if job is None or not job.is_alive():
            raise StateError(f"volume {self.vol.name}: no scrub is running")
        job.cancel()
        job.wait()

    def ended(self, job) -> None:
        """Called by a job as it ends: it becomes the last result."""
        self._last, self._loaded = job.rec, True
        if self.vol.jobs.get(SCRUB_KEY) is job:
            del self.vol.jobs[SCRUB_KEY]

    def resume(self) -> ScrubJob | None:
        """After open: go on with a scrub that was running when the volume closed or the
        machine stopped, from its last checkpoint, with its options; None if there was none.
        One that cannot go on (fewer than two in-sync images now, its source no longer in
        sync) is recorded as failed with the reason."""
        vol = self.vol
        rec = ScrubRecord.load(vol._vdir)
        self._last, self._loaded = rec, True
        if rec is None or rec.state != "running":
            return None
        why = None
        in_sync = [im for im in vol._images if im.state is ImageState.IN_SYNC]
        if len(in_sync) < 2:
            why = f"{len(in_sync)} in-sync image(s) after the restart"
        elif rec.source_id is not None and not any(im.rec.id == rec.source_id
                                                   for im in in_sync):
            why = "its source image is no longer in sync"
        if why:
            rec.state, rec.error, rec.finished = "failed", f"not resumed: {why}", time.time()
            rec.save(vol._vdir)
            log.warning("volume %s: the interrupted scrub was not resumed: %s", vol.name, why)
            return None
        log.info("volume %s: resuming the interrupted scrub at region %d of %d", vol.name,
                 rec.next_region, rec.regions)
        return self._run(rec)


class ScrubJob(_Job):
    """The copy-job shape of resync.py (rate limit, progress, cancel, wait) over a scrub:
    ``progress()`` is ``resync.job_progress`` with kind "scrub", image_id None, bytes_done /
    bytes_total over the volume's regions, plus mismatches, repaired and repair."""

    kind = "scrub"

    def __init__(self, vol, rec: ScrubRecord):
        self.rec = rec                  # before _Job's set_rate_limit, which saves the rate
        super().__init__(vol, None, rec.rate)
        self.bytes_total = vol.size
        self.bytes_done = min(rec.next_region * vol.region_size, vol.size)
        self._unsaved_repairs: list = []     # images rewritten since the last checkpoint
        self._cached_images: set = set()     # indexes read without O_DIRECT (logged once)

    cancel_reason = None     # why it was cancelled when not by the operator (kept in the record)

    def preempt(self, reason: str) -> None:
        """End the scrub after the region in hand because ``reason`` (a restore began: md's
        recovery interrupts a check the same way); recorded as cancelled with the reason.
        Does not wait (the caller may hold the volume's management lock)."""
        self.cancel_reason = reason
        log.warning("volume %s: scrub cancelled at region %d of %d: %s", self.vol.name,
                    self.rec.next_region, self.rec.regions, reason)
        self.cancel()

    def set_rate_limit(self, mb_per_s):
        """As ``_Job.set_rate_limit``; the new rate is also saved with the scrub."""
        super().set_rate_limit(mb_per_s)
        self.rec.rate = self.rate_limit

    def progress(self) -> dict:
        """See the class docstring."""
        p = super().progress()
        p.update(mismatches=self.rec.mismatches, repaired=self.rec.repaired,
                 repair=self.rec.repair)
        return p

    def start(self):
        """Run the scrub on a thread of its own."""
        self._start_thread(f"{self.vol.name}-scrub")

    def _run(self):
        self._t0 = time.monotonic()
        vol, rec = self.vol, self.rec
        bufs: dict = {}      # image index -> a region-sized aligned buffer
        last_ck = time.monotonic()
        since = 0
        try:
            # after a crash the images may differ on the write-intent log's regions until
            # crash recovery's copy has gone over them: that is no mismatch to report
            while vol._recovery is not None and vol._recovery.is_alive() \
                    and not self._cancel.is_set():
                vol._recovery.join(0.2)
            while rec.next_region < rec.regions:
                if self._cancel.is_set():
                    break
                r = rec.next_region
                self._check_region(r, bufs)
                rec.next_region = r + 1
                rec.regions_checked += 1
                self.bytes_done = min(rec.next_region * vol.region_size, vol.size)
                since += 1
                if since >= CHECKPOINT_REGIONS or time.monotonic() - last_ck >= \
                        CHECKPOINT_SECONDS:
                    self._checkpoint()
                    last_ck, since = time.monotonic(), 0
            if self._cancel.is_set() and self._stopping:
                self._checkpoint()           # still "running": the next open resumes it
                self._end("cancelled", keep_running=True)
                return
            rec.state = "cancelled" if rec.next_region < rec.regions else "done"
            if rec.state == "cancelled" and self.cancel_reason:
                rec.error = self.cancel_reason
            rec.finished = time.time()
            self._checkpoint()
            log.log(logging.WARNING if rec.unrepaired else logging.INFO,
                    "volume %s: scrub %s: %d of %d regions checked, %d mismatch(es), %d "
                    "repaired, %d left as found", vol.name, rec.state, rec.regions_checked,
                    rec.regions, rec.mismatches, rec.repaired, rec.unrepaired)
            self._end(rec.state)
        except _TooFewImages as e:
            rec.state, rec.error, rec.finished = "cancelled", str(e), time.time()
            log.warning("volume %s: scrub cancelled: %s", vol.name, e)
            self._checkpoint()
            self._end("cancelled")
        except Exception as e:  # report, never kill the daemon
            rec.state, rec.error, rec.finished = "failed", f"{type(e).__name__}: {e}", time.time()
            log.error("volume %s: scrub failed at region %d: %s", vol.name, rec.next_region,
                      rec.error)
            try:
                self._checkpoint()
            except Exception as e2:
                log.error("volume %s: scrub record not saved: %s", vol.name, e2)
            self._end("failed", rec.error)

    def _end(self, state, error=None, keep_running=False):
        if not keep_running:
            self.vol.scrubs.ended(self)
        self._finish(state, error)

    def _checkpoint(self):
        """Save the record; behind the durability barrier when it counts repairs whose data
        may not be durable yet."""
        vol, rec = self.vol, self.rec
        snap = ScrubRecord(**dataclasses.asdict(rec))
        repaired, self._unsaved_repairs = self._unsaved_repairs, []
        if not repaired:
            snap.save(vol._vdir)
            return
        imgs = list({id(im): im for im in repaired}.values())

        def persist(durable):
            if not_durable(imgs, durable):
                # the last in-sync image's flush failed (the volume went offline instead of
                # failing it): its repairs may be lost, and a record past them would let a
                # resumed scrub skip them; nothing is saved, they count again next time
                self._unsaved_repairs[:0] = repaired
                raise VolumeIOError(f"volume {vol.name}: scrub record not saved: a repaired "
                                    f"image's flush failed", is_read=False)
            lost = [im for im in imgs if im not in durable]
            if lost:      # failed on the flush: its regions are marked for resync already
                log.error("volume %s: %d repaired image(s) failed to flush; they are failed "
                          "and will be resynced", vol.name, len(lost))
            snap.save(vol._vdir)
        vol._barrier.commit(imgs, persist, what="scrub checkpoint")

    def _check_region(self, r, bufs):
        vol = self.vol
        rs = vol.region_size
        off = r * rs
        ln = min(rs, vol.size - off)
        bs = vol.block_size
        self._throttle(ln)
        lk = vol.locks.lock(off // bs, ln // bs, owner=self)
        try:
            if r in vol._torn:     # known to differ (a write found no space): repaired apart
                return
            ep = vol._enter()
            try:
                imgs = [im for im in ep.reads if im.state is ImageState.IN_SYNC]
                content = {}
                for im in imgs:
                    try:
                        k = vol._images.index(im)
                    except ValueError:       # detached since the epoch was built
                        continue
                    if k not in bufs:
                        bufs[k] = StorageImage.aligned_buffer(rs)
                    view = memoryview(bufs[k])[:ln]
                    try:
                        if not im.storage.verify_readv(off, view) and ln == rs \
                                and k not in self._cached_images:
                            self._cached_images.add(k)
                            log.warning("volume %s: scrub reads image %d (%s) through the page "
                                        "cache: its file system has no O_DIRECT, so a write "
                                        "the disk dropped may go unseen", vol.name, k,
                                        im.storage.path)
                    except ImageIOError as e:
                        vol._image_error(im, e, off, ln, is_read=True)
                        continue
                    content[k] = view.tobytes()
                if len(content) < 2:
                    # a split or a failed image left one copy: the scrub ends here rather than
                    # count regions nobody compared (a split is never refused for a scrub)
                    raise _TooFewImages(
                        f"{len(content)} in-sync image(s) left to compare at region {r} (an "
                        f"image was split, failed or detached); regions from {r} on are not "
                        f"checked")
                groups: dict[bytes, list[int]] = {}
                for k, data in content.items():
                    groups.setdefault(data, []).append(k)
                if len(groups) == 1:
                    return
                self._mismatch(r, off, ln, content, groups, ep)
            finally:
                vol._leave(ep)
        finally:
            lk.release()

    def _mismatch(self, r, off, ln, content, groups, ep):
        vol, rec = self.vol, self.rec
        bs = vol.block_size
        ordered = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1]))
        first, last = _differing_blocks([d for d, _ in ordered], bs)
        right = None
        src_k = _index_of(vol, rec.source_id) if rec.source_id is not None else None
        if src_k is not None and src_k in content:
            right = groups[content[src_k]]
        elif rec.source_id is None and len(ordered[0][1]) * 2 > len(content):
            right = ordered[0][1]
        rewritten = []
        if rec.repair and right is not None:
            good = memoryview(content[right[0]])
            # a repair is a write like any other: marked in the write-intent log while it is in
            # flight, and in the change bitmap of an image failed meanwhile (``_mark_late``),
            # so a failure that drops it from that image's cache leaves the region to resync
            tok = vol._wil.begin(off, ln)
            try:
                for k in sorted(content):
                    if k in right:
                        continue
                    im = vol._images[k]
                    if im not in ep.writes or im.state is not ImageState.IN_SYNC:
                        continue
                    try:
                        im.storage.writev(off, [good])
                    except ImageIOError as e:
                        vol._image_error(im, e, off, ln)
                        continue
                    rewritten.append(k)
                    self._unsaved_repairs.append(im)
            finally:
                vol._mark_late(ep, off, ln)
                vol._wil.end(tok)
        rec.mismatches += 1
        fixed = rewritten and len(rewritten) == len(content) - len(right)
        if fixed:
            rec.repaired += 1
        else:
            rec.unrepaired += 1
        entry = dict(region=r, offset=off, length=ln,
                     first_lba=(off + first) // bs, last_lba=(off + last) // bs,
                     groups=[g for _, g in ordered], right=right, repaired=rewritten)
        if len(rec.report) < REPORT_LIMIT:
            rec.report.append(entry)
        names = "; ".join("images " + "+".join(map(str, g)) if len(g) > 1 else f"image {g[0]}"
                          for _, g in ordered)
        log.warning("volume %s: scrub: region %d (LBA %d-%d) differs between the images (%s)%s",
                    vol.name, r, entry["first_lba"], entry["last_lba"], names,
                    f"; images {'+'.join(map(str, rewritten))} rewritten from image {right[0]}"
                    if fixed else (f"; image(s) {'+'.join(map(str, right))} hold the majority"
                                   if right else "; no majority: which copy is right is for "
                                                 "the operator to say (--repair --source N)"))


def _differing_blocks(datas, bs) -> tuple[int, int]:
    """Byte offsets (block aligned) of the first and last block that is not the same in every
    one of ``datas`` (equal-length bytes, at least two of them differing)."""
    n = len(datas[0])
    first = next(o for o in range(0, n, bs)
                 if any(d[o:o + bs] != datas[0][o:o + bs] for d in datas[1:]))
    last = next(o for o in range((n - 1) // bs * bs, -1, -bs)
                if any(d[o:o + bs] != datas[0][o:o + bs] for d in datas[1:]))
    return first, last
