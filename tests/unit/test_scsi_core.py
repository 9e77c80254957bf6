"""The sans-I/O SCSI core against an in-memory backend: every command, its error paths, and a
fuzz test requiring a well-formed response for any CDB."""

import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lvmirror.errors import VolumeIOError
from lvmirror.scsi import CHECK_CONDITION, GOOD, LogicalUnit, parse_sense
from lvmirror.scsi import constants as c

BS = 512
NBLOCKS = 4096


class RamBackend:
    def __init__(self, nblocks=NBLOCKS, bs=BS):
        self.block_size = bs
        self.num_blocks = nblocks
        self.data = bytearray(nblocks * bs)
        self.calls = []
        self.flushes = 0
        self.fail_reads = False
        self.lock = threading.Lock()

    def _range(self, lba, n):
        assert 0 <= lba and lba + n <= self.num_blocks, ("backend call out of range", lba, n)

    def read(self, lba, buffers):
        if self.fail_reads:
            raise VolumeIOError("injected", is_read=True)
        n = sum(len(b) for b in buffers)
        assert n % self.block_size == 0
        self._range(lba, n // self.block_size)
        self.calls.append(("read", lba, n // self.block_size))
        p = lba * self.block_size
        for b in buffers:
            b[:] = self.data[p:p + len(b)]
            p += len(b)

    def write(self, lba, buffers, fua=False):
        n = sum(len(b) for b in buffers)
        assert n % self.block_size == 0
        self._range(lba, n // self.block_size)
        self.calls.append(("write", lba, n // self.block_size, fua))
        p = lba * self.block_size
        for b in buffers:
            self.data[p:p + len(b)] = b
            p += len(b)

    def flush(self):
        self.flushes += 1

    def unmap(self, lba, n):
        self._range(lba, n)
        self.calls.append(("unmap", lba, n))
        self.data[lba * self.block_size:(lba + n) * self.block_size] = bytes(n * self.block_size)

    def compare_and_write(self, lba, verify, data):
        with self.lock:
            self._range(lba, len(verify) // self.block_size)
            p = lba * self.block_size
            cur = self.data[p:p + len(verify)]
            if cur != verify:
                return next(i for i in range(len(cur)) if cur[i] != verify[i])
            self.data[p:p + len(data)] = data
            return None


@pytest.fixture
def lu():
    return LogicalUnit(RamBackend(), wwn="5f0c1b2a-7d3e-4f60-9a8b-0c1d2e3f4a5b")


def run(lu, cdb, out=b"", in_len=0):
    out_b = [memoryview(bytearray(out))] if out else []
    in_buf = bytearray(in_len)
    r = lu.execute(bytes(cdb), out_b, [memoryview(in_buf)] if in_len else [])
    return r, bytes(in_buf[:r.read_len])


def sense_of(r):
    assert r.status == CHECK_CONDITION
    return parse_sense(r.sense)


def cdb10(op, lba, n, b1=0):
    return bytes([op, b1]) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"


def cdb16(op, lba, n, b1=0):
    return bytes([op, b1]) + lba.to_bytes(8, "big") + n.to_bytes(4, "big") + b"\0\0"


# -- INQUIRY ----------------------------------------------------------------------------------

def test_standard_inquiry(lu):
    r, d = run(lu, [0x12, 0, 0, 0, 255, 0], in_len=255)
    assert r.status == GOOD and len(d) == 66 and d[4] == 61
    assert d[0] == 0 and d[2] == 6 and d[3] & 0x0F == 2 and d[7] & 0x02
    descs = {int.from_bytes(d[k:k + 2], "big") for k in range(58, 66, 2)}
    assert {0x0460, 0x04C0} <= descs                  # claims SPC-4 and SBC-3
    assert d[8:16] == b"LIO-ORG " and d[16:32].rstrip() == b"lvmirror"
    assert d[5] & 0x08                                # 3PC: EXTENDED COPY


def test_inquiry_allocation_length_truncates(lu):
    r, d = run(lu, [0x12, 0, 0, 0, 5, 0], in_len=255)
    assert r.read_len == 5 and d[4] == 61


def test_inquiry_page_code_without_evpd_is_invalid(lu):
    assert sense_of(run(lu, [0x12, 0, 0x80, 0, 255, 0], in_len=255)[0]) == (5, 0x24, 0)


def test_vpd_pages(lu):
    r, d = run(lu, [0x12, 1, 0x00, 0, 255, 0], in_len=255)
    pages = list(d[4:4 + d[3]])
    assert pages == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    _, serial = run(lu, [0x12, 1, 0x80, 0, 255, 0], in_len=255)
    assert serial[4:] == b"5f0c1b2a-7d3e-4f60-9a8b-0c1d2e3f4a5b"
    _, devid = run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)
    assert devid[5] & 0x0F == 3 and devid[7] == 16 and devid[8] >> 4 == 6   # NAA 6
    naa = devid[8:24]
    assert (int.from_bytes(naa, "big") >> 100) & 0xFFFFFF == 0x001405
    other = LogicalUnit(RamBackend(), wwn="5f0c1b2a-7d3e-4f60-9a8b-0c1d2e3f4a5b")
    assert run(other, [0x12, 1, 0x83, 0, 255, 0], in_len=255)[1] == devid     # stable
    _, bl = run(lu, [0x12, 1, 0xB0, 0, 255, 0], in_len=255)
    assert struct.unpack(">H", bl[2:4])[0] == 0x3C and bl[4] & 1 and bl[5] == 1
    _, lbp = run(lu, [0x12, 1, 0xB2, 0, 255, 0], in_len=255)
    assert lbp[5] & 0xE0 == 0xE0 and lbp[6] & 0x07 == 2
    _, bc = run(lu, [0x12, 1, 0xB1, 0, 255, 0], in_len=255)
    assert bc[4:6] == b"\0\x01"
    assert sense_of(run(lu, [0x12, 1, 0x99, 0, 255, 0], in_len=255)[0]) == (5, 0x24, 0)


@pytest.mark.parametrize("hw_max, want_max, want_opt", [
    (128, 128, 128),          # TCMU's default hw_max_sectors: optimal clamped to the maximum
    (16384, 16384, 2048),     # targetcli-lvmirror's default: 8 MiB maximum, 1 MiB optimal
    (None, 16384, 2048),
])
def test_block_limits_transfer_lengths(hw_max, want_max, want_opt):
    lu = LogicalUnit(RamBackend(), max_transfer_blocks=hw_max)
    _, bl = run(lu, [0x12, 1, 0xB0, 0, 255, 0], in_len=255)
    assert struct.unpack(">II", bl[8:16]) == (want_max, want_opt)   # MAXIMUM, OPTIMAL
    # a transfer above the advertised maximum is still served (as LIO's own backstores do)
    r, d = run(lu, [0x28, 0, 0, 0, 0, 0, 0, 0x01, 0x00, 0], in_len=256 * BS)
    assert r.status == GOOD and len(d) == 256 * BS


# -- capacity, TUR, REQUEST SENSE, unit attention ---------------------------------------------

def test_read_capacity_10_and_16(lu):
    r, d = run(lu, [0x25] + [0] * 9, in_len=8)
    assert struct.unpack(">II", d) == (NBLOCKS - 1, BS)
    r, d = run(lu, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0], in_len=32)
    assert struct.unpack(">QI", d[:12]) == (NBLOCKS - 1, BS) and d[14] & 0xC0 == 0xC0
    assert sense_of(run(lu, [0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0], in_len=8)[0]) == (5, 0x24, 0)


def test_capacity_change_gives_one_unit_attention_but_not_to_inquiry(lu):
    lu.backend.num_blocks = 2048
    lu.capacity_changed()
    assert run(lu, [0x12, 0, 0, 0, 36, 0], in_len=36)[0].status == GOOD
    assert sense_of(run(lu, [0] * 6)[0]) == (6, 0x2A, 0x09)
    assert run(lu, [0] * 6)[0].status == GOOD
    r, d = run(lu, [0x25] + [0] * 9, in_len=8)
    assert struct.unpack(">I", d[:4])[0] == 2047


def test_request_sense_returns_pending_unit_attention_then_no_sense(lu):
    lu.capacity_changed()
    r, d = run(lu, [0x03, 0, 0, 0, 18, 0], in_len=18)
    assert r.status == GOOD and parse_sense(d) == (6, 0x2A, 0x09)
    r, d = run(lu, [0x03, 1, 0, 0, 18, 0], in_len=18)
    assert d[0] == 0x72 and parse_sense(d) == (0, 0, 0)


def test_unknown_opcode_and_naca(lu):
    assert sense_of(run(lu, [0xC0] + [0] * 9)[0]) == (5, 0x20, 0)
    assert sense_of(run(lu, [0x00, 0, 0, 0, 0, 0x04])[0]) == (5, 0x24, 0)
    assert sense_of(run(lu, [0x9E, 0x11] + [0] * 14)[0]) == (5, 0x24, 0)     # unknown SA
    assert sense_of(run(lu, b"")[0]) == (5, 0x20, 0)


# -- READ / WRITE -----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda op, lba, n: cdb10(0x28 if op == "r" else 0x2A, lba, n),
    lambda op, lba, n: bytes([0xA8 if op == "r" else 0xAA, 0]) + lba.to_bytes(4, "big")
    + n.to_bytes(4, "big") + b"\0\0",
    lambda op, lba, n: cdb16(0x88 if op == "r" else 0x8A, lba, n),
    lambda op, lba, n: bytes([0x08 if op == "r" else 0x0A, lba >> 16, (lba >> 8) & 0xFF,
                              lba & 0xFF, n, 0]),
])
def test_write_then_read_every_size(lu, make):
    data = bytes(range(256)) * 8          # 4 blocks
    assert run(lu, make("w", 100, 4), out=data)[0].status == GOOD
    r, d = run(lu, make("r", 100, 4), in_len=len(data))
    assert r.status == GOOD and d == data
    assert lu.backend.data[100 * BS:104 * BS] == data


def test_read6_length_zero_means_256_blocks(lu):
    r, d = run(lu, [0x08, 0, 0, 0, 0, 0], in_len=256 * BS)
    assert r.read_len == 256 * BS and lu.backend.calls[-1] == ("read", 0, 256)


def test_read10_length_zero_transfers_nothing(lu):
    r, _ = run(lu, cdb10(0x28, 0, 0))
    assert r == (GOOD, b"", 0) and not lu.backend.calls


def test_lba_out_of_range(lu):
    assert sense_of(run(lu, cdb10(0x28, NBLOCKS - 1, 2), in_len=2 * BS)[0]) == (5, 0x21, 0)
    assert sense_of(run(lu, cdb16(0x8A, 2 ** 63, 1), out=bytes(BS))[0]) == (5, 0x21, 0)
    assert run(lu, cdb10(0x28, NBLOCKS, 0))[0].status == GOOD      # zero blocks at the end
    assert sense_of(run(lu, cdb10(0x28, NBLOCKS + 1, 0))[0]) == (5, 0x21, 0)
    assert not lu.backend.calls


def test_fua_and_write_cache_off_reach_the_backend(lu):
    run(lu, cdb10(0x2A, 0, 1, b1=0x08), out=bytes(BS))
    assert lu.backend.calls[-1] == ("write", 0, 1, True)
    run(lu, cdb10(0x2A, 0, 1), out=bytes(BS))
    assert lu.backend.calls[-1] == ("write", 0, 1, False)
    lu.write_cache = False
    run(lu, cdb10(0x2A, 0, 1), out=bytes(BS))
    assert lu.backend.calls[-1] == ("write", 0, 1, True)


def test_write_buffer_mismatch_is_refused(lu):
    assert sense_of(run(lu, cdb10(0x2A, 0, 2), out=bytes(BS))[0]) == (5, 0x0E, 0x03)


def test_short_read_buffer_gets_partial_data_and_read_len(lu):
    lu.backend.data[0:2 * BS] = b"a" * BS + b"b" * BS
    r, d = run(lu, cdb10(0x28, 0, 2), in_len=BS + 100)
    assert r.read_len == BS + 100 and d == b"a" * BS + b"b" * 100


def test_protect_fields_refused_and_read_only(lu):
    assert sense_of(run(lu, cdb10(0x28, 0, 1, b1=0x20), in_len=BS)[0]) == (5, 0x24, 0)
    lu.read_only = True
    assert sense_of(run(lu, cdb10(0x2A, 0, 1), out=bytes(BS))[0]) == (7, 0x27, 0)
    r, d = run(lu, [0x1A, 0, 0x3F, 0, 255, 0], in_len=255)
    assert d[2] & 0x80                                  # WP in MODE SENSE


def test_backend_errors_become_medium_and_hardware_errors(lu):
    lu.backend.fail_reads = True
    assert sense_of(run(lu, cdb10(0x28, 0, 1), in_len=BS)[0]) == (3, 0x11, 0)

    def boom(*a, **k):
        raise RuntimeError("bug")
    lu.backend.write = boom
    assert sense_of(run(lu, cdb10(0x2A, 0, 1), out=bytes(BS))[0]) == (4, 0x44, 0)


# -- VERIFY, WRITE AND VERIFY, SYNC CACHE -----------------------------------------------------

def test_verify_bytchk(lu):
    lu.backend.data[0:BS] = b"v" * BS
    assert run(lu, cdb10(0x2F, 0, 1))[0].status == GOOD
    assert run(lu, cdb10(0x2F, 0, 1, b1=0x02), out=b"v" * BS)[0].status == GOOD
    r, _ = run(lu, cdb10(0x2F, 0, 1, b1=0x02), out=b"v" * 10 + b"x" * (BS - 10))
    assert sense_of(r) == (0x0E, 0x1D, 0) and r.sense[0] & 0x80
    assert struct.unpack(">I", r.sense[3:7])[0] == 10
    assert sense_of(run(lu, cdb10(0x2F, 0, 1, b1=0x04))[0]) == (5, 0x24, 0)
    assert run(lu, cdb16(0x8F, 0, 1, b1=0x06), out=b"v" * BS)[0].status == GOOD


def test_write_and_verify(lu):
    assert run(lu, cdb10(0x2E, 7, 1), out=b"w" * BS)[0].status == GOOD
    assert lu.backend.data[7 * BS:8 * BS] == b"w" * BS
    assert run(lu, cdb16(0x8E, 8, 1), out=b"q" * BS)[0].status == GOOD


def test_synchronize_cache(lu):
    assert run(lu, cdb10(0x35, 0, 0))[0].status == GOOD and lu.backend.flushes == 1
    assert run(lu, cdb16(0x91, 0, 10))[0].status == GOOD and lu.backend.flushes == 2
    assert sense_of(run(lu, cdb10(0x35, NBLOCKS, 1))[0]) == (5, 0x21, 0)


# -- WRITE SAME, UNMAP, COMPARE AND WRITE -----------------------------------------------------

def test_write_same(lu):
    assert run(lu, cdb10(0x41, 10, 20), out=b"s" * BS)[0].status == GOOD
    assert lu.backend.data[10 * BS:30 * BS] == b"s" * (20 * BS)
    # UNMAP bit with zero data unmaps
    assert run(lu, cdb16(0x93, 10, 5, b1=0x08), out=bytes(BS))[0].status == GOOD
    assert ("unmap", 10, 5) in lu.backend.calls
    # NDOB: no data-out buffer, zeroes
    assert run(lu, cdb16(0x93, 20, 2, b1=0x09))[0].status == GOOD
    assert lu.backend.data[20 * BS:22 * BS] == bytes(2 * BS)
    assert sense_of(run(lu, cdb10(0x41, 0, 0), out=bytes(BS))[0]) == (5, 0x24, 0)   # WSNZ
    assert sense_of(run(lu, cdb10(0x41, 0, 1, b1=0x10), out=bytes(BS))[0]) == (5, 0x24, 0)
    assert sense_of(run(lu, cdb10(0x41, NBLOCKS - 1, 2), out=bytes(BS))[0]) == (5, 0x21, 0)


def unmap_list(*ranges):
    desc = b"".join(lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(4) for lba, n in ranges)
    return (6 + len(desc)).to_bytes(2, "big") + len(desc).to_bytes(2, "big") + bytes(4) + desc


def test_unmap(lu):
    lu.backend.data[:] = b"x" * len(lu.backend.data)
    plist = unmap_list((0, 8), (100, 4))
    cdb = bytes([0x42, 0, 0, 0, 0, 0, 0]) + len(plist).to_bytes(2, "big") + b"\0"
    assert run(lu, cdb, out=plist)[0].status == GOOD
    assert lu.backend.data[:8 * BS] == bytes(8 * BS) and lu.backend.data[8 * BS] == ord("x")
    bad = unmap_list((NBLOCKS - 2, 4))
    cdb = bytes([0x42, 0, 0, 0, 0, 0, 0]) + len(bad).to_bytes(2, "big") + b"\0"
    assert sense_of(run(lu, cdb, out=bad)[0]) == (5, 0x21, 0)
    cdb = bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 4, 0])
    assert sense_of(run(lu, cdb, out=bytes(4))[0]) == (5, 0x1A, 0)
    assert run(lu, bytes([0x42] + [0] * 9))[0].status == GOOD


def test_compare_and_write(lu):
    lu.backend.data[0:BS] = b"o" * BS
    cdb = bytes([0x89, 0]) + (0).to_bytes(8, "big") + bytes(3) + bytes([1, 0, 0])
    assert run(lu, cdb, out=b"o" * BS + b"n" * BS)[0].status == GOOD
    assert lu.backend.data[0:BS] == b"n" * BS
    r, _ = run(lu, cdb, out=b"n" * 3 + b"z" * (BS - 3) + b"m" * BS)
    assert sense_of(r) == (0x0E, 0x1D, 0) and struct.unpack(">I", r.sense[3:7])[0] == 3
    assert lu.backend.data[0:BS] == b"n" * BS
    cdb2 = bytes([0x89, 0]) + (0).to_bytes(8, "big") + bytes(3) + bytes([2, 0, 0])
    assert sense_of(run(lu, cdb2, out=bytes(4 * BS))[0]) == (5, 0x24, 0)
    # NUMBER OF LOGICAL BLOCKS 0 (libiscsi's "256" in the 8-bit field): no compare, no
    # write, no error (SBC-4 5.3), whatever Data-Out the initiator sent
    cdb0 = bytes([0x89, 0]) + (0).to_bytes(8, "big") + bytes(3) + bytes([0, 0, 0])
    assert run(lu, cdb0, out=b"q" * (512 * BS))[0].status == GOOD
    assert lu.backend.data[0:BS] == b"n" * BS


# -- MODE SENSE / SELECT ----------------------------------------------------------------------

def test_mode_sense_pages_and_page_control(lu):
    r, d = run(lu, [0x1A, 0, 0x3F, 0, 255, 0], in_len=255)
    assert r.status == GOOD and d[0] == len(d) - 1 and d[3] == 8
    pages = d[4 + 8:]
    codes = []
    i = 0
    while i < len(pages):
        codes.append(pages[i] & 0x3F)
        i += 2 + pages[i + 1]
    assert codes == [0x01, 0x08, 0x0A]
    r, d = run(lu, [0x1A, 0x08, 0x08, 0, 255, 0], in_len=255)        # DBD, caching
    assert d[3] == 0 and d[4] == 0x08 and d[6] & 0x04                # WCE on
    r, d = run(lu, [0x1A, 0x08, 0x48, 0, 255, 0], in_len=255)        # changeable
    assert d[6] == 0x04
    assert sense_of(run(lu, [0x1A, 0, 0xC8, 0, 255, 0], in_len=255)[0]) == (5, 0x39, 0)
    assert sense_of(run(lu, [0x1A, 0, 0x1C, 0, 255, 0], in_len=255)[0]) == (5, 0x24, 0)
    r, d = run(lu, [0x5A, 0x10, 0x3F, 0, 0, 0, 0, 1, 0, 0], in_len=256)   # LLBAA
    assert d[4] & 1 and struct.unpack(">H", d[6:8])[0] == 16


def test_mode_select_changes_only_wce(lu):
    _, d = run(lu, [0x1A, 0x08, 0x08, 0, 255, 0], in_len=255)
    page = bytearray(d[4:])
    page[2] &= ~0x04
    plist = bytes(4) + bytes(page)
    cdb = [0x15, 0x10, 0, 0, len(plist), 0]
    assert run(lu, cdb, out=plist)[0].status == GOOD and lu.write_cache is False
    page[3] = 0x55                                             # not changeable
    plist = bytes(4) + bytes(page)
    assert sense_of(run(lu, [0x15, 0x10, 0, 0, len(plist), 0], out=plist)[0]) == (5, 0x26, 0)
    assert sense_of(run(lu, [0x15, 0x11, 0, 0, len(plist), 0], out=plist)[0]) == (5, 0x24, 0)



def _caching_page(lu):
    _, d = run(lu, [0x1A, 0x08, 0x08, 0, 255, 0], in_len=255)
    return bytes(d[4:])


def test_mode_select_block_descriptor_must_restate_the_lun(lu):
    """The issue's case: MODE SELECT(6) 15 10 00 00 20 00 with a block descriptor asking for
    4096-byte blocks on a 512-byte LUN is a parameter the LUN cannot honour: 05/26/00 with the
    field pointer on LOGICAL BLOCK LENGTH (parameter list byte 4 + 5), and nothing changes."""
    page = _caching_page(lu)
    short = lambda blocks, length: blocks.to_bytes(4, "big") + b"\0" + length.to_bytes(3, "big")
    plist = bytes([0, 0, 0, 8]) + short(0, 4096) + page
    assert len(plist) == 0x20                      # the parameter list length of the CDB
    r = run(lu, [0x15, 0x10, 0, 0, len(plist), 0], out=plist)[0]
    assert sense_of(r) == (5, 0x26, 0)
    assert r.sense[15] & 0xC0 == 0x80 and int.from_bytes(r.sense[16:18], "big") == 4 + 5
    assert lu.write_cache is True
    # the capacity cannot change either (field pointer on NUMBER OF LOGICAL BLOCKS)
    r = run(lu, [0x15, 0x10, 0, 0, 12 + len(page), 0],
            out=bytes([0, 0, 0, 8]) + short(NBLOCKS * 2, BS) + page)[0]
    assert sense_of(r) == (5, 0x26, 0) and int.from_bytes(r.sense[16:18], "big") == 4
    # restating the LUN (or 0 blocks: keep the capacity) is accepted, the page applies
    off = bytearray(page)
    off[2] &= ~0x04
    for blocks in (0, NBLOCKS):
        plist = bytes([0, 0, 0, 8]) + short(blocks, BS) + bytes(off)
        assert run(lu, [0x15, 0x10, 0, 0, len(plist), 0], out=plist)[0].status == GOOD
    assert lu.write_cache is False
    # MODE SELECT(10), long LBA descriptor: the same rules; LONGLBA must match the length
    long_bd = lambda blocks, length: blocks.to_bytes(8, "big") + bytes(4) + length.to_bytes(4, "big")
    hdr = lambda longlba, bdl: bytes([0, 0, 0, 0, longlba, 0]) + bdl.to_bytes(2, "big")
    plist = hdr(1, 16) + long_bd(NBLOCKS, 4096)
    r = run(lu, [0x55, 0x10, 0, 0, 0, 0, 0, 0, len(plist), 0], out=plist)[0]
    assert sense_of(r) == (5, 0x26, 0) and int.from_bytes(r.sense[16:18], "big") == 8 + 12
    plist = hdr(1, 16) + long_bd(NBLOCKS, BS)
    assert run(lu, [0x55, 0x10, 0, 0, 0, 0, 0, 0, len(plist), 0], out=plist)[0].status == GOOD
    plist = hdr(0, 16) + long_bd(NBLOCKS, BS)
    assert sense_of(run(lu, [0x55, 0x10, 0, 0, 0, 0, 0, 0, len(plist), 0], out=plist)[0]) \
        == (5, 0x26, 0)
    # a MEDIUM TYPE other than 00h (SBC) is refused as well
    plist = bytes([0, 0x01, 0, 0]) + page
    assert sense_of(run(lu, [0x15, 0x10, 0, 0, len(plist), 0], out=plist)[0]) == (5, 0x26, 0)

# -- REPORT SUPPORTED OPERATION CODES ---------------------------------------------------------

def test_report_supported_opcodes(lu):
    r, d = run(lu, [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0], in_len=4096)
    n = struct.unpack(">I", d[:4])[0]
    descs = [d[4 + 8 * k:12 + 8 * k] for k in range(n // 8)]
    ops = {(x[0], struct.unpack(">H", x[2:4])[0] if x[5] & 1 else None) for x in descs}
    assert (0x28, None) in ops and (0x9E, 0x10) in ops and (0x89, None) in ops
    assert ops == {(o, s) for o, s, _ in lu.supported_opcodes()}
    r, d = run(lu, [0xA3, 0x0C, 1, 0x28, 0, 0, 0, 0, 1, 0, 0, 0], in_len=256)
    assert d[1] & 0x07 == 3 and struct.unpack(">H", d[2:4])[0] == 10 and d[4] == 0x28
    assert d[5] & 0x18 == 0x18                                     # DPO and FUA usable
    r, d = run(lu, [0xA3, 0x0C, 1, 0x2F, 0, 0, 0, 0, 1, 0, 0, 0], in_len=256)
    assert d[5] == 0x16                                            # VERIFY(10): DPO, BYTCHK
    r, d = run(lu, [0xA3, 0x0C, 1, 0xC5, 0, 0, 0, 0, 1, 0, 0, 0], in_len=256)
    assert d[1] & 0x07 == 1
    r, d = run(lu, [0xA3, 0x0C, 2, 0x9E, 0, 0x10, 0, 0, 1, 0, 0, 0], in_len=256)
    assert d[1] & 0x07 == 3 and d[4] == 0x9E
    assert sense_of(run(lu, [0xA3, 0x0C, 1, 0x9E, 0, 0, 0, 0, 1, 0, 0, 0], in_len=256)[0]) \
        == (5, 0x24, 0)
    r, d = run(lu, [0xA3, 0x0C, 0x81, 0x28, 0, 0, 0, 0, 1, 0, 0, 0], in_len=256)
    assert d[1] & 0x80 and len(d) == 4 + 10 + 12                       # RCTD timeouts


def test_start_stop_unit(lu):
    assert run(lu, [0x1B, 0, 0, 0, 1, 0])[0].status == GOOD


# -- fuzz -------------------------------------------------------------------------------------

VALID = [cdb10(0x28, 5, 2), cdb10(0x2A, 5, 2), cdb16(0x88, 1, 1), bytes([0x12, 1, 0x83, 0, 255, 0]),
         bytes([0x1A, 0, 0x3F, 0, 255, 0]), bytes([0xA3, 0x0C, 2, 0x9E, 0, 0x10, 0, 0, 1, 0, 0, 0]),
         bytes([0x89, 0]) + bytes(11) + bytes([1, 0, 0]), cdb16(0x93, 0, 4, 0x08),
         bytes([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), bytes([0x55, 0x10, 0, 0, 0, 0, 0, 0, 28, 0])]


@settings(max_examples=400, deadline=None)
@given(cdb=st.one_of(st.binary(min_size=0, max_size=32),
                     st.tuples(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 15),
                                                                          st.integers(0, 255)),
                                                                max_size=4))
                     .map(lambda t: bytes(_mutate(t[0], t[1])))),
       out_len=st.integers(0, 5000), in_len=st.integers(0, 5000), fill=st.integers(0, 255))
def test_any_cdb_gets_a_well_formed_response(cdb, out_len, in_len, fill):
    lu = LogicalUnit(RamBackend(nblocks=64), wwn="fuzz")
    out = [memoryview(bytearray([fill]) * out_len)] if out_len else []
    inb = [memoryview(bytearray(in_len))] if in_len else []
    r = lu.execute(cdb, out, inb)
    assert r.status in (GOOD, CHECK_CONDITION)
    assert 0 <= r.read_len <= in_len
    if r.status == CHECK_CONDITION:
        assert len(r.sense) == 18 and r.sense[0] & 0x7F == 0x70 and r.sense[7] == 10
        key = r.sense[2] & 0x0F
        assert key in (c.ILLEGAL_REQUEST, c.DATA_PROTECT, c.MISCOMPARE, c.UNIT_ATTENTION)
    else:
        assert r.sense == b""


def _mutate(cdb, edits):
    b = bytearray(cdb)
    for pos, val in edits:
        if pos < len(b):
            b[pos] = val
    return b


# -- GET LBA STATUS, PRE-FETCH (issue 17: skips turned into passes) ----------------------------

def _lba_status(lu, lba, alloc=4096):
    cdb = bytes([0x9E, 0x12]) + lba.to_bytes(8, "big") + alloc.to_bytes(4, "big") + b"\0\0"
    return run(lu, cdb, in_len=alloc)


def _descriptors(d):
    n = (struct.unpack(">I", d[:4])[0] - 4) // 16
    return [(struct.unpack(">Q", d[8 + 16 * k:16 + 16 * k])[0],
             struct.unpack(">I", d[16 + 16 * k:20 + 16 * k])[0], d[20 + 16 * k] & 0x0F)
            for k in range(n)]


def test_get_lba_status_without_provisioning_information_is_all_mapped(lu):
    r, d = _lba_status(lu, 100)
    assert r.status == GOOD and _descriptors(d) == [(100, NBLOCKS - 100, 0)]
    r, d = _lba_status(lu, NBLOCKS - 1)
    assert _descriptors(d) == [(NBLOCKS - 1, 1, 0)]
    assert sense_of(_lba_status(lu, NBLOCKS)[0]) == (5, 0x21, 0)        # LBA OUT OF RANGE
    r, d = _lba_status(lu, 0, alloc=8)                                   # header only
    assert r.status == GOOD and len(d) == 8 and struct.unpack(">I", d[:4])[0] == 20
    r, d = _lba_status(lu, 0, alloc=0)
    assert r.status == GOOD and d == b""


@pytest.mark.parametrize("ten", [True, False])
def test_pre_fetch_is_good_and_checks_its_range(lu, ten):
    def pf(lba, n, immed=0):
        if ten:
            return run(lu, bytes([0x34, immed << 1]) + lba.to_bytes(4, "big") + b"\0" +
                       n.to_bytes(2, "big") + b"\0")[0]
        return run(lu, bytes([0x90, immed << 1]) + lba.to_bytes(8, "big") +
                   n.to_bytes(4, "big") + b"\0\0")[0]
    assert pf(0, 8).status == GOOD and pf(10, 0, immed=1).status == GOOD
    assert pf(NBLOCKS - 1, 1).status == GOOD and pf(NBLOCKS - 1, 0).status == GOOD
    for lba, n in ((NBLOCKS - 1, 2), (NBLOCKS, 0), (NBLOCKS + 5, 1)):
        assert sense_of(pf(lba, n)) == (5, 0x21, 0), (lba, n)
    assert not [c_ for c_ in lu.backend.calls if c_[0] in ("read", "write")]


def test_get_lba_status_and_pre_fetch_on_a_thin_mirror(tmp_path):
    """A real volume on sparse files: the extents GET LBA STATUS reports are the image's holes
    and data (a 512-byte write maps its 4 KiB page), UNMAP deallocates again; PRE-FETCH of a
    range reads nothing through the volume."""
    from tests.unit.test_volume_helpers import make_volume
    vol, _, paths = make_volume(tmp_path, 2, size=1 << 20, region_size=64 << 10)
    ulu = LogicalUnit(vol, wwn="5f0c1b2a-7d3e-4f60-9a8b-0c1d2e3f4a5b")
    nb = (1 << 20) // BS
    r, d = _lba_status(ulu, 0)
    assert _descriptors(d) == [(0, nb, 1)]                   # never written: deallocated
    assert run(ulu, cdb10(0x2A, 100, 1), out=b"\x55" * BS)[0].status == GOOD
    assert run(ulu, cdb10(0x2A, 1000, 16), out=b"\x66" * (16 * BS))[0].status == GOOD
    r, d = _lba_status(ulu, 0)
    assert _descriptors(d) == [(0, 96, 1), (96, 8, 0), (104, 896, 1), (1000, 16, 0),
                               (1016, nb - 1016, 1)]
    r, d = _lba_status(ulu, 99)                              # starts at the LBA asked for
    assert _descriptors(d)[0] == (99, 5, 0)
    r, d = _lba_status(ulu, 0, alloc=8 + 2 * 16)             # as many as the allocation holds
    assert _descriptors(d)[:2] == [(0, 96, 1), (96, 8, 0)] and len(d) == 40
    unmap = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 1000, 16)
    assert run(ulu, [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], out=unmap)[0].status == GOOD
    r, d = _lba_status(ulu, 900)
    assert _descriptors(d) == [(900, nb - 900, 1)]
    reads = vol.stats["reads"]
    assert run(ulu, bytes([0x34, 0]) + (0).to_bytes(4, "big") + b"\0" +
               (64).to_bytes(2, "big") + b"\0")[0].status == GOOD
    assert vol.stats["reads"] == reads
    vol.close()


# -- EXTENDED COPY / RECEIVE COPY RESULTS (issue 17) -------------------------------------------

def _naa_of(lu):
    _, devid = run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)
    assert devid[5] & 0x0F == 3 and devid[7] == 16
    return devid[8:24]


def _cscd(naa, *, type_code=0xE4, code_set=1, assoc=0, dtype=3, dlen=16):
    d = bytearray(32)
    d[0], d[1] = type_code, 0x00
    d[4], d[5], d[7] = code_set, (assoc << 4) | dtype, dlen
    d[8:8 + len(naa)] = naa
    d[29:32] = BS.to_bytes(3, "big")
    return bytes(d)


def _b2b(src_i, dst_i, n, src_lba, dst_lba, type_code=0x02):
    return bytes([type_code, 0]) + (0x18).to_bytes(2, "big") + src_i.to_bytes(2, "big") + \
        dst_i.to_bytes(2, "big") + b"\0\0" + n.to_bytes(2, "big") + \
        src_lba.to_bytes(8, "big") + dst_lba.to_bytes(8, "big")


def _xcopy(lu, cscds, segs, *, list_id=1, flags=0x00, length=None):
    tdl, sdl = b"".join(cscds), b"".join(segs)
    param = bytes([list_id, flags]) + len(tdl).to_bytes(2, "big") + bytes(4) + \
        len(sdl).to_bytes(4, "big") + bytes(4) + tdl + sdl
    if length is not None:
        param = param[:length]
    cdb = bytes([0x83, 0x00]) + bytes(8) + len(param).to_bytes(4, "big") + b"\0\0"
    return run(lu, cdb, out=param)[0]


def _rcr(lu, sa, list_id=0, alloc=1024):
    return run(lu, bytes([0x84, sa, list_id]) + bytes(7) + alloc.to_bytes(4, "big") + b"\0\0",
               in_len=alloc)


def test_extended_copy_copies_within_the_lun(lu):
    naa = _naa_of(lu)
    lu.backend.data[0:64 * BS] = bytes(range(256)) * (64 * BS // 256)
    r = _xcopy(lu, [_cscd(naa)], [_b2b(0, 0, 64, 0, 1000), _b2b(0, 0, 8, 0, 2000)], list_id=7)
    assert r.status == GOOD
    assert lu.backend.data[1000 * BS:1064 * BS] == lu.backend.data[0:64 * BS]
    assert lu.backend.data[2000 * BS:2008 * BS] == lu.backend.data[0:8 * BS]
    assert lu.copier.copied_bytes == 72 * BS
    # COPY STATUS is not offered (TCMU hides the I_T nexus a held status belongs to)
    assert sense_of(_rcr(lu, 0x00, list_id=7)[0]) == (5, 0x24, 0)


def test_extended_copy_overlapping_ranges_copy_as_memmove(lu):
    naa = _naa_of(lu)
    pat = b"".join(b.to_bytes(4, "big") * (BS // 4) for b in range(3000))   # block-distinct
    lu.backend.data[0:3000 * BS] = pat
    from lvmirror.scsi import xcopy
    old, xcopy.CHUNK_BYTES = xcopy.CHUNK_BYTES, 8 * BS     # several chunks per segment
    try:
        assert _xcopy(lu, [_cscd(naa)], [_b2b(0, 0, 2000, 0, 500)]).status == GOOD
        assert lu.backend.data[500 * BS:2500 * BS] == pat[:2000 * BS]
        lu.backend.data[0:3000 * BS] = pat
        assert _xcopy(lu, [_cscd(naa)], [_b2b(0, 0, 2000, 500, 0)]).status == GOOD
        assert lu.backend.data[0:2000 * BS] == pat[500 * BS:2500 * BS]
    finally:
        xcopy.CHUNK_BYTES = old


def test_extended_copy_parameter_list_checks_in_lio_order(lu):
    naa = _naa_of(lu)
    good_t, good_s = _cscd(naa), _b2b(0, 0, 8, 0, 100)
    assert _xcopy(lu, [good_t], [good_s], length=0).status == GOOD          # empty list
    assert sense_of(_xcopy(lu, [good_t], [good_s], length=47)) == (5, 0x1A, 0)
    assert sense_of(_xcopy(lu, [good_t], [good_s], length=75)) == (5, 0x1A, 0)
    # too many CSCDs and segments and over the list length: the length wins
    assert sense_of(_xcopy(lu, [good_t] * 3, [good_s] * 34)) == (5, 0x1A, 0)
    assert sense_of(_xcopy(lu, [good_t] * 3, [good_s])) == (5, 0x26, 0x06)
    assert sense_of(_xcopy(lu, [good_t], [good_s] * 9)) == (5, 0x26, 0x08)
    assert sense_of(_xcopy(lu, [_cscd(naa, type_code=0xE0)], [good_s])) == (5, 0x26, 0x07)
    seg3 = bytes([0x03, 0]) + (0x10).to_bytes(2, "big") + bytes(16)
    assert sense_of(_xcopy(lu, [good_t], [seg3])) == (5, 0x26, 0x09)
    assert sense_of(_xcopy(lu, [good_t], [_b2b(0, 0, 8, 0, 9, type_code=0x0A)])) == \
        (5, 0x26, 0x09)
    for bad in (_cscd(naa, code_set=2), _cscd(naa, assoc=1), _cscd(naa, dtype=2),
                _cscd(naa[:8], dlen=8)):
        assert sense_of(_xcopy(lu, [bad], [good_s])) == (5, 0x26, 0)
    assert not any(k[0] == "write" for k in lu.backend.calls)


def test_extended_copy_aborts_what_it_cannot_reach(lu):
    naa = _naa_of(lu)
    other = bytes([0x60]) + bytes(15)
    aborted = (0x0A, 0x0D, 0x02)
    assert sense_of(_xcopy(lu, [_cscd(naa)], [_b2b(0, 1, 8, 0, 100)])) == aborted  # no CSCD 1
    assert sense_of(_xcopy(lu, [_cscd(naa)], [_b2b(0, 0, 2048, 0, NBLOCKS - 1)])) == aborted
    assert sense_of(_xcopy(lu, [_cscd(naa), _cscd(other)], [_b2b(0, 1, 8, 0, 0)])) == aborted
    assert not any(k[0] == "write" for k in lu.backend.calls)
    lu.backend.fail_reads = True
    assert sense_of(_xcopy(lu, [_cscd(naa)], [_b2b(0, 0, 8, 0, 100)])) == aborted


def test_extended_copy_between_luns_of_one_process_and_write_protection():
    """The resolver finds another LUN (an exported split image, say) by its NAA; a copy into a
    read-only LUN is refused as DATA PROTECT; a copy naming two other LUNs is not ours."""
    units = {}
    a = LogicalUnit(RamBackend(), wwn="aaaaaaaa-0000-0000-0000-000000000001",
                    copy_resolver=lambda naa: units.get(naa))
    b = LogicalUnit(RamBackend(), wwn="bbbbbbbb-0000-0000-0000-000000000002", read_only=True,
                    copy_resolver=lambda naa: units.get(naa))
    cc = LogicalUnit(RamBackend(), wwn="cccccccc-0000-0000-0000-000000000003")
    for u in (a, b, cc):
        units[_naa_of(u)] = u
    b.backend.data[0:16 * BS] = b"\x42" * (16 * BS)
    assert _xcopy(a, [_cscd(_naa_of(b)), _cscd(_naa_of(a))], [_b2b(0, 1, 16, 0, 50)]).status \
        == GOOD
    assert a.backend.data[50 * BS:66 * BS] == b"\x42" * (16 * BS)
    assert sense_of(_xcopy(a, [_cscd(_naa_of(a)), _cscd(_naa_of(b))],
                           [_b2b(0, 1, 16, 0, 50)])) == (7, 0x27, 0)
    assert sense_of(_xcopy(a, [_cscd(_naa_of(b)), _cscd(_naa_of(cc))],
                           [_b2b(0, 1, 16, 0, 50)])) == (0x0A, 0x0D, 0x02)


def test_receive_copy_results_operating_parameters(lu):
    r, d = _rcr(lu, 0x03)
    assert r.status == GOOD and struct.unpack(">I", d[:4])[0] == len(d) - 4 >= 40
    assert struct.unpack(">H", d[8:10])[0] == 2 and struct.unpack(">H", d[10:12])[0] == 8
    assert struct.unpack(">I", d[12:16])[0] == 1024 and d[43] == 2 and d[44:46] == b"\x02\xe4"
    assert d[37] == d[38] == d[39] == 9
    assert struct.unpack(">I", d[16:20])[0] == 0xFFFF * BS    # MAXIMUM SEGMENT LENGTH
    assert sense_of(_rcr(lu, 0x01)[0]) == (5, 0x24, 0)
    assert sense_of(run(lu, [0x12, 1, 0x8F, 0, 255, 0], in_len=255)[0]) == (5, 0x24, 0)


def test_extended_copy_takes_any_segment_length_on_4096_byte_blocks():
    """A segment of 9,000 4096-byte blocks (35 MiB, more than a 32 MiB cap this once had, which
    answered COPY TARGET DEVICE NOT REACHABLE) is copied; the reported MAXIMUM SEGMENT LENGTH
    is what the 16-bit block count can name (65,535 blocks)."""
    lu4 = LogicalUnit(RamBackend(nblocks=20000, bs=4096),
                      wwn="5f0c1b2a-7d3e-4f60-9a8b-0c1d2e3f4a5c")
    pat = b"".join(k.to_bytes(4, "big") * 1024 for k in range(9000))
    lu4.backend.data[0:len(pat)] = pat
    assert _xcopy(lu4, [_cscd(_naa_of(lu4))], [_b2b(0, 0, 9000, 0, 10000)]).status == GOOD
    assert lu4.backend.data[10000 * 4096:19000 * 4096] == pat
    r, d = _rcr(lu4, 0x03)
    assert struct.unpack(">I", d[16:20])[0] == 0xFFFF * 4096 and d[37] == 12


@pytest.mark.parametrize("wce", [True, False], ids=["write-back", "write-through"])
def test_every_command_that_writes_is_durable_before_good_without_the_write_cache(lu, wce):
    """With the write cache off (WCE 0: SBC-4 5.40, the Caching mode page) every command that
    writes or deallocates is durable before GOOD - WRITE, WRITE SAME (data and UNMAP bit),
    UNMAP, COMPARE AND WRITE, EXTENDED COPY - and with it on only the FUA bit asks for it
    (WRITE, COMPARE AND WRITE). Those whose backend call has no ``fua`` flush the backend
    first: without it a power cut could lose what GOOD acknowledged (trial 99)."""
    lu.write_cache = wce
    be = lu.backend

    def flushes(cdb, out=b""):
        f0 = be.flushes
        assert run(lu, cdb, out=out)[0].status == GOOD
        return be.flushes - f0
    assert flushes(cdb10(0x41, 10, 4), out=b"s" * BS) == (0 if wce else 1)      # WRITE SAME(10)
    assert flushes(cdb16(0x93, 20, 4), out=b"t" * BS) == (0 if wce else 1)      # (16)
    assert flushes(cdb16(0x93, 30, 4, b1=0x09)) == (0 if wce else 1)            # UNMAP, NDOB
    plist = (22).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(4) + \
        (40).to_bytes(8, "big") + (4).to_bytes(4, "big") + bytes(4)
    unmap = bytes([0x42, 0, 0, 0, 0, 0, 0]) + len(plist).to_bytes(2, "big") + b"\0"
    assert flushes(unmap, out=plist) == (0 if wce else 1)
    be.data[50 * BS:51 * BS] = bytes(BS)
    caw = bytes([0x89, 0]) + (50).to_bytes(8, "big") + bytes(3) + bytes([1, 0, 0])
    assert flushes(caw, out=bytes(BS) + b"c" * BS) == (0 if wce else 1)
    caw_fua = bytes([0x89, 0x08]) + caw[2:]
    assert flushes(caw_fua, out=b"c" * BS + b"d" * BS) == 1                      # FUA
    assert be.data[50 * BS:51 * BS] == b"d" * BS
    be.data[0:8 * BS] = b"x" * (8 * BS)
    assert _xcopy(lu, [_cscd(_naa_of(lu))], [_b2b(0, 0, 8, 0, 100)]).status == GOOD
    assert be.data[100 * BS:108 * BS] == b"x" * (8 * BS)
    f0 = be.flushes
    assert _xcopy(lu, [_cscd(_naa_of(lu))], [_b2b(0, 0, 8, 0, 200)]).status == GOOD
    assert be.flushes - f0 == (0 if wce else 1)
