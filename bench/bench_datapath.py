#!/usr/bin/env python3
"""Data-path benchmark (prints figures; not a test): lvmirrord's LunServer on the ring emulator.

The emulator plays the kernel's side of the TCMU ring byte for byte; the LUN is a real mirrored
volume (2 images on tmpfs) behind the real SCSI core, worker pool and ring thread. For each job
it keeps QD commands in flight and reports commands per second and process CPU microseconds per
command (both sides of the ring run in this process, so the CPU figure is an upper bound for
lvmirrord's share), and the same figure for a bare loop issuing the job's preadv/pwritev calls
(to both images for writes) with the ratio between the two. The emulator's threads (this one,
which submits, and its reaper, which copies the data out as the kernel would) are measured apart
(/proc/self/task/*/stat, in clock ticks): "lvmirrord's threads" is the rest, the ring thread,
the worker pool and the image workers.

With ``--scaling N`` it measures N LUNs against one instead: aggregate commands per second of
N 2-image volumes under 4 KiB random writes, each LUN fed by a forked process of its own playing
the kernel (so the load is not capped by this one), with lvmirrord as one process and as a
process per volume (the default), and the ratio aggregate / (N x one LUN).

With ``--idle N`` it measures what N idle LUNs cost: lvmirrord (a process per volume) serving N
2-image volumes that get no I/O while their status is read once a second, as the D-Bus
service's sync does; it prints the CPU lvmirrord and its volume processes used (percent of one
core) and their threads' wake-ups per second (voluntary context switches, /proc task status).

The ring thread's compiled READ path (``lvmirror/tcmu/_fastread.c``) answers cached READs
unless ``LVMIRROR_COMPILED_READS=0`` is in the environment, and with ``--images 1`` makes the
writes unless ``LVMIRROR_COMPILED_WRITES=0``: run both for the before and after.

Usage: .venv/bin/python bench/bench_datapath.py [--seconds 3] [--qd 32] [--dir /dev/shm]
       [--images 1|2] [--write-through] [--jobs write,read,read1m,write1m] [--scaling N]
       [--idle N]
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

from lvmirror.daemon import LunServer, VolumeRegistry  # noqa: E402
from lvmirror.daemon import lunserver  # noqa: E402
from lvmirror.tcmu import uio  # noqa: E402
from lvmirror.tcmu.emulator import RingEmulator, RingFull  # noqa: E402

BS = 512
SIZE = 512 << 20


def fake_device(root, cfg, size, minor=0, write_cache=True):
    """A sysfs/configfs tree describing one user:lvmirror device (as the unit tests use);
    ``write_cache`` False: ``emulate_write_cache`` 0, a write-through LU (LIO's default)."""
    uio_dir = os.path.join(root, "sys", "class", "uio", f"uio{minor}")
    os.makedirs(os.path.join(uio_dir, "maps", "map0"))
    with open(os.path.join(uio_dir, "name"), "w") as f:
        f.write(f"tcm-user/{minor + 1}/bench/lvmirror/{cfg}\n")
    with open(os.path.join(uio_dir, "maps", "map0", "size"), "w") as f:
        f.write("0x1000\n")
    cfs = os.path.join(root, "cfg", "target", "core", f"user_{minor + 1}", "bench")
    for sub in ("attrib", "action", "wwn"):
        os.makedirs(os.path.join(cfs, sub))
    with open(os.path.join(cfs, "info"), "w") as f:
        f.write(f"Status: ACTIVATED SectorSize: 512\nConfig: lvmirror/{cfg} Size: {size}\n")
    for name, val in (("hw_block_size", "512"), ("hw_max_sectors", "2048"),
                      ("emulate_write_cache", "1" if write_cache else "0")):
        with open(os.path.join(cfs, "attrib", name), "w") as f:
            f.write(val + "\n")
    (dev,) = uio.find_devices("lvmirror", sysfs_root=os.path.join(root, "sys"),
                              configfs_root=os.path.join(root, "cfg"))
    return dev


def cdb(op, lba, n):
    if op in (0x28, 0x2A):
        return bytes([op, 0]) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"
    raise ValueError(op)


def bare_loop(imgs, key, seconds):
    """The same preadv/pwritev calls as job ``key`` in a plain loop, no ring, no engine: CPU
    microseconds per command (the floor the per-command figure is compared with)."""
    fds = [os.open(p, os.O_RDWR) for p in imgs]
    rnd = random.Random(2)
    buf4 = bytearray(4096)
    buf1m = bytearray(1 << 20)
    n = 0
    c0 = time.process_time()
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            for _ in range(200):
                if key == "write":
                    off = rnd.randrange(SIZE // 4096) * 4096
                    for fd in fds:
                        os.pwritev(fd, [buf4], off)
                elif key == "write1m":
                    off = (n % 64) << 20
                    for fd in fds:
                        os.pwritev(fd, [buf1m], off)
                elif key == "read":
                    os.preadv(fds[n % len(fds)], [buf4],
                              rnd.randrange((64 << 20) // 4096) * 4096)
                else:
                    os.preadv(fds[n % len(fds)], [buf1m], (n % 64) << 20)
                n += 1
    finally:
        for fd in fds:
            os.close(fd)
    return (time.process_time() - c0) / n * 1e6


def _thread_cpu(native_ids) -> float:
    """CPU seconds (user + system) of this process's threads ``native_ids`` (/proc task stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for tid in native_ids:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])     # utime, stime (fields 14, 15)
    return total / tick


def _emulator_ids(emu):
    """The threads playing the kernel: this one (submit/wait) and the emulator's reaper."""
    return [threading.get_native_id(), emu._reaper.native_id]


def closed_loop(emu, make, seconds, qd, timeout=10.0) -> int:
    """Keep ``qd`` commands from ``make()`` (a (cdb, submit kwargs) pair) in flight on the
    emulator for ``seconds``, then wait for the last ones; returns how many completed."""
    inflight = set()
    done = 0
    deadline = time.perf_counter() + seconds
    while True:
        now = time.perf_counter()
        while len(inflight) < qd and now < deadline:
            op, args = make()
            try:
                inflight.add(emu.submit(op, **args))
            except RingFull:
                break
        if not inflight:
            return done
        got = emu.wait_any(inflight, timeout=timeout)
        done += len(got)
        inflight -= got


def run_job(emu, name, make, seconds, qd):
    t0 = time.perf_counter()
    c0 = time.process_time()
    e0 = _thread_cpu(_emulator_ids(emu))
    done = closed_loop(emu, make, seconds, qd)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    emu_cpu = _thread_cpu(_emulator_ids(emu)) - e0
    bad = [c for c in emu.completions.values() if c.status != 0]     # every one of the run
    assert not bad, f"{name}: commands failed: {bad[:3]}"
    emu.completions.clear()
    own = max(cpu - emu_cpu, 0.0)
    print(f"{name:<42} {done / wall:10.0f} cmd/s  {cpu / done * 1e6:8.1f} CPU us/cmd "
          f"({done} commands, QD {qd}); lvmirrord's threads {own / done * 1e6:.1f} us/cmd")
    return own / done * 1e6


# -- several LUNs: one process against a process per volume -----------------------------------
def _proc_cpu(pid) -> float:
    """CPU seconds (user + system) of process ``pid`` and its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _driver(sock, qd):
    """A forked process playing the kernel for one LUN: its ring emulator, handed to lvmirrord
    by descriptor, and a closed loop of QD 4 KiB random writes when told to run."""
    from lvmirror.daemon.volumeproc import recv_msg, send_msg
    emu = RingEmulator(cmdr_size=(1 << 20) - 128, data_size=64 << 20, directory="/dev/shm")
    emu.run_reaper()
    fds, meta = emu.handle().transfer()
    send_msg(sock, meta, fds)
    rnd = random.Random(os.getpid())
    payload = os.urandom(4096)
    nblk = SCALE_SIZE // BS
    while True:
        (cmd, seconds), _ = recv_msg(sock)
        if cmd != "run":
            break
        t0 = time.perf_counter()
        done = closed_loop(emu, lambda: (cdb(0x2A, rnd.randrange(nblk // 8) * 8, 8),
                                         {"data_out": payload}), seconds, qd, timeout=30)
        bad = sum(1 for c in emu.completions.values() if c.status != 0)
        emu.completions.clear()
        send_msg(sock, (done, time.perf_counter() - t0, bad))
    emu.close()
    os._exit(0)


SCALE_SIZE = 64 << 20


def _wait_in_sync(d, n, timeout=120.0):
    """Wait until lvmirrord ``d`` has ``n`` volumes open, every image in sync (the initial
    resyncs done), for at most ``timeout`` seconds (then go on: the figures say the rest)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        vols = d.status()["volumes"]
        if len(vols) == n and all(i["state"] == "in-sync" for v in vols.values()
                                  for i in v["images"]):
            return
        time.sleep(0.1)


def scaling(args, work):
    """Aggregate commands per second of N LUNs (each a 2-image volume under QD 4 KiB random
    writes, each fed by its own process playing the kernel) against one LUN, with lvmirrord
    as one process (``--no-processes``) and with a process per volume (the default).
    Prints cmd/s, lvmirrord's CPU us per command and the ratio aggregate / (N x one)."""
    import socket
    from lvmirror.daemon import Lvmirrord
    from lvmirror.daemon.volumeproc import recv_msg, send_msg
    from lvmirror.tcmu.emulator import AttachedHandle
    n_max = args.scaling
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {n_max} LUNs against 1, "
          f"each a 2-image {SCALE_SIZE >> 20} MiB volume on {args.dir}, 4 KiB random writes "
          f"at QD {args.qd}, {args.seconds:g} s; every LUN's load from a process of its own")
    results = {}
    for processes in (False, True):
        label = "a process per volume (default)" if processes else "one process (--no-processes)"
        for n in (1, n_max):
            drivers = []
            for k in range(n):
                a, b = socket.socketpair()
                pid = os.fork()
                if pid == 0:
                    a.close()
                    try:
                        _driver(b, args.qd)
                    finally:
                        os._exit(1)
                b.close()
                drivers.append((pid, a))
            run_dir = tempfile.mkdtemp(prefix=f"s{int(processes)}{n}-", dir=work)
            d = Lvmirrord(state_dir=os.path.join(run_dir, "state"), with_bus=False,
                          processes=processes, workers=args.workers, log_level="warning")
            try:
                for k, (_, sock) in enumerate(drivers):
                    meta, fds = recv_msg(sock)
                    imgs = [os.path.join(run_dir, f"v{k}-img{j}") for j in range(2)]
                    dev = fake_device(os.path.join(run_dir, f"tree{k}"),
                                      f"v{k};images={'+'.join(imgs)}", SCALE_SIZE, minor=k)
                    handle = AttachedHandle(fds, meta)
                    info = d.add_lun(dev, handle=handle)
                    assert info["error"] is None, info
                _wait_in_sync(d, n)
                pids = [h.pid for h in d._hosts.values()] if processes else [os.getpid()]
                for _, sock in drivers:                 # warm-up
                    send_msg(sock, ("run", 0.5))
                for _, sock in drivers:
                    recv_msg(sock)
                cpu0 = sum(_proc_cpu(p) for p in pids)
                for _, sock in drivers:
                    send_msg(sock, ("run", args.seconds))
                outs = [recv_msg(sock)[0] for _, sock in drivers]
                cpu = sum(_proc_cpu(p) for p in pids) - cpu0
            finally:
                d.stop()            # the LUNs go first, as LIO removes a device's handler
                for _, sock in drivers:
                    try:
                        send_msg(sock, ("quit", 0))
                    except OSError:
                        pass
                for pid, sock in drivers:
                    os.waitpid(pid, 0)
                    sock.close()
                shutil.rmtree(run_dir, ignore_errors=True)
            done = sum(o[0] for o in outs)
            bad = sum(o[2] for o in outs)
            assert not bad, f"{bad} commands failed"
            rate = sum(o[0] / o[1] for o in outs)
            results[(processes, n)] = rate
            print(f"  {label:<32} {n} LUN{'s' if n > 1 else ' '} {rate:10.0f} cmd/s in all "
                  f"({rate / n:8.0f} per LUN); lvmirrord {cpu / done * 1e6:6.1f} CPU us/cmd")
        ratio = results[(processes, n_max)] / (n_max * results[(processes, 1)])
        print(f"  {label:<32} scaling: {n_max} LUNs = {ratio:.2f} x {n_max} x one LUN")
    return results


def _wakeups(pid) -> int:
    """Voluntary context switches of every thread of process ``pid`` so far (each is a thread
    going to sleep, so each is followed by a wake-up; /proc/PID/task/TID/status)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            continue        # a thread that ended meanwhile
    return total


def idle(args, work):
    """What N idle LUNs cost: lvmirrord with a process per volume serving N 2-image volumes,
    each on a ring emulator that submits nothing, while ``status()`` is read once a second (the
    D-Bus service's sync, here from this process's main thread, which lvmirrord's bus thread
    would be). Prints CPU (percent of one core: this process and the volume processes; the
    emulators start no thread) and wake-ups per second, over ``--seconds``."""
    from lvmirror.daemon import Lvmirrord
    n = args.idle
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {n} idle LUNs (2-image "
          f"{SCALE_SIZE >> 20} MiB volumes on {args.dir}), status read once a second, "
          f"{args.seconds:g} s")
    emus = []
    d = Lvmirrord(state_dir=os.path.join(work, "state"), with_bus=False, processes=True,
                  workers=args.workers, log_level="warning")
    try:
        for k in range(n):
            emu = RingEmulator(cmdr_size=(1 << 20) - 128, data_size=4 << 20,
                               directory="/dev/shm")
            emus.append(emu)
            imgs = [os.path.join(work, f"v{k}-img{j}") for j in range(2)]
            dev = fake_device(os.path.join(work, f"tree{k}"),
                              f"v{k};images={'+'.join(imgs)}", SCALE_SIZE, minor=k)
            info = d.add_lun(dev, handle=emu.handle())
            assert info["error"] is None, info
        _wait_in_sync(d, n)
        time.sleep(2.0)                     # the initial syncs' checkpoints settle
        pids = [os.getpid()] + [h.pid for h in d._hosts.values()]
        cpu0 = sum(_proc_cpu(p) for p in pids)
        wake0 = sum(_wakeups(p) for p in pids)
        t0 = time.monotonic()
        end = t0 + args.seconds
        while time.monotonic() < end:
            d.status()
            time.sleep(max(0.0, min(1.0, end - time.monotonic())))
        wall = time.monotonic() - t0
        cpu = sum(_proc_cpu(p) for p in pids) - cpu0
        wakes = sum(_wakeups(p) for p in pids) - wake0
    finally:
        d.stop()
        for emu in emus:
            emu.close()
    tick = 1 / os.sysconf("SC_CLK_TCK")
    print(f"  {n} idle LUN{'s' if n > 1 else ''}: lvmirrord and its volume processes "
          f"{cpu / wall * 100:.2f} % of one core ({cpu / wall / n * 1000:.2f} ms CPU per "
          f"second per LUN; {cpu:.2f} s CPU in {wall:.1f} s, counted in {tick * 1000:g} ms "
          f"ticks), {wakes / wall:.0f} thread wake-ups per second ({wakes / wall / n:.1f} "
          f"per LUN)")
    return cpu / wall, wakes / wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dir", default="/dev/shm",
                    help="where the images live (default %(default)s; the ring thread "
                         "answers cached reads with RWF_NOWAIT on ext4 or XFS, and with a plain "
                         "preadv on tmpfs, which refuses the flag but is all page cache)")
    ap.add_argument("--no-inline-reads", action="store_true",
                    help="every command through the worker pool (the ring thread answers "
                         "cached READs itself by default)")
    ap.add_argument("--images", type=int, choices=(1, 2), default=2,
                    help="images of the volume (default 2, a mirror: its 4 KiB writes go to "
                         "both and to the write-intent log; 1: one pwritev and no log, as "
                         "the lab's lvmirror 1 image against tcmu-runner)")
    ap.add_argument("--write-through", action="store_true",
                    help="the LU write-through (emulate_write_cache 0, LIO's default for a "
                         "user backstore: every WRITE durable before GOOD, on the Python path); "
                         "write-back by default, as the lab's benchmark sets it")
    ap.add_argument("--jobs", default="write,read,read1m",
                    help="comma-separated: write (4 KiB random writes, mirrored with 2 "
                         "images), read (4 KiB random reads), read1m (1 MiB sequential reads), "
                         "write1m (1 MiB sequential writes; not in the default set)")
    ap.add_argument("--scaling", type=int, default=None, metavar="N",
                    help="instead of the jobs: N LUNs against one, lvmirrord as one process "
                         "and as a process per volume (aggregate cmd/s, CPU us/cmd, ratio)")
    ap.add_argument("--idle", type=int, default=None, metavar="N",
                    help="instead of the jobs: what N idle LUNs cost (CPU percent of one core "
                         "and thread wake-ups per second, status read once a second)")
    args = ap.parse_args()
    if args.scaling is not None and args.scaling < 2:
        ap.error(f"--scaling N needs N >= 2, got {args.scaling}")
    if args.idle is not None and args.idle < 1:
        ap.error(f"--idle N needs N >= 1, got {args.idle}")
    if args.idle is not None and args.scaling is not None:
        ap.error("--idle and --scaling measure different things: give one")
    if set(args.jobs.split(",")) - {"write", "read", "read1m", "write1m"}:
        ap.error(f"--jobs: unknown job in {args.jobs!r}")
    if not args.seconds > 0 or args.seconds == float("inf"):
        ap.error(f"--seconds must be a positive number, got {args.seconds}")
    if args.qd < 1 or args.workers < 1:
        ap.error("--qd and --workers must be at least 1")
    if not os.path.isdir(args.dir):
        ap.error(f"--dir {args.dir}: no such directory")
    work = tempfile.mkdtemp(prefix="lvm-bench-", dir=args.dir)
    other = idle if args.idle is not None else scaling if args.scaling is not None else None
    if other is not None:           # --idle N or --scaling N instead of the jobs
        try:
            other(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        imgs = [os.path.join(work, f"img{k}") for k in range(args.images)]
        cfg = f"bench;images={'+'.join(imgs)}"
        dev = fake_device(os.path.join(work, "tree"), cfg, SIZE,
                          write_cache=not args.write_through)
        # the ring lives in memory, as the kernel's does (a file on ext4 would pay page faults
        # and writeback the kernel never does), whatever file system holds the images
        emu = RingEmulator(cmdr_size=(1 << 20) - 128, data_size=64 << 20, directory="/dev/shm")
        emu.run_reaper()
        lun = LunServer(dev, VolumeRegistry(os.path.join(work, "state")), workers=args.workers,
                        inline_reads=not args.no_inline_reads)
        lun.open(handle=emu.handle())
        lun.start()
        for job in lun.volume.jobs.values():
            job.wait(60)
        compiled = "on" if lunserver.COMPILED_READS else "off"
        wcompiled = "on" if lunserver.COMPILED_WRITES else "off"
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.images}-image "
              f"volume on "
              f"{args.dir}, {args.workers} workers per LUN, "
              f"cached reads {'through the pool' if args.no_inline_reads else 'on the ring thread'}"
              f"{'' if args.no_inline_reads else ', compiled READ path ' + compiled}"
              f"{'' if args.no_inline_reads else ', compiled WRITEs ' + wcompiled}"
              f"{', write-through (WCE 0)' if args.write_through else ', write-back'}")
        rnd = random.Random(1)
        nblk = SIZE // BS
        payload = os.urandom(4096)
        payload1m = os.urandom(1 << 20)
        # pre-fill so reads are of written data
        for k in range(0, 64 << 20, 1 << 20):
            cid = emu.submit(cdb(0x2A, k // BS, 2048), data_out=os.urandom(1 << 20))
            emu.wait([cid])
        emu.completions.clear()
        seq = iter(range(0, 10 ** 9))
        jobs = {
            "write": (f"4 KiB random {'mirrored ' if args.images > 1 else ''}writes", lambda: (
                cdb(0x2A, rnd.randrange(nblk // 8) * 8, 8), {"data_out": payload}), args.qd),
            "read": ("4 KiB random reads", lambda: (
                cdb(0x28, rnd.randrange((64 << 20) // 4096) * 8, 8), {"data_in_len": 4096}),
                args.qd),
            "read1m": ("1 MiB sequential reads", lambda: (
                cdb(0x28, (next(seq) % 64) * 2048, 2048), {"data_in_len": 1 << 20}),
                min(args.qd, 16)),
            "write1m": (f"1 MiB sequential {'mirrored ' if args.images > 1 else ''}writes",
                        lambda: (cdb(0x2A, (next(seq) % 64) * 2048, 2048),
                                 {"data_out": payload1m}), min(args.qd, 16)),
        }
        for key in args.jobs.split(","):
            name, make, qd = jobs[key]
            us = run_job(emu, name, make, args.seconds, qd)
            floor = bare_loop(imgs, key, min(args.seconds, 2.0))
            print(f"{'  bare loop of the same syscalls':<42} {'':>10}        {floor:8.1f} CPU "
                  f"us/cmd (lvmirrord's threads: {us / floor:.1f}x)")
        print(f"ring: {lun._ring.stats}; answered by the ring thread: {lun.inline}, of which "
              f"READs by its compiled path: {lun.compiled}, WRITEs: {lun.compiled_writes} "
              f"(handed to a new ring thread when one stalled: {lun.handovers})")
        lun.stop()
        emu.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
