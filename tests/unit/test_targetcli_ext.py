"""targetcli_ext: what saveconfig writes for a user:lvmirror backstore keeps nl_reply_supported
(Debian's rtslib-fb, patched as targetcli-lvmirror patches it; configfs itself is the lab's)."""

import json

import pytest

rtslib_tcm = pytest.importorskip("rtslib_fb.tcm", reason="Debian's python3-rtslib-fb")

import targetcli_ext  # noqa: E402


class FakeUserObject(rtslib_tcm.UserBackedStorageObject):
    """rtslib's class with configfs replaced by a dict (info lines and attributes)."""

    def __init__(self, config, attrs):
        self._info = {"MaxDataAreaMB": "1024", "DataPagesPerBlk": "1", "Config": config}
        self._attrs = attrs

    def _check_self(self):
        pass

    def _parse_info(self, key):
        return self._info[key]

    def get_attribute(self, name):
        if name not in self._attrs:
            raise rtslib_tcm.RTSLibError(f"no attribute {name}")
        return self._attrs[name]


@pytest.mark.parametrize("control,value,want", [
    ("max_data_area_mb=1024", "-1", "max_data_area_mb=1024,nl_reply_supported=-1"),
    ("", "-1", "nl_reply_supported=-1"),
    ("a=1", "0", "a=1"),                                  # the kernel's default: nothing to add
    ("a=1", None, "a=1"),
    ("a=1,nl_reply_supported=-1", "-1", "a=1,nl_reply_supported=-1"),
])
def test_saved_control(control, value, want):
    assert targetcli_ext.saved_control(control, value) == want


def test_rtslib_dump_keeps_nl_reply_supported():
    lv = FakeUserObject("lvmirror/vol0", {"hw_block_size": "512", "nl_reply_supported": "-1"})
    other = FakeUserObject("qcow/x.qcow2", {"hw_block_size": "512", "nl_reply_supported": "-1"})
    old = rtslib_tcm.UserBackedStorageObject.control_tuples
    assert "nl_reply_supported" not in lv.control_tuples          # what stock rtslib saves
    try:
        targetcli_ext.keep_control_in_saveconfig()
        targetcli_ext.keep_control_in_saveconfig()                 # idempotent
        assert lv.control_tuples == ("max_data_area_mb=1024,hw_block_size=512,"
                                     "data_pages_per_blk=1,nl_reply_supported=-1")
        assert "nl_reply_supported" not in other.control_tuples     # other handlers untouched
        no_attr = FakeUserObject("lvmirror/vol1", {"hw_block_size": "512"})
        assert no_attr.control_tuples.endswith("data_pages_per_blk=1")   # older kernel
    finally:
        rtslib_tcm.UserBackedStorageObject.control_tuples = old


class FakeManager:
    def __init__(self):
        self.calls = []

    def AttachImage(self, volume, path):
        self.calls.append(("AttachImage", volume, path))
        return 2

    def Resync(self, volume, image, rate):
        self.calls.append(("Resync", volume, image, rate))
        return '{"bytes_total": 8}'

    def ResyncWithOptions(self, volume, image, rate, options):
        self.calls.append(("ResyncWithOptions", volume, image, rate, dict(options),
                           options.signature))
        return '{"bytes_total": 16}'

    def Restore(self, volume, image, rate):
        self.calls.append(("Restore", volume, image, rate))
        return '{"bytes_total": 8}'

    def RestoreWithOptions(self, volume, image, rate, options):
        self.calls.append(("RestoreWithOptions", volume, image, rate, dict(options),
                           options.signature))
        return '{"bytes_total": 16}'

    def Scrub(self, volume, options):
        self.calls.append(("Scrub", volume, {k: type(v).__name__ for k, v in options.items()},
                           dict(options), options.signature))
        return '{"bytes_total": 32}'

    def AbandonRestore(self, volume, image):
        self.calls.append(("AbandonRestore", volume, image))
        return '{"regions": 2, "bytes": 131072}'

    def AttachImageWithOptions(self, volume, path, options):
        self.calls.append(("AttachImageWithOptions", volume, path, dict(options),
                           options.signature))
        return 3


def test_attach_passes_force_only_when_asked():
    """targetcli-lvmirror's `attach PATH force=true` (issue 14, item 5): the plain AttachImage
    otherwise, so an older lvmirrord keeps working."""
    pytest.importorskip("dbus")
    mgr = FakeManager()
    assert targetcli_ext.attach_image(mgr, "vol0", "/srv/c.img") == 2
    assert targetcli_ext.attach_image(mgr, "vol0", "/srv/d.img", True) == 3
    assert mgr.calls == [("AttachImage", "vol0", "/srv/c.img"),
                         ("AttachImageWithOptions", "vol0", "/srv/d.img", {"force": True}, "sv")]


def test_resync_passes_full_only_when_asked():
    """targetcli-lvmirror's `resync IMAGE full=true` (a disk suspected of dropped writes):
    the plain Resync otherwise, so an older lvmirrord keeps working."""
    pytest.importorskip("dbus")
    mgr = FakeManager()
    assert targetcli_ext.resync_image(mgr, "vol0", 1, 20.0)["bytes_total"] == 8
    assert targetcli_ext.resync_image(mgr, "vol0", 1, 0.0, True)["bytes_total"] == 16
    assert mgr.calls == [("Resync", "vol0", 1, 20.0),
                         ("ResyncWithOptions", "vol0", 1, 0.0, {"full": True}, "sv")]


def test_restore_passes_full_only_when_asked():
    """targetcli-lvmirror's `restore IMAGE full=true` (a split image's file that is not the
    split copy): the plain Restore otherwise, so an older lvmirrord keeps working."""
    pytest.importorskip("dbus")
    mgr = FakeManager()
    targetcli_ext.restore_image(mgr, "vol0", 1, 20.0)
    targetcli_ext.restore_image(mgr, "vol0", 1, 0.0, True)
    assert mgr.calls == [("Restore", "vol0", 1, 20.0),
                         ("RestoreWithOptions", "vol0", 1, 0.0, {"full": True}, "sv")]


def test_abandon_restore_calls_only_with_force(monkeypatch):
    """targetcli-lvmirror's `abandon_restore IMAGE force=true`: without force it is refused
    before any call (the volume would be left a mix of two instants); through manager_call
    the refusal is the command's error, not a crash of the shell."""
    mgr = FakeManager()
    with pytest.raises(ValueError, match="force=true to do so"):
        targetcli_ext.abandon_restore(mgr, "vol0", 2)
    assert mgr.calls == []
    assert targetcli_ext.abandon_restore(mgr, "vol0", 2, True) == {"regions": 2,
                                                                    "bytes": 131072}
    assert mgr.calls == [("AbandonRestore", "vol0", 2)]

    class Refused(Exception):
        pass
    monkeypatch.setattr(targetcli_ext, "_manager", lambda: mgr)
    with pytest.raises(Refused, match="force=true"):
        targetcli_ext.manager_call(targetcli_ext.abandon_restore, "v", 1, False,
                                   error=Refused)
    assert mgr.calls == [("AbandonRestore", "vol0", 2)]


def test_restore_group_claims_one_instant_only_when_every_restore_began():
    """targetcli-lvmirror's `restore_group`: every member's restore shown; a member whose
    restore failed once begun is the command's error, and the group's "one instant" is not
    claimed (trial 25: this path had no test)."""
    def member(volume, state, error=None):
        return dict(volume=volume, kind="restore", image_id=1, state=state, error=error,
                    bytes_done=0, bytes_total=4096, rate=0.0, elapsed=0.0, eta_seconds=None)

    class Mgr:
        def __init__(self, members):
            self.members, self.calls = members, []

        def RestoreGroup(self, members, rate):
            self.calls.append((members, rate))
            return json.dumps({"members": self.members, "hold_seconds": 0.001})
    ok = Mgr([member("va", "running"), member("vb", "running")])
    lines, error = targetcli_ext.restore_group_members(ok, "va:1,vb:1", 20)
    assert error is None and ok.calls == [("va:1,vb:1", 20.0)]
    assert lines[0].startswith("va: restore started") and \
        lines[-1] == "the volumes read as their split images from one instant"
    bad = Mgr([member("va", "running"), member("vb", "failed", "split image 1 cannot be read")])
    lines, error = targetcli_ext.restore_group_members(bad, "va:1,vb:1", 0)
    assert error == "the restore of vb failed: split image 1 cannot be read"
    assert not any("one instant" in line for line in lines) and len(lines) == 2


def test_flags_are_true_or_false_never_a_silent_false():
    """`resync 1 full=ture` used to mean full=false: a parameter that is neither true nor
    false is refused, naming it."""
    assert [targetcli_ext.flag("full", v) for v in ("true", "YES", "1", "false", "no", "0")] \
        == [True, True, True, False, False, False]
    with pytest.raises(ValueError, match="full must be true or false, got 'ture'"):
        targetcli_ext.flag("full", "ture")


def test_scrub_passes_typed_options_and_source_only_with_repair():
    """targetcli-lvmirror's `scrub repair=true source=1 rate=20`: Scrub(volume, a{sv}) with
    repair as b, rate as d, source as u; a source without repair is refused before any call."""
    pytest.importorskip("dbus")
    mgr = FakeManager()
    assert targetcli_ext.scrub_volume(mgr, "vol0")["bytes_total"] == 32
    targetcli_ext.scrub_volume(mgr, "vol0", True, 1, 20)
    with pytest.raises(ValueError, match="give repair=true too"):
        targetcli_ext.scrub_volume(mgr, "vol0", False, 1)
    assert mgr.calls == [
        ("Scrub", "vol0", {"repair": "Boolean", "rate": "Double"},
         {"repair": False, "rate": 0.0}, "sv"),
        ("Scrub", "vol0", {"repair": "Boolean", "rate": "Double", "source": "UInt32"},
         {"repair": True, "rate": 20.0, "source": 1}, "sv")]


def test_unreachable_bus_is_a_command_error_not_a_crash(monkeypatch):
    """With the system bus unreachable, a targetcli-lvmirror command raises the error class it
    is given (configshell's ExecutionError in targetcli) with the bus's message: the manager is
    looked up inside the handler. Before, _manager() ran first and its DBusException ended
    targetcli's interactive shell."""
    pytest.importorskip("dbus")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus")

    class CommandError(Exception):
        pass

    for fn, args in (("Status", ()), ("Split", ("vol0", 1)), (targetcli_ext.resync_image, ("vol0", 1, 0.0))):
        with pytest.raises(CommandError) as ei:
            targetcli_ext.manager_call(fn, *args, error=CommandError)
        assert "nonexistent" in str(ei.value) or "connect" in str(ei.value).lower(), ei.value


def test_manager_call_passes_the_manager_first(monkeypatch):
    mgr = FakeManager()
    monkeypatch.setattr(targetcli_ext, "_manager", lambda: mgr)
    assert targetcli_ext.manager_call(targetcli_ext.attach_image, "vol0", "/srv/c.img") == 2
    assert mgr.calls == [("AttachImage", "vol0", "/srv/c.img")]
