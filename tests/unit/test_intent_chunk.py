"""The write-intent chunk: one write-intent log bit covers ``intent_chunk`` bytes (64 MiB by
default, mdadm's internal bitmap chunk), coarser than the change bitmaps' regions. Fewer bits
set means fewer log saves on a random writer's way; after a crash every region of a marked
chunk is copied, merged into the split images' change bitmaps, and kept in the log until the
copy is durable."""

import json
import random

import pytest

from lvmirror import cfgstring
from lvmirror.errors import ConfigError
from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.metadata import INTENT_CHUNK, VolumeMetadata
from lvmirror.mirror.volume import ImageState, MirrorVolume
from lvmirror.mirror.wil import WriteIntentLog, read_log

from tests.unit.test_volume_helpers import (BS, Opener, image_bytes, make_volume, pattern, read,
                                            write)

REGION = 64 << 10
CHUNK = 1 << 20
SIZE = 8 << 20


def _wil_path(tmp_path):
    return str(tmp_path / "meta" / "vol" / "wil.bitmap")


def _reopen(tmp_path, **kw):
    return MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                             flush_interval=None, **kw)


def test_the_default_chunk_is_mdadms_and_is_kept_in_the_metadata(tmp_path):
    vol = MirrorVolume.create("vol", [str(tmp_path / "a"), str(tmp_path / "b")],
                              meta_dir=str(tmp_path / "meta"), size=SIZE, region_size=REGION,
                              flush_interval=None)
    assert vol.intent_chunk == INTENT_CHUNK == 64 << 20
    vol.close()
    md = json.loads((tmp_path / "meta" / "vol" / "volume.json").read_text())
    assert md["intent_chunk"] == 64 << 20 and md["region_size"] == REGION
    bm, _, _ = read_log(_wil_path(tmp_path))
    assert bm.region_size == 64 << 20 and bm.nregions == 1
    vol = _reopen(tmp_path)
    assert vol.intent_chunk == 64 << 20
    vol.close()


def test_a_region_larger_than_the_default_chunk_is_the_chunk(tmp_path):
    md = VolumeMetadata.new("v", block_size=512, size=1 << 30, region_size=128 << 20)
    assert md.intent_chunk == 128 << 20


@pytest.mark.parametrize("chunk", [REGION // 2, 3 << 20, 0, "1M", 1 << 41, 1 << 64, 10 ** 400])
def test_a_chunk_that_is_not_a_power_of_two_of_whole_regions_is_refused(tmp_path, chunk):
    with pytest.raises(ConfigError, match="write-intent chunk"):
        MirrorVolume.create("vol", [str(tmp_path / "a"), str(tmp_path / "b")],
                            meta_dir=str(tmp_path / "meta"), size=SIZE, region_size=REGION,
                            intent_chunk=chunk, flush_interval=None)
    assert not (tmp_path / "meta" / "vol").exists()


@pytest.mark.parametrize("chunk", [REGION, CHUNK])
def test_random_writes_save_the_log_once_per_chunk_they_first_touch(tmp_path, chunk):
    """A bit newly set is a log save (an fdatasync) before the write goes on; a bit already set
    and durable is not. 200 random 4 KiB writes over 8 MiB touch nearly every 64 KiB region,
    and every one of the eight 1 MiB chunks."""
    vol, _, _ = make_volume(tmp_path, 2, size=SIZE, region_size=REGION, intent_chunk=chunk)
    vol.checkpoint()
    assert vol.stats["wil_dirty_chunks"] == 0
    saves = vol.stats["wil_saves"]
    rnd = random.Random(7)
    lbas = [rnd.randrange(SIZE // BS - 8) & ~7 for _ in range(200)]
    for k, lba in enumerate(lbas):
        write(vol, lba, pattern(8, k))
    touched = {(lba * BS) // chunk for lba in lbas}
    assert vol.stats["wil_saves"] - saves == len(touched)
    assert vol.stats["wil_dirty_chunks"] == len(touched)
    assert set(read_log(_wil_path(tmp_path))[0].dirty_regions()) == touched
    if chunk == CHUNK:
        assert len(touched) == SIZE // CHUNK
    vol.close()


def test_after_a_crash_every_region_of_a_marked_chunk_is_copied_and_tracked(tmp_path):
    """A write in flight at the crash may have reached image 0 and not image 1 anywhere in a
    chunk the log marks (its bit stood for all of it): recovery copies each region of that
    chunk, and merges them all into the split image's change bitmap, whose lazy copy may have
    missed the write."""
    vol, _, paths = make_volume(tmp_path, 3, size=SIZE, region_size=REGION, intent_chunk=CHUNK)
    write(vol, 0, pattern(16, 1))
    vol.split(2)
    vol.checkpoint()
    lba = (3 * CHUNK + 5 * REGION) // BS            # chunk 3, its region 5
    write(vol, lba, pattern(4, 2))                  # logged; the split bitmap is lazy
    # "crash": the instance is abandoned. Image 1 holds an older version of another region of
    # chunk 3 (a write in flight there reached image 0 only).
    other = 3 * CHUNK + 9 * REGION
    with open(paths[1], "r+b") as f:
        f.seek(other)
        f.write(b"\x5a" * 4096)
    assert image_bytes(paths[0], other, 4096) != image_bytes(paths[1], other, 4096)
    vol2 = _reopen(tmp_path)
    per = CHUNK // REGION
    chunk3 = set(range(3 * per, 4 * per))
    job = vol2.recovery.progress()
    assert job["bytes_total"] == CHUNK              # the whole chunk, region by region
    answers = {read(vol2, other // BS, 8) for _ in range(4)}
    assert answers == {image_bytes(paths[0], other, 4096)}   # one image answers until copied
    assert chunk3 <= set(vol2.change_bitmap(2).dirty_regions())
    vol2.checkpoint()
    vol2._recovery.join(10)
    assert vol2.stats["torn_regions"] == 0
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol2.checkpoint()
    assert read_log(_wil_path(tmp_path))[0].count() == 0
    assert vol2.images[2].state is ImageState.SPLIT
    job = vol2.resync(2)
    assert job.wait(10) and job.state == "done"
    assert image_bytes(paths[2]) == image_bytes(paths[0])
    vol2.close()


def test_a_torn_region_keeps_its_chunk_in_the_log(tmp_path):
    """A region the images may differ on (crash recovery not done yet) keeps the bit of its
    chunk set in the log through checkpoints: the log must mark it until it is repaired."""
    vol, _, paths = make_volume(tmp_path, 2, size=SIZE, region_size=REGION, intent_chunk=CHUNK)
    vol.checkpoint()
    write(vol, (2 * CHUNK + REGION) // BS, pattern(2, 3))
    vol2 = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                             flush_interval=None)
    vol2._recovery.join(10)          # copies the 16 regions; the log clears at a checkpoint
    assert vol2._torn_chunks() == set()
    with vol2._elock:
        vol2._torn.add(2 * (CHUNK // REGION) + 7)     # as a full file system leaves one
    assert vol2._torn_chunks() == {2}
    vol2._wil.clean(vol2._wil.ticket(), vol2._torn_chunks())
    assert 2 in set(read_log(_wil_path(tmp_path))[0].dirty_regions())
    vol2.checkpoint()                # repairs it, then the bit may go
    vol2.checkpoint()
    assert read_log(_wil_path(tmp_path))[0].count() == 0
    vol2.close()


def test_a_volume_from_before_intent_chunk_gets_the_default_and_keeps_its_marks(tmp_path):
    """volume.json written before intent_chunk existed (its log marked 64 KiB regions): it
    opens with the default chunk, the log on disk is coarsened to it (every chunk holding a
    marked region is marked: a superset), and a crash's regions are still all copied."""
    vol, _, paths = make_volume(tmp_path, 2, size=SIZE, region_size=REGION,
                                intent_chunk=REGION)
    vol.checkpoint()
    write(vol, (5 * REGION) // BS, pattern(2, 4))
    assert set(read_log(_wil_path(tmp_path))[0].dirty_regions()) == {5}
    with open(paths[1], "r+b") as f:                 # the write reached image 0 only
        f.seek(5 * REGION)
        f.write(bytes(2 * BS))
    jpath = tmp_path / "meta" / "vol" / "volume.json"
    md = json.loads(jpath.read_text())
    del md["intent_chunk"]
    jpath.write_text(json.dumps(md))
    vol2 = _reopen(tmp_path)
    assert vol2.intent_chunk == 64 << 20
    assert vol2.recovery.progress()["bytes_total"] == SIZE     # one chunk: the whole volume
    vol2.checkpoint()
    vol2._recovery.join(10)
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    vol2.close()
    bm, _, _ = read_log(_wil_path(tmp_path))
    assert bm.region_size == 64 << 20 and bm.count() == 0
    assert json.loads(jpath.read_text())["intent_chunk"] == 64 << 20


def test_a_log_saved_with_another_chunk_loads_as_a_superset(tmp_path):
    path = str(tmp_path / "wil.bitmap")
    old = WriteIntentLog(path, SIZE, REGION)
    old.save()
    for r in (0, 17, 40, 41):                       # chunks 0, 1, 2, 2
        old.bitmap.mark_region(r)
    old.save()
    wil, problem = WriteIntentLog.load_or_create(path, SIZE, CHUNK)
    assert problem is None
    assert list(wil.dirty_regions()) == [0, 1, 2]
    wil.save()                                      # rewritten whole, in the new geometry
    bm, seq, slot = read_log(path, SIZE, CHUNK)
    assert list(bm.dirty_regions()) == [0, 1, 2] and (seq, slot) == (1, 0)
    fine, problem = WriteIntentLog.load_or_create(path, SIZE, REGION)   # and back: finer
    assert list(fine.dirty_regions()) == list(range(0, 3 * (CHUNK // REGION)))


def test_mark_bitmap_marks_every_region_a_coarser_or_finer_bit_covers():
    coarse = RegionBitmap(SIZE + 4096, CHUNK)        # the last chunk is partial
    coarse.mark_region(1)
    coarse.mark_region(8)
    fine = RegionBitmap(SIZE + 4096, REGION)
    fine.mark_bitmap(coarse)
    assert list(fine.dirty_regions()) == list(range(16, 32)) + [128]
    back = RegionBitmap(SIZE + 4096, CHUNK)
    back.mark_bitmap(fine)
    assert back == coarse
    with pytest.raises(ValueError, match="size mismatch"):
        RegionBitmap(SIZE, REGION).mark_bitmap(coarse)


def test_metadata_validates_intent_chunk(tmp_path):
    md = VolumeMetadata.new("v", block_size=512, size=SIZE, region_size=REGION)
    md.add_image(str(tmp_path / "a"), "in-sync")
    d = md.to_json()
    assert d["intent_chunk"] == 64 << 20
    assert VolumeMetadata.from_json(d).intent_chunk == 64 << 20
    for bad in (REGION // 2, 3 << 20, "64M", 1 << 41, 1 << 64):
        d["intent_chunk"] = bad
        with pytest.raises(ConfigError, match="intent_chunk"):
            VolumeMetadata.from_json(d)


def test_cfgstring_intent_chunk():
    spec = cfgstring.parse("vol0;images=/a+/b;intent_chunk=4M")
    assert spec.intent_chunk == 4 << 20
    assert cfgstring.format(spec) == "vol0;images=/a+/b;intent_chunk=4M"
    assert cfgstring.parse("vol0;images=/a+/b").intent_chunk is None
    assert cfgstring.parse("vol0;images=/a+/b;region_size=4M;intent_chunk=4M").intent_chunk \
        == 4 << 20
    for bad, why in (("intent_chunk=3M", "power of two"), ("intent_chunk=2K", "power of two"),
                     ("intent_chunk=2G", "power of two"), ("intent_chunk=x", "not a size"),
                     ("region_size=4M;intent_chunk=1M", "finer than region_size"),
                     ("intent_chunk=512K", "finer than region_size")):
        with pytest.raises(ConfigError, match=why):
            cfgstring.parse(f"vol0;images=/a+/b;{bad}")
    with pytest.raises(ConfigError, match="belongs to the volume"):
        cfgstring.parse("vol0;image=1;intent_chunk=4M")
