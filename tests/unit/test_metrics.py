"""Prometheus metrics (issue 17, monitoring): lvmirrord's real status rendered in the text
format, parsed back with the Prometheus project's own Python parser; the latency histogram;
the textfile writer (atomic, off while the collector's directory is missing, ``lvmirror_up 0``
on stop)."""

import os

import pytest

from lvmirror import cfgstring
from lvmirror.daemon import Lvmirrord
from lvmirror.daemon.iostats import BUCKETS, LatencyHistogram
from lvmirror.daemon.metrics import MetricsWriter, render, render_down

parser = pytest.importorskip("prometheus_client.parser")


def _families(text):
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def _value(fams, family, **labels):
    """The one sample of ``family`` with ``labels`` (a counter's sample is NAME_total)."""
    fam = fams[family]
    names = (fam.name, fam.name + "_total")
    found = [s.value for s in fam.samples if s.name in names
             and all(s.labels.get(k) == str(v) for k, v in labels.items())]
    assert len(found) == 1, (family, labels, fam.samples)
    return found[0]


@pytest.fixture
def daemon(tmp_path):
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
    imgs = [str(tmp_path / f"img{k}") for k in range(3)]
    spec = cfgstring.parse(f"vol0;images={'+'.join(imgs)};region_size=64K")
    vol, _ = d.registry.acquire(spec, lun="lun0", size=4 << 20)
    for job in vol.jobs.values():
        assert job.wait(20)
    yield d, vol
    d.registry.release(spec)


def test_status_renders_as_prometheus_text_with_states_split_age_jobs_and_scrub(daemon):
    d, vol = daemon
    vol.write(0, [memoryview(b"x" * 4096)])
    info = vol.split(2)
    vol.write((64 << 10) // 512, [memoryview(b"y" * 4096)])   # region 1 changed since the split
    job = vol.scrubs.start()
    assert job.wait(20)
    now = info.split_time + 90.0
    fams = _families(render(d.status(), now=now))
    assert _value(fams, "lvmirror_up") == 1
    assert _value(fams, "lvmirror_volume_size_bytes", volume="vol0") == 4 << 20
    assert _value(fams, "lvmirror_volume_health", volume="vol0", state="optimal") == 1
    assert _value(fams, "lvmirror_volume_health", volume="vol0", state="degraded") == 0
    assert _value(fams, "lvmirror_volume_images_in_sync", volume="vol0") == 2
    assert _value(fams, "lvmirror_image_state", volume="vol0", image=2, state="split") == 1
    assert _value(fams, "lvmirror_image_state", volume="vol0", image=2, state="in-sync") == 0
    assert _value(fams, "lvmirror_image_changed_bytes", volume="vol0", image=2) == 64 << 10
    assert _value(fams, "lvmirror_image_split_age_seconds", volume="vol0", image=2) == 90.0
    assert _value(fams, "lvmirror_image_split_timestamp_seconds", volume="vol0",
                  image=2) == info.split_time
    assert _value(fams, "lvmirror_scrub_regions_checked", volume="vol0") == 64
    assert _value(fams, "lvmirror_scrub_mismatches", volume="vol0") == 0
    assert _value(fams, "lvmirror_volume_writes", volume="vol0") == 2     # counter: _total
    assert fams["lvmirror_volume_writes"].type == "counter"
    assert fams["lvmirror_volume_inflight_commands"].type == "gauge"
    # a running job: resync of image 2 held back by a rate of 1 byte... as good as stopped
    job = vol.resync(2, rate_limit=0.001)
    try:
        fams = _families(render(d.status(), now=now))
        assert _value(fams, "lvmirror_job_total_bytes", volume="vol0", kind="resync",
                      image=2) == 64 << 10
        assert _value(fams, "lvmirror_volume_health", volume="vol0", state="degraded") == 1
    finally:
        job.cancel()
        job.wait(20)


def test_a_failed_image_and_an_offline_volume_read_as_such(daemon, tmp_path):
    d, vol = daemon
    from lvmirror.errors import ImageIOError
    img = vol._images[1]
    vol._image_error(img, ImageIOError(img.storage, 5, "injected"), 0, 4096)
    fams = _families(render(d.status()))
    assert _value(fams, "lvmirror_image_state", volume="vol0", image=1, state="failed") == 1
    assert _value(fams, "lvmirror_volume_health", volume="vol0", state="degraded") == 1
    assert _value(fams, "lvmirror_volume_image_failures", volume="vol0") == 1


def test_latency_histogram_buckets_are_cumulative_and_rendered_per_lun():
    h = LatencyHistogram()
    for s in (0.00005, 0.0003, 0.0003, 0.002, 20.0):
        h.observe(bytes([0x2A]), s)
    h.observe(bytes([0x28]), 0.001)
    snap = h.snapshot()
    w = snap["write"]
    assert w["count"] == 5 and w["sum"] == pytest.approx(20.00265)
    assert w["le"][BUCKETS.index(0.0001)] == 1
    assert w["le"][BUCKETS.index(0.0005)] == 3
    assert w["le"][BUCKETS.index(0.0025)] == 4
    assert w["le"][-1] == 4                       # 20 s is above the last bound: +Inf only
    assert snap["read"]["le"][BUCKETS.index(0.001)] == 1      # le is inclusive
    assert snap["other"]["count"] == 0
    kinds = LatencyHistogram()      # READ(10), WRITE(16), SYNCHRONIZE CACHE(10), no CDB
    for cdb in (bytes([0x28]), bytes([0x8A]), bytes([0x35]), b""):
        kinds.observe(cdb, 0.001)
    assert {op: v["count"] for op, v in kinds.snapshot().items()} == \
        {"read": 1, "write": 1, "other": 2}
    status = {"volumes": {}, "luns": [{"name": "lun0", "uio": "uio0", "cfgstring": "v",
                                       "error": None, "commands": 6, "volume": "v",
                                       "ring_thread_commands": 4, "ring_stalls": 1,
                                       "ring_leases": 3, "ring_leases_revoked": 2,
                                       "latency": snap}]}
    fams = _families(render(status))
    assert _value(fams, "lvmirror_lun_ring_thread_commands", lun="lun0") == 4
    assert _value(fams, "lvmirror_lun_ring_stalls", lun="lun0") == 1
    assert _value(fams, "lvmirror_lun_ring_leases", lun="lun0") == 3
    assert _value(fams, "lvmirror_lun_ring_leases_revoked", lun="lun0") == 2
    assert fams["lvmirror_lun_ring_leases_revoked"].type == "counter"
    assert fams["lvmirror_lun_ring_stalls"].type == "counter"
    hist = fams["lvmirror_lun_command_duration_seconds"]
    assert hist.type == "histogram"
    got = {(s.name, s.labels.get("le")): s.value for s in hist.samples
           if s.labels["op"] == "write"}
    assert got[("lvmirror_lun_command_duration_seconds_bucket", "+Inf")] == 5
    assert got[("lvmirror_lun_command_duration_seconds_bucket", "0.0005")] == 3
    assert got[("lvmirror_lun_command_duration_seconds_count", None)] == 5


def test_writer_is_atomic_off_without_its_directory_and_says_down_on_stop(tmp_path):
    status = {"version": "x", "volumes": {}, "luns": []}
    never = tmp_path / "never.prom"
    MetricsWriter(lambda: status, str(never), interval=0.05).stop()    # never started
    assert not never.exists()
    missing = tmp_path / "no-such-dir" / "lvmirror.prom"
    w = MetricsWriter(lambda: status, str(missing), interval=0.05)
    assert w.write_once() is False and not missing.parent.exists()
    path = tmp_path / "lvmirror.prom"
    w = MetricsWriter(lambda: status, str(path), interval=0.05)
    w.start()
    try:
        for _ in range(200):
            if w.writes >= 2:
                break
            import time
            time.sleep(0.01)
        assert w.writes >= 2
        assert _value(_families(path.read_text()), "lvmirror_up") == 1
        assert oct(os.stat(path).st_mode & 0o777) == "0o644"
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".lvmirror-")]
    finally:
        w.stop()
    assert _value(_families(path.read_text()), "lvmirror_up") == 0
    assert render_down().startswith("# HELP lvmirror_up")
    with pytest.raises(ValueError, match="interval"):
        MetricsWriter(lambda: status, str(path), interval=0)


def test_label_values_are_escaped():
    status = {"volumes": {}, "luns": [{"name": 'we"ird\\lun', "uio": "uio0", "cfgstring": "",
                                       "error": "x", "commands": 0, "volume": None}]}
    fams = _families(render(status))
    assert _value(fams, "lvmirror_lun_ready", lun='we"ird\\lun') == 0


def test_the_ring_threads_gil_waits_are_a_histogram_per_place():
    """A LUN's ``ring_gil_waits`` (``_fastread.gil_waits``: per place counts between the
    edges, the last bucket open) becomes a cumulative Prometheus histogram per place, parsed
    back by the Prometheus client's parser."""
    waits = {"edges": [1e-05, 0.0001, 0.001],
             "after_io": {"counts": [7, 2, 1, 0], "seconds": 0.0005, "longest": 0.0009},
             "after_poll": {"counts": [3, 0, 0, 2], "seconds": 0.02, "longest": 0.012}}
    status = {"volumes": {}, "luns": [{"name": "lun0", "uio": "uio0", "cfgstring": "v",
                                       "error": None, "commands": 10, "volume": "v",
                                       "ring_gil_waits": waits},
                                      {"name": "lun1", "uio": "uio1", "cfgstring": "w",
                                       "error": None, "commands": 0, "volume": "w",
                                       "ring_gil_waits": None}]}
    hist = _families(render(status))["lvmirror_lun_ring_gil_wait_seconds"]
    assert hist.type == "histogram"
    got = {(s.labels["place"], s.name.rsplit("_", 1)[-1], s.labels.get("le")): s.value
           for s in hist.samples}
    assert {s.labels["lun"] for s in hist.samples} == {"lun0"}
    assert got[("after_io", "bucket", "1e-05")] == 7
    assert got[("after_io", "bucket", "0.0001")] == 9
    assert got[("after_io", "bucket", "0.001")] == 10
    assert got[("after_io", "bucket", "+Inf")] == 10 == got[("after_io", "count", None)]
    assert got[("after_poll", "bucket", "0.001")] == 3
    assert got[("after_poll", "bucket", "+Inf")] == 5
    assert got[("after_poll", "sum", None)] == 0.02
