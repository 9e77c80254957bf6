"""Split hooks (``/etc/lvmirror/hooks.d``): run by lvmirrord before and after every split,
once around a consistency group, with a timeout and an abort-or-continue policy; through the
CLI and D-Bus on a private dbus-daemon."""

import json
import os
import time

import pytest

from lvmirror import cfgstring
from lvmirror.daemon import Lvmirrord
from lvmirror.daemon.hooks import HookError, SplitHooks, hook_options
from lvmirror.errors import ConfigError

from tests.unit.test_bus import cli, system_bus  # noqa: F401  (a fixture)


def _hook(directory, name, body):
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def open_volumes(d, tmp_path, names):
    """Open a 2-image volume of each name in lvmirrord ``d`` (as a LUN would), in sync;
    returns {name: (spec, volume)}; release each spec with ``d.registry.release``."""
    out = {}
    for name in names:
        imgs = "+".join(str(tmp_path / f"{name}{k}") for k in range(2))
        spec = cfgstring.parse(f"{name};images={imgs};region_size=64K")
        vol, _ = d.registry.acquire(spec, lun=f"lun-{name}", size=4 << 20)
        for job in vol.jobs.values():
            assert job.wait(20)
        out[name] = (spec, vol)
    return out


@pytest.fixture
def gw(tmp_path):
    """lvmirrord (no bus, one process) with volumes va and vb (2 images each) and an empty
    hooks directory; yields (daemon, hooks dir, log file the hooks append to)."""
    hooks = tmp_path / "hooks.d"
    hooks.mkdir()
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False, hooks_dir=str(hooks))
    vols = open_volumes(d, tmp_path, ("va", "vb"))
    yield d, hooks, tmp_path / "hooks.log"
    for spec, _ in vols.values():
        d.registry.release(spec)


LOGGER = 'echo "$(basename $0) $1 $LVMIRROR_PHASE [$LVMIRROR_VOLUMES] [$LVMIRROR_IMAGES] ' \
         'g=$LVMIRROR_GROUP r=$LVMIRROR_RESULT t=${LVMIRROR_SPLIT_TIME:+set}" >> {log}'


def _states(d, name):
    return [im["state"] for im in d.status()["volumes"][name]["images"]]


def test_hooks_run_in_order_around_a_split_with_what_they_need_to_know(gw):
    d, hooks, logf = gw
    _hook(hooks, "20-second", LOGGER.replace("{log}", str(logf)))
    _hook(hooks, "10-first", LOGGER.replace("{log}", str(logf)) + "\necho frozen")
    _hook(hooks, "30-skipped.dpkg-old", "echo never >> " + str(logf))     # not a hook name
    (hooks / "40-not-executable").write_text("#!/bin/sh\necho never >> " + str(logf))
    res = d.split("va", 1)
    assert _states(d, "va") == ["in-sync", "split"]
    lines = logf.read_text().splitlines()
    assert lines == [
        "10-first pre-split pre-split [va] [va:1] g=0 r= t=",
        "20-second pre-split pre-split [va] [va:1] g=0 r= t=",
        "10-first post-split post-split [va] [va:1] g=0 r=ok t=set",
        "20-second post-split post-split [va] [va:1] g=0 r=ok t=set"]
    assert [(os.path.basename(h["hook"]), h["phase"], h["status"], h["error"])
            for h in res["hooks"]] == [("10-first", "pre-split", 0, None),
                                       ("20-second", "pre-split", 0, None),
                                       ("10-first", "post-split", 0, None),
                                       ("20-second", "post-split", 0, None)]
    assert res["hooks"][0]["output"] == "frozen\n"


def test_a_failing_pre_split_hook_aborts_the_split_and_the_thaw_still_runs(gw):
    d, hooks, logf = gw
    _hook(hooks, "10-freeze", LOGGER.replace("{log}", str(logf)) +
          '\n[ "$1" = pre-split ] && { echo "fsfreeze: /mnt/db: not mounted" >&2; exit 3; }'
          '\nexit 0')
    with pytest.raises(HookError, match=r"split not done: pre-split hook 10-freeze: exit status "
                                        r"3: fsfreeze: /mnt/db: not mounted"):
        d.split("va", 1)
    assert _states(d, "va") == ["in-sync", "in-sync"]
    assert logf.read_text().splitlines()[-1].startswith(
        "10-freeze post-split post-split [va] [va:1] g=0 r=failed: pre-split hook")
    res = d.split("va", 1, {"on_hook_error": "continue"})       # the policy: go on
    assert _states(d, "va") == ["in-sync", "split"]
    assert res["hooks"][0]["error"].startswith("exit status 3")
    d.resync("va", 1)
    d.registry.get("va").jobs[1].wait(20)
    res = d.split("va", 1, {"hooks": False})                    # or run none
    assert res["hooks"] == [] and _states(d, "va") == ["in-sync", "split"]


def test_a_hook_past_its_timeout_is_killed_with_what_it_started(gw, tmp_path):
    d, hooks, logf = gw
    pidfile = tmp_path / "child.pid"
    _hook(hooks, "10-hang", f'sleep 60 & echo $! > {pidfile}; wait')
    t0 = time.monotonic()
    with pytest.raises(HookError, match="still running after 0.5 s: killed"):
        d.split("va", 1, {"hook_timeout": 0.5})
    assert time.monotonic() - t0 < 10          # pre 0.5 s, post 0.5 s: not the sleep's 60
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not os.path.exists(f"/proc/{child}") or \
        open(f"/proc/{child}/stat").read().split()[2] == "Z"
    assert _states(d, "va") == ["in-sync", "in-sync"]


def test_a_group_runs_its_hooks_once_around_every_member(gw):
    d, hooks, logf = gw
    _hook(hooks, "10-log", LOGGER.replace("{log}", str(logf)))
    res = d.split_group(["va:1", "vb:1"])
    assert [m["volume"] for m in res["members"]] == ["va", "vb"]
    assert logf.read_text().splitlines() == [
        "10-log pre-split pre-split [va vb] [va:1 vb:1] g=1 r= t=",
        "10-log post-split post-split [va vb] [va:1 vb:1] g=1 r=ok t=set"]
    with pytest.raises(ConfigError, match="no volume 'nope'"):
        d.split_group(["va:0", "nope:1"])
    assert len(logf.read_text().splitlines()) == 2      # no hook ran for a bad group


def test_hook_options_are_checked():
    assert hook_options(None) == dict(hooks=True, hook_timeout=30.0, on_hook_error="abort")
    for bad, msg in (({"hook_timeout": 0}, "hook_timeout"), ({"hook_timeout": "x"}, "hook_"),
                     ({"on_hook_error": "retry"}, "on_hook_error"), ({"hookz": 1}, "unknown")):
        with pytest.raises(ConfigError, match=msg):
            hook_options(bad)
    assert SplitHooks("/nonexistent/hooks.d").programs() == []


def test_cli_and_dbus_split_with_hooks_and_group(tmp_path, system_bus):  # noqa: F811
    hooks = tmp_path / "hooks.d"
    hooks.mkdir()
    logf = tmp_path / "hooks.log"
    _hook(hooks, "10-log", LOGGER.replace("{log}", str(logf)) +
          '\n[ "$1" = pre-split ] && [ -e ' + str(tmp_path / "fail") + ' ] && '
          '{ echo "cannot freeze"; exit 1; }\nexit 0')
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False, hooks_dir=str(hooks))
    vols = open_volumes(d, tmp_path, ("va", "vb"))
    from lvmirror.bus import BusService
    bus = BusService(d, bus_address=system_bus)
    bus.start()
    try:
        r = cli(system_bus, "split-group", "va:1", "vb:1")
        assert r.returncode == 0, r.stderr
        assert "consistency group split at" in r.stdout and "hook 10-log pre-split: ok" in \
            r.stdout, r.stdout
        r = cli(system_bus, "--json", "restore-group", "va:1", "vb:1", "--wait")
        assert r.returncode == 0, r.stderr
        assert [m["volume"] for m in json.loads(r.stdout)["members"]] == ["va", "vb"]
        r = cli(system_bus, "resync", "va", "1", "--wait")
        assert r.returncode == 0, r.stderr
        (tmp_path / "fail").write_text("")
        r = cli(system_bus, "split", "va", "1")
        assert r.returncode == 1 and "pre-split hook 10-log: exit status 1: cannot freeze" \
            in r.stderr, r.stderr
        r = cli(system_bus, "--json", "split", "va", "1", "--on-hook-error", "continue",
                "--hook-timeout", "5")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["hooks"][0]["error"].startswith("exit status 1")
        r = cli(system_bus, "split-group", "vb:0", "vb:1")
        assert r.returncode == 2 or "named twice" in r.stderr
        r = cli(system_bus, "split-group", "va:x")
        assert r.returncode == 2 and "VOLUME:IMAGE" in r.stderr
    finally:
        bus.stop()
        for spec, _ in vols.values():
            d.registry.release(spec)


def test_a_hook_that_leaves_a_process_behind_is_done_when_it_exits(gw, tmp_path):
    """ssh -f, or a daemon a hook starts, keeps the hook's output open: the split must not
    wait for it, nor take the hook for hung."""
    d, hooks, logf = gw
    _hook(hooks, "10-detach", "echo started; sleep 15 & setsid sleep 15 & exit 0")
    t0 = time.monotonic()
    res = d.split("va", 1, {"hook_timeout": 3})
    assert time.monotonic() - t0 < 3
    assert [h["error"] for h in res["hooks"]] == [None, None]
    assert res["hooks"][0]["output"] == "started\n"
    assert _states(d, "va") == ["in-sync", "split"]
