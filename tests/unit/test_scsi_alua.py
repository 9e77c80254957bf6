"""ALUA (SPC-4 5.16): TPGS in INQUIRY, the target port designators of VPD 83h and REPORT TARGET
PORT GROUPS, built from the groups the kernel keeps in configfs, and the configfs reader itself
on a tree laid out as Linux 6.1 lays it out. The kernel lab checks the same with sg3-utils
against LIO."""

import builtins
import os
import shutil

import pytest

from lvmirror.scsi import GOOD, LogicalUnit
from lvmirror.scsi import alua
from lvmirror.tcmu import alua as tcmu_alua
from lvmirror.tcmu.alua import read_port_groups
from lvmirror.tcmu.uio import UioDevice
from tests.unit.test_scsi_core import RamBackend, run, sense_of

WWN = "5f0c1b2a-7d3e-4f60-9a8b-0c1d2e3f4a5b"
IQN = "iqn.2003-01.org.linux-iscsi.lab:lvmirror"


def two_gateways(local_enabled=True, remote_enabled=False):
    """Gateway A's view in a two-gateway cluster: its own TPG 1 in group "ao" (enabled), the
    other gateway's TPG 2 in group "standby" (disabled here), as ceph-iscsi lays them out."""
    ao = alua.PortGroup("ao", 1, alua.ACTIVE_OPTIMIZED, supported=0x07, status=0x02,
                        preferred=True, implicit_trans_secs=30,
                        ports=(alua.TargetPort(1, alua.PROTOCOL_ISCSI, local_enabled, IQN, 1),))
    sb = alua.PortGroup("standby", 2, alua.STANDBY, supported=0x07,
                        ports=(alua.TargetPort(2, alua.PROTOCOL_ISCSI, remote_enabled, IQN, 2),))
    return [ao, sb]


def lu_with(groups):
    return LogicalUnit(RamBackend(), wwn=WWN, port_groups=lambda: groups)


def designators(page):
    """(code set, piv, association, type, body, protocol) of every descriptor of a VPD 83h
    page."""
    out, k = [], 4
    while k < 4 + int.from_bytes(page[2:4], "big"):
        n = page[k + 3]
        out.append((page[k] & 0x0F, page[k + 1] >> 7, (page[k + 1] >> 4) & 3, page[k + 1] & 0x0F,
                    page[k + 4:k + 4 + n], page[k] >> 4))
        k += 4 + n
    return out


def rtpg(lu, alloc=512, fmt=0):
    return run(lu, bytes([0xA3, (fmt << 5) | 0x0A, 0, 0, 0, 0]) + alloc.to_bytes(4, "big")
               + b"\0\0", in_len=alloc)


def test_without_groups_no_alua_is_reported():
    lu = LogicalUnit(RamBackend(), wwn=WWN)
    _, std = run(lu, [0x12, 0, 0, 0, 255, 0], in_len=255)
    assert std[5] & 0x30 == 0
    _, page = run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)
    assert [d[3] for d in designators(page)] == [3, 1]          # NAA and T10 vendor only
    assert sense_of(rtpg(lu)[0]) == (5, 0x20, 0)                # INVALID COMMAND OPERATION CODE


def test_tpgs_implicit_in_standard_inquiry():
    _, std = run(lu_with(two_gateways()), [0x12, 0, 0, 0, 255, 0], in_len=255)
    assert std[5] & 0x30 == 0x10 and std[5] & 0x08              # TPGS 01b, 3PC kept


def test_vpd83_names_the_local_port_and_its_group():
    _, page = run(lu_with(two_gateways()), [0x12, 1, 0x83, 0, 255, 0], in_len=255)
    ds = designators(page)
    assert [d[3] for d in ds] == [3, 1, 4, 5, 8, 8]
    rel, grp, name, device = ds[2], ds[3], ds[4], ds[5]
    assert device[:3] == (3, 1, 2) and device[4].rstrip(b"\0") == IQN.encode()
    assert rel[:3] == (1, 1, 1) and int.from_bytes(rel[4], "big") == 1     # binary, PIV, port
    assert grp[:3] == (1, 1, 1) and int.from_bytes(grp[4], "big") == 1
    assert name[0] == 3 and name[4] == f"{IQN},t,0x0001".encode().ljust(len(name[4]), b"\0")
    assert len(name[4]) % 4 == 0 and name[4].endswith(b"\0")
    assert [d[5] for d in ds] == [0, 0, 5, 5, 5, 5]     # the port's designators: iSCSI (PIV 1)


def test_no_alua_when_the_port_cannot_be_known():
    """Two enabled ports (in two groups, or in one): the port a command came through is unknown
    (TCMU does not say), and a LUN reporting TPGS must name it in VPD 83h (SPC-4), so no ALUA is
    reported: TPGS 00b, no port designators, RTPG unsupported."""
    one = [alua.PortGroup("ao", 7, alua.ACTIVE_OPTIMIZED, ports=(
        alua.TargetPort(1, 5, True, IQN, 1), alua.TargetPort(3, 5, True, IQN, 3)))]
    for groups in (two_gateways(remote_enabled=True), one):
        lu = lu_with(groups)
        _, std = run(lu, [0x12, 0, 0, 0, 255, 0], in_len=255)
        _, page = run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)
        assert std[5] & 0x30 == 0 and [d[3] for d in designators(page)] == [3, 1]
        assert sense_of(rtpg(lu)[0]) == (5, 0x20, 0)


def test_report_target_port_groups():
    r, d = rtpg(lu_with(two_gateways()))
    assert r.status == GOOD and len(d) == 4 + 2 * 12
    assert int.from_bytes(d[0:4], "big") == 24
    a, b = d[4:16], d[16:28]
    assert a[0] == 0x80 | alua.ACTIVE_OPTIMIZED and a[1] == 0x07
    assert int.from_bytes(a[2:4], "big") == 1 and a[5] == 0x02 and a[7] == 1
    assert int.from_bytes(a[10:12], "big") == 1
    assert b[0] == alua.STANDBY and int.from_bytes(b[2:4], "big") == 2 and b[7] == 1
    assert int.from_bytes(b[10:12], "big") == 2


def test_report_target_port_groups_extended_header_and_truncation():
    r, d = rtpg(lu_with(two_gateways()), fmt=1)
    assert r.status == GOOD and int.from_bytes(d[0:4], "big") == 24
    assert d[4] == 0x10 and d[5] == 30 and len(d) == 8 + 24
    r, d = rtpg(lu_with(two_gateways()), alloc=6)
    assert r.read_len == 6 and int.from_bytes(d[0:4], "big") == 24     # the length says all


def test_report_target_port_groups_bad_cdb():
    lu = lu_with(two_gateways())
    assert sense_of(rtpg(lu, alloc=3)[0]) == (5, 0x24, 0)
    assert sense_of(rtpg(lu, fmt=2)[0]) == (5, 0x24, 0)


def test_set_target_port_groups_is_not_offered():
    """Implicit ALUA only: SET TARGET PORT GROUPS is INVALID COMMAND OPERATION CODE (SPC-4
    6.39: not supported when TPGS does not include explicit)."""
    lu = lu_with(two_gateways())
    param = bytes(4) + bytes([alua.ACTIVE_OPTIMIZED, 0, 0, 2])
    r, _ = run(lu, bytes([0xA4, 0x0A, 0, 0, 0, 0, 0, 0, 0, len(param), 0, 0]), out=param)
    assert sense_of(r) == (5, 0x20, 0)
    ops = {(op, sa) for op, sa, _ in lu.supported_opcodes()}
    assert (0xA3, 0x0A) in ops and all(op != 0xA4 for op, _ in ops)


def test_a_failing_reader_means_no_alua_not_a_failed_command():
    def broken():
        raise OSError(2, "No such file or directory")
    lu = LogicalUnit(RamBackend(), wwn=WWN, port_groups=broken)
    r, std = run(lu, [0x12, 0, 0, 0, 255, 0], in_len=255)
    assert r.status == GOOD and std[5] & 0x30 == 0
    assert sense_of(rtpg(lu)[0]) == (5, 0x20, 0)


# -- configfs ---------------------------------------------------------------------------------

def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


def make_group(dev_dir, name, gid, state, members, status="None", pref=0, secs=0,
               support=(1, 1, 0, 1, 1, 1, 1)):
    g = os.path.join(dev_dir, "alua", name)
    for fname, value in (("tg_pt_gp_id", gid), ("alua_access_state", state),
                         ("alua_access_status", status), ("preferred", pref),
                         ("implicit_trans_secs", secs), ("alua_access_type", "Implicit"),
                         ("members", "\n".join(members))):
        write(os.path.join(g, fname), str(value))
    for fname, on in zip(alua.SUPPORT_BITS, support):
        write(os.path.join(g, fname), str(on))


def make_port(target_root, fabric, wwn, tpgt, lun, indx, enable=None, proto=5):
    tpg = os.path.join(target_root, fabric, wwn, f"tpgt_{tpgt}")
    stats = os.path.join(tpg, "lun", f"lun_{lun}", "statistics")
    write(os.path.join(stats, "scsi_port", "indx"), str(indx))
    write(os.path.join(stats, "scsi_transport", "proto_id"), str(proto))
    if enable is not None:
        write(os.path.join(tpg, "enable"), str(enable))


@pytest.fixture
def configfs(tmp_path):
    root = tmp_path / "config"
    target = str(root / "target")
    dev = UioDevice("uio0", 0, "3", "vol", "lvmirror", "vol", configfs_root=str(root))
    return dev, target


def test_read_port_groups_from_configfs(configfs):
    dev, target = configfs
    make_port(target, "iscsi", IQN, 1, 0, 1, enable=1)
    make_port(target, "iscsi", IQN, 2, 0, 2, enable=0)
    make_port(target, "loopback", "naa.5001405aaaaaaaaa", 1, 3, 9)      # no enable: enabled
    make_group(dev.configfs_dir, "ao", 1, 0, [f"iSCSI/{IQN}/tpgt_1/lun_0",
                                               "loopback/naa.5001405aaaaaaaaa/tpgt_1/lun_3"],
               status="Altered by Implicit ALUA", pref=1, secs=30)
    make_group(dev.configfs_dir, "default_tg_pt_gp", 0, 0, [])
    make_group(dev.configfs_dir, "standby", 2, 2, [f"iSCSI/{IQN}/tpgt_2/lun_0",
                                                    "not a member line"])
    groups = dev.port_groups()
    assert [g.name for g in groups] == ["ao", "default_tg_pt_gp", "standby"]
    ao, default, sb = groups
    assert (ao.group_id, ao.state, ao.status, ao.preferred, ao.implicit_trans_secs) == \
        (1, 0, 0x02, True, 30)
    assert ao.supported == 0x80 | 0x40 | 0x08 | 0x04 | 0x02 | 0x01       # no LBA dependent
    assert ao.ports == (alua.TargetPort(1, 5, True, IQN, 1),
                        alua.TargetPort(9, 5, True, "naa.5001405aaaaaaaaa", 1))
    assert default.ports == () and default.group_id == 0
    assert sb.state == alua.STANDBY and sb.ports == (alua.TargetPort(2, 5, False, IQN, 2),)


def test_empty_members_read_as_a_nul_byte_are_no_members(configfs, caplog):
    """Linux 6.1 reads an empty group's ``members`` as one NUL byte: no member, nothing logged
    (the lab found every INQUIRY logging a warning with a raw NUL in it, which made
    lvmirrord's log a binary file to grep)."""
    dev, target = configfs
    make_group(dev.configfs_dir, "default_tg_pt_gp", 0, 0, [])
    with open(os.path.join(dev.configfs_dir, "alua", "default_tg_pt_gp", "members"), "w") as f:
        f.write("\0")
    with caplog.at_level("WARNING"):
        (group,) = dev.port_groups()
        dev.port_groups()
    assert group.ports == () and caplog.records == []


def test_members_each_ending_with_a_nul_are_all_read(configfs, caplog):
    """6.1 ends each ``members`` line with a NUL byte: every member is read, not the first."""
    dev, target = configfs
    make_port(target, "iscsi", IQN, 1, 0, 1, enable=0)
    make_port(target, "iscsi", IQN, 2, 0, 2, enable=1)
    make_group(dev.configfs_dir, "ao", 1, 0, [])
    with open(os.path.join(dev.configfs_dir, "alua", "ao", "members"), "w") as f:
        f.write(f"iSCSI/{IQN}/tpgt_1/lun_0\0\niSCSI/{IQN}/tpgt_2/lun_0\0\n")
    with caplog.at_level("WARNING"):
        (group,) = dev.port_groups()
    assert [p.rel_port_id for p in group.ports] == [1, 2] and caplog.records == []
    lu = LogicalUnit(RamBackend(), wwn=WWN, port_groups=dev.port_groups)
    assert run(lu, [0x12, 0, 0, 0, 255, 0], in_len=255)[1][5] & 0x30 == 0x10


def test_a_bad_member_is_logged_once_without_control_bytes(configfs, caplog):
    dev, target = configfs
    make_group(dev.configfs_dir, "ao", 1, 0, ["bad\x01line"])
    with caplog.at_level("WARNING"):
        for _ in range(3):
            assert dev.port_groups()[0].ports == ()
    (record,) = caplog.records
    assert "\\x01" in record.getMessage() and "\x01" not in record.getMessage()


def test_a_target_name_that_is_not_utf8_is_still_a_port(configfs):
    """configfs names are any bytes. A ``members`` line naming such a target made the whole
    file raise UnicodeDecodeError (no ALUA at all); leaving that member out instead (a first
    version) miscounted the enabled ports, and ALUA is reported only with exactly one - two
    enabled ports then read as one, and commands through the second were told they came
    through the first (a trial). It is a port: counted, and named with its bytes as LIO's
    own page names it."""
    dev, target = configfs
    odd = IQN + "\udcff"
    make_port(target, "iscsi", odd, 1, 0, 1, enable=1)
    make_group(dev.configfs_dir, "ao", 1, 0, [])
    members = os.path.join(dev.configfs_dir, "alua", "ao", "members")
    with open(members, "wb") as f:
        f.write(os.fsencode(f"iSCSI/{odd}/tpgt_1/lun_0\n"))
    (group,) = dev.port_groups()
    assert group.ports == (alua.TargetPort(1, 5, True, odd, 1),)
    lu = LogicalUnit(RamBackend(), wwn=WWN, port_groups=dev.port_groups)
    status, page = run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)
    assert status.status == 0 and os.fsencode(odd) + b",t,0x0001" in page
    assert run(lu, [0x12, 0, 0, 0, 255, 0], in_len=255)[1][5] & 0x30 == 0x10   # TPGS implicit
    # a second enabled port, named in UTF-8: two ports, so no ALUA (TCMU does not say which
    # port a command came through)
    make_port(target, "iscsi", IQN, 2, 0, 2, enable=1)
    make_group(dev.configfs_dir, "sb", 2, 2, [f"iSCSI/{IQN}/tpgt_2/lun_0"])
    assert sum(len(g.ports) for g in dev.port_groups()) == 2
    assert run(lu, [0x12, 0, 0, 0, 255, 0], in_len=255)[1][5] & 0x30 == 0


def test_a_group_without_an_id_yet_is_skipped(configfs):
    """LIO shows an empty ``tg_pt_gp_id`` until one is written (rtslib makes the directory
    first): that group is left out, as LIO's RTPG leaves it out, not ALUA for the whole LUN."""
    dev, target = configfs
    make_port(target, "iscsi", IQN, 1, 0, 1, enable=1)
    make_group(dev.configfs_dir, "ao", 1, 0, [f"iSCSI/{IQN}/tpgt_1/lun_0"])
    make_group(dev.configfs_dir, "new", 0, 0, [])
    with open(os.path.join(dev.configfs_dir, "alua", "new", "tg_pt_gp_id"), "w") as f:
        f.write("")
    assert [g.name for g in dev.port_groups()] == ["ao"]
    lu = LogicalUnit(RamBackend(), wwn=WWN, port_groups=dev.port_groups)
    assert run(lu, [0x12, 0, 0, 0, 255, 0], in_len=255)[1][5] & 0x30 == 0x10


def test_read_port_groups_without_alua_dir(configfs):
    dev, target = configfs
    assert read_port_groups(dev.configfs_dir, target) == []


def test_read_port_groups_malformed_group_raises(configfs):
    dev, target = configfs
    make_group(dev.configfs_dir, "ao", 1, 0, [])
    os.unlink(os.path.join(dev.configfs_dir, "alua", "ao", "tg_pt_gp_id"))
    with pytest.raises(OSError):
        dev.port_groups()
    lu = LogicalUnit(RamBackend(), wwn=WWN, port_groups=dev.port_groups)
    assert run(lu, [0x12, 0, 0, 0, 255, 0], in_len=255)[0].status == GOOD


def _state_from_groups(dev):
    local = alua.enabled_ports(dev.port_groups())
    return local[0][0].state if len(local) == 1 else None


def _counting_opens(monkeypatch):
    n = [0]

    def counted(*a, **kw):
        n[0] += 1
        return builtins.open(*a, **kw)
    monkeypatch.setattr(tcmu_alua, "open", counted, raising=False)
    return n


def test_the_local_state_is_what_the_groups_give_with_fewer_reads(configfs, monkeypatch):
    """``local_port_state`` (what lvmirrord follows every second) gives the state of the group
    of the one enabled port exactly as ``enabled_ports(port_groups())`` does, through each
    change of layout - a port moved between groups, a TPG enabled and disabled, a group
    without an id yet, a malformed member line, a LUN directory gone - with at most a third of
    the file reads."""
    dev, target = configfs
    opens = _counting_opens(monkeypatch)
    assert dev.local_port_state() is None and _state_from_groups(dev) is None   # no alua dir

    def check():
        opens[0] = 0
        got = dev.local_port_state()
        cheap = opens[0]
        opens[0] = 0
        want = _state_from_groups(dev)
        assert got == want
        assert cheap * 3 <= opens[0], (cheap, opens[0])
        return got
    make_port(target, "iscsi", IQN, 1, 0, 1, enable=1)
    make_port(target, "iscsi", IQN, 2, 0, 2, enable=0)
    make_group(dev.configfs_dir, "default_tg_pt_gp", 0, alua.STANDBY,
               [f"iSCSI/{IQN}/tpgt_1/lun_0"])
    make_group(dev.configfs_dir, "gw", 1, alua.ACTIVE_OPTIMIZED, [])
    make_group(dev.configfs_dir, "peer", 2, alua.STANDBY,
               [f"iSCSI/{IQN}/tpgt_2/lun_0", "not a member line"])
    assert check() == alua.STANDBY                   # the port in the default group
    make_group(dev.configfs_dir, "default_tg_pt_gp", 0, alua.STANDBY, [])
    make_group(dev.configfs_dir, "gw", 1, alua.ACTIVE_OPTIMIZED, [f"iSCSI/{IQN}/tpgt_1/lun_0"])
    assert check() == alua.ACTIVE_OPTIMIZED          # moved to its own group
    write(os.path.join(dev.configfs_dir, "alua", "gw", "alua_access_state"), str(alua.STANDBY))
    assert check() == alua.STANDBY                   # the agent's demote
    write(os.path.join(target, "iscsi", IQN, "tpgt_2", "enable"), "1")
    assert check() is None                           # two enabled ports: no ALUA followed
    write(os.path.join(target, "iscsi", IQN, "tpgt_2", "enable"), "0")
    make_group(dev.configfs_dir, "new", 3, 0, [f"iSCSI/{IQN}/tpgt_2/lun_0"])
    write(os.path.join(dev.configfs_dir, "alua", "new", "tg_pt_gp_id"), "")
    assert check() == alua.STANDBY                   # a group without an id is skipped
    make_port(target, "loopback", "naa.5001405aaaaaaaaa", 1, 3, 9)      # no enable: enabled
    make_group(dev.configfs_dir, "new", 3, alua.ACTIVE_OPTIMIZED,
               ["loopback/naa.5001405aaaaaaaaa/tpgt_1/lun_3"])
    assert check() is None
    shutil.rmtree(os.path.join(target, "loopback", "naa.5001405aaaaaaaaa", "tpgt_1", "lun"))
    assert check() == alua.STANDBY                   # its LUN unmapped: left out
    os.unlink(os.path.join(dev.configfs_dir, "alua", "gw", "members"))
    with pytest.raises(OSError):
        dev.local_port_state()
