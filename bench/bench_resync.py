#!/usr/bin/env python3
"""Resync benchmark (prints figures; not a test): a delta resync and a full resync of a
2-image volume on files, against a bare copy of the same bytes.

The volume (``--size-mib``, ``--region-kib``) is created on image files in ``--dir`` (use a
directory on a disk file system such as ext4 or XFS: on tmpfs a flush costs nothing and the
figures say little), written full of random data, then image 1 is split (or failed, ``--how
fail``) and ``--changed-pct`` percent of the regions (spread evenly over the volume, one small
write each) are changed. Timed, with the images' page cache dropped first (fdatasync +
POSIX_FADV_DONTNEED on each image, as the kernel lab's ``drop_caches`` does; ``--warm`` keeps
it):

(a) the resync of the changed regions (``vol.resync(1)``);
(b) a full resync of the same image (``vol.resync(1, full=True)``: every region copied);
(c) the floor: a bare copy of the same bytes with plain os calls - pread from image 0 and
    pwrite to a scratch file in 1 MiB pieces, then fsync - for (a)'s regions and for the
    whole volume.

The job's figures are its own record (``job.progress()``: bytes done and elapsed seconds),
the numbers the kernel lab's ``lvmirror status`` reads, with where that time went (the job's
drain, copy and commit phases, as lvmirrord logs them). Each run is repeated ``--repeat``
times; the median is printed.

Usage: .venv/bin/python bench/bench_resync.py [--dir /var/tmp] [--size-mib 256]
       [--region-kib 1024] [--changed-pct 1] [--repeat 3] [--how split|fail] [--warm]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lvmirror.errors import ImageIOError  # noqa: E402
from lvmirror.mirror.volume import MirrorVolume  # noqa: E402

BS = 512
MB = 1_000_000
CHUNK = 1 << 20


def fs_type(path) -> str:
    """The file system type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    path = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, right = line.split(" - ", 1)
                mnt = left.split()[4]
                under = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if under and len(mnt) >= len(best):
                    best, kind = mnt, right.split()[0]
    except OSError:
        pass
    return kind


def drop_cache(path):
    """Write back and drop ``path``'s page cache, so the next reads come from the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def bare_copy(src, dst, ranges) -> tuple[float, float]:
    """Copy byte ``ranges`` [(offset, length)] from ``src`` to ``dst`` with pread / pwrite in
    CHUNK pieces, then fsync ``dst``; returns (seconds, process CPU seconds) it took."""
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    fs = os.open(src, os.O_RDONLY)
    fd = os.open(dst, os.O_RDWR)
    try:
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        for off, ln in ranges:
            end = off + ln
            while off < end:
                n = os.preadv(fs, [mv[:min(CHUNK, end - off)]], off)
                os.pwrite(fd, mv[:n], off)
                off += n
        os.fsync(fd)
        return time.perf_counter() - t0, cpu_seconds() - c0
    finally:
        os.close(fs)
        os.close(fd)


class _FailingOpener:
    """Opens images; ``fail(path)`` makes that image's next write raise EIO once (to fail it)."""

    def __init__(self):
        self.armed = set()

    def __call__(self, path, *, direct=False):
        from lvmirror.mirror.image import StorageImage
        st = StorageImage.open(path, direct=direct)
        opener = self
        orig = st.writev

        def writev(offset, buffers, *, fua=False):
            if st.path in opener.armed:
                opener.armed.discard(st.path)
                raise ImageIOError(st, 5, f"image {st.path}: injected write error")
            return orig(offset, buffers, fua=fua)
        st.writev = writev
        return st


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_job(vol, paths, warm, **kw):
    """Start a resync of image 1 (``kw``: resync's arguments) and wait for it; returns (bytes
    done, elapsed seconds as the job records them, wall seconds, process CPU seconds, the
    job's seconds by phase: drain, copy, commit)."""
    if not warm:
        for p in paths:
            drop_cache(p)
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    job = vol.resync(1, **kw)
    if not job.wait(3600) or job.state != "done":
        raise SystemExit(f"resync ended {job.state}: {job.error}")
    wall = time.perf_counter() - t0
    p = job.progress()
    return p["bytes_done"], p["elapsed"], wall, cpu_seconds() - c0, dict(job.phase_seconds)


def one_round(d, args, rnd):
    size = args.size_mib << 20
    region = args.region_kib << 10
    paths = [os.path.join(d, f"img{k}") for k in range(2)]
    opener = _FailingOpener()
    vol = MirrorVolume.create("bench", paths, meta_dir=os.path.join(d, "meta"), size=size,
                              region_size=region, flush_interval=2.0, opener=opener)
    try:
        for job in vol.jobs.values():
            job.wait()
        data = memoryview(bytearray(os.urandom(CHUNK)))
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            vol.write(off // BS, [data[:n]])
        vol.checkpoint()
        nregions = -(-size // region)
        n = max(1, round(nregions * args.changed_pct / 100))
        changed = [k * nregions // n for k in range(n)]
        small = memoryview(bytearray(os.urandom(4096)))[:min(4096, region)]
        if args.how == "split":
            vol.split(1)
        else:
            opener.armed.add(paths[1])
            vol.write(0, [small])           # fails image 1 (region 0 marked: changed below)
        for r in changed:
            off = r * region + rnd.randrange(max(1, min(region, size - r * region) // 4096)) * 4096
            vol.write(off // BS, [small])
        vol.checkpoint()
        delta = run_job(vol, paths, args.warm)
        full = run_job(vol, paths, args.warm, full=True)
        ranges = [(r * region, min(region, size - r * region)) for r in changed]
    finally:
        vol.close()
    scratch = os.path.join(d, "scratch")
    with open(scratch, "wb") as f:
        f.truncate(size)
    for p in paths + [scratch]:
        if not args.warm:
            drop_cache(p)
    bare_delta = bare_copy(paths[0], scratch, ranges)
    for p in paths + [scratch]:
        if not args.warm:
            drop_cache(p)
    bare_full = bare_copy(paths[0], scratch, [(0, size)])
    shutil.rmtree(os.path.join(d, "meta"))
    for p in paths + [scratch]:
        os.unlink(p)
    return dict(delta=delta, full=full, bare_delta=bare_delta, bare_full=bare_full,
                changed=len(changed), nregions=nregions)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the images live (default %(default)s; a disk file system, "
                         "not tmpfs)")
    ap.add_argument("--size-mib", type=int, default=256, help="volume size (MiB)")
    ap.add_argument("--region-kib", type=int, default=1024, help="region size (KiB)")
    ap.add_argument("--changed-pct", type=float, default=1.0,
                    help="percent of the regions changed for the delta resync")
    ap.add_argument("--repeat", type=int, default=3, help="rounds; the median is printed")
    ap.add_argument("--how", choices=("split", "fail"), default="split",
                    help="how image 1 leaves the mirror before the delta resync")
    ap.add_argument("--warm", action="store_true",
                    help="keep the page cache (default: dropped before each timed copy)")
    args = ap.parse_args()
    if args.size_mib < 1:
        ap.error(f"--size-mib must be at least 1, got {args.size_mib}")
    if args.region_kib < 4 or args.region_kib & (args.region_kib - 1):
        ap.error(f"--region-kib must be a power of two >= 4, got {args.region_kib}")
    if args.region_kib > args.size_mib << 10:
        ap.error("--region-kib is larger than the volume")
    if not 0 < args.changed_pct <= 100:
        ap.error(f"--changed-pct must be in (0, 100], got {args.changed_pct}")
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    if not os.path.isdir(args.dir):
        ap.error(f"--dir {args.dir}: no such directory")
    # --how fail logs the injected failure at error priority: expected here
    logging.getLogger("lvmirror").setLevel(logging.CRITICAL)
    kind = fs_type(args.dir)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, images on {args.dir} "
          f"({kind}), {args.size_mib} MiB volume, {args.region_kib} KiB regions, "
          f"page cache {'kept' if args.warm else 'dropped'} before each copy")
    if kind in ("tmpfs", "ramfs"):
        print("warning: the images are in memory: flushes cost nothing here")
    rnd = random.Random(7)
    rounds = []
    for _ in range(args.repeat):
        d = tempfile.mkdtemp(prefix="lvm-resync-", dir=args.dir)
        try:
            rounds.append(one_round(d, args, rnd))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def med(f):
        return statistics.median(f(r) for r in rounds)

    changed, nregions = rounds[0]["changed"], rounds[0]["nregions"]
    d_bytes, f_bytes = rounds[0]["delta"][0], rounds[0]["full"][0]
    d_s, f_s = med(lambda r: r["delta"][1]), med(lambda r: r["full"][1])
    d_wall, f_wall = med(lambda r: r["delta"][2]), med(lambda r: r["full"][2])
    d_cpu, f_cpu = med(lambda r: r["delta"][3]), med(lambda r: r["full"][3])
    bd, bf = med(lambda r: r["bare_delta"][0]), med(lambda r: r["bare_full"][0])
    bd_cpu, bf_cpu = med(lambda r: r["bare_delta"][1]), med(lambda r: r["bare_full"][1])
    print(f"median of {len(rounds)} round(s); a job's bytes and seconds are its own record "
          f"(what 'lvmirror status' shows); wall: resync() to done; CPU: the process's")
    print(f"{'what':<40} {'bytes':>13} {'seconds':>8} {'MB/s':>8} {'wall s':>8} {'CPU s':>7}"
          f"  rate vs bare copy")
    rows = [(f"(a) resync, {changed}/{nregions} regions changed", d_bytes, d_s, d_wall, d_cpu,
             bd),
            ("    bare copy of those regions", d_bytes, bd, bd, bd_cpu, None),
            ("(b) full resync", f_bytes, f_s, f_wall, f_cpu, bf),
            ("    bare copy of the volume", f_bytes, bf, bf, bf_cpu, None)]
    for name, nbytes, secs, wall, cpu, bare in rows:
        vs = f"  {bare / secs:.2f}x" if bare is not None else ""
        print(f"{name:<40} {nbytes:>13,} {secs:8.3f} {nbytes / secs / MB:8.1f} {wall:8.3f} "
              f"{cpu:7.3f}{vs}")
    for key, name in (("delta", "(a)"), ("full", "(b)")):
        phases = ", ".join(f"{ph} {med(lambda r: r[key][4][ph]) * 1e3:.1f}"
                           for ph in ("drain", "copy", "commit"))
        print(f"{name} the job's time by phase (ms): {phases}")
    print(f"(a) / (b) time: {d_s / f_s:.3f}")

if __name__ == "__main__":
    main()
