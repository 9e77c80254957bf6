"""lab/failover's initiator, on the host: a verified write load over libiscsi that follows a LUN
from gateway to gateway, as an initiator with one path per gateway does.

libiscsi (Debian's libiscsi7, the library behind iscsi-inq and iscsi-test-cu) is reached through
ctypes: ``iscsi_full_connect_sync`` logs in to a portal, ``iscsi_write16_sync`` writes with FUA
(so an acknowledged write is durable on the target: SBC-4 5.46), ``iscsi_read16_sync`` reads back.
The ``scsi_task`` layout is libiscsi 1.19's ``<iscsi/scsi-lowlevel.h>``.

Usage::

    failover_io.py write --portals 127.0.0.1:P1,127.0.0.1:P2 --iqn IQN --out DIR [--slots N]

writes 4 KiB self-describing blocks (magic, slot, sequence number, CRC-32) to random slots of
the LUN until ``DIR/stop`` appears, then reads every slot back through the portal that served last
and checks it. A write that fails (transport error, CHECK CONDITION, timeout) is retried, the
same block, on the next portal that logs in and takes it, as dm-multipath retries on another
path; nothing is acknowledged before the target's GOOD status. Writes DIR/acked.log (one line per
acknowledged write: slot, sequence, monotonic and wall-clock time of the ack, portal),
DIR/events.jsonl (path failures and switches) and DIR/summary.json (writes acknowledged,
per portal, failures, outages with their length in seconds, slots checked, lost writes).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import struct
import sys
import time
import zlib

BLOCK = 4096
LBS = 512
MAGIC = b"LVMFAIL1"
HEADER = struct.Struct("<8sIQdI")     # magic, slot, seq, wall time, crc of the rest of the block


class _Sense(ctypes.Structure):
    # three 1-bit fields, then unsigned char bit_pointer: GCC (x86-64 System V) puts
    # bit_pointer in the byte after the bit-fields' byte, not after a whole unsigned int, so
    # the bit-fields are one byte here (16 bytes in all; ctypes' own bit-fields would take 4)
    _fields_ = [("error_type", ctypes.c_ubyte), ("key", ctypes.c_int), ("ascq", ctypes.c_int),
                ("bits", ctypes.c_ubyte), ("bit_pointer", ctypes.c_ubyte),
                ("field_pointer", ctypes.c_uint16)]


class _Data(ctypes.Structure):
    _fields_ = [("size", ctypes.c_int), ("data", ctypes.POINTER(ctypes.c_ubyte))]


class _Task(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int), ("cdb_size", ctypes.c_int), ("xfer_dir", ctypes.c_int),
                ("expxferlen", ctypes.c_int), ("cdb", ctypes.c_ubyte * 16),
                ("residual_status", ctypes.c_int), ("residual", ctypes.c_size_t),
                ("sense", _Sense), ("datain", _Data)]


_lib = None


def lib():
    """libiscsi.so.7 with the prototypes used here (OSError if it is not installed)."""
    global _lib
    if _lib is None:
        L = ctypes.CDLL("libiscsi.so.7")
        vp, ci, u64, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32
        task = ctypes.POINTER(_Task)
        for name, res, args in [
                ("iscsi_create_context", vp, [ctypes.c_char_p]),
                ("iscsi_destroy_context", ci, [vp]),
                ("iscsi_set_targetname", ci, [vp, ctypes.c_char_p]),
                ("iscsi_set_session_type", ci, [vp, ci]),
                ("iscsi_set_header_digest", ci, [vp, ci]),
                ("iscsi_set_timeout", ci, [vp, ci]),
                ("iscsi_set_noautoreconnect", None, [vp, ci]),
                ("iscsi_full_connect_sync", ci, [vp, ctypes.c_char_p, ci]),
                ("iscsi_get_error", ctypes.c_char_p, [vp]),
                ("iscsi_write16_sync", task, [vp, ci, u64, ctypes.c_char_p, u32, ci, ci, ci, ci,
                                              ci, ci]),
                ("iscsi_read16_sync", task, [vp, ci, u64, u32, ci, ci, ci, ci, ci, ci]),
                ("iscsi_inquiry_sync", task, [vp, ci, ci, ci, ci]),
                ("scsi_free_scsi_task", None, [task])]:
            f = getattr(L, name)
            f.restype, f.argtypes = res, args
        _lib = L
    return _lib


class IOFailed(Exception):
    """A command that did not complete with GOOD status (the text says why)."""


class Session:
    """One iSCSI session to LUN ``lun`` of ``iqn`` through ``portal`` ("host:port"), commands
    bounded by ``timeout`` seconds. Raises IOFailed when the login fails."""

    def __init__(self, portal: str, iqn: str, lun: int = 0, timeout: int = 10):
        L = lib()
        self.portal, self.lun = portal, lun
        self.ctx = L.iscsi_create_context(b"iqn.2026-11.org.lvmirror:failover-host")
        L.iscsi_set_targetname(self.ctx, iqn.encode())
        L.iscsi_set_session_type(self.ctx, 2)          # ISCSI_SESSION_NORMAL
        L.iscsi_set_header_digest(self.ctx, 0)         # ISCSI_HEADER_DIGEST_NONE
        L.iscsi_set_noautoreconnect(self.ctx, 1)       # a failure goes to the caller
        L.iscsi_set_timeout(self.ctx, timeout)
        if L.iscsi_full_connect_sync(self.ctx, portal.encode(), lun) != 0:
            err = L.iscsi_get_error(self.ctx).decode(errors="replace")
            self.close()
            raise IOFailed(f"login to {portal}: {err}")

    def _done(self, task, what):
        L = lib()
        if not task:
            raise IOFailed(f"{what} via {self.portal}: "
                           f"{L.iscsi_get_error(self.ctx).decode(errors='replace')}")
        t = task.contents
        try:
            if t.status != 0:
                raise IOFailed(f"{what} via {self.portal}: status 0x{t.status:x} sense key "
                               f"0x{t.sense.key:x} asc/ascq 0x{t.sense.ascq:04x}")
            return ctypes.string_at(t.datain.data, t.datain.size) if t.datain.size else b""
        finally:
            L.scsi_free_scsi_task(task)

    def serial(self) -> str:
        """The LUN's unit serial number (INQUIRY VPD page 80h, SPC-4 7.8.17): the same disk
        through either gateway (the agent derives it from the backstore's name). LIO answers
        for an unmapped LUN 0 from its read-only virtual LUN 0, which has another."""
        data = self._done(lib().iscsi_inquiry_sync(self.ctx, self.lun, 1, 0x80, 255),
                          "inquiry vpd 0x80")
        if len(data) < 4 or data[1] != 0x80:
            raise IOFailed(f"inquiry vpd 0x80 via {self.portal}: no unit serial page")
        return data[4:4 + data[3]].decode(errors="replace").strip()

    def write(self, lba: int, data: bytes) -> None:
        """WRITE(16) with FUA of ``data`` (whole 512-byte blocks) at ``lba``."""
        self._done(lib().iscsi_write16_sync(self.ctx, self.lun, lba, data, len(data), LBS,
                                            0, 0, 1, 0, 0), f"write lba {lba}")

    def read(self, lba: int, nbytes: int) -> bytes:
        """READ(16) of ``nbytes`` at ``lba``."""
        data = self._done(lib().iscsi_read16_sync(self.ctx, self.lun, lba, nbytes, LBS,
                                                  0, 0, 0, 0, 0), f"read lba {lba}")
        if len(data) != nbytes:
            raise IOFailed(f"read lba {lba}: {len(data)} bytes, expected {nbytes}")
        return data

    def close(self):
        if self.ctx:
            lib().iscsi_destroy_context(self.ctx)
            self.ctx = None


def block(slot: int, seq: int) -> bytes:
    """The 4 KiB block of write ``seq`` to ``slot``: header, then a pattern of both."""
    body = (struct.pack("<IQ", slot, seq) * (BLOCK // 12 + 1))[:BLOCK - HEADER.size]
    now = time.time()
    crc = zlib.crc32(struct.pack("<IQd", slot, seq, now) + body)
    return HEADER.pack(MAGIC, slot, seq, now, crc) + body


def parse(data: bytes):
    """(slot, seq) of a block ``block`` wrote, None for zeroes; ValueError if torn or foreign."""
    if data == bytes(len(data)):
        return None
    magic, slot, seq, now, crc = HEADER.unpack_from(data)
    if magic != MAGIC or zlib.crc32(struct.pack("<IQd", slot, seq, now) +
                                    data[HEADER.size:]) != crc:
        raise ValueError("not a whole block of this writer (torn or foreign)")
    return slot, seq


class Writer:
    """The write load and its check (see the module docstring)."""

    def __init__(self, portals, iqn, out, slots, seed, serial=None):
        self.portals, self.iqn, self.out, self.slots = portals, iqn, out, slots
        self.rng = random.Random(seed)
        self.session = None
        self.serial = serial            # the LUN's unit serial (None: learnt at the first login)
        self.current = 0
        self.acked = {}                 # slot -> last acknowledged seq
        self.per_portal = {p: 0 for p in portals}
        self.failures = 0
        self.outages = []               # {"from", "to", "seconds", "after": portal, "errors"}
        self.events = open(os.path.join(out, "events.jsonl"), "a")
        self.log = open(os.path.join(out, "acked.log"), "a")

    def event(self, **kw):
        kw.update(t=round(time.monotonic(), 3), wall=round(time.time(), 3))
        self.events.write(json.dumps(kw) + "\n")
        self.events.flush()

    def connect(self):
        """A session through the first portal (from the current one on) that logs in and
        shows the LUN with the serial number of the first login, as dm-multipath groups paths
        by their WWID (a gateway that does not serve the LUN shows LIO's virtual LUN 0)."""
        while True:
            for k in range(len(self.portals)):
                i = (self.current + k) % len(self.portals)
                try:
                    session = Session(self.portals[i], self.iqn)
                except IOFailed as exc:
                    self.event(ev="login_failed", portal=self.portals[i], error=str(exc))
                    continue
                try:
                    serial = session.serial()
                except IOFailed as exc:
                    serial, why = None, str(exc)
                else:
                    why = f"unit serial {serial!r}, the LUN's is {self.serial!r}"
                if serial and self.serial is None:
                    self.serial = serial
                if serial and serial == self.serial:
                    self.session, self.current = session, i
                    self.event(ev="login", portal=self.portals[i], serial=serial)
                    return
                session.close()
                self.event(ev="path_down", portal=self.portals[i], error=why)
            time.sleep(0.5)

    def drop(self):
        if self.session is not None:
            self.session.close()
            self.session = None

    def put(self, slot, seq):
        """Write ``seq`` to ``slot`` until the target acknowledges it, through whichever portal
        takes it; an outage (first failure to the ack) is recorded."""
        data = block(slot, seq)
        first_fail, errors = None, 0
        while True:
            if self.session is None:
                self.connect()
            try:
                self.session.write(slot * (BLOCK // LBS), data)
                break
            except IOFailed as exc:
                self.failures += 1
                errors += 1
                if first_fail is None:
                    first_fail = (time.monotonic(), time.time(), self.session.portal)
                self.event(ev="io_failed", portal=self.session.portal, error=str(exc))
                self.drop()
                self.current = (self.current + 1) % len(self.portals)
                time.sleep(0.2)
        now, wall = time.monotonic(), time.time()
        portal = self.session.portal
        self.acked[slot] = seq
        self.per_portal[portal] += 1
        self.log.write(f"{slot} {seq} {now:.3f} {wall:.3f} {portal}\n")
        self.log.flush()
        if first_fail is not None:
            out = {"first_failure_wall": round(first_fail[1], 3), "resumed_wall": round(wall, 3),
                   "seconds": round(now - first_fail[0], 1), "failed_on": first_fail[2],
                   "resumed_on": portal, "errors": errors}
            self.outages.append(out)
            self.event(ev="resumed", **out)

    def run(self):
        stop = os.path.join(self.out, "stop")
        seq = 0
        self.event(ev="start", portals=self.portals)
        while not os.path.exists(stop):
            seq += 1
            self.put(self.rng.randrange(self.slots), seq)
        self.event(ev="stop", writes=seq)
        return self.check()

    def check(self):
        """Read every slot back (through a session that works) and compare with the last
        acknowledged write to it: lost = older or missing; torn or foreign blocks counted too."""
        lost, torn, checked, extra = [], [], 0, 0
        for slot in range(self.slots):
            while True:
                if self.session is None:
                    self.connect()
                try:
                    data = self.session.read(slot * (BLOCK // LBS), BLOCK)
                    break
                except IOFailed as exc:
                    self.event(ev="io_failed", portal=self.session.portal, error=str(exc))
                    self.drop()
                    time.sleep(0.5)
            want = self.acked.get(slot)
            try:
                got = parse(data)
            except ValueError:
                torn.append(slot)
                continue
            if want is None:
                extra += got is not None
                continue
            checked += 1
            if got is None or got[0] != slot or got[1] < want:
                lost.append({"slot": slot, "acked_seq": want, "found": got})
        summary = {"unit_serial": self.serial, "writes_acked": sum(self.per_portal.values()), "per_portal": self.per_portal,
                   "failed_attempts": self.failures, "outages": self.outages,
                   "slots_checked": checked, "lost": len(lost), "lost_detail": lost[:20],
                   "torn": len(torn), "unacked_slots_written": extra,
                   "read_back_via": self.session.portal if self.session else None}
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["write"])
    ap.add_argument("--portals", required=True, help="host:port,host:port (one per gateway)")
    ap.add_argument("--iqn", required=True)
    ap.add_argument("--out", required=True, help="directory for the logs and summary.json")
    ap.add_argument("--slots", type=int, default=2048, help="4 KiB slots written (default 2048)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--serial", help="the LUN's unit serial (default: the first login's)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summary = Writer(args.portals.split(","), args.iqn, args.out, args.slots, args.seed,
                     args.serial).run()
    print(json.dumps(summary))
    return 0 if summary["lost"] == 0 and summary["torn"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
