"""A resync copy in flight (its read from the source's page cache done, its write to the target
pending) while the last in-sync image's flush fails and loses its cache (the volume goes
offline): ``_image_error`` marks the region in the syncing image's bitmap and saves it, and
the copy that ends afterwards must keep that bit (``ResyncJob._copy``: the volume went offline
since its read), so the next resync copies the region again and the images agree - after a
probe, and after a power cut. Found by the fifteenth newcomer trial: the copy cleared the mark,
the job's pause saved the clear bit, and region 20 differed between images marked in sync."""
import errno
import threading

import pytest

from lvmirror.errors import ImageIOError, StateError, VolumeIOError
from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.jobcontrol import JobControl
from tests.unit.powerloss import Machine, VolatileImage
from tests.unit.test_volume_helpers import job_after_probe, pattern, wait_until
from tests.unit.test_volume_powerloss import (  # noqa: F401 (_power: the fixture)
    P3, REGION, SIZE, _first_flush_fails, _images_agree, _mirror_with_p1, _open, _power, _read_image,
    _recover_and_agree, _wait_jobs, _write, lose_cache_of)

R = 20
X = bytes(pattern(REGION // 512, 0x7777))


def _flush_fails_losing_cache(st):
    """``st``'s next flush fails and loses what it had not flushed (later ones work)."""
    return _first_flush_fails(st, lose_cache=True)


def _gate_copy(monkeypatch, path, regions):
    """Hold writes/discards to image file ``path`` at each region of ``regions`` (dict r ->
    (entered, release)), any thread (gates are added when only the copy writes there)."""
    real_w, real_d = VolatileImage.writev, VolatileImage.discard

    def hold(st, offset):
        r = offset // REGION
        if st.path == path and r in regions:
            entered, release = regions[r]
            entered.set()
            assert release.wait(20)

    def writev(st, offset, buffers, *, fua=False):
        hold(st, offset)
        return real_w(st, offset, buffers, fua=fua)

    def discard(st, offset, length):
        hold(st, offset)
        return real_d(st, offset, length)
    monkeypatch.setattr(VolatileImage, "writev", writev)
    monkeypatch.setattr(VolatileImage, "discard", discard)


def _saved_bits(vol, img):
    return RegionBitmap.load(vol._bitmap_path(img), vol.size, vol.region_size)


@pytest.mark.parametrize("cut", [False, True])
def test_a_copy_in_flight_when_the_source_flush_fails_keeps_its_bit(tmp_path, cut, monkeypatch):
    m = Machine(tmp_path / "meta")
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    vol = _mirror_with_p1(m, [a, b])
    vol.split(1)
    _write(vol, 0, P3)                       # regions 0-31 marked in the split bitmap
    img1 = vol._images[1]
    gates = {R - 1: (threading.Event(), threading.Event())}
    _gate_copy(monkeypatch, img1.storage.path, gates)
    job = vol.resync(1)
    assert gates[R - 1][0].wait(10)           # copy held at region 19 (after sources_durable)
    _write(vol, R * (REGION // 512), X)       # region 20: both images, source not flushed
    gates[R] = (threading.Event(), threading.Event())
    gates[R - 1][1].set()
    assert gates[R][0].wait(10)               # copy of 20 read X from source's cache, held
    fired = _flush_fails_losing_cache(vol.image_storage(0))
    with pytest.raises(Exception):
        vol.flush()
    assert fired and vol.offline
    mem_after_mark = img1.bitmap.test_region(R)
    disk_after_mark = _saved_bits(vol, img1).test_region(R)
    gates[R][1].set()
    assert job.wait(10)
    assert job.state == "failed" and "went offline" in job.error, (job.state, job.error)
    assert img1.bitmap.test_region(R) and _saved_bits(vol, img1).test_region(R), \
        "the copy cleared the mark"
    assert mem_after_mark and disk_after_mark
    if cut:
        nxt = m.cut(tmp_path / "cut")
        vol.close()
        _recover_and_agree(nxt)
    else:
        # stopped by the volume going offline: it goes on by itself once it is back
        j2 = job_after_probe(vol, 1, resumed=True)
        assert j2.wait(30) and j2.state == "done", (j2.state, j2.error)
        _images_agree(m, vol)


def test_two_syncing_images_both_keep_the_mark(tmp_path, monkeypatch):
    """3 images, 1 and 2 syncing: image 1's copy of region 20 in flight at the flush failure,
    image 2's resync paused before it. Both keep region 20 marked (in memory and on disk) and
    both resyncs after the probe leave the three images identical."""
    m = Machine(tmp_path / "meta")
    a, b, c = (str(tmp_path / f"{n}.img") for n in "abc")
    vol = _mirror_with_p1(m, [a, b, c])
    vol.split(1)
    vol.split(2)
    _write(vol, 0, P3)
    img1, img2 = vol._images[1], vol._images[2]
    j2 = vol.resync(2, rate_limit=1.0)
    while j2.bytes_done < 2 * REGION:
        j2.wait(0.02)
    j2.cancel()
    assert j2.wait(10)
    gates = {R - 1: (threading.Event(), threading.Event())}
    _gate_copy(monkeypatch, img1.storage.path, gates)
    job = vol.resync(1)
    assert gates[R - 1][0].wait(10)
    _write(vol, R * (REGION // 512), X)
    gates[R] = (threading.Event(), threading.Event())
    gates[R - 1][1].set()
    assert gates[R][0].wait(10)
    fired = _flush_fails_losing_cache(vol.image_storage(0))
    with pytest.raises(Exception):
        vol.flush()
    assert fired and vol.offline
    gates[R][1].set()
    assert job.wait(10)
    res = {i: (im.bitmap.test_region(R), _saved_bits(vol, im).test_region(R))
           for i, im in ((1, img1), (2, img2))}
    assert res == {1: (True, True), 2: (True, True)}, res
    for i in (1, 2):
        # image 1's stopped by the volume going offline goes on by itself; image 2's,
        # cancelled before, does not
        jj = job_after_probe(vol, i, lambda i=i: vol.resync(i), resumed=i == 1)
        assert jj.wait(30) and jj.state == "done", (jj.state, jj.error)
    _images_agree(m, vol)


def test_a_split_image_is_marked_where_the_source_lost_writes_from_before_t(tmp_path):
    """A write reaches both images unflushed, image 1 is split (it holds the write, flushed by
    the split), then the source's flush fails and loses it (the volume goes offline). The
    region is marked in the split image's change bitmap, so after the probe its resync copies
    it back and the images agree (trial 16: it was not, and region 5 differed)."""
    m = Machine(tmp_path / "meta")
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    vol = _mirror_with_p1(m, [a, b])
    _write(vol, 5 * (REGION // 512), X)          # both images, unflushed
    vol.split(1)
    fired = _flush_fails_losing_cache(vol.image_storage(0))
    with pytest.raises(Exception):
        vol.flush()
    assert fired and vol.offline
    assert vol.probe()
    assert vol._images[1].bitmap.test_region(5)
    j = vol.resync(1)
    assert j.wait(30) and j.state == "done", j.error
    _images_agree(m, vol)


def _try(fn):
    try:
        fn()
        return "ok"
    except Exception as e:
        return repr(e)


def test_a_copy_begun_while_offline_keeps_its_bit_through_a_second_failure(tmp_path,
                                                                          monkeypatch):
    """The volume goes offline while a copy waits for its region lock, so the copy samples the
    offline count when it is already raised; a second failure of the source (a flush in flight
    since before the first) after the copy's read marks the region again without counting (a
    volume goes offline once), and a probe brings the volume back. The copy must keep its bit:
    it began offline (trial 16: it cleared it, and region 20 differed between images marked
    in sync)."""
    m = Machine(tmp_path / "meta")
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    vol = _mirror_with_p1(m, [a, b])
    vol.split(1)
    _write(vol, 0, P3)
    src, img1 = vol._images[0], vol._images[1]
    spath, tpath = src.storage.path, img1.storage.path
    gates = {}          # (path, region) -> (entered, release)
    real_w = VolatileImage.writev

    def writev(st, offset, buffers, *, fua=False):
        g = gates.get((st.path, offset // REGION))
        if g is not None and len(g) == 3 and not g[2]:
            g[2].append(1)          # let the first writer through (W), hold the next (copy)
        elif g is not None:
            g[0].set()
            assert g[1].wait(20)
        return real_w(st, offset, buffers, fua=fua)
    monkeypatch.setattr(VolatileImage, "writev", writev)
    ev = lambda: (threading.Event(), threading.Event())  # noqa: E731
    g19 = gates[(tpath, R - 1)] = ev()
    job = vol.resync(1)
    assert g19[0].wait(10)                      # copy held in region 19's target write
    # W: a write to region 20, held in its source write (holds region 20's lock)
    gw = gates[(spath, R)] = ev()
    res = {}
    wt = threading.Thread(target=lambda: res.__setitem__(
        "W", _try(lambda: _write(vol, R * (REGION // 512), X))))
    wt.start()
    assert gw[0].wait(10)
    del gates[(tpath, R - 1)]
    del gates[(spath, R)]
    g19[1].set()                                # copy finishes 19, blocks on region 20's lock
    wait_until(lambda: not img1.bitmap.test_region(R - 1))     # the copy of region 19 ended
    st = src.storage
    real_flush, calls = st.flush, []
    f2_release, f2_entered = threading.Event(), threading.Event()

    def flush():
        calls.append(1)
        n = len(calls)
        if n == 1:
            f2_entered.set()
            assert f2_release.wait(20)
        if n in (1, 2):
            lose_cache_of(st)
            raise ImageIOError(st, errno.EIO, f"flush {n}: EIO (injected)", op="flush",
                               offset=None, length=0)
        return real_flush()
    st.flush = flush
    f2 = threading.Thread(target=lambda: res.__setitem__("F2", _try(vol.flush)))
    f2.start()
    assert f2_entered.wait(10)                  # F2 in flight, held in the source's flush
    res["F1"] = _try(vol.flush)                 # E1: volume offline, count +1
    assert vol.offline
    n_off = vol.stats_offline_events()
    # now hold the copy's target write of region 20 (W's own write goes through)
    g20 = gates[(tpath, R)] = (threading.Event(), threading.Event(), [])
    gw[1].set()                                 # W writes X to both images, releases lock
    wt.join(10)
    assert g20[0].wait(10), "copy never reached region 20's target write"
    # copy has read X from the source (cache, not durable) while offline
    f2_release.set()                            # E2: source loses X; marks 20; no count bump
    f2.join(10)
    assert vol.stats_offline_events() == n_off
    assert img1.bitmap.test_region(R)
    assert vol.probe()                          # back online
    del gates[(tpath, R)]
    g20[1].set()                                # the copy writes X and must keep its bit
    assert job.wait(30)
    assert res["W"] == "ok", res                # acknowledged: on both images, then lost
    if img1.state.value == "syncing":           # (the job's next pass copied region 20
        j2 = vol.resync(1)                      # again, or it stopped offline)
        assert j2.wait(30) and j2.state == "done", (j2.state, j2.error)
    _images_agree(m, vol)


RB = REGION // 512                               # blocks a region
Z = bytes(pattern(1, 0x5555))                    # one block


def _restore_after_loss(tmp_path):
    """Image 1 holds X in region 5 (written unflushed to both images, then split: the split
    flushes it); region 10 is written after the split; a restore from image 1 starts, held
    before its first copy. Returns (m, vol, job, (a, b))."""
    m = Machine(tmp_path / "meta")
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    vol = _mirror_with_p1(m, [a, b])
    _write(vol, 5 * RB, X)                       # both images, unflushed
    vol.split(1)
    _write(vol, 10 * RB, bytes(pattern(RB, 0x6666)))
    job = vol.restore(1, rate_limit=0.001)       # 64 s for its first region: held
    assert job.bitmap.test_region(10) and not job.bitmap.test_region(5)
    return m, vol, job, (a, b)


def _lose_cache(vol, job):
    """Image 0's flush fails and loses its cache - everything written since it was last
    flushed (the volume goes offline); the held restore, unlimited, stops as failed (it stays
    registered)."""
    fired = _flush_fails_losing_cache(vol.image_storage(0))
    with pytest.raises(Exception):
        vol.flush()
    assert fired and vol.offline
    job.set_rate_limit(None)                     # its copy goes on within 0.25 s
    assert job.wait(10) and job.state == "failed", (job.state, job.error)
    assert "went offline" in job.error


def _region(data, r):
    return bytes(data[r * REGION:(r + 1) * REGION])


def _read(vol, lba, nblocks):
    buf = bytearray(nblocks * 512)
    vol.read(lba, [memoryview(buf)])
    return bytes(buf)


def _finish_restore(m, vol, tmp_path, cut):
    """After a loss: a power cut and the restore resumed at open (``cut``), or the probe and
    the restore going on by itself; returns the machine whose files hold the result (volume closed)."""
    if cut:
        nxt = m.cut(tmp_path / "cut")
        vol.close()
        vol = _open(nxt)
        m = nxt
        for j in vol.jobs.values():             # it resumed at its saved rate: unlimit it
            j.set_rate_limit(None)
        _wait_jobs(vol)
    else:
        # stopped by the volume going offline (``_lose_cache``): it goes on by itself once
        # the probe brings the volume back (JobControl.resume_after_offline)
        j2 = job_after_probe(vol, 1, resumed=True)
        assert j2.kind == "restore"
        assert j2.wait(30) and j2.state == "done", (j2.state, j2.error)
    vol.close()
    return m


def _split_then_region_10(tmp_path, *, flush):
    """A 2-image mirror holding P1, image 1 split, then region 10 written (and, ``flush``,
    flushed) on the live image: the region a restore from image 1 rolls back. Returns
    (m, vol, a, b)."""
    m = Machine(tmp_path / "meta")
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    vol = _mirror_with_p1(m, [a, b])
    vol.split(1)
    _write(vol, 10 * RB, bytes(pattern(RB, 0x6666)))
    if flush:
        vol.flush()
    return m, vol, a, b


@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("write", [False, True])
def test_a_restore_begins_with_the_live_images_durable(tmp_path, cut, write):
    """X (region 5, from before the split, which the split copy holds) is unflushed on the
    live image when a restore begins. The restore makes the live images durable first, so
    when the live image then loses its cache (its flush fails; the volume goes offline) -
    after a one-block write Z to region 5 or not - X survives, and the restore, resumed
    after a probe or after a power cut, ends with the live image reading as the split copy
    everywhere but the write's block. (Trials 17 and 21: X was lost with the cache and the
    restore ended done with region 5 holding neither copy's data.)"""
    m, vol, job, (a, b) = _restore_after_loss(tmp_path)
    if write:
        _write(vol, 5 * RB, Z)                   # completes, never flushed: may be lost
    _lose_cache(vol, job)
    m = _finish_restore(m, vol, tmp_path, cut)
    live, split = _read_image(m, a), _read_image(m, b)
    assert _region(split, 5) == X
    assert _region(live, 5)[len(Z):] == X[len(Z):]
    assert _region(live, 5)[:len(Z)] in ((Z, X[:len(Z)]) if write else (X[:len(Z)],))
    bad = [r for r in range(SIZE // REGION) if r != 5 and _region(live, r) != _region(split, r)]
    assert not bad, f"regions {bad} of the live image were not rolled back"


def test_a_cut_during_a_restore_keeps_what_was_unflushed_when_it_began(tmp_path):
    """The same with no failing flush: a power cut while the restore is held, then the
    restore resumed at open (trial 21: the cut dropped X, the write-intent log's recovery
    marked region 5 only in the split's change bitmap, and the restore ended done)."""
    m, vol, job, (a, b) = _restore_after_loss(tmp_path)
    m = _finish_restore(m, vol, tmp_path, cut=True)
    live, split = _read_image(m, a), _read_image(m, b)
    bad = [r for r in range(SIZE // REGION) if _region(live, r) != _region(split, r)]
    assert not bad, f"regions {bad} of the live image were not rolled back"


def test_a_restore_whose_start_cannot_be_made_durable_is_refused(tmp_path):
    """The live image's flush fails as the restore begins: nothing is saved and no restore
    is registered (the volume is offline); after the probe it begins."""
    m, vol, a, b = _split_then_region_10(tmp_path, flush=False)
    _flush_fails_losing_cache(vol.image_storage(0))
    with pytest.raises(VolumeIOError, match="the restore's start not saved"):
        vol.restore(1)
    assert vol.offline and vol.control.restore_job is None
    assert not any(j.kind == "restore" for j in vol.jobs.values())
    job = job_after_probe(vol, 1, lambda: vol.restore(1))
    assert job.wait(30) and job.state == "done", (job.state, job.error)
    vol.close()


@pytest.mark.parametrize("on_demand", [False, True])
def test_a_copy_not_yet_committed_when_the_loss_comes_is_copied_again(tmp_path, monkeypatch,
                                                                     on_demand):
    """The restore has copied region 10 (by its background copy, or for a read) and not yet
    committed it when the host's flush fails and drops the live image's cache, the copy with
    it; the restore's own flush then succeeds. Its commit must keep region 10's bit (the copy
    may be lost), so the resumed restore copies it again and ends with every region rolled
    back. (Trial 18: the commit cleared the bit and the restore ended done with region 10
    holding the data written after the split, also after a power cut.)"""
    m, vol, a, b = _split_then_region_10(tmp_path, flush=True)
    real = JobControl.commit_restored
    fired = []

    def commit_restored(self, job, regions):
        if any(r == 10 for r, _ in regions) and not fired:
            fired.append(1)
            _flush_fails_losing_cache(vol.image_storage(0))
            with pytest.raises(Exception):
                vol.flush()                      # the host's flush, in the window
            assert vol.offline
        return real(self, job, regions)
    monkeypatch.setattr(JobControl, "commit_restored", commit_restored)
    if on_demand:
        job = vol.restore(1, rate_limit=0.001)  # the background copy held
        with pytest.raises(StateError, match="offline"):
            _read(vol, 10 * RB, 1)              # restores region 10, then finds it lost
    else:
        job = vol.restore(1)
    job.set_rate_limit(None)
    assert job.wait(30) and job.state == "failed", (job.state, job.error)
    assert fired and job.bitmap.test_region(10)
    with open(job.path, "rb") as f:
        assert RegionBitmap.from_bytes(f.read(), vol.size, vol.region_size).test_region(10)
    j2 = job_after_probe(vol, 1, lambda: vol.restore(1))
    assert j2.wait(30) and j2.state == "done", (j2.state, j2.error)
    vol.close()
    live, split = _read_image(m, a), _read_image(m, b)
    bad = [r for r in range(SIZE // REGION) if _region(live, r) != _region(split, r)]
    assert not bad, f"restore done but regions {bad} of the live image not rolled back"


def test_a_commit_begun_before_the_loss_keeps_the_bit_past_a_later_copy(tmp_path,
                                                                         monkeypatch):
    """The background copy of region 10 is done and its batch commit begun when the loss
    comes; a probe brings the volume back and a read of region 10 starts an on-demand copy,
    held in its write. The background commit must still keep region 10's bit (its copy began
    before the loss), so after a power cut with the on-demand copy never written the resumed
    restore rolls region 10 back. (Trial 20: the on-demand copy's start cleared the region's
    "copy again" mark and the background commit recorded it restored: the restore was done
    and region 10 kept the data written after the split.)"""
    m, vol, a, b = _split_then_region_10(tmp_path, flush=True)
    gate = {"on": False, "entered": threading.Event(), "release": threading.Event()}
    real_w = VolatileImage.writev

    def writev(st, offset, buffers, *, fua=False):
        if gate["on"] and st.path == a and offset // REGION == 10:
            gate["entered"].set()
            assert gate["release"].wait(20)
        return real_w(st, offset, buffers, fua=fua)
    monkeypatch.setattr(VolatileImage, "writev", writev)
    real = JobControl.commit_restored
    res = {}

    def commit_restored(self, job, regions):
        if any(r == 10 for r, _ in regions) and "fired" not in res \
                and threading.current_thread() is job._thread:
            res["fired"] = True
            _flush_fails_losing_cache(vol.image_storage(0))
            with pytest.raises(Exception):
                vol.flush()                      # the loss, in the window
            assert vol.offline and vol.probe()
            gate["on"] = True
            t = threading.Thread(target=lambda: res.__setitem__("R", _try(
                lambda: _read(vol, 10 * RB, 1))))
            t.start()
            res["t"] = t
            assert gate["entered"].wait(10)      # the on-demand copy of 10, held
            real(self, job, regions)
            res["committed"] = True
            return None
        return real(self, job, regions)
    monkeypatch.setattr(JobControl, "commit_restored", commit_restored)
    job = vol.restore(1)
    wait_until(lambda: "committed" in res, 20)
    assert job.bitmap.test_region(10)
    with open(job.path, "rb") as f:
        assert RegionBitmap.from_bytes(f.read(), vol.size, vol.region_size).test_region(10)
    nxt = m.cut(tmp_path / "cut")                # power cut, the on-demand copy still held
    gate["release"].set()
    res["t"].join(10)
    job.wait(30)
    vol.close()
    vol = _open(nxt)
    for j in vol.jobs.values():
        j.set_rate_limit(None)
        assert j.wait(30) and j.state == "done", (j.state, j.error)
    vol.close()
    live, split = _read_image(nxt, a), _read_image(nxt, b)
    bad = [r for r in range(SIZE // REGION) if _region(live, r) != _region(split, r)]
    assert not bad, f"after the cut, regions {bad} not rolled back"


def test_a_commit_after_another_threads_failed_flush_keeps_the_bit(tmp_path):
    """A read restores region 10 on demand; just before its commit's flush, a SYNCHRONIZE
    CACHE in another thread fails on the live image and drops its cache, the copy with it,
    and that thread is descheduled before the volume marks anything. Linux reports the
    writeback error to that one fdatasync: the commit's own flush succeeds. The commit must
    still not record region 10 restored (``durability.not_durable``: the image's flush
    failures are ahead of those the volume has marked for), and the read must not return what
    is left; the resumed restore then rolls region 10 back. (Trial 22: the bit was cleared
    on disk and the restore ended done with region 10 holding the write from after the
    split.)"""
    m, vol, a, b = _split_then_region_10(tmp_path, flush=False)
    job = vol.restore(1, rate_limit=0.001)            # held at its first region
    sa = vol.image_storage(0)
    failed_flush, release = threading.Event(), threading.Event()
    real_err = vol._image_error

    def image_error(img, exc, *args, **kw):
        if threading.current_thread().name == "T2":
            failed_flush.set()                        # fdatasync returned EIO in T2 ...
            assert release.wait(20)                   # ... T2 descheduled before _meta
        return real_err(img, exc, *args, **kw)
    vol._image_error = image_error
    vol._barrier._on_error = lambda im, e: vol._image_error(im, e, 0, 0, all_regions=True)
    real_flush = vol._barrier.flush
    res = {}

    def barrier_flush(images, limit=None):
        if threading.current_thread().name == "T1" and not failed_flush.is_set():
            _flush_fails_losing_cache(sa)
            threading.Thread(target=lambda: res.__setitem__("T2", _try(vol.flush)),
                             name="T2").start()
            assert failed_flush.wait(10)
        return real_flush(images, limit)
    vol._barrier.flush = barrier_flush
    t1 = threading.Thread(target=lambda: res.__setitem__("T1", _try(
        lambda: _read(vol, 10 * RB, RB))), name="T1")
    t1.start()
    t1.join(20)
    assert res["T1"] != "ok", res                     # refused, not what the loss left
    assert job.bitmap.test_region(10)
    with open(job.path, "rb") as f:
        assert RegionBitmap.from_bytes(f.read(), vol.size, vol.region_size).test_region(10)
    release.set()
    wait_until(lambda: "T2" in res)
    assert vol.offline
    job.set_rate_limit(None)
    assert job.wait(10)
    j2 = job_after_probe(vol, 1, lambda: vol.restore(1))
    assert j2.wait(30) and j2.state == "done", (j2.state, j2.error)
    vol.close()
    live, split = _read_image(m, a), _read_image(m, b)
    assert _region(live, 10) == _region(split, 10), "region 10 not rolled back"


@pytest.mark.parametrize("kind", ["resync", "restore"])
def test_no_copy_job_starts_on_a_volume_closed_while_its_image_was_judged(tmp_path,
                                                                          monkeypatch, kind):
    """A resync or restore judges its image before it takes the management lock; a close
    that ran in between (it stops the jobs under that lock) left a job started on a closed
    volume. The probe's thread that starts the jobs the volume's going offline stopped
    (``resume_after_offline``) made the window a real one. The start is refused now."""
    from lvmirror.errors import StateError as _StateError
    from tests.unit.test_volume_helpers import make_volume
    vol, opener, paths = make_volume(tmp_path, 2)
    vol.split(1)
    real = vol.control._copy_verdict

    def verdict_then_close(img, **kw):
        v = real(img, **kw)
        vol.close()                               # what another thread's close does here
        return v
    monkeypatch.setattr(vol.control, "_copy_verdict", verdict_then_close)
    with pytest.raises(_StateError, match="is closed"):
        (vol.resync if kind == "resync" else vol.restore)(1)
    assert not any(j.is_alive() for j in vol.jobs.values())
