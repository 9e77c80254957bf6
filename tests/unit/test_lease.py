"""Volume leases (daemon/lease.py): what needs no sanlock daemon (this host cannot run one: its
memlock limit is fixed), i.e. the configuration, the lease area's geometry and names, the
refusals before sanlock is asked, and lvmirrord's and lvmirror's command lines. The kernel lab
runs the real thing with two sanlock daemons (section lease)."""

import importlib
import os

import pytest

from lvmirror import cfgstring, cli
from lvmirror.daemon import lease
from lvmirror.daemon.registry import VolumeRegistry
from lvmirror.errors import ConfigError

# the module (lvmirror.daemon exports its main() function under the same name)
daemon_main = importlib.import_module("lvmirror.daemon.main")


def test_lease_config_checks_host_id_and_path():
    assert lease.LeaseConfig("/dev/shared", 1).io_timeout == 10
    with pytest.raises(ConfigError, match="1 to 2000"):
        lease.LeaseConfig("/dev/shared", 0)
    with pytest.raises(ConfigError, match="1 to 2000"):
        lease.LeaseConfig("/dev/shared", 2001)
    with pytest.raises(ConfigError, match="absolute"):
        lease.LeaseConfig("shared.area", 1)


def test_resource_names_fit_sanlock():
    assert lease.resource_name("vol0") == b"vol0"
    assert lease.resource_name("v" * 48) == b"v" * 48
    long_a, long_b = lease.resource_name("a" * 64), lease.resource_name("a" * 63 + "b")
    assert len(long_a) == 48 and long_a.startswith(b"h:") and long_a != long_b
    assert lease.resource_name("a" * 64) == long_a                   # stable


def test_area_slots_from_its_size(tmp_path):
    area = tmp_path / "area"
    for mib, slots in ((1, 0), (2, 0), (3, 1), (8, 6), (64, 62)):
        with open(area, "wb") as f:
            f.truncate(mib << 20)
        assert lease.area_slots(str(area)) == slots


def test_layout_offsets_are_sanlock_aligned():
    assert lease.LOCKSPACE_OFFSET == 0
    assert lease.DIRECTORY_OFFSET == lease.ALIGN == 1 << 20
    assert lease.FIRST_SLOT_OFFSET == 2 << 20


def test_registry_with_leases_refuses_a_volume_without_direct(tmp_path):
    """With leases every volume must be opened O_DIRECT; the refusal comes before the lease is
    asked for and before anything of the volume is read or created."""
    leases = lease.Leases(lease.LeaseConfig(str(tmp_path / "area"), 1))
    reg = VolumeRegistry(str(tmp_path / "state"), leases=leases)
    spec = cfgstring.parse(f"v1;images={tmp_path}/a.img+{tmp_path}/b.img")
    with pytest.raises(ConfigError, match="add ;direct=1"):
        reg.acquire(spec, lun="lun0", size=1 << 20)
    assert not os.path.exists(tmp_path / "a.img") and reg.names() == []
    assert reg.lease_of("v1") is None and leases.held() == {}


def test_registry_without_leases_reports_none(tmp_path):
    reg = VolumeRegistry(str(tmp_path / "state"))
    spec = cfgstring.parse(f"v1;images={tmp_path}/a.img+{tmp_path}/b.img")
    vol, _ = reg.acquire(spec, lun="lun0", size=1 << 20)
    try:
        assert reg.lease_of("v1") is None
    finally:
        reg.release(spec)


@pytest.mark.parametrize("argv,message", [
    (["--lease-area", "/dev/shared"], "--lease-area and --host-id go together"),
    (["--host-id", "1"], "--lease-area and --host-id go together"),
    (["--lease-area", "/dev/shared", "--host-id", "0"], "1 to 2000"),
    (["--lease-area", "rel/area", "--host-id", "1"], "absolute"),
    (["--lease-area", "/dev/shared", "--host-id", "1", "--lease-io-timeout", "0"],
     "at least 1 second"),
])
def test_lvmirrord_lease_options_are_checked(argv, message, capsys):
    """A usage error, before any side effect: the root logger is left as it was (a handler
    left on pytest's captured stderr made a later test's caplog see other tests' records)."""
    import logging
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    with pytest.raises(SystemExit) as e:
        daemon_main.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert (root.level, list(root.handlers)) == before


def test_lease_init_refuses_what_is_not_an_empty_area(tmp_path, capsys):
    """Checked before sanlock is asked: a directory, a relative path, an I/O timeout out of
    range (a usage error, exit 2), an area whose first MiB is not zeroes (a lockspace in use,
    or data) without --force."""
    used = tmp_path / "used"
    used.write_bytes(b"\0" * 100 + b"\x10\x20\x21\x12" + b"\0" * ((4 << 20) - 104))
    for argv, message in (([str(tmp_path)], "regular file or a block device"),
                          (["relative-area"], "absolute path"),
                          ([str(used)], "is not empty")):
        assert cli.main(["lease-init"] + argv) == cli.EXIT_ERROR
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:          # bad usage: argparse's exit 2
        cli.main(["lease-init", str(used), "--io-timeout", "0"])
    assert ei.value.code == 2 and "whole seconds from 1 to 60, got '0'" in capsys.readouterr().err


def test_lease_init_refuses_a_small_or_missing_area(tmp_path, capsys):
    small = tmp_path / "small"
    small.write_bytes(b"\0" * (2 << 20))
    assert cli.main(["lease-init", str(small)]) == cli.EXIT_ERROR
    assert "at least 3 MiB" in capsys.readouterr().err
    assert cli.main(["lease-init", str(tmp_path / "missing")]) == cli.EXIT_ERROR
    assert "No such file" in capsys.readouterr().err


def _block_device_with(sector):
    """A block device of this host whose logical sector size is ``sector`` bytes, or None."""
    for name in sorted(os.listdir("/sys/block")):
        try:
            with open(f"/sys/block/{name}/queue/logical_block_size") as f:
                size = int(f.read())
        except (OSError, ValueError):
            continue
        path = f"/dev/{name}"
        if size == sector and os.path.exists(path) and os.access(path, os.R_OK):
            return path
    return None


def test_area_sector_of_files_and_block_devices(tmp_path):
    """sanlock must be told the area's sector size: a file is laid out in 512-byte sectors, a
    block device in its logical sector size (BLKSSZGET), as /sys/block says it."""
    area = tmp_path / "area"
    area.write_bytes(b"\0" * (3 << 20))
    assert lease.area_sector(str(area)) == 512
    found = 0
    for sector in (512, 4096):
        dev = _block_device_with(sector)
        if dev is not None:
            found += 1
            assert lease.area_sector(dev) == sector
    if not found:
        pytest.skip("no readable block device on this host")


def test_a_4k_native_area_holds_250_host_ids(tmp_path):
    """sanlock's 1 MiB alignment holds 2000 host ids of 512-byte sectors, 250 of 4096."""
    area = tmp_path / "area"
    area.write_bytes(b"\0" * (3 << 20))
    assert lease.check_host_id(str(area), 2000) == 512
    dev = _block_device_with(4096)
    if dev is None:
        pytest.skip("no 4K-native block device on this host (zram is one)")
    assert lease.check_host_id(dev, 250) == 4096
    with pytest.raises(lease.LeaseError, match="4096-byte sectors.*1 to 250, not 251"):
        lease.check_host_id(dev, 251)


def test_a_file_area_takes_its_file_systems_sector_size(tmp_path):
    """A lease area that is a file on a 4K-native disk needs 4096-byte sanlock I/O (O_DIRECT
    of 512 bytes fails there): the sector size is the logical one of the block device the file
    system is on, read from sysfs (/sys/dev/block/MAJ:MIN, a partition's from its disk)."""
    area = tmp_path / "area"
    area.write_bytes(b"\0" * (3 << 20))
    st = os.stat(area)
    sys_root = tmp_path / "sys"
    disk = sys_root / "devices" / "vda"
    part = disk / "vda1"
    (disk / "queue").mkdir(parents=True)
    part.mkdir()
    (disk / "queue" / "logical_block_size").write_text("4096\n")
    (sys_root / "dev" / "block").mkdir(parents=True)
    (sys_root / "dev" / "block" / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}").symlink_to(part)
    assert lease._file_sector(st, str(sys_root)) == 4096          # the partition's disk
    (part / "queue").mkdir()
    (part / "queue" / "logical_block_size").write_text("512\n")
    assert lease._file_sector(st, str(sys_root)) == 512
    assert lease._file_sector(st, str(tmp_path / "nosys")) == 512  # no block device: 512


def test_joining_with_a_missing_lease_area_is_a_lease_error(tmp_path):
    """The lease-join thread catches LeaseError and logs it: a missing area must be one (it was
    a FileNotFoundError, a traceback from that thread)."""
    pytest.importorskip("sanlock")
    leases = lease.Leases(lease.LeaseConfig(str(tmp_path / "missing"), 1))
    with pytest.raises(lease.LeaseError, match="missing"):
        leases.join()


def test_a_lease_let_go_between_the_refusal_and_its_owners_is_still_held(tmp_path):
    """Lab, 2026-12-06: sanlock refused the acquire (-243, held by another host), and by the
    time its owners were read the holder had let go: the refusal became a plain LeaseError,
    which ended the LUN's retries, and the LUN stayed NOT READY with the lease free. It is a
    LeaseHeldError (the caller tries again); no owner left and the lockspace lost is still
    LockspaceLostError; another errno stays a LeaseError. (sanlock is stood in for here: this
    host cannot run its daemon; the lab runs the real one.)"""
    from lvmirror.daemon.lease import (SANLK_HELD, LeaseConfig, LeaseError, LeaseHeldError,
                                       Leases, LockspaceLostError)
    area = tmp_path / "area"
    area.write_bytes(bytes(3 << 20))

    class Sanlock:
        class SanlockException(Exception):
            pass

        def __init__(self, owners, joined=True):
            self.owners, self.joined = owners, joined

        def read_resource_owners(self, *a, **kw):
            return [{"host_id": h} for h in self.owners]

        def inq_lockspace(self, *a, **kw):
            return self.joined

    leases = Leases(LeaseConfig(str(area), 1, 10))
    held = Sanlock.SanlockException(SANLK_HELD, "Sanlock resource not acquired",
                                    "Lease is held by another host")
    e = leases._refusal(Sanlock([]), held, b"vol", [], "volume 'v'")
    assert type(e) is LeaseHeldError and "let it go since" in str(e)
    e = leases._refusal(Sanlock([2]), held, b"vol", [], "volume 'v'")
    assert type(e) is LeaseHeldError and e.owners == [2]
    e = leases._refusal(Sanlock([], joined=False), held, b"vol", [], "volume 'v'")
    assert type(e) is LockspaceLostError
    other = Sanlock.SanlockException(-5, "io error", "EIO")
    e = leases._refusal(Sanlock([]), other, b"vol", [], "volume 'v'")
    assert type(e) is LeaseError
