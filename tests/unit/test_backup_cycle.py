"""The backup cycle (``lvmirror backup-cycle``, what ``lvmirror-backup@VOLUME.timer`` runs):
split (a consistency group for several volumes), copy, resync, keep the newest K; through the
real CLI and D-Bus on a private dbus-daemon."""

import os
import re

import pytest

from lvmirror.backupcycle import BackupPlan, load_plan, prune
from lvmirror.daemon import Lvmirrord

from tests.unit.test_bus import cli, system_bus  # noqa: F401  (a fixture)
from tests.unit.test_split_hooks import open_volumes

BS = 512


@pytest.fixture
def gw(tmp_path, system_bus):  # noqa: F811
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False,
                  hooks_dir=str(tmp_path / "hooks.d"))
    opened = open_volumes(d, tmp_path, ("db", "wal"))
    from lvmirror.bus import BusService
    bus = BusService(d, bus_address=system_bus)
    bus.start()
    yield d, {name: vol for name, (_, vol) in opened.items()}, system_bus
    bus.stop()
    for spec, _ in opened.values():
        d.registry.release(spec)


def _states(d, name):
    return [im["state"] for im in d.status()["volumes"][name]["images"]]


def test_cycles_back_up_a_group_resync_and_keep_the_newest(gw, tmp_path):
    d, vols, address = gw
    dest = tmp_path / "backups"
    conf = tmp_path / "db.conf"
    conf.write_text(f"[backup]\nmembers = db:1 wal:1\ndest = {dest}\nkeep = 2  # two\n")
    seen = []
    for k in range(3):
        for name, vol in vols.items():
            vol.write(8, [memoryview(bytes([65 + k]) * BS)])
        r = cli(address, "backup-cycle", "--config", str(conf))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "backup cycle of db:1 wal:1 done" in r.stdout, r.stdout
        assert _states(d, "db") == _states(d, "wal") == ["in-sync", "in-sync"]
        files = sorted(os.listdir(dest / "db"))
        seen.append(files[-1])
        for name in ("db", "wal"):
            (newest,) = [f for f in os.listdir(dest / name) if f.endswith(seen[-1][-21:])]
            with open(dest / name / newest, "rb") as f:
                f.seek(8 * BS)
                assert f.read(BS) == bytes([65 + k]) * BS
            assert oct(os.stat(dest / name / newest).st_mode & 0o777) == "0o600"
        if k < 2:
            import time
            time.sleep(1.1)          # the next cycle gets another timestamp
    for name in ("db", "wal"):
        files = sorted(os.listdir(dest / name))
        assert len(files) == 2 and all(re.match(rf"{name}-\d{{8}}T\d{{6}}Z\.raw$", f)
                                       for f in files), files
    assert seen[0] not in os.listdir(dest / "db")         # the oldest went


def test_a_failed_copy_fails_the_cycle_but_the_mirror_is_made_whole(gw, tmp_path):
    d, vols, address = gw
    dest = tmp_path / "ro"
    dest.mkdir()
    (dest / "db").write_text("a file where the volume's directory should be")
    r = cli(address, "backup-cycle", "db:1", "--dest", str(dest))
    assert r.returncode == 1
    assert "FAILED: backup of db image 1" in r.stdout and "resync of db image 1 done" in \
        r.stdout and "backup cycle of db:1 FAILED" in r.stdout, r.stdout
    assert _states(d, "db") == ["in-sync", "in-sync"]
    d.split("db", 1)                                      # not in sync: refused at once
    r = cli(address, "backup-cycle", "db:1", "--dest", str(tmp_path / "b"))
    assert r.returncode == 1 and "image 1 of db is split" in r.stdout, r.stdout


def test_a_group_split_that_fails_after_splitting_resyncs_what_it_split(gw, tmp_path,
                                                                      monkeypatch):
    """The group split fails after every member was split (as when its completions hold runs
    out: the split is not one instant): no copy is made, and the members this cycle split are resynced
    at once, not left split for the next cycle to refuse (trial 25)."""
    from lvmirror.daemon import splitgroup
    from lvmirror.errors import StateError
    d, vols, address = gw
    real = splitgroup.split_group

    def runs_out(host_of, members):
        real(host_of, members)
        raise StateError("completions were released after 0.05 s (the safety limit) before "
                         "every member was split: the split is not consistent")
    monkeypatch.setattr(splitgroup, "split_group", runs_out)
    r = cli(address, "backup-cycle", "db:1", "wal:1", "--dest", str(tmp_path / "b"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED: split of db:1 wal:1" in r.stdout and "safety limit" in r.stdout, r.stdout
    assert "resync started of db:1 wal:1, split by this failed cycle" in r.stdout, r.stdout
    assert not os.path.exists(tmp_path / "b" / "db") or not [
        f for f in os.listdir(tmp_path / "b" / "db") if f.endswith(".raw")]
    from tests.unit.test_daemon_processes import wait_for
    wait_for(lambda: _states(d, "db") == _states(d, "wal") == ["in-sync", "in-sync"],
             what="the resync of both members")
    monkeypatch.setattr(splitgroup, "split_group", real)
    r = cli(address, "backup-cycle", "db:1", "wal:1", "--dest", str(tmp_path / "b"))
    assert r.returncode == 0 and "backup cycle of db:1 wal:1 done" in r.stdout, r.stdout


def test_plans_are_checked(tmp_path):
    conf = tmp_path / "x.conf"
    for text, msg in (("[backup]\nmembers = db:1\n", "dest must be an absolute"),
                      ("[backup]\nmembers = db\ndest = /b\n", "not VOLUME:IMAGE"),
                      ("[backup]\nmembers = db:1\ndest = /b\nkeep = 0\n", "keep"),
                      ("[backup]\nmembers = db:1\ndest = /b\nformat = zip\n", "format"),
                      ("[backup]\nmembers = db:1 db:2\ndest = /b\n", "named twice"),
                      ("[backup]\nmembers = db:1\ndest = /b\ncolour = red\n", "unknown key"),
                      ("[other]\n", "no \\[backup\\] section")):
        conf.write_text(text)
        with pytest.raises(ValueError, match=msg):
            load_plan(str(conf))
    with pytest.raises(ValueError, match="No such file"):
        load_plan(str(tmp_path / "missing.conf"))
    conf.write_text("[backup]\nmembers = db:1 wal:1\ndest = /b\nformat = qcow2\nrate = 20\n"
                    "hooks = no\n")
    assert load_plan(str(conf)) == BackupPlan([("db", 1), ("wal", 1)], "/b", "qcow2", 7, 20.0,
                                              False)


def test_prune_keeps_the_newest_and_touches_nothing_else(tmp_path):
    """The leftovers of interrupted copies go too: ``NAME.partial`` (cycles before
    2026-12-06) and lvmirrord's ``NAME.<random>.partial`` (``backup.new_partial``), of this
    volume only (``dbx-...`` is another volume's, ``notes.partial`` no backup's)."""
    names = ["db-20261101T000000Z.raw", "db-20261102T000000Z.raw", "db-20261103T000000Z.qcow2",
             "db-20261104T000000Z.raw.partial", "dbx-20261101T000000Z.raw", "notes.txt",
             "db-latest.raw", "db-20261105T000000Z.qcow2.k3_9zq1a.partial",
             "dbx-20261105T000000Z.raw.k3_9zq1a.partial", "notes.partial",
             "db-20261105T000000Z.raw.toolongname.partial"]
    for n in names:
        (tmp_path / n).write_text("x")
    gone = prune(str(tmp_path), "db", 2, log=lambda _: None)
    doomed = ["db-20261101T000000Z.raw", "db-20261104T000000Z.raw.partial",
              "db-20261105T000000Z.qcow2.k3_9zq1a.partial"]
    assert sorted(os.path.basename(p) for p in gone) == doomed
    assert sorted(os.listdir(tmp_path)) == sorted(set(names) - set(doomed))
    # the copy of a backup running now (another cycle's) is not a leftover
    running = tmp_path / "db-20261106T000000Z.raw.a1b2c3d4.partial"
    running.write_text("x")
    from lvmirror.backup import dest_key
    said = []
    assert prune(str(tmp_path), "db", 2, log=said.append,
                 busy={dest_key(str(tmp_path / "db-20261106T000000Z.raw"))}) == []
    assert running.exists()
    assert prune(str(tmp_path), "db", 2, log=said.append) == [str(running)]
    assert said == [f"removed the leftover of an interrupted copy {running}"]


def test_a_stopped_cycle_starts_the_resync_and_the_next_one_heals_what_a_kill_left(gw, tmp_path):
    """systemctl stop (SIGTERM) during a cycle: the resyncs are started before it goes (exit
    130). A cycle killed outright after its split leaves its marker: the next cycle resyncs
    that image first instead of failing on it; an image split by hand is still refused."""
    import signal
    import subprocess
    import sys
    import time
    from tests.unit.test_bus import ROOT
    from tests.unit.test_daemon_processes import wait_for
    d, vols, address = gw
    hooks = tmp_path / "hooks.d"
    hooks.mkdir()
    slow = hooks / "10-slow"
    slow.write_text("#!/bin/sh\n[ \"$1\" = pre-split ] && sleep 2\nexit 0\n")
    slow.chmod(0o755)
    dest = tmp_path / "b"
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address, PYTHONPATH=ROOT)
    p = subprocess.Popen([sys.executable, "-m", "lvmirror.cli", "backup-cycle", "db:1", "wal:1",
                          "--dest", str(dest)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    time.sleep(1.5)                      # the split call waits in the pre-split hook
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 130, out
    assert "interrupted: starting the resync of db:1 wal:1" in out and "Traceback" not in out
    wait_for(lambda: _states(d, "db") == _states(d, "wal") == ["in-sync", "in-sync"],
             what="the resyncs the stopped cycle started")
    # a cycle killed after its split: the image is split and the marker names that split
    slow.unlink()
    info = d.split("db", 1)
    (dest / "db").mkdir(parents=True, exist_ok=True)
    (dest / "db" / ".lvmirror-cycle").write_text(
        '{"image": 1, "split_time": %r}' % info["split_time"])
    r = cli(address, "backup-cycle", "db:1", "--dest", str(dest))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "a cycle was interrupted after its split; resyncing it first" in r.stdout
    assert not (dest / "db" / ".lvmirror-cycle").exists()
    d.split("db", 1)                     # by hand: no marker for this split
    r = cli(address, "backup-cycle", "db:1", "--dest", str(dest))
    assert r.returncode == 1 and "image 1 of db is split" in r.stdout, r.stdout


def test_a_resync_that_fails_at_once_fails_the_cycle(gw, tmp_path):
    """The split image's device dies right after the split: the copy reads it, the resync's
    writes into it fail at once, before the cycle's first look at the job. The cycle says
    the resync failed and exits 1 (trial 26: a wait that took failures seen at its first look
    for older ones printed "resync ... done" and "cycle ... done" on a failed image)."""
    import errno
    from lvmirror.errors import ImageIOError
    d, vols, address = gw
    vol = vols["db"]
    vol.write(0, [memoryview(b"A" * BS * 8)])
    real = d.split

    def split(*a, **kw):
        res = real(*a, **kw)
        vol.write(0, [memoryview(b"N" * BS * 8)])         # the LUN keeps writing
        st = vol._images[1].storage

        def writev(offset, buffers, **kw):
            raise ImageIOError(st.path, errno.EIO, f"image {st.path}: injected write EIO",
                               op="write", offset=offset)
        st.writev = writev
        return res
    d.split = split
    r = cli(address, "backup-cycle", "db:1", "--dest", str(tmp_path / "b"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "resync of db image 1 done" not in r.stdout, r.stdout
    assert "backup cycle of db:1 FAILED" in r.stdout, r.stdout
