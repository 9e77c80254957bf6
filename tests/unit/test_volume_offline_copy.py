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

from lvmirror.errors import ImageIOError
from lvmirror.mirror.bitmap import RegionBitmap
from tests.unit.powerloss import Machine
from tests.unit.test_volume_helpers import pattern
from tests.unit.test_volume_powerloss import (  # noqa: F401 (_power: the fixture)
    P3, REGION, _images_agree, _mirror_with_p1, _power, _recover_and_agree, _write, lose_cache_of)

R = 20
X = bytes(pattern(REGION // 512, 0x7777))


def _flush_fails_losing_cache(st):
    real, fired = st.flush, []

    def flush():
        if not fired:
            fired.append(1)
            lose_cache_of(st)
            raise ImageIOError(st, errno.EIO, "flush: EIO (injected)", op="flush",
                               offset=None, length=0)
        return real()
    st.flush = flush
    return fired


def _gate_copy(monkeypatch, path, regions):
    """Hold writes/discards to image file ``path`` at each region of ``regions`` (dict r ->
    (entered, release)), any thread (gates are added when only the copy writes there)."""
    from tests.unit.powerloss import VolatileImage
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
        assert vol.probe()
        j2 = vol.resync(1)
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
    assert vol.probe()
    for i in (1, 2):
        jj = vol.resync(i)
        assert jj.wait(30) and jj.state == "done", (jj.state, jj.error)
    _images_agree(m, vol)
