"""The compiled path for large transfers (``lvmirror/tcmu/_fastread.c``): ``read_batch`` stopping
at a READ over its size for an unlocked READ batch (``take_batch``, ``run_batch`` without the
GIL, ``complete_batch``); the iovec pool and
byte cap of one unlocked batch, on a ring the emulator fills
byte for byte as the kernel does or on entries built by hand; then the real LunServer with it -
1 MiB READs of a mirror (1 MiB WRITEs stay the Python path's), the shared region lock and
epoch the READs are made under, and the conditions (a write in flight, a split) under which it
must not answer."""

import errno
import os
import random
import struct
import time

import pytest

from lvmirror.mirror.volume import ImageState
from lvmirror.tcmu import abi
from lvmirror.tcmu.emulator import RingEmulator
from lvmirror.tcmu.ring import CommandRing
from tests.unit.test_compiled_reads import Obj, _compiled, _require_compiled, reap, ring_on_image, unlocked
from tests.unit.test_compiled_writes import _lock, _one_image_lun, _write
from tests.unit.test_daemon_ring import BS, _lun_with_data, cdb10, images, lab  # noqa: F401
from tests.unit.test_volume_helpers import make_volume, run_thread

fastread = pytest.importorskip("lvmirror.tcmu._fastread",
                               reason="the compiled module is not built (tools/bootstrap)")

MIB = 1 << 20


@pytest.fixture
def ring(tmp_path):
    """(emulator, CommandRing, image fd, image bytes): a 1 MiB image read through the page
    cache."""
    with ring_on_image(tmp_path, os.O_RDONLY, 41) as (emu, r, fd, _, data):
        yield emu, r, fd, data


def small_then_big(r, fd, big_bytes=MIB, write_bytes=0):
    """``read_batch`` with the GIL-held path's 64 KiB, READs up to ``big_bytes`` for an
    unlocked READ batch and WRITEs up to ``write_bytes`` for a WRITE batch (0: 64 KiB):
    (answered, nbytes, why)."""
    return r.fast_reads(fastread.read_batch, fd, 0, MIB // BS, BS, 64 << 10, 2048, (), (),
                        big_bytes, write_bytes)


def big(r, fd, *, num_blocks=MIB // BS, max_bytes=MIB, max_commands=64, checks=(), busy=()):
    """One unlocked READ batch (``unlocked``): (answered, nbytes, why, err), ``.rest``."""
    return unlocked(r, fd, False, num_blocks=num_blocks, max_bytes=max_bytes,
                    max_blocks=4 * MIB, max_commands=max_commands, checks=checks, busy=busy)


def iov_cnt(emu, pos):
    """The iovec count of the entry at ring offset ``pos``."""
    return struct.unpack_from("<I", emu.map, emu.cmdr_off + pos + 8)[0]


def test_read_batch_stops_at_a_large_read_and_a_read_batch_answers_it_and_those_after(ring):
    emu, r, fd, data = ring
    ids = [emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS),
           emu.submit(cdb10(0x28, 16, 512), data_in_len=512 * BS),      # 256 KiB: over 64 KiB
           emu.submit(cdb10(0x28, 1000, 8), data_in_len=8 * BS)]
    assert small_then_big(r, fd) == (1, 8 * BS, fastread.STOP_BIG_READ)
    # without big_bytes it is an entry the GIL-held path does not answer, as before
    assert small_then_big(r, fd, big_bytes=0) == (0, 0, fastread.STOP_OTHER)
    assert big(r, fd) == (2, 520 * BS, fastread.STOP_HEAD, 0)
    assert r.tail == r.head and r.outstanding == 0 and not r.fetch()
    done = reap(emu, ids)
    assert [done[i].status for i in ids] == [0, 0, 0]
    assert done[ids[1]].data_in == data[16 * BS:528 * BS]
    assert done[ids[2]].data_in == data[1000 * BS:1008 * BS]


def test_a_1_mib_read_of_256_iovecs_is_answered_whole(ring):
    emu, r, fd, data = ring
    pos = r.head
    cid = emu.submit(cdb10(0x28, 0, MIB // BS), data_in_len=MIB)
    assert iov_cnt(emu, pos) == fastread.MAX_IOVECS == 256     # the emulator scatters its blocks
    assert small_then_big(r, fd) == (0, 0, fastread.STOP_BIG_READ)
    assert big(r, fd) == (1, MIB, fastread.STOP_HEAD, 0)
    assert reap(emu, [cid])[cid].data_in == data


def test_a_read_batch_stops_at_a_write_and_when_it_is_full(ring):
    emu, r, fd, data = ring
    first = emu.submit(cdb10(0x28, 0, 256), data_in_len=256 * BS)
    second = emu.submit(cdb10(0x28, 256, 256), data_in_len=256 * BS)
    write = emu.submit(cdb10(0x2A, 0, 1), data_out=b"w" * BS)
    assert big(r, fd, max_commands=1) == (1, 256 * BS, fastread.STOP_BIG_READ, 0)
    assert big(r, fd) == (1, 256 * BS, fastread.STOP_WRITE, 0)
    assert [c.cmd_id for c in r.fetch().commands] == [write]
    done = reap(emu, [first, second])
    assert done[first].data_in == data[:256 * BS] and done[second].data_in == data[256 * BS:512 * BS]


@pytest.mark.parametrize("cdb, data_in_len", [
    (cdb10(0x28, 0, 8, b1=0x20), 8 * BS),                     # RDPROTECT: CHECK CONDITION
    (cdb10(0x28, 0, 8)[:9] + b"\x04", 8 * BS),                 # NACA
    (cdb10(0x28, MIB // BS - 4, 8), 8 * BS),                   # past the end
    (cdb10(0x28, 0, 0), 0),                                    # no data
    (cdb10(0x28, 0, 8), 16 * BS),                              # buffer longer than the transfer
    (cdb10(0x28, 0, 1024), 1024 * BS),                         # more than its max_bytes
])
def test_reads_it_does_not_answer_are_left_intact(ring, cdb, data_in_len):
    emu, r, fd, _ = ring
    cid = emu.submit(cdb, data_in_len=data_in_len)
    assert big(r, fd, max_bytes=256 * BS) == (0, 0, fastread.STOP_OTHER, 0)
    assert r.tail == 0 and [(c.cmd_id, c.cdb) for c in r.fetch().commands] == [(cid, cdb)]


def test_a_read_not_served_whole_is_left_to_the_python_path_after_those_before_it(ring):
    emu, r, fd, data = ring
    cid = emu.submit(cdb10(0x28, 0, 512), data_in_len=512 * BS)
    got = big(r, -1)
    assert got == (0, 0, fastread.STOP_MISS, errno.EBADF)
    assert r.tail == 0 and r.outstanding == 1 and not r.fetch()
    # taken, so it is the Python path's as a Command: its CDB and Data-In views, from the copy
    (c,) = got.rest
    assert (c.cmd_id, c.cdb, c.data_len) == (cid, cdb10(0x28, 0, 512), 512 * BS)
    assert sum(len(v) for v in c.iov_views) == 512 * BS


def test_its_conditions_are_read_when_it_starts(ring):
    emu, r, fd, _ = ring
    o = Obj()
    o.epoch, o.held = 3, None
    cid = emu.submit(cdb10(0x28, 0, 512), data_in_len=512 * BS)
    assert big(r, fd, checks=((o, "epoch", fastread.CHECK_EQ, 4),)) == (
        0, 0, fastread.STOP_STALE, 0)
    o.held = [1]
    assert big(r, fd, busy=((o, "held", fastread.CHECK_FALSY, None),)) == (
        0, 0, fastread.STOP_BUSY, 0)
    o.held = []
    assert big(r, fd, checks=((o, "epoch", fastread.CHECK_EQ, 3),),
               busy=((o, "held", fastread.CHECK_FALSY, None),)) == (
        1, 512 * BS, fastread.STOP_HEAD, 0)
    assert reap(emu, [cid])[cid].status == 0


def test_one_batch_takes_at_most_1024_iovecs(tmp_path):
    """Five scattered 1 MiB READs (256 iovecs each): four fit one batch's iovec pool, the
    fifth is the next call's."""
    data = random.Random(43).randbytes(8 * MIB)
    path = tmp_path / "img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    emu = RingEmulator(cmdr_size=(64 << 10) - 168, data_size=8 * MIB)
    r = CommandRing(emu.map, map_size=emu.map_size)
    try:
        ids, cnt = [], []
        for k in range(5):
            pos = r.head
            ids.append(emu.submit(cdb10(0x28, k * 2048, 2048), data_in_len=MIB))
            cnt.append(iov_cnt(emu, pos))
        assert cnt == [256] * 5
        nblk = 8 * MIB // BS
        assert big(r, fd, num_blocks=nblk) == (4, 4 * MIB, fastread.STOP_BIG_READ, 0)
        assert big(r, fd, num_blocks=nblk) == (1, MIB, fastread.STOP_HEAD, 0)
        done = reap(emu, ids)
        assert [done[i].data_in for i in ids] == [data[k * MIB:(k + 1) * MIB] for k in range(5)]
    finally:
        r.close()
        emu.close()
        os.close(fd)


def _raw_read(emu, lba, nblk, iovecs, cmd_id):
    """Place a READ(16) entry built by hand (``iovecs``: (offset in the map, length)) on the
    ring; the emulator never reaps it (these tests do not reap)."""
    base = abi.cmd_entry_base_size(len(iovecs))
    cdb = bytes([0x88, 0]) + lba.to_bytes(8, "big") + nblk.to_bytes(4, "big") + bytes(2)
    size = base + abi.round_up(len(cdb), abi.OP_ALIGN_SIZE)
    ent = bytearray(size)
    e = abi.ENTRY
    e.cmd_id.put(ent, 0, cmd_id)
    e.iov_cnt.put(ent, 0, len(iovecs))
    if iovecs:
        abi.IOVEC.array(len(iovecs)).pack_into(ent, abi.ENTRY_IOV_OFFSET,
                                               *[x for iov in iovecs for x in iov])
    ent[base:base + len(cdb)] = cdb
    pos = emu.write_raw(bytes(ent), op_len=size | abi.OP_CMD)
    e.cdb_off.put(emu.map, emu.cmdr_off + pos, emu.cmdr_off + pos + base)   # where it landed
    return pos


def test_one_batch_takes_at_most_8_mib_and_a_command_at_most_256_iovecs(tmp_path):
    """Nine 1 MiB READs of one iovec each (all into the same data blocks: the module does not
    look at overlaps, only at the data area's bounds): eight fit one batch's 8 MiB, the ninth is
    the next call's. A READ of 257 iovecs is the Python path's, however small."""
    data = random.Random(44).randbytes(16 * MIB)
    path = tmp_path / "img"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    emu = RingEmulator(cmdr_size=(64 << 10) - 168, data_size=MIB)
    r = CommandRing(emu.map, map_size=emu.map_size)
    nblk = 16 * MIB // BS
    try:
        for k in range(9):
            _raw_read(emu, k * 2048, 2048, [(emu.data_off, MIB)], 100 + k)
        assert big(r, fd, num_blocks=nblk) == (8, 8 * MIB, fastread.STOP_BIG_READ, 0)
        assert big(r, fd, num_blocks=nblk) == (1, MIB, fastread.STOP_HEAD, 0)
        assert bytes(emu.map[emu.data_off:emu.data_off + MIB]) == data[8 * MIB:9 * MIB]
        _raw_read(emu, 0, 257, [(emu.data_off + BS * k, BS) for k in range(257)], 200)
        assert big(r, fd, num_blocks=nblk) == (0, 0, fastread.STOP_OTHER, 0)
        assert small_then_big(r, fd)[2] == fastread.STOP_OTHER
    finally:
        r.close()
        emu.close()
        os.close(fd)


def test_an_unlocked_write_batch_makes_1_mib_writes(tmp_path):
    with ring_on_image(tmp_path, os.O_RDWR, 45) as (emu, r, fd, path, _):
        new = os.urandom(MIB)
        cid = emu.submit(cdb10(0x2A, 0, MIB // BS), data_out=new)
        assert unlocked(r, fd, True, num_blocks=MIB // BS, max_bytes=MIB) == (
            1, MIB, fastread.STOP_HEAD, 0)
        assert reap(emu, [cid])[cid].status == 0
        assert path.read_bytes() == new


# -- the volume --------------------------------------------------------------------------------

def test_begin_fast_reads_holds_the_epoch_and_shares_each_commands_range(tmp_path):
    """What the unlocked READ batch reads inside: the split epoch entered (closing the volume
    - as a split or an image failure switching the epoch - waits for ``end_fast_reads``) and a
    SHARED region lock over the blocks its commands cover, or, when a write holds some of
    them, over each command's range (``lock_fast``: other reads run beside them, no write to
    them; a range a write holds is not granted)."""
    vol, _, _ = make_volume(tmp_path, 2)
    st = vol._images[0].storage
    write = vol.locks.lock(300, 8)                                   # a write in flight
    token = vol.begin_fast_reads()
    assert _lock(vol, token, [(0, 64), (100, 64), (296, 8), (500, 8)]) == 2
    write.release()
    assert vol.locks.try_lock(0, 1) is None                         # a write waits
    assert vol.locks.try_lock(163, 1) is None
    other = vol.locks.try_lock(5, 1, shared=True)                   # a read does not
    assert other is not None
    other.release()
    elsewhere = vol.locks.try_lock(64, 36)                          # nor a write elsewhere
    assert elsewhere is not None
    elsewhere.release()
    assert vol._epoch.inflight == 1
    second = vol.begin_fast_reads()                                  # nor another batch
    assert _lock(vol, second, [(0, 64)]) == 1
    vol.end_fast_reads(second, st, 0, 0)
    t, box = run_thread(vol.close)
    time.sleep(0.3)
    assert t.is_alive()                      # waits for the reads in flight
    s0, i0 = dict(vol.stats), dict(st.stats)
    vol.end_fast_reads(token, st, 3, 3 * MIB)
    t.join(10)
    assert not t.is_alive() and "error" not in box
    assert vol.stats["reads"] - s0["reads"] == 3
    assert vol.stats["bytes_read"] - s0["bytes_read"] == 3 * MIB
    assert st.stats["reads"] - i0["reads"] == 3
    assert not vol.locks._held


# -- the LunServer -----------------------------------------------------------------------------

def _mirror_lun_with_1_mib(lab, tmp_path, seed, nbytes=MIB):
    """A 2-image LUN whose first ``nbytes`` (1 MiB: 2,048 blocks; a whole number of MiB) hold
    random data written through the ring in 1 MiB WRITEs, read once through the compiled path's
    check (skips where the file system serves no read from memory): (emulator, LunServer, image
    paths, the data)."""
    emu, lun, paths, first = _lun_with_data(lab, tmp_path, seed)
    _require_compiled(lun, emu, first, tmp_path)
    data = random.Random(seed).randbytes(nbytes)
    for at in range(0, nbytes, MIB):
        wid = emu.submit(cdb10(0x2A, at // BS, MIB // BS), data_out=data[at:at + MIB])
        assert emu.wait([wid])[wid].status == 0
    return emu, lun, paths, data


def test_a_mirror_lun_answers_1_mib_cached_reads_on_the_compiled_path(lab, tmp_path):
    emu, lun, paths, data = _mirror_lun_with_1_mib(lab, tmp_path, 51)
    vol = lun.volume
    s0, i0 = dict(vol.stats), lun.inline
    got, compiled = _compiled(lun, emu, 0, MIB // BS)
    assert got == data and compiled
    assert lun.inline - i0 == 1
    assert vol.stats["reads"] - s0["reads"] == 1
    assert vol.stats["bytes_read"] - s0["bytes_read"] == MIB
    assert not vol.locks._held and vol._epoch.inflight == 0      # lock and epoch left


def test_the_lun_reads_large_commands_only_inside_begin_and_end_fast_reads(lab, tmp_path,
                                                                         monkeypatch):
    """Seen from inside ``run_batch`` (it runs with the GIL released, so any thread may
    look then): the command's blocks shared - a write's exclusive lock refused, a read's shared one
    granted - and the epoch entered; both left afterwards."""
    emu, lun, paths, data = _mirror_lun_with_1_mib(lab, tmp_path, 52)
    vol = lun.volume
    seen = []
    real = fastread.run_batch

    def spy(*args):
        shared = vol.locks.try_lock(7, 1, shared=True)
        if shared is not None:
            shared.release()
        seen.append((vol.locks.try_lock(7, 1) is None, shared is not None, vol._epoch.inflight))
        return real(*args)

    monkeypatch.setattr(fastread, "run_batch", spy)
    assert _compiled(lun, emu, 0, 1024) == (data[:1024 * BS], True)
    assert seen and all(s == (True, True, 1) for s in seen)
    assert not vol.locks._held and vol._epoch.inflight == 0


def test_a_write_in_flight_sends_large_reads_to_the_python_path(lab, tmp_path):
    """A region lock anywhere (a write in flight) refuses the shared lock over the volume:
    the READ is the Python path's and still right; once it is gone, compiled again."""
    emu, lun, paths, data = _mirror_lun_with_1_mib(lab, tmp_path, 53)
    hold = lun.volume.locks.lock(MIB // BS + 8, 8)
    try:
        assert _compiled(lun, emu, 0, 1024) == (data[:1024 * BS], False)
    finally:
        hold.release()
    assert _compiled(lun, emu, 0, 1024) == (data[:1024 * BS], True)


def test_after_a_split_of_its_image_large_reads_come_from_the_survivor(lab, tmp_path):
    emu, lun, paths, data = _mirror_lun_with_1_mib(lab, tmp_path, 54)
    assert _compiled(lun, emu, 0, 1024)[1]
    lun.volume.split(0)
    assert lun.volume._images[0].state is ImageState.SPLIT
    new = os.urandom(512 * BS)
    wid = emu.submit(cdb10(0x2A, 256, 512), data_out=new)
    assert emu.wait([wid])[wid].status == 0
    want = data[:256 * BS] + new + data[768 * BS:1024 * BS]
    for _ in range(3):
        got, compiled = _compiled(lun, emu, 0, 1024)
        assert got == want
    assert compiled
    with open(paths[0], "rb") as f:
        assert f.read(1024 * BS) == data[:1024 * BS]             # the split image kept T


@pytest.mark.parametrize("limit", [None, 256 << 10], ids=["1MiB", "256KiB"])
def test_a_one_image_lun_makes_writes_up_to_its_limit_compiled(lab, tmp_path, monkeypatch,
                                                                 limit):
    """The compiled path makes WRITEs up to COMPILED_WRITE_MAX (1 MiB, the READs' size too),
    also after a READ (the READ path hands a WRITE that size to the WRITE batch: it said
    STOP_OTHER for every WRITE over 64 KiB, so no larger WRITE was ever compiled); a larger
    one is the Python path's (here with the limit lowered to 256 KiB), and READ back from the
    compiled path."""
    from lvmirror.daemon import lunserver
    assert lunserver.COMPILED_WRITE_MAX == MIB
    if limit is not None:
        monkeypatch.setattr(lunserver, "COMPILED_WRITE_MAX", limit)
    emu, lun, path, _ = _one_image_lun(lab, tmp_path, 55)
    new = os.urandom(MIB)
    assert _compiled(lun, emu, 0, 64)[1]             # the READ path first (its lead kind)
    assert _write(lun, emu, 0, new) == (0, None, limit is None)
    with open(path, "rb") as f:
        assert f.read(MIB) == new
    assert _compiled(lun, emu, 0, MIB // BS) == (new, True)
    mid = os.urandom(256 << 10)
    assert _write(lun, emu, 0, mid) == (0, None, True)


class _HoldBegins:
    """A LUN whose completions become held while a batch's I/O runs: its ``_holding`` reads
    empty when the batch starts, and held when read again after the I/O (a property counts the
    reads; the LunServer's own attribute is a plain one)."""

    def __init__(self):
        self.reads = 0

    @property
    def held(self):
        self.reads += 1
        return [] if self.reads == 1 else [("cmd", 0)]


def test_a_hold_begun_during_the_reads_leaves_them_all_to_the_python_path(ring):
    emu, r, fd, data = ring
    ids = [emu.submit(cdb10(0x28, 0, 512), data_in_len=512 * BS),
           emu.submit(cdb10(0x28, 512, 512), data_in_len=512 * BS)]
    h = _HoldBegins()
    got = big(r, fd, busy=((h, "held", fastread.CHECK_FALSY, None),))
    assert got == (0, 0, fastread.STOP_BUSY, 0)      # both read, neither answered
    assert h.reads == 2 and r.tail == 0 and r.outstanding == 2
    assert [c.cmd_id for c in got.rest] == ids


def test_a_hold_begun_during_the_writes_leaves_them_all_to_the_python_path(tmp_path):
    with ring_on_image(tmp_path, os.O_RDWR, 46) as (emu, r, fd, path, _):
        new = os.urandom(8 * BS)
        cid = emu.submit(cdb10(0x2A, 0, 8), data_out=new)
        h = _HoldBegins()
        got = unlocked(r, fd, True, num_blocks=MIB // BS, max_bytes=MIB,
                       busy=((h, "held", fastread.CHECK_FALSY, None),))
        assert got == (0, 0, fastread.STOP_BUSY, 0)
        assert h.reads == 2 and r.tail == 0 and r.outstanding == 1
        # written once already; the Python path writes it again and completes it when released
        assert path.read_bytes()[:8 * BS] == new
        assert [c.cmd_id for c in got.rest] == [cid]


def test_a_write_over_the_write_batchs_size_stops_read_batch_for_the_python_fetch(ring):
    """read_batch parses up to the larger of the big READ and the WRITE batch's sizes; a
    WRITE over ``write_bytes`` (0: ``max_bytes``, 64 KiB) is neither function's, so it says
    STOP_OTHER - not STOP_WRITE, which would take the volume's epoch for a WRITE batch that
    makes nothing. One up to ``write_bytes`` is the WRITE batch's (STOP_WRITE): read_batch
    said STOP_OTHER for every WRITE over 64 KiB whatever the WRITE batch's size, so a larger
    COMPILED_WRITE_MAX made no WRITE compiled."""
    emu, r, fd, _ = ring
    emu.submit(cdb10(0x2A, 0, 256), data_out=os.urandom(256 * BS))       # 128 KiB
    assert small_then_big(r, fd) == (0, 0, fastread.STOP_OTHER)
    assert small_then_big(r, fd, write_bytes=MIB) == (0, 0, fastread.STOP_WRITE)
    assert small_then_big(r, fd, big_bytes=0, write_bytes=MIB) == (0, 0, fastread.STOP_WRITE)
    assert small_then_big(r, fd, write_bytes=64 << 10) == (0, 0, fastread.STOP_OTHER)
    assert r.tail == 0 and len(r.fetch().commands) == 1


def test_a_large_read_right_after_writes_is_the_read_paths(tmp_path):
    """A WRITE batch parses the other kind up to ``other_bytes``: a 1 MiB READ right after a
    WRITE stops it as a READ (7), for read_batch, which passes it to a READ batch (8) - not to
    the Python fetch (1), as it did when the WRITE batch parsed only up to its own 64 KiB. A
    WRITE over 64 KiB is still the Python fetch's."""
    with ring_on_image(tmp_path, os.O_RDWR, 47) as (emu, r, fd, path, _):
        new = os.urandom(8 * BS)
        w = emu.submit(cdb10(0x2A, 0, 8), data_out=new)
        rd = emu.submit(cdb10(0x28, 0, 512), data_in_len=512 * BS)
        assert unlocked(r, fd, True, num_blocks=MIB // BS, other_bytes=MIB) == (
            1, 8 * BS, fastread.STOP_READ, 0)
        assert small_then_big(r, fd) == (0, 0, fastread.STOP_BIG_READ)
        assert big(r, fd) == (1, 512 * BS, fastread.STOP_HEAD, 0)
        done = reap(emu, [w, rd])
        assert done[rd].data_in[:8 * BS] == new
        w2 = emu.submit(cdb10(0x2A, 8, 8), data_out=new)
        emu.submit(cdb10(0x2A, 0, 256), data_out=os.urandom(256 * BS))
        assert unlocked(r, fd, True, num_blocks=MIB // BS, other_bytes=MIB) == (
            1, 8 * BS, fastread.STOP_OTHER, 0)
        assert reap(emu, [w2])[w2].status == 0


def _queued(emu, r, cdbs):
    """Submit ``cdbs`` ((cdb, data_out or None, data_in_len) each) with the ring's lock held,
    so that the ring thread finds them all queued together; their ids."""
    with r._lock:
        return [emu.submit(cdb, data_out=out, data_in_len=n) for cdb, out, n in cdbs]


def test_a_mirror_answers_many_queued_large_reads_compiled_not_one_turn_each(lab, tmp_path):
    """Twenty 256 KiB READs queued together on a mirror (the Python loop's compiled turns):
    every one is the ring thread's own on the compiled path - not the Python fetch's and the
    worker pool's once COMPILED_TURNS (8) batches are made (a trial of smaller batches,
    2026-12-06, left 13 of them there). So are 4 KiB READs queued behind a 1 MiB one, and
    the kernel is told a few times, not once a READ."""
    emu, lun, _, data = _mirror_lun_with_1_mib(lab, tmp_path, 71, 5 * MIB)
    r = lun._ring
    c0, i0 = lun.compiled, lun.inline
    ids = _queued(emu, r, [(cdb10(0x28, k * 512, 512), None, 512 * BS) for k in range(20)])
    done = emu.wait(ids)
    assert [done[i].status for i in ids] == [0] * 20
    assert all(done[i].data_in == data[k * 512 * BS:(k + 1) * 512 * BS]
               for k, i in enumerate(ids))
    assert (lun.inline - i0, lun.compiled - c0) == (20, 20)
    n0, c0, i0 = emu.notifies, lun.compiled, lun.inline
    ids = _queued(emu, r, [(cdb10(0x28, 0, 2048), None, MIB)]
                  + [(cdb10(0x28, 2048 + 8 * k, 8), None, 8 * BS) for k in range(30)])
    done = emu.wait(ids)
    assert [done[i].status for i in ids] == [0] * 31
    assert done[ids[0]].data_in == data[:MIB]
    assert all(done[i].data_in == data[MIB + 8 * k * BS:MIB + 8 * (k + 1) * BS]
               for k, i in enumerate(ids[1:]))
    assert (lun.inline - i0, lun.compiled - c0) == (31, 31)
    assert emu.notifies - n0 <= 4, emu.notifies - n0


def test_a_mirrors_write_right_after_a_large_read_is_still_compiled(lab, tmp_path):
    """A WRITE queued right behind a 1 MiB READ on a mirror is the compiled WRITE path's, not
    the Python fetch's (a trial of one READ a batch, 2026-12-06: the next READ batch found the
    WRITE, took nothing and left it to the Python fetch)."""
    emu, lun, _, data = _mirror_lun_with_1_mib(lab, tmp_path, 72)
    r = lun._ring
    assert lun._fast is not None and lun._fast.wstorage is not None
    w0, i0 = lun.compiled_writes, lun.inline
    new = os.urandom(8 * BS)
    ids = _queued(emu, r, [(cdb10(0x28, 0, 2048), None, MIB),
                           (cdb10(0x2A, 4096, 8), new, 0)])
    done = emu.wait(ids)
    assert [done[i].status for i in ids] == [0, 0]
    assert done[ids[0]].data_in == data
    assert (lun.inline - i0, lun.compiled_writes - w0) == (2, 1)
    got, _ = _compiled(lun, emu, 4096, 8)
    assert got == new
