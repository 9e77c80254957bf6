"""One LUN: its TCMU ring, the ring thread, its worker pool, the SCSI core before the volume.

Before each fetch the ring thread's compiled path (``tcmu._fastread.read_batch``, see
docs/architecture.rst) answers the READs at the ring's head whose data the page cache holds,
with no Command object, SCSI core or volume call in Python: it holds the GIL throughout and reads
the conditions under which such a read is the one ``LogicalUnit.execute(nowait=True)`` would
give (``_arm_compiled``) from the objects when it starts. It also makes the WRITEs without FUA
there (``_compiled_writes``) to every image of a volume whose images are all in sync and whose
changes no split or failed image tracks, and READs over INLINE_READ_MAX, up to
COMPILED_READ_MAX (``_compiled_big_reads``), in three steps (``_unlocked_batch``): taken from
the ring under its lock (``tcmu._fastread.take_batch``), their I/O made with neither the ring's
lock nor the GIL, the blocks they cover locked (``run_batch``, inside the volume's
``begin_fast_writes``/``begin_fast_reads``, ``lock_fast`` and ``end_fast_*``), and completed
under the lock again (``complete_batch``); the watchdog watches the I/O as it watches a command
the ring thread runs itself. On a volume whose epoch writes one image the ring thread keeps
the epoch and a whole-LUN region lock across its batches instead, as a lease any other request
revokes (``_leased_batch``, ``mirror/ringlease.py``): at queue depth 1 a batch is one command,
and the per-batch lock and epoch were most of its Python. On a mirror in sync the lease is for
READs only, ended at the first WRITE. Under the lease the ring thread's
loop itself - batches, telling the kernel, waiting for its next command - runs in C
(``_lease_serve``, ``_fastread.lease_serve``) and returns here only for what the Python loop
answers (another opcode, a failed or slow batch, a revocation, a stop). On the host's ring emulator
(2026-12-03, queue depth 32) it took lvmirrord's CPU per 4 KiB read from 11.3-12.8 to 3.3-3.7 us
(tmpfs) and from 10.0-10.7 to 2.8-3.0 us (ext4); README's Performance section has the lab's.

The ring thread fetches every available command. It answers the commands that cannot wait for
a device itself, with no hand-off: READs from the page cache (RWF_NOWAIT; from tmpfs, which
refuses it, a plain read while no swap is in use: ``StorageImage.readv``), and buffered WRITEs
without FUA whose range no other I/O holds and whose regions the write-intent log marks
already (no save with fsync) - up to INLINE_WRITE_MAX bytes, or INLINE_IDLE_MAX when the
command is the only one outstanding (queue depth 1). At queue depth 1 it also runs a READ or
WRITE that waits for a device (data not in the page cache, a write-intent log save, FUA:
``LogicalUnit.execute(nowait=True, device_ok=True)``), since nothing else waits for the ring
thread meanwhile; one that would wait for another I/O never - a region lock another holds, a
restore, another thread's save of the write-intent log (each is only tried; under them the
command runs to its end), and an image's error is left to a worker. It hands the rest
to the LUN's own worker pool (a slow image or a long resync never stalls another LUN),
collects their completions and tells the kernel once per batch. (Workers completing on the
ring and notifying the kernel themselves, as tcmu-runner's handler threads do, was measured:
4 KiB random writes at queue depth 32 fell from 1,532 to 924 IOPS in the kernel lab, one uio
write and one kernel completion pass per command instead of per batch.)

A buffered write can still wait - the kernel throttles a writer when dirty pages pile up on a
slow device, and a dying device can hold it for as long as its timeouts run - so the ring
thread is watched: when a command it runs itself takes longer than INLINE_STALL seconds, the
watchdog hands the ring to a new ring thread (with the rest of the batch to the pool) and every
WRITE goes to the pool until the stuck command has returned and INLINE_BACKOFF seconds have
passed; the stuck thread, once its command returns, hands the completion over as a worker would
and ends. The ring never waits on a device for much longer than INLINE_STALL (the watchdog
looks as a command it saw begin turns INLINE_STALL old), and at most one thread is left waiting
so.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import select
import threading
import time

from lvmirror import cfgstring
from lvmirror.errors import ConfigError, HeldForBackup, LvmirrorError, StateError, WouldBlock
from lvmirror.mirror.legs import Worker
from lvmirror.mirror.volume import PARALLEL_MIN_BYTES
from lvmirror.mirror import ringlease
from lvmirror.scsi import LogicalUnit, Response
from lvmirror.daemon.iostats import BUCKETS, LatencyHistogram
from lvmirror.daemon.lease import LeaseHeldError
from lvmirror.scsi.lu import READ_OPCODES, WRITE_OPCODES
from lvmirror.scsi import alua
from lvmirror.scsi import constants as scsi
from lvmirror.scsi.sense import build_sense
from lvmirror.tcmu import uio
from lvmirror.tcmu.ring import CommandRing, RingError

try:      # the compiled READ path (tcmu/_fastread.c), built with the package
    from lvmirror.tcmu import _fastread
except ImportError:        # a tree nobody built: the Python path answers every READ
    _fastread = None
# why a compiled batch stopped (_fastread's STOP_*), as globals: the ring thread tests them
# several times a batch
(_STOP_HEAD, _STOP_READ, _STOP_WRITE, _STOP_BIG_READ, _STOP_BUSY, _STOP_STALE, _STOP_MISS,
 _STOP_MISS_WRITE) = ((_fastread.STOP_HEAD, _fastread.STOP_READ, _fastread.STOP_WRITE,
                       _fastread.STOP_BIG_READ, _fastread.STOP_BUSY, _fastread.STOP_STALE,
                       _fastread.STOP_MISS, _fastread.STOP_MISS_WRITE)
                      if _fastread is not None else (-1, -2, -3, -4, -5, -6, -7, -8))

log = logging.getLogger("lvmirrord")

__all__ = ["LunServer", "LunBackend", "NotReadyBackend", "SUBTYPE", "INLINE_READ_MAX",
           "INLINE_WRITE_MAX", "INLINE_IDLE_MAX", "INLINE_STALL"]

SUBTYPE = "lvmirror"
# what uio read/write/poll give once the kernel has unregistered the device under an open fd
DEVICE_GONE_ERRNOS = (errno.EIO, errno.ENODEV, errno.ENXIO)


def gateway_state_dirs(sysfs_root: str, configfs_root: str) -> set[str]:
    """The state directories the cfgstrings of this gateway's user:lvmirror backstores name
    (configfs, whichever process serves each): a volume created here may not share an image
    file with theirs (``cfgstring.gateway_state_dirs``)."""
    devices = uio.find_devices(SUBTYPE, sysfs_root=sysfs_root, configfs_root=configfs_root)
    return cfgstring.gateway_state_dirs(d.cfgstring for d in devices)


class LunBackend:
    """The SCSI core's view of a volume or exported split image, at the LUN's size."""

    def __init__(self, target, lun_size: int):
        if lun_size > target.size:
            raise ConfigError(f"the LUN is {lun_size} bytes but {target.name} holds only "
                              f"{target.size} bytes")
        self.target = target
        self.block_size = target.block_size
        self.num_blocks = lun_size // target.block_size
        self.read = target.read
        self.write = target.write
        self.flush = target.flush
        self.unmap = target.unmap
        self.compare_and_write = target.compare_and_write
        if hasattr(target, "write_same"):
            self.write_same = target.write_same
        # TEST UNIT READY asks the volume whether it can serve (offline: every image failed)
        self.check_ready = target.check_ready


class NotReadyBackend:
    """Stands behind a LUN whose volume is not open (it could not be opened, or its target port
    group is Standby here): medium access gets NOT READY. ``lun_size`` in bytes,
    ``block_size`` in bytes (the backstore's hw_block_size, so that READ CAPACITY through a
    Standby port says what the Active gateway says)."""

    def __init__(self, lun_size: int, block_size: int = 512):
        self.block_size = block_size
        self.num_blocks = max(lun_size // block_size, 1)
        self.reason = "volume not open"

    def _refuse(self, *args, **kwargs):
        raise StateError(self.reason)

    read = write = flush = unmap = compare_and_write = _refuse


# How long stopping a LUN waits for images failed as slow to let go of completed commands' data
# views before it leaves the ring mapped (seconds).
HELD_VIEWS_WAIT = 30.0

# The largest READ (bytes) the ring thread answers itself from the page cache: a larger copy
# is better spread over the pool's threads (preadv drops the GIL: copies run in parallel).
INLINE_READ_MAX = 64 << 10

# The largest WRITE (bytes) the ring thread runs itself at any queue depth: a buffered write of
# a few pages costs less than the hand-off to a worker and back (two thread wake-ups; on the
# ring emulator, 2026-12-02, 4 KiB mirrored writes at QD 32 took 88-103 CPU us a command
# through the pool, 37-55 on the ring thread); a larger copy is better spread over the pool's
# threads, whose pwritev calls run in parallel.
INLINE_WRITE_MAX = 64 << 10

# The largest WRITE (bytes) the ring thread runs itself when it is the only command outstanding:
# at queue depth 1 nothing else waits for the ring thread.
INLINE_IDLE_MAX = 1 << 20

# The largest READ and WRITE (bytes) the compiled path answers (``_compiled_reads``). READs over
# INLINE_READ_MAX go to ``_unlocked_batch``, which copies with the GIL released under a shared
# region lock over the blocks it covers, so the pool's threads still run meanwhile; with
# RWF_NOWAIT they never wait for a device. In the kernel lab (2026-12-04) 1 MiB sequential READs
# at queue depth 8 all went to the pool before, at 0.89-0.93x tcmu-runner's IOPS, and 0.95-1.03x
# after (README, Performance). WRITEs up to 1 MiB too (2026-12-06): the compiled path writes
# them without the GIL, as it does the small ones, in a batch of up to 8 MiB; a batch that
# takes longer than INLINE_SLOW (a buffered write throttled) sends every WRITE to the pool for
# INLINE_BACKOFF, and one that stalls is the watchdog's. (An earlier trial of 1 MiB gained
# nothing because read_batch still sent every WRITE over 64 KiB to the Python fetch.)
COMPILED_READ_MAX = 1 << 20
COMPILED_WRITE_MAX = 1 << 20
# ... and for a mirror (2-4 images), which it writes one leg after the other with no bound: under
# the volume's PARALLEL_MIN_BYTES (128 KiB), from which the Python path writes the legs in
# parallel and fails one still busy ``leg_timeout`` seconds after another finished. Up to 1 MiB,
# a stalled leg held such a WRITE for as long as its device stalled (review of 2026-12-06, HIGH).
COMPILED_MIRROR_WRITE_MAX = INLINE_WRITE_MAX
assert COMPILED_MIRROR_WRITE_MAX < PARALLEL_MIN_BYTES

# A command the ring thread runs itself and that has not returned after INLINE_STALL seconds
# (a writer throttled by the kernel behind a slow or dying device) makes the watchdog hand the
# ring to a new ring thread. While the LUN is busy the watchdog wakes when the command it saw
# begin would be INLINE_STALL old (INLINE_STALL after a look that saw none): about 5 times a
# second. After such a spell with no command fetched and none running on the ring thread it
# sleeps until its next ALUA follow, and the ring thread wakes it when it begins a command of
# its own (``_watch``).
INLINE_STALL = 0.2

# A command the ring thread ran itself that took longer than INLINE_SLOW seconds means the
# images are slow right now (a device behind the page cache, dirty-page throttling, an image
# failing as slow): the ring thread then hands every WRITE to the pool for INLINE_BACKOFF
# seconds, so that it keeps fetching aborts and other commands while the images catch up.
INLINE_SLOW = 0.25
INLINE_BACKOFF = 5.0

# The ring thread's compiled path (``tcmu._fastread.read_batch``) answers the READs the page
# cache holds before the Python fetch sees them. LVMIRROR_COMPILED_READS=0 in lvmirrord's
# environment turns it off (the Python path then answers them as before); so does a tree whose
# module was not built.
COMPILED_READS = _fastread is not None and os.environ.get("LVMIRROR_COMPILED_READS", "1") != "0"
# The same path makes the WRITEs of a volume whose images are all in sync and whose changes no
# split or failed image tracks (``MirrorVolume.fast_write_source``), to each image, releasing
# the GIL and the ring's lock for the writes.
# LVMIRROR_COMPILED_WRITES=0 leaves them to the Python path.
COMPILED_WRITES = (_fastread is not None
                   and os.environ.get("LVMIRROR_COMPILED_WRITES", "1") != "0")
# The ring thread keeps a lease on a one-image volume (``mirror/ringlease.py``): the region
# lock and the split epoch held across its compiled batches, given back to whatever asks.
# LVMIRROR_RING_LEASE=0 takes them for each batch instead (``_unlocked_batch``).
RING_LEASE = os.environ.get("LVMIRROR_RING_LEASE", "1") != "0"
# On a mirror in sync, and on a volume whose WRITEs the compiled path does not make (a
# write-through or write-protected LU), the lease is for READs only (``RingLease.reads_only``):
# ended at the first WRITE, none taken for ``ringlease.BACKOFF`` seconds after nor while WRITEs
# lead. LVMIRROR_MIRROR_LEASE=0 takes none of these (each READ batch locks and enters the epoch
# itself, as before).
MIRROR_LEASE = RING_LEASE and os.environ.get("LVMIRROR_MIRROR_LEASE", "1") != "0"
# Under its lease the ring thread's loop itself is compiled (``_lease_serve``,
# ``_fastread.lease_serve``): it returns to Python at the latest after LEASE_LOOP_ROUNDS waits
# for the kernel or LEASE_LOOP_WAIT seconds, so that the LUN's counters in status move.
# LVMIRROR_LEASE_LOOP=0 makes each batch under the lease one call from the Python loop instead.
LEASE_LOOP = os.environ.get("LVMIRROR_LEASE_LOOP", "1") != "0"
LEASE_LOOP_ROUNDS = 256
LEASE_LOOP_WAIT = 1.0
# How many times one turn of the ring thread lets READs and WRITEs take turns on the compiled
# path (each stops at the other's kind) before the Python fetch.
COMPILED_TURNS = 8
# How long (seconds) the ring thread waits before it asks the volume again for a source of
# compiled READs when there was none (an O_DIRECT volume, a restore, a torn region...).
COMPILED_READS_RETRY = 0.1
# What ``LunServer._arm_compiled`` found: the image READs come from (``storage``) and the images
# WRITEs go to (``wstorage``: a tuple of 1-4 StorageImages, None when WRITEs are not armed), the
# backend, the LUN's geometry
# (blocks, bytes per block), the largest READ and WRITE in bytes and in blocks, and the
# conditions of each kind (``(obj, attribute, kind, value)`` rows: ``tcmu._fastread``).
# READs over ``max_read`` and up to ``max_big_read`` are read without the GIL under the
# volume's ``begin_fast_reads``; ``wbusy`` is the busy condition of both unlocked batches (the
# region lock taken is their own); ``rfds``/``wfds`` the descriptors they read and write;
# ``leasable``: "writes" (WRITEs armed to one image: a lease for both kinds), "reads" (a
# mirror, or WRITEs not armed - write-through, write-protected: for READs only) or None (no
# lease, ``_begin_lease``).
_Armed = collections.namedtuple("_Armed", "storage target num_blocks block_size max_read max_write "
                                          "max_blocks checks busy wstorage wchecks wbusy "
                                          "max_big_read rfds wfds take_writes take_big_reads "
                                          "run complete leasable lease_busy lease_writes "
                                          "lease_big_reads lease_serve")
_CHECK_KINDS = ({"is": _fastread.CHECK_IS, "falsy": _fastread.CHECK_FALSY,
                 "eq": _fastread.CHECK_EQ} if _fastread is not None else {})

# Commands a LUN answers even when its volume is not open (so initiators can see why).
# the commands that write, which end a lease for READs only and lead (``_serve_ring``)
_LEADING_WRITES = WRITE_OPCODES | {scsi.WRITE_SAME_10, scsi.WRITE_SAME_16, scsi.UNMAP,
                                   scsi.COMPARE_AND_WRITE, scsi.WRITE_AND_VERIFY_10,
                                   scsi.WRITE_AND_VERIFY_12, scsi.WRITE_AND_VERIFY_16}
_ALWAYS_ANSWERED = {scsi.INQUIRY, scsi.REQUEST_SENSE, scsi.MAINTENANCE_IN}

# ALUA (SPC-4 5.16): the access states of this gateway's target port group in which the LUN's
# volume is not opened here, and the NOT READY additional sense its medium-access commands get:
# LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE / UNAVAILABLE STATE, and LOGICAL
# UNIT NOT READY, OFFLINE - what the kernel's own check answers (target_core_alua.c,
# core_alua_state_standby/unavailable/offline), which stops most of them before they reach
# lvmirrord. The volume - and its lease - belongs to the gateway whose group is Active.
INACTIVE_SENSE = {alua.STANDBY: (0x04, 0x0B), alua.UNAVAILABLE: (0x04, 0x0C),
                  alua.OFFLINE: (0x04, 0x12)}
# LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION: the group became Active and
# the volume is being opened; Linux's SCSI midlayer retries the command after a delay
# (scsi_lib.c, ACTION_DELAYED_RETRY), dm-multipath's alua handler too.
ASC_ALUA_TRANSITION = (0x04, 0x0A)
# What the kernel passes to the handler through a Standby port (core_alua_state_standby), all
# answered from the backstore's size and configfs, with no volume open.
_INACTIVE_ANSWERED = _ALWAYS_ANSWERED | {scsi.READ_CAPACITY_10, scsi.SERVICE_ACTION_IN_16,
                                         scsi.MODE_SENSE_6, scsi.MODE_SENSE_10, scsi.REPORT_LUNS}
# How often (seconds) the LUN's watchdog thread reads this gateway's port group state from
# configfs (the kernel does not tell the handler when ``alua_access_state`` changes).
ALUA_FOLLOW_INTERVAL = 1.0



class _Countdown:
    """Calls ``fn(arg)`` once ``done`` has been called ``n`` times (from any threads)."""

    __slots__ = ("_left", "_mu", "_fn", "_arg")

    def __init__(self, n: int, fn, arg):
        self._left = n
        self._mu = threading.Lock()
        self._fn = fn
        self._arg = arg

    def done(self) -> None:
        with self._mu:
            self._left -= 1
            last = self._left == 0
        if last:
            self._fn(self._arg)


class LunServer:
    """Serves one user:lvmirror device: its TCMU ring, its worker pool, its volume."""

    def __init__(self, device, registry, *, workers: int = 4,
                 inline_reads: bool = True, peers=None):
        """``device``: a ``uio.UioDevice``; ``registry``: the ``VolumeRegistry`` the LUN
        acquires its volume from. ``workers``: threads of the LUN's pool, which runs every
        command that may block.
        ``inline_reads``: the ring thread answers a READ itself when the data is in the page
        cache, and a buffered WRITE of at most INLINE_IDLE_MAX bytes that is the only command
        outstanding when no other I/O holds its range (``LogicalUnit.execute(nowait=True)``),
        saving the hand-off to a worker and back; any other command, or one that would wait for
        a lock, a restore or a device, goes to the pool.
        ``peers``: a callable returning the LunServers of this process, among which EXTENDED
        COPY finds the other LUN a copy names (``scsi.xcopy``; None: this LUN only)."""
        self.device = device
        self._peers = peers
        self.inline_reads = inline_reads
        self.inline = 0              # commands the ring thread answered itself
        self.compiled = 0            # ... of which the compiled READ path answered
        self.compiled_writes = 0     # ... and its WRITEs (``COMPILED_WRITES``)
        self._fast = None            # the compiled path's arguments (_arm_compiled), or None
        self._fast_retry = 0.0       # monotonic time before which it is not armed again
        # the kind of the compiled path's last batch (_STOP_READ or _STOP_WRITE): the
        # kind its next call asks first
        self._lead = _STOP_READ
        self._compiled_off = False   # it raised (a bug): the Python path answers every READ
        # the ring thread's lease on its volume (``_begin_lease``, ``mirror/ringlease.py``), and
        # the monotonic time before which it takes none (after a revocation)
        self._lease = None
        self._lease_after = 0.0
        self.leases = 0              # leases taken
        self.leases_revoked = 0      # ... of which given back because something asked
        self.inline_slow = 0         # ... of which took longer than INLINE_SLOW
        self._inline_after = 0.0     # monotonic time before which WRITEs all go to the pool
        # the ring thread's role (``_serve_ring``): its generation, bumped by the watchdog when
        # it hands the ring to a new thread; when the command the ring thread runs itself began
        # (monotonic, 0.0: none); the rest of the batch it is running itself
        self._gen = 0
        self._role_mu = threading.Lock()
        self._inline_t0 = 0.0
        self._inline_q: collections.deque = collections.deque()
        self.handovers = 0           # times the watchdog handed the ring to a new thread
        self._stuck = 0              # ring threads handed over whose command has not returned
        self._watcher = None
        # the watchdog sleeps while the LUN is idle (``_watch_idle`` True) until the ring
        # thread, beginning a command of its own, or ``stop`` or an ALUA nudge sets the event
        self._watch_wake = threading.Event()
        self._watch_idle = False
        self.registry = registry
        self.name = device.dev_name
        self.workers = workers
        self.spec = None
        self.volume = None
        self.backend = None
        self.error = None            # why the LUN answers NOT READY, for status displays
        self.lu = None
        self.commands = 0
        self.latency = LatencyHistogram()      # fetch to completion, by kind (iostats.py)
        self.gone = False            # the kernel removed the uio device under the ring
        self._completions: collections.deque = collections.deque()   # (command, response)
        self._aborted: set[int] = set()
        self._running: set[int] = set()   # ids of fetched commands not yet answered (ring thread)
        self._held: list = []      # completed commands whose views a slow leg still uses
        self._hold_mu = threading.Lock()     # completions held for a group split: hold()
        self._holding: list | None = None
        self._held_for = None
        self._hold_since = 0.0
        self._hold_timer = None
        self._stop = threading.Event()
        self._thread = None
        self._pool = None
        self._handle = None
        self._ring = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False
        # ALUA: this gateway's port group state as last read (scsi.alua state, None: no single
        # local port), whether the volume is (meant to be) open here, the NOT READY additional
        # sense of medium access while it is not (None: not for ALUA), the transition thread
        self.alua_state = None
        self._alua_open = True
        self._alua_next = 0.0
        self.standby_sense = None
        self._transition = None
        self._follow_error: str | None = None    # the last follow failure logged (_follow_failed)
        # the last open was refused for a reason that passes by itself: "lease" (another
        # gateway holds it), "backup" (a backup holds the split image a writable export
        # wants); retried by _follow_alua. None: not refused so
        self._retry_open = None
        self._size = self._max_blocks = None

    # -- life cycle -----------------------------------------------------------------------------
    def open(self, *, pickup: bool = False, handle=None):
        """Open the uio device (or use ``handle``, e.g. the ring emulator's) and the volume.

        Device errors (busy, wrong ring) raise; volume errors - any, not only the foreseen
        LvmirrorError ones - leave the LUN answering NOT READY with the reason logged and kept
        in ``error``. When this gateway's ALUA port group is Standby, Unavailable or Offline
        the volume is not opened (nor its lease taken) until the group becomes Active
        (``_follow_alua``)."""
        self._handle = handle if handle is not None else uio.open_device(self.device,
                                                                         pickup=pickup)
        try:
            self._ring = CommandRing(self._handle.map, map_size=self._handle.map_size)
        except RingError:
            self._handle.close()
            raise
        self._size = self.device.lun_size()
        self._max_blocks = self.device.max_transfer_blocks()
        if not self.device.enable_tmr_notification():
            log.info("LUN %s: the kernel does not report task management (attrib/"
                     "tmr_notification): aborted commands are only seen when they complete",
                     self.name)
        state = self.alua_state = self._local_alua_state()
        if state in INACTIVE_SENSE:
            self._alua_open = False
            self._set_inactive(state)
            log.info("LUN %s: %s", self.name, self.error)
        else:
            self._open_volume()

    def _open_volume(self):
        """Acquire the volume the cfgstring names (from the registry: may wait for its lease)
        and serve it; on failure - any, not only the foreseen LvmirrorError ones - keep the
        reason in ``error`` and answer NOT READY."""
        size, wwn = self._size, self.device.wwn     # read when a page needs it (lu.py)
        try:
            spec = cfgstring.parse(self.device.cfgstring)
            volume, target = self.registry.acquire(spec, lun=self.name, size=size,
                                                   other_state_dirs=self._gateway_state_dirs)
            try:
                self._check_block_size(volume)
                backend = LunBackend(target, size)
            except BaseException:
                self.registry.release(spec, target)
                raise
            lu = LogicalUnit(backend, wwn=wwn, write_cache=self.device.write_cache(),
                             max_transfer_blocks=self._max_blocks, read_only=spec.readonly,
                             copy_resolver=self._copy_peer, port_groups=self.device.port_groups)
            # the LU before ``error`` clears: a command that sees no error runs on this one
            self.spec, self.volume, self.backend, self.lu = spec, volume, target, lu
            self.error = None
            self.standby_sense = None
            self._retry_open = None
            log.info("LUN %s: serving %s (%d images, %d bytes) on %s", self.name,
                     target.name, len(volume.images), backend.num_blocks * backend.block_size,
                     self.device.uio_name)
        except LvmirrorError as exc:
            # held by another gateway: while this gateway's group is Active, the open is tried
            # again at every follow (_follow_alua) until that gateway lets it go. Medium access
            # meanwhile gets MANUAL INTERVENTION REQUIRED, not ASYMMETRIC ACCESS STATE
            # TRANSITION: on a transition Linux's sd spins the disk up (START STOP UNIT, up to
            # 100 s) and holds the initiator's scan, as the lab's lease section saw
            # a writable export of a split image a backup holds: tried again likewise until
            # the backup ends (trial 38: it stayed NOT READY until the LUN was made again)
            again = bool(self._retry_open) and str(exc) == self.error
            self._retry_open = ("lease" if isinstance(exc, LeaseHeldError) else
                                "backup" if isinstance(exc, HeldForBackup) else None)
            active = self.alua_state is not None and self.alua_state not in INACTIVE_SENSE
            self._set_unopened(str(exc))
            if not again:
                log.error("LUN %s: %s; medium access gets NOT READY until it is fixed%s",
                          self.name, exc,
                          " (tried again every second until the backup ends)"
                          if self._retry_open == "backup" else
                          " (tried again every second while this gateway's port group is "
                          "Active)" if self._retry_open and active else "")
        except Exception as exc:
            # a volume whose state lvmirror cannot read (a bug, or state no version should
            # have written) must not take lvmirrord and every other LUN down with it
            self._set_unopened(f"cannot open the volume: {type(exc).__name__}: {exc}")
            log.exception("LUN %s: %s; medium access gets NOT READY until it is fixed",
                          self.name, self.error)

    def _gateway_state_dirs(self) -> set[str]:
        return gateway_state_dirs(self.device.sysfs_root, self.device.configfs_root)

    def _unopened_lu(self):
        """A LogicalUnit over NotReadyBackend at the LUN's size and hw_block_size."""
        return LogicalUnit(NotReadyBackend(self._size, self.device.hw_block_size() or 512),
                           wwn=self.device.wwn, port_groups=self.device.port_groups)

    def _set_unopened(self, reason: str, sense=None):
        """Answer NOT READY for ``reason`` (kept in ``error``); ``sense``: the additional
        sense of medium access (ALUA), None: MANUAL INTERVENTION REQUIRED."""
        lu = self._unopened_lu()
        self.error = reason          # before the LU: a command that sees the LU sees the error
        self.standby_sense = sense
        self.lu = lu

    def _set_inactive(self, state: int):
        self._set_unopened(
            f"its target port group is {alua.STATE_NAMES.get(state, hex(state))} on this "
            f"gateway: the volume is not open here (it is opened when the group becomes Active)",
            INACTIVE_SENSE[state])

    # -- ALUA: following this gateway's target port group -----------------------------------------
    @property
    def standby(self) -> bool:
        """The volume is not open here because this gateway's port group is not Active."""
        return not self._alua_open

    def _local_alua_state(self):
        """The access state (``scsi.alua``) of the group of this gateway's one enabled port, or
        None: no ALUA groups, not exactly one enabled port, or configfs unreadable."""
        try:
            return self.device.local_port_state()
        except (OSError, ValueError):
            return None

    def _follow_alua(self):
        """Watchdog thread (``_watch``), every ALUA_FOLLOW_INTERVAL s: when this gateway's port
        group went from an Active state to Standby, Unavailable or Offline, close the volume
        (after its commands in flight) and release it; from one of those to Active, open it
        again. Whoever manages
        the cluster writes ``alua_access_state`` (the resource agent); a planned move is the
        owner's group to Standby, then the other gateway's to Active. While the group is Active
        and the open was refused because another gateway holds the volume's lease, it is tried
        again at every follow, as is an open refused because a backup holds the split image a
        writable export wants (``HeldForBackup``). Transitioning and no local port change
        nothing. One transition at a time, on a thread of its own."""
        if self._transition is not None and self._transition.is_alive():
            return
        state = self._local_alua_state()
        if state is None and self._retry_open == "backup" and self.spec is None:
            # no port group to follow (none, or several enabled ports): an export refused
            # for a backup's hold is tried again all the same (review of 2026-12-06)
            self._transition = threading.Thread(target=self._open_volume,
                                                name=f"reopen-{self.name}", daemon=True)
            self._transition.start()
            return
        if state is None or state == alua.TRANSITIONING:
            return
        self.alua_state = state
        want_open = state not in INACTIVE_SENSE
        if want_open == self._alua_open:
            if not want_open and self.standby_sense != INACTIVE_SENSE[state]:
                self._set_inactive(state)      # Standby to Unavailable, say
            if not (want_open and self._retry_open and self.spec is None):
                return
            # Active here, the lease still held by the gateway that had the volume: try again
            # (a planned move's demote there releases it; a crashed holder's expires)
        self._alua_open = want_open
        self._transition = threading.Thread(
            target=self._to_active if want_open else self._to_inactive, args=(state,),
            name=f"alua-{self.name}", daemon=True)
        self._transition.start()

    def _to_active(self, state: int):
        if not self._retry_open:         # a retry keeps its sense, and is not news
            self.standby_sense = ASC_ALUA_TRANSITION
            log.info("LUN %s: its target port group is %s now: opening the volume", self.name,
                     alua.STATE_NAMES.get(state, hex(state)))
        self._open_volume()

    def _to_inactive(self, state: int):
        spec, backend = self.spec, self.backend
        self._set_inactive(state)
        self.spec = self.volume = self.backend = None
        if spec is None:
            return
        log.info("LUN %s: its target port group is %s now: closing volume %s after its "
                 "commands in flight", self.name, alua.STATE_NAMES.get(state, hex(state)),
                 spec.name)
        # commands fetched before the switch run on the volume's LU; wait for every one
        deadline = time.monotonic() + HELD_VIEWS_WAIT
        while (self._ring.outstanding or self._held) and time.monotonic() < deadline:
            time.sleep(0.02)
        held_ok = not self._held
        if not held_ok:
            log.error("LUN %s: completed commands still have their data in use by an image "
                      "failed as slow after %.0f s; the volume's lease stays held until they "
                      "return", self.name, HELD_VIEWS_WAIT)
        self.registry.release(spec, backend, keep_lease=not held_ok)
        log.info("LUN %s: volume %s closed on this gateway", self.name, spec.name)

    def _unopened_sense(self, op: int):
        """The additional sense of NOT READY for opcode ``op`` on a LUN whose volume is not
        open, or None when the unopened LU answers it (INQUIRY, RTPG; READ CAPACITY, MODE
        SENSE and REPORT LUNS too when the port group is not Active, as the kernel lets them
        through). A medium access arriving while the group is Active again gets ASYMMETRIC
        ACCESS STATE TRANSITION and starts the open now rather than at the next follow."""
        sense = self.standby_sense
        if sense is None:
            return None if op in _ALWAYS_ANSWERED else scsi.ASC_LUN_NOT_READY_MANUAL_INTERVENTION
        if op in _INACTIVE_ANSWERED:
            return None
        if sense != ASC_ALUA_TRANSITION:
            state = self._local_alua_state()
            if state is not None and state not in INACTIVE_SENSE and state != alua.TRANSITIONING:
                self._alua_next = 0.0      # the watchdog follows at once
                self._watch_wake.set()
                return ASC_ALUA_TRANSITION
        return sense

    def _copy_peer(self, naa: bytes):
        """The LogicalUnit of another LUN of this process whose NAA designator is ``naa`` and
        which serves its volume, or None (EXTENDED COPY's CSCD descriptors name LUNs so)."""
        for peer in (self._peers() if self._peers is not None else ()):
            lu = peer.lu
            if peer is not self and peer.error is None and lu is not None and lu.naa == naa:
                return lu
        return None

    def _check_block_size(self, volume):
        hw = self.device.hw_block_size()
        if hw is not None and hw != volume.block_size:
            raise ConfigError(f"LUN {self.name}: hw_block_size is {hw} but volume {volume.name} "
                              f"has {volume.block_size}-byte blocks (set control "
                              f"hw_block_size={volume.block_size} before enabling)")

    def start(self):
        """Start the worker pool (``workers`` threads) and the ring thread; call after open."""
        self._pool = Worker(f"lun-{self.name}", self.workers)
        self._thread = threading.Thread(target=self._serve, args=(0,), name=f"ring-{self.name}",
                                        daemon=True)
        self._thread.start()
        self._watcher = threading.Thread(target=self._watch, name=f"ring-watch-{self.name}",
                                         daemon=True)
        self._watcher.start()

    def stop(self):
        """Drain in-flight commands, complete them, release the volume and the device.
        Idempotent."""
        if self._wake_w < 0:
            return
        self.release()          # completions held for a group split go out before the drain
        self._stop.set()
        self._watch_wake.set()
        self._wake_pending = False
        self._wake()
        if self._watcher is not None:
            self._watcher.join()
        while self._thread is not None:      # the ring thread the watchdog handed it to last
            thread = self._thread
            if thread.ident is None:         # it could not be started (_hand_over)
                break
            thread.join()
            if self._thread is thread:
                break
        if self._pool is not None:           # (a ring thread that ended on an error left it)
            self._pool.stop()
        if self._transition is not None:     # an ALUA open or close under way ends first
            self._transition.join()
        # an image failed as slow may still be writing a completed command's data: wait for
        # it before the volume is closed and its lease (shared storage) released
        held_ok = not self._held or self._release_held(wait=HELD_VIEWS_WAIT)
        if not held_ok:
            log.error("LUN %s: %d completed command(s) still have their data in use by an image "
                      "failed as slow after %.0f s; the ring stays mapped and the volume's "
                      "lease held until they return", self.name, len(self._held),
                      HELD_VIEWS_WAIT)
        if self.spec is not None:
            self.registry.release(self.spec, self.backend, keep_lease=not held_ok)
            self.spec = None
        if self._ring is not None:
            try:
                self._ring.close()
            except BufferError:
                pass        # views still exported: unmapped when the last one goes
        if self._handle is not None:
            self._handle.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1

    def reconfigure(self, event):
        """Apply a netlink RECONFIG_DEVICE ``event``: write cache on/off, a new size in bytes
        (at most what the volume holds: ConfigError otherwise; the LUN reports CAPACITY DATA HAS
        CHANGED), a new cfgstring (ConfigError: a live LUN's cfgstring cannot change)."""
        if event.write_cache is not None:
            self.lu.write_cache = bool(event.write_cache)
            log.info("LUN %s: write cache %s", self.name, "on" if event.write_cache else "off")
        if event.dev_size is not None and self.volume is not None:
            target = self.backend
            if event.dev_size > target.size:
                raise ConfigError(f"LUN {self.name}: {event.dev_size} bytes is more than "
                                  f"{target.name} holds ({target.size} bytes)")
            self.lu.backend.num_blocks = event.dev_size // target.block_size
            self._size = event.dev_size          # what a reopen (ALUA) serves
            self.lu.capacity_changed()
            log.info("LUN %s: size now %d bytes", self.name, event.dev_size)
        elif event.dev_size is not None:
            # not open here (Standby, or refused): the size READ CAPACITY gives and the next
            # open serves; that open refuses it if the volume holds less
            self._size = event.dev_size
            self.lu.backend.num_blocks = max(event.dev_size // self.lu.backend.block_size, 1)
            self.lu.capacity_changed()
            log.info("LUN %s: size now %d bytes (the volume is not open here)", self.name,
                     event.dev_size)
        if event.dev_cfg is not None and event.dev_cfg != f"{SUBTYPE}/{self.device.cfgstring}":
            raise ConfigError(f"LUN {self.name}: changing the cfgstring of a live LUN is not "
                              f"supported (remove and re-create the backstore)")

    # -- the ring thread -----------------------------------------------------------------------
    def _wake(self):
        # One wake-up per batch: the ring thread clears the flag before it drains the
        # completion queue, so a completion queued while the flag is set is drained anyway.
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass        # the pipe is full of wake-ups already

    def _serve(self, gen: int):
        try:
            try:
                self._serve_ring(gen)
            finally:
                self._end_lease(gen)       # (the ring thread's own, whichever way it ends)
        except OSError as exc:
            if exc.errno not in DEVICE_GONE_ERRNOS:
                self._ring_died(exc)
                raise
            # The kernel removed the device (backstore deleted, or the LUN disabled) before
            # its netlink REMOVE_DEVICE event was handled: nothing can be completed on this
            # ring any more; let the workers finish and leave.
            log.info("LUN %s: %s went away (%s); ring closed", self.name,
                     self.device.uio_name, os.strerror(exc.errno))
            self.gone = True
            self._pool.stop(wait=True)
        except BaseException as exc:
            self._ring_died(exc)
            raise

    def _ring_died(self, exc):
        """The ring thread is ending on an unexpected error: say so loudly; the LUN answers
        nothing from now on, and the status shows why."""
        self.error = f"ring thread stopped: {type(exc).__name__}: {exc}"
        log.critical("LUN %s: the ring thread stopped on an unexpected error; the LUN no longer "
                     "answers (restart lvmirrord)", self.name, exc_info=exc)

    def _release_held(self, wait=0.0):
        """Release the data-area views that a mirror leg left behind as slow still used when
        its command completed (``Command.release``); with ``wait`` (s), keep trying that long."""
        deadline = time.monotonic() + wait
        while True:
            self._held = [c for c in self._held if not c.release()]
            if not self._held or time.monotonic() >= deadline:
                return not self._held
            time.sleep(0.05)

    def _serve_ring(self, gen: int):
        """The ring thread of generation ``gen``: fetch, run or hand out, complete, notify.
        Returns when the LUN stops, or at once when the watchdog handed the ring to a newer
        thread while this one ran a command itself (``_hand_over``)."""
        uio_fd = self._handle.fd
        poller = select.poll()
        poller.register(uio_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        ring = self._ring
        # a thread taking over from a stuck one fetches and notifies at once: the stuck one may
        # have cleared the device's event and completed commands it never told the kernel of
        fresh = gen > 0
        while True:
            stopping = self._stop.is_set()
            for fd, _ in poller.poll(0 if fresh else 1000 if not stopping else 200):
                if fd == uio_fd:
                    self._handle.clear_event()
                else:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
            self._wake_pending = False
            completed = 0
            lease = self._lease
            if lease is not None and (stopping or lease.revoked) and lease.gen == gen:
                # (stopping: the workers' commands still running may want their locks)
                self._end_lease(gen)
            # the compiled path answered every command up to the ring's head: no Python fetch
            # (a command queued since then raised a new event, and the next poll sees it)
            emptied = False
            if (not stopping and (COMPILED_READS or COMPILED_WRITES) and self.inline_reads
                    and not self._aborted and not self._compiled_off):
                try:
                    done, emptied = self._compiled_reads(gen)
                except Exception:           # a bug: the Python path answers every command now
                    self._compiled_off = True
                    log.exception("LUN %s: the compiled READ/WRITE path failed; the Python path "
                                  "answers every command from now on", self.name)
                    if self._gen != gen:
                        return       # handed over meanwhile: never a second ring thread
                else:
                    if done is None:
                        return           # handed over: a newer ring thread serves now
                    completed += done
            if not stopping and not emptied:
                ended = self._lease
                if ended is not None:
                    self._end_lease(gen)   # the Python path locks for itself
                batch = ring.fetch()
                commands = batch.commands
                if (ended is not None and ended.gen == gen and ended.reads_only
                        and any(c.cdb[0] in _LEADING_WRITES for c in commands)):
                    # a WRITE the compiled path does not make (FUA, a larger one, WRITE SAME,
                    # UNMAP; any on a write-through LU) ended a lease for READs only
                    self._writes_lead()
                running = self._running
                # an abort counts only for a command still running here or queued before its
                # TMR entry: one the kernel names after it was answered (by the compiled path
                # just before this fetch, or completed and not yet told) would stay in _aborted,
                # or catch a command queued after the TMR, and the next command with its id -
                # the kernel hands out the lowest free one - would get TASK ABORTED
                for at, ids in zip(batch.abort_at, batch.aborts):
                    earlier = {c.cmd_id for c in commands[:at]}
                    self._aborted.update(i for i in ids if i in running or i in earlier)
                for command in commands:
                    running.add(command.cmd_id)
                self.commands += len(commands)
                if self._nowait_ok():
                    calm = self._inline_after <= time.monotonic() and not self._stuck
                    writes = calm and getattr(self.backend, "supports_nowait_write", False)
                    # queue depth 1: a larger WRITE too, and one that waits for a device
                    lone = calm and len(commands) == 1 and ring.outstanding == 1
                    idle = writes and lone
                    mine = self._inline_q
                    for command in commands:
                        if self._inline_candidate(command, writes, idle):
                            mine.append(command)
                        else:
                            self._pool.post(self._execute, command)
                    if mine:
                        done = self._run_inline(mine, gen, lone)
                        if done is None:
                            return           # handed over: a newer ring thread serves now
                        completed += done
                else:
                    for command in commands:
                        self._pool.post(self._execute, command)
            done_q = self._completions
            while done_q:
                command, response = done_q.popleft()     # only this thread takes from it
                self._finish(command, response)
                completed += 1
            if self._held:
                self._release_held()
            due = ring.pending_notify and ring.take_notify()   # entries the ring retired itself
            if due or completed or fresh:
                self._handle.notify()
            fresh = False
            if stopping and ring.outstanding == 0:
                self._end_lease(gen)
                # a stuck thread's last completions may have landed after the notify above
                if ring.pending_notify and ring.take_notify():
                    self._handle.notify()
                break
        self._pool.stop(wait=True)

    def _arm_compiled(self):
        """The arguments of the compiled path for the LU serving now (``_Armed``), or None when
        it cannot serve (no open volume, the volume offers no source: ``fast_read_source``).
        The conditions it reads at each call's start add the LUN's own: this LU still serving,
        no NOT READY reason, no unit attention pending, the LUN's size unchanged, completions
        not held (``hold``). WRITEs are armed when the volume offers ``fast_write_source`` (the
        images to write, every one in sync, no change to track) and the LU is write-back and not write-protected
        (a WRITE it makes has no FUA and no write-through: SBC-4 5.40, the Caching mode page's
        WCE); their conditions add those two, and their region locks are
        ``begin_fast_writes``'s own."""
        lu, target = self.lu, self.backend
        if lu is None or self.error is not None or target is None:
            return None
        # (None for an O_DIRECT volume: it does not support nowait reads)
        source = getattr(target, "fast_read_source", None)
        src = source() if source is not None else None
        if src is None:
            return None
        storage, _, checks, busy = src
        backend = lu.backend
        kinds = _CHECK_KINDS
        # (the write cache and write protection as they are now: a change arms WRITEs again,
        # on or off - MODE SELECT, the backstore's emulate_write_cache, ALUA)
        own = ((self, "lu", kinds["is"], lu), (self, "backend", kinds["is"], target),
               (self, "error", kinds["is"], None), (lu, "backend", kinds["is"], backend),
               (backend, "num_blocks", kinds["eq"], backend.num_blocks),
               (lu, "_unit_attentions", kinds["falsy"], None),
               (lu, "write_cache", kinds["is"], lu.write_cache),
               (lu, "read_only", kinds["is"], lu.read_only))
        hold = ((self, "_holding", kinds["is"], None),)
        checks = tuple((o, a, kinds[k], v) for o, a, k, v in checks) + own
        busy = tuple((o, a, kinds[k], v) for o, a, k, v in busy) + hold
        wstorage = wchecks = None
        if COMPILED_WRITES and lu.write_cache and not lu.read_only:
            wsource = getattr(target, "fast_write_source", None)
            wsrc = wsource() if wsource is not None else None
            if wsrc is not None:
                wstorage = wsrc[0]
                wchecks = tuple((o, a, kinds[k], v) for o, a, k, v in wsrc[1]) + own
        most = lu.max_accept_blocks * backend.block_size
        big = min(COMPILED_READ_MAX, most) if hasattr(target, "begin_fast_reads") else 0
        max_write = min(COMPILED_WRITE_MAX if wstorage is None or len(wstorage) == 1
                        else COMPILED_MIRROR_WRITE_MAX, most)
        # the calls of an unlocked batch (_unlocked_batch) with their arguments bound once here:
        # the lab's emulated CPU pays for every argument a batch passes again
        ring, nb, bs, mb = self._ring, backend.num_blocks, backend.block_size, lu.max_accept_blocks
        take = functools.partial(ring.take_fast, _fastread.take_batch, nb, bs)
        take_writes = functools.partial(take, max_write, mb, _fastread.MAX_WRITES, wchecks, hold,
                                        True, big)
        take_big_reads = functools.partial(take, big, mb, _fastread.MAX_WRITES, checks, hold,
                                           False, max_write)
        # a lease (``_begin_lease``) on a volume whose WRITEs the compiled path makes to one
        # image; else a lease for READs only (``leasable`` "reads"): on a mirror in sync, whose
        # WRITEs are made outside a lease, and on a volume whose WRITEs are not the compiled
        # path's now - a write-through LU (WCE 0, LIO's default for a user backstore), a
        # write-protected one, LVMIRROR_COMPILED_WRITES=0, "parallel" fan-out - the volume
        # granting it only while every image it writes is in sync and no change is tracked
        # (``MirrorVolume._leasable``). Under it a READ batch is busy only while a region
        # lock is awaited (the lease's own is the one held)
        leasable = None
        if RING_LEASE and hasattr(target, "begin_ring_lease"):
            if wstorage is not None and len(wstorage) == 1:
                leasable = "writes"
            elif MIRROR_LEASE and COMPILED_READS:
                leasable = "reads"
        lease_busy = (((target.locks, "_waiters", kinds["falsy"], None),) + hold
                      if leasable else None)
        # a batch under the lease in one call (``_leased_batch``): take, I/O, complete
        lease_run = ring.lease_runner(_fastread.lease_batch, nb, bs) if leasable else None
        lease_writes = (functools.partial(lease_run, max_write, mb, _fastread.MAX_WRITES,
                                          wchecks, hold, hold, True, big,
                                          tuple(st.fd for st in wstorage), self, self._role_mu, 0)
                        if leasable == "writes" else None)
        lease_big_reads = (functools.partial(lease_run, big, mb, _fastread.MAX_WRITES, checks,
                                             hold, hold, False, max_write, (storage.fd,), self,
                                             self._role_mu)
                           if leasable else None)
        # the ring thread's loop under the lease (``_lease_serve``): its batches as the two
        # above make them, READs the page cache holds as ``fast_reads`` answers them, the wait
        lease_serve = (functools.partial(
            ring.lease_runner(_fastread.lease_serve, nb, bs), self, self._role_mu,
            (min(INLINE_READ_MAX, most), big, mb, checks, lease_busy, storage.fd),
            (max_write, _fastread.MAX_WRITES, wchecks or (), hold,
             tuple(st.fd for st in wstorage) if leasable == "writes" else ()),
            (self._handle.fd, self._wake_r, LEASE_LOOP_ROUNDS, INLINE_SLOW, BUCKETS,
             self.latency.counts("read"), self.latency.counts("write")))
            if leasable and LEASE_LOOP and hasattr(_fastread, "lease_serve") else None)
        return _Armed(storage, target, nb, bs, min(INLINE_READ_MAX, most), max_write,
                      mb, checks, busy, wstorage, wchecks, hold, big,
                      (storage.fd,), tuple(st.fd for st in wstorage) if wstorage else None,
                      take_writes if wstorage else None, take_big_reads,
                      ring.run_taken, functools.partial(ring.complete_taken,
                                                        _fastread.complete_batch),
                      leasable, lease_busy, lease_writes, lease_big_reads, lease_serve)

    def _compiled_reads(self, gen: int) -> tuple[int | None, bool]:
        """Let the compiled path answer the commands at the head of the ring it may answer, as
        ``_run_inline`` would (``LogicalUnit.execute(nowait=True)``), without making them
        Command objects: READs the page cache holds (``tcmu._fastread.read_batch`` through
        ``CommandRing.fast_reads``, holding the GIL) and, when armed, a volume's
        WRITEs without FUA (``_compiled_writes``), in ring order, taking turns while each
        stops at the other's kind. On a volume writing one image it first takes the ring
        thread's lease (``_begin_lease``) if it has none, and makes its batches under it; on a
        mirror in sync, or a volume whose WRITEs are not armed (write-through, write-protected),
        it takes one for READs only unless WRITEs lead, and ends it at the first WRITE
        (``_writes_lead``, ``_end_lease``); a revoked lease is ended first.
        Counts them as the ring thread's own (``inline``, ``compiled``, ``compiled_writes``),
        in the latency histogram (each with its call's time shared out) and in the volume's
        and image's statistics. Returns how many it completed (the caller notifies the kernel)
        and whether it answered every command up to the ring's head (nothing left to fetch).

        Under the lease it first lets the compiled loop serve (``_lease_serve``), which tells
        the kernel of what it completed itself and waits for the kernel's next commands; the
        turns below go on from where it stopped. When it stopped because the compiled path was
        disarmed meanwhile, the Python path takes the commands at the ring's head."""
        fast = self._fast
        if fast is None:
            self._end_lease(gen)                   # (armed for another state)
            now = time.monotonic()
            if now < self._fast_retry:
                return 0, False
            fast = self._fast = self._arm_compiled()
            if fast is None:
                self._fast_retry = now + COMPILED_READS_RETRY
                return 0, False
        lease = self._lease
        if lease is not None:
            if lease.gen != gen:
                lease = None      # a stuck ring thread's: it ends it when its I/O returns
            elif lease.revoked or self._inline_after > lease.since:
                # (WRITEs to the pool for a while, set since it was taken: no lease meanwhile)
                self._end_lease(gen)
                lease = None
        elif (fast.leasable and not self._stuck
                and (fast.leasable == "writes" or self._lead != _STOP_WRITE)):
            # (a lease for READs only is not taken while WRITEs lead: it would end at once)
            lease = self._begin_lease(fast, gen)
        storage = fast.storage
        rwf = None             # the READs' preadv2 flags, asked for when a READ batch runs
        done = 0
        # begin with the kind the last batch made: a stream of WRITEs does not first ask the
        # READ path, which would stop at once at the WRITE at the ring's head
        why = self._lead if COMPILED_READS else _STOP_WRITE
        # (not while the Python loop has work the wake-up pipe announced and its poll drained:
        # a worker's completion, a stop, a notification due - the compiled loop would wait for
        # the next wake-up; any that comes after this test writes the pipe again, which ends it)
        if (lease is not None and fast.lease_serve is not None and not self._held
                and not self._completions and not self._stop.is_set()
                and not self._ring.pending_notify):
            rwf = storage.nowait_flags() if COMPILED_READS else -1
            if rwf is not None:
                done, why = self._lease_serve(fast, gen, lease, rwf, why)
                if done is None:
                    return None, False           # handed over: a newer ring thread serves
                if why == _STOP_HEAD:
                    return done, True
                if why == _STOP_STALE:
                    self._fast = None            # armed again next turn
                    self._end_lease(gen)
                    return done, False
                if self._fast is None:
                    # disarmed while it waited: the Python path takes the commands at the
                    # ring's head, and the next turn arms the compiled path again
                    return done, False
                if rwf < 0:
                    rwf = None
                lease = (self._lease if self._lease is not None and self._lease.gen == gen
                         else None)
        asked_reads = why != _STOP_WRITE
        rearmed = False
        for _ in range(COMPILED_TURNS):
            if lease is not None and (lease.revoked or self._inline_after > lease.since):
                self._end_lease(gen)
                lease = None
            elif why == _STOP_WRITE and lease is not None and lease.reads_only:
                # a mirror's WRITEs are made outside its lease (``mirror/ringlease.py``), as
                # are a write-through LU's (the Python path's)
                self._writes_lead()
                self._end_lease(gen)
                lease = None
            if why == _STOP_READ or why == _STOP_BIG_READ:
                if not COMPILED_READS:
                    break
                if rwf is None:
                    # (tmpfs: a plain read only while no swap is in use)
                    rwf = storage.nowait_flags()
                    if rwf is None:
                        self._fast = None
                        break
            if why == _STOP_READ:
                asked_reads = True
                t0 = time.monotonic()
                n, nbytes, why = self._ring.fast_reads(
                    _fastread.read_batch, storage.fd, rwf, fast.num_blocks, fast.block_size,
                    fast.max_read, fast.max_blocks, fast.checks,
                    fast.busy if lease is None else fast.lease_busy, fast.max_big_read,
                    fast.max_write)
                if why == _STOP_STALE:
                    self._fast = None               # armed again: now, once, or next turn
                    if lease is not None:
                        self._end_lease(gen)        # (taken for the state armed before)
                        lease = None
                    if not rearmed:
                        rearmed = True
                        fast = self._fast = self._arm_compiled()
                        if fast is not None:
                            storage = fast.storage
                            rwf = storage.nowait_flags()
                            if rwf is not None:
                                why = _STOP_READ
                                continue
                            self._fast = None
                        self._fast_retry = time.monotonic() + COMPILED_READS_RETRY
                    break
                if n:
                    done += n
                    self._lead = _STOP_READ
                    self._count_compiled_reads(n, t0)
                    if lease is None:
                        fast.target.count_fast_reads(storage, n, nbytes)
                    else:
                        lease.reads += n
                        lease.read_bytes += nbytes
            elif why == _STOP_BIG_READ:
                n, why = self._compiled_big_reads(fast, rwf, gen, lease)
                if n is None:
                    return None, False           # handed over: a newer ring thread serves
                if not n:
                    break
                done += n
                self._lead = _STOP_READ
            elif (why == _STOP_WRITE and fast.wstorage is not None
                    and self._fast is not None
                    and (lease is not None
                         or (not self._stuck and self._inline_after <= time.monotonic()))):
                w, why = (self._compiled_writes(fast, gen) if lease is None else
                          self._leased_batch(fast, gen, True, 0, lease))
                if w is None:
                    return None, False           # handed over: a newer ring thread serves
                if not w:
                    if why == _STOP_READ:
                        continue         # a READ at the head after all: the READ path's turn
                    break
                done += w
                self._lead = _STOP_WRITE
            elif why == _STOP_WRITE and not asked_reads and COMPILED_READS:
                why = _STOP_READ    # WRITEs cannot be made now: the READs may
                asked_reads = True
            else:
                break
            lease = self._lease if self._lease is not None and self._lease.gen == gen else None
        return done, why == _STOP_HEAD

    def _begin_lease(self, fast, gen: int):
        """Take the ring thread's lease (``MirrorVolume.begin_ring_lease``,
        ``mirror/ringlease.py``) on the armed volume (``fast``: its WRITEs armed to one image;
        or ``fast.leasable`` "reads" - a mirror in sync, or WRITEs not armed: a lease for READs
        only) for this ring
        thread (generation ``gen``), unless WRITEs go to the pool now (``_inline_after``) or a
        lease was revoked (a mirror's ended at a WRITE) less than ``ringlease.BACKOFF``
        seconds ago. Returns it, or None."""
        now = time.monotonic()
        if now < self._lease_after or now < self._inline_after:
            return None
        lease = fast.target.begin_ring_lease(
            self._wake, gen, now, fast.storage,
            fast.wstorage if fast.leasable == "writes" else None)
        if lease is not None:
            self._lease = lease
            self.leases += 1
        else:           # (a lock held for long, say a client's: not asked again each batch)
            self._lease_after = now + ringlease.BACKOFF
        return lease

    def _writes_lead(self) -> None:
        """A WRITE met a lease for READs only (which makes none: a mirror's, a write-through
        LU's): WRITEs lead (``_lead``), so no lease for READs only is taken again until READs
        do, nor for ``ringlease.BACKOFF`` seconds. Called before the lease is ended
        (``_end_lease``) or right after, before the next turn could take one."""
        self._lead = _STOP_WRITE
        self._lease_after = max(self._lease_after, time.monotonic() + ringlease.BACKOFF)

    def _end_lease(self, gen: int) -> None:
        """End the lease ring thread ``gen`` holds, if any (``MirrorVolume.end_ring_lease``:
        the I/O made under it counted, the epoch left, the region lock released), before this
        thread's next command takes the Python path, or when it was revoked: then none is
        taken for ``ringlease.BACKOFF`` seconds (after a WRITE, ``_writes_lead``)."""
        lease = self._lease
        if lease is None or lease.gen != gen:
            return
        if lease.revoked:
            self.leases_revoked += 1
            self._lease_after = time.monotonic() + ringlease.BACKOFF
        try:
            lease.volume.end_ring_lease(lease)
        finally:
            # (after its lock is released: a newer ring thread takes none while it is set,
            # and one it tried in between would have been refused and backed off)
            self._lease = None

    def _compiled_big_reads(self, fast, rwf: int, gen: int,
                            lease=None) -> tuple[int | None, int]:
        """The READs at the ring's head over ``fast.max_read`` bytes (and up to
        ``fast.max_big_read``; smaller ones after them too), read from the page cache with
        preadv2 flags ``rwf`` (RWF_NOWAIT) by ``_unlocked_batch``, inside the volume's
        ``begin_fast_reads`` (the epoch entered: no split or image failure meanwhile) with the
        blocks they cover locked shared (``lock_fast``: no write to them meanwhile) and
        ``end_fast_reads``. A READ not read whole (not all in memory) is the Python path's.
        Under the ring thread's ``lease`` (``_leased_batch``) the lease stands for the epoch
        and the locks. Returns what ``_unlocked_batch`` returns."""
        if lease is not None:
            return self._leased_batch(fast, gen, False, rwf, lease)
        return self._unlocked_batch(fast, gen, False, fast.rfds, rwf, fast.take_big_reads,
                                    fast.target.begin_fast_reads())

    def _count_compiled_reads(self, n: int, t0: float) -> None:
        """Count ``n`` READs the compiled path answered in one call begun at ``t0``
        (``time.monotonic``): as the ring thread's own and compiled, and in the latency
        histogram with the call's time shared out."""
        self.commands += n
        self.inline += n
        self.compiled += n
        self.latency.observe_many("read", (time.monotonic() - t0) / n, n)

    def _compiled_writes(self, fast, gen: int) -> tuple[int | None, int]:
        """The WRITEs without FUA at the ring's head, made by ``_unlocked_batch`` inside the
        volume's ``begin_fast_writes`` (the epoch entered: a split or image failure waits for
        them as for any write in flight) with the blocks they cover locked (``lock_fast``) and
        ``end_fast_writes``. A WRITE not written whole (an error, a full file system, a short
        write) is the Python path's, which writes it again and reports it; a batch that took
        longer than INLINE_SLOW sends every WRITE to the pool for INLINE_BACKOFF seconds, as
        ``_run_inline`` does; under the ring thread's lease ``_compiled_reads`` calls
        ``_leased_batch`` instead. Returns what ``_unlocked_batch`` returns."""
        return self._unlocked_batch(fast, gen, True, fast.wfds, 0, fast.take_writes,
                                    fast.target.begin_fast_writes())

    def _leased_batch(self, fast, gen: int, writes: bool, rwf: int,
                      lease) -> tuple[int | None, int]:
        """``_unlocked_batch`` under the ring thread's ``lease`` (``mirror/ringlease.py``): the
        whole volume is locked for this thread and the split epoch entered, so the batch takes
        no lock and enters no epoch of its own, and one compiled call takes it, makes its I/O
        without the GIL and completes it (``_fastread.lease_batch`` through ``fast.lease_writes``
        or ``fast.lease_big_reads``; ``rwf``: the READs' preadv2 flags); the commands it
        completes are counted in the lease (``MirrorVolume.end_ring_lease`` counts them in the
        statistics). The lease is ended before any of its commands goes to the worker pool
        (which locks for itself), before a failed WRITE is reported (which may fail the image
        and switch the epoch), when a batch took longer than INLINE_SLOW, and when this thread
        lost the ring to a newer one meanwhile (``_hand_over``: it completes its batch as a
        worker would). Returns what ``_unlocked_batch`` returns."""
        if writes:
            r = fast.lease_writes(gen, lease)
        else:
            r = fast.lease_big_reads(rwf, gen, lease)
        return self._leased_done(fast, gen, writes, lease, r)

    def _lease_serve(self, fast, gen: int, lease, rwf: int,
                     lead: int) -> tuple[int | None, int]:
        """The ring thread's loop under its ``lease``, compiled (``_fastread.lease_serve``
        through ``fast.lease_serve``): batch after batch up to the kernel's cmd_head - READs
        the page cache holds as ``fast_reads`` answers them (preadv2 flags ``rwf``; -1: none),
        WRITEs and large READs as ``_leased_batch`` makes them, beginning with the kind
        ``lead`` (_STOP_READ or _STOP_WRITE) - then the kernel told and its
        next event awaited, without returning here, until the take stops at what the Python
        path answers, a batch needs this thread (not completed whole, failed, slow, or the
        ring handed over: ``_leased_done``), the wake-up pipe is written (a revocation, a stop,
        a worker's completion), or LEASE_LOOP_ROUNDS waits or LEASE_LOOP_WAIT seconds passed.
        It counts each batch (the LUN's counters, the latency histogram, the lease's I/O)
        before it tells the kernel, as ``_count_batch`` does. Returns ``(completed and not yet told to the kernel, or None when
        the ring was handed over; why it stopped: _fastread's STOP_*)``."""
        why, lead, last = fast.lease_serve(rwf, gen, lease, lead, LEASE_LOOP_WAIT)
        self._lead = lead
        if last is None:
            return 0, why
        return self._leased_done(fast, gen, lead == _STOP_WRITE, lease, last)

    def _leased_done(self, fast, gen: int, writes: bool, lease, r) -> tuple[int | None, int]:
        """What ``_leased_batch`` does after the compiled call, for its result ``r``
        (``_fastread.lease_batch``'s tuple): count the batch, send what was not completed to
        the worker pool, report a failed WRITE, end the lease when the batch needs it.
        Returns what ``_leased_batch`` returns."""
        taken, why, done, completed, nbytes, err, leg, packed, t0, lost = r
        if not taken:
            if why == _STOP_STALE:
                self._fast = None
                self._end_lease(gen)
            return 0, why
        try:
            try:
                try:
                    if lost:              # WRITEs inline again INLINE_BACKOFF s from now
                        with self._role_mu:
                            self._stuck -= 1
                            self._inline_after = max(self._inline_after,
                                                     time.monotonic() + INLINE_BACKOFF)
                        completed, nbytes = fast.complete(packed, done, fast.wbusy, True)
                    if writes:
                        lease.writes += completed
                        lease.write_bytes += nbytes if completed else 0
                    else:
                        lease.reads += completed
                        lease.read_bytes += nbytes if completed else 0
                finally:
                    if completed < taken or lost:
                        self._end_lease(gen)
                if err and writes:
                    self._compiled_write_refused(fast, packed, done, err, leg)
            finally:      # (on an error too: never a taken command left unanswered)
                if completed < taken:
                    self._end_lease(gen)
                    rest = self._ring.taken_commands(packed, completed, t0)
                    self.commands += len(rest)
                    running = self._running
                    for command in rest:
                        running.add(command.cmd_id)
                        self._pool.post(self._execute, command)
        finally:
            if lease.batch is not None:         # (lease_batch clears it; an error did not)
                lease.batch = None
        if done < taken:
            why = _STOP_MISS_WRITE if writes else _STOP_MISS
        if completed < done:
            why = _STOP_BUSY
        if self._count_batch(writes, completed, t0):
            self._end_lease(gen)               # (WRITEs to the pool for a while)
        if lost:
            if completed:
                self._wake()             # the ring thread now serving tells the kernel
            return None, why
        return completed, why

    def _unlocked_batch(self, fast, gen: int, writes: bool, fds: tuple, rwf: int, take,
                        token) -> tuple[int | None, int]:
        """One batch of the WRITEs (``writes``) or large READs at the ring's head, with their
        I/O made WITHOUT the GIL and WITHOUT the ring's lock, as a command the ring thread
        (generation ``gen``) runs itself. ``token``: the volume's epoch entered for it
        (``begin_fast_writes``/``begin_fast_reads``), before its conditions are read.
        ``take`` (``fast.take_writes``/``take_big_reads``: ``_fastread.take_batch`` through
        ``CommandRing.take_fast``, its arguments bound) takes the commands under the ring's lock
        (fetched, outstanding); the volume locks them (``lock_fast``,
        never waiting); ``run_batch`` makes the I/O of those locked on the descriptors ``fds``
        (preadv2 flags ``rwf`` for READs) while the watchdog watches (``_inline_t0``);
        ``complete_batch`` answers GOOD those done whole (none when a ``fast.wbusy`` condition -
        a group split's hold - began meanwhile); ``end_fast_writes``/``end_fast_reads`` count
        them, leave the epoch and release the locks. The others become Commands for the worker
        pool, which makes their I/O again and reports what fails.

        When the I/O stalls past INLINE_STALL the watchdog hands the ring to a new ring thread
        (``_hand_over``), which fetches and answers the LUN's other commands meanwhile (I/O to
        the stalled commands' ranges waits for their locks, as for any write in flight): this
        thread then completes what it did when the I/O returns, as a worker would, wakes the
        new ring thread to tell the kernel, and returns None for its count. Returns (commands
        completed here, or None when the ring was handed over; why the batch stopped:
        ``_fastread``'s STOP_*)."""
        ring = self._ring
        taken = done = nbytes = completed = 0
        t0 = 0.0
        lost = False
        keep = None
        try:
            taken, why, packed, first, blocks = take()
            if taken:
                locked = fast.target.lock_fast(
                    token, taken, first, blocks,
                    lambda: ring.taken_ranges(packed, fast.block_size))
                t0 = self._inline_t0 = time.monotonic()
                if self._watch_idle:         # (read after _inline_t0 is set: see _watch)
                    self._watch_idle = False
                    self._watch_wake.set()
                if locked:
                    done, nbytes, err, leg = fast.run(_fastread.run_batch, packed, locked, fds,
                                                      rwf, writes)
                    if err and writes:
                        self._compiled_write_refused(fast, packed, done, err, leg)
        finally:
            try:
                try:
                    if taken:
                        with self._role_mu:
                            lost = self._gen != gen
                            if not lost:
                                self._inline_t0 = 0.0
                            else:        # WRITEs inline again INLINE_BACKOFF s from now
                                self._stuck -= 1
                                self._inline_after = max(self._inline_after,
                                                         time.monotonic() + INLINE_BACKOFF)
                        completed, nbytes = fast.complete(packed, done, fast.wbusy, lost)
                finally:                                # the locks, the epoch
                    if writes:
                        # a command written to some legs and not others leaves them different:
                        # its write-intent log marks stay in flight (no checkpoint clears them)
                        # until the pool has written the commands again (_execute_then)
                        if token.begun and done < taken:
                            keep, token.begun = token.begun, []
                        fast.target.end_fast_writes(token, fast.wstorage, completed,
                                                    nbytes if completed else 0)
                    else:
                        fast.target.end_fast_reads(token, fast.storage, completed,
                                                   nbytes if completed else 0)
            finally:      # (on an error too: never a taken command left unanswered)
                if taken and completed < taken:
                    rest = ring.taken_commands(packed, completed, t0)
                    self.commands += len(rest)
                    running = self._running
                    after = None
                    if keep:
                        after = _Countdown(len(rest), fast.target.end_fast_intents, keep)
                    for command in rest:
                        running.add(command.cmd_id)
                        if after is None:
                            self._pool.post(self._execute, command)
                        else:
                            self._pool.post(self._execute_then, (command, after))
        if why == _STOP_STALE:
            self._fast = None
        if not taken:
            return 0, why
        if done < taken:
            why = (_STOP_BUSY if done == locked and locked < taken
                   else _STOP_MISS_WRITE if writes else _STOP_MISS)
        if completed < done:
            why = _STOP_BUSY
        self._count_batch(writes, completed, t0)
        if lost:
            if completed:
                self._wake()             # the ring thread now serving tells the kernel
                # (complete_taken left it pending_notify)
            return None, why
        return completed, why

    def _count_batch(self, writes: bool, completed: int, t0: float) -> bool:
        """Count the ``completed`` commands of a compiled batch (``writes``: WRITEs, else READs)
        whose I/O began at ``t0`` (``time.monotonic``) as the ring thread's own and in the
        latency histogram, the batch's time shared out. A WRITE batch that took longer than
        INLINE_SLOW sends every WRITE to the pool for INLINE_BACKOFF seconds, as
        ``_run_inline`` does: then True."""
        took = time.monotonic() - t0
        if completed and not writes:
            self._count_compiled_reads(completed, t0)
        elif completed:
            self.commands += completed
            self.inline += completed
            self.compiled_writes += completed
            self.latency.observe_many("write", took / completed, completed)
        if writes and took > INLINE_SLOW:
            self.inline_slow += 1
            self._inline_after = max(self._inline_after, t0 + took + INLINE_BACKOFF)
            log.debug("LUN %s: compiled WRITEs on the ring thread took %.3f s; WRITEs go to the "
                      "pool for %g s", self.name, took, INLINE_BACKOFF)
            return True
        return False

    def _compiled_write_refused(self, fast, packed: bytes, k: int, err: int, leg: int) -> None:
        """The ``k``-th command of a compiled WRITE batch (``packed``) failed with errno ``err``
        on leg ``leg`` of ``fast.wstorage``; the worker pool writes it again. A mirror's leg is
        failed first, as the Python path fails an image whose write errs
        (``fast_write_failed``: logged, its range and unflushed regions marked); otherwise
        (one image, a full file system) the error is logged here, so that an error the write
        again does not meet still leaves a line in the journal."""
        bs = fast.block_size
        start, count = self._ring.taken_ranges(packed, bs)[k]
        storage = fast.wstorage[leg]
        if len(fast.wstorage) > 1 and fast.target.fast_write_failed(storage, err, start * bs,
                                                                     count * bs):
            return
        log.warning("LUN %s: a compiled WRITE of %d blocks at LBA %d failed on image %s (%s); "
                    "the worker pool writes it again", self.name, count, start, storage.path,
                    os.strerror(err))

    def _inline_candidate(self, command, writes: bool, idle: bool) -> bool:
        """Whether the ring thread tries ``command`` itself: a READ of at most INLINE_READ_MAX
        bytes; with ``writes`` a WRITE of at most INLINE_WRITE_MAX bytes (INLINE_IDLE_MAX when
        ``idle``: it is the only command outstanding)."""
        cdb = command.cdb
        if not cdb:
            return False
        op = cdb[0]
        if op in READ_OPCODES:
            return command.data_len <= INLINE_READ_MAX
        return writes and op in WRITE_OPCODES and command.data_len <= (
            INLINE_IDLE_MAX if idle else INLINE_WRITE_MAX)

    def _run_inline(self, mine: collections.deque, gen: int, lone: bool = False) -> int | None:
        """Run the commands of ``mine`` on the ring thread (generation ``gen``), each only if it
        cannot wait for anything but the images' page cache (``LogicalUnit.execute(nowait=
        True)``); one that would (WouldBlock: nothing was done) goes to the pool. With ``lone``
        (it is the only command outstanding) a command may wait for the devices, never for
        other I/O (``execute(nowait=True, device_ok=True)``): the ring thread runs it under the
        watchdog, saving the hand-off to a worker and back that nothing else would use (in the
        kernel lab, 2026-12-02, 4 KiB random reads at queue depth 1 missed the page cache and
        made that round trip every time). Returns how
        many were completed here, or None when the watchdog handed the ring to a newer thread
        while one ran: its response then goes through the completion queue, as a worker's does,
        and this thread is a ring thread no more. A command that took longer than INLINE_SLOW
        seconds sends every WRITE to the pool for INLINE_BACKOFF seconds."""
        done = 0
        lu = self.lu
        while True:
            try:
                command = mine.popleft()        # atomic: the watchdog may take the rest
            except IndexError:
                return done
            t0 = self._inline_t0 = time.monotonic()
            if self._watch_idle:             # (read after _inline_t0 is set: see _watch)
                self._watch_idle = False
                self._watch_wake.set()
            try:
                response = lu.execute(command.cdb, command.iov_views, command.iov_views,
                                      nowait=True, device_ok=lone)
            except WouldBlock:
                response = None
            with self._role_mu:
                lost = self._gen != gen
                if not lost:
                    self._inline_t0 = 0.0
                else:                # the newer thread's own command is its to clear; WRITEs
                    # inline again INLINE_BACKOFF s from now
                    self._stuck -= 1
                    self._inline_after = max(self._inline_after,
                                             time.monotonic() + INLINE_BACKOFF)
            if lost:
                if response is None:
                    self._pool.post(self._execute, command)
                else:
                    self._completions.append((command, response))
                    self._wake()
                return None
            if response is None:
                self._pool.post(self._execute, command)
                continue
            took = time.monotonic() - t0
            if took > INLINE_SLOW:
                self.inline_slow += 1
                self._inline_after = t0 + took + INLINE_BACKOFF
                log.debug("LUN %s: a command on the ring thread took %.3f s; WRITEs go to the "
                          "pool for %g s", self.name, took, INLINE_BACKOFF)
            self.inline += 1
            self._finish(command, response)
            done += 1

    # -- the watchdog ----------------------------------------------------------------------------
    def _watch(self):
        """The LUN's watchdog thread, until the LUN stops: a command the ring thread has been
        running itself for longer than INLINE_STALL seconds hands the ring over
        (``_hand_over``); every ALUA_FOLLOW_INTERVAL seconds (at once when ``_alua_next`` is
        reset and the event set), ``_follow_alua``. Following runs here, not on the ring thread:
        reading the port groups from configfs took the ring thread about 5 % of its time under
        the lab's emulation (py-spy, 2026-12-02), time in which it answered no command.

        While the LUN is busy it looks when the command it saw running (``_inline_t0``) would
        be INLINE_STALL old, and INLINE_STALL after a look that saw none: a command that began
        after a look is seen at the next one, and handed over as it turns INLINE_STALL old. It
        looked every 50 ms before; each look takes the GIL, and the ring thread woken by the
        kernel waited for it (in the lab the ring thread waited over 0.1 ms for the GIL in
        0.8 % of the 4 KiB writes at queue depth 1, 2026-12-05: ``_fastread.gil_waits``).

        Idle, it sleeps until the next follow: after a look in which no command was fetched
        since the one before and none runs on the ring thread, it says so (``_watch_idle``) and
        the ring thread sets ``_watch_wake`` when it begins one of its own - a command's first
        INLINE_STALL is watched as before, and a busy LUN pays nothing more than a flag read a
        command. (The watchdog sets the flag, then reads ``_inline_t0``; the ring thread sets
        ``_inline_t0``, then reads the flag: under the GIL one of them sees the other's write,
        so a command is never left unwatched.) Waking 20 times a second per idle LUN was about
        a quarter of an idle handler's py-spy samples in the lab (2026-12-03)."""
        wake = self._watch_wake
        seen = -1
        while True:
            if time.monotonic() >= self._alua_next:
                self._alua_next = time.monotonic() + ALUA_FOLLOW_INTERVAL
                try:
                    self._follow_alua()
                except Exception as exc:   # keep watching; the next follow tries again
                    self._follow_failed(exc)
                else:
                    if self._follow_error is not None:
                        log.info("LUN %s: following the ALUA state works again", self.name)
                        self._follow_error = None
            now = time.monotonic()
            running = self._inline_t0
            if self.commands == seen and not running:
                self._watch_idle = True
                running = self._inline_t0        # re-read after the flag: see above
                timeout = max(self._alua_next - now, 0.0)
                if running:
                    timeout = min(running + INLINE_STALL - now, timeout)
            else:
                # (the command seen running turns INLINE_STALL old, or one begun after now is
                # seen at the next look; the follow is not put off)
                timeout = min(running + INLINE_STALL - now if running else INLINE_STALL,
                              max(self._alua_next - now, 0.0))
            seen = self.commands
            wake.wait(max(timeout, 0.001))
            wake.clear()
            self._watch_idle = False
            if self._stop.is_set():
                return
            t0 = self._inline_t0
            if t0 and time.monotonic() - t0 > INLINE_STALL:
                self._hand_over(t0)

    def _follow_failed(self, exc: Exception) -> None:
        """A follow of the ALUA state raised ``exc``: logged with its traceback when it is new
        (another type or message than the last failure), at debug level while the same failure
        repeats every ALUA_FOLLOW_INTERVAL s - one line a second with a traceback buried the
        log of a gateway whose configfs stayed unreadable."""
        key = f"{type(exc).__name__}: {exc}"
        if key == self._follow_error:
            log.debug("LUN %s: following the ALUA state still fails: %s", self.name, key)
            return
        self._follow_error = key
        log.error("LUN %s: following the ALUA state failed (tried again every %g s; said again "
                  "only when the error changes)", self.name, ALUA_FOLLOW_INTERVAL, exc_info=exc)

    def _hand_over(self, t0: float):
        """The ring thread is stuck in a command it runs itself (since ``t0``, monotonic): a new
        ring thread (the next generation) serves the ring from now on, the commands of the
        stuck thread's batch it has not begun go to the pool, every WRITE goes to the pool until
        INLINE_BACKOFF seconds after the stuck command returned. Nothing if that command
        returned meanwhile or the LUN stops."""
        with self._role_mu:
            if self._inline_t0 != t0 or self._stop.is_set():
                return
            self._inline_t0 = 0.0
            lease = self._lease
            if lease is not None and lease.gen == self._gen:
                # the stuck thread's lease: the new one serves the LUN beside its batch
                try:
                    lease.volume.narrow_ring_lease(lease)
                except Exception:     # (a bug: the new thread waits for the lease, as I/O
                    log.exception("LUN %s: narrowing the ring thread's lease failed", self.name)
            self._gen += 1
            self.handovers += 1
            self._stuck += 1
            self._inline_after = time.monotonic() + INLINE_BACKOFF
            rest, self._inline_q = self._inline_q, collections.deque()
            thread = self._thread = threading.Thread(
                target=self._serve, args=(self._gen,), name=f"ring-{self.name}-{self._gen}",
                daemon=True)
        left = []
        while True:
            try:
                left.append(rest.popleft())
            except IndexError:
                break
        for command in left:
            self._pool.post(self._execute, command)
        log.warning("LUN %s: a command the ring thread ran itself has not returned after %.2f s "
                    "(the images are slow); a new ring thread serves the LUN, WRITEs go to the "
                    "worker pool for %g s", self.name, time.monotonic() - t0, INLINE_BACKOFF)
        try:
            thread.start()
        except RuntimeError as exc:          # no thread to be had: the LUN answers no more
            self._ring_died(exc)

    def _finish(self, command, response):
        """Complete ``command`` on the ring with ``response`` (ring thread only; the caller
        notifies the kernel), or keep it while completions are held (``hold``)."""
        read_len = response.read_len if 0 < response.read_len < command.data_len else None
        self._running.discard(command.cmd_id)
        self.latency.observe(command.cdb, time.monotonic() - command.fetched)
        if not command.release():
            # a leg failed as slow still writes from these views: the command completes (the
            # leg is failed, its range marked for resync) and the views are let go once the
            # leg returns
            self._held.append(command)
        if self._holding is not None:
            with self._hold_mu:
                if self._holding is not None:       # told to the kernel by release()
                    self._holding.append((command.cmd_id, response.status, response.sense,
                                          read_len))
                    self._aborted.discard(command.cmd_id)
                    return
        self._ring.complete(command.cmd_id, response.status, response.sense, read_len)
        if self._aborted:
            self._aborted.discard(command.cmd_id)

    # -- holding completions (the instant of a group split) -------------------------------------
    def hold(self, max_seconds: float = 10.0, held_for: str | None = None) -> None:
        """From now on keep every completed command's status instead of putting it on the ring:
        the command is done, the initiator is not told yet. New commands are still fetched and
        run. A consistency group's split holds the completions of every LUN of its volumes
        while it switches their epochs one after the other (``daemon.splitgroup``), so that no
        write can be acknowledged on one volume after its split and be followed, before a later
        volume's split, by a write that depends on it. ``release`` ends it; so does a timer
        after ``max_seconds`` (logged as an error: the kernel times commands out after 30 s).
        ``held_for``: the volume name the hold is for (``held_for`` property), kept for the
        release when an ALUA switch closes the volume meanwhile. StateError when completions
        are already held."""
        with self._hold_mu:
            if self._holding is not None:
                raise StateError(f"LUN {self.name}: completions are already held")
            self._holding = []
            self._held_for = held_for
            self._hold_since = time.monotonic()
            timer = self._hold_timer = threading.Timer(max_seconds, self._hold_expired)
        timer.daemon = True
        timer.start()

    @property
    def held_for(self) -> str | None:
        """The volume name completions are held for now (``hold``), else None."""
        return self._held_for if self._holding is not None else None

    def _hold_expired(self):
        n, held = self.release()
        if held is not None:
            log.error("LUN %s: completions held for a consistency group's split or restore were "
                      "released after %.1f s by the safety timer (%d commands); the group's "
                      "step did not end in time",
                      self.name, held, n)

    def release(self) -> tuple[int, float | None]:
        """End ``hold``: put the held completions on the ring and tell the kernel. Returns how
        many commands were held and for how long (seconds; None when nothing was held)."""
        with self._hold_mu:
            held, self._holding = self._holding, None
            timer, self._hold_timer = self._hold_timer, None
            seconds = time.monotonic() - self._hold_since if held is not None else None
        if timer is not None:
            timer.cancel()
        if held:
            try:
                for cmd_id, status, sense, read_len in held:
                    self._ring.complete(cmd_id, status, sense, read_len)
                self._handle.notify()
            except OSError as exc:
                log.debug("LUN %s: releasing held completions: %s", self.name, exc)
            if self._stop.is_set():
                self._wake()
        return (len(held) if held is not None else 0), seconds

    def _nowait_ok(self) -> bool:
        """The ring thread may try READs (and a lone WRITE) itself: enabled, the volume open
        and answering, its backend buffered, and no abort pending (the pool answers those)."""
        return (self.inline_reads and self.error is None and self.lu is not None
                and not self._aborted and getattr(self.backend, "supports_nowait", False))

    def _execute_then(self, job) -> None:
        """``_execute`` of the command of ``job`` (command, ``_Countdown``), then count the
        countdown down."""
        command, after = job
        try:
            self._execute(command)
        finally:
            after.done()

    def _execute(self, command):
        """A worker's job: answer ``command`` where it may block - TASK ABORTED when the kernel
        aborted it, NOT READY while the volume is not open, else the SCSI core's answer; a bug
        becomes HARDWARE ERROR / INTERNAL TARGET FAILURE (logged), never a lost command - and
        hand the response to the ring thread (the completion queue and a wake-up)."""
        try:
            if command.cmd_id in self._aborted:
                response = Response(scsi.TASK_ABORTED, b"", 0)
            elif (self.error and command.cdb[:1]
                  and (asc := self._unopened_sense(command.cdb[0])) is not None):
                response = Response(scsi.CHECK_CONDITION, build_sense(scsi.NOT_READY, *asc), 0)
            else:
                response = self.lu.execute(command.cdb, command.iov_views, command.iov_views)
        except Exception:  # never lose a command: a bug here must still complete it
            log.exception("LUN %s: command %s failed", self.name, command.cdb[:1].hex())
            response = Response(scsi.CHECK_CONDITION, build_sense(
                scsi.HARDWARE_ERROR, *scsi.ASC_INTERNAL_TARGET_FAILURE), 0)
        self._completions.append((command, response))
        self._wake()
