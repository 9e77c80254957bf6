"""Resync: bitmap-driven copy under region locks, while the volume serves I/O; cancel, resume."""

import os
import threading

import pytest

from lvmirror.errors import StateError
from lvmirror.mirror import resync
from lvmirror.mirror.volume import ImageState, MirrorVolume

from tests.unit.test_volume_helpers import (BS, Gate, held_on_error, image_bytes, make_volume,
                                            no_thread_for, pattern, read, run_thread,
                                            wait_until, write)

REGION = 4096


def _copy_gate(nth=1):
    """Hold the nth region-sized write (a resync copy), not the tests' small writes."""
    state = {"n": 0}

    def match(op, off, ln):
        if op == "write" and ln == REGION:
            state["n"] += 1
            return state["n"] == nth
        return False
    return Gate(match)


def _close_during_resync(vol, opener, paths, *, regions, nth, rate):
    """Split image 1, change ``regions`` regions, resync at ``rate`` MB/s and close the volume
    while the ``nth`` copy is held (close stops the job; open resumes it). Returns the job and
    what close returned or raised (run_thread's box)."""
    vol.split(1)
    for lba in range(0, 8 * regions, 8):
        write(vol, lba, pattern(1, lba))
    gate = _copy_gate(nth)
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.resync(1, rate_limit=rate)
    gate.wait_reached()
    t, box = run_thread(vol.close)
    wait_until(lambda: job._cancel.is_set())
    gate.open()
    t.join(10)
    return job, box


def test_delta_resync_copies_only_marked_regions_while_serving_io(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    vol.split(1)
    for lba in (0, 40, 80):                       # regions 0, 5, 10
        write(vol, lba, pattern(2, lba))
    assert vol.images[1].dirty_bytes == 3 * REGION
    gate = _copy_gate(1)
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.resync(1)
    gate.wait_reached()
    assert vol.images[1].state is ImageState.SYNCING
    # While the copy is held: a write elsewhere goes to the syncing image too...
    write(vol, 200, pattern(2, 99))
    assert image_bytes(paths[1], 200 * BS, 2 * BS) == pattern(2, 99)
    # ...and reads are served by the in-sync image only.
    before = opener.by_path[paths[1]].stats["reads"]
    for _ in range(4):
        assert read(vol, 200, 2) == pattern(2, 99)
    assert opener.by_path[paths[1]].stats["reads"] == before
    # A write to the region being copied waits for the copy (region lock).
    t, box = run_thread(write, vol, 1, pattern(1, 77))
    wait_until(lambda: len(vol.locks.waiters()) >= 1)
    gate.open()
    t.join(10)
    assert job.wait(10) and job.state == "done"
    p = job.progress()
    assert p["bytes_done"] == p["bytes_total"] == 3 * REGION and p["eta_seconds"] == 0.0
    assert vol.images[1].state is ImageState.IN_SYNC
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    assert read(vol, 1, 1) == pattern(1, 77)
    vol.close()


def test_cancel_then_resume(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    vol.split(1)
    for lba in range(0, 80, 8):                   # 10 regions
        write(vol, lba, pattern(1, lba))
    gate = _copy_gate(3)
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.resync(1)
    gate.wait_reached()
    job.cancel()
    gate.open()
    assert job.wait(10) and job.state == "cancelled"
    assert 0 < job.progress()["bytes_done"] < 10 * REGION
    im = vol.images[1]
    assert im.state is ImageState.SYNCING and 0 < im.dirty_bytes < 10 * REGION
    with pytest.raises(StateError):
        vol.split(1)
    job2 = vol.resync(1)
    assert job2.wait(10) and job2.state == "done"
    assert job2.progress()["bytes_done"] == im.dirty_bytes
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol.close()


def test_resume_after_restart(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    job, box = _close_during_resync(vol, opener, paths, regions=20, nth=5, rate=50)
    assert "error" not in box and job.state == "cancelled"
    vol2 = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    (job2,) = vol2.jobs.values()
    assert job2.rate_limit == 50
    assert job2.wait(10) and job2.state == "done"
    assert job2.progress()["bytes_total"] < 20 * REGION        # resumed, not restarted
    assert vol2.images[1].state is ImageState.IN_SYNC
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol2.close()


def test_attach_full_resync_with_concurrent_writes(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 1, size=256 * 1024, region_size=REGION)
    write(vol, 0, pattern(512, 1))
    newpath = str(tmp_path / "new")
    gate = _copy_gate(10)

    real = vol._opener

    def gated(path, *, direct=False):
        img = real(path, direct=direct)
        if path == newpath:
            img.gates.append(gate)
        return img
    vol._opener = gated
    idx = vol.attach(newpath)
    assert vol.images[idx].state is ImageState.SYNCING
    gate.wait_reached()
    write(vol, 3, pattern(3, 2))                  # region 0: already copied
    write(vol, 400, pattern(3, 3))                # not yet copied
    gate.open()
    job = vol.jobs[vol.images[idx].id]
    assert job.wait(10) and job.state == "done" and job.full
    assert job.progress()["bytes_done"] == 256 * 1024
    assert image_bytes(paths[0]) == image_bytes(newpath)
    assert vol.images[idx].state is ImageState.IN_SYNC
    vol.detach(0)
    assert read(vol, 400, 3) == pattern(3, 3)
    vol.close()


def test_resync_refusals_and_rate_validation(tmp_path):
    vol, _, _ = make_volume(tmp_path, 2)
    with pytest.raises(StateError, match="already in sync"):
        vol.resync(0)
    vol.split(1)
    job = vol.resync(1)
    with pytest.raises(ValueError):
        job.set_rate_limit(-1)
    job.wait(10)
    assert job.progress()["state"] == "done"
    vol.close()


def test_finished_resync_reports_where_its_time_went(tmp_path, caplog):
    import logging
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    vol.split(1)
    for lba in (0, 40):
        write(vol, lba, pattern(2, lba))
    with caplog.at_level(logging.INFO, logger="lvmirror.mirror.resync"):
        job = vol.resync(1)
        assert job.wait(10) and job.state == "done"
    assert set(job.phase_seconds) == {"drain", "copy", "commit"}
    assert all(v >= 0 for v in job.phase_seconds.values())
    assert sum(job.phase_seconds.values()) <= job.progress()["elapsed"] + 1e-6
    (line,) = [r.getMessage() for r in caplog.records if "resync of image 1 done" in r.getMessage()]
    assert f"{2 * REGION} bytes" in line
    vol.close()


def test_full_resync_rebuilds_an_image_marked_in_sync(tmp_path):
    """Issue 14 (dropped writes): a disk that acknowledged writes and lost them leaves an image
    marked in sync holding stale data, and a plain resync refuses it ("already in sync").
    resync(full=True) takes it out of the set reads use at once (a stale image is never read),
    copies every region from the other image, and marks it in sync only when done."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    good = pattern(256, 7)                        # 128 KiB: regions 0-31 of the 1 MiB volume
    write(vol, 0, good)
    vol.flush()
    with open(paths[1], "r+b") as f:              # the writes image 1's disk dropped
        f.seek(0)
        f.write(b"\xee" * (64 * REGION))
    with pytest.raises(StateError, match="already in sync .*--full"):
        vol.resync(1)
    gate = _copy_gate(3)
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.resync(1, full=True)
    gate.wait_reached()
    assert vol.images[1].state is ImageState.SYNCING and job.full
    before = opener.by_path[paths[1]].stats["reads"]
    for _ in range(3):                            # (regions 0-2 wait for the held copy)
        assert read(vol, 32, 224) == good[32 * BS:]   # never the stale image
    assert opener.by_path[paths[1]].stats["reads"] == before
    write(vol, 200, pattern(4, 9))                # writes keep reaching it
    gate.open()
    assert job.wait(10) and job.state == "done"
    assert job.progress()["bytes_total"] == 1 << 20
    assert vol.images[1].state is ImageState.IN_SYNC
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    assert read(vol, 200, 4) == pattern(4, 9)
    vol.close()


def test_full_resync_needs_another_image_in_sync(tmp_path):
    """The image being rebuilt cannot be its own source: with no other in-sync image a full
    resync is refused and the image keeps serving."""
    vol, _, _ = make_volume(tmp_path, 2, region_size=REGION)
    vol.split(1)
    with pytest.raises(StateError, match="no other in-sync image to resync image 0 from"):
        vol.resync(0, full=True)
    assert vol.images[0].state is ImageState.IN_SYNC
    job = vol.resync(1, full=True)                # a split image: every region, not the bitmap
    assert job.wait(10) and job.state == "done" and job.progress()["bytes_total"] == 1 << 20
    vol.close()


@pytest.mark.parametrize("bad", [-1, float("nan"), True, "5"])
def test_a_bad_rate_is_refused_before_anything_is_saved(tmp_path, bad):
    """A rate limit is checked before the job's state is written: `--rate -1` used to leave the
    image syncing with no job, and the saved -1 kept the volume (and lvmirrord) from opening."""
    vol, _, _ = make_volume(tmp_path, 2, region_size=REGION)
    with pytest.raises(ValueError, match="rate limit must be a non-negative number of MB/s"):
        vol.resync(1, full=True, rate_limit=bad)
    vol.split(1)
    with pytest.raises(ValueError):
        vol.resync(1, rate_limit=bad)
    with pytest.raises(ValueError):
        vol.restore(1, rate_limit=bad)
    with pytest.raises(ValueError):
        vol.attach(str(tmp_path / "new.img"), rate_limit=bad)
    assert [i.state for i in vol.images] == [ImageState.IN_SYNC, ImageState.SPLIT]
    assert not any(j.is_alive() for j in vol.jobs.values())
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    assert [i.state for i in vol.images] == [ImageState.IN_SYNC, ImageState.SPLIT]
    job = vol.resync(1, rate_limit=float("inf"))      # infinity: unlimited
    assert job.rate_limit is None and job.wait(10)
    vol.close()


def test_a_bad_saved_rate_resumes_unlimited(tmp_path, caplog):
    """State no version should write (a negative saved rate) must not keep the volume from
    opening: the job resumes unlimited, with a warning."""
    import json
    import logging
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    _close_during_resync(vol, opener, paths, regions=10, nth=2, rate=5)
    mdp = tmp_path / "meta" / "vol" / "volume.json"
    md = json.loads(mdp.read_text())
    md["images"][1]["resync_rate"] = -1.0
    mdp.write_text(json.dumps(md))
    with caplog.at_level(logging.WARNING):
        vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    (job,) = vol.jobs.values()
    assert job.rate_limit is None and job.wait(10) and job.state == "done"
    assert "saved resync_rate -1.0 is not a rate; the job resumes unlimited" in caplog.text
    vol.close()


def _resync_held_at_third_copy(tmp_path):
    """A 2-image volume, image 1 split and 10 regions written, its resync held at its third
    region's copy: (volume, image 1's GatedImage, the gate, the job)."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    vol.split(1)
    for lba in range(0, 80, 8):                   # 10 regions
        write(vol, lba, pattern(1, lba))
    gate = _copy_gate(3)
    target = opener.by_path[paths[1]]
    target.gates.append(gate)
    job = vol.resync(1)
    gate.wait_reached()
    return vol, target, gate, job


@pytest.mark.parametrize("saved", ["missing", "corrupt"])
def test_a_syncing_image_failed_without_a_readable_saved_bitmap_marks_every_region(tmp_path,
                                                                                  saved):
    """A syncing image fails a write while its resync runs, and the bitmap its resync last
    saved (what vouches for its copies) cannot be read: nothing says which copies are durable,
    so every region is marked for the next resync."""
    vol, target, gate, job = _resync_held_at_third_copy(tmp_path)
    bpath = vol._bitmap_path(vol._images[1])
    if saved == "missing":
        os.unlink(bpath)
    else:
        with open(bpath, "wb") as f:
            f.write(b"not a bitmap")
    target.fail_writes = True
    write(vol, 200, pattern(1, 9))                # image 0 took it: image 1 fails
    assert vol.images[1].state is ImageState.FAILED
    gate.open()
    assert job.wait(10) and job.state == "failed"
    assert vol.change_bitmap(1).fill() == 1.0
    vol.close()


def test_a_copy_ending_after_a_failed_flush_failed_the_image_leaves_its_bit_set(tmp_path):
    """A flush of the syncing image fails (here an initiator's SYNCHRONIZE CACHE) while a
    region's copy is being written: the image is failed with every region its resync had not
    vouched for marked again - all 10 of the bitmap saved when it started, the two copied before
    the failure among them (no resync checkpoint flushed them) - and the copy that ends
    afterwards must not clear its region's bit (nothing flushed vouches for it). Regions no
    write changed since the split stay clear: a re-add copies 10 regions, not the volume."""
    vol, target, gate, job = _resync_held_at_third_copy(tmp_path)
    target.fail_flushes = True
    vol.flush()                                   # image 0 took it: the volume's flush succeeds
    assert vol.images[1].state is ImageState.FAILED
    gate.open()
    assert job.wait(10) and job.state == "failed"
    assert list(vol.change_bitmap(1).dirty_regions()) == list(range(10))
    assert vol.images[1].dirty_bytes == 10 * REGION
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    assert vol.images[1].state is ImageState.FAILED
    assert list(vol.change_bitmap(1).dirty_regions()) == list(range(10))
    vol.close()


def test_a_resync_whose_only_source_cannot_be_read_says_so(tmp_path):
    """The only in-sync image fails the resync's read: the job fails naming the offset and the
    read's error (it said only "no in-sync image to copy from", as if none were in sync), the
    source is not failed (it is the last in-sync image) and the volume serves on."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    vol.split(1)
    write(vol, 8, pattern(8, 3))                 # region 1 changed since the split
    opener.by_path[paths[0]].fail_reads = True
    job = vol.resync(1)
    assert job.wait(10) and job.state == "failed", (job.state, job.error)
    assert ("no in-sync image could be read at offset 4096 (4096 bytes) to copy from: "
            f"image {paths[0]}: injected read error") in job.error, job.error
    assert [i.state for i in vol.images] == [ImageState.IN_SYNC, ImageState.SYNCING]
    opener.by_path[paths[0]].fail_reads = False
    assert read(vol, 8, 8) == bytes(pattern(8, 3))


@pytest.mark.parametrize("nimages", [2, 3])
def test_a_resync_whose_source_stops_answering_stops_within_leg_timeout(tmp_path, nimages):
    """The in-sync image a resync reads from hangs instead of failing: its read is given up on
    after leg_timeout (plus the region at 4 MB/s) and the job fails, saying so, instead of
    holding the job - and cancel and close, which wait for it - without limit. With another
    in-sync image the hung one is set aside as slow (as a host read that slow does), and the
    resync run again copies from the other; the only in-sync image is kept."""
    vol, opener, paths = make_volume(tmp_path, nimages, region_size=REGION, leg_timeout=0.3)
    hang = Gate(lambda op, off, ln: op == "read" and ln == REGION)
    target = nimages - 1
    try:
        vol.split(target)
        write(vol, 8, pattern(8, 3))             # region 1 changed since the split
        opener.by_path[paths[0]].gates.append(hang)
        job = vol.resync(target)
        assert job.wait(10) and job.state == "failed", (job.state, job.error)
        assert "the copy's source stopped answering" in job.error
        assert "given up as slow" in job.error
        states = [i.state for i in vol.images]
        if nimages == 2:                         # the only in-sync image: kept
            assert states == [ImageState.IN_SYNC, ImageState.SYNCING]
            assert "is the only in-sync image: run it again once its device" in job.error
        else:                                    # set aside: the next run reads image 1
            assert states == [ImageState.FAILED, ImageState.IN_SYNC, ImageState.SYNCING]
            assert "run it again to copy from another in-sync image" in job.error
            assert "still busy after 0.30 s" in vol.images[0].error   # what happened to it
            with pytest.raises(StateError) as e:  # its own resync: the refusal says why
                vol.resync(0)
            assert "reads of it a copy gave up on: its device has not answered" in str(e.value)
            assert "write landing" not in str(e.value)
        assert vol.images[0].stuck_io == 1       # the read left behind, still in flight
        if nimages == 2:                         # its only source still has it in flight:
            with pytest.raises(StateError) as e:  # refused up front, not a job that fails
                vol.resync(target)
            assert "still have reads a copy gave up on as slow in flight; run it again " \
                "once the device answers" in str(e.value), str(e.value)
            assert paths[0] in str(e.value)
            hang.open()                          # the device answers
            assert vol._images[0].wait_stuck(10) == 0
        job = vol.resync(target)
        assert job.wait(10)
        assert job.state == "done", (job.state, job.error)
        assert image_bytes(paths[target]) == image_bytes(paths[target - 1])
        assert read(vol, 8, 8) == bytes(pattern(8, 3))
    finally:
        hang.open()
        vol.close()


def _io_log(image):
    """Record every region-sized read and every prefetch ``image`` is asked for, in order, as
    (op, offset, thread name); holds none of them."""
    log = []

    def match(op, off, ln):
        if op == "prefetch" or (op == "read" and ln == REGION):
            log.append((op, off, threading.current_thread().name))
        return False
    image.gates.append(Gate(match))
    return log


def test_a_resync_asks_the_kernel_to_read_ahead_of_its_copy(tmp_path, monkeypatch):
    """Before a region is copied, the marked regions after it, up to READAHEAD bytes, have been
    asked of the source (POSIX_FADV_WILLNEED), so its reads overlap the target's writes as md's
    resync keeps both in flight; each marked region once, none that is not marked, and the copy
    is the same."""
    monkeypatch.setattr(resync, "READAHEAD", 2 * REGION)          # two regions ahead
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, leg_timeout=0)
    try:
        vol.split(1)
        marked = [1, 3, 4, 9, 200]
        for r in marked:
            write(vol, r * REGION // BS, pattern(1, r))
        log = _io_log(opener.by_path[paths[0]])
        job = vol.resync(1)
        assert job.wait(10) and job.state == "done", (job.state, job.error)
        assert image_bytes(paths[1]) == image_bytes(paths[0])
        fetched = [off // REGION for op, off, _ in log if op == "prefetch"]
        assert fetched == marked
        order = [(op, off // REGION) for op, off, _ in log]
        for k, r in enumerate(marked):
            read_at = order.index(("read", r))
            for later in marked[k + 1:k + 3]:                     # the next two marked
                assert order.index(("prefetch", later)) < read_at, order
    finally:
        vol.close()


def test_a_prefetch_that_never_returns_holds_neither_the_copy_nor_close(tmp_path):
    """The read-ahead hints run on the source's worker with nobody waiting (as the copy's
    bounded reads do), one task at a time: hints held by the device hold one of the worker's
    threads, so the copy's reads still run on the others (trial 30: a hint a region, all held,
    took every thread and the copy's reads failed as "not begun"), the resync finishes and the
    volume closes."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, leg_timeout=0.3)
    entered = []

    def match(op, off, ln):
        if op == "prefetch":
            entered.append(off)
            return True
        return False
    held = Gate(match, count=1000)                         # every hint, for as long as held
    try:
        vol.split(1)
        marked = [2, 5, 6, 9, 11, 12, 20, 30]
        for r in marked:
            write(vol, r * REGION // BS, pattern(1, r))
        opener.by_path[paths[0]].gates.append(held)
        job = vol.resync(1)
        held.wait_reached()
        assert job.wait(10) and job.state == "done", (job.state, job.error)
        assert len(entered) == 1                         # one hint task, held: no other began
        assert len(vol._images[0].hints) == len(marked) - 1   # the rest wait their turn
        assert image_bytes(paths[1]) == image_bytes(paths[0])
        t, box = run_thread(vol.close)
        t.join(10)
        assert not t.is_alive()
    finally:
        held.open()
        vol.close()


# ---- the copy's all-zero check and its checkpoints beside it -----------------------------------

@pytest.mark.parametrize("ln", [0, 1, 4095, 4096, 4097, REGION * 3 + 17, 1 << 20])
def test_all_zero_answers_zeroes_and_any_byte_set(ln):
    """``all_zero`` is True for zeroes only: a byte set at a probed offset (a page's first) or
    between them (the probe alone would miss it) or at the end gives False."""
    zeros = bytes(1 << 20)
    buf = bytearray(ln)
    assert resync.all_zero(memoryview(buf), zeros) and resync.all_zero(memoryview(buf))
    for at in {0, min(1, ln - 1), ln // 2, ln - 1} if ln else ():
        buf[at] = 0x5A
        assert not resync.all_zero(memoryview(buf), zeros), at
        assert not resync.all_zero(memoryview(buf), bytes(3)), at     # zeros too short
        buf[at] = 0


def _gated_checkpoints(vol, *, fail=None):
    """Hold every checkpoint of ``vol``'s resync until the returned Event is set; ``calls``
    lists ("start"/"end", next_region) in order. ``fail``: raise it instead of checkpointing."""
    release, reached, calls = threading.Event(), threading.Event(), []
    real = vol.control.checkpoint_resync

    def checkpoint(img, next_region):
        calls.append(("start", next_region))
        reached.set()
        assert release.wait(20), "checkpoint never released"
        if fail is not None:
            raise fail
        real(img, next_region)
        calls.append(("end", next_region))
    vol.control.checkpoint_resync = checkpoint
    return release, reached, calls


def test_the_copy_goes_on_while_a_checkpoint_flushes(tmp_path, monkeypatch):
    """A checkpoint (flush the target, then save the bitmap) runs beside the copy: while the
    first one is held the copy goes on to the last region, and the job ends only once that
    checkpoint has, the image then in sync and identical (before, the copy stood still for
    every checkpoint's flush: 42 % of a full resync's time on the host)."""
    monkeypatch.setattr(resync, "CHECKPOINT_REGIONS", 4)
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, size=256 * REGION)
    vol.split(1)
    write(vol, 0, pattern(256 * REGION // BS, 7))           # every region changed
    release, reached, calls = _gated_checkpoints(vol)
    job = vol.resync(1)
    assert reached.wait(10)
    wait_until(lambda: job.bytes_done == job.bytes_total)    # copied on past the held one
    assert not job.wait(0.2) and job.state == "running", job.state
    assert calls == [("start", 4)]
    release.set()
    assert job.wait(10) and job.state == "done", (job.state, job.error)
    assert ("end", 4) in calls and vol.images[1].state is ImageState.IN_SYNC
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1])


def test_a_cancel_waits_for_the_checkpoint_in_flight(tmp_path, monkeypatch):
    """A resync cancelled while a checkpoint is held pauses only after that checkpoint ends,
    so the checkpoint's cursor (resume at the next open) never lands after the pause that
    cleared it: the volume reopened resumes no resync."""
    monkeypatch.setattr(resync, "CHECKPOINT_REGIONS", 4)
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, size=256 * REGION)
    vol.split(1)
    write(vol, 0, pattern(256 * REGION // BS, 7))
    release, reached, calls = _gated_checkpoints(vol)
    job = vol.resync(1, rate_limit=0.2)                     # slow: still copying at the cancel
    assert reached.wait(10)
    job.cancel()
    assert not job.wait(0.3), "the job paused with a checkpoint still in flight"
    release.set()
    assert job.wait(10) and job.state == "cancelled", (job.state, job.error)
    assert calls[-1] == ("end", 4)
    assert vol.images[1].state is ImageState.SYNCING and vol._images[1].rec.resync_next is None
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None)
    assert not vol.jobs and vol.images[1].state is ImageState.SYNCING
    vol.close()


def test_a_failed_checkpoint_fails_the_resync(tmp_path, monkeypatch):
    """A checkpoint that raises (a metadata save's OSError) beside the copy ends the job as
    failed with its error (raised by the copy's next checkpoint or its end), the image left
    syncing, as when the copy made the checkpoint itself; a resync then completes it."""
    monkeypatch.setattr(resync, "CHECKPOINT_REGIONS", 4)
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, size=256 * REGION)
    vol.split(1)
    write(vol, 0, pattern(256 * REGION // BS, 7))
    release, reached, calls = _gated_checkpoints(vol, fail=OSError(28, "injected ENOSPC"))
    job = vol.resync(1)
    assert reached.wait(10)
    release.set()
    assert job.wait(10) and job.state == "failed", (job.state, job.error)
    assert "injected ENOSPC" in job.error
    assert vol.images[1].state is ImageState.SYNCING     # never marked in sync: resync again
    vol.control.checkpoint_resync = type(vol.control).checkpoint_resync.__get__(vol.control)
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done", (job.state, job.error)
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1])


def test_a_hint_lost_with_a_stopped_worker_does_not_stop_the_read_ahead(tmp_path):
    """A read-ahead hint task posted as its worker stopped never runs (``Worker.stop``): its
    ``hinting`` flag stayed set, and the image's next worker queued every later hint without
    taking one (trial 31, LOW). A new worker starts the hints afresh, and a copy's hints run."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, leg_timeout=5)
    try:
        img = vol._images[0]
        img.worker.stop(wait=True)
        resync._prefetch(vol, img, 0, REGION)          # checked as running: no post, inline
        with img.hint_mu:                              # the race: flag set, task never run
            img.hinting = True
            img.hints.append((0, REGION))
        img.worker = None
        vol._start_worker(img)
        assert not img.hinting and not img.hints
        asked = []
        real = img.storage.prefetch
        img.storage.prefetch = lambda off, ln: (asked.append(off), real(off, ln))
        resync._prefetch(vol, img, REGION, REGION)
        wait_until(lambda: asked and not img.hinting)
        assert asked[0] == REGION
    finally:
        vol.close()


def test_a_checkpoint_thread_that_cannot_start_fails_the_resync(tmp_path, monkeypatch):
    """No thread left for a checkpoint (RuntimeError from ``Thread.start``: systemd's
    TasksMax): the resync fails with that error and ``close`` returns. The first version kept
    the thread that never started and joined it on the error path, which raised again: the
    job was left "running" with its thread gone, and ``close`` waited for it for good (review
    of this stop, HIGH)."""
    monkeypatch.setattr(resync, "CHECKPOINT_REGIONS", 4)
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, size=64 * REGION)
    vol.split(1)
    write(vol, 0, pattern(64 * REGION // BS, 7))
    no_thread_for(monkeypatch, "-ckpt")
    job = vol.resync(1)
    assert job.wait(10), f"the job never ended: {job.state}"
    monkeypatch.undo()
    assert job.state == "failed" and "can't start new thread" in job.error, job.error
    assert vol.images[1].state is ImageState.SYNCING
    t, box = run_thread(vol.close)
    t.join(10)
    assert not t.is_alive(), "close waits for a job that ended"


def test_no_checkpoint_or_in_sync_mark_between_a_failed_flush_and_its_mark(tmp_path,
                                                                             monkeypatch):
    """The flusher's flush of a syncing image fails (Linux reports a writeback error to one
    fdatasync only) and the image is not failed yet; the resync's checkpoint, whose own flush
    then returns 0, must not save a bitmap with the copied regions cleared - the failure takes
    the image's marks from the last save - nor mark the image in sync: the image ends failed
    with every region it may have lost marked (review of this stop, HIGH; older than it, the
    rule of ``durability.not_durable``, trial 22)."""
    import time
    monkeypatch.setattr(resync, "CHECKPOINT_REGIONS", 4)
    n = 64
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, size=n * REGION)
    vol.split(1)
    write(vol, 0, pattern(n * REGION // BS, 7))
    vol.checkpoint()                                 # the write-intent log clean
    img = vol._images[1]
    release, reached, calls = _gated_checkpoints(vol)
    job = vol.resync(1)
    assert reached.wait(10)
    wait_until(lambda: img.bitmap.count() == 0)      # every region copied, none saved yet
    write(vol, 0, pattern(1, 9))                     # the flusher's round has a flush to make
    st = opener.by_path[paths[1]]
    st.fail_flushes = True
    at_error, hold, _ = held_on_error(vol)
    t, box = run_thread(vol.checkpoint)              # the flusher's round: its flush fails
    assert at_error.wait(10)
    st.fail_flushes = False                          # the next fdatasync returns 0
    release.set()                                    # the resync's checkpoint flushes, saves?
    time.sleep(0.3)
    hold.set()
    t.join(10)
    assert job.wait(10) and job.state == "failed", (job.state, job.error)
    assert img.state is ImageState.FAILED
    assert img.bitmap.count() == n, f"{img.bitmap.count()} of {n} regions marked"
    vol.close()


def test_attach_whose_io_threads_cannot_start_changes_nothing(tmp_path, monkeypatch):
    """No thread left for the new image's I/O worker (its second thread fails to start): the
    attach is refused as a StateError that says nothing changed, and nothing did - the image
    is not in the volume or its metadata, the file attach created is gone, and the worker
    thread that did start is stopped. It used to stay in the volume's list without a worker,
    unsaved, the file open."""
    vol, opener, paths = make_volume(tmp_path, 1, size=256 * 1024, region_size=REGION)
    write(vol, 0, pattern(512, 1))
    newpath = str(tmp_path / "new")
    new_id = max(im.id for im in vol.images) + 1
    before = set(threading.enumerate())           # (other tests' volumes left theirs)
    no_thread_for(monkeypatch, f"-img{new_id}-1")
    with pytest.raises(StateError, match="not attached: its I/O threads could not start"):
        vol.attach(newpath)
    monkeypatch.undo()
    assert [im.path for im in vol.images] == [paths[0]]
    assert not os.path.exists(newpath)
    vol._locked_save_md()                          # (the next save keeps no trace of it)
    assert newpath not in open(os.path.join(vol._vdir, "volume.json")).read()
    wait_until(lambda: not any(t.name.endswith(f"-img{new_id}-0")
                               for t in set(threading.enumerate()) - before), 10)
    idx = vol.attach(newpath)
    job = vol.jobs[vol.images[idx].id]
    assert job.wait(10) and job.state == "done", (job.state, job.error)
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(newpath)


def test_attach_whose_resync_thread_cannot_start_says_so_and_resumes(tmp_path, monkeypatch):
    """No thread left for the attach's full resync: the image is attached and saved syncing
    from its first region (as a stopped resync), and the StateError says so and how to go on;
    ``resync`` then copies it all (a RuntimeError said only "can't start new thread")."""
    vol, opener, paths = make_volume(tmp_path, 1, size=256 * 1024, region_size=REGION)
    write(vol, 0, pattern(512, 1))
    newpath = str(tmp_path / "new")
    no_thread_for(monkeypatch, "-resync1")
    with pytest.raises(StateError, match=r"attached as image 1, but its full resync's thread "
                                         r"could not start .* lvmirror resync vol 1"):
        vol.attach(newpath)
    monkeypatch.undo()
    assert vol.images[1].state is ImageState.SYNCING
    assert vol.jobs[vol.images[1].id].state == "failed"
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done", (job.state, job.error)
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(newpath)
