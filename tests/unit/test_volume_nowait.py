"""Reads without blocking (``read(nowait=True)``): what the ring thread answers itself.

A nowait read is answered only from an in-sync image's page cache (preadv RWF_NOWAIT) with the
range's region lock free; otherwise it raises WouldBlock having changed nothing (no image failed,
nothing counted), and the same read run normally gives the answer. The images live in tmp_path
(ext4 here: tmpfs refuses RWF_NOWAIT; a tmpfs image reads without it, test_volume_io)."""

import os
import time

import pytest

from lvmirror.errors import WouldBlock
from lvmirror.mirror.volume import ImageState
from lvmirror.scsi import LogicalUnit

from tests.unit.test_volume_helpers import (BS, drop_page_cache, make_volume, pattern, read,
                                            write)


def _nowait_supported(tmp_path):
    p = tmp_path / "probe"
    p.write_bytes(b"x" * 4096)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def vol(tmp_path):
    if not _nowait_supported(tmp_path):
        pytest.skip(f"{tmp_path}: the file system does not support RWF_NOWAIT reads")
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096)
    write(vol, 0, pattern(64, 3))
    yield vol, opener, paths
    vol.close()


def _read_nowait(vol, lba, n):
    buf = bytearray(n * BS)
    vol.read(lba, [memoryview(buf)], nowait=True)
    return bytes(buf)


def _evict(v, paths) -> int:
    """Drop the images' pages until a nowait read of the first 64 blocks misses them; returns
    the volume's read count just before that read (a nowait read that still found the pages -
    DONTNEED is advice, a busy host keeps pages under writeback - is a read, and counted)."""
    for _ in range(50):
        drop_page_cache(paths)
        before = v.stats["reads"]
        try:
            _read_nowait(v, 0, 64)
        except WouldBlock:
            return before
        time.sleep(0.05)
    pytest.fail("the images' pages never left the page cache")


def test_cached_data_is_read_without_blocking(vol):
    v, _, _ = vol
    assert v.supports_nowait
    before = v.stats["reads"]
    assert _read_nowait(v, 0, 64) == pattern(64, 3)
    assert v.stats["reads"] == before + 1


def test_a_write_holding_the_range_makes_it_wait(vol):
    v, _, _ = vol
    before = v.stats["reads"]
    lk = v.locks.lock(8, 8)                      # what an in-flight write holds
    with pytest.raises(WouldBlock, match="a write holds the range"):
        _read_nowait(v, 0, 16)
    assert _read_nowait(v, 16, 8) == pattern(64, 3)[16 * BS:24 * BS]   # elsewhere: fine
    lk.release()
    assert _read_nowait(v, 0, 16) == pattern(64, 3)[:16 * BS]
    assert v.stats["reads"] == before + 2


def test_data_not_in_the_page_cache_makes_it_wait(vol):
    v, _, paths = vol
    v.flush()
    # the pages leave the cache (DONTNEED is advice: a page the kernel still holds - under
    # writeback on a busy host - stays, so the test drops them again until none is left)
    before = _evict(v, paths)
    assert v.stats["reads"] == before            # the read that missed counted nothing
    assert read(v, 0, 64) == pattern(64, 3)      # the blocking read brings them back
    assert _read_nowait(v, 0, 64) == pattern(64, 3)


def test_an_image_error_is_left_to_the_blocking_read(vol):
    """A nowait read never fails an image: the worker's read does, and serves from the other."""
    v, opener, paths = vol
    for p in paths:
        opener.by_path[p].fail_reads = True
    opener.by_path[paths[1]].fail_reads = False
    for _ in range(4):                            # whichever image the round robin picks
        try:
            _read_nowait(v, 0, 8)
        except WouldBlock:
            pass
    assert all(i.state is ImageState.IN_SYNC for i in v.images)
    assert read(v, 0, 8) == pattern(64, 3)[:8 * BS]
    assert v.images[0].state is ImageState.FAILED


def test_restore_or_direct_io_always_waits(vol, tmp_path):
    v, _, _ = vol
    v.split(1)
    write(v, 0, pattern(8, 9))
    job = v.restore(1, rate_limit=0.001)
    try:
        with pytest.raises(WouldBlock, match="restore"):
            _read_nowait(v, 32, 8)
    finally:
        job.stop()
        job.wait(10)
    v._direct = True
    assert not v.supports_nowait
    with pytest.raises(WouldBlock):
        _read_nowait(v, 32, 8)
    v._direct = False


def test_the_scsi_core_answers_only_reads_and_writes_without_blocking(vol):
    v, _, _ = vol
    lu = LogicalUnit(v)
    buf = bytearray(8 * BS)
    resp = lu.execute(bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0]), (), [memoryview(buf)],
                      nowait=True)
    assert resp.status == 0 and bytes(buf) == pattern(64, 3)[8 * BS:16 * BS]
    bad = lu.execute(bytes([0x28, 0, 0xFF, 0xFF, 0xFF, 0, 0, 0, 8, 0]), (), [memoryview(buf)],
                     nowait=True)
    assert bad.status == 2                        # LBA out of range: answered, not deferred
    with pytest.raises(WouldBlock):               # not a READ or WRITE: to a worker
        lu.execute(bytes(6), nowait=True)
    with pytest.raises(WouldBlock):               # SYNCHRONIZE CACHE waits for the devices
        lu.execute(bytes([0x35] + [0] * 9), nowait=True)
    assert v.supports_nowait_write
    data = pattern(1, 9)
    resp = lu.execute(bytes([0x2A, 0, 0, 0, 0, 3, 0, 0, 1, 0]), [memoryview(data)], (),
                      nowait=True)
    assert resp.status == 0 and read(v, 3, 1) == data
    for path in vol[2]:                           # on every image
        with open(path, "rb") as f:
            f.seek(3 * BS)
            assert f.read(BS) == data


def test_a_write_that_would_wait_is_left_to_a_worker_unchanged(vol):
    """WRITE with nowait: FUA (or the write cache off) waits for the device, a held range for
    the other I/O, a restore for its copy: WouldBlock, nothing written, nothing counted; the
    same command run normally then writes."""
    v, _, _ = vol
    lu = LogicalUnit(v)
    data = pattern(1, 11)
    old = read(v, 5, 1)
    w10 = bytes([0x2A, 0, 0, 0, 0, 5, 0, 0, 1, 0])
    fua = bytes([0x2A, 0x08, 0, 0, 0, 5, 0, 0, 1, 0])
    before = v.stats["writes"]
    with pytest.raises(WouldBlock, match="FUA"):
        lu.execute(fua, [memoryview(data)], (), nowait=True)
    lu.write_cache = False
    with pytest.raises(WouldBlock, match="FUA"):
        lu.execute(w10, [memoryview(data)], (), nowait=True)
    lu.write_cache = True
    lk = v.locks.lock(4, 4, shared=True)          # a READ in flight, or a D-Bus region lock
    try:
        with pytest.raises(WouldBlock, match="holds the range"):
            lu.execute(w10, [memoryview(data)], (), nowait=True)
    finally:
        lk.release()
    v.control.restore_job = object()              # a restore running
    try:
        with pytest.raises(WouldBlock, match="restore"):
            v.write(5, [memoryview(data)], nowait=True)
    finally:
        v.control.restore_job = None
    assert read(v, 5, 1) == old and v.stats["writes"] == before
    assert lu.execute(w10, [memoryview(data)], ()).status == 0
    assert read(v, 5, 1) == data


def test_nothing_is_counted_twice_when_the_pool_reads_again(vol):
    """A READ whose buffer ends in a partial block needs two backend reads: the ring thread
    leaves it to a worker before the first; a closed image defers without counting an error."""
    v, _, _ = vol
    lu = LogicalUnit(v)
    before = v.stats["reads"]
    with pytest.raises(WouldBlock, match="partial last block"):
        lu.execute(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0]), (),
                   [memoryview(bytearray(BS + 100))], nowait=True, device_ok=True)
    assert v.stats["reads"] == before
    st = v.image_storage(0)
    errors = st.stats["errors"]
    fd, st.fd = st.fd, -1
    try:
        with pytest.raises(WouldBlock, match="closed"):
            st.readv(0, [memoryview(bytearray(BS))], nowait=True)
    finally:
        st.fd = fd
    assert st.stats["errors"] == errors


def test_a_write_to_a_region_the_write_intent_log_does_not_mark_waits_for_a_worker(vol):
    """WRITE with nowait to a region the write-intent log does not mark yet: the log must be
    saved (with an fsync) before the write: WouldBlock, nothing written, nothing counted, the
    log unchanged; the same write run normally marks and saves it, and the next nowait write
    there runs."""
    v, _, paths = vol
    wil = v._wil
    lba = 200                                     # region 25 (4 KiB regions): never written
    region = lba * BS >> wil.region_shift
    assert not wil.bitmap.test_region(region)
    data = pattern(8, 21)
    old = read(v, lba, 8)
    writes, saves = v.stats["writes"], wil.saves
    with pytest.raises(WouldBlock, match="write-intent log"):
        v.write(lba, [memoryview(data)], nowait=True)
    assert read(v, lba, 8) == old and v.stats["writes"] == writes
    assert not wil.bitmap.test_region(region) and wil.saves == saves
    assert wil.inflight_regions() == {}
    v.write(lba, [memoryview(data)])
    assert wil.bitmap.test_region(region) and wil.saves == saves + 1
    again = pattern(8, 22)
    v.write(lba, [memoryview(again)], nowait=True)
    assert read(v, lba, 8) == again and wil.saves == saves + 1
    for p in paths:
        with open(p, "rb") as f:
            f.seek(lba * BS)
            assert f.read(8 * BS) == again


def test_device_ok_waits_for_the_devices_never_for_other_io(vol):
    """``nowait`` with ``device_ok`` (what the ring thread runs at queue depth 1): a page-cache
    miss, FUA and a write-intent log save are waited for, under the range lock it took; a range
    another I/O holds and a restore are WouldBlock with nothing done, FUA too (the command
    goes to a worker, which waits for them)."""
    v, _, paths = vol
    lu = LogicalUnit(v)
    wil = v._wil
    lba = 200                                     # a region the log does not mark yet
    assert not wil.bitmap.test_region(lba * BS >> wil.region_shift)
    data = pattern(8, 31)
    fua = bytes([0x2A, 0x08, 0, 0, 0, lba, 0, 0, 8, 0])
    saves = wil.saves
    assert lu.execute(fua, [memoryview(data)], (), nowait=True, device_ok=True).status == 0
    assert wil.saves == saves + 1 and read(v, lba, 8) == data      # saved, written, durable
    _evict(v, paths)                              # a page-cache miss is read from the device
    buf = bytearray(64 * BS)
    v.read(0, [memoryview(buf)], nowait=True, device_ok=True)
    assert bytes(buf) == pattern(64, 3)
    before = v.stats["writes"]
    lk = v.locks.lock(lba, 8, shared=True)        # a READ in flight, or a D-Bus region lock
    try:
        with pytest.raises(WouldBlock, match="holds the range"):
            lu.execute(fua, [memoryview(pattern(8, 32))], (), nowait=True, device_ok=True)
        with pytest.raises(WouldBlock, match="holds the range"):
            v.write(lba, [memoryview(pattern(8, 32))], nowait=True, device_ok=True)
    finally:
        lk.release()
    lk = v.locks.lock(0, 8)                       # a WRITE in flight
    try:
        with pytest.raises(WouldBlock, match="holds the range"):
            v.read(0, [memoryview(bytearray(8 * BS))], nowait=True, device_ok=True)
    finally:
        lk.release()
    v.control.restore_job = object()              # a restore running: its copy may wait
    try:
        with pytest.raises(WouldBlock, match="restore"):
            lu.execute(fua, [memoryview(pattern(8, 33))], (), nowait=True, device_ok=True)
        with pytest.raises(WouldBlock, match="restore"):
            v.read(0, [memoryview(bytearray(8 * BS))], nowait=True, device_ok=True)
    finally:
        v.control.restore_job = None
    assert v.stats["writes"] == before and read(v, lba, 8) == data


def test_device_ok_leaves_an_image_error_to_a_worker(vol):
    """A read error on the ring thread's queue-depth-1 path is WouldBlock, nothing counted or
    failed: failing an image takes the metadata lock, which a split or a checkpoint may hold, so
    a worker's read does it."""
    v, opener, paths = vol
    for p in paths:
        opener.by_path[p].fail_reads = True
    errors, reads = v.stats["read_errors"], v.stats["reads"]
    with pytest.raises(WouldBlock, match="a worker handles the error"):
        v.read(0, [memoryview(bytearray(8 * BS))], nowait=True, device_ok=True)
    assert (v.stats["read_errors"], v.stats["reads"]) == (errors, reads)
    assert all(i.state is ImageState.IN_SYNC for i in v.images)
