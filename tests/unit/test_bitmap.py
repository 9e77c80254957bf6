"""RegionBitmap (bits, geometry, persistence) and atomic_write."""

import os
import threading

import pytest
from hypothesis import given, settings, strategies as st

from lvmirror.mirror.bitmap import MAGIC, RegionBitmap, atomic_write

MiB = 1 << 20


def test_geometry_and_region_range():
    bm = RegionBitmap(10 * MiB + 5, MiB)
    assert bm.nregions == 11
    assert bm.region_range(0) == (0, MiB)
    assert bm.region_range(10) == (10 * MiB, 5)
    with pytest.raises(IndexError):
        bm.region_range(11)
    for bad in (0, 256, 1000, 3 * 512):
        with pytest.raises(ValueError):
            RegionBitmap(MiB, bad)
    with pytest.raises(ValueError):
        RegionBitmap(-1, MiB)


def test_mark_reports_first_dirtying_only():
    bm = RegionBitmap(8 * MiB, MiB)
    assert bm.mark(MiB - 1, 2) is True          # straddles regions 0 and 1
    assert list(bm.dirty_regions()) == [0, 1]
    assert bm.mark(0, 10) is False
    assert bm.mark(MiB + 5, MiB) is True        # regions 1 and 2: 2 is new
    assert bm.mark(0, 0) is False
    assert bm.count() == 3
    with pytest.raises(ValueError):
        bm.mark(8 * MiB - 1, 2)
    with pytest.raises(ValueError):
        bm.mark(-1, 1)


def test_dirty_bytes_clipped_and_fill():
    bm = RegionBitmap(3 * MiB + 512, MiB)
    bm.mark_region(3)
    assert bm.dirty_bytes() == 512
    bm.mark_region(0)
    assert bm.dirty_bytes() == MiB + 512
    assert bm.fill() == pytest.approx((MiB + 512) / (3 * MiB + 512))
    bm.set_all()
    assert bm.count() == 4 and bm.dirty_bytes() == bm.size_bytes and bm.fill() == 1.0
    bm.clear_all()
    assert bm.count() == 0 and bm.fill() == 0.0


def test_is_dirty_and_clear():
    bm = RegionBitmap(64 * MiB, MiB)
    bm.mark_region(40)
    assert bm.is_dirty(39 * MiB, MiB + 1)
    assert not bm.is_dirty(0, 40 * MiB)
    assert not bm.is_dirty(41 * MiB, MiB)
    assert bm.clear_region(40) is True
    assert bm.clear_region(40) is False
    assert not bm.test_region(40)


def test_dirty_regions_start_and_live_iteration():
    bm = RegionBitmap(100000 * 512, 512)      # crosses several 4096-byte skip chunks
    for i in (3, 70000, 99999):
        bm.mark_region(i)
    assert list(bm.dirty_regions(4)) == [70000, 99999]
    it = bm.dirty_regions()
    assert next(it) == 3
    bm.mark_region(50000)                     # ahead of the cursor: seen
    bm.clear_region(70000)                    # ahead of the cursor: skipped
    assert list(it) == [50000, 99999]


def test_union_update_and_copy():
    a = RegionBitmap(16 * MiB, MiB)
    b = RegionBitmap(16 * MiB, MiB)
    a.mark_region(1)
    b.mark_region(9)
    c = a.copy()
    c.union_update(b)
    assert list(c.dirty_regions()) == [1, 9]
    assert list(a.dirty_regions()) == [1]     # copy is independent
    with pytest.raises(ValueError):
        a.union_update(RegionBitmap(16 * MiB, 2 * MiB))


def test_roundtrip_and_geometry_check():
    bm = RegionBitmap(13 * MiB + 7, MiB)
    bm.mark_region(0)
    bm.mark_region(13)
    data = bm.to_bytes()
    assert data.startswith(MAGIC)
    assert RegionBitmap.from_bytes(data, bm.size_bytes, bm.region_size) == bm
    with pytest.raises(ValueError, match="expected"):
        RegionBitmap.from_bytes(data, bm.size_bytes + 512, bm.region_size)
    with pytest.raises(ValueError, match="region size"):
        RegionBitmap.from_bytes(data, bm.size_bytes, 2 * MiB)


def test_torn_and_foreign_data_detected():
    bm = RegionBitmap(1000 * MiB, MiB)
    bm.mark_region(500)
    data = bm.to_bytes()
    with pytest.raises(ValueError, match="truncated|torn"):
        RegionBitmap.from_bytes(data[:-10], bm.size_bytes, bm.region_size)
    with pytest.raises(ValueError, match="truncated|torn"):
        RegionBitmap.from_bytes(data[:20], bm.size_bytes, bm.region_size)
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    with pytest.raises(ValueError, match="checksum"):
        RegionBitmap.from_bytes(bytes(flipped), bm.size_bytes, bm.region_size)
    with pytest.raises(ValueError, match="not an lvmirror"):
        RegionBitmap.from_bytes(b"\x7fELF" + data[4:], bm.size_bytes, bm.region_size)


def test_save_load_class_and_instance(tmp_path):
    p = tmp_path / "split.bitmap"
    bm = RegionBitmap(33 * MiB, MiB)
    bm.mark(5 * MiB, 3 * MiB)
    bm.save(p)
    assert RegionBitmap.load(p) == bm
    other = RegionBitmap(33 * MiB, MiB)
    assert other.load(p) is other
    assert other == bm
    wrong = RegionBitmap(34 * MiB, MiB)
    with pytest.raises(ValueError):
        wrong.load(p)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError):
        RegionBitmap.load(p)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "meta"
    atomic_write(p, b"old")
    atomic_write(p, b"new content")
    assert p.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["meta"]


def test_atomic_write_failure_keeps_old_content(tmp_path, monkeypatch):
    """Fault injection: fsync of the temp file fails (EIO) -> old content, no temp left."""
    p = tmp_path / "meta"
    atomic_write(p, b"old")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        atomic_write(p, b"new")
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["meta"]


def test_atomic_write_concurrent_readers_see_old_or_new(tmp_path):
    p = tmp_path / "meta"
    old, new = b"A" * 100000, b"B" * 150000
    atomic_write(p, old)
    seen = set()
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(p.read_bytes())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for i in range(20):
        atomic_write(p, new if i % 2 == 0 else old)
    stop.set()
    t.join(10)
    assert seen <= {old, new}


def test_concurrent_marks_all_recorded():
    bm = RegionBitmap(4096 * 512, 512)
    firsts = []

    def worker(k):
        n = 0
        for i in range(k, 4096, 4):
            n += bm.mark(i * 512, 512)
            n += bm.mark(((i * 7) % 4096) * 512, 512)
        firsts.append(n)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bm.count() == 4096
    assert sum(firsts) == 4096   # each bit reported as newly dirtied exactly once


@settings(max_examples=150, deadline=None)
@given(
    nregions=st.integers(1, 300),
    tail=st.integers(0, 511),
    ops=st.lists(st.tuples(st.sampled_from(["mark", "mark_region", "clear", "clear_all",
                                            "set_all"]),
                           st.integers(0, 10 ** 6), st.integers(0, 10 ** 6)), max_size=40),
)
def test_model_against_python_set(nregions, tail, ops):
    region = 512
    size = (nregions - 1) * region + tail + 1
    bm = RegionBitmap(size, region)
    model = set()
    for op, a, b in ops:
        if op == "mark":
            off = a % size
            length = b % (size - off + 1)
            new = set(range(off // region, (off + length - 1) // region + 1)) if length else set()
            assert bm.mark(off, length) == bool(new - model)
            model |= new
        elif op == "mark_region":
            i = a % bm.nregions
            assert bm.mark_region(i) == (i not in model)
            model.add(i)
        elif op == "clear":
            i = a % bm.nregions
            assert bm.clear_region(i) == (i in model)
            model.discard(i)
        elif op == "clear_all":
            bm.clear_all()
            model.clear()
        else:
            bm.set_all()
            model = set(range(bm.nregions))
    assert list(bm.dirty_regions()) == sorted(model)
    assert bm.count() == len(model)
    expect_bytes = sum(bm.region_range(i)[1] for i in model)
    assert bm.dirty_bytes() == expect_bytes
    for i in range(bm.nregions):
        assert bm.test_region(i) == (i in model)
    again = RegionBitmap.from_bytes(bm.to_bytes(), size, region)
    assert list(again.dirty_regions()) == sorted(model)


def test_a_save_that_runs_out_of_space_names_the_file(tmp_path, monkeypatch):
    """A write of the state that fails (ENOSPC) names the state file in its error - a write()
    names none, and a resync's failure then said only "No space left on device" (trial 35,
    LOW) - keeps its errno, leaves the old file and no temporary file behind."""
    import errno
    from lvmirror.mirror import bitmap as bitmap_mod
    path = tmp_path / "state.bin"
    bitmap_mod.atomic_write(path, b"old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(bitmap_mod.os, "write", full)
    with pytest.raises(OSError) as ei:
        bitmap_mod.atomic_write(path, b"new")
    assert ei.value.errno == errno.ENOSPC and ei.value.filename == str(path)
    assert str(path) in str(ei.value) and "lvmirror's state" in str(ei.value)
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["state.bin"]
