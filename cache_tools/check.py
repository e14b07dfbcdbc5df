"""`cache-tools check CACHE`: is every byte of a cache what the build wrote?

Checks, in order (each problem is one line naming origin ids, structure and file):

- the cache: attributes readable, format version known, build complete;
- metadata: every array present, untruncated, of the length the voxels imply; structure
  origin ranges tile 0..N-1 with no gap or overlap and agree with each origin's
  structure index; ragged string tables and split codes are well formed;
- voxels: every shard file present with its exact size and zarr's shard index intact;
- checksums and values, on all cores: each origin's crc32 as recorded at build time
  (it covers the origin's stored bytes before compression, i.e. the image in its storage
  dtype; a compressed origin is decoded first, which also checks its zstd frame and
  zstd's own content checksum), no NaN, inf or negative voxel, dtype and image shape
  as the attributes say;
- with ``--sources``: each structure's source still exists with the content hash it
  was built from (staleness);
- with ``--spot-check N``: N random origins re-parsed and re-voxelized by the build's
  own code and compared byte for byte with the stored images.

``--repair`` rewrites the damaged shard files from their structures' sources with the
build's write task (every other file is left alone), then checks again.
Exit codes: 0 clean, 1 problems found (or left after --repair), 2 cannot read the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cache_tools import format as fmt
from cache_tools.options import non_negative_int, positive_int
from cache_tools.reader import ShardReader

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
        self.layout = fmt.VoxelLayout(root)  # CacheError: cannot read the images at all
        self.reader = ShardReader(self.layout, threads=1)
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

def check_metadata(c: Cache) -> None:
    n, params = c.layout.n_origins, c.attrs["params"]
    rotations = int(params["rotations"])

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

    for name, recorded in c.attrs.get("metadata_crc32", {}).items():
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
    c.sha256 = load(fmt.STRUCTURE_SHA256, (m, 32))
    c.atom_count = load(fmt.STRUCTURE_ATOM_COUNT, (m,))
    load(fmt.CENTER, (n, 3))
    c.crc32 = load(fmt.CRC32, (n,))
    if rotations > 1:
        load(fmt.ROTATION, (n, rotations, 3, 3))
    structure_index = load(fmt.STRUCTURE_INDEX, (n,))
    if structure_index is not None and c.ranges is not None:
        expected = np.repeat(np.arange(m, dtype=np.int32), c.ranges[:, 1] - c.ranges[:, 0])
        wrong = np.flatnonzero(structure_index != expected)
        if len(wrong):
            c.report("metadata", f"{len(wrong)} origins' structure index disagrees with the structure ranges",
                     int(wrong[0]), int(wrong[-1]), file=fmt.STRUCTURE_INDEX)
    if (c.root / fmt.STRUCTURE_SPLIT).exists():
        codes = load(fmt.STRUCTURE_SPLIT, (m,))
        names = c.attrs.get("splits") or []
        if codes is not None and np.any(codes >= len(names)):
            c.problems.append(Problem("metadata", f"split codes beyond the {len(names)} split names "
                                      f"{names}", file=fmt.STRUCTURE_SPLIT))
    # dtype and shape as the attributes say
    image = params["image"]
    shape = ((rotations,) if rotations > 1 else ()) + (len(params["channels"]),) + (image["grid_voxels"],) * 3
    if tuple(c.layout.image_shape) != shape or c.layout.dtype.name != params["storage"]["dtype"]:
        c.problems.append(Problem("metadata", f"voxels are {c.layout.dtype.name} {list(c.layout.image_shape)}, "
                                  f"attributes say {params['storage']['dtype']} {list(shape)}", file=fmt.VOXELS))



# --- voxels ---------------------------------------------------------------------------

def check_shard_files(c: Cache) -> list[int]:
    """Sizes and zarr shard indexes; returns the shards whose bytes can be read."""
    layout, readable = c.layout, []
    for shard in range(layout.n_shards):
        path, lo = layout.shard_path(shard), shard * layout.origins_per_shard
        hi = lo + layout.origins_in_shard(shard) - 1
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            c.report("missing-shard", "shard file is missing", lo, hi, c.rel(path))
            continue
        if layout.codec is not None:  # variable size: the index must point inside the file
            with open(path, "rb") as fh:
                fh.seek(max(0, size - 16 * layout.origins_per_shard))
                tail = np.frombuffer(fh.read(), np.uint8)
            problem = fmt.index_problem(layout, shard, fmt.shard_index_of(layout, tail), size)
            if problem:
                c.report("truncated-shard" if "too short" in problem else "shard-index", problem,
                         lo, hi, c.rel(path))
                continue
            readable.append(shard)
            continue
        if size != layout.shard_nbytes(shard):
            c.report("truncated-shard", f"shard file has {size} bytes, expected {layout.shard_nbytes(shard)}",
                     lo, hi, c.rel(path))
            continue
        index = layout.shard_index(shard).tobytes()
        with open(path, "rb") as fh:
            fh.seek(size - len(index))
            if fh.read() != index:
                c.report("shard-index", "zarr's shard index at the end of the file is damaged "
                         "(zarr would read wrong bytes)", lo, hi, c.rel(path))
        readable.append(shard)
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


# --- sources --------------------------------------------------------------------------

def resolve_sources(c: Cache, sources: list[str]) -> list[Path | None]:
    """Each structure's source file now: the recorded paths, or found by id among ``sources``."""
    if not sources:
        return [Path(p) for p in c.paths] if c.paths is not None else [None] * len(c.ids or [])
    build = build_side("--sources PATH")
    try:
        by_id = build.find_sources(sources)
    except build.InputError as exc:
        raise UsageError(f"--sources: {exc}") from None
    return [by_id.get(sid) for sid in (c.ids or [])]


def _digest(path: Path | None) -> str | None:
    """sha256 of a source file, or None when it is missing or unreadable."""
    try:
        return fmt.file_sha256(path) if path is not None else None
    except OSError:
        return None


def _unchanged(c: Cache, k: int, sha: str | None) -> bool:
    """Does a source with digest ``sha`` still hold what structure ``k`` was built from?"""
    return sha is not None and (c.sha256 is None or bytes.fromhex(sha) == c.sha256[k].tobytes())


def check_sources(c: Cache, files: list[Path | None], workers: int) -> list[bool]:
    """Staleness: each source present with the hash it was built from; returns which are usable."""
    with ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib releases the GIL too
        digests = list(pool.map(_digest, files))
    usable = []
    for k, (path, sha) in enumerate(zip(files, digests)):
        sid, recorded = c.name(k)
        origins = (int(c.ranges[k, 0]), int(c.ranges[k, 1]) - 1)
        if sha is None:
            detail = (f"no source file with id '{sid}' among --sources" if path is None
                      else f"source file is missing or unreadable: {path}")
            c.problems.append(Problem("source-missing", detail, origins, sid, recorded))
        elif not _unchanged(c, k, sha):
            c.problems.append(Problem("stale", f"source changed since the build (sha256 differs): {path}",
                                      origins, sid, recorded))
        usable.append(_unchanged(c, k, sha))
    return usable


def spot_check(c: Cache, files: list[Path | None], usable: list[bool], n: int, seed: int,
               progress: bool) -> int:
    """Re-parse and re-voxelize ``n`` random origins of usable structures; compare with the stored bytes."""
    from tqdm import tqdm

    build = build_side("--spot-check")
    rotations = int(c.attrs["params"]["rotations"])
    pool = np.concatenate([np.arange(c.ranges[k, 0], c.ranges[k, 1]) for k in range(len(usable)) if usable[k]]
                          or [np.zeros(0, np.int64)])
    chosen = np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)), replace=False))
    centers = fmt.read_array(c.root, fmt.CENTER)
    mats = fmt.read_array(c.root, fmt.ROTATION) if rotations > 1 else None
    layout = c.layout
    encoder, current = None, -1
    for origin in tqdm(chosen.tolist(), desc="spot check", unit="origin", disable=not progress):
        k = int(np.searchsorted(c.ranges[:, 1], origin, side="right"))
        if k != current:
            current = k
            try:
                encoder = build.reference_encoder(c.attrs, files[k])
            except build.ParseError as exc:
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


# --- the whole check ------------------------------------------------------------------

def check_cache(root: str | os.PathLike, sources: list[str] | None = None, spot: int = 0, seed: int = 0,
                workers: int | None = None, progress: bool = True) -> dict:
    """Run every check; returns a JSON-ready report. Raises CacheError when the cache is unreadable."""
    root = Path(root).absolute()
    workers = workers or os.cpu_count() or 1
    report = {"cache": str(root), "origins": None, "structures": None, "bytes_checked": 0,
              "sources_checked": 0, "spot_checked": 0}
    attrs = fmt.read_attrs(root)
    if not attrs.get("complete"):  # its arrays may not exist yet: nothing else to check
        incomplete = Problem("incomplete", "the build has not finished; rerun the same "
                             "`pipeline build-cache` command to complete it")
        return {**report, "problems": [incomplete.to_dict()], "ok": False}
    c = Cache(root, attrs)
    check_metadata(c)
    readable = check_shard_files(c)
    report["bytes_checked"] = check_voxels(c, readable, workers, progress)
    if (sources is not None or spot) and c.ranges is not None:
        files = resolve_sources(c, sources or [])
        usable = check_sources(c, files, workers)
        report["sources_checked"] = len(files)
        if spot:
            report["spot_checked"] = spot_check(c, files, usable, spot, seed, progress)
    report.update(origins=c.layout.n_origins, structures=len(c.ranges) if c.ranges is not None else None,
                  problems=[p.to_dict() for p in c.problems], ok=not c.problems)
    return report


def repair(root: str | os.PathLike, report: dict, sources: list[str] | None = None,
           progress: bool = True) -> list[dict]:
    """Rewrite the shard files holding the damaged origins of ``report``; returns what was rewritten."""
    problems = [Problem.from_dict(p) for p in report["problems"]]
    if any(p.kind == "incomplete" for p in problems):
        raise RepairError("the build is incomplete; rerun the same `pipeline build-cache` command")
    if any(p.kind == "metadata" for p in problems):
        raise RepairError("its metadata is damaged, which --repair does not rewrite; delete it and rerun "
                          "the `pipeline build-cache` command that built it")
    c = Cache(Path(root).absolute())
    check_metadata(c)
    per_shard = c.layout.origins_per_shard
    shards = sorted({s for p in problems if p.kind in SHARD_KINDS
                     for s in range(p.origins[0] // per_shard, p.origins[1] // per_shard + 1)})
    if not shards:
        return []
    files = resolve_sources(c, sources or [])

    def structures(shard: int) -> list[int]:
        first = shard * per_shard
        return [k for k, _, _ in c.structures_of(first, first + c.layout.origins_in_shard(shard) - 1)]

    needed = sorted({k for s in shards for k in structures(s)})
    for k in needed:
        if not _unchanged(c, k, _digest(files[k])):
            raise RepairError(f"structure {c.ids[k]}: its source ({files[k] or c.paths[k]}) is missing or "
                              "changed since the build; give the original files with --sources")
    build = build_side("--repair")
    try:
        build.rebuild_shards(c.root, shards, {k: files[k] for k in needed}, progress=progress)
    except build.BuildError as exc:
        raise RepairError(str(exc)) from None
    return [{"shard": s, "file": c.rel(c.layout.shard_path(s)), "structures": [c.ids[k] for k in structures(s)]}
            for s in shards]


def build_side(flag: str):
    """``pipeline.repair``, the build's own code: the one way from here into ``pipeline``,
    imported only when ``flag`` needs it, so a plain check needs numpy alone."""
    try:
        import pipeline.repair
    except ImportError as exc:
        raise UsageError(f"{flag} needs the build side of voxel-cache (the `pipeline` package and "
                         f"gemmi, scipy, macromol_voxelize): {exc}") from None
    return pipeline.repair


class RepairError(Exception):
    """The damage cannot be repaired in place; str() says why and what to do instead."""


class UsageError(Exception):
    """Bad arguments (e.g. a --sources path that does not exist)."""


# --- command line ---------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Verify that every byte of a cache is what the build wrote: completeness, metadata, "
                     "shard files, per-origin checksums and values; with --sources, staleness of the "
                     "sources; with --spot-check, re-voxelized images.")
    p.epilog = ("exit codes: 0 clean; 1 problems found (or left after --repair); 2 the cache cannot be "
                "read, or bad arguments")
    p.add_argument("cache", metavar="CACHE", help="path of the zarr store")
    p.add_argument("--sources", nargs="*", metavar="PATH",
                   help="check staleness: each structure's source still has the content hash it was built "
                        "from; with no PATH, the source paths recorded in the cache, else files, "
                        "directories or @list.txt matched by structure id")
    p.add_argument("--spot-check", type=non_negative_int, default=0, metavar="N",
                   help="re-parse and re-voxelize N random origins and compare them with the stored "
                        "images (uses --sources, or the recorded source paths)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the spot check's choice (default: 0)")
    p.add_argument("--repair", action="store_true",
                   help="rewrite the shard files that hold damaged origins from their sources with the "
                        "build's own code, then check again")
    p.add_argument("--workers", type=positive_int, default=None, help="threads for checksums (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    progress = not args.quiet
    try:
        report = check_cache(args.cache, args.sources, args.spot_check, args.seed, args.workers, progress)
        if args.repair and not report["ok"]:
            repaired = repair(args.cache, report, args.sources, progress)
            report = {**check_cache(args.cache, args.sources, 0, args.seed, args.workers, progress),
                      "repaired": repaired}
    except (fmt.CacheError, UsageError) as exc:
        print(f"cache-tools check: {exc}", file=sys.stderr)
        return 2
    except RepairError as exc:
        print(f"cache-tools check: cannot repair {args.cache}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def format_report(report: dict) -> str:
    lines = [Problem.from_dict(p).line() for p in report["problems"]]
    for r in report.get("repaired") or []:
        lines.append(f"repaired: {r['file']} (structures {', '.join(r['structures'])})")
    checked = [f"{report['origins']} origins", f"{report['structures']} structures",
               f"{report['bytes_checked'] / 2**20:.1f} MiB checksummed"] if report["origins"] is not None else []
    if report["sources_checked"]:
        checked.append(f"{report['sources_checked']} sources hashed")
    if report["spot_checked"]:
        checked.append(f"{report['spot_checked']} origins re-voxelized")
    verdict = "OK" if report["ok"] else f"{len(report['problems'])} problem(s)"
    lines.append(f"{report['cache']}: {verdict}" + (f" ({', '.join(checked)})" if checked else ""))
    return "\n".join(lines)
