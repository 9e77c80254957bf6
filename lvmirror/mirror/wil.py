"""WriteIntentLog: the dirty-region log (md's write-intent bitmap, dm-raid's dirty log).

Rule: before a write reaches any image, every region it touches is marked in the log AND the
log is durable. After a crash, only the regions the log marks may differ between the images
(a write may have reached some images and not others), so recovery re-syncs just those, and
merges them into every split / failed image's change bitmap (which is persisted lazily; the
log covers what the lazy copy may have missed, see ``MirrorVolume.checkpoint``).

Cost: a write whose regions are already marked takes one mutex and updates an in-flight
counter; only a clean->dirty transition writes the file (atomic replace + fsync), and that
happens under the mutex so that a writer that sees a bit set knows it is already durable.

Bits are cleared lazily by ``clean(cutoff)``: a region is cleared only if no write is in flight
in it and its last write ended at or before ``cutoff`` (a ticket from ``ticket()`` taken before
the caller made the images and the change bitmaps durable).
"""

from __future__ import annotations

import threading

from lvmirror.errors import WouldBlock
from lvmirror.mirror.bitmap import RegionBitmap

__all__ = ["WriteIntentLog"]


class WriteIntentLog:
    """A persistent RegionBitmap plus per-region in-flight accounting."""

    def __init__(self, path, size_bytes: int, region_size: int, bitmap: RegionBitmap | None = None):
        self.path = path
        self.bitmap = bitmap if bitmap is not None else RegionBitmap(size_bytes, region_size)
        self.region_shift = self.bitmap.region_shift
        self._mutex = threading.Lock()
        self._inflight: dict[int, int] = {}
        self._last_end: dict[int, int] = {}
        self._seq = 0
        self.saves = 0

    @classmethod
    def load_or_create(cls, path, size_bytes, region_size) -> tuple[WriteIntentLog, str | None]:
        """Load the log at ``path``. A missing file means an empty log (a new volume); an
        unreadable or corrupt one means every region is suspect (all marked), and the reason is
        returned as the second element for the caller to report."""
        problem = None
        try:
            bm = RegionBitmap.load(path, size_bytes, region_size)
        except FileNotFoundError:
            bm = RegionBitmap(size_bytes, region_size)
            problem = "missing"
        except (OSError, ValueError) as e:
            bm = RegionBitmap(size_bytes, region_size)
            bm.set_all()
            problem = f"write-intent log {path} unusable ({e}); treating every region as dirty"
        return cls(path, size_bytes, region_size, bm), problem

    def save(self) -> None:
        """Write the log to ``path`` now, under the mutex (atomic replace + fsync,
        ``RegionBitmap.save``); OSError propagates."""
        with self._mutex:
            self.bitmap.save(self.path)
            self.saves += 1

    # -- I/O path -------------------------------------------------------------------------------

    def begin(self, offset: int, length: int, nowait: bool = False) -> tuple[int, int]:
        """Mark the regions of ``[offset, offset+length)`` (bytes) and make the log durable if
        a bit was newly set (atomic replace + fsync: OSError propagates). Returns a token for
        ``end``. ``nowait``: only when every region is marked already, so nothing is written;
        otherwise WouldBlock with nothing changed (the ring thread's writes,
        ``MirrorVolume.write(nowait=True)``, may not wait for an fsync)."""
        first = offset >> self.region_shift
        last = (offset + length - 1) >> self.region_shift
        with self._mutex:
            if nowait and not self.bitmap.all_dirty(offset, length):
                raise WouldBlock("the write-intent log must be saved first")
            inflight = self._inflight
            for r in range(first, last + 1):
                inflight[r] = inflight.get(r, 0) + 1
            if self.bitmap.mark(offset, length):
                try:
                    self.bitmap.save(self.path)
                    self.saves += 1
                except BaseException:
                    for r in range(first, last + 1):
                        self._dec(r)
                    raise
        return first, last

    def _dec(self, r):
        n = self._inflight[r] - 1
        if n:
            self._inflight[r] = n
        else:
            del self._inflight[r]

    def end(self, token: tuple[int, int]) -> None:
        """The write of ``token`` finished on every image (successfully or not)."""
        first, last = token
        with self._mutex:
            self._seq += 1
            seq = self._seq
            for r in range(first, last + 1):
                self._dec(r)
                self._last_end[r] = seq

    # -- lazy clearing --------------------------------------------------------------------------

    def ticket(self) -> int:
        """Sequence number of the most recent ``end``; pass to ``clean`` later."""
        with self._mutex:
            return self._seq

    def clean(self, cutoff: int, keep=()) -> int:
        """Clear every marked region with no write in flight whose last write ended at or
        before ``cutoff``, except the regions in ``keep`` (images known to differ there);
        persist if anything changed. Returns the number cleared."""
        with self._mutex:
            cleared = 0
            for r in list(self.bitmap.dirty_regions()):
                if r in self._inflight or r in keep:
                    continue
                if self._last_end.get(r, 0) > cutoff:
                    continue
                self.bitmap.clear_region(r)
                self._last_end.pop(r, None)
                cleared += 1
            if cleared:
                self.bitmap.save(self.path)
                self.saves += 1
            return cleared

    def clear_all(self) -> None:
        """Clean shutdown: nothing in flight, every image durable; the log becomes empty."""
        with self._mutex:
            if self._inflight:
                raise RuntimeError(f"write-intent log {self.path}: clear_all with writes in flight")
            self.bitmap.clear_all()
            self._last_end.clear()
            self.bitmap.save(self.path)
            self.saves += 1

    def inflight_regions(self) -> dict[int, int]:
        """{region index: writes in flight there}, a copy taken under the mutex."""
        with self._mutex:
            return dict(self._inflight)

    def dirty_regions(self) -> list[int]:
        """The region indices the log marks, ascending (a snapshot list)."""
        return list(self.bitmap.dirty_regions())
