"""VolumeMetadata: the persistent state of one mirror volume.

Lives in ``<meta_dir>/<volume name>/``::

    volume.json           this record (JSON, replaced atomically: temp file, fsync, rename, fsync dir)
    image-<id>.bitmap     change bitmap of a split / failed / syncing image (RegionBitmap format)
    image-<id>.restore    restore bitmap while a restore from that image runs
    wil.bitmap            the write-intent (dirty-region) log

``volume.json`` carries a format version, the volume's name, uuid and geometry, the images
(path, state, generation, split time, error text, resync checkpoint), a volume generation
(an event counter bumped on every state change), ``clean_shutdown``: False from open until
a clean close, so the next open knows whether crash recovery is needed, and ``image_history``:
every image path the volume has had (added by create or attach, kept after a detach), which
``check_named_images`` uses to accept a LUN's cfgstring written before an attach or detach.
A file written before ``image_history`` existed loads with the current image paths as its
history; the field is an optional addition to format version 1, which older code ignores.
``intent_chunk`` (bytes one write-intent log bit covers) is another: a file without it loads
with the default, ``INTENT_CHUNK`` (the log on disk is coarsened to it when the volume opens).

Image ids are stable (bitmap files are named by id); an image's *index* is its position in
the list, which is what the API and the administrator see.

``load`` validates every field and raises ConfigError naming the file and the field, so a
hand-edited or foreign file is refused rather than trusted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid as _uuid

from lvmirror.errors import ConfigError
from lvmirror.mirror.bitmap import atomic_write

__all__ = ["FORMAT_VERSION", "INTENT_CHUNK", "MAX_REGION", "ImageRecord", "VolumeMetadata",
           "geometry_problem", "valid_volume_name"]

FORMAT_VERSION = 1
# bytes of the volume one write-intent bit covers by default: mdadm's internal bitmap chunk
# ("defaults to 64Meg", mdadm(8) --bitmap-chunk); never finer than the volume's region_size
INTENT_CHUNK = 64 << 20
# the largest region_size and intent_chunk a volume may have (bytes): the bitmaps' headers hold
# them as u64, and a bit for more than a TiB marks nothing useful
MAX_REGION = 1 << 40
STATES = ("in-sync", "syncing", "split", "failed")


def geometry_problem(block_size: int, region_size, intent_chunk) -> str | None:
    """What is wrong with a volume's ``region_size`` (bytes: a power of two from
    ``block_size`` to MAX_REGION) or ``intent_chunk`` (a power of two from ``region_size`` to
    MAX_REGION; None: not checked), or None. ``MirrorVolume.create`` and ``from_json`` say it
    in their own errors."""
    def bad(v, low):
        return (not isinstance(v, int) or isinstance(v, bool) or v < low or v > MAX_REGION
                or v & (v - 1))
    if bad(region_size, block_size):
        return (f"region_size {region_size!r:.40} must be a power of two from block_size "
                f"{block_size} to {MAX_REGION}")
    if intent_chunk is not None and bad(intent_chunk, region_size):
        return (f"intent_chunk (the write-intent chunk) {intent_chunk!r:.40} must be a power "
                f"of two from region_size {region_size} to {MAX_REGION}")
    return None
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def valid_volume_name(name) -> bool:
    """Volume names become directory names: letters, digits, ``_ . : -``, no leading dot."""
    return isinstance(name, str) and bool(_NAME_RE.match(name))


@dataclasses.dataclass
class ImageRecord:
    """One image as persisted."""

    id: int
    path: str
    state: str
    generation: int = 0
    split_time: float | None = None     # wall clock (time.time()) of the split instant T
    error: str | None = None
    resync_next: int | None = None      # resync checkpoint: next region to copy (None: no resync)
    resync_full: bool = False           # the running resync copies every region (attach/create)
    resync_rate: float | None = None    # MB/s limit of the interrupted resync
    restore_running: bool = False       # a restore from this (split) image was in progress
    restore_rate: float | None = None   # MB/s limit of that restore (kept across a restart)
    # a split image's identity as of the split (copyid.record: stat fields and a content
    # sample), compared before a resync or restore trusts its change bitmap; None: not split,
    # or split by an older lvmirror
    copy_id: dict | None = None

    def to_json(self) -> dict:
        """The record as a JSON-ready dict, every field (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class VolumeMetadata:
    """The contents of ``volume.json`` (see the module docstring). Bytes: ``block_size`` (512 or
    4096), ``size`` (a multiple of it), ``region_size`` (a power of two >= block_size). ``images``
    in index order, ``next_image_id`` above every id; ``load`` / ``from_json`` validate all of it,
    ``save`` writes it."""
    name: str
    uuid: str
    block_size: int
    size: int
    region_size: int
    images: list[ImageRecord]
    generation: int = 0
    clean_shutdown: bool = True
    next_image_id: int = 0
    version: int = FORMAT_VERSION
    # every image path the volume has had, in the order first added (create / attach); a
    # detach keeps the path here. See check_named_images.
    image_history: list[str] = dataclasses.field(default_factory=list)
    # bytes one write-intent log bit covers (a power of two >= region_size; 0: not yet
    # chosen, ``new`` / ``from_json`` set it). See MirrorVolume.create's ``intent_chunk``.
    intent_chunk: int = 0

    # -- paths ----------------------------------------------------------------------------------

    @staticmethod
    def volume_dir(meta_dir, name) -> str:
        """``<meta_dir>/<name>``: the volume's state directory (not created here)."""
        return os.path.join(os.fspath(meta_dir), name)

    @staticmethod
    def json_path(meta_dir, name) -> str:
        """``<meta_dir>/<name>/volume.json``: where ``save`` writes and ``load`` reads."""
        return os.path.join(os.fspath(meta_dir), name, "volume.json")

    @staticmethod
    def bitmap_path(vdir, image_id) -> str:
        """``<vdir>/image-<id>.bitmap``: the change bitmap of image ``image_id`` (``vdir`` from
        ``volume_dir``)."""
        return os.path.join(vdir, f"image-{image_id}.bitmap")

    @staticmethod
    def restore_path(vdir, image_id) -> str:
        """``<vdir>/image-<id>.restore``: the restore bitmap while a restore from image ``image_id``
        runs."""
        return os.path.join(vdir, f"image-{image_id}.restore")

    @staticmethod
    def wil_path(vdir) -> str:
        """``<vdir>/wil.bitmap``: the write-intent log."""
        return os.path.join(vdir, "wil.bitmap")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def new(cls, name, *, block_size, size, region_size, intent_chunk=None) -> VolumeMetadata:
        """A record for a new volume: a random uuid, no images yet (``add_image``), generation 0,
        clean_shutdown True. Sizes in bytes, not validated here; not saved. ``intent_chunk``
        None: ``max(region_size, INTENT_CHUNK)``."""
        return cls(name=name, uuid=str(_uuid.uuid4()), block_size=block_size, size=size,
                   region_size=region_size, images=[],
                   intent_chunk=intent_chunk or max(region_size, INTENT_CHUNK))

    def add_image(self, path, state, generation=0) -> ImageRecord:
        """Append a new image record (path: str or PathLike; state: one of STATES) with the
        next free id and record its path in ``image_history``; returns the record. The caller
        saves the metadata."""
        rec = ImageRecord(id=self.next_image_id, path=os.fspath(path), state=state,
                          generation=generation)
        self.next_image_id += 1
        self.images.append(rec)
        self._remember(rec.path)
        return rec

    def _remember(self, path) -> None:
        known = {os.path.abspath(p) for p in self.image_history}
        if os.path.abspath(path) not in known:
            self.image_history.append(path)

    # -- the cfgstring's images= list ------------------------------------------------------------

    def check_named_images(self, paths) -> bool:
        """Decide whether a LUN cfgstring's ``images=`` list may serve this existing volume.

        The rule (the one place it lives; lvmirrord's VolumeRegistry and targetcli's CheckConfig
        both call it): the list is accepted iff every path it names is, or was, an image of this
        volume (``image_history`` plus the current images; absolute paths compared). Order and
        count do not matter.

        Why: a live LUN's cfgstring cannot change, and LIO and every saved targetcli
        configuration keep the list the LUN was created with, while attach and detach change the
        volume's images. Requiring the current list would turn every attach or detach into an
        outage at the next restart; accepting any list would let a cfgstring written for another
        volume (a reused name, a copied configuration) serve this one. A path that was never an
        image of this volume is that second case and is refused.

        ``paths``: sequence of str (absolute paths, as ``cfgstring.parse`` gives them).
        Returns True if ``paths`` is exactly the current image list (same order), False if it is
        accepted but out of date (the images changed through attach/detach since the cfgstring
        was written; the volume's current images are what gets served).
        Raises ConfigError naming the volume's images and the path that never was one of them.
        """
        paths = [os.fspath(p) for p in paths]
        current = [im.path for im in self.images]
        known = {os.path.abspath(p) for p in self.image_history + current}
        foreign = [p for p in paths if os.path.abspath(p) not in known]
        if foreign:
            former = [p for p in self.image_history
                      if os.path.abspath(p) not in {os.path.abspath(c) for c in current}]
            raise ConfigError(
                f"volume {self.name!r} has images {'+'.join(current)}"
                + (f" (former images: {'+'.join(former)})" if former else "")
                + f"; the cfgstring names {'+'.join(paths)}, and "
                + ", ".join(foreign) + (" was" if len(foreign) == 1 else " were")
                + " never an image of this volume: the cfgstring was written for another "
                f"volume. Name the volume alone ('{self.name}') to serve it as it is, or give "
                f"the LUN another volume name")
        return [os.path.abspath(p) for p in paths] == [os.path.abspath(p) for p in current]

    # -- persistence ----------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The record as a JSON-ready dict, as ``save`` writes it (``from_json`` reads it back)."""
        d = dataclasses.asdict(self)
        d["images"] = [im.to_json() for im in self.images]
        return d

    def save(self, meta_dir) -> None:
        """Atomically replace volume.json (the directory is created if missing)."""
        vdir = self.volume_dir(meta_dir, self.name)
        os.makedirs(vdir, exist_ok=True)
        data = json.dumps(self.to_json(), indent=1, sort_keys=True).encode() + b"\n"
        atomic_write(self.json_path(meta_dir, self.name), data)

    @classmethod
    def exists(cls, meta_dir, name) -> bool:
        """True if ``<meta_dir>/<name>/volume.json`` exists (not read: ``load`` validates)."""
        return os.path.exists(cls.json_path(meta_dir, name))

    @classmethod
    def load(cls, meta_dir, name) -> VolumeMetadata:
        """Read and validate volume.json; ConfigError naming the problem."""
        if not valid_volume_name(name):
            raise ConfigError(f"invalid volume name {name!r}")
        path = cls.json_path(meta_dir, name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ConfigError(f"volume {name!r}: no metadata at {path}") from None
        except OSError as e:
            raise ConfigError(f"volume {name!r}: cannot read {path}: {e.strerror}") from None
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"volume {name!r}: {path} is not valid JSON: {e}") from None
        return cls.from_json(d, where=path)

    @classmethod
    def from_json(cls, d, *, where="metadata") -> VolumeMetadata:
        """Build from a decoded volume.json ``d``, validating every field: ConfigError
        ``"<where>: ..."`` naming it (version, type, geometry, state, duplicate id, no images...).
        ``image_history`` (optional) is completed with the current image paths."""
        def bad(msg):
            return ConfigError(f"{where}: {msg}")

        if not isinstance(d, dict):
            raise bad("top level is not an object")
        if d.get("version") != FORMAT_VERSION:
            raise bad(f"unsupported format version {d.get('version')!r} (want {FORMAT_VERSION})")

        def field(obj, key, typ, *, optional=False, ctx=""):
            if key not in obj:
                if optional:
                    return None
                raise bad(f"{ctx}missing field {key!r}")
            v = obj[key]
            if v is None and optional:
                return None
            if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise bad(f"{ctx}field {key!r} must be an integer, got {v!r}")
            if typ is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise bad(f"{ctx}field {key!r} must be a number, got {v!r}")
            if typ in (str, bool, list, dict) and not isinstance(v, typ):
                raise bad(f"{ctx}field {key!r} must be {typ.__name__}, got {v!r}")
            return v

        name = field(d, "name", str)
        if not valid_volume_name(name):
            raise bad(f"invalid volume name {name!r}")
        bs = field(d, "block_size", int)
        if bs not in (512, 4096):
            raise bad(f"block_size must be 512 or 4096, got {bs}")
        size = field(d, "size", int)
        if size <= 0 or size % bs:
            raise bad(f"size {size} must be a positive multiple of block_size {bs}")
        rs = field(d, "region_size", int)
        # written before intent_chunk existed (the log's bit covered one region): the default
        # now; MirrorVolume.open coarsens the log on disk to it (a superset of its marks)
        ic = field(d, "intent_chunk", int, optional=True)
        if ic is None and isinstance(rs, int):
            ic = max(rs, INTENT_CHUNK)
        problem = geometry_problem(bs, rs, ic)
        if problem:
            raise bad(problem)
        images = []
        ids = set()
        for n, im in enumerate(field(d, "images", list)):
            ctx = f"image {n}: "
            if not isinstance(im, dict):
                raise bad(f"{ctx}not an object")
            rec = ImageRecord(
                id=field(im, "id", int, ctx=ctx),
                path=field(im, "path", str, ctx=ctx),
                state=field(im, "state", str, ctx=ctx),
                generation=field(im, "generation", int, ctx=ctx),
                split_time=field(im, "split_time", float, optional=True, ctx=ctx),
                error=field(im, "error", str, optional=True, ctx=ctx),
                resync_next=field(im, "resync_next", int, optional=True, ctx=ctx),
                resync_full=bool(field(im, "resync_full", bool, optional=True, ctx=ctx)),
                resync_rate=field(im, "resync_rate", float, optional=True, ctx=ctx),
                restore_running=bool(field(im, "restore_running", bool, optional=True, ctx=ctx)),
                restore_rate=field(im, "restore_rate", float, optional=True, ctx=ctx),
                copy_id=field(im, "copy_id", dict, optional=True, ctx=ctx),
            )
            if rec.state not in STATES:
                raise bad(f"{ctx}unknown state {rec.state!r} (one of {', '.join(STATES)})")
            if rec.id in ids or rec.id < 0:
                raise bad(f"{ctx}duplicate or negative id {rec.id}")
            ids.add(rec.id)
            images.append(rec)
        if not images:
            raise bad("volume has no images")
        nid = field(d, "next_image_id", int)
        if nid <= max(ids):
            raise bad(f"next_image_id {nid} not above every image id")
        # Written before image_history existed: start it from the current images.
        history = field(d, "image_history", list, optional=True)
        if history is None:
            history = []
        for n, p in enumerate(history):
            if not isinstance(p, str) or not p:
                raise bad(f"image_history entry {n} must be a path, got {p!r}")
        md = cls(name=name, uuid=field(d, "uuid", str), block_size=bs, size=size,
                 region_size=rs, images=images, generation=field(d, "generation", int),
                 clean_shutdown=field(d, "clean_shutdown", bool), next_image_id=nid,
                 image_history=list(history), intent_chunk=ic)
        for rec in images:
            md._remember(rec.path)
        return md
