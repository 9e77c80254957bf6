"""Faults: an image error fails that image, the volume carries on degraded, re-add resyncs."""

import logging
import os

import pytest

from lvmirror.errors import ConfigError, StateError, VolumeIOError
from lvmirror.mirror.volume import ImageState, MirrorVolume

from tests.unit.test_volume_helpers import (BS, Opener, image_bytes, make_volume, pattern, read,
                                            write)


@pytest.mark.parametrize("fanout", ["parallel", "serial"])
def test_write_error_fails_image_and_volume_carries_on(tmp_path, fanout):
    vol, opener, paths = make_volume(tmp_path, 2, region_size=4096, fanout=fanout)
    opener.by_path[paths[1]].fail_writes = True
    write(vol, 16, pattern(4, 1))                            # no error to the initiator
    im = vol.images[1]
    assert im.state is ImageState.FAILED and "injected write error" in im.error
    assert list(vol.change_bitmap(1).dirty_regions()) == [(16 * BS) // 4096]
    write(vol, 200, pattern(4, 2))                           # later writes: recorded
    assert (200 * BS) // 4096 in list(vol.change_bitmap(1).dirty_regions())
    assert read(vol, 16, 4) == pattern(4, 1)
    # Persisted at once: metadata says failed even before close.
    import json
    md = json.loads((tmp_path / "meta" / "vol" / "volume.json").read_text())
    assert md["images"][1]["state"] == "failed"
    # Re-add: clear the fault, resync from the bitmap.
    opener.by_path[paths[1]].fail_writes = False
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    assert job.progress()["bytes_done"] == 2 * 4096            # only the marked regions
    assert vol.images[1].state is ImageState.IN_SYNC
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol.close()


def test_read_error_fails_over(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2)
    write(vol, 0, pattern(8, 3))
    opener.by_path[paths[0]].fail_reads = True
    opener.by_path[paths[1]].fail_reads = False
    for _ in range(3):
        assert read(vol, 0, 8) == pattern(8, 3)
    assert vol.images[0].state is ImageState.FAILED
    assert vol.images[1].state is ImageState.IN_SYNC
    assert vol.stats["read_errors"] == 1
    vol.close()


def test_last_in_sync_image_error_goes_to_initiator(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2)
    for p in paths:
        opener.by_path[p].fail_writes = True
    with pytest.raises(VolumeIOError) as ei:
        write(vol, 0, pattern(1, 1))
    assert ei.value.is_read is False
    states = [i.state for i in vol.images]
    assert states.count(ImageState.IN_SYNC) == 1             # the last one is never failed
    # ... but it cannot hold data: the volume is offline (NOT READY), not silently serving
    assert vol.health == "offline"
    with pytest.raises(StateError, match="offline"):
        read(vol, 0, 1)
    for p in paths:
        opener.by_path[p].fail_writes = opener.by_path[p].fail_reads = False
    assert vol.probe()                                      # the flusher does it every round
    write(vol, 0, pattern(1, 2))
    assert read(vol, 0, 1) == pattern(1, 2)
    vol.close()


def test_missing_image_at_open_degrades(tmp_path):
    vol, _, paths = make_volume(tmp_path, 2)
    write(vol, 0, pattern(2, 1))
    vol.close()
    os.rename(paths[1], paths[1] + ".gone")
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    im = vol.images[1]
    assert im.state is ImageState.FAILED and "no such file" in im.error
    assert read(vol, 0, 2) == pattern(2, 1)
    write(vol, 8, pattern(1, 5))
    os.rename(paths[1] + ".gone", paths[1])
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol.close()
    os.unlink(paths[0])
    os.unlink(paths[1])
    with pytest.raises(ConfigError, match="no in-sync image"):
        MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)


def test_shrunk_image_refused_at_open(tmp_path):
    vol, _, paths = make_volume(tmp_path, 2)
    vol.close()
    os.truncate(paths[1], 4096)
    with pytest.raises(ConfigError, match="img1.*smaller than"):
        MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)


def test_syncing_image_failure_stops_resync(tmp_path, caplog):
    opener = Opener()
    vol, _, paths = make_volume(tmp_path, 1, opener=opener)
    write(vol, 0, pattern(4, 1))
    newpath = str(tmp_path / "new")
    # Attach with the new image failing every write: the job fails, the image is failed.
    real = opener.__call__

    def failing(path, *, direct=False):
        img = real(path, direct=direct)
        if path == newpath:
            img.fail_writes = True
        return img
    vol._opener = failing
    idx = vol.attach(newpath)
    job = vol.jobs[vol.images[idx].id]
    assert job.wait(10)
    assert job.state == "failed"
    assert vol.images[idx].state is ImageState.FAILED
    # the journal says the copy stopped, with how far it got (not only status)
    ends = [r.getMessage() for r in caplog.records
            if r.levelno == logging.ERROR and r.name == "lvmirror.mirror.resync"]
    assert ends == [f"volume vol: resync of image id {job.image_id} ({newpath}) failed after "
                    f"{job.bytes_done} of {job.bytes_total} bytes: {job.error}"], ends
    assert read(vol, 0, 4) == pattern(4, 1)
    vol.close()
