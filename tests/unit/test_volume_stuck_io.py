"""I/O left behind in flight on a slow image (``leg_timeout``): a bounded fan-out completes a
write without an image that has not answered, and that image's write lands whenever its device
answers. Nothing may treat the image's contents as settled meanwhile: no resync copies over it,
no split calls it a frozen copy, and a volume opened again or an image attached again on the
same device still sees it (``legs.left_behind``, ``Leg.stuck_io``)."""

from __future__ import annotations

import os
import threading

import pytest

from lvmirror.errors import StateError
from lvmirror.mirror import legs
from lvmirror.mirror.volume import ImageState, MirrorVolume
from tests.unit.test_volume_helpers import (BS, Gate, image_bytes, make_volume, pattern, read,
                                            wait_until, write)

L = 16            # LBA of the stuck write: region 0 with 64 KiB regions (blocks 0-127)


@pytest.fixture(autouse=True)
def _short_wait(monkeypatch):
    monkeypatch.setattr(legs, "STUCK_IO_WAIT", 0.3)


def _stuck_write_on(vol, opener, path, lba=L, data=None, *, background=False):
    """Hold image ``path``'s copy of a write to ``lba`` at a gate; the volume completes it
    without that image after leg_timeout. Returns the gate (and the writer thread when
    ``background``: it is still waiting for leg_timeout then)."""
    gate = Gate(match=lambda op, off, ln: op == "write" and off == lba * BS)
    opener.by_path[path].gates.append(gate)
    data = pattern(2, 0xD1) if data is None else data
    if not background:
        write(vol, lba, data, fua=True)
        return gate
    t = threading.Thread(target=write, args=(vol, lba, data), kwargs={"fua": True})
    t.start()
    gate.wait_reached()
    return gate, t


def _landing_later(opener, path, lba=L):
    """Make image ``path``'s next write to ``lba`` wait for the returned event, then land
    through a descriptor of its own: as a write blocked in the kernel holds its own reference
    to the file and lands even after the volume closed its descriptor."""
    st = opener.by_path[path]
    fd = os.open(path, os.O_WRONLY)
    real = st.writev
    ev = threading.Event()
    hit = []

    def writev(offset, buffers, *, fua=False):
        bufs = list(buffers)
        if offset == lba * BS and not hit:
            hit.append(1)
            ev.wait(30)
            os.pwritev(fd, bufs, offset)
            os.close(fd)
            return
        return real(offset, bufs, fua=fua)
    st.writev = writev
    return ev


def test_no_resync_while_a_write_left_behind_as_slow_is_in_flight(tmp_path):
    """Image 1's write is stuck in its device; after leg_timeout it is failed as slow and the
    write completes from image 0, which then takes a newer write to the same blocks. A resync
    of image 1 is refused while the stuck write is in flight (it would land after the copy of
    its region and leave image 1 stale, marked in sync); once it returns, the resync makes the
    images identical, with the newer data."""
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096, leg_timeout=0.3)
    gate = _stuck_write_on(vol, opener, paths[1], data=pattern(2, 1))
    assert vol.images[1].state is ImageState.FAILED
    assert vol._images[1].stuck_io == 1
    assert vol.images[1].stuck_io == 1             # status reports it
    write(vol, L, pattern(2, 2))                   # newer data, image 0 only
    with pytest.raises(StateError, match="still has 1 I/O") as e:
        vol.resync(1)
    assert "a write landing after the copy would leave it stale" in str(e.value)
    gate.open()                                    # the old write lands on image 1 now
    wait_until(lambda: vol._images[1].stuck_io == 0)
    assert vol.images[1].stuck_io == 0
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    assert read(vol, L, 2) == pattern(2, 2)
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol.close()


def test_two_writes_left_behind_on_one_image_both_count(tmp_path):
    """Two concurrent writes stuck on image 1: after the first returns, the second still
    counts and a resync is still refused; after both, the resync leaves the images
    identical."""
    vol, opener, paths = make_volume(tmp_path, 2, leg_timeout=0.3)
    g1, t1 = _stuck_write_on(vol, opener, paths[1], L, background=True)
    g2, t2 = _stuck_write_on(vol, opener, paths[1], 300, background=True)
    t1.join(10)
    t2.join(10)
    assert vol._images[1].stuck_io == 2
    write(vol, 300, pattern(2, 0xD2))
    g1.open()
    wait_until(lambda: vol._images[1].stuck_io == 1)
    with pytest.raises(StateError, match="still has 1 I/O"):
        vol.resync(1)
    g2.open()
    wait_until(lambda: vol._images[1].stuck_io == 0)
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1])


# ---- a split of the image the write is stuck on ----------------------------------------------

def test_split_waits_for_a_write_left_behind_on_the_image(tmp_path):
    """3 images. A write W begun before T is stuck on image 1 while image 1 is split: the
    volume completes W without image 1 (leg_timeout) and the drain ends, but W is still in
    flight on image 1. The split waits for it: once split() returns, the frozen copy never
    changes again, and a write through the split image's own LUN is not overwritten by W."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    vol.flush()
    gate, t = _stuck_write_on(vol, opener, paths[1], background=True)
    threading.Timer(0.5, gate.open).start()          # the device answers after 0.5 s
    info = vol.split(1)
    t.join(10)
    assert vol.images[1].state is ImageState.SPLIT
    assert vol._images[1].stuck_io == 0
    assert info.drained == 1
    frozen = image_bytes(paths[1])
    exp = vol.split_image(1)
    x = pattern(2, 0xEE)
    exp.write(L, [memoryview(x)], fua=True)
    exp.flush()
    got = bytearray(2 * BS)
    exp.read(L, [memoryview(got)])
    assert bytes(got) == bytes(x)
    exp.close()
    vol.close()
    assert image_bytes(paths[1], 0, L * BS) == frozen[:L * BS]
    assert image_bytes(paths[1], (L + 2) * BS) == frozen[(L + 2) * BS:]


def test_split_fails_the_image_when_a_write_stays_stuck_on_it(tmp_path):
    """The same, but W stays stuck past the wait: image 1 is no frozen copy, so it is failed,
    not split, and split() says why. Its bitmap marks W's range and the writes after T; once W
    lands, a resync makes the three images identical with the newest data."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    vol.flush()
    gate, t = _stuck_write_on(vol, opener, paths[1], background=True)
    with pytest.raises(StateError, match="was not split: 1 I/O.*still in flight"):
        vol.split(1)
    t.join(10)
    assert vol.images[1].state is ImageState.FAILED
    assert "still in flight" in vol.images[1].error
    assert vol._images[1].bitmap.is_dirty(L * BS, BS)
    assert vol.images[1].split_time is None
    write(vol, 200, pattern(4, 0xD3))                  # after T: image 1 lacks it
    assert vol._images[1].bitmap.is_dirty(200 * BS, BS)
    with pytest.raises(StateError):
        vol.split(1)                                   # not in sync
    # the failure is persisted: a reopen sees image 1 failed with its marks
    gate.open()
    wait_until(lambda: vol._images[1].stuck_io == 0)
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None, leg_timeout=0.3)
    assert vol.images[1].state is ImageState.FAILED
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    assert read(vol, 200, 4) == pattern(4, 0xD3)
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1]) == image_bytes(paths[2])


# ---- another object on the same device -------------------------------------------------------

def test_a_reopened_volume_still_sees_the_write_left_behind(tmp_path):
    """A LUN removed and added again in the same lvmirrord closes the volume and opens it
    again; the old volume's write stuck on image 1 is still in flight and lands later. The
    new volume's resync of image 1 waits for it, then leaves the images identical."""
    vol, opener, paths = make_volume(tmp_path, 2, leg_timeout=0.3)
    returned = _landing_later(opener, paths[1])
    write(vol, L, pattern(2, 0xD1), fua=True)
    assert vol.images[1].state is ImageState.FAILED
    write(vol, L, pattern(2, 0xD2))
    vol.close()
    vol2 = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                             flush_interval=None, leg_timeout=0.3)
    assert vol2._images[1].stuck_io == 1
    with pytest.raises(StateError, match="still has 1 I/O"):
        vol2.resync(1)
    returned.set()                                     # the old volume's write lands now
    wait_until(lambda: vol2._images[1].stuck_io == 0)
    job = vol2.resync(1)
    assert job.wait(10) and job.state == "done"
    vol2.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    assert image_bytes(paths[1], L * BS, 2 * BS) == bytes(pattern(2, 0xD2))


def test_attach_again_refused_while_the_detached_image_has_a_write_in_flight(tmp_path):
    """Image 1, failed as slow with a write stuck, is detached and its file attached again:
    refused while the write is in flight (it would land after the full resync's copy), and
    the refusal opens nothing; once it lands, the attach and its full resync leave the images
    identical."""
    vol, opener, paths = make_volume(tmp_path, 2, leg_timeout=0.3)
    returned = _landing_later(opener, paths[1])
    write(vol, L, pattern(2, 0xD1), fua=True)
    write(vol, L, pattern(2, 0xD2))
    vol.detach(1)
    with pytest.raises(StateError, match="still has 1 I/O.*attach it once they return"):
        vol.attach(paths[1], force=True)
    assert len(vol.images) == 1
    returned.set()
    wait_until(lambda: legs.in_flight(opener.by_path[paths[1]].device) == 0)
    k = vol.attach(paths[1], force=True)
    assert k == 1
    for job in list(vol.jobs.values()):
        assert job.wait(10) and job.state == "done"
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    assert image_bytes(paths[1], L * BS, 2 * BS) == bytes(pattern(2, 0xD2))


def test_the_device_identity_is_the_file_not_the_path(tmp_path):
    """Two paths to one file (a symbolic link) share the count; another file does not."""
    from lvmirror.mirror.image import StorageImage
    f = tmp_path / "a"
    StorageImage.create_file(f, 1 << 20)
    StorageImage.create_file(tmp_path / "b", 1 << 20)
    os.symlink(f, tmp_path / "link")
    with StorageImage.open(f) as a, StorageImage.open(tmp_path / "link") as b, \
            StorageImage.open(tmp_path / "b") as c:
        assert a.device == b.device != c.device
        legs.left_behind(a.device)
        try:
            assert legs.in_flight(b.device) == 1 and legs.in_flight(c.device) == 0
            assert legs.wait_returned(b.device, 0.05) == 1
        finally:
            legs.returned(a.device)
        assert legs.wait_returned(b.device, 0.05) == 0


def test_status_and_metrics_tell_the_operator_of_io_left_behind():
    """``lvmirror status`` and the metrics name the I/Os still in flight on a failed image."""
    from lvmirror.cli import format_status
    from lvmirror.daemon.metrics import render
    img = dict(split_time=None, dirty_bytes=4096, bitmap_fill=0.01, path="/x", generation=1)
    st = {"volumes": {"v": {
        "size": 1 << 20, "block_size": 512, "region_size": 65536, "health": "degraded",
        "images": [dict(img, index=0, id=0, state="in-sync", dirty_bytes=None, error=None,
                        stuck_io=0),
                   dict(img, index=1, id=1, state="failed", error="slow", stuck_io=2)],
        "jobs": [], "io": dict(reads=0, writes=0, read_errors=0, write_errors=0, inflight=0)}},
        "luns": []}
    text = format_status(st)
    assert "2 I/O(s) still in flight on its device" in text, text
    assert text.count("still in flight") == 1
    prom = render(st, now=0.0)
    assert 'lvmirror_image_io_left_behind{volume="v",image="1"} 2' in prom, prom
    assert 'lvmirror_image_io_left_behind{volume="v",image="0"} 0' in prom


# ---- a resync's own copy stuck on its target --------------------------------------------------

def test_a_resync_copy_stuck_on_its_target_fails_the_image_and_close_does_not_hang(tmp_path):
    """A resync's copy into image 1 stops answering: after leg_timeout (plus the source's read
    time) the copy is given up on, image 1 is failed with its bitmap kept, and the job ends
    failed, so ``close`` (a LUN removal, a daemon stop) returns instead of waiting for the
    device without limit. The copy's write is counted as left behind: a resync waits for it,
    and after it lands the resync leaves the images identical with the newest data."""
    vol, opener, paths = make_volume(tmp_path, 2, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    vol.split(1)
    write(vol, 0, pattern(128, 2))                     # region 0 changed since the split
    write(vol, 200, pattern(4, 3))                     # region 1 too
    returned = _landing_later(opener, paths[1], 0)
    job = vol.resync(1)
    assert job.wait(10)
    assert job.state == "failed" and "still busy" in job.error, (job.state, job.error)
    assert vol.images[1].state is ImageState.FAILED
    assert vol._images[1].stuck_io == 1
    assert vol._images[1].bitmap.is_dirty(0, BS) and vol._images[1].bitmap.is_dirty(200 * BS, BS)
    write(vol, 0, pattern(2, 4))                       # newer than what the stuck copy carries
    done = threading.Event()
    threading.Thread(target=lambda: (vol.close(), done.set()), daemon=True).start()
    assert done.wait(10), "close() waits for a device that does not answer"
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None, leg_timeout=0.3)
    with pytest.raises(StateError, match="still has 1 I/O"):
        vol.resync(1)
    returned.set()                                     # the old copy lands now
    wait_until(lambda: vol._images[1].stuck_io == 0)
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done", (job.state, job.error)
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    assert image_bytes(paths[1], 0, 2 * BS) == bytes(pattern(2, 4))


# ---- a slow leg timed against the leg being split --------------------------------------------

def _write_in_thread(vol, lba, data):
    box = {}

    def body():
        try:
            write(vol, lba, data, fua=True)
            box["ok"] = True
        except BaseException as e:   # noqa: BLE001 - handed to the test
            box["err"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


@pytest.mark.parametrize("nimages", [2, 3])
def test_a_slow_leg_is_not_timed_against_the_image_split_off_meanwhile(tmp_path, nimages):
    """A write W begun before T: its leg on the image being split (the last) ends at once,
    its legs on the images that stay live take 1.5 s (leg_timeout 1 s). Once split, the fast
    image holds no live copy of W, so the live ones are not slow against it: W is answered
    GOOD, no image is failed and the volume stays online (it went offline: its last in-sync
    image failed as slow, W answered with an error though every image took it)."""
    vol, opener, paths = make_volume(tmp_path, nimages, leg_timeout=1.0)
    live = paths[:-1]
    gates = []
    for p in live:
        g = Gate(match=lambda op, off, ln: op == "write" and off == L * BS)
        opener.by_path[p].gates.append(g)
        gates.append(g)
    t, box = _write_in_thread(vol, L, pattern(2, 0xAB))
    for g in gates:
        g.wait_reached()
    threading.Timer(1.5, lambda: [g.open() for g in gates]).start()
    vol.split(nimages - 1)
    t.join(10)
    assert box == {"ok": True}, box
    assert vol.offline is None
    assert [i.state for i in vol.images[:-1]] == [ImageState.IN_SYNC] * (nimages - 1)
    assert read(vol, L, 2) == pattern(2, 0xAB)
    vol.close()
    for p in paths:
        assert image_bytes(p, L * BS, 2 * BS) == bytes(pattern(2, 0xAB))


def test_a_slow_leg_is_still_timed_against_a_live_leg_after_a_split(tmp_path):
    """3 images, image 2 split while W is in flight: image 0 ends W at once, image 1 takes
    longer than leg_timeout after it, image 2 (being split) too, though it lands within the
    split's wait. Image 1 is failed as slow against image 0, which stays live; W is answered
    GOOD and image 2 is split."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    gates = []
    for p in paths[1:]:
        g = Gate(match=lambda op, off, ln: op == "write" and off == L * BS)
        opener.by_path[p].gates.append(g)
        gates.append(g)
    t, box = _write_in_thread(vol, L, pattern(2, 0xAC))
    for g in gates:
        g.wait_reached()
    threading.Timer(1.5, gates[0].open).start()
    threading.Timer(0.45, gates[1].open).start()      # within the split's wait for it
    vol.split(2)
    t.join(10)
    assert box == {"ok": True}, box
    assert vol.images[1].state is ImageState.FAILED and "slow" in vol.images[1].error
    assert vol.images[2].state is ImageState.SPLIT
    wait_until(lambda: vol._images[1].stuck_io == 0)
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1])


def test_an_image_that_could_not_be_opened_still_shows_and_waits_for_its_write(tmp_path):
    """The volume reopened while image 1's device refuses the open (a block device's O_EXCL
    claim is still held by the write in flight): status still counts the write (by what the
    path names), and a resync waits for it before refusing, saying how long it waited."""
    import time
    from lvmirror.errors import ConfigError
    vol, opener, paths = make_volume(tmp_path, 2, leg_timeout=0.3)
    returned = _landing_later(opener, paths[1])
    write(vol, L, pattern(2, 0xD1), fua=True)
    vol.close()

    def refusing(path, **kw):
        if str(path) == paths[1]:
            raise ConfigError(f"image {path}: busy")
        return opener(path, **kw)
    vol2 = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=refusing,
                             flush_interval=None, leg_timeout=0.3)
    assert vol2._images[1].storage is None
    assert vol2.images[1].stuck_io == 1
    t0 = time.monotonic()
    with pytest.raises(StateError, match=r"still has 1 I/O.*waited 0\.[3-9] s"):
        vol2.resync(1)
    assert time.monotonic() - t0 >= 0.3
    returned.set()
    wait_until(lambda: vol2.images[1].stuck_io == 0)
    vol2.close()


# ---- lvmirror's own flush of an image that serves no reads ------------------------------------

def _flush_gate(opener, path):
    gate = Gate(match=lambda op, off, ln: op == "flush")
    opener.by_path[path].gates.append(gate)
    return gate


def test_a_split_whose_image_flush_does_not_end_fails_the_image(tmp_path):
    """The split image's device stops answering its flush at the split's end: past
    leg_timeout (plus its unflushed bytes at MIN_DEVICE_RATE) the image is failed, not split,
    and split() says why instead of waiting without limit; the flush is counted as left behind
    and a resync after it returns leaves the images identical."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    gate = _flush_gate(opener, paths[2])
    with pytest.raises(StateError, match="was not split: its flush failed.*still busy"):
        vol.split(2)
    assert vol.images[2].state is ImageState.FAILED
    assert vol._images[2].stuck_io == 1
    assert [i.state for i in vol.images[:2]] == [ImageState.IN_SYNC] * 2
    write(vol, 0, pattern(4, 2))
    gate.open()
    wait_until(lambda: vol._images[2].stuck_io == 0)
    job = vol.resync(2)
    assert job.wait(10) and job.state == "done"
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[2])


def test_a_split_whose_image_flush_fails_is_not_called_done(tmp_path):
    """The split image's flush at the split's end fails (EIO): what it holds is not durable,
    so the split is not saved as done; the image is failed with its regions marked, and a
    reopen finds it failed."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    opener.by_path[paths[2]].fail_flushes = True
    with pytest.raises(StateError, match="was not split: its flush failed.*injected flush"):
        vol.split(2)
    assert vol.images[2].state is ImageState.FAILED
    assert vol._images[2].bitmap.is_dirty(0, BS)
    opener.by_path[paths[2]].fail_flushes = False
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None)
    assert vol.images[2].state is ImageState.FAILED
    vol.close()


def test_close_during_a_resync_whose_target_flush_does_not_end(tmp_path):
    """A resync's checkpoint flushes its target, whose device stops answering: the flush is
    given up on past its bound, the target failed and the job ended, so ``close`` returns; the
    volume reopened refuses a resync until the flush returns, then resyncs it."""
    import time
    from lvmirror.mirror import resync as resync_mod
    vol, opener, paths = make_volume(tmp_path, 2, leg_timeout=0.3, size=4 << 20)
    write(vol, 0, pattern(8192, 1))
    vol.split(1)
    write(vol, 0, pattern(8192, 2))                    # every region changed
    gate = _flush_gate(opener, paths[1])
    orig = resync_mod.CHECKPOINT_REGIONS
    resync_mod.CHECKPOINT_REGIONS = 4                  # a checkpoint soon
    try:
        job = vol.resync(1)
        gate.wait_reached()
        assert job.wait(10), "the resync waits for its target's flush without limit"
    finally:
        resync_mod.CHECKPOINT_REGIONS = orig
    assert job.state == "failed" and "flush still busy" in (job.error or ""), job.error
    assert vol.images[1].state is ImageState.FAILED
    done = threading.Event()
    threading.Thread(target=lambda: (vol.close(), done.set()), daemon=True).start()
    assert done.wait(10), "close() waits for a device that does not answer"
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None, leg_timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(StateError, match="still has 1 I/O"):
        vol.resync(1)
    assert time.monotonic() - t0 >= 0.3
    gate.open()
    wait_until(lambda: vol._images[1].stuck_io == 0)
    job = vol.resync(1)
    assert job.wait(20) and job.state == "done", (job.state, job.error)
    vol.close()
    assert image_bytes(paths[0]) == image_bytes(paths[1])


def test_a_split_image_whose_flush_does_not_end_holds_no_checkpoint(tmp_path):
    """An exported split image's device stops answering the flusher's flush: the checkpoint
    goes on past the flush's bound (the image stays split, its error says so), and the next
    checkpoints leave no further flush behind on it; once the flush returns, they flush it
    again."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    vol.split(2)
    exp = vol.split_image(2)
    exp.write(0, [memoryview(pattern(2, 5))])
    gate = Gate(match=lambda op, off, ln: op == "flush", count=10)
    opener.by_path[paths[2]].gates.append(gate)
    done = threading.Event()
    threading.Thread(target=lambda: (vol.checkpoint(), done.set()), daemon=True).start()
    assert done.wait(10), "a checkpoint waits for a split image's flush without limit"
    assert vol.images[2].state is ImageState.SPLIT and "flush still busy" in vol.images[2].error
    assert vol._images[2].stuck_io == 1
    vol.checkpoint()
    vol.checkpoint()
    assert vol._images[2].stuck_io == 1 and gate.count == 9    # no second flush submitted
    gate.open()
    wait_until(lambda: vol._images[2].stuck_io == 0)
    vol.checkpoint()
    assert gate.count == 8                                     # flushed again
    exp.close()
    vol.close()


# ---- nothing failed on the image between T and the split's end --------------------------------

def test_a_write_begun_before_t_that_fails_on_the_split_image_fails_the_split(tmp_path):
    """A write begun before T fails (EIO) on the image being split after T: it is answered GOOD
    from the others, but the copy lacks it, so the split is not saved as done: the image is
    failed with the write's range marked."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    gate = Gate(match=lambda op, off, ln: op == "write" and off == L * BS)
    opener.by_path[paths[2]].gates.append(gate)
    t, box = _write_in_thread(vol, L, pattern(2, 0xE1))
    gate.wait_reached()
    p = vol.splits.prepare(2)
    vol.splits.switch(p)                                   # T, with the write in flight
    opener.by_path[paths[2]].fail_writes = True
    gate.open()                                            # the write fails on image 2
    t.join(10)
    assert box == {"ok": True}, box
    opener.by_path[paths[2]].fail_writes = False
    with pytest.raises(StateError, match="was not split: an I/O begun before the split failed"):
        vol.splits.finish(p)
    assert vol.images[2].state is ImageState.FAILED
    assert vol._images[2].bitmap.is_dirty(L * BS, BS)
    vol.close()


def test_a_write_left_behind_that_returns_an_error_fails_the_split(tmp_path):
    """The write the split waits for (left behind as slow on the image being split) returns
    EIO within the wait: the copy lacks it, so the image is failed, not split."""
    import errno
    from lvmirror.errors import ImageIOError
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    st = opener.by_path[paths[2]]
    real, held, hit = st.writev, threading.Event(), []

    def writev(offset, buffers, *, fua=False):
        if offset == L * BS and not hit:
            hit.append(1)
            held.wait(30)
            raise ImageIOError(st, errno.EIO, f"image {st.path}: injected late write error")
        return real(offset, buffers, fua=fua)
    st.writev = writev
    t, box = _write_in_thread(vol, L, pattern(2, 0xD1))
    wait_until(lambda: hit)
    threading.Timer(0.45, held.set).start()               # within the split's wait
    with pytest.raises(StateError, match="was not split: an I/O begun before the split failed"
                                         ".*injected late write error"):
        vol.split(2)
    t.join(10)
    assert box == {"ok": True}, box
    assert vol.images[2].state is ImageState.FAILED
    vol.close()


def test_a_flusher_flush_given_up_between_t_and_the_end_then_failing_fails_the_split(tmp_path):
    """Between T and the split's end a flusher round's flush of the split image is given up
    on as slow, then returns EIO (a writeback error the kernel reports once): a later flush
    succeeds, but the split is not saved as done."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    st = opener.by_path[paths[2]]
    p = vol.splits.prepare(2)
    vol.splits.switch(p)
    gate = _flush_gate(opener, paths[2])
    vol.checkpoint()                                       # its flush of image 2 is left behind
    assert vol._images[2].stuck_io == 1
    st.fail_flushes = True
    gate.open()
    wait_until(lambda: vol._images[2].stuck_io == 0)       # ...and returned EIO
    st.fail_flushes = False
    with pytest.raises(StateError, match="was not split: an I/O begun before the split failed"):
        vol.splits.finish(p)
    assert vol.images[2].state is ImageState.FAILED
    vol.close()


def test_a_flush_queued_on_a_stopped_worker_is_not_counted_as_left_behind(tmp_path):
    """A flusher round racing a detach queues the flush of the split image on a worker that
    was just stopped: it never runs, so it is dropped, not counted on the device for good
    (which refused an attach of the same file for the life of the process)."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    vol.split(2)
    vol._images[2].worker.stop()
    vol.checkpoint()
    assert vol._images[2].stuck_io == 0
    assert vol.images[2].state is ImageState.SPLIT and vol.images[2].error is None
    vol.close()


def test_unflushed_counts_zeroes_and_is_unknown_before_the_first_flush(tmp_path):
    """What a flush may have to write back: nothing known before this object's first flush;
    after it the bytes and writes made since, zeroes a discard wrote included."""
    from lvmirror.mirror.image import StorageImage
    StorageImage.create_file(tmp_path / "a", 4 << 20)
    with StorageImage.open(tmp_path / "a") as st:
        assert st.unflushed() is None
        st.flush()
        assert st.unflushed() == (0, 0)
        st.writev(0, [memoryview(bytearray(8192))])
        st._write_zeroes(1 << 20, 1 << 20)
        assert st.unflushed() == (8192 + (1 << 20), 1)
        st.flush()
        assert st.unflushed() == (0, 0)


def test_a_device_timeout_on_a_write_begun_before_t_fails_the_split(tmp_path):
    """ETIMEDOUT the device returns (a block layer timeout, an NFS soft mount) is an error like
    EIO, not lvmirror's own "failed as slow": a write begun before T that gets it on the image
    being split fails the split. A read error there leaves the copy as it was."""
    import errno
    from lvmirror.errors import ImageIOError
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    st = opener.by_path[paths[2]]
    real = st.writev
    gate = Gate(match=lambda op, off, ln: op == "write" and off == L * BS)
    st.gates.append(gate)

    def writev(offset, buffers, *, fua=False):
        if offset == L * BS:
            st._gate("write", offset, 0)
            raise ImageIOError(st, errno.ETIMEDOUT, f"image {st.path}: device timeout")
        return real(offset, buffers, fua=fua)
    st.writev = writev
    t, box = _write_in_thread(vol, L, pattern(2, 0xE2))
    gate.wait_reached()
    p = vol.splits.prepare(2)
    vol.splits.switch(p)
    vol._image_error(vol._images[2], ImageIOError(st, errno.EIO, "read error", op="read"),
                     0, BS, is_read=True)              # a read: nothing lost from the copy
    assert p.lost is None
    gate.open()
    t.join(10)
    assert box == {"ok": True}, box
    with pytest.raises(StateError, match="was not split: an I/O begun before the split failed"
                                         ".*device timeout"):
        vol.splits.finish(p)
    assert vol.images[2].state is ImageState.FAILED
    vol.close()


def test_a_flush_bound_applies_before_the_first_flush_too(tmp_path):
    """Before this process flushed an image, what its flush must write back is unknown: the
    bound is leg_timeout plus UNKNOWN_DIRTY_WAIT, not none (a reopened volume's split image on
    a device that stopped answering held the flusher's round, and close, without limit)."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    vol.split(2)
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None, leg_timeout=0.3)
    img = vol._images[2]
    assert img.storage.unflushed() is None
    assert vol._flush_limit(img) == pytest.approx(0.3 + legs.UNKNOWN_DIRTY_WAIT)
    assert vol._flush_limit(vol._images[0]) is None          # in sync: not bounded
    vol.close()


def test_a_resync_source_read_error_is_a_read_error(tmp_path):
    """A resync's read from its source fails (EIO): that is a read error like any other - it
    neither counts as lost from a split of the source under way (the copy is as it was), nor
    takes the volume offline when the source is its last in-sync image (the resync fails,
    saying so; reads there are the initiators' to retry and probe)."""
    vol, opener, paths = make_volume(tmp_path, 3, leg_timeout=0.3)
    write(vol, 0, pattern(128, 1))
    vol.split(2)
    write(vol, 0, pattern(4, 2))
    src = opener.by_path[paths[0]]
    gate = Gate(match=lambda op, off, ln: op == "read" and off == 0)
    src.gates.append(gate)
    job = vol.resync(2)
    gate.wait_reached()
    p = vol.splits.prepare(0)
    vol.splits.switch(p)                                   # image 0 split while it is read
    src.fail_reads = True
    gate.open()
    assert job.wait(10) and job.state == "done", (job.state, job.error)   # read from image 1
    src.fail_reads = False
    info = vol.splits.finish(p)                            # not refused: nothing lost
    assert info.index == 0 and vol.images[0].state is ImageState.SPLIT
    # image 1 is now the last in-sync image; its read error fails the resync, not the volume
    opener.by_path[paths[1]].fail_reads = True
    job = vol.resync(2, full=True)
    assert job.wait(10) and job.state == "failed"
    assert vol.offline is None and vol.images[1].state is ImageState.IN_SYNC
    opener.by_path[paths[1]].fail_reads = False
    vol.close()
