"""VolumeMetadata: the persistent state of one mirror volume.

Lives in ``<meta_dir>/<volume name>/``::

    volume.json           this record (JSON, replaced atomically: temp file, fsync, rename, fsync dir)
    image-<id>.bitmap     change bitmap of a split / failed / syncing image (RegionBitmap format)
    image-<id>.restore    restore bitmap while a restore from that image runs
    wil.bitmap            the write-intent (dirty-region) log

``volume.json`` carries a format version, the volume's name, uuid and geometry, the images
(path, state, generation, split time, error text, resync checkpoint), a volume generation
(an event counter bumped on every state change) and ``clean_shutdown``: False from open until
a clean close, so the next open knows whether crash recovery is needed.

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

__all__ = ["FORMAT_VERSION", "ImageRecord", "VolumeMetadata", "valid_volume_name"]

FORMAT_VERSION = 1
STATES = ("in-sync", "syncing", "split", "failed")
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

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class VolumeMetadata:
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

    # -- paths ----------------------------------------------------------------------------------

    @staticmethod
    def volume_dir(meta_dir, name) -> str:
        return os.path.join(os.fspath(meta_dir), name)

    @staticmethod
    def json_path(meta_dir, name) -> str:
        return os.path.join(os.fspath(meta_dir), name, "volume.json")

    @staticmethod
    def bitmap_path(vdir, image_id) -> str:
        return os.path.join(vdir, f"image-{image_id}.bitmap")

    @staticmethod
    def restore_path(vdir, image_id) -> str:
        return os.path.join(vdir, f"image-{image_id}.restore")

    @staticmethod
    def wil_path(vdir) -> str:
        return os.path.join(vdir, "wil.bitmap")

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def new(cls, name, *, block_size, size, region_size) -> VolumeMetadata:
        return cls(name=name, uuid=str(_uuid.uuid4()), block_size=block_size, size=size,
                   region_size=region_size, images=[])

    def add_image(self, path, state, generation=0) -> ImageRecord:
        rec = ImageRecord(id=self.next_image_id, path=os.fspath(path), state=state,
                          generation=generation)
        self.next_image_id += 1
        self.images.append(rec)
        return rec

    # -- persistence ----------------------------------------------------------------------------

    def to_json(self) -> dict:
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
            if typ in (str, bool, list) and not isinstance(v, typ):
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
        if rs < bs or rs & (rs - 1):
            raise bad(f"region_size {rs} must be a power of two >= block_size {bs}")
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
        return cls(name=name, uuid=field(d, "uuid", str), block_size=bs, size=size,
                   region_size=rs, images=images, generation=field(d, "generation", int),
                   clean_shutdown=field(d, "clean_shutdown", bool), next_image_id=nid)
