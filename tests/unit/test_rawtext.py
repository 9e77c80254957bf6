"""rawtext: kernel names as text that never raises, and that text shown as UTF-8."""

import os

from lvmirror import rawtext


def test_decode_keeps_every_byte_and_never_raises():
    data = bytes(range(256))
    text = rawtext.decode(data)
    assert os.fsencode(text) == data                    # names the same file through os
    assert rawtext.decode("already text") == "already text"
    assert rawtext.decode(b"v\xff") == "v\udcff"
    assert not rawtext.is_utf8("v\udcff") and rawtext.is_utf8("vé")


def test_shown_writes_the_odd_bytes_as_hex_and_leaves_utf8_alone():
    assert rawtext.shown("lun\udcff5") == "lun\\xff5"
    assert rawtext.shown("vé/naïve") == "vé/naïve"
    assert rawtext.shown(rawtext.decode(b"a\xc3b\xe2\x82")) == "a\\xc3b\\xe2\\x82"
    # a surrogate no decode made (from a JSON escape, say) cannot be a byte: written \udNNN
    assert rawtext.shown("x\ud800y\udcff") == "x\\ud800y\\udcff"
    for text in ("lun\udcff5", "x\ud800", "\udc80" * 3):
        rawtext.shown(text).encode("utf-8")               # always valid UTF-8
