"""Checks before a file or block device becomes an image that lvmirror will overwrite.

A new secondary image (every image but the first of ``MirrorVolume.create``; every image of
``attach``) is overwritten by a full resync from the source. A mistyped path must not destroy
data, so, as ``mdadm --create`` and ``pvcreate`` refuse (or ask about) a device that carries
data or a signature, and as LIO's iblock backstore opens its block devices exclusively:

* ``refuse_if_holds_data``: a secondary image that already holds data (a non-zero byte, and
  where it is cheap a named signature: file system superblock, LVM2 label, md superblock,
  partition table, qcow2 header...) is refused with a ConfigError saying what was found,
  unless the administrator says ``force`` (cfgstring ``force=1``, ``lvmirror attach --force``).
  A new sparse file, or an existing one that reads as zeroes, is accepted.
* ``check_not_in_other_volume``: a path that is a current image of another volume of the state
  directory (compared by real path and, when it exists, by device and inode, or by device
  number for a block device) is refused at create and attach. ``force`` does not override it:
  two volumes writing one file is never right.
* ``check_distinct``: the same file named twice in one volume (another spelling, a symlink,
  a second device node) is refused.
* ``busy_message``: StorageImage.open opens block devices with O_EXCL (as LIO's iblock does);
  when that fails with EBUSY the message names the holder: a device-mapper or md device built
  on it (``/sys/class/block/<dev>/holders``), a mounted file system (``/proc/self/mountinfo``),
  a swap area (``/proc/swaps``), on the device or one of its partitions; else "in use by
  another program". O_EXCL means nothing for regular files; the cross-volume check covers
  them.

The checks do not run when a volume is opened (its images hold the volume's data) nor when a
split or failed image is resynced: only a path that is becoming an image is checked.

``claim_lock`` serialises check-then-record within one process (two creates or attaches naming
the same path at once): MirrorVolume.create and JobControl.attach hold it from the check until
the volume's metadata naming the new image is saved.
"""

from __future__ import annotations

import dataclasses
import errno as _errno
import json
import os
import shutil
import stat
import struct
import subprocess
import threading

from lvmirror import rawtext
from lvmirror.errors import ConfigError

__all__ = ["Contents", "EDGE_BYTES", "SCAN_LIMIT", "block_holders", "busy_message",
           "check_distinct", "check_exclusive", "check_not_in_other_volume", "claim_lock",
           "identity", "images_in_use", "probe", "refuse_if_holds_data"]

SCAN_LIMIT = 64 << 20     # bytes of a file's allocated extents read, at most, from its start
EDGE_BYTES = 4 << 20      # bytes read at each end of a block device (and at a long file's end)
_CHUNK = 1 << 20
_HEAD = 128 << 10         # where the signatures below live (btrfs's is at 64 KiB + 64)

claim_lock = threading.RLock()


# -- what an image holds -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Contents:
    """What ``probe`` found in a file or block device.

    ``first_nonzero``: byte offset of the first non-zero byte read (None: everything read was
    zero); ``allocated``: bytes a regular file has allocated on disk (``st_blocks`` * 512; None
    for a block device); ``size``: bytes; ``signature``: a known on-disk format found
    ("ext4 file system superblock", "LVM2 physical volume label"...), or None; ``scanned``: what
    was read, in words, for the message."""

    path: str
    is_block_device: bool
    size: int
    allocated: int | None
    first_nonzero: int | None
    signature: str | None
    scanned: str

    @property
    def holds_data(self) -> bool:
        """True if a non-zero byte was read (``first_nonzero`` is set): what
        ``refuse_if_holds_data`` refuses without ``force``. A new, sparse or all-zero image holds
        none."""
        return self.first_nonzero is not None

    def describe(self) -> str:
        """E.g. ``first non-zero byte at offset 0; 8 MiB allocated; ext4 file system
        superblock``."""
        parts = []
        if self.first_nonzero is not None:
            parts.append(f"first non-zero byte at offset {self.first_nonzero}")
        if self.allocated is not None:
            parts.append(f"{_human(self.allocated)} allocated")
        else:
            parts.append(f"{_human(self.size)} block device, {self.scanned}")
        if self.signature:
            parts.append(self.signature)
        return "; ".join(parts)


def _human(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"


def _first_nonzero(buf: bytes) -> int | None:
    if buf.count(0) == len(buf):
        return None
    return len(buf) - len(buf.lstrip(b"\0"))


def _pread(fd, n, off) -> bytes:
    try:
        return os.pread(fd, n, off)
    except OSError:
        return b""


def _scan(fd, start, end, budget) -> tuple[int | None, int]:
    """First non-zero byte in [start, end) reading at most ``budget`` bytes; returns
    (offset or None, bytes read)."""
    pos, done = start, 0
    while pos < end and done < budget:
        n = min(_CHUNK, end - pos, budget - done)
        buf = os.pread(fd, n, pos)
        if not buf:
            break
        k = _first_nonzero(buf)
        if k is not None:
            return pos + k, done + len(buf)
        pos += len(buf)
        done += len(buf)
    return None, done


def _extents(fd, size):
    """Allocated extents [start, end) of a regular file, by SEEK_DATA/SEEK_HOLE (the whole file
    as one extent where the file system does not support them)."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == _errno.ENXIO:
                return                      # nothing allocated after pos
            if e.errno in (_errno.EINVAL, _errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        hole = min(hole, size)
        if hole <= data:
            return
        yield data, hole
        pos = hole


def probe(path, *, scan_limit: int = SCAN_LIMIT, edge: int = EDGE_BYTES,
          use_blkid: bool = True) -> Contents:
    """Find out whether the file or block device at ``path`` holds data.

    Bounded cost:

    * a regular file: only its allocated extents are read (SEEK_DATA/SEEK_HOLE; holes are
      zeroes), at most ``scan_limit`` bytes (default 64 MiB) of them from the start, then its
      last ``edge`` bytes (default 4 MiB). A sparse file costs nothing; a file whose only
      non-zero bytes lie beyond the first ``scan_limit`` allocated bytes and before its last
      ``edge`` bytes is not seen as holding data (a 10 GiB file of zeroes made with dd is read
      for 68 MiB, not 10 GiB, and accepted);
    * a block device: its first and last ``edge`` bytes (where partition tables, file system,
      LVM2 and md superblocks live); data only in the middle of a device is not seen.

    When data is found its format is named where that is cheap: ext2/3/4, XFS, btrfs, swap,
    LUKS, LVM2 label, md superblock (0.90, 1.0, 1.1, 1.2), GPT or DOS partition table, qcow2,
    VMDK, VHDX, NTFS, FAT, ISO 9660 (pure Python), else ``blkid -p`` (util-linux) when
    installed and ``use_blkid``.

    ``path``: str or PathLike. Returns a ``Contents``. Raises ConfigError when the path cannot
    be opened for reading or is neither a regular file nor a block device.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"image {path}: cannot open to check its contents: "
                          f"{e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
            first, _ = _scan(fd, 0, size, edge)
            if first is None and size > edge:
                tail = max(edge, size - edge)
                first, _ = _scan(fd, tail, size, edge)
            scanned = (f"its first and last {_human(edge)} read" if size > 2 * edge
                       else "all of it read")
            allocated = None
            blk = True
        elif stat.S_ISREG(st.st_mode):
            size = st.st_size
            allocated = st.st_blocks * 512
            first, done, covered = None, 0, 0
            for start, end in _extents(fd, size):
                if done >= scan_limit:
                    break
                first, n = _scan(fd, start, end, scan_limit - done)
                done += n
                covered = start + n
                if first is not None:
                    break
            if first is None and done >= scan_limit and size - edge > covered:
                tail = size - edge
                for start, end in _extents(fd, size):
                    if end <= tail:
                        continue
                    first, _ = _scan(fd, max(start, tail), end, edge)
                    if first is not None:
                        break
            scanned = (f"the first {_human(scan_limit)} of its allocated extents and its last "
                       f"{_human(edge)} read" if done >= scan_limit else
                       "every allocated extent read")
            blk = False
        else:
            raise ConfigError(f"image {path}: not a regular file or block device")
        signature = None
        if first is not None:
            signature = _signature(fd, size)
            if signature is None and use_blkid:
                signature = _blkid(path)
        return Contents(path=path, is_block_device=blk, size=size, allocated=allocated,
                        first_nonzero=first, signature=signature, scanned=scanned)
    except OSError as e:
        raise ConfigError(f"image {path}: cannot read to check its contents: "
                          f"{e.strerror}") from None
    finally:
        os.close(fd)


_MD_MAGIC = 0xA92B4EFC


def _signature(fd, size) -> str | None:
    """A known on-disk format at its usual place (a few small reads), or None."""
    head = _pread(fd, _HEAD, 0)
    head += bytes(max(0, _HEAD - len(head)))

    def at(off, n):
        return head[off:off + n]

    if at(1080, 2) == b"\x53\xef":                  # ext2/3/4: s_magic at 1024 + 0x38
        compat, incompat = struct.unpack_from("<I", head, 1024 + 0x5C)[0], \
            struct.unpack_from("<I", head, 1024 + 0x60)[0]
        kind = "ext4" if incompat & 0x2C0 else "ext3" if compat & 0x4 else "ext2"
        return f"{kind} file system superblock"
    if at(0, 4) == b"XFSB":
        return "XFS file system superblock"
    if at(65536 + 64, 8) == b"_BHRfS_M":
        return "btrfs file system superblock"
    if at(0, 6) == b"LUKS\xba\xbe":
        return "LUKS encryption header"
    for s in range(4):
        if at(s * 512, 8) == b"LABELONE" and at(s * 512 + 24, 8) == b"LVM2 001":
            return "LVM2 physical volume label (pvcreate)"
    for off, ver in ((4096, "1.2"), (0, "1.1")):
        if struct.unpack_from("<I", head, off)[0] == _MD_MAGIC:
            return f"md RAID superblock (metadata {ver})"
    sectors = size >> 9
    for off, ver in (((((sectors - 16) & ~7) << 9), "1.0"),
                     ((((sectors & ~127) - 128) << 9), "0.90")):
        if off > 0 and struct.unpack("<I", (_pread(fd, 4, off) + bytes(4))[:4])[0] == _MD_MAGIC:
            return f"md RAID superblock (metadata {ver})"
    if at(0, 4) == b"QFI\xfb":
        return "qcow2 image header"
    if at(0, 4) == b"KDMV":
        return "VMDK image header"
    if at(0, 8) == b"vhdxfile":
        return "VHDX image header"
    if at(4086, 10) in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap area signature (mkswap)"
    if at(512, 8) == b"EFI PART" or at(4096, 8) == b"EFI PART":
        return "GPT partition table"
    if at(3, 8) == b"NTFS    ":
        return "NTFS file system boot sector"
    if at(54, 5) in (b"FAT12", b"FAT16") or at(82, 5) == b"FAT32":
        return "FAT file system boot sector"
    if at(510, 2) == b"\x55\xaa":
        if any(head[446 + 16 * k + 4] for k in range(4)):
            return "DOS (MBR) partition table"
        return "boot sector signature (0x55AA)"
    if at(32769, 5) == b"CD001":
        return "ISO 9660 file system"
    return None


def _blkid(path) -> str | None:
    """``blkid -p`` (low-level superblock probe, util-linux) names what it finds, or None."""
    exe = shutil.which("blkid") or next((p for p in ("/usr/sbin/blkid", "/sbin/blkid")
                                         if os.access(p, os.X_OK)), None)
    if exe is None:
        return None
    try:
        r = subprocess.run([exe, "-p", "-o", "export", "--", path], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    kv = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    if kv.get("PTTYPE"):
        return f"{kv['PTTYPE']} partition table (blkid)"
    if kv.get("TYPE"):
        usage = kv.get("USAGE", "signature")
        return f"{kv['TYPE']} {usage} signature (blkid)"
    return None


def refuse_if_holds_data(path, *, force: bool = False, what: str = "", hint: str = "",
                         scan_limit: int = SCAN_LIMIT, edge: int = EDGE_BYTES) -> Contents | None:
    """Refuse (ConfigError) to make ``path`` a secondary image that a full resync overwrites
    when it already holds data, unless ``force``; the rule of ``mdadm --create`` and
    ``pvcreate``, which refuse or ask when a device carries data or a signature.

    ``what``: the consequence, for the message (e.g. "making it image 1 of volume vol0 would
    overwrite it with a copy of /srv/a.img"); ``hint``: how to say force in the caller's
    interface. The message reads ``image PATH holds data (first non-zero byte at offset N;
    M MiB allocated; SIGNATURE): WHAT; refused ... HINT``. Cost bounds: see ``probe``.
    Returns the Contents when ``force`` let data through (for the caller's log), else None.
    Raises ConfigError when the path holds data and ``force`` is false, or cannot be read."""
    c = probe(path, scan_limit=scan_limit, edge=edge)
    if not c.holds_data:
        return None
    if force:
        return c
    msg = f"image {c.path} holds data ({c.describe()})"
    if what:
        msg += f": {what}"
    msg += ("; refused, as mdadm --create and pvcreate refuse a device that carries data "
            "(a new sparse file or one that reads as zeroes is accepted)")
    if hint:
        msg += f". {hint}"
    raise ConfigError(msg)


def check_create_secondary(name: str, paths, k: int, *, force: bool = False) -> Contents | None:
    """``refuse_if_holds_data`` for image ``k`` (>= 1) of volume ``name`` being created from
    ``paths`` (its first image is the source the full resync copies). One message for
    MirrorVolume.create and targetcli's CheckConfig (``cfgstring.check``)."""
    return refuse_if_holds_data(
        paths[k], force=force,
        what=f"making it image {k} of volume {name} would overwrite it with a full copy of "
             f"{os.fspath(paths[0])}",
        hint="To overwrite it, say so explicitly: add ';force=1' to the LUN's cfgstring")


# -- identity of a path -----------------------------------------------------------------------

def identity(path) -> tuple:
    """What names the storage behind ``path``: ``("blk", st_rdev)`` for a block device,
    ``("file", st_dev, st_ino)`` for an existing file, ``("path", realpath)`` for a missing one
    (symlinks resolved)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev)
    return ("file", st.st_dev, st.st_ino)


def same_storage(a: str, b: str, ida: tuple | None = None, idb: tuple | None = None) -> bool:
    """True when paths ``a`` and ``b`` name the same storage: the same real path, or the same
    ``identity`` (file by device and inode, block device by device number). ``ida``/``idb``:
    their identities if known already."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    ida = ida if ida is not None else identity(a)
    idb = idb if idb is not None else identity(b)
    return ida[0] != "path" and ida == idb


def check_distinct(paths, *, name: str) -> None:
    """Refuse (ConfigError) a list of image paths of volume ``name`` that names one file or
    device twice: the same string, another spelling, a symlink to it, or another device node
    with the same device number. ``paths``: sequence of str or PathLike."""
    paths = [os.fspath(p) for p in paths]
    ids = [identity(p) for p in paths]
    for i in range(len(paths)):
        for j in range(i):
            if not same_storage(paths[i], paths[j], ids[i], ids[j]):
                continue
            if os.path.abspath(paths[i]) == os.path.abspath(paths[j]):
                raise ConfigError(f"volume {name}: an image path is listed twice: {paths[i]}")
            kind = "device" if ids[i][0] == "blk" else "file"
            raise ConfigError(f"volume {name}: image path {paths[i]} is the same {kind} as "
                              f"{paths[j]} (real path {os.path.realpath(paths[j])}): an image "
                              f"path is listed twice")


def images_in_use(meta_dir, *, exclude: str | None = None) -> list[tuple[str, str]]:
    """(volume name, image path) of every current image of every volume in ``meta_dir`` but
    ``exclude``. Reads each ``<meta_dir>/<volume>/volume.json`` (a file that does not parse is
    read for its image paths as far as it can be)."""
    meta_dir = os.fspath(meta_dir)
    try:
        names = sorted(os.listdir(meta_dir))
    except OSError:
        return []
    out = []
    for vname in names:
        if vname == exclude:
            continue
        try:
            with open(os.path.join(meta_dir, vname, "volume.json"), "rb") as f:
                d = json.loads(f.read())
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        images = d.get("images") if isinstance(d, dict) else None
        for im in images if isinstance(images, list) else []:
            p = im.get("path") if isinstance(im, dict) else None
            if isinstance(p, str) and p:
                out.append((vname, p))
    return out


def check_not_in_other_volume(paths, meta_dir, *, name: str) -> None:
    """Refuse (ConfigError, naming the other volume and its image path) an image path of
    volume ``name`` that is a current image of another volume in ``meta_dir``: by real path,
    and for paths that exist by device and inode (files) or device number (block devices).
    ``paths``: sequence of str or PathLike. Not overridden by ``force``."""
    used = images_in_use(meta_dir, exclude=name)
    if not used:
        return
    used_ids = [(v, p, identity(p)) for v, p in used]
    for path in (os.fspath(p) for p in paths):
        pid = identity(path)
        for vname, other, oid in used_ids:
            if same_storage(path, other, pid, oid):
                also = "" if os.path.abspath(path) == os.path.abspath(other) else \
                    f" (as {other}, the same {'device' if pid[0] == 'blk' else 'file'})"
                raise ConfigError(f"image {path} is an image of volume {vname!r}{also}; two "
                                  f"volumes must not write the same storage. Detach it from "
                                  f"{vname!r} first (lvmirror detach), or name another path")


# -- exclusive open of block devices (LIO iblock's rule) --------------------------------------

def _read(path) -> str | None:
    """A sysfs file's text, stripped (``rawtext.decode``: a dm name that is not UTF-8 does not
    raise); None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return rawtext.decode(f.read()).strip()
    except OSError:
        return None


def _unescape(s: str) -> str:
    """Octal escapes of /proc mountinfo and swaps (``\\040`` for a space); a backslash not
    followed by three octal digits stays as it is."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and all(c in "01234567" for c in s[i + 1:i + 4]):
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[tuple[str, str, str, str]]:
    """The mounts listed in ``path`` (proc(5) mountinfo) as ``(major:minor, mount point, type,
    source)``. The kernel separates fields with single spaces, escapes space, tab, newline and
    backslash in paths as octal and writes every other byte raw (not always UTF-8), so the file
    is parsed as bytes, split on b"\\n" and b" " only; the type and source are the fields after
    the lone "-" that ends the optional fields (index 6 on); paths are unescaped and decoded as
    file names (``os.fsdecode``). A line without that "-" is skipped; [] when the file cannot
    be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    out = []
    for line in data.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) < 7 or b"-" not in fields[6:]:
            continue
        post = fields[fields.index(b"-", 6) + 1:]
        fstype, source = (post + [b"", b""])[:2]
        out.append((fields[2].decode("ascii", "replace"), _unescape(os.fsdecode(fields[4])),
                    fstype.decode("ascii", "replace"), _unescape(os.fsdecode(source))))
    return out


def read_swaps(path: str = "/proc/swaps") -> list[str] | None:
    """The swap areas in use listed in ``path`` (proc(5) swaps: a "Filename" header, then one
    area a line, its file name first, octal-escaped), or None when the file cannot be read or
    does not start with that header."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    if not lines[0].startswith(b"Filename"):
        return None
    return [_unescape(os.fsdecode(ln.split()[0])) for ln in lines[1:] if ln.split()]


def block_holders(rdev: int, *, sys_root: str = "/sys", proc_root: str = "/proc") -> list[str]:
    """Who holds the block device with device number ``rdev`` (``st_rdev``) or one of its
    partitions, in words: ``dm-0 (device-mapper vg0-lv0)``, ``md0 (md RAID array)``,
    ``/dev/sdb1 mounted at /srv (ext4)``, ``swap area /dev/sdb2``. Empty when nothing is found
    (another program holds it open with O_EXCL). ``sys_root``/``proc_root``: where sysfs and
    procfs are (tests pass a fake tree). Reads ``<sys_root>/dev/block/MAJ:MIN`` (its
    ``holders/`` and those of the partition subdirectories), ``<proc_root>/self/mountinfo`` and
    ``<proc_root>/swaps``. Never raises for a missing file."""
    devdir = os.path.realpath(os.path.join(sys_root, "dev", "block",
                                           f"{os.major(rdev)}:{os.minor(rdev)}"))
    kname = os.path.basename(devdir)
    # the device and its partitions: (kernel name, "MAJ:MIN", sysfs dir)
    nodes = [(kname, f"{os.major(rdev)}:{os.minor(rdev)}", devdir)]
    try:
        for entry in sorted(os.listdir(devdir)):
            sub = os.path.join(devdir, entry)
            if os.path.exists(os.path.join(sub, "partition")):
                nodes.append((entry, _read(os.path.join(sub, "dev")) or "", sub))
    except OSError:
        pass
    found = []
    for node, _, d in nodes:
        try:
            holders = sorted(os.listdir(os.path.join(d, "holders")))
        except OSError:
            holders = []
        for h in holders:
            hdir = os.path.join(sys_root, "class", "block", h)
            dm = _read(os.path.join(hdir, "dm", "name"))
            if dm is not None:
                kind = f"device-mapper {dm}"
            elif os.path.isdir(os.path.join(hdir, "md")) or h.startswith("md"):
                level = _read(os.path.join(hdir, "md", "level"))
                kind = f"md RAID array{', ' + level if level else ''}"
            else:
                kind = "a stacked block device"
            on = "" if node == kname else f" on partition {node}"
            found.append(f"held by {h} ({kind}){on}")
    majmin = {mm: node for node, mm, _ in nodes if mm}
    for mm_, mount_point, fstype, source in read_mountinfo(
            os.path.join(proc_root, "self", "mountinfo")):
        node = majmin.get(mm_)
        if node is None and source.startswith("/dev/"):
            try:
                sst = os.stat(source)
                if stat.S_ISBLK(sst.st_mode):
                    node = next((n for n, mm, _ in nodes
                                 if mm == f"{os.major(sst.st_rdev)}:{os.minor(sst.st_rdev)}"),
                                None)
            except OSError:
                pass
        if node is not None:
            found.append(f"/dev/{node} mounted at {mount_point} ({fstype})")
    for src in read_swaps(os.path.join(proc_root, "swaps")) or []:
        if os.path.basename(src) in majmin.values():
            found.append(f"swap area {src}")
    # a path's bytes that are not UTF-8 (surrogates after os.fsdecode) as \xNN: the message
    # goes out over D-Bus, which carries only UTF-8 strings
    return [rawtext.shown(f) for f in dict.fromkeys(found)]


def busy_message(path, rdev: int, *, sys_root: str = "/sys", proc_root: str = "/proc") -> str:
    """The ConfigError text for an exclusive open of block device ``path`` that failed with
    EBUSY, naming the holder (``block_holders``) or saying another program holds it."""
    holders = block_holders(rdev, sys_root=sys_root, proc_root=proc_root)
    who = "; ".join(holders) if holders else \
        "in use by another process (opened exclusively: a mount, LVM, md, another lvmirrord " \
        "volume or a LIO iblock backstore)"
    return (f"image {os.fspath(path)}: the block device is busy: {who}; lvmirrord opens block "
            f"devices exclusively (O_EXCL), as LIO's iblock backstore does, so that no other "
            f"user writes to an image")


def check_exclusive(path) -> None:
    """Open block device ``path`` with O_EXCL and close it at once: ConfigError
    (``busy_message``) when another user holds it. Nothing happens for other kinds of path.
    For checks before the image is really opened (targetcli's CheckConfig)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISBLK(st.st_mode):
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == _errno.EBUSY:
            raise ConfigError(busy_message(path, st.st_rdev)) from None
        return          # permission and the like: StorageImage.open reports them
    os.close(fd)
