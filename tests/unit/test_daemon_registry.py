"""VolumeRegistry and a LUN's cfgstring after attach/detach (issue 13).

A live LUN's cfgstring cannot change, and LIO and every saved targetcli configuration keep the
images= list the LUN was created with. After ``lvmirror attach``/``detach`` and a restart of
lvmirrord (or a reboot), the same cfgstring must open the volume again, with its current images;
a cfgstring naming a path that never was an image of the volume is still refused."""

import json
import logging
import os

import pytest

from lvmirror import cfgstring
from lvmirror.daemon import Lvmirrord, VolumeRegistry
from lvmirror.errors import ConfigError, StateError
from lvmirror.mirror.metadata import VolumeMetadata
from lvmirror.mirror.volume import ImageState

SIZE = 4 << 20


def settle(volume):
    for job in list(volume.jobs.values()):
        assert job.wait(20)
    assert all(i.state is ImageState.IN_SYNC for i in volume.images)


def wr(volume, lba, data):
    volume.write(lba, [memoryview(bytearray(data))])


def rd(volume, lba, n):
    buf = bytearray(n)
    volume.read(lba, [memoryview(buf)])
    return bytes(buf)


class Env:
    """Volume ``vpc`` created through the daemon's registry from ``vpc;images=A+B``."""

    def __init__(self, tmp_path):
        self.d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
        self.paths = [str(tmp_path / n) for n in ("a.img", "b.img", "c.img")]
        self.spec = cfgstring.parse(f"vpc;images={self.paths[0]}+{self.paths[1]}")
        volume, backend = self.d.registry.acquire(self.spec, lun="lun0", size=SIZE)
        assert backend is volume
        settle(volume)

    def restart(self):
        """lvmirrord stops (every LUN releases the volume) and a new one starts."""
        for name in self.d.registry.names():
            self.d.registry.release(cfgstring.VolumeSpec(name))
        self.d = Lvmirrord(state_dir=self.d.state_dir, with_bus=False)
        return self.d


@pytest.fixture
def vpc(tmp_path):
    env = Env(tmp_path)
    yield env
    for name in env.d.registry.names():
        env.d.registry.release(cfgstring.VolumeSpec(name))


def test_attach_then_restart_with_the_original_cfgstring_serves_three_images(vpc, caplog):
    a, b, c = vpc.paths
    volume = vpc.d.registry.get("vpc")
    wr(volume, 0, b"x" * 4096)
    assert vpc.d.attach("vpc", c) == 2
    settle(volume)
    d = vpc.restart()
    with caplog.at_level(logging.INFO, logger="lvmirrord"):
        volume, _ = d.registry.acquire(vpc.spec, lun="lun0", size=SIZE)
    assert [i.path for i in volume.images] == [a, b, c]
    assert all(i.state is ImageState.IN_SYNC for i in volume.images)
    assert rd(volume, 0, 4096) == b"x" * 4096
    wr(volume, 16, b"y" * 4096)
    volume.flush()
    for p in (a, b, c):
        with open(p, "rb") as f:
            f.seek(16 * 512)
            assert f.read(4096) == b"y" * 4096
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("images changed" in m and f"names {a}+{b}," in m and f"has {a}+{b}+{c}" in m
               for m in msgs), msgs
    # cfgstring.check (targetcli CheckConfig, e.g. restoring a saved configuration) agrees
    assert cfgstring.check(f"vpc;images={a}+{b}", state_dir=d.state_dir).images == (a, b)


def test_detach_then_restart_with_the_original_cfgstring(vpc):
    a, b, c = vpc.paths
    vpc.d.attach("vpc", c)
    settle(vpc.d.registry.get("vpc"))
    spec3 = cfgstring.parse(f"vpc;images={a}+{b}+{c}")   # a LUN created after the attach
    vpc.d.detach("vpc", 1)
    vpc.d.detach("vpc", 1)
    assert [i.path for i in vpc.d.registry.get("vpc").images] == [a]
    wr(vpc.d.registry.get("vpc"), 0, b"z" * 512)
    for spec in (vpc.spec, spec3):
        d = vpc.restart()
        volume, _ = d.registry.acquire(spec, lun="lun0", size=SIZE)
        assert [i.path for i in volume.images] == [a]
        assert rd(volume, 0, 512) == b"z" * 512
        wr(volume, 1, b"w" * 512)
        assert rd(volume, 1, 512) == b"w" * 512
        assert cfgstring.check(cfgstring.format(spec), state_dir=d.state_dir).name == "vpc"
    # a former image's file may be gone: CheckConfig does not look at it
    os.unlink(c)
    assert cfgstring.check(f"vpc;images={a}+{b}+{c}", state_dir=d.state_dir).name == "vpc"


def test_second_acquire_checks_the_history_too(vpc, tmp_path):
    """An exported split image opens the volume first; the volume's own LUN comes second."""
    a, b, c = vpc.paths
    vpc.d.attach("vpc", c)
    settle(vpc.d.registry.get("vpc"))
    vpc.d.registry.get("vpc").split(2)
    d = vpc.restart()
    export = cfgstring.parse("vpc;image=2;readonly=1")
    volume, view = d.registry.acquire(export, lun="backup0", size=SIZE)
    assert view is not volume
    assert d.registry.acquire(vpc.spec, lun="lun0", size=SIZE)[0] is volume
    d.registry.release(vpc.spec)
    foreign = cfgstring.parse(f"vpc;images={a}+{tmp_path}/other.img")
    with pytest.raises(ConfigError, match="other.img was never an image of this volume"):
        d.registry.acquire(foreign, lun="lun0", size=SIZE)
    assert d.registry.get("vpc") is volume               # the export keeps serving
    d.registry.release(export, view)


def test_a_cfgstring_naming_another_volumes_image_is_refused(vpc, tmp_path):
    a, b, c = vpc.paths
    vpc.d.attach("vpc", c)
    settle(vpc.d.registry.get("vpc"))
    vpc.d.detach("vpc", 2)
    d = vpc.restart()
    vdir = os.path.join(d.state_dir, "vpc")
    before = {n: open(os.path.join(vdir, n), "rb").read() for n in os.listdir(vdir)}
    x = f"{tmp_path}/x.img"
    for cfg in (f"vpc;images={a}+{x}", f"vpc;images={x}"):
        s = cfgstring.parse(cfg)
        for check in (lambda: d.registry.acquire(s, lun="lun0", size=SIZE),
                      lambda: cfgstring.check(cfg, state_dir=d.state_dir)):
            with pytest.raises(ConfigError) as e:
                check()
            msg = str(e.value)
            assert f"volume 'vpc' has images {a}+{b} (former images: {c})" in msg
            assert f"{x} was never an image of this volume" in msg
            assert "Name the volume alone ('vpc')" in msg
    assert d.registry.names() == []          # refused before the volume was opened
    assert {n: open(os.path.join(vdir, n), "rb").read() for n in os.listdir(vdir)} == before
    assert not os.path.exists(x)
    # the order of a known list does not matter
    volume, _ = d.registry.acquire(cfgstring.parse(f"vpc;images={c}+{b}+{a}"), lun="lun0",
                                   size=SIZE)
    assert [i.path for i in volume.images] == [a, b]


def test_old_volume_json_without_history_still_opens(vpc):
    """A volume attached to by a version that kept no history: its current images are the
    history, so the original two-image cfgstring opens the three-image volume."""
    a, b, c = vpc.paths
    vpc.d.attach("vpc", c)
    settle(vpc.d.registry.get("vpc"))
    d = vpc.restart()
    path = VolumeMetadata.json_path(d.state_dir, "vpc")
    with open(path) as f:
        raw = json.load(f)
    assert raw["image_history"] == [a, b, c]
    del raw["image_history"]
    with open(path, "w") as f:
        json.dump(raw, f)
    assert VolumeMetadata.load(d.state_dir, "vpc").image_history == [a, b, c]
    assert cfgstring.check(f"vpc;images={a}+{b}", state_dir=d.state_dir).name == "vpc"
    volume, _ = d.registry.acquire(vpc.spec, lun="lun0", size=SIZE)
    assert [i.path for i in volume.images] == [a, b, c]
    wr(volume, 0, b"q" * 512)
    assert rd(volume, 0, 512) == b"q" * 512
    d.registry.release(vpc.spec)
    with open(path) as f:
        assert json.load(f)["image_history"] == [a, b, c]     # written back with the history


def test_history_survives_a_reload_and_ignores_path_spelling(tmp_path):
    md = VolumeMetadata.new("v", block_size=512, size=1 << 20, region_size=1 << 16)
    md.add_image("/x/a", "in-sync", 1)
    md.add_image("/x/b", "syncing")
    md.images.pop()                                   # what a detach does
    md.add_image("/x/./b", "syncing")                 # the same file again: not listed twice
    assert md.image_history == ["/x/a", "/x/b"]
    md.save(tmp_path)
    back = VolumeMetadata.load(tmp_path, "v")
    assert back == md
    assert back.check_named_images(["/x/a", "/x/./b"]) is True
    assert back.check_named_images(["/x/a"]) is False
    with pytest.raises(ConfigError, match="/y/c was never"):
        back.check_named_images(["/x/a", "/y/c"])
    d = back.to_json()
    d["image_history"] = ["/x/a", 7]
    with pytest.raises(ConfigError, match="image_history entry 1"):
        VolumeMetadata.from_json(d)


def test_detach_that_would_renumber_an_exported_image_is_refused(vpc):
    """An export's cfgstring names its image by index; a detach of a lower index would make it
    name another image after the next restart."""
    d, (a, b, c) = vpc.d, vpc.paths
    d.attach("vpc", c)
    volume = d.registry.get("vpc")
    settle(volume)
    volume.split(2)
    export = cfgstring.parse("vpc;image=2")
    _, view = d.registry.acquire(export, lun="backup0", size=SIZE)
    with pytest.raises(StateError, match="renumber the exported split image"):
        d.detach("vpc", 1)
    with pytest.raises(StateError, match="image 2 is exported as a LUN"):
        d.detach("vpc", 2)
    assert len(volume.images) == 3
    d.registry.release(export, view)
    d.detach("vpc", 1)
    assert [i.path for i in volume.images] == [a, c]


def test_registry_alone(tmp_path):
    """VolumeRegistry without a daemon: create, attach on the volume, release, re-acquire."""
    reg = VolumeRegistry(str(tmp_path / "state"))
    a, b, c = (str(tmp_path / n) for n in "abc")
    spec = cfgstring.parse(f"v;images={a}+{b}")
    volume, _ = reg.acquire(spec, lun="l0", size=SIZE)
    volume.attach(c)
    settle(volume)
    wr(volume, 3, b"r" * 512)
    reg.release(spec)
    volume, _ = reg.acquire(spec, lun="l0", size=SIZE)
    assert len(volume.images) == 3 and rd(volume, 3, 512) == b"r" * 512
    reg.release(spec)


def test_a_volume_with_its_own_state_dir(tmp_path, monkeypatch):
    """cfgstring state_dir (shared storage for two gateways): the volume is created, opened and
    reopened there, not in lvmirrord's --state-dir; a missing state_dir, or one that is not a
    mount point (its file system not mounted), refuses the LUN and creates nothing; a LUN of
    the open volume naming another state directory (or none) is refused."""
    shared = tmp_path / "shared"
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
    a, b = str(tmp_path / "a.img"), str(tmp_path / "b.img")
    spec = cfgstring.parse(f"vha;images={a}+{b};state_dir={shared}")
    with pytest.raises(ConfigError) as e:
        d.registry.acquire(spec, lun="lun0", size=SIZE)
    assert "is its shared file system mounted" in str(e.value)
    assert not os.path.exists(a) and not os.path.exists(shared)
    shared.mkdir()
    with pytest.raises(ConfigError) as e:          # an empty mount point: not mounted
        d.registry.acquire(spec, lun="lun0", size=SIZE)
    assert "is not a mount point" in str(e.value)
    assert not os.path.exists(a) and os.listdir(shared) == []
    assert d.registry.names() == []
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: p == str(shared) or real_ismount(p))
    volume, _ = d.registry.acquire(spec, lun="lun0", size=SIZE)
    settle(volume)
    assert volume.meta_dir == str(shared)
    assert VolumeMetadata.exists(str(shared), "vha")
    assert not VolumeMetadata.exists(d.state_dir, "vha")
    wr(volume, 8, b"S" * 512)
    with pytest.raises(ConfigError) as e:
        d.registry.acquire(cfgstring.parse(f"vha;image=1;state_dir={tmp_path}"), lun="lun1",
                           size=SIZE)
    assert f"open with its state in {shared}" in str(e.value)
    with pytest.raises(ConfigError) as e:          # no state_dir: lvmirrord's own
        d.registry.acquire(cfgstring.parse("vha;image=1"), lun="lun1", size=SIZE)
    assert f"not in {d.state_dir}" in str(e.value)
    d.registry.release(spec)
    d2 = Lvmirrord(state_dir=str(tmp_path / "other"), with_bus=False)   # the other gateway
    volume, _ = d2.registry.acquire(cfgstring.parse(f"vha;state_dir={shared}"), lun="lun0",
                                    size=SIZE)
    assert rd(volume, 8, 512) == b"S" * 512
    assert [i.path for i in volume.images] == [a, b]
    d2.registry.release(cfgstring.VolumeSpec("vha"))


class _SlowLeases:
    """Stands in for lease.Leases where this host cannot run sanlock: ``acquire`` waits, as
    sanlock waits for the lease of a gateway that crashed (host_dead_seconds)."""

    def __init__(self):
        import threading
        import types
        self.go = threading.Event()
        self.waiting = threading.Event()
        self.config = types.SimpleNamespace(host_id=1)
        self._held = {}

    def acquire(self, name):
        self.waiting.set()
        assert self.go.wait(30)
        self._held[name] = 0

    def release(self, name):
        self._held.pop(name, None)

    def held(self):
        return dict(self._held)


def test_status_does_not_wait_for_a_lease_being_taken(tmp_path):
    """While one LUN's volume waits for its lease (up to sanlock's host_dead_seconds after the
    last holder crashed), the daemon's status and the other volumes' calls answer at once: a
    two-gateway lab run showed Pacemaker's monitor timing out on lvmirror status. A second
    LUN of the same volume waits for the open and is then refused as a duplicate."""
    import threading
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
    other = cfgstring.parse(f"vother;images={tmp_path}/o1.img")
    d.registry.acquire(other, lun="lun1", size=SIZE)
    leases = d.registry.leases = _SlowLeases()
    spec = cfgstring.parse(f"vlease;images={tmp_path}/l1.img+{tmp_path}/l2.img;direct=1")
    got = {}

    def open_it(key):
        try:
            got[key] = d.registry.acquire(spec, lun=key, size=SIZE)
        except ConfigError as exc:
            got[key] = exc

    t1 = threading.Thread(target=open_it, args=("lunA",))
    t1.start()
    assert leases.waiting.wait(10)
    t2 = threading.Thread(target=open_it, args=("lunB",))
    t2.start()
    done = threading.Event()
    threading.Thread(target=lambda: (d.status(), done.set()), daemon=True).start()
    assert done.wait(10), "status waited for another volume's lease"
    assert d.registry.names() == ["vother"]
    assert d.registry.get("vother") is not None
    assert "lunB" not in got                     # waits for lunA's open
    leases.go.set()
    t1.join(30)
    t2.join(30)
    volume, _ = got["lunA"]
    assert volume.name == "vlease" and d.registry.names() == ["vlease", "vother"]
    assert isinstance(got["lunB"], ConfigError) and "already served by LUN 'lunA'" in str(got["lunB"])
    assert leases.held() == {"vlease": 0}
    d.registry.release(spec)
    assert leases.held() == {}


def test_a_reopen_waits_for_the_close_and_keeps_the_lease(tmp_path):
    """A LUN releases the last use of a volume (close, then lease release, both outside the
    registry's lock) while another LUN acquires it: the acquire used to open a second copy
    while the first was closing, and the first's lease release then left the new one served
    without its lease. It now waits for the close and takes the lease afresh."""
    import threading
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
    leases = d.registry.leases = _SlowLeases()
    leases.go.set()
    spec = cfgstring.parse(f"vr;images={tmp_path}/r1.img;direct=1")
    volume, _ = d.registry.acquire(spec, lun="lun0", size=SIZE)
    closing, go_on = threading.Event(), threading.Event()
    real_close = volume.close

    def slow_close():
        closing.set()
        assert go_on.wait(30)
        real_close()
    volume.close = slow_close
    t = threading.Thread(target=d.registry.release, args=(spec,))
    t.start()
    assert closing.wait(10)
    got = {}
    t2 = threading.Thread(target=lambda: got.update(v=d.registry.acquire(spec, lun="lun1",
                                                                            size=SIZE)))
    t2.start()
    t2.join(1)
    assert "v" not in got                    # waits for the close
    go_on.set()
    t.join(30)
    t2.join(30)
    assert got["v"][0] is not volume
    assert d.registry.lease_of("vr") == {"host_id": 1, "slot": 0}
    d.registry.release(spec)
    assert leases.held() == {}


def test_an_image_file_of_a_volume_in_another_state_dir_is_refused(tmp_path, monkeypatch):
    """A volume whose state is in lvmirrord's --state-dir and one with state_dir= may not share
    an image file (both would write it): the create and CheckConfig check both directories."""
    shared = tmp_path / "shared"
    shared.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: p == str(shared) or real_ismount(p))
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
    a, b, c = (str(tmp_path / n) for n in ("a.img", "b.img", "c.img"))
    loc = cfgstring.parse(f"vloc;images={a}+{b}")
    settle(d.registry.acquire(loc, lun="lun0", size=SIZE)[0])
    text = f"vsh;images={a}+{c};state_dir={shared}"
    with pytest.raises(ConfigError) as e:
        cfgstring.check(text, state_dir=d.state_dir)
    assert "vloc" in str(e.value)
    with pytest.raises(ConfigError) as e:
        d.registry.acquire(cfgstring.parse(text), lun="lun1", size=SIZE)
    assert "vloc" in str(e.value)
    assert not os.path.exists(c) and d.registry.names() == ["vloc"]
    d.registry.release(loc)


def test_an_image_of_a_volume_served_by_another_process_is_refused(tmp_path, monkeypatch):
    """With a process per volume each registry sees only its own volumes: a new volume with
    its state in one shared directory naming an image file of a volume whose state is in
    another (served by another process of the gateway) is refused all the same - the LUN
    reads the state directories every user:lvmirror backstore of the gateway names - and
    so is the cfgstring in CheckConfig. Nothing is created, the other volume untouched."""
    from lvmirror.daemon import LunServer
    from lvmirror.tcmu import uio
    from lvmirror.tcmu.emulator import RingEmulator
    from tests.unit.test_tcmu_uio_netlink import fake_device

    s1, s2 = tmp_path / "shared1", tmp_path / "shared2"
    s1.mkdir()
    s2.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: p in (str(s1), str(s2)) or real_ismount(p))
    a, b, c = (str(tmp_path / n) for n in ("a.img", "b.img", "c.img"))
    first = f"va;images={a}+{b};state_dir={s1}"
    second = f"vb;images={a}+{c};state_dir={s2}"
    roots = fake_device(tmp_path / "gw", 0, f"tcm-user/1/lun0/lvmirror/{first}", info_size=SIZE)
    fake_device(tmp_path / "gw", 1, f"tcm-user/1/lun1/lvmirror/{second}", info_size=SIZE)
    dev0, dev1 = uio.find_devices("lvmirror", **roots)
    servers = []
    try:
        for dev in (dev0, dev1):            # two registries: two volume processes
            emu = RingEmulator(cmdr_size=(64 << 10) - 128, data_size=1 << 20)
            lun = LunServer(dev, VolumeRegistry(str(tmp_path / "state")), workers=1)
            lun.open(handle=emu.handle())
            servers.append((emu, lun))
        (_, lun0), (_, lun1) = servers
        assert lun0.error is None and lun0.volume.name == "va"
        assert lun1.volume is None and "va" in lun1.error and a in lun1.error
        assert not os.path.exists(c) and not os.path.exists(s2 / "vb")
        with pytest.raises(ConfigError, match="va"):
            cfgstring.check(second, state_dir=str(tmp_path / "state"),
                            other_state_dirs=cfgstring.gateway_state_dirs([first, second]))
    finally:
        for emu, lun in servers:
            lun.stop()
            emu.close()


def _create_in_child(state, name, images, barrier, q):
    reg = VolumeRegistry(state)
    spec = cfgstring.parse(f"{name};images={'+'.join(images)}")
    barrier.wait()
    try:
        reg.acquire(spec, lun=f"lun-{name}", size=SIZE)
        q.put((name, "created"))
        reg.release(spec)
    except ConfigError as exc:
        q.put((name, f"refused: {exc}"))


def test_two_processes_creating_at_once_do_not_share_an_image(tmp_path):
    """lvmirrord's volume processes share its --state-dir: two creating volumes at the same
    moment, naming one image file, must not both pass the one-image-one-volume check (it reads
    the other's metadata, not written yet). The creations hold a lock in the state directory:
    one is created, the other refused. (Without it, 10 of 10 such trials created both.)"""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    for k in range(4):
        d = tmp_path / f"t{k}"
        state = d / "state"
        state.mkdir(parents=True)
        shared = str(d / "shared.img")
        barrier, q = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_create_in_child,
                             args=(str(state), name, [str(d / f"{name}0.img"), shared],
                                   barrier, q))
                 for name in ("volA", "volB")]
        for p in procs:
            p.start()
        got = dict(q.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
        assert sorted(v == "created" for v in got.values()) == [False, True], got
        refused = next(v for v in got.values() if v != "created")
        assert "shared.img" in refused or "vol" in refused, refused


@pytest.mark.parametrize("extra, said", [
    (";intent_chunk=4M", ["intent_chunk 4M (the volume has 64M)"]),
    (";region_size=64K", ["region_size 64K (the volume has 1M)"]),
    (";region_size=2M;intent_chunk=8M", ["region_size 2M (the volume has 1M)",
                                          "intent_chunk 8M (the volume has 64M)"]),
    (";region_size=1M;intent_chunk=64M", []),      # the volume's own values: nothing to say
    ("", []),
])
def test_a_cfgstring_asking_other_geometry_of_an_existing_volume_is_warned_and_ignored(
        vpc, caplog, extra, said):
    a, b, _ = vpc.paths
    d = vpc.restart()
    spec = cfgstring.parse(f"vpc;images={a}+{b}{extra}")
    with caplog.at_level(logging.WARNING, logger="lvmirrord"):
        volume, _ = d.registry.acquire(spec, lun="lun0", size=SIZE)
    assert (volume.region_size, volume.intent_chunk) == (1 << 20, 64 << 20)
    warned = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "fixed when a volume is created" in r.getMessage()]
    if not said:
        assert warned == []
    else:
        assert len(warned) == 1 and all(s in warned[0] for s in said), warned


def test_size_text_round_trips_through_parse():
    for n in (4096, 64 << 10, 1 << 20, 1 << 30):
        assert cfgstring.parse(f"v;region_size={cfgstring.size_text(n)}").region_size == n
    assert [cfgstring.size_text(n) for n in (4096, 3 << 20, 1 << 30, 1536)] == \
        ["4K", "3M", "1G", "1536"]


def _held_judge(monkeypatch):
    """Hold ``MirrorVolume.check_copy`` (the split copy's identity, which may read a sample)
    until the returned Event is set; ``calls`` counts the judgements."""
    from lvmirror.mirror.volume import MirrorVolume
    import threading
    release, reached, calls = threading.Event(), threading.Event(), []
    real = MirrorVolume.check_copy

    def judge(self, image_index, doing="a backup of it"):
        calls.append((image_index, doing))
        reached.set()
        assert release.wait(20), "never released"
        return real(self, image_index, doing)
    monkeypatch.setattr(MirrorVolume, "check_copy", judge)
    return release, reached, calls


@pytest.mark.parametrize("open_first", [True, False])
def test_an_export_judges_its_copy_without_the_registry_lock(vpc, monkeypatch, open_first):
    """A split image's LUN judges the copy's identity (its sample reads are bounded a read,
    not in all) with none of the registry's locks held: the status of the volumes and another
    LUN's open go on meanwhile (trial 33, MEDIUM 2), whether the volume is open already
    (``open_first``) or is opened for the export; the export then does not judge it again."""
    import threading
    d, (a, b, c) = vpc.d, vpc.paths
    volume = d.registry.get("vpc")
    wr(volume, 0, b"x" * 4096)
    volume.split(1)
    if not open_first:
        d.registry.release(vpc.spec)
    release, reached, calls = _held_judge(monkeypatch)
    export = cfgstring.parse("vpc;image=1")
    box = {}
    t = threading.Thread(target=lambda: box.update(r=d.registry.acquire(export, lun="bk0",
                                                                          size=SIZE)))
    t.start()
    assert reached.wait(10)
    done = threading.Event()

    def others():
        d.registry.names()
        d.registry.get("vpc")
        # another volume's LUN opens meanwhile
        reg_spec = cfgstring.parse(f"other;images={c}")
        d.registry.acquire(reg_spec, lun="lun9", size=SIZE)
        d.registry.release(reg_spec)
        done.set()
    threading.Thread(target=others, daemon=True).start()
    assert done.wait(10), "the registry's lock was held while the copy was judged"
    release.set()
    t.join(20)
    _, view = box["r"]
    assert calls == [(1, "an export of it as a LUN")]          # judged once
    d.registry.release(export, view)


def test_an_export_of_a_file_that_is_not_the_copy_closes_the_volume_opened_for_it(vpc):
    """The file at a split image's path replaced: the export is refused with the judgement's
    StateError, and a volume opened only for it is closed again (its name free to open)."""
    d, (a, b, c) = vpc.d, vpc.paths
    volume = d.registry.get("vpc")
    wr(volume, 0, b"x" * 4096)
    volume.split(1)
    d.registry.release(vpc.spec)
    os.rename(b, b + ".copy")
    with open(b, "wb") as f:
        f.write(os.urandom(4096) * (SIZE // 4096))
    with pytest.raises(StateError, match="not the copy|another file|written since"):
        d.registry.acquire(cfgstring.parse("vpc;image=1"), lun="bk0", size=SIZE)
    assert "vpc" not in d.registry.names()
    os.replace(b + ".copy", b)
    _, view = d.registry.acquire(cfgstring.parse("vpc;image=1"), lun="bk0", size=SIZE)
    d.registry.release(cfgstring.parse("vpc;image=1"), view)


def test_an_export_judged_while_the_volume_is_released_opens_it_again(vpc, monkeypatch):
    """The volume's last other LUN is released (the volume closed) while a split image's LUN
    judges the copy without the registry's lock: the judgement on the closed volume fails for
    that alone, and the export opens the volume anew and is judged there, as when the release
    came first (trial 35, MEDIUM: refused with "volume vpc is closed", or with "its sample
    could not be read" when the stat fields did not settle it)."""
    import threading
    d = vpc.d
    volume = d.registry.get("vpc")
    wr(volume, 0, b"x" * 4096)
    volume.split(1)
    release, reached, calls = _held_judge(monkeypatch)
    export = cfgstring.parse("vpc;image=1")
    box = {}

    def acquire():
        try:
            box["r"] = d.registry.acquire(export, lun="bk0", size=SIZE)
        except Exception as e:            # re-raised below
            box["e"] = e
    t = threading.Thread(target=acquire)
    t.start()
    assert reached.wait(10)
    d.registry.release(vpc.spec)          # the volume's last LUN: closed
    assert "vpc" not in d.registry.names()
    release.set()
    t.join(20)
    assert "e" not in box, box.get("e")
    _, view = box["r"]
    assert len(calls) == 2 and d.registry.get("vpc") is not volume
    d.registry.release(export, view)
