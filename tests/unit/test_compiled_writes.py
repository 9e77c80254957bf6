"""The ring thread's compiled WRITE path (``take_batch``, ``run_batch``, ``complete_batch`` in
``lvmirror/tcmu/_fastread.c``): on a
ring the emulator fills byte for byte as the kernel does, then the real LunServer with a
one-image volume - the bytes in the image, the ring's cursors and ids, every WRITE it must leave
to the SCSI core (FUA, WRPROTECT, NACA, out of range, a write that fails), and the volumes and LU
states under which it must not write (a mirror, a split or failed image's change tracking,
write-through, write protection, region locks, held completions, unit attentions), and an image
attached while it writes (the split epoch it entered is drained before the resync copies)."""

import errno
import os
import random
import resource
import signal
import threading
import time

import pytest

from lvmirror.daemon import lunserver
from lvmirror.daemon.metrics import render
from lvmirror.errors import ImageIOError
from lvmirror.mirror.volume import ImageState
from lvmirror.scsi import parse_sense
from tests.unit.test_compiled_reads import Obj, cdb16, reap, ring_on_image, unlocked
from tests.unit.test_daemon_ring import BS, SIZE, cdb10, images, lab, rearm  # noqa: F401
from tests.unit.test_volume_helpers import make_volume, run_thread

fastread = pytest.importorskip("lvmirror.tcmu._fastread",
                               reason="the compiled module is not built (tools/bootstrap)")

NBLK = (1 << 20) // BS


@pytest.fixture
def ring(tmp_path):
    """(emulator, CommandRing, image fd opened read-write, image path)."""
    with ring_on_image(tmp_path, os.O_RDWR, 9) as (emu, r, fd, path, _):
        yield emu, r, fd, path


def writes(r, fd, *, max_bytes=64 << 10, max_commands=64, checks=(), busy=()):
    """One unlocked WRITE batch (``unlocked``): (answered, nbytes, why, err), ``.rest``."""
    return unlocked(r, fd, True, num_blocks=NBLK, max_bytes=max_bytes,
                    max_commands=max_commands, checks=checks, busy=busy)


def reads(r, fd):
    return r.fast_reads(fastread.read_batch, fd, 0, NBLK, BS, 64 << 10, 2048, (), ())


def test_writes_land_in_the_image_and_reads_and_writes_take_turns_in_ring_order(ring):
    """WRITE(10)/WRITE(16) are written whole and answered GOOD; each function stops at the
    other's kind, so a READ queued after a WRITE of the same blocks returns the new bytes and
    one queued before it the old."""
    emu, r, fd, path = ring
    old = path.read_bytes()
    new = [os.urandom(8 * BS), os.urandom(BS)]
    ids = [emu.submit(cdb10(0x28, 8, 8), data_in_len=8 * BS),
           emu.submit(cdb10(0x2A, 8, 8), data_out=new[0]),
           emu.submit(cdb10(0x28, 8, 8), data_in_len=8 * BS),
           emu.submit(cdb16(0x8A, 100, 1), data_out=new[1])]
    assert reads(r, fd) == (1, 8 * BS, fastread.STOP_WRITE)
    assert writes(r, fd) == (1, 8 * BS, fastread.STOP_READ, 0)
    assert reads(r, fd) == (1, 8 * BS, fastread.STOP_WRITE)
    assert writes(r, fd) == (1, BS, fastread.STOP_HEAD, 0)
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
    (bytes([0x00] * 6), 0),                                    # TEST UNIT READY
])
def test_commands_it_does_not_make_are_left_intact_for_the_python_fetch(ring, cdb, nbytes):
    emu, r, fd, path = ring
    before = path.read_bytes()
    cid = emu.submit(cdb, data_out=os.urandom(nbytes)) if nbytes else emu.submit(cdb)
    after = emu.submit(cdb10(0x2A, 0, 1), data_out=os.urandom(BS))
    assert writes(r, fd) == (0, 0, fastread.STOP_OTHER, 0)
    assert r.tail == 0 and path.read_bytes() == before
    assert [(c.cmd_id, c.cdb) for c in r.fetch().commands] == [(cid, cdb), (after,
                                                                         cdb10(0x2A, 0, 1))]


def test_a_full_batch_says_call_again_and_pads_and_wrapping_keep_the_cursors(ring):
    emu, r, fd, path = ring
    ids = [emu.submit(cdb10(0x2A, k, 1), data_out=bytes([k]) * BS) for k in range(3)]
    assert writes(r, fd, max_commands=2) == (2, 2 * BS, fastread.STOP_WRITE, 0)
    assert writes(r, fd, max_commands=2) == (1, BS, fastread.STOP_HEAD, 0)
    assert set(reap(emu, ids)) == set(ids)
    rnd = random.Random(4)
    expect = bytearray(path.read_bytes())
    seen = 3
    for _ in range(300):
        want = []
        for _ in range(rnd.randrange(1, 6)):
            lba, n = rnd.randrange(1900), rnd.randrange(1, 17)
            data = rnd.randbytes(n * BS)
            want.append(emu.submit(cdb10(0x2A, lba, n), data_out=data))
            expect[lba * BS:(lba + n) * BS] = data
        assert writes(r, fd)[0::2] == (len(want), fastread.STOP_HEAD)
        assert set(reap(emu, want)) == set(want)
        seen += len(want)
    assert r.stats["pads"] > 0 and r.stats["completed"] == seen
    assert r.tail == r.head and emu.warnings == []
    assert path.read_bytes() == bytes(expect)


def test_a_write_that_fails_is_left_whole_to_the_python_path_after_those_before_it(ring):
    """EBADF for the first of two WRITEs: nothing answered, both taken and given back as
    Commands. EFBIG (the process's file size limit) for the second of two more: the first is
    answered, the second given back with its errno, for the Python path to write again and
    report."""
    emu, r, fd, path = ring
    rfd = os.open(path, os.O_RDONLY)
    ids = [emu.submit(cdb10(0x2A, 1, 1), data_out=b"x" * BS),
           emu.submit(cdb10(0x2A, 2, 1), data_out=b"y" * BS)]
    try:
        got = writes(r, rfd)
    finally:
        os.close(rfd)
    assert got == (0, 0, fastread.STOP_MISS_WRITE, errno.EBADF)
    assert r.tail == 0 and r.outstanding == 2 and not r.fetch()
    assert [(c.cmd_id, c.cdb, b"".join(c.iov_views)) for c in got.rest] == [
        (ids[0], cdb10(0x2A, 1, 1), b"x" * BS), (ids[1], cdb10(0x2A, 2, 1), b"y" * BS)]
    for c in got.rest:                          # as the Python path answers them
        r.complete(c.cmd_id, 0)
        c.release()
    assert set(reap(emu, ids)) == set(ids) and r.outstanding == 0
    first = emu.submit(cdb10(0x2A, 0, 1), data_out=b"a" * BS)
    second = emu.submit(cdb10(0x2A, NBLK - 1, 1), data_out=b"b" * BS)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (512 << 10, old_limit[1]))
    try:
        got = writes(r, fd)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert got == (1, BS, fastread.STOP_MISS_WRITE, errno.EFBIG)
    assert list(reap(emu, [first, second])) == [first]
    assert [c.cmd_id for c in got.rest] == [second] and r.outstanding == 1
    assert path.read_bytes()[:BS] == b"a" * BS


def test_its_conditions_are_read_when_it_starts(ring):
    emu, r, fd, path = ring
    o = Obj()
    o.epoch, o.held = "e1", None
    checks = ((o, "epoch", fastread.CHECK_IS, o.epoch),)
    busy = ((o, "held", fastread.CHECK_IS, None),)
    before = path.read_bytes()
    cid = emu.submit(cdb10(0x2A, 0, 1), data_out=os.urandom(BS))
    o.epoch = "e2"                              # a split switched the epoch
    assert writes(r, fd, checks=checks, busy=busy)[2] == fastread.STOP_STALE
    o.epoch = checks[0][3]
    o.held = []                                 # completions held for a group split
    assert writes(r, fd, checks=checks, busy=busy)[2] == fastread.STOP_BUSY
    assert path.read_bytes() == before and r.tail == 0
    o.held = None
    assert writes(r, fd, checks=checks, busy=busy) == (1, BS, fastread.STOP_HEAD, 0)
    assert reap(emu, [cid])[cid].status == 0


def test_malformed_arguments_raise_and_write_nothing(ring):
    """A bad geometry or check tuple for take_batch, and for run_batch and complete_batch a
    description take_batch did not make for this map (an iovec outside the data area, a wrong
    length, a count over the commands, too many descriptors): ValueError/TypeError, no I/O."""
    import struct
    emu, r, fd, path = ring
    before = path.read_bytes()
    emu.submit(cdb10(0x2A, 0, 1), data_out=os.urandom(BS))
    with pytest.raises(ValueError):
        fastread.take_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size + 4096, 0,
                            100, BS, 4096, 8, 64, (), (), True)
    with pytest.raises(TypeError):
        fastread.take_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size, 0,
                            100, BS, 4096, 8, 64, ((1, 2),), (), True)
    # a real description, then forged ones
    got = fastread.take_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size, 0, 100,
                              BS, 4096, 8, 64, (), (), True)
    packed = got[4]
    assert got[1] == 1 and got[5:] == (0, 1)     # one command, covering block 0
    rec_at = 8 + 48                              # the first iovec, after the header and record
    outside = packed[:rec_at] + struct.pack("=QQ", r.cmdr_off, BS)
    too_long = packed[:rec_at] + struct.pack("=QQ", r.map_size - 8, BS)
    for bad in (outside, too_long, packed[:-1], packed + b"\0" * 16, b""):
        with pytest.raises(ValueError):
            fastread.run_batch(r._mv, r.data_off, r.map_size, bad, 1, (fd,), 0, True)
        with pytest.raises(ValueError):
            fastread.complete_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size,
                                    bad, 1, ())
    for fds in ((), (fd,) * 5):
        with pytest.raises(ValueError):
            fastread.run_batch(r._mv, r.data_off, r.map_size, packed, 1, fds, 0, True)
    with pytest.raises(ValueError):
        fastread.run_batch(r._mv, r.data_off, r.map_size, packed, 1, (fd, fd), 0, False)
    with pytest.raises(ValueError):
        fastread.run_batch(r._mv, r.data_off, r.map_size, packed, 2, (fd,), 0, True)
    with pytest.raises(ValueError):
        fastread.complete_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size,
                                packed, 2, ())
    assert r.tail == 0 and path.read_bytes() == before and len(r.fetch().commands) == 1


def test_it_releases_the_gil_while_it_writes(ring):
    """The writes run without the GIL: another Python thread runs meanwhile (with a switch
    interval of 0.5 s, a thread holding the GIL for the call's milliseconds would not let it)."""
    import sys
    emu, r, _, path = ring
    ids = [emu.submit(cdb10(0x2A, 128 * k, 128), data_out=os.urandom(128 * BS))
           for k in range(12)]
    # O_DSYNC: each write waits for the disk, milliseconds in all, so that the other thread is
    # scheduled within the call even on a busy host
    fd = os.open(path, os.O_RDWR | os.O_DSYNC)
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    old = sys.getswitchinterval()
    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.05)
        sys.setswitchinterval(0.5)
        before = count[0]
        got = writes(r, fd)
        after = count[0]
    finally:
        sys.setswitchinterval(old)
        stop.set()
        t.join()
        os.close(fd)
    assert got == (12, 12 * 128 * BS, fastread.STOP_HEAD, 0)
    assert after > before
    assert set(reap(emu, ids)) == set(ids)


def _lock(vol, token, ranges):
    """``lock_fast`` for the commands of ``ranges`` (``(first block, blocks)`` each), with the
    cover ``take_batch`` gives."""
    first = min(a for a, _ in ranges)
    return vol.lock_fast(token, len(ranges), first, max(a + n for a, n in ranges) - first,
                         lambda: ranges)


def test_begin_fast_writes_holds_the_epoch_and_locks_the_batchs_blocks(tmp_path):
    """What the compiled path writes inside: the split epoch entered (closing the volume - as a
    split or an image failure switching the epoch - waits for ``end_fast_writes``) and an
    exclusive region lock over the blocks its commands cover (``lock_fast``); when another lock
    holds some of them, one over each command's range in turn, up to the first refused - I/O
    elsewhere goes on meanwhile."""
    vol, _, paths = make_volume(tmp_path, 1)
    st = vol._images[0].storage
    source = vol.fast_write_source()
    assert source is not None and source[0] == (st,)
    token = vol.begin_fast_writes()
    assert vol._epoch.inflight == 1
    assert _lock(vol, token, [(0, 8), (16, 8)]) == 2             # one lock: [0, 24)
    assert len(token.locks) == 1
    assert vol.locks.try_lock(0, 1) is None and vol.locks.try_lock(10, 1) is None
    free = vol.locks.try_lock(24, 8)
    assert free is not None
    free.release()
    vol.end_fast_writes(token, (st,), 0, 0)
    assert not vol.locks._held
    other = vol.locks.lock(40, 8)                       # a write in flight on the Python path
    token = vol.begin_fast_writes()
    assert _lock(vol, token, [(0, 8), (16, 8), (44, 1), (60, 4)]) == 2
    assert vol.locks.try_lock(0, 1) is None and vol.locks.try_lock(23, 1) is None
    free = vol.locks.try_lock(8, 8)                     # between them: free
    assert free is not None
    free.release()
    other.release()
    t, box = run_thread(vol.close)
    time.sleep(0.3)
    assert t.is_alive()                      # waits for the writes in flight
    s0 = dict(vol.stats)
    vol.end_fast_writes(token, (st,), 3, 3 * BS)
    t.join(10)
    assert not t.is_alive() and "error" not in box
    assert vol.stats["writes"] - s0["writes"] == 3
    assert vol.stats["bytes_written"] - s0["bytes_written"] == 3 * BS
    assert not vol.locks._held and token.locks == []


def test_a_batchs_overlapping_commands_lock_only_the_first_when_the_cover_is_refused(tmp_path):
    """With the cover refused (a lock elsewhere inside it), two commands of one batch on the
    same blocks: the second is not granted (it waits, on the Python path, for the first's lock),
    nor is anything after it. Under a granted cover they are written in ring order."""
    vol, _, _ = make_volume(tmp_path, 1)
    try:
        other = vol.locks.lock(150, 1)
        token = vol.begin_fast_writes()
        assert _lock(vol, token, [(0, 8), (100, 1), (4, 8), (200, 1)]) == 2
        vol.end_fast_writes(token, (vol._images[0].storage,), 0, 0)
        other.release()
        token = vol.begin_fast_writes()
        assert _lock(vol, token, [(0, 8), (100, 1), (4, 8), (200, 1)]) == 4
        vol.end_fast_writes(token, (vol._images[0].storage,), 0, 0)
        assert not vol.locks._held and vol._epoch.inflight == 0
    finally:
        vol.close()


def test_a_mirror_offers_its_legs_until_a_change_is_tracked(tmp_path):
    """Two images in sync: both are the write source, with each one's state, storage and
    descriptor among the conditions. Not with fan-out "parallel" (its legs run on workers under
    leg_timeout), nor once a split image's changes are tracked (split rule 5: the bitmap must
    mark each write), nor while an image resyncs."""
    vol, _, _ = make_volume(tmp_path, 2)
    try:
        legs, checks = vol.fast_write_source()
        assert legs == tuple(img.storage for img in vol._images)
        for img in vol._images:
            assert (img, "state", "is", ImageState.IN_SYNC) in checks
            assert (img.storage, "fd", "eq", img.storage.fd) in checks
        vol._fanout_mode = "parallel"
        assert vol.fast_write_source() is None
        vol._fanout_mode = "serial"
        assert vol.fast_write_source()[0] == legs
        vol.split(0)                          # one image written, the split one tracked
        assert vol.fast_write_source() is None
    finally:
        vol.close()


def test_a_mirror_batch_begins_each_range_in_the_write_intent_log_only_when_marked(tmp_path):
    """A WRITE batch of a mirror begins its regions in the write-intent log (the cover, else
    each command's), only when they are marked on disk already (no save, no wait): the first
    range of an unmarked region stops it. Begun regions are in flight until ``end_fast_writes`` - a checkpoint's
    clean leaves them marked - and clean afterwards."""
    vol, _, _ = make_volume(tmp_path, 2)
    try:
        wil = vol._wil
        legs = tuple(img.storage for img in vol._images)
        rb = (1 << wil.region_shift) // BS    # the first block of region 1
        assert rb + 8 <= vol.num_blocks
        tok = wil.begin(0, BS)                # region 0 marked on disk (a Python write)
        wil.end(tok)
        token = vol.begin_fast_writes()
        assert _lock(vol, token, [(0, 8), (8, 8), (rb, 8), (16, 8)]) == 2
        assert len(token.begun) == 2 and len(token.locks) == 1     # the cover, then each
        assert wil.clean(wil.ticket()) == 0    # in flight: not cleared
        assert wil.bitmap.all_dirty(0, BS)
        vol.end_fast_writes(token, legs, 2, 16 * BS)
        assert not vol.locks._held and vol._epoch.inflight == 0
        assert wil.clean(wil.ticket()) == 1 and not wil.bitmap.all_dirty(0, BS)
        assert all(st.stats["writes"] >= 2 for st in legs)
    finally:
        vol.close()


def test_a_mirror_batch_marks_its_ranges_in_a_leg_failed_meanwhile(tmp_path):
    """A batch entered the epoch while image 1 was in sync; before it began its log marks,
    image 1 failed (another I/O's error; its failure merged the log's marks of that moment)
    and a write on the Python path marked the batch's region in the log again. The batch
    still writes image 1 (its epoch's leg), whose cache a failing disk or a power cut may drop:
    ``end_fast_writes`` marks each of its commands' ranges in image 1's change bitmap, before
    its log marks end, so a re-add copies them."""
    vol, _, _ = make_volume(tmp_path, 2, region_size=8 * BS, intent_chunk=128 * BS)
    try:
        wil = vol._wil
        legs = tuple(img.storage for img in vol._images)
        wil.clean(wil.ticket())                              # a checkpoint: nothing marked
        assert not wil.bitmap.is_dirty(0, vol.size)
        token = vol.begin_fast_writes()
        far = vol.num_blocks - 8
        vol._image_error(vol._images[1], ImageIOError(legs[1], errno.EIO, "injected"),
                         far * BS, 8 * BS)
        bm = vol._images[1].bitmap
        assert vol._images[1].state is ImageState.FAILED and not bm.is_dirty(0, 32 * BS)
        vol.write(40, [memoryview(bytes(BS))])               # the chunk's log mark, saved
        assert bm.all_dirty(40 * BS, BS) and not bm.is_dirty(8 * BS, 8 * BS)
        assert _lock(vol, token, [(8, 8), (24, 4)]) == 2
        vol.end_fast_writes(token, legs, 2, 12 * BS)
        assert bm.all_dirty(8 * BS, 8 * BS) and bm.all_dirty(24 * BS, 4 * BS)
        assert not bm.is_dirty(0, 8 * BS) and not bm.is_dirty(16 * BS, 8 * BS)
    finally:
        vol.close()


# -- the LunServer -----------------------------------------------------------------------------


def test_the_lun_writes_only_inside_begin_and_end_fast_writes(lab, tmp_path, monkeypatch):
    """Seen from another thread while ``run_batch`` writes: the command's blocks locked, the
    blocks beside them free, the epoch entered; all left afterwards. (Without the ring
    thread's lease, which locks the whole LUN across batches: test_ring_lease.py.)"""
    monkeypatch.setattr(lunserver, "RING_LEASE", False)
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 39)
    vol = lun.volume
    seen = []
    real = fastread.run_batch

    def spy(*args):
        beside = [vol.locks.try_lock(b, 1) for b in (7, 16)]
        seen.append((vol.locks.try_lock(8, 1) is None, vol.locks.try_lock(15, 1) is None,
                     None not in beside, vol._epoch.inflight))
        for lk in beside:
            if lk is not None:
                lk.release()
        return real(*args)

    monkeypatch.setattr(fastread, "run_batch", spy)
    assert _write(lun, emu, 8, os.urandom(8 * BS)) == (0, None, True)
    assert seen and all(s == (True, True, True, 1) for s in seen)
    assert not vol.locks._held and vol._epoch.inflight == 0

def _one_image_lun(lab, tmp_path, seed):
    """A one-image LUN whose first 64 blocks hold random data written through the ring:
    (emulator, LunServer, image path, the data)."""
    (path,) = images(tmp_path, 1)
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


@pytest.mark.parametrize("lease", [True, False], ids=["lease", "no-lease"])
def test_a_one_image_lun_makes_its_writes_on_the_compiled_path_and_counts_them(lab, tmp_path,
                                                                              monkeypatch, lease):
    """... under the ring thread's lease or without it. A lease counts its I/O when it ends;
    until then the volume's statistics add it (``MirrorVolume.stats``), so the image's own
    counters are read there."""
    monkeypatch.setattr(lunserver, "RING_LEASE", lease and lunserver.RING_LEASE)
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 31)
    vol, img = lun.volume, lun.volume._images[0].storage
    io0, st0 = dict(vol.stats), dict(vol.stats["images"][0])
    hist0 = lun.latency.snapshot()["write"]["count"]
    c0, i0 = lun.compiled_writes, lun.inline
    new = [os.urandom(8 * BS) for _ in range(8)]
    ids = [emu.submit(cdb10(0x2A, 8 * k, 8), data_out=new[k]) for k in range(8)]
    assert all(c.status == 0 for c in emu.wait(ids).values())
    assert lun.compiled_writes - c0 == 8 and lun.inline - i0 >= 8
    assert vol.stats["writes"] - io0["writes"] == 8
    assert vol.stats["bytes_written"] - io0["bytes_written"] == 64 * BS
    assert vol.stats["images"][0]["writes"] - st0["writes"] == 8
    assert lun.latency.snapshot()["write"]["count"] - hist0 == 8
    assert vol.stats["inflight"] == 0 and not vol.locks.holders()
    if not lease:
        assert not vol.locks._held and vol._epoch.inflight == 0      # lock and epoch left
    with open(path, "rb") as f:
        assert f.read(64 * BS) == b"".join(new)
    assert _read(emu, 0, 64) == b"".join(new)
    text = render({"volumes": {}, "luns": [{"name": "m", "error": None, "commands": 1,
                                            "compiled_writes": lun.compiled_writes}]})
    assert f'lvmirror_lun_compiled_writes_total{{lun="m"}} {lun.compiled_writes}' in text


def test_after_a_write_batch_reads_are_still_compiled(lab, tmp_path):
    """The compiled path asks first for the kind its last batch made: after WRITEs, a cached
    READ at the ring's head is still the READ path's (the WRITE batch stops at it), also while
    WRITEs cannot be made (after a slow write, ``_inline_after``), and WRITEs follow READs."""
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 35)
    new = os.urandom(8 * BS)
    assert _write(lun, emu, 8, new) == (0, None, True)
    assert lun._lead == fastread.STOP_WRITE
    r0 = lun.compiled
    assert _read(emu, 8, 8) == new
    assert lun.compiled == r0 + 1 and lun._lead == fastread.STOP_READ
    assert _write(lun, emu, 16, new) == (0, None, True)
    lun._inline_after = time.monotonic() + 60         # WRITEs to the pool for a while
    assert _read(emu, 16, 8) == new
    assert lun.compiled == r0 + 2
    assert _write(lun, emu, 24, new) == (0, None, False)
    lun._inline_after = 0.0
    assert _write(lun, emu, 32, new) == (0, None, True)
    with open(path, "rb") as f:
        assert f.read(40 * BS)[8 * BS:] == new * 4


def test_fua_and_write_through_writes_are_the_python_paths(lab, tmp_path):
    """FUA (SBC-4 5.40) and a write-through LU (WCE 0: every write is durable before GOOD)
    wait for the device: the Python path writes them, with fdatasync."""
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 32)
    new = os.urandom(8 * BS)
    assert _write(lun, emu, 0, new, b1=0x08) == (0, None, False)
    lun.lu.write_cache = False
    try:
        for lba in (8, 16, 24):       # (armed again meanwhile, with the write cache off)
            assert _write(lun, emu, lba, new) == (0, None, False)
            time.sleep(0.05)
    finally:
        lun.lu.write_cache = True     # as the backstore's emulate_write_cache=1 does later
    assert _write(lun, emu, 32, new) == (0, None, True)
    assert _read(emu, 0, 40) == new * 5


def test_a_write_protected_lu_answers_data_protect(lab, tmp_path):
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 33)
    assert _write(lun, emu, 0, os.urandom(8 * BS)) == (0, None, True)
    lun.lu.read_only = True
    try:
        for lba in (8, 16):           # (armed again meanwhile, write-protected)
            status, sense, compiled = _write(lun, emu, lba, os.urandom(8 * BS))
            assert (status, sense[:2], compiled) == (2, (7, 0x27), False)    # WRITE PROTECTED
            time.sleep(0.05)
    finally:
        lun.lu.read_only = False
    assert _read(emu, 8, 16) == data[8 * BS:24 * BS]
    assert _write(lun, emu, 8, os.urandom(8 * BS)) == (0, None, True)


@pytest.mark.parametrize("how", ["split", "failed"])
def test_a_mirror_and_a_split_or_degraded_mirror_write_on_the_python_path(lab, tmp_path, how):
    """Two images: each write goes to both and to the write-intent log; the first to a region
    the log does not mark is the Python path's (it saves the log). After image 0 is split
    off (or fails), one image is written but the split (failed) image's change bitmap must mark
    every write, so that resync copies only those (split rule 5): still the Python path, and
    the bitmap marks it; the split image keeps T."""
    paths = images(tmp_path)
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
    for k in range(1, 5):
        far = k * SIZE // 5 // BS
        assert _write(lun, emu, far, new) == (0, None, False)
        assert img.bitmap.all_dirty(far * BS, 8 * BS)
        for p, want in ((paths[1], new), (paths[0], bytes(8 * BS))):
            with open(p, "rb") as f:
                f.seek(far * BS)
                assert f.read(8 * BS) == want
    assert lun.compiled_writes == 0


def test_a_held_region_lock_keeps_compiled_writes_out(lab, tmp_path):
    """A region lock anywhere (another write, a D-Bus client's lock): a WRITE of the held
    range waits for it (overlapping I/O is serialised), one elsewhere is answered at once (on
    the compiled path under its own region lock, or on the Python path)."""
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 34)
    new = os.urandom(8 * BS)
    hold = lun.volume.locks.lock(0, 8)
    try:
        assert _write(lun, emu, 32, new)[:2] == (0, None)
        with open(path, "rb") as f:
            f.seek(32 * BS)
            assert f.read(8 * BS) == new
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


def test_held_completions_and_unit_attentions_come_first(lab, tmp_path):
    """While a consistency group's split holds the LUN's completions, a WRITE is not answered
    until the release; a pending unit attention is reported before any WRITE runs."""
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 35)
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


def test_compiled_writes_can_be_turned_off_and_step_aside_after_a_slow_write(lab, tmp_path,
                                                                          monkeypatch):
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 36)
    new = os.urandom(8 * BS)
    lun._inline_after = time.monotonic() + 60         # a write took longer than INLINE_SLOW
    assert _write(lun, emu, 0, new) == (0, None, False)
    lun._inline_after = 0.0
    assert _write(lun, emu, 0, new) == (0, None, True)
    monkeypatch.setattr(lunserver, "COMPILED_WRITES", False)
    lun._fast = None
    assert _write(lun, emu, 8, new) == (0, None, False)
    assert _read(emu, 0, 16) == new * 2


def test_a_write_the_image_refuses_is_reported_by_the_python_path(lab, tmp_path):
    """The image refuses a write (EFBIG here, the process's file size limit): the compiled
    path leaves it, and the Python path writes it again and answers CHECK CONDITION; the
    writes before and after it are answered GOOD."""
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 37)
    ok = os.urandom(8 * BS)
    assert _write(lun, emu, 0, ok) == (0, None, True)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (SIZE // 2, old_limit[1]))
    try:
        c0 = lun.compiled_writes
        status, sense, _ = _write(lun, emu, SIZE // BS - 8, os.urandom(8 * BS))
        assert lun.compiled_writes == c0
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert (status, sense[:2]) == (2, (3, 0x0C)), sense    # MEDIUM ERROR, WRITE ERROR
    # its last image failed: the LUN tells the initiator, NOT READY (multipath acts on it)
    cid = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
    c = emu.wait([cid])[cid]
    assert (c.status, parse_sense(c.sense)[0]) == (2, 2)


def test_an_image_attached_while_it_writes_ends_identical(lab, tmp_path):
    """The compiled path writes without the GIL inside the split epoch it entered: an image
    attached meanwhile (a new epoch with two images to write, a full resync) must get every
    write - those made in the old epoch are drained before the resync copies, those after go
    to both. A writer at queue depth 16 runs through the attach and the resync; afterwards the
    two images are byte for byte the same and every block holds its last write."""
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 38)
    vol = lun.volume
    stop = threading.Event()
    expect = {}
    errors = []

    def writer():
        rnd = random.Random(5)
        inflight = {}
        while not stop.is_set() or inflight:
            while len(inflight) < 16 and not stop.is_set():
                lba = rnd.randrange(SIZE // BS // 8) * 8
                if any(abs(lba - other) < 8 for other in inflight.values()):
                    continue            # no two overlapping writes in flight: order is theirs
                blob = rnd.randbytes(8 * BS)
                cid = emu.submit(cdb10(0x2A, lba, 8), data_out=blob)
                inflight[cid] = lba
                expect[lba] = blob
            try:
                got = emu.wait_any(set(inflight), timeout=20)
            except TimeoutError as exc:
                errors.append(exc)
                return
            for cid in got:
                if emu.completions[cid].status != 0:
                    errors.append(emu.completions[cid])
                del inflight[cid]

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.3)
        c0 = lun.compiled_writes
        second = os.path.join(tmp_path, "img-attached")
        idx = vol.attach(second)
        time.sleep(0.3)
        for job in list(vol.jobs.values()):
            assert job.wait(60)
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors[:3]
    assert c0 > 0                       # compiled writes ran before the attach
    assert vol._images[idx].state is ImageState.IN_SYNC
    vol.flush()
    with open(path, "rb") as f0, open(second, "rb") as f1:
        a, b = f0.read(), f1.read()
    assert a == b
    for lba, blob in expect.items():
        assert a[lba * BS:(lba + 8) * BS] == blob


# -- the watchdog: an unlocked batch whose I/O stalls -------------------------------------------

def _stall_run_batch(monkeypatch, writes=True, then=None):
    """Make the first ``run_batch`` of the kind ``writes`` that a ring thread calls wait until
    the returned ``gate`` is set (``entered`` is set when it begins), with the GIL released as
    the real one's I/O: a write stuck behind a slow or dying disk. ``then``: what it returns
    instead of doing the I/O (the I/O failed), or None for the real call. Returns (gate,
    entered)."""
    gate, entered = threading.Event(), threading.Event()
    real = fastread.run_batch

    def stuck(ring, data_off, map_size, packed, count, fds, rwf, kind):
        if (kind == writes and threading.current_thread().name.startswith("ring-")
                and not entered.is_set()):
            entered.set()
            assert gate.wait(30)
            if then is not None:
                return then
        return real(ring, data_off, map_size, packed, count, fds, rwf, kind)
    monkeypatch.setattr(fastread, "run_batch", stuck)
    return gate, entered


def test_a_compiled_write_that_stalls_hands_the_ring_over(lab, tmp_path, monkeypatch):
    """A compiled WRITE batch whose write does not return holds neither the ring's lock nor
    the GIL: after INLINE_STALL seconds the watchdog hands the ring to a new ring thread, which
    answers TEST UNIT READY, a READ and a WRITE elsewhere at once (the stuck batch locks only
    its commands' ranges) and sends WRITEs to the worker pool; a WRITE to the stuck one's
    blocks waits for its lock, as for any write in flight. Once the write returns, its
    completion reaches the initiator, GOOD, with its data in the image, the WRITE behind it
    lands after it, and the LUN stops cleanly."""
    monkeypatch.setattr(lunserver, "RING_LEASE", False)   # (its stall is run_batch's)
    monkeypatch.setattr(lunserver, "INLINE_BACKOFF", 0.0)
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 61)
    gate, entered = _stall_run_batch(monkeypatch)
    new = os.urandom(8 * BS)
    c0 = lun.compiled_writes
    wid = emu.submit(cdb10(0x2A, 8, 8), data_out=new)
    assert entered.wait(10)                       # the ring thread is inside the write
    t0 = time.monotonic()
    tur = emu.submit(bytes(6))
    rid = emu.submit(cdb10(0x28, 32, 8), data_in_len=8 * BS)
    done = emu.wait([tur, rid], timeout=10)       # answered by the new ring thread
    assert done[tur].status == 0 and done[rid].status == 0
    assert done[rid].data_in == data[32 * BS:40 * BS]
    assert time.monotonic() - t0 < 5
    assert lun.handovers == 1 and wid not in emu.completions
    elsewhere = emu.submit(cdb10(0x2A, 24, 8), data_out=bytes([4]) * 8 * BS)
    assert emu.wait([elsewhere], timeout=10)[elsewhere].status == 0
    behind = emu.submit(cdb10(0x2A, 12, 8), data_out=bytes([3]) * 8 * BS)
    time.sleep(0.3)
    assert behind not in emu.completions          # waits for the stuck batch's lock
    gate.set()
    done = emu.wait([wid, behind], timeout=10)
    assert done[wid].status == 0 and done[behind].status == 0
    assert lun.compiled_writes == c0 + 1          # counted once, by the thread that made it
    with open(path, "rb") as f:
        image = f.read()
    assert image[8 * BS:12 * BS] == new[:4 * BS] and image[12 * BS:20 * BS] == bytes([3]) * 8 * BS
    assert image[24 * BS:32 * BS] == bytes([4]) * 8 * BS
    time.sleep(0.1)                               # the stuck thread has returned
    assert _write(lun, emu, 40, os.urandom(8 * BS)) == (0, None, True)
    assert lun.handovers == 1 and lun._stuck == 0
    lun.stop()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(f"ring-{lun.name}")]


def test_a_stalled_compiled_write_that_then_fails_is_made_by_the_python_path(lab, tmp_path,
                                                                             monkeypatch):
    """The stalled batch's write then fails (EIO, say, from a device that recovered): after
    the handover the stuck thread gives every command of its batch to the worker pool as a
    Command - the new ring thread's fetch cursor is past them - and the Python path writes them
    again and answers GOOD."""
    monkeypatch.setattr(lunserver, "RING_LEASE", False)   # (its stall is run_batch's)
    import errno as _errno
    monkeypatch.setattr(lunserver, "INLINE_BACKOFF", 0.0)
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 62)
    gate, entered = _stall_run_batch(monkeypatch, then=(0, 0, _errno.EIO, 0))
    new = [os.urandom(8 * BS) for _ in range(3)]
    ids = [emu.submit(cdb10(0x2A, 8 * k, 8), data_out=new[k]) for k in range(3)]
    assert entered.wait(10)
    tur = emu.submit(bytes(6))
    assert emu.wait([tur], timeout=10)[tur].status == 0
    assert lun.handovers == 1
    gate.set()
    done = emu.wait(ids, timeout=10)
    assert [done[i].status for i in ids] == [0, 0, 0]
    with open(path, "rb") as f:
        assert f.read(24 * BS) == b"".join(new)
    assert _read(emu, 0, 24) == b"".join(new)
    lun.stop()
    assert emu.warnings == []


def test_a_compiled_large_read_that_stalls_hands_the_ring_over(lab, tmp_path, monkeypatch):
    """The same for a batch of 1 MiB READs: a TEST UNIT READY behind it is answered by the new
    ring thread while the copy has not returned; the READ's data then arrives whole."""
    monkeypatch.setattr(lunserver, "RING_LEASE", False)   # (its stall is run_batch's)
    from tests.unit.test_compiled_big_reads import _mirror_lun_with_1_mib
    emu, lun, paths, data = _mirror_lun_with_1_mib(lab, tmp_path, 63)
    gate, entered = _stall_run_batch(monkeypatch, writes=False)
    rid = emu.submit(cdb10(0x28, 0, 1024), data_in_len=1024 * BS)
    assert entered.wait(10)
    tur = emu.submit(bytes(6))
    assert emu.wait([tur], timeout=10)[tur].status == 0
    assert lun.handovers == 1 and rid not in emu.completions
    gate.set()
    c = emu.wait([rid], timeout=10)[rid]
    assert c.status == 0 and c.data_in == data[:1024 * BS]
    lun.stop()


# -- a mirror's WRITEs ---------------------------------------------------------------------------

def _mirror_lun(lab, tmp_path, seed):
    """A 2-image LUN after its initial resync whose first 64 blocks hold random data written
    through the ring (that write saved the write-intent log's mark of its first 1 MiB chunk):
    (emulator, LunServer, image paths, the data)."""
    from tests.unit.test_daemon_ring import _lun_with_data
    return _lun_with_data(lab, tmp_path, seed, ";intent_chunk=1M")


def test_a_mirror_makes_its_writes_to_every_image_on_the_compiled_path(lab, tmp_path):
    """Once the write-intent log marks a region, a 2-image LUN's WRITEs there are compiled:
    each lands on both images, byte for byte, and is counted once per image; a batch of 32
    queued together too. A WRITE to a region not marked yet is the Python path's (it saves the
    log first), and the next one there is compiled."""
    from tests.unit.test_daemon_ring import _no_checkpoints
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 71)
    vol = lun.volume
    _no_checkpoints(vol)
    vol._wil.clean(vol._wil.ticket())               # a checkpoint: no region marked
    s0 = [img.storage.stats["writes"] for img in vol._images]
    new = os.urandom(8 * BS)
    assert _write(lun, emu, 8, new) == (0, None, False)
    assert _write(lun, emu, 8, new) == (0, None, True)
    rnd = random.Random(72)
    want = bytearray(data)
    want[8 * BS:16 * BS] = new
    c0 = lun.compiled_writes
    ids = []
    for _ in range(32):
        lba, n = rnd.randrange(56), rnd.randrange(1, 9)
        chunk = rnd.randbytes(n * BS)
        want[lba * BS:(lba + n) * BS] = chunk
        ids.append(emu.submit(cdb10(0x2A, lba, n), data_out=chunk))
    done = emu.wait(ids)
    assert all(done[i].status == 0 for i in ids)
    assert lun.compiled_writes > c0
    far = SIZE // BS - 8                             # the log's last chunk: not marked
    assert _write(lun, emu, far, new) == (0, None, False)
    assert _write(lun, emu, far, new) == (0, None, True)
    assert [img.storage.stats["writes"] - w for img, w in zip(vol._images, s0)] == [
        2 + 32 + 2] * 2
    for p in paths:
        with open(p, "rb") as f:
            image = f.read()
        assert image[:64 * BS] == bytes(want) and image[far * BS:] == new
    assert _read(emu, 0, 64) == bytes(want)


def test_a_leg_that_refuses_a_write_is_failed_by_the_python_path(lab, tmp_path):
    """Image 1's descriptor stops taking writes (EBADF: a read-only descriptor put in its
    place): the compiled batch stops before that command, the Python path writes it again,
    fails image 1 (its changes tracked from then on) and answers GOOD from image 0; the LUN's
    writes then go on, on the Python path (a change is tracked), to image 0."""
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 73)
    vol = lun.volume
    new = os.urandom(8 * BS)
    assert _write(lun, emu, 8, new) == (0, None, True)
    st = vol._images[1].storage
    ro = os.open(paths[1], os.O_RDONLY)
    try:
        os.dup2(ro, st.fd)
    finally:
        os.close(ro)
    other = os.urandom(8 * BS)
    status, sense, _ = _write(lun, emu, 16, other)
    assert (status, sense) == (0, None)
    assert vol._images[1].state is ImageState.FAILED
    assert vol._images[1].bitmap.all_dirty(16 * BS, 8 * BS)
    assert _write(lun, emu, 24, new) == (0, None, False)
    with open(paths[0], "rb") as f:
        image = f.read()
    assert image[8 * BS:32 * BS] == new + other + new
    assert _read(emu, 16, 8) == other


@pytest.mark.parametrize("mode", ["no-lease", "lease", "lease-loop"])
def test_a_one_image_write_refused_once_leaves_a_journal_line(lab, tmp_path, monkeypatch,
                                                              caplog, mode):
    """A one-image LUN's compiled WRITE refused once and made by the worker pool: GOOD, the
    data lands, and the refusal is logged (the image is not failed: it is the only one).
    Without the ring thread's lease ``run_batch`` answers EIO; under it ``lease_batch`` (each
    batch one call) or the compiled loop ``lease_serve`` writes to a read-only descriptor of
    the image once (EBADF), a real refusal."""
    import errno as _errno
    import logging
    lease = mode != "no-lease"
    monkeypatch.setattr(lunserver, "RING_LEASE", lease and lunserver.RING_LEASE)
    monkeypatch.setattr(lunserver, "LEASE_LOOP", mode == "lease-loop" and lunserver.LEASE_LOOP)
    if lease and not lunserver.RING_LEASE:
        pytest.skip("LVMIRROR_RING_LEASE=0")
    if mode == "lease-loop" and not lunserver.LEASE_LOOP:
        pytest.skip("LVMIRROR_LEASE_LOOP=0")
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 77)
    fired = []
    if not lease:
        real = fastread.run_batch

        def refuses(ring, data_off, map_size, packed, count, fds, rwf, kind):
            if kind and not fired and threading.current_thread().name.startswith("ring-"):
                fired.append(1)
                return (0, 0, _errno.EIO, 0)
            return real(ring, data_off, map_size, packed, count, fds, rwf, kind)
        monkeypatch.setattr(fastread, "run_batch", refuses)
        why = os.strerror(_errno.EIO)
    elif mode == "lease":
        real_lease = fastread.lease_batch
        ro = os.open(path, os.O_RDONLY)

        def refuses_once(*args):
            if not args[15] or fired:
                return real_lease(*args)
            r = real_lease(*args[:17] + ((ro,),) + args[18:])  # writes: to a read-only fd
            if r[5]:                                   # `err`: until a batch failed, once
                fired.append(1)
            return r
        monkeypatch.setattr(fastread, "lease_batch", refuses_once)
        rearm(lun, emu)                                 # armed again, with the spy
        why = os.strerror(_errno.EBADF)
    else:
        real_serve = fastread.lease_serve
        ro = os.open(path, os.O_RDONLY)

        def serves_refusing_once(*args):
            if fired:
                return real_serve(*args)
            w = args[12]                      # (max_write, max_commands, checks, hold, fds)
            r = real_serve(*args[:12] + (w[:4] + ((ro,),),) + args[13:])
            if r[2] is not None and r[2][5]:           # `last`: a batch that failed (err)
                fired.append(1)
            return r
        monkeypatch.setattr(fastread, "lease_serve", serves_refusing_once)
        rearm(lun, emu)                                 # armed again, with the spy
        why = os.strerror(_errno.EBADF)
    new = os.urandom(8 * BS)
    try:
        with caplog.at_level(logging.WARNING, logger="lvmirrord"):
            assert _write(lun, emu, 8, new)[:2] == (0, None)
    finally:
        if lease:
            os.close(ro)
    assert fired
    assert "a compiled WRITE of 8 blocks at LBA 8 failed on image" in caplog.text
    assert why in caplog.text
    with open(path, "rb") as f:
        f.seek(8 * BS)
        assert f.read(8 * BS) == new
    if lease:                          # the lease was given up for the pool's write, and back
        assert _write(lun, emu, 16, new)[:2] == (0, None)
        assert lun.leases >= 2


def _hold_the_pool(lun, monkeypatch):
    """Hold each command the worker pool makes until the returned ``gate`` is set
    (``entered`` is set when one arrives): (gate, entered)."""
    gate, entered = threading.Event(), threading.Event()
    real_execute = lun._execute

    def held(command):
        entered.set()
        assert gate.wait(30)
        real_execute(command)
    monkeypatch.setattr(lun, "_execute", held)
    return gate, entered


def test_a_leg_that_refuses_once_is_failed_though_the_write_again_succeeds(lab, tmp_path,
                                                                         monkeypatch):
    """Image 1 refuses one compiled write (EBADF: a read-only descriptor in its place) and takes
    writes again before the worker pool writes the command again (a device that erred once).
    The image is failed all the same, as the Python path fails an image whose write errs: an
    I/O error means the image may have lost what it held (md fails the disk too). Its change
    bitmap marks the command's range, and the command lands on image 0."""
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 76)
    vol = lun.volume
    assert _write(lun, emu, 8, os.urandom(8 * BS)) == (0, None, True)
    st = vol._images[1].storage
    saved = os.dup(st.fd)
    gate, entered = _hold_the_pool(lun, monkeypatch)
    ro = os.open(paths[1], os.O_RDONLY)
    try:
        os.dup2(ro, st.fd)
        other = os.urandom(8 * BS)
        wid = emu.submit(cdb10(0x2A, 16, 8), data_out=other)
        assert entered.wait(10)                   # refused: the pool will write it again
    finally:
        os.dup2(saved, st.fd)                     # the device answers again
        os.close(saved)
        os.close(ro)
    gate.set()
    assert emu.wait([wid])[wid].status == 0
    assert vol._images[1].state is ImageState.FAILED
    assert "Bad file descriptor" in vol._images[1].rec.error
    assert vol._images[1].bitmap.all_dirty(16 * BS, 8 * BS)
    with open(paths[0], "rb") as f:
        f.seek(16 * BS)
        assert f.read(8 * BS) == other


def test_a_split_waits_for_a_stalled_mirror_batch_and_keeps_its_write(lab, tmp_path,
                                                                      monkeypatch):
    """Split rules 1-3 with a compiled batch in flight: a mirror's WRITE batch stalls inside
    its write; a split of image 0 begun meanwhile waits for it (the batch entered the split
    epoch before it took its commands), while the LUN goes on answering (the watchdog handed
    the ring over). Once the write returns the split ends, and the split image holds the
    write begun before T; a WRITE after T goes to image 1 only, on the Python path (the split
    image's changes are tracked)."""
    monkeypatch.setattr(lunserver, "RING_LEASE", False)   # (its stall is run_batch's)
    from tests.unit.test_daemon_ring import _no_checkpoints
    monkeypatch.setattr(lunserver, "INLINE_BACKOFF", 0.0)
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 74)
    vol = lun.volume
    _no_checkpoints(vol)
    gate, entered = _stall_run_batch(monkeypatch)
    before = os.urandom(8 * BS)
    wid = emu.submit(cdb10(0x2A, 8, 8), data_out=before)
    assert entered.wait(10)
    t, box = run_thread(lambda: vol.split(0))
    time.sleep(0.5)
    assert t.is_alive()                           # waits for the batch begun before T
    tur = emu.submit(bytes(6))
    assert emu.wait([tur], timeout=10)[tur].status == 0
    assert lun.handovers == 1
    gate.set()
    assert emu.wait([wid], timeout=10)[wid].status == 0
    t.join(10)
    assert not t.is_alive() and "error" not in box
    assert vol._images[0].state is ImageState.SPLIT
    after = os.urandom(8 * BS)
    assert _write(lun, emu, 16, after) == (0, None, False)
    with open(paths[0], "rb") as f:
        split = f.read(24 * BS)
    with open(paths[1], "rb") as f:
        live = f.read(24 * BS)
    assert split == data[:8 * BS] + before + data[16 * BS:24 * BS]
    assert live == data[:8 * BS] + before + after


def test_a_mirror_batch_that_fails_keeps_its_log_marks_in_flight_until_written_again(
        lab, tmp_path, monkeypatch):
    """A mirror batch's write stops part way (a short write: it may have reached one leg and
    not the other, and no leg reported an error): its commands' write-intent log marks stay in
    flight - no checkpoint may clear them while the legs may differ - until the worker pool has
    written those commands again; then they end, and the data is on both images."""
    from tests.unit.test_daemon_ring import _no_checkpoints
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 75)
    vol = lun.volume
    _no_checkpoints(vol)
    wil = vol._wil
    real_run = fastread.run_batch

    def fails(ring, data_off, map_size, packed, count, fds, rwf, kind):
        if kind and threading.current_thread().name.startswith("ring-"):
            return (0, 0, 0, 1)
        return real_run(ring, data_off, map_size, packed, count, fds, rwf, kind)
    monkeypatch.setattr(fastread, "run_batch", fails)
    gate, entered = _hold_the_pool(lun, monkeypatch)
    new = os.urandom(8 * BS)
    wid = emu.submit(cdb10(0x2A, 8, 8), data_out=new)
    assert entered.wait(10)
    assert wil._inflight.get(0, 0) >= 1            # chunk 0: the batch's mark, in flight
    assert wil.clean(wil.ticket()) == 0 and wil.bitmap.all_dirty(8 * BS, 8 * BS)
    gate.set()
    assert emu.wait([wid])[wid].status == 0
    deadline = time.monotonic() + 10
    while wil._inflight.get(0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not wil._inflight.get(0, 0)
    for p in paths:
        with open(p, "rb") as f:
            f.seek(8 * BS)
            assert f.read(8 * BS) == new


def test_a_mirrors_write_the_python_path_bounds_by_leg_timeout_is_not_compiled(lab, tmp_path,
                                                                              monkeypatch):
    """A mirror's WRITE of PARALLEL_MIN_BYTES (128 KiB) or more is written to the legs in
    parallel by the Python path, and a leg still busy ``leg_timeout`` seconds after another
    finished is failed as slow; the compiled batch writes the legs one after the other with no
    bound. Such a WRITE stays the Python path's (COMPILED_MIRROR_WRITE_MAX) while a one-image
    volume's are compiled up to 1 MiB: with the 1 MiB limit for both, a 256 KiB WRITE waited
    for a stalled leg as long as it stalled (review of 2026-12-06, HIGH)."""
    fastread = pytest.importorskip("lvmirror.tcmu._fastread")
    monkeypatch.setattr(lunserver, "RING_LEASE", False)
    monkeypatch.setattr(lunserver, "INLINE_BACKOFF", 0.0)
    emu, lun, paths, data = _mirror_lun(lab, tmp_path, 381)
    vol = lun.volume
    from tests.unit.test_daemon_ring import _no_checkpoints
    _no_checkpoints(vol)
    n = (256 << 10) // BS
    assert vol.leg_timeout and vol._fanout_mode == "auto" and vol._parallel(256 << 10)
    assert _write(lun, emu, 0, os.urandom(n * BS))[0] == 0
    vol.leg_timeout = 0.3
    gate, entered = threading.Event(), threading.Event()
    real = fastread.run_batch

    def stuck(ring, data_off, map_size, packed, count, fds, rwf, kind):
        if kind and len(fds) == 2 and not entered.is_set():
            entered.set()
            gate.wait(2.0)
        return real(ring, data_off, map_size, packed, count, fds, rwf, kind)
    monkeypatch.setattr(fastread, "run_batch", stuck)
    try:
        status, _, compiled = _write(lun, emu, 0, os.urandom(n * BS))
    finally:
        gate.set()
    assert status == 0 and not compiled and not entered.is_set()
    small = os.urandom(64 << 10)                  # under the bound: compiled as before
    monkeypatch.setattr(fastread, "run_batch", real)
    assert _write(lun, emu, 0, small) == (0, None, True)
