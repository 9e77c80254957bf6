"""The daemon object: the netlink listener, the D-Bus service, and the routing of LUNs and
management calls to the host of each volume (its own process by default, see
``volumeproc``)."""

from __future__ import annotations

import errno
import logging
import os
import threading

from lvmirror import __version__, cfgstring, rawtext, sdnotify
from lvmirror.errors import ConfigError, LvmirrorError, StateError
from lvmirror.tcmu import uio
from lvmirror.daemon.host import BackupProgress, VolumeHost
from lvmirror.daemon.lunserver import SUBTYPE, gateway_state_dirs
from lvmirror.daemon import hooks, metrics, splitgroup

log = logging.getLogger("lvmirrord")

__all__ = ["BackupProgress", "DEFAULT_STATE_DIR", "Lvmirrord"]

DEFAULT_STATE_DIR = "/var/lib/lvmirror"


class Lvmirrord:
    """The daemon: the netlink listener, the D-Bus service, and the hosts of the volumes.

    With ``processes`` (the lvmirrord command's default) every volume is served by a process of
    its own (``volumeproc.VolumeProcess``): N busy volumes use N cores, a crashed volume process
    is restarted without touching the others. Without it (``lvmirrord --no-processes``, this
    class's default, which most unit tests use) one in-process ``VolumeHost`` serves every
    volume. The management API is the same
    either way: each call goes to the host of its volume."""

    def __init__(self, *, state_dir=DEFAULT_STATE_DIR, workers=4, sysfs_root="/sys",
                 configfs_root="/sys/kernel/config", with_bus=True, processes=False,
                 inline_reads=True, log_level="info", hooks_dir=hooks.DEFAULT_HOOKS_DIR,
                 metrics_file=None, metrics_interval=5.0, leases=None):
        """``state_dir``: volume metadata; ``workers``: threads per LUN; ``processes``: a
        process per volume; ``inline_reads``: cached READs answered by the ring thread;
        ``log_level``: the volume processes' logging level; ``hooks_dir``: the split hooks
        (``hooks.SplitHooks``); ``metrics_file``: where the Prometheus metrics are written
        every ``metrics_interval`` seconds (``metrics.MetricsWriter``; None: not written);
        ``leases``: a ``lease.LeaseConfig`` (every volume opened under its sanlock lease, held
        by the process that serves it; the lockspace is joined at start) or None.
        ValueError: a ``metrics_interval`` that is not > 0."""
        self.leases = leases
        self.hooks = hooks.SplitHooks(hooks_dir)
        self.state_dir = state_dir
        self.workers = workers
        self.sysfs_root = sysfs_root
        self.configfs_root = configfs_root
        self.with_bus = with_bus
        self.processes = processes
        self.inline_reads = inline_reads
        self.log_level = log_level
        self._local = None if processes else VolumeHost(state_dir, workers=workers,
                                                        inline_reads=inline_reads,
                                                        leases=leases)
        self._hosts: dict = {}          # volume name -> VolumeProcess (processes only)
        self._lun_hosts: dict = {}      # uio name -> host serving it
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._adding: dict = {}         # uio name -> host, while add_lun serves it
        self._lock_ids: dict = {}       # lock id -> (host, the host's own lock id, owner)
        self._lock_seq = 0
        self._stop = threading.Event()
        self._netlink = None
        self._bus = None
        self._zygote = None             # forks the volume processes (start())
        self._metrics = (metrics.MetricsWriter(self.status, metrics_file, metrics_interval)
                         if metrics_file else None)

    @property
    def registry(self):
        """The in-process host's VolumeRegistry (single-process mode only: with a process
        per volume the volumes are open in those processes; AttributeError then)."""
        if self._local is None:
            raise AttributeError("volumes are open in their own processes (processes=True)")
        return self._local.registry

    @property
    def luns(self) -> dict:
        """The in-process host's LunServers by uio name (single-process mode; {} otherwise)."""
        return self._local.luns if self._local is not None else {}

    # -- LUN bookkeeping -----------------------------------------------------------------------
    def _hosts_now(self) -> list:
        with self._lock:
            return [self._local] if self._local is not None else list(self._hosts.values())

    def _host_key(self, device) -> str:
        """The process a device goes to: its volume's (an exported split image goes with its
        volume); a cfgstring that does not parse gets a process of its own, whose LUN answers
        NOT READY with the parser's message."""
        try:
            return cfgstring.parse(device.cfgstring).name
        except Exception:
            return f"{device.uio_name} (unusable cfgstring)"

    def add_lun(self, device, *, pickup=False, handle=None) -> dict:
        """Serve ``device`` (a ``uio.UioDevice`` of a user:lvmirror backstore) on its volume's
        host (``VolumeHost.add_lun``; ``handle``: an open ring, e.g. the emulator's). Returns
        ``{"name", "uio", "error"}`` (``error``: why the LUN answers NOT READY, or None; a
        device added while its volume's process restarts is served once it has, error None).
        OSError when the device cannot be opened or its volume's process cannot be started."""
        uio_name = device.uio_name
        with self._lock:
            while uio_name in self._adding:
                self._cond.wait()
            host = self._local
            if host is None:
                key = self._host_key(device)
                host = self._hosts.get(key)
                if host is None:
                    from lvmirror.daemon.volumeproc import VolumeProcess
                    host = VolumeProcess(key, state_dir=self.state_dir, workers=self.workers,
                                         inline_reads=self.inline_reads,
                                         log_level=self.log_level, zygote=self._zygote,
                                         leases=self.leases)
                    host.start()
                    self._hosts[key] = host
            self._adding[uio_name] = host
        # served without the lock: the volume's lease may take up to sanlock's
        # host_dead_seconds, and status and the other volumes' calls must not wait with it
        try:
            info = host.add_lun(device, pickup=pickup, handle=handle)
        except BaseException:
            with self._lock:
                del self._adding[uio_name]
                self._cond.notify_all()
                self._drop_if_idle(host)
            raise
        with self._lock:
            del self._adding[uio_name]
            self._cond.notify_all()
            self._lun_hosts[uio_name] = host
        return info

    def _pick_up(self):
        """Serve every user:lvmirror device the kernel has that is not served yet (``pickup``:
        block, reset the ring, open, unblock); stop serving the ones that are gone."""
        found = uio.find_devices(SUBTYPE, sysfs_root=self.sysfs_root,
                                 configfs_root=self.configfs_root)
        for device in found:          # add_lun without the lock (a lease may wait)
            with self._lock:
                if device.uio_name in self._lun_hosts or device.uio_name in self._adding:
                    continue
            try:
                self.add_lun(device, pickup=True)
                log.info("picked up existing LUN %s (%s)", device.dev_name, device.uio_name)
            except (OSError, LvmirrorError) as exc:
                log.error("cannot pick up %s (%s): %s", device.dev_name, device.uio_name, exc)
        with self._lock:
            names = {device.uio_name for device in found}
            for uio_name in [n for n in self._lun_hosts if n not in names]:
                log.info("LUN on %s is gone", uio_name)
                try:
                    self.remove_lun(uio_name)
                except (OSError, LvmirrorError) as exc:
                    log.error("stopping the LUN on %s: %s", uio_name, exc)

    def _drop_if_idle(self, host):
        """Stop a volume process that serves no LUN any more, whatever its state (call with
        ``_lock`` held)."""
        if host is self._local or host.serves() or host in self._adding.values():
            return
        self._hosts.pop(host.key, None)
        for gid in [g for g, (h, _, _) in self._lock_ids.items() if h is host]:
            del self._lock_ids[gid]     # its locks end with its process
        host.stop()

    def remove_lun(self, uio_name):
        """Stop serving the device ``uio_name`` (e.g. "uio0"): drain and complete its
        in-flight commands, release its volume (and end the volume's process when it was its
        last LUN, also when that process is being restarted: the restart then starts none).
        Unknown names are ignored. The device is forgotten even when the volume's process
        raises (the error is raised after)."""
        with self._lock:
            while uio_name in self._adding:      # being added: remove what that adds
                self._cond.wait()
            host = self._lun_hosts.pop(uio_name, None)
            if host is None:
                return
            try:
                host.remove_lun(uio_name)
            finally:
                self._drop_if_idle(host)    # its process ends even if it did not answer

    def serves(self, uio_name) -> bool:
        """Whether the device ``uio_name`` is served."""
        with self._lock:
            return uio_name in self._lun_hosts

    def check_config(self, config: str):
        """CheckConfig for targetcli: (ok, message). Never raises: a cfgstring the checks did
        not foresee is refused with the error, logged as a bug."""
        try:
            cfgstring.check(config, state_dir=self.state_dir,
                            other_state_dirs=gateway_state_dirs(self.sysfs_root,
                                                                self.configfs_root))
        except ConfigError as exc:
            return False, str(exc)
        except Exception as exc:  # a parser bug must not reach targetcli as a D-Bus error
            log.exception("CheckConfig %r", config)
            return False, f"cfgstring {config!r} cannot be checked: {type(exc).__name__}: {exc}"
        return True, "success"

    # -- management (called from the D-Bus service's worker threads) ---------------------------
    def volume_names(self) -> list[str]:
        """The names of the open volumes, sorted."""
        names = set()
        for host in self._hosts_now():
            try:
                names.update(host.volume_names())
            except LvmirrorError:
                pass            # a volume process being restarted
        return sorted(names)

    def _host(self, name):
        """The host of open volume ``name``; ConfigError when no LUN has it open."""
        if self._local is not None:
            if name in self._local.volume_names():
                return self._local
        else:
            with self._lock:
                host = self._hosts.get(name)
            if host is not None:
                return host
        raise ConfigError(f"no volume {name!r} is open (served by no LUN); open volumes: "
                          f"{', '.join(self.volume_names()) or 'none'}")

    def status(self) -> dict:
        """Everything ``lvmirror status`` shows, as a JSON-able dict: ``version``,
        ``state_dir``, ``volumes`` (per open volume its size in bytes, block and region size,
        images with index, path, state, split time, changed bytes and error, jobs, exported
        split images, health and I/O counters: ``VolumeHost.status``) and ``luns`` (uio
        device, cfgstring, error, commands served). A volume whose process is being restarted
        is left out until it answers again."""
        volumes, luns = {}, []
        for host in self._hosts_now():
            try:
                part = host.status()
            except LvmirrorError as exc:
                log.warning("status: %s", exc)
                continue
            volumes.update(part["volumes"])
            luns.extend(part["luns"])
        luns.sort(key=lambda lun: lun["name"])
        return {"version": __version__, "state_dir": self.state_dir, "volumes": volumes,
                "luns": luns}

    def split(self, name, image, options=None):
        """Split image ``image`` (an index) off volume ``name`` now: ``VolumeHost.split``
        (I/O begun before the split time T completes to every image, later I/O goes to the
        others and is not paused), between the split hooks (``hooks``; ``options``: hooks,
        hook_timeout, on_hook_error, see ``hooks.hook_options``). Returns index, path,
        split_time (seconds since the epoch), generation, drained (I/Os waited for) and hooks
        (what each hook did). ConfigError: no such volume or a bad option; HookError: a
        pre-split hook failed (nothing split)."""
        opts = hooks.hook_options(options)
        host = self._host(name)
        return self._with_hooks([(name, image)], lambda: host.split(name, image), opts)

    def split_group(self, members, options=None) -> dict:
        """Split one image of each volume in ``members`` ((volume, image) pairs or
        "VOLUME:IMAGE" strings) at one instant: ``splitgroup.split_group`` (completions held
        across the group while the epochs switch), between the split hooks, run once for the
        group (``options`` as ``split``). Returns the members' split results, the first T,
        the span of the switches, how long completions were held (seconds) and hooks."""
        opts = hooks.hook_options(options)
        members = splitgroup.parse_members(members)
        for name, _ in members:
            self._host(name)            # every volume open, before any hook runs
        return self._with_hooks(members, lambda: splitgroup.split_group(self._host, members),
                                opts)

    def _with_hooks(self, members, split, opts):
        if not opts["hooks"]:
            res = split()
            res["hooks"] = []
            return res
        res, records = self.hooks.around(members, split, timeout=opts["hook_timeout"],
                                         on_error=opts["on_hook_error"])
        res["hooks"] = records
        return res

    def restore_group(self, members, rate_mbps=0.0) -> dict:
        """Roll every member volume back to its split image at one instant
        (``splitgroup.restore_group``); ``rate_mbps`` MB/s per volume, 0: unlimited."""
        return splitgroup.restore_group(self._host, members, rate_mbps)

    def _refuse_image_dest(self, dest) -> None:
        """Refuse backup destination ``dest`` (absolute) where a copy must not go:
        ConfigError when it is an image of a volume - the same file, another name of it, or
        the same block device under another name (``imagecheck.same_storage``): the copy
        would overwrite it (trial 38, HIGH: ``lvmirror backup vol0 1 <image 0's path>`` wrote
        the split copy over the live image) - or lies in a state directory (the volumes'
        metadata, write-intent logs and bitmaps: a copy there replaced a volume.json, trial of
        2026-12-06); StateError when another backup, of any volume, writes it now (the
        later rename would replace the other's copy, both reported done). The images are
        those of every volume whose metadata is in lvmirrord's state directory or one a LUN's
        cfgstring names (``state_dir=``; ``imagecheck.images_in_use``: open or not, and a
        volume whose process is restarting) and of every open volume (``status``); paths
        are compared by their real directory (a symlinked directory is the same)."""
        from lvmirror.backup import dest_key
        from lvmirror.mirror.imagecheck import identity, images_in_use, same_storage
        st = self.status()
        key = dest_key(dest)
        for vname, vol in st["volumes"].items():
            index = {im["id"]: im["index"] for im in vol.get("images", [])}
            for job in vol.get("jobs", []):
                if job.get("kind") == "backup" and job.get("state") == "running" \
                        and job.get("dest") and dest_key(job["dest"]) == key:
                    raise StateError(f"{dest} is the destination of the running backup of "
                                     f"image {index.get(job['image_id'], '?')} of volume "
                                     f"{vname} (to {job['dest']}); choose another name or "
                                     f"wait for it")
        dirs = {self.state_dir} | gateway_state_dirs(self.sysfs_root, self.configfs_root)
        for d in sorted(dirs):
            real = os.path.realpath(d)
            if key == real or key.startswith(real.rstrip("/") + "/"):
                raise ConfigError(f"backup destination {dest} is in lvmirror's state "
                                  f"directory {d} (volume metadata, write-intent logs): "
                                  f"choose a path outside it")
        used = [(f"image {im['index']} of volume {vname}", im["path"])
                for vname, vol in st["volumes"].items() for im in vol.get("images", [])
                if im.get("path")]
        for d in sorted(dirs):
            used += [(f"an image of volume {vname}", path) for vname, path in images_in_use(d)]
        did = identity(dest)
        for what, path in used:
            if same_storage(dest, path, did, None):
                raise ConfigError(f"backup destination {dest} is {what} ({path}): the copy "
                                  f"would overwrite it")

    def backup(self, name, image, dest, fmt="raw") -> int:
        """Copy split image ``image`` of volume ``name`` to ``dest`` (an absolute path; ``fmt``
        "raw" sparse or "qcow2"); returns the bytes copied. ``VolumeHost.backup``."""
        if not os.path.isabs(dest):
            raise ConfigError(f"backup destination {dest!r} must be an absolute path")
        self._refuse_image_dest(dest)
        return self._host(name).backup(name, image, dest, fmt)

    def begin_backup(self, name, image, dest, owner) -> dict:
        """Hold split image ``image`` of volume ``name`` for a backup to ``dest`` that
        ``owner`` copies itself; returns ``{"path", "size", "state"}``.
        ``VolumeHost.begin_backup``. ConfigError for a relative ``dest`` (the caller's
        working directory is not lvmirrord's)."""
        if not os.path.isabs(dest):
            raise ConfigError(f"backup destination {dest!r} must be an absolute path")
        self._refuse_image_dest(dest)
        return self._host(name).begin_backup(name, image, dest, owner)

    def end_backup(self, name, image, owner, *, state="done", nbytes=0, error=None) -> None:
        """End ``owner``'s backup of image ``image`` (``VolumeHost.end_backup``)."""
        return self._host(name).end_backup(name, image, owner, state=state, nbytes=nbytes,
                                           error=error)

    def resync(self, name, image, rate_mbps=0.0, *, full=False):
        """Start (or resume) the resync of image ``image`` at ``rate_mbps`` MB/s (0:
        unlimited); ``full``: every region. Returns the job's progress dict.
        ``VolumeHost.resync``."""
        return self._host(name).resync(name, image, rate_mbps, full=full)

    def restore(self, name, image, rate_mbps=0.0, *, full=False):
        """Roll volume ``name`` back to its split image ``image`` at ``rate_mbps`` MB/s (0:
        unlimited); ``full``: every region. Returns the job's progress dict.
        ``VolumeHost.restore``."""
        return self._host(name).restore(name, image, rate_mbps, full=full)

    def abandon_restore(self, name, image) -> dict:
        """End volume ``name``'s unfinished restore from image ``image`` without finishing it
        (``VolumeHost.abandon_restore``); returns ``{"regions", "bytes"}`` not rolled back."""
        return self._host(name).abandon_restore(name, image)

    def backup_check(self, name, image) -> None:
        """Raise what a backup of image ``image`` of volume ``name`` would be refused with
        (``VolumeHost.backup_check``)."""
        return self._host(name).backup_check(name, image)

    def restore_check(self, name, image, *, fresh=False, flush=False):
        """Raise what ``restore(name, image)`` would refuse with now, starting nothing; returns
        the split image's T, seconds since the epoch (``VolumeHost.restore_check``)."""
        return self._host(name).restore_check(name, image, fresh=fresh, flush=flush)

    def scrub(self, name, *, repair=False, source=None, rate_mbps=0.0):
        """Start a scrub of volume ``name`` (``VolumeHost.scrub``); returns its progress."""
        return self._host(name).scrub(name, repair=repair, source=source, rate_mbps=rate_mbps)

    def cancel_scrub(self, name):
        """Stop the scrub of volume ``name`` (``VolumeHost.cancel_scrub``)."""
        return self._host(name).cancel_scrub(name)

    def attach(self, name, path, *, force=False):
        """Attach ``path`` to volume ``name`` (full resync); returns its index.
        ``VolumeHost.attach``."""
        return self._host(name).attach(name, path, force=force)

    def detach(self, name, image):
        """Remove image ``image`` from volume ``name`` (its file is kept).
        ``VolumeHost.detach``."""
        return self._host(name).detach(name, image)

    def cancel(self, name, image):
        """Stop the resync or restore on image ``image`` and wait for it.
        ``VolumeHost.cancel``."""
        return self._host(name).cancel(name, image)

    def lock_region(self, name, lba, count, *, shared=False, timeout=None, owner):
        """Take a range lock (``count`` blocks at ``lba``) on volume ``name`` for ``owner``
        (e.g. ("bus", ":1.42")); waits FIFO behind conflicting I/O and holders, at most
        ``timeout`` seconds (TimeoutError after). Returns a lock id (an int, lvmirrord's own:
        it stands for the host's id, with a process per volume (incarnation, the child's id))
        for unlock_region. ``VolumeHost.lock_region``."""
        host = self._host(name)
        local_id = host.lock_region(name, lba, count, shared=shared, timeout=timeout,
                                    owner=owner)
        with self._lock:
            self._lock_seq += 1
            self._lock_ids[self._lock_seq] = (host, local_id, owner)
            return self._lock_seq

    def unlock_region(self, lock_id, *, owner):
        """Release lock ``lock_id`` (from lock_region). ConfigError unless ``owner`` holds it,
        or when the volume's process that granted it has restarted since (the lock ended with
        that process; the id is forgotten)."""
        with self._lock:
            entry = self._lock_ids.get(lock_id)
            if entry is None or entry[2] != owner:
                raise ConfigError(f"no lock {lock_id} held by {owner}")
            del self._lock_ids[lock_id]
        entry[0].unlock_region(entry[1], owner=owner)

    def list_locks(self, name):
        """Volume ``name``'s region locks: holders and waiters (LBA, count, shared, owner,
        seconds) and the ids of the external locks taken through lock_region."""
        host = self._host(name)
        info = host.list_locks(name)
        with self._lock:
            mine = {(h, lid): gid for gid, (h, lid, _) in self._lock_ids.items()}
        info["external_lock_ids"] = sorted(mine[(host, lid)] for lid in
                                           info["external_lock_ids"] if (host, lid) in mine)
        return info

    def release_owner(self, owner) -> int:
        """``owner`` went away (left the bus): drop its locks and waiting requests on every
        volume; returns how many."""
        with self._lock:
            for gid in [g for g, (_, _, o) in self._lock_ids.items() if o == owner]:
                del self._lock_ids[gid]
        n = 0
        for host in self._hosts_now():
            try:
                n += host.release_owner(owner)
            except LvmirrorError as exc:
                log.warning("releasing the locks of %s: %s", owner, exc)
        return n

    # -- netlink events ------------------------------------------------------------------------
    def _on_event(self, event):
        from lvmirror.tcmu import netlink
        if event.subtype is not None and event.subtype != SUBTYPE:
            return                      # another handler's device: tcmu-runner answers for it
        uio_name = f"uio{event.minor}"
        status = 0
        if isinstance(event, netlink.DeviceRemoved):
            # The uio device may already be gone from sysfs: find the LUN by its minor.
            if event.subtype == SUBTYPE or self.serves(uio_name):
                try:    # waits for an add_lun in progress (pick-up); a name not served: no-op
                    self.remove_lun(uio_name)
                except Exception as exc:
                    status = self._event_error(uio_name, exc)
                self._netlink.reply(event, status)
            return
        try:
            device = uio.device_by_minor(event.minor, sysfs_root=self.sysfs_root,
                                         configfs_root=self.configfs_root)
        except Exception as exc:        # unreadable sysfs (or a bug): ours still gets an answer
            status = self._event_error(uio_name, exc)
            if event.subtype == SUBTYPE:    # ours: the kernel may be waiting for the answer
                self._netlink.reply(event, status)
            return
        if device is None:
            if event.subtype == SUBTYPE:    # ours, gone from sysfs before we looked
                log.error("%s: the device of %s is not in sysfs", uio_name,
                          rawtext.shown(event.device))
                self._netlink.reply(event, -errno.ENODEV)
            return
        if device.subtype != SUBTYPE:
            return
        try:
            if isinstance(event, netlink.DeviceAdded):
                if self.add_lun(device)["error"]:
                    status = -22
            elif isinstance(event, netlink.DeviceReconfig):
                with self._lock:
                    host = self._lun_hosts.get(device.uio_name)
                if host is None or not host.reconfigure_lun(device.uio_name, event):
                    status = -19
        except Exception as exc:
            status = self._event_error(device.uio_name, exc)
        self._netlink.reply(event, status)

    @staticmethod
    def _event_error(uio_name, exc) -> int:
        """Log why a LUN event failed; the status to answer it with (-errno): -EINVAL for a
        ConfigError, an OSError's own errno (-EIO without one), -EIO for any other error (a
        StateError of a volume process that cannot be started, or a bug, logged with its
        traceback). Whatever it was, the kernel gets an answer: a configfs write may wait."""
        if isinstance(exc, ConfigError):
            log.error("%s", exc)
            return -errno.EINVAL
        if isinstance(exc, OSError):
            log.error("%s: %s", uio_name, exc)
            return -(exc.errno or errno.EIO)
        log.error("%s: %s", uio_name, exc, exc_info=not isinstance(exc, LvmirrorError))
        return -errno.EIO

    # -- run -----------------------------------------------------------------------------------
    def start(self):
        """Pick up the user:lvmirror devices that already exist, listen to TCMU netlink events,
        look again for devices that came or went meanwhile, and start the D-Bus service
        (unless ``with_bus`` is False).

        The rings come first: after a crash the kernel holds the commands the last handler
        left in them and fails each one ``cmd_time_out`` (30 s) after it was queued, so a
        restarted lvmirrord answers them before it imports pyroute2 (its package imports every
        plugin it has: about 11 s of a 17 s start under the lab's software emulation) and
        dbus-python. A volume's crash recovery runs while it serves (``mirror/recovery.py``)."""
        os.makedirs(self.state_dir, exist_ok=True)
        if self.processes and self._zygote is None:
            # before any thread of ours runs: the zygote is forked from a one-thread process
            from lvmirror.daemon.volumeproc import Zygote
            self._zygote = Zygote()
        if self.leases is not None:
            self._join_lockspace()
        self._pick_up()
        from lvmirror.tcmu import netlink
        self._netlink = netlink.TcmuNetlink()
        self._netlink.start(self._on_event)
        self._pick_up()
        if self.with_bus:
            try:
                from lvmirror.bus import BusService
            except ImportError as exc:
                log.warning("D-Bus service unavailable (%s); targetcli will not list "
                            "user:%s", exc, SUBTYPE)
            else:
                self._bus = BusService(self)
                try:
                    self._bus.start()
                except Exception as exc:   # no system bus, a name held by a policy...
                    raise StateError(f"the D-Bus service cannot start: {exc} (lvmirrord "
                                     f"--no-dbus serves the LUNs without it)") from exc
        if self._metrics is not None:
            self._metrics.start()

    def _join_lockspace(self):
        """Join the sanlock lockspace in the background (the first join waits about twice
        sanlock's io_timeout; a restarted lvmirrord finds it joined): a volume's open waits for
        it (``Leases.join``). A failure is logged; each open then says why it is refused."""
        from lvmirror.daemon.lease import LeaseError, Leases

        def join():
            try:
                Leases(self.leases).join()
                log.info("sanlock lockspace joined: host id %d on %s", self.leases.host_id,
                         self.leases.area)
            except LeaseError as exc:
                log.error("%s", exc)
        threading.Thread(target=join, name="lease-join", daemon=True).start()

    def stop(self):
        """Stop the D-Bus service and the netlink listener, then every LUN (each drains and
        completes its in-flight commands and closes its volume cleanly) and every volume
        process. A LUN or volume process that fails to stop (e.g. its process is being
        restarted) is logged and the others are still stopped; raises nothing of theirs."""
        sdnotify.notify("STOPPING=1")
        if self._bus is not None:
            self._bus.stop()
        if self._netlink is not None:
            self._netlink.stop()
        with self._lock:
            uio_names = list(self._lun_hosts)
        for uio_name in uio_names:
            try:
                self.remove_lun(uio_name)
            except Exception as exc:
                log.error("stopping LUN %s: %s", uio_name, exc,
                          exc_info=not isinstance(exc, (LvmirrorError, OSError)))
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:              # processes left serving nothing, or whose LUN failed
            try:
                host.stop()
            except Exception as exc:
                log.error("stopping the process of volume %s: %s", host.key, exc,
                          exc_info=not isinstance(exc, (LvmirrorError, OSError)))
        if self._zygote is not None:
            self._zygote.close()
        if self._metrics is not None:
            self._metrics.stop()

    def run(self):
        """start(), tell systemd READY=1, serve until request_stop(), then stop(). What start()
        raises (ConfigError: target_core_user not loaded...) is raised after stopping what it
        had started (the zygote, the netlink listener)."""
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        n = len(self._lun_hosts)
        sdnotify.notify("READY=1", f"STATUS=serving {n} LUN(s)")
        log.info("lvmirrord %s ready: %d LUN(s) (%s), state in %s", __version__, n,
                 "a process per volume" if self.processes else "one process", self.state_dir)
        self._stop.wait()
        log.info("shutting down: draining in-flight commands")
        self.stop()

    def request_stop(self, *_):
        """Ask run() to stop (the SIGTERM / SIGINT handler)."""
        self._stop.set()
