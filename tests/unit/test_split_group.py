"""Consistency groups (``lvmirror split-group``): one image of each of several volumes split at
one instant, through lvmirrord's management API, with one process for every volume and with a
process per volume, each LUN's ring played by the ring emulator.

The load is a causal chain over two volumes: write n to volume A, wait for its
acknowledgement, write n to volume B, wait, write n + 1 to A... A split is consistent when the
two copies hold a prefix of that chain: B's copy holds the same n as A's or one less."""

import json
import os
import struct
import threading
import time

import pytest

from lvmirror.daemon import Lvmirrord
from lvmirror.daemon.volumeproc import Zygote
from lvmirror.errors import ConfigError, StateError
from lvmirror.mirror.metadata import VolumeMetadata
from lvmirror.scsi import parse_sense
from lvmirror.tcmu import uio
from lvmirror.tcmu.emulator import RingEmulator

from tests.unit.test_daemon_processes import ROOT, cdb10, in_sync, read, wait_for
from tests.unit.test_tcmu_uio_netlink import fake_device

BS = 512
SIZE = 8 << 20


@pytest.fixture(params=["one process", "process per volume"])
def gw(request, tmp_path, monkeypatch):
    """lvmirrord (no bus) with volumes va and vb, 2 images each; yields (daemon, {name: emu},
    {name: image paths})."""
    processes = request.param == "process per volume"
    monkeypatch.setenv("PYTHONPATH", ROOT)
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False, processes=processes,
                  log_level="warning")
    if processes:
        d._zygote = Zygote()
    emus, paths = {}, {}
    for k, name in enumerate(("va", "vb")):
        paths[name] = [str(tmp_path / f"{name}{j}") for j in range(2)]
        roots = fake_device(tmp_path / f"dev{k}", k,
                            f"tcm-user/1/lun{k}/lvmirror/{name};images={'+'.join(paths[name])}",
                            info_size=SIZE, serial=f"serial-{k}")
        (dev,) = uio.find_devices("lvmirror", **roots)
        emu = RingEmulator(cmdr_size=(64 << 10) - 128, data_size=4 << 20)
        emu.run_reaper()
        emus[name] = emu
        info = d.add_lun(dev, handle=emu.handle())
        assert info["error"] is None, info
    wait_for(lambda: in_sync(d, "va") and in_sync(d, "vb"), what="initial sync")
    yield d, emus, paths
    d.stop()
    for emu in emus.values():
        emu.close()
    if d._zygote is not None:
        pid = d._zygote.pid
        d._zygote.close()
        os.waitpid(pid, 0)


def _block(n):
    return struct.pack("<Q", n) * (BS // 8)


def _seq_in(path):
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


class Chain(threading.Thread):
    """Writes 1, 2, 3... to LBA 0 of A then of B, each after the previous one's
    acknowledgement, until stopped."""

    def __init__(self, emus, a="va", b="vb"):
        super().__init__(daemon=True)
        self.emus, self.a, self.b = emus, a, b
        self.n = 0
        self.stop = threading.Event()
        self.error = None

    def _write(self, name, n):
        emu = self.emus[name]
        (c,) = emu.wait([emu.submit(cdb10(0x2A, 0, 1), data_out=_block(n))]).values()
        if c.status != 0:
            raise AssertionError(f"{name}: write {n}: {parse_sense(c.sense)}")

    def run(self):
        try:
            while not self.stop.is_set():
                self.n += 1
                self._write(self.a, self.n)
                self._write(self.b, self.n)
        except BaseException as e:
            self.error = e


def _chain_running(emus):
    chain = Chain(emus)
    chain.start()
    wait_for(lambda: chain.n > 20, what="the chain under way")
    return chain


def test_a_group_split_gives_copies_that_belong_together(gw):
    d, emus, paths = gw
    for _ in range(5):
        chain = _chain_running(emus)
        res = d.split_group(["va:1", "vb:1"])
        time.sleep(0.05)
        chain.stop.set()
        chain.join()
        assert chain.error is None
        a, b = _seq_in(paths["va"][1]), _seq_in(paths["vb"][1])
        assert 20 < a <= chain.n and b in (a, a - 1), (a, b, chain.n)
        assert [(m["volume"], m["index"]) for m in res["members"]] == [("va", 1), ("vb", 1)]
        assert res["luns"] == 2 and res["hold_seconds"] > 0 and res["switch_span"] >= 0
        st = d.status()["volumes"]
        assert st["va"]["images"][1]["state"] == st["vb"]["images"][1]["state"] == "split"
        # the live volumes went on: each holds the chain's last write
        assert read(emus["va"], 0, 1) == _block(chain.n)
        for name in ("va", "vb"):
            d.resync(name, 1)
        wait_for(lambda: in_sync(d, "va") and in_sync(d, "vb"), what="resync")


def test_splitting_one_volume_after_the_other_breaks_the_chain(gw):
    """What the group split is for: two plain splits under the same load give copies that do
    not belong together (B's copy holds writes that came after A's copy was taken)."""
    d, emus, paths = gw
    chain = _chain_running(emus)
    d.split("va", 1)
    wait_for(lambda: chain.n > _seq_in(paths["va"][1]) + 5, what="more writes")
    d.split("vb", 1)
    chain.stop.set()
    chain.join()
    a, b = _seq_in(paths["va"][1]), _seq_in(paths["vb"][1])
    assert b > a, (a, b)        # B's copy has writes that depend on ones A's copy lacks


def test_completions_are_held_not_lost_and_new_commands_still_run(gw):
    d, emus, _ = gw
    host = d._host("va")
    assert host.hold_completions(["va"]) == 1
    try:
        emu = emus["va"]
        wid = emu.submit(cdb10(0x2A, 64, 1), data_out=_block(7))
        time.sleep(0.3)
        assert wid not in emu.completions          # done, but the initiator is not told
        other = emus["vb"]                          # another volume is not held
        read(other, 0, 1)
    finally:
        res = host.release_completions(["va"])
    assert res["luns"] == 1 and res["commands"] == 1 and res["seconds"] >= 0.3
    assert emu.wait([wid])[wid].status == 0
    assert read(emus["va"], 64, 1) == _block(7)


def test_a_member_that_cannot_be_split_leaves_every_volume_as_it_was(gw, tmp_path):
    d, emus, paths = gw
    d.split("vb", 1)                               # vb:0 is now its last in-sync image
    with pytest.raises(StateError, match="last in-sync"):
        d.split_group(["va:1", "vb:0"])
    st = d.status()["volumes"]
    assert [i["state"] for i in st["va"]["images"]] == ["in-sync", "in-sync"]
    md = VolumeMetadata.load(str(tmp_path / "state"), "va")
    assert [im.state for im in md.images] == ["in-sync", "in-sync"]   # saved so, too
    for bad, msg in ((["va:1", "va:0"], "named twice"), (["va"], "VOLUME:IMAGE"),
                     ([], "at least one"), (["nope:1"], "no volume 'nope'"),
                     (["db:2:3"], "volume name 'db:2' must be")):
        with pytest.raises(ConfigError, match=msg):
            d.split_group(bad)


def test_a_group_restore_rolls_every_volume_back(gw):
    d, emus, paths = gw
    for name in ("va", "vb"):
        (c,) = emus[name].wait([emus[name].submit(cdb10(0x2A, 8, 1), data_out=_block(1))]
                               ).values()
        assert c.status == 0
    d.split_group(["va:1", "vb:1"])
    for name in ("va", "vb"):
        emus[name].wait([emus[name].submit(cdb10(0x2A, 8, 1), data_out=_block(2))])
    with pytest.raises(StateError, match="only a split image"):
        d.restore_group(["va:0", "vb:1"])          # checked first: nothing started
    assert not any(j["kind"] == "restore" for j in d.status()["volumes"]["vb"]["jobs"])
    res = d.restore_group(["va:1", "vb:1"])
    assert [m["volume"] for m in res["members"]] == ["va", "vb"]
    for name in ("va", "vb"):
        assert read(emus[name], 8, 1) == _block(1)  # each reads as its copy at once
    wait_for(lambda: all(j["state"] != "running" for v in ("va", "vb")
                         for j in d.status()["volumes"][v]["jobs"]), what="restores")
    assert json.dumps(d.status())                  # still answers


def test_a_group_restore_with_an_offline_member_starts_nothing(gw):
    """vb's last in-sync image refuses a write (the volume goes offline): restore-group names
    vb as offline and starts no restore, not even va's (trial 13: va was rolled back, then the
    call failed on vb). Once vb answers again the same group restore runs."""
    import errno
    from lvmirror.errors import ImageIOError
    d, emus, paths = gw
    if d._local is None:
        pytest.skip("the fault is injected into the volume lvmirrord hosts itself")
    d.split_group(["va:1", "vb:1"])
    st = d._local.registry.get("vb").image_storage(0)
    real = st.writev

    def refuse(offset, buffers, **kw):
        raise ImageIOError(st, errno.EIO, "write: EIO (injected)", op="write", offset=offset,
                           length=sum(len(b) for b in buffers))
    st.writev = refuse
    (c,) = emus["vb"].wait([emus["vb"].submit(cdb10(0x2A, 8, 1), data_out=_block(3))]).values()
    assert c.status != 0
    assert d.status()["volumes"]["vb"]["health"] == "offline"
    with pytest.raises(StateError, match="volume vb is offline"):
        d.restore_group(["va:1", "vb:1"])
    assert not any(j["kind"] == "restore" for v in ("va", "vb")
                   for j in d.status()["volumes"][v]["jobs"])
    st.writev = real
    assert d._local.registry.get("vb").probe()
    res = d.restore_group(["va:1", "vb:1"])
    assert [m["volume"] for m in res["members"]] == ["va", "vb"]
    wait_for(lambda: all(j["state"] != "running" for v in ("va", "vb")
                         for j in d.status()["volumes"][v]["jobs"]), what="restores")


def test_a_group_restore_with_a_member_stopped_restoring_another_image_starts_nothing(
        gw, tmp_path):
    """vb has a restore from its image 2 cancelled half-way: restore-group va:1 vb:1 is
    refused naming it, and va is not rolled back either (trial 23: the pre-check read only
    *running* restores from the status, va was rolled back, then vb's restore refused)."""
    d, emus, paths = gw
    third = str(tmp_path / "vb2")
    assert d.attach("vb", third) == 2
    wait_for(lambda: in_sync(d, "vb"), what="vb's third image in sync")
    d.split_group(["va:1", "vb:1"])
    d.split("vb", 2)
    for lba in range(0, SIZE // BS, (1 << 20) // BS):     # one block in every 1 MiB region
        emus["vb"].wait([emus["vb"].submit(cdb10(0x2A, lba, 1), data_out=_block(5))])
    d.restore("vb", 2, rate_mbps=0.5)
    d.cancel("vb", 2)
    (job,) = [j for j in d.status()["volumes"]["vb"]["jobs"] if j["kind"] == "restore"]
    assert job["state"] == "cancelled"
    with pytest.raises(StateError, match=r"restore from image 2 is unfinished.*no restore of "
                                         r"the group was started"):
        d.restore_group(["va:1", "vb:1"])
    assert not any(j["kind"] == "restore" for j in d.status()["volumes"]["va"]["jobs"])
    with pytest.raises(ConfigError, match="no image 7"):
        d.restore_group(["va:1", "vb:7"])
    assert not any(j["kind"] == "restore" for j in d.status()["volumes"]["va"]["jobs"])


class _SlowSwitch:
    """A member's host whose switch takes 0.2 s longer, as a busy volume process would."""

    def __init__(self, host):
        self._host = host

    def __getattr__(self, name):
        return getattr(self._host, name)

    def split_switch(self, name, image):
        t = self._host.split_switch(name, image)
        time.sleep(0.2)
        return t


def test_the_group_stays_consistent_however_long_the_switches_take(gw):
    """The chain goes on between two members' switches (0.2 s apart): the held completions
    keep every write to B that follows one to A after A's switch out of B's copy."""
    from lvmirror.daemon import splitgroup
    d, emus, paths = gw
    chain = _chain_running(emus)
    res = splitgroup.split_group(lambda name: _SlowSwitch(d._host(name)), ["va:1", "vb:1"])
    chain.stop.set()
    chain.join()
    assert chain.error is None
    a, b = _seq_in(paths["va"][1]), _seq_in(paths["vb"][1])
    assert b in (a, a - 1), (a, b)
    assert res["switch_span"] >= 0.2 and res["hold_seconds"] >= 0.2


class _FinishFails:
    """A member's host whose finish fails after its split's own clean-up, as a split whose
    image still has a write in flight fails (``SplitControl.finish``)."""

    def __init__(self, host):
        self._host = host

    def __getattr__(self, name):
        return getattr(self._host, name)

    def split_finish(self, name, image):
        self._host.split_finish(name, image)
        raise StateError(f"volume {name}: image {image} was not split: injected")


def test_a_member_that_fails_to_finish_does_not_leave_the_others_unfinished(gw):
    """The first member's finish fails: the second is still finished (its split done, no
    longer under way), and the error names both."""
    from lvmirror.daemon import splitgroup
    d, emus, paths = gw
    hosts = {"va": _FinishFails(d._host("va")), "vb": d._host("vb")}
    with pytest.raises(StateError, match=r"not split after their instant: va:1 .*injected.*"
                                         r"split \(consistent with each other\): vb:1"):
        splitgroup.split_group(hosts.__getitem__, ["va:1", "vb:1"])
    st = d.status()["volumes"]
    assert st["vb"]["images"][1]["state"] == "split"
    d.resync("vb", 1)                      # refused while a split is under way
    wait_for(lambda: in_sync(d, "vb"), what="resync of vb")


def test_a_group_whose_hold_runs_out_is_not_reported_consistent(gw):
    """The completions hold's safety limit runs out before the last member is switched (a
    0.2 s switch against a 0.05 s limit): the group split is not one instant, and split_group
    says so, naming what was split, instead of reporting a consistent split (trial 24)."""
    from lvmirror.daemon import splitgroup
    d, emus, paths = gw
    with pytest.raises(StateError, match=r"released after 0.05 s \(the safety limit\) before "
                                         r"every member was split.*not consistent"):
        splitgroup.split_group(lambda name: _SlowSwitch(d._host(name)), ["va:1", "vb:1"],
                               hold_max=0.05)
    st = d.status()["volumes"]
    assert st["va"]["images"][1]["state"] == st["vb"]["images"][1]["state"] == "split"


class _SlowRestore:
    """A member's host whose restore takes 0.3 s longer (a slow flush of its images)."""

    def __init__(self, host):
        self._host = host

    def __getattr__(self, name):
        return getattr(self._host, name)

    def restore(self, name, image, rate_mbps=0.0):
        time.sleep(0.3)
        return self._host.restore(name, image, rate_mbps)


def test_a_group_restore_whose_hold_runs_out_says_so(gw):
    """vb's restore begins after the hold's safety limit released va's completions: the
    volumes were not rolled back at one instant, and restore_group raises naming the restores
    started, not a success with "completions held 0 us" (trial 24)."""
    from lvmirror.daemon import splitgroup
    d, emus, paths = gw
    d.split_group(["va:1", "vb:1"])
    with pytest.raises(StateError, match=r"released after 0.1 s \(the safety limit\) before "
                                         r"every member's restore began.*restores started: "
                                         r"va, vb"):
        splitgroup.restore_group(lambda name: _SlowRestore(d._host(name)), ["va:1", "vb:1"],
                                 hold_max=0.1)


def test_a_group_restore_refuses_split_images_of_separate_instants(gw, monkeypatch):
    """va:1 and vb:1 were split by separate splits, further apart than a group split's hold
    may last (HOLD_MAX, made 0.2 s here): restored together they would not read as the group
    at one instant, so restore-group refuses, naming both times, with nothing started (trial
    25: it reported them rolled back "from one instant"); the members of one group split
    are restored."""
    from lvmirror.daemon import splitgroup
    d, emus, paths = gw
    d.split("va", 1)
    time.sleep(0.5)
    d.split("vb", 1)
    monkeypatch.setattr(splitgroup, "HOLD_MAX", 0.2)
    with pytest.raises(StateError, match=r"va:1 was split at .* and vb:1 at .*, \d+\.\d s "
                                         r"apart: not one group split.*no restore of the "
                                         r"group was started"):
        d.restore_group(["va:1", "vb:1"])
    st = d.status()["volumes"]
    assert not [j for v in ("va", "vb") for j in st[v]["jobs"] if j["kind"] == "restore"]
    monkeypatch.setattr(splitgroup, "HOLD_MAX", 10.0)
    d.resync("va", 1)
    d.resync("vb", 1)
    wait_for(lambda: in_sync(d, "va") and in_sync(d, "vb"), what="the resyncs")
    d.split_group(["va:1", "vb:1"])
    res = d.restore_group(["va:1", "vb:1"])
    assert [m["volume"] for m in res["members"]] == ["va", "vb"]


def test_a_group_restore_refuses_a_member_with_a_stopped_restore_of_the_same_image(gw):
    """vb's restore from image 1 was cancelled and vb written since: restore-group va:1 vb:1
    would resume it - vb rolled back at its own earlier instant, the write kept - so it is
    refused with nothing started (trial 24: both reported running, vb still read the write)."""
    d, emus, paths = gw
    d.split_group(["va:1", "vb:1"])
    for lba in range(0, SIZE // BS, (1 << 20) // BS):     # one block in every 1 MiB region
        emus["vb"].wait([emus["vb"].submit(cdb10(0x2A, lba, 1), data_out=_block(5))])
    d.restore("vb", 1, rate_mbps=0.5)
    d.cancel("vb", 1)
    (c,) = emus["vb"].wait([emus["vb"].submit(cdb10(0x2A, 16, 1), data_out=_block(9))]).values()
    assert c.status == 0
    with pytest.raises(StateError, match=r"restore from image 1 is unfinished \(cancelled\); "
                                         r"finish it .*no restore of the group was started"):
        d.restore_group(["va:1", "vb:1"])
    assert not any(j["kind"] == "restore" for j in d.status()["volumes"]["va"]["jobs"])
    assert read(emus["vb"], 16, 1) == _block(9)


def test_a_group_restore_whose_member_cannot_flush_starts_nothing(gw):
    """vb's only in-sync image fails its next flush, unnoticed yet: each member's live
    images are flushed before the hold, so restore-group refuses with nothing started - va is
    not rolled back - instead of failing under the hold after va's restore began (trial 24)."""
    import errno
    from lvmirror.errors import ImageIOError
    d, emus, paths = gw
    if d._local is None:
        pytest.skip("the fault is injected into the volume lvmirrord hosts itself")
    for name in ("va", "vb"):
        emus[name].wait([emus[name].submit(cdb10(0x2A, 8, 1), data_out=_block(1))])
    d.split_group(["va:1", "vb:1"])
    for name in ("va", "vb"):
        emus[name].wait([emus[name].submit(cdb10(0x2A, 8, 1), data_out=_block(2))])
    st = d._local.registry.get("vb").image_storage(0)
    real = st.flush

    def fail_once():
        st.flush = real
        st.note_flush_failure()
        raise ImageIOError(st, errno.EIO, "flush: EIO (injected)", op="flush", length=0)
    st.flush = fail_once
    with pytest.raises(StateError, match=r"the restore's start not saved.*no restore of the "
                                         r"group was started"):
        d.restore_group(["va:1", "vb:1"])
    assert not any(j["kind"] == "restore" for v in ("va", "vb")
                   for j in d.status()["volumes"][v]["jobs"])
    assert read(emus["va"], 8, 1) == _block(2)          # va not rolled back
    assert d._local.registry.get("vb").probe()
    res = d.restore_group(["va:1", "vb:1"])
    assert [m["volume"] for m in res["members"]] == ["va", "vb"]
    for name in ("va", "vb"):
        assert read(emus[name], 8, 1) == _block(1)


def test_a_group_split_that_cannot_hold_leaves_no_member_prepared(gw):
    """vb's completions are already held (another group's step): split_group is refused
    with every prepared member undone - both volumes split again at once afterwards - not
    left prepared, refusing every split, resync and restore until a restart (trial 25)."""
    d, emus, paths = gw
    host = d._host("vb")
    host.hold_completions(["vb"], 5.0)
    try:
        with pytest.raises(StateError, match="already held"):
            d.split_group(["va:1", "vb:1"])
    finally:
        host.release_completions(["vb"])
    st = d.status()["volumes"]
    assert [i["state"] for i in st["va"]["images"]] == ["in-sync", "in-sync"]
    assert [i["state"] for i in st["vb"]["images"]] == ["in-sync", "in-sync"]
    res = d.split_group(["va:1", "vb:1"])
    assert [m["volume"] for m in res["members"]] == ["va", "vb"]


@pytest.mark.parametrize("rate", [-1.0, float("nan")])
def test_a_group_restore_refuses_a_bad_rate_before_anything(gw, rate):
    """A rate limit that is no rate is refused (ValueError) before any member is checked,
    flushed or held (trial 25: refused inside the hold, as a restore that did not start)."""
    from lvmirror.daemon import splitgroup
    d, emus, paths = gw
    d.split_group(["va:1", "vb:1"])
    calls = []

    class Spy:
        def __init__(self, host):
            self._host = host

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self._host, name)
    with pytest.raises(ValueError, match="rate limit must be a non-negative number"):
        splitgroup.restore_group(lambda name: Spy(d._host(name)), ["va:1", "vb:1"], rate)
    assert calls == []


def test_a_hung_split_image_does_not_hold_a_group_restore(gw, tmp_path):
    """va keeps a second split copy (image 2) whose device stops answering: the group
    restore's flush of it is bounded as the flusher's is (``_flush_limit``), so restore_group
    returns - va:2 failed as slow - instead of blocking with va's management lock held until
    the device answers (trial 25: still blocked after 26 s)."""
    d, emus, paths = gw
    if d._local is None:
        pytest.skip("the fault is injected into the volume lvmirrord hosts itself")
    assert d.attach("va", str(tmp_path / "va2")) == 2
    wait_for(lambda: in_sync(d, "va"), what="va's third image in sync")
    d.split_group(["va:1", "vb:1"])
    d.split("va", 2)
    vol = d._local.registry.get("va")
    st = vol.image_storage(2)
    gate = threading.Event()
    real = st.flush

    def hung():
        gate.wait(60)                       # a device that stopped answering
        return real()
    st.flush = hung
    out = {}

    def run():
        try:
            out["res"] = d.restore_group(["va:1", "vb:1"])
        except Exception as exc:            # (either outcome; what counts is that it returns)
            out["exc"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    returned = not t.is_alive()
    gate.set()
    t.join(10)
    assert returned, "restore_group still blocked 20 s after va:2's device stopped answering"
    assert out
