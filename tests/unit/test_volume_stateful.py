"""Hypothesis stateful test: random writes, unmaps, reads, splits, resyncs, restores, faults and
restarts against an in-memory model; every image file is checked against the model each step."""

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lvmirror.mirror.volume import ImageState, MirrorVolume

from tests.unit.test_volume_helpers import BS, Opener, image_bytes, pattern

NBLOCKS = 128
SIZE = NBLOCKS * BS
REGION = 4096
NIMAGES = 3


class MirrorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="lvm-stateful-"))
        self.opener = Opener()
        self.paths = [str(self.dir / f"img{k}") for k in range(NIMAGES)]
        self.vol = MirrorVolume.create("vol", self.paths, meta_dir=str(self.dir / "meta"),
                                       size=SIZE, region_size=REGION, opener=self.opener,
                                       flush_interval=None, fanout="parallel")
        for job in self.vol.jobs.values():
            assert job.wait(10) and job.state == "done"
        self.live = bytearray(SIZE)
        self.state = ["in-sync"] * NIMAGES
        self.snap = [None] * NIMAGES
        self.seed = 0

    def teardown(self):
        try:
            self.vol.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def in_sync(self):
        return [k for k in range(NIMAGES) if self.state[k] == "in-sync"]

    # -- I/O --------------------------------------------------------------------------------------

    @rule(lba=st.integers(0, NBLOCKS - 1), n=st.integers(1, 12))
    def write(self, lba, n):
        n = min(n, NBLOCKS - lba)
        self.seed += 1
        data = pattern(n, self.seed)
        self.vol.write(lba, [memoryview(bytearray(data))])
        self.live[lba * BS:(lba + n) * BS] = data

    @rule(lba=st.integers(0, NBLOCKS - 1), n=st.integers(1, 16))
    def unmap(self, lba, n):
        n = min(n, NBLOCKS - lba)
        self.vol.unmap(lba, n)
        self.live[lba * BS:(lba + n) * BS] = bytes(n * BS)

    @rule(lba=st.integers(0, NBLOCKS - 1), n=st.integers(1, 16))
    def read(self, lba, n):
        n = min(n, NBLOCKS - lba)
        out = bytearray(n * BS)
        self.vol.read(lba, [memoryview(out)])
        assert out == self.live[lba * BS:(lba + n) * BS]

    # -- management -------------------------------------------------------------------------------

    @precondition(lambda self: len(self.in_sync()) >= 2)
    @rule(data=st.data())
    def split(self, data):
        k = data.draw(st.sampled_from(self.in_sync()))
        self.vol.split(k)
        self.state[k] = "split"
        self.snap[k] = bytes(self.live)

    @precondition(lambda self: any(s in ("split", "failed") for s in self.state))
    @rule(data=st.data())
    def resync(self, data):
        k = data.draw(st.sampled_from([i for i in range(NIMAGES)
                                       if self.state[i] in ("split", "failed")]))
        self.opener.by_path[self.paths[k]].fail_writes = False
        job = self.vol.resync(k)
        assert job.wait(10) and job.state == "done", job.progress()
        self.state[k] = "in-sync"
        self.snap[k] = None

    @precondition(lambda self: "split" in self.state)
    @rule(data=st.data())
    def restore(self, data):
        k = data.draw(st.sampled_from([i for i in range(NIMAGES) if self.state[i] == "split"]))
        job = self.vol.restore(k)
        assert job.wait(10) and job.state == "done", job.progress()
        self.live[:] = self.snap[k]
        # Every other split image's bitmap must now cover the regions restore changed.

    @precondition(lambda self: len(self.in_sync()) >= 2)
    @rule(data=st.data(), lba=st.integers(0, NBLOCKS - 4))
    def fail_image(self, data, lba):
        k = data.draw(st.sampled_from(self.in_sync()))
        self.opener.by_path[self.paths[k]].fail_writes = True
        self.seed += 1
        d = pattern(4, self.seed)
        self.vol.write(lba, [memoryview(bytearray(d))])      # succeeds on the others
        self.live[lba * BS:(lba + 4) * BS] = d
        assert self.vol.images[k].state is ImageState.FAILED
        self.state[k] = "failed"

    @rule()
    def checkpoint(self):
        self.vol.checkpoint()

    @rule()
    def restart(self):
        self.vol.close()
        for k in range(NIMAGES):
            if self.paths[k] in self.opener.by_path:
                self.opener.by_path[self.paths[k]].fail_writes = False
        self.vol = MirrorVolume.open("vol", meta_dir=str(self.dir / "meta"), opener=self.opener,
                                     flush_interval=None, fanout="parallel")

    # -- checks -----------------------------------------------------------------------------------

    @invariant()
    def images_match_model(self):
        infos = self.vol.images
        assert [i.state.value for i in infos] == self.state
        for k in range(NIMAGES):
            if self.state[k] == "in-sync":
                assert image_bytes(self.paths[k]) == self.live, f"in-sync image {k} differs"
            elif self.state[k] == "split":
                content = image_bytes(self.paths[k])
                assert content == self.snap[k], f"split image {k} changed"
                dirty = set(self.vol.change_bitmap(k).dirty_regions())
                for r in range(SIZE // REGION):
                    sl = slice(r * REGION, (r + 1) * REGION)
                    if content[sl] != self.live[sl]:
                        assert r in dirty, f"image {k} region {r} differs but is not marked"
            elif self.state[k] == "failed":
                content = image_bytes(self.paths[k])
                dirty = set(self.vol.change_bitmap(k).dirty_regions())
                for r in range(SIZE // REGION):
                    sl = slice(r * REGION, (r + 1) * REGION)
                    if content[sl] != self.live[sl]:
                        assert r in dirty, f"failed image {k} region {r} differs, not marked"


MirrorMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestMirrorVolumeModel = MirrorMachine.TestCase
