"""Crash recovery: what ``MirrorVolume.open`` does after an unclean stop, and what it leaves to
the volume while it serves.

``volume.json`` says ``clean_shutdown: false`` while a volume is open. After a crash (a process
kill, a power cut) only the regions the write-intent log marks may differ between the in-sync
images: a write may have reached some and not others (the log marks write-intent chunks, 64
MiB by default as md's bitmap does; a marked chunk stands for each of its regions). Before the
volume serves, ``recover`` merges those regions into the change bitmap of every split / failed
/ syncing image (their bitmaps are saved lazily; the log covers what the lazy copy may have
missed) and saves them.
That is quick: it touches metadata only.

The copy is done online, as md resyncs a RAID1 after an unclean shutdown while the array
serves: the volume marks the log's regions torn (``MirrorVolume._settle_torn``). Until a
region is copied, every read of it is answered by the same image, the first in-sync one, so
an initiator never sees two versions of a block; a background thread copies each region from
that image to the other live images under the region lock and the write-intent log, and a
checkpoint (which flushes every image, the source too, whose page cache may hold the newest
data after a process kill) clears the log bits only after the copies are durable. A power cut
during or after the copy therefore finds either the log still set or the images identical.
Serving at once matters: the kernel fails a command left in the TCMU ring after its
``cmd_time_out`` (30 s), and a restarted lvmirrord must answer them before that, however many
regions a crash left to copy.
"""

from __future__ import annotations

import time

from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.legs import ImageState
from lvmirror.mirror.metadata import VolumeMetadata

__all__ = ["RecoveryProgress", "recover"]


def recover(md, vdir, images, wil) -> set[int]:
    """Crash recovery's part before any I/O is served: merge the write-intent log's regions
    into the change bitmap of every split / failed / syncing image and save those bitmaps (a
    resync then copies them). Returns the log's regions (indexes of ``md.region_size`` bytes):
    the ones the in-sync images may disagree on, which the volume copies while it serves
    (``MirrorVolume`` treats them as torn regions: reads there use one image, the first in
    sync, until each region is copied from it to the others under its region lock; the log
    keeps them until a checkpoint has made the copies durable). The log marks write-intent
    chunks (``md.intent_chunk`` bytes); what is returned and merged is every region of a
    marked chunk. OSError when a bitmap cannot be saved."""
    dirty = RegionBitmap(md.size, md.region_size)       # the log's chunks, region by region
    dirty.mark_bitmap(wil.bitmap)
    for im in images:
        if im.state is not ImageState.IN_SYNC and im.bitmap is not None:
            im.bitmap.union_update(dirty)
            im.bitmap.save(VolumeMetadata.bitmap_path(vdir, im.rec.id))
    return set(dirty.dirty_regions())


class RecoveryProgress:
    """The online copy's progress, listed with the volume's jobs while it runs (kind
    ``recovery``, no image: it copies to every live image), so ``lvmirror status`` shows it and
    ``lvmirror wait`` waits for it. ``regions``: how many the log marked at open;
    ``region_size``: bytes each; ``left()``: how many are still to copy. ``state``: running,
    done, stopped (the volume closed first; the log keeps what is left) or failed."""

    kind = "recovery"
    image_id = None

    def __init__(self, regions: int, region_size: int, left):
        self.bytes_total = regions * region_size
        self.region_size = region_size
        self._left = left
        self.state = "running"
        self.error = None
        self._t0 = time.monotonic()
        self._t_end = None

    @property
    def bytes_done(self) -> int:
        """Bytes of the marked regions copied so far."""
        return max(self.bytes_total - self._left() * self.region_size, 0)

    def finish(self, state: str, error: str | None = None):
        """The copy ended: ``state`` done, stopped or failed (``error`` says why)."""
        self.state, self.error, self._t_end = state, error, time.monotonic()

    def progress(self) -> dict:
        """``resync.job_progress``'s figures (bytes, MB/s, seconds)."""
        from lvmirror.mirror.resync import job_progress
        return job_progress(self)
