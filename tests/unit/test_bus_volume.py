"""One D-Bus object per volume on a private dbus-daemon configured like the system bus:
ObjectManager listing, typed properties, busctl introspection, methods, the signals a monitor
sees (InterfacesAdded/Removed, PropertiesChanged, ImageStateChanged, Progress), Backup, and the
policy for an unprivileged caller."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from lvmirror import cfgstring
from lvmirror.bus.volume import object_path
from lvmirror.errors import StateError
from tests.unit.test_bus import daemon, system_bus  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")

VOL = "/org/lvmirror1/volume/vol0"


def call(address, path, iface, method, *args, user=None, timeout=30):
    """Call a method with dbus-python in a separate process (as a client would)."""
    code = ("import sys, json, dbus\n"
            "bus = dbus.SystemBus()\n"
            f"obj = bus.get_object('org.lvmirror1', {path!r})\n"
            f"r = obj.get_dbus_method({method!r}, {iface!r})(*{args!r}, timeout=60)\n"
            "print(json.dumps(r))\n")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    cmd = [sys.executable, "-c", code]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(r):
    assert r.returncode == 0, r.stderr
    import json
    return json.loads(r.stdout)


class Monitor:
    """dbus-monitor on the bus, for signals from lvmirrord."""

    def __init__(self, address):
        self.proc = subprocess.Popen(
            ["dbus-monitor", "--address", address, "type='signal',sender='org.lvmirror1'"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.text = ""
        time.sleep(0.3)

    def read(self):
        try:
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            chunk = b""
        self.text += chunk.decode(errors="replace")
        return self.text

    def wait_for(self, pattern, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.read(), re.S)
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"no signal matching {pattern!r}; saw:\n{self.text[-3000:]}")

    def close(self):
        self.proc.kill()
        self.proc.wait()


def test_object_path_escaping():
    assert object_path("vol0") == VOL
    assert object_path("db-1.data_x") == "/org/lvmirror1/volume/db_2d1_2edata_5fx"


def test_managed_objects_properties_and_introspection(daemon):  # noqa: F811
    d, vol, address, bus = daemon
    objs = ok(call(address, "/org/lvmirror1", "org.freedesktop.DBus.ObjectManager",
                   "GetManagedObjects"))
    props = objs[VOL]["org.lvmirror1.Volume"]
    assert props["Name"] == "vol0" and props["Size"] == 4 << 20 and props["RegionSize"] == 65536
    assert [(im[0], im[2]) for im in props["Images"]] == [(0, "in-sync"), (1, "in-sync"),
                                                          (2, "in-sync")]
    assert props["SyncProgress"] == 1.0 and props["Exported"] == []
    assert props["Health"] == "optimal"
    vol.write(0, [memoryview(b"x" * 4096)])
    stats = ok(call(address, VOL, "org.freedesktop.DBus.Properties", "Get",
                    "org.lvmirror1.Volume", "IoStatistics"))
    assert stats["writes"] >= 1 and stats["bytes_written"] >= 4096
    r = call(address, VOL, "org.freedesktop.DBus.Properties", "Get", "org.lvmirror1.Volume",
             "Colour")
    assert r.returncode != 0 and "UnknownProperty" in r.stderr
    r = call(address, VOL, "org.freedesktop.DBus.Properties", "Set", "org.lvmirror1.Volume",
             "Name", "x")
    assert r.returncode != 0 and "read-only" in r.stderr
    # busctl shows the properties with their types, the methods and the signals
    if shutil.which("busctl"):
        out = subprocess.run(["busctl", f"--address={address}", "introspect", "org.lvmirror1",
                              VOL, "org.lvmirror1.Volume"], capture_output=True, text=True,
                             timeout=20)
        assert out.returncode == 0, out.stderr
        assert re.search(r"\.Images\s+property\s+a\(usstddts\)", out.stdout)
        assert re.search(r"\.Split\s+method\s+u\s+du", out.stdout)
        assert re.search(r"\.Progress\s+signal\s+suttd", out.stdout)
        assert re.search(r"\.IoStatistics\s+property\s+a\{st\}", out.stdout)
        tree = subprocess.run(["busctl", f"--address={address}", "tree", "org.lvmirror1"],
                              capture_output=True, text=True, timeout=20)
        assert VOL in tree.stdout


def test_split_resync_signals(daemon, tmp_path):  # noqa: F811
    d, vol, address, bus = daemon
    mon = Monitor(address)
    try:
        t_split, drained = ok(call(address, VOL, "org.lvmirror1.Volume", "Split", 2))
        assert abs(t_split - time.time()) < 30 and drained >= 0
        mon.wait_for(r"member=ImageStateChanged\s+uint32 2\s+string \"in-sync\"\s+"
                     r"string \"split\"")
        mon.wait_for(r"member=PropertiesChanged\s+string \"org.lvmirror1.Volume\".*"
                     r"string \"Images\"")
        for k in range(0, 4 << 20, 64 << 10):       # change every region
            vol.write(k // 512, [memoryview(b"c" * 512)])
        total = ok(call(address, VOL, "org.lvmirror1.Volume", "Resync", 2, 1.0))
        assert total == 4 << 20
        m = mon.wait_for(r"member=Progress\s+string \"resync\"\s+uint32 2\s+uint64 (\d+)\s+"
                         r"uint64 (\d+)")
        assert int(m.group(2)) == 4 << 20 and int(m.group(1)) < 4 << 20
        progress = ok(call(address, VOL, "org.freedesktop.DBus.Properties", "Get",
                           "org.lvmirror1.Volume", "SyncProgress"))
        assert 0.0 <= progress < 1.0
        ok(call(address, VOL, "org.lvmirror1.Volume", "Cancel", 2))
        assert vol.images[2].state.value == "syncing"
        r = call(address, VOL, "org.lvmirror1.Volume", "Split", 9)
        assert r.returncode != 0 and "no image 9" in r.stderr
    finally:
        mon.close()



def test_image_failure_is_announced(daemon):  # noqa: F811
    """An image that vanishes under the volume (its descriptor closed: EBADF on every I/O) is
    failed at the next write; D-Bus announces it (ImageStateChanged, Health "degraded" in
    PropertiesChanged) and ``lvmirror status`` shows the health and the error."""
    from tests.unit.test_bus import cli
    d, vol, address, bus = daemon
    mon = Monitor(address)
    try:
        vol.image_storage(1).close()
        vol.write(0, [memoryview(b"v" * 4096)])                    # served by images 0 and 2
        mon.wait_for(r"member=ImageStateChanged\s+uint32 1\s+string \"in-sync\"\s+"
                     r"string \"failed\"")
        mon.wait_for(r"member=PropertiesChanged\s+string \"org.lvmirror1.Volume\".*"
                     r"string \"Health\"\s+variant\s+string \"degraded\"")
        out = cli(address, "status")
        assert out.returncode == 0, out.stderr
        assert "degraded" in out.stdout and "image 1: failed" in out.stdout
        assert "error: image " in out.stdout and "image closed" in out.stdout
    finally:
        mon.close()

def test_backup_method_and_guard(daemon, tmp_path):  # noqa: F811
    d, vol, address, bus = daemon
    vol.write(0, [memoryview(b"p" * 4096)])
    ok(call(address, VOL, "org.lvmirror1.Volume", "Split", 1))
    vol.write(0, [memoryview(b"q" * 4096)])                    # after T: not in the copy
    dest = tmp_path / "backup.img"
    n = ok(call(address, VOL, "org.lvmirror1.Volume", "Backup", 1, str(dest), "raw"))
    assert n == 4096                  # the data; holes stay holes
    with open(vol.images[1].path, "rb") as a:
        assert dest.read_bytes() == a.read()
    assert dest.read_bytes()[:4096] == b"p" * 4096
    jobs = ok(call(address, VOL, "org.freedesktop.DBus.Properties", "Get",
                   "org.lvmirror1.Volume", "Jobs"))
    assert ["backup", 1, "done"] == jobs[-1][:3] and jobs[-1][4] == 4 << 20
    r = call(address, VOL, "org.lvmirror1.Volume", "Backup", 0, str(tmp_path / "x"), "raw")
    assert r.returncode != 0 and "only a split image" in r.stderr
    r = call(address, VOL, "org.lvmirror1.Volume", "Backup", 1, "relative.img", "raw")
    assert r.returncode != 0 and "absolute" in r.stderr
    # the copy written outside lvmirror (its mtime moves): its backup would not be the
    # volume as of the split, so it is refused, naming why (copyid)
    os.utime(vol.images[1].path)
    r = call(address, VOL, "org.lvmirror1.Volume", "Backup", 1, str(tmp_path / "y"), "raw")
    assert r.returncode != 0 and "is not the copy lvmirror split off: its modification " \
        "time changed" in r.stderr and "a backup of it would not be" in r.stderr, r.stderr
    assert not (tmp_path / "y").exists()
    # the CLI's backup copies the file itself: it asks BackupCheck first (anyone may)
    from tests.unit.test_bus import cli
    r = cli(address, "backup", "vol0", "1", str(tmp_path / "z"))
    assert r.returncode != 0 and "is not the copy lvmirror split off" in r.stderr, r.stderr
    assert not (tmp_path / "z").exists()
    r = call(address, "/org/lvmirror1", "org.lvmirror1.Manager", "BackupCheck", "vol0", 1,
             user=65534)
    assert r.returncode != 0 and "is not the copy lvmirror split off" in r.stderr, r.stderr
    r = call(address, "/org/lvmirror1", "org.lvmirror1.Manager", "BackupCheck", "vol0", 0,
             user=65534)
    assert r.returncode != 0 and "only a split image" in r.stderr, r.stderr
    # while a backup of the image runs, nothing may change the image under it
    from lvmirror.daemon import BackupProgress
    d._local._backups[("vol0", vol.images[1].id)] = BackupProgress(vol.images[1].id, "/tmp/running")
    for fn in (lambda: d.resync("vol0", 1), lambda: d.restore("vol0", 1),
               lambda: d.detach("vol0", 1)):
        with pytest.raises(StateError, match="being backed up"):
            fn()


def test_unprivileged_caller_reads_volume_but_cannot_change_it(daemon):  # noqa: F811
    d, vol, address, bus = daemon
    props = ok(call(address, VOL, "org.freedesktop.DBus.Properties", "GetAll",
                    "org.lvmirror1.Volume", user=65534))
    assert props["Name"] == "vol0"
    assert ok(call(address, "/org/lvmirror1", "org.freedesktop.DBus.ObjectManager",
                   "GetManagedObjects", user=65534))
    for method, args in (("Split", (1,)), ("Resync", (1, 0.0)), ("DetachImage", (1,)),
                         ("Backup", (1, "/tmp/x.img", "raw"))):
        r = call(address, VOL, "org.lvmirror1.Volume", method, *args, user=65534)
        assert r.returncode != 0, method
        assert "AccessDenied" in r.stderr or "rejected" in r.stderr.lower(), r.stderr
    assert vol.images[1].state.value == "in-sync"


def test_volume_object_follows_open_and_close(daemon, tmp_path):  # noqa: F811
    d, vol, address, bus = daemon
    mon = Monitor(address)
    try:
        spec = cfgstring.parse(f"vol9;images={tmp_path}/n0+{tmp_path}/n1")
        v9, _ = d.registry.acquire(spec, lun="lun9", size=1 << 20)
        mon.wait_for(r"member=InterfacesAdded\s+object path \"/org/lvmirror1/volume/vol9\"")
        d.registry.release(spec)
        mon.wait_for(r"member=InterfacesRemoved\s+object path \"/org/lvmirror1/volume/vol9\"")
        objs = ok(call(address, "/org/lvmirror1", "org.freedesktop.DBus.ObjectManager",
                       "GetManagedObjects"))
        assert list(objs) == [VOL]
    finally:
        mon.close()


def test_clients_import_no_service_modules():
    """The CLI and targetcli-lvmirror reach lvmirrord through lvmirror.bus.names and
    dbus-python's client side: importing them loads neither the service (dbus.service, GLib,
    lvmirror.bus.service/volume) nor the cfgstring parser, whose imports cost a client about
    half a second of its start under the lab's emulated CPU."""
    import subprocess
    import sys
    import os
    code = ("import sys, lvmirror.cli, lvmirror.bus.names, targetcli_ext, dbus; "
            "from lvmirror.bus import BUS_NAME; "
            "rc = lvmirror.cli.main(['status']); assert rc, rc; "   # no bus: fails, after imports
            "rc = lvmirror.cli.main(['backup-cycle', 'v:1', '--dest', '/nonexistent']); "
            "heavy = [m for m in ('dbus.service', 'gi', 'gi.repository', 'lvmirror.bus.service', "
            "'lvmirror.bus.volume', 'lvmirror.cfgstring') if m in sys.modules]; "
            "print(heavy)")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS="unix:path=/nonexistent/bus")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.stdout.strip().splitlines()[-1:] == ["[]"], out.stdout + out.stderr


def test_bus_package_gives_busservice_on_first_use():
    import lvmirror.bus
    from lvmirror.bus.service import BusService
    assert lvmirror.bus.BusService is BusService
    import pytest
    with pytest.raises(AttributeError):
        lvmirror.bus.NoSuchThing


_HELD_COPIER = """
import sys, dbus
from lvmirror.backup import held_backup
mgr = dbus.Interface(dbus.SystemBus().get_object('org.lvmirror1', '/org/lvmirror1'),
                     'org.lvmirror1.Manager')
paused = []

def progress(done, total):
    if not paused:
        paused.append(1)
        print('copying', flush=True)
        sys.stdin.readline()
print('done', held_backup(mgr, 'vol0', 1, sys.argv[1], progress=progress), flush=True)
"""


def _backup_job(d, dest):
    jobs = d.status()["volumes"]["vol0"]["jobs"]
    return next((j for j in reversed(jobs) if j["kind"] == "backup" and j.get("dest") == dest),
                None)


def test_a_backup_the_cli_copies_holds_the_image_until_it_ends(daemon, tmp_path):  # noqa: F811
    """``lvmirror backup`` and targetcli-lvmirror's ``backup`` copy the split image
    themselves (they may write where lvmirrord's sandbox may not). They only asked
    BackupCheck first, so a resync started during the copy changed the file under it: a
    backup of two instants. BeginBackup now holds the image as lvmirrord's own Backup does
    (resync, restore, detach refused) until EndBackup, or until the copier leaves the bus."""
    from tests.unit.test_bus import ROOT
    from tests.unit.test_volume_helpers import wait_until
    d, vol, address, bus = daemon
    vol.write(0, [memoryview(b"p" * 4096)])
    ok(call(address, VOL, "org.lvmirror1.Volume", "Split", 1))
    vol.write(0, [memoryview(b"q" * 4096)])                    # after T: not in the copy
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, PYTHONPATH=ROOT)

    def copier(dest):
        p = subprocess.Popen([sys.executable, "-c", _HELD_COPIER, str(dest)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "copying", p.stderr.read()
        return p

    dest = tmp_path / "held.img"
    p = copier(dest)
    for fn in (lambda: d.resync("vol0", 1), lambda: d.restore("vol0", 1),
               lambda: d.detach("vol0", 1)):
        with pytest.raises(StateError, match="being backed up"):
            fn()
    assert _backup_job(d, str(dest))["state"] == "running"
    # status says who copies (lvmirrord learns the bytes only at the end), not "0 B"
    shown = subprocess.run([sys.executable, "-m", "lvmirror.cli", "status"], env=env,
                           capture_output=True, text=True, timeout=30).stdout
    assert re.search(r"backup of image 1: running, copied by D-Bus :1\.\d+ to "
                     + re.escape(str(dest)), shown), shown
    out, err = p.communicate("\n", timeout=30)
    assert p.returncode == 0 and out.split() == ["done", "4096"], err   # holes stay holes
    assert dest.read_bytes() == open(vol.images[1].path, "rb").read()
    assert dest.read_bytes()[:4096] == b"p" * 4096
    job = _backup_job(d, str(dest))
    assert job["state"] == "done" and job["bytes_done"] == 4096, job
    # a copier that dies mid-copy: its hold ends with its bus connection, as failed
    dest2 = tmp_path / "killed.img"
    p = copier(dest2)
    p.kill()
    p.wait(10)
    wait_until(lambda: _backup_job(d, str(dest2))["state"] == "failed", 20)
    assert "left the bus" in _backup_job(d, str(dest2))["error"]
    shown = subprocess.run([sys.executable, "-m", "lvmirror.cli", "status"], env=env,
                           capture_output=True, text=True, timeout=30).stdout
    assert re.search(r"backup of image 1: failed, to " + re.escape(str(dest2))
                     + r" by D-Bus :1\.\d+, error: .*left the bus", shown), shown
    # no hold: EndBackup is an error (the copy would not be vouched for)
    r = call(address, "/org/lvmirror1", "org.lvmirror1.Manager", "EndBackup", "vol0", 1,
             {"state": "done"})
    assert r.returncode != 0 and "no backup of image 1 held by" in r.stderr, r.stderr
    # and only root may hold an image against resync
    r = call(address, "/org/lvmirror1", "org.lvmirror1.Manager", "BeginBackup", "vol0", 1,
             "/tmp/x", user=65534)
    assert r.returncode != 0 and ("AccessDenied" in r.stderr or "rejected" in r.stderr.lower())
    # the CLI's backup, through the hold: a relative destination is the caller's
    r = subprocess.run([sys.executable, "-m", "lvmirror.cli", "backup", "vol0", "1",
                        "cli.img"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "cli.img").read_bytes() == dest.read_bytes()
    assert _backup_job(d, str(tmp_path / "cli.img"))["state"] == "done"
    job = d.resync("vol0", 1)
    assert job["kind"] == "resync"


def test_a_held_image_is_not_exported_writable_nor_renumbered(daemon, tmp_path):  # noqa: F811
    """A backup's hold covers what else could change the file under the copy (review of
    2026-12-06): a LUN exporting the image writable (refused while held, and a hold refused
    while one does; ``readonly=1`` is fine), and a detach of an image before it, which would
    renumber it under the hold and its EndBackup."""
    from lvmirror import cfgstring
    d, vol, address, bus = daemon
    vol.write(0, [memoryview(b"p" * 4096)])
    d.split("vol0", 2)
    owner = ("bus", ":1.4242")
    d.begin_backup("vol0", 2, str(tmp_path / "b.img"), owner)
    reg = d._local.registry
    with pytest.raises(StateError, match="being backed up; export it read-only"):
        reg.acquire(cfgstring.parse("vol0;image=2"), lun="lun9", size=4 << 20)
    ro = cfgstring.parse("vol0;image=2;readonly=1")
    _, backend = reg.acquire(ro, lun="lun9", size=4 << 20)
    reg.release(ro, backend)
    with pytest.raises(StateError, match="would renumber image 2, which is being backed up"):
        d.detach("vol0", 0)
    d.end_backup("vol0", 2, owner, state="done", nbytes=4096)
    rw = cfgstring.parse("vol0;image=2")
    _, backend = reg.acquire(rw, lun="lun9", size=4 << 20)
    try:
        with pytest.raises(StateError, match="exported writable by LUN 'lun9'"):
            d.begin_backup("vol0", 2, str(tmp_path / "c.img"), owner)
    finally:
        reg.release(rw, backend)
    d.begin_backup("vol0", 2, str(tmp_path / "c.img"), owner)
    d.release_owner(owner)                          # its copier left the bus: hold ended
    _, backend = reg.acquire(rw, lun="lun9", size=4 << 20)
    reg.release(rw, backend)


def test_a_hold_given_after_its_caller_left_the_bus_is_ended(daemon, tmp_path,  # noqa: F811
                                                             monkeypatch):
    """BeginBackup's caller leaves the bus while the call waits (a restore's flush holds the
    lock it needs; the client times out or is interrupted): the hold registered after
    ``release_owner`` ran would have held the image against resync until a restart (review of
    2026-12-06). It is ended as it is given."""
    import threading
    from tests.unit.test_bus import ROOT
    from tests.unit.test_volume_helpers import wait_until
    d, vol, address, bus = daemon
    vol.write(0, [memoryview(b"p" * 4096)])
    ok(call(address, VOL, "org.lvmirror1.Volume", "Split", 1))
    go, called = threading.Event(), threading.Event()
    real = d.begin_backup

    def slow(*args, **kw):
        called.set()
        assert go.wait(30)
        return real(*args, **kw)
    monkeypatch.setattr(d, "begin_backup", slow)
    dest = str(tmp_path / "gone.img")
    code = ("import dbus\n"
            "mgr = dbus.Interface(dbus.SystemBus().get_object('org.lvmirror1', "
            "'/org/lvmirror1'), 'org.lvmirror1.Manager')\n"
            f"mgr.BeginBackup('vol0', dbus.UInt32(1), {dest!r}, timeout=60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], env=dict(
        os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, PYTHONPATH=ROOT))
    assert called.wait(20)
    p.kill()                                        # it leaves the bus while the call waits
    p.wait(10)
    wait_until(lambda: bool(bus.locks._gone), 10)
    go.set()
    wait_until(lambda: (_backup_job(d, dest) or {}).get("state") == "failed", 20)
    assert "left the bus" in _backup_job(d, dest)["error"]
    job = d.resync("vol0", 1)                       # not held
    assert job["kind"] == "resync"


def test_a_backup_is_refused_onto_an_image_or_before_its_split_ends(daemon, tmp_path):  # noqa: F811
    """Trial 38: ``lvmirror backup vol0 1 <image 0's path>`` wrote the split copy over the live
    image (a stale read, acknowledged writes lost); a backup began while the split was still
    draining the I/O begun before T. Both are refused now, the first naming the image; and
    ``lvmirror cancel`` ends a hold whose copier never will (its BeginBackup timed out, its
    connection stays), after which its EndBackup fails: the copy is not vouched for."""
    from lvmirror.errors import ConfigError
    from tests.unit.test_bus import ROOT
    d, vol, address, bus = daemon
    vol.write(0, [memoryview(b"p" * 4096)])
    img0 = vol.images[0].path
    before = open(img0, "rb").read()
    p = vol.splits.prepare(1)
    vol.splits.switch(p)
    owner = ("bus", ":1.4343")
    with pytest.raises(StateError, match="the split of image 1 is not finished yet"):
        d.begin_backup("vol0", 1, str(tmp_path / "early.img"), owner)
    vol.splits.finish(p)
    with pytest.raises(ConfigError, match=r"is image 0 of volume vol0 .*would overwrite it"):
        d.begin_backup("vol0", 1, img0, owner)
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "lvmirror.cli", "backup", "vol0", "1", img0],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "would overwrite it" in r.stderr, r.stderr
    assert open(img0, "rb").read() == before
    d.begin_backup("vol0", 1, str(tmp_path / "held.img"), owner)
    with pytest.raises(StateError, match="being backed up"):
        d.resync("vol0", 1)
    d.cancel("vol0", 1)                             # the operator ends the hold
    with pytest.raises(ConfigError, match="no backup of image 1 held by"):
        d.end_backup("vol0", 1, owner, state="done", nbytes=4096)
    assert d.resync("vol0", 1)["kind"] == "resync"


def test_one_destination_takes_one_backup_and_never_a_half_copy(daemon, tmp_path,  # noqa: F811
                                                                monkeypatch):
    """Trial of 2026-12-06, HIGH: copies to one destination shared ``DEST.partial`` (opened
    O_TRUNC), so a second copier emptied the first's copy, which the first renamed into place
    as done. Now each copy is made in a new file of its own beside DEST (0600) and renamed
    only once vouched for; a second backup to a DEST another backup is writing is refused;
    lvmirrord's own Backup makes its copy the same way, so its failure leaves nothing under
    DEST; and a DEST that is no regular file (a symlink, a device) is refused, not replaced."""
    from lvmirror.errors import ConfigError
    from tests.unit.test_bus import ROOT
    d, vol, address, bus = daemon
    vol.write(0, [memoryview(b"p" * 4096)])
    ok(call(address, VOL, "org.lvmirror1.Volume", "Split", 1))
    ok(call(address, VOL, "org.lvmirror1.Volume", "Split", 2))
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, PYTHONPATH=ROOT)
    dest = tmp_path / "one.img"
    p = subprocess.Popen([sys.executable, "-c", _HELD_COPIER, str(dest)], env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "copying", p.stderr.read()
    partials = [n for n in os.listdir(tmp_path) if n.startswith("one.img.")]
    assert len(partials) == 1 and partials[0].endswith(".partial")
    assert partials[0] != "one.img.partial" and not dest.exists()
    assert os.stat(tmp_path / partials[0]).st_mode & 0o777 == 0o600
    owner = ("bus", ":1.4343")
    with pytest.raises(StateError, match="is the destination of the running backup of image 1"):
        d.begin_backup("vol0", 2, str(dest), owner)
    with pytest.raises(StateError, match="is the destination of the running backup"):
        d.backup("vol0", 2, str(dest))
    # the same file through a symlinked directory, or another spelling: the same destination
    os.symlink(tmp_path, tmp_path / "alias")
    for other in (tmp_path / "alias" / "one.img", f"{tmp_path}//./one.img"):
        with pytest.raises(StateError, match="is the destination of the running backup"):
            d.begin_backup("vol0", 2, str(other), owner)
    with pytest.raises(ConfigError, match="must be an absolute path"):
        d.begin_backup("vol0", 2, "relative.img", owner)     # lvmirrord's cwd is not theirs
    # and never into lvmirrord's state (a copy there replaced a volume.json: trial)
    with pytest.raises(ConfigError, match="is in lvmirror's state directory"):
        d.begin_backup("vol0", 2, os.path.join(d.state_dir, "vol0", "volume.json"), owner)
    with pytest.raises(ConfigError, match="is in lvmirror's state directory"):
        d.backup("vol0", 2, os.path.join(d.state_dir, "x.img"))
    out, err = p.communicate("\n", timeout=30)
    assert p.returncode == 0, err
    assert dest.read_bytes() == open(vol.images[1].path, "rb").read()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("one.img")) == ["one.img"]
    # lvmirrord's own Backup: a copy that fails leaves neither DEST nor its partial file
    import lvmirror.backup as backup_mod

    def failing(src, dst, progress, limit=None):
        open(dst, "wb").write(b"half")
        raise OSError(5, "read error (injected)")
    monkeypatch.setattr(backup_mod, "_copy_sparse", failing)
    with pytest.raises(OSError, match="injected"):
        d.backup("vol0", 2, str(tmp_path / "own.img"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("own.img")]
    monkeypatch.undo()
    assert d.backup("vol0", 2, str(tmp_path / "own.img")) == 4096
    assert not [n for n in os.listdir(tmp_path) if n.startswith("own.img.")]
    # a symlink as DEST: refused by the CLI and by lvmirrord, its target untouched
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    os.symlink(target, tmp_path / "link.img")
    r = subprocess.run([sys.executable, "-m", "lvmirror.cli", "backup", "vol0", "1",
                        str(tmp_path / "link.img")], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode != 0 and "not a regular file" in r.stderr, r.stderr
    # a copy that fails is named by DEST, not by its own file beside it
    r = subprocess.run([sys.executable, "-m", "lvmirror.cli", "backup", "vol0", "1",
                        "/proc/x.img"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "to /proc/x.img failed:" in r.stderr, r.stderr
    assert ".partial" not in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="not a regular file"):
        d.backup("vol0", 1, str(tmp_path / "link.img"))
    assert target.read_bytes() == b"keep" and os.path.islink(tmp_path / "link.img")
    assert d.resync("vol0", 1)["kind"] == "resync"


def test_a_backup_judges_its_copy_without_holding_up_other_jobs(daemon, tmp_path,  # noqa: F811
                                                                monkeypatch):
    """Trial 38, MEDIUM: a backup judged its image (``check_copy``, which may read a sample,
    each read bounded by ``leg_timeout``) under the lock every resync, restore and detach of
    the host takes, so they waited with it. It is judged before that lock now: a resync of
    another image runs to its start while the judgement is held; the backup then begins."""
    import threading
    d, vol, address, bus = daemon
    vol.write(0, [memoryview(b"p" * 4096)])
    ok(call(address, VOL, "org.lvmirror1.Volume", "Split", 1))
    ok(call(address, VOL, "org.lvmirror1.Volume", "Split", 2))
    judging, release = threading.Event(), threading.Event()
    real = vol.check_copy

    def held_check(index, *a, **kw):
        if index == 1:
            judging.set()
            assert release.wait(30)
        return real(index, *a, **kw)
    monkeypatch.setattr(vol, "check_copy", held_check)
    owner = ("bus", ":1.4545")
    began = []
    t = threading.Thread(target=lambda: began.append(
        d.begin_backup("vol0", 1, str(tmp_path / "b.img"), owner)))
    t.start()
    assert judging.wait(20)
    resynced = []
    r = threading.Thread(target=lambda: resynced.append(d.resync("vol0", 2)))
    r.start()
    r.join(20)
    release.set()
    t.join(20)
    assert not r.is_alive() and resynced[0]["kind"] == "resync", "the resync waited"
    assert began and began[0]["state"] == "split"
    with pytest.raises(StateError, match="being backed up"):
        d.resync("vol0", 1)
    d.end_backup("vol0", 1, owner, state="failed", error="test")


_CLI_COPIER = """
import sys, time
import lvmirror.backup as b
from lvmirror import cli

def slow(src, dest, progress, limit=None):
    open(dest, 'wb').write(b'half')
    print('copying', flush=True)
    time.sleep(60)
b._copy_sparse = slow
sys.exit(cli.main(['backup', 'vol0', '1', sys.argv[1]]))
"""


def test_a_backup_killed_with_sigterm_leaves_no_partial_copy(daemon, tmp_path):  # noqa: F811
    """Trial of 2026-12-06: ``kill`` or ``timeout`` (SIGTERM) of ``lvmirror backup`` left its
    partial copy, full size, which nothing removes. SIGTERM is handled as Ctrl-C now: the
    hold ends as failed, the partial copy is removed, the exit status is 130."""
    import signal
    from tests.unit.test_bus import ROOT
    from tests.unit.test_volume_helpers import wait_until
    d, vol, address, bus = daemon
    vol.write(0, [memoryview(b"p" * 4096)])
    ok(call(address, VOL, "org.lvmirror1.Volume", "Split", 1))
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, PYTHONPATH=ROOT)
    dest = tmp_path / "t.img"
    p = subprocess.Popen([sys.executable, "-c", _CLI_COPIER, str(dest)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "copying", p.stderr.read()
    assert [n for n in os.listdir(tmp_path) if n.startswith("t.img.")]
    p.send_signal(signal.SIGTERM)
    assert p.wait(20) == 130, p.stderr.read()
    assert not [n for n in os.listdir(tmp_path) if n.startswith("t.img")]
    wait_until(lambda: _backup_job(d, str(dest))["state"] == "failed", 20)
    assert "interrupted" in _backup_job(d, str(dest))["error"]
