"""Backup from a split image: copy the frozen point-in-time copy to a file, raw or qcow2.

A split image receives no I/O from the volume, so it can be read directly while the LUN keeps
running. Raw copies keep holes (SEEK_DATA/SEEK_HOLE) so a thin image stays thin; qcow2 goes
through ``qemu-img convert``. A new copy is created readable by its owner only (0600) in either
format: it holds the LUN's data. Refused unless the image is split: copying a live image would
not be a point-in-time copy. A backup is reported done only once the copy and its directory
entry are durable (fsync of both; ``qemu-img convert`` writes through its default cache, so
the qcow2 file is fsynced after it), as the durability rule of ``lvmirror.mirror.durability``
asks of every state that vouches for data.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile

CHUNK = 4 << 20


def backup_image(image: dict, dest: str, *, fmt: str = "raw", progress=None,
                 size: int | None = None) -> int:
    """Copy ``image`` (a status entry: index, path, state) to ``dest``; returns bytes copied.
    ``progress(done, total)`` is called as it goes. ``size``: the volume's size in bytes; the
    copy holds that much, not the rest of a larger device (whose bytes past the volume may be
    another user's old data); None: the whole image."""
    if image["state"] != "split":
        raise ValueError(f"image {image['index']} is {image['state']}; only a split image is a "
                         f"point-in-time copy (split it first)")
    if fmt not in ("raw", "qcow2"):
        raise ValueError(f"format must be raw or qcow2, got {fmt!r}")
    src = image["path"]
    if os.path.exists(dest) and os.path.samefile(src, dest):
        raise ValueError(f"{dest} is the image itself")
    drop_cache(src)
    if fmt == "qcow2":
        if shutil.which("qemu-img") is None:
            raise ValueError("qcow2 needs qemu-img (Debian package qemu-utils)")
        # a new copy is its owner's alone in either format, whatever the caller's umask
        r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, dest],
                           capture_output=True, text=True, umask=0o077)
        if r.returncode:
            raise OSError(f"qemu-img convert failed: {r.stderr.strip()}")
        whole = _size_of(src)
        if size is not None and size < whole:       # drop what lies past the volume
            r = subprocess.run(["qemu-img", "resize", "-f", "qcow2", "--shrink", dest,
                                str(size)], capture_output=True, text=True)
            if r.returncode:
                raise OSError(f"qemu-img resize failed: {r.stderr.strip()}")
        make_durable(dest)
        done = whole if size is None else min(size, whole)
        if progress:
            progress(done, done)
        return done
    return _copy_sparse(src, dest, progress, size)


def held_backup(mgr, volume: str, image: int, dest: str, *, fmt: str = "raw",
                progress=None) -> int:
    """Copy split image ``image`` of ``volume`` to ``dest`` (raw or qcow2) while lvmirrord
    holds it: ``mgr`` is the ``org.lvmirror1.Manager`` interface (dbus-python). BeginBackup
    checks the image (split, its split finished, still the copy its split recorded:
    ``mirror/copyid``; ``dest`` not an image) and refuses resync, restore, detach and a
    writable export of it from then on; EndBackup ends the hold with the result. The copy is
    made here, by the caller, which may write where lvmirrord's sandbox may not (ProtectHome,
    ProtectSystem), into a new file of its own beside ``dest`` (``new_partial``), renamed to
    ``dest`` only once lvmirrord has vouched for it (the backup cycle's way): a failed or
    unvouched copy never sits under the name, and two copies to one ``dest`` never share a
    file.
    If this process dies the hold ends with its bus connection; ``lvmirror cancel VOLUME
    IMAGE`` ends one whose copier is gone otherwise. Returns the bytes copied.
    dbus.DBusException from lvmirrord (refused); OSError/ValueError from the copy, reported
    to lvmirrord as the backup's failure first, or when the hold was lost before the end (the
    volume's process restarted, the hold cancelled): the copy is then not vouched for."""
    import dbus
    dest = os.path.abspath(dest)
    check_dest(dest)
    try:
        # (lvmirrord may wait for the lock a restore's flush holds: no 25 s default timeout)
        held = json.loads(mgr.BeginBackup(volume, dbus.UInt32(image), dest,
                                          timeout=BEGIN_TIMEOUT))
    except BaseException:
        _end_failed(mgr, volume, image, "its BeginBackup did not return")
        raise
    entry = dict(index=image, path=held["path"], state=held["state"])
    partial = None
    try:
        partial = new_partial(dest)
        n = backup_image(entry, partial, fmt=fmt, progress=progress, size=held["size"])
    except BaseException as exc:
        if partial:
            discard(partial)          # first: a second Ctrl-C in the D-Bus call below left it
        _end_failed(mgr, volume, image, "interrupted" if isinstance(exc, KeyboardInterrupt)
                    else str(exc) or type(exc).__name__)
        if isinstance(exc, OSError):
            # named by DEST, not by the copy's own file beside it
            msg = (f"backup of image {image} of volume {volume} to {dest} failed: "
                   f"{exc.strerror or exc}")
            raise (OSError(exc.errno, msg) if exc.errno is not None else OSError(msg)) from exc
        raise
    # from "done" to the rename, Ctrl-C and SIGTERM wait (a backup recorded done whose file
    # an interrupt kept from its name was a false "done": second review of 2026-12-06)
    held_signals = _block_interrupts()
    try:
        return _vouch_and_publish(mgr, volume, image, dest, partial, n)
    finally:
        _unblock(held_signals)


def _vouch_and_publish(mgr, volume, image, dest, partial, n) -> int:
    """EndBackup as done, then the copy ``partial`` renamed to ``dest`` (``held_backup``)."""
    import dbus
    try:
        mgr.EndBackup(volume, dbus.UInt32(image), dbus.Dictionary(
            {"state": "done", "bytes": dbus.UInt64(n)}, signature="sv"))
    except dbus.DBusException as exc:
        discard(partial)
        raise OSError(f"the copy of image {image} of volume {volume} is not vouched for: "
                      f"lvmirrord no longer held the image at its end, so it may have changed "
                      f"during the copy ({exc.get_dbus_message() or exc}); nothing was written "
                      f"to {dest}: make the backup again") from None
    except BaseException:
        discard(partial)
        raise
    try:
        os.replace(partial, dest)
    except BaseException as exc:
        discard(partial)
        if isinstance(exc, OSError):
            raise OSError(exc.errno, f"the copy of image {image} of volume {volume} was made "
                                     f"but could not be put at {dest} ({exc.strerror or exc}); "
                                     f"make the backup again") from exc
        raise
    try:
        _fsync_dir(dest)
    except OSError as exc:
        raise OSError(exc.errno, f"the backup is at {dest}, but its directory entry could "
                                 f"not be made durable ({exc.strerror or exc}): a power cut "
                                 f"may lose it") from exc
    return n


def _block_interrupts():
    """Hold SIGINT and SIGTERM back (in the main thread); returns what to restore, or None
    where signals cannot be blocked here."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _unblock(old) -> None:
    """Undo ``_block_interrupts``: a signal that came meanwhile is delivered now."""
    import signal
    if old is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def check_dest(dest: str) -> None:
    """ValueError unless backup destination ``dest`` (absolute) is a new name or a regular
    file in an existing directory: a copy is made beside it and renamed over it
    (``publish``), which would replace a device node or a symlink rather than write through
    it. An existing file is replaced, not written into: the backup is a new file, 0600,
    owned by its maker (the old file's owner, mode, ACLs and other hard links stay with the
    old file)."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ValueError(f"backup destination {dest} is a directory; give the backup file's "
                         f"name (e.g. {os.path.join(dest, 'backup.img')})")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ValueError(f"backup destination {dest} is not a regular file (a backup is a "
                         f"file, made beside it and renamed over it, which would replace "
                         f"a symlink or a device node)")
    if not os.path.isdir(os.path.dirname(dest)):
        raise ValueError(f"backup destination {dest}: no directory "
                         f"{os.path.dirname(dest)}")


def dest_key(path: str) -> str:
    """Backup destination ``path`` as two are compared (one destination takes one backup at
    a time): its directory's real path (symlinks, ``..`` and ``//`` resolved) joined with
    its name."""
    return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))),
                        os.path.basename(path))


def new_partial(dest: str) -> str:
    """Create the file a copy to ``dest`` (absolute) is made in, and return its path: new
    and empty (O_EXCL), mode 0600, beside ``dest`` as ``<name>.<random>.partial``
    (``tempfile.mkstemp``), so that two copies to one destination, or a copy and the leftover
    of an interrupted one, never write one file. A fixed ``dest.partial`` opened with O_TRUNC
    let a second copier empty the first's copy, which the first then renamed into place as a
    finished backup (trial of 2026-12-06, HIGH). OSError if the directory is not
    writable."""
    fd, path = tempfile.mkstemp(dir=os.path.dirname(dest),
                                prefix=os.path.basename(dest) + ".", suffix=".partial")
    os.close(fd)
    return path


def publish(partial: str, dest: str) -> None:
    """Give the finished copy ``partial`` its name ``dest`` (rename, atomic) and make the
    rename durable (fsync of the directory). OSError."""
    os.replace(partial, dest)
    _fsync_dir(dest)


BEGIN_TIMEOUT = 3600.0   # seconds held_backup waits for BeginBackup (a restore's flush first)


def _end_failed(mgr, volume, image, why) -> None:
    """EndBackup as failed, best effort: the error being raised is the one to report."""
    import dbus
    try:
        mgr.EndBackup(volume, dbus.UInt32(image), dbus.Dictionary(
            {"state": "failed", "error": why}, signature="sv"))
    except dbus.DBusException:
        pass


def discard(path) -> None:
    """Remove the file at ``path`` if it is there (a copy that will not be a backup)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def _size_of(path: str) -> int:
    """Bytes in the file or block device ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    """Drop what this host's page cache holds of ``path`` (posix_fadvise POSIX_FADV_DONTNEED;
    for a block device, its buffer cache), so that a copy reads what is on the disk. On shared
    storage another gateway writes the images (O_DIRECT) and Linux does not invalidate this
    host's cache for another host's writes: pages cached here before (udev's probe of the disk
    at boot, an earlier backup, this gateway's own time as the owner) would go into the backup
    instead. Dirty pages are written back, not dropped, so a volume opened without O_DIRECT
    loses nothing. OSError if ``path`` cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_durable(path: str) -> None:
    """fsync the file at ``path`` and its directory (raises OSError)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _copy_sparse(src, dest, progress, limit=None):
    """Copy ``src`` to a new ``dest`` of the same size, leaving holes where ``src`` has them
    (SEEK_DATA/SEEK_HOLE) and where a chunk reads as zeroes; returns the bytes written. A
    block device has no SEEK_DATA (Linux's blkdev_llseek answers EINVAL): it is read whole,
    its zero chunks left as holes. (An EINVAL taken for "nothing left" once made every backup
    of a block-device image a file of zeroes: the two-gateway lab found it.)"""
    fin = os.open(src, os.O_RDONLY)
    try:
        size = os.lseek(fin, 0, os.SEEK_END)
        if limit is not None:
            size = min(size, limit)
        fout = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fout, size)
            done = pos = 0
            while pos < size:
                try:
                    data_start = os.lseek(fin, pos, os.SEEK_DATA)
                    if data_start >= size:            # data only past the volume
                        break
                    hole = min(os.lseek(fin, data_start, os.SEEK_HOLE), size)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:      # only a hole is left
                        break
                    if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    data_start, hole = pos, size      # no SEEK_DATA here: read it all
                off = data_start
                while off < hole:
                    n = min(CHUNK, hole - off)
                    buf = os.pread(fin, n, off)
                    if not buf:
                        raise OSError(errno.EIO, f"{src}: read nothing at offset {off} of "
                                                 f"{size} bytes")
                    if buf.count(0) != len(buf):      # zeroes stay a hole
                        os.pwrite(fout, buf, off)
                        done += len(buf)
                    off += len(buf)
                    if progress:
                        progress(off, size)
                pos = hole
            os.fsync(fout)
        finally:
            os.close(fout)
        _fsync_dir(dest)
    finally:
        os.close(fin)
    if progress:
        progress(size, size)
    return done
