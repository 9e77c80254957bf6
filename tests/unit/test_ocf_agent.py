"""ocf:lvmirror:LogicalUnit, run as Pacemaker runs it (a process with OCF_RESKEY_* in its
environment), for what needs no kernel target: its meta-data against resource-agents' OCF DTD,
validate-all's exit codes and reasons, and the probe of a stopped resource. The kernel lab runs
ocf-tester and the start/stop/monitor cycle against LIO (section ocf)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AGENT = os.path.join(ROOT, "ha", "LogicalUnit")
OCF_ROOT = "/usr/lib/ocf"
DTD_DIR = "/usr/share/resource-agents"

pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(OCF_ROOT, "lib", "heartbeat", "ocf.py")),
    reason="resource-agents is not installed (tools/bootstrap installs it with the lab packages)")

GOOD = dict(name="vol1", cfgstring="vol1;images=/srv/a.img+/srv/b.img", size="1G",
            target_iqn="iqn.2026-11.org.lvmirror:ha", lun="0")


def agent(action, **params):
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/sbin:/usr/bin:/sbin:/bin",
           "PYTHONPATH": ROOT, "OCF_ROOT": OCF_ROOT, "OCF_RESOURCE_INSTANCE": "lun-test",
           "__OCF_ACTION": action}
    env.update({k if k.startswith("OCF_") else f"OCF_RESKEY_{k}": v for k, v in params.items()})
    return subprocess.run([AGENT, action], env=env, capture_output=True, text=True, timeout=60)


def test_meta_data_conforms_to_the_ocf_dtd():
    r = agent("meta-data")
    assert r.returncode == 0 and "<resource-agent name=\"LogicalUnit\"" in r.stdout
    for name in ("name", "cfgstring", "size", "target_iqn", "lun", "alua_group", "peer_tpg"):
        assert f'<parameter name="{name}"' in r.stdout
    if shutil.which("xmllint") and os.path.exists(os.path.join(DTD_DIR, "ra-api-1.dtd")):
        lint = subprocess.run(["xmllint", "--noout", "--valid", "-"], input=r.stdout, text=True,
                              cwd=DTD_DIR, capture_output=True)
        assert lint.returncode == 0, lint.stderr


def test_validate_all_accepts_a_good_configuration():
    r = agent("validate-all", **GOOD)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("change,reason", [
    (dict(cfgstring="vol1;images=/a.img;region_size=3"), "region_size must be a power of two"),
    (dict(cfgstring="vol1;image=1"), "split image"),
    (dict(size="12X"), "size '12X': a positive number of bytes"),
    (dict(size="0"), "size '0': a positive number"),
    (dict(target_iqn="target1"), "not an iSCSI name"),
    (dict(alua_group="gwa"), "alua_group and alua_group_id go together"),
    (dict(alua_group="gwa", alua_group_id="70000"), "1 to 65535"),
    (dict(peer_tpg="2", peer_alua_group="gwb", peer_alua_group_id="2"),
     "peer_alua_group needs alua_group"),
    (dict(alua_group="gwa", alua_group_id="1", peer_tpg="1", peer_alua_group="gwb",
          peer_alua_group_id="2"), "peer_tpg must differ from tpg"),
    (dict(alua_group="ao", alua_group_id="1", peer_tpg="2", peer_alua_group="ao",
          peer_alua_group_id="1"), "must differ from alua_group's"),
    (dict(alua_group="gwa", alua_group_id="2", peer_tpg="2", peer_alua_group="gwb",
          peer_alua_group_id="2"), "must differ from alua_group's"),
    (dict(serve_timeout="40s"), "serve_timeout must be a number of seconds"),
    (dict(serve_timeout="-5"), "serve_timeout must be a number of seconds"),
    (dict(cfgstring="lvmirror/vol1;images=/a.img+/b.img"), "without the lvmirror/ prefix"),
])
def test_validate_all_refuses_with_the_reason(change, reason):
    r = agent("validate-all", **{**GOOD, **change})
    assert r.returncode == 6, (r.returncode, r.stderr)          # OCF_ERR_CONFIGURED
    assert "ocf-exit-reason:" in r.stderr and reason in r.stderr, r.stderr


def test_a_missing_required_parameter_is_not_configured():
    params = dict(GOOD)
    del params["cfgstring"]
    r = agent("validate-all", **params)
    assert r.returncode == 6 and "cfgstring: Required parameter not set" in r.stderr


def test_probe_of_a_stopped_resource_is_not_running():
    """The first probe (monitor, interval 0) on a node without the backstore says 7, even where
    LIO is not loaded (this host: no configfs target), as ocf-tester requires."""
    r = agent("monitor", **GOOD)
    assert r.returncode == 7, r.stderr


def test_start_without_lio_is_not_installed():
    """This host has no LIO: start says so (5) with the reason, instead of an rtslib error."""
    r = agent("start", **GOOD)
    assert r.returncode == 5 and "LIO is not available" in r.stderr, r.stderr


def test_unknown_action_is_unimplemented():
    assert agent("migrate_to", **GOOD).returncode == 3


def _load_agent(monkeypatch):
    """The agent as a module (its functions, without running main)."""
    import importlib.machinery
    import importlib.util
    monkeypatch.syspath_prepend(os.path.join(OCF_ROOT, "lib", "heartbeat"))
    monkeypatch.setenv("OCF_ROOT", OCF_ROOT)
    loader = importlib.machinery.SourceFileLoader("lvmirror_ocf_agent", AGENT)
    spec = importlib.util.spec_from_loader("lvmirror_ocf_agent", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_status_timeout_follows_the_operation_timeout(monkeypatch):
    """lvmirror status may take three quarters of the action's own timeout (Pacemaker's
    OCF_RESKEY_CRM_meta_timeout, ms): a fixed 15 s failed the monitor of a busy gateway in the
    two-gateway lab, and Pacemaker restarted a LUN that was serving."""
    mod = _load_agent(monkeypatch)
    monkeypatch.delenv("OCF_RESKEY_CRM_meta_timeout", raising=False)
    assert mod.status_timeout() == 15.0
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_timeout", "120000")
    assert mod.status_timeout() == 90.0
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_timeout", "10000")
    assert mod.status_timeout() == 15.0
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_timeout", "soon")
    assert mod.status_timeout() == 15.0
    for v in ("inf", "1e309", "nan", "-5000"):
        monkeypatch.setenv("OCF_RESKEY_CRM_meta_timeout", v)
        assert mod.status_timeout() == 15.0
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_timeout", "1e15")
    assert mod.status_timeout() == 3600.0


def test_stop_does_not_take_a_busy_lvmirrord_for_a_stopped_one(monkeypatch):
    """stop waits while lvmirror status times out (lvmirrord runs, busy, and may still serve
    the LUN): it used to return success at the first timeout, and Pacemaker would then unmount
    the volume's state and start it elsewhere. It fails with the reason at serve_timeout, and
    succeeds once lvmirrord answers that it no longer serves the LUN."""
    import subprocess as sp
    mod = _load_agent(monkeypatch)
    monkeypatch.setattr(mod, "UserBackedStorageObject", object)
    monkeypatch.setattr(mod.os.path, "isdir", lambda p: True)
    monkeypatch.setattr(mod, "find_storage_object", lambda name: None)
    monkeypatch.setattr(mod.time, "sleep", lambda s: None)
    answers = []

    def status():
        if answers:
            return answers.pop(0)
        raise sp.TimeoutExpired(["lvmirror"], 15)
    monkeypatch.setattr(mod, "lvmirror_status", status)
    reasons = []
    monkeypatch.setattr(mod.ocf, "ocf_exit_reason", reasons.append)
    assert mod.stop("lun0", "iqn.x", 0, 1, "0") == mod.ocf.OCF_ERR_GENERIC
    assert "still serves lun0" in reasons[-1]
    answers[:] = [{"luns": [{"name": "lun0"}]}, {"luns": []}]
    assert mod.stop("lun0", "iqn.x", 0, 1, "30") == mod.ocf.OCF_SUCCESS
    assert answers == []
    # the CLI's own D-Bus timeout (25 s, exit 3) while lvmirrord runs: still not stopped
    def no_reply():
        raise sp.CalledProcessError(3, ["lvmirror"])
    monkeypatch.setattr(mod, "lvmirror_status", no_reply)
    monkeypatch.setattr(mod, "lvmirrord_running", lambda: True)
    assert mod.stop("lun0", "iqn.x", 0, 1, "0") == mod.ocf.OCF_ERR_GENERIC
    monkeypatch.setattr(mod, "lvmirrord_running", lambda: False)
    assert mod.stop("lun0", "iqn.x", 0, 1, "0") == mod.ocf.OCF_SUCCESS


def test_lvmirrord_running_reads_proc(tmp_path, monkeypatch):
    mod = _load_agent(monkeypatch)
    for pid, comm in (("1", "systemd"), ("42", "lvmirrord"), ("self", "x")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "comm").write_text(comm + "\n")
    assert mod.lvmirrord_running(str(tmp_path))
    (tmp_path / "42" / "comm").write_text("lvmirror\n")
    assert not mod.lvmirrord_running(str(tmp_path))
    # a name cut at 15 bytes inside a character (a trial: UnicodeDecodeError out of stop,
    # which Pacemaker answers by fencing the node)
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "comm").write_bytes("データベースx".encode()[:14] + b"\n")
    assert not mod.lvmirrord_running(str(tmp_path))
    (tmp_path / "42" / "comm").write_text("lvmirrord\n")
    assert mod.lvmirrord_running(str(tmp_path))


def test_meta_data_offers_a_promotable_clone():
    """promote and demote, and a monitor per role with distinct intervals (Pacemaker refuses
    two recurring monitors with one interval)."""
    r = agent("meta-data")
    assert r.returncode == 0
    for action in ('name="promote"', 'name="demote"', 'role="Promoted"', 'role="Unpromoted"'):
        assert action in r.stdout
    intervals = [line.split('interval="')[1].split('"')[0] for line in r.stdout.splitlines()
                 if 'name="monitor"' in line]
    assert len(intervals) == 3 and len(set(intervals)) == 3


def test_promote_and_demote_without_a_backstore():
    """Where no backstore exists (here: no LIO at all), demote says "not running" (7) and
    promote fails (1) with the reason, as a promotable clone's actions must."""
    if os.path.isdir("/sys/kernel/config/target"):
        pytest.skip("this host has LIO: the lab's ocf section covers it")
    r = agent("demote", **GOOD)
    assert r.returncode == 7, r.stderr
    r = agent("promote", **GOOD, OCF_RESKEY_CRM_meta_promotable="true")
    assert r.returncode == 1 and "not started on this node" in r.stderr, r.stderr


@pytest.mark.parametrize("env, want", [
    # gwb promoted: on gwa, after the promote, gwb's group is Active/Optimized
    ({"type": "post", "operation": "promote", "promote": "gwb", "promoted": ""}, 0),
    ({"type": "post", "operation": "promote", "promote": "gwb", "master": ""}, 0),
    # a planned move gwa -> gwb, seen on gwa: after the demote (gwb's promote still to come,
    # though listed) the peer is Standby; after the promote, Active/Optimized
    ({"type": "post", "operation": "demote", "demote": "gwa", "promote": "gwb",
      "promoted": "gwa"}, 2),
    ({"type": "post", "operation": "promote", "demote": "gwa", "promote": "gwb",
      "promoted": "gwa"}, 0),
    # gwb demoted: Standby here
    ({"type": "post", "operation": "demote", "demote": "gwb", "promoted": "gwb"}, 2),
    # gwa itself promoted: the peer stays Standby
    ({"type": "post", "operation": "promote", "promote": "gwa", "promoted": ""}, 2),
    # a start of gwa while gwb is promoted: gwb's group Active/Optimized here
    ({"type": "post", "operation": "start", "start": "gwa", "promoted": "gwb"}, 0),
    # gwb's promoted instance recovered in place (demote, stop, start, promote on gwb): Standby
    # after its demote, stop and start, Active/Optimized again after its promote
    ({"type": "post", "operation": "demote", "demote": "gwb", "stop": "gwb", "start": "gwb",
      "promote": "gwb", "promoted": "gwb"}, 2),
    ({"type": "post", "operation": "start", "demote": "gwb", "stop": "gwb", "start": "gwb",
      "promote": "gwb", "promoted": "gwb"}, 2),
    ({"type": "post", "operation": "promote", "demote": "gwb", "stop": "gwb", "start": "gwb",
      "promote": "gwb", "promoted": "gwb"}, 0),
])
def test_notify_sets_the_peer_group_to_the_peer_role(monkeypatch, env, want):
    """Post notifications set the peer's ALUA group on this node (gwa) to Active/Optimized
    (0) while the peer holds the promoted instance and Standby (2) otherwise."""
    mod = _load_agent(monkeypatch)
    calls = []
    monkeypatch.setattr(mod, "_set_state", lambda n, g, st: calls.append((n, g, st)) or 0)
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_on_node", "gwa")
    for k, v in env.items():
        key = "type" if k == "type" else ("operation" if k == "operation" else f"{k}_uname")
        monkeypatch.setenv(f"OCF_RESKEY_CRM_meta_notify_{key}", v)
    assert mod.notify("lun0", "gwb") == 0
    assert calls == [("lun0", "gwb", want)]


def test_notify_pre_or_without_a_peer_group_changes_nothing(monkeypatch):
    """Pre notifications, no peer group, no operation or no node lists at all: nothing set."""
    mod = _load_agent(monkeypatch)
    calls = []
    monkeypatch.setattr(mod, "_set_state", lambda *a: calls.append(a) or 0)
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_notify_type", "post")
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_notify_operation", "promote")
    assert mod.notify("lun0", "gwb") == 0           # post, but no *_uname variable at all
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_notify_operation", "monitor")
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_notify_promote_uname", "gwb")
    assert mod.notify("lun0", "gwb") == 0           # not an operation notifications are for
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_notify_operation", "promote")
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_notify_type", "pre")
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_notify_promote_uname", "gwb")
    assert mod.notify("lun0", "gwb") == 0
    monkeypatch.setenv("OCF_RESKEY_CRM_meta_notify_type", "post")
    assert mod.notify("lun0", "") == 0
    assert calls == []
    # no backstore on this node (7 from _set_state): nothing to set, still success
    monkeypatch.setattr(mod, "_set_state", lambda *a: 7)
    assert mod.notify("lun0", "gwb") == 0


@pytest.mark.parametrize("env, want", [
    ({"promotable": "true"}, True),
    ({"promoted_max": "1"}, True),      # what Pacemaker 2.1 passes to a clone instance
    ({"master_max": "1"}, True),        # older Pacemaker
    ({"promoted_max": "0"}, False),
    ({"clone_max": "2"}, False),        # a plain clone
    ({}, False),
])
def test_promotable_as_pacemaker_says_it(monkeypatch, env, want):
    """As resource-agents' ocf_is_ms: promotable=true, or a promoted_max/master_max above 0
    (Pacemaker 2.1.5 gave the lab's promotable clone no CRM_meta_promotable, and its start
    mapped the LUN Active/Optimized on both gateways)."""
    mod = _load_agent(monkeypatch)
    for k in ("promotable", "promoted_max", "master_max", "clone_max"):
        monkeypatch.delenv(f"OCF_RESKEY_CRM_meta_{k}", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(f"OCF_RESKEY_CRM_meta_{k}", v)
    assert mod.promotable() is want
