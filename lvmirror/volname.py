"""A volume's name: the rule every entry point checks it by (a cfgstring, a consistency group's
VOLUME:IMAGE). Kept apart from ``cfgstring`` so that the clients (``lvmirror``,
targetcli-lvmirror) check a group member without importing the cfgstring parser, whose
imports cost a client's start under the lab's emulated CPU."""

from __future__ import annotations

import re

from lvmirror.errors import ConfigError

__all__ = ["NAME_RE", "check_volume_name"]

# it names a directory under the state directory and a D-Bus object path's last element
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_volume_name(name: str, where: str = "") -> str:
    """``name`` if it is a valid volume name: 1-64 ASCII letters, digits, '_', '.', '-',
    starting with a letter or digit. ConfigError otherwise, its message prefixed by
    ``where``."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}volume name {name!r} must be 1-64 letters, digits, '_', "
                          f"'.', '-', starting with a letter or digit")
    return name
