"""RegionBitmap: one bit per region of a volume, and the atomic file replace it is saved with.

Used as a split image's change map (which regions changed since the split, so resync copies
only those) and as the write-intent log (which regions may differ between images after a
crash). Region ``i`` covers bytes ``[i * region_size, (i + 1) * region_size)`` clipped to the
volume size; bit ``i`` lives in byte ``i >> 3``, bit ``i & 7`` (LSB first).

On-disk form (``to_bytes``), all integers little-endian::

    magic     8s  b"LVMBMAP1"
    size      Q   volume size in bytes
    region    Q   region size in bytes
    nregions  Q   ceil(size / region)
    crc32     I   zlib.crc32 of the bit bytes that follow
    bits          ceil(nregions / 8) bytes

``from_bytes`` checks every field, so a torn write, a foreign file or a bitmap of another
geometry is refused with a ValueError instead of being trusted.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib

__all__ = ["RegionBitmap", "atomic_write"]

MAGIC = b"LVMBMAP1"
_HEADER = struct.Struct("<8sQQQI")
_ZERO_CHUNK = bytes(4096)


def _fsync_dir(dirpath: str) -> None:
    fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so that after a crash it holds either the old or the new content.

    Writes a temporary file in the same directory, fsyncs it, renames it over ``path`` and
    fsyncs the directory so the rename itself is durable. On an error before the rename the
    temporary file is removed and ``path`` is untouched; one of the directory's fsync leaves
    the new content at ``path``, maybe not durable. The OSError propagates, naming ``path``
    when the call that failed named no file (a write or fsync: ENOSPC, EIO), so a job that
    fails on it says which state directory filled up rather than leave the operator to blame
    an image's file system (trial 35, LOW).
    """
    path = os.fspath(path)
    dirpath = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    tmp = os.path.join(dirpath, f".{base}.tmp.{os.getpid()}.{threading.get_ident()}")
    data = memoryview(data).cast("B")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            off = 0
            while off < len(data):
                off += os.write(fd, data[off:])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        _name_the_file(e, path)
        raise
    try:
        _fsync_dir(dirpath)
    except OSError as e:
        _name_the_file(e, path)
        raise


def _name_the_file(e, path) -> None:
    """Raise OSError ``e`` again naming ``path`` (``atomic_write``'s file) when it names no
    file and has an errno (os.write, os.fsync); else return, for the caller to re-raise."""
    if isinstance(e, OSError) and e.filename is None and e.errno is not None:
        raise OSError(e.errno, f"{e.strerror} (saving lvmirror's state)", path) from e


class _hybridmethod:
    """Descriptor: ``Cls.load(path)`` builds a new bitmap, ``bm.load(path)`` loads into ``bm``."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls):
        target = obj if obj is not None else cls
        return lambda *a, **kw: self.func(target, *a, **kw)


class RegionBitmap:
    """One bit per region; thread-safe (one mutex around every bit update)."""

    def __init__(self, size_bytes: int, region_size: int):
        if not isinstance(size_bytes, int) or size_bytes < 0:
            raise ValueError(f"bitmap size must be a non-negative integer of bytes, got {size_bytes!r}")
        if (not isinstance(region_size, int) or region_size < 512
                or region_size & (region_size - 1)):
            raise ValueError(f"region size must be a power of two >= 512, got {region_size!r}")
        self.size_bytes = size_bytes
        self.region_size = region_size
        self.region_shift = region_size.bit_length() - 1
        self.nregions = -(-size_bytes // region_size)
        self._bits = bytearray((self.nregions + 7) >> 3)
        self._mutex = threading.Lock()

    # -- helpers (caller holds _mutex where it matters) ------------------------------------------

    def _check_region(self, i: int) -> None:
        if not 0 <= i < self.nregions:
            raise IndexError(f"region {i} out of range (bitmap has {self.nregions} regions)")

    def _byte_range_to_regions(self, offset: int, length: int) -> tuple[int, int]:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise ValueError(f"byte range [{offset}, +{length}) outside the bitmap's "
                             f"{self.size_bytes} bytes")
        return offset >> self.region_shift, (offset + length - 1) >> self.region_shift

    def _set_range(self, first: int, last: int) -> bool:
        """Set bits first..last inclusive; True if any was clear."""
        bits = self._bits
        changed = False
        i = first
        while i <= last and i & 7:
            m = 1 << (i & 7)
            if not bits[i >> 3] & m:
                bits[i >> 3] |= m
                changed = True
            i += 1
        full_end = (last + 1) & ~7
        if i < full_end:
            a, b = i >> 3, full_end >> 3
            if bits.count(0xFF, a, b) != b - a:
                bits[a:b] = b"\xff" * (b - a)
                changed = True
            i = full_end
        while i <= last:
            m = 1 << (i & 7)
            if not bits[i >> 3] & m:
                bits[i >> 3] |= m
                changed = True
            i += 1
        return changed

    def _next_dirty(self, i: int) -> int:
        """Index of the first dirty region >= i, or -1."""
        bits = self._bits
        n = self.nregions
        while i < n and i & 7:
            if bits[i >> 3] & (1 << (i & 7)):
                return i
            i += 1
        if i >= n:
            return -1
        b = i >> 3
        nb = len(bits)
        while b < nb:
            # Skip clean stretches a chunk at a time.
            end = min(b + len(_ZERO_CHUNK), nb)
            if bits[b:end] == _ZERO_CHUNK[:end - b]:
                b = end
                continue
            while bits[b] == 0:
                b += 1
            v = bits[b]
            return (b << 3) + ((v & -v).bit_length() - 1)
        return -1

    # -- bit operations -----------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> bool:
        """Mark every region touching bytes ``[offset, offset+length)`` dirty.

        Returns True if any bit went from clean to dirty, i.e. the persistent copy must be
        written before the I/O proceeds. A zero length marks nothing and returns False.
        """
        if length == 0:
            if not 0 <= offset <= self.size_bytes:
                raise ValueError(f"offset {offset} outside the bitmap's {self.size_bytes} bytes")
            return False
        first, last = self._byte_range_to_regions(offset, length)
        with self._mutex:
            if first == last:
                m = 1 << (first & 7)
                byte = self._bits[first >> 3]
                if byte & m:
                    return False
                self._bits[first >> 3] = byte | m
                return True
            return self._set_range(first, last)

    def mark_region(self, i: int) -> bool:
        """Mark region ``i`` dirty; True if it was clean."""
        self._check_region(i)
        m = 1 << (i & 7)
        with self._mutex:
            byte = self._bits[i >> 3]
            self._bits[i >> 3] = byte | m
            return not byte & m

    def clear_region(self, i: int) -> bool:
        """Mark region ``i`` clean; True if it was dirty."""
        self._check_region(i)
        m = 1 << (i & 7)
        with self._mutex:
            byte = self._bits[i >> 3]
            self._bits[i >> 3] = byte & ~m
            return bool(byte & m)

    def test_region(self, i: int) -> bool:
        """True if region ``i`` is dirty; IndexError outside ``0 .. nregions - 1``."""
        self._check_region(i)
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    def is_dirty(self, offset: int, length: int) -> bool:
        """True if any region touching bytes ``[offset, offset+length)`` is dirty."""
        if length == 0:
            return False
        first, last = self._byte_range_to_regions(offset, length)
        with self._mutex:
            j = self._next_dirty(first)
        return j != -1 and j <= last

    def all_dirty(self, offset: int, length: int) -> bool:
        """True if every region touching bytes ``[offset, offset+length)`` is dirty (so that
        ``mark`` of that range would change nothing); False for a zero length. ValueError
        outside the bitmap."""
        if length == 0:
            return False
        first, last = self._byte_range_to_regions(offset, length)
        bits = self._bits
        with self._mutex:
            for i in range(first, last + 1):
                if not bits[i >> 3] & (1 << (i & 7)):
                    return False
        return True

    def dirty_regions(self, start_region: int = 0):
        """Yield dirty region indices ascending from ``start_region``.

        The iteration is live: a region marked ahead of the cursor while iterating is yielded,
        one cleared ahead of it is not. Resync loops until ``count() == 0`` to catch the rest.
        """
        if start_region < 0:
            raise ValueError(f"start_region must be >= 0, got {start_region}")
        i = start_region
        while True:
            with self._mutex:
                i = self._next_dirty(i)
            if i < 0:
                return
            yield i
            i += 1

    def count(self) -> int:
        """Number of dirty regions."""
        with self._mutex:
            return int.from_bytes(self._bits, "little").bit_count()

    def dirty_bytes(self) -> int:
        """Bytes covered by dirty regions (the last region clipped to the volume size)."""
        with self._mutex:
            n = int.from_bytes(self._bits, "little").bit_count()
            total = n * self.region_size
            last = self.nregions - 1
            if last >= 0 and self._bits[last >> 3] & (1 << (last & 7)):
                total -= self.nregions * self.region_size - self.size_bytes
            return total

    def fill(self) -> float:
        """Dirty fraction of the volume's bytes, 0.0 .. 1.0 (0.0 for an empty volume)."""
        if self.size_bytes == 0:
            return 0.0
        return self.dirty_bytes() / self.size_bytes

    def region_range(self, i: int) -> tuple[int, int]:
        """(offset, length) in bytes of region ``i``, clipped to the volume size."""
        self._check_region(i)
        off = i << self.region_shift
        return off, min(self.region_size, self.size_bytes - off)

    def _check_geometry(self, other: RegionBitmap) -> None:
        if (other.size_bytes, other.region_size) != (self.size_bytes, self.region_size):
            raise ValueError(
                f"bitmap geometry mismatch: {other.size_bytes} bytes / region {other.region_size} "
                f"vs {self.size_bytes} bytes / region {self.region_size}")

    def union_update(self, other: RegionBitmap) -> None:
        """Mark dirty every region dirty in ``other`` (same geometry, else ValueError)."""
        self._check_geometry(other)
        if other is self:
            return
        with other._mutex:
            theirs = int.from_bytes(other._bits, "little")
        with self._mutex:
            mine = int.from_bytes(self._bits, "little")
            self._bits[:] = (mine | theirs).to_bytes(len(self._bits), "little")

    def mark_bitmap(self, other: RegionBitmap) -> None:
        """Mark dirty every byte range ``other`` marks, whatever its region size (the volume's
        write-intent log marks chunks coarser than a change bitmap's regions): a region of this
        bitmap is marked when any byte of it lies in a dirty region of ``other``, so the result
        covers at least what ``other`` does. ``other`` must cover the same ``size_bytes``, else
        ValueError. Same geometry: ``union_update``."""
        if other.size_bytes != self.size_bytes:
            raise ValueError(f"bitmap size mismatch: {other.size_bytes} vs {self.size_bytes} "
                             f"bytes")
        if other.region_size == self.region_size:
            self.union_update(other)
            return
        for r in list(other.dirty_regions()):
            self.mark(*other.region_range(r))

    def set_all(self) -> None:
        """Mark every region dirty (e.g. a log that cannot be trusted: everything is suspect)."""
        with self._mutex:
            n = self.nregions
            self._bits[:] = b"\xff" * (n >> 3)
            if n & 7:
                self._bits.append((1 << (n & 7)) - 1)

    def clear_all(self) -> None:
        """Mark every region clean."""
        with self._mutex:
            self._bits[:] = bytes(len(self._bits))

    def copy(self) -> RegionBitmap:
        """A new bitmap of the same geometry holding these bits (taken under the mutex); later
        changes to either do not show in the other."""
        new = RegionBitmap(self.size_bytes, self.region_size)
        with self._mutex:
            new._bits[:] = self._bits
        return new

    def __eq__(self, other) -> bool:
        if not isinstance(other, RegionBitmap):
            return NotImplemented
        return (self.size_bytes == other.size_bytes and self.region_size == other.region_size
                and self._bits == other._bits)

    __hash__ = None

    def __repr__(self) -> str:
        return (f"<RegionBitmap {self.size_bytes} bytes, region {self.region_size}, "
                f"{self.count()}/{self.nregions} dirty>")

    # -- persistence ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The on-disk form (see the module docstring): the 36-byte header with the CRC32 of the
        bits, then ceil(nregions / 8) bytes of bits, copied under the mutex."""
        with self._mutex:
            bits = bytes(self._bits)
        header = _HEADER.pack(MAGIC, self.size_bytes, self.region_size, self.nregions,
                              zlib.crc32(bits))
        return header + bits

    @classmethod
    def from_bytes(cls, data, size_bytes: int | None = None,
                   region_size: int | None = None) -> RegionBitmap:
        """Parse ``to_bytes`` output; size_bytes/region_size, when given, must match the header.

        Raises ValueError naming what is wrong (foreign file, torn write, other geometry).
        """
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise ValueError(f"bitmap data too short ({len(data)} bytes, header needs "
                             f"{_HEADER.size}): truncated or torn write")
        magic, size, region, nregions, crc = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"not an lvmirror region bitmap (magic {magic!r}, want {MAGIC!r})")
        if size_bytes is not None and size != size_bytes:
            raise ValueError(f"bitmap is for {size} bytes, expected {size_bytes}")
        if region_size is not None and region != region_size:
            raise ValueError(f"bitmap region size is {region}, expected {region_size}")
        bm = cls(size, region)  # validates region
        if nregions != bm.nregions:
            raise ValueError(f"bitmap header inconsistent: {nregions} regions for {size} bytes "
                             f"of region {region} (want {bm.nregions})")
        bits = data[_HEADER.size:]
        if len(bits) != len(bm._bits):
            raise ValueError(f"bitmap body is {len(bits)} bytes, header says {len(bm._bits)}: "
                             f"truncated or torn write")
        if zlib.crc32(bits) != crc:
            raise ValueError("bitmap checksum mismatch: torn write or corruption")
        if nregions & 7 and bits[-1] >> (nregions & 7):
            raise ValueError("bitmap has bits set past its last region: corrupt")
        bm._bits[:] = bits
        return bm

    def save(self, path) -> None:
        """Persist atomically (see ``atomic_write``)."""
        atomic_write(path, self.to_bytes())

    @_hybridmethod
    def load(target, path, size_bytes: int | None = None, region_size: int | None = None):
        """Load a saved bitmap.

        ``RegionBitmap.load(path[, size_bytes, region_size])`` returns a new bitmap;
        ``bm.load(path)`` replaces ``bm``'s bits in place (the file must have ``bm``'s
        geometry) and returns ``bm``. ValueError if the file is torn, foreign or mismatched.
        """
        with open(path, "rb") as f:
            data = f.read()
        if isinstance(target, RegionBitmap):
            loaded = RegionBitmap.from_bytes(data, target.size_bytes, target.region_size)
            with target._mutex:
                target._bits[:] = loaded._bits
            return target
        return target.from_bytes(data, size_bytes, region_size)
