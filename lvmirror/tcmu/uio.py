"""TCMU devices as user space finds them: /sys/class/uio, /dev/uioN and the configfs device dir.

``find_devices`` lists the uio devices whose name is ``tcm-user/<hba>/<name>/<subtype>/<cfg>``
(the cfgstring may itself contain '/'); ``open_device`` opens and maps one. Only one process
may open a TCMU uio device (the kernel answers EBUSY); ``open_device`` retries for a few
seconds (tcmu-runner opens every new device briefly, even one of a handler registered with it
over D-Bus) and then raises a clear error. With ``pickup=True`` (a device that already existed
when lvmirrord started) it does what libtcmu does on start-up: block the device, reset the ring
(commands left in it by the previous handler are failed back to the initiator as retryable
BUSY), open and map, unblock.

Roots are parameters so the host tests run against a fake tree; the kernel proves the rest.
"""

from __future__ import annotations

import dataclasses
import errno
import mmap
import os
import re
import time

from lvmirror import rawtext
from lvmirror.errors import ConfigError
from lvmirror.tcmu import alua

__all__ = ["DeviceBusyError", "UioDevice", "UioHandle", "device_by_minor", "find_devices",
           "open_device", "parse_uio_name"]

_UIO_PREFIX = "tcm-user/"


def parse_uio_name(name: str | bytes):
    """``tcm-user/<hba>/<dev>/<subtype>/<cfg>`` -> (hba, dev, subtype, cfg); None if not TCMU.
    Bytes (a netlink attribute pyroute2 could not decode) are decoded by ``rawtext.decode``."""
    name = rawtext.decode(name).strip()
    if not name.startswith(_UIO_PREFIX):
        return None
    parts = name[len(_UIO_PREFIX):].split("/", 3)
    if len(parts) < 2:
        return None
    hba, dev = parts[0], parts[1]
    subtype = parts[2] if len(parts) > 2 else ""
    cfg = parts[3] if len(parts) > 3 else ""
    return hba, dev, subtype, cfg


def _read(path: str) -> str:
    """A sysfs or configfs file as text (``rawtext.decode``: bytes that are not UTF-8, which
    configfs takes from whoever writes a name, cfgstring or serial, never raise). OSError
    when it cannot be read."""
    with open(path, "rb") as f:
        return rawtext.decode(f.read())


@dataclasses.dataclass
class UioDevice:
    """One TCMU device: where it is in sysfs, /dev and configfs, and what it is configured as."""

    uio_name: str          # "uio0"
    minor: int
    hba: str
    dev_name: str          # the backstore name in targetcli
    subtype: str
    cfgstring: str
    sysfs_root: str = "/sys"
    configfs_root: str = "/sys/kernel/config"
    dev_root: str = "/dev"

    @property
    def dev_path(self) -> str:
        """``<dev_root>/uioN``: what ``open_device`` opens."""
        return os.path.join(self.dev_root, self.uio_name)

    @property
    def sysfs_dir(self) -> str:
        """``<sysfs_root>/class/uio/uioN``."""
        return os.path.join(self.sysfs_root, "class", "uio", self.uio_name)

    @property
    def configfs_dir(self) -> str:
        """The backstore's configfs directory,
        ``<configfs_root>/target/core/user_<hba>/<dev_name>``."""
        return os.path.join(self.configfs_root, "target", "core", f"user_{self.hba}",
                            self.dev_name)

    def map_size(self) -> int:
        """Bytes of the uio map (sysfs ``maps/map0/size``): mailbox, command ring and data area.
        OSError or ValueError when it cannot be read."""
        return int(_read(os.path.join(self.sysfs_dir, "maps", "map0", "size")).strip(), 0)

    def _cfg(self, *parts) -> str:
        return _read(os.path.join(self.configfs_dir, *parts))

    def lun_size(self) -> int:
        """The LUN size in bytes (``info`` "Size: N")."""
        m = re.search(r"(?<![A-Za-z])Size: (\d+)", self._cfg("info"))   # not "SectorSize"
        if not m:
            raise ConfigError(f"{self.dev_name}: no size in {self.configfs_dir}/info")
        return int(m.group(1))

    def hw_block_size(self) -> int | None:
        """``attrib/hw_block_size``: the LUN's logical block size in bytes; None when unreadable."""
        try:
            return int(self._cfg("attrib", "hw_block_size").strip())
        except (OSError, ValueError):
            return None

    def max_transfer_blocks(self) -> int | None:
        """``attrib/hw_max_sectors`` (in hw_block_size units): the largest transfer to offer in
        the Block Limits VPD page, as tcmu-runner does."""
        try:
            return int(self._cfg("attrib", "hw_max_sectors").strip()) or None
        except (OSError, ValueError):
            return None

    def write_cache(self) -> bool:
        """``attrib/emulate_write_cache`` is 1 (the LUN reports a write-back cache, WCE); False when
        unreadable."""
        try:
            return self._cfg("attrib", "emulate_write_cache").strip() == "1"
        except OSError:
            return False

    def wwn(self) -> str | None:
        """The unit serial LIO holds (``wwn/vpd_unit_serial``: "T10 VPD Unit Serial Number:
        <serial>\\n", target_core_configfs.c), the source of the VPD ids: everything after the
        colon, spaces and newlines inside it too; None when unreadable or unset (LIO shows an
        unset one with nothing after the colon: rtslib-fb writes it just after it enables the
        device, and raw configfs writes may never set it)."""
        try:
            text = self._cfg("wwn", "vpd_unit_serial")
        except OSError:
            return None
        prefix = "T10 VPD Unit Serial Number:"
        serial = text[len(prefix):] if text.startswith(prefix) else text
        # LIO strips a written serial's ends (strstrip: the C locale's white space), so white
        # space at the ends here is the format's; a newline inside it is the serial's own, and
        # so are the characters only Python counts as white space (U+001C-U+001F, U+0085...)
        return serial.strip(" \t\n\v\f\r") or None

    def port_groups(self) -> list:
        """The backstore's ALUA target port groups as the kernel has them now
        (``lvmirror.tcmu.alua.read_port_groups``: a list of ``scsi.alua.PortGroup``). Raises
        OSError or ValueError when a group cannot be read."""
        return alua.read_port_groups(self.configfs_dir,
                                     os.path.join(self.configfs_root, "target"))

    def local_port_state(self) -> int | None:
        """The ALUA access state of the group of this node's one enabled port, or None
        (``lvmirror.tcmu.alua.read_local_state``: the state ``port_groups`` gives, read with
        fewer configfs reads). Raises OSError or ValueError when a group cannot be read."""
        return alua.read_local_state(self.configfs_dir,
                                     os.path.join(self.configfs_root, "target"))

    def enable_tmr_notification(self) -> bool:
        """Ask the kernel to queue TMR entries (ABORT TASK, LUN RESET...) on the ring
        (``attrib/tmr_notification`` = 1, kernel 5.9+, target_core_user.c), so lvmirrord sees
        the aborts of commands it holds - a slow image, an initiator timing out - instead of
        learning of them only from the initiator's retries. False where the kernel lacks the
        attribute or refuses it."""
        path = os.path.join(self.configfs_dir, "attrib", "tmr_notification")
        if not os.path.exists(path):
            return False
        try:
            with open(path, "w") as f:
                f.write("1\n")
        except OSError:
            return False
        return True

    def action(self, name: str, value: int) -> None:
        """Write ``value`` to the backstore's configfs ``action/<name>`` (``block_dev``,
        ``reset_ring``: target_core_user.c); OSError when the kernel refuses."""
        with open(os.path.join(self.configfs_dir, "action", name), "w") as f:
            f.write(f"{value}\n")


def find_devices(subtype: str | None = None, *, sysfs_root="/sys",
                 configfs_root="/sys/kernel/config", dev_root="/dev") -> list[UioDevice]:
    """Every TCMU uio device (of ``subtype`` if given), sorted by minor. A device whose name
    holds bytes that are not UTF-8 (configfs takes any) is listed with them as surrogates
    (``rawtext.decode``), so one such device neither hides nor breaks the others; a uio device
    whose name cannot be read is left out."""
    base = os.path.join(sysfs_root, "class", "uio")
    out = []
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return []
    for uio in names:
        m = re.fullmatch(r"uio(\d+)", uio)
        if not m:
            continue
        try:
            parsed = parse_uio_name(_read(os.path.join(base, uio, "name")))
        except OSError:
            continue
        if parsed is None:
            continue
        hba, dev, sub, cfg = parsed
        if subtype is not None and sub != subtype:
            continue
        out.append(UioDevice(uio, int(m.group(1)), hba, dev, sub, cfg, sysfs_root,
                             configfs_root, dev_root))
    return sorted(out, key=lambda d: d.minor)


def device_by_minor(minor: int, **roots) -> UioDevice | None:
    """The TCMU device ``uio<minor>`` (the netlink event's MINOR), or None; ``roots`` as for
    ``find_devices``."""
    for d in find_devices(None, **roots):
        if d.minor == minor:
            return d
    return None


class UioHandle:
    """An open, mapped TCMU uio device."""

    def __init__(self, device: UioDevice, fd: int, mapping: mmap.mmap, map_size: int):
        self.device = device
        self.fd = fd
        self.map = mapping
        self.map_size = map_size
        self.uio_name = device.uio_name

    def clear_event(self) -> None:
        """Consume the event counter (a 4-byte read; EAGAIN when nothing new)."""
        try:
            os.read(self.fd, 4)
        except BlockingIOError:
            pass

    def notify(self) -> None:
        """Tell the kernel to reap completions (one 4-byte write per batch)."""
        os.write(self.fd, b"\x01\x00\x00\x00")

    def close(self) -> None:
        """Unmap (left to the last view while views are exported) and close the descriptor;
        idempotent."""
        try:
            self.map.close()
        except BufferError:
            pass     # views still exported; unmapped when the last one goes
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DeviceBusyError(ConfigError):
    """Another process has the TCMU uio device open."""


# tcmu-runner opens every new TCMU device, even one of a handler registered through its
# HandlerManager1 (lvmirror), and closes it again when that handler's open fails: a short EBUSY.
BUSY_WAIT_SECONDS = 5.0


def _open_uio(path: str, busy_wait: float) -> int:
    deadline = time.monotonic() + busy_wait
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def open_device(device: UioDevice, *, pickup: bool = False,
                busy_wait: float = BUSY_WAIT_SECONDS) -> UioHandle:
    """Open and map ``device``; see the module docstring for ``pickup``. While another process
    has it open (EBUSY), retry for up to ``busy_wait`` seconds."""
    size = device.map_size()
    if pickup:
        device.action("block_dev", 1)
        try:
            device.action("reset_ring", 1)
        except OSError:
            device.action("block_dev", 0)
            raise
    try:
        try:
            fd = _open_uio(device.dev_path, busy_wait)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise DeviceBusyError(
                    f"{device.uio_name} ({device.dev_name}) is held open by another process "
                    f"(tcmu-runner with its own handler for 'lvmirror', or another "
                    f"lvmirrord?)") from e
            raise
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
    finally:
        if pickup:
            device.action("block_dev", 0)
    return UioHandle(device, fd, mapping, size)
