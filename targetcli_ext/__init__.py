"""``targetcli-lvmirror``: the stock targetcli shell with lvmirror's commands on user:lvmirror objects.

targetcli has no plugin mechanism, so this entry point patches two places of Debian's targetcli
(``targetcli.ui_backstore``) and then runs the unmodified ``/usr/bin/targetcli`` script:

* storage objects whose config is ``lvmirror/...`` become ``LvmirrorStorageObject`` nodes with
  ``status``, ``images``, ``split``, ``resync``, ``restore``, ``attach``, ``detach``, ``cancel``
  and ``backup`` (help text from the docstrings, tab completion for image indices, a progress
  display for ``resync``/``restore``/``backup`` with ``wait=true``);
* ``/backstores/user:lvmirror create`` adds ``control=nl_reply_supported=-1`` when no control
  string is given, so an ``enable`` can never wait for a netlink reply (see
  lvmirror/tcmu/netlink.py), and ``hw_max_sectors=16384`` when none is given: TCMU's default
  of 128 sectors makes initiators cut every I/O into 64 KiB commands (the maximum transfer
  length lvmirrord advertises is the device's ``hw_max_sectors``, as tcmu-runner does; 16384
  sectors of 512 bytes is the 8 MiB LIO's fileio advertises);
* ``saveconfig`` keeps ``nl_reply_supported`` in the control string it saves for
  user:lvmirror objects (rtslib's dump leaves it out), so ``restoreconfig`` and
  ``targetctl restore`` re-create them exactly.

Every command goes to lvmirrord over the system bus (``org.lvmirror1``); nothing here touches
the data path.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time

TARGETCLI = os.environ.get("LVMIRROR_TARGETCLI", "/usr/bin/targetcli")
DEFAULT_CONTROL = "nl_reply_supported=-1"
DEFAULT_HW_MAX_SECTORS = 16384


def _manager():
    import dbus
    from lvmirror.bus.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
    return dbus.Interface(dbus.SystemBus().get_object(BUS_NAME, MANAGER_PATH), MANAGER_IFACE)


def attach_image(manager, volume: str, path: str, force: bool = False) -> int:
    """Attach ``path`` to ``volume`` through lvmirrord's Manager (a dbus.Interface): the plain
    AttachImage, or AttachImageWithOptions with ``force`` (overwrite a path that holds data).
    Returns the new image's index; D-Bus errors propagate."""
    if force:
        import dbus
        return int(manager.AttachImageWithOptions(
            volume, path, dbus.Dictionary({"force": dbus.Boolean(True)}, signature="sv")))
    return int(manager.AttachImage(volume, path))


def resync_image(manager, volume: str, image: int, rate: float, full: bool = False) -> dict:
    """Start the resync of ``image`` of ``volume`` at ``rate`` MB/s (0: unlimited) through
    lvmirrord's Manager (a dbus.Interface): the plain Resync, or ResyncWithOptions with
    ``full`` (every region, also into an image marked in sync). Returns the job's progress
    (bytes_total, ...); D-Bus errors propagate."""
    if full:
        import dbus
        return json.loads(manager.ResyncWithOptions(
            volume, image, rate, dbus.Dictionary({"full": dbus.Boolean(True)}, signature="sv")))
    return json.loads(manager.Resync(volume, image, rate))


def restore_image(manager, volume: str, image: int, rate: float, full: bool = False) -> dict:
    """Roll ``volume`` back to split image ``image`` at ``rate`` MB/s (0: unlimited) through
    lvmirrord's Manager (a dbus.Interface): the plain Restore, or RestoreWithOptions with
    ``full`` (every region, not only those changed since the split: a split image's file that
    is not the recorded copy). Returns the job's progress (bytes_total, ...); D-Bus errors
    propagate."""
    if full:
        import dbus
        return json.loads(manager.RestoreWithOptions(
            volume, image, rate, dbus.Dictionary({"full": dbus.Boolean(True)}, signature="sv")))
    return json.loads(manager.Restore(volume, image, rate))


def scrub_volume(manager, volume: str, repair: bool = False, source: int | None = None,
                 rate: float = 0.0) -> dict:
    """Start the scrub of ``volume`` through lvmirrord's Manager (a dbus.Interface):
    Scrub(volume, {"repair": b, "rate": d[, "source": u]}), ``rate`` in MB/s (0: unlimited),
    ``source`` an image index (only with ``repair``: ValueError otherwise, before any call).
    Returns the job's progress (bytes_total, ...); D-Bus errors propagate."""
    import dbus
    if source is not None and not repair:
        raise ValueError("source=IMAGE says which image to repair from; give repair=true too")
    opts = {"repair": dbus.Boolean(repair), "rate": dbus.Double(float(rate))}
    if source is not None:
        opts["source"] = dbus.UInt32(source)
    return json.loads(manager.Scrub(volume, dbus.Dictionary(opts, signature="sv")))


def abandon_restore(manager, volume: str, image: int, force: bool = False) -> dict:
    """End ``volume``'s unfinished restore from split image ``image`` without finishing it
    through lvmirrord's Manager (a dbus.Interface): AbandonRestore(volume, image), only with
    ``force`` (ValueError otherwise, before any call: the volume is left a mix of the split
    image's data and the live data). Returns ``{"regions", "bytes"}`` not recorded as rolled
    back; D-Bus errors propagate."""
    if not force:
        raise ValueError("abandoning the restore leaves the volume a mix of the split image "
                         "and the live data; force=true to do so")
    return json.loads(manager.AbandonRestore(volume, image))


def restore_group_members(manager, members: str, rate: float) -> tuple[list, str | None]:
    """Roll the consistency group ``members`` ("VOLUME:IMAGE,...") back at one instant through
    lvmirrord's Manager (a dbus.Interface): RestoreGroup(members, ``rate`` MB/s per volume).
    Returns the lines to show (each member's restore, then the group's instant when every
    restore began) and the error to raise - None, or which members' restores failed once
    begun: then the volumes do not all read as their copies. D-Bus errors propagate (a group
    whose hold ran out, a member refused: nothing claimed)."""
    from lvmirror.cli import job_phrase
    res = json.loads(manager.RestoreGroup(members, float(rate)))
    lines = [f"{m['volume']}: restore {job_phrase(m)}" for m in res["members"]]
    failed = [m for m in res["members"] if m.get("state") == "failed"]
    if failed:
        return lines, (f"the restore of {', '.join(m['volume'] for m in failed)} failed: "
                       f"{failed[0]['error']}")
    return lines + ["the volumes read as their split images from one instant"], None


def manager_call(fn, *args, error=RuntimeError):
    """Call lvmirrord: ``fn`` a Manager method name (called on ``_manager()`` with ``args``)
    or a function taking the manager first (``attach_image``, ``resync_image``...). The
    manager is looked up inside the ``try``, so every D-Bus error - the system bus or
    lvmirrord unreachable too - is raised as ``error`` (targetcli's configshell ExecutionError:
    it ends the command with the message, where any other exception ends the interactive
    shell) with lvmirrord's message."""
    try:
        if isinstance(fn, str):
            return getattr(_manager(), fn)(*args)
        return fn(_manager(), *args)
    except Exception as e:        # dbus.DBusException: show lvmirrord's message
        msg = getattr(e, "get_dbus_message", lambda: str(e))() or str(e)
        raise error(msg) from None


def flag(name: str, value) -> bool:
    """A true/false parameter of a targetcli-lvmirror command (``full=true``): true, yes, 1,
    false, no, 0 (any case). ValueError naming the parameter for anything else: a misspelt
    ``full=ture`` must not silently mean false."""
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def saved_control(control: str, nl_reply_supported: str | None) -> str:
    """rtslib's control string for a user backstore plus ``nl_reply_supported`` when it is not
    the kernel's default (0)."""
    val = (nl_reply_supported or "").strip()
    if not val or val in ("0", "NULL") or "nl_reply_supported=" in control:
        return control
    return f"{control},nl_reply_supported={val}" if control else f"nl_reply_supported={val}"


def keep_control_in_saveconfig():
    """rtslib's UserBackedStorageObject.dump (what saveconfig writes) rebuilds ``control`` from
    max_data_area_mb, hw_block_size and data_pages_per_blk only; add nl_reply_supported
    (configfs ``attrib/nl_reply_supported``) for user:lvmirror objects."""
    from rtslib_fb.tcm import UserBackedStorageObject
    prop = UserBackedStorageObject.control_tuples
    if getattr(prop.fget, "_lvmirror", False):
        return

    def control_tuples(self):
        control = prop.fget(self)
        try:
            if not (self.config or "").startswith("lvmirror/"):
                return control
            return saved_control(control, self.get_attribute("nl_reply_supported"))
        except Exception:             # an older kernel without the attribute
            return control

    control_tuples._lvmirror = True
    UserBackedStorageObject.control_tuples = property(control_tuples, doc=prop.__doc__)


def install():
    """Patch targetcli's backstore UI (call before targetcli builds its tree)."""
    from configshell_fb import ExecutionError
    from targetcli import ui_backstore

    from lvmirror import cfgstring
    from lvmirror.backup import held_backup
    from lvmirror.cli import (format_status, job_phrase, members_arg, mismatch_lines,
                              parse_member, scrub_line, size_phrase)

    original = ui_backstore.UIUserBackedStorageObject
    if getattr(original, "_lvmirror_factory", False):
        return
    keep_control_in_saveconfig()

    def call(fn, *args):
        return manager_call(fn, *args, error=ExecutionError)

    class LvmirrorStorageObject(original):
        """A user:lvmirror backstore: a mirrored volume, or an exported split image."""

        def _spec(self):
            return cfgstring.parse(self.rtsnode.config)

        def _volume_status(self):
            spec = self._spec()
            st = json.loads(call("Status"))
            vol = st["volumes"].get(spec.name)
            if vol is None:
                raise ExecutionError(f"volume {spec.name} is not open in lvmirrord "
                                     f"(is the backstore enabled and lvmirrord running?)")
            return spec, st, vol

        def _flag(self, name, value):
            try:
                return flag(name, value)
            except ValueError as e:
                raise ExecutionError(str(e)) from None

        def _image(self, image):
            try:
                return int(image)
            except (TypeError, ValueError):
                raise ExecutionError(f"image must be an image index, got {image!r}") from None

        def _wait(self, kind):
            spec = self._spec()
            while True:
                _, _, vol = self._volume_status()
                running = [j for j in vol["jobs"] if j["state"] == "running"]
                if not running:
                    failed = [j for j in vol["jobs"] if j["state"] == "failed"]
                    if failed:
                        raise ExecutionError(f"{kind} failed: {failed[-1]['error']}")
                    self.shell.con.display(f"{kind} of {spec.name} finished")
                    return
                j = running[0]
                pct = j["bytes_done"] / j["bytes_total"] if j["bytes_total"] else 1.0
                sys.stdout.write(f"\r{kind}: {pct:6.1%}  {j['rate']:.1f} MB/s   ")
                sys.stdout.flush()
                time.sleep(1)

        def summary(self):
            text, ok = super().summary()
            try:
                _, _, vol = self._volume_status()
                states = "/".join(im["state"] for im in vol["images"])
                return f"{text} [{states}]", ok
            except Exception:
                return text, ok

        def ui_command_status(self):
            """Show the volume behind this backstore: images and their states, split time,
            changed bytes, running resync/restore with progress, I/O counters."""
            spec, st, vol = self._volume_status()
            self.shell.con.display(format_status({"volumes": {spec.name: vol}, "luns": []}))

        def ui_command_metrics(self):
            """Show this volume's metrics as lvmirrord writes them for Prometheus' node
            exporter (health, image states, split age, job and scrub progress, I/O counters,
            this LUN's command latency histogram)."""
            from lvmirror.daemon.metrics import render
            spec, st, vol = self._volume_status()
            luns = [lun for lun in st["luns"] if lun.get("volume") == spec.name
                    or lun.get("name") == self.rtsnode.name]
            for line in render({"volumes": {spec.name: vol}, "luns": luns,
                                "version": st.get("version", "")}).splitlines():
                self.shell.con.display(line)

        def ui_command_images(self):
            """List the images of the volume, one line each: index, state, path."""
            _, _, vol = self._volume_status()
            for im in vol["images"]:
                self.shell.con.display(f"{im['index']}  {im['state']:<8} {im['path']}")

        def ui_command_split(self, image):
            """Split image IMAGE off now as a point-in-time copy; returns when the I/O begun
            before the split has drained. New I/O is never paused."""
            res = json.loads(call("Split", self._spec().name,
                                  self._image(image)))
            self.shell.con.display(
                f"image {res['index']} ({res['path']}) split at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(res['split_time']))}; "
                f"{res['drained']} I/Os drained")

        def _group(self, image, others):
            members = [(self._spec().name, self._image(image))]
            try:
                members += [parse_member(m) for m in (others or "").replace(" ", ",").split(",")
                            if m]
            except ValueError as e:
                raise ExecutionError(f"others: {e}") from None
            if len(members) < 2:
                raise ExecutionError("others=VOLUME:IMAGE[,VOLUME:IMAGE...] names the other "
                                     "volumes of the group")
            return members_arg(members)

        def ui_command_split_group(self, image, others=None):
            """Split image IMAGE of this volume and one image of each volume in OTHERS
            (VOLUME:IMAGE,VOLUME:IMAGE...) at one instant: a consistency group, for an
            application that spreads its data over several LUNs (a database's data and its
            write-ahead log). Every write acknowledged before that instant on any of them is
            in the copies, none begun after it is. New I/O is never paused; acknowledgements
            are held for the instant (the time is shown)."""
            res = json.loads(call("SplitGroup", self._group(image, others)))
            for m in res["members"]:
                self.shell.con.display(f"{m['volume']}: image {m['index']} ({m['path']}) split")
            self.shell.con.display(
                f"group split at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(res['split_time']))}; "
                f"completions held {res['hold_seconds'] * 1e6:.0f} us")

        def ui_command_restore_group(self, image, others=None, rate=None):
            """Roll this volume back to split image IMAGE and each volume in OTHERS
            (VOLUME:IMAGE,...) to its split image, all at one instant (rate in MB/s per
            volume)."""
            lines, error = call(restore_group_members, self._group(image, others),
                                float(rate or 0))
            for line in lines:
                self.shell.con.display(line)
            if error is not None:
                raise ExecutionError(error)

        def ui_command_resync(self, image, rate=None, wait="false", full="false"):
            """Bring image IMAGE back in sync, copying only the regions changed since the split.
            RATE limits the copy in MB/s; wait=true shows progress until it is done; full=true
            copies every region, also into an image marked in sync (a disk suspected of
            dropped writes), which serves no reads until the copy ends."""
            res = call(resync_image, self._spec().name, self._image(image),
                       float(rate or 0), self._flag("full", full))
            if res.get("state") == "failed":
                raise ExecutionError(f"resync of image {image} failed: {res['error']}")
            self.shell.con.display(f"resync of image {image} {job_phrase(res)}")
            if self._flag("wait", wait):
                self._wait("resync")

        def ui_command_restore(self, image, rate=None, wait="false", full="false"):
            """Roll the volume back to split image IMAGE (only changed regions are copied; the
            volume reads as the copy from the moment the command returns). full=true rolls
            back every region (a split image's file that is not the split copy)."""
            res = call(restore_image, self._spec().name, self._image(image),
                       float(rate or 0), self._flag("full", full))
            if res.get("state") == "failed":
                raise ExecutionError(f"restore from image {image} failed: {res['error']}")
            self.shell.con.display(f"restore from image {image} {job_phrase(res)}")
            if self._flag("wait", wait):
                self._wait("restore")

        def ui_command_attach(self, path, force="false"):
            """Add a new image at PATH (file or block device) and start its full resync. The
            resync overwrites PATH, so an existing PATH that holds data is refused (the error
            says what was found) unless force=true."""
            idx = call(attach_image, self._spec().name, str(path),
                       self._flag("force", force))
            self.shell.con.display(f"{path} attached as image {int(idx)}; full resync started")

        def ui_command_scrub(self, repair="false", source=None, rate=None, wait="false",
                             cancel="false"):
            """Compare the volume's in-sync images region by region while it serves I/O and
            report the regions they disagree on. repair=true rewrites the odd image(s) of a
            region from the majority (three or more images); with two images (or no majority)
            name the image that is right with source=IMAGE. RATE limits the check in MB/s;
            wait=true shows progress and the mismatches; cancel=true stops a running scrub."""
            name = self._spec().name
            if self._flag("cancel", cancel):
                call("CancelScrub", name)
                self.shell.con.display(f"scrub of {name} cancelled")
                return
            repair = self._flag("repair", repair)
            try:
                rate = float(rate or 0)
            except ValueError:
                raise ExecutionError(f"rate is a number of MB/s, got {rate!r}") from None
            try:
                res = call(scrub_volume, name, repair,
                           None if source is None else self._image(source), rate)
            except ValueError as e:
                raise ExecutionError(str(e)) from None
            self.shell.con.display(f"scrub of {name} started: {size_phrase(res['bytes_total'])} "
                                   f"to check" + (" (repair)" if repair else ""))
            if not self._flag("wait", wait):
                return
            while True:
                _, _, vol = self._volume_status()
                sc = vol.get("scrub")
                if sc is None or sc["state"] != "running":
                    break
                sys.stdout.write(f"\rscrub: {sc['regions_checked'] / sc['regions']:6.1%}   ")
                sys.stdout.flush()
                time.sleep(1)
            if sc is None:
                raise ExecutionError(f"volume {name} closed before its scrub ended")
            self.shell.con.display("\n" + scrub_line(sc))
            for line in mismatch_lines(sc):
                self.shell.con.display("  " + line)
            if sc["state"] != "done" or sc["unrepaired"]:
                raise ExecutionError(f"scrub of {name} {sc['state']}: {sc['unrepaired']} "
                                     f"region(s) left different")

        def ui_complete_scrub(self, parameters, text, current_param):
            if current_param in ("repair", "wait", "cancel"):
                return [f"{v} " for v in ("true", "false") if v.startswith(text)]
            if current_param == "source":
                return self._complete_image(parameters, text, "image")
            return []

        def ui_command_detach(self, image):
            """Remove image IMAGE from the volume (its file is kept)."""
            call("DetachImage", self._spec().name, self._image(image))
            self.shell.con.display(f"image {image} detached")

        def ui_command_cancel(self, image):
            """Stop the resync or restore running on image IMAGE; its bitmap is kept and
            resync (or restore) of IMAGE resumes it. A cancelled restore stays unfinished:
            the volume still reads as the split image, and resync, split, attach, detach and
            scrub are refused until it is resumed and done (or given up: abandon_restore)."""
            call("Cancel", self._spec().name, self._image(image))

        def ui_command_abandon_restore(self, image, force="false"):
            """End the unfinished restore from split image IMAGE without finishing it, when
            IMAGE can no longer be read (until then every I/O to a region not rolled back
            fails with MEDIUM ERROR). The volume keeps IMAGE's data where it was rolled back
            and the live data elsewhere: a mix of two instants, to be checked before use.
            Needs force=true; refused while the restore runs (cancel it first)."""
            idx = self._image(image)
            # (abandon_restore's refusal without force comes back as the ExecutionError)
            res = call(abandon_restore, self._spec().name, idx, self._flag("force", force))
            self.shell.con.display(f"restore from image {idx} abandoned: {res['regions']} "
                                   f"region(s), {res['bytes']} bytes, not recorded as rolled "
                                   f"back; check the data before use")

        def ui_command_backup(self, image, file, format="raw"):
            """Copy split image IMAGE to FILE (format raw or qcow2) with progress. The image
            must be split (a frozen point-in-time copy)."""
            idx = self._image(image)
            # lvmirrord checks the image (split, still the copy: lvmirror's mirror/copyid) and
            # holds it against resync, restore and detach while this copies it
            # (its errors, the copy's too, come back as ExecutionError: manager_call)
            call(lambda mgr: held_backup(mgr, self._spec().name, idx, file, fmt=format,
                                         progress=self._progress))
            self.shell.con.display(f"\nimage {idx} copied to {file} ({format})")

        def _progress(self, done, total):
            sys.stdout.write(f"\rbackup: {done / total:6.1%} of {total >> 20} MiB   ")
            sys.stdout.flush()

        def _complete_image(self, parameters, text, current_param):
            if current_param != "image":
                return []
            try:
                _, _, vol = self._volume_status()
            except Exception:
                return []
            return [f"{im['index']} " for im in vol["images"] if str(im["index"]).startswith(text)]

        ui_complete_split = ui_complete_resync = ui_complete_restore = _complete_image
        ui_complete_split_group = ui_complete_restore_group = _complete_image
        ui_complete_detach = ui_complete_cancel = _complete_image

        def ui_complete_attach(self, parameters, text, current_param):
            if current_param == "force":
                return [f"{v} " for v in ("true", "false") if v.startswith(text)]
            return []

        def ui_complete_backup(self, parameters, text, current_param):
            if current_param == "format":
                return [f for f in ("raw ", "qcow2 ") if f.startswith(text)]
            return self._complete_image(parameters, text, current_param)

    def factory(storage_object, parent):
        config = storage_object.config or ""
        cls = LvmirrorStorageObject if config.startswith(cfgstring.SUBTYPE + "/") else original
        return cls(storage_object, parent)

    factory._lvmirror_factory = True
    ui_backstore.UIUserBackedStorageObject = factory

    create = ui_backstore.UIUserBackedBackstore.ui_command_create

    def ui_command_create(self, name, size, cfgstring, wwn=None, hw_max_sectors=None,
                          control=None):
        if self.handler == "lvmirror":
            control = control or DEFAULT_CONTROL
            hw_max_sectors = hw_max_sectors or DEFAULT_HW_MAX_SECTORS
        return create(self, name, size, cfgstring, wwn=wwn, hw_max_sectors=hw_max_sectors,
                      control=control)

    ui_command_create.__doc__ = create.__doc__
    ui_backstore.UIUserBackedBackstore.ui_command_create = ui_command_create


def main():
    install()
    sys.argv[0] = "targetcli-lvmirror"
    runpy.run_path(TARGETCLI, run_name="__main__")


if __name__ == "__main__":
    main()
