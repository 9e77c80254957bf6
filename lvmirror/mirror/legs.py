"""The legs of a mirror set: image states, the runtime record of each image, its I/O workers.

An image (a *leg*) is in one of four states (``ImageState``): in-sync (written and read),
syncing (written, never read, a resync copies what it lacks), split (a frozen point-in-time
copy: not written by the volume, its change bitmap records what the volume changed since) and
failed (an I/O error took it out; its change bitmap records what it missed).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging
import os
import queue
import stat
import threading

from lvmirror.errors import ConfigError
from lvmirror.mirror.bitmap import RegionBitmap

__all__ = ["BoundedIO", "ImageInfo", "ImageState", "Leg", "MAX_IMAGES", "MIN_DEVICE_IOPS",
           "MIN_DEVICE_RATE", "STUCK_IO_WAIT", "SplitInfo", "UNKNOWN_DIRTY_WAIT", "Worker",
           "check_image_fits", "device_of", "in_flight", "left_behind", "returned",
           "wait_returned"]

log = logging.getLogger(__name__)

MAX_IMAGES = 4
WORKER_THREADS = 4
HINTS_MAX = 64          # a leg's read-ahead ranges waiting (Leg.hints); older ones are dropped


class ImageState(enum.Enum):
    """An image's role (persisted as its value). in-sync: holds the volume's data, serves reads
    and takes every write. syncing: takes writes, a resync copies the regions its bitmap marks,
    serves no reads (a stale image is never read). split: a point-in-time copy, out of the
    write set, its bitmap marks what changed on the volume since T. failed: out of the write
    set after an I/O error, its bitmap marks what it missed."""
    IN_SYNC = "in-sync"
    SYNCING = "syncing"
    SPLIT = "split"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """One image as ``MirrorVolume.images`` reports it (a snapshot): ``dirty_bytes`` (bytes the
    change bitmap marks) and ``bitmap_fill`` (fraction of regions marked) are None in sync;
    ``split_time`` is seconds since the epoch; ``error`` says why the image failed;
    ``stuck_io``: I/Os left behind in flight on its device when it was failed as slow
    (``Leg.stuck_io``; a resync waits for them)."""
    index: int
    id: int
    path: str
    state: ImageState
    generation: int
    split_time: float | None
    bitmap_fill: float | None      # dirty fraction of the change bitmap (None for in-sync)
    dirty_bytes: int | None
    error: str | None
    stuck_io: int = 0


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """What ``MirrorVolume.split`` returns."""
    index: int
    path: str
    split_time: float             # wall clock of T
    generation: int
    drained: int                  # I/Os begun before T that split waited for


class Completion:
    """One leg's outcome, handed from a Worker to the issuing thread: ``done(exc)`` once (exc
    None on success), ``wait()`` blocks until then and returns exc."""
    __slots__ = ("_gate", "exc")

    def __init__(self):
        self._gate = threading.Lock()
        self._gate.acquire()
        self.exc = None

    def done(self, exc):
        """Record the outcome ``exc`` (None: success) and wake ``wait``. Once only: a second
        call raises RuntimeError (the gate is already open)."""
        self.exc = exc
        self._gate.release()

    def wait(self):
        """Block until ``done`` ran; returns its ``exc`` (None: success). For one waiter, once:
        the call consumes the gate."""
        self._gate.acquire()
        return self.exc


class Worker:
    """A few persistent threads running queued calls: one image's share of fanned-out I/O, or a
    LUN's commands. ``submit(fn, arg)`` runs ``fn(arg)`` on one of them and returns a Completion
    whose ``wait()`` gives the exception it raised (None on success); ``post(fn, arg)`` runs it
    with nobody waiting (no Completion: a LUN's command reports back through its own queue; an
    exception is logged and the thread goes on). A SimpleQueue and plain threads: no Future
    per call (ThreadPoolExecutor's costs about 6 CPU us per submit)."""

    def __init__(self, name, nthreads=WORKER_THREADS):
        """Start ``nthreads`` threads named ``name-K``. RuntimeError when one cannot start (no
        thread left: systemd's TasksMax), the ones already started stopped first."""
        self._q = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{k}", daemon=True)
                         for k in range(nthreads)]
        for k, t in enumerate(self._threads):
            try:
                t.start()
            except BaseException:
                for _ in range(k):
                    self._q.put(None)
                self._threads = []
                raise

    def _run(self):
        get = self._q.get
        while True:
            item = get()
            if item is None:
                return
            fn, arg, comp = item
            try:
                fn(arg)
            except BaseException as e:  # handed to the issuing thread
                if comp is None:
                    log.exception("%s: unexpected error", threading.current_thread().name)
                else:
                    comp.done(e)
            else:
                if comp is not None:
                    comp.done(None)

    def submit(self, fn, arg) -> Completion:
        """Run ``fn(arg)`` on a worker; returns the Completion to wait on."""
        comp = Completion()
        self._q.put((fn, arg, comp))
        return comp

    def submit_to(self, fn, arg, comp) -> None:
        """Run ``fn(arg)`` on a worker and call ``comp.done(exc)`` (exc None on success)."""
        self._q.put((fn, arg, comp))

    def post(self, fn, arg) -> None:
        """Run ``fn(arg)`` on a worker; nobody waits for it."""
        self._q.put((fn, arg, None))

    @property
    def running(self) -> bool:
        """False once ``stop`` was called."""
        return bool(self._threads)

    def stop(self, wait: bool = False):
        """Let every thread end once the work queued before this call is done; with ``wait``,
        join them. Idempotent. Work queued after it never runs (``BoundedIO.cancel``)."""
        threads, self._threads = self._threads, []
        for _ in threads:
            self._q.put(None)
        if wait:
            for t in threads:
                t.join()


# ---- I/O left behind on a device -------------------------------------------------------------
#
# A bounded fan-out (``leg_timeout``) completes a write without a leg that has not answered; the
# leg's I/O is still in flight in the kernel and lands whenever the device answers (a dm-delay
# or a path failover may take minutes). Such an I/O is counted here, per device and for the
# whole process, until it returns: an object that opens the same device again (the volume
# reopened after a LUN was removed and added, the image detached and attached again) still sees
# it. A process of its own per volume cannot see another's count; none needs to: a process
# whose thread is blocked in the device does not end until the I/O returns (SIGKILL included),
# and lvmirrord starts no process for a volume until the previous one ended
# (``VolumeProcess.stop`` waits for it).

STUCK_IO_WAIT = 5.0     # seconds a resync or split waits for I/O left behind to return
# bytes a second, far below any disk: an I/O lvmirror bounds on its own (a resync's copy, its
# flush of an image that serves no reads) may take leg_timeout plus its bytes at this rate
MIN_DEVICE_RATE = 4_000_000
MIN_DEVICE_IOPS = 100   # and each of its writes at this rate (a disk's random writes)
# seconds allowed for a flush when what it must write back is unknown (this process has not
# flushed the image yet): the kernel's default dirty_expire, after which the page cache writes
# back on its own whatever an earlier process left
UNKNOWN_DIRTY_WAIT = 30.0

_left_cv = threading.Condition()
_left: dict = {}


def device_of(path):
    """The identity ``StorageImage.device`` gives the file or block device at ``path``
    (``("block", st_rdev)`` or ``("file", st_dev, st_ino)``), None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return ("block", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("file", st.st_dev, st.st_ino)


def left_behind(device) -> None:
    """Count one I/O left in flight on ``device`` (a ``StorageImage.device`` identity)."""
    with _left_cv:
        _left[device] = _left.get(device, 0) + 1


def returned(device) -> None:
    """One I/O counted by ``left_behind(device)`` returned; wakes ``wait_returned``."""
    with _left_cv:
        n = _left.get(device, 0) - 1
        if n > 0:
            _left[device] = n
        else:
            _left.pop(device, None)
        _left_cv.notify_all()


def in_flight(device) -> int:
    """I/Os counted on ``device`` and not returned yet."""
    return _left.get(device, 0)


def wait_returned(device, timeout: float) -> int:
    """Wait up to ``timeout`` seconds until no I/O is left in flight on ``device``; returns
    how many still are (0: none)."""
    with _left_cv:
        _left_cv.wait_for(lambda: not _left.get(device), timeout)
        return _left.get(device, 0)


class BoundedIO:
    """One I/O on a leg's worker that its issuer may stop waiting for: the worker calls
    ``done(exc)`` (exc None on success); the issuer waits with ``wait(timeout)`` and, when
    that times out, calls ``give_up(device)``. Whichever of ``done`` and ``give_up`` comes
    second knows which came first: an I/O given up on is counted on its device
    (``left_behind``) until it returns."""

    __slots__ = ("mu", "gate", "exc", "ended", "left_on", "started", "cancelled", "on_late")

    def __init__(self, on_late=None):
        """``on_late(exc)``: called when an I/O given up on returns an error (before it stops
        counting as left behind), e.g. ``Leg.late_error``."""
        self.on_late = on_late
        self.mu = threading.Lock()
        self.gate = threading.Lock()
        self.gate.acquire()
        self.exc = None
        self.ended = False
        self.left_on = None
        self.started = False
        self.cancelled = False

    def start(self) -> bool:
        """Called by the worker before it makes the I/O: False if ``cancel`` came first (the
        I/O is not made then; the worker still calls ``done(None)``, which changes nothing
        the canceller relies on)."""
        with self.mu:
            if self.cancelled:
                return False
            self.started = True
            return True

    def cancel(self) -> bool:
        """Stop waiting for an I/O its worker has not begun (its threads busy with other I/O on
        the device, or stopped): True if it never will be made; False once it has begun."""
        with self.mu:
            if self.started or self.ended:
                return False
            self.cancelled = True
            return True

    def done(self, exc) -> None:
        """The I/O ended with ``exc`` (None: success); called once, by the worker."""
        with self.mu:
            self.exc, self.ended = exc, True
            if self.left_on is not None:
                if exc is not None and self.on_late is not None:
                    self.on_late(exc)
                returned(self.left_on)
        self.gate.release()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``done``; True if it ran."""
        return self.gate.acquire(timeout=timeout)

    def give_up(self, device) -> bool:
        """Stop waiting: True if the I/O is still in flight (now counted on ``device``), False
        if it ended meanwhile (``exc`` holds its outcome)."""
        with self.mu:
            if self.ended:
                return False
            self.left_on = device
            left_behind(device)
            return True


class Leg:
    """Runtime state of one image of the mirror set, a *leg* in dm-mirror's words: its metadata
    record (``rec``: path, state, generation, resync cursor...), its open storage (a StorageImage,
    or None when it could not be opened), its change bitmap (None while in sync), its state and
    the worker threads that issue its share of fanned-out I/O."""

    def __init__(self, rec, storage, bitmap):
        self.rec = rec
        self.storage = storage
        self.bitmap: RegionBitmap | None = bitmap
        self.state = ImageState(rec.state)
        self.worker: Worker | None = None
        self.exported = 0          # SplitImageVolume objects serving this split image
        # the split.PendingSplit of a split between prepare and finish (None otherwise)
        self.split_busy = None
        # (storage, its flush_failures_seen) when the split was done: a restore refuses the
        # copy for any flush failure not answered before the split (JobControl._restorable).
        # None: not split here (split before this open: every failure of this storage counts)
        self.split_flush_base = None
        # the BoundedIOs of a copy's reads of this image given up on as slow
        # (``resync._read_source``); while one has not ended the device does not answer
        # reads, and a copy's next read of it is not made
        self.hung_reads: list[BoundedIO] = []
        self._hung_mu = threading.Lock()   # the job's thread and the I/O threads add to it
        # a copy's read-ahead hints for this image (``resync._prefetch``): the byte ranges
        # waiting, and whether a task on the worker is taking them (at most one: a hint held by
        # a device that stopped answering holds one of the worker's threads, never all)
        self.hints: collections.deque = collections.deque(maxlen=HINTS_MAX)
        self.hinting = False
        self.hint_mu = threading.Lock()

    @property
    def device(self):
        """The identity of the image's file or block device (``StorageImage.device``); while
        it is not open (it could not be, at the volume's open), that of what its path names
        now (``device_of``), None when nothing is there."""
        if self.storage is not None:
            return self.storage.device
        return device_of(self.rec.path)

    def abandoned_io(self):
        """One I/O on this leg was left behind in flight (failed as slow, ``leg_timeout``);
        counted on its device (``left_behind``). Returns the device, for
        ``abandoned_io_done``."""
        dev = self.storage.device
        left_behind(dev)
        return dev

    def late_error(self, exc) -> None:
        """An I/O left behind on this leg returned the error ``exc``: a split of the image
        under way must not be saved as done (``PendingSplit.lost``; the image already has the
        I/O's range marked)."""
        p = self.split_busy
        if p is not None and p.lost is None:
            p.lost = f"an I/O left behind on it as slow returned: {exc}"

    @staticmethod
    def abandoned_io_done(device) -> None:
        """An I/O left behind by ``abandoned_io`` on ``device`` returned from the device."""
        returned(device)

    def read_hung(self, bio: BoundedIO) -> None:
        """A copy's read of this image, ``bio``, was given up on as slow (``hung_reads``)."""
        with self._hung_mu:
            self.hung_reads.append(bio)

    def reads_hung(self) -> int:
        """How many of a copy's reads of this image that were given up on as slow
        (``hung_reads``) have not returned yet; the ones that have are forgotten."""
        with self._hung_mu:
            self.hung_reads = [c for c in self.hung_reads if not c.ended]
            return len(self.hung_reads)

    @property
    def stuck_io(self) -> int:
        """I/Os left behind in flight on this image's device that have not returned yet, by
        this volume or any other object of the process that had the device open (a volume
        closed and opened again, an image detached and attached again). While any is, a
        resync of the image is refused and a split of it does not complete: such a write may
        land after the copy of its region, or in the frozen copy (md likewise keeps a faulty
        disk until its pending I/O is done)."""
        dev = self.device
        return in_flight(dev) if dev is not None else 0

    def wait_stuck(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for ``stuck_io`` to reach 0; returns what is still
        in flight then (0: none)."""
        dev = self.device
        return wait_returned(dev, timeout) if dev is not None else 0

    def sync_rec(self):
        """Copy the in-memory state into the metadata record (before a save). An image whose
        split is prepared but has not reached T is saved as split already: a crash before T
        leaves a point-in-time copy as of the crash, never an image taken for in sync that
        missed the writes after T (``split.py``)."""
        if self.split_busy is not None and self.state is ImageState.IN_SYNC:
            self.rec.state = ImageState.SPLIT.value
        else:
            self.rec.state = self.state.value


def check_image_fits(st, size, block_size):
    """Raise ConfigError unless StorageImage ``st`` holds ``size`` bytes and its logical block
    size is at most the volume's ``block_size`` (bytes)."""
    if st.size < size:
        raise ConfigError(f"image {st.path}: {st.size} bytes, smaller than the volume's {size}")
    if st.logical_block_size > block_size:
        raise ConfigError(f"image {st.path}: logical block size {st.logical_block_size} is "
                          f"larger than the volume block size {block_size}")
