"""Volume leases on shared storage (sanlock): a volume is open on at most one gateway.

When two gateways reach the same images, each lvmirrord takes a volume's **lease** before it
reads or writes anything of the volume, holds it while the volume is open and releases it
after the close made every acknowledged write durable. A second lvmirrord asking for a lease
held elsewhere is refused (``LeaseHeldError``, naming the sanlock host id that holds it). This
is the volume-level half of the lock manager, as lvmlockd's sanlock mode is for LVs
(``lvchange -aey``); the D-Bus region locks stay for processes on one gateway.

sanlock (Debian's ``sanlock`` daemon and ``python3-sanlock``) keeps the leases in a **lease
area**, one shared file or block device that every gateway names the same (``lvmirrord
--lease-area PATH --host-id N``), laid out in sanlock's 1 MiB units (sanlock(8)); its sectors
are the area's logical sectors (``area_sector``): 512 bytes, up to 2000 host ids, or 4096 on a
4K-native device, where sanlock's 1 MiB alignment holds 250 host ids:

- offset 0: the lockspace ``lvmirror`` (one delta lease per host id, renewed every
  2 x io_timeout by the sanlock daemon);
- offset 1 MiB: the directory lease, held while a gateway assigns a volume its slot;
- offset 2 MiB + k MiB: slot k, the paxos lease of one volume (its resource name is the
  volume name, or a hash of it beyond sanlock's 48 bytes; a free slot's is ``-free-``). A
  volume's slot is found by reading the slots; only when it has none yet is the directory
  lease taken to assign one, and kept. A slot that cannot be read refuses the open: it might
  be the volume's, held by another gateway.

``init_area`` (``lvmirror lease-init PATH``) writes the lockspace and the directory lease once,
before any gateway uses the area; it refuses an area that holds a lockspace already.

A lease belongs to the process that acquired it (``sanlock.register``): with a process per
volume (lvmirrord's default) the volume's process. When this host loses the lockspace (the
lease area cannot be written for 8 x io_timeout), sanlock stops the holders, SIGTERM then
SIGKILL, before another host may take their leases (after the host's delta lease expired), or
the watchdog resets the host; the LUN then answers NOT READY until the lease is back. A
holder that exits releases its leases. Images on shared storage must be opened with
``direct=1`` (no page cache that a dead process's host could write back after another gateway
took over), so a volume's open with leases refuses a cfgstring without it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import os
import stat
import struct
import threading
import time

from lvmirror.errors import ConfigError

log = logging.getLogger("lvmirrord")

__all__ = ["LeaseConfig", "LeaseError", "LeaseHeldError", "Leases", "area_sector", "check_host_id",
           "init_area"]

LOCKSPACE = b"lvmirror"
ALIGN = 1 << 20                # sanlock's alignment, bytes (1 MiB, for either sector size)
LOCKSPACE_OFFSET = 0
DIRECTORY_OFFSET = ALIGN
FIRST_SLOT_OFFSET = 2 * ALIGN
DIRECTORY = b"lvmirror-directory"
FREE = b"-free-"               # a free slot's resource name (no volume name starts with '-')
NAME_MAX = 48                  # SANLK_NAME_LEN
DIRECTORY_TRIES = 20           # the directory lease held by another gateway: tries, ...
DIRECTORY_RETRY = 0.5          # ... seconds apart
MAX_HOST_ID = 2000
# host ids sanlock's 1 MiB alignment holds, by sector size in bytes (sanlock(8), "-Z" and "-A":
# align 1M with 4K sectors supports 250 hosts)
MAX_HOSTS_BY_SECTOR = {512: 2000, 4096: 250}
BLKSSZGET = 0x1268             # <linux/fs.h>: the logical sector size of a block device, int


class LeaseError(ConfigError):
    """A lease could not be taken or the lease area is unusable (the message says why)."""


class LockspaceLostError(LeaseError):
    """This host does not hold the lockspace (the area failed, or the sanlock daemon stopped):
    no lease can be taken until it is joined again."""


# sanlock's answer to an acquire of a resource another host holds (SANLK_ACQUIRE_IDLIVE,
# sanlock_rv.h: "Lease is held by another host")
SANLK_HELD = -243


class LeaseHeldError(LeaseError):
    """The volume's lease is held by another host (``owners``: their sanlock host ids)."""

    def __init__(self, message: str, owners: list[int]):
        super().__init__(message)
        self.owners = owners


@dataclasses.dataclass(frozen=True)
class LeaseConfig:
    """Where the leases are and who this host is.

    ``area``: the lease area, a shared file or block device (at least 3 MiB: lockspace,
    directory, one slot); ``host_id``: this gateway's sanlock host id, 1-2000, unique among the
    gateways; ``io_timeout``: seconds, sanlock's I/O timeout for the lockspace (its default is
    10: a host that cannot renew for 80 s loses its leases; another takes them after 140 s)."""
    area: str
    host_id: int
    io_timeout: int = 10

    def __post_init__(self):
        if not 1 <= self.host_id <= MAX_HOST_ID:
            raise ConfigError(f"the sanlock host id must be 1 to {MAX_HOST_ID}, not "
                              f"{self.host_id}")
        if not os.path.isabs(self.area):
            raise ConfigError(f"the lease area must be an absolute path: {self.area!r}")
        if not 1 <= self.io_timeout <= 60:
            raise ConfigError(f"the lease I/O timeout must be 1 to 60 seconds, not "
                              f"{self.io_timeout}")


def _sanlock():
    try:
        import sanlock
    except ImportError:
        raise LeaseError("leases need python3-sanlock (and the sanlock daemon): "
                         "apt install sanlock python3-sanlock") from None
    return sanlock


def resource_name(volume: str) -> bytes:
    """The sanlock resource name of ``volume``'s lease: the name itself, or, beyond 48 bytes,
    ``h:`` and 46 hex digits of its SHA-256."""
    raw = volume.encode()
    if len(raw) <= NAME_MAX:
        return raw
    return b"h:" + hashlib.sha256(raw).hexdigest()[:NAME_MAX - 2].encode()


def _file_sector(st, sys_root="/sys") -> int:
    """The logical sector size of the block device a regular file's file system is on
    (``/sys/dev/block/MAJ:MIN/queue/logical_block_size``, or its parent's for a partition);
    512 when the file system has no block device (tmpfs, NFS, overlay) or sysfs does not say."""
    dev = os.path.join(sys_root, "dev", "block", f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for queue in (os.path.join(dev, "queue"), os.path.join(dev, "..", "queue")):
        try:
            with open(os.path.join(queue, "logical_block_size")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            continue
    return 512


def area_sector(path: str) -> int:
    """The sector size (bytes) sanlock must use on the lease area ``path``: a block device's
    logical sector size (ioctl BLKSSZGET), 512 or 4096 (4K native); for a regular file, that
    of the block device its file system is on (sanlock's O_DIRECT I/O must be aligned to it).
    LeaseError for another size, or a device that cannot be asked."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        size = _file_sector(st)
        if size not in MAX_HOSTS_BY_SECTOR:
            raise LeaseError(f"{path}: its file system's device has {size}-byte sectors; "
                             "sanlock supports 512 and 4096")
        return size
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        size = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    except OSError as exc:
        raise LeaseError(f"{path}: cannot read its logical sector size: {exc}") from None
    finally:
        os.close(fd)
    if size not in MAX_HOSTS_BY_SECTOR:
        raise LeaseError(f"{path}: sanlock supports 512- and 4096-byte sectors, not {size}")
    return size


def check_host_id(path: str, host_id: int) -> int:
    """The sector size of the lease area ``path`` (``area_sector``), after checking that it
    holds ``host_id``: 4K-native areas hold host ids 1 to 250 (LeaseError otherwise)."""
    sector = area_sector(path)
    if host_id > MAX_HOSTS_BY_SECTOR[sector]:
        raise LeaseError(f"{path} has {sector}-byte sectors: its lockspace holds sanlock host "
                         f"ids 1 to {MAX_HOSTS_BY_SECTOR[sector]}, not {host_id}")
    return sector


def area_slots(path: str) -> int:
    """How many volume slots the lease area holds (its size in MiB minus 2). LeaseError for
    a path that is not an absolute path to a regular file or a block device."""
    if not os.path.isabs(path):
        raise LeaseError(f"the lease area must be an absolute path: {path!r}")
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise LeaseError(f"{path}: a lease area is a regular file or a block device")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    return max(size // ALIGN - 2, 0)


def init_area(path: str, *, io_timeout: int = 10, force: bool = False) -> int:
    """Write the lockspace, the directory lease and every slot as free to ``path`` (the
    sanlock daemon must run) in 1 MiB units with the area's sector size (``area_sector``: 4096
    on a 4K-native device); returns the number of volume slots. ``io_timeout``: seconds,
    1 to 60. Refuses (LeaseError) an area smaller than 3 MiB, and, unless ``force``, one whose
    first MiB does not read as zeroes (a lockspace in use, or data: re-initialising an area in
    use destroys every lease in it, so force only when every lvmirrord using it is stopped),
    or cannot be read."""
    if not 1 <= io_timeout <= 60:
        raise LeaseError(f"the I/O timeout must be 1 to 60 seconds, not {io_timeout}")
    slots = area_slots(path)
    if slots < 1:
        raise LeaseError(f"{path}: a lease area needs at least 3 MiB (lockspace, directory, "
                         "one volume)")
    if not force:
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.pread(fd, ALIGN, 0)
        finally:
            os.close(fd)
        if head.count(0) != len(head):
            raise LeaseError(f"{path} is not empty (its first MiB holds a lockspace or other "
                             "data); re-initialising a lease area while a gateway uses it "
                             "destroys its leases: --force only when every lvmirrord using it "
                             "is stopped")
    sector = area_sector(path)
    geometry = dict(align=ALIGN, sector=sector)
    sanlock = _sanlock()
    try:
        sanlock.write_lockspace(LOCKSPACE, path, offset=LOCKSPACE_OFFSET, iotimeout=io_timeout,
                                **geometry)
        sanlock.write_resource(LOCKSPACE, DIRECTORY, [(path, DIRECTORY_OFFSET)], **geometry)
        for k in range(slots):
            sanlock.write_resource(LOCKSPACE, FREE, [(path, FIRST_SLOT_OFFSET + k * ALIGN)],
                                   **geometry)
    except sanlock.SanlockException as exc:
        raise LeaseError(f"{path}: cannot initialise the lease area: {exc} (is the sanlock "
                         "daemon running? systemctl start sanlock)") from None
    return slots


class Leases:
    """This process's volume leases (one per open volume), in the area ``config`` names.

    ``acquire(volume)`` before a volume is opened, ``release(volume)`` after it was closed.
    Thread-safe. Raises LeaseError (area unusable, lockspace cannot be joined, no free slot)
    and LeaseHeldError (another host holds it)."""

    def __init__(self, config: LeaseConfig):
        self.config = config
        self._sector = None                 # the area's sector size, bytes (area_sector)
        self._lock = threading.Lock()
        self._fd = None                     # sanlock.register()'s descriptor
        self._held: dict[str, int] = {}     # volume -> offset of its slot

    # -- the lockspace ---------------------------------------------------------------------------
    def join(self) -> None:
        """Join the lockspace with this host id (``add_lockspace``; returns at once when the
        daemon holds it already; otherwise sanlock waits until the host id is known free,
        about 2 x io_timeout plus a renewal). LeaseError when it cannot."""
        sanlock = _sanlock()
        c = self.config
        try:
            self._sector = check_host_id(c.area, c.host_id)
        except OSError as exc:          # a missing or unreadable area: the same LeaseError
            raise LeaseError(f"lease area {c.area}: {exc.strerror or exc}") from None
        try:
            if sanlock.inq_lockspace(LOCKSPACE, c.host_id, c.area, wait=True):
                return
            sanlock.add_lockspace(LOCKSPACE, c.host_id, c.area, offset=LOCKSPACE_OFFSET,
                                  iotimeout=c.io_timeout)
        except sanlock.SanlockException as exc:
            if exc.errno == 17:             # EEXIST: joined meanwhile
                return
            if exc.errno in (115, 11):      # EINPROGRESS (being added), EAGAIN (being removed)
                if sanlock.inq_lockspace(LOCKSPACE, c.host_id, c.area, wait=True):
                    return
            raise LeaseError(f"cannot join lockspace {LOCKSPACE.decode()} on {c.area} as host "
                             f"{c.host_id}: {exc} (is the sanlock daemon running, the area "
                             "initialised with lvmirror lease-init?)") from None

    # -- volume leases ---------------------------------------------------------------------------
    def acquire(self, volume: str) -> None:
        """Take ``volume``'s lease for this process (idempotent while held)."""
        sanlock = _sanlock()
        with self._lock:
            if volume in self._held:
                return
            self.join()
            if self._fd is None:
                self._fd = sanlock.register()
            offset = self._slot(sanlock, volume)
            disks = [(self.config.area, offset)]
            try:
                sanlock.acquire(LOCKSPACE, resource_name(volume), disks, slkfd=self._fd)
            except sanlock.SanlockException as exc:
                raise self._refusal(sanlock, exc, resource_name(volume), disks,
                                    f"volume {volume!r}") from None
            self._held[volume] = offset
            log.info("volume %s: lease taken (sanlock host %d, %s slot %d)", volume,
                     self.config.host_id, self.config.area,
                     (offset - FIRST_SLOT_OFFSET) // ALIGN)

    def release(self, volume: str) -> None:
        """Give ``volume``'s lease back (after its close made its writes durable). A failure
        is logged: the lease is released anyway when this process exits."""
        with self._lock:
            offset = self._held.pop(volume, None)
            if offset is None:
                return
            sanlock = _sanlock()
            try:
                sanlock.release(LOCKSPACE, resource_name(volume), [(self.config.area, offset)],
                                slkfd=self._fd)
                log.info("volume %s: lease released", volume)
            except sanlock.SanlockException as exc:
                log.error("volume %s: cannot release its lease (%s); it is released when this "
                          "process exits", volume, exc)

    def held(self) -> dict[str, int]:
        """Volume -> slot number of the leases this process holds."""
        with self._lock:
            return {v: (o - FIRST_SLOT_OFFSET) // ALIGN for v, o in self._held.items()}

    def _geometry(self) -> dict:
        """sanlock's align and sector keywords for this area (bytes)."""
        if self._sector is None:
            self._sector = area_sector(self.config.area)
        return dict(align=ALIGN, sector=self._sector)

    def _refusal(self, sanlock, exc, resource: bytes, disks, what: str) -> LeaseError:
        """The error for a failed acquire of ``resource``, saying why: held by another host
        (LeaseHeldError with its host ids), held by another process of this host, this host
        no longer holding the lockspace (the area failed, or the daemon stopped), or sanlock's
        own words."""
        c = self.config
        try:
            owners = sorted({o["host_id"] for o in sanlock.read_resource_owners(
                LOCKSPACE, resource, disks, **self._geometry()) if o.get("host_id")})
        except sanlock.SanlockException:
            owners = []
        others = [h for h in owners if h != c.host_id]
        if others:
            return LeaseHeldError(
                f"{what} is open on another gateway (its lease in {c.area} is held by sanlock "
                f"host id {', '.join(map(str, others))}; this is host {c.host_id}): refusing to "
                "open it", others)
        if owners:
            return LeaseError(f"{what}: its lease is held by another process of this host "
                              f"(sanlock host id {c.host_id})")
        try:
            joined = sanlock.inq_lockspace(LOCKSPACE, c.host_id, c.area)
        except sanlock.SanlockException:
            joined = False
        if not joined:
            return LockspaceLostError(
                f"{what}: this host (sanlock host id {c.host_id}) does not hold the lockspace "
                f"on {c.area}: the lease area cannot be read or written, or the sanlock daemon "
                f"stopped ({exc})")
        code = exc.args[0] if exc.args else None
        if code == SANLK_HELD:
            # held by another host when asked, and no owner left when its owners were read:
            # its holder let it go in between - as held as before for the caller, who tries
            # again (a LUN at its next follow); a plain LeaseError ended those retries (lab,
            # 2026-12-06: the LUN stayed NOT READY though the lease was free)
            return LeaseHeldError(f"{what}: its lease in {c.area} was held by another host "
                                  f"when asked, and its holder let it go since ({exc})", [])
        return LeaseError(f"{what}: cannot take its lease in {c.area}: {exc}")

    def _find(self, sanlock, name) -> tuple[int | None, int | None]:
        """(offset of the slot named ``name`` or None, offset of the first free slot or None),
        read from the area. LeaseError when a slot cannot be read: it might be this volume's,
        held elsewhere, so nothing may be assigned."""
        area = self.config.area
        mine = free = None
        for k in range(area_slots(area)):
            offset = FIRST_SLOT_OFFSET + k * ALIGN
            try:
                resource = sanlock.read_resource(area, offset=offset,
                                                 **self._geometry()).get("resource")
            except sanlock.SanlockException as exc:
                raise LeaseError(f"cannot read slot {k} of the lease area {area}: {exc}; "
                                 "refusing to open a volume whose lease might be in it") from None
            if resource == name:
                mine = offset
                break
            if resource == FREE and free is None:
                free = offset
        return mine, free

    def _slot(self, sanlock, volume) -> int:
        """The offset of ``volume``'s slot: found by reading the slots, or a free one assigned
        under the directory lease (taken again and again for up to DIRECTORY_TRIES x
        DIRECTORY_RETRY s while another process or gateway assigns one)."""
        name = resource_name(volume)
        mine, _ = self._find(sanlock, name)
        if mine is not None:
            return mine
        area = self.config.area
        directory = [(area, DIRECTORY_OFFSET)]
        for attempt in range(DIRECTORY_TRIES):
            try:
                sanlock.acquire(LOCKSPACE, DIRECTORY, directory, slkfd=self._fd)
                break
            except sanlock.SanlockException as exc:
                error = self._refusal(sanlock, exc, DIRECTORY, directory,
                                      f"the lease directory of {area} (for volume {volume!r})")
                if isinstance(error, LockspaceLostError) or attempt == DIRECTORY_TRIES - 1:
                    raise error from None
                time.sleep(DIRECTORY_RETRY)
        try:
            mine, free = self._find(sanlock, name)      # again, under the directory lease
            if mine is not None:
                return mine
            if free is None:
                raise LeaseError(f"the lease area {area} has no free slot for volume "
                                 f"{volume!r} ({area_slots(area)} slots, one MiB each, all "
                                 "assigned)")
            sanlock.write_resource(LOCKSPACE, name, [(area, free)], **self._geometry())
            log.info("volume %s: lease slot %d assigned in %s", volume,
                     (free - FIRST_SLOT_OFFSET) // ALIGN, area)
            return free
        finally:
            try:
                sanlock.release(LOCKSPACE, DIRECTORY, directory, slkfd=self._fd)
            except sanlock.SanlockException as exc:
                log.error("cannot release the lease directory of %s: %s", area, exc)
