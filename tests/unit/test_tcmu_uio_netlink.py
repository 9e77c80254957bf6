"""uio discovery against a fake sysfs/configfs tree; TCM-USER message encoding with pyroute2's
own encoder. The live device and socket are proven in the kernel lab."""

import errno
import os
import subprocess
import sys

import pytest

from lvmirror.errors import ConfigError
from lvmirror.tcmu import abi, netlink, uio


def fake_device(root, minor, name, *, size=1082130432, info_size=268435456, serial="abc-123",
                wce="1"):
    sysfs = root / "sys"
    d = sysfs / "class" / "uio" / f"uio{minor}"
    (d / "maps" / "map0").mkdir(parents=True)
    # configfs takes any bytes for a backstore name or cfgstring: surrogates stand for them
    (d / "name").write_bytes((name + "\n").encode("utf-8", "surrogateescape"))
    (d / "maps" / "map0" / "size").write_text(f"{size:#x}\n")
    parsed = uio.parse_uio_name(name)
    if parsed:
        cfs = root / "cfg" / "target" / "core" / f"user_{parsed[0]}" / parsed[1]
        for sub in ("attrib", "action", "wwn"):
            (cfs / sub).mkdir(parents=True, exist_ok=True)
        (cfs / "info").write_text(
            f"Status: ACTIVATED  Max Queue Depth: 128  SectorSize: 512  HwMaxSectors: 128\n"
            f"        Config: lvmirror/x Size: {info_size} MaxDataAreaMB: 1024 DataPagesPerBlk: 1 "
            f"CmdRingSizeMB: 8\n")
        (cfs / "attrib" / "emulate_write_cache").write_text(wce + "\n")
        (cfs / "attrib" / "hw_block_size").write_text("512\n")
        (cfs / "attrib" / "tmr_notification").write_text("0\n")   # as the kernel (5.9+) has it
        (cfs / "wwn" / "vpd_unit_serial").write_text(f"T10 VPD Unit Serial Number: {serial}\n")
    return dict(sysfs_root=str(sysfs), configfs_root=str(root / "cfg"))


def test_parse_uio_name_keeps_slashes_in_cfgstring():
    assert uio.parse_uio_name("tcm-user/1/lun0/lvmirror/vol0;images=/srv/a.img+/srv/b.img") == (
        "1", "lun0", "lvmirror", "vol0;images=/srv/a.img+/srv/b.img")
    assert uio.parse_uio_name("tcm-user/2/d/qcow") == ("2", "d", "qcow", "")
    assert uio.parse_uio_name("uio_pci_generic") is None


def test_find_devices_filters_subtype_and_reads_configfs(tmp_path):
    roots = fake_device(tmp_path, 0, "tcm-user/1/q0/qcow//img.qcow2")
    fake_device(tmp_path, 3, "tcm-user/1/lun0/lvmirror/vol0;images=/a+/b", serial="5f0c")
    fake_device(tmp_path, 7, "some-other-uio")
    devs = uio.find_devices("lvmirror", **roots)
    assert [d.uio_name for d in devs] == ["uio3"]
    d = devs[0]
    assert (d.dev_name, d.cfgstring, d.minor) == ("lun0", "vol0;images=/a+/b", 3)
    assert d.map_size() == 1082130432
    assert d.lun_size() == 268435456
    assert d.write_cache() is True
    assert d.wwn() == "5f0c"
    assert uio.device_by_minor(0, **roots).subtype == "qcow"
    assert uio.device_by_minor(9, **roots) is None


def test_a_device_named_in_bytes_that_are_not_utf8_neither_breaks_nor_hides_the_others(
        tmp_path):
    """configfs takes a backstore name and cfgstring as any bytes; the uio name carries them.
    Read as strict UTF-8, one such device made every lookup raise UnicodeDecodeError (so every
    netlink event went unanswered while it existed). It is listed with surrogates for its odd
    bytes, which still name its configfs directory."""
    roots = fake_device(tmp_path, 3, "tcm-user/1/lun3/lvmirror/v3;image=/a")
    fake_device(tmp_path, 5, "tcm-user/1/lun\udcff5/lvmirror/v\udcfe;image=/b", info_size=4096)
    odd, good = uio.find_devices("lvmirror", **roots)[::-1]
    assert (good.minor, good.dev_name, good.cfgstring) == (3, "lun3", "v3;image=/a")
    assert (odd.minor, odd.dev_name, odd.cfgstring) == (5, "lun\udcff5", "v\udcfe;image=/b")
    assert odd.lun_size() == 4096          # the configfs dir named with the byte 0xff
    assert os.fsencode(odd.configfs_dir).endswith(b"/lun\xff5")
    assert uio.device_by_minor(3, **roots).cfgstring == "v3;image=/a"
    assert uio.parse_uio_name(b"tcm-user/1/d\xff/lvmirror/x") == ("1", "d\udcff", "lvmirror", "x")


def test_a_unit_serial_that_is_not_utf8_goes_out_as_its_bytes(tmp_path):
    """``wwn/vpd_unit_serial`` holds whatever bytes were written; the Unit Serial Number VPD
    page (SPC-4 7.8.16) carries them as they are, as LIO's own page does, not a
    UnicodeDecodeError at LUN open."""
    from lvmirror.scsi.lu import LogicalUnit
    from tests.unit.test_scsi_core import RamBackend, run
    roots = fake_device(tmp_path, 1, "tcm-user/1/lun1/lvmirror/v;image=/a")
    (dev,) = uio.find_devices("lvmirror", **roots)
    with open(os.path.join(dev.configfs_dir, "wwn", "vpd_unit_serial"), "wb") as f:
        f.write(b"T10 VPD Unit Serial Number: ab\xffcd\n")
    assert dev.wwn() == "ab\udcffcd"
    lu = LogicalUnit(RamBackend(), wwn=dev.wwn())
    status, serial = run(lu, [0x12, 1, 0x80, 0, 255, 0], in_len=255)    # INQUIRY, EVPD
    assert status.status == 0 and serial[4:] == b"ab\xffcd"
    status, devid = run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)
    assert status.status == 0 and b"LIO-ORG ab\xffcd" in devid


@pytest.mark.parametrize("content,serial", [
    ("T10 VPD Unit Serial Number: 5f0c-1b2a\n", "5f0c-1b2a"),
    ("T10 VPD Unit Serial Number: disk one\n", "disk one"),
    ("T10 VPD Unit Serial Number: \n", None),
    ("T10 VPD Unit Serial Number:\n", None),
    ("T10 VPD Unit Serial Number: rack7\ndisk-a\n", "rack7\ndisk-a"),
    # only the C locale's white space is the format's (LIO's strstrip); these are the serial's
    ("T10 VPD Unit Serial Number: abc\x1f\n", "abc\x1f"),
    ("T10 VPD Unit Serial Number: \x1cabc\u2028\n", "\x1cabc\u2028"),
    ("", None),
])
def test_the_unit_serial_is_the_rest_of_its_line_or_none(tmp_path, content, serial):
    """LIO shows an unset serial with nothing after the colon (target_core_configfs.c); it was
    read as the header itself, and a serial with a space cut at it - two LUNs then shared one
    serial and NAA, which multipath takes for two paths to one device (a trial)."""
    roots = fake_device(tmp_path, 1, "tcm-user/1/lun1/lvmirror/v;image=/a")
    (dev,) = uio.find_devices("lvmirror", **roots)
    with open(os.path.join(dev.configfs_dir, "wwn", "vpd_unit_serial"), "w") as f:
        f.write(content)
    assert dev.wwn() == serial


def test_a_lun_without_a_unit_serial_lists_no_vpd_page_and_reports_no_naa():
    """As LIO: no page in the Supported VPD Pages list (spc_emulate_evpd_00), so an initiator
    builds no identifier from it; an empty Unit Serial Number page and no NAA designator
    (it was one all-zero UUID, one NAA for every such LUN)."""
    from lvmirror.scsi.lu import LogicalUnit
    from tests.unit.test_scsi_core import RamBackend, run
    lu = LogicalUnit(RamBackend(), wwn=None)
    status, pages = run(lu, [0x12, 1, 0x00, 0, 255, 0], in_len=255)
    assert status.status == 0 and pages == bytes([0, 0, 0, 0])
    status, serial = run(lu, [0x12, 1, 0x80, 0, 255, 0], in_len=255)
    assert status.status == 0 and serial == bytes([0, 0x80, 0, 0])
    status, devid = run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)
    assert status.status == 0 and lu.naa is None
    assert devid[4:] == bytes([0x02, 0x01, 0x00, 8]) + b"LIO-ORG "       # T10 vendor only


def test_a_unit_serial_written_after_the_lun_opened_is_used(tmp_path):
    """rtslib-fb (targetcli, restoreconfig, the HA agent) writes ``wwn/vpd_unit_serial`` just
    after it enables the device - in the kernel's netlink reply mode always after lvmirrord
    opened the LUN. Read once at open, the serial was missing (before that, the header itself)
    for the LUN's life; now it is read when a page needs it until it is there."""
    from lvmirror.scsi.lu import LogicalUnit
    from tests.unit.test_scsi_core import RamBackend, run
    roots = fake_device(tmp_path, 1, "tcm-user/1/lun1/lvmirror/v;image=/a")
    (dev,) = uio.find_devices("lvmirror", **roots)
    path = os.path.join(dev.configfs_dir, "wwn", "vpd_unit_serial")
    with open(path, "w") as f:
        f.write("T10 VPD Unit Serial Number: \n")           # enabled, no serial yet
    lu = LogicalUnit(RamBackend(), wwn=dev.wwn)
    assert run(lu, [0x12, 1, 0x80, 0, 255, 0], in_len=255)[1] == bytes([0, 0x80, 0, 0])
    assert lu.naa is None
    with open(path, "w") as f:
        f.write("T10 VPD Unit Serial Number: 5f0c1b2a-7d3e-4f60-9a8b-0c1d2e3f4a5b\n")
    assert run(lu, [0x12, 1, 0x80, 0, 255, 0], in_len=255)[1][4:] == \
        b"5f0c1b2a-7d3e-4f60-9a8b-0c1d2e3f4a5b"
    assert run(lu, [0x12, 1, 0x00, 0, 255, 0], in_len=255)[1][4:] == \
        bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
    naa = lu.naa
    assert len(naa) == 16 and naa in run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)[1]
    assert naa == LogicalUnit(RamBackend(), wwn="5f0c1b2a-7d3e-4f60-9a8b-0c1d2e3f4a5b").naa


def test_open_missing_device_node_is_an_error(tmp_path):
    roots = fake_device(tmp_path, 3, "tcm-user/1/lun0/lvmirror/vol0")
    (d,) = uio.find_devices("lvmirror", dev_root=str(tmp_path / "dev"), **roots)
    with pytest.raises(FileNotFoundError):
        uio.open_device(d)


def _busy_device(tmp_path, monkeypatch, busy_opens):
    """A device node the kernel answers EBUSY for the first ``busy_opens`` opens (another
    process holds it); the lab shows the real case with tcmu-runner."""
    import errno
    roots = fake_device(tmp_path, 3, "tcm-user/1/lun0/lvmirror/vol0")
    (dev_root := tmp_path / "dev").mkdir()
    with open(dev_root / "uio3", "wb") as f:
        f.truncate(1082130432)
    (d,) = uio.find_devices("lvmirror", dev_root=str(dev_root), **roots)
    real_open, calls = os.open, []

    def kernel_open(path, flags, *a):
        if path == d.dev_path:
            calls.append(path)
            if len(calls) <= busy_opens:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        return real_open(path, flags, *a)
    monkeypatch.setattr(uio.os, "open", kernel_open)
    return d, calls


def test_open_waits_while_another_process_briefly_holds_the_device(tmp_path, monkeypatch):
    d, calls = _busy_device(tmp_path, monkeypatch, busy_opens=3)
    h = uio.open_device(d, busy_wait=5)
    assert len(calls) == 4
    h.close()


def test_open_of_a_device_held_by_another_handler_is_a_clear_error(tmp_path, monkeypatch):
    d, calls = _busy_device(tmp_path, monkeypatch, busy_opens=10 ** 6)
    with pytest.raises(uio.DeviceBusyError, match="held open by another process.*tcmu-runner"):
        uio.open_device(d, busy_wait=0.3)
    assert len(calls) > 1


def test_pickup_blocks_resets_and_unblocks_even_on_failure(tmp_path):
    roots = fake_device(tmp_path, 3, "tcm-user/1/lun0/lvmirror/vol0")
    (d,) = uio.find_devices("lvmirror", dev_root=str(tmp_path / "dev"), **roots)
    with pytest.raises(FileNotFoundError):
        uio.open_device(d, pickup=True)
    action = os.path.join(d.configfs_dir, "action")
    assert open(os.path.join(action, "reset_ring")).read() == "1\n"
    assert open(os.path.join(action, "block_dev")).read() == "0\n"   # unblocked again


def test_missing_info_size_is_a_config_error(tmp_path):
    roots = fake_device(tmp_path, 1, "tcm-user/1/lun0/lvmirror/vol0")
    (d,) = uio.find_devices("lvmirror", **roots)
    with open(os.path.join(d.configfs_dir, "info"), "w") as f:
        f.write("Status: ACTIVATED\n")
    with pytest.raises(ConfigError, match="no size"):
        d.lun_size()


def kernel_event(cmd, **attrs):
    m = netlink.tcmu_msg()
    m["cmd"] = cmd
    m["version"] = abi.GENL_VERSION
    m["attrs"] = [["TCMU_ATTR_" + k.upper(), v] for k, v in attrs.items()]
    m["header"]["type"] = 30
    m.encode()
    parsed = netlink.tcmu_msg(m.data)
    parsed.decode()
    return parsed


def test_decode_added_removed_reconfig():
    dev = "tcm-user/1/lun0/lvmirror/vol0"
    ev = netlink.decode_event(kernel_event(abi.GenlCommand.ADDED_DEVICE, device=dev, minor=4,
                                           device_id=9))
    assert isinstance(ev, netlink.DeviceAdded) and (ev.minor, ev.device_id) == (4, 9)
    assert ev.subtype == "lvmirror"
    ev = netlink.decode_event(kernel_event(abi.GenlCommand.REMOVED_DEVICE, device=dev, minor=4))
    assert isinstance(ev, netlink.DeviceRemoved)
    ev = netlink.decode_event(kernel_event(abi.GenlCommand.RECONFIG_DEVICE, device=dev, minor=4,
                                           dev_size=1 << 30, writecache=0, device_id=2))
    assert isinstance(ev, netlink.DeviceReconfig)
    assert (ev.dev_size, ev.write_cache, ev.dev_cfg) == (1 << 30, False, None)
    assert netlink.decode_event(kernel_event(abi.GenlCommand.SET_FEATURES, minor=1)) is None


def test_an_event_naming_bytes_that_are_not_utf8_still_names_its_device_and_subtype():
    """pyroute2 hands a string attribute that is not UTF-8 over as bytes; the event's subtype
    then raised TypeError in the netlink thread and the event went unanswered (the kernel's
    configfs ``enable`` write waiting on it)."""
    dev = b"tcm-user/1/lun0/lvmirror/v\xff;image=/a"
    ev = netlink.decode_event(kernel_event(abi.GenlCommand.ADDED_DEVICE, device=dev, minor=4,
                                           device_id=9))
    assert ev.device == "tcm-user/1/lun0/lvmirror/v\udcff;image=/a"
    assert ev.subtype == "lvmirror"
    ev = netlink.decode_event(kernel_event(abi.GenlCommand.RECONFIG_DEVICE, device=dev, minor=4,
                                           dev_cfg=b"lvmirror/v\xfe", device_id=2))
    assert (ev.subtype, ev.dev_cfg) == ("lvmirror", "lvmirror/v\udcfe")


@pytest.mark.parametrize("cls,cmd", [(netlink.DeviceAdded, abi.GenlCommand.ADDED_DEVICE_DONE),
                                     (netlink.DeviceRemoved, abi.GenlCommand.REMOVED_DEVICE_DONE),
                                     (netlink.DeviceReconfig,
                                      abi.GenlCommand.RECONFIG_DEVICE_DONE)])
def test_reply_carries_status_and_device_id(cls, cmd):
    data = netlink.encode_reply(30, cls(4, "tcm-user/1/x/lvmirror/v", 77), -22)
    m = netlink.tcmu_msg(data)
    m.decode()
    assert m["cmd"] == cmd and m["version"] == abi.GENL_VERSION
    assert m.get_attr("TCMU_ATTR_CMD_STATUS") == -22
    assert m.get_attr("TCMU_ATTR_DEVICE_ID") == 77
    assert m["header"]["type"] == 30


def test_acks_and_foreign_messages_are_not_events():
    from pyroute2.netlink import nlmsgerr
    ack = nlmsgerr()
    ack["header"]["type"] = 2
    ack["error"] = 0
    ack.encode()
    parsed = nlmsgerr(ack.data)
    parsed.decode()
    assert netlink.decode_event(parsed) is None
    # a TCM-USER message without a minor (malformed) is not an event either
    assert netlink.decode_event(kernel_event(abi.GenlCommand.ADDED_DEVICE, device="x")) is None


def _lookup_fails(monkeypatch, code):
    from pyroute2.netlink.exceptions import NetlinkError
    closed = []

    def bind(self, proto, msg_class, *args, **kwargs):
        raise NetlinkError(code, os.strerror(code))
    real_close = netlink.GenericNetlinkSocket.close

    def close(self, *args, **kwargs):
        closed.append(self)
        return real_close(self, *args, **kwargs)
    monkeypatch.setattr(netlink.GenericNetlinkSocket, "bind", bind)
    monkeypatch.setattr(netlink.GenericNetlinkSocket, "close", close)
    return closed


def test_a_missing_tcm_user_family_says_to_load_target_core_user(monkeypatch):
    closed = _lookup_fails(monkeypatch, errno.ENOENT)
    listener = netlink.TcmuNetlink()
    with pytest.raises(ConfigError) as ei:
        listener.start(lambda event: None)
    assert str(ei.value) == ("the TCM-USER netlink family is not there: load target_core_user "
                             "(modprobe target_core_user)")
    assert len(closed) == 1


def test_another_family_lookup_failure_is_an_oserror_with_its_errno(monkeypatch):
    closed = _lookup_fails(monkeypatch, errno.EPERM)
    with pytest.raises(OSError) as ei:
        netlink.TcmuNetlink().start(lambda event: None)
    assert ei.value.errno == errno.EPERM and "TCM-USER" in str(ei.value)
    assert len(closed) == 1


def test_lvmirrord_without_target_core_user_exits_with_the_message_not_a_traceback(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import errno, sys\n"
            "from pyroute2.netlink.exceptions import NetlinkError\n"
            "from pyroute2.netlink.generic import GenericNetlinkSocket\n"
            "def bind(self, *args, **kwargs):\n"
            "    raise NetlinkError(errno.ENOENT, 'No such file or directory')\n"
            "GenericNetlinkSocket.bind = bind\n"
            "from lvmirror.daemon.main import main\n"
            f"sys.exit(main(['--metrics-file', '', '--no-dbus', '--processes',\n"
            f"               '--state-dir', {str(tmp_path)!r}]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = root
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert "the TCM-USER netlink family is not there: load target_core_user " \
           "(modprobe target_core_user)" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("slow_answer", [None, "serial-old"])
def test_a_slow_read_never_replaces_the_serial_kept_meanwhile(slow_answer):
    """Two threads ask for the serial while configfs has none, then one: the slow first read
    (None, or a serial written before and since replaced) must not overwrite the serial the
    second kept - the LUN would report no serial again, or change its NAA (two trials)."""
    import threading
    from lvmirror.scsi.lu import LogicalUnit
    from tests.unit.test_scsi_core import RamBackend
    first_in, second_done = threading.Event(), threading.Event()
    calls = []

    def source():
        calls.append(1)
        if len(calls) == 1:             # the slow read
            first_in.set()
            second_done.wait(10)
            return slow_answer
        return "serial-new"
    lu = LogicalUnit(RamBackend(), wwn=source)
    slow = threading.Thread(target=lambda: lu.wwn)
    slow.start()
    assert first_in.wait(10)
    assert lu.wwn == "serial-new"
    naa = lu.naa
    second_done.set()
    slow.join(10)
    assert len(calls) == 2              # kept: not asked again
    assert lu.wwn == "serial-new" and lu.naa == naa


def test_the_device_identification_page_names_one_serial():
    """VPD 83h reads the serial once: a serial appearing between two reads gave a page with
    the serial in its T10 vendor designator and no NAA designator (a trial)."""
    from lvmirror.scsi.lu import LogicalUnit
    from tests.unit.test_scsi_core import RamBackend, run
    answers = iter([None, "5f0c-late"])
    lu = LogicalUnit(RamBackend(), wwn=lambda: next(answers, "5f0c-late"))
    status, page = run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)
    assert status.status == 0 and page == bytes([0, 0x83, 0, 12, 2, 1, 0, 8]) + b"LIO-ORG "
    status, page = run(lu, [0x12, 1, 0x83, 0, 255, 0], in_len=255)
    assert lu.naa in page and page.endswith(b"LIO-ORG 5f0c-late")


def test_an_idle_listener_never_wakes_and_stops_at_once(monkeypatch):
    """The listener waits on its socket and a stop pipe with no timeout (it polled every
    0.5 s before: two wake-ups a second on an idle gateway): idle, its thread makes no
    voluntary context switch; ``stop`` wakes it, joins it and closes the socket, and a second
    ``stop`` does nothing."""
    import time
    monkeypatch.setattr(netlink.GenericNetlinkSocket, "bind", lambda self, *a, **k: None)
    monkeypatch.setattr(netlink.GenericNetlinkSocket, "add_membership",
                        lambda self, *a, **k: None)
    listener = netlink.TcmuNetlink()
    listener.start(lambda event: None)
    thread = listener._thread
    time.sleep(0.2)                      # (it reached its wait)

    def switches():
        with open(f"/proc/self/task/{thread.native_id}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    before = switches()
    time.sleep(1.6)
    assert switches() == before and thread.is_alive()
    listener.stop()
    assert not thread.is_alive() and listener._sock is None
    listener.stop()


def test_the_listener_serves_a_socket_numbered_over_1024_and_stops_from_two_threads(
        monkeypatch):
    """With more than 1024 descriptors open before it (a gateway with many LUNs), the
    listener still waits (poll, not select, which raises for such a descriptor and ended the
    thread: trial 99); two threads stopping it at once both return, the descriptors closed
    once."""
    import resource
    import threading
    import time
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    monkeypatch.setattr(netlink.GenericNetlinkSocket, "bind", lambda self, *a, **k: None)
    monkeypatch.setattr(netlink.GenericNetlinkSocket, "add_membership",
                        lambda self, *a, **k: None)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fds = []
    try:
        while len(fds) < 1100:
            fds.append(os.open("/dev/null", os.O_RDONLY))
        listener = netlink.TcmuNetlink()
        listener.start(lambda event: None)
        assert listener._stop_r >= 1024
        time.sleep(0.3)
        assert listener._thread.is_alive()
        thread = listener._thread
        errors = []

        def stop():
            try:
                listener.stop()
            except Exception as exc:       # (EBADF from a double close, before)
                errors.append(exc)
        stoppers = [threading.Thread(target=stop) for _ in range(2)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(10)
        assert not errors and not thread.is_alive() and listener._sock is None
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
