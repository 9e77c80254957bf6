"""What only the kernel can prove, asserted on the results of one kernel-lab session (conftest):
the real TCMU ring, netlink, targetcli, the iSCSI target, open-iscsi and libiscsi initiators."""

import glob
import os
import re

import pytest

from .conftest import PC_MOMENTS

pytestmark = pytest.mark.lab

SECTION_CHECKS = {
    "basic": ["daemon_started", "targetcli_lists_user_lvmirror", "targetcli_refuses_bad_cfgstring",
              "luns_created", "device_named_not_utf8_shown", "libiscsi_inquiry", "libiscsi_readcapacity", "open_iscsi_login",
              "dd_write_readback", "compiled_reads_on_the_kernel_ring",
              "compiled_large_reads_on_the_kernel_ring", "unit_serial_as_configured",
              "persistent_reservation", "compiled_writes_on_the_kernel_ring",
              "compiled_mirror_writes_on_the_kernel_ring",
              "large_writes_compiled", "compiled_random_writes_verified",
              "host_iscsi_inq",
              "host_readcapacity16", "host_compliance_read10"],
    "fs": ["fs_lun0_written", "fs_lun1_written", "fs_lun0_fsck_clean", "fs_lun0_files_intact", "fs_lun0_images_identical",
           "fs_lun1_fsck_clean", "fs_lun1_files_intact", "fs_lun1_images_identical"],
    "split": ["split_command", "split_point_in_time", "three_way_split_stays_mirrored",
              "split_image_lun_mounts_fsck_clean", "resync_refused_while_exported",
              "fio_verify_through_resync_and_split", "targetcli_ext_split",
              "targetcli_ext_status", "backup_of_split_image", "resync_images_identical"],
    "group": ["group_postgres_on_two_luns", "group_split", "group_copies_recover",
              "group_copies_pg_amcheck_clean", "group_copies_pgbench_invariant",
              "group_sequential_splits_break_postgres",
              "group_restore_rolls_back_both", "hooks_ran_around_split",
              "hooks_frozen_copy_clean_without_replay", "hooks_failing_pre_hook_aborts_split",
              "backup_cycle_group"],
    "scrub": ["scrub_finds_exact_region", "scrub_under_load_fio_verify_ok",
              "scrub_check_changes_nothing", "scrub_majority_repairs_odd_image",
              "scrub_images_identical_after_repair", "scrub_two_images_names_both_candidates",
              "scrub_two_images_repair_from_source", "scrub_dbus_signals_and_property",
              "scrub_resumes_after_sigkill"],
    "metrics": ["metrics_node_exporter_serves_lvmirror", "metrics_failed_image_shown",
                "metrics_recovery_shown", "metrics_cli_prints_them"],
    "crash": ["daemon_restarted", "sigkill_fio_verify_ok", "sigkill_images_agree"],
    "dbus": ["busctl_shows_volume_objects", "unprivileged_reads_status", "unprivileged_change_refused",
             "external_lock_blocks_initiator_io", "lock_released_when_holder_leaves"],
    "alua": ["alua_tpgs_in_inquiry", "alua_vpd83_port_designators_as_fileio",
             "alua_rtpg_default_group_as_fileio", "alua_vpd83_names_local_group",
             "alua_rtpg_two_gateway_groups", "alua_standby_closes_volume",
             "alua_standby_refuses_medium_access", "alua_active_reopens_volume",
             "alua_active_again_and_no_stpg"],
    "ocf": ["ocf_tester_clean", "ocf_start_serves_with_alua_groups",
            "ocf_stop_leaves_nothing_served", "ocf_promotable_clone",
            "ocf_bad_parameters_refused"],
    "saveconfig": ["saveconfig_keeps_nl_reply_supported", "restoreconfig_brings_luns_back"],
    "lease": ["lease_area_initialised", "lease_volume_served_under_lease",
              "lease_held_elsewhere_refused", "lease_taken_once_released",
              "lease_lost_stops_serving", "lease_4k_native_area"],
    "tcmurunner": ["lvmirrord_registers_with_tcmu_runner", "targetcli_through_tcmu_runner",
                   "reregisters_when_tcmu_runner_restarts"],
}
ALL = [(s, c) for s, checks in SECTION_CHECKS.items() for c in checks]
# lab/boot --systemd: the packaged unit with systemd as PID 1 (conftest's systemd_lab)
SYSTEMD_CHECKS = ["systemd_is_pid1", "service_started_by_package", "service_serves_lun_under_hardening",
                  "service_restarted_after_sigkill", "service_stops_cleanly", "service_dbus_activated",
                  "backup_timer_service", "backup_timer_failure_shown",
                  "backup_timer_missing_config_fails",
                  "scrub_timer_service", "scrub_timer_mismatch_shown",
                  "metrics_unit_served_by_node_exporter"]

# lab/powercut: the guest's power cut (SIGKILL of QEMU) at each moment, then the next boot on the
# same disk recovers unattended and checks (conftest's powercut_lab). pc_cut_M: the host cut the
# power once the guest had reached moment M; the others are the next boot's checks.
POWERCUT_CHECKS = [
    "pc_setup",
    "pc_cut_steady", "pc_recovered_after_steady", "pc_acked_writes_after_steady",
    "pc_images_identical_after_steady",
    "pc_cut_split", "pc_recovered_after_split", "pc_split_exact_after_split",
    "pc_acked_writes_after_split", "pc_images_identical_after_split",
    "pc_cut_resync", "pc_recovered_after_resync", "pc_acked_writes_after_resync",
    "pc_resync_completes_after_resync", "pc_images_identical_after_resync",
    "pc_cut_restore", "pc_recovered_after_restore", "pc_split_exact_after_restore",
    "pc_acked_writes_after_restore", "pc_restore_equals_split_after_restore",
    "pc_restore_completes_after_restore", "pc_images_identical_after_restore",
    "pc_cut_checkpoint", "pc_recovered_after_checkpoint", "pc_split_still_exact_after_checkpoint",
    "pc_acked_writes_after_checkpoint", "pc_images_identical_after_checkpoint",
    "pc_cut_attach", "pc_recovered_after_attach", "pc_split_still_exact_after_attach",
    "pc_acked_writes_after_attach", "pc_attach_completes_after_attach",
    "pc_attach_lun_serves_after_attach", "pc_images_identical_after_attach",
]


def _guest_tail(out, log, n=4):
    """The last ``n`` timeline and result lines (and any kernel panic or traceback line) of the
    guest logs matching ``log`` under ``out`` (glob; boot2 before boot10): where the guest got
    to, which is all CI shows of a boot that broke off. A log that cannot be read is named."""
    def natural(path):
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]
    lines = []
    for path in sorted(glob.glob(os.path.join(out, log)) if log else [], key=natural):
        try:
            with open(path, errors="replace") as f:
                lines += [f"{os.path.relpath(path, out)}: {line.rstrip()[:300]}" for line in f
                          if line.startswith(("[guest", "RESULT", "Traceback"))
                          or "Kernel panic" in line]
        except OSError as exc:
            lines.append(f"{os.path.relpath(path, out)}: cannot be read ({exc.strerror})")
    return "\n".join(lines[-n:]) if n > 0 and lines else "(no guest log)"


def _assert_check(run, check, log):
    """The guest reported CHECK in this lab run (lab or systemd_lab), and it passed."""
    res = run["results"].get(check)
    assert res is not None, (f"{check}: the guest never reported it (see {run['out']}/{log}); "
                             f"its log ends:\n{_guest_tail(run['out'], log)}")
    assert res["ok"], f"{check} failed: {res}"


def test_debian_package_installed_and_used(lab):
    """tools/test builds the .deb before the lab; the guest installs it and runs lvmirrord,
    lvmirror and targetcli-lvmirror from it, with its D-Bus policy."""
    res = lab["results"].get("package_installed")
    if res is None:
        if os.environ.get("LVMIRROR_EXPECT_PACKAGE") == "1":
            pytest.fail("tools/build-deb ran but the guest found no package in build/deb")
        pytest.skip("no Debian package was built before the lab (tools/build-deb)")
    assert res["ok"], res


# checks only LVMIRROR_LAB_EXTENDED=1 runs (comparisons CI's hour has no room for)
EXTENDED_CHECKS = ("group_sequential_splits_break_postgres",)


@pytest.mark.parametrize("section,check", ALL, ids=[c for _, c in ALL])
def test_lab_check(lab, section, check):
    if section not in lab["sections"]:
        pytest.skip(f"section {section} not run (LVMIRROR_LAB_SECTIONS)")
    if check in EXTENDED_CHECKS and os.environ.get("LVMIRROR_LAB_EXTENDED") != "1":
        pytest.skip(f"{check}: only with LVMIRROR_LAB_EXTENDED=1")
    _assert_check(lab, check, "guest.log")


def test_every_check_the_guest_reported_is_asserted(lab):
    """A RESULT line of a section that no list above names would pass CI unread, even "fail"
    (compiled_reads_on_the_kernel_ring did, from 2026-12-03 until this test): every check the
    guest reported in this run is one of SECTION_CHECKS, or the package's own."""
    known = {c for _, c in ALL} | {"package_installed"}
    unread = sorted(set(lab["results"]) - known)
    assert not unread, f"reported by the guest but asserted by no test: {unread}"


@pytest.mark.parametrize("check", SYSTEMD_CHECKS)
def test_systemd_service(systemd_lab, check):
    _assert_check(systemd_lab, check, "guest-console.log")


def _pc_selected(check):
    """Whether CHECK belongs to a moment this session cuts (conftest.PC_MOMENTS)."""
    if check == "pc_setup":
        return True
    moment = check[len("pc_cut_"):] if check.startswith("pc_cut_") else check.rsplit("_after_", 1)[1]
    return moment in PC_MOMENTS


@pytest.mark.parametrize("check", [c for c in POWERCUT_CHECKS if _pc_selected(c)])
def test_power_cut(powercut_lab, check):
    _assert_check(powercut_lab, check, "chain1/boot*/guest.log")


def test_power_cut_figures(powercut_lab):
    """Every moment was cut once, its acknowledged writes were read back (some were checked,
    none lost), and the figures add up with the checks (lab/powercut prints the table). After
    a restore only the writes made after it began must survive (the others are rolled back to
    the split copy), so there "checked" may be small."""
    moments = powercut_lab["summary"].get("moments", {})
    assert set(moments) == set(PC_MOMENTS), moments
    for name, m in moments.items():
        assert m["cuts"] == 1, (name, m)
        assert m["acked"] > 0 and m["acked"] >= m["checked"], (name, m)
        assert m["checked"] > 0 or name == "restore", (name, m)
        assert m["lost"] == 0 and m["lost_unknown"] == 0, (name, m)
        assert m["identical"] == m["checked_boots"] == 1, (name, m)


# libiscsi tests fileio passes that lvmirror may fail, each with the reason.
COMPLIANCE_ALLOW = {
    **{f"Reserve6.{t}": "SCSI-2 RESERVE/RELEASE is served by LIO's core for TCMU and fileio "
       "alike (never passed up to lvmirrord); these tests race the kernel's teardown of the "
       "previous test's session, whose reservation may still be held: they fail on both "
       "backends in most runs and on either one alone in some"
       for t in ("Logout", "ITNexusLoss")},
}

# Why a test libiscsi skips on an lvmirror LUN does not apply to it (compliance-table.md's last
# column): key "Suite" for the whole suite, "Suite.Test" for one test.
SKIP_REASONS = {
    "PreventAllow": "PREVENT ALLOW MEDIUM REMOVAL: removable media only (RMB=0, a disk)",
    "StartStopUnit.Simple": "the test needs removable media (LOEJ); START STOP UNIT itself passes",
    "ReadOnly.ReadOnlySBC": "runs only against a write-protected LUN (readonly=1 exports are "
                            "tested in the split section)",
    "Sanitize": "SANITIZE destroys every image; libiscsi runs it only with --allow-sanitize, "
                "and a mirror offers detach and a new image instead",
    "MultipathIO": "needs libiscsi's multipath mode (a second URL); the faults section runs "
                   "dm-multipath over the LUN instead",
    "OrWrite": "ORWRITE (SBC-3 bitwise OR) has no use on a disk LUN; LIO's fileio lacks it too",
    "WriteAtomic16": "WRITE ATOMIC(16) (SBC-4) is not offered: a mirrored write is atomic per "
                     "image only under the region lock, not across a power cut of every image",
    "ReadDefectData10": "READ DEFECT DATA: no grown defect list on file or block-device images",
    "ReadDefectData12": "READ DEFECT DATA: no grown defect list on file or block-device images",
    "Reserve6.TargetColdReset": "needs the COLD RESET task management function, which LIO's "
                                "iSCSI target does not implement",
    "Reserve6.TargetWarmReset": "needs the WARM RESET task management function, which LIO's "
                                "iSCSI target does not implement",
    "CompareAndWrite.InvalidDataOutSize": "needs more than one logical block per physical "
                                          "block (LBPPB >= 2); the LUN reports 1",
    "WriteSame10.InvalidDataOutSize": "needs LBPPB >= 2; the LUN reports 1",
    "WriteSame10.UnmapUnaligned": "needs LBPPB >= 2; the LUN reports 1",
    "WriteSame16.InvalidDataOutSize": "needs LBPPB >= 2; the LUN reports 1",
    "WriteSame16.UnmapUnaligned": "needs LBPPB >= 2; the LUN reports 1",
    "WriteSame10.ZeroBlocks": "WSNZ=1: the Block Limits page says a zero block count is "
                              "refused, as LIO's own backstores say",
    "WriteSame16.ZeroBlocks": "WSNZ=1: the Block Limits page says a zero block count is "
                              "refused, as LIO's own backstores say",
    "ExtendedCopy.Large": "runs only when OPERATING PARAMETERS lists segment descriptor type "
                          "0Ah; lvmirror's copy manager offers 02h (block to block) as LIO does",
}


# Why a test fails on an lvmirror LUN (and, for each, on LIO's fileio in the same boot too): the
# failure is the test's or the kernel's, not a command lvmirror answers wrongly. A failure on
# lvmirror with no reason here fails test_compliance_lvmirror_passes_what_fileio_passes.
FAIL_REASONS = {
    "CompareAndWrite.Simple": "the test's last step sends 256 blocks in the 8-bit NUMBER OF "
                              "LOGICAL BLOCKS field, i.e. 0, and expects INVALID FIELD IN CDB; "
                              "a zero-block COMPARE AND WRITE is no error (SBC-4 5.3), so GOOD "
                              "is right (every count from 2 to 255 is refused as it should be)",
    "CompareAndWrite.Miscompare": "the same 256-in-8-bits step as CompareAndWrite.Simple",
    "ReceiveCopyResults.CopyStatus": "COPY STATUS is not offered (nor VPD 8Fh, as in LIO): "
                                     "SPC-4 holds a copy's status per I_T nexus, which TCMU "
                                     "does not tell a handler, so another initiator could "
                                     "read it; the copy's status is EXTENDED COPY's own. "
                                     "libiscsi runs the test anyway and counts INVALID FIELD "
                                     "IN CDB as a failure",
    **COMPLIANCE_ALLOW,        # SCSI-2 RESERVE: the kernel's, racing its session teardown
}


def _skip_reason(test: str) -> str:
    return SKIP_REASONS.get(test) or SKIP_REASONS.get(test.split(".")[0]) or "?"


def _parse_cu(path):
    """iscsi-test-cu (CUnit basic mode) output -> {Suite.Test: 'passed'|'failed'|'skipped'}.

    A test starts at "Test: NAME ..." and ends with "passed" or "FAILED" at the end of a line;
    a passed test that printed [SKIPPED] was skipped."""
    out = {}
    suite = test = None
    skipped = False
    for raw in open(path, errors="replace"):
        line = raw.strip()
        m = re.match(r"Suite: (\S+)", line)
        if m:
            suite, test = m.group(1), None
            continue
        m = re.match(r"Test: (\S+) \.\.\.(.*)", line)
        if m:
            test, skipped = f"{suite}.{m.group(1)}", False
            line = m.group(2).strip()
        if test is None:
            continue
        if "[SKIPPED]" in line:
            skipped = True
        if line.endswith("passed") or line.endswith("FAILED"):
            out[test] = ("failed" if line.endswith("FAILED") else
                         "skipped" if skipped else "passed")
            test = None
    return out


def _counts(results) -> str:
    """"P passed, S skipped, F failed of N": CUnit counts a skipped test as passed, this does
    not (a test the target answered with ILLEGAL REQUEST / INVALID OPCODE is skipped)."""
    n = {k: sum(v == k for v in results.values()) for k in ("passed", "skipped", "failed")}
    return (f"{n['passed']} passed, {n['skipped']} skipped, {n['failed']} failed of "
            f"{len(results)}")


def test_compliance_lvmirror_passes_what_fileio_passes(lab):
    if "compliance" not in lab["sections"]:
        pytest.skip("section compliance not run")
    lv = _parse_cu(os.path.join(lab["out"], "compliance-lvmirror.txt"))
    fi = _parse_cu(os.path.join(lab["out"], "compliance-fileio.txt"))
    assert fi, "no fileio compliance results"
    table = ["| test | fileio | lvmirror | why lvmirror skips or fails it |",
             "|---|---|---|---|"]
    for t in sorted(set(lv) | set(fi)):
        why = _skip_reason(t) if lv.get(t) == "skipped" else \
            FAIL_REASONS.get(t, "?") if lv.get(t) == "failed" else ""
        table.append(f"| {t} | {fi.get(t, '-')} | {lv.get(t, '-')} | {why} |")
    summary = "; ".join(f"{name}: {_counts(res)}" for name, res in (("lvmirror", lv),
                                                                       ("fileio", fi)))
    with open(os.path.join(lab["out"], "compliance-table.md"), "w") as f:
        f.write(summary + "\n\n" + "\n".join(table) + "\n")
    print("\n" + summary)
    regressions = [t for t, v in fi.items() if v == "passed" and lv.get(t) != "passed"
                   and t not in COMPLIANCE_ALLOW]
    unexplained = [t for t, v in lv.items() if v == "skipped" and _skip_reason(t) == "?"]
    assert not unexplained, f"{summary}; skipped on lvmirror with no reason given in " \
        f"SKIP_REASONS: {unexplained}"
    unexplained = [t for t, v in lv.items() if v == "failed" and t not in FAIL_REASONS]
    assert not unexplained, f"{summary}; failed on lvmirror with no reason given in " \
        f"FAIL_REASONS: {unexplained}"
    assert not regressions, f"{summary}; passing on fileio but not on lvmirror: {regressions}"
