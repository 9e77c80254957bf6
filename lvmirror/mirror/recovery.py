"""Crash recovery: what ``MirrorVolume.open`` does before serving I/O after an unclean stop.

``volume.json`` says ``clean_shutdown: false`` while a volume is open. After a crash (a process
kill, a power cut) only the regions the write-intent log marks may differ between the in-sync
images: a write may have reached some and not others. ``recover``:

1. merges those regions into the change bitmap of every split / failed / syncing image (their
   bitmaps are saved lazily; the log covers what the lazy copy may have missed) and saves them;
2. copies each marked region from the *primary* in-sync image (highest generation, then lowest
   index) to the other in-sync images, failing an image whose I/O errors as the I/O path would;
3. behind the durability barrier: flushes every in-sync image - the primary too, whose page
   cache may hold the newest data after a process kill - and only then saves the bitmaps and
   the metadata and clears the log.

So no image that may have missed a write is read from, and a power cut during or right after
recovery finds either the log still set or the images identical.
"""

from __future__ import annotations

import os

from lvmirror.errors import ConfigError, ImageIOError
from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.durability import DurabilityBarrier
from lvmirror.mirror.image import StorageImage
from lvmirror.mirror.legs import ImageState
from lvmirror.mirror.metadata import VolumeMetadata

__all__ = ["fail_at_open", "recover"]


def recover(md, vdir, images, wil):
    """Crash recovery (before any I/O is served): merge the write-intent log into every
    non-in-sync image's change bitmap and copy its regions from the primary in-sync image to
    the other in-sync images. Errors fail images as the I/O path would."""
    dirty = wil.bitmap
    for im in images:
        if im.state is not ImageState.IN_SYNC and im.bitmap is not None:
            im.bitmap.union_update(dirty)
            im.bitmap.save(VolumeMetadata.bitmap_path(vdir, im.rec.id))
    in_sync = [im for im in images if im.state is ImageState.IN_SYNC]
    order = sorted(range(len(in_sync)), key=lambda k: (-in_sync[k].rec.generation, k))
    in_sync = [in_sync[k] for k in order]
    buf = StorageImage.aligned_buffer(md.region_size)
    regions = list(dirty.dirty_regions())
    for r in regions:
        off, ln = dirty.region_range(r)
        view = buf[:ln]
        while True:
            primary = in_sync[0]
            try:
                primary.storage.readv(off, [view])
                break
            except ImageIOError as e:
                if len(in_sync) == 1:
                    raise ConfigError(f"volume {md.name}: crash recovery cannot read region {r} "
                                      f"from the last in-sync image: {e}") from e
                fail_at_open(primary, md, e, all_regions=True)
                in_sync.pop(0)
        for im in list(in_sync[1:]):
            try:
                im.storage.writev(off, [view])
            except ImageIOError as e:
                fail_at_open(im, md, e, all_regions=True)
                in_sync.remove(im)
    # The write-intent log is cleared only once the regions it marks are durable on every
    # in-sync image - the primary included: after a process kill its page cache may still hold
    # the newest data, and a power cut after the clear must not leave the copies differing.
    def persist(durable):
        if not any(im.state is ImageState.IN_SYNC for im in images):
            raise ConfigError(f"volume {md.name}: crash recovery could not make any in-sync "
                              f"image durable: " + "; ".join(
                                  f"{im.rec.path}: {im.rec.error}" for im in in_sync))
        for im in images:
            im.sync_rec()
            if im.bitmap is not None:
                im.bitmap.save(VolumeMetadata.bitmap_path(vdir, im.rec.id))
        md.save(os.path.dirname(vdir))
        wil.clear_all()
    barrier = DurabilityBarrier(md.name, lambda im, e: fail_at_open(im, md, e, all_regions=True))
    barrier.commit(in_sync, persist, what="crash recovery")


def fail_at_open(im, md, exc, *, all_regions):
    """Fail leg ``im`` during recovery (before the volume serves I/O): state failed, the error
    kept, a fresh change bitmap (every region marked if ``all_regions``)."""
    im.state = ImageState.FAILED
    im.rec.error = f"crash recovery: {exc}"
    im.bitmap = RegionBitmap(md.size, md.region_size)
    if all_regions:
        im.bitmap.set_all()
