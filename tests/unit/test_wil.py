"""The write-intent log: the nowait begin (the ring thread's writes never wait for its fsync),
saves outside the mutex with group commit, and the two-slot file written in place."""

import pytest

from lvmirror.errors import WouldBlock
from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.wil import WriteIntentLog, read_log

REGION = 64 << 10


def test_a_nowait_begin_on_a_clean_region_changes_nothing(tmp_path):
    path = tmp_path / "wil"
    wil = WriteIntentLog(str(path), 1 << 20, REGION)
    with pytest.raises(WouldBlock, match="saved first"):
        wil.begin(REGION - 512, 1024, nowait=True)    # regions 0 and 1, both clean
    assert wil.bitmap.count() == 0 and wil.saves == 0 and not path.exists()
    assert wil.inflight_regions() == {}
    tok = wil.begin(0, 512)                           # the blocking begin marks and saves
    assert wil.saves == 1 and read_log(str(path), 1 << 20, REGION)[0].test_region(0)
    wil.end(tok)
    with pytest.raises(WouldBlock):                   # region 1 still clean: nothing marked
        wil.begin(REGION - 512, 1024, nowait=True)
    assert not wil.bitmap.test_region(1) and wil.saves == 1
    assert wil.inflight_regions() == {}


def test_a_nowait_begin_on_marked_regions_counts_the_write_without_a_save(tmp_path):
    wil = WriteIntentLog(str(tmp_path / "wil"), 1 << 20, REGION)
    wil.end(wil.begin(0, 2 * REGION))
    saves = wil.saves
    tok = wil.begin(REGION - 512, 1024, nowait=True)
    assert wil.saves == saves and wil.inflight_regions() == {0: 1, 1: 1}
    assert wil.clean(wil.ticket()) == 0               # in flight: not cleared
    wil.end(tok)
    assert wil.clean(wil.ticket()) == 2 and wil.bitmap.count() == 0


def test_all_dirty(tmp_path):
    bm = RegionBitmap(1 << 20, REGION)
    assert not bm.all_dirty(0, 0) and not bm.all_dirty(0, 512)
    bm.mark(0, REGION)
    assert bm.all_dirty(0, REGION) and not bm.all_dirty(0, REGION + 1)
    bm.mark(REGION, 1)
    assert bm.all_dirty(100, 2 * REGION - 100)
    with pytest.raises(ValueError):
        bm.all_dirty(1 << 20, 512)


def test_a_failed_save_leaves_the_mark_pending_and_the_next_write_saves_again(tmp_path,
                                                                                monkeypatch):
    """A write whose log save failed is refused; the bit it set in memory vouches for nothing
    until a save carries it, so the next write there saves (before: it saw the bit set and
    went on with the log on disk not marking the region)."""
    path = tmp_path / "wil"
    wil = WriteIntentLog(str(path), 1 << 20, REGION)
    real = WriteIntentLog._write
    calls = []

    def failing_once(self, payload):
        calls.append(payload)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(self, payload)

    monkeypatch.setattr(WriteIntentLog, "_write", failing_once)
    with pytest.raises(OSError):
        wil.begin(0, 512)
    assert wil.inflight_regions() == {} and wil.saves == 0 and not path.exists()
    with pytest.raises(WouldBlock):                   # pending: the ring thread may not write
        wil.begin(0, 512, nowait=True)
    assert wil.clean(wil.ticket()) == 0               # a pending mark is not cleared
    tok = wil.begin(0, 512)
    assert len(calls) == 2 and wil.saves == 1
    assert read_log(str(path), 1 << 20, REGION)[0].test_region(0)
    wil.end(tok)
    wil.end(wil.begin(0, 512, nowait=True))           # durable now: no save, no wait


def test_a_save_in_progress_holds_back_only_the_writes_that_need_it(tmp_path, monkeypatch):
    """While one writer's save (fsync) runs, a write to a durable region - the ring thread's
    nowait write among them - goes on at once, and a second writer to the region being saved
    waits for that same save instead of writing the file again (group commit)."""
    import threading
    wil = WriteIntentLog(str(tmp_path / "wil"), 1 << 20, REGION)
    wil.end(wil.begin(0, 512))                        # region 0 durable
    real = WriteIntentLog._write
    entered, go = threading.Event(), threading.Event()

    def slow(self, payload):
        entered.set()
        assert go.wait(10)
        return real(self, payload)

    monkeypatch.setattr(WriteIntentLog, "_write", slow)
    done = []
    a = threading.Thread(target=lambda: done.append(("a", wil.begin(REGION, 512))))
    a.start()
    assert entered.wait(10)
    tok = wil.begin(100, 512, nowait=True)            # region 0: does not wait for the save
    wil.end(tok)
    b = threading.Thread(target=lambda: done.append(("b", wil.begin(REGION + 512, 512))))
    b.start()
    b.join(0.3)
    assert b.is_alive() and not done                  # region 1 is pending: b waits
    go.set()
    a.join(10)
    b.join(10)
    assert sorted(n for n, _ in done) == ["a", "b"]
    assert wil.saves == 2                             # region 0's save and a's; b shared a's
    assert wil.inflight_regions() == {1: 2}


def _seqs(path):
    return read_log(str(path), 1 << 20, REGION)[1:]


def test_saves_alternate_between_two_slots_in_place_and_a_torn_slot_falls_back(tmp_path):
    """The first save creates the file whole (slot 0); later ones overwrite the older slot in
    place (same inode and size); a slot torn by a crash - its checksum wrong - leaves the log as
    the previous save wrote it; both torn: unusable, every region dirty."""
    import os
    path = tmp_path / "wil"
    wil = WriteIntentLog(str(path), 1 << 20, REGION)
    wil.end(wil.begin(0, 512))
    ino, size = os.stat(path).st_ino, os.stat(path).st_size
    assert _seqs(path) == (1, 0) and size == 2 * 4096
    wil.end(wil.begin(REGION, 512))
    assert _seqs(path) == (2, 1)
    wil.end(wil.begin(2 * REGION, 512))
    assert _seqs(path) == (3, 0)
    assert (os.stat(path).st_ino, os.stat(path).st_size) == (ino, size)
    with open(path, "r+b") as f:                       # tear slot 0 (seq 3)
        f.seek(40)
        f.write(b"\xff")
    bm, seq, slot = read_log(str(path), 1 << 20, REGION)
    assert (seq, slot) == (2, 1) and sorted(bm.dirty_regions()) == [0, 1]
    again, problem = WriteIntentLog.load_or_create(str(path), 1 << 20, REGION)
    assert problem is None and sorted(again.bitmap.dirty_regions()) == [0, 1]
    again.end(again.begin(3 * REGION, 512))             # rewrites the torn slot 0, in place
    assert _seqs(path) == (3, 0) and os.stat(path).st_ino == ino
    assert sorted(read_log(str(path))[0].dirty_regions()) == [0, 1, 3]
    with open(path, "r+b") as f:                       # both slots torn
        for off in (40, 4096 + 40):
            f.seek(off)
            f.write(b"\xff")
    lost, problem = WriteIntentLog.load_or_create(str(path), 1 << 20, REGION)
    assert "unusable" in problem and "torn" in problem
    assert lost.bitmap.count() == lost.bitmap.nregions


def test_a_log_in_the_earlier_format_is_read_and_rewritten_as_slots(tmp_path):
    """A volume's log saved before the slots (a bare RegionBitmap file) loads with its marks;
    the first save rewrites it whole in the slot format, the next goes in place."""
    path = tmp_path / "wil"
    old = RegionBitmap(1 << 20, REGION)
    old.mark(5 * REGION, 1)
    old.save(str(path))
    wil, problem = WriteIntentLog.load_or_create(str(path), 1 << 20, REGION)
    assert problem is None and list(wil.bitmap.dirty_regions()) == [5]
    assert read_log(str(path))[1:] == (None, None)
    wil.end(wil.begin(0, 512))
    assert _seqs(path) == (1, 0)
    assert sorted(read_log(str(path))[0].dirty_regions()) == [0, 5]
    wil.end(wil.begin(REGION, 512))
    assert _seqs(path) == (2, 1)


def test_a_write_over_two_regions_during_a_save_waits_for_a_save_that_has_its_mark(
        tmp_path, monkeypatch):
    """A write to regions 0 and 1 begins while a save for region 0 runs (its copy taken before
    region 1 was marked): it must wait for a later save that has region 1, not return with
    region 1 marked only in memory (the first save's end used to clear region 1's pending
    mark, so the write went on with the log on disk not marking it)."""
    import threading
    wil = WriteIntentLog(str(tmp_path / "wil"), 1 << 20, REGION)
    path = tmp_path / "wil"
    real = WriteIntentLog._write
    entered, go = threading.Event(), threading.Event()
    first = []

    def slow_first(self, payload):
        if not first:
            first.append(1)
            entered.set()
            assert go.wait(10)
        return real(self, payload)

    monkeypatch.setattr(WriteIntentLog, "_write", slow_first)
    a = threading.Thread(target=lambda: wil.begin(0, 512))     # region 0: its save is slow
    a.start()
    assert entered.wait(10)
    got = []
    b = threading.Thread(target=lambda: got.append(wil.begin(REGION - 512, 1024)))  # 0 and 1
    b.start()
    b.join(0.2)
    go.set()
    a.join(10)
    b.join(10)
    assert got == [(0, 1)]
    assert sorted(read_log(str(path), 1 << 20, REGION)[0].dirty_regions()) == [0, 1]
    wil.end(wil.begin(REGION, 512, nowait=True))       # durable: a nowait begin is accepted


def test_a_log_file_of_another_size_or_a_torn_first_magic(tmp_path):
    """A file grown by something else is rewritten whole by the next save (an in-place write
    at this geometry's offsets would be read from the wrong place); slot 0's magic torn leaves
    slot 1's state, not an unusable log."""
    import os
    path = tmp_path / "wil"
    wil = WriteIntentLog(str(path), 1 << 20, REGION)
    wil.end(wil.begin(0, 512))                          # seq 1 in slot 0
    wil.end(wil.begin(REGION, 512))                     # seq 2 in slot 1
    with open(path, "r+b") as f:
        f.write(b"\0")                                  # slot 0's magic torn
    bm, seq, slot = read_log(str(path), 1 << 20, REGION)
    assert (seq, slot) == (2, 1) and sorted(bm.dirty_regions()) == [0, 1]
    with open(path, "ab") as f:
        f.write(bytes(8192))                            # grown: 16 KiB
    wil.end(wil.begin(9 * REGION, 512))
    assert os.path.getsize(path) == 8192
    assert 9 in read_log(str(path), 1 << 20, REGION)[0].dirty_regions()
    with pytest.raises(ValueError, match="outside"):
        wil.begin((1 << 20) - 512, 1024)
    assert wil.inflight_regions() == {}
