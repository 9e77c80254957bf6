"""The ``user:lvmirror`` cfgstring: which mirror volume a LUN serves, and how.

Format (LIO stores it as ``dev_config = "lvmirror/" + cfgstring``, at most 255 bytes, no ':')::

    NAME[;images=/path/a+/path/b[+...]][;region_size=1M][;intent_chunk=64M]
        [;block_size=512|4096][;direct=0|1][;force=1][;leg_timeout=SECONDS][;state_dir=/path]
    NAME;image=N[;readonly=1][;state_dir=/path]

* ``NAME`` names the volume; its metadata, change bitmaps and write-intent log live in
  ``<state_dir>/NAME/`` (default: lvmirrord's ``--state-dir``, /var/lib/lvmirror).
* ``state_dir`` (an absolute path, the mount point of a file system) puts this volume's state there
  instead: on shared storage, so that the gateway that takes the volume over (high availability,
  ``ha/LogicalUnit``) finds its write-intent log, change bitmaps and split state, as dm-raid1
  keeps its log on a log device next to the legs. lvmirrord never creates it, and refuses the
  LUN when it is missing or not a mount point (its file system not mounted) rather than create
  a new volume on the wrong disk. Volumes in other state directories are not seen by the check that an image
  belongs to one volume only.
* ``images=`` (1 to 4 absolute paths, files or block devices, joined by '+': LIO splits its
  control string at ',', so a comma cannot appear in a cfgstring) creates the volume on first use
  (the first image is the source, the others are fully resynced from it; missing files are
  created sparse at the LUN size). Once the volume exists the list only identifies it: it is
  accepted iff every path it names is, or was, an image of the volume (attach / detach change
  the images, and a live LUN's cfgstring cannot follow them, so after a restart the LUN serves
  the volume's current images); a path that never was one of them means the cfgstring was
  written for another volume, and is refused (``VolumeMetadata.check_named_images``).
* ``region_size`` (a power of two, 4K..1G, default 1M) is the granularity of the change
  bitmaps (what a resync or restore copies); ``intent_chunk`` (a power of two, at least
  region_size, up to 1G; default 64M or region_size if larger, mdadm's ``--bitmap-chunk``
  default) the bytes one write-intent log bit covers: a write to a chunk whose bit is clear
  waits for the log's save, and after a crash every marked chunk is copied whole. Both are
  read when the volume is created and kept in its metadata; a cfgstring naming other values
  for an existing volume opens it with its own, with a warning in the log that names both.
  ``block_size`` the logical block
  size; ``direct=1`` opens the images with O_DIRECT.
* ``force=1`` lets the creation of the volume overwrite secondary images (every one but the
  first) that already hold data. Without it such an image is refused, saying what was found
  (a non-zero byte, a file system, LVM2 or md signature, a partition table...), as
  ``mdadm --create`` and ``pvcreate`` refuse a device that carries data: the initial full
  resync overwrites it (``mirror.imagecheck``). A new or sparse file, or one that reads as
  zeroes, needs no ``force``. It only matters when the volume is created; once it exists the
  option is ignored (but a LUN's cfgstring cannot change, so the saved targetcli
  configuration keeps it: if the state directory were lost, a restore would create the volume
  again and overwrite the secondaries without asking). An image that another volume uses
  and a block device held by another user are refused whatever ``force`` says.
* ``leg_timeout`` (seconds, 0 to 600, fractions allowed, 0 = never; default 4): how long one
  image may lag behind an in-sync image on the same write or flush, or take on a read, before
  it is failed as slow and the I/O completes without it (md's failfast, DRBD's disk-timeout);
  keep it below the initiators' SCSI command timeout. Read at every open, so a LUN created
  with it keeps it (``MirrorVolume.create``'s ``leg_timeout``).
* ``image=N`` exports split image N of volume NAME as its own LUN (the point-in-time copy, for a
  backup host). Writes to it are allowed (a journal replay needs them) and are recorded in its
  change bitmap, so a later resync or restore still copies exactly what differs.
  ``readonly=1`` exports it write-protected instead (WRITE answers DATA PROTECT, MODE SENSE
  shows WP): what a backup host that only reads should get.

Example: ``targetcli /backstores/user:lvmirror create name=lun0 size=10G
cfgstring=vol0;images=/srv/lun0-a.img+/srv/lun0-b.img``
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat

from lvmirror import rawtext
from lvmirror.errors import ConfigError
from lvmirror.mirror import imagecheck
from lvmirror.mirror.metadata import VolumeMetadata
from lvmirror.volname import check_volume_name

__all__ = ["CONFIG_DESC", "SUBTYPE", "VolumeSpec", "check", "check_volume_name", "format",
           "parse", "size_text", "state_dir_of"]

SUBTYPE = "lvmirror"
MAX_DEV_CONFIG = 255          # TCMU_CONFIG_LEN 256 with the NUL
MAX_IMAGES = 4
IMAGE_SEPARATOR = "+"
KEYS = ("images", "region_size", "intent_chunk", "block_size", "direct", "force", "leg_timeout",
        "image", "readonly", "state_dir")
_SIZE = re.compile(r"([0-9]+)([KMG]?)", re.IGNORECASE)     # ASCII digits only (\d takes any)
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")
LEG_TIMEOUT_MIN = 0.1      # seconds; below it a leg lagging by a context switch would be failed
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

CONFIG_DESC = (
    "VOLUME[;images=/path/a+/path/b][;region_size=1M][;intent_chunk=64M][;block_size=512|4096]"
    "[;direct=0|1]"
    "[;force=1][;leg_timeout=4][;state_dir=/path] or VOLUME;image=N[;readonly=1][;state_dir=/path]. "
    "A mirrored volume (metadata in /var/lib/lvmirror/VOLUME, or STATE_DIR/VOLUME with "
    "state_dir=, the mount point of a shared file system, for two gateways); images= creates it on first use from 1-4 image files or block "
    "devices (the first is the source; the others are overwritten by a full copy, so one that "
    "already holds data is refused unless force=1); later it may name "
    "any current or former image of the volume (attach/detach change them). image=N serves "
    "split image N of VOLUME as its own LUN (readonly=1: write-protected). Example: vol0;images=/srv/lun0-a.img+/srv/lun0-b.img")


@dataclasses.dataclass(frozen=True)
class VolumeSpec:
    """A parsed cfgstring (``parse``; ``format`` is the inverse). ``region_size``,
    ``intent_chunk`` (None: the engine's default) and ``block_size`` in bytes, ``leg_timeout``
    in seconds (None: the engine's default, 0: never).
    ``images`` creates or identifies the volume; ``image`` (index 0-3) exports that split image
    instead, ``readonly`` write-protecting it; ``direct``: O_DIRECT; ``force``: see the module
    docstring; ``state_dir``: the directory holding ``NAME/`` (None: lvmirrord's own)."""
    name: str
    images: tuple[str, ...] | None = None
    region_size: int = 1 << 20
    intent_chunk: int | None = None
    block_size: int = 512
    direct: bool = False
    force: bool = False
    leg_timeout: float | None = None     # seconds (None: the engine's default, 0: never)
    image: int | None = None
    readonly: bool = False
    state_dir: str | None = None


def _size(cfg, key, value):
    m = _SIZE.fullmatch(value)
    if not m:
        raise ConfigError(f"cfgstring {cfg!r}: {key}={value!r} is not a size (e.g. 64K, 1M)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse(cfg: str) -> VolumeSpec:
    """Parse a cfgstring (with or without the ``lvmirror/`` prefix); ConfigError says what is wrong."""
    if not isinstance(cfg, str):
        raise ConfigError(f"cfgstring must be text, got {type(cfg).__name__}")
    try:
        cfg.encode()
    except UnicodeEncodeError:
        # bytes that are not UTF-8 (configfs takes any; lvmirror reads them as surrogates:
        # rawtext), named as \xNN; text from D-Bus or the command line is always UTF-8
        raise ConfigError(f"cfgstring '{rawtext.shown(cfg)}': holds bytes that are not UTF-8 "
                          f"(lvmirror's image paths, options and names are UTF-8 text)") from None
    orig = cfg
    if "=" in cfg.split(";", 1)[0]:
        raise ConfigError(f"cfgstring {orig!r}: starts with an option, not a volume name "
                          f"(expected e.g. 'vol0;images=/srv/a.img+/srv/b.img')")
    if "/" in cfg.split(";", 1)[0]:
        sub, _, cfg = cfg.partition("/")
        if sub != SUBTYPE:
            raise ConfigError(f"cfgstring {orig!r}: handler {sub!r} is not {SUBTYPE!r} (a "
                              f"volume name holds no '/'; the cfgstring is VOLUME;... or "
                              f"{SUBTYPE}/VOLUME;...)")
    if len(SUBTYPE) + 1 + len(cfg.encode()) > MAX_DEV_CONFIG:
        raise ConfigError(f"cfgstring {cfg!r}: {len(cfg.encode())} bytes; LIO allows "
                          f"{MAX_DEV_CONFIG - len(SUBTYPE) - 1}")
    if ":" in cfg:
        raise ConfigError(f"cfgstring {cfg!r}: ':' is not allowed in a LIO dev_config")
    if "," in cfg:
        raise ConfigError(f"cfgstring {cfg!r}: ',' is not allowed (LIO splits its control string "
                          f"at commas); join image paths with '+'")
    if any(c.isspace() for c in cfg) or not cfg.isprintable():
        raise ConfigError(f"cfgstring {cfg!r}: whitespace or control characters are not allowed")
    parts = cfg.split(";")
    name = parts[0]
    if not name:
        raise ConfigError(f"cfgstring {orig!r}: starts with no volume name "
                          f"(expected e.g. 'vol0;images=/srv/a.img+/srv/b.img')")
    check_volume_name(name, f"cfgstring {cfg!r}: ")
    opts: dict[str, str] = {}
    for p in parts[1:]:
        key, eq, value = p.partition("=")
        if not p:
            raise ConfigError(f"cfgstring {cfg!r}: an empty option (';' at the end or ';;'); "
                              f"options are key=value separated by single ';'")
        if not eq:
            raise ConfigError(f"cfgstring {cfg!r}: option {p!r} needs a value (key=value)")
        if key not in KEYS:
            raise ConfigError(f"cfgstring {cfg!r}: unknown option {key!r} (known: "
                              f"{', '.join(KEYS)})")
        if key in opts:
            raise ConfigError(f"cfgstring {cfg!r}: option {key!r} given twice")
        if not value:
            raise ConfigError(f"cfgstring {cfg!r}: option {key!r} has an empty value")
        opts[key] = value
    kw: dict = {}
    if "images" in opts:
        if "image" in opts:
            raise ConfigError(f"cfgstring {cfg!r}: images= (serve the volume) and image= (serve "
                              f"one split image) exclude each other")
        images = tuple(opts["images"].split(IMAGE_SEPARATOR))
        if not 1 <= len(images) <= MAX_IMAGES:
            raise ConfigError(f"cfgstring {cfg!r}: {len(images)} images; a volume has 1 to "
                              f"{MAX_IMAGES}")
        for p in images:
            if not p or not os.path.isabs(p):
                raise ConfigError(f"cfgstring {cfg!r}: image path {p!r} must be absolute")
            if os.path.normpath(p) != p:
                raise ConfigError(f"cfgstring {cfg!r}: image path {p!r} is not normalised "
                                  f"(write {os.path.normpath(p)!r})")
        if len(set(images)) != len(images):
            raise ConfigError(f"cfgstring {cfg!r}: an image path is listed twice")
        kw["images"] = images
    if "region_size" in opts:
        rs = _size(cfg, "region_size", opts["region_size"])
        if rs < 4096 or rs > 1 << 30 or rs & (rs - 1):
            raise ConfigError(f"cfgstring {cfg!r}: region_size must be a power of two from 4K "
                              f"to 1G, got {opts['region_size']}")
        kw["region_size"] = rs
    if "intent_chunk" in opts:
        ic = _size(cfg, "intent_chunk", opts["intent_chunk"])
        if ic < 4096 or ic > 1 << 30 or ic & (ic - 1):
            raise ConfigError(f"cfgstring {cfg!r}: intent_chunk must be a power of two from 4K "
                              f"to 1G, got {opts['intent_chunk']}")
        if ic < kw.get("region_size", 1 << 20):
            raise ConfigError(f"cfgstring {cfg!r}: intent_chunk {opts['intent_chunk']} is finer "
                              f"than region_size {opts.get('region_size', '1M')}: one "
                              f"write-intent bit covers one or more whole regions")
        kw["intent_chunk"] = ic
    if "block_size" in opts:
        if opts["block_size"] not in ("512", "4096"):
            raise ConfigError(f"cfgstring {cfg!r}: block_size must be 512 or 4096, got "
                              f"{opts['block_size']!r}")
        kw["block_size"] = int(opts["block_size"])
    if "direct" in opts:
        if opts["direct"] not in ("0", "1"):
            raise ConfigError(f"cfgstring {cfg!r}: direct must be 0 or 1, got {opts['direct']!r}")
        kw["direct"] = opts["direct"] == "1"
    if "force" in opts:
        if opts["force"] not in ("0", "1"):
            raise ConfigError(f"cfgstring {cfg!r}: force must be 0 or 1, got {opts['force']!r}")
        if "images" not in opts:
            what = "an exported split image" if "image" in opts else "a volume named alone"
            raise ConfigError(f"cfgstring {cfg!r}: force= applies to the creation of a volume "
                              f"from images= ('{name};images=/a+/b;force=1'), not to {what}")
        kw["force"] = opts["force"] == "1"
    if "leg_timeout" in opts:
        v = opts["leg_timeout"]
        lt = float(v) if _SECONDS.fullmatch(v) else -1.0
        if not (lt == 0 or LEG_TIMEOUT_MIN <= lt <= 600):
            raise ConfigError(f"cfgstring {cfg!r}: leg_timeout must be 0 (never) or a number of "
                              f"seconds from {LEG_TIMEOUT_MIN:g} to 600 (e.g. 4 or 2.5), got "
                              f"{v!r}")
        if "image" in opts:
            raise ConfigError(f"cfgstring {cfg!r}: leg_timeout= applies to a mirrored volume, "
                              f"not to an exported split image")
        kw["leg_timeout"] = lt
    if "image" in opts:
        if not re.fullmatch(r"[0-9]+", opts["image"]) or int(opts["image"]) >= MAX_IMAGES:
            raise ConfigError(f"cfgstring {cfg!r}: image must be an image index 0-"
                              f"{MAX_IMAGES - 1}, got {opts['image']!r}")
        for k in ("region_size", "intent_chunk", "block_size"):
            if k in opts:
                raise ConfigError(f"cfgstring {cfg!r}: {k} belongs to the volume, not to an "
                                  f"exported split image")
        kw["image"] = int(opts["image"])
    if "readonly" in opts:
        if opts["readonly"] not in ("0", "1"):
            raise ConfigError(f"cfgstring {cfg!r}: readonly must be 0 or 1, got "
                              f"{opts['readonly']!r}")
        if "image" not in opts:
            raise ConfigError(f"cfgstring {cfg!r}: readonly= applies to an exported split image "
                              f"('{name};image=N;readonly=1'), not to the live volume")
        kw["readonly"] = opts["readonly"] == "1"
    if "state_dir" in opts:
        sd = opts["state_dir"]
        if not os.path.isabs(sd) or os.path.normpath(sd) != sd or sd.startswith("//") \
                or sd == "/":
            raise ConfigError(f"cfgstring {cfg!r}: state_dir {sd!r} must be an absolute, "
                              f"normalised path other than / (e.g. "
                              f"{os.path.normpath('/' + sd.strip('/')) if sd.strip('/') else '/srv/ha'!r})")
        kw["state_dir"] = sd
    return VolumeSpec(name=name, **kw)


def state_dir_of(spec: VolumeSpec, default: str) -> str:
    """The directory holding ``spec``'s volume state (``<it>/NAME/``): the cfgstring's
    ``state_dir``, else ``default`` (lvmirrord's ``--state-dir``). A ``state_dir`` the
    cfgstring names must be a mount point (``os.path.ismount``): the shared file system that
    holds the state is mounted there (Pacemaker's Filesystem resource). It is never created,
    and an empty mount point whose file system is not mounted is refused, not taken for a new
    volume (which would resync over the secondary images). ConfigError says which."""
    if spec.state_dir is None:
        return default
    if not os.path.isdir(spec.state_dir):
        raise ConfigError(f"volume {spec.name!r}: state_dir {spec.state_dir} does not exist or is "
                          f"not a directory (is its shared file system mounted?)")
    if not os.path.ismount(spec.state_dir):
        raise ConfigError(f"volume {spec.name!r}: state_dir {spec.state_dir} is not a mount "
                          f"point: is its shared file system mounted? (a volume's shared state "
                          f"lives on a file system of its own, mounted there)")
    return spec.state_dir


def size_text(n: int) -> str:
    """``n`` bytes as a cfgstring size: the largest unit (G, M, K, none) that divides it -
    ``size_text(1 << 20) == "1M"``, ``size_text(1536) == "1536"``; ``parse`` reads it back."""
    unit = next(u for u in ("G", "M", "K", "") if n % _UNITS[u] == 0)
    return f"{n // _UNITS[unit]}{unit}"


def format(spec: VolumeSpec) -> str:   # noqa: A001 - the inverse of parse
    """``spec`` as a cfgstring without the ``lvmirror/`` prefix: the inverse of ``parse``,
    options at their defaults (region_size 1M, intent_chunk None, block_size 512, flags 0,
    leg_timeout None)
    left out. No validation: ``spec`` is expected to come from ``parse`` or to satisfy it."""
    parts = [spec.name]
    if spec.images is not None:
        parts.append("images=" + IMAGE_SEPARATOR.join(spec.images))
    if spec.image is not None:
        parts.append(f"image={spec.image}")
    if spec.region_size != 1 << 20:
        parts.append(f"region_size={size_text(spec.region_size)}")
    if spec.intent_chunk is not None:
        parts.append(f"intent_chunk={size_text(spec.intent_chunk)}")
    if spec.block_size != 512:
        parts.append(f"block_size={spec.block_size}")
    if spec.direct:
        parts.append("direct=1")
    if spec.force:
        parts.append("force=1")
    if spec.leg_timeout is not None:
        parts.append(f"leg_timeout={spec.leg_timeout:g}")
    if spec.readonly:
        parts.append("readonly=1")
    if spec.state_dir is not None:
        parts.append(f"state_dir={spec.state_dir}")
    return ";".join(parts)


def gateway_state_dirs(cfgstrings) -> set[str]:
    """The state directories (``state_dir=``) that ``cfgstrings`` name - the cfgstrings of
    every user:lvmirror backstore of this gateway, whichever lvmirrord process serves each - so
    that a new volume is checked against their volumes too. A cfgstring that does not parse,
    or names no state_dir, adds nothing."""
    out = set()
    for cfg in cfgstrings:
        try:
            spec = parse(cfg)
        except ConfigError:
            continue
        if spec.state_dir is not None:
            out.add(spec.state_dir)
    return out


def check(cfg: str, *, state_dir: str = "/var/lib/lvmirror", other_state_dirs=()) -> VolumeSpec:
    """``parse`` plus what the host can tell before the LUN is enabled (targetcli CheckConfig).

    ``cfg``: the cfgstring (with or without the ``lvmirror/`` prefix); ``state_dir``: where
    volume metadata lives. Returns the VolumeSpec. Raises ConfigError when the cfgstring is
    malformed, names a volume that does not exist without ``images=``, names a split image the
    volume lacks, or (for an existing volume) names in ``images=`` a path that never was an
    image of it (``VolumeMetadata.check_named_images``: an out-of-date list, left behind by
    attach/detach, is accepted, because a LUN's cfgstring cannot change and saved
    configurations must keep restoring), or (for a new volume) an image path that cannot be
    created or is not a regular file or block device, names one file twice (a symlink, another
    spelling), is a current image of another volume in ``state_dir``, is a block device another
    user holds (a brief O_EXCL open, as LIO's iblock does; the holder is named), or is a
    secondary image that holds data without ``force=1`` (mdadm --create / pvcreate behaviour);
    the messages are MirrorVolume.create's (``mirror.imagecheck``). A cfgstring's own
    ``state_dir`` replaces ``state_dir`` and must exist (``state_dir_of``).
    ``other_state_dirs``: more directories whose volumes may not share an image with a new one
    (those the gateway's other LUNs name, ``gateway_state_dirs``). Cost: see
    ``imagecheck.probe`` (at most 68 MiB read per existing file, 8 MiB per block device).
    """
    spec = parse(cfg)
    default_dir, state_dir = state_dir, state_dir_of(spec, state_dir)
    md = None
    if VolumeMetadata.exists(state_dir, spec.name):
        md = VolumeMetadata.load(state_dir, spec.name)    # ConfigError names file and field
    if spec.images is None:
        if md is None:
            raise ConfigError(f"volume {spec.name!r} does not exist in {state_dir}; create it "
                              f"with images= (e.g. '{spec.name};images=/srv/a.img+/srv/b.img')")
        if spec.image is not None and spec.image >= len(md.images):
            raise ConfigError(f"volume {spec.name!r} has {len(md.images)} images; there is no "
                              f"image {spec.image}")
        return spec
    if md is not None:
        # The volume exists: images= only identifies it (lvmirrord opens the images its
        # metadata lists), so the paths are not opened or checked on disk here; a former
        # image may be gone.
        md.check_named_images(spec.images)
        return spec
    for p in spec.images:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            if not os.path.isdir(os.path.dirname(p)):
                raise ConfigError(f"image {p}: directory {os.path.dirname(p)} does not exist")
            continue
        except OSError as e:
            raise ConfigError(f"image {p}: {e.strerror}") from e
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ConfigError(f"image {p}: not a regular file or block device")
    # What MirrorVolume.create will refuse, with its messages (mirror.imagecheck): the same
    # file twice, an image of another volume, a block device another user holds, a secondary
    # image that holds data without force=1.
    imagecheck.check_distinct(spec.images, name=spec.name)
    imagecheck.check_not_in_other_volume(spec.images, state_dir, name=spec.name)
    for d in sorted({default_dir, *other_state_dirs} - {state_dir}):
        if os.path.isdir(d):
            imagecheck.check_not_in_other_volume(spec.images, d, name=spec.name)
    for k, p in enumerate(spec.images):
        if not os.path.exists(p):
            continue
        imagecheck.check_exclusive(p)
        if k:
            imagecheck.check_create_secondary(spec.name, spec.images, k, force=spec.force)
    return spec
