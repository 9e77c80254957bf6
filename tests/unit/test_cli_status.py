"""``lvmirror status``'s text (``cli.format_status``) from a status dict as lvmirrord gives it."""

from lvmirror.cli import format_status


def _status(images, jobs):
    img = dict(split_time=None, dirty_bytes=None, bitmap_fill=0.0, error=None, stuck_io=0,
               generation=1)
    return {"volumes": {"v": {
        "size": 1 << 20, "block_size": 512, "region_size": 65536, "health": "optimal",
        "images": [dict(img, index=k, id=10 + k, path=f"/x{k}", **extra)
                   for k, extra in enumerate(images)],
        "jobs": jobs, "io": dict(reads=0, writes=0, read_errors=0, write_errors=0,
                                 inflight=0)}}, "luns": []}


def _job(kind, image_id, state):
    return dict(kind=kind, image_id=image_id, state=state, eta_seconds=None,
                bytes_done=1 << 20, bytes_total=1 << 20, rate=50.0)


def test_a_finished_resync_of_an_image_split_since_is_not_listed():
    """The initial resync (done) of an image split since is history, not a job of the split
    image (trial 30, LOW): not listed under it; one still running, one done of an image in
    sync, and a restore done from a split image are."""
    st = _status([dict(state="in-sync"), dict(state="split", split_time=1.0, dirty_bytes=0),
                  dict(state="in-sync"), dict(state="syncing", dirty_bytes=4096)],
                 [_job("resync", 11, "done"), _job("resync", 12, "done"),
                  _job("resync", 13, "running")])
    text = format_status(st)
    assert "resync of image 1" not in text, text
    assert "resync of image 2: done" in text and "resync of image 3: running" in text, text
    st = _status([dict(state="in-sync"), dict(state="split", split_time=1.0, dirty_bytes=0)],
                 [_job("restore", 11, "done")])
    assert "restore of image 1: done" in format_status(st)


def test_a_job_stopped_by_going_offline_says_it_goes_on():
    """Trial of 2026-12-06, LOW: a resync the volume's going offline stopped read "failed",
    though it goes on by itself once the volume is back; one cancelled since reads failed."""
    st = _status([dict(state="in-sync"), dict(state="syncing", dirty_bytes=4096)],
                 [dict(_job("resync", 11, "failed"), resumes=True,
                       error="volume v went offline (...)")])
    text = format_status(st)
    assert "resync of image 1: stopped, the volume went offline; it goes on once the volume " \
           "is back" in text, text
    st["volumes"]["v"]["jobs"][0]["resumes"] = False
    assert "resync of image 1: failed" in format_status(st)
