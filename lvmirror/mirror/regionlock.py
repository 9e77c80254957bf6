"""Range locks over logical blocks: first come, first served, no starvation.

A ``RegionLockManager`` serialises I/O to overlapping LBA ranges of one mirror volume: every
write holds an exclusive lock on its blocks while it goes to every image, so two writes to the
same blocks can never land in a different order on different images (which would leave the
mirror silently inconsistent). Readers and the resync copier take shared or exclusive locks
as they need.

Rules (half-open ranges ``[start, start + count)``):

* shared locks are compatible with each other; exclusive locks are compatible with nothing
  that overlaps them;
* a request is granted at once only if it conflicts with no HELD lock and with no EARLIER
  WAITING request. Waiting requests are granted strictly in arrival order among themselves
  where they conflict, so a stream of readers cannot starve a writer (and vice versa);
  requests on disjoint ranges never wait for each other.

Complexity: a request is checked against every held lock and every waiter (O(H + W)); a
release rescans the waiters (O(W * (H + W)) worst case). On a volume H is bounded by the
number of I/Os in flight (the TCMU ring depth, tens) and W is normally 0, so flat lists beat
an interval tree here. The uncontended path takes one mutex and allocates only the returned
``RegionLock``; a ``threading.Lock`` to sleep on is made only when a request must wait.

A thread that asks for a range it already holds exclusively deadlocks, as with any
non-reentrant lock; the volume never does that.
"""

from __future__ import annotations

import threading
import time
from typing import Any, NamedTuple

from lvmirror.errors import LvmirrorError

_monotonic = time.monotonic      # every grant and request time of this module

__all__ = ["LockCancelled", "LockInfo", "RegionLock", "RegionLockManager"]


class LockCancelled(LvmirrorError):
    """A waiting lock request was cancelled by ``release_owner`` (its owner went away)."""


class LockInfo(NamedTuple):
    """A held lock or a waiting request, as listed by ``holders()`` / ``waiters()``."""

    start: int
    count: int
    owner: Any
    shared: bool
    since: float  # time.monotonic() of the grant (holders) or of the request (waiters)


class RegionLock:
    """A granted range lock. ``release()`` is idempotent; usable as a context manager."""

    __slots__ = ("start", "count", "end", "owner", "shared", "granted_at", "_manager", "_held")

    def __init__(self, manager, start, count, end, owner, shared, granted_at):
        self._manager = manager
        self.start = start
        self.count = count
        self.end = end
        self.owner = owner
        self.shared = shared
        self.granted_at = granted_at
        self._held = True

    def release(self) -> None:
        """Release the lock and grant whichever waiters it was blocking. Idempotent.
        (Under the manager's mutex, as every change of its holders.)"""
        if self._held:
            manager = self._manager
            with manager._mutex:
                if not self._held:
                    return
                self._held = False
                del manager._held[self]
                if manager._lease is self:
                    manager._lease = manager._revoke = None
                if manager._waiters:
                    manager._wake_waiters()

    @property
    def held(self) -> bool:
        """True until released (by ``release()`` or by ``release_owner``)."""
        return self._held

    def __enter__(self) -> RegionLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        kind = "shared" if self.shared else "exclusive"
        state = "held" if self._held else "released"
        return f"<RegionLock [{self.start}, +{self.count}) {kind} owner={self.owner!r} {state}>"


_WAITING, _GRANTED, _CANCELLED = 0, 1, 2

# The owner of the lease's lock (``RegionLockManager.lease``), and how long a request with a
# shorter timeout (0: an immediate try) waits for the lease alone to be given back: the holder
# ends it before its next batch, so only a batch in flight on a slow device takes long.
class _LeaseOwner:
    """The owner of a lease's lock: no other owner equals it (``release_owner`` never frees it)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<lease>"


LEASE_OWNER = _LeaseOwner()
LEASE_REVOKE_WAIT = 5.0


class _Waiter:
    """A request that had to wait. ``gate`` is acquired at birth; releasing it wakes the waiter."""

    __slots__ = ("start", "count", "end", "owner", "shared", "since", "gate", "state", "lock")

    def __init__(self, start, count, end, owner, shared, since):
        self.start = start
        self.count = count
        self.end = end
        self.owner = owner
        self.shared = shared
        self.since = since
        self.gate = threading.Lock()
        self.gate.acquire()
        self.state = _WAITING
        self.lock: RegionLock | None = None


def _check_range(start, count) -> None:
    if not isinstance(start, int) or not isinstance(count, int):
        raise TypeError(f"lock range must be integers, got start={start!r} count={count!r}")
    if start < 0:
        raise ValueError(f"lock range start must be >= 0, got {start}")
    if count < 1:
        raise ValueError(f"lock range count must be >= 1, got {count}")


class RegionLockManager:
    """FIFO range-lock manager for one LBA space (see the module docstring for the rules)."""

    def __init__(self, name: str = ""):
        self.name = name
        self._mutex = threading.Lock()
        # Held locks in grant order; a dict gives O(1) removal and keeps the order for holders().
        self._held: dict[RegionLock, None] = {}
        self._waiters: list[_Waiter] = []
        # the lease (``lease``): the whole-range lock the ring thread keeps across batches, and
        # the callable that asks it back
        self._lease: RegionLock | None = None
        self._revoke = None

    # -- conflict tests (caller holds _mutex) ---------------------------------------------------

    def _conflicts_held(self, start, end, shared, skip=None) -> bool:
        for h in self._held:
            if h.start < end and start < h.end and not (shared and h.shared) and h is not skip:
                return True
        return False

    def _conflicts_waiters(self, start, end, shared, upto) -> bool:
        waiters = self._waiters
        for i in range(upto):
            w = waiters[i]
            if w.start < end and start < w.end and not (shared and w.shared):
                return True
        return False

    def _grant(self, start, count, end, owner, shared) -> RegionLock:
        lk = RegionLock(self, start, count, end, owner, shared, _monotonic())
        self._held[lk] = None
        return lk

    def _wake_waiters(self) -> None:
        """Grant every waiter that no longer conflicts with a held lock or an earlier waiter."""
        waiters = self._waiters
        i = 0
        while i < len(waiters):
            w = waiters[i]
            if (not self._conflicts_held(w.start, w.end, w.shared)
                    and not self._conflicts_waiters(w.start, w.end, w.shared, i)):
                w.lock = self._grant(w.start, w.count, w.end, w.owner, w.shared)
                w.state = _GRANTED
                del waiters[i]
                w.gate.release()
            else:
                i += 1

    # -- public API -----------------------------------------------------------------------------

    def try_lock(self, start: int, count: int, *, owner=None, shared: bool = False) -> RegionLock | None:
        """Grant the lock now if the FIFO rules allow it, else return None (never waits).
        TypeError or ValueError for a range ``lock`` refuses too. (Every READ and WRITE the
        ring thread answers itself takes one: the checks and the grant are written out here.)"""
        if start.__class__ is not int or count.__class__ is not int or start < 0 or count < 1:
            _check_range(start, count)           # raises, unless an int subclass in range
        end = start + count
        with self._mutex:
            if (self._held or self._waiters) and (
                    self._conflicts_held(start, end, shared)
                    or self._conflicts_waiters(start, end, shared, len(self._waiters))):
                if self._lease is not None:
                    self._revoke()
                return None
            lk = RegionLock(self, start, count, end, owner, shared, _monotonic())
            self._held[lk] = None
            return lk

    def lock(self, start: int, count: int, *, owner=None, shared: bool = False,
             timeout: float | None = None) -> RegionLock:
        """Lock ``[start, start+count)``, waiting in FIFO order behind conflicting requests.

        Raises TimeoutError after ``timeout`` seconds (the request is then withdrawn and leaves
        no trace), LockCancelled if ``release_owner(owner)`` cancels it while it waits. When
        only the ring thread's lease is in its way (``lease``), a ``timeout`` from 0 up to
        LEASE_REVOKE_WAIT waits up to LEASE_REVOKE_WAIT for it to be given back, since without
        it the request would have been granted at once; a negative one fails at once.
        """
        _check_range(start, count)
        end = start + count
        with self._mutex:
            if not self._held and not self._waiters:
                return self._grant(start, count, end, owner, shared)
            if (not self._conflicts_held(start, end, shared)
                    and not self._conflicts_waiters(start, end, shared, len(self._waiters))):
                return self._grant(start, count, end, owner, shared)
            wait = timeout
            if self._lease is not None:
                self._revoke()
                if (timeout is not None and 0 <= timeout < LEASE_REVOKE_WAIT
                        and not self._conflicts_held(start, end, shared, self._lease)
                        and not self._conflicts_waiters(start, end, shared,
                                                        len(self._waiters))):
                    # only the lease is in the way, and it is given back at once: a request
                    # with a short timeout (or none to wait: 0) waits for that, up to
                    # LEASE_REVOKE_WAIT, as it would not have met it
                    wait = LEASE_REVOKE_WAIT
            if wait is not None and wait <= 0:
                raise TimeoutError(self._timeout_message(start, count, shared, timeout))
            w = _Waiter(start, count, end, owner, shared, _monotonic())
            self._waiters.append(w)

        if wait is None:
            w.gate.acquire()
        else:
            w.gate.acquire(timeout=wait)

        with self._mutex:
            if w.state == _GRANTED:
                return w.lock
            if w.state == _CANCELLED:
                raise LockCancelled(
                    f"region lock {self.name!r} [{start}, +{count}) for owner {owner!r} "
                    f"cancelled: owner released")
            # Timed out while still waiting: withdraw, then let later requests it blocked go.
            self._waiters.remove(w)
            self._wake_waiters()
        msg = self._timeout_message(start, count, shared, wait)
        if wait != timeout:
            msg += " (the ring thread's lease was not given back: its I/O in flight is slow)"
        raise TimeoutError(msg)

    def _timeout_message(self, start, count, shared, timeout) -> str:
        kind = "shared" if shared else "exclusive"
        return (f"region lock {self.name!r}: {kind} [{start}, +{count}) not granted "
                f"within {timeout} s")

    def lease(self, count: int, revoke) -> RegionLock | None:
        """Grant the lease: an exclusive lock over ``[0, count)`` (the whole LUN, in blocks)
        that every request meeting it asks back by calling ``revoke()`` (the holder ends it and
        releases the lock; ``revoke`` must not block nor take this manager's mutex). Granted
        only when nothing is held and nothing waits; None otherwise, or while a lease is held.
        A request meeting it waits in FIFO order as behind any lock; one with a timeout under
        LEASE_REVOKE_WAIT seconds (0: an immediate try) waits up to that when only the lease is
        in its way, since without it the request would have been granted at once.
        ``holders()`` does not list it (``mirror/ringlease.py``)."""
        _check_range(0, count)
        with self._mutex:
            if self._held or self._waiters or self._lease is not None:
                return None
            lk = self._grant(0, count, count, LEASE_OWNER, False)
            self._lease, self._revoke = lk, revoke
            return lk

    def narrow_lease(self, lease: RegionLock, start: int, count: int,
                     shared: bool = False) -> RegionLock:
        """Turn the lease ``lease`` (``lease``) into an ordinary lock over ``[start, start +
        count)`` (``shared`` or exclusive, owned as the lease was) in one step, with no moment
        in which that range is free: its holder's batch is stuck in a slow device and a new
        ring thread serves the LUN meanwhile (``LunServer._hand_over``); the rest of the LUN is
        granted to those waiting for it. Returns the new lock (its holder releases it instead);
        ValueError if ``lease`` is not this manager's lease."""
        _check_range(start, count)
        with self._mutex:
            if self._lease is not lease or not lease._held:
                raise ValueError(f"region lock {self.name!r}: {lease!r} is not the lease")
            lease._held = False
            del self._held[lease]
            self._lease = self._revoke = None
            lk = self._grant(start, count, start + count, LEASE_OWNER, shared)
            if self._waiters:
                self._wake_waiters()
            return lk

    def release_owner(self, owner) -> int:
        """Release every lock ``owner`` holds and cancel its waiting requests.

        Waiting callers get LockCancelled. Returns the number of held locks released plus
        waiting requests cancelled. ``owner=None`` is refused: anonymous locks belong to the
        I/O path and releasing them wholesale would break mutual exclusion.
        """
        if owner is None:
            raise ValueError("release_owner(None) refused: anonymous locks have no single owner")
        n = 0
        with self._mutex:
            for lk in [lk for lk in self._held if lk.owner == owner]:
                lk._held = False
                del self._held[lk]
                n += 1
            keep = []
            for w in self._waiters:
                if w.owner == owner:
                    w.state = _CANCELLED
                    w.gate.release()
                    n += 1
                else:
                    keep.append(w)
            self._waiters[:] = keep
            self._wake_waiters()
        return n

    def holders(self) -> list[LockInfo]:
        """Held locks, in grant order; not the ring thread's lease (``lease``), which is
        given back to any request that meets it."""
        with self._mutex:
            return [LockInfo(h.start, h.count, h.owner, h.shared, h.granted_at)
                    for h in self._held if h is not self._lease]

    def waiters(self) -> list[LockInfo]:
        """Waiting requests, in arrival order."""
        with self._mutex:
            return [LockInfo(w.start, w.count, w.owner, w.shared, w.since) for w in self._waiters]

    def __repr__(self) -> str:
        return (f"<RegionLockManager {self.name!r} held={len(self._held)} "
                f"waiting={len(self._waiters)}>")
