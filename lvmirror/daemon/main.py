"""lvmirrord's command line: arguments, logging, signals, exit status."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from lvmirror import __version__
from lvmirror.errors import ConfigError, LvmirrorError
from lvmirror.daemon.hooks import DEFAULT_HOOKS_DIR
from lvmirror.daemon.lease import LeaseConfig
from lvmirror.daemon.metrics import DEFAULT_METRICS_FILE
from lvmirror.daemon.manager import DEFAULT_STATE_DIR, Lvmirrord
from lvmirror.daemon import __doc__ as _doc

log = logging.getLogger("lvmirrord")


def setup_logging(level: str):
    """Plain lines with syslog priority prefixes under journald, timestamps on a terminal."""
    if os.environ.get("JOURNAL_STREAM"):
        prefixes = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>",
                    logging.ERROR: "<3>", logging.CRITICAL: "<2>"}

        class JournalFormatter(logging.Formatter):
            """Each line prefixed with its syslog priority (``<3>`` for ERROR...), which
            journald reads from a service's stderr (sd-daemon(3))."""

            def format(self, record):
                """The record as ``logging.Formatter`` gives it, after its ``<N>`` prefix."""
                return prefixes.get(record.levelno, "<6>") + super().format(record)

        formatter = JournalFormatter("%(name)s: %(message)s")
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def main(argv=None):
    """The lvmirrord command (``lvmirrord --help``); returns the exit status."""
    parser = argparse.ArgumentParser(prog="lvmirrord", description=_doc.splitlines()[0])
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="where volume metadata, bitmaps and logs live (default %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="I/O worker threads per LUN")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.add_argument("--no-dbus", action="store_true", help="do not start the D-Bus service")
    parser.add_argument("--processes", action=argparse.BooleanOptionalAction, default=True,
                        help="serve every volume from a process of its own, so busy volumes "
                             "use several cores (the default); --no-processes: every volume "
                             "in lvmirrord itself")
    parser.add_argument("--hooks-dir", default=DEFAULT_HOOKS_DIR,
                        help="split hooks: executables run before and after every split "
                             "(default %(default)s; see lvmirrord(8))")
    parser.add_argument("--metrics-file", default=DEFAULT_METRICS_FILE,
                        help="Prometheus metrics for the node exporter's textfile collector, "
                             "written while its directory exists (default %(default)s; '' "
                             "turns them off)")
    parser.add_argument("--metrics-interval", type=float, default=5.0,
                        help="seconds between two writes of the metrics (default %(default)s)")
    parser.add_argument("--lease-area", default=None,
                        help="shared storage: take each volume's sanlock lease in this lease "
                             "area (a shared file or block device, lvmirror lease-init) before "
                             "opening it, so a volume is open on one gateway at most")
    parser.add_argument("--host-id", type=int, default=None,
                        help="this gateway's sanlock host id (1-2000, unique per gateway; "
                             "with --lease-area)")
    parser.add_argument("--lease-io-timeout", type=int, default=10,
                        help="sanlock's I/O timeout for the lockspace, seconds (default "
                             "%(default)s: leases of a host that cannot renew for 8 x it are "
                             "lost)")
    parser.add_argument("--version", action="version", version=f"lvmirrord {__version__}")
    args = parser.parse_args(argv)
    # every usage error before any side effect (the logging set up, the daemon built)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 < args.metrics_interval < float("inf"):
        parser.error("--metrics-interval must be a number of seconds > 0")
    leases = None
    if args.lease_area or args.host_id is not None:
        if not (args.lease_area and args.host_id is not None):
            parser.error("--lease-area and --host-id go together")
        if args.lease_io_timeout < 1:
            parser.error("--lease-io-timeout must be at least 1 second")
        try:
            leases = LeaseConfig(args.lease_area, args.host_id, args.lease_io_timeout)
        except ConfigError as exc:
            parser.error(str(exc))
    setup_logging(args.log_level)
    daemon = Lvmirrord(state_dir=args.state_dir, workers=args.workers, with_bus=not args.no_dbus,
                       processes=args.processes, log_level=args.log_level,
                       hooks_dir=args.hooks_dir, metrics_file=args.metrics_file or None,
                       metrics_interval=args.metrics_interval, leases=leases)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    try:
        daemon.run()
    except (LvmirrorError, OSError) as exc:
        log.critical("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
