"""RegionLockManager: FIFO range locks (conflicts, fairness, timeouts, owners, stress)."""

import random
import threading

import pytest

from lvmirror.errors import LvmirrorError
from lvmirror.mirror.regionlock import LockCancelled, LockInfo, RegionLockManager


class Locker(threading.Thread):
    """Runs mgr.lock(...) in a thread; records the lock or the exception."""

    def __init__(self, mgr, start, count, **kw):
        super().__init__(daemon=True)
        self.mgr, self.args, self.kw = mgr, (start, count), kw
        self.lock = None
        self.error = None
        self.granted = threading.Event()

    def run(self):
        try:
            self.lock = self.mgr.lock(*self.args, **self.kw)
            self.granted.set()
        except BaseException as e:  # noqa: BLE001 - recorded for the test to assert on
            self.error = e
            self.granted.set()


def wait_for_waiters(mgr, n):
    """Block (bounded) until mgr has n waiters: the threads are now queued, no sleeps needed."""
    for _ in range(200000):
        if len(mgr.waiters()) == n:
            return
        threading.Event().wait(0.0005)
    raise AssertionError(f"expected {n} waiters, have {mgr.waiters()}")


def start_waiting(mgr, n_expected, start, count, **kw):
    t = Locker(mgr, start, count, **kw)
    t.start()
    wait_for_waiters(mgr, n_expected)
    assert not t.granted.is_set()
    return t


def finish(t):
    t.join(10)
    assert not t.is_alive()
    assert t.error is None, t.error
    return t.lock


def test_bad_ranges_rejected():
    m = RegionLockManager()
    with pytest.raises(ValueError):
        m.lock(0, 0)
    with pytest.raises(ValueError):
        m.lock(-1, 4)
    with pytest.raises(ValueError):
        m.try_lock(5, -3)
    for start, count, exc in ((-1, 4, ValueError), (0, 0, ValueError), (1.0, 4, TypeError),
                              (0, 4.0, TypeError), (None, 1, TypeError)):
        with pytest.raises(exc):
            m.try_lock(start, count)
    assert m.holders() == [] and m.waiters() == []
    lk = m.try_lock(True, 1)                # an int subclass in range is a range (as lock())
    assert lk is not None and (lk.start, lk.count) == (1, 1)
    lk.release()
    lk.release()                            # idempotent
    assert m.holders() == []


def test_overlapping_exclusive_waits_until_release():
    m = RegionLockManager("t")
    a = m.lock(10, 10, owner="a")
    t = start_waiting(m, 1, 19, 5, owner="b")
    assert m.try_lock(15, 1) is None
    a.release()
    b = finish(t)
    assert (b.start, b.count, b.owner) == (19, 5, "b")
    assert m.waiters() == []
    b.release()
    assert m.holders() == []


def test_half_open_ranges_adjacent_do_not_conflict():
    m = RegionLockManager()
    a = m.lock(0, 10)
    b = m.try_lock(10, 10)
    c = m.try_lock(9, 1)
    assert b is not None and c is None
    a.release()
    b.release()


def test_non_overlapping_never_waits_even_with_unrelated_waiters():
    m = RegionLockManager()
    a = m.lock(0, 8)
    t = start_waiting(m, 1, 4, 8)          # waits on a
    c = m.lock(100, 8, timeout=0)          # unrelated: granted at once
    assert c.start == 100
    c.release()
    a.release()
    finish(t).release()


def test_fifo_later_request_waits_behind_conflicting_earlier_waiter():
    m = RegionLockManager()
    a = m.lock(0, 10, owner="a")
    t1 = start_waiting(m, 1, 5, 10, owner="w1")   # [5,15) conflicts with a
    # [12,20) does not overlap a, but overlaps the earlier waiter w1: it must queue behind it.
    assert m.try_lock(12, 8) is None
    t2 = start_waiting(m, 2, 12, 8, owner="w2")
    assert [w.owner for w in m.waiters()] == ["w1", "w2"]
    a.release()
    l1 = finish(t1)
    assert not t2.granted.is_set()
    assert [w.owner for w in m.waiters()] == ["w2"]
    l1.release()
    finish(t2).release()


def test_release_grants_waiters_in_arrival_order():
    m = RegionLockManager()
    order = []
    a = m.lock(0, 1)
    threads = []
    for i in range(5):
        t = start_waiting(m, i + 1, 0, 1, owner=i)
        threads.append(t)
    a.release()
    for t in threads:
        lk = finish(t)
        order.append(lk.owner)
        lk.release()
    assert order == list(range(5))


def test_shared_locks_compatible_exclusive_not():
    m = RegionLockManager()
    r1 = m.lock(0, 10, shared=True)
    r2 = m.lock(5, 10, shared=True, timeout=0)
    assert m.try_lock(8, 1) is None                 # exclusive vs shared holders
    r3 = m.try_lock(8, 1, shared=True)
    assert r3 is not None
    assert [h.shared for h in m.holders()] == [True, True, True]
    r1.release()
    r2.release()
    assert m.try_lock(8, 1) is None                 # r3 still holds block 8
    r3.release()
    assert m.try_lock(8, 1) is not None


def test_exclusive_waiter_not_starved_by_stream_of_readers():
    m = RegionLockManager()
    r = m.lock(0, 10, shared=True, owner="r0")
    tw = start_waiting(m, 1, 0, 10, owner="writer")
    # New readers overlap the waiting writer, so they queue behind it although the held
    # lock is shared and compatible with them.
    assert m.try_lock(2, 2, shared=True) is None
    tr = start_waiting(m, 2, 2, 2, shared=True, owner="r1")
    r.release()
    w = finish(tw)
    assert not tr.granted.is_set()
    w.release()
    finish(tr).release()


def test_shared_waiters_granted_together():
    m = RegionLockManager()
    w = m.lock(0, 10)
    t1 = start_waiting(m, 1, 0, 5, shared=True)
    t2 = start_waiting(m, 2, 3, 5, shared=True)
    w.release()
    a, b = finish(t1), finish(t2)
    assert len(m.holders()) == 2
    a.release()
    b.release()


def test_timeout_raises_and_leaves_no_trace():
    m = RegionLockManager()
    a = m.lock(0, 10)
    with pytest.raises(TimeoutError):
        m.lock(5, 1, timeout=0.01)
    with pytest.raises(TimeoutError):
        m.lock(5, 1, timeout=0)
    assert m.waiters() == []
    a.release()
    assert m.holders() == []


def test_timed_out_waiter_unblocks_requests_queued_behind_it():
    m = RegionLockManager()
    a = m.lock(0, 10)
    t1 = Locker(m, 5, 10, timeout=0.05)      # [5,15): waits on a, then times out
    t1.start()
    wait_for_waiters(m, 1)
    t2 = start_waiting(m, 2, 12, 5)          # [12,17): only blocked by waiter t1
    t1.join(10)
    assert isinstance(t1.error, TimeoutError)
    lk2 = finish(t2)                          # granted when t1 withdrew, a still held
    assert a.held and lk2.held
    lk2.release()
    a.release()


def test_release_is_idempotent_and_context_manager():
    m = RegionLockManager()
    with m.lock(0, 4, owner="x") as lk:
        assert m.holders()[0][:4] == (0, 4, "x", False)
    assert not lk.held
    lk.release()
    lk.release()
    assert m.holders() == []
    assert m.try_lock(0, 4) is not None


def test_holders_and_waiters_listing():
    m = RegionLockManager()
    a = m.lock(0, 4, owner="a")
    b = m.lock(10, 2, owner="b", shared=True)
    t = start_waiting(m, 1, 3, 2, owner="c")
    hs = m.holders()
    assert all(isinstance(h, LockInfo) for h in hs)
    assert [(h.start, h.count, h.owner, h.shared) for h in hs] == [(0, 4, "a", False),
                                                                    (10, 2, "b", True)]
    assert hs[0].since == a.granted_at
    ws = m.waiters()
    assert [(w.start, w.count, w.owner, w.shared) for w in ws] == [(3, 2, "c", False)]
    assert ws[0].since >= a.granted_at
    a.release()
    finish(t).release()
    b.release()


def test_release_owner_releases_and_cancels():
    m = RegionLockManager()
    ext1 = m.lock(0, 10, owner="dbus:1.42")
    ext2 = m.lock(20, 10, owner="dbus:1.42")
    other = m.lock(40, 10, owner="io")
    blocker = m.lock(100, 1, owner="io2")
    t_cancel = start_waiting(m, 1, 100, 1, owner="dbus:1.42")
    t_other = start_waiting(m, 2, 5, 1, owner="io3")  # waits on ext1
    assert m.release_owner("dbus:1.42") == 3
    t_cancel.join(10)
    assert isinstance(t_cancel.error, LockCancelled)
    assert isinstance(t_cancel.error, LvmirrorError)
    finish(t_other).release()
    assert not ext1.held and not ext2.held and other.held
    assert {h.owner for h in m.holders()} == {"io", "io2"}
    assert m.waiters() == []
    ext1.release()  # already released by release_owner: harmless
    assert m.release_owner("nobody") == 0
    with pytest.raises(ValueError):
        m.release_owner(None)
    other.release()
    blocker.release()


def test_stress_mutual_exclusion_invariant():
    """4 threads, random overlapping ranges, shared and exclusive: per-LBA counters must
    never show a writer together with anyone else."""
    nblocks = 64
    m = RegionLockManager()
    writers = [0] * nblocks
    readers = [0] * nblocks
    check = threading.Lock()
    violations = []
    iters = 1500

    def worker(seed):
        rnd = random.Random(seed)
        for _ in range(iters):
            start = rnd.randrange(nblocks)
            count = rnd.randint(1, min(8, nblocks - start))
            shared = rnd.random() < 0.3
            with m.lock(start, count, shared=shared, owner=seed):
                with check:
                    for b in range(start, start + count):
                        if shared:
                            readers[b] += 1
                            if writers[b]:
                                violations.append(("r", b))
                        else:
                            writers[b] += 1
                            if writers[b] > 1 or readers[b]:
                                violations.append(("w", b))
                # a tiny window inside the lock in which others may try to enter
                threading.Event().wait(0) if rnd.random() < 0.05 else None
                with check:
                    for b in range(start, start + count):
                        if shared:
                            readers[b] -= 1
                        else:
                            writers[b] -= 1

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "stress worker hung"
    assert violations == []
    assert writers == [0] * nblocks and readers == [0] * nblocks
    assert m.holders() == [] and m.waiters() == []
