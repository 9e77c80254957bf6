"""Shared helpers for the test_volume_* tests (no tests here).

``GatedImage`` is a real StorageImage (real files) whose writes/reads can be held at a gate,
so a test can keep an I/O in flight across a split instant, deterministically, and whose I/O
can be made to fail with EIO (fault injection). Flushes pass the same gates (op "flush", offset
and length 0) and can fail alone (``fail_flushes``).
"""

from __future__ import annotations

import errno
import os
import threading
import time

from lvmirror.errors import ImageIOError, WouldBlock
from lvmirror.mirror.image import StorageImage
from lvmirror.mirror.volume import MirrorVolume

BS = 512


class Gate:
    """Holds the next matching I/O: ``reached`` is set when it arrives, it proceeds on ``open``."""

    def __init__(self, match=None, count=1):
        self.match = match or (lambda op, off, ln: True)
        self.count = count
        self.reached = threading.Event()
        self._open = threading.Event()

    def open(self):
        self._open.set()

    def wait_reached(self, timeout=10):
        assert self.reached.wait(timeout), "gated I/O never arrived"


class GatedImage(StorageImage):
    gates: list  # per instance
    fail_writes = False
    fail_reads = False
    fail_flushes = False

    def _gate(self, op, off, ln):
        for g in list(getattr(self, "gates", [])):
            if g.count and g.match(op, off, ln):
                g.count -= 1
                g.reached.set()
                assert g._open.wait(20), "gate never opened"

    def writev(self, offset, buffers, *, fua=False):
        bufs = list(buffers)
        ln = sum(len(memoryview(b).cast("B")) for b in bufs)
        self._gate("write", offset, ln)
        if self.fail_writes:
            raise ImageIOError(self, errno.EIO, f"image {self.path}: injected write error")
        return super().writev(offset, bufs, fua=fua)

    def readv(self, offset, buffers, *, nowait=False):
        bufs = list(buffers)
        ln = sum(len(memoryview(b).cast("B")) for b in bufs)
        if nowait and any(g.count and g.match("read", offset, ln)
                          for g in list(getattr(self, "gates", []))):
            raise WouldBlock(f"image {self.path}: a gate waits")
        self._gate("read", offset, ln)
        if self.fail_reads:
            raise ImageIOError(self, errno.EIO, f"image {self.path}: injected read error")
        return super().readv(offset, bufs, nowait=nowait)

    def verify_readv(self, offset, buffer):
        ln = len(memoryview(buffer).cast("B"))
        self._gate("read", offset, ln)
        if self.fail_reads:
            raise ImageIOError(self, errno.EIO, f"image {self.path}: injected read error")
        return super().verify_readv(offset, buffer)

    def prefetch(self, offset, length):
        self._gate("prefetch", offset, length)
        return super().prefetch(offset, length)

    def flush(self):
        self._gate("flush", 0, 0)
        if self.fail_writes or self.fail_flushes:
            self.note_flush_failure()            # as StorageImage.flush counts its own
            raise ImageIOError(self, errno.EIO, f"image {self.path}: injected flush error",
                               op="flush")     # as StorageImage.flush raises it
        return super().flush()


class Opener:
    """Opens every image as a GatedImage and remembers them by path."""

    def __init__(self):
        self.by_path = {}

    def __call__(self, path, *, direct=False):
        img = GatedImage.open(path, direct=direct)
        img.gates = []
        self.by_path[str(path)] = img
        return img


def make_volume(tmp_path, nimages=2, *, size=1 << 20, region_size=64 << 10, name="vol",
                opener=None, wait=True, **kw):
    """A volume of ``nimages`` image files under ``tmp_path``, initial resync done. Its
    write-intent chunk is its region (``intent_chunk=region_size``) unless ``intent_chunk`` is
    given: these tests look at the log region by region; the default chunk (64 MiB, coarser
    than these small volumes) is tested on its own (test_intent_chunk)."""
    kw.setdefault("intent_chunk", region_size)
    opener = opener or Opener()
    paths = [str(tmp_path / f"img{k}") for k in range(nimages)]
    vol = MirrorVolume.create(name, paths, meta_dir=str(tmp_path / "meta"), size=size,
                              region_size=region_size, opener=opener, flush_interval=None, **kw)
    if wait:
        for job in list(vol.jobs.values()):
            assert job.wait(30)
            assert job.state == "done", job.progress()
    return vol, opener, paths


def pattern(nblocks, seed):
    """Deterministic, block-distinct content."""
    out = bytearray(nblocks * BS)
    for b in range(nblocks):
        out[b * BS:(b + 1) * BS] = (f"{seed:08x}:{b:06x}|".encode() * (BS // 16 + 1))[:BS]
    return out


def write(vol, lba, data, **kw):
    vol.write(lba, [memoryview(bytearray(data))], **kw)


def read(vol, lba, nblocks):
    out = bytearray(nblocks * vol.block_size)
    vol.read(lba, [memoryview(out)])
    return bytes(out)


def image_bytes(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length if length is not None else -1)
    if length is not None and len(data) < length:
        data += bytes(length - len(data))
    return data


def wait_until(pred, timeout=10):
    """Wait for a condition another thread makes true (polling, bounded)."""
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition never became true"
        time.sleep(0.001)


def job_after_probe(vol, index, start=None, *, resumed=None):
    """Probe offline ``vol`` (asserting that it comes back online) and return the job of
    image ``index`` that went on by itself (a resync or restore the volume's going offline
    stopped: ``JobControl.resume_after_offline``, on a thread the probe starts), made
    unlimited; when none did, ``start()``'s (the operator's). ``resumed``: True, the job
    must have gone on by itself (``start`` unused); False, it must not have; None: either."""
    key = vol._images[index].rec.id
    before = vol.jobs.get(key)
    assert vol.probe()
    for t in threading.enumerate():
        if t.name == f"{vol.name}-resume":
            t.join(10)
    job = vol.jobs.get(key)
    went_on = job is not None and job is not before
    if resumed is not None:
        assert went_on == resumed, (f"image {index}'s job " + ("did not go on by itself"
                                                              if resumed else "went on"))
    if went_on:
        job.set_rate_limit(None)
        return job
    return start()


def run_thread(fn, *args):
    box = {}

    def body():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # re-raised by the test
            box["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


def drop_page_cache(paths):
    """Write back, then evict ``paths``' pages from the page cache. DONTNEED is advice: a page
    the kernel still holds (under writeback on a busy host) stays, so callers check and call
    again."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def held_on_error(vol):
    """Hold ``vol``'s durability barrier's error handling of a failed flush (the failing
    thread, before it marks for the failure) until the returned ``hold`` is set; ``at_error``
    is set when one arrives. Returns (at_error, hold, the handler it replaced)."""
    at_error, hold = threading.Event(), threading.Event()
    real = vol._barrier._on_error

    def on_error(im, e):
        at_error.set()
        assert hold.wait(20)
        real(im, e)
    vol._barrier._on_error = on_error
    return at_error, hold, real


def no_thread_for(monkeypatch, suffix):
    """Make ``Thread.start`` raise RuntimeError("can't start new thread") for threads whose
    name ends with ``suffix`` (no thread left: systemd's TasksMax); ``monkeypatch.undo()``
    ends it."""
    real_start = threading.Thread.start

    def start(self):
        if self.name.endswith(suffix):
            raise RuntimeError("can't start new thread")
        return real_start(self)
    monkeypatch.setattr(threading.Thread, "start", start)
