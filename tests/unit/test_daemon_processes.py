"""lvmirrord with a process per volume (``--processes``): the real child processes
(``python -m lvmirror.daemon.volumeproc``) serve rings played by the ring emulator, whose
descriptors travel to them over the control socket, as a uio device's would be opened there."""

import errno
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from lvmirror.daemon import Lvmirrord
from lvmirror.daemon import volumeproc
from lvmirror.daemon.volumeproc import VolumeProcess, Zygote, _decode_error, _encode_error
from lvmirror.errors import (ConfigError, ImageIOError, LvmirrorError, StateError,
                             VolumeIOError)
from lvmirror.mirror.regionlock import LockCancelled
from lvmirror.scsi import parse_sense
from lvmirror.tcmu import uio
from lvmirror.tcmu.emulator import RingEmulator

from tests.unit.test_tcmu_uio_netlink import fake_device

BS = 512
SIZE = 8 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cdb10(op, lba, n):
    return bytes([op, 0]) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"


def wait_for(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def in_sync(d, name):
    vol = d.status()["volumes"].get(name)
    return vol is not None and all(i["state"] == "in-sync" for i in vol["images"]) \
        and not any(j["state"] == "running" for j in vol["jobs"])


@pytest.fixture(params=["zygote", "exec"])
def gw(request, tmp_path, monkeypatch):
    """An Lvmirrord with a process per volume, forked by a zygote as lvmirrord's start() makes
    one, or started as new Python processes; ``add(cfg)`` serves a new emulated device."""
    monkeypatch.setenv("PYTHONPATH", ROOT)
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False, processes=True,
                  log_level="warning")
    if request.param == "zygote":
        d._zygote = Zygote()
    emus = []

    def add(cfg, size=SIZE, cmdr_size=(64 << 10) - 128):
        k = len(emus)
        roots = fake_device(tmp_path / f"dev{k}", k, f"tcm-user/1/lun{k}/lvmirror/{cfg}",
                            info_size=size, serial=f"serial-{k}")
        (dev,) = uio.find_devices("lvmirror", **roots)
        emu = RingEmulator(cmdr_size=cmdr_size, data_size=4 << 20)
        emu.run_reaper()
        emus.append(emu)
        return emu, dev, d.add_lun(dev, handle=emu.handle())

    d.add = add
    yield d
    d.stop()
    for emu in emus:
        emu.close()
    if d._zygote is not None:
        pid = d._zygote.pid
        d._zygote.close()
        os.waitpid(pid, 0)


def write(emu, lba, data):
    (c,) = emu.wait([emu.submit(cdb10(0x2A, lba, len(data) // BS), data_out=data)]).values()
    assert c.status == 0, parse_sense(c.sense)
    return c


def read(emu, lba, n):
    (c,) = emu.wait([emu.submit(cdb10(0x28, lba, n), data_in_len=n * BS)]).values()
    assert c.status == 0, parse_sense(c.sense)
    return c.data_in


def test_each_volume_has_its_own_process_and_management_reaches_it(gw, tmp_path):
    a = [str(tmp_path / f"a{k}") for k in range(3)]
    b = [str(tmp_path / f"b{k}") for k in range(2)]
    emu_a, _, info_a = gw.add(f"va;images={'+'.join(a)}")
    emu_b, _, info_b = gw.add(f"vb;images={'+'.join(b)}")
    assert info_a["error"] is None and info_b["error"] is None
    wait_for(lambda: in_sync(gw, "va") and in_sync(gw, "vb"), what="initial sync")
    pids = {name: host.pid for name, host in gw._hosts.items()}
    assert set(pids) == {"va", "vb"} and len(set(pids.values())) == 2
    assert os.getpid() not in pids.values()
    assert gw.volume_names() == ["va", "vb"]
    st = gw.status()
    assert sorted(st["volumes"]) == ["va", "vb"] and len(st["luns"]) == 2

    write(emu_a, 0, b"1" * 4096)
    info = gw.split("va", 2)                       # through the control socket
    assert info["index"] == 2 and info["split_time"] > 0
    write(emu_a, 0, b"2" * 4096)
    gw._hosts["va"].call("status")                 # the child answers while serving
    with open(a[2], "rb") as f:
        assert f.read(4096) == b"1" * 4096         # the split image is frozen at T
    assert read(emu_a, 0, 8) == b"2" * 4096
    assert [i["state"] for i in gw.status()["volumes"]["va"]["images"]] == \
        ["in-sync", "in-sync", "split"]
    # errors keep their class across the process boundary (the D-Bus error name depends on it)
    with pytest.raises(StateError):
        gw.split("va", 2)
    with pytest.raises(ConfigError, match="no volume 'nope' is open"):
        gw.split("nope", 0)
    # an exported split image goes to its volume's process
    emu_x, _, info_x = gw.add("va;image=2;readonly=1")
    assert info_x["error"] is None and gw._hosts["va"].pid == pids["va"]
    assert read(emu_x, 0, 8) == b"1" * 4096
    assert gw.status()["volumes"]["va"]["exported"] == [2]
    job = gw.resync("vb", 1, full=True)
    assert job["kind"] == "resync"


def test_region_locks_through_the_volume_process(gw, tmp_path):
    imgs = [str(tmp_path / f"i{k}") for k in range(2)]
    emu, _, _ = gw.add(f"vl;images={'+'.join(imgs)}")
    wait_for(lambda: in_sync(gw, "vl"), what="initial sync")
    owner = ("bus", ":1.7")
    lid = gw.lock_region("vl", 0, 8, owner=owner)
    locks = gw.list_locks("vl")
    assert locks["external_lock_ids"] == [lid]
    assert [(h["lba"], h["count"], h["owner"]) for h in locks["holders"]] == \
        [(0, 8, "D-Bus :1.7")]
    # a write to the locked range waits for the holder; one elsewhere does not
    blocked = emu.submit(cdb10(0x2A, 0, 8), data_out=b"w" * 4096)
    write(emu, 64, b"v" * 4096)
    time.sleep(0.3)
    assert blocked not in emu.completions
    with pytest.raises(ConfigError):
        gw.unlock_region(lid, owner=("bus", ":1.8"))
    gw.unlock_region(lid, owner=owner)
    (c,) = emu.wait([blocked]).values()
    assert c.status == 0
    gw.lock_region("vl", 8, 8, owner=owner)
    assert gw.release_owner(owner) == 1
    assert gw.list_locks("vl")["holders"] == []


def test_a_killed_volume_process_is_restarted_and_loses_nothing(gw, tmp_path):
    imgs = [str(tmp_path / f"k{k}") for k in range(2)]
    emu, _, _ = gw.add(f"vk;images={'+'.join(imgs)}")
    wait_for(lambda: in_sync(gw, "vk"), what="initial sync")
    host = gw._hosts["vk"]
    old = host.pid
    acked = {}
    for k in range(32):
        data = bytes([k]) * 4096
        write(emu, k * 8, data)
        acked[k * 8] = data
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: host.pid != old and host._ready.is_set(), what="a new volume process")
    assert host.restarts == 1
    wait_for(lambda: "vk" in gw.status()["volumes"], what="the volume served again")
    for lba, data in acked.items():                 # every acknowledged write is there
        assert read(emu, lba, 8) == data
    write(emu, 512, b"n" * 4096)                     # and the LUN serves new I/O
    assert read(emu, 512, 8) == b"n" * 4096


def test_the_last_lun_ends_its_process(gw, tmp_path):
    imgs = [str(tmp_path / f"e{k}") for k in range(2)]
    emu, dev, _ = gw.add(f"ve;images={'+'.join(imgs)}")
    proc = gw._hosts["ve"]._proc
    write(emu, 0, b"x" * 4096)
    gw.remove_lun(dev.uio_name)
    assert proc.wait(30) == (None if gw._zygote else 0)     # a zygote's child: it reaps it
    assert "ve" not in gw._hosts and gw.volume_names() == []
    with open(imgs[0], "rb") as f0, open(imgs[1], "rb") as f1:
        assert f0.read(4096) == f1.read(4096) == b"x" * 4096


def test_a_cfgstring_that_does_not_parse_gets_a_not_ready_lun(gw):
    emu, dev, info = gw.add("bad;bogus=1")
    assert "bogus" in info["error"]
    (c,) = emu.wait([emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)]).values()
    assert c.status == 2 and parse_sense(c.sense)[0] == 0x2      # NOT READY


def test_the_child_dies_at_once_when_lvmirrord_goes_away(tmp_path):
    parent, child = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "lvmirror.daemon.volumeproc", "--fd",
                             str(child.fileno()), "--volume", "v", "--state-dir",
                             str(tmp_path)], pass_fds=(child.fileno(),), env=env)
    child.close()
    parent.close()          # as if lvmirrord were SIGKILLed (no death signal: not set here)
    assert proc.wait(30) == -signal.SIGKILL


@pytest.mark.parametrize("how", ["exec", "zygote"])
def test_a_sigkill_of_lvmirrord_kills_its_volume_processes(tmp_path, how):
    """The whole data path crashes with lvmirrord (no child left draining a ring that the next
    lvmirrord resets), even when the child was started from a thread that has ended since:
    the child dies of SIGKILL, not of its own accord once its socket closes."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    code = ("import sys, threading\n"
            "from lvmirror.daemon.volumeproc import VolumeProcess, Zygote\n"
            f"z = Zygote() if {how == 'zygote'} else None\n"
            f"vp = VolumeProcess('v', state_dir={str(tmp_path)!r}, zygote=z)\n"
            "t = threading.Thread(target=vp.start); t.start(); t.join()\n"
            "vp.call('volume_names')\n"      # the child answers: its death signal is set
            "print(vp.pid, flush=True)\n"
            "threading.Event().wait()\n")
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0   # orphans come to us
    try:
        parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        # the orphans come to us as they are reparented; a zygote's child that died before
        # the zygote was reaped by it: then it is simply gone
        statuses, deadline = {}, time.monotonic() + 30
        while child not in statuses and time.monotonic() < deadline:
            try:
                pid, st = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid:
                statuses[pid] = st
            elif how == "zygote" and not os.path.exists(f"/proc/{child}"):
                break
            else:
                time.sleep(0.02)
        assert child in statuses or not os.path.exists(f"/proc/{child}")
        status = statuses.get(child)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    if status is not None:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_many_laps_of_a_small_ring_at_queue_depth_16(gw, tmp_path):
    """The ring's two sides in two processes on two cores, as with the kernel: each side's
    index must be published with one store (a struct.pack_into zeroes the field first, and the
    other side once read that 0 and walked a lap of stale entries)."""
    imgs = [str(tmp_path / f"q{k}") for k in range(2)]
    emu, _, _ = gw.add(f"vq;images={'+'.join(imgs)}", cmdr_size=(8 << 10) - 128)
    wait_for(lambda: in_sync(gw, "vq"), what="initial sync")
    inflight, done, sent = set(), 0, 0
    total = 4000                                 # about 60 laps of the ring
    while done < total:
        while len(inflight) < 16 and sent < total:
            inflight.add(emu.submit(cdb10(0x2A, (sent % 1000) * 8, 8),
                                    data_out=bytes([sent % 251]) * 4096))
            sent += 1
        got = emu.wait_any(inflight, timeout=30)
        done += len(got)
        inflight -= got
    assert not emu.warnings
    assert len(emu.completions) == total
    assert all(c.status == 0 for c in emu.completions.values())
    lun = gw.status()["luns"][0]
    assert lun["commands"] == total and lun["error"] is None
    # the volume process's ring threads' waits for the GIL, across the process boundary
    # (a mirror's WRITEs are not made under the ring thread's lease: none counted after I/O)
    g = lun["ring_gil_waits"]
    assert len(g["after_io"]["counts"]) == len(g["after_poll"]["counts"]) == len(g["edges"]) + 1
    assert g["after_io"]["seconds"] >= 0 and g["after_poll"]["longest"] >= 0


@pytest.mark.parametrize("exc", [
    TimeoutError("region lock 'v': exclusive [0, +8) not granted within 0.2 s"),
    TimeoutError(errno.ETIMEDOUT, "Connection timed out"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/no/such/image"),
    ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    OSError(errno.EIO, "Input/output error"),
    ValueError("lock range count must be >= 1, got 0"),
    LockCancelled("region lock 'v' [0, +8) for owner ('bus', ':1.9') cancelled: owner released"),
    ConfigError("no volume 'x' is open"),
    StateError("image 2 is split"),
], ids=lambda e: type(e).__name__)
def test_an_error_keeps_its_class_and_message_across_the_process_boundary(exc):
    got = _decode_error(*pickle.loads(pickle.dumps(_encode_error(exc))))
    assert type(got) is type(exc)
    assert str(got) == str(exc)
    if isinstance(exc, OSError):
        assert (got.errno, got.strerror, got.filename) == (exc.errno, exc.strerror, exc.filename)


def test_a_volume_io_error_keeps_its_class_and_sense_across_the_process_boundary():
    """A VolumeIOError (MEDIUM ERROR, its is_read picking the sense; out_of_space: DATA
    PROTECT) raised in a volume's process is the same error in lvmirrord: before, its
    keyword-only arguments failed the rebuild and it became an LvmirrorError whose message
    began "VolumeIOError: " (trial 25)."""
    for exc in (VolumeIOError("volume v: flush failed on every in-sync image", is_read=False),
                VolumeIOError("volume v: region 3 cannot be read", is_read=True),
                VolumeIOError("volume v: no room", is_read=False, out_of_space=True)):
        got = _decode_error(*pickle.loads(pickle.dumps(_encode_error(exc))))
        assert type(got) is VolumeIOError and str(got) == str(exc)
        assert (got.is_read, got.out_of_space) == (exc.is_read, exc.out_of_space)


@pytest.mark.parametrize("exc", [json.JSONDecodeError("Expecting value", "x", 0),
                                 ImageIOError(1, errno.EIO, "image 1: read failed")],
                         ids=lambda e: type(e).__name__)
def test_an_error_that_cannot_keep_its_class_becomes_an_lvmirror_error_naming_it(exc):
    got = _decode_error(*pickle.loads(pickle.dumps(_encode_error(exc))))
    assert type(got) is LvmirrorError
    assert str(got) == f"{type(exc).__name__}: {exc}"


@pytest.mark.parametrize("gw", ["zygote"], indirect=True)
def test_region_lock_timeouts_and_cancels_keep_their_class(gw, tmp_path):
    """A lock_region that times out raises TimeoutError, one whose owner leaves the bus while
    it waits LockCancelled, in lvmirrord as in the volume's process."""
    imgs = [str(tmp_path / f"t{k}") for k in range(2)]
    gw.add(f"vt;images={'+'.join(imgs)}")
    gw.lock_region("vt", 0, 8, owner=("bus", ":1.1"))
    with pytest.raises(TimeoutError, match=r"not granted within 0.2 s"):
        gw.lock_region("vt", 0, 8, timeout=0.2, owner=("bus", ":1.2"))
    got = []

    def wait_for_lock():
        try:
            gw.lock_region("vt", 4, 8, owner=("bus", ":1.3"))
        except Exception as exc:
            got.append(exc)
    t = threading.Thread(target=wait_for_lock)
    t.start()
    wait_for(lambda: gw.list_locks("vt")["waiters"], what="the request waiting")
    gw.release_owner(("bus", ":1.3"))
    t.join(30)
    assert not t.is_alive()
    assert len(got) == 1 and type(got[0]) is LockCancelled, got


def test_a_dead_zygote_leaves_volume_processes_to_start_as_new_pythons(tmp_path, monkeypatch,
                                                                        caplog):
    """A zygote that died (its children die with it) fails its spawns with ECHILD; the volume
    processes are started the slow way from then on, and that is logged once."""
    monkeypatch.setenv("PYTHONPATH", ROOT)
    z = Zygote()
    os.kill(z.pid, signal.SIGKILL)
    os.waitpid(z.pid, 0)
    a, b = socket.socketpair()
    with caplog.at_level("ERROR", logger="lvmirrord"):
        try:
            for _ in range(2):
                with pytest.raises(OSError) as ei:
                    z.spawn(b.fileno(), str(tmp_path), workers=1, inline_reads=True)
                assert ei.value.errno == errno.ECHILD
            assert not z.alive
        finally:
            a.close()
            b.close()
        vps = []
        try:
            for k in range(2):
                vp = VolumeProcess(f"v{k}", state_dir=str(tmp_path / "state"), zygote=z)
                vp.start()
                vps.append(vp)
                assert isinstance(vp._proc, subprocess.Popen)     # python -m ...volumeproc
                assert vp.call("volume_names") == []
        finally:
            for vp in vps:
                vp.stop()
            z.close()
    gone = [r for r in caplog.records if "zygote" in r.getMessage()]
    assert len(gone) == 1 and "gone" in gone[0].getMessage()


def restart_threads(host):
    """The threads of ``host`` (a VolumeProcess) still alive: its readers, which restart it."""
    return [t for t in threading.enumerate() if t.name == f"volproc-{host.key}" and t.is_alive()]


def kill_into_backoff(host, monkeypatch):
    """SIGKILL ``host``'s child with a 60-second restart backoff ahead (a restart that is not
    its first); returns the dead child's pid once lvmirrord has seen it end."""
    monkeypatch.setattr(volumeproc, "RESTART_BACKOFF", (60.0, 60.0))
    host.restarts = 1
    old = host.pid
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not host._ready.is_set(), what="the child seen dead")
    return old


@pytest.mark.parametrize("gw", ["zygote"], indirect=True)
def test_a_stop_during_a_restart_backoff_ends_it_and_starts_nothing(gw, tmp_path, monkeypatch):
    imgs = [str(tmp_path / f"s{k}") for k in range(2)]
    gw.add(f"vs;images={'+'.join(imgs)}")
    host = gw._hosts["vs"]
    old = kill_into_backoff(host, monkeypatch)
    host.stop()                                  # no error, and the backoff ends with it
    deadline = time.monotonic() + 10
    for t in restart_threads(host):
        t.join(max(0.0, deadline - time.monotonic()))
    assert not restart_threads(host), "the restart still waits after stop()"
    assert host.pid == old and host.restarts == 1          # no child was started
    with pytest.raises(StateError, match="was stopped"):
        host.call("status")


@pytest.mark.parametrize("gw", ["zygote", "exec"], indirect=True)
def test_a_child_started_as_stop_comes_is_stopped(gw, tmp_path, monkeypatch):
    imgs = [str(tmp_path / f"r{k}") for k in range(2)]
    gw.add(f"vr;images={'+'.join(imgs)}")
    host = gw._hosts["vr"]
    entered, release = hold_restart(host, monkeypatch)
    old = host.pid
    os.kill(old, signal.SIGKILL)
    assert entered.wait(30), "no restart"
    stopper = threading.Thread(target=host.stop)
    stopper.start()
    wait_for(lambda: host._stopping, what="stop() begun")
    release.set()                                # the restart's child starts now
    stopper.join(60)
    assert not stopper.is_alive()
    wait_for(lambda: not restart_threads(host), what="the restart over")
    assert host.pid != old and host.restarts == 1          # a child was started...
    wait_for(lambda: volumeproc._pid_gone(host.pid), what="that child ended")     # ...and stopped


def test_lvmirrord_stops_every_volume_while_one_waits_to_restart(gw, tmp_path, monkeypatch):
    """A volume process waiting to restart (its LUN cannot be removed through it) does not keep
    lvmirrord's stop from stopping the other volumes cleanly, nor is it restarted after."""
    a = [str(tmp_path / f"a{k}") for k in range(2)]
    b = [str(tmp_path / f"b{k}") for k in range(2)]
    gw.add(f"va;images={'+'.join(a)}")
    gw.add(f"vb;images={'+'.join(b)}")
    wait_for(lambda: in_sync(gw, "va") and in_sync(gw, "vb"), what="initial sync")
    host_a, host_b = gw._hosts["va"], gw._hosts["vb"]
    proc_b = host_b._proc
    old = kill_into_backoff(host_a, monkeypatch)
    gw.stop()
    proc_b.wait(30)
    with open(os.path.join(gw.state_dir, "vb", "volume.json")) as f:
        assert json.load(f)["clean_shutdown"] is True
    wait_for(lambda: not restart_threads(host_a), timeout=10, what="va's restart given up")
    assert host_a.pid == old and gw._hosts == {}


@pytest.mark.parametrize("gw", ["zygote"], indirect=True)
def test_a_hung_volume_process_does_not_hold_up_status(gw, tmp_path, monkeypatch):
    """A child that does not answer (SIGSTOP: hung) is left out of status() after the read-only
    calls' bounded wait, instead of blocking it for ever; once it answers again, it is back."""
    monkeypatch.setattr(volumeproc, "CALL_TIMEOUT", 0.5)
    a = [str(tmp_path / f"a{k}") for k in range(2)]
    b = [str(tmp_path / f"b{k}") for k in range(2)]
    gw.add(f"va;images={'+'.join(a)}")
    gw.add(f"vb;images={'+'.join(b)}")
    host = gw._hosts["va"]
    got = []
    os.kill(host.pid, signal.SIGSTOP)
    try:
        t = threading.Thread(target=lambda: got.append(gw.status()))
        t.start()
        t.join(30)
        assert not t.is_alive(), "status() waits for a hung volume process"
        assert sorted(got[0]["volumes"]) == ["vb"]
        with pytest.raises(StateError, match="volume va does not answer"):
            host.list_locks("va")
        assert host._pending == {}               # the calls that timed out are forgotten
    finally:
        os.kill(host.pid, signal.SIGCONT)
        t.join(30)
    wait_for(lambda: sorted(gw.status()["volumes"]) == ["va", "vb"], what="va answering again")


def hold_restart(host, monkeypatch):
    """Make ``host``'s next start wait: returns (entered, release) events."""
    entered, release = threading.Event(), threading.Event()
    real_start = host.start

    def held_start():
        entered.set()
        release.wait(30)
        real_start()
    monkeypatch.setattr(host, "start", held_start)
    return entered, release


@pytest.mark.parametrize("gw", ["zygote"], indirect=True)
def test_a_lun_added_while_its_volume_process_restarts_is_served_by_the_new_one(
        gw, tmp_path, monkeypatch):
    imgs = [str(tmp_path / f"n{k}") for k in range(2)]
    emu, _, _ = gw.add(f"vn;images={'+'.join(imgs)}")
    wait_for(lambda: in_sync(gw, "vn"), what="initial sync")
    write(emu, 0, b"1" * 4096)
    gw.split("vn", 1)
    write(emu, 0, b"2" * 4096)
    host = gw._hosts["vn"]
    entered, release = hold_restart(host, monkeypatch)
    old = host.pid
    os.kill(old, signal.SIGKILL)
    assert entered.wait(30), "no restart"
    emu_x, dev_x, info_x = gw.add("vn;image=1;readonly=1")     # no child runs now
    assert info_x == {"name": dev_x.dev_name, "uio": dev_x.uio_name, "error": None}
    assert gw.serves(dev_x.uio_name) and host.restarting
    release.set()
    wait_for(lambda: not host.restarting, what="the restart's pickup")
    assert host.pid != old
    assert sorted(lun["uio"] for lun in gw.status()["luns"]) == ["uio0", "uio1"]
    assert read(emu_x, 0, 8) == b"1" * 4096          # the split image, served by the new child
    assert read(emu, 0, 8) == b"2" * 4096


@pytest.mark.parametrize("gw", ["zygote"], indirect=True)
def test_a_lun_added_while_the_restart_picks_up_is_served_too(gw, tmp_path, monkeypatch):
    imgs = [str(tmp_path / f"p{k}") for k in range(2)]
    emu, _, _ = gw.add(f"vp;images={'+'.join(imgs)}")
    wait_for(lambda: in_sync(gw, "vp"), what="initial sync")
    write(emu, 0, b"1" * 4096)
    gw.split("vp", 1)
    host = gw._hosts["vp"]
    entered, release = threading.Event(), threading.Event()
    real_add = host._add

    def held_add(device, *, pickup, handle):
        if pickup and not entered.is_set():          # the restart's first pickup waits
            entered.set()
            release.wait(30)
        return real_add(device, pickup=pickup, handle=handle)
    monkeypatch.setattr(host, "_add", held_add)
    os.kill(host.pid, signal.SIGKILL)
    assert entered.wait(30), "no pickup"
    added = []
    t = threading.Thread(target=lambda: added.append(gw.add("vp;image=1;readonly=1")))
    t.start()
    release.set()
    t.join(30)
    assert not t.is_alive() and added[0][2]["error"] is None
    wait_for(lambda: not host.restarting, what="the restart's pickup")
    assert len(gw.status()["luns"]) == 2
    assert read(added[0][0], 0, 8) == b"1" * 4096


class RecordedNetlink:
    """Stands in for lvmirrord's TCM-USER socket in the ``_on_event`` tests: ``replies`` holds
    each answer sent, (event, status)."""

    def __init__(self):
        self.replies = []

    def reply(self, event, status):
        self.replies.append((event, status))

    def stop(self):
        pass


def test_a_lun_event_failing_with_any_lvmirror_error_is_answered(tmp_path, monkeypatch, caplog):
    """An error of the volume's host (a StateError...) is logged and answered with an error
    status, not left to escape the netlink thread with the kernel's configfs write waiting."""
    from lvmirror.tcmu import netlink
    roots = fake_device(tmp_path / "dev", 3, "tcm-user/1/lun3/lvmirror/v")
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False, **roots)
    d._netlink = RecordedNetlink()
    replies = d._netlink.replies

    def add_lun(device, **_):
        raise StateError("the process serving volume v cannot be started")
    monkeypatch.setattr(d, "add_lun", add_lun)
    event = netlink.DeviceAdded(3, "tcm-user/1/lun3/lvmirror/v", 7)
    with caplog.at_level("ERROR", logger="lvmirrord"):
        d._on_event(event)
    assert replies == [(event, -errno.EIO)]
    assert "cannot be started" in caplog.text


@pytest.mark.parametrize("processes", [False, True])
def test_a_device_named_in_bytes_that_are_not_utf8_is_answered_and_shown(
        tmp_path, monkeypatch, processes):
    """configfs takes a backstore name and cfgstring as any bytes. Such a device's ADDED event
    used to go unanswered (UnicodeDecodeError in the netlink thread; the kernel's configfs
    ``enable`` write waits for the answer) and every other device's event with it. Now the
    event is answered (the cfgstring is refused: -EINVAL, the LUN answers NOT READY with the
    parser's message), the other device is served, and status - D-Bus, the CLI and the
    metrics carry only UTF-8 - shows the odd bytes as \\xNN."""
    from lvmirror.tcmu import netlink
    monkeypatch.setenv("PYTHONPATH", ROOT)
    img = tmp_path / "good.img"
    roots = fake_device(tmp_path / "dev", 3, f"tcm-user/1/lun3/lvmirror/v3;images={img}",
                        info_size=SIZE)
    fake_device(tmp_path / "dev", 5, "tcm-user/1/lun\udcff5/lvmirror/v\udcfe;image=/x",
                info_size=SIZE)
    fake_device(tmp_path / "dev", 7, f"tcm-user/1/lun\udcff7/lvmirror/v3;images={img}",
                info_size=SIZE)
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False, processes=processes,
                  log_level="warning", **roots)
    emus = {}
    d._netlink = RecordedNetlink()
    real_add = d.add_lun

    def add_lun(device, **kw):           # the emulator plays each device's ring
        emus[device.minor] = emu = RingEmulator(cmdr_size=(64 << 10) - 128,
                                                data_size=4 << 20)
        emu.run_reaper()
        return real_add(device, handle=emu.handle(), **kw)
    monkeypatch.setattr(d, "add_lun", add_lun)
    try:
        d._on_event(netlink.DeviceAdded(5, "tcm-user/1/lun\udcff5/lvmirror/v\udcfe;image=/x",
                                        11))
        # a LUN named in such bytes with a good cfgstring serves; another on its volume is
        # refused naming it as \xNN
        d._on_event(netlink.DeviceAdded(7, f"tcm-user/1/lun\udcff7/lvmirror/v3;images={img}",
                                        13))
        d._on_event(netlink.DeviceAdded(3, f"tcm-user/1/lun3/lvmirror/v3;images={img}", 12))
        assert [(event.minor, status) for event, status in d._netlink.replies] == \
            [(5, -errno.EINVAL), (7, 0), (3, -errno.EINVAL)]
        (c,) = emus[5].wait([emus[5].submit(bytes(6))]).values()      # TEST UNIT READY
        assert parse_sense(c.sense)[0] == 2                             # NOT READY
        write(emus[7], 0, b"3" * BS)
        status = d.status()
        text = json.dumps(status, ensure_ascii=False)
        text.encode("utf-8")                                            # no lone surrogate
        luns = {lun["uio"]: lun for lun in status["luns"]}
        assert luns["uio5"]["name"] == "lun\\xff5"
        assert luns["uio5"]["cfgstring"] == "v\\xfe;image=/x"
        assert luns["uio5"]["error"].startswith(
            "cfgstring 'v\\xfe;image=/x': holds bytes that are not UTF-8")
        assert luns["uio7"]["error"] is None and luns["uio7"]["volume"] == "v3"
        assert luns["uio7"]["name"] == "lun\\xff7"
        assert "'v3' is already served by LUN 'lun\\xff7'" in luns["uio3"]["error"]
    finally:
        d.stop()
        for emu in emus.values():
            emu.close()


def test_a_lun_event_whose_device_cannot_be_read_is_answered(tmp_path, monkeypatch):
    """sysfs cannot be read for the event's device (EIO): a device of ours gets an error
    answer (the kernel may wait for one), another handler's device none."""
    from lvmirror.tcmu import netlink, uio
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
    d._netlink = RecordedNetlink()
    replies = d._netlink.replies

    def unreadable(minor, **_):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(uio, "device_by_minor", unreadable)
    ours = netlink.DeviceAdded(3, "tcm-user/1/lun3/lvmirror/v", 7)
    d._on_event(ours)
    d._on_event(netlink.DeviceAdded(4, None, 8))        # no subtype named: maybe not ours
    assert replies == [(ours, -errno.EIO)]


def test_events_of_ours_for_a_device_gone_or_not_served_are_answered(tmp_path):
    """The device of an ADDED event of ours is not in sysfs when lvmirrord looks (deleted at
    once): the kernel may be waiting for the answer, so it gets -ENODEV (it got none); an
    event naming no subtype gets none (it may be another handler's)."""
    from lvmirror.tcmu import netlink
    roots = fake_device(tmp_path / "dev", 3, "tcm-user/1/lun3/qcow//a.qcow2")
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False, **roots)
    d._netlink = RecordedNetlink()
    replies = d._netlink.replies
    ours = netlink.DeviceAdded(6, "tcm-user/1/lun6/lvmirror/v", 7)
    d._on_event(ours)
    d._on_event(netlink.DeviceAdded(7, None, 8))
    d._on_event(netlink.DeviceAdded(3, "tcm-user/1/lun3/qcow//a.qcow2", 9))
    # a REMOVED of ours that is not served (its pick-up failed): nothing to stop, answered 0
    removed = netlink.DeviceRemoved(6, "tcm-user/1/lun6/lvmirror/v", 7)
    d._on_event(removed)
    d._on_event(netlink.DeviceRemoved(3, "tcm-user/1/lun3/qcow//a.qcow2", 9))
    assert replies == [(ours, -errno.ENODEV), (removed, 0)]


def test_pid_gone_reads_a_process_whose_name_is_not_utf8():
    """/proc/PID/stat names the process as bytes (any, cut at 15): a name that is not UTF-8
    made ``_pid_gone`` raise UnicodeDecodeError (a trial), so a volume process's stop could
    fail when its pid was taken by such a process."""
    code = ("import ctypes,sys,time; "          # PR_SET_NAME (15)
            "ctypes.CDLL(None).prctl(15, b'\\xe3\\x83\\x87\\xff', 0, 0, 0); "
            "print(1, flush=True); time.sleep(30)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()
        with open(f"/proc/{proc.pid}/stat", "rb") as f:
            assert b"(\xe3\x83\x87\xff)" in f.read()
        assert volumeproc._pid_gone(proc.pid) is False
    finally:
        proc.kill()
        proc.wait()
    assert volumeproc._pid_gone(proc.pid) is True


def test_a_process_whose_leader_exited_has_not_ended_while_another_thread_runs():
    """The leader thread exits (SYS_exit) while another thread runs on, as a worker blocked in
    a write to a device that stopped answering outlives a SIGKILL of its process: the leader
    is a zombie, but the process has not ended, so lvmirrord must not start the next process
    for the volume yet (a trial found ``_pid_gone`` reading the leader's state alone). Once
    that thread ends, the process has."""
    code = ("import ctypes, os, threading, time\n"
            "def worker():\n"
            "    os.read(0, 1)\n"               # held until the test writes a byte
            "    os._exit(0)\n"
            "threading.Thread(target=worker).start()\n"
            "print(1, flush=True)\n"
            "ctypes.CDLL(None).syscall(60, 0)\n")   # SYS_exit: the leader thread alone
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()

        def leader_state():
            with open(f"/proc/{proc.pid}/stat", "rb") as f:
                return f.read().rsplit(b")", 1)[1].split()[0]
        wait_for(lambda: leader_state() == b"Z", what="the leader thread's exit")
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 2
        assert volumeproc._pid_gone(proc.pid) is False
        proc.stdin.write(b"x")
        proc.stdin.flush()
        wait_for(lambda: volumeproc._pid_gone(proc.pid), what="the process's end")
    finally:
        proc.kill()
        proc.wait()


def test_a_removed_event_while_the_pickup_adds_the_device_removes_what_it_adds(
        tmp_path, monkeypatch):
    """A REMOVED of ours for a device lvmirrord's start-up pick-up is still adding (a lease
    wait, a slow open; the netlink thread already runs) waits for that add and removes the
    LUN; answered 0 at once (a first version), the add then left it served on a device the
    kernel had destroyed, its volume held (a trial)."""
    from lvmirror.tcmu import netlink
    roots = fake_device(tmp_path / "dev", 3, "tcm-user/1/lun3/lvmirror/v;images=/x")
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False, **roots)
    d._netlink = RecordedNetlink()
    entered, release, removed_names = threading.Event(), threading.Event(), []

    def slow_add_lun(device, **_):
        entered.set()
        release.wait(10)
        return {"name": device.dev_name, "uio": device.uio_name, "error": None}
    monkeypatch.setattr(d._local, "add_lun", slow_add_lun)
    monkeypatch.setattr(d._local, "remove_lun", removed_names.append)
    pickup = threading.Thread(target=d._pick_up)
    pickup.start()
    assert entered.wait(10)
    removed = netlink.DeviceRemoved(3, "tcm-user/1/lun3/lvmirror/v;images=/x", 42)
    answer = threading.Thread(target=d._on_event, args=(removed,))
    answer.start()
    time.sleep(0.2)
    assert d._netlink.replies == []            # waits for the add...
    release.set()
    pickup.join(10)
    answer.join(10)
    assert d._netlink.replies == [(removed, 0)] and removed_names == ["uio3"]
    assert not d.serves("uio3")                # ...and removes what it added


@pytest.mark.parametrize("gw", ["zygote"], indirect=True)
def test_removing_the_last_lun_during_a_restart_backoff_ends_the_volume_process(
        gw, tmp_path, monkeypatch):
    imgs = [str(tmp_path / f"z{k}") for k in range(2)]
    _, dev, _ = gw.add(f"vz;images={'+'.join(imgs)}")
    host = gw._hosts["vz"]
    old = kill_into_backoff(host, monkeypatch)
    gw.remove_lun(dev.uio_name)
    assert not gw.serves(dev.uio_name) and "vz" not in gw._hosts
    wait_for(lambda: not restart_threads(host), timeout=10, what="the restart given up")
    assert host.pid == old and host.restarts == 1 and not host.serves()


@pytest.mark.parametrize("gw", ["zygote"], indirect=True)
def test_a_lock_id_from_before_a_restart_does_not_release_a_lock_taken_after(
        gw, tmp_path, monkeypatch):
    """The restarted child numbers its locks from 1 again: unlocking a lock the dead child
    granted says it was lost, and leaves the lock the new child granted (same owner) held."""
    imgs = [str(tmp_path / f"l{k}") for k in range(2)]
    gw.add(f"vl;images={'+'.join(imgs)}")
    wait_for(lambda: in_sync(gw, "vl"), what="initial sync")
    owner = ("bus", ":1.7")
    before = gw.lock_region("vl", 0, 8, owner=owner)
    host = gw._hosts["vl"]
    old = host.pid
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: host.pid != old and not host.restarting, what="the restart")
    wait_for(lambda: "vl" in gw.status()["volumes"], what="the volume served again")
    after = gw.lock_region("vl", 64, 8, owner=owner)
    assert after != before
    locks = gw.list_locks("vl")
    assert locks["external_lock_ids"] == [after]
    with pytest.raises(ConfigError, match="lost when the volume's process restarted"):
        gw.unlock_region(before, owner=owner)
    locks = gw.list_locks("vl")
    assert [(h["lba"], h["count"], h["owner"]) for h in locks["holders"]] == \
        [(64, 8, "D-Bus :1.7")]
    assert locks["external_lock_ids"] == [after]
    with pytest.raises(ConfigError, match=f"no lock {before} held"):
        gw.unlock_region(before, owner=owner)    # forgotten
    gw.unlock_region(after, owner=owner)
    assert gw.list_locks("vl")["holders"] == []


def test_region_locks_of_one_process_lvmirrord(tmp_path):
    """With --no-processes the ids are the VolumeHost's own and work the same way."""
    imgs = [str(tmp_path / f"o{k}") for k in range(2)]
    roots = fake_device(tmp_path / "dev", 0,
                        f"tcm-user/1/lun0/lvmirror/vo;images={'+'.join(imgs)}", info_size=SIZE)
    (dev,) = uio.find_devices("lvmirror", **roots)
    emu = RingEmulator(cmdr_size=(64 << 10) - 128, data_size=4 << 20)
    emu.run_reaper()
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False, **roots)
    try:
        assert d.add_lun(dev, handle=emu.handle())["error"] is None
        wait_for(lambda: in_sync(d, "vo"), what="initial sync")
        owner = ("bus", ":1.5")
        lid = d.lock_region("vo", 0, 8, owner=owner)
        assert d.list_locks("vo")["external_lock_ids"] == [lid]
        with pytest.raises(ConfigError):
            d.unlock_region(lid, owner=("bus", ":1.6"))
        d.unlock_region(lid, owner=owner)
        assert d.list_locks("vo") == {"holders": [], "waiters": [], "external_lock_ids": []}
    finally:
        d.stop()
        emu.close()


# -- the threads a volume process runs lvmirrord's calls on ------------------------------------
def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_call_threads_reuse_a_waiting_thread():
    """Calls that come one after another (status, once a second) run on one thread: no thread
    is started per call, and each call runs exactly once."""
    pool = volumeproc.CallThreads("t", idle_timeout=30.0)
    names = []
    for k in range(20):
        done = threading.Event()
        pool.post(lambda k=k, done=done: (names.append((k, threading.current_thread().name)),
                                          done.set()))
        assert done.wait(10)
        _until(lambda: pool._waiting == 1)      # back to waiting before the next call
    assert [k for k, _ in names] == list(range(20))
    assert pool.started == 1 and len({n for _, n in names}) == 1


def test_call_threads_run_blocking_calls_side_by_side():
    """A call that blocks (a ``wait`` for a resync) holds up no other: three calls blocked at
    once each have a thread of their own, and the one that unblocks them runs beside them."""
    pool = volumeproc.CallThreads("t", idle_timeout=30.0)
    gate = threading.Event()
    inside = threading.Semaphore(0)
    for _ in range(3):
        pool.post(lambda: (inside.release(), gate.wait(10)))
    for _ in range(3):
        assert inside.acquire(timeout=10)
    pool.post(gate.set)
    assert gate.wait(10)
    assert pool.started == 4
    _until(lambda: pool._waiting == 4)
    for _ in range(4):                           # four waiting threads take four calls
        pool.post(inside.release)
    for _ in range(4):
        assert inside.acquire(timeout=10)
    assert pool.started == 4


def test_call_threads_end_when_idle_and_start_again(caplog):
    """A thread with no call for idle_timeout seconds ends; a later call starts a new one. A
    call that raises is logged and its thread goes on taking calls."""
    pool = volumeproc.CallThreads("idle-test", idle_timeout=0.2)
    done = threading.Event()

    def boom():
        raise RuntimeError("broken call")
    pool.post(boom)
    pool.post(done.set)
    assert done.wait(10)
    mine = lambda: [t for t in threading.enumerate() if t.name.startswith("idle-test-")]  # noqa
    _until(lambda: not mine() and pool._waiting == 0)
    assert any("broken call" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    started = pool.started
    done.clear()
    pool.post(done.set)
    assert done.wait(10)
    assert pool.started == started + 1


def test_a_call_queued_as_a_thread_times_out_is_still_run():
    """The race the idle timeout has: a call is queued for a waiting thread just as that
    thread's wait times out. The timed-out thread takes it (or another waiting one does):
    every call runs, and the count of waiting threads stays true (here: one thread, which
    takes the next call with no new thread)."""
    import queue as queue_mod
    pool = volumeproc.CallThreads("race", idle_timeout=30.0)
    timed_out, go_on, armed = threading.Event(), threading.Event(), threading.Event()

    class Queue(queue_mod.Queue):
        def get(self, block=True, timeout=None):
            if armed.is_set() and not timed_out.is_set():   # this wait times out ...
                timed_out.set()
                assert go_on.wait(10)     # ... and a call is queued before it takes the mutex
                raise queue_mod.Empty
            return super().get(block, timeout)
    pool._q = Queue()
    first = threading.Event()
    pool.post(first.set)
    assert first.wait(10)
    _until(lambda: pool._waiting == 1)
    armed.set()
    woke = threading.Event()
    pool.post(woke.set)                 # the thread runs it; its next wait is the one that fails
    assert woke.wait(10) and timed_out.wait(10)
    ran = threading.Event()
    pool.post(ran.set)                  # counted against the waiting thread (no new one)
    go_on.set()
    assert ran.wait(10)
    _until(lambda: pool._waiting == 1)
    assert pool.started == 1


def test_a_call_no_thread_can_be_started_for_is_refused_and_never_runs(monkeypatch):
    """No thread waits and none can be started: ``post`` raises RuntimeError, the call is not
    queued (it never runs) and the count stays true - the next call, with threads to be had
    again, runs on a new thread, alone (a queued orphan would have run there too, and a count
    left one too high would have handed the next call to no thread at all)."""
    pool = volumeproc.CallThreads("nostart", idle_timeout=30.0)
    real_start = threading.Thread.start

    def refuse(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", refuse)
    ran = []
    with pytest.raises(RuntimeError):
        pool.post(ran.append, "refused")
    assert pool.started == 0 and pool._waiting == 0
    monkeypatch.setattr(threading.Thread, "start", real_start)
    done = threading.Event()
    pool.post(lambda: (ran.append("next"), done.set()))
    assert done.wait(10)
    _until(lambda: pool._waiting == 1)
    time.sleep(0.1)
    assert ran == ["next"] and pool.started == 1
