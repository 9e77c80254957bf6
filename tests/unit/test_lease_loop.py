"""The ring thread's compiled loop under its lease (``LunServer._lease_serve``,
``tcmu._fastread.lease_serve``): batch after batch and the wait for the kernel's next command
without returning to Python, each command counted before the kernel is told, and a return to
the Python loop for whatever it answers - another opcode, a revocation, a slow write, a stop."""

import os
import time

import pytest

from lvmirror.daemon import lunserver
from lvmirror.scsi import constants as scsi
from tests.unit.test_compiled_big_reads import _queued
from tests.unit.test_daemon_ring import BS, cdb10, lab, rearm  # noqa: F401
from tests.unit.test_ring_lease import _one_image_lun, _read, _write

fastread = pytest.importorskip("lvmirror.tcmu._fastread",
                               reason="the compiled path is not built here")
pytestmark = pytest.mark.skipif(not (lunserver.RING_LEASE and lunserver.LEASE_LOOP),
                                reason="LVMIRROR_RING_LEASE=0 or LVMIRROR_LEASE_LOOP=0")


def _spy_calls(monkeypatch, lun, emu):
    """Count the calls of ``lease_serve`` from now on (the LUN armed again with the spy)."""
    calls = []
    real = fastread.lease_serve

    def spy(*args):
        calls.append(args[16])                           # the lease it serves under
        return real(*args)
    monkeypatch.setattr(fastread, "lease_serve", spy)
    rearm(lun, emu)
    return calls


def _counters(lun):
    h = lun.latency.snapshot()
    return (lun.commands, lun.compiled, lun.compiled_writes, h["read"]["count"],
            h["write"]["count"], h["other"]["count"])


def test_the_loop_serves_reads_and_writes_in_one_call_and_counts_each_before_its_status(
        lab, tmp_path, monkeypatch):
    """At queue depth 1, WRITEs and cached READs taking turns are served by one compiled call
    (fewer calls than commands), each counted - the LUN's commands, its compiled READs or
    WRITEs, the latency histogram - by the time the initiator has its status; a TEST UNIT
    READY between them is the Python path's, answered in ring order, and the loop takes the
    next READ and WRITE again. The volume's statistics count what the lease made."""
    emu, lun, path, _ = _one_image_lun(lab, tmp_path, 11)
    vol = lun.volume
    calls = _spy_calls(monkeypatch, lun, emu)
    assert _write(emu, 0, os.urandom(8 * BS)) == 0      # armed with the spy, the lease taken
    s0 = vol.stats
    new = [os.urandom(8 * BS) for _ in range(6)]
    n0 = len(calls)
    for k in range(6):
        before = _counters(lun)
        assert _write(emu, 8 * k, new[k]) == 0
        c = _counters(lun)
        assert (c[0] - before[0], c[2] - before[2], c[4] - before[4]) == (1, 1, 1)
        before = c
        assert _read(emu, 8 * k, 8) == new[k]
        c = _counters(lun)
        assert (c[0] - before[0], c[1] - before[1], c[3] - before[3]) == (1, 1, 1)
    assert len(calls) - n0 < 12                          # the loop waited for the next itself
    before = _counters(lun)
    tid = emu.submit(cdb10(scsi.TEST_UNIT_READY, 0, 0)[:6])
    assert emu.wait([tid])[tid].status == 0
    c = _counters(lun)
    assert (c[0] - before[0], c[1:5]) == (1, before[1:5])   # the Python path's, counted there
    assert _write(emu, 48, new[0]) == 0 and _read(emu, 48, 8) == new[0]
    assert _counters(lun)[2] == c[2] + 1 and _counters(lun)[1] == c[1] + 1
    s1 = vol.stats
    assert s1["writes"] - s0["writes"] == 7 and s1["reads"] - s0["reads"] == 7
    assert s1["images"][0]["bytes_written"] - s0["images"][0]["bytes_written"] == 56 * BS
    assert s1["inflight"] == 0
    with open(path, "rb") as f:
        assert f.read(48 * BS) == b"".join(new)


def test_the_loop_tells_the_kernel_once_for_a_queue_of_large_commands(lab, tmp_path,
                                                                      monkeypatch):
    """Four 1 MiB WRITEs queued together, then sixteen 4 KiB ones: the loop makes them in one
    batch and tells the kernel once, when it has reached cmd_head - not once a MiB. Each uio
    write runs the kernel's tcmu_irqcontrol, which takes the device's cmdr_lock, the mutex the
    kernel holds while it copies the next WRITE's Data-Out into the data area (1 MiB: several
    ms under the lab's TCG), so the ring thread waits, or spins, behind that copy. Tried
    2026-12-07 (a batch of at most 1 MiB, a notification as each MiB was answered): 1 MiB
    sequential WRITEs at queue depth 8 fell to 0.83 and 0.69 of tcmu-runner's IOPS, with 2 ms
    more of the ring thread's CPU a command, against 1.06 and 0.98 for this code the same
    morning (two more runs of this code: 1.23, 0.89). Four 1 MiB READs from the page cache are
    held to one notification too (not benchmarked that way). The kernel's side counts the uio
    writes it reads (``RingEmulator.kicks``)."""
    mib = 1 << 20
    emu, lun, path, _ = _one_image_lun(lab, tmp_path, 16)
    calls = _spy_calls(monkeypatch, lun, emu)
    assert _write(emu, 0, os.urandom(8 * BS)) == 0      # the loop serves, under the lease
    assert calls and lun.volume._lease is calls[-1]
    big = [os.urandom(mib) for _ in range(4)]
    small = [os.urandom(8 * BS) for _ in range(16)]
    before, k0 = _counters(lun), emu.kicks
    ids = _queued(emu, lun._ring, [(cdb10(0x2A, 2048 * k, 2048), big[k], 0) for k in range(4)]
                  + [(cdb10(0x2A, 8192 + 8 * k, 8), small[k], 0) for k in range(16)])
    done = emu.wait(ids)
    assert [done[i].status for i in ids] == [0] * 20
    c = _counters(lun)
    assert (c[0] - before[0], c[2] - before[2]) == (20, 20)     # every one the loop's
    assert emu.kicks - k0 == 1, emu.kicks - k0
    with open(path, "rb") as f:
        assert f.read(4 * mib) == b"".join(big)
        assert f.read(128 * BS) == b"".join(small)
    before, k0 = _counters(lun), emu.kicks
    ids = _queued(emu, lun._ring, [(cdb10(0x28, 2048 * k, 2048), None, mib) for k in range(4)])
    done = emu.wait(ids)
    assert [done[i].data_in for i in ids] == big
    c = _counters(lun)
    assert (c[0] - before[0], c[1] - before[1]) == (4, 4)       # compiled READs
    assert emu.kicks - k0 == 1, emu.kicks - k0


def test_a_revocation_ends_the_wait_of_the_loop(lab, tmp_path, monkeypatch):
    """A client's immediate lock try on an idle LUN is granted although the loop would wait 60
    s for the kernel: the revocation writes the LUN's wake-up pipe, which ends the loop's poll,
    and the Python loop gives the lease back. Stopping the LUN ends it the same way."""
    monkeypatch.setattr(lunserver, "LEASE_LOOP_WAIT", 60.0)
    emu, lun, path, _ = _one_image_lun(lab, tmp_path, 12)
    vol = lun.volume
    calls = _spy_calls(monkeypatch, lun, emu)
    assert _write(emu, 0, os.urandom(BS)) == 0
    assert calls and vol._lease is calls[-1]             # the loop waits under the lease
    revoked0 = lun.leases_revoked
    lk = vol.locks.lock(0, 8, owner=":1.7", timeout=0)   # waits up to LEASE_REVOKE_WAIT (5 s)
    assert lk.held and lun.leases_revoked == revoked0 + 1
    wid = emu.submit(cdb10(0x2A, 0, 8), data_out=os.urandom(8 * BS))
    assert _write(emu, 16, os.urandom(8 * BS)) == 0     # beside the lock: answered
    assert wid not in emu.completions                    # inside it: waits
    lk.release()
    assert emu.wait([wid])[wid].status == 0
    t0 = time.monotonic()
    lun.stop()
    assert time.monotonic() - t0 < 30                   # (not the loop's 60 s wait)


def test_a_slow_write_in_the_loop_sends_writes_to_the_pool(lab, tmp_path, monkeypatch):
    """A WRITE batch that took longer than INLINE_SLOW (0 here: every one) returns from the
    loop uncounted; the Python loop counts it once, ends the lease and sends WRITEs to the
    worker pool for INLINE_BACKOFF seconds, as for a batch outside the loop."""
    emu, lun, path, _ = _one_image_lun(lab, tmp_path, 13)
    monkeypatch.setattr(lunserver, "INLINE_SLOW", 0.0)
    calls = _spy_calls(monkeypatch, lun, emu)
    assert _write(emu, 40, os.urandom(BS)) == 0          # armed with the spy: slow too
    lun._inline_after = lun._lease_after = 0.0           # (its backoff, forgotten)
    before = _counters(lun)
    new = os.urandom(8 * BS)
    assert _write(emu, 8, new) == 0
    c = _counters(lun)
    assert calls and (c[0] - before[0], c[2] - before[2], c[4] - before[4]) == (1, 1, 1)
    assert lun._inline_after > time.monotonic() + 1 and lun._lease is None
    assert _write(emu, 16, new) == 0
    assert _counters(lun)[2] == c[2]                     # the pool's, not compiled
    assert _read(emu, 8, 8) == new and _read(emu, 16, 8) == new


def test_with_compiled_reads_off_the_loop_makes_writes_only(lab, tmp_path, monkeypatch):
    """``LVMIRROR_COMPILED_READS=0``: the loop still makes the WRITEs, beginning with them, and
    leaves every READ - one the page cache holds, one over 64 KiB - to the Python path."""
    monkeypatch.setattr(lunserver, "COMPILED_READS", False)
    emu, lun, path, data = _one_image_lun(lab, tmp_path, 14)
    calls = _spy_calls(monkeypatch, lun, emu)
    new = [os.urandom(8 * BS) for _ in range(4)]
    w0 = lun.compiled_writes
    for k in range(4):
        assert _write(emu, 8 * k, new[k]) == 0
        assert _read(emu, 8 * k, 8) == new[k]
    assert _read(emu, 0, 256) == b"".join(new) + data[32 * BS:64 * BS] + bytes(192 * BS)
    assert calls and lun.compiled_writes - w0 >= 3 and lun.compiled == 0


def test_a_workers_answer_is_not_held_by_the_loops_wait(lab, tmp_path, monkeypatch):
    """Commands the worker pool answers (TEST UNIT READY, SYNCHRONIZE CACHE) on an idle LUN
    under the lease: the worker's completion wakes the ring thread, whose Python loop drains
    the wake-up pipe; the compiled loop is not entered while that completion waits to be
    reported, so it is answered at once, not after the loop's wait for the kernel (60 s here:
    ``emu.wait`` gives up after 10). Found by the ninth newcomer trial: 1.0 s each with the
    default wait, so an fsync at queue depth 1 took a second."""
    monkeypatch.setattr(lunserver, "LEASE_LOOP_WAIT", 60.0)
    emu, lun, path, _ = _one_image_lun(lab, tmp_path, 15)
    calls = _spy_calls(monkeypatch, lun, emu)
    for k in range(3):
        assert _write(emu, 8 * k, os.urandom(8 * BS)) == 0
        assert calls and lun.volume._lease is calls[-1]
        tid = emu.submit(cdb10(scsi.TEST_UNIT_READY, 0, 0)[:6])
        assert emu.wait([tid], 10.0)[tid].status == 0
        sid = emu.submit(cdb10(scsi.SYNCHRONIZE_CACHE_10, 0, 0))
        assert emu.wait([sid], 10.0)[sid].status == 0


def test_the_ring_threads_waits_for_the_gil_are_counted_where_they_happen(lab, tmp_path):
    """``_fastread.gil_waits`` counts the ring thread's waits for the GIL after the loop's
    poll and after a lease batch's I/O, one each a command at queue depth 1; a READ the
    kernel was told of while this thread sorts 200,000 ints (C code that never offers the
    GIL to another thread: tens of milliseconds) shows as a wait over 1 ms. (A thread
    running bytecode meanwhile was not enough: it gives the GIL up within the switch
    interval, often sooner, and the tenth newcomer trial saw such a test fail 8 times in 10
    on a busy host.)"""
    import random
    emu, lun, path, _ = _one_image_lun(lab, tmp_path, 16)
    assert _write(emu, 0, os.urandom(8 * BS)) == 0          # the lease taken, the loop runs
    g0 = fastread.gil_waits()
    edges = g0["edges"]
    assert list(edges) == sorted(edges) and len(g0["after_io"]["counts"]) == len(edges) + 1
    for k in range(20):
        assert _write(emu, 8 * (k % 8), os.urandom(8 * BS)) == 0
    g1 = fastread.gil_waits()
    n = {p: sum(g1[p]["counts"]) - sum(g0[p]["counts"]) for p in ("after_io", "after_poll")}
    assert n["after_io"] >= 20 and n["after_poll"] >= 19
    assert g1["after_poll"]["seconds"] >= g0["after_poll"]["seconds"]

    deck = list(range(200_000))
    random.Random(5).shuffle(deck)
    ms = edges.index(1e-3) + 1                               # the buckets above 1 ms

    def long_waits():
        g = fastread.gil_waits()
        return sum(g["after_poll"]["counts"][ms:]) + sum(g["after_io"]["counts"][ms:])
    long0 = long_waits()
    # The kernel's wake-up (a send on a socket) lets the GIL go for a moment, and the ring
    # thread may take it first; then this thread waits instead. Tried until the ring thread
    # waited once, at most 40 times (one in three or more is the rule on this host).
    for k in range(40):
        rid = emu.submit(cdb10(0x28, 8 * (k % 8), 8), data_in_len=8 * BS)   # the kernel told
        sorted(deck)             # C that never lets the GIL go: tens of milliseconds
        assert emu.wait([rid])[rid].status == 0
        if long_waits() > long0:
            break
    g2 = fastread.gil_waits()
    assert long_waits() > long0
    assert g2["after_poll"]["longest"] >= 1e-3 or g2["after_io"]["longest"] >= 1e-3
