"""lab/boot takes its portal port's lock before anything else, so a second lab run on the same
port (tools/demo beside tools/test) waits for the first instead of failing in QEMU's host
forwarding. No guest is booted here: the boot is given an output directory it refuses (it exits
2 right after the lock), so the test sees only the waiting and the going on."""

import fcntl
import os
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT = os.path.join(ROOT, "lab", "boot")


def _refused(proc, err) -> bool:
    """The boot ended right after its lock, as meant: LAB_OUT=/ refused (or, on a machine
    without the lab's kernel or virtme-ng, that said), exit status 2."""
    return proc.returncode == 2 and ("refusing to empty" in err or "lab: no /boot" in err
                                     or "virtme-ng missing" in err)


def _boot(tmp_path, **env):
    """lab/boot with LAB_OUT=/ (refused by clear_out, exit 2: nothing is booted)."""
    e = dict(os.environ, TMPDIR=str(tmp_path), LAB_PORT="1", LAB_OUT="/")
    e.update(env)
    e.pop("LAB_PORT_LOCKED", None)
    return subprocess.Popen([BOOT], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_second_boot_on_a_port_waits_for_the_first(tmp_path):
    lock = tmp_path / "lvmirror-lab-port-1.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)        # another boot holds port 1
        proc = _boot(tmp_path)
        time.sleep(1.5)
        assert proc.poll() is None, proc.communicate()   # it waits ...
        fcntl.flock(held, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=60)          # ... and goes on once it is free
    assert "another lab run uses portal port 1" in err and "waiting for it" in err
    assert _refused(proc, err), err


def test_a_boot_with_the_port_free_does_not_wait_and_lab_port_lock_0_skips_the_lock(tmp_path):
    proc = _boot(tmp_path)
    _, err = proc.communicate(timeout=60)
    assert _refused(proc, err) and "waiting" not in err, err
    lock = tmp_path / "lvmirror-lab-port-1.lock"
    assert lock.exists()
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = _boot(tmp_path, LAB_PORT_LOCK="0")
        _, err = proc.communicate(timeout=60)
    assert _refused(proc, err) and "waiting" not in err, err


def test_the_lock_file_serves_every_user(tmp_path):
    """The first boot makes the lock file readable and writable by all, and a boot opens it
    read-only (flock needs no more): a file another user's boot left behind - here root's,
    mode 0644 as a umask of 022 made it before - never refuses a later boot (it was "Permission
    denied", exit 1, on every boot of that port)."""
    import shutil
    import stat
    import tempfile
    proc = _boot(tmp_path)
    _, err = proc.communicate(timeout=60)
    assert _refused(proc, err), err
    mode = stat.S_IMODE(os.stat(tmp_path / "lvmirror-lab-port-1.lock").st_mode)
    assert mode == 0o666, oct(mode)
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to boot as another user")
    shared = tempfile.mkdtemp(prefix="lablock-")            # as /tmp is: 1777
    try:
        os.chmod(shared, 0o1777)
        lock = os.path.join(shared, "lvmirror-lab-port-1.lock")
        with open(lock, "w"):
            pass
        os.chmod(lock, 0o644)                               # root's, another user's now
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        if subprocess.run(nobody + ["test", "-x", BOOT]).returncode != 0:
            pytest.skip(f"{BOOT} is not reachable by uid 65534")
        env = dict(os.environ, TMPDIR=shared, LAB_PORT="1", LAB_OUT="/")
        env.pop("LAB_PORT_LOCKED", None)
        proc = subprocess.run(nobody + [BOOT], env=env, capture_output=True, text=True,
                              timeout=60)
        assert "Permission denied" not in proc.stderr, proc.stderr
        assert _refused(proc, proc.stderr), proc.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_lock_that_cannot_be_opened_is_said_with_the_way_around(tmp_path):
    """TMPDIR names no directory: the boot says it cannot open its port's lock and how to boot
    without it (exit 2), rather than a bare shell redirection error."""
    proc = _boot(tmp_path, TMPDIR=str(tmp_path / "missing"))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "lab: cannot open the lock of portal port 1" in err and "LAB_PORT_LOCK=0" in err
