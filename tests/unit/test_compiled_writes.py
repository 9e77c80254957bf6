"""The ring thread's compiled WRITE path (``serve_batch`` in ``lvmirror/tcmu/_fastread.c``): on
a ring the emulator fills byte for byte as the kernel does, then the real LunServer with a
one-image volume - the bytes in the image, the ring's cursors and ids, every WRITE it must leave
to the SCSI core (FUA, WRPROTECT, NACA, out of range, a write that would wait or fails), and the
volumes and LU states under which it must not write (a mirror, change tracking for a failed
image, write-through, write protection, region locks, held completions, unit attentions)."""

import errno
import os
import random
import shutil
import tempfile
import time

import pytest

from lvmirror.daemon import lunserver
from lvmirror.daemon.metrics import render
from lvmirror.errors import ImageIOError
from lvmirror.mirror.image import StorageImage, swap_active
from lvmirror.mirror.volume import ImageState
from lvmirror.scsi import parse_sense
from lvmirror.tcmu.emulator import RingEmulator
from lvmirror.tcmu.ring import CommandRing

from tests.unit.test_compiled_reads import Obj, cdb16, reap
from tests.unit.test_daemon_ring import BS, SIZE, cdb10, lab  # noqa: F401

fastread = pytest.importorskip("lvmirror.tcmu._fastread",
                               reason="the compiled module is not built (tools/bootstrap)")

NOWAIT = getattr(os, "RWF_NOWAIT", 0x8)
NBLK = (1 << 20) // BS


@pytest.fixture
def ring(tmp_path):
    """(emulator, CommandRing, image fd opened read-write, image path): a 1 MiB image of
    random bytes."""
    path = tmp_path / "img"
    path.write_bytes(random.Random(9).randbytes(1 << 20))
    fd = os.open(path, os.O_RDWR)
    emu = RingEmulator(cmdr_size=(16 << 10) - 168, data_size=1 << 20)
    r = CommandRing(emu.map, map_size=emu.map_size)
    yield emu, r, fd, path
    r.close()
    emu.close()
    os.close(fd)


def serve(r, *, rfd=-1, wfd=-1, rrwf=0, wrwf=0, max_bytes=64 << 10, checks=(), busy=()):
    """``CommandRing.fast_serve``: (reads, rbytes, writes, wbytes, why, err)."""
    return r.fast_serve(fastread.serve_batch, rfd, rrwf, wfd, wrwf, NBLK, BS, max_bytes, 2048,
                        checks, busy)


def test_writes_land_in_the_image_in_ring_order_with_reads_between(ring):
    """WRITE(10)/WRITE(16) are written whole, GOOD, in ring order: a READ queued after a WRITE
    of the same blocks returns the new bytes, one queued before it the old."""
    emu, r, fd, path = ring
    old = path.read_bytes()
    new = [os.urandom(8 * BS), os.urandom(BS)]
    ids = [emu.submit(cdb10(0x28, 8, 8), data_in_len=8 * BS),
           emu.submit(cdb10(0x2A, 8, 8), data_out=new[0]),
           emu.submit(cdb10(0x28, 8, 8), data_in_len=8 * BS),
           emu.submit(cdb16(0x8A, 100, 1), data_out=new[1])]
    assert serve(r, rfd=fd, wfd=fd) == (2, 16 * BS, 2, 9 * BS, fastread.STOP_HEAD, 0)
    assert r.tail == r.head and r.outstanding == 0 and not r.fetch()
    done = reap(emu, ids)
    assert [done[i].status for i in ids] == [0, 0, 0, 0]
    assert done[ids[0]].data_in == old[8 * BS:16 * BS]
    assert done[ids[2]].data_in == new[0]
    now = path.read_bytes()
    assert now[8 * BS:16 * BS] == new[0] and now[100 * BS:101 * BS] == new[1]
    assert now[:8 * BS] == old[:8 * BS] and now[16 * BS:100 * BS] == old[16 * BS:100 * BS]
    assert emu.warnings == []


@pytest.mark.parametrize("cdb, nbytes", [
    (cdb10(0x2A, 0, 8, b1=0x08), 8 * BS),                     # FUA: durable before GOOD
    (cdb16(0x8A, 0, 8, b1=0x08), 8 * BS),                     # FUA (16)
    (cdb10(0x2A, 0, 8, b1=0x20), 8 * BS),                     # WRPROTECT: CHECK CONDITION
    (cdb10(0x2A, 0, 8)[:9] + b"\x04", 8 * BS),                 # NACA: CHECK CONDITION
    (cdb10(0x2A, NBLK - 4, 8), 8 * BS),                        # past the end
    (cdb10(0x2A, 0, 0), 0),                                    # no data: GOOD with none
    (cdb10(0x2A, 0, 8), 16 * BS),                              # Data-Out longer than the transfer
    (cdb10(0x2A, 0, 200), 200 * BS),                           # more than max_bytes
    (bytes([0x0A, 0, 0, 0, 8, 0]), 8 * BS),                    # WRITE(6): the SCSI core's
    (cdb10(0x2E, 0, 8), 8 * BS),                               # WRITE AND VERIFY(10)
    (cdb10(0x41, 0, 8), BS),                                   # WRITE SAME(10)
])
def test_writes_it_does_not_answer_are_left_intact_for_the_python_fetch(ring, cdb, nbytes):
    emu, r, fd, path = ring
    before = path.read_bytes()
    cid = emu.submit(cdb, data_out=os.urandom(nbytes)) if nbytes else emu.submit(cdb)
    after = emu.submit(cdb10(0x2A, 0, 1), data_out=os.urandom(BS))
    assert serve(r, rfd=fd, wfd=fd) == (0, 0, 0, 0, fastread.STOP_OTHER, 0)
    assert r.tail == 0 and path.read_bytes() == before
    assert [(c.cmd_id, c.cdb) for c in r.fetch().commands] == [(cid, cdb), (after,
                                                                         cdb10(0x2A, 0, 1))]


def test_each_kind_is_answered_only_when_given_a_descriptor(ring):
    """A WRITE with no write descriptor (the volume offers none: a mirror) stops it as any
    command it does not answer; so does a READ with no read descriptor. ``read_batch`` never
    writes."""
    emu, r, fd, path = ring
    before = path.read_bytes()
    rid = emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)
    wid = emu.submit(cdb10(0x2A, 0, 1), data_out=os.urandom(BS))
    assert serve(r, wfd=fd) == (0, 0, 0, 0, fastread.STOP_OTHER, 0)
    assert serve(r, rfd=fd) == (1, BS, 0, 0, fastread.STOP_OTHER, 0)
    assert r.fast_reads(fastread.read_batch, fd, 0, NBLK, BS, 65536, 2048, (), ()) == (
        0, 0, fastread.STOP_OTHER)
    assert path.read_bytes() == before
    assert [c.cmd_id for c in r.fetch().commands] == [wid]
    assert reap(emu, [rid])[rid].status == 0


def test_a_write_that_fails_or_would_wait_is_left_whole_to_the_python_path(ring, tmp_path):
    """EBADF (a descriptor read-only or closed) and a file system that refuses RWF_NOWAIT for
    buffered writes (ext4, tmpfs, block devices) stop it at that WRITE with its errno; nothing
    is answered for it, and the commands before it are."""
    emu, r, fd, path = ring
    rfd = os.open(path, os.O_RDONLY)
    try:
        first = emu.submit(cdb10(0x2A, 0, 1), data_out=os.urandom(BS))
        second = emu.submit(cdb10(0x2A, 1, 1), data_out=os.urandom(BS))
        assert serve(r, wfd=rfd) == (0, 0, 0, 0, fastread.STOP_MISS_WRITE, errno.EBADF)
        assert serve(r, wfd=fd) == (0, 0, 2, 2 * BS, fastread.STOP_HEAD, 0)
        assert set(reap(emu, [first, second])) == {first, second}
    finally:
        os.close(rfd)
    cid = emu.submit(cdb10(0x2A, 0, 1), data_out=os.urandom(BS))
    got = serve(r, wfd=fd, wrwf=NOWAIT)
    if got[4] == fastread.STOP_HEAD:
        assert got == (0, 0, 1, BS, fastread.STOP_HEAD, 0)     # XFS, Linux 6.0+: taken
    else:
        assert got == (0, 0, 0, 0, fastread.STOP_MISS_WRITE, got[5])
        assert got[5] in (errno.EOPNOTSUPP, errno.EINVAL, errno.EAGAIN)
        assert [c.cmd_id for c in r.fetch().commands] == [cid]


def test_its_conditions_are_read_when_it_starts(ring):
    emu, r, fd, path = ring
    o = Obj()
    o.epoch, o.locks = "e1", {}
    checks = ((o, "epoch", fastread.CHECK_IS, o.epoch),)
    busy = ((o, "locks", fastread.CHECK_FALSY, None),)
    before = path.read_bytes()
    cid = emu.submit(cdb10(0x2A, 0, 1), data_out=os.urandom(BS))
    o.epoch = "e2"                              # a split switched the epoch
    assert serve(r, wfd=fd, checks=checks, busy=busy)[4] == fastread.STOP_STALE
    o.epoch = checks[0][3]
    o.locks[1] = 1                              # a region lock held
    assert serve(r, wfd=fd, checks=checks, busy=busy)[4] == fastread.STOP_BUSY
    assert path.read_bytes() == before and r.tail == 0
    o.locks.clear()
    assert serve(r, wfd=fd, checks=checks, busy=busy) == (0, 0, 1, BS, fastread.STOP_HEAD, 0)
    assert reap(emu, [cid])[cid].status == 0


def test_malformed_arguments_raise_and_write_nothing(ring):
    emu, r, fd, path = ring
    before = path.read_bytes()
    emu.submit(cdb10(0x2A, 0, 1), data_out=os.urandom(BS))
    with pytest.raises(ValueError):
        fastread.serve_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size + 4096, 0,
                             -1, 0, fd, 0, 100, BS, 4096, 8, (), ())
    with pytest.raises(TypeError):
        fastread.serve_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size, 0,
                             -1, 0, fd, 0, 100, BS, 4096, 8, ((1, 2),), ())
    assert r.tail == 0 and path.read_bytes() == before and len(r.fetch().commands) == 1


def test_a_file_system_refusing_nowait_writes_is_learnt_once(tmp_path):
    """``StorageImage.refuse_nowait_write``: EOPNOTSUPP/EINVAL turn RWF_NOWAIT writes off for
    the file; on tmpfs the image is known to be memory-backed (a plain write, while no swap is
    in use). EAGAIN (a write that would wait) changes nothing."""
    shm = tempfile.mkdtemp(dir="/dev/shm") if os.path.isdir("/dev/shm") else None
    try:
        for d in [tmp_path] + ([shm] if shm else []):
            p = os.path.join(d, "img")
            with open(p, "wb") as f:
                f.truncate(1 << 20)
            st = StorageImage.open(p)
            try:
                assert st.nowait_write_flags() == NOWAIT
                assert not st.refuse_nowait_write(errno.EAGAIN)
                assert st.nowait_write_flags() == NOWAIT
                assert st.refuse_nowait_write(errno.EOPNOTSUPP)
                assert not st.refuse_nowait_write(errno.EOPNOTSUPP)      # once
                memory = d == shm
                assert st._memory_backed is memory
                assert st.nowait_write_flags() == (
                    (None if swap_active() else 0) if memory else None)
            finally:
                st.close()
    finally:
        if shm:
            shutil.rmtree(shm, ignore_errors=True)


# -- the LunServer -----------------------------------------------------------------------------

@pytest.fixture
def shm_images():
    """Image paths on tmpfs (where a write from memory cannot wait, so the compiled WRITE path
    takes it), removed afterwards."""
    if not os.path.isdir("/dev/shm") or swap_active():
        pytest.skip("no tmpfs without swap here: no write that cannot wait")
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="lvm-cw-")
    yield lambda n: [os.path.join(d, f"img{k}") for k in range(n)]
    shutil.rmtree(d, ignore_errors=True)


def _one_image_lun(lab, shm_images, seed):
    """A one-image LUN on tmpfs whose first 64 blocks hold random data written through the
    ring: (emulator, LunServer, image path, the data)."""
    (path,) = shm_images(1)
    emu, lun, _ = lab(f"vol1;images={path}")
    assert lun.error is None
    data = random.Random(seed).randbytes(64 * BS)
    wid = emu.submit(cdb10(0x2A, 0, 64), data_out=data)
    assert emu.wait([wid])[wid].status == 0
    return emu, lun, path, data


def _write(lun, emu, lba, data, b1=0, timeout=10.0):
    """WRITE(10) ``data`` at ``lba`` through the ring: (status, sense, whether the compiled
    path made it)."""
    before = lun.compiled_writes
    cid = emu.submit(cdb10(0x2A, lba, len(data) // BS, b1=b1), data_out=data)
    c = emu.wait([cid], timeout)[cid]
    return c.status, parse_sense(c.sense) if c.status else None, lun.compiled_writes > before


def _read(emu, lba, n):
    cid = emu.submit(cdb10(0x28, lba, n), data_in_len=n * BS)
    c = emu.wait([cid])[cid]
    assert c.status == 0, parse_sense(c.sense)
    return c.data_in


def test_a_one_image_lun_makes_its_writes_on_the_compiled_path_and_counts_them(lab,
                                                                               shm_images):
    emu, lun, path, data = _one_image_lun(lab, shm_images, 31)
    vol, img = lun.volume, lun.volume._images[0].storage
    io0, st0 = dict(vol.stats), dict(img.stats)
    hist0 = lun.latency.snapshot()["write"]["count"]
    c0, i0 = lun.compiled_writes, lun.inline
    new = [os.urandom(8 * BS) for _ in range(8)]
    ids = [emu.submit(cdb10(0x2A, 8 * k, 8), data_out=new[k]) for k in range(8)]
    assert all(c.status == 0 for c in emu.wait(ids).values())
    assert lun.compiled_writes - c0 == 8 and lun.inline - i0 >= 8
    assert vol.stats["writes"] - io0["writes"] == 8
    assert vol.stats["bytes_written"] - io0["bytes_written"] == 64 * BS
    assert img.stats["writes"] - st0["writes"] == 8
    assert lun.latency.snapshot()["write"]["count"] - hist0 == 8
    with open(path, "rb") as f:
        assert f.read(64 * BS) == b"".join(new)
    assert _read(emu, 0, 64) == b"".join(new)
    text = render({"volumes": {}, "luns": [{"name": "m", "error": None, "commands": 1,
                                            "compiled_writes": lun.compiled_writes}]})
    assert f'lvmirror_lun_compiled_writes_total{{lun="m"}} {lun.compiled_writes}' in text


def test_fua_and_write_through_writes_are_the_python_paths(lab, shm_images):
    """FUA (SBC-4 5.40) and a write-through LU (WCE 0: every write is durable before GOOD)
    wait for the device: the Python path writes them, with fdatasync."""
    emu, lun, path, data = _one_image_lun(lab, shm_images, 32)
    new = os.urandom(8 * BS)
    assert _write(lun, emu, 0, new, b1=0x08) == (0, None, False)
    lun.lu.write_cache = False
    try:
        assert _write(lun, emu, 8, new) == (0, None, False)
    finally:
        lun.lu.write_cache = True
    assert _write(lun, emu, 16, new) == (0, None, True)
    assert _read(emu, 0, 24) == new * 3


def test_a_write_protected_lu_answers_data_protect(lab, shm_images):
    emu, lun, path, data = _one_image_lun(lab, shm_images, 33)
    lun.lu.read_only = True
    try:
        status, sense, compiled = _write(lun, emu, 0, os.urandom(8 * BS))
        assert (status, sense[:2], compiled) == (2, (7, 0x27), False)    # WRITE PROTECTED
    finally:
        lun.lu.read_only = False
    assert _read(emu, 0, 8) == data[:8 * BS]


@pytest.mark.parametrize("how", ["split", "failed"])
def test_a_mirror_and_a_split_or_degraded_mirror_write_on_the_python_path(lab, shm_images, how):
    """Two images: each write goes to both and to the write-intent log. After image 0 is split
    off (or fails), one image is written but the split (failed) image's change bitmap must mark
    every write, so that resync copies only those (split rule 5): still the Python path, and
    the bitmap marks it; the split image keeps T."""
    paths = shm_images(2)
    emu, lun, _ = lab(f"vol2;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    new = os.urandom(8 * BS)
    assert _write(lun, emu, 0, new) == (0, None, False)
    vol = lun.volume
    img = vol._images[0]
    if how == "split":
        vol.split(0)
        assert img.state is ImageState.SPLIT
    else:
        vol._image_error(img, ImageIOError(img.storage, 5, "injected", op="write", offset=0,
                                           length=BS), 0, BS)
        assert img.state is ImageState.FAILED
        vol._torn.clear()           # (the failed write's torn range; not what this checks)
    assert img.bitmap is not None
    assert vol.fast_read_source() is not None       # reads could be compiled; writes not
    # (the first write on tmpfs learns that it refuses RWF_NOWAIT: several, far apart)
    for k in range(1, 5):
        far = k * SIZE // 5 // BS
        assert _write(lun, emu, far, new) == (0, None, False)
        assert img.bitmap.all_dirty(far * BS, 8 * BS)
        for p, want in ((paths[1], new), (paths[0], bytes(8 * BS))):
            with open(p, "rb") as f:
                f.seek(far * BS)
                assert f.read(8 * BS) == want
    assert lun.compiled_writes == 0


def test_a_held_region_lock_keeps_compiled_writes_out(lab, shm_images):
    """A region lock anywhere (another write, a D-Bus client's lock): a WRITE of the held
    range waits for it (overlapping I/O is serialised), one elsewhere is the Python path's."""
    emu, lun, path, data = _one_image_lun(lab, shm_images, 34)
    new = os.urandom(8 * BS)
    hold = lun.volume.locks.lock(0, 8)
    try:
        assert _write(lun, emu, 32, new) == (0, None, False)
        wid = emu.submit(cdb10(0x2A, 0, 8), data_out=new)
        time.sleep(0.3)
        assert wid not in emu.completions
        with open(path, "rb") as f:
            assert f.read(8 * BS) == data[:8 * BS]
    finally:
        hold.release()
    assert emu.wait([wid])[wid].status == 0
    assert _write(lun, emu, 40, new) == (0, None, True)
    assert _read(emu, 0, 8) == new


def test_held_completions_and_unit_attentions_come_first(lab, shm_images):
    """While a consistency group's split holds the LUN's completions, a WRITE is not answered
    until the release; a pending unit attention is reported before any WRITE runs."""
    emu, lun, path, data = _one_image_lun(lab, shm_images, 35)
    lun.hold(max_seconds=5)
    try:
        c0 = lun.compiled_writes
        wid = emu.submit(cdb10(0x2A, 0, 8), data_out=os.urandom(8 * BS))
        time.sleep(0.3)
        assert wid not in emu.completions and lun.compiled_writes == c0
    finally:
        lun.release()
    assert emu.wait([wid])[wid].status == 0
    lun.lu.capacity_changed()
    new = os.urandom(8 * BS)
    status, sense, compiled = _write(lun, emu, 8, new)
    assert (status, sense, compiled) == (2, (6, 0x2A, 0x09), False)   # CAPACITY DATA CHANGED
    assert _read(emu, 8, 8) == data[8 * BS:16 * BS]                   # not written
    assert _write(lun, emu, 8, new) == (0, None, True)


def test_compiled_writes_can_be_turned_off_and_step_aside_after_a_slow_write(lab, shm_images,
                                                                          monkeypatch):
    emu, lun, path, data = _one_image_lun(lab, shm_images, 36)
    new = os.urandom(8 * BS)
    lun._inline_after = time.monotonic() + 60         # a write took longer than INLINE_SLOW
    assert _write(lun, emu, 0, new) == (0, None, False)
    lun._inline_after = 0.0
    assert _write(lun, emu, 0, new) == (0, None, True)
    monkeypatch.setattr(lunserver, "COMPILED_WRITES", False)
    lun._fast = None
    assert _write(lun, emu, 8, new) == (0, None, False)
    assert _read(emu, 0, 16) == new * 2
