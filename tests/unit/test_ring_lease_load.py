"""The ring thread's lease under load (from the seventh newcomer trial): a one-image LUN written
at queue depth 8 while another party keeps locking ranges of the same blocks - an immediate try
(``lock(timeout=0)``), ``try_lock``, ``lock(timeout=1)`` - each revoking the lease: while it
holds an exclusive lock no WRITE lands in its blocks, and ``inflight`` never goes negative. And
a WRITE stuck in a disk that stopped answering counts as in flight, with the lease or without
(it said 0 under the lease)."""

import os
import random
import threading
import time

import pytest

from lvmirror.daemon import lunserver
from tests.unit.test_daemon_ring import BS, SIZE, cdb10, images, lab  # noqa: F401
from tests.unit.test_ring_lease import _freezable_fs, _write

pytest.importorskip("lvmirror.tcmu._fastread")


def test_locks_beside_a_write_load_keep_the_overlap_rule(lab, tmp_path):
    (path,) = images(tmp_path, 1)
    emu, lun, _ = lab(f"vol1;images={path}")
    assert lun.error is None
    vol = lun.volume
    nblocks = SIZE // BS
    stop = threading.Event()
    errors = []

    def load(seed):
        rnd = random.Random(seed)
        while not stop.is_set():
            ids = []
            for _ in range(4):
                lba = rnd.randrange(0, 256 - 8)     # a small hot area: locks meet them
                ids.append(emu.submit(cdb10(0x2A, lba, 8), data_out=rnd.randbytes(8 * BS)))
            done = emu.wait(ids, timeout=30)
            for i in ids:
                if i not in done or done[i].status != 0:
                    errors.append(("write", i))
    threads = [threading.Thread(target=load, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    rnd = random.Random(1)
    fd = os.open(path, os.O_RDONLY)
    violations = []
    timeouts = 0
    try:
        t_end = time.monotonic() + 8
        k = 0
        while time.monotonic() < t_end:
            k += 1
            lba = rnd.randrange(0, 256 - 16)
            mode = k % 3
            try:
                if mode == 0:
                    lk = vol.locks.lock(lba, 16, owner=("bus", ":1.9"), timeout=0)
                elif mode == 1:
                    lk = vol.locks.try_lock(lba, 16)
                else:
                    lk = vol.locks.lock(lba, 16, owner=("bus", ":1.9"), timeout=1)
            except TimeoutError:
                timeouts += 1
                continue
            if lk is None:
                time.sleep(0.05)
                continue
            try:
                a = os.pread(fd, 16 * BS, lba * BS)
                time.sleep(0.02)
                b = os.pread(fd, 16 * BS, lba * BS)
                if a != b:
                    violations.append(lba)
            finally:
                lk.release()
            time.sleep(0.05 + rnd.random() * 0.6)    # the ring thread takes its lease again
            s = vol.stats
            if s["inflight"] < 0:
                violations.append(("stats", s["writes"], s["images"][0]["writes"],
                                   s["inflight"]))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        os.close(fd)
    assert not errors
    assert not violations, violations
    if lunserver.RING_LEASE:            # (the lease was taken, and given back to the locks)
        assert lun.leases >= 2 and lun.leases_revoked >= 1, (lun.leases, lun.leases_revoked)
    assert vol.stats["inflight"] == 0
    assert vol.locks.holders() == [] and vol.locks.waiters() == []


@pytest.mark.parametrize("lease", [True, False], ids=["lease", "no-lease"])
def test_a_write_stuck_in_a_frozen_disk_counts_as_in_flight(lab, tmp_path, monkeypatch, lease):
    monkeypatch.setattr(lunserver, "INLINE_BACKOFF", 0.0)
    monkeypatch.setattr(lunserver, "RING_LEASE", lease and lunserver.RING_LEASE)
    with _freezable_fs(tmp_path) as (mnt, freeze):
        path = os.path.join(mnt, "img0")
        emu, lun, _ = lab(f"vol1;images={path}")
        assert lun.error is None
        data = random.Random(13).randbytes(64 * BS)
        assert _write(emu, 0, data) == 0
        assert _write(emu, 48, data[:8 * BS]) == 0
        vol = lun.volume
        assert (vol._lease is not None) == lease
        os.sync()
        freeze(True)
        try:
            wid = emu.submit(cdb10(0x2A, 8, 8), data_out=os.urandom(8 * BS))
            time.sleep(1.0)                      # stuck; the watchdog has handed over
            assert wid not in emu.completions
            seen = vol.stats["inflight"]
        finally:
            freeze(False)
        assert emu.wait([wid], timeout=20)[wid].status == 0
        assert seen >= 1, f"a WRITE stuck in the disk, yet stats say {seen} in flight"
        lun.stop()
