"""The D-Bus objects (see the package docstring)."""

from __future__ import annotations

import json
import logging
import threading

import dbus
import dbus.mainloop.glib
import dbus.service
from gi.repository import GLib

from lvmirror import cfgstring
from lvmirror.errors import StateError
from lvmirror.bus.names import (ACCESS_DENIED, BUS_NAME, ERROR_PREFIX, MANAGER_IFACE,  # noqa: F401
                                MANAGER_PATH, OM_IFACE, PROPS_IFACE, TCMU_HANDLER_MANAGER,
                                TCMU_NAME, TCMU_PATH)
from lvmirror.bus.volume import (VOLUME_IFACE, VolumeObject, attach_options, interfaces,
                                 managed_objects, restore_options, resync_options,
                                 scrub_options, split_options)
from lvmirror.errors import LvmirrorError

log = logging.getLogger(__name__)

SYNC_INTERVAL_MS = 1000       # how often volume objects look for changes and send Progress


class LvmirrorDBusError(dbus.DBusException):
    """org.lvmirror1.Error.Failed: a management call refused or failed; the message says why."""
    _dbus_error_name = ERROR_PREFIX + ".Failed"


class AccessDenied(dbus.DBusException):
    """org.freedesktop.DBus.Error.AccessDenied: a state-changing call from a caller not root."""
    _dbus_error_name = ACCESS_DENIED


def _props(handler_desc):
    return {TCMU_NAME: {"ConfigDesc": dbus.String(handler_desc)}}


def _once(fn, arg):
    """A GLib idle callback that runs ``fn(arg)`` once (on the bus thread)."""
    fn(arg)
    return False


class TcmuHandler(dbus.service.Object):
    """``/org/kernel/TCMUService1/lvmirror``: what targetcli asks before ``create``."""

    def __init__(self, conn, path, daemon):
        super().__init__(conn, path)
        self._daemon = daemon

    @dbus.service.method(TCMU_NAME, in_signature="s", out_signature="bs")
    def CheckConfig(self, config):
        """tcmu-runner's CheckConfig: (ok, message) for cfgstring ``config`` ("lvmirror/...");
        targetcli refuses the backstore with the message when ok is false."""
        ok, msg = self._daemon.check_config(str(config))
        return dbus.Boolean(ok), dbus.String(msg)

    @dbus.service.method(PROPS_IFACE, in_signature="ss", out_signature="v")
    def Get(self, interface, prop):
        """org.freedesktop.DBus.Properties.Get (ConfigDesc, the cfgstring's help text)."""
        return self.GetAll(interface)[prop]

    @dbus.service.method(PROPS_IFACE, in_signature="s", out_signature="a{sv}")
    def GetAll(self, interface):
        """org.freedesktop.DBus.Properties.GetAll of org.kernel.TCMUService1 (UnknownInterface
        for another interface)."""
        if interface != TCMU_NAME:
            raise dbus.exceptions.DBusException(f"no interface {interface}",
                                                name="org.freedesktop.DBus.Error.UnknownInterface")
        return _props(cfgstring.CONFIG_DESC)[TCMU_NAME]


class TcmuRoot(dbus.service.Object):
    """``/org/kernel/TCMUService1``: the ObjectManager targetcli enumerates."""

    def __init__(self, conn, path, handler_path):
        super().__init__(conn, path)
        self._handler_path = handler_path

    @dbus.service.method(OM_IFACE, out_signature="a{oa{sa{sv}}}")
    def GetManagedObjects(self):
        """The handler object and its ConfigDesc, as tcmu-runner lists its handlers."""
        return {dbus.ObjectPath(self._handler_path): _props(cfgstring.CONFIG_DESC)}


class Manager(dbus.service.Object):
    """``/org/lvmirror1``: lvmirror's own management API."""

    def __init__(self, conn, daemon, service):
        super().__init__(conn, MANAGER_PATH)
        self._daemon = daemon
        self._service = service

    # -- access control ------------------------------------------------------------------------

    def _require_root(self, sender):
        uid = self._service.caller_uid(sender)
        if uid != 0:
            raise AccessDenied(f"uid {uid} may read lvmirror status but not change it; "
                               f"run as root")

    def run(self, sender, fn, ok, err, *, root=True):
        """Run ``fn`` on a worker thread (it may wait for I/O to drain); reply when done, then
        let the volume objects announce what changed. A call refused - not root, or the
        engine's refusal (a split image exported, a restore unfinished...) - leaves a line in
        the journal with the caller's bus name, as the work a call does leaves its own."""
        try:
            if root:
                self._require_root(sender)
        except dbus.DBusException as e:
            log.warning("D-Bus: a call from %s refused: %s", sender, e.get_dbus_message())
            err(e)
            return

        def work():
            try:
                result = fn()
            except (LvmirrorError, ValueError, KeyError, IndexError) as e:
                log.info("D-Bus: a call from %s refused: %s", sender, e)
                error = LvmirrorDBusError(str(e))
            except Exception as e:   # report, never kill the service
                log.exception("bus method failed")
                error = LvmirrorDBusError(f"{type(e).__name__}: {e}")
            else:
                GLib.idle_add(_once, ok, result)
                GLib.idle_add(_once, lambda _: self._service.sync(), None)
                return
            GLib.idle_add(_once, err, error)

        threading.Thread(target=work, name="bus-call", daemon=True).start()

    # -- org.freedesktop.DBus.ObjectManager: one object per open volume ------------------------

    @dbus.service.method(OM_IFACE, out_signature="a{oa{sa{sv}}}")
    def GetManagedObjects(self):
        """One object per open volume, with its org.lvmirror1.Volume properties."""
        return managed_objects(self._daemon.status())

    @dbus.service.signal(OM_IFACE, signature="oa{sa{sv}}")
    def InterfacesAdded(self, path, interfaces):
        """Signal: a volume was opened (its object appeared)."""
        pass

    @dbus.service.signal(OM_IFACE, signature="oas")
    def InterfacesRemoved(self, path, interfaces):
        """Signal: a volume was closed (its object went away)."""
        pass

    # -- read ----------------------------------------------------------------------------------

    @dbus.service.method(MANAGER_IFACE, out_signature="s")
    def Status(self):
        """Everything an operator looks at, as JSON: volumes (images, states, split time, bitmap
        fill, jobs, I/O counters) and LUNs."""
        return json.dumps(self._daemon.status())

    @dbus.service.method(MANAGER_IFACE, out_signature="as")
    def ListVolumes(self):
        """Names of the open volumes, sorted."""
        return self._daemon.volume_names()

    # -- change --------------------------------------------------------------------------------

    @dbus.service.method(MANAGER_IFACE, in_signature="su", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Split(self, volume, image, sender=None, ok=None, err=None):
        """Split image ``image`` off ``volume`` now; returns (JSON) when pre-T I/O drained."""
        self.run(sender, lambda: json.dumps(self._daemon.split(str(volume), int(image))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="a(su)", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def SplitGroup(self, members, sender=None, ok=None, err=None):
        """Split one image of each volume at one instant (a consistency group): ``members`` is
        an array of (volume, image index). Returns (JSON) each member's split, the first T, the
        span of the switches and how long completions were held (seconds)."""
        self.run(sender, lambda: json.dumps(self._daemon.split_group(
            [(str(v), int(i)) for v, i in members])), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="sua{sv}", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def SplitWithOptions(self, volume, image, options, sender=None, ok=None, err=None):
        """Split with options (``a{sv}``): ``hooks`` (b, run the split hooks: default true),
        ``hook_timeout`` (d, seconds per hook, default 30), ``on_hook_error`` (s, "abort" the
        split when a pre-split hook fails, the default, or "continue"). Unknown options are an
        error. Returns (JSON) what Split returns, with what each hook did."""
        self.run(sender, lambda: json.dumps(self._daemon.split(
            str(volume), int(image), split_options(options))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="a(su)a{sv}", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def SplitGroupWithOptions(self, members, options, sender=None, ok=None, err=None):
        """SplitGroup with the options of SplitWithOptions (the hooks run once around the
        group)."""
        self.run(sender, lambda: json.dumps(self._daemon.split_group(
            [(str(v), int(i)) for v, i in members], split_options(options))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="a(su)d", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def RestoreGroup(self, members, rate_mbps, sender=None, ok=None, err=None):
        """Roll every member volume back to its split image at one instant (rate limit in MB/s
        per volume, 0 = unlimited); returns (JSON) the restores' progress."""
        self.run(sender, lambda: json.dumps(self._daemon.restore_group(
            [(str(v), int(i)) for v, i in members], float(rate_mbps))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="sud", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Resync(self, volume, image, rate_mbps, sender=None, ok=None, err=None):
        """Start resyncing ``image`` (rate limit in MB/s, 0 = unlimited)."""
        self.run(sender, lambda: json.dumps(self._daemon.resync(str(volume), int(image),
                                                                 float(rate_mbps))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="suda{sv}", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def ResyncWithOptions(self, volume, image, rate_mbps, options, sender=None, ok=None,
                          err=None):
        """Resync with options (``a{sv}``): ``full`` (b) copies every region, also into an
        image marked in sync (it serves no reads until the copy ends). Unknown options are an
        error. Returns the job's progress (JSON), as Resync does."""
        self.run(sender, lambda: json.dumps(self._daemon.resync(
            str(volume), int(image), float(rate_mbps), **resync_options(options))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="sud", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Restore(self, volume, image, rate_mbps, sender=None, ok=None, err=None):
        """Roll ``volume`` back to split image ``image``."""
        self.run(sender, lambda: json.dumps(self._daemon.restore(str(volume), int(image),
                                                                  float(rate_mbps))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="suda{sv}", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def RestoreWithOptions(self, volume, image, rate_mbps, options, sender=None, ok=None,
                           err=None):
        """Restore with options (``a{sv}``): ``full`` (b) rolls back every region, not only
        those changed since the split (a split image's file that is not the recorded copy).
        Unknown options are an error. Returns the job's progress (JSON), as Restore does."""
        self.run(sender, lambda: json.dumps(self._daemon.restore(
            str(volume), int(image), float(rate_mbps), **restore_options(options))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="ss", out_signature="u",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def AttachImage(self, volume, path, sender=None, ok=None, err=None):
        """Attach ``path`` to ``volume`` (full resync); returns its index. An existing path
        that holds data is refused (see AttachImageWithOptions)."""
        self.run(sender, lambda: self._daemon.attach(str(volume), str(path)), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="ssa{sv}", out_signature="u",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def AttachImageWithOptions(self, volume, path, options, sender=None, ok=None, err=None):
        """AttachImage with options (``a{sv}``): ``force`` (b) lets the full resync overwrite
        an existing image that holds data, which is refused otherwise, saying what was found
        (as mdadm and pvcreate refuse a device that carries data). Unknown options are an
        error. Returns the new image's index."""
        self.run(sender, lambda: self._daemon.attach(str(volume), str(path),
                                                     **attach_options(options)), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="su", out_signature="",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def BackupCheck(self, volume, image, sender=None, ok=None, err=None):
        """Fail with the reason a backup of ``image`` would be refused (not split, or not the
        copy its split recorded: ``mirror.copyid``), changing nothing; anyone may ask (it
        reads). (``lvmirror backup`` and targetcli-lvmirror's ``backup`` use BeginBackup,
        which checks the same and holds the image.)"""
        self.run(sender, lambda: self._daemon.backup_check(str(volume), int(image)),
                 lambda _r: ok(), err, root=False)

    @dbus.service.method(MANAGER_IFACE, in_signature="sus", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def BeginBackup(self, volume, image, destination, sender=None, ok=None, err=None):
        """Hold split ``image`` of ``volume`` for a backup to ``destination`` that the caller
        copies itself (``lvmirror backup``, targetcli-lvmirror's ``backup``): checked as
        Backup is, then resync, restore and detach of the image are refused until EndBackup
        or until the caller leaves the bus (``VolumeHost.begin_backup``). Returns JSON
        ``{"path", "size", "state"}``: the file to copy and the volume's size in bytes."""
        locks = self._service.locks
        owner = locks.owner(sender)

        def begin():
            held = self._daemon.begin_backup(str(volume), int(image), str(destination), owner)
            locks.keep(sender, lambda: self._daemon.end_backup(
                str(volume), int(image), owner, state="failed",
                error="its caller left the bus before the hold was given"))
            return json.dumps(held)
        self.run(sender, begin, ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="sua{sv}", out_signature="",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def EndBackup(self, volume, image, result, sender=None, ok=None, err=None):
        """End the caller's BeginBackup: ``result`` ``a{sv}`` with ``state`` s ("done" or
        "failed"), ``bytes`` t (copied) and ``error`` s (why it failed). An error when the
        caller holds no running backup of the image (the hold was lost: the volume's
        process restarted), which means the copy is not vouched for."""
        res = dict(result)
        unknown = set(res) - {"state", "bytes", "error"}
        if unknown:
            err(LvmirrorDBusError(f"EndBackup: unknown result key(s) {sorted(unknown)}"))
            return
        owner = ("bus", str(sender))
        self.run(sender, lambda: self._daemon.end_backup(
            str(volume), int(image), owner, state=str(res.get("state", "done")),
            nbytes=int(res.get("bytes", 0)), error=str(res.get("error", "")) or None),
            lambda _r: ok(), err)

    @dbus.service.method(MANAGER_IFACE, in_signature="su", out_signature="",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def DetachImage(self, volume, image, sender=None, ok=None, err=None):
        """Remove image ``image`` (an index) from ``volume``; its file is kept
        (``Lvmirrord.detach``: refused while backed up or exported)."""
        self.run(sender, lambda: self._daemon.detach(str(volume), int(image)),
                  lambda _r: ok(), err)

    @dbus.service.method(MANAGER_IFACE, in_signature="sttbd", out_signature="t",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def LockRegion(self, volume, lba, count, shared, timeout, sender=None, ok=None, err=None):
        """Lock LBAs [lba, lba+count) of ``volume`` (waits FIFO; ``timeout`` seconds, 0 = wait
        forever; a timeout under 5 s waits up to 5 s when only a one-image LUN's ring thread's
        lease is in the way, which it gives back when asked: RegionLockManager.lock). The lock
        is the caller's until UnlockRegion or until it leaves the bus; while held exclusively,
        initiator I/O to the range waits."""
        locks = self._service.locks
        owner = locks.owner(sender)

        def lock():
            lock_id = self._daemon.lock_region(str(volume), int(lba), int(count),
                                               shared=bool(shared),
                                               timeout=float(timeout) or None, owner=owner)
            locks.keep(sender, lambda: self._daemon.unlock_region(lock_id, owner=owner))
            return lock_id
        self.run(sender, lock, ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="t", out_signature="",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def UnlockRegion(self, lock_id, sender=None, ok=None, err=None):
        """Release lock ``lock_id`` from LockRegion (only its holder may)."""
        owner = ("bus", str(sender))
        self.run(sender, lambda: self._daemon.unlock_region(int(lock_id), owner=owner),
                  lambda _r: ok(), err)

    @dbus.service.method(MANAGER_IFACE, in_signature="s", out_signature="s")
    def ListLocks(self, volume):
        """Held locks and waiting requests of ``volume`` (JSON), I/O and external ones."""
        try:
            return json.dumps(self._daemon.list_locks(str(volume)))
        except LvmirrorError as e:
            raise LvmirrorDBusError(str(e))

    @dbus.service.method(MANAGER_IFACE, in_signature="su", out_signature="",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Cancel(self, volume, image, sender=None, ok=None, err=None):
        """Stop the resync or restore running on ``image`` (``VolumeHost.cancel``): its bitmap
        is kept, and Resync (or Restore) of the image resumes it; a cancelled restore stays
        unfinished, refusing resync, split, attach, detach and scrub until it is done."""
        self.run(sender, lambda: self._daemon.cancel(str(volume), int(image)),
                  lambda _r: ok(), err)

    @dbus.service.method(MANAGER_IFACE, in_signature="su", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def AbandonRestore(self, volume, image, sender=None, ok=None, err=None):
        """End the unfinished restore from split image ``image`` of ``volume`` without
        finishing it, when its source cannot be read (``VolumeHost.abandon_restore``): the
        volume keeps the split image's data where it was rolled back and the live data
        elsewhere. Returns JSON ``{"regions", "bytes"}`` not rolled back; refused while the
        restore runs (Cancel it first) or when none is unfinished."""
        self.run(sender, lambda: json.dumps(self._daemon.abandon_restore(str(volume),
                                                                         int(image))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="sa{sv}", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Scrub(self, volume, options, sender=None, ok=None, err=None):
        """Start a scrub of ``volume``: every region read from every in-sync image and
        compared (options ``a{sv}``: ``repair`` b, ``source`` u, ``rate`` d MB/s; see
        ``bus.volume.scrub_options``). Returns the job's progress (JSON); the result is in
        Status (``scrub``) and the volume's LastScrub property."""
        self.run(sender, lambda: json.dumps(self._daemon.scrub(
            str(volume), **scrub_options(options))), ok, err)

    @dbus.service.method(MANAGER_IFACE, in_signature="s", out_signature="",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def CancelScrub(self, volume, sender=None, ok=None, err=None):
        """Stop the scrub of ``volume`` after the region in hand (kept as cancelled)."""
        self.run(sender, lambda: self._daemon.cancel_scrub(str(volume)), lambda _r: ok(), err)


class LockCoordinator:
    """Region locks for processes on the bus; a holder that leaves the bus loses its locks."""

    def __init__(self, manager, daemon):
        self._daemon = daemon
        self._owners = set()
        # owners that left the bus: a call of theirs still running when they left (its hold
        # registered after release_owner ran) ends what it made (``left``). Unique bus names
        # are never given out again, so the set only grows by callers that held something.
        self._gone = set()
        manager.connection.add_signal_receiver(
            self._name_owner_changed, signal_name="NameOwnerChanged",
            dbus_interface="org.freedesktop.DBus", bus_name="org.freedesktop.DBus",
            path="/org/freedesktop/DBus")

    def owner(self, sender):
        """The lock owner for bus name ``sender``; its locks go when it leaves the bus."""
        self._owners.add(str(sender))
        return ("bus", str(sender))

    def left(self, sender) -> bool:
        """Whether bus name ``sender`` (an owner) has left the bus."""
        return str(sender) in self._gone

    def keep(self, sender, undo) -> None:
        """After a call of ``sender`` gave it something that lasts (a region lock, a backup's
        hold): when ``sender`` left the bus meanwhile, its ``release_owner`` ran before the
        thing was registered and did not end it, so ``undo()`` ends it now (an LvmirrorError
        from it means it was ended already) and StateError("the caller left the bus") is
        raised; otherwise nothing."""
        if not self.left(sender):
            return
        try:
            undo()
        except LvmirrorError:
            pass
        raise StateError("the caller left the bus")

    def _name_owner_changed(self, name, old, new):
        if not new and name in self._owners:
            self._owners.discard(name)
            self._gone.add(name)
            threading.Thread(target=self._daemon.release_owner, args=(("bus", str(name)),),
                             daemon=True).start()


class BusService:
    """Owns the names and runs the GLib main loop in a thread. ``daemon`` provides
    ``check_config(cfg) -> (ok, msg)``, ``status()``, ``volume_names()`` and the management
    calls."""

    def __init__(self, daemon, *, bus_address: str | None = None):
        self._daemon = daemon
        self._address = bus_address
        self._loop = None
        self._thread = None
        self._ready = threading.Event()
        self._error = None
        self._objects = []
        self._names = []
        self._volumes: dict[str, VolumeObject] = {}
        self._tick_source = None   # the GLib source of the periodic sync
        self._stopped = False
        self.manager = None
        self.conn = None
        self.tcmu_mode = None      # "owner" or "registered" (tcmu-runner owns the name)
        self._runner = None        # tcmu-runner's unique name while registered with it

    def start(self, timeout=10.0):
        """Connect, own the names (or register with tcmu-runner when it owns
        org.kernel.TCMUService1) and run the main loop in a thread; RuntimeError if that takes
        more than ``timeout`` seconds, the connection's error if it fails. A service starts
        once: StateError after ``stop`` (make a new one)."""
        if self._stopped or self._thread is not None:
            raise StateError("a BusService starts once; make a new one after stop")
        dbus.mainloop.glib.threads_init()      # the daemon is multi-threaded: lock libdbus
        dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
        self._thread = threading.Thread(target=self._run, name="dbus", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("D-Bus service did not start")
        if self._error is not None:
            raise self._error

    def _connect(self):
        if self._address:
            conn = dbus.bus.BusConnection(self._address)
        else:
            conn = dbus.SystemBus(private=True)
        return conn

    def _run(self):
        # dbus-python attaches connections to GLib's default main context; this thread is
        # the only one that runs it.
        self._loop = GLib.MainLoop()
        try:
            self.conn = self._connect()
            self._export()
        except Exception as e:
            self._withdraw()      # the objects exported before the names failed, the timer
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run()

    def _export(self):
        conn = self.conn
        manager = self.manager = Manager(conn, self._daemon, self)
        self._objects.append(manager)
        self.sync()
        self._tick_source = GLib.timeout_add(SYNC_INTERVAL_MS, self._tick)
        self.locks = LockCoordinator(manager, self._daemon)
        self._names = [dbus.service.BusName(BUS_NAME, conn, do_not_queue=True)]
        handler_path = f"{TCMU_PATH}/{cfgstring.SUBTYPE}"
        try:
            self._names.append(dbus.service.BusName(TCMU_NAME, conn, do_not_queue=True))
        except dbus.exceptions.NameExistsException:
            # tcmu-runner is there: register our handler with its HandlerManager1.
            own = f"{TCMU_HANDLER_MANAGER}.{cfgstring.SUBTYPE}"
            self._names.append(dbus.service.BusName(own, conn, do_not_queue=True))
            path = f"{TCMU_PATH}/HandlerManager1/{cfgstring.SUBTYPE}"
            self._objects.append(TcmuHandler(conn, path, self._daemon))
            ok, msg = self._runner_manager().RegisterHandler(
                cfgstring.SUBTYPE, cfgstring.CONFIG_DESC, dbus_interface=TCMU_HANDLER_MANAGER)
            if not ok:
                raise RuntimeError(f"tcmu-runner refused to register handler "
                                   f"{cfgstring.SUBTYPE}: {msg}")
            self.tcmu_mode = "registered"
            self._runner = conn.get_name_owner(TCMU_NAME)
            log.info("D-Bus: registered handler %s with tcmu-runner", cfgstring.SUBTYPE)
            # tcmu-runner forgets its registered handlers when it restarts: register again
            # whenever a new tcmu-runner takes the name.
            conn.watch_name_owner(TCMU_NAME, self._runner_changed)
        else:
            self._objects.append(TcmuRoot(conn, TCMU_PATH, handler_path))
            self._objects.append(TcmuHandler(conn, handler_path, self._daemon))
            self.tcmu_mode = "owner"
            log.info("D-Bus: serving %s and %s", TCMU_NAME, BUS_NAME)

    def _runner_manager(self):
        return self.conn.get_object(TCMU_NAME, f"{TCMU_PATH}/HandlerManager1")

    def _runner_changed(self, owner):
        """(bus thread) org.kernel.TCMUService1 changed hands."""
        if owner == self._runner:
            return                  # the first call reports the owner we registered with
        self._runner = owner
        if not owner:
            log.warning("D-Bus: tcmu-runner left the bus; targetcli lists user:%s again once "
                        "it is back (LUNs keep being served)", cfgstring.SUBTYPE)
            return

        def registered(ok, msg):
            if ok:
                log.info("D-Bus: registered handler %s with the restarted tcmu-runner",
                         cfgstring.SUBTYPE)
            else:
                log.error("D-Bus: tcmu-runner refused handler %s: %s", cfgstring.SUBTYPE, msg)

        def failed(exc):
            log.error("D-Bus: registering handler %s with tcmu-runner failed: %s",
                      cfgstring.SUBTYPE, exc)

        self._runner_manager().RegisterHandler(
            cfgstring.SUBTYPE, cfgstring.CONFIG_DESC, dbus_interface=TCMU_HANDLER_MANAGER,
            reply_handler=registered, error_handler=failed)

    def _tick(self):
        try:
            self.sync()
        except Exception:          # never let the look stop the loop
            log.exception("D-Bus: volume objects not updated")
        return True

    def sync(self):
        """(bus thread) Export an object per open volume, drop those of closed ones, and let
        each announce its changes (PropertiesChanged, ImageStateChanged, Progress). Nothing
        once ``stop`` ran: the timer and a method's idle callback are on GLib's default
        context, which outlives this service (in the unit tests, a later one's loop ran them
        and failed to unexport objects ``stop`` had removed)."""
        if self._stopped:
            return
        status = self._daemon.status()
        vols = status["volumes"]
        for name in list(self._volumes):
            if name not in vols:
                obj = self._volumes.pop(name)
                obj.remove_from_connection()
                self.manager.InterfacesRemoved(dbus.ObjectPath(obj.path),
                                               dbus.Array([VOLUME_IFACE], signature="s"))
        for name, vol in vols.items():
            obj = self._volumes.get(name)
            if obj is None:
                obj = self._volumes[name] = VolumeObject(self.conn, name, self._daemon,
                                                         self.manager)
                obj.refresh(vol)
                self.manager.InterfacesAdded(dbus.ObjectPath(obj.path), interfaces(vol, name))
            else:
                obj.refresh(vol)

    def caller_uid(self, sender) -> int:
        """The Unix uid of bus name ``sender`` (the bus daemon's GetConnectionUnixUser)."""
        dbus_obj = self.conn.get_object("org.freedesktop.DBus", "/org/freedesktop/DBus")
        return int(dbus_obj.GetConnectionUnixUser(sender, dbus_interface="org.freedesktop.DBus"))

    def stop(self):
        """Quit the main loop, remove the objects and release the names."""
        self._stopped = True
        if self._loop is not None:
            self._loop.quit()
        if self._thread is not None:
            self._thread.join(5)
        self._withdraw()

    def _withdraw(self):
        """Remove the periodic sync - it is on GLib's default context, which outlives this
        service: another service's loop would run it - and the objects, release the names and
        close the connection (after ``stop``, or a ``start`` that failed half-way)."""
        if self._tick_source is not None:
            GLib.source_remove(self._tick_source)
            self._tick_source = None
        for obj in self._objects + list(self._volumes.values()):
            try:
                obj.remove_from_connection()
            except Exception:
                pass
        self._objects = []
        self._volumes.clear()
        self._names = []          # BusName.__del__ releases the names while still connected
        if self.conn is not None:
            self.conn.close()
