"""`cache-tools origins`: named origin sets of a lattice cache, chosen after the build.

    cache-tools origins CACHE val_sites --from sites.csv        # rows structure_id,x,y,z
    cache-tools origins CACHE dense --min-neighbors 40 --neighbor-radius 6 --min-spacing 6
    cache-tools origins CACHE                                   # list the stored sets
    cache-tools origins CACHE dense --delete

A set is a list of view centres, each snapped to the lattice the way the build snaps its
origins (the nearest centre a build of this grid can have), stored under
``origin_sets/<NAME>/`` (:mod:`cache_tools.format.lattice`) with how it was made in the cache
attributes. ``VoxelCacheDataset(cache, origins=NAME)`` and ``NeighborPairs(cache, origins=NAME)``
cut their views there instead of at the build's origins.

``--from FILE``: CSV rows ``structure_id,x,y,z`` (Å; a header row and ``#`` comments allowed),
structure ids as the cache stores them (``cache-tools info``; matched without regard to case,
as the build's ``--origins`` does). A bad row is one line naming ``FILE:LINE`` and the reason,
exit 2, and nothing is stored. The rule form reads the stored lattice, never the mmCIF files:
see :mod:`cache_tools.commands.origin_rule` (it counts atom mass, not atoms).

Crash-safe as splits and subsets are (:func:`format.replace_arrays`): the arrays are staged
first (a full disk or a read-only cache fails there and changes nothing), then a set of the same
name is forgotten by the attributes, the files are renamed in, and the attributes name the new
set last, with the crc32 of each array (checked by ``cache-tools check``).
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cache_tools import format as fmt
from cache_tools.commands.split import write_failure
from cache_tools.commands.options import non_negative_float, non_negative_int, positive_float, positive_int

# The lattice reader (numba kernels) and the rule are imported where they run, so that listing
# sets, and `cache-tools info` and `check` (which use describe/recreate_command), stay light.

RULE_OPTIONS = ("min_neighbors", "neighbor_radius", "min_spacing", "max_per_structure", "seed")
EMPTY_BATCH = 256  # views read at a time when counting the empty ones


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Store a named set of view centres in a lattice cache, from a CSV file or by the build's "
                     "neighbour-count rule applied to the stored voxels (atom mass, not atoms); list or delete "
                     "the stored sets. Use one with VoxelCacheDataset(cache, origins=NAME) or NeighborPairs.")
    p.epilog = ("Exit codes: 0 done; 1 the set could not be written (a full disk, a read-only cache: the cache "
                "then has no set of that name, its other data intact); 2 a bad row of the file (one line naming "
                "FILE:LINE), a bad option or name, a rule that finds no origin, or a cache that cannot be read.")
    p.add_argument("cache", metavar="CACHE")
    p.add_argument("name", metavar="NAME", nargs="?",
                   help="origin set to create or replace; without NAME, list the stored sets")
    p.add_argument("--from", dest="from_file", metavar="FILE.csv",
                   help="CSV rows structure_id,x,y,z (Å; header row and # comments allowed); each centre is "
                        "snapped to the nearest point of the build grid's lattice, as the build's --origins are")
    rule = p.add_argument_group("rule form (instead of --from): the build's neighbour-count rule on the stored "
                                "voxels, counting atom mass (copy 0 of each structure's lattice)")
    rule.add_argument("--min-neighbors", type=non_negative_int, metavar="K",
                      help="keep lattice points with at least K atoms' mass within the radius (their own atom "
                           "left out)")
    rule.add_argument("--neighbor-radius", type=positive_float, metavar="R", help="radius of the count, Å")
    rule.add_argument("--min-spacing", type=non_negative_float, metavar="S",
                      help="no two origins of a structure closer than S Å (greedy, in a seeded random order)")
    rule.add_argument("--max-per-structure", type=positive_int, metavar="M", default=None,
                      help="at most M origins per structure (default: 1000, as the build)")
    rule.add_argument("--seed", type=non_negative_int, default=None, help="seed of the thinning order (default: 0)")
    rule.add_argument("--workers", type=positive_int, default=None,
                      help="threads reading structures (default: all cores)")
    p.add_argument("--delete", action="store_true", help="remove origin set NAME")


# --- the CSV form ----------------------------------------------------------------------------

def read_rows(path: str, ids: dict[str, int], failed: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(structure rows, centres (n, 3) float64 Å) of an origins file; ValueError 'FILE:LINE: reason'
    for the first bad row, 'FILE: reason' for a file that cannot be read or holds no row."""
    rows, xyz = [], []
    example = next(iter(ids), "?")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read origins file ({exc.strerror or exc})") from None
    with fh:
        seen_row = False
        try:
            lines = enumerate(fh, 1)
            for lineno, raw in lines:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
                if lineno == 1:
                    text = text.removeprefix("\ufeff")  # a Windows editor's byte-order mark
                fields = next(csv.reader([text]), [])
                if not fields or not "".join(fields).strip() or fields[0].lstrip().startswith("#"):
                    continue
                first, seen_row = not seen_row, True
                if len(fields) != 4:
                    raise ValueError(f"{path}:{lineno}: expected 'structure_id,x,y,z', got {len(fields)} fields")
                point = [_number(v) for v in fields[1:]]
                if None in point:
                    if first and point == [None, None, None]:
                        continue  # a header row: no coordinate is a number
                    raise ValueError(f"{path}:{lineno}: coordinates are not numbers: {','.join(fields[1:])}")
                if not np.all(np.isfinite(point)):
                    raise ValueError(f"{path}:{lineno}: coordinates are not finite: {','.join(fields[1:])}")
                sid = fields[0].strip()
                row = ids.get(sid, ids.get(sid.lower()))
                if row is None:
                    why = (f"its input failed in the build: {failed[sid.lower()]}" if sid.lower() in failed else
                           f"ids as the cache stores them, e.g. {example}")
                    raise ValueError(f"{path}:{lineno}: structure id {sid!r} is not in the cache ({why})")
                rows.append(row)
                xyz.append(point)
        except OSError as exc:  # an I/O error half-way (a directory, a vanished mount)
            raise ValueError(f"{path}: cannot read origins file ({exc.strerror or exc})") from None
    if not rows:
        raise ValueError(f"{path}: no origin rows (expected lines 'structure_id,x,y,z')")
    return np.asarray(rows, np.int64), np.asarray(xyz, np.float64).reshape(-1, 3)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def empty_views(root: str, attrs: fmt.CacheAttrs, rows: np.ndarray, centers: np.ndarray) -> int:
    """How many of these centres' views of the build's size hold no atom (all zeros)."""
    from cache_tools.read.lattice import LatticeReader

    reader = LatticeReader(root, threads=1)
    n, res = attrs.params.image.grid_voxels, float(attrs.params.image.resolution_A)
    lattices = rows * attrs.params.rotations  # copy 0
    corners = fmt.view_corner(centers, res, n)
    out = np.empty((EMPTY_BATCH, n, n, n, reader.n_channels), reader.dtype)
    empty = 0
    for lo in range(0, len(rows), EMPTY_BATCH):
        hi = min(lo + EMPTY_BATCH, len(rows))
        reader.read(lattices[lo:hi], corners[lo:hi], n, out[:hi - lo])
        empty += int((~out[:hi - lo].reshape(hi - lo, -1).any(axis=1)).sum())
    return empty


# --- storing -----------------------------------------------------------------------------------

def lattice_attrs(root: str | Path) -> fmt.CacheAttrs:
    """The attributes of a complete lattice cache, or CacheError saying why origin sets do not apply."""
    attrs = fmt.read_attrs(root)
    fmt.require_complete(root, attrs)
    if attrs.params.lattice is None:
        raise fmt.CacheError(f"{root}: origin sets need a lattice cache (views cut at training time); this cache "
                             "stores one image per origin: build it with `pipeline build-cache --layout lattice`")
    return attrs


def forget_set(root: str | Path, name: str) -> None:
    """Drop origin set ``name`` from the attributes (its files, if any, are then ignored)."""
    fmt.update_attrs(root, lambda a: without_set(a, name))


def without_set(attrs: fmt.CacheAttrs, name: str) -> fmt.CacheAttrs:
    """``attrs`` without origin set ``name`` and its arrays' checksums."""
    arrays = {fmt.origin_set_array(name, part) for part in fmt.ORIGIN_SET_PARTS}
    return attrs.replace(origin_sets={k: v for k, v in attrs.origin_sets.items() if k != name},
                         metadata_crc32={k: v for k, v in attrs.metadata_crc32.items() if k not in arrays})


def store_set(root: str | Path, name: str, rows: np.ndarray, centers: np.ndarray,
              record: fmt.OriginSetRecord) -> fmt.OriginSetRecord:
    """Store centres ``centers`` of structure rows ``rows`` as origin set ``name``, grouped by
    structure (stable: each structure's centres keep their order). Returns the record stored."""
    root = Path(root)
    fmt.origin_set_dir(name)  # the name rule (ValueError)
    n_structures = len(fmt.read_array(root, fmt.STRUCTURE_ORIGIN_RANGE))
    order = np.argsort(rows, kind="stable")
    index = rows[order].astype(np.int32)
    counts = np.bincount(index, minlength=n_structures)
    ranges = np.zeros((n_structures, 2), np.int64)
    ranges[:, 1] = np.cumsum(counts)
    ranges[:, 0] = ranges[:, 1] - counts
    record = fmt.OriginSetRecord(**{**record.to_json(), "origins": int(len(index)),
                                    "structures": int((counts > 0).sum())})
    parts = {fmt.ORIGIN_SET_CENTER: np.asarray(centers, np.float32)[order],
             fmt.ORIGIN_SET_STRUCTURE_INDEX: index, fmt.ORIGIN_SET_RANGE: ranges}
    # staged first (a full disk changes nothing), the old record forgotten, files renamed in, named last
    fmt.replace_arrays(root, {fmt.origin_set_array(name, part): data for part, data in parts.items()},
                       forget=lambda a: without_set(a, name),
                       name=lambda a, crcs: a.replace(origin_sets={**a.origin_sets, name: record},
                                                      metadata_crc32={**a.metadata_crc32, **crcs}))
    return record


def origins_from_file(root: str | Path, name: str, path: str) -> fmt.OriginSetRecord:
    """Read, snap and store origin set ``name`` from a CSV file; ValueError naming FILE:LINE."""
    root = Path(root)
    fmt.origin_set_dir(name)  # the name rule (ValueError)
    attrs = lattice_attrs(root)
    blob, offsets = fmt.read_ragged_strings(root, fmt.STRUCTURE_ID)
    ids = {fmt.ragged_item(blob, offsets, k): k for k in range(len(offsets) - 1)}
    failed = {n.id.lower(): n.reason for n in attrs.failures if n.id}
    rows, xyz = read_rows(path, ids, failed)
    image = attrs.params.image
    centers = fmt.snap_to_lattice(xyz, image.resolution_A, image.grid_voxels)
    record = fmt.OriginSetRecord("file", 0, 0, path=str(Path(path).absolute()), sha256=fmt.file_sha256(path),
                                 rows=int(len(rows)), empty=empty_views(str(root), attrs, rows, centers))
    return store_set(root, name, rows, centers, record)


def origins_by_rule(root: str | Path, name: str, rule, workers: int | None = None,
                    progress: bool = False) -> fmt.OriginSetRecord:
    """Compute and store origin set ``name`` by the mass rule (an ``origin_rule.MassRule``);
    ValueError when it finds no origin."""
    from cache_tools.commands.origin_rule import MassCounter, pick

    root = Path(root)
    fmt.origin_set_dir(name)  # the name rule (ValueError)
    attrs = lattice_attrs(root)
    counter = MassCounter(str(root), attrs, rule)
    counter.reader.warm(counter.reader.dtype)  # opened and compiled once, before the threads share it
    sha = fmt.read_array(root, fmt.STRUCTURE_SHA256)
    n = len(sha)
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool, \
            tqdm(total=n, desc="structures", unit="", disable=not progress) as bar:
        results = []
        for result in pool.map(lambda row: pick(counter, row, sha[row].tobytes()), range(n)):
            results.append(result)
            bar.update(1)
    centers = [c for c, _ in results]
    rows = np.repeat(np.arange(n, dtype=np.int64), [len(c) for c in centers])
    if len(rows) == 0:
        raise ValueError(f"no lattice point of any structure has >= {rule.min_neighbors} atoms' mass within "
                         f"{rule.neighbor_radius_A} Å; origin set {name!r} not stored")
    record = fmt.OriginSetRecord("mass-count", 0, 0, **rule.to_record(),
                                 candidates=int(sum(k for _, k in results)))
    return store_set(root, name, rows, np.concatenate(centers), record)


def delete_set(root: str | Path, name: str) -> None:
    root = Path(root)
    attrs = fmt.read_attrs(root)
    if name not in attrs.origin_sets:
        raise ValueError(f"no origin set named {name!r} (stored: {', '.join(attrs.origin_sets) or 'none'})")
    forget_set(root, name)  # first, then remove the files
    shutil.rmtree(root / fmt.origin_set_dir(name), ignore_errors=True)


def describe(record: fmt.OriginSetRecord) -> str:
    """'1,234 origins in 12 structures, from /x/sites.csv (40 rows, 2 empty views)' and the like."""
    text = f"{record.origins:,} origins in {record.structures} structures, "
    if record.rule == "file":
        return text + f"from {record.path} ({record.rows:,} rows, {record.empty or 0} empty views)"
    return text + (f"mass rule: >= {record.min_neighbors} atoms' mass within {record.neighbor_radius_A:g} Å, "
                   f"spacing {record.min_spacing_A:g} Å, at most {record.max_per_structure} per structure, "
                   f"seed {record.seed} ({record.candidates:,} lattice points passed the count)")


def recreate_command(root: str | os.PathLike, name: str, record: fmt.OriginSetRecord) -> str:
    """The `cache-tools origins` command that made origin set ``name``."""
    if record.rule == "file":
        return f"cache-tools origins {root} {name} --from {record.path}"
    return (f"cache-tools origins {root} {name} --min-neighbors {record.min_neighbors} --neighbor-radius "
            f"{record.neighbor_radius_A:g} --min-spacing {record.min_spacing_A:g} --max-per-structure "
            f"{record.max_per_structure} --seed {record.seed}")


def run(args: argparse.Namespace) -> int:
    given = [f"--{o.replace('_', '-')}" for o in RULE_OPTIONS if getattr(args, o) is not None]
    before = None
    try:
        if args.name is None:
            if args.from_file is not None or given or args.delete:
                raise ValueError("give an origin set NAME with --from, the rule options or --delete")
            sets = fmt.read_attrs(args.cache).origin_sets
            for name, record in sets.items():
                print(f"{name}: {describe(record)}")
            if not sets:
                print(f"{args.cache}: no origin sets")
            return 0
        fmt.origin_set_dir(args.name)  # the name rule (ValueError)
        before = fmt.read_attrs(args.cache)
        if args.delete:
            if args.from_file is not None or given:
                raise ValueError("--delete takes no --from or rule options")
            delete_set(args.cache, args.name)
            print(f"deleted origin set {args.name}")
            return 0
        if args.from_file is not None:
            if given:
                raise ValueError(f"--from and the rule options ({', '.join(given)}) exclude each other")
            record = origins_from_file(args.cache, args.name, args.from_file)
        else:
            missing = [o for o in ("--min-neighbors", "--neighbor-radius", "--min-spacing") if o not in given]
            if len(missing) == 3:
                raise ValueError(f"origin set {args.name}: give --from FILE.csv, or the rule: --min-neighbors K "
                                 "--neighbor-radius R --min-spacing S")
            if missing:
                raise ValueError(f"the rule form needs {', '.join(missing)} too")
            from cache_tools.commands.origin_rule import MassRule

            rule = MassRule(args.min_neighbors, args.neighbor_radius, args.min_spacing,
                            1000 if args.max_per_structure is None else args.max_per_structure,
                            0 if args.seed is None else args.seed)
            record = origins_by_rule(args.cache, args.name, rule, args.workers, progress=sys.stderr.isatty())
    except (fmt.CacheError, ValueError) as exc:
        print(f"cache-tools origins: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only cache: staged first, so the old set or none
        outcome = write_failure(exc, before, args.cache, f"origin set {args.name!r}",
                                lambda a: args.name in a.origin_sets)
        print(f"cache-tools origins: cannot {'delete' if args.delete else 'write'} origin set {args.name!r} in "
              f"{args.cache}: {outcome}", file=sys.stderr)
        return 1
    print(f"{args.name}: {describe(record)}")
    return 0
