"""lvmirrord: the LIO TCMU user-space handler for the ``lvmirror`` subtype.

lvmirrord serves every ``user:lvmirror`` backstore on the host:

* a netlink thread listens to the kernel's TCM-USER ``config`` multicast group and adds,
  removes and reconfigures LUNs (answering with the ``*_DONE`` replies, harmless when the
  kernel is not waiting);
* at start-up it picks up the devices that already exist, so a restart under a live LUN loses
  nothing;
* every volume is served by a process of its own (``volumeproc``), so busy volumes use several
  cores (``--no-processes``: lvmirrord serves them all itself);
* each LUN has a ring thread that fetches every available command from the TCMU ring, hands it
  to the LUN's own worker pool (a slow image or a long resync never stalls another LUN),
  collects completions and tells the kernel once per batch;
* the D-Bus service (targetcli compatibility, lvmirror's own API) runs in its own thread; the
  data path never waits on it;
* a metrics thread writes the status as Prometheus text for the node exporter every few seconds.

Modules: ``lunserver`` (one LUN's ring and worker pool), ``registry`` (the open volumes),
``host`` (one process's LUNs and volumes, and the management calls on them), ``volumeproc``
(a process per volume), ``manager`` (the daemon object: netlink, D-Bus, routing to the
hosts), ``splitgroup`` (consistency groups), ``hooks`` (split hooks), ``iostats`` (command
latency histograms), ``metrics`` (Prometheus text, the textfile writer), ``main`` (the command
line).
"""

from lvmirror.daemon.lunserver import SUBTYPE, LunBackend, LunServer, NotReadyBackend
from lvmirror.daemon.manager import DEFAULT_STATE_DIR, BackupProgress, Lvmirrord
from lvmirror.daemon.registry import VolumeRegistry


def main(argv=None):
    """The lvmirrord command (``lvmirrord --help``); returns the exit status."""
    from lvmirror.daemon.main import main as _main
    return _main(argv)


__all__ = ["BackupProgress", "DEFAULT_STATE_DIR", "LunBackend", "LunServer", "Lvmirrord",
           "NotReadyBackend", "SUBTYPE", "VolumeRegistry", "main"]
