"""SplitImageVolume: a split image served as its own LUN (cfgstring ``NAME;image=N``).

The point-in-time copy is read and written directly (the volume no longer writes it). Writes
are allowed - a file system's journal replay on the copy needs them - and each first marks the
image's change bitmap *durably* (a newly dirty region is saved before the write goes on), so a
later resync or restore still copies every region where the copy and the live volume differ.
It has its own region lock manager; ``MirrorVolume.split_image`` creates it and refuses resync,
restore and detach of the image while it is exported.
"""

from __future__ import annotations

import logging
import threading

from lvmirror.errors import ImageIOError, StateError, VolumeIOError
from lvmirror.mirror import copyid, provisioning
from lvmirror.mirror.durability import unanswered
from lvmirror.mirror.legs import ImageState
from lvmirror.mirror.regionlock import RegionLockManager

log = logging.getLogger(__name__)

EXPORT_DRAIN_WAIT = 10.0    # seconds close() waits for the LUN's writes in flight

__all__ = ["SplitImageVolume"]


class SplitImageVolume:
    """Serves split leg ``img`` (index ``index``) of MirrorVolume ``vol`` as a volume: the
    same block I/O API (``read``, ``write``, ``flush``, ``unmap``, ``compare_and_write``; LBAs
    in blocks of ``block_size`` bytes). Errors: StateError once closed or no longer split,
    ValueError for an LBA range outside the image, VolumeIOError for an image I/O error or a
    change bitmap that cannot be persisted."""

    def __init__(self, vol, img, index: int):
        self._vol = vol
        self._img = img
        self.index = index
        self.name = f"{vol.name}/image{index}"
        self.block_size = vol.block_size
        self.size = vol.size
        self.num_blocks = vol.num_blocks
        self.locks = RegionLockManager(self.name)
        self._bitmap_lock = threading.Lock()
        self._closed = False

    def _check(self, lba, nblocks):
        if self._closed:
            raise StateError(f"{self.name}: export closed")
        if self._img.state is not ImageState.SPLIT:
            raise StateError(f"{self.name}: image is {self._img.state.value}, no longer split")
        if lba < 0 or nblocks < 0 or lba + nblocks > self.num_blocks:
            raise ValueError(f"{self.name}: LBA range [{lba}, +{nblocks}) outside the image")

    def _mark(self, offset, length):
        """Mark the change bitmap; a newly dirty region is persisted before the write."""
        bm = self._img.bitmap
        with self._bitmap_lock:
            if bm.mark(offset, length):
                try:
                    bm.save(self._vol._bitmap_path(self._img))
                except OSError as e:
                    raise VolumeIOError(f"{self.name}: cannot persist the change bitmap: {e}",
                                        is_read=False) from e

    def check_ready(self):
        """StateError once the export is closed or the image is no longer split (TEST UNIT
        READY answers NOT READY then)."""
        self._check(0, 0)

    def read(self, lba, buffers):
        """Fill ``buffers`` with the split image's blocks from ``lba`` (shared region lock)."""
        n = sum(len(b) for b in buffers) // self.block_size
        self._check(lba, n)
        with self.locks.lock(lba, n, shared=True) if n else _nolock():
            try:
                self._img.storage.readv(lba * self.block_size, buffers)
            except ImageIOError as e:
                raise VolumeIOError(str(e), is_read=True) from e

    def write(self, lba, buffers, fua=False):
        """Write to the split image; the change bitmap marks the range (durably) first, so a
        later resync copies it back."""
        n = sum(len(b) for b in buffers) // self.block_size
        self._check(lba, n)
        if not n:
            return
        off = lba * self.block_size
        with self.locks.lock(lba, n):
            self._mark(off, n * self.block_size)
            try:
                self._img.storage.writev(off, buffers, fua=fua)
            except ImageIOError as e:
                raise VolumeIOError(str(e), is_read=False) from e

    def flush(self):
        """Make the split image's writes durable (fdatasync)."""
        self._check(0, 0)
        try:
            self._img.storage.flush()
        except ImageIOError as e:
            raise VolumeIOError(str(e), is_read=False) from e

    def unmap(self, lba, nblocks):
        """Deallocate ``nblocks`` blocks from ``lba`` (marked in the change bitmap first)."""
        self._check(lba, nblocks)
        if not nblocks:
            return
        off, ln = lba * self.block_size, nblocks * self.block_size
        with self.locks.lock(lba, nblocks):
            self._mark(off, ln)
            try:
                self._img.storage.discard(off, ln)
            except ImageIOError as e:
                raise VolumeIOError(str(e), is_read=False) from e

    def lba_status(self, lba, max_descriptors):
        """GET LBA STATUS of the split image (``provisioning.lba_status``)."""
        self._check(lba, 0)
        return provisioning.lba_status(self._img.storage, lba, self.num_blocks,
                                       self.block_size, max_descriptors)

    def prefetch(self, lba, nblocks):
        """PRE-FETCH: read the blocks into the image's page cache in the background."""
        self._check(lba, nblocks)
        self._img.storage.prefetch(lba * self.block_size, nblocks * self.block_size)

    def compare_and_write(self, lba, verify, data):
        """SBC COMPARE AND WRITE under the range lock: None once ``data`` is written, or the
        byte offset of the first miscompare (nothing written)."""
        n = len(verify) // self.block_size
        self._check(lba, n)
        if not n:
            return None
        off = lba * self.block_size
        with self.locks.lock(lba, n):
            cur = bytearray(len(verify))
            self._img.storage.readv(off, [memoryview(cur)])
            if cur != verify:
                v = bytes(verify)
                return next(i for i in range(len(cur)) if cur[i] != v[i])
            self._mark(off, len(data))
            self._img.storage.writev(off, [data])
            return None

    def close(self):
        """The LUN stops exporting the image (idempotent). The split copy's identity
        (``copyid``), marked ``exported`` while its LUN could write it, is recorded again from
        the file as the LUN left it: a sample read (bounded by ``leg_timeout``, before the
        management lock), then the image made durable (the durability barrier, bounded by the
        flush limit) before the identity is saved, since it vouches for that content. A
        flush or save that fails leaves it marked ``exported``: then the sampled ranges
        outside the regions the bitmap marks are compared, and not the file's times."""
        if not self._closed:
            self._closed = True
            vol, img = self._vol, self._img
            ident = None
            if img.rec.copy_id and img.state is ImageState.SPLIT:
                # a write that passed _check before the close holds its region lock until it
                # returns: wait for it, so the identity is of the file as the LUN left it
                # (trial 33, MEDIUM 3); one that hangs leaves the copy marked exported
                try:
                    with self.locks.lock(0, self.num_blocks, timeout=EXPORT_DRAIN_WAIT):
                        ident = copyid.record_leg(vol, img)
                except TimeoutError:
                    log.warning("volume %s: image %s: a write through its LUN still in flight "
                                "%g s after the export ended; the copy stays marked exported",
                                vol.name, img.rec.path, EXPORT_DRAIN_WAIT)
            with vol._mgmt:
                img.exported -= 1
                if ident is None or img.exported or not img.rec.copy_id \
                        or img.state is not ImageState.SPLIT:
                    return

                def persist(durable):
                    with vol._meta:
                        if img not in durable or img.state is not ImageState.SPLIT \
                                or unanswered(img):
                            # (a flush of it failed in another thread - the LUN's SYNCHRONIZE
                            # CACHE: the copy stays marked exported, judged by its sample
                            # outside what its LUN wrote)
                            return
                        img.rec.copy_id = ident
                        try:
                            vol._save_md()
                        except OSError as e:
                            log.warning("volume %s: image %s: the split copy's identity after "
                                        "its export not saved: %s", vol.name, img.rec.path, e)
                vol._barrier.commit([img], persist, what="split copy's identity",
                                    limit=vol._flush_limit)


class _nolock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
