"""The kernel lab session: boot Debian's kernel with LIO once (lab/boot), run lab/guest.sh inside,
and hand its results to the tests; host-side initiators (libiscsi) talk to the guest's portal
through the 127.0.0.1 forward while it runs. The systemd section boots a guest of its own
(lab/boot --systemd), the powercut section a chain of guests cut by SIGKILL of QEMU
(lab/powercut): one fixture per boot run.

Plain ``pytest`` on a host without the lab (no virtme-ng or no linux-image-amd64) skips these
tests with the reason; ``tools/test`` sets LVMIRROR_LAB_REQUIRED=1, which turns that into an
error so CI cannot pass without the kernel proving the product.

The boots run in two lanes at once (LVMIRROR_LAB_JOBS, default 2: a TCG guest keeps about one
of this 2-core machine's cores busy): the plain lab boot in one, the faults boot, the systemd
boot and the power-cut chain after each other in the other, each on a portal of its own.
LVMIRROR_LAB_JOBS=1 runs them one at a time, each when its first test asks for it."""

import glob
import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.environ.get("LAB_OUT", os.path.join(ROOT, "lab-out"))
PORT = int(os.environ.get("LAB_PORT", "13260"))
IQN = "iqn.2026-11.org.lvmirror:lab"
# the systemd section boots on its own (lab/boot --systemd: systemd as PID 1) into its own output
SYSTEMD_OUT = os.environ.get("LAB_OUT_SYSTEMD", os.path.join(ROOT, "lab-out-systemd"))
# the power-cut chain boots on its own too (lab/powercut: one boot per moment, QEMU killed)
POWERCUT_OUT = os.environ.get("LAB_OUT_POWERCUT", os.path.join(ROOT, "lab-out-powercut"))
# the faults boot (tests/lab/test_faults.py) and the second lane's other boots: portals of their
# own, the plain lab boot may run at the same time
FAULTS_OUT = os.environ.get("LAB_OUT_FAULTS", os.path.join(ROOT, "lab-out-faults"))
FAULTS_PORT = int(os.environ.get("LAB_PORT_FAULTS", "13262"))
LANE2_PORT = int(os.environ.get("LAB_PORT_LANE2", "13261"))
LAB_JOBS = max(1, int(os.environ.get("LVMIRROR_LAB_JOBS", "2")))
DEFAULT_SECTIONS = ("basic fs split group scrub metrics crash dbus alua ocf compliance saveconfig tcmurunner lease systemd powercut "
                    "faults")
# sections that are not part of the plain lab boot (faults: tests/lab/test_faults.py)
OWN_BOOT = ("systemd", "powercut", "faults")


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


class LabDidNotRun(Exception):
    """A lab boot did not run or left no results (its message has the boot's output tail)."""


def _run_main():
    """The plain lab boot (lab/boot with every selected section that has no boot of its own),
    with the host-side initiator checks once the guest touches target-ready. Returns {"results",
    "out", "sections", "elapsed" (s), "log" (its output)}; raises LabDidNotRun."""
    sections = [s for s in _sections() if s not in OWN_BOOT]
    env = dict(os.environ, LAB_OUT=OUT, LAB_PORT=str(PORT), LAB_HOST_SIDE="1")
    for stale in ("target-ready", "host-done"):    # a previous run's, before lab/boot clears it
        try:
            os.unlink(os.path.join(OUT, stale))
        except FileNotFoundError:
            pass
    t0 = time.monotonic()
    proc = subprocess.Popen([os.path.join(ROOT, "lab", "boot"), *sections], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # read the output on a thread: the loop below polls for target-ready while the guest runs
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
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
    reader.join()
    out = "".join(chunks)
    elapsed = time.monotonic() - t0
    results = _results(OUT)
    results.update({k: dict(v, check=k) for k, v in host.items()})
    if proc.returncode != 0 or not results:
        raise LabDidNotRun(f"the kernel lab did not run (rc={proc.returncode}):\n{out[-3000:]}")
    return {"results": results, "out": OUT, "sections": sections, "elapsed": elapsed,
            "log": f"kernel lab: {elapsed:.0f} s wall, sections {sections}\n{out}"}


def _run_boot(argv, out, port, label):
    """Run one lab boot command (``argv`` under ROOT, e.g. ["lab/boot", "faults"]) with its own
    output directory ``out`` and portal ``port`` (127.0.0.1). Returns {"results", "out",
    "elapsed" (s), "log" (its wall time and output)}; raises LabDidNotRun when it did not run."""
    env = dict(os.environ, LAB_OUT=out, LAB_PORT=str(port))
    t0 = time.monotonic()
    proc = subprocess.run([os.path.join(ROOT, argv[0]), *argv[1:]], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.monotonic() - t0
    results = _results(out)
    if proc.returncode != 0 or not results:
        raise LabDidNotRun(f"the {label} lab did not run (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}")
    return {"results": results, "out": out, "elapsed": elapsed,
            "log": f"kernel lab ({label}): {elapsed:.0f} s wall\n{proc.stdout}"}


def _have_package():
    return bool(glob.glob(os.path.join(ROOT, "build", "deb", "lvmirror_*_all.deb")))


def _lane2_port():
    return LANE2_PORT if LAB_JOBS > 1 else PORT


# name -> (runs it: the lane's function, selected: whether this session runs it)
BOOTS = {
    "main": (_run_main, lambda: any(s not in OWN_BOOT for s in _sections())),
    "faults": (lambda: _run_boot(["lab/boot", "faults"], FAULTS_OUT, FAULTS_PORT, "faults"),
               lambda: "faults" in _sections()),
    "systemd": (lambda: _run_boot(["lab/boot", "--systemd", "systemd"], SYSTEMD_OUT,
                                  _lane2_port(), "systemd as PID 1"),
                lambda: "systemd" in _sections() and _have_package()),
    "powercut": (lambda: _run_boot(["lab/powercut"], POWERCUT_OUT, _lane2_port(), "power cuts"),
                 lambda: "powercut" in _sections()),
}
LANES = (("main",), ("faults", "systemd", "powercut"))
_futures = {}
_futures_lock = threading.Lock()


def _lane(names):
    """Run the boots NAMES one after another; returns {name: run dict or LabDidNotRun}."""
    done = {}
    for name in names:
        try:
            done[name] = BOOTS[name][0]()
        except LabDidNotRun as e:
            done[name] = e
    return done


def lab_boot(name):
    """The run dict of lab boot NAME (a key of BOOTS), printing its output once. One job
    (LVMIRROR_LAB_JOBS=1): run it now. More: the first call starts every selected boot in
    LANES, one thread a lane (the boots are QEMU processes), and each call waits for its own.
    Fails the calling test when the boot did not run."""
    with _futures_lock:
        if name not in _futures:
            if LAB_JOBS == 1:
                _futures[name] = _lane([name])
            else:
                pool = ThreadPoolExecutor(max_workers=len(LANES))
                for lane in LANES:
                    picked = [n for n in lane if BOOTS[n][1]()]
                    if picked:
                        fut = pool.submit(_lane, picked)
                        _futures.update({n: fut for n in picked})
                pool.shutdown(wait=False)
                if name not in _futures:
                    raise AssertionError(f"lab boot {name} is not selected")
    got = _futures[name]
    got = (got.result() if hasattr(got, "result") else got)[name]
    if isinstance(got, LabDidNotRun):
        pytest.fail(str(got))
    if not got.get("printed"):
        got["printed"] = True
        print("\n" + got["log"])
    return got


@pytest.fixture(scope="session")
def lab():
    _require_lab()
    if not BOOTS["main"][1]():
        pytest.skip("no section of the plain lab boot selected (LVMIRROR_LAB_SECTIONS)")
    return lab_boot("main")


@pytest.fixture(scope="session")
def systemd_lab():
    """The packaged lvmirrord.service in a guest whose PID 1 is systemd (lab/boot --systemd):
    installed and started by dpkg, restarted after SIGKILL, stopped, D-Bus-activated."""
    _require_lab()
    if "systemd" not in _sections():
        pytest.skip("section systemd not run (LVMIRROR_LAB_SECTIONS)")
    if not _have_package():
        if os.environ.get("LVMIRROR_EXPECT_PACKAGE") == "1":
            pytest.fail("tools/build-deb ran but build/deb holds no package")
        pytest.skip("the systemd section installs the Debian package: run tools/build-deb first")
    return lab_boot("systemd")


@pytest.fixture(scope="session")
def powercut_lab():
    """The power-cut chain (lab/powercut): the guest's power cut by SIGKILL of QEMU at each
    moment once (steady writes, split, resync, restore, write-intent checkpoint, attach), each
    following boot recovering unattended from the disk and checking what was kept."""
    _require_lab()
    if "powercut" not in _sections():
        pytest.skip("section powercut not run (LVMIRROR_LAB_SECTIONS)")
    run = lab_boot("powercut")
    summary = {}
    path = os.path.join(POWERCUT_OUT, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    return dict(run, summary=summary)
