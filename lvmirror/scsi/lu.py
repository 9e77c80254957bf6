"""LogicalUnit: the sans-I/O SCSI block device (SPC-4 / SBC-3 subset a disk needs).

``LogicalUnit.execute(cdb, data_out, data_in)`` takes a CDB and the command's buffers (lists of
memoryviews onto the TCMU data area) and returns ``Response(status, sense, read_len)``. It never
opens a file or touches the ring; medium access goes through a small ``Backend`` (``read``,
``write``, ``flush``, ``unmap``, ``compare_and_write``; ``MirrorVolume`` is one). READs land
straight in the data-in buffers and WRITEs hand the data-out buffers straight to the backend.

Transfer length against buffers: TCMU sizes the iovecs from the initiator's expected transfer
length after LIO's core checked it against the CDB (``target_cmd_size_check``): for reads the
buffers are then at most the CDB length (we transfer what fits and report ``read_len``); a
write whose buffers differ from the CDB length is refused with ILLEGAL REQUEST / INVALID FIELD IN
COMMAND INFORMATION UNIT, as the core does for data CDBs.

Every error is a CHECK CONDITION with the sense key and ASC/ASCQ SPC/SBC specify; nothing
raises out of ``execute``. Backend errors: ``VolumeIOError`` is MEDIUM ERROR (UNRECOVERED READ
ERROR / WRITE ERROR), or, when no image had room for a write (``out_of_space``: the file system
under sparse images is full), DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (07/27/07, as
SBC-3 asks of a thin-provisioned LUN, so Linux and VMware report an out-of-space condition);
``StateError`` (volume closed or offline because no image can serve, exported split image
resynced) NOT READY / MANUAL INTERVENTION REQUIRED, also for TEST UNIT READY (``check_ready``),
anything else HARDWARE ERROR / INTERNAL TARGET FAILURE.

REPORT LUNS and PERSISTENT RESERVE / RESERVE / RELEASE are answered by LIO's core before a
command reaches TCMU, so they are not here.

``execute(..., nowait=True)`` answers a READ only if it completes without blocking (the
backend's ``read(..., nowait=True)``: data in the page cache, no conflicting region lock), and
a WRITE without FUA (write cache on) only if it need not wait for another I/O (the backend's
``write(..., nowait=True)``: no conflicting region lock, no restore; it may still wait for the
images' page cache and the write-intent log); otherwise it raises ``WouldBlock``, having
changed nothing. Any other command raises it at once. The caller (the ring thread) then hands
the command to a worker, which runs it normally. Only call it for a WRITE when the backend
says ``supports_nowait_write``. With ``device_ok`` too it still never waits for other I/O, but
waits for the devices (a page-cache miss, FUA, a write-intent log save) as a normal command
does: what the ring thread runs when the command is the only one outstanding.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import threading
import time
from typing import NamedTuple, Protocol, Sequence

from lvmirror import rawtext
from lvmirror.errors import StateError, VolumeIOError, WouldBlock
from lvmirror.scsi import alua
from lvmirror.scsi import constants as c
from lvmirror.scsi.sense import build_sense
from lvmirror.scsi.xcopy import CopyCheck, CopyManager

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0     # seconds between two log lines of the same per-command failure kind

__all__ = ["Backend", "LogicalUnit", "READ_OPCODES", "WRITE_OPCODES", "Response"]

IEEE_OUI_LIO = 0x001405      # the OUI LIO uses in NAA designators


class Response(NamedTuple):
    """What ``execute`` answers: ``status`` (SAM status byte: GOOD 00h, CHECK CONDITION 02h),
    ``sense`` (fixed-format sense data, SPC-4 4.5.3; empty unless CHECK CONDITION) and
    ``read_len`` (bytes placed in the data-in buffers)."""
    status: int
    sense: bytes
    read_len: int


class Backend(Protocol):
    """The medium behind a LogicalUnit (``MirrorVolume`` and ``SplitImageVolume`` are two): LBAs and
    counts in blocks of ``block_size`` bytes, ``num_blocks`` of them. Errors: VolumeIOError (MEDIUM
    ERROR, or DATA PROTECT when out of space), StateError (NOT READY); see the module docstring."""
    block_size: int
    num_blocks: int

    def read(self, lba: int, buffers: list) -> None:
        """Fill ``buffers`` (memoryviews, whole blocks in all) with the blocks from ``lba``."""
    # optional: supports_nowait (bool) and read(lba, buffers, nowait=True) raising WouldBlock
    def write(self, lba: int, buffers: list, fua: bool = False) -> None:
        """Write ``buffers`` (whole blocks in all) from ``lba``; ``fua``: durable on return (the
        CDB's FUA bit, or the write cache off, SBC-3)."""
    def flush(self) -> None:
        """Make every completed write durable (SYNCHRONIZE CACHE, SBC-3)."""
    def unmap(self, lba: int, nblocks: int) -> None:
        """Deallocate ``nblocks`` blocks from ``lba``; they read back as zeroes (LBPRZ, SBC-3)."""
    def compare_and_write(self, lba: int, verify, data) -> int | None:
        """SBC-3 COMPARE AND WRITE, atomically: if the blocks at ``lba`` equal ``verify``, write
        ``data`` (as long); None, or the byte offset of the first miscompare (nothing written)."""
    # optional: lba_status(lba, max_descriptors) -> [(lba, blocks, deallocated)] (GET LBA
    # STATUS; without it every block is mapped) and prefetch(lba, nblocks) (PRE-FETCH; without
    # it nothing is read ahead)


GOOD_RESPONSE = Response(c.GOOD, b"", 0)


class _Check(Exception):
    """Raised inside handlers: becomes CHECK CONDITION with this sense."""

    def __init__(self, key, ascq_pair, *, information=None, field=None, bit=None, cdb_field=True):
        super().__init__(key, ascq_pair)
        self.sense = build_sense(key, ascq_pair[0], ascq_pair[1], information=information,
                                 field_pointer=field, bit_pointer=bit, cdb_field=cdb_field)


def _invalid_cdb(field, bit=None):
    return _Check(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_CDB, field=field, bit=bit)


def _invalid_param(field, bit=None):
    return _Check(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_PARAMETER_LIST, field=field, bit=bit,
                  cdb_field=False)


_LBA_OUT_OF_RANGE = (c.ILLEGAL_REQUEST, c.ASC_LBA_OUT_OF_RANGE)
READ_OPCODES = frozenset((c.READ_6, c.READ_10, c.READ_12, c.READ_16))
WRITE_OPCODES = frozenset((c.WRITE_6, c.WRITE_10, c.WRITE_12, c.WRITE_16))


# -- buffer helpers ---------------------------------------------------------------------------

def _total(views) -> int:
    """Bytes in ``views`` (memoryviews of bytes, or bytes-like objects)."""
    return sum(map(len, views))


def _take(views, nbytes: int) -> list:
    """Views covering exactly the first ``nbytes`` bytes of ``views``."""
    if len(views) == 1 and len(views[0]) == nbytes:    # the usual case: one buffer, all of it
        return [views[0]]
    out = []
    for v in views:
        if nbytes <= 0:
            break
        if len(v) <= nbytes:
            out.append(v)
            nbytes -= len(v)
        else:
            out.append(v[:nbytes])
            nbytes = 0
    return out


def _scatter(views, data: bytes) -> int:
    """Copy ``data`` into ``views``; returns the bytes placed."""
    pos = 0
    n = len(data)
    for v in views:
        if pos >= n:
            break
        k = min(len(v), n - pos)
        v[:k] = data[pos:pos + k]
        pos += k
    return pos


def _gather(views, nbytes: int | None = None) -> bytes:
    data = b"".join(bytes(v) for v in views)
    return data if nbytes is None else data[:nbytes]


def _be(b, start, n) -> int:
    return int.from_bytes(b[start:start + n], "big")


# opcode -> unpack_from of its (LBA, TRANSFER LENGTH) (SBC-4: the 10, 12 and 16-byte forms)
_RW_FIELDS = {
    **dict.fromkeys((c.READ_10, c.WRITE_10, c.VERIFY_10, c.WRITE_AND_VERIFY_10),
                    struct.Struct(">2xIxH").unpack_from),
    **dict.fromkeys((c.READ_12, c.WRITE_12, c.VERIFY_12, c.WRITE_AND_VERIFY_12),
                    struct.Struct(">2xII").unpack_from),
    **dict.fromkeys((c.READ_16, c.WRITE_16, c.VERIFY_16, c.WRITE_AND_VERIFY_16),
                    struct.Struct(">2xQI").unpack_from),
}


class _Op:
    """One supported operation: handler, CDB length, usage mask (for REPORT SUPPORTED OPCODES)."""

    __slots__ = ("opcode", "sa", "name", "handler", "cdb_len", "usage")

    def __init__(self, opcode, sa, name, handler, usage):
        self.opcode = opcode
        self.sa = sa
        self.name = name
        self.handler = handler
        self.usage = bytes(usage)
        self.cdb_len = len(self.usage)


def _usage(opcode, *masks):
    return (opcode,) + masks


class LogicalUnit:
    """Per-LUN SCSI state and command dispatch (see the module docstring)."""

    def __init__(self, backend, *, wwn=None, vendor: str = "LIO-ORG",
                 product: str = "lvmirror", revision: str = "0001", write_cache: bool = True,
                 read_only: bool = False, max_transfer_blocks: int | None = None,
                 max_unmap_blocks: int = 0x10000 * 8, max_unmap_descriptors: int = 256,
                 max_write_same_blocks: int = 0x10000 * 8, max_compare_write_blocks: int = 1,
                 optimal_transfer_blocks: int | None = None, copy_resolver=None,
                 port_groups=None):
        self.backend = backend
        # ``port_groups() -> list[alua.PortGroup]``: the LUN's target port groups as the kernel
        # has them now (lvmirror.tcmu.alua reads configfs); None: no ALUA reported (alua.py)
        self.port_groups = port_groups
        # the unit serial (``wwn/vpd_unit_serial``): a str, None (the backstore has none), or a
        # callable returning one or None (``UioDevice.wwn``): rtslib-fb writes the serial just
        # after it enables the device, so lvmirrord may meet the device before its serial, and
        # the callable is asked again whenever a page needs the serial until it gives one
        # (LIO reads its own live; once set, LIO refuses to change it while the LUN is
        # exported). Without one the LUN lists no VPD page, reports an empty serial and no NAA
        # designator, as LIO's spc_emulate_evpd_00/80/83 do (a made-up constant would give
        # every such LUN one identifier, which multipath would take for paths to one device)
        self._wwn_source = wwn if callable(wwn) else None
        self._wwn = None if callable(wwn) else (wwn or None)
        self._wwn_mu = threading.Lock()            # the first serial found is the one kept
        self._naa_of: tuple = (None, None)        # (serial, its NAA): ``naa``
        self.vendor = vendor
        self.product = product
        self.revision = revision
        self.write_cache = write_cache
        self.read_only = read_only
        bs = backend.block_size
        self.max_transfer_blocks = max_transfer_blocks or (8 << 20) // bs
        # Advertised in the Block Limits page; larger transfers are still served up to what
        # a TCMU data area comfortably holds (LIO's own backstores accept them too).
        self.max_accept_blocks = max(self.max_transfer_blocks, (32 << 20) // bs)
        # never above the maximum: an initiator ignores an optimal length larger than it (and
        # with TCMU's default hw_max_sectors of 128 the maximum is only 64 KiB)
        self.optimal_transfer_blocks = min(optimal_transfer_blocks or (1 << 20) // bs,
                                           self.max_transfer_blocks)
        self.max_unmap_blocks = max_unmap_blocks
        self.max_unmap_descriptors = max_unmap_descriptors
        self.max_write_same_blocks = max_write_same_blocks
        self.max_compare_write_blocks = max_compare_write_blocks
        self._ua_lock = threading.Lock()
        self._logged: dict[str, tuple[float, int]] = {}   # _log_limited: kind -> (when, skipped)
        self._unit_attentions: list[tuple[int, int]] = []
        self._ops: dict[tuple[int, int | None], _Op] = {}
        # EXTENDED COPY's copy manager; ``copy_resolver(naa) -> LogicalUnit | None`` finds the
        # other LUNs a copy may name (xcopy.py)
        self.copier = CopyManager(self, copy_resolver)
        self._register()

    # -- state changes from outside ------------------------------------------------------------

    def capacity_changed(self):
        """The LUN was resized: the next command gets UNIT ATTENTION, CAPACITY DATA HAS CHANGED."""
        with self._ua_lock:
            if c.ASC_CAPACITY_DATA_HAS_CHANGED not in self._unit_attentions:
                self._unit_attentions.append(c.ASC_CAPACITY_DATA_HAS_CHANGED)

    def mode_parameters_changed(self):
        """Queue UNIT ATTENTION, MODE PARAMETERS CHANGED (2Ah/01h, SPC-4) for the next command other
        than INQUIRY, REPORT LUNS, REQUEST SENSE (once however often called): mode parameters
        changed other than by MODE SELECT through this LUN."""
        with self._ua_lock:
            if c.ASC_MODE_PARAMETERS_CHANGED not in self._unit_attentions:
                self._unit_attentions.append(c.ASC_MODE_PARAMETERS_CHANGED)

    # -- dispatch ------------------------------------------------------------------------------

    def execute(self, cdb: bytes, data_out: Sequence = (), data_in: Sequence = (), *,
                nowait: bool = False, device_ok: bool = False) -> Response:
        """Run one command. Never raises, except ``WouldBlock`` with ``nowait`` (only a READ
        whose data the backend has in memory, or a WRITE without FUA that waits for no other
        I/O, is answered then; with ``device_ok`` also one that waits for the devices but for
        no other I/O; see the module docstring)."""
        if nowait and (not cdb or (cdb[0] not in READ_OPCODES and cdb[0] not in WRITE_OPCODES)):
            raise WouldBlock("only READ and WRITE commands run without blocking")
        try:
            if not cdb:
                return self._check(c.ILLEGAL_REQUEST, c.ASC_INVALID_OPCODE)
            opcode = cdb[0]
            op = self._ops.get((opcode, None))
            if op is None:
                sa = cdb[1] & 0x1F if len(cdb) > 1 else None
                op = self._ops.get((opcode, sa))
                if op is None:
                    if any(k[0] == opcode for k in self._ops):
                        return Response(c.CHECK_CONDITION, build_sense(
                            c.ILLEGAL_REQUEST, *c.ASC_INVALID_FIELD_IN_CDB, field_pointer=1,
                            bit_pointer=4), 0)
                    return self._check(c.ILLEGAL_REQUEST, c.ASC_INVALID_OPCODE)
            if len(cdb) < op.cdb_len:
                return self._check(c.ILLEGAL_REQUEST, c.ASC_INVALID_OPCODE)
            if cdb[op.cdb_len - 1] & 0x04:        # NACA in the CONTROL byte: no ACA support
                return Response(c.CHECK_CONDITION, build_sense(
                    c.ILLEGAL_REQUEST, *c.ASC_INVALID_FIELD_IN_CDB, field_pointer=op.cdb_len - 1,
                    bit_pointer=2), 0)
            if self._unit_attentions and opcode not in (c.INQUIRY, c.REPORT_LUNS,
                                                        c.REQUEST_SENSE):
                with self._ua_lock:
                    if self._unit_attentions:
                        asc = self._unit_attentions.pop(0)
                        return self._check(c.UNIT_ATTENTION, asc)
            if nowait:
                if opcode in READ_OPCODES:
                    return self._read(cdb, data_out, data_in, nowait=True, device_ok=device_ok)
                return self._write(cdb, data_out, data_in, nowait=True, device_ok=device_ok)
            return op.handler(cdb, data_out, data_in)
        except WouldBlock:
            raise
        except _Check as e:
            return Response(c.CHECK_CONDITION, e.sense, 0)
        except CopyCheck as e:
            return Response(c.CHECK_CONDITION, build_sense(
                e.key, *e.asc, field_pointer=e.field, cdb_field=e.cdb_field), 0)
        except VolumeIOError as e:
            if e.out_of_space:
                self._log_limited("space", logging.WARNING, "out of space: %s", e)
                return self._check(c.DATA_PROTECT, c.ASC_SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
            self._log_limited("io", logging.ERROR, "I/O error: %s", e)
            return self._check(c.MEDIUM_ERROR, c.ASC_UNRECOVERED_READ_ERROR if e.is_read
                               else c.ASC_WRITE_ERROR)
        except StateError as e:
            # the volume is closed, or an exported split image is no longer split
            self._log_limited("not-ready", logging.WARNING, "LUN not ready: %s", e)
            return self._check(c.NOT_READY, c.ASC_LUN_NOT_READY_MANUAL_INTERVENTION)
        except Exception:
            log.exception("SCSI command %s failed", bytes(cdb[:16]).hex())
            return self._check(c.HARDWARE_ERROR, c.ASC_INTERNAL_TARGET_FAILURE)

    def _log_limited(self, kind, level, msg, *args):
        """Log a per-command failure at most once per LOG_INTERVAL seconds per kind: an offline
        volume or a full file system fails every command, and the volume logs the cause once;
        the count of those not logged goes with the next line."""
        now = time.monotonic()
        last, skipped = self._logged.get(kind, (-LOG_INTERVAL, 0))
        if now - last < LOG_INTERVAL:
            self._logged[kind] = (last, skipped + 1)
            return
        self._logged[kind] = (now, 0)
        if skipped:
            msg += f" ({skipped} more since the last such line)"
        log.log(level, msg, *args)

    @staticmethod
    def _check(key, pair) -> Response:
        return Response(c.CHECK_CONDITION, build_sense(key, pair[0], pair[1]), 0)

    # -- common checks -------------------------------------------------------------------------

    def _check_range(self, lba, nblocks):
        if lba + nblocks > self.backend.num_blocks or lba > self.backend.num_blocks:
            raise _Check(*_LBA_OUT_OF_RANGE)

    def _check_writable(self):
        if self.read_only:
            raise _Check(c.DATA_PROTECT, c.ASC_WRITE_PROTECTED)

    def _respond(self, data_in, payload: bytes, alloc_len: int) -> Response:
        payload = payload[:alloc_len]
        n = _scatter(data_in, payload)
        return Response(c.GOOD, b"", n)

    def _data_out(self, data_out, expected: int) -> list:
        if _total(data_out) != expected:
            raise _Check(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_COMMAND_IU)
        return list(data_out)

    # -- READ / WRITE --------------------------------------------------------------------------

    @staticmethod
    def _rw_fields(cdb):
        """(LOGICAL BLOCK ADDRESS, TRANSFER LENGTH) of a READ/WRITE/VERIFY-type CDB (SBC-4
        5.15-5.17, 5.31-5.34: big-endian fields at bytes 2 and 7/6/10 of the 10/12/16-byte
        forms); the caller has checked the CDB's length."""
        unpack = _RW_FIELDS.get(cdb[0])
        if unpack is not None:
            return unpack(cdb)
        # READ(6) / WRITE(6): 21-bit LBA, length 0 means 256 blocks
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3], cdb[4] or 256

    def _transfer(self, cdb, *, writes: bool):
        """(lba, nblocks) of a READ/WRITE/VERIFY-type CDB after the checks they share
        (``_rw_fields`` and ``_check_range`` written out for the 10/12/16-byte forms: every
        READ and WRITE passes here)."""
        unpack = _RW_FIELDS.get(cdb[0])
        lba, n = unpack(cdb) if unpack is not None else self._rw_fields(cdb)
        if cdb[0] not in (c.READ_6, c.WRITE_6) and cdb[1] & 0xE0:
            raise _invalid_cdb(1, 7)                 # RD/WR/VRPROTECT: no protection info
        if writes:
            self._check_writable()
        num_blocks = self.backend.num_blocks
        if lba + n > num_blocks or lba > num_blocks:
            raise _Check(*_LBA_OUT_OF_RANGE)
        if n > self.max_accept_blocks:
            raise _invalid_cdb(4 if cdb[0] in (c.READ_6, c.WRITE_6) else 7)
        return lba, n

    def _read(self, cdb, data_out, data_in, nowait=False, device_ok=False):
        lba, n = self._transfer(cdb, writes=False)
        if n == 0:
            return GOOD_RESPONSE
        bs = self.backend.block_size
        want = min(n * bs, len(data_in[0]) if len(data_in) == 1 else _total(data_in))
        full = want // bs
        rest = want - full * bs
        if nowait:
            if rest:    # two backend reads: the first would be counted twice if the second waits
                raise WouldBlock("a partial last block is read by a worker")
            if full:
                self.backend.read(lba, _take(data_in, full * bs), nowait=True,
                                  device_ok=device_ok)
            return Response(c.GOOD, b"", want)
        if full:
            self.backend.read(lba, _take(data_in, full * bs))
        if rest:                                     # a partial last block: bounce it
            tmp = bytearray(bs)
            self.backend.read(lba + full, [memoryview(tmp)])
            views = _take(data_in, want)
            skip = full * bs
            pos = 0
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                k = len(v) - skip
                v[skip:] = tmp[pos:pos + k]
                pos += k
                skip = 0
        return Response(c.GOOD, b"", want)

    def _write(self, cdb, data_out, data_in, nowait=False, device_ok=False):
        lba, n = self._transfer(cdb, writes=True)
        if n == 0:
            return GOOD_RESPONSE
        bufs = self._data_out(data_out, n * self.backend.block_size)
        fua = cdb[0] != c.WRITE_6 and bool(cdb[1] & 0x08) or not self.write_cache
        if nowait:
            if fua and not device_ok:
                raise WouldBlock("a FUA write waits for the device")
            self.backend.write(lba, bufs, fua=fua, nowait=True, device_ok=device_ok)
        else:
            self.backend.write(lba, bufs, fua=fua)
        return GOOD_RESPONSE

    def _verify(self, cdb, data_out, data_in):
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk == 2:
            raise _invalid_cdb(1, 2)
        lba, n = self._transfer(cdb, writes=False)
        if n == 0:
            return GOOD_RESPONSE
        bs = self.backend.block_size
        medium = bytearray(n * bs)
        self.backend.read(lba, [memoryview(medium)])
        if bytchk == 0:
            return GOOD_RESPONSE
        expect = _gather(self._data_out(data_out, bs if bytchk == 3 else n * bs))
        if bytchk == 3:
            expect = expect * n
        return self._compare(medium, expect)

    def _compare(self, medium, expect) -> Response:
        if medium == expect:
            return GOOD_RESPONSE
        off = next(i for i in range(len(expect)) if medium[i] != expect[i])
        raise _Check(c.MISCOMPARE, c.ASC_MISCOMPARE_DURING_VERIFY, information=off)

    def _write_and_verify(self, cdb, data_out, data_in):
        lba, n = self._transfer(cdb, writes=True)
        if n == 0:
            return GOOD_RESPONSE
        bs = self.backend.block_size
        bufs = self._data_out(data_out, n * bs)
        self.backend.write(lba, bufs, fua=True)
        medium = bytearray(n * bs)
        self.backend.read(lba, [memoryview(medium)])
        return self._compare(medium, _gather(bufs))

    def _sync_cache(self, cdb, data_out, data_in):
        if cdb[0] == c.SYNCHRONIZE_CACHE_10:
            lba, n = _be(cdb, 2, 4), _be(cdb, 7, 2)
        else:
            lba, n = _be(cdb, 2, 8), _be(cdb, 10, 4)
        self._check_range(lba, n)
        self.backend.flush()
        return GOOD_RESPONSE

    def _write_same(self, cdb, data_out, data_in):
        if cdb[0] == c.WRITE_SAME_10:
            lba, n = _be(cdb, 2, 4), _be(cdb, 7, 2)
            ndob = False
        else:
            lba, n = _be(cdb, 2, 8), _be(cdb, 10, 4)
            ndob = bool(cdb[1] & 0x01)
        if cdb[1] & 0xE0:
            raise _invalid_cdb(1, 7)                 # WRPROTECT
        if cdb[1] & 0x10:
            raise _invalid_cdb(1, 4)                 # ANCHOR: no anchored state
        unmap = bool(cdb[1] & 0x08)
        self._check_writable()
        if n == 0:
            raise _invalid_cdb(7 if cdb[0] == c.WRITE_SAME_10 else 10)   # WSNZ = 1
        if n > self.max_write_same_blocks:
            raise _invalid_cdb(7 if cdb[0] == c.WRITE_SAME_10 else 10)
        self._check_range(lba, n)
        bs = self.backend.block_size
        if ndob:
            block = bytes(bs)
        else:
            block = _gather(self._data_out(data_out, bs))
        if unmap and not any(block):
            self.backend.unmap(lba, n)               # LBPRZ: unmapped blocks read as zeroes
            self.durable()
            return GOOD_RESPONSE
        ws = getattr(self.backend, "write_same", None)
        if ws is not None:
            ws(lba, n, memoryview(block))
            self.durable()
            return GOOD_RESPONSE
        chunk = max(1, min(n, (1 << 20) // bs))
        buf = memoryview(block * chunk)
        done = 0
        while done < n:
            k = min(chunk, n - done)
            self.backend.write(lba + done, [buf[:k * bs]])
            done += k
        self.durable()
        return GOOD_RESPONSE

    def durable(self, fua: bool = False) -> None:
        """Called before GOOD by a command that wrote or deallocated through a backend call
        with no ``fua`` of its own (WRITE SAME, UNMAP, COMPARE AND WRITE; EXTENDED COPY for its
        destination, ``xcopy``): with the CDB's FUA bit (``fua``) or the write cache off (WCE 0:
        SBC-4 5.40 and the Caching mode page - every write durable before GOOD), the backend's
        ``flush``, as SYNCHRONIZE CACHE does. The flush's errors propagate (MEDIUM ERROR...)."""
        if fua or not self.write_cache:
            self.backend.flush()

    def _unmap(self, cdb, data_out, data_in):
        if cdb[1] & 0x01:
            raise _invalid_cdb(1, 0)                 # ANCHOR
        self._check_writable()
        plen = _be(cdb, 7, 2)
        if plen == 0:
            return GOOD_RESPONSE
        if plen < 8:
            raise _Check(c.ILLEGAL_REQUEST, c.ASC_PARAMETER_LIST_LENGTH_ERROR)
        buf = _gather(data_out, plen)
        if len(buf) < 8:
            raise _Check(c.ILLEGAL_REQUEST, c.ASC_PARAMETER_LIST_LENGTH_ERROR)
        bd_len = _be(buf, 2, 2)
        size = min(bd_len, len(buf) - 8)
        ndesc = size // 16
        if ndesc > self.max_unmap_descriptors:
            raise _invalid_param(2)
        ranges = []
        for k in range(ndesc):
            off = 8 + 16 * k
            lba, n = _be(buf, off, 8), _be(buf, off + 8, 4)
            if n > self.max_unmap_blocks:
                raise _invalid_param(off + 8)
            self._check_range(lba, n)
            ranges.append((lba, n))
        for lba, n in ranges:
            if n:
                self.backend.unmap(lba, n)
        if any(n for _, n in ranges):
            self.durable()
        return GOOD_RESPONSE

    def _compare_and_write(self, cdb, data_out, data_in):
        if cdb[1] & 0xE0:
            raise _invalid_cdb(1, 7)
        lba, n = _be(cdb, 2, 8), cdb[13]
        self._check_writable()
        if n > self.max_compare_write_blocks:
            raise _invalid_cdb(13)
        self._check_range(lba, n)
        if n == 0:
            return GOOD_RESPONSE
        bs = self.backend.block_size
        data = _gather(self._data_out(data_out, 2 * n * bs))
        mv = memoryview(data)
        off = self.backend.compare_and_write(lba, mv[:n * bs], mv[n * bs:])
        if off is not None:
            raise _Check(c.MISCOMPARE, c.ASC_MISCOMPARE_DURING_VERIFY, information=off)
        self.durable(bool(cdb[1] & 0x08))            # FUA (SBC-4 5.2)
        return GOOD_RESPONSE

    # -- SPC: INQUIRY and friends --------------------------------------------------------------

    def _tur(self, cdb, data_out, data_in):
        """TEST UNIT READY (SPC-4 6.47): GOOD only while the backend can serve medium access;
        a backend with ``check_ready()`` raises StateError when it cannot (every image failed),
        which ``execute`` answers NOT READY / MANUAL INTERVENTION REQUIRED (02/04/03), so a
        multipath ``tur`` path checker fails the path over."""
        check = getattr(self.backend, "check_ready", None)
        if check is not None:
            check()
        return GOOD_RESPONSE

    def _start_stop(self, cdb, data_out, data_in):
        if cdb[4] & 0xF0 not in (0x00,):             # power conditions other than START_VALID
            raise _invalid_cdb(4, 7)
        return GOOD_RESPONSE

    def _request_sense(self, cdb, data_out, data_in):
        desc = bool(cdb[1] & 0x01)
        with self._ua_lock:
            asc = self._unit_attentions.pop(0) if self._unit_attentions else None
        key = c.UNIT_ATTENTION if asc else c.NO_SENSE
        asc = asc or c.ASC_NO_ADDITIONAL_SENSE
        if desc:
            payload = bytes([0x72, key, asc[0], asc[1], 0, 0, 0, 0])
        else:
            payload = build_sense(key, *asc)
        return self._respond(data_in, payload, cdb[4])

    def _wwn_bytes(self) -> bytes:
        """The unit serial as the bytes configfs holds (``wwn/vpd_unit_serial`` is whatever
        bytes were written to it; ``tcmu.uio`` decodes the ones that are not UTF-8 as
        surrogates, which go back out as those bytes, as LIO's own VPD pages carry them)."""
        wwn = self.wwn
        return b"" if wwn is None else rawtext.encode(wwn)

    @property
    def wwn(self) -> str | None:
        """The unit serial, or None while there is none (see ``__init__``: a callable source
        is asked again each time until it gives one, then kept)."""
        if self._wwn is None and self._wwn_source is not None:
            try:
                serial = self._wwn_source()
            except Exception as exc:           # configfs unreadable: no serial this time
                self._log_limited("serial", logging.WARNING, "cannot read the unit serial: %s",
                                  exc)
            else:
                if serial:
                    with self._wwn_mu:         # a slower read never replaces the one kept
                        if self._wwn is None:
                            self._wwn = serial
        return self._wwn

    @property
    def naa(self) -> bytes | None:
        """The LUN's NAA 6 designator (16 bytes: VPD 83h, EXTENDED COPY's CSCD descriptors),
        None without a unit serial (LIO then reports no NAA designator either)."""
        return self._naa_for(self.wwn)

    def _naa_for(self, wwn: str | None) -> bytes | None:
        if wwn is None:
            return None
        known = self._naa_of                   # one tuple: read and replaced whole
        if known[0] != wwn:
            known = self._naa_of = (wwn, self._naa(wwn))
        return known[1]

    @staticmethod
    def _naa(wwn: str) -> bytes:
        """NAA 6 (IEEE Registered Extended) from LIO's OUI and unit serial ``wwn`` (stable)."""
        digits = "".join(ch for ch in wwn.lower() if ch in "0123456789abcdef")
        if len(digits) < 25:
            digits = (digits + hashlib.sha256(rawtext.encode(wwn)).hexdigest())[:25]
        value = (0x6 << 124) | (IEEE_OUI_LIO << 100) | int(digits[:25], 16)
        return value.to_bytes(16, "big")

    def _inquiry(self, cdb, data_out, data_in):
        alloc = _be(cdb, 3, 2)
        evpd = cdb[1] & 0x01
        page = cdb[2]
        if cdb[1] & 0x02:                            # CMDDT (obsolete)
            raise _invalid_cdb(1, 1)
        if not evpd:
            if page:
                raise _invalid_cdb(2)
            data = bytearray(66)
            data[0] = 0x00                           # connected direct-access block device
            data[2] = 0x06                           # SPC-4
            data[3] = 0x12                           # HiSup, response data format 2
            data[4] = len(data) - 5
            data[5] = 0x08 | alua.tpgs(self._groups())   # 3PC (xcopy.py), TPGS (alua.py)
            data[7] = 0x02                           # CmdQue
            data[8:16] = self.vendor.encode()[:8].ljust(8)
            data[16:32] = self.product.encode()[:16].ljust(16)
            data[32:36] = self.revision.encode()[:4].ljust(4)
            # version descriptors (bytes 58..): SAM-5, SPC-4, SBC-3, iSCSI (no version claimed)
            for k, desc in enumerate((0x00A0, 0x0460, 0x04C0, 0x0960)):
                data[58 + 2 * k:60 + 2 * k] = desc.to_bytes(2, "big")
            return self._respond(data_in, bytes(data), alloc)
        builder = self._vpd_pages().get(page)
        if builder is None:
            raise _invalid_cdb(2)
        body = builder()
        payload = bytes([0x00, page]) + len(body).to_bytes(2, "big") + body
        return self._respond(data_in, payload, alloc)

    def _vpd_pages(self):
        return {0x00: self._vpd_supported, 0x80: self._vpd_serial, 0x83: self._vpd_devid,
                0xB0: self._vpd_block_limits, 0xB1: self._vpd_block_characteristics,
                0xB2: self._vpd_provisioning}

    def _vpd_supported(self):
        # none without a unit serial: LIO's spc_emulate_evpd_00 lists the pages only "after a
        # valid NAA Registered Extended LUN WWN has been set via ConfigFS"
        if self.wwn is None:
            return b""
        return bytes(sorted(self._vpd_pages()))

    def _vpd_serial(self):
        return self._wwn_bytes()[:252]

    def _vpd_devid(self):
        wwn = self.wwn                          # read once: the page names one serial
        naa = self._naa_for(wwn)
        out = b"" if naa is None else \
            bytes([0x01, 0x03, 0x00, len(naa)]) + naa                   # binary, LUN, NAA
        serial = b"" if wwn is None else rawtext.encode(wwn)
        t10 = (self.vendor.encode()[:8].ljust(8) + serial)[:64]
        out += bytes([0x02, 0x01, 0x00, len(t10)]) + t10                # ASCII, LUN, T10 vendor
        return out + alua.port_designators(self._groups())             # target port (alua.py)

    def _groups(self) -> list:
        """The target port groups from ``port_groups``, or [] (none given, or it failed: the
        failure is logged and the LUN reports no ALUA rather than failing INQUIRY)."""
        if self.port_groups is None:
            return []
        try:
            return list(self.port_groups())
        except Exception as exc:
            self._log_limited("alua", logging.WARNING, "cannot read the target port groups: %s",
                              exc)
            return []

    def _report_target_port_groups(self, cdb, data_out, data_in):
        """REPORT TARGET PORT GROUPS (MAINTENANCE IN / 0Ah, SPC-4 6.36): PARAMETER DATA FORMAT
        000b (length-only header) or 001b (extended header), other values INVALID FIELD IN CDB;
        an ALLOCATION LENGTH below 4 is INVALID FIELD IN CDB, as in LIO. Without an enabled
        port in any group (TPGS 00b) the command is not supported: INVALID COMMAND OPERATION
        CODE (SPC-4 6.36.1)."""
        fmt = cdb[1] >> 5
        if fmt not in (0, 1):
            raise _invalid_cdb(1, 7)
        alloc = _be(cdb, 6, 4)
        if alloc < 4:
            raise _invalid_cdb(6)
        groups = self._groups()
        if not alua.tpgs(groups):
            raise _Check(c.ILLEGAL_REQUEST, c.ASC_INVALID_OPCODE)
        return self._respond(data_in, alua.report_target_port_groups(groups, fmt == 1), alloc)

    def _vpd_block_limits(self):
        b = bytearray(0x3C)
        b[0] = 0x01                                                      # WSNZ
        b[1] = self.max_compare_write_blocks & 0xFF
        b[2:4] = (1).to_bytes(2, "big")                                  # optimal granularity
        b[4:8] = self.max_transfer_blocks.to_bytes(4, "big")
        b[8:12] = self.optimal_transfer_blocks.to_bytes(4, "big")
        b[16:20] = self.max_unmap_blocks.to_bytes(4, "big")
        b[20:24] = self.max_unmap_descriptors.to_bytes(4, "big")
        b[24:28] = (1).to_bytes(4, "big")                                # unmap granularity
        b[32:40] = self.max_write_same_blocks.to_bytes(8, "big")
        return bytes(b)

    def _vpd_block_characteristics(self):
        b = bytearray(0x3C)
        b[0:2] = (1).to_bytes(2, "big")                                  # non-rotating medium
        return bytes(b)

    def _vpd_provisioning(self):
        # threshold exponent 0; LBPU, LBPWS, LBPWS10, LBPRZ=1; provisioning type 2 (thin)
        return bytes([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])

    def _read_capacity_10(self, cdb, data_out, data_in):
        if not cdb[8] & 0x01 and _be(cdb, 2, 4):
            raise _invalid_cdb(2)                    # LBA without PMI
        last = self.backend.num_blocks - 1
        payload = min(last, 0xFFFFFFFF).to_bytes(4, "big") + \
            self.backend.block_size.to_bytes(4, "big")
        return self._respond(data_in, payload, 8)

    def _read_capacity_16(self, cdb, data_out, data_in):
        alloc = _be(cdb, 10, 4)
        b = bytearray(32)
        b[0:8] = (self.backend.num_blocks - 1).to_bytes(8, "big")
        b[8:12] = self.backend.block_size.to_bytes(4, "big")
        b[14] = 0x80 | 0x40                          # LBPME, LBPRZ
        return self._respond(data_in, bytes(b), alloc)

    def _get_lba_status(self, cdb, data_out, data_in):
        """GET LBA STATUS (SBC-3 5.7, SERVICE ACTION IN(16) 12h): LBA status descriptors from the
        STARTING LOGICAL BLOCK ADDRESS on, as many as the ALLOCATION LENGTH holds (16 bytes
        each after an 8-byte header), provisioning status 0 mapped, 1 deallocated. The first
        descriptor starts at the requested LBA (SBC-3); an LBA past the last is LBA OUT OF
        RANGE."""
        lba = _be(cdb, 2, 8)
        alloc = _be(cdb, 10, 4)
        nblocks = self.backend.num_blocks
        if lba >= nblocks:
            raise _Check(*_LBA_OUT_OF_RANGE)
        if alloc < 8:
            return self._respond(data_in, b"", alloc)
        want = max(1, min((alloc - 8) // 16, 64))
        fn = getattr(self.backend, "lba_status", None)
        descs = fn(lba, want) if fn is not None else \
            [(lba, min(nblocks - lba, 0xFFFFFFFF), False)]
        body = b"".join(d_lba.to_bytes(8, "big") + count.to_bytes(4, "big") +
                        bytes([1 if dealloc else 0, 0, 0, 0])
                        for d_lba, count, dealloc in descs)
        payload = (len(body) + 4).to_bytes(4, "big") + bytes(4) + body
        return self._respond(data_in, payload, alloc)

    def _extended_copy(self, cdb, data_out, data_in):
        """EXTENDED COPY(LID1) (SPC-4 6.4): the copy manager runs the parameter list's
        segments (``xcopy.CopyManager.extended_copy``)."""
        plen = _be(cdb, 10, 4)
        self.copier.extended_copy(cdb, _gather(data_out, plen))
        return GOOD_RESPONSE

    def _receive_copy_results(self, cdb, data_out, data_in):
        """RECEIVE COPY RESULTS (SPC-4 6.18): OPERATING PARAMETERS (COPY STATUS: xcopy.py)."""
        return self._respond(data_in, self.copier.receive_copy_results(cdb), _be(cdb, 10, 4))

    def _pre_fetch(self, cdb, data_out, data_in):
        """PRE-FETCH(10)/(16) (SBC-3 5.10/5.11): the blocks are read into the page cache in the
        background (a hint). GOOD, not CONDITION MET: when the command completes they are on
        their way into the cache, not known to be there, which is the GOOD case of SBC-3 for
        IMMED=1 and the one a device that cannot say otherwise gives. PREFETCH LENGTH 0 means
        up to the last block."""
        if cdb[0] == c.PRE_FETCH_10:
            lba, n = _be(cdb, 2, 4), _be(cdb, 7, 2)
        else:
            lba, n = _be(cdb, 2, 8), _be(cdb, 10, 4)
        nblocks = self.backend.num_blocks
        if lba > nblocks or (n and lba + n > nblocks) or (not n and lba >= nblocks):
            raise _Check(*_LBA_OUT_OF_RANGE)
        fn = getattr(self.backend, "prefetch", None)
        if fn is not None:
            fn(lba, n or nblocks - lba)
        return GOOD_RESPONSE

    # -- mode pages ----------------------------------------------------------------------------

    def _mode_page(self, page, pc) -> bytes:
        """Page ``page`` for page control ``pc`` (0 current, 1 changeable, 2 default)."""
        if page == c.MP_RW_ERROR_RECOVERY:
            b = bytearray(12)
            b[0], b[1] = page, 10
            return bytes(b)
        if page == c.MP_CACHING:
            b = bytearray(20)
            b[0], b[1] = page, 18
            if pc == 1:
                b[2] = 0x04                          # only WCE is changeable
            elif pc == 2:
                b[2] = 0x04
            elif self.write_cache:
                b[2] = 0x04
            return bytes(b)
        if page == c.MP_CONTROL:
            b = bytearray(12)
            b[0], b[1] = page, 10
            if pc != 1:
                b[3] = 0x10                          # unrestricted reordering allowed
                b[5] = 0x40                          # TAS
                b[8:10] = b"\xff\xff"                # busy timeout: unlimited
            return bytes(b)
        raise KeyError(page)

    _PAGES = (c.MP_RW_ERROR_RECOVERY, c.MP_CACHING, c.MP_CONTROL)

    def _mode_sense(self, cdb, data_out, data_in):
        six = cdb[0] == c.MODE_SENSE_6
        dbd = bool(cdb[1] & 0x08)
        llbaa = not six and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = cdb[4] if six else _be(cdb, 7, 2)
        if pc == 3:
            raise _Check(c.ILLEGAL_REQUEST, c.ASC_SAVING_PARAMETERS_NOT_SUPPORTED)
        if page == c.MP_ALL:
            if subpage not in (0x00, 0xFF):
                raise _invalid_cdb(3)
            pages = b"".join(self._mode_page(p, pc) for p in self._PAGES)
        else:
            if subpage or page not in self._PAGES:
                raise _invalid_cdb(2 if not subpage else 3)
            pages = self._mode_page(page, pc)
        bdesc = b""
        if not dbd:
            bs, nb = self.backend.block_size, self.backend.num_blocks
            if llbaa:
                bdesc = nb.to_bytes(8, "big") + bytes(4) + bs.to_bytes(4, "big")
            else:
                bdesc = min(nb, 0xFFFFFFFF).to_bytes(4, "big") + b"\0" + bs.to_bytes(3, "big")
        dsp = 0x10 | (0x80 if self.read_only else 0)  # DPOFUA, WP
        if six:
            body = bytes([0, dsp, len(bdesc)]) + bdesc + pages
            payload = bytes([len(body)]) + body
        else:
            body = bytes([0, dsp, 0x01 if llbaa and bdesc else 0, 0]) + \
                len(bdesc).to_bytes(2, "big") + bdesc + pages
            payload = len(body).to_bytes(2, "big") + body
        return self._respond(data_in, payload, alloc)

    def _mode_select(self, cdb, data_out, data_in):
        six = cdb[0] == c.MODE_SELECT_6
        plen = cdb[4] if six else _be(cdb, 7, 2)
        if cdb[1] & 0x01:
            raise _invalid_cdb(1, 0)                 # SP: cannot save parameters
        if not cdb[1] & 0x10:
            raise _invalid_cdb(1, 4)                 # PF must be set (SPC page format)
        if plen == 0:
            return GOOD_RESPONSE
        buf = _gather(data_out, plen)
        hdr = 4 if six else 8
        if len(buf) < hdr:
            raise _Check(c.ILLEGAL_REQUEST, c.ASC_PARAMETER_LIST_LENGTH_ERROR)
        bdl = buf[3] if six else _be(buf, 6, 2)
        longlba = not six and bool(buf[4] & 0x01)
        if bdl not in ((0, 16) if longlba else (0, 8)):
            raise _invalid_param(3 if six else 6)
        if buf[1 if six else 2]:
            raise _invalid_param(1 if six else 2)    # MEDIUM TYPE: 00h for SBC devices
        pos = hdr + bdl
        if pos > len(buf):
            raise _Check(c.ILLEGAL_REQUEST, c.ASC_PARAMETER_LIST_LENGTH_ERROR)
        if bdl:
            self._check_block_descriptor(buf[hdr:pos], hdr, longlba)
        new_wce = None
        while pos < len(buf):
            if pos + 2 > len(buf):
                raise _Check(c.ILLEGAL_REQUEST, c.ASC_PARAMETER_LIST_LENGTH_ERROR)
            page, plen2 = buf[pos] & 0x3F, buf[pos + 1]
            if buf[pos] & 0x40 or page not in self._PAGES:
                raise _invalid_param(pos)
            given = buf[pos:pos + 2 + plen2]
            current = self._mode_page(page, 0)
            mask = self._mode_page(page, 1)
            if len(given) != len(current):
                raise _invalid_param(pos + 1)
            for i in range(2, len(current)):
                if (given[i] ^ current[i]) & ~mask[i] & 0xFF:
                    raise _invalid_param(pos + i)
            if page == c.MP_CACHING:
                new_wce = bool(given[2] & 0x04)
            pos += 2 + plen2
        if new_wce is not None and new_wce != self.write_cache:
            self.write_cache = new_wce
        return GOOD_RESPONSE

    def _check_block_descriptor(self, bd, at, longlba):
        """A MODE SELECT block descriptor (SBC-3 6.4.2: short, 8 bytes, or long LBA, 16 bytes)
        may only restate what the LUN is: the device cannot change its logical block length or
        its capacity, so a descriptor asking for either is a parameter the device server cannot
        honour, ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST (SPC-4 6.11) with the field
        pointer on it. NUMBER OF LOGICAL BLOCKS 0 means "keep the capacity" (SBC-3), and the
        short form's FFFFFFFFh stands for a capacity it cannot express. ``at``: the offset of
        the descriptor in the parameter list."""
        nb = self.backend.num_blocks
        if longlba:
            blocks, length, len_at = _be(bd, 0, 8), _be(bd, 12, 4), 12
            ok_blocks = (0, nb)
        else:
            blocks, length, len_at = _be(bd, 0, 4), _be(bd, 5, 3), 5
            ok_blocks = (0, nb) if nb <= 0xFFFFFFFF else (0, 0xFFFFFFFF)
        if blocks not in ok_blocks:
            raise _invalid_param(at)
        if length != self.backend.block_size:
            raise _invalid_param(at + len_at)

    # -- REPORT SUPPORTED OPERATION CODES ------------------------------------------------------

    def _report_opcodes(self, cdb, data_out, data_in):
        rctd = bool(cdb[2] & 0x80)
        options = cdb[2] & 0x07
        req_op, req_sa = cdb[3], _be(cdb, 4, 2)
        alloc = _be(cdb, 6, 4)
        timeouts = bytes([0, 10, 0, 0]) + (0).to_bytes(4, "big") + (30).to_bytes(4, "big")
        if options == 0:
            out = b""
            for op in sorted(self._ops.values(), key=lambda o: (o.opcode, o.sa or 0)):
                flags = (0x01 if op.sa is not None else 0) | (0x02 if rctd else 0)
                out += bytes([op.opcode, 0]) + (op.sa or 0).to_bytes(2, "big") + \
                    bytes([0, flags]) + op.cdb_len.to_bytes(2, "big")
                if rctd:
                    out += timeouts
            payload = len(out).to_bytes(4, "big") + out
            return self._respond(data_in, payload, alloc)
        if options not in (1, 2, 3):
            raise _invalid_cdb(2, 2)
        has_sa = any(k[0] == req_op and k[1] is not None for k in self._ops)
        if options == 1:
            if has_sa:
                raise _invalid_cdb(3)
            op = self._ops.get((req_op, None))
        elif options == 2:
            if not has_sa and (req_op, None) in self._ops:
                raise _invalid_cdb(3)
            op = self._ops.get((req_op, req_sa))
        else:
            op = self._ops.get((req_op, req_sa if has_sa else None))
        if op is None:
            payload = bytes([0, 0x01, 0, 0])         # not supported
        else:
            payload = bytes([0, (0x80 if rctd else 0) | 0x03]) + \
                op.cdb_len.to_bytes(2, "big") + op.usage
            if rctd:
                payload += timeouts
        return self._respond(data_in, payload, alloc)

    # -- the table -----------------------------------------------------------------------------

    def _register(self):
        def add(opcode, name, handler, usage, sa=None):
            self._ops[(opcode, sa)] = _Op(opcode, sa, name, handler, usage)

        rw10 = lambda op, b1: (op, b1, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07)  # noqa
        rw16 = lambda op, b1: (op, b1) + (0xFF,) * 12 + (0x1F, 0x07)  # noqa: E731
        rw12 = lambda op, b1: (op, b1) + (0xFF,) * 8 + (0x1F, 0x07)  # noqa: E731
        add(c.TEST_UNIT_READY, "TEST UNIT READY", self._tur, (0x00, 0, 0, 0, 0, 0x07))
        add(c.REQUEST_SENSE, "REQUEST SENSE", self._request_sense, (0x03, 0x01, 0, 0, 0xFF, 0x07))
        add(c.INQUIRY, "INQUIRY", self._inquiry, (0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07))
        add(c.MODE_SELECT_6, "MODE SELECT(6)", self._mode_select,
            (0x15, 0x11, 0, 0, 0xFF, 0x07))
        add(c.MODE_SENSE_6, "MODE SENSE(6)", self._mode_sense, (0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07))
        add(c.MODE_SELECT_10, "MODE SELECT(10)", self._mode_select,
            (0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07))
        add(c.MODE_SENSE_10, "MODE SENSE(10)", self._mode_sense,
            (0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x07))
        add(c.START_STOP_UNIT, "START STOP UNIT", self._start_stop,
            (0x1B, 0x01, 0, 0x0F, 0xF7, 0x07))
        add(c.READ_CAPACITY_10, "READ CAPACITY(10)", self._read_capacity_10,
            (0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0x01, 0x07))
        add(c.SERVICE_ACTION_IN_16, "READ CAPACITY(16)", self._read_capacity_16,
            (0x9E, 0x10) + (0xFF,) * 12 + (0, 0x07), sa=c.SAI_READ_CAPACITY_16)
        add(c.SERVICE_ACTION_IN_16, "GET LBA STATUS", self._get_lba_status,
            (0x9E, 0x12) + (0xFF,) * 12 + (0, 0x07), sa=c.SAI_GET_LBA_STATUS)
        add(c.EXTENDED_COPY, "EXTENDED COPY(LID1)", self._extended_copy,
            (0x83, 0x00) + (0,) * 8 + (0xFF,) * 4 + (0, 0x07), sa=0x00)
        add(c.RECEIVE_COPY_RESULTS, "RECEIVE COPY RESULTS(OPERATING PARAMETERS)",
            self._receive_copy_results, (0x84, 0x03, 0xFF) + (0,) * 7 + (0xFF,) * 4 + (0, 0x07),
            sa=0x03)
        add(c.PRE_FETCH_10, "PRE-FETCH(10)", self._pre_fetch,
            (0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07))
        add(c.PRE_FETCH_16, "PRE-FETCH(16)", self._pre_fetch,
            (0x90, 0x02) + (0xFF,) * 12 + (0x1F, 0x07))
        add(c.READ_6, "READ(6)", self._read, (0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07))
        add(c.WRITE_6, "WRITE(6)", self._write, (0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07))
        add(c.READ_10, "READ(10)", self._read, rw10(0x28, 0x18))
        add(c.WRITE_10, "WRITE(10)", self._write, rw10(0x2A, 0x18))
        add(c.READ_12, "READ(12)", self._read, rw12(0xA8, 0x18))
        add(c.WRITE_12, "WRITE(12)", self._write, rw12(0xAA, 0x18))
        add(c.READ_16, "READ(16)", self._read, rw16(0x88, 0x18))
        add(c.WRITE_16, "WRITE(16)", self._write, rw16(0x8A, 0x18))
        # byte 1 usage: DPO (0x10) and BYTCHK (0x06 / 0x02); FUA for reads/writes (0x08)
        add(c.VERIFY_10, "VERIFY(10)", self._verify, rw10(0x2F, 0x16))
        add(c.VERIFY_12, "VERIFY(12)", self._verify, rw12(0xAF, 0x16))
        add(c.VERIFY_16, "VERIFY(16)", self._verify, rw16(0x8F, 0x16))
        add(c.WRITE_AND_VERIFY_10, "WRITE AND VERIFY(10)", self._write_and_verify,
            rw10(0x2E, 0x12))
        add(c.WRITE_AND_VERIFY_12, "WRITE AND VERIFY(12)", self._write_and_verify,
            rw12(0xAE, 0x12))
        add(c.WRITE_AND_VERIFY_16, "WRITE AND VERIFY(16)", self._write_and_verify,
            rw16(0x8E, 0x12))
        add(c.SYNCHRONIZE_CACHE_10, "SYNCHRONIZE CACHE(10)", self._sync_cache,
            (0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07))
        add(c.SYNCHRONIZE_CACHE_16, "SYNCHRONIZE CACHE(16)", self._sync_cache,
            (0x91, 0x02) + (0xFF,) * 12 + (0x1F, 0x07))
        add(c.WRITE_SAME_10, "WRITE SAME(10)", self._write_same,
            (0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07))
        add(c.WRITE_SAME_16, "WRITE SAME(16)", self._write_same,
            (0x93, 0x09) + (0xFF,) * 12 + (0x1F, 0x07))
        add(c.UNMAP, "UNMAP", self._unmap, (0x42, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0x07))
        add(c.COMPARE_AND_WRITE, "COMPARE AND WRITE", self._compare_and_write,
            (0x89, 0x18) + (0xFF,) * 8 + (0, 0, 0, 0xFF, 0x1F, 0x07))
        add(c.MAINTENANCE_IN, "REPORT SUPPORTED OPERATION CODES", self._report_opcodes,
            (0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
            sa=c.MI_REPORT_SUPPORTED_OPERATION_CODES)
        add(c.MAINTENANCE_IN, "REPORT TARGET PORT GROUPS", self._report_target_port_groups,
            (0xA3, 0xEA, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07),
            sa=c.MI_REPORT_TARGET_PORT_GROUPS)

    def supported_opcodes(self) -> list[tuple[int, int | None, str]]:
        """Every supported command as (opcode, service action or None, name), sorted: what REPORT
        SUPPORTED OPERATION CODES (SPC-4) lists."""
        return sorted((o.opcode, o.sa, o.name) for o in self._ops.values())

