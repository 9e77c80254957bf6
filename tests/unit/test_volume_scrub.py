"""Scrub: the in-sync images compared region by region under the region lock, mismatches
reported by content group, repaired by majority vote or from a named image; progress kept,
resumed after a close, ended by cancel."""

import json
import os
import threading

import pytest

from lvmirror.errors import StateError
from lvmirror.mirror.scrub import ScrubRecord
from lvmirror.mirror.volume import ImageState, MirrorVolume

from tests.unit.test_volume_helpers import (BS, Gate, Opener, image_bytes, make_volume,
                                            no_thread_for, pattern, wait_until, write)

REGION = 64 << 10
SIZE = 1 << 20            # 16 regions


def _fill(vol):
    for lba in range(0, SIZE // BS, 128):
        write(vol, lba, pattern(128, lba))
    vol.flush()


def _corrupt(path, offset, data=b"\xde\xad\xbe\xef"):
    """Change an image behind the volume's back (what a disk's silent corruption does)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _scrub(vol, **kw):
    job = vol.scrubs.start(**kw)
    assert job.wait(30)
    return vol.scrubs.last()


def test_clean_volume_scrubs_every_region_and_keeps_the_result(tmp_path):
    vol, _, _ = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    _fill(vol)
    res = _scrub(vol)
    assert res["state"] == "done"
    assert res["regions"] == res["regions_checked"] == 16
    assert (res["mismatches"], res["repaired"], res["unrepaired"]) == (0, 0, 0)
    assert res["images"] == [0, 1] and res["finished"] >= res["started"] > 0
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    try:
        assert vol.scrubs.last()["state"] == "done"        # kept across a restart
        assert "scrub" not in vol.jobs                       # and not run again
    finally:
        vol.close()


def test_three_images_majority_finds_and_repairs_exactly_the_odd_image(tmp_path):
    vol, _, paths = make_volume(tmp_path, 3, size=SIZE, region_size=REGION)
    _fill(vol)
    # region 5, blocks 3 and 7 of it, on image 2 only
    _corrupt(paths[2], 5 * REGION + 3 * BS + 10)
    _corrupt(paths[2], 5 * REGION + 7 * BS)
    res = _scrub(vol)
    assert (res["mismatches"], res["repaired"], res["unrepaired"]) == (1, 0, 1)
    [m] = res["report"]
    assert m["region"] == 5 and m["offset"] == 5 * REGION and m["length"] == REGION
    assert (m["first_lba"], m["last_lba"]) == (5 * REGION // BS + 3, 5 * REGION // BS + 7)
    assert m["groups"] == [[0, 1], [2]] and m["right"] == [0, 1] and m["repaired"] == []
    assert image_bytes(paths[2]) != image_bytes(paths[0])       # a check changes nothing
    res = _scrub(vol, repair=True)
    assert (res["mismatches"], res["repaired"], res["unrepaired"]) == (1, 1, 0)
    assert res["report"][0]["repaired"] == [2]
    assert image_bytes(paths[0]) == image_bytes(paths[1]) == image_bytes(paths[2])
    assert _scrub(vol)["mismatches"] == 0
    assert [i.state for i in vol.images] == [ImageState.IN_SYNC] * 3
    vol.close()


def test_two_images_report_both_candidates_and_repair_only_from_a_named_image(tmp_path):
    vol, _, paths = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    _fill(vol)
    _corrupt(paths[0], 9 * REGION + 100)
    res = _scrub(vol, repair=True)          # no majority of two, no source: nothing repaired
    [m] = res["report"]
    assert m["region"] == 9 and m["groups"] == [[0], [1]] and m["right"] is None
    assert (res["repaired"], res["unrepaired"]) == (0, 1)
    assert image_bytes(paths[0]) != image_bytes(paths[1])
    res = _scrub(vol, repair=True, source=1)
    assert res["source"] == 1 and res["report"][0]["right"] == [1]
    assert res["report"][0]["repaired"] == [0]
    assert image_bytes(paths[0]) == image_bytes(paths[1])
    assert image_bytes(paths[0], 9 * REGION, REGION) == bytes(pattern(128, 9 * 128))
    vol.close()


def test_a_tie_has_no_majority_and_is_left_as_found(tmp_path):
    vol, _, paths = make_volume(tmp_path, 4, size=SIZE, region_size=REGION)
    _fill(vol)
    _corrupt(paths[2], 2 * REGION, b"X" * 8)
    _corrupt(paths[3], 2 * REGION, b"X" * 8)
    res = _scrub(vol, repair=True)
    [m] = res["report"]
    assert sorted(m["groups"]) == [[0, 1], [2, 3]] and m["right"] is None
    assert (res["repaired"], res["unrepaired"]) == (0, 1)
    vol.close()


def test_writes_during_a_scrub_are_no_mismatch(tmp_path):
    """The region lock keeps a write from landing on one image between two reads."""
    vol, _, paths = make_volume(tmp_path, 3, size=SIZE, region_size=REGION)
    _fill(vol)
    stop = threading.Event()
    errors = []

    def writer():
        n = 0
        while not stop.is_set():
            lba = (n * 97) % (SIZE // BS - 16)
            try:
                write(vol, lba, pattern(16, n))
            except Exception as e:       # reported by the test
                errors.append(e)
                return
            n += 1

    ts = [threading.Thread(target=writer, daemon=True) for _ in range(3)]
    for t in ts:
        t.start()
    try:
        for _ in range(3):
            res = _scrub(vol)
            assert res["mismatches"] == 0, res["report"]
    finally:
        stop.set()
        for t in ts:
            t.join(10)
    assert not errors
    vol.flush()
    assert image_bytes(paths[0]) == image_bytes(paths[1]) == image_bytes(paths[2])
    vol.close()


def test_split_and_failed_images_are_not_compared(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 3, size=SIZE, region_size=REGION)
    _fill(vol)
    vol.split(2)
    write(vol, 0, pattern(8, 77))        # the split image differs now, as it should
    res = _scrub(vol)
    assert res["images"] == [0, 1] and res["mismatches"] == 0
    vol.split(1)
    with pytest.raises(StateError, match="1 in-sync image"):
        vol.scrubs.start()
    vol.close()


def test_a_read_error_fails_the_image_and_the_others_are_compared(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 3, size=SIZE, region_size=REGION)
    _fill(vol)
    _corrupt(paths[2], 11 * REGION)
    opener.by_path[paths[1]].fail_reads = True
    res = _scrub(vol)
    assert vol.images[1].state is ImageState.FAILED
    [m] = res["report"]                  # image 0 against 2: no majority of two
    assert m["region"] == 11 and m["groups"] == [[0], [2]]
    assert res["state"] == "done"
    vol.close()


def test_repairs_are_durable_before_the_record_counts_them(tmp_path):
    """The durability barrier: scrub.json says 'repaired' only once the rewritten image is
    flushed."""
    vol, opener, paths = make_volume(tmp_path, 3, size=SIZE, region_size=REGION)
    _fill(vol)
    _corrupt(paths[1], 4 * REGION)
    gate = Gate(lambda op, off, ln: op == "flush")
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.scrubs.start(repair=True)
    gate.wait_reached()
    saved = json.loads(open(ScrubRecord.path(vol._vdir)).read())
    assert saved["repaired"] == 0 and saved["state"] == "running"
    gate.open()
    assert job.wait(30)
    saved = json.loads(open(ScrubRecord.path(vol._vdir)).read())
    assert (saved["state"], saved["repaired"]) == ("done", 1)
    vol.close()


def _read_gate(region):
    return Gate(lambda op, off, ln: op == "read" and off == region * REGION and ln == REGION)


def test_cancel_ends_the_scrub_for_good(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    _fill(vol)
    gate = _read_gate(6)
    opener.by_path[paths[0]].gates.append(gate)
    job = vol.scrubs.start(rate_limit=500)
    gate.wait_reached()
    with pytest.raises(StateError, match="already running"):
        vol.scrubs.start()
    t = threading.Thread(target=vol.scrubs.cancel, daemon=True)
    t.start()
    wait_until(lambda: job._cancel.is_set())
    gate.open()
    t.join(10)
    res = vol.scrubs.last()
    assert res["state"] == "cancelled" and res["regions_checked"] == 7 and res["rate"] == 500
    with pytest.raises(StateError, match="no scrub is running"):
        vol.scrubs.cancel()
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    try:
        assert "scrub" not in vol.jobs and vol.scrubs.last()["state"] == "cancelled"
    finally:
        vol.close()


def test_a_scrub_resumes_after_a_restart_with_its_options_and_counts(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 3, size=SIZE, region_size=REGION)
    _fill(vol)
    _corrupt(paths[0], 1 * REGION)        # found before the restart
    _corrupt(paths[2], 13 * REGION)       # found after it
    gate = _read_gate(8)
    opener.by_path[paths[1]].gates.append(gate)
    job = vol.scrubs.start(repair=True, rate_limit=300)
    gate.wait_reached()
    t = threading.Thread(target=vol.close, daemon=True)
    t.start()
    wait_until(lambda: job._cancel.is_set())
    gate.open()
    t.join(10)
    saved = json.loads(open(ScrubRecord.path(str(tmp_path / "meta" / "vol"))).read())
    assert saved["state"] == "running" and saved["next_region"] == 9
    assert saved["repaired"] == 1
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    try:
        job = vol.jobs["scrub"]
        assert job.wait(30)
        res = vol.scrubs.last()
        assert res["state"] == "done" and res["rate"] == 300 and res["repair"]
        assert res["regions_checked"] == 16
        assert [m["region"] for m in res["report"]] == [1, 13]
        assert (res["mismatches"], res["repaired"]) == (2, 2)
        assert image_bytes(paths[0]) == image_bytes(paths[1]) == image_bytes(paths[2])
    finally:
        vol.close()


def test_bad_requests_are_refused_before_anything_starts(tmp_path):
    vol, _, _ = make_volume(tmp_path, 3, size=SIZE, region_size=REGION)
    with pytest.raises(ValueError, match="only used to repair"):
        vol.scrubs.start(source=1)
    with pytest.raises(ValueError, match="rate limit"):
        vol.scrubs.start(rate_limit=-1)
    with pytest.raises(StateError, match="no image 3"):
        vol.scrubs.start(repair=True, source=3)
    vol.split(2)
    with pytest.raises(StateError, match="image 2 is split"):
        vol.scrubs.start(repair=True, source=2)
    assert vol.scrubs.last() is None and "scrub" not in vol.jobs
    vol.close()


def test_a_damaged_record_is_ignored_not_fatal(tmp_path):
    vol, _, _ = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    vol.close()
    with open(tmp_path / "meta" / "vol" / "scrub.json", "w") as f:
        f.write('{"state": "running", "next_region": -4}')
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None,
                            opener=Opener())
    try:
        assert vol.scrubs.last() is None and "scrub" not in vol.jobs
    finally:
        vol.close()


def _o_direct(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
    return bool(flags & os.O_DIRECT)


def test_verify_read_comes_from_the_device_not_the_page_cache(tmp_path):
    """StorageImage.verify_readv (the scrub's read) uses an O_DIRECT descriptor of its own on a
    buffered image, and sees a write the buffered descriptor has cached but not yet written
    back (the O_DIRECT read writes the dirty range back first)."""
    from lvmirror.mirror.image import StorageImage
    path = tmp_path / "img"
    StorageImage.create_file(str(path), 1 << 20)
    img = StorageImage.open(str(path))
    try:
        img.writev(8192, [b"\x5a" * 4096])          # dirty in the page cache
        buf = StorageImage.aligned_buffer(64 << 10)
        bypassed = img.verify_readv(0, buf)
        if not bypassed:
            pytest.skip("this file system has no O_DIRECT")
        assert _o_direct(img._verify_fd) and not _o_direct(img.fd)
        assert bytes(buf[8192:12288]) == b"\x5a" * 4096 and bytes(buf[:8192]) == bytes(8192)
        assert img.stats["verify_reads"] == 1
        # an unaligned range falls back to the ordinary read, with the same bytes
        small = bytearray(100)
        assert img.verify_readv(8192 + 7, small) is False and small == b"\x5a" * 100
    finally:
        img.close()
    assert img._verify_fd is None


def test_the_scrub_reads_every_image_past_the_page_cache(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    _fill(vol)
    res = _scrub(vol)
    assert res["mismatches"] == 0
    for p in paths:
        st = opener.by_path[p].stats
        if opener.by_path[p]._verify_fd in (None, -1):
            pytest.skip("this file system has no O_DIRECT")
        assert st["verify_reads"] == SIZE // REGION
    vol.close()


def test_a_restore_cancels_a_running_scrub_with_the_reason(tmp_path):
    """A restore rewrites every region of every image: the scrub running then ends after the
    region in hand (md's recovery interrupts a check), recorded as cancelled with why; a scrub
    asked for while the restore is unfinished is refused."""
    vol, opener, paths = make_volume(tmp_path, 3, size=SIZE, region_size=REGION)
    _fill(vol)
    vol.split(2)
    _fill(vol)      # every region changed since the split: the restore has 16 to copy (~20 s)
    gate = _read_gate(4)
    opener.by_path[paths[0]].gates.append(gate)
    job = vol.scrubs.start()
    gate.wait_reached()
    rj = vol.control.restore(2, rate_limit=0.05)
    assert rj.bytes_total == SIZE     # (with a few regions it could end before the checks)
    assert job._cancel.is_set()
    gate.open()
    assert job.wait(10)
    res = vol.scrubs.last()
    assert (res["state"], res["regions_checked"]) == ("cancelled", 5)
    assert res["error"] == "a restore from image 2 began"
    with pytest.raises(StateError, match="a restore from image 2 is running; scrub after it ends"):
        vol.scrubs.start()
    rj.cancel()
    rj.wait(10)
    vol.close()


def test_a_split_that_leaves_one_image_ends_the_scrub_with_the_reason(tmp_path):
    """A split is never refused for a scrub; on a two-image volume it leaves nothing to
    compare, and the scrub ends as cancelled at that region, not "done" over regions nobody
    compared."""
    vol, opener, paths = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    _fill(vol)
    gate = _read_gate(5)
    opener.by_path[paths[0]].gates.append(gate)
    job = vol.scrubs.start()
    gate.wait_reached()
    # the split waits for the region in hand (I/O begun before its T), then the next region
    # finds one in-sync image
    t = threading.Thread(target=vol.split, args=(1,), daemon=True)
    t.start()
    wait_until(lambda: vol._images[1].state is ImageState.SPLIT)   # switched, draining
    gate.open()
    t.join(10)
    assert not t.is_alive() and vol.images[1].state is ImageState.SPLIT
    assert job.wait(10)
    res = vol.scrubs.last()
    assert res["state"] == "cancelled" and res["regions_checked"] < SIZE // REGION
    assert "1 in-sync image(s) left to compare at region" in res["error"]
    assert res["regions_checked"] in (5, 6)       # region 5 compared if the split came after
    vol.close()


def test_an_image_the_scrub_cannot_read_past_the_cache_is_named_in_the_log(tmp_path, caplog,
                                                                           monkeypatch):
    """Where O_DIRECT is refused (tmpfs), the scrub still compares, from the page cache, and
    says so once per image in the journal."""
    from lvmirror.mirror.image import StorageImage
    vol, opener, paths = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    _fill(vol)
    monkeypatch.setattr(StorageImage, "_verify_descriptor", lambda self: (None, 0))
    with caplog.at_level("WARNING", logger="lvmirror.mirror.scrub"):
        res = _scrub(vol)
    assert res["state"] == "done" and res["regions_checked"] == SIZE // REGION
    said = [r.getMessage() for r in caplog.records if "through the page cache" in r.getMessage()]
    assert len(said) == 2 and "image 0" in said[0] and "image 1" in said[1]
    vol.close()


def test_a_scrub_whose_thread_cannot_start_is_recorded_failed(tmp_path, monkeypatch):
    """No thread left for a scrub (RuntimeError from Thread.start): the call raises and the
    scrub's record says failed, in status and on disk - not "running", which ``scrub --wait``
    would wait for without end and the next open would resume (trial 36, HIGH)."""
    vol, _, _ = make_volume(tmp_path, 2, size=SIZE, region_size=REGION)
    _fill(vol)
    no_thread_for(monkeypatch, "-scrub")
    with pytest.raises(RuntimeError):
        vol.scrubs.start()
    monkeypatch.undo()
    last = vol.scrubs.last()
    assert last["state"] == "failed" and "did not start" in last["error"], last
    assert "scrub" not in vol.jobs
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(tmp_path / "meta"), flush_interval=None)
    try:
        assert vol.scrubs.last()["state"] == "failed" and "scrub" not in vol.jobs
        assert _scrub(vol)["state"] == "done"
    finally:
        vol.close()
