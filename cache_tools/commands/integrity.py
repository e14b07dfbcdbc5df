"""The checks of a cache's own bytes, each problem one line naming origins, structure and file:
metadata arrays, shard files and zarr's shard index, every origin's checksum and values; on a
lattice cache every block's checksum and values instead; and the split, subsets and origin sets
a cache holds.

:mod:`.check` runs them (and the staleness of sources); ``pipeline check`` adds what needs
the build's code.
"""
from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cache_tools import format as fmt
from cache_tools.read.reader import ShardReader

UNIT_BYTES = 16 << 20  # bytes of voxels per checksum task: small enough to spread over cores
SHARD_KINDS = ("missing-shard", "truncated-shard", "shard-index", "undecodable", "checksum", "non-finite",
               "negative", "spot-check")  # problems a shard rewrite mends


@dataclass
class Problem:
    kind: str
    detail: str
    origins: tuple[int, int] | None = None   # first, last (inclusive)
    structure: str | None = None
    source: str | None = None
    file: str | None = None                  # relative to the cache

    def to_dict(self) -> dict:
        return {**asdict(self), "origins": list(self.origins) if self.origins is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(**{**d, "origins": tuple(d["origins"]) if d["origins"] is not None else None})

    def line(self) -> str:
        where = []
        if self.origins is not None:
            a, b = self.origins
            where.append(f"origin {a}" if a == b else f"origins {a}-{b}")
        if self.structure is not None:
            where.append(f"structure {self.structure}" + (f" ({self.source})" if self.source else ""))
        if self.file is not None:
            where.append(f"in {self.file}")
        return f"{self.kind}: {', '.join(where) + ': ' if where else ''}{self.detail}"


class Cache:
    """What the check needs of a cache, read once; tolerant of damaged metadata (fields are None)."""

    def __init__(self, root: Path, attrs: dict | None = None):
        self.root = root
        self.attrs = attrs if attrs is not None else fmt.read_attrs(root)
        self.lattice = self.attrs.params.lattice is not None
        # CacheError: cannot read the images (or a lattice's blocks) at all
        self.layout = fmt.VoxelLayout(root, fmt.BLOCKS if self.lattice else fmt.VOXELS)
        self.reader = None if self.lattice else ShardReader(self.layout, threads=1)
        if self.lattice:  # the origins are as many as the centres the build stored
            try:
                self.n_origins = int(fmt.array_meta(root, fmt.CENTER)["shape"][0])
            except (fmt.CacheError, KeyError, IndexError, TypeError):
                self.n_origins = int(fmt.array_meta(root, fmt.STRUCTURE_INDEX)["shape"][0])
        else:
            self.n_origins = self.layout.n_origins
        self.problems: list[Problem] = []
        self.ranges = self.ids = self.paths = self.structure_index = self.crc32 = None
        self.sha256 = self.atom_count = None

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def structures_of(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """(structure index or -1, first, last) pieces of an inclusive origin range."""
        if self.ranges is None:
            return [(-1, first, last)]
        out = []
        k = int(np.searchsorted(self.ranges[:, 1], first, side="right"))
        while first <= last and k < len(self.ranges):
            stop = min(last, int(self.ranges[k, 1]) - 1)
            out.append((k, first, stop))
            first, k = stop + 1, k + 1
        return out

    def name(self, k: int) -> tuple[str | None, str | None]:
        if k < 0 or self.ids is None:
            return None, None
        return self.ids[k], (self.paths[k] if self.paths is not None else None)

    def report(self, kind: str, detail: str, first: int, last: int, file: str | None = None) -> None:
        """One problem per structure the origin range touches."""
        for k, a, b in self.structures_of(first, last):
            sid, source = self.name(k)
            self.problems.append(Problem(kind, detail, (a, b), sid, source, file))


# --- metadata -------------------------------------------------------------------------

def check_lattice_tables(c: Cache, load, m: int, copies: int) -> None:
    """A lattice cache's tables present and of consistent shapes: ``copies`` lattices per structure
    (``--rotations K``, with their rotations), block ids tiling the blocks array."""
    lattices = m * copies
    load(fmt.LATTICE_GRID, (lattices, 6))
    map_start = load(fmt.LATTICE_MAP_START, (lattices + 1,))
    block_start = load(fmt.LATTICE_BLOCK_START, (lattices + 1,))
    if map_start is not None:
        load(fmt.LATTICE_MAP, (int(map_start[-1]),))
    if block_start is not None and (block_start[0] != 0 or block_start[-1] != c.layout.n_items
                                    or np.any(np.diff(block_start) < 0)):
        c.problems.append(Problem("metadata", f"lattice block ranges do not tile the {c.layout.n_items} blocks",
                                  file=fmt.LATTICE_BLOCK_START))
    load(fmt.BLOCK_CRC32, (c.layout.n_items,))
    load(fmt.BLOCK_FILL, (c.layout.n_items,))
    if copies > 1:
        load(fmt.LATTICE_ROTATION, (m, copies, 3, 3))
        load(fmt.LATTICE_ROTATION_CENTER, (m, 3))


def check_metadata(c: Cache) -> None:
    n, params = c.n_origins, c.attrs.params
    rotations = params.rotations
    edited = fmt.params_problem(c.attrs)  # a hand-edited scale, dtype, grid, ... (recorded by the build)
    if edited is not None:
        c.problems.append(Problem("attributes", edited, file="zarr.json"))

    def load(name: str, shape: tuple | None = None, quiet: bool = False) -> np.ndarray | None:
        try:
            array = fmt.read_array(c.root, name)
        except fmt.CacheError as exc:
            if not quiet:
                c.problems.append(Problem("metadata", str(exc).removeprefix(f"{c.root}: "), file=name))
            return None
        if shape is not None and array.shape != shape:
            c.problems.append(Problem("metadata", f"shape {array.shape}, expected {shape}", file=name))
            return None
        return array

    def ragged(name: str, m: int) -> list[str] | None:
        blob, offsets = load(name + "_utf8"), load(name + "_offsets", (m + 1,))
        if blob is None or offsets is None:
            return None
        if offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
            c.problems.append(Problem("metadata", "offsets do not partition the string bytes",
                                      file=name + "_offsets"))
            return None
        try:
            return [fmt.ragged_item(blob, offsets, k) for k in range(m)]
        except UnicodeDecodeError:
            c.problems.append(Problem("metadata", "strings are not valid UTF-8", file=name + "_utf8"))
            return None

    sets = {fmt.origin_set_array(name, part) for name in c.attrs.origin_sets for part in fmt.ORIGIN_SET_PARTS}
    for name, recorded in c.attrs.metadata_crc32.items():
        if name in sets or name == fmt.STRUCTURE_SPLIT or name.startswith(fmt.SUBSET_DIR + "/"):
            continue  # check_origin_sets, check_selections name them with the command that recreates them
        try:
            changed = fmt.chunk_crc32(c.root, name) != recorded
        except (OSError, fmt.CacheError):
            continue  # reported below, when the array is read
        if changed:
            c.problems.append(Problem("metadata", "contents changed since the build (crc32 differs)", file=name))
    ranges = load(fmt.STRUCTURE_ORIGIN_RANGE)
    m = len(ranges) if ranges is not None and ranges.ndim == 2 and ranges.shape[1] == 2 else None
    if m is None:
        if ranges is not None:
            c.problems.append(Problem("metadata", f"shape {ranges.shape}, expected (M, 2)",
                                      file=fmt.STRUCTURE_ORIGIN_RANGE))
        counts = load(fmt.STRUCTURE_ATOM_COUNT, quiet=True)
        m = len(counts) if counts is not None else 0
    else:
        starts, stops = ranges[:, 0], ranges[:, 1]
        gaps = np.flatnonzero(starts[1:] != stops[:-1])
        if m == 0 or starts[0] != 0 or stops[-1] != n or len(gaps) or np.any(stops <= starts):
            where = (f"structures {gaps[0]} and {gaps[0] + 1}: [{starts[gaps[0]]}, {stops[gaps[0]]}) then "
                     f"[{starts[gaps[0] + 1]}, {stops[gaps[0] + 1]})" if len(gaps) else
                     f"first starts at {starts[0] if m else '-'}, last stops at {stops[-1] if m else '-'}, N = {n}")
            c.problems.append(Problem("metadata", f"structure origin ranges do not tile 0..{n - 1} ({where})",
                                      file=fmt.STRUCTURE_ORIGIN_RANGE))
        else:
            c.ranges = ranges
    c.ids = ragged(fmt.STRUCTURE_ID, m)
    c.paths = ragged(fmt.STRUCTURE_SOURCE_PATH, m)
    if (c.root / (fmt.STRUCTURE_ENTRY_ID + "_offsets")).exists():  # absent in older caches
        ragged(fmt.STRUCTURE_ENTRY_ID, m)
    if (c.root / (fmt.STRUCTURE_ASSEMBLY + "_offsets")).exists():  # only with --assembly other than asym
        ragged(fmt.STRUCTURE_ASSEMBLY, m)
    c.sha256 = load(fmt.STRUCTURE_SHA256, (m, 32))
    c.atom_count = load(fmt.STRUCTURE_ATOM_COUNT, (m,))
    load(fmt.CENTER, (n, 3))
    c.crc32 = None if c.lattice else load(fmt.CRC32, (n,))  # a lattice checks its blocks' crc32 instead
    if c.lattice:  # K copies of each structure's lattice, not K images per origin
        check_lattice_tables(c, load, m, rotations)
    elif rotations > 1:
        load(fmt.ROTATION, (n, rotations, 3, 3))
    structure_index = load(fmt.STRUCTURE_INDEX, (n,))
    if structure_index is not None and c.ranges is not None:
        expected = np.repeat(np.arange(m, dtype=np.int32), c.ranges[:, 1] - c.ranges[:, 0])
        wrong = np.flatnonzero(structure_index != expected)
        if len(wrong):
            c.report("metadata", f"{len(wrong)} origins' structure index disagrees with the structure ranges",
                     int(wrong[0]), int(wrong[-1]), file=fmt.STRUCTURE_INDEX)
    # dtype and shape as the attributes say
    mismatch = fmt.stored_problem(c.layout, params)
    if mismatch is not None:
        c.problems.append(Problem("metadata", mismatch, file=c.layout.array))



# --- splits and subsets -----------------------------------------------------------------

def check_selections(c: Cache) -> None:
    """The split and the subsets the attributes name (`cache-tools split`, `subset`): each array
    present, untruncated, unchanged (crc32), of its length, its values in range. A problem names
    the file and the command that recreates it (the images are not involved)."""
    if not c.attrs.splits and not c.attrs.subsets:
        return
    from cache_tools.commands.split import recreate_command as split_command  # the commands that write them
    from cache_tools.commands.subset import recreate_command as subset_command

    try:
        m = int(fmt.array_meta(c.root, fmt.STRUCTURE_ORIGIN_RANGE)["shape"][0])
    except (fmt.CacheError, KeyError, IndexError, TypeError):
        m = None  # reported by check_metadata

    def load(kind: str, what: str, array: str, again: str) -> tuple[np.ndarray | None, Callable[[str], None]]:
        def problem(detail: str) -> None:
            c.problems.append(Problem(kind, f"{what}: {detail}; recreate it: {again}", file=array))
        try:
            data = fmt.read_array(c.root, array)
        except fmt.CacheError as exc:
            problem(str(exc).removeprefix(f"{c.root}: "))
            return None, problem
        recorded = c.attrs.metadata_crc32.get(array)
        if recorded is not None and fmt.chunk_crc32(c.root, array) != recorded:
            problem("contents changed since it was stored (crc32 differs)")
            return None, problem
        return data, problem

    names = c.attrs.splits
    if names:
        codes, problem = load("split", f"the split ({', '.join(names)})", fmt.STRUCTURE_SPLIT,
                              split_command(c.root, c.attrs.split_params))
        if codes is not None and m is not None and codes.shape != (m,):
            problem(f"shape {codes.shape}, expected {(m,)}")
        elif codes is not None and np.any(codes >= len(names)):
            problem(f"split codes beyond the {len(names)} split names")
    for name, record in c.attrs.subsets.items():
        try:
            array = fmt.subset_array(name)
        except ValueError as exc:  # attributes edited by hand
            c.problems.append(Problem("subset", f"{exc}; delete it: cache-tools subset {c.root} {name} --delete"))
            continue
        rows, problem = load("subset", f"subset {name!r}", array, subset_command(c.root, name, record))
        if rows is None:
            continue
        if rows.shape != (record.structures,):
            problem(f"shape {rows.shape}, expected {(record.structures,)}")
        elif len(rows) and (np.any(np.diff(rows) <= 0) or rows[0] < 0 or (m is not None and rows[-1] >= m)):
            problem(f"structure rows are not sorted unique rows below {m}")


# --- origin sets ------------------------------------------------------------------------

def check_origin_sets(c: Cache) -> None:
    """Every origin set the attributes name: arrays present, untruncated, unchanged (crc32), of
    consistent shapes, structure rows sorted and tiled by the ranges, centres finite and on the
    build grid's lattice. A problem names the file and the command that recreates the set."""
    if not c.attrs.origin_sets:
        return
    from cache_tools.commands.origins import recreate_command  # the command that writes them

    image = c.attrs.params.image
    try:
        m = int(fmt.array_meta(c.root, fmt.STRUCTURE_ORIGIN_RANGE)["shape"][0])
    except (fmt.CacheError, KeyError, IndexError, TypeError):
        m = None  # reported by check_metadata
    for name, record in c.attrs.origin_sets.items():
        again = f"; recreate it: {recreate_command(c.root, name, record)}"
        names = {part: fmt.origin_set_array(name, part) for part in fmt.ORIGIN_SET_PARTS}
        arrays, damaged = {}, False
        for part, array in names.items():
            def problem(detail: str, file: str = array) -> None:
                c.problems.append(Problem("origin-set", f"origin set {name!r}: {detail}{again}", file=file))
            try:
                arrays[part] = fmt.read_array(c.root, array)
            except fmt.CacheError as exc:
                problem(str(exc).removeprefix(f"{c.root}: "))
                damaged = True
                continue
            recorded = c.attrs.metadata_crc32.get(array)
            if recorded is not None and fmt.chunk_crc32(c.root, array) != recorded:
                problem("contents changed since it was stored (crc32 differs)")
                damaged = True
        if damaged:
            continue
        centers, index, ranges = (arrays[p] for p in fmt.ORIGIN_SET_PARTS)
        k = record.origins

        def problem(detail: str, part: str) -> None:
            c.problems.append(Problem("origin-set", f"origin set {name!r}: {detail}{again}", file=names[part]))
        if centers.shape != (k, 3):
            problem(f"shape {centers.shape}, expected {(k, 3)}", fmt.ORIGIN_SET_CENTER)
        elif not np.isfinite(centers).all() or not np.array_equal(
                fmt.snap_to_lattice(centers, image.resolution_A, image.grid_voxels), centers):
            problem("centres not finite or not on the build grid's lattice", fmt.ORIGIN_SET_CENTER)
        if index.shape != (k,):
            problem(f"shape {index.shape}, expected {(k,)}", fmt.ORIGIN_SET_STRUCTURE_INDEX)
        elif k and (np.any(np.diff(index) < 0) or index[0] < 0 or (m is not None and index[-1] >= m)):
            problem(f"structure rows are not sorted rows below {m}", fmt.ORIGIN_SET_STRUCTURE_INDEX)
        elif m is not None and ranges.shape == (m, 2):
            expected = np.zeros((m, 2), np.int64)
            expected[:, 1] = np.cumsum(np.bincount(index, minlength=m))
            expected[1:, 0] = expected[:-1, 1]
            if not np.array_equal(ranges, expected):
                problem(f"ranges do not tile 0..{k - 1} as the structure rows say", fmt.ORIGIN_SET_RANGE)
        if m is not None and ranges.shape != (m, 2):
            problem(f"shape {ranges.shape}, expected {(m, 2)}", fmt.ORIGIN_SET_RANGE)


# --- voxels ---------------------------------------------------------------------------

def check_shard_files(c: Cache) -> list[int]:
    """Sizes and zarr shard indexes (the format's one shard check); returns the shards whose bytes can be read."""
    layout, readable = c.layout, []
    for shard in range(layout.n_shards):
        lo = shard * layout.origins_per_shard
        problem = layout.shard_problem(shard)
        if problem is None:
            readable.append(shard)
            continue
        kind, detail = problem
        c.report(kind, detail, lo, lo + layout.origins_in_shard(shard) - 1, c.rel(layout.shard_path(shard)))
        if kind == "shard-index" and layout.codec is None:
            readable.append(shard)  # the bytes are where they should be; only zarr's index is wrong
    return readable


def _scan_unit(c: Cache, lo: int, hi: int) -> tuple[int, dict[str, list[int]]]:
    """(bytes checked, {problem kind: origins}) of origins [lo, hi), read through the Dataset's reader.

    The crc32 covers each origin's stored bytes before compression (the image as its
    storage dtype), so a compressed origin is decoded first: that checks its zstd frame
    (and zstd's own content checksum) as well.
    """
    found: dict[str, list[int]] = {"undecodable": [], "checksum": [], "non-finite": [], "negative": []}
    floating = c.layout.dtype.kind == "f"
    for origin in range(lo, hi):
        try:
            stored = c.reader.view(origin)  # zlib and zstd release the GIL: threads use all cores
        except fmt.CacheError:
            found["undecodable"].append(origin)
            continue
        if c.crc32 is not None and zlib.crc32(stored) != c.crc32[origin]:
            found["checksum"].append(origin)
        if floating:
            if not np.isfinite(stored).all():
                found["non-finite"].append(origin)
            if (stored < 0).any():
                found["negative"].append(origin)
    return (hi - lo) * c.layout.origin_nbytes, found


def check_voxels(c: Cache, shards: list[int], workers: int, progress: bool) -> int:
    """Checksums and values of every origin of ``shards``, on ``workers`` threads; returns bytes read."""
    from tqdm import tqdm

    layout = c.layout
    per_unit = max(1, UNIT_BYTES // layout.origin_nbytes)
    units = []
    for shard in shards:
        first = shard * layout.origins_per_shard
        stop = first + layout.origins_in_shard(shard)
        units += [(lo, min(lo + per_unit, stop)) for lo in range(first, stop, per_unit)]
    found: dict[str, list[int]] = {"undecodable": [], "checksum": [], "non-finite": [], "negative": []}
    total = sum(hi - lo for lo, hi in units) * layout.origin_nbytes
    read = 0
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=total, desc="checksums", unit="B", unit_scale=True, disable=not progress) as bar:
        for nread, unit_found in pool.map(lambda u: _scan_unit(c, *u), units):
            for kind, origins in unit_found.items():
                found[kind] += origins
            read += nread
            bar.update(nread)
    details = {"undecodable": "compressed bytes do not decode (zstd frame or its checksum damaged)",
               "checksum": "crc32 differs from the one recorded at build time (bytes changed)",
               "non-finite": "NaN or infinite voxel values", "negative": "negative voxel values"}
    per_shard = layout.origins_per_shard
    for kind, origins in found.items():
        for a, b in _runs(sorted(origins), per_shard):
            c.report(kind, details[kind], a, b, c.rel(layout.shard_path(a // per_shard)))
    return read


def _runs(ids: list[int], per_shard: int) -> list[tuple[int, int]]:
    """Sorted ids -> (first, last) runs of consecutive ids within one shard: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i - 1 and i % per_shard:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
