"""The identity of a split copy (mirror/copyid.py): a resync or restore that trusts the change
bitmap refuses a file that is not the copy the split made (trial 26, MEDIUM 3)."""

import json
import os
import shutil

import pytest

from lvmirror.errors import ConfigError, StateError, VolumeIOError
from lvmirror.mirror import copyid
from lvmirror.mirror.metadata import VolumeMetadata
from lvmirror.mirror.volume import ImageState, MirrorVolume

from tests.unit.test_volume_helpers import (BS, Gate, Opener, image_bytes, make_volume,
                                            pattern, read, run_thread, write)

SIZE = 1 << 20
REGION = 64 << 10


def _reopen(tmp_path, vol):
    vol.close()
    return MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                             flush_interval=None)


def _split_with_data(tmp_path, nimages=2):
    """A volume whose every sampled range holds data, image ``nimages - 1`` split, then a
    write to region 3 on the live images only."""
    vol, _, paths = make_volume(tmp_path, nimages, size=SIZE, region_size=REGION)
    write(vol, 0, pattern(SIZE // BS, 1))
    vol.split(nimages - 1)
    write(vol, 3 * REGION // BS, pattern(4, 2))
    return vol, paths


def _unsampled_offset(size):
    """A byte offset, 512-aligned, outside every sampled range."""
    ranges = copyid.sample_ranges(size)
    off = ranges[1][0] + ranges[1][1] + 8192
    assert all(not (o <= off < o + ln) for o, ln in ranges)
    return off


@pytest.mark.parametrize("size", [512, 4096, 64 << 10, 100 * 512, 1 << 20, (1 << 30) + 512])
def test_sample_ranges_stay_inside_and_apart(size):
    ranges = copyid.sample_ranges(size)
    assert ranges and ranges[0][0] == 0
    end = 0
    for off, ln in ranges:
        assert off >= end and off + ln <= size and ln % 512 == 0 and ln > 0
        end = off + ln
    assert sum(ln for _, ln in ranges) <= copyid.SAMPLE_BYTES
    if size >= 1 << 30:
        assert len(ranges) == 1 + copyid.SAMPLE_SLICES


def test_split_records_the_copy_and_keeps_it_across_a_restart(tmp_path):
    vol, paths = _split_with_data(tmp_path)
    cid = vol._images[1].rec.copy_id
    st = os.stat(paths[1])
    assert cid["kind"] == "file" and cid["ino"] == st.st_ino and cid["mtime_ns"] == st.st_mtime_ns
    assert len(cid["sample"]) == len(copyid.sample_ranges(SIZE)) and cid["zero"] is False
    assert all(len(d) == 32 and int(d, 16) >= 0 for d in cid["sample"])
    vol = _reopen(tmp_path, vol)
    assert vol._images[1].rec.copy_id == cid
    job = vol.resync(1)              # the same file: the bitmap is trusted, one region copied
    assert job.wait(10) and job.state == "done" and job.bytes_total == REGION
    assert image_bytes(paths[1]) == image_bytes(paths[0])
    assert vol._images[1].rec.copy_id is None      # in sync: no longer a split copy
    vol.close()


def test_another_file_put_back_is_refused_and_full_copies_it_all(tmp_path, caplog):
    vol, paths = _split_with_data(tmp_path)
    vol.close()
    with open(paths[1], "r+b") as f:     # an older copy: same size, other content
        f.write(pattern(SIZE // BS, 7))
    tmp = paths[1] + ".other"
    shutil.copyfile(paths[1], tmp)
    os.replace(tmp, paths[1])
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    with pytest.raises(StateError, match=r"is not the copy lvmirror split off: its "
                                         r"modification time changed.*'lvmirror resync vol 1 "
                                         r"--full'"):
        vol.resync(1)
    cid = vol._images[1].rec.copy_id     # with the copy's time: the content gives it away
    os.utime(paths[1], ns=(cid["mtime_ns"], cid["mtime_ns"]))
    vol = _reopen(tmp_path, vol)
    with pytest.raises(StateError, match=r"is not the copy lvmirror split off: its content "
                                         r"differs.*'lvmirror resync vol 1 --full'"):
        vol.resync(1)
    with pytest.raises(StateError, match=r"'lvmirror restore vol 1 --full'"):
        vol.restore(1)
    with pytest.raises(StateError, match="not the copy"):
        vol.check_restore(1)
    assert vol.images[1].state is ImageState.SPLIT and not vol.jobs
    with caplog.at_level("WARNING", logger="lvmirror"):
        job = vol.resync(1, full=True)
    # the journal's warning says it as the refusals do (trial 34, LOW)
    assert any("image 1 (" in r.getMessage() and "is not the copy lvmirror split off: its "
               "content differs" in r.getMessage() and r.getMessage().endswith(
                   "the full resync copies every region into it") for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
    assert job.wait(10) and job.state == "done" and job.bytes_total == SIZE
    assert image_bytes(paths[1]) == image_bytes(paths[0])
    vol.close()


def test_a_full_restore_takes_the_file_as_the_copy(tmp_path):
    vol, paths = _split_with_data(tmp_path)
    vol.close()
    other = bytes(pattern(SIZE // BS, 9))
    with open(paths[1] + ".new", "wb") as f:
        f.write(other)
    os.replace(paths[1] + ".new", paths[1])
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    job = vol.restore(1, full=True)
    assert job.bytes_total == SIZE                  # every region, not the bitmap's one
    assert read(vol, 0, SIZE // BS) == other        # reads as the file at once
    assert job.wait(10) and job.state == "done"
    assert image_bytes(paths[0]) == other
    # the file is now the copy the volume was rolled back to: its bitmap is trusted again
    assert vol._images[1].rec.copy_id["ino"] == os.stat(paths[1]).st_ino
    write(vol, 5, pattern(1, 3))
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done" and job.bytes_total == REGION
    assert image_bytes(paths[1]) == image_bytes(paths[0])
    vol.close()


def test_a_copy_written_in_place_outside_lvmirror_is_refused(tmp_path):
    """fsck or a read-write mount of the split copy: the same inode, a newer mtime, even
    where the sample does not look."""
    vol, paths = _split_with_data(tmp_path)
    off = _unsampled_offset(SIZE)
    with open(paths[1], "r+b") as f:
        f.seek(off)
        f.write(b"\xee" * BS)
    with pytest.raises(StateError, match="modification time changed since the split: it "
                                         "was written by something other than lvmirror"):
        vol.resync(1)
    vol.close()


def test_the_copy_put_back_with_its_time_is_accepted_without_it_refused(tmp_path):
    """cp -p (shutil.copy2) keeps the mtime: judged by the sample, accepted; a plain cp
    (a new mtime) cannot be told from another file: refused."""
    vol, paths = _split_with_data(tmp_path)
    vol.close()
    shutil.copy2(paths[1], str(tmp_path / "away"))       # moved away and back: a new inode
    os.unlink(paths[1])
    shutil.copyfile(str(tmp_path / "away"), paths[1])
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    with pytest.raises(StateError, match="modification time changed.*cp -p"):
        vol.resync(1)
    vol.close()
    os.unlink(paths[1])
    shutil.copy2(str(tmp_path / "away"), paths[1])
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done" and job.bytes_total == REGION
    assert image_bytes(paths[1]) == image_bytes(paths[0])
    vol.close()


def test_a_new_empty_file_does_not_pass_for_an_empty_copy(tmp_path):
    vol, _, paths = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    write(vol, _unsampled_offset(SIZE) // BS, pattern(1, 4))     # data the sample misses
    vol.split(1)
    assert vol._images[1].rec.copy_id["zero"] is True
    cid = vol._images[1].rec.copy_id
    vol.close()
    os.rename(paths[1], str(tmp_path / "kept"))     # kept: the new file gets another inode
    with open(paths[1], "wb") as f:
        f.truncate(SIZE)
    os.utime(paths[1], ns=(cid["mtime_ns"], cid["mtime_ns"]))    # even with the copy's time
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    with pytest.raises(StateError, match="sampled blocks are all zeros"):
        vol.resync(1)
    vol.close()


def test_a_path_replaced_while_held_is_refused_even_full(tmp_path):
    vol, paths = _split_with_data(tmp_path)
    with open(paths[1] + ".new", "wb") as f:
        f.write(image_bytes(paths[1]))
    os.replace(paths[1] + ".new", paths[1])
    for full in (False, True):
        with pytest.raises(StateError, match="names another file than the one lvmirrord holds "
                                             "open.*detach the image and attach the file"):
            vol.resync(1, full=full)
        with pytest.raises(StateError, match="names another file"):
            vol.restore(1, full=full)
    assert vol.images[1].state is ImageState.SPLIT
    vol.close()


def test_an_export_writes_the_copy_and_its_identity_follows(tmp_path):
    vol, paths = _split_with_data(tmp_path)
    exp = vol.split_image(1)
    assert vol._images[1].rec.copy_id["exported"] is True
    exp.write(10, [memoryview(pattern(2, 5))])       # a journal replay on the copy's LUN
    exp.flush()
    # were lvmirrord killed now, the saved identity says exported: the inode alone counts
    saved = json.load(open(VolumeMetadata.json_path(str(tmp_path / "meta"), "vol")))
    assert saved["images"][1]["copy_id"]["exported"] is True
    exp.close()
    cid = vol._images[1].rec.copy_id
    assert "exported" not in cid and cid["mtime_ns"] == os.stat(paths[1]).st_mtime_ns
    job = vol.resync(1)      # the export's region and the live write's region
    assert job.wait(10) and job.state == "done" and job.bytes_total == 2 * REGION
    assert image_bytes(paths[1]) == image_bytes(paths[0])
    vol.close()


def test_a_stopped_restore_is_not_resumed_from_another_file(tmp_path):
    vol, paths = _split_with_data(tmp_path)
    write(vol, 8 * REGION // BS, pattern(4, 6))
    job = vol.restore(1, rate_limit=0.01)
    job.cancel()
    job.wait(10)
    vol.close()
    with open(paths[1] + ".new", "wb") as f:
        f.write(pattern(SIZE // BS, 8))
    os.replace(paths[1] + ".new", paths[1])
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    # resumed at open, but not from this file: closed, the job fails, I/O to a region not
    # rolled back gets an error instead of the foreign file's data
    job = vol.control.restore_job
    assert job is not None and job.wait(10) and job.state == "failed"
    assert vol._images[1].storage is None
    assert "not the split copy: its modification time changed" in vol._images[1].rec.error
    with pytest.raises(VolumeIOError, match="is not restored yet"):
        read(vol, 8 * REGION // BS, 1)
    for full in (False, True):
        with pytest.raises(StateError, match="the unfinished restore from it.*abandon-restore "
                                             "vol 1 --force"):
            vol.restore(1, full=full)
        assert vol._images[1].storage is None      # opened to check, closed again
    vol.control.abandon_restore(1)
    with pytest.raises(StateError, match="'lvmirror restore vol 1 --full'"):
        vol.restore(1)
    job = vol.restore(1, full=True)
    assert job.wait(10) and job.state == "done"
    assert image_bytes(paths[0]) == bytes(pattern(SIZE // BS, 8))
    vol.close()


def test_an_image_split_before_identities_is_not_checked(tmp_path):
    """volume.json written by an older lvmirror has no copy_id: taken as before (logged in
    the docs), never refused."""
    vol, paths = _split_with_data(tmp_path)
    vol.close()
    p = VolumeMetadata.json_path(str(tmp_path / "meta"), "vol")
    d = json.load(open(p))
    del d["images"][1]["copy_id"]
    json.dump(d, open(p, "w"))
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    assert vol._images[1].rec.copy_id is None
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    vol.close()


def test_copy_id_must_be_an_object(tmp_path):
    vol, _ = _split_with_data(tmp_path)
    vol.close()
    p = VolumeMetadata.json_path(str(tmp_path / "meta"), "vol")
    d = json.load(open(p))
    d["images"][1]["copy_id"] = "abc"
    json.dump(d, open(p, "w"))
    with pytest.raises(ConfigError, match="field 'copy_id' must be dict"):
        VolumeMetadata.load(str(tmp_path / "meta"), "vol")


def test_a_sample_that_cannot_be_read_is_a_mismatch_naming_the_error(tmp_path):
    vol, paths = _split_with_data(tmp_path)
    vol.close()
    shutil.copy2(paths[1], paths[1] + ".cp")         # another inode, the copy's time
    os.replace(paths[1] + ".cp", paths[1])
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    st = vol._images[1].storage

    def failing(off, view):
        raise OSError(5, "Input/output error")
    mm = copyid.check(vol._images[1].rec.copy_id, st, failing, SIZE)
    assert mm is not None and not mm.held and "Input/output error" in mm.reason
    ident = copyid.record(st, failing, SIZE)
    assert ident["sample"] is None and "Input/output error" in ident["error"]
    mm = copyid.check(ident, st, failing, SIZE)
    assert mm is None       # the same inode and mtime: no sample needed
    vol.close()


def test_times_a_power_cut_took_back_are_judged_by_the_sample(tmp_path, monkeypatch):
    """fdatasync (the split's flush) does not make the inode's times durable: after a power
    cut the same inode may show an earlier mtime and ctime. The sample decides then. An
    earlier mtime with a later ctime was set by hand (cp -p, touch -d): refused."""
    vol, paths = _split_with_data(tmp_path)
    cid = dict(vol._images[1].rec.copy_id)
    st = vol._images[1].storage
    real = copyid._stat_fields(st)

    def now(**changes):
        monkeypatch.setattr(copyid, "_stat_fields", lambda s: dict(real, **changes))

    def read(off, view):
        st.readv(off, [view])
    now(mtime_ns=cid["mtime_ns"] - 10**9, ctime_ns=cid["ctime_ns"] - 10**9)
    assert copyid.check(cid, st, read, SIZE) is None
    other = dict(cid, sample=["0" * 32] * len(cid["sample"]))
    mm = copyid.check(other, st, read, SIZE)
    assert mm and "content differs" in mm.reason
    now(mtime_ns=cid["mtime_ns"] - 10**9, ctime_ns=cid["ctime_ns"] + 1)
    mm = copyid.check(cid, st, read, SIZE)
    assert mm and "modification time changed" in mm.reason
    vol.close()


def test_an_older_copy_put_back_with_its_time_is_refused(tmp_path):
    """Review of this change, HIGH 1: an older copy of the image kept with cp -p and put back
    has an earlier mtime; its sampled blocks may all match (the change was elsewhere)."""
    vol, paths = _split_with_data(tmp_path)
    shutil.copy2(paths[1], str(tmp_path / "older"))      # the copy as of the first split
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    write(vol, _unsampled_offset(SIZE) // BS, pattern(1, 5))     # where the sample is blind
    vol.split(1)
    vol.close()
    for how in ("replace", "in place"):      # another inode; the same inode (cp -p onto it)
        if how == "replace":
            shutil.copy2(str(tmp_path / "older"), paths[1] + ".x")
            os.replace(paths[1] + ".x", paths[1])
        else:
            shutil.copy2(str(tmp_path / "older"), paths[1])
        vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                                flush_interval=None)
        with pytest.raises(StateError, match="modification time changed.*older copy"):
            vol.resync(1)
        vol.close()


def test_a_copy_left_marked_exported_is_compared_outside_its_luns_writes(tmp_path):
    """Review, MEDIUM 3: lvmirrord killed while the copy was exported leaves it marked
    "exported": then a file copied over the same inode must still be caught - by the sampled
    ranges outside the regions the LUN wrote - and the LUN's own writes must not refuse it."""
    vol, paths = _split_with_data(tmp_path)
    exp = vol.split_image(1)
    exp.write(0, [memoryview(pattern(2, 5))])        # the head range: marked, not compared
    exp.flush()
    assert vol._images[1].rec.copy_id["exported"] is True
    exp._closed = True                # as if killed: the export never closed
    vol._images[1].exported -= 1
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    assert vol._images[1].rec.copy_id["exported"] is True
    job = vol.resync(1)               # the export's writes alone: accepted
    assert job.wait(10) and job.state == "done"
    vol.split(1)
    exp = vol.split_image(1)
    exp._closed = True
    vol._images[1].exported -= 1
    vol.close()
    with open(paths[1], "r+b") as f:          # another volume's data over the same inode
        f.write(pattern(SIZE // BS, 11))
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    with pytest.raises(StateError, match="content differs.*outside the regions its LUN wrote"):
        vol.resync(1)
    vol.close()


def test_a_malformed_identity_is_a_refusal_not_a_crash(tmp_path):
    """Review, LOW 9: a hand-edited volume.json gives a clear refusal, not a TypeError."""
    vol, paths = _split_with_data(tmp_path)
    vol.close()
    p = VolumeMetadata.json_path(str(tmp_path / "meta"), "vol")
    d = json.load(open(p))
    d["images"][1]["copy_id"]["mtime_ns"] = "x"
    json.dump(d, open(p, "w"))
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    with pytest.raises(StateError, match="the identity recorded for the split copy is "
                                         "unreadable"):
        vol.resync(1)
    job = vol.resync(1, full=True)
    assert job.wait(10) and job.state == "done"
    vol.close()


def _sysfs(root, devs):
    """A /sys/dev/block tree: ``devs`` maps "MAJ:MIN" to {relative path: content}; a value
    "->X" makes that entry a symlink to X (relative)."""
    for dev, files in devs.items():
        for rel, text in files.items():
            p = root / dev / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    return str(root)


def test_device_id_names_a_device_for_good(tmp_path):
    real = tmp_path / "devices"
    disk = real / "sda"
    (disk / "device").mkdir(parents=True)
    (disk / "device" / "wwid").write_text("naa.600140512345\n")
    (disk / "sda1").mkdir()
    (disk / "sda1" / "partition").write_text("1\n")
    sysfs = tmp_path / "sys"
    _sysfs(sysfs, {"253:0": {"dm/uuid": "LVM-abcdef\n", "dm/name": "vg-lv\n"},
                   "253:1": {"dm/uuid": "\n", "dm/name": "fb\n"},
                   "252:0": {"serial": "overlayblk\n"},
                   "7:0": {"loop/backing_file": "/srv/a.img\n"}})
    (sysfs / "8:0").symlink_to(disk)
    (sysfs / "8:1").symlink_to(disk / "sda1")
    ids = {d: copyid.device_id(os.makedev(*map(int, d.split(":"))), str(sysfs))
           for d in ("253:0", "253:1", "252:0", "7:0", "8:0", "8:1", "9:9")}
    assert ids == {"253:0": "dm-uuid:LVM-abcdef", "253:1": "dm-name:fb",
                   "252:0": "serial:overlayblk", "7:0": None, "8:0": "wwid:naa.600140512345",
                   "8:1": "wwid:naa.600140512345/part1", "9:9": None}


def test_a_block_device_is_judged_by_its_device_id_before_any_read(monkeypatch):
    """The same device name: the copy, with no read (a hung device is left to the copy's own
    bounded reads); another name: a mismatch; none: the sample."""
    class Dev:            # what check asks of a StorageImage on a block device: fstat below
        path = None
        fd = -1
    n = len(copyid.sample_ranges(SIZE))
    ident = {"kind": "block", "rdev": 1, "devid": "dm-name:fb", "sample": ["1" * 32] * n,
             "zero": False}

    def no_read(off, view):
        raise AssertionError("read")

    def now(**fields):
        monkeypatch.setattr(copyid, "_stat_fields", lambda st: dict(kind="block", **fields))
    now(rdev=2, devid="dm-name:fb")
    assert copyid.check(ident, Dev(), no_read, SIZE) is None
    now(rdev=1, devid="dm-name:other")
    mm = copyid.check(ident, Dev(), no_read, SIZE)
    assert mm and "another device (dm-name:other; the split copy was on dm-name:fb)" in mm.reason
    now(rdev=1, devid=None)
    mm = copyid.check(ident, Dev(), lambda off, view: None, SIZE)
    assert mm and "content differs" in mm.reason      # zeros read, others recorded


def test_a_restore_source_opened_again_is_judged_before_the_management_lock(tmp_path):
    """Review, HIGH 2: a restore's source missing at open and put back (with cp -p: another
    inode, so its sample is read) is judged before the volume's management lock is taken: a
    device slow to answer that read does not hold other management calls."""
    class GateOnOpen(Opener):
        gate = None

        def __call__(self, path, *, direct=False):
            img = super().__call__(path, direct=direct)
            if self.gate is not None and str(path).endswith("img2"):
                img.gates.append(self.gate)
            return img
    vol, _, paths = make_volume(tmp_path, 3, size=SIZE, region_size=REGION)
    write(vol, 0, pattern(SIZE // BS, 1))
    vol.split(2)
    write(vol, 0, pattern(16, 2))
    vol.restore(2, rate_limit=0.001)               # held before its first copy
    vol.close()
    shutil.copy2(paths[2], str(tmp_path / "kept"))
    os.unlink(paths[2])
    opener = GateOnOpen()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=opener,
                            flush_interval=None)
    try:
        rj = vol.control.restore_job                     # its source is missing: stopped
        rj.cancel()
        assert rj.wait(10) and vol._images[2].storage is None
        shutil.copy2(str(tmp_path / "kept"), paths[2])    # put back, its time kept
        opener.gate = Gate(lambda op, off, ln: op == "read")
        t, box = run_thread(vol.restore, 2)
        opener.gate.wait_reached()                        # the sample's read, held
        with pytest.raises(StateError, match="already in sync"):
            vol.resync(0)                                 # takes the management lock
        opener.gate.open()
        t.join(20)
        assert "error" not in box, box
        job = box["result"]
        assert job.wait(20) and job.state == "done", job.progress()
        assert read(vol, 0, 16) == bytes(pattern(SIZE // BS, 1)[:16 * BS])
    finally:
        if opener.gate is not None:
            opener.gate.open()
        vol.close()


def test_an_export_of_another_file_is_refused(tmp_path):
    """Trial 32, HIGH 1: another file at the split image's path (put there while the volume
    was closed) must not be exported as the point-in-time copy, nor recorded as the copy when
    the export ends."""
    vol, paths = _split_with_data(tmp_path)
    vol.close()
    with open(paths[1] + ".x", "wb") as f:
        f.write(pattern(SIZE // BS, 12))
    os.replace(paths[1] + ".x", paths[1])
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    with pytest.raises(StateError, match="an export of it as a LUN would not be the volume as "
                                         "of its split"):
        vol.split_image(1)
    assert not vol._images[1].exported
    with pytest.raises(StateError, match="not the copy"):
        vol.resync(1)
    vol.close()


def test_a_backup_of_a_copy_missing_at_open_judges_the_file_now_there(tmp_path):
    """Trial 32, HIGH 2: a split image missing when the volume opened has no open file; its
    backup must judge the file put at the path since (refused when it is not the copy, or
    when it does not open as an image - a FIFO would block the copy), and accept the copy."""
    vol, paths = _split_with_data(tmp_path)
    vol.close()
    os.rename(paths[1], str(tmp_path / "kept"))
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    assert vol._images[1].storage is None
    with pytest.raises(StateError, match="split image 1 .* is not available"):
        vol.check_copy(1)
    os.mkfifo(paths[1])
    with pytest.raises(StateError, match="split image 1 .* is not available"):
        vol.check_copy(1)
    os.unlink(paths[1])
    with open(paths[1], "wb") as f:
        f.write(pattern(SIZE // BS, 13))
    with pytest.raises(StateError, match="not the copy lvmirror split off.*a backup of it"):
        vol.check_copy(1)
    os.replace(str(tmp_path / "kept"), paths[1])
    vol.check_copy(1)                                 # the copy itself: accepted
    assert vol._images[1].storage is None             # judged, not opened for good
    vol.close()


def test_an_mtime_set_back_on_the_same_inode_leaves_it_to_the_sample(tmp_path):
    """Trial 32, MEDIUM 4: a write in place with its mtime set back (touch -r) moves ctime:
    the sample decides, and a change it covers is refused; a chmod alone still passes."""
    vol, paths = _split_with_data(tmp_path)
    os.chmod(paths[1], 0o640)                         # ctime moves, nothing else
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    vol.split(1)
    cid = vol._images[1].rec.copy_id
    with open(paths[1], "r+b") as f:                  # the sampled head
        f.write(b"\xee" * BS)
    os.utime(paths[1], ns=(cid["mtime_ns"], cid["mtime_ns"]))
    with pytest.raises(StateError, match="content differs"):
        vol.resync(1)
    vol.close()


def test_a_copy_marked_exported_and_missing_at_open_is_judged_outside_its_luns_writes(
        tmp_path):
    """Trial 33, HIGH: the fresh open of a copy not open leaves out the ranges its LUN wrote,
    as the open image's check does."""
    vol, paths = _split_with_data(tmp_path)
    exp = vol.split_image(1)
    exp.write(0, [memoryview(pattern(2, 5))])        # the head range: the LUN's
    exp.flush()
    exp._closed = True                               # as if killed: the export never closed
    vol._images[1].exported -= 1
    vol.close()
    os.rename(paths[1], str(tmp_path / "kept"))
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), opener=Opener(),
                            flush_interval=None)
    os.rename(str(tmp_path / "kept"), paths[1])
    vol.check_copy(1)
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    assert image_bytes(paths[1]) == image_bytes(paths[0])
    vol.close()


def test_a_sample_that_cannot_be_read_says_to_try_again(tmp_path, monkeypatch):
    """Trial 33, MEDIUM 4: a read error is no proof the file is not the copy: the refusal
    says to try again, not to throw the copy away."""
    vol, paths = _split_with_data(tmp_path)
    os.chmod(paths[1], 0o640)                        # a later ctime: the sample is read
    vol._images[1].storage.fail_reads = True
    with pytest.raises(StateError, match="could not be read.*run it again once its device "
                                         "answers"):
        vol.resync(1)
    with pytest.raises(StateError, match="could not be read.*Try again once its device "
                                         "answers"):
        vol.check_copy(1)
    vol._images[1].storage.fail_reads = False
    vol.check_copy(1)
    vol.close()


def test_a_copy_split_without_a_sample_keeps_passing_on_its_stat_fields(tmp_path):
    """Trial 33, LOW: no sample recorded (its read failed at the split): a chmod alone does
    not refuse it."""
    vol, paths = _split_with_data(tmp_path)
    rec = vol._images[1].rec
    rec.copy_id = dict(rec.copy_id, sample=None, error="injected")
    os.chmod(paths[1], 0o640)
    vol.check_copy(1)
    with open(paths[1], "r+b") as f:                 # a write: its mtime moves
        f.write(b"\xee" * BS)
    with pytest.raises(StateError, match="modification time changed"):
        vol.check_copy(1)
    vol.close()


def test_an_export_ends_after_the_writes_in_flight(tmp_path):
    """Trial 33, MEDIUM 3: close() waits for a write through the LUN already past its check,
    so the identity it records is of the file as the LUN left it."""
    vol, opener, paths = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    write(vol, 0, pattern(SIZE // BS, 1))
    vol.split(1)
    exp = vol.split_image(1)
    gate = Gate(lambda op, off, ln: op == "write")
    opener.by_path[paths[1]].gates.append(gate)
    tw, wbox = run_thread(exp.write, 40, [memoryview(pattern(1, 6))])
    gate.wait_reached()
    tc, cbox = run_thread(exp.close)
    tc.join(0.5)
    assert tc.is_alive()                             # waiting for the write
    gate.open()
    tw.join(10)
    tc.join(10)
    assert not tc.is_alive() and "error" not in wbox and "error" not in cbox
    cid = vol._images[1].rec.copy_id
    assert "exported" not in cid and cid["mtime_ns"] == os.stat(paths[1]).st_mtime_ns
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    vol.close()


def test_a_path_that_names_nothing_now_leaves_the_held_copy_judged(tmp_path):
    """Stop 53 (a CI run): a dm reload without udev rules left /dev/mapper/fb missing for a
    while, and the resync was refused as if another file were there. Nothing at the path is
    no other file: the file held is judged by itself."""
    vol, paths = _split_with_data(tmp_path)
    os.rename(paths[1], str(tmp_path / "away"))
    job = vol.resync(1)
    assert job.wait(10) and job.state == "done"
    assert image_bytes(str(tmp_path / "away")) == image_bytes(paths[0])
    vol.close()
