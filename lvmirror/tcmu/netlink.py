"""The TCM-USER generic netlink family: device added / removed / reconfigured, and our replies.

The kernel multicasts ADDED_DEVICE, REMOVED_DEVICE and RECONFIG_DEVICE on the ``config`` group of
family ``TCM-USER``. When it runs in reply mode for a device (module-wide ``SET_FEATURES`` by
some handler, and the device's ``nl_reply_supported`` not -1) the configfs write that caused the
event blocks, uninterruptibly, until some handler answers with the matching ``*_DONE`` carrying
``CMD_STATUS`` (0 or -errno) and ``DEVICE_ID``. lvmirrord therefore answers every event for its
own subtype, and never sends SET_FEATURES itself: the LUNs it creates or validates carry
``nl_reply_supported=-1`` so an ``enable`` can never hang on a missing replier.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import threading

from pyroute2.netlink import NLM_F_REQUEST, genlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import GenericNetlinkSocket

from lvmirror import rawtext
from lvmirror.errors import ConfigError
from lvmirror.tcmu import abi
from lvmirror.tcmu.uio import parse_uio_name

log = logging.getLogger(__name__)

__all__ = ["DeviceAdded", "DeviceReconfig", "DeviceRemoved", "TcmuNetlink", "tcmu_msg",
           "decode_event"]


class tcmu_msg(genlmsg):
    """A TCM-USER message; attribute names follow ``enum tcmu_genl_attr``."""

    prefix = "TCMU_ATTR_"
    nla_map = (
        ("TCMU_ATTR_UNSPEC", "none"),
        ("TCMU_ATTR_DEVICE", "asciiz"),
        ("TCMU_ATTR_MINOR", "uint32"),
        ("TCMU_ATTR_PAD", "none"),
        ("TCMU_ATTR_DEV_CFG", "asciiz"),
        ("TCMU_ATTR_DEV_SIZE", "uint64"),
        ("TCMU_ATTR_WRITECACHE", "uint8"),
        ("TCMU_ATTR_CMD_STATUS", "int32"),
        ("TCMU_ATTR_DEVICE_ID", "uint32"),
        ("TCMU_ATTR_SUPP_KERN_CMD_REPLY", "uint8"),
    )


assert [n for n, _ in tcmu_msg.nla_map] == ["TCMU_ATTR_" + a.name for a in abi.GenlAttr]


@dataclasses.dataclass
class _Event:
    minor: int
    device: str            # the uio name, "tcm-user/<hba>/<name>/<subtype>/<cfg>"
    device_id: int | None

    @property
    def subtype(self) -> str | None:
        """The handler subtype named in ``device`` (``lvmirror`` for ours); None if ``device``
        is not a TCMU uio name."""
        parsed = parse_uio_name(self.device or "")
        return parsed[2] if parsed else None

    reply_command = abi.GenlCommand.UNSPEC


@dataclasses.dataclass
class DeviceAdded(_Event):
    """TCMU_CMD_ADDED_DEVICE: a TCMU device was enabled (configfs ``enable``; its uio device
    exists); answered with ADDED_DEVICE_DONE."""
    reply_command = abi.GenlCommand.ADDED_DEVICE_DONE


@dataclasses.dataclass
class DeviceRemoved(_Event):
    """TCMU_CMD_REMOVED_DEVICE: a TCMU device is being destroyed (backstore deleted); answered
    with REMOVED_DEVICE_DONE."""
    reply_command = abi.GenlCommand.REMOVED_DEVICE_DONE


@dataclasses.dataclass
class DeviceReconfig(_Event):
    """TCMU_CMD_RECONFIG_DEVICE: a configfs write to a configured device; one of ``dev_cfg`` (new
    dev_config), ``dev_size`` (bytes) or ``write_cache`` is set. Answered with
    RECONFIG_DEVICE_DONE."""
    dev_cfg: str | None = None
    dev_size: int | None = None
    write_cache: bool | None = None
    reply_command = abi.GenlCommand.RECONFIG_DEVICE_DONE


def _text(value) -> str | None:
    """A string attribute as text: pyroute2 hands one that is not UTF-8 over as bytes (the
    device name carries the cfgstring, which configfs takes as any bytes); those are decoded
    by ``rawtext.decode`` (surrogates for the odd bytes), so the event still names its uio
    device and subtype and gets its answer."""
    return None if value is None else rawtext.decode(value)


def decode_event(msg) -> _Event | None:
    """A parsed ``tcmu_msg`` -> event dataclass (None for commands we do not handle)."""
    if not isinstance(msg, tcmu_msg) or msg.get("cmd") is None:
        return None                 # an ACK / error for one of our replies, not an event
    cmd = msg["cmd"]
    minor = msg.get_attr("TCMU_ATTR_MINOR")
    device = _text(msg.get_attr("TCMU_ATTR_DEVICE"))
    dev_id = msg.get_attr("TCMU_ATTR_DEVICE_ID")
    if minor is None:
        return None
    if cmd == abi.GenlCommand.ADDED_DEVICE:
        return DeviceAdded(minor, device, dev_id)
    if cmd == abi.GenlCommand.REMOVED_DEVICE:
        return DeviceRemoved(minor, device, dev_id)
    if cmd == abi.GenlCommand.RECONFIG_DEVICE:
        wc = msg.get_attr("TCMU_ATTR_WRITECACHE")
        return DeviceReconfig(minor, device, dev_id,
                              dev_cfg=_text(msg.get_attr("TCMU_ATTR_DEV_CFG")),
                              dev_size=msg.get_attr("TCMU_ATTR_DEV_SIZE"),
                              write_cache=None if wc is None else bool(wc))
    return None


def encode_reply(family_id: int, event: _Event, status: int, pid: int = 0) -> bytes:
    """The netlink message (bytes) answering ``event``: its ``*_DONE`` command with
    CMD_STATUS ``status`` (0 or -errno) and the event's DEVICE_ID, to family ``family_id``, from
    port ``pid``."""
    msg = tcmu_msg()
    msg["cmd"] = int(event.reply_command)
    msg["version"] = abi.GENL_VERSION
    msg["attrs"] = [["TCMU_ATTR_CMD_STATUS", int(status)]]
    if event.device_id is not None:
        msg["attrs"].append(["TCMU_ATTR_DEVICE_ID", event.device_id])
    msg["header"]["type"] = family_id
    msg["header"]["flags"] = NLM_F_REQUEST
    msg["header"]["pid"] = pid
    msg.encode()
    return msg.data


class TcmuNetlink:
    """Listens to the ``config`` group in a thread; ``callback(event)`` must call ``reply``."""

    def __init__(self):
        self._sock = None
        self._thread = None
        self._stop = threading.Event()
        self._stop_r = self._stop_w = None
        self._stop_lock = threading.Lock()
        self._send_lock = threading.Lock()

    def start(self, callback) -> None:
        """Bind to family TCM-USER, join its ``config`` group and start the listener thread, which
        calls ``callback(event)`` for every event ``decode_event`` returns. ConfigError when the
        family is not there (target_core_user not loaded: the message says to load it);
        OSError with the kernel's errno when the lookup fails otherwise (EPERM...). The socket
        is closed when it raises."""
        sock = GenericNetlinkSocket()
        sock.module_err_level = "debug"     # pyroute2's own log lines: our error says it all
        try:
            try:
                sock.bind(abi.GENL_FAMILY, tcmu_msg)
            except NetlinkError as exc:
                if exc.code == errno.ENOENT:
                    raise ConfigError(
                        f"the {abi.GENL_FAMILY} netlink family is not there: load "
                        f"target_core_user (modprobe target_core_user)") from None
                raise OSError(exc.code, f"cannot look up the {abi.GENL_FAMILY} netlink family: "
                              f"{os.strerror(exc.code)}") from None
            sock.add_membership(abi.GENL_MCGRP_CONFIG)
        except Exception:
            sock.close()
            raise
        self._sock = sock
        # (the listener waits on the socket and this pipe, with no timeout: an idle gateway's
        # listener never wakes; ``stop`` writes the pipe)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, args=(callback,), name="tcmu-netlink",
                                        daemon=True)
        self._thread.start()

    def _loop(self, callback):
        sock, stop_r = self._sock, self._stop_r
        # (poll, not select: a descriptor numbered 1024 or more - a gateway with many LUNs -
        # would make select raise and end the listener)
        waiter = select.poll()
        waiter.register(sock.fileno(), select.POLLIN)
        waiter.register(stop_r, select.POLLIN)
        while not self._stop.is_set():
            if any(fd == stop_r for fd, _ in waiter.poll()):
                return
            try:
                msgs = sock.get()
            except Exception as e:    # a malformed message must not kill the listener
                log.error("netlink: cannot parse a TCM-USER message: %s", e)
                continue
            for msg in msgs:
                try:
                    event = decode_event(msg)
                    if event is None:
                        continue
                    callback(event)
                except Exception:    # one bad message must not stop the listener
                    log.exception("netlink: handling %r failed", msg.get("cmd") if
                                  hasattr(msg, "get") else msg)

    def reply(self, event: _Event, status: int) -> None:
        """Send the ``*_DONE`` answer for ``event`` (harmless when the kernel does not wait)."""
        if self._sock is None:
            return
        data = encode_reply(self._sock.prid, event, status, self._sock.pid)
        with self._send_lock:
            try:
                self._sock.sendto(data, (0, 0))
            except OSError as e:
                log.error("netlink: cannot reply to %s: %s", type(event).__name__, e)

    def stop(self) -> None:
        """Stop the listener (woken through its stop pipe), join it and close the socket;
        ``reply`` does nothing after."""
        with self._stop_lock:          # (two callers at once: one closes, once)
            self._stop.set()
            if self._stop_w is not None:
                os.write(self._stop_w, b"x")
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            for fd in (self._stop_r, self._stop_w):
                if fd is not None:
                    os.close(fd)
            self._stop_r = self._stop_w = None
