"""lvmirrord: the LIO TCMU user-space handler for the ``lvmirror`` subtype.

One process serves every ``user:lvmirror`` backstore on the host:

* a netlink thread listens to the kernel's TCM-USER ``config`` multicast group and adds, removes and
  reconfigures LUNs (answering with the ``*_DONE`` replies, harmless when the kernel is not waiting);
* at start-up it picks up the devices that already exist, so a restart under a live LUN loses nothing;
* each LUN has a ring thread that fetches every available command from the TCMU ring, hands it to the
  LUN's own worker pool (a slow image or a long resync never stalls another LUN), collects completions
  and tells the kernel once per batch;
* the D-Bus service (targetcli compatibility, lvmirror's own API) runs in its own thread; the data path
  never waits on it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import queue
import select
import signal
import sys
import threading
import time

from lvmirror import __version__, cfgstring, sdnotify
from lvmirror.errors import ConfigError, LvmirrorError, StateError, WouldBlock
from lvmirror.mirror.legs import Worker
from lvmirror.mirror.metadata import VolumeMetadata
from lvmirror.mirror.resync import job_progress
from lvmirror.mirror.volume import MirrorVolume
from lvmirror.scsi import LogicalUnit, Response
from lvmirror.scsi.lu import READ_OPCODES
from lvmirror.scsi import constants as scsi
from lvmirror.scsi.sense import build_sense
from lvmirror.tcmu import netlink, uio
from lvmirror.tcmu.ring import CommandRing, RingError

log = logging.getLogger("lvmirrord")

SUBTYPE = "lvmirror"
DEFAULT_STATE_DIR = "/var/lib/lvmirror"
# what uio read/write/poll give once the kernel has unregistered the device under an open fd
DEVICE_GONE_ERRNOS = (errno.EIO, errno.ENODEV, errno.ENXIO)


class VolumeRegistry:
    """The volumes this daemon has open, by name, shared by the LUNs that serve them.

    A volume is served by at most one LUN; each of its split images may be exported by one more
    LUN (cfgstring ``NAME;image=N``). The volume stays open while any of them uses it.
    """

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self._lock = threading.Lock()
        self._volumes: dict[str, MirrorVolume] = {}
        self._refs: dict[str, int] = {}
        self._users: dict[str, str] = {}      # "vol" or "vol;image=N" -> LUN name

    def acquire(self, spec: cfgstring.VolumeSpec, *, lun: str, size: int):
        """Open (or create) what ``spec`` names for LUN ``lun``; returns (volume, backend).

        ``size``: the LUN size in bytes (the size of a volume created here). ``backend`` is the
        MirrorVolume itself, or a split image's view for ``NAME;image=N``. For an existing
        volume, ``spec.images`` only has to pass ``VolumeMetadata.check_named_images`` (every
        path is, or was, an image of the volume: a LUN's cfgstring cannot follow attach/detach),
        checked before the volume is opened and on every further acquire. Raises ConfigError
        (already served, foreign images= list, missing volume...) or StateError."""
        key = spec.name if spec.image is None else f"{spec.name};image={spec.image}"
        with self._lock:
            if key in self._users:
                raise ConfigError(f"{key!r} is already served by LUN {self._users[key]!r}")
            volume = self._volumes.get(spec.name)
            opened = volume is None
            if opened:
                volume = self._open_or_create(spec, size, lun)
            try:
                if spec.images is not None and not opened:
                    self._check_images(spec, lun, volume)
                if spec.image is None:
                    backend = volume
                else:
                    backend = volume.split_image(spec.image)
            except BaseException:
                if opened:
                    volume.close()
                raise
            self._volumes[spec.name] = volume
            self._refs[spec.name] = self._refs.get(spec.name, 0) + 1
            self._users[key] = lun
            return volume, backend

    def _check_images(self, spec, lun, volume=None):
        """Refuse (ConfigError) a cfgstring ``images=`` list naming a path that never was an
        image of the existing volume ``spec.name``; log at info level when it is accepted but
        out of date. The rule is VolumeMetadata.check_named_images; the metadata is read from
        volume.json, which create, attach and detach save before they return."""
        md = VolumeMetadata.load(self.state_dir, spec.name)
        if not md.check_named_images(spec.images):
            current = [info.path for info in volume.images] if volume is not None else \
                [im.path for im in md.images]
            log.info("LUN %s: volume %s: its images changed (attach/detach) since the cfgstring "
                     "was written: the cfgstring names %s, the volume has %s and that is what "
                     "the LUN serves", lun, spec.name, "+".join(spec.images), "+".join(current))

    def _open_or_create(self, spec, size, lun):
        if MirrorVolume.exists(spec.name, meta_dir=self.state_dir):
            if spec.images is not None:
                self._check_images(spec, lun)     # before opening: a foreign LUN touches nothing
            return MirrorVolume.open(spec.name, meta_dir=self.state_dir, direct=spec.direct,
                                     **_tuning(spec))
        if spec.images is None:
            raise ConfigError(
                f"volume {spec.name!r} does not exist under {self.state_dir}; name its images to "
                f"create it (cfgstring '{spec.name};images=/path/a+/path/b')")
        return MirrorVolume.create(spec.name, list(spec.images), meta_dir=self.state_dir,
                                   block_size=spec.block_size, region_size=spec.region_size,
                                   size=size, direct=spec.direct, force=spec.force,
                                   **_tuning(spec))

    def get(self, name):
        """The open MirrorVolume called ``name``, or None."""
        with self._lock:
            return self._volumes.get(name)

    def names(self):
        """Names of the open volumes, sorted."""
        with self._lock:
            return sorted(self._volumes)

    def exports(self, name) -> list[int]:
        """Indices of ``name``'s split images that a LUN exports (``NAME;image=N``)."""
        prefix = f"{name};image="
        with self._lock:
            return sorted(int(k[len(prefix):]) for k in self._users if k.startswith(prefix))

    def release(self, spec: cfgstring.VolumeSpec, backend=None):
        """A LUN stops using ``spec``'s volume (or its exported split image, whose ``backend`` is
        closed); the volume is closed when no LUN uses it any more. Releasing what is not held does
        nothing.
        """
        key = spec.name if spec.image is None else f"{spec.name};image={spec.image}"
        with self._lock:
            if self._users.pop(key, None) is None:
                return
            if backend is not None and spec.image is not None:
                backend.close()
            self._refs[spec.name] -= 1
            volume = None
            if self._refs[spec.name] == 0:
                del self._refs[spec.name]
                volume = self._volumes.pop(spec.name)
        if volume is not None:
            volume.close()


def _tuning(spec) -> dict:
    """The cfgstring's engine settings that apply at every open (``leg_timeout``)."""
    return {} if spec.leg_timeout is None else {"leg_timeout": spec.leg_timeout}


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
    """Stands behind a LUN whose volume could not be opened: medium access gets NOT READY."""

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

# Commands a LUN answers even when its volume is not open (so initiators can see why).
_ALWAYS_ANSWERED = {scsi.INQUIRY, scsi.REQUEST_SENSE, scsi.MAINTENANCE_IN}


def _owner_label(owner) -> str:
    """Who holds or waits for a region lock, for status displays: the bus name of an external
    holder, "initiator I/O" for a SCSI command, "resync"/"restore" for a copy job."""
    if owner is None:
        return "initiator I/O"
    if isinstance(owner, tuple) and len(owner) == 2 and owner[0] == "bus":
        return f"D-Bus {owner[1]}"
    kind = getattr(owner, "kind", None)
    return kind if isinstance(kind, str) else str(owner)


class LunServer:
    """Serves one user:lvmirror device: its TCMU ring, its worker pool, its volume."""

    def __init__(self, device, registry: VolumeRegistry, *, workers: int = 4,
                 inline_reads: bool = True):
        """``workers``: threads of the LUN's pool, which runs every command that may block.
        ``inline_reads``: the ring thread answers a READ itself when the data is in the page
        cache (``LogicalUnit.execute(nowait=True)``), saving the hand-off to a worker and back;
        any other command, or a read that would wait, goes to the pool."""
        self.device = device
        self.inline_reads = inline_reads
        self.inline = 0              # commands the ring thread answered itself
        self.registry = registry
        self.name = device.dev_name
        self.workers = workers
        self.spec = None
        self.volume = None
        self.backend = None
        self.error = None            # why the LUN answers NOT READY, for status displays
        self.lu = None
        self.commands = 0
        self.gone = False            # the kernel removed the uio device under the ring
        self._completions: queue.SimpleQueue = queue.SimpleQueue()
        self._aborted: set[int] = set()
        self._held: list = []      # completed commands whose views a slow leg still uses
        self._stop = threading.Event()
        self._thread = None
        self._pool = None
        self._handle = None
        self._ring = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False

    # -- life cycle -----------------------------------------------------------------------------
    def open(self, *, pickup: bool = False, handle=None):
        """Open the uio device (or use ``handle``, e.g. the ring emulator's) and the volume.

        Device errors (busy, wrong ring) raise; volume errors - any, not only the foreseen
        LvmirrorError ones - leave the LUN answering NOT READY with the reason logged and kept
        in ``error``."""
        self._handle = handle if handle is not None else uio.open_device(self.device,
                                                                         pickup=pickup)
        try:
            self._ring = CommandRing(self._handle.map, map_size=self._handle.map_size)
        except RingError:
            self._handle.close()
            raise
        size = self.device.lun_size()
        wwn = self.device.wwn()
        max_blocks = self.device.max_transfer_blocks()
        if not self.device.enable_tmr_notification():
            log.info("LUN %s: the kernel does not report task management (attrib/"
                     "tmr_notification): aborted commands are only seen when they complete",
                     self.name)
        try:
            spec = cfgstring.parse(self.device.cfgstring)
            volume, target = self.registry.acquire(spec, lun=self.name, size=size)
            try:
                self._check_block_size(volume)
                backend = LunBackend(target, size)
            except BaseException:
                self.registry.release(spec, target)
                raise
            self.spec, self.volume, self.backend = spec, volume, target
            self.lu = LogicalUnit(backend, wwn=wwn, write_cache=self.device.write_cache(),
                                  max_transfer_blocks=max_blocks, read_only=spec.readonly)
            log.info("LUN %s: serving %s (%d images, %d bytes) on %s", self.name,
                     target.name, len(volume.images), backend.num_blocks * backend.block_size,
                     self.device.uio_name)
        except LvmirrorError as exc:
            self.error = str(exc)
            self.lu = LogicalUnit(NotReadyBackend(size), wwn=wwn)
            log.error("LUN %s: %s; medium access gets NOT READY until it is fixed", self.name, exc)
        except Exception as exc:
            # a volume whose state lvmirror cannot read (a bug, or state no version should
            # have written) must not take lvmirrord and every other LUN down with it
            self.error = f"cannot open the volume: {type(exc).__name__}: {exc}"
            self.lu = LogicalUnit(NotReadyBackend(size), wwn=wwn)
            log.exception("LUN %s: %s; medium access gets NOT READY until it is fixed",
                          self.name, self.error)

    def _check_block_size(self, volume):
        hw = self.device.hw_block_size()
        if hw is not None and hw != volume.block_size:
            raise ConfigError(f"LUN {self.name}: hw_block_size is {hw} but volume {volume.name} "
                              f"has {volume.block_size}-byte blocks (set control "
                              f"hw_block_size={volume.block_size} before enabling)")

    def start(self):
        """Start the worker pool (``workers`` threads) and the ring thread; call after open."""
        self._pool = Worker(f"lun-{self.name}", self.workers)
        self._thread = threading.Thread(target=self._serve, name=f"ring-{self.name}", daemon=True)
        self._thread.start()

    def stop(self):
        """Drain in-flight commands, complete them, release the volume and the device.
        Idempotent."""
        if self._wake_w < 0:
            return
        self._stop.set()
        self._wake_pending = False
        self._wake()
        if self._thread is not None:
            self._thread.join()
        if self.spec is not None:
            self.registry.release(self.spec, self.backend)
            self.spec = None
        if self._held and not self._release_held(wait=HELD_VIEWS_WAIT):
            log.error("LUN %s: %d completed command(s) still have their data in use by an image "
                      "failed as slow after %.0f s; the ring stays mapped until they return",
                      self.name, len(self._held), HELD_VIEWS_WAIT)
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
            self.lu.capacity_changed()
            log.info("LUN %s: size now %d bytes", self.name, event.dev_size)
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

    def _serve(self):
        try:
            self._serve_ring()
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

    def _serve_ring(self):
        uio_fd = self._handle.fd
        poller = select.poll()
        poller.register(uio_fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        ring = self._ring
        inflight = 0
        while True:
            stopping = self._stop.is_set()
            for fd, _ in poller.poll(1000 if not stopping else 200):
                if fd == uio_fd:
                    self._handle.clear_event()
                else:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
            self._wake_pending = False
            completed = 0
            if not stopping:
                batch = ring.fetch()
                for ids in batch.aborts:
                    self._aborted.update(ids)
                nowait = self._nowait_ok()
                for command in batch.commands:
                    inflight += 1
                    self.commands += 1
                    if nowait and command.data_len <= INLINE_READ_MAX and command.cdb \
                            and command.cdb[0] in READ_OPCODES:
                        try:
                            response = self.lu.execute(command.cdb, (), command.iov_views,
                                                       nowait=True)
                        except WouldBlock:
                            pass
                        else:
                            self.inline += 1
                            self._finish(command, response)
                            completed += 1
                            continue
                    self._pool.post(self._execute, command)
            while True:
                try:
                    command, response = self._completions.get_nowait()
                except queue.Empty:
                    break
                self._finish(command, response)
                completed += 1
            inflight -= completed
            if self._held:
                self._release_held()
            if ring.take_notify() or completed:
                self._handle.notify()
            if stopping and inflight == 0:
                break
        self._pool.stop(wait=True)

    def _finish(self, command, response):
        """Complete ``command`` on the ring with ``response`` (ring thread only)."""
        read_len = response.read_len if 0 < response.read_len < command.data_len else None
        if not command.release():
            # a leg failed as slow still writes from these views: the command completes (the
            # leg is failed, its range marked for resync) and the views are let go once the
            # leg returns
            self._held.append(command)
        self._ring.complete(command.cmd_id, response.status, response.sense, read_len)
        self._aborted.discard(command.cmd_id)

    def _nowait_ok(self) -> bool:
        """The ring thread may try READs itself: enabled, the volume open and answering, its
        backend able to read without blocking, and no abort pending (the pool answers those)."""
        return (self.inline_reads and self.error is None and self.lu is not None
                and not self._aborted and getattr(self.backend, "supports_nowait", False))

    def _execute(self, command):
        try:
            if command.cmd_id in self._aborted:
                response = Response(scsi.TASK_ABORTED, b"", 0)
            elif self.error and command.cdb[:1] and command.cdb[0] not in _ALWAYS_ANSWERED:
                response = Response(scsi.CHECK_CONDITION, build_sense(
                    scsi.NOT_READY, *scsi.ASC_LUN_NOT_READY_MANUAL_INTERVENTION), 0)
            else:
                response = self.lu.execute(command.cdb, command.iov_views, command.iov_views)
        except Exception:  # never lose a command: a bug here must still complete it
            log.exception("LUN %s: command %s failed", self.name, command.cdb[:1].hex())
            response = Response(scsi.CHECK_CONDITION, build_sense(
                scsi.HARDWARE_ERROR, *scsi.ASC_INTERNAL_TARGET_FAILURE), 0)
        self._completions.put((command, response))
        self._wake()


class BackupProgress:
    """A running or finished backup of a split image, shown with the volume's jobs."""

    kind = "backup"

    def __init__(self, image_id, dest):
        self.image_id = image_id
        self.dest = dest
        self.state = "running"
        self.error = None
        self.bytes_done = 0
        self.bytes_total = 0
        self._t0 = time.monotonic()
        self._t_end = None

    def update(self, done, total):
        """Progress callback of backup_image: ``done`` of ``total`` bytes copied."""
        self.bytes_done, self.bytes_total = done, total

    def finish(self, state, error=None):
        """The backup ended: ``state`` "done" or "failed" (with ``error``)."""
        self.state, self.error, self._t_end = state, error, time.monotonic()

    def progress(self) -> dict:
        """The job dict status() shows (kind, image, state, bytes, MB/s, elapsed s, dest)."""
        return job_progress(self, rate_limit=None, dest=self.dest)


class Lvmirrord:
    """The daemon: the LUNs it serves, the netlink listener, the D-Bus service."""

    def __init__(self, *, state_dir=DEFAULT_STATE_DIR, workers=4, sysfs_root="/sys",
                 configfs_root="/sys/kernel/config", with_bus=True):
        self.state_dir = state_dir
        self.workers = workers
        self.sysfs_root = sysfs_root
        self.configfs_root = configfs_root
        self.with_bus = with_bus
        self.registry = VolumeRegistry(state_dir)
        self.luns: dict[str, LunServer] = {}     # by uio name
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._netlink = None
        self._bus = None
        self._external_locks: dict = {}     # lock id -> (volume name, RegionLock)
        self._backups: dict = {}            # (volume, image id) -> BackupProgress
        self._backup_lock = threading.RLock()  # a backup starts, or a change to its image does

    # -- LUN bookkeeping -----------------------------------------------------------------------
    def add_lun(self, device, *, pickup=False) -> LunServer:
        """Serve ``device`` (a uio.Device of a user:lvmirror backstore): open its ring and its
        volume, start its threads. ``pickup``: the device existed before lvmirrord started
        (its ring may hold commands of a previous lvmirrord). Returns the LunServer (the same
        one if it is already served). OSError when the device cannot be opened."""
        with self._lock:
            if device.uio_name in self.luns:
                return self.luns[device.uio_name]
            lun = LunServer(device, self.registry, workers=self.workers)
            lun.open(pickup=pickup)
            lun.start()
            self.luns[device.uio_name] = lun
            return lun

    def remove_lun(self, uio_name):
        """Stop serving the device ``uio_name`` (e.g. "uio0"): drain and complete its
        in-flight commands, release its volume. Unknown names are ignored."""
        with self._lock:
            lun = self.luns.pop(uio_name, None)
        if lun is not None:
            lun.stop()
            log.info("LUN %s removed", lun.name)

    def check_config(self, config: str):
        """CheckConfig for targetcli: (ok, message). Never raises: a cfgstring the checks did
        not foresee is refused with the error, logged as a bug."""
        try:
            cfgstring.check(config, state_dir=self.state_dir)
        except ConfigError as exc:
            return False, str(exc)
        except Exception as exc:  # a parser bug must not reach targetcli as a D-Bus error
            log.exception("CheckConfig %r", config)
            return False, f"cfgstring {config!r} cannot be checked: {type(exc).__name__}: {exc}"
        return True, "success"

    # -- management (called from the D-Bus service's worker threads) ---------------------------
    def _volume(self, name):
        volume = self.registry.get(name)
        if volume is None:
            raise ConfigError(f"no volume {name!r} is open (served by no LUN); open volumes: "
                              f"{', '.join(self.registry.names()) or 'none'}")
        return volume

    def status(self) -> dict:
        """Everything ``lvmirror status`` shows, as a JSON-able dict: per open volume its size
        (bytes), block and region size, images (index, path, state, split time, changed bytes,
        error), jobs (resync, restore, backup progress), exported split images, health
        (optimal, degraded, offline) and I/O counters; per LUN its uio device, cfgstring,
        error and commands served."""
        volumes = {}
        for name in self.registry.names():
            volume = self.registry.get(name)
            if volume is None:
                continue
            stats = volume.stats
            volumes[name] = {
                "size": volume.size, "block_size": volume.block_size,
                "region_size": volume.region_size,
                "images": [dict(index=i.index, id=i.id, path=i.path, state=i.state.value,
                                generation=i.generation, split_time=i.split_time,
                                bitmap_fill=i.bitmap_fill, dirty_bytes=i.dirty_bytes,
                                error=i.error) for i in volume.images],
                "jobs": [job.progress() for job in list(volume.jobs.values())] +
                        [b.progress() for (v, _), b in list(self._backups.items()) if v == name],
                "exported": self.registry.exports(name),
                "health": volume.health, "offline": volume.offline,
                "io": {k: stats[k] for k in ("reads", "writes", "bytes_read", "bytes_written",
                                             "flushes", "unmaps", "read_errors", "write_errors",
                                             "image_failures", "inflight", "space_errors",
                                             "metadata_errors", "slow_legs",
                                             "offline_events")},
            }
        luns = [{"name": lun.name, "uio": lun.device.uio_name, "cfgstring": lun.device.cfgstring,
                 "error": lun.error, "commands": lun.commands}
                for lun in list(self.luns.values())]
        return {"version": __version__, "state_dir": self.state_dir, "volumes": volumes,
                "luns": luns}

    def split(self, name, image):
        """Split image ``image`` (an index) off volume ``name`` now (``MirrorVolume.split``:
        I/O begun before the split time T completes to every image, later I/O goes to the
        others and is not paused). Returns index, path, split_time (seconds since the epoch),
        generation and the number of I/Os drained. ConfigError: no such volume; StateError /
        IndexError as MirrorVolume.split raises them."""
        info = self._volume(name).split(image)
        log.info("volume %s: image %d split at %.6f (%d I/Os drained)", name, image,
                 info.split_time, info.drained)
        return dict(index=info.index, path=info.path, split_time=info.split_time,
                    generation=info.generation, drained=info.drained)

    def _no_backup(self, name, image):
        """Image ``image``'s ImageInfo, or StateError while a backup of it runs (the caller holds
        ``_backup_lock`` across this check and its change to the image)."""
        info = next((i for i in self._volume(name).images if i.index == image), None)
        if info is None:
            raise ConfigError(f"volume {name}: no image {image}")
        b = self._backups.get((name, info.id))
        if b is not None and b.state == "running":
            raise StateError(f"volume {name}: image {image} is being backed up to {b.dest}; "
                             f"wait for the backup to finish")
        return info

    def backup(self, name, image, dest, fmt="raw") -> int:
        """Copy split image ``image`` to ``dest`` (raw sparse or qcow2). Resync, restore and
        detach of the image are refused while it runs; progress shows in status()."""
        from lvmirror.backup import backup_image
        if not os.path.isabs(dest):
            raise ConfigError(f"backup destination {dest!r} must be an absolute path")
        with self._backup_lock:     # the image's state is read under the lock resync takes
            info = self._no_backup(name, image)
            if info.state.value != "split":
                raise StateError(f"volume {name}: image {image} is {info.state.value}; only a "
                                 f"split image is a point-in-time copy (split it first)")
            progress = self._backups[(name, info.id)] = BackupProgress(info.id, dest)
        entry = dict(index=info.index, path=info.path, state=info.state.value)
        log.info("volume %s: backup of image %d to %s (%s) started", name, image, dest, fmt)
        try:
            n = backup_image(entry, dest, fmt=fmt, progress=progress.update)
        except BaseException as exc:
            progress.finish("failed", str(exc))
            raise
        progress.finish("done")
        log.info("volume %s: image %d backed up to %s (%d bytes)", name, image, dest, n)
        return n

    def resync(self, name, image, rate_mbps=0.0, *, full=False):
        """Start (or resume) the resync of image ``image`` of volume ``name`` at ``rate_mbps``
        MB/s (0: unlimited); ``full``: every region, also into an image marked in sync
        (``MirrorVolume.resync``). Returns the job's progress dict. StateError / IndexError
        as ``JobControl.resync`` raises them; refused while the image is backed up."""
        with self._backup_lock:
            self._no_backup(name, image)
            job = self._volume(name).resync(image, rate_limit=rate_mbps or None, full=full)
        if full:
            log.warning("volume %s: full resync of image %d started: it serves no reads until "
                        "every region is copied from the other images", name, image)
        else:
            log.info("volume %s: resync of image %d started", name, image)
        return job.progress()

    def restore(self, name, image, rate_mbps=0.0):
        """Roll volume ``name`` back to its split image ``image`` at ``rate_mbps`` MB/s (0:
        unlimited; kept across a restart). The volume reads as the split image once this
        returns (``MirrorVolume.restore``). Returns the job's progress dict. StateError: the
        image is not split, is exported or backed up, or a restore runs."""
        with self._backup_lock:
            self._no_backup(name, image)
            job = self._volume(name).restore(image, rate_limit=rate_mbps or None)
        log.info("volume %s: restore from image %d started", name, image)
        return job.progress()

    def attach(self, name, path, *, force=False):
        """Attach ``path`` to volume ``name`` (full resync); returns its index. ``force``: an
        existing path that holds data may be overwritten (``JobControl.attach``)."""
        index = self._volume(name).attach(path, force=force)
        log.info("volume %s: image %s attached as %d, full resync started%s", name, path, index,
                 " (forced over existing data)" if force else "")
        return index

    def detach(self, name, image):
        """Remove image ``image`` (an index) from volume ``name``; its file is kept.

        Refused (StateError) while the image is backed up, while it is exported as a LUN, or
        while a split image with a higher index is exported: a detach renumbers the images
        after it, and the export's cfgstring (``NAME;image=N``, which LIO and the saved
        targetcli configuration keep) would name another image after the next restart.
        ConfigError if the volume is not open or has no such image."""
        with self._backup_lock:
            self._no_backup(name, image)
            exported = self.registry.exports(name)
            if image in exported:
                raise StateError(f"volume {name}: image {image} is exported as a LUN "
                                 f"(cfgstring '{name};image={image}'); remove that LUN first")
            later = [k for k in exported if k > image]
            if later:
                raise StateError(
                    f"volume {name}: detaching image {image} would renumber the exported split "
                    f"image(s) {', '.join(map(str, later))}, and after a restart the LUN whose "
                    f"cfgstring says '{name};image={later[0]}' would serve another image; "
                    f"remove the export first")
            self._volume(name).detach(image)
        log.info("volume %s: image %d detached", name, image)

    def cancel(self, name, image):
        """Stop the resync or restore running on image ``image`` of volume ``name`` and wait
        for it; its bitmap is kept (resync / restore resume it). ConfigError: no such volume
        or image, or no job runs on it."""
        volume = self._volume(name)
        for info in volume.images:
            if info.index == image:
                job = volume.jobs.get(info.id)
                if job is None or not job.is_alive():
                    raise ConfigError(f"volume {name}: no job running on image {image}")
                job.cancel()
                job.wait()
                return
        raise ConfigError(f"volume {name}: no image {image}")

    # -- region locks for external holders (the lock manager's coordination interface) ---------
    def lock_region(self, name, lba, count, *, shared=False, timeout=None, owner):
        """Take a range lock on volume ``name`` for ``owner`` (e.g. a backup agent on the bus);
        waits FIFO behind conflicting I/O and holders. Returns a lock id."""
        volume = self._volume(name)
        if not 0 <= lba < volume.num_blocks or count < 1 or lba + count > volume.num_blocks:
            raise ConfigError(f"volume {name}: LBA range [{lba}, +{count}) outside 0.."
                              f"{volume.num_blocks}")
        lock = volume.locks.lock(lba, count, owner=owner, shared=shared, timeout=timeout)
        with self._lock:
            self._lock_seq = getattr(self, "_lock_seq", 0) + 1
            lock_id = self._lock_seq
            self._external_locks[lock_id] = (name, lock)
        log.info("volume %s: LBAs [%d, +%d) locked %s by %s (lock %d)", name, lba, count,
                 "shared" if shared else "exclusive", owner, lock_id)
        return lock_id

    def unlock_region(self, lock_id, *, owner):
        """Release external lock ``lock_id`` (from lock_region). ConfigError unless ``owner``
        holds it."""
        with self._lock:
            entry = self._external_locks.get(lock_id)
            if entry is None or entry[1].owner != owner:
                raise ConfigError(f"no lock {lock_id} held by {owner}")
            del self._external_locks[lock_id]
        entry[1].release()

    def list_locks(self, name):
        """Volume ``name``'s region locks: holders and waiters (LBA, count, shared, owner,
        seconds held or waited) and the ids of the external locks taken through lock_region."""
        volume = self._volume(name)

        def info(x):
            return dict(lba=x.start, count=x.count, shared=x.shared,
                        owner=_owner_label(x.owner),
                        seconds=round(time.monotonic() - x.since, 3))

        with self._lock:
            external = sorted(lid for lid, (vol, _) in self._external_locks.items()
                              if vol == name)
        return {"holders": [info(x) for x in volume.locks.holders()],
                "waiters": [info(x) for x in volume.locks.waiters()],
                "external_lock_ids": external}

    def release_owner(self, owner) -> int:
        """``owner`` went away (left the bus): drop its locks and waiting requests."""
        n = 0
        for name in self.registry.names():
            volume = self.registry.get(name)
            if volume is not None:
                n += volume.locks.release_owner(owner)
        with self._lock:
            for lid in [lid for lid, (_, lk) in self._external_locks.items() if lk.owner == owner]:
                del self._external_locks[lid]
        if n:
            log.warning("released %d region lock(s) of %s, which left the bus", n, owner)
        return n

    # -- netlink events ------------------------------------------------------------------------
    def _on_event(self, event):
        if event.subtype is not None and event.subtype != SUBTYPE:
            return                      # another handler's device: tcmu-runner answers for it
        uio_name = f"uio{event.minor}"
        status = 0
        if isinstance(event, netlink.DeviceRemoved):
            # The uio device may already be gone from sysfs: find the LUN by its minor.
            if uio_name in self.luns:
                self.remove_lun(uio_name)
                self._netlink.reply(event, 0)
            return
        device = uio.device_by_minor(event.minor, sysfs_root=self.sysfs_root,
                                     configfs_root=self.configfs_root)
        if device is None or device.subtype != SUBTYPE:
            return
        try:
            if isinstance(event, netlink.DeviceAdded):
                lun = self.add_lun(device)
                if lun.error:
                    status = -22
            elif isinstance(event, netlink.DeviceReconfig):
                lun = self.luns.get(device.uio_name)
                if lun is None:
                    status = -19
                else:
                    lun.reconfigure(event)
        except ConfigError as exc:
            log.error("%s", exc)
            status = -22
        except OSError as exc:
            log.error("%s: %s", device.uio_name, exc)
            status = -(exc.errno or 5)
        self._netlink.reply(event, status)

    # -- run -----------------------------------------------------------------------------------
    def start(self):
        """Listen to TCMU netlink events, pick up the user:lvmirror devices that already exist,
        and start the D-Bus service (unless ``with_bus`` is False)."""
        os.makedirs(self.state_dir, exist_ok=True)
        self._netlink = netlink.TcmuNetlink()
        self._netlink.start(self._on_event)
        for device in uio.find_devices(SUBTYPE, sysfs_root=self.sysfs_root,
                                       configfs_root=self.configfs_root):
            try:
                self.add_lun(device, pickup=True)
                log.info("picked up existing LUN %s (%s)", device.dev_name, device.uio_name)
            except OSError as exc:
                log.error("cannot pick up %s (%s): %s", device.dev_name, device.uio_name, exc)
        if self.with_bus:
            try:
                from lvmirror.bus import BusService
            except ImportError as exc:
                log.warning("D-Bus service unavailable (%s); targetcli will not list "
                            "user:%s", exc, SUBTYPE)
            else:
                self._bus = BusService(self)
                self._bus.start()

    def stop(self):
        """Stop the D-Bus service and the netlink listener, then every LUN (each drains and
        completes its in-flight commands and closes its volume cleanly)."""
        sdnotify.notify("STOPPING=1")
        if self._bus is not None:
            self._bus.stop()
        if self._netlink is not None:
            self._netlink.stop()
        for uio_name in list(self.luns):
            self.remove_lun(uio_name)

    def run(self):
        """start(), tell systemd READY=1, serve until request_stop(), then stop()."""
        self.start()
        sdnotify.notify("READY=1", f"STATUS=serving {len(self.luns)} LUN(s)")
        log.info("lvmirrord %s ready: %d LUN(s), state in %s", __version__, len(self.luns),
                 self.state_dir)
        self._stop.wait()
        log.info("shutting down: draining in-flight commands")
        self.stop()

    def request_stop(self, *_):
        """Ask run() to stop (the SIGTERM / SIGINT handler)."""
        self._stop.set()


def setup_logging(level: str):
    """Plain lines with syslog priority prefixes under journald, timestamps on a terminal."""
    if os.environ.get("JOURNAL_STREAM"):
        prefixes = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>",
                    logging.ERROR: "<3>", logging.CRITICAL: "<2>"}

        class JournalFormatter(logging.Formatter):
            def format(self, record):
                return prefixes.get(record.levelno, "<6>") + super().format(record)

        formatter = JournalFormatter("%(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv=None):
    """The lvmirrord command (``lvmirrord --help``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="lvmirrord", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="where volume metadata, bitmaps and logs live (default %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="I/O worker threads per LUN")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--no-dbus", action="store_true", help="do not start the D-Bus service")
    parser.add_argument("--version", action="version", version=f"lvmirrord {__version__}")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    daemon = Lvmirrord(state_dir=args.state_dir, workers=args.workers, with_bus=not args.no_dbus)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    try:
        daemon.run()
    except (LvmirrorError, OSError) as exc:
        log.critical("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
