"""The cache attributes (``zarr.json`` of the group, key ``voxel_cache``), parsed once into
frozen dataclasses: what the build was asked for (:class:`CacheParams`, compared on resume),
what it recorded, and what later commands added (splits, subsets).

``to_json`` writes exactly the JSON every earlier version wrote (keys that did not exist
then are left out while they hold their default), so ``from_json(doc).to_json() == doc``
and an old cache still opens and still resumes. Keys this version does not know are kept
in ``extra`` and written back untouched.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from cache_tools.format.lattice import LatticeParams
from cache_tools.format.names import ASSEMBLY_ASYM, ATTRS_KEY, FORMAT_NAME, FORMAT_VERSION, OCCUPANCIES, CacheError
from cache_tools.format.store import chunk_crc32, commit, discard, read_json, stage_arrays, write_json_atomic


def _known(cls, doc: dict) -> tuple[dict, dict]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in doc.items() if k in names}, {k: v for k, v in doc.items() if k not in names}


@dataclass(frozen=True)
class ImageParams:
    grid_voxels: int
    resolution_A: float
    n_channels: int
    atom_radius_A: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VoxelizerParams:
    name: str
    version: str
    fill_algorithm: str
    agg_algorithm: str
    occupancy: Any = 1.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StorageParams:
    """How float32 images are stored: ``dtype``, and ``scale`` that turns stored values back
    into voxel values (``uint8_max / 255`` for uint8, else 1)."""
    dtype: str
    scale: float
    max_abs_error: float | str
    uint8_max: float | None = None

    def to_json(self) -> dict:
        doc = {"dtype": self.dtype, "scale": self.scale, "max_abs_error": self.max_abs_error}
        return {**doc, "uint8_max": self.uint8_max} if self.uint8_max is not None else doc


@dataclass(frozen=True)
class OriginsParams:
    """How origins were chosen: ``rule`` "neighbor-count" (its settings) or "file" (``path``, ``sha256``)."""
    rule: str
    seed: int = 0
    min_neighbors: int | None = None
    neighbor_radius_A: float | None = None
    min_spacing_A: float | None = None
    max_per_structure: int | None = None
    path: str | None = None
    sha256: str | None = None

    _ORDER = ("rule", "min_neighbors", "neighbor_radius_A", "min_spacing_A", "max_per_structure", "path",
              "sha256", "seed")

    def to_json(self) -> dict:
        doc = {k: getattr(self, k) for k in self._ORDER}
        return {k: v for k, v in doc.items() if v is not None or (k in ("path", "sha256") and self.rule == "file")}


@dataclass(frozen=True)
class Compression:
    codec: str
    level: int

    def to_json(self) -> dict:
        return {"codec": self.codec, "level": self.level}


@dataclass(frozen=True)
class CacheParams:
    """Everything that decides a cache's bytes: equal params and inputs resume a build."""
    channels: tuple[tuple[str, ...], ...]
    image: ImageParams
    voxelizer: VoxelizerParams
    storage: StorageParams
    origins: OriginsParams
    rotations: int
    centers: str | None               # "lattice" (snapped, cut from tiles), "exact", or None: built
                                      # before the lattice, each origin voxelized on its own (exact)
    origins_per_shard: int            # as asked: 0 = automatic
    inputs_sha256: str
    n_inputs: int
    keep_duplicates: bool = False
    compression: Compression | None = None
    lattice: LatticeParams | None = None  # the lattice layout (None: one image per origin)
    assembly: str = ASSEMBLY_ASYM     # --assembly: "asym", "first", an assembly id, or "origins" (per
                                      # structure, from the --origins file); what each structure got:
                                      # format.assemblies()
    occupancy: str = OCCUPANCIES[0]   # --occupancy: "one" (first conformer at weight 1) or "weight"
    extra: dict = field(default_factory=dict, compare=True)

    @property
    def layout(self) -> str:
        """"lattice" (structures voxelized once, views cut at training time) or "origins"."""
        return "lattice" if self.lattice is not None else "origins"

    @property
    def scale(self) -> float:
        """Multiply stored values by this to get float32 voxel values (1.0 unless uint8)."""
        return float(self.storage.scale)

    @property
    def snapped(self) -> bool:
        """Origins snapped to the image lattice (and cut from tiles), not voxelized one by one."""
        return self.centers == "lattice"

    @property
    def channel_names(self) -> list[str]:
        return ["|".join(c) for c in self.channels]

    @classmethod
    def from_json(cls, doc: dict) -> "CacheParams":
        known, extra = _known(cls, doc)
        compression = known.get("compression")
        return cls(
            channels=tuple(tuple(c) for c in known["channels"]),
            image=ImageParams(**known["image"]),
            voxelizer=VoxelizerParams(**known["voxelizer"]),
            storage=StorageParams(**known["storage"]),
            origins=OriginsParams(**known["origins"]),
            rotations=int(known["rotations"]),
            centers=known.get("centers"),
            origins_per_shard=int(known["origins_per_shard"]),
            inputs_sha256=known["inputs_sha256"], n_inputs=int(known["n_inputs"]),
            keep_duplicates=bool(known.get("keep_duplicates", False)),
            compression=Compression(**compression) if compression else None,
            lattice=LatticeParams(**known["lattice"]) if known.get("lattice") else None,
            assembly=str(known.get("assembly", ASSEMBLY_ASYM)), occupancy=str(known.get("occupancy", OCCUPANCIES[0])),
            extra=extra)

    def to_json(self) -> dict:
        return {
            "channels": [list(c) for c in self.channels],
            "image": self.image.to_json(),
            "voxelizer": self.voxelizer.to_json(),
            "storage": self.storage.to_json(),
            "origins": self.origins.to_json(),
            "rotations": self.rotations,
            **({"centers": self.centers} if self.centers is not None else {}),
            "origins_per_shard": self.origins_per_shard,
            "inputs_sha256": self.inputs_sha256,
            "n_inputs": self.n_inputs,
            # only when set, so caches built before these options existed keep their fingerprint
            **({"keep_duplicates": True} if self.keep_duplicates else {}),
            **({"compression": self.compression.to_json()} if self.compression else {}),
            **({"lattice": self.lattice.to_json()} if self.lattice else {}),
            **({"assembly": self.assembly} if self.assembly != ASSEMBLY_ASYM else {}),
            **({"occupancy": self.occupancy} if self.occupancy != OCCUPANCIES[0] else {}),
            **self.extra,
        }


@dataclass(frozen=True)
class InputNote:
    """An input the build reports: failed (``reason``), empty images (``reason``) or a duplicate (``same_as``)."""
    path: str
    id: str | None = None
    reason: str | None = None
    same_as: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k == "id"}


@dataclass(frozen=True)
class SubsetRecord:
    where: str
    structures: int
    origins: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OriginSetRecord:
    """How an origin set (``cache-tools origins``) was made, and its counts.

    ``rule``: ``"file"`` (``path``, ``sha256`` of the CSV, ``rows`` read, ``empty``: origins whose
    build-size view holds no atom) or ``"mass-count"`` (``min_neighbors``, ``neighbor_radius_A``,
    ``min_spacing_A``, ``max_per_structure``, ``seed``; ``candidates``: lattice points that passed
    the count before thinning). ``origins`` in ``structures`` (those with at least one).
    """
    rule: str
    origins: int
    structures: int
    path: str | None = None
    sha256: str | None = None
    rows: int | None = None
    empty: int | None = None
    min_neighbors: int | None = None
    neighbor_radius_A: float | None = None
    min_spacing_A: float | None = None
    max_per_structure: int | None = None
    seed: int | None = None
    candidates: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, doc: dict) -> "OriginSetRecord":
        known, extra = _known(cls, doc)
        known.pop("extra", None)
        return cls(**known, extra=extra)

    def to_json(self) -> dict:
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in doc.items() if v is not None}, **self.extra}


@dataclass(frozen=True)
class CacheAttrs:
    """The whole attribute record of a cache (see the module docstring)."""
    params: CacheParams
    complete: bool = False
    params_crc32: int | None = None                     # params_checksum(params) as built (None: older caches)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    pipeline_version: str | None = None
    build: dict = field(default_factory=dict)          # timings and counts of the last run (informative)
    failures: tuple[InputNote, ...] = ()
    duplicates: tuple[InputNote, ...] = ()
    empty: tuple[InputNote, ...] = ()
    asym_fallbacks: tuple[InputNote, ...] = ()          # an assembly was asked; the file has none
    metadata_crc32: dict = field(default_factory=dict)  # array name -> crc32 of its data file
    splits: tuple[str, ...] = ()                        # names of the codes in structures/split
    split_params: dict | None = None
    subsets: dict = field(default_factory=dict)         # name -> SubsetRecord
    origin_sets: dict = field(default_factory=dict)     # name -> OriginSetRecord (cache-tools origins)
    extra: dict = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.params.scale

    @property
    def saturated_voxels(self) -> int:
        return int(self.build.get("saturated_voxels", 0) or 0)

    @property
    def no_usable_input(self) -> bool:
        """The last build stopped because every input failed (``failures`` says why): nothing
        was built, and the same inputs would fail again."""
        return not self.complete and bool(self.build.get("no_usable_input"))

    def incomplete_reason(self) -> str:
        """Why a cache that is not complete cannot be read, and what to do about it."""
        if self.no_usable_input:
            return (f"nothing was built: no usable input (all {len(self.failures)} inputs failed; "
                    "`cache-tools info` lists why); fix or replace the inputs, then build again")
        return ("build incomplete (still building or interrupted; rerun the same "
                "`pipeline build-cache` command to finish it)")

    @classmethod
    def from_json(cls, doc: dict) -> "CacheAttrs":
        known, extra = _known(cls, doc)
        notes = lambda key: tuple(InputNote(**n) for n in known.get(key) or ())  # noqa: E731
        return cls(
            params=CacheParams.from_json(known["params"]),
            complete=bool(known.get("complete", False)),
            params_crc32=int(known["params_crc32"]) if known.get("params_crc32") is not None else None,
            format=known.get("format", FORMAT_NAME), format_version=known.get("format_version", FORMAT_VERSION),
            pipeline_version=known.get("pipeline_version"),
            build=dict(known.get("build") or {}),
            failures=notes("failures"), duplicates=notes("duplicates"), empty=notes("empty"),
            asym_fallbacks=notes("asym_fallbacks"),
            metadata_crc32={k: int(v) for k, v in (known.get("metadata_crc32") or {}).items()},
            splits=tuple(known.get("splits") or ()),
            split_params=known.get("split_params"),
            subsets={name: SubsetRecord(**s) for name, s in (known.get("subsets") or {}).items()},
            origin_sets={name: OriginSetRecord.from_json(s) for name, s in (known.get("origin_sets") or {}).items()},
            extra=extra)

    def to_json(self) -> dict:
        doc: dict[str, Any] = {"format": self.format, "format_version": self.format_version,
                               "complete": self.complete, "params": self.params.to_json()}
        if self.params_crc32 is not None:
            doc["params_crc32"] = self.params_crc32
        if self.pipeline_version is not None:
            doc["pipeline_version"] = self.pipeline_version
        doc["build"] = self.build
        if self.complete or self.failures or self.duplicates or self.empty:
            doc.update(failures=[n.to_json() for n in self.failures],
                       duplicates=[n.to_json() for n in self.duplicates],
                       empty=[n.to_json() for n in self.empty])
        if self.asym_fallbacks:
            doc["asym_fallbacks"] = [n.to_json() for n in self.asym_fallbacks]
        if self.metadata_crc32:
            doc["metadata_crc32"] = dict(self.metadata_crc32)
        if self.splits:
            doc["splits"] = list(self.splits)
        if self.split_params is not None:
            doc["split_params"] = self.split_params
        if self.subsets:
            doc["subsets"] = {name: s.to_json() for name, s in self.subsets.items()}
        if self.origin_sets:
            doc["origin_sets"] = {name: s.to_json() for name, s in self.origin_sets.items()}
        return {**doc, **self.extra}

    def replace(self, **changes: Any) -> "CacheAttrs":
        return dataclasses.replace(self, **changes)


def read_attrs(root: str | os.PathLike) -> CacheAttrs:
    """The cache attributes, after checking that ``root`` is a cache this code can read."""
    root = Path(root)
    if not root.exists():
        raise CacheError(f"{root}: no such cache (path does not exist)")
    if not root.is_dir():
        raise CacheError(f"{root}: not a cache (expected a zarr v3 directory store)")
    meta = read_json(root / "zarr.json", "zarr group metadata")
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise CacheError(f"{root}: not a zarr v3 group")
    doc = (meta.get("attributes") or {}).get(ATTRS_KEY)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CacheError(f"{root}: zarr group is not a voxel cache (no '{ATTRS_KEY}' attributes)")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{root}: format version {version} is not supported (this code reads version {FORMAT_VERSION})")
    try:
        return CacheAttrs.from_json(doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{root}: damaged cache attributes in zarr.json ({type(exc).__name__}: {exc})") from None


def params_checksum(params: CacheParams | dict) -> int:
    """crc32 of the canonical JSON (sorted keys, no spaces) of the build parameters: what decides
    what the stored images mean (scale, dtype, grid, resolution, channels, compression, layout,
    assembly, occupancy, ...). The build records it; a hand edit of any of them then shows."""
    doc = params.to_json() if isinstance(params, CacheParams) else params
    return zlib.crc32(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())


def params_problem(attrs: CacheAttrs) -> str | None:
    """Why the build parameters in zarr.json are not the ones the build recorded, or None
    (also None for a cache built before the checksum: nothing to compare with)."""
    if attrs.params_crc32 is None or params_checksum(attrs.params) == attrs.params_crc32:
        return None
    return ("cache attributes changed since the build: the parameters in zarr.json (scale, dtype, grid, "
            "channels, ...) are not the ones the images were built with (params checksum mismatch); "
            "restore zarr.json or rebuild the cache")


def require_params_intact(root: str | os.PathLike, attrs: CacheAttrs) -> None:
    """CacheError (one line) when the build parameters were edited after the build."""
    problem = params_problem(attrs)
    if problem is not None:
        raise CacheError(f"{root}: {problem}")


def require_complete(root: str | os.PathLike, attrs: CacheAttrs) -> None:
    if not attrs.complete:
        raise CacheError(f"{root}: {attrs.incomplete_reason()}")


def write_attrs(root: str | os.PathLike, attrs: CacheAttrs) -> None:
    """Atomically write ``attrs`` as the group's cache attributes (other group attributes kept)."""
    path = Path(root, "zarr.json")
    meta = read_json(path, "zarr group metadata") if path.exists() else \
        {"zarr_format": 3, "node_type": "group", "attributes": {}}
    meta.setdefault("attributes", {})[ATTRS_KEY] = attrs.to_json()
    write_json_atomic(path, meta)


def update_attrs(root: str | os.PathLike, change: Callable[[CacheAttrs], CacheAttrs] | None = None,
                 **changes: Any) -> CacheAttrs:
    """Read, change (``change(attrs)`` and/or fields ``changes``) and atomically rewrite the attributes."""
    attrs = read_attrs(root)
    if change is not None:
        attrs = change(attrs)
    if changes:
        attrs = attrs.replace(**changes)
    write_attrs(root, attrs)
    return attrs


def replace_arrays(root: str | os.PathLike, arrays: dict[str, Any], forget: Callable[[CacheAttrs], CacheAttrs],
                   name: Callable[[CacheAttrs, dict[str, int]], CacheAttrs]) -> CacheAttrs:
    """Store metadata arrays a command adds after the build (a split, a subset) crash-safely.

    Every file is staged first (a full disk or a read-only cache fails there, and nothing has
    changed); then ``forget`` drops the old record from the attributes (a crash from here on
    leaves no such record, never old attributes over new files); the files are renamed in; and
    ``name(attrs, crc32 of each array)`` records them last. Returns the attributes written.
    """
    staged = stage_arrays(root, arrays)
    try:
        attrs = read_attrs(root)
        if forget(attrs) != attrs:
            write_attrs(root, forget(attrs))
        commit(staged)
    except BaseException:
        discard(staged, root)
        raise
    crcs = {array: chunk_crc32(root, array) for array in arrays}
    return update_attrs(root, lambda a: name(a, crcs))
