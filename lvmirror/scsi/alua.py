"""Asymmetric logical unit access (ALUA, SPC-4 5.16): what the LUN says about its target ports.

LIO keeps a device's target port groups in configfs (``core/<hba>/<dev>/alua/<group>/``) and,
for a TCMU device, checks each command against its port's access state itself
(``target_alua_state_check``: a port in Standby gets NOT READY, LOGICAL UNIT NOT ACCESSIBLE,
TARGET PORT IN STANDBY STATE before the command reaches user space). What the kernel passes up
is what the handler must answer from the same groups, as tcmu-runner's ``alua.c`` does:

- standard INQUIRY: the TPGS field (byte 5, bits 5-4, SPC-4 6.6.2);
- VPD page 83h: the relative target port and target port group designators (SPC-4 7.8.6.6,
  7.8.6.7), which dm-multipath's ``alua`` prioritizer reads to find a path's group;
- REPORT TARGET PORT GROUPS (MAINTENANCE IN, service action 0Ah, SPC-4 6.36).

This module is the sans-I/O half: the groups as data (``PortGroup``, ``TargetPort``) and the
bytes built from them. ``lvmirror.tcmu.alua`` reads them from configfs.

lvmirror offers **implicit** ALUA only (TPGS 01b): the states are changed by whoever manages the
cluster (the resource agent writes ``alua_access_state``), never by an initiator's SET TARGET
PORT GROUPS, which is therefore not supported (INVALID COMMAND OPERATION CODE, as SPC-4 asks
when TPGS does not include explicit). LIO's groups default to "Implicit and Explicit"; lvmirror
still reports implicit, as tcmu-runner reports "None" as implicit.

TCMU does not tell the handler through which target port a command came (the entry has no
I_T nexus), so "the local port" is the one enabled member port of the groups (a TPG whose
``enable`` is 1: in a two-gateway cluster each gateway enables its own TPG and keeps the
other's disabled, as ceph-iscsi does). With more than one enabled port the answer could be
wrong for some path, and a LUN that reports TPGS must name its port and group in VPD 83h, so
ALUA is then not reported at all (TPGS 00b) rather than guessed; tcmu-runner takes the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lvmirror import rawtext

# asymmetric access states (SPC-4 table 157, RTPG byte 0 bits 3-0; configfs alua_access_state)
ACTIVE_OPTIMIZED = 0x0
ACTIVE_NON_OPTIMIZED = 0x1
STANDBY = 0x2
UNAVAILABLE = 0x3
LBA_DEPENDENT = 0x4
OFFLINE = 0xE
TRANSITIONING = 0xF

STATE_NAMES = {ACTIVE_OPTIMIZED: "Active/Optimized", ACTIVE_NON_OPTIMIZED: "Active/Non-optimized",
               STANDBY: "Standby", UNAVAILABLE: "Unavailable", LBA_DEPENDENT: "LBA dependent",
               OFFLINE: "Offline", TRANSITIONING: "Transitioning"}

# supported-states bits (RTPG byte 1, SPC-4 6.36.2), by the configfs file that sets each
SUPPORT_BITS = {"alua_support_transitioning": 0x80, "alua_support_offline": 0x40,
                "alua_support_lba_dependent": 0x10, "alua_support_unavailable": 0x08,
                "alua_support_standby": 0x04, "alua_support_active_nonoptimized": 0x02,
                "alua_support_active_optimized": 0x01}

# STATUS CODE (RTPG byte 5) by the configfs alua_access_status text
STATUS_CODES = {"None": 0x00, "Altered by Explicit STPG": 0x01, "Altered by Implicit ALUA": 0x02}

TPGS_IMPLICIT = 0x10          # standard INQUIRY byte 5, TPGS = 01b

PROTOCOL_ISCSI = 0x5          # PROTOCOL IDENTIFIER (SPC-4 table 362)


@dataclass(frozen=True)
class TargetPort:
    """One target port the LUN is exported through (a ``<fabric>/<wwn>/tpgt_N/lun_M`` member).

    ``rel_port_id``: RELATIVE TARGET PORT IDENTIFIER, 1-65535 (configfs
    ``statistics/scsi_port/indx``); ``proto_id``: PROTOCOL IDENTIFIER (5 for iSCSI);
    ``enabled``: the TPG serves logins on this node; ``wwn`` and ``tpgt``: the target name and
    portal group tag (for the SCSI name string designator ``<wwn>,t,0x<tpgt>``)."""
    rel_port_id: int
    proto_id: int
    enabled: bool
    wwn: str = ""
    tpgt: int = 0


@dataclass(frozen=True)
class PortGroup:
    """One target port group (a configfs ``alua/<name>`` directory).

    ``group_id``: TARGET PORT GROUP, 0-65535 (``tg_pt_gp_id``); ``state``: one of the access
    states above (``alua_access_state``); ``supported``: the supported-states bits of RTPG byte 1;
    ``status``: STATUS CODE; ``preferred``: PREF bit; ``implicit_trans_secs``: IMPLICIT
    TRANSITION TIME, seconds (0-255 reported); ``ports``: the member ports."""
    name: str
    group_id: int
    state: int
    supported: int = 0
    status: int = 0
    preferred: bool = False
    implicit_trans_secs: int = 0
    ports: tuple[TargetPort, ...] = field(default_factory=tuple)


def enabled_ports(groups) -> list[tuple[PortGroup, TargetPort]]:
    """Every (group, port) whose TPG is enabled on this node, in the groups' order."""
    return [(g, p) for g in groups for p in g.ports if p.enabled]


def tpgs(groups) -> int:
    """The standard INQUIRY byte 5 TPGS bits: implicit (0x10) when exactly one member port is
    enabled, else 0 (no ALUA reported; SPC-4 6.6.2). A LUN reporting TPGS must give the
    relative port and group designators in VPD 83h, which only one enabled port makes
    certain (the module docstring: TCMU does not say through which port a command came)."""
    return TPGS_IMPLICIT if len(enabled_ports(groups)) == 1 else 0


def port_designators(groups) -> bytes:
    """The target-port designation descriptors of VPD page 83h (SPC-4 7.8.6), possibly empty.

    With exactly one enabled port (``tpgs`` nonzero): RELATIVE TARGET PORT (type 4), TARGET
    PORT GROUP (type 5) and the port's SCSI name string (type 8, ``<wwn>,t,0x<tpgt>``), each
    with PIV set and ASSOCIATION 01b (the target port), then the target device's SCSI name
    string (``<wwn>``, ASSOCIATION 10b), as LIO's ``spc_emulate_evpd_83`` and tcmu-runner's
    ``scsi.c`` give them. Otherwise nothing (see the module docstring)."""
    local = enabled_ports(groups)
    if len(local) != 1:
        return b""
    group, port = local[0]
    proto = port.proto_id
    out = _designator(proto, 0x1, 0x4, port.rel_port_id.to_bytes(4, "big"))
    out += _designator(proto, 0x1, 0x5, (group.group_id & 0xFFFF).to_bytes(4, "big"))
    if port.wwn:
        # a target name configfs took as bytes that are not UTF-8 (surrogates: lvmirror.rawtext)
        # goes out as those bytes, as LIO's own page carries it
        name = rawtext.encode(f"{port.wwn},t,0x{port.tpgt:04x}")
        out += _designator(proto, 0x3, 0x8, _name_string(name))
        out += _designator(proto, 0x3, 0x8, _name_string(rawtext.encode(port.wwn)), assoc=2)
    return out


def _designator(proto: int, code_set: int, kind: int, body: bytes, assoc: int = 1) -> bytes:
    """One designation descriptor with PIV 1 (SPC-4 7.8.6.1); ``assoc`` 1: the target port,
    2: the target device."""
    return bytes([(proto << 4) | code_set, 0x80 | (assoc << 4) | kind, 0, len(body)]) + body


def _name_string(name: bytes) -> bytes:
    """A SCSI NAME STRING field: null-terminated, null-padded to a multiple of 4, at most 256
    bytes (SPC-4 7.8.6.11)."""
    name = name[:255] + b"\0"
    return name + b"\0" * (-len(name) % 4)


def report_target_port_groups(groups, extended: bool) -> bytes:
    """REPORT TARGET PORT GROUPS parameter data (SPC-4 6.36.2), untruncated.

    ``extended``: the CDB's PARAMETER DATA FORMAT is 001b, so the header is 8 bytes (FORMAT TYPE
    001b and the IMPLICIT TRANSITION TIME of the local group, seconds, at most 255); otherwise
    4. RETURN DATA LENGTH counts the descriptors only, as LIO's
    ``target_emulate_report_target_port_groups`` does. One 8-byte descriptor per group, then 4
    bytes per member port (RELATIVE TARGET PORT IDENTIFIER in bytes 2-3)."""
    body = b""
    for g in groups:
        head = bytes([(0x80 if g.preferred else 0) | (g.state & 0x0F), g.supported & 0xFF])
        head += (g.group_id & 0xFFFF).to_bytes(2, "big")
        head += bytes([0, g.status & 0xFF, 0, min(len(g.ports), 255)])
        body += head
        for p in g.ports[:255]:
            body += b"\0\0" + (p.rel_port_id & 0xFFFF).to_bytes(2, "big")
    header = len(body).to_bytes(4, "big")
    if extended:
        local = enabled_ports(groups)
        secs = local[0][0].implicit_trans_secs if local else 0
        header += bytes([0x10, min(max(secs, 0), 255), 0, 0])
    return header + body
