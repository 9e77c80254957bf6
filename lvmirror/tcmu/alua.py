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

from lvmirror import rawtext
from lvmirror.scsi.alua import STATUS_CODES, SUPPORT_BITS, PortGroup, TargetPort

log = logging.getLogger(__name__)

_MEMBER = re.compile(r"^([^/]+)/([^/]+)/tpgt_(\d+)/lun_(\d+)$")


def _text(path: str) -> str:
    """A configfs attribute's text, without the NUL bytes some attributes end with (an empty
    group's ``members`` reads as one NUL byte in Linux 6.1) and surrounding white space; bytes
    that are not UTF-8 (configfs names are any bytes) as ``rawtext.decode`` makes them."""
    with open(path, "rb") as f:
        return rawtext.decode(f.read()).replace("\0", "").strip()


_reported: set[str] = set()        # problems already logged (INQUIRY reads the groups each time)


def _warn_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        log.warning("%s", message)


def _int(path: str) -> int:
    return int(_text(path), 0)


def read_port(target_root: str, member: str) -> TargetPort:
    """The ``TargetPort`` for one ``members`` line of an ALUA group.

    ``target_root``: ``<configfs>/target``. Raises ``ValueError`` for a line not of the form
    ``<fabric>/<wwn>/tpgt_<N>/lun_<M>`` and ``OSError`` when the port's files cannot be read
    (the LUN was unmapped meanwhile). A target name with bytes that are not UTF-8 is kept with
    surrogates for them (``rawtext``): it is still a port, and counting it matters (ALUA is
    reported only with exactly one enabled port)."""
    m = _MEMBER.match(member.strip())
    if not m:
        raise ValueError(f"not an ALUA member line: {member!r}")
    fabric, wwn, tpgt, lun = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    fabric_dir = "iscsi" if fabric == "iSCSI" else fabric
    tpg_dir = os.path.join(target_root, fabric_dir, wwn, f"tpgt_{tpgt}")
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


def _port_enabled(target_root: str, member: str) -> bool | None:
    """Whether the port of one ``members`` line is enabled on this node (``read_port``'s
    ``enabled``), reading only what that needs: None when ``read_port`` would leave it out (a
    malformed line, a LUN directory that is gone). Raises OSError when ``enable`` cannot be
    read."""
    m = _MEMBER.match(member.strip())
    if not m:
        return None
    fabric, wwn, tpgt, lun = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    tpg_dir = os.path.join(target_root, "iscsi" if fabric == "iSCSI" else fabric, wwn,
                           f"tpgt_{tpgt}")
    if not os.path.isdir(os.path.join(tpg_dir, "lun", f"lun_{lun}")):
        return None
    enable = os.path.join(tpg_dir, "enable")
    return _int(enable) != 0 if os.path.exists(enable) else True


def read_local_state(device_dir: str, target_root: str) -> int | None:
    """The access state of the ALUA group holding this node's one enabled port, or None (no
    groups, or not exactly one enabled port): what ``scsi.alua.enabled_ports`` of
    ``read_port_groups`` gives, read with about a fifth of the configfs reads - per group its
    id and ``members``, per member its TPG's ``enable``, and the one group's
    ``alua_access_state`` (not the support flags, status and ports' identifiers, which only
    INQUIRY and REPORT TARGET PORT GROUPS need). lvmirrord follows the state every second per
    LUN, and under the lab's emulation each configfs read costs about a millisecond of CPU.
    Raises OSError or ValueError as ``read_port_groups`` does."""
    alua_dir = os.path.join(device_dir, "alua")
    try:
        names = sorted(os.listdir(alua_dir))
    except FileNotFoundError:
        return None
    local = []
    for n in names:
        group_dir = os.path.join(alua_dir, n)
        if not os.path.isdir(group_dir) or not _text(os.path.join(group_dir, "tg_pt_gp_id")):
            continue
        for line in _text(os.path.join(group_dir, "members")).splitlines():
            if line.strip() and _port_enabled(target_root, line):
                local.append(group_dir)
                if len(local) > 1:
                    return None
    return _int(os.path.join(local[0], "alua_access_state")) if local else None

