"""`pipeline check`: the read side's check, plus what needs the build's code: find sources
by id among paths, re-voxelize origins (``--spot-check``), rewrite damaged shards (``--repair``).

``cache-tools check`` runs ``pipeline check`` as a child process for those options (the
read side never imports ``pipeline``). Everything here is the build's own code: the same
inputs and ids, the same parse, the same encoder, the same write task.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from cache_tools import format as fmt
from cache_tools.commands import check
from cache_tools.commands.integrity import SHARD_KINDS, Cache, Problem, check_metadata
from pipeline import lattice_repair, write
from pipeline.build import BuildParams
from pipeline.encode import OriginEncoder
from pipeline.errors import BuildError, InputError
from pipeline.inputs import expand_inputs, structure_ids
from pipeline.lock import BuildLock, LockedError
from pipeline.parse import ParseError, parse_atoms
from pipeline.tasks import shard_pieces, write_task

__all__ = ["RepairError", "find_sources", "full_check", "rebuild_shards",
           "reference_encoder", "repair", "run_check"]


class RepairError(Exception):
    """The damage cannot be repaired in place; str() says why and what to do instead."""


class UsageError(Exception):
    """Bad arguments (e.g. a --sources path that does not exist)."""


def find_sources(paths: list[str]) -> dict[str, Path]:
    """{structure id: file} of files, directories or @lists, with the ids a build gives them.

    Raises InputError for a path that does not exist or cannot be read.
    """
    found = expand_inputs(paths)
    return dict(zip(structure_ids(found), found))


def reference_encoder(attrs: fmt.CacheAttrs, source: str | os.PathLike,
                      assembly: str = fmt.ASSEMBLY_ASYM) -> Callable[[np.ndarray, np.ndarray | None], bytes]:
    """(centre, rotations or None) -> the stored bytes the build writes for an origin of
    ``source`` (whose recorded assembly is ``assembly``, ``fmt.assemblies``), voxelized on its
    own with the cache's occupancy rule (the per-origin reference). Raises ParseError."""
    params = BuildParams.from_cache(attrs.params)
    atoms = parse_atoms(source, params.channels, assembly, params.occupancy)
    encoder = OriginEncoder(atoms.xyz, atoms.channel, params.image, params.storage, atoms.occupancy)
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
    params = BuildParams.from_cache(attrs.params)
    installed = params.image.voxelizer_attrs()["version"]
    if attrs.params.voxelizer.version != installed:
        raise BuildError(f"{root}: built with macromol_voxelize {attrs.params.voxelizer.version}, "
                         f"{installed} is installed; install the build's version to repair")
    try:
        lock = BuildLock(root, what="repair").__enter__()  # one writer: a build, or one repair
    except LockedError as exc:
        raise BuildError(str(exc)) from None
    try:
        fmt.remove_temporaries(root)  # an earlier repair's, killed mid-publish
        if attrs.params.lattice is not None:  # block shards
            lattice_repair.rebuild_block_shards(root, shards, sources, params, progress)
        else:
            _rebuild(root, shards, sources, params, progress)
    finally:
        lock.__exit__(None, None, None)


def _rebuild(root: Path, shards: list[int], sources: dict[int, Path], params: BuildParams, progress: bool) -> None:
    from tqdm import tqdm

    layout = fmt.VoxelLayout(root)
    ranges = fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE)
    atom_count = fmt.read_array(root, fmt.STRUCTURE_ATOM_COUNT)
    assemblies = fmt.assemblies(root)
    crc32 = fmt.read_array(root, fmt.CRC32)
    (root / fmt.BUILD_DIR).mkdir(exist_ok=True)
    try:
        for shard in tqdm(shards, desc="repair", unit="shard", disable=not progress):
            pieces = shard_pieces(ranges, range(len(ranges)), layout, [shard])  # atoms saved by structure
            for k, _, _ in pieces:
                lattice_repair.save_atoms(root, k, sources[k], params, assemblies[k], int(atom_count[k]))
            lo = shard * layout.origins_per_shard
            try:
                write_task(str(root), [shard], pieces, params.image, params.storage, params.rotations,
                           expected_crc32=crc32[lo:lo + layout.origins_in_shard(shard)],
                           lattice=not params.exact_centers)
            except write.ChecksumMismatch as exc:
                raise BuildError(f"shard {shard} not repaired: {exc}") from None
    finally:
        shutil.rmtree(root / fmt.BUILD_DIR, ignore_errors=True)


# --- the check with sources ----------------------------------------------------------------

def resolve_sources(c: Cache, sources: list[str]) -> list[Path | None]:
    """Each structure's source file now: the recorded paths, or found by id among ``sources``."""
    if not sources:
        return check.recorded_sources(c)
    try:
        by_id = find_sources(sources)
    except InputError as exc:
        raise UsageError(f"--sources: {exc}") from None
    return [by_id.get(sid) for sid in (c.ids or [])]


def spot_check(c: Cache, files: list[Path | None], usable: list[bool], n: int, seed: int,
               progress: bool) -> int:
    """Re-parse and re-voxelize ``n`` random origins of usable structures; compare with the stored bytes."""
    from tqdm import tqdm

    rotations = c.attrs.params.rotations
    pool = np.concatenate([np.arange(c.ranges[k, 0], c.ranges[k, 1]) for k in range(len(usable)) if usable[k]]
                          or [np.zeros(0, np.int64)])
    chosen = np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False))
    centers = fmt.read_array(c.root, fmt.CENTER)
    mats = fmt.read_array(c.root, fmt.ROTATION) if rotations > 1 else None
    layout = c.layout
    assemblies = fmt.assemblies(c.root)
    encoder, current = None, -1
    for origin in tqdm(chosen.tolist(), desc="spot check", unit="origin", disable=not progress):
        k = int(np.searchsorted(c.ranges[:, 1], origin, side="right"))
        if k != current:
            current = k
            try:
                encoder = reference_encoder(c.attrs, files[k], assemblies[k])
            except ParseError as exc:
                c.report("spot-check", f"source no longer parses: {exc}", origin, origin)
                encoder = None
                continue
        if encoder is None:
            continue
        expected = encoder(centers[origin], mats[origin] if mats is not None else None)
        shard = origin // layout.origins_per_shard
        try:
            stored = c.reader.stored_bytes(origin)
        except fmt.CacheError as exc:
            c.report("spot-check", str(exc).removeprefix(f"{c.root}: origin {origin}: "), origin, origin,
                     c.rel(layout.shard_path(shard)))
            continue
        if stored != expected:
            a = np.frombuffer(stored, layout.dtype).astype(np.float64)
            b = np.frombuffer(expected, layout.dtype).astype(np.float64)
            c.report("spot-check", f"stored image differs from the re-voxelized one (max |difference| "
                     f"{np.nanmax(np.abs(a - b)) if len(a) == len(b) else 'n/a'} in stored units)",
                     origin, origin, c.rel(layout.shard_path(shard)))
    return len(chosen)


def full_check(root: str | os.PathLike, sources: list[str] | None = None, spot: int = 0, seed: int = 0,
               workers: int | None = None, progress: bool = True) -> dict:
    """Every check of ``cache-tools check``, plus staleness against ``sources`` (None: not checked;
    []: the recorded paths; else files, directories or @lists matched by id) and ``spot``
    re-voxelized origins. Returns the JSON-ready report; raises CacheError when unreadable."""
    c, report = check.inspect(root, workers, progress)
    if c is None:
        return report
    if (sources is not None or spot) and c.ranges is not None:
        files = resolve_sources(c, sources or [])
        usable = check.check_sources(c, files, workers or os.cpu_count() or 1)
        report["sources_checked"] = len(files)
        if spot:
            sample = lattice_repair.spot_check_blocks if c.lattice else spot_check  # blocks, or origins
            report["spot_checked"] = sample(c, files, usable, spot, seed, progress)
            report["spot_unit"] = "blocks" if c.lattice else "origins"
    return check.conclude(c, report)


def repair(root: str | os.PathLike, report: dict, sources: list[str] | None = None,
           progress: bool = True) -> list[dict]:
    """Rewrite the shard files holding the damaged origins of ``report``; returns what was rewritten."""
    problems = [Problem.from_dict(p) for p in report["problems"]]
    incomplete = [p for p in problems if p.kind == "incomplete"]
    if incomplete:  # what to do depends on why (check says): finish the build, or fix its inputs
        raise RepairError(incomplete[0].detail)
    if any(p.kind == "attributes" for p in problems):  # shards rewritten with edited parameters would be wrong
        raise RepairError("its build parameters in zarr.json changed since the build (params checksum mismatch), "
                          "which --repair does not guess back; restore zarr.json or rebuild")
    if any(p.kind == "metadata" for p in problems):
        raise RepairError("its metadata is damaged, which --repair does not rewrite; delete it and rerun "
                          "the `pipeline build-cache` command that built it")
    c = Cache(Path(root).absolute())
    check_metadata(c)
    per_shard = c.layout.origins_per_shard
    if c.lattice:  # block shards, each holding blocks of whole lattices (every copy of a structure)
        shards = lattice_repair.damaged_block_shards(c, problems)
        tables = lattice_repair.LatticeTables(c.root, c.attrs.params.rotations)
    else:
        shards = sorted({s for p in problems if p.kind in SHARD_KINDS and p.origins is not None
                         for s in range(p.origins[0] // per_shard, p.origins[1] // per_shard + 1)})
    if not shards:
        return []
    files = resolve_sources(c, sources or [])

    def structures(shard: int) -> list[int]:
        if c.lattice:
            return lattice_repair.shard_structures(c, tables, shard)
        first = shard * per_shard
        return [k for k, _, _ in c.structures_of(first, first + c.layout.origins_in_shard(shard) - 1)]

    needed = sorted({k for s in shards for k in structures(s)})
    for k in needed:  # only these: a source the repair does not re-voxelize is not asked for
        if files[k] is None:
            raise RepairError(f"structure {c.ids[k]}: no source file with id '{c.ids[k]}' among --sources "
                              "(its origins share a damaged shard, which is rewritten whole)")
        if not check.unchanged(c, k, check.digest(files[k])):
            raise RepairError(f"structure {c.ids[k]}: its source ({files[k]}) is missing or "
                              "changed since the build; give the original files with --sources")
    try:
        rebuild_shards(c.root, shards, {k: files[k] for k in needed}, progress=progress)
    except BuildError as exc:
        raise RepairError(str(exc)) from None
    return [{"shard": s, "file": c.rel(c.layout.shard_path(s)), "structures": [c.ids[k] for k in structures(s)]}
            for s in shards]


def run_check(args) -> int:
    """``pipeline check``: the arguments of ``cache-tools check`` (``check.add_arguments``)."""
    progress, prog = not args.quiet, os.environ.get("VOXEL_CACHE_CALLER", "pipeline check")
    try:
        # With --repair, --sources says where the repair finds the sources of the structures it
        # re-voxelizes (only those are needed, and checked unchanged); a spot check still hashes them all.
        staleness = None if args.repair and not args.spot_check else args.sources
        report = full_check(args.cache, staleness, args.spot_check, args.seed, args.workers, progress)
        if args.repair and not report["ok"]:
            repaired = repair(args.cache, report, args.sources, progress)
            report = {**full_check(args.cache, staleness, 0, args.seed, args.workers, progress),
                      "repaired": repaired}
    except (fmt.CacheError, UsageError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except RepairError as exc:
        print(f"{prog}: cannot repair {args.cache}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1) if args.json else check.format_report(report))
    return 0 if report["ok"] else 1
