"""The kernel lab session: boot Debian's kernel with LIO once (lab/boot), run lab/guest.sh inside,
and hand its results to the tests; host-side initiators (libiscsi) talk to the guest's portal
through the 127.0.0.1 forward while it runs. The systemd section boots a guest of its own
(lab/boot --systemd), the powercut section a chain of guests cut by SIGKILL of QEMU
(lab/powercut): one fixture per boot run.

Plain ``pytest`` on a host without the lab (no virtme-ng or no linux-image-amd64) skips these
tests with the reason; ``tools/test`` sets LVMIRROR_LAB_REQUIRED=1, which turns that into an
error so CI cannot pass without the kernel proving the product."""

import glob
import json
import os
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.environ.get("LAB_OUT", os.path.join(ROOT, "lab-out"))
PORT = int(os.environ.get("LAB_PORT", "13260"))
IQN = "iqn.2026-11.org.lvmirror:lab"
# the systemd section boots on its own (lab/boot --systemd: systemd as PID 1) into its own output
SYSTEMD_OUT = os.environ.get("LAB_OUT_SYSTEMD", os.path.join(ROOT, "lab-out-systemd"))
# the power-cut chain boots on its own too (lab/powercut: one boot per moment, QEMU killed)
POWERCUT_OUT = os.environ.get("LAB_OUT_POWERCUT", os.path.join(ROOT, "lab-out-powercut"))
# (not among them, for CI's hour: compliance, libiscsi's whole SCSI suite against lvmirror
# and fileio, 6 to 9 minutes, which lab/compliance runs; tcmurunner, lvmirrord registered
# with Debian's tcmu-runner, about a minute, which LVMIRROR_LAB_SECTIONS="basic tcmurunner"
# runs; since 2026-12-05, when the guest slowed to 56 minutes for a whole CI run, also scrub,
# 4 to 5 minutes of the plain boot, and ocf, about 4 minutes: their own command is
# LVMIRROR_LAB_SECTIONS="basic scrub ocf" tools/lab-test, and tests/unit has both)
DEFAULT_SECTIONS = ("basic fs split group metrics crash dbus alua saveconfig lease systemd powercut "
                    "faults")
# sections that are not part of the plain lab boot (faults: tests/lab/test_faults.py)
OWN_BOOT = ("systemd", "powercut", "faults")
# the power-cut moments CI cuts (lab/powercut --moments): a split under the writer, 2 boots,
# to keep CI within its hour (tests/unit/test_volume_powerloss.py cuts after every metadata
# save on the host, the write-intent checkpoints among them); lab/powercut alone cuts all six
# (steady writes, resync, restore, checkpoint and attach too) and lab/soak runs chains of them
PC_MOMENTS = os.environ.get("LVMIRROR_PC_MOMENTS", "split").split()


def _sections():
    return os.environ.get("LVMIRROR_LAB_SECTIONS", DEFAULT_SECTIONS).split()


def _results(out):
    results = {}
    path = os.path.join(out, "results.jsonl")
    if os.path.exists(path):
        for line in open(path):
            d = json.loads(line)
            results[d["check"]] = d
    return results


def _lab_missing():
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "vng")):
        return "virtme-ng is not installed (tools/bootstrap installs it)"
    if not any(n.startswith("vmlinuz-") and n.endswith("-amd64") for n in os.listdir("/boot")):
        return "Debian's linux-image-amd64 is not installed"
    if shutil.which("iscsi-inq") is None:
        return "libiscsi-bin is not installed"
    return None


def _host_side(results):
    """Initiator on the host (a remote host for the target): libiscsi through the forward."""
    url = f"iscsi://127.0.0.1:{PORT}/{IQN}"
    r = subprocess.run(["iscsi-inq", f"{url}/0"], capture_output=True, text=True, timeout=60)
    results["host_iscsi_inq"] = {"ok": r.returncode == 0 and "lvmirror" in r.stdout,
                                 "out": r.stdout[-500:] + r.stderr[-500:]}
    r = subprocess.run(["iscsi-readcapacity16", f"{url}/1"], capture_output=True, text=True,
                       timeout=60)
    results["host_readcapacity16"] = {"ok": r.returncode == 0 and "268435456" in r.stdout,
                                      "out": r.stdout[-500:] + r.stderr[-500:]}
    r = subprocess.run(["iscsi-test-cu", "-s", "-t", "SCSI.Read10", f"{url}/0"],
                       capture_output=True, text=True, timeout=300)
    results["host_compliance_read10"] = {"ok": r.returncode == 0,
                                         "out": r.stdout[-800:] + r.stderr[-300:]}


def _require_lab():
    missing = _lab_missing()
    if missing:
        if os.environ.get("LVMIRROR_LAB_REQUIRED") == "1":
            pytest.fail(f"kernel lab required but unavailable: {missing}")
        pytest.skip(f"kernel lab unavailable: {missing}")


@pytest.fixture(scope="session")
def lab():
    _require_lab()
    sections = [s for s in _sections() if s not in OWN_BOOT]
    if not sections:
        pytest.skip("no section of the plain lab boot selected (LVMIRROR_LAB_SECTIONS)")
    env = dict(os.environ, LAB_OUT=OUT, LAB_PORT=str(PORT), LAB_HOST_SIDE="1")
    for stale in ("target-ready", "host-done"):    # a previous run's, before lab/boot clears it
        try:
            os.unlink(os.path.join(OUT, stale))
        except FileNotFoundError:
            pass
    t0 = time.monotonic()
    proc = subprocess.Popen([os.path.join(ROOT, "lab", "boot"), *sections], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    host = {}
    ready = os.path.join(OUT, "target-ready")
    while proc.poll() is None:
        if os.path.exists(ready) and not host:
            try:
                _host_side(host)
            except subprocess.TimeoutExpired as e:
                host["host_side"] = {"ok": False, "out": f"timeout: {e}"}
            finally:    # the guest waits for this before its next sections (basic.sh)
                open(os.path.join(OUT, "host-done"), "w").close()
        time.sleep(1)
    out = proc.stdout.read()
    elapsed = time.monotonic() - t0
    print(f"\nkernel lab: {elapsed:.0f} s wall, sections {sections}\n{out}")
    results = _results(OUT)
    results.update({k: dict(v, check=k) for k, v in host.items()})
    if proc.returncode != 0 or not results:
        pytest.fail(f"the kernel lab did not run (rc={proc.returncode}):\n{out[-3000:]}")
    return {"results": results, "out": OUT, "sections": sections, "elapsed": elapsed}


def _run_boot(argv, out, port, label):
    """Run one lab boot command (``argv`` under ROOT, e.g. ["lab/boot", "faults"]) with its own
    output directory ``out`` and portal ``port``; print its wall time and output; fail the test
    session when it did not run. Returns {"results", "out", "elapsed" (s)}."""
    env = dict(os.environ, LAB_OUT=out, LAB_PORT=str(port))
    t0 = time.monotonic()
    proc = subprocess.run([os.path.join(ROOT, argv[0]), *argv[1:]], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.monotonic() - t0
    print(f"\nkernel lab ({label}): {elapsed:.0f} s wall\n{proc.stdout}")
    results = _results(out)
    if proc.returncode != 0 or not results:
        pytest.fail(f"the {label} lab did not run (rc={proc.returncode}):\n{proc.stdout[-3000:]}")
    return {"results": results, "out": out, "elapsed": elapsed}


@pytest.fixture(scope="session")
def systemd_lab():
    """The packaged lvmirrord.service in a guest whose PID 1 is systemd (lab/boot --systemd):
    installed and started by dpkg, restarted after SIGKILL, stopped, D-Bus-activated."""
    _require_lab()
    if "systemd" not in _sections():
        pytest.skip("section systemd not run (LVMIRROR_LAB_SECTIONS)")
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not glob.glob(os.path.join(ROOT, "build", "deb", f"lvmirror_*_{arch}.deb")):
        if os.environ.get("LVMIRROR_EXPECT_PACKAGE") == "1":
            pytest.fail("tools/build-deb ran but build/deb holds no package")
        pytest.skip("the systemd section installs the Debian package: run tools/build-deb first")
    return _run_boot(["lab/boot", "--systemd", "systemd"], SYSTEMD_OUT, PORT,
                     "systemd as PID 1")


@pytest.fixture(scope="session")
def powercut_lab():
    """The power-cut chain (lab/powercut): the guest's power cut by SIGKILL of QEMU at each
    moment of PC_MOMENTS once (LVMIRROR_PC_MOMENTS; all six: steady writes, split, resync,
    restore, write-intent checkpoint, attach), each following boot recovering unattended from
    the disk and checking what was kept."""
    _require_lab()
    if "powercut" not in _sections():
        pytest.skip("section powercut not run (LVMIRROR_LAB_SECTIONS)")
    if not PC_MOMENTS:
        pytest.fail("LVMIRROR_PC_MOMENTS names no moment (unset it for CI's: split)")
    run = _run_boot(["lab/powercut", "--moments", " ".join(PC_MOMENTS)], POWERCUT_OUT, PORT,
                    "power cuts")
    summary = {}
    path = os.path.join(POWERCUT_OUT, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    return dict(run, summary=summary)
