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
