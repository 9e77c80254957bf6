"""Mirrored I/O: writes reach every image, reads, unmap, write_same, compare_and_write."""

import os

import pytest

from lvmirror.errors import ConfigError, StateError
from lvmirror.mirror.volume import MirrorVolume

from tests.unit.test_volume_helpers import (BS, Gate, image_bytes, make_volume, pattern, read,
                                            run_thread, write)


@pytest.mark.parametrize("fanout", ["parallel", "serial", "auto"])
def test_write_reaches_every_image_and_reads_back(tmp_path, fanout):
    vol, _, paths = make_volume(tmp_path, 3, fanout=fanout)
    data = pattern(24, 7)
    bufs = [memoryview(bytearray(data[:1000 + 24])), memoryview(bytearray(data[1024:]))]
    vol.write(40, bufs)
    for p in paths:
        assert image_bytes(p, 40 * BS, 24 * BS) == data
    a, b = bytearray(5 * BS), bytearray(19 * BS)
    vol.read(40, [memoryview(a), memoryview(b)])
    assert bytes(a + b) == data
    assert vol.stats["writes"] == 1 and vol.stats["bytes_written"] == 24 * BS
    vol.close()


@pytest.mark.parametrize("fanout", ["parallel", "serial"])
def test_write_is_acked_only_when_every_image_has_it(tmp_path, fanout):
    vol, opener, paths = make_volume(tmp_path, 2, fanout=fanout)
    gate = Gate(lambda op, off, ln: op == "write")
    opener.by_path[paths[1]].gates.append(gate)
    t, box = run_thread(write, vol, 0, pattern(2, 1))
    gate.wait_reached()
    assert t.is_alive() and not box        # image 0 may be done, image 1 is held: no ack
    gate.open()
    t.join(10)
    assert "error" not in box
    assert image_bytes(paths[1], 0, 2 * BS) == pattern(2, 1)
    vol.close()


def test_overlapping_writes_serialised(tmp_path):
    vol, opener, paths = make_volume(tmp_path, 2)
    gate = Gate(lambda op, off, ln: op == "write")
    opener.by_path[paths[0]].gates.append(gate)
    t1, _ = run_thread(write, vol, 0, pattern(4, 1))
    gate.wait_reached()
    t2, _ = run_thread(write, vol, 2, pattern(4, 2))      # overlaps: waits for the lock
    # The second write waits on the range lock, in FIFO order.
    from tests.unit.test_volume_helpers import wait_until
    wait_until(lambda: len(vol.locks.waiters()) == 1)
    gate.open()
    t1.join(10)
    t2.join(10)
    expect = pattern(4, 1)[:2 * BS] + pattern(4, 2)
    for p in paths:
        assert image_bytes(p, 0, 6 * BS) == expect
    vol.close()


def test_unmap_write_same_compare_and_write(tmp_path):
    vol, _, paths = make_volume(tmp_path, 2)
    write(vol, 0, pattern(16, 3))
    vol.unmap(4, 4)
    assert read(vol, 4, 4) == bytes(4 * BS)
    for p in paths:
        assert image_bytes(p, 4 * BS, 4 * BS) == bytes(4 * BS)
    block = bytes(range(256)) * 2
    vol.write_same(100, 300, memoryview(block))
    assert read(vol, 100, 300) == block * 300
    cur = read(vol, 0, 2)
    new = pattern(2, 9)
    assert vol.compare_and_write(0, memoryview(cur), memoryview(new)) is None
    assert read(vol, 0, 2) == new
    wrong = bytearray(new)
    wrong[700] ^= 1
    assert vol.compare_and_write(0, memoryview(wrong), memoryview(pattern(2, 10))) == 700
    assert read(vol, 0, 2) == new
    vol.flush()
    vol.close()


def test_single_image_volume(tmp_path):
    vol, _, paths = make_volume(tmp_path, 1)
    write(vol, 5, pattern(3, 1))
    assert read(vol, 5, 3) == pattern(3, 1)
    with pytest.raises(StateError):
        vol.split(0)
    vol.close()


def test_bad_requests_refused(tmp_path):
    vol, _, _ = make_volume(tmp_path, 2, size=64 * BS)
    with pytest.raises(ValueError):
        write(vol, 63, pattern(2, 1))
    with pytest.raises(ValueError):
        vol.write(0, [memoryview(bytearray(100))])
    with pytest.raises(ValueError):
        read(vol, -1, 1)
    vol.close()
    with pytest.raises(StateError, match="closed"):
        read(vol, 0, 1)


def test_create_refusals(tmp_path):
    meta = str(tmp_path / "meta")
    with pytest.raises(ConfigError, match="1 to 4"):
        MirrorVolume.create("v", [str(tmp_path / f"x{k}") for k in range(5)], meta_dir=meta,
                            size=1 << 20)
    with pytest.raises(ConfigError, match="twice"):
        MirrorVolume.create("v", [str(tmp_path / "a"), str(tmp_path / "a")], meta_dir=meta,
                            size=1 << 20)
    with pytest.raises(ConfigError, match="invalid volume name"):
        MirrorVolume.create("../x", [str(tmp_path / "a")], meta_dir=meta, size=1 << 20)
    small = tmp_path / "small"
    small.write_bytes(bytes(4096))
    with pytest.raises(ConfigError, match="small.*smaller than"):
        MirrorVolume.create("v", [str(tmp_path / "big"), str(small)], meta_dir=meta,
                            size=1 << 20)
    with pytest.raises(ConfigError, match="no such file"):
        MirrorVolume.create("v", [str(tmp_path / "nope")], meta_dir=meta)
    with pytest.raises(ConfigError, match="fanout"):
        MirrorVolume.create("v", [str(tmp_path / "f")], meta_dir=meta, size=1 << 20,
                            fanout="sideways")


def test_worker_runs_posted_calls_and_survives_their_errors(caplog):
    """legs.Worker: submit() hands an exception to the waiter; post() (a LUN's commands, nobody
    waits) logs it and the thread goes on; stop(wait=True) runs what was queued, then joins."""
    import logging
    import threading
    from lvmirror.mirror.legs import Worker
    w = Worker("t", nthreads=1)
    assert isinstance(w.submit(lambda x: 1 / x, 0).wait(), ZeroDivisionError)
    done = []
    with caplog.at_level(logging.ERROR):
        w.post(lambda x: 1 / x, 0)
        w.post(done.append, 1)
        w.stop(wait=True)
    assert done == [1]
    assert "t-0: unexpected error" in caplog.text and "ZeroDivisionError" in caplog.text
    assert not any(t.name == "t-0" for t in threading.enumerate())
    w.stop(wait=True)                     # idempotent


def test_the_write_intent_log_is_kept_only_when_something_can_differ(tmp_path):
    """One image and no change bitmap: nothing a crash could leave different or untracked, so
    writes skip the log (and its fsync). Two images, or one image with a split image's change
    bitmap to keep, log every write before it is issued."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one, _, _ = make_volume(tmp_path / "one", 1)
    saves = one.stats["wil_saves"]
    for k in range(8):
        write(one, k * 256, pattern(8, k))          # 8 regions of 64 KiB
    assert read(one, 256, 8) == pattern(8, 1)
    assert one.stats["wil_saves"] == saves and one.stats["wil_dirty_chunks"] == 0
    one.close()
    two, _, _ = make_volume(tmp_path / "two", 2)
    saves = two.stats["wil_saves"]
    write(two, 0, pattern(8, 1))
    assert two.stats["wil_saves"] > saves and two.stats["wil_dirty_chunks"] >= 1
    two.split(1)                                   # one image left, the split one tracked
    saves = two.stats["wil_saves"]
    write(two, 512, pattern(8, 2))
    assert two.stats["wil_saves"] > saves
    two.close()


def test_close_waits_for_a_write_in_flight_and_returns_when_it_ends(tmp_path):
    """Closing a volume with a write still in flight (a LUN let go after its ring thread died,
    or an ALUA close after 30 s of a slow image) waits for that write, then closes: the end of
    the last I/O of the current epoch wakes the close (it woke only a split's drain of retired
    epochs, and the close waited for ever)."""
    import threading
    from tests.unit.test_volume_helpers import make_volume, pattern
    v, _, paths = make_volume(tmp_path, 2)
    storage = v.image_storage(1)
    gate, entered = threading.Event(), threading.Event()
    real = storage.writev

    def slow(offset, buffers, **kw):
        entered.set()
        assert gate.wait(30)
        return real(offset, buffers, **kw)
    storage.writev = slow
    data = pattern(8, 5)
    writer = threading.Thread(target=v.write, args=(16, [memoryview(bytearray(data))]))
    writer.start()
    assert entered.wait(10)
    closer = threading.Thread(target=v.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()                     # the write is still in flight
    gate.set()
    writer.join(10)
    closer.join(10)
    assert not closer.is_alive()
    for p in paths:
        with open(p, "rb") as f:
            f.seek(16 * 512)
            assert f.read(len(data)) == data


def test_an_image_refuses_a_closed_descriptor_a_range_outside_and_a_read_only_write(tmp_path):
    """StorageImage.readv / writev (the ring thread's reads and writes take them without the
    range checks' call when none can fail): a closed image is ImageIOError(EBADF) counted as
    an error, a range beyond the image or starting before it ValueError, a write to a
    read-only image ImageIOError(EROFS); within range both work."""
    import errno
    from lvmirror.errors import ImageIOError, WouldBlock
    from lvmirror.mirror.image import StorageImage
    path = tmp_path / "img"
    path.write_bytes(bytes(64 << 10))
    img = StorageImage.open(str(path))
    buf = bytearray(4096)
    img.writev(60 << 10, [memoryview(b"x" * 4096)])
    img.readv(60 << 10, [memoryview(buf)])
    assert bytes(buf) == b"x" * 4096
    for offset in (62 << 10, -512, 64 << 10):
        with pytest.raises(ValueError):
            img.readv(offset, [memoryview(buf)])
        with pytest.raises(ValueError):
            img.writev(offset, [memoryview(buf)])
        with pytest.raises(ValueError):
            img.readv(offset, [memoryview(buf)], nowait=True)
    ro = StorageImage.open(str(path), read_only=True)
    with pytest.raises(ImageIOError) as e:
        ro.writev(0, [memoryview(buf)])
    assert e.value.errno == errno.EROFS
    ro.close()
    errors = img.stats["errors"]
    img.close()
    for io in (lambda: img.readv(0, [memoryview(buf)]), lambda: img.writev(0, [memoryview(buf)])):
        with pytest.raises(ImageIOError) as e:
            io()
        assert e.value.errno == errno.EBADF
    assert img.stats["errors"] == errors + 2
    with pytest.raises(WouldBlock):                  # the blocking read reports it
        img.readv(0, [memoryview(buf)], nowait=True)


def test_an_o_direct_image_bounces_a_misaligned_buffer_and_refuses_a_misaligned_offset(tmp_path):
    """With O_DIRECT, ``readv``/``writev`` keep their checks (the buffered path skips them):
    a buffer at an address the device's logical block size does not divide is copied through
    an aligned bounce buffer (``bounced`` counted, no error), an offset or length not aligned
    is ValueError, and nothing is counted as an image error."""
    import errno
    from lvmirror.errors import ConfigError
    from lvmirror.mirror.image import StorageImage
    path = tmp_path / "img"
    path.write_bytes(bytes(64 << 10))
    try:
        img = StorageImage.open(str(path), direct=True)
    except (ConfigError, OSError) as e:          # a file system without O_DIRECT (tmpfs)
        if isinstance(e, OSError) and e.errno != errno.EINVAL:
            raise
        pytest.skip(f"no O_DIRECT under {tmp_path}: {e}")
    misaligned = StorageImage.aligned_buffer(4097)[1:]      # 4096 bytes, address + 1
    misaligned[:] = b"d" * 4096
    img.writev(8192, [misaligned])
    assert img.stats["bounced"] == 1
    out = StorageImage.aligned_buffer(4097)[1:]
    img.readv(8192, [out])
    assert bytes(out) == b"d" * 4096 and img.stats["bounced"] == 2
    aligned = StorageImage.aligned_buffer(4096)
    for io in (lambda: img.readv(1, [aligned]), lambda: img.writev(512 + 1, [aligned]),
               lambda: img.readv(0, [memoryview(aligned)[:100]])):
        with pytest.raises(ValueError):
            io()
    assert img.stats["errors"] == 0
    img.close()


def _tmpfs_dir():
    """A fresh directory on /dev/shm when that is tmpfs (``stat -f``), else None."""
    import subprocess
    import tempfile
    try:
        kind = subprocess.run(["stat", "-f", "-c", "%T", "/dev/shm"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return tempfile.mkdtemp(prefix="lvm-test-", dir="/dev/shm") if kind == "tmpfs" else None


def test_fs_type_reads_the_mount_of_a_device_number(tmp_path):
    """``image.fs_type``: the type of the mount whose major:minor (mountinfo field 3) is the
    device number's, the field after " - "; None for a device no mount has or no file."""
    from lvmirror.mirror.image import fs_type
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
        "25 22 0:23 / /dev/shm rw,nosuid,nodev shared:3 - tmpfs tmpfs rw,size=65536k\n"
        "26 22 0:24 / /srv rw shared:4 master:2 - xfs /dev/sdb rw\n")
    assert fs_type(os.makedev(0, 23), str(info)) == "tmpfs"
    assert fs_type(os.makedev(254, 1), str(info)) == "ext4"
    assert fs_type(os.makedev(0, 24), str(info)) == "xfs"       # optional fields skipped
    assert fs_type(os.makedev(8, 0), str(info)) is None
    assert fs_type(os.makedev(0, 23), str(tmp_path / "missing")) is None
    assert fs_type(os.makedev(0, 23), str(tmp_path)) is None                  # a directory
    # a mount path is written raw but for blanks (escaped as octal): not always UTF-8
    raw = tmp_path / "mountinfo-raw"
    raw.write_bytes(b"30 22 0:30 / /mnt/caf\xe9\xff\\040x rw shared:9 - ext4 /dev/sdc rw\n"
                    b"31 22 0:31 / /run/user rw - tmpfs tmpfs rw\n"
                    b"32 22 0:32 / /broken rw -\n")
    assert fs_type(os.makedev(0, 31), str(raw)) == "tmpfs"
    assert fs_type(os.makedev(0, 30), str(raw)) == "ext4"
    assert fs_type(os.makedev(0, 32), str(raw)) is None
    # only b"\n" ends a line and only b" " separates fields: a carriage return or the other
    # bytes str.split() takes for blanks, written raw in a path, cannot forge a mount (trial)
    forged = tmp_path / "mountinfo-forged"
    forged.write_bytes(b"40 22 0:40 / /a\rX\x1cY\x1c0:41\x1cz rw - tmpfs none rw\n"
                       b"41 22 0:41 / /srv/over\xc2\x85lay rw shared:2 - overlay overlay rw\n")
    assert fs_type(os.makedev(0, 41), str(forged)) == "overlay"
    assert fs_type(os.makedev(0, 40), str(forged)) == "tmpfs"
    assert fs_type(os.stat("/proc").st_dev) == "proc"            # this host's own table


def test_swap_active_reads_proc_swaps_at_most_once_a_second(tmp_path, monkeypatch):
    """``image.swap_active``: any line below /proc/swaps' "Filename" header is a swap area in
    use (``imagecheck.read_swaps``); a file that cannot be read, is empty or lacks the header
    counts as swap in use; the answer is kept _SWAP_CHECK_INTERVAL seconds and /proc/swaps read
    by one thread however many ask."""
    import threading
    from lvmirror.mirror import image, imagecheck
    swaps = tmp_path / "swaps"
    header = b"Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
    for content, active in ((header, False), (header + b"\n  \n", False),
                            (header + b"/dev/vdb1  partition\t2097148\t0\t-2\n", True),
                            (b"", True), (b"/dev/vdb1  partition\t2097148\t0\t-2\n", True)):
        swaps.write_bytes(content)
        assert (imagecheck.read_swaps(str(swaps)) != []) is active, content
    assert imagecheck.read_swaps(str(tmp_path / "missing")) is None
    swaps.write_bytes(header + b"/srv/swap\\040file  file\t1024\t0\t-2\n")
    assert imagecheck.read_swaps(str(swaps)) == ["/srv/swap file"]
    calls = []
    monkeypatch.setattr(image, "read_swaps", lambda: calls.append(1) or [])
    monkeypatch.setattr(image, "_swap_seen", (None, -1e9))
    monkeypatch.setattr(image, "_SWAP_CHECK_INTERVAL", 60.0)
    answers = []

    def ask():
        answers.extend(image.swap_active() for _ in range(500))
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [False] * 4000 and len(calls) == 1
    monkeypatch.setattr(image, "read_swaps", lambda: calls.append(1) or None)
    assert image.swap_active() is False and len(calls) == 1          # still the kept answer
    monkeypatch.setattr(image, "_SWAP_CHECK_INTERVAL", 0.0)
    assert image.swap_active() is True and len(calls) == 2           # read again: unreadable


def test_a_tmpfs_image_answers_nowait_reads_without_rwf_nowait(monkeypatch):
    """tmpfs refuses RWF_NOWAIT (EOPNOTSUPP), yet its page cache is the storage: while no swap
    is in use a nowait read of an image there is answered (a plain preadv, counted) instead of
    WouldBlock for ever, which sent every READ of a tmpfs-backed LUN at queue depth > 1 to a
    worker. With swap in use (a page may be on the device) it stays WouldBlock; the memory
    check decides too: the same image taken for an ext4 file still raises WouldBlock."""
    import shutil
    from lvmirror.errors import WouldBlock
    from lvmirror.mirror import image
    from lvmirror.mirror.image import StorageImage
    d = _tmpfs_dir()
    if d is None:
        pytest.skip("/dev/shm is not tmpfs here")
    try:
        path = os.path.join(d, "img")
        data = os.urandom(64 << 10)
        with open(path, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.preadv(fd, [bytearray(512)], 0, os.RWF_NOWAIT)
            pytest.skip("this kernel's tmpfs takes RWF_NOWAIT: nothing to fall back from")
        except OSError:
            pass
        finally:
            os.close(fd)
        monkeypatch.setattr(image, "swap_active", lambda *a: False)
        img = StorageImage.open(path)
        for k in range(3):
            buf = bytearray(4096)
            img.readv(k * 8192, [memoryview(buf)], nowait=True)
            assert bytes(buf) == data[k * 8192:k * 8192 + 4096]
        assert img.stats["reads"] == 3 and img.stats["errors"] == 0
        img.close()
        with pytest.raises(WouldBlock):          # closed: the blocking read reports it
            img.readv(0, [memoryview(bytearray(4096))], nowait=True)
        # with swap in use a tmpfs page may be on the device: WouldBlock, nothing counted
        monkeypatch.setattr(image, "swap_active", lambda *a: True)
        swapping = StorageImage.open(path)
        for _ in range(2):
            with pytest.raises(WouldBlock):
                swapping.readv(0, [memoryview(bytearray(4096))], nowait=True)
        assert swapping.stats["reads"] == 0
        swapping.close()
        monkeypatch.setattr(image, "swap_active", lambda *a: False)
        monkeypatch.setattr(image, "fs_type", lambda st_dev, *a: "ext4")
        other = StorageImage.open(path)
        for _ in range(2):
            with pytest.raises(WouldBlock):
                other.readv(0, [memoryview(bytearray(4096))], nowait=True)
        assert other.stats["reads"] == 0
        other.readv(0, [memoryview(bytearray(4096))])       # the blocking read still works
        assert other.stats["reads"] == 1
        other.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_an_image_file_is_read_without_updating_its_atime(tmp_path):
    """Image files are opened O_NOATIME (the owner may: the test's user owns the file), so a
    read - a page-cache read on the ring thread's compiled path among them - never starts an
    atime update (relatime would, after every write)."""
    import fcntl
    from lvmirror.mirror.image import StorageImage
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 20))
    img = StorageImage.open(str(path))
    try:
        assert fcntl.fcntl(img.fd, fcntl.F_GETFL) & os.O_NOATIME
        os.utime(path, (1_000_000, 2_000_000))           # atime long before mtime: relatime
        img.readv(0, [memoryview(bytearray(4096))])
        assert os.stat(path).st_atime == 1_000_000
    finally:
        img.close()


def test_a_prefetch_is_one_hint_and_a_copys_read_ahead_asks_every_byte_in_pieces(
        tmp_path, monkeypatch):
    """StorageImage.prefetch (SCSI PRE-FETCH) is one POSIX_FADV_WILLNEED of the range, which
    the kernel cuts to the device's readahead window (mm/readahead.c, force_page_cache_ra):
    a PRE-FETCH of a whole LUN never reads the LUN (trial 30, HIGH: in pieces it held the
    volume's epoch, so a split and close, until every byte was asked for). A copy's read-ahead
    (resync._hint) asks in PREFETCH_CHUNK pieces covering its region exactly. A refused hint
    raises nothing."""
    from lvmirror.mirror import image, resync
    from lvmirror.mirror.image import PREFETCH_CHUNK, StorageImage
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 20))
    img = StorageImage.open(str(path))
    calls = []
    monkeypatch.setattr(image.os, "posix_fadvise",
                        lambda fd, off, ln, advice: calls.append((off, ln, advice)))
    img.prefetch(0, 1 << 20)
    assert calls == [(0, 1 << 20, os.POSIX_FADV_WILLNEED)]
    calls.clear()
    resync._hint(img, 4096, 3 * PREFETCH_CHUNK + 512)
    assert calls == [(4096 + k * PREFETCH_CHUNK, PREFETCH_CHUNK, os.POSIX_FADV_WILLNEED)
                     for k in range(3)] + [(4096 + 3 * PREFETCH_CHUNK, 512,
                                            os.POSIX_FADV_WILLNEED)]

    def refuse(*a):
        raise OSError(22, "refused")
    monkeypatch.setattr(image.os, "posix_fadvise", refuse)
    img.prefetch(0, 1 << 20)                                     # a hint: no error
    resync._hint(img, 0, 1 << 20)
    img.close()
