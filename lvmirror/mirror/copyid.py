"""Is the file or device at a split image's path still the copy lvmirror split off?

A resync copies into a split image only the regions its change bitmap marks, and a restore
rolls back only those: both take every other region of the image to hold the volume's data as
of the split. A file put at the path while the image was away (another volume's image, an
older copy of this one, a new empty file) or written outside lvmirror (a file system mounted
read-write, an ``fsck``) breaks that: a resync would then mark a mix of two files in sync, and
the mirror would read the foreign regions as the volume's data; a restore would roll the
volume back to such a mix (trial 26, MEDIUM 3).

md keeps a superblock on each member for this, with the array's UUID and an event count
(md(4): a device whose event count is behind is not re-added with its bitmap but recovered in
full); LVM writes a PV label. lvmirror's images carry no header (the LUN's data starts at byte
0 of the image), so the split records what it can see from outside (``record``, saved with the
split as ``ImageRecord.copy_id``) and ``check`` compares before a resync or restore relies on
the bitmap:

- ``stat``, for a regular file: its inode number, size, modification and change times
  (``st_ino``, ``st_size``, ``st_mtime_ns``, ``st_ctime_ns``) once the split is durable.
  ``st_dev`` is not compared: it can change across boots.
  - The same inode with the same mtime, and a ctime not after the recorded one, is the copy,
    with no read. A later ctime (a chmod, or a write whose mtime was set back with
    ``touch -r``) leaves it to the sample.
  - Another size, or a later mtime, is a mismatch: every write updates mtime (POSIX
    ``write()``), so the file was written outside lvmirror or is another file (a new file may
    reuse a freed inode number: the inode alone proves nothing).
  - An earlier mtime is a mismatch too - an older copy put back with its time kept (``cp -p``
    of yesterday's copy) would otherwise pass on a sample that missed its differences - except
    on the same inode with a ctime not after the recorded one: fdatasync (the split's flush)
    does not make the inode's times durable, so a power cut can take both back, while
    ``cp -p``, ``touch -d`` or a restore from a backup set ctime to now. Then the sample
    decides.
  - Another inode with the copy's very mtime (the copy put back with ``cp -p``, ``cp -a``,
    ``rsync -a``): the sample decides.
  - Writes through the image's own LUN (``split.export``) change mtime legitimately and are
    marked in the change bitmap first. The identity is marked ``exported`` while the export
    runs and recorded again, once the image is durable, when it ends. One left marked
    (lvmirrord killed during an export) is judged by the inode and by the sampled ranges
    outside the regions the bitmap marks (a resync copies those anyway).
- ``devid``, for a block device: the name sysfs gives it for good (``device_id``: dm's
  uuid or name, the disk's WWID or serial), since its number and /dev name can change across
  boots. The same name is the copy (with no read, so a device that stopped answering is
  judged by the copy's own reads, as before); another name is a mismatch. Writes to the device
  outside lvmirror are not seen, as md does not see them.
- ``sample``: SHA-256 digests (truncated to 128 bits) of the SAMPLE_BYTES read at fixed
  offsets, one a range (SAMPLE_HEAD bytes at 0, where partition tables and file system
  superblocks live, and SAMPLE_BLOCK bytes in each of SAMPLE_SLICES slices of the volume).
  Where the stat fields leave it open (above), or for a block device sysfs names no ``devid``
  for (a loop device), the image is the copy when its sample matches. A sample of zeros
  proves nothing for a file with another inode, nor for a block device that is not the
  recorded one (``st_rdev``): any empty image matches a copy of an empty volume.

Anything else is a mismatch: ``JobControl.resync`` and ``restore`` refuse it unless told to copy
every region (``--full``), which is right whatever the image holds, and a backup of it is
refused (``JobControl.check_copy``). An identity is recorded only by the split; an image split
by an older lvmirror, or a split cut short by a crash before its identity was saved, has none
and is not checked (``check`` returns None). Not seen: a change outside the sampled blocks to
a file whose times were all set back (a clock stepped back, a file system rolled back to a
snapshot of the same inode).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading

from lvmirror.mirror.image import StorageImage
from lvmirror.mirror.resync import _read_source

log = logging.getLogger(__name__)

SAMPLE_HEAD = 64 * 1024     # bytes read at offset 0
SAMPLE_BLOCK = 4096         # bytes read in each slice
SAMPLE_SLICES = 16
SAMPLE_BYTES = SAMPLE_HEAD + SAMPLE_SLICES * SAMPLE_BLOCK   # 128 KiB at most


def sample_ranges(size: int) -> list[tuple[int, int]]:
    """The (offset, length) byte ranges the sample reads from an image of ``size`` bytes (a
    multiple of 4096 or of 512): SAMPLE_HEAD at 0, then SAMPLE_BLOCK in the middle of each of
    SAMPLE_SLICES equal slices, 4096-aligned, each within the image and after the head, in
    ascending order without overlap. Lengths are multiples of 512 (direct I/O)."""
    head = min(SAMPLE_HEAD, size - size % 512)
    ranges = [(0, head)] if head else []
    end = head
    for i in range(SAMPLE_SLICES):
        off = (i * size // SAMPLE_SLICES + size // (2 * SAMPLE_SLICES)) // 4096 * 4096
        if off < end or off + SAMPLE_BLOCK > size:
            continue
        ranges.append((off, SAMPLE_BLOCK))
        end = off + SAMPLE_BLOCK
    return ranges


def sample(read, size: int, skip=None) -> tuple[list, bool]:
    """``(digests, all zeros?)`` of the ``sample_ranges(size)`` of an image: one SHA-256 hex
    digest (first 32 hex digits) a range, in order, read with ``read(offset, view)`` (fills
    the writable memoryview ``view``; raises what the image's read raises, e.g. ImageIOError,
    which propagates). ``skip(offset, length)`` true: that range is not read, its digest None
    (and it does not count towards "all zeros")."""
    digests = []
    zero = True
    for off, ln in sample_ranges(size):
        if skip is not None and skip(off, ln):
            digests.append(None)
            continue
        view = StorageImage.aligned_buffer(ln)
        read(off, view)
        digests.append(hashlib.sha256(view).hexdigest()[:32])
        if zero and view.tobytes().count(0) != ln:
            zero = False
    return digests, zero


def bounded_reader(storage, limit):
    """A ``read(offset, view)`` for ``storage`` (a StorageImage no worker serves: opened just
    now, not yet in use), each read made on a thread of its own and waited for at most
    ``limit(length)`` seconds (``limit`` None: no bound, the read is made here). A read that
    outlasts it raises TimeoutError (ETIMEDOUT) and is left to finish on its thread (the
    caller must drop ``view``); the read's own error propagates."""
    def read(off, view):
        if limit is None:
            storage.readv(off, [view])
            return
        box = []

        def run():
            try:
                storage.readv(off, [view])
            except BaseException as e:       # noqa: BLE001 - handed to the waiting caller
                box.append(e)
        t = threading.Thread(target=run, daemon=True, name="copyid-read")
        t.start()
        t.join(limit(view.nbytes))
        if t.is_alive():
            raise TimeoutError(errno.ETIMEDOUT, f"a read of {view.nbytes} bytes at offset {off} "
                               f"of {storage.path} still busy after {limit(view.nbytes):.1f} s")
        if box:
            raise box[0]
    return read


SYSFS_BLOCK = "/sys/dev/block"
# sysfs attributes naming a block device for good, first found wins (Documentation/ABI:
# sysfs-block-dm for dm's uuid and name, sysfs-block for wwid and serial)
_DEVICE_IDS = (("dm/uuid", "dm-uuid"), ("dm/name", "dm-name"), ("wwid", "wwid"),
               ("device/wwid", "wwid"), ("serial", "serial"), ("device/serial", "serial"))


def device_id(rdev: int, sysfs: str = SYSFS_BLOCK) -> str | None:
    """A name for block device ``rdev`` (``st_rdev``) that stays with the device across
    boots, unlike its number or /dev name: ``"dm-uuid:LVM-..."`` (an LVM volume),
    ``"dm-name:..."`` (a dm device without a uuid), ``"wwid:..."`` (a SCSI or NVMe disk),
    ``"serial:..."`` (virtio), with ``"/partN"`` appended for a partition; None when sysfs
    names none (a loop device, say), and the content sample alone then identifies it."""
    base = os.path.join(sysfs, f"{os.major(rdev)}:{os.minor(rdev)}")
    suffix = ""
    try:
        with open(os.path.join(base, "partition")) as f:
            suffix = f"/part{f.read().strip()}"
        base = os.path.dirname(os.path.realpath(base))
    except OSError:
        pass
    for rel, label in _DEVICE_IDS:
        try:
            with open(os.path.join(base, rel)) as f:
                v = f.read().strip()
        except OSError:
            continue
        if v:
            return f"{label}:{v}{suffix}"
    return None


def _stat_fields(storage) -> dict:
    """What ``record`` keeps of the open ``storage``'s fstat: ``kind`` "file" (with ``ino``,
    ``size``, ``mtime_ns``) or "block" (with ``rdev`` and ``devid``, ``device_id``); {} when
    it has no file descriptor."""
    fd = getattr(storage, "fd", -1)
    if not isinstance(fd, int) or fd < 0:
        return {}
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return {"kind": "block", "rdev": st.st_rdev, "devid": device_id(st.st_rdev)}
    return {"kind": "file", "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def record(storage, read, size: int) -> dict:
    """The identity of a split copy, to save as ``ImageRecord.copy_id`` (JSON-ready): the
    open ``storage``'s stat fields (``_stat_fields``) and its ``sample`` (hex) and ``zero``
    (bool) over ``size`` bytes read with ``read(offset, view)``. A sample that cannot be read is
    left out (``sample`` None, ``error`` the reason): ``check`` then has the stat fields
    alone. Never raises for the image's I/O; OSError from fstat propagates."""
    ident = _stat_fields(storage)
    try:
        ident["sample"], ident["zero"] = sample(read, size)
    except Exception as e:      # noqa: BLE001 - any read error: no sample, recorded why
        ident["sample"], ident["zero"] = None, False
        ident["error"] = str(e)
    return ident


def marked_by(bitmap):
    """A ``skip(offset, length)`` for ``sample``/``check``: true when RegionBitmap ``bitmap``
    marks a region the byte range touches (an export's writes; a resync copies it anyway)."""
    def skip(off, ln):
        first, last = off // bitmap.region_size, (off + ln - 1) // bitmap.region_size
        return any(bitmap.test_region(r) for r in range(first, last + 1))
    return skip


class Mismatch:
    """Why the image at a path is not (or cannot be shown to be) the recorded copy.
    ``reason``: a sentence for the operator. ``held``: the path names another file than the
    one lvmirrord holds open as the image, which copying every region would not mend (the copy
    goes into the file held, the path is what the next start opens). ``unread``: the image
    could not be read to compare it (it may be the copy)."""

    def __init__(self, reason: str, *, held: bool = False, unread: bool = False):
        self.reason = reason
        self.held = held
        self.unread = unread

    def __repr__(self):
        return f"Mismatch({self.reason!r}, held={self.held}, unread={self.unread})"


def _names_held(storage) -> str | None:
    """None when the path ``storage`` was opened from (``storage.path``) still names the file
    or device it holds open (same st_dev and st_ino, or the same st_rdev for block devices),
    or names nothing now; else why not."""
    path = getattr(storage, "path", None)
    fd = getattr(storage, "fd", -1)
    if path is None:
        return None
    if not isinstance(fd, int) or fd < 0:
        return None
    held = os.fstat(fd)
    try:
        now = os.stat(path)
    except OSError:
        # nothing at the path now (a /dev/mapper link udev has not made again yet, a file
        # moved away): no other file to take for the image; the one held is judged as it is
        # (stop 53: a CI run's dm reload without udev rules left the link missing a while)
        return None
    if stat.S_ISBLK(held.st_mode) and stat.S_ISBLK(now.st_mode):
        same = held.st_rdev == now.st_rdev
    else:
        same = (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
    return None if same else f"{path} names another file than the one lvmirrord holds open"


def check(copy_id: dict | None, storage, read, size: int, skip=None) -> Mismatch | None:
    """None when the image ``storage`` (a StorageImage; ``read(offset, view)`` reads it,
    bounded as the caller's copy reads are) is the split copy ``copy_id`` describes (``record``),
    or when no identity was recorded (``copy_id`` None); else a Mismatch saying why. Reads the
    sample only when the stat fields do not settle it (the module docstring); a read error is
    a Mismatch with ``unread``. ``skip(offset, length)``: sampled ranges an export may have
    written (``marked_by`` its change bitmap), not compared. A ``copy_id`` whose fields have
    the wrong types (a hand-edited volume.json) is a Mismatch. Raises OSError from fstat
    only."""
    if not copy_id:
        return None
    try:
        return _check(copy_id, storage, read, size, skip)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        return Mismatch(f"the identity recorded for the split copy is unreadable ({e!r}) "
                        f"in volume.json")


def _check(copy_id, storage, read, size, skip):
    why = _names_held(storage)
    if why:
        return Mismatch(f"{why} (replaced or moved since the volume was opened)", held=True)
    now = _stat_fields(storage)
    kind = copy_id.get("kind")
    exported = bool(copy_id.get("exported"))
    if now and kind and now["kind"] != kind:
        return Mismatch(f"it is a {now['kind']}, the split copy was a {kind}")
    if kind == "file" and now:
        same_ino = now["ino"] == copy_id["ino"]
        rec_mtime = int(copy_id["mtime_ns"])
        if now["size"] != copy_id["size"]:
            return Mismatch(f"its size is {now['size']} bytes, the split copy's was "
                            f"{copy_id['size']}")
        later = now["mtime_ns"] > rec_mtime
        # an earlier mtime: fdatasync (the split's flush) does not make mtime durable, so a
        # power cut can take the inode's times back - both of them. cp -p, touch -d or a
        # restored backup set an old mtime with a ctime of now
        rolled_back = (same_ino and now["mtime_ns"] < rec_mtime
                       and now["ctime_ns"] <= int(copy_id.get("ctime_ns", now["ctime_ns"])))
        if exported:
            if not same_ino:
                return Mismatch("it is another file than the split copy, which was exported "
                                "as a LUN when lvmirrord last stopped")
            # its LUN's writes moved mtime; they are in the bitmap: compared below
        elif later or (now["mtime_ns"] < rec_mtime and not rolled_back):
            return Mismatch(
                "its modification time changed since the split: it was written by something "
                "other than lvmirror (a file system mounted read-write, fsck) or is another "
                "file, such as an older copy, so regions the change bitmap does not mark may "
                "differ (a copy put back must keep its time to the nanosecond: cp -p, cp -a "
                "or rsync -a do)")
        elif same_ino and now["mtime_ns"] == rec_mtime and (
                now["ctime_ns"] <= int(copy_id.get("ctime_ns", now["ctime_ns"]))
                or copy_id.get("sample") is None):
            # (no sample recorded, a read of it failed at the split: the stat fields alone,
            # as before ctime was looked at - trial 33, LOW)
            return None
        # a later ctime with the same mtime: a chmod, or a write whose mtime was set back by
        # hand (touch -r, cp -p onto it): the sample decides (trial 32, MEDIUM 4)
        # left: another inode with the copy's very time (put back with cp -p), the times a
        # power cut took back, or an export's writes: the sample decides
    elif kind == "block" and now and copy_id.get("devid"):
        if now["devid"] == copy_id["devid"]:
            return None     # the same device; nothing but lvmirror writes a split copy
        if now["devid"] is not None:
            return Mismatch(f"it is another device ({now['devid']}; the split copy was on "
                            f"{copy_id['devid']})")
    want = copy_id.get("sample")
    if want is None:
        return Mismatch("no sample of the split copy was recorded to compare it with ("
                        + (copy_id.get("error") or "none read") + ")")
    if not isinstance(want, list) or len(want) != len(sample_ranges(size)):
        raise ValueError(f"sample of {len(want)} digests for {len(sample_ranges(size))} ranges")
    try:
        got, zero = sample(read, size, skip if exported else None)
    except Exception as e:      # noqa: BLE001 - the read's own error, named to the operator
        return Mismatch(f"its sample could not be read to compare it with the split copy's: {e}",
                        unread=True)
    if any(g is not None and g != w for g, w in zip(got, want)):
        return Mismatch("its content differs from the split copy's (a sample of "
                        f"{SAMPLE_BYTES // 1024} KiB at fixed offsets"
                        + (" outside the regions its LUN wrote" if exported else "") + ")")
    if zero:
        same = (now.get("rdev") == copy_id.get("rdev") if kind == "block" else
                now.get("ino") == copy_id.get("ino"))
        if not same:
            return Mismatch("it is another " + ("device" if kind == "block" else "file")
                            + " whose sampled blocks are all zeros, as the split copy's were, "
                              "which does not show it is the copy")
    return None


def _reader(vol, img):
    """The bounded reader of image ``img``'s sample (``resync._read_source``)."""
    return lambda off, view: _read_source(vol, img, off, view, "a read of its sample")


def record_leg(vol, img) -> dict | None:
    """``record`` of image ``img`` (a Leg) of volume ``vol``, its sample read as a copy reads
    its source: bounded by ``leg_timeout`` (``resync._read_source``); None when the image is
    not open. Called with no write to the image in flight (after a split's drain, at the end of
    an export, before a full restore makes the file the copy). OSError from fstat is logged
    and gives None, as for an image split by an older lvmirror."""
    if img.storage is None:
        return None
    try:
        return record(img.storage, _reader(vol, img), vol.size)
    except OSError as e:
        log.warning("volume %s: image %s: identity of the split copy not recorded: %s",
                    vol.name, img.rec.path, e)
        return None


def check_leg(vol, img) -> Mismatch | None:
    """``check`` of image ``img`` (a Leg) of volume ``vol`` against its recorded
    ``rec.copy_id``, reading as ``record_leg`` does; None when nothing is recorded or the image
    is not open. An OSError from fstat is a Mismatch naming it."""
    st = img.storage
    if st is None or not img.rec.copy_id:
        return None
    skip = marked_by(img.bitmap) if img.bitmap is not None else None
    try:
        return check(img.rec.copy_id, st, _reader(vol, img), vol.size, skip)
    except OSError as e:
        return Mismatch(f"it cannot be examined ({e})", unread=True)
