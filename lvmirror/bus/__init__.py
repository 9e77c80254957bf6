"""lvmirrord's D-Bus service (system bus; dbus-python on a GLib main loop in its own thread).

Two faces:

* **targetcli compatibility** (``org.kernel.TCMUService1``, as tcmu-runner provides it): an
  ObjectManager at ``/org/kernel/TCMUService1`` whose ``GetManagedObjects`` lists
  ``/org/kernel/TCMUService1/lvmirror`` with the ``ConfigDesc`` property and
  ``CheckConfig(s) -> (b, s)``, so stock targetcli shows ``/backstores/user:lvmirror`` and
  refuses a bad cfgstring with our message before it creates anything. When tcmu-runner already
  owns that name, lvmirrord registers with its ``HandlerManager1.RegisterHandler`` instead.
* **lvmirror's own API** (``org.lvmirror1``): ``/org/lvmirror1`` (interface
  ``org.lvmirror1.Manager``: status of every volume and LUN as JSON, Split, Resync
  (ResyncWithOptions: ``full``), Restore (RestoreWithOptions: ``full``), AbandonRestore, Attach, Detach, Cancel, and the
  region-lock
  coordination calls) is an ObjectManager of one object per open volume, ``/org/lvmirror1/volume/<name>`` (``org.lvmirror1.Volume``, see
  volume.py: typed properties, the same methods plus Backup, PropertiesChanged /
  ImageStateChanged / Progress signals). State-changing methods are root only: the policy file
  (systemd/dbus/org.lvmirror1.conf) says so, and the service checks the caller's uid again.

The data path never waits on the bus: methods act on the engine directly and long operations
(split waits for pre-T I/O to drain) run on a worker thread, answered asynchronously.
"""

from lvmirror.bus.names import BUS_NAME, MANAGER_PATH, TCMU_NAME

__all__ = ["BUS_NAME", "BusService", "MANAGER_PATH", "TCMU_NAME"]


def __getattr__(name):
    """``BusService`` on first use (PEP 562): importing the package, or ``lvmirror.bus.names``
    from a client, does not load the service (dbus.service, GLib)."""
    if name == "BusService":
        from lvmirror.bus.service import BusService
        return BusService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
