"""The ring thread's lease on a volume: the region lock and the split epoch held across batches.

Every batch of the ring thread's compiled path (``daemon/lunserver.py``) used to enter the
volume's split epoch, take a region lock over its commands, and give both back after its I/O:
about ten Python calls a batch, and at queue depth 1 a batch is one command. Under the lab's
emulated CPU that bookkeeping was most of what set lvmirrord's 4 KiB writes at queue depth 1
below tcmu-runner's, whose handler takes no lock at all.

A ``RingLease`` takes both once and keeps them while nothing else wants them:

* an exclusive region lock over the whole LUN (``RegionLockManager.lease``), so no other I/O,
  resync copy or D-Bus client's lock overlaps a command the ring thread makes under it;
* one entry into the current split epoch (``MirrorVolume.begin_ring_lease``), so a split, attach,
  detach or image failure that switches the epoch waits for it as for any write in flight.

It is revocable, as DRBD's and GFS2's cached locks are given back when another node asks: a
region lock request that meets it (``RegionLockManager.lock``/``try_lock``), an epoch switch
(``MirrorVolume._switch_epoch``) and ``close`` call ``revoke``, which marks it and wakes the ring
thread; the ring thread ends it (``MirrorVolume.end_ring_lease``) before its next batch or as soon as
its poll returns, and only then is the request granted or the epoch drained. A holder whose
batch is stuck in a slow device cannot end it: when the watchdog hands the ring to a new ring
thread it narrows the lease to the blocks of that batch (``MirrorVolume.narrow_ring_lease``), so
the new thread serves the rest of the LUN as it did before leases. A request does not
wait longer for it than for the batch in flight. The ring thread ends it too before any command
of its own takes the Python path (which locks for itself), when a batch fails or is handed to
the worker pool, and when its conditions change (STOP_STALE). After a revocation it takes none
for ``BACKOFF`` seconds, so that a resync's or a client's run of locks does not meet it at each
one. The I/O made under it is counted at its end; ``MirrorVolume.stats`` adds what a held one
made so far.

The lease with WRITEs is taken only on a volume whose epoch writes one image (no write-intent
log to begin per write, no change bitmap to mark). On a mirror in sync the ring thread takes a
lease for READs only (``reads_only``): it makes READ batches under it, and ends it at the first
WRITE (made as before, in the volume's epoch with its region lock and its write-intent log
regions) and takes none for ``BACKOFF`` seconds, so a stream of READs makes its batches with no
lock or epoch of their own while a mix of READs and WRITEs takes one lease at most every
``BACKOFF`` seconds. The READs under it are read from the one image ``fast_read_source`` names,
the first in sync of the epoch: the lease excludes every WRITE and resync copy, so that image
holds what any other would return. A volume whose WRITEs the ring thread does not make itself
(a write-through or write-protected LU: the Python path's) takes the same lease for READs only,
on one image or several.
"""

from __future__ import annotations

__all__ = ["RingLease", "BACKOFF"]

BACKOFF = 0.5       # seconds after a revocation before the ring thread takes one again


class RingLease:
    """One lease (see the module docstring). ``epoch``: the split epoch entered; ``lock``: the
    whole-LUN exclusive RegionLock; ``wake``: the callable that wakes its holder (the ring
    thread's wake pipe); ``gen``: the holder's ring thread generation; ``since``: when it was
    taken (``time.monotonic``, seconds); ``revoked``: set by ``revoke``. The holder adds the
    commands it made under it to ``reads``/``read_bytes`` and ``writes``/``write_bytes``
    (commands and bytes), which ``MirrorVolume.end_ring_lease`` counts; ``read_storage`` and
    ``write_storage`` are the StorageImages they went to; ``volume`` the MirrorVolume whose
    ``end_ring_lease`` ends it; ``batch``: the blocks the holder's batch in flight covers,
    ``(first, blocks, shared)``, or None between batches (``MirrorVolume.narrow_ring_lease``);
    ``reads_only`` (a property): True when ``write_storage`` is None, a lease its holder makes
    no WRITE under (a mirror's, see the module docstring)."""

    __slots__ = ("epoch", "lock", "wake", "gen", "since", "revoked", "reads", "read_bytes",
                 "writes", "write_bytes", "read_storage", "write_storage", "ended", "volume", "batch")

    def __init__(self, wake, gen: int, since: float, read_storage, write_storage):
        self.epoch = None
        self.lock = None
        self.wake = wake
        self.gen = gen
        self.since = since
        self.revoked = False
        self.ended = False
        self.reads = self.read_bytes = self.writes = self.write_bytes = 0
        self.read_storage = read_storage
        self.write_storage = write_storage
        self.volume = None
        self.batch = None       # (first block, blocks, shared) of the batch in flight, or None

    @property
    def reads_only(self) -> bool:
        """A lease for READs only (no ``write_storage``: a mirror's, or a volume's whose WRITEs
        the ring thread does not make itself - a write-through LU's)."""
        return self.write_storage is None

    def revoke(self) -> None:
        """Ask the holder to end the lease (any thread; never blocks: it may be called under
        the region lock manager's mutex or the volume's epoch lock)."""
        if not self.revoked and not self.ended:
            self.revoked = True
            self.wake()

    def __repr__(self) -> str:
        state = "ended" if self.ended else "revoked" if self.revoked else "held"
        kind = " reads-only" if self.reads_only else ""
        return f"<RingLease gen={self.gen}{kind} {state} reads={self.reads} writes={self.writes}>"
