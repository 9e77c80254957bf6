"""``--wait`` (``cli.wait_jobs``): which failed jobs a wait reports."""

import json

from lvmirror import cli


class _Mgr:
    """A Manager whose Status() answers the given snapshots in turn (the last one after)."""

    def __init__(self, *snapshots):
        self.snapshots = list(snapshots)

    def Status(self):
        return json.dumps(self.snapshots.pop(0) if len(self.snapshots) > 1
                          else self.snapshots[0])


def _job(kind, image_id, state, error=None, done=0):
    return dict(kind=kind, image_id=image_id, state=state, error=error, bytes_done=done,
                bytes_total=8, rate=0.0)


def _status(*jobs):
    return {"volumes": {"db": {"images": [{"index": 0, "id": 1}, {"index": 1, "id": 2},
                                          {"index": 2, "id": 5}],
                               "jobs": list(jobs)}}}


def test_a_wait_reports_only_the_failures_it_is_about():
    """An older failed restore of image 2 is listed by status: ``resync 1 --wait`` reports
    image 1's job only (its failure too, also when it failed before the first poll: trial
    26 found a version that dropped those, and backup-cycle and attach --wait said done on
    a failed image), and ``wait`` without an image every failed job (trial 25)."""
    old = _job("restore", 5, "failed", "split image 2 cannot be read")
    ok = _status(old, _job("resync", 2, "running"))
    assert cli.wait_jobs(_Mgr(ok, _status(old, _job("resync", 2, "done", done=8))), "db",
                         out=None, image=1) == []
    bad = _job("resync", 2, "failed", "image 0 failed a read")
    assert cli.wait_jobs(_Mgr(_status(old, bad)), "db", out=None, image=1) == [bad]
    assert cli.wait_jobs(_Mgr(ok, _status(old, bad)), "db", out=None) == [old, bad]
    assert cli.wait_jobs(_Mgr(_status(old)), "db", out=None) == [old]
    assert cli.wait_jobs(_Mgr(_status(old, _job("resync", 1, "done", done=8))), "db",
                         out=None, image=0) == []
    assert cli.wait_jobs(_Mgr(_status(old)), "db", out=None, image=2) == [old]


def test_lvmirror_wait_names_every_failed_job(monkeypatch, capsys):
    """``lvmirror wait VOL`` with two failed resyncs names both, with their images, and
    exits 1 (trial 27: only the first was named)."""
    a = _job("resync", 2, "failed", "image 1 failed a write")
    b = _job("resync", 5, "failed", "image 2 failed a write")
    mgr = _Mgr(_status(a, b))
    monkeypatch.setattr(cli, "_manager", lambda *args, **kw: mgr)
    assert cli.main(["wait", "db"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "failed: resync of image 1: image 1 failed a write" in err, err
    assert "failed: resync of image 2: image 2 failed a write" in err, err


def test_a_failed_backup_is_not_a_waits_failure():
    """Trial of 2026-12-06: an interrupted backup of image 1 stays in status as failed, and
    every later ``resync 1 --wait`` and ``wait`` exited 1 with it, the resync done. A
    backup's failure is its copier's to report; a wait reports the copy jobs'."""
    gone = _job("backup", 2, "failed", "interrupted")
    done = _status(gone, _job("resync", 2, "done", done=8))
    assert cli.wait_jobs(_Mgr(done), "db", out=None, image=1) == []
    assert cli.wait_jobs(_Mgr(done), "db", out=None) == []
    bad = _job("resync", 2, "failed", "image 0 failed a read")
    assert cli.wait_jobs(_Mgr(_status(gone, bad)), "db", out=None, image=1) == [bad]


def test_a_job_stopped_by_going_offline_is_waited_for(monkeypatch):
    """Trial of 2026-12-06, LOW: ``resync --wait`` exited 1 when the volume went offline,
    though the resync then went on by itself and finished. A job that says it ``resumes`` is
    waited for; ``status`` says it goes on once the volume is back."""
    import io
    stopped = dict(_job("resync", 2, "failed", "volume db went offline (...)"), resumes=True)
    done = _job("resync", 2, "done", done=8)
    offline = _status(stopped)
    offline["volumes"]["db"]["health"] = "offline"
    said = io.StringIO()
    assert cli.wait_jobs(_Mgr(offline, offline, _status(done)), "db", out=said,
                         image=1) == []
    assert said.getvalue().count("went offline; the resync goes on once it is back") == 1
    # back online and the job never taken up (refused): not waited for past the grace
    monkeypatch.setattr(cli, "RESUME_GRACE", 0.2)
    assert cli.wait_jobs(_Mgr(_status(stopped)), "db", out=None, image=1) == [stopped]
    # the backup cycle's wait does not hold a timer's run for an offline volume: failed
    assert cli.wait_jobs(_Mgr(_status(stopped)), "db", out=None, image=1,
                         through_offline=False) == [stopped]
