"""MirrorVolume: one LUN on a mirror set of 1-4 storage images.

Data path
---------
* Every I/O takes a range lock on its LBAs from ``vol.locks`` (writes exclusive, reads shared),
  so overlapping writes land in the same order on every image and a resync/restore copy of a
  region (exclusive) never races a write.
* Then it *enters the current I/O epoch*: a frozen description of which images a write goes to
  (in-sync + syncing), which images a read may use (in-sync) and which change bitmaps a write
  must mark first (split / failed images). Entering is one counter increment under a tiny lock;
  leaving decrements it. State changes (split, fail, resync start/finish, attach, detach) build
  a new epoch and swap it in; the swap is the instant T of the change.
* A write marks the write-intent log (durable before any image sees the write), marks the
  epoch's change bitmaps, then goes to every target image in parallel (one inline, the others on
  per-image worker threads) and is acknowledged only when all of them finished.
* An ImageIOError fails that image (persisted before the I/O completes), gives it a change
  bitmap holding the failed range and every region it may hold only in a volatile cache (the
  write-intent log's regions: a failed image is never flushed again), and the I/O succeeds if
  an in-sync image has the data. A write of an older epoch that lands on an image failed
  meanwhile marks its range there too (``_mark_late``). The last in-sync image is never
  failed: its error goes to the initiator as VolumeIOError.

Split at T
----------
``split(i)`` persists the image as split, swaps in an epoch without image i (T), then waits only
for the *older* epochs to drain: I/O begun before T completes to image i as well (point 1), I/O
begun after T never targets image i and never waits for the split (point 2), and when split
returns image i holds exactly the writes begun before T (point 3). Every write of the new epoch
marks image i's change bitmap before it reaches any image (point 5).

Crash safety
------------
``volume.json`` says ``clean_shutdown: false`` while open. On the next open after a crash every
region marked in the write-intent log is (a) merged into each split / failed / syncing image's
change bitmap before the volume serves I/O and (b) copied from the first in-sync image to the
other live images while it serves, as md resyncs after an unclean shutdown: until a region is
copied every read of it uses that one image (``recovery.py``, ``_settle_torn``), so no image
that may have missed a write is read from, and a restart answers the ring's commands at once.
Change bitmaps of split and failed images are saved lazily (``checkpoint``, run by a flusher
thread and on close): ``checkpoint`` takes a ticket from the log, snapshots the bitmaps,
fdatasyncs every image, saves the snapshots and only then clears log bits whose last write
ended before the ticket. Every save of state that vouches for data goes through the
durability barrier (``durability.py``): the data first, then the state. A write whose mark is missing from a saved bitmap therefore
still has its log bit set, and recovery's merge restores the mark. The flusher clears only
regions idle since its previous round (the ticket of the round before), as md's bitmap daemon
waits before clearing a bit: a region under steady writes stays marked instead of being
cleared and re-marked (a durable log write each time) every round.

Interrupted resyncs, restores and scrubs resume automatically in ``open`` (see ``vol.jobs``).

Where the rest lives
--------------------
``legs.py`` (image states, the runtime record of each image, its I/O workers),
``jobcontrol.py`` (resync, restore, attach, detach and their progress on disk; ``vol.control``),
``split.py`` (a split in its three steps, prepare / switch at T / finish; ``vol.splits``),
``resync.py`` (the copy loops), ``scrub.py`` (the images checked against each other,
repaired by majority vote; ``vol.scrubs``), ``recovery.py`` (crash recovery), ``splitexport.py`` (a split
image served as its own LUN), ``durability.py`` (the ordering of data before state),
``wil.py``, ``bitmap.py``, ``regionlock.py``, ``metadata.py``, ``image.py``.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time

from lvmirror.errors import ConfigError, ImageIOError, StateError, VolumeIOError, WouldBlock
from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.durability import DurabilityBarrier, not_durable
from lvmirror.mirror import imagecheck
from lvmirror.mirror.image import StorageImage
from lvmirror.mirror.jobcontrol import JobControl
from lvmirror.mirror.ringlease import RingLease
from lvmirror.mirror.legs import (MAX_IMAGES, MIN_DEVICE_IOPS, MIN_DEVICE_RATE,
                                  UNKNOWN_DIRTY_WAIT, ImageInfo, ImageState, Leg, SplitInfo,
                                  Worker, check_image_fits)
from lvmirror.mirror.metadata import VolumeMetadata, geometry_problem, valid_volume_name
from lvmirror.mirror import provisioning
from lvmirror.mirror.recovery import RecoveryProgress, recover
from lvmirror.mirror.regionlock import RegionLockManager
from lvmirror.mirror.scrub import ScrubControl
from lvmirror.mirror.split import SplitControl
from lvmirror.mirror.splitexport import SplitImageVolume
from lvmirror.mirror.wil import WriteIntentLog

__all__ = ["ImageInfo", "ImageState", "MirrorVolume", "SplitImageVolume", "SplitInfo", "MAX_IMAGES"]

FANOUT_MODES = ("auto", "parallel", "serial")
# Below this size a buffered (page cache) write is a memcpy shorter than a thread hand-off,
# so "auto" issues it on the calling thread to each image in turn.
PARALLEL_MIN_BYTES = 128 << 10
# How long one leg may hold an I/O behind an in-sync leg that finished it (seconds): md fails a
# failfast leg at its first error, DRBD detaches a disk after disk-timeout; a dying disk is often
# slow before it is dead. 4 s keeps a write answered within a 5 s initiator SCSI timeout (Linux sd
# defaults to 30 s) while a healthy leg under a burst of flushes lags its peer by far less.
LEG_TIMEOUT = 4.0
# a full file system fails every write: its warning is logged at most this often (seconds)
SPACE_LOG_INTERVAL = 10.0

log = logging.getLogger(__name__)


class _Epoch:
    __slots__ = ("seq", "writes", "reads", "tracking", "inflight", "retired")

    def __init__(self, seq, writes, reads, tracking):
        self.seq = seq
        self.writes = writes
        self.reads = reads
        self.tracking = tracking
        self.inflight = 0
        self.retired = False


class _LegGroup:
    """The legs of one bounded fan-out: results by leg, when the first in-sync leg finished.

    Two locks serve as one-shot events (C-level acquire/release: a Condition costs a lock
    allocation and a Python-level wait per write): ``any_ok`` is released when the first
    in-sync leg succeeded (or, failing that, when the last leg ended), ``all_done`` when the
    last leg ended. ``mu`` guards the fields."""

    __slots__ = ("mu", "results", "left", "first_ok", "fastest", "any_ok", "all_done",
                 "abandoned", "oks")

    def __init__(self, nlegs):
        self.mu = threading.Lock()
        self.results = {}
        self.oks = []           # (monotonic time, leg) of each in-sync leg that succeeded
        self.abandoned = ()     # {leg: device} the I/O completed without (still in flight)
        self.left = nlegs
        self.first_ok = None
        self.fastest = None
        self.any_ok = threading.Lock()
        self.any_ok.acquire()
        self.all_done = threading.Lock()
        self.all_done.acquire()


class _LegDone:
    """A worker's completion for one leg of a _LegGroup (``done(exc)``, as Completion)."""

    __slots__ = ("group", "img", "in_sync")

    def __init__(self, group, img, in_sync):
        self.group, self.img, self.in_sync = group, img, in_sync

    def done(self, exc):
        """Record leg ``img``'s outcome ``exc`` (None: success) in the group; release ``any_ok`` at
        the first in-sync success (or at the last leg if none succeeded), ``all_done`` at the last
        leg. Called once per leg, by its worker."""
        g = self.group
        with g.mu:
            if self.img in g.abandoned:      # failed as slow: its I/O has returned now
                if exc is not None:          # (before the count drops: a split waits for it)
                    self.img.late_error(exc)
                self.img.abandoned_io_done(g.abandoned[self.img])
            g.results[self.img] = exc
            g.left -= 1
            last = g.left == 0
            first = False
            if exc is None and self.in_sync:
                now = time.monotonic()
                g.oks.append((now, self.img))
                if g.first_ok is None:
                    first = True
                    g.first_ok = now
                    g.fastest = self.img
            wake_any = first or (last and g.first_ok is None)
        if wake_any:
            g.any_ok.release()
        if last:
            g.all_done.release()


# How many sequential read streams ``MirrorVolume._read_start`` follows at once (the table of
# recent reads' end offsets is emptied when it holds this many).
READ_STREAMS = 64



class _FastToken:
    """One batch of the compiled path without the GIL (``MirrorVolume.begin_fast_writes``/
    ``begin_fast_reads``): the split epoch it entered, whether its region locks are shared,
    the write-intent log its WRITEs begin in (None: one leg, or READs), and what
    ``lock_fast`` took for its commands: their locks, log tokens and ranges (``ranges``: the
    callable giving each command's ``(first block, blocks)``, or None)."""

    __slots__ = ("epoch", "shared", "wil", "locks", "begun", "ranges")

    def __init__(self, epoch, shared: bool, wil):
        self.epoch = epoch
        self.shared = shared
        self.wil = wil
        self.locks = []
        self.begun = []
        self.ranges = None

    def release(self) -> None:
        """Release every lock taken (the region lock manager wakes their waiters)."""
        locks, self.locks = self.locks, []
        for lk in locks:
            lk.release()


def _add_lease_counts(d: dict, lease, storages: list) -> None:
    """Add the READs and WRITEs the ring thread made under ``lease`` and has not counted yet
    (``MirrorVolume.end_ring_lease`` counts them) to the statistics ``d`` (``MirrorVolume.stats``:
    the volume's, and in ``d["images"]`` each of ``storages``' own)."""
    reads, rbytes, writes, wbytes = (lease.reads, lease.read_bytes, lease.writes,
                                     lease.write_bytes)
    d["reads"] = d.get("reads", 0) + reads
    d["bytes_read"] = d.get("bytes_read", 0) + rbytes
    d["writes"] = d.get("writes", 0) + writes
    d["bytes_written"] = d.get("bytes_written", 0) + wbytes
    for st, one in zip(storages, d["images"]):
        if one is None or st is None:
            continue
        if st is lease.read_storage:
            one["reads"] += reads
            one["bytes_read"] += rbytes
        if st in (lease.write_storage or ()):
            one["writes"] += writes
            one["bytes_written"] += wbytes


class MirrorVolume:
    """A mirrored volume; see the module docstring. Use ``create`` or ``open``."""

    def __init__(self, md: VolumeMetadata, meta_dir, images: list[Leg], wil: WriteIntentLog,
                 *, direct, opener, flush_interval, fanout="auto", leg_timeout=None, torn=()):
        """Use ``create`` or ``open``. ``torn``: regions (indexes) the in-sync images may
        disagree on (crash recovery's, ``recovery.recover``): read from one image and copied
        to the others by a background thread."""
        self._md = md
        self._meta_dir = os.fspath(meta_dir)
        self._vdir = VolumeMetadata.volume_dir(meta_dir, md.name)
        self._images = images
        self._wil = wil
        self._direct = direct
        self._opener = opener
        if fanout not in FANOUT_MODES:
            raise ConfigError(f"volume {md.name}: fanout must be one of {FANOUT_MODES}, "
                              f"got {fanout!r}")
        self._fanout_mode = fanout
        if leg_timeout is not None and (not isinstance(leg_timeout, (int, float))
                                        or leg_timeout < 0):
            raise ConfigError(f"volume {md.name}: leg_timeout must be a number of seconds >= 0 "
                              f"(0: off), got {leg_timeout!r}")
        # seconds a leg may lag behind an in-sync leg on the same I/O before it is failed as
        # slow (0 / None: never); see _fanout
        self.leg_timeout = leg_timeout or None
        self.name = md.name
        self.block_size = md.block_size
        self.size = md.size
        self.num_blocks = md.size // md.block_size
        self.region_size = md.region_size
        self._region_shift = md.region_size.bit_length() - 1
        # bytes one write-intent log bit covers (a power of two >= region_size)
        self.intent_chunk = md.intent_chunk
        self.locks = RegionLockManager(md.name)
        self._mgmt = threading.RLock()      # serialises management operations
        self._meta = threading.RLock()      # image states, epoch construction, metadata saves
        self._elock = threading.Lock()
        # the newest retired epoch that wrote one image and tracked nothing (its writes set
        # no write-intent bit), and the newest such one a flush of the in-sync images came
        # after (``sources_durable``); 0 and -1 at open: what an earlier process wrote may
        # still be only in the page cache (a kill keeps it), so the first resync flushes
        self._unlogged_seq = 0
        self._sources_seq = -1
        self._sources_flush = threading.Lock()
        self._econd = threading.Condition(self._elock)
        self._lease: RingLease | None = None     # the ring thread's (begin_ring_lease), under _elock
        self._retired: list[_Epoch] = []
        self._epoch_seq = itertools.count(1)
        self._rr = itertools.count()
        # end offset (bytes) of a recent read -> the leg it went to (``_read_start``)
        self._streams: dict[int, Leg] = {}
        self._closed = False
        self.control = JobControl(self)   # resync, restore, attach, detach (jobcontrol.py)
        self.splits = SplitControl(self)  # split at T, split images as LUNs (split.py)
        self.scrubs = ScrubControl(self)  # check the images against each other (scrub.py)
        # image id -> running ResyncJob / RestoreJob; scrub.SCRUB_KEY -> the ScrubJob
        self.jobs: dict[int | str, object] = {}
        self._stats = dict(reads=0, writes=0, bytes_read=0, bytes_written=0, flushes=0,
                           unmaps=0, read_errors=0, write_errors=0, image_failures=0,
                           compare_miscompares=0, space_errors=0, metadata_errors=0,
                           offline_events=0, slow_legs=0)
        self._offline: str | None = None    # why no image can serve (see check_ready)
        # regions the images may differ on: a write failed there for lack of space on every
        # image (one wrote part of it), or a crash left them in the write-intent log; reads use
        # one image until _settle_torn repairs them
        self._torn: set[int] = set(torn)
        self._space_logged = -SPACE_LOG_INTERVAL
        for img in images:
            self._start_worker(img)
        # every save of state that vouches for image data goes through this (durability.py)
        self._barrier = DurabilityBarrier(md.name, self._flush_failed)
        with self._meta:
            self._epoch = self._build_epoch()
        self._stop_flusher = threading.Event()
        self._flusher = None
        self._prev_ticket = 0          # the write-intent log ticket of the previous checkpoint
        if flush_interval:
            self._flusher = threading.Thread(target=self._flush_loop, args=(flush_interval,),
                                             name=f"{md.name}-flusher", daemon=True)
            self._flusher.start()
        self._recovery = None
        self.recovery: RecoveryProgress | None = None   # crash recovery's online copy
        if self._torn:
            self.recovery = RecoveryProgress(len(self._torn), self.region_size,
                                             lambda: len(self._torn))
            self._recovery = threading.Thread(target=self._recover_online,
                                              name=f"{md.name}-recovery", daemon=True)
            self._recovery.start()

    # ==== construction ============================================================================

    @classmethod
    def create(cls, name, image_paths, *, meta_dir, block_size=512, region_size=1 << 20,
               size=None, direct=False, opener=None, flush_interval=2.0,
               rate_limit=None, fanout="auto", leg_timeout=LEG_TIMEOUT,
               force=False, intent_chunk=None) -> MirrorVolume:
        """Create a volume. The first image is the source (in-sync); the others start a full
        resync from it (``vol.jobs``). Missing image files are created when ``size`` is given.

        Before anything is written (``imagecheck``): a path named twice (another spelling, a
        symlink, another node of the same device) and a path that is a current image of
        another volume in ``meta_dir`` are refused; block devices are opened exclusively
        (O_EXCL, as LIO's iblock does; the ConfigError names the holder); a secondary image
        that already holds data is refused, saying what was found, unless ``force`` (cfgstring
        ``force=1``): as ``mdadm --create`` and ``pvcreate`` refuse a device that carries data,
        since the full resync overwrites it. The first image (the source) may hold data.

        ``opener(path, direct=...)`` opens an image (default StorageImage.open; tests pass
        wrappers). ``flush_interval``: seconds between background checkpoints (None: only on
        ``checkpoint()``/close). ``fanout``: how a write reaches the images: "parallel" (one
        inline, the others on per-image worker threads, always), "serial" (each in turn on the
        calling thread), "auto" (parallel for O_DIRECT images, FUA writes, flushes and writes
        of at least PARALLEL_MIN_BYTES; serial for small buffered writes, where the hand-off
        costs more than the copy into the page cache). ``leg_timeout``: seconds one image may
        lag behind an in-sync image on the same write or flush (or take on a read) before it
        is failed as slow and the I/O completes without it (0 or None: never; default
        LEG_TIMEOUT).

        ``region_size`` (bytes, a power of two >= ``block_size``): the granularity of the
        change bitmaps, so of what a resync or restore copies. ``intent_chunk`` (bytes, a power
        of two >= ``region_size``; None: ``max(region_size, INTENT_CHUNK)``, 64 MiB, mdadm's
        internal bitmap chunk): what one write-intent log bit covers. A write that finds its
        chunk's bit clear waits for the log's save (an fdatasync); a coarser chunk means fewer
        of those, and more to copy after a crash (every region of each marked chunk). ConfigError
        for either out of range."""
        opener = opener or _default_opener
        if not valid_volume_name(name):
            raise ConfigError(f"invalid volume name {name!r}: use letters, digits, _ . : -")
        if block_size not in (512, 4096):
            raise ConfigError(f"volume {name}: block size must be 512 or 4096, got {block_size}")
        problem = geometry_problem(block_size, region_size, intent_chunk)
        if problem:
            raise ConfigError(f"volume {name}: {problem}")
        paths = [os.fspath(p) for p in image_paths]
        if not 1 <= len(paths) <= MAX_IMAGES:
            raise ConfigError(f"volume {name}: 1 to {MAX_IMAGES} images, got {len(paths)}")
        imagecheck.check_distinct(paths, name=name)
        if size is not None and (not isinstance(size, int) or size <= 0 or size % block_size):
            raise ConfigError(f"volume {name}: size must be a positive multiple of the block "
                              f"size {block_size}, got {size!r}")
        # from the checks until volume.json names the images: no other create or attach in
        # this process can claim the same paths in between
        with imagecheck.claim_lock:
            if VolumeMetadata.exists(meta_dir, name):
                raise ConfigError(f"volume {name}: already exists in {meta_dir}")
            imagecheck.check_not_in_other_volume(paths, meta_dir, name=name)
            storages = []
            created = []        # files made here: sparse, nothing to lose; removed if refused
            try:
                for p in paths:
                    if not os.path.exists(p) and size is not None:
                        StorageImage.create_file(p, size)
                        created.append(p)
                    storages.append(opener(p, direct=direct))
                if size is None:
                    size = storages[0].size - storages[0].size % block_size
                    if size <= 0:
                        raise ConfigError(f"image {paths[0]}: smaller than one block")
                for st in storages:
                    check_image_fits(st, size, block_size)
                for k in range(1, len(paths)):
                    if paths[k] in created:
                        continue
                    found = imagecheck.check_create_secondary(name, paths, k, force=force)
                    if found is not None:
                        log.warning("volume %s: image %s held data (%s); overwritten by the "
                                    "full resync as forced", name, paths[k], found.describe())
            except BaseException:
                for st in storages:
                    st.close()
                for p in created:       # a refused create leaves no file it made behind
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
                raise
            md = VolumeMetadata.new(name, block_size=block_size, size=size,
                                    region_size=region_size, intent_chunk=intent_chunk)
            md.generation = 1
            vdir = VolumeMetadata.volume_dir(meta_dir, name)
            os.makedirs(vdir, exist_ok=True)
            images = []
            for k, (p, st) in enumerate(zip(paths, storages)):
                if k == 0:
                    rec = md.add_image(p, ImageState.IN_SYNC.value, generation=1)
                    bm = None
                else:
                    rec = md.add_image(p, ImageState.SYNCING.value, generation=0)
                    rec.resync_next, rec.resync_full, rec.resync_rate = 0, True, rate_limit
                    bm = RegionBitmap(size, region_size)
                    bm.set_all()
                    bm.save(VolumeMetadata.bitmap_path(vdir, rec.id))
                images.append(Leg(rec, st, bm))
            wil = WriteIntentLog(VolumeMetadata.wil_path(vdir), size, md.intent_chunk)
            wil.save()
            md.clean_shutdown = False
            md.save(meta_dir)
        vol = cls(md, meta_dir, images, wil, direct=direct, opener=opener,
                  flush_interval=flush_interval, fanout=fanout, leg_timeout=leg_timeout)
        vol.control.resume()
        return vol

    @classmethod
    def open(cls, name, *, meta_dir, direct=False, opener=None, flush_interval=2.0,
             fanout="auto", leg_timeout=LEG_TIMEOUT) -> MirrorVolume:
        """Open an existing volume; crash recovery happens here (module docstring). The
        keyword arguments are ``create``'s."""
        opener = opener or _default_opener
        md = VolumeMetadata.load(meta_dir, name)
        vdir = VolumeMetadata.volume_dir(meta_dir, name)
        images: list[Leg] = []
        try:
            for rec in md.images:
                storage = None
                try:
                    storage = opener(rec.path, direct=direct)
                except ConfigError as e:
                    if rec.state in (ImageState.IN_SYNC.value, ImageState.SYNCING.value):
                        rec.state = ImageState.FAILED.value
                        rec.resync_next = None
                    rec.error = f"cannot open at volume open: {e}"
                if storage is not None:
                    try:
                        check_image_fits(storage, md.size, md.block_size)
                    except ConfigError:
                        storage.close()
                        raise
                bm = None
                if rec.state != ImageState.IN_SYNC.value:
                    bpath = VolumeMetadata.bitmap_path(vdir, rec.id)
                    try:
                        bm = RegionBitmap.load(bpath, md.size, md.region_size)
                    except (OSError, ValueError) as e:
                        bm = RegionBitmap(md.size, md.region_size)
                        bm.set_all()
                        rec.error = ((rec.error + "; ") if rec.error else "") + \
                            f"change bitmap unusable ({e}); full resync needed"
                images.append(Leg(rec, storage, bm))
            in_sync = [im for im in images if im.state is ImageState.IN_SYNC]
            if not in_sync:
                raise ConfigError(f"volume {name}: no in-sync image can be opened: " + "; ".join(
                    f"{im.rec.path}: {im.state.value}{' (' + im.rec.error + ')' if im.rec.error else ''}"
                    for im in images))
            for im in images:
                if im.storage is None and im.rec.error and im.state is ImageState.FAILED \
                        and im.bitmap is not None and "cannot open" in im.rec.error:
                    im.bitmap.set_all()   # it vanished: we cannot know what it missed
            wil, problem = WriteIntentLog.load_or_create(VolumeMetadata.wil_path(vdir), md.size,
                                                        md.intent_chunk)
            if problem == "missing" and not md.clean_shutdown:
                wil.bitmap.set_all()   # unclean and no log: every region is suspect
            torn = set()
            if not md.clean_shutdown or (problem and problem != "missing"):
                torn = recover(md, vdir, images, wil)
            md.clean_shutdown = False
            md.generation += 1
            md.save(meta_dir)
        except BaseException:
            for im in images:
                if im.storage is not None:
                    im.storage.close()
            raise
        vol = cls(md, meta_dir, images, wil, direct=direct, opener=opener,
                  flush_interval=flush_interval, fanout=fanout, leg_timeout=leg_timeout,
                  torn=torn)
        vol.control.resume()
        vol.scrubs.resume()
        return vol

    @property
    def meta_dir(self) -> str:
        """The directory holding this volume's state directory ``<meta_dir>/<name>/``
        (lvmirrord's ``--state-dir``, or the cfgstring's ``state_dir``)."""
        return self._meta_dir

    @staticmethod
    def exists(name, *, meta_dir) -> bool:
        """True if volume ``name`` has metadata in ``meta_dir``."""
        return VolumeMetadata.exists(meta_dir, name)

    def _start_worker(self, img):
        """Give Leg ``img`` (with storage, without a worker) a new I/O worker. Its read-ahead
        hints start afresh: a hint task posted to the worker it had as that one stopped never
        ran (``Worker.stop``), which left ``hinting`` set and every later hint queued only
        (``resync._prefetch``; trial 31, LOW)."""
        if img.worker is None and img.storage is not None:
            with img.hint_mu:
                img.hints.clear()
                img.hinting = False
            img.worker = Worker(f"{self.name}-img{img.rec.id}")

    # ==== epochs ==================================================================================

    def _build_epoch(self) -> _Epoch:
        writes = tuple(im for im in self._images
                       if im.state in (ImageState.IN_SYNC, ImageState.SYNCING)
                       and im.storage is not None)
        reads = tuple(im for im in writes if im.state is ImageState.IN_SYNC)
        tracking = tuple(im.bitmap for im in self._images
                         if im.state in (ImageState.SPLIT, ImageState.FAILED)
                         and im.bitmap is not None)
        return _Epoch(next(self._epoch_seq), writes, reads, tracking)

    def _switch_epoch(self) -> _Epoch:
        """Swap in an epoch built from the current image states (caller holds _meta)."""
        new = self._build_epoch()
        with self._elock:
            old = self._epoch
            old.retired = True
            if len(old.writes) == 1 and not old.tracking:
                self._unlogged_seq = max(self._unlogged_seq, old.seq)   # (sources_durable)
            if old.inflight:
                self._retired.append(old)
            self._epoch = new
            lease = self._lease
        if lease is not None and lease.epoch is old:
            lease.revoke()                  # its holder ends it: then the old epoch drains
        return new

    def sources_durable(self, epoch: _Epoch) -> None:
        """Make the in-sync images durable (``fdatasync``, the durability barrier) before a
        resync copies from them, when an epoch older than ``epoch`` (which the caller has
        drained: ``_drain``) wrote one image and tracked nothing and no flush came after it:
        its writes set no write-intent bit (a one-image volume's: nothing could differ then),
        so no checkpoint made their data durable, and a copy of it that the resync calls in
        sync (a cursor, the in-sync mark) would, after a power cut, hold what the source
        lost, unseen. Also the first time after the volume opened: an earlier process's
        writes may be only in the page cache (a kill keeps it; a creation copies a source
        someone just filled). Nothing otherwise (a split image's resync: its sources' writes
        set their bits), so such a resync pays no flush. Later writes reach the resync's
        image too and set their bits. An image whose flush fails is failed
        (``_flush_failed``); when that was the last in-sync image (the volume goes offline
        instead) VolumeIOError is raised and the resync stops, its image still syncing.
        Found by the tenth and eleventh newcomer trials (an attach to a
        one-image volume; a resync resumed after a restart; a creation, 2026-12-05)."""
        with self._sources_flush:
            with self._elock:
                # epochs before ``epoch`` are drained: a flush now covers their writes
                due = min(self._unlogged_seq, epoch.seq - 1)
            if due <= self._sources_seq:
                return
            sources = [o for o in self._storage_images() if o.state is ImageState.IN_SYNC]
            durable = self._barrier.flush(sources, self._flush_limit)
            if any(o not in durable and o.state is ImageState.IN_SYNC for o in sources):
                # the last in-sync image's flush failed (the volume went offline instead of
                # failing it): nothing may be copied from it as durable
                raise VolumeIOError(f"volume {self.name}: the resync's source could not be "
                                    f"made durable (its flush failed)", is_read=False)
            self._sources_seq = due

    def _enter(self) -> _Epoch:
        with self._elock:
            ep = self._epoch
            ep.inflight += 1
        return ep

    def _leave(self, ep, kind=None, nbytes=0, n=1):
        """Leave epoch ``ep``; with ``kind`` ("reads", "writes", ...), count ``n`` I/Os of
        ``nbytes`` bytes in all in the volume's statistics under the same lock."""
        with self._elock:
            ep.inflight -= 1
            if kind is not None:
                st = self._stats
                st[kind] += n
                st["bytes_read" if kind == "reads" else "bytes_written"] += nbytes
            # a split drains retired epochs; close (``_closed``) waits for the current one too
            if ep.inflight == 0 and (ep.retired or self._closed):
                self._econd.notify_all()

    def _drain(self, upto: _Epoch) -> int:
        """Wait until every epoch older than ``upto`` has no I/O in flight; returns how many
        I/Os were in flight in them when the wait began."""
        with self._econd:
            waited = sum(e.inflight for e in self._retired if e.seq < upto.seq)
            self._econd.wait_for(
                lambda: all(e.inflight == 0 for e in self._retired if e.seq < upto.seq))
            self._retired = [e for e in self._retired if e.inflight]
        return waited

    # ==== helpers =================================================================================

    def _check_open(self):
        if self._closed:
            raise StateError(f"volume {self.name} is closed")

    def _check_io(self, lba, nblocks):
        if not isinstance(lba, int) or lba < 0 or nblocks < 0 or lba + nblocks > self.num_blocks:
            raise ValueError(f"volume {self.name}: LBA range [{lba}, +{nblocks}) outside "
                             f"0..{self.num_blocks}")

    def _buffers_len(self, buffers) -> int:
        total = 0
        for b in buffers:
            total += b.nbytes if isinstance(b, memoryview) else len(b)
        if total % self.block_size:
            raise ValueError(f"volume {self.name}: buffer length {total} is not a multiple of "
                             f"the block size {self.block_size}")
        return total

    def _img(self, index) -> Leg:
        if not isinstance(index, int) or not 0 <= index < len(self._images):
            raise StateError(f"volume {self.name}: no image {index!r} "
                             f"(have 0..{len(self._images) - 1})")
        return self._images[index]

    def _save_md(self):
        for im in self._images:
            im.sync_rec()
        self._md.save(self._meta_dir)

    def _bump(self) -> int:
        self._md.generation += 1
        return self._md.generation

    def _bitmap_path(self, img) -> str:
        return VolumeMetadata.bitmap_path(self._vdir, img.rec.id)

    def _image_error(self, img, exc, offset, length, *, all_regions=False,
                     is_read=False) -> bool:
        """Handle an I/O error on ``img`` (``exc``: an ImageIOError; ``offset``/``length`` in
        bytes, the range the failed I/O covered): fail the image (persisted, logged at error
        priority with volume, image, path, operation, offset and errno) and mark the range in
        its change bitmap, with every region the image may hold only in a volatile cache
        (``_mark_unflushed``) - unless it is the last in-sync image, which is never failed: a write,
        flush or discard error there takes the volume *offline* (NOT READY until ``probe``
        finds the image answering again; a read error is for the caller to probe). A full file
        system under the image (``exc.out_of_space``) fails it only while another in-sync image
        took the write - unless the error came from a sync (a flush, a FUA write's:
        ``exc.lost_writeback``), which is earlier writes' writeback lost: handled as a failed
        flush. Returns True if
        the image is failed.

        ``all_regions`` (a failed or slow flush: which writes it lost is unknown) marks every
        region whose data may not be durable on the image yet - the write-intent log's regions
        (a bit is cleared only once every image flushed after the region's last write), plus,
        for a syncing image, its bitmap as its resync last saved it (its copies are not in the
        log), ``_mark_unflushed``."""
        op = getattr(exc, "op", None) or ("read" if is_read else "write")
        if getattr(exc, "synced", False):        # RWF_DSYNC: the data or the sync failed
            op = "FUA write (its data or its sync)"
        where = (f"{op} at offset {offset}" if length else op)
        errno_ = getattr(exc, "errno", None)
        slow = getattr(exc, "slow", False)       # given up on by lvmirror, outcome unknown
        if not is_read and not slow and img.storage is not None and (
                errno_ not in (errno.ENOSPC, errno.EDQUOT)
                or getattr(exc, "lost_writeback", False)):
            # the page cache may hold what the device refused: never serve or copy it
            img.storage.drop_cache(offset if length and not all_regions else 0,
                                   length if not all_regions else 0)
        with self._meta:
            try:
                return self._image_error_locked(img, exc, offset, length, all_regions, is_read,
                                                where, errno_, slow)
            finally:
                st = img.storage
                if all_regions and st is not None:
                    # the flush failures counted so far are marked for now (not_durable)
                    st.flush_failures_seen = st.flush_failures

    def _image_error_locked(self, img, exc, offset, length, all_regions, is_read, where,
                            errno_, slow) -> bool:
        """``_image_error``'s body, under ``_meta``."""
        index = self._images.index(img) if img in self._images else -1
        if img.state is ImageState.FAILED:
            if img.bitmap is not None:
                self._mark_lost(img, img.bitmap, offset, length, all_regions)
            return True
        if img.state is ImageState.SPLIT:
            # A write begun before T failed on the image being split: the copy lacks it,
            # so the region must be copied again by a resync (or skipped by a restore);
            # while the split is under way it is not saved as done (``SplitControl``)
            img.rec.error = str(exc)
            # (one left behind as slow is waited for; if it then fails: ``late_error``; a
            # read leaves the copy as it was)
            if img.split_busy is not None and img.split_busy.lost is None \
                    and not slow and not is_read:
                img.split_busy.lost = f"{where}: {exc}"
            if img.bitmap is not None:
                self._mark_lost(img, img.bitmap, offset, length, all_regions)
            log.error("volume %s: split image %d (%s): %s failed (errno %s): %s; the regions "
                      "it covers will be copied again by a resync", self.name, index,
                      img.rec.path, where, errno_, exc)
            return False
        if img.state is ImageState.IN_SYNC and not any(
                o is not img and o.state is ImageState.IN_SYNC for o in self._images):
            if getattr(exc, "out_of_space", False) and not getattr(exc, "lost_writeback", False):
                self._log_space(img, index, where, exc)
            elif not is_read:
                img.rec.error = str(exc)
                self._mark_others_lost(offset, length, all_regions)
                self._go_offline(f"image {index} ({img.rec.path}), the last in-sync image: "
                                 f"{where} failed (errno {errno_}): {exc}")
            return False
        bm = img.bitmap if img.bitmap is not None else RegionBitmap(self.size, self.region_size)
        self._mark_lost(img, bm, offset, length, all_regions)
        was = img.state.value
        self._fail_leg(img, bm, img.state is ImageState.SYNCING, str(exc), lambda: log.error(
            "volume %s: image %d (%s) failed (was %s): %s failed (errno %s): %s; %s; the "
            "volume goes on with the others", self.name, index, img.rec.path, was, where,
            errno_, exc, "every region must be resynced" if bm.fill() == 1.0
            else f"{bm.dirty_bytes()} bytes to resync so far (writes from now on are "
            f"added)"))
        return True

    def _mark_others_lost(self, offset, length, all_regions) -> None:
        """The last in-sync image lost ``[offset, offset+length)`` bytes (``all_regions``:
        what a failed flush may have dropped, ``_mark_unflushed``), under ``_meta``: a
        syncing image may have taken the write it refused (or kept data its lost flush
        dropped), and a split image may hold what it lost from before its T: mark the range
        for the resync to copy again from it, or the two would differ once both are in sync;
        a restore's copies not yet committed are copied again (``add_lost``). Saved with the
        images' change bitmaps (``_save_marks``)."""
        rj = self.control.restore_job
        for o in self._images:
            if o.state in (ImageState.SYNCING, ImageState.SPLIT) and o.bitmap is not None:
                marks = RegionBitmap(self.size, self.region_size)
                self._mark_lost(o, marks, offset, length, all_regions)
                if rj is not None and rj.img is o:
                    rj.add_lost(marks)
                o.bitmap.union_update(marks)
                self._save_marks(o, marks)

    def _fail_leg(self, img, bm, syncing: bool, error: str, report) -> None:
        """Fail ``img`` with change bitmap ``bm`` (``syncing``: it was syncing), under
        ``_meta``: FAILED first, then what it may hold only in a volatile cache - a write of an
        older epoch that still finds it in sync began its log mark before this merge, and one
        that finds it failed marks its own range (``_mark_late``); ``error`` is kept in its
        record; ``report()`` logs it (after the marks, whose count it may give); then the
        bitmap and metadata are saved and an epoch without it swapped in."""
        img.bitmap = bm
        img.state = ImageState.FAILED
        self._mark_unflushed(img, bm, syncing)
        img.rec.error = error
        img.rec.resync_next = None
        self._stats["image_failures"] += 1
        self._bump()
        report()
        self._persist_failure(img, bm)
        self._switch_epoch()

    def _save_marks(self, img, marks):
        """Add ``marks`` (a RegionBitmap) to the change bitmap saved for ``img`` on disk, under
        ``_meta``, with no flush of any image: adding marks vouches for nothing, and the saved
        bitmap is what the next open resumes ``img``'s resync from (its resync's own saves
        union the live bitmap, so they keep these marks too). Without a readable saved bitmap
        nothing is written: the next open marks every region then. A failed save is logged;
        the marks stay in memory."""
        path = self._bitmap_path(img)
        try:
            saved = RegionBitmap.load(path, self.size, self.region_size)
        except (OSError, ValueError):
            return
        saved.union_update(marks)
        try:
            saved.save(path)
        except OSError as e:
            self._stats["metadata_errors"] += 1
            log.error("volume %s: image %s: its change bitmap's new marks not saved: %s",
                      self.name, img.rec.path, e)

    def _mark_lost(self, img, bm, offset, length, all_regions):
        """Mark in ``bm`` what a failed I/O on ``img`` may have lost (see ``_image_error``)."""
        if all_regions:
            self._mark_unflushed(img, bm, img.state is ImageState.SYNCING)
        elif length:
            bm.mark(offset, length)

    def _mark_unflushed(self, img, bm, syncing: bool):
        """Mark in ``bm`` every region ``img`` may hold only in a volatile cache (the page
        cache, the disk's write cache), which a failing disk or a power cut may drop: the
        write-intent log's regions (a log bit is cleared only after every image not failed
        flushed the region's writes, ``checkpoint``), and for an image failed while it
        ``syncing``, the regions of its change bitmap as its resync last saved it (a copy is
        vouched for only by that save, made after the target's flush; no saved bitmap: every
        region). A failed image is never flushed again, so without these marks a re-add
        would resync only the failed I/O's range and keep writes the disk never stored (md
        likewise keeps its bitmap's bits while the array is degraded)."""
        bm.mark_bitmap(self._wil.bitmap)
        if not syncing:
            return
        try:
            saved = RegionBitmap.load(self._bitmap_path(img), self.size, self.region_size)
        except (OSError, ValueError):
            bm.set_all()
            return
        bm.union_update(saved)

    def _mark_late_batch(self, token):
        """``_mark_late`` for a compiled WRITE batch (``_FastToken``) of which a leg failed:
        each of its commands' ranges (none before ``lock_fast`` set ``token.ranges``)."""
        if token.ranges is None:
            return
        bs = self.block_size
        for start, count in token.ranges():
            self._mark_late(token.epoch, start * bs, count * bs)

    @staticmethod
    def _mark_late(ep, offset, length):
        """After a write of epoch ``ep`` to ``[offset, offset + length)`` bytes: mark the range in
        the change bitmap of each of its targets failed meanwhile (by another I/O's error). The
        write may have reached that image's volatile cache only, and it never flushes again;
        its failure merged only the log marks begun before it (``_mark_unflushed``)."""
        if not length:
            return                  # a flush: its failure marks what it may have lost
        for im in ep.writes:
            if im.state is ImageState.FAILED and im.bitmap is not None:
                im.bitmap.mark(offset, length)

    def _persist_failure(self, img, bm):
        """Save a failed image's bitmap and the metadata; a failure to do so is logged at
        error priority and counted (``metadata_errors``), never silent. Serving goes on: the
        write-intent log still marks every region the failed image may lack."""
        try:
            bm.save(self._bitmap_path(img))
            self._save_md()
        except OSError as e:
            self._stats["metadata_errors"] += 1
            log.error("volume %s: cannot save the metadata after image %s failed: %s; the "
                      "failure is kept in memory and the write-intent log still covers the "
                      "regions, but a restart before the metadata disk recovers loses the "
                      "failed state", self.name, img.rec.path, e)

    def _log_space(self, img, index, where, exc):
        """An out-of-space error where no image had room: logged at warning, at most once per
        SPACE_LOG_INTERVAL seconds (a full file system fails every write until space is freed)."""
        self._stats["space_errors"] += 1
        now = time.monotonic()
        if now - self._space_logged >= SPACE_LOG_INTERVAL:
            self._space_logged = now
            log.warning("volume %s: image %d (%s): %s: the file system under it is full (%s); "
                        "writes get DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT until "
                        "space is freed (%d such errors so far)", self.name, index,
                        img.rec.path, where, exc, self._stats["space_errors"])

    # ==== health ==================================================================================

    def _go_offline(self, reason):
        if self._offline is None:
            self._offline = reason
            self._stats["offline_events"] += 1
            log.error("volume %s: OFFLINE, no image can serve: %s; medium access and TEST UNIT "
                      "READY answer NOT READY until the image answers again (checked every "
                      "flusher round, or 'probe')", self.name, reason)

    def stats_offline_events(self) -> int:
        """How many times the volume has gone offline since it opened (a count that only
        grows; a copy compares it before and after to know whether the source failed between)."""
        return self._stats["offline_events"]

    @property
    def offline(self) -> str | None:
        """Why no image can serve (None while the volume serves)."""
        return self._offline

    def check_ready(self):
        """Raise StateError while the volume cannot serve medium access (closed, or offline:
        the last in-sync image failed a write); the SCSI core's TEST UNIT READY calls it."""
        self._check_open()
        if self._offline is not None:
            raise StateError(f"volume {self.name} is offline: {self._offline}")

    @property
    def health(self) -> str:
        """"offline" (no image can serve), "degraded" (an image is failed or syncing: fewer
        copies than the volume has images, split ones aside; or a restore left registered
        that failed, or whose source has an error recorded - unreadable - so I/O to the
        regions it has not rolled back gets MEDIUM ERROR, trials 26 and 27) or "optimal"."""
        if self._offline is not None:
            return "offline"
        with self._meta:
            if any(im.state in (ImageState.FAILED, ImageState.SYNCING) for im in self._images):
                return "degraded"
        rj = self.control.restore_job
        if rj is not None and (rj.state == "failed" or rj.img.rec.error):
            return "degraded"
        return "optimal"

    def probe(self) -> bool:
        """Check an offline volume's in-sync image again: read the first block, write it back
        with FUA and flush. On success the volume serves again (logged), the copy jobs its
        going offline stopped go on (``JobControl.resume_after_offline``, on a thread) and
        True is returned; a volume that is not offline returns True at once."""
        if self._offline is None:
            return True
        with self._meta:
            legs = [im for im in self._images
                    if im.state is ImageState.IN_SYNC and im.storage is not None]
        if not legs:
            return False
        bs = self.block_size
        # the flush failures counted before the probe began: those it answers (below)
        counted = {id(im): im.storage.flush_failures for im in legs}
        lk = self.locks.lock(0, 1)
        try:
            buf = StorageImage.aligned_buffer(bs)
            for im in legs:
                try:
                    im.storage.readv(0, [buf])
                    im.storage.writev(0, [buf], fua=True)
                    im.storage.flush()
                except ImageIOError as e:
                    log.debug("volume %s: probe of %s failed: %s", self.name, im.rec.path, e)
                    return False
        finally:
            lk.release()
        for im in legs:
            im.storage.drop_cache()          # nothing the failed writes left in the cache
        with self._meta:
            reason, self._offline = self._offline, None
            for im in legs:
                im.rec.error = None
                # The flush failures counted before the probe began are answered here: a
                # flush left behind as slow and failing later lost only what its give-up
                # marked already (``_image_error``, all_regions), but one whose thread is
                # still on its way to mark for it (in a fan-out, review of 2026-12-06, M4)
                # has not: the probe marks what that thread would (``_mark_others_lost``,
                # every region a flush may have dropped) before a checkpoint may clear the
                # write-intent log those marks come from. One counted since the probe began
                # stays unanswered until its own thread marks for it (its sync may have taken
                # the error the probe's flush would have had: trial 36, LOW).
                st = im.storage
                if counted[id(im)] > st.flush_failures_seen:
                    self._mark_others_lost(0, 0, True)
                st.flush_failures_seen = max(st.flush_failures_seen, counted[id(im)])
        log.warning("volume %s: back ONLINE: the in-sync image answers again (was offline: %s)",
                    self.name, reason)
        # the copy jobs its going offline stopped go on, on a thread of their own: starting
        # one judges its image (sample reads) and waits for the management lock, which the
        # flusher's round, this probe's usual caller, must not
        threading.Thread(target=self._resume_after_offline, daemon=True,
                         name=f"{self.name}-resume").start()
        return True

    def _resume_after_offline(self):
        try:
            self.control.resume_after_offline()
        except Exception:                    # never the daemon's end; the operator can
            log.exception("volume %s: the copy jobs stopped while offline were not started "
                          "again", self.name)

    def _parallel(self, length, fua=False) -> bool:
        """Fan-out policy: see ``fanout`` in ``create``."""
        mode = self._fanout_mode
        if mode == "parallel":
            return True
        if mode == "serial":
            return False
        return self._direct or fua or length >= PARALLEL_MIN_BYTES

    def _fanout(self, ep, fn, offset, length, is_read=False, parallel=True):
        """Run ``fn(storage)`` on every write target of ``ep`` (in parallel: one inline, the
        others on the images' worker threads - all of them on workers while a leg timeout is
        set, so a slow leg can be left behind; or one after the other); handle failures:
        an image that errors is failed (``_image_error``); with ``leg_timeout`` a leg still busy
        that many seconds after an in-sync leg finished the same I/O is failed as slow
        (ETIMEDOUT) and the I/O completes without it (md's failfast, DRBD's disk-timeout).
        Raises VolumeIOError when no in-sync image took it (``out_of_space`` when every
        error was a full file system: then no image is failed)."""
        targets = ep.writes
        if not targets:
            raise VolumeIOError(f"volume {self.name}: no live image", is_read=is_read)
        try:
            self._fanout_legs(ep, fn, offset, length, is_read, parallel)
        finally:
            # every writer of the images comes through here (writes, restores) or calls it
            # itself (scrub repairs, torn regions): each before its write-intent mark ends
            self._mark_late(ep, offset, length)

    def _fanout_legs(self, ep, fn, offset, length, is_read, parallel):
        """``_fanout``'s I/O and error handling (its docstring)."""
        targets = ep.writes
        errors = []
        other = None
        if parallel and len(targets) > 1 and self.leg_timeout:
            errors, other = self._fanout_bounded(targets, fn, length)
        elif parallel and len(targets) > 1:
            comps = []
            for img in targets[1:]:
                comps.append(img.worker.submit(fn, img.storage))
            try:
                fn(targets[0].storage)
            except ImageIOError as e:
                errors.append((targets[0], e))
            except BaseException as e:
                other = e
            for img, comp in zip(targets[1:], comps):
                other = _sort_leg_error(errors, img, comp.wait(), other)
        else:
            for img in targets:
                try:
                    fn(img.storage)
                except ImageIOError as e:
                    errors.append((img, e))
        if other is not None:
            raise other
        if errors:
            self._stats["write_errors"] += len(errors)
            bad = {img for img, _ in errors}
            took = any(im not in bad and im.state is ImageState.IN_SYNC for im in targets)
            # (a sync's ENOSPC - a flush's, a FUA write's - is earlier writes' writeback,
            # lost: handled as a failed flush, ``_image_error``, not as a full file system)
            space = [e for _, e in errors if e.out_of_space and not e.lost_writeback]
            if not took and len(space) == len(errors):
                # a full file system is not a broken disk: nothing is failed (SBC thin
                # provisioning: the initiator hears DATA PROTECT / SPACE ALLOCATION FAILED)
                for img, e in errors:
                    self._log_space(img, self._images.index(img) if img in self._images else -1,
                                    e.op or "write", e)
                if length:
                    rs = self._region_shift
                    with self._elock:
                        self._torn.update(range(offset >> rs, ((offset + length - 1) >> rs) + 1))
                raise VolumeIOError(f"volume {self.name}: out of space: " + "; ".join(
                    str(e) for _, e in errors), is_read=is_read, out_of_space=True)
            for img, e in errors:
                self._image_error(img, e, offset, length,
                                  all_regions=length == 0 or getattr(e, "synced", False))
            if not took:
                what = errors[0][1].op or "write"       # "flush" for a SYNCHRONIZE CACHE
                raise VolumeIOError(f"volume {self.name}: {what} failed on every in-sync image: "
                                    + "; ".join(str(e) for _, e in errors), is_read=is_read)

    def _fanout_bounded(self, targets, fn, length):
        """Every leg on its worker; wait until all are done or ``leg_timeout`` seconds passed
        since the first in-sync leg finished. Returns (errors, other exception)."""
        group = _LegGroup(len(targets))
        for img in targets:
            img.worker.submit_to(fn, img.storage, _LegDone(group, img,
                                                           img.state is ImageState.IN_SYNC))
        timeout = self.leg_timeout
        group.any_ok.acquire()
        if group.first_ok is not None:
            left = group.first_ok + timeout - time.monotonic()
            if left <= 0 or not group.all_done.acquire(timeout=left):
                self._judge_late_legs(group, timeout)
        with group.mu:
            results = dict(group.results)
            fastest = group.fastest
            late = [img for img in targets if img not in results]
            if late:
                # still in flight on those legs: counted until it returns, so that no resync
                # copies a region this write may still overwrite (``Leg.stuck_io``)
                group.abandoned = {img: img.abandoned_io() for img in late}
        errors, other = [], None
        for img in targets:
            if img not in results:
                self._stats["slow_legs"] += 1
                errors.append((img, ImageIOError(
                    img.storage, errno.ETIMEDOUT,
                    f"image {img.rec.path}: still busy {timeout:g} s after image "
                    f"{fastest.rec.path} finished the same "
                    f"{f'write ({length} bytes)' if length else 'flush'}: failed as slow "
                    f"(leg_timeout)", op="write" if length else "flush", offset=None, slow=True,
                    length=length)))
                continue
            other = _sort_leg_error(errors, img, results[img], other)
        return errors, other

    @staticmethod
    def _judge_late_legs(group, timeout):
        """``leg_timeout`` passed since the first in-sync leg of ``group`` succeeded and legs
        are still busy. They are slow only against a leg that is still in sync now: a leg split
        off at T meanwhile (or failed) holds no live copy of the I/O, and timing the others
        against it failed the last in-sync image of the volume (taking the volume offline, the
        write answered with an error though every image took it). So wait, while legs are
        busy, until ``timeout`` seconds after the first success of a leg still in sync, or for
        the next leg to end when none is (``all_done`` checked every 50 ms: a split during a
        slow write is rare)."""
        while True:
            with group.mu:
                if group.left == 0:
                    return
                ref = min((t for t, im in group.oks if im.state is ImageState.IN_SYNC),
                          default=None)
                if ref is not None and ref != group.first_ok:
                    group.first_ok = ref
                    group.fastest = next(im for t, im in group.oks if t == ref)
            left = (ref + timeout - time.monotonic()) if ref is not None else 0.05
            if left <= 0:
                return
            if group.all_done.acquire(timeout=left):
                return

    def _write_locked(self, offset, length, fn, kind="writes", fua=False, nowait=False,
                      own_save=False):
        """The write path after the range lock is held: epoch, WIL, bitmaps, fan-out.
        ``nowait``: WouldBlock, with nothing changed, when the write-intent log would have to
        be saved first (``WriteIntentLog.begin(nowait=True)``); ``own_save``: when another
        thread's save of the log runs (``begin(own_save=True)``).

        The write-intent log records what a crash may leave different between the images and
        missing from a change bitmap; with one image to write and no bitmap to keep (a
        one-image volume: nothing to differ, nothing to track) there is nothing to record and
        the write skips it, as a RAID1 of one disk would need no bitmap."""
        ep = self._enter()
        try:
            logged = len(ep.writes) > 1 or bool(ep.tracking)
            try:
                tok = self._wil.begin(offset, length, nowait, own_save) if logged else None
            except OSError as e:
                raise VolumeIOError(f"volume {self.name}: cannot persist the write-intent log: "
                                    f"{e}", is_read=False) from e
            try:
                for bm in ep.tracking:
                    bm.mark(offset, length)
                self._fanout(ep, fn, offset, length, parallel=self._parallel(length, fua))
            finally:
                if tok is not None:
                    self._wil.end(tok)
        except BaseException:
            self._leave(ep)
            raise
        self._leave(ep, kind, length)

    def _read_locked(self, offset, buffers, length, defer_errors=False):
        """The read path after the range lock is held: the first in-sync image in turn (one
        fixed image for a torn range), the next one on an error, which fails the image.
        ``defer_errors``: an image's error is WouldBlock instead, nothing counted or failed
        (the ring thread at queue depth 1 leaves the error handling, which takes the metadata
        lock, to a worker)."""
        ep = self._enter()
        try:
            reads = ep.reads
            n = len(reads)
            start = self._read_start(reads, offset, length) if n else 0
            errors = []
            timeout = self.leg_timeout
            if self._torn and self._touches_torn(offset, length):
                start = 0            # images may differ here: always the same one answers
            for k in range(n):
                img = reads[(start + k) % n]
                if img.state is not ImageState.IN_SYNC:
                    continue
                t0 = time.monotonic()
                try:
                    img.storage.readv(offset, buffers)
                except ImageIOError as e:
                    if defer_errors:
                        raise WouldBlock(f"a worker handles the error: {e}") from e
                    self._stats["read_errors"] += 1
                    errors.append(str(e))
                    if not self._image_error(img, e, offset, length, is_read=True):
                        self._probe_after_read_error(img, e)
                    continue
                if timeout and n > 1 and time.monotonic() - t0 > timeout:
                    self._slow_read(img, time.monotonic() - t0, length)
                break
            else:
                raise VolumeIOError(f"volume {self.name}: no in-sync image could serve the read"
                                    + (": " + "; ".join(errors) if errors else ""), is_read=True)
        except BaseException:
            self._leave(ep)
            raise
        self._leave(ep, "reads", length)

    def _read_start(self, reads, offset, length) -> int:
        """Index in ``reads`` (a non-empty list of legs) of the image a read of ``[offset,
        +length)`` bytes asks first: the one the read that ended at ``offset`` went to, so that
        a sequential stream stays on one image and its page cache reads ahead (md's
        read_balance keeps a sequential reader on one disk the same way; taking turns, each
        image saw every other chunk and read none ahead); otherwise the next in turn. Notes
        where this read ends for the next one (at most READ_STREAMS streams are followed)."""
        streams = self._streams
        leg = streams.pop(offset, None)
        if leg is None or leg not in reads:
            k = next(self._rr) % len(reads)
            leg = reads[k]
        else:
            k = reads.index(leg)
        if len(streams) >= READ_STREAMS:
            streams.clear()
        streams[offset + length] = leg
        return k

    def _torn_chunks(self) -> set[int]:
        """The write-intent chunks (log bit indexes) holding a torn region: the log keeps them
        marked until the region is repaired."""
        shift = self._wil.region_shift - self._region_shift
        with self._elock:
            return {r >> shift for r in self._torn}

    def _touches_torn(self, offset, length) -> bool:
        rs = self._region_shift
        torn = self._torn
        return any(r in torn for r in range(offset >> rs, ((offset + length - 1) >> rs) + 1))

    def _settle_torn(self, stop: threading.Event | None = None) -> int:
        """Copy every torn region (a write that failed for lack of space on every image, which
        some may hold in part; a region a crash left in the write-intent log) from the first
        in-sync image to the other live images, under the region lock and the write-intent
        log; a region stays torn while a copy still finds no space. Run by the recovery thread
        after a crash, before each checkpoint, before a split and at close; ``stop``: return
        early once it is set. Returns how many regions are still torn."""
        with self._elock:
            pending = sorted(self._torn)
        bs = self.block_size
        for r in pending:
            if stop is not None and stop.is_set():
                break
            off = r << self._region_shift
            ln = min(self.region_size, self.size - off)
            lk = self.locks.lock(off // bs, ln // bs)
            try:
                ep = self._enter()
                try:
                    if not ep.reads:
                        continue
                    src = ep.reads[0]
                    buf = StorageImage.aligned_buffer(ln)
                    tok = self._wil.begin(off, ln)
                    try:
                        src.storage.readv(off, [buf])
                        others = [im for im in ep.writes if im is not src]
                        ok = True
                        try:
                            for im in others:
                                try:
                                    im.storage.writev(off, [buf])
                                except ImageIOError as e:
                                    ok = False
                                    if not e.out_of_space:
                                        self._image_error(im, e, off, ln)
                        finally:
                            self._mark_late(ep, off, ln)
                        if ok:
                            with self._elock:
                                self._torn.discard(r)
                    except ImageIOError as e:
                        self._image_error(src, e, off, ln, is_read=True)
                    finally:
                        self._wil.end(tok)
                finally:
                    self._leave(ep)
            finally:
                lk.release()
        with self._elock:
            return len(self._torn)

    def _probe_after_read_error(self, img, exc):
        """The last in-sync image failed a read: one bad sector, or a dead disk? Read its first
        block; if that fails too, no image can serve and the volume goes offline."""
        if img.state is not ImageState.IN_SYNC or img.storage is None or self._offline:
            return
        buf = StorageImage.aligned_buffer(self.block_size)
        try:
            img.storage.readv(0, [buf])
        except ImageIOError as e2:
            img.rec.error = str(exc)
            self._go_offline(f"image {self._images.index(img)} ({img.rec.path}), the last "
                             f"in-sync image, fails reads: {exc}; and the probe of its first "
                             f"block: {e2}")
        else:
            log.error("volume %s: image %s, the last in-sync image: %s (errno %s); the rest "
                      "of it reads: the initiator gets MEDIUM ERROR for this range only",
                      self.name, img.rec.path, exc, exc.errno)

    def _slow_read(self, img, seconds, length, error=None):
        """A read took longer than ``leg_timeout`` on an image while another in-sync image
        could have served it: set the slow image aside (failed, nothing to resync but what
        is written meanwhile) so the next reads go to the others. ``error``: the
        ImageIOError to record instead of one saying the read took ``seconds`` (a copy's
        read given up on, ``resync._read_from_in_sync``)."""
        self._stats["slow_legs"] += 1
        self._image_error(img, error or ImageIOError(
            img.storage, errno.ETIMEDOUT, f"image {img.rec.path}: a read of {length} bytes took "
            f"{seconds:.1f} s, longer than leg_timeout {self.leg_timeout:g} s: failed as slow",
            op="read", offset=None, length=length), 0, 0, is_read=True)

    # ==== I/O API (LBAs) ==========================================================================

    def _prologue(self, lba, nblocks, nowait=False, is_read=False):
        """Checks every I/O shares; restores a not-yet-restored range first (see restore;
        VolumeIOError, with ``is_read``, when it cannot be) - with ``nowait``, WouldBlock
        instead while a restore runs (its copy may wait). Returns the byte offset and
        length."""
        if self._closed:
            self._check_open()
        if lba.__class__ is not int or lba < 0 or nblocks < 0 or lba + nblocks > self.num_blocks:
            self._check_io(lba, nblocks)          # raises unless an int subclass in range
        if self._offline is not None:
            raise StateError(f"volume {self.name} is offline: {self._offline}")
        offset, length = lba * self.block_size, nblocks * self.block_size
        rj = self.control.restore_job
        if rj is not None and nblocks:
            if nowait:
                raise WouldBlock("a restore may have to copy the range first")
            rj.before_io(offset, length, is_read)
        return offset, length

    @property
    def supports_nowait(self) -> bool:
        """``read(..., nowait=True)`` can answer from the page cache: the images are opened
        buffered (with O_DIRECT every read waits for the device)."""
        return not self._direct

    def read(self, lba, buffers, nowait=False, device_ok=False):
        """Fill ``buffers`` (list of memoryview) with the blocks from ``lba``.

        ``nowait``: only from memory, without waiting for anything - the data in an in-sync
        image's page cache (``StorageImage.readv(nowait=True)``), the range's region lock free
        of writers, no restore running; otherwise WouldBlock, with nothing changed (no image
        failed, no statistics counted). The ring thread answers cached reads this way without
        a hand-off to a worker. ``device_ok`` (with ``nowait``): never wait for other I/O (the
        lock is only tried, a restore is WouldBlock) but read from the devices as a normal read
        does, under the lock taken - what the ring thread runs when nothing else is
        outstanding."""
        nblocks = self._buffers_len(buffers) // self.block_size
        if nowait and self._direct and not device_ok:
            raise WouldBlock("the read may wait for a device")
        offset, length = self._prologue(lba, nblocks, nowait, is_read=True)
        if not nblocks:
            return
        if nowait:
            lk = self.locks.try_lock(lba, nblocks, shared=True)
            if lk is None:
                raise WouldBlock("a write holds the range")
        else:
            lk = self.locks.lock(lba, nblocks, shared=True)
        try:
            if nowait and not device_ok:
                self._read_nowait(offset, buffers, length)
            else:
                self._read_locked(offset, buffers, length, defer_errors=nowait)
        finally:
            lk.release()

    def _read_nowait(self, offset, buffers, length):
        """``_read_locked`` for ``read(nowait=True)``: one in-sync image, from its page cache;
        WouldBlock (nothing counted, no image failed) when that is not possible."""
        ep = self._enter()
        try:
            reads = ep.reads
            n = len(reads)
            if not n:
                raise WouldBlock("no image to read from")
            if self._torn and self._touches_torn(offset, length):
                img = reads[0]      # images may differ here: always the same one answers
            else:
                img = reads[self._read_start(reads, offset, length)]
            if img.state is not ImageState.IN_SYNC:
                raise WouldBlock("the image chosen is leaving the mirror")
            try:
                img.storage.readv(offset, buffers, nowait=True)
            except ImageIOError as e:
                # the worker's read handles it (fails the image, tries the others)
                raise WouldBlock(str(e)) from e
        except BaseException:
            self._leave(ep)
            raise
        self._leave(ep, "reads", length)

    def fast_read_source(self):
        """What the ring thread's compiled READ path (``tcmu._fastread.read_batch``) may read
        from now: ``(storage, rwf, checks, busy)`` - the StorageImage of the first in-sync image
        of the current epoch (always the same one, as a torn range wants it; its page cache is
        the one that stays warm), the preadv2 flags of a read from memory
        (``StorageImage.nowait_flags``), and the conditions ``read_batch`` reads again from
        these objects when it starts, under the GIL it holds to its end, as ``(obj, attribute,
        kind, value)`` with kind "is" (``getattr(obj, attribute) is value``), "falsy" (false;
        a builtin type) or "eq" (an equal int). ``checks``: the state this answer was made in
        (volume open and online, no restore, no torn region, the same epoch, the image in sync
        on the same open descriptor). ``busy``: no region lock held or awaited (a write in
        flight, a resync's copy, a lock a D-Bus client holds).
        A read under them is what ``read(nowait=True)`` returns: in-sync data from memory,
        with no write to its range in progress. None when no such read is possible now
        (O_DIRECT, closed, offline, a restore, a torn region, no in-sync image)."""
        if (self._direct or self._closed or self._offline is not None or self._torn
                or self.control.restore_job is not None):
            return None
        ep = self._epoch
        for img in ep.reads:
            if img.state is ImageState.IN_SYNC:
                break
        else:
            return None
        st = img.storage
        rwf = st.nowait_flags() if st is not None else None
        if rwf is None:
            return None
        checks = ((self, "_closed", "is", False), (self, "_offline", "is", None),
                  (self.control, "restore_job", "is", None), (self, "_torn", "falsy", None),
                  (self, "_epoch", "is", ep), (img, "state", "is", ImageState.IN_SYNC),
                  (img, "storage", "is", st), (st, "fd", "eq", st.fd),
                  (st, "direct", "is", st.direct), (st, "_nowait_ok", "is", st._nowait_ok),
                  (st, "_memory_backed", "is", st._memory_backed))
        busy = ((self.locks, "_held", "falsy", None), (self.locks, "_waiters", "falsy", None))
        return st, rwf, checks, busy

    def fast_write_source(self):
        """What the ring thread's compiled WRITE path (``tcmu._fastread.take_batch``/
        ``run_batch``) may write to now: ``(legs, checks)`` - the StorageImages of the images
        the current epoch writes (1 to MAX_IMAGES, in order, each in sync and writable), and
        the conditions ``take_batch`` reads again when it starts (``fast_read_source``'s -
        volume open and online, no restore, no torn region, the same epoch - and each leg in
        sync, on the same descriptor, not read-only). A WRITE made under them, inside
        ``begin_fast_writes``/``lock_fast``/``end_fast_writes``, is what ``write()`` does with
        no FUA: no split or failed image's change bitmap to mark (none is tracked), the
        write-intent log's regions begun in flight when there are several legs
        (``lock_fast``), and one ``pwritev`` to each leg in turn - as the "serial" fan-out
        does, and "auto" for a buffered write under PARALLEL_MIN_BYTES (``_parallel``), where
        ``leg_timeout`` does not apply either. None while a split or failed image's changes are
        tracked, an image is resyncing, fan-out is "parallel", or when ``fast_read_source`` is
        None (O_DIRECT, closed, offline, a restore, a torn region)."""
        src = self.fast_read_source()
        if src is None:
            return None
        _, _, checks, _ = src
        ep = self._epoch
        images = ep.writes
        if (not images or len(images) > MAX_IMAGES or ep.tracking
                or (len(images) > 1 and self._fanout_mode == "parallel")):
            return None
        legs = []
        more = []
        for img in images:
            st = img.storage
            if img.state is not ImageState.IN_SYNC or st is None or st.read_only:
                return None
            legs.append(st)
            more += [(img, "state", "is", ImageState.IN_SYNC), (img, "storage", "is", st),
                     (st, "fd", "eq", st.fd), (st, "read_only", "is", False)]
        return tuple(legs), checks + tuple(more)

    def begin_fast_writes(self):
        """Before the compiled WRITE path takes a batch from the ring and writes it without the
        GIL: the current split epoch entered (a split, an attach, a detach or an image failure
        that switches the epoch waits for ``end_fast_writes``, as for any write in flight;
        the batch's conditions, read after this, name the epoch, so a switch in between makes
        it take nothing). Its commands are then locked with ``lock_fast``. Returns the token
        for ``lock_fast`` and ``end_fast_writes``."""
        with self._elock:               # (_enter, written out: once a batch)
            ep = self._epoch
            ep.inflight += 1
        # (as _write_locked: several legs may differ after a crash, so the log records them)
        return _FastToken(ep, False, self._wil if len(ep.writes) > 1 else None)

    def begin_ring_lease(self, wake, gen: int, now: float, read_storage, write_storage):
        """The ring thread's lease (``mirror/ringlease.py``): the whole volume locked exclusively
        for it (``RegionLockManager.lease``) and the current split epoch entered once, kept
        across its compiled batches until ``end_ring_lease``. ``wake``: what wakes the ring thread
        (generation ``gen``) when the lease is revoked; ``now``: ``time.monotonic()``;
        ``read_storage``/``write_storage``: the StorageImages its READs and WRITEs go to
        (``fast_read_source``, ``fast_write_source``), for the statistics; ``write_storage``
        None asks for a lease for READs only (``RingLease.reads_only``: on a mirror, whose
        WRITEs the ring thread makes outside a lease, ``mirror/ringlease.py``). Returns the
        RingLease, or None when it cannot be had now: the volume closed or offline, its epoch
        writing no image, tracking a split or failed image's changes, or - for a lease with
        WRITEs - writing more than one image, a region lock held or awaited, a lease held.
        The caller's batch conditions (``fast_read_source``'s and ``fast_write_source``'s
        checks, which name the epoch) are read after this, so a switch in between makes its
        batches take nothing."""
        if self._closed or self._offline is not None or not self._leasable(write_storage):
            return None
        lease = RingLease(wake, gen, now, read_storage, write_storage)
        lease.volume = self
        lk = self.locks.lease(self.num_blocks, lease.revoke)
        if lk is None:
            return None
        lease.lock = lk
        with self._elock:
            ep = self._epoch
            # (close reads _lease under this lock after setting _closed; an epoch switch since
            # the check above may have brought a split image's bitmap to mark)
            if self._closed or not self._leasable(write_storage):
                lk.release()
                return None
            lease.epoch = ep
            ep.inflight += 1
            self._lease = lease
        return lease

    def _leasable(self, write_storage) -> bool:
        """Whether the current epoch may be leased (``begin_ring_lease``): it writes an image
        and tracks no change; a lease with WRITEs (``write_storage`` not None) wants exactly
        one image to write, as its WRITEs begin no write-intent region; a lease for READs only
        (it makes no WRITE) wants every image it writes in sync - a mirror in sync, no resync's
        copies to revoke it at each region."""
        ep = self._epoch
        if not ep.writes or ep.tracking:
            return False
        if write_storage is not None:
            return len(ep.writes) == 1
        return all(img.state is ImageState.IN_SYNC for img in ep.writes)

    def narrow_ring_lease(self, lease) -> None:
        """The holder of ``lease`` is stuck in its batch (``lease.batch``: first block,
        blocks, shared) and a new ring thread serves the LUN: the lease's whole-volume lock
        becomes a lock over that batch's blocks only (``RegionLockManager.narrow_lease``), as
        the batch would hold without a lease; its epoch stays entered until ``end_ring_lease``.
        Nothing without a batch in flight, or once ended."""
        if lease.ended or lease.batch is None or lease.lock is not self.locks._lease:
            return
        first, blocks, shared = lease.batch
        lease.lock = self.locks.narrow_lease(lease.lock, first, blocks, shared)

    def end_ring_lease(self, lease) -> None:
        """End ``lease`` (``begin_ring_lease``; once, by its holder): count the READs and WRITEs made
        under it in the volume's and the images' statistics, leave its epoch (a split or
        ``close`` waiting for it goes on) and release its lock (the requests that revoked it
        are granted)."""
        if lease.ended:
            return
        lease.ended = True
        try:
            with self._elock:
                if self._lease is lease:
                    self._lease = None
                ep = lease.epoch
                ep.inflight -= 1
                st = self._stats
                if lease.reads:
                    st["reads"] += lease.reads
                    st["bytes_read"] += lease.read_bytes
                if lease.writes:
                    st["writes"] += lease.writes
                    st["bytes_written"] += lease.write_bytes
                # (the images' too, under the same lock: ``stats`` adds a held lease's counts)
                if lease.reads and lease.read_storage is not None:
                    lease.read_storage.count_reads(lease.reads, lease.read_bytes)
                if lease.writes:
                    for storage in lease.write_storage or ():
                        storage.count_writes(lease.writes, lease.write_bytes)
                if ep.inflight == 0 and (ep.retired or self._closed):
                    self._econd.notify_all()
        finally:
            lease.lock.release()

    def begin_fast_reads(self):
        """``begin_fast_writes`` for the compiled READ path that reads without the GIL
        (``_fastread.run_batch``, READs over the GIL-held path's size): its commands are locked
        SHARED - other reads run beside them, a write, a resync's copy or a D-Bus client's
        exclusive lock on them waits for ``end_fast_reads`` (no write lands in a range being
        read: the overlapping-I/O rule)."""
        return _FastToken(self._enter(), True, None)

    def lock_fast(self, token, taken: int, first: int, blocks: int, ranges) -> int:
        """Lock the ``taken`` commands of a batch for ``token`` (``begin_fast_writes``:
        exclusive; ``begin_fast_reads``: shared), never waiting: the region lock manager grants
        a lock only when no conflicting lock is held or awaited before it (``try_lock``: the
        overlapping-I/O rule, first come first served). First one lock over the blocks
        ``[first, first + blocks)`` the batch covers (one lock a batch: a lock is Python's cost,
        and at queue depth 1 the lab's emulated CPU made every microsecond of it count);
        refused, one over each command's range in turn (``ranges()``: their ``(first block,
        blocks)``, asked for only then), up to the first refused. For a WRITE batch of several
        legs, the same for the write-intent log: the cover, else each command, begun only when
        marked on disk already (``WriteIntentLog.begin(nowait=True)``: no save, no wait; the
        regions stay in flight, so no checkpoint clears them, until ``end_fast_writes``).
        Returns how many commands, from the first, it took: the batch makes those, the Python
        path the others (the first write to an unmarked chunk saves the log).
        ``end_fast_writes``/``end_fast_reads`` release them."""
        shared, held, wil = token.shared, token.locks, token.wil
        token.ranges = ranges
        lk = self.locks.try_lock(first, blocks, shared=shared)
        if lk is not None:
            held.append(lk)
            if wil is None:
                return taken
            bs = self.block_size
            try:
                token.begun.append(wil.begin(first * bs, blocks * bs, nowait=True))
                return taken
            except WouldBlock:
                return self._lock_each(token, ranges(), lock=False)
        return self._lock_each(token, ranges(), lock=True)

    def _lock_each(self, token, ranges, lock: bool) -> int:
        """``lock_fast`` one command at a time: for each ``(first block, blocks)`` of
        ``ranges`` in turn, its region lock (with ``lock``; without, the cover holds them) and
        its write-intent log begin (a mirror's WRITE batch), up to the first refused. Returns
        how many commands it took."""
        try_lock, shared, held, wil = self.locks.try_lock, token.shared, token.locks, token.wil
        bs = self.block_size
        k = 0
        for start, count in ranges:
            lk = try_lock(start, count, shared=shared) if lock else None
            if lock and lk is None:
                break
            if wil is not None:
                try:
                    token.begun.append(wil.begin(start * bs, count * bs, nowait=True))
                except BaseException as e:
                    if lk is not None:
                        lk.release()
                    if isinstance(e, WouldBlock):
                        break
                    raise
            if lk is not None:
                held.append(lk)
            k += 1
        return k

    def end_fast_writes(self, token, legs, n: int, nbytes: int) -> None:
        """After the compiled WRITE path: count its ``n`` writes of ``nbytes`` bytes to each of
        ``legs`` (``fast_write_source``) in the volume's and the images' statistics, end its
        writes in the write-intent log (they finished on every leg, or were left to the Python
        path, which begins its own), leave the epoch and release the locks ``lock_fast``
        took. A leg failed meanwhile (by another I/O) gets each command's range marked in its
        change bitmap (``_mark_late``) before the log's marks end."""
        try:
            try:
                if token.wil is not None:
                    for im in token.epoch.writes:     # a leg failed meanwhile (rare)
                        if im.state is ImageState.FAILED:
                            self._mark_late_batch(token)
                            break
                    if token.begun:
                        begun, token.begun = token.begun, []
                        self.end_fast_intents(begun)
            finally:
                self._leave(token.epoch, "writes" if n else None, nbytes, n)
            if n:
                for storage in legs:
                    storage.count_writes(n, nbytes)
        finally:
            token.release()

    def fast_write_failed(self, storage, err: int, offset: int, length: int) -> bool:
        """The compiled WRITE path's ``pwritev`` of ``[offset, offset + length)`` bytes to
        ``storage`` (a leg of ``fast_write_source``) failed with errno ``err``: fail that image as
        the Python path fails an image whose write errs (``_image_error``: persisted, logged,
        its range and every region it may hold only in a volatile cache marked), though the
        Python path then writes the command again and may find the device answering. A full
        file system (ENOSPC, EDQUOT) fails no image: the Python path's write again reports it.
        Returns True if the image is failed."""
        if not err or err in (errno.ENOSPC, errno.EDQUOT):
            return False
        for img in self._images:
            if img.storage is storage:
                self._stats["write_errors"] += 1
                return self._image_error(img, storage.write_error(offset, length, err), offset,
                                         length)
        return False

    def end_fast_intents(self, begun) -> None:
        """End the write-intent log tokens ``begun`` that ``lock_fast`` took (a compiled batch's
        commands finished on every leg, or were written again by the Python path)."""
        end = self._wil.end
        for tok in begun:
            end(tok)

    def end_fast_reads(self, token, storage, n: int, nbytes: int) -> None:
        """After ``begin_fast_reads``: count the ``n`` reads of ``nbytes`` bytes answered from
        ``storage`` (``fast_read_source``), leave the epoch and release the locks."""
        try:
            self._leave(token.epoch, "reads" if n else None, nbytes, n)
            if n:
                storage.count_reads(n, nbytes)
        finally:
            token.release()

    def count_fast_reads(self, storage, n: int, nbytes: int) -> None:
        """Count ``n`` reads of ``nbytes`` bytes the compiled READ path answered from
        ``storage`` (``fast_read_source``) in the volume's and the image's statistics."""
        with self._elock:
            st = self._stats
            st["reads"] += n
            st["bytes_read"] += nbytes
        storage.count_reads(n, nbytes)

    @property
    def supports_nowait_write(self) -> bool:
        """``write(..., nowait=True)`` is possible: the images are opened buffered (with
        O_DIRECT every write waits for the device)."""
        return not self._direct

    def write(self, lba, buffers, fua=False, nowait=False, device_ok=False):
        """Write ``buffers`` (list of memoryview, whole blocks) from ``lba`` to every live image;
        returns when all have it (durably with ``fua``).

        ``nowait``: without waiting for other I/O or for a device - the range's region lock
        free, no restore running, the images buffered, no FUA, and the write-intent log already
        marking the range (no save with fsync); otherwise WouldBlock with nothing changed. The
        write itself still waits for what the images' page cache needs (the ring thread that
        runs it is watched: ``LunServer``). ``device_ok`` (with ``nowait``): never wait for
        other I/O (the lock is only tried, a restore is WouldBlock), but FUA, O_DIRECT and a
        write-intent log save are waited for, under the lock taken - what the ring thread runs
        when nothing else is outstanding.
        Raises VolumeIOError when no in-sync image took it, StateError when the volume is closed
        or offline."""
        nblocks = self._buffers_len(buffers) // self.block_size
        if nowait and (fua or self._direct) and not device_ok:
            raise WouldBlock("the write may wait for a device")
        offset, length = self._prologue(lba, nblocks, nowait)
        if not nblocks:
            return
        if nowait:
            lk = self.locks.try_lock(lba, nblocks)
            if lk is None:
                raise WouldBlock("other I/O holds the range")
        else:
            lk = self.locks.lock(lba, nblocks)
        try:
            self._write_locked(offset, length, lambda st: st.writev(offset, buffers, fua=fua),
                               fua=fua, nowait=nowait and not device_ok,
                               own_save=nowait and device_ok)
        finally:
            lk.release()

    def flush(self):
        """Make every acknowledged write durable on every live image."""
        self.check_ready()
        ep = self._enter()
        try:
            self._fanout(ep, lambda st: st.flush(), 0, 0, parallel=True)
        except BaseException:
            self._leave(ep)
            raise
        self._leave(ep)
        with self._elock:
            self._stats["flushes"] += 1

    def unmap(self, lba, nblocks):
        """Discard blocks on every live image; they read back as zeroes."""
        offset, length = self._prologue(lba, nblocks)
        if not nblocks:
            return
        lk = self.locks.lock(lba, nblocks)
        try:
            self._write_locked(offset, length, lambda st: st.discard(offset, length), "unmaps")
        finally:
            lk.release()

    def lba_status(self, lba, max_descriptors):
        """GET LBA STATUS (SBC-3): ``provisioning.lba_status`` of an image that serves reads;
        while a restore runs every block is reported mapped (the images still hold the data a
        region not yet restored is about to get). StateError when no image can serve."""
        self.check_ready()
        if self.control.restore_job is not None:
            return [(lba, min(self.num_blocks - lba, provisioning.MAX_DESCRIPTOR_BLOCKS), False)]
        ep = self._enter()
        try:
            img = next((im for im in ep.reads if im.storage is not None), None)
            if img is None:
                raise StateError(f"volume {self.name}: no image serves reads")
            return provisioning.lba_status(img.storage, lba, self.num_blocks, self.block_size,
                                           max_descriptors)
        finally:
            self._leave(ep)

    def prefetch(self, lba, nblocks):
        """PRE-FETCH (SBC-3): start reading the blocks into the page cache of every image
        reads may use (a hint: returns at once; a restore's regions are not restored for it)."""
        if self._closed:
            self._check_open()
        if lba.__class__ is not int or lba < 0 or nblocks < 0 or lba + nblocks > self.num_blocks:
            self._check_io(lba, nblocks)          # raises unless an int subclass in range
        if self._offline is not None:
            raise StateError(f"volume {self.name} is offline: {self._offline}")
        offset, length = lba * self.block_size, nblocks * self.block_size
        ep = self._enter()
        try:
            for im in ep.reads:
                if im.storage is not None:
                    im.storage.prefetch(offset, length)
        finally:
            self._leave(ep)

    def write_same(self, lba, nblocks, block):
        """Write ``block`` (one logical block) to ``nblocks`` blocks from ``lba``."""
        block = memoryview(block).cast("B")
        if len(block) != self.block_size:
            raise ValueError(f"write_same block is {len(block)} bytes, block size is "
                             f"{self.block_size}")
        self._check_open()
        self._check_io(lba, nblocks)
        chunk = 256
        done = 0
        while done < nblocks:
            n = min(chunk, nblocks - done)
            self.write(lba + done, [block] * n)
            done += n

    def compare_and_write(self, lba, verify, data):
        """Atomically (under one exclusive range lock) compare ``verify`` with the blocks at
        ``lba`` and, if equal, write ``data``. Returns None on success, else the byte offset
        of the first miscompare (nothing written)."""
        self._check_open()
        verify = memoryview(verify).cast("B")
        data = memoryview(data).cast("B")
        if len(verify) != len(data) or len(verify) % self.block_size:
            raise ValueError("compare_and_write: verify and data must be the same whole number "
                             "of blocks")
        nblocks = len(verify) // self.block_size
        offset, length = self._prologue(lba, nblocks)
        if not nblocks:
            return None
        lk = self.locks.lock(lba, nblocks)
        try:
            cur = bytearray(length)
            self._read_locked(offset, [memoryview(cur)], length)
            if cur != verify:
                with self._elock:
                    self._stats["compare_miscompares"] += 1
                v = verify.tobytes()
                for i in range(length):
                    if cur[i] != v[i]:
                        return i
            self._write_locked(offset, length, lambda st: st.writev(offset, [data]))
            return None
        finally:
            lk.release()

    # ==== status ==================================================================================

    @property
    def images(self) -> list[ImageInfo]:
        """Every image in index order (ImageInfo snapshots, taken under the metadata lock)."""
        with self._meta:
            out = []
            for k, im in enumerate(self._images):
                bm = im.bitmap if im.state is not ImageState.IN_SYNC else None
                out.append(ImageInfo(index=k, id=im.rec.id, path=im.rec.path, state=im.state,
                                     generation=im.rec.generation, split_time=im.rec.split_time,
                                     bitmap_fill=bm.fill() if bm is not None else None,
                                     dirty_bytes=bm.dirty_bytes() if bm is not None else None,
                                     error=im.rec.error, stuck_io=im.stuck_io))
            return out

    @property
    def stats(self) -> dict:
        """I/O counters since open (reads, writes, bytes, flushes, errors, image failures,
        slow legs, out-of-space and metadata errors...), I/Os in flight, the metadata
        generation, write-intent log chunks marked (``wil_dirty_chunks``, of ``intent_chunk``
        bytes each) and saves, and each image's own counters."""
        with self._elock:
            d = dict(self._stats)
            lease = self._lease
            # the lease's entry into the epoch is no I/O; its batch in flight is, as a batch
            # without the lease enters the epoch for itself (begin_fast_writes)
            d["inflight"] = (self._epoch.inflight + sum(e.inflight for e in self._retired)
                             - (lease is not None and lease.batch is None))
            # (the images' counters under the same lock: end_ring_lease moves a lease's counts
            # into them under it, so none is added twice)
            d["images"] = [dict(im.storage.stats) if im.storage is not None else None
                           for im in self._images]
        d["generation"] = self._md.generation
        d["wil_dirty_chunks"] = self._wil.bitmap.count()
        with self._elock:
            d["torn_regions"] = len(self._torn)
        d["wil_saves"] = self._wil.saves
        if lease is not None:           # what the ring thread made under it, counted so far
            _add_lease_counts(d, lease, [im.storage for im in self._images])
        return d

    @property
    def uuid(self) -> str:
        """The volume's UUID (volume.json), also the LUN's identity in VPD 0x80/0x83."""
        return self._md.uuid

    def image_storage(self, index) -> StorageImage | None:
        """The open StorageImage of image ``index`` (for tests and tools; do not write to it)."""
        return self._img(index).storage

    def change_bitmap(self, index) -> RegionBitmap | None:
        """The live change bitmap of a split / failed / syncing image (None when in-sync)."""
        return self._img(index).bitmap

    def split_image(self, image_index, *, checked=False) -> "SplitImageVolume":
        """A block device view of split image ``image_index``, to export it as its own LUN
        (``split.SplitControl.export``); ``checked``: the caller has just judged the copy's
        identity (``check_copy(image_index, doing)``) with no lock held, so it is not judged
        again here."""
        return self.splits.export(image_index, checked=checked)

    # ==== management ==============================================================================

    def split(self, image_index) -> SplitInfo:
        """Split image ``image_index`` off at T (now); returns once the I/O begun before T
        drained and the split is durable (``split.SplitControl``: prepare, switch at T,
        finish; ``vol.splits`` runs the steps apart for a consistency group)."""
        return self.splits.split(image_index)

    def resync(self, image_index, *, rate_limit=None, full=False):
        """Bring a split or failed image back in sync by copying the regions its change bitmap
        marks (a paused 'syncing' image resumes); ``rate_limit`` in MB/s (None: unlimited);
        ``full``: every region, also into an image marked in sync (a disk suspected of dropped
        writes). Returns the running ResyncJob. StateError when the image is in sync (without
        ``full``), exported, already has a job, or a restore runs
        (``jobcontrol.JobControl.resync``)."""
        return self.control.resync(image_index, rate_limit=rate_limit, full=full)

    def restore(self, image_index, *, rate_limit=None, full=False):
        """Roll the live volume back to split image ``image_index``; returns the RestoreJob.

        When the call returns, the volume *reads as* the split image (a read or write that
        touches a region not yet copied first restores that region). Writes made after the
        call are kept. When the job is done the image stays split and its change bitmap holds
        exactly the regions written since they were restored (``jobcontrol``). ``full``: roll
        back every region, not only those changed since the split (the way to restore from a
        file that is not the recorded split copy, ``copyid``)."""
        return self.control.restore(image_index, rate_limit=rate_limit, full=full)

    def abandon_restore(self, image_index) -> dict:
        """End the unfinished, not running restore from split image ``image_index`` without
        finishing it (its source cannot be read): the volume keeps a mix of the split image's
        data and the live data. Returns ``{"regions", "bytes"}`` not rolled back; StateError
        when no such restore is unfinished or it runs
        (``jobcontrol.JobControl.abandon_restore``)."""
        return self.control.abandon_restore(image_index)

    def forget_resume(self, image_index) -> bool:
        """Cancel the resync or restore of image ``image_index`` that the volume's going
        offline stopped, so it does not go on once the volume is back; False when none waits
        (``jobcontrol.JobControl.forget_resume``)."""
        return self.control.forget_resume(image_index)

    def check_copy(self, image_index, doing="a backup of it") -> None:
        """StateError when split image ``image_index`` is not the copy its split recorded,
        naming why and what ``doing`` would not show (``jobcontrol.JobControl.check_copy``;
        ``copyid``). May read a sample of the image: call it with no lock held."""
        self.control.check_copy(image_index, doing)

    def check_restore(self, image_index, *, fresh=False, flush=False):
        """Raise the StateError ``restore(image_index)`` would refuse with now, starting
        nothing; ``fresh``: also a stopped restore of the image; ``flush``: the live images
        made durable first, VolumeIOError if that fails. Returns the image's split time (s
        since the epoch, or None) (``jobcontrol.JobControl.check_restore``)."""
        return self.control.check_restore(image_index, fresh=fresh, flush=flush)

    def attach(self, path, *, rate_limit=None, force=False) -> int:
        """Add image ``path`` (created sparse at the volume size if missing) and start its full
        resync (``rate_limit`` MB/s); returns its index. An existing image that holds data is
        refused (ConfigError saying what was found) unless ``force``; one that another volume
        uses always is (``jobcontrol.JobControl.attach``)."""
        return self.control.attach(path, rate_limit=rate_limit, force=force)

    def detach(self, image_index):
        """Remove an image from the volume (not the last in-sync one, not an exported or
        restoring split image). Its file is kept (``jobcontrol``)."""
        return self.control.detach(image_index)

    # ==== persistence =============================================================================

    def _storage_images(self) -> list:
        """Every image with open storage that is not failed: live, syncing and split (a split
        image may still hold writes begun before its T in the page cache until its split
        commits). A failed image takes no writes and nothing vouches for it: flushing it every
        round would only repeat its error. Nor a split image with a flush of its own left
        behind (``_flush_limit``): it stays split, and every round would leave one more."""
        with self._meta:
            return [im for im in self._images
                    if im.storage is not None and im.state is not ImageState.FAILED
                    and not (im.state is ImageState.SPLIT and im.stuck_io)]

    def _flush_limit(self, img):
        """How long lvmirror's own flush of ``img`` (a durability barrier's) may take before it
        fails the image as slow, in seconds; None: no limit. Only an image the volume's reads
        do not use is bounded - a split image (at its split's end, in the flusher's round), a
        syncing image (at a resync's checkpoint or end) - by ``leg_timeout`` plus what it has
        to write back (``StorageImage.unflushed``) at ``MIN_DEVICE_RATE`` bytes and
        ``MIN_DEVICE_IOPS`` writes a second; before this process first flushed it (the page
        cache may hold an earlier process's writes), ``leg_timeout`` plus
        ``UNKNOWN_DIRTY_WAIT``. An in-sync image is not bounded: failing it for slowness could
        leave no live copy."""
        if not self.leg_timeout or img.state is ImageState.IN_SYNC or img.storage is None:
            return None
        left = img.storage.unflushed()
        if left is None:
            return self.leg_timeout + UNKNOWN_DIRTY_WAIT
        return self.leg_timeout + left[0] / MIN_DEVICE_RATE + left[1] / MIN_DEVICE_IOPS

    def _flush_failed(self, img, exc):
        """The durability barrier's error path: an image whose flush failed holds nothing
        durable we can vouch for; fail it with every region marked."""
        self._image_error(img, exc, 0, 0, all_regions=True)

    def _recover_online(self):
        """The recovery thread: copy the regions a crash left in the write-intent log while
        the volume serves (``recovery.py``); the next checkpoint clears their log bits."""
        n = len(self._torn)
        t0 = time.monotonic()
        log.info("volume %s: crash recovery: copying %d region(s) the write-intent log marks "
                 "while serving; reads there use image %s until then", self.name, n,
                 next((k for k, im in enumerate(self._images) if im.state is ImageState.IN_SYNC
                       and im.storage is not None), "-"))
        try:
            left = self._settle_torn(self._stop_flusher)
        except Exception as e:   # keep serving; checkpoints and close retry
            log.error("volume %s: crash recovery: %s; the regions left are copied at the next "
                      "checkpoint", self.name, e)
            self.recovery.finish("failed", str(e))
            return
        if self._stop_flusher.is_set():
            self.recovery.finish("stopped")
        else:
            self.recovery.finish("done" if not left else "failed",
                                 f"{left} region(s) still differ (no space)" if left else None)
            # a recovery that left regions differing is an error, as its status says
            log.log(logging.ERROR if left else logging.INFO,
                    "volume %s: crash recovery: %d region(s) copied in %.2f s%s", self.name,
                    n - left, time.monotonic() - t0,
                    f"; {left} still differ (no space): reads there use one image until a "
                    f"checkpoint copies them" if left else "")

    def _locked_save_md(self):
        with self._meta:
            self._save_md()

    def checkpoint(self, *, hold=False):
        """Persist lazily kept state and clear idle write-intent bits (see module docstring).
        ``hold``: clear only regions whose last write ended before the previous checkpoint
        (what the flusher does); otherwise every region idle now. Returns the number cleared.

        Order (durability barrier): ticket, snapshot of the split / failed change bitmaps, flush
        of every image with storage, save of the snapshots, then the write-intent bits of writes
        ended before the ticket are cleared.

        With no change bitmap to save and no write-intent bit set (a one-image volume, whose
        writes set none; an idle mirror) nothing is written, so nothing needs the images
        durable first: no flush. (A one-image volume flushed its image every 2 s before
        2026-12-05, turning an initiator's buffered writes into the flusher's waits for the
        device that tcmu-runner, flushing only when told, never had.) Returns 0 then."""
        if self._torn:
            self._settle_torn()
        ticket = self._wil.ticket()
        cutoff = min(self._prev_ticket, ticket) if hold else ticket
        self._prev_ticket = ticket
        with self._meta:
            snaps = [(im, im.bitmap.copy()) for im in self._images
                     if im.bitmap is not None and im.state in (ImageState.SPLIT,
                                                               ImageState.FAILED)]
        if not snaps and not self._wil.bitmap.count():
            # (a bit a write sets after this look is cleared by a later checkpoint, which
            # flushes first)
            return 0

        flushed = self._storage_images()

        def persist(durable):
            with self._meta:
                for im, snap in snaps:
                    if im.bitmap is not None:
                        snap.union_update(im.bitmap)   # never save fewer marks than now
                        snap.save(self._bitmap_path(im))
            if not_durable(flushed, durable):
                # a flush failed on an image that still counts (the last in sync: the volume
                # went offline instead of failing it): its writes are not durable, so their
                # write-intent bits stay (a split image's resync relies on them)
                return 0
            return self._wil.clean(cutoff, self._torn_chunks())
        return self._barrier.commit(flushed, persist, what="checkpoint",
                                    limit=self._flush_limit)

    def _flush_loop(self, interval):
        while not self._stop_flusher.wait(interval):
            try:
                if self._offline is not None and not self.probe():
                    continue
                self.checkpoint(hold=True)
            except Exception as e:  # keep serving; the next round retries
                log.error("volume %s: background checkpoint failed: %s", self.name, e)

    def close(self):
        """Clean shutdown: stop jobs (they resume on the next open), drain I/O, persist
        bitmaps, clear the write-intent log, mark the metadata clean."""
        if self._closed:
            return
        with self._mgmt:
            for job in list(self.jobs.values()):
                if job.is_alive():
                    job.stop()
            for job in list(self.jobs.values()):
                job.wait()
            self._closed = True
            with self._elock:
                lease = self._lease
            if lease is not None:
                lease.revoke()          # its holder ends it; the wait below needs its epoch
            self._stop_flusher.set()
            if self._flusher is not None:
                self._flusher.join()
            if self._recovery is not None:
                self._recovery.join()
            with self._econd:
                self._econd.wait_for(lambda: self._epoch.inflight == 0 and all(
                    e.inflight == 0 for e in self._retired))
            torn = self._settle_torn() if self._torn else 0
            if torn:
                log.warning("volume %s: closing with %d region(s) the images may differ on "
                            "(a write found no space on any image); the write-intent log keeps "
                            "them and the next open repairs them", self.name, torn)

            flushed = self._storage_images()

            def persist(durable):
                with self._meta:
                    for im in self._images:
                        if im.bitmap is not None:
                            im.bitmap.save(self._bitmap_path(im))
                    lost = not_durable(flushed, durable)
                    if lost:
                        # the last in-sync image's flush failed (the volume went offline
                        # instead of failing it): nothing on it is durable, so the write-intent
                        # log keeps every bit and the volume is not marked clean; the next open's
                        # crash recovery copies those regions again
                        log.error("volume %s: closing without a clean mark: the flush of %s "
                                  "failed; the next open recovers from the write-intent log",
                                  self.name, ", ".join(im.rec.path for im in lost))
                        return
                    if torn:     # not clean: the next open's recovery repairs the torn regions
                        self._wil.clean(self._wil.ticket(), self._torn_chunks())
                    else:
                        self._wil.clear_all()
                    self._md.clean_shutdown = not torn
                    self._save_md()
            # no I/O in flight: the bitmaps need no snapshot; clean only after every image is
            # durable (a failed flush fails that image, saved whole, before the clean mark; the
            # last in-sync image is not failed, and then nothing is marked clean)
            self._barrier.commit(flushed, persist, what="clean shutdown",
                                 limit=self._flush_limit)
            for im in self._images:
                if im.worker is not None:
                    im.worker.stop()
                if im.storage is not None:
                    im.storage.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<MirrorVolume {self.name} {self.size} bytes bs={self.block_size} "
                f"images={[im.state.value for im in self._images]}>")


def _sort_leg_error(errors, img, exc, other):
    """One leg's outcome: an ImageIOError joins ``errors`` as (img, exc); the first other
    exception (a bug) is returned to be raised once every leg is accounted for."""
    if exc is None:
        return other
    if isinstance(exc, ImageIOError):
        errors.append((img, exc))
        return other
    return other if other is not None else exc


def _default_opener(path, *, direct=False):
    return StorageImage.open(path, direct=direct)
