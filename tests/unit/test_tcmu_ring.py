"""CommandRing against the RingEmulator (the kernel's side, byte for byte)."""

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lvmirror.tcmu import abi
from lvmirror.tcmu.emulator import RingEmulator, RingFull
from lvmirror.tcmu.ring import CommandRing, RingError

READ10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
WRITE10 = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 8, 0])
TUR = bytes(6)


def make(cmdr_size=1000, data_size=1 << 20):
    emu = RingEmulator(cmdr_size=cmdr_size, data_size=data_size)
    return emu, CommandRing(emu.map, map_size=emu.map_size), emu.handle()


def test_layouts_match_the_kernel_header():
    assert abi.MAILBOX.size == 128
    assert abi.MAILBOX.cmd_tail.offset == 64 and abi.MAILBOX.cmd_head.offset == 12
    assert abi.ENTRY.size == 112 and abi.ENTRY.cdb_off.offset == 24
    assert abi.ENTRY.sense_buffer.offset == 16 and abi.ENTRY.read_len.offset == 12
    assert abi.cmd_entry_base_size(1) == 112 and abi.cmd_entry_base_size(5) == 128


def test_write_data_and_cdb_are_copied_and_data_out_visible():
    emu, ring, h = make()
    payload = bytes(range(256)) * 16
    cid = emu.submit(WRITE10, data_out=payload)
    (cmd,) = ring.fetch().commands
    assert cmd.cmd_id == cid and cmd.cdb == WRITE10
    assert b"".join(bytes(v) for v in cmd.iov_views) == payload
    ring.complete(cid, 0)
    h.notify()
    assert emu.reap()[cid].status == 0


def test_scattered_blocks_become_several_iovecs():
    emu, ring, _ = make()
    payload = bytes(random.Random(1).randbytes(5 * 4096))
    emu.submit(WRITE10, data_out=payload)
    (cmd,) = ring.fetch().commands
    assert len(cmd.iov_views) > 1
    assert b"".join(bytes(v) for v in cmd.iov_views) == payload


def test_out_of_order_completion_across_many_wraps_with_pads():
    emu, ring, h = make(cmdr_size=1000)      # not a multiple of the entry size: PADs
    rnd = random.Random(7)
    for _ in range(200):
        ids = []
        for _ in range(rnd.randint(1, 5)):
            try:
                ids.append(emu.submit(READ10, data_in_len=4096))
            except RingFull:
                break
        cmds = ring.fetch().commands
        assert [c.cmd_id for c in cmds] == ids
        rnd.shuffle(cmds)
        for c in cmds:
            c.iov_views[0][:] = struct.pack("<H", c.cmd_id) * 2048
            ring.complete(c.cmd_id, 0)
        h.notify()
        done = emu.reap()
        assert sorted(done) == sorted(ids)
        for cid in ids:
            assert done[cid].data_in == struct.pack("<H", cid) * 2048
    assert ring.stats["pads"] > 0
    assert emu.inflight == 0


def test_check_condition_sense_and_read_len():
    emu, ring, h = make()
    a = emu.submit(READ10, data_in_len=4096)
    b = emu.submit(TUR)
    ca, cb = ring.fetch().commands
    ca.iov_views[0][:100] = b"y" * 100
    sense = bytes([0x70, 0, 5, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0, 0, 0, 0, 0])
    ring.complete(cb.cmd_id, 2, sense)
    ring.complete(ca.cmd_id, 0, read_len=100)
    h.notify()
    done = emu.reap()
    assert done[b].status == 2 and done[b].sense[:18] == sense
    assert done[a].read_len == 100 and done[a].data_in == b"y" * 100


def test_tmr_entries_report_aborts_and_are_skipped():
    emu, ring, h = make()
    a = emu.submit(READ10, data_in_len=4096)
    emu.submit_tmr(abi.TmrType.ABORT_TASK, [a])
    b = emu.submit(TUR)
    batch = ring.fetch()
    assert [c.cmd_id for c in batch.commands] == [a, b]
    assert batch.aborts == [[a]]
    assert batch.abort_at == [1]       # the TMR came after one command: it can name only that one
    ring.complete(b, 0)
    ring.complete(a, 0x40)     # TASK ABORTED
    h.notify()
    assert set(emu.reap()) == {a, b}


def test_unknown_opcode_is_flagged_and_ring_moves_on():
    emu, ring, h = make()
    emu.write_raw(bytes(16), op_len=16 | 5)      # opcode 5 does not exist
    cid = emu.submit(TUR)
    batch = ring.fetch()
    assert [c.cmd_id for c in batch.commands] == [cid]
    assert ring.stats["unknown_ops"] == 1
    ring.complete(cid, 0)
    h.notify()
    assert set(emu.reap()) == {cid}
    assert emu.warnings and "uflags 0x1" in emu.warnings[0]


def test_malformed_iovec_is_completed_with_hardware_error_not_handed_out():
    emu, ring, h = make()
    cid = emu.submit(READ10, data_in_len=4096)
    ent = emu.cmdr_off + 0
    abi.IOVEC.iov_base.put(emu.map, ent + abi.ENTRY_IOV_OFFSET, 64)   # into the mailbox
    assert ring.fetch().commands == []
    assert ring.take_notify()
    h.notify()
    done = emu.reap()[cid]
    assert done.status == 2 and done.sense[2] == 0x04 and done.sense[12] == 0x44


def test_idle_ring_retires_pads_and_tmrs():
    emu, ring, h = make()
    emu.submit_tmr(abi.TmrType.LUN_RESET, [])
    assert ring.fetch().commands == []
    assert ring.take_notify() and ring.tail == emu._head


def test_wrong_mailbox_version_refused():
    emu = RingEmulator(cmdr_size=1000)
    abi.MAILBOX.version.put(emu.map, 0, 1)
    with pytest.raises(RingError, match="version 1"):
        CommandRing(emu.map, map_size=emu.map_size)


def test_a_ring_whose_size_is_not_a_whole_number_of_8_bytes_is_refused():
    """Every entry is 8-byte aligned (TCMU_OP_ALIGN_SIZE), so is the ring's size: the kernel
    never writes another, and a walk over such a ring would never meet its end exactly."""
    emu = RingEmulator(cmdr_size=1000)
    abi.MAILBOX.cmdr_size.put(emu.map, 0, 1000 - 4)
    with pytest.raises(RingError, match="geometry"):
        CommandRing(emu.map, map_size=emu.map_size)


def test_completion_without_outstanding_command_is_refused():
    emu, ring, _ = make()
    with pytest.raises(RingError):
        ring.complete(1, 0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3), st.binary(min_size=0,
                                                                              max_size=200)),
                    min_size=1, max_size=40),
       seed=st.integers(0, 1 << 30))
def test_random_submits_and_completions_never_break_the_ring(ops, seed):
    emu, ring, h = make(cmdr_size=1024 - 8 * 7)
    rnd = random.Random(seed)
    pending = []
    expected = {}
    for kind, n, blob in ops:
        try:
            if kind == 0:
                cid = emu.submit(READ10, data_in_len=4096 * (n + 1))
            elif kind == 1:
                cid = emu.submit(WRITE10, data_out=blob or b"z")
            else:
                cid = None
                emu.submit_tmr(abi.TmrType.ABORT_TASK, [c.cmd_id for c in pending[:n]])
        except RingFull:
            cid = None
        pending.extend(ring.fetch().commands)
        rnd.shuffle(pending)
        for c in pending[:rnd.randint(0, len(pending))]:
            status = rnd.choice([0, 2, 8])
            ring.complete(c.cmd_id, status, b"\x70" + bytes(17) if status == 2 else b"")
            expected[c.cmd_id] = status
            pending.remove(c)
        h.notify()
        for cid2, comp in emu.reap().items():
            assert comp.status == expected.pop(cid2)
    for c in pending:
        ring.complete(c.cmd_id, 0)
        expected[c.cmd_id] = 0
    h.notify()
    for cid2, comp in emu.reap().items():
        assert comp.status == expected.pop(cid2)
    assert not expected and emu.inflight == 0


@settings(max_examples=150, deadline=None)
@given(entry=st.binary(min_size=8, max_size=300), op=st.integers(0, 7), length=st.integers(0, 400))
def test_garbage_entries_never_raise_or_leak_views(entry, op, length):
    emu, ring, h = make(cmdr_size=2048)
    try:
        emu.write_raw(entry, op_len=(length & ~7) | op)
    except RingFull:
        return
    batch = ring.fetch()
    for c in batch.commands:
        for v in c.iov_views + c.bidi_views:
            # a view is always inside the data area
            assert v.obj is not None
        for off, ln in c.iovecs:
            assert ring.data_off <= off and off + ln <= ring.map_size
        ring.complete(c.cmd_id, 0)


def test_entry_header_reader_matches_the_declared_fields():
    """abi.ENTRY_REQ (Layout.reader) reads the same values as the fields one by one, from the
    declaration (padding between them skipped); fields out of order are refused."""
    emu, ring, _ = make()
    emu.submit(READ10, data_in_len=4096)
    ent, e = emu.cmdr_off, abi.ENTRY
    names = ("len_op", "cmd_id", "iov_cnt", "iov_bidi_cnt", "iov_dif_cnt", "cdb_off")
    assert abi.ENTRY_REQ.unpack_from(emu.map, ent) == tuple(
        getattr(e, n).get(emu.map, ent) for n in names)
    assert abi.ENTRY_REQ.size == 32
    with pytest.raises(ValueError, match="precedes"):
        e.reader("cdb_off", "iov_cnt")


def test_a_command_entry_shorter_than_its_header_is_failed_not_read():
    emu, ring, _ = make()
    emu.submit(TUR)
    ent = emu.cmdr_off
    len_op = abi.ENTRY.len_op.get(emu.map, ent)
    abi.ENTRY.len_op.put(emu.map, ent, (len_op & 0x7) | 40)     # 40 bytes < sizeof 112
    # the short entry is completed with a HARDWARE ERROR; the ring then stops at the bytes
    # after it (no valid entry there: the kernel times out what follows, nothing is guessed)
    assert ring.fetch().commands == [] and ring.stats["malformed"] == 2
    assert abi.ENTRY.scsi_status.get(emu.map, ent) == 2
    assert abi.ENTRY.sense_buffer.get(emu.map, ent)[2] == 0x04


def test_a_completion_stores_only_the_response_fields():
    """The completion writes cmd_id, uflags and scsi_status (``abi.ENTRY.span``: adjacent
    fields, one store) and leaves the kernel's kflags alone; a span over fields with a byte
    between them is refused (a Struct with padding would write zeros there)."""
    emu, ring, h = make()
    a = emu.submit(READ10, data_in_len=4096)
    ent = emu.cmdr_off
    abi.ENTRY.kflags.put(emu.map, ent, 0x5A)
    abi.ENTRY.uflags.put(emu.map, ent, abi.UFLAG_UNKNOWN_OP | 0x80)
    (c,) = ring.fetch().commands
    assert c.data_len == 4096 and c.iovecs == [(c.iovecs[0][0], 4096)]
    ring.complete(c.cmd_id, 0x02, b"\x70\x00\x03")
    assert abi.ENTRY.kflags.get(emu.map, ent) == 0x5A
    assert abi.ENTRY.uflags.get(emu.map, ent) == 0x80          # UNKNOWN_OP cleared, rest kept
    assert abi.ENTRY.scsi_status.get(emu.map, ent) == 0x02
    assert abi.ENTRY.cmd_id.get(emu.map, ent) == c.cmd_id == a
    h.notify()
    assert emu.reap()[a].sense[:3] == b"\x70\x00\x03"
    off, st = abi.ENTRY.span("uflags", "scsi_status")
    assert (off, st.format, st.size) == (7, "<BB", 2)
    with pytest.raises(ValueError, match="does not follow"):
        abi.ENTRY.span("cmd_id", "uflags")                     # kflags lies between them


def test_a_bidirectional_command_with_one_buffer_has_no_data_out():
    """An entry whose only iovec is a bidi (Data-In) one gives no Data-Out views, a data_len
    of 0 and the Data-In view, as the general parser does."""
    emu, ring, _ = make()
    emu.submit(READ10, data_in_len=4096)
    ent = emu.cmdr_off
    abi.ENTRY.iov_cnt.put(emu.map, ent, 0)
    abi.ENTRY.iov_bidi_cnt.put(emu.map, ent, 1)
    (c,) = ring.fetch().commands
    assert c.iov_views == [] and c.iovecs == [] and c.data_len == 0
    assert len(c.bidi_views) == 1 and len(c.bidi_views[0]) == 4096


def test_an_entry_running_past_cmd_head_stops_the_fetch_instead_of_circling():
    """An entry as long as the whole ring (corrupt: the kernel's entries end at cmd_head) took
    the fetch cursor round to where it started forever, under the ring's lock; now it is
    malformed and the fetch returns."""
    emu, ring, _ = make(cmdr_size=2048)
    emu.submit(TUR)
    ent = emu.cmdr_off
    for op in (abi.OP_PAD, abi.OP_CMD):
        abi.ENTRY.len_op.put(emu.map, ent, 2048 | op)
        ring2 = CommandRing(emu.map, map_size=emu.map_size)
        assert ring2.fetch().commands == [] and ring2.stats["malformed"] == 1
        assert ring2.outstanding == 0


def test_an_entry_ending_at_the_ring_end_completes_to_tail_zero():
    """cmd_tail is stored modulo the ring's size: completing a command whose entry ends exactly
    at the ring's end, another still outstanding, leaves the tail at 0, not at the size (which
    the kernel would refuse as no offset in the ring)."""
    read10 = bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0])
    probe = RingEmulator(cmdr_size=4096, data_size=1 << 20)
    probe_ring = CommandRing(probe.map, map_size=probe.map_size)
    probe.submit(read10, data_in_len=4096)
    entry = probe_ring.head                      # one READ entry's length
    probe_ring.close()
    probe.close()
    emu = RingEmulator(cmdr_size=3 * entry, data_size=1 << 20)
    ring = CommandRing(emu.map, map_size=emu.map_size)
    handle = emu.handle()
    for _ in range(2):
        emu.submit(read10, data_in_len=4096)
    for c in ring.fetch().commands:
        ring.complete(c.cmd_id, 0)
    handle.notify()
    emu.reap()
    assert ring.tail == 2 * entry
    first = emu.submit(read10, data_in_len=4096)     # its entry ends at the ring's end
    second = emu.submit(read10, data_in_len=4096)
    cmds = ring.fetch().commands
    assert [c.cmd_id for c in cmds] == [first, second]
    ring.complete(first, 0)
    assert ring.tail == 0
    handle.notify()
    assert first in emu.reap()                        # the emulator accepts the tail
    ring.complete(second, 0)
    handle.notify()
    assert second in emu.reap()
    ring.close()
    emu.close()


def test_notify_never_fails_on_a_full_wakeup_socket():
    """The kernel's uio write never returns EAGAIN, so the emulator's must not either: with no
    reaper reading, thousands of wake-ups fill the socket; notify stays quiet (the queued ones
    already wake the reaper), and one reap still finds every completion. Before, the ring thread
    died on BlockingIOError once the compiled READ path outran the emulator's reaper."""
    from lvmirror.tcmu.emulator import AttachedHandle
    emu, ring, handle = make()
    try:
        fds, meta = handle.transfer()
        attached = AttachedHandle([os.dup(fd) for fd in fds], meta)
        cid = emu.submit(TUR)
        batch = ring.fetch()
        assert [c.cmd_id for c in batch.commands] == [cid]
        ring.complete(cid, 0)
        for _ in range(20000):
            handle.notify()
            attached.notify()
        assert emu.notifies == 20000
        found = emu.reap()
        assert list(found) == [cid] and found[cid].status == 0
        attached.close()
    finally:
        emu.close()


def test_a_command_id_that_comes_round_again_never_gets_the_old_completion():
    """The emulator hands out ids round the 16-bit space; after 65,535 commands an id comes
    back, and ``wait`` for the new command must not return the completion the old one left
    (a stress test read a WRITE's empty completion as a READ's data that way)."""
    emu, ring, handle = make()
    try:
        old = emu.submit(TUR)
        (cmd,) = ring.fetch().commands
        ring.complete(cmd.cmd_id, 0)
        handle.notify()
        assert emu.reap()[old].status == 0 and old in emu.completions
        emu._next_id = old                      # as after 65,535 more commands
        new = emu.submit(READ10, data_in_len=8 * 512)
        assert new == old and new not in emu.completions
        with pytest.raises(TimeoutError):
            emu.wait([new], timeout=0.2)
    finally:
        emu.close()
