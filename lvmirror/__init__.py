"""lvmirror: mirrored iSCSI LUNs with online split-mirror snapshots on the LIO target."""

__version__ = "0.1.0"
