"""The names lvmirror's D-Bus interface is reached by: bus names, object paths, interfaces.

Kept apart from the service (``service.py``, ``volume.py``: dbus-python's service classes and
GLib) so that clients - the ``lvmirror`` CLI, ``targetcli-lvmirror``, the resource agent's
monitor - import only these strings and dbus-python's client side. Under the lab's emulated
CPU the service modules cost a client about half a second of start-up each run.
"""

TCMU_NAME = "org.kernel.TCMUService1"          # as tcmu-runner owns it (targetcli asks it)
TCMU_PATH = "/org/kernel/TCMUService1"
TCMU_HANDLER_MANAGER = "org.kernel.TCMUService1.HandlerManager1"
BUS_NAME = "org.lvmirror1"                     # lvmirrord's own name on the system bus
MANAGER_PATH = "/org/lvmirror1"
MANAGER_IFACE = "org.lvmirror1.Manager"
VOLUME_IFACE = "org.lvmirror1.Volume"
VOLUME_ROOT = "/org/lvmirror1/volume"          # one object per open volume below it
ERROR_PREFIX = "org.lvmirror1.Error"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
OM_IFACE = "org.freedesktop.DBus.ObjectManager"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
INTROSPECT_IFACE = "org.freedesktop.DBus.Introspectable"


def object_path(name: str) -> str:
    """Volume name -> its object path, ``VOLUME_ROOT/<label>``: the label escapes every byte
    that is not [A-Za-z0-9] as ``_xx`` (hex), as systemd escapes unit names on the bus, and an
    empty name is ``_``."""
    label = "".join(ch if ch.isascii() and ch.isalnum() else
                    "".join(f"_{b:02x}" for b in ch.encode()) for ch in name)
    return f"{VOLUME_ROOT}/{label or '_'}"
