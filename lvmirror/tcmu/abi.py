"""The TCMU kernel ABI (Linux 6.1 ``include/uapi/linux/target_core_user.h``), declared once as data.

Every layout the daemon, the ring emulator and the netlink code touch is a ``Layout``: a table of
(field, offset, struct format) rows checked at import against the sizes the real header gives
(a compile test against Debian's 6.1 header printed them; see docs/architecture.rst). Offsets are
from the start of the structure; all integers are native little-endian (x86-64, arm64).
"""

from __future__ import annotations

import enum
import struct

# -- constants --------------------------------------------------------------------------------

TCMU_VERSION = "2.0"
MAILBOX_VERSION = 2
ALIGN_SIZE = 64

CAP_OOOC = 1 << 0         # out-of-order completion
CAP_READ_LEN = 1 << 1     # rsp.read_len honoured
CAP_TMR = 1 << 2          # TMR entries queued when attrib/tmr_notification = 1
CAP_KEEP_BUF = 1 << 3

OP_PAD = 0
OP_CMD = 1
OP_TMR = 2
OP_MASK = 0x7

UFLAG_UNKNOWN_OP = 0x1
UFLAG_READ_LEN = 0x2
UFLAG_KEEP_BUF = 0x4

SENSE_BUFFERSIZE = 96
OP_ALIGN_SIZE = 8
CONFIG_LEN = 256          # TCMU_CONFIG_LEN: dev_config, "<subtype>/<cfgstring>"


class TmrType(enum.IntEnum):
    """``enum tcmu_tmr_type`` (target_core_user.h): the task management function in a TMR
    entry's ``tmr_type``."""
    UNKNOWN = 0
    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LUN_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    LUN_RESET_PRO = 128


# -- generic netlink family "TCM-USER" ---------------------------------------------------------

GENL_FAMILY = "TCM-USER"
GENL_MCGRP_CONFIG = "config"
GENL_VERSION = 2


class GenlCommand(enum.IntEnum):
    """``enum tcmu_genl_cmd`` (target_core_user.h): the kernel's device events, the ``*_DONE``
    replies to them, and SET_FEATURES (a handler asks for reply mode)."""
    UNSPEC = 0
    ADDED_DEVICE = 1
    REMOVED_DEVICE = 2
    RECONFIG_DEVICE = 3
    ADDED_DEVICE_DONE = 4
    REMOVED_DEVICE_DONE = 5
    RECONFIG_DEVICE_DONE = 6
    SET_FEATURES = 7


class GenlAttr(enum.IntEnum):
    """``enum tcmu_genl_attr`` (target_core_user.h): the attribute types of TCM-USER messages
    (payload types in the comments)."""
    UNSPEC = 0
    DEVICE = 1              # string, "tcm-user/<hba>/<name>/<dev_config>"
    MINOR = 2               # u32, the uio minor
    PAD = 3
    DEV_CFG = 4             # string, new dev_config (reconfig)
    DEV_SIZE = 5            # u64, new size (reconfig)
    WRITECACHE = 6          # u8, new emulate_write_cache (reconfig)
    CMD_STATUS = 7          # s32, our answer in *_DONE
    DEVICE_ID = 8           # u32, the kernel's device id
    SUPP_KERN_CMD_REPLY = 9  # u8, SET_FEATURES


# -- layouts ----------------------------------------------------------------------------------

class Field:
    """One field: ``name`` at ``offset`` with struct format ``fmt`` (little-endian)."""

    __slots__ = ("name", "offset", "fmt", "size", "_st")

    def __init__(self, name: str, offset: int, fmt: str):
        self.name = name
        self.offset = offset
        self.fmt = fmt
        self._st = struct.Struct("<" + fmt)
        self.size = self._st.size

    def get(self, buf, base: int = 0):
        """The field's value in the struct at byte offset ``base`` of ``buf`` (int, or bytes for an
        ``Ns`` field); struct.error if ``buf`` is too short."""
        return self._st.unpack_from(buf, base + self.offset)[0]

    def put(self, buf, base: int, value) -> None:
        """Store ``value`` in the struct at byte offset ``base`` of ``buf``; struct.error if it does
        not fit or is out of range. Not one atomic store: ring cursors another process reads are
        published through a ctypes word instead."""
        self._st.pack_into(buf, base + self.offset, value)


class Layout:
    """A C struct as a table of fields, with its ``sizeof``."""

    def __init__(self, name: str, size: int, fields: list[tuple[str, int, str]]):
        self.name = name
        self.size = size
        self.fields = {n: Field(n, off, fmt) for n, off, fmt in fields}
        for f in self.fields.values():
            if f.offset + f.size > size:
                raise AssertionError(f"{name}.{f.name} runs past sizeof {size}")
            setattr(self, f.name, f)          # MAILBOX.cmd_head, ENTRY.cdb_off, ...
        if all(f.offset == sum(g.size for g in list(self.fields.values())[:i])
               for i, f in enumerate(self.fields.values())):
            self._packed = struct.Struct("<" + "".join(f.fmt for f in self.fields.values()))
        else:
            self._packed = None

    def reader(self, *names: str) -> struct.Struct:
        """One Struct that reads the fields ``names`` (in offset order, the bytes between them
        skipped as padding) with a single ``unpack_from`` at the struct's start: the hot path
        (a command entry per SCSI command) reads its header in one call instead of one per
        field. ValueError when the fields overlap or are not in offset order."""
        fmt, at = "<", 0
        for n in names:
            f = self.fields[n]
            if f.offset < at:
                raise ValueError(f"{self.name}.{n} overlaps or precedes the field before it")
            fmt += (f"{f.offset - at}x" if f.offset > at else "") + f.fmt
            at = f.offset + f.size
        return struct.Struct(fmt)

    def span(self, *names: str) -> tuple[int, struct.Struct]:
        """``(offset, Struct)`` for the adjacent fields ``names`` (in offset order, no byte
        between them): one ``pack_into(buf, base + offset, ...)`` stores them all and touches
        no other byte (a Struct with padding would write zeros there). ValueError when the
        fields are not adjacent."""
        first = self.fields[names[0]]
        fmt, at = "<", first.offset
        for n in names:
            f = self.fields[n]
            if f.offset != at:
                raise ValueError(f"{self.name}.{n} does not follow the field before it")
            fmt += f.fmt
            at = f.offset + f.size
        return first.offset, struct.Struct(fmt)

    @property
    def struct(self) -> struct.Struct:
        """One instance as a Struct (``iter_unpack`` reads an array of them)."""
        if self._packed is None or self._packed.size != self.size:
            raise TypeError(f"{self.name} has padding; it cannot be read as one Struct")
        return self._packed

    def array(self, count: int) -> struct.Struct:
        """A Struct for ``count`` consecutive instances (use ``iter_unpack`` / ``pack_into``);
        only for layouts whose fields are contiguous, as ``struct iovec``."""
        if self._packed is None or self._packed.size != self.size:
            raise TypeError(f"{self.name} has padding; it cannot be read as an array")
        return struct.Struct("<" + self._packed.format[1:] * count)


# struct tcmu_mailbox: cmd_tail is __aligned__(ALIGN_SIZE) so it sits in its own cache line.
MAILBOX = Layout("tcmu_mailbox", 128, [
    ("version", 0, "H"),
    ("flags", 2, "H"),
    ("cmdr_off", 4, "I"),
    ("cmdr_size", 8, "I"),
    ("cmd_head", 12, "I"),
    ("cmd_tail", 64, "I"),
])

# struct tcmu_cmd_entry_hdr
ENTRY_HDR = Layout("tcmu_cmd_entry_hdr", 8, [
    ("len_op", 0, "I"),
    ("cmd_id", 4, "H"),
    ("kflags", 6, "B"),
    ("uflags", 7, "B"),
])

# struct tcmu_cmd_entry: hdr, then the union of req (kernel -> user) and rsp (user -> kernel).
ENTRY = Layout("tcmu_cmd_entry", 112, [
    ("len_op", 0, "I"),
    ("cmd_id", 4, "H"),
    ("kflags", 6, "B"),
    ("uflags", 7, "B"),
    # req
    ("iov_cnt", 8, "I"),
    ("iov_bidi_cnt", 12, "I"),
    ("iov_dif_cnt", 16, "I"),
    ("cdb_off", 24, "Q"),
    ("req_pad1", 32, "Q"),
    ("req_pad2", 40, "Q"),
    # rsp (overlays req)
    ("scsi_status", 8, "B"),
    ("read_len", 12, "I"),
    ("sense_buffer", 16, f"{SENSE_BUFFERSIZE}s"),
])
ENTRY_IOV_OFFSET = 48          # offsetof(struct tcmu_cmd_entry, req.iov)

# what the ring thread reads of every command entry, in one unpack_from (Layout.reader)
ENTRY_REQ = ENTRY.reader("len_op", "cmd_id", "iov_cnt", "iov_bidi_cnt", "iov_dif_cnt",
                         "cdb_off")

# what the ring thread stores when it completes a command: uflags and rsp.scsi_status are adjacent
ENTRY_RSP_OFFSET, ENTRY_RSP = ENTRY.span("uflags", "scsi_status")

# struct iovec as the kernel writes it into the entry: iov_base is an OFFSET from the map start.
IOVEC = Layout("iovec", 16, [
    ("iov_base", 0, "Q"),
    ("iov_len", 8, "Q"),
])

# struct tcmu_tmr_entry
TMR_ENTRY = Layout("tcmu_tmr_entry", 32, [
    ("len_op", 0, "I"),
    ("cmd_id", 4, "H"),
    ("kflags", 6, "B"),
    ("uflags", 7, "B"),
    ("tmr_type", 8, "B"),
    ("cmd_cnt", 12, "I"),
])
TMR_CMD_IDS_OFFSET = 32        # offsetof(struct tcmu_tmr_entry, cmd_ids): u16[cmd_cnt]

# The offsets the 6.1 header has (compile test); a typo above fails the import, not a LUN.
_EXPECTED = {
    ("tcmu_mailbox", "cmd_head"): 12, ("tcmu_mailbox", "cmd_tail"): 64,
    ("tcmu_cmd_entry", "cdb_off"): 24, ("tcmu_cmd_entry", "scsi_status"): 8,
    ("tcmu_cmd_entry", "read_len"): 12, ("tcmu_cmd_entry", "sense_buffer"): 16,
    ("tcmu_tmr_entry", "cmd_cnt"): 12,
}
for (_s, _f), _off in _EXPECTED.items():
    _lay = {"tcmu_mailbox": MAILBOX, "tcmu_cmd_entry": ENTRY, "tcmu_tmr_entry": TMR_ENTRY}[_s]
    assert _lay.fields[_f].offset == _off, (_s, _f)
assert ENTRY.sense_buffer.offset + SENSE_BUFFERSIZE == ENTRY.size
assert MAILBOX.size == 128 and ENTRY_HDR.size == 8 and IOVEC.size == 16


def entry_op(len_op: int) -> int:
    """``tcmu_hdr_get_op``: the opcode (OP_PAD, OP_CMD, OP_TMR) in an entry header's ``len_op``."""
    return len_op & OP_MASK


def entry_len(len_op: int) -> int:
    """``tcmu_hdr_get_len``: the entry's length in bytes (a multiple of OP_ALIGN_SIZE) in
    ``len_op``."""
    return len_op & ~OP_MASK


def cmd_entry_base_size(iov_cnt: int) -> int:
    """max(offsetof(struct tcmu_cmd_entry, req.iov[iov_cnt]), sizeof(struct tcmu_cmd_entry))."""
    return max(ENTRY_IOV_OFFSET + IOVEC.size * iov_cnt, ENTRY.size)


def round_up(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align`` (the kernel's ``round_up``; entry lengths are
    rounded to OP_ALIGN_SIZE)."""
    return (n + align - 1) // align * align
