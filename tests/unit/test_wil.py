"""The write-intent log's nowait begin: the ring thread's writes never wait for its fsync."""

import pytest

from lvmirror.errors import WouldBlock
from lvmirror.mirror.bitmap import RegionBitmap
from lvmirror.mirror.wil import WriteIntentLog

REGION = 64 << 10


def test_a_nowait_begin_on_a_clean_region_changes_nothing(tmp_path):
    path = tmp_path / "wil"
    wil = WriteIntentLog(str(path), 1 << 20, REGION)
    with pytest.raises(WouldBlock, match="saved first"):
        wil.begin(REGION - 512, 1024, nowait=True)    # regions 0 and 1, both clean
    assert wil.bitmap.count() == 0 and wil.saves == 0 and not path.exists()
    assert wil.inflight_regions() == {}
    tok = wil.begin(0, 512)                           # the blocking begin marks and saves
    assert wil.saves == 1 and RegionBitmap.load(str(path), 1 << 20, REGION).test_region(0)
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
    import lvmirror.mirror.wil as wil_mod
    path = tmp_path / "wil"
    wil = WriteIntentLog(str(path), 1 << 20, REGION)
    real = wil_mod.atomic_write
    calls = []

    def failing_once(p, data, **kw):
        calls.append(p)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(p, data, **kw)

    monkeypatch.setattr(wil_mod, "atomic_write", failing_once)
    with pytest.raises(OSError):
        wil.begin(0, 512)
    assert wil.inflight_regions() == {} and wil.saves == 0 and not path.exists()
    with pytest.raises(WouldBlock):                   # pending: the ring thread may not write
        wil.begin(0, 512, nowait=True)
    assert wil.clean(wil.ticket()) == 0               # a pending mark is not cleared
    tok = wil.begin(0, 512)
    assert len(calls) == 2 and wil.saves == 1
    assert RegionBitmap.load(str(path), 1 << 20, REGION).test_region(0)
    wil.end(tok)
    wil.end(wil.begin(0, 512, nowait=True))           # durable now: no save, no wait


def test_a_save_in_progress_holds_back_only_the_writes_that_need_it(tmp_path, monkeypatch):
    """While one writer's save (fsync) runs, a write to a durable region - the ring thread's
    nowait write among them - goes on at once, and a second writer to the region being saved
    waits for that same save instead of writing the file again (group commit)."""
    import threading
    import lvmirror.mirror.wil as wil_mod
    wil = WriteIntentLog(str(tmp_path / "wil"), 1 << 20, REGION)
    wil.end(wil.begin(0, 512))                        # region 0 durable
    real = wil_mod.atomic_write
    entered, go = threading.Event(), threading.Event()

    def slow(p, data, **kw):
        entered.set()
        assert go.wait(10)
        return real(p, data, **kw)

    monkeypatch.setattr(wil_mod, "atomic_write", slow)
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
