"""The ring thread's lease for READs only on a mirror in sync (``RingLease.reads_only``,
``mirror/ringlease.py``): READ batches made under it with no lock or epoch of their own, ended
at the first WRITE (made outside it, to every image), not taken again for ``BACKOFF`` seconds
nor while WRITEs lead, and given back to a split, a client's lock or a close as the one-image
lease is - after which no READ comes from an image the volume no longer reads."""

import os
import random

import pytest

from lvmirror.daemon import lunserver
from lvmirror.mirror import ringlease
from tests.unit.test_compiled_reads import _require_compiled
from tests.unit.test_daemon_ring import BS, _lun_with_data, cdb10, lab, rearm  # noqa: F401
from tests.unit.test_ring_lease import _read, _write
from tests.unit.test_volume_helpers import make_volume

fastread = pytest.importorskip("lvmirror.tcmu._fastread",
                               reason="the compiled path is not built here")
pytestmark = pytest.mark.skipif(not (lunserver.RING_LEASE and lunserver.MIRROR_LEASE
                                     and lunserver.COMPILED_READS),
                                reason="LVMIRROR_RING_LEASE=0, LVMIRROR_MIRROR_LEASE=0 or "
                                       "LVMIRROR_COMPILED_READS=0")


# -- the volume ----------------------------------------------------------------------------------


def test_a_mirror_grants_a_lease_for_reads_only_and_none_with_writes(tmp_path):
    vol, _, _ = make_volume(tmp_path, 2)
    try:
        st0, st1 = vol.image_storage(0), vol.image_storage(1)
        assert vol.begin_ring_lease(lambda: None, 0, 0.0, st0, (st0, st1)) is None
        lease = vol.begin_ring_lease(lambda: None, 0, 0.0, st0, None)
        assert lease is not None and lease.reads_only and "reads-only" in repr(lease)
        assert vol._epoch.inflight == 1 and vol.locks._lease is lease.lock
        assert vol.begin_ring_lease(lambda: None, 0, 0.0, st0, None) is None    # one at a time
        s0 = vol.stats
        lease.reads, lease.read_bytes = 5, 5 * BS
        vol.end_ring_lease(lease)
        s1 = vol.stats
        assert (s1["reads"] - s0["reads"], s1["bytes_read"] - s0["bytes_read"]) == (5, 5 * BS)
        assert s1["images"][0]["reads"] - s0["images"][0]["reads"] == 5
        assert s1["images"][1]["reads"] == s0["images"][1]["reads"]
        assert s1["writes"] == s0["writes"]
        assert vol._epoch.inflight == 0 and vol.locks._lease is None
    finally:
        vol.close()


def test_no_lease_for_reads_on_a_mirror_with_an_image_resyncing(tmp_path):
    """An epoch writing an image that is not in sync (attached, its resync running at 0.05
    MB/s) is not a mirror in sync: its resync's copies would revoke a lease at each region."""
    vol, _, _ = make_volume(tmp_path, 2)
    try:
        st0 = vol.image_storage(0)
        vol.attach(str(tmp_path / "img-new"), rate_limit=0.05)
        assert any(j.state == "running" for j in vol.jobs.values())
        assert vol.begin_ring_lease(lambda: None, 0, 0.0, st0, None) is None
        assert vol.locks._lease is None and vol._epoch.inflight == 0
    finally:
        vol.close()


def test_no_lease_for_reads_on_a_mirror_tracking_a_split_images_changes(tmp_path):
    vol, _, _ = make_volume(tmp_path, 3)
    try:
        vol.split(2)
        st0 = vol.image_storage(0)
        assert vol.begin_ring_lease(lambda: None, 0, 0.0, st0, None) is None
    finally:
        vol.close()


# -- the ring thread -----------------------------------------------------------------------------


def _mirror_lun(lab, tmp_path, seed):
    """A 2-image LUN in sync whose first 64 blocks hold random data, read once through the
    compiled path (skips where no read is served from memory): (emulator, LunServer, image
    paths, the data)."""
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, seed)
    _require_compiled(lun, emu, data, tmp_path)
    lun._lease_after = 0.0      # (the setup's WRITE ended a lease: its BACKOFF not waited for)
    return emu, lun, paths, data


def _spy_serve(monkeypatch, lun, emu):
    """The leases ``lease_serve`` is called under from now on (the LUN armed again with the
    spy)."""
    calls = []
    real = fastread.lease_serve

    def spy(*args):
        calls.append(args[16])
        assert args[12][4] == ()        # (no descriptor to write: the lease is for READs only)
        return real(*args)
    monkeypatch.setattr(fastread, "lease_serve", spy)
    rearm(lun, emu)
    return calls


def _reads_until_leased(lun, emu, data, tries=20):
    """READ the first 8 blocks at queue depth 1 until the ring thread holds its lease (the
    first after the arming READ takes it); returns it."""
    for _ in range(tries):
        assert _read(emu, 0, 8) == data[:8 * BS]
        if lun._lease is not None:
            return lun._lease
    raise AssertionError("no lease taken on the mirror")


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "batch"])
def test_reads_at_queue_depth_1_are_served_under_a_lease_for_reads_only(lab, tmp_path,
                                                                        monkeypatch, loop):
    """READs one at a time on a mirror in sync: the compiled loop (or, with
    LVMIRROR_LEASE_LOOP=0, the Python turns) serves them under one lease for READs only (the
    loop: fewer calls than READs), holding the epoch and the whole-LUN lock for them; the
    volume and the image read count them, and a client's immediate lock try is granted (the
    lease is given back)."""
    if loop and not lunserver.LEASE_LOOP:
        pytest.skip("LVMIRROR_LEASE_LOOP=0")
    monkeypatch.setattr(lunserver, "LEASE_LOOP", loop)
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 61)
    vol = lun.volume
    calls = _spy_serve(monkeypatch, lun, emu)
    lease = _reads_until_leased(lun, emu, data)
    assert lease.reads_only and lease.read_storage is vol.image_storage(0)
    assert vol._epoch.inflight == 1 and vol.locks._lease is lease.lock
    s0, n0, r0 = vol.stats, len(calls), lease.reads
    for k in range(8):
        assert _read(emu, 8 * k, 8) == data[8 * k * BS:8 * (k + 1) * BS]
    # (one call may serve them all: it waits for the kernel's next command itself)
    assert len(calls) - n0 < 8 and all(c is lease for c in calls[n0:])
    assert bool(calls) == loop
    assert lease.reads - r0 == 8 and lun._lease is lease and not lease.ended
    s1 = vol.stats
    assert s1["reads"] - s0["reads"] == 8 and s1["bytes_read"] - s0["bytes_read"] == 64 * BS
    assert s1["images"][0]["reads"] - s0["images"][0]["reads"] == 8
    revoked0 = lun.leases_revoked
    lk = vol.locks.lock(0, 8, owner=":1.9", timeout=0)
    assert lk.held and lun.leases_revoked == revoked0 + 1 and lease.ended
    assert vol._epoch.inflight == 0
    lk.release()


def test_a_write_ends_the_lease_and_reaches_both_images(lab, tmp_path, monkeypatch):
    """A WRITE behind READs made under the mirror's lease ends it (not a revocation: nothing
    asked) and is made as without one - to both images, its write-intent region begun and
    ended - and no lease is taken for BACKOFF seconds, nor at all while WRITEs lead; READs
    after the backoff take one again and read what was written."""
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 62)
    vol = lun.volume
    lease = _reads_until_leased(lun, emu, data)
    leases0, revoked0 = lun.leases, lun.leases_revoked
    begun = []
    real_begin = vol._wil.begin

    def begin(offset, length, *args, **kw):
        begun.append((offset, length))
        return real_begin(offset, length, *args, **kw)
    monkeypatch.setattr(vol._wil, "begin", begin)
    new = os.urandom(8 * BS)
    assert _write(emu, 16, new) == 0
    assert begun and begun[0] == (16 * BS, 8 * BS)       # its write-intent region
    assert lease.ended and vol._lease is None and vol.locks._lease is None
    assert lun.leases_revoked == revoked0
    assert _read(emu, 16, 8) == new                      # within BACKOFF: no lease
    assert lun.leases == leases0 and lun._lease is None
    assert lun._lease_after > 0
    monkeypatch.setattr(ringlease, "BACKOFF", 0.0)
    lun._lease_after = 0.0                               # (as if the backoff had passed)
    more = [os.urandom(8 * BS) for _ in range(4)]
    # the first WRITE after a READ may take one (READs led), which it ends at once; the
    # WRITEs after it lead: none taken
    assert _write(emu, 24, more[0]) == 0
    assert lun._lease is None and lun.leases <= leases0 + 1
    leases1 = lun.leases
    for k in range(1, 4):
        assert _write(emu, 24 + 8 * k, more[k]) == 0
    assert lun.leases == leases1 and lun._lease is None
    vol.flush()
    for p in paths:
        with open(p, "rb") as f:
            f.seek(16 * BS)
            assert f.read(40 * BS) == new + b"".join(more)
    assert vol._wil.inflight_regions() == {}
    for k in range(3):
        assert _read(emu, 24 + 8 * k, 8) == more[k]
    assert lun.leases > leases1 and lun._lease is not None and lun._lease.reads_only


def _switch_under_the_lease(lun, emu, data, monkeypatch, switch):
    """Take the mirror's lease (it reads image 0), call ``switch(0)`` (a split or detach of
    image 0: its epoch switch revokes the lease, counted), WRITE new data to the first 8 blocks
    and READ them five times (BACKOFF 0 from then on: a lease may be taken again at once), each
    returning the new data. Returns image 0's StorageImage as it was before the switch."""
    vol = lun.volume
    lease = _reads_until_leased(lun, emu, data)
    gone = vol.image_storage(0)
    assert lease.read_storage is gone
    revoked0 = lun.leases_revoked
    switch(0)
    assert lease.ended and lun.leases_revoked == revoked0 + 1
    new = os.urandom(8 * BS)
    assert _write(emu, 0, new) == 0
    monkeypatch.setattr(ringlease, "BACKOFF", 0.0)
    lun._lease_after = 0.0
    for _ in range(5):
        assert _read(emu, 0, 8) == new
    return gone


def test_a_split_of_the_image_the_lease_reads_is_not_read_after(lab, tmp_path, monkeypatch):
    """The mirror's lease reads image 0; splitting image 0 off (the epoch switch revokes the
    lease) completes, and a WRITE after it goes to image 1 only (the epoch tracks image 0's
    changes: no lease is taken on it): the READ of those blocks returns the new data from
    image 1, while the split image keeps the data of the split time."""
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 63)
    _switch_under_the_lease(lun, emu, data, monkeypatch, lun.volume.split)
    with open(paths[0], "rb") as f:
        assert f.read(8 * BS) == data[:8 * BS]


def test_reads_and_writes_mixed_keep_every_write(lab, tmp_path, monkeypatch):
    """READs and WRITEs at random over the first 64 blocks, one at a time, with leases taken
    and ended all along (BACKOFF 0): every READ returns the last data written, and both images
    end equal."""
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 64)
    vol = lun.volume
    monkeypatch.setattr(ringlease, "BACKOFF", 0.0)
    rnd = random.Random(65)
    image = bytearray(data)
    leases0 = lun.leases
    for _ in range(200):
        lba = rnd.randrange(56)
        n = rnd.randrange(1, 9)
        if rnd.random() < 0.3:
            buf = rnd.randbytes(n * BS)
            assert _write(emu, lba, buf) == 0
            image[lba * BS:(lba + n) * BS] = buf
        else:
            assert _read(emu, lba, n) == bytes(image[lba * BS:(lba + n) * BS])
    assert lun.leases > leases0
    vol.flush()
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read(64 * BS) == b.read(64 * BS) == bytes(image)


def _three_image_lun(lab, tmp_path, seed):
    """A 3-image LUN in sync whose first 64 blocks hold random data (skips where no read is
    served from memory): (emulator, LunServer, image paths, the data)."""
    paths = [str(tmp_path / f"img{k}") for k in range(3)]
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    data = random.Random(seed).randbytes(64 * BS)
    assert _write(emu, 0, data) == 0
    _require_compiled(lun, emu, data, tmp_path)
    lun._lease_after = 0.0
    return emu, lun, paths, data


def test_a_detached_image_is_not_read_by_the_next_lease(lab, tmp_path, monkeypatch):
    """A 3-image mirror's lease reads image 0; detaching image 0 revokes it, and the lease
    the READs take next (the two images left are a mirror in sync: for READs only) reads
    another image. A WRITE after the detach is read back; the detached file keeps the old
    data."""
    emu, lun, paths, data = _three_image_lun(lab, tmp_path, 66)
    vol = lun.volume
    gone = _switch_under_the_lease(lun, emu, data, monkeypatch, vol.detach)
    after = lun._lease
    assert after is not None and after.reads_only and after.read_storage is not gone
    assert after.read_storage is vol.image_storage(0)
    with open(paths[0], "rb") as f:
        assert f.read(8 * BS) == data[:8 * BS]


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "batch"])
def test_a_large_read_is_made_under_the_lease(lab, tmp_path, monkeypatch, loop):
    """A READ over INLINE_READ_MAX (256 KiB here) on a mirror holding its lease for READs
    only is made under it (the lease's batch: no lock or epoch of its own), counted in it, and
    returns what was written."""
    if loop and not lunserver.LEASE_LOOP:
        pytest.skip("LVMIRROR_LEASE_LOOP=0")
    monkeypatch.setattr(lunserver, "LEASE_LOOP", loop)
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 67)
    big = os.urandom(256 << 10)
    first = 128
    assert _write(emu, first, big) == 0
    rearm(lun, emu)
    lun._lease_after = 0.0
    lease = _reads_until_leased(lun, emu, data)
    b0 = lease.read_bytes
    for _ in range(3):
        assert _read(emu, first, len(big) // BS) == big
    assert lun._lease is lease and lease.read_bytes - b0 == 3 * len(big)
    assert not lun.volume.locks._held or list(lun.volume.locks._held) == [lease.lock]


def test_stopping_the_lun_ends_a_mirrors_lease(lab, tmp_path):
    """A LUN whose ring thread holds a mirror's lease for READs only (its compiled loop
    waiting for the kernel) stops promptly: the lease is ended and the epoch left."""
    import time
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 68)
    vol = lun.volume
    lease = _reads_until_leased(lun, emu, data)
    t0 = time.monotonic()
    lun.stop()
    assert time.monotonic() - t0 < 30
    assert lease.ended and vol.locks._lease is None


# -- a volume whose WRITEs the compiled path does not make ---------------------------------------


@pytest.mark.parametrize("how,n", [("write-through", 1), ("write-through", 2),
                                   ("write-protected", 2)],
                         ids=["write-through-one-image", "write-through-mirror",
                              "write-protected-mirror"])
@pytest.mark.parametrize("loop", [True, False], ids=["loop", "batch"])
def test_an_lu_without_compiled_writes_serves_reads_under_a_lease_for_reads_only(
        lab, tmp_path, monkeypatch, how, n, loop):
    """A write-through LU (WCE 0, LIO's default for a user backstore) or a write-protected
    one has no compiled WRITEs; its READs still come under a lease for READs only - on one
    image or a mirror - with no lock or epoch of their own per batch. A WRITE ends it (not a
    revocation) and takes the Python path: written through to every image before GOOD, or
    refused with DATA PROTECT. WRITEs then lead and take no lease; READs take one again once
    they lead. The same with the compiled loop and with LVMIRROR_LEASE_LOOP=0."""
    if loop and not lunserver.LEASE_LOOP:
        pytest.skip("LVMIRROR_LEASE_LOOP=0")
    monkeypatch.setattr(lunserver, "LEASE_LOOP", loop)
    paths = [str(tmp_path / f"img{k}") for k in range(n)]
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    vol = lun.volume
    data = random.Random(70 + n).randbytes(64 * BS)
    assert _write(emu, 0, data) == 0
    _require_compiled(lun, emu, data, tmp_path)
    if how == "write-through":
        lun.lu.write_cache = False
    else:
        lun.lu.read_only = True
    try:
        rearm(lun, emu)
        lun._lease_after = 0.0
        lease = _reads_until_leased(lun, emu, data)
        assert lun._fast.wstorage is None and lun._fast.leasable == "reads"
        assert lease.reads_only and lease.read_storage is vol.image_storage(0)
        assert vol.locks._lease is lease.lock and vol._epoch.inflight == 1
        r0 = lease.reads
        for k in range(8):
            assert _read(emu, 8 * k, 8) == data[8 * k * BS:8 * (k + 1) * BS]
        assert lease.reads - r0 == 8 and lun._lease is lease
        revoked0, leases0, compiled0 = lun.leases_revoked, lun.leases, lun.compiled_writes
        new = os.urandom(8 * BS)
        fua = []
        for k in range(n):
            st = vol.image_storage(k)
            real = st.writev

            def spy(offset, buffers, _real=real, **kw):
                fua.append(kw.get("fua", False))
                return _real(offset, buffers, **kw)
            monkeypatch.setattr(st, "writev", spy)
        cid = emu.submit(cdb10(0x2A, 16, 8), data_out=new)
        c = emu.wait([cid])[cid]
        status = c.status
        if how == "write-through":      # durable before GOOD: FUA to every image
            assert status == 0 and fua == [True] * n
        else:                           # DATA PROTECT, WRITE PROTECTED (SBC-4 4.11)
            assert status == 2 and (c.sense[2] & 0x0F, c.sense[12]) == (7, 0x27) and not fua
        assert lease.ended and vol.locks._lease is None and vol._epoch.inflight == 0
        assert lun.leases_revoked == revoked0 and lun.compiled_writes == compiled0
        assert lun._lead == lunserver._STOP_WRITE
        want = new if how == "write-through" else data[16 * BS:24 * BS]
        for p in paths:          # (write-through: in every image before GOOD, no flush asked)
            with open(p, "rb") as f:
                f.seek(16 * BS)
                assert f.read(8 * BS) == want
        monkeypatch.setattr(ringlease, "BACKOFF", 0.0)
        lun._lease_after = 0.0
        assert _write(emu, 24, new) == status                # WRITEs lead: no lease
        assert lun.leases == leases0 and lun._lease is None
        for _ in range(3):
            assert _read(emu, 16, 8) == want
        assert lun.leases > leases0 and lun._lease is not None and lun._lease.reads_only
    finally:
        lun.lu.write_cache, lun.lu.read_only = True, False


def test_writes_the_compiled_path_does_not_make_also_end_the_lease_and_lead(lab, tmp_path,
                                                                           monkeypatch):
    """A WRITE with FUA (the Python path's: SBC-4 5.40) behind READs under the mirror's lease
    ends it as a plain WRITE does: none is taken for BACKOFF seconds (60 here), so READs and
    FUA WRITEs taking turns take one lease at most, not one per WRITE; every WRITE is read
    back and reaches both images."""
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 69)
    vol = lun.volume
    lease = _reads_until_leased(lun, emu, data)
    monkeypatch.setattr(ringlease, "BACKOFF", 60.0)
    leases0 = lun.leases
    image = bytearray(data)
    rnd = random.Random(69)
    for k in range(20):
        for _ in range(3):
            lba = rnd.randrange(56)
            assert _read(emu, lba, 8) == bytes(image[lba * BS:(lba + 8) * BS])
        buf = os.urandom(8 * BS)
        lba = rnd.randrange(56)
        cid = emu.submit(cdb10(0x2A, lba, 8, b1=0x08), data_out=buf)      # FUA
        assert emu.wait([cid])[cid].status == 0
        image[lba * BS:(lba + 8) * BS] = buf
    assert lease.ended and lun.leases - leases0 <= 1
    vol.flush()
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(64 * BS) == bytes(image)
