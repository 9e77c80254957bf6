#!/usr/bin/env python3
"""Mirror engine benchmark (prints figures; not a test).

1. 4 KiB random mirrored writes per second on a 2-image volume on tmpfs, against the ceiling:
   a plain loop issuing the same os.pwritev calls to two files, and the ratio.
2. Uncontended RegionLockManager lock + release cost.
3. Resync time with 1% of a 1 GiB volume changed, against a full resync.

Usage: .venv/bin/python bench/bench_engine.py [--dir /dev/shm] [--seconds 3] [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lvmirror.mirror.image import StorageImage  # noqa: E402
from lvmirror.mirror.regionlock import RegionLockManager  # noqa: E402
from lvmirror.mirror.volume import MirrorVolume  # noqa: E402

BS = 512
IO = 4096


def offsets(n, size, seed=1):
    rnd = random.Random(seed)
    return [rnd.randrange(size // IO) * IO for _ in range(n)]


def bench_writes(d, seconds, threads):
    size = 256 << 20
    a, b = os.path.join(d, "a"), os.path.join(d, "b")
    for p in (a, b):
        StorageImage.create_file(p, size)
    buf = memoryview(bytearray(os.urandom(IO)))
    offs = offsets(200_000, size)

    # Ceiling: the same pwritev calls, one image after the other, no engine.
    fa = os.open(a, os.O_RDWR)
    fb = os.open(b, os.O_RDWR)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for off in offs[n % len(offs):n % len(offs) + 1000]:
            os.pwritev(fa, [buf], off)
            os.pwritev(fb, [buf], off)
        n += 1000
        if time.perf_counter() >= deadline:
            break
    ceiling = n / (time.perf_counter() - t0)
    os.close(fa)
    os.close(fb)
    os.unlink(a)
    os.unlink(b)

    results = {}
    saves = {}
    for fanout in ("auto", "parallel"):
        vol = MirrorVolume.create("bench", [a, b], meta_dir=os.path.join(d, "meta"), size=size,
                                  region_size=1 << 20, flush_interval=2.0, fanout=fanout)
        for job in vol.jobs.values():
            job.wait()
        for nthreads in threads:
            results[fanout, nthreads] = _run_writers(vol, offs, buf, nthreads, seconds)
        saves[fanout] = vol.stats["wil_saves"]
        vol.close()
        shutil.rmtree(os.path.join(d, "meta"))
        os.unlink(a)
        os.unlink(b)
    return ceiling, results, saves


def _run_writers(vol, offs, buf, nthreads, seconds):
    """Closed-loop writers: each thread issues 4 KiB writes back to back; writes/s."""
    counts = [0] * nthreads
    stop = threading.Event()

    def worker(k):
        i = k * 7919
        c = 0
        while not stop.is_set():
            for _ in range(200):
                vol.write(offs[i % len(offs)] // BS, [buf])
                i += 1
            c += 200
        counts[k] = c

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def bench_lock(n=200_000):
    m = RegionLockManager("bench")
    t0 = time.perf_counter()
    for i in range(n):
        m.lock(i & 1023, 8).release()
    dt = time.perf_counter() - t0
    # with 16 other (disjoint) locks held, as with a busy ring
    held = [m.lock(100_000 + 16 * k, 8) for k in range(16)]
    t0 = time.perf_counter()
    for i in range(n):
        m.lock(i & 1023, 8).release()
    dt16 = time.perf_counter() - t0
    for h in held:
        h.release()
    return dt / n * 1e9, dt16 / n * 1e9


def bench_resync(d, size_mib):
    size = size_mib << 20
    paths = [os.path.join(d, f"r{k}") for k in range(2)]
    t0 = time.perf_counter()
    vol = MirrorVolume.create("rs", paths, meta_dir=os.path.join(d, "meta"), size=size,
                              region_size=1 << 20, flush_interval=2.0)
    (job,) = vol.jobs.values()
    job.wait()
    full_create = time.perf_counter() - t0
    full_create_rate = job.progress()["rate"]
    # Fill with data so the copy is not of holes only.
    chunk = memoryview(bytearray(os.urandom(1 << 20)))
    for off in range(0, size, 1 << 20):
        vol.write(off // BS, [chunk])
    vol.split(1)
    rnd = random.Random(3)
    nregions = size >> 20
    changed = rnd.sample(range(nregions), max(1, nregions // 100))
    small = memoryview(bytearray(os.urandom(IO)))
    for r in changed:
        vol.write(((r << 20) + rnd.randrange((1 << 20) // IO) * IO) // BS, [small])
    dirty = vol.images[1].dirty_bytes
    t0 = time.perf_counter()
    job = vol.resync(1)
    job.wait()
    delta = time.perf_counter() - t0
    # Full resync of the same image: detach it and attach it again (every region copied).
    vol.detach(1)
    t0 = time.perf_counter()
    idx = vol.attach(paths[1], force=True)   # it holds the old copy: forced over data
    job = vol.jobs[vol.images[idx].id]
    job.wait()
    full = time.perf_counter() - t0
    vol.close()
    shutil.rmtree(os.path.join(d, "meta"))
    for p in paths:
        os.unlink(p)
    return dict(dirty=dirty, delta=delta, full=full, full_rate=job.progress()["rate"],
                create=full_create, create_rate=full_create_rate, changed=len(changed))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--threads", default="1,4")
    args = ap.parse_args()
    d = tempfile.mkdtemp(prefix="lvmirror-bench-", dir=args.dir)
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, files in {args.dir}")
        threads = [int(x) for x in args.threads.split(",")]
        ceiling, res, saves = bench_writes(d, args.seconds, threads)
        print(f"ceiling: plain loop, 2 x os.pwritev 4 KiB random, 1 thread   {ceiling:9.0f} writes/s")
        for (fanout, nt), r in res.items():
            print(f"mirrored 4 KiB random writes, 2 images, fanout={fanout:8s} {nt} thread(s) "
                  f"{r:9.0f} writes/s  ratio {r / ceiling:.2f}")
        print(f"  (write-intent log saves during the runs: {saves})")
        ns, ns16 = bench_lock()
        print(f"RegionLockManager lock+release, uncontended        {ns:10.0f} ns")
        print(f"  ... with 16 disjoint locks held                  {ns16:10.0f} ns")
        rs = bench_resync(d, args.size_mib)
        print(f"resync, {args.size_mib} MiB volume, {rs['changed']} regions "
              f"({rs['dirty'] / (args.size_mib << 20) * 100:.1f}%) changed: {rs['delta']:8.3f} s")
        print(f"full resync (attach) of the same volume:          {rs['full']:8.3f} s "
              f"({rs['full_rate']:.0f} MB/s)   delta/full = {rs['delta'] / rs['full']:.3f}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
