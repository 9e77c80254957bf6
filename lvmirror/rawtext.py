"""Bytes the kernel hands lvmirror as text, and that text made fit to show.

Linux names are bytes: a sysfs uio name (``tcm-user/<hba>/<dev>/<subtype>/<cfgstring>``, where
configfs accepts any bytes an administrator writes), a netlink string attribute, a mount path
in /proc/self/mountinfo, a configfs attribute such as ``wwn/vpd_unit_serial``. Decoding them
as strict UTF-8 turns one odd byte into a UnicodeDecodeError far from its cause - in the
netlink thread, where it left the kernel's configfs write waiting for an answer that never
came. ``decode`` never raises: bytes that are not UTF-8 become lone surrogates, as
``os.fsdecode`` makes them on a UTF-8 system, so the text still names the same file or
configfs directory through ``os`` functions. Such text cannot go out over D-Bus (which
carries only UTF-8) or to a terminal; ``shown`` writes those bytes as ``\\xNN``.
"""

from __future__ import annotations

__all__ = ["decode", "encode", "is_utf8", "shown"]


def decode(data: bytes | str) -> str:
    """``data`` (bytes; text is returned as it is) as text: UTF-8, each byte that is not
    UTF-8 as a lone surrogate (PEP 383 ``surrogateescape``). Never raises."""
    if isinstance(data, str):
        return data
    return bytes(data).decode("utf-8", "surrogateescape")


def encode(text: str) -> bytes:
    """``decode``'s inverse: ``text`` as the bytes it was read from (its surrogates U+DC80-U+DCFF
    back as the bytes they stand for), e.g. a unit serial or target name going out in a VPD
    page as configfs holds it. UnicodeEncodeError for a surrogate ``decode`` cannot make."""
    return text.encode("utf-8", "surrogateescape")


def is_utf8(text: str) -> bool:
    """``text`` holds no byte ``decode`` could not decode (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(text: str) -> str:
    """``text`` with each byte ``decode`` kept as a surrogate written ``\\xNN`` (any other lone
    surrogate as ``\\udNNN``): valid UTF-8 for D-Bus, JSON and logs. Text that is UTF-8
    already is returned unchanged."""
    if is_utf8(text):
        return text
    try:
        raw = encode(text)
    except UnicodeEncodeError:              # a surrogate no byte stands for
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")
