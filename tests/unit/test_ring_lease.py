"""The ring thread's lease on a one-image volume (``lvmirror/mirror/ringlease.py``): the region
lock and the split epoch kept across the compiled path's batches, given back to whatever asks -
a region lock request (a worker's, a resync's, a D-Bus client's), an epoch switch, ``close``."""

import contextlib
import os
import random
import threading

import pytest

from lvmirror.daemon import lunserver
from lvmirror.mirror import regionlock
from lvmirror.mirror.regionlock import LEASE_OWNER, RegionLockManager
from tests.unit.test_daemon_ring import BS, SIZE, cdb10, images, lab, rearm  # noqa: F401
from tests.unit.test_volume_helpers import make_volume

fastread = pytest.importorskip("lvmirror.tcmu._fastread",
                               reason="the compiled path is not built here")


# -- the region lock manager -------------------------------------------------------------------


def test_a_lease_is_granted_only_on_an_idle_manager_and_once():
    m = RegionLockManager("t")
    lk = m.try_lock(0, 8)
    assert m.lease(100, lambda: None) is None                 # a lock held
    lk.release()
    lease = m.lease(100, lambda: None)
    assert lease is not None and lease.owner is LEASE_OWNER
    assert (lease.start, lease.count, lease.shared) == (0, 100, False)
    assert m.lease(100, lambda: None) is None                 # one at a time
    assert m.holders() == []                                  # not listed as a holder
    assert m.release_owner("lease") == 0 and lease.held       # no owner frees it
    lease.release()
    assert m._lease is None and m._revoke is None
    assert m.lease(100, lambda: None) is not None


def test_a_request_meeting_the_lease_revokes_it_and_is_granted_once_it_ends():
    m = RegionLockManager("t")
    revoked = []
    lease = m.lease(100, lambda: revoked.append(1))
    assert m.try_lock(50, 1) is None and revoked == [1]       # refused, and asked back
    got = []
    t = threading.Thread(target=lambda: got.append(m.lock(10, 5, timeout=10)))
    t.start()
    while not m._waiters:
        t.join(0.01)
    assert len(revoked) == 2 and not got                      # waits behind it, FIFO
    lease.release()
    t.join(10)
    assert got and got[0].held and (got[0].start, got[0].count) == (10, 5)
    got[0].release()


def test_a_request_that_would_not_wait_waits_for_the_lease_alone():
    """A request with no time to wait (``lock(timeout=0)``) or little (under
    LEASE_REVOKE_WAIT) meeting only the lease waits for it to be given back, as it would not
    have met it a moment before; meeting a real lock it fails at once. A lease never given back
    fails it after LEASE_REVOKE_WAIT, saying so."""
    m = RegionLockManager("t")
    holder = {}

    def give_back():               # the holder ends the lease when asked, from its own thread
        threading.Thread(target=holder["lease"].release).start()
    holder["lease"] = m.lease(100, give_back)
    lk = m.lock(20, 4, timeout=0)
    assert lk.held and m._lease is None
    with pytest.raises(TimeoutError):
        m.lock(21, 1, timeout=0)                              # a real lock in the way
    lk.release()
    holder["lease"] = m.lease(100, give_back)
    lk = m.lock(50, 1, timeout=0.001)                         # a short timeout: the same
    assert lk.held and m._lease is None
    lk.release()
    # a lease whose holder does not answer: the request gives up after LEASE_REVOKE_WAIT
    m2 = RegionLockManager("t2")
    stuck = m2.lease(10, lambda: None)
    old = regionlock.LEASE_REVOKE_WAIT
    regionlock.LEASE_REVOKE_WAIT = 0.2
    try:
        with pytest.raises(TimeoutError, match="lease was not given back"):
            m2.lock(0, 1, timeout=0)
    finally:
        regionlock.LEASE_REVOKE_WAIT = old
    assert m2._waiters == [] and stuck.held
    stuck.release()


# -- the volume ----------------------------------------------------------------------------------


def test_the_volume_leases_writes_only_on_a_one_image_epoch_and_counts_what_was_made_under_it(
        tmp_path):
    """A lease with WRITEs (``write_storage`` given) only on an epoch writing one image (a
    mirror's is for READs only: test_mirror_lease)."""
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    vol2, _, _ = make_volume(tmp_path / "two", 2)
    try:
        legs = (vol2.image_storage(0), vol2.image_storage(1))
        assert vol2.begin_ring_lease(lambda: None, 0, 0.0, legs[0], legs) is None
        assert vol2.begin_ring_lease(lambda: None, 0, 0.0, legs[0], legs[:1]) is None
    finally:
        vol2.close()
    vol, _, _ = make_volume(tmp_path / "one", 1)
    try:
        st = vol.image_storage(0)
        lease = vol.begin_ring_lease(lambda: None, 0, 0.0, st, (st,))
        assert lease is not None and vol._epoch.inflight == 1
        assert vol.begin_ring_lease(lambda: None, 0, 0.0, st, (st,)) is None
        s0 = vol.stats
        assert s0["inflight"] == 0                            # the lease is no I/O
        lease.writes, lease.write_bytes, lease.reads, lease.read_bytes = 3, 3 * BS, 2, 2 * BS
        s1 = vol.stats                                        # counted so far, while held
        assert (s1["writes"] - s0["writes"], s1["bytes_written"] - s0["bytes_written"]) == (
            3, 3 * BS)
        assert s1["images"][0]["reads"] - s0["images"][0]["reads"] == 2
        vol.end_ring_lease(lease)
        s2 = vol.stats
        assert (s2["writes"], s2["reads"], s2["images"][0]["writes"]) == (
            s1["writes"], s1["reads"], s1["images"][0]["writes"])
        assert vol._epoch.inflight == 0 and vol.locks._lease is None
        vol.end_ring_lease(lease)                             # once only
        assert vol.stats["writes"] == s2["writes"]
    finally:
        vol.close()


def test_stats_count_a_lease_that_ends_during_the_call_once(tmp_path):
    """The ring thread ends its lease while ``stats`` runs (here from inside it, through the
    write-intent log bitmap's ``count``, which it calls): the images' counters hold the lease's
    WRITEs once, as the volume's do. They were read outside the lock that ``end_ring_lease``
    counts under, and held them twice (from the seventh newcomer trial)."""
    vol, _, _ = make_volume(tmp_path, 1)
    try:
        st = vol.image_storage(0)
        lease = vol.begin_ring_lease(lambda: None, 0, 0.0, st, (st,))
        assert lease is not None
        before = vol.stats
        lease.writes, lease.write_bytes = 3, 3 * BS
        bitmap = vol._wil.bitmap
        real = bitmap.count

        def count_and_end():
            vol.end_ring_lease(lease)
            return real()
        bitmap.count = count_and_end
        try:
            during = vol.stats
        finally:
            del bitmap.count
        for snap in (during, vol.stats):
            assert snap["writes"] - before["writes"] == 3
            assert snap["images"][0]["writes"] - before["images"][0]["writes"] == 3, snap
            assert snap["images"][0]["bytes_written"] - before["images"][0]["bytes_written"] \
                == 3 * BS
    finally:
        vol.close()


def test_a_lease_taken_as_the_volume_closes_is_refused(tmp_path):
    """``close`` sets the volume closed, then revokes the lease it finds: a lease begun between
    the two (its ``_closed`` check before the lock passed) is refused under the epoch lock,
    where ``close`` reads it, so ``close`` never waits for a lease it did not see."""
    vol, _, _ = make_volume(tmp_path, 1)
    st = vol.image_storage(0)
    real = vol.locks.lease

    def lease_then_close(count, revoke):
        lk = real(count, revoke)
        vol._closed = True                # close's first step, just after the check
        return lk
    vol.locks.lease = lease_then_close
    try:
        assert vol.begin_ring_lease(lambda: None, 0, 0.0, st, (st,)) is None
        assert vol.locks._lease is None and vol._epoch.inflight == 0 and vol._lease is None
    finally:
        del vol.locks.lease
        vol._closed = False
        vol.close()


def test_no_lease_on_an_epoch_that_tracks_a_split_images_changes(tmp_path):
    """A two-image volume whose image 1 is split writes one image, but every write must mark
    the split image's change bitmap (split rule 5): no lease there (from the eighth newcomer
    trial, which got one)."""
    vol, _, _ = make_volume(tmp_path, 2)
    try:
        vol.split(1)
        assert len(vol._epoch.writes) == 1 and vol._epoch.tracking
        st = vol.image_storage(0)
        assert vol.begin_ring_lease(lambda: None, 0, 0.0, st, (st,)) is None
        assert vol.locks._lease is None and vol._lease is None
    finally:
        vol.close()


def test_a_negative_timeout_fails_at_once_beside_a_lease():
    """A negative timeout fails at once, as without a lease; it does not wait
    LEASE_REVOKE_WAIT for the lease (from the eighth newcomer trial)."""
    import time
    m = RegionLockManager("t")
    lease = m.lease(100, lambda: None)              # its holder's batch is in a slow device
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            m.lock(0, 1, timeout=-1.0)
        assert time.monotonic() - t0 < regionlock.LEASE_REVOKE_WAIT / 2
    finally:
        lease.release()


def test_an_epoch_switch_and_close_revoke_the_lease(tmp_path):
    """Attaching a second image switches the epoch: the lease is revoked, and the attach's
    resync goes on once its holder ended it. ``close`` revokes it too and waits for its end."""
    vol, _, paths = make_volume(tmp_path, 1)
    st = vol.image_storage(0)
    ended = threading.Event()

    def holder_ends(lease_box):
        def wake():
            def end():
                vol.end_ring_lease(lease_box[0])
                ended.set()
            threading.Thread(target=end).start()
        return wake
    box = []
    box.append(vol.begin_ring_lease(holder_ends(box), 0, 0.0, st, (st,)))
    assert box[0] is not None
    other = str(tmp_path / "img-new")
    with open(other, "wb") as f:
        f.truncate(1 << 20)
    vol.attach(other)
    assert ended.wait(10) and box[0].revoked
    for job in list(vol.jobs.values()):
        assert job.wait(30) and job.state == "done", job.progress()
    vol.detach(1)
    ended.clear()
    box[:] = [vol.begin_ring_lease(holder_ends(box), 0, 0.0, st, (st,))]
    assert box[0] is not None
    vol.close()                                      # would wait for ever without the revoke
    assert ended.is_set() and box[0].revoked


# -- the ring thread -----------------------------------------------------------------------------


def _one_image_lun(lab, tmp_path, seed):
    (path,) = images(tmp_path, 1)
    emu, lun, _ = lab(f"vol1;images={path}")
    assert lun.error is None
    data = random.Random(seed).randbytes(64 * BS)
    wid = emu.submit(cdb10(0x2A, 0, 64), data_out=data)
    assert emu.wait([wid])[wid].status == 0
    return emu, lun, path, data


def _write(emu, lba, data):
    cid = emu.submit(cdb10(0x2A, lba, len(data) // BS), data_out=data)
    return emu.wait([cid])[cid].status


def _read(emu, lba, n):
    cid = emu.submit(cdb10(0x28, lba, n), data_in_len=n * BS)
    c = emu.wait([cid])[cid]
    assert c.status == 0
    return c.data_in


@pytest.mark.skipif(not lunserver.RING_LEASE, reason="LVMIRROR_RING_LEASE=0")
@pytest.mark.parametrize("loop", [True, False], ids=["loop", "batch"])
def test_writes_at_queue_depth_1_are_made_under_the_lease(lab, tmp_path, monkeypatch, loop):
    """Under the lease - the whole LUN locked for the ring thread, the epoch entered once -
    the ring thread's compiled loop (``lease_serve``) makes WRITE after WRITE, waiting for the
    kernel's next command itself, in fewer calls than commands; without the loop each WRITE is
    one ``lease_batch`` call. The writes land, and the volume's and the image's statistics
    count them."""
    if loop and not lunserver.LEASE_LOOP:
        pytest.skip("LVMIRROR_LEASE_LOOP=0")
    monkeypatch.setattr(lunserver, "LEASE_LOOP", loop)
    emu, lun, path, _ = _one_image_lun(lab, tmp_path, 3)
    vol = lun.volume
    seen = []
    name, at = ("lease_serve", 16) if loop else ("lease_batch", -1)
    real = getattr(fastread, name)

    def spy(*args):
        lease = vol._lease
        seen.append((lease is not None and not lease.revoked and lease is args[at],
                     vol.locks._lease is not None, vol._epoch.inflight))
        return real(*args)
    monkeypatch.setattr(fastread, name, spy)
    rearm(lun, emu)                                  # armed again, with the spy
    s0 = vol.stats
    new = [os.urandom(8 * BS) for _ in range(6)]
    for k in range(6):                               # one at a time: queue depth 1
        assert _write(emu, 8 * k, new[k]) == 0
    if loop:             # (one call may serve them all; a second begins after the first)
        assert 1 <= len(seen) < 6 and seen[-1] == (True, True, 1)
    else:
        assert seen[-5:] == [(True, True, 1)] * 5    # (the first may take the lease)
    assert lun.leases >= 1 and lun.compiled_writes >= 6
    s1 = vol.stats
    assert s1["writes"] - s0["writes"] == 6 and s1["inflight"] == 0
    assert s1["images"][0]["bytes_written"] - s0["images"][0]["bytes_written"] == 48 * BS
    with open(path, "rb") as f:
        assert f.read(48 * BS) == b"".join(new)
    assert _read(emu, 0, 48) == b"".join(new)


@pytest.mark.skipif(not lunserver.RING_LEASE, reason="LVMIRROR_RING_LEASE=0")
def test_a_region_lock_taken_beside_the_ring_thread_keeps_the_overlapping_io_rule(lab, tmp_path):
    """A client's lock on an idle LUN under the lease - an immediate try (``timeout=0``), and
    one with a timeout shorter than a wait for the lease could be - is granted: the ring thread
    gives the lease back. While the client holds it a WRITE to its blocks waits, one beside
    them completes; released, the waiting WRITE lands."""
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 5)
    vol = lun.volume
    assert _write(emu, 40, os.urandom(BS)) == 0       # the lease is taken
    assert vol._lease is not None
    revoked0 = lun.leases_revoked
    lk = vol.locks.lock(8, 8, owner=":1.42", timeout=0)
    assert lk.held and lun.leases_revoked > revoked0
    inside, beside = os.urandom(8 * BS), os.urandom(8 * BS)
    wid = emu.submit(cdb10(0x2A, 8, 8), data_out=inside)
    assert _write(emu, 24, beside) == 0
    assert wid not in emu.completions
    lk.release()
    assert emu.wait([wid])[wid].status == 0
    assert _read(emu, 8, 8) == inside and _read(emu, 24, 8) == beside
    assert _write(emu, 40, os.urandom(BS)) == 0       # a lease again (after its backoff)
    lk2 = vol.locks.lock(0, 1, owner=":1.42", timeout=0.001)
    assert lk2.held
    lk2.release()


@pytest.mark.skipif(not lunserver.RING_LEASE, reason="LVMIRROR_RING_LEASE=0")
def test_attaching_an_image_under_load_resyncs_it_whole(lab, tmp_path):
    """Writes at queue depth 1 under the lease while a second image is attached (its epoch
    switch revokes the lease, its resync locks region by region): the new image ends in sync
    and holds every write."""
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 7)
    vol = lun.volume
    other = str(tmp_path / "img-new")
    with open(other, "wb") as f:
        f.truncate(SIZE)
    rnd = random.Random(9)
    stop = threading.Event()
    errors = []

    def load():
        while not stop.is_set():
            lba = rnd.randrange(SIZE // BS - 8)
            if _write(emu, lba, rnd.randbytes(8 * BS)) != 0:
                errors.append(lba)
    t = threading.Thread(target=load)
    t.start()
    try:
        vol.attach(other)
        for job in list(vol.jobs.values()):
            assert job.wait(60) and job.state == "done", job.progress()
    finally:
        stop.set()
        t.join(30)
    assert not errors
    vol.flush()
    with open(path, "rb") as a, open(other, "rb") as b:
        assert a.read() == b.read()


@contextlib.contextmanager
def _freezable_fs(tmp_path):
    """A 64 MiB ext4 on a loop device, mounted under ``tmp_path``, and a function that freezes
    (True) or thaws (False) it (``fsfreeze``: a write to a frozen file system blocks in the
    kernel until the thaw - a disk that stopped answering, as the ring thread meets it).
    Skips the test without root, a loop device or the tools."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("losetup", "mkfs.ext4",
                                                                "fsfreeze", "mount")):
        pytest.skip("needs root, losetup, mkfs.ext4, mount and fsfreeze")
    backing, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    run = lambda *a: subprocess.run(a, capture_output=True, text=True)   # noqa: E731
    loop = run("losetup", "-f", "--show", str(backing))
    if loop.returncode:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    dev = loop.stdout.strip()
    frozen = []
    try:
        if run("mkfs.ext4", "-q", "-F", dev).returncode or run("mount", dev, str(mnt)).returncode:
            pytest.skip("cannot make or mount an ext4 on a loop device here")

        def freeze(on: bool) -> None:
            r = run("fsfreeze", "-f" if on else "-u", str(mnt))
            assert r.returncode == 0, r.stderr
            frozen[:] = [True] if on else []
        yield str(mnt), freeze
    finally:
        if frozen:
            run("fsfreeze", "-u", str(mnt))
        run("umount", "-l", str(mnt))
        run("losetup", "-d", dev)


@pytest.mark.skipif(not lunserver.RING_LEASE, reason="LVMIRROR_RING_LEASE=0")
def test_a_batch_stuck_under_the_lease_narrows_it_to_its_blocks(lab, tmp_path, monkeypatch):
    """A WRITE stuck under the lease in a disk that stopped answering (its file system frozen):
    when the watchdog hands the ring over, the lease's whole-LUN lock becomes a lock over that
    WRITE's blocks only, so the new ring thread answers TEST UNIT READY and a READ elsewhere at
    once, while a READ of those blocks waits; once the disk answers, the WRITE completes GOOD
    with its data, the READ behind it returns it, and a new lease is taken."""
    import time
    from lvmirror.mirror import ringlease
    monkeypatch.setattr(lunserver, "INLINE_BACKOFF", 0.0)
    # (a lease tried while the stuck READ behind held its lock backs off; not this test's)
    monkeypatch.setattr(ringlease, "BACKOFF", 0.0)
    with _freezable_fs(tmp_path) as (mnt, freeze):
        path = os.path.join(mnt, "img0")
        emu, lun, _ = lab(f"vol1;images={path}")
        assert lun.error is None
        data = random.Random(13).randbytes(64 * BS)
        wid = emu.submit(cdb10(0x2A, 0, 64), data_out=data)
        assert emu.wait([wid])[wid].status == 0
        vol = lun.volume
        assert _write(emu, 48, data[48 * BS:56 * BS]) == 0
        assert vol._lease is not None
        leases = lun.leases
        os.sync()                            # (nothing dirty left for the freeze to write)
        freeze(True)
        try:
            new = os.urandom(8 * BS)
            wid = emu.submit(cdb10(0x2A, 8, 8), data_out=new)
            tur = emu.submit(bytes(6))
            rid = emu.submit(cdb10(0x28, 32, 8), data_in_len=8 * BS)
            done = emu.wait([tur, rid], timeout=10)       # the new ring thread answers them
            assert done[tur].status == 0 and done[rid].data_in == data[32 * BS:40 * BS]
            assert lun.handovers == 1 and wid not in emu.completions
            assert vol.locks._lease is None
            assert vol.stats["inflight"] == 1         # the stuck batch (trial 7: it said 0)
            assert [(h.start, h.count) for h in vol.locks.holders()] == [(8, 8)]
            behind = emu.submit(cdb10(0x28, 12, 4), data_in_len=4 * BS)
            time.sleep(0.3)
            assert behind not in emu.completions          # waits for the stuck WRITE's lock
        finally:
            freeze(False)
        done = emu.wait([wid, behind], timeout=20)
        assert done[wid].status == 0 and done[behind].data_in == new[4 * BS:]
        for _ in range(100):              # the stuck thread returned and ended its lease
            if lun._stuck == 0 and vol._lease is None or lun.leases > leases:
                break
            time.sleep(0.05)
        assert _write(emu, 40, os.urandom(8 * BS)) == 0
        assert lun.leases > leases and vol.stats["inflight"] == 0
        lun.stop()


def test_lease_batch_leaves_a_lost_batch_to_its_caller(tmp_path):
    """``lease_batch`` called by a ring thread whose generation is no longer the LUN's (the
    watchdog handed the ring over during the I/O) makes the I/O but completes nothing: the
    commands stay outstanding for the caller, which completes them as a worker would; the
    ring's fetch cursor and counts moved as ``take_fast`` moves them, ``lease.batch`` is
    cleared and the LUN's ``_inline_t0`` is left to the watchdog's new thread."""
    from lvmirror.tcmu.emulator import RingEmulator
    from lvmirror.tcmu.ring import CommandRing
    emu = RingEmulator(cmdr_size=(64 << 10) - 128, data_size=1 << 20)
    ring = CommandRing(emu.map, map_size=emu.map_size)
    path = str(tmp_path / "img")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    fd = os.open(path, os.O_RDWR)

    class Server:
        _gen, _inline_t0, _watch_idle = 6, 0.0, False

    class Lease:
        batch = "before"
    server, lease = Server(), Lease()
    blob = os.urandom(8 * 512)
    cid = emu.submit(cdb10(0x2A, 16, 8), data_out=blob)
    run = ring.lease_runner(fastread.lease_batch, (1 << 20) // 512, 512)
    try:
        taken, why, done, completed, nbytes, err, leg, packed, t0, lost = run(
            64 << 10, 2048, 64, (), (), (), True, 0, (fd,), server, threading.Lock(), 0, 5,
            lease)
        assert (taken, done, completed, lost, err) == (1, 1, 0, True, 0)
        assert nbytes == 8 * 512 and packed is not None and t0 > 0
        assert ring.outstanding == 1 and ring.stats["fetched"] == 1
        assert lease.batch is None and server._inline_t0 == t0
        assert cid not in emu.completions
        assert os.pread(fd, 8 * 512, 16 * 512) == blob
        # the same ring thread's own call: completed, nothing outstanding
        server._gen = 5
        ring.complete_taken(fastread.complete_batch, packed, 1, ())
        cid2 = emu.submit(cdb10(0x2A, 24, 8), data_out=blob)
        taken, why, done, completed, nbytes, err, leg, packed, t0, lost = run(
            64 << 10, 2048, 64, (), (), (), True, 0, (fd,), server, threading.Lock(), 0, 5,
            lease)
        assert (taken, done, completed, lost) == (1, 1, 1, False)
        assert ring.outstanding == 0 and server._inline_t0 == 0.0
        emu.reap()
        assert cid in emu.completions and emu.completions[cid2].status == 0
    finally:
        os.close(fd)
        ring.close()
        emu.close()
