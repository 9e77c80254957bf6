"""CommandRing: user space's side of the TCMU command ring (mailbox + ring + data area in one map).

Two cursors, as libtcmu keeps them:

* the *fetch cursor* (private) walks from where we last looked to the kernel's ``cmd_head``:
  PAD entries are skipped, TMR entries record the command ids they abort, CMD entries become
  ``Command`` objects whose CDB and iovecs are **copied** at once (a later out-of-order
  completion overwrites the entry), any other opcode gets ``UFLAG_UNKNOWN_OP``;
* the *completion cursor* is the mailbox's ``cmd_tail``. Completions may come in any order
  (the kernel offers CAP_OOOC): ``complete`` skips non-CMD entries at the tail, writes the
  finished command's id and response into the CMD entry it finds there ("steals" it, as
  libtcmu's ``tcmulib_command_complete`` does) and advances ``cmd_tail`` with one aligned
  32-bit store after the response bytes. The kernel looks commands up by the id it reads.

The caller tells the kernel with one 4-byte write to the uio fd per batch of completions
(``pending_notify`` says one is due for entries the ring retired by itself).

Safety: every offset read from the ring is checked before use. An entry whose length, CDB
offset or iovecs point outside the ring or the data area is completed at once with CHECK
CONDITION, HARDWARE ERROR / INTERNAL TARGET FAILURE and never handed out, so no view ever
reaches outside the data area (touching an unmapped data page is a SIGBUS, not an exception).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import struct
import threading
import time

from lvmirror.tcmu import abi

log = logging.getLogger(__name__)

__all__ = ["Batch", "Command", "CommandRing", "RingError"]

CHECK_CONDITION = 0x02
# Fixed-format sense: HARDWARE ERROR, INTERNAL TARGET FAILURE (44h/00h).
SENSE_INTERNAL_TARGET_FAILURE = bytes([0x70, 0, 0x04, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x44, 0x00,
                                       0, 0, 0, 0])
MAX_CDB_LEN = 260      # SCSI variable-length CDBs are at most 260 bytes


class RingError(Exception):
    """The map is not a usable TCMU ring (wrong mailbox version, inconsistent geometry)."""


# The hot path's accessors, bound once (the layouts are declared in abi):
_CMD_HEAD = abi.MAILBOX.reader("cmd_head").unpack_from         # (cmd_head,)
_LEN_OP = abi.ENTRY_HDR.reader("len_op").unpack_from            # (len_op,)
_LEN_OP_UFLAGS = abi.ENTRY_HDR.reader("len_op", "uflags").unpack_from
_CMD_ID_OFF, _CMD_ID = abi.ENTRY.cmd_id.offset, abi.ENTRY.span("cmd_id")[1].pack_into
_RSP_OFF, _RSP = abi.ENTRY_RSP_OFFSET, abi.ENTRY_RSP.pack_into    # uflags, scsi_status
_SENSE_OFF = abi.ENTRY.sense_buffer.offset
_UFLAGS_CLEAR = ~(abi.UFLAG_UNKNOWN_OP | abi.UFLAG_READ_LEN | abi.UFLAG_KEEP_BUF) & 0xFF
_OP_MASK = abi.OP_MASK
_OP_CMD = abi.OP_CMD
_ENTRY_REQ = abi.ENTRY_REQ.unpack_from
_IOV_OFF, _IOV_SIZE = abi.ENTRY_IOV_OFFSET, abi.IOVEC.size
_IOV = abi.IOVEC.struct.unpack_from
# take_batch's description of the commands it took (lvmirror/tcmu/_fastread.c: struct
# taken_hdr, struct taken, struct taken_iov), native byte order
_TAKEN_HDR = struct.Struct("=II").unpack_from
_TAKEN_HDR_SIZE = 8
_TAKEN_STRUCT = struct.Struct("=QQIIHB5x16s")
_TAKEN = _TAKEN_STRUCT.unpack_from
_TAKEN_SIZE = _TAKEN_STRUCT.size
_TAKEN_ITER = _TAKEN_STRUCT.iter_unpack
_TAKEN_IOV = struct.Struct("=QQ").unpack_from
_TAKEN_IOV_SIZE = 16
_IOV_ITER = abi.IOVEC.struct.iter_unpack


class Command:
    """A fetched SCSI command: copies of its CDB and iovecs, views onto its data buffers."""

    __slots__ = ("cmd_id", "cdb", "iovecs", "iov_views", "bidi_views", "data_len", "fetched")

    def __init__(self, cmd_id, cdb, iovecs, iov_views, bidi_views, fetched=0.0,
                 data_len=None):
        self.cmd_id = cmd_id
        self.cdb = cdb
        self.iovecs = iovecs              # [(offset in map, length)], Data-Out or Data-In
        self.iov_views = iov_views        # memoryviews onto those bytes of the map
        self.bidi_views = bidi_views      # Data-In views of a bidirectional command
        # bytes of Data-Out or Data-In (the sum of the iovecs' lengths; the ring passes it)
        self.data_len = sum(ln for _, ln in iovecs) if data_len is None else data_len
        self.fetched = fetched            # time.monotonic() of the fetch that found it

    def release(self) -> bool:
        """Drop the views onto the map (after completion). Returns False while a view is still
        in use - a mirror leg left behind as slow may still be writing from it - and keeps that
        view for a later call; True once every view is released."""
        held = []
        for views in (self.iov_views, self.bidi_views):
            for v in views:
                try:
                    v.release()
                except BufferError:
                    held.append(v)
        self.iov_views = held
        self.bidi_views = []
        return not held

    def __repr__(self):
        return f"<Command id={self.cmd_id} cdb={self.cdb.hex()} data={self.data_len}>"


class Batch:
    """What one ``fetch`` found: new commands, and the id lists TMR entries abort, with, for
    each list, how many of ``commands`` came before its TMR entry in the ring (``abort_at``: a
    TMR names only commands queued before it; a command after it may carry an id the kernel
    freed and gave again)."""

    __slots__ = ("commands", "aborts", "abort_at", "tmrs")

    def __init__(self):
        self.commands: list[Command] = []
        self.aborts: list[list[int]] = []
        self.abort_at: list[int] = []
        self.tmrs: list[tuple[int, list[int]]] = []

    def __bool__(self):
        return bool(self.commands or self.aborts)


class CommandRing:
    """The ring inside ``mapping`` (an mmap or any writable buffer of ``map_size`` bytes)."""

    def __init__(self, mapping, *, map_size: int | None = None):
        self._mv = memoryview(mapping).cast("B")
        self.map_size = map_size if map_size is not None else len(self._mv)
        if self.map_size > len(self._mv) or self.map_size < abi.MAILBOX.size:
            raise RingError(f"map of {len(self._mv)} bytes cannot hold a {self.map_size}-byte ring")
        mb = abi.MAILBOX
        version = mb.version.get(self._mv)
        if version != abi.MAILBOX_VERSION:
            raise RingError(f"TCMU mailbox version {version}, this handler speaks version "
                            f"{abi.MAILBOX_VERSION} (Linux 4.x-6.x); refusing the device")
        self.flags = mb.flags.get(self._mv)
        self.cmdr_off = mb.cmdr_off.get(self._mv)
        self.cmdr_size = mb.cmdr_size.get(self._mv)
        if (self.cmdr_off < abi.MAILBOX.size or self.cmdr_size < abi.ENTRY.size
                or self.cmdr_off + self.cmdr_size > self.map_size or self.cmdr_off % 8
                or self.cmdr_size % abi.OP_ALIGN_SIZE):
            raise RingError(f"TCMU ring geometry off={self.cmdr_off} size={self.cmdr_size} does "
                            f"not fit a {self.map_size}-byte map")
        if not self.flags & abi.CAP_OOOC:
            raise RingError("the kernel does not offer out-of-order completion (CAP_OOOC)")
        self.data_off = self.cmdr_off + self.cmdr_size
        self.read_len_supported = bool(self.flags & abi.CAP_READ_LEN)
        self._tail_word = ctypes.c_uint32.from_buffer(self._mv, abi.MAILBOX.cmd_tail.offset)
        self._fetch = self._tail_word.value % self.cmdr_size  # pick up where the kernel reaps
        self._outstanding = 0
        self._lock = threading.Lock()
        self.pending_notify = False
        self.stats = dict(fetched=0, completed=0, pads=0, tmrs=0, unknown_ops=0, malformed=0)

    # -- helpers -----------------------------------------------------------------------------

    @property
    def head(self) -> int:
        """The mailbox's ``cmd_head``: ring offset, in bytes, where the kernel puts its next
        entry."""
        return abi.MAILBOX.cmd_head.get(self._mv)

    @property
    def tail(self) -> int:
        """The mailbox's ``cmd_tail``: ring offset, in bytes, up to which entries are completed (the
        kernel reaps up to it)."""
        return self._tail_word.value

    def _set_tail(self, value: int) -> None:
        self._tail_word.value = value % self.cmdr_size   # one aligned 32-bit store

    def _entry_len(self, pos: int) -> int:
        return abi.entry_len(abi.ENTRY_HDR.len_op.get(self._mv, self.cmdr_off + pos))

    # -- fetching ----------------------------------------------------------------------------

    def fetch(self) -> Batch:
        """Walk from the fetch cursor to ``cmd_head``; return the new commands and aborts."""
        batch = Batch()
        now = time.monotonic()
        with self._lock:
            (head,) = _CMD_HEAD(self._mv)
            if head >= self.cmdr_size or head % 8:
                log.error("TCMU ring: cmd_head %d outside the %d-byte ring; ignoring it", head,
                          self.cmdr_size)
                return batch
            mv, base = self._mv, self.cmdr_off
            hdr = abi.ENTRY_HDR
            commands = batch.commands
            while self._fetch != head:
                pos = self._fetch
                ent = base + pos
                (len_op,) = _LEN_OP(mv, ent)
                op, length = len_op & _OP_MASK, len_op & ~_OP_MASK
                if (length < abi.ENTRY_HDR.size or pos + length > self.cmdr_size
                        or length > (head - pos) % self.cmdr_size):
                    # (the kernel's entries end at cmd_head: one that runs past it, a whole
                    # ring's length say, would have the cursor circle forever)
                    # Nothing sane to skip by: stop here; the kernel will see the ring stall
                    # and time the commands out rather than us reading garbage forever.
                    log.error("TCMU ring: entry at %d has length %d (ring %d); ring is corrupt",
                              pos, length, self.cmdr_size)
                    self.stats["malformed"] += 1
                    break
                if op == _OP_CMD:
                    self._outstanding += 1
                    cmd = self._parse_cmd(pos, length, now)
                    if cmd.__class__ is not Command:        # malformed: its cmd_id
                        self.stats["malformed"] += 1
                        self._fetch = (pos + length) % self.cmdr_size
                        self._complete_locked(cmd, CHECK_CONDITION,
                                              SENSE_INTERNAL_TARGET_FAILURE, None)
                        self.pending_notify = True
                        continue
                    self.stats["fetched"] += 1
                    commands.append(cmd)
                elif op == abi.OP_PAD:
                    self.stats["pads"] += 1
                elif op == abi.OP_TMR:
                    self.stats["tmrs"] += 1
                    tmr = self._parse_tmr(ent, length)
                    if tmr is not None:
                        batch.tmrs.append(tmr)
                        if tmr[1]:
                            batch.aborts.append(tmr[1])
                            batch.abort_at.append(len(commands))
                else:
                    self.stats["unknown_ops"] += 1
                    uf = hdr.uflags.get(mv, ent)
                    hdr.uflags.put(mv, ent, uf | abi.UFLAG_UNKNOWN_OP)
                self._fetch = (pos + length) % self.cmdr_size
            if self._outstanding == 0:
                self._retire_idle_locked()
        return batch

    def _parse_tmr(self, ent: int, length: int):
        mv, t = self._mv, abi.TMR_ENTRY
        if length < t.size:
            return None
        cnt = t.cmd_cnt.get(mv, ent)
        if abi.TMR_CMD_IDS_OFFSET + 2 * cnt > length:
            log.error("TCMU ring: TMR entry lists %d ids in %d bytes; ignoring its ids", cnt, length)
            return (t.tmr_type.get(mv, ent), [])
        ids = [int.from_bytes(mv[ent + abi.TMR_CMD_IDS_OFFSET + 2 * k:
                                 ent + abi.TMR_CMD_IDS_OFFSET + 2 * k + 2], "little")
               for k in range(cnt)]
        return (t.tmr_type.get(mv, ent), ids)

    def _parse_cmd(self, pos: int, length: int, fetched: float = 0.0) -> Command | int:
        """The command in the ``length``-byte CMD entry at ring offset ``pos``; when the entry
        is shorter than its header, carries DIF iovecs, or its iovecs or CDB lie outside it or
        the data area, its cmd_id instead (logged; the caller completes it with CHECK
        CONDITION). Its header is read in one ``unpack_from`` (``abi.ENTRY_REQ``)."""
        mv = self._mv
        ent = self.cmdr_off + pos
        if length < abi.ENTRY.size:
            cmd_id = abi.ENTRY_HDR.cmd_id.get(mv, ent)
            log.error("TCMU ring: command %d entry is %d bytes (< %d)", cmd_id, length,
                      abi.ENTRY.size)
            return cmd_id
        _, cmd_id, iov_cnt, bidi_cnt, dif_cnt, cdb_off = _ENTRY_REQ(mv, ent)
        if dif_cnt:
            log.error("TCMU ring: command %d carries DIF iovecs (not supported)", cmd_id)
            return cmd_id
        total = iov_cnt + bidi_cnt
        iov_end = _IOV_OFF + _IOV_SIZE * total
        if iov_end > length:
            log.error("TCMU ring: command %d lists %d iovecs in a %d-byte entry", cmd_id, total,
                      length)
            return cmd_id
        # The CDB lies inside this entry, after the iovecs (offset is from the map start).
        entry_end = ent + length
        if not ent + iov_end <= cdb_off < entry_end:
            log.error("TCMU ring: command %d CDB offset %d outside its entry [%d, %d)", cmd_id,
                      cdb_off, ent + iov_end, entry_end)
            return cmd_id
        opcode = mv[cdb_off]
        cdb_len = _COMMAND_SIZE[opcode >> 5] if opcode != 0x7F else None
        if cdb_len is None or cdb_off + cdb_len > entry_end:
            cdb_len = _cdb_length(opcode, mv, cdb_off, entry_end)
            if cdb_len is None:
                log.error("TCMU ring: command %d CDB (opcode %02x) does not fit its entry",
                          cmd_id, opcode)
                return cmd_id
        cdb = bytes(mv[cdb_off:cdb_off + cdb_len])
        lo, hi = self.data_off, self.map_size
        if total == 1:       # the usual case: one Data-Out or Data-In buffer
            base, ln = _IOV(mv, ent + _IOV_OFF)
            iovecs = [(base, ln)]
            if not ln:
                views = []
            elif lo <= base and base + ln <= hi:
                views = [mv[base:base + ln]]
            else:
                log.error("TCMU ring: command %d iovec 0 [%d, +%d) outside the data area "
                          "[%d, %d)", cmd_id, base, ln, lo, hi)
                return cmd_id
            if iov_cnt:
                return Command(cmd_id, cdb, iovecs, views, [], fetched, ln)
            return Command(cmd_id, cdb, [], [], views, fetched, 0)
        iovecs = list(_IOV_ITER(mv[ent + _IOV_OFF:ent + iov_end])) if total else []
        for k, (base, ln) in enumerate(iovecs):
            if ln and not (lo <= base and base + ln <= hi):
                log.error("TCMU ring: command %d iovec %d [%d, +%d) outside the data area "
                          "[%d, %d)", cmd_id, k, base, ln, lo, hi)
                return cmd_id
        views = [mv[b:b + ln] for b, ln in iovecs[:iov_cnt] if ln]
        bidi = [mv[b:b + ln] for b, ln in iovecs[iov_cnt:] if ln]
        return Command(cmd_id, cdb, iovecs[:iov_cnt], views, bidi, fetched)

    def _fast_done_locked(self, fetch: int, answered: int, pads: int) -> None:
        """After a compiled batch (``fast_reads``): the new fetch cursor, its
        ``answered`` commands (fetched and completed at once) and ``pads`` in the statistics;
        with nothing outstanding, retire the entries it skipped."""
        self._fetch = fetch
        if answered or pads:
            st = self.stats
            st["fetched"] += answered
            st["completed"] += answered
            st["pads"] += pads
            if self._outstanding == 0:
                self._retire_idle_locked()

    def fast_reads(self, read_batch, fd: int, rwf: int, num_blocks: int, block_size: int,
                   max_bytes: int, max_blocks: int, checks: tuple, busy: tuple,
                   big_bytes: int = 0, write_bytes: int = 0):
        """Let ``read_batch`` (``lvmirror.tcmu._fastread.read_batch``, the compiled path) answer
        the READs from the fetch cursor on that the page cache holds, under the ring's lock;
        then, with nothing outstanding, retire the entries it skipped. Arguments after it are
        ``read_batch``'s (``fd``, ``rwf`` for preadv2, the LUN's ``num_blocks`` of
        ``block_size`` bytes, ``max_bytes`` and ``max_blocks`` a command may read, the
        ``checks``/``busy`` conditions, ``big_bytes``: a READ over ``max_bytes`` and at most
        this stops it with STOP_BIG_READ, for a READ batch: ``take_fast``; ``write_bytes``: a
        WRITE of at most this stops it with STOP_WRITE, for a WRITE batch, a larger one with
        STOP_OTHER, for the Python fetch; 0: ``max_bytes``). Returns ``(answered,
        nbytes, why)``: commands completed GOOD (the caller notifies the kernel), their bytes,
        and why it stopped (``_fastread``'s STOP_*). ValueError/TypeError from ``read_batch``
        for malformed arguments."""
        with self._lock:
            fetch, answered, nbytes, pads, why = read_batch(
                self._mv, self.cmdr_off, self.cmdr_size, self.data_off, self.map_size,
                self._fetch, fd, rwf, num_blocks, block_size, max_bytes, max_blocks, checks,
                busy, big_bytes, write_bytes)
            self._fast_done_locked(fetch, answered, pads)
        return answered, nbytes, why

    def take_fast(self, take_batch, num_blocks: int, block_size: int, max_bytes: int,
                  max_blocks: int, max_commands: int, checks: tuple, busy: tuple,
                  writes: bool, other_bytes: int = 0):
        """Let ``take_batch`` (``lvmirror.tcmu._fastread.take_batch``) take the consecutive
        WRITEs without FUA (``writes``) or READs from the fetch cursor on, at most
        ``max_commands`` (``max_bytes`` each, of ``block_size``-byte blocks inside
        ``num_blocks``; a command of the other kind stops it as the other kind's - parsed up to
        the larger of ``max_bytes`` and ``other_bytes``, beyond which it is the Python
        fetch's), under the ring's lock: the fetch cursor
        moves past them and they are
        outstanding, as fetched commands are, until ``complete_taken`` answers them or the
        caller makes the rest Commands (``taken_commands``) for the Python path. No I/O here:
        the caller makes it with ``run_taken``, without the ring's lock, so a ring thread that
        takes over from a stuck one fetches and completes meanwhile. Returns ``(taken, why,
        packed, first, blocks)``: how many it took, why it stopped (``_fastread``'s STOP_*),
        take_batch's description of them (bytes) and the blocks ``[first, first + blocks)``
        they cover. ValueError/TypeError for malformed arguments."""
        with self._lock:
            fetch, taken, pads, why, packed, first, blocks = take_batch(
                self._mv, self.cmdr_off, self.cmdr_size, self.data_off, self.map_size,
                self._fetch, num_blocks, block_size, max_bytes, max_blocks, max_commands,
                checks, busy, writes, other_bytes)
            self._fetch = fetch
            self._outstanding += taken
            st = self.stats
            st["fetched"] += taken
            st["pads"] += pads
            if self._outstanding == 0 and pads:
                self._retire_idle_locked()
        return taken, why, packed, first, blocks

    def lease_runner(self, lease_batch, num_blocks: int, block_size: int):
        """``lease_batch`` (``lvmirror.tcmu._fastread.lease_batch``) with this ring's map,
        geometry, this ring and its lock bound, and the LUN's ``num_blocks`` of ``block_size``
        bytes: the ring thread under its lease takes, makes and completes a batch in one call,
        the ring's state (fetch cursor, outstanding count, statistics, pending_notify) moved
        under the ring's lock as ``take_fast`` and ``complete_taken`` move it. The caller binds
        the rest of ``lease_batch``'s arguments (``LunServer._arm_compiled``)."""
        return functools.partial(lease_batch, self._mv, self.cmdr_off, self.cmdr_size,
                                 self.data_off, self.map_size, self, self._lock, num_blocks,
                                 block_size)

    def run_taken(self, run_batch, packed: bytes, count: int, fds: tuple, rwf: int,
                  writes: bool):
        """The I/O of the first ``count`` commands ``take_fast`` took (``packed``), by ``run_batch``
        (``lvmirror.tcmu._fastread.run_batch``) with the GIL released and WITHOUT the ring's
        lock: a WRITE batch's Data-Out written to each descriptor of ``fds`` (1-4 images), a
        READ batch's Data-In read from ``fds[0]`` with preadv2 flags ``rwf``. Returns
        ``(done, nbytes, err, leg)``: the first ``done`` commands were done whole, ``nbytes``
        bytes, the errno of the one that failed (0: none, or a short transfer) and the index in
        ``fds`` of the descriptor it failed on."""
        return run_batch(self._mv, self.data_off, self.map_size, packed, count, fds, rwf,
                         writes)

    @staticmethod
    def taken_ranges(packed: bytes, block_size: int) -> list[tuple[int, int]]:
        """The ranges of the commands ``take_fast`` took (``packed``), in order, as ``(first
        block, blocks)`` of ``block_size`` bytes: what the caller locks before ``run_taken``."""
        n, _ = _TAKEN_HDR(packed, 0)
        return [(offset // block_size, want // block_size)
                for offset, want, *_ in _TAKEN_ITER(packed[_TAKEN_HDR_SIZE:
                                                           _TAKEN_HDR_SIZE + n * _TAKEN_SIZE])]

    def complete_taken(self, complete_batch, packed: bytes, count: int, busy: tuple,
                       notify: bool = False):
        """Answer GOOD the first ``count`` commands ``take_fast`` took (``packed``) with
        ``complete_batch`` (``lvmirror.tcmu._fastread.complete_batch``) under the ring's lock,
        unless a ``busy`` condition holds now (then none). Returns ``(completed, nbytes)``; the
        caller notifies the kernel - or, with ``notify`` (it is not the ring thread), leaves
        that to the ring thread's next ``take_notify`` - and gives the others to the Python
        path (``taken_commands``)."""
        with self._lock:
            completed, nbytes = complete_batch(
                self._mv, self.cmdr_off, self.cmdr_size, self.data_off, self.map_size, packed,
                count, busy)
            if completed:
                self._outstanding -= completed
                self.stats["completed"] += completed
                if notify:
                    self.pending_notify = True
                if self._outstanding == 0:
                    self._retire_idle_locked()
        return completed, nbytes

    def taken_commands(self, packed: bytes, start: int, fetched: float = 0.0) -> list[Command]:
        """The commands ``take_fast`` took (``packed``) from the ``start``-th on, as Commands
        for the Python path (``fetched``: their fetch time, ``time.monotonic``): outstanding
        already, answered by ``complete`` as any other. Their views onto the data area are made
        here; their ring entries may be answers of other commands by now, which is why
        ``packed`` keeps their CDBs and iovecs."""
        n, _ = _TAKEN_HDR(packed, 0)
        mv = self._mv
        iov_at = _TAKEN_HDR_SIZE + n * _TAKEN_SIZE
        out = []
        for k in range(start, n):
            _, want, first, cnt, cmd_id, cdb_len, cdb = _TAKEN(
                packed, _TAKEN_HDR_SIZE + k * _TAKEN_SIZE)
            iovecs = [_TAKEN_IOV(packed, iov_at + (first + j) * _TAKEN_IOV_SIZE)
                      for j in range(cnt)]
            views = [mv[b:b + ln] for b, ln in iovecs if ln]
            out.append(Command(cmd_id, cdb[:cdb_len], iovecs, views, [], fetched, want))
        return out

    # -- completing --------------------------------------------------------------------------

    def complete(self, cmd_id: int, status: int, sense: bytes = b"",
                 read_len: int | None = None) -> None:
        """Complete command ``cmd_id`` (any order). ``read_len``: bytes of Data-In actually
        returned, when fewer than the transfer length. Thread-safe; the caller notifies."""
        with self._lock:
            self._complete_locked(cmd_id, status, sense, read_len)
            if self._outstanding == 0:
                self._retire_idle_locked()

    def _complete_locked(self, cmd_id, status, sense, read_len):
        if self._outstanding <= 0:
            raise RingError(f"completion of command {cmd_id} with none outstanding")
        mv, size, base = self._mv, self.cmdr_size, self.cmdr_off
        tail = self._tail_word.value % size
        while True:       # skip PAD / TMR / unknown-op entries at the tail
            ent = base + tail
            len_op, uflags = _LEN_OP_UFLAGS(mv, ent)
            if len_op & _OP_MASK == _OP_CMD:
                break
            tail = (tail + (len_op & ~_OP_MASK)) % size
        _CMD_ID(mv, ent + _CMD_ID_OFF, cmd_id)
        uflags &= _UFLAGS_CLEAR
        if sense:
            sense = bytes(sense[:abi.SENSE_BUFFERSIZE])
            off = ent + _SENSE_OFF
            mv[off:off + len(sense)] = sense
        if read_len is not None and self.read_len_supported:
            abi.ENTRY.read_len.put(mv, ent, read_len)
            uflags |= abi.UFLAG_READ_LEN
        _RSP(mv, ent + _RSP_OFF, uflags, status & 0xFF)
        self._outstanding -= 1
        self.stats["completed"] += 1
        # _set_tail, written out (every completion): one aligned 32-bit store
        self._tail_word.value = (tail + (len_op & ~_OP_MASK)) % size

    def _retire_idle_locked(self):
        """Nothing outstanding: move cmd_tail up to the fetch cursor (over pads, TMRs,
        unknown-op entries) so the kernel can reuse that ring space."""
        if self._tail_word.value % self.cmdr_size != self._fetch:
            self._set_tail(self._fetch)
            self.pending_notify = True

    def take_notify(self) -> bool:
        """True (once) if the ring retired entries by itself, or a thread that is not the ring
        thread completed commands (``complete_taken``), since the last call."""
        with self._lock:
            due, self.pending_notify = self.pending_notify, False
            return due

    @property
    def outstanding(self) -> int:
        """Commands ``fetch`` handed out and ``complete`` has not answered yet."""
        return self._outstanding

    def close(self):
        """Drop every reference into the map so that it can be unmapped."""
        self._tail_word = None
        self._mv.release()


def _cdb_length(opcode: int, mv, cdb_off: int, limit: int) -> int | None:
    """Length of the CDB as the kernel's scsi_command_size() computes it; None if it would run
    past ``limit``."""
    if opcode == 0x7F:         # VARIABLE LENGTH: 8 + additional CDB length (byte 7)
        if cdb_off + 8 > limit:
            return None
        n = 8 + mv[cdb_off + 7]
    else:
        n = _COMMAND_SIZE[opcode >> 5]
    if n > MAX_CDB_LEN or cdb_off + n > limit:
        return None
    return n


_COMMAND_SIZE = (6, 10, 10, 12, 16, 12, 10, 10)   # scsi_command_size_tbl, by group code
