"""One D-Bus object per open volume: ``/org/lvmirror1/volume/<name>``, interface
``org.lvmirror1.Volume``, with the standard Properties interface and listed by the
ObjectManager at ``/org/lvmirror1``.

Properties (read-only): Name, Size, BlockSize, RegionSize, Images ``a(usstddts)`` (index, path,
state, generation, split time or 0, bitmap fill or -1, changed bytes, error), Jobs
``a(susttdds)`` (kind, image index, state, bytes done, bytes total, MB/s, elapsed s, error),
SyncProgress (fraction of the running jobs' bytes done; 1 when none runs), Exported (split
images served as their own LUN), Health (``optimal``, ``degraded``: an image failed or
syncing, ``offline``: no image can serve and the LUN answers NOT READY), IoStatistics ``a{st}``
(counters, image failures, slow legs, out-of-space and metadata errors included; not announced
in PropertiesChanged, read them when needed).

LastScrub ``(sddtttt)`` (state, started, finished or 0, regions checked, mismatches, repaired,
left as found; the whole report is in the Manager's Status).

Methods: Split, Resync, ResyncWithOptions (``full``: every region, also into an image in sync),
Restore, AbandonRestore, AttachImage, AttachImageWithOptions (``force``: overwrite an
image that holds data), DetachImage, Cancel, Backup, Scrub (options ``repair`` b, ``source`` u,
``rate`` d), CancelScrub. Signals:
PropertiesChanged (standard) when an image, job or export changes; ImageStateChanged(index,
old, new); Progress(kind, image, done, total, rate) every second while a resync, restore,
scrub (image 0xFFFFFFFF) or backup runs; ScrubFinished(state, regions checked, mismatches,
repaired, left as found) when a scrub ends. The service looks at the volumes once a second and right after each call it
served (the data path never calls into the bus).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import dbus
import dbus.service

from lvmirror.bus.names import (INTROSPECT_IFACE, PROPS_IFACE, VOLUME_IFACE,  # noqa: F401
                                VOLUME_ROOT, object_path)

# name -> (D-Bus signature, announced in PropertiesChanged)
PROPERTIES = {
    "Name": ("s", True),
    "Size": ("t", True),
    "BlockSize": ("u", True),
    "RegionSize": ("u", True),
    "Images": ("a(usstddts)", True),
    "Jobs": ("a(susttdds)", True),
    "SyncProgress": ("d", True),
    "Exported": ("au", True),
    "Health": ("s", True),          # optimal | degraded | offline (no image can serve)
    "IoStatistics": ("a{st}", False),
    # state, started, finished (0 while running), regions checked, mismatches, repaired,
    # left as found; state "" when the volume was never scrubbed
    "LastScrub": ("(sddtttt)", True),
}


def properties(vol: dict, name: str) -> dict:
    """A volume's status entry (``Lvmirrord.status()['volumes'][name]``) as typed D-Bus values."""
    by_id = {im["id"]: im["index"] for im in vol["images"]}
    images = dbus.Array([dbus.Struct((
        dbus.UInt32(im["index"]), dbus.String(im["path"]), dbus.String(im["state"]),
        dbus.UInt64(im["generation"]), dbus.Double(im["split_time"] or 0.0),
        dbus.Double(-1.0 if im["bitmap_fill"] is None else im["bitmap_fill"]),
        dbus.UInt64(im["dirty_bytes"] or 0), dbus.String(im["error"] or "")),
        signature="usstddts") for im in vol["images"]], signature="(usstddts)")
    jobs = dbus.Array([dbus.Struct((
        dbus.String(j["kind"]), dbus.UInt32(by_id.get(j["image_id"], 0xFFFFFFFF)),
        dbus.String(j["state"]), dbus.UInt64(j["bytes_done"]), dbus.UInt64(j["bytes_total"]),
        dbus.Double(j["rate"]), dbus.Double(j.get("elapsed") or 0.0),
        dbus.String(j["error"] or "")), signature="susttdds") for j in vol["jobs"]],
        signature="(susttdds)")
    # a scrub copies nothing: SyncProgress is about the images coming back in sync
    running = [j for j in vol["jobs"] if j["state"] == "running" and j["kind"] != "scrub"]
    total = sum(j["bytes_total"] for j in running)
    progress = (sum(j["bytes_done"] for j in running) / total) if total else 1.0
    return {
        "Name": dbus.String(name),
        "Size": dbus.UInt64(vol["size"]),
        "BlockSize": dbus.UInt32(vol["block_size"]),
        "RegionSize": dbus.UInt32(vol["region_size"]),
        "Images": images,
        "Jobs": jobs,
        "SyncProgress": dbus.Double(progress),
        "Exported": dbus.Array([dbus.UInt32(i) for i in vol.get("exported", [])], signature="u"),
        "Health": dbus.String(vol.get("health", "optimal")),
        "IoStatistics": dbus.Dictionary({k: dbus.UInt64(v) for k, v in vol["io"].items()},
                                        signature="st"),
        "LastScrub": _scrub_struct(vol.get("scrub")),
    }


def _scrub_struct(sc):
    if not sc:
        return dbus.Struct(("", 0.0, 0.0, 0, 0, 0, 0), signature="sddtttt")
    return dbus.Struct((dbus.String(sc["state"]), dbus.Double(sc["started"]),
                        dbus.Double(sc["finished"] or 0.0), dbus.UInt64(sc["regions_checked"]),
                        dbus.UInt64(sc["mismatches"]), dbus.UInt64(sc["repaired"]),
                        dbus.UInt64(sc["unrepaired"])), signature="sddtttt")


class VolumeObject(dbus.service.Object):
    """``/org/lvmirror1/volume/<name>``. ``calls`` is the Manager (root check, worker threads)."""

    def __init__(self, conn, name, daemon, calls):
        self.name = name
        self.path = object_path(name)
        super().__init__(conn, self.path)
        self._daemon = daemon
        self._calls = calls
        self.props: dict = {}

    # -- the service's once-a-second look ------------------------------------------------------

    def refresh(self, vol: dict):
        """New status entry: emit PropertiesChanged / ImageStateChanged / Progress as needed."""
        new = properties(vol, self.name)
        old, self.props = self.props, new
        if not old:
            return
        changed = {k: v for k, v in new.items() if PROPERTIES[k][1] and v != old.get(k)}
        if changed:
            self.PropertiesChanged(VOLUME_IFACE, changed, dbus.Array([], signature="s"))
        before = {int(im[0]): str(im[2]) for im in old["Images"]}
        for im in new["Images"]:
            i, state = int(im[0]), str(im[2])
            if i in before and before[i] != state:
                self.ImageStateChanged(dbus.UInt32(i), before[i], state)
        for j in new["Jobs"]:
            if str(j[2]) == "running":
                self.Progress(j[0], j[1], j[3], j[4], j[5])
        sc, was = new["LastScrub"], old["LastScrub"]
        if str(sc[0]) not in ("", "running") and (str(was[0]) == "running" or sc[1] != was[1]):
            self.ScrubFinished(sc[0], sc[3], sc[4], sc[5], sc[6])

    # -- org.freedesktop.DBus.Properties -------------------------------------------------------

    @dbus.service.method(PROPS_IFACE, in_signature="ss", out_signature="v")
    def Get(self, interface, prop):
        """org.freedesktop.DBus.Properties.Get: one property of ``GetAll`` (its errors), or
        UnknownProperty for a name not in PROPERTIES."""
        props = self.GetAll(interface)
        if prop not in props:
            raise dbus.exceptions.DBusException(
                f"{VOLUME_IFACE} has no property {prop}",
                name="org.freedesktop.DBus.Error.UnknownProperty")
        return props[prop]

    @dbus.service.method(PROPS_IFACE, in_signature="s", out_signature="a{sv}")
    def GetAll(self, interface):
        """org.freedesktop.DBus.Properties.GetAll of org.lvmirror1.Volume ("" means it): the
        volume's status now, as typed values (``properties``). UnknownInterface for another
        interface, UnknownObject once the volume is no longer open."""
        if interface not in (VOLUME_IFACE, ""):
            raise dbus.exceptions.DBusException(
                f"no interface {interface}", name="org.freedesktop.DBus.Error.UnknownInterface")
        vol = self._daemon.status()["volumes"].get(self.name)
        if vol is None:
            raise dbus.exceptions.DBusException(
                f"volume {self.name} is no longer open", name="org.freedesktop.DBus.Error.UnknownObject")
        return dbus.Dictionary(properties(vol, self.name), signature="sv")

    @dbus.service.method(PROPS_IFACE, in_signature="ssv", out_signature="")
    def Set(self, interface, prop, value):
        """org.freedesktop.DBus.Properties.Set: every property is read-only, so always
        PropertyReadOnly; state changes go through the methods."""
        raise dbus.exceptions.DBusException(
            f"{prop} is read-only; use the methods of {VOLUME_IFACE}",
            name="org.freedesktop.DBus.Error.PropertyReadOnly")

    @dbus.service.signal(PROPS_IFACE, signature="sa{sv}as")
    def PropertiesChanged(self, interface, changed, invalidated):
        """org.freedesktop.DBus.Properties.PropertiesChanged (interface, changed values,
        invalidated names); ``refresh`` sends it for the properties PROPERTIES announces."""
        pass

    # -- introspection with the properties (dbus-python only generates methods and signals) ---

    @dbus.service.method(INTROSPECT_IFACE, in_signature="", out_signature="s",
                         path_keyword="object_path", connection_keyword="connection")
    def Introspect(self, object_path, connection):
        """org.freedesktop.DBus.Introspectable.Introspect: dbus-python's document plus the
        read-only <property> elements of PROPERTIES (``add_properties``)."""
        xml = dbus.service.Object.Introspect(self, object_path, connection)
        return add_properties(xml, VOLUME_IFACE, PROPERTIES)

    # -- signals -------------------------------------------------------------------------------

    @dbus.service.signal(VOLUME_IFACE, signature="uss")
    def ImageStateChanged(self, index, old_state, new_state):
        """An image changed state (in-sync, syncing, split, failed, missing...)."""

    @dbus.service.signal(VOLUME_IFACE, signature="suttd")
    def Progress(self, kind, image, bytes_done, bytes_total, rate_mbps):
        """Once a second while a resync, restore or backup runs."""

    @dbus.service.signal(VOLUME_IFACE, signature="stttt")
    def ScrubFinished(self, state, regions_checked, mismatches, repaired, unrepaired):
        """A scrub ended: state (done, cancelled, failed), regions checked, regions found
        different, repaired, left as found (the report: the Manager's Status)."""

    # -- methods (root only; run on a worker thread, answered when done) -----------------------

    @dbus.service.method(VOLUME_IFACE, in_signature="u", out_signature="du",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Split(self, image, sender=None, ok=None, err=None):
        """Split image ``image`` off now; returns (split time, I/Os drained) once every I/O
        begun before the split reached all images."""
        def done(r):
            ok(dbus.Double(r["split_time"]), dbus.UInt32(r["drained"]))
        self._calls.run(sender, lambda: self._daemon.split(self.name, int(image)), done, err)

    @dbus.service.method(VOLUME_IFACE, in_signature="ud", out_signature="t",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Resync(self, image, rate_mbps, sender=None, ok=None, err=None):
        """Start copying the regions changed since the split back into ``image`` (rate limit
        in MB/s, 0 = unlimited); returns the bytes to copy. Progress signals follow."""
        self._calls.run(sender, lambda: self._daemon.resync(self.name, int(image),
                                                            float(rate_mbps)),
                        lambda r: ok(dbus.UInt64(r["bytes_total"])), err)

    @dbus.service.method(VOLUME_IFACE, in_signature="uda{sv}", out_signature="t",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def ResyncWithOptions(self, image, rate_mbps, options, sender=None, ok=None, err=None):
        """Resync with options (``a{sv}``): ``full`` (b) copies every region, also into an
        image marked in sync, which stops serving reads until the copy ends (a disk suspected
        of dropped writes). Unknown options are an error. Returns the bytes to copy."""
        self._calls.run(sender, lambda: self._daemon.resync(self.name, int(image),
                                                            float(rate_mbps),
                                                            **resync_options(options)),
                        lambda r: ok(dbus.UInt64(r["bytes_total"])), err)

    @dbus.service.method(VOLUME_IFACE, in_signature="ud", out_signature="t",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Restore(self, image, rate_mbps, sender=None, ok=None, err=None):
        """Roll the volume back to split image ``image``; returns the bytes to copy."""
        self._calls.run(sender, lambda: self._daemon.restore(self.name, int(image),
                                                             float(rate_mbps)),
                        lambda r: ok(dbus.UInt64(r["bytes_total"])), err)

    @dbus.service.method(VOLUME_IFACE, in_signature="uda{sv}", out_signature="t",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def RestoreWithOptions(self, image, rate_mbps, options, sender=None, ok=None, err=None):
        """Restore with options (``a{sv}``): ``full`` (b) rolls back every region, not only
        those changed since the split (a split image's file that is not the recorded copy).
        Unknown options are an error. Returns the bytes to copy."""
        self._calls.run(sender, lambda: self._daemon.restore(self.name, int(image),
                                                             float(rate_mbps),
                                                             **restore_options(options)),
                        lambda r: ok(dbus.UInt64(r["bytes_total"])), err)

    @dbus.service.method(VOLUME_IFACE, in_signature="s", out_signature="u",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def AttachImage(self, path, sender=None, ok=None, err=None):
        """Add an image (file or block device); a full resync starts. Returns its index."""
        self._calls.run(sender, lambda: self._daemon.attach(self.name, str(path)),
                        lambda r: ok(dbus.UInt32(r)), err)

    @dbus.service.method(VOLUME_IFACE, in_signature="sa{sv}", out_signature="u",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def AttachImageWithOptions(self, path, options, sender=None, ok=None, err=None):
        """AttachImage with options (``a{sv}``): ``force`` (b) lets the full resync overwrite
        an existing image that holds data (refused otherwise, as mdadm and pvcreate refuse).
        Unknown options are an error. Returns the new image's index."""
        self._calls.run(sender, lambda: self._daemon.attach(self.name, str(path),
                                                            **attach_options(options)),
                        lambda r: ok(dbus.UInt32(r)), err)

    @dbus.service.method(VOLUME_IFACE, in_signature="u", out_signature="",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def DetachImage(self, image, sender=None, ok=None, err=None):
        """Remove an image from the mirror set (never the last in-sync one)."""
        self._calls.run(sender, lambda: self._daemon.detach(self.name, int(image)),
                        lambda _r: ok(), err)

    @dbus.service.method(VOLUME_IFACE, in_signature="u", out_signature="",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Cancel(self, image, sender=None, ok=None, err=None):
        """Stop the resync or restore on ``image`` (its bitmap is kept; Resync, or Restore of
        the same image, resumes it; a cancelled restore stays unfinished until then)."""
        self._calls.run(sender, lambda: self._daemon.cancel(self.name, int(image)),
                        lambda _r: ok(), err)

    @dbus.service.method(VOLUME_IFACE, in_signature="u", out_signature="s",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def AbandonRestore(self, image, sender=None, ok=None, err=None):
        """End the unfinished restore from split image ``image`` without finishing it, when
        its source cannot be read (``VolumeHost.abandon_restore``): the volume keeps a mix of
        the split image's data and the live data. Returns JSON ``{"regions", "bytes"}`` not
        rolled back; refused while the restore runs (Cancel it first)."""
        self._calls.run(sender, lambda: json.dumps(
            self._daemon.abandon_restore(self.name, int(image))), ok, err)

    @dbus.service.method(VOLUME_IFACE, in_signature="uss", out_signature="t",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Backup(self, image, destination, format, sender=None, ok=None, err=None):
        """Copy split image ``image`` (the point-in-time copy) to the file ``destination``,
        ``raw`` (holes kept) or ``qcow2``; returns the bytes copied. Resync and restore of the
        image are refused while it runs; Progress signals follow."""
        self._calls.run(sender, lambda: self._daemon.backup(self.name, int(image),
                                                            str(destination), str(format)),
                        lambda r: ok(dbus.UInt64(r)), err)


    @dbus.service.method(VOLUME_IFACE, in_signature="a{sv}", out_signature="t",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def Scrub(self, options, sender=None, ok=None, err=None):
        """Start a scrub (``scrub_options``: ``repair`` b, ``source`` u, ``rate`` d MB/s);
        returns the bytes to check. Progress signals follow, ScrubFinished at the end."""
        self._calls.run(sender, lambda: self._daemon.scrub(self.name, **scrub_options(options)),
                        lambda r: ok(dbus.UInt64(r["bytes_total"])), err)

    @dbus.service.method(VOLUME_IFACE, in_signature="", out_signature="",
                         sender_keyword="sender", async_callbacks=("ok", "err"))
    def CancelScrub(self, sender=None, ok=None, err=None):
        """Stop the running scrub (kept as the last result, state cancelled)."""
        self._calls.run(sender, lambda: self._daemon.cancel_scrub(self.name),
                        lambda _r: ok(), err)


ATTACH_OPTIONS = {"force": bool}
RESYNC_OPTIONS = {"full": bool}
RESTORE_OPTIONS = {"full": bool}


def bool_options(method, options, known) -> dict:
    """The ``a{sv}`` options of ``method`` (AttachImageWithOptions, ResyncWithOptions) as
    keyword arguments: every option is a boolean named in ``known``. ValueError (the caller
    gets an org.lvmirror1.Error.Failed) for an unknown option or a value of another type."""
    out = {}
    for key, value in dict(options or {}).items():
        key = str(key)
        if key not in known:
            raise ValueError(f"{method}: unknown option {key!r} (known: "
                             f"{', '.join(sorted(known))})")
        if not isinstance(value, (bool, dbus.Boolean)):
            raise ValueError(f"{method}: option {key!r} must be a boolean (b), got {value!r}")
        out[key] = bool(value)
    return out


def attach_options(options) -> dict:
    """AttachImageWithOptions' options: ``force`` (b) (``bool_options``)."""
    return bool_options("AttachImageWithOptions", options, ATTACH_OPTIONS)


def resync_options(options) -> dict:
    """ResyncWithOptions' options: ``full`` (b): copy every region, also into an image marked
    in sync (``bool_options``)."""
    return bool_options("ResyncWithOptions", options, RESYNC_OPTIONS)


def restore_options(options) -> dict:
    """RestoreWithOptions' options: ``full`` (b): roll back every region, not only those
    changed since the split - the way to restore from a file that is not the recorded split
    copy (``mirror.copyid``) (``bool_options``)."""
    return bool_options("RestoreWithOptions", options, RESTORE_OPTIONS)


_BOOL, _NUMBER, _INT, _STR = "b", "d", "u", "s"


def typed_options(method, options, spec) -> dict:
    """The ``a{sv}`` options of ``method`` as keyword arguments. ``spec``: option name ->
    (kind, keyword): kind "b" a boolean, "d" a number (an integer is taken too), "u" an
    integer, "s" a string; a boolean is never taken for a number. ValueError (the caller gets
    an org.lvmirror1.Error.Failed) for an unknown option or a value of another type; the
    values themselves are checked where they are used."""
    out = {}
    for key, value in dict(options or {}).items():
        key = str(key)
        if key not in spec:
            raise ValueError(f"{method}: unknown option {key!r} (known: "
                             f"{', '.join(sorted(spec))})")
        kind, kwarg = spec[key]
        is_bool = isinstance(value, (bool, dbus.Boolean))
        ok = {_BOOL: is_bool,
              _NUMBER: isinstance(value, (int, float)) and not is_bool,
              _INT: isinstance(value, int) and not is_bool,
              _STR: isinstance(value, str)}[kind]
        if not ok:
            raise ValueError(f"{method}: option {key!r} has the wrong type "
                             f"({type(value).__name__})")
        out[kwarg] = {_BOOL: bool, _NUMBER: float, _INT: int, _STR: str}[kind](value)
    return out


SCRUB_OPTIONS = {"repair": (_BOOL, "repair"), "source": (_INT, "source"),
                 "rate": (_NUMBER, "rate_mbps")}
SPLIT_OPTIONS = {"hooks": (_BOOL, "hooks"), "hook_timeout": (_NUMBER, "hook_timeout"),
                 "on_hook_error": (_STR, "on_hook_error")}


def scrub_options(options) -> dict:
    """Scrub's ``a{sv}`` options as ``VolumeHost.scrub``'s keywords: ``repair`` (b), ``source``
    (u, an image index: the image that is right), ``rate`` (d, MB/s, 0: unlimited); checked
    by ``ScrubControl.start`` (``typed_options``)."""
    return typed_options("Scrub", options, SCRUB_OPTIONS)


def split_options(options) -> dict:
    """SplitWithOptions' / SplitGroupWithOptions' options as plain values: ``hooks`` (b),
    ``hook_timeout`` (d, seconds), ``on_hook_error`` (s); the values are checked by
    ``daemon.hooks.hook_options`` (``typed_options``)."""
    return typed_options("SplitWithOptions", options, SPLIT_OPTIONS)


def add_properties(xml: str, interface: str, props: dict) -> str:
    """Insert <property> elements (read-only, with the changed-signal annotation) into
    ``interface``'s node of an introspection document."""
    head, sep, body = xml.partition("<node")
    root = ET.fromstring(sep + body)
    for iface in root.findall("interface"):
        if iface.get("name") != interface:
            continue
        for name, (sig, emits) in props.items():
            p = ET.SubElement(iface, "property", name=name, type=sig, access="read")
            if not emits:
                ET.SubElement(p, "annotation",
                              name="org.freedesktop.DBus.Property.EmitsChangedSignal",
                              value="false")
    return head + ET.tostring(root, encoding="unicode")


def interfaces(vol: dict, name: str) -> dict:
    """A volume object's interfaces and properties, as ObjectManager sends them."""
    return dbus.Dictionary({VOLUME_IFACE: dbus.Dictionary(properties(vol, name), signature="sv")},
                           signature="sa{sv}")


def managed_objects(status: dict) -> dict:
    """ObjectManager.GetManagedObjects for ``/org/lvmirror1``."""
    return dbus.Dictionary({dbus.ObjectPath(object_path(name)): interfaces(vol, name)
                            for name, vol in status["volumes"].items()}, signature="oa{sa{sv}}")


__all__ = ["ATTACH_OPTIONS", "RESYNC_OPTIONS", "resync_options", "scrub_options", "typed_options", "bool_options", "VOLUME_IFACE", "VOLUME_ROOT", "VolumeObject", "add_properties",
           "attach_options", "interfaces", "managed_objects", "object_path", "properties"]
