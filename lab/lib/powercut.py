"""The power-cut lab's writer and checker (runs INSIDE the kernel-lab guest; lab/lib/powercut.sh
and lab/scenarios/powercut.sh call it). Standard library only.

Every block the writer puts on the LUN is 4 KiB, self-describing and checksummed:

    magic "LVMPCUT1" | run u32 | stream u32 | seq u64 | block u64 | payload ... | crc32 u32

so a block read back after a power cut says which write put it there. The writer runs STREAMS
threads, each at queue depth 1 on its own blocks of the random area (block b belongs to stream
b % STREAMS), and picks its blocks from a PRNG seeded with (run, stream), so the checker knows
the one write of each stream that may have been in flight at the cut. A write counts as
acknowledged once it returned durable - even streams open the LUN O_DIRECT|O_DSYNC (FUA), odd
streams write O_DIRECT and then fdatasync() (SYNCHRONIZE CACHE) - and the writer appends
"SEQ BLOCK" to the stream's log on the shared directory and fsyncs it before it issues the
next write. A bulk pass (one 1 MiB O_DIRECT|O_DSYNC write after the other over the bulk area)
logs once, when it is all durable.

Events of a run (split, restore, ... begun and returned) go to run<R>-events.jsonl with the
streams' last logged sequence numbers at that moment: a write logged before an operation began
began before it; a write issued after the stream's next write was logged after an operation
returned began after it.

Commands (all paths are files or directories in the guest):
  write DEV DIR RUN --streams K --rand-blocks N --stop FILE      the random writer, until FILE
  bulk DEV DIR RUN --start B --count N                           the bulk pass
  mark DIR RUN EVENT [key=value ...]                             an event with the streams' seqs
  hashes SRC OUT --rand-blocks R [--blocks N]                    8-byte hash of every unit
  verify-live DEV DIR RUN --base F --blocks N --rand-blocks R [--split-hashes F] [--new-base F]
  verify-split IMAGE DIR RUN --base F --blocks N --rand-blocks R the split image of RUN's split
  sha FILE                                                       sha256 of a file (after reading)
  cli [--signal|--signal-after] DIR RUN EVENT ARGS...  lvmirror ARGS between EVENT_begin, EVENT_done
  status FILE VOLUME                     lvmirror --json status into FILE, as shell assignments
  wait-change FILE [--count N] [--timeout S]                     until FILE's mtime changed N times
  summary OUT [--wall S]                       (host) the figures of lab/powercut's chains, a table
Each verify writes its figures to --json FILE and prints them as shell assignments (V_lost=...).
"""

import argparse
import hashlib
import json
import mmap
import os
import random
import struct
import sys
import threading
import time
import zlib

BS = 4096
MAGIC = b"LVMPCUT1"
HDR = struct.Struct("<8sIIQQ")      # magic, run, stream, seq, block
BULK_STREAM = 0xFFFF


def make_block(run, stream, seq, block, buf=None, off=0):
    """The 4 KiB content of write (run, stream, seq) at block (into buf at off, or as bytes)."""
    hdr = HDR.pack(MAGIC, run, stream, seq, block)
    seed = hashlib.blake2b(hdr, digest_size=64).digest()
    body = hdr + (seed * (BS // 64))[: BS - HDR.size - 4]
    data = body + struct.pack("<I", zlib.crc32(body))
    if buf is None:
        return data
    buf[off:off + BS] = data
    return None


def parse_block(data):
    """(run, stream, seq, block) of a block the writer wrote intact, else None."""
    if data[:8] != MAGIC:
        return None
    if struct.unpack_from("<I", data, BS - 4)[0] != zlib.crc32(data[:BS - 4]):
        return None
    _, run, stream, seq, block = HDR.unpack_from(data, 0)
    return run, stream, seq, block


def bhash(data):
    return hashlib.blake2b(data, digest_size=8).digest()


def stream_blocks(run, stream, streams, rand_blocks):
    """The writer's block sequence of (run, stream): seq 1, 2, ... -> block."""
    rng = random.Random(f"lvmirror-powercut-{run}-{stream}")
    per = (rand_blocks - stream + streams - 1) // streams
    while True:
        yield rng.randrange(per) * streams + stream


def log_path(d, run, stream):
    return os.path.join(d, f"run{run}-s{stream}.log")


def read_log(d, run, stream):
    """[(seq, block)] of the stream's acknowledged writes (a torn last line is dropped)."""
    out = []
    try:
        with open(log_path(d, run, stream)) as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                seq, blk = line.split()
                out.append((int(seq), int(blk)))
    except FileNotFoundError:
        pass
    return out


def last_seqs(d, run, streams):
    return {str(s): (read_log(d, run, s)[-1][0] if read_log(d, run, s) else 0) for s in range(streams)}


def read_events(d, run):
    evs = []
    try:
        with open(os.path.join(d, f"run{run}-events.jsonl")) as f:
            for line in f:
                if line.endswith("\n"):
                    evs.append(json.loads(line))
    except FileNotFoundError:
        pass
    return evs


def append_fsync(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- writer
def cmd_write(a):
    meta = dict(run=a.run, streams=a.streams, rand_blocks=a.rand_blocks, started=time.time())
    with open(os.path.join(a.dir, f"run{a.run}-writer.json"), "w") as f:
        json.dump(meta, f)
    stop = threading.Event()
    errors = []

    def stream(s):
        flags = os.O_WRONLY | os.O_DIRECT | (os.O_DSYNC if s % 2 == 0 else 0)
        fd = os.open(a.dev, flags)
        logfd = os.open(log_path(a.dir, a.run, s), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        buf = mmap.mmap(-1, BS)
        blocks = stream_blocks(a.run, s, a.streams, a.rand_blocks)
        seq = 0
        try:
            while not stop.is_set():
                seq += 1
                blk = next(blocks)
                make_block(a.run, s, seq, blk, buf, 0)
                if os.pwrite(fd, buf, blk * BS) != BS:
                    raise OSError("short write")
                if s % 2:
                    os.fdatasync(fd)
                os.write(logfd, f"{seq} {blk}\n".encode())
                os.fsync(logfd)
                if a.pause_ms:
                    stop.wait(a.pause_ms / 1000)
        except OSError as e:
            errors.append(f"stream {s} seq {seq}: {e}")
            stop.set()
        finally:
            os.close(fd)
            os.close(logfd)

    threads = [threading.Thread(target=stream, args=(s,), daemon=True) for s in range(a.streams)]
    for t in threads:
        t.start()
    while not stop.is_set():
        if os.path.exists(a.stop):
            stop.set()
            break
        time.sleep(0.1)
    for t in threads:
        t.join()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    return 0


def cmd_bulk(a):
    fd = os.open(a.dev, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    chunk = CHUNK
    if (a.start % CHUNK) or (a.count % CHUNK):
        raise ValueError("the bulk pass covers whole 1 MiB chunks")
    buf = mmap.mmap(-1, chunk * BS)
    t0 = time.monotonic()
    hashes = []
    for first in range(a.start, a.start + a.count, chunk):
        n = min(chunk, a.start + a.count - first)
        for i in range(n):
            make_block(a.run, BULK_STREAM, first + i, first + i, buf, i * BS)
        mv = memoryview(buf)[: n * BS]
        hashes.append(bhash(mv))
        if os.pwrite(fd, mv, first * BS) != n * BS:
            raise OSError("short write")
    os.fdatasync(fd)
    os.close(fd)
    with open(os.path.join(a.dir, f"run{a.run}-bulk.hashes"), "wb") as f:
        f.write(b"".join(hashes))
        f.flush()
        os.fsync(f.fileno())
    append_fsync(os.path.join(a.dir, f"run{a.run}-events.jsonl"),
                 json.dumps(dict(ev="bulk_done", start=a.start, count=a.count,
                                 seconds=round(time.monotonic() - t0, 1), t=time.time())) + "\n")
    return 0


def cmd_mark(a):
    meta = _writer_meta(a.dir, a.run)
    ev = dict(ev=a.event, t=time.time())
    for kv in a.kv:
        k, _, v = kv.partition("=")
        ev[k] = v
    if meta:
        ev["seqs"] = last_seqs(a.dir, a.run, meta["streams"])
    append_fsync(os.path.join(a.dir, f"run{a.run}-events.jsonl"), json.dumps(ev) + "\n")
    return 0


def _writer_meta(d, run):
    try:
        with open(os.path.join(d, f"run{run}-writer.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


# ------------------------------------------------------------------------------------ readers
# A volume is checked in units: each 4 KiB block of the random area (blocks 0..RAND-1), then
# 1 MiB chunks (CHUNK blocks) after it - the bulk area, which only the bulk pass writes - so the
# checker's per-unit Python work stays small under TCG. Hash files hold 8 bytes per unit.
CHUNK = 256


def units(rand_blocks, nblocks):
    """[(unit, first block, block count)] of a volume of nblocks blocks."""
    out = [(b, b, 1) for b in range(rand_blocks)]
    for first in range(rand_blocks, nblocks, CHUNK):
        out.append((len(out), first, min(CHUNK, nblocks - first)))
    return out


def chunk_unit(rand_blocks, block):
    return rand_blocks + (block - rand_blocks) // CHUNK


def read_units(path, rand_blocks, nblocks, direct=None):
    """Yield (unit, first block, bytes) of path, read 1 MiB at a time."""
    if direct is None:
        direct = is_blockdev(path)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, CHUNK * BS)
    mv = memoryview(buf)
    u = 0
    try:
        for first in range(0, nblocks, CHUNK):
            n = min(CHUNK, nblocks - first)
            if os.preadv(fd, [mv[: n * BS]], first * BS) != n * BS:
                raise OSError(f"{path}: short read at block {first}")
            if first + n <= rand_blocks:
                for i in range(n):
                    yield u, first + i, bytes(mv[i * BS:(i + 1) * BS])
                    u += 1
            elif first >= rand_blocks:
                yield u, first, bytes(mv[: n * BS])
                u += 1
            else:
                raise ValueError("the random area must be a multiple of 1 MiB")
    finally:
        os.close(fd)


def is_blockdev(path):
    import stat
    return stat.S_ISBLK(os.stat(path).st_mode)


def cmd_hashes(a):
    nb = a.blocks or os.path.getsize(a.src) // BS
    with open(a.out + ".tmp", "wb") as f:
        for _, _, data in read_units(a.src, a.rand_blocks, nb):
            f.write(bhash(data))
    os.replace(a.out + ".tmp", a.out)
    return 0


def load_hashes(path):
    with open(path, "rb") as f:
        raw = f.read()
    return [raw[i:i + 8] for i in range(0, len(raw), 8)]


class RunModel:
    """What the writer of RUN did: per block, its writes in order, and the events."""

    def __init__(self, d, run):
        self.run = run
        self.meta = _writer_meta(d, run) or dict(streams=0, rand_blocks=0)
        self.streams = self.meta["streams"]
        self.logs = {s: read_log(d, run, s) for s in range(self.streams)}
        self.last = {s: (self.logs[s][-1][0] if self.logs[s] else 0) for s in range(self.streams)}
        self.by_block = {}
        for s, entries in self.logs.items():
            for seq, blk in entries:
                self.by_block.setdefault(blk, []).append((s, seq))
        # the write each stream may have had in flight at the cut (issued, not yet logged)
        self.inflight = {}
        for s in range(self.streams):
            gen = stream_blocks(run, s, self.streams, self.meta["rand_blocks"])
            for _ in range(self.last[s]):
                next(gen)
            self.inflight[next(gen)] = (s, self.last[s] + 1)
        self.events = read_events(d, run)
        self.bulk = [e for e in self.events if e["ev"] == "bulk_done"]
        # the bulk pass's chunk hashes (the bulk writer saves them): unit -> hash
        self.bulk_hashes = {}
        for e in self.bulk:
            h = load_hashes(os.path.join(d, f"run{run}-bulk.hashes"))
            for i, first in enumerate(range(int(e["start"]), int(e["start"]) + int(e["count"]), CHUNK)):
                self.bulk_hashes[first] = h[i]
        self.bulk_blocks = sum(int(e["count"]) for e in self.bulk)

    def event(self, name):
        for e in self.events:
            if e["ev"] == name:
                return e
        return None

    def acked(self):
        return sum(len(v) for v in self.logs.values()) + self.bulk_blocks


def _tok_w(run, s, seq):
    return ("w", run, s, seq)


def _window(m, begin, done):
    """Per stream (lo, hi): writes with seq <= lo began before the operation; seq > hi began
    after it returned (hi None: unknown, the operation never returned)."""
    out = {}
    for s in range(m.streams):
        lo = int(begin["seqs"][str(s)]) if begin and "seqs" in begin else 0
        hi = int(done["seqs"][str(s)]) + 1 if done and "seqs" in done else None
        out[s] = (lo, hi)
    return out


def _torn_ok(data, candidates):
    """A block the cut caught in flight: every 512-byte sector is one of the candidates'."""
    for off in range(0, BS, 512):
        if not any(data[off:off + 512] == c[off:off + 512] for c in candidates):
            return False
    return True


def check(m, src, base, expect_fn, chunk_fn, inflight_ok=True, newbase=None):
    """Compare every unit of src (read_units) to the model; returns the figures.
    expect_fn(block, base hash) -> (tokens, why, acked writes it checks) for random-area blocks,
    chunk_fn(first block, base hash) -> (hash, why, acked writes it checks) for chunks.
    inflight_ok: the write each stream had in flight at the cut may have landed, not landed,
    or be torn between the old and the new content (sector by sector) at its block.
    newbase: a file that receives the hash of every unit read."""
    res = dict(blocks=0, checked_writes=0, lost=0, inflight_landed=0, inflight_torn=0, bad=[],
               acked=m.acked())
    for u, first, data in src:
        h = bhash(data)
        if newbase is not None:
            newbase.write(h)
        if len(data) > BS:
            want, why, counts = chunk_fn(first, base[u])
            res["blocks"] += len(data) // BS
            res["checked_writes"] += counts
            if h != want:
                res["lost"] += counts or 1
                if len(res["bad"]) < 10:
                    p = parse_block(data[:BS])
                    res["bad"].append(dict(chunk_first_block=first, expected=why,
                                           found_first=list(p) if p else "not a writer block"))
            continue
        b = first
        res["blocks"] += 1
        must, why, counts = expect_fn(b, base[u])
        res["checked_writes"] += counts
        parsed = parse_block(data) if data[:8] == MAGIC else None
        if (parsed and ("w",) + tuple(parsed[:3]) in must and parsed[3] == b) or ("h", h) in must:
            continue
        fly = m.inflight.get(b) if inflight_ok else None
        if fly and parsed and parsed[:3] == (m.run,) + fly:
            res["inflight_landed"] += 1
            continue
        if fly:
            olds = [make_block(t[1], t[2], t[3], b) for t in must if t[0] == "w"]
            if not any(t[0] == "h" for t in must) and olds:
                if _torn_ok(data, olds + [make_block(m.run, fly[0], fly[1], b)]):
                    res["inflight_torn"] += 1
                    continue
            else:
                # the old content is known by its hash only: a torn block cannot be told from
                # a lost one, so it is accepted (and counted)
                res["inflight_torn"] += 1
                continue
        res["lost"] += 1
        if len(res["bad"]) < 10:
            res["bad"].append(dict(block=b, expected=why,
                                   found=list(parsed) if parsed else "not a writer block"))
    return res


def live_expect(m, split_hashes):
    """(expect_fn, chunk_fn) for the live volume (LUN) after RUN: the last acknowledged write of
    each block, or its content at the run's start; with a restore in the run, the split image's
    content replaces everything written before the restore (bulk pass included)."""
    rb, rd = m.event("restore_begin"), m.event("restore_done")
    win = _window(m, rb, rd) if rb else None
    rand = m.meta["rand_blocks"]

    def fn(b, base_h):
        writes = m.by_block.get(b, [])
        counts = 1 if writes else 0
        if win is None:
            if writes:
                s, seq = writes[-1]
                return {_tok_w(m.run, s, seq)}, f"run {m.run} stream {s} seq {seq}", counts
            return {("h", base_h)}, "unchanged since the run began", counts
        # restore: writes that began after it returned are kept; the others are rolled back
        post = [(s2, q) for s2, q in writes if win[s2][1] is not None and q > win[s2][1]]
        if post:
            s2, q = post[-1]
            return {_tok_w(m.run, s2, q)}, f"run {m.run} stream {s2} seq {q} (after the restore)", 1
        amb = {_tok_w(m.run, s2, q) for s2, q in writes if q > win[s2][0]}
        return {("h", split_hashes[b])} | amb, "the split image's block (restored)", 0

    def chunk_fn(first, base_h):
        if win is not None:
            return split_hashes[chunk_unit(rand, first)], "the split image's chunk (restored)", 0
        if first in m.bulk_hashes:
            return m.bulk_hashes[first], f"run {m.run} bulk pass", CHUNK
        return base_h, "unchanged since the run began", 0
    return fn, chunk_fn


def _report(a, res):
    """The figures: JSON into a.json, shell assignments V_key=value on stdout."""
    import shlex
    with open(a.json, "w") as f:
        json.dump(res, f)
    for k, v in res.items():
        print(f"V_{k}={shlex.quote(json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v))}")
    return 0


def cmd_verify_live(a):
    m = RunModel(a.dir, a.run)
    m.meta["rand_blocks"] = a.rand_blocks
    base = load_hashes(a.base)
    split_hashes = load_hashes(a.split_hashes) if a.split_hashes else None
    if m.event("restore_begin") and split_hashes is None:
        print(json.dumps(dict(error="restore in the run but no split image hashes")))
        return 1
    newbase = open(a.new_base + ".tmp", "wb") if a.new_base else None
    fn, chunk_fn = live_expect(m, split_hashes)
    res = check(m, read_units(a.src, a.rand_blocks, a.blocks), base, fn, chunk_fn,
                newbase=newbase)
    if newbase:
        newbase.close()
        os.replace(a.new_base + ".tmp", a.new_base)
    res.update(run=a.run, bulk_blocks=m.bulk_blocks, events=[e["ev"] for e in m.events])
    return _report(a, res)


def cmd_verify_split(a):
    """The split image of the run's split is exactly the volume at the split: every write
    acknowledged before the split began is in it, no write begun after it returned is (the
    bulk pass of the run comes after its split)."""
    m = RunModel(a.dir, a.run)
    m.meta["rand_blocks"] = a.rand_blocks
    base = load_hashes(a.base)
    sb, sd = m.event("split_begin"), m.event("split_done")
    win = _window(m, sb, sd)
    if sd is None:
        # the split never returned: the write in flight at the cut may have begun before it
        for b, (s, q) in m.inflight.items():
            m.by_block.setdefault(b, []).append((s, q))

    def fn(b, base_h):
        writes = m.by_block.get(b, [])
        before = [(s, q) for s, q in writes if q <= win[s][0]]
        amb = {_tok_w(m.run, s, q) for s, q in writes
               if q > win[s][0] and (win[s][1] is None or q <= win[s][1])}
        if before:
            s, q = before[-1]
            return {_tok_w(m.run, s, q)} | amb, f"run {m.run} stream {s} seq {q} (before the split)", 1
        return {("h", base_h)} | amb, "unchanged since the run began (before the split)", 0

    def chunk_fn(first, base_h):
        return base_h, "unchanged since the run began (before the split)", 0

    res = check(m, read_units(a.src, a.rand_blocks, a.blocks, False), base, fn, chunk_fn,
                inflight_ok=False)
    res["acked_before_split"] = sum(int(v) for v in (sb or {}).get("seqs", {}).values())
    res["split_returned"] = sd is not None
    res.update(run=a.run)
    return _report(a, res)


def cmd_cli(a):
    """Run the lvmirror command (lvmirror.cli.main, imported ahead) between two events: EVENT_begin
    with the streams' seqs, then (with --signal) the host's cue, then the command, then
    EVENT_done once it returned 0 (and then the cue with --signal-after: a job started). With
    the imports made ahead, the cue comes right before the D-Bus call, not seconds before it as
    a fresh `lvmirror` process under TCG would."""
    import contextlib
    import io
    import lvmirror.cli as cli
    import dbus  # noqa: F401 (imported ahead)
    evfile = os.path.join(a.dir, f"run{a.run}-events.jsonl")
    meta = _writer_meta(a.dir, a.run)

    def mark(ev, **kv):
        d = dict(ev=ev, t=time.time(), **kv)
        if meta:
            d["seqs"] = last_seqs(a.dir, a.run, meta["streams"])
        append_fsync(evfile, json.dumps(d) + "\n")
    mark(a.event + "_begin", args=" ".join(a.args))
    ready = os.path.join(a.dir, f"cut-ready-{a.run}")
    if a.signal:
        append_fsync(ready, "")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.main(a.args)
    if rc == 0:
        mark(a.event + "_done", out=out.getvalue().strip())
        if a.signal_after:
            append_fsync(ready, "")
    print(out.getvalue().strip())
    return rc


def cmd_status(a):
    """lvmirror --json status (saved to FILE) as shell assignments: PCS_STATE_i, PCS_PATH_i,
    PCS_NIMAGES, PCS_INSYNC (paths), PCS_JOBS (kind:state:done/total ...), PCS_LUNS."""
    import shlex
    import subprocess
    r = subprocess.run(["lvmirror", "--json", "status"], capture_output=True, text=True)
    with open(a.file, "w") as f:
        f.write(r.stdout + r.stderr)
    try:
        st = json.loads(r.stdout)
        v = st["volumes"][a.volume]
    except (ValueError, KeyError):
        st, v = {"luns": []}, {"images": [], "jobs": []}
    out = {"PCS_NIMAGES": len(v["images"]),
           "PCS_INSYNC": " ".join(im["path"] for im in v["images"] if im["state"] == "in-sync"),
           "PCS_JOBS": " ".join(f"{j['kind']}:{j['state']}:{j['bytes_done']}/{j['bytes_total']}"
                                for j in v["jobs"]),
           "PCS_LUNS": " ".join(l["cfgstring"] + (" NOT-READY:" + str(l["error"]) if l["error"] else "")
                                for l in st.get("luns", []))}
    for i in range(4):
        im = [x for x in v["images"] if x["index"] == i]
        out[f"PCS_STATE_{i}"] = im[0]["state"] if im else ""
        out[f"PCS_PATH_{i}"] = im[0]["path"] if im else ""
    for k, val in out.items():
        print(f"{k}={shlex.quote(str(val))}")
    return 0


def cmd_sha(a):
    h = hashlib.sha256()
    with open(a.file, "rb") as f:
        while True:
            d = f.read(1 << 20)
            if not d:
                break
            h.update(d)
    print(h.hexdigest())
    return 0


def cmd_wait_change(a):
    t0 = time.monotonic()
    last = os.stat(a.file).st_mtime_ns if os.path.exists(a.file) else None
    changes = 0
    while time.monotonic() - t0 < a.timeout:
        try:
            now = os.stat(a.file).st_mtime_ns
        except FileNotFoundError:
            now = None
        if now != last and now is not None:
            changes += 1
            last = now
            if changes >= a.count:
                print(now)
                return 0
        time.sleep(0.02)
    return 1


def cmd_summary(a):
    """Host side (lab/powercut, lab/soak): the figures of every chain under OUT, as a table."""
    import glob
    cuts = [json.loads(l) for l in open(os.path.join(a.out, "cuts.jsonl"))] \
        if os.path.exists(os.path.join(a.out, "cuts.jsonl")) else []
    results = [json.loads(l) for l in open(os.path.join(a.out, "results.jsonl"))] \
        if os.path.exists(os.path.join(a.out, "results.jsonl")) else []
    figs = []
    for path in sorted(glob.glob(os.path.join(a.out, "chain*", "pc", "figures.jsonl"))):
        figs += [json.loads(l) for l in open(path)]
    order = ["steady", "split", "resync", "restore", "checkpoint", "attach"]
    rows = {}
    for m in order:
        c = [x for x in cuts if x["moment"] == m]
        f = [x for x in figs if x["moment"] == m]
        if not c and not f:
            continue
        se = [x["split_exact"] for x in f if x.get("split_exact") not in ("na", None)]
        rows[m] = dict(cuts=len(c), checked_boots=len(f),
                       acked=sum(int(x.get("acked", 0)) for x in f),
                       checked=sum(int(x.get("checked", 0)) for x in f),
                       lost=sum(max(int(x.get("lost", 0)), 0) for x in f),
                       lost_unknown=sum(1 for x in f if int(x.get("lost", 0)) < 0),
                       identical=sum(1 for x in f if x.get("identical") == "yes"),
                       split_exact=sum(1 for x in se if x == "yes"), split_checked=len(se))
    failed = [f"{r['check']} (chain {r.get('chain')}, boot {r.get('boot')})"
              for r in results if not r.get("ok")]
    summary = dict(wall_seconds=a.wall, moments=rows, checks=len(results),
                   checks_failed=failed, cuts=len(cuts))
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    hdr = ["moment", "cuts", "acked writes", "blocks checked", "lost", "images identical",
           "split copies exact"]
    lines = [hdr]
    for m, r in rows.items():
        lines.append([m, str(r["cuts"]), str(r["acked"]), str(r["checked"]),
                      str(r["lost"]) + (f" (+{r['lost_unknown']} unchecked)" if r["lost_unknown"] else ""),
                      f"{r['identical']}/{r['checked_boots']}",
                      f"{r['split_exact']}/{r['split_checked']}" if r["split_checked"] else "-"])
    w = [max(len(l[i]) for l in lines) for i in range(len(hdr))]
    print(f"\npower-cut figures ({len(cuts)} cuts, {a.wall} s wall):")
    for i, l in enumerate(lines):
        print("  " + "  ".join(v.ljust(w[j]) for j, v in enumerate(l)))
        if i == 0:
            print("  " + "  ".join("-" * w[j] for j in range(len(hdr))))
    print(f"checks: {len(results) - len(failed)} of {len(results)} passed"
          + ("" if not failed else "; failed: " + ", ".join(failed)))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("write")
    s.add_argument("dev"); s.add_argument("dir"); s.add_argument("run", type=int)
    s.add_argument("--streams", type=int, default=4)
    s.add_argument("--rand-blocks", type=int, required=True)
    s.add_argument("--stop", required=True)
    s.add_argument("--pause-ms", type=float, default=0, help="each stream, after each write")
    s = sub.add_parser("bulk")
    s.add_argument("dev"); s.add_argument("dir"); s.add_argument("run", type=int)
    s.add_argument("--start", type=int, required=True); s.add_argument("--count", type=int, required=True)
    s = sub.add_parser("mark")
    s.add_argument("dir"); s.add_argument("run", type=int); s.add_argument("event")
    s.add_argument("kv", nargs="*")
    s = sub.add_parser("hashes")
    s.add_argument("src"); s.add_argument("out"); s.add_argument("--blocks", type=int)
    s.add_argument("--rand-blocks", type=int, required=True)
    for name in ("verify-live", "verify-split"):
        s = sub.add_parser(name)
        s.add_argument("src"); s.add_argument("dir"); s.add_argument("run", type=int)
        s.add_argument("--base", required=True); s.add_argument("--blocks", type=int, required=True)
        s.add_argument("--rand-blocks", type=int, required=True)
        s.add_argument("--json", required=True, help="the figures, as JSON")
        if name == "verify-live":
            s.add_argument("--split-hashes"); s.add_argument("--new-base")
    s = sub.add_parser("cli")
    s.add_argument("dir"); s.add_argument("run", type=int); s.add_argument("event")
    s.add_argument("--signal", action="store_true", help="the host's cue before the command")
    s.add_argument("--signal-after", action="store_true", help="... once it returned 0")
    s.add_argument("args", nargs=argparse.REMAINDER)
    s = sub.add_parser("status")
    s.add_argument("file"); s.add_argument("volume")
    s = sub.add_parser("sha")
    s.add_argument("file")
    s = sub.add_parser("wait-change")
    s.add_argument("file"); s.add_argument("--timeout", type=float, default=30)
    s.add_argument("--count", type=int, default=1)
    s = sub.add_parser("summary")
    s.add_argument("out"); s.add_argument("--wall", type=int, default=0)
    a = p.parse_args(argv)
    return globals()["cmd_" + a.cmd.replace("-", "_")](a)


if __name__ == "__main__":
    sys.exit(main())
