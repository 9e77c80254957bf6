"""Metrics for Prometheus: lvmirrord's status in the text exposition format, written for the
node exporter's textfile collector.

What md exposes through node_exporter's mdadm collector (``node_md_state``, ``node_md_disks``,
sync progress) and DRBD through drbd-reactor's Prometheus plugin, for every open volume: the
health (degraded = alert), each image's state, split time and age and the bytes changed since
the split, the progress of resync, restore, scrub and backup, the last scrub's result, the I/O
and error counters, and per LUN a command latency histogram and a histogram of its ring
threads' waits for the GIL.

lvmirrord listens on no port: ``MetricsWriter`` writes ``render(status)`` every ``interval``
seconds (5 by default) to a file in the textfile collector's directory (Debian's
prometheus-node-exporter reads ``/var/lib/prometheus/node-exporter/*.prom``), atomically (a
temporary file renamed over it, as the collector's documentation asks), so a failed image is in
the file at most ``interval`` seconds after lvmirrord saw the failure, and in Prometheus one
scrape interval later. ``lvmirror_metrics_timestamp_seconds`` says when the file was written: a
file that stopped changing (lvmirrord hung or stopped) is an alert of its own
(``time() - lvmirror_metrics_timestamp_seconds > 60``). When lvmirrord stops it writes
``lvmirror_up 0`` and nothing else. ``lvmirror metrics`` prints the same text.

Names follow Prometheus's conventions: ``_bytes``, ``_seconds``, counters end in ``_total``,
state sets as one series per state valued 0 or 1 (as ``node_md_state``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from lvmirror import __version__
from lvmirror.daemon.iostats import BUCKETS, OPS

__all__ = ["render", "render_down", "MetricsWriter", "DEFAULT_METRICS_FILE",
           "IMAGE_STATES", "HEALTH_STATES"]

log = logging.getLogger("lvmirrord")

DEFAULT_METRICS_FILE = "/var/lib/prometheus/node-exporter/lvmirror.prom"
IMAGE_STATES = ("in-sync", "syncing", "split", "failed")
HEALTH_STATES = ("optimal", "degraded", "offline")

# volume status "io" key -> (metric, help); counters unless listed in _GAUGES
_IO = {
    "reads": ("lvmirror_volume_reads_total", "READ commands served"),
    "writes": ("lvmirror_volume_writes_total", "WRITE commands served"),
    "bytes_read": ("lvmirror_volume_read_bytes_total", "bytes read by initiators"),
    "bytes_written": ("lvmirror_volume_written_bytes_total", "bytes written by initiators"),
    "flushes": ("lvmirror_volume_flushes_total", "SYNCHRONIZE CACHE commands served"),
    "unmaps": ("lvmirror_volume_unmaps_total", "UNMAP / WRITE SAME unmap commands served"),
    "read_errors": ("lvmirror_volume_read_errors_total", "image read errors"),
    "write_errors": ("lvmirror_volume_write_errors_total", "image write errors"),
    "image_failures": ("lvmirror_volume_image_failures_total", "images failed by an error"),
    "space_errors": ("lvmirror_volume_space_errors_total",
                     "writes that found no space on an image"),
    "metadata_errors": ("lvmirror_volume_metadata_errors_total",
                        "failed saves of the volume's state"),
    "slow_legs": ("lvmirror_volume_slow_legs_total", "images failed as too slow"),
    "offline_events": ("lvmirror_volume_offline_events_total",
                       "times the volume went offline (NOT READY)"),
    "inflight": ("lvmirror_volume_inflight_commands", "commands in flight now"),
}
_GAUGES = {"inflight"}


def _esc(value) -> str:
    """A label value escaped as the text format wants it (backslash, quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kv) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}"


def _num(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v)) if v == v else "NaN"


class _Out:
    def __init__(self):
        self.lines: list[str] = []
        self._seen: set[str] = set()

    def metric(self, name, kind, help_, samples):
        """One metric family: HELP and TYPE once, then ``samples`` (label dict, value)."""
        samples = list(samples)
        if not samples:
            return
        if name not in self._seen:
            self._seen.add(name)
            self.lines.append(f"# HELP {name} {help_}")
            self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(**labels) if labels else ''} {_num(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(status: dict, now: float | None = None) -> str:
    """``status`` (``Lvmirrord.status()``: volumes and LUNs) as Prometheus text.

    ``now``: wall clock in seconds (default ``time.time()``) for the split ages and the file's
    timestamp. Labels: ``volume``, ``image`` (its index), ``path``, ``state``, ``kind`` (resync,
    restore, scrub, backup, recovery), ``lun``, ``op`` (read, write, other), ``le``."""
    now = time.time() if now is None else now
    out = _Out()
    vols = status.get("volumes", {})
    out.metric("lvmirror_up", "gauge", "1 while lvmirrord runs", [({}, 1)])
    out.metric("lvmirror_info", "gauge", "lvmirrord's version",
               [({"version": status.get("version", __version__)}, 1)])
    out.metric("lvmirror_metrics_timestamp_seconds", "gauge",
               "when lvmirrord wrote these metrics (seconds since the epoch)", [({}, now)])
    out.metric("lvmirror_volume_size_bytes", "gauge", "the volume's size",
               [({"volume": n}, v["size"]) for n, v in sorted(vols.items())])
    out.metric("lvmirror_volume_health", "gauge",
               "1 for the volume's health (optimal; degraded: an image failed or syncing, "
               "alert; offline: no image can serve, the LUN answers NOT READY)",
               [({"volume": n, "state": h}, int(v.get("health", "optimal") == h))
                for n, v in sorted(vols.items()) for h in HEALTH_STATES])
    out.metric("lvmirror_volume_images", "gauge", "images in the volume's mirror set",
               [({"volume": n}, len(v["images"])) for n, v in sorted(vols.items())])
    out.metric("lvmirror_volume_images_in_sync", "gauge", "images in sync (readable)",
               [({"volume": n}, sum(im["state"] == "in-sync" for im in v["images"]))
                for n, v in sorted(vols.items())])
    images = [(n, im) for n, v in sorted(vols.items()) for im in v["images"]]
    out.metric("lvmirror_image_state", "gauge", "1 for the image's state",
               [({"volume": n, "image": im["index"], "path": im["path"], "state": s},
                 int(im["state"] == s)) for n, im in images for s in IMAGE_STATES])
    out.metric("lvmirror_image_changed_bytes", "gauge",
               "bytes a resync of the image would copy (its change bitmap: written since the "
               "split, or missed while failed)",
               [({"volume": n, "image": im["index"]}, im["dirty_bytes"])
                for n, im in images if im["dirty_bytes"] is not None])
    out.metric("lvmirror_image_io_left_behind", "gauge",
               "I/Os still in flight on the image's device since it was failed as slow "
               "(leg_timeout); a resync or split of it waits for them",
               [({"volume": n, "image": im["index"]}, im.get("stuck_io", 0)) for n, im in images])
    split = [(n, im) for n, im in images if im["state"] == "split" and im["split_time"]]
    out.metric("lvmirror_image_split_timestamp_seconds", "gauge",
               "when the image was split (the point in time it holds)",
               [({"volume": n, "image": im["index"]}, im["split_time"]) for n, im in split])
    out.metric("lvmirror_image_split_age_seconds", "gauge",
               "how old the split image's point-in-time copy is",
               [({"volume": n, "image": im["index"]}, max(now - im["split_time"], 0.0))
                for n, im in split])
    jobs = [(n, j) for n, v in sorted(vols.items()) for j in v["jobs"]
            if j["state"] == "running"]
    by_id = {n: {im["id"]: im["index"] for im in v["images"]} for n, v in vols.items()}

    def job_labels(n, j):
        image = by_id[n].get(j.get("image_id"))
        return {"volume": n, "kind": j["kind"], "image": "" if image is None else image}

    out.metric("lvmirror_job_done_bytes", "gauge",
               "bytes a running resync, restore, scrub, backup or crash recovery has done",
               [(job_labels(n, j), j["bytes_done"]) for n, j in jobs])
    out.metric("lvmirror_job_total_bytes", "gauge", "bytes the running job has in all",
               [(job_labels(n, j), j["bytes_total"]) for n, j in jobs])
    out.metric("lvmirror_job_rate_bytes_per_second", "gauge", "the running job's rate",
               [(job_labels(n, j), j["rate"] * 1e6) for n, j in jobs])
    scrubs = [(n, v["scrub"]) for n, v in sorted(vols.items()) if v.get("scrub")]
    out.metric("lvmirror_scrub_running", "gauge", "1 while a scrub of the volume runs",
               [({"volume": n}, int(sc["state"] == "running")) for n, sc in scrubs])
    done = [(n, sc) for n, sc in scrubs if sc["finished"]]
    out.metric("lvmirror_scrub_last_end_timestamp_seconds", "gauge",
               "when the volume's last scrub ended",
               [({"volume": n, "state": sc["state"]}, sc["finished"]) for n, sc in done])
    for key, what in (("regions_checked", "regions the last (or running) scrub checked"),
                      ("mismatches", "regions the last (or running) scrub found different"),
                      ("repaired", "of those, regions it repaired"),
                      ("unrepaired", "of those, regions it left as found (alert)")):
        out.metric(f"lvmirror_scrub_{key}", "gauge", what,
                   [({"volume": n}, sc[key]) for n, sc in scrubs])
    for key, (name, help_) in _IO.items():
        out.metric(name, "gauge" if key in _GAUGES else "counter", help_,
                   [({"volume": n}, v["io"][key]) for n, v in sorted(vols.items())
                    if key in v["io"]])
    luns = sorted(status.get("luns", []), key=lambda lun: lun["name"])
    out.metric("lvmirror_lun_ready", "gauge",
               "1 while the LUN serves its volume (0: it answers NOT READY)",
               [({"lun": lun["name"], "volume": lun.get("volume") or ""},
                 int(not lun["error"])) for lun in luns])
    out.metric("lvmirror_lun_commands_total", "counter", "SCSI commands the LUN was sent",
               [({"lun": lun["name"]}, lun["commands"]) for lun in luns])
    out.metric("lvmirror_lun_ring_thread_commands_total", "counter",
               "commands the LUN's ring thread answered itself (cached READs, buffered WRITEs), "
               "with no hand-off to a worker",
               [({"lun": lun["name"]}, lun["ring_thread_commands"]) for lun in luns
                if "ring_thread_commands" in lun])
    out.metric("lvmirror_lun_compiled_reads_total", "counter",
               "READs of those the ring thread's compiled path answered from the page cache",
               [({"lun": lun["name"]}, lun["compiled_reads"]) for lun in luns
                if "compiled_reads" in lun])
    out.metric("lvmirror_lun_compiled_writes_total", "counter",
               "WRITEs of those the ring thread's compiled path made",
               [({"lun": lun["name"]}, lun["compiled_writes"]) for lun in luns
                if "compiled_writes" in lun])
    out.metric("lvmirror_lun_ring_leases_total", "counter",
               "leases the ring thread took on its one-image volume (the region lock and the "
               "split epoch kept across its batches)",
               [({"lun": lun["name"]}, lun["ring_leases"]) for lun in luns
                if "ring_leases" in lun])
    out.metric("lvmirror_lun_ring_leases_revoked_total", "counter",
               "of those, given back because something asked (a region lock request, a split, "
               "an attach, close)",
               [({"lun": lun["name"]}, lun["ring_leases_revoked"]) for lun in luns
                if "ring_leases_revoked" in lun])
    out.metric("lvmirror_lun_ring_stalls_total", "counter",
               "times a command the ring thread ran itself stalled (slow images) and a new ring "
               "thread took the LUN over",
               [({"lun": lun["name"]}, lun["ring_stalls"]) for lun in luns
                if "ring_stalls" in lun])
    samples = []
    for lun in luns:
        hist = lun.get("latency")
        if not hist:
            continue
        for op in OPS:
            h = hist[op]
            for bound, count in zip(BUCKETS, h["le"]):
                samples.append(("_bucket", {"lun": lun["name"], "op": op, "le": repr(bound)},
                                count))
            samples.append(("_bucket", {"lun": lun["name"], "op": op, "le": "+Inf"},
                            h["count"]))
            samples.append(("_sum", {"lun": lun["name"], "op": op}, h["sum"]))
            samples.append(("_count", {"lun": lun["name"], "op": op}, h["count"]))
    if samples:
        name = "lvmirror_lun_command_duration_seconds"
        out.lines.append(f"# HELP {name} lvmirrord's time from fetching a command off the "
                         f"ring to completing it")
        out.lines.append(f"# TYPE {name} histogram")
        for suffix, labels, value in samples:
            out.lines.append(f"{name}{suffix}{_labels(**labels)} {_num(value)}")
    samples = []
    for lun in luns:
        waits = lun.get("ring_gil_waits")
        if not waits:
            continue
        for place in ("after_io", "after_poll"):
            h = waits[place]
            total = 0
            labels = {"lun": lun["name"], "place": place}
            for bound, count in zip(waits["edges"], h["counts"]):
                total += count                                    # cumulative, as "le" is
                samples.append(("_bucket", {**labels, "le": repr(bound)}, total))
            total += h["counts"][-1]
            samples.append(("_bucket", {**labels, "le": "+Inf"}, total))
            samples.append(("_sum", labels, h["seconds"]))
            samples.append(("_count", labels, total))
    if samples:
        name = "lvmirror_lun_ring_gil_wait_seconds"
        out.lines.append(f"# HELP {name} how long the ring threads serving the LUN waited for "
                         f"the GIL after the compiled path's I/O or poll returned (another "
                         f"thread of the process running Python); the serving process's, the "
                         f"same for each LUN it serves")
        out.lines.append(f"# TYPE {name} histogram")
        for suffix, labels, value in samples:
            out.lines.append(f"{name}{suffix}{_labels(**labels)} {_num(value)}")
    return out.text()


def render_down(now: float | None = None) -> str:
    """What the file says once lvmirrord stopped: ``lvmirror_up 0`` and the timestamp."""
    out = _Out()
    out.metric("lvmirror_up", "gauge", "1 while lvmirrord runs", [({}, 0)])
    out.metric("lvmirror_metrics_timestamp_seconds", "gauge",
               "when lvmirrord wrote these metrics (seconds since the epoch)",
               [({}, time.time() if now is None else now)])
    return out.text()


def write_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text``: a temporary file in the same directory (mode 0644, the
    node exporter runs as its own user), renamed over it. OSError as raised."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".lvmirror-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class MetricsWriter:
    """A thread that writes ``render(status())`` to ``path`` every ``interval`` seconds.

    ``status``: a callable returning ``Lvmirrord.status()``. Nothing is written while the
    directory of ``path`` does not exist (the node exporter is not installed; checked on every
    round, so installing it later is enough); a failed write is logged once until a write
    succeeds again. ``stop()`` ends the thread and writes ``render_down``."""

    def __init__(self, status, path: str = DEFAULT_METRICS_FILE, interval: float = 5.0):
        if not interval > 0:
            raise ValueError(f"metrics interval must be > 0 seconds, got {interval!r}")
        self._status = status
        self.path = path
        self.interval = interval
        self._stop = threading.Event()
        self._thread = None
        self._failing = False
        self.writes = 0

    def start(self):
        """Write once now, then every ``interval`` seconds, on a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
        self._thread.start()

    def _loop(self):
        while True:
            self.write_once()
            if self._stop.wait(self.interval):
                return

    def write_once(self) -> bool:
        """One round; True if the file was written."""
        if not os.path.isdir(os.path.dirname(self.path) or "."):
            return False
        try:
            write_atomically(self.path, render(self._status()))
        except Exception as exc:      # a metrics failure never touches the data path
            if not self._failing:
                log.error("metrics: cannot write %s: %s", self.path, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("metrics: %s written again", self.path)
        self._failing = False
        self.writes += 1
        return True

    def stop(self):
        """End the thread and leave ``lvmirror_up 0`` in the file (if its directory exists).
        A writer never started (lvmirrord failed before it served) writes nothing: it never
        said it was up."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(10)
        if os.path.isdir(os.path.dirname(self.path) or "."):
            try:
                write_atomically(self.path, render_down())
            except OSError as exc:
                log.error("metrics: cannot write %s: %s", self.path, exc)
