"""Issue 14 item 5: an image named by mistake must not be destroyed.

A secondary image that holds data is refused (saying what was found) unless forced, as
mdadm --create and pvcreate refuse; an image of another volume is refused; the same file
twice is refused; block devices are opened exclusively (O_EXCL, as LIO's iblock does) and the
holder is named when that fails."""

import os
import shutil
import struct
import subprocess

import pytest

from lvmirror import cfgstring
from lvmirror.cfgstring import VolumeSpec
from lvmirror.errors import ConfigError
from lvmirror.mirror import imagecheck
from lvmirror.mirror.image import StorageImage
from lvmirror.mirror.metadata import VolumeMetadata
from lvmirror.mirror.volume import ImageState, MirrorVolume

MiB = 1 << 20


def _wait(vol):
    for job in list(vol.jobs.values()):
        assert job.wait(30)
        assert job.state == "done", job.progress()


def _precious(path, size=8 * MiB, seed=7):
    """A file full of data (every byte non-zero from offset 0)."""
    data = bytes((seed + i * 31) % 255 + 1 for i in range(4096)) * (size // 4096)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    return data


def _create(meta, name, paths, **kw):
    return MirrorVolume.create(name, [str(p) for p in paths], meta_dir=str(meta),
                               flush_interval=None, **kw)


# -- a secondary image that holds data ---------------------------------------------------------

def test_secondary_full_of_data_refused_then_accepted_with_force(tmp_path):
    meta = tmp_path / "meta"
    new, precious = tmp_path / "new.img", tmp_path / "precious.img"
    data = _precious(precious)
    with pytest.raises(ConfigError) as e:
        _create(meta, "vol", [new, precious], size=8 * MiB)
    msg = str(e.value)
    assert msg.startswith(f"image {precious} holds data (first non-zero byte at offset 0; "
                          f"8 MiB allocated): making it image 1 of volume vol would overwrite "
                          f"it with a full copy of {new}; refused"), msg
    assert "mdadm --create and pvcreate" in msg and "force=1" in msg
    # nothing was written or left behind: the data, no metadata, no new.img
    assert precious.read_bytes() == data
    assert not VolumeMetadata.exists(str(meta), "vol")
    assert not new.exists()
    # the administrator says so explicitly
    vol = _create(meta, "vol", [new, precious], size=8 * MiB, force=True)
    _wait(vol)
    assert [i.state for i in vol.images] == [ImageState.IN_SYNC, ImageState.IN_SYNC]
    vol.close()
    assert precious.read_bytes() == bytes(8 * MiB)          # overwritten with new.img's zeroes


def test_data_deep_in_a_sparse_file_is_found_and_located(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    with open(b, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(5 * MiB + 3)
        f.write(b"x")
    c = imagecheck.probe(b)
    assert c.holds_data and c.first_nonzero == 5 * MiB + 3
    assert c.allocated == os.stat(b).st_blocks * 512 and c.allocated < MiB
    assert c.scanned == "every allocated extent read"
    with pytest.raises(ConfigError, match=f"image {b} holds data \\(first non-zero byte at "
                                          f"offset {5 * MiB + 3}; 4 KiB allocated"):
        _create(tmp_path / "meta", "vol", [a, b], size=8 * MiB)


def test_new_sparse_and_all_zero_secondaries_are_accepted(tmp_path):
    meta = tmp_path / "meta"
    a, sparse, zeroes = (tmp_path / n for n in ("a.img", "sparse.img", "zeroes.img"))
    _precious(a, size=4 * MiB)
    with open(sparse, "wb") as f:                 # an existing sparse file: nothing allocated
        f.truncate(4 * MiB)
    with open(zeroes, "wb") as f:                 # allocated, but every byte is zero
        f.write(bytes(4 * MiB))
    assert not imagecheck.probe(sparse).holds_data
    c = imagecheck.probe(zeroes)
    assert not c.holds_data and c.allocated >= 4 * MiB
    new = tmp_path / "new.img"                     # missing: created sparse
    vol = _create(meta, "vol", [a, sparse, zeroes, new], size=4 * MiB)   # a source may hold data
    _wait(vol)
    vol.close()
    assert sparse.read_bytes() == zeroes.read_bytes() == new.read_bytes() == a.read_bytes()


def test_the_scan_is_bounded_and_says_so(tmp_path):
    """Beyond scan_limit bytes of allocated extents only the last `edge` bytes are read."""
    p = tmp_path / "big.img"
    with open(p, "wb") as f:
        f.write(bytes(3 * MiB))
        f.write(b"\1" * 4096)                     # in the middle: beyond the bounded scan
        f.write(bytes(3 * MiB))
    c = imagecheck.probe(p, scan_limit=2 * MiB, edge=MiB)
    assert not c.holds_data
    assert c.scanned == "the first 2 MiB of its allocated extents and its last 1 MiB read"
    with open(p, "r+b") as f:                     # in the last `edge` bytes: seen
        f.seek(6 * MiB)
        f.write(b"\2")
    assert imagecheck.probe(p, scan_limit=2 * MiB, edge=MiB).first_nonzero == 6 * MiB
    assert imagecheck.probe(p).first_nonzero == 3 * MiB      # the default limit reads it all


def _sig_file(path, size, writes):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)
    return path


@pytest.mark.parametrize("writes,want", [
    ([(0, b"XFSB")], "XFS file system superblock"),
    ([(512, b"LABELONE" + bytes(16) + b"LVM2 001")], "LVM2 physical volume label (pvcreate)"),
    ([(4096, struct.pack("<I", 0xA92B4EFC))], "md RAID superblock (metadata 1.2)"),
    ([(8 * MiB - 8192, struct.pack("<I", 0xA92B4EFC))], "md RAID superblock (metadata 1.0)"),
    ([(8 * MiB - 65536, struct.pack("<I", 0xA92B4EFC))], "md RAID superblock (metadata 0.90)"),
    ([(510, b"\x55\xaa"), (512, b"EFI PART")], "GPT partition table"),
    ([(446 + 4, b"\x83"), (510, b"\x55\xaa")], "DOS (MBR) partition table"),
    ([(0, b"QFI\xfb\0\0\0\3")], "qcow2 image header"),
    ([(0, b"LUKS\xba\xbe")], "LUKS encryption header"),
    ([(65536 + 64, b"_BHRfS_M")], "btrfs file system superblock"),
    ([(1024 + 0x38, b"\x53\xef"), (1024 + 0x60, struct.pack("<I", 0x2C2))],
     "ext4 file system superblock"),
])
def test_known_signatures_are_named(tmp_path, writes, want):
    p = _sig_file(tmp_path / "sig.img", 8 * MiB, writes)
    c = imagecheck.probe(p, use_blkid=False)
    assert c.holds_data and c.signature == want
    with pytest.raises(ConfigError, match=want.replace("(", "\\(").replace(")", "\\)")):
        _create(tmp_path / "meta", "vol", [tmp_path / "a.img", p], size=8 * MiB)


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_a_real_ext4_file_system_is_named(tmp_path):
    p = tmp_path / "fs.img"
    with open(p, "wb") as f:
        f.truncate(16 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(p)], check=True, capture_output=True)
    with pytest.raises(ConfigError) as e:
        _create(tmp_path / "meta", "vol", [tmp_path / "a.img", p], size=16 * MiB)
    assert f"image {p} holds data (first non-zero byte at offset " in str(e.value)
    assert "; ext4 file system superblock)" in str(e.value)


# -- attach ------------------------------------------------------------------------------------

def test_attach_of_a_file_that_holds_data_refused_then_forced(tmp_path):
    meta = tmp_path / "meta"
    a, c = tmp_path / "a.img", tmp_path / "c.img"
    vol = _create(meta, "vol", [a], size=4 * MiB)
    try:
        vol.write(0, [memoryview(b"v" * 4096)])
        data = _precious(c, size=4 * MiB)
        with pytest.raises(ConfigError) as e:
            vol.attach(str(c))
        msg = str(e.value)
        assert msg.startswith(f"image {c} holds data (first non-zero byte at offset 0; 4 MiB "
                              f"allocated): attaching it to volume vol would overwrite it with "
                              f"a full copy of the volume (from {a}); refused"), msg
        assert "lvmirror attach --force" in msg
        assert c.read_bytes() == data and len(vol.images) == 1
        assert [im.path for im in VolumeMetadata.load(str(meta), "vol").images] == [str(a)]
        idx = vol.attach(str(c), force=True)
        _wait(vol)
        assert idx == 1 and vol.images[1].state is ImageState.IN_SYNC
        # an existing empty file needs no force
        d = tmp_path / "d.img"
        with open(d, "wb") as f:
            f.truncate(4 * MiB)
        assert vol.attach(str(d)) == 2
        _wait(vol)
    finally:
        vol.close()
    assert c.read_bytes() == a.read_bytes() == (tmp_path / "d.img").read_bytes()
    assert a.read_bytes()[:4096] == b"v" * 4096


def test_open_and_resync_of_the_volumes_own_images_are_not_checked(tmp_path):
    """The images of an existing volume hold its data: open, resync of a split image and the
    resumed initial copy must not be refused."""
    meta = tmp_path / "meta"
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    vol = _create(meta, "vol", [a, b], size=4 * MiB)
    _wait(vol)
    vol.write(0, [memoryview(b"d" * 8192)])
    vol.split(1)
    vol.write(0, [memoryview(b"e" * 4096)])
    vol.close()
    vol = MirrorVolume.open("vol", meta_dir=str(meta), flush_interval=None)
    try:
        job = vol.resync(1)
        assert job.wait(30) and job.state == "done"
        assert vol.images[1].state is ImageState.IN_SYNC
    finally:
        vol.close()
    assert a.read_bytes() == b.read_bytes()


# -- one file, two uses ------------------------------------------------------------------------

def test_an_image_of_another_volume_is_refused_at_create_and_attach(tmp_path):
    meta = tmp_path / "meta"
    a, b, c, d = (tmp_path / f"{n}.img" for n in "abcd")
    vol1 = _create(meta, "vol1", [a, b], size=4 * MiB)
    _wait(vol1)
    vol1.write(0, [memoryview(b"1" * 4096)])
    try:
        with pytest.raises(ConfigError) as e:
            _create(meta, "vol2", [c, b], size=4 * MiB, force=True)     # force does not help
        assert str(e.value).startswith(f"image {b} is an image of volume 'vol1'; two volumes "
                                       f"must not write the same storage")
        assert not c.exists() and not VolumeMetadata.exists(str(meta), "vol2")
        link = tmp_path / "link.img"
        link.symlink_to(b)
        with pytest.raises(ConfigError, match=f"image {link} is an image of volume 'vol1' "
                                              f"\\(as {b}, the same file\\)"):
            _create(meta, "vol2", [c, link], size=4 * MiB)
        hard = tmp_path / "hard.img"
        os.link(b, hard)
        with pytest.raises(ConfigError, match=f"image {hard} is an image of volume 'vol1' "
                                              f"\\(as {b}, the same file\\)"):
            _create(meta, "vol2", [hard], size=4 * MiB)
        vol2 = _create(meta, "vol2", [c], size=4 * MiB)
        try:
            with pytest.raises(ConfigError, match=f"image {b} is an image of volume 'vol1'"):
                vol2.attach(str(b), force=True)
            with pytest.raises(ConfigError, match=f"image {link} is an image of volume 'vol1'"):
                vol2.attach(str(link))
            assert len(vol2.images) == 1
            # once vol1 lets go of it, it may be attached (it holds vol1's data: force)
            vol1.detach(1)
            with pytest.raises(ConfigError, match=f"image {b} holds data"):
                vol2.attach(str(b))
            assert vol2.attach(str(b), force=True) == 1
            _wait(vol2)
            # and vol1 cannot take it back now
            with pytest.raises(ConfigError, match=f"image {b} is an image of volume 'vol2'"):
                vol1.attach(str(b), force=True)
            assert vol2.attach(str(d)) == 2
        finally:
            vol2.close()
    finally:
        vol1.close()


def test_the_same_file_twice_in_one_volume_is_refused(tmp_path):
    meta = tmp_path / "meta"
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _precious(a, size=MiB)
    link = tmp_path / "link.img"
    link.symlink_to(a)
    with pytest.raises(ConfigError, match=f"volume v: image path {link} is the same file as "
                                          f"{a} \\(real path {a}\\): an image path is listed "
                                          f"twice"):
        _create(meta, "v", [a, link])
    sub = tmp_path / "sub"
    sub.mkdir()
    spelled = f"{sub}/../a.img"
    with pytest.raises(ConfigError, match=f"volume v: an image path is listed twice: {spelled}"):
        _create(meta, "v", [a, spelled])
    os.link(a, b)
    with pytest.raises(ConfigError, match=f"image path {b} is the same file as {a}"):
        _create(meta, "v", [a, b])
    # a dangling symlink to a file create would make: the same path once created
    dangling = tmp_path / "dangling.img"
    dangling.symlink_to(tmp_path / "new.img")
    with pytest.raises(ConfigError, match="listed twice"):
        _create(meta, "v", [tmp_path / "new.img", dangling], size=MiB)
    vol = _create(meta, "v", [a], size=MiB)
    try:
        with pytest.raises(ConfigError, match=f"volume v: {link} is already one of its images "
                                              f"\\(as {a}\\)"):
            vol.attach(str(link))
    finally:
        vol.close()


# -- the cfgstring: force=1, and CheckConfig refuses early with the same messages ---------------

@pytest.mark.parametrize("text,spec", [
    ("vol0;images=/srv/new.img+/srv/precious.img;force=1",
     VolumeSpec("vol0", images=("/srv/new.img", "/srv/precious.img"), force=True)),
    ("vol0;images=/a+/b;region_size=64K;direct=1;force=1",
     VolumeSpec("vol0", images=("/a", "/b"), region_size=65536, direct=True, force=True)),
])
def test_force_option_round_trip(text, spec):
    assert cfgstring.parse(text) == spec
    assert cfgstring.format(spec) == text
    assert cfgstring.parse(cfgstring.format(spec)) == spec
    assert cfgstring.parse(text.replace("force=1", "force=0")).force is False
    assert "force=" not in cfgstring.format(cfgstring.parse(text.replace("force=1", "force=0")))


@pytest.mark.parametrize("text,fact", [
    ("vol0;images=/a+/b;force=yes", "force must be 0 or 1"),
    ("vol0;image=1;force=1", "force= applies to the creation of a volume from images="),
    ("vol0;force=1", "not to a volume named alone"),
])
def test_bad_force_option(text, fact):
    with pytest.raises(ConfigError, match=fact):
        cfgstring.parse(text)


def test_config_desc_documents_force():
    assert "[;force=1]" in cfgstring.CONFIG_DESC and "unless force=1" in cfgstring.CONFIG_DESC


def test_checkconfig_refuses_what_create_refuses_with_the_same_messages(tmp_path):
    state = tmp_path / "state"
    new, precious = tmp_path / "new.img", tmp_path / "precious.img"
    _precious(precious)
    cfg = f"vol;images={new}+{precious}"
    with pytest.raises(ConfigError) as checked:
        cfgstring.check(cfg, state_dir=str(state))
    with pytest.raises(ConfigError) as created:
        _create(state, "vol", [new, precious], size=8 * MiB)
    assert str(checked.value) == str(created.value)
    assert f"image {precious} holds data (first non-zero byte at offset 0; 8 MiB allocated)" \
        in str(checked.value)
    assert cfgstring.check(cfg + ";force=1", state_dir=str(state)).force is True
    # an image of another volume, also through a symlink
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    _create(state, "vol1", [a, b], size=MiB).close()
    with pytest.raises(ConfigError) as checked:
        cfgstring.check(f"vol2;images={tmp_path}/c.img+{b};force=1", state_dir=str(state))
    with pytest.raises(ConfigError) as created:
        _create(state, "vol2", [tmp_path / "c.img", b], size=MiB, force=True)
    assert str(checked.value) == str(created.value)
    assert str(checked.value).startswith(f"image {b} is an image of volume 'vol1'")
    link = tmp_path / "l.img"
    link.symlink_to(a)
    with pytest.raises(ConfigError, match=f"image path {link} is the same file as {a}"):
        cfgstring.check(f"vol3;images={a}+{link}", state_dir=str(state))
    # the volume exists: images= only identifies it; force and contents are not looked at
    assert cfgstring.check(f"vol1;images={a}+{b}", state_dir=str(state)).name == "vol1"


# -- block devices: O_EXCL and the holder's name -----------------------------------------------

def _fake_tree(root, *, holders=(), partitions=(), mounts=(), swaps=()):
    """A fake /sys and /proc for a disk 8:16 (sdb): ``holders``: (holder, dm name or None,
    md level or None, on partition or None); ``partitions``: (name, "maj:min");
    ``mounts``: ("maj:min", mount point, fstype, source); ``swaps``: device paths."""
    sysr, procr = root / "sys", root / "proc"
    dev = sysr / "devices" / "pci0" / "block" / "sdb"
    (dev / "holders").mkdir(parents=True)
    (sysr / "dev" / "block").mkdir(parents=True)
    (sysr / "dev" / "block" / "8:16").symlink_to(dev)
    for name, mm in partitions:
        (dev / name / "holders").mkdir(parents=True)
        (dev / name / "partition").write_text("1\n")
        (dev / name / "dev").write_text(mm + "\n")
    for holder, dm, md, part in holders:
        hdir = sysr / "class" / "block" / holder
        hdir.mkdir(parents=True)
        if dm:
            (hdir / "dm").mkdir()
            (hdir / "dm" / "name").write_text(dm + "\n")
        if md:
            (hdir / "md").mkdir()
            (hdir / "md" / "level").write_text(md + "\n")
        ((dev / part) if part else dev).joinpath("holders", holder).mkdir()
    (procr / "self").mkdir(parents=True)
    (procr / "self" / "mountinfo").write_text("".join(
        f"42 27 {mm} / {mp} rw,relatime - {fs} {src} rw\n" for mm, mp, fs, src in mounts)
        + "22 27 0:21 / /proc rw,relatime - proc proc rw\n")
    (procr / "swaps").write_text("Filename\tType\tSize\tUsed\tPriority\n" + "".join(
        f"{s}\tpartition\t1024\t0\t-2\n" for s in swaps))
    return str(sysr), str(procr)


def test_block_holders_named_from_a_fake_sys_tree(tmp_path):
    sysr, procr = _fake_tree(
        tmp_path,
        holders=[("dm-3", "vg0-lv0", None, None), ("md127", None, "raid1", "sdb2")],
        partitions=[("sdb1", "8:17"), ("sdb2", "8:18"), ("sdb3", "8:19")],
        mounts=[("8:17", "/srv/my\\040data", "ext4", "/dev/sdb1"),
                ("8:32", "/other", "xfs", "/dev/sdc")],
        swaps=["/dev/sdb3", "/dev/sdc1"])
    rdev = os.makedev(8, 16)
    assert imagecheck.block_holders(rdev, sys_root=sysr, proc_root=procr) == [
        "held by dm-3 (device-mapper vg0-lv0)",
        "held by md127 (md RAID array, raid1) on partition sdb2",
        "/dev/sdb1 mounted at /srv/my data (ext4)",
        "swap area /dev/sdb3",
    ]
    msg = imagecheck.busy_message("/dev/sdb", rdev, sys_root=sysr, proc_root=procr)
    assert msg.startswith("image /dev/sdb: the block device is busy: held by dm-3 "
                          "(device-mapper vg0-lv0); held by md127")
    assert "O_EXCL), as LIO's iblock backstore does" in msg


def test_busy_without_a_known_holder_says_another_process(tmp_path):
    sysr, procr = _fake_tree(tmp_path)
    rdev = os.makedev(8, 16)
    assert imagecheck.block_holders(rdev, sys_root=sysr, proc_root=procr) == []
    assert imagecheck.busy_message("/dev/sdb", rdev, sys_root=sysr, proc_root=procr) \
        .startswith("image /dev/sdb: the block device is busy: in use by another process")
    # nothing there at all (no sysfs entry): still an answer, no exception
    assert imagecheck.block_holders(rdev, sys_root=str(tmp_path / "none"),
                                    proc_root=str(tmp_path / "none")) == []


@pytest.fixture
def loopdev(tmp_path):
    """A 16 MiB loop device (root and a working losetup only; skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = tmp_path / "loop-backing.img"
    with open(backing, "wb") as f:
        f.truncate(16 * MiB)
    r = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"losetup does not work here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def test_block_device_is_opened_exclusively(loopdev, tmp_path):
    img = StorageImage.open(loopdev)
    try:
        assert img.is_block_device and img.size == 16 * MiB
        # a second exclusive user (another volume, a mount, mdadm...) is refused
        with pytest.raises(ConfigError) as e:
            StorageImage.open(loopdev)
        assert str(e.value).startswith(f"image {loopdev}: the block device is busy: in use by "
                                       f"another process")
        with pytest.raises(ConfigError, match="is busy"):
            imagecheck.check_exclusive(loopdev)
        # a non-exclusive reader (a backup of a split image) still may read
        fd = os.open(loopdev, os.O_RDONLY)
        os.close(fd)
    finally:
        img.close()
    StorageImage.open(loopdev).close()                # released on close
    imagecheck.check_exclusive(loopdev)


def test_a_held_block_device_is_refused_naming_the_holder(loopdev, tmp_path):
    fd = os.open(loopdev, os.O_RDONLY | os.O_EXCL)    # someone else's exclusive open
    try:
        meta = tmp_path / "meta"
        with pytest.raises(ConfigError, match=f"image {loopdev}: the block device is busy: "
                                              f"in use by another process"):
            _create(meta, "vol", [tmp_path / "a.img", loopdev], size=8 * MiB)
        with pytest.raises(ConfigError, match="the block device is busy"):
            cfgstring.check(f"vol;images={tmp_path}/a.img+{loopdev}", state_dir=str(meta))
    finally:
        os.close(fd)


def test_a_mounted_block_device_is_refused_naming_the_mount(loopdev, tmp_path):
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("needs e2fsprogs")
    subprocess.run(["mkfs.ext4", "-q", "-F", loopdev], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", loopdev, str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("mount does not work here")
    try:
        with pytest.raises(ConfigError) as e:
            StorageImage.open(loopdev)
        assert str(e.value).startswith(f"image {loopdev}: the block device is busy: "
                                       f"{loopdev} mounted at {mnt} (ext4)")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    # unmounted, it opens, but as a secondary it holds an ext4 file system
    with pytest.raises(ConfigError) as e:
        _create(tmp_path / "meta", "vol", [tmp_path / "a.img", loopdev], size=16 * MiB)
    assert str(e.value).startswith(f"image {loopdev} holds data (first non-zero byte at offset ")
    assert ("16 MiB block device, its first and last 4 MiB read; ext4 file system "
            "superblock)") in str(e.value)
    vol = _create(tmp_path / "meta", "vol", [tmp_path / "a.img", loopdev], size=16 * MiB,
                  force=True)
    try:
        _wait(vol)
        # the volume holds the device exclusively while it is open
        with pytest.raises(ConfigError, match="is busy"):
            StorageImage.open(loopdev)
    finally:
        vol.close()
    assert not imagecheck.probe(loopdev).holds_data       # the full copy of a sparse source


def test_lvmirrord_creates_with_force_from_the_cfgstring_and_attaches_with_force(tmp_path):
    """The daemon's path: a LUN's cfgstring ``force=1`` reaches MirrorVolume.create, and
    Lvmirrord.attach(force=...) (what AttachImageWithOptions calls) reaches the attach."""
    from lvmirror.daemon import Lvmirrord
    d = Lvmirrord(state_dir=str(tmp_path / "state"), with_bus=False)
    new, precious, other = (tmp_path / n for n in ("new.img", "precious.img", "other.img"))
    _precious(precious, size=4 * MiB)
    spec = cfgstring.parse(f"vol;images={new}+{precious}")
    with pytest.raises(ConfigError, match=f"image {precious} holds data"):
        d.registry.acquire(spec, lun="lun0", size=4 * MiB)
    assert d.check_config(f"lvmirror/vol;images={new}+{precious}")[0] is False
    assert d.check_config(f"lvmirror/vol;images={new}+{precious};force=1") == (True, "success")
    spec = cfgstring.parse(f"vol;images={new}+{precious};force=1")
    vol, _ = d.registry.acquire(spec, lun="lun0", size=4 * MiB)
    try:
        _wait(vol)
        _precious(other, size=4 * MiB, seed=9)
        with pytest.raises(ConfigError, match=f"image {other} holds data"):
            d.attach("vol", str(other))
        assert d.attach("vol", str(other), force=True) == 2
        _wait(vol)
    finally:
        d.registry.release(spec)
    assert precious.read_bytes() == other.read_bytes() == bytes(4 * MiB)


def test_block_holders_read_a_mount_path_that_is_not_utf8(tmp_path):
    """A mount point written raw with bytes that are not UTF-8 (the kernel escapes only blanks
    and backslash) is named, not a UnicodeDecodeError out of the busy message (the same
    mountinfo reader as ``image.fs_type``: ``imagecheck.read_mountinfo``)."""
    sysr, procr = _fake_tree(tmp_path, partitions=[("sdb1", "8:17")])
    mi = os.path.join(procr, "self", "mountinfo")
    with open(mi, "ab") as f:
        f.write(b"43 27 8:17 / /srv/caf\xe9\\040x rw shared:4 - xfs /dev/sdb1 rw\n")
    rdev = os.makedev(8, 16)
    assert imagecheck.block_holders(rdev, sys_root=sysr, proc_root=procr) == [
        "/dev/sdb1 mounted at /srv/caf\\xe9 x (xfs)"]
    msg = imagecheck.busy_message("/dev/sdb", rdev, sys_root=sysr, proc_root=procr)
    assert "mounted at /srv/caf\\xe9 x" in msg
    msg.encode("utf-8")              # D-Bus carries it: no lone surrogate left


def test_unescape_takes_only_octal_escapes():
    """``\\040`` is a space; a backslash before digits that are not octal stays (no
    ValueError out of read_swaps or read_mountinfo for such a line)."""
    assert imagecheck._unescape("/a\\040b") == "/a b"
    assert imagecheck._unescape("/x\\089") == "/x\\089"
    assert imagecheck._unescape("/x\\12") == "/x\\12"
