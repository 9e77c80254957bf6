"""WriteIntentLog: the dirty-region log (md's write-intent bitmap, dm-raid's dirty log).

Rule: before a write reaches any image, every region it touches is marked in the log AND the
log is durable. After a crash, only the regions the log marks may differ between the images
(a write may have reached some images and not others), so recovery re-syncs just those, and
merges them into every split / failed image's change bitmap (which is persisted lazily; the
log covers what the lazy copy may have missed, see ``MirrorVolume.checkpoint``).

Cost: a write whose regions are marked and durable takes one mutex and updates an in-flight
counter; only a clean->dirty transition writes the file (atomic replace + fsync). That save runs
outside the mutex, under a save lock of its own, so writes to marked regions (and the ring
thread's ``nowait`` writes) never wait behind an fsync, and the writers that set bits meanwhile
share the next save (a group commit, as md's bitmap writes the pages its writers dirtied in one
unplug). A bit set in memory is *pending* until a save that copied it has returned: a writer
that sees a pending bit waits for that save as the one that set it does; a failed save leaves
its bits pending, so the next writer there tries the save again (never proceeds on a bit only
memory holds).

Bits are cleared lazily by ``clean(cutoff)``: a region is cleared only if no write is in flight
in it and its last write ended at or before ``cutoff`` (a ticket from ``ticket()`` taken before
the caller made the images and the change bitmaps durable).
"""

from __future__ import annotations

import threading

from lvmirror.errors import WouldBlock
from lvmirror.mirror.bitmap import RegionBitmap, atomic_write

__all__ = ["WriteIntentLog"]


class WriteIntentLog:
    """A persistent RegionBitmap plus per-region in-flight accounting."""

    def __init__(self, path, size_bytes: int, region_size: int, bitmap: RegionBitmap | None = None):
        self.path = path
        self.bitmap = bitmap if bitmap is not None else RegionBitmap(size_bytes, region_size)
        self.region_shift = self.bitmap.region_shift
        self._mutex = threading.Lock()      # the bits, in-flight counts, pending marks
        self._save_lock = threading.Lock()  # one save at a time; taken before _mutex, never after
        self._inflight: dict[int, int] = {}
        self._last_end: dict[int, int] = {}
        self._seq = 0
        self._gen = 0           # bumped by every change of the bits that a save must carry
        self._saved_gen = 0     # the newest generation a save has made durable
        self._pending: dict[int, int] = {}   # region -> generation that set its bit, not durable yet
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
        """Write the log to ``path`` now (atomic replace + fsync, ``RegionBitmap.save``), under
        the save lock; OSError propagates."""
        with self._save_lock:
            self._save_locked()

    def _save_locked(self) -> None:
        """Copy the bits (under the mutex) and write the copy (outside it); then every mark
        the copy holds is durable. Caller holds the save lock."""
        with self._mutex:
            data = self.bitmap.to_bytes()
            gen = self._gen
        atomic_write(self.path, data)
        with self._mutex:
            self._saved_gen = max(self._saved_gen, gen)
            self.saves += 1
            if self._pending:
                self._pending = {r: g for r, g in self._pending.items() if g > gen}

    def _durable(self, gen: int) -> None:
        """Return once a save has made generation ``gen`` durable: this thread's save, or
        one another writer ran meanwhile (group commit). OSError of a failed save propagates."""
        with self._save_lock:
            if self._saved_gen < gen:
                self._save_locked()

    # -- I/O path -------------------------------------------------------------------------------

    def begin(self, offset: int, length: int, nowait: bool = False) -> tuple[int, int]:
        """Mark the regions of ``[offset, offset+length)`` (bytes) and return once the log on
        disk marks them (a save - atomic replace + fsync - when a bit was newly set or is still
        pending; OSError propagates, with nothing counted in flight). Returns a token for
        ``end``. ``nowait``: only when every region is marked and durable already, so nothing
        is written or waited for; otherwise WouldBlock with nothing changed (the ring thread's
        writes, ``MirrorVolume.write(nowait=True)``, may not wait for an fsync)."""
        first = offset >> self.region_shift
        last = (offset + length - 1) >> self.region_shift
        need = 0
        with self._mutex:
            pending = self._pending
            if nowait and (not self.bitmap.all_dirty(offset, length)
                           or (pending and any(r in pending for r in range(first, last + 1)))):
                raise WouldBlock("the write-intent log must be saved first")
            inflight = self._inflight
            for r in range(first, last + 1):
                inflight[r] = inflight.get(r, 0) + 1
            if first == last and not pending:            # the usual case: one region
                if self.bitmap.mark_region(first):
                    self._gen = need = self._gen + 1
                    pending[first] = need
            else:
                for r in range(first, last + 1):
                    if self.bitmap.mark_region(r):
                        if not need:
                            self._gen = need = self._gen + 1
                        pending[r] = need
                    elif r in pending:
                        need = max(need, pending[r])
        if need:
            try:
                self._durable(need)
            except BaseException:
                with self._mutex:
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
        persist if anything changed (the save runs outside the mutex: writers go on meanwhile).
        Returns the number cleared. OSError of the save propagates (the bits stay cleared in
        memory; the next save writes them)."""
        with self._save_lock:
            with self._mutex:
                cleared = 0
                for r in list(self.bitmap.dirty_regions()):
                    if r in self._inflight or r in keep or r in self._pending:
                        continue
                    if self._last_end.get(r, 0) > cutoff:
                        continue
                    self.bitmap.clear_region(r)
                    self._last_end.pop(r, None)
                    cleared += 1
                if cleared:
                    self._gen += 1
            if cleared:
                self._save_locked()
            return cleared

    def clear_all(self) -> None:
        """Clean shutdown: nothing in flight, every image durable; the log becomes empty."""
        with self._save_lock:
            with self._mutex:
                if self._inflight:
                    raise RuntimeError(f"write-intent log {self.path}: clear_all with writes in "
                                       f"flight")
                self.bitmap.clear_all()
                self._last_end.clear()
                self._pending.clear()
                self._gen += 1
            self._save_locked()

    def inflight_regions(self) -> dict[int, int]:
        """{region index: writes in flight there}, a copy taken under the mutex."""
        with self._mutex:
            return dict(self._inflight)

    def dirty_regions(self) -> list[int]:
        """The region indices the log marks, ascending (a snapshot list)."""
        return list(self.bitmap.dirty_regions())
