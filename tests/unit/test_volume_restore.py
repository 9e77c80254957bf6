"""Restore: roll the live volume back to a split image's contents."""

import json
import os
import time

import pytest

from lvmirror.errors import StateError, VolumeIOError
from lvmirror.mirror.volume import ImageState, MirrorVolume

from tests.unit.test_volume_helpers import (BS, Gate, image_bytes, make_volume, pattern, read,
                                            write)

REGION = 4096


def test_restore_rolls_back_changed_regions(tmp_path):
    vol, _, paths = make_volume(tmp_path, 3, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    vol.split(2)
    snap = image_bytes(paths[2])
    write(vol, 8, pattern(4, 2))
    write(vol, 50, pattern(4, 3))
    assert read(vol, 8, 4) != snap[8 * BS:12 * BS]
    job = vol.restore(2)
    assert job.wait(10) and job.state == "done"
    assert job.progress()["bytes_done"] == job.progress()["bytes_total"] == 2 * REGION
    for p in paths[:2]:
        assert image_bytes(p) == snap
    im = vol.images[2]
    assert im.state is ImageState.SPLIT and im.dirty_bytes == 0    # identical as of now
    write(vol, 100, pattern(1, 4))
    assert list(vol.change_bitmap(2).dirty_regions()) == [(100 * BS) // REGION]
    vol.close()


def test_io_during_restore_sees_restored_content(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    vol.split(1)
    snap = image_bytes(paths[1])
    for lba in (0, 40, 80):
        write(vol, lba, pattern(8, lba + 1))
    # Hold the job on its first region's read from the split image.
    gate = Gate(lambda op, off, ln: op == "read" and off == 0)
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.restore(1)
    gate.wait_reached()
    # Regions 5 and 10 are not restored yet: a read sees the split image's content,
    # a write lands on top of restored content.
    assert read(vol, 40, 8) == snap[40 * BS:48 * BS]
    write(vol, 82, pattern(1, 9))
    gate.open()
    assert job.wait(10) and job.state == "done"
    expect = bytearray(snap)
    expect[82 * BS:83 * BS] = pattern(1, 9)
    assert image_bytes(paths[0]) == bytes(expect)
    assert list(vol.change_bitmap(1).dirty_regions()) == [(82 * BS) // REGION]
    with pytest.raises(StateError):
        vol.restore(0)
    vol.close()


def test_restore_resumes_after_restart(tmp_path):
    """A restore stopped by close resumes on open, at the rate limit it was started with
    (issue 15: it resumed unlimited); a finished restore leaves no rate behind."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION)
    vol.split(1)
    snap = image_bytes(paths[1])
    for lba in range(0, 80, 8):
        write(vol, lba, pattern(1, lba + 5))
    gate = Gate(lambda op, off, ln: op == "read" and off == 4 * REGION)
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.restore(1, rate_limit=50)
    gate.wait_reached()
    job.stop()
    gate.open()
    job.wait(10)
    vol.close()
    vol2 = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    (job2,) = vol2.jobs.values()
    assert job2.rate_limit == 50
    assert job2.wait(10) and job2.state == "done"
    assert image_bytes(paths[0]) == snap
    vol2.close()
    md = json.load(open(tmp_path / "meta" / "vol" / "volume.json"))
    assert md["images"][1]["restore_running"] is False and md["images"][1]["restore_rate"] is None


def test_cancelled_restore_resumes_and_blocks_detach(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    vol.split(2)
    snap = image_bytes(paths[2])
    for lba in range(0, 80, 8):
        write(vol, lba, pattern(1, lba + 7))
    gate = Gate(lambda op, off, ln: op == "read" and off == 2 * REGION)
    opener.by_path[paths[2]].gates.append(gate)
    job = vol.restore(2)
    gate.wait_reached()
    job.cancel()
    gate.open()
    assert job.wait(10) and job.state == "cancelled"
    assert read(vol, 60, 1) == snap[60 * BS:61 * BS]      # still reads as restored
    with pytest.raises(StateError, match="unfinished"):
        vol.detach(2)
    # another image too: the detach would renumber the images, the restore's source among
    # them (trial 23)
    with pytest.raises(StateError, match=r"restore from image 2 is unfinished \(cancelled; "
                                         r"'restore 2' resumes it once its source reads and is "
                                         r"the split copy, 'lvmirror abandon-restore vol 2 "
                                         r"--force' gives it up\); detach after it ends"):
        vol.detach(1)
    job2 = vol.restore(2)
    assert job2.wait(10) and job2.state == "done"
    assert job2.progress()["bytes_total"] < 10 * REGION
    assert image_bytes(paths[0]) == image_bytes(paths[1]) == snap
    vol.detach(2)
    vol.close()


def test_attach_and_resync_wait_for_a_running_restore(tmp_path):
    """While a restore rolls the live images back, a resync and an attach (a full resync) are
    refused alike, saying a restore runs; both work once it is done."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    vol.split(2)
    vol.split(1)
    write(vol, 0, pattern(1, 9))
    gate = Gate(lambda op, off, ln: op == "read" and off == 0)
    opener.by_path[paths[2]].gates.append(gate)
    job = vol.restore(2)
    gate.wait_reached()
    new = tmp_path / "new.img"
    with pytest.raises(StateError, match="a restore from image 2 is running; attach after it ends"):
        vol.attach(str(new))
    with pytest.raises(StateError, match="a restore from image 2 is running; resync after it ends"):
        vol.resync(1)
    assert not new.exists() and len(vol.images) == 3
    gate.open()
    assert job.wait(10) and job.state == "done"
    idx = vol.attach(str(new))
    assert vol.jobs[vol.images[idx].id].wait(10)
    assert image_bytes(str(new)) == image_bytes(paths[0]) == image_bytes(paths[2])
    vol.close()


def test_an_unreadable_split_image_fails_io_to_unrestored_regions_with_medium_error(tmp_path):
    """The restore's source (the split image) fails every read: the job fails saying so, an
    I/O that touches a region not restored yet fails as a VolumeIOError (MEDIUM ERROR:
    UNRECOVERED READ ERROR for a read, WRITE ERROR for a write; before, an ImageIOError
    reached the SCSI core's catch-all: a traceback and HARDWARE ERROR for every such
    command), the rest of the volume is served, the unfinished restore is named in the
    refusals, and once the image reads again the restore resumes and ends."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    vol.split(2)
    snap = image_bytes(paths[2])
    write(vol, 0, pattern(16, 2))                # regions 0 and 1 changed since the split
    opener.by_path[paths[2]].fail_reads = True
    job = vol.restore(2)
    assert job.wait(10) and job.state == "failed", (job.state, job.error)
    assert "the restore's source, cannot be read" in job.error
    with pytest.raises(VolumeIOError, match="region 0 is not restored yet") as ei:
        read(vol, 0, 1)
    assert ei.value.is_read
    with pytest.raises(VolumeIOError, match="region 1 is not restored yet") as ei:
        write(vol, 9, pattern(1, 3))
    assert not ei.value.is_read
    assert read(vol, 40, 4) == snap[40 * BS:44 * BS]     # never changed: served
    for call, doing in ((lambda: vol.resync(2), "resync"), (lambda: vol.split(1), "split"),
                        (lambda: vol.scrubs.start(), "scrub")):
        with pytest.raises(StateError, match=r"a restore from image 2 is unfinished \(failed: "
                           r"VolumeIOError: .*cannot be read.*'restore 2' resumes it once its "
                           r"source reads and is the split copy, "
                           r"'lvmirror abandon-restore vol 2 --force' gives it up\); "
                           + doing + " after it ends"):
            call()
    # a retry while the region the job failed on still cannot be read is refused up front
    # (trial 26, MEDIUM 4: it started, and failed the same way)
    with pytest.raises(StateError) as ei:
        vol.restore(2)
    msg = str(ei.value)
    assert "still cannot be read where the last restore failed (offset 0, 4096 bytes)" in msg
    assert "injected read error" in msg and "abandon-restore vol 2 --force" in msg
    assert vol.jobs[vol.images[2].id] is job                    # nothing started
    opener.by_path[paths[2]].fail_reads = False
    j2 = vol.restore(2)
    assert j2.wait(10) and j2.state == "done", (j2.state, j2.error)
    assert image_bytes(paths[0]) == image_bytes(paths[1]) == snap


def test_a_restore_whose_split_image_is_missing_at_open(tmp_path):
    """A restore stopped by a close resumes at the next open; its split image file is gone
    by then. The volume opens, the resumed job fails saying the image is not available (not
    an AttributeError), I/O to a region not restored yet fails as a VolumeIOError, and a
    restore asked for again is refused with the same reason."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    vol.split(2)
    write(vol, 0, pattern(16, 2))
    vol.restore(2, rate_limit=0.001)             # held before its first copy
    vol.close()
    os.unlink(paths[2])
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None)
    try:
        job = vol.control.restore_job
        assert job is not None and job.wait(10) and job.state == "failed", job
        assert "is not available" in job.error, job.error
        with pytest.raises(VolumeIOError, match="is not restored yet"):
            read(vol, 8, 1)
        with pytest.raises(StateError, match="split image 2 .* is not available"):
            vol.restore(2)
    finally:
        vol.close()


def test_a_restore_whose_source_is_dead_can_be_abandoned(tmp_path):
    """The restore's source fails every read: the job fails and I/O to a region not rolled
    back fails with MEDIUM ERROR, resync and detach refused. ``abandon_restore`` is the way
    out (trial 25): refused while the restore runs; then the volume serves every region -
    the split image's data where it was rolled back, the live data elsewhere - the regions
    not rolled back join the split image's change bitmap (saved), the image can be detached
    or resynced, and the next open does not resume the restore."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    vol.split(2)
    snap = image_bytes(paths[2])
    write(vol, 0, pattern(8, 2))                  # region 0 changed since the split
    write(vol, 16, pattern(8, 3))                 # region 2 changed since the split
    live = image_bytes(paths[0])
    gate = Gate(lambda op, off, ln: op == "read" and off == 0)
    opener.by_path[paths[2]].gates.append(gate)
    job = vol.restore(2)
    gate.wait_reached()
    with pytest.raises(StateError, match="the restore from image 2 is running; cancel it "
                                         "first"):
        vol.abandon_restore(2)
    gate.open()
    assert job.wait(10) and job.state == "done"   # region 0 and 2 rolled back: nothing left
    with pytest.raises(StateError, match="no restore from image 2 is unfinished"):
        vol.abandon_restore(2)
    write(vol, 0, pattern(8, 4))                  # regions 0 and 2 changed again
    write(vol, 16, pattern(8, 5))
    # region 0 rolled back, then the source dies before region 2
    gate = Gate(lambda op, off, ln: op == "read" and off == 2 * REGION)
    opener.by_path[paths[2]].gates.append(gate)
    job = vol.restore(2)
    gate.wait_reached()
    opener.by_path[paths[2]].fail_reads = True
    gate.open()
    assert job.wait(10) and job.state == "failed", (job.state, job.error)
    # region 0 was copied, its record not committed (the job commits in batches): neither
    # region is recorded as rolled back, and I/O to either needs the dead source
    for lba in (0, 16):
        with pytest.raises(VolumeIOError, match="is not restored yet"):
            read(vol, lba, 1)
    with pytest.raises(StateError, match="'lvmirror abandon-restore vol 2 --force' gives"):
        vol.resync(2)
    assert vol.health == "degraded"                              # told to monitoring
    with pytest.raises(StateError, match="no image 7"):
        vol.abandon_restore(7)
    assert vol.abandon_restore(2) == {"regions": 2, "bytes": 2 * REGION}
    assert job.state == "abandoned" and vol.health == "optimal"
    assert read(vol, 0, 8) == snap[:8 * BS]                         # the split image's
    assert read(vol, 16, 8) == pattern(8, 5)                        # the live data
    assert read(vol, 40, 4) == snap[40 * BS:44 * BS] == live[40 * BS:44 * BS]
    write(vol, 17, pattern(1, 6))                                   # served, no copy first
    assert {0, 2} <= set(vol.change_bitmap(2).dirty_regions())      # to be copied back
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None)
    try:
        assert vol.control.restore_job is None                      # not resumed
        assert {0, 2} <= set(vol.change_bitmap(2).dirty_regions())  # saved
        assert read(vol, 16, 2) == pattern(1, 5)[:BS] + pattern(1, 6)
        vol.detach(2)
        assert [im.state for im in vol.images] == [ImageState.IN_SYNC, ImageState.IN_SYNC]
    finally:
        vol.close()


def test_a_restore_from_a_split_image_missing_at_open_reopens_it_once_it_is_back(tmp_path):
    """The split image's file was missing when the volume opened, then put back: a restore
    opens it again, as a resync does (trial 25: it stayed 'not available' until a restart)."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    vol.split(2)
    snap = image_bytes(paths[2])
    write(vol, 0, pattern(16, 2))
    vol.close()
    os.rename(paths[2], paths[2] + ".away")
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None)
    try:
        with pytest.raises(StateError, match="split image 2 .* is not available: "):
            vol.restore(2)
        os.rename(paths[2] + ".away", paths[2])
        assert vol.images[2].error                      # "cannot open at volume open"
        job = vol.restore(2)
        assert job.wait(10) and job.state == "done", (job.state, job.error)
        assert image_bytes(paths[0]) == image_bytes(paths[1]) == snap
        assert vol.images[2].error                      # kept: only some regions were read
    finally:
        vol.close()


def test_a_split_image_whose_flush_fails_does_not_stop_a_restore_from_another(tmp_path):
    """Image 3 is split and its device fails every flush; a restore from split image 2 takes
    none of its part: its start, its progress and its end flush and judge only the images it
    writes to (trial 25: image 3's failed flush refused the start, "the live data may not be
    durable")."""
    vol, opener, paths = make_volume(tmp_path, 4, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    vol.split(3)
    vol.split(2)
    snap = image_bytes(paths[2])
    write(vol, 0, pattern(16, 2))
    opener.by_path[paths[3]].fail_flushes = True
    vol.check_restore(2, fresh=True, flush=True)
    job = vol.restore(2)
    assert job.wait(10) and job.state == "done", (job.state, job.error)
    assert image_bytes(paths[0]) == image_bytes(paths[1]) == snap
    assert vol.images[3].state is ImageState.SPLIT
    vol.close()


def test_a_restore_makes_its_source_durable_before_it_vouches_for_copies(tmp_path):
    """Split image 2 was written through a writable export, which left the writes in its
    page cache: the restore's barriers flush the source too, before any region is recorded
    as restored (trial 26: the source took no part in the barriers, flushed 0 times before
    "done"). A source whose flush has failed since it was opened is refused, also once its
    flushes succeed again: Linux reports a writeback error to one fsync only, and the data
    that flush lost is not on its disk (trial 27: the restore vouched for it)."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    vol.split(2)
    ex = vol.splits.export(2)
    ex.write(0, [memoryview(bytearray(pattern(8, 7)))])
    ex.close()
    st2 = opener.by_path[paths[2]]
    flushes = []
    real = st2.flush

    def flush(*a, **kw):
        flushes.append(1)
        return real(*a, **kw)
    st2.flush = flush
    job = vol.restore(2)
    assert job.wait(10) and job.state == "done", (job.state, job.error)
    assert flushes and read(vol, 0, 8) == pattern(8, 7)
    write(vol, 0, pattern(8, 8))
    st2.fail_flushes = True
    with pytest.raises(VolumeIOError):
        vol.check_restore(2, flush=True)
    st2.fail_flushes = False
    for call in (lambda: vol.restore(2), lambda: vol.check_restore(2)):
        with pytest.raises(StateError, match=r"a flush of split image 2 .* failed since it was "
                                             r"split.*resync or detach it"):
            call()
    assert vol.control.restore_job is None and read(vol, 0, 8) == pattern(8, 8)
    vol.close()


def test_a_cancelled_restore_whose_source_dies_makes_the_volume_degraded(tmp_path):
    """A cancelled restore stays registered and I/O restores on demand; its source then fails
    a read: that I/O gets MEDIUM ERROR, and the volume's health says degraded, not optimal
    (trial 27: health looked only at a job that failed)."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    vol.split(2)
    write(vol, 0, pattern(16, 2))
    job = vol.restore(2, rate_limit=0.001)                # held before its first copy
    job.cancel()
    assert job.wait(10) and job.state == "cancelled"
    assert vol.health == "optimal"
    opener.by_path[paths[2]].fail_reads = True
    with pytest.raises(VolumeIOError, match="is not restored yet"):
        read(vol, 0, 1)
    assert vol.health == "degraded"
    vol.close()


def test_a_restore_whose_source_stops_answering_fails_within_leg_timeout(tmp_path):
    """The restore's source hangs instead of failing (trial 27): its read is given up on after
    leg_timeout (plus the region at legs.MIN_DEVICE_RATE), so the job fails rather than run
    for ever - ``cancel`` has its answer and ``abandon_restore`` is accepted - and an
    initiator's I/O that needs a region not rolled back gets MEDIUM ERROR in the same bound
    instead of hanging. A new restore from the image is refused while the read is still in
    flight on its device, and accepted once it returned."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION, leg_timeout=0.3)
    try:
        write(vol, 0, pattern(64, 1))
        vol.split(2)
        snap = image_bytes(paths[2])
        write(vol, 0, pattern(8, 2))                  # regions 0 and 2 changed since T
        write(vol, 16, pattern(8, 3))
        hang = Gate(lambda op, off, ln: op == "read", count=2)
        opener.by_path[paths[2]].gates.append(hang)
        job = vol.restore(2)
        assert job.wait(10) and job.state == "failed", (job.state, job.error)
        assert "given up as slow" in job.error
        # the read left behind is still in flight: an I/O that needs a region not rolled back
        # fails at once, without a read of its own (trial 28: each waited the bound again)
        for lba in (16, 0, 16):
            t0 = time.monotonic()
            with pytest.raises(VolumeIOError, match="is not restored yet .* given up on as "
                                                    "slow still in flight") as ei:
                read(vol, lba, 1)
            assert time.monotonic() - t0 < 0.3 and ei.value.is_read
        with pytest.raises(VolumeIOError, match="given up on as slow") as ei:
            write(vol, 17, pattern(1, 4))
        assert not ei.value.is_read                   # WRITE ERROR for a write
        assert vol.images[2].stuck_io == 1 and vol.health == "degraded"
        assert "still busy after" in vol.images[2].error      # the hang, not "not read"
        with pytest.raises(StateError, match="split image 2 .* still has 1 I/O.s. in flight "
                                             ".* --force'"):
            vol.restore(2)
        hang.open()                                   # the device answers at last
        assert vol._images[2].wait_stuck(10) == 0
        job = vol.restore(2)                          # resumed
        assert job.wait(10) and job.state == "done", (job.state, job.error)
        assert image_bytes(paths[0]) == image_bytes(paths[1]) == snap
    finally:
        vol.close()


def test_a_hung_restore_source_can_be_abandoned(tmp_path):
    """The restore's source hangs: once its read is given up on, the failed restore can be
    abandoned and the volume serves every region again (trial 27: abandon refused while the
    job hung on the read, and cancel could not end it)."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION, leg_timeout=0.3)
    hang = Gate(lambda op, off, ln: op == "read", count=1)
    try:
        write(vol, 0, pattern(64, 1))
        vol.split(2)
        write(vol, 16, pattern(8, 3))
        live = image_bytes(paths[0])
        opener.by_path[paths[2]].gates.append(hang)
        job = vol.restore(2)
        hang.wait_reached()
        job.cancel()
        assert job.wait(10) and job.state == "failed", (job.state, job.error)
        assert vol.abandon_restore(2) == {"regions": 1, "bytes": REGION}
        assert read(vol, 16, 8) == live[16 * BS:24 * BS]
        assert vol.health == "optimal"                # the live images serve every region
    finally:
        hang.open()
        vol.close()


def test_a_copy_read_its_worker_never_began_is_withdrawn_not_counted(tmp_path):
    """Every thread of the source's worker is busy (earlier I/O that does not return): a
    copy's read waits its bound in the queue, then is withdrawn - never made, and not counted
    as in flight on the device (trial 28 found such a read counted for ever once the worker
    had stopped, which refused every later restore from the image) - and fails as slow."""
    import threading

    from lvmirror.errors import ImageIOError
    from lvmirror.mirror import legs, resync
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, leg_timeout=0.3)
    busy = threading.Event()
    try:
        vol.split(1)
        img = vol._images[1]
        for _ in range(legs.WORKER_THREADS):
            img.worker.submit_to(lambda s: busy.wait(20), img.storage, legs.BoundedIO())
        view = memoryview(bytearray(REGION))
        with pytest.raises(ImageIOError, match="a copy's read of .*not begun after 0.30 s") \
                as ei:
            resync._read_source(vol, img, 0, view)
        assert ei.value.slow and img.stuck_io == 0
        # a restore's retry check names its own read (trial 31, LOW: it quoted "a copy's")
        with pytest.raises(ImageIOError, match=r"a re-read of the region of \d+ bytes"):
            resync._read_source(vol, img, 0, view, "a re-read of the region")
        reads = []
        opener.by_path[paths[1]].gates.append(
            Gate(lambda op, off, ln: op == "read" and not reads.append(off) and False))
        busy.set()                                    # the threads free: the withdrawn read
        resync._read_source(vol, img, REGION, view)   # is skipped, a new one is made
        assert reads == [REGION] and img.stuck_io == 0
    finally:
        busy.set()
        vol.close()


def test_a_split_image_flush_given_up_on_does_not_stop_its_restores_reads(tmp_path):
    """The flusher's flush of the restore's source is given up on as slow (trial 29): that
    says nothing of the image's reads, which still answer, so the restore's reads and the
    initiator's I/O that needs a region not rolled back go on being made - before, every one
    failed at once (MEDIUM ERROR) and the job failed, because the flush counted as a hung
    read. Only a read given up on makes the next ones fail at once."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION, leg_timeout=0.3)
    flush = Gate(lambda op, off, ln: op == "flush")
    try:
        write(vol, 0, pattern(256, 1))
        vol.split(2)
        snap = image_bytes(paths[2])
        write(vol, 0, pattern(256, 2))                # 32 regions changed since the split
        job = vol.restore(2, rate_limit=0.02)         # a 4 KiB region about every 0.2 s
        opener.by_path[paths[2]].gates.append(flush)
        vol.checkpoint()                              # the flusher's round: given up on
        assert vol.images[2].stuck_io == 1
        assert read(vol, 200, 8) == snap[200 * BS:208 * BS]      # rolled back on demand
        assert job.state == "running", job.error
        flush.open()
        assert vol._images[2].wait_stuck(10) == 0
        job.set_rate_limit(None)
        assert job.wait(10), job.state
        assert job.state == "done", job.error
        assert image_bytes(paths[0]) == snap
    finally:
        flush.open()
        vol.close()


def test_a_restore_asks_the_kernel_to_read_ahead_of_its_copy(tmp_path, monkeypatch):
    """As a resync does (``resync._read_ahead``): the split image's marked regions are asked
    into the page cache before their copy, each once, and the rollback is the same."""
    from lvmirror.mirror import resync
    monkeypatch.setattr(resync, "READAHEAD", 2 * REGION)
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, leg_timeout=0)
    try:
        vol.split(1)
        snap = image_bytes(paths[1])
        marked = [0, 7, 8, 100]
        for r in marked:
            write(vol, r * REGION // BS, pattern(1, r + 1))
        log = []

        def match(op, off, ln):
            if op == "prefetch" or (op == "read" and ln == REGION):
                log.append((op, off // REGION))
            return False
        opener.by_path[paths[1]].gates.append(Gate(match))
        job = vol.restore(1)
        assert job.wait(10) and job.state == "done", (job.state, job.error)
        assert image_bytes(paths[0]) == snap
        assert [r for op, r in log if op == "prefetch"] == marked
        for k, r in enumerate(marked[:-1]):
            assert log.index(("prefetch", marked[k + 1])) < log.index(("read", r)), log
    finally:
        vol.close()


def test_a_region_copied_again_adds_to_the_total_so_progress_never_passes_it(tmp_path):
    """A write to a region the background copy restored but has not committed yet restores it
    again (the same data, committed at once): that copy counts in bytes_total as in
    bytes_done, so progress never shows more done than in all (trials 28/29: done > total)."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, leg_timeout=0)
    try:
        vol.split(1)
        snap = image_bytes(paths[1])
        for r in (0, 1, 2):
            write(vol, r * REGION // BS, pattern(1, r + 1))
        gate = Gate(lambda op, off, ln: op == "read" and off == REGION and ln == REGION)
        opener.by_path[paths[1]].gates.append(gate)
        job = vol.restore(1)
        gate.wait_reached()              # region 0 copied, its batch not committed
        assert job.progress()["bytes_done"] == REGION
        write(vol, 0, pattern(1, 9))     # restores region 0 again, then writes
        p = job.progress()
        assert p["bytes_done"] == 2 * REGION and p["bytes_total"] == 4 * REGION, p
        gate.open()
        assert job.wait(10) and job.state == "done", (job.state, job.error)
        p = job.progress()
        assert p["bytes_done"] == p["bytes_total"] == 4 * REGION, p
        expect = bytearray(snap)
        expect[0:BS] = pattern(1, 9)
        assert image_bytes(paths[0]) == bytes(expect)
    finally:
        vol.close()


def test_without_leg_timeout_a_failed_restores_retry_is_not_read_first(tmp_path):
    """With ``leg_timeout=0`` the retry's first read would be unbounded under the volume's
    management lock (trial 31: a hung split image then held split, abandon-restore and close
    as well), so it is not made: the retry starts, and the job meets the error itself."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=REGION, leg_timeout=0)
    try:
        vol.split(1)
        write(vol, 0, pattern(8, 2))
        opener.by_path[paths[1]].fail_reads = True
        job = vol.restore(1)
        assert job.wait(10) and job.state == "failed", (job.state, job.error)
        assert job.failed_region == 0
        j2 = vol.restore(1)                       # not refused up front
        assert j2 is not job
        assert j2.wait(10) and j2.state == "failed" and "cannot be read" in j2.error
    finally:
        opener.by_path[paths[1]].fail_reads = False
        vol.close()


def test_a_flush_failure_before_the_split_does_not_refuse_its_restore(tmp_path):
    """Stop 53 (a CI run): image 2's flush failed while it was in sync, so it failed with
    every region it may have lost marked, and was resynced; split afterwards, its copy is whole and durable, and a restore from it
    is accepted. A flush failure after the split still refuses it (trial 27)."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    st2 = opener.by_path[paths[2]]
    st2.fail_flushes = True
    vol.flush()                              # the other images are durable: it succeeds
    st2.fail_flushes = False
    assert vol.images[2].state is ImageState.FAILED and st2.flush_failures
    job = vol.resync(2)
    assert job.wait(10) and job.state == "done"
    vol.split(2)
    write(vol, 0, pattern(8, 2))
    job = vol.restore(2)
    assert job.wait(10) and job.state == "done", (job.state, job.error)
    assert read(vol, 0, 8) == pattern(8, 1)
    write(vol, 0, pattern(8, 3))
    st2.fail_flushes = True
    with pytest.raises(VolumeIOError):
        vol.check_restore(2, flush=True)
    st2.fail_flushes = False
    with pytest.raises(StateError, match=r"a flush of split image 2 .* failed since it was "
                                         r"split"):
        vol.restore(2)
    vol.close()


def test_a_flush_failure_not_answered_when_the_split_ran_refuses_its_restore(tmp_path):
    """A flush of image 2 failed in another thread (counted) and the volume has not answered
    it yet (the image not failed) when the split runs: the copy may lack what it lost. The
    split itself is refused now (its barrier's rule, test_volume_split), the image failed with
    its marks; a failure counted after the split's barrier and before its base was taken still
    refuses a restore from it, as one after the split does."""
    vol, opener, paths = make_volume(tmp_path, 3, region_size=REGION)
    write(vol, 0, pattern(64, 1))
    st2 = opener.by_path[paths[2]]
    st2.note_flush_failure()                 # counted by its flush, not yet seen
    with pytest.raises(StateError, match="a flush of it failed in another thread"):
        vol.split(2)
    assert vol.images[2].state is ImageState.FAILED
    job = vol.resync(2)
    assert job.wait(10) and job.state == "done", (job.state, job.error)
    vol.split(2)
    vol._images[2].split_flush_base = (st2, st2.flush_failures_seen - 1)   # counted before
    with pytest.raises(StateError, match=r"a flush of split image 2 .* failed since it was "
                                         r"split"):
        vol.restore(2)
    vol.close()
