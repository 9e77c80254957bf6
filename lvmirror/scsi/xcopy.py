"""The copy manager of a LUN: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18).

VMware's VAAI "full copy" (clone, Storage vMotion within a datastore) sends EXTENDED COPY(LID1)
(Windows' ODX uses the token-based LID4 commands, POPULATE TOKEN / WRITE USING TOKEN, which
are not offered): a parameter list of CSCD (copy source / copy destination)
descriptors naming logical units, and segment descriptors saying "copy N blocks from LBA s of
CSCD a to LBA d of CSCD b". The data never crosses the network: lvmirrord copies it itself,
through the volumes' own read and write paths (region locks, write-intent log, every image).

What is accepted, as LIO's ``target_core_xcopy.c`` accepts it (the reference initiators are
tested against), with the checks in its order:

* parameter list: header 16 bytes; CSCD plus segment descriptor lists at most
  MAX_LIST_LENGTH bytes, else PARAMETER LIST LENGTH ERROR; no inline data (INVALID FIELD IN
  PARAMETER LIST); a list shorter than its header says: PARAMETER LIST LENGTH ERROR;
* segment descriptors: type 02h (block device to block device) only, 28 bytes (UNSUPPORTED
  SEGMENT DESCRIPTOR TYPE CODE; more than MAX_SEGMENTS: TOO MANY SEGMENT DESCRIPTORS);
* CSCD descriptors: type E4h (identification descriptor) only (UNSUPPORTED TARGET DESCRIPTOR
  TYPE CODE; more than MAX_CSCD: TOO MANY TARGET DESCRIPTORS), designating a logical unit by
  the 16-byte NAA designator of its VPD page 83h (binary code set, association logical unit;
  anything else INVALID FIELD IN PARAMETER LIST);
* the LUN that received the command must be the source or the destination of each segment
  (LIO's rule); the other one is found by ``resolve(naa)`` among the LUNs this process serves
  (a volume and its exported split images); one not found: COPY ABORTED / COPY TARGET DEVICE
  NOT REACHABLE, which makes ESXi copy through the host instead;
* a segment whose CSCD index is not in the list, whose range runs past either LUN's end, or
  whose I/O fails: COPY ABORTED (COPY TARGET DEVICE NOT REACHABLE, as LIO answers every
  failed segment), nothing after it copied.

A segment may copy as many blocks as its 16-bit count allows (65,535: 256 MiB of 4096-byte
blocks), in reads and writes of at most CHUNK_BYTES; the MAXIMUM SEGMENT LENGTH reported is
that, so no segment is refused for its length.

RECEIVE COPY RESULTS answers OPERATING PARAMETERS (the limits above), and INQUIRY sets 3PC, as
LIO does; like LIO there is no Third-party Copy VPD page (8Fh). COPY STATUS is not offered:
SPC-4 holds a copy's status per I_T nexus and list identifier, and TCMU does not tell a
handler which I_T nexus sent a command, so a held status could be read by another initiator
that reused the list identifier - worse than none. A copy runs to its end before EXTENDED
COPY completes, so its status is the command's own.
"""

from __future__ import annotations

import logging

from lvmirror.scsi import constants as c

__all__ = ["CopyManager", "CopyCheck", "MAX_CSCD", "MAX_SEGMENTS", "MAX_LIST_LENGTH",
           "SEGMENT_B2B", "CSCD_IDENTIFICATION"]

log = logging.getLogger(__name__)

MAX_CSCD = 2                  # CSCD descriptors per list (LIO: 2)
MAX_SEGMENTS = 8              # segment descriptors per list
MAX_LIST_LENGTH = 1024        # bytes of CSCD + segment descriptors (LIO: 1024)
MAX_SEGMENT_BLOCKS = 0xFFFF   # a block-to-block segment's 16-bit NUMBER OF BLOCKS: any segment
                              # is accepted (copied CHUNK_BYTES at a time), whatever the block size
SEGMENT_B2B = 0x02            # block device to block device segment descriptor
CSCD_IDENTIFICATION = 0xE4    # identification descriptor CSCD descriptor
CHUNK_BYTES = 1 << 20         # a segment is copied in reads and writes of at most this


# RECEIVE COPY RESULTS service action (SPC-4 6.18)
RCR_OPERATING_PARAMETERS = 0x03


class CopyCheck(Exception):
    """A CHECK CONDITION for the command: ``key`` and ``asc`` (ASC, ASCQ), with a field
    pointer into the parameter list (``field``) or the CDB (``cdb_field``) when it is one
    field that is wrong."""

    def __init__(self, key, asc, *, field=None, cdb_field=False):
        super().__init__(key, asc)
        self.key, self.asc, self.field, self.cdb_field = key, asc, field, cdb_field


def _be(b, start, n) -> int:
    return int.from_bytes(b[start:start + n], "big")


def _param(asc=c.ASC_INVALID_FIELD_IN_PARAMETER_LIST, field=None):
    return CopyCheck(c.ILLEGAL_REQUEST, asc, field=field)


def _aborted():
    return CopyCheck(c.COPY_ABORTED, c.ASC_COPY_TARGET_DEVICE_NOT_REACHABLE)


class CopyManager:
    """The copy manager of one LogicalUnit ``lu`` (its ``backend``, ``read_only`` and
    ``naa``, the 16-byte NAA designator of VPD 83h). ``resolve(naa) -> LogicalUnit | None``:
    another LUN this process serves (None: only ``lu`` itself)."""

    def __init__(self, lu, resolve=None):
        self.lu = lu
        self.resolve = resolve
        self.copied_bytes = 0         # bytes copied by EXTENDED COPY since the LUN opened

    # -- EXTENDED COPY -------------------------------------------------------------------------

    def extended_copy(self, cdb, param: bytes) -> None:
        """Run EXTENDED COPY(LID1) with the parameter list ``param`` (bytes, as long as the
        CDB's PARAMETER LIST LENGTH). Returns when every segment is copied; CopyCheck
        otherwise (see the module docstring for which)."""
        if not param:
            return                                    # SPC-4: a zero-length list is no error
        if len(param) < 16:
            raise _param(c.ASC_PARAMETER_LIST_LENGTH_ERROR)
        tdll, sdll, inline = _be(param, 2, 2), _be(param, 8, 4), _be(param, 12, 4)
        if tdll + sdll > MAX_LIST_LENGTH:
            raise _param(c.ASC_PARAMETER_LIST_LENGTH_ERROR)
        if inline:
            raise _param(field=12)
        if len(param) < 16 + tdll + sdll:
            raise _param(c.ASC_PARAMETER_LIST_LENGTH_ERROR)
        segments = self._segments(param, 16 + tdll, sdll)
        cscds = self._cscds(param, 16, tdll)
        for src_i, dst_i, nblocks, src_lba, dst_lba in segments:
            if src_i >= len(cscds) or dst_i >= len(cscds):
                raise _aborted()
            src, dst = self._unit(cscds[src_i]), self._unit(cscds[dst_i])
            if src is not self.lu and dst is not self.lu:
                raise _aborted()                      # LIO: this LUN is one of the two
            if dst.read_only:
                raise CopyCheck(c.DATA_PROTECT, c.ASC_WRITE_PROTECTED)
            self._copy(src.backend, src_lba, dst.backend, dst_lba, nblocks)
            dst.durable()               # a write-through destination: durable before GOOD
            self.copied_bytes += nblocks * src.backend.block_size

    def _segments(self, p, at, sdll):
        if sdll == 0:
            raise _param(field=8)
        if sdll % 28:
            raise _param(c.ASC_UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, field=at)
        if sdll > MAX_SEGMENTS * 28:
            raise _param(c.ASC_TOO_MANY_SEGMENT_DESCRIPTORS, field=8)
        out = []
        for off in range(at, at + sdll, 28):
            if p[off] != SEGMENT_B2B:
                raise _param(c.ASC_UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE, field=off)
            if _be(p, off + 2, 2) != 0x18:
                raise _param(field=off + 2)
            out.append((_be(p, off + 4, 2), _be(p, off + 6, 2), _be(p, off + 10, 2),
                        _be(p, off + 12, 8), _be(p, off + 20, 8)))
        return out

    def _cscds(self, p, at, tdll):
        if tdll % 32:
            raise _param(c.ASC_UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, field=at)
        if tdll > MAX_CSCD * 32:
            raise _param(c.ASC_TOO_MANY_TARGET_DESCRIPTORS, field=2)
        out = []
        for off in range(at, at + tdll, 32):
            if p[off] != CSCD_IDENTIFICATION:
                raise _param(c.ASC_UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE, field=off)
            code_set, assoc_type, dlen = p[off + 4] & 0x0F, p[off + 5], p[off + 7]
            if code_set != 0x01 or (assoc_type >> 4) & 0x03 != 0 or assoc_type & 0x0F != 0x03 \
                    or dlen != 16 or p[off + 8] & 0xF0 != 0x60:
                raise _param(field=off + 4)
            out.append(bytes(p[off + 8:off + 24]))
        return out

    def _unit(self, naa):
        if naa == self.lu.naa:
            return self.lu
        other = self.resolve(naa) if self.resolve is not None else None
        if other is None:
            raise _aborted()
        return other

    def _copy(self, src, src_lba, dst, dst_lba, nblocks):
        bs = src.block_size
        if dst.block_size != bs:
            log.warning("EXTENDED COPY between block sizes %d and %d refused", bs,
                        dst.block_size)
            raise _aborted()
        if src_lba + nblocks > src.num_blocks or dst_lba + nblocks > dst.num_blocks:
            raise _aborted()
        if not nblocks:
            return
        try:
            copy_blocks(src, src_lba, dst, dst_lba, nblocks)
        except Exception as e:   # an I/O error or a LUN gone NOT READY: the copy stops here
            log.warning("EXTENDED COPY of %d blocks (LBA %d to %d) aborted: %s: %s", nblocks,
                        src_lba, dst_lba, type(e).__name__, e)
            raise _aborted() from e

    # -- RECEIVE COPY RESULTS ------------------------------------------------------------------

    def receive_copy_results(self, cdb) -> bytes:
        """The RECEIVE COPY RESULTS parameter data for ``cdb`` (the caller truncates it to the
        ALLOCATION LENGTH): OPERATING PARAMETERS; CopyCheck (INVALID FIELD IN CDB) for any other
        service action."""
        if cdb[1] & 0x1F == RCR_OPERATING_PARAMETERS:
            return self.operating_parameters()
        raise CopyCheck(c.ILLEGAL_REQUEST, c.ASC_INVALID_FIELD_IN_CDB, field=1, cdb_field=True)

    def operating_parameters(self) -> bytes:
        """OPERATING PARAMETERS (SPC-4 6.18.4): the limits of this copy manager."""
        bs = self.lu.backend.block_size
        gran = bs.bit_length() - 1
        codes = bytes([SEGMENT_B2B, CSCD_IDENTIFICATION])
        b = bytearray(44)
        b[4] = 0x01                                        # SNLID: list ids not unique
        b[8:10] = MAX_CSCD.to_bytes(2, "big")
        b[10:12] = MAX_SEGMENTS.to_bytes(2, "big")
        b[12:16] = MAX_LIST_LENGTH.to_bytes(4, "big")
        b[16:20] = (MAX_SEGMENT_BLOCKS * bs).to_bytes(4, "big")  # MAXIMUM SEGMENT LENGTH
        # 20..31: no inline data, no held data, no stream devices
        b[34:36] = (1).to_bytes(2, "big")                  # total concurrent copies
        b[36] = 1                                          # maximum concurrent copies
        b[37] = b[38] = b[39] = gran                       # data segment/inline/held granularity
        b[43] = len(codes)
        data = bytes(b) + codes
        return (len(data) - 4).to_bytes(4, "big") + data[4:]


def copy_blocks(src, src_lba: int, dst, dst_lba: int, nblocks: int,
                chunk_bytes: int | None = None) -> None:
    """Copy ``nblocks`` blocks from ``src`` (a Backend) at ``src_lba`` to ``dst`` at
    ``dst_lba`` through their read and write paths, ``chunk_bytes`` (default CHUNK_BYTES) at a
    time; when both are
    the same backend and the destination overlaps the source from above, from the end down,
    so every block is read before it is overwritten (memmove). Errors of the backends
    propagate."""
    bs = src.block_size
    step = max((chunk_bytes or CHUNK_BYTES) // bs, 1)
    starts = list(range(0, nblocks, step))
    if src is dst and src_lba < dst_lba < src_lba + nblocks:
        starts.reverse()
    buf = bytearray(min(step, nblocks) * bs)
    for k in starts:
        n = min(step, nblocks - k)
        view = memoryview(buf)[:n * bs]
        src.read(src_lba + k, [view])
        dst.write(dst_lba + k, [view])
