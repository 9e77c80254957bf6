"""The user:lvmirror cfgstring: parsing, round trip, and the checks targetcli's CheckConfig runs."""

import os

import pytest

from lvmirror import cfgstring
from lvmirror.cfgstring import VolumeSpec
from lvmirror.errors import ConfigError
from lvmirror.mirror.volume import MirrorVolume


@pytest.mark.parametrize("text,spec", [
    ("vol0", VolumeSpec("vol0")),
    ("lvmirror/vol0", VolumeSpec("vol0")),
    ("vol0;images=/srv/a.img+/srv/b.img", VolumeSpec("vol0", images=("/srv/a.img", "/srv/b.img"))),
    ("db.1;images=/dev/sdb+/dev/sdc+/dev/sdd;region_size=64K;block_size=4096;direct=1",
     VolumeSpec("db.1", images=("/dev/sdb", "/dev/sdc", "/dev/sdd"), region_size=65536,
                block_size=4096, direct=True)),
    ("vol0;image=2", VolumeSpec("vol0", image=2)),
    ("vol0;image=1;readonly=1", VolumeSpec("vol0", image=1, readonly=True)),
    ("v;region_size=1G", VolumeSpec("v", region_size=1 << 30)),
    ("v;images=/dev/vdb+/dev/vdc;direct=1;state_dir=/srv/ha/v",
     VolumeSpec("v", images=("/dev/vdb", "/dev/vdc"), direct=True, state_dir="/srv/ha/v")),
    ("v;image=1;state_dir=/srv/ha", VolumeSpec("v", image=1, state_dir="/srv/ha")),
])
def test_parse_and_round_trip(text, spec):
    assert cfgstring.parse(text) == spec
    assert cfgstring.parse(cfgstring.format(spec)) == spec


@pytest.mark.parametrize("text,fact", [
    ("", "no volume name"),
    (";images=/a", "no volume name"),
    ("-vol", "volume name"),
    ("vol0;foo=1", "unknown option 'foo' (known: images, region_size"),
    ("vol0;images=/a;images=/b", "given twice"),
    ("vol0;direct=", "empty value"),
    ("vol0;direct", "needs a value"),
    ("vol0;images=/a+/b;", "an empty option (';' at the end or ';;')"),
    ("vol0;;images=/a", "an empty option"),
    ("vol/0;images=/a", "a volume name holds no '/'"),
    ("images=/srv/a.img", "starts with an option, not a volume name"),
    ("lvmirror/", "cfgstring 'lvmirror/': starts with no volume name"),
    ("vol0;images=rel/a.img", "must be absolute"),
    ("vol0;images=/srv/../a", "not normalised"),
    ("vol0;images=/a+/a", "listed twice"),
    ("vol0;images=/a+/b+/c+/d+/e", "5 images"),
    ("vol0;images=/a;image=1", "exclude each other"),
    ("vol0;region_size=3M", "power of two"),
    ("vol0;region_size=1K", "from 4K"),
    ("vol0;region_size=lots", "not a size"),
    ("vol0;block_size=1024", "512 or 4096"),
    ("vol0;direct=yes", "0 or 1"),
    ("vol0;image=x", "image index"),
    ("vol0;image=1;block_size=4096", "belongs to the volume"),
    ("vol0;readonly=1", "applies to an exported split image"),
    ("vol0;image=1;readonly=yes", "readonly must be 0 or 1"),
    ("qcow/vol0", "handler 'qcow'"),
    ("vol0;images=/srv/a:b", "':'"),
    ("vol0;images=/srv/a.img,/srv/b.img", "join image paths with '+'"),
    ("vol0;images=/a b", "whitespace"),
    ("vol0;images=/" + "x" * 260, "LIO allows"),
    ("vol0;state_dir=srv/ha", "state_dir 'srv/ha' must be an absolute, normalised path"),
    ("vol0;state_dir=/srv/ha/", "must be an absolute, normalised path"),
    ("vol0;state_dir=/srv/../ha", "must be an absolute, normalised path"),
    ("vol0;state_dir=/", "other than /"),
    ("vol0;state_dir=//srv/ha", "(e.g. '/srv/ha')"),
])
def test_bad_cfgstrings_are_refused_with_the_reason(text, fact):
    with pytest.raises(ConfigError) as e:
        cfgstring.parse(text)
    assert fact in str(e.value)


def test_check_against_the_state_dir(tmp_path):
    state = tmp_path / "state"
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    with pytest.raises(ConfigError, match="does not exist in"):
        cfgstring.check("vol0", state_dir=str(state))
    with pytest.raises(ConfigError, match="directory .* does not exist"):
        cfgstring.check(f"vol0;images={tmp_path}/nodir/a.img", state_dir=str(state))
    with pytest.raises(ConfigError, match="not a regular file or block device"):
        cfgstring.check(f"vol0;images={tmp_path}", state_dir=str(state))
    # new images in an existing directory are fine (created sparse at first use)
    assert cfgstring.check(f"vol0;images={a}+{b}", state_dir=str(state)).images == (str(a), str(b))
    MirrorVolume.create("vol0", [a, b], meta_dir=str(state), size=1 << 20,
                        flush_interval=None).close()
    assert cfgstring.check("vol0", state_dir=str(state)).name == "vol0"
    assert cfgstring.check("vol0;image=1", state_dir=str(state)).image == 1
    with pytest.raises(ConfigError, match="no image 2"):
        cfgstring.check("vol0;image=2", state_dir=str(state))
    # an existing volume: images= must name its current or former images, in any order
    assert cfgstring.check(f"vol0;images={b}+{a}", state_dir=str(state)).name == "vol0"
    assert cfgstring.check(f"vol0;images={a}", state_dir=str(state)).name == "vol0"
    with pytest.raises(ConfigError, match=f"has images {a}\\+{b}; the cfgstring names "
                                          f"{a}\\+{tmp_path}/c.img, and {tmp_path}/c.img was "
                                          f"never an image of this volume"):
        cfgstring.check(f"vol0;images={a}+{tmp_path}/c.img", state_dir=str(state))
    (state / "vol0" / "volume.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        cfgstring.check(f"vol0;images={a}", state_dir=str(state))


def test_check_accepts_the_cfgstring_written_before_attach_and_detach(tmp_path):
    """A LUN's cfgstring cannot change: after attach / detach (issue 13) the saved targetcli
    configuration must still pass CheckConfig; a path never part of the volume must not."""
    state = str(tmp_path / "state")
    a, b, c, d = (str(tmp_path / f"{n}.img") for n in "abcd")
    vol = MirrorVolume.create("vol0", [a, b], meta_dir=state, size=1 << 20, flush_interval=None)
    try:
        vol.attach(c)
        for job in list(vol.jobs.values()):
            assert job.wait(20)
        assert cfgstring.check(f"vol0;images={a}+{b}", state_dir=state).name == "vol0"
        vol.detach(0)
        vol.detach(0)
        for cfg in (f"vol0;images={a}+{b}", f"vol0;images={a}+{b}+{c}", f"vol0;images={c}"):
            assert cfgstring.check(cfg, state_dir=state).name == "vol0"
        with pytest.raises(ConfigError) as e:
            cfgstring.check(f"vol0;images={a}+{d}", state_dir=state)
        assert f"volume 'vol0' has images {c} (former images: {a}+{b})" in str(e.value)
        assert f"{d} was never an image of this volume" in str(e.value)
    finally:
        vol.close()


def test_leg_timeout_option():
    spec = cfgstring.parse("vol0;images=/a+/b;leg_timeout=2.5")
    assert spec.leg_timeout == 2.5
    assert cfgstring.parse(cfgstring.format(spec)) == spec
    assert cfgstring.parse("vol0;leg_timeout=0").leg_timeout == 0.0
    assert cfgstring.parse("vol0").leg_timeout is None
    for bad in ("-1", "601", "soon", "nan", "inf", "1e-300", "0.01", "1_0", "-0", "\u0663"):
        with pytest.raises(ConfigError, match="leg_timeout must be"):
            cfgstring.parse(f"vol0;images=/a+/b;leg_timeout={bad}")


def test_only_ascii_digits_and_valid_text():
    """Found by trying to break the parser: a superscript or Arabic-Indic digit passed
    str.isdigit() and then int() raised ValueError (or silently meant a digit), and a lone
    surrogate raised UnicodeEncodeError - every bad cfgstring must be a ConfigError."""
    for bad in ("vol;image=\u00b2", "vol;image=\u0661", "vol;images=/a+/b;region_size=\u0661M",
                "vol\udc80", "vol;images=/a\udc80"):
        with pytest.raises(ConfigError):
            cfgstring.parse(bad)
    with pytest.raises(ConfigError, match="split image"):
        cfgstring.parse("vol0;image=1;leg_timeout=3")


@pytest.mark.parametrize("cfg,shown", [
    ("vol\udcff;images=/a", "vol\\xff;images=/a"),
    ("images=/srv/caf\udce9.img", "images=/srv/caf\\xe9.img"),     # also "handler images="
    ("lvmirror/v;images=/a\udc80", "lvmirror/v;images=/a\\x80"),
])
def test_bytes_that_are_not_utf8_are_refused_first_and_named_as_hex(cfg, shown):
    """configfs takes a cfgstring as any bytes (lvmirror reads the odd ones as surrogates): the
    refusal names them \\xNN whatever else is wrong (a wrong handler was said first, with
    Python's \\udcNN escapes - a trial), so the message is the same in the log, the LUN's
    NOT READY status and over D-Bus."""
    with pytest.raises(ConfigError) as exc:
        cfgstring.parse(cfg)
    assert str(exc.value).startswith(f"cfgstring '{shown}': holds bytes that are not UTF-8")
    str(exc.value).encode("utf-8")


def test_state_dir_must_exist_and_holds_the_volume(tmp_path, monkeypatch):
    """A cfgstring's state_dir replaces lvmirrord's --state-dir in CheckConfig; one that does
    not exist, or is an empty mount point (a shared file system not mounted), is refused,
    never taken for a new volume."""
    local, shared = tmp_path / "local", tmp_path / "shared"
    local.mkdir()
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    text = f"v;images={a}+{b};state_dir={shared}"
    with pytest.raises(ConfigError) as e:
        cfgstring.check(text, state_dir=str(local))
    assert f"state_dir {shared} does not exist" in str(e.value)
    assert "mounted" in str(e.value)
    shared.mkdir()
    with pytest.raises(ConfigError) as e:          # the mount point, nothing mounted on it
        cfgstring.check(text, state_dir=str(local))
    assert f"state_dir {shared} is not a mount point" in str(e.value)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: p == str(shared) or real_ismount(p))
    MirrorVolume.create("v", [str(a), str(b)], meta_dir=str(shared), size=1 << 20).close()
    assert cfgstring.check(f"v;state_dir={shared}", state_dir=str(local)).state_dir == str(shared)
    with pytest.raises(ConfigError) as e:          # not in lvmirrord's own state directory
        cfgstring.check("v", state_dir=str(local))
    assert "does not exist in" in str(e.value)
    with pytest.raises(ConfigError) as e:          # a split image it does not have
        cfgstring.check(f"v;image=3;state_dir={shared}", state_dir=str(local))
    assert "no image 3" in str(e.value)
