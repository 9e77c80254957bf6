"""The D-Bus service on a real, private dbus-daemon configured like the system bus with our
policy file: targetcli's own discovery code, CheckConfig, the lvmirror CLI, and refusal of an
unprivileged caller. (The real system bus with tcmu-runner is proven in the kernel lab.)"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from lvmirror import cfgstring
from lvmirror.daemon import Lvmirrord

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLICY = os.path.join(ROOT, "systemd", "dbus", "org.lvmirror1.conf")

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")


@pytest.fixture
def system_bus(tmp_path):
    yield from _private_bus(tmp_path)


def _private_bus(tmp_path, extra=""):
    # the socket lives where an unprivileged test client can reach it (tmp_path is 0700)
    sockdir = tempfile.mkdtemp(prefix="lvmirror-bus-", dir="/tmp")
    os.chmod(sockdir, 0o755)
    sock = os.path.join(sockdir, "bus.sock")
    conf = tmp_path / "bus.conf"
    conf.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={sock}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <include>{POLICY}</include>
  {extra}
</busconfig>
""")
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork",
                             "--print-address"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    address = proc.stdout.readline().strip()
    os.chmod(sock, 0o777)
    yield address
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture
def daemon(tmp_path, system_bus):
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
    imgs = [str(tmp_path / f"img{k}") for k in range(3)]
    spec = cfgstring.parse(f"vol0;images={'+'.join(imgs)};region_size=64K")
    vol, _ = d.registry.acquire(spec, lun="lun0", size=4 << 20)
    for job in vol.jobs.values():
        assert job.wait(20)
    from lvmirror.bus import BusService
    bus = BusService(d, bus_address=system_bus)
    bus.start()
    yield d, vol, system_bus, bus
    bus.stop()
    d.registry.release(spec)


def cli(address, *args, user=None):
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "lvmirror.cli", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20)


def test_targetcli_discovery_and_checkconfig(daemon):
    d, vol, address, bus = daemon
    assert bus.tcmu_mode == "owner"
    # Debian's targetcli code, run by Debian's python, as `targetcli` would
    code = ("from targetcli.ui_backstore import UIBackstores\n"
            "for name, iface, props in UIBackstores._user_backstores(None):\n"
            "    print(name, props['org.kernel.TCMUService1']['ConfigDesc'][:40])\n"
            "    print(iface.CheckConfig('(s)', 'lvmirror/vol0;foo=1'))\n"
            "    print(iface.CheckConfig('(s)', 'lvmirror/vol0'))\n")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    out = subprocess.run(["/usr/bin/python3", "-c", code], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("lvmirror VOLUME[;images=")
    assert "unknown option 'foo'" in lines[1] and lines[1].startswith("(False")
    assert lines[2] == "(True, 'success')"


def test_cli_status_split_resync(daemon, tmp_path):
    d, vol, address, _ = daemon
    vol.write(0, [memoryview(b"a" * 512)])
    r = cli(address, "--json", "status")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [im["state"] for im in st["volumes"]["vol0"]["images"]] == ["in-sync"] * 3
    r = cli(address, "split", "vol0", "2")
    assert r.returncode == 0, r.stderr
    assert "split at" in r.stdout
    assert vol.images[2].state.value == "split"
    vol.write(0, [memoryview(b"b" * 512)])
    r = cli(address, "status")
    assert "image 2: split" in r.stdout and "changed" in r.stdout
    r = cli(address, "resync", "vol0", "2", "--wait")
    assert r.returncode == 0, r.stderr
    assert vol.region_size == 64 << 10             # the one region the write changed
    assert "resync of image 2 started: 64.0 KiB (65536 bytes) to copy" in r.stdout, r.stdout
    assert vol.images[2].state.value == "in-sync"
    r = cli(address, "split", "vol0", "3")          # a 3-image volume: lvmirrord refuses
    assert r.returncode == 1 and "no image 3" in r.stderr, r.stderr
    r = cli(address, "split", "vol0", "9")          # never an image index: a usage error
    assert r.returncode == 2 and "an image index is 0 to 3, got 9" in r.stderr
    r = cli(address, "split", "nosuch", "1")
    assert r.returncode == 1 and "no volume 'nosuch'" in r.stderr
    r = cli(address, "wait", "nosuch")               # was: exit 0, as if it had waited
    assert r.returncode == 1 and "no volume 'nosuch' is open (open volumes: vol0)" in r.stderr


def test_unprivileged_caller_reads_but_cannot_change(daemon):
    d, vol, address, _ = daemon
    r = cli(address, "status", user=65534)
    assert r.returncode == 0, r.stderr
    assert "volume vol0" in r.stdout
    r = cli(address, "split", "vol0", "1", user=65534)
    assert r.returncode == 1
    assert "denied" in r.stderr.lower() or "rejected" in r.stderr.lower()
    assert vol.images[1].state.value == "in-sync"


ACTIVATED = """
import sys, time
from lvmirror.daemon import Lvmirrord
from lvmirror.bus import BusService
time.sleep(float(sys.argv[3]))          # a slow start (imports under emulation, a recovery)
BusService(Lvmirrord(state_dir=sys.argv[2], with_bus=False), bus_address=sys.argv[1]).start()
time.sleep(60)
"""


def test_cli_waits_for_a_start_slower_than_the_bus_activation_timeout(tmp_path):
    """D-Bus activation of a lvmirrord that takes longer to own its name than the bus waits
    (service_start_timeout, 25 s on the system bus; 1 s here): the CLI waits for the start
    instead of calling lvmirrord unreachable."""
    services = tmp_path / "services"
    services.mkdir()
    gen = _private_bus(tmp_path, f"<servicedir>{services}</servicedir>"
                                 '<limit name="service_start_timeout">1000</limit>')
    address = next(gen)
    script = tmp_path / "activated.py"
    script.write_text(ACTIVATED)
    (services / "org.lvmirror1.service").write_text(
        "[D-BUS Service]\nName=org.lvmirror1\n"
        # as under systemd, the start goes on when the bus gives up (dbus-daemon kills a
        # process it spawned itself; systemd's start is not its to kill)
        f"Exec=/bin/sh -c 'PYTHONPATH={ROOT} setsid {sys.executable} {script} {address} "
        f"{tmp_path / 'state'} 3 & sleep 30'\n")
    try:
        r = cli(address, "--json", "status")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["volumes"] == {}
    finally:
        subprocess.run(["pkill", "-f", str(script)])
        for _ in gen:
            pass


def test_lvmirrord_without_a_system_bus_exits_with_one_clear_line(tmp_path):
    """No system bus to own org.lvmirror1 on: lvmirrord says so in one line (and how to run
    without D-Bus) and exits 1, no traceback. (The netlink listener is a stand-in: this host's
    kernel has no target_core_user.)"""
    code = ("import sys\n"
            "from lvmirror.tcmu import netlink\n"
            "class Listener:\n"
            "    def start(self, callback): pass\n"
            "    def stop(self): pass\n"
            "netlink.TcmuNetlink = Listener\n"
            "from lvmirror.daemon.main import main\n"
            f"sys.exit(main(['--metrics-file', '', '--no-processes', '--state-dir',\n"
            f"               {str(tmp_path / 'state')!r}]))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    env.update(PYTHONPATH=ROOT, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={tmp_path}/no-bus")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "the D-Bus service cannot start" in proc.stderr and "--no-dbus" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_cli_without_daemon_says_unreachable(system_bus):
    r = cli(system_bus, "status")
    assert r.returncode == 3 and "not reachable" in r.stderr
    # a system bus address that is not one (DBUS_SYSTEM_BUS_ADDRESS mistyped): unreachable too
    r = cli("garbage", "status")
    assert r.returncode == 3 and "not reachable" in r.stderr and "colon" in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "soon"])
def test_cli_wait_refuses_a_timeout_that_is_not_positive_seconds(system_bus, value):
    """``wait --timeout nan`` never timed out (no comparison with NaN is true): refused as
    usage (exit 2) before lvmirrord is asked, as a negative, zero or infinite one is."""
    r = cli(system_bus, "wait", "vol0", "--timeout", value)
    assert r.returncode == 2 and f"seconds above 0, got '{value}'" in r.stderr, r.stderr


@pytest.mark.parametrize("args, usage, msg", [
    (["split-group", "db:1", "db:2"], "split-group", "db is named twice"),
    (["restore-group", "a:1", "b:1", "a:1"], "restore-group", "a is named twice"),
    (["restore-group", "db:2:3"], "restore-group", "volume name 'db:2' must be"),
    (["backup-cycle", "a:1", "a:2", "--dest", "/srv"], "backup-cycle", "a is named twice"),
    (["lease-init", "/srv/area", "--io-timeout", "-5"], "lease-init", "1 to 60, got '-5'"),
    (["lease-init", "/srv/area", "--io-timeout", "61"], "lease-init", "1 to 60, got '61'"),
    (["scrub"], "scrub", "name a VOLUME or give --all"),
    (["scrub", "vol0", "vol1"], "scrub", "unrecognized arguments: vol1"),
    (["split", "vol0", "1", "extra"], "split", "unrecognized arguments: extra"),
    (["lease-init", "/x", "--bogus"], "lease-init", "unrecognized arguments: --bogus"),
    (["backup-cycle", "--dest", "/srv"], "backup-cycle", "no VOLUME:IMAGE to back up"),
    (["backup-cycle", "a:1", "--dest", "srv"], "backup-cycle", "absolute directory, got 'srv'"),
    (["backup-cycle", "a:1", "--dest", "/srv", "--keep", "0"], "backup-cycle",
     "keep must be a whole number >= 1, got 0"),
])
def test_cli_usage_errors_say_the_commands_usage(args, usage, msg):
    """Bad usage exits 2 before lvmirrord is asked (no bus here: it would exit 3), printing the
    command's own usage line: a consistency group names one image of each volume, sanlock's
    I/O timeout is 1 to 60 s, scrub needs a volume or --all."""
    r = cli("unix:path=/nonexistent/bus", *args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert r.stderr.startswith(f"usage: lvmirror {usage} "), r.stderr



def test_cli_backup_cycle_config_file_errors_name_the_file_without_usage(tmp_path):
    """A wrong --config file is not bad usage of the command line: exit 2 with the file's
    problem, no usage line (the options' own mistakes print it, above)."""
    conf = tmp_path / "backup.conf"
    conf.write_text("[backup]\nmembers = db:1\ndest = relative/dir\n")
    r = cli("unix:path=/nonexistent/bus", "backup-cycle", "--config", str(conf))
    assert r.returncode == 2 and "dest must be an absolute directory" in r.stderr, r.stderr
    assert r.stderr.startswith(f"lvmirror: {conf}: backup: ") and "usage:" not in r.stderr, \
        r.stderr
    r = cli("unix:path=/nonexistent/bus", "backup-cycle", "--config", str(tmp_path / "none"))
    assert r.returncode == 2 and "none" in r.stderr and "usage:" not in r.stderr, r.stderr

LOCK_CLIENT = """
import sys, dbus
bus = dbus.SystemBus()
mgr = dbus.Interface(bus.get_object('org.lvmirror1', '/org/lvmirror1'), 'org.lvmirror1.Manager')
print(int(mgr.LockRegion('vol0', 0, 16, False, 10.0)), flush=True)
sys.stdin.readline()          # hold the lock until the test closes stdin... or kills us
"""


def test_external_lock_holder_blocks_io_and_loses_locks_when_it_leaves(daemon):
    import threading
    d, vol, address, _ = daemon
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_CLIENT], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    lock_id = int(holder.stdout.readline())
    assert lock_id >= 1
    done = threading.Event()
    t = threading.Thread(target=lambda: (vol.write(8, [memoryview(b"w" * 512)]), done.set()))
    t.start()
    # the initiator's write to the locked range waits for the external holder
    r = None
    for _ in range(100):
        r = json.loads(cli_call(address, "ListLocks", "vol0"))
        if r["waiters"]:
            break
    assert r["holders"][0]["lba"] == 0 and r["holders"][0]["count"] == 16
    assert r["waiters"] and r["waiters"][0]["lba"] == 8 and not done.is_set()
    assert r["holders"][0]["owner"].startswith("D-Bus :")          # the holder's bus name
    assert r["waiters"][0]["owner"] == "initiator I/O"
    assert r["external_lock_ids"] == [lock_id]
    holder.kill()                 # leaves the bus without unlocking
    holder.wait()
    assert done.wait(10), "the write stayed blocked after the holder left the bus"
    t.join()
    assert json.loads(cli_call(address, "ListLocks", "vol0"))["external_lock_ids"] == []


def cli_call(address, method, *args, check=True):
    code = ("import sys, dbus\n"
            "bus = dbus.SystemBus()\n"
            "mgr = dbus.Interface(bus.get_object('org.lvmirror1', '/org/lvmirror1'),"
            " 'org.lvmirror1.Manager')\n"
            f"print(getattr(mgr, {method!r})(*{args!r}))\n")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=20)
    if not check:
        return r.stdout + r.stderr
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_cli_attach_refuses_an_image_that_holds_data_unless_forced(daemon, tmp_path):
    """Issue 14, item 5: `lvmirror attach` over data is refused saying what was found;
    --force (AttachImageWithOptions {"force": true}) overwrites it; the plain AttachImage
    keeps its signature."""
    d, vol, address, _ = daemon
    precious = tmp_path / "precious.img"
    precious.write_bytes(b"\x5a" * (4 << 20))
    r = cli(address, "attach", "vol0", str(precious))
    assert r.returncode == 1
    assert (f"image {precious} holds data (first non-zero byte at offset 0; 4 MiB allocated): "
            f"attaching it to volume vol0 would overwrite it") in r.stderr
    assert "lvmirror attach --force" in r.stderr
    assert len(vol.images) == 3 and precious.read_bytes() == b"\x5a" * (4 << 20)
    out = cli_call(address, "AttachImageWithOptions", "vol0", str(precious), {"forse": True},
                   check=False)
    assert "unknown option 'forse' (known: force)" in out
    r = cli(address, "attach", "vol0", str(precious), "--force", "--wait")
    assert r.returncode == 0, r.stderr
    assert f"{precious} attached as image 3" in r.stdout
    assert vol.images[3].state.value == "in-sync"
    assert precious.read_bytes() == open(vol.images[0].path, "rb").read()


def test_volume_object_attach_image_with_options(daemon, tmp_path):
    """org.lvmirror1.Volume.AttachImageWithOptions(path, {"force": <b>}); AttachImage(path)
    unchanged (refuses data)."""
    d, vol, address, _ = daemon
    precious = tmp_path / "p.img"
    precious.write_bytes(b"\x01" * (4 << 20))
    code = ("import sys, dbus\n"
            "bus = dbus.SystemBus()\n"
            "obj = bus.get_object('org.lvmirror1', '/org/lvmirror1/volume/vol0')\n"
            "v = dbus.Interface(obj, 'org.lvmirror1.Volume')\n"
            "try:\n"
            f"    v.AttachImage({str(precious)!r})\n"
            "except dbus.DBusException as e:\n"
            "    print('refused:', e.get_dbus_message())\n"
            f"print('index', int(v.AttachImageWithOptions({str(precious)!r},"
            " dbus.Dictionary({'force': True}, signature='sv'))))\n")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"refused: image {precious} holds data (first non-zero byte at "
                               f"offset 0; 4 MiB allocated)")
    assert lines[1] == "index 3"
    for job in list(vol.jobs.values()):
        assert job.wait(20)
    assert vol.images[3].state.value == "in-sync"


def test_cli_full_resync_rebuilds_an_image_in_sync(daemon):
    """Issue 14 (dropped writes): `lvmirror resync VOL 1` of an image in sync is refused and
    points at --full; `--full` (ResyncWithOptions {"full": true}) copies every region; an
    unknown option is an error that names the known ones."""
    d, vol, address, _ = daemon
    with open(vol.images[1].path, "r+b") as f:     # writes image 1's disk dropped
        f.write(b"\xee" * (1 << 20))
    r = cli(address, "resync", "vol0", "1")
    assert r.returncode == 1 and "image 1 is already in sync" in r.stderr and "--full" in r.stderr
    out = cli_call(address, "ResyncWithOptions", "vol0", 1, 0.0, {"ful": True}, check=False)
    assert "unknown option 'ful' (known: full)" in out
    for bad in (["--rate", "-1"], ["--rate", "nan"], ["--rate", "inf"]):
        r = cli(address, "resync", "vol0", "1", "--full", *bad)
        assert r.returncode == 2 and "a rate is a number of MB/s" in r.stderr, r.stderr
    r = cli(address, "resync", "vol0", "-1", "--full")
    assert r.returncode == 2 and "an image index is 0 to 3, got -1" in r.stderr
    assert vol.images[1].state.value == "in-sync"      # nothing was changed by the refusals
    out = cli_call(address, "ResyncWithOptions", "vol0", 1, -5.0, {"full": True}, check=False)
    assert "rate limit must be a non-negative number of MB/s" in out
    assert vol.images[1].state.value == "in-sync"
    assert not any(j.is_alive() for j in vol.jobs.values())
    r = cli(address, "resync", "vol0", "1", "--full", "--wait")
    assert r.returncode == 0, r.stderr
    assert (f"full resync of image 1 started: 4.0 MiB ({4 << 20} bytes) to copy; the image "
            f"serves no reads until it ends") in r.stdout
    assert vol.images[1].state.value == "in-sync"
    assert open(vol.images[1].path, "rb").read() == open(vol.images[0].path, "rb").read()


def test_cli_refuses_a_split_copy_written_outside_and_full_restores_it(daemon):
    """Trial 26, MEDIUM 3: a split image's file written outside lvmirror is refused by
    `lvmirror resync` and `restore`, which name --full; `restore --full` (RestoreWithOptions
    {"full": true}) rolls the volume back to every region of the file as it is."""
    d, vol, address, _ = daemon
    vol.write(0, [memoryview(b"\x11" * (4 << 20))])
    vol.flush()
    r = cli(address, "split", "vol0", "2")
    assert r.returncode == 0, r.stderr
    with open(vol.images[2].path, "r+b") as f:      # a read-write mount of the copy
        f.seek(3 << 20)
        f.write(b"\xee" * 4096)
    r = cli(address, "resync", "vol0", "2")
    assert r.returncode == 1
    assert ("is not the copy lvmirror split off: its modification time changed" in r.stderr
            and "'lvmirror resync vol0 2 --full'" in r.stderr), r.stderr
    r = cli(address, "restore", "vol0", "2")
    assert r.returncode == 1 and "'lvmirror restore vol0 2 --full'" in r.stderr, r.stderr
    out = cli_call(address, "RestoreWithOptions", "vol0", 2, 0.0, {"fulll": True}, check=False)
    assert "unknown option 'fulll' (known: full)" in out
    assert vol.images[2].state.value == "split" and not any(
        j.is_alive() for j in vol.jobs.values())
    r = cli(address, "restore", "vol0", "2", "--full", "--wait")
    assert r.returncode == 0, r.stderr
    assert f"full restore of image 2 started: 4.0 MiB ({4 << 20} bytes) to copy" in r.stdout
    want = open(vol.images[2].path, "rb").read()
    assert want[3 << 20:(3 << 20) + 4096] == b"\xee" * 4096
    assert open(vol.images[0].path, "rb").read() == want
    r = cli(address, "resync", "vol0", "2", "--wait")    # the file is the copy now
    assert r.returncode == 0, r.stderr


def test_attach_options_are_checked():
    from lvmirror.bus.volume import attach_options
    assert attach_options({}) == {} and attach_options(None) == {}
    assert attach_options({"force": True}) == {"force": True}
    with pytest.raises(ValueError, match="unknown option 'x' \\(known: force\\)"):
        attach_options({"x": True})
    with pytest.raises(ValueError, match="option 'force' must be a boolean"):
        attach_options({"force": "yes"})
    from lvmirror.bus.volume import resync_options
    assert resync_options({"full": True}) == {"full": True}
    with pytest.raises(ValueError, match="option 'full' must be a boolean"):
        resync_options({"full": 7})          # an integer is not a boolean (b)
    with pytest.raises(ValueError, match="ResyncWithOptions: unknown option 'force'"):
        resync_options({"force": True})
    from lvmirror.bus.volume import restore_options
    assert restore_options({"full": False}) == {"full": False}
    with pytest.raises(ValueError, match="RestoreWithOptions: unknown option 'rate'"):
        restore_options({"rate": 1.0})


def test_cli_scrub_reports_repairs_and_keeps_the_result(daemon):
    """Issue 17 (scrub): `lvmirror scrub` finds the region one image changed behind the
    volume's back (exit 1 with --wait, the images grouped by content), --repair rewrites it
    from the majority, the result stays in status and in the volume's LastScrub property; bad
    requests are refused with the reason."""
    d, vol, address, _ = daemon
    vol.write(0, [memoryview(b"\x11" * (1 << 20))])
    vol.flush()
    with open(vol.images[2].path, "r+b") as f:      # region 3 (64 KiB regions), block 2
        f.seek(3 * (64 << 10) + 1024)
        f.write(b"\xee" * 512)
    r = cli(address, "scrub", "vol0", "--wait")
    assert r.returncode == 1, r.stderr
    assert ("region 3 (LBA 386-386): images read as 0+1 | 2; image(s) 0+1 hold the majority"
            in r.stdout), r.stdout
    assert "64 of 64 regions checked, 1 mismatch(es), 0 repaired, 1 left as found" in r.stdout
    r = cli(address, "scrub", "vol0", "--repair", "--wait")
    assert r.returncode == 0, r.stderr
    assert "image(s) 2 rewritten from image 0" in r.stdout
    assert open(vol.images[2].path, "rb").read() == open(vol.images[0].path, "rb").read()
    r = cli(address, "status")
    assert "scrub done (ended " in r.stdout and "1 mismatch(es), 1 repaired" in r.stdout
    code = ("import dbus\n"
            "obj = dbus.SystemBus().get_object('org.lvmirror1', '/org/lvmirror1/volume/vol0')\n"
            "v = obj.Get('org.lvmirror1.Volume', 'LastScrub',"
            " dbus_interface='org.freedesktop.DBus.Properties')\n"
            "print(str(v[0]), *[float(x) for x in v[1:]])\n")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out.stderr
    state, _, finished, *counts = out.stdout.split()
    assert state == "done" and float(finished) > 0
    assert [float(x) for x in counts] == [64, 1, 1, 0]
    # refusals: usage errors before anything is asked, lvmirrord's reasons after
    for args, msg in ((["scrub"], "name a VOLUME or give --all"),
                      (["scrub", "vol0", "--source", "1"], "give --repair too"),
                      (["scrub", "vol0", "--all"], "name a VOLUME or give --all"),
                      (["scrub", "vol0", "--repair", "--source", "7"], "0 to 3, got 7"),
                      (["scrub", "--cancel", "vol0", "--rate", "5"], "give only the VOLUME"),
                      (["scrub", "--cancel", "vol0", "--wait"], "give only the VOLUME"),
                      (["scrub", "--all", "--repair", "--source", "1"], "not with --all")):
        r = cli(address, *args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    r = cli(address, "scrub", "--cancel", "vol0")
    assert r.returncode == 1 and "no scrub is running" in r.stderr
    out = cli_call(address, "Scrub", "vol0", {"repare": True}, check=False)
    assert "unknown option 'repare' (known: rate, repair, source)" in out
    out = cli_call(address, "Scrub", "vol0", {"source": 1}, check=False)
    assert "only used to repair" in out
    vol.split(1)
    r = cli(address, "scrub", "vol0", "--repair", "--source", "1")
    assert r.returncode == 1 and "image 1 is split; only an in-sync image can be named right" \
        in r.stderr, r.stderr
    r = cli(address, "scrub", "--all", "--wait")      # 0 and 2 still compared
    assert r.returncode == 0, r.stderr
    assert "vol0: scrub done" in r.stdout and "0 mismatch(es)" in r.stdout
    # --json says what it started, without --wait too; --cancel --all with nothing running
    r = cli(address, "--json", "scrub", "vol0", "--rate", "0.5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"vol0": {"state": "running", "bytes_total": 4 << 20}}
    r = cli(address, "status")     # the running scrub is one line, with its rate
    assert r.stdout.count("\n  scrub") == 1 and "scrub running (started " in r.stdout \
        and " MB/s" in r.stdout.split("scrub running")[1], r.stdout
    r = cli(address, "--json", "scrub", "--cancel", "--all")
    assert r.returncode == 0 and json.loads(r.stdout) == {"cancelled": ["vol0"]}, r.stderr
    r = cli(address, "scrub", "--cancel", "--all")
    assert r.returncode == 0 and r.stdout == "no scrub running\n", (r.stdout, r.stderr)
    r = cli(address, "scrub", "vol0", "--json", "--cancel")     # --json after the command
    assert r.returncode == 1 and "no scrub is running" in r.stderr, r.stderr


def test_volume_object_scrub_and_cancel(daemon):
    """org.lvmirror1.Volume.Scrub(a{sv}) returns the bytes to check; CancelScrub ends a running
    scrub, which is kept as cancelled; Progress names the job "scrub"."""
    d, vol, address, _ = daemon
    code = ("import dbus, time, json\n"
            "bus = dbus.SystemBus()\n"
            "v = dbus.Interface(bus.get_object('org.lvmirror1', '/org/lvmirror1/volume/vol0'),"
            " 'org.lvmirror1.Volume')\n"
            "print(int(v.Scrub(dbus.Dictionary({'rate': 0.5}, signature='sv'))))\n"
            "time.sleep(1.5)\n"
            "v.CancelScrub()\n"
            "mgr = dbus.Interface(bus.get_object('org.lvmirror1', '/org/lvmirror1'),"
            " 'org.lvmirror1.Manager')\n"
            "sc = json.loads(mgr.Status())['volumes']['vol0']['scrub']\n"
            "print(sc['state'], sc['rate'], sc['regions_checked'] < sc['regions'])\n")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(4 << 20), "cancelled", "0.5", "True"]


def test_resync_wait_does_not_wait_for_a_running_scrub(daemon):
    """A fresh-clone trial: `resync --wait` (and the backup cycle) waited for an unrelated
    scrub at 0.4 MB/s; it waits for its own kind of job only."""
    d, vol, address, _ = daemon
    vol.split(1)
    vol.write(0, [memoryview(b"z" * 512)])
    job = vol.scrubs.start(rate_limit=0.05)          # 4 MiB at 0.05 MB/s: 80 s
    try:
        r = cli(address, "resync", "vol0", "1", "--wait")
        assert r.returncode == 0, r.stderr
        assert vol.images[1].state.value == "in-sync" and job.is_alive()
    finally:
        vol.scrubs.cancel()


def test_status_names_a_job_by_the_image_index_not_its_internal_id():
    """``lvmirror status`` says "resync of image 1" (the index every command takes), not the
    image's internal id, which differs once an image was detached and another attached."""
    from lvmirror.cli import format_status
    img = dict(split_time=None, dirty_bytes=None, bitmap_fill=0, error=None, path="/x")
    st = {"volumes": {"v": {
        "size": 1 << 20, "block_size": 512, "region_size": 65536, "health": "degraded",
        "images": [dict(img, index=0, id=0, state="in-sync"),
                   dict(img, index=1, id=3, state="syncing")],
        "jobs": [dict(kind="resync", image_id=3, state="running", bytes_done=0,
                      bytes_total=1 << 20, rate=1.0, eta_seconds=None)],
        "io": dict(reads=0, writes=0, read_errors=0, write_errors=0, inflight=0)}},
        "luns": []}
    text = format_status(st)
    assert "  resync of image 1: running" in text and "image id" not in text, text


def test_every_cli_command_says_what_it_does_in_help():
    """`lvmirror --help` gives every command a line of help, and each command's own --help
    explains its arguments; the exit statuses are in the epilog."""
    r = subprocess.run([sys.executable, "-m", "lvmirror.cli", "--help"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0
    listed = re.findall(r"^    (\S+)(?:\s+(\S.*))?$", r.stdout, re.M)
    names = [n for n, _ in listed]
    assert {"status", "split", "detach", "cancel", "resync", "restore", "scrub", "wait",
            "backup-cycle", "metrics"} <= set(names), r.stdout
    lines = r.stdout.splitlines()
    for name, text in listed:       # the help is on the same line or the next one
        nxt = lines[lines.index(next(x for x in lines if x.startswith(f"    {name}"))) + 1]
        assert text or nxt.startswith(" " * 10), f"no help for {name}"
    assert "3 lvmirrord not reachable" in r.stdout
    for name, want in (("split", "the image's index"), ("resync", "copying only the regions"),
                       ("wait", "--timeout SECONDS"), ("scrub", "the volume's name (or --all)"),
                       ("scrub", "compare the in-sync images region by region")):
        r = subprocess.run([sys.executable, "-m", "lvmirror.cli", name, "--help"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and want in r.stdout, r.stdout


def test_scrub_all_stops_after_an_operators_cancel_but_not_after_a_restores(capsys):
    """`scrub --all --wait` scrubs one volume after another; when an operator cancels the one
    running (`scrub --cancel --all` from another shell, say) the volumes after it are not
    started, while a scrub a restore cancelled (its record gives the reason) lets it go on."""
    import argparse
    import dbus
    from lvmirror.cli import _scrub

    def record(state, error=None):
        return dict(state=state, error=error, started=1.0, finished=2.0, regions=4,
                    regions_checked=2, mismatches=0, repaired=0, unrepaired=0, report=[],
                    rate=0.0)

    class Mgr:
        def __init__(self, outcome):
            self.outcome, self.started = outcome, []

        def Status(self):
            vols = {n: {"scrub": self.outcome[n] if n in self.started else None, "jobs": []}
                    for n in ("a", "b", "c")}
            return json.dumps({"volumes": vols, "luns": []})

        def Scrub(self, name, opts):
            self.started.append(name)
            return json.dumps({"bytes_total": 4096})

    args = argparse.Namespace(all=True, volume=None, cancel=False, repair=False, source=None,
                              rate=0.0, wait=True, json=False)
    mgr = Mgr({"a": record("done"), "b": record("cancelled"), "c": record("done")})
    assert _scrub(args, mgr, dbus) == 1 and mgr.started == ["a", "b"]
    assert "scrub --all: cancelled at b; not scrubbed: c" in capsys.readouterr().err
    mgr = Mgr({"a": record("cancelled", "a restore from image 1 began"), "b": record("done"),
               "c": record("done")})
    assert _scrub(args, mgr, dbus) == 1 and mgr.started == ["a", "b", "c"]


def test_scrub_all_fails_for_a_mirrored_volume_it_could_not_check(capsys):
    """`scrub --all --wait` (the monthly service): a one-image volume is skipped (nothing to
    compare, no failure); a mirrored volume lvmirrord refuses to scrub (an image split, a
    restore unfinished) is named and fails the run (exit 1); one whose scrub already runs is
    waited for; and --repair on two in-sync images says it only checks."""
    import argparse
    import dbus
    from lvmirror.cli import _scrub

    done = dict(state="done", error=None, started=1.0, finished=2.0, regions=4,
                regions_checked=4, mismatches=0, repaired=0, unrepaired=0, report=[], rate=0.0)
    two = [{"state": "in-sync"}, {"state": "in-sync"}]

    class Mgr:
        started = []
        calls = 0

        def Status(self):
            self.calls += 1      # busy's scrub (someone else's) runs at first, then ends
            return json.dumps({"luns": [], "volumes": {
                "one": {"images": [{"state": "in-sync"}], "scrub": None},
                "split": {"images": [{"state": "in-sync"}, {"state": "split"}], "scrub": None},
                "busy": {"images": two,
                         "scrub": dict(done, state="running") if self.calls == 1 else done},
                "ok": {"images": two, "scrub": done if "ok" in self.started else None}}})

        def Scrub(self, name, opts):
            if name == "split":
                raise dbus.DBusException("volume split: 1 in-sync image(s); a scrub compares "
                                         "two or more")
            if name == "busy":
                raise dbus.DBusException("volume busy: a scrub is already running (1 of 4 "
                                         "regions checked)")
            self.started.append(name)
            return json.dumps({"bytes_total": 4096})

    args = argparse.Namespace(all=True, volume=None, cancel=False, repair=True, source=None,
                              rate=0.0, wait=True, json=False)
    assert _scrub(args, Mgr(), dbus) == 1
    out = capsys.readouterr()
    assert "one: not scrubbed: one image, nothing to compare" in out.err
    assert "split: not scrubbed: volume split: 1 in-sync image(s)" in out.err
    assert "busy: a scrub is already running; waiting for it" in out.out
    assert "busy: scrub done" in out.out and "ok: scrub done" in out.out
    assert "ok: scrub started: 4.0 KiB (4096 bytes) to check (check only: two in-sync images " \
        "have no majority" in out.out


@pytest.mark.parametrize("n, text", [
    (0, "0 bytes"), (1, "1 byte"), (1023, "1023 bytes"),
    (4096, "4.0 KiB (4096 bytes)"),
    (153092096, "146.0 MiB (153092096 bytes)"),
    ((1 << 20) - 1, "1.0 MiB (1048575 bytes)"),             # not "1024.0 KiB"
    ((1 << 30) - 512, "1.0 GiB (1073741312 bytes)"),
    (3 << 40, "3.0 TiB (3298534883328 bytes)"),
    (5000 << 40, f"5000.0 TiB ({5000 << 40} bytes)"),     # TiB at most
    (4096.0, "4.0 KiB (4096 bytes)"),                     # a whole float from JSON
])
def test_cli_job_sizes_are_readable_and_exact(n, text):
    """A resync, restore or scrub that starts prints its size in binary units and in bytes
    (it printed the bytes alone); the unit never shows 1024 of itself."""
    from lvmirror.cli import size_phrase
    assert size_phrase(n) == text


@pytest.mark.parametrize("res, text", [
    (dict(state="running", bytes_total=4096, bytes_done=0, error=None),
     "started: 4.0 KiB (4096 bytes) to copy"),
    (dict(state="done", bytes_total=4096, bytes_done=4096, error=None),
     "done: 4.0 KiB (4096 bytes) copied"),
    (dict(state="failed", bytes_total=4096, bytes_done=0,
          error="split image 2 (/srv/b) cannot be read"),
     "failed: split image 2 (/srv/b) cannot be read"),
    (dict(state="cancelled", bytes_total=4096, bytes_done=0, error=None), "cancelled"),
])
def test_cli_says_how_a_job_it_started_stands(res, text):
    """A restore or resync that already ended when its call returned is not printed as
    "started" (trial 23: a restore whose source could not be read said "restore ...
    started"; only --wait told of the failure)."""
    from lvmirror.cli import job_phrase
    assert job_phrase(res) == text


@pytest.mark.parametrize("bad", [4194304.7, "4.0", None])
def test_cli_job_size_refuses_what_is_not_a_whole_number(bad):
    from lvmirror.cli import size_phrase
    with pytest.raises((TypeError, ValueError)):
        size_phrase(bad)


def test_stopped_service_leaves_nothing_on_glibs_default_context(daemon, caplog):
    """``BusService.stop`` removes its periodic sync from GLib's default main context, and a
    sync that still comes (a method's idle callback) does nothing: before, the next service's
    loop in the same process ran the old timer, which tried to unexport the objects ``stop``
    had removed and logged a LookupError traceback every second. A stopped service does not
    start again (StateError), and one whose start failed leaves no timer behind either."""
    import time
    from lvmirror.bus import BusService
    from lvmirror.errors import StateError
    d, vol, address, bus = daemon
    bus.stop()
    bus.sync()                          # the volume is still open: it would export it again
    assert bus._volumes == {}
    with pytest.raises(StateError, match="starts once"):
        bus.start()
    second = BusService(d, bus_address=address)     # a later service, its own loop
    second.start()
    try:
        third = BusService(d, bus_address=address)  # the names are taken: its start fails
        with pytest.raises(Exception, match="org.lvmirror1|NameExists|exists"):
            third.start()
        d.registry.release(cfgstring.parse(f"vol0;images={'+'.join(im.path for im in vol.images)}"
                                           f";region_size=64K"))
        time.sleep(2.5)                 # the old timers would have run twice in second's loop
        assert bus._volumes == {} and third._volumes == {}
    finally:
        second.stop()
    assert "LookupError" not in caplog.text and "not updated" not in caplog.text


def test_cli_restore_and_restore_group_exit_1_when_a_restore_already_failed(monkeypatch,
                                                                           capsys):
    """lvmirrord answers a restore (or a group's) whose copy already failed: the CLI says so
    on stderr and exits 1, also with --json, and restore-group does not claim the volumes
    read as their copies from one instant (trial 24: exit 0). The reply is lvmirrord's as
    its Manager returns it; what is tested is the CLI's reading of it."""
    from lvmirror import cli
    failed = dict(kind="restore", image_id=1, state="failed", bytes_done=0, bytes_total=4096,
                  rate=0.0, elapsed=0.0, eta_seconds=None, rate_limit=None,
                  error="split image 1 (/srv/b) cannot be read")
    running = dict(failed, state="running", error=None)

    class Manager:
        def RestoreGroup(self, members, rate, timeout=None):
            return json.dumps(dict(members=[dict(running, volume="va"),
                                            dict(failed, volume="vb")],
                                   hold_seconds=0.0001, held_commands=0, luns=2))

        def Restore(self, volume, image, rate):
            return json.dumps(failed)
    monkeypatch.setattr(cli, "_manager", lambda *a, **k: Manager())
    assert cli.main(["restore", "vb", "1"]) == cli.EXIT_ERROR
    assert "restore of image 1 failed: split image 1 (/srv/b) cannot be read" in \
        capsys.readouterr().err
    assert cli.main(["restore-group", "va:1", "vb:1"]) == cli.EXIT_ERROR
    out, err = capsys.readouterr()
    assert "va: restore started: 4.0 KiB (4096 bytes) to copy" in out
    assert "vb: restore failed: split image 1 (/srv/b) cannot be read" in out
    assert "from one instant" not in out
    assert "the restore of vb failed" in err
    assert cli.main(["restore-group", "va:1", "vb:1", "--json"]) == cli.EXIT_ERROR
    assert json.loads(capsys.readouterr().out)["members"][1]["state"] == "failed"


@pytest.mark.parametrize("member", ["db:²", "db:٣", "db:2:3"])
def test_group_members_take_ascii_image_indexes_and_volume_names(member):
    """"db:²" and "db:٣" are not image indexes (str.isdigit says yes to both; the cfgstring
    takes ASCII digits only) and "db:2:3" names no volume: a clear error, never image 3 of
    volume "db" or a plain ValueError from int()."""
    from lvmirror.cli import parse_member
    from lvmirror.daemon.splitgroup import parse_members
    from lvmirror.errors import ConfigError
    with pytest.raises(ValueError, match=r"is not VOLUME:IMAGE|volume name"):
        parse_member(member)
    with pytest.raises(ConfigError, match=r"expected VOLUME:IMAGE|volume name"):
        parse_members([member])
