"""The ring thread's compiled READ path (``lvmirror/tcmu/_fastread.c``): ``read_batch`` on a
ring the emulator fills byte for byte as the kernel does, then the real LunServer with it - the
data, the ring's cursors and ids, every command it must leave to the SCSI core, and the
conditions (split, failed image, region locks, held completions, unit attentions) under which
it must not answer."""

import contextlib
import inspect
import os
import random
import time

import pytest

from lvmirror.daemon import lunserver
from lvmirror.errors import ImageIOError
from lvmirror.mirror.volume import ImageState
from lvmirror.scsi import parse_sense
from lvmirror.tcmu import abi
from lvmirror.tcmu.emulator import RingEmulator
from lvmirror.tcmu.ring import CommandRing

from tests.unit.test_daemon_ring import BS, SIZE, _lun_with_data, cdb10, images, lab  # noqa: F401
from tests.unit.test_volume_helpers import drop_page_cache

fastread = pytest.importorskip("lvmirror.tcmu._fastread",
                               reason="the compiled module is not built (tools/bootstrap)")

NOWAIT = getattr(os, "RWF_NOWAIT", 0x8)


def cdb16(op, lba, n, b1=0, control=0):
    return bytes([op, b1]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes([0, control])


class Obj:
    """A plain object to hang the conditions on."""


@contextlib.contextmanager
def ring_on_image(tmp_path, flags, seed):
    """(emulator, CommandRing, image fd opened with ``flags``, image path, image bytes): a
    1 MiB image file of random bytes (``seed``), and a ring that is not a whole number of
    entries long (the emulator pads at its end)."""
    data = random.Random(seed).randbytes(1 << 20)
    path = tmp_path / "img"
    path.write_bytes(data)
    fd = os.open(path, flags)
    emu = RingEmulator(cmdr_size=(16 << 10) - 168, data_size=1 << 20)
    r = CommandRing(emu.map, map_size=emu.map_size)
    try:
        yield emu, r, fd, path, data
    finally:
        r.close()
        emu.close()
        os.close(fd)


@pytest.fixture
def ring(tmp_path):
    """(emulator, CommandRing, image fd, image bytes): read through the page cache."""
    with ring_on_image(tmp_path, os.O_RDONLY, 7) as (emu, r, fd, _, data):
        yield emu, r, fd, data


def batch(r, fd, *, rwf=0, num_blocks=(1 << 20) // BS, max_bytes=64 << 10, max_blocks=2048,
          checks=(), busy=()):
    return r.fast_reads(fastread.read_batch, fd, rwf, num_blocks, BS, max_bytes, max_blocks,
                        checks, busy)


class Unlocked(tuple):
    """What ``unlocked`` returns: (answered, nbytes, why, err), and in ``rest`` the commands
    it took and did not answer, as the Commands the LUN gives its worker pool."""
    rest: list = []


def unlocked(r, fds, writes, *, rwf=0, num_blocks=(1 << 20) // BS, max_bytes=64 << 10,
             max_blocks=2048, max_commands=64, checks=(), busy=(), other_bytes=0):
    """One unlocked batch as ``LunServer._unlocked_batch`` makes it, without the LUN:
    ``_fastread.take_batch`` (``CommandRing.take_fast``), ``run_batch`` on the descriptors
    ``fds`` (an int: one), ``complete_batch``; ``why`` is STOP_MISS/STOP_MISS_WRITE when one
    was not done whole and STOP_BUSY when ``busy`` held at completion."""
    from lvmirror.tcmu import _fastread as fastread
    fds = (fds,) if isinstance(fds, int) else tuple(fds)
    taken, why, packed, _, _ = r.take_fast(fastread.take_batch, num_blocks, BS, max_bytes,
                                     max_blocks, max_commands, checks, busy, writes,
                                     other_bytes)
    completed = nbytes = err = 0
    rest = []
    if taken:
        done, nbytes, err, _ = r.run_taken(fastread.run_batch, packed, taken, fds, rwf,
                                           writes)
        completed, nbytes = r.complete_taken(fastread.complete_batch, packed, done, busy)
        if done < taken:
            why = fastread.STOP_MISS_WRITE if writes else fastread.STOP_MISS
        if completed < done:
            why = fastread.STOP_BUSY
        rest = r.taken_commands(packed, completed)
    out = Unlocked((completed, nbytes, why, err))
    out.rest = rest
    return out


def reap(emu, ids):
    """What the kernel side sees once told: {cmd_id: Completion}."""
    emu.reap()
    return {i: emu.completions[i] for i in ids if i in emu.completions}


def test_reads_are_answered_with_the_image_bytes_and_the_cursors_move(ring):
    emu, r, fd, data = ring
    ids = [emu.submit(cdb10(0x28, 8, 8), data_in_len=8 * BS),
           emu.submit(cdb16(0x88, 100, 1), data_in_len=BS),
           emu.submit(cdb10(0x28, 0, 128), data_in_len=128 * BS)]   # 16 data blocks apart
    n, nbytes, why = batch(r, fd)
    assert (n, nbytes, why) == (3, 137 * BS, fastread.STOP_HEAD)
    assert r.tail == r.head and r.outstanding == 0
    assert r.stats["fetched"] == r.stats["completed"] == 3
    assert not r.fetch()                      # nothing left for the Python path
    done = reap(emu, ids)
    assert [done[i].status for i in ids] == [0, 0, 0]
    assert done[ids[0]].data_in == data[8 * BS:16 * BS]
    assert done[ids[1]].data_in == data[100 * BS:101 * BS]
    assert done[ids[2]].data_in == data[:128 * BS]
    assert emu.warnings == []


@pytest.mark.parametrize("cdb, data_in_len", [
    (cdb10(0x28, 0, 8, b1=0x20), 8 * BS),                     # RDPROTECT: CHECK CONDITION
    (cdb10(0x28, 0, 8)[:9] + b"\x04", 8 * BS),                 # NACA: CHECK CONDITION
    (cdb10(0x28, (1 << 20) // BS - 4, 8), 8 * BS),             # past the end
    (cdb10(0x28, 0, 0), 0),                                    # no data: GOOD with none
    (cdb10(0x28, 0, 8), 16 * BS),                              # buffer longer than the transfer
    (cdb10(0x28, 0, 200), 200 * BS),                           # more than max_bytes
    (bytes([0x08, 0, 0, 0, 8, 0]), 8 * BS),                    # READ(6): the SCSI core's
    (cdb10(0x2A, 0, 8), None),                                 # a WRITE
    (bytes([0x12, 0, 0, 0, 36, 0]), 36),                       # INQUIRY
])
def test_commands_it_does_not_answer_are_left_intact_for_the_python_fetch(ring, cdb, data_in_len):
    emu, r, fd, _ = ring
    kw = {"data_out": bytes(8 * BS)} if data_in_len is None else {"data_in_len": data_in_len}
    cid = emu.submit(cdb, **kw)
    after = emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)
    # (a WRITE it may not answer either, but a WRITE batch may: it says so)
    assert batch(r, fd) == (0, 0, fastread.STOP_WRITE if cdb[0] == 0x2A else fastread.STOP_OTHER)
    assert r.tail == 0
    got = r.fetch().commands
    assert [(c.cmd_id, c.cdb) for c in got] == [(cid, cdb), (after, cdb10(0x28, 0, 1))]


def test_it_stops_at_the_first_command_it_does_not_answer(ring):
    emu, r, fd, data = ring
    first = emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)
    write = emu.submit(cdb10(0x2A, 0, 1), data_out=b"w" * BS)
    later = emu.submit(cdb10(0x28, 1, 1), data_in_len=BS)
    assert batch(r, fd) == (1, BS, fastread.STOP_WRITE)
    assert [c.cmd_id for c in r.fetch().commands] == [write, later]
    assert reap(emu, [first])[first].data_in == data[:BS]


def test_with_commands_outstanding_it_completes_at_the_tail_as_out_of_order_completion_wants(
        ring):
    """A WRITE fetched by the Python path is still running (outstanding): a READ after it is
    answered first, in the WRITE's entry at cmd_tail with the READ's id (CAP_OOOC); the WRITE's
    completion then takes the next CMD entry. The kernel sees both ids with their own status."""
    emu, r, fd, data = ring
    write = emu.submit(cdb10(0x2A, 0, 1), data_out=b"w" * BS)
    (cmd,) = r.fetch().commands
    read = emu.submit(cdb10(0x28, 3, 1), data_in_len=BS)
    assert batch(r, fd) == (1, BS, fastread.STOP_HEAD)
    assert r.outstanding == 1 and r.tail != r.head
    done = reap(emu, [read, write])
    assert list(done) == [read] and done[read].status == 0
    assert done[read].data_in == data[3 * BS:4 * BS]
    r.complete(cmd.cmd_id, 0)
    assert r.tail == r.head and r.outstanding == 0
    assert reap(emu, [write])[write].status == 0
    assert emu.warnings == []


def test_pads_and_wrapping_round_the_ring_many_times(ring):
    emu, r, fd, data = ring
    rnd = random.Random(3)
    seen = 0
    for _ in range(300):
        want = {}
        for _ in range(rnd.randrange(1, 6)):
            lba, n = rnd.randrange(2000), rnd.randrange(1, 17)
            want[emu.submit(cdb10(0x28, lba, n), data_in_len=n * BS)] = (lba, n)
        n, _, why = batch(r, fd)
        assert (n, why) == (len(want), fastread.STOP_HEAD)
        done = reap(emu, list(want))
        for cid, (lba, k) in want.items():
            assert done[cid].data_in == data[lba * BS:(lba + k) * BS]
        seen += len(want)
    assert r.stats["pads"] > 0 and r.stats["completed"] == seen
    assert r.tail == r.head and emu.warnings == []


def test_a_task_management_entry_is_left_to_the_python_fetch(ring):
    emu, r, fd, _ = ring
    cid = emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)
    emu.submit_tmr(abi.TmrType.ABORT_TASK, [99])
    assert batch(r, fd) == (1, BS, fastread.STOP_OTHER)
    assert r.fetch().aborts == [[99]]
    assert reap(emu, [cid])[cid].status == 0


def test_a_read_it_cannot_serve_from_memory_is_left_whole_to_the_python_path(ring, tmp_path):
    emu, r, fd, _ = ring
    cid = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
    assert batch(r, -1) == (0, 0, fastread.STOP_MISS)                # EBADF
    # not in the page cache (RWF_NOWAIT: EAGAIN), where the file system supports the flag
    path = tmp_path / "cold"
    path.write_bytes(os.urandom(1 << 20))
    cold = os.open(path, os.O_RDONLY)
    try:
        for _ in range(50):
            drop_page_cache([str(path)])
            n, _, why = batch(r, cold, rwf=NOWAIT)
            if why == fastread.STOP_MISS:
                break
            assert n == 0
        else:
            pytest.skip("the page cache kept the file, or the file system ignores RWF_NOWAIT")
    finally:
        os.close(cold)
    assert r.tail == 0 and [c.cmd_id for c in r.fetch().commands] == [cid]


def test_conditions_are_read_from_the_objects_when_it_starts(ring):
    emu, r, fd, _ = ring
    o = Obj()
    o.state, o.locks, o.fd = "in-sync", {}, 7
    checks = ((o, "state", fastread.CHECK_IS, o.state), (o, "fd", fastread.CHECK_EQ, 7))
    busy = ((o, "locks", fastread.CHECK_FALSY, None),)
    cid = emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)
    o.state = "failed"                          # changed after the arguments were made
    assert batch(r, fd, checks=checks, busy=busy) == (0, 0, fastread.STOP_STALE)
    o.state = checks[0][3]
    o.fd = 1 << 70                               # an equal check compares the values
    assert batch(r, fd, checks=checks, busy=busy) == (0, 0, fastread.STOP_STALE)
    o.fd = int("7")
    o.locks[object()] = None                     # a region lock held
    assert batch(r, fd, checks=checks, busy=busy) == (0, 0, fastread.STOP_BUSY)
    assert batch(r, fd, checks=((o, "gone", fastread.CHECK_IS, None),)) == (
        0, 0, fastread.STOP_STALE)
    o.locks.clear()
    assert batch(r, fd, checks=checks, busy=busy) == (1, BS, fastread.STOP_HEAD)
    assert reap(emu, [cid])[cid].status == 0


def test_a_condition_whose_truth_would_run_python_code_does_not_hold(ring):
    """``read_batch`` holds the GIL and runs no Python code: a value of a type that is not a
    builtin (its ``__bool__`` could run anything, release the GIL) fails a "false" check, and
    its ``__bool__`` is never called."""
    emu, r, fd, _ = ring
    called = []

    class Sneaky:
        def __bool__(self):
            called.append(1)
            return False

    o = Obj()
    o.held = Sneaky()
    emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)
    assert batch(r, fd, busy=((o, "held", fastread.CHECK_FALSY, None),)) == (
        0, 0, fastread.STOP_BUSY)
    assert called == []


def test_malformed_arguments_raise_and_touch_nothing(ring):
    emu, r, fd, _ = ring
    emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)
    with pytest.raises(ValueError):
        fastread.read_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size + 4096, 0,
                            fd, 0, 100, BS, 4096, 8, (), ())
    with pytest.raises(ValueError):
        fastread.read_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size, 4,
                            fd, 0, 100, BS, 4096, 8, (), ())
    with pytest.raises(ValueError):        # a ring whose size is not a whole number of 8 bytes
        fastread.read_batch(r._mv, r.cmdr_off, r.cmdr_size - 4, r.data_off, r.map_size, 0,
                            fd, 0, 100, BS, 4096, 8, (), ())
    with pytest.raises(TypeError):
        fastread.read_batch(r._mv, r.cmdr_off, r.cmdr_size, r.data_off, r.map_size, 0,
                            fd, 0, 100, BS, 4096, 8, ((1, 2),), ())
    with pytest.raises(TypeError):
        fastread.read_batch(bytes(r.map_size), r.cmdr_off, r.cmdr_size, r.data_off,
                            r.map_size, 0, fd, 0, 100, BS, 4096, 8, (), ())
    assert r.tail == 0 and len(r.fetch().commands) == 1


# -- the LunServer -----------------------------------------------------------------------------

def _compiled(lun, emu, lba, n, timeout=10.0):
    """READ ``n`` blocks at ``lba`` through the ring; (data, whether the compiled path answered
    it)."""
    before = lun.compiled
    cid = emu.submit(cdb10(0x28, lba, n), data_in_len=n * BS)
    c = emu.wait([cid], timeout)[cid]
    assert c.status == 0, parse_sense(c.sense)
    return c.data_in, lun.compiled > before


def _require_compiled(lun, emu, data, tmp_path):
    got, compiled = _compiled(lun, emu, 0, 8)
    assert got == data[:8 * BS]
    if not compiled:
        pytest.skip(f"{tmp_path}: no reads from memory on this file system")


def test_the_lun_answers_cached_reads_on_the_compiled_path_and_counts_them(lab, tmp_path):
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 21)
    _require_compiled(lun, emu, data, tmp_path)
    io0 = dict(lun.volume.stats)
    img0 = dict(lun.volume._images[0].storage.stats)
    hist0 = lun.latency.snapshot()["read"]["count"]
    c0, i0 = lun.compiled, lun.inline
    rids = [emu.submit(cdb10(0x28, 8 * k, 8), data_in_len=8 * BS) for k in range(8)]
    done = emu.wait(rids)
    assert [done[i].data_in for i in rids] == [data[8 * k * BS:8 * (k + 1) * BS]
                                               for k in range(8)]
    n = lun.compiled - c0
    assert n > 0 and lun.inline - i0 == 8          # the rest of them on the Python path
    io = lun.volume.stats
    assert io["reads"] - io0["reads"] == 8
    assert io["bytes_read"] - io0["bytes_read"] == 64 * BS
    st = lun.volume._images[0].storage.stats
    assert st["reads"] - img0["reads"] >= n       # the compiled path reads image 0 only
    assert lun.latency.snapshot()["read"]["count"] - hist0 == 8


def test_after_a_split_of_its_image_it_reads_the_survivor(lab, tmp_path):
    """The compiled path reads the first in-sync image. Split that one off: a write after T
    goes to the other image only, and the READ after it must return it - from the survivor,
    never from the frozen split image (a stale image is never read)."""
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 22)
    _require_compiled(lun, emu, data, tmp_path)
    lun.volume.split(0)
    assert lun.volume._images[0].state is ImageState.SPLIT
    new = os.urandom(8 * BS)
    wid = emu.submit(cdb10(0x2A, 0, 8), data_out=new)
    assert emu.wait([wid])[wid].status == 0
    for _ in range(3):
        got, compiled = _compiled(lun, emu, 0, 8)
        assert got == new
    assert compiled
    assert open(paths[0], "rb").read(8 * BS) == data[:8 * BS]     # the split image kept T


def test_after_its_image_fails_it_reads_the_survivor(lab, tmp_path):
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 23)
    _require_compiled(lun, emu, data, tmp_path)
    vol = lun.volume
    img = vol._images[0]
    vol._image_error(img, ImageIOError(img.storage, 5, "injected", op="write", offset=0,
                                       length=BS), 0, BS)
    assert img.state is ImageState.FAILED
    new = os.urandom(8 * BS)
    wid = emu.submit(cdb10(0x2A, 16, 8), data_out=new)
    assert emu.wait([wid])[wid].status == 0
    got, compiled = _compiled(lun, emu, 16, 8)
    assert got == new and compiled
    assert open(paths[0], "rb").read()[16 * BS:24 * BS] == data[16 * BS:24 * BS]


def test_a_held_region_lock_keeps_the_compiled_path_out(lab, tmp_path):
    """A lock anywhere (a write in flight, a D-Bus client's lock) keeps the compiled path from
    answering: a READ of the held range waits for it (region lock manager), one elsewhere is
    answered by the Python path."""
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 24)
    _require_compiled(lun, emu, data, tmp_path)
    hold = lun.volume.locks.lock(0, 8)
    try:
        got, compiled = _compiled(lun, emu, 32, 8)
        assert got == data[32 * BS:40 * BS] and not compiled
        rid = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
        time.sleep(0.3)
        assert rid not in emu.completions
    finally:
        hold.release()
    assert emu.wait([rid])[rid].data_in == data[:8 * BS]
    assert _compiled(lun, emu, 32, 8) == (data[32 * BS:40 * BS], True)


def test_held_completions_are_not_answered_by_the_compiled_path(lab, tmp_path):
    """While a consistency group's split holds the LUN's completions, a READ is done but the
    initiator is not told until the release."""
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 25)
    _require_compiled(lun, emu, data, tmp_path)
    lun.hold(max_seconds=5)
    try:
        c0 = lun.compiled
        rid = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
        time.sleep(0.3)
        assert rid not in emu.completions and lun.compiled == c0
    finally:
        lun.release()
    assert emu.wait([rid])[rid].data_in == data[:8 * BS]


def test_a_pending_unit_attention_is_reported_first(lab, tmp_path):
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 26)
    _require_compiled(lun, emu, data, tmp_path)
    lun.lu.capacity_changed()
    cid = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
    c = emu.wait([cid])[cid]
    assert parse_sense(c.sense) == (6, 0x2A, 0x09)         # CAPACITY DATA HAS CHANGED
    assert _compiled(lun, emu, 0, 8) == (data[:8 * BS], True)


def test_it_can_be_turned_off(lab, tmp_path, monkeypatch):
    monkeypatch.setattr(lunserver, "COMPILED_READS", False)
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 28)
    for k in range(4):
        assert _compiled(lun, emu, 8 * k, 8) == (data[8 * k * BS:8 * (k + 1) * BS], False)
    assert lun.compiled == 0


def test_every_condition_names_a_plain_attribute(lab, tmp_path):
    """``read_batch`` reads its conditions with a plain attribute lookup, which runs no Python
    code only for instance attributes and slots: none of them may be a property (or any
    descriptor written in Python) on its object's class."""
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 29)
    armed = lun._arm_compiled()
    assert armed is not None
    checks, busy = armed.checks, armed.busy
    assert len(checks) >= 15 and len(busy) == 3
    for obj, name, _, _ in checks + busy:
        static = inspect.getattr_static(type(obj), name, None)
        assert static is None or type(static).__name__ == "member_descriptor", (type(obj), name)
        assert name in getattr(obj, "__dict__", {}) or static is not None, (type(obj), name)


def test_a_failure_of_the_compiled_path_leaves_every_read_to_the_python_path(lab, tmp_path,
                                                                          monkeypatch, caplog):
    """Should the compiled path ever raise (a bug), the ring thread logs it once and the Python
    path answers every READ from then on: the LUN keeps serving."""
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 30)

    def broken(*args):
        raise ValueError("ring geometry or fetch cursor out of range")

    monkeypatch.setattr(fastread, "read_batch", broken)
    for k in range(3):
        assert _compiled(lun, emu, 8 * k, 8) == (data[8 * k * BS:8 * (k + 1) * BS], False)
    assert lun._compiled_off
    assert sum("compiled READ/WRITE path failed" in r.getMessage() for r in caplog.records) == 1


def test_a_check_with_a_mode_that_is_not_an_int_raises_type_error(ring):
    emu, r, fd, _ = ring
    o = Obj()
    o.x = None
    with pytest.raises(TypeError):
        batch(r, fd, checks=((o, "x", "is", None),))
    assert r.tail == 0


@pytest.mark.parametrize("compiled", [True, False])
def test_an_abort_of_a_command_already_answered_never_aborts_the_next_one_with_its_id(
        lab, tmp_path, monkeypatch, compiled):
    """The kernel queues ABORT TASK for a READ the ring thread has answered already (the
    compiled path answers it before the Python fetch sees the TMR): nothing is left to abort,
    and the next command the kernel gives the same id (it hands out the lowest free one) runs
    and is answered as usual, not TASK ABORTED (found by a trial). The Python path alone: the
    READ is aborted or answered, and again the reused id runs."""
    from lvmirror.tcmu import abi
    monkeypatch.setattr(lunserver, "COMPILED_READS", compiled)
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 41)
    if compiled:
        _require_compiled(lun, emu, data, tmp_path)
    with emu._lock:            # a READ and the kernel's ABORT TASK for it, queued together
        a = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
        emu.submit_tmr(abi.TmrType.ABORT_TASK, [a])
    c = emu.wait([a])[a]
    assert c.status in (0, 0x40)             # GOOD, or TASK ABORTED if it had not run
    time.sleep(0.2)
    assert lun._aborted == set()
    with emu._lock:
        emu.completions.pop(a)
    new = bytes([0x5A]) * 8 * BS
    w = emu.submit(cdb10(0x2A, 32, 8), data_out=new, cmd_id=a)
    assert emu.wait([w])[w].status == 0
    got, _ = _compiled(lun, emu, 32, 8)
    assert got == new


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("op", [0x28, 0x2A])
def test_an_abort_never_catches_a_command_queued_after_it_with_a_reused_id(
        lab, tmp_path, monkeypatch, compiled, op):
    """The kernel wrote ABORT TASK for command ``a`` before it saw ``a``'s completion, then
    freed the id and gave it to the next command: the ring holds [TMR(a), CMD(a)] and one
    fetch finds both. The TMR names only commands queued before it, so the new command runs
    (found by a trial; before, it got TASK ABORTED)."""
    from lvmirror.tcmu import abi
    monkeypatch.setattr(lunserver, "COMPILED_READS", compiled)
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 42)
    a = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
    assert emu.wait([a])[a].status == 0
    new = bytes([0x5A]) * 8 * BS
    with emu._lock:
        emu.submit_tmr(abi.TmrType.ABORT_TASK, [a])
        emu.completions.pop(a)
        if op == 0x2A:
            w = emu.submit(cdb10(0x2A, 32, 8), data_out=new, cmd_id=a)
        else:
            w = emu.submit(cdb10(0x28, 32, 8), data_in_len=8 * BS, cmd_id=a)
    c = emu.wait([w])[w]
    assert c.status == 0
    assert c.data_in == (data[32 * BS:40 * BS] if op == 0x28 else b"")
    assert lun._aborted == set()
    if op == 0x2A:
        assert _compiled(lun, emu, 32, 8)[0] == new
