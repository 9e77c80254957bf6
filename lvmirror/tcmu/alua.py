"""Read a TCMU device's ALUA target port groups from configfs (the I/O half of scsi/alua.py).

Layout (Linux 6.1 ``target_core_configfs.c``, ``target_core_fabric_configfs.c``), under
``<configfs>/target``:

- ``core/user_<hba>/<dev>/alua/<group>/``: ``tg_pt_gp_id``, ``alua_access_state`` (a number),
  ``alua_access_status`` (text), ``preferred``, ``implicit_trans_secs``, the seven
  ``alua_support_*`` flags and ``members``, one line per port:
  ``<fabric name>/<target wwn>/tpgt_<N>/lun_<M>`` (the iSCSI fabric calls itself ``iSCSI``
  there and ``iscsi`` in configfs);
- ``<fabric>/<wwn>/tpgt_<N>/lun/lun_<M>/statistics/scsi_port/indx``: the port's RELATIVE TARGET
  PORT IDENTIFIER; ``.../statistics/scsi_transport/proto_id``: its PROTOCOL IDENTIFIER;
- ``<fabric>/<wwn>/tpgt_<N>/enable``: whether this node serves the TPG (a fabric without the
  attribute, such as loopback, is always enabled).

``default_tg_pt_gp`` is read like any other group: a LUN mapped without a group of its own is
a member of it, and LIO's own backstores report it (group 0, Active/Optimized) the same way.
tcmu-runner skips it; lvmirror reports what LIO's fileio and iblock report.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time

from lvmirror.scsi.alua import STATUS_CODES, SUPPORT_BITS, PortGroup, TargetPort, enabled_ports

log = logging.getLogger(__name__)

_MEMBER = re.compile(r"^([^/]+)/([^/]+)/tpgt_(\d+)/lun_(\d+)$")


def _text(path: str) -> str:
    """A configfs attribute's text, without the NUL bytes some attributes end with (an empty
    group's ``members`` reads as one NUL byte in Linux 6.1) and surrounding white space."""
    with open(path) as f:
        return f.read().replace("\0", "").strip()


_reported: set[str] = set()        # problems already logged (INQUIRY reads the groups each time)


def _warn_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.warning("%s", message)


def _int(path: str) -> int:
    return int(_text(path), 0)


def _member_tpg_dir(target_root: str, member: str):
    """(tpg directory, lun number) of one ``members`` line; ValueError for a malformed line."""
    m = _MEMBER.match(member.strip())
    if not m:
        raise ValueError(f"not an ALUA member line: {member!r}")
    fabric, wwn, tpgt, lun = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    fabric_dir = "iscsi" if fabric == "iSCSI" else fabric
    return os.path.join(target_root, fabric_dir, wwn, f"tpgt_{tpgt}"), lun


def read_port(target_root: str, member: str) -> TargetPort:
    """The ``TargetPort`` for one ``members`` line of an ALUA group.

    ``target_root``: ``<configfs>/target``. Raises ``ValueError`` for a line not of the form
    ``<fabric>/<wwn>/tpgt_<N>/lun_<M>`` and ``OSError`` when the port's files cannot be read
    (the LUN was unmapped meanwhile)."""
    tpg_dir, lun = _member_tpg_dir(target_root, member)
    wwn = os.path.basename(os.path.dirname(tpg_dir))
    tpgt = int(os.path.basename(tpg_dir)[len("tpgt_"):])
    stats = os.path.join(tpg_dir, "lun", f"lun_{lun}", "statistics")
    rel = _int(os.path.join(stats, "scsi_port", "indx"))
    proto = _int(os.path.join(stats, "scsi_transport", "proto_id"))
    enable = os.path.join(tpg_dir, "enable")
    enabled = _int(enable) != 0 if os.path.exists(enable) else True
    return TargetPort(rel_port_id=rel, proto_id=proto, enabled=enabled, wwn=wwn, tpgt=tpgt)


def read_group(target_root: str, group_dir: str) -> PortGroup:
    """One ``PortGroup`` from its ``alua/<name>`` directory. Raises ``OSError`` or
    ``ValueError`` when a file is missing or malformed; a member port that cannot be read is
    left out (logged once per distinct problem: INQUIRY reads the groups every time)."""
    def get(name):
        return _text(os.path.join(group_dir, name))
    supported = 0
    for fname, bit in SUPPORT_BITS.items():
        if int(get(fname)):
            supported |= bit
    ports = []
    for line in get("members").splitlines():
        if not line.strip():
            continue
        try:
            ports.append(read_port(target_root, line))
        except (OSError, ValueError) as exc:
            _warn_once(f"ALUA group {os.path.basename(group_dir)}: member {line!r} left out "
                       f"({exc})")
    return PortGroup(name=os.path.basename(group_dir), group_id=int(get("tg_pt_gp_id")),
                     state=int(get("alua_access_state")), supported=supported,
                     status=STATUS_CODES.get(get("alua_access_status"), 0),
                     preferred=bool(int(get("preferred"))),
                     implicit_trans_secs=int(get("implicit_trans_secs")), ports=tuple(ports))


def read_port_groups(device_dir: str, target_root: str) -> list[PortGroup]:
    """Every ALUA group of a TCMU device, sorted by name.

    ``device_dir``: ``<configfs>/target/core/user_<hba>/<dev>`` (``UioDevice.configfs_dir``);
    ``target_root``: ``<configfs>/target``. A device without an ``alua`` directory (ALUA off:
    ``alua_support`` 0) has no groups. Raises ``OSError``/``ValueError`` when a group cannot be
    read (``LogicalUnit`` then reports no ALUA and logs why)."""
    alua_dir = os.path.join(device_dir, "alua")
    try:
        names = sorted(os.listdir(alua_dir))
    except FileNotFoundError:
        return []
    groups = []
    for n in names:
        group_dir = os.path.join(alua_dir, n)
        if not os.path.isdir(group_dir):
            continue
        if not _text(os.path.join(group_dir, "tg_pt_gp_id")):
            # no id yet (made, its id not yet written: LIO's own RTPG skips it too)
            continue
        groups.append(read_group(target_root, group_dir))
    return groups


# How often (seconds) ``LocalStateReader`` reads every group in full; in between it reads only
# the local group's state and what would tell it that the local port moved.
FULL_READ_INTERVAL = 10.0


class LocalStateReader:
    """The access state of the ALUA group that holds a TCMU device's one enabled local port,
    read often and cheaply (lvmirrord follows it every second, per LUN: ``LunServer``).

    A full read (``read_groups()``, every group with every member port: about 15 configfs
    files a group and 4 a port) finds the local port and its group, and notes the group's
    ``members`` text and the ``enable`` of each member's TPG. Until FULL_READ_INTERVAL seconds
    later, a read takes three files or so: the group's ``alua_access_state``, its ``members``
    and those ``enable`` files; when the members or an enable changed, or a file cannot be read,
    it reads in full at once. So a change of the local group's state (a failover: the resource
    agent writes ``alua_access_state``) or of the local port's membership is seen at the next
    read; another port of this LUN enabled or mapped elsewhere (after which no single local
    port is known, and the state is None) is seen within FULL_READ_INTERVAL seconds. (In the
    kernel lab under emulation, 2026-12-03, the full read every second was most of an idle
    LUN's CPU: 45 of 139 clock ticks in 20 s.)

    ``device_dir``: ``UioDevice.configfs_dir``; ``target_root``: ``<configfs>/target``;
    ``read_groups() -> list[PortGroup]``: the full read (``UioDevice.port_groups``), raising
    OSError or ValueError. Thread-safe (the watchdog follows, a worker asks while answering a
    command through a Standby port)."""

    def __init__(self, device_dir: str, target_root: str, read_groups, *,
                 full_interval: float = FULL_READ_INTERVAL, clock=time.monotonic):
        self.device_dir = device_dir
        self.target_root = target_root
        self.read_groups = read_groups
        self.full_interval = full_interval
        self.clock = clock
        self.full_reads = 0          # how many full reads were made (for tests and figures)
        self._mu = threading.Lock()
        self._cached = None          # (state path, signature) or None: read in full next
        self._next_full = 0.0

    def _signature(self, group_dir: str):
        """What the local group's membership depends on: its ``members`` text and, for each
        member line, its TPG's (wwn, tpgt) and ``enable`` text (None where the fabric has no
        such attribute, loopback: always enabled)."""
        members = _text(os.path.join(group_dir, "members"))
        tpgs = []
        for line in members.splitlines():
            if line.strip():
                tpg_dir = _member_tpg_dir(self.target_root, line)[0]
                try:
                    enable = _text(os.path.join(tpg_dir, "enable"))
                except FileNotFoundError:
                    enable = None
                tpgs.append((os.path.basename(os.path.dirname(tpg_dir)),
                             int(os.path.basename(tpg_dir)[len("tpgt_"):]), enable))
        return members, tuple(tpgs)

    def _full(self) -> int | None:
        """Read every group (``read_groups``); cache the local group for the cheap reads when
        its membership, read just after, still has the local port as its one enabled member
        (it did not change under the read)."""
        self.full_reads += 1
        self._cached = None
        self._next_full = self.clock() + self.full_interval
        local = enabled_ports(self.read_groups())
        if len(local) != 1:
            return None
        group, port = local[0]
        group_dir = os.path.join(self.device_dir, "alua", group.name)
        try:
            signature = self._signature(group_dir)
        except (OSError, ValueError):
            # no such files (groups given by a reader of no configfs) or a member changing
            # under the read: read in full next time too
            return group.state
        enabled = [(wwn, tpgt) for wwn, tpgt, enable in signature[1] if enable != "0"]
        if enabled == [(port.wwn, port.tpgt)]:
            self._cached = (os.path.join(group_dir, "alua_access_state"), signature)
        return group.state

    def state(self) -> int | None:
        """The access state (``scsi.alua`` number) of the local port's group, or None: no
        ALUA groups, or not exactly one enabled port. OSError or ValueError when configfs
        cannot be read."""
        with self._mu:
            cached = self._cached
            if cached is None or self.clock() >= self._next_full:
                return self._full()
            path, signature = cached
            try:
                state = int(_text(path), 0)
                same = self._signature(os.path.dirname(path)) == signature
            except (OSError, ValueError):
                same = False
            return state if same else self._full()
