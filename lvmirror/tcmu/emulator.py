"""RingEmulator: the kernel's side of a TCMU device, byte for byte, in an mmap'd file.

It lays the file out as ``target_core_user`` lays out the uio map (mailbox, command ring, data
area at ``cmdr_off + cmdr_size``), queues commands as ``queue_cmd_ring()`` does (a PAD entry when
an entry would not fit before the end of the ring, the 1-byte-free space check, iovecs into
4 KiB data blocks that need not be contiguous, the CDB after the iovecs with ``cdb_off`` counted
from the map start), queues TMR entries as ``queue_tmr_ring()`` does, and reaps completions as
``tcmu_handle_completions()`` does when the handler writes 4 bytes to the "uio fd" (walk from
the last cleaned entry to ``cmd_tail``, skip PAD and TMR entries, look each command up by the
id found in the entry: an unknown id is a broken ring, which tests assert never happens).

The "uio fd" is one end of a socketpair: the emulator writes a 4-byte event counter to signal
new entries (the handler polls it and reads 4 bytes, as with ``uio_read``), the handler writes
4 bytes to signal completions. ``handle()`` gives the object the daemon's ring loop uses for a
real device (``fd``, ``map``, ``map_size``, ``clear_event()``, ``notify()``, ``close()``), so
the real ``LunServer`` runs unchanged against the emulator.

Example::

    emu = RingEmulator()
    ring = CommandRing(emu.map, map_size=emu.map_size)
    cid = emu.submit(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0]), data_in_len=4096)  # READ(10)
    (cmd,) = ring.fetch().commands
    cmd.iov_views[0][:] = b"x" * 4096
    ring.complete(cmd.cmd_id, 0)
    emu.handle().notify()
    done = emu.reap()[cid]        # .status == 0, .data_in == b"x" * 4096
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import mmap
import os
import select
import socket
import struct
import tempfile
import threading

from lvmirror.tcmu import abi

__all__ = ["Completion", "RingBroken", "RingEmulator", "RingFull"]

BLOCK = 4096


class RingFull(Exception):
    """No room in the ring or the data area for this command (the kernel would queue it)."""


class RingBroken(Exception):
    """The handler completed an id that is not in flight: the kernel marks the device BROKEN."""


@dataclasses.dataclass
class Completion:
    """One command as ``reap`` found it completed: ``status`` (SCSI status byte), ``sense`` (the
    entry's 96 sense bytes if status is CHECK CONDITION, else empty), ``read_len`` (rsp.read_len
    if UFLAG_READ_LEN was set, else None), ``data_in`` (the data-in bytes, cut to read_len;
    empty for none or an unknown op), ``unknown_op`` (the handler set UFLAG_UNKNOWN_OP)."""
    cmd_id: int
    status: int
    sense: bytes
    read_len: int | None
    data_in: bytes
    unknown_op: bool


@dataclasses.dataclass
class _Pending:
    cdb: bytes
    blocks: list
    iovecs: list
    data_in_len: int


def _wake(fd: int):
    """Send the emulator one 4-byte wake-up on ``fd`` (the handler's socket end). A full socket
    (BlockingIOError) is not an error: its queued wake-ups have not been read yet, and the reaper
    reaps everything up to ``cmd_tail`` when it reads them. Found when the compiled READ path
    completed commands faster than the reaper thread could drain its wake-ups: the ring
    thread died on EAGAIN, which the kernel's uio write never returns."""
    try:
        os.write(fd, struct.pack("<I", 1))
    except BlockingIOError:
        pass


class _Handle:
    """What the daemon's ring loop sees of a uio device (the emulated one)."""

    def __init__(self, emu):
        self._emu = emu
        self.fd = emu._user_sock.fileno()
        self.map = emu.map
        self.map_size = emu.map_size
        self.uio_name = "uio-emulated"

    def clear_event(self):
        """Drain the wake-ups the emulator sent (its 4-byte 'interrupts'); never blocks."""
        try:
            while True:
                data = os.read(self.fd, 4096)
                if len(data) < 4096:
                    return
        except BlockingIOError:
            return

    def notify(self):
        """Tell the emulator completions are on the ring (the uio write); counted in
        ``notifies``. Never blocks and never fails for a full socket: the kernel's uio write
        (tcmu_irqcontrol) never does either, and wake-ups already queued make the reaper look
        at ``cmd_tail`` anyway, so one more adds nothing (``_wake``)."""
        _wake(self.fd)
        self._emu.notifies += 1

    def close(self):
        """Nothing to do: the socket and the map belong to the emulator (``RingEmulator.close``)."""
        pass

    def transfer(self):
        """What another process needs to serve this ring (as lvmirrord's volume processes do):
        ``(fds, meta)``, the handler's socket and the ring memory's descriptors, and a dict
        with ``map_size`` (bytes) and ``uio_name``; ``AttachedHandle(fds, meta)`` there."""
        return [self.fd, self._emu._map_fd], {"map_size": self.map_size,
                                              "uio_name": self.uio_name}


class AttachedHandle:
    """The emulated device seen from another process: built from ``_Handle.transfer()``'s
    descriptors (received over a Unix socket, so they are this process's own), with the same
    ``fd``, ``map``, ``map_size``, ``clear_event``, ``notify``, ``close`` as a uio handle."""

    def __init__(self, fds, meta: dict):
        sock_fd, map_fd = fds[:2]
        self.fd = sock_fd
        self.map_size = int(meta["map_size"])
        self.uio_name = meta.get("uio_name", "uio-emulated")
        self._map_fd = map_fd
        self.map = mmap.mmap(map_fd, self.map_size)
        os.set_blocking(sock_fd, False)

    def transfer(self):
        """The same descriptors again, for yet another process (``_Handle.transfer``)."""
        return [self.fd, self._map_fd], {"map_size": self.map_size, "uio_name": self.uio_name}

    def clear_event(self):
        """Drain the wake-ups the emulator sent (its 4-byte 'interrupts'). OSError ENODEV once
        the emulator is gone, as a uio read fails once the kernel removed the device."""
        try:
            while True:
                data = os.read(self.fd, 4096)
                if not data:
                    raise OSError(errno.ENODEV, "the emulated device is gone")
                if len(data) < 4096:
                    return
        except BlockingIOError:
            pass
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise OSError(errno.ENODEV, "the emulated device is gone") from exc

    def notify(self):
        """Tell the emulator completions are on the ring (the uio write); OSError ENODEV once
        it is gone."""
        try:
            _wake(self.fd)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise OSError(errno.ENODEV, "the emulated device is gone") from exc

    def close(self):
        """Close the descriptors; the mapping goes with the ring that uses it."""
        if self.fd >= 0:
            os.close(self.fd)
            os.close(self._map_fd)
            self.fd = self._map_fd = -1


class RingEmulator:
    """The kernel side of one TCMU device (see the module docstring)."""

    def __init__(self, *, cmdr_size: int = (64 << 10) - abi.MAILBOX.size,
                 data_size: int = 4 << 20, flags: int = 0xF, directory: str | None = None):
        self.cmdr_off = abi.MAILBOX.size
        self.cmdr_size = cmdr_size
        self.data_off = self.cmdr_off + cmdr_size
        self.map_size = self.data_off + data_size
        directory = directory or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        fd, self.path = tempfile.mkstemp(prefix="tcmu-emu-", dir=directory)
        try:
            os.ftruncate(fd, self.map_size)
            self.map = mmap.mmap(fd, self.map_size)
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(self.path)
        self._map_fd = fd       # kept: another process maps the ring through it (transfer)
        mb = abi.MAILBOX
        mb.version.put(self.map, 0, abi.MAILBOX_VERSION)
        mb.flags.put(self.map, 0, flags)
        mb.cmdr_off.put(self.map, 0, self.cmdr_off)
        mb.cmdr_size.put(self.map, 0, cmdr_size)
        mb.cmd_head.put(self.map, 0, 0)
        mb.cmd_tail.put(self.map, 0, 0)
        # cmd_head is published with one aligned 32-bit store, as the kernel's UPDATE_HEAD does:
        # struct.pack_into zeroes the field before it writes it, and a handler in another
        # process (on another core) could read that 0 and walk a whole ring of stale entries
        self._head_word = ctypes.c_uint32.from_buffer(self.map, mb.cmd_head.offset)
        self._head = 0
        self._last_cleaned = 0
        nb = data_size // BLOCK
        self._free = list(range(1, nb, 2))[::-1] + list(range(0, nb, 2))[::-1]
        self._inflight: dict[int, _Pending] = {}
        self._next_id = 1
        self._events = 0
        self.notifies = 0
        # the handler's 4-byte uio writes read on the kernel's side so far, whoever made them
        # (``notify`` above or the compiled loop's own write): how many times the kernel was
        # told, tcmu_handle_completions' passes; counted as ``reap`` reads them
        self.kicks = 0
        self.warnings: list[str] = []
        self.completions: dict[int, Completion] = {}
        self._lock = threading.RLock()
        self._done = threading.Condition(self._lock)
        self._user_sock, self._kern_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._user_sock.setblocking(False)
        self._kern_sock.setblocking(False)
        self._reaper = None
        self._stop = threading.Event()

    # -- the handler's view ------------------------------------------------------------------

    def handle(self) -> _Handle:
        """The handler's side as a uio handle (``fd``, ``map``, ``map_size``...), for ``LunServer``;
        each call gives a new one on the same socket and map."""
        return _Handle(self)

    # -- queueing (kernel side) --------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Commands queued and not yet reaped."""
        return len(self._inflight)

    def _used(self) -> int:
        return (self._head - self._last_cleaned) % self.cmdr_size

    def _reserve(self, size: int) -> None:
        """Make room for a ``size``-byte entry at the head, padding to the ring start if the
        entry would not fit before the end (ring_insert_padding). Raises RingFull."""
        need = size
        to_end = self.cmdr_size - self._head
        if to_end < size:
            need += to_end
        if self.cmdr_size - self._used() - 1 < need:
            raise RingFull(f"ring full: {need} bytes needed, "
                           f"{self.cmdr_size - self._used() - 1} free")
        if to_end < size:
            ent = self.cmdr_off + self._head
            abi.ENTRY_HDR.len_op.put(self.map, ent, to_end | abi.OP_PAD)
            abi.ENTRY_HDR.cmd_id.put(self.map, ent, 0)
            abi.ENTRY_HDR.kflags.put(self.map, ent, 0)
            abi.ENTRY_HDR.uflags.put(self.map, ent, 0)
            self._head = 0

    def _publish(self, size: int) -> None:
        self._head = (self._head + size) % self.cmdr_size
        self._head_word.value = self._head     # one store; x86 TSO: stores stay ordered
        self._events += 1
        try:
            self._kern_sock.send(struct.pack("<I", self._events & 0xFFFFFFFF))
        except BlockingIOError:
            pass   # the handler has plenty of unread events already

    def _alloc_id(self) -> int:
        for _ in range(0xFFFF):
            cid = self._next_id
            self._next_id = cid % 0xFFFF + 1
            if cid not in self._inflight:
                return cid
        raise RingFull("all 65535 command ids in flight")

    def submit(self, cdb: bytes, data_out: bytes | None = None, data_in_len: int = 0, *,
               cmd_id: int | None = None) -> int:
        """Queue a CMD entry; returns its cmd_id."""
        with self._lock:
            cdb = bytes(cdb)
            length = len(data_out) if data_out is not None else data_in_len
            nblocks = -(-length // BLOCK)
            if nblocks > len(self._free):
                raise RingFull(f"data area full: {nblocks} blocks needed, {len(self._free)} free")
            # The free list hands out blocks interleaved (see __init__), so a buffer of
            # several blocks is scattered over non-adjacent ones, as the kernel's may be.
            blocks = [self._free.pop() for _ in range(nblocks)]
            # iovecs: merge runs of adjacent blocks
            iovecs = []
            left = length
            for b in blocks:
                off = self.data_off + b * BLOCK
                ln = min(BLOCK, left)
                left -= ln
                if iovecs and iovecs[-1][0] + iovecs[-1][1] == off:
                    iovecs[-1] = (iovecs[-1][0], iovecs[-1][1] + ln)
                else:
                    iovecs.append((off, ln))
            base = abi.cmd_entry_base_size(len(iovecs))
            size = base + abi.round_up(len(cdb), abi.OP_ALIGN_SIZE)
            if size > self.cmdr_size // 2:
                raise RingFull(f"command of {size} bytes exceeds half the ring")
            try:
                self._reserve(size)
            except RingFull:
                self._free.extend(reversed(blocks))
                raise
            cid = cmd_id if cmd_id is not None else self._alloc_id()
            # an id comes round again after 65,535 commands: the completion its last command
            # left must not answer a ``wait`` for this one
            self.completions.pop(cid, None)
            ent = self.cmdr_off + self._head
            m, e = self.map, abi.ENTRY
            m[ent:ent + size] = bytes(size)
            e.len_op.put(m, ent, size | abi.OP_CMD)
            e.cmd_id.put(m, ent, cid)
            e.iov_cnt.put(m, ent, len(iovecs))
            e.cdb_off.put(m, ent, ent + base)
            if iovecs:
                abi.IOVEC.array(len(iovecs)).pack_into(m, ent + abi.ENTRY_IOV_OFFSET,
                                                       *[x for iov in iovecs for x in iov])
            m[ent + base:ent + base + len(cdb)] = cdb
            if data_out is not None:
                pos = 0
                for off, ln in iovecs:
                    m[off:off + ln] = data_out[pos:pos + ln]
                    pos += ln
            else:
                for off, ln in iovecs:
                    m[off:off + ln] = b"\xee" * ln     # stale garbage a handler must overwrite
            self._inflight[cid] = _Pending(cdb, blocks, iovecs, data_in_len if data_out is None
                                           else 0)
            self._publish(size)
            return cid

    def submit_tmr(self, tmr_type: int, cmd_ids: list[int]) -> None:
        """Queue a TMR entry naming ``cmd_ids`` (as with attrib/tmr_notification = 1)."""
        with self._lock:
            size = abi.round_up(abi.TMR_ENTRY.size + 2 * len(cmd_ids), abi.OP_ALIGN_SIZE)
            self._reserve(size)
            ent = self.cmdr_off + self._head
            m, t = self.map, abi.TMR_ENTRY
            m[ent:ent + size] = bytes(size)
            t.len_op.put(m, ent, size | abi.OP_TMR)
            t.tmr_type.put(m, ent, tmr_type)
            t.cmd_cnt.put(m, ent, len(cmd_ids))
            for k, cid in enumerate(cmd_ids):
                struct.pack_into("<H", m, ent + abi.TMR_CMD_IDS_OFFSET + 2 * k, cid)
            self._publish(size)

    def write_raw(self, entry: bytes, *, op_len: int | None = None) -> int:
        """Place arbitrary bytes as the next entry (fuzzing): returns its ring position."""
        with self._lock:
            size = abi.round_up(max(len(entry), abi.ENTRY_HDR.size), abi.OP_ALIGN_SIZE)
            self._reserve(size)
            pos = self._head
            ent = self.cmdr_off + pos
            self.map[ent:ent + size] = bytes(entry).ljust(size, b"\0")
            if op_len is not None:
                abi.ENTRY_HDR.len_op.put(self.map, ent, op_len)
            self._publish(size)
            return pos

    # -- reaping (tcmu_handle_completions) ---------------------------------------------------

    def reap(self) -> dict[int, Completion]:
        """Consume the handler's notifications and reap entries up to ``cmd_tail``. Returns the
        completions found in this call by cmd_id. Raises RingBroken on an unknown id."""
        with self._lock:
            try:
                while data := self._kern_sock.recv(4096):
                    self.kicks += len(data) // 4
            except BlockingIOError:
                pass
            found = {}
            tail = abi.MAILBOX.cmd_tail.get(self.map, 0)
            if tail >= self.cmdr_size or tail % 8:
                raise RingBroken(f"cmd_tail {tail} is not a valid ring offset")
            m, e = self.map, abi.ENTRY
            while self._last_cleaned != tail:
                ent = self.cmdr_off + self._last_cleaned
                len_op = e.len_op.get(m, ent)
                op, ln = abi.entry_op(len_op), abi.entry_len(len_op)
                if ln == 0:
                    raise RingBroken(f"zero-length entry at {self._last_cleaned}")
                if op in (abi.OP_PAD, abi.OP_TMR):
                    self._last_cleaned = (self._last_cleaned + ln) % self.cmdr_size
                    continue
                if op != abi.OP_CMD:
                    # The kernel never queues other opcodes; it would WARN here. Count it.
                    self.warnings.append(f"entry at {self._last_cleaned}: opcode {op}, uflags "
                                         f"{e.uflags.get(m, ent):#x}")
                    self._last_cleaned = (self._last_cleaned + ln) % self.cmdr_size
                    continue
                cid = e.cmd_id.get(m, ent)
                pend = self._inflight.pop(cid, None)
                if pend is None:
                    raise RingBroken(f"cmd_id {cid} not found, ring is broken")
                uflags = e.uflags.get(m, ent)
                status = e.scsi_status.get(m, ent)
                sense = bytes(m[ent + e.sense_buffer.offset:
                                ent + e.sense_buffer.offset + abi.SENSE_BUFFERSIZE])
                read_len = e.read_len.get(m, ent) if uflags & abi.UFLAG_READ_LEN else None
                unknown = bool(uflags & abi.UFLAG_UNKNOWN_OP)
                data = b""
                if pend.data_in_len and not unknown:
                    n = pend.data_in_len if read_len is None else min(read_len, pend.data_in_len)
                    parts = []
                    for off, l2 in pend.iovecs:
                        parts.append(bytes(m[off:off + l2]))
                    data = b"".join(parts)[:n]
                comp = Completion(cid, status, sense if status == 2 else b"", read_len, data,
                                  unknown)
                found[cid] = comp
                self.completions[cid] = comp
                self._free.extend(pend.blocks)
                self._last_cleaned = (self._last_cleaned + ln) % self.cmdr_size
            if found:
                self._done.notify_all()
            return found

    def run_reaper(self):
        """Reap in a background thread whenever the handler notifies (for daemon-loop tests)."""
        def loop():
            while not self._stop.is_set():
                r, _, _ = select.select([self._kern_sock], [], [], 0.2)
                if r:
                    self.reap()
        self._reaper = threading.Thread(target=loop, name="tcmu-emu-reaper", daemon=True)
        self._reaper.start()

    def wait(self, cmd_ids, timeout: float = 10.0) -> dict[int, Completion]:
        """Wait until every id in ``cmd_ids`` is completed (with ``run_reaper`` running)."""
        ids = list(cmd_ids)
        with self._done:
            ok = self._done.wait_for(lambda: all(c in self.completions for c in ids), timeout)
            if not ok:
                missing = [c for c in ids if c not in self.completions]
                raise TimeoutError(f"commands {missing[:10]} not completed in {timeout} s")
            return {c: self.completions[c] for c in ids}

    def wait_any(self, cmd_ids, timeout: float = 10.0) -> set[int]:
        """Wait until at least one id of ``cmd_ids`` is completed; returns the completed ones."""
        ids = set(cmd_ids)
        with self._done:
            # keys().isdisjoint(ids) walks ids (the few in flight); set.isdisjoint(dict) would
            # walk every completion of the run on each wake-up
            done = self.completions.keys()
            if not self._done.wait_for(lambda: not done.isdisjoint(ids), timeout):
                raise TimeoutError(f"none of {len(ids)} commands completed in {timeout} s")
            return {c for c in ids if c in self.completions}

    def close(self):
        """Stop the reaper thread, close both socket ends and the map's descriptor, unmap (left to
        the last view while views are exported); the handles' socket goes with them."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
        self._user_sock.close()
        self._kern_sock.close()
        if self._map_fd >= 0:
            os.close(self._map_fd)
            self._map_fd = -1
        self._head_word = None      # drop the exported pointer so the map can close
        try:
            self.map.close()
        except BufferError:
            pass    # views still exported; the mapping goes with the last reference
