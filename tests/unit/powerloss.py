"""A power-loss model for host tests (no tests here).

A ``Machine`` is one boot of a server. Images opened through ``machine.opener`` are real files
(``VolatileImage``, a StorageImage): what the volume writes lands in the file at once - that is
the page cache every later read sees - and is also tracked as *volatile* until a flush
(``fdatasync``) or a FUA write makes it durable: then its bytes are copied into the image's
*durable* shadow. lvmirror's metadata files are written with fsync (``bitmap.atomic_write``), so
they are durable as soon as they are saved.

``machine.cut(dest)`` is the power cut: under one lock that every metadata save and every image
flush also takes (``install`` patches ``atomic_write``), it copies the state directory as saved
and each image's durable shadow into ``dest``, and returns the ``Machine`` that boots from
them. The old machine's threads may go on (they write only its own files); the test closes it.
``Machine.cut_after_save(pred)`` cuts right after the first metadata save for which
``pred(path, data)`` is true, inside the same critical section, so no other save or flush can
slip between the save and the cut: the window a real power cut may hit.

This models the page cache and a disk's volatile write cache being lost; the kernel lab's
power-cut scenarios (lab/powercut) cut a real guest's power for the same checks.
"""

from __future__ import annotations

import os
import shutil
import threading

from lvmirror.mirror import bitmap as _bitmap
from lvmirror.mirror import metadata as _metadata
from lvmirror.mirror.image import StorageImage

POWER = threading.RLock()     # every save, flush and cut: one instant at a time
_real_atomic_write = _bitmap.atomic_write
_hooks: list = []             # (machine, predicate) pairs waiting for their save


def _atomic_write(path, data):
    with POWER:
        _real_atomic_write(path, data)
        for hook in list(_hooks):
            machine, pred = hook
            if pred(os.fspath(path), data):
                _hooks.remove(hook)
                machine._do_cut()


def install(monkeypatch):
    """Route every metadata save through the power lock (pytest's monkeypatch fixture)."""
    monkeypatch.setattr(_bitmap, "atomic_write", _atomic_write)
    monkeypatch.setattr(_metadata, "atomic_write", _atomic_write)
    _hooks.clear()


class _Disk:
    """What one image file holds durably, and the ranges written since the last flush."""

    def __init__(self, path, size):
        with open(path, "rb") as f:
            self.durable = bytearray(f.read(size))
        self.dirty: list[tuple[int, int]] = []
        self.lock = threading.Lock()


class VolatileImage(StorageImage):
    """A StorageImage whose data is durable only after a flush or a FUA write (module doc)."""

    disk: _Disk
    machine: "Machine"

    def _note(self, offset, length):
        with self.disk.lock:
            self.disk.dirty.append((offset, length))

    def _persist(self, ranges):
        with open(self.path, "rb") as f:
            for off, ln in ranges:
                f.seek(off)
                self.disk.durable[off:off + ln] = f.read(ln)

    def writev(self, offset, buffers, *, fua=False):
        bufs = list(buffers)
        ln = sum(memoryview(b).nbytes for b in bufs)
        self._note(offset, ln)          # before: a flush during the write may take part of it
        super().writev(offset, bufs, fua=False)
        self._note(offset, ln)          # after: a later flush takes all of it
        if fua:
            with POWER:
                self._persist([(offset, ln)])

    def discard(self, offset, length):
        self._note(offset, length)
        super().discard(offset, length)
        self._note(offset, length)

    def flush(self):
        super().flush()
        with POWER:
            with self.disk.lock:
                ranges, self.disk.dirty = self.disk.dirty, []
            self._persist(ranges)
            self.machine.flushes += 1


class Machine:
    """One boot: a state directory and image files (logical path -> real file)."""

    def __init__(self, meta_dir, files=None, root=None):
        self.meta_dir = os.fspath(meta_dir)
        self.files = dict(files or {})
        self.root = root
        self.disks: dict[str, _Disk] = {}
        self.flushes = 0
        self.next: Machine | None = None     # the machine a cut produced
        self.cut_done = threading.Event()
        self.on_cut: list = []               # callables run at the cut instant (under POWER)
        self._cut_dest = None

    def real(self, path) -> str:
        return self.files.get(os.fspath(path), os.fspath(path))

    def opener(self, path, *, direct=False) -> VolatileImage:
        """The ``opener`` for MirrorVolume.create/open. Opening a path again in the same boot
        (a daemon restart after a process kill) keeps what the page cache and the disk hold."""
        path = os.fspath(path)
        img = VolatileImage.open(self.real(path), direct=direct)
        img.machine = self
        with POWER:
            if path not in self.disks:
                self.disks[path] = _Disk(img.path, img.size)
            img.disk = self.disks[path]
        return img

    def durable_bytes(self, path) -> bytes:
        return bytes(self.disks[os.fspath(path)].durable)

    def cut(self, dest) -> "Machine":
        """Cut the power now; returns the machine that boots from what was durable."""
        self._cut_dest = os.fspath(dest)
        with POWER:
            _hooks[:] = [h for h in _hooks if h[0] is not self]   # disarm a pending cut
            return self._do_cut()

    def cut_after_save(self, dest, pred):
        """Arm a cut right after the first metadata save with ``pred(path, data)`` true;
        ``cut_done`` is set and ``next`` holds the new machine once it happened."""
        self._cut_dest = os.fspath(dest)
        _hooks.append((self, pred))

    def _do_cut(self) -> "Machine":
        dest = self._cut_dest
        os.makedirs(dest, exist_ok=True)
        meta = os.path.join(dest, "meta")
        shutil.copytree(self.meta_dir, meta, ignore=shutil.ignore_patterns(".*"))
        files = {}
        for k, (path, disk) in enumerate(sorted(self.disks.items())):
            real = os.path.join(dest, f"image{k}-{os.path.basename(path)}")
            with open(real, "wb") as f:
                f.write(disk.durable)
            # the inode's modification time as the file had it: a disk keeps its inode across
            # a cut (a real cut may show an earlier one, which mirror/copyid allows for)
            st = os.stat(self.real(path))
            os.utime(real, ns=(st.st_atime_ns, st.st_mtime_ns))
            files[path] = real
        for fn in self.on_cut:
            fn()
        self.next = Machine(meta, files, root=dest)
        self.cut_done.set()
        return self.next
