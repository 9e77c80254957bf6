"""Backup from a split image: a sparse raw copy (holes kept), a qcow2 copy, and the refusals."""

import os
import shutil
import subprocess

import pytest

from lvmirror.backup import backup_image
from lvmirror.mirror.volume import MirrorVolume


def _mirror(tmp_path, n, size):
    """A volume of n images, its initial resync done."""
    paths = [str(tmp_path / f"img{k}") for k in range(n)]
    vol = MirrorVolume.create("vol", paths, meta_dir=str(tmp_path / "meta"), size=size,
                              flush_interval=None)
    for job in vol.jobs.values():
        assert job.wait(20)
    return vol


def test_backup_copies_the_point_in_time_copy_and_keeps_holes(tmp_path):
    vol = _mirror(tmp_path, 3, 64 << 20)
    vol.write(0, [memoryview(b"A" * 4096)])
    vol.write(100000, [memoryview(b"B" * 4096)])
    vol.split(2)
    vol.write(0, [memoryview(b"C" * 4096)])           # after T: not in the copy
    im = next(i for i in vol.images if i.index == 2)
    seen = []
    dest = str(tmp_path / "backup.img")
    n = backup_image(dict(index=2, path=im.path, state=im.state.value), dest,
                     progress=lambda d, t: seen.append((d, t)))
    with open(dest, "rb") as f:
        data = f.read()
    assert len(data) == 64 << 20 and data[:4096] == b"A" * 4096
    assert data[100000 * 512:100000 * 512 + 4096] == b"B" * 4096
    assert n < 64 << 20                                  # holes were not copied
    assert os.stat(dest).st_blocks * 512 < 16 << 20      # and the copy is still sparse
    assert seen[-1] == (64 << 20, 64 << 20)
    live = next(i for i in vol.images if i.index == 0)
    with pytest.raises(ValueError, match="only a split image"):
        backup_image(dict(index=0, path=live.path, state=live.state.value), dest)
    with pytest.raises(ValueError, match="raw or qcow2"):
        backup_image(dict(index=2, path=im.path, state="split"), dest, fmt="vmdk")
    with pytest.raises(ValueError, match="the image itself"):
        backup_image(dict(index=2, path=im.path, state="split"), im.path)
    vol.close()


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img (qemu-utils) not installed")
def test_qcow2_backup_is_the_split_image_and_owner_only(tmp_path):
    """qcow2 goes through qemu-img; the copy holds the LUN's data, so a new one is 0600 even when
    the caller's umask would make it world-readable (raw copies are created 0600 too)."""
    vol = _mirror(tmp_path, 2, 16 << 20)
    vol.write(8, [memoryview(b"A" * 4096)])
    vol.split(1)
    vol.write(8, [memoryview(b"C" * 4096)])            # after T: not in the copy
    im = next(i for i in vol.images if i.index == 1)
    old = os.umask(0o022)
    try:
        for fmt in ("qcow2", "raw"):
            dest = str(tmp_path / f"backup.{fmt}")
            backup_image(dict(index=1, path=im.path, state=im.state.value), dest, fmt=fmt)
            assert os.stat(dest).st_mode & 0o777 == 0o600, fmt
    finally:
        os.umask(old)
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", im.path,
                        str(tmp_path / "backup.qcow2")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                        str(tmp_path / "backup.qcow2"), str(tmp_path / "back.raw")])
    with open(tmp_path / "back.raw", "rb") as f:
        f.seek(8 * 512)
        assert f.read(4096) == b"A" * 4096
    vol.close()


def test_backup_drops_this_hosts_cache_of_the_image_first(tmp_path, monkeypatch):
    """On shared storage another gateway writes the images past this host's page cache, so a
    backup must not read pages this host cached before: the source's cache is dropped
    (POSIX_FADV_DONTNEED) before it is read."""
    vol = _mirror(tmp_path, 2, 8 << 20)
    vol.write(0, [memoryview(b"A" * 4096)])
    vol.split(1)
    im = next(i for i in vol.images if i.index == 1)
    events = []
    real_fadvise, real_pread = os.posix_fadvise, os.pread

    def fadvise(fd, offset, length, advice):
        events.append(("fadvise", os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))
        return real_fadvise(fd, offset, length, advice)

    def pread(fd, n, off):
        events.append(("pread", os.readlink(f"/proc/self/fd/{fd}")))
        return real_pread(fd, n, off)
    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    monkeypatch.setattr(os, "pread", pread)
    backup_image(dict(index=1, path=im.path, state="split"), str(tmp_path / "b.img"))
    src = os.path.realpath(im.path)
    assert events[0] == ("fadvise", src, 0, 0, os.POSIX_FADV_DONTNEED)
    assert ("pread", src) in events
    with open(tmp_path / "b.img", "rb") as f:
        assert f.read(4096) == b"A" * 4096
    vol.close()


def test_backup_of_an_image_without_seek_data_is_whole(tmp_path, monkeypatch):
    """A block device has no SEEK_DATA (Linux's blkdev_llseek answers EINVAL). The copy took
    that for "only a hole is left" and wrote a backup of zeroes for every block-device image
    (found by the two-gateway lab); it now reads such an image whole, zero chunks kept as
    holes."""
    import errno
    vol = _mirror(tmp_path, 2, 16 << 20)
    vol.write(0, [memoryview(b"A" * 4096)])
    vol.write(20000, [memoryview(b"B" * 4096)])          # byte 10240000, past the first chunk
    vol.split(1)
    im = next(i for i in vol.images if i.index == 1)
    real_lseek = os.lseek

    def lseek(fd, pos, how):
        if how in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_lseek(fd, pos, how)
    monkeypatch.setattr(os, "lseek", lseek)
    dest = tmp_path / "dev-backup.img"
    n = backup_image(dict(index=1, path=im.path, state="split"), str(dest))
    monkeypatch.undo()
    with open(im.path, "rb") as a, open(dest, "rb") as b:
        assert a.read() == b.read()
    assert 0 < n <= 2 * (4 << 20)                       # only the chunks holding data written
    assert os.stat(dest).st_blocks * 512 <= 8 << 20     # the zero chunks stay holes
    vol.close()


def test_backup_holds_the_volume_not_the_rest_of_a_larger_image(tmp_path):
    """An image larger than the volume (a block device bigger than the LUN) may hold another
    user's old data past the volume's end: the copy stops at the volume's size, raw and
    qcow2."""
    vol = _mirror(tmp_path, 2, 8 << 20)
    vol.write(0, [memoryview(b"A" * 4096)])
    vol.split(1)
    im = next(i for i in vol.images if i.index == 1)
    with open(im.path, "r+b") as f:                  # the device goes on past the volume
        f.truncate(12 << 20)
        f.seek(10 << 20)
        f.write(b"OLD TENANT SECRET")
    entry = dict(index=1, path=im.path, state="split")
    dest = tmp_path / "b.raw"
    backup_image(entry, str(dest), size=vol.size)
    data = dest.read_bytes()
    assert len(data) == 8 << 20 and data[:4096] == b"A" * 4096 and b"SECRET" not in data
    if shutil.which("qemu-img"):
        q = tmp_path / "b.qcow2"
        backup_image(entry, str(q), fmt="qcow2", size=vol.size)
        out = tmp_path / "q.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(q), str(out)], check=True)
        data = out.read_bytes()
        assert len(data) == 8 << 20 and data[:4096] == b"A" * 4096 and b"SECRET" not in data
    vol.close()


def test_each_copy_gets_a_file_of_its_own_beside_its_destination(tmp_path):
    """Trial of 2026-12-06, HIGH: every copy to one destination wrote ``DEST.partial``, opened
    with O_TRUNC, so a second copier (or a rerun while the first still ran) emptied the
    first's copy, which the first then renamed into place as a finished backup. Each copy
    now has a new file of its own (O_EXCL, 0600 whatever the umask), and a leftover
    ``DEST.partial`` (or a symlink planted there) is never written through."""
    from lvmirror.backup import check_dest, new_partial, publish
    dest = str(tmp_path / "b.img")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, dest + ".partial")
    old = os.umask(0)
    try:
        a, b = new_partial(dest), new_partial(dest)
    finally:
        os.umask(old)
    assert a != b and os.path.dirname(a) == str(tmp_path)
    for p in (a, b):
        name = os.path.basename(p)
        assert name.startswith("b.img.") and name.endswith(".partial") and p != dest + ".partial"
        assert os.stat(p).st_mode & 0o777 == 0o600 and os.path.getsize(p) == 0
    vol = _mirror(tmp_path, 2, 4 << 20)
    vol.write(0, [memoryview(b"A" * 4096)])
    vol.split(1)
    im = next(i for i in vol.images if i.index == 1)
    entry = dict(index=1, path=im.path, state="split")
    assert backup_image(entry, a) == 4096
    open(b, "wb").write(b"another copier's bytes")      # does not touch a's copy
    publish(a, dest)
    assert open(dest, "rb").read(4096) == b"A" * 4096 and not os.path.exists(a)
    assert victim.read_bytes() == b"keep"
    # a copy onto an existing name made a symlink (never followed: backup_image O_NOFOLLOW)
    with pytest.raises(OSError):
        backup_image(entry, dest + ".partial")
    assert victim.read_bytes() == b"keep"
    # the destination itself: a regular file or a new name, in a directory that exists
    check_dest(dest)
    check_dest(str(tmp_path / "new.img"))
    for bad, why in ((dest + ".partial", "not a regular file"), ("/dev/null", "not a regular"),
                     (str(tmp_path / "nodir" / "x.img"), "no directory"),
                     (str(tmp_path), "is a directory; give the backup file's name")):
        with pytest.raises(ValueError, match=why):
            check_dest(bad)
    vol.close()
