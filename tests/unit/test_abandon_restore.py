"""``lvmirror abandon-restore``: the way out of a restore whose source (the split image) can no
longer be read, through the real CLI and D-Bus (a private dbus-daemon) to lvmirrord."""

import errno
import json

from lvmirror.errors import ImageIOError

from tests.unit.test_backup_cycle import gw  # noqa: F401  (a fixture)
from tests.unit.test_bus import cli, system_bus  # noqa: F401  (a fixture)

BS = 512


def _dead(storage):
    """Make ``storage`` (a split image's StorageImage) fail every read, as a dead disk."""
    def readv(offset, buffers, **kw):
        raise ImageIOError(storage.path, errno.EIO, f"image {storage.path}: I/O error",
                           op="read", offset=offset)
    storage.readv = readv


def test_abandon_restore_through_the_cli(gw, caplog):  # noqa: F811
    """Refused without --force (nothing changed) and when no restore is unfinished; a restore
    whose source died is abandoned: the CLI names what was not rolled back, status shows no
    restore, the region it could not copy is served again (the live data) and the image can
    be detached."""
    d, vols, address = gw
    vol = vols["db"]
    vol.write(0, [memoryview(b"A" * BS * 8)])
    r = cli(address, "split", "db", "1")
    assert r.returncode == 0, r.stderr
    caplog.set_level("INFO", logger="lvmirror.bus.service")
    r = cli(address, "abandon-restore", "db", "1", "--force")
    assert r.returncode == 1 and "no restore from image 1 is unfinished" in r.stderr, r.stderr
    # a refused call leaves its line in the journal, with the caller
    assert any("refused: volume db: no restore from image 1 is unfinished" in rec.getMessage()
               for rec in caplog.records), caplog.text
    vol.write(0, [memoryview(b"B" * BS * 8)])          # region 0 changed since the split
    _dead(vol._images[1].storage)
    r = cli(address, "restore", "db", "1", "--wait")
    assert r.returncode == 1 and "cannot be read" in r.stderr, r.stdout + r.stderr
    r = cli(address, "abandon-restore", "db", "1")
    assert r.returncode == 1 and "--force" in r.stderr, r.stderr
    r = cli(address, "detach", "db", "1")
    assert r.returncode == 1, r.stderr
    assert "'lvmirror abandon-restore db 1 --force' gives it up" in r.stderr, r.stderr
    r = cli(address, "--json", "abandon-restore", "db", "1", "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout) == {"regions": 1, "bytes": 64 * 1024}
    buf = bytearray(BS)
    vol.read(0, [memoryview(buf)])
    assert bytes(buf) == b"B" * BS                       # the live data, served again
    st = json.loads(cli(address, "--json", "status").stdout)["volumes"]["db"]
    assert [j["state"] for j in st["jobs"] if j["kind"] == "restore"] in ([], ["abandoned"])
    r = cli(address, "detach", "db", "1")
    assert r.returncode == 0, r.stderr
