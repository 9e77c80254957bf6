"""WriteIntentLog: the dirty-region log (md's write-intent bitmap, dm-raid's dirty log).

Rule: before a write reaches any image, every region it touches is marked in the log AND the
log is durable. After a crash, only the regions the log marks may differ between the images
(a write may have reached some images and not others), so recovery re-syncs just those, and
merges them into every split / failed image's change bitmap (which is persisted lazily; the
log covers what the lazy copy may have missed, see ``MirrorVolume.checkpoint``).

Cost: a write whose regions are marked and durable takes one mutex and updates an in-flight
counter; only a clean->dirty transition writes the file (see "The file" below). That save runs
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

The file (``<state>/VOL/wil.bitmap``) holds two slots, written in turn in place, as md writes
its bitmap pages where they lie and DRBD its activity log as a ring of transactions::

    slot k at k * slot_size:  "LVMWIL02" | seq (u64) | CRC32 of seq and payload (u32) |
                              payload length (u32) | payload (RegionBitmap.to_bytes) | zeros

``slot_size`` is that header and payload rounded up to 4096 bytes. The valid slot with the
higher seq is the log. A save overwrites the other slot and fdatasyncs the file: one flush of
blocks already allocated, where an atomic replace costs a file fsync, a rename and a directory
fsync (two journal commits on ext4). A crash that tears the slot being written leaves the other
one, the state before that save, and no write waiting for the save has begun. The file is
created - and a log in the format before this one (a bare RegionBitmap, replaced atomically)
rewritten - whole by an atomic replace on the first save.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib

from lvmirror.errors import WouldBlock
from lvmirror.mirror.bitmap import MAGIC as LEGACY_MAGIC    # a bare RegionBitmap file
from lvmirror.mirror.bitmap import RegionBitmap, atomic_write

__all__ = ["WriteIntentLog", "read_log"]

LOG_MAGIC = b"LVMWIL02"
_SLOT = struct.Struct("<8sQII")          # magic, seq, crc32, payload length
_SEQ = struct.Struct("<Q")
_SLOT_ALIGN = 4096


def _slot_size(payload_len: int) -> int:
    """Bytes of one slot for a payload of ``payload_len`` bytes (header + payload, rounded up
    to 4096)."""
    return -(-(_SLOT.size + payload_len) // _SLOT_ALIGN) * _SLOT_ALIGN


def _slot(seq: int, payload: bytes) -> bytes:
    """One slot's bytes: the header for ``seq`` and ``payload``, the payload, zeros to the
    slot size."""
    crc = zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq)))
    data = _SLOT.pack(LOG_MAGIC, seq, crc, len(payload)) + payload
    return data + bytes(_slot_size(len(payload)) - len(data))


def read_log(path, size_bytes: int | None = None,
             region_size: int | None = None) -> tuple[RegionBitmap, int | None, int | None]:
    """The write-intent log in the file ``path``: ``(bitmap, seq, slot)`` of its newest valid
    slot, or ``(bitmap, None, None)`` for a log in the format before the slots (a bare
    ``RegionBitmap`` file). ``size_bytes``/``region_size``, when given, must match. Raises
    FileNotFoundError / OSError from reading, ValueError when no slot is valid (both torn or
    foreign) or the geometry differs."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(LEGACY_MAGIC):        # the format before the slots
        return RegionBitmap.from_bytes(data, size_bytes, region_size), None, None
    size = len(data) // 2                     # two slots of one size, written whole at creation
    if len(data) % 2 or size % _SLOT_ALIGN or size < _SLOT.size:
        raise ValueError(f"write-intent log of {len(data)} bytes is not two slots: truncated")
    best, problems = None, []
    for k in range(2):
        off = k * size
        magic, seq, crc, plen = _SLOT.unpack_from(data, off)
        payload = data[off + _SLOT.size:off + _SLOT.size + plen]
        if magic != LOG_MAGIC or _SLOT.size + plen > size:
            problems.append(f"slot {k}: not written")
            continue
        if zlib.crc32(payload, zlib.crc32(_SEQ.pack(seq))) != crc:
            problems.append(f"slot {k}: checksum mismatch (torn write)")
            continue
        try:
            bm = RegionBitmap.from_bytes(payload, size_bytes, region_size)
        except ValueError as e:
            problems.append(f"slot {k}: {e}")
            continue
        if best is None or seq > best[0]:
            best = (seq, k, bm)
    if best is None:
        raise ValueError("no valid slot in the write-intent log (" + "; ".join(problems) + ")")
    return best[2], best[0], best[1]


class WriteIntentLog:
    """A persistent RegionBitmap plus per-region in-flight accounting. Its "regions" are the
    volume's write-intent chunks (``VolumeMetadata.intent_chunk`` bytes each, a power of two,
    64 MiB by default as md's internal bitmap chunk): coarser than the change bitmaps' regions,
    so a random writer sets - and waits for a save - far less often, at the price of copying
    whole chunks after a crash (md's and DRBD's trade: their bitmap chunk and activity-log
    extent)."""

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
        # region -> the generation that set its bit, while no save has made it durable
        self._pending: dict[int, int] = {}
        self._file_seq = 0                   # seq of the newest slot in the file
        # the slot the next save overwrites in place; None: the next save writes the file whole
        self._next_slot: int | None = None
        self.saves = 0

    @classmethod
    def load_or_create(cls, path, size_bytes, region_size) -> tuple[WriteIntentLog, str | None]:
        """Load the log at ``path``, one bit per ``region_size`` bytes (the volume's
        ``intent_chunk``). A missing file means an empty log (a new volume); an unreadable or
        corrupt one means every region is suspect (all marked), and the reason is returned as
        the second element for the caller to report. A log saved with another region size (a
        volume from before ``intent_chunk``, whose bit covered one change-tracking region) is
        converted: each new bit is set where any byte it covers was marked, a superset of the
        old marks, and the first save rewrites the file whole."""
        problem = None
        seq = slot = None
        try:
            bm, seq, slot = read_log(path, size_bytes)
            if bm.region_size != region_size:
                old, bm = bm, RegionBitmap(size_bytes, region_size)
                bm.mark_bitmap(old)
                seq = slot = None
        except FileNotFoundError:
            bm = RegionBitmap(size_bytes, region_size)
            problem = "missing"
        except (OSError, ValueError) as e:
            bm = RegionBitmap(size_bytes, region_size)
            bm.set_all()
            problem = f"write-intent log {path} unusable ({e}); treating every region as dirty"
        wil = cls(path, size_bytes, region_size, bm)
        if seq is not None:             # in the slot format: the next save goes in place
            wil._file_seq, wil._next_slot = seq, slot ^ 1
        return wil, problem

    def save(self) -> None:
        """Write the log to ``path`` now (``_write``), under the save lock; OSError
        propagates."""
        with self._save_lock:
            self._save_locked()

    def _save_locked(self) -> None:
        """Copy the bits (under the mutex) and write the copy (outside it); then every mark
        the copy holds is durable. Caller holds the save lock."""
        with self._mutex:
            data = self.bitmap.to_bytes()
            gen = self._gen
        self._write(data)
        with self._mutex:
            self._saved_gen = max(self._saved_gen, gen)
            self.saves += 1
            if self._pending:
                self._pending = {r: g for r, g in self._pending.items() if g > gen}

    def _write(self, payload: bytes) -> None:
        """Make ``payload`` (``RegionBitmap.to_bytes``) the log on disk: in place into the
        older slot + fdatasync, or, with no file in the slot format yet (a new volume, a log in
        the earlier format, a file removed meanwhile), the whole file by an atomic replace.
        Caller holds the save lock. OSError propagates, and the next save writes the same slot
        again."""
        seq = self._file_seq + 1
        slot = _slot(seq, payload)
        if self._next_slot is not None:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1
            if fd >= 0:
                try:
                    # a file not two slots of this size (grown by something else) is rewritten
                    if os.fstat(fd).st_size == 2 * len(slot):
                        off, pos = self._next_slot * len(slot), 0
                        while pos < len(slot):
                            pos += os.pwrite(fd, slot[pos:], off + pos)
                        os.fdatasync(fd)
                        self._file_seq, self._next_slot = seq, self._next_slot ^ 1
                        return
                finally:
                    os.close(fd)
        atomic_write(self.path, slot + bytes(len(slot)))       # slot 1 empty: not valid
        self._file_seq, self._next_slot = seq, 1

    def _durable(self, gen: int) -> None:
        """Return once a save has made generation ``gen`` durable: this thread's save, or
        one another writer ran meanwhile (group commit). OSError of a failed save propagates."""
        with self._save_lock:
            if self._saved_gen < gen:
                self._save_locked()

    # -- I/O path -------------------------------------------------------------------------------

    def begin(self, offset: int, length: int, nowait: bool = False,
              own_save: bool = False) -> tuple[int, int]:
        """Mark the regions of ``[offset, offset+length)`` (bytes) and return once the log on
        disk marks them (a save, ``_write``, when a bit was newly set or is still pending; OSError
        propagates, with nothing counted in flight). Returns a token for
        ``end``. ``nowait``: only when every region is marked and durable already, so nothing
        is written or waited for; otherwise WouldBlock with nothing changed (the ring thread's
        writes, ``MirrorVolume.write(nowait=True)``, may not wait for an fsync). ``own_save``:
        a save, when one is needed, is this caller's own - when another thread's save holds the
        save lock (a checkpoint's, another writer's), WouldBlock with nothing changed instead
        of waiting for it (the ring thread at queue depth 1, ``MirrorVolume.write(device_ok=
        True)``, may wait for its own fdatasync, never for another thread)."""
        first = offset >> self.region_shift
        last = (offset + length - 1) >> self.region_shift
        if offset < 0 or length < 0 or (length and last >= self.bitmap.nregions):
            raise ValueError(f"write-intent log {self.path}: range [{offset}, +{length}) outside "
                             f"its {self.bitmap.size_bytes} bytes")
        if nowait and first == last and length:
            # the ring thread's usual case, written out: one region, marked and saved already
            with self._mutex:
                if first in self._pending or not self.bitmap.test_region(first):
                    raise WouldBlock("the write-intent log must be saved first")
                inflight = self._inflight
                inflight[first] = inflight.get(first, 0) + 1
            return first, last
        if own_save and not nowait:
            try:
                return self.begin(offset, length, nowait=True)    # nothing to save
            except WouldBlock:
                pass
            if not self._save_lock.acquire(blocking=False):     # lock order: save lock first
                raise WouldBlock("another save of the write-intent log is running")
            try:
                return self._begin(first, last, offset, length, False, True)
            finally:
                self._save_lock.release()
        return self._begin(first, last, offset, length, nowait, False)

    def _begin(self, first, last, offset, length, nowait, held) -> tuple[int, int]:
        """``begin``'s marking and save; ``held``: the caller holds the save lock (its save is
        the one that makes the marks durable)."""
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
                new = 0     # a bit set now needs a save that copies it: a new generation,
                # newer than any save already running (whose copy may predate this mark)
                for r in range(first, last + 1):
                    if self.bitmap.mark_region(r):
                        if not new:
                            self._gen = new = self._gen + 1
                        pending[r] = new
                    elif r in pending:
                        need = max(need, pending[r])
                need = max(need, new)
        if need:
            try:
                if not held:
                    self._durable(need)
                elif self._saved_gen < need:
                    self._save_locked()
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
            if first == last:                       # (one region: _dec written out)
                inflight = self._inflight
                n = inflight[first] - 1
                if n:
                    inflight[first] = n
                else:
                    del inflight[first]
                self._last_end[first] = seq
                return
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
