"""`cache-tools check CACHE`: is every byte of a cache what the build wrote?

Checks, in order (each problem is one line naming origin ids, structure and file):

- the cache: attributes readable, format version known, build complete, the build parameters
  (scale, dtype, grid, ...) unchanged since the build (the checksum it recorded; a cache built
  before it gets a note);
- metadata: every array present, untruncated, of the length the voxels imply; structure
  origin ranges tile 0..N-1 with no gap or overlap and agree with each origin's
  structure index; ragged string tables and split codes are well formed;
- voxels: every shard file present with its exact size and zarr's shard index intact;
- checksums and values, on all cores: each origin's crc32 as recorded at build time
  (it covers the origin's stored bytes before compression, i.e. the image in its storage
  dtype; a compressed origin is decoded first, which also checks its zstd frame and
  zstd's own content checksum), no NaN, inf or negative voxel, dtype and image shape
  as the attributes say;
- a lattice cache (``--layout lattice``): its block shard files and every block's crc32 and
  values instead, each problem naming the blocks, their structure and the file;
- the split and subsets (``cache-tools split``, ``subset``) and origin sets (``cache-tools
  origins``): arrays present, unchanged and consistent, a problem naming the file and the
  command that recreates it;
- with ``--sources``: each structure's source still exists with the content hash it
  was built from (staleness);
- with ``--spot-check N``: N random origins (on a lattice cache, N random blocks) re-parsed
  and re-voxelized by the build's own code and compared byte for byte with the stored ones.

``--repair`` rewrites the damaged shard files (a lattice cache's block shards too) from their
structures' sources with the build's write task (every other file is left alone), then checks again.
Exit codes: 0 clean, 1 problems found (or left after --repair), 2 cannot read the cache.

What needs the build's code (finding sources by id among ``--sources PATH``, ``--spot-check``,
``--repair``) lives in ``pipeline`` (``pipeline check``, :mod:`pipeline.repair`), which
imports this module; ``cache-tools check`` runs ``pipeline check`` as a child process for
those options, so nothing here imports ``pipeline``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cache_tools import format as fmt
from cache_tools.commands.options import non_negative_int, positive_int
from cache_tools.commands.integrity import (Cache, Problem, check_metadata, check_origin_sets, check_selections,
                                            check_shard_files, check_voxels)

# --- sources --------------------------------------------------------------------------

def recorded_sources(c: Cache) -> list[Path | None]:
    """Each structure's source file as the build recorded it."""
    return [Path(p) for p in c.paths] if c.paths is not None else [None] * len(c.ids or [])


def digest(path: Path | None) -> str | None:
    """sha256 of a source file, or None when it is missing or unreadable."""
    try:
        return fmt.file_sha256(path) if path is not None else None
    except OSError:
        return None


def unchanged(c: Cache, k: int, sha: str | None) -> bool:
    """Does a source with digest ``sha`` still hold what structure ``k`` was built from?"""
    return sha is not None and (c.sha256 is None or bytes.fromhex(sha) == c.sha256[k].tobytes())


def check_sources(c: Cache, files: list[Path | None], workers: int) -> list[bool]:
    """Staleness: each source present with the hash it was built from; returns which are usable."""
    with ThreadPoolExecutor(max_workers=workers) as pool:  # hashlib releases the GIL too
        digests = list(pool.map(digest, files))
    usable = []
    for k, (path, sha) in enumerate(zip(files, digests)):
        sid, recorded = c.name(k)
        origins = (int(c.ranges[k, 0]), int(c.ranges[k, 1]) - 1)
        if sha is None:
            detail = (f"no source file with id '{sid}' among --sources" if path is None
                      else f"source file is missing or unreadable: {path}")
            c.problems.append(Problem("source-missing", detail, origins, sid, recorded))
        elif not unchanged(c, k, sha):
            c.problems.append(Problem("stale", f"source changed since the build (sha256 differs): {path}",
                                      origins, sid, recorded))
        usable.append(unchanged(c, k, sha))
    return usable


# --- the whole check ------------------------------------------------------------------

def inspect(root: str | os.PathLike, workers: int | None = None,
            progress: bool = True) -> tuple[Cache | None, dict]:
    """The checks of the cache's own bytes (attributes, metadata, shard files, checksums and
    values); returns (the cache as read, or None when its build is incomplete, the report so far).
    Raises CacheError when the cache is unreadable."""
    root = Path(root).absolute()
    report = {"cache": str(root), "origins": None, "structures": None, "bytes_checked": 0,
              "sources_checked": 0, "spot_checked": 0}
    attrs = fmt.read_attrs(root)
    if not attrs.complete:  # its arrays may not exist yet: nothing else to check
        incomplete = Problem("incomplete", attrs.incomplete_reason() if attrs.no_usable_input else
                             "the build has not finished; rerun the same `pipeline build-cache` command "
                             "to complete it")
        return None, {**report, "problems": [incomplete.to_dict()], "ok": False}
    c = Cache(root, attrs)
    if attrs.params_crc32 is None:
        report["notes"] = ["the build recorded no checksum of its parameters (a cache built before it did): "
                           "the attributes in zarr.json are cross-checked with the arrays but cannot be "
                           "checked against the build"]
    check_metadata(c)
    check_selections(c)
    check_origin_sets(c)
    if c.lattice:  # every block instead of every origin's image
        from cache_tools.commands.lattice_integrity import Blocks, check_block_files, check_blocks

        blocks = Blocks(c)
        readable = check_block_files(c, blocks)
        report["bytes_checked"] = check_blocks(c, blocks, readable, workers or os.cpu_count() or 1, progress)
        return c, report
    readable = check_shard_files(c)
    report["bytes_checked"] = check_voxels(c, readable, workers or os.cpu_count() or 1, progress)
    return c, report


def conclude(c: Cache, report: dict) -> dict:
    """The report with what ``c`` found."""
    return {**report, "origins": c.n_origins, "structures": len(c.ranges) if c.ranges is not None else None,
            "problems": [p.to_dict() for p in c.problems], "ok": not c.problems}


def check_cache(root: str | os.PathLike, sources: bool = False, workers: int | None = None,
                progress: bool = True) -> dict:
    """Every read-side check; ``sources``: also hash the recorded source files (staleness).
    Returns a JSON-ready report; raises CacheError when the cache is unreadable.

    Checks that need the build's code (sources found among paths, re-voxelizing, repair)
    are ``pipeline check``'s (``pipeline.repair.full_check``)."""
    c, report = inspect(root, workers, progress)
    if c is None:
        return report
    if sources and c.ranges is not None:
        files = recorded_sources(c)
        check_sources(c, files, workers or os.cpu_count() or 1)
        report["sources_checked"] = len(files)
    return conclude(c, report)


# --- command line ---------------------------------------------------------------------

BUILD_SIDE_HELP = "(the build side: `cache-tools check` hands this to `pipeline check`)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Verify that every byte of a cache is what the build wrote: completeness, metadata, "
                     "shard files, per-origin checksums and values; with --sources, staleness of the "
                     "sources; with --spot-check, re-voxelized images.")
    p.epilog = ("exit codes: 0 clean; 1 problems found (or left after --repair); 2 the cache cannot be "
                "read, or bad arguments. --sources PATH, --spot-check and --repair run the build's own "
                "code: they are `pipeline check`'s options, which `cache-tools check` runs for you.")
    p.add_argument("cache", metavar="CACHE", help="path of the zarr store")
    p.add_argument("--sources", nargs="*", metavar="PATH",
                   help="check staleness: each structure's source still has the content hash it was built "
                        "from; with no PATH, the source paths recorded in the cache, else files, "
                        f"directories or @list.txt matched by structure id {BUILD_SIDE_HELP}")
    p.add_argument("--spot-check", type=non_negative_int, default=0, metavar="N",
                   help="re-parse and re-voxelize N random origins (a lattice cache: N random blocks) and "
                        "compare them with the stored bytes (uses --sources, or the recorded source paths) "
                        f"{BUILD_SIDE_HELP}")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the spot check's choice (default: 0)")
    p.add_argument("--repair", action="store_true",
                   help="rewrite the shard files that hold damaged origins from their sources with the "
                        "build's own code, then check again; only the structures it re-voxelizes need a "
                        "source (the recorded path, or one found among --sources PATH) "
                        f"{BUILD_SIDE_HELP}")
    p.add_argument("--workers", type=positive_int, default=None, help="threads for checksums (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def needs_build_side(args: argparse.Namespace) -> str | None:
    """The option that needs the build's code, or None for a read-side check."""
    if args.repair:
        return "--repair"
    if args.spot_check:
        return "--spot-check"
    if args.sources:
        return "--sources PATH"
    return None


def hand_over(argv: list[str], flag: str) -> int:
    """Run ``pipeline check ARGV`` in this interpreter (cache_tools never imports pipeline)."""
    if importlib.util.find_spec("pipeline") is None:
        print(f"cache-tools check: {flag} needs the build side of voxel-cache (the `pipeline` package, "
              "with gemmi, scipy, macromol_voxelize), which is not installed here", file=sys.stderr)
        return 2
    sys.stdout.flush()
    child = subprocess.Popen([sys.executable, "-m", "pipeline", "check", *argv],
                             env={**os.environ, "VOXEL_CACHE_CALLER": "cache-tools check"})
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None  # Ctrl-C: the child's to report
    try:
        return child.wait()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace) -> int:
    flag = needs_build_side(args)
    if flag is not None:
        return hand_over(args.argv, flag)
    try:
        report = check_cache(args.cache, args.sources is not None, args.workers, not args.quiet)
    except fmt.CacheError as exc:
        print(f"cache-tools check: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def format_report(report: dict) -> str:
    lines = [f"note: {note}" for note in report.get("notes") or []]
    lines += [Problem.from_dict(p).line() for p in report["problems"]]
    for r in report.get("repaired") or []:
        lines.append(f"repaired: {r['file']} (structures {', '.join(r['structures'])})")
    checked = [f"{report['origins']} origins", f"{report['structures']} structures",
               f"{report['bytes_checked'] / 2**20:.1f} MiB checksummed"] if report["origins"] is not None else []
    if report["sources_checked"]:
        checked.append(f"{report['sources_checked']} sources hashed")
    if report["spot_checked"]:
        checked.append(f"{report['spot_checked']} {report.get('spot_unit', 'origins')} re-voxelized")
    verdict = "OK" if report["ok"] else f"{len(report['problems'])} problem(s)"
    lines.append(f"{report['cache']}: {verdict}" + (f" ({', '.join(checked)})" if checked else ""))
    return "\n".join(lines)
