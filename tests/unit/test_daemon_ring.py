"""The real LunServer loop (ring thread, worker pool, SCSI core, mirror engine) driven through the
ring emulator, which plays the kernel's side of the TCMU ring byte for byte."""

import os
import random

import pytest

from lvmirror import cfgstring
from lvmirror.daemon import LunServer, VolumeRegistry
from lvmirror.errors import WouldBlock
from lvmirror.mirror.volume import ImageState
from lvmirror.scsi import parse_sense
from lvmirror.tcmu import abi, uio
from lvmirror.tcmu.emulator import RingEmulator

from tests.unit.test_tcmu_uio_netlink import fake_device
from tests.unit.test_volume_helpers import drop_page_cache

BS = 512
SIZE = 8 << 20


def cdb10(op, lba, n, b1=0):
    return bytes([op, b1]) + lba.to_bytes(4, "big") + b"\0" + n.to_bytes(2, "big") + b"\0"


def rearm(lun, emu):
    """Disarm ``lun``'s compiled path and let its ring thread arm it again, with whatever spies
    are patched in by then: a TEST UNIT READY through the ring ends a compiled loop waiting for
    commands (it is the Python path's opcode) and the Python path answers it; the next command
    arms the compiled path. Raises AssertionError unless the TEST UNIT READY was GOOD."""
    lun._fast = None
    cid = emu.submit(bytes(6))
    assert emu.wait([cid])[cid].status == 0


@pytest.fixture
def lab(tmp_path):
    """A LUN served from the emulator; yields (emulator, LunServer, image paths)."""
    servers = []

    def make(cfg, *, size=SIZE, state=None):
        root = tmp_path / f"dev{len(servers)}"
        roots = fake_device(root, len(servers), f"tcm-user/1/lun{len(servers)}/lvmirror/{cfg}",
                            info_size=size, serial=f"serial-{len(servers)}")
        (dev,) = uio.find_devices("lvmirror", **roots)
        with open(os.path.join(dev.configfs_dir, "attrib", "hw_max_sectors"), "w") as f:
            f.write("2048\n")
        emu = RingEmulator(cmdr_size=(64 << 10) - 128, data_size=8 << 20)
        emu.run_reaper()
        registry = state or VolumeRegistry(str(tmp_path / "state"))
        lun = LunServer(dev, registry, workers=4)
        lun.open(handle=emu.handle())
        lun.start()
        servers.append((emu, lun))
        return emu, lun, registry

    yield make
    for emu, lun in servers:
        lun.stop()
        emu.close()


def images(tmp_path, n=2):
    return [os.path.join(tmp_path, f"img{k}") for k in range(n)]


def test_writes_reach_every_image_and_read_back(lab, tmp_path):
    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    assert lun.error is None
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    rnd = random.Random(3)
    expect = {}
    ids = []
    for k in range(64):
        lba = rnd.randrange(SIZE // BS - 16)
        data = rnd.randbytes(8 * BS)
        ids.append(emu.submit(cdb10(0x2A, lba, 8), data_out=data))
        for j in range(8):
            expect[lba + j] = data[j * BS:(j + 1) * BS]
    # writes to overlapping LBAs complete in submission order only per region lock; to make the
    # expectation exact, wait for all before reading
    done = emu.wait(ids)
    assert all(c.status == 0 for c in done.values())
    lun.volume.flush()
    blobs = [open(p, "rb").read() for p in paths]
    assert blobs[0] == blobs[1]
    rids = {lba: emu.submit(cdb10(0x28, lba, 1), data_in_len=BS) for lba in list(expect)[:32]}
    got = emu.wait(rids.values())
    for lba, cid in rids.items():
        assert got[cid].status == 0 and got[cid].data_in == blobs[0][lba * BS:(lba + 1) * BS]
    assert emu.warnings == []


def test_inquiry_read_len_and_check_condition(lab, tmp_path):
    emu, lun, _ = lab(f"vol0;images={'+'.join(images(tmp_path))}")
    cid = emu.submit(bytes([0x12, 0, 0, 0, 255, 0]), data_in_len=255)
    bad = emu.submit(cdb10(0x28, SIZE // BS, 1), data_in_len=BS)
    unknown = emu.submit(bytes([0xC5] + [0] * 11))
    done = emu.wait([cid, bad, unknown])
    assert done[cid].status == 0 and done[cid].read_len == 66
    assert done[cid].data_in[8:16] == b"LIO-ORG "
    assert parse_sense(done[bad].sense) == (5, 0x21, 0)
    assert parse_sense(done[unknown].sense) == (5, 0x20, 0)
    vpd = emu.submit(bytes([0x12, 1, 0xB0, 0, 255, 0]), data_in_len=255)
    bl = emu.wait([vpd])[vpd].data_in
    assert int.from_bytes(bl[8:12], "big") == 2048          # from attrib/hw_max_sectors


def test_missing_volume_answers_not_ready_but_inquiry(lab):
    emu, lun, _ = lab("novol")
    assert "does not exist" in lun.error
    tur = emu.submit(bytes(6))
    inq = emu.submit(bytes([0x12, 0, 0, 0, 36, 0]), data_in_len=36)
    done = emu.wait([tur, inq])
    assert parse_sense(done[tur].sense) == (2, 0x04, 0x03)
    assert done[inq].status == 0



def test_test_unit_ready_tells_the_truth_when_every_image_fails(lab, tmp_path):
    """Every image vanishes (I/O gets EBADF): the failing write gets MEDIUM ERROR, then TEST
    UNIT READY answers NOT READY / MANUAL INTERVENTION REQUIRED through the ring, so a
    multipath tur checker fails the path over; the device reports aborts (tmr_notification)."""
    emu, lun, _ = lab(f"vol0;images={'+'.join(images(tmp_path))}")
    attr = os.path.join(lun.device.configfs_dir, "attrib", "tmr_notification")
    assert open(attr).read().strip() == "1"
    tur = emu.submit(bytes(6))
    assert emu.wait([tur])[tur].status == 0
    for job in list(lun.volume.jobs.values()):     # the initial resync, not part of the test
        assert job.wait(20)
    for k in range(2):
        lun.volume.image_storage(k).close()
    wid = emu.submit(cdb10(0x2A, 0, 8), data_out=bytes([3]) * 8 * BS)
    assert parse_sense(emu.wait([wid])[wid].sense) == (3, 0x0C, 0x00)
    tur, rid = emu.submit(bytes(6)), emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)
    done = emu.wait([tur, rid])
    assert parse_sense(done[tur].sense) == (2, 0x04, 0x03)
    assert parse_sense(done[rid].sense) == (2, 0x04, 0x03)
    assert lun.volume.health == "offline"

def test_aborted_command_not_started_gets_task_aborted(lab, tmp_path):
    emu, lun, _ = lab(f"vol0;images={'+'.join(images(tmp_path))}")
    # Queue a command and a TMR naming it in the same batch, before the ring thread looks.
    with emu._lock:
        cid = emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)
        emu.submit_tmr(abi.TmrType.ABORT_TASK, [cid])
    done = emu.wait([cid])
    assert done[cid].status in (0, 0x40)     # executed first, or aborted: never lost


def test_split_under_load_through_the_ring(lab, tmp_path):
    paths = images(tmp_path, 3)
    emu, lun, registry = lab(f"vol0;images={'+'.join(paths)};region_size=64K")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    before = [emu.submit(cdb10(0x2A, k * 16, 16), data_out=bytes([1]) * 16 * BS)
              for k in range(32)]
    emu.wait(before)
    info = lun.volume.split(2)
    after = [emu.submit(cdb10(0x2A, k * 16, 16), data_out=bytes([2]) * 16 * BS)
             for k in range(8)]
    emu.wait(after)
    assert lun.volume.images[2].state is ImageState.SPLIT and info.drained >= 0
    split_blob = open(paths[2], "rb").read()
    assert split_blob[:32 * 16 * BS] == bytes([1]) * (32 * 16 * BS)
    assert set(lun.volume.change_bitmap(2).dirty_regions()) == {0}     # 8 x 8 KiB = region 0
    # export the split image as a second LUN and read the point-in-time copy through it
    emu2, lun2, _ = lab("vol0;image=2", state=registry)
    assert lun2.error is None
    rid = emu2.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
    assert emu2.wait([rid])[rid].data_in == bytes([1]) * (8 * BS)
    # while exported, a resync is refused; the LUN keeps serving
    with pytest.raises(Exception, match="exported"):
        lun.volume.resync(2)


def test_split_image_exported_read_only(lab, tmp_path):
    paths = images(tmp_path, 2)
    emu, lun, registry = lab(f"vol0;images={'+'.join(paths)};region_size=64K")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    emu.wait([emu.submit(cdb10(0x2A, 0, 8), data_out=bytes([7]) * 8 * BS)])
    lun.volume.split(1)
    emu2, lun2, _ = lab("vol0;image=1;readonly=1", state=registry)
    assert lun2.error is None
    rid = emu2.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
    assert emu2.wait([rid])[rid].data_in == bytes([7]) * (8 * BS)
    wid = emu2.submit(cdb10(0x2A, 0, 8), data_out=bytes([9]) * 8 * BS)
    r = emu2.wait([wid])[wid]
    assert r.status == 2 and parse_sense(r.sense)[:2] == (0x07, 0x27)   # DATA PROTECT, WP
    ms = emu2.submit(bytes([0x1A, 0, 0x3F, 0, 255, 0]), data_in_len=255)   # MODE SENSE(6)
    assert emu2.wait([ms])[ms].data_in[2] & 0x80                              # WP bit
    assert open(paths[1], "rb").read(8 * BS) == bytes([7]) * (8 * BS)
    assert lun.volume.change_bitmap(1).count() == 0        # nothing written to the copy


def test_second_lun_for_the_same_volume_is_refused(lab, tmp_path):
    paths = images(tmp_path)
    emu, lun, registry = lab(f"vol0;images={'+'.join(paths)}")
    emu2, lun2, _ = lab("vol0", state=registry)
    assert "already served" in lun2.error


def test_cfgstring_naming_a_foreign_image_answers_not_ready(lab, tmp_path):
    paths = images(tmp_path)
    emu, lun, registry = lab(f"vol0;images={'+'.join(paths)}")
    lun.stop()
    other = str(tmp_path / "other.img")
    emu2, lun2, _ = lab(f"vol0;images={paths[0]}+{other}", state=registry)
    assert f"has images {'+'.join(paths)}" in lun2.error
    assert f"{other} was never an image of this volume" in lun2.error
    tur = emu2.submit(bytes(6))
    assert parse_sense(emu2.wait([tur])[tur].sense) == (2, 0x04, 0x03)
    assert cfgstring.parse("vol0").name == "vol0"


@pytest.mark.parametrize("change", ["attach", "detach"])
def test_lun_serves_after_attach_or_detach_and_a_restart(lab, tmp_path, change):
    """Issue 13: the LUN's cfgstring still names the images it was created with; after
    ``lvmirror attach``/``detach`` and a restart of lvmirrord, the LUN serves the volume's
    current images instead of answering NOT READY."""
    paths = images(tmp_path, 3)
    cfg = f"vol0;images={paths[0]}+{paths[1]}"
    emu, lun, registry = lab(cfg)
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    emu.wait([emu.submit(cdb10(0x2A, 0, 8), data_out=bytes([5]) * 8 * BS)])
    lun.volume.attach(paths[2])
    for job in list(lun.volume.jobs.values()):
        assert job.wait(20)
    if change == "detach":
        lun.volume.detach(0)
    served = [i.path for i in lun.volume.images]
    lun.stop()                                          # lvmirrord stops
    assert registry.names() == []
    emu2, lun2, _ = lab(cfg, state=VolumeRegistry(str(tmp_path / "state")))   # and restarts
    assert lun2.error is None
    assert [i.path for i in lun2.volume.images] == served
    rid = emu2.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
    assert emu2.wait([rid])[rid].data_in == bytes([5]) * (8 * BS)
    wid = emu2.submit(cdb10(0x2A, 64, 8), data_out=bytes([6]) * 8 * BS)
    assert emu2.wait([wid])[wid].status == 0
    lun2.volume.flush()
    for p in served:
        with open(p, "rb") as f:
            f.seek(64 * BS)
            assert f.read(8 * BS) == bytes([6]) * (8 * BS)


def test_ring_thread_ends_quietly_when_the_kernel_removes_the_device(lab, tmp_path, caplog):
    """The kernel unregisters the uio device (backstore deleted) before lvmirrord handles the
    netlink REMOVE_DEVICE event: reads of the uio fd then fail with EIO. The ring thread ends
    with a log line, no traceback, and the LUN still stops cleanly."""
    import errno
    import logging
    import threading

    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    done = emu.wait([emu.submit(cdb10(0x2A, 0, 8), data_out=b"\1" * 8 * BS)])
    assert all(c.status == 0 for c in done.values())
    crashed = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: crashed.append(args.exc_value)
    try:
        def gone():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        lun._handle.clear_event = gone
        with caplog.at_level(logging.INFO, logger="lvmirrord"):
            emu.submit(cdb10(0x28, 0, 1), data_in_len=BS)   # the kernel's doorbell -> EIO
            lun._thread.join(10)
        assert not lun._thread.is_alive()
        assert lun.gone and crashed == []
        assert any("went away" in r.getMessage() for r in caplog.records)
        lun.stop()
    finally:
        threading.excepthook = old_hook


def test_cfgstring_leg_timeout_reaches_the_volume(lab, tmp_path):
    emu, lun, _ = lab(f"vol0;images={'+'.join(images(tmp_path))};leg_timeout=1.5")
    assert lun.volume.leg_timeout == 1.5
    other = "+".join(str(tmp_path / n) for n in ("c.img", "d.img"))
    emu2, lun2, _ = lab(f"vol1;images={other};leg_timeout=0")
    assert lun2.volume.leg_timeout is None                       # 0: never


def test_a_slow_leg_left_behind_does_not_stop_the_ring(lab, tmp_path, monkeypatch):
    """A FUA write whose second image stalls (a worker blocked in pwritev on a view of the data
    area) is completed after leg_timeout without it; releasing the command's views must wait for
    that worker instead of killing the ring thread (it used to die on BufferError and the LUN
    never answered again)."""
    import threading
    import time
    from lvmirror.mirror.image import StorageImage
    paths = images(tmp_path)
    stall = threading.Event()
    real = StorageImage.writev

    def writev(self, offset, buffers, *, fua=False):
        if self.path == paths[1] and stall.is_set():
            held = [memoryview(b) for b in buffers]     # the worker's own views, as pwritev has
            time.sleep(1.5)
            return real(self, offset, held, fua=fua)
        return real(self, offset, buffers, fua=fua)
    monkeypatch.setattr(StorageImage, "writev", writev)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)};leg_timeout=0.3")
    stall.set()
    t0 = time.monotonic()
    wid = emu.submit(cdb10(0x2A, 0, 8, b1=0x08), data_out=bytes([4]) * 8 * BS)   # FUA
    assert emu.wait([wid])[wid].status == 0
    assert time.monotonic() - t0 < 1.3
    assert lun.volume.images[1].state is ImageState.FAILED
    stall.clear()
    rid = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)          # the ring still serves
    done = emu.wait([rid])
    assert done[rid].status == 0 and done[rid].data_in == bytes([4]) * 8 * BS
    t1 = time.monotonic()
    while lun._held and time.monotonic() - t1 < 10:
        tur = emu.submit(bytes(6))
        emu.wait([tur])
        time.sleep(0.1)
    assert lun._held == [] and lun.error is None


def _lun_with_data(lab, tmp_path, seed, options=""):
    """A 2-image LUN (cfgstring ``options`` added) after its initial resync whose first 64
    blocks hold random data (seeded by ``seed``), written through the ring: (emulator,
    LunServer, image paths, the data)."""
    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}{options}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    data = random.Random(seed).randbytes(64 * BS)
    wid = emu.submit(cdb10(0x2A, 0, 64), data_out=data)
    assert emu.wait([wid])[wid].status == 0
    return emu, lun, paths, data


def test_cached_reads_are_answered_by_the_ring_thread(lab, tmp_path):
    """READs whose data is in the page cache are answered by the ring thread itself (no hand-off
    to a worker and back); a READ of a range a write holds goes to a worker and waits for it."""
    import time
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 5)
    before = lun.inline
    rids = [emu.submit(cdb10(0x28, 8 * k, 8), data_in_len=8 * BS) for k in range(8)]
    done = emu.wait(rids)
    assert [done[r].data_in for r in rids] == [data[8 * k * BS:8 * (k + 1) * BS]
                                               for k in range(8)]
    if lun.inline == before:
        pytest.skip(f"{tmp_path}: no RWF_NOWAIT reads on this file system")
    hold = lun.volume.locks.lock(0, 8)             # as a write in flight holds it
    rid = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
    time.sleep(0.3)
    assert rid not in emu.completions
    hold.release()
    assert emu.wait([rid])[rid].data_in == data[:8 * BS]


def _tmpfs_lun_dir() -> str:
    """A new directory on /dev/shm for a tmpfs LUN's images (the caller removes it); skips the
    test when /dev/shm is not tmpfs or swap is in use (tmpfs reads then go to the pool)."""
    from tests.unit.test_volume_io import _tmpfs_dir
    from lvmirror.mirror.image import swap_active
    if swap_active():
        pytest.skip("swap is in use here: tmpfs reads go to the pool")
    d = _tmpfs_dir()
    if d is None:
        pytest.skip("/dev/shm is not tmpfs here")
    return d


def test_reads_of_a_tmpfs_lun_are_answered_by_the_ring_thread(lab, tmp_path):
    """A LUN whose images are on tmpfs (which refuses RWF_NOWAIT), on a host with no swap in
    use, has its READs at queue depth 8 answered by the ring thread, as an ext4 or block-device LUN's cached reads are, not each
    handed to a worker and back; the data is the data written."""
    import shutil
    d = _tmpfs_lun_dir()
    try:
        emu, lun, paths, data = _lun_with_data(lab, d, 13)
        assert all(p.startswith("/dev/shm/") for p in paths)
        for _ in range(3):
            before = lun.inline
            rids = [emu.submit(cdb10(0x28, 8 * k, 8), data_in_len=8 * BS) for k in range(8)]
            done = emu.wait(rids)
            assert [done[r].data_in for r in rids] == [data[8 * k * BS:8 * (k + 1) * BS]
                                                       for k in range(8)]
            assert lun.inline - before == 8
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_reads_of_a_tmpfs_lun_are_answered_by_the_compiled_path(lab):
    """On tmpfs (which refuses RWF_NOWAIT) the compiled READ path answers cached READs too, one
    at a time as at queue depth 1: ``StorageImage.nowait_flags`` asks the file system once
    (``_probe_nowait``) and gives plain preadv flags. Before, it gave RWF_NOWAIT, the compiled
    path was refused on every READ, and the Python path read each again (two system calls a
    READ, and lvmirrord's CPU per 4 KiB READ doubled on the host's data-path benchmark)."""
    import shutil
    from lvmirror.daemon import lunserver
    if not lunserver.COMPILED_READS:
        pytest.skip("the compiled READ path is not built here")
    d = _tmpfs_lun_dir()
    try:
        emu, lun, paths, data = _lun_with_data(lab, d, 17)
        before = lun.compiled
        for k in range(8):                              # one at a time: queue depth 1
            rid = emu.submit(cdb10(0x28, 8 * k, 8), data_in_len=8 * BS)
            assert emu.wait([rid])[rid].data_in == data[8 * k * BS:8 * (k + 1) * BS]
        assert lun.compiled - before >= 7       # (the first may come before the path is armed)
        assert all(img.storage.nowait_flags() == 0 for img in lun.volume._images)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _evict(volume, paths, lba, nblocks=8):
    """Drop ``paths``' pages from the page cache until a READ of ``nblocks`` at ``lba`` would
    miss it (DONTNEED is advice: a page under writeback on a busy host stays). False when
    they never left."""
    import time
    for _ in range(50):
        drop_page_cache(paths)
        try:
            volume.read(lba, [memoryview(bytearray(nblocks * BS))], nowait=True)
        except WouldBlock:
            return True
        time.sleep(0.05)
    return False


def test_a_lone_read_the_page_cache_misses_is_run_by_the_ring_thread(lab, tmp_path,
                                                                      monkeypatch):
    """At queue depth 1 a READ whose data is not in the page cache is read by the ring thread
    itself, blocking (no hand-off to a worker and back: nothing else waits); with another
    command outstanding it goes to a worker, so the ring thread stays free for the others."""
    import time
    from lvmirror.daemon import lunserver
    monkeypatch.setattr(lunserver, "INLINE_SLOW", 30.0)
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 9)
    before = lun.inline
    rid = emu.submit(cdb10(0x28, 0, 8), data_in_len=8 * BS)
    assert emu.wait([rid])[rid].data_in == data[:8 * BS]
    if lun.inline == before:
        pytest.skip(f"{tmp_path}: no RWF_NOWAIT reads on this file system")
    for lba in (8, 24, 40):                              # one at a time: queue depth 1
        assert _evict(lun.volume, paths, lba), "the pages never left the page cache"
        before = lun.inline
        rid = emu.submit(cdb10(0x28, lba, 8), data_in_len=8 * BS)
        assert emu.wait([rid])[rid].data_in == data[lba * BS:(lba + 8) * BS]
        assert lun.inline == before + 1
    assert lun.handovers == 0
    # queue depth 2: a WRITE waits on a worker for a held range while a missed READ comes
    hold = lun.volume.locks.lock(200, 8)
    try:
        waiting = emu.submit(cdb10(0x2A, 200, 8), data_out=bytes(8 * BS))
        time.sleep(0.2)
        assert waiting not in emu.completions
        assert _evict(lun.volume, paths, 56), "the pages never left the page cache"
        before = lun.inline
        rid = emu.submit(cdb10(0x28, 56, 8), data_in_len=8 * BS)
        assert emu.wait([rid])[rid].data_in == data[56 * BS:64 * BS]
        assert lun.inline == before                      # a worker read it
        assert waiting not in emu.completions
    finally:
        hold.release()
    assert emu.wait([waiting])[waiting].status == 0


def _left_to_a_worker(emu, lun, cdb, data):
    """Submit a WRITE alone (queue depth 1) that must wait for other I/O: it stays outstanding,
    not on the ring thread, which answers a TEST UNIT READY meanwhile with no hand-over.
    Returns the WRITE's command id."""
    import time
    inline = lun.inline
    wid = emu.submit(cdb, data_out=data)
    time.sleep(0.3)
    assert wid not in emu.completions
    tur = emu.submit(bytes(6))
    assert emu.wait([tur], timeout=3)[tur].status == 0
    assert lun.inline == inline and lun.handovers == 0
    return wid


def test_a_lone_fua_write_on_a_held_range_never_holds_the_ring_thread(lab, tmp_path,
                                                                       monkeypatch):
    """At queue depth 1 the ring thread may wait for a device, never for another I/O: a FUA
    WRITE (it waits for the devices) whose range a region lock holds (a READ in flight, the
    D-Bus interface's LockRegion) goes to a worker; the ring thread answers meanwhile, with no
    hand-over (a trial found the ring thread blocked on the lock, 2026-12-02)."""
    from lvmirror.daemon import lunserver
    monkeypatch.setattr(lunserver, "INLINE_STALL", 30.0)   # no hand-over hides a blocked ring
    monkeypatch.setattr(lunserver, "INLINE_SLOW", 30.0)
    emu, lun, paths, data = _lun_with_data(lab, tmp_path, 11)
    hold = lun.volume.locks.lock(0, 8, shared=True)
    try:
        wid = _left_to_a_worker(emu, lun, cdb10(0x2A, 0, 8, b1=0x08), bytes([3]) * 8 * BS)
    finally:
        hold.release()
    assert emu.wait([wid])[wid].status == 0
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8 * BS) == bytes([3]) * 8 * BS
    inline = lun.inline                           # the range free: the ring thread runs it
    wid = emu.submit(cdb10(0x2A, 0, 8, b1=0x08), data_out=bytes([4]) * 8 * BS)
    assert emu.wait([wid])[wid].status == 0 and lun.inline == inline + 1


def test_a_lone_write_never_waits_for_another_threads_log_save(lab, tmp_path, monkeypatch):
    """At queue depth 1 the ring thread saves the write-intent log itself when a WRITE sets a
    bit, but while another thread's save holds the log's save lock (a checkpoint clearing bits,
    another writer) the WRITE goes to a worker: the ring thread answers meanwhile (a trial
    found it waiting for the other save, 2026-12-02)."""
    _python_path_writes(monkeypatch)
    from lvmirror.daemon import lunserver
    monkeypatch.setattr(lunserver, "INLINE_STALL", 30.0)   # no hand-over hides a blocked ring
    monkeypatch.setattr(lunserver, "INLINE_SLOW", 30.0)
    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)};intent_chunk=1M")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    _no_checkpoints(lun.volume)
    wil = lun.volume._wil
    clean = [c for c in range(wil.bitmap.nregions) if not wil.bitmap.test_region(c)]
    assert len(clean) >= 2
    lba = clean[0] * (1 << 20) // BS
    assert wil._save_lock.acquire(timeout=5)              # another thread's save runs
    try:
        saves = wil.saves
        wid = _left_to_a_worker(emu, lun, cdb10(0x2A, lba, 8), bytes([6]) * 8 * BS)
    finally:
        wil._save_lock.release()
    assert emu.wait([wid])[wid].status == 0 and wil.saves == saves + 1
    lba = clean[1] * (1 << 20) // BS                      # the lock free: the ring saves
    inline = lun.inline
    wid = emu.submit(cdb10(0x2A, lba, 8), data_out=bytes([7]) * 8 * BS)
    assert emu.wait([wid])[wid].status == 0
    assert lun.inline == inline + 1 and wil.saves == saves + 2
    assert wil.bitmap.test_region(clean[1])


def _no_checkpoints(volume):
    """Stop ``volume``'s background checkpoints (each may clear write-intent log regions)."""
    volume._stop_flusher.set()
    if volume._flusher is not None:
        volume._flusher.join()


def test_a_lone_write_is_run_by_the_ring_thread_and_a_held_range_goes_to_the_pool(
        lab, tmp_path, monkeypatch):
    """At queue depth 1 the ring thread runs a WRITE itself (no hand-off to a worker and back),
    the first write to a clean write-intent chunk too (the log's save, an fdatasync, is a
    device wait: nothing else waits for the ring thread meanwhile); a WRITE whose range other
    I/O holds (here a region lock, as the D-Bus interface grants) goes to a worker and waits
    there, and the ring thread goes on answering other commands."""
    _python_path_writes(monkeypatch)
    import time
    from lvmirror.daemon import lunserver
    monkeypatch.setattr(lunserver, "INLINE_SLOW", 30.0)     # a loaded test host is not slow
    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    wil = lun.volume._wil
    _no_checkpoints(lun.volume)                   # none clears a region of the log meanwhile
    marked = {r for r in range(wil.bitmap.nregions) if wil.bitmap.test_region(r)}
    rnd = random.Random(8)
    before, saves = lun.inline, wil.saves
    expect = {}
    first_touch = set()
    for k in range(20):                           # one at a time: QD 1
        lba = rnd.randrange(SIZE // BS // 8) * 8
        data = rnd.randbytes(8 * BS)
        region = (lba * BS) >> wil.region_shift
        if region not in marked:
            first_touch.add(region)
            marked.add(region)
        wid = emu.submit(cdb10(0x2A, lba, 8), data_out=data)
        assert emu.wait([wid])[wid].status == 0
        expect[lba] = data
    assert first_touch                            # the random LBAs did reach clean regions
    assert wil.saves - saves == len(first_touch)
    assert lun.inline - before == 20              # every one on the ring thread
    assert lun.handovers == 0
    for path in paths:                            # and on every image
        with open(path, "rb") as f:
            for lba, data in expect.items():
                f.seek(lba * BS)
                assert f.read(8 * BS) == data
    hold = lun.volume.locks.lock(0, 8, shared=True)
    try:
        wid = emu.submit(cdb10(0x2A, 0, 8), data_out=bytes([7]) * 8 * BS)
        time.sleep(0.3)
        assert wid not in emu.completions         # waits for the range, on a worker
        tur = emu.submit(bytes(6))
        rid = emu.submit(cdb10(0x28, 64, 8), data_in_len=8 * BS)
        done = emu.wait([tur, rid], timeout=5)    # the ring thread is free meanwhile
        assert done[tur].status == 0 and done[rid].status == 0
        assert wid not in emu.completions
    finally:
        hold.release()
    assert emu.wait([wid])[wid].status == 0
    with open(paths[1], "rb") as f:
        assert f.read(8 * BS) == bytes([7]) * 8 * BS


def test_writes_at_queue_depth_32_are_run_by_the_ring_thread(lab, tmp_path, monkeypatch):
    """Buffered WRITEs of at most INLINE_WRITE_MAX bytes to regions the write-intent log marks
    run on the ring thread at any queue depth, and reach every image; a larger one goes to the
    pool unless it is the only command outstanding."""
    from lvmirror.daemon import lunserver
    monkeypatch.setattr(lunserver, "INLINE_SLOW", 30.0)     # a loaded test host is not slow
    monkeypatch.setattr(lunserver, "INLINE_STALL", 30.0)    # images
    _python_path_writes(monkeypatch)     # (the compiled path makes WRITEs up to 1 MiB)
    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    _no_checkpoints(lun.volume)
    warm = [emu.submit(cdb10(0x2A, lba, 1), data_out=bytes(BS))       # mark every region
            for lba in range(0, SIZE // BS, (1 << 20) // BS)]
    assert all(c.status == 0 for c in emu.wait(warm).values())
    rnd = random.Random(32)
    before = lun.inline
    expect = {}
    ids = []
    for k in range(32):                           # 32 distinct 4 KiB ranges, all at once
        lba = 8 * (k * 97 % (SIZE // BS // 8))
        data = rnd.randbytes(8 * BS)
        ids.append(emu.submit(cdb10(0x2A, lba, 8), data_out=data))
        expect[lba] = data
    assert all(c.status == 0 for c in emu.wait(ids).values())
    assert lun.inline - before == 32
    assert lun.handovers == 0
    for path in paths:
        with open(path, "rb") as f:
            for lba, data in expect.items():
                f.seek(lba * BS)
                assert f.read(8 * BS) == data
    big = lunserver.INLINE_WRITE_MAX // BS * 2    # too large for the ring thread at QD > 1
    far = SIZE // BS - 8
    hold = lun.volume.locks.lock(far, 8)          # keeps a WRITE outstanding: QD > 1 below
    try:
        waiting = emu.submit(cdb10(0x2A, far, 8), data_out=bytes(8 * BS))
        before = lun.inline
        ids = [emu.submit(cdb10(0x2A, 0, big), data_out=bytes([5]) * big * BS),
               emu.submit(cdb10(0x2A, big, big), data_out=bytes([6]) * big * BS)]
        assert all(c.status == 0 for c in emu.wait(ids).values())
        assert lun.inline == before
    finally:
        hold.release()
    assert emu.wait([waiting])[waiting].status == 0


def _python_path_writes(monkeypatch):
    """WRITEs on the Python path (``LVMIRROR_COMPILED_WRITES=0``): what the tests of the ring
    thread's own WRITEs check; the compiled path's batches have the same tests of their own
    (``test_compiled_writes.py``: the stall tests)."""
    from lvmirror.daemon import lunserver
    monkeypatch.setattr(lunserver, "COMPILED_WRITES", False)


def _region0_marked(lab, tmp_path):
    """A 2-image LUN after its initial resync, with no background checkpoint, whose first
    region the write-intent log marks (a WRITE there may run on the ring thread). Returns
    (emulator, LunServer, image paths)."""
    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    _no_checkpoints(lun.volume)
    wid = emu.submit(cdb10(0x2A, 0, 8), data_out=bytes(8 * BS))
    assert emu.wait([wid])[wid].status == 0
    return emu, lun, paths


def _stall_ring_writes(monkeypatch, storage):
    """Make the first ``writev`` the ring thread runs on image ``storage`` wait until the
    returned ``gate`` is set (``entered`` is set when it begins): a writer stuck behind a slow
    disk. Returns (gate, entered)."""
    import threading
    gate, entered = threading.Event(), threading.Event()
    real = storage.writev

    def stuck(offset, buffers, **kw):
        if threading.current_thread().name.startswith("ring-") and not entered.is_set():
            entered.set()
            assert gate.wait(30)
        return real(offset, buffers, **kw)
    monkeypatch.setattr(storage, "writev", stuck)
    return gate, entered


def test_a_ring_thread_stuck_in_a_write_hands_the_ring_over(lab, tmp_path, monkeypatch):
    """A WRITE the ring thread runs itself that does not return (a writer the kernel throttles
    behind a dying device): after INLINE_STALL seconds the watchdog hands the ring to a new
    ring thread, which answers the other commands; WRITEs go to the pool while the stuck one
    has not returned; once it returns its completion reaches the initiator, good, with the data
    on every image, and the LUN stops cleanly."""
    _python_path_writes(monkeypatch)
    import threading
    import time
    from lvmirror.daemon import lunserver
    monkeypatch.setattr(lunserver, "INLINE_BACKOFF", 0.0)
    emu, lun, paths = _region0_marked(lab, tmp_path)
    gate, entered = _stall_ring_writes(monkeypatch, lun.volume.image_storage(1))
    data = bytes([9]) * 8 * BS
    inline = lun.inline
    wid = emu.submit(cdb10(0x2A, 8, 8), data_out=data)
    assert entered.wait(10)                       # the ring thread is inside the write
    t0 = time.monotonic()
    tur = emu.submit(bytes(6))
    other = emu.submit(cdb10(0x2A, 64, 8), data_out=bytes([3]) * 8 * BS)
    done = emu.wait([tur, other], timeout=10)     # answered by the new ring thread
    assert done[tur].status == 0 and done[other].status == 0
    assert time.monotonic() - t0 < 5
    assert lun.handovers == 1 and wid not in emu.completions
    assert lun.inline == inline                   # the WRITE went to the pool meanwhile
    gate.set()
    assert emu.wait([wid], timeout=10)[wid].status == 0
    for path in paths:
        with open(path, "rb") as f:
            f.seek(8 * BS)
            assert f.read(8 * BS) == data
    time.sleep(0.1)                               # the stuck thread has returned: writes inline
    wid = emu.submit(cdb10(0x2A, 16, 8), data_out=data)
    assert emu.wait([wid])[wid].status == 0
    assert lun.inline == inline + 1 and lun.handovers == 1
    lun.stop()
    assert not [t.name for t in threading.enumerate() if t.name.startswith(f"ring-{lun.name}")]


def _voluntary_switches(native_id: int) -> int:
    """How many times thread ``native_id`` of this process went to sleep so far."""
    with open(f"/proc/self/task/{native_id}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches line")


def _wait_watchdog_idle(lun, timeout=5.0):
    import time
    deadline = time.monotonic() + timeout
    while not lun._watch_idle:
        assert time.monotonic() < deadline, "the watchdog never went idle"
        time.sleep(0.01)


def test_the_watchdog_of_an_idle_lun_sleeps_until_its_next_follow(lab, tmp_path, monkeypatch):
    """An idle LUN's watchdog does not look every INLINE_WATCH (20 wake-ups a second per LUN):
    with nothing fetched and nothing on the ring thread it sleeps until the next ALUA follow
    (30 s here), and a command wakes it again."""
    import time
    from lvmirror.daemon import lunserver
    monkeypatch.setattr(lunserver, "ALUA_FOLLOW_INTERVAL", 30.0)
    emu, lun, _ = lab(f"vol0;images={'+'.join(images(tmp_path))}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    _wait_watchdog_idle(lun)
    tid = lun._watcher.native_id
    n0 = _voluntary_switches(tid)
    time.sleep(1.0)
    assert _voluntary_switches(tid) - n0 <= 2            # 20 before
    tur = emu.submit(bytes(6))
    assert emu.wait([tur])[tur].status == 0
    _wait_watchdog_idle(lun)                              # looked again, and slept again


def test_the_watchdog_of_a_busy_lun_looks_when_a_command_could_turn_stalled(lab, tmp_path,
                                                                            monkeypatch):
    """While READs keep a LUN busy, its watchdog looks about every INLINE_STALL (when the
    command it saw running would turn INLINE_STALL old), not every 50 ms as before: each look
    takes the GIL the ring thread waits for when the kernel wakes it. Its looks (waits on its
    wake-up event) counted over a second of READs at queue depth 1: 20 before, about 5 now."""
    import threading
    import time
    from lvmirror.daemon import lunserver

    class CountingEvent(threading.Event):
        def __init__(self):
            super().__init__()
            self.waits = 0

        def wait(self, timeout=None):
            self.waits += 1
            return super().wait(timeout)
    monkeypatch.setattr(threading, "Event", CountingEvent)    # the LUN's, made now
    emu, lun, _ = lab(f"vol0;images={'+'.join(images(tmp_path))}")
    monkeypatch.undo()
    for job in lun.volume.jobs.values():
        assert job.wait(20)

    def reads(seconds):
        end, n = time.monotonic() + seconds, 0
        while time.monotonic() < end:
            rid = emu.submit(cdb10(0x28, (n * 8) % 512, 8), data_in_len=8 * BS)
            assert emu.wait([rid])[rid].status == 0
            n += 1
        return n

    reads(0.3)                                       # busy: the watchdog is awake
    looks = lun._watch_wake.waits
    t0 = time.monotonic()
    assert reads(1.0) > 50
    seconds = time.monotonic() - t0
    assert lun._watch_wake.waits - looks <= 2 + seconds / lunserver.INLINE_STALL


def test_a_ring_thread_stuck_after_the_lun_was_idle_is_still_handed_over(
        lab, tmp_path, monkeypatch):
    """The first command after a quiet spell, run by the ring thread itself, stalls while the
    watchdog sleeps (next follow in 30 s): the ring thread woke it when it began the command,
    so the ring is handed over after INLINE_STALL as always and a TEST UNIT READY behind the
    stuck WRITE is answered in seconds, not after the follow interval."""
    _python_path_writes(monkeypatch)
    import time
    from lvmirror.daemon import lunserver
    monkeypatch.setattr(lunserver, "ALUA_FOLLOW_INTERVAL", 30.0)
    monkeypatch.setattr(lunserver, "INLINE_BACKOFF", 0.0)
    emu, lun, paths = _region0_marked(lab, tmp_path)
    gate, entered = _stall_ring_writes(monkeypatch, lun.volume.image_storage(1))
    _wait_watchdog_idle(lun)
    inline = lun.inline
    wid = emu.submit(cdb10(0x2A, 8, 8), data_out=bytes([5]) * 8 * BS)
    assert entered.wait(10)                        # the ring thread is inside the write
    t0 = time.monotonic()
    tur = emu.submit(bytes(6))
    done = emu.wait([tur], timeout=10)
    assert done[tur].status == 0 and time.monotonic() - t0 < 5
    assert lun.handovers == 1 and wid not in emu.completions and lun.inline == inline
    gate.set()
    assert emu.wait([wid], timeout=10)[wid].status == 0


def test_the_stuck_thread_returning_does_not_blind_the_watchdog_to_the_new_one(
        lab, tmp_path, monkeypatch):
    """The stuck ring thread's command returns while the ring thread that took over is itself
    inside a command that stalls (a READ here): the returning thread must not clear the new
    thread's start time, or the watchdog never sees the second stall and the ring waits for
    it (a TEST UNIT READY took 2.95 s instead of about 0.3 s)."""
    _python_path_writes(monkeypatch)
    import threading
    import time
    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    _no_checkpoints(lun.volume)
    data = bytes([4]) * 8 * BS
    wid = emu.submit(cdb10(0x2A, 64, 8), data_out=data)   # marks region 0, cached for reads
    assert emu.wait([wid])[wid].status == 0
    inline = lun.inline                  # (before the submit: the ring thread may be quick)
    rid = emu.submit(cdb10(0x28, 64, 8), data_in_len=8 * BS)
    assert emu.wait([rid])[rid].data_in == data
    if lun.inline == inline:
        pytest.skip(f"{tmp_path}: no RWF_NOWAIT reads here, so no READ on the ring thread")
    gate, entered = _stall_ring_writes(monkeypatch, lun.volume.image_storage(1))
    armed = threading.Event()
    for k in range(2):
        st = lun.volume.image_storage(k)

        def slow_read(offset, buffers, *, nowait=False, _real=st.readv):
            if threading.current_thread().name.startswith("ring-") and armed.is_set():
                armed.clear()
                gate.set()                        # the stuck write returns now...
                for _ in range(200):              # ... and its thread hands its command over
                    if not lun._stuck:
                        break
                    time.sleep(0.01)
                time.sleep(2.0)                   # while this READ stalls on the new thread
            return _real(offset, buffers, nowait=nowait)
        monkeypatch.setattr(st, "readv", slow_read)
    wid = emu.submit(cdb10(0x2A, 8, 8), data_out=data)
    assert entered.wait(10)
    for _ in range(100):
        if lun.handovers == 1:
            break
        time.sleep(0.05)
    assert lun.handovers == 1
    armed.set()
    rid = emu.submit(cdb10(0x28, 64, 8), data_in_len=8 * BS)
    time.sleep(0.05)
    t0 = time.monotonic()
    tur = emu.submit(bytes(6))
    assert emu.wait([tur], timeout=10)[tur].status == 0
    took = time.monotonic() - t0
    assert lun.handovers == 2, took               # the second stall was seen
    assert took < 1.5
    done = emu.wait([wid, rid], timeout=10)
    assert done[wid].status == 0 and done[rid].data_in == data


def test_a_new_ring_thread_that_cannot_start_is_reported_and_stop_still_returns(
        lab, tmp_path, monkeypatch):
    """The watchdog's new ring thread cannot be started (no thread to be had): the LUN says
    why it answers no more (status ``error``, logged as critical), and stopping it returns."""
    _python_path_writes(monkeypatch)
    import threading
    emu, lun, _ = _region0_marked(lab, tmp_path)
    gate, entered = _stall_ring_writes(monkeypatch, lun.volume.image_storage(0))
    real_start = threading.Thread.start

    def start(thread):
        if thread.name == f"ring-{lun.name}-1":
            raise RuntimeError("can't start new thread")
        return real_start(thread)
    monkeypatch.setattr(threading.Thread, "start", start)
    emu.submit(cdb10(0x2A, 8, 8), data_out=bytes([1]) * 8 * BS)
    assert entered.wait(10)
    for _ in range(100):
        if lun.error:
            break
        threading.Event().wait(0.05)
    assert lun.error == "ring thread stopped: RuntimeError: can't start new thread"
    assert lun.handovers == 1
    gate.set()
    lun.stop()
    left = [t.name for t in threading.enumerate() if t.name.startswith(f"lun-{lun.name}-")]
    for _ in range(100):                          # the pool's threads end too
        if not left:
            break
        threading.Event().wait(0.05)
        left = [t.name for t in threading.enumerate() if t.name.startswith(f"lun-{lun.name}-")]
    assert not left


def test_a_slow_write_on_the_ring_thread_sends_writes_to_the_pool_for_a_while(
        lab, tmp_path, monkeypatch):
    """A WRITE the ring thread ran that took longer than INLINE_SLOW means the images are slow:
    the next WRITEs go to the pool for INLINE_BACKOFF seconds, then the ring thread takes them
    again."""
    from lvmirror.daemon import lunserver
    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    monkeypatch.setattr(lunserver, "INLINE_SLOW", 0.0)      # every command is "slow"
    monkeypatch.setattr(lunserver, "INLINE_BACKOFF", 0.5)

    def one_write(lba):
        wid = emu.submit(cdb10(0x2A, lba, 8), data_out=bytes([lba & 0xFF]) * 8 * BS)
        assert emu.wait([wid])[wid].status == 0

    import time
    _no_checkpoints(lun.volume)
    one_write(0)              # marks region 0 in the write-intent log: "slow" too, and at
    time.sleep(0.6)           # queue depth 1 on the ring thread; its back-off ends first
    inline, slow = lun.inline, lun.inline_slow
    one_write(8)
    assert (lun.inline, lun.inline_slow) == (inline + 1, slow + 1)
    one_write(16)                                 # within the back-off: a worker ran it
    one_write(24)
    assert lun.inline == inline + 1
    time.sleep(0.6)
    one_write(32)
    assert lun.inline == inline + 2


def test_a_volume_that_cannot_be_opened_for_an_unforeseen_reason_answers_not_ready(
        lab, tmp_path, monkeypatch, caplog):
    """Any error opening the volume (not only the foreseen LvmirrorError) leaves that LUN
    answering NOT READY with the reason, instead of ending lvmirrord and every other LUN."""
    from lvmirror.mirror.volume import MirrorVolume

    def broken(*a, **kw):
        raise ValueError("state no version writes")
    monkeypatch.setattr(MirrorVolume, "create", broken)
    emu, lun, _ = lab(f"vol0;images={'+'.join(images(tmp_path))}")
    assert lun.error == "cannot open the volume: ValueError: state no version writes"
    tur = emu.submit(bytes(6))
    assert parse_sense(emu.wait([tur])[tur].sense) == (2, 0x04, 0x03)
    assert "state no version writes" in caplog.text


def test_every_completed_command_is_in_the_latency_histogram(lab, tmp_path):
    """Issue 17 (monitoring): the ring thread counts each command it completes, whether it ran
    it itself (a cached READ, a lone WRITE) or a worker did, by kind, fetch to completion."""
    paths = images(tmp_path)
    emu, lun, _ = lab(f"vol0;images={'+'.join(paths)}")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    before = lun.latency.snapshot()
    data = os.urandom(8 * BS)
    writes = [emu.submit(cdb10(0x2A, 8 * k, 8), data_out=data) for k in range(20)]
    assert all(c.status == 0 for c in emu.wait(writes).values())
    reads = [emu.submit(cdb10(0x28, 8 * k, 8), data_in_len=8 * BS) for k in range(12)]
    assert all(c.status == 0 for c in emu.wait(reads).values())
    tur = emu.submit(bytes(6))
    emu.wait([tur])
    snap = lun.latency.snapshot()
    assert snap["write"]["count"] - before["write"]["count"] == 20
    assert snap["read"]["count"] - before["read"]["count"] == 12
    assert snap["other"]["count"] - before["other"]["count"] == 1
    w = snap["write"]
    assert w["le"] == sorted(w["le"]) and w["le"][-1] <= w["count"]
    assert 0 < w["sum"] < 20 * 30 and snap["read"]["sum"] > 0


def _xcopy_param(src_naa, dst_naa, nblocks, src_lba, dst_lba):
    def cscd(naa):
        return bytes([0xE4, 0, 0, 0, 0x01, 0x03, 0, 16]) + naa + bytes(4) + \
            BS.to_bytes(4, "big")
    seg = bytes([0x02, 0, 0, 0x18, 0, 0, 0, 1, 0, 0]) + nblocks.to_bytes(2, "big") + \
        src_lba.to_bytes(8, "big") + dst_lba.to_bytes(8, "big")
    tdl = cscd(src_naa) + cscd(dst_naa)
    return bytes([1, 0]) + len(tdl).to_bytes(2, "big") + bytes(4) + \
        len(seg).to_bytes(4, "big") + bytes(4) + tdl + seg


def test_extended_copy_from_the_split_image_lun_into_the_live_lun(lab, tmp_path):
    """Issue 17 (EXTENDED COPY): a copy the initiator never carries: 64 blocks of the split
    image, exported read-only as its own LUN, copied back into the live volume by lvmirrord,
    through the ring; a copy into the read-only export is DATA PROTECT."""
    paths = images(tmp_path, 2)
    emu, lun, registry = lab(f"vol0;images={'+'.join(paths)};region_size=64K")
    for job in lun.volume.jobs.values():
        assert job.wait(20)
    old, new = os.urandom(64 * BS), os.urandom(64 * BS)
    emu.wait([emu.submit(cdb10(0x2A, 0, 64), data_out=old)])
    lun.volume.split(1)
    emu.wait([emu.submit(cdb10(0x2A, 0, 64), data_out=new)])
    emu2, lun2, _ = lab("vol0;image=1;readonly=1", state=registry)
    peers = [lun, lun2]
    lun._peers = lun2._peers = lambda: peers
    param = _xcopy_param(lun2.lu.naa, lun.lu.naa, 64, 0, 0)
    xid = emu.submit(bytes([0x83, 0]) + bytes(8) + len(param).to_bytes(4, "big") + bytes(2),
                     data_out=param)
    assert emu.wait([xid])[xid].status == 0
    rid = emu.submit(cdb10(0x28, 0, 64), data_in_len=64 * BS)
    assert emu.wait([rid])[rid].data_in == old
    lun.volume.flush()
    assert open(paths[0], "rb").read(64 * BS) == old          # every live image has it
    param = _xcopy_param(lun.lu.naa, lun2.lu.naa, 8, 0, 0)
    xid = emu2.submit(bytes([0x83, 0]) + bytes(8) + len(param).to_bytes(4, "big") + bytes(2),
                      data_out=param)
    r = emu2.wait([xid])[xid]
    assert r.status == 2 and parse_sense(r.sense) == (0x07, 0x27, 0)
    assert lun.lu.copier.copied_bytes == 64 * BS


def test_a_lun_waiting_for_its_lease_holds_up_no_other_call(tmp_path):
    """lvmirrord (single process) adds a LUN whose volume's lease is slow to come (sanlock
    waits host_dead_seconds for a crashed holder): meanwhile status, region locks on another
    volume and its LUN's commands go on; the LUN is served once the lease came. Found in the
    two-gateway lab: Pacemaker's monitor of every LUN on the gateway timed out on status."""
    import threading
    from lvmirror.daemon import Lvmirrord
    from tests.unit.test_daemon_registry import _SlowLeases
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
    devs, emus = [], []
    for k, cfg in enumerate([f"vfree;images={tmp_path}/f.img",
                             f"vslow;images={tmp_path}/s.img;direct=1"]):
        roots = fake_device(tmp_path / f"dev{k}", k, f"tcm-user/1/lun{k}/lvmirror/{cfg}",
                            info_size=SIZE, serial=f"serial-{k}")
        (dev,) = uio.find_devices("lvmirror", **roots)
        devs.append(dev)
        emus.append(RingEmulator(cmdr_size=(64 << 10) - 128, data_size=8 << 20))
        emus[-1].run_reaper()
    leases = None
    try:
        d.add_lun(devs[0], handle=emus[0].handle())
        leases = d.registry.leases = _SlowLeases()
        t = threading.Thread(target=d.add_lun, args=(devs[1],),
                             kwargs={"handle": emus[1].handle()})
        t.start()
        assert leases.waiting.wait(10)
        done = threading.Event()

        def others():
            d.status()
            lock = d.lock_region("vfree", 0, 8, owner="test")
            d.unlock_region(lock, owner="test")
            done.set()
        threading.Thread(target=others, daemon=True).start()
        assert done.wait(10), "status or region locks waited for another volume's lease"
        data = bytes(range(256)) * 16
        cid = emus[0].submit(cdb10(0x2A, 0, 8), data_out=data)
        assert emus[0].wait([cid])[cid].status == 0
        assert not d.serves(devs[1].uio_name)
        leases.go.set()
        t.join(30)
        assert d.serves(devs[1].uio_name)
        assert [lun["error"] for lun in d.status()["luns"]] == [None, None]
        assert d.status()["volumes"]["vslow"]["lease"] == {"host_id": 1, "slot": 0}
    finally:
        if leases is not None:
            leases.go.set()
        for dev in devs:
            d.remove_lun(dev.uio_name)
        for emu in emus:
            emu.close()


@pytest.mark.parametrize("cfg", ["vs;images={d}/a+{d}/b", "vs;images="])
def test_a_unit_serial_written_after_the_lun_opened_is_reported(tmp_path, cfg):
    """rtslib-fb (targetcli, restoreconfig, the HA agent) writes ``wwn/vpd_unit_serial`` just
    after it enables the device, so lvmirrord can open the LUN first (always, in the kernel's
    netlink reply mode). Read once at open, the serial stayed missing for the LUN's life (the
    header itself before that: one serial and NAA for such LUNs); now an INQUIRY reads it until
    it is there - for a LUN that serves and one that answers NOT READY (a trial)."""
    roots = fake_device(tmp_path / "dev", 0, f"tcm-user/1/lun0/lvmirror/{cfg.format(d=tmp_path)}",
                        info_size=SIZE, serial="")
    (dev,) = uio.find_devices("lvmirror", **roots)
    emu = RingEmulator(cmdr_size=(64 << 10) - 128, data_size=1 << 20)
    emu.run_reaper()
    lun = LunServer(dev, VolumeRegistry(str(tmp_path / "state")), workers=2)
    lun.open(handle=emu.handle())
    lun.start()

    def page(code):
        (c,) = emu.wait([emu.submit(bytes([0x12, 1, code, 0, 255, 0]),
                                    data_in_len=255)]).values()
        assert c.status == 0
        return bytes(c.data_in[:c.read_len])

    try:
        assert (lun.error is None) == cfg.endswith("b")
        assert page(0x00) == bytes(4) and page(0x80) == bytes([0, 0x80, 0, 0])
        with open(os.path.join(dev.configfs_dir, "wwn", "vpd_unit_serial"), "w") as f:
            f.write("T10 VPD Unit Serial Number: 5f0c-late\n")
        assert page(0x80)[4:] == b"5f0c-late"
        assert page(0x00)[4:] == bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
        assert lun.lu.naa is not None and lun.lu.naa in page(0x83)
    finally:
        lun.stop()
        emu.close()
