"""Failing, slow and full disks under the images: the volume keeps serving when it can, says so
when it cannot (offline: NOT READY), logs every image failure, and never fails an image for a
full file system."""

import errno
import logging
import threading
import time

import pytest

from lvmirror.errors import ImageIOError, StateError, VolumeIOError
from lvmirror.mirror import bitmap as bitmap_mod
from lvmirror.mirror.volume import ImageState
from lvmirror.scsi import CHECK_CONDITION, GOOD, LogicalUnit, parse_sense

from tests.unit.test_volume_helpers import (BS, Gate, GatedImage, Opener, image_bytes,
                                            make_volume, pattern, read, wait_until, write)

TUR = bytes(6)


def _scsi(lu, cdb, out=b"", in_len=0):
    buf = bytearray(in_len)
    r = lu.execute(bytes(cdb), [memoryview(bytearray(out))] if out else [],
                   [memoryview(buf)] if in_len else [])
    return r, bytes(buf)


def _sense(r):
    assert r.status == CHECK_CONDITION, r
    return parse_sense(r.sense)


def _write10(lba, n):
    return bytes([0x2A, 0]) + lba.to_bytes(4, "big") + bytes([0]) + n.to_bytes(2, "big") + b"\0"


def _read10(lba, n):
    return bytes([0x28, 0]) + lba.to_bytes(4, "big") + bytes([0]) + n.to_bytes(2, "big") + b"\0"


def test_every_image_failing_takes_the_volume_offline_and_back(tmp_path, caplog):
    """The issue's case 1: both images return EIO on everything. The first write gets MEDIUM
    ERROR / WRITE ERROR; from then on medium access and TEST UNIT READY get NOT READY /
    MANUAL INTERVENTION REQUIRED (02/04/03), status says offline and why, the journal has
    one error line per image. Once the disk answers again, the probe brings the volume back
    (TUR GOOD), and a resync of the failed image makes it optimal."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096)
    lu = LogicalUnit(vol)
    write(vol, 0, pattern(8, 1))
    for p in paths:
        opener.by_path[p].fail_writes = opener.by_path[p].fail_reads = True
    with caplog.at_level(logging.WARNING, logger="lvmirror.mirror.volume"):
        r, _ = _scsi(lu, _write10(8, 1), out=bytes(pattern(1, 2)))
        assert _sense(r) == (0x3, 0x0C, 0x00)                       # the failing write itself
        assert _sense(_scsi(lu, TUR)[0]) == (0x2, 0x04, 0x03)
        assert _sense(_scsi(lu, _read10(0, 1), in_len=BS)[0]) == (0x2, 0x04, 0x03)
        assert _sense(_scsi(lu, bytes([0x35] + [0] * 9))[0]) == (0x2, 0x04, 0x03)  # SYNC CACHE
    assert vol.health == "offline" and "last in-sync image" in vol.offline
    states = [i.state for i in vol.images]
    assert states == [ImageState.FAILED, ImageState.IN_SYNC]
    assert vol.images[1].error and "injected write error" in vol.images[1].error
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"image 0 ({paths[0]}) failed" in m and "errno" in m for m in lines), lines
    assert any("OFFLINE" in m and paths[1] in m for m in lines), lines
    assert vol.probe() is False                                      # still broken
    for p in paths:
        opener.by_path[p].fail_writes = opener.by_path[p].fail_reads = False
    with caplog.at_level(logging.WARNING, logger="lvmirror.mirror.volume"):
        assert vol.probe() is True
    assert any("back ONLINE" in r.getMessage() for r in caplog.records)
    assert _scsi(lu, TUR)[0].status == GOOD
    assert vol.health == "degraded"
    assert read(vol, 0, 8) == pattern(8, 1)
    job = vol.resync(0)
    assert job.wait(10) and job.state == "done"
    assert vol.health == "optimal"
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol.close()


def test_a_bad_sector_on_the_last_image_is_a_medium_error_not_an_outage(tmp_path):
    """A read error on the last in-sync image whose first block still reads is one bad range:
    MEDIUM ERROR for that read, the volume stays online."""

    class BadSector(GatedImage):
        def readv(self, offset, buffers):
            if offset == 64 * BS:
                raise ImageIOError(self, errno.EIO, "bad sector", op="read", offset=offset)
            return super().readv(offset, buffers)

    class BadOpener(Opener):
        def __call__(self, path, *, direct=False):
            img = BadSector.open(path, direct=direct)
            img.gates = []
            self.by_path[str(path)] = img
            return img

    vol, opener, paths = make_volume(tmp_path, 1, opener=BadOpener())
    with pytest.raises(VolumeIOError):
        read(vol, 64, 1)
    assert vol.health == "optimal" and vol.offline is None
    assert read(vol, 0, 1) == bytes(BS)
    vol.close()


def test_metadata_save_failure_is_logged_not_swallowed(tmp_path, caplog, monkeypatch):
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096)
    real = bitmap_mod.atomic_write

    def refuse(path, data, **kw):
        if str(path).endswith(".bitmap") and "image-" in str(path):
            raise OSError(errno.EIO, "metadata disk failed")
        return real(path, data, **kw)
    monkeypatch.setattr(bitmap_mod, "atomic_write", refuse)
    opener.by_path[paths[1]].fail_writes = True
    with caplog.at_level(logging.ERROR, logger="lvmirror.mirror.volume"):
        write(vol, 0, pattern(1, 5))                                 # served by image 0
    assert vol.images[1].state is ImageState.FAILED
    assert vol.stats["metadata_errors"] == 1
    assert any("cannot save the metadata" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(bitmap_mod, "atomic_write", real)
    vol.close()


class _Full(GatedImage):
    full = False

    def writev(self, offset, buffers, *, fua=False):
        if self.full:
            raise ImageIOError(self, errno.ENOSPC, f"image {self.path}: write failed: No space "
                               f"left on device", op="write", offset=offset)
        return super().writev(offset, buffers, fua=fua)


class _FullOpener(Opener):
    def __call__(self, path, *, direct=False):
        img = _Full.open(path, direct=direct)
        img.gates = []
        self.by_path[str(path)] = img
        return img


def test_a_full_file_system_is_not_a_broken_disk(tmp_path, caplog):
    """Both sparse images on one full file system: the write gets DATA PROTECT / SPACE
    ALLOCATION FAILED WRITE PROTECT (07/27/07, SBC thin provisioning), no image is failed,
    and the LUN writes again once space is freed."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096, opener=_FullOpener())
    lu = LogicalUnit(vol)
    for p in paths:
        opener.by_path[p].full = True
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            r, _ = _scsi(lu, _write10(16, 1), out=bytes(pattern(1, 6)))
            assert _sense(r) == (0x7, 0x27, 0x07)
    assert [i.state for i in vol.images] == [ImageState.IN_SYNC, ImageState.IN_SYNC]
    assert vol.health == "optimal" and _scsi(lu, TUR)[0].status == GOOD
    assert vol.stats["space_errors"] >= 3
    warnings = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
    assert 1 <= len(warnings) <= 2                                   # rate-limited
    per_command = [r for r in caplog.records if r.name == "lvmirror.scsi.lu"]
    assert len(per_command) == 1                                     # one line, not one a write
    for p in paths:
        opener.by_path[p].full = False
    assert _scsi(lu, _write10(16, 1), out=bytes(pattern(1, 7)))[0].status == GOOD
    assert read(vol, 16, 1) == pattern(1, 7)
    vol.close()


def test_one_full_image_is_failed_for_the_range_only(tmp_path):
    """Only one image's file system is full: the other took the write, so the full one is set
    aside with just that range to resync (not a full resync)."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096, opener=_FullOpener())
    opener.by_path[paths[1]].full = True
    write(vol, 16, pattern(1, 8))
    assert vol.images[1].state is ImageState.FAILED
    assert vol.images[1].dirty_bytes == 4096
    opener.by_path[paths[1]].full = False
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done" and job.progress()["bytes_done"] == 4096
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol.close()


@pytest.mark.parametrize("fanout", ["auto", "parallel"])
def test_a_slow_leg_is_failed_after_leg_timeout_and_the_write_completes(tmp_path, fanout):
    """The issue's case 3, scaled down: image 1 holds every write (dm-delay); with leg_timeout
    0.3 s a FUA write completes in about that time without it, image 1 is failed as slow with
    just the written range to resync, and once it answers again a resync makes the images
    identical. Image 0 is never failed: it is the one that finished."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096, leg_timeout=0.3,
                                     fanout=fanout)
    gate = Gate(match=lambda op, off, ln: op == "write", count=100)
    opener.by_path[paths[1]].gates = [gate]
    t0 = time.monotonic()
    write(vol, 16, pattern(2, 9), fua=True)
    took = time.monotonic() - t0
    assert took < 3, f"the write waited {took:.1f} s for the slow leg"
    assert vol.images[0].state is ImageState.IN_SYNC
    assert vol.images[1].state is ImageState.FAILED
    assert "slow" in vol.images[1].error and vol.stats["slow_legs"] == 1
    gate.open()                                  # the disk answers again
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    assert job.progress()["bytes_done"] == 4096
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol.close()


def test_legs_slow_together_are_not_failed(tmp_path):
    """Both legs equally slow (a burst of flushes): nobody lags behind the other, so nothing is
    failed however long the I/O takes."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096, leg_timeout=0.2,
                                     fanout="parallel")
    gates = [Gate(match=lambda op, off, ln: op == "write") for _ in paths]
    for p, g in zip(paths, gates):
        opener.by_path[p].gates = [g]
    t = threading.Thread(target=write, args=(vol, 0, pattern(1, 10)), daemon=True)
    t.start()
    for g in gates:
        g.wait_reached()
    time.sleep(0.5)                                # longer than leg_timeout, both held
    for g in gates:
        g.open()
    t.join(10)
    assert [i.state for i in vol.images] == [ImageState.IN_SYNC, ImageState.IN_SYNC]
    vol.close()


def test_offline_volume_refuses_io_with_a_state_error(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 1)
    opener.by_path[paths[0]].fail_writes = True
    opener.by_path[paths[0]].fail_reads = True
    with pytest.raises(VolumeIOError):
        write(vol, 0, pattern(1, 11))
    with pytest.raises(StateError, match="offline"):
        read(vol, 0, 1)
    with pytest.raises(StateError, match="offline"):
        vol.check_ready()
    opener.by_path[paths[0]].fail_writes = opener.by_path[paths[0]].fail_reads = False
    assert vol.probe()
    vol.check_ready()
    vol.close()


def test_a_failed_flush_marks_only_what_may_not_be_durable(tmp_path):
    """SYNCHRONIZE CACHE fails on one image: which writes it lost is unknown, but only regions
    the write-intent log still marks can hold data not yet durable there; those (not the
    whole image) are marked for its resync."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096)
    write(vol, 0, pattern(8, 12))
    vol.checkpoint()                                  # flushed everywhere; the log is clean
    write(vol, 64, pattern(8, 13))                    # region 8, not flushed yet
    opener.by_path[paths[1]].fail_writes = True       # its flush fails (fsync error)
    vol.flush()                                       # served: image 0 flushed it
    assert vol.images[1].state is ImageState.FAILED
    assert list(vol.change_bitmap(1).dirty_regions()) == [64 * BS // 4096]
    opener.by_path[paths[1]].fail_writes = False
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done" and job.progress()["bytes_done"] == 4096
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol.close()


def test_a_flush_failing_on_every_image_says_flush(tmp_path):
    """SYNCHRONIZE CACHE fails on both images: the error and the offline reason name the
    flush, not a write (trial 23: "write failed on every in-sync image" for a flush)."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096)
    write(vol, 64, pattern(8, 13))                    # not flushed yet
    for p in paths:
        opener.by_path[p].fail_writes = True          # every flush fails (fsync error)
    with pytest.raises(VolumeIOError, match="flush failed on every in-sync image"):
        vol.flush()
    assert vol.health == "offline" and "flush failed" in vol.offline, vol.offline
    assert "write failed" not in vol.offline, vol.offline
    for p in paths:
        opener.by_path[p].fail_writes = False
    assert vol.probe()
    vol.close()


class _PartlyFull(_Full):
    """Out of space after writing what it could: the data lands, then ENOSPC (a write that
    filled the file system half way)."""

    def writev(self, offset, buffers, *, fua=False):
        if self.full:
            GatedImage.writev(self, offset, buffers, fua=fua)
            raise ImageIOError(self, errno.ENOSPC, f"image {self.path}: write failed part way: "
                               f"No space left on device", op="write", offset=offset)
        return GatedImage.writev(self, offset, buffers, fua=fua)


class _MixedOpener(Opener):
    def __call__(self, path, *, direct=False):
        cls = _PartlyFull if str(path).endswith("img0") else _Full
        img = cls.open(path, direct=direct)
        img.gates = []
        self.by_path[str(path)] = img
        return img


def test_a_write_torn_by_a_full_file_system_reads_the_same_and_is_repaired(tmp_path):
    """Image 0 wrote the data before its file system filled, image 1 wrote none of it: the
    images differ in that range, the write failed (07/27/07). Every read of the range gives the
    same answer (one image serves it), the write-intent log keeps the region, and once space is
    freed the next checkpoint copies it so the images agree."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096, opener=_MixedOpener())
    write(vol, 16, pattern(4, 20))
    vol.checkpoint()
    for p in paths:
        opener.by_path[p].full = True
    with pytest.raises(VolumeIOError) as ei:
        write(vol, 16, pattern(4, 21))
    assert ei.value.out_of_space
    assert image_bytes(paths[0], 16 * BS, 4 * BS) != image_bytes(paths[1], 16 * BS, 4 * BS)
    answers = {read(vol, 16, 4) for _ in range(6)}
    assert len(answers) == 1                                        # never alternates
    vol.checkpoint()                                                 # still full: kept
    assert (16 * BS) // 4096 in set(vol._wil.bitmap.dirty_regions())
    for p in paths:
        opener.by_path[p].full = False
    vol.checkpoint()                                                 # repaired, then cleaned
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    assert not list(vol._wil.bitmap.dirty_regions())
    vol.close()


def test_a_split_copies_torn_regions_first(tmp_path):
    """A split while the images differ in a region (a torn write; crash recovery still copying
    is the same case) copies the region first: the split image holds what the volume's reads
    returned before T, not its own version."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=4096, opener=_MixedOpener())
    write(vol, 16, pattern(4, 20))
    vol.checkpoint()
    for p in paths:
        opener.by_path[p].full = True
    with pytest.raises(VolumeIOError):
        write(vol, 16, pattern(4, 21))         # lands on image 0 only
    served = read(vol, 16, 4)
    assert image_bytes(paths[2], 16 * BS, 4 * BS) != served
    for p in paths:
        opener.by_path[p].full = False
    vol.split(2)
    assert image_bytes(paths[2], 16 * BS, 4 * BS) == served
    assert vol.stats["torn_regions"] == 0
    vol.close()


def test_torn_regions_left_at_close_are_repaired_at_the_next_open(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096, opener=_MixedOpener())
    for p in paths:
        opener.by_path[p].full = True
    with pytest.raises(VolumeIOError):
        write(vol, 40, pattern(2, 22))
    vol.close()                                                      # still full at close
    from lvmirror.mirror.volume import MirrorVolume
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1])


def test_a_refused_write_is_never_served_from_the_page_cache(tmp_path):
    """A failed write or flush may leave the refused data in the page cache (the kernel keeps a
    page whose writeback failed): the image's cache is dropped for the range, and the whole
    of it when the volume comes back online, so neither a read nor a resync serves it."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096)
    opener.by_path[paths[1]].fail_writes = True
    write(vol, 16, pattern(2, 30))
    assert vol.images[1].state is ImageState.FAILED
    assert vol.image_storage(1).stats["cache_drops"] == 1
    opener.by_path[paths[0]].fail_writes = True
    with pytest.raises(VolumeIOError):
        write(vol, 32, pattern(2, 31))                  # the last in-sync image: offline
    assert vol.image_storage(0).stats["cache_drops"] == 1
    opener.by_path[paths[0]].fail_writes = False
    assert vol.probe()
    assert vol.image_storage(0).stats["cache_drops"] == 2
    vol.close()


def test_an_offline_volume_refuses_copies_until_its_image_answers(tmp_path):
    """The last in-sync image failed a write: the volume is offline, and a resync, a restore
    or an attach would copy from (or into) an image that may have lost data. Each is refused
    with a StateError that says the volume is offline and why, before anything is saved; once
    the image answers again (``probe``) the same resync runs."""
    vol, opener, paths = make_volume(tmp_path, 2)
    vol.split(1)
    write(vol, 0, pattern(1, 12))                  # image 1 misses it: its bitmap marks it
    opener.by_path[paths[0]].fail_writes = True
    with pytest.raises(VolumeIOError):
        write(vol, 8, pattern(1, 13))
    assert vol.health == "offline"
    jobs = dict(vol.jobs)
    for op in (lambda: vol.resync(1), lambda: vol.restore(1),
               lambda: vol.attach(str(tmp_path / "new.img"))):
        with pytest.raises(StateError, match=r"is offline \(image 0 .*last in-sync"):
            op()
    assert not (tmp_path / "new.img").exists()     # refused before the image was created
    assert vol.images[1].state is ImageState.SPLIT and vol.jobs == jobs
    opener.by_path[paths[0]].fail_writes = False
    assert vol.probe()
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    assert read(vol, 0, 1) == pattern(1, 12) and image_bytes(paths[0]) == image_bytes(paths[1])
    vol.close()


REGION64 = 64 << 10


def _resync_held_at_region_8(tmp_path):
    """A 2-image volume (64 KiB regions) with image 1 split, 16 regions written, and image 1's
    resync running, held at its copy of region 8 (regions 0-7 copied). Returns (vol, opener,
    paths, gate, job); ``gate.open()`` lets the copy go on."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION64)
    vol.split(1)
    for r in range(16):
        write(vol, r * 128, pattern(128, 100 + r))
    gate = Gate(lambda op, off, ln: op == "write" and off == 8 * REGION64)
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.resync(1)
    gate.wait_reached()
    return vol, opener, paths, gate, job


@pytest.mark.parametrize("running", [True, False], ids=["resync-running", "resync-paused"])
def test_a_write_the_last_in_sync_image_refused_is_copied_again_into_a_syncing_one(tmp_path,
                                                                                   running):
    """A region a resync already copied; a write there fails on the last in-sync image (the
    volume goes offline) but the syncing image took it. The range is marked in the syncing
    image's bitmap, a running resync stops (its image still syncing, the journal says why),
    and once the image answers again the resync copies the region back: the two images,
    both in sync, agree. (Trial 13: the resync marked its image in sync while offline, and
    reads of that region then alternated between the old data and the unacknowledged write;
    paused and resumed after the probe, the same.)"""
    R = REGION64
    vol, opener, paths, gate, job = _resync_held_at_region_8(tmp_path)
    if not running:
        job.cancel()
        gate.open()
        assert job.wait(10) and job.state == "cancelled"
    assert not vol.change_bitmap(1).test_region(2)     # copied already
    opener.by_path[paths[0]].fail_writes = True
    with pytest.raises(VolumeIOError):
        write(vol, 2 * 128, pattern(128, 999))
    assert vol.health == "offline"
    assert vol.change_bitmap(1).test_region(2)
    saved = bitmap_mod.RegionBitmap.load(vol._bitmap_path(vol._images[1]), vol.size, R)
    assert saved.test_region(2)                       # on disk at once, no image flushed
    if running:
        gate.open()
        assert job.wait(10) and job.state == "failed" and "went offline" in job.error
    assert vol.images[1].state is ImageState.SYNCING
    opener.by_path[paths[0]].fail_writes = False
    stopped = job
    assert vol.probe()
    if running:
        # stopped by the volume going offline: it goes on by itself once the volume is back
        # (JobControl.resume_after_offline); one the operator cancelled does not
        key = vol._images[1].rec.id
        wait_until(lambda: vol.jobs[key] is not stopped, 10)
        job = vol.jobs[key]
        assert job.kind == "resync"
    else:
        for t in threading.enumerate():              # the probe's resume thread: done
            if t.name == f"{vol.name}-resume":
                t.join(10)
        assert vol.jobs[vol._images[1].rec.id] is stopped
        job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    assert [i.state for i in vol.images] == [ImageState.IN_SYNC, ImageState.IN_SYNC]
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    assert {read(vol, 2 * 128, 128) for _ in range(8)} == {image_bytes(paths[0], 2 * R, R)}
    vol.close()


def test_idle_checkpoints_during_a_resync_flush_nothing(tmp_path):
    """With no write-intent bit set and no split or failed image's bitmap to save, a checkpoint
    writes nothing and flushes no image, also while a resync runs (trial 14: saving syncing
    images' bitmaps in every checkpoint made each idle flusher round of a resync flush every
    image, 10 flushes in 5 rounds; the refused write's marks are saved where they are made)."""
    vol, opener, paths, gate, job = _resync_held_at_region_8(tmp_path)
    vol.checkpoint()
    assert vol._wil.bitmap.count() == 0
    before = vol._barrier.stats["flushes"]
    for _ in range(5):
        assert vol.checkpoint(hold=True) == 0
    assert vol._barrier.stats["flushes"] == before
    gate.open()
    assert job.wait(10) and job.state == "done"
    vol.close()


def _slow_restore(tmp_path):
    """A 2-image volume: A everywhere, image 1 split, B written over the live image and
    flushed; a restore from image 1 running slowly. Returns (vol, opener, paths, job)."""
    vol, opener, paths = make_volume(tmp_path, 2)
    n = vol.num_blocks
    write(vol, 0, b"A" * n * BS)
    vol.split(1)
    write(vol, 0, b"B" * n * BS)
    vol.flush()
    return vol, opener, paths, vol.restore(1, rate_limit=0.05)


def _restore_stopped_offline(tmp_path):
    """``_slow_restore``, stopped by the volume going offline (image 0's flush fails).
    Returns (vol, opener, paths, the stopped job); the flushes answer again."""
    vol, opener, paths, job = _slow_restore(tmp_path)
    opener.by_path[paths[0]].fail_flushes = True
    with pytest.raises(Exception):
        vol.flush()
    assert vol.health == "offline"
    job.set_rate_limit(None)
    assert job.wait(10) and job.state == "failed" and job.stopped_offline, job.error
    assert "went offline" in job.error and "WentOffline" not in job.error
    opener.by_path[paths[0]].fail_flushes = False
    return vol, opener, paths, job


def _join_resume(vol):
    for t in threading.enumerate():
        if t.name == f"{vol.name}-resume":
            t.join(10)


def test_a_restore_given_up_while_offline_is_not_started_again_by_the_probe(tmp_path):
    """Trial and review of 2026-12-06, HIGH: a restore stopped by the volume going offline
    and given up by the operator meanwhile (``abandon-restore``, the documented way out)
    was started anew by the probe - the whole volume rolled back to the split, every write
    since lost. A restore given up is never taken up again."""
    vol, opener, paths, job = _restore_stopped_offline(tmp_path)
    left = vol.abandon_restore(1)
    assert left["regions"] > 0
    assert vol.probe()
    _join_resume(vol)
    assert vol.control.restore_job is None
    assert not any(j.is_alive() for j in vol.jobs.values())
    data = read(vol, 0, vol.num_blocks)
    assert data.count(b"B") >= left["bytes"], "writes made since the split rolled back"
    vol.close()


def test_a_job_stopped_offline_and_cancelled_stays_stopped(tmp_path):
    """Trial of 2026-12-06, MEDIUM: ``lvmirror cancel`` of a resync or restore the volume's
    going offline stopped answered "no job running", and the job went on once the volume
    was back. Cancelled (``forget_resume``) it stays stopped; a resync then does not resume
    at the next open either."""
    vol, opener, paths, job = _restore_stopped_offline(tmp_path)
    assert vol.forget_resume(1) is True
    assert vol.forget_resume(1) is False                 # nothing waits any more
    assert vol.probe()
    _join_resume(vol)
    assert vol.jobs[vol._images[1].rec.id] is job and not job.is_alive()
    again = vol.restore(1)                               # the operator's own, by hand
    again.set_rate_limit(None)
    assert again.wait(10) and again.state == "done"
    assert read(vol, 0, vol.num_blocks) == b"A" * vol.num_blocks * BS
    vol.close()


def test_a_restore_resumed_by_hand_first_is_not_started_again(tmp_path, monkeypatch):
    """Review of 2026-12-06, HIGH: the operator resumed the stopped restore by hand as the
    volume came back and it finished before the probe's thread got to it; that thread then
    started a new restore, rolling back the writes made since. The thread takes a job up
    only if it is still the stopped one, under the management lock."""
    vol, opener, paths, job = _restore_stopped_offline(tmp_path)
    go, judging = threading.Event(), threading.Event()
    real = vol.control._copy_verdict

    def verdict(img, **kw):                  # the probe's thread, judging the image: held
        v = real(img, **kw)
        if threading.current_thread().name == f"{vol.name}-resume":
            judging.set()
            assert go.wait(20)
        return v
    monkeypatch.setattr(vol.control, "_copy_verdict", verdict)
    assert vol.probe()
    assert judging.wait(10)
    mine = vol.restore(1)                                # the operator, first
    mine.set_rate_limit(None)
    assert mine.wait(10) and mine.state == "done"
    write(vol, 0, b"C" * 8 * BS)                         # written after the roll-back
    go.set()
    _join_resume(vol)
    assert not any(j.is_alive() for j in vol.jobs.values())
    assert vol.control.restore_job is None
    assert read(vol, 0, 8) == b"C" * 8 * BS
    vol.close()


def test_a_resync_stopped_offline_and_cancelled_is_not_resumed(tmp_path):
    """The resync's side of ``forget_resume``: stopped by the volume going offline and
    cancelled, it does not go on at the probe, and its image stays syncing with no resume
    point (a cancelled resync is not resumed at the next open)."""
    vol, opener, paths, gate, job = _resync_held_at_region_8(tmp_path)
    opener.by_path[paths[0]].fail_writes = True
    with pytest.raises(VolumeIOError):
        write(vol, 2 * 128, pattern(128, 999))
    assert vol.health == "offline"
    gate.open()
    assert job.wait(10) and job.stopped_offline
    opener.by_path[paths[0]].fail_writes = False
    assert vol._images[1].rec.resync_next is not None    # kept: it goes on once back
    assert vol.forget_resume(1)
    assert vol._images[1].rec.resync_next is None
    assert vol.probe()
    _join_resume(vol)
    assert vol.jobs[vol._images[1].rec.id] is job
    assert vol.images[1].state is ImageState.SYNCING
    vol.close()


def _resync_ending_offline(tmp_path, monkeypatch):
    """A resync stopped by the volume going offline (image 0 refuses a write), held as it
    ends, while it saves its bitmap (``pause_resync``). Returns (vol, opener, paths, job,
    go: set it to let the job end); image 0 answers again."""
    from lvmirror.mirror import jobcontrol
    vol, opener, paths, gate, job = _resync_held_at_region_8(tmp_path)
    saving, go = threading.Event(), threading.Event()
    real = jobcontrol.JobControl.pause_resync

    def slow_pause(self, img, *, keep_resume):
        saving.set()
        assert go.wait(20)
        return real(self, img, keep_resume=keep_resume)
    monkeypatch.setattr(jobcontrol.JobControl, "pause_resync", slow_pause)
    opener.by_path[paths[0]].fail_writes = True
    with pytest.raises(VolumeIOError):
        write(vol, 2 * 128, pattern(128, 999))
    gate.open()
    assert saving.wait(10) and job.is_alive()
    opener.by_path[paths[0]].fail_writes = False
    return vol, opener, paths, job, go


def test_a_job_stopped_offline_is_taken_up_even_if_the_probe_came_as_it_ended(tmp_path,
                                                                              monkeypatch):
    """Review of 2026-12-06, MEDIUM: a resync stopped by the volume going offline was still
    saving its bitmap when the probe brought the volume back; the probe's thread found it
    alive, skipped it, and it then ended waiting for a take-up that never came. The thread
    now waits for such a job to end first."""
    vol, opener, paths, job, go = _resync_ending_offline(tmp_path, monkeypatch)
    assert vol.probe()                                  # the job is still ending
    go.set()
    _join_resume(vol)
    new = vol.jobs[vol._images[1].rec.id]
    assert new is not job and new.kind == "resync", "the stopped resync was not taken up"
    assert new.wait(10) and new.state == "done"
    vol.close()


def test_a_cancel_while_the_job_ends_for_going_offline_keeps_it_stopped(tmp_path,
                                                                        monkeypatch):
    """Review of 2026-12-06, MEDIUM: ``cancel`` of a resync that was ending because the volume
    went offline (still alive, so the cancel took the running-job path) was ignored: the
    probe then resumed the resync the operator had cancelled. The host's cancel asks
    ``forget_resume`` once the job ended: it stays stopped, with no resume point."""
    vol, opener, paths, job, go = _resync_ending_offline(tmp_path, monkeypatch)
    job.cancel()                                        # the operator, as it ends
    go.set()
    assert job.wait(10)
    assert vol.forget_resume(1)                         # what the host's cancel does next
    assert not job.stopped_offline and vol._images[1].rec.resync_next is None
    assert vol.probe()
    _join_resume(vol)
    assert vol.jobs[vol._images[1].rec.id] is job
    vol.close()


def test_a_restore_whose_own_write_took_the_volume_offline_goes_on_after_the_probe(tmp_path):
    """Trial of 2026-12-06, MEDIUM: a restore whose own write to the live image failed (the
    volume going offline with it) ended failed and stayed so after the probe, the volume
    degraded: only a job that found the volume offline went on. A job whose own I/O failed
    as the volume went offline goes on too."""
    vol, opener, paths, job = _slow_restore(tmp_path)
    n = vol.num_blocks
    opener.by_path[paths[0]].fail_writes = True
    job.set_rate_limit(None)
    assert job.wait(10) and job.state == "failed"
    assert vol.health == "offline" and job.stopped_offline, job.error
    opener.by_path[paths[0]].fail_writes = False
    assert vol.probe()
    _join_resume(vol)
    new = vol.control.restore_job
    assert new is not None and new is not job
    new.set_rate_limit(None)
    assert new.wait(10) and new.state == "done", new.error
    assert read(vol, 0, n) == b"A" * n * BS
    vol.close()


def test_a_resync_stopped_while_its_checkpoint_is_in_flight_goes_on(tmp_path):
    """Trial of 2026-12-06, MEDIUM: a resync stopped by the volume going offline waited for
    its checkpoint in flight before it said it stopped so; a probe meanwhile found nothing to
    take up, and the resync stayed stopped for good. It says so first now."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION64)
    vol.split(1)
    for r in range(16):
        write(vol, r * 128, pattern(128, 100 + r))
    gate = Gate(lambda op, off, ln: op == "flush")
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.resync(1, rate_limit=0.2)
    gate.wait_reached()                                  # a checkpoint's flush, held
    opener.by_path[paths[0]].fail_writes = True
    with pytest.raises(VolumeIOError):
        write(vol, 2 * 128, pattern(128, 999))
    job.set_rate_limit(None)
    wait_until(lambda: job.stopped_offline, 10)          # stopped, still in its checkpoint
    opener.by_path[paths[0]].fail_writes = False
    assert vol.probe()
    gate.open()
    _join_resume(vol)
    new = vol.jobs[vol._images[1].rec.id]
    assert new is not job and new.kind == "resync"
    assert new.wait(10) and new.state == "done", new.error
    vol.close()


def test_a_take_up_refused_for_good_stops_saying_it_goes_on(tmp_path):
    """Third review of 2026-12-06, HIGH: a resync stopped by the volume going offline whose
    image then failed (refused at the take-up: not syncing) kept saying it goes on
    (``resumes``), and a ``--wait`` waited for ever. Refused while the volume is online, it
    no longer does."""
    vol, opener, paths, gate, job = _resync_held_at_region_8(tmp_path)
    opener.by_path[paths[0]].fail_writes = True
    with pytest.raises(VolumeIOError):
        write(vol, 2 * 128, pattern(128, 999))
    gate.open()
    assert job.wait(10) and job.stopped_offline
    opener.by_path[paths[0]].fail_writes = False
    img = vol._images[1]
    with vol._meta:                                      # the target fails meanwhile
        vol._fail_leg(img, img.bitmap, True, "injected", lambda: None)
    assert vol.probe()
    _join_resume(vol)
    assert vol.jobs[img.rec.id] is job and not job.stopped_offline
    assert not job.progress()["resumes"]
    vol.close()


def test_a_restore_taken_up_that_fails_again_at_once_is_not_restarted(tmp_path):
    """Third review of 2026-12-06, HIGH: a restore whose own write fails on a bad region of
    the last in-sync image took the volume offline; taken up after the probe, it failed there
    again at once, and again after every probe: the volume never served for long. One taken
    up that fails by its own I/O before it copied anything stops for good."""
    vol, opener, paths, job = _slow_restore(tmp_path)
    bad = opener.by_path[paths[0]]
    bad.fail_writes = True
    job.set_rate_limit(None)
    assert job.wait(10) and job.stopped_offline
    bad.fail_writes = False
    real_writev = bad.writev

    def writev(offset, buffers, *, fua=False):       # region 0 stays bad for the restore
        if offset < 64 << 10 and not fua:
            raise ImageIOError(bad, errno.EIO, "injected: a bad region")
        return real_writev(offset, buffers, fua=fua)
    bad.writev = writev
    assert vol.probe()
    _join_resume(vol)
    again = vol.control.restore_job
    assert again is not job and again.resumed_after_offline
    assert again.wait(10) and again.state == "failed" and vol.health == "offline"
    assert not again.stopped_offline, "it would be restarted at every probe"
    bad.writev = real_writev
    vol.close()


def test_a_job_cancelled_as_it_ends_is_not_taken_up_even_before_forget_resume(tmp_path,
                                                                              monkeypatch):
    """Third review of 2026-12-06, MEDIUM: a cancel as the job ended for going offline kept
    it stopped only if the host's ``forget_resume`` got the management lock before the
    probe's thread did. A job cancelled (``cancelled_by_request``) is never taken up."""
    vol, opener, paths, job, go = _resync_ending_offline(tmp_path, monkeypatch)
    job.cancel()
    go.set()
    assert job.wait(10)
    assert vol.probe()                                  # before any forget_resume
    _join_resume(vol)
    assert vol.jobs[vol._images[1].rec.id] is job
    vol.close()
