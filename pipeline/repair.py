"""The build side of `cache-tools check`: find sources, re-voxelize origins, rewrite shards.

``cache_tools.check`` imports this module at one place (``check.build_side``), and only
for ``--sources PATH...``, ``--spot-check`` and ``--repair``, so the read side never
needs gemmi, scipy or macromol_voxelize otherwise. Everything here is the build's own
code: the same inputs and ids, the same parse, the same encoder, the same write task.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from cache_tools import format as fmt
from pipeline import write
from pipeline.build import BuildParams
from pipeline.encode import OriginEncoder
from pipeline.errors import BuildError, InputError
from pipeline.inputs import expand_inputs, structure_ids
from pipeline.lock import BuildLock, LockedError
from pipeline.origins import OriginRule
from pipeline.parse import ParseError, parse_atoms
from pipeline.tasks import shard_pieces, write_task
from pipeline.voxelize import ImageSpec, Storage

__all__ = ["BuildError", "InputError", "ParseError", "find_sources", "params_from_attrs", "rebuild_shards",
           "reference_encoder"]


def params_from_attrs(attrs: dict) -> BuildParams:
    """The parameters a cache was built with, from its attributes (to re-voxelize its origins)."""
    p = attrs["params"]
    rule = p["origins"]
    storage = p["storage"]
    return BuildParams(
        channels=p["channels"], image=ImageSpec(**p["image"]),
        storage=Storage(storage["dtype"], storage.get("uint8_max", fmt.UINT8_DEFAULT_MAX)),
        rule=OriginRule(**{k: v for k, v in rule.items() if k != "rule"}) if rule["rule"] != "file"
        else OriginRule(seed=rule.get("seed", 0)),
        rotations=int(p["rotations"]), origins_file=rule.get("path"),
        origins_per_shard=int(p["origins_per_shard"]), keep_duplicates=bool(p.get("keep_duplicates")),
        exact_centers=p.get("centers", "exact") == "exact",  # caches from before the lattice: exact
        **({"compression": p["compression"]["codec"], "compression_level": int(p["compression"]["level"])}
           if "compression" in p else {}))


def find_sources(paths: list[str]) -> dict[str, Path]:
    """{structure id: file} of files, directories or @lists, with the ids a build gives them.

    Raises InputError for a path that does not exist or cannot be read.
    """
    found = expand_inputs(paths)
    return dict(zip(structure_ids(found), found))


def reference_encoder(attrs: dict, source: str | os.PathLike) -> Callable[[np.ndarray, np.ndarray | None], bytes]:
    """(centre, rotations or None) -> the stored bytes the build writes for an origin of
    ``source``, voxelized on its own (the per-origin reference). Raises ParseError."""
    params = params_from_attrs(attrs)
    atoms = parse_atoms(source, params.channels)
    encoder = OriginEncoder(atoms.xyz, atoms.channel, params.image, params.storage)
    return lambda center, rotations=None: encoder.encode(center, rotations)[0]


def rebuild_shards(root: str | os.PathLike, shards: list[int], sources: dict[int, Path],
                   progress: bool = True) -> None:
    """Rewrite voxel shards of a complete cache from their structures' sources.

    The build's own write task re-parses every structure overlapping each shard
    (``sources``: structure index -> file, already checked unchanged by the caller)
    and publishes a shard only if every origin reproduces the checksum recorded at
    build time; the shard is the unit because it is replaced atomically. Raises
    BuildError naming the shard otherwise; untouched shards are never rewritten. Holds
    the cache's build lock, so a repair never runs beside a build or another repair.
    """
    root = Path(root).absolute()
    attrs = fmt.read_attrs(root)
    params = params_from_attrs(attrs)
    installed = params.image.voxelizer_attrs()["version"]
    if attrs["params"]["voxelizer"]["version"] != installed:
        raise BuildError(f"{root}: built with macromol_voxelize {attrs['params']['voxelizer']['version']}, "
                         f"{installed} is installed; install the build's version to repair")
    try:
        lock = BuildLock(root, what="repair").__enter__()  # one writer: a build, or one repair
    except LockedError as exc:
        raise BuildError(str(exc)) from None
    try:
        fmt.remove_temporaries(root)  # an earlier repair's, killed mid-publish
        _rebuild(root, shards, sources, params, progress)
    finally:
        lock.__exit__(None, None, None)


def _rebuild(root: Path, shards: list[int], sources: dict[int, Path], params: BuildParams, progress: bool) -> None:
    from tqdm import tqdm

    layout = fmt.VoxelLayout(root)
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    atom_count = fmt.read_array(root, fmt.STRUCTURE_ATOM_COUNT)
    crc32 = fmt.read_array(root, fmt.CRC32)
    (root / fmt.BUILD_DIR).mkdir(exist_ok=True)
    try:
        for shard in tqdm(shards, desc="repair", unit="shard", disable=not progress):
            pieces = shard_pieces(ranges, range(len(ranges)), layout, [shard])  # atoms saved by structure
            for k, _, _ in pieces:
                if write.atoms_path(root, k).exists():
                    continue
                try:
                    atoms = parse_atoms(sources[k], params.channels)
                except ParseError as exc:
                    raise BuildError(f"{sources[k]}: {exc}") from None
                if len(atoms) != atom_count[k]:
                    raise BuildError(f"{sources[k]}: parses to {len(atoms)} atoms, the cache recorded "
                                     f"{atom_count[k]} (parse rules changed?); rebuild the cache instead")
                write.publish_npz(write.atoms_path(root, k), xyz=atoms.xyz, channel=atoms.channel.astype(np.int8))
            lo = shard * layout.origins_per_shard
            try:
                write_task(str(root), [shard], pieces, params.image, params.storage, params.rotations,
                           expected_crc32=crc32[lo:lo + layout.origins_in_shard(shard)],
                           lattice=not params.exact_centers)
            except write.ChecksumMismatch as exc:
                raise BuildError(f"shard {shard} not repaired: {exc}") from None
    finally:
        shutil.rmtree(root / fmt.BUILD_DIR, ignore_errors=True)
